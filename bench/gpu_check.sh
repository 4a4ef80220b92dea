#!/usr/bin/env bash
# The GPU figures of the README in one go, ~10 minutes on one H100 / H200, from the repository root of a machine
# with torch and transformers installed:  bash bench/gpu_check.sh   (logs go to $OUT, default /tmp/gpu_check)
# 1. Florence-2 base training step, bf16 autocast + torch.compile, fixed batch: samples/s and MFU.
# 2. Labelling throughput, ours vs transformers `generate`, fp32 / bf16 / bf16 with our decoder compiled,
#    batch 1 and 8, with the fp32 ids checked identical.
# 3. The toy UniCL run end to end on the GPU (bf16, train.py's MFU in its progress line).
# Each part has its own time limit, so one that hangs leaves the others their time; logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
BENCH_DEVICE=cuda timeout 200 python3 bench/bench.py florence2_train 2>&1 | grep -v Warning | tee "$OUT/train.log"
BENCH_DEVICE=cuda BENCH_COMPILE=1 timeout 250 python3 bench/bench.py florence2_label 2>&1 | grep -v Warning \
    | tee "$OUT/label.log"
timeout 100 python3 train.py --device=cuda --max_iters=200 --log_interval=50 --out_dir=/tmp/unicl 2>&1 \
    | tee "$OUT/unicl.log"
