"""Configuration: the model config (field names = HF `deepseek_v3` config.json), presets, TOML and overrides.

`ModelConfig` reads config.json both as DeepSeek publishes it (`rope_theta` + `rope_scaling`, the way
transformers 4.x wrote it) and as transformers 5.x writes it (`rope_parameters` holding both), and writes
the DeepSeek form, which every tool that serves DeepSeek-V3 reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")

# config.json keys that describe the file or other libraries' settings, not the network: read and dropped.
_HF_METADATA_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "id2label", "label2id", "use_cache", "output_router_logits", "pretraining_tp", "ep_size", "return_dict",
    "output_hidden_states", "output_attentions", "is_encoder_decoder", "chunk_size_feed_forward", "problem_type",
    "tie_encoder_decoder", "head_dim", "qk_head_dim", "num_mtp_layers", "aux_loss_alpha", "seq_aux",
    "router_aux_loss_coef", "generation_config", "_attn_implementation_autoset", "experts_implementation",
}

# Values that the file may hold but that nanoseek does not implement: a clear error beats a silent mismatch.
_SUPPORTED_VALUES = {
    "hidden_act": {"silu"},
    "scoring_func": {"sigmoid"},
    "topk_method": {"noaux_tc"},
    "moe_layer_freq": {1},
}
_YARN_KEYS = {
    "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
    "attention_factor", "truncate",
}


class ConfigError(ValueError):
    """A config value nanoseek cannot use; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """DeepSeek-V3 hyper-parameters, named as in the Hugging Face `deepseek_v3` config.json.

    Defaults are the released DeepSeek-V3 values, except `initializer_range` (0.006, the V3 report's init std)
    and `max_position_embeddings` (4096, the transformers default for a config.json that omits it).
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048  # width of one routed or shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA has one K/V per head: must equal num_attention_heads
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    q_lora_rank: int | None = 1536  # None: plain q_proj instead of the low-rank q_a/q_b pair
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"type": "yarn", "factor": ..., ...}
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1  # MTP depth D
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # DeepSeek's own config.json names; only the V3 values are implemented.
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    moe_layer_freq: int = 1

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_ids(self) -> list[int]:
        """`eos_token_id` as a list (config.json may hold one id or several)."""
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @property
    def num_dense_layers(self) -> int:
        """first_k_dense_replace may exceed the layers (transformers' tiny configs): then every layer is dense."""
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MTP blocks (index >= num_hidden_layers) are MoE blocks whatever first_k_dense_replace says, as in
        DeepSeek-V3's layout."""
        return layer_idx >= self.num_dense_layers

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale(s, mscale_all_dim)^2 under YaRN (DeepSeek-V2 §B, transformers' MLA)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    # ---- checks --------------------------------------------------------------------------------------
    def validate(self) -> None:
        for name, allowed in _SUPPORTED_VALUES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"config field {name}={value!r} is not supported by nanoseek (supported: {sorted(allowed)})"
                )
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "intermediate_size", "max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be > 0, got {getattr(self, name)}")
        if self.qk_nope_head_dim < 0:
            raise ConfigError(f"config field qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} differs from num_attention_heads="
                f"{self.num_attention_heads}: MLA expands one key/value per head; set them equal"
            )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be > 0 or null (plain q_proj), got {self.q_lora_rank}")
        if self.first_k_dense_replace < 0:
            raise ConfigError(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.num_moe_layers or self.num_nextn_predict_layers:
            self._validate_moe()

    def _validate_moe(self) -> None:
        e, k, g, tg = self.n_routed_experts, self.num_experts_per_tok, self.n_group, self.topk_group
        if e <= 0 or self.moe_intermediate_size <= 0:
            raise ConfigError(f"MoE layers need n_routed_experts > 0 and moe_intermediate_size > 0, got {e}, "
                              f"{self.moe_intermediate_size}")
        if g <= 0 or e % g:
            raise ConfigError(f"n_routed_experts={e} must be divisible by n_group={g}")
        if e // g < 2:
            raise ConfigError(f"each of the n_group={g} groups needs >= 2 experts (a group scores by its top 2); "
                              f"n_routed_experts={e}")
        if not 1 <= tg <= g:
            raise ConfigError(f"topk_group={tg} must lie in [1, n_group={g}]")
        if not 1 <= k <= tg * (e // g):
            raise ConfigError(
                f"num_experts_per_tok={k} must lie in [1, topk_group*experts_per_group={tg * (e // g)}]"
            )
        if self.n_shared_experts < 0:
            raise ConfigError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")

    # ---- HF config.json ------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict in either the transformers 4.x/DeepSeek or the 5.x layout."""
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "nanoseek"):
            raise ConfigError(f"config.json has model_type={model_type!r}; nanoseek reads 'deepseek_v3' checkpoints")
        if d.get("quantization_config"):
            q = d["quantization_config"]
            method = q.get("quant_method", "?") if isinstance(q, dict) else q
            raise ConfigError(
                f"config.json has quantization_config (quant_method={method!r}): quantized weights are not "
                "supported; dequantize to bf16/fp32 first"
            )
        d.pop("quantization_config", None)
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters:  # transformers 5.x: one dict with rope_theta and the scaling
            rp = dict(rope_parameters)
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            rope_type = rp.get("rope_type", rp.get("type", "default"))
            d["rope_scaling"] = None if rope_type == "default" else rp
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - _HF_METADATA_KEYS)
        if unknown:
            warnings.warn(f"config.json keys ignored by nanoseek: {unknown}", stacklevel=2)
        hints = get_type_hints(cls)
        kwargs = {k: coerce(v, hints[k], k) for k, v in d.items() if k in known}  # the field's type, or an error
        for key in ("rope_theta", "routed_scaling_factor", "rms_norm_eps", "initializer_range"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        if kwargs.get("num_key_value_heads") is None:
            kwargs.pop("num_key_value_heads", None)
        return cls(**kwargs)

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """config.json as DeepSeek publishes it (rope_theta + rope_scaling); transformers 4.x and 5.x read it."""
        d = dataclasses.asdict(self)
        d = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **d,
            "torch_dtype": dtype,
            "dtype": dtype,
        }
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not the object of a model config")
        try:
            return cls.from_hf_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e


def _normalise_rope_scaling(rs: dict[str, Any]) -> dict[str, Any] | None:
    rs = dict(rs)
    rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ConfigError(
            f"rope_scaling type {rope_type!r} is not supported (DeepSeek-V3 uses 'yarn'; "
            "remove rope_scaling for plain RoPE)"
        )
    unknown = set(rs) - _YARN_KEYS
    if unknown:
        raise ConfigError(f"rope_scaling has keys nanoseek does not know: {sorted(unknown)}")
    # checked here, where the field can be named, rather than failing later inside the rotary math
    example = {"factor": 40, "original_max_position_embeddings": 4096}
    for key in ("factor", "original_max_position_embeddings"):
        if rs.get(key) is None:
            raise ConfigError(f"rope_scaling type 'yarn' needs {key} (DeepSeek-V3 has {key}: {example[key]})")
    for key in ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim"):
        value = rs.get(key)
        # 0 is allowed where it means "not used" (mscale_all_dim is 0 in some releases) or "the default" (beta_*)
        zero_ok = key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0
                                  or (value == 0 and not zero_ok)):
            raise ConfigError(f"rope_scaling.{key} must be a number {'>= 0' if zero_ok else '> 0'} (or absent where "
                              f"optional), got {value!r}")
    if not isinstance(rs.get("truncate", True), bool):
        raise ConfigError(f"rope_scaling.truncate must be true or false, got {rs['truncate']!r}")
    return {"type": "yarn", **rs}


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1*m*ln(s) + 1 (DeepSeek-V2 and transformers)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---- presets ---------------------------------------------------------------------------------------------
_PRESETS: dict[str, dict[str, Any]] = {
    # Tests: a few hundred thousand parameters, every feature on (MoE groups, MTP, q/kv LoRA off/on).
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512, num_nextn_predict_layers=1,
    ),
    # CPU demo: ~20M total parameters, 32 fine-grained experts, trains in minutes on a laptop. Init std 0.02:
    # V3's 0.006 suits width 7168; at width 256 it learned slower (1.88 vs 1.74 bits/byte after 4 min, LOG.md).
    "demo": dict(
        initializer_range=0.02,
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=8, n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
        topk_group=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024, num_nextn_predict_layers=1,
    ),
    # One GPU: ~0.5B total / ~0.1B active, the DeepSeek-V3 shape scaled down.
    "small": dict(
        vocab_size=32768, hidden_size=768, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=12,
        num_attention_heads=12, n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
        topk_group=4, first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096, num_nextn_predict_layers=1,
        rope_interleave=True,
    ),
}
PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named model size (`tiny`, `demo`, `small`), optionally with fields overridden."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


# ---- TOML files and key=value overrides --------------------------------------------------------------------
class Override(str):
    """The text of a `key=value` override: from_dict reads it as its field's type, so a folder named 2024 stays
    text and `False` is a boolean only where one is expected."""


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build a (nested) dataclass from a dict, rejecting unknown keys with their path and values that are not of
    their field's type (ints are accepted for floats, integral floats such as 1e9 for ints)."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[key] = from_dict(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = coerce(value, hint, where + key)
    return cls(**kwargs)


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null"))  # TOML has no null


def _expected(hint: Any) -> str:
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in get_args(hint))
    origin = get_origin(hint) or hint
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "none",
             list: "a list such as [0.8, 0.9]", dict: "a table such as {a = 1}"}
    return names.get(origin, getattr(origin, "__name__", str(origin)))


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` (from TOML, or an Override's text) as a field of type `hint`; a ConfigError naming `key` if it is
    not one."""
    shown = value if isinstance(value, Override) else repr(value)
    if get_origin(hint) in (typing.Union, types.UnionType):
        options = get_args(hint)
        if type(None) in options and _is_none(value):
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={shown}: expected {_expected(hint)}")
    if isinstance(value, Override):
        parsed = parse_value(value)
        if hint is str:  # a quoted string loses its quotes; anything else is the text as typed
            return str(parsed) if isinstance(parsed, str) else str(value)
        if hint is bool and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if hint is int and value.isdigit():
            return int(value)  # 007, which TOML rejects
        value = parsed
    origin = get_origin(hint) or hint
    if hint is Any or (origin in (str, bool, list, dict) and isinstance(value, origin)):
        if origin is list:
            (item,) = get_args(hint) or (Any,)
            return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return value
    if hint in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
        if hint is float or isinstance(value, int):
            return value
        if math.isfinite(value) and value.is_integer():
            return int(value)  # train.tokens=1e9
    raise ConfigError(f"{key}={shown}: expected {_expected(hint)}")


def parse_value(text: str) -> Any:
    """A CLI override value: TOML syntax (numbers, booleans, lists, quoted strings), else the bare string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (before it becomes dataclasses)."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. model.hidden_size=256)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is a value, not a section")
        if isinstance(node.get(parts[-1]), dict):
            example = "model.preset=tiny" if key.strip() == "model" else f"{key.strip()}.FIELD={raw.strip()}"
            raise ConfigError(f"override {item!r}: {key.strip()!r} is a section, not a setting: set one of its "
                              f"fields, e.g. {example}")
        if len(parts) == 1:
            raise ConfigError(f"override {item!r}: settings are SECTION.NAME=value (e.g. train.steps=100, "
                              f"model.preset=tiny); {key.strip()!r} has no section")
        node[parts[-1]] = Override(raw.strip())
    return out


def model_config_from_section(section: dict[str, Any]) -> ModelConfig:
    """A TOML `[model]` section: `preset = "demo"` plus any HF field overriding it."""
    section = dict(section)
    name = section.pop("preset", None)
    if name is not None:
        base = dict(_PRESETS.get(name) or {})
        if name not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        section = {**base, **section}
    return from_dict(ModelConfig, section, "model.")


def load_toml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a config file (CONFIG.toml; configs/ holds examples), or "
                          f"--resume {path} if it is a run")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    return apply_overrides(data, overrides or [])


__all__ = [
    "PRESETS",
    "ConfigError",
    "ModelConfig",
    "Override",
    "apply_overrides",
    "coerce",
    "from_dict",
    "load_toml",
    "model_config_from_section",
    "parse_value",
    "preset",
    "yarn_get_mscale",
]
