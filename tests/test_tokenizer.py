"""The byte-level BPE tokenizer: exact round trips, DeepSeek special tokens, transformers compatibility, chat
template, byte lengths for bits-per-byte, and the token-tax report."""

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from nanoseek.data import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    USER,
    DataError,
    Tokenizer,
    iter_documents,
    token_tax_report,
    train_tokenizer,
)

UDHR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "udhr"

SAMPLES = [
    "Hello, world! Don't panic; it's 42.",
    "emoji 🌍🚀👩‍👩‍👧‍👦 and flags 🇰🇪🇧🇷",
    "中文分词测试：你好，世界。日本語のテキスト、カタカナ。한국어 문장.",
    "مرحبا بالعالم، هذا نص عربي. اردو متن",
    "हिन्दी पाठ, தமிழ் உரை, বাংলা লেখা",
    "def f(x):\n\tif x:\n\t\treturn x ** 2  # tabs\r\n    else:\n        return None\n\n\n",
    "  leading and trailing spaces   \n\t \u00a0nbsp\u200bzwsp\ufeffbom",
    "numbers 1234567890 3.14159 1e-10 -0x1F",
    "\x00\x01\x7f control bytes and a lone combining mark \u0301",
    "",
]


def _random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x0, 0x1F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """vocab 512 on the chatterbot dialogues (~0.7 MB, 28 languages; shipped with the install): seconds."""
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer((d.text for d in iter_documents(["chatterbot"])), 512, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


def test_round_trip_is_exact(tok):
    rng = random.Random(0)
    texts = SAMPLES + [_random_text(rng, rng.randint(1, 300)) for _ in range(200)]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=True) == [0, *ids]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts[:3], bos=True) == [tok.encode(t, bos=True) for t in texts[:3]]
    bad = b"caf\xe9".decode("utf-8", errors="surrogateescape")  # how Python carries bytes that were not UTF-8
    for encode in (lambda: tok.encode(bad), lambda: tok.encode_batch(["ok", bad])):
        with pytest.raises(DataError, match=r"not valid Unicode \(surrogates not allowed at character 3\)"):
            encode()


def test_special_tokens_have_deepseek_names_and_ids_0_to_4(tok, tok_dir):
    assert SPECIAL_TOKENS == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>",
                              "<｜Assistant｜>"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.encode(BOS + "hi" + EOS) == [0, *tok.encode("hi"), 1]
    # Ordinary text never produces a special id, and bytes are ids 5..260.
    assert min(tok.encode(" ".join(SAMPLES))) >= len(SPECIAL_TOKENS)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_vocab_size_is_honoured_and_small_ones_rejected(tmp_path, tok):
    assert tok.vocab_size == 512
    texts = [d.text for d in iter_documents(["chatterbot:english"])]
    for size in (261, 300, 1000):
        assert train_tokenizer(texts, size, tmp_path / str(size)).vocab_size == size
        assert Tokenizer.load(tmp_path / str(size)).vocab_size == size
    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer(texts, 260, tmp_path / "small")
    with pytest.raises(DataError, match="no text"):
        train_tokenizer([], 300, tmp_path / "empty")


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"no tokenizer\.json.*nanoseek tokenizer train"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    (tmp_path / "tokenizer.json").write_text(HFTokenizer(models.BPE()).to_str())  # no DeepSeek special tokens
    with pytest.raises(DataError, match="lacks the special tokens"):
        Tokenizer.load(tmp_path)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert again.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert (tmp_path / "tokenizer.json").read_text() == tok.hf.to_str()
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_transformers_loads_it_offline_with_the_same_ids(tok, tok_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tok.vocab_size
    rng = random.Random(1)
    for text in SAMPLES + [_random_text(rng, 100) for _ in range(20)]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.encode(text) == tok.encode(text, bos=True)  # like DeepSeek's tokenizer: BOS by default
        assert hf.decode(ids) == tok.decode(ids) == text
    special = [0, 3, *tok.encode("hi"), 4, 1]
    assert hf.decode(special) == tok.decode(special) == f"{BOS}{USER}hi{ASSISTANT}{EOS}"


CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], True,
     f"{BOS}{USER}Hi{ASSISTANT}"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?\n"}], True,
     f"{BOS}Be brief.{USER}2+2?{ASSISTANT}4{EOS}{USER}and 3+3?\n{ASSISTANT}"),
    ([{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
      {"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": " {{ not jinja }} "}], False,
     f"{BOS}A\n\nB{USER}  spaced  {ASSISTANT} {{{{ not jinja }}}} {EOS}"),
    ([{"role": "user", "content": "日本語"}, {"role": "assistant", "content": "はい"}], False,
     f"{BOS}{USER}日本語{ASSISTANT}はい{EOS}"),
]


@pytest.mark.parametrize("messages,gen,expected", CONVERSATIONS)
def test_chat_template_renders_identically_in_nanoseek_and_transformers(tok, tok_dir, messages, gen, expected):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == expected
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == ours
    ids = tok.encode(ours)
    assert ids[0] == 0 and ids.count(0) == 1  # the template's BOS text becomes the BOS token, once
    assert hf.encode(ours, add_special_tokens=False) == ids


def test_chat_template_rejects_unknown_roles(tok):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="unknown chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_a_tokenizer_without_template_refuses_chat_instead_of_guessing(tok, tok_dir, tmp_path):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    base = Tokenizer.load(tmp_path)
    assert base.chat_template is None
    with pytest.raises(DataError, match="no chat template"):
        base.apply_chat_template([{"role": "user", "content": "hi"}])
    (tmp_path / "chat_template.jinja").write_text(tok.chat_template)  # where transformers 5 writes it
    assert Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_named_chat_templates_use_the_default_one(tok, tok_dir, tmp_path):
    """tokenizer_config.json may hold transformers' list of named templates; chat uses the one named default."""
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                               {"name": "default", "template": tok.chat_template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    hi = [{"role": "user", "content": "hi"}]
    assert Tokenizer.load(tmp_path).apply_chat_template(hi) == tok.apply_chat_template(hi)
    config["chat_template"] = config["chat_template"][:1]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"named chat templates \['tool_use'\] but none named 'default'"):
        Tokenizer.load(tmp_path)


def test_token_byte_lengths_count_utf8_bytes(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths.dtype == np.int64
    assert lengths[: len(SPECIAL_TOKENS)].tolist() == [0] * len(SPECIAL_TOKENS)
    assert (lengths[len(SPECIAL_TOKENS):] >= 1).all()
    assert (lengths == 1).sum() == 256  # each byte is a token
    rng = random.Random(2)
    for text in SAMPLES + [_random_text(rng, 200) for _ in range(20)]:
        assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))
        assert int(lengths[tok.encode(text, bos=True)].sum()) == len(text.encode("utf-8"))  # BOS: 0 bytes


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_token_tax_report_on_udhr(tok_dir, tmp_path):
    if not (UDHR / "eng.txt").is_file():
        pytest.skip(f"{UDHR} is absent")
    png = tmp_path / "tax.png"
    rows = token_tax_report(tok_dir, UDHR, png)
    assert len(rows) == 20 == len(list(UDHR.glob("*.txt")))
    by = {r.language: r for r in rows}
    assert by["eng"].premium == 1.0 and by["eng"].name == "English"
    assert {"fra", "cmn_hans", "hin", "swh", "yor", "amh", "arb"} <= set(by)
    tok = Tokenizer.load(tok_dir)
    for r in rows:
        text = (UDHR / f"{r.language}.txt").read_text(encoding="utf-8")
        assert (r.chars, r.bytes, r.tokens) == (len(text), len(text.encode()), len(tok.encode(text)))
        assert r.premium == pytest.approx(r.tokens / by["eng"].tokens)
        assert r.tokens_per_char == pytest.approx(r.tokens / r.chars)
    assert [r.premium for r in rows] == sorted(r.premium for r in rows)
    assert by["amh"].premium > 1.0  # a script the tokenizer barely saw costs more than English
    w, h = _png_size(png)
    assert 600 <= w <= 3000 and 400 <= h <= 3000
    assert png.stat().st_size > 20_000


def test_a_tokenizer_file_stands_for_its_folder_and_a_missing_parallel_folder_is_named(tok_dir, tmp_path):
    assert Tokenizer.load(tok_dir / "tokenizer.json").vocab_size == Tokenizer.load(tok_dir).vocab_size
    with pytest.raises(DataError, match="nope is not a folder"):
        token_tax_report(tok_dir, tmp_path / "nope", None)


def test_token_tax_report_needs_english(tok_dir, tmp_path):
    (tmp_path / "fra.txt").write_text("Bonjour le monde", encoding="utf-8")
    with pytest.raises(DataError, match=r"no eng\.txt"):
        token_tax_report(tok_dir, tmp_path, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_token_tax_report_on_a_small_folder(tok_dir, tmp_path):
    texts = {"eng": "All human beings are born free and equal.",
             "fra": "Tous les êtres humains naissent libres et égaux.",
             "amh": "የሰው ልጅ ሁሉ ሲወለድ ነጻና በክብርና በመብትም እኩልነት ያለው ነው።"}  # a script the tokenizer never saw
    for lang, text in texts.items():
        (tmp_path / f"{lang}.txt").write_text(text, encoding="utf-8")
    rows = token_tax_report(tok_dir, tmp_path, None)
    assert [r.language for r in rows] == ["eng", "fra", "amh"]  # by premium, not by name
    tok = Tokenizer.load(tok_dir)
    english = len(tok.encode(texts["eng"]))
    for r in rows:
        text = texts[r.language]
        assert (r.chars, r.bytes, r.tokens) == (len(text), len(text.encode()), len(tok.encode(text)))
        assert (r.premium, r.tokens_per_char) == (pytest.approx(r.tokens / english), pytest.approx(r.tokens / r.chars))
    assert rows[0].premium == 1.0 < rows[1].premium < rows[2].premium
    (tmp_path / "amh.txt").unlink()
    # files are read as training reads them: a byte-order mark is no text, CRLF stays two characters
    (tmp_path / "eng.txt").write_bytes(b"\xef\xbb\xbfAll human beings\r\nare born free and equal.")
    assert token_tax_report(tok_dir, tmp_path, None)[0].chars == len("All human beings\r\nare born free and equal.")
    (tmp_path / "fra.txt").write_text("Tous les êtres humains", encoding="utf-16")
    with pytest.raises(DataError, match=r"fra.txt: UTF-16 \(it starts with a UTF-16 byte-order mark\)"):
        token_tax_report(tok_dir, tmp_path, None)


def test_words_keep_their_marks_and_zero_width_joiners(tok):
    # the pre-tokenizer's pieces: merges never cross them, so a word split here costs tokens in every text
    pieces = lambda text: len(tok.hf.pre_tokenizer.pre_tokenize_str(text))
    assert pieces("नमस्ते दुनिया") == 2  # Devanagari vowel signs and virama are marks, inside the word
    assert pieces("می\u200cخواهم بروم") == 2  # Persian writes a zero-width non-joiner inside words
    assert pieces("क्\u200dष") == 1 and pieces("മല\u200dയാളം") == 1  # a joiner inside a conjunct
    assert pieces("hello, world") == 3 and pieces("a\u200c!") == 2  # punctuation stays apart
    assert pieces("a 👨\u200d👩\u200d👧 b") == 3  # between symbols a joiner stays with them: one emoji sequence
