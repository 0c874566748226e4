#!/usr/bin/env bash
# The small-scale reproduction behind the README's "Results": PixNerd vs the linear-head Baseline,
# the coordinate encodings and the neural-field normalisations (paper Fig. 5, 6a, 6d), a learning
# curve, and a small text-to-image model, all on colour emoji at 64 px with 8 px patches.
#
#   apt-get install fonts-noto-color-emoji unicode-data
#   TEXT_CACHE=emoji_text.pt bash scripts/small_scale.sh       # ~9 minutes on one H100
#
# The six runs share one GPU at once; same seed, same data order, same steps. TEXT_CACHE holds the
# caption features (README: how to make it with a local MiniLM); without it the t2i run is skipped.
set -euo pipefail
R=${R:-results/small}; D=${D:-data/emoji/64}; STEPS=${STEPS:-1500}; N=${N:-1000}; SAMPLE_STEPS=${SAMPLE_STEPS:-50}
FONT=${FONT:-/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf}
EMOJI_TEST=${EMOJI_TEST:-/usr/share/unicode/emoji/emoji-test.txt}
mkdir -p "$R"
[ -d "$D" ] || python data/emoji.py --size 64 --skip-skin-tones --out "$D" --font "$FONT" --emoji-test "$EMOJI_TEST"
python -c "import datasets as t, numpy as np; t.cache_dataset(t.ImageFolder('$D', 64), '$R/emoji.npy', 4); \
t.cache_dataset(t.ImageFolder('$D', 64, captions=True), '$R/emoji_captions.npy', 4); \
np.savez('$R/emoji_ref.npz', arr_0=np.load('$R/emoji.npy'))"   # the FID reference: the training set

COMMON="--data-path $D --image-size 64 --global-batch-size ${BATCH:-128} --max-steps $STEPS --lr 2e-4 --ema-decay 0.998
        --log-every $(( (STEPS + 29) / 30 )) --ckpt-every $((STEPS / 3)) --milestone-every $((STEPS / 3))
        --sample-every $STEPS --sample-steps $SAMPLE_STEPS --num-workers 2"
run() { name=$1; shift; python train.py $COMMON --results-dir "$R/$name" "$@" > "$R/$name.log" 2>&1; }
run pixnerd   --model S/8 --cache "$R/emoji.npy" &
run baseline  --model S/8 --cache "$R/emoji.npy" --head linear &
run sincos    --model S/8 --cache "$R/emoji.npy" --encoding sincos &
run fc1       --model S/8 --cache "$R/emoji.npy" --nerf-norm fc1 &
run fc1_fc2   --model S/8 --cache "$R/emoji.npy" --nerf-norm fc1_fc2 &
[ -n "${TEXT_CACHE:-}" ] && run t2i --model T2I-S/8 --cache "$R/emoji_captions.npy" --text-cache "$TEXT_CACHE" --text-len 16 &
wait

# N samples per model for FID (Euler 50, no guidance: the learned distribution itself), class-balanced
ckpt() { ls "$R/$1"/*/"$2"; }
for name in pixnerd baseline sincos fc1 fc1_fc2; do
  python sample.py --ckpt "$(ckpt $name ckpt-last.pt)" --num-samples "$N" --batch-size 250 --cfg-scale 1 --steps "$SAMPLE_STEPS" \
    --sample-dir "$R/fid_$name"
done
for step in $(printf "%07d %07d" $((STEPS / 3)) $((2 * STEPS / 3))); do
  python sample.py --ckpt "$(ckpt pixnerd ckpt-$step.pt)" --num-samples "$N" --batch-size 250 --cfg-scale 1 --steps "$SAMPLE_STEPS" \
    --sample-dir "$R/fid_pixnerd_$step"
done
# grids: the first 5 training images of each class, 5 samples per class with the default CFG 3.5,
# and 4 per prompt (seen and unseen in training) with the official t2i sampler (Adams-2, 25 steps)
python -c "import numpy as np, torch, checkpoints; a, l = np.load('$R/emoji.npy'), np.load('$R/emoji.labels.npy'); \
x = torch.from_numpy(a[[i for c in range(9) for i in np.flatnonzero(l == c)[:5]]]).permute(0, 3, 1, 2); \
checkpoints.save_grid(x.float() / 127.5 - 1, '$R/grid_real.png', nrow=5)"
for name in pixnerd baseline; do
  python sample.py --ckpt "$(ckpt $name ckpt-last.pt)" --class-labels 0 1 2 3 4 5 6 7 8 \
    --images-per-condition 5 --steps "$SAMPLE_STEPS" --out "$R/grid_$name.png"
done
[ -n "${TEXT_CACHE:-}" ] && python sample.py --ckpt "$(ckpt t2i ckpt-last.pt)" --text-cache "$TEXT_CACHE" \
  --prompt "red apple" --prompt "rocket" --prompt "grinning cat" --prompt "purple heart" \
  --prompt "blue apple" --prompt "red cat" --prompt "green car" --prompt "yellow apple" \
  --images-per-condition 4 --steps 25 --solver adams2 --out "$R/t2i_prompts.png"
# FID of each sample set against the training images (the README ran these on the CPU):
#   for f in "$R"/fid_*.npz; do python fid.py "$f" "$R/emoji_ref.npz"; done
echo done
