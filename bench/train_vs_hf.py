"""Training throughput of nanoseek vs transformers' DeepseekV3ForCausalLM on the same machine.

Same config (the `demo` preset: 32 routed experts, MTP off since transformers does not train it), same weights,
same batch, same threads, the same AdamW (fused where torch has it), fp32 and bf16 autocast, one process.
Steps of the two alternate in rounds and the median round counts, because this machine is noisy.
transformers runs its fastest experts implementation (each is screened first) with SDPA attention.
Prints tokens/s, the ratio, and nanoseek's model FLOPs utilisation against a matmul peak measured here.

    python bench/train_vs_hf.py                      # fp32 and bf16, batch 8 x 256
    python bench/train_vs_hf.py --batch 2 --seq 1024 --dtypes fp32 --profile
    python bench/train_vs_hf.py --device cuda --preset small --batch 32 --seq 1024 --dtypes bf16 --profile
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

import nanoseek
from nanoseek.cost.flops import train_flops_per_token
from nanoseek.cost.hardware import peak_flops
from nanoseek.device import pick_device

warnings.filterwarnings("ignore")


def make_step(model, opt, inputs, labels, autocast: bool, nanoseek_api: bool):
    def step() -> None:
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast):
            if nanoseek_api:
                loss = model(inputs, labels=labels, return_logits=False).loss
            else:  # transformers shifts the labels itself
                loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if inputs.device.type == "cuda":  # the step's time is its kernels' time, not the launches'
            torch.cuda.synchronize(inputs.device)

    return step


def timed(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=1, help="steps per round and implementation")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--profile", action="store_true", help="print where nanoseek's step time goes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    args = p.parse_args()
    device = pick_device(args.device)

    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = nanoseek.preset(args.preset, num_nextn_predict_layers=0, max_position_embeddings=max(args.seq, 1024))
    tokens = args.batch * args.seq
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1)).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    flops_per_step = train_flops_per_token(cfg, args.seq) * tokens
    fused = {"fused": True} if hasattr(torch, "_fused_adamw_") else {}
    print(f"config: {args.preset} preset, {cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}), "
          f"MTP off; batch {args.batch} x {args.seq} tokens; {device}"
          f"{f' ({args.threads} threads)' if device.type == 'cpu' else ''}; torch {torch.__version__}")
    print(f"model FLOPs per step: {flops_per_step / 1e9:.1f} GFLOP (6N + causal attention)")

    with tempfile.TemporaryDirectory() as ckpt:
        nanoseek.NanoSeek(cfg).save_pretrained(ckpt)
        for dtype in args.dtypes.split(","):
            autocast = dtype == "bf16"
            peak, peak_source = peak_flops(device, dtype)
            ours = nanoseek.from_pretrained(ckpt).to(device)
            ours.train()
            ours_step = make_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused), inputs, labels,
                                  autocast, True)

            # screen transformers' experts implementations on one sequence; keep the fastest
            screen_in, screen_lab = inputs[:1], labels[:1]
            best = None
            for impl in ("grouped_mm", "eager", "batched_mm"):
                hf = DeepseekV3ForCausalLM.from_pretrained(ckpt, experts_implementation=impl,
                                                           attn_implementation="sdpa").to(device).train()
                opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, **fused)
                screen = make_step(hf, opt, screen_in, screen_lab, autocast, False)
                screen()
                t = timed(screen, 1) * args.batch
                print(f"  [{dtype}] transformers experts_implementation={impl}: ~{tokens / t:.0f} tokens/s (screen)")
                if best is None or t < best[0]:
                    best = (t, impl, make_step(hf, opt, inputs, labels, autocast, False))
            _, impl, hf_step = best

            for s in (ours_step, hf_step):  # warm-up
                s()
            # alternate single steps; the ratio of each pair is robust to this machine's changing load
            r_ours, r_hf = [], []
            for _ in range(args.rounds):
                r_ours.append(timed(ours_step, args.steps))
                r_hf.append(timed(hf_step, args.steps))
            t_ours, t_hf = statistics.median(r_ours), statistics.median(r_hf)
            ratio = statistics.median(h / o for h, o in zip(r_hf, r_ours))
            mfu = flops_per_step / t_ours / peak
            print(f"[{dtype}] nanoseek {tokens / t_ours:8.0f} tokens/s ({t_ours * 1e3:.0f} ms/step) | "
                  f"transformers ({impl}) {tokens / t_hf:8.0f} tokens/s ({t_hf * 1e3:.0f} ms/step) | "
                  f"ratio {ratio:.2f}x (median of {args.rounds} paired rounds) | nanoseek MFU {100 * mfu:.1f}% "
                  f"of {peak / 1e9:.0f} GFLOP/s ({peak_source})")
            if args.profile:
                profile(ours_step, dtype, device, t_ours)


def profile(step, dtype: str, device: torch.device, step_time: float) -> None:
    """Share of nanoseek's step time by kind of operation; on a GPU, the kernels that take it and how much of the
    (unprofiled) step they fill: the rest is the GPU waiting for the CPU to launch work."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]
    with torch_profile(activities=activities) as prof:
        for _ in range(2):
            step()
    if gpu:  # kernels only: an operator's entry also counts the kernels it launched
        busy = sum(ev.self_device_time_total for ev in prof.key_averages() if ev.device_type == DeviceType.CUDA) / 2e3
        print(f"  [{dtype}] GPU kernels {busy:.0f} ms per step of {step_time * 1e3:.0f} ms unprofiled "
              f"({100 * busy / (step_time * 1e3):.0f}% busy)")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
        return
    groups = {"matmul (mm/bmm/addmm)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_"),
              "attention (sdpa)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
              "optimizer": ("aten::_fused_adamw_",)}
    totals = dict.fromkeys(groups, 0.0)
    everything = 0.0
    for ev in prof.key_averages():
        everything += ev.self_cpu_time_total
        for g, names in groups.items():
            if ev.key in names:
                totals[g] += ev.self_cpu_time_total
    shares = ", ".join(f"{g} {100 * v / everything:.0f}%" for g, v in totals.items())
    print(f"  [{dtype}] nanoseek step time: {shares}, everything else "
          f"{100 * (everything - sum(totals.values())) / everything:.0f}%")


if __name__ == "__main__":
    main()
