"""Byte-level BPE tokenizer (HF `tokenizers`), with DeepSeek-V3's special tokens and chat format.

A tokenizer folder holds `tokenizer.json` (the tokenizers pipeline) and `tokenizer_config.json` (what
transformers needs: class, special tokens, chat template), so `AutoTokenizer.from_pretrained(dir)` loads it
offline and encodes exactly as `Tokenizer` does. Byte-level means every UTF-8 string round-trips exactly and
there is no unknown token.

    tok = train_tokenizer(texts, vocab_size=8192, out_dir="tok/")
    ids = tok.encode("hello", bos=True)             # [0, ...]: BOS separates documents, as in DeepSeek
    tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.io import write_atomic

# DeepSeek-V3's spellings: fullwidth vertical bars (U+FF5C) and lower one-eighth blocks (U+2581).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0..4, so bos_token_id=0, eos_token_id=1 as in ModelConfig
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte must be a token, or some text could not be encoded
# GPT-2's word split over letters and marks, and the zero-width non-joiner and joiner (ZW: U+200C, U+200D) that
# Persian, Urdu, Malayalam and Devanagari conjuncts write inside words: one word, not three pieces. Between
# symbols a joiner still belongs to them (emoji sequences such as a family are one piece).
WORD_SPLIT = r"'(?:[sdmt]|ll|ve|re)| ?[\p{L}\p{M}ZW]+| ?\p{N}+| ?[^\s\p{L}\p{M}\p{N}]+|\s+(?!\S)|\s+".replace(
    "ZW", "\u200c\u200d")

# DeepSeek-V3 layout: system text right after BOS, then <｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜> turns.
# Written for the environment transformers renders chat templates in (trim_blocks, lstrip_blocks), which
# `Tokenizer.apply_chat_template` reproduces, so both give the same string.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages if message['role'] == 'system' %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ message['content'] }}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + eos_token }}"
    "{% elif message['role'] != 'system' %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


class DataError(ValueError):
    """Data or tokenizer files nanoseek cannot use; the message names the file and the fix."""


@lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted: each character of a byte-level token is one byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _pipeline(vocab_size: int) -> tuple[HFTokenizer, trainers.BpeTrainer]:
    tok = HFTokenizer(models.BPE())
    # As DeepSeek-V3 does: numbers in groups of up to 3 digits and runs of CJK/kana on their own, so merges never
    # glue digits to words or learn arbitrary long numbers; then the GPT-2 word split, widened so that combining
    # marks (\p{M}: Devanagari, Tamil, Bengali vowel signs...) stay inside their word instead of being split off.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Like DeepSeek's tokenizer.json: transformers' encode(text) prepends BOS; nanoseek's encode does so on request.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                    model_max_length: int = 4096) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and the 256 bytes included) and save it.

    The vocabulary comes out smaller than asked only when the text has no more pairs to merge."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs the 256 bytes and "
                         f"{len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB_SIZE}")
    seen = {"docs": 0, "chars": 0}

    def counted() -> Iterator[str]:
        for t in texts:
            seen["docs"] += 1
            seen["chars"] += len(t)
            yield t

    hf, trainer = _pipeline(vocab_size)
    hf.train_from_iterator(counted(), trainer=trainer)
    if not seen["chars"]:
        raise DataError("no text to train the tokenizer on: the inputs held no documents")
    tok = Tokenizer(hf, model_max_length=model_max_length)
    tok.save(out_dir)
    return tok


def _check_text(text: str) -> None:
    """A DataError for a string that is no Unicode text: a lone surrogate, which is how Python carries bytes that
    were not UTF-8 (a Latin-1 terminal, a file in another encoding)."""
    if not isinstance(text, str):
        return  # not text at all: tokenizers' own TypeError says so
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise DataError(f"the text is not valid Unicode ({e.reason} at character {e.start}): was it read from bytes "
                        "that are not UTF-8? Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e


class Tokenizer:
    """`tokenizers.Tokenizer` plus the special-token ids, the chat template and byte lengths for bits-per-byte."""

    def __init__(self, hf: HFTokenizer, model_max_length: int = 4096, chat_template: str | None = CHAT_TEMPLATE):
        self.hf = hf
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]  # 0..4 when nanoseek trained it; DeepSeek's own differ
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
        if missing:
            raise DataError(f"the tokenizer lacks the special tokens {missing}: train one with `nanoseek tokenizer "
                            "train`")
        self.bos_id, self.eos_id, self.pad_id, self.user_id, self.assistant_id = ids

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.name == "tokenizer.json" and path.is_file():  # the file given for its folder
            path = path.parent
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"{path} holds no tokenizer.json: train one with `nanoseek tokenizer train --out {path}`")
        try:
            hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise DataError(f"{path / 'tokenizer.json'} is not a valid tokenizer file: {e}") from e
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            try:
                config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path / 'tokenizer_config.json'} is not valid JSON ({e})") from e
        template = config.get("chat_template")  # None: a base model with no chat format; never guess one
        if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise DataError(f"{path / 'tokenizer_config.json'} has named chat templates {sorted(map(str, named))} "
                                "but none named 'default', the one chat uses")
            template = named["default"]
        if (path / "chat_template.jinja").is_file():  # where transformers 5 saves it when it re-saves a tokenizer
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(hf, model_max_length=config.get("model_max_length", 4096), chat_template=template)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_atomic(path / "tokenizer.json", self.hf.to_str())
        write_atomic(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers' answer to a string holding a lone surrogate
            _check_text(text)
            raise
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], bos: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (the tokenizers thread pool); no offsets are computed."""
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast: tokenizers >= 0.21
        try:
            encs = encode(texts, add_special_tokens=False)
        except TypeError:
            for t in texts:
                _check_text(t)
            raise
        return [[self.bos_id, *e.ids] for e in encs] if bos else [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for: a byte-level token's characters mapped back to bytes (a token may hold part
        of a UTF-8 character, which its decoded text shows as U+FFFD), or a special token's text."""
        token = self.hf.id_to_token(token_id)
        if token is None:
            raise DataError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")
        chars = _byte_level_chars()
        if token in self._special or any(c not in chars for c in token):
            return self.decode([token_id]).encode()
        return bytes(chars[c] for c in token)

    @cached_property
    def _special(self) -> frozenset[str]:
        return frozenset(t.content for t in self.hf.get_added_tokens_decoder().values())

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for special tokens): bits per byte = nats / ln 2 / Σ bytes."""
        chars = _byte_level_chars()
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if token not in self._special:
                if any(c not in chars for c in token):
                    raise DataError(f"token {token!r} (id {i}) is not byte-level: not a nanoseek tokenizer")
                out[i] = len(token)  # one character per byte
        return out

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render a conversation exactly as transformers' apply_chat_template(..., tokenize=False) does."""
        if self.chat_template is None:
            raise DataError("this tokenizer has no chat template (no chat_template in tokenizer_config.json and no "
                            "chat_template.jinja): it is a base model; use completions, or add a template")
        return _compile_template(self.chat_template).render(messages=messages, bos_token=BOS, eos_token=EOS,
                                                            pad_token=PAD, add_generation_prompt=add_generation_prompt)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    # The same settings transformers uses, so whitespace handling matches.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


# ---- the token tax: how many more tokens the same content costs in another language ------------------------

LANGUAGES = {
    "amh": "Amharic", "arb": "Arabic", "ben": "Bengali", "cmn_hans": "Chinese, Simplified", "eng": "English",
    "fra": "French", "hau_NG": "Hausa", "hin": "Hindi", "ind": "Indonesian", "por": "Portuguese", "rus": "Russian",
    "som": "Somali", "spa": "Spanish", "swh": "Swahili", "tam": "Tamil", "tel": "Telugu", "urd": "Urdu",
    "vie": "Vietnamese", "yor": "Yoruba", "zul": "Zulu", "deu": "German", "jpn": "Japanese", "kor": "Korean",
    "heb": "Hebrew", "mar": "Marathi", "tha": "Thai", "pes": "Persian", "mal": "Malayalam", "npi": "Nepali",
}


@dataclass
class TaxRow:
    language: str  # file stem, e.g. "fra" or "cmn_hans"
    name: str
    chars: int
    bytes: int
    tokens: int
    tokens_per_char: float
    premium: float  # tokens(language) / tokens(English) for the same content


def token_tax_report(tokenizer_dir: str | Path, parallel_dir: str | Path, out_png: str | Path | None) -> list[TaxRow]:
    """Tokens the same text costs in each language of `parallel_dir` (one `<code>.txt` per language, `eng.txt`
    the reference), sorted by premium over English; draws a bar chart to `out_png` unless it is None."""
    tok = Tokenizer.load(tokenizer_dir)
    parallel_dir = Path(parallel_dir)
    if not parallel_dir.is_dir():
        raise DataError(f"{parallel_dir} is not a folder: give one holding the same text per language, as <code>.txt")
    files = sorted(parallel_dir.glob("*.txt"))
    if not any(f.stem == "eng" for f in files):
        raise DataError(f"{parallel_dir} has no eng.txt: the token premium is measured against English, so the "
                        "folder needs the English version of the text as eng.txt")
    from nanoseek.data.corpora import read_text

    texts = {f.stem: read_text(f) for f in files}  # read as training reads them: the same characters
    counts = dict(zip(texts, map(len, tok.encode_batch(list(texts.values())))))
    if not counts["eng"]:
        raise DataError(f"{parallel_dir / 'eng.txt'} is empty")
    rows = [TaxRow(lang, LANGUAGES.get(lang, lang), len(t), len(t.encode()), counts[lang],
                   counts[lang] / max(len(t), 1), counts[lang] / counts["eng"]) for lang, t in texts.items()]
    rows.sort(key=lambda r: (r.premium, r.language))
    if out_png is not None:
        _plot_tax(rows, tok.vocab_size, Path(out_png))
    return rows


def _plot_tax(rows: list[TaxRow], vocab_size: int, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.6))
    labels = [f"{r.name} ({r.language})" for r in rows]
    colors = ["#4c72b0" if r.language != "eng" else "#55a868" for r in rows]
    bars = ax.barh(labels, [r.premium for r in rows], color=colors)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="English = 1.0")
    for bar, r in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r.premium:.2f}×", va="center", fontsize=8)
    ax.set_xlabel("tokens for the same content, relative to English")
    ax.set_ylabel("language")
    ax.set_title(f"Token premium over English (vocab {vocab_size:,})")
    ax.set_xlim(0, max(r.premium for r in rows) * 1.15)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_png)
