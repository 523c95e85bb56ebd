#!/usr/bin/env bash
# Every GPU measurement behind BENCHMARKS.md, one section per argument, so that a short lease
# of a GPU machine covers them in a few calls:
#
#   bash bench_gpu.sh tests gpt2          # GPU tests; GPT-2 124M at micro-batch 8 to 64
#   bash bench_gpu.sh variants overhead   # each speed option alone at one batch; train.py vs bench.py
#   bash bench_gpu.sh modes               # torch.compile's max-autotune and CUDA-graph modes (slow to compile)
#   bash bench_gpu.sh xl hellaswag        # GPT-2 1.5B with and without activation checkpointing; HellaSwag
#
# No argument runs them all; the lines above are meant to fit one 10-minute call each.
# Environment (all optional):
#   LOGS            folder for the logs and results.jsonl (default bench_logs)
#   BATCH           124M micro-batch for the variants and the overhead run (default 32)
#   DATA            prepared data for the overhead run (default data/tinyshakespeare, which a
#                   plain `python train.py` prepares)
#   HELLASWAG_FILE  local HellaSwag validation JSONL (default: the downloaded split)
#   WHEELS          folder of wheels to install first, for machines without a package index
#   MODEL, XL, SEQ  presets and sequence length (default gpt2, gpt2-xl, 1024); tiny, tiny and 64
#                   try the script out on a CPU
#
# A section that fails is reported and the next one runs; the exit code counts the failures.
set -uo pipefail
cd "$(dirname "$0")"

LOGS=${LOGS:-bench_logs}
BATCH=${BATCH:-32}
DATA=${DATA:-data/tinyshakespeare}
MODEL=${MODEL:-gpt2}
XL=${XL:-gpt2-xl}
SEQ=${SEQ:-1024}
RESULTS="$LOGS/results.jsonl"
SECTIONS="tests gpt2 variants overhead modes xl hellaswag"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --target "$LOGS/site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PWD/$LOGS/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# Within a section every command runs even after one fails (an attention kernel this build
# lacks, say); the section fails at the end if any did.
status=0
step() { "$@" || { echo "FAILED (exit $?): $*"; status=1; }; }
bench() { step python3 bench.py --save "$RESULTS" --seq-len "$SEQ" "$@"; }

section_tests() {
    step nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    step python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
    step python3 -m pytest -m gpu -q -p no:cacheprovider
    return $status
}

section_gpt2() {
    bench --model "$MODEL" --batch-size 8 16 32 64 --steps 20 --warmup 5
    return $status
}

section_variants() {
    # one change at a time against the default (compiled, bf16, SDPA's own choice, padded vocab)
    local common=(--model "$MODEL" --batch-size "$BATCH" --steps 20 --warmup 5)
    bench "${common[@]}"
    bench "${common[@]}" --fused-loss
    bench "${common[@]}" --attention flash
    bench "${common[@]}" --attention cudnn
    bench "${common[@]}" --attention efficient
    bench "${common[@]}" --pad-vocab 1
    bench "${common[@]}" --no-fused-adamw
    bench "${common[@]}" --no-compile
    return $status
}

section_modes() {
    local common=(--model "$MODEL" --batch-size "$BATCH" --steps 20 --warmup 5)
    bench "${common[@]}" --compile-mode max-autotune-no-cudagraphs
    bench "${common[@]}" --compile-mode reduce-overhead
    return $status
}

section_overhead() {
    # The same step through train.py (real shards, the loader, logging, the per-step read-back of
    # the loss) and through bench.py (random tokens already on the device): the difference is
    # what the training loop costs beyond the model and the optimizer.
    local run="$LOGS/overhead_run"
    rm -rf "$run"
    step python3 train.py --data "$DATA" --out "$run" --model "$MODEL" --batch-size "$BATCH" --seq-len "$SEQ" \
        --max-steps 60 --eval-every 0 --checkpoint-every 0 --num-samples 1 --sample-tokens 8 \
        --resume never --log-every 10
    bench --model "$MODEL" --batch-size "$BATCH" --steps 40 --warmup 5
    step python3 - "$run/metrics.jsonl" "$RESULTS" "$MODEL" "$BATCH" <<'PY'
import json
import statistics
import sys

metrics, results, model, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
steps = [r for r in map(json.loads, open(metrics)) if r.get("type") == "train" and r["step"] >= 10]
train_ms = statistics.median(r["ms"] for r in steps)
data_ms = statistics.median(r["data_ms"] for r in steps)
rows = [json.loads(line) for line in open(results)]
bench_ms = [r for r in rows if r.get("model") == model and r.get("batch_size") == batch and "step_ms" in r][-1]
bench_ms = bench_ms["step_ms"]
print(
    f"train.py median step {train_ms:.2f} ms (loading {data_ms:.3f} ms); bench.py {bench_ms:.2f} ms; "
    f"loop overhead {train_ms - bench_ms:.2f} ms = {100 * (train_ms - bench_ms) / train_ms:.2f}% of the step, "
    f"loading alone {100 * data_ms / train_ms:.3f}%"
)
PY
    return $status
}

section_xl() {
    bench --model "$XL" --batch-size 4 8 --steps 8 --warmup 3
    bench --model "$XL" --batch-size 16 32 --steps 8 --warmup 3 --activation-checkpointing 1
    bench --model "$XL" --batch-size 16 --steps 8 --warmup 3 --activation-checkpointing 2
    bench --model "$XL" --batch-size 8 --steps 8 --warmup 3 --fused-loss
    return $status
}

section_hellaswag() {
    local data=()
    [[ -n "${HELLASWAG_FILE:-}" ]] && data=(--data-file "$HELLASWAG_FILE")
    step python3 bench_hellaswag.py --model "$MODEL" --compile "${data[@]}"
    return $status
}

for name in ${@:-$SECTIONS}; do
    if ! declare -F "section_$name" >/dev/null; then
        echo "unknown section $name: choose from $SECTIONS" >&2
        exit 2
    fi
done
failures=0
for name in ${@:-$SECTIONS}; do
    echo "=== $name ($(date -u +%FT%TZ))"
    start=$SECONDS
    status=0
    if ! "section_$name" 2>&1 | tee "$LOGS/$name.log"; then
        echo "=== $name FAILED"
        failures=$((failures + 1))
    fi
    echo "=== $name took $((SECONDS - start)) s"
done
exit "$failures"
