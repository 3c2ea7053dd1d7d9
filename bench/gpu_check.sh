#!/usr/bin/env bash
# The CUDA path and the GPU figures in one pass, on a machine with one GPU (about 9 minutes):
#   1. local trainer on cuda, Faster and Mask R-CNN (a short run each, metrics.json checked)
#   2. bench/throughput.py --device $device (Ray Data labeler and Ray Train worker on the GPU vs bare loops)
#   3. the quality grid (bench/quality.py) side by side on the GPU, sized to the time left, while
#      `ssod train` runs the demo config on Ray with the worker and the labeler sharing the GPU,
#      and the same config runs locally (the equivalence pair)
#
#   bash bench/gpu_check.sh OUT_DIR [SECONDS]          (DEVICE=cpu IMAGES=200 SHORT=6 for a dry run without a GPU)
set -u -o pipefail
out=$(mkdir -p "${1:-bench/results/gpu}" && cd "${1:-bench/results/gpu}" && pwd)
budget=${2:-520}
py=${PYTHON:-python}
device=${DEVICE:-cuda} images=${IMAGES:-2500} short=${SHORT:-60}
share=$([ "$device" = cuda ] && echo 0.5 || echo 0)  # the Ray run's worker and labeler split the one GPU
root=/tmp/ssod_gpu  # short: Ray's socket paths live under its temp dir
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
started=$SECONDS
left() { echo $((budget - (SECONDS - started))); }
log() { echo "== +$((SECONDS - started))s $*"; }

log "device"
$py -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1

log "data: $images synthetic images, 1 %, 5 % and 10 % splits"
coco=$root/coco
$py -m pipeline.cli synth $coco --images $images --seed 0 --masks >/dev/null || exit 1
for p in 1 5 10; do for s in 0 1; do
  $py -m pipeline.cli prepare --annotations $coco/train/annotations.json --images $coco/train/images \
    --val-annotations $coco/val/annotations.json --val-images $coco/val/images \
    --percent $p --seed $s --out $root/prepared_p${p}_s$s >/dev/null || exit 1
done; done
prepared=$root/prepared_p5_s0

log "1. local trainer on $device"
for arch in faster_rcnn mask_rcnn; do
  timeout 120 $py -m pipeline.cli train --config configs/demo.yaml --output $root/short_$arch \
    --set train.backend=local --set train.device=$device --set model.arch=$arch --set data.prepared=$prepared \
    --set train.steps=$short --set ssl.burn_in_steps=$((short / 2)) --set train.eval_period=$short --set data.eval_images=50 \
    --set tracking.enabled=false > $out/short_$arch.log 2>&1
  echo "$arch exit $?"; cp $root/short_$arch/metrics.json $out/short_$arch.metrics.json 2>/dev/null
  $py -c "import json,sys; m=json.load(open(sys.argv[1])); print({k: m[k] for k in ('steps','skipped_steps','pseudo_labels_per_image','train_steps_per_s')}, 'bbox AP', m['teacher']['bbox']['AP'], 'segm', m['teacher'].get('segm', {}).get('AP'))" $out/short_$arch.metrics.json
done
rate=$($py -c "import json,sys; print(json.load(open(sys.argv[1]))['train_steps_per_s'])" $out/short_faster_rcnn.metrics.json 2>/dev/null || echo 2)

log "2. throughput on $device"
timeout 150 $py bench/throughput.py --device $device --prepared $prepared --images 256 --steps 30 \
  --out $out/throughput.json > $out/throughput.log 2>&1
echo "exit $?"; tail -5 $out/throughput.log

# fourteen cells share the GPU and the cores: assume each runs 4x slower than alone
steps=$($py -c "import sys; r, t = float(sys.argv[1]), int(sys.argv[2]); print(max(400, min(4000, int(r * (t - 90) / 4) // 100 * 100)))" "$rate" "$(left)")
log "3. quality grid, $steps steps (burn-in $((steps / 2))), $(left)s left; Ray run + local twin alongside"
grid="--root $root --images $images --steps $steps --burn-in $((steps / 2)) --threads 1 --set train.device=$device"
$py bench/quality.py $grid --percents 1 5 10 --seeds 0 1 --jobs 12 --out $out/quality_faster.json > $out/quality_faster.log 2>&1 &
$py bench/quality.py $grid --arch mask_rcnn --percents 1 --seeds 0 --jobs 2 --out $out/quality_mask.json > $out/quality_mask.log 2>&1 &
pair="--config configs/demo.yaml --set data.prepared=$prepared --set tracking.enabled=false"
timeout $(($(left) - 20)) $py -m pipeline.cli train $pair --output $root/ray_gpu --set ray.gpus_per_worker=$share \
  --set ray.gpus_per_labeler=$share > $out/ray_gpu.log 2>&1 &
timeout $(($(left) - 20)) $py -m pipeline.cli train $pair --output $root/local_gpu --set train.backend=local \
  --set train.device=$device > $out/local_gpu.log 2>&1 &
while [ "$(jobs -r | wc -l)" -gt 0 ] && [ "$(left)" -gt 10 ]; do sleep 5; done
kill $(jobs -p) 2>/dev/null
for run in ray_gpu local_gpu; do cp $root/$run/metrics.json $out/$run.metrics.json 2>/dev/null; done
log "done"
tail -n 16 $out/quality_faster.log $out/quality_mask.log; tail -n 3 $out/ray_gpu.log $out/local_gpu.log
