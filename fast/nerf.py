"""The neural field as fused Triton kernels (CUDA; optional): one program per patch.

nerf_head.NerfBlock writes several (patches, pixels, 2 x width) tensors per layer. Here one
program owns one patch: it loads the patch's predicted W1 and W2 once, computes their Eq. 10
scales, runs its pixels through the MLP on chip and writes only the output. The backward
recomputes the hidden activations from the layer's input and sums the patch's weight gradients
on chip, through the normalisation. In the head the first layer also computes the embedding from
the pixels and the last the output norm and projection; in training the whole head, weight
generators included, is one op, so that its backward can pass bf16 gradients between layers.
For inference one kernel runs the whole field of a patch and writes only the velocity.

The kernels compute Eq. 10 in its column-scale form, x (W diag(s)) = (x W) diag(s) with
s_j = 1 / ||w_j||: the weights are rounded to the matmul dtype once, as the generator wrote them,
the scales multiply the fp32 matmul outputs, and no normalised copy is made. `patch_mlp` and
`reference_head` are that arithmetic in torch: the kernels match them to accumulation order, and
they match nerf_head.py's plain form in fp32 (the tests check both). Where a kernel does not
apply (CPU tensors, fp32 without autocast, fields wider than 64 x 128), nerf_head.py's forward runs.
"""
from typing import List, Optional  # typing.List: custom_op schemas of torch < 2.7 read no built-in list type

import torch
import torch.nn.functional as F

from nerf_head import NerfBlock, NerfHead, RMSNorm, coordinate_encoding, no_autocast

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: nerf_head.py's forward serves
    triton = None


def available():
    return triton is not None and torch.cuda.is_available()


def supported(width, hidden):
    """tl.dot tiles: powers of 2 >= 16; a patch's W1 and W2 on chip: up to the official 64 x 128 (the
    training kernels of a 128-wide field need more shared memory than a Hopper GPU has)."""
    return all(d >= 16 and d & (d - 1) == 0 for d in (width, hidden)) and width * hidden <= 64 * 128


# ---------------------------------------------------------------------------------------------
# The kernels' arithmetic in torch: the column-scale form of Eq. 10
# ---------------------------------------------------------------------------------------------

def patch_mlp(h, w, norm, norm_w2=True):
    """NerfBlock's h + SiLU(norm(h) W1/||W1||) W2/||W2|| with the norms as fp32 column scales.
    h: (N, pixels, width); w: (N, 2 * width * hidden), each patch's generated W1 (width, hidden)
    then W2 (hidden, width). Matmul operands in w's dtype, fp32 accumulation and results."""
    N, P, C = h.shape
    dt = w.dtype
    w1, w2 = w.chunk(2, dim=-1)
    w1, w2 = w1.view(N, C, -1), w2.view(N, -1, C)                      # (N, C, hid), (N, hid, C)
    s1 = 1 / torch.linalg.vector_norm(w1, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
    s2 = 1 / torch.linalg.vector_norm(w2, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12) \
        if norm_w2 else 1.0                                            # (N, 1, hid), (N, 1, C)
    with no_autocast(h):
        a = torch.bmm(norm(h).to(dt).float(), w1.float()) * s1        # (N, P, hid), fp32
        o = torch.bmm(F.silu(a).to(dt).float(), w2.float()) * s2      # (N, P, C), fp32
    return h + o.to(h.dtype)


def reference_head(head, s, pixels, ph, pw):
    """NerfHead.forward with patch_mlp for its layers, the first Linear split as the kernels split
    it: Linear([x, phi]) = x Wx^T + (phi Wphi^T + b), the coordinate half once per pixel position."""
    phi = coordinate_encoding(head.encoding, ph, pw, pixels.device)
    dt, C = pixels.dtype, head.channels
    with no_autocast(pixels):
        w, b = head.embed.weight.to(dt), head.embed.bias.to(dt)
        h = F.linear(pixels, w[:, :C]) + F.linear(phi.to(dt), w[:, C:], b)
    for block in head.blocks:
        h = patch_mlp(h, block.generator(s), block.norm, block.norm_w2)
    with no_autocast(pixels):
        return F.linear(head.norm_out(h), head.out.weight.to(dt), head.out.bias.to(dt))


# ---------------------------------------------------------------------------------------------
# The fast modules: nerf_head's, with forwards that run the kernels where they apply
# ---------------------------------------------------------------------------------------------

class FastNerfBlock(NerfBlock):
    """NerfBlock through the layer kernel for CUDA inputs with 16-bit generated weights."""

    def forward(self, h, s):
        if not (h.is_cuda and _matmul_dtype(s, self.generator.weight) in (torch.bfloat16, torch.float16)):
            return super().forward(h, s)
        return _patch_mlp_op(h.contiguous(), self.generator(s).contiguous(), self.norm.weight, None, None, None,
                             None, None, self.norm.eps, 0.0, self.norm_w2, False)


class FastNerfHead(NerfHead):
    """NerfHead through the head kernels: of the (patches, pixels, width) fp32 tensors (1 GiB each at
    L/16 batch 64) only the inner layers' inputs go to memory. Training: one kernel per layer, all in
    one op (_head_train_op). Inference: the whole field in one kernel (at most 4 layers)."""

    def forward(self, s, pixels, ph, pw):
        v = _fused_head(self, s, pixels, ph, pw) if pixels.is_cuda else None
        return super().forward(s, pixels, ph, pw) if v is None else v


def _matmul_dtype(s, weight):
    """The dtype of the generator's output for input s: autocast's, else the promoted one."""
    dev = s.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(s.dtype, weight.dtype)


def enable(model):
    """Swap the neural-field modules of a built model for the fast ones (in place, same parameters
    and state-dict keys) where the kernels apply. Returns the number of field layers swapped."""
    if not available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is NerfHead and len(m.blocks) and all(supported(b.width, b.hidden) for b in m.blocks):
            m.__class__ = FastNerfHead
            for b in m.blocks:
                b.__class__ = FastNerfBlock
                n += 1
    return n


def _fused_head(head, s, pixels, ph, pw):
    """The head through the kernels; None where they do not apply (pixels not in fp32, generator
    outputs in fp32)."""
    blocks, C = head.blocks, head.channels
    training = torch.is_grad_enabled()
    if pixels.dtype != torch.float32 or not (training or len(blocks) <= 4):
        return None
    dt = _matmul_dtype(s, blocks[0].generator.weight)
    if dt not in (torch.bfloat16, torch.float16):  # fp32 without autocast: nerf_head.py's matmuls
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
    # Tile settings: the fastest of those timed at L/16 batch-64 shapes, each kernel alone
    # (docs/speed.md). 8 warps in the backward hold its two (HID, C) fp32 sums in registers; fewer
    # warps or larger tiles spill. 16-pixel tiles at 4 warps and 2 stages read shared memory out of
    # bounds under Triton 3.6 (compute-sanitizer); these settings were clean for every kernel.
    _FWD = {"plain": dict(BP=64, num_warps=4, num_stages=3), "first": dict(BP=64, num_warps=4, num_stages=1),
            "last": dict(BP=64, num_warps=4, num_stages=1)}
    _BWD = {"plain": dict(BP=64, num_warps=8, num_stages=3), "first": dict(BP=64, num_warps=8, num_stages=1),
            "last": dict(BP=64, num_warps=8, num_stages=3)}
    _OUT_GRAD = dict(BP=32, num_warps=4, num_stages=1)
    # by element size: 32-pixel rows hold a 16-byte load per thread in bf16, as 16 do in fp32
    _EMBED_GRAD = {4: dict(BP=16, T=64, num_warps=4), 2: dict(BP=32, T=128, num_warps=4)}
    # 64-pixel tiles, 4 warps, 1 stage: the fastest timed; 2 stages run out of shared memory
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
        """_layer_forward as an op of its own: FastNerfBlock's layer."""
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
