"""Benchmark: HellaSwag items per second, batched evaluation against one item per forward pass.

Both paths score items with the same randomly initialised model in the same process; the
one-at-a-time loop is how the original script works (four rows per forward pass and a host
sync per item). The batched path is timed on all the items (the time of one full evaluation),
the slow loop on the first --slow-limit of them only, which keeps the benchmark short; the two
are compared in items per second, with both accuracies on the items both score (equal in
fp32). The batched path's first pass is timed apart: a full evaluation from a cold start,
compilation included (cold only where torch.compile's caches are empty: bench/gpu.sh gives each
run fresh ones). Prints figures as each phase ends; asserts nothing.

    python -m bench.hellaswag --device cpu --model tiny --limit 500
    python -m bench.hellaswag --device cuda --model gpt2 --compile
    python -m bench.hellaswag --device cuda --model gpt2 --compile --compile-scope model
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from hellaswag import HellaSwagError, compile_for_scoring, evaluate, evaluate_one_at_a_time, load_examples
from model import GPT, PRESETS, config_from_preset
from runtime import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, ConfigError, resolve_device
from tokenizer import GPT2_VOCAB_SIZE


def _timed(fn, device: torch.device) -> tuple[dict, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - t0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hellaswag", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument(
        "--model",
        default=None,
        choices=list(PRESETS),
        help="model.py preset, random weights (default: gpt2 on a GPU, tiny otherwise)",
    )
    p.add_argument("--data-file", default=None, help="local HellaSwag JSONL (default: the downloaded validation split)")
    p.add_argument("--limit", type=int, default=None, help="first N items (default: all on a GPU, 500 otherwise)")
    p.add_argument(
        "--slow-limit", type=int, default=1000, help="items the one-at-a-time loop is timed on (the first N)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="items per forward pass of the batched path")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None,
        help="autocast dtype of both paths (default: bfloat16 on a GPU, float32 otherwise)",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the batched path")
    p.add_argument(
        "--compile-scope", choices=["blocks", "model"], default="blocks",
        help="blocks: as hellaswag.py --compile does (block by block, dynamic shapes); model: the whole "
        "model as one graph, static shapes until a second length is seen",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=64, help="items each path runs before it is timed")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each path; the best counts")
    args = p.parse_args(argv)
    if min(args.repeat, args.warmup, args.batch_size, args.slow_limit, 1 if args.limit is None else args.limit) < 1:
        p.error("--repeat, --warmup, --batch-size, --slow-limit and --limit must be >= 1")
    try:
        args.device = resolve_device(args.device)
    except ConfigError as e:
        p.error(str(e))
    on_gpu = args.device.type == "cuda"
    args.model = args.model or ("gpt2" if on_gpu else "tiny")
    args.limit = args.limit or (None if on_gpu else 500)
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    try:
        examples = load_examples(args.data_file, args.limit)
        # (no more warm-up items than timed ones: a short --limit stays short)
        warmup = load_examples(args.data_file, min(args.warmup, len(examples)))
    except (HellaSwagError, OSError) as e:
        if not args.data_file:  # the download failed: its message has the hint
            print(f"error: {e}", file=sys.stderr)
            return EXIT_ERROR
        hint = "HINT: pass a HellaSwag JSONL file, or leave --data-file out to use the downloaded validation split"
        print(f"error: --data-file {args.data_file}: {e}\n{hint}", file=sys.stderr)
        return EXIT_CONFIG
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None

    torch.manual_seed(0)
    model = GPT(config_from_preset(args.model, vocab_size=GPT2_VOCAB_SIZE)).to(device).eval()
    batched_model = model
    if args.compile:
        batched_model = compile_for_scoring(model) if args.compile_scope == "blocks" else torch.compile(model)

    def one_at_a_time(items: list[dict]) -> dict:
        return evaluate_one_at_a_time(model, items, device, autocast_dtype=dtype)

    def batched(items: list[dict]) -> dict:
        return evaluate(batched_model, items, device, batch_size=args.batch_size, autocast_dtype=dtype)

    n = len(examples)
    shared = examples[: args.slow_limit]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{name}, model {args.model} ({model.num_params() / 1e6:.1f}M params, random weights), {n} items "
        f"(one at a time: the first {len(shared)}), {args.dtype}{', compiled' if args.compile else ''}"
    )
    # the first pass pays for compilation, kernel selection and the allocator, as a user's does
    _, cold_s = _timed(lambda: batched(examples), device)
    print(f"batched, first pass: {cold_s:.2f} s for all {n} items, compilation included", flush=True)
    _, seconds = _timed(lambda: one_at_a_time(warmup), device)
    print(f"one item at a time, warm-up: {seconds:.1f} s", flush=True)
    # each path keeps its best of --repeat runs: a busy machine slows single runs
    fast_s = slow_s = float("inf")
    for _ in range(args.repeat):
        fast, seconds = _timed(lambda: batched(examples), device)
        fast_s = min(fast_s, seconds)
    print(
        f"batched ({args.batch_size:3d} per pass): {n / fast_s:8.1f} items/s   {fast_s:.2f} s for all {n} items   "
        f"acc {fast['acc']:.4f} acc_norm {fast['acc_norm']:.4f}",
        flush=True,
    )
    for _ in range(args.repeat):
        slow, seconds = _timed(lambda: one_at_a_time(shared), device)
        slow_s = min(slow_s, seconds)
    print(
        f"one item at a time:    {len(shared) / slow_s:8.1f} items/s   {slow_s:.2f} s for {len(shared)} items   "
        f"acc {slow['acc']:.4f} acc_norm {slow['acc_norm']:.4f}"
    )
    same = batched(shared)
    speedup = (n / fast_s) / (len(shared) / slow_s)
    # equal in fp32; under bf16 the batch shape changes the rounding, and a near-tie may flip
    print(
        f"speed-up: {speedup:.1f}x; on the same {len(shared)} items the batched path gives "
        f"acc {same['acc']:.4f} acc_norm {same['acc_norm']:.4f}"
    )
    report = {
        "device": name, "model": args.model, "items": n, "items_one_at_a_time": len(shared), "dtype": args.dtype,
        "compile": args.compile and args.compile_scope, "batch_size": args.batch_size, "repeat": args.repeat,
        "batched_first_pass_s": round(cold_s, 3),
        "batched_items_per_s": round(n / fast_s, 1), "batched_s": round(fast_s, 3),
        "one_at_a_time_items_per_s": round(len(shared) / slow_s, 1), "speedup": round(speedup, 2),
        "shared_items_acc": {"one_at_a_time": [slow["acc"], slow["acc_norm"]], "batched": [same["acc"], same["acc_norm"]]},
    }  # fmt: skip
    print(json.dumps(report))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
