"""The GPU check of the NCCL + bf16 training path and of serving on a GPU, as one prepared run with timeouts.

One GPU cannot hold two NCCL ranks (NCCL refuses a second rank on a device it already has), so the distributed
path runs as a one-rank torchrun job: a real NCCL process group, the DDP / FSDP2 wrappers (CPU offload and
activation checkpointing too) and distributed checkpoints, as on a larger machine. What it runs and prints:

  0. tests/test_gpu.py: loading onto the GPU, the engine there (greedy, seeded, speculative), bf16 experts, a bf16
     training step through the grouped GEMM.
  1. bf16, the small preset: a plain process, a torchrun NCCL DDP job, a torchrun NCCL FSDP2 job with CPU offload
     and activation checkpointing; each run's tokens/s, MFU, energy and losses (the three agree within bf16 noise),
     and its final evaluation's samples (the engine on the training weights: gathered and bf16 under FSDP2).
  2. fp32: a one-rank NCCL FSDP2 job ends where the plain process does (max |Δweight|), and a plain process that
     resumes the job's step-3 checkpoint repeats the job's last losses.
  3. serving on the GPU: bench/serve_load.py (1, 4, 16 clients) on the model of run 1, then bench/decode_vs_hf.py.
  4. the machine's CPU cores, for the two speed goals that 2 shared vCPUs leave open: bench/scaling.py's EP vs DDP
     at 2 ranks of half the cores each (its warm-up trained on the GPU), and bench/serve_load.py --device cpu.

    python bench/gpu_check.py --data runs/demo/data-python-stdlib --out /tmp/gpu     # on the GPU machine
    python bench/gpu_check.py --data runs/demo/data-python-stdlib --out /tmp/gpu --skip 123   # tests, CPU goals
    python bench/gpu_check.py --data runs/demo/data-python-stdlib --out /tmp/g --device cpu --quick   # rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "nanoseek"]
NANOSEEK = [sys.executable, "-m", "nanoseek"]
RUNS = ("bf16-plain", "bf16-nccl-ddp", "bf16-nccl-fsdp-offload-ac")
DEADLINE = float("inf")


def run(name: str, cmd: list[str], timeout: float, logs: Path) -> tuple[int, str]:
    """Run one step with a time limit (and within --budget); its whole output goes to logs/NAME.log and its tail to
    the console."""
    timeout = min(timeout, DEADLINE - time.monotonic())
    if timeout < 20:
        print(f"\n=== {name}: skipped, the --budget is spent", flush=True)
        return 125, ""
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    # A session of its own, so that a timeout stops the whole step: SIGTERM to its process group (torchrun then
    # stops its ranks, which run in sessions of their own; serve_load.py stops its server), SIGKILL if that hangs.
    # Otherwise a stopped step's processes would keep the GPU busy while the next steps are timed.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        out, rc = proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0]
        rc, out = 124, out + f"\n[stopped after {timeout:g} s]"
    (logs / f"{name}.log").write_text(out)
    tail = "\n".join(out.rstrip().splitlines()[-14:])
    print(f"{tail}\n--- {name}: exit {rc} in {time.perf_counter() - t:.0f} s", flush=True)
    return rc, out


def records(run_dir: Path, kind: str) -> list[dict]:
    from nanoseek.train.run import MetricsLog

    return MetricsLog(run_dir / "metrics.jsonl").records(kind)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir, "train")]


def summary(run_dir: Path) -> str:
    path = run_dir / "summary.json"
    if not path.is_file():
        return "no summary.json"
    s = json.loads(path.read_text())
    keys = [k for k in s if (k in ("steps", "tokens_per_s", "dtype", "final_train_loss", "val_loss") or
            any(w in k for w in ("mfu", "energy", "kwh", "power", "co2"))) and len(str(s[k])) < 40]
    return ", ".join(f"{k}={s[k]:.4g}" if isinstance(s[k], float) else f"{k}={s[k]}" for k in keys)


def max_weight_diff(a: Path, b: Path) -> float:
    import nanoseek
    from nanoseek.train.checkpoint import latest_checkpoint

    sa = nanoseek.from_pretrained(latest_checkpoint(a)).state_dict()
    sb = nanoseek.from_pretrained(latest_checkpoint(b)).state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared data folder (nanoseek data prepare / make demo)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: rehearse the script on a CPU")
    p.add_argument("--steps", type=int, default=20, help="bf16 steps of each run of part 1")
    p.add_argument("--skip", default="", help="parts to leave out, e.g. 3")
    p.add_argument("--budget", type=float, default=0, help="seconds for all of it (0: no limit); later steps skip")
    args = p.parse_args()
    global DEADLINE
    if args.budget:
        DEADLINE = time.monotonic() + args.budget
    out, logs = Path(args.out).resolve(), Path(args.out).resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for part, names in (("1", RUNS), ("2", ("fp32-plain", "fp32-nccl-fsdp", "fp32-resumed"))):
        for name in names if part not in args.skip else ():
            shutil.rmtree(out / name, ignore_errors=True)
    data = str(Path(args.data).resolve())
    vocab = json.loads((Path(data) / "index.json").read_text()).get("vocab_size", 8192)
    common = [f"data.path={data}", f"model.vocab_size={vocab}", "train.tokens=0", "train.batch_size_start=0",
              "train.batch_ramp_tokens=0", "--no-progress"]
    if args.quick:
        size = ["model.preset=tiny", "data.seq_len=128", "train.batch_size=4", "train.micro_batch_size=4"]
    else:
        size = ["data.seq_len=1024", "train.batch_size=32", "train.micro_batch_size=32"]
    bf16 = ["train", str(ROOT / "configs" / "small.toml"), *common, *size, f"train.steps={args.steps}",
            "optim.warmup=100000", f"train.log_every={max(args.steps // 6, 1)}", "eval.every=0", "eval.batches=4",
            "eval.samples=2", "eval.sample_tokens=16", "train.dtype=bf16",
            f"train.device={args.device}", "checkpoint.every=0"]
    results: list[str] = []

    if "0" not in args.skip:
        os.environ["NANOSEEK_TEST_DEVICE"] = args.device
        rc, out_ = run("test-gpu", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    str(ROOT / "tests" / "test_gpu.py")], 180, logs)
        results.append(f"tests/test_gpu.py: {(out_.strip().splitlines() or ['no output'])[-1]} (exit {rc})")

    if "1" not in args.skip:
        extra = {"bf16-nccl-ddp": ["parallel.dp=ddp"],
                 "bf16-nccl-fsdp-offload-ac": ["parallel.dp=fsdp", "parallel.activation_checkpointing=true",
                                               *(["parallel.cpu_offload=true"] if args.device != "cpu" else [])]}
        for name in RUNS:
            head = NANOSEEK if name == "bf16-plain" else TORCHRUN
            rc, _ = run(name, [*head, *bf16, f"train.out_dir={out / name}", *extra.get(name, [])], 180, logs)
            if rc == 0:
                ls = losses(out / name)
                samples = [s for r in records(out / name, "eval") for s in r.get("samples", [])]
                results.append(f"{name}: {summary(out / name)}; losses {ls[0]:.4f} .. {ls[-1]:.4f}; "
                               f"{len(samples)} samples, e.g. {samples[-1] if samples else None}")
            else:
                results.append(f"{name}: FAILED (exit {rc}, logs/{name}.log)")

    if "2" not in args.skip:
        fp32 = ["train", str(ROOT / "configs" / "tiny.toml"), *common, "data.seq_len=128", "train.batch_size=8",
                "train.micro_batch_size=4", "train.steps=6", "train.log_every=1", "eval.every=0", "eval.batches=2",
                "eval.samples=0", "train.dtype=fp32", f"train.device={args.device}", "checkpoint.every=3",
                "balance.bias_update_speed=0.01"]
        one, job = out / "fp32-plain", out / "fp32-nccl-fsdp"
        rc1, _ = run("fp32-plain", [*NANOSEEK, *fp32, f"train.out_dir={one}"], 150, logs)
        rc2, _ = run("fp32-nccl-fsdp", [*TORCHRUN, *fp32, f"train.out_dir={job}", "parallel.dp=fsdp"], 150, logs)
        if rc1 == 0 and rc2 == 0:
            diff = max_weight_diff(one, job)
            la, lb = losses(one), losses(job)
            results.append(f"fp32 one-rank NCCL FSDP2 vs plain after 6 steps: max |dw| = {diff:.2e}, max |dloss| = "
                           f"{max(abs(x - y) for x, y in zip(la, lb)):.2e}")
            cut = out / "fp32-resumed"
            shutil.copytree(job, cut)
            for c in (cut / "checkpoints").glob("step_*"):
                if c.name != "step_000003":
                    shutil.rmtree(c)
            (cut / "checkpoints" / "LATEST").write_text("step_000003\n")
            rc3, _ = run("fp32-resume-plain", [*NANOSEEK, "train", "--resume", str(cut), "--no-progress"], 150, logs)
            if rc3 == 0:
                lc = losses(cut)
                results.append(f"resume of the job's step 3 in a plain process: losses 4-6 {lb[3:]} vs {lc[3:]}, "
                               f"max |dloss| = {max(abs(x - y) for x, y in zip(lb[3:], lc[3:])):.2e}")
            else:
                results.append(f"fp32 resume: FAILED (exit {rc3})")
        else:
            results.append(f"fp32 equality: FAILED (exits {rc1}, {rc2})")

    if "3" not in args.skip:
        model = out / "bf16-plain"
        if (model / "checkpoints").is_dir():
            run("serve-load-eager", [sys.executable, str(ROOT / "bench" / "serve_load.py"), str(model), "--device",
                                     args.device, "--eager", "--rounds", "2", "--requests", "2"], 240, logs)
        new = ["--new", "16", "--rounds", "1"] if args.quick else ["--rounds", "3"]
        run("decode-vs-hf", [sys.executable, str(ROOT / "bench" / "decode_vs_hf.py"), "--device", args.device,
                             "--batches", "1,16", *new], 240, logs)
        if (model / "checkpoints").is_dir():
            run("serve-load-compiled", [sys.executable, str(ROOT / "bench" / "serve_load.py"), str(model),
                                        "--device", args.device, "--rounds", "2", "--requests", "2"], 240, logs)

    if "4" not in args.skip:
        cache = out / "bench-data"  # bench/scaling.py's cache, its data the --data folder
        cache.mkdir(exist_ok=True)
        if not (cache / "data").exists():
            (cache / "data").symlink_to(data)
        sizes = ["--steps", "2", "--warm-steps", "4", "--repeats", "1"] if args.quick else [
            "--steps", "12", "--warm-steps", "240", "--repeats", "3"]
        run("scaling-ep-vs-ddp-cpu", [sys.executable, str(ROOT / "bench" / "scaling.py"), "--ep-sweep", "32",
                                      "--vocab", str(vocab), "--cache", str(cache), *sizes], 300, logs)
        clients = ["--clients", "1,4", "--rounds", "1", "--requests", "1"] if args.quick else ["--rounds", "2"]
        run("serve-load-cpu", [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--device", "cpu", *clients],
            240, logs)

    print("\n=== results")
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
