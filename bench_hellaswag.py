"""Benchmark: HellaSwag items per second, batched evaluation against one item per forward pass.

Both paths score the same items with the same randomly initialised model in the same process;
the one-at-a-time loop is how the original script works (four rows per forward pass and a host
sync per item). Prints figures and the accuracies of both paths; asserts nothing.

    python bench_hellaswag.py --device cpu --model tiny --limit 500
    python bench_hellaswag.py --device cuda --model gpt2 --compile
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from hellaswag import evaluate, evaluate_one_at_a_time, load_examples
from model import GPT, config_from_preset
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
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="device to run both paths on")
    p.add_argument(
        "--model", default=None, help="model.py preset, random weights (default: gpt2 on a GPU, tiny otherwise)"
    )
    p.add_argument("--data-file", default=None, help="local HellaSwag JSONL (default: the downloaded validation split)")
    p.add_argument("--limit", type=int, default=None, help="first N items (default: all on a GPU, 500 otherwise)")
    p.add_argument("--batch-size", type=int, default=32, help="items per forward pass of the batched path")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None,
        help="autocast dtype of both paths (default: bfloat16 on a GPU, float32 otherwise)",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the batched path")
    p.add_argument("--warmup", type=int, default=64, help="items each path runs before it is timed")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each path; the best counts")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 1 or args.batch_size < 1:
        p.error("--repeat, --warmup and --batch-size must be >= 1")
    on_gpu = torch.device(args.device).type == "cuda"
    args.model = args.model or ("gpt2" if on_gpu else "tiny")
    args.limit = args.limit or (None if on_gpu else 500)
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    examples = load_examples(args.data_file, args.limit)
    warmup = load_examples(args.data_file, args.warmup)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None

    torch.manual_seed(0)
    model = GPT(config_from_preset(args.model, vocab_size=GPT2_VOCAB_SIZE)).to(device).eval()
    batched_model = torch.compile(model) if args.compile else model

    def one_at_a_time(items: list[dict]) -> dict:
        return evaluate_one_at_a_time(model, items, device, autocast_dtype=dtype)

    def batched(items: list[dict]) -> dict:
        return evaluate(batched_model, items, device, batch_size=args.batch_size, autocast_dtype=dtype)

    # warm-up pays for compilation, kernel selection and the allocator before the clock runs;
    # the batched path warms up on the full set so that every batch shape is compiled
    one_at_a_time(warmup)
    batched(examples if args.compile else warmup)
    # the two paths take turns, and each keeps its best time: a busy machine slows both alike
    slow_s = fast_s = float("inf")
    for _ in range(args.repeat):
        slow, seconds = _timed(lambda: one_at_a_time(examples), device)
        slow_s = min(slow_s, seconds)
        fast, seconds = _timed(lambda: batched(examples), device)
        fast_s = min(fast_s, seconds)

    n = len(examples)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{name}, model {args.model} ({model.num_params() / 1e6:.1f}M params, random weights), {n} items, "
        f"{args.dtype}{', compiled' if args.compile else ''}"
    )
    print(f"one item at a time:    {n / slow_s:8.1f} items/s   acc {slow['acc']:.4f} acc_norm {slow['acc_norm']:.4f}")
    print(
        f"batched ({args.batch_size:3d} per pass): {n / fast_s:8.1f} items/s   "
        f"acc {fast['acc']:.4f} acc_norm {fast['acc_norm']:.4f}"
    )
    print(f"speed-up: {slow_s / fast_s:.1f}x")
    report = {
        "device": name, "model": args.model, "items": n, "dtype": args.dtype, "compile": args.compile,
        "batch_size": args.batch_size, "repeat": args.repeat, "one_at_a_time_items_per_s": round(n / slow_s, 1),
        "batched_items_per_s": round(n / fast_s, 1), "speedup": round(slow_s / fast_s, 2),
    }  # fmt: skip
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
