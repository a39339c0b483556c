"""Document sources: text files, folders, JSON Lines, and two built-in corpora that ship with the install.

A source is one of
    a file            a text file (line endings made LF), cut into documents of up to ~64K characters at blank
                      lines: a book or a whole corpus in one .txt file still gets a validation share, and the
                      tokenizer works on bounded pieces (the file is read in blocks); `.jsonl`: one document
                      per line, the `text_field` key of each object
    a folder          every `.txt`, `.md` and `.jsonl` file below it (any letter case; links followed), in sorted
                      path order (hidden entries skipped; files of other types listed as skipped)
    python-stdlib     the running Python's standard library, one `.py` file per document (tests, idlelib,
                      lib2to3, turtledemo and site-packages left out: code a learner would write)
    chatterbot        the chatterbot-corpus dialogues, one conversation per document, turns on separate lines;
                      `chatterbot:english` or `chatterbot:english,french` keeps only those languages
A path that exists wins over a built-in of the same name. Order is deterministic, so prepared data is too.

Files that cannot be used (not UTF-8, empty, a bad JSON line) are recorded in the `Report`, never dropped
silently.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.data.tokenizer import DataError

TEXT_SUFFIXES = {".txt", ".md"}
FOLDER_SUFFIXES = TEXT_SUFFIXES | {".jsonl"}
# formats that are not plain text: refused when named directly, listed as skipped in a folder
NOT_TEXT = {".json", ".parquet", ".csv", ".tsv", ".arrow", ".gz", ".zip", ".bz2", ".xz", ".zst", ".pdf", ".docx",
            ".epub"}
_CONVERT = "convert it to .jsonl (one {\"text\": ...} object per line) or to UTF-8 .txt files"
TEXT_CHUNK_CHARS = 1 << 16  # a text file longer than this becomes several documents, cut at blank lines
BUILTINS = {
    "python-stdlib": "the .py files of this Python's standard library (no tests)",
    "chatterbot": "chatterbot-corpus dialogues in ~28 languages; chatterbot:LANG[,LANG] to choose",
}
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                          "__pycache__"})


@dataclass(frozen=True, slots=True)
class Document:
    source: str  # where it came from: a path, `path:line` for JSON Lines, `chatterbot:english/food.yml#3`
    text: str


@dataclass
class Report:
    """What was read and what was skipped, with the reason."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or path:line, reason)
    documents: int = 0
    per_source: dict[str, int] = field(default_factory=dict)  # documents each source gave

    def skip(self, where: str | Path, reason: str) -> None:
        self.skipped.append((str(where), reason))


def iter_documents(sources: list[str], text_field: str = "text", report: Report | None = None) -> Iterator[Document]:
    """Yield the documents of each source in order; unusable files go to `report.skipped`."""
    report = report if report is not None else Report()
    for src in sources:
        report.per_source.setdefault(src, 0)
        for doc in _iter_source(src, text_field, report):
            report.documents += 1
            report.per_source[src] += 1
            yield doc


def _iter_source(src: str, text_field: str, report: Report) -> Iterator[Document]:
    path = Path(src).expanduser()
    if path.is_dir():
        yield from _iter_folder(path, text_field, report)
    elif path.is_file():
        if path.suffix.lower() in NOT_TEXT:
            raise DataError(f"{path}: a {path.suffix} file is not plain text, and nanoseek reads .txt, .md and "
                            f".jsonl: {_CONVERT}")
        yield from _iter_file(path, text_field, report)
    elif src == "python-stdlib":
        yield from _iter_stdlib(report)
    elif src == "chatterbot" or src.startswith("chatterbot:"):
        yield from _iter_chatterbot(src.partition(":")[2], report)
    else:
        builtins = "; ".join(f"{k}: {v}" for k, v in BUILTINS.items())
        raise DataError(f"unknown data source {src!r}: not an existing file or folder, nor a built-in corpus "
                        f"[{builtins}]")


def _walk(root: Path, suffixes: set[str], skip_dirs: frozenset[str] = frozenset(),
          report: Report | None = None) -> Iterator[Path]:
    """Files under root whose suffix (any case) is one of `suffixes`, in sorted order, hidden entries and skip_dirs
    left out; linked folders are followed once each. Other files go to `report` as skipped, when given."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back to a folder already read: a loop, or the same files twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in suffixes:
                yield Path(dirpath) / name
            elif report is not None:
                report.skip(Path(dirpath) / name, f"not a .txt, .md or .jsonl file: {_CONVERT}")


def _iter_folder(root: Path, text_field: str, report: Report) -> Iterator[Document]:
    for path in _walk(root, FOLDER_SUFFIXES, report=report):
        try:
            yield from _iter_file(path, text_field, report)
        except OSError as e:  # a dangling link, a file without read permission: one file, not the whole folder
            report.skip(path, f"cannot be read ({e.strerror})")


def _iter_file(path: Path, text_field: str, report: Report) -> Iterator[Document]:
    if path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path, text_field, report)
        return
    # Read in blocks, twice: first to check the whole file (a file is used whole or skipped whole, with the reason),
    # then to cut it into documents. Memory stays at a block and a document however large the file is.
    try:
        for _ in _text(_read_blocks(path), path, report):
            pass
    except _Unusable:
        return
    parts = text_chunks(_lf(_text(_read_blocks(path), path, Report())))
    first, second = next(parts), next(parts, None)
    if second is None:
        yield Document(str(path), first)
        return
    for i, part in enumerate(itertools.chain((first, second), parts)):
        if part.strip():
            yield Document(f"{path}#{i}", part)


READ_BLOCK = 1 << 20  # bytes


def _read_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            yield block


class _Unusable(Exception):
    """The text was skipped; the reason is in the report."""


def _text(blocks: Iterable[bytes], where: str | Path, report: Report) -> Iterator[str]:
    """The text of consecutive byte blocks (a character may straddle two), checked as it goes: UTF-8 (a byte-order
    mark is dropped), no NUL, not only whitespace. Otherwise the reason goes to `report` and _Unusable is raised."""
    def skip(reason: str) -> _Unusable:
        report.skip(where, reason)
        return _Unusable()

    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset, chars, text_seen = 0, 0, False  # offset: bytes before this block
    for block in itertools.chain(blocks, [b""]):
        if offset == 0 and block[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise skip("UTF-16 (it starts with a UTF-16 byte-order mark): convert it to UTF-8")
        held = len(decoder.getstate()[0])  # bytes of a character that the last block began
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise skip(f"not valid UTF-8 ({e.reason} at byte {offset - held + e.start}): convert it, e.g. `iconv -f "
                       "latin1 -t utf-8 FILE > NEW` (name its real encoding: latin1, cp1252, cp1251, gb18030, ...)"
                       ) from None
        if "\x00" in text:  # UTF-16 without a byte-order mark is valid UTF-8 byte for byte, a NUL every other byte
            raise skip("holds NUL bytes: UTF-16 without a byte-order mark (convert it to UTF-8), or not text")
        offset, chars = offset + len(block), chars + len(text)
        text_seen = text_seen or (text != "" and not text.isspace())
        yield text
    if not text_seen:
        raise skip("empty" if not chars else "only whitespace")


def _lf(pieces: Iterable[str]) -> Iterator[str]:
    """Line endings as LF (a CRLF may straddle two pieces): the cuts then fall at the same places in a CRLF copy,
    which deduplication can find."""
    held = ""
    for piece in pieces:
        piece = (held + piece).replace("\r\n", "\n")
        held = "\r" if piece.endswith("\r") else ""
        yield piece[:len(piece) - len(held)]
    yield held


def text_chunks(pieces: str | Iterable[str], size: int = TEXT_CHUNK_CHARS) -> Iterator[str]:
    """The text (a string, or consecutive pieces of one) in pieces of at most ~`size` characters, cut after a blank
    line where there is one in the second half of the piece, else after a line end, else at `size`: their
    concatenation is the text. At least one piece ("" for no text)."""
    buffer, cut_before = "", False
    for piece in [pieces] if isinstance(pieces, str) else pieces:
        buffer += piece
        start = 0
        while len(buffer) - start > size:
            end = start + size
            cut = buffer.rfind("\n\n", start + size // 2, end)
            cut = cut + 2 if cut >= 0 else buffer.rfind("\n", start + size // 2, end) + 1 or end
            yield buffer[start:cut]
            start, cut_before = cut, True
        buffer = buffer[start:]
    if buffer or not cut_before:
        yield buffer


def _decode(raw: bytes, where: str | Path, report: Report) -> str | None:
    """`raw` as text, or None with the reason in `report` (see `_text`)."""
    try:
        return "".join(_text([raw], where, report))
    except _Unusable:
        return None


def read_text(path: Path) -> str:
    """A text file as training reads it (UTF-8, byte-order mark dropped, line endings kept), or a DataError."""
    report = Report()
    text = _decode(path.read_bytes(), path, report)
    if text is None:
        raise DataError(f"{path}: {report.skipped[0][1]}")
    return text


def _iter_text(path: Path, report: Report, name: str) -> Iterator[Document]:
    """A built-in corpus's file as one document."""
    text = _decode(path.read_bytes(), path, report)
    if text is not None:
        yield Document(name, text)


def _iter_jsonl(path: Path, text_field: str, report: Report) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue  # blank lines separate nothing in JSON Lines
            line = _decode(raw, where, report)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.skip(where, f"invalid JSON ({e.msg})")
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                keys = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                report.skip(where, f"no string field {text_field!r} (it has {keys or 'no keys'}): --text-field "
                                   "names the one that holds the text")
            elif not text.strip():
                report.skip(where, f"field {text_field!r} is empty")
            else:
                yield Document(where, text)


def _iter_stdlib(report: Report) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _walk(root, {".py"}, _STDLIB_SKIP):
        yield from _iter_text(path, report, name=f"python-stdlib:{path.relative_to(root)}")


def chatterbot_root() -> Path:
    try:
        import chatterbot_corpus
    except ImportError as e:
        raise DataError("the chatterbot built-in needs the chatterbot-corpus package: pip install chatterbot-corpus"
                        ) from e
    return Path(chatterbot_corpus.__file__).parent / "data"


def _iter_chatterbot(languages: str, report: Report) -> Iterator[Document]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # safe_load's rules, in C when libyaml is there
    root = chatterbot_root()
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    wanted = [lang.strip() for lang in languages.split(",") if lang.strip()] or available
    unknown = [lang for lang in wanted if lang not in available]
    if unknown:
        raise DataError(f"chatterbot has no language {', '.join(unknown)}; it has: {', '.join(available)}")
    for lang in wanted:
        for path in _walk(root / lang, {".yml", ".yaml"}):
            name = f"chatterbot:{path.relative_to(root)}"
            try:
                data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
            except (UnicodeDecodeError, yaml.YAMLError) as e:
                report.skip(path, f"unreadable YAML ({type(e).__name__})")
                continue
            conversations = data.get("conversations") if isinstance(data, dict) else None
            if not conversations:
                report.skip(path, "no conversations")
                continue
            for i, conv in enumerate(conversations):
                # A few conversations in the corpus are a single string rather than a list of turns.
                turns = [conv] if isinstance(conv, str) else [str(t) for t in conv or [] if t is not None]
                text = "\n".join(t.strip() for t in turns)
                if text.strip():
                    yield Document(f"{name}#{i}", text)
                else:
                    report.skip(f"{name}#{i}", "empty conversation")
