"""Training and validation batches from a prepared split: deterministic, resumable and rank-aware.

The token stream is cut into windows of seq_len + 1 tokens with stride seq_len (window i starts at i * seq_len):
inputs are a window's first seq_len tokens, labels its last seq_len. An epoch visits every window once, in a
permutation seeded by (seed, epoch). All ranks walk the same global order; a step of batch size B on W ranks
takes the next B * W windows and rank r keeps block r. The position is two integers (epoch, cursor), so a
resumed run -- with a different batch size or number of ranks, even -- continues exactly where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.data.shards import TokenStream
from nanoseek.data.tokenizer import DataError


def _stream(data: str | Path | TokenStream, split: str) -> TokenStream:
    return data if isinstance(data, TokenStream) else TokenStream(data, split)


def _windows(stream: TokenStream, seq_len: int) -> int:
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be >= 1")
    n = (len(stream) - 1) // seq_len if len(stream) else 0
    if n < 1:
        raise DataError(f"the {stream.split!r} split of {stream.data_dir} has {len(stream):,} tokens; one window "
                        f"of seq_len={seq_len} needs {seq_len + 1:,}: add data or lower seq_len")
    return n


def _stack(stream: TokenStream, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(np.stack([stream[int(s): int(s) + seq_len + 1] for s in starts]).astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class Batches:
    """`next(batch_size)` -> (inputs, labels), int64 [batch_size, seq_len], this rank's share of the next step."""

    def __init__(self, data: str | Path | TokenStream, split: str = "train", *, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.stream = _stream(data, split)
        self.seq_len, self.seed, self.rank, self.world_size, self.shuffle = seq_len, seed, rank, world_size, shuffle
        self.windows_per_epoch = _windows(self.stream, seq_len)
        self.epoch, self.cursor = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, window order) of the current epoch

    def order(self, epoch: int) -> np.ndarray:
        """Window indices in the order `epoch` visits them."""
        if self._order is None or self._order[0] != epoch:
            n = self.windows_per_epoch
            perm = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = batch_size * self.world_size
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if step > self.windows_per_epoch:
            raise DataError(f"a step of {batch_size} x {self.world_size} ranks needs {step} windows but the "
                            f"{self.stream.split!r} split has {self.windows_per_epoch} of seq_len={self.seq_len}: "
                            "add data, or lower the batch size or seq_len")
        if self.cursor + step > self.windows_per_epoch:  # the rest of this epoch is too short: no partial batches
            self.epoch, self.cursor = self.epoch + 1, 0
        lo = self.cursor + self.rank * batch_size
        windows = self.order(self.epoch)[lo: lo + batch_size]
        self.cursor += step
        return _stack(self.stream, windows * self.seq_len, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        """The position, and what it counts in: the same (epoch, cursor) under another seq_len, seed or data would
        be other windows."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seq_len": self.seq_len, "seed": self.seed,
                "windows": self.windows_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = {"seq_len": self.seq_len, "seed": self.seed, "windows": self.windows_per_epoch}
        changed = [k for k in now if k in state and int(state[k]) != now[k]]  # older states hold only the position
        if changed:
            names = {"seq_len": "data.seq_len", "seed": "train.seed", "windows": "windows per epoch"}
            was = ", ".join(f"{names[k]}={state[k]}" for k in changed)
            is_ = ", ".join(f"{names[k]}={now[k]}" for k in changed)
            raise DataError(f"the run's place in its data was saved with {was}, and this resume has {is_}: the same "
                            "place would be other windows, so data would be repeated or skipped. Resume with the "
                            "run's settings (and its data.path, as prepared then), or start a new run")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.windows_per_epoch:
            raise DataError(f"loader state epoch={epoch}, cursor={cursor} does not fit this data "
                            f"({self.windows_per_epoch} windows per epoch): was the data prepared again?")
        self.epoch, self.cursor = epoch, cursor


def eval_batches(data: str | Path | TokenStream, split: str = "val", *, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The split's first windows in order, in batches (the last one may be smaller): a fixed evaluation set."""
    stream = _stream(data, split)
    n = _windows(stream, seq_len)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    starts = np.arange(n) * seq_len
    return [_stack(stream, starts[i: i + batch_size], seq_len) for i in range(0, n, batch_size)]
