"""bf16 weights for the matmuls autocast runs in bf16: stored once instead of cast on every call.

Autocast rounds a Linear's fp32 weight to bf16 on every call (and, in training, its bf16 gradient
back to fp32). `bf16_linears` stores the weights of a sampling model in bf16; `compute_copy`
gives a training model a twin whose Linear weights are bf16 parameters, which runs the forward and
backward while the fp32 weights stay with the optimizer (fast.optim writes both). The numbers are
autocast's: the same roundings, done once.
"""
from copy import deepcopy

import torch
import torch.distributed as dist


def bf16_linears(model):
    """Store the Linear weights that autocast casts in bf16. Norm gains, embeddings, the residual
    stream and the neural field's pixel-level Linears (which run outside autocast) stay fp32."""
    head = getattr(model, "head", None)
    fp32 = {id(getattr(head, "embed", None)), id(getattr(head, "out", None))}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m) not in fp32:
            m.to(torch.bfloat16)
    return model


def compute_copy(model):
    """The module that runs the forward and backward under bf16 autocast: model's structure, the
    Linear weights that autocast casts as bf16 parameters of its own, every other parameter model's
    own. Returns the copy and its (fp32 parameter, bf16 copy) pairs."""
    net = bf16_linears(deepcopy(model))
    pairs = []
    for (name, p), q in zip(list(model.named_parameters()), list(net.parameters())):
        if q.dtype == p.dtype:  # not cast: model's own parameter
            owner, _, attr = name.rpartition(".")
            setattr(net.get_submodule(owner), attr, p)
        else:
            pairs.append((p, q))
    return net, pairs


def allreduce_fp32(group, bucket):
    """DDP communication hook: average a bucket of gradients in fp32 and round once to its dtype.
    DDP would sum the bf16 copies' gradients in bf16, rounding at every hop of NCCL's ring."""
    buf = bucket.buffer()
    total = buf.float().div_(dist.get_world_size(group))
    fut = dist.all_reduce(total, group=group, async_op=True).get_future()
    return fut.then(lambda f: buf.copy_(f.value()[0]))
