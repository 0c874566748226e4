"""Benchmark PixNerd: training steps (img/s, MFU, peak memory) and sampling (s/step, s/image).

    python bench.py --model L/16 XL/16 --batch-size 32 64                 # a GPU, bf16
    python bench.py --what sample --model L/16 --batch-size 1 64 --compile graphs
    python bench.py --model S/16 --image-size 32 --batch-size 2 --iters 2 --warmup 1   # CPU smoke

A training step is the one train.py runs: flow-matching loss (REPA off), backward, fused AdamW,
fp32 EMA. MFU = 3 x forward FLOPs x img/s / 686 TFLOP/s (the bf16 matmul rate measured on an
H100); FLOPs are counted by torch's FlopCounterMode, not estimated.
"""
import argparse
import time

import torch

from model import MODELS
from samplers import guided, sample
from train import PEAK_FLOPS, Objective, count_flops, update_ema


def compiled(model, how):
    """none: eager; regions: each block and the head (what train.py does); full: the whole
    model; graphs: the whole model with CUDA graphs (mode="reduce-overhead")."""
    if how == "regions":
        model.compile_regions()
    elif how == "full":
        model.compile()
    elif how == "graphs":
        model.compile(mode="reduce-overhead")
    return model


def timed(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - t0) / iters, mem


def bench_train(name, head, batch, size, how, args, device):
    config = {"name": name, "kwargs": {"head": head}}
    model = MODELS[name](head=head).to(device)
    ema = MODELS[name](head=head).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    compiled(model, how)
    objective = Objective(model, None)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = objective(x, y, null=1000)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)

    t_compile = time.perf_counter()
    step()
    t_compile = time.perf_counter() - t_compile
    dt, mem = timed(step, args.iters, args.warmup, device)
    flops = count_flops(config, size)
    return dict(s_per_iter=dt, img_per_s=batch / dt, mfu=3 * flops * batch / dt / PEAK_FLOPS,
                peak_gib=mem, first_step_s=t_compile)


def bench_sample(name, head, batch, size, how, args, device):
    model = compiled(MODELS[name](head=head).to(device).eval().requires_grad_(False), how)
    noise = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    fn = guided(model, y, torch.full_like(y, 1000), 3.5, (0.1, 1.0))
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def run():
        with autocast:
            sample(fn, noise, args.sample_steps, "euler")

    dt, mem = timed(run, max(1, args.iters // 10), 1, device)
    return dict(s_per_step=dt / args.sample_steps, s_per_image=dt / batch, img_per_s=batch / dt, peak_gib=mem)


def check(name, size, how, device):
    """Relative error of the fast path (bf16 autocast, compiled) against fp32 eager on the same
    weights; the zero-initialised output layer is randomised so that every path contributes."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device).eval()
    for p in model.head.out.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(4, 3, size, size, device=device)
    t, y = torch.rand(4, device=device), torch.randint(0, 1000, (4,), device=device)
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = model(x, t, y).double()
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.autocast(device.type, torch.bfloat16):
            fast = compiled(model, how)(x, t, y).double()
    return dict(rel_err=((fast - ref).norm() / ref.norm()).item())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", choices=["train", "sample", "check"], default=["train"])
    p.add_argument("--model", nargs="+", choices=list(MODELS), default=["L/16"])
    p.add_argument("--head", nargs="+", choices=["nerf", "linear"], default=["nerf"])
    p.add_argument("--batch-size", nargs="+", type=int, default=[32, 64])
    p.add_argument("--compile", nargs="+", choices=["none", "regions", "full", "graphs"],
                   default=["regions" if torch.cuda.is_available() else "none"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sample-steps", type=int, default=50)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, {args.image_size}px")
    else:
        print(f"# CPU, torch {torch.__version__}, fp32, {args.image_size}px")
    for what in args.what:
        for name in args.model:
            for head in args.head:
                for how in args.compile:
                    for batch in args.batch_size:
                        torch._dynamo.reset()
                        try:
                            if what == "check":
                                r = check(name, args.image_size, how, device)
                            else:
                                fn = bench_train if what == "train" else bench_sample
                                r = fn(name, head, batch, args.image_size, how, args, device)
                        except torch.OutOfMemoryError:
                            r = {"error": "out of memory"}
                        cells = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
                        print(f"{what:6s} {name:6s} {head:6s} {how:8s} batch {batch:3d} | {cells}", flush=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
