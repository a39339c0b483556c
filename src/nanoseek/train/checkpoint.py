"""Training checkpoints: a folder per step, written atomically, the newest named in `LATEST`.

    RUN_DIR/checkpoints/step_000500/
        config.json, model.safetensors      the model, HF deepseek_v3 layout (from_pretrained / transformers)
        tokenizer.json, tokenizer_config.json (when the run has a tokenizer: the folder serves as is)
        optimizer.safetensors               AdamW moments and step counts, RNG states
        trainer_state.json                  step, tokens, data position, plan, optimizer hyper-parameters
    RUN_DIR/checkpoints/LATEST              "step_000500"

A checkpoint is built in a hidden temporary folder, flushed, renamed into place, and only then named in LATEST
(itself replaced atomically): a crash at any point leaves the previous checkpoint complete and named. No pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nanoseek.io import fsync_dir, write_atomic
from nanoseek.model import NanoSeek
from nanoseek.model.hf import load_pretrained, write_checkpoint

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    tokens: int = 0  # tokens consumed, all ranks
    nonfinite_streak: int = 0
    elapsed: float = 0.0  # seconds of training, across resumes
    total_steps: int = 0  # the plan: fixed at the start (or after calibration, for time-budgeted runs)
    total_tokens: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # the train loader's position (per rank when distributed)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, sd["param_groups"]


def save_checkpoint(run_dir: Path, model: NanoSeek, opt: torch.optim.Optimizer, state: TrainState, keep: int,
                    tokenizer_dir: Path | None = None) -> Path:
    """Write checkpoints/step_{step}, point LATEST at it, delete all but the newest `keep`."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:06d}"
    final = ckpt_root / name
    for stale in ckpt_root.glob(".step_*.tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        write_checkpoint(model, tmp)
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                if (tokenizer_dir / f).is_file():
                    shutil.copy2(tokenizer_dir / f, tmp / f)
        tensors, groups = _optimizer_tensors(opt)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, tmp / OPTIM_FILE)
        meta = {"state": asdict(state), "param_groups": groups,
                "param_names": [n for n, _ in model.named_parameters()]}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))  # written last: marks a complete folder
        fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_atomic(ckpt_root / "LATEST", name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder LATEST names, or (if LATEST is missing or names a broken folder) the newest complete one."""
    root = Path(run_dir) / "checkpoints"
    latest = root / "LATEST"
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def load_checkpoint(ckpt: Path, model: NanoSeek, opt: torch.optim.Optimizer) -> TrainState:
    """Restore model weights (in place, keeping dtype and device), optimizer state and RNG; return the state."""
    meta = json.loads((ckpt / STATE_FILE).read_text())
    names = [n for n, _ in model.named_parameters()]
    if meta["param_names"] != names:
        raise ValueError(f"checkpoint {ckpt} was written for a different model (parameter names differ)")
    saved = load_pretrained(ckpt, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        for (_, dst), src in zip(model.state_dict(keep_vars=True).items(), saved.state_dict().values()):
            dst.copy_(src)
    tensors = load_file(ckpt / OPTIM_FILE)
    device = next(model.parameters()).device
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t.to(device)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return TrainState(**meta["state"])
