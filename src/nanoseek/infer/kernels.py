"""The decode kernels (kernels.cpp), built for this machine on first use: routed experts, Linear layers, and MLA's
attention over the latent cache.

At a few tokens per step DeepSeekMoE's routed experts cost what reading the chosen experts' weights costs.
kernels.cpp reads each chosen expert once for all the tokens that chose it (inductor's fused kernel reads it once
per token, the model's grouped GEMMs visit every expert); docs/LOG.md has the figures. Its `linear_panels` computes
a Linear layer's x·Wᵀ over a weight packed once, at load, into the panels a BLAS's sgemm packs at every call, and
`latent_attention` MLA's absorbed attention over the latent cache where it lies (no gathered copy of the batch's
rows, no packing, the softmax between the two products in one pass).

`torch.ops.nanoseek_cpu.routed_experts` (and `linear_panels`) is built with the machine's C++ compiler (`$CXX`,
else `c++`/`g++`/`clang++`: the one inductor needs for `--compile` anyway), torch's headers and `-march=native`, in
~10-20 s, once: the library is cached in `~/.cache/nanoseek/kernels` (`$NANOSEEK_CACHE/kernels` if set) under a
hash of the source, the flags, torch, the compiler and the CPU. They are C++ ops, so a compiled decode step calls
them without Python. Expert weights may be stored in bfloat16 (`--expert-dtype bf16`: half the memory and half
the bytes a step reads) or int8 with a scale per row (`--expert-dtype int8`, infer/quant.py: a quarter); the math
stays float32. With `--matmul-dtype bf16` (infer/bf16.py) the Linear and expert weights are packed in bf16 and the
products are bf16 with float32 sums (`linear_panels` over bf16 panels, `routed_experts_bf16`, and
`heads_linear_bf16` for MLA's per-head products): AVX512-BF16's
`vdpbf16ps` where the CPU has it (`bf16_products()`), both factors widened to float32 elsewhere. Without a
compiler, with `NANOSEEK_KERNELS=0`, or for tensors they do not cover (not on CPU, activations not float32, widths
not multiples of 16 or of the panel width), `covers`, `covers_linear` and `covers_attention` are False and callers
keep torch's path: same results, only slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

from nanoseek.device import cpu_identity
from nanoseek.io import cache_dir as nanoseek_cache
from nanoseek.io import usual_mode

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels.cpp")
VECTOR = 16  # floats per cache line, what kernels.cpp's loops step by: widths must be multiples of it
# Tried in order, the first that compiles is kept. -fopenmp: at::parallel_for is inlined from torch's headers and
# runs on one thread without it. Not every compiler has -march=native or OpenMP (Apple clang has neither).
FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])


def cache_dir() -> Path:
    return nanoseek_cache("kernels")


def compiler() -> str | None:
    """$CXX (a command, so `ccache g++` works), else the first of c++, g++, clang++ on the PATH."""
    return os.environ.get("CXX") or next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


def _command(cxx: str, flags: list[str], out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths  # imports setuptools: only when building

    lib = library_paths()[0]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    undefined = ["-undefined", "dynamic_lookup"] if platform.system() == "Darwin" else []
    return [*shlex.split(cxx), "-O3", "-std=c++20", "-shared", "-fPIC", abi, *flags,
            *(f"-I{p}" for p in include_paths()), str(SOURCE), f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10",
            "-ltorch_cpu", *undefined, "-o", str(out)]


def _build(cxx: str, out: Path) -> None:
    """Compile SOURCE into out atomically (a temp file renamed into place: a crash leaves no half library)."""
    errors = []
    for flags in FLAG_SETS:
        with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        result = subprocess.run(cmd := _command(cxx, flags, tmp_path), capture_output=True, text=True)
        if result.returncode == 0:
            usual_mode(tmp_path, executable=True)  # not the temporary file's 0600: other users may load it
            os.replace(tmp_path, out)
            return
        tmp_path.unlink(missing_ok=True)
        errors.append(f"`{cxx} ... {' '.join(flags)}`: {result.stderr.strip()[-300:] or cmd[0] + ' failed'}")
    raise RuntimeError("; ".join(errors))


@functools.cache
def load() -> bool:
    """Build (once per machine) and load the op; False, with one warning saying why, where that fails."""
    if os.environ.get("NANOSEEK_KERNELS", "1") == "0":
        return False
    cxx = compiler()
    if cxx is None:
        log.warning("no C++ compiler ($CXX, c++, g++, clang++): decoding uses torch's kernels (slower on CPU)")
        return False
    try:
        version = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True, check=True).stdout
        parts = (SOURCE.read_text(), str(FLAG_SETS), torch.__version__, cxx, version, cpu_identity())
        path = cache_dir() / f"kernels-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"
        cached = path.exists()
        if not cached:
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("building the decode kernel (once per machine) into %s", path)
            _build(cxx, path)
        try:
            torch.ops.load_library(str(path))
        except OSError:
            if not cached:
                raise
            # a cached library that does not load (damaged, or another user's that this one may not read): once more
            log.info("the cached decode kernel %s does not load; building it again", path)
            _build(cxx, path)
            torch.ops.load_library(str(path))
    # ImportError: torch.utils.cpp_extension (the build's include paths) needs setuptools
    except (OSError, ImportError, RuntimeError, subprocess.CalledProcessError) as e:
        log.warning("could not build the decode kernel (%s); decoding uses torch's kernels (slower on CPU)", e)
        return False
    return True


# The op's schema, shape function (for compiled graphs) and FLOPs are defined here, at import; the library adds
# its CPU implementation when loaded. So FlopCounterMode and torch.compile know the op before it is built.
# An op's schema never changes under its name: inductor's on-disk cache of compiled steps is keyed by the graph's
# code, which names the op, so a step compiled before the change would call the new library with the old arguments
# (a crash). A new signature is a new op, as routed_experts_int8 is.
torch.library.define("nanoseek_cpu::routed_experts",
                     "(Tensor x, Tensor indices, Tensor weights, Tensor gate_up_proj, Tensor down_proj) -> Tensor")
torch.library.define("nanoseek_cpu::routed_experts_int8",
                     "(Tensor x, Tensor indices, Tensor weights, Tensor gate_up_proj, Tensor down_proj, "
                     "Tensor gate_up_scale, Tensor down_scale) -> Tensor")
torch.library.define("nanoseek_cpu::routed_experts_bf16",
                     "(Tensor x, Tensor indices, Tensor weights, Tensor gate_up_proj, Tensor down_proj) -> Tensor")


@torch.library.register_fake("nanoseek_cpu::routed_experts")
@torch.library.register_fake("nanoseek_cpu::routed_experts_int8")
@torch.library.register_fake("nanoseek_cpu::routed_experts_bf16")
def _(x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)  # contiguous, as the kernel's output is (empty_like would copy x's strides)


torch.library.define("nanoseek_cpu::linear_panels", "(Tensor x, Tensor panels) -> Tensor")
torch.library.define("nanoseek_cpu::panel_width", "() -> int")
torch.library.define("nanoseek_cpu::bf16_products", "() -> bool")


@torch.library.register_fake("nanoseek_cpu::linear_panels")
def _(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], panels.shape[0] * panels.shape[2])


@register_flop_formula(torch.ops.nanoseek_cpu.linear_panels)
def _(x_shape, panels_shape, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add: N rows × in × out (out = panels × their width; bf16 panels too)."""
    return 2 * x_shape[0] * x_shape[1] * panels_shape[0] * panels_shape[2]


torch.library.define("nanoseek_cpu::heads_linear_bf16", "(Tensor x, Tensor panels) -> Tensor")


@torch.library.register_fake("nanoseek_cpu::heads_linear_bf16")
def _(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], panels.shape[1] * panels.shape[3])


@register_flop_formula(torch.ops.nanoseek_cpu.heads_linear_bf16)
def _(x_shape, panels_shape, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add: N rows × heads × in × out."""
    return 2 * x_shape[0] * x_shape[1] * x_shape[2] * panels_shape[1] * panels_shape[3]


torch.library.define("nanoseek_cpu::latent_attention",
                     "(Tensor q, Tensor rows, Tensor slots, Tensor visible, float scale, int rank) -> Tensor")


@torch.library.register_fake("nanoseek_cpu::latent_attention")
def _(q: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor, scale: float,
      rank: int) -> torch.Tensor:
    return q.new_empty(*q.shape[:3], rank)


@register_flop_formula(torch.ops.nanoseek_cpu.latent_attention)
def _(q_shape, rows_shape, slots_shape, visible_shape, *args, out_shape=None, **kwargs) -> int:
    """Scores (D wide) and the weighted sum of latents (rank wide) for every query row, head and key: 2 FLOPs a
    MAC, as for the two batched products it replaces."""
    B, T, h, D = q_shape
    return 2 * B * T * h * visible_shape[-1] * (D + out_shape[-1])


@register_flop_formula([torch.ops.nanoseek_cpu.routed_experts, torch.ops.nanoseek_cpu.routed_experts_int8,
                        torch.ops.nanoseek_cpu.routed_experts_bf16])
def _(x_shape, indices_shape, weights_shape, gate_up_shape, down_shape, *scale_shapes, out_shape=None,
      **kwargs) -> int:
    """For FlopCounterMode: per (token, expert) pair, gate+up [2I, H] and down [H, I], 2 FLOPs a MAC (down [E, H, I],
    or packed for bf16 products, [E, H / P, I / 2, P, 2])."""
    (n, k), hidden = indices_shape, x_shape[-1]
    inner = down_shape[2] * (2 if len(down_shape) == 5 else 1)
    return 2 * n * k * 3 * hidden * inner


@torch.compiler.assume_constant_result  # a compiled step asks once, while tracing
def built() -> bool:
    return load()


@torch.compiler.assume_constant_result
def beats_inductor() -> bool:
    """Whether the routed-experts kernel is the faster choice inside a compiled step (of several rows) on this CPU.
    On AVX-512 it is. On this project's AVX2 machine (an AMD EPYC) its first tiles (16 accumulators of 16 floats,
    spilled from AVX2's 16 registers) made the batch-16 step 0.82x as fast as inductor's fused kernel; with tiles
    sized for AVX2 the steps tie (1.00x at 1, 4 and 16 rows, `bench/decode_kernel.py`, docs/LOG.md, 2026-11-30),
    so inductor's, fused with its neighbours, stays there. The eager engine uses the kernel everywhere: it is
    1.2-6x faster than the model's own path."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def _plain_cpu(t: torch.Tensor) -> bool:
    """A plain tensor (not a sharded DTensor or another subclass the kernels cannot read) on the CPU."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"


def covers(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether the routed-experts kernel takes these tensors: plain (not sharded DTensors) CPU tensors, x float32,
    both expert weights of one dtype (float32, bfloat16 or int8, infer/quant.py, with their rows' scales), last sizes
    multiples of VECTOR; and the library built."""
    plain = all(_plain_cpu(t) and t.shape[-1] % VECTOR == 0 for t in (x, gate_up_proj, down_proj))
    return (plain and x.dtype == torch.float32 and gate_up_proj.dtype == down_proj.dtype
            and gate_up_proj.dtype in (torch.float32, torch.bfloat16, torch.int8) and built())


@functools.cache
def panel_width() -> int:
    """Output columns per panel of a packed Linear weight: two of this CPU's vectors (16 floats on AVX2)."""
    return torch.ops.nanoseek_cpu.panel_width()


def covers_linear(weight: torch.Tensor, products: torch.dtype = torch.float32) -> bool:
    """Whether `linear_panels` can take this Linear weight [out, in] once packed for products in `products`: a plain
    CPU tensor, in > 0, out a multiple of the panel width, and the library built; for float32 products a float32
    weight, for bfloat16 ones (infer/bf16.py) a float32 or bfloat16 weight of an even width (pairs)."""
    dtypes, pairs = ((torch.float32,), 1) if products == torch.float32 else ((torch.float32, torch.bfloat16), 2)
    return (_plain_cpu(weight) and weight.dim() == 2 and weight.dtype in dtypes and weight.shape[1] > 0
            and weight.shape[1] % pairs == 0 and built() and weight.shape[0] % panel_width() == 0)


@functools.cache
def bf16_products() -> bool:
    """Whether this CPU multiplies bf16 numbers in hardware (AVX512-BF16, as the library was built for it); elsewhere
    the kernels compute bf16 products by widening both factors to float32: the same products (up to the rounding
    of their sums), slower than float32."""
    return built() and torch.ops.nanoseek_cpu.bf16_products()


def takes_panels(x: torch.Tensor, panels: torch.Tensor) -> bool:
    """Whether `linear_panels` takes x and packed panels as they are now (a model moved or cast after packing is
    not): plain CPU tensors, x float32, the panels as pack_linear made them (3-d float32 or 4-d bfloat16)."""
    return (_plain_cpu(x) and _plain_cpu(panels) and x.dtype == torch.float32
            and (panels.dtype, panels.dim()) in ((torch.float32, 3), (torch.bfloat16, 4)))


def pack_linear(weight: torch.Tensor, products: torch.dtype = torch.float32) -> torch.Tensor:
    """A Linear weight [out, in] -> the layout `linear_panels` reads in order (P = panel_width()):
    - float32 products: panels [out / P, in, P], panels[b, k, j] = weight[b·P + j, k];
    - bfloat16 products: panels [out / P, in / 2, P, 2] in bf16 (rounded to nearest even), panels[b, kk, j] =
      (weight[b·P + j, 2kk], weight[b·P + j, 2kk + 1]): the pairs AVX512-BF16's dot product multiplies."""
    out, inner = weight.shape
    w = weight.detach().reshape(out // panel_width(), panel_width(), inner)
    if products == torch.bfloat16:
        return w.to(torch.bfloat16).view(w.shape[0], panel_width(), inner // 2, 2).transpose(1, 2).contiguous()
    return w.float().transpose(1, 2).contiguous()


def unpack_linear(panels: torch.Tensor) -> torch.Tensor:
    """pack_linear's inverse: panels -> weight [out, in] in the panels' dtype (a copy; gradients flow through it)."""
    if panels.dim() == 4:
        return panels.transpose(1, 2).reshape(panels.shape[0] * panels.shape[2], -1)
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])


def linear_panels(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """x [N, in] · Wᵀ -> [N, out] in float32, for W packed by pack_linear; with bf16 panels, x is rounded to bf16 and
    the products' sums are float32."""
    return torch.ops.nanoseek_cpu.linear_panels(x, panels)


def covers_attention(q: torch.Tensor, rows: torch.Tensor, rank: int) -> bool:
    """Whether `latent_attention` takes a decode step's queries and a layer's cache: plain CPU tensors in float32
    or bfloat16, the cache contiguous (as LatentCache keeps it: the kernel would copy any other at every call),
    widths (rank + rope, and rank) multiples of VECTOR; and the library built."""
    return (all(_plain_cpu(t) and t.dtype in (torch.float32, torch.bfloat16) for t in (q, rows))
            and rows.is_contiguous() and q.shape[-1] % VECTOR == 0 and rank % VECTOR == 0 and built())


def latent_attention(q: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor, scale: float,
                     rank: int) -> torch.Tensor:
    """MLA's absorbed attention read from the cache in place: queries q [B, T, heads, rank + rope], one layer's
    cache rows [slots, max_len, rank + rope] (float32, or bfloat16 widened as read), each row's slot [B] and its
    visible keys [B, T, K] -> softmax(scale · q·keysᵀ) · keys[..., :rank], [B, T, heads, rank] in q's dtype (zeros
    for a query row that sees no key, where torch's softmax gives NaNs; a decode step's rows always see their own
    position). The math is float32 whatever the dtypes: a bf16 query is widened first, its output rounded last."""
    out = torch.ops.nanoseek_cpu.latent_attention(q.float(), rows, slots, visible, scale, rank)
    return out.to(q.dtype)


def routed_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, gate_up_scale: torch.Tensor | None = None,
                   down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j weights[t, j] · down_e(silu(gate_e x_t) · up_e x_t), e = indices[t, j]: x [N, H]; indices, weights
    [N, k]; gate_up_proj [E, 2I, H] (gate rows, then up rows); down_proj [E, H, I] -> [N, H]. float32 math, also
    over bfloat16 weights (widened exactly as they are read) and int8 ones (each output times its row's scale:
    gate_up_scale [E, 2I], down_scale [E, H])."""
    if (gate_up_scale is None) != (down_scale is None) or (gate_up_scale is None and gate_up_proj.dtype == torch.int8):
        raise ValueError("routed_experts: int8 weights need both scales (gate_up_scale, down_scale), float ones none")
    if gate_up_scale is None:
        return torch.ops.nanoseek_cpu.routed_experts(x, indices, weights, gate_up_proj, down_proj)
    return torch.ops.nanoseek_cpu.routed_experts_int8(x, indices, weights, gate_up_proj, down_proj, gate_up_scale,
                                                      down_scale)


def pack_experts(weight: torch.Tensor) -> torch.Tensor:
    """Stacked expert weights [E, out, in] -> bf16 panels [E, out / P, in / 2, P, 2], each expert's as pack_linear
    packs a Linear weight for bf16 products."""
    E, out, inner = weight.shape
    return pack_linear(weight.detach().reshape(E * out, inner), torch.bfloat16).view(E, out // panel_width(),
                                                                                      inner // 2, panel_width(), 2)


def unpack_experts(panels: torch.Tensor) -> torch.Tensor:
    """pack_experts' inverse: [E, out / P, in / 2, P, 2] -> [E, out, in] in bf16 (a copy)."""
    E = panels.shape[0]
    return unpack_linear(panels.flatten(0, 1)).view(E, -1, panels.shape[2] * 2)


def takes_packed(x: torch.Tensor) -> bool:
    """Whether `routed_experts_bf16` takes these activations: a plain float32 CPU tensor (the panels were checked when
    packed, infer/bf16.py)."""
    return _plain_cpu(x) and x.dtype == torch.float32


def routed_experts_bf16(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                        down: torch.Tensor) -> torch.Tensor:
    """routed_experts in bf16 products (`--matmul-dtype bf16`) over expert weights packed by pack_experts: x and the
    experts' hidden activations are rounded to bf16 before each product; the sums are float32."""
    return torch.ops.nanoseek_cpu.routed_experts_bf16(x, indices, weights, gate_up, down)


def heads_linear_bf16(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """x [N, heads, in] times each head's weight W_h [out, in] in bf16 products -> [N, heads, out] float32, for the
    weights [heads, out, in] packed by pack_experts: MLA's absorbed products under `--matmul-dtype bf16`."""
    return torch.ops.nanoseek_cpu.heads_linear_bf16(x, panels)
