"""The neural field's residual layer, and the whole field for inference, as fused Triton kernels
(CUDA; optional).

nerf_head.patch_mlp computes h + SiLU(RMSNorm(h) W1) W2 for every pixel of every patch with
batched matmuls, so each layer writes and keeps several (patches, pixels, 2 x width) tensors: for
an L/16 batch of 64 at 256 px, 4.2M pixels x 128 channels each. Here one program owns one patch:
it loads the patch's predicted W1 and W2 once, computes their Eq. 10 scales, runs its pixels
through the MLP in on-chip memory and writes only the output. The backward recomputes the hidden
activations from the layer's input instead of storing them, and sums the patch's weight gradients
on chip, through the normalisation, so neither pass writes a normalised copy of the weights.
(The last layer's backward takes two kernels: the first recomputes its output and differentiates
the output norm and projection, the second is the layer's, as for any other. The first layer's is
followed by a small kernel that sums the embedding's gradients over all patches in one pass.)
In the head the first layer also computes the embedding from the pixels, and the last the output
norm and projection, so the (patches, pixels, width) fp32 tensors in memory are only the inner
layers' inputs (one at L/16). In training the head is one op, weight generators included, so
that its backward can pass bf16 gradients from layer to layer. For inference (no gradients) a
second kernel runs the whole head of a patch on chip, embedding, every layer and the output
projection, and writes only the velocity.

The forward rounds where the torch path rounds (h in fp32 or bf16; the matmul operands in the
weights' dtype, bf16 or fp16; fp32 accumulation and Eq. 10 scales), so the two agree to
accumulation order. The backward's matmul operands are in the weights' dtype too (as autocast's
would be) where the torch path differentiates fp32 matmuls, so gradients agree to that rounding.
The tests and `bench.py --what check` compare them. Other inputs take the torch path: enable()
adds a faster path, never a different function.

A file of its own so that nerf_head.py stays torch-only: the scripts call enable(model) on a GPU.
"""
from typing import List, Optional  # typing.List: custom_op schemas of torch < 2.7 read no built-in list type

import torch
import torch.nn.functional as F

from nerf_head import NerfBlock, NerfHead, RMSNorm, coordinate_encoding, no_autocast, patch_mlp

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path serves
    triton = None


def available():
    return triton is not None and torch.cuda.is_available()


def enable(model, on=True):
    """Route every neural-field layer of `model` through the fused kernel where it applies, and
    inference through the whole-field kernel (or, on=False, both back to the torch path). Returns
    the number of layers routed (0 without Triton or CUDA)."""
    blocks = [m for m in model.modules() if isinstance(m, NerfBlock)]
    for m in blocks:
        m.fused = fused_patch_mlp if on and available() and supported(m.width, m.hidden) else None
    for m in model.modules():
        if isinstance(m, NerfHead):
            m.fused = fused_head if len(m.blocks) and all(b.fused for b in m.blocks) else None
    return sum(m.fused is not None for m in blocks)


def supported(width, hidden):
    """tl.dot tiles: powers of 2 >= 16; a patch's W1 and W2 on chip: up to the official 64 x 128 (the
    training kernels of a 128-wide field need 257 KiB of shared memory, an H100 has 227)."""
    return all(d >= 16 and d & (d - 1) == 0 for d in (width, hidden)) and width * hidden <= 64 * 128


def fused_patch_mlp(h, w, norm, norm_w2=True):
    """patch_mlp(h, w, norm, norm_w2) through the kernel for CUDA inputs with bf16/fp16 weights, else the torch path."""
    if not (h.is_cuda and w.dtype in (torch.bfloat16, torch.float16)):
        return patch_mlp(h, w, norm, norm_w2)
    return _patch_mlp_op(h.contiguous(), w.contiguous(), norm.weight, None, None, None, None, None,
                         norm.eps, 0.0, norm_w2, False)


def fused_head(head, s, pixels, ph, pw):
    """NerfHead.forward through the kernels: of the (patches, pixels, width) fp32 tensors (1 GiB
    each at L/16 batch 64) only the inner layers' inputs go to memory. Training: one kernel per
    layer, the first computing the embedding, the last the output norm and projection, each
    backward recomputing from its layer's input, all in one op (_head_train_op). Inference: the
    whole field in one kernel (at most 4 layers), writing only the velocity. None where the kernels
    do not apply and the head takes its torch path: CPU tensors, pixels not in fp32, generator
    outputs in fp32 (no autocast)."""
    return _fused_head(head, s, pixels, ph, pw) if pixels.is_cuda else None


def _fused_head(head, s, pixels, ph, pw):  # the device check apart, for the interpreter test
    blocks, C = head.blocks, head.channels
    training = torch.is_grad_enabled()
    if pixels.dtype != torch.float32 or not (training or len(blocks) <= 4):
        return None
    dev, gen = s.device.type, blocks[0].generator.weight
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(s.dtype, gen.dtype)
    if dt not in (torch.bfloat16, torch.float16):  # fp32 without autocast: the torch path's matmuls
        return None
    phi = coordinate_encoding(head.encoding, ph, pw, pixels.device)        # (ph*pw, 64)
    with no_autocast(pixels):
        w = head.embed.weight.float()
        e = F.linear(phi, w[:, C:], head.embed.bias.float())                # (ph*pw, width), all patches
    wx, wo, bo = w[:, :C].contiguous(), head.out.weight.float(), head.out.bias.float()
    norm_out = isinstance(head.norm_out, RMSNorm)
    go, eps_out = (head.norm_out.weight, head.norm_out.eps) if norm_out else (None, 0.0)
    pixels = pixels.contiguous()
    if training:  # the generators (Eq. 9) run inside the op, in dt as autocast would run them
        return _head_train_op(pixels, s.to(dt), [b.generator.weight.to(dt) for b in blocks],
                              [b.generator.bias.to(dt) for b in blocks], e, wx, [b.norm.weight for b in blocks],
                              go, wo, bo, blocks[0].norm.eps, eps_out, blocks[0].norm_w2, norm_out)[0]
    ws = [b.generator(s) for b in blocks]                                   # (N, 2 * width * hidden)
    return _field_op(pixels, e, wx, ws, [b.norm.weight for b in blocks], go if norm_out else wx, wo, bo,
                     blocks[0].norm.eps, eps_out, blocks[0].norm_w2, norm_out)


if triton is not None:
    @triton.jit
    def _rms(x, G, eps, C: tl.constexpr, HDT: tl.constexpr, DT: tl.constexpr):
        """RMSNorm of the rows of x (BP, C) fp32 as nerf_head.RMSNorm rounds it for dtype HDT:
        1/rms(x), x_hat and the gain in HDT, and RMSNorm(x) in the matmul dtype DT."""
        r = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)                               # (BP,)
        xhat = (x * r[:, None]).to(HDT)                                             # torch: y.to(dtype)
        g = tl.load(G + tl.arange(0, C)).to(HDT).to(tl.float32)                     # gain.to(dtype)
        xn = (xhat.to(tl.float32) * g[None, :]).to(HDT).to(DT)                     # (BP, C)
        return r, xhat, g, xn

    @triton.jit
    def _rms_bwd(x, r, dxhat, C: tl.constexpr):
        """dL/dx of x_hat = x r, r = 1/rms(x), given dL/dx_hat (all (BP, C) fp32)."""
        xr = x * r[:, None]
        return r[:, None] * (dxhat - xr * (tl.sum(dxhat * xr, axis=1) / C)[:, None])

    @triton.jit
    def _tile(n, p0, P, C: tl.constexpr, BP: tl.constexpr):
        """Pixels p0..p0+BP of patch n: their indices, the mask of real pixels and their
        offsets in a (N, P, C) tensor."""
        offs_p = p0 + tl.arange(0, BP)
        pmask = offs_p < P
        return offs_p, pmask, n * P * C + offs_p[:, None] * C + tl.arange(0, C)[None, :]

    @triton.jit
    def _embed(PIX, E, WX, n, offs_p, pmask, P, C: tl.constexpr, CH: tl.constexpr):
        """Linear([x, phi]) of pixels offs_p of patch n, (BP, C) fp32: E = phi Wphi^T + b (the same
        for every patch) plus x Wx^T as CH products."""
        offs_c = tl.arange(0, C)
        h = tl.load(E + offs_p[:, None] * C + offs_c[None, :], mask=pmask[:, None], other=0.0)
        for ch in tl.static_range(CH):
            px = tl.load(PIX + (n * P + offs_p) * CH + ch, mask=pmask, other=0.0)
            h += px[:, None] * tl.load(WX + offs_c * CH + ch)[None, :]
        return h

    @triton.jit
    def _h_in(H, E, WX, n, offs_p, pmask, ptrs, P, C: tl.constexpr, CH: tl.constexpr, FIRST: tl.constexpr):
        """A layer's input tile (BP, C) in fp32: loaded from H, or (FIRST) the embedding of the pixels H."""
        if FIRST:
            x = _embed(H, E, WX, n, offs_p, pmask, P, C, CH)
        else:
            x = tl.load(H + ptrs, mask=pmask[:, None], other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _out(h, GO, WO, BO, OUT, n, offs_p, pmask, P, eps_out, C: tl.constexpr, CH: tl.constexpr,
             NORM_OUT: tl.constexpr):
        """Eq. 11 on a tile h (BP, C) fp32: the output RMSNorm (NORM_OUT), then width -> CH channels,
        stored to OUT (N, P, CH)."""
        offs_c = tl.arange(0, C)
        if NORM_OUT:
            r, xhat, g, h = _rms(h, GO, eps_out, C, tl.float32, tl.float32)
        for ch in tl.static_range(CH):
            o = tl.sum(h * tl.load(WO + ch * C + offs_c)[None, :], axis=1) + tl.load(BO + ch)
            tl.store(OUT + (n * P + offs_p) * CH + ch, o, mask=pmask)

    @triton.jit
    def _add_row(acc, i, row, R: tl.constexpr):
        """acc (R, C) with row (C,) added to its row i: a per-program sum of a small weight gradient."""
        return acc + tl.where(tl.arange(0, R)[:, None] == i, row[None, :], 0.0)

    @triton.jit
    def _store_rows(OUT, n, acc, C: tl.constexpr, R: tl.constexpr):
        """Program n's sum acc (R, C) to OUT (N, R, C), summed over the programs afterwards."""
        tl.store(OUT + n * R * C + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], acc)

    @triton.jit
    def _out_bwd(h, GO, WO, DOUT, n, offs_p, pmask, P, eps_out, dgo, dwo, C: tl.constexpr, CH: tl.constexpr,
                 CHP: tl.constexpr, NORM_OUT: tl.constexpr):
        """Backward of _out at the tile h: dL/dh, and the tile's gradient sums added to dgo (C,) (the
        output norm's gain) and dwo (CHP, C) (the projection)."""
        offs_c = tl.arange(0, C)
        xn = h
        if NORM_OUT:
            r, xhat, g, xn = _rms(h, GO, eps_out, C, tl.float32, tl.float32)
        dxn = tl.zeros_like(h)
        for ch in tl.static_range(CH):
            d = tl.load(DOUT + (n * P + offs_p) * CH + ch, mask=pmask, other=0.0)  # (BP,)
            dxn += d[:, None] * tl.load(WO + ch * C + offs_c)[None, :]
            dwo = _add_row(dwo, ch, tl.sum(d[:, None] * xn, axis=0), CHP)
        dh = dxn
        if NORM_OUT:
            dgo += tl.sum(dxn * xhat, axis=0)
            dh = _rms_bwd(h, r, dxn * g[None, :], C)
        return dh, dgo, dwo

    @triton.jit
    def _mlp(xn, w1, w2, s1, s2, DT: tl.constexpr):
        """SiLU(xn W1 diag(s1)) W2 diag(s2): fp32 accumulation, the hidden layer rounded to DT."""
        a = tl.dot(xn, w1) * s1[None, :]                                            # (BP, HID) fp32
        sg = (a * tl.sigmoid(a)).to(DT)                                             # SiLU
        return tl.dot(sg, w2) * s2[None, :]                                         # (BP, C) fp32

    @triton.jit
    def _weight_offsets(n, C: tl.constexpr, HID: tl.constexpr):
        """Offsets of patch n's W1 (C, HID) and W2 (HID, C) in the generator output (N, 2 C HID)."""
        offs_c, offs_h = tl.arange(0, C), tl.arange(0, HID)
        return (n * 2 * C * HID + offs_c[:, None] * HID + offs_h[None, :],
                n * 2 * C * HID + C * HID + offs_h[:, None] * C + offs_c[None, :])

    @triton.jit
    def _weights(W, n, C: tl.constexpr, HID: tl.constexpr, NORM2: tl.constexpr):
        """Patch n's raw W1 (C, HID) and W2 (HID, C) and the Eq. 10 column scales 1/|w_j| (fp32)."""
        w1_ptrs, w2_ptrs = _weight_offsets(n, C, HID)
        w1, w2 = tl.load(W + w1_ptrs), tl.load(W + w2_ptrs)
        w1f, w2f = w1.to(tl.float32), w2.to(tl.float32)
        s1 = 1 / tl.maximum(tl.sqrt(tl.sum(w1f * w1f, axis=0)), 1e-12)            # (HID,)
        if NORM2:
            s2 = 1 / tl.maximum(tl.sqrt(tl.sum(w2f * w2f, axis=0)), 1e-12)        # (C,)
        else:
            s2 = tl.full((C,), 1.0, tl.float32)
        return w1, w2, s1, s2, w1_ptrs, w2_ptrs

    @triton.jit
    def _fwd_kernel(H, E, WX, W, G, GO, WO, BO, OUT, eps, eps_out, P: tl.constexpr, C: tl.constexpr,
                    HID: tl.constexpr, CH: tl.constexpr, BP: tl.constexpr, HDT: tl.constexpr, DT: tl.constexpr,
                    NORM2: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, NORM_OUT: tl.constexpr):
        """One layer of patch n. FIRST: H holds the pixels and the layer starts with the embedding;
        LAST: it ends with the output projection and stores the CH channels, not the features."""
        n = tl.program_id(0)
        w1, w2, s1, s2, w1_ptrs, w2_ptrs = _weights(W, n, C, HID, NORM2)
        for p0 in range(0, P, BP):
            offs_p, pmask, ptrs = _tile(n, p0, P, C, BP)
            x = _h_in(H, E, WX, n, offs_p, pmask, ptrs, P, C, CH, FIRST)
            r, xhat, g, xn = _rms(x, G, eps, C, HDT, DT)
            h = x + _mlp(xn, w1, w2, s1, s2, DT)
            if LAST:
                _out(h, GO, WO, BO, OUT, n, offs_p, pmask, P, eps_out, C, CH, NORM_OUT)
            else:
                tl.store(OUT + ptrs, h.to(HDT), mask=pmask[:, None])

    @triton.jit
    def _scales(W, S, n, l: tl.constexpr, DEPTH: tl.constexpr, C: tl.constexpr, HID: tl.constexpr,
                NORM2: tl.constexpr):
        """Layer l's Eq. 10 scales of patch n, computed once and stored to S (N, DEPTH, HID + C)."""
        w1, w2, s1, s2, w1_ptrs, w2_ptrs = _weights(W, n, C, HID, NORM2)
        base = (n * DEPTH + l) * (HID + C)
        tl.store(S + base + tl.arange(0, HID), s1)
        tl.store(S + base + HID + tl.arange(0, C), s2)

    @triton.jit
    def _layer(h, W, G, S, n, l: tl.constexpr, DEPTH: tl.constexpr, eps, C: tl.constexpr, HID: tl.constexpr,
               DT: tl.constexpr):
        """Neural-field layer l on a tile h (BP, C) held in registers (fp32), its scales read from S."""
        w1_ptrs, w2_ptrs = _weight_offsets(n, C, HID)
        w1, w2 = tl.load(W + w1_ptrs), tl.load(W + w2_ptrs)
        base = (n * DEPTH + l) * (HID + C)
        s1, s2 = tl.load(S + base + tl.arange(0, HID)), tl.load(S + base + HID + tl.arange(0, C))
        r, xhat, g, xn = _rms(h, G, eps, C, tl.float32, DT)
        return h + _mlp(xn, w1, w2, s1, s2, DT)

    @triton.jit
    def _field_kernel(PIX, E, WX, W0, W1, W2, W3, G0, G1, G2, G3, GO, WO, BO, OUT, S, eps, eps_out,
                      P: tl.constexpr, C: tl.constexpr, HID: tl.constexpr, CH: tl.constexpr,
                      DEPTH: tl.constexpr, BP: tl.constexpr, DT: tl.constexpr, NORM2: tl.constexpr,
                      NORM_OUT: tl.constexpr):
        """The whole field of patch n, pixel tile by pixel tile: embedding, DEPTH layers, output
        norm and projection, in fp32 registers; only the CH output channels go to memory. The
        Eq. 10 scales are computed once per patch into the scratch S, not once per tile."""
        n = tl.program_id(0)
        _scales(W0, S, n, 0, DEPTH, C, HID, NORM2)
        if DEPTH > 1:
            _scales(W1, S, n, 1, DEPTH, C, HID, NORM2)
        if DEPTH > 2:
            _scales(W2, S, n, 2, DEPTH, C, HID, NORM2)
        if DEPTH > 3:
            _scales(W3, S, n, 3, DEPTH, C, HID, NORM2)
        tl.debug_barrier()  # the program's own stores to S, visible to all its threads
        for p0 in range(0, P, BP):
            offs_p, pmask, ptrs = _tile(n, p0, P, C, BP)
            h = _embed(PIX, E, WX, n, offs_p, pmask, P, C, CH)
            h = _layer(h, W0, G0, S, n, 0, DEPTH, eps, C, HID, DT)
            if DEPTH > 1:
                h = _layer(h, W1, G1, S, n, 1, DEPTH, eps, C, HID, DT)
            if DEPTH > 2:
                h = _layer(h, W2, G2, S, n, 2, DEPTH, eps, C, HID, DT)
            if DEPTH > 3:
                h = _layer(h, W3, G3, S, n, 3, DEPTH, eps, C, HID, DT)
            _out(h, GO, WO, BO, OUT, n, offs_p, pmask, P, eps_out, C, CH, NORM_OUT)

    @triton.jit
    def _out_grad_kernel(H, E, WX, W, G, GO, WO, DOUT, DH, DGO, DWO, eps, eps_out, P: tl.constexpr,
                         C: tl.constexpr, HID: tl.constexpr, CH: tl.constexpr, CHP: tl.constexpr, BP: tl.constexpr,
                         HDT: tl.constexpr, DT: tl.constexpr, GDT: tl.constexpr, NORM2: tl.constexpr,
                         FIRST: tl.constexpr, NORM_OUT: tl.constexpr):
        """The last layer's backward, first step, for patch n: its output, recomputed from its input
        as _fwd_kernel computes it, through the output norm and projection to dL/d(output), written
        to DH (in GDT) for _bwd_kernel to read and overwrite; and the patch's part of the norm's and
        projection's weight gradients. A kernel of its own: with no weight-gradient sums to hold,
        it needs a quarter of _bwd_kernel's registers and runs several programs per SM."""
        n = tl.program_id(0)
        w1, w2, s1, s2, w1_ptrs, w2_ptrs = _weights(W, n, C, HID, NORM2)
        dgo = tl.zeros((C,), tl.float32)
        dwo = tl.zeros((CHP, C), tl.float32)
        for p0 in range(0, P, BP):
            offs_p, pmask, ptrs = _tile(n, p0, P, C, BP)
            x = _h_in(H, E, WX, n, offs_p, pmask, ptrs, P, C, CH, FIRST)
            r, xhat, g, xn = _rms(x, G, eps, C, HDT, DT)
            do, dgo, dwo = _out_bwd(x + _mlp(xn, w1, w2, s1, s2, DT), GO, WO, DOUT, n, offs_p, pmask, P, eps_out,
                                    dgo, dwo, C, CH, CHP, NORM_OUT)
            tl.store(DH + ptrs, do.to(GDT), mask=pmask[:, None])
        tl.store(DGO + n * C + tl.arange(0, C), dgo)
        _store_rows(DWO, n, dwo, C, CHP)

    @triton.jit
    def _bwd_kernel(H, E, WX, W, G, DOUT, DH, DW, DG, eps, P: tl.constexpr, C: tl.constexpr,
                    HID: tl.constexpr, CH: tl.constexpr, CHP: tl.constexpr, BP: tl.constexpr, HDT: tl.constexpr,
                    DT: tl.constexpr, GDT: tl.constexpr, NORM2: tl.constexpr, FIRST: tl.constexpr):
        """Backward of _fwd_kernel's layer for patch n, given dL/d(its output) in DOUT (for the last
        layer, _out_grad_kernel's; DOUT may be DH): recomputes the layer from its input, writes
        dL/d(input features) to DH (in GDT) and the patch's weight gradient to DW. FIRST: DH is
        dL/dh0 of the embedding's output (_embed_grad_kernel takes it on).
        The per-pixel products run hidden-major, (HID, BP) = W^T x^T, so that every matmul has the
        weights' 64 or 128 rows, not a tile's pixels: on Hopper they are warpgroup MMAs with the
        weights in shared memory, and the two (HID, C) fp32 weight-gradient sums are the only large
        tensors held in registers over the pixel loop."""
        n = tl.program_id(0)
        w1, w2, s1, s2, w1_ptrs, w2_ptrs = _weights(W, n, C, HID, NORM2)  # (C, HID), (HID, C)
        offs_c = tl.arange(0, C)
        w1t = tl.load(W + tl.trans(w1_ptrs))                                     # (HID, C)
        m1t = tl.zeros((HID, C), tl.float32)  # dL/dW1^T through the matmul, scales included
        m2 = tl.zeros((HID, C), tl.float32)
        dg = tl.zeros((C,), tl.float32)
        for p0 in range(0, P, BP):
            offs_p, pmask, ptrs = _tile(n, p0, P, C, BP)
            x = _h_in(H, E, WX, n, offs_p, pmask, ptrs, P, C, CH, FIRST)
            r, xhat, g, xn = _rms(x, G, eps, C, HDT, DT)
            at = tl.dot(w1t, tl.trans(xn)) * s1[:, None]                           # (HID, BP), recomputed
            sig = tl.sigmoid(at)
            sgt = (at * sig).to(DT)
            do = tl.load(DOUT + ptrs, mask=pmask[:, None], other=0.0).to(tl.float32)   # (BP, C)
            do_ = (do * s2[None, :]).to(DT)                                         # through o = (sg W2) s2
            m2 += tl.dot(sgt, do_)                                                  # (HID, C)
            dsgt = tl.dot(w2, tl.trans(do_)).to(DT).to(tl.float32)                 # (HID, BP)
            dat = (dsgt * sig * (1 + at * (1 - sig)) * s1[:, None]).to(DT)         # SiLU, then a = (xn W1) s1
            m1t += tl.dot(dat, xn)                                                  # (HID, C)
            dxn = tl.dot(tl.trans(dat), w1t).to(DT).to(HDT).to(tl.float32)          # (BP, C)
            dg += tl.sum(dxn * xhat.to(tl.float32), axis=0)
            dx = _rms_bwd(x, r, (dxn * g[None, :]).to(HDT).to(tl.float32), C)
            dh = do + dx
            tl.store(DH + ptrs, dh.to(GDT), mask=pmask[:, None])
        # Eq. 10 backward: s_j = 1/|w_j| gives dW = M - W s_j^2 sum_i(W_ij M_ij) for the raw weights.
        # The weights are reloaded (from L1/L2) at offsets made afresh: held over the loop, they
        # and their (HID, C) offsets would cost registers the loop needs.
        oh, oc = tl.arange(0, HID)[:, None], tl.arange(0, C)[None, :]
        base = n * 2 * C * HID
        w1tf = tl.load(W + base + oh + oc * HID, volatile=True).to(tl.float32)             # (HID, C)
        tl.store(DW + base + oh + oc * HID, (m1t - w1tf * (s1 * s1 * tl.sum(w1tf * m1t, axis=1))[:, None]).to(DT))
        dw2 = m2
        if NORM2:
            w2f = tl.load(W + base + C * HID + oh * C + oc, volatile=True).to(tl.float32)  # (HID, C)
            dw2 = m2 - w2f * (s2 * s2 * tl.sum(w2f * m2, axis=0))[None, :]
        tl.store(DW + base + C * HID + oh * C + oc, dw2.to(DT))
        tl.store(DG + n * C + offs_c, dg)

    @triton.jit
    def _embed_grad_kernel(DH, PIX, DE, DWX, N, P: tl.constexpr, C: tl.constexpr, CH: tl.constexpr,
                           CHP: tl.constexpr, BP: tl.constexpr, T: tl.constexpr):
        """The embedding's gradients from dL/dh0 (N, P, C) of h0 = x Wx^T + e, in one pass over it:
        dL/de (P, C), the sum over patches, and dL/dWx^T (CHP, C), over patches and pixels of x dh0.
        Program (i, j) sums pixels i*BP.. of patches j*T.. into DE (S, P, C) and DWX (P / BP, S,
        CHP, C), S programs along axis 1, added up afterwards."""
        i, j, S = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        offs_p, offs_c, offs_k = i * BP + tl.arange(0, BP), tl.arange(0, C), tl.arange(0, CHP)
        pmask = offs_p < P
        de = tl.zeros((BP, C), tl.float32)
        dwx = tl.zeros((CHP, BP, C), tl.float32)
        for t in range(T):
            n = j * T + t
            m = pmask & (n < N)
            dh = tl.load(DH + n.to(tl.int64) * P * C + offs_p[:, None] * C + offs_c[None, :], mask=m[:, None],
                         other=0.0).to(tl.float32)                                  # (BP, C)
            px = tl.load(PIX + n.to(tl.int64) * P * CH + offs_p[None, :] * CH + offs_k[:, None],
                         mask=m[None, :] & (offs_k < CH)[:, None], other=0.0)      # (CHP, BP)
            de += dh
            dwx += px[:, :, None] * dh[None, :, :]
        tl.store(DE + (j * P + offs_p[:, None]) * C + offs_c[None, :], de, mask=pmask[:, None])
        tl.store(DWX + ((i * S + j) * CHP + offs_k[:, None]) * C + offs_c[None, :], tl.sum(dwx, axis=1))

    _DT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    # Tile settings, timed at L/16 batch-64 shapes on an H100, each kernel alone (median of triton's
    # do_bench, 2026-11-26). Forward, per layer kind (the first layer embeds the pixels, the last
    # ends with the output): 64-pixel tiles and 4 warps, plain 1.14 ms, first 1.26, last 1.0-1.7
    # (two machines). Backward: 64-pixel tiles and 8 warps; 3 stages for the plain layer, 3.34 ms,
    # and the last, 1 for the first, 4.58 with 1 stage when it also summed dL/dWx (2-3 stages were
    # slower there, and under compute-sanitizer its 3-stage code crashed the process); the last's
    # _out_grad_kernel (32 pixels, 4 warps) and layer together 5.18 with 1 stage. The pixel-major
    # kernel before, whose matmuls had a tile's 16-32 pixels as rows, took 4.55 / 5.65 / 6.16 at
    # its best settings. 8 warps hold the two (HID, C) fp32 sums in 64 registers a thread; Triton 3.6
    # then uses 255 registers and spills 14-20 bytes; 4 warps or 128-pixel tiles spill hundreds of
    # bytes and ran 1.5-6x slower. With 16-pixel tiles, 4 warps and 2 stages Triton 3.6's code read
    # shared memory out of bounds (compute-sanitizer); the settings kept were clean for every kernel.
    _FWD = {"plain": dict(BP=64, num_warps=4, num_stages=3), "first": dict(BP=64, num_warps=4, num_stages=1),
            "last": dict(BP=64, num_warps=4, num_stages=1)}
    _BWD = {"plain": dict(BP=64, num_warps=8, num_stages=3), "first": dict(BP=64, num_warps=8, num_stages=1),
            "last": dict(BP=64, num_warps=8, num_stages=3)}
    _OUT_GRAD = dict(BP=32, num_warps=4, num_stages=1)
    # The embedding-gradient kernel alone at L/16 batch-64 shapes (H100, 2026-11-26 12:15 UTC, 18
    # settings): fp32 dL/dh0 0.495 ms as set (0.47-9.5 in the others); bf16 0.349 ms, against 0.560
    # with fp32's setting (32-pixel rows hold a 16-byte load per thread, as 16 do in fp32).
    _EMBED_GRAD = {4: dict(BP=16, T=64, num_warps=4), 2: dict(BP=32, T=128, num_warps=4)}  # by element size
    # The whole-field kernel at batch 128 on an H100, kernel alone: 64-pixel tiles, 4 warps, 1 stage
    # (L/16 4.70 ms, XL/16 9.73); 128 pixels with 8 warps 5.58 / 9.66, with 4 warps 8.29 / 32.9; 2
    # stages slower or out of shared memory. Scales per tile instead of per patch: 4.88 / 11.25.
    _FIELD = dict(BP=64, num_warps=4, num_stages=1)
    _MAX_ELEMENTS = 2 ** 31

    def _chunks(N, per_patch):
        """The kernels index from their first patch with 32-bit offsets: slices of patches whose
        tensors stay under 2^31 elements (one slice below a CFG batch of 128 at 512 px)."""
        step = max(1, _MAX_ELEMENTS // per_patch)
        return [slice(i, min(i + step, N)) for i in range(0, N, step)]

    def _embed_grads(dh, pixels):
        """dL/de (P, C) and dL/dWx (C, CH), fp32, of h0 = x Wx^T + e from dL/dh0 (N, P, C; fp32 or
        bf16) and the pixels x (N, P, CH): one pass over dL/dh0, partial sums per program added after."""
        (N, P, C), CH = dh.shape, pixels.shape[-1]
        cfg = _EMBED_GRAD[dh.element_size()]
        BP, T, CHP = cfg["BP"], cfg["T"], triton.next_power_of_2(CH)
        S = triton.cdiv(N, T)
        f32 = dict(device=dh.device, dtype=torch.float32)
        de, dwx = torch.empty(S, P, C, **f32), torch.empty(triton.cdiv(P, BP), S, CHP, C, **f32)
        _embed_grad_kernel[(triton.cdiv(P, BP), S)](dh, pixels, de, dwx, N, P=P, C=C, CH=CH, CHP=CHP, **cfg)
        return de.sum(0), dwx.sum((0, 1))[:CH].t().contiguous()

    def _features(h, e):
        """(N, P, C): a layer's input features; (FIRST, e given) h holds the pixels, C is e's width."""
        return (*h.shape[:2], e.shape[1]) if e is not None else h.shape

    def _out_shape(h, e, wo):
        """A layer's output: its features, or (LAST) the CH output channels."""
        N, P, C = _features(h, e)
        return (N, P, wo.shape[0] if wo is not None else C)

    def _launch_args(h, w, gain, e, wx, go, wo, eps, eps_out, norm_w2, norm_out):
        """Pointers and constants shared by the forward and backward kernels; absent tensors are
        passed as h (never read: their constexpr flag is off)."""
        N, P, C = _features(h, e)
        ptrs = [t if t is not None else h for t in (h, e, wx, w, gain, go, wo)]
        CH = h.shape[-1] if e is not None else wo.shape[0] if wo is not None else 1  # pixel channels
        consts = dict(P=P, C=C, HID=w.shape[-1] // (2 * C), CH=CH,
                      HDT=_DT[h.dtype], DT=_DT[w.dtype], NORM2=norm_w2, FIRST=e is not None,
                      LAST=wo is not None, NORM_OUT=norm_out)
        return ptrs, consts, "last" if wo is not None else "first" if e is not None else "plain"

    def _layer_forward(h, w, gain, e, wx, go, wo, bo, eps, eps_out, norm_w2, norm_out):
        """One layer, h (N, P, C) -> (N, P, C). With e, wx: h is the pixels (N, P, CH) and the layer
        starts with the embedding, e = phi Wphi^T + b (P, C) and Wx (C, CH). With wo, bo (and go if
        norm_out): it ends with the output norm and projection and returns (N, P, CH)."""
        ptrs, consts, kind = _launch_args(h, w, gain, e, wx, go, wo, eps, eps_out, norm_w2, norm_out)
        out = h.new_empty(_out_shape(h, e, wo))
        for sl in _chunks(h.shape[0], max(w.shape[-1], h[0].numel(), out[0].numel())):
            _fwd_kernel[(sl.stop - sl.start,)](h[sl], *ptrs[1:3], w[sl], *ptrs[4:], bo if bo is not None else h,
                                               out[sl], eps, eps_out, **consts, **_FWD[kind])
        return out

    def _layer_backward(dout, h, w, gain, e, wx, go, wo, eps, eps_out, norm_w2, norm_out, gdt):
        """Gradients of _layer_forward: [dL/d(input features) (N, P, C) stored in gdt, dw, dgain,
        with wo dgo and dwo, with e de and dWx (else empty)]. With e, the features are the
        embedding's output h0: the caller takes them on to the pixels, if they need a gradient."""
        ptrs, consts, kind = _launch_args(h, w, gain, e, wx, go, wo, eps, eps_out, norm_w2, norm_out)
        N, P, C = _features(h, e)
        consts["CHP"], consts["GDT"] = triton.next_power_of_2(consts["CH"]), _DT[gdt]
        last, norm_out = consts.pop("LAST"), consts.pop("NORM_OUT")
        dh, dw = h.new_empty(N, P, C, dtype=gdt), torch.empty_like(w)
        dg = torch.empty(N, C, device=h.device, dtype=torch.float32)
        if last:
            dgo, dwo = torch.empty(N, C, device=h.device), torch.empty(N, consts["CHP"], C, device=h.device)
        dout = dout.contiguous()
        for sl in _chunks(N, max(w.shape[-1], P * C)):
            grid, hs, ws, dhs = (sl.stop - sl.start,), h[sl], w[sl], dh[sl]
            douts = dout[sl]
            if last:  # dL/d(the layer's output) first, into dh, which the layer's backward reads and overwrites
                _out_grad_kernel[grid](hs, *ptrs[1:3], ws, *ptrs[4:], douts, dhs, dgo[sl], dwo[sl], eps, eps_out,
                                       **consts, NORM_OUT=norm_out, **_OUT_GRAD)
                douts = dhs
            _bwd_kernel[grid](hs, *ptrs[1:3], ws, ptrs[4], douts, dhs, dw[sl], dg[sl], eps, **consts, **_BWD[kind])
        de, dwx = h.new_empty(0), h.new_empty(0)
        if e is not None:  # dh is dL/dh0 of h0 = x Wx^T + e: on to e and Wx
            de, dwx = _embed_grads(dh, h)
            dwx = dwx.to(wx.dtype)
        return [dh, dw, dg.sum(0).to(gain.dtype),
                h.new_empty(0) if not last else dgo.sum(0) if go is None else dgo.sum(0).to(go.dtype),
                h.new_empty(0) if not last else dwo.sum(0)[: wo.shape[0]].to(wo.dtype), de, dwx]

    # Inductor's cache of compiled graphs keys on the ops a graph calls, not on their Python code, and
    # a training graph's cache entry (backward included) on its forward: when a layer op's outputs or
    # its backward's change, the forward op takes a new name, so that graphs cached by an earlier
    # version (say, in a git bisect) are not replayed against it. (pixnerd::patch_mlp's backward
    # returned no dWx; pixnerd::field_layer's, pixnerd::field_layer_backward, no dL/de.)
    @torch.library.custom_op("pixnerd::nerf_layer", mutates_args=())
    def _patch_mlp_op(h: torch.Tensor, w: torch.Tensor, gain: torch.Tensor, e: Optional[torch.Tensor],
                      wx: Optional[torch.Tensor], go: Optional[torch.Tensor], wo: Optional[torch.Tensor],
                      bo: Optional[torch.Tensor], eps: float, eps_out: float, norm_w2: bool,
                      norm_out: bool) -> torch.Tensor:
        """_layer_forward as an op of its own: NerfBlock.fused for one layer."""
        return _layer_forward(h, w, gain, e, wx, go, wo, bo, eps, eps_out, norm_w2, norm_out)

    @_patch_mlp_op.register_fake
    def _(h, w, gain, e, wx, go, wo, bo, eps, eps_out, norm_w2, norm_out):
        return h.new_empty(_out_shape(h, e, wo))

    @torch.library.custom_op("pixnerd::field", mutates_args=())
    def _field_op(pixels: torch.Tensor, e: torch.Tensor, wx: torch.Tensor, ws: List[torch.Tensor],
                  gains: List[torch.Tensor], go: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor, eps: float,
                  eps_out: float, norm_w2: bool, norm_out: bool) -> torch.Tensor:
        N, P, CH = pixels.shape
        C = e.shape[1]
        out = torch.empty_like(pixels)
        HID = ws[0].shape[-1] // (2 * C)
        scales = torch.empty(N, len(ws), HID + C, device=pixels.device, dtype=torch.float32)
        pad = 4 - len(ws)  # unused layer slots
        ws = [w.contiguous() for w in ws]
        for sl in _chunks(N, max(ws[0].shape[-1], P * C)):
            _field_kernel[(sl.stop - sl.start,)](pixels[sl], e, wx, *[w[sl] for w in ws + ws[:1] * pad], *gains,
                                                 *gains[:1] * pad, go, wo, bo, out[sl], scales[sl], eps, eps_out, P=P,
                                                 C=C, HID=HID, CH=CH, DEPTH=len(ws), DT=_DT[ws[0].dtype],
                                                 NORM2=norm_w2, NORM_OUT=norm_out, **_FIELD)
        return out

    @_field_op.register_fake
    def _(pixels, e, wx, ws, gains, go, wo, bo, eps, eps_out, norm_w2, norm_out):
        return torch.empty_like(pixels)

    @torch.library.custom_op("pixnerd::nerf_layer_backward", mutates_args=())
    def _patch_mlp_backward_op(dout: torch.Tensor, h: torch.Tensor, w: torch.Tensor, gain: torch.Tensor,
                               e: Optional[torch.Tensor], wx: Optional[torch.Tensor], go: Optional[torch.Tensor],
                               wo: Optional[torch.Tensor], eps: float, eps_out: float, norm_w2: bool,
                               norm_out: bool) -> List[torch.Tensor]:
        """_layer_backward as an op, dL/d(input features) in h's dtype."""
        return _layer_backward(dout, h, w, gain, e, wx, go, wo, eps, eps_out, norm_w2, norm_out, h.dtype)

    def _layer_backward_fake(dout, h, w, gain, e, wx, go, wo, gdt):
        N, P, C = _features(h, e)
        if wo is None:
            extra = [h.new_empty(0), h.new_empty(0)]
        else:
            extra = [go.new_empty(go.shape) if go is not None else h.new_empty(C), torch.empty_like(wo)]
        return [h.new_empty(N, P, C, dtype=gdt), torch.empty_like(w), torch.empty_like(gain), *extra,
                *([h.new_empty(0), h.new_empty(0)] if e is None else [h.new_empty(P, C), torch.empty_like(wx)])]

    @_patch_mlp_backward_op.register_fake
    def _(dout, h, w, gain, e, wx, go, wo, eps, eps_out, norm_w2, norm_out):
        return _layer_backward_fake(dout, h, w, gain, e, wx, go, wo, h.dtype)

    def _setup_context(ctx, inputs, output):
        h, w, gain, e, wx, go, wo, bo, ctx.eps, ctx.eps_out, ctx.norm_w2, ctx.norm_out = inputs
        ctx.save_for_backward(h, w, gain, e, wx, go, wo)

    def _backward(ctx, dout):
        h, w, gain, e, wx, go, wo = ctx.saved_tensors
        dh, dw, dg, dgo, dwo, de, dwx = _patch_mlp_backward_op(dout, h, w, gain, e, wx, go, wo, ctx.eps,
                                                               ctx.eps_out, ctx.norm_w2, ctx.norm_out)
        if e is not None:  # dh is dL/dh0 of h0 = x Wx^T + e (dL/de and dL/dWx came with it): on to x
            dh = dh @ wx if ctx.needs_input_grad[0] else None
        else:
            de = dwx = None
        last = wo is not None
        return (dh, dw, dg, de, dwx, dgo if last and go is not None else None, dwo if last else None,
                dout.sum((0, 1)) if last else None, None, None, None, None)

    _patch_mlp_op.register_autograd(_backward, setup_context=_setup_context)

    # The head in training as one op, weight generators (Eq. 9) included: the gradients passed from
    # layer to layer inside its backward need not be autograd's, so with bf16 weights (_HALF_GRADS)
    # they are stored in bf16, half the memory traffic of the fp32 dL/dh a layer op must return for
    # its fp32 input; and each layer's generator takes its weight gradient (N x 16384 at L/16, 0.5 GiB
    # at batch 64) as soon as it is made, before the next layer's backward, as autograd did between
    # layer ops. Only the storage rounds: each kernel computes in fp32 and adds the layer's residual
    # gradient in fp32. bf16 has fp32's exponent range; fp16's would flush the small gradients of a
    # mean loss over millions of pixels to zero, so fp16 weights keep fp32 gradients.
    _HALF_GRADS = (torch.bfloat16,)

    def _grad_dtype(ws, pixels):
        return ws[0].dtype if ws[0].dtype in _HALF_GRADS else pixels.dtype

    def _layer_args(i, depth, e, wx, go, wo, bo, norm_out):
        """Layer i's optional arguments of depth: the embedding for the first, the output for the last."""
        last = i == depth - 1
        return (*((e, wx) if i == 0 else (None, None)), *((go, wo, bo) if last else (None, None, None)),
                norm_out and last)

    @torch.library.custom_op("pixnerd::nerf_head_train", mutates_args=())
    def _head_train_op(pixels: torch.Tensor, s: torch.Tensor, gen_w: List[torch.Tensor], gen_b: List[torch.Tensor],
                       e: torch.Tensor, wx: torch.Tensor, gains: List[torch.Tensor], go: Optional[torch.Tensor],
                       wo: torch.Tensor, bo: torch.Tensor, eps: float, eps_out: float, norm_w2: bool,
                       norm_out: bool) -> List[torch.Tensor]:
        """The head, pixels (N, P, CH) and s (N, D) -> [v (N, P, CH), h_1, ..., h_{depth-1}, w_0, ...]:
        each layer's weights w_i = s W_i^T + b_i (N, 2 C HID) in s's dtype, and the inner layers'
        inputs h_i (N, P, C), are outputs so that autograd keeps them for the backward."""
        ws = [torch.addmm(b, s, W.t()) for W, b in zip(gen_w, gen_b)]      # Eq. 9
        hs, h = [], pixels
        for i, (w, g) in enumerate(zip(ws, gains)):
            *args, nout = _layer_args(i, len(ws), e, wx, go, wo, bo, norm_out)
            hs.append(h := _layer_forward(h, w, g, *args, eps, eps_out, norm_w2, nout))
        return [hs[-1], *hs[:-1], *ws]

    @_head_train_op.register_fake
    def _(pixels, s, gen_w, gen_b, e, wx, gains, go, wo, bo, eps, eps_out, norm_w2, norm_out):
        N, P, _ = pixels.shape
        return [pixels.new_empty(N, P, wo.shape[0]), *[pixels.new_empty(N, P, e.shape[1]) for _ in gen_w[1:]],
                *[s.new_empty(N, W.shape[0]) for W in gen_w]]

    @torch.library.custom_op("pixnerd::nerf_head_train_backward", mutates_args=())
    def _head_train_backward_op(dv: torch.Tensor, pixels: torch.Tensor, s: torch.Tensor, gen_w: List[torch.Tensor],
                                e: torch.Tensor, wx: torch.Tensor, gains: List[torch.Tensor],
                                go: Optional[torch.Tensor], wo: torch.Tensor, hs: List[torch.Tensor],
                                ws: List[torch.Tensor], eps: float, eps_out: float, norm_w2: bool,
                                norm_out: bool) -> List[torch.Tensor]:
        """[dL/dh0 (N, P, C), de, dWx, dgo, dWo, ds, [dW_0 db_0 0], ..., dgain_0, ...] from dL/dv: the
        layers backwards from the last, each reading the one after's dL/d(its output) and handing
        its weight gradient to its generator at once."""
        gdt = _grad_dtype(ws, pixels)
        (N, D), depth, dout, ds = s.shape, len(ws), dv, None
        s1 = torch.cat([s, s.new_ones(N, 1), s.new_zeros(N, 7)], 1)  # [s, 1, 0 x 7] (rows of 16 bytes):
        # dW and db from one matmul
        dgen, dgains = [None] * depth, [None] * depth
        for i in reversed(range(depth)):
            e_, wx_, go_, wo_, _, nout = _layer_args(i, depth, e, wx, go, wo, None, norm_out)
            dout, dw, dgains[i], *rest = _layer_backward(dout, ([pixels] + hs)[i], ws[i], gains[i], e_, wx_, go_,
                                                         wo_, eps, eps_out, norm_w2, nout, gdt)
            ds = dw @ gen_w[i] if ds is None else torch.addmm(ds, dw, gen_w[i])      # (N, D)
            dgen[i] = dw.t() @ s1                                        # (2 C HID, D + 8): [dW, db, 0]
            del dw  # the next layer's backward may take its memory
            if i == depth - 1:
                dgo, dwo = rest[:2]
        return [dout, *rest[2:], dgo, dwo, ds, *dgen, *dgains]

    @_head_train_backward_op.register_fake
    def _(dv, pixels, s, gen_w, e, wx, gains, go, wo, hs, ws, eps, eps_out, norm_w2, norm_out):
        gdt = _grad_dtype(ws, pixels)
        first = _layer_backward_fake(dv, pixels, ws[0], gains[0], e, wx, None, None, gdt)
        dgo = go.new_empty(go.shape) if go is not None else e.new_empty(e.shape[1])
        return [first[0], *first[5:], dgo, torch.empty_like(wo), torch.empty_like(s),
                *[s.new_empty(W.shape[0], W.shape[1] + 8) for W in gen_w], *[torch.empty_like(g) for g in gains]]

    def _head_setup_context(ctx, inputs, output):
        pixels, s, gen_w, gen_b, e, wx, gains, go, wo, bo, *ctx.consts = inputs
        ctx.depth = len(gen_w)
        ctx.save_for_backward(pixels, s, e, wx, go, wo, *gen_w, *gains, *output[1:])
        ctx.mark_non_differentiable(*output[1:])  # kept for the backward, not results: no
        ctx.set_materialize_grads(False)          # gradients of zeros for them (2 GiB at L/16)

    def _head_backward(ctx, grads):
        pixels, s, e, wx, go, wo, *rest = ctx.saved_tensors
        d = ctx.depth
        gen_w, gains, hs, ws = rest[:d], rest[d: 2 * d], rest[2 * d: 3 * d - 1], rest[3 * d - 1:]
        dv = grads[0]
        dh0, de, dwx, dgo, dwo, ds, *rest = _head_train_backward_op(dv, pixels, s, gen_w, e, wx, gains, go, wo, hs,
                                                                    ws, *ctx.consts)
        dpix = dh0.to(wx.dtype) @ wx if ctx.needs_input_grad[0] else None
        D, dgen = s.shape[1], rest[:d]  # each [dW_i, db_i, 0]
        return (dpix, ds, [g[:, :D] for g in dgen], [g[:, D] for g in dgen], de, dwx, rest[d:],
                dgo if go is not None else None, dwo, dv.sum((0, 1)), None, None, None, None)

    _head_train_op.register_autograd(_head_backward, setup_context=_head_setup_context)
