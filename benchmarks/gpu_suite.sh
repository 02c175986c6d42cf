#!/usr/bin/env bash
# Everything issue 8 measures on a GPU, in stages, each writing its results under OUT_DIR:
#
#   benchmarks/gpu_suite.sh OUT_DIR [STAGE ...]
#
# The default, env tests throughput budgets, takes well over an hour: raise SUITE_LIMIT for it.
# docs/performance.md ("The plan for a session with a GPU") says which stages go in which
# 10-minute command.
#
#   env               pre-flight: Python, nvidia-smi, gcc/nvcc/ninja, free disk, and an import of
#                     every module the other stages need, with its version or MISSING
#                     -> env.json, pip-list.json. If a required module is missing, the stages
#                     after it are skipped (they could not run).
#   tests             all of the tests-* stages below, one after the other
#   tests-flops | tests-checkpoints | tests-megatron | tests-megatron-train | tests-throughput
#                     pytest -v -m gpu over one GPU test file -> NAME.xml (junit), NAME.log
#   throughput-smoke  benchmarks/throughput.py, tiny model, eager, all three backends (< 1 min)
#   throughput        throughput-mb4 and throughput-mb8: the 1B model at micro-batch 4 and 8
#   throughput-eager  the 1B model at micro-batch 4 without torch.compile
#   budgets-smoke     benchmarks/training_budgets.py, tiny model, both runs (bf16, compile, NCCL)
#   budgets           budgets-deepspeed and budgets-megatron: both runs of the 1B model, in one
#                     command each (longer than 10 minutes together)
#   budgets-BACKEND-end | budgets-BACKEND-every   one of the two 1B runs (BACKEND: deepspeed or
#                     megatron), each fits a 10-minute command
#   budgets-BACKEND-combine   the report from the two runs above, when both are in OUT_DIR
#                     (elsewhere: training_budgets.py --combine DIR_END DIR_EVERY)
#
# A benchmark stage NAME writes its final JSON to NAME.json, and under NAME/ each result as soon
# as it is known (results.jsonl) and the log of its processes as it is written (run.log), so a
# command killed part-way still leaves what it measured. Each stage runs under `timeout`: its own
# limit (below), cut to what is left of SUITE_LIMIT seconds for the whole suite (default 540: a
# device command may run 600 s, ~60 of which go to its start and a wheel install). A stage that
# would get less than 20 s is skipped. On its limit a benchmark gets SIGTERM (it stops its
# training process and removes its run folders) and pytest SIGINT (it still writes its junit xml).
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3); the repository root is
# put on PYTHONPATH, so midtrain need not be installed. The GPU test files import neither Ray
# nor Slurm. A stage that fails is reported and the next one still runs (except after env); the
# exit status is that of the last failure.
set -u
usage="usage: benchmarks/gpu_suite.sh OUT_DIR [STAGE ...] (see the top of this file)"
out=${1:?$usage}
shift
stages=${*:-env tests throughput budgets}
backend_re='(deepspeed|megatron)'
for s in $stages; do # every name checked before anything runs
    case $s in
    env | tests | tests-flops | tests-checkpoints | tests-megatron | tests-megatron-train) ;;
    tests-throughput | throughput | throughput-smoke | throughput-mb[48] | throughput-eager) ;;
    budgets | budgets-smoke) ;;
    *)
        if ! [[ $s =~ ^budgets-$backend_re(-end|-every|-combine)?$ ]]; then
            echo "unknown stage: $s; $usage" >&2
            exit 2
        fi
        ;;
    esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2 # the repository root: the paths below are relative to it
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

# Seconds per stage, and for the whole suite (see above).
LIMIT=540
SMOKE_LIMIT=240
suite_end=$((SECONDS + ${SUITE_LIMIT:-540}))

time_left() { # time_left NAME STAGE_LIMIT: print the stage's limit, or fail if too little is left
    local left=$((suite_end - SECONDS))
    if ((left < 20)); then
        echo "== $1: skipped, only $left s left of SUITE_LIMIT" >&2
        return 1
    fi
    echo $(($2 < left ? $2 : left))
}

finish() { # finish NAME START RC: report a stage's end, remember a failure
    echo "== $1: exit $3 after $((SECONDS - $2)) s"
    (($3 == 0)) || status=$3
}

run_env() { # -> env.json (everything, printed too) and pip-list.json
    local start=$SECONDS limit
    limit=$(time_left env "$SMOKE_LIMIT") || return 124
    echo "== env (limit $limit s)"
    "$PYTHON" -m pip list --format=json >"$out/pip-list.json" || echo "pip list failed" >&2
    timeout -k 20 "$limit" "$PYTHON" - "$out/env.json" <<'EOF'
import importlib, importlib.metadata as md, json, os, platform, shutil, subprocess, sys

# import name -> distribution name. The modules the GPU tests, both benchmarks and the trainer
# import (midtrain/, benchmarks/, tests/), and what deepspeed, megatron-core, transformers and
# datasets import when they load or read a JSONL corpus.
REQUIRED = {
    "torch": "torch", "triton": "triton", "numpy": "numpy", "transformers": "transformers",
    "tokenizers": "tokenizers", "safetensors": "safetensors", "huggingface_hub": "huggingface-hub",
    "regex": "regex", "datasets": "datasets", "pyarrow": "pyarrow", "pandas": "pandas",
    "xxhash": "xxhash", "multiprocess": "multiprocess", "dill": "dill", "fsspec": "fsspec",
    "filelock": "filelock", "yaml": "PyYAML", "rich": "rich", "click": "click",
    "pydantic": "pydantic", "deepspeed": "deepspeed", "msgpack": "msgpack", "psutil": "psutil",
    "einops": "einops", "hjson": "hjson", "cpuinfo": "py-cpuinfo", "tqdm": "tqdm",
    "packaging": "packaging", "megatron.core": "megatron-core", "pytest": "pytest",
    # midtrain itself, from the repository (PYTHONPATH): fails if any of its imports is missing
    "midtrain.training.loop": None, "midtrain.training.engine": None,
    "midtrain.training.megatron_engine": None, "midtrain.data_mixing.prepare": None,
}
OPTIONAL = {  # change the megatron figures, or are used when present
    "transformer_engine.pytorch": "transformer_engine", "flash_attn": "flash_attn",
    "apex": "apex", "tensorboard": "tensorboard",
}


def version(module, dist):
    try:
        return md.version(dist) if dist else "repository"
    except md.PackageNotFoundError:
        return getattr(module, "__version__", "unknown")


def check(names):
    found = {}
    for name, dist in names.items():
        try:
            found[name] = version(importlib.import_module(name), dist)
        except BaseException as exc:  # a compiled extension can fail in many ways
            found[name] = f"MISSING ({type(exc).__name__}: {str(exc)[:300]})"
    return found


def first_line(cmd):
    if not shutil.which(cmd[0]):
        return "MISSING"
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[-1] if cmd[0] == "nvcc" and lines else (lines[0] if lines else "")


os.environ.setdefault("DS_ACCELERATOR", "cuda")
smi = ["nvidia-smi", "--format=csv,noheader",
       "--query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm"]
report = {
    "python": sys.version.split()[0],
    "executable": sys.executable,
    "platform": platform.platform(),
    "cpus": os.cpu_count(),
    "nvidia_smi": first_line(smi),
    "tools": {t: first_line([t, "--version"]) for t in ("gcc", "g++", "nvcc", "ninja")},
    "free_gib": {d: round(shutil.disk_usage(d).free / 2**30, 1) for d in ("/tmp", os.getcwd())},
    "pythonpath": os.environ.get("PYTHONPATH", ""),
    "required": check(REQUIRED),
    "optional": check(OPTIONAL),
}
missing = [n for n, v in report["required"].items() if v.startswith("MISSING")]
try:
    import torch

    report["torch_cuda"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
        report["capability"] = list(torch.cuda.get_device_capability(0))
        report["bf16"] = torch.cuda.is_bf16_supported()
    else:
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
except ImportError:
    pass
report["missing_required"] = missing
text = json.dumps(report, indent=2)
open(sys.argv[1], "w").write(text + "\n")
print(text)
sys.exit(1 if missing else 0)
EOF
    local rc=$?
    finish env "$start" "$rc"
    return "$rc"
}

run_tests() { # run_tests NAME FILE: one GPU test file -> NAME.xml, NAME.log
    local name=$1 file=$2 start=$SECONDS limit
    limit=$(time_left "$name" "$LIMIT") || { status=124 && return; }
    echo "== $name (limit $limit s): pytest -v -m gpu $file"
    # SIGINT: pytest stops as on Ctrl-C and still writes the junit xml of the tests that ran.
    timeout -s INT -k 30 "$limit" "$PYTHON" -m pytest -v --durations=0 -m gpu \
        -p no:cacheprovider --junitxml="$out/$name.xml" "$file" 2>&1 | tee "$out/$name.log"
    finish "$name" "$start" "${PIPESTATUS[0]}"
}

bench() { # bench NAME LIMIT_S COMMAND...: JSON -> NAME.json; results.jsonl, run.log -> NAME/
    local name=$1 start=$SECONDS limit
    limit=$(time_left "$name" "$2") || { status=124 && return; }
    shift 2
    mkdir -p "$out/$name"
    echo "== $name (limit $limit s): $* --out-dir $out/$name"
    timeout -k 30 "$limit" "$@" --out-dir "$out/$name" >"$out/$name.json" 2>>"$out/$name/run.log"
    local rc=$?
    cat "$out/$name.json"
    [[ -s $out/$name.json ]] || rm -f "$out/$name.json" # only 8 files come back from a call
    tail -n 15 "$out/$name/run.log"
    finish "$name" "$start" "$rc"
}

combine() { # combine BACKEND: the report from budgets-BACKEND-end and -every in OUT_DIR
    local name=budgets-$1-combine start=$SECONDS
    echo "== $name"
    "$PYTHON" benchmarks/training_budgets.py --combine "$out/budgets-$1-end" \
        "$out/budgets-$1-every" >"$out/$name.json"
    local rc=$?
    cat "$out/$name.json"
    [[ -s $out/$name.json ]] || rm -f "$out/$name.json"
    finish "$name" "$start" "$rc"
}

throughput=("$PYTHON" benchmarks/throughput.py)
budgets=("$PYTHON" benchmarks/training_budgets.py)
declare -A test_files=(
    [tests-flops]=tests/test_flops.py
    [tests-checkpoints]=tests/test_checkpoints.py
    [tests-megatron]=tests/test_megatron_gpu.py
    [tests-megatron-train]=tests/test_megatron_train_gpu.py
    [tests-throughput]=tests/test_throughput_benchmark.py
)

for s in $stages; do
    case $s in
    env)
        if ! run_env; then
            echo "== env: a required module or the GPU is missing (env.json): skipping the rest"
            exit 1
        fi
        ;;
    tests)
        for t in tests-flops tests-checkpoints tests-megatron tests-megatron-train \
            tests-throughput; do
            run_tests "$t" "${test_files[$t]}"
        done
        ;;
    tests-*) run_tests "$s" "${test_files[$s]}" ;;
    throughput-smoke)
        bench "$s" "$SMOKE_LIMIT" "${throughput[@]}" --preset tiny --seq-length 256 --steps 3 \
            --warmup 1 --no-compile --timeout 60
        ;;
    throughput | throughput-mb[48])
        for mb in 4 8; do
            [[ $s == throughput || $s == "throughput-mb$mb" ]] || continue
            # three backends: 170 s each, within the stage's 540 s
            bench "throughput-mb$mb" "$LIMIT" "${throughput[@]}" --micro-batch "$mb" --timeout 170
        done
        ;;
    throughput-eager)
        bench "$s" "$LIMIT" "${throughput[@]}" --micro-batch 4 --no-compile --timeout 170
        ;;
    budgets-smoke)
        bench "$s" "$SMOKE_LIMIT" "${budgets[@]}" --preset tiny --seq-length 256 --steps 30 \
            --interval 15 --warmup 3 --timeout 90
        ;;
    budgets | budgets-deepspeed | budgets-megatron)
        for backend in deepspeed megatron; do
            [[ $s == budgets || $s == "budgets-$backend" ]] || continue
            bench "budgets-$backend" 1200 "${budgets[@]}" --backend "$backend" --timeout 540
        done
        ;;
    budgets-*-combine)
        backend=${s#budgets-}
        combine "${backend%-combine}"
        ;;
    budgets-*-end | budgets-*-every)
        backend=${s#budgets-}
        backend=${backend%-*}
        only=${s##*-}
        [[ $only == end ]] && only=end-only
        bench "$s" "$LIMIT" "${budgets[@]}" --backend "$backend" --only "$only" --timeout 480
        ;;
    esac
done
exit $status
