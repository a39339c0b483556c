"""Read and write the Hugging Face `deepseek_v3` checkpoint layout: config.json + safetensors.

Tensor names and shapes are those DeepSeek-V3 publishes: `model.` prefix, routed experts one by one
(`mlp.experts.{e}.gate_proj.weight`), MTP module k at `model.layers.{num_hidden_layers + k}` with its own
copies of the shared embedding (`embed_tokens`) and head (`shared_head.head`). Above `max_shard_size` the
weights are split into `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`.
Writes are atomic: everything goes to a temporary folder that replaces the target in one rename.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.io import fsync_dir, replace_dir, usual_mode
from nanoseek.model.model import NanoSeek
from nanoseek.model.moe import Experts

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # as write_checkpoint names them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# what a model folder holds besides weights and config.json: kept when the weights are saved again
KEPT_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "generation_config.json")
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes; the message lists what differs."""


# ---- name mapping --------------------------------------------------------------------------------------------
def _hf_prefix(name: str, n_layers: int) -> str:
    """nanoseek name -> checkpoint name for everything but the stacked experts."""
    if name.startswith("lm_head."):
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        return f"model.layers.{n_layers + int(m.group(1))}.{m.group(2)}"
    return "model." + name


def hf_state_dict(model: NanoSeek) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) pairs for `model`, without copying except to split the stacked experts (and where a
    module's state_dict gives its weight in another layout than it holds: infer/layout.py's packed Linear layers)."""
    cfg = model.config
    n = cfg.num_hidden_layers
    state = model.state_dict()
    for name, t in state.items():
        if name.startswith("lm_head.") and cfg.tie_word_embeddings:
            continue  # tied: the checkpoint stores the embedding only
        m = _EXPERT_RE.match(name)
        if m is None:
            yield _hf_prefix(name, n), t
            continue
        base, kind = _hf_prefix(m.group(1), n), m.group(2)
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":
                gate, up = t[e].chunk(2, dim=0)
                yield f"{base}.{e}.gate_proj.weight", gate
                yield f"{base}.{e}.up_proj.weight", up
            else:
                yield f"{base}.{e}.down_proj.weight", t[e]
    for k in range(cfg.num_nextn_predict_layers):  # DeepSeek's MTP layer carries copies of the shared weights
        yield f"model.layers.{n + k}.embed_tokens.weight", state["embed_tokens.weight"]
        yield f"model.layers.{n + k}.shared_head.head.weight", state["lm_head.weight"]
    for key, shape in _empty_shared_experts(cfg).items():
        yield key, torch.empty(shape, dtype=model.embed_tokens.weight.dtype)


def _empty_shared_experts(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """With n_shared_experts = 0, transformers still builds each MoE layer's shared MLP, 0 wide, and reads and
    writes its empty weights; nanoseek has none, but writes them so that transformers loads with nothing missing."""
    if cfg.n_shared_experts:
        return {}
    H = cfg.hidden_size
    return {f"model.layers.{i}.mlp.shared_experts.{proj}.weight": (H, 0) if proj == "down_proj" else (0, H)
            for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers) if cfg.is_moe_layer(i)
            for proj in ("gate_proj", "up_proj", "down_proj")}


def _expected_shapes(model: NanoSeek) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(t.shape) for k, t in hf_state_dict(model)}
    if model.config.tie_word_embeddings:  # not written, but a checkpoint may hold it (optional, same shape)
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def _shared_copies(config: ModelConfig) -> set[str]:
    """Tensors a checkpoint may hold or not that copy a shared one: MTP's embedding and head, and with tied
    embeddings a stored lm_head (transformers reads such files too); each is checked against the shared one."""
    n = config.num_hidden_layers
    keys = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for k in range(config.num_nextn_predict_layers):
        keys |= {f"model.layers.{n + k}.embed_tokens.weight", f"model.layers.{n + k}.shared_head.head.weight"}
    return keys


def _optional_keys(config: ModelConfig) -> set[str]:
    """Tensors a checkpoint may hold or not: the shared copies and the empty shared experts (nothing to read)."""
    return _shared_copies(config) | set(_empty_shared_experts(config))


# ---- reading -------------------------------------------------------------------------------------------------
def _open(f: Path) -> Any:
    """safe_open, with a CheckpointError naming the file when it is not a whole safetensors file."""
    try:
        return safe_open(f, "pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file ({e}): was it cut short while being copied or "
                              "saved? Copy it again, or use another checkpoint") from e


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint at `path` to its file."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {k: path / v for k, v in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object whose weight_map maps tensor "
                                  f"names to files): {type(e).__name__}: {e}") from e
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index} names {f.name}, which is missing from {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with _open(single) as f:
            return {k: single for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = (f" It holds {pickles}: nanoseek never unpickles weights; convert them to safetensors first"
            if pickles else "")
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}.{hint}")


def _read_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        with _open(f) as sf:
            present = set(sf.keys())
            for k in keys:
                if k not in present:
                    raise CheckpointError(f"the index maps {k} to {f.name}, which does not contain it")
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def _check(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], optional: set[str],
           where: Path) -> None:
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if not (missing or unexpected or wrong):
        return

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing tensors: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected tensors: {show(unexpected)}")
    if wrong:
        parts.append("wrong shapes: " + show([f"{k} {found[k]} (config.json implies {expected[k]})" for k in wrong]))
    raise CheckpointError(f"checkpoint {where} does not match its config.json: " + "; ".join(parts))


def _mtp_absent(config: ModelConfig, found: set[str]) -> bool:
    n = config.num_hidden_layers
    prefixes = tuple(f"model.layers.{n + k}." for k in range(config.num_nextn_predict_layers))
    return bool(prefixes) and not any(k.startswith(prefixes) for k in found)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def cast_model(model: NanoSeek, dtype: torch.dtype, expert_dtype: torch.dtype | None = None) -> NanoSeek:
    """Cast weights to `dtype` (the router and the rotary frequencies stay fp32 by themselves: model/fp32.py), and
    the routed experts to `expert_dtype` if given: storage only (inference), the experts compute in the
    activations' dtype."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Experts) and expert_dtype is not None:
            m.to(expert_dtype)
    return model


def load_pretrained(path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", expert_dtype: str | torch.dtype | None = None) -> NanoSeek:
    """Load an HF `deepseek_v3` checkpoint folder (or one nanoseek wrote). Weights in `dtype` (default fp32), the
    routed experts in `expert_dtype` (default: `dtype`), read straight into that storage. On the "meta" device
    the shapes are checked and nothing is read (what `nanoseek info` needs of a model of any size)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: is it a model folder?")
    config = ModelConfig.from_json_file(path / "config.json")
    files = _checkpoint_files(path)
    found = _read_shapes(files)
    if _mtp_absent(config, set(found)):
        warnings.warn(f"config.json of {path} declares {config.num_nextn_predict_layers} MTP layer(s) but the "
                      "checkpoint has none (transformers does not save them): loading without MTP", stacklevel=2)
        config.num_nextn_predict_layers = 0

    with torch.device("meta"):
        model = NanoSeek(config)
    _check(_expected_shapes(model), found, _optional_keys(config), path)

    # cast while still on meta: the device then holds each weight once, in its final dtype (not fp32 first)
    cast_model(model, resolve_dtype(dtype), None if expert_dtype is None else resolve_dtype(expert_dtype))
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.tie_weights()
    _load_tensors(model, files, found)
    model.init_buffers()
    return model


@torch.no_grad()
def _load_tensors(model: NanoSeek, files: dict[str, Path], found: dict[str, tuple[int, ...]]) -> None:
    cfg = model.config
    n = cfg.num_hidden_layers
    targets = model.state_dict(keep_vars=True)
    handles = {f: _open(f) for f in set(files.values())}

    def read(key: str) -> torch.Tensor:
        try:
            return handles[files[key]].get_tensor(key)
        except SafetensorError as e:  # the header was whole, the data is not
            raise CheckpointError(f"{files[key]}: cannot read {key} ({e}): the file is damaged or cut short") from e

    for name, target in targets.items():
        if name.startswith("lm_head.") and cfg.tie_word_embeddings:
            continue
        m = _EXPERT_RE.match(name)
        if m is None:
            target.copy_(read(_hf_prefix(name, n)))
            continue
        base, kind = _hf_prefix(m.group(1), n), m.group(2)
        for e in range(target.shape[0]):
            if kind == "gate_up_proj":
                gate, up = target[e].chunk(2, dim=0)
                gate.copy_(read(f"{base}.{e}.gate_proj.weight"))
                up.copy_(read(f"{base}.{e}.up_proj.weight"))
            else:
                target[e].copy_(read(f"{base}.{e}.down_proj.weight"))
    for key in _shared_copies(cfg) & set(found):  # copies of the shared embedding/head (MTP's, a tied lm_head)
        shared = model.embed_tokens.weight if key.endswith("embed_tokens.weight") else model.lm_head.weight
        if not torch.equal(read(key).to(shared.device, shared.dtype), shared):
            why = "config.json ties them" if key == "lm_head.weight" else "V3 layout"
            warnings.warn(f"{key} differs from the main model's copy; nanoseek shares the main one ({why})",
                          stacklevel=3)


# ---- writing -------------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'5GB', '200MB', '10KB' or a byte count."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_pretrained(model: NanoSeek, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: str | torch.dtype | None = None) -> None:
    """Write config.json + safetensors at `path` atomically (the old folder stays intact until the rename).
    A folder that already holds a model is replaced, keeping its tokenizer and generation files; one that holds
    anything else (a run, a repository, your files) is refused rather than swapped away."""
    path = Path(path).resolve()  # absolute: its parent holds the temporary folder
    old = _model_folder_files(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_checkpoint(model, tmp, max_shard_size, dtype)
        for f in old:
            if f.name in KEPT_FILES:
                shutil.copy2(f, tmp / f.name)
        fsync_dir(tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_folder_files(path: Path) -> list[Path]:
    """The files of an existing model folder at `path` ([] if there is none); an error if it holds anything else."""
    if not path.exists():
        return []
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file: save the model into a folder")
    if Path.cwd() == path or path in Path.cwd().parents:
        raise CheckpointError(f"{path} is (or holds) the folder you are in, which saving would swap away: cd out of "
                              "it and give its name")
    entries = list(path.iterdir())
    # the model's own weight files only: an adapter or an EMA copy (adapter_model.safetensors) is the user's
    try:
        indexed = set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        indexed = set()
    weights = {SINGLE_FILE} | indexed
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in entries
                     if not (p.is_file() and (p.name in KEPT_FILES or p.name in (INDEX_FILE, "config.json")
                                              or p.name in weights or _SHARD_NAME.fullmatch(p.name))))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointError(f"{path} exists and holds more than a model ({shown}); saving replaces the whole "
                              "folder, so write the model to a new or empty folder instead")
    return entries


def write_checkpoint(model: NanoSeek, folder: Path, max_shard_size: int | str = "5GB",
                     dtype: str | torch.dtype | None = None) -> None:
    """config.json + safetensors into an existing folder (not atomic: callers write into a temporary one)."""
    if any(p.dtype == torch.int8 for p in model.parameters()):
        raise CheckpointError("this model's routed experts are int8, quantized for serving (--expert-dtype int8): "
                              "save the checkpoint it was loaded from instead, or load that without int8")
    limit = parse_size(max_shard_size)
    target_dtype = resolve_dtype(dtype) if dtype is not None else model.embed_tokens.weight.dtype

    def written_dtype(key: str) -> torch.dtype:
        return torch.float32 if ".mlp.gate." in key else target_dtype  # router weight and bias stay fp32

    # Plan the shards from shapes, then write one shard at a time: the host holds at most one shard's copies,
    # not a second model.
    counts, size = [0], 0  # tensors per shard
    for key, t in hf_state_dict(model):
        nbytes = t.numel() * written_dtype(key).itemsize
        if counts[-1] and size + nbytes > limit:
            counts.append(0)
            size = 0
        counts[-1] += 1
        size += nbytes
    names = [SINGLE_FILE] if len(counts) == 1 else [f"model-{i:05d}-of-{len(counts):05d}.safetensors"
                                                    for i in range(1, len(counts) + 1)]
    weight_map, total = {}, 0
    tensors = hf_state_dict(model)  # the same order as the plan
    for n, fname in zip(counts, names):
        # own contiguous storage: no tensor in a file may share memory with another
        shard = {key: t.detach().to("cpu", written_dtype(key)).clone().contiguous()
                 for key, t in itertools.islice(tensors, n)}
        save_file(shard, folder / fname, metadata={"format": "pt"})
        usual_mode(folder / fname)  # save_file's 0600 would hide the model from a server run by another account
        weight_map |= dict.fromkeys(shard, fname)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard  # before the next shard's copies
    if len(counts) > 1:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    dtype_name = str(target_dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(dtype_name), indent=2) + "\n")
