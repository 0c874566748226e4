"""The transformer block's elementwise work as fused Triton kernels (CUDA; optional).

Without torch.compile every RMSNorm, adaLN modulation, RoPE rotation, SiLU gate and gated residual
of model.py is a chain of small PyTorch kernels, each reading and writing a full activation tensor.
Here each is one kernel forward and one backward, so eager runs are close to compiled ones. Under
torch.compile, Inductor fuses model.py's own functions with their neighbours, except for the q/k
norm + RoPE kernel, which beats Inductor's fusion: its backward writes dL/dq, dL/dk and dL/dv into
one gradient in the qkv Linear's layout. For sampling (no gradients), compiled or not, SwiGLU's fc1
and its SiLU gate are one GEMM on GPUs with TMA (Hopper and newer), which writes only the gated half.

Each kernel rounds where the torch function rounds (its tensors' dtypes, bf16 under autocast), so
the forward matches it up to the order of the fp32 sums; the backward computes in fp32 and rounds
its results once. The fast modules fall back to model.py's forwards off the GPU.
"""
import torch
import torch.nn.functional as F

from model import Attention, Block, SwiGLU, modulate

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: model.py's forwards serve
    triton = None
try:  # TMA descriptors (newer Triton): the SwiGLU GEMM below; without them cuBLAS runs fc1
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
_TMA = False  # set by enable()
# Below this many tokens cuBLAS's fc1 plus the gate kernel are as fast as the fused GEMM.
_SWIGLU_MIN_ROWS = 2048


def available():
    return triton is not None and torch.cuda.is_available()


def _eager(*tensors):
    """Eager CUDA calls: under torch.compile, Inductor's fusion of the torch function is faster."""
    return all(t.is_cuda for t in tensors) and not torch.compiler.is_compiling()


def _autocast_dtype(x):
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype


def silu_gate(h):
    """SiLU(gate) * value for h = [gate, value] (..., 2F), the fc1 output of SwiGLU."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


def fused_modulate(x, norm, shift, scale):
    """modulate(norm(x), shift, scale), x (B, N, D), shift and scale (B, 1, D). Under autocast the
    result is written in the autocast dtype: its only readers are the qkv and fc1 Linears, which
    would cast it so (the same rounding, one fp32 tensor fewer)."""
    B, N, D = x.shape
    if not (_eager(x, shift, scale) and shift.shape == scale.shape == (B, 1, D)
            and shift.stride(-1) == scale.stride(-1) == 1):
        return modulate(norm(x), shift, scale)
    return _Modulate.apply(x, norm.weight, shift, scale, norm.eps, _autocast_dtype(x))


def fused_gated_residual(x, gate, y):
    """x + gate * y, x and y (B, N, D), gate (B, 1, D)."""
    B, N, D = x.shape
    if not (_eager(x, gate, y) and y.shape == x.shape and gate.shape == (B, 1, D) and gate.stride(-1) == 1):
        return x + gate * y
    return _GatedResidual.apply(x, gate, y)


def fused_swiglu_hidden(x, w1):
    """SiLU(x W1) * x W3, x (..., D), w1 = [W1; W3] (2F, D). Without gradients (sampling) on a GPU
    with TMA, fc1 and the gate are one GEMM that keeps an output tile's gate and value halves in two
    accumulators, so fc1's (..., 2F) output never goes to memory (compiled or not). Otherwise
    cuBLAS's fc1, then the gate kernel (eager) or Inductor's fusion (compiled)."""
    dt = _autocast_dtype(x)
    if (_TMA and x.is_cuda and not torch.is_grad_enabled() and w1.dtype == dt and x.shape[-1] % 8 == 0
            and w1.shape[0] % 16 == 0 and dt in (torch.bfloat16, torch.float16)  # TMA: 16-byte rows
            and x.numel() >= _SWIGLU_MIN_ROWS * x.shape[-1]):
        return _swiglu_op(x.reshape(-1, x.shape[-1]).to(dt), w1).unflatten(0, x.shape[:-1])
    h = F.linear(x, w1)
    return _SiluGate.apply(h.contiguous()) if _eager(h) else silu_gate(h)


# ---------------------------------------------------------------------------------------------
# The fast modules: model.py's, with forwards that run the kernels where they apply
# ---------------------------------------------------------------------------------------------

class FastBlock(Block):
    """Block with the adaLN modulation and the gated residuals as kernels (eager CUDA)."""

    def forward(self, x, c, rope=None, text=None, mask=None):
        if not _eager(x):
            return super().forward(x, c, rope, text, mask)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = fused_gated_residual(x, gate1, self.attn(fused_modulate(x, self.norm1, shift1, scale1), rope, text, mask))
        return fused_gated_residual(x, gate2, self.mlp(fused_modulate(x, self.norm2, shift2, scale2)))


class FastAttention(Attention):
    """Attention with q/k RMSNorm + RoPE as one kernel on CUDA (compiled too)."""

    def forward(self, x, rope=None, text=None, mask=None):
        if rope is None or not x.is_cuda or self.q_norm.eps != self.k_norm.eps:
            return super().forward(x, rope, text, mask)
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = _QKNormRope.apply(qkv, self.q_norm.weight, self.k_norm.weight, *rope, self.q_norm.eps)
        return self.attend(q, k, v, text, mask)


class FastSwiGLU(SwiGLU):
    """SwiGLU with fc1 and the gate as one GEMM (sampling) or the gate as a kernel (eager training)."""

    def forward(self, x):
        if not x.is_cuda:
            return super().forward(x)
        w1, w2 = self.weights()
        return F.linear(fused_swiglu_hidden(x, w1), w2)


def enable(model):
    """Swap the blocks, attentions and SwiGLUs of a built model for the fast ones (in place, same
    parameters and state-dict keys). Returns the number of blocks swapped (0 without Triton or CUDA)."""
    global _TMA
    if not available():
        return 0
    _TMA = TensorDescriptor is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    swap = {Block: FastBlock, Attention: FastAttention, SwiGLU: FastSwiGLU}
    n = 0
    for m in model.modules():
        if type(m) in swap:
            n += type(m) is Block
            m.__class__ = swap[type(m)]
    return n


# ---------------------------------------------------------------------------------------------
# autograd wrappers: each saves its inputs and recomputes the rest in the backward kernel
# ---------------------------------------------------------------------------------------------

def _cdiv(a, b):
    return -(-a // b)


def _pow2(n):
    """The smallest power of 2 >= n (triton.next_power_of_2 is a constexpr function now, slow to call
    from the host, and an eager step makes about a thousand such calls)."""
    return 1 << (n - 1).bit_length()


def _rows(N, D):
    """Rows per program of a (rows, D) kernel: about 4K elements."""
    return max(1, min(_pow2(N), 4096 // _pow2(D)))


class _Modulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gain, shift, scale, eps, out_dtype):
        B, N, D = x.shape
        x = x.contiguous()
        out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
        rdt = torch.promote_types(x.dtype, scale.dtype)
        BR = _rows(N, D)
        _modulate_fwd[(_cdiv(N, BR), B)](
            x, gain, shift, scale, out, N, D, shift.stride(0), scale.stride(0), eps, BR=BR,
            BD=_pow2(D), XDT=_DT[x.dtype], SDT=_DT[scale.dtype], RDT=_DT[rdt])
        ctx.save_for_backward(x, gain, shift, scale)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dout):
        x, gain, shift, scale = ctx.saved_tensors
        B, N, D = x.shape
        R = 16  # rows summed per program into the (B, 1, D) and (D,) gradients
        nb = _cdiv(N, R)
        dx = torch.empty_like(x)
        part = torch.empty(3, B, nb, D, device=x.device, dtype=torch.float32)  # gain, scale, shift
        _modulate_bwd[(nb, B)](dout.contiguous(), x, gain, scale, dx, part, N, D, scale.stride(0), ctx.eps,
                               R=R, BR=_rows(R, D), BD=_pow2(D), XDT=_DT[x.dtype], SDT=_DT[scale.dtype])
        part = part.sum(2)                                                  # (3, B, D)
        d_scale_shift = part[1:, :, None].to(scale.dtype)                   # (2, B, 1, D), one cast
        return dx, part[0].sum(0).to(gain.dtype), d_scale_shift[1], d_scale_shift[0], None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        B, N, D = x.shape
        x, y = x.contiguous(), y.contiguous()
        pdt = torch.promote_types(gate.dtype, y.dtype)
        out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, pdt))
        BR = _rows(N, D)
        _gated_fwd[(_cdiv(N, BR), B)](x, gate, y, out, N, D, gate.stride(0), BR=BR, BD=_pow2(D), PDT=_DT[pdt])
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        B, N, D = y.shape
        R = 16
        nb = _cdiv(N, R)
        dy = torch.empty_like(y)
        part = torch.empty(B, nb, D, device=y.device, dtype=torch.float32)
        pdt = torch.promote_types(gate.dtype, y.dtype)
        _gated_bwd[(nb, B)](dout.contiguous(), gate, y, dy, part, N, D, gate.stride(0), R=R, BR=_rows(R, D),
                            BD=_pow2(D), PDT=_DT[pdt])
        return dout.to(ctx.x_dtype), part.sum(1)[:, None].to(gate.dtype), dy


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, gain_q, gain_k, cos, sin, eps):
        B, N, _, H, hd = qkv.shape
        q, k = (torch.empty((B, N, H, hd), device=qkv.device, dtype=qkv.dtype) for _ in range(2))
        rows = B * N * H
        BR = max(1, 2048 // _pow2(hd))
        _qk_norm_rope_fwd[(_cdiv(rows, BR),)](qkv, gain_q, gain_k, cos, sin, q, k, rows, N, H, eps, HD=hd, BR=BR,
                                              BH=_pow2(hd) // 2, XDT=_DT[qkv.dtype])
        ctx.save_for_backward(qkv, gain_q, gain_k, cos, sin)
        ctx.eps = eps
        return q, k, qkv[:, :, 2]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, gain_q, gain_k, cos, sin = ctx.saved_tensors
        B, N, _, H, hd = qkv.shape
        rows = B * N * H
        # R rows summed per program into the gains' gradients: heads that fill their tiles (64
        # channels) are fastest as one 32-row tile per program at 4 warps, 72-channel heads in
        # 128-column tiles with 1024 rows at 8 warps (timed in training steps).
        BH = _pow2(hd) // 2
        R, warps = (32, 4) if hd == 2 * BH else (1024, 8)
        nb = _cdiv(rows, R)
        dqkv = torch.empty_like(qkv)
        part = torch.empty(2, nb, hd, device=qkv.device, dtype=torch.float32)
        _qk_norm_rope_bwd[(nb,)](dq.contiguous(), dk.contiguous(), dv.contiguous(), qkv, gain_q, gain_k, cos, sin,
                                 dqkv, part, rows, N, H, ctx.eps, HD=hd, R=R, BR=max(1, min(R, 1024 // BH)), BH=BH,
                                 XDT=_DT[qkv.dtype], num_warps=warps)
        part = part.sum(1)
        return dqkv, part[0].to(gain_q.dtype), part[1].to(gain_k.dtype), None, None, None


class _SiluGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        F2 = h.shape[-1]
        out = torch.empty((*h.shape[:-1], F2 // 2), device=h.device, dtype=h.dtype)
        n = out.numel()
        _silu_gate_fwd[(_cdiv(n, 1024),)](h, out, n, F2 // 2, BLOCK=1024, DT=_DT[h.dtype])
        ctx.save_for_backward(h)
        return out

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        dh = torch.empty_like(h)
        n = dout.numel()
        _silu_gate_bwd[(_cdiv(n, 1024),)](dout.contiguous(), h, dh, n, h.shape[-1] // 2, BLOCK=1024,
                                          DT=_DT[h.dtype])
        return dh


# ---------------------------------------------------------------------------------------------
# kernels. `.to(DT).to(tl.float32)` is a torch op's rounding to its result dtype DT.
# ---------------------------------------------------------------------------------------------

if triton is not None:
    _DT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

    @triton.jit
    def _round(x, DT: tl.constexpr):
        return x.to(DT).to(tl.float32)

    @triton.jit
    def _tile(N, D, b, rows, BD: tl.constexpr):
        """Offsets and mask of rows `rows` (BR,) of image b in a contiguous (B, N, D) tensor."""
        cols = tl.arange(0, BD)
        cmask = cols < D
        mask = (rows < N)[:, None] & cmask[None, :]
        return (b * N + rows)[:, None] * D + cols[None, :], mask, cols, cmask

    @triton.jit
    def _rms_modulated(x, gain, sc, D, eps, XDT: tl.constexpr, SDT: tl.constexpr):
        """RMSNorm(x) as nerf_head.RMSNorm rounds it, and the factor 1 + scale in scale's dtype."""
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)                         # (BR,)
        xhat = _round(x * r[:, None], XDT)                                    # y.to(x.dtype)
        y = _round(xhat * _round(gain, XDT)[None, :], XDT)                    # * weight.to(x.dtype)
        return r, xhat, y, _round(1 + sc, SDT)

    @triton.jit
    def _modulate_fwd(X, G, SHIFT, SCALE, OUT, N, D, s_shift, s_scale, eps, BR: tl.constexpr, BD: tl.constexpr,
                      XDT: tl.constexpr, SDT: tl.constexpr, RDT: tl.constexpr):
        b = tl.program_id(1)
        offs, mask, cols, cmask = _tile(N, D, b, tl.program_id(0) * BR + tl.arange(0, BR), BD)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        gain = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * s_scale + cols, mask=cmask, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + b * s_shift + cols, mask=cmask, other=0.0).to(tl.float32)
        r, xhat, y, sc1 = _rms_modulated(x, gain, sc, D, eps, XDT, SDT)
        out = _round(y * sc1[None, :], RDT) + sh[None, :]
        tl.store(OUT + offs, out.to(RDT).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _modulate_bwd(DOUT, X, G, SCALE, DX, PART, N, D, s_scale, eps, R: tl.constexpr, BR: tl.constexpr,
                      BD: tl.constexpr, XDT: tl.constexpr, SDT: tl.constexpr):
        """Rows R*i..R*(i+1) of image b: dx, and their sums of the gain, scale and shift gradients."""
        i, b = tl.program_id(0), tl.program_id(1)
        B = tl.num_programs(1)
        cols = tl.arange(0, BD)
        cmask = cols < D
        gain = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * s_scale + cols, mask=cmask, other=0.0).to(tl.float32)
        d_gain = tl.zeros((BD,), tl.float32)
        d_scale = tl.zeros((BD,), tl.float32)
        d_shift = tl.zeros((BD,), tl.float32)
        for r0 in tl.range(0, R, BR):
            offs, mask, cols, cmask = _tile(N, D, b, i * R + r0 + tl.arange(0, BR), BD)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)     # 0 on masked rows
            r, xhat, y, sc1 = _rms_modulated(x, gain, sc, D, eps, XDT, SDT)
            d_shift += tl.sum(dout, axis=0)
            d_scale += tl.sum(dout * y, axis=0)
            dy = dout * sc1[None, :]
            d_gain += tl.sum(dy * xhat, axis=0)
            dxhat = dy * _round(gain, XDT)[None, :]
            xr = x * r[:, None]                                                   # RMSNorm backward
            dx = r[:, None] * (dxhat - xr * (tl.sum(dxhat * xr, axis=1) / D)[:, None])
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        nb = tl.num_programs(0)
        base = (b * nb + i) * D + cols
        tl.store(PART + base, d_gain, mask=cmask)
        tl.store(PART + 2 * B * nb * D + base, d_shift, mask=cmask)
        tl.store(PART + B * nb * D + base, d_scale, mask=cmask)

    @triton.jit
    def _gated_fwd(X, GATE, Y, OUT, N, D, s_gate, BR: tl.constexpr, BD: tl.constexpr, PDT: tl.constexpr):
        b = tl.program_id(1)
        offs, mask, cols, cmask = _tile(N, D, b, tl.program_id(0) * BR + tl.arange(0, BR), BD)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + b * s_gate + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (x + _round(gate[None, :] * y, PDT)).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd(DOUT, GATE, Y, DY, PART, N, D, s_gate, R: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                   PDT: tl.constexpr):
        i, b = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, BD)
        cmask = cols < D
        gate = tl.load(GATE + b * s_gate + cols, mask=cmask, other=0.0).to(tl.float32)
        d_gate = tl.zeros((BD,), tl.float32)
        for r0 in tl.range(0, R, BR):
            offs, mask, cols, cmask = _tile(N, D, b, i * R + r0 + tl.arange(0, BR), BD)
            dp = _round(tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32), PDT)  # grad of gate * y
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            d_gate += tl.sum(dp * y, axis=0)
            tl.store(DY + offs, (dp * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
        tl.store(PART + (b * tl.num_programs(0) + i) * D + cols, d_gate, mask=cmask)

    @triton.jit
    def _head_rows(rows, N, H, BH: tl.constexpr, HD: tl.constexpr):
        """For rows (b, n, h) (BR,): their q's offsets in qkv (B, N, 3, H, HD) (k's are H * HD further,
        v's 2 H * HD) and in a (B, N, H, HD) tensor, each tiled (BR, 2 BH), the offsets (BR, BH) of channel
        pair j in the (N, HD/2) RoPE tables (n taken from the (B * N * H) row index, so that any N
        works), and the masks of the tiles' columns. HD is a compile-time constant: Triton then
        sees that XL/16's 72-channel rows start on 16-byte boundaries and loads 8 channels at a time
        (with a runtime 72 it did not: 41 loads per tile, 33 of them of one channel, against 13)."""
        k, j = tl.arange(0, 2 * BH), tl.arange(0, BH)
        return ((((rows // H) * 3 * H + rows % H) * HD)[:, None] + k[None, :], rows[:, None] * HD + k[None, :],
                ((rows // H) % N)[:, None] * (HD // 2) + j[None, :], (k < HD)[None, :], (j < HD // 2)[None, :])

    @triton.jit
    def _pair_split(x, BR: tl.constexpr, BH: tl.constexpr):
        """(BR, 2 BH) -> the even and the odd channels, each (BR, BH)."""
        return tl.split(tl.reshape(x, (BR, BH, 2)))

    @triton.jit
    def _norm_rope(x, G, c, s, eps, HD: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, XDT: tl.constexpr):
        """RMSNorm (rounded to XDT as nerf_head.RMSNorm rounds) then model.apply_rope (in fp32) of the
        rows x (BR, 2 BH) fp32, with the RoPE cos and sin (BR, BH) in fp32."""
        k = tl.arange(0, 2 * BH)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / HD + eps)[:, None]
        gain = tl.load(G + k, mask=k < HD, other=0.0)
        ye, yo = _pair_split(_round(_round(x * r, XDT) * _round(gain, XDT)[None, :], XDT), BR, BH)  # RMSNorm
        return tl.reshape(tl.join(ye * c - yo * s, ye * s + yo * c), (BR, 2 * BH))              # apply_rope

    @triton.jit
    def _norm_rope_bwd(dout, x, gain, c, s, eps, HD: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr,
                       XDT: tl.constexpr):
        """Backward of _norm_rope at the rows x given dL/d(out) (both (BR, 2 BH) fp32), the gain (1, 2 BH)
        rounded as the forward rounds it: dL/dx and the rows' products for the gain's gradient."""
        r = tl.rsqrt(tl.sum(x * x, axis=1) / HD + eps)[:, None]
        de, do = _pair_split(dout, BR, BH)
        dy = tl.reshape(tl.join(de * c + do * s, do * c - de * s), (BR, 2 * BH))       # rotation transposed
        dxhat = dy * gain                                                                # RMSNorm backward
        return r * (dxhat - x * r * (tl.sum(dxhat * x, axis=1)[:, None] * r / HD)), dy * _round(x * r, XDT)

    @triton.jit
    def _qk_norm_rope_fwd(QKV, GQ, GK, COS, SIN, Q, K, rows_total, N, H, eps, HD: tl.constexpr, BR: tl.constexpr,
                          BH: tl.constexpr, XDT: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        src, dst, tab, kmask, jmask = _head_rows(rows, N, H, BH, HD)
        rmask = (rows < rows_total)[:, None]
        c = tl.load(COS + tab, mask=rmask & jmask, other=0.0)
        s = tl.load(SIN + tab, mask=rmask & jmask, other=0.0)
        q = tl.load(QKV + src, mask=rmask & kmask, other=0.0).to(tl.float32)                # (BR, 2 BH)
        tl.store(Q + dst, _norm_rope(q, GQ, c, s, eps, HD, BR, BH, XDT).to(XDT), mask=rmask & kmask)
        k = tl.load(QKV + H * HD + src, mask=rmask & kmask, other=0.0).to(tl.float32)
        tl.store(K + dst, _norm_rope(k, GK, c, s, eps, HD, BR, BH, XDT).to(XDT), mask=rmask & kmask)

    @triton.jit
    def _qk_norm_rope_bwd(DQ, DK, DV, QKV, GQ, GK, COS, SIN, DQKV, PART, rows_total, N, H, eps, HD: tl.constexpr,
                          R: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, XDT: tl.constexpr):
        """dL/dqkv in qkv's layout: q's and k's through _norm_rope's backward, v's copied; the gains'
        gradients summed over R rows per program into PART (2, programs, HD)."""
        i = tl.program_id(0)
        k = tl.arange(0, 2 * BH)
        gq = _round(tl.load(GQ + k, mask=k < HD, other=0.0), XDT)[None, :]
        gk = _round(tl.load(GK + k, mask=k < HD, other=0.0), XDT)[None, :]
        # the gains' gradients, summed over the tile's rows after the loop (a sum across warps on
        # every tile is slower)
        dgq = tl.zeros((BR, 2 * BH), tl.float32)
        dgk = tl.zeros((BR, 2 * BH), tl.float32)
        for r0 in tl.range(0, R, BR):
            rows = i * R + r0 + tl.arange(0, BR)
            src, dst, tab, kmask, jmask = _head_rows(rows, N, H, BH, HD)
            rmask = (rows < rows_total)[:, None]
            mask = rmask & kmask
            c = tl.load(COS + tab, mask=rmask & jmask, other=0.0)
            s = tl.load(SIN + tab, mask=rmask & jmask, other=0.0)
            x = tl.load(QKV + src, mask=mask, other=0.0).to(tl.float32)                     # q
            dx, p = _norm_rope_bwd(tl.load(DQ + dst, mask=mask, other=0.0).to(tl.float32), x, gq, c, s, eps, HD,
                                   BR, BH, XDT)
            tl.store(DQKV + src, dx.to(XDT), mask=mask)
            dgq += p
            x = tl.load(QKV + H * HD + src, mask=mask, other=0.0).to(tl.float32)            # k
            dx, p = _norm_rope_bwd(tl.load(DK + dst, mask=mask, other=0.0).to(tl.float32), x, gk, c, s, eps, HD,
                                   BR, BH, XDT)
            tl.store(DQKV + H * HD + src, dx.to(XDT), mask=mask)
            dgk += p
            tl.store(DQKV + 2 * H * HD + src, tl.load(DV + dst, mask=mask), mask=mask)      # v
        tl.store(PART + i * HD + k, tl.sum(dgq, axis=0), mask=k < HD)
        tl.store(PART + (tl.num_programs(0) + i) * HD + k, tl.sum(dgk, axis=0), mask=k < HD)

    @triton.jit
    def _silu_gate_fwd(Hin, OUT, n, F, BLOCK: tl.constexpr, DT: tl.constexpr):
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = k < n
        src = (k // F) * 2 * F + k % F
        a = tl.load(Hin + src, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(Hin + src + F, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + k, (_round(a * tl.sigmoid(a), DT) * v).to(DT), mask=mask)

    @triton.jit
    def _silu_gate_bwd(DOUT, Hin, DH, n, F, BLOCK: tl.constexpr, DT: tl.constexpr):
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = k < n
        src = (k // F) * 2 * F + k % F
        a = tl.load(Hin + src, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(Hin + src + F, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + k, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        tl.store(DH + src, (_round(dout * v, DT) * sig * (1 + a * (1 - sig))).to(DT), mask=mask)
        tl.store(DH + src + F, (dout * _round(a * sig, DT)).to(DT), mask=mask)

    @triton.jit
    def _swiglu_gemm(XD, GD, VD, OD, M, F: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, GROUP: tl.constexpr, PROGRAMS: tl.constexpr, TILES: tl.constexpr,
                     DT: tl.constexpr):
        """swiglu_hidden as a persistent GEMM: program p takes the (BM, BN) tiles p, p + PROGRAMS, ... (up
        to TILES of them) of the (M, F) output, X (M, K) times the gate rows GD and the value rows VD
        (F, K) of fc1's weight, all through TMA descriptors (rows out of range load as zeros and are
        not stored)."""
        num_m, num_n = tl.cdiv(M, BM), tl.cdiv(F, BN)
        for i in range(0, TILES):
            tile = tl.program_id(0) + i * PROGRAMS
            if tile < num_m * num_n:
                # tiles in groups of GROUP row blocks, which then share the weight tiles in L2
                first = tile // (GROUP * num_n) * GROUP
                rows = tl.minimum(num_m - first, GROUP)
                m = (first + tile % (GROUP * num_n) % rows) * BM
                n = tile % (GROUP * num_n) // rows * BN
                gate = tl.zeros((BM, BN), tl.float32)
                value = tl.zeros((BM, BN), tl.float32)
                for k in range(0, K, BK):
                    x = XD.load([m, k])
                    gate = tl.dot(x, GD.load([n, k]).T, gate)
                    value = tl.dot(x, VD.load([n, k]).T, value)
                gate = _round(gate, DT)  # fc1's output in the activation dtype, as F.linear rounds it
                OD.store([m, n], (_round(gate * tl.sigmoid(gate), DT) * _round(value, DT)).to(DT))

    # The SwiGLU GEMM's tiles: the fastest of the settings timed for L/16 and XL/16 fc1 (docs/speed.md).
    # K and TILES are compile-time constants: Triton 3.5's interpreter failed on a loop from
    # program_id(0) to a run-time bound.
    _SWIGLU = dict(BM=128, BN=128, BK=64, GROUP=8, num_warps=8, num_stages=3)

    @torch.library.custom_op("pixnerd::swiglu_hidden", mutates_args=())
    def _swiglu_op(x: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        """swiglu_hidden(x, w1), x (M, D) and w1 (2F, D) in one 16-bit dtype, on a GPU with TMA."""
        return _swiglu(x, w1, torch.cuda.get_device_properties(x.device).multi_processor_count)

    @_swiglu_op.register_fake
    def _(x, w1):
        return x.new_empty(x.shape[0], w1.shape[0] // 2)

    def _swiglu(x, w1, programs):
        """_swiglu_op with `programs` persistent programs (the GPU's SM count; any number serves)."""
        M, K = x.shape
        F2 = w1.shape[0] // 2
        x, w1, out = x.contiguous(), w1.contiguous(), x.new_empty(M, F2)
        BM, BN, BK = _SWIGLU["BM"], _SWIGLU["BN"], _SWIGLU["BK"]
        descs = [TensorDescriptor.from_tensor(t, block) for t, block in
                 ((x, [BM, BK]), (w1[:F2], [BN, BK]), (w1[F2:], [BN, BK]), (out, [BM, BN]))]
        tiles = _cdiv(M, BM) * _cdiv(F2, BN)
        programs = min(programs, tiles)
        _swiglu_gemm[(programs,)](*descs, M, F=F2, K=K, PROGRAMS=programs, TILES=_cdiv(tiles, programs),
                                  DT=_DT[x.dtype], **_SWIGLU)
        return out
