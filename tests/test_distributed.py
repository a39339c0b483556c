"""Scale-out with real torchrun processes (gloo, CPU, 2 ranks): DDP, FSDP2 and expert parallelism equal one
process; runs resume across world sizes; failures end the job with a readable error instead of a hang."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.run import MetricsLog
from tests.conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# batch 8 of micro-batch 2: one process accumulates 4 micro-batches, each of 2 ranks accumulates 2
RUN = ["model.vocab_size=512", "data.seq_len=64", "train.batch_size=8", "train.micro_batch_size=2",
       "train.log_every=1", "eval.every=0", "eval.samples=0", "eval.batches=2", "balance.bias_update_speed=0.01",
       "balance.seq_aux_alpha=0.1"]  # the sequence-wise balance loss too: its weight must not grow with the ranks


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    # gloo on CPU, as described above, also on a machine with a GPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def train_args(data: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train", str(ROOT / "configs" / "tiny.toml"), f"data.path={data}", f"train.out_dir={out}",
            f"train.steps={steps}", *RUN, *extra, "--no-progress"]


def single(data: Path, out: Path, *extra: str, steps: int = 6) -> None:
    r = _run([sys.executable, "-m", "nanoseek", *train_args(data, out, *extra, steps=steps)])
    assert r.returncode == 0, r.stdout + r.stderr


def torchrun(data: Path, out: Path, *extra: str, steps: int = 6, ranks: int = 2) -> str:
    r = _run([*TORCHRUN[:-1], str(ranks), "-m", "nanoseek", *train_args(data, out, *extra, steps=steps)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def final_params(run: Path) -> dict[str, torch.Tensor]:
    return nanoseek.from_pretrained(latest_checkpoint(run)).state_dict()


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in MetricsLog(run / "metrics.jsonl").records("train")]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    single(data_dir, out, "checkpoint.every=3")
    return out


@pytest.mark.parametrize("strategy", [["parallel.dp=ddp"], ["parallel.dp=fsdp"], ["parallel.ep=2"],
                                      ["parallel.dp=fsdp", "parallel.ep=2", "parallel.activation_checkpointing=true"]],
                         ids=["ddp", "fsdp2", "ep2-ddp", "ep2-fsdp2-ac"])
def test_two_ranks_equal_one_process(data_dir, reference, tmp_path, strategy):
    """After 6 steps (MoE, MTP, bias update on), 2 ranks × 2 micro-batches end where 1 process × 4 does."""
    run = tmp_path / "run"
    torchrun(data_dir, run, *strategy)
    ref, got = final_params(reference), final_params(run)
    assert ref.keys() == got.keys()
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst < 1e-5, worst
    bias = "layers.1.mlp.gate.e_score_correction_bias"
    assert got[bias].abs().sum() > 0 and torch.allclose(ref[bias], got[bias])  # global load on every rank
    assert losses(run) == pytest.approx(losses(reference), abs=1e-5)
    records = MetricsLog(run / "metrics.jsonl").records("train")
    ref_balance = [r["balance_loss"] for r in MetricsLog(reference / "metrics.jsonl").records("train")]
    # every rank's, averaged (a world-size factor would double it). It and the gradient norm below depend on which
    # expert each token goes to: the ranks add up in another order (weights differ by ~1e-6), and one token that
    # lands on another expert moves them by ~1e-5 relative
    assert [r["balance_loss"] for r in records] == pytest.approx(ref_balance, rel=1e-4)
    assert all(r["ranks"] == 2 for r in records)
    # the global gradient norm over replicated and sharded gradients is the one process's norm
    ref_norms = [r["grad_norm"] for r in MetricsLog(reference / "metrics.jsonl").records("train")]
    assert [r["grad_norm"] for r in records] == pytest.approx(ref_norms, rel=1e-4)


@pytest.mark.parametrize("strategy", [["parallel.ep=4"], ["parallel.dp=fsdp", "parallel.ep=2"]],
                         ids=["ep4", "fsdp2-x-ep2"])
def test_four_ranks_equal_one_process(data_dir, reference, tmp_path, strategy):
    """4 ranks × 1 micro-batch: experts over 4 ranks (each token to up to 4 of them), and a (dp × ep) = 2 × 2 mesh
    where each expert shard has a replica whose gradients are summed."""
    run = tmp_path / "run"
    torchrun(data_dir, run, *strategy, ranks=4)
    ref, got = final_params(reference), final_params(run)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-5
    assert losses(run) == pytest.approx(losses(reference), abs=1e-5)


def test_one_rank_job_equals_one_process(data_dir, reference, tmp_path):
    """`torchrun --nproc-per-node 1` is a real one-rank job (process group, FSDP2 over a one-rank mesh: the path of
    a one-GPU machine that needs CPU offload), and ends where the plain process does."""
    run = tmp_path / "run"
    out = torchrun(data_dir, run, "parallel.dp=fsdp", ranks=1)
    assert "torchrun job: 1 rank(s), gloo on cpu, dp=fsdp, ep=1" in out
    ref, got = final_params(reference), final_params(run)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-5
    assert losses(run) == pytest.approx(losses(reference), abs=1e-5)


def test_which_processes_are_ranks(monkeypatch):
    """torchrun's ranks (its TORCHELASTIC_RUN_ID) and worlds of several ranks are jobs; a process that only has
    RANK=0 WORLD_SIZE=1 in its environment is a plain one; CPU offload says how to start a one-rank job."""
    from nanoseek.config import ConfigError
    from nanoseek.train.config import ParallelConfig
    from nanoseek.train.loop import World
    from nanoseek.train.parallel import DistributedError, DistWorld, init_world

    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"torchrun --standalone --nproc-per-node 1 .* parallel.cpu_offload=true"):
        init_world(ParallelConfig(dp="fsdp", cpu_offload=True))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    world = init_world(ParallelConfig())
    assert type(world) is World and not isinstance(world, DistWorld)
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="WORLD_SIZE=2 is set but RANK is not: start the ranks with torchrun"):
        init_world(ParallelConfig())


def test_samples_from_sharded_weights_equal_one_process(data_dir, tmp_path):
    """The inference engine reads weights outside forward(): under FSDP2 + EP it gets them gathered, and the
    evaluation samples (greedy) are the single process's."""
    extra = ("eval.every=3", "eval.samples=2", "eval.temperature=0", "eval.sample_tokens=12")
    single(data_dir, tmp_path / "one", *extra, steps=3)
    torchrun(data_dir, tmp_path / "two", "parallel.dp=fsdp", "parallel.ep=2", *extra, steps=3)
    samples = [[r["samples"] for r in MetricsLog(tmp_path / run / "metrics.jsonl").records("eval")]
               for run in ("one", "two")]
    assert samples[0] == samples[1] and len(samples[0][0]) == 2 and samples[0][0][0]["completion"]


def _cut_at_step3(run: Path) -> None:
    """Turn a finished 6-step run into one interrupted after its step-3 checkpoint."""
    for p in (run / "checkpoints").glob("step_*"):
        if p.name != "step_000003":
            shutil.rmtree(p)
    (run / "checkpoints" / "LATEST").write_text("step_000003\n")


def test_resume_across_world_sizes(data_dir, reference, tmp_path):
    """Saved by 2 ranks (FSDP2 + EP), resumed by 1 process; saved by 1, resumed by 2: the same losses."""
    two = tmp_path / "two"
    torchrun(data_dir, two, "parallel.dp=fsdp", "parallel.ep=2", "checkpoint.every=3")
    assert {p.name for p in (two / "checkpoints" / "step_000003" / "state").iterdir()} == {
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"}
    rng = [load_file(two / "checkpoints" / "step_000003" / f"rng-{r}.safetensors")["cpu"] for r in (0, 1)]
    assert not torch.equal(*rng)  # each rank its own random numbers (dropout masks), saved as its own
    _cut_at_step3(two)
    r = _run([sys.executable, "-m", "nanoseek", "train", "--resume", str(two), "--no-progress"])
    assert r.returncode == 0 and "resuming a 2-rank run on 1 rank" in r.stdout, r.stdout + r.stderr
    assert losses(two) == pytest.approx(losses(reference), abs=1e-5)

    one = tmp_path / "one"
    shutil.copytree(reference, one)  # the same one-process run, saved every 3 steps
    _cut_at_step3(one)
    r = _run([*TORCHRUN, "-m", "nanoseek", "train", "--resume", str(one), "parallel.dp=ddp", "--no-progress"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert losses(one) == pytest.approx(losses(reference), abs=1e-5)
    ref, got = final_params(reference), final_params(one)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-5
    rng = [load_file(latest_checkpoint(one) / f"rng-{r}.safetensors")["cpu"] for r in (0, 1)]
    assert not torch.equal(*rng)  # the rank the one-process run did not have drew numbers of its own


def test_a_time_budgeted_run_plans_alike_on_every_rank(data_dir, tmp_path):
    """train.max_time on 2 ranks: the plan made after the timed first steps, and its check halfway through the rest
    (a collective decision: each rank's clock differs), are the same on both ranks; the job ends together."""
    out = tmp_path / "run"
    torchrun(data_dir, out, "parallel.dp=ddp", "train.max_time=6", steps=0)
    log = MetricsLog(out / "metrics.jsonl")
    plans, steps = log.records("plan"), log.records("train")
    assert plans and plans[-1]["total_steps"] >= steps[-1]["step"] >= 2 * 10  # long enough to be checked
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] in ("done", "time")


def test_export_consolidates_a_sharded_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    torchrun(data_dir, run, "parallel.dp=fsdp", "parallel.ep=2", "checkpoint.every=3")
    ckpt = run / "checkpoints" / "step_000006"
    out = tmp_path / "exported"
    r = _run([sys.executable, "-m", "nanoseek", "export", str(run), "--out", str(out), "--step", "3"])
    assert r.returncode == 0, r.stdout + r.stderr
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ours = nanoseek.from_pretrained(out)
    x = torch.randint(0, 512, (1, 12))
    assert (hf(x).logits - ours(x)).abs().max() < 1e-4
    assert (out / "tokenizer.json").is_file()
    assert (ckpt / "model.safetensors").is_file()  # the final checkpoint of a distributed run is exported too


FAULT = """
import os, sys
import nanoseek.train.checkpoint as ck
from nanoseek.cli import main
real, calls = ck.dcp.save, [0]
def save(*a, **k):
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "1":
        os._exit(3)  # this rank dies in the middle of the second checkpoint
    return real(*a, **k)
ck.dcp.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_rank_dying_mid_save_keeps_previous_checkpoint(data_dir, tmp_path):
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    run = tmp_path / "run"
    t0 = time.time()
    # the timeout only bounds a hang: rank 0 learns of the dead peer from the closed connection at once, while a short
    # one can expire in the first checkpoint's own I/O on a slow disk (rank 1 waits for rank 0's rename)
    r = _run([*TORCHRUN, str(script), *train_args(data_dir, run, "checkpoint.every=3", "parallel.timeout=60",
                                                  steps=9)])
    said = r.stdout[-3000:] + r.stderr[-5000:]
    assert r.returncode != 0, said
    assert time.time() - t0 < 120, said  # no hang
    # torchrun names the failed rank and its exit code
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: 3\b", r.stderr), said
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step_000003", said
    state = json.loads((ckpt / "trainer_state.json").read_text())["state"]
    assert state["step"] == 3
    r = _run([sys.executable, "-m", "nanoseek", "train", "--resume", str(run), "train.steps=6", "--no-progress"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_killed_rank_ends_the_job(data_dir, tmp_path):
    """kill -9 of one rank: torchrun stops the others and fails with the cause; nothing waits forever."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*TORCHRUN, "-m", "nanoseek", *train_args(data_dir, run, "parallel.timeout=30",
                                                                        steps=100000)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    os.kill(int(children[-1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Signal 9" in out or "SIGKILL" in out, out[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendezvous_timeout_is_a_clear_error(data_dir, tmp_path):
    """A job of 2 ranks where the second never starts fails after parallel.timeout, not never."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "nanoseek", *train_args(data_dir, tmp_path / "r", "parallel.timeout=5")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 2
    assert time.time() - t0 < 60
    assert "did not all join within parallel.timeout=5s" in " ".join(r.stdout.split())


def test_a_cpu_rank_takes_its_share_of_the_cores_or_nanoseek_threads(monkeypatch):
    """torchrun starts every rank with OMP_NUM_THREADS=1: on CPU a rank takes cores / local ranks threads instead,
    or NANOSEEK_THREADS where set (README, "Scaling out")."""
    from nanoseek.train.config import ParallelConfig
    from nanoseek.train.parallel import DistWorld, init_world, shutdown

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var, value in (("TORCHELASTIC_RUN_ID", "t"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(var, value)
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        for local_ranks, threads, expected in (("1", None, cores), (str(cores), None, 1), ("1", "1", 1),
                                               ("1", "3", 3)):
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
            if threads is None:
                monkeypatch.delenv("NANOSEEK_THREADS", raising=False)
            else:
                monkeypatch.setenv("NANOSEEK_THREADS", threads)
            torch.set_num_threads(7)
            world = init_world(ParallelConfig())
            try:
                assert isinstance(world, DistWorld) and torch.get_num_threads() == expected, (local_ranks, threads)
            finally:
                shutdown(world)
    finally:
        torch.set_num_threads(before)


def test_fsdp_gathers_the_routers_in_fp32_under_bf16():
    """FSDP2's bf16 policy gathers a block's weights in bf16; the routers are units of their own, gathered in fp32
    (routing stays fp32, V3 §3.3.2)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from nanoseek.train.config import ParallelConfig
    from nanoseek.train.parallel import DistWorld, gathered, parallelize

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        cfg = ParallelConfig(dp="fsdp")
        torch.manual_seed(0)
        model = nanoseek.NanoSeek(nanoseek.preset("tiny"))
        parallelize(model, DistWorld(cfg, 0, 1, torch.device("cpu")), bf16=True, cfg=cfg)
        seen: dict[str, torch.dtype] = {}
        block = model.layers[1]
        block.mlp.gate.register_forward_pre_hook(lambda m, a: seen.update(router=m.weight.dtype))
        block.self_attn.register_forward_pre_hook(lambda m, a: seen.update(attention=m.o_proj.weight.dtype))
        ids = torch.randint(0, model.config.vocab_size, (2, 17))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        (out.loss + out.mtp_loss).backward()
        assert seen == {"attention": torch.bfloat16, "router": torch.float32}
        assert block.mlp.gate.weight.grad is not None
        # the engine calls routers inside gathered(): they stay whole there (no re-gather, a collective, per step)
        with gathered(model), torch.no_grad():
            block.mlp.gate(torch.zeros(3, model.config.hidden_size))
            assert not isinstance(block.mlp.gate.weight, DTensor)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_parallel_rows_carry_any_expert_id(dtype):
    """The exchange's row format: a token once per rank, with its copies' gate weights and local expert ids (two
    base-256 digits in the row's dtype). 320 experts: ids past 256 are not exact as bf16 numbers, and must still
    reach their expert. Output and gradients equal the experts run in one process."""
    import types

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from nanoseek.model.moe import Experts
    from nanoseek.train.parallel import ExpertParallel

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        experts = Experts(types.SimpleNamespace(n_routed_experts=320, hidden_size=16, moe_intermediate_size=8))
        torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
        torch.nn.init.normal_(experts.down_proj, std=0.3)
        ep = ExpertParallel(experts, init_device_mesh("cpu", (1,), mesh_dim_names=("ep",)))
        x = torch.randn(64, 16).to(dtype).requires_grad_()
        indices = torch.rand(64, 320).topk(4, dim=-1).indices  # distinct experts per token, a fifth of them past 256
        weights = torch.rand(64, 4, requires_grad=True)
        counts = torch.bincount(indices.flatten(), minlength=320)
        results = []
        for module, params in ((experts, [experts.gate_up_proj, experts.down_proj]),
                               (ep, [ep.gate_up_proj, ep.down_proj])):
            out = module(x, indices, weights, counts)
            grads = torch.autograd.grad(out.float().square().sum(), [x, weights, *params])
            results.append([out, *(g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads)])
        for want, got in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5)
    finally:
        dist.destroy_process_group()
