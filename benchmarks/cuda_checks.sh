#!/usr/bin/env bash
# Every CUDA check behind benchmarks/README.md's CUDA section, in one run on a GPU machine that
# has python3 with torch and transformers but no network: the CUDA tests, what batch invariance
# rests on there, and the speed benchmarks. Each step has its own time limit and log under $OUT;
# a failing step never stops the others; the whole run stays within $BUDGET seconds.
#
#     OUT=cuda-out BUDGET=400 bash benchmarks/cuda_checks.sh
#     STEPS="pytest invariance" INVARIANCE="attention engine" bash benchmarks/cuda_checks.sh   # some steps
#
# The benchmark model (benchmarks/make_model.py's weights) is written on the machine; its
# tokenizer files come from $TOK (default bench-out/tok: tokenizer.json, tokenizer_config.json,
# generation_config.json copied from a model written by make_model.py).
set +e
OUT=${OUT:-cuda-out}
TOK=${TOK:-bench-out/tok}
MODEL=${MODEL:-/tmp/llamaserve-bench-model}
BUDGET=${BUDGET:-400}
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

step env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, transformers; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); print(\"transformers\", transformers.__version__)'; nproc; free -g"
step pytest 150 $PY -m pytest -v -p no:cacheprovider -rs tests/test_cuda.py
step invariance 120 $PY benchmarks/cuda_invariance.py $INVARIANCE
export -f write_model
export PY MODEL TOK
step model 60 bash -c write_model
step decode-250m 150 $PY benchmarks/decode_throughput.py "$MODEL" --device cuda --dtype bfloat16 --runs 3 --with-unpadded --also-rows 32
step int8 60 $PY benchmarks/int8_speed.py --device cuda --dtype bfloat16
step decode-8b 120 $PY benchmarks/decode_throughput.py "$TOK" --device cuda --dtype bfloat16 --shape llama3-8b --users 1,32 --runs 2 --skip-hf --with-unpadded --also-rows 32
step decode-8b-4096 120 $PY benchmarks/decode_throughput.py "$TOK" --device cuda --dtype bfloat16 --shape llama3-8b --users 32 --runs 1 --skip-hf --also-rows 32 --max-seq-len 4096
step hf-compiled 150 $PY benchmarks/decode_throughput.py "$MODEL" --device cuda --dtype bfloat16 --users 1,32 --runs 1 --hf-compile

echo; echo "##### summary"
for f in "$OUT"/*.log; do
    echo "----- $(basename "$f")"
    grep -E '^\||PASSED|FAILED|SKIPPED|ERROR|Error|passed|failed|identical|DIFFERENT|^error|backend for|^bench|^tiny|^llama3|on cuda|relative error|skipped|Traceback' "$f" | grep -v '^\s*$' | head -80
done
