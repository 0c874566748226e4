"""Train PixNerd with plain PyTorch DDP.

    torchrun --nproc_per_node=8 train.py --model XL/16 --data-path /data/imagenet/train
    python train.py --model S/16 --max-steps 1500 --global-batch-size 32   # built-in toy data, CPU

The defaults (DEFAULTS below; --help shows them) are the official recipe for real data (official
configs_c2i/pix256std1_repa_pixnerd_xl.yaml; paper Sec. 4): AdamW lr 1e-4, batch 256, EMA 0.9999,
lognorm t, label dropout 0.1, REPA at block 8 with weight 0.5 when a DINOv2 file is given, bf16
autocast on CUDA. Without --data-path it trains on built-in shapes, so every path runs anywhere.

Every random draw of a training step comes from a generator seeded by (seed, rank, step) and the
data order is a pure function of (seed, epoch), so the step counter *is* the random state:
a resumed run repeats the uninterrupted one exactly (bitwise on the CPU).
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from copy import deepcopy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import fast
import flow
from checkpoints import (append_metrics, check_memory, check_writable, end_distributed, init_weights, load_weights,
                         model_config, newest_run, open_run, read_weights, restore, resume_checkpoint, save_checkpoint,
                         save_grid, setup_distributed, weights_fault, write_text)
from datasets import ResumableSampler, training_data
from model import MODELS
from samplers import guided, sample
from text_encoder import caption_features

# The defaults, flag: (the paper's recipe, taken with --data-path; the quick run on the built-in
# shapes, which gives a recognisable EMA grid in about 10 minutes on a 2-core CPU). Text-to-image
# (--text-encoder or --text-cache) follows configs_t2i: --lr 2e-4 up to 256 px, 1e-4 above, --beta2
# 0.95, --grad-clip 1.0, --t-shift size / 128, no text mask (the official model sees none), bf16 encoder.
DEFAULTS = {
    "model": ("XL/16", "XL/16"),
    "head": ("nerf", "nerf"),
    "image_size": (256, 32),
    "hflip": (False, False),
    "global_batch_size": (256, 32),
    "grad_accum": (1, 1),
    "max_steps": (800_000, 1_200),
    "lr": (1e-4, 2e-4),
    "beta2": (0.999, 0.999),
    "weight_decay": (0.0, 0.0),
    "grad_clip": (None, None),
    "ema_decay": (0.9999, 0.995),
    "p_uncond": (0.1, 0.1),
    "t_shift": (1.0, 1.0),
    "text_len": (128, 128),
    "text_mask": (False, False),
    "text_encoder_dtype": ("bf16", "bf16"),
    "repa_weight": (0.5, 0.5),
    "log_every": (100, 50),
    "ckpt_every": (5_000, 300),
    "milestone_every": (100_000, 100_000),
    "sample_every": (10_000, 300),
    "sample_steps": (50, 50),
    "sample_cfg": (3.5, 3.5),
    "fid_every": (0, 0),
    "fid_samples": (5_000, 5_000),
    "seed": (0, 0),
    "num_workers": (8, 1),
    "fast": (True, True),
    "compile": (True, True),
    "cuda_graphs": (False, False),
}
RESUME_MAY_CHANGE = ("max_steps", "log_every", "ckpt_every", "milestone_every", "sample_every", "fid_every",
                     "fid_ref", "fid_samples", "fid_inception",
                     "num_workers", "fast", "compile", "cuda_graphs", "results_dir")
# Each numeric flag's meaningful range, as its error says it: "[" and "]" take the bound, "(" and ")"
# do not, and inf is never taken, so out of range, inf and NaN alike stop before anything is made.
RANGES = {"image_size": "[1, inf)", "patch_size": "[1, inf)", "nerf_width": "[1, inf)", "nerf_depth": "[0, inf)",
          "global_batch_size": "[1, inf)", "grad_accum": "[1, inf)", "max_steps": "[1, inf)", "lr": "(0, inf)",
          "beta2": "[0, 1)", "weight_decay": "[0, inf)", "grad_clip": "[0, inf)", "ema_decay": "[0, 1]",
          "p_uncond": "[0, 1]", "t_shift": "(0, inf)", "text_len": "[1, inf)", "repa_weight": "[0, inf)",
          "log_every": "[1, inf)", "ckpt_every": "[1, inf)", "milestone_every": "[0, inf)", "sample_every": "[1, inf)",
          "sample_steps": "[1, inf)", "sample_cfg": "(-inf, inf)", "fid_every": "[0, inf)", "fid_samples": "[2, 1e6]",
          "seed": "[0, 4294967295]", "num_workers": "[0, inf)"}


def get_parser():
    """Flags left off the command line are absent from the namespace (SUPPRESS): see resolve_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(MODELS))
    p.add_argument("--head", choices=["nerf", "linear"], help="linear: the paper's Baseline")
    for flag, kw in (("--encoding", dict(choices=["dct", "dct2", "sincos", "cos"])), ("--patch-size", dict(type=int)),
                     ("--nerf-norm", dict(choices=["fc1", "fc1_fc2", "fc1_fc2_out"])), ("--nerf-width", dict(type=int)),
                     ("--nerf-depth", dict(type=int))):
        p.add_argument(flag, help="default: the model's", **kw)
    p.add_argument("--data-path", help="ImageFolder layout; none: built-in shapes")
    p.add_argument("--cache", help="uint8 .npy file to preprocess the dataset into once")
    p.add_argument("--image-size", type=int)
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (the official recipe has none)")
    p.add_argument("--results-dir", default="results", help="default results")
    p.add_argument("--resume", nargs="?", const="auto", help="continue the newest run in --results-dir, or the "
                   "run folder given; its own settings win, and only --" + ", --".join(
                       k.replace("_", "-") for k in RESUME_MAY_CHANGE) + " may differ")
    p.add_argument("--init-from", help="start from the weights of a checkpoint (ours or official)")
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-steps", type=int, help="total steps of the run, resumes included")
    p.add_argument("--lr", type=float)
    p.add_argument("--beta2", type=float, help="t2i: 0.95")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="clip the gradients' total norm to this (0: off; t2i: 1.0)")
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--p-uncond", type=float, help="label dropout for CFG")
    p.add_argument("--t-shift", type=float, help="time shift of the lognorm t (t2i: image size / 128)")
    p.add_argument("--text-encoder", help="text-to-image: local HF model folder or .gguf; data: images + .txt captions")
    p.add_argument("--text-cache", help="a .pt file of precomputed caption features (read or written)")
    p.add_argument("--text-encoder-dtype", choices=["bf16", "fp32"], help="the text encoder's precision")
    p.add_argument("--text-len", type=int, help="text tokens (padded or truncated)")
    p.add_argument("--text-mask", action=argparse.BooleanOptionalAction, help="the text padding mask in attention")
    p.add_argument("--repa-encoder", help="local DINOv2 ViT-B/14 checkpoint (dinov2_vitb14_pretrain.pth)")
    p.add_argument("--repa-weight", type=float)
    for flag in ("--log-every", "--ckpt-every", "--milestone-every", "--sample-every", "--sample-steps"):
        p.add_argument(flag, type=int)
    p.add_argument("--sample-cfg", type=float)
    p.add_argument("--fid-every", type=int, help="0: off; else FID of EMA samples (the grids' sampler) every N steps")
    p.add_argument("--fid-ref", help="reference images (folder or npz) or statistics written by fid.py")
    p.add_argument("--fid-samples", type=int, help="class-balanced samples per FID")
    p.add_argument("--fid-inception", help="the FID Inception weights (default: as fid.py finds them)")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--fast", action=argparse.BooleanOptionalAction,
                   help="CUDA only: the fast layer (fast/): bf16 compute copies, the fused Triton kernels of the "
                        "neural field, the blocks and AdamW + EMA, and the two options below; --no-fast: plain torch")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="with --fast: torch.compile each block")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="with --fast and --compile: replay the compiled blocks from CUDA graphs (reduce-overhead "
                        "mode), which pays where the host cannot keep up with the GPU (small batches, slow CPUs)")
    for a in p._actions:  # the table's defaults, in --help
        if a.dest in DEFAULTS:
            paper, quick = DEFAULTS[a.dest]
            default = f"default {paper}" + (f" (built-in data: {quick})" if quick != paper else "")
            a.help = f"{default}; {a.help}" if a.help else default
    return p


def resolve_args(args, world):
    """The run's settings: a resumed run's own, where a flag given with another value is refused
    (those of RESUME_MAY_CHANGE aside), then the flags given, then DEFAULTS. -> (args, checkpoint)."""
    given, ckpt = vars(args), None
    if "resume" in given:
        run_dir = newest_run(args.results_dir, with_checkpoint=True) if args.resume == "auto" else args.resume
        ckpt = resume_checkpoint(run_dir, args.results_dir)  # its ckpt-last.pt, or a milestone
        conflicts = [f"--{k.replace('_', '-')} {given[k]}: the run has {v}" for k, v in ckpt["args"].items()
                     if k in given and given[k] != v and k not in RESUME_MAY_CHANGE + ("resume",)]
        if conflicts:
            raise SystemExit("; ".join(conflicts) + f" (--resume {run_dir} keeps the run's settings; only --" +
                             ", --".join(k.replace("_", "-") for k in RESUME_MAY_CHANGE) + " may change)")
        given["resume"] = run_dir
    settings = {**dict.fromkeys(a.dest for a in get_parser()._actions if a.dest != "help"),  # runs older than
                **({"text_encoder_dtype": "fp32", **ckpt["args"]} if ckpt else {}), **given}  # the flag: fp32
    defaults = {k: v[0] if settings["data_path"] else v[1] for k, v in DEFAULTS.items()}
    if settings["text_encoder"] or settings["text_cache"]:  # official configs_t2i/pretraining_res{256,512}.yaml
        size = settings["image_size"] or defaults["image_size"]
        defaults.update(lr=2e-4 if size <= 256 else 1e-4, beta2=0.95, grad_clip=1.0, t_shift=size / 128)
    args = argparse.Namespace(**{k: defaults.get(k) if v is None else v for k, v in settings.items()})
    for k, interval in RANGES.items():
        v, (low, high) = getattr(args, k), map(float, interval[1:-1].split(","))
        if v is not None and not ((low < v or interval[0] == "[" and v == low) and
                                  (v < high or interval[-1] == "]" and v == high)):
            raise SystemExit(f"--{k.replace('_', '-')} {v}: must be in {interval}")
    if args.global_batch_size % (world * args.grad_accum):
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"{world} processes x --grad-accum {args.grad_accum}")
    return args, ckpt


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, every step, in fp32 (official callbacks/simple_ema.py: SimpleEMA)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def main(args):
    ddp, rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    args, ckpt = resolve_args(args, world)
    local_batch = args.global_batch_size // (world * args.grad_accum)
    torch.manual_seed(args.seed * world + rank)

    # ---- data, captions, model, optimizer and weight files: every error before a run folder
    size = args.image_size
    t2i = bool(args.text_encoder or args.text_cache)
    with torch.device("meta"):
        arch = MODELS[args.model]()
    if t2i != (arch.text_dim is not None):
        raise SystemExit(f"--model {args.model} is a " + ("text-to-image model: give --text-encoder PATH"
                         if not t2i else "class-conditional model: use a T2I model with --text-encoder"))
    patch = args.patch_size or arch.patch_size
    if size % patch:
        raise SystemExit(f"--image-size {size}: must be a positive multiple of the patch size, {patch} (--patch-size)")
    check_memory(f"--image-size {size}: {local_batch} images a step and the sample grid's 32 in fp32",
                 (local_batch + 32) * 12 * size ** 2, device)  # a lower bound: what it shows cannot run
    check_writable("--resume" if args.resume else "--results-dir", args.resume or args.results_dir, folder=True)
    dataset = training_data(args.data_path, size, t2i, args.cache, args.hflip, args.num_workers, rank, world)
    num_classes = len(dataset.classes)
    if t2i:  # (captions + 1, L, d): the last row is ""
        feats, masks = caption_features(dataset.classes, args.text_encoder, args.text_len, args.text_cache, device,
                                        dtype=args.text_encoder_dtype)

    config = ckpt["model_config"] if ckpt else model_config(args, num_classes, t2i and feats.shape[-1])
    model = MODELS[config["name"]](**config["kwargs"])
    if args.init_from and not ckpt:  # ours or an official checkpoint's EMA weights, as the official "emainit"
        try:
            load_weights(model, read_weights("--init-from", args.init_from, init_weights))
        except ValueError as e:
            raise SystemExit(f"--init-from {args.init_from}: does not fit --model {args.model}: {e}")
    encoder = projector = None  # REPA's frozen DINOv2 and the projector of the hidden states to its features
    if args.repa_encoder:
        from dinov2 import load_dinov2, repa_target
        encoder = read_weights("--repa-encoder", args.repa_encoder, load_dinov2).to(device)
        projector = flow.REPAProjector(model.patch_embed.out_features).to(device)
    model.to(device)
    if ddp:  # every rank starts from rank 0's weights (DDP would sync only the fast layer's bf16 copies)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    ema = deepcopy(model).requires_grad_(False)  # fp32, updated every step
    objective = flow.Objective(model, projector)  # AdamW's parameters: the fp32 weights and the projector
    params = list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay, fused=cuda)
    step = restore(ckpt, model, ema, projector, opt) if ckpt else 0
    if args.fid_every:
        from fid import OnlineFID
        online_fid = OnlineFID(args.fid_ref, args.fid_samples, num_classes, size, local_batch, device,
                               args.fid_inception, rank, world)

    run_dir, lock = open_run(args.results_dir, args.model, ckpt and (args.resume, ckpt["file"], step), rank)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(asctime)s] %(message)s",
                        force=True, handlers=[logging.StreamHandler(sys.stdout)] +
                        ([logging.FileHandler(os.path.join(run_dir, "log.txt"))] if rank == 0 else []))
    log = logging.getLogger("train")
    if ckpt:
        log.info(f"resumed {run_dir} at step {step} from {os.path.basename(ckpt['file'])}")
    log.info(f"REPA on: DINOv2 from {args.repa_encoder}, block {model.align_layer}, weight {args.repa_weight}"
             if args.repa_encoder else "REPA off (no --repa-encoder given): training with the flow-matching loss alone")

    def condition(y):
        """Labels on the device, or the (features, mask) of caption indices y (-1: the empty prompt)."""
        if not t2i:
            return y.to(device, non_blocking=True)
        f = feats[y].to(device, non_blocking=True).float()
        return (f, masks[y].to(device, non_blocking=True)) if args.text_mask else f

    null = condition(torch.tensor([-1])) if t2i else num_classes
    last_good = (ckpt["file"], step) if ckpt else None

    def stop(why):  # on every rank, naming the checkpoint left as it was; in log.txt too
        log.error(msg := f"step {step}: {why}; stopping. " + (f"The last good checkpoint, {last_good[0]} (step "
                  f"{last_good[1]}), is intact." if last_good else "This run has saved no checkpoint yet."))
        raise SystemExit(msg)

    def plain_step():
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
        opt.step()
        update_ema(ema, model, args.ema_decay)
        return grad_norm

    fast_on = args.fast and cuda
    log.info(f"fast layer: {'on' if fast_on else 'off (CPU)' if args.fast else 'off (--no-fast)'}")
    if fast_on:  # bf16 compute copies, fused kernels, regional compile, CUDA graphs, AdamW + EMA kernel
        net, opt_step, comm_hook = fast.for_training(
            model, ema, opt, ema_decay=args.ema_decay, grad_clip=args.grad_clip, compile=args.compile,
            cuda_graphs=args.cuda_graphs, bf16_copies=args.grad_accum == 1, encoder=encoder, log=log.info)
    else:
        net, opt_step, comm_hook = model, plain_step, None
    graphs = fast_on and args.compile and args.cuda_graphs
    train_obj = flow.Objective(net, projector)  # what runs the step: the fast layer's copy, if any
    if ddp:
        train_obj = DDP(train_obj, device_ids=[device.index] if cuda else None)
        if comm_hook:
            train_obj.register_comm_hook(None, comm_hook)
    flops = fast.count_flops(config, size)
    if rank == 0:
        write_text(os.path.join(run_dir, "args.json"), json.dumps(vars(args), indent=2))
    log.info(f"{config['name']} {config['kwargs']}: {sum(p.numel() for p in model.parameters()):,} parameters, "
             f"{flops / 1e9:.1f} GFLOPs/image; {len(dataset):,} images of {num_classes} classes at {size}px; {run_dir}")

    sampler = ResumableSampler(len(dataset), rank, world, args.seed, step * local_batch * args.grad_accum, args.hflip)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=cuda, drop_last=True, persistent_workers=args.num_workers > 0)
    batches = iter(loader)

    grid_y = torch.arange(min(num_classes, 8)).repeat_interleave(4)  # the EMA sample grids' fixed labels and noise
    grid_noise = torch.randn(len(grid_y), 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda)

    def generate(y, noise):
        """EMA samples of labels or caption indices y: Euler, --sample-steps, CFG --sample-cfg in (0.1, 1)."""
        with autocast:
            fn = guided(ema, condition(y), condition(torch.full_like(y, -1 if t2i else num_classes)), args.sample_cfg,
                        (0.1, 1.0))
            return sample(fn, noise, args.sample_steps, "euler").float()

    gen = torch.Generator(device)

    def save(name):
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "projector": projector.state_dict() if projector else None, "step": step,
                 "skipped_images": bad_total, "args": vars(args), "model_config": config}
        save_checkpoint(state, os.path.join(run_dir, name))

    stats, t_log, seen, n_steps = {}, time.time(), 0, 0
    bad_total = ckpt.get("skipped_images", 0) if ckpt else 0  # unreadable images, the whole run
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps:
        gen.manual_seed(((args.seed * world + rank) * 1_000_000_007 + step) % 2 ** 64)
        for micro in range(args.grad_accum):
            x, y, bad = next(batches)
            bad_total += int(bad.sum())
            x = x.to(device, non_blocking=True).float() / 127.5 - 1   # [-1, 1]
            y = condition(y)
            target = None
            if encoder is not None:
                with torch.no_grad(), autocast:
                    target = repa_target(encoder, x, size // model.patch_size, size // model.patch_size)
            sync = micro == args.grad_accum - 1 or not ddp
            with (nullcontext() if sync else train_obj.no_sync()), autocast:
                losses = train_obj(x, y, null=null, p_uncond=args.p_uncond, t_shift=args.t_shift,
                                   repa_target=target, repa_weight=args.repa_weight, generator=gen)
                loss = losses["loss"] / args.grad_accum
                loss.backward()
            for k, v in losses.items():
                stats[k] = stats.get(k, 0) + v.detach() / args.grad_accum
        grad_norm = opt_step()  # plain_step above: clip, opt.step(), update_ema; or the fast layer's kernel
        stats["grad_norm"] = stats.get("grad_norm", 0) + grad_norm
        opt.zero_grad(set_to_none=True)
        step, n_steps, seen = step + 1, n_steps + 1, seen + args.global_batch_size
        bar.update(1)

        ckpt_step = step % args.ckpt_every == 0 or step == args.max_steps
        if step % args.log_every == 0 or ckpt_step:  # checked before a save
            row = {k: v.item() / n_steps for k, v in stats.items()}
            if ddp:
                vals = torch.tensor(list(row.values()), device=device)
                dist.all_reduce(vals)
                row = dict(zip(row, (vals / world).tolist()))
            if not all(math.isfinite(v) for v in row.values()):
                stop(f"loss or gradient is not finite ({row})")
            dt = time.time() - t_log
            row.update(step=step, lr=args.lr, img_per_s=seen / dt, skipped_images=bad_total)
            if cuda:
                row["mfu"] = 3 * flops * seen / dt / (fast.peak_flops(device) * world)
                row["peak_mem_gib"] = fast.peak_gib(device, graphs)
            if rank == 0:
                append_metrics(run_dir, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            stats, t_log, seen, n_steps = {}, time.time(), 0, 0
        t_extra = time.time()  # img/s counts training steps, not the checks, grids, FIDs and saves below
        if ckpt_step and (fault := weights_fault(model, ema, x, y, args.t_shift, step)):  # every rank's verdict
            stop(fault)

        if rank == 0 and (step % args.sample_every == 0 or step == args.max_steps):
            save_grid(generate(grid_y, grid_noise), os.path.join(run_dir, f"samples-{step:07d}.png"), nrow=4)
        if args.fid_every and step % args.fid_every == 0:  # every rank samples its share
            t_fid = time.time()
            fid_row = {"step": step, "fid": online_fid(generate), "fid_samples": args.fid_samples}
            log.info(f"step {step} FID {fid_row['fid']:.2f} ({args.fid_samples} samples against {args.fid_ref}; "
                     f"{time.time() - t_fid:.1f} s)")
            if rank == 0:
                append_metrics(run_dir, fid_row)
        if ckpt_step:
            if rank == 0:
                save("ckpt-last.pt")
                if args.milestone_every and step % args.milestone_every == 0:
                    save(f"ckpt-{step:07d}.pt")
            last_good = (os.path.join(run_dir, "ckpt-last.pt"), step)
        t_log += time.time() - t_extra
    bar.close()
    log.info(f"done: {step} steps in {run_dir}")
    return run_dir


if __name__ == "__main__":
    main(get_parser().parse_args())
    if dist.is_initialized():
        end_distributed()  # after main returns: none of its DDP may outlive the group
