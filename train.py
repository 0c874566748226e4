"""Train PixNerd with plain PyTorch DDP.

    torchrun --nproc_per_node=8 train.py --model XL/16 --data-path /data/imagenet/train
    python train.py --model S/16 --max-steps 1500 --global-batch-size 32   # built-in toy data, CPU

The defaults are the paper's / official recipe (spec Sec. 4): AdamW lr 1e-4, no weight decay,
global batch 256, EMA 0.9999, lognorm t, label dropout 0.1, REPA at block 8 with weight 0.5 when
a DINOv2 checkpoint is given, bf16 autocast on CUDA. Without --data-path it trains on a small
procedural dataset so every path runs on any machine.

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
import warnings
from contextlib import nullcontext
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import block_kernel
import flow
import nerf_kernel
import optim_kernel
from model import MODELS, SwiGLU, convert_official, load_weights
from samplers import guided, sample
from sample import bf16_linears, save_grid, setup_distributed
from text_encoder import caption_features

IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
PEAK_FLOPS = 686e12  # bf16 dense matmul rate measured on an H100 (8192^3); the MFU reference


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def center_crop_adm(img, size):
    """ADM's centre crop (spec Sec. 4): box-downsample by 2 while the short side >= 2 size,
    bicubic-resize the short side to size (up for small images), centre-crop. -> uint8 HWC."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y: y + size, x: x + size]


class ImageFolder(Dataset):
    """One subfolder per class, or (captions=True) any images that have a same-named .txt caption.
    Items are (uint8 CHW image, label or caption index, number of unreadable files skipped to
    produce it). `classes` lists the class names, or the distinct captions. Any PIL mode is
    converted to RGB; a corrupt file is replaced by the next readable one with a warning."""

    def __init__(self, root, size, captions=False):
        if not os.path.isdir(root):
            raise SystemExit(f"--data-path {root!r} is not a directory")
        self.root, self.size, self.files, names = root, size, [], []
        for dirpath, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                path = os.path.join(dirpath, f)
                txt = os.path.splitext(path)[0] + ".txt"
                if not f.lower().endswith(IMG_EXTS) or (captions and not os.path.exists(txt)):
                    continue
                if captions:
                    with open(txt, encoding="utf-8") as fh:
                        names.append(fh.read().strip())
                elif dirpath != root:  # the class is the top-level subfolder
                    names.append(os.path.relpath(dirpath, root).split(os.sep)[0])
                else:
                    continue
                self.files.append(path)
        if not self.files:
            raise SystemExit(f"--data-path {root!r} holds no images " + (
                "with same-named .txt captions" if captions else
                f"in class subfolders (expected {root}/<class>/<image>{IMG_EXTS[0]})"))
        self.classes = sorted(set(names))
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[n] for n in names]

    def __len__(self):
        return len(self.files)

    def load(self, i):
        with Image.open(self.files[i]) as img:
            if img.mode == "F":  # float TIFFs: no agreed range to map to 8 bits
                raise ValueError("float images (mode F) are not supported")
            if img.mode.startswith("I"):  # 16-bit grayscale: to 8 bits (convert would clip at 255)
                img = Image.fromarray((np.asarray(img).clip(0, 65535) / 257).round().astype(np.uint8))
            img = img.convert("RGBA") if img.mode in ("P", "LA") else img
            if img.mode == "RGBA":  # transparent pixels on white, not on black
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
            return center_crop_adm(img.convert("RGB"), self.size)

    def __getitem__(self, i):
        for bad in range(len(self)):
            j = (i + bad) % len(self)
            try:
                return torch.from_numpy(self.load(j).copy()).permute(2, 0, 1), self.labels[j], bad
            except Exception as e:  # truncated, corrupt, not an image at all
                warnings.warn(f"skipping unreadable image {self.files[j]}: {e}")
        raise RuntimeError("no readable image in the dataset")


class ArrayDataset(Dataset):
    """A preprocessed dataset: one memory-mapped uint8 (N, H, W, 3) file, its labels, and beside
    them a .json of its classes and the folder it was made from."""

    def __init__(self, path):
        self.images = np.load(path, mmap_mode="r")
        self.labels = np.load(path[: -len(".npy")] + ".labels.npy")
        with open(path[: -len(".npy")] + ".json") as f:
            meta = json.load(f)
        self.classes, self.data_path = meta["classes"], meta["data_path"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1), int(self.labels[i]), 0


def cache_dataset(dataset, path, num_workers):
    """Decode and crop every image of an ImageFolder once into a uint8 array file (written atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers,
                        generator=torch.Generator())  # leaves the global RNG, so the model init, alone
    n, s = len(dataset), dataset.size
    tmp = path + ".tmp.npy"
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
    labels, i = np.zeros(n, dtype=np.int64), 0
    for x, y, _ in tqdm(loader, desc=f"caching {path}"):
        images[i: i + len(x)] = x.permute(0, 2, 3, 1).numpy()
        labels[i: i + len(x)] = y.numpy()
        i += len(x)
    images.flush()
    np.save(path[: -len(".npy")] + ".labels.npy", labels)
    with open(path[: -len(".npy")] + ".json", "w") as f:
        json.dump({"classes": dataset.classes, "data_path": os.path.abspath(dataset.root)}, f)
    os.replace(tmp, path)


def open_cache(path, folder):
    """The ArrayDataset at path, refused with one clear error unless it holds folder's images at
    folder's size: a cache of other images would train on them silently."""
    try:
        cached = ArrayDataset(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--cache {path}: unreadable ({e}); delete it to make it again")
    n, s = len(folder), folder.size
    made = (cached.data_path, cached.classes, cached.images.shape)
    if made != (os.path.abspath(folder.root), folder.classes, (n, s, s, 3)):
        raise SystemExit(f"--cache {path}: made from {cached.data_path} ({len(cached.classes)} classes, "
                         f"array {cached.images.shape}), not from --data-path {folder.root} ({len(folder.classes)} "
                         f"classes, {n} images) at --image-size {s}: give another file, or delete it to make it again")
    return cached


class Shapes(Dataset):
    """The built-in dataset: coloured shapes on dark backgrounds, one class per shape, generated
    deterministically from the index so it needs no files and any machine gets the same data."""

    classes = ["red disc", "green square", "blue triangle", "yellow cross", "magenta ring", "cyan stripes"]

    def __init__(self, size, n=6000):
        self.size, self.n = size, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        label, s = i % len(self.classes), self.size
        yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
        cx, cy = rng.uniform(0.35, 0.65, 2)
        r = rng.uniform(0.2, 0.32)
        dx, dy = xx - cx, yy - cy
        mask = [np.hypot(dx, dy) < r,
                np.maximum(abs(dx), abs(dy)) < r * 0.85,
                (dy < r * 0.8) & (dy > -r) & (abs(dx) < (dy + r) * 0.55),
                np.minimum(abs(dx), abs(dy)) < r * 0.3,
                abs(np.hypot(dx, dy) - r * 0.8) < r * 0.25,
                (np.floor(yy * 8 + cy * 4) % 2 == 0)][label]
        if label in (3, 5):
            mask &= np.maximum(abs(dx), abs(dy)) < r * 1.1
        colour = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230], [235, 215, 40],
                           [215, 50, 215], [40, 210, 220]][label]) + rng.integers(-25, 26, 3)
        img = np.broadcast_to(rng.integers(10, 70, 3), (s, s, 3)).copy()
        img[mask] = colour.clip(0, 255)
        return torch.from_numpy(img.astype(np.uint8)).permute(2, 0, 1), label, 0


class ResumableSampler(torch.utils.data.Sampler):
    """Endless shuffled indices for this rank, starting after `start` already-consumed samples.
    Epoch e's order is randperm(seed + e), the same on every rank and in every run. With hflip,
    index i + n means "item i, mirrored", decided by the same permutation."""

    def __init__(self, n, rank, world, seed, start=0, hflip=False):
        self.n, self.rank, self.world, self.seed, self.start, self.hflip = n, rank, world, seed, start, hflip

    def __iter__(self):
        m = 2 * self.n if self.hflip else self.n
        per_rank = m // self.world
        epoch, offset = divmod(self.start, per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(m, generator=g)[self.rank: per_rank * self.world: self.world]
            yield from order[offset:].tolist()
            epoch, offset = epoch + 1, 0


class Flipped(Dataset):
    """Index i + n is item i mirrored left-right (see ResumableSampler)."""

    def __init__(self, dataset):
        self.dataset, self.classes = dataset, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y, bad = self.dataset[i % len(self.dataset)]
        return (x.flip(-1) if i >= len(self.dataset) else x), y, bad


# ---------------------------------------------------------------------------------------------
# Checkpoints and run folders
# ---------------------------------------------------------------------------------------------

def save_atomic(obj, path):
    """Write to a temporary file, fsync, rename: a kill at any moment leaves the old file or
    the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_number(name):
    """NNN of a run folder NNN-MODEL (any number of digits: 1000 follows 999), else None."""
    num = name.split("-")[0]
    return int(num) if num.isdecimal() else None


def newest_run(results_dir, with_checkpoint=False):
    """The highest-numbered run folder (with a ckpt-last.pt, if asked), or None."""
    names = [d for d in (os.listdir(results_dir) if os.path.isdir(results_dir) else []) if run_number(d) is not None]
    runs = [os.path.join(results_dir, d) for d in sorted(names, key=run_number)]
    if with_checkpoint:
        runs = [r for r in runs if os.path.exists(os.path.join(r, "ckpt-last.pt"))]
    return runs[-1] if runs else None


def init_weights(path):
    """The EMA weights of our checkpoint or of an official Lightning one (as official "emainit")."""
    src = torch.load(path, map_location="cpu", weights_only=True)
    return src["ema"] if "ema" in src else convert_official(src)


def read_weights(flag, path, load):
    """load(path), where a missing file or one of another kind is one clear error naming the flag,
    raised before the run folder is made."""
    if not os.path.isfile(path):
        raise SystemExit(f"{flag} {path}: no such file")
    try:
        return load(path)
    except Exception as e:  # not a checkpoint at all, or of another model
        raise SystemExit(f"{flag} {path}: not a checkpoint this flag takes ({type(e).__name__}: {e})")


def model_config(args, num_classes, text_dim=None):
    kwargs = dict(head=args.head)
    if text_dim:
        kwargs.update(text_dim=text_dim, text_len=args.text_len)
    else:
        kwargs.update(num_classes=num_classes)
    for k in ("encoding", "nerf_norm", "nerf_width", "nerf_depth", "patch_size"):
        if getattr(args, k) is not None:
            kwargs[k] = getattr(args, k)
    return {"name": args.model, "kwargs": kwargs}


def count_flops(config, image_size):
    """Forward matmul + attention FLOPs of one image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = MODELS[config["name"]](**config["kwargs"])
        x = torch.empty(1, 3, image_size, image_size)
        y = torch.zeros(1, dtype=torch.long) if m.text_dim is None else torch.empty(1, m.text_pos.shape[1], m.text_dim)
        for mlp in m.modules():  # the model's FLOPs, not those of SwiGLU's alignment padding
            if isinstance(mlp, SwiGLU):
                mlp.pad = 0
        with FlopCounterMode(display=False) as counter:
            m(x, torch.empty(1), y)
    return counter.get_total_flops()


def peak_gib(device, graphs=False):
    """Peak GPU memory since the last reset, GiB: tensors allocated, or with CUDA graphs the memory
    reserved, since the graphs' private pools do not count as allocated while they replay."""
    peak = torch.cuda.max_memory_reserved if graphs else torch.cuda.max_memory_allocated
    return peak(device) / 2 ** 30


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class Objective(nn.Module):
    """The model and the REPA projector under one module, so DDP syncs both."""

    def __init__(self, model, projector):
        super().__init__()
        self.model, self.projector = model, projector

    def forward(self, x, y, **kw):
        return flow.training_losses(self.model, x, y, projector=self.projector, **kw)


def bf16_compute_copy(model):
    """The module that runs the forward and backward under bf16 autocast: model's structure, the
    Linear weights that autocast casts (sample.bf16_linears) as bf16 parameters of its own, every
    other parameter model's own. model keeps the fp32 weights that AdamW updates, the EMA follows
    and checkpoints save; optim_kernel.step takes the copies' gradients and rewrites the copies.
    Autocast rounds those weights to bf16 on every call and computes their gradients in bf16, so
    the numbers are the same; what goes is each step's casts, the weights to bf16 and their
    gradients back to fp32 (2-3% of a compiled L/16 step on an H100; in eager steps also the
    host's time for the casts and their autograd nodes). Returns the copy and its (fp32
    parameter, bf16 copy) pairs."""
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


def main(args):
    ddp, rank, world, device = setup_distributed()
    cuda = device.type == "cuda"

    # ---- resume: the run's own settings win, and a flag given with another value is refused;
    # --max-steps, the logging cadence and the speed flags may change
    ckpt, run_dir = None, None
    if args.resume:
        run_dir = newest_run(args.results_dir, with_checkpoint=True) if args.resume == "auto" else args.resume
        path = run_dir and os.path.join(run_dir, "ckpt-last.pt")
        if not path or not os.path.exists(path):
            raise SystemExit(f"--resume: no checkpoint found ({path or 'no run folder in ' + args.results_dir})")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        conflicts = []
        for k, v in ckpt["args"].items():
            given = getattr(args, k, None)  # None: not on the command line (every flag's default)
            if given is None:
                setattr(args, k, v)
            elif given != v and k not in RESUME_MAY_CHANGE + ("resume",):
                conflicts.append(f"--{k.replace('_', '-')} {given}: the run has {v}")
        if conflicts:
            raise SystemExit("; ".join(conflicts) + f" (--resume {run_dir} keeps the run's settings; only --" +
                             ", --".join(k.replace("_", "-") for k in RESUME_MAY_CHANGE) + " may change)")
        args.resume = run_dir
    for k, v in {**DEFAULTS, **(PAPER if args.data_path else BUILTIN)}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, low in (("global_batch_size", 1), ("grad_accum", 1), ("log_every", 1), ("ckpt_every", 1),
                   ("sample_every", 1), ("sample_steps", 1), ("text_len", 1), ("max_steps", 0),
                   ("milestone_every", 0), ("num_workers", 0)):
        if getattr(args, k) < low:
            raise SystemExit(f"--{k.replace('_', '-')} {getattr(args, k)}: must be at least {low}")
    if args.global_batch_size % (world * args.grad_accum):
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"{world} processes x --grad-accum {args.grad_accum}")
    local_batch = args.global_batch_size // (world * args.grad_accum)
    torch.manual_seed(args.seed * world + rank)

    # ---- data, captions, model and weight files: every error before a run folder
    size = args.image_size
    t2i = bool(args.text_encoder or args.text_cache)
    with torch.device("meta"):
        arch = MODELS[args.model]()
    if t2i != (arch.text_dim is not None):
        raise SystemExit(f"--model {args.model} is a " + ("text-to-image model: give --text-encoder PATH"
                         if not t2i else "class-conditional model: use a T2I model with --text-encoder"))
    patch = args.patch_size or arch.patch_size
    if size < 1 or size % patch:
        raise SystemExit(f"--image-size {size}: must be a positive multiple of the patch size {patch}")
    if args.data_path:
        dataset = ImageFolder(args.data_path, size, t2i)
        if args.cache:
            if not args.cache.endswith(".npy"):
                raise SystemExit(f"--cache {args.cache}: must be a .npy file")
            if not os.path.exists(args.cache) and rank == 0:
                cache_dataset(dataset, args.cache, args.num_workers)
            if ddp:
                dist.barrier()
            dataset = open_cache(args.cache, dataset)
    else:
        dataset = Shapes(size)
    if args.hflip:
        dataset = Flipped(dataset)
    num_classes = len(dataset.classes)

    if t2i:  # official t2i recipe (spec Sec. 7.5); the time shift scales with resolution: 2 at 256
        for k, v in dict(beta2=0.95, grad_clip=1.0, t_shift=size / 128).items():
            setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
        feats, masks = caption_features(dataset.classes, args.text_encoder, args.text_len, args.text_cache,
                                        device)  # (captions + 1, L, d): the last row is ""
    args.beta2 = 0.999 if args.beta2 is None else args.beta2
    args.t_shift = 1.0 if args.t_shift is None else args.t_shift

    config = ckpt["model_config"] if ckpt else model_config(args, num_classes, t2i and feats.shape[-1])
    model = MODELS[config["name"]](**config["kwargs"])
    if args.init_from and not ckpt:
        try:
            load_weights(model, read_weights("--init-from", args.init_from, init_weights))
        except ValueError as e:
            raise SystemExit(f"--init-from {args.init_from}: does not fit --model {args.model}: {e}")
    encoder = projector = None
    if args.repa_encoder:
        from dinov2 import load_dinov2, repa_target
        encoder = read_weights("--repa-encoder", args.repa_encoder, load_dinov2)
        projector = flow.REPAProjector(model.patch_embed.out_features)

    if not args.resume and rank == 0:
        os.makedirs(args.results_dir, exist_ok=True)
        last = newest_run(args.results_dir)
        idx = run_number(os.path.basename(last)) + 1 if last else 0
        run_dir = os.path.join(args.results_dir, f"{idx:03d}-{args.model.replace('/', '-')}")
        os.makedirs(run_dir)
    if ddp and not args.resume:
        box = [run_dir if rank == 0 else None]
        dist.broadcast_object_list(box)
        run_dir = box[0]

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(asctime)s] %(message)s",
                        force=True, handlers=[logging.StreamHandler(sys.stdout)] +
                        ([logging.FileHandler(os.path.join(run_dir, "log.txt"))] if rank == 0 else []))
    log = logging.getLogger("train")

    def condition(y):
        """Labels on the device, or the (features, mask) of caption indices y (-1: the empty prompt)."""
        if not t2i:
            return y.to(device, non_blocking=True)
        f = feats[y].to(device, non_blocking=True).float()
        return (f, masks[y].to(device, non_blocking=True)) if args.text_mask else f

    null = condition(torch.tensor([-1])) if t2i else num_classes

    # ---- model, EMA, REPA, optimizer on the device
    model.to(device)
    if ddp:  # every rank starts from rank 0's weights (DDP would sync only the bf16 copies below)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    ema = deepcopy(model).requires_grad_(False)  # fp32, updated every step
    if args.repa_encoder:
        encoder, projector = encoder.to(device), projector.to(device)
        log.info(f"REPA on: DINOv2 from {args.repa_encoder}, block {model.align_layer}, weight {args.repa_weight}")
    else:
        log.info("REPA off (no --repa-encoder given): training with the flow-matching loss alone")
    objective = Objective(model, projector)  # AdamW's parameters: the fp32 weights and the projector
    opt = torch.optim.AdamW(objective.parameters(), lr=args.lr, betas=(0.9, args.beta2),
                            weight_decay=args.weight_decay, fused=cuda)
    step = 0
    if ckpt:
        try:
            load_weights(model, ckpt["model"])
        except ValueError as e:
            raise SystemExit(f"--resume: {e}")
        ema.load_state_dict(ckpt["ema"])
        if projector is not None:
            projector.load_state_dict(ckpt["projector"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        if rank == 0:  # forget what the interrupted run did after its last checkpoint
            for f in os.listdir(run_dir):
                if ".pt.tmp" in f:
                    os.remove(os.path.join(run_dir, f))
            metrics = os.path.join(run_dir, "metrics.jsonl")
            if os.path.exists(metrics):
                with open(metrics) as f:
                    lines = f.read().splitlines()
                rows = []
                for line in lines:
                    try:
                        if json.loads(line)["step"] <= step:
                            rows.append(line + "\n")
                    except json.JSONDecodeError:  # the last line, cut off by a crash
                        pass
                with open(metrics, "w") as f:
                    f.writelines(rows)
        log.info(f"resumed {run_dir} at step {step}")
    # bf16 compute copies of the Linear weights under autocast; with --grad-accum the fp32 weights
    # run the step, so that the micro-batches' gradients add up in fp32
    net, copies = bf16_compute_copy(model) if cuda and args.grad_accum == 1 else (model, [])
    if cuda:
        log.info(f"bf16 compute copies: {f'{len(copies)} Linear tensors' if copies else 'off (--grad-accum > 1)'}")
    if args.kernel and cuda:  # fused Triton kernels (neural field, blocks); the torch path otherwise
        routed = sum(k.enable(m) for k in (nerf_kernel, block_kernel) for m in (net, ema))
        log.info(f"fused kernels: {'on' if routed else 'off (needs Triton)'}")
    graphs = args.cuda_graphs and args.compile and cuda
    if args.cuda_graphs:
        log.info(f"CUDA graphs: {'on' if graphs else 'off (they need --compile on CUDA)'}")
    if args.compile and cuda:  # regional: one compiled block serves all of them
        net.compile_regions(**({"mode": "reduce-overhead"} if graphs else {}))
    train_obj = Objective(net, projector)  # what runs the step: the copies where there are any
    if ddp:
        train_obj = DDP(train_obj, device_ids=[device.index] if cuda else None)
        if copies:
            train_obj.register_comm_hook(None, allreduce_fp32)
    model_params, ema_params = list(model.parameters()), list(ema.parameters())  # for optim_kernel.step
    n_params = sum(p.numel() for p in model_params)
    flops = count_flops(config, size)
    if rank == 0:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    log.info(f"{config['name']} {config['kwargs']}: {n_params:,} parameters, {flops / 1e9:.1f} GFLOPs/image; "
             f"{len(dataset):,} images of {num_classes} classes at {size}px; run folder {run_dir}")

    sampler = ResumableSampler(len(dataset), rank, world, args.seed, step * local_batch * args.grad_accum,
                               args.hflip)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=cuda, drop_last=True, persistent_workers=args.num_workers > 0)
    batches = iter(loader)

    # fixed noise and labels for the EMA sample grids
    g = torch.Generator().manual_seed(args.seed)
    grid_y = torch.arange(min(num_classes, 8)).repeat_interleave(4)
    grid_noise = torch.randn(len(grid_y), 3, size, size, generator=g).to(device)
    grid_y, grid_null = condition(grid_y), condition(torch.full_like(grid_y, -1 if t2i else num_classes))
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda)
    gen = torch.Generator(device)

    def save(name):
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "projector": projector.state_dict() if projector else None, "step": step,
                 "skipped_images": bad_total, "args": vars(args), "model_config": config}
        save_atomic(state, os.path.join(run_dir, name))

    stats, t_log, seen, n_steps = {}, time.time(), 0, 0
    bad_total = ckpt.get("skipped_images", 0) if ckpt else 0  # unreadable images, the whole run
    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps:
        gen.manual_seed((args.seed * world + rank) * 1_000_000_007 + step)
        if graphs:  # last step's graph outputs (activations) may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
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
                (losses["loss"] / args.grad_accum).backward()
            for k, v in losses.items():
                stats[k] = stats.get(k, 0) + v.detach() / args.grad_accum
        # AdamW, clipping (--grad-clip) and ema += (1 - decay) (theta - ema), in fp32: one kernel on a GPU
        grad_norm = optim_kernel.step(opt, ema_params, model_params, args.ema_decay, args.grad_clip,
                                      kernel=None if args.kernel else False, copies=copies)
        stats["grad_norm"] = stats.get("grad_norm", 0) + grad_norm
        opt.zero_grad(set_to_none=True)
        train_obj.zero_grad(set_to_none=True)  # the copies' gradients
        step += 1
        n_steps += 1
        seen += args.global_batch_size
        bar.update(1)

        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.max_steps:  # checked before a save
            row = {k: v.item() / n_steps for k, v in stats.items()}
            if ddp:
                vals = torch.tensor(list(row.values()), device=device)
                dist.all_reduce(vals)
                row = dict(zip(row, (vals / world).tolist()))
            if not all(math.isfinite(v) for v in row.values()):
                raise SystemExit(f"step {step}: loss or gradient is not finite ({row}); stopping. "
                                 f"The last checkpoint in {run_dir} is intact.")
            dt = time.time() - t_log
            row.update(step=step, lr=args.lr, img_per_s=seen / dt, skipped_images=bad_total)
            if cuda:
                row["mfu"] = 3 * flops * seen / dt / (PEAK_FLOPS * world)
                row["peak_mem_gib"] = peak_gib(device, graphs)
            if rank == 0:
                with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            stats, t_log, seen, n_steps = {}, time.time(), 0, 0

        if rank == 0 and (step % args.sample_every == 0 or step == args.max_steps):
            with autocast:
                fn = guided(ema, grid_y, grid_null, args.sample_cfg, (0.1, 1.0))
                imgs = sample(fn, grid_noise, args.sample_steps, "euler")
            save_grid(imgs.float(), os.path.join(run_dir, f"samples-{step:07d}.png"), nrow=4)
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.max_steps):
            save("ckpt-last.pt")
            if args.milestone_every and step % args.milestone_every == 0:
                save(f"ckpt-{step:07d}.pt")
    bar.close()
    log.info(f"done: {step} steps in {run_dir}")
    if ddp:
        dist.destroy_process_group()
    return run_dir


# Every flag defaults to None, so that a resume can tell the flags a command line gave from the
# others: it refuses a value other than the run's own. Unset flags take these values, and then
# the paper's recipe for real data or, for the built-in shapes, a run that gives a recognisable
# EMA grid in about 10 minutes on a 2-core CPU.
DEFAULTS = dict(model="XL/16", head="nerf", hflip=False, grad_accum=1, weight_decay=0.0, p_uncond=0.1,
                text_len=128, text_mask=True, repa_weight=0.5, milestone_every=100_000, sample_steps=50,
                sample_cfg=3.5, seed=0, compile=True, cuda_graphs=False, kernel=True)
PAPER = dict(image_size=256, global_batch_size=256, max_steps=800_000, lr=1e-4, ema_decay=0.9999,
             log_every=100, ckpt_every=5_000, sample_every=10_000, num_workers=8)
RESUME_MAY_CHANGE = ("max_steps", "log_every", "ckpt_every", "milestone_every", "sample_every",
                     "num_workers", "compile", "cuda_graphs", "kernel", "results_dir")
BUILTIN = dict(image_size=32, global_batch_size=32, max_steps=1_200, lr=2e-4, ema_decay=0.995,
               log_every=50, ckpt_every=300, sample_every=300, num_workers=1)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=f"Unset defaults: {json.dumps(DEFAULTS)}, and "
                                f"{json.dumps(PAPER)} with --data-path, else {json.dumps(BUILTIN)}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default=None, help="default XL/16")
    p.add_argument("--head", choices=["nerf", "linear"], default=None, help="linear: the paper's Baseline")
    p.add_argument("--encoding", choices=["dct", "dct2", "sincos", "cos"], default=None)
    p.add_argument("--nerf-norm", choices=["fc1", "fc1_fc2", "fc1_fc2_out"], default=None)
    p.add_argument("--nerf-width", type=int, default=None)
    p.add_argument("--nerf-depth", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--data-path", default=None, help="ImageFolder layout; none: built-in shapes")
    p.add_argument("--cache", default=None, help="uint8 .npy file to preprocess the dataset into once")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--hflip", action="store_true", default=None,
                   help="random horizontal flips (the official recipe has none)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue the newest run in --results-dir, or the run folder given")
    p.add_argument("--init-from", default=None, help="start from the weights of a checkpoint (ours or official)")
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="total steps of the run, resumes included")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta2", type=float, default=None, help="default 0.999 (t2i: 0.95)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=None, help="default none (t2i: 1.0)")
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--p-uncond", type=float, default=None, help="label dropout for CFG")
    p.add_argument("--t-shift", type=float, default=None,
                   help="time shift of the lognorm t; default 1 (t2i: image size / 128, so 2 at 256)")
    p.add_argument("--text-encoder", default=None,
                   help="text-to-image: a local HF model directory or .gguf file; data = images with .txt captions")
    p.add_argument("--text-cache", default=None, help="a .pt file of precomputed caption features (read or written)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (padded or truncated)")
    p.add_argument("--text-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="pass the text padding mask to attention (--no-text-mask: the official behaviour)")
    p.add_argument("--repa-encoder", default=None, help="local DINOv2 ViT-B/14 checkpoint (dinov2_vitb14_pretrain.pth)")
    p.add_argument("--repa-weight", type=float, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--milestone-every", type=int, default=None)
    p.add_argument("--sample-every", type=int, default=None)
    p.add_argument("--sample-steps", type=int, default=None)
    p.add_argument("--sample-cfg", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="CUDA only")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the compiled blocks from CUDA graphs (torch.compile's reduce-overhead mode): "
                        "no per-kernel work on the host, which pays where the host cannot keep up with "
                        "the GPU (small batches per GPU, slow CPUs); with --compile on CUDA")
    p.add_argument("--kernel", action=argparse.BooleanOptionalAction, default=None,
                   help="the fused Triton kernels of the neural field, the blocks and AdamW + EMA (CUDA and Triton only)")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
