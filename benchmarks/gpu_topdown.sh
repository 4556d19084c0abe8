#!/bin/bash
# The GPU rows of docs/cifar10_topdown.md, for a lent device:
#   benchmarks/gpu_topdown.sh DATA.tar.gz OUT_DIR [TRAIN_SECONDS] [VARIANT]
# 1. the pace of configs/cifar10_topdown.py:VARIANT (benchmarks/throughput.py, real images);
# 2. a training run of TRAIN_SECONDS wall time (SIGTERM then saves a checkpoint, so a later
#    device session resumes it with the same command), then the evaluate command on its
#    checkpoint (test bits/dim and the IWAE bound with K = 10).
set -euo pipefail
data=$1; out=$2; seconds=${3:-300}; variant=${4:-gpu}
config="configs/cifar10_topdown.py:$variant"
source_flags="--config.data.source=folder --config.data.path=$data --config.log.progress=False"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/device.txt" 2>&1 || true
python benchmarks/throughput.py --config "$config" $source_flags --data_path "$data" \
  --epochs 2 --steps 50 --eval_repeats 1 | tee "$out/throughput.txt"
timeout -s TERM "$seconds" python train.py --config "$config" --workdir "$out/run" \
  $source_flags --config.eval.every_steps=2000 > "$out/train.log" 2>&1 \
  || echo "training stopped after ${seconds}s (exit $?)" >> "$out/train.log"
tail -n 5 "$out/train.log"
python -m jaxvae.evaluate --workdir "$out/run" --iw_samples 10 > "$out/eval.txt" 2>&1 || true
tail -n 20 "$out/eval.txt"
