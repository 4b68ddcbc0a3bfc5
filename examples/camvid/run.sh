#!/usr/bin/env bash
# CamVid (SegNet 11-class version) through the whole pipeline on a CPU, at a reduced resolution:
# regular cross-entropy vs inverse-class-proportion weights vs instance-uncertainty weighting.
# About half an hour to an hour on 2 CPU cores with the settings below (more when the cores are
# shared). Usage:
#   CAMVID=/path/to/camvid OUT=runs/camvid [EPOCHS=8 SIZE=144x192 DEVICE=cpu] bash examples/camvid/run.sh
set -euo pipefail
CAMVID=${CAMVID:-$(cd "$(dirname "$0")/../.." && pwd)/data/camvid}  # iumask download camvid --out data/camvid (docs/download.md)
OUT=${OUT:-runs/camvid}
EPOCHS=${EPOCHS:-8}
SIZE=${SIZE:-144x192}
DEVICE=${DEVICE:-cpu}
mkdir -p "$OUT"

# Random-init encoders (no download here): lr 1e-3 everywhere, 144x192 (0.4x of 360x480, sides
# divisible by 16), batch 8, default augmentation (scale 0.5-2, flip, colour jitter).
TRAIN=(--data "$CAMVID" --format camvid --epochs "$EPOCHS" --batch-size 8 --lr 1e-3
       --backbone-lr-factor 1 --device "$DEVICE")

start=$(date +%s)
# 1. The ensemble that estimates uncertainty (also the "regular" MobileNetV2 of the table).
iumask train-baseline "${TRAIN[@]}" --size "$SIZE" --out "$OUT/baseline" \
    --encoder mobilenet_v2 --encoder resnet18 --encoder efficientnet-b0
# 2. Entropy and instance-uncertainty masks of the 367 training images.
iumask make-masks --ensemble "$OUT/baseline" --data "$CAMVID" --format camvid --store "$OUT/masks.zarr" \
    --device "$DEVICE"
# 3. The paper's Table 2 baseline: inverse class proportions.
iumask train-baseline "${TRAIN[@]}" --size "$SIZE" --out "$OUT/inverse" --encoder mobilenet_v2 \
    --class-weights inverse
# 4. IU weighting, (1 + IU)^2.
iumask train-weighted "${TRAIN[@]}" --store "$OUT/masks.zarr" --out "$OUT/iu" --encoder mobilenet_v2 --exponent 2
# 5. All on the test split at native resolution (360x480, logits upsampled).
iumask evaluate --data "$CAMVID" --format camvid --split test --device "$DEVICE" \
    --model "$OUT/baseline/mobilenet_v2" --model "$OUT/inverse/mobilenet_v2" --model "$OUT/iu/mobilenet_v2" \
    --model "$OUT/baseline/ensemble.json" --output "$OUT/results.json"
echo "wall time: $(( $(date +%s) - start )) s"
