"""Train a GPT-2: one process (CPU, MPS, one GPU) or many under torchrun (DDP).

    python train.py                                    # small GPT on tiny Shakespeare, any machine
    python train.py --data data/fineweb_edu --model gpt2 --seq-len 1024 --batch-size 16 \\
        --total-batch-size 524288                      # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data ... --model gpt2

The loop, top to bottom: evaluate / sample when due, then one optimizer step made of
gradient-accumulation micro-steps, log it, checkpoint when due. Rerunning the same command
resumes from the newest complete checkpoint in --out.

Exit codes: 0 finished; 1 error; 2 bad flags or configuration; 3 stopped after too many
consecutive non-finite steps; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint
(run the same command again to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoint as ckpt_lib
from dataloader import DataError, ShardedDataLoader, read_meta
from model import COMPILE_MODES, COMPILE_SCOPES, GPT, PRESETS, compile_model, config_from_preset, uncompiled
from prepare_data import DataPrepError
from runtime import (
    ATTENTION_BACKENDS,
    ConfigError,
    Dist,
    attention_context,
    autocast_context,
    autocast_dtype,
    check_attention_backend,
    peak_flops,
    setup_distributed,
    teardown_distributed,
)
from tokenizer import TokenizerError, get_tokenizer

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 1, 2, 3, 75
DEFAULT_CORPUS = "tinyshakespeare"
# ---- configuration ----


def _flag(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # data and run directory
    data: str = _flag("", f"prepared data directory (prepare_data.py); empty: {DEFAULT_CORPUS}, prepared on first use")
    out: str = _flag("", "run directory for config, metrics.jsonl and checkpoints; empty: runs/<data dir name>")
    # model
    model: str = _flag("tiny", f"model preset: {', '.join(PRESETS)}")
    n_layer: int | None = _flag(None, "override the preset's number of layers")
    n_head: int | None = _flag(None, "override the preset's number of attention heads")
    n_embd: int | None = _flag(None, "override the preset's embedding width")
    dropout: float = _flag(0.0, "dropout probability (0 for pretraining)")
    pad_vocab: int = _flag(64, "round the vocabulary up to a multiple of this for faster matmuls (1: no padding)")
    init_from: str = _flag("", "start from weights: a Hugging Face GPT-2 name or directory, or one of our checkpoints")
    # batch
    batch_size: int = _flag(8, "micro-batch size per process (sequences)")
    seq_len: int | None = _flag(None, "tokens per sequence; default: the model's block size")
    total_batch_size: int | None = _flag(
        None,
        "tokens per optimizer step over all processes; gradient accumulation makes up the difference; "
        "default: batch-size * seq-len * world size",
    )
    # optimisation
    max_steps: int = _flag(300, "optimizer steps to train for")
    lr: float = _flag(1e-3, "peak learning rate")
    min_lr: float | None = _flag(None, "learning rate at the end of the cosine decay; default: lr / 10")
    warmup_steps: int = _flag(20, "steps of linear warm-up from 0 to lr")
    weight_decay: float = _flag(0.1, "AdamW weight decay on matrices and embeddings")
    beta1: float = _flag(0.9, "AdamW beta1")
    beta2: float = _flag(0.95, "AdamW beta2")
    grad_clip: float = _flag(1.0, "clip the global gradient norm to this (0: no clipping)")
    shuffle: bool = _flag(False, "shuffle the order of training chunks every epoch (seeded)")
    # precision and speed
    dtype: str = _flag(
        "auto",
        "bf16, fp16 (with a grad scaler, CUDA) or fp32; auto: bf16 on GPUs with native bf16 (Ampere on), else fp32",
        choices=["auto", "bf16", "fp16", "fp32"],
    )
    compile: bool | None = _flag(None, "torch.compile the model; default: on for CUDA, off elsewhere")
    compile_mode: str = _flag(
        "default",
        "torch.compile mode; reduce-overhead replays CUDA graphs, max-autotune also searches matmul kernels",
        choices=list(COMPILE_MODES),
    )
    compile_scope: str = _flag(
        "model",
        "what torch.compile compiles: model (one graph, the most fusion) or blocks (each block and the output "
        "layer apart: the blocks share one compilation, so compile time stops growing with depth)",
        choices=list(COMPILE_SCOPES),
    )
    attention: str = _flag(
        "auto",
        "scaled_dot_product_attention kernel: auto (PyTorch picks per call), flash, cudnn, efficient or math",
        choices=["auto", *ATTENTION_BACKENDS],
    )
    activation_checkpointing: int = _flag(
        0,
        "recompute every Nth block's activations in the backward pass instead of storing them (1: all; 0: off)",
        metavar="N",
    )
    fused_loss: bool = _flag(
        True,
        "output layer and cross-entropy a chunk of positions at a time, never holding all the logits "
        "(--no-fused-loss: the plain F.cross_entropy path)",
    )
    device: str = _flag("auto", "cuda, mps, cpu, or auto (the best present)")
    seed: int = _flag(1337, "random seed (model init, data shuffle, dropout, sampling)")
    # evaluation, samples, logging
    eval_every: int = _flag(100, "validation loss every N steps and at the end (0: never)")
    eval_tokens: int = _flag(16384, "validation tokens per evaluation, the same tokens whatever the world size")
    sample_every: int = _flag(0, "print samples every N steps (0: only at the end)")
    sample_prompt: str = _flag("\n", "prompt that samples start from")
    sample_tokens: int = _flag(64, "tokens per sample")
    num_samples: int = _flag(2, "samples printed each time (0: none)")
    hellaswag_every: int = _flag(0, "HellaSwag accuracy every N steps and at the end (0: never)")
    hellaswag_limit: int = _flag(0, "evaluate only the first N HellaSwag examples (0: all)")
    hellaswag_file: str = _flag("", "local HellaSwag JSONL instead of the downloaded validation split")
    hellaswag_batch_size: int = _flag(16, "HellaSwag items per forward pass (4 rows each)")
    log_every: int = _flag(1, "print a training line every N steps")
    wandb: str = _flag("", "also log to this Weights & Biases project (needs the wandb package)")
    # checkpoints and fault tolerance
    checkpoint_every: int = _flag(250, "save a checkpoint every N steps (0: only at the end and on signals)")
    keep_last: int = _flag(2, "keep the newest N checkpoints (0: keep all)")
    keep_every: int = _flag(0, "also keep every checkpoint whose step is a multiple of N (0: none)")
    resume: str = _flag(
        "auto", "auto: continue from the newest usable checkpoint in --out; never; or a checkpoint path"
    )
    max_bad_steps: int = _flag(5, "stop after this many consecutive steps with a non-finite loss or gradient norm")
    dist_timeout_min: float = _flag(10.0, "minutes a collective may wait before a hung rank becomes an error")

    def __post_init__(self) -> None:
        errors = []
        if self.model not in PRESETS:
            errors.append(f"--model {self.model!r} is not a preset; choose one of: {', '.join(PRESETS)}")
        for name in (
            "batch_size",
            "max_steps",
            "eval_tokens",
            "log_every",
            "pad_vocab",
            "max_bad_steps",
            "hellaswag_batch_size",
        ):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "eval_every",
            "sample_every",
            "hellaswag_every",
            "checkpoint_every",
            "keep_last",
            "keep_every",
            "hellaswag_limit",
            "num_samples",
            "sample_tokens",
            "activation_checkpointing",
            "grad_clip",
            "weight_decay",
        ):
            if getattr(self, name) < 0:
                errors.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("seq_len", "total_batch_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            errors.append(f"--lr must be > 0 and finite, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            errors.append(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            errors.append(f"--device {self.device!r}: use auto, cpu, mps, cuda or cuda:N")
        if errors:
            raise ConfigError("\n".join(errors))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default after its help (where it has
    one the help does not already spell out)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default in (None, "", argparse.SUPPRESS) or "default" in help or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        kind = f.type if isinstance(f.type, type) else str(f.type)
        if kind in (bool, "bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            continue
        convert = {"int": int, "int | None": int, "float": float, "float | None": float}.get(str(kind), str)
        if kind in (int, float, str):
            convert = kind
        metavar = meta.pop("metavar", f.name.split("_")[-1].upper())
        parser.add_argument(flag, type=convert, default=f.default, metavar=metavar, **meta)
    parser.add_argument("--plot", nargs="+", metavar="RUN", help="draw the loss curves of these runs to a PNG and exit")
    return parser


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values), args


# ---- schedule, metrics, signals ----


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at max_steps."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - min_lr)


class MetricsLog:
    """RUN/metrics.jsonl, one JSON object per event, written by rank 0."""

    def __init__(self, path: Path, enabled: bool, wandb_run=None):
        self.path, self.enabled, self.wandb_run = path, enabled, wandb_run
        self.file = open(path, "a") if enabled else None

    def _lines(self) -> Iterator[tuple[str, dict]]:
        """(line, record) for each whole record in the file; a line cut short by a crash is skipped."""
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield line, record

    def truncate_from(self, step: int) -> None:
        """Drop events of steps >= step: they were logged after the checkpoint we resume from."""
        if not self.enabled or not self.path.exists():
            return
        self.file.close()
        kept = [line for line, record in self._lines() if record.get("step") is None or record["step"] < step]
        ckpt_lib.write_text_atomic(self.path, "".join(k + "\n" for k in kept))
        self.file = open(self.path, "a")

    def logged_types(self, step: int) -> set[str]:
        """The types of the events logged at `step` ("eval", "hellaswag", ...); empty off rank 0."""
        if not self.enabled or not self.path.exists():
            return set()
        return {record.get("type") for _, record in self._lines() if record.get("step") == step}

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None and "step" in record:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()


class StopSignal:
    """Remembers SIGTERM / SIGUSR1; the loop checks it at step boundaries, agreed by all ranks."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


def run_metadata(cfg: TrainConfig, d: Dist, device: torch.device) -> dict:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "type": "run",
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "world_size": d.world_size,
        "config": dataclasses.asdict(cfg),
    }


def fault_injection(name: str, step: int, rank: int) -> bool:
    """Faults for the test suite, set through the environment: GPT2_TRAINER_TEST_<NAME>=STEP[:RANK]."""
    spec = os.environ.get(f"GPT2_TRAINER_TEST_{name}")
    if not spec:
        return False
    steps, _, ranks = spec.partition(":")
    in_steps = step in {int(s) for s in steps.split(",")}
    return in_steps and (not ranks or rank in {int(r) for r in ranks.split(",")})


# ---- evaluation and sampling ----


@torch.no_grad()
def evaluate_val_loss(
    model, val_loader: ShardedDataLoader, n_chunks: int, d: Dist, device: torch.device, amp: torch.dtype | None
) -> float:
    """Mean loss over the same n_chunks validation chunks whatever the world size: rank r
    takes chunks r, r+W, ...; loss sums and token counts are added across ranks."""
    model.eval()
    # fp64 so that the sum does not depend on how chunks are split over ranks; MPS has no fp64
    total = torch.zeros(2, device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    for c in range(d.rank, n_chunks, d.world_size):
        x, y = val_loader.batch_at(c)  # already on the device
        with autocast_context(device, amp):
            loss = model(x, y)[1]
        total[0] += loss.to(total.dtype) * y.numel()
        total[1] += y.numel()
    if d.enabled:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def sample_texts(
    model: GPT, tokenizer, cfg: TrainConfig, device: torch.device, seed: int, amp: torch.dtype | None
) -> list[str]:
    if cfg.num_samples == 0:
        return []
    model.eval()
    prompt = tokenizer.encode(cfg.sample_prompt) or [tokenizer.eot_id]
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with autocast_context(device, amp), uncompiled():
        out = model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=gen)
    model.train()
    return [tokenizer.decode(row.tolist()) for row in out]


# ---- setting up a run ----


def resolve_data_dir(cfg: TrainConfig, d: Dist) -> Path:
    if cfg.data:
        return Path(cfg.data)
    path = Path("data") / DEFAULT_CORPUS
    if not (path / "meta.json").exists():
        if d.local_rank == 0:
            import prepare_data

            prepare_data.prepare_named_corpus(DEFAULT_CORPUS, "data")
        d.barrier()
    return path


def build_model(cfg: TrainConfig, vocab_size: int, print0) -> GPT:
    if cfg.init_from:
        overridden = [
            f"--{k.replace('_', '-')}" for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None
        ]
        if overridden:
            print0(f"note: {', '.join(overridden)} ignored: with --init-from the model's shape comes from its weights")
        if ckpt_lib.is_checkpoint_path(cfg.init_from):
            print0(f"initialising weights from our checkpoint {cfg.init_from}")
            model = ckpt_lib.load_model(cfg.init_from, dropout=cfg.dropout)
        else:
            print0(f"initialising weights from Hugging Face {cfg.init_from}")
            model = GPT.from_pretrained(cfg.init_from, pad_vocab_to=cfg.pad_vocab, dropout=cfg.dropout)
        if model.config.vocab_size != vocab_size:
            raise ConfigError(
                f"--init-from {cfg.init_from} has a vocabulary of {model.config.vocab_size}, "
                f"the data {vocab_size}: they must be tokenized alike"
            )
        return model
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None}
    try:
        model_cfg = config_from_preset(
            cfg.model, vocab_size=vocab_size, dropout=cfg.dropout, pad_vocab_to=cfg.pad_vocab, **overrides
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return GPT(model_cfg)


def check_batch_arithmetic(cfg: TrainConfig, seq_len: int, block_size: int, d: Dist) -> int:
    """Gradient accumulation steps; every inconsistency is an error before any work."""
    if seq_len > block_size:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's block size {block_size}")
    per_micro_step = cfg.batch_size * seq_len * d.world_size
    total = cfg.total_batch_size or per_micro_step
    if total % per_micro_step:
        raise ConfigError(
            f"--total-batch-size {total} is not divisible by batch-size * seq-len * world size = "
            f"{cfg.batch_size} * {seq_len} * {d.world_size} = {per_micro_step}"
        )
    return total // per_micro_step


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.plot:
        import plot

        return plot.main(args.plot)
    d = Dist()
    stop_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        d, device = setup_distributed(cfg.device, cfg.dist_timeout_min)
        with attention_context(cfg.attention):
            code = train(cfg, d, device)
        # Every rank is done with collectives before any closes its connections: without this,
        # gloo aborted a rank at exit in about one two-process hellaswag.py run in 15, which
        # ends the same way.
        d.barrier()
        return code
    except ConfigError as e:
        print(f"[rank {d.rank}] error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, DataPrepError, ckpt_lib.CheckpointError, TokenizerError) as e:
        print(f"[rank {d.rank}] error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for sig, handler in stop_handlers.items():  # StopSignal's, put back for whoever called main
            signal.signal(sig, handler)
        teardown_distributed()


def train(cfg: TrainConfig, d: Dist, device: torch.device) -> int:
    def print0(*a, **kw):
        if d.master:
            print(*a, **kw, flush=True)

    # ---- data, model, batch arithmetic: everything that can be wrong fails here ----
    wandb = None
    if cfg.wandb and d.master:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("--wandb needs the wandb package: pip install wandb") from e
    data_dir = resolve_data_dir(cfg, d)
    amp = autocast_dtype(cfg.dtype, device)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    # The model is sized from meta.json; the shards themselves are checked once, by the loaders.
    # Shards made by other projects have no meta.json and hold GPT-2 tokens.
    data_meta = read_meta(data_dir)
    vocab_size = data_meta["vocab_size"] if data_meta else 50257
    for name, value, default in (
        ("compile-mode", cfg.compile_mode, "default"),
        ("compile-scope", cfg.compile_scope, "model"),
    ):
        if value != default and not use_compile:
            raise ConfigError(
                f"--{name} {value} needs torch.compile, which is on by default only on CUDA: add --compile"
            )
    model = build_model(cfg, vocab_size, print0).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.fused_loss = cfg.fused_loss
    check_attention_backend(
        cfg.attention, device, amp, model.config.n_head, model.config.n_embd // model.config.n_head, cfg.dropout
    )
    seq_len = cfg.seq_len or model.config.block_size
    grad_accum = check_batch_arithmetic(cfg, seq_len, model.config.block_size, d)
    tokens_per_step = cfg.batch_size * seq_len * d.world_size * grad_accum
    train_loader = ShardedDataLoader(
        data_dir,
        "train",
        cfg.batch_size,
        seq_len,
        d.rank,
        d.world_size,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        chunks_per_step=d.world_size * grad_accum,
        device=device,
    )
    val_loader, val_chunks = None, 0
    if cfg.eval_every:
        val_loader = ShardedDataLoader(data_dir, "val", cfg.batch_size, seq_len, d.rank, d.world_size, device=device)
        if val_loader.num_chunks() == 0:
            raise ConfigError(
                f"the validation split of {data_dir} has fewer than batch-size * seq-len + 1 tokens; "
                "lower them, prepare a larger validation split, or pass --eval-every 0"
            )
        val_chunks = min(val_loader.num_chunks(), max(1, cfg.eval_tokens // (cfg.batch_size * seq_len)))
    if train_loader.num_chunks() < d.world_size * grad_accum:
        raise ConfigError(
            f"the training split of {data_dir} ({train_loader.num_tokens:,} tokens) is smaller than "
            f"one step ({tokens_per_step:,} tokens)"
        )

    out_dir = Path(cfg.out or Path("runs") / data_dir.name)
    settings = [
        f"autocast {amp or 'off (fp32)'}",
        f"compile {cfg.compile_mode}, scope {cfg.compile_scope}" if use_compile else "compile off",
        f"attention {cfg.attention}",
    ]
    if cfg.activation_checkpointing:
        settings.append(f"activation checkpointing every {cfg.activation_checkpointing} block(s)")
    if model.fused_loss:
        settings.append("fused loss")
    print0(f"run directory {out_dir}; {d.world_size} process(es) on {device}; {', '.join(settings)}")
    print0(
        f"model: {model.num_params() / 1e6:.2f}M parameters (non-embedding), vocab {vocab_size} "
        f"(padded to {model.config.padded_vocab_size}), block {model.config.block_size}"
    )
    print0(
        f"batch: {cfg.batch_size} seqs x {seq_len} tokens x {d.world_size} ranks x {grad_accum} accumulation "
        f"= {tokens_per_step:,} tokens per step; {cfg.max_steps} steps = {tokens_per_step * cfg.max_steps:,} "
        f"tokens; train split {train_loader.num_tokens:,} tokens"
    )

    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)

    # ---- resume ----
    start_step, tokens_seen, bad_steps = 0, 0, 0
    resume_from = None
    if cfg.resume == "auto":
        resume_from = ckpt_lib.find_checkpoint(out_dir, warn=print0)
    elif cfg.resume != "never":
        resume_from = ckpt_lib.resolve_checkpoint(cfg.resume, warn=print0)
    if cfg.resume != "auto":
        # resuming and pruning go by step number, so another run's later checkpoints in --out
        # would be taken for this run's newest
        first_step = resume_from.step if resume_from else 0
        later = [p for p in ckpt_lib.list_checkpoint_dirs(out_dir) if ckpt_lib.checkpoint_step(p) > first_step]
        if later:
            raise ConfigError(
                f"{out_dir / 'checkpoints'} holds checkpoints of steps after {first_step} "
                f"({', '.join(p.name for p in reversed(later))}), left by another run; this run would mix "
                f"with them. HINT: pass another --out, or move those checkpoints out of the way."
            )
    if resume_from is not None:
        ckpt_lib.load_model_weights(resume_from, model)
        state = ckpt_lib.load_train_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        train_loader.load_state_dict(state["train_loader"])
        start_step, tokens_seen = resume_from.step, state["tokens_seen"]
        rng = ckpt_lib.load_rng_state(resume_from, d.rank)
        if rng is not None:
            ckpt_lib.restore_rng_state(rng)
        else:
            torch.manual_seed(cfg.seed + d.rank)
        print0(
            f"resumed from {resume_from.path} (step {start_step}, saved by {resume_from.meta['world_size']} "
            f"process(es))"
        )
    else:
        torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank

    raw_model = model
    if use_compile:
        model = compile_model(model, cfg.compile_mode, cfg.compile_scope)
    train_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets instead of being
        # copied into them, one model-sized fp32 buffer less (6 GB at 1.5B)
        train_model = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )

    if d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_lib.write_text_atomic(out_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    wandb_run = None
    if wandb is not None:
        # an id of the run directory's own, kept there: a resumed run logs on to the same W&B run
        id_file = out_dir / "wandb_run_id"
        if not id_file.is_file():
            ckpt_lib.write_text_atomic(id_file, f"{out_dir.resolve().name}-{os.urandom(4).hex()}\n")
        wandb_run = wandb.init(
            project=cfg.wandb, config=dataclasses.asdict(cfg), resume="allow", id=id_file.read_text().strip()
        )
    metrics = MetricsLog(out_dir / "metrics.jsonl", d.master, wandb_run)
    if start_step < cfg.max_steps:  # (a finished run keeps its record, final evaluation included)
        metrics.truncate_from(start_step)
    metrics.log({**run_metadata(cfg, d, device), "resumed_from_step": start_step if resume_from else None})

    tokenizer = get_tokenizer(data_meta["tokenizer"] if data_meta else "gpt2")  # for samples and HellaSwag
    hellaswag_examples = None
    if cfg.hellaswag_every:
        import hellaswag

        def load_hellaswag():
            return hellaswag.load_examples(cfg.hellaswag_file or None, cfg.hellaswag_limit or None)

        if d.master:  # one download, then the other ranks read the cached file
            hellaswag_examples = load_hellaswag()
        d.barrier()
        if not d.master:
            hellaswag_examples = load_hellaswag()

    def save(step: int) -> Path:
        state = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "train_loader": train_loader.state_dict(),
            "tokens_seen": tokens_seen,
        }
        path = ckpt_lib.save_checkpoint(
            out_dir,
            step,
            raw_model,
            state,
            {"config": dataclasses.asdict(cfg), "tokens_seen": tokens_seen},
            d.rank,
            d.world_size,
            d.barrier,
            d.any,
        )
        if d.master:
            ckpt_lib.prune_checkpoints(out_dir, cfg.keep_last, cfg.keep_every, step)
        print0(f"saved checkpoint {path}")
        return path

    stop = StopSignal()
    flops_per_token = raw_model.flops_per_token(seq_len)
    peak = peak_flops(device)
    step_ms_avg = None
    params = [p for p in raw_model.parameters() if p.requires_grad]
    # A step's time runs from the end of the previous step, so it includes what the host does
    # between steps (logging, loading the batch); evaluations and checkpoints restart the clock.
    step_clock = None

    def evaluate(step: int, val_due: bool, hellaswag_due: bool) -> None:
        """Validation loss and HellaSwag of the weights after `step` updates."""
        if val_due:
            t0 = time.perf_counter()
            val_loss = evaluate_val_loss(model, val_loader, val_chunks, d, device, amp)
            print0(
                f"step {step:6d} | val loss {val_loss:.4f} | {val_chunks * cfg.batch_size * seq_len:,} tokens "
                f"in {time.perf_counter() - t0:.1f}s"
            )
            metrics.log({"type": "eval", "step": step, "val_loss": val_loss})
        if hellaswag_due:
            result = hellaswag.evaluate(
                model,
                hellaswag_examples,
                device,
                batch_size=cfg.hellaswag_batch_size,
                rank=d.rank,
                world_size=d.world_size,
                autocast_dtype=amp,
                tokenizer=tokenizer,
            )
            print0(f"step {step:6d} | hellaswag acc_norm {result['acc_norm']:.4f} ({result['num_examples']} examples)")
            metrics.log(
                {
                    "type": "hellaswag",
                    "step": step,
                    "hellaswag_acc": result["acc"],
                    "hellaswag_acc_norm": result["acc_norm"],
                    "hellaswag_examples": result["num_examples"],
                }
            )

    # ---- the loop ----
    for step in range(start_step, cfg.max_steps):
        last_step = step == cfg.max_steps - 1
        eval_due = bool(cfg.eval_every) and step % cfg.eval_every == 0
        hellaswag_due = bool(cfg.hellaswag_every) and step % cfg.hellaswag_every == 0
        sample_due = cfg.sample_every and step > start_step and step % cfg.sample_every == 0
        evaluate(step, eval_due, hellaswag_due)
        if sample_due and d.master:
            # without the compile and DDP wrappers, and run eagerly (uncompiled()): generation grows
            # the sequence every token, which would recompile
            for text in sample_texts(raw_model, tokenizer, cfg, device, cfg.seed, amp):
                print0(f"step {step:6d} | sample: {text!r}")

        # one optimizer step
        if step_clock is None or eval_due or hellaswag_due or sample_due:
            step_clock = time.perf_counter()
        data_s = 0.0
        loss_accum = torch.zeros((), device=device)
        inject_nan = fault_injection("NAN_AT_STEP", step, d.rank)
        for micro_step in range(grad_accum):
            t_data = time.perf_counter()
            x, y = train_loader.next_batch()  # on the device; the copy is queued, not awaited
            data_s += time.perf_counter() - t_data
            # all-reduce gradients only on the last micro-step
            sync = nullcontext() if not d.enabled or micro_step == grad_accum - 1 else train_model.no_sync()
            with sync, autocast_context(device, amp):
                # [1]: the logits go at once; kept in a variable they would live through backward
                loss = train_model(x, y)[1]
                if inject_nan:
                    loss = loss * float("nan")
                loss = loss / grad_accum
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # One collective per step carries the loss (averaged over ranks) and the stop request.
        # A NaN on any rank spreads to every rank through this sum and through the gradient
        # all-reduce, so all ranks take the same skip decision without another collective.
        # (full_like, not torch.tensor: a host-to-device copy would wait for the whole step)
        status = torch.stack([loss_accum.float(), torch.full_like(loss_accum, float(stop.received is not None))])
        if d.enabled:
            dist.all_reduce(status, op=dist.ReduceOp.SUM)
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the step's one host-device synchronisation: what logging and the decisions below need
        loss_sum, stop_requested, grad_norm_value = torch.cat([status, grad_norm.float().view(1)]).tolist()
        loss_value = loss_sum / d.world_size
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
        # fp16: gradients that overflow under a finite loss are the loss scale's to fix
        # (update() lowers it), not a sign that training diverged
        overflow = scaler.is_enabled() and math.isfinite(loss_value) and not finite
        if finite:
            scaler.step(optimizer)
            bad_steps = 0
        elif not overflow:
            bad_steps += 1
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        # No device synchronisation: the optimizer's kernels run while the host logs and loads
        # the next batch, and the next step's .tolist() waits for them.
        now = time.perf_counter()
        dt, step_clock = now - step_clock, now

        if fault_injection("CRASH_AT_STEP", step, d.rank) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            raise RuntimeError(f"injected crash at step {step} (GPT2_TRAINER_TEST_CRASH_AT_STEP)")

        # log
        # the first step pays for compilation: start the moving average at the second
        step_ms_avg = dt * 1000 if step <= start_step + 1 else 0.9 * step_ms_avg + 0.1 * dt * 1000
        tokens_per_sec = tokens_per_step / dt
        mfu = flops_per_token * tokens_per_sec / (peak * d.world_size) if peak else None
        record = {
            "type": "train",
            "step": step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens_per_sec": tokens_per_sec,
            "mfu": mfu,
            "ms": dt * 1000,
            "data_ms": data_s * 1000,
            "tokens_seen": tokens_seen,
        }
        if overflow:
            record["skipped"] = True
            print0(f"step {step:6d} | fp16 gradients overflowed: update skipped, loss scale lowered")
        elif not finite:
            record["skipped"] = True
            print0(
                f"step {step:6d} | non-finite loss {loss_value} or grad norm {grad_norm_value}: update skipped "
                f"({bad_steps} in a row, limit {cfg.max_bad_steps})"
            )
        metrics.log(record)
        if step % cfg.log_every == 0 or last_step:
            eta_s = (cfg.max_steps - step - 1) * step_ms_avg / 1000
            mfu_text = f"{100 * mfu:5.1f}%" if mfu is not None else "    -"
            print0(
                f"step {step:6d} | loss {loss_value:.4f} | lr {lr:.2e} | norm {grad_norm_value:6.3f} | "
                f"{dt * 1000:7.1f} ms | {tokens_per_sec:10,.0f} tok/s | mfu {mfu_text} | eta {eta_s / 60:.1f} min"
            )
        if bad_steps >= cfg.max_bad_steps:
            print0(
                f"error: {bad_steps} consecutive steps had a non-finite loss or gradient norm; stopping. The last "
                f"good checkpoint in {out_dir / 'checkpoints'} is intact. HINT: lower --lr or check the data."
            )
            metrics.close()
            return EXIT_NONFINITE

        done = step + 1
        if stop_requested and done < cfg.max_steps:  # on the last step: finish as usual
            save(done)
            print0(f"stopped by a signal at step {done}; run the same command again to resume")
            metrics.close()
            return EXIT_PREEMPTED
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            step_clock = None
            try:
                save(done)
            except ckpt_lib.CheckpointError as e:
                print0(f"error: {e}\ntraining goes on; the next checkpoint will be tried at its turn")
                continue
            if fault_injection("KILL_AFTER_CHECKPOINT", done, d.rank):
                os.kill(os.getpid(), signal.SIGKILL)

    if start_step < cfg.max_steps:
        save(cfg.max_steps)
        evaluate(cfg.max_steps, bool(cfg.eval_every), bool(cfg.hellaswag_every))
    else:
        # Finished before. A run stopped between its final checkpoint and the final evaluation
        # evaluates now; rank 0 reads the log, and every rank joins the evaluation's collectives.
        logged = metrics.logged_types(cfg.max_steps)
        val_missing = d.any(d.master and bool(cfg.eval_every) and "eval" not in logged)
        hellaswag_missing = d.any(d.master and bool(cfg.hellaswag_every) and "hellaswag" not in logged)
        evaluate(cfg.max_steps, val_missing, hellaswag_missing)
    if d.master:
        for text in sample_texts(raw_model, tokenizer, cfg, device, cfg.seed, amp):
            print0(f"sample: {text!r}")
    metrics.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
