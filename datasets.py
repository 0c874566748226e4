"""The training data: an image folder (classes or captions), its preprocessed uint8 cache, the
built-in shapes, and the sampler that makes the data order a pure function of (seed, epoch)."""
import json
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from checkpoints import check_writable, write_atomic

IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def center_crop_adm(img, size):
    """ADM's centre crop (official src/data/dataset/imagenet.py: center_crop_fn): box-downsample by 2
    while the short side >= 2 size, bicubic-resize the short side to size (up for small images),
    centre-crop. -> uint8 HWC."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y: y + size, x: x + size]


def walk(root):
    """(folder, its file names) for every folder under root, sorted, following symbolic links as
    torchvision's ImageFolder does (class folders are often links); a link to a folder already on
    the way down to it is not entered, so a loop of links cannot make the walk endless."""
    found, above = [], {}  # above: the real paths on the way down to each folder still to be walked
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        way = above.pop(dirpath, frozenset()) | {os.path.realpath(dirpath)}
        dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in way]
        above.update((os.path.join(dirpath, d), way) for d in dirnames)
        found.append((dirpath, sorted(files)))
    return sorted(found)


class ImageFolder(Dataset):
    """One subfolder per class, or (captions=True) any images that have a same-named .txt caption.
    Items are (uint8 CHW image, label or caption index, number of unreadable files skipped to
    produce it). `classes` lists the class names, or the distinct captions. Any PIL mode is
    converted to RGB; a corrupt file is replaced by the next readable one with a warning."""

    def __init__(self, root, size, captions=False):
        if not os.path.isdir(root):
            raise SystemExit(f"--data-path {root!r} is not a directory")
        self.root, self.size, self.files, names = root, size, [], []
        for dirpath, files in walk(root):
            for f in files:
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
        for d in [] if captions else sorted(set(os.listdir(root)) - set(self.classes)):
            if os.path.isdir(os.path.join(root, d)) or not os.path.exists(os.path.join(root, d)):
                warnings.warn(f"--data-path {root}: class folder {d} holds no image (or is a broken link): "
                              "it is left out, so it has no label and the classes after it take lower ones")
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
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers,
                        generator=torch.Generator())  # leaves the global RNG, so the model init, alone
    n, s = len(dataset), dataset.size

    def write(tmp):  # the labels and the .json first: the array's name says all three are there
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
    check_writable("--cache", path)  # not under a file, nor in a folder this user may not write in
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, write, f"--cache {path}")


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


def training_data(data_path, size, captions, cache, hflip, num_workers, rank=0, world=1):
    """What train.py trains on: the built-in shapes without data_path, else the image folder (read
    through its uint8 cache when one is given: rank 0 makes it once), mirrored too with hflip. A
    folder of which no image can be read, or with fewer images than processes, is one clear error."""
    if not data_path:
        dataset = Shapes(size)
    else:
        dataset = ImageFolder(data_path, size, captions)
        if len(dataset) < world:
            raise SystemExit(f"--data-path {data_path}: {len(dataset)} images for {world} processes")
        try:
            dataset[0]  # the first readable one: all of them are tried
        except RuntimeError:
            raise SystemExit(f"--data-path {data_path}: none of its {len(dataset)} image files can be read")
        if cache:
            if not cache.endswith(".npy"):
                raise SystemExit(f"--cache {cache}: must be a .npy file")
            if not os.path.exists(cache) and rank == 0:
                cache_dataset(dataset, cache, num_workers)
            if dist.is_initialized():
                dist.barrier()
            dataset = open_cache(cache, dataset)
    return Flipped(dataset) if hflip else dataset
