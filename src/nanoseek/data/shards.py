"""`nanoseek data prepare`: documents -> deduplicated, tokenized, train/val token shards with a checked index.

A prepared data folder is self-contained:
    index.json                        format, dtype, tokenizer fingerprint, per split its documents, tokens, text
                                      bytes and shards (file, tokens, sha256); skipped files; duplicates; sources
    train_00000.bin, val_00000.bin    token ids, little-endian uint16 (vocab <= 65536) or uint32, no header
    tokenizer.json, tokenizer_config.json   the tokenizer the ids belong to

Each document becomes [BOS] + its tokens + [EOS] and the documents are concatenated (packed) into one stream: the
model learns where a text starts and where it ends, so its generations stop at EOS instead of running on into
another document. The validation split is a seeded choice of whole documents holding about `val_fraction` of the
text's bytes, so no text is in both splits. Duplicates are found on the text with line endings and surrounding
whitespace normalised, so a CRLF copy of a file does not land in the other split.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from nanoseek.data.corpora import Document, Report, iter_documents
from nanoseek.data.tokenizer import DataError, Tokenizer
from nanoseek.io import sha256_file, write_atomic

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB of uint16 per file
_BATCH_CHARS = 1 << 22  # characters per encode_batch call: big enough to keep every tokenizer thread busy
_RERUN = "re-run `nanoseek data prepare`"


class DamagedShard(DataError):
    """A shard index.json lists is missing, truncated or corrupted: the data folder is damaged, not merely short
    of a split, so a run must stop rather than go on without it."""
MAX_SKIPPED_LISTED = 1000

console = Console()


# ---- writing ----------------------------------------------------------------------------------------------

class _SplitWriter:
    """Appends token arrays to one split and cuts them into fixed-size shard files."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.documents = self.tokens = self.bytes = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: list[list[int]], nbytes: int) -> None:
        n = sum(map(len, ids))
        self.pending.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=n))
        self.pending_tokens += n
        self.documents += len(ids)
        self.tokens += n
        self.bytes += nbytes
        while self.pending_tokens >= self.shard_tokens:
            flat = np.concatenate(self.pending)
            self._write(flat[: self.shard_tokens])
            self.pending, self.pending_tokens = [flat[self.shard_tokens:]], len(flat) - self.shard_tokens

    def close(self) -> dict[str, Any]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}

    def _write(self, arr: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        data = arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        write_atomic(self.out_dir / name, data)
        self.shards.append({"file": name, "tokens": len(arr), "sha256": hashlib.sha256(data).hexdigest()})


@dataclass
class Summary:
    out_dir: Path
    index: dict[str, Any]
    seconds: float

    def table(self) -> Table:
        t = Table(title=f"prepared data: {self.out_dir}")
        for col in ("split", "documents", "tokens", "text bytes", "tokens / byte", "shards"):
            t.add_column(col, justify="left" if col == "split" else "right")
        for split, s in self.index["splits"].items():
            text_tokens = s["tokens"] - 2 * s["documents"]  # BOS and EOS carry no text
            t.add_row(split, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}",
                      f"{text_tokens / s['bytes']:.3f}" if s["bytes"] else "-", str(len(s["shards"])))
        skipped = self.index.get("skipped_total", len(self.index["skipped"]))
        t.caption = (f"{skipped} files skipped, {self.index['duplicates_removed']} duplicate "
                     f"documents removed, {self.index['dtype']}, {self.seconds:.1f}s")
        return t


def _batches(docs: Iterator[tuple[Document, bool]]) -> Iterator[list[tuple[Document, bool]]]:
    batch, chars = [], 0
    for item in docs:
        batch.append(item)
        chars += len(item[0].text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _unique(docs: Iterator[Document], dedup: bool, seen: set[bytes]) -> Iterator[Document]:
    for doc in docs:
        if dedup:
            normal = doc.text.replace("\r\n", "\n").replace("\r", "\n").strip()
            key = hashlib.blake2b(normal.encode(), digest_size=16).digest()
            if key in seen:
                continue
            seen.add(key)
        yield doc


def _choose_val(sizes: array.array | list[int], val_fraction: float, seed: int) -> set[int]:
    """Documents for validation, in a seeded random order until they hold `val_fraction` of the bytes: at least
    one and never all (when there are two or more), whatever their sizes."""
    n = len(sizes)
    if val_fraction == 0 or n < 2:
        return set()
    size = np.asarray(sizes, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(n)
    # the longest prefix of the order whose bytes reach the target by no more than half its last document
    held_before_half = np.cumsum(size[order]) - size[order] / 2
    k = min(int(np.searchsorted(held_before_half, val_fraction * size.sum(), side="right")), n - 1)
    if k == 0:  # even the first is over: the smallest document, never a large one
        return {int(np.argmin(size))}
    return set(order[:k].tolist())


def prepare(sources: list[str], tokenizer_dir: str | Path, out_dir: str | Path, val_fraction: float = 0.01,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0, dedup: bool = True, progress: bool = True,
            text_field: str = "text") -> Summary:
    """Tokenize `sources` into `out_dir` (see the module docstring). Reads the sources twice: once to count and
    deduplicate (so the validation choice is known before writing), once to tokenize; memory stays small."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must lie in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be >= 1")
    t0 = time.perf_counter()
    tok = Tokenizer.load(tokenizer_dir)
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("documents"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not progress)
    with bar:
        # Pass 1: count unique documents and record what was skipped.
        report, sizes = Report(), array.array("q")  # 8 bytes a document
        reading = bar.add_task("reading", total=None)
        for doc in _unique(iter_documents(sources, text_field, report), dedup, set()):
            sizes.append(len(doc.text.encode()))
            bar.advance(reading)
        n_docs = len(sizes)
        bar.update(reading, total=n_docs)
        duplicates = report.documents - n_docs
        if n_docs == 0:
            why = "; ".join(f"{where}: {reason}" for where, reason in report.skipped[:3])
            raise DataError(f"no documents in {sources} (inputs are .txt, .md and .jsonl files, folders of them, or "
                            f"a built-in corpus){'; skipped: ' + why if why else ''}")
        for src, count in report.per_source.items():  # an input named on purpose that gave nothing is a mistake
            if count == 0:
                why = next((r for where, r in report.skipped if where.startswith(str(Path(src).expanduser()))),
                           "nothing readable in it")
                raise DataError(f"{src} gave no documents ({why}); the other inputs did: fix it or leave it out")
        val_docs = _choose_val(sizes, val_fraction, seed)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "index.json").unlink(missing_ok=True)  # until the new one is written, the folder is not usable

        # Pass 2: tokenize in batches and append to the split each document belongs to.
        writers = {s: _SplitWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
        tokenizing = bar.add_task("tokenizing", total=n_docs)
        docs = _unique(iter_documents(sources, text_field, Report()), dedup, set())
        count = 0
        for batch in _batches((d, i in val_docs) for i, d in enumerate(docs)):
            ids = tok.encode_batch([d.text for d, _ in batch], bos=True)
            for x in ids:
                x.append(tok.eos_id)
            for split in SPLITS:
                pick = [j for j, (_, is_val) in enumerate(batch) if is_val == (split == "val")]
                if pick:
                    writers[split].add([ids[j] for j in pick], sum(len(batch[j][0].text.encode()) for j in pick))
            count += len(batch)
            bar.advance(tokenizing, len(batch))
    if count != n_docs:
        raise DataError(f"the sources changed while preparing ({n_docs} documents, then {count}): {_RERUN}")

    for name in ("tokenizer.json", "tokenizer_config.json"):  # a data folder carries its tokenizer
        if (tokenizer_dir / name).is_file():
            write_atomic(out_dir / name, (tokenizer_dir / name).read_bytes())
    if not (out_dir / "tokenizer_config.json").is_file():
        tok.save(out_dir)
    index = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "tokenizer_sha256": sha256_file(out_dir / "tokenizer.json"),  # the copy this folder carries
        "splits": {s: w.close() for s, w in writers.items()},
        # the first skipped files with their reasons (all of them are counted): a folder of 100k unusable lines
        # would otherwise make an index that every run re-reads
        "skipped": [{"path": p, "reason": r} for p, r in report.skipped[:MAX_SKIPPED_LISTED]],
        "skipped_total": len(report.skipped),
        "duplicates_removed": duplicates,
        "sources": list(sources),
        "seed": seed,
        "val_fraction": val_fraction,
    }
    write_atomic(out_dir / "index.json", json.dumps(index, indent=1) + "\n")
    keep = {s["file"] for split in index["splits"].values() for s in split["shards"]}
    for stale in [*out_dir.glob("train_*.bin"), *out_dir.glob("val_*.bin")]:  # from an earlier, larger run
        if stale.name not in keep:
            stale.unlink()
    return Summary(out_dir, index, time.perf_counter() - t0)


# ---- reading ----------------------------------------------------------------------------------------------

def read_index(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "index.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: {data_dir} is not a prepared data folder; {_RERUN}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); {_RERUN}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        found = index.get("format") if isinstance(index, dict) else None
        raise DataError(f"{path} has format {found!r}, this nanoseek reads {FORMAT_VERSION}; {_RERUN}")
    splits = index.get("splits")
    ok = index.get("dtype") in ("uint16", "uint32") and isinstance(splits, dict) and splits
    ok = ok and all(isinstance(s, dict) and isinstance(s.get("shards"), list) for s in splits.values())
    ok = ok and all(isinstance(sh, dict) and {"file", "tokens", "sha256"} <= set(sh)
                    for s in splits.values() for sh in s["shards"])
    if not ok:
        raise DataError(f"{path} is unreadable (missing or unknown fields); {_RERUN}")
    return index


class TokenStream:
    """One split's shards as a single read-only token sequence (memory-mapped, so only what is read is loaded).

    len(stream) is the token count; stream[a:b] is a numpy array that may span shard boundaries."""

    def __init__(self, data_dir: str | Path, split: str = "train", verify: bool = True):
        self.data_dir, self.split = Path(data_dir), split
        self.index = read_index(data_dir)
        if split not in self.index["splits"]:
            raise DataError(f"{self.data_dir} has no split {split!r} (it has {', '.join(self.index['splits'])})")
        info = self.index["splits"][split]
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.vocab_size: int | None = self.index.get("vocab_size")
        self.documents: int | None = info.get("documents")
        self.shards: list[np.memmap] = []
        for shard in info["shards"]:
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise DamagedShard(f"shard {path} is missing; {_RERUN}")
            expected = shard["tokens"] * self.dtype.itemsize
            if path.stat().st_size != expected:
                raise DamagedShard(f"shard {path} has {path.stat().st_size} bytes, index.json says {shard['tokens']} "
                                f"tokens = {expected} bytes (truncated or overwritten); {_RERUN}")
            if verify and sha256_file(path) != shard["sha256"]:
                raise DamagedShard(f"shard {path} does not match its sha256 in index.json (corrupted); {_RERUN}")
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # token offset of each shard, then the total

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, int):
            i = key + len(self) if key < 0 else key
            if not 0 <= i < len(self):
                raise IndexError(f"token {key} out of range for a stream of {len(self)}")
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.shards[k][i - self.starts[k]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenStream slices must be contiguous (step 1)")
        parts = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[k + 1]))
            parts.append(self.shards[k][start - self.starts[k]: end - self.starts[k]])
            start, k = end, k + 1
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)


def open_split(data_dir: str | Path, split: str = "train", verify: bool = True) -> TokenStream:
    return TokenStream(data_dir, split, verify)
