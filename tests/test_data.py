"""Data pipeline: sources, `prepare` (dedup, split, shards, index), checked reading, and the batch loader."""

import argparse
import hashlib
import itertools
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek.data import (
    BUILTINS,
    Batches,
    DataError,
    Report,
    Tokenizer,
    eval_batches,
    iter_documents,
    open_split,
    prepare,
    read_index,
    train_tokenizer,
)
from nanoseek.data.commands import add_commands

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "at",
         "this", "from", "or", "have", "an", "are", "which", "but", "not", "model", "token", "data", "train", "learn",
         "byte", "shard", "window", "batch", "seed", "rank", "epoch", "résumé", "naïve", "数据", "данные", "42", "3.14"]


def _text(rng: random.Random, n_words: int) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n_words // 8 + 1)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A folder with 40 text docs, a markdown doc, a jsonl, and one of each kind of file that must be skipped."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    texts = []
    for i in range(40):
        text = _text(rng, rng.randint(50, 400))
        (docs / ("sub" if i % 3 else ".") / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    md = "# Notes\n\nSome *markdown* text, 数据.\n"
    (docs / "notes.md").write_text(md, encoding="utf-8")
    (docs / "dup.txt").write_text(texts[0], encoding="utf-8")  # exact duplicate of doc_000
    (docs / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))  # not UTF-8
    (docs / "empty.txt").write_text("", encoding="utf-8")
    (docs / "blank.md").write_text("  \n\t\n", encoding="utf-8")
    (docs / "image.png").write_bytes(b"\x89PNG not text")  # not a text extension: not a source file at all
    (docs / ".hidden").mkdir()
    (docs / ".hidden" / "secret.txt").write_text("hidden", encoding="utf-8")
    jsonl_texts = [_text(rng, 40) for _ in range(5)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(jsonl_texts)]
    lines.insert(2, '{"text": "unterminated')  # line 3: bad JSON
    lines.insert(4, json.dumps({"body": "no text field"}))  # line 5
    lines.insert(5, "")  # blank line: nothing
    (root / "extra.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok_dir = root / "tok"
    train_tokenizer([*texts, md, *jsonl_texts], 400, tok_dir)  # all the merges this text has
    sources = [str(docs), str(root / "extra.jsonl")]
    return {"root": root, "docs": docs, "sources": sources, "tok_dir": tok_dir, "texts": texts, "md": md,
            "jsonl": jsonl_texts}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(corpus["sources"], corpus["tok_dir"], out, val_fraction=0.1, shard_tokens=4000, progress=False)
    return out


def _split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    """Cut a stream at BOS (0): each piece is one document's tokens, which end with EOS (1)."""
    starts = np.flatnonzero(tokens == 0)
    docs = [tokens[a + 1: b] for a, b in zip(starts, [*starts[1:], len(tokens)])]
    assert all(d[-1] == 1 and 1 not in d[:-1] for d in docs)
    return [d[:-1] for d in docs]


# ---- sources ----------------------------------------------------------------------------------------------

def test_utf16_files_are_skipped_with_the_reason(tmp_path):
    # UTF-16 English (and Devanagari: U+09xx is bytes xx 09) without a byte-order mark is valid UTF-8 byte for byte
    (tmp_path / "le.txt").write_bytes("All human beings are born free".encode("utf-16-le"))
    (tmp_path / "bom.txt").write_text("All human beings are born free", encoding="utf-16")
    (tmp_path / "ok.txt").write_text("All human beings are born free", encoding="utf-8")
    report = Report()
    assert [d.text for d in iter_documents([str(tmp_path)], report=report)] == ["All human beings are born free"]
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert reasons == {"bom.txt": "UTF-16 (it starts with a UTF-16 byte-order mark): convert it to UTF-8",
                       "le.txt": "holds NUL bytes: UTF-16 without a byte-order mark (convert it to UTF-8), or not text"}
    (tmp_path / "gone.txt").symlink_to(tmp_path / "deleted.txt")  # one unreadable file skips, the folder goes on
    report = Report()
    assert len(list(iter_documents([str(tmp_path)], report=report))) == 1
    assert ("gone.txt", "cannot be read (No such file or directory)") in {(Path(p).name, r) for p, r in report.skipped}


def test_sources_report_every_skipped_file(corpus):
    report = Report()
    docs = list(iter_documents(corpus["sources"], report=report))
    skipped = {Path(p.split(":")[0]).name + (":" + p.split(":")[1] if ":" in p else ""): r for p, r in report.skipped}
    assert set(skipped) == {"latin1.txt", "empty.txt", "blank.md", "extra.jsonl:3", "extra.jsonl:5", "image.png"}
    assert "UTF-8" in skipped["latin1.txt"] and "iconv -f latin1 -t utf-8" in skipped["latin1.txt"]
    assert skipped["empty.txt"] == "empty"
    assert skipped["blank.md"] == "only whitespace" and "invalid JSON" in skipped["extra.jsonl:3"]
    assert "no string field 'text' (it has 'body'): --text-field" in skipped["extra.jsonl:5"]
    assert skipped["image.png"].startswith("not a .txt, .md or .jsonl file: convert it to .jsonl")
    assert len(docs) == 40 + 1 + 1 + 5 == report.documents  # 40 docs, notes.md, dup.txt, 5 jsonl lines
    assert [d.text for d in docs if d.source.startswith(str(corpus["root"] / "extra.jsonl"))] == corpus["jsonl"]
    assert not any("secret" in d.source or "image" in d.source for d in docs)
    assert [d.source for d in docs] == [d.source for d in iter_documents(corpus["sources"])]  # deterministic
    assert [d.source for d in docs[:3]] == sorted(d.source for d in docs[:3])


def test_a_single_text_file_and_a_jsonl_field(corpus, tmp_path):
    one = list(iter_documents([str(corpus["docs"] / "notes.md")]))
    assert [(d.source, d.text) for d in one] == [(str(corpus["docs"] / "notes.md"), corpus["md"])]
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "abc"}) + "\n", encoding="utf-8")
    assert [d.text for d in iter_documents([str(tmp_path / "c.jsonl")], text_field="content")] == ["abc"]


def test_text_chunks_cut_at_blank_lines_and_lose_nothing():
    from nanoseek.data.corpora import text_chunks

    paragraphs = [f"paragraph {i}: " + "word " * (i % 40 + 5) + "\nsecond line\n" for i in range(400)]
    text = "\n".join(paragraphs)
    pieces = list(text_chunks(text, size=2000))
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(len(p) <= 2000 for p in pieces) and all(p.endswith("\n\n") for p in pieces[:-1])
    no_blank = "line\n" * 1000  # no blank line: cut after a line end
    assert all(p.endswith("line\n") for p in text_chunks(no_blank, size=333))
    assert "".join(text_chunks("x" * 1000, size=300)) == "x" * 1000  # no line end at all: cut anywhere
    assert list(text_chunks("short", size=300)) == ["short"]


def test_a_text_file_is_read_in_blocks_as_if_whole(tmp_path, monkeypatch):
    """Blocks of 7 bytes split characters, CRLFs and the byte-order mark: the documents are those of the whole text,
    and a bad byte anywhere (even after many documents) skips the whole file, naming its offset."""
    from nanoseek.data import corpora
    from nanoseek.data.corpora import text_chunks

    rng = random.Random(3)
    text = "\r\n\r\n".join(_text(rng, 30) + " é中😀\r\nnext line" for _ in range(1500))
    path = tmp_path / "book.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    whole = [(d.source, d.text) for d in iter_documents([str(path)])]
    monkeypatch.setattr(corpora, "READ_BLOCK", 7)
    assert [(d.source, d.text) for d in iter_documents([str(path)])] == whole
    assert [t for _, t in whole] == [t for t in text_chunks(text.replace("\r\n", "\n")) if t.strip()]
    assert len(whole) > 2 and whole[1][0] == f"{path}#1"
    path.write_bytes(text.encode() + b"\xff")  # bad after many documents' worth of text: none of them is used
    report = Report()
    assert list(iter_documents([str(path)], report=report)) == [] and "at byte" in report.skipped[0][1]
    # a character cut short, at every position in a block: the offset Python names for the whole file
    for k in range(7):
        raw = text.encode()[:1000 + k] + "中".encode()[:2] + b"A then more text"
        path.write_bytes(raw)
        report = Report()
        assert list(iter_documents([str(path)], report=report)) == []
        with pytest.raises(UnicodeDecodeError) as whole_file:
            raw.decode("utf-8")
        assert report.skipped[0][1].startswith(f"not valid UTF-8 ({whole_file.value.reason} at byte "
                                               f"{whole_file.value.start})"), (k, report.skipped)


def test_reading_a_large_text_file_holds_a_block_not_the_file(tmp_path):
    import tracemalloc

    path = tmp_path / "big.txt"
    line = "All human beings are born free and equal in dignity and rights.\n"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(40):
            f.write((line * 32 + "\n") * 200)  # 40 x 420 KB: 16.8 MB
    tracemalloc.start()
    try:
        chars = sum(len(d.text) for d in iter_documents([str(path)]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert chars == path.stat().st_size
    assert peak < 8e6, f"{peak / 1e6:.1f} MB held while reading a {chars / 1e6:.1f} MB file"


def test_one_big_text_file_becomes_many_documents_with_a_validation_share(corpus, tmp_path):
    """A whole corpus in one .txt file: documents of bounded size, so memory stays bounded and the validation
    split holds about val_fraction of the text, not 0 (or all) of it."""
    rng = random.Random(1)
    big = tmp_path / "corpus.txt"
    big.write_text("\n".join(_text(rng, 60) for _ in range(2000)), encoding="utf-8")
    docs = list(iter_documents([str(big)]))
    assert len(docs) > 4 and "".join(d.text for d in docs) == big.read_text(encoding="utf-8")
    assert docs[0].source == f"{big}#0" and all(len(d.text) <= 1 << 16 for d in docs)
    s = prepare([str(big)], corpus["tok_dir"], tmp_path / "out", val_fraction=0.2, progress=False)
    val, train = s.index["splits"]["val"], s.index["splits"]["train"]
    assert val["documents"] >= 1 and 0.1 < val["bytes"] / (val["bytes"] + train["bytes"]) < 0.3
    text_tokens = train["tokens"] - 2 * train["documents"]  # BOS and EOS are not text
    row = next(r for r in zip(*(c.cells for c in s.table().columns)) if r[0] == "train")
    assert row[4] == f"{text_tokens / train['bytes']:.3f}"


def test_folders_read_any_letter_case_follow_links_and_name_what_they_cannot_read(tmp_path):
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    (src / "UPPER.TXT").write_text("upper case suffix", encoding="utf-8")
    (src / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (src / "inner" / "a.md").write_text("inside a linked folder", encoding="utf-8")
    (src / "inner" / "loop").symlink_to(src, target_is_directory=True)  # a link back up: read once, no loop
    report = Report()
    assert sorted(d.text for d in iter_documents([str(src)], report=report)) == ["inside a linked folder",
                                                                                "upper case suffix"]
    assert [(Path(p).name, r.split(":")[0]) for p, r in report.skipped] == [("table.csv", "not a .txt, .md or "
                                                                              ".jsonl file")]
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(src / "inner", target_is_directory=True)
    assert next(d.text for d in iter_documents([str(root)])) == "inside a linked folder"
    with pytest.raises(DataError, match=r"data.json: a .json file is not plain text.*convert it to .jsonl"):
        (tmp_path / "data.json").write_text('{"text": "x"}', encoding="utf-8")
        list(iter_documents([str(tmp_path / "data.json")]))


def test_copies_that_differ_in_line_endings_are_duplicates(corpus, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"one line\ntwo lines\n")
    (src / "a_crlf.txt").write_bytes(b"one line\r\ntwo lines\r\n\n")
    (src / "b.txt").write_bytes(b"another text\n")
    s = prepare([str(src)], corpus["tok_dir"], tmp_path / "out", val_fraction=0.5, progress=False)
    assert s.index["duplicates_removed"] == 1
    assert s.index["splits"]["train"]["documents"] + s.index["splits"]["val"]["documents"] == 2
    # a long one too: it is cut into documents at the same places as its LF original, so every piece is a duplicate
    rng = random.Random(2)
    long = "\n".join(_text(rng, 60) for _ in range(400))
    assert len(long) > 2 * (1 << 16)
    (src / "long.txt").write_bytes(long.encode())
    (src / "long_crlf.txt").write_bytes(long.replace("\n", "\r\n").encode())
    pieces = len(list(iter_documents([str(src / "long.txt")])))
    s = prepare([str(src)], corpus["tok_dir"], tmp_path / "out2", val_fraction=0.5, progress=False)
    assert pieces > 2 and s.index["duplicates_removed"] == 1 + pieces


def test_validation_holds_its_share_of_bytes_and_never_one_huge_document():
    from nanoseek.data.shards import _choose_val

    sizes = [1000] * 200
    for seed in range(3):
        chosen = _choose_val(sizes, 0.05, seed)
        assert len(chosen) == 10  # 5% of the bytes
    for seed in range(20):  # the small ones, never the one with 99.998% of the bytes
        assert _choose_val([10**6, 10, 12], 0.01, seed) in ({1}, {2}, {1, 2})
        assert len(_choose_val([5, 5], 0.9, seed)) == 1  # never every document
    assert _choose_val([7], 0.5, 0) == set() and _choose_val([1, 2], 0.0, 0) == set()


def test_the_index_lists_the_first_skipped_files_and_counts_all(corpus, tmp_path, monkeypatch):
    from nanoseek.data import shards

    monkeypatch.setattr(shards, "MAX_SKIPPED_LISTED", 2)
    lines = [json.dumps({"body": f"no text {i}"}) for i in range(5)] + [json.dumps({"text": "kept"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = prepare([str(tmp_path / "d.jsonl")], corpus["tok_dir"], tmp_path / "out", progress=False)
    assert len(s.index["skipped"]) == 2 and s.index["skipped_total"] == 5
    assert "5 files skipped" in s.table().caption


def test_unknown_source_names_it_and_lists_builtins():
    with pytest.raises(DataError, match=r"'no/such/path'.*python-stdlib.*chatterbot"):
        list(iter_documents(["no/such/path"]))
    with pytest.raises(DataError, match=r"no language klingon.*english"):
        list(iter_documents(["chatterbot:klingon"]))


def test_python_stdlib_builtin_is_many_learner_style_files_quickly():
    t0 = time.perf_counter()
    report = Report()
    docs = list(itertools.islice(iter_documents(["python-stdlib"], report=report), 600))
    assert time.perf_counter() - t0 < 10
    assert len(docs) > 500
    assert all(d.source.startswith("python-stdlib:") and d.source.endswith(".py") for d in docs)
    parts = {p for d in docs for p in Path(d.source.split(":", 1)[1]).parts}
    assert not parts & {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages"}
    assert any(d.source == "python-stdlib:argparse.py" for d in docs)
    assert all(r in ("empty", "only whitespace") or "UTF-8" in r for _, r in report.skipped)
    again = [d.source for d in itertools.islice(iter_documents(["python-stdlib"]), 50)]
    assert again == [d.source for d in docs[:50]]


def test_chatterbot_builtin_is_multilingual_and_filterable():
    assert set(BUILTINS) == {"python-stdlib", "chatterbot"}
    docs = list(iter_documents(["chatterbot"]))
    langs = {d.source.split(":")[1].split("/")[0] for d in docs}
    assert len(docs) > 5000 and len(langs) >= 20 and {"english", "chinese", "hindi", "yoruba"} <= langs
    assert all(d.text.strip() for d in docs)
    some = list(iter_documents(["chatterbot:english,french"]))
    assert {d.source.split(":")[1].split("/")[0] for d in some} == {"english", "french"}
    greeting = next(d for d in some if d.source == "chatterbot:english/greetings.yml#0")
    assert greeting.text == "Hello\nHi"  # turns on separate lines


# ---- prepare ----------------------------------------------------------------------------------------------

def test_prepare_index_counts_match_the_encoded_documents(corpus, prepared):
    index = read_index(prepared)
    tok = Tokenizer.load(corpus["tok_dir"])
    unique = list(dict.fromkeys(d.text for d in iter_documents(corpus["sources"])))
    assert len(unique) == 40 + 1 + 5
    assert index["duplicates_removed"] == 1
    splits = index["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(unique)
    # validation holds ~10% of the bytes: within half the largest document of the target
    total_bytes = splits["train"]["bytes"] + splits["val"]["bytes"]
    largest = max(len(t.encode()) for t in unique)
    assert abs(splits["val"]["bytes"] - 0.1 * total_bytes) <= largest / 2 and splits["val"]["documents"] >= 1
    total = sum(len(ids) + 2 for ids in tok.encode_batch(unique))  # + BOS and EOS each
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == total
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == sum(len(t.encode()) for t in unique)
    assert index["dtype"] == "uint16" and index["vocab_size"] == 400 and index["format"] == 1
    assert index["tokenizer_sha256"] == hashlib.sha256((prepared / "tokenizer.json").read_bytes()).hexdigest()
    assert (prepared / "tokenizer.json").read_bytes() == (corpus["tok_dir"] / "tokenizer.json").read_bytes()
    assert Tokenizer.load(prepared).vocab_size == 400  # the data folder is self-contained
    assert index["sources"] == corpus["sources"]
    reasons = {Path(s["path"]).name: s["reason"] for s in index["skipped"]}
    assert {"latin1.txt", "empty.txt", "blank.md", "extra.jsonl:3", "extra.jsonl:5", "image.png"} == set(reasons)
    assert index["skipped_total"] == 6
    for split in ("train", "val"):
        shards = splits[split]["shards"]
        assert sum(s["tokens"] for s in shards) == splits[split]["tokens"]
        assert [s["file"] for s in shards] == [f"{split}_{i:05d}.bin" for i in range(len(shards))]
        for s in shards:
            data = (prepared / s["file"]).read_bytes()
            assert len(data) == 2 * s["tokens"] and hashlib.sha256(data).hexdigest() == s["sha256"]
            assert s["tokens"] <= 4000
    assert len(splits["train"]["shards"]) > 2  # small shards: documents cross shard boundaries
    assert not list(prepared.glob("*.tmp")) and not list(prepared.glob(".*"))


def test_prepared_streams_hold_each_unique_document_once(corpus, prepared):
    tok = Tokenizer.load(prepared)
    unique = set(dict.fromkeys(d.text for d in iter_documents(corpus["sources"])))
    got = {}
    for split in ("train", "val"):
        stream = open_split(prepared, split)
        tokens = stream[:]
        assert tokens.dtype == np.uint16 and len(tokens) == len(stream) and tokens[0] == 0
        got[split] = [tok.decode(d.tolist()) for d in _split_docs(tokens)]
        assert len(got[split]) == read_index(prepared)["splits"][split]["documents"]
    assert len(got["val"]) > 0 and not set(got["train"]) & set(got["val"])  # disjoint documents
    assert sorted(got["train"] + got["val"]) == sorted(unique)  # no duplicate, no skipped file, nothing lost
    assert "café crème\n" not in got["train"] + got["val"]


def test_token_stream_slices_cross_shard_boundaries(prepared):
    stream = open_split(prepared, "train")
    whole = np.concatenate([np.fromfile(prepared / s["file"], dtype="<u2")
                            for s in read_index(prepared)["splits"]["train"]["shards"]])
    assert len(stream) == len(whole)
    for a, b in [(0, 10), (3990, 4010), (3999, 8001), (len(whole) - 5, len(whole)), (100, 100), (0, len(whole))]:
        assert np.array_equal(stream[a:b], whole[a:b])
    assert stream[4000] == whole[4000] and stream[-1] == whole[-1]


def test_prepare_is_deterministic_and_seeded(corpus, prepared, tmp_path):
    prepare(corpus["sources"], corpus["tok_dir"], tmp_path / "same", val_fraction=0.1, shard_tokens=4000,
            progress=False)
    prepare(corpus["sources"], corpus["tok_dir"], tmp_path / "other", val_fraction=0.1, shard_tokens=4000, seed=1,
            progress=False)
    assert read_index(tmp_path / "same")["splits"] == read_index(prepared)["splits"]
    assert read_index(tmp_path / "other")["splits"]["val"] != read_index(prepared)["splits"]["val"]


def test_prepare_without_dedup_keeps_duplicates_and_small_corpora_get_one_val_doc(corpus, tmp_path):
    s = prepare(corpus["sources"], corpus["tok_dir"], tmp_path / "a", val_fraction=0.01, dedup=False,
                progress=False)
    assert s.index["duplicates_removed"] == 0
    assert s.index["splits"]["train"]["documents"] + s.index["splits"]["val"]["documents"] == 47
    assert s.index["splits"]["val"]["documents"] == 1  # 0.47 rounds to 0, but >= 2 documents give 1
    table = s.table()
    assert [c.header for c in table.columns][:3] == ["split", "documents", "tokens"]
    one = tmp_path / "one.txt"
    one.write_text("just one document", encoding="utf-8")
    s = prepare([str(one)], corpus["tok_dir"], tmp_path / "b", progress=False)
    assert s.index["splits"]["val"] == {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}
    with pytest.raises(DataError, match="no documents"):
        prepare([str(corpus["docs"] / "empty.txt")], corpus["tok_dir"], tmp_path / "c", progress=False)
    (tmp_path / "titles.jsonl").write_text('{"title": "no text here"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"skipped: .*titles.jsonl:1: no string field 'text'"):  # why, not a count
        prepare([str(tmp_path / "titles.jsonl")], corpus["tok_dir"], tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="unknown data source 'typo'"):  # a bad source leaves the folder as it was
        prepare(["typo"], corpus["tok_dir"], tmp_path / "b", progress=False)
    assert read_index(tmp_path / "b")["splits"]["train"]["documents"] == 1


def test_corrupted_truncated_or_missing_shards_raise_dataerror(prepared, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    shard = bad / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[101] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_00001\.bin.*sha256.*nanoseek data prepare"):
        open_split(bad, "train")
    assert len(open_split(bad, "train", verify=False)) == read_index(bad)["splits"]["train"]["tokens"]
    shard.write_bytes(bytes(data[:-3]))
    with pytest.raises(DataError, match=r"train_00001\.bin.*truncated.*nanoseek data prepare"):
        open_split(bad, "train", verify=False)
    shard.unlink()
    with pytest.raises(DataError, match=r"train_00001\.bin is missing"):
        open_split(bad, "train")
    (bad / "index.json").write_text("{broken")
    with pytest.raises(DataError, match=r"index\.json is unreadable.*nanoseek data prepare"):
        open_split(bad, "val")
    (bad / "index.json").unlink()
    with pytest.raises(DataError, match=r"index\.json is missing.*nanoseek data prepare"):
        Batches(bad, seq_len=8)
    with pytest.raises(DataError, match="no split 'test'"):
        open_split(prepared, "test")


def test_prepare_realistic_text(tmp_path, corpus):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    folder = tmp_path / "plays"
    folder.mkdir()
    for i, part in enumerate(text.split("\n\n")[:2000]):  # speeches as documents
        (folder / f"{i:05d}.txt").write_text(part, encoding="utf-8")
    s = prepare([str(folder)], corpus["tok_dir"], tmp_path / "out", progress=False)
    parts = [p for p in text.split("\n\n")[:2000] if p.strip()]
    assert s.index["duplicates_removed"] == len(parts) - len(set(parts))
    assert s.index["splits"]["val"]["documents"] == round(0.01 * len(set(parts)))


# ---- loader -----------------------------------------------------------------------------------------------

def test_batches_are_windows_with_labels_shifted_by_one(prepared):
    stream = open_split(prepared, "train")
    b = Batches(stream, seq_len=16, shuffle=False)
    assert b.windows_per_epoch == (len(stream) - 1) // 16
    x, y = b.next(4)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for i in range(4):
        w = torch.from_numpy(stream[16 * i: 16 * i + 17].astype(np.int64))
        assert torch.equal(x[i], w[:-1]) and torch.equal(y[i], w[1:])
    x, y = Batches(prepared, seq_len=16, seed=3).next(8)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_batches_are_deterministic_per_seed(prepared):
    def run(seed):
        b = Batches(prepared, seq_len=32, seed=seed)
        return [b.next(4) for _ in range(5)]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_resume_mid_epoch_gives_the_same_batches_even_with_a_changing_batch_size(prepared):
    sizes = [2, 3, 2, 5, 1, 4, 4, 6, 2, 3, 7, 2]
    ref = Batches(prepared, seq_len=24, seed=7)
    expected = [ref.next(bs) for bs in sizes]
    for cut in (1, 4, 9):
        b = Batches(prepared, seq_len=24, seed=7)
        for bs in sizes[:cut]:
            b.next(bs)
        state = json.loads(json.dumps(b.state_dict()))  # JSON round trip: plain ints
        assert set(state) == {"epoch", "cursor", "seq_len", "seed", "windows"}
        assert all(type(v) is int for v in state.values())
        resumed = Batches(prepared, seq_len=24, seed=7)
        resumed.load_state_dict(state)
        for bs, (x, y) in zip(sizes[cut:], expected[cut:]):
            rx, ry = resumed.next(bs)
            assert torch.equal(rx, x) and torch.equal(ry, y)
        assert resumed.state_dict() == ref.state_dict()
    with pytest.raises(DataError, match="prepared again"):
        Batches(prepared, seq_len=24).load_state_dict({"epoch": 0, "cursor": 10**9})
    # the same place under another window size or shuffle would be other windows: refused, naming the setting
    state = Batches(prepared, seq_len=24, seed=7).state_dict()
    with pytest.raises(DataError, match=r"data.seq_len=24, .*this resume has data.seq_len=16"):
        Batches(prepared, seq_len=16, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match=r"train.seed=7, and this resume has train.seed=8"):
        Batches(prepared, seq_len=24, seed=8).load_state_dict(state)
    Batches(prepared, seq_len=16, seed=8).load_state_dict({"epoch": 0, "cursor": 3})  # a state from before: no check


def test_ranks_take_disjoint_blocks_whose_union_is_the_single_rank_batch(prepared):
    single = Batches(prepared, seq_len=16, seed=5)
    ranks = [Batches(prepared, seq_len=16, seed=5, rank=r, world_size=2) for r in range(2)]
    steps = single.windows_per_epoch // 6 + 3  # past the end of an epoch
    for _ in range(steps):
        x, y = single.next(6)
        (x0, y0), (x1, y1) = (r.next(3) for r in ranks)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        rows0, rows1 = {tuple(r) for r in x0.tolist()}, {tuple(r) for r in x1.tolist()}
        assert not rows0 & rows1
    assert single.epoch == 1 and ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    # world size may change on resume: two ranks continue where one rank stopped
    moved = [Batches(prepared, seq_len=16, seed=5, rank=r, world_size=2) for r in range(2)]
    for m in moved:
        m.load_state_dict(single.state_dict())
    x, _ = single.next(4)
    assert torch.equal(torch.cat([m.next(2)[0] for m in moved]), x)
    with pytest.raises(DataError, match="rank=2"):
        Batches(prepared, seq_len=16, rank=2, world_size=2)


def test_epochs_wrap_cover_every_window_once_and_reshuffle(prepared):
    b = Batches(prepared, seq_len=64, seed=0)
    n = b.windows_per_epoch
    per_epoch = n // 5
    starts = []
    for _ in range(per_epoch):
        x, _ = b.next(5)
        starts += [tuple(r[:4]) for r in x.tolist()]
    assert (b.epoch, b.cursor) == (0, per_epoch * 5)
    b.next(5)  # fewer than 5 windows left: the next epoch starts, no partial batch
    assert (b.epoch, b.cursor) == (1, 5)
    assert sorted(b.order(0).tolist()) == list(range(n)) and not np.array_equal(b.order(0), b.order(1))
    assert np.array_equal(Batches(prepared, seq_len=64, shuffle=False).order(3), np.arange(n))
    with pytest.raises(DataError, match=f"needs {n + 1} windows"):
        b.next(n + 1)


def test_eval_batches_are_the_first_windows_in_order(prepared):
    stream = open_split(prepared, "val")
    batches = eval_batches(prepared, seq_len=16, batch_size=3, max_batches=4)
    assert len(batches) == 4 and all(x.shape == (3, 16) for x, _ in batches)
    flat = torch.cat([x for x, _ in batches])
    for i in range(12):
        assert torch.equal(flat[i], torch.from_numpy(stream[16 * i: 16 * i + 16].astype(np.int64)))
    again = eval_batches(stream, seq_len=16, batch_size=3, max_batches=4)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    everything = eval_batches(prepared, seq_len=16, batch_size=1000)
    assert len(everything) == 1 and everything[0][0].shape[0] == (len(stream) - 1) // 16  # last batch may be small
    with pytest.raises(DataError, match=f"has {len(stream):,} tokens.*needs {len(stream) + 1:,}"):
        eval_batches(prepared, seq_len=len(stream), batch_size=1)


# ---- CLI --------------------------------------------------------------------------------------------------

def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nanoseek")
    sub = p.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_train_report_prepare(corpus, tmp_path, capsys):
    tok = tmp_path / "tok"
    assert _cli(["tokenizer", "train", "--input", str(corpus["docs"]), "--input", str(corpus["root"] / "extra.jsonl"),
                 "--vocab-size", "300", "--out", str(tok), "--max-docs", "10"]) == 0
    assert Tokenizer.load(tok).vocab_size == 300
    out = capsys.readouterr().out
    assert "300 tokens from 10 documents" in out
    par = tmp_path / "par"
    par.mkdir()
    (par / "eng.txt").write_text("the model learns", encoding="utf-8")
    (par / "fra.txt").write_text("le modèle apprend", encoding="utf-8")
    assert _cli(["tokenizer", "report", "--tokenizer", str(tok), "--parallel", str(par),
                 "--out", str(tmp_path / "tax.png")]) == 0
    assert (tmp_path / "tax.png").stat().st_size > 1000 and "English (eng)" in capsys.readouterr().out
    assert _cli(["data", "prepare", "--input", *corpus["sources"], "--tokenizer", str(tok), "--out",
                 str(tmp_path / "data"), "--val-fraction", "0.2", "--seed", "3", "--no-dedup", "--no-progress"]) == 0
    index = read_index(tmp_path / "data")
    assert index["duplicates_removed"] == 0 and index["seed"] == 3 and index["splits"]["val"]["documents"] == 9
    assert "not valid UTF-8" in capsys.readouterr().out  # the skipped files are listed
    with pytest.raises(SystemExit):
        _cli(["data", "prepare", "--tokenizer", str(tok), "--out", str(tmp_path / "x")])  # --input is required
    with pytest.raises(DataError, match="python-stdlib"):
        _cli(["tokenizer", "train", "--input", "nope", "--out", str(tmp_path / "t2")])
    with pytest.raises(DataError, match="--max-chars must be at least 1, got -1"):  # would train on one document
        _cli(["tokenizer", "train", "--input", str(corpus["docs"]), "--out", str(tmp_path / "t2"), "--max-chars", "-1"])
    capsys.readouterr()
    with pytest.raises(DataError, match="the inputs held no documents"):
        _cli(["tokenizer", "train", "--input", str(corpus["docs"] / "latin1.txt"), "--out", str(tmp_path / "t2")])
    assert "not valid UTF-8" in capsys.readouterr().out  # why: the skipped file and its reason


def test_one_rank_per_machine_hashes_the_shards(prepared, tmp_path, monkeypatch):
    """Training opens the splits with sha256 checks on local rank 0 only: the other ranks of a machine read the
    same files, and hashing them all again on every rank only delays the start. Sizes are checked by every rank."""
    import shutil

    from nanoseek.train.config import run_config_from_dict
    from nanoseek.train.loop import World
    from nanoseek.train.run import _data

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shard = data / read_index(data)["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1  # same size, other content
    shard.write_bytes(bytes(raw))
    cfg = run_config_from_dict({"model": {"preset": "tiny", "vocab_size": 400}, "data": {"path": str(data),
                                "seq_len": 16}, "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2}})
    monkeypatch.setenv("LOCAL_RANK", "1")
    _data(cfg, World(), tmp_path / "run")  # not hashed here
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DataError, match="does not match its sha256"):
        _data(cfg, World(), tmp_path / "run")


def test_an_input_that_gives_nothing_is_an_error_and_skipped_lines_are_grouped(corpus, tmp_path):
    """A .jsonl named on purpose whose lines all lack the field (a forgotten --text-field) stops prepare, instead
    of leaving that file out with exit code 0; the table shows its lines as one row."""
    from nanoseek.data.commands import _skipped_table

    bad = tmp_path / "more.jsonl"
    bad.write_text("".join(json.dumps({"id": i, "body": f"text {i}"}) + "\n" for i in range(5)), encoding="utf-8")
    with pytest.raises(DataError, match=r"more.jsonl gave no documents \(no string field 'text' \(it has 'id', "
                                        r"'body'\): --text-field"):
        prepare([str(corpus["docs"]), str(bad)], corpus["tok_dir"], tmp_path / "out", progress=False)
    report = Report()
    list(iter_documents([str(bad)], report=report))
    table = _skipped_table(report.skipped)
    assert table.row_count == 1 and next(iter(table.columns[0].cells)) == f"{bad} (5 lines: 1-5)"
