"""Serving under load: output tokens/s and request latency through the HTTP server for 1, 4 and 16 clients.

Starts `nanoseek serve` on a free loopback port, then for each level runs N concurrent streaming clients, each
sending --requests chat requests one after another (fixed --max-tokens with ignore_eos, so every level generates
the same amount per request). Each request asks a different question from chatterbot's English conversations:
prompts that differ only in a number ("tell me about topic 31") get near-identical answers, whose tokens pick the
same few routed experts at every step, which flatters batching a MoE model (docs/LOG.md, 2026-12-01). The levels
run --rounds times in turn and each level's median counts (on a shared machine one pass of a level lasts seconds,
and the same code's figures moved by 20-30% from minute to minute). Reports output tokens/s over the level's wall
time, p50/p99 request latency and time to first token as the client sees them, and the throughput ratio of the
most clients to one (goal: >= 6x at 16, from continuous batching), with its range over the rounds.

    python bench/serve_load.py                      # a random demo-preset model with a trained tokenizer
    python bench/serve_load.py runs/mine --clients 1,4,16 --requests 4 --max-tokens 64
    python bench/serve_load.py --preset small       # a random 0.46B-parameter model (more than the CPU's cache)
    python bench/serve_load.py --eager              # the server without --compile
    python bench/serve_load.py --expert-dtype bf16  # routed experts stored in bf16 (half their bytes a step)
    python bench/serve_load.py --matmul-dtype bf16  # Linear and expert products in bf16 (AVX512-BF16 CPUs)
    python bench/serve_load.py --threads 2          # the model on 2 threads (default: the server's, one per core)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=120)
GOAL = 6.0
TIMEOUT = 600  # seconds one request may take
T = TypeVar("T")


@dataclass
class Result:
    latency: float
    ttft: float
    tokens: int


def demo_model(out: Path, name: str = "demo") -> Path:
    """A randomly initialised model of preset `name` with a BPE tokenizer trained on the chatterbot corpus."""
    import torch

    from nanoseek import NanoSeek, preset
    from nanoseek.data.corpora import iter_documents
    from nanoseek.data.tokenizer import train_tokenizer

    folder = out / f"{name}-random"
    if not (folder / "config.json").is_file():
        tok = train_tokenizer((d.text for d in iter_documents(["chatterbot"])), 8192, out / "tok")
        torch.manual_seed(0)
        NanoSeek(preset(name, vocab_size=tok.vocab_size)).save_pretrained(str(folder))
        tok.save(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanoseek", "serve", str(model), "--port", str(port), "--device", args.device,
           "--max-batch", str(args.max_batch), "--max-queue", "1024", "--queue-policy", "wait", "--log-level",
           "warning", "--dtype", args.dtype] + ([] if args.eager else ["--compile"]) + (
           ["--threads", str(args.threads)] if args.threads else []) + (
           ["--expert-dtype", args.expert_dtype] if args.expert_dtype else []) + (
           ["--matmul-dtype", args.matmul_dtype] if args.matmul_dtype != "fp32" else [])
    with open(log_path, "w") as log:  # a file, not a pipe that nobody reads: a full pipe would block the server
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "NANOSEEK_API_KEY": ""})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nanoseek serve exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("nanoseek serve did not answer /health within 300 s")


class Client:
    """One benchmark client: a keep-alive HTTP/1.1 connection over asyncio streams, reading the server-sent events
    of each answer. Not httpx: on this 2-core machine the load generator shares the cores with the server, and
    httpx's streaming took ~250 µs of CPU per received token at 16 clients (~0.2 of a core, taken from the
    server at the busiest level) against ~60-100 µs here, and ~50-70 on uvloop's event loop, which `run` uses
    where it is installed, as the server does (docs/LOG.md). Every event is still parsed as JSON."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):  # a connection the server already dropped: nothing to report here
                await self.writer.wait_closed()

    async def request(self, model: str, prompt: str, max_tokens: int) -> Result:
        async with asyncio.timeout(TIMEOUT):  # a server that stops answering fails the benchmark, never hangs it
            return await self._request(model, prompt, max_tokens)

    async def _request(self, model: str, prompt: str, max_tokens: int) -> Result:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        t0 = time.perf_counter()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (self.host.encode(), len(body), body))
        status = (await self.reader.readline()).decode()
        if not status:
            raise RuntimeError("the server closed the connection before answering")
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if " 200 " not in status:
            text = await self.reader.readexactly(int(headers.get("content-length", 0)))
            raise RuntimeError(f"{status.strip()}: {text.decode()}")
        if headers.get("transfer-encoding") != "chunked":
            raise RuntimeError(f"expected a chunked event stream, got headers {headers}")
        ttft, tokens, done, pending = None, 0, False, b""
        while True:
            size_line = await self.reader.readline()
            if not size_line:
                raise RuntimeError("the server closed the connection in the middle of an answer")
            if (size := int(size_line, 16)) == 0:
                break
            pending += (await self.reader.readexactly(size + 2))[:-2]  # the chunk and its CRLF
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event == b"data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(event.removeprefix(b"data: "))
                if "error" in chunk:  # the server failed mid-stream (its status line was already sent)
                    raise RuntimeError(f"error event: {chunk['error'].get('message')}")
                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        await self.reader.readline()  # the CRLF after the last (empty) chunk: the connection is ready again
        latency = time.perf_counter() - t0
        if not done or tokens != max_tokens:
            raise RuntimeError(f"incomplete answer: {tokens} of {max_tokens} tokens, "
                               f"[DONE] {'seen' if done else 'missing'}")
        return Result(latency, latency if ttft is None else ttft, tokens)


@functools.cache
def _question_lines() -> tuple[str, ...]:
    from nanoseek.data.corpora import iter_documents

    lines = sorted({doc.text.partition("\n")[0] for doc in iter_documents(["chatterbot:english"])})
    lines = [s for s in lines if 20 <= len(s) <= 80]
    random.Random(0).shuffle(lines)
    return tuple(lines)


def questions(n: int) -> list[str]:
    """n different opening lines of chatterbot's English conversations (a shipped corpus), 20-80 characters, in a
    fixed shuffled order, so that prompts are alike in length but not in content. Read once per benchmark."""
    lines = _question_lines()
    if len(lines) < n:
        raise SystemExit(f"--clients × --requests asks for {n} different prompts; the corpus has {len(lines)}")
    return list(lines[:n])


async def level(port: int, model: str, clients: int, requests: int, max_tokens: int) -> tuple[float, list[Result]]:
    """`clients` concurrent clients, each sending `requests` requests in turn; returns wall time and results."""
    prompts = questions(clients * requests)

    async def client_loop(c: int, client: Client) -> list[Result]:
        return [await client.request(model, prompts[c * requests + i], max_tokens) for i in range(requests)]

    conns = [Client("127.0.0.1", port) for _ in range(clients)]
    try:
        await conns[0].request(model, "warm-up", 4)
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c, conn) for c, conn in enumerate(conns)))
        return time.perf_counter() - t0, [r for rs in per_client for r in rs]
    finally:
        await asyncio.gather(*(c.close() for c in conns))


def run(coro: Awaitable[T]) -> T:
    """asyncio.run, on uvloop's faster event loop where it is installed (a nanoseek dependency off Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="a run or model folder (default: a random model of --preset)")
    p.add_argument("--preset", default="demo", help="the random model's size without a model folder: demo (22M "
                                                    "parameters, fits this CPU's cache) or small (0.46B)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=3, help="requests per client at each level, per round")
    p.add_argument("--rounds", type=int, default=3, help="passes over the levels (medians count)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--eager", action="store_true", help="serve without --compile")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="the server's --dtype")
    p.add_argument("--expert-dtype", choices=["fp32", "bf16", "int8"],
                   help="the server's --expert-dtype (default: --dtype)")
    p.add_argument("--matmul-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the server's --matmul-dtype (bf16: Linear and expert products in bf16, on CPU)")
    p.add_argument("--threads", type=int, help="the server's --threads (default: its own default)")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: still stop the server below

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model_dir = Path(args.model) if args.model else demo_model(Path(tmp), args.preset)
        port = free_port()
        console.print(f"starting nanoseek serve {model_dir} on 127.0.0.1:{port} …")
        proc = start_server(model_dir, port, args, Path(tmp) / "server.log")
        try:
            base = f"http://127.0.0.1:{port}"
            model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
            rates: dict[int, list[float]] = {n: [] for n in levels}
            results: dict[int, list[Result]] = {n: [] for n in levels}
            for r in range(args.rounds):
                for n in levels:
                    cpu = time.process_time()
                    wall, done = run(level(port, model, n, args.requests, args.max_tokens))
                    tokens = sum(x.tokens for x in done)
                    rates[n].append(tokens / wall)
                    results[n] += done
                    client_us = (time.process_time() - cpu) / tokens * 1e6
                    console.print(f"round {r + 1}, {n} client(s): {rates[n][-1]:.1f} output tokens/s (the clients' "
                                  f"CPU with its warm-up: {client_us:.0f} µs per token)")
        finally:
            proc.terminate()
            proc.wait(30)

    mode = ("" if args.eager else " --compile") + f" --dtype {args.dtype}" + (
        f" --expert-dtype {args.expert_dtype}" if args.expert_dtype else "") + (
        f" --matmul-dtype {args.matmul_dtype}" if args.matmul_dtype != "fp32" else "") + (
        f" --threads {args.threads}" if args.threads else "")
    table = Table(title=f"nanoseek serve{mode}: {model}, {args.max_tokens} tokens per request, max batch "
                        f"{args.max_batch}")
    for col in ("clients", "requests", "output tokens/s (median)", "latency p50", "latency p99", "TTFT p50",
                "TTFT p99"):
        table.add_column(col, justify="right")
    for n in levels:
        lat, ttft = [x.latency for x in results[n]], [x.ttft for x in results[n]]
        table.add_row(str(n), str(len(results[n])), f"{statistics.median(rates[n]):.1f}", f"{pct(lat, 50):.2f} s",
                      f"{pct(lat, 99):.2f} s", f"{pct(ttft, 50) * 1000:.0f} ms", f"{pct(ttft, 99) * 1000:.0f} ms")
    console.print(table)
    if len(levels) > 1:
        most, one = max(levels), min(levels)
        ratio = statistics.median(rates[most]) / statistics.median(rates[one])
        per_round = [a / b for a, b in zip(rates[most], rates[one])]
        # the goal is stated for 16 clients against 1: judge only that comparison
        verdict = "" if (one, most) != (1, 16) else \
            f" ({'[green]meets[/green]' if ratio >= GOAL else '[red]misses[/red]'} the goal of {GOAL:g}x)"
        console.print(f"throughput at {most} clients / at {one}: {ratio:.1f}x of the medians, {min(per_round):.1f}-"
                      f"{max(per_round):.1f}x in single rounds{verdict}")


if __name__ == "__main__":
    main()
