#!/usr/bin/env bash
# The device kit, part 2: run ON THE GPU MACHINE (the device tool), from the repo root, with
# bench/device/wheels carried (made by pack.sh). In under 8 minutes it:
#   1. installs the carried wheels into a temporary folder (Ray, optuna, ...; torch is there),
#   2. runs the tests marked `gpu` (no host syncs in the training and Barlow Twins steps, the
#      optimizers' CUDA steps, the device loader on the GPU),
#   3. runs one Ray Tune grid of 2 short trials, each a TorchTrainer with 1 GPU worker (NCCL),
#      and checks the store: both completed, backend nccl, GPU throughput recorded; then 4
#      trials sharing the GPU (0.25 each) and their aggregate images/s against one alone,
#   4. runs bench/throughput.py on the GPU: ResNet-18 (CIFAR and ImageNet stems) at batch 512,
#      device-resident loader vs DataLoader, bf16 vs fp32, and the loaders alone.
# Everything it prints is the evidence; it also leaves logs under $OUT when that is set.
#
#   device run: carry ["bench/device/wheels"], timeout_s 560, command
#     "bash bench/device/check.sh"
set -uo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
site=${SITE:-/tmp/tvlars-site}
out=${OUT:-/tmp/tvlars-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
fail() { echo "FAILED: $*"; status=1; }

step "0. environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ -z "${SKIP_INSTALL:-}" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" bench/device/wheels/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$site/bin:$PATH"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "import torch, torchvision, ray; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || exit 1

step "1. tests marked gpu"
timeout 180 "$python" -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 \
  | tee "$out/gpu-tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "gpu tests"

step "2. a Ray Tune grid: 2 trials, each a TorchTrainer with 1 GPU worker (NCCL)"
space="$out/gpu-grid.yaml"
cat >"$space" <<'YAML'
description: device check - 2 short GPU trials
experiment: gpu-check
fixed: {ds: synthetic, train_subset: 20000, test_subset: 2000, model: resnet18, stem: cifar,
        epochs: 3, bs: 512, wd: 5.0e-4, sd: none}
grid:
  opt: {lars: {lr: 4.0}, tvlars: {lr: 4.0, lmbda: 1.0e-3}}
YAML
timeout 150 "$python" -m tvlars_ray.run grid --space "$space" --store "$out/store" \
  --overwrite --workers-per-trial 1 --gpus-per-worker 1 --cpus-per-worker 4 --no-report \
  2>&1 | tee "$out/grid.log" | grep -v "^\s*$" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "grid"
"$python" - "$out/store" <<'PY' || fail "grid store"
import sys
from tvlars_ray.store import read_epochs, read_trials
trials, epochs = read_trials(sys.argv[1], "gpu-check"), read_epochs(sys.argv[1], "gpu-check")
print(trials[["trial_id", "opt", "status", "final_test_acc", "use_gpu"]].to_string(index=False))
print(epochs[["trial_id", "epoch", "backend", "amp", "samples_per_s", "test_acc",
              "epoch_time_s"]].to_string(index=False))
assert len(trials) == 2 and set(trials["status"]) == {"completed"}, "both trials complete"
assert set(epochs["backend"]) == {"nccl"}, "DDP on NCCL"
assert trials["use_gpu"].all()
PY

step "2b. four trials packed on the one GPU (--gpus-per-worker 0.25) against one trial alone"
space="$out/gpu-pack.yaml"
cat >"$space" <<'YAML'
description: device check - 4 trials sharing one GPU
experiment: gpu-pack
fixed: {ds: synthetic, train_subset: 50000, test_subset: 2000, model: resnet18, stem: cifar,
        epochs: 6, bs: 512, wd: 5.0e-4, sd: none, opt: lars}
grid:
  lr: [1.0, 2.0, 3.0, 4.0]
YAML
timeout 60 "$python" -m tvlars_ray.run grid --space "$space" --store "$out/store" \
  --overwrite --workers-per-trial 1 --gpus-per-worker 0.25 --cpus-per-worker 3 --no-report \
  --dry-run 2>&1 | grep -E "trials per GPU|at a time" || fail "pack plan"
timeout 150 "$python" -m tvlars_ray.run grid --space "$space" --store "$out/store" \
  --overwrite --workers-per-trial 1 --gpus-per-worker 0.25 --cpus-per-worker 3 --no-report \
  2>&1 | tee "$out/pack.log" | grep -v "^\s*$" | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "packed grid"
"$python" bench/device/packed.py "$out/store" || fail "packed figures"

step "3. throughput on the GPU"
timeout 200 "$python" bench/throughput.py --device cuda --synthetic 2>&1 \
  | tee "$out/throughput.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "throughput"

step "done: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
