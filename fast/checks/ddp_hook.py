"""fast.precision.allreduce_fp32 under DDP (gloo, CPU): the bf16 gradient is the fp32 average of
the processes' gradients rounded once, where DDP's own bf16 reduction rounds at every step.
Run by fast/test_fast.py; from the repository root:
    torchrun --nproc_per_node=3 -m fast.checks.ddp_hook
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import end_distributed
from fast.precision import allreduce_fp32

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
net = nn.Linear(64, 512, bias=False).to(torch.bfloat16)  # the same weights on every rank
x = [torch.randn(8, 64).to(torch.bfloat16) for _ in range(world)]  # each rank's batch
grads = [torch.autograd.grad(net(xr).float().square().mean(), net.weight)[0].float() for xr in x]
exact = sum(grads) / world
# rounded once: within half of bf16's spacing at the value, plus the fp32 sum's own rounding
ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
bound = ulp / 2 + 2.0 ** -21 * sum(g.abs() for g in grads) / world
ok = []
for hook in (allreduce_fp32, None):
    ddp = DDP(net)
    if hook:
        ddp.register_comm_hook(None, hook)
    net.weight.grad = None
    ddp(x[rank]).float().square().mean().backward()
    ok.append(((net.weight.grad.float() - exact).abs() <= bound).float().mean().item())
    dist.barrier()
if rank == 0:
    print("within one rounding of the fp32 average:", ok)
    assert ok[0] == 1 and ok[1] < 1, ok  # DDP's bf16 sums round at each step
    print("hook ok")
del ddp
end_distributed()
