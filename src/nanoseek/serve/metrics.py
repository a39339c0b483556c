"""Prometheus metrics of one server app, exposed at `GET /metrics`.

Each app has its own `CollectorRegistry`, so several apps in one process (tests, benchmarks) never share or
clash over counters. Latencies are measured in the server, around the engine's token stream, so they include
queueing and scheduling but not the network.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanoseek.cost.energy import EnergyMeter

# Seconds: from a few ms (a decode step of a small model on a GPU) to minutes (a long answer on a CPU).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """Request, token and latency counters, gauges read from `engine.stats()` at scrape time, and, with an
    `EnergyMeter`, the energy the machine used since the server started and its share per generated token."""

    def __init__(self, engine: Any, energy: EnergyMeter | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nanoseek_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("nanoseek_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "nanoseek_time_to_first_token_seconds", "From a request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "nanoseek_inter_token_latency_seconds", "Between consecutive generated tokens of one request",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram(
            "nanoseek_request_latency_seconds", "From a request's arrival to its last generated token",
            buckets=_LATENCY_BUCKETS, registry=r)

        def stat(key: str) -> Any:
            def read() -> float:
                value = engine.stats()[key]
                return math.nan if value is None else float(value)
            return read

        Gauge("nanoseek_batch_size", "Requests decoding together now", registry=r).set_function(stat("running"))
        Gauge("nanoseek_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(stat("waiting"))
        Gauge("nanoseek_tokens_in_flight", "Cache tokens reserved by running requests (prompt + max_tokens each)",
              registry=r).set_function(stat("tokens_in_flight"))
        Gauge("nanoseek_speculative_acceptance_rate", "Share of MTP draft tokens accepted (NaN without MTP)",
              registry=r).set_function(stat("acceptance_rate"))

        self.energy = energy
        if energy is not None:
            # labelled at each scrape by what that interval was: "measured" (NVML/RAPL) or "estimated", so a meter
            # that falls back to estimates mid-run (codecarbon failing) stops calling its figures measured
            self.energy_kwh = Counter("nanoseek_energy_kwh", "Energy of this machine since the server started "
                                      "(idle time included)", ["source"], registry=r)
            self.energy_per_token = Gauge(
                "nanoseek_energy_per_generated_token_joules", "Energy since the start divided by the tokens "
                "generated since the start (measured only if every interval was)", ["source"], registry=r)
            self._kwh, self._sources = 0.0, set()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; reads the energy meter first (one interval per scrape)."""
        if self.energy is not None:
            reading = self.energy.interval()
            kwh, source = reading["energy_kwh"] or 0.0, reading["energy_source"]
            self.energy_kwh.labels(source=source).inc(kwh)
            self._kwh += kwh
            self._sources.add(source)
            tokens = self.generation_tokens._value.get()
            self.energy_per_token.clear()  # one series, under the label of the whole total
            self.energy_per_token.labels(source="measured" if self._sources == {"measured"} else "estimated").set(
                self._kwh * 3.6e6 / tokens if tokens else math.nan)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
