"""Benchmark: sampling speed with the key-value cache against without it.

GPT.generate with its cache runs the model on each new token alone; without it, on the whole
window (up to block_size tokens) every step. Both runs sample greedily from the same randomly
initialised model and prompt, so in float32 they give the same tokens, which the benchmark says
(under bf16 a near-tie may break differently, the two paths rounding different shapes). Prints
tokens per second; the first call (warm-up) is not timed; asserts nothing.

    python -m bench.generate --model gpt2 --tokens 200
    python -m bench.generate --model tiny --tokens 500 --batch-size 4 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from model import GPT, PRESETS, config_from_preset
from runtime import EXIT_OK, ConfigError, autocast_context, autocast_dtype, resolve_device


def dtype_name(amp: torch.dtype | None) -> str:
    return str(amp).replace("torch.", "") if amp else "float32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model: GPT, prompt: torch.Tensor, tokens: int, use_cache: bool) -> tuple[torch.Tensor, float]:
    """The generated ids and the seconds they took."""
    sync(prompt.device)
    t0 = time.perf_counter()
    out = model.generate(prompt, tokens, temperature=0, use_cache=use_cache)
    sync(prompt.device)
    return out, time.perf_counter() - t0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="gpt2", choices=list(PRESETS), help="preset (random weights)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate after a one-token prompt")
    p.add_argument("--batch-size", type=int, default=1, help="sequences generated together")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast dtype")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.batch_size < 1:
        p.error("--tokens and --batch-size must be >= 1")
    try:
        args.device = resolve_device(args.device)
    except ConfigError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    model = GPT(config_from_preset(args.model)).to(device).eval()
    prompt = torch.zeros((args.batch_size, 1), dtype=torch.long, device=device)
    amp = autocast_dtype(args.dtype, device)
    with torch.no_grad(), autocast_context(device, amp):
        model.generate(prompt, 4, temperature=0)  # warm-up: kernels chosen, memory allocated
        runs = {use_cache: timed_generate(model, prompt, args.tokens, use_cache) for use_cache in (True, False)}
    new_tokens = args.batch_size * args.tokens
    for use_cache, (_, seconds) in runs.items():
        label = "with the cache" if use_cache else "without it    "
        print(
            f"{args.model} on {device.type}, {new_tokens} tokens {label}: {seconds:7.2f} s, {new_tokens / seconds:9.1f} tokens/s"
        )
    speedup = runs[False][1] / runs[True][1]
    same = torch.equal(runs[True][0], runs[False][0])
    print(f"the cache is {speedup:.1f}x as fast; the same tokens: {'yes' if same else 'no'} ({dtype_name(amp)})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
