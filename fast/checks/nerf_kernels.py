"""The neural-field kernels against their torch form (fast/nerf.py: patch_mlp, reference_head):
the layer kernel forward and its three gradients, the embedding's gradient sums, the head for
inference and training, and the custom ops' fake versions (torch.library.opcheck).

Run by fast/test_fast.py in Triton's CPU interpreter (TRITON_INTERPRET=1, a process of its own:
the interpreter is chosen when Triton is imported); from the repository root:
    TRITON_INTERPRET=1 python -m fast.checks.nerf_kernels
"""
import torch

from fast import nerf as nerf_kernel
from fast.nerf import patch_mlp, reference_head
from nerf_head import NerfHead, RMSNorm

torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
# the layer ops' fake (meta) versions, which torch.compile traces, against their real outputs' shapes,
# strides and aliasing: inner, first and last layer
N, P, C, CH = 5, 100, 32, 3
h, pix, w = torch.randn(N, P, C), torch.randn(N, P, CH), (0.1 * torch.randn(N, 4 * C * C)).half()
g, e, wx, go, wo, bo = torch.ones(C), torch.randn(P, C), torch.randn(C, CH), torch.ones(C), torch.randn(CH, C), torch.zeros(CH)
for x, args, bias, last in ((h, (w, g, None, None, None, None), None, False), (pix, (w, g, e, wx, None, None), None, False),
                            (h, (w, g, None, None, go, wo), bo, True)):
    out = nerf_kernel._patch_mlp_op(x, *args, bias, 1e-6, 1e-6, True, last)
    for op, op_args in ((nerf_kernel._patch_mlp_op, (x, *args, bias, 1e-6, 1e-6, True, last)),
                        (nerf_kernel._patch_mlp_backward_op, (torch.randn_like(out), x, *args, 1e-6, 1e-6, True, last))):
        torch.library.opcheck(op, op_args, test_utils=("test_schema", "test_faketensor"))
# every check twice: as launched, and with launches split into slices of patches (the kernels'
# 32-bit offsets; a limit small enough to give 2-5 slices here)
for limit in (2 ** 31, 20000):
    nerf_kernel._MAX_ELEMENTS = limit
    for N, P, C, hdt, norm_w2 in [(3, 256, 64, torch.float32, True), (2, 100, 32, torch.float16, False)]:
        norm = RMSNorm(C)
        norm.weight.data += 0.1 * torch.randn(C)
        h = torch.randn(N, P, C).to(hdt).requires_grad_()
        w = (0.1 * torch.randn(N, 4 * C * C)).half().requires_grad_()
        ref = patch_mlp(h, w, norm, norm_w2)
        out = nerf_kernel._patch_mlp_op(h, w, norm.weight, None, None, None, None, None, norm.eps, 0.0, norm_w2, False)
        assert out.dtype == ref.dtype and rel(out, ref) < (1e-4 if hdt == torch.float32 else 1e-3), rel(out, ref)
        dout = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (h, w, norm.weight), dout),
                        torch.autograd.grad(ref, (h, w, norm.weight), dout)):
            assert a.dtype == b.dtype and rel(a, b) < 2e-3, rel(a, b)  # the kernel's backward operands are fp16
    # the embedding's gradients over more patches than one program sums, with a partial pixel tile
    dh0, px = torch.randn(70, 100, 32), torch.randn(70, 100, 3)
    de, dwx = nerf_kernel._embed_grads(dh0, px)
    assert rel(de, dh0.sum(0)) < 1e-5 and rel(dwx, torch.einsum("npc,npk->ck", dh0, px)) < 1e-5
    dh0 = dh0.half()  # 16-bit gradients (bf16 in training; the interpreter runs fp16), their own tile setting
    de, dwx = nerf_kernel._embed_grads(dh0, px)
    assert de.dtype == dwx.dtype == torch.float32
    assert rel(de, dh0.float().sum(0)) < 1e-5 and rel(dwx, torch.einsum("npc,npk->ck", dh0.float(), px)) < 1e-5
    # the whole-field inference kernel against NerfHead's torch path, every norm variant, 1 to 4 layers,
    # pixel counts that do and do not fill the tiles
    for norm, depth, ph in (("fc1_fc2_out", 2, 16), ("fc1", 3, 5), ("fc1_fc2", 4, 8), ("fc1_fc2_out", 1, 12)):
        head = NerfHead(48, 32, depth, 2, 3, "dct", norm)
        for p in head.parameters():
            p.data += 0.05 * torch.randn_like(p)
        for b in head.blocks:
            b.generator.half()
        s, pix = torch.randn(5, 48).half(), torch.randn(5, ph * ph, 3)
        with torch.no_grad():
            ref = reference_head(head, s, pix, ph, ph)
            out = nerf_kernel._fused_head(head, s, pix, ph, ph)
        assert out.shape == ref.shape and rel(out, ref) < 1e-4, (norm, depth, rel(out, ref))
        # training: the chain of layer kernels (embedding in the first, output in the last) against the
        # torch path, velocity and the gradients of s, the pixels and every parameter of the head;
        # the gradients between layers in fp32 (as for fp16 weights) and in the weights' 16 bits (bf16's
        # setting, which the interpreter runs in fp16)
        for half_grads in ((), (torch.float16,)):
            nerf_kernel._HALF_GRADS = half_grads
            s, pix = s.float().detach().requires_grad_(), pix.detach().requires_grad_()
            inputs = [s, pix, *head.parameters()]
            ref = reference_head(head, s.half(), pix, ph, ph)
            out = nerf_kernel._fused_head(head, s.half(), pix, ph, ph)
            assert out.shape == ref.shape and rel(out, ref) < 1e-4, (norm, depth, rel(out, ref))
            dv = torch.randn_like(ref)
            for i, (a, b) in enumerate(zip(torch.autograd.grad(out, inputs, dv), torch.autograd.grad(ref, inputs, dv))):
                assert a.dtype == b.dtype and rel(a, b) < 3e-3, (norm, depth, half_grads, i, rel(a, b))
            # pixels without a gradient, as in training
            pix = pix.detach()
            out, ref = nerf_kernel._fused_head(head, s.half(), pix, ph, ph), reference_head(head, s.half(), pix, ph, ph)
            inputs = [s, *head.parameters()]
            for i, (a, b) in enumerate(zip(torch.autograd.grad(out, inputs, dv), torch.autograd.grad(ref, inputs, dv))):
                assert a.dtype == b.dtype and rel(a, b) < 3e-3, (norm, depth, half_grads, i, rel(a, b))
        # the head ops' fake versions
        s16, d = s.detach().half(), len(head.blocks)
        gen_w, gen_b = [b.generator.weight.detach() for b in head.blocks], [b.generator.bias.detach() for b in head.blocks]
        gains, go = [b.norm.weight.detach() for b in head.blocks], torch.ones(32) if norm == "fc1_fc2_out" else None
        args = (pix, s16, gen_w, gen_b, torch.randn(ph * ph, 32), torch.randn(32, 3), gains, go, torch.randn(3, 32),
                torch.zeros(3), 1e-6, 1e-6, norm != "fc1", go is not None)
        outs = nerf_kernel._head_train_op(*args)
        # kept for the backward, not differentiable (no zero gradients made for them)
        grad_args = (args[0], args[1].requires_grad_(), *args[2:])
        assert all(o.requires_grad == (i == 0) for i, o in enumerate(nerf_kernel._head_train_op(*grad_args)))
        torch.library.opcheck(nerf_kernel._head_train_op, args, test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(nerf_kernel._head_train_backward_op,
                              (torch.randn_like(outs[0]), *args[:3], *args[4:9], outs[1:d], outs[d:], *args[10:]),
                              test_utils=("test_schema", "test_faketensor"))
print("kernel ok")
