"""The end of a training step, AdamW + gradient clipping + the EMA update, in one pass (CUDA; optional).

torch's fused AdamW reads each parameter, its gradient and both moments and writes three of them
back; the EMA's lerp then reads the parameter again beside the EMA copy; and clip_grad_norm_ reads
every gradient and rewrites it. Here one kernel reads p, g, m, v and the EMA copy once and writes
p, m, v and the EMA copy (36 bytes a parameter), applying the clipping factor as it reads g and
summing g^2 for the norm on the way.

The arithmetic is torch's fused AdamW's, in fp32 (the same fused multiply-adds, IEEE sqrt and
division; the bias corrections from the per-parameter step count, in fp64 here where torch rounds
beta^step to fp32 first), then ema += w (p - ema) as `torch.lerp` computes it for w < 0.5.
The state lives in the torch.optim.AdamW object as its fused version keeps it, so checkpoints do
not depend on which path ran, and `opt.step()` could take over at any step.
With bf16 compute copies (fast.precision.compute_copy: the copy runs forward and backward, the fp32
weights stay with the optimizer) the kernel reads the copy's bf16 gradient in place of g and
writes the updated weight, rounded, into the copy.
Off the GPU, without Triton, for options this kernel does not have (amsgrad, maximize, non-fp32
parameters) or a tensor that is not 16-byte aligned, step() runs the same update through torch.
"""
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: torch's AdamW serves
    triton = None

_BLOCK = 1024  # elements per program, 4 warps
_tables = {}   # (numels, device) -> each program's (tensor, block) pair, built once


def step(opt, ema, model, decay, max_norm=None, kernel=None, copies=()):
    """opt.step() with the gradients clipped to total norm max_norm (None: not clipped), then
    ema's parameters += (1 - decay) (model's - ema's). opt may hold more parameters than model
    (the REPA projector); ema holds a copy of each of model's, in order. ema and model are modules
    or lists of their parameters: a training loop makes the lists once, since walking an L/16's
    modules for them costs host time every step. copies: (parameter, 16-bit copy) pairs
    whose copy ran the step: its gradient is the parameter's, and it gets the updated parameter.
    Returns the gradients' total norm before clipping, a 0-d tensor. kernel=None: the fused
    kernel where it applies."""
    ema_of = dict(zip(*[m.parameters() if isinstance(m, torch.nn.Module) else m for m in (model, ema)]))
    copy_of = dict(copies)
    grads = {p: copy_of[p].grad if p in copy_of else p.grad for g in opt.param_groups for p in g["params"]}
    params = [p for p, g in grads.items() if g is not None]
    if kernel is None:
        kernel = triton is not None and supported(opt, params, grads, copy_of, [ema_of.get(p, p) for p in params])
    with torch.no_grad():
        if kernel and params:
            norm = _fused_step(opt, ema_of, 1 - decay, max_norm, params, grads, copy_of)
            if norm is not None:
                return norm
        for p, q in copy_of.items():  # torch's AdamW takes fp32 gradients
            p.grad = None if q.grad is None else q.grad.float()
        norm = _torch_step(opt, ema_of, 1 - decay, max_norm, params)
        if copy_of:
            torch._foreach_copy_(list(copy_of.values()), list(copy_of))
        return norm


def supported(opt, params=None, grads=None, copy_of=None, emas=()):
    """The kernel's case: fp32 CUDA parameters, gradients and EMA copies on one device, contiguous
    (16-bit gradients and copies, all bf16 or all fp16, where a parameter has a compute copy), the
    step counts there too (as torch's fused AdamW keeps them; load_state_dict puts the moments on
    the parameters' device and dtype); torch.optim.AdamW itself (Adam's coupled weight decay is
    another update) without amsgrad or maximize, a plain number for the learning rate. params:
    those of opt with a gradient, grads: each one's gradient, copy_of: the compute copies, emas:
    the EMA tensors the kernel would write (as in step())."""
    copy_of = copy_of or {}
    if grads is None:
        grads = {p: copy_of[p].grad if p in copy_of else p.grad for g in opt.param_groups for p in g["params"]}
    if params is None:
        params = [p for p, g in grads.items() if g is not None]
    if not params or not params[0].is_cuda:
        return False
    dev, f32, bf16 = params[0].device, torch.float32, torch.bfloat16
    steps = [opt.state[p].get("step") for p in params if opt.state[p]]
    ok = lambda ts, dtype: all(t.device == dev and t.dtype == dtype and t.is_contiguous() for t in ts)
    half = [p for p in params if p in copy_of]
    dt16 = copy_of[half[0]].dtype if half else bf16
    return (type(opt) is torch.optim.AdamW
            and all(not g["amsgrad"] and not g["maximize"] and not torch.is_tensor(g["lr"])
                    for g in opt.param_groups)
            and ok(params + [grads[p] for p in params if p not in copy_of] + list(emas), f32)
            and all(e.shape == p.shape for e, p in zip(emas, params))
            and dt16 in (bf16, torch.float16) and ok([grads[p] for p in half] + [copy_of[p] for p in half], dt16)
            and all(torch.is_tensor(s) and s.device == dev and s.dtype == f32 for s in steps))


@torch.no_grad()
def _torch_step(opt, ema_of, w, max_norm, params):
    """train.py's plain step: clip_grad_norm_ (max_norm None: the norm alone), AdamW, the EMA's lerp."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    opt.step()
    torch._foreach_lerp_(list(ema_of.values()), list(ema_of), w)
    return norm


def _total_norm(grads):
    """The norm of all grads, each tensor's in fp32 whatever its dtype (one foreach call per dtype)."""
    if not grads:
        return torch.zeros(())
    norms = [n for dt in dict.fromkeys(g.dtype for g in grads)
             for n in torch._foreach_norm([g for g in grads if g.dtype == dt], 2, dtype=torch.float32)]
    return torch.linalg.vector_norm(torch.stack(norms))


def _fused_step(opt, ema_of, w, max_norm, params, grads, copy_of):
    """The kernel's step; None, having changed nothing, where a tensor is not 16-byte aligned."""
    dev = params[0].device
    for p in params:  # the state as torch's fused AdamW creates it
        st = opt.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=dev)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    # every tensor as its element offset from one fp32 tensor (16-bit ones: from one 16-bit tensor):
    # offsets hinted as multiples of 16 bytes (8 for the 16-bit ones) tell the compiler that each is
    # aligned (vector loads), which pointers read from memory cannot. A launch per group and kind
    # (fp32 or 16-bit gradients).
    launches = []
    for group in opt.param_groups:
        for half in (False, True):
            ps = [p for p in group["params"] if grads.get(p) is not None and (p in copy_of) == half]
            if ps:
                sts = [opt.state[p] for p in ps]
                cols = (ps, [grads[p] for p in ps], [s["exp_avg"] for s in sts], [s["exp_avg_sq"] for s in sts],
                        [ema_of.get(p, p) for p in ps], [s["step"] for s in sts], [copy_of.get(p, p) for p in ps])
                addr = torch.tensor([[t.data_ptr() for t in c] for c in cols], dtype=torch.int64)  # (7, n)
                launches.append((group, ps, half, addr))
    if any((addr[[0, 1, 2, 3, 4, 6]] % 16).any() for *_, addr in launches):  # a view into another tensor
        return None
    torch._foreach_add_([opt.state[p]["step"] for p in params], 1)
    if max_norm:  # the norm first, as clip_grad_norm_; the kernel multiplies g by the factor
        norm = _total_norm([grads[p] for p in params])
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    else:
        norm, scale = None, torch.ones((), device=dev)
    base = params[0]
    base16 = next((copy_of[p] for p in params if p in copy_of), base)
    parts = []
    for group, ps, half, addr in launches:
        numel = torch.tensor([p.numel() for p in ps])
        off = (addr - base.data_ptr()) // 4
        if half:  # the gradient and the copy in 16-bit elements from base16
            off[[1, 6]] = (addr[[1, 6]] - base16.data_ptr()) // 2
        rows = torch.cat([off, numel[None]]).T.contiguous()
        rows = rows.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else rows
        key = (tuple(numel.tolist()), dev)
        if key not in _tables:
            nb = (numel + _BLOCK - 1) // _BLOCK
            tensor_of = torch.repeat_interleave(torch.arange(len(nb)), nb)
            first = torch.cumsum(nb, 0) - nb
            _tables[key] = torch.stack([tensor_of, torch.arange(len(tensor_of)) - first[tensor_of]], 1).int().to(dev)
        blocks = _tables[key]
        part = torch.empty(len(blocks), dtype=torch.float32, device=dev)
        betas = [float(torch.tensor(b, dtype=torch.float32)) for b in group["betas"]]  # as torch rounds them
        _adamw_ema_kernel[(len(blocks),)](base, base16, rows, blocks, part, scale, group["lr"], *betas,
                                          *[math.log(b) for b in betas], group["eps"],
                                          group["weight_decay"], w, BLOCK=_BLOCK, HALF=half)
        parts.append(part)
    lone = [(ema_of[p], p) for p in ema_of if grads.get(p) is None]  # the EMA still follows them
    if lone:
        torch._foreach_lerp_([e for e, _ in lone], [p for _, p in lone], w)
    return norm if norm is not None else torch.cat(parts).sum().sqrt()


if triton is not None:
    @triton.jit
    def _update(P, G, M, V, E, Q, has_ema, idx, mask, scale, lr, beta1, beta2, eps, wd, ema_w, step_size, bc2_sqrt,
                HALF: tl.constexpr):
        if mask is None:
            g = tl.load(G + idx).to(tl.float32)
        else:
            g = tl.load(G + idx, mask=mask, other=0.0).to(tl.float32)  # zeros for the norm's sum
        p = tl.load(P + idx, mask=mask)
        m = tl.load(M + idx, mask=mask)
        v = tl.load(V + idx, mask=mask)
        sq = tl.sum(g * g, 0)
        g = g * scale
        p = p - lr * wd * p                                   # decoupled weight decay
        m = tl.fma(beta1, m, tl.fma(-beta1, g, g))            # beta1 m + (1 - beta1) g, as torch
        v = tl.fma(beta2, v, tl.fma(-beta2, g * g, g * g))    # beta2 v + (1 - beta2) g^2
        p = p - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
        tl.store(P + idx, p, mask=mask)
        tl.store(M + idx, m, mask=mask)
        tl.store(V + idx, v, mask=mask)
        if HALF:
            tl.store(Q + idx, p.to(Q.dtype.element_ty), mask=mask)  # the compute copy, to nearest even
        if has_ema:
            e = tl.load(E + idx, mask=mask)
            tl.store(E + idx, e + ema_w * (p - e), mask=mask)
        return sq

    @triton.jit
    def _adamw_ema_kernel(BASE, BASE16, ROWS, BLOCKS, PART, SCALE, lr, beta1, beta2, log_beta1, log_beta2, eps, wd,
                          ema_w, BLOCK: tl.constexpr, HALF: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(BLOCKS + 2 * pid).to(tl.int64)
        start = tl.multiple_of(tl.load(BLOCKS + 2 * pid + 1).to(tl.int64) * BLOCK, BLOCK)
        row = ROWS + 8 * t                       # offsets of p, g, m, v, ema, step, copy; numel
        P = BASE + tl.multiple_of(tl.load(row), 4)
        M = BASE + tl.multiple_of(tl.load(row + 2), 4)
        V = BASE + tl.multiple_of(tl.load(row + 3), 4)
        E = BASE + tl.multiple_of(tl.load(row + 4), 4)
        if HALF:  # the 16-bit gradient and compute copy, hinted at 8 bytes: loaded 4 to a thread as
            # the fp32 tensors are (16-byte hints made a second, slower layout)
            G = BASE16 + tl.multiple_of(tl.load(row + 1), 4)
            Q = BASE16 + tl.multiple_of(tl.load(row + 6), 4)
        else:
            G = BASE + tl.multiple_of(tl.load(row + 1), 4)
            Q = P
        step = tl.load(BASE + tl.load(row + 5)).to(tl.float64)
        n = tl.load(row + 7)
        has_ema = tl.load(row + 4) != tl.load(row)  # without an EMA copy the parameter stands in
        # the bias corrections 1 - beta^step in fp64: in fp32, 1 - exp(..) loses the digits that
        # matter while beta^step is near 1 (beta2 = 0.999: 1 - beta2 = 1e-3)
        step_size = tl.div_rn(lr, (1 - tl.exp(step * log_beta1)).to(tl.float32))
        bc2_sqrt = tl.sqrt_rn((1 - tl.exp(step * log_beta2)).to(tl.float32))
        scale = tl.load(SCALE)
        idx = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:  # whole blocks without a mask, so the loads are vectorised
            sq = _update(P, G, M, V, E, Q, has_ema, idx, None, scale, lr, beta1, beta2, eps, wd, ema_w,
                         step_size, bc2_sqrt, HALF)
        else:
            sq = _update(P, G, M, V, E, Q, has_ema, idx, idx < n, scale, lr, beta1, beta2, eps, wd, ema_w,
                         step_size, bc2_sqrt, HALF)
        tl.store(PART + pid, sq)
