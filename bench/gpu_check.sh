#!/usr/bin/env bash
# The CUDA path and the long 1 % cells in one pass that fits a lease (one GPU, 2 exposed cores, under 12 minutes):
#   0. data: the synthetic set and the 1 % splits of seeds 0 and 1, made here (`ssod synth` of 2,500 images takes
#      seconds once its process pool is sized by the usable cores) unless DATA points at a carried folder
#   1. the local trainer on cuda, Faster and Mask R-CNN (a short run each, metrics.json checked)
#   2. bench/quality.py: the two 1 % cells, supervised vs Unbiased Teacher with the configured defaults,
#      two processes at a time (the 2 cores decode and augment), as many steps as the time left allows
#      (at most STEPS), evaluated every EVAL steps; bench/drift.py draws their curves
#
#   bash bench/gpu_check.sh OUT_DIR [SECONDS]       (DEVICE=cpu IMAGES=200 SHORT=6 STEPS=40 for a dry run without a GPU)
set -u -o pipefail
out=$(mkdir -p "${1:-bench/results/gpu}" && cd "${1:-bench/results/gpu}" && pwd)
budget=${2:-660}
py=${PYTHON:-python}
device=${DEVICE:-cuda} images=${IMAGES:-2500} short=${SHORT:-60} max_steps=${STEPS:-4000} eval=${EVAL:-500}
root=${DATA:-/tmp/ssod_gpu}  # short: Ray's socket paths live under its temp dir
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
started=$SECONDS
left() { echo $((budget - (SECONDS - started))); }
log() { echo "== +$((SECONDS - started))s $*"; }

log "device"
$py -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1

log "0. data under $root"
coco=$root/coco
[ -f $coco/val/annotations.json ] || $py -m pipeline.cli synth $coco --images $images --seed 0 --masks >/dev/null || exit 1
for s in 0 1; do
  [ -f $root/prepared_p1_s$s/split.json ] || $py -m pipeline.cli prepare --annotations $coco/train/annotations.json \
    --images $coco/train/images --val-annotations $coco/val/annotations.json --val-images $coco/val/images \
    --percent 1 --seed $s --out $root/prepared_p1_s$s >/dev/null || exit 1
done

log "1. local trainer on $device"
for arch in faster_rcnn mask_rcnn; do
  timeout 120 $py -m pipeline.cli train --config configs/demo.yaml --output $root/short_$arch \
    --set train.backend=local --set train.device=$device --set model.arch=$arch --set data.prepared=$root/prepared_p1_s0 \
    --set train.steps=$short --set ssl.burn_in_steps=$((short / 2)) --set train.eval_period=$short --set data.eval_images=50 \
    --set tracking.enabled=false > $out/short_$arch.log 2>&1
  echo "$arch exit $?"; cp $root/short_$arch/metrics.json $out/short_$arch.metrics.json 2>/dev/null
  $py -c "import json,sys; m=json.load(open(sys.argv[1])); print({k: m[k] for k in ('steps','skipped_steps','pseudo_labels_per_image','train_steps_per_s')}, 'bbox AP', m['teacher']['bbox']['AP'], 'segm', m['teacher'].get('segm', {}).get('AP'))" $out/short_$arch.metrics.json
done
rate=$($py -c "import json,sys; print(json.load(open(sys.argv[1]))['train_steps_per_s'])" $out/short_faster_rcnn.metrics.json 2>/dev/null || echo 2)

# Two processes share the 2 cores (each at about half the single-run rate); burn-in (300 steps) runs once per
# seed, then the four arms two at a time: steps = burn-in + what half the rate buys in half the time left.
steps=$($py -c "import sys; r, t, m = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); print(max(400, min(m, 300 + int(r / 2 * (t - 60 - 300 / (r / 2)) / 2) // 100 * 100)))" "$rate" "$(left)" "$max_steps")
log "2. the 1 % cells of seeds 0 and 1 to $steps steps (burn-in 300), $(left)s left"
timeout $(($(left) - 15)) $py bench/quality.py --root $root --images $images --percents 1 --seeds 0 1 --steps $steps \
  --burn-in 300 --eval-period $eval --jobs 2 --threads 1 --set train.device=$device --out $out/quality_p1.json \
  > $out/quality_p1.log 2>&1
echo "exit $?"; tail -n 6 $out/quality_p1.log
$py bench/drift.py $out/quality_p1.json --out $out 2>/dev/null
log "done"
