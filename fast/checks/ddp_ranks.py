"""The fast layer keeps the processes of a DDP run identical: after every training step, REPA on,
the fp32 weights, the EMA, the bf16 compute copies and the REPA projector hash the same on every
rank. What could break it: the fp32 gradient-averaging hook (fast.precision.allreduce_fp32), the
AdamW + EMA step writing the copies (fast.optim), a rank-dependent compile. train.py's step, built
the same way: fast.for_training, DDP over the model and projector with the hook, bf16 autocast.
Run by fast/test_fast.py on the CPU (gloo, XS/16); on GPUs (NCCL, S/16 at 256 px, compiled):
    torchrun --nproc_per_node=2 -m fast.checks.ddp_ranks
"""
import copy
import hashlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fast
import flow
from checkpoints import end_distributed
from dinov2 import DINOv2, repa_target
from model import MODELS


def digest(module):
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main():
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    name, size, batch, steps, dino = (("S/16", 256, 8, 6, {}) if cuda else
                                      ("XS/16", 32, 2, 3, dict(embed_dim=32, depth=2, num_heads=2, img_size=56)))
    torch.manual_seed(0)  # the same initial weights on every rank, as train.py's seeded init
    model = MODELS[name](num_classes=10).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    encoder = DINOv2(**dino).to(device).requires_grad_(False).eval()  # random weights: the same work
    projector = flow.REPAProjector(model.patch_embed.out_features, encoder.embed_dim).to(device)
    opt = torch.optim.AdamW([*model.parameters(), *projector.parameters()], lr=1e-3, weight_decay=0, fused=cuda)
    net, opt_step, hook = fast.for_training(model, ema, opt, ema_decay=0.99, grad_clip=1.0, compile=cuda,
                                            encoder=encoder, log=lambda msg: None)
    obj = DDP(flow.Objective(net, projector), device_ids=[device.index] if cuda else None)
    obj.register_comm_hook(None, hook)
    autocast = torch.autocast(device.type, torch.bfloat16)
    tokens = size // model.patch_size
    for step in range(steps):
        gen = torch.Generator(device).manual_seed(1000 * rank + step)  # each rank its own batch and noise
        x = torch.rand(batch, 3, size, size, device=device, generator=gen) * 2 - 1
        y = torch.randint(0, 10, (batch,), device=device, generator=gen)
        with autocast:
            target = repa_target(encoder, x, tokens, tokens)
            losses = obj(x, y, null=10, repa_target=target, generator=gen)
        losses["loss"].backward()
        norm = opt_step()
        opt.zero_grad(set_to_none=True)
        states = [None] * world
        dist.all_gather_object(states, (digest(model), digest(ema), digest(net), digest(projector)))
        if rank == 0:
            print(f"step {step}: loss {losses['loss'].item():.4f} grad norm {norm.item():.3f}; "
                  f"equal on {world} ranks: {[len({s[i] for s in states}) == 1 for i in range(4)]}")
            assert len(set(states)) == 1, "the ranks' weights, EMA, copies or projector differ"
            assert states[0][2] != states[0][0], "net holds no bf16 compute copies: the check would test less"
    if rank == 0:
        print("ranks ok")


if __name__ == "__main__":
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main()
    end_distributed()  # after main: nothing of its DDP left to outlive the group
