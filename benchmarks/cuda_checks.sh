#!/usr/bin/env bash
# Every CUDA check behind benchmarks/README.md's CUDA section, in one run on a GPU machine that
# has python3 with torch and transformers but no network: the CUDA tests, the speed benchmarks
# (issue 14's first: 8B-shaped bf16 against transformers' compiled generate, 70B-shaped FP8),
# then what batch invariance rests on there. Each step has its own time limit and log under
# $OUT; a failing step never stops the others; the whole run stays within $BUDGET seconds
# (default 520: under 9 minutes with the machine's start, so a rerun fits 15 minutes of GPU).
#
#     OUT=cuda-out bash benchmarks/cuda_checks.sh
#     STEPS="pytest fp8-70b" bash benchmarks/cuda_checks.sh               # some steps
#     DRY=1 TOK=bench-out/model bash benchmarks/cuda_checks.sh            # on a CPU: tiny shapes, checks the script only
#
# The benchmark model (benchmarks/make_model.py's weights) is written on the machine; its
# tokenizer files come from $TOK (default bench-out/tok: tokenizer.json, tokenizer_config.json,
# generation_config.json copied from a model written by make_model.py).
set +e
OUT=${OUT:-cuda-out}
TOK=${TOK:-bench-out/tok}
MODEL=${MODEL:-/tmp/llamaserve-bench-model}
BUDGET=${BUDGET:-520}
DRY=${DRY:-0}
if [[ $DRY == 1 ]]; then  # the same steps on the CPU, tiny shapes: nothing measured
    DEV=cpu SHAPE8B=tiny DRYRUN=--dry-run
else
    DEV=cuda SHAPE8B=llama3-8b DRYRUN=
fi
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PY:-python3}
END=$((SECONDS + BUDGET))

step() {  # step NAME LIMIT_S COMMAND...: runs within the limit and what is left of the budget
    local name=$1 limit=$2 left
    shift 2
    [[ -n $STEPS && " $STEPS " != *" $name "* ]] && return
    left=$((END - SECONDS - 5))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "=== $name skipped: budget spent" | tee -a "$OUT/$name.log"
        return
    fi
    echo "=== $name (limit ${limit}s) $(date -u +%T)"
    timeout -k 5 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    echo "=== $name rc=$? $(date -u +%T)"
}

write_model() {
    $PY - "$MODEL" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, 'benchmarks')
from safetensors.torch import save_file
from make_model import BENCH_ARGS
from llamaserve.weights.builtin import random_state_dict
from llamaserve.weights.layout import meta_to_hf_state_dict
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
save_file(meta_to_hf_state_dict(random_state_dict(BENCH_ARGS, 0), BENCH_ARGS), str(out / 'model.safetensors'), metadata={'format': 'pt'})
(out / 'config.json').write_text(json.dumps(BENCH_ARGS.to_hf_config(), indent=2))
print(out, BENCH_ARGS.num_parameters() / 1e6, 'M parameters')
EOF
    cp "$TOK"/* "$MODEL"/
}

step env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, transformers; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); print(\"transformers\", transformers.__version__)'; nproc; free -g"
# Issue 14 first. pytest: the GPU tests (graphs vs eager, FP8, int8, engine identity on the GPU)
# and the CPU proof that the decode step compiles whole.
step pytest 150 $PY -m pytest -v -p no:cacheprovider -rs tests/test_cuda.py tests/test_compile_decode.py tests/test_device_sampler.py
# 70B-shaped FP8 (weights drawn on the device), 1 and 32 users: about a minute.
step fp8-70b 150 $PY benchmarks/gpu_70b.py $DRYRUN
# 8B-shaped bf16, 1 and 32 users: llamaserve (captured decode) and transformers' compiled
# static-cache generate in the same run (its own random weights of the shape); llamaserve's
# figures are printed before transformers compiles, so a cut run keeps them.
step decode-8b 200 $PY benchmarks/decode_throughput.py "$TOK" --device $DEV --dtype bfloat16 --shape $SHAPE8B --users 1,32 --runs 1 --hf-compile
step decode-8b-eager 90 env LLAMASERVE_CUDA_GRAPHS=0 $PY benchmarks/decode_throughput.py "$TOK" --device $DEV --dtype bfloat16 --shape $SHAPE8B --users 1,32 --runs 1 --skip-hf
step int8 60 $PY benchmarks/int8_speed.py --device $DEV --dtype bfloat16
# The 70B shape with an FP8 KV cache: how many users fit, and the 32-user step.
step fp8-70b-fp8kv 90 $PY benchmarks/gpu_70b.py $DRYRUN --kv-cache-dtype fp8 --users 32
# Attention over gathered blocks (torch's SDPA) instead of the Triton paged kernel: what it saves.
step decode-8b-gather 90 env LLAMASERVE_TRITON=0 $PY benchmarks/decode_throughput.py "$TOK" --device $DEV --dtype bfloat16 --shape $SHAPE8B --users 1,32 --runs 1 --skip-hf
# The sampler alone (host against device sampler, 33 rows of a 128K vocabulary), then the 32-user
# step with every request sampling at top-p 0.9 (the device sampler in the step).
step sampler 45 $PY benchmarks/sampler_speed.py --device $DEV --rows 33 $([[ $DRY == 1 ]] && echo --vocab 4096 --repeats 3)
step decode-8b-sampled 90 $PY benchmarks/decode_throughput.py "$TOK" --device $DEV --dtype bfloat16 --shape $SHAPE8B --users 32 --runs 1 --skip-hf --temperature 0.8 --top-p 0.9
# Earlier issues' checks, as far as the budget goes.
step invariance 120 $PY benchmarks/cuda_invariance.py $INVARIANCE
export -f write_model
export PY MODEL TOK
step model 60 bash -c write_model
step decode-250m 150 $PY benchmarks/decode_throughput.py "$MODEL" --device $DEV --dtype bfloat16 --runs 3 --with-unpadded --also-rows 32
step decode-8b-4096 120 $PY benchmarks/decode_throughput.py "$TOK" --device $DEV --dtype bfloat16 --shape $SHAPE8B --users 32 --runs 1 --skip-hf --also-rows 32 --max-seq-len 4096

echo; echo "##### issue 14 targets"
$PY benchmarks/cuda_targets.py "$OUT" | tee "$OUT/targets.md"

echo; echo "##### summary"
for f in "$OUT"/*.log; do
    echo "----- $(basename "$f")"
    grep -E '^\||^bench|PASSED|FAILED|SKIPPED|ERROR|Error|passed|failed|identical|DIFFERENT|^error|backend for|^bench|^tiny|^llama3|on cuda|relative error|skipped|Traceback' "$f" | grep -v '^\s*$' | head -80
done
