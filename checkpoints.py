"""Files every script shares: checkpoints (ours and the official ones), run folders, image grids,
and the process setup of train.py and sample.py.

One atomic writer serves every file a run writes, so that a kill at any moment leaves the old file
or the new one, never half of one.
"""
import errno
import gc
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import flow
from model import MODELS


def write_atomic(path, write, name=None):
    """write(temporary path), fsync, rename it to path: a kill at any moment leaves the old file or
    the new one, never a torn one. The temporary name is this process's own (all ranks may write
    one file at once) and keeps the extension, which PIL and numpy go by: NAME.<pid>.tmp.EXT.
    A full disk (or quota) stops the run with one line naming the file (name: how to call it, e.g.
    the flag that gave it); other OSErrors are raised as they are, for callers that can do without."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # an error or Ctrl-C leaves no temporary file (a kill does: see rewind_run)
        if os.path.isfile(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise SystemExit(f"{name or path}: not written, the disk is full ({e.strerror}); the file there "
                             "before, if any, is kept: free some space and run again") from None
        raise


def save_checkpoint(obj, path, name=None):
    """torch.save(obj, path), atomically; a failed write is one line naming the file (or name). The
    bytes go through a Python file, as torch's own writer reports a full disk as a bare RuntimeError."""
    def write(tmp):
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer wraps the OSError of f.write
                raise (e.__context__ if isinstance(e.__context__, OSError) else e) from None
    try:
        write_atomic(path, write, name)
    except OSError as e:
        raise SystemExit(f"{name or path}: not written ({e.strerror or e}); the file there before, if any, is kept")


def is_temporary(name):
    """A file write_atomic had not renamed yet: what a killed run leaves behind."""
    return os.path.splitext(name)[0].endswith(".tmp")


# ---------------------------------------------------------------------------------------------
# Run folders: results/NNN-MODEL, numbered from 000 (1000 follows 999)
# ---------------------------------------------------------------------------------------------

def run_number(name):
    """NNN of a run folder NNN-MODEL (any number of digits), else None."""
    num = name.split("-")[0]
    return int(num) if num.isdecimal() else None


def newest_run(results_dir, with_checkpoint=False):
    """The highest-numbered run folder (with a ckpt-last.pt, if asked), or None."""
    names = [d for d in (os.listdir(results_dir) if os.path.isdir(results_dir) else []) if run_number(d) is not None]
    runs = [os.path.join(results_dir, d) for d in sorted(names, key=run_number)]
    if with_checkpoint:
        runs = [r for r in runs if os.path.exists(os.path.join(r, "ckpt-last.pt"))]
    return runs[-1] if runs else None


def newest_checkpoint(results_dir):
    """The ckpt-last.pt of the highest-numbered run folder that has one, or None."""
    run = newest_run(results_dir, with_checkpoint=True)
    return run and os.path.join(run, "ckpt-last.pt")


def new_run_dir(results_dir, model_name):
    """Make the next run folder, NNN-MODEL with NNN one above the highest so far (a run started at
    the same moment that takes the number first pushes this one to the next)."""
    try:
        os.makedirs(results_dir, exist_ok=True)
        while True:
            last = newest_run(results_dir)
            run_dir = os.path.join(results_dir, f"{run_number(os.path.basename(last)) + 1 if last else 0:03d}-"
                                                f"{model_name.replace('/', '-')}")
            try:
                os.makedirs(run_dir)
                return run_dir
            except FileExistsError:  # taken since newest_run looked
                pass
    except OSError as e:
        raise SystemExit(f"--results-dir {results_dir}: cannot make a run folder in it ({e.strerror or e})")


def lock_run(run_dir):
    """Lock run_dir for this process (a POSIX lock on its train.lock, let go when the file returned
    is closed or the process ends; forked DataLoader workers do not inherit it), so a second train.py
    on the same run stops with one line instead of writing the same files. Where fcntl is missing
    (Windows) or the file system has no locks, a warning says the run is not locked."""
    try:
        import fcntl
    except ImportError:
        warnings.warn(f"{run_dir}: not locked (no fcntl on this system): do not train it twice at once")
        return None
    f = open(os.path.join(run_dir, "train.lock"), "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            warnings.warn(f"{run_dir}: not locked ({e.strerror}): do not train it twice at once")
            return None
        raise SystemExit(f"{run_dir}: another train.py is training this run now (it holds {f.name}): "
                         "let it finish, or stop it, before resuming")
    return f


def write_text(path, text):
    """path's new content, text, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def append_metrics(run_dir, row):
    """One line of the run's metrics.jsonl (a kill may cut it short: rewind_run drops it)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise SystemExit(f"{path}: not written ({e.strerror or e}); the checkpoints are as they were")


def rewind_run(run_dir, step, resumed_from=None):
    """Forget what an interrupted run did after its checkpoint at step: the temporary files of a
    write a kill cut short, and the metrics of later steps (a last line cut off included), in a
    metrics.jsonl rewritten atomically. A run resumed from a milestone (resumed_from) as its
    ckpt-last.pt could not be used keeps that file aside, as ckpt-last.pt.unusable-<time>."""
    for f in os.listdir(run_dir):
        if is_temporary(f):
            os.remove(os.path.join(run_dir, f))
    last = os.path.join(run_dir, "ckpt-last.pt")
    if resumed_from and os.path.basename(resumed_from) != "ckpt-last.pt" and os.path.lexists(last):
        os.replace(last, f"{last}.unusable-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            lines = f.read().splitlines()
        rows = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):  # the last line, cut off by a crash
                pass
        write_text(metrics, "".join(rows))


def restore(ckpt, model, ema, projector, opt):
    """Load train.py's checkpoint into the run's model, EMA, REPA projector (or None) and optimizer;
    -> its step."""
    try:
        load_weights(model, ckpt["model"])
    except ValueError as e:
        raise SystemExit(f"--resume: {e}")
    ema.load_state_dict(ckpt["ema"])
    if projector is not None:
        projector.load_state_dict(ckpt["projector"])
    opt.load_state_dict(ckpt["opt"])
    return ckpt["step"]


def open_run(results_dir, model_name, resumed=None, rank=0):
    """(run folder, its lock) of the run this process trains: resumed, (run folder, checkpoint file,
    step), rewound to that step, or a new one in results_dir, made by rank 0 and shared with the other
    ranks. Rank 0 holds the lock (lock_run) while it keeps the file returned; the others hold none."""
    if resumed:
        run_dir = resumed[0]
    else:
        box = [new_run_dir(results_dir, model_name) if rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(box)
        run_dir = box[0]
    lock = lock_run(run_dir) if rank == 0 else None
    if resumed and rank == 0:
        rewind_run(run_dir, resumed[2], resumed[1])
    return run_dir, lock


CHECKPOINT_KEYS = ("model", "ema", "opt", "step", "args", "model_config")  # what train.py saves and resumes from


def read_checkpoint(path):
    """(train.py's checkpoint at path, None), or (None, why a run cannot resume from it)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut short, a folder, another kind of file; torch's message may say weights_only=False
        return None, f"not readable ({type(e).__name__})"
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        return None, "not a checkpoint of train.py"
    if not all_finite(ckpt["model"], ckpt["ema"]):
        return None, "its weights hold NaN or inf"
    return ckpt, None


def resume_checkpoint(run_dir, results_dir):
    """The checkpoint a run resumes from, its path added as "file": run_dir's ckpt-last.pt or, where
    that cannot be used, its newest milestone ckpt-NNNNNNN.pt that can, with a warning. No run_dir
    (none in results_dir), no checkpoint in it, or none that can be used: one clear line."""
    if not run_dir or not os.path.isdir(run_dir):
        raise SystemExit(f"--resume: no checkpoint found ({run_dir or 'no run folder in ' + results_dir})")
    milestones = [f for f in os.listdir(run_dir) if re.fullmatch(r"ckpt-\d+\.pt", f)]
    problems = []
    for name in ["ckpt-last.pt"] + sorted(milestones, key=lambda f: -int(f[5:-3])):
        path = os.path.join(run_dir, name)
        if os.path.lexists(path):
            ckpt, why = read_checkpoint(path)
            if ckpt is not None:
                if problems:
                    warnings.warn(f"--resume {run_dir}: {'; '.join(problems)}: resuming from {name} at step "
                                  f"{ckpt['step']} (ckpt-last.pt is kept aside)")
                return {**ckpt, "file": path}
            problems.append(f"{name}: {why}")
    if problems:
        raise SystemExit(f"--resume {run_dir}: no checkpoint to resume from: {'; '.join(problems)}")
    raise SystemExit(f"--resume: no checkpoint found in {run_dir}")


DIVERGED = 100.0  # a flow-matching loss above this is a diverged model's: the untrained model predicts zero
# velocity (its output layer starts at zero), which scores E[(x - eps)^2] = 1 + E[x^2] <= 2 on images in [-1, 1]


@torch.no_grad()
def weights_fault(model, ema, x, y, t_shift, step):
    """Why train.py must not save the weights it is about to (None: it may): NaN or inf in them or their
    EMA, or their flow-matching loss on the last batch x, y (fresh noise and t; bf16 on CUDA, as trained)
    not finite or above DIVERGED. The loss logged is that of the weights before the last update; this
    is that of the new ones. Under DDP every rank takes part and gets the same verdict."""
    if not all_finite(model.state_dict(), ema.state_dict()):
        return "the weights or their EMA hold NaN or inf (the update diverged)"
    with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
        loss = flow.training_losses(model, x, y, p_uncond=0, t_shift=t_shift,
                                    generator=torch.Generator(x.device).manual_seed(step))["fm"].float()
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    if not loss.item() <= DIVERGED:
        return f"the weights diverged: their loss on the last batch is {loss.item():.4g} (> {DIVERGED:g})"
    return None


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def model_config(args, num_classes, text_dim=None):
    """The model's name and constructor arguments, as checkpoints keep them."""
    kwargs = dict(head=args.head, **(dict(text_dim=text_dim, text_len=args.text_len) if text_dim else
                                     dict(num_classes=num_classes)))
    kwargs.update({k: getattr(args, k) for k in ("encoding", "nerf_norm", "nerf_width", "nerf_depth", "patch_size")
                   if getattr(args, k) is not None})
    return {"name": args.model, "kwargs": kwargs}


def init_weights(path):
    """The EMA weights of our checkpoint or of an official Lightning one (as official "emainit")."""
    src = torch.load(path, map_location="cpu", weights_only=True)
    return src["ema"] if "ema" in src else convert_official(src)


def all_finite(*state_dicts):
    """Whether no floating-point tensor of the state dicts holds NaN or inf."""
    return all(bool(torch.isfinite(v).all()) for sd in state_dicts for v in sd.values()
               if torch.is_tensor(v) and v.is_floating_point())


def read_weights(flag, path, load):
    """load(path) (a state dict or a module), where a missing file, one of another kind and weights
    that hold NaN or inf are one clear error naming the flag, raised before the run folder is made."""
    if not os.path.isfile(path):
        raise SystemExit(f"{flag} {path}: no such file")
    try:
        weights = load(path)
        finite = all_finite(weights.state_dict() if isinstance(weights, torch.nn.Module) else weights)
    except Exception as e:  # not a checkpoint at all, or of another model
        raise SystemExit(f"{flag} {path}: not a checkpoint this flag takes ({type(e).__name__}: {e})")
    if not finite:
        raise SystemExit(f"{flag} {path}: its weights hold NaN or inf (a diverged run's): take another file")
    return weights


def load_model(path, model_name=None, use_ema=True, trained_at=None):
    """(model, its training args) from our checkpoint or an official .ckpt; any other file, and
    weights that hold NaN or inf, are one clear error, not a traceback or black images. An official
    checkpoint records neither its model size nor the image size it was trained at: model_name and
    trained_at say them (text-to-image: 512 by default; class-to-image: no default, as the 256 and
    512 files look alike and the wrong size samples on the wrong token grid without an error)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"--ckpt {path}: no such file")
    except Exception as e:  # torch's own message may suggest weights_only=False: not repeated here
        raise SystemExit(f"--ckpt {path}: not a readable PyTorch checkpoint: cut short, or another kind of file "
                         f"({type(e).__name__})")
    if not isinstance(ckpt, dict):
        raise SystemExit(f"--ckpt {path}: not a PixNerd checkpoint (it holds a {type(ckpt).__name__})")
    try:
        if "model_config" in ckpt:  # ours
            config = ckpt["model_config"]
            if model_name and model_name != config["name"]:
                raise SystemExit(f"--ckpt {path} is a {config['name']} model, not --model {model_name}")
            model = MODELS[config["name"]](**config["kwargs"])
            weights, train_args = ckpt["ema" if use_ema else "model"], dict(ckpt["args"])
            if not isinstance(train_args["image_size"], int) or train_args["image_size"] < model.patch_size:
                raise ValueError(f"its image size {train_args['image_size']!r} is not a size")
            if trained_at and trained_at != train_args["image_size"]:
                raise SystemExit(f"--trained-at {trained_at}: --ckpt {path} was trained at {train_args['image_size']}")
        else:  # official: EMA weights are taken by convert_official when present
            weights = convert_official(ckpt if use_ema else {k: v for k, v in ckpt.get("state_dict", ckpt).items()
                                                             if not k.startswith("ema_denoiser.")})
            if "text_embed.weight" in weights:  # the t2i model, trained last at 512 px, no text mask
                model, train_args = MODELS[model_name or "XXL/16"](), {"image_size": trained_at or 512, "text_mask": False}
            elif not trained_at:
                raise SystemExit(f"--ckpt {path}: an official class-to-image checkpoint does not record the size it "
                                 "was trained at: pass --trained-at 256 (epoch=319-step=1600000_emainit.ckpt) or "
                                 "--trained-at 512 (res512_ft200k_..., which samples on a 32x32 token grid)")
            else:
                model = MODELS[model_name or "XL/16"](num_classes=weights["y_embedder.weight"].shape[0] - 1)
                train_args = {"image_size": trained_at}
            if trained_at and trained_at % model.patch_size:
                raise SystemExit(f"--trained-at {trained_at}: not a multiple of the model's patch size "
                                 f"{model.patch_size}")
        load_weights(model, weights)
    except ValueError as e:  # convert_official and load_weights say what does not fit
        hint = "" if "model_config" in ckpt else " (official checkpoints do not record their size: --model picks it)"
        raise SystemExit(f"--ckpt {path}: {e}{hint}")
    except Exception as e:  # a dict of something else, or a model config the model classes refuse
        raise SystemExit(f"--ckpt {path}: not a PixNerd checkpoint ({type(e).__name__}: {e})")
    if not all_finite(model.state_dict()):
        raise SystemExit(f"--ckpt {path}: its {'EMA' if use_ema else 'online'} weights hold NaN or inf, so every "
                         "image would be black: the run diverged before this checkpoint; take an earlier one")
    return model.eval().requires_grad_(False), train_args


def weights_hash(model):
    """A short sha256 of the weights: tells a retrained, overwritten or other checkpoint from the
    one whose images a sample folder holds, whatever its path or mtime."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------

_RENAMES = [  # (official prefix, ours), first match wins
    ("s_embedder.proj.", "patch_embed."), ("y_embedder.embedding_table.", "y_embedder."),
    ("y_embedder.proj.", "text_embed."), ("y_embedder.norm.", "text_norm."),
    ("x_embedder.embedder.0.", "head.embed."), ("final_layer.norm.", "head.norm_out."),
    ("final_layer.linear.", "head.out."), ("text_refine_blocks.", "text_blocks."),
]
_BLOCK_RENAMES = [("adaLN_modulation.0.", "adaLN."), ("attn.qkv_x.", "attn.qkv."),
                  ("attn.kv_y.", "attn.kv_text."), ("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2.")]


def convert_official(state_dict):
    """Map an official PixNerd state dict (a Lightning .ckpt, its "state_dict", with the
    `ema_denoiser.` or `denoiser.` prefix, or bare denoiser keys) to this model's keys.

    The EMA weights are taken when present. The transformer / neural-field split is read from
    the keys (transformer blocks have attention weights, neural-field blocks a parameter
    generator), so the XL tag/config mismatch (24 vs 26 blocks) cannot bite.
    """
    sd = state_dict.get("state_dict", state_dict)
    for prefix in ("ema_denoiser.", "denoiser.", ""):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if any(k.startswith(("blocks.", "s_embedder.")) for k in sub):
            break
    else:
        raise ValueError("not an official PixNerd state dict: no blocks.* / s_embedder.* keys")
    sub = {k: v for k, v in sub.items() if not k.startswith("diffusion_trainer.")}
    nerf_ids = sorted({int(k.split(".")[1]) for k in sub if ".param_generator1." in k})
    first_nerf = nerf_ids[0] if nerf_ids else None
    c2i_mlp = {k for k in sub if k.endswith("mlp.w1.weight")}

    out = {}
    for k, v in sub.items():
        new = k
        if k == "y_pos_embedding":
            new = "text_pos"
        for old, ours in _RENAMES:
            if k.startswith(old):
                new = ours + k[len(old):]
                break
        if k.startswith(("blocks.", "text_refine_blocks.")):
            i = int(k.split(".")[1])
            if k.startswith("blocks.") and first_nerf is not None and i >= first_nerf:
                new = f"head.blocks.{i - first_nerf}." + k.split(".", 2)[2]
                new = new.replace("param_generator1.0.", "generator.")
            elif k.endswith(("mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight")) and c2i_mlp:
                base = new.rsplit("mlp.", 1)[0]
                if k.endswith("w2.weight"):
                    new = base + "mlp.fc2.weight"
                elif k.endswith("w1.weight"):  # fc1 = [W1; W3]: gate first, then value
                    new, v = base + "mlp.fc1.weight", torch.cat([v, sub[k[:-len("w1.weight")] + "w3.weight"]])
                else:
                    continue  # consumed with w1
            else:
                for old, ours in _BLOCK_RENAMES:
                    new = new.replace(old, ours)
        out[new] = v
    return out


def load_weights(model, state_dict):
    """load_state_dict(strict=True) with one clear error naming the first bad key and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit this model: missing key {missing[:1]}, "
                         f"unexpected key {unexpected[:1]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in state_dict.items():
        if v.shape != own[k].shape:
            raise ValueError(f"checkpoint does not fit this model: {k} has shape {tuple(v.shape)} "
                             f"in the checkpoint but {tuple(own[k].shape)} in the model")
    model.load_state_dict(state_dict, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# Images and processes
# ---------------------------------------------------------------------------------------------

def to_uint8(x):
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C), rounding as the official fp2uint8."""
    return ((x.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(x, path, nrow=8):
    """Save images in [-1, 1] as one PNG grid with nrow images per row."""
    imgs = to_uint8(x).numpy()
    n, h, w, c = imgs.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = img
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, Image.fromarray(grid).save)


def setup_distributed():
    """(ddp, rank, world, device): torchrun's processes when launched by it (NCCL on CUDA, gloo
    on the CPU), else one process; TF32 matmuls on CUDA."""
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, device


def end_distributed():
    """Destroy the process group once nothing holds it. DDP keeps the group in reference cycles, and
    gloo aborts the process at exit ("terminate called without an active exception") when a DDP
    outlives the group; so call this after the function that made the DDP has returned."""
    gc.collect()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Checks of sample.py and fid.py: where they write, what fits in memory, what a rerun reuses
# ---------------------------------------------------------------------------------------------

def check_writable(flag, path, folder=False):
    """Stop with one line naming flag unless path (a file, or a folder if folder) can be written:
    no folder where a file goes or the reverse, nothing under a file, a folder this user may write
    in (tried, as permissions do not tell for root or a read-only mount). Missing folders are fine."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise SystemExit(f"{flag} {path}: is a {['folder', 'file'][folder]}, not a {['file', 'folder'][folder]}")
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SystemExit(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})")


def check_memory(what, nbytes, device):
    """Stop with one line when what (a phrase naming the flag) needs nbytes, a lower bound, and
    that is more than the whole memory of device (the GPU's, or the machine's RAM for the CPU):
    it could never run, and would end in a raw allocation error or swapping."""
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if nbytes > have:
        raise SystemExit(f"{what} needs at least {nbytes / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB "
                         f"of memory of this {device.type}")


def read_png(path, size):
    """The (H, W, 3) uint8 pixels of the PNG at path if it is whole, RGB and of size (H, W), else
    None (missing, empty, cut short, another size or kind): whether a rerun may reuse it."""
    try:
        with Image.open(path) as img:
            if img.format == "PNG" and img.mode == "RGB" and img.size == (size[1], size[0]):
                return np.asarray(img)  # decodes it all: a file cut short raises here
    except (OSError, SyntaxError, ValueError):
        pass
    return None


def write_npz(path, files, size):
    """The ADM evaluator's .npz (arr_0: uint8 (N, H, W, 3)) of the PNGs files, each checked, written
    atomically and one image at a time, so that 50K images never sit in memory at once."""
    def write(tmp):
        header = {"descr": "|u1", "fortran_order": False, "shape": (len(files), *size, 3)}
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as z, z.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for file in files:
                img = read_png(file, size)
                if img is None:
                    raise SystemExit(f"{file}: not a whole {size[1]}x{size[0]} RGB PNG: run sample.py again to redo it")
                f.write(img.tobytes())
    write_atomic(path, write)
