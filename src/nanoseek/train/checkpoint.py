"""Training checkpoints: a folder per step, written atomically, the newest named in `LATEST`.

    RUN_DIR/checkpoints/step_000500/
        state/                              model + AdamW state, torch.distributed.checkpoint in safetensors files:
                                            sharded as the ranks held it, readable by any number of ranks
        rng-{rank}.safetensors              each rank's RNG
        trainer_state.json                  step, tokens, data position, plan, optimizer hyper-parameters
        config.json, model*.safetensors     the model in the HF deepseek_v3 layout (single-process runs, and the
        tokenizer.json, ...                 final checkpoint of distributed runs; `nanoseek export` for any other)
    RUN_DIR/checkpoints/LATEST              "step_000500"

All ranks write into one hidden temporary folder; rank 0 renames it into place and only then names it in LATEST
(itself replaced atomically): a crash or a dead rank at any point leaves the previous checkpoint complete and
named. Nothing is pickled: the distributed checkpoint uses torch's safetensors storage.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from nanoseek.io import fsync_dir, replace_dir, usual_mode, write_atomic
from nanoseek.model import NanoSeek
from nanoseek.model.hf import TOKENIZER_FILES, CheckpointError, write_checkpoint

STATE_FILE = "trainer_state.json"
STATE_DIR = "state"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    tokens: int = 0  # tokens consumed, all ranks
    nonfinite_streak: int = 0
    elapsed: float = 0.0  # seconds of training steps (not evaluations or checkpoints), across resumes
    total_steps: int = 0  # the plan: fixed at the start (or after calibration, for time-budgeted runs)
    total_tokens: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # the train loader's (global) position
    # a time-budgeted run's plan: the train.max_time it was made for and the time per token it assumed (0: none)
    planned_max_time: float = 0.0
    seconds_per_token: float = 0.0
    replan_step: int = 0  # where the plan is checked against the time the steps took since it was made (0: never)
    world_size: int = 1
    last_eval_step: int = -1  # the step of the latest evaluation logged (-1: none)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _twins(msd: dict[str, Any]) -> dict[str, str]:
    """{key: the earlier key whose tensor it is}: tied weights (`tie_word_embeddings`: lm_head.weight is the
    embedding), which safetensors refuses to store twice. Stored once, restored from the twin."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    twins = {}
    for k, v in msd.items():
        t = v.to_local() if isinstance(v, DTensor) else v
        if isinstance(t, torch.Tensor) and t.numel():
            where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            twins.update({k: first[where]} if where in first else {})
            first.setdefault(where, k)
    return twins


def _model_flat(msd: dict[str, Any]) -> dict[str, Any]:
    twins = _twins(msd)
    return {f"model.{k}": v for k, v in msd.items() if k not in twins}


def _model_restored(msd: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    twins = _twins(msd)
    return {k: flat[f"model.{twins.get(k, k)}"] for k in msd}


def _flat(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The model and optimizer state as one flat {name: tensor} dict (what the safetensors storage holds)."""
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, opt)
    flat = _model_flat(msd)
    flat.update({f"optim.{k}.{kk}": v for k, s in osd["state"].items() for kk, v in s.items()})
    return flat, msd, osd


def save_checkpoint(run_dir: Path, module: NanoSeek, model: nn.Module, opt: torch.optim.Optimizer,
                    state: TrainState, keep: int, tokenizer_dir: Path | None = None,
                    export: bool | None = None) -> Path:
    """Write checkpoints/step_{step} from every rank, point LATEST at it, keep the newest `keep`.
    `module` is the bare model, `model` what training calls (DDP/FSDP-wrapped or the same). `export` writes the
    HF-layout model too (default: in single-process runs)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{state.step:06d}"
    final, tmp, aside = ckpt_root / name, ckpt_root / f".{name}.tmp", ckpt_root / f".{name}.old"
    rank = _rank()
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".step_*.tmp*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        newest = max((_step_of(p) for p in ckpt_root.glob("step_*") if (p / STATE_FILE).is_file()), default=-1)
        for stale in ckpt_root.glob(".step_*.old"):  # a replaced copy, once a complete one is as new
            if _step_of(stale) <= newest:
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        flat, _, osd = _flat(model, opt)
        _single_process_quiet(dcp.save, flat, storage_writer=HuggingFaceStorageWriter(
            str(tmp / STATE_DIR), save_distributed=_distributed()), no_dist=not _distributed())
        save_file(_rng_state(), tmp / f"rng-{rank}.safetensors")
        usual_mode(tmp / f"rng-{rank}.safetensors")
        if export if export is not None else not _distributed():
            _export(module, model, tmp, tokenizer_dir)
        if rank == 0:
            meta = {"state": asdict(state), "param_groups": osd["param_groups"],
                    "param_names": [n for n, _ in module.named_parameters()]}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))  # written last: marks a complete folder
        fsync_dir(tmp)  # this rank's files (on a multi-node run, only their own node can make them durable)
        _barrier()
        if rank == 0:
            fsync_dir(tmp)  # every rank's files are written now (sharded state, RNG states, the export)
            # the same step saved twice (a signal right after a periodic save, a resumed finished run): the old
            # copy waits as `aside`, which latest_checkpoint falls back to, until the new one is in place
            replace_dir(tmp, final, aside)
            write_atomic(ckpt_root / "LATEST", name + "\n")
            # the newest `keep`, this one always among them: a higher-numbered folder can be left from a run that
            # died before LATEST named it, and must not make this save prune itself
            old = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir() and p != final), key=_step_of)
            for p in old[:max(0, len(old) - keep + 1)] if keep > 0 else []:
                shutil.rmtree(p, ignore_errors=True)
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    return final


def _export(module: NanoSeek, model: nn.Module, folder: Path, tokenizer_dir: Path | None) -> None:
    """The HF layout into `folder`: gathered to rank 0 when the weights are sharded."""
    if _distributed():
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if _rank() != 0:
            return
        with torch.device("meta"):
            bare = NanoSeek(module.config)
        bare.to_empty(device="cpu")
        bare.tie_weights()
        bare.load_state_dict(full)
        module = bare
    write_checkpoint(module, folder)
    if tokenizer_dir is not None:
        copy_tokenizer([tokenizer_dir], folder, module.config.max_position_embeddings)


def copy_tokenizer(sources: list[Path], folder: Path, context: int) -> None:
    """The tokenizer files next to the weights (each from the first of `sources` that has it), with
    `model_max_length` set to the model's context: transformers truncates and warns by that number."""
    for f in TOKENIZER_FILES:
        src = next((d / f for d in sources if (d / f).is_file()), None)
        if src is not None:
            shutil.copy2(src, folder / f)
    path = folder / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.get("model_max_length") != context:
            config["model_max_length"] = context
            write_atomic(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's generators: the CPU's and, once CUDA is in use, its current GPU's (dropout masks drawn there;
    torchrun ranks set their own GPU as the current one)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():  # a CPU run resumed on a GPU keeps the GPU's fresh seed
        torch.cuda.set_rng_state(state["cuda"])


def _single_process_quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """dcp.save/load, without the warning torch gives for a single process even when no_dist=True says so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        return fn(*args, **kwargs)


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json (step, data position, parameter names)."""
    try:
        meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} is damaged ({e}): move {ckpt.name} out of {ckpt.parent} to use "
                              "the newest checkpoint before it") from e
    if not isinstance(meta, dict) or not {"param_names", "state"} <= set(meta):
        raise CheckpointError(f"{ckpt / STATE_FILE} is not a nanoseek trainer state: move {ckpt.name} out of "
                              f"{ckpt.parent} to use the newest checkpoint before it")
    return meta


def _load_sharded_state(flat: dict[str, Any], ckpt: Path, no_dist: bool) -> None:
    """Fill `flat` from the checkpoint's sharded state, or say which checkpoint is damaged and what to do."""
    try:
        _single_process_quiet(dcp.load, flat, storage_reader=HuggingFaceStorageReader(str(ckpt / STATE_DIR)),
                              no_dist=no_dist)
    except (dist.DistError, torch.OutOfMemoryError):  # a lost rank or too little memory: not the files' fault
        raise
    except (CheckpointException, RuntimeError, SafetensorError, OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt} cannot be read ({why}): its files are damaged or incomplete. "
                              f"Move it out of {ckpt.parent} to use the newest one before it") from e


def _step_of(folder: Path) -> int:
    """step_000500 (or its copy set aside, .step_000500.old) -> 500: by number, since step 1,000,000 has more
    digits than the name's zero padding."""
    digits = folder.name.removeprefix(".").removeprefix("step_").removesuffix(".old")
    return int(digits) if digits.isdigit() else -1


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of a run's complete checkpoints, in order."""
    return sorted(_step_of(p) for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder LATEST names, or (if LATEST is missing or names a broken folder) the newest complete one."""
    root = Path(run_dir) / "checkpoints"
    latest = root / "LATEST"
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    # a copy set aside by a re-save that died before its successor was in place counts too (after its successor)
    folders = [*root.glob(".step_*.old"), *root.glob("step_*")]
    complete = sorted((p for p in folders if (p / STATE_FILE).is_file()), key=_step_of)
    return complete[-1] if complete else None


def load_checkpoint(ckpt: Path, module: NanoSeek, model: nn.Module, opt: torch.optim.Optimizer) -> TrainState:
    """Restore weights, optimizer state and RNG into `model` (wrapped or not, any number of ranks)."""
    meta = read_state(ckpt)
    if meta["param_names"] != [n for n, _ in module.named_parameters()]:
        raise ValueError(f"checkpoint {ckpt} was written for a different model (parameter names differ)")
    flat, msd, osd = _flat(model, opt)
    _load_sharded_state(flat, ckpt, no_dist=not _distributed())
    msd = _model_restored(msd, flat)
    for k, s in osd["state"].items():
        for kk in s:
            s[kk] = flat[f"optim.{k}.{kk}"]
    set_model_state_dict(model, msd)
    set_optimizer_state_dict(model, opt, osd)
    rank = _rank()
    rng = ckpt / f"rng-{rank}.safetensors"
    _set_rng_state(load_file(rng if rng.is_file() else ckpt / "rng-0.safetensors"))
    if rank and not rng.is_file():  # a rank the saving run did not have: rank 0's numbers, made its own
        torch.manual_seed(int(torch.randint(2**62, ())) + rank)
    # seconds_per_step: a plan's step time, written before plans were made per token (2026-12-01); without it a
    # resumed time-budgeted run keeps its plan rather than re-planning for another train.max_time
    return TrainState(**{k: v for k, v in meta["state"].items() if k != "seconds_per_step"})


def export_checkpoint(ckpt: Path, out: Path) -> None:
    """A checkpoint (from any number of ranks) as an HF-layout model folder, in one process."""
    from nanoseek.config import ModelConfig
    from nanoseek.model.hf import save_pretrained

    ckpt, out = Path(ckpt).resolve(), Path(out).resolve()  # its run is two folders up, even from `export .`
    meta = read_state(ckpt)
    run_toml = ckpt.parents[1] / "run.toml"
    if (ckpt / "config.json").is_file():
        config = ModelConfig.from_json_file(ckpt / "config.json")
    elif run_toml.is_file():
        from nanoseek.train.config import load_run_config

        config = load_run_config(run_toml).model
    else:
        raise ValueError(f"cannot find the model config of {ckpt} (no config.json, no run.toml two levels up)")
    model = NanoSeek(config)
    if meta["param_names"] != [n for n, _ in model.named_parameters()]:
        raise ValueError(f"checkpoint {ckpt} does not match its config (parameter names differ)")
    msd = get_model_state_dict(model)
    flat = _model_flat(msd)
    _load_sharded_state(flat, ckpt, no_dist=True)
    model.load_state_dict(_model_restored(msd, flat))
    save_pretrained(model, out)
    copy_tokenizer([ckpt, ckpt.parents[1] / "tokenizer"], out, config.max_position_embeddings)
