"""The OpenAI-compatible server on loopback, through the official `openai` client and raw HTTP: chat and
completions (streamed and not), stop, max_tokens, seeds, usage, logprobs, 32 concurrent streams against the same
requests served alone, every error case, metrics, client disconnects, and the `serve` / `chat` commands."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from nanoseek import NanoSeek, preset
from nanoseek.cost.energy import EnergyMeter, Tariff
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, SamplingParams, load_for_inference
from nanoseek.serve.app import create_app
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.train.config import CostConfig
from tests.conftest import ROOT, nanoseek

KEY = "test-key-123"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}  # fixed-length, deterministic answers


@contextlib.contextmanager
def live_server(app, **config) -> Iterator[str]:
    """uvicorn in a thread on a free loopback port (bound before the server starts: no race for the port); `config`:
    more uvicorn.Config settings."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def model_dir(data_dir: Path, tmp_path_factory) -> Path:
    tok = Tokenizer.load(data_dir.parent / "tok")
    out = tmp_path_factory.mktemp("serve") / "tiny-chat"
    torch.manual_seed(0)
    NanoSeek(preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(str(out))
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    model, tok = load_for_inference(model_dir, device="cpu")
    eng = Engine(model, tok, max_batch=8, max_queue=64)
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def tok(engine: Engine) -> Tokenizer:
    return engine.tokenizer


@pytest.fixture(scope="module")
def url(engine: Engine, tok: Tokenizer) -> Iterator[str]:
    meter = EnergyMeter(Tariff.of(CostConfig()), "cpu")
    with live_server(create_app(engine, tok, api_key=KEY, energy=meter)) as base:
        yield base
    meter.close()


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def chat_ids(tok: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def engine_text(engine: Engine, ids: list[int], **params) -> str:
    return "".join(ev.text for ev in engine.generate([ids], SamplingParams(**params))[0])


def scrape(text: str) -> dict[str, float]:
    """/metrics exposition text -> {sample name with labels: value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- the openai client -------------------------------------------------------------------------------------

def test_models_and_health(client, http, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [engine.model_name] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    health = httpx.get(f"{http.base_url}/health").json()  # open without a key, for load balancers
    assert health["status"] == "ok" and health["model"] == "tiny-chat"


def test_chat(client, engine, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, **GREEDY)
    choice = r.choices[0]
    ids = chat_ids(tok, messages)
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == engine_text(engine, ids, max_tokens=12, temperature=0, ignore_eos=True)
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_chat_stream_equals_non_stream(client):
    kw = dict(model="tiny-chat", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16, **GREEDY)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(**kw, stream=True))  # without include_usage: no usage chunk
    assert all(c.choices for c in plain)


def test_completions_stream_and_not(client, engine, tok):
    prompt = "The weather today is"
    ids = [tok.bos_id, *tok.encode(prompt)]
    r = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, **GREEDY)
    assert r.choices[0].text == engine_text(engine, ids, max_tokens=10, temperature=0, ignore_eos=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    chunks = list(client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10
    default = client.completions.create(model="tiny-chat", prompt=prompt, **GREEDY)  # OpenAI's default: 16
    assert default.usage.completion_tokens == 16
    by_ids = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=10, **GREEDY)
    assert by_ids.choices[0].text == r.choices[0].text


@pytest.mark.parametrize("max_tokens", [1, 5, 23])
def test_max_tokens(client, max_tokens):
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Count"}],
                                       max_tokens=max_tokens, **GREEDY)
    assert r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"


def test_stop_strings(client):
    kw = dict(model="tiny-chat", prompt="Once upon a time", max_tokens=24, **GREEDY)
    full = client.completions.create(**kw).choices[0].text
    window = re.search(r"(?<=.{3})[A-Za-z]{2}", full)  # a plain-ASCII piece a few characters in
    assert window, f"no ASCII letters to stop on in {full!r}"
    stop = window.group()
    expected = full[:full.index(stop)]
    for s in (stop, [stop, "zzzzzz"]):
        r = client.completions.create(**kw, stop=s)
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=24, **GREEDY)
    text = chat.choices[0].message.content
    piece = re.search(r"(?<=.{3})[A-Za-z]{2}", text)  # the same through chat (the fixed model's answer has one)
    assert piece, f"no ASCII letters to stop on in {text!r}"
    again = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=24, stop=piece.group(), **GREEDY)
    assert again.choices[0].message.content == text[:text.index(piece.group())]
    assert again.choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    kw = dict(model="tiny-chat", messages=[{"role": "user", "content": "Surprise me"}], max_tokens=16,
              temperature=1.0, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=4321).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or ""
                       for ch in client.chat.completions.create(**kw, seed=1234, stream=True))
    assert a == b == streamed and a != c


def test_top_k_and_top_p_reach_the_engine(client):
    """top_k=1 or a tiny top_p leaves one token to sample: the greedy answer, whatever the temperature and seed.
    Without them the same seed samples something else, so a server that dropped either option would show it."""
    kw = dict(model="tiny-chat", messages=[{"role": "user", "content": "Surprise me"}], max_tokens=8)

    def answer(**options) -> str:
        return client.chat.completions.create(**kw, **options).choices[0].message.content

    greedy = answer(**GREEDY)
    sampled = dict(temperature=1.0, seed=1234)
    assert answer(**sampled, extra_body={"ignore_eos": True}) != greedy
    assert answer(**sampled, extra_body={"ignore_eos": True, "top_k": 1}) == greedy
    assert answer(**sampled, top_p=1e-6, extra_body={"ignore_eos": True}) == greedy


def test_logprobs(client, tok):
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))  # greedy: the top one
    c = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=4, logprobs=2, **GREEDY)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
    assert all(len(alts) <= 2 for alts in lp.top_logprobs) and lp.text_offset[0] == 0
    plain = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=4, **GREEDY)
    assert plain.choices[0].logprobs is None
    # each entry's bytes are its token's own: together they are the answer, even where a token holds part of a
    # character (its "token" text then reads U+FFFD)
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "¿Qué tal? 日本"}],
                                       max_tokens=24, logprobs=True, **GREEDY)
    joined = b"".join(bytes(e.bytes) for e in r.choices[0].logprobs.content)
    assert joined.decode(errors="replace") == r.choices[0].message.content


def test_token_bytes_and_text_offsets_across_split_characters(tok):
    """Tokens that split a UTF-8 character: bytes join to the text; text_offset counts whole characters, from the
    tokens themselves (not from what a stop string let through), checked against the tokenizer's own decode."""
    from nanoseek.infer import TokenEvent
    from nanoseek.serve.app import Server, TextOffsets

    text = "añ 日本語 ok\n\nमराठी 😀!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the small vocabulary splits some characters
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    offsets = TextOffsets(tok)
    got = [offsets(i) for i in ids]
    assert got == [len(tok.decode(ids[:k]).rstrip("\ufffd")) for k in range(len(ids))] and offsets.chars == len(text)
    server = Server.__new__(Server)  # only its tokenizer is needed to render logprobs
    server.tokenizer = tok
    events = [TokenEvent(i, "", -0.5, [(i, -0.5)], None, 1, k + 1) for k, i in enumerate(ids)]
    content = server.chat_logprobs(events)["content"]
    assert bytes(b for e in content for b in e["bytes"]).decode() == text
    assert all(e["top_logprobs"][0]["bytes"] == e["bytes"] for e in content)
    assert server.completion_logprobs(events, TextOffsets(tok))["text_offset"] == got


def test_raw_server_sent_events(http):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_speculative_mtp_server(model_dir, tok, client):
    messages = [{"role": "user", "content": "Speculate, please"}]
    plain = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, **GREEDY)
    model, _ = load_for_inference(model_dir, device="cpu")
    mtp = Engine(model, tok, max_batch=4, speculative="mtp")
    mtp.start()
    try:
        with live_server(create_app(mtp, tok)) as base:
            oa = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            fast = oa.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, **GREEDY)
            assert fast.choices[0].message.content == plain.choices[0].message.content

            def rate() -> float:
                return scrape(httpx.get(f"{base}/metrics").text)["nanoseek_speculative_acceptance_rate"]

            # 12 tokens: one from the prefill, then a draft checked per step, which yields 2 where it was right
            assert 1 + mtp.drafts_proposed + mtp.drafts_accepted == 12
            assert rate() == mtp.stats()["acceptance_rate"] == mtp.drafts_accepted / mtp.drafts_proposed
            # this untrained model's drafts all miss (0 of 11): with counts a trained one would have, the gauge
            # still reads the engine's share
            mtp.drafts_accepted, mtp.drafts_proposed = 3, 8
            assert rate() == 3 / 8
    finally:
        mtp.shutdown()


# ---- under load ----------------------------------------------------------------------------------------------

def test_32_concurrent_streams_equal_served_alone(url, client, engine):
    prompts = [f"Question {i}: what is {i} plus {i * 7 % 13}?" for i in range(32)]

    def request(prompt: str) -> dict:
        return dict(model="tiny-chat", messages=[{"role": "user", "content": prompt}], max_tokens=16, **GREEDY)

    alone = [client.chat.completions.create(**request(p)).choices[0].message.content for p in prompts]
    assert all(alone)

    peak, stop_polling = [0], threading.Event()

    def poll() -> None:
        while not stop_polling.is_set():
            peak[0] = max(peak[0], engine.stats()["running"])
            time.sleep(0.005)

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        parts, finish, usage = [], None, 0
        stream = await aclient.chat.completions.create(**request(prompt), stream=True,
                                                       stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            elif chunk.usage:
                usage = chunk.usage.completion_tokens
        return "".join(parts), finish, usage

    async def all_at_once() -> list[tuple[str, str | None, int]]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        together = asyncio.run(all_at_once())
    finally:
        stop_polling.set()
        poller.join()
    assert peak[0] > 1, "the requests never shared a batch"
    for prompt, expected, (text, finish, usage) in zip(prompts, alone, together):
        assert (text, finish, usage) == (expected, "length", 16), prompt


def test_logprobs_of_ids_past_the_tokenizer(model_dir, tok, tmp_path):
    """A checkpoint's vocabulary padded past its tokenizer's (as DeepSeek-V3's is): an id with no token is text ""
    with no bytes in logprobs, not a 500. The head is set so that greedy decoding picks such ids."""
    torch.manual_seed(0)
    model = NanoSeek(preset("tiny", vocab_size=tok.vocab_size + 8)).eval()
    with torch.no_grad():
        head = model.lm_head.weight
        v = torch.randn(head.shape[1])
        head.zero_()
        head[tok.vocab_size:] = torch.stack([v, -v] * 4)  # one of each pair scores above every real token's 0
    eng = Engine(model, tok, max_batch=2, model_name="padded")
    eng.start()
    greedy = {"model": "padded", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    try:
        with live_server(create_app(eng, tok)) as base, httpx.Client(base_url=base, timeout=60) as c:
            r = c.post("/v1/chat/completions", json={**greedy, "messages": [{"role": "user", "content": "Hi"}],
                                                     "logprobs": True, "top_logprobs": 2})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["message"]["content"] == ""
            for entry in choice["logprobs"]["content"]:
                assert entry["token"] == "" and entry["bytes"] == []
                assert all(alt["bytes"] == [] for alt in entry["top_logprobs"])
            r = c.post("/v1/completions", json={**greedy, "prompt": "Hi", "logprobs": 2})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["logprobs"]["text_offset"] == [0, 0, 0]
    finally:
        eng.shutdown()


def test_queue_full_is_429(model_dir, tok):
    model, _ = load_for_inference(model_dir, device="cpu")
    small = Engine(model, tok, max_batch=1, max_queue=1, queue_policy="reject")
    small.start()
    try:
        with live_server(create_app(small, tok)) as base:
            body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 64, "ignore_eos": True}

            async def burst() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                    return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))

            answers = asyncio.run(burst())
            statuses = sorted(r.status_code for r in answers)
            assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
            busy = next(r for r in answers if r.status_code == 429)
            assert_error(busy, 429, code="queue_full")
            assert busy.json()["error"]["type"] == "rate_limit_error" and busy.headers["retry-after"]

            async def openai_burst() -> list:
                async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as oa:
                    return await asyncio.gather(*(oa.completions.create(model="tiny-chat", prompt="Hello",
                                                                        max_tokens=64, extra_body={"ignore_eos": True})
                                                  for _ in range(6)), return_exceptions=True)

            kinds = {type(r).__name__ for r in asyncio.run(openai_burst())}
            assert kinds == {"Completion", "RateLimitError"}, kinds
            assert httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": 2}, timeout=60).status_code == 200
    finally:
        small.shutdown()


def test_requests_the_engine_drops_at_shutdown_get_503(model_dir, tok):
    """An engine that stops under a request is the server's state, not a bad request: 503 for one still waiting,
    a 503 error event for one already streaming."""
    model, _ = load_for_inference(model_dir, device="cpu")
    small = Engine(model, tok, max_batch=1, queue_policy="wait")
    gate = threading.Event()  # holds the first decode step until shutdown has been asked for
    decode = small._decode
    small._decode = lambda: (gate.wait(), decode())  # type: ignore[method-assign]
    small.start()
    try:
        with (live_server(create_app(small, tok)) as base, httpx.Client(base_url=base, timeout=60) as c,
              concurrent.futures.ThreadPoolExecutor(1) as pool):
            body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True}
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as streaming:
                lines = streaming.iter_lines()  # headers come after its prefill: it holds the only slot (its
                assert small.stats()["running"] == 1  # first token's text may be held back: no line to wait for)
                waiting = pool.submit(c.post, "/v1/completions", json=body)
                while small.stats()["waiting"] == 0:
                    time.sleep(0.01)
                threading.Timer(0.05, gate.set).start()
                small.shutdown()
                events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert events[-1]["error"]["code"] == "unavailable" and "shut down" in events[-1]["error"]["message"]
            assert assert_error(waiting.result(), 503, code="unavailable")["type"] == "server_error"
    finally:
        gate.set()
        small.shutdown()


def test_a_failed_step_answers_500_and_keeps_the_connection(model_dir, tok):
    """A decode step that raises (out of memory, a bug) fails the requests in it: a 500 OpenAI error body, or an
    error event once streaming, and nothing more. The engine serves on, and so does the client's keep-alive
    connection (an error left unhandled made uvicorn close it under the client's next request)."""
    model, _ = load_for_inference(model_dir, device="cpu")
    small = Engine(model, tok, max_batch=2)
    real, fail = small._decode_step, [0]

    def flaky(*args):
        if fail[0]:
            fail[0] -= 1
            raise RuntimeError("simulated step failure")
        return real(*args)

    small._decode_step = flaky
    small.start()
    try:
        with live_server(create_app(small, tok)) as base, httpx.Client(base_url=base, timeout=60) as c:
            body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
            for _ in range(4):
                fail[0] = 1
                err = assert_error(c.post("/v1/completions", json=body), 500, code="generation_failed")
                assert "simulated step failure" in err["message"] and err["type"] == "server_error"
                assert c.post("/v1/completions", json=body).status_code == 200  # on the same connection
            fail[0] = 1
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert r.status_code == 200 and events[-1]["error"]["code"] == "generation_failed"
            assert c.post("/v1/completions", json=body).status_code == 200
            assert small.stats()["running"] == 0
    finally:
        small.shutdown()


def wait_idle(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while engine.stats()["running"] or engine.stats()["waiting"]:
        assert time.monotonic() < deadline, f"a gone client still holds the engine: {engine.stats()}"
        time.sleep(0.05)


def test_client_disconnect_frees_the_slot(http, engine, monkeypatch):
    body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")  # generating; now hang up mid-stream
    wait_idle(engine)
    # not streamed: the client gives up waiting for the whole answer, which the decode steps, held back, cannot
    # finish first (400 tokens of the tiny model took less than the client's 0.5 s on a fast machine)
    gate, decode = threading.Event(), engine._decode
    monkeypatch.setattr(engine, "_decode", lambda: (gate.wait(), decode())[1])
    try:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=0.5)
    finally:
        gate.set()
    wait_idle(engine)


def test_asyncio_and_h11_serve_the_same(engine, tok):
    """Without uvloop and httptools (Windows, PyPy) uvicorn runs on asyncio's own loop and h11: the same answer
    streamed or not, and a client that hangs up mid-stream still frees its slot."""
    with (live_server(create_app(engine, tok), loop="asyncio", http="h11") as base,
          httpx.Client(base_url=base, timeout=60) as c):
        body = {"model": "tiny-chat", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "temperature": 0}
        whole = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == whole
        with c.stream("POST", "/v1/completions", json={**body, "max_tokens": 400, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")  # generating; now hang up
        wait_idle(engine)


# ---- errors: right status, OpenAI body, and the server keeps serving -----------------------------------------

def test_error_cases(url, http, client):
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert_error(http.post("/v1/chat/completions", json={**chat, "model": "gpt-9"}), 404, "model",
                 "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert_error(http.get("/v1/models/gpt-9"), 404, "model")
    assert_error(http.post("/v1/chat/completions", json={**chat, "messages": []}), 400, "messages")
    for field, value in [("messages", "hi"), ("max_tokens", "ten"), ("temperature", "hot"), ("stream", "yes"),
                         ("messages", [{"role": "robot", "content": "hi"}]), ("messages", [{"role": "user"}]),
                         ("stop", [""]), ("max_tokens", 0), ("temperature", 3), ("seed", -1), ("top_p", 0),
                         ("stop", ["x"] * 17), ("stop", "x" * 257),
                         ("messages", [{"role": "user", "content": "a lone surrogate \ud800"}])]:
        body = json.dumps({**chat, field: value}).encode()  # ASCII escapes: a lone surrogate travels as \ud800
        err = assert_error(http.post("/v1/chat/completions", content=body,
                                     headers={"Content-Type": "application/json"}), 400)
        assert err["param"].startswith(field), (field, value, err)
    assert_error(http.post("/v1/chat/completions", json={"messages": chat["messages"]}), 400, "model")
    assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    assert_error(http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
                 400)
    # `curl -d` without -H sends a form: say what the body must be, not that a field is wrong
    err = assert_error(http.post("/v1/completions", content=json.dumps({"model": "tiny-chat", "prompt": "hi"}),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"}), 400)
    assert "must be JSON sent with 'Content-Type: application/json'" in err["message"], err
    assert_error(http.post("/v1/completions", content=json.dumps({"model": "tiny-chat", "prompt": "hi", "top_p": 2}),
                           headers={"Content-Type": "application/vnd.api+json"}), 400, "top_p")  # JSON all the same
    err = assert_error(http.post("/v1/chat/completions", json={**chat, "max_tokens": 100_000}), 400, "max_tokens",
                       "context_length_exceeded")
    assert "512" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=600)
    assert_error(http.post("/v1/completions", json={"model": "tiny-chat", "prompt": "word " * 600}), 400, "prompt",
                 "context_length_exceeded")
    assert_error(http.post("/v1/completions", json={"model": "tiny-chat", "prompt": [5, 99999]}), 400, "prompt")
    # no max_tokens and a prompt that leaves fewer than OpenAI's default 16: what is left, not an error about 16
    short = http.post("/v1/completions", json={"model": "tiny-chat", "prompt": [5] * 508, "temperature": 0,
                                               "ignore_eos": True}).json()
    assert short["usage"]["completion_tokens"] == 4 and short["choices"][0]["finish_reason"] == "length"
    assert_error(http.post("/v1/completions", content=json.dumps({"model": "tiny-chat", "prompt": "\ud800"}).encode(),
                           headers={"Content-Type": "application/json"}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"model": "tiny-chat", "prompt": ["a", "b"]}), 400, "prompt")
    assert_error(http.post("/v1/chat/completions", json={**chat, "n": 2}), 400, "n")
    assert_error(http.post("/v1/chat/completions", json={**chat, "tools": [{"type": "function"}]}), 400, "tools")
    assert_error(http.post("/v1/chat/completions", json={**chat, "stream_options": {"include_usage": True}}), 400,
                 "stream_options")
    assert_error(http.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 400, "top_logprobs")
    # oversized bodies: by Content-Length, and counted when sent chunked without one
    big = json.dumps({**chat, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    assert_error(http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}), 413,
                 code="request_too_large")
    chunked = http.post("/v1/chat/completions", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                        headers={"Content-Type": "application/json"})
    assert_error(chunked, 413, code="request_too_large")
    # routing and auth
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)
    assert_error(httpx.post(f"{url}/v1/chat/completions", json=chat), 401, code="missing_api_key")
    bad = httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"})
    assert_error(bad, 401, code="invalid_api_key")
    assert bad.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    # a client that hangs up halfway through sending its body: counted as 499 (gone), not as a server error
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": \"tiny".encode())
    gone = 'nanoseek_requests_total{endpoint="/v1/completions",status="499"}'
    deadline = time.monotonic() + 10
    while gone not in http.get("/metrics").text:
        assert time.monotonic() < deadline, "the aborted upload was not counted as 499"
        time.sleep(0.05)
    # still serving, and nothing above was a server error
    assert client.chat.completions.create(model="tiny-chat", messages=chat["messages"], max_tokens=3).choices
    metrics = http.get("/metrics").text
    assert not re.search(r'nanoseek_requests_total\{[^}]*status="5\d\d"', metrics)


def test_model_without_chat_template(model_dir, engine, tmp_path):
    base = Tokenizer.load(model_dir)
    Tokenizer(base.hf, chat_template=None).save(tmp_path)  # as a base model ships: no template anywhere
    tok = Tokenizer.load(tmp_path)
    assert tok.chat_template is None
    with live_server(create_app(engine, tok)) as base_url:
        r = httpx.post(f"{base_url}/v1/chat/completions", timeout=30,
                       json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]})
        err = assert_error(r, 400, "messages", "no_chat_template")
        assert "chat template" in err["message"] and "/v1/completions" in err["message"]
        ok = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 2},
                        timeout=30)
        assert ok.status_code == 200


# ---- metrics and the page -------------------------------------------------------------------------------------

def test_metrics(url, http, client, tok):
    messages = [{"role": "user", "content": "m"}]
    before = scrape(http.get("/metrics").text)
    list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4, stream=True, **GREEDY))
    assert_error(httpx.get(f"{url}/metrics"), 401)  # the key guards metrics too
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = scrape(r.text)
    assert values['nanoseek_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    # that one request, exactly: its prompt, its 4 tokens, one first token and 3 gaps between tokens
    want = {"nanoseek_prompt_tokens_total": len(chat_ids(tok, messages)), "nanoseek_generation_tokens_total": 4,
            "nanoseek_time_to_first_token_seconds_count": 1, "nanoseek_inter_token_latency_seconds_count": 3,
            "nanoseek_request_latency_seconds_count": 1}
    assert {name: values[name] - before[name] for name in want} == want
    assert values["nanoseek_batch_size"] == 0 and values["nanoseek_queue_depth"] == 0
    # energy per generated token: this VM has no readable RAPL counters, so codecarbon's estimate, labelled so
    energy = {k: v for k, v in values.items() if k.startswith("nanoseek_energy")}
    source = "measured" if 'nanoseek_energy_kwh_total{source="measured"}' in energy else "estimated"
    kwh = energy[f'nanoseek_energy_kwh_total{{source="{source}"}}']
    per_token = energy[f'nanoseek_energy_per_generated_token_joules{{source="{source}"}}']
    assert kwh > 0 and per_token == pytest.approx(kwh * 3.6e6 / values["nanoseek_generation_tokens_total"])


def test_energy_metrics_say_estimated_once_the_meter_falls_back():
    """A meter that measured, then fell back to estimates (codecarbon failing): each interval keeps its label, and
    the per-token figure, made of both, is no longer called measured."""
    readings = iter([("measured", 1e-6), ("estimated", 2e-6)])

    class Meter:
        def interval(self) -> dict:
            source, kwh = next(readings)
            return {"energy_kwh": kwh, "energy_source": source}

    class Idle:
        def stats(self) -> dict:
            return {"running": 0, "waiting": 0, "tokens_in_flight": 0, "acceptance_rate": None}

    metrics = ServerMetrics(Idle(), Meter())  # type: ignore[arg-type]
    metrics.generation_tokens.inc(10)
    first = scrape(metrics.render()[0].decode())
    assert first['nanoseek_energy_kwh_total{source="measured"}'] == pytest.approx(1e-6)
    assert first['nanoseek_energy_per_generated_token_joules{source="measured"}'] == pytest.approx(0.36)
    second = scrape(metrics.render()[0].decode())
    assert second['nanoseek_energy_kwh_total{source="measured"}'] == pytest.approx(1e-6)
    assert second['nanoseek_energy_kwh_total{source="estimated"}'] == pytest.approx(2e-6)
    per_token = {k: v for k, v in second.items() if k.startswith("nanoseek_energy_per_generated_token")}
    assert per_token == {'nanoseek_energy_per_generated_token_joules{source="estimated"}': pytest.approx(1.08)}


def test_chat_page_is_self_contained(url):
    r = httpx.get(f"{url}/")  # open: the page itself asks for the key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "getReader" in r.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text), "the page must not load anything remote"


# ---- the commands ---------------------------------------------------------------------------------------------

def test_serve_command(model_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "NANOSEEK_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(model_dir), "--port", str(port),
                             "--device", "cpu", "--max-batch", "4", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "nanoseek serve did not come up"
            time.sleep(0.2)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        oa = openai.OpenAI(base_url=f"{base}/v1", api_key="env-key", max_retries=0)
        assert oa.completions.create(model="tiny-chat", prompt="hi", max_tokens=3).usage.completion_tokens >= 1
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out and "with an API key" in out
    threads = torch.get_num_threads()  # the default: torch's, one per core
    assert f"{threads} model thread{'s' * (threads > 1)}" in out, out


def test_serve_bounds_the_wait_for_answers_in_flight_at_shutdown(model_dir, monkeypatch):
    """uvicorn waits for every answer in flight before it exits, however long (a CPU answer can take minutes, more
    than a service manager's grace period): --shutdown-timeout bounds it, 30 s unless told."""
    from nanoseek.cli import main

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(kw["timeout_graceful_shutdown"]))
    monkeypatch.setattr("signal.signal", lambda *args: None)  # serve's SIGTERM handler: not for this process
    for flags in ([], ["--shutdown-timeout", "2.5"]):
        assert main(["serve", str(model_dir), "--device", "cpu", "--no-energy", *flags]) == 0
    assert seen == [30.0, 2.5]


def test_serve_and_chat_refuse_bad_flags_before_loading(model_dir, capsys):
    from nanoseek.cli import main

    for command, flags, said in [
            ("serve", ["--threads", "0"], "--threads must be at least 1"),
            ("serve", ["--port", "70000"], "--port must be in 1-65535, got 70000"),
            ("serve", ["--max-queue", "-1"], "--max-queue (-1) at least 0"),  # -1 would answer 429 to all
            ("serve", ["--shutdown-timeout", "-1"], "--shutdown-timeout must be at least 0 seconds, got -1.0"),
            ("chat", ["--top-p", "2"], "top_p must be in (0, 1], got 2.0")]:  # before a line is typed
        assert main([command, str(model_dir), *flags]) == 2, flags
        out = capsys.readouterr()
        assert said in " ".join((out.out + out.err).split()), flags


def test_chat_command_keeps_the_conversation(model_dir, tok, monkeypatch, capsys):
    """In process, to see each turn's prompt: the system prompt, then every earlier exchange with the answer the
    model gave, then the new line; /reset forgets the exchanges (not the system prompt)."""
    from nanoseek.cli import main
    from nanoseek.serve import commands

    lines = iter(["Hello there", "And again", "/reset", "Once more", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    turns: list[tuple[list[int], str]] = []  # (prompt ids, answer) of each turn
    answer = commands._answer

    async def recorded(engine, ids, params):
        turns.append((ids, await answer(engine, ids, params)))
        return turns[-1][1]

    monkeypatch.setattr(commands, "_answer", recorded)
    assert main(["chat", str(model_dir), "--max-tokens", "3", "--temperature", "0", "--device", "cpu",
                 "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 3 and "(conversation cleared)" in out
    system, (first, second, third) = {"role": "system", "content": "Be brief."}, turns
    assert first[0] == chat_ids(tok, [system, {"role": "user", "content": "Hello there"}])
    assert second[0] == chat_ids(tok, [system, {"role": "user", "content": "Hello there"},
                                       {"role": "assistant", "content": first[1]},
                                       {"role": "user", "content": "And again"}])
    assert third[0] == chat_ids(tok, [system, {"role": "user", "content": "Once more"}])


def test_chat_command(model_dir, tmp_path):
    # a line in another encoding (Latin-1 "café") is skipped with the reason; the conversation goes on
    r = subprocess.run([sys.executable, "-m", "nanoseek", "chat", str(model_dir), "--max-tokens", "4", "--device",
                        "cpu"], input=b"caf\xe9\nHello\n/exit\n", capture_output=True, timeout=120, cwd=ROOT)
    out = r.stdout.decode()
    assert r.returncode == 0 and "that line is skipped" in out and out.count("model> ") == 1, out + r.stderr.decode()
    base = Tokenizer.load(model_dir)
    plain = tmp_path / "base-model"
    NanoSeek(preset("tiny", vocab_size=base.vocab_size)).save_pretrained(str(plain))
    Tokenizer(base.hf, chat_template=None).save(plain)
    r = nanoseek("chat", str(plain), "--device", "cpu", input="hi\n", timeout=120)
    assert r.returncode == 2 and "no chat template" in r.stdout + r.stderr


def test_the_loader_keeps_the_layout_the_timing_chose(monkeypatch, model_dir):
    """load_for_inference takes the decode kernel where the timing says one call of 1 and one of 16 rows, added
    together, are faster than with the BLAS in either layout, else transposes exactly when that is clearly faster at
    one row, and says which it did."""
    from torch import nn

    from nanoseek.infer import kernels, layout

    def timed(kernel: float, transposed: float) -> dict[str, float]:  # totals; one row alone takes half
        t = {"stored": 2.0, "transposed": transposed, "kernel": kernel}
        return {**t, **{f"{name}@1": v / 2 for name, v in t.items()}}

    cases = [(timed(3.0, 1.0), "transposed"), (timed(3.0, 1.9), "stored"), (timed(1.0, 1.5), "kernel")]
    for t, want in cases[:3 if kernels.load() else 2]:
        monkeypatch.setattr(layout, "timings", lambda *shape, t=t: t)
        model, _ = load_for_inference(model_dir)
        assert model.lm_head.weight.is_contiguous() == (want != "transposed")
        assert (type(model.lm_head) is layout.KernelLinear) == (want == "kernel")
        left = [name for name, m in model.named_modules()  # kv_b_proj: read as stored; widths it cannot take
                if type(m) is nn.Linear and not name.endswith("kv_b_proj") and kernels.covers_linear(m.weight)]
        assert want != "kernel" or left == []
        assert {"transposed": "stored transposed", "stored": "as stored", "kernel": "decode kernel"}[want] in \
            model.linear_layout
