"""Fashion-MNIST as an ImageFolder of PNGs, the small class-to-image set for train.py.

    apt-get install dataset-fashion-mnist
    python data/fashion_mnist.py                 # -> data/fashion_mnist/train/<k>_<name>/<index>.png
    python data/fashion_mnist.py --split test    # -> data/fashion_mnist/test/...

Output: OUT/<k>_<name>/<index>.png, one folder per class, where <k> is the label so that the
sorted folder order (which ImageFolder turns into class indices) equals the Fashion-MNIST label
order; <index> is the image's position in the IDX file.

Why resize rather than pad: 28 is not a multiple of our patch sizes, 32 is. Padding 28 -> 32 with
black would be lossless, but only works for sizes >= 28 and shrinks the garment inside the frame;
a BICUBIC resize keeps the framing of the original for any --size (32, 64, ...), and --size 28
copies the pixels unchanged. Saved as RGB because the model has 3 input channels.

The IDX files are parsed here with gzip + numpy (no torchvision), so this runs anywhere.
"""
import argparse
import gzip
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

SRC = "/usr/share/datasets/fashion-mnist"
APT = "apt-get install dataset-fashion-mnist"
PREFIX = {"train": "train", "test": "t10k"}  # file name prefix of each split
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def read_idx(path):
    """Read one gzipped IDX file (unsigned-byte data) into a numpy array of its stored shape."""
    try:
        with gzip.open(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError) as e:  # a truncated download, or not gzip at all
        raise SystemExit(f"error: {path}: unreadable ({type(e).__name__}: {e}); reinstall it")
    # header: two zero bytes, the type code (0x08 = ubyte), the number of dims, then each dim
    # as a big-endian int32
    if buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {buf[:4].hex()})")
    ndim = buf[3]
    shape = tuple(int(d) for d in np.frombuffer(buf, ">i4", ndim, offset=4))
    data = np.frombuffer(buf, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def load_split(src, split):
    """Return (images uint8 [N, 28, 28], labels uint8 [N]) of one split."""
    paths = [os.path.join(src, f"{PREFIX[split]}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: missing {', '.join(missing)}; install it with: {APT}")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def to_rgb(img, size):
    """A 28x28 grayscale array -> size x size RGB PIL image (BICUBIC, no-op when size is 28)."""
    im = Image.fromarray(img)  # uint8 [H, W] -> mode "L"
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return im.convert("RGB")


def class_dirs():
    """Folder names that sort in label order: 0_t-shirt_top ... 9_ankle_boot."""
    return [f"{k}_{name}" for k, name in enumerate(CLASSES)]


def write_image_folder(images, labels, out, size, limit=None):
    """Write OUT/<class>/<index>.png; keep the first `limit` images of each class. Returns counts."""
    dirs = class_dirs()
    for d in dirs:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    counts = [0] * len(dirs)
    width = len(str(len(images) - 1))  # zero-pad so that file names sort in index order
    for i, (img, y) in enumerate(tqdm(zip(images, labels), total=len(images), desc=out)):
        y = int(y)
        if limit is not None and counts[y] >= limit:
            continue
        to_rgb(img, size).save(os.path.join(out, dirs[y], f"{i:0{width}d}.png"))
        counts[y] += 1
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--out", default=None, help="default: data/fashion_mnist/<split> next to this script")
    p.add_argument("--size", type=int, default=32, help="output side in pixels")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N images per class")
    p.add_argument("--src", default=SRC, help="folder holding the *-ubyte.gz files")
    args = p.parse_args(argv)
    if args.size < 1 or (args.limit is not None and args.limit < 1):
        p.error("--size and --limit must be at least 1")

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist", args.split)
    images, labels = load_split(args.src, args.split)
    # a rerun with a smaller --limit would otherwise leave stale images behind
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"error: {out} is not empty; remove it first")
    counts = write_image_folder(images, labels, out, args.size, args.limit)
    print(f"wrote {sum(counts)} images of {args.size}x{args.size} in {len(counts)} classes to {out}")
    for d, n in zip(class_dirs(), counts):
        print(f"  {d:15s} {n}")
    return counts


if __name__ == "__main__":
    main()
