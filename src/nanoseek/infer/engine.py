"""The inference engine: continuous batching over the latent KV cache, optional MTP self-speculation.

Requests wait in a queue; between two decode steps the scheduler admits as many as there are free cache slots
(and room in the tokens-in-flight budget), prefills each one, and then every running sequence advances by one
decode step together. A sequence leaves the batch the moment it finishes or its client goes away, and its slot
is free for the next request. One thread owns the model and the cache; callers talk to it through queues.

With `speculative="mtp"`, greedy requests also run the MTP module (DeepSeek-V3 §2.2, §5.4.3): after each step
it drafts the token after next, and the next main step checks the draft for free alongside the real token.
An accepted draft yields two tokens for one step; a rejected one costs nothing but its share of that step.
Greedy output is the same tokens as plain decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import types
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.device import pick_device, pick_dtype, release_openmp_threads
from nanoseek.infer import kernels
from nanoseek.infer.bf16 import use_bf16_products
from nanoseek.infer.forward import Batch, LatentCache, decode_step, forward_cached, mtp_cached
from nanoseek.infer.layout import choose_linear_layout
from nanoseek.infer.quant import quantize_experts
from nanoseek.infer.sampling import InferenceError, SamplingParams, generator_for, sample, token_logprobs
from nanoseek.infer.text import TextStream
from nanoseek.model.model import NanoSeek

PREFILL_TOKENS = 2048  # prompts prefilled together: at most this many tokens, padding included (or one prompt)


class QueueFull(RuntimeError):
    """The waiting queue is at its limit (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine shut down before the request finished: the server's state, not the request's fault (HTTP 503)."""


@dataclass
class TokenEvent:
    """One generated token, as the engine streams it."""

    token_id: int
    text: str  # text this token releases (may be "" while held back, see infer/text.py)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None  # (token id, logprob) of the most likely tokens
    finish_reason: str | None  # None, or on the last event "stop" / "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[TokenEvent | BaseException], None]
    text: TextStream
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    speculate: bool
    slot: int = -1
    length: int = 0  # positions of this sequence in the main cache (the MTP cache keeps the same count)
    last: int = -1  # the newest token: chosen, not yet in the cache
    draft: int | None = None  # the MTP module's guess for the token after `last`
    generated: int = 0
    done: bool = False
    reserved: int = field(init=False)

    def __post_init__(self) -> None:
        self.reserved = len(self.prompt) + self.params.max_tokens


class _Mailbox:
    """Events from the engine's thread to one asyncio loop, with one wake-up of the loop per batch of events.

    A decode step emits an event for every running request; waking the loop for each (call_soon_threadsafe
    writes to its self-pipe, and the syscall lets the loop's thread take the GIL) made the two threads trade the
    GIL up to 16 times per step. Events posted before the loop gets to run ride along with the first wake-up, and
    while the engine holds the mailbox (`held`: the events of one prefill or decode step), none wakes it: on an
    idle core the loop took each event as soon as it was posted, and the next one woke it again (a 16-row step's
    events took ~0.55 ms to post, docs/LOG.md, 2026-12-01)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = weakref.ref(loop)  # the engine keeps one mailbox per loop: it must not keep the loop alive
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, TokenEvent | BaseException]] = []
        self.held = False

    def post(self, events: asyncio.Queue, ev: TokenEvent | BaseException) -> None:
        with self.lock:
            self.pending.append((events, ev))
            if self.held or len(self.pending) > 1:
                return  # a wake-up is on its way (or comes at release) and will deliver this one too
        self._wake()

    def hold(self) -> None:
        with self.lock:
            self.held = True

    def release(self) -> None:
        with self.lock:
            self.held = False
            if not self.pending:
                return
        self._wake()

    def _wake(self) -> None:
        loop = self.loop()
        if loop is None:  # the caller's event loop is gone: nobody to tell
            return
        with contextlib.suppress(RuntimeError):  # ... or closed
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for events, ev in batch:
            events.put_nowait(ev)


class Engine:
    def __init__(self, model: NanoSeek, tokenizer: Tokenizer, *, max_batch: int = 16,
                 max_tokens_in_flight: int | None = None, max_queue: int = 64, queue_policy: str = "reject",
                 speculative: str | None = None, model_name: str | None = None, compile: bool = False,
                 kv_dtype: str = "auto"):
        config = model.config
        if queue_policy not in ("reject", "wait"):
            raise InferenceError(f"queue_policy must be 'reject' or 'wait', got {queue_policy!r}")
        if speculative not in (None, "mtp"):
            raise InferenceError(f"speculative must be 'mtp' or None, got {speculative!r}")
        if speculative and not config.num_nextn_predict_layers:
            raise InferenceError("speculative='mtp' needs a checkpoint with MTP modules (num_nextn_predict_layers "
                                 "is 0): serve it without --speculative")
        if max_batch < 1 or max_queue < 0:
            raise InferenceError(f"max_batch must be at least 1 (got {max_batch}) and max_queue at least 0 (got "
                                 f"{max_queue})")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model, "name_or_path", None) or "nanoseek"
        self.max_context = config.max_position_embeddings
        self.max_batch = max_batch
        self.max_tokens_in_flight = max_tokens_in_flight or max_batch * self.max_context
        self.max_queue = max_queue
        self.queue_policy = queue_policy
        self.speculative = speculative
        # the tokenizer's EOS (the chat template ends turns with it) and every end id of the model's config, as
        # transformers' generate stops at each of them
        self.eos_ids = {tokenizer.eos_id, *config.eos_ids}
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        # The latent cache's dtype (`--kv-dtype`): the model's by default; bf16 halves its memory (the rows are
        # rounded as they are written; prefills expanded from the latent use the unrounded values).
        kv = {"auto": self.dtype, "fp32": torch.float32, "bf16": torch.bfloat16}.get(kv_dtype)
        if kv is None:
            raise InferenceError(f"kv_dtype must be 'auto', 'fp32' or 'bf16', got {kv_dtype!r}")
        self.kv_dtype = kv
        self._cache: LatentCache | None = None  # allocated by the engine's thread, inside inference mode
        self._free = list(range(max_batch - 1, -1, -1))
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cancelled: set[_Request] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._borrowers = 0  # generate() calls running on a thread that generate() started: the last one stops it
        self._was_training = False  # the model's mode before the first of them
        self.ready = threading.Event()  # set once the engine's thread can take requests (after compiling)
        self._stopping = False
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = \
            weakref.WeakKeyDictionary()
        self.drafts_proposed = 0
        self.drafts_accepted = 0
        # The decode step, optionally compiled into one graph (inductor): at small batches eager decoding is
        # mostly per-op dispatch (~800 ops per token), which fused kernels remove (docs/LOG.md). Prefill stays
        # eager: its few large ops gain nothing.
        self.compile = compile
        self._decode_step = _compiled(decode_step) if compile else decode_step

    # ---- public API --------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the scheduler in a background thread (servers); `generate` also works without it."""
        with self._cond:  # two callers at once must not start two schedulers over the same requests and cache
            if self._thread is not None:
                return
            self._stopping = False
            self.model.eval()
            # the caller's OpenMP team (loading the model made one) would halve the engine's (release_openmp_threads)
            release_openmp_threads()
            self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread. Requests still waiting or running are told (an error event) and dropped:
        a later start must not run them for callers that are gone."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            left = [*self._waiting, *self._running]
            self._waiting.clear()
            self._cancelled.clear()
            for r in left:
                self._finish(r)
        for r in left:
            r.sink(EngineStopped("the engine shut down before this request finished"))

    def stats(self) -> dict[str, Any]:
        with self._cond:
            running, waiting = list(self._running), len(self._waiting)
        rate = self.drafts_accepted / self.drafts_proposed if self.drafts_proposed else None
        return {"running": len(running), "waiting": waiting, "tokens_in_flight": sum(r.reserved for r in running),
                "acceptance_rate": rate}

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Generate for one prompt, token by token. Closing the iterator early frees the request's slot."""
        self.start()
        loop = asyncio.get_running_loop()
        with self._cond:
            mailbox = self._mailboxes.get(loop) or self._mailboxes.setdefault(loop, _Mailbox(loop))
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

        def sink(ev: TokenEvent | BaseException) -> None:
            mailbox.post(events, ev)

        while True:
            try:
                req = self._submit(prompt, params, sink)
                break
            except QueueFull:
                if self.queue_policy == "reject":
                    raise
                await asyncio.sleep(0.01)
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.cancel(req)

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[list[TokenEvent]]:
        """Generate for several prompts, blocking until all are done. Without a running background thread, one is
        started for the call: decoding in the caller's thread ran up to 20x slower on a loaded 2-core machine
        (its OpenMP team waits on busy cores; docs/LOG.md), and the caller's float state stays untouched."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):  # zip would drop the extra prompts and the wait below would never end
            raise InferenceError(f"{len(prompts)} prompts but {len(plist)} sampling parameters: give one per prompt "
                                 "or a single one for all")
        outs: list[list[TokenEvent]] = [[] for _ in prompts]
        q: queue.Queue[tuple[int, TokenEvent | BaseException]] = queue.Queue()
        for p, sp in zip(prompts, plist):  # all checked before any runs
            self._check(p, sp)
        with self._cond:  # on a thread started by a generate() call, several calls may run at once: the last stops it
            own = self._thread is None or self._borrowers > 0
            if own and not self._borrowers:
                self._was_training = self.model.training
            self._borrowers += own
        reqs: list[_Request] = []
        try:
            self.start()
            for i, (p, sp) in enumerate(zip(prompts, plist)):
                reqs.append(self._submit(p, sp, lambda ev, i=i: q.put((i, ev)), bounded=False))
            pending = len(prompts)
            while pending:
                i, ev = q.get()
                if isinstance(ev, BaseException):
                    raise ev
                outs[i].append(ev)
                pending -= ev.finish_reason is not None
        finally:
            for r in reqs:  # left early (an error, Ctrl-C): the rest must not keep slots or run later
                self.cancel(r)
            if own:
                with self._cond:
                    self._borrowers -= 1
                    last = self._borrowers == 0
                if last:
                    self.shutdown()
                    self.model.train(self._was_training)
        return outs

    def cancel(self, req: _Request) -> None:
        with self._cond:
            if not req.done:
                self._cancelled.add(req)
                self._cond.notify_all()

    # ---- scheduling --------------------------------------------------------------------------------
    def _check(self, prompt: list[int], params: SamplingParams) -> None:
        params.check()
        vocab = self.model.config.vocab_size
        if not prompt:
            raise InferenceError("the prompt is empty: give at least one token")
        if any(not 0 <= t < vocab for t in prompt):
            raise InferenceError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_context:
            raise InferenceError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"model's context of {self.max_context} tokens: shorten the prompt or lower "
                                 "max_tokens")

    def _submit(self, prompt: list[int], params: SamplingParams, sink: Callable, bounded: bool = True) -> _Request:
        self._check(prompt, params)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        req = _Request(list(prompt), params, sink, TextStream(self.tokenizer, params.stop), frozenset(stop_ids),
                       generator_for(params), speculate=self.speculative == "mtp" and params.greedy)
        with self._cond:
            if self._stopping:  # shut down from another thread since the caller's start(): nobody would run it
                raise EngineStopped("the engine is shutting down: this request was not taken")
            # the queue holds the requests no free slot will take: the waiting ones beyond the free slots
            if bounded and len(self._waiting) >= self.max_queue + len(self._free):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting for a slot): retry later")
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def _loop(self) -> None:
        torch.set_flush_denormal(True)  # this thread only: tiny probabilities are zeros, not slow subnormals
        with torch.inference_mode():
            if self.compile and not self.ready.is_set():  # once per engine: later threads reuse the graphs
                try:
                    self._warm_up()
                except Exception as e:  # e.g. no C++ compiler for inductor's CPU kernels: serve, only slower
                    warnings.warn(f"compiling the decode step failed ({type(e).__name__}: {e}); decoding eagerly",
                                  stacklevel=1)
                    self.compile, self._decode_step = False, decode_step
            self.ready.set()
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._running or self._cancelled):
                        self._cond.wait()
                    if self._stopping:
                        return
                self._step()

    def _ensure_cache(self) -> LatentCache:
        if self._cache is None:
            self._cache = LatentCache(self.model.config, self.max_batch, self.max_context + 1, self.device,
                                      self.kv_dtype, mtp=self.speculative == "mtp")
        return self._cache

    def _warm_up(self) -> None:
        """Compile the decode step for the shapes it will meet (one row, several rows; two tokens per row with
        speculation) before the first request waits on it. Writes only stale rows of free slots."""
        cache = self._ensure_cache()
        for rows in sorted({1, min(2, self.max_batch)}):
            for T in (1, 2) if self.speculative else (1,):
                tokens = torch.zeros(rows, T, dtype=torch.long, device=self.device)
                batch = Batch.make(list(range(rows)), [1 + b for b in range(rows)], [T] * rows, T, self.device)
                _mark_dynamic(tokens, batch)
                self._decode_step(self.model, cache, tokens, batch)

    def _fail(self, reqs: list[_Request], e: BaseException) -> None:
        """A failed part of a step fails the requests it was for, not the server: each is finished (its slot free
        again) before it is told, so that its caller's cancel finds it done."""
        with self._cond:
            reqs = [r for r in reqs if not r.done]  # one that finished in an earlier prefill chunk has its answer
            for r in reqs:
                self._finish(r)
        for r in reqs:
            r.sink(e)

    def _step(self) -> None:
        """Drop cancelled requests, admit waiting ones (prefill), then one decode step for the batch. A failure
        fails only the requests it touched: those waiting if the cache cannot be allocated, those being
        prefilled in a chunk that fails (the running rows' cache is untouched), the batch if its step fails."""
        with self._cond:
            for r in self._cancelled:
                if r in self._waiting:
                    self._waiting.remove(r)
                self._finish(r)
            self._cancelled.clear()
        try:
            self._ensure_cache()
        except Exception as e:  # e.g. no memory for max_batch x context: nobody can run
            with self._cond:
                waiting = list(self._waiting)
                self._waiting.clear()
            self._fail(waiting, e)
            return
        with self._cond:
            admitted = []
            in_flight = sum(r.reserved for r in self._running)
            while self._waiting and self._free and (
                    (not self._running and not admitted)  # one request always runs, whatever its size
                    or in_flight + self._waiting[0].reserved <= self.max_tokens_in_flight):
                r = self._waiting.popleft()
                r.slot = self._free.pop()
                in_flight += r.reserved
                admitted.append(r)
        if admitted:
            with self._mail_held():
                self._prefill(admitted)
        if self._running:
            with self._mail_held():
                try:
                    self._decode()
                except Exception as e:
                    self._fail(list(self._running), e)

    @contextlib.contextmanager
    def _mail_held(self) -> Iterator[None]:
        """The asyncio loops get this block's events together, with one wake-up each, at its end (_Mailbox)."""
        with self._cond:  # stream() adds mailboxes on the loops' threads
            boxes = list(self._mailboxes.values())
        for box in boxes:
            box.hold()
        try:
            yield
        finally:
            for box in boxes:
                box.release()

    def _finish(self, r: _Request) -> None:
        r.done = True
        if r.slot >= 0:
            self._free.append(r.slot)
            r.slot = -1
        if r in self._running:
            self._running.remove(r)

    def _prefill(self, reqs: list[_Request]) -> None:
        """Prompts of the requests admitted together go through the model as one ragged batch (one forward
        instead of one per request), in chunks of similar lengths so that padding stays small."""
        reqs = sorted(reqs, key=lambda r: len(r.prompt))
        while reqs:
            n = 1
            while n < len(reqs) and (n + 1) * len(reqs[n].prompt) <= PREFILL_TOKENS:
                n += 1
            chunk, reqs = reqs[:n], reqs[n:]
            try:
                self._prefill_chunk(chunk)
            except Exception as e:  # this chunk's requests only: the running rows and the other chunks go on
                self._fail([r for r in chunk if r not in self._running], e)

    def _prefill_chunk(self, reqs: list[_Request]) -> None:
        n_new = [len(r.prompt) for r in reqs]
        T = max(n_new)
        batch = Batch.make([r.slot for r in reqs], [0] * len(reqs), n_new, T, self.device)
        tokens = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for r in reqs], device=self.device)
        h = forward_cached(self.model, self._cache, tokens, batch)
        at_last = (torch.arange(len(reqs), device=self.device), torch.tensor(n_new, device=self.device) - 1)
        logits = self.model.lm_head(h[at_last]).float()  # each prompt's last real position
        chosen = [sample(logits[b], r.params, r.generator) for b, r in enumerate(reqs)]
        if any(r.speculate for r in reqs):  # fill the MTP cache for the prompts: position i sees token i+1
            following = torch.tensor([r.prompt[1:] + [tok] + [0] * (T - len(r.prompt))
                                      for r, tok in zip(reqs, chosen)], device=self.device)
            out = mtp_cached(self.model, self._cache, h, following, batch)
            drafts = self.model.lm_head(out[at_last]).argmax(-1).tolist()
            for r, d in zip(reqs, drafts):
                r.draft = d if r.speculate else None
        for b, r in enumerate(reqs):
            r.length = n_new[b]
            self._running.append(r)
            self._emit(r, chosen[b], logits[b])

    def _decode(self) -> None:
        rows = list(self._running)
        T = 2 if any(r.draft is not None for r in rows) else 1
        tokens = torch.tensor([[r.last, r.draft if r.draft is not None else 0][:T] for r in rows], device=self.device)
        n_new = [2 if r.draft is not None else 1 for r in rows]
        starts = [r.length for r in rows]
        batch = Batch.make([r.slot for r in rows], starts, n_new, T, self.device)
        h, logits = self._decode_step(self.model, self._cache, tokens, batch)  # logits [B, T, vocab] fp32
        greedy = logits.argmax(dim=-1).tolist()
        spec_rows, spec_tokens = [], []
        for b, r in enumerate(rows):
            chosen = [greedy[b][0] if r.params.greedy else sample(logits[b, 0], r.params, r.generator)]
            if r.draft is not None:
                self.drafts_proposed += 1
                if r.draft == chosen[0]:  # the draft was right: the main model's output after it is valid too
                    self.drafts_accepted += 1
                    chosen.append(greedy[b][1])
            r.length += len(chosen)  # `last` and an accepted draft are now cached
            for i, token in enumerate(chosen):
                self._emit(r, token, logits[b, i])
                if r.done:
                    break
            if r.speculate and not r.done:
                spec_rows.append(b)
                spec_tokens.append(chosen)
        if spec_rows:
            self._draft(rows, spec_rows, spec_tokens, starts, h)

    def _draft(self, rows: list[_Request], idx: list[int], chosen: list[list[int]], starts: list[int],
               h: torch.Tensor) -> None:
        """Advance the MTP cache over the positions the main model just cached and draft the next token."""
        T = max(len(c) for c in chosen)
        n_new = [len(c) for c in chosen]
        batch = Batch.make([rows[b].slot for b in idx], [starts[b] for b in idx], n_new, T, self.device)
        following = torch.tensor([c + [0] * (T - len(c)) for c in chosen], device=self.device)
        out = mtp_cached(self.model, self._cache, h[idx, :T], following, batch)
        last = out[torch.arange(len(idx), device=self.device), torch.tensor(n_new, device=self.device) - 1]
        drafts = self.model.lm_head(last).argmax(dim=-1).tolist()
        for b, d in zip(idx, drafts):
            rows[b].draft = d

    def _emit(self, r: _Request, token: int, logits: torch.Tensor) -> None:
        r.generated += 1
        r.last = token
        logprob = top = None
        if r.params.logprobs is not None:
            logprob, top = token_logprobs(logits, token, r.params.logprobs)
        finish = None
        if token in r.stop_ids:
            text, finish = r.text.flush()[0], "stop"
        else:
            text, hit = r.text.add(token)
            if hit:
                finish = "stop"
            elif r.generated >= r.params.max_tokens:
                rest, hit = r.text.flush()
                text, finish = text + rest, "stop" if hit else "length"
        r.sink(TokenEvent(token, text, logprob, top, finish, len(r.prompt), r.generated))
        if finish is not None:
            with self._cond:
                self._finish(r)


def _compiled(fn: Callable) -> Callable:
    """torch.compile of a private copy of fn. Compiled code is cached per code object, and this cache skips the
    guards on the model's modules (checking ~100 parameters' metadata cost ~1 ms a step, a third of a decode step
    on 2 cores): safe because one engine serves one model that never changes, and no other engine shares it.
    `cpp_wrapper`: the graph's ~150 kernel calls are made from C++, not from a generated Python function (whose
    views, size asserts and calls were another ~0.9 ms a step)."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
    return torch.compile(own, options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                      "cpp_wrapper": True})


def _mark_dynamic(tokens: torch.Tensor, batch: Batch) -> None:
    """Sizes that change from step to step (batch rows, keys, tokens written) are symbols of the compiled graph
    rather than a reason to recompile. A size of 1 stays static: compilers specialise it anyway. Marking the
    warm-up's inputs is enough: later steps match the symbolic graphs' guards without being marked."""
    for t, dims in ((tokens, (0,)), (batch.positions, (0,)), (batch.slots, (0,)), (batch.visible, (0, 2)),
                    *((w, (0,)) for w in batch.write)):
        for d in dims:
            if t.shape[d] > 1:
                torch._dynamo.mark_dynamic(t, d)


def load_for_inference(path: str | Path, device: str = "auto", expert_dtype: str | None = None,
                       dtype: str = "auto", matmul_dtype: str = "fp32") -> tuple[NanoSeek, Tokenizer]:
    """A run folder (its latest checkpoint) or an HF deepseek_v3 folder with tokenizer files -> model, tokenizer.

    `dtype` ("auto", "fp32", "bf16"): the weights and the math (`--dtype`). auto: bf16 on a GPU with bf16 tensor
    cores (half the memory and bytes a step), fp32 on a CPU, where fp32 mat-vecs are the faster ones (docs/LOG.md).
    `expert_dtype` ("fp32", "bf16", "int8"; default: `dtype`): how the routed experts are stored
    (`--expert-dtype`). Most of a DeepSeekMoE model's parameters are routed experts, and a decode step on CPU costs
    what reading the chosen ones costs: bf16 halves both. With fp32 math, bf16 experts are widened exactly, so the
    model computes what an fp32 model with bf16-rounded experts computes, and a bf16 checkpoint loses nothing. int8
    (CPU only) quarters them, quantized once at load with a scale per row (infer/quant.py); loading holds the
    experts in `dtype` until each layer's are replaced. On CPU in fp32, Linear
    layers decode through the decode kernel or the BLAS with their weights in its faster layout, whichever this
    CPU ran faster when timed at load (infer/layout.py). `matmul_dtype` "bf16" (`--matmul-dtype`, CPU, fp32 math):
    Linear layers and routed experts multiply in bf16 with float32 sums, their weights stored in bf16 and packed
    for the decode kernel (infer/bf16.py): faster where the CPU has AVX512-BF16."""
    from nanoseek.model.hf import load_pretrained
    from nanoseek.train.commands import resolve_model_dir

    folder = resolve_model_dir(Path(path))
    if (folder / "config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise InferenceError(f"{folder} has a model but no tokenizer.json: copy in the tokenizer files it was trained "
                             "with (tokenizer.json, tokenizer_config.json: in the data folder, or a run's tokenizer/)")
    tokenizer = Tokenizer.load(folder)
    dev = pick_device(device)
    dtype = "fp32" if dtype == "auto" and dev.type == "cpu" else pick_dtype(dtype, dev)
    if (dtype, expert_dtype) == ("bf16", "fp32"):
        raise InferenceError("--expert-dtype fp32 with bf16 math would cast the experts to bf16 at every step: use "
                             "--dtype fp32 (fp32 math, optionally over bf16 experts) or leave --expert-dtype out")
    int8 = expert_dtype == "int8"
    bf16_products = matmul_dtype == "bf16"
    if matmul_dtype not in ("fp32", "bf16"):
        raise InferenceError(f"matmul_dtype must be 'fp32' or 'bf16', got {matmul_dtype!r}")
    if bf16_products:
        _check_bf16_products(dev, dtype, expert_dtype)
        expert_dtype = "bf16"  # read straight into bf16 storage: packing then holds no float32 copy of them
    if int8 and dev.type != "cpu":
        raise InferenceError(f"--expert-dtype int8 is for CPUs (its kernels are CPU kernels), not {dev.type}: add "
                             "--device cpu, or use --expert-dtype bf16 on this device")
    if int8 and dtype != "fp32":
        raise InferenceError("--expert-dtype int8 computes in fp32 (its kernel widens the bytes to fp32): use --dtype "
                             "fp32, the default on a CPU")
    if int8 and not kernels.load():
        warnings.warn("--expert-dtype int8 without the decode kernel (see the warning above): torch widens the int8 "
                      "experts at every step, slower than fp32 experts; --expert-dtype bf16 does not need it",
                      stacklevel=2)
    model = load_pretrained(folder, dtype=dtype, device=dev, expert_dtype=None if int8 else expert_dtype)
    if int8:
        quantize_experts(model)
    model.eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise InferenceError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{model.config.vocab_size}: it is not the tokenizer this model was trained with; copy in "
                             "that one")
    eos = generation_eos(folder)
    if eos is not None:  # generation_config.json's end ids replace config.json's for generation (transformers)
        model.config.eos_token_id = eos
    model.name_or_path = Path(path).resolve().name
    if bf16_products:
        linears, experts = use_bf16_products(model)
        model.linear_layout = (f"bf16 products ({'AVX512-BF16' if kernels.bf16_products() else 'emulated'}): "
                               f"{linears} linear layers and {experts} routed-expert modules packed")
    else:
        model.linear_layout = choose_linear_layout(model)  # said by `nanoseek serve` at start-up
        if dev.type == "cpu" and dtype == "fp32" and not int8 and kernels.bf16_products():
            model.linear_layout += ("; this CPU multiplies bf16 in hardware: --matmul-dtype bf16 decodes ~1.5x faster "
                                    "(products rounded to bf16)")
    return model, tokenizer


def _check_bf16_products(dev: torch.device, dtype: str, expert_dtype: str | None) -> None:
    """`--matmul-dtype bf16` is for CPUs, over fp32 activations and bf16 experts, through the decode kernel."""
    if dev.type != "cpu":
        raise InferenceError(f"--matmul-dtype bf16 is for CPUs (its kernels are CPU kernels), not {dev.type}: add "
                             f"--device cpu, or leave it out ({dev.type} multiplies in bf16 with --dtype bf16)")
    if dtype != "fp32":
        raise InferenceError("--matmul-dtype bf16 keeps the activations in fp32 and rounds only the products' inputs: "
                             "use --dtype fp32, the default on a CPU")
    if expert_dtype not in (None, "bf16"):
        raise InferenceError(f"--matmul-dtype bf16 multiplies bf16 experts, not {expert_dtype}: leave --expert-dtype "
                             "out (or --expert-dtype bf16)")
    if not kernels.load():
        raise InferenceError("--matmul-dtype bf16 needs the decode kernel, which could not be built (see the warning "
                             "above): install a C++ compiler, or leave --matmul-dtype out")
    if not kernels.bf16_products():
        warnings.warn("this CPU has no AVX512-BF16: --matmul-dtype bf16 computes its products by widening both factors "
                      "to fp32 (the same products, up to rounding), more slowly than --matmul-dtype fp32", stacklevel=3)


def generation_eos(folder: Path) -> int | list[int] | None:
    """`eos_token_id` of the folder's generation_config.json (HF checkpoints often list several end ids there)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise InferenceError(f"{path} is not a valid JSON object ({e}): fix or delete it") from e
    ok = isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(i, int) for i in eos))
    if eos is not None and not ok:
        raise InferenceError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return eos
