"""`nanoseek serve` (the OpenAI-compatible HTTP server and web chat) and `nanoseek chat` (chat in the terminal)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from nanoseek.data.tokenizer import DataError
from nanoseek.infer.text import terminal_safe

if TYPE_CHECKING:  # imported when a command runs, so `nanoseek --help` stays quick
    from nanoseek.infer import Engine, SamplingParams

console = Console()
API_KEY_ENV = "NANOSEEK_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="RUN_DIR (its latest checkpoint) or a model folder with tokenizer files")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (the fastest available)")
    dtype_args(p)


def dtype_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the weights and the math: auto is bf16 on a GPU with bf16 (half the memory), fp32 on a CPU "
                        "(faster there)")
    p.add_argument("--expert-dtype", choices=["fp32", "bf16", "int8"],
                   help="how the routed experts are stored (default: --dtype): bf16 halves their memory (and the "
                        "bytes a decode step reads); with fp32 math a bf16 checkpoint loses nothing, an fp32 one is "
                        "rounded. int8 (CPU) quarters it: quantized at load, one scale per weight row")
    p.add_argument("--matmul-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="CPU only: bf16 multiplies Linear layers and routed experts in bf16 with fp32 sums (weights "
                        "and their inputs rounded to bf16): faster on CPUs with AVX512-BF16, a small change in the "
                        "logits")
    p.add_argument("--kv-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the latent KV cache (auto: as --dtype): bf16 halves its memory, the cached rows rounded to "
                        "bf16 (a small change in the logits)")


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from nanoseek.infer import Engine, load_for_inference
    from nanoseek.serve.app import create_app

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if not 0 < args.port <= 65535:
        raise ValueError(f"--port must be in 1-65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be at least 0 seconds, got {args.shutdown_timeout}")
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError(f"--max-batch ({args.max_batch}) must be at least 1 and --max-queue ({args.max_queue}) at "
                         "least 0")
    # Before anything compiles (inductor's kernels are built for a thread count). All cores by default: on 2 cores
    # two model threads served 1 client 1.1-1.2x and 16 clients 1.3x faster than one (docs/LOG.md, 2026-12-01; the
    # one-fewer default of earlier sessions was measured while two OpenMP teams throttled each other).
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    model, tokenizer = load_for_inference(args.model, args.device, args.expert_dtype, args.dtype, args.matmul_dtype)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    queue_policy=args.queue_policy, speculative=args.speculative, compile=args.compile,
                    kv_dtype=args.kv_dtype)
    energy = None
    if not args.no_energy:
        from nanoseek.cost.energy import EnergyMeter, Tariff
        from nanoseek.train.config import CostConfig

        energy = EnergyMeter(Tariff.of(CostConfig(country=args.country)), engine.device)
    app = create_app(engine, tokenizer, api_key=api_key, energy=energy)
    if not _is_loopback(args.host) and not api_key:
        console.print(f"[yellow]warning:[/yellow] listening on {escape(args.host)} without an API key: anyone who "
                      f"can reach this address can use the model; set {API_KEY_ENV} or pass --api-key", soft_wrap=True)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    console.print(f"serving [bold]{escape(engine.model_name)}[/bold] (context {engine.max_context} tokens) at "
                  f"http://{shown}:{args.port}/ (web chat) and http://{shown}:{args.port}/v1 (OpenAI API)"
                  + (" with an API key" if api_key else "") + f", {threads} model thread{'s' * (threads > 1)}, "
                  f"{model.linear_layout}",
                  highlight=False, soft_wrap=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal: make that a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    engine.start()
    if args.compile:
        with console.status("compiling the decode step (a minute or so on a small CPU; cached for next time)"):
            engine.ready.wait()
        console.print("decode step " + ("compiled" if engine.compile else "[yellow]not compiled[/yellow]: decoding "
                                        "eagerly (see the warning above)"))
    try:
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                        timeout_graceful_shutdown=args.shutdown_timeout)
    finally:
        engine.shutdown()
    return 0


async def _answer(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> str:
    """Stream one answer to stdout as it is generated; returns its text."""
    parts = []
    async for ev in engine.stream(prompt_ids, params):
        parts.append(ev.text)
        sys.stdout.write(terminal_safe(ev.text))
        sys.stdout.flush()
    return "".join(parts)


def cmd_chat(args: argparse.Namespace) -> int:
    from nanoseek.infer import Engine, SamplingParams, load_for_inference

    with contextlib.suppress(ImportError):  # line editing and arrow-key recall in input(), where the OS has it
        import readline  # noqa: F401

    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p).check()  # before loading
    model, tokenizer = load_for_inference(args.model, args.device, args.expert_dtype, args.dtype, args.matmul_dtype)
    if tokenizer.chat_template is None:
        raise DataError(f"{args.model} has no chat template (no chat_template in tokenizer_config.json and no "
                        "chat_template.jinja), so there is no way to format a conversation for it: add one, or "
                        f"use `nanoseek generate {args.model} --prompt ...` for plain completion")
    engine = Engine(model, tokenizer, max_batch=1, kv_dtype=args.kv_dtype)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    console.print(f"chatting with [bold]{escape(engine.model_name)}[/bold]: /reset forgets the conversation, "
                  "/exit (or Ctrl-D) quits, Ctrl-C stops an answer", highlight=False)
    engine.start()
    try:
        with asyncio.Runner() as runner:
            while True:
                try:
                    line = input("you> ").strip()
                except (EOFError, KeyboardInterrupt):
                    print()
                    return 0
                except UnicodeDecodeError as e:  # a terminal or pipe in another encoding than Python expects
                    console.print(f"(that line is not UTF-8 text ({e.reason}); it is skipped)", style="yellow")
                    continue
                if line in ("/exit", "/quit"):
                    return 0
                if line == "/reset":
                    history.clear()
                    console.print("(conversation cleared)", style="dim")
                    continue
                if not line:
                    continue
                turn = [*history, {"role": "user", "content": line}]
                try:
                    ids = tokenizer.encode(tokenizer.apply_chat_template(system + turn, add_generation_prompt=True))
                except DataError as e:  # one bad line ends nothing but itself
                    console.print(f"({escape(str(e))}; that line is skipped)", style="yellow", highlight=False)
                    continue
                room = engine.max_context - len(ids)
                if room < 1:
                    console.print(f"(the conversation is {len(ids)} tokens, the model's context {engine.max_context}:"
                                  " /reset to start over)", style="yellow")
                    continue
                params = SamplingParams(max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                        top_p=args.top_p, seed=args.seed)
                sys.stdout.write("model> ")
                try:
                    answer = runner.run(_answer(engine, ids, params))
                except KeyboardInterrupt:  # the runner cancelled the stream, which frees its slot
                    print()
                    console.print("(stopped; that exchange is not kept)", style="dim")
                    continue
                print()
                history = [*turn, {"role": "assistant", "content": answer}]
    finally:
        engine.shutdown()


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page at /")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; 0.0.0.0 exposes it to the network)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV}, else no key)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a batch slot")
    s.add_argument("--queue-policy", choices=["reject", "wait"], default="reject",
                   help="with a full queue: answer 429 (reject) or hold the request until there is room (wait)")
    s.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile): 2.5-3x faster decoding on a CPU after a minute of "
                        "compiling at start")
    s.add_argument("--speculative", choices=["mtp"], default=None,
                   help="speculative decoding with the model's multi-token-prediction head")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: one per core, within a container's CPU quota)")
    s.add_argument("--country", default="world", help="grid carbon intensity for /metrics (ISO 3166 alpha-3, e.g. FRA)")
    s.add_argument("--no-energy", action="store_true", help="do not meter energy (no energy per token in /metrics)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, how long answers in flight may take to finish before they are cut "
                        "(default 30; a long answer on a CPU can take minutes, longer than a service manager waits)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="chat with a model in the terminal (streaming, history, /reset)")
    _engine_args(c)
    c.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--system", default="", help="a system prompt")
    c.set_defaults(func=cmd_chat)
