#!/usr/bin/env bash
# The GPU checks, on one CUDA device, in under 10 minutes: the tests marked `gpu` (bf16 + gradient checkpointing +
# LoRA, 4-bit weights, the decoding loop against generate(), the shared prompt pass against each row alone), then
# the shaped benchmark: Qwen2.5-Coder-1.5B's whole shape in bf16, ttc against TRL, times against their floors.
# Needs: a CUDA GPU and `pip install -e ".[test,bench]"`. Run: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -m pytest -q -m gpu tests
python benchmarks/compare_trl.py --sizes qwen-1.5b --device cuda --layers 0 --rounds 1 --steps 2 \
    --output runs/bench/gpu_check.json
