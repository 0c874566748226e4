"""The transformer blocks' kernels against model.py's torch forms, forward and every gradient:
fp32, an fp32 residual stream with fp16 adaLN outputs, and fp16 (the interpreter mishandles bf16).

Run by fast/test_fast.py in Triton's CPU interpreter (TRITON_INTERPRET=1, a process of its own:
the interpreter is chosen when Triton is imported); from the repository root:
    TRITON_INTERPRET=1 python -m fast.checks.block_kernels
"""
import torch

from fast import blocks as bk
from fast.blocks import silu_gate
from model import apply_rope, modulate, rope_2d
from nerf_head import RMSNorm


def qk_norm_rope(qkv, q_norm, k_norm, rope):  # model.Attention.forward's q and k, v as it is
    q, k, v = qkv.unbind(2)
    return apply_rope(q_norm(q), *rope), apply_rope(k_norm(k), *rope), v


torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
grads = torch.autograd.grad
for xdt, sdt, tol in ((torch.float32, torch.float32, 1e-5), (torch.float32, torch.float16, 1e-3), (torch.float16, torch.float16, 2e-3)):
    for B, N, D in ((2, 7, 48), (3, 20, 24)):
        norm = RMSNorm(D); norm.weight.data += 0.1 * torch.randn(D)
        x = torch.randn(B, N, D, dtype=xdt, requires_grad=True)
        ada = torch.randn(B, 1, 3 * D, dtype=sdt, requires_grad=True)
        shift, scale, gate = ada.chunk(3, -1)
        y = torch.randn(B, N, D, dtype=sdt, requires_grad=True)
        ref = modulate(norm(x), shift, scale)
        out = bk._Modulate.apply(x, norm.weight, shift, scale, norm.eps, ref.dtype)
        assert out.dtype == ref.dtype and rel(out, ref) < tol / 10, ('mod fwd', xdt, sdt, rel(out, ref))
        d = torch.randn_like(ref)
        for a, b in zip(grads(out, (x, norm.weight, ada), d), grads(ref, (x, norm.weight, ada), d)):
            assert a.dtype == b.dtype and rel(a, b) < tol, ('mod bwd', xdt, sdt, rel(a, b))
        ref = x + gate * y
        out = bk._GatedResidual.apply(x, gate, y)
        assert out.dtype == ref.dtype and rel(out, ref) < tol / 10, ('gate fwd', rel(out, ref))
        d = torch.randn_like(ref)
        for a, b in zip(grads(out, (x, ada, y), d), grads(ref, (x, ada, y), d)):
            assert a.dtype == b.dtype and rel(a, b) < tol, ('gate bwd', xdt, sdt, rel(a, b))
    for B, (ht, wt), H, hd in ((2, (3, 4), 3, 16), (1, (3, 3), 2, 24), (4, (5, 6), 10, 16)):  # 1200 rows: 2 programs
        rope = rope_2d(ht, wt, hd)
        q_norm, k_norm = RMSNorm(hd), RMSNorm(hd)
        q_norm.weight.data += 0.1 * torch.randn(hd); k_norm.weight.data -= 0.1 * torch.randn(hd)
        qkv = torch.randn(B, ht * wt, 3, H, hd, dtype=sdt, requires_grad=True)
        ref = qk_norm_rope(qkv, q_norm, k_norm, rope)
        out = bk._QKNormRope.apply(qkv, q_norm.weight, k_norm.weight, *rope, q_norm.eps)
        for a, b in zip(out, ref):
            assert a.dtype == b.dtype and rel(a, b) < tol / 10, ('rope fwd', sdt, rel(a, b))
        d = [torch.randn_like(r) for r in ref]
        for a, b in zip(grads(out, (qkv, q_norm.weight, k_norm.weight), d),
                        grads(ref, (qkv, q_norm.weight, k_norm.weight), d)):
            assert a.dtype == b.dtype and rel(a, b) < tol, ('rope bwd', sdt, rel(a, b))
    h = torch.randn(2, 5, 2 * 37, dtype=sdt, requires_grad=True)
    ref, out = silu_gate(h), bk._SiluGate.apply(h)
    assert out.dtype == ref.dtype and rel(out, ref) < tol / 10, ('silu fwd', rel(out, ref))
    d = torch.randn_like(ref)
    a, b = grads(out, (h,), d)[0], grads(ref, (h,), d)[0]
    assert rel(a, b) < tol, ('silu bwd', rel(a, b))
# fc1 + SiLU gate as one GEMM (sampling; where Triton has TMA descriptors: 3.5, not 3.3): tiles that
# rows, columns and the k steps do not fill, and fewer persistent programs than tiles (the
# interpreter wants strides of 16 elements)
for M, D, F in ((100, 80, 48), (300, 64, 144)) if bk.TensorDescriptor else ():
    x, w1 = torch.randn(M, D).half(), (torch.randn(2 * F, D) / D ** 0.5).half()
    ref, out = silu_gate(x @ w1.T), bk._swiglu(x, w1, 2)
    assert out.dtype == ref.dtype and rel(out, ref) < 1e-3, ('swiglu', M, D, F, rel(out, ref))
print("block kernels ok")
