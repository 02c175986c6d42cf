#!/usr/bin/env bash
# Everything issue 8 measures on a GPU, in stages, each writing its results under OUT_DIR:
#
#   benchmarks/gpu_suite.sh OUT_DIR [env] [tests] [throughput] [budgets]   (default: all four)
#
#   env         the GPU, driver, torch/CUDA and the versions of the packages the backends use
#               (transformer_engine and flash_attn included: they change the megatron figures)
#   tests       pytest -m gpu over the GPU test files            -> pytest.log, pytest.xml
#   throughput  benchmarks/throughput.py, 1B model, micro-batch 4 and 8 -> throughput-mb*.json
#               (or one of them: throughput-mb4, throughput-mb8)
#   budgets     benchmarks/training_budgets.py for both backends -> budgets-*.json
#               (or one of them: budgets-deepspeed, budgets-megatron)
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3). The GPU test files
# import neither Ray nor Slurm, so a machine with the trainer's packages but no Ray can run them.
# A stage that fails is reported and the next one still runs; the exit status is that of the
# last failure.
set -u
out=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [env] [tests] [throughput] [budgets]}
shift
stages=${*:-env tests throughput budgets}
for s in $stages; do  # every name checked before anything runs
    case $s in
    env | tests | throughput | throughput-mb[48] | budgets | budgets-deepspeed | budgets-megatron) ;;
    *)
        echo "unknown stage: $s (env, tests, throughput[-mb4|-mb8], budgets[-deepspeed|-megatron])" >&2
        exit 2
        ;;
    esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2 # the repository root: the paths below are relative to it
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
status=0

stage() {  # stage NAME COMMAND...: run, log to OUT_DIR/NAME.log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    ((rc == 0)) || status=$rc
}

env_report() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    local smi=$?
    "$PYTHON" - <<'EOF' || return
import importlib.metadata as md, json, sys, torch
packages = ["torch", "transformers", "deepspeed", "megatron-core", "transformer_engine",
            "flash_attn", "triton", "safetensors", "pydantic"]
versions = {}
for name in packages:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
print(json.dumps({"python": sys.version.split()[0], "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "packages": versions}, indent=2))
EOF
    return $smi
}

json_stage() {  # json_stage NAME COMMAND...: stdout is the JSON result, stderr the log
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" >"$out/$name.json" 2>"$out/$name.log"
    local rc=$?
    cat "$out/$name.json"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    ((rc == 0)) || status=$rc
}

for s in $stages; do
    case $s in
    env) stage env env_report ;;
    tests)
        stage pytest "$PYTHON" -m pytest -m gpu -p no:cacheprovider --junitxml="$out/pytest.xml" \
            tests/test_flops.py tests/test_checkpoints.py tests/test_megatron_gpu.py \
            tests/test_megatron_train_gpu.py tests/test_throughput_benchmark.py
        ;;
    throughput | throughput-mb[48])
        for mb in 4 8; do
            [[ $s == throughput || $s == "throughput-mb$mb" ]] || continue
            json_stage "throughput-mb$mb" "$PYTHON" benchmarks/throughput.py --micro-batch "$mb"
        done
        ;;
    budgets | budgets-deepspeed | budgets-megatron)
        for backend in deepspeed megatron; do
            [[ $s == budgets || $s == "budgets-$backend" ]] || continue
            json_stage "budgets-$backend" "$PYTHON" benchmarks/training_budgets.py \
                --backend "$backend"
        done
        ;;
    esac
done
exit $status
