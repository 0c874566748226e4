"""The neural field's residual layer as one fused Triton kernel (CUDA; optional).

nerf_head.patch_mlp computes h + SiLU(RMSNorm(h) W1) W2 for every pixel of every patch with
batched matmuls, so each layer writes and keeps several (patches, pixels, 2 x width) tensors: for
an L/16 batch of 64 at 256 px, 4.2M pixels x 128 channels each. Here one program owns one patch:
it loads the patch's predicted W1 and W2 once, computes their Eq. 10 scales, runs its pixels
through the MLP in on-chip memory and writes only the output. The backward recomputes the hidden
activations from the layer's input instead of storing them, and sums the patch's weight gradients
on chip, through the normalisation, so neither pass writes a normalised copy of the weights.

The forward rounds where the torch path rounds (h in fp32 or bf16; the matmul operands in the
weights' dtype, bf16 or fp16; fp32 accumulation and Eq. 10 scales), so the two agree to
accumulation order. The backward's matmul operands are in the weights' dtype too (as autocast's
would be) where the torch path differentiates fp32 matmuls, so gradients agree to that rounding.
The tests and `bench.py --what check` compare them. Other inputs take the torch path: enable()
adds a faster path, never a different function.

A file of its own so that nerf_head.py stays torch-only: the scripts call enable(model) on a GPU.
"""
import torch

from nerf_head import NerfBlock, patch_mlp

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path serves
    triton = None


def available():
    return triton is not None and torch.cuda.is_available()


def enable(model, on=True):
    """Route every neural-field layer of `model` through the fused kernel where it applies (or,
    on=False, back to the torch path). Returns the number of layers routed (0 without Triton or CUDA)."""
    blocks = [m for m in model.modules() if isinstance(m, NerfBlock)]
    for m in blocks:
        m.fused = fused_patch_mlp if on and available() and supported(m.width, m.hidden) else None
    return sum(m.fused is not None for m in blocks)


def supported(width, hidden):
    return all(d >= 16 and d & (d - 1) == 0 for d in (width, hidden))  # tl.dot tiles: powers of 2 >= 16


def fused_patch_mlp(h, w, norm, norm_w2=True):
    """patch_mlp(h, w, norm, norm_w2) through the kernel for CUDA inputs with bf16/fp16 weights, else the torch path."""
    if not (h.is_cuda and w.dtype in (torch.bfloat16, torch.float16)):
        return patch_mlp(h, w, norm, norm_w2)
    return _patch_mlp_op(h.contiguous(), w.contiguous(), norm.weight, norm.eps, norm_w2)


if triton is not None:
    @triton.jit
    def _rms_in(H, G, n, p0, P, eps, C: tl.constexpr, BP: tl.constexpr, HDT: tl.constexpr, DT: tl.constexpr):
        """For pixels p0..p0+BP of patch n: x (fp32), 1/rms(x), x_hat and RMSNorm(x) rounded to h's
        dtype HDT, and RMSNorm(x) in the matmul dtype DT."""
        offs_p = p0 + tl.arange(0, BP)
        offs_c = tl.arange(0, C)
        mask = offs_p[:, None] < P
        ptrs = n * P * C + offs_p[:, None] * C + offs_c[None, :]
        x = tl.load(H + ptrs, mask=mask, other=0.0).to(tl.float32)                # (BP, C)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)                               # (BP,)
        xhat = (x * r[:, None]).to(HDT)                                             # torch: y.to(dtype)
        g = tl.load(G + offs_c).to(HDT).to(tl.float32)                              # gain.to(dtype)
        xn = (xhat.to(tl.float32) * g[None, :]).to(HDT).to(DT)                     # (BP, C)
        return x, r, xhat, g, xn, ptrs, mask

    @triton.jit
    def _weights(W, n, C: tl.constexpr, HID: tl.constexpr, NORM2: tl.constexpr):
        """Patch n's raw W1 (C, HID) and W2 (HID, C) and the Eq. 10 column scales 1/|w_j| (fp32)."""
        offs_c, offs_h = tl.arange(0, C), tl.arange(0, HID)
        w1_ptrs = n * 2 * C * HID + offs_c[:, None] * HID + offs_h[None, :]
        w2_ptrs = n * 2 * C * HID + C * HID + offs_h[:, None] * C + offs_c[None, :]
        w1, w2 = tl.load(W + w1_ptrs), tl.load(W + w2_ptrs)
        w1f, w2f = w1.to(tl.float32), w2.to(tl.float32)
        s1 = 1 / tl.maximum(tl.sqrt(tl.sum(w1f * w1f, axis=0)), 1e-12)            # (HID,)
        if NORM2:
            s2 = 1 / tl.maximum(tl.sqrt(tl.sum(w2f * w2f, axis=0)), 1e-12)        # (C,)
        else:
            s2 = tl.full((C,), 1.0, tl.float32)
        return w1, w2, s1, s2, w1_ptrs, w2_ptrs

    @triton.jit
    def _fwd_kernel(H, W, G, OUT, eps, P: tl.constexpr, C: tl.constexpr, HID: tl.constexpr, BP: tl.constexpr,
                    HDT: tl.constexpr, DT: tl.constexpr, NORM2: tl.constexpr):
        n = tl.program_id(0)
        w1, w2, s1, s2, w1_ptrs, w2_ptrs = _weights(W, n, C, HID, NORM2)
        for p0 in range(0, P, BP):
            x, r, xhat, g, xn, ptrs, mask = _rms_in(H, G, n, p0, P, eps, C, BP, HDT, DT)
            a = tl.dot(xn, w1) * s1[None, :]                                        # (BP, HID) fp32
            sg = (a * tl.sigmoid(a)).to(DT)                                         # SiLU
            o = tl.dot(sg, w2) * s2[None, :]                                        # (BP, C) fp32
            tl.store(OUT + ptrs, (x + o).to(HDT), mask=mask)

    @triton.jit
    def _bwd_kernel(H, W, G, DOUT, DH, DW, DG, eps, P: tl.constexpr, C: tl.constexpr, HID: tl.constexpr,
                    BP: tl.constexpr, HDT: tl.constexpr, DT: tl.constexpr, NORM2: tl.constexpr):
        n = tl.program_id(0)
        w1, w2, s1, s2, w1_ptrs, w2_ptrs = _weights(W, n, C, HID, NORM2)
        offs_c = tl.arange(0, C)
        m1 = tl.zeros((C, HID), tl.float32)   # dL/dW1 through the matmul, scales included
        m2 = tl.zeros((HID, C), tl.float32)
        dg = tl.zeros((C,), tl.float32)
        for p0 in range(0, P, BP):
            x, r, xhat, g, xn, ptrs, mask = _rms_in(H, G, n, p0, P, eps, C, BP, HDT, DT)
            a = tl.dot(xn, w1) * s1[None, :]                                        # recomputed
            sig = tl.sigmoid(a)
            sg = (a * sig).to(DT)
            do = tl.load(DOUT + ptrs, mask=mask, other=0.0).to(tl.float32)          # (BP, C)
            do_ = (do * s2[None, :]).to(DT)                                         # through o = (sg W2) s2
            m2 += tl.dot(tl.trans(sg), do_)                                         # (HID, C)
            dsg = tl.dot(do_, tl.trans(w2)).to(DT).to(tl.float32)                  # (BP, HID)
            da = (dsg * sig * (1 + a * (1 - sig)) * s1[None, :]).to(DT)            # SiLU, then a = (xn W1) s1
            m1 += tl.dot(tl.trans(xn), da)                                          # (C, HID)
            dxn = tl.dot(da, tl.trans(w1)).to(DT).to(HDT).to(tl.float32)           # (BP, C)
            dg += tl.sum(dxn * xhat.to(tl.float32), axis=0)
            dxhat = (dxn * g[None, :]).to(HDT).to(tl.float32)
            xr = x * r[:, None]                                                     # RMSNorm backward
            dx = r[:, None] * (dxhat - xr * (tl.sum(dxhat * xr, axis=1) / C)[:, None])
            tl.store(DH + ptrs, (do + dx).to(HDT), mask=mask)
        # Eq. 10 backward: s_j = 1/|w_j| gives dW = M - W s_j^2 sum_i(W_ij M_ij) for the raw weights
        w1f = w1.to(tl.float32)
        dw1 = m1 - w1f * (s1 * s1 * tl.sum(w1f * m1, axis=0))[None, :]
        dw2 = m2
        if NORM2:
            w2f = w2.to(tl.float32)
            dw2 = m2 - w2f * (s2 * s2 * tl.sum(w2f * m2, axis=0))[None, :]
        tl.store(DW + w1_ptrs, dw1.to(DT))
        tl.store(DW + w2_ptrs, dw2.to(DT))
        tl.store(DG + n * C + offs_c, dg)

    _DT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    # BP: pixels per inner step, picked by timing BP 16-128, 4 or 8 warps and 1-3 stages at L/16
    # batch-64 shapes. The backward holds two (width x hidden) fp32 accumulators; with 64-pixel
    # tiles and 8 warps it took twice as long (bench.py --profile, H100; register spills, we think).
    _FWD = dict(BP=64, num_warps=4, num_stages=3)
    _BWD = dict(BP=32, num_warps=4, num_stages=2)

    @torch.library.custom_op("pixnerd::patch_mlp", mutates_args=())
    def _patch_mlp_op(h: torch.Tensor, w: torch.Tensor, gain: torch.Tensor, eps: float,
                      norm_w2: bool) -> torch.Tensor:
        N, P, C = h.shape
        out = torch.empty_like(h)
        _fwd_kernel[(N,)](h, w, gain, out, eps, P=P, C=C, HID=w.shape[-1] // (2 * C), HDT=_DT[h.dtype],
                          DT=_DT[w.dtype], NORM2=norm_w2, **_FWD)
        return out

    @_patch_mlp_op.register_fake
    def _(h, w, gain, eps, norm_w2):
        return torch.empty_like(h)

    @torch.library.custom_op("pixnerd::patch_mlp_backward", mutates_args=())
    def _patch_mlp_backward_op(dout: torch.Tensor, h: torch.Tensor, w: torch.Tensor, gain: torch.Tensor,
                               eps: float, norm_w2: bool) -> list[torch.Tensor]:
        N, P, C = h.shape
        dh, dw = torch.empty_like(h), torch.empty_like(w)
        dg = torch.empty(N, C, device=h.device, dtype=torch.float32)
        _bwd_kernel[(N,)](h, w, gain, dout.contiguous(), dh, dw, dg, eps, P=P, C=C, HID=w.shape[-1] // (2 * C),
                          HDT=_DT[h.dtype], DT=_DT[w.dtype], NORM2=norm_w2, **_BWD)
        return [dh, dw, dg.sum(0).to(gain.dtype)]

    @_patch_mlp_backward_op.register_fake
    def _(dout, h, w, gain, eps, norm_w2):
        return [torch.empty_like(h), torch.empty_like(w), torch.empty_like(gain)]

    def _setup_context(ctx, inputs, output):
        h, w, gain, eps, norm_w2 = inputs
        ctx.save_for_backward(h, w, gain)
        ctx.eps, ctx.norm_w2 = eps, norm_w2

    def _backward(ctx, dout):
        dh, dw, dg = _patch_mlp_backward_op(dout, *ctx.saved_tensors, ctx.eps, ctx.norm_w2)
        return dh, dw, dg, None, None

    _patch_mlp_op.register_autograd(_backward, setup_context=_setup_context)
