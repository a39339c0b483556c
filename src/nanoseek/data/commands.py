"""`nanoseek tokenizer train|report` and `nanoseek data prepare`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nanoseek.data.corpora import BUILTINS, Report, iter_documents
from nanoseek.data.shards import DEFAULT_SHARD_TOKENS, prepare
from nanoseek.data.tokenizer import DataError, token_tax_report, train_tokenizer

console = Console()
_SOURCES_HELP = (f"a text file, a folder (.txt/.md/.jsonl inside), a .jsonl file, or a built-in corpus: "
                 f"{', '.join(BUILTINS)} (chatterbot:LANG[,LANG] for some languages); repeatable")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the `tokenizer` and `data` commands on the CLI's subparsers."""
    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or measure its cost per language")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tr = tsub.add_parser("train", help="train a tokenizer on files, folders or a built-in corpus")
    tr.add_argument("--input", action="extend", nargs="+", required=True, metavar="SRC", help=_SOURCES_HELP)
    tr.add_argument("--vocab-size", type=int, default=8192, help="tokens, including 256 bytes and 5 special tokens")
    tr.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    tr.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    tr.add_argument("--max-chars", type=int, default=None, help="train on at most this many characters")
    tr.add_argument("--text-field", default="text", help="the key holding the text in .jsonl lines")
    tr.add_argument("--max-length", type=int, default=4096, help="model_max_length written for transformers")
    tr.set_defaults(func=cmd_tokenizer_train)

    rp = tsub.add_parser("report", help="tokens per language on parallel text (the premium over English)")
    rp.add_argument("--tokenizer", required=True, help="a tokenizer folder")
    rp.add_argument("--parallel", required=True, help="a folder of <language>.txt files with the same content, "
                    "eng.txt among them (e.g. translations of the Universal Declaration of Human Rights)")
    rp.add_argument("--out", default="token_tax.png", help="the bar chart (PNG; default: ./token_tax.png)")
    rp.set_defaults(func=cmd_tokenizer_report)

    d = sub.add_parser("data", help="prepare training data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    pr = dsub.add_parser("prepare", help="tokenize documents into train/val shards with a checked index")
    pr.add_argument("--input", action="extend", nargs="+", required=True, metavar="SRC", help=_SOURCES_HELP)
    pr.add_argument("--tokenizer", required=True, help="a tokenizer folder (copied into --out)")
    pr.add_argument("--out", required=True, help="the data folder to write")
    pr.add_argument("--val-fraction", type=float, default=0.01,
                    help="share of the text's bytes held out for validation, as whole documents (at least one)")
    pr.add_argument("--seed", type=int, default=0, help="seeds the choice of validation documents")
    pr.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")
    pr.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    pr.add_argument("--text-field", default="text", help="the key holding the text in .jsonl lines")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_data_prepare)


def _skipped_table(skipped: list[tuple[str, str]], limit: int = 20, total: int | None = None) -> Table:
    total = len(skipped) if total is None else total
    t = Table(title=f"{total} skipped")
    t.add_column("file", overflow="fold")  # a path is worth more than a tidy table
    t.add_column("reason")
    groups: dict[tuple[str, str], list[str]] = {}  # the lines of one JSON Lines file skipped for one reason: a row
    for path, reason in skipped:
        file, _, line = path.rpartition(":")
        if not line.isdigit():  # a whole file, not a line of one
            file, line = path, ""
        groups.setdefault((file, reason), []).append(line)
    for (file, reason), lines in list(groups.items())[:limit]:
        where = (file if not lines[0] else f"{file}:{lines[0]}" if len(lines) == 1 else
                 f"{file} ({len(lines)} lines: {lines[0]}-{lines[-1]})")
        t.add_row(where, reason)
    more = total - sum(len(lines) for lines in list(groups.values())[:limit])
    if more:
        t.add_row(f"... and {more} more", "")
    return t


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    limits = {"--max-docs": args.max_docs, "--max-chars": args.max_chars, "--max-length": args.max_length}
    for flag, value in limits.items():
        if value is not None and value < 1:
            raise DataError(f"{flag} must be at least 1, got {value}")
    report = Report()
    stats = {"docs": 0, "chars": 0}

    def texts() -> Iterator[str]:
        for doc in iter_documents(args.input, args.text_field, report):
            if args.max_docs is not None and stats["docs"] >= args.max_docs:
                return
            if args.max_chars is not None and stats["chars"] + len(doc.text) > args.max_chars:
                text = doc.text[: args.max_chars - stats["chars"]]
                if text:
                    stats["docs"] += 1
                    stats["chars"] += len(text)
                    yield text
                return
            stats["docs"] += 1
            stats["chars"] += len(doc.text)
            yield doc.text

    t0 = time.perf_counter()
    try:
        tok = train_tokenizer(texts(), args.vocab_size, args.out, model_max_length=args.max_length)
    except DataError:
        if report.skipped:  # why the inputs gave nothing
            console.print(_skipped_table(report.skipped))
        raise
    console.print(f"tokenizer: {tok.vocab_size:,} tokens from {stats['docs']:,} documents, {stats['chars']:,} "
                  f"characters, in {time.perf_counter() - t0:.1f}s -> {Path(args.out) / 'tokenizer.json'}")
    if tok.vocab_size < args.vocab_size:
        console.print(f"[yellow]note:[/yellow] asked for {args.vocab_size:,} tokens; the text had only enough "
                      f"distinct pairs for {tok.vocab_size:,}")
    if report.skipped:
        console.print(_skipped_table(report.skipped))
    return 0


def cmd_tokenizer_report(args: argparse.Namespace) -> int:
    rows = token_tax_report(args.tokenizer, args.parallel, args.out)
    t = Table(title=f"token premium over English: {args.tokenizer}")
    for col in ("language", "characters", "bytes", "tokens", "tokens / char", "premium"):
        t.add_column(col, justify="left" if col == "language" else "right")
    for r in rows:
        t.add_row(f"{r.name} ({r.language})", f"{r.chars:,}", f"{r.bytes:,}", f"{r.tokens:,}",
                  f"{r.tokens_per_char:.3f}", f"{r.premium:.2f}x")
    console.print(t)
    console.print(f"chart: {args.out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    summary = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                      shard_tokens=args.shard_tokens, seed=args.seed, dedup=not args.no_dedup,
                      progress=not args.no_progress, text_field=args.text_field)
    console.print(summary.table())
    skipped = [(s["path"], s["reason"]) for s in summary.index["skipped"]]
    if skipped:
        console.print(_skipped_table(skipped, total=summary.index["skipped_total"]))
    return 0
