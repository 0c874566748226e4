"""Benchmark PixNerd: training steps (img/s, MFU, peak memory) and sampling (s/step, s/image).

    python bench.py --model L/16 XL/16 --batch-size 32 64                 # a GPU, bf16
    python bench.py --model L/16 --head nerf linear --fast on off          # what the head costs
    python bench.py --what sample --model L/16 --batch-size 1 64
    python bench.py --what check --model L/16 XL/16                        # numerics of the fast layer
    python bench.py --model L/16 --batch-size 64 --profile 30              # where the step's time goes
    python bench.py --model L/16 --batch-size 32 --cuda-graphs off on      # train.py --cuda-graphs
    python bench.py --model S/16 --image-size 32 --batch-size 2 --iters 2 --warmup 1   # CPU smoke

A training step is the one train.py runs: flow-matching loss (REPA with --repa on), backward, AdamW
and the fp32 EMA; with --fast on (CUDA) through fast.for_training, as train.py (bf16 compute copies, fused
kernels, compiled blocks, one AdamW + EMA kernel), with off the plain torch step. MFU = 3 x forward
FLOPs x img/s / the card's bf16 matmul rate (fast.peak_flops); FLOPs are counted by torch's
FlopCounterMode, not estimated. Times are the median of four back-to-back chunks of --iters calls;
`spread` (slowest chunk over fastest) above 1.1 is flagged as unsteady.
"""
import argparse
import copy
import gc
import itertools
import math
import statistics
import time

import torch

import fast
from fast import optim
from dinov2 import DINOv2, repa_target
from flow import REPAProjector, training_losses
from model import MODELS
from samplers import guided, sample


def kernel_kind(name):
    """What a CUDA kernel (by its profiler name) does, for the profile's summary by kind."""
    if name.startswith("triton_"):
        return "Inductor elementwise/reduction"
    if name in ("_fwd_kernel", "_out_grad_kernel", "_bwd_kernel", "_field_kernel"):
        return "neural-field kernels"
    if name == "_swiglu_gemm":  # fast/blocks.py's fc1 + SiLU gate (sampling)
        return "matmul"
    for kind, keys in (("matmul", ("gemm", "nvjet", "cutlass", "cublas", "splitK")),
                       ("attention", ("sdpa", "flash", "fmha", "attention", "cudnn")),
                       ("AdamW + EMA", ("multi_tensor_apply", "_adamw_ema_kernel"))):
        if any(k in name for k in keys):
            return kind
    return "other"


def timed(fn, iters, warmup, device, profile=0):
    """Seconds per call, the spread of the timing and peak GiB. The iters calls run back to back
    in up to four chunks; the figure is the median chunk's, so that one stall (a late compile,
    another process) moves the spread (slowest chunk over fastest) rather than the figure.
    profile > 0 also prints the top kernels of one more call and, on a GPU, their time by kind."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    k, chunks = min(4, iters), []
    for n in [iters // k + (i < iters % k) for i in range(k)]:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        chunks.append((time.perf_counter() - t0) / n)
    dt, spread = statistics.median(chunks), max(chunks) / min(chunks)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    if profile:
        from torch.profiler import ProfilerActivity
        gpu = device.type == "cuda"
        with torch.profiler.profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            fn()
            if gpu:
                torch.cuda.synchronize()
        events = prof.key_averages()
        print(events.table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                           row_limit=profile, max_name_column_width=60))
        if gpu:  # the same kernels summed by kind
            kinds = {}
            for e in events:
                us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                if e.device_type == torch.autograd.DeviceType.CUDA and us > 0:
                    kind = kernel_kind(e.key)
                    kinds[kind] = kinds.get(kind, 0) + us
            total = sum(kinds.values())
            print(f"GPU time of the call: {total / 1e3:.1f} ms; " + ", ".join(
                f"{k} {v / 1e3:.1f} ms ({100 * v / total:.0f}%)" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    return dt, spread, mem


def conditions(model, batch, device):
    """The condition and its CFG null for `batch` images: labels and the null class, or for
    text-to-image models random text features with padding masks of lengths 3, 16, 40 and all (in
    turn) and the empty prompt (zero features, no real tokens)."""
    if model.text_dim is None:
        return torch.randint(0, 1000, (batch,), device=device), torch.full((batch,), 1000, device=device)
    L = model.text_pos.shape[1]
    lengths = torch.tensor([3, 16, 40, L], device=device).repeat(-(-batch // 4))[:batch, None]
    y = (torch.randn(batch, L, model.text_dim, device=device), torch.arange(L, device=device) < lengths)
    return y, tuple(torch.zeros_like(v) for v in y)


def bench_train(name, head, batch, size, how, fast_on, graphs, args, device):
    config = {"name": name, "kwargs": {"head": head}}
    model = MODELS[name](head=head).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    encoder = projector = None
    if args.repa == "on":  # a DINOv2 ViT-B/14 of random weights: the same work as the real one
        encoder = DINOv2().to(device).requires_grad_(False).eval()
        projector = REPAProjector(model.patch_embed.out_features).to(device)
    params = [*model.parameters(), *(projector.parameters() if projector else [])]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    if fast_on == "on":  # as train.py
        net, opt_step, _ = fast.for_training(model, ema, opt, ema_decay=0.9999, compile=how == "regions",
                                             cuda_graphs=graphs == "on", encoder=encoder, log=lambda msg: None)
    else:  # train.py --no-fast: plain torch (compiled here if asked, to see what the kernels add)
        net = fast.compile_regions(model) if how == "regions" else model

        def opt_step():
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
            opt.step()
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - 0.9999)
            return norm
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    y, null = conditions(model, batch, device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    tokens = size // model.patch_size

    def step():
        with autocast:
            target = None if encoder is None else repa_target(encoder, x, tokens, tokens)
            loss = training_losses(net, x, y, null=null, projector=projector, repa_target=target)["loss"]
        loss.backward()
        opt_step()
        opt.zero_grad(set_to_none=True)

    t_compile = time.perf_counter()
    step()
    t_compile = time.perf_counter() - t_compile
    dt, spread, mem = timed(step, args.iters, args.warmup, device, args.profile)
    if graphs == "on":  # train.py's figure: the graphs' pools are reserved, not allocated, while they replay
        mem = fast.peak_gib(device, graphs=True)
    flops = fast.count_flops(config, size)
    mfu = 3 * flops * batch / dt / fast.peak_flops(device) if device.type == "cuda" else float("nan")
    return dict(s_per_iter=dt, img_per_s=batch / dt, mfu=mfu, peak_gib=mem, first_step_s=t_compile, spread=spread)


def bench_sample(name, head, batch, size, how, fast_on, graphs, args, device):
    model = MODELS[name](head=head).to(device).eval().requires_grad_(False)
    if fast_on == "on":  # as sample.py
        net = fast.for_sampling(model, compile=None if how == "none" else how, cuda_graphs=graphs == "on")
    else:
        net = fast.compile_regions(model) if how == "regions" else model
    noise = torch.randn(batch, 3, size, size, device=device)
    fn = guided(net, *conditions(model, batch, device), 3.5, (0.1, 1.0))
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def run():
        with autocast:
            sample(fn, noise, args.sample_steps, "euler")

    t_first = time.perf_counter()
    run()
    t_first = time.perf_counter() - t_first
    dt, spread, mem = timed(run, max(1, args.iters // 10), 0, device, args.profile)
    return dict(first_run_s=t_first, s_per_step=dt / args.sample_steps, s_per_image=dt / batch, img_per_s=batch / dt,
                peak_gib=mem, spread=spread)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def optim_check(model):
    """Two AdamW + EMA steps from model's weights and gradients, the kernel against torch's fused
    AdamW and lerp: the largest difference of a parameter or EMA weight, in units in the last place
    of the larger of its value before and torch's after (a result near 0 can cancel those digits)."""
    out = []
    for kernel in (False, True):
        m, ema = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        for _ in range(2):
            for p, q in zip(m.parameters(), model.parameters()):
                p.grad = None if q.grad is None else q.grad.clone()
            optim.step(opt, ema, m, 0.9, kernel=kernel)
        out.append([*m.parameters(), *ema.parameters()])
    ulp = lambda a: torch.nextafter(a, torch.tensor(float("inf"), device=a.device)) - a
    before = [*model.parameters(), *model.parameters()]
    return max(((b - a).abs() / ulp(torch.maximum(a.abs(), p.abs()))).max().item()
               for a, b, p in zip(*out, before))


def check(name, head, batch, size, how, fast_on, graphs, args, device):
    """Relative errors against fp32 eager on the same weights: the path train.py and sample.py run
    (bf16 autocast, the fast layer if on, compiled as --compile says) and the plain bf16 path; with
    the fast layer, its eager modules against the plain bf16 ones, velocity and gradients, the
    inference kernels, the AdamW + EMA kernel and CUDA-graph sampling. The zero-initialised output
    layer is randomised so that every path contributes. head and batch are fixed (nerf, 4).
    Text-to-image models get random text features with padding masks of lengths 3, 16, 40 and all."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    for p in model.head.out.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(4, 3, size, size, device=device)
    t = torch.rand(4, device=device)
    cond = conditions(model, 4, device)
    y = cond[0] if model.text_dim else cond[:1]  # the model's arguments after x and t
    autocast = torch.autocast(device.type, torch.bfloat16)
    fast_model = copy.deepcopy(model)
    swapped = fast.enable(fast_model) if fast_on == "on" else 0
    outs = []  # forward and backward: fp32, plain bf16, fast bf16 (eager)
    for m, cast in ((model, False), (model, True), (fast_model, True)):
        m.zero_grad(set_to_none=True)
        torch.backends.cuda.matmul.allow_tf32 = cast
        with torch.autocast(device.type, torch.bfloat16, enabled=cast):
            v = m(x, t, *y)
        v.float().square().mean().backward()
        outs.append((v.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    torch.backends.cuda.matmul.allow_tf32 = True
    ref = outs[0][0]
    r = {"plain_bf16_vs_fp32_v": rel(outs[1][0], ref), "plain_bf16_vs_fp32_grads": max(
        rel(a, b) for a, b in zip(outs[1][1], outs[0][1]))}
    if swapped:
        r["fast_vs_plain_v"] = rel(outs[2][0], outs[1][0])
        r["fast_vs_fp32_v"] = rel(outs[2][0], ref)
        r["fast_vs_fp32_grads"] = max(rel(a, b) for a, b in zip(outs[2][1], outs[0][1]))
        if optim.triton is not None and device.type == "cuda":  # these gradients, two steps
            r["adamw_ema_kernel_vs_torch_ulps"] = optim_check(model)
        with torch.no_grad(), autocast:  # inference: the whole-field and SwiGLU kernels
            r["fast_inference_vs_plain_v"] = rel(fast_model(x, t, *y), model(x, t, *y))
    net = fast.compile_regions(fast_model) if how == "regions" else fast_model
    with torch.no_grad(), autocast:
        r["bf16_vs_fp32_v"] = rel(net(x, t, *y), ref)  # what train.py and sample.py compute
        if graphs == "on" and device.type == "cuda":  # sample.py's path: bf16 weights, CUDA graphs
            fn = guided(model, *cond, 3.5, (0.1, 1.0))
            fast_fn = guided(fast.for_sampling(copy.deepcopy(model)), *cond, 3.5, (0.1, 1.0))
            r["sample_py_vs_plain_sample"] = rel(sample(fast_fn, x, 10), sample(fn, x, 10))
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", choices=["train", "sample", "check"], default=["train"])
    p.add_argument("--model", nargs="+", choices=list(MODELS), default=["L/16"])
    p.add_argument("--head", nargs="+", choices=["nerf", "linear"], default=["nerf"])
    p.add_argument("--batch-size", nargs="+", type=int, default=[32, 64])
    p.add_argument("--compile", nargs="+", choices=["none", "regions", "full"],
                   default=["regions" if torch.cuda.is_available() else "none"])
    p.add_argument("--fast", nargs="+", choices=["on", "off"], default=["on"],
                   help="the fast layer (fast/: bf16 copies, fused kernels, AdamW + EMA kernel), as train.py and "
                        "sample.py run it (CUDA + Triton; the plain path elsewhere whatever this says)")
    p.add_argument("--cuda-graphs", nargs="+", choices=["on", "off"], default=None,
                   help="sampling: replay each model call (default on); compiled CUDA training: the compiled "
                        "regions in reduce-overhead mode, as train.py --cuda-graphs (default off)")
    p.add_argument("--repa", choices=["on", "off"], default="off",
                   help="training with REPA (train.py --repa-encoder), a DINOv2 ViT-B/14 of random weights")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the N kernels with the most time in one more step (torch profiler); "
                        "with --what sample use --cuda-graphs off to see inside the model")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, {args.image_size}px, REPA {args.repa}")
    else:
        print(f"# CPU, torch {torch.__version__}, fp32, {args.image_size}px, REPA {args.repa}")
    fns, seen = {"train": bench_train, "sample": bench_sample, "check": check}, set()
    for what, name, head, how, kernel, graphs, batch in itertools.product(
            args.what, args.model, args.head, args.compile, args.fast, args.cuda_graphs or ["default"],
            args.batch_size):
        if graphs == "default":
            graphs = "off" if what == "train" else "on"
        if what == "train" and (how == "none" or device.type != "cuda"):
            graphs = "-"  # CUDA graphs come with compiled CUDA training
        if what == "check":
            head, batch = "nerf", 4
        if what == "train" and how == "full":
            continue  # train.py compiles regions only
        if kernel == "on" and not fast.nerf.available():
            kernel = "n/a"  # no Triton or no GPU: the plain path
        if device.type != "cuda" and what != "train":
            graphs = "n/a"
        if (what, name, head, how, kernel, graphs, batch) in seen:
            continue
        seen.add((what, name, head, how, kernel, graphs, batch))
        torch._dynamo.reset()
        try:
            r = fns[what](name, head, batch, args.image_size, how, kernel, graphs, args, device)
        except torch.OutOfMemoryError:
            r = {"error": "out of memory"}
        cells = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
        print(f"{what:6s} {name:6s} {head:6s} {how:7s} fast {kernel:3s} graphs {graphs:3s} batch {batch:3d} | {cells}",
              flush=True)
        if r.get("spread", 1) > 1.1:
            print(f"# unsteady: the slowest chunk of calls took {r['spread']:.2f}x the fastest; "
                  "rerun with more --warmup and --iters", flush=True)
        if device.type == "cuda":  # the next peak without this run's tensors (compiled modules hold cycles)
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
