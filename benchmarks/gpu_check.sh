#!/usr/bin/env bash
# The GPU checks on one CUDA device, as independent sections: one that fails, times out or lacks a package is
# reported and the next one runs. Each writes its log (and its results) to OUT_DIR; OUT_DIR/summary.txt has a line
# per section. The whole run keeps within BUDGET seconds (default 540): a section starts only with its time limit
# left, else it is reported as skipped. Exit status 0 when every section passed or was skipped, 1 when one failed or
# timed out, 2 for a bad BUDGET or OUT_DIR, 143 when stopped.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default runs/gpu_check
#
# Sections, most important first: env (GPU, versions, missing packages), floor (bf16 matmul peak, read bandwidth),
# tests (the `gpu`-marked tests), model (Qwen2.5-Coder-1.5B-Instruct's whole shape with random weights, built once),
# decode (each decoding path's tokens/s next to the sampling floor), fit (3 steps of configs/patch.yaml on that
# model: bf16, gradient checkpointing, LoRA), trl (compare_trl.py at that shape), qlora (4-bit fit, resume, export).
# Needs: a CUDA GPU, torch, transformers, peft, lightning, pytest; the rest (`pip install -e ".[test,bench]"`) is
# needed by some sections only, which say so. On a machine without network, benchmarks/README.md says which wheels
# to bring and how.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
die() {
    echo "gpu_check.sh: $*" >&2
    exit 2
}
budget=${BUDGET:-540}
[[ $budget =~ ^[0-9]+$ ]] || die "BUDGET must be a whole number of seconds, got '$budget'"
mkdir -p "${1:-runs/gpu_check}" 2>/dev/null || die "cannot create the output directory ${1:-runs/gpu_check}"
out=$(cd "${1:-runs/gpu_check}" && pwd) || die "cannot enter the output directory ${1:-runs/gpu_check}"
work=$(mktemp -d "${TMPDIR:-/tmp}/ttc-gpu-check.XXXXXX") || die "cannot create a scratch directory"
summary="$out/summary.txt"
: >"$summary" || die "cannot write $summary"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
export out work python
failures=0
group=""

# Stopped (Ctrl-C, SIGTERM): the running section's whole process group goes too, and the scratch directory.
stop() {
    [[ -n $group ]] && kill -KILL -- "-$group" 2>/dev/null
    rm -rf "$work"
    echo "gpu_check.sh: stopped" | tee -a "$summary" >&2
    exit 143
}
trap stop INT TERM

# section NAME LIMIT FUNCTION: run FUNCTION (defined below, exported) in a process group of its own with LIMIT
# seconds, its output in OUT_DIR/NAME.log; at the limit the group gets SIGTERM, 10 s later SIGKILL, and whatever it
# left running is killed when it ends (a trainer that defers SIGTERM to the end of its step would hold the GPU into
# the next section). Exit 77 = skipped, with the reason as the log's last line.
section() {
    local name=$1 limit=$2 function=$3
    local left=$((budget - SECONDS))
    if ((left < limit)); then
        echo "$name: skipped: ${left} s of the budget left, the section needs up to ${limit} s" | tee -a "$summary"
        return
    fi
    local started=$SECONDS rc=0 expired="$work/.expired-$name"
    setsid bash -c "set -o pipefail; $function" >"$out/$name.log" 2>&1 &
    group=$!
    (
        sleep "$limit"
        touch "$expired"
        kill -TERM -- "-$group" 2>/dev/null
        sleep 10
        kill -KILL -- "-$group" 2>/dev/null
    ) &
    local watchdog=$!
    wait "$group" || rc=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    kill -KILL -- "-$group" 2>/dev/null
    group=""
    local status=passed
    if [[ -e $expired ]]; then
        status="timed out after ${limit} s"
    else
        case $rc in
            0) ;;
            77) status="skipped: $(tail -n 1 "$out/$name.log")" ;;
            *)
                local why
                why=$(grep -E 'Error|error:|FAILED|ttc:' "$out/$name.log" | tail -n 1)
                status="failed (exit $rc): ${why:-$(tail -n 1 "$out/$name.log")}"
                ;;
        esac
    fi
    [[ $status == passed || $status == skipped* ]] || failures=$((failures + 1))
    echo "$name: $status ($((SECONDS - started)) s)" | tee -a "$summary"
}

needs() { # needs MODULE...: exit 77 naming the first one missing
    "$python" - "$@" <<'EOF'
import importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
if missing:
    print(f"missing Python packages: {', '.join(missing)}")
    sys.exit(77)
EOF
}

env_check() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
    "$python" - <<'EOF'
import importlib.metadata as md
import importlib.util
import sys
import torch
names = ["transformers", "peft", "lightning", "jsonargparse", "rich", "datasets", "wandb", "tree_sitter",
         "tree_sitter_c", "tree_sitter_cpp", "bitsandbytes", "trl", "pytest", "psutil"]
for name in names:
    found = importlib.util.find_spec(name) is not None
    version = md.version(name.replace("_", "-")) if found else "MISSING"
    print(f"{name}: {version}")
if not torch.cuda.is_available():
    print(f"torch {torch.__version__}: no CUDA device")
    sys.exit(77)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name()}")
EOF
}

tests() {
    needs torch pytest jsonargparse tree_sitter || exit 77
    "$python" -m pytest -q -p no:cacheprovider -m gpu tests/integration/test_gpu.py -o addopts="" \
        --junitxml="$out/tests.xml" || exit
    if ! grep -q ' passed' <(tail -n 3 "$out/tests.log"); then
        echo "every gpu test was skipped: no CUDA device"
        exit 77
    fi
}

build_model() {
    needs torch transformers || exit 77
    "$python" -c "from ttc_lightning.model.tiny import save_qwen_shaped; save_qwen_shaped('$work/model', '1.5b')"
}

# 3 optimizer steps of the main job on the whole 1.5B shape; completions capped at 128 tokens to fit the budget.
fit() {
    needs torch jsonargparse tree_sitter || exit 77
    test -f "$work/model/config.json" || { echo "no model: the model section did not finish" && exit 77; }
    "$python" -m ttc_lightning fit --config configs/patch.yaml --model.model_name_or_path "$work/model" \
        --data.data_path ttc_lightning/assets/primevul_sample --trainer.default_root_dir "$work/fit" \
        --trainer.max_steps 3 --model.max_new_tokens 128 --model.overlong_buffer.length 32 \
        --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false &&
        cp "$work"/fit/logs/version_0/metrics.csv "$out/fit_metrics.csv"
}

decode_speed() {
    needs torch transformers || exit 77
    test -f "$work/model/config.json" || { echo "no model: the model section did not finish" && exit 77; }
    "$python" benchmarks/decode_speed.py --device cuda --model-dir "$work/model" --output "$out/decode_speed.json"
}

trl() {
    needs torch trl datasets psutil || exit 77
    "$python" benchmarks/compare_trl.py --sizes qwen-1.5b --device cuda --layers 0 --rounds 1 --steps 2 \
        --output "$out/compare_trl.json"
}

# 4-bit weights + LoRA: 2 steps, a resume to step 3 from the last checkpoint, and an adapter export.
qlora() {
    needs torch bitsandbytes jsonargparse tree_sitter || exit 77
    test -f "$work/model/config.json" || { echo "no model: the model section did not finish" && exit 77; }
    local run=("$python" -m ttc_lightning fit --config configs/patch.yaml --model.model_name_or_path "$work/model"
        --data.data_path ttc_lightning/assets/primevul_sample --trainer.default_root_dir "$work/qlora"
        --model.load_in_4bit true --model.max_new_tokens 32 --model.overlong_buffer.length 8
        --checkpoint.every_n_train_steps 1 --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false)
    "${run[@]}" --trainer.max_steps 2 &&
        "${run[@]}" --trainer.max_steps 3 --ckpt_path last &&
        "$python" -m ttc_lightning export --ckpt_path "$work/qlora" --output_dir "$work/qlora-export" &&
        ls -l "$work/qlora-export"
}

floor() {
    needs torch || exit 77
    "$python" benchmarks/floor.py --cuda --json >"$work/floor.json" && mv "$work/floor.json" "$out/floor.json" &&
        cat "$out/floor.json"
}

export -f needs env_check floor tests build_model fit decode_speed trl qlora
section env 60 env_check
section floor 60 floor
section tests 180 tests
section model 120 build_model
section decode 150 decode_speed
section fit 150 fit
section trl 200 trl
section qlora 150 qlora
echo "total: $SECONDS s, $failures section(s) failed or timed out" | tee -a "$summary"
rm -rf "$work"
((failures == 0))
