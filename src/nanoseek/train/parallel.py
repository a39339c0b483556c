"""Scale-out with PyTorch's own engine: torchrun processes, DDP or FSDP2, and expert parallelism.

    torchrun --nproc-per-node G -m nanoseek train CONFIG.toml parallel.dp=fsdp parallel.ep=2

Ranks form a 2-D mesh (dp, ep): rank = dp_index·ep + ep_index. Every rank reads its own data. Weights other than
the routed experts are replicated (DDP) or sharded (FSDP2) over all ranks; with ep = k the routed experts of
each MoE layer are split over the k ranks of an `ep` group, which exchange tokens with all_to_all, and
each expert shard is replicated over the `dp` dimension. Nothing here edits the model: the wrappers are applied
from outside (DDP, fully_shard, an `experts` module swapped for its expert-parallel twin).

Loss normalisation: each rank's loss is its summed token cross-entropy over the global target count (trainer),
multiplied by the world size here, because DDP/FSDP average gradients over ranks. Expert-parallel weights are
not averaged by them: their gradients are summed over their replicas and divided by the world size instead.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # what torch.distributed.nn.functional points to
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.device import usable_cores
from nanoseek.model import NanoSeek
from nanoseek.model.moe import Experts, MoE, Router, expert_mlp
from nanoseek.train.config import ParallelConfig
from nanoseek.train.loop import World


class DistributedError(RuntimeError):
    """A rank failed, was killed, or never joined; the message says which and what to check."""


class DistWorld(World):
    """One rank of a torchrun job: its device, the (dp, ep) mesh and the hooks the trainer calls."""

    def __init__(self, cfg: ParallelConfig, rank: int, size: int, device: torch.device):
        super().__init__(rank=rank, size=size)
        self.cfg, self.device = cfg, device
        self.mesh = init_device_mesh(device.type, (size // cfg.ep, cfg.ep), mesh_dim_names=("dp", "ep"))
        self.world_mesh = init_device_mesh(device.type, (size,), mesh_dim_names=("world",))
        self.wrapped: nn.Module | None = None

    def describe(self) -> str:
        c = self.cfg
        extras = "".join(f", {name}" for name, on in (("CPU offload", c.cpu_offload),
                                                      ("activation checkpointing", c.activation_checkpointing)) if on)
        return (f"torchrun job: {self.size} rank(s), {dist.get_backend()} on {self.device.type}, dp={c.dp}, "
                f"ep={c.ep}{extras}")

    # -- hooks used by the trainer -------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        x = t.detach().to(self.device, copy=True)
        dist.all_reduce(x)
        return x.to(t.device)

    def max_int(self, n: int) -> int:
        x = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return int(x.item())

    @property
    def loss_scale(self) -> float:
        return float(self.size)  # undo DDP/FSDP's gradient averaging: the loss is already a global mean

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """Synchronise gradients only on the last micro-batch of a step."""
        m = self.wrapped
        if isinstance(m, nn.parallel.DistributedDataParallel):
            return nullcontext() if last else m.no_sync()
        if m is not None and hasattr(m, "set_requires_gradient_sync"):  # FSDP2
            m.set_requires_gradient_sync(last)
        return nullcontext()

    def finish_grads(self, model: nn.Module) -> None:
        """Expert-parallel weights: sum over replicas (the dp dimension), then divide by the world size."""
        if self.cfg.ep == 1:
            return
        group = self.mesh["dp"].get_group()
        for p in expert_parameters(model):
            if p.grad is None:
                continue
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if self.mesh["dp"].size() > 1:
                dist.all_reduce(g, group=group)
            g.div_(self.size)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Global L2 norm over plain and sharded (DTensor, any mesh) gradients; scale them to `max_norm`."""
        grads = [p.grad for p in params if p.grad is not None]
        # Norms with torch's fused per-tensor kernel (one pass, no copies; a float64 copy of every gradient
        # cost ~150 ms a step for the demo model), squared and added up in float64 across groups and ranks.
        replicated = [g for g in grads if not isinstance(g, DTensor)]  # DDP: the same on every rank, counted once
        total = squared_norm(replicated, self.device)
        sharded: dict[tuple[int, tuple[int, ...]], tuple[DeviceMesh, list[torch.Tensor]]] = {}
        for g in grads:
            if isinstance(g, DTensor):
                dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
                sharded.setdefault((id(g.device_mesh), dims), (g.device_mesh, []))[1].append(g.to_local())
        for (_, dims), (mesh, shards) in sharded.items():
            acc = squared_norm(shards, self.device)
            for d in dims:  # add up the squares over the ranks that hold different shards
                dist.all_reduce(acc, group=mesh.get_group(d))
            total += acc
        norm = total.sqrt().item()
        if max_norm > 0 and norm > max_norm:
            coef = max_norm / (norm + 1e-6)
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
        return norm


def squared_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ ‖t‖² over the tensors, as a float64 scalar on `device` (0 for none)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    return nn.utils.get_total_norm(tensors, 2.0).to(device, torch.float64).square()


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()]


def init_world(cfg: ParallelConfig) -> World:
    """A single process, or this rank of a torchrun job: gloo on CPU, NCCL on GPU. A job of one rank is a job too
    (`torchrun --nproc-per-node 1` on a one-GPU machine: FSDP's CPU offload, the same path as a larger job)."""
    # torchrun's own mark, or a launcher's world of several ranks; not a process that merely has RANK=0 WORLD_SIZE=1
    # in its environment (a notebook or script inside a job's container)
    if not (dist.is_torchelastic_launched() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        if cfg.cpu_offload:
            raise ConfigError("parallel.cpu_offload is FSDP's, which runs under torchrun: on one GPU, "
                              "torchrun --standalone --nproc-per-node 1 -m nanoseek train ... parallel.dp=fsdp "
                              "parallel.cpu_offload=true")
        return World()
    if "RANK" not in os.environ:
        raise DistributedError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but RANK is not: start the ranks "
                               "with torchrun (or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each)")
    size, rank, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if size % cfg.ep:  # before joining, so that a job that cannot run leaves no process group behind
        raise ConfigError(f"parallel.ep={cfg.ep} must divide the number of ranks ({size})")
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank} is local rank {local}, but this machine shows "
                                   f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES): start at most one "
                                   "rank per GPU (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # torchrun starts each rank with OMP_NUM_THREADS=1: give each rank its share of the cores instead
        share = max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(int(os.environ.get("NANOSEEK_THREADS", share)))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout),
                                device_id=device if device.type == "cuda" else None)
    except Exception as e:  # the store times out when a rank never arrives
        raise DistributedError(f"rank {rank}: the {size} ranks did not all join within parallel.timeout="
                               f"{cfg.timeout:g}s ({type(e).__name__}: {e}). Check that every rank (and node) was "
                               "started with the same --nnodes/--nproc-per-node and can reach MASTER_ADDR:"
                               f"{os.environ.get('MASTER_PORT', '?')}") from e
    return DistWorld(cfg, rank, size, device)


def shutdown(world: World) -> None:
    if isinstance(world, DistWorld) and dist.is_initialized():
        dist.destroy_process_group()


class ExpertParallel(nn.Module):
    """Expert-parallel twin of `mlp.experts`: this rank holds experts [r·E/k, (r+1)·E/k) of its ep group as
    DTensor shards (so checkpoints know the global [E, ...] tensor), sends each token to every rank that owns one
    of its experts, once per rank (DeepSeek-V3 §3.2.2: a token crosses to a node once, however many of its experts
    are there), runs those experts on what it receives, sums each token's outputs there, and sends one row per
    token back: all_to_all twice, with up to k times fewer rows than one per token copy."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        self.n_experts, self.ep = experts.n_experts, ep_mesh.size()
        self.local = self.n_experts // self.ep
        self.group = ep_mesh.get_group()
        self.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj.detach(), ep_mesh, [Shard(0)]))
        self.down_proj = nn.Parameter(distribute_tensor(experts.down_proj.detach(), ep_mesh, [Shard(0)]))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        """`counts` (copies per expert) is the model's interface; here rows, not copies, travel."""
        H, k = x.shape[1], indices.shape[1]
        ranks = torch.arange(self.ep, device=x.device)
        runs = (indices // self.local)[None] == ranks[:, None, None]  # [rank, token, j]: that rank runs copy j
        needs = runs.any(-1)  # [rank, token]
        dest, token = needs.nonzero(as_tuple=True)  # one row per (rank, token it needs), grouped by rank
        chosen = runs[dest, token]  # [rows, k]
        # A row carries its token, the gate weights of the copies its rank runs (0 elsewhere) and their local
        # expert ids (-1 elsewhere) as two base-256 digits: numbers a bf16 column holds exactly (integers to 256)
        # whatever casts the row meets. One tensor, so one exchange each way (each is a wait for the slower rank).
        gate_w = torch.where(chosen, weights.index_select(0, token), 0)
        ids = torch.where(chosen, indices.index_select(0, token) % self.local, -1)
        digits = (ids.div(256, rounding_mode="floor"), ids.remainder(256))  # -1 is (-1, 255)
        rows = torch.cat((x.index_select(0, token), *(t.to(x.dtype) for t in (gate_w, *digits))), dim=1)
        send = needs.sum(1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # rows each rank sends me
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        received = funcol.all_to_all_single_autograd(rows, recv_sizes, send_sizes, self.group)
        xr, wr, hi, lo = received.split([H, k, k, k], dim=1)
        ids_r = (hi.detach().float() * 256 + lo.detach().float()).long()
        row, j = (ids_r >= 0).nonzero(as_tuple=True)  # the copies to run here ...
        expert = ids_r[row, j]
        by_expert = expert.argsort(stable=True)  # ... grouped by expert for the grouped GEMM
        row, j = row[by_expert], j[by_expert]
        local_counts = torch.zeros(self.local, dtype=torch.long, device=x.device).index_add_(
            0, expert, torch.ones_like(expert))
        y = expert_mlp(xr.index_select(0, row), wr[row, j], local_counts, self.gate_up_proj.to_local(),
                       self.down_proj.to_local())
        y = y.new_zeros(xr.shape[0], H).index_add_(0, row, y)  # each received token: its copies here, summed
        yb = funcol.all_to_all_single_autograd(y, send_sizes, recv_sizes, self.group)
        return torch.zeros_like(x, dtype=yb.dtype).index_add_(0, token, yb)

    def whole(self) -> Experts:
        """All experts of the group as a plain `Experts` module (an all-gather: every rank of the group calls it)."""
        E, two_i, H = self.gate_up_proj.shape  # a DTensor's shape is the global one
        shape = ModelConfig(n_routed_experts=E, n_group=1, topk_group=1, num_experts_per_tok=1, hidden_size=H,
                            moe_intermediate_size=two_i // 2)
        with torch.device("meta"):  # no memory until the gathered weights replace these
            experts = Experts(shape)
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, nn.Parameter(getattr(self, name).detach().full_tensor(), requires_grad=False))
        return experts


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Whole weights inside the block, for the inference engine (training samples): FSDP2's units unsharded (the
    engine reads parameters outside the modules' forward), and each expert-parallel layer swapped for all its
    experts, so that generating needs no collectives. Ranks may then decode different lengths (a sampled token or
    an EOS can differ in the last bits of nondeterministic GPU sums) without waiting for each other's exchanges.
    A no-op for a plain model."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    split = [(m, m.experts) for m in model.modules() if isinstance(m, MoE) and isinstance(m.experts, ExpertParallel)]
    try:
        for moe, ep in split:
            moe.experts = ep.whole()
        yield
    finally:
        for moe, ep in split:
            moe.experts = ep
        for m in sharded:
            m.reshard()


def activation_checkpointing(model: NanoSeek) -> None:
    """Recompute each block in the backward pass (forward replaced in place: parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in [*model.layers, *model.mtp]:
        inner = block.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # type: ignore[method-assign]


def parallelize(model: NanoSeek, world: World, bf16: bool, cfg: ParallelConfig) -> nn.Module:
    """Wrap `model` for `world` (for one process, only activation checkpointing applies); returns the module to
    call for training."""
    if not isinstance(world, DistWorld):
        if cfg.activation_checkpointing:
            activation_checkpointing(model)
        return model
    model.to(world.device)
    if cfg.ep > 1:
        if model.config.n_routed_experts % cfg.ep:
            raise ConfigError(f"parallel.ep={cfg.ep} must divide n_routed_experts={model.config.n_routed_experts}")
        for moe in [m for m in model.modules() if isinstance(m, MoE)]:
            moe.experts = ExpertParallel(moe.experts, world.mesh["ep"])
    if cfg.activation_checkpointing:
        activation_checkpointing(model)
    experts = set(expert_parameters(model))
    if cfg.dp == "ddp":
        names = [n for n, p in model.named_parameters() if p in experts]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        # no buffer sync in forward: the routing bias is kept identical by the global bias update, and the
        # expert-load counters are per rank until that update sums them (torch 2.13 renamed the switch)
        ddp = nn.parallel.DistributedDataParallel
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
            "broadcast_buffers"
        wrapped: nn.Module = ddp(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                                 **{no_sync: False})
    else:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        offload = OffloadPolicy()
        if cfg.cpu_offload:
            if world.device.type != "cuda":
                raise ConfigError("parallel.cpu_offload moves weights from GPU to CPU memory; this run is on CPU")
            offload = CPUOffloadPolicy()
        mesh = world.world_mesh
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        # routers: units of their own, gathered in fp32 (routing stays fp32), and kept whole after their forward:
        # they are tiny, and the engine calls them inside `gathered()`, where a re-gather would be a collective per
        # step that ranks sampling different lengths do not all make
        for router in [m for m in model.modules() if isinstance(m, Router)]:
            fully_shard(router, mesh=mesh, mp_policy=fp32, offload_policy=offload, reshard_after_forward=False)
        for block in [*model.layers, *model.mtp]:
            fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload,
                        ignored_params={p for p in block.parameters() if p in experts} or None)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=experts or None)
        wrapped = model
    world.wrapped = wrapped
    return wrapped
