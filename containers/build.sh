#!/bin/bash
# Build ttc.sif at the repo root; extra arguments go to `apptainer build`, e.g.
#   containers/build.sh --fakeroot --build-arg TORCH_CUDA=cu128
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec apptainer build "$@" ttc.sif containers/ttc.def
