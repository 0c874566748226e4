"""The AdamW + clipping + EMA kernel against torch's AdamW and lerp, with and without 16-bit
compute copies, and the fallback for a tensor that is not 16-byte aligned.

Run by fast/test_fast.py in Triton's CPU interpreter (TRITON_INTERPRET=1, a process of its own:
the interpreter is chosen when Triton is imported); from the repository root:
    TRITON_INTERPRET=1 python -m fast.checks.optim_kernel
"""
import copy

import torch
import torch.nn as nn

from fast import optim as optim_kernel

torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
model = nn.Sequential(nn.Linear(37, 45), nn.SiLU(), nn.Linear(45, 3), nn.Embedding(4, 700))
for max_norm in (None, 0.5):  # 0.5 clips every step here
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    e1, e2 = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(model).requires_grad_(False)
    for e in (e1, e2):
        e[3].weight.data += 1
    p1 = nn.Linear(3, 5)  # parameters AdamW has and the EMA does not (the REPA projector)
    p2 = copy.deepcopy(p1)
    o1 = torch.optim.AdamW([*m1.parameters(), *p1.parameters()], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    o2 = torch.optim.AdamW([*m2.parameters(), *p2.parameters()], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    for it in range(4):  # a 1024-element block and its ragged tail (45 x 37 = 1665), and a small tensor
        for m, p, o, e, kernel in ((m1, p1, o1, e1, False), (m2, p2, o2, e2, True)):
            torch.manual_seed(it)
            x = torch.randn(6, 37)
            loss = (m[:3](x) ** 2).mean() + p(m[:3](x)).pow(2).mean() * 3  # m[3] (the Embedding): no gradient
            loss.backward()
            norm = optim_kernel.step(o, e, m, 0.9, max_norm, kernel=kernel)
            o.zero_grad(set_to_none=True)
            if kernel:
                assert abs(norm - ref_norm) < 1e-6 * ref_norm, (norm, ref_norm)
            ref_norm = norm
    for a, b in zip([*m1.parameters(), *e1.parameters(), *p1.parameters()], [*m2.parameters(), *e2.parameters(), *p2.parameters()]):
        assert rel(b, a) < 1e-6, (max_norm, rel(b, a))
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert sorted(s1["state"]) == sorted(s2["state"]) and 4 not in s2["state"]  # no state without a gradient
    for k in s1["state"]:
        for n in ("step", "exp_avg", "exp_avg_sq"):
            assert rel(s2["state"][k][n], s1["state"][k][n]) < 1e-6, (k, n)
    assert not torch.equal(e2[3].weight, model[3].weight + 1)  # the EMA follows a parameter without a gradient
# 16-bit compute copies (fp16: the interpreter rounds bf16 by truncation) hold the gradients of two
# Linears, the LayerNorm's own; each step the copies are the updated weights rounded
for max_norm in (None, 0.5):
    runs = []
    for kernel in (False, True):
        m, e = copy.deepcopy(model[:3]), copy.deepcopy(model[:3]).requires_grad_(False)
        m.append(nn.LayerNorm(3))
        net = copy.deepcopy(m)
        net[0].half(), net[2].half()
        copies = [(p, q) for p, q in zip(m.parameters(), net.parameters()) if q.dtype == torch.float16]
        o = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
        norms = []
        for it in range(3):
            torch.manual_seed(it)  # the same gradients for both paths
            for p, q in copies:
                q.grad = torch.randn_like(q)
            for p in m[3].parameters():
                p.grad = torch.randn_like(p)
            norms.append(optim_kernel.step(o, e, m[:3], 0.9, max_norm, kernel=kernel, copies=copies))
            o.zero_grad(set_to_none=True)
            net.zero_grad(set_to_none=True)
            assert all(torch.equal(q, p.half()) for p, q in copies), (kernel, it)
        runs.append(([*m.parameters(), *e.parameters()], norms))
    for a, b in zip(*[r[0] for r in runs]):
        assert rel(b, a) < 1e-6, (max_norm, rel(b, a))
    for a, b in zip(*[r[1] for r in runs]):
        assert abs(b - a) < 1e-6 * a, (max_norm, a, b)
# a parameter that starts 4 bytes into its storage: no 16-byte loads, so torch's path runs instead
outs = []
for kernel in (False, True):
    p = nn.Parameter(torch.arange(9.0)[1:])
    e = nn.ParameterList([nn.Parameter(torch.zeros(8), requires_grad=False)])
    o = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(8)
    optim_kernel.step(o, e, nn.ParameterList([p]), 0.9, kernel=kernel)
    outs.append((p.detach().clone(), e[0].clone()))
assert p.data_ptr() % 16 == 4 and all(torch.equal(a, b) for a, b in zip(*outs))
print("optim ok")
