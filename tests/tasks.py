"""Synthetic tasks for training tests: deterministic, resumable batch sources."""

from __future__ import annotations

import torch

BOS, EOS, SEP, FIRST_SYMBOL = 0, 1, 2, 3


class ReverseTask:
    """[BOS a1..an SEP an..a1 EOS]: only the reversed part and EOS are scored (labels -100 elsewhere).
    Batch i depends on (seed, i) only, so a restored cursor replays the same stream."""

    def __init__(self, n: int = 6, symbols: int = 10, seed: int = 0):
        self.n, self.symbols, self.seed, self.cursor = n, symbols, seed, 0

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.symbols

    @property
    def seq_len(self) -> int:
        return 2 * self.n + 2

    def sequences(self, count: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + self.symbols, (count, self.n), generator=g)
        col = lambda v: torch.full((count, 1), v)
        return torch.cat((col(BOS), a, col(SEP), a.flip(1), col(EOS)), dim=1)

    def batch(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = seqs[:, :-1], seqs[:, 1:].clone()
        y[:, : self.n] = -100  # the symbols and SEP are given, not predicted
        return x, y

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = self.sequences(batch_size, self.seed * 1_000_003 + self.cursor)
        self.cursor += 1
        return self.batch(seqs)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]

    def exact_match(self, model, count: int = 200, seed: int = 12345) -> float:
        seqs = self.sequences(count, seed)
        prompt = seqs[:, : self.n + 2]  # BOS a1..an SEP
        out = prompt
        with torch.no_grad():  # greedy by re-running the whole sequence: the plain reference decoder
            for _ in range(self.n):
                out = torch.cat((out, model(out)[:, -1].argmax(-1, keepdim=True)), dim=1)
        return (out[:, self.n + 2:] == seqs[:, self.n + 2: 2 * self.n + 2]).all(dim=1).float().mean().item()
