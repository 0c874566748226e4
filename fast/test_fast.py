"""Tests of the fast layer (fast/): each piece against the plain path it replaces.

The kernels' checks are programs in fast/checks/, run in Triton's CPU interpreter where Triton is
installed; without it (CI) the tests check that the fast modules fall back to the plain forwards.
"""
import ast
import copy
import importlib.util
import inspect
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import bench
import fast
import sample
from fast import blocks as block_kernel, nerf as nerf_kernel, optim as optim_kernel
from fast.blocks import FastAttention, FastBlock, FastSwiGLU
from fast.graphs import CUDAGraphs
from fast.nerf import FastNerfBlock, FastNerfHead, patch_mlp, reference_head
from fast.precision import bf16_linears, compute_copy
from model import MODELS
from nerf_head import NerfHead
from test_pixnerd import cli, free_port, live, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The seam: the core knows nothing of the fast layer, no script imports another
# ---------------------------------------------------------------------------------------------

def imports(path):
    """The top-level modules a file imports."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_only_torch():
    """model.py, nerf_head.py, flow.py and samplers.py import torch (and the standard library's
    math and contextlib), model.py also the head: nothing of the fast layer, no script."""
    allowed = {"torch", "math", "contextlib"}
    for path in ("nerf_head.py", "flow.py", "samplers.py"):
        assert imports(path) <= allowed, (path, imports(path) - allowed)
    assert imports("model.py") <= allowed | {"nerf_head"}, imports("model.py")


def test_no_script_imports_a_script():
    """train.py, sample.py and bench.py import modules only (fid.py is the FID module; its main() is
    its command line, and train.py --fid-every uses its OnlineFID)."""
    scripts = {"train", "sample", "bench"}
    for path in [f for f in os.listdir(ROOT) if f.endswith(".py") and not f.startswith("test_")] + \
            [os.path.join("fast", f) for f in os.listdir(os.path.join(ROOT, "fast")) if f.endswith(".py")
             and not f.startswith("test_")]:
        assert not imports(path) & scripts, (path, imports(path) & scripts)


def test_fast_modules_fall_back_to_the_plain_forwards():
    """enable() swaps the blocks, attentions, SwiGLUs and field modules for the fast subclasses in
    place (same parameters and state-dict keys); off the GPU each runs the plain forward, so the
    velocity and every gradient are bitwise those of the plain model. Without Triton or CUDA it
    swaps nothing."""
    torch.manual_seed(0)
    model = live(MODELS["XS/16"]())
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    ref = model(x, t, y)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    keys = list(model.state_dict())
    if not nerf_kernel.available():
        assert fast.enable(model) == 0 and type(model.head) is NerfHead
    swapped = copy.deepcopy(model)
    available = (nerf_kernel.available, block_kernel.available)
    nerf_kernel.available = block_kernel.available = lambda: True
    try:
        assert fast.enable(swapped) == 2 + 4  # two field layers, four blocks
    finally:
        nerf_kernel.available, block_kernel.available = available
    assert type(swapped.head) is FastNerfHead and type(swapped.head.blocks[0]) is FastNerfBlock
    assert (type(swapped.blocks[0]), type(swapped.blocks[0].attn), type(swapped.blocks[0].mlp)) == (
        FastBlock, FastAttention, FastSwiGLU)
    assert list(swapped.state_dict()) == keys
    out = swapped(x, t, y)
    grads = torch.autograd.grad(out.square().sum(), list(swapped.parameters()))
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_column_scale_form_is_the_plain_neural_field():
    """fast.nerf's patch_mlp and reference_head, the arithmetic the kernels run (Eq. 10's norms as
    fp32 column scales, the first Linear split into its pixel and coordinate halves), compute what
    nerf_head.py's NerfBlock and NerfHead compute, for every norm variant, in fp32."""
    torch.manual_seed(0)
    for norm in ("fc1", "fc1_fc2", "fc1_fc2_out"):
        head = NerfHead(48, 32, 2, 2, 3, "dct", norm)
        for p in head.parameters():
            p.data += 0.05 * torch.randn_like(p)
        s, pix = torch.randn(6, 48), torch.randn(6, 64, 3)
        assert rel_err(reference_head(head, s, pix, 8, 8), head(s, pix, 8, 8)) < 1e-6
        h, block = torch.randn(6, 64, 32), head.blocks[0]
        assert rel_err(patch_mlp(h, block.generator(s), block.norm, block.norm_w2), block(h, s)) < 1e-6


def triton_interpreter():
    """Whether Triton is installed with a CPU interpreter that computes: Triton 3.1's (torch 2.5's)
    returns garbage under numpy 2 (a kernel that doubles 16 floats, checked with numpy 2.4), and
    with numpy < 2 it runs these checks. Elsewhere the tests check that no kernel is routed."""
    if not importlib.util.find_spec("triton"):
        return False
    import triton
    return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 2) or int(np.__version__.split(".")[0]) < 2


def run_check(module, env=None):
    """Runs a check program of fast/checks in its own process and asserts that it got to the end."""
    r = subprocess.run([sys.executable, "-m", f"fast.checks.{module}"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1", **(env or {})})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-1000:] + r.stderr[-2000:]


def test_nerf_kernels_match_their_torch_form():
    """With Triton installed, the neural-field kernels run in Triton's CPU interpreter against
    patch_mlp and reference_head (fp16: the interpreter mishandles bf16): the layer kernel, forward
    and all three gradients; the embedding's gradient sums; the layer ops' fake versions; the head
    for inference (one kernel) and training (one op), velocity and every gradient, with and without
    the pixels' gradient, and the head op's fake versions (fast/checks/nerf_kernels.py). Without
    Triton (CI) no module is swapped (test_fast_modules_fall_back_to_the_plain_forwards)."""
    if triton_interpreter():
        run_check("nerf_kernels")
    else:
        assert not nerf_kernel.available() and nerf_kernel.triton is None or not torch.cuda.is_available()


def test_nerf_kernel_takes_only_what_it_runs(monkeypatch):
    """Fields wider than the official 64 x 128 (whose training kernels would need more shared memory
    than a Hopper GPU has) and widths that are no power of 2 keep the plain modules, and so does a
    head with no field layer. The custom ops' list types are typing.List: torch < 2.7 cannot read
    list[...] in an op's schema, and the import would fail."""
    assert nerf_kernel.supported(64, 128) and nerf_kernel.supported(16, 32)
    assert not any(nerf_kernel.supported(w, h) for w, h in ((128, 256), (64, 256), (48, 96), (72, 144)))
    monkeypatch.setattr(nerf_kernel, "available", lambda: True)
    for kw, swapped in (({"nerf_depth": 0}, 0), ({"nerf_width": 128}, 0), ({"nerf_width": 48}, 0), ({}, 2)):
        model = MODELS["XS/16"](**kw)
        assert nerf_kernel.enable(model) == swapped and (type(model.head) is FastNerfHead) == (swapped > 0), kw
    assert "list[" not in inspect.getsource(nerf_kernel)


def test_block_kernels_match_their_torch_form():
    """With Triton installed, the four block kernels run in Triton's CPU interpreter against
    model.py's torch forms, forward and every gradient: fp32, an fp32 residual stream with fp16
    adaLN outputs, and fp16 (the interpreter mishandles bf16); odd sizes, head widths that are not
    powers of 2 (fast/checks/block_kernels.py). The launch sizes' host helpers are checked here."""
    assert [block_kernel._pow2(n) for n in (1, 2, 3, 64, 65, 1024, 2736)] == [1, 2, 4, 64, 128, 1024, 4096]
    assert [block_kernel._cdiv(a, 32) for a in (0, 1, 32, 33, 256)] == [0, 1, 1, 2, 8]
    if triton_interpreter():
        run_check("block_kernels")
    else:
        assert not block_kernel.available()


# ---------------------------------------------------------------------------------------------
# bf16 weights, compute copies, CUDA graphs, the optimizer step
# ---------------------------------------------------------------------------------------------

def test_bf16_linears_and_cuda_graphs_change_no_number():
    """sample.py's fast path: Linear weights stored in bf16 give under autocast exactly what autocast
    computes from fp32 weights (the residual stream stays fp32); CUDAGraphs is a plain call off the GPU."""
    torch.manual_seed(0)
    model = live(MODELS["XS/16"]().eval().requires_grad_(False))
    fast_model = CUDAGraphs(bf16_linears(MODELS["XS/16"]().eval().requires_grad_(False)))
    fast_model.model.load_state_dict(model.state_dict())
    assert fast_model.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert fast_model.model.blocks[0].norm1.weight.dtype == torch.float32
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    with torch.autocast("cpu", torch.bfloat16):
        ref, out = model(x, t, y), fast_model(x, t, y)
    assert torch.equal(out, ref) and not torch.equal(out, model(x, t, y))  # and autocast mattered


def test_for_training_step_is_the_plain_step():
    """fast.for_training's step where its kernel does not apply (the CPU) is train.py's plain step:
    clip_grad_norm_, AdamW, the EMA's lerp; its net, without compute copies, is the model itself."""
    runs = []
    for use_fast in (False, True):
        torch.manual_seed(0)
        model = live(MODELS["XS/16"](), std=0.02)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if use_fast:
            net, step, hook = fast.for_training(model, ema, opt, ema_decay=0.9, grad_clip=0.5, compile=False,
                                                bf16_copies=False, log=lambda msg: None)
            assert net is model and hook is None
        else:
            def step():
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - 0.9)
                return norm
            net = model
        norms = []
        for i in range(3):
            torch.manual_seed(i)
            net(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])).square().mean().backward()
            norms.append(step())
            opt.zero_grad(set_to_none=True)
        runs.append((norms, [*model.parameters(), *ema.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_optimizer_step_torch_path_and_kernel():
    """fast.optim.step's torch path is clip_grad_norm_ + AdamW + the EMA's lerp, the norm without
    rewriting the gradients when not clipping; with no gradients at all only the EMA moves; on CPU
    tensors the kernel is not chosen. With Triton installed the one-pass kernel runs in
    Triton's CPU interpreter against it (clipping on and off, a whole block and a ragged tail, a
    parameter without a gradient, one without an EMA copy, 16-bit compute copies holding the
    gradients, and one 4 bytes into its storage, for which step() takes torch's path)."""
    torch.manual_seed(0)
    model, proj = nn.Linear(5, 4), nn.Linear(4, 2)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [*model.parameters(), *proj.parameters()]
    opt = torch.optim.AdamW(params, lr=0.1)
    ref_params = [p.detach().clone() for p in params]
    ref_opt = torch.optim.AdamW([nn.Parameter(p) for p in ref_params], lr=0.1)
    ref_ema = [p.detach().clone() for p in model.parameters()]
    for max_norm in (None, 0.01, None):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, ref_opt.param_groups[0]["params"], grads):
            p.grad, q.grad = g.clone(), g.clone()
        want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        if max_norm:
            torch.nn.utils.clip_grad_norm_(ref_opt.param_groups[0]["params"], max_norm)
        ref_opt.step()
        torch._foreach_lerp_(ref_ema, ref_opt.param_groups[0]["params"][:2], 1 - 0.9)
        g0 = params[0].grad.clone()
        assert not optim_kernel.supported(opt)  # CPU tensors: torch's AdamW, also with kernel=None
        pair = (ema, model) if max_norm is None else (list(ema.parameters()), list(model.parameters()))
        norm = optim_kernel.step(opt, *pair, 0.9, max_norm)  # the modules, or lists of their parameters
        assert torch.allclose(norm, want) and (max_norm or torch.equal(params[0].grad, g0))
        for a, b in zip([*params, *ema.parameters()], [*ref_opt.param_groups[0]["params"], *ref_ema]):
            assert torch.equal(a, b)
        opt.zero_grad(set_to_none=True)
    e0 = [e.clone() for e in ema.parameters()]
    with torch.no_grad():
        model.weight.add_(1)
    assert optim_kernel.step(opt, ema, model, 0.9, kernel=True) == 0  # no gradients: the EMA alone moves
    assert not torch.equal(ema.weight, e0[0]) and torch.equal(ema.bias, e0[1] + 0.1 * (model.bias - e0[1]))
    if triton_interpreter():
        run_check("optim_kernel")
    else:  # no Triton, or an interpreter that cannot run it: the CPU step above is torch's
        assert optim_kernel.triton is None or not torch.cuda.is_available()


def test_bf16_compute_copy_computes_what_autocast_does():
    """fast.precision.compute_copy: the Linears that autocast casts are bf16 copies, every other
    parameter is the model's own; under bf16 autocast the copy's velocity and every gradient are
    bitwise those of the fp32 model (class- and text-conditional). optim_kernel.step with the copies
    (torch's path here) updates the fp32 weights as from the fp32 gradients and rounds them into
    the copies."""
    for name in ("XS/16", "T2I-XS/16"):
        torch.manual_seed(0)
        model = live(MODELS[name](), std=0.02)
        net, pairs = compute_copy(model)
        copy_of = dict(pairs)
        assert {id(q) for q in copy_of.values()} == {id(m.weight) for m in net.modules() if isinstance(m, nn.Linear)
                                                    and m.weight.dtype == torch.bfloat16} | {
            id(m.bias) for m in net.modules() if isinstance(m, nn.Linear) and m.bias is not None
            and m.bias.dtype == torch.bfloat16}
        assert net.head.embed.weight is model.head.embed.weight  # the pixel-level Linears run in fp32
        for p, q in zip(model.parameters(), net.parameters()):
            assert torch.equal(q, p.to(torch.bfloat16)) if p in copy_of else q is p
        x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
        y = torch.tensor([1, 3]) if model.text_dim is None else torch.randn(2, 128, model.text_dim)
        outs = []
        for m in (model, net):
            with torch.autocast("cpu", torch.bfloat16):
                v = m(x, t, y)
            v.float().square().mean().backward()
            outs.append((v, [copy_of[p].grad if m is net and p in copy_of else p.grad for p in model.parameters()]))
            model.zero_grad(set_to_none=True)
        assert torch.equal(outs[0][0], outs[1][0])
        for a, b in zip(outs[0][1], outs[1][1]):
            assert torch.equal(a, b.float())
        # one optimizer step: from the copies' gradients as from the fp32 ones
        ref = copy.deepcopy(model)
        for p, g in zip(ref.parameters(), outs[0][1]):
            p.grad = g
        for p, (_, g) in zip(model.parameters(), zip(outs[0][1], outs[1][1])):
            (copy_of[p] if p in copy_of else p).grad = g
        for m, cp in ((ref, ()), (model, pairs)):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            ema = copy.deepcopy(m).requires_grad_(False)
            optim_kernel.step(opt, ema, m, 0.9, 1.0, copies=cp)
        for p, q in zip(ref.parameters(), model.parameters()):
            assert torch.equal(p, q) and (q not in copy_of or torch.equal(copy_of[q], q.to(torch.bfloat16)))


def test_ddp_averages_bf16_gradients_in_fp32(tmp_path):
    """fast.precision.allreduce_fp32, DDP's hook for the bf16 compute copies: with three processes (gloo)
    the gradient is the fp32 average of the processes' gradients rounded once to bf16 (all but a
    rare tie that the order of the fp32 sum decides), where DDP's own bf16 reduction is not."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", f"--master_port={free_port()}",
           "-m", "fast.checks.ddp_hook"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "hook ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_ddp_ranks_stay_identical_with_the_fast_layer():
    """fast/checks/ddp_ranks.py with two processes (gloo): train.py's fast step with REPA, bf16 compute
    copies and the fp32 hook; after every step the weights, EMA, copies and projector hash the same
    on both ranks (the check fails when the processes are not synchronised)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "fast.checks.ddp_ranks"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ranks ok" in r.stdout and r.stdout.count("[True, True, True, True]") == 3, \
        r.stdout[-2000:] + r.stderr[-3000:]


def test_repa_encoder_in_bf16_computes_what_autocast_does():
    """fast.for_training's REPA encoder: bf16 Linear weights give under autocast exactly the targets
    that autocast computes from the fp32 weights (compile off here; the CPU has no kernels)."""
    from dinov2 import DINOv2, repa_target
    torch.manual_seed(0)
    encoder = DINOv2(embed_dim=64, depth=2, num_heads=2, img_size=56).requires_grad_(False).eval()
    for p in encoder.parameters():
        p.data += 0.02 * torch.randn_like(p)
    fast_encoder = copy.deepcopy(encoder)
    model = MODELS["XS/16"]()
    fast.for_training(model, copy.deepcopy(model), torch.optim.AdamW(model.parameters()), ema_decay=0.9,
                      compile=False, bf16_copies=False, encoder=fast_encoder, log=lambda msg: None)
    assert fast_encoder.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert fast_encoder.blocks[0].norm1.weight.dtype == torch.float32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", torch.bfloat16):
        ref, out = repa_target(encoder, x, 2, 2), repa_target(fast_encoder, x, 2, 2)
    assert torch.equal(out, ref) and not torch.equal(out, repa_target(encoder, x, 2, 2))  # autocast mattered


def test_bench_trains_with_repa(tmp_path):
    r = cli("bench.py", "--model", "XS/16", "--image-size", 32, "--batch-size", 2, "--iters", 1, "--warmup", 0,
            "--compile", "none", "--repa", "on", cwd=tmp_path)
    row = r.stdout.splitlines()[-1].split()
    assert r.stdout.startswith("# CPU") and "REPA on" in r.stdout.splitlines()[0] and row[:2] == ["train", "XS/16"]
    assert float(row[row.index("img_per_s") + 1]) > 0


# ---------------------------------------------------------------------------------------------
# bench.py, MFU
# ---------------------------------------------------------------------------------------------

def test_bench_check_bf16_close_to_fp32():
    for name in ("XS/16", "T2I-XS/16"):  # class labels; text features with padding masks
        err = bench.check(name, "nerf", 4, 32, "none", "off", "off", None, torch.device("cpu"))["bf16_vs_fp32_v"]
        assert 0 < err <= 1e-2, (name, err)  # > 0: autocast did run in bf16


def test_bench_timing_is_the_median_chunk_so_one_stall_shows_as_spread(monkeypatch):
    """8 calls of 10 ms on a fake clock, one of which stalls for 1 s: the mean would be 0.134 s."""
    clock, calls = [0.0], []

    def call():
        calls.append(1)
        clock[0] += 1.0 if len(calls) == 5 else 0.01  # the 3rd timed call (after 2 warm-up calls)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    dt, spread, _ = bench.timed(call, 8, 2, torch.device("cpu"))
    assert len(calls) == 10 and dt == pytest.approx(0.01) and spread == pytest.approx(0.505 / 0.01)


def test_bench_cli_prints_train_and_sample_rows(tmp_path):
    """Class and text conditions (a text-to-image model trains and samples on random text features)."""
    r = cli("bench.py", "--model", "XS/16", "T2I-XS/16", "--image-size", 32, "--batch-size", 5, "--iters", 1,
            "--warmup", 0, "--sample-steps", 2, "--what", "train", "sample", "--compile", "none", cwd=tmp_path)
    rows = [line.split() for line in r.stdout.splitlines() if not line.startswith("#")]
    assert [row[:2] for row in rows] == [["train", "XS/16"], ["train", "T2I-XS/16"], ["sample", "XS/16"],
                                         ["sample", "T2I-XS/16"]]
    for row in rows:
        cells = row[row.index("|") + 1:]  # "... batch 5 | k v k v"
        values = dict(zip(cells[::2], map(float, cells[1::2])))
        assert values["img_per_s"] > 0 and values.get("s_per_iter", values.get("s_per_step")) > 0


def test_bench_kernel_kinds():
    names = {"triton_per_fused__scaled_dot_product_cudnn_attention_add_mean": "Inductor elementwise/reduction",
             "_bwd_kernel": "neural-field kernels", "_out_grad_kernel": "neural-field kernels",
             "_field_kernel": "neural-field kernels",
             "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul", "_swiglu_gemm": "matmul",
             "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_128x256_64x3_nt_align8>": "matmul",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
             "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>": "AdamW + EMA",
             "_adamw_ema_kernel": "AdamW + EMA",
             "Memset (Device)": "other"}
    assert {n: bench.kernel_kind(n) for n in names} == names


def test_bench_profile_prints_top_ops(tmp_path):
    r = cli("bench.py", "--model", "XS/16", "--image-size", 32, "--batch-size", 2, "--iters", 1, "--warmup", 0,
            "--compile", "none", "--profile", 4, cwd=tmp_path)
    lines = r.stdout.splitlines()
    rules = [i for i, line in enumerate(lines) if set(line.strip()) == {"-", " "}]
    rows = lines[rules[1] + 1:rules[2]]
    assert len(rows) == 4 and any("aten::" in row for row in rows)  # the 4 with the most self time
    assert r.stdout.splitlines()[-1].startswith("train  XS/16")


def test_flop_count_leaves_out_swiglu_padding():
    """count_flops counts the model's matmuls: SwiGLU's alignment padding (XS/16: 341 -> 344
    hidden units) is not work the model asks for."""
    from torch.utils.flop_counter import FlopCounterMode
    m = MODELS["XS/16"]()
    assert m.blocks[0].mlp.pad == 3
    with FlopCounterMode(display=False) as counter:  # the padded MLP of one block, 4 tokens
        m.blocks[0].mlp(torch.randn(4, 128))
    assert counter.get_total_flops() == 2 * 4 * 128 * 3 * 344
    with torch.device("meta"):  # as count_flops runs it
        m = MODELS["XS/16"]()
        x, t, y = torch.empty(1, 3, 32, 32), torch.empty(1), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as padded:
            m(x, t, y)
        for block in m.blocks:
            block.mlp.pad = 0
        with FlopCounterMode(display=False) as unpadded:
            m(x, t, y)
    flops = fast.count_flops({"name": "XS/16", "kwargs": {}}, 32)
    assert flops == unpadded.get_total_flops() == padded.get_total_flops() - 4 * 4 * 2 * 128 * 3 * 3


def test_sample_compile_flag():
    parse = sample.get_parser().parse_args
    assert [parse(a).compile for a in ([], ["--compile"], ["--compile", "full"])] == [None, "regions", "full"]
    with pytest.raises(SystemExit):
        parse(["--compile", "everything"])
