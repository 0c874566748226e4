"""Sample from a PixNerd checkpoint: a PNG grid, or many images and an ADM-evaluator .npz.

    python sample.py --ckpt results/000-XL-16/ckpt-last.pt --steps 50 --solver adams2
    torchrun --nproc_per_node=8 sample.py --ckpt X.pt --num-samples 50000   # PNGs + FOLDER.npz
    python sample.py --ckpt official.ckpt --model XL/16 --resolution 384 512   # arbitrary size

Our checkpoints and official Lightning .ckpt files load alike (EMA weights by default).
In the many-images mode each image's noise and label depend on its index alone, and whole
batches are dealt to ranks, so any world size writes the same images; a rerun skips what exists.
The settings that made them are kept beside the folder (<folder>.json); a rerun with others stops.
"""
import argparse
import glob
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import fast
from checkpoints import (load_model, newest_checkpoint, save_grid, setup_distributed, to_uint8, weights_hash,
                         write_atomic)
from model import MODELS
from samplers import SOLVERS, guided, sample
from text_encoder import caption_features


def check_sample_dir(out_dir, settings, write):
    """Stop unless the images already in out_dir were made with these settings: with the same ones
    a rerun fills in the missing images, with others it would mix in stale ones. The settings go
    to out_dir.json, beside the folder and its .npz, so the folder holds only the images."""
    path, settings = f"{out_dir}.json", json.loads(json.dumps(settings))
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    if glob.glob(os.path.join(glob.escape(out_dir), "*.png")) and old != settings:
        why = (f"no {path} says how they were made" if old is None else "they were made with " + ", ".join(
            f"{k} {old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v))
        raise SystemExit(f"--sample-dir {out_dir}: holds images, but {why}: "
                         "pass another --sample-dir, or delete the folder to sample it anew")
    if write:
        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(settings, f, indent=1)
        write_atomic(path, dump)


def read_prompts(args):
    """[(prompt, metadata)] from --prompt and --prompts (text lines, or GenEval's .jsonl)."""
    prompts = [(p, {"prompt": p}) for p in args.prompt or []]
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
            jsonl = args.prompts.endswith(".jsonl")
            prompts += [(json.loads(line)["prompt"], json.loads(line)) if jsonl else (line, {"prompt": line})
                        for line in lines]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--prompts {args.prompts}: {type(e).__name__}: {e}")
    if not prompts:
        raise SystemExit("a text-to-image checkpoint needs --prompt TEXT or --prompts FILE")
    return prompts


def check_args(args):
    """Flags that would fail only after the model is loaded, with a traceback, or not at all."""
    for flag, v in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--num-samples", args.num_samples),
                    ("--images-per-condition", args.images_per_condition)):
        if v is not None and v < 1:
            raise SystemExit(f"{flag} {v}: must be at least 1")
    if args.shift is not None and not args.shift > 0:
        raise SystemExit(f"--shift {args.shift}: must be positive")
    if args.cfg_interval and not args.cfg_interval[0] < args.cfg_interval[1]:
        raise SystemExit(f"--cfg-interval {' '.join(map(str, args.cfg_interval))}: guided where low < t < high, "
                         "so low must be below high (no guidance: --cfg-scale 1)")
    if args.resolution and min(args.resolution) < 1:
        raise SystemExit(f"--resolution {' '.join(map(str, args.resolution))}: sides must be positive")
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        raise SystemExit(f"--out {args.out}: not an image file name (e.g. sample.png)")


def main(args):
    check_args(args)
    ddp, rank, world, device = setup_distributed()
    cuda = device.type == "cuda"

    ckpt = args.ckpt or newest_checkpoint(args.results_dir)
    if ckpt is None:
        raise SystemExit(f"no checkpoint given and none found under {args.results_dir}/. "
                         "Train one first, e.g.: python train.py --model S/16, or pass --ckpt PATH")
    model, train_args = load_model(ckpt, args.model, not args.no_ema, args.trained_at)
    weights = weights_hash(model) if args.num_samples else None
    model.to(device)
    train_size, t2i = train_args["image_size"], model.text_dim is not None
    # the official defaults: c2i Euler, CFG 3.5 in (0.1, 1); t2i Adams-2, 25 steps, CFG 4 in (0, 1), shift 3
    for k, c2i_default, t2i_default in (("solver", "euler", "adams2"), ("steps", 50, 25), ("cfg_scale", 3.5, 4.0),
                                        ("cfg_interval", [0.1, 1.0], [0.0, 1.0]), ("shift", 1.0, 3.0)):
        if getattr(args, k) is None:
            setattr(args, k, t2i_default if t2i else c2i_default)
    # the fast layer: bf16 weights, fused kernels, torch.compile, CUDA graphs; the plain model otherwise
    net = fast.for_sampling(model, compile=args.compile, cuda_graphs=args.cuda_graphs) if args.fast and cuda else model
    H, W = args.resolution or (train_size, train_size)
    tokens = train_size // model.patch_size  # per side; the neural field decodes H / tokens pixels per token
    if (H, W) != (train_size, train_size) and (H % tokens or W % tokens or model.head_type == "linear"):
        raise SystemExit(f"--resolution {H} {W}: " + ("the linear-head baseline samples only at its training "
                         f"size {train_size}" if model.head_type == "linear" else f"sides must be multiples of "
                         f"{tokens}, the model's {tokens}x{tokens} token grid"))
    kwargs = {"size": (train_size, train_size)} if (H, W) != (train_size, train_size) else {}
    nc = model.num_classes
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda)

    def generate(y, y_null, seeds):
        """y: labels (B,), or (features, mask) of the prompts; each image's noise from its seed."""
        noise = torch.stack([torch.randn(3, H, W, generator=torch.Generator().manual_seed(s)) for s in seeds])
        fn = guided(net, y, y_null, args.cfg_scale, tuple(args.cfg_interval), **kwargs)
        with autocast:
            return sample(fn, noise.to(device), args.steps, args.solver, args.shift)

    if t2i:
        prompts = read_prompts(args)
        feats, masks = caption_features([p for p, _ in prompts], args.text_encoder or train_args.get("text_encoder"),
                                        model.text_pos.shape[1], args.text_cache or train_args.get("text_cache"), device)
        use_mask = train_args.get("text_mask", True)

        def text(rows, n):  # (features, mask) of prompt rows, each repeated n times
            f, m = feats[rows].repeat_interleave(n, 0).to(device).float(), masks[rows].repeat_interleave(n, 0).to(device)
            return (f, m) if use_mask else f

        per = args.images_per_condition or 4
        if args.prompts:  # GenEval's layout: <dir>/<index>/metadata.jsonl and samples/<seed>.png, seeds 0..
            out_dir = args.sample_dir or os.path.splitext(args.prompts)[0] + "-samples"
            for i in tqdm(range(rank, len(prompts), world), disable=rank != 0):
                d = os.path.join(out_dir, f"{i:05d}")
                os.makedirs(os.path.join(d, "samples"), exist_ok=True)
                with open(os.path.join(d, "metadata.jsonl"), "w") as f:
                    f.write(json.dumps(prompts[i][1]) + "\n")
                x = generate(text([i], per), text([-1], per), list(range(per)))
                for seed, img in enumerate(to_uint8(x).numpy()):
                    write_atomic(os.path.join(d, "samples", f"{seed:04d}.png"), Image.fromarray(img).save)
            print(f"saved {len(prompts)} x {per} images under {out_dir}/") if rank == 0 else None
        elif rank == 0:  # one grid: a row of seeds 0.. per prompt
            x = generate(text(list(range(len(prompts))), per), text([-1], len(prompts) * per),
                         [s for _ in prompts for s in range(args.seed, args.seed + per)])
            save_grid(x, args.out, nrow=per)
            print(f"saved {args.out}: " + "; ".join(p for p, _ in prompts))
        return

    if not args.num_samples:  # one grid
        per = args.images_per_condition or 1
        bad = [c for c in args.class_labels or [] if not 0 <= c < nc]
        if bad:  # label nc is the null class: its images would be unconditional
            raise SystemExit(f"--class-labels {' '.join(map(str, bad))}: labels are 0 to {nc - 1} for this model")
        labels = torch.tensor(args.class_labels or list(range(min(nc, 8)))).repeat_interleave(per)
        y = labels.to(device)
        x = generate(y, torch.full_like(y, nc), [args.seed * 1_000_003 + i for i in range(len(labels))])
        if rank == 0:
            save_grid(x, args.out, nrow=per if per > 1 else min(len(labels), 8))
            print(f"saved {args.out}")
        return

    out_dir = os.path.normpath(args.sample_dir or os.path.splitext(ckpt)[0] +
                               f"-{args.solver}{args.steps}-cfg{args.cfg_scale}-{H}x{W}")
    n, bs = args.num_samples, args.batch_size
    check_sample_dir(out_dir, {"checkpoint weights (sha256)": weights, "--no-ema": args.no_ema,
                               "--num-samples": n, "--seed": args.seed, "--solver": args.solver, "--steps": args.steps,
                               "--cfg-scale": args.cfg_scale, "--cfg-interval": args.cfg_interval,
                               "--shift": args.shift, "--resolution": [H, W], "trained at": train_size}, write=rank == 0)
    if ddp:  # every rank looks at the folder before any writes to it
        dist.barrier()
    os.makedirs(out_dir, exist_ok=True)
    todo = [b for b in range(rank, -(-n // bs), world)  # whole batches dealt round-robin to ranks
            if not all(os.path.exists(f"{out_dir}/{i:06d}.png") for i in range(b * bs, min(n, (b + 1) * bs)))]
    for b in tqdm(todo, disable=rank != 0, desc=f"sampling to {out_dir}"):
        idx = list(range(b * bs, min(n, (b + 1) * bs)))
        labels = torch.tensor([i * nc // n for i in idx])  # n / nc images per class, in order
        y = labels.to(device)
        imgs = to_uint8(generate(y, torch.full_like(y, nc), [args.seed * 1_000_003 + i for i in idx])).numpy()
        for i, img in zip(idx, imgs):  # write-then-rename: a killed run leaves no half PNG
            if os.path.exists(f"{out_dir}/{i:06d}.png"):
                continue  # an earlier run wrote it: a rerun writes only the missing images
            write_atomic(f"{out_dir}/{i:06d}.png", Image.fromarray(img).save)
    if ddp:
        dist.barrier()
    if rank == 0:
        arr = np.stack([np.asarray(Image.open(f"{out_dir}/{i:06d}.png")) for i in range(n)])
        write_atomic(f"{out_dir}.npz", lambda tmp: np.savez(tmp, arr_0=arr))  # fid.py never sees half of one
        print(f"saved {n} images to {out_dir}/ and {out_dir}.npz {arr.shape}")
    if ddp:
        dist.destroy_process_group()


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="default: newest checkpoint of the newest run folder")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--model", choices=list(MODELS), default=None, help="for official checkpoints (default XL/16)")
    p.add_argument("--trained-at", type=int, default=None, metavar="SIZE",
                   help="for official checkpoints: the size trained at (default 256; 512 for res512_ft200k and t2i)")
    p.add_argument("--no-ema", action="store_true", help="use the online weights instead of the EMA")
    p.add_argument("--steps", type=int, default=None, help="default 50 (t2i: 25)")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="default euler (t2i: adams2)")
    p.add_argument("--cfg-scale", type=float, default=None, help="default 3.5 (t2i: 4.0)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, help="default 0.1 1.0 (t2i: 0 1)")
    p.add_argument("--shift", type=float, default=None, help="default 1 (t2i: 3)")
    p.add_argument("--prompt", action="append", help="text-to-image: a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a file of prompts, one per line, or GenEval's .jsonl")
    p.add_argument("--images-per-condition", type=int, default=None,
                   help="grid: images per class label (default 1) or per prompt (default 4), one row each")
    p.add_argument("--text-encoder", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--text-cache", default=None, help="precomputed prompt features (.pt), default the training one")
    p.add_argument("--class-labels", type=int, nargs="+", default=None)
    p.add_argument("--resolution", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="sample at another size than trained, without retraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=None, help="write this many PNGs and an .npz")
    p.add_argument("--sample-dir", default=None)
    p.add_argument("--out", default="sample.png", help="the grid's path")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA only: the fast layer (fast/): bf16 weights, the fused Triton kernels of the neural "
                        "field and the blocks, and the two options below; --no-fast runs the plain model")
    p.add_argument("--compile", nargs="?", const="regions", choices=["regions", "full"], default=None,
                   help="with --fast: torch.compile each block (--compile) or the whole model (--compile full: "
                        "a few percent faster sampling, about a minute more to compile)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --fast: replay each model call from a CUDA graph (the most gain at small batches)")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
