"""Files every script shares: checkpoints (ours and the official ones), run folders, image grids,
and the process setup of train.py and sample.py.

One atomic writer serves every file a run writes, so that a kill at any moment leaves the old file
or the new one, never half of one.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from model import MODELS


def write_atomic(path, write):
    """write(temporary path), fsync, rename it to path: a kill at any moment leaves the old file or
    the new one, never a torn one. The temporary name is this process's own (all ranks may write
    one file at once) and keeps the extension, which PIL and numpy go by: NAME.<pid>.tmp.EXT."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C leaves no temporary file (a kill does: see rewind_run)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(obj, path):
    """torch.save(obj, path), atomically."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


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
    """Make the next run folder, NNN-MODEL with NNN one above the highest so far."""
    os.makedirs(results_dir, exist_ok=True)
    last = newest_run(results_dir)
    run_dir = os.path.join(results_dir, f"{run_number(os.path.basename(last)) + 1 if last else 0:03d}-"
                                        f"{model_name.replace('/', '-')}")
    os.makedirs(run_dir)
    return run_dir


def rewind_run(run_dir, step):
    """Forget what an interrupted run did after its checkpoint at step: the temporary files of a
    write a kill cut short, and the metrics of later steps (a last line cut off included)."""
    for f in os.listdir(run_dir):
        if is_temporary(f):
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


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

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


def load_model(path, model_name=None, use_ema=True, trained_at=None):
    """(model, its training args) from our checkpoint or an official .ckpt; any other file is one
    clear error, not a traceback. An official checkpoint records neither its model size nor the
    image size it was trained at: model_name and trained_at (default 256 for class-to-image, 512
    for text-to-image) say them."""
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
            weights, train_args = ckpt["ema" if use_ema else "model"], ckpt["args"]
            if trained_at and trained_at != train_args["image_size"]:
                raise SystemExit(f"--trained-at {trained_at}: --ckpt {path} was trained at {train_args['image_size']}")
        else:  # official: EMA weights are taken by convert_official when present
            weights = convert_official(ckpt if use_ema else {k: v for k, v in ckpt.get("state_dict", ckpt).items()
                                                             if not k.startswith("ema_denoiser.")})
            if "text_embed.weight" in weights:  # the t2i model, trained last at 512 px, no text mask
                model, train_args = MODELS[model_name or "XXL/16"](), {"image_size": trained_at or 512, "text_mask": False}
            else:  # 256, or 512 for the official res512_ft200k checkpoint (a 32x32 token grid)
                model = MODELS[model_name or "XL/16"](num_classes=weights["y_embedder.weight"].shape[0] - 1)
                train_args = {"image_size": trained_at or 256}
        load_weights(model, weights)
    except ValueError as e:  # convert_official and load_weights say what does not fit
        hint = "" if "model_config" in ckpt else " (official checkpoints do not record their size: --model picks it)"
        raise SystemExit(f"--ckpt {path}: {e}{hint}")
    except (AttributeError, KeyError, TypeError) as e:  # a dict of something else
        raise SystemExit(f"--ckpt {path}: not a PixNerd checkpoint ({type(e).__name__}: {e})")
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
