"""Training-step benchmark: steady-state tokens/s, MFU, peak memory and compile time.

    python -m bench.step --model gpt2 --batch-size 16 32 --seq-len 1024      # one GPU, bf16, compiled
    python -m bench.step --model gpt2-xl --batch-size 8 --activation-checkpointing 1
    python -m bench.step --model gpt2 --batch-size 64 --grad-accum 8          # a 524,288-token optimizer step
    python -m bench.step --model tiny --device cpu --no-compile --steps 5    # checks the script on a CPU
    python -m bench.step --model gpt2-xl --batch-size 8 --compile-scope blocks --fsdp   # sharded, one process
    python -m bench.step --model gpt2-xl --activation-memory --fsdp --world-size 8      # what fits on 8 GPUs
    python -m bench.step --model gpt2 --batch-size 64 --grad-accum 8 --profile 1         # where the time goes

The speed flags are train.py's (--compile-mode, --compile-scope, --attention,
--activation-checkpointing, --fused-loss, --fsdp), so a configuration that wins here is one flag
away from a training run. --fsdp times the sharded step in one process (a process group of one):
its cost over the plain step on one GPU, not the communication between several.

It times the same step train.py runs (forward and backward under autocast, gradient
clipping, fused AdamW) on random tokens, so the figures isolate the model and optimizer from
data loading. A step is one optimizer step: --grad-accum micro-batches of forward and
backward, then clipping and AdamW, as train.py takes for --total-batch-size = batch-size *
seq-len * grad-accum; the optimizer's cost is spread over that many micro-batches. Warm-up
steps, which include compilation, are timed apart; the reported figures are the median over
the timed steps, with the device synchronised around each.
MFU is the model's FLOPs per second over the GPU's dense bf16 peak, whatever --dtype is.
Each configuration is compiled afresh, as a training run would compile it: sharing torch.compile's
cache between batch sizes made the batch dimension dynamic from the second one on.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

import sharding
from bench import kernels
from model import COMPILE_MODES, COMPILE_SCOPES, GPT, PRESETS, compile_model, config_from_preset
from runtime import (
    ATTENTION_BACKENDS,
    EXIT_CONFIG,
    EXIT_OK,
    ConfigError,
    attention_context,
    autocast_context,
    autocast_dtype,
    check_attention_backend,
    peak_flops,
    resolve_device,
    teardown_distributed,
)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How one configuration runs its steps: everything but the preset and the shape."""

    dtype: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "model"
    attention: str = "auto"
    activation_checkpointing: int = 0
    fused_loss: bool = True
    pad_vocab: int = 64
    fused_adamw: bool = True
    grad_accum: int = 1
    fsdp: bool = False

    def label(self, timed: bool = True) -> str:
        """The table's name for these options: what differs from train.py's defaults."""
        parts = (
            f"compile={self.compile_mode if self.compile else 'off'}" if timed else "",
            "scope=blocks" if self.compile and self.compile_scope == "blocks" else "",
            f"attn={self.attention}",
            f"ac={self.activation_checkpointing}" if self.activation_checkpointing else "",
            "fused-loss" if self.fused_loss else "",
            f"pad-vocab={self.pad_vocab}" if self.pad_vocab != 64 else "",
            "" if self.fused_adamw else "adamw=foreach",
            "fsdp" if self.fsdp else "",
            # set through TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1: tunes the generated kernels' launch
            # configurations at compile time
            "coordinate-descent" if self.compile and coordinate_descent_tuning() else "",
        )
        return " ".join(part for part in parts if part)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def build_model(
    preset: str,
    device: torch.device,
    pad_vocab: int,
    activation_checkpointing: int,
    fused_loss: bool,
    fsdp_amp: torch.dtype | None | bool = False,
) -> GPT:
    """The model on the device; sharded by FSDP over the process group where fsdp_amp is not
    False (it is then the dtype FSDP gathers the weights in: None for fp32)."""
    torch.manual_seed(0)
    config = config_from_preset(preset, pad_vocab_to=pad_vocab)
    if fsdp_amp is False:
        model = GPT(config).to(device)
    else:
        model = sharding.build_sharded_model(config, device, fsdp_amp)
    model.activation_checkpointing = activation_checkpointing
    model.fused_loss = fused_loss
    return model


def coordinate_descent_tuning() -> bool:
    import torch._inductor.config  # (imported only where something is compiled)

    return torch._inductor.config.coordinate_descent_tuning


def dtype_name(amp: torch.dtype | None) -> str:
    return str(amp).replace("torch.", "") if amp else "fp32"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def make_step(
    preset: str, batch_size: int, seq_len: int, device: torch.device, opts: StepOptions
) -> tuple[Callable[[], None], GPT, torch.dtype | None]:
    """A fresh model, its optimizer and random tokens, and the function that takes one optimizer
    step with them as train.py does."""
    torch._dynamo.reset()  # forget the previous configuration's graphs and the shapes they saw
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    amp = autocast_dtype(opts.dtype, device)
    fsdp_amp = amp if opts.fsdp else False
    model = build_model(preset, device, opts.pad_vocab, opts.activation_checkpointing, opts.fused_loss, fsdp_amp)
    optimizer = model.configure_optimizers(0.1, 6e-4, device_type=device.type, fused=opts.fused_adamw)
    cfg = model.config
    check_attention_backend(opts.attention, device, amp, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.dropout)
    step_model = compile_model(model, opts.compile_mode, opts.compile_scope) if opts.compile else model
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)

    def step() -> None:
        for _ in range(opts.grad_accum):
            with autocast_context(device, amp):
                loss = step_model(x, y)[1]
            (loss / opts.grad_accum).backward()
        sharding.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, amp


def time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(the first step's seconds, compilation included; the median seconds of the timed steps)."""
    t0 = time.perf_counter()
    step()
    sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return first_step_s, statistics.median(times)


def bench_one(
    preset: str,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    device: torch.device,
    opts: StepOptions,
    profile_steps: int = 0,
) -> dict:
    """One configuration's row; with profile_steps, also where its time goes (the key "profile",
    which kernels.summary describes, and "kernels", the list kernels.describe prints)."""
    step, model, amp = make_step(preset, batch_size, seq_len, device, opts)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_step_s, step_s = time_steps(step, device, steps, warmup)
    tokens_per_sec = batch_size * seq_len * opts.grad_accum / step_s
    peak = peak_flops(device)
    row = {
        "model": preset,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "grad_accum": opts.grad_accum,
        "device": device_name(device),
        "dtype": dtype_name(amp),
        "compile": opts.compile_mode if opts.compile else False,
        "compile_scope": opts.compile_scope if opts.compile else None,
        "attention": opts.attention,
        "activation_checkpointing": opts.activation_checkpointing,
        "fused_loss": opts.fused_loss,
        "pad_vocab": opts.pad_vocab,
        "fused_adamw": opts.fused_adamw,
        "fsdp": opts.fsdp,
        "step_ms": round(step_s * 1000, 2),
        "tokens_per_sec": round(tokens_per_sec),
        "mfu": round(model.flops_per_token(seq_len) * tokens_per_sec / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "first_step_s": round(first_step_s, 2),
    }
    if profile_steps:
        profiled = kernels.profile_steps(step, device, profile_steps)
        row["profile"] = kernels.summary(profiled, step_s * 1000 if device.type == "cuda" else None)
        row["kernels"] = profiled
    return row


def activation_memory(preset: str, seq_len: int, device: torch.device, opts: StepOptions, world_size: int = 8) -> dict:
    """The memory autograd keeps alive for the backward pass (the storages behind the saved
    tensors, each counted once, views included in their storage) for 1 and 2 sequences: the
    difference is the cost of each further sequence in the micro-batch; the rest is fixed per
    step (low-precision weight copies, the fused loss's gradient of the output layer).
    Transient buffers (a layer's output before the next layer takes it, the gradient of the
    logits) are not in it. It runs on a CPU: the model and autocast keep the same tensors there,
    except that the attention kernel's own buffers may differ from a GPU kernel's.
    With opts.fsdp, the model is sharded (over one process) and what each of world_size ranks
    would hold is added: its shards, and the gathered weights and gradients in flight."""
    amp = autocast_dtype(opts.dtype, device)
    fsdp_amp = amp if opts.fsdp else False
    model = build_model(preset, device, opts.pad_vocab, opts.activation_checkpointing, opts.fused_loss, fsdp_amp)

    def saved_bytes(batch_size: int) -> int:
        saved: list[torch.UntypedStorage] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.untyped_storage())
            return t

        idx = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(device, amp):
            model(idx, idx)
        # FSDP's gathered weights are counted apart: the blocks' are freed by now (0 bytes), and
        # the root's, still gathered, are the model's parameters at this moment
        gathered = {local(p).untyped_storage().data_ptr() for p in model.parameters()} if opts.fsdp else set()
        storages = {s.data_ptr(): s.nbytes() for s in saved if s.data_ptr() not in gathered}
        return sum(storages.values())

    one, two = saved_bytes(1), saved_bytes(2)
    n_params = sum(p.numel() for p in model.parameters())
    row = {
        "model": preset,
        "seq_len": seq_len,
        "dtype": dtype_name(amp),
        "activation_checkpointing": opts.activation_checkpointing,
        "fused_loss": opts.fused_loss,
        "per_sequence_mib": round((two - one) / 2**20, 1),
        "fixed_mib": round((2 * one - two) / 2**20, 1),
        # fp32 weights, gradients and AdamW's two moments
        "weights_grads_adam_gib": round(16 * n_params / 2**30, 2),
    }
    if opts.fsdp:
        share = sharding.per_rank_bytes(model.config, world_size, (amp or torch.float32).itemsize)
        row["fsdp_world_size"] = world_size
        row["per_rank_weights_grads_adam_gib"] = round(share["state"] / 2**30, 2)
        row["per_rank_gathered_gib"] = round(share["gathered"] / 2**30, 2)
    return row


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def describe(result: dict, variant: str) -> str:
    """One table row."""
    head = f"{result['model']:12s} B={result['batch_size']:3d} T={result['seq_len']}"
    if result.get("grad_accum", 1) > 1:
        head += f" x{result['grad_accum']}"
    if "error" in result:
        return f"{head} {variant}: out of memory"
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "-"
    mem = f"{result['peak_mem_gib']} GiB" if result["peak_mem_gib"] is not None else "-"
    return (
        f"{head} {result['dtype']:8s} {variant}  {result['step_ms']:9.1f} ms/step "
        f"{result['tokens_per_sec']:10,d} tok/s  MFU {mfu:>6s}  peak mem {mem}  first step {result['first_step_s']} s"
    )


def describe_memory(row: dict, variant: str) -> str:
    line = (
        f"{row['model']:12s} T={row['seq_len']} {row['dtype']:8s} {variant}  kept for backward: "
        f"{row['per_sequence_mib']:8.1f} MiB per sequence + {row['fixed_mib']:7.1f} MiB per step; "
        f"weights, gradients and AdamW state {row['weights_grads_adam_gib']} GiB"
    )
    if "fsdp_world_size" in row:
        line += (
            f"; per rank of {row['fsdp_world_size']}: {row['per_rank_weights_grads_adam_gib']} GiB of it, "
            f"+ about {row['per_rank_gathered_gib']} GiB of gathered weights and gradients"
        )
    return line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", nargs="+", default=["gpt2"], choices=list(PRESETS), help="presets to time")
    p.add_argument("--batch-size", nargs="+", type=int, default=[16], help="micro-batch sizes to time")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's block size)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, mps, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast dtype")
    compile_help = "torch.compile the model (default: on for CUDA)"
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help=compile_help)
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode")
    p.add_argument("--compile-scope", default="model", choices=COMPILE_SCOPES, help="whole model or each block")
    p.add_argument("--attention", default="auto", choices=["auto", *ATTENTION_BACKENDS], help="SDPA kernel")
    p.add_argument(
        "--activation-checkpointing", type=int, default=0, metavar="N", help="recompute every Nth block (0: off)"
    )
    p.add_argument(
        "--fused-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="chunked output layer + cross-entropy, as train.py by default (--no-fused-loss: the plain loss)",
    )
    p.add_argument("--pad-vocab", type=int, default=64, help="round the vocabulary up to a multiple of this")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True, help="AdamW's fused kernel")
    p.add_argument("--save", metavar="FILE", help="also append each result to FILE as a JSON line")
    p.add_argument(
        "--activation-memory",
        action="store_true",
        help="instead of timing, count the bytes kept for the backward pass per sequence (works on a CPU)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model with FSDP as train.py --fsdp does, over a process group of one (this process)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=8,
        metavar="N",
        help="with --activation-memory --fsdp: also give what each of N ranks would hold",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N more steps and print where the device's time goes (bench/kernels.py)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per configuration instead of a table")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.grad_accum < 1 or args.profile < 0:
        p.error("--steps, --warmup and --grad-accum must be >= 1, --profile >= 0")
    if args.activation_checkpointing < 0 or args.pad_vocab < 1 or args.world_size < 1:
        p.error("--activation-checkpointing must be >= 0, --pad-vocab and --world-size >= 1")
    if min(args.batch_size) < 1:
        p.error(f"--batch-size must be >= 1, got {min(args.batch_size)}")
    if args.seq_len is not None:
        check_seq_len(p, args.seq_len, args.model)
    if args.save:
        check_writable(p, args.save)
    try:
        args.device = resolve_device(args.device)
    except ConfigError as e:
        p.error(str(e))
    if args.compile is None:
        args.compile = args.device.type == "cuda"
    for flag, value, default in (
        ("compile-mode", args.compile_mode, "default"),
        ("compile-scope", args.compile_scope, "model"),
    ):
        if value != default and not args.compile:
            p.error(f"--{flag} {value} needs --compile (add it, or leave --{flag} at {default})")
    return args


def check_seq_len(p: argparse.ArgumentParser, seq_len: int, presets: list[str]) -> None:
    """A length every preset's position embedding covers; 0 is not taken for "the default"."""
    if seq_len < 1:
        p.error(f"--seq-len must be >= 1, got {seq_len} (leave it out for each preset's block size)")
    too_short = {name: config_from_preset(name).block_size for name in presets}
    too_short = {name: size for name, size in too_short.items() if size < seq_len}
    if too_short:
        sizes = ", ".join(f"{name} ({size})" for name, size in too_short.items())
        p.error(
            f"--seq-len {seq_len} is longer than the block size of {sizes}. HINT: use --seq-len "
            f"{min(too_short.values())} or less, or leave it out for each preset's block size"
        )


def check_writable(p: argparse.ArgumentParser, path: str) -> None:
    """--save is opened before any timing: a benchmark that runs for minutes should not fail
    at the end for a mistyped folder. (Opened to append, the file keeps its rows; one made by the
    check goes again until there is a row to write.)"""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
        if not existed:
            os.remove(path)
    except OSError as e:
        p.error(f"--save {path}: cannot write there ({e.strerror}). HINT: name a file in an existing folder")


def step_options(args: argparse.Namespace) -> StepOptions:
    return StepOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StepOptions)})


def run_activation_memory(args: argparse.Namespace, device: torch.device, opts: StepOptions) -> None:
    for preset in args.model:
        with attention_context(opts.attention):
            seq_len = args.seq_len or config_from_preset(preset).block_size
            row = activation_memory(preset, seq_len, device, opts, args.world_size)
        print(json.dumps(row) if args.json else describe_memory(row, opts.label(timed=False)), flush=True)


def run_timing(args: argparse.Namespace, device: torch.device, opts: StepOptions) -> None:
    variant = opts.label()
    with attention_context(opts.attention):
        for preset in args.model:
            seq_len = args.seq_len or config_from_preset(preset).block_size
            for batch_size in args.batch_size:
                shape = (preset, batch_size, seq_len, args.steps, args.warmup, device, opts, args.profile)
                try:
                    result = bench_one(*shape)
                except torch.OutOfMemoryError:
                    result = {"model": preset, "batch_size": batch_size, "seq_len": seq_len}
                    result.update(grad_accum=opts.grad_accum, error="OOM")
                    torch.cuda.empty_cache()
                profiled = result.pop("kernels", None)
                row = {**result, "variant": variant}
                print(json.dumps(row) if args.json else describe(result, variant), flush=True)
                if profiled is not None and not args.json:
                    step_ms = result["step_ms"] if device.type == "cuda" else None
                    print("\n".join(kernels.describe(profiled, step_ms, args.profile)), flush=True)
                if args.save:
                    with open(args.save, "a") as f:
                        f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, opts = args.device, step_options(args)
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # what stays in fp32 (the optimizer) uses TF32
        if args.activation_memory:
            run_activation_memory(args, device, opts)
        else:
            run_timing(args, device, opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        teardown_distributed()  # the process group of one that --fsdp started
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
