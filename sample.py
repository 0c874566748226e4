"""Sample from a PixNerd checkpoint: a PNG grid, or many images and an ADM-evaluator .npz.

    python sample.py --ckpt results/000-XL-16/ckpt-last.pt    # official: Euler 100 (or --steps 50 --solver adams2)
    torchrun --nproc_per_node=8 sample.py --ckpt X.pt --num-samples 50000   # PNGs + FOLDER.npz
    python sample.py --ckpt official.ckpt --trained-at 256 --resolution 384 512   # arbitrary size

Our checkpoints and official Lightning .ckpt files load alike (EMA weights by default).
In the many-images mode each image's noise and label depend on its index alone, and whole
batches are dealt to ranks, so any world size writes the same images; a rerun keeps the PNGs
that decode whole and redoes the others. Bad flags, paths and NaN weights stop before sampling.
The settings that made them are kept beside the folder (<folder>.json); a rerun with others stops.
"""
import argparse
import glob
import json
import math
import os

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import fast
from checkpoints import (check_memory, check_writable, end_distributed, load_model, newest_checkpoint, read_png,
                         save_grid, setup_distributed, to_uint8, weights_hash, write_atomic, write_npz)
from model import MODELS
from samplers import SOLVERS, guided, sample, time_grid
from text_encoder import caption_features

MAX_SAMPLES = 1_000_000  # the PNGs are named 000000.png to 999999.png; the ADM protocol takes 50,000
Image.MAX_IMAGE_PIXELS = None  # the PNGs read back here are our own, of the size asked for


def check_sample_dir(out_dir, settings, write):
    """Stop unless the images already in out_dir were made with these settings: with the same ones
    a rerun fills in the missing images, with others it would mix in stale ones. The settings go
    to out_dir.json, beside the folder and its .npz, so the folder holds only the images."""
    path, settings = f"{out_dir}.json", json.loads(json.dumps(settings))
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):  # none, or one cut short: as good as none
        old = None
    if glob.glob(os.path.join(glob.escape(out_dir), "*.png")) and old != settings:
        why = (f"no readable {path} says how they were made" if not isinstance(old, dict) else
               "they were made with " + ", ".join(f"{k} {old.get(k)} (now {v})" for k, v in settings.items()
                                                  if old.get(k) != v))
        raise SystemExit(f"--sample-dir {out_dir}: holds images, but {why}: "
                         "pass another --sample-dir, or delete the folder to sample it anew")
    if write:  # the folder first: its parents may not exist yet
        os.makedirs(out_dir, exist_ok=True)

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
            rows = [(json.loads(line)["prompt"], json.loads(line)) if jsonl else (line, {"prompt": line})
                    for line in lines]
            if not rows or not all(isinstance(p, str) for p, _ in rows):
                raise ValueError("holds no prompt" if not rows else "a prompt that is not text")
            prompts += rows
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--prompts {args.prompts}: {type(e).__name__}: {e}")
    if not prompts:
        raise SystemExit("a text-to-image checkpoint needs --prompt TEXT or --prompts FILE")
    return prompts


def check_args(args):
    """Every number in its meaningful range, before anything is loaded or written: one line naming the flag."""
    def within(v, lo, hi=math.inf):
        return v is None or (math.isfinite(v) and lo <= v <= hi)
    ci, res = args.cfg_interval, args.resolution
    for flag, value, ok, rule in (
            ("--steps", args.steps, within(args.steps, 1, 2**24), "must be 1 to 2**24 (a float32 grid has no more)"),
            ("--batch-size", args.batch_size, within(args.batch_size, 1), "must be at least 1"),
            ("--num-samples", args.num_samples, within(args.num_samples, 1, MAX_SAMPLES),
             f"must be 1 to {MAX_SAMPLES} (the PNGs are named 000000.png to 999999.png; ADM's protocol takes 50000)"),
            ("--images-per-condition", args.images_per_condition, within(args.images_per_condition, 1),
             "must be at least 1"),
            ("--seed", args.seed, within(args.seed, 0, 2**32 - 1), "must be 0 to 2**32 - 1"),
            ("--trained-at", args.trained_at, within(args.trained_at, 1), "must be a positive image size"),
            ("--cfg-scale", args.cfg_scale, within(args.cfg_scale, 0),
             "must be a finite number >= 0 (1: no guidance, 0: unconditional)"),
            ("--shift", args.shift, within(args.shift, 1e-30), "must be a finite number above 0 (1: no shift)"),
            ("--cfg-interval", " ".join(map(str, ci or [])), ci is None or (within(ci[0], 0, 1) and within(ci[1], 0, 1)
             and ci[0] < ci[1]), "guided where low < t < high: both in [0, 1], low below high (none: --cfg-scale 1)"),
            ("--resolution", " ".join(map(str, res or [])), res is None or min(res) >= 1, "sides must be positive")):
        if not ok:
            raise SystemExit(f"{flag} {value}: {rule}")
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        raise SystemExit(f"--out {args.out}: not an image file name (e.g. sample.png)")


def check_mode(args, t2i):
    """Flags this checkpoint and mode would ignore without a word."""
    mode = "a text-to-image checkpoint" if t2i else "a class-to-image checkpoint"
    unused = ([("--class-labels", args.class_labels), ("--num-samples", args.num_samples)] if t2i else
              [("--prompt", args.prompt), ("--prompts", args.prompts), ("--text-encoder", args.text_encoder),
               ("--text-cache", args.text_cache)])
    if args.num_samples and not t2i:
        mode += "'s --num-samples mode (every class alike, in order)"
        unused += [("--class-labels", args.class_labels), ("--images-per-condition", args.images_per_condition)]
    for flag, value in unused:
        if value is not None:
            raise SystemExit(f"{flag}: not used with {mode}")
    ts = time_grid(args.steps, args.shift)
    if not bool((ts[1:] > ts[:-1]).all()):
        raise SystemExit(f"--shift {args.shift} with --steps {args.steps}: neighbouring float32 times of the grid "
                         "coincide; take a shift nearer 1 or fewer steps")


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
    # the official defaults: c2i Euler 100, CFG 3.5 in (0.1, 1); t2i Adams-2, 25 steps, CFG 4 in (0, 1), shift 3
    for k, c2i_default, t2i_default in (("solver", "euler", "adams2"), ("steps", 100, 25), ("cfg_scale", 3.5, 4.0),
                                        ("cfg_interval", [0.1, 1.0], [0.0, 1.0]), ("shift", 1.0, 3.0)):
        if getattr(args, k) is None:
            setattr(args, k, t2i_default if t2i else c2i_default)
    check_mode(args, t2i)
    H, W = args.resolution or (train_size, train_size)
    tokens = train_size // model.patch_size  # per side; the neural field decodes H / tokens pixels per token
    if (H, W) != (train_size, train_size) and (H % tokens or W % tokens or model.head_type == "linear"):
        raise SystemExit(f"--resolution {H} {W}: " + ("the linear-head baseline samples only at its training "
                         f"size {train_size}" if model.head_type == "linear" else f"sides must be multiples of "
                         f"{tokens}, the model's {tokens}x{tokens} token grid"))
    kwargs = {"size": (train_size, train_size)} if (H, W) != (train_size, train_size) else {}
    nc = model.num_classes
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda)

    # what each mode writes where, in batches of how many: checked before anything is sampled or written
    prompts = read_prompts(args) if t2i else None
    bad = [c for c in args.class_labels or [] if not 0 <= c < nc]
    if bad:  # label nc is the null class: its images would be unconditional
        raise SystemExit(f"--class-labels {' '.join(map(str, bad))}: labels are 0 to {nc - 1} for this model")
    per, labels = args.images_per_condition or (4 if t2i else 1), args.class_labels or list(range(min(nc, 8)))
    if args.num_samples:
        out_dir = os.path.normpath(args.sample_dir or os.path.splitext(ckpt)[0] +
                                   f"-{args.solver}{args.steps}-cfg{args.cfg_scale}-{H}x{W}")
        batch, paths = min(args.batch_size, args.num_samples), [("--sample-dir", out_dir, True), (
            "--sample-dir", out_dir + ".npz", False), ("--sample-dir", out_dir + ".json", False)]
    elif t2i and args.prompts:
        out_dir = args.sample_dir or os.path.splitext(args.prompts)[0] + "-samples"
        batch, paths = per, [("--sample-dir", out_dir, True)]
    else:
        batch, paths = per * len(prompts if t2i else labels), [("--out", args.out, False)]
    cache = args.text_cache or train_args.get("text_cache")
    if t2i and cache and not os.path.isfile(cache):  # a new cache is written
        paths.append(("--text-cache", cache, False))
    for flag, path, folder in paths:
        check_writable(flag, path, folder)
    # the fast layer: bf16 weights, fused kernels, torch.compile, CUDA graphs; the plain model otherwise
    fast_path = args.fast and cuda
    net = fast.for_sampling(model, compile=args.compile, cuda_graphs=args.cuda_graphs) if fast_path else model
    # at least: noise, state and CFG's doubled input and output in fp32, and the plain neural field's features
    width = 0 if fast_path or model.head_type == "linear" else model.head.embed.out_features
    flag = (f"--resolution {H} {W}" if args.resolution else
            "--batch-size" if args.num_samples else "--images-per-condition")
    check_memory(f"{flag}: a batch of {batch} images of {H}x{W}", batch * H * W * 4 * (15 + width), device)

    def generate(y, y_null, seeds):
        """y: labels (B,), or (features, mask) of the prompts; each image's noise from its seed."""
        noise = torch.stack([torch.randn(3, H, W, generator=torch.Generator().manual_seed(s)) for s in seeds])
        fn = guided(net, y, y_null, args.cfg_scale, tuple(args.cfg_interval), **kwargs)
        with autocast:
            x = sample(fn, noise.to(device), args.steps, args.solver, args.shift)
        if not torch.isfinite(x).all():  # black images, and a FID computed on them: stop before writing any
            raise SystemExit(f"--ckpt {ckpt}: its samples hold NaN or inf (--cfg-scale {args.cfg_scale}, {args.solver} "
                             f"{args.steps} steps, --shift {args.shift}); its weights are finite, so the network "
                             "overflows: a diverged run, or too large a --cfg-scale. Nothing of this batch was written")
        return x

    if t2i:
        feats, masks = caption_features([p for p, _ in prompts], args.text_encoder or train_args.get("text_encoder"),
                                        model.text_pos.shape[1], cache, device, dtype=train_args.get("text_encoder_dtype"))
        use_mask = train_args.get("text_mask", True)

        def text(rows, n):  # (features, mask) of prompt rows, each repeated n times
            f, m = feats[rows].repeat_interleave(n, 0).to(device).float(), masks[rows].repeat_interleave(n, 0).to(device)
            return (f, m) if use_mask else f

        if args.prompts:  # GenEval's layout: <dir>/<index>/metadata.jsonl and samples/<seed>.png, seeds 0..
            for i in tqdm(range(rank, len(prompts), world), disable=rank != 0):
                d = os.path.join(out_dir, f"{i:05d}")
                x = generate(text([i], per), text([-1], per), list(range(per)))
                os.makedirs(os.path.join(d, "samples"), exist_ok=True)
                with open(os.path.join(d, "metadata.jsonl"), "w") as f:
                    f.write(json.dumps(prompts[i][1]) + "\n")
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
        y = torch.tensor(labels).repeat_interleave(per).to(device)
        x = generate(y, torch.full_like(y, nc), [args.seed * 1_000_003 + i for i in range(len(y))])
        if rank == 0:
            save_grid(x, args.out, nrow=per if per > 1 else min(len(y), 8))
            print(f"saved {args.out}")
        return

    n, bs = args.num_samples, args.batch_size
    check_sample_dir(out_dir, {"checkpoint weights (sha256)": weights, "--no-ema": args.no_ema,
                               "--num-samples": n, "--seed": args.seed, "--solver": args.solver, "--steps": args.steps,
                               "--cfg-scale": args.cfg_scale, "--cfg-interval": args.cfg_interval,
                               "--shift": args.shift, "--resolution": [H, W], "trained at": train_size}, write=rank == 0)
    if ddp:  # every rank looks at the folder before any writes to it
        dist.barrier()
    png = f"{out_dir}/{{:06d}}.png".format
    # whole batches dealt round-robin to ranks, each looked at when its turn comes (a huge count starts at once):
    # a PNG is kept if it decodes whole at the right size, so a file cut short or emptied is sampled again
    for b in tqdm(range(rank, -(-n // bs), world), disable=rank != 0, desc=f"sampling to {out_dir}"):
        idx = list(range(b * bs, min(n, (b + 1) * bs)))
        redo = {i for i in idx if read_png(png(i), (H, W)) is None}
        if not redo:
            continue
        y = torch.tensor([i * nc // n for i in idx]).to(device)  # n / nc images per class, in order
        imgs = to_uint8(generate(y, torch.full_like(y, nc), [args.seed * 1_000_003 + i for i in idx])).numpy()
        for i, img in zip(idx, imgs):  # write-then-rename: a killed run leaves no half PNG
            if i in redo:  # a rerun writes only the missing and damaged images
                write_atomic(png(i), Image.fromarray(img).save)
    if ddp:
        dist.barrier()
    if rank == 0:
        write_npz(f"{out_dir}.npz", [png(i) for i in range(n)], (H, W))  # streamed; fid.py never sees half of one
        print(f"saved {n} images to {out_dir}/ and {out_dir}.npz {(n, H, W, 3)}")
    if ddp:
        end_distributed()


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="default: newest checkpoint of the newest run folder")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--model", choices=list(MODELS), default=None, help="for official checkpoints (default XL/16)")
    p.add_argument("--trained-at", type=int, default=None, metavar="SIZE",
                   help="official class-to-image checkpoints need it: 256, or 512 for res512_ft200k (t2i: 512)")
    p.add_argument("--no-ema", action="store_true", help="use the online weights instead of the EMA")
    p.add_argument("--steps", type=int, default=None, help="default 100, as the paper's FIDs (t2i: 25)")
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
