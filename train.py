"""Train a GPT-2: one process (CPU, MPS, one GPU) or many under torchrun (DDP, or FSDP with --fsdp).

    python train.py                                   # small GPT on tiny Shakespeare, any machine
    torchrun --standalone --nproc_per_node=8 train.py --data data/fineweb_edu --model gpt2
    python train.py --help                            # every flag (declared in config.py)

Set-up first, so that a wrong flag or bad data fails in the first seconds; then one loop. Each
pass of the loop first does what is due on the weights after `step` updates (checkpoint,
evaluation, samples), then one optimizer step. The loop runs one pass more than there are
steps, and that last pass does the final checkpoint and evaluation.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

import checkpoint as ckpt_lib
import sharding
from config import DEFAULT_CORPUS, TrainConfig, config_changes, keep_run_length, learning_rate, parse_config
from dataloader import DataError, ShardedDataLoader, read_meta
from metrics import MetricsLog, run_metadata
from model import GPT, compile_model, config_from_preset, uncompiled
from prepare_data import DataPrepError
from runtime import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_OK,
    ConfigError,
    Dist,
    PeerStopped,
    attention_context,
    autocast_context,
    autocast_dtype,
    check_attention_backend,
    host_values,
    out_of_memory,
    peak_flops,
    peer_gone,
    print0,
    setup_distributed,
    teardown_distributed,
)
from tokenizer import TokenizerError, get_tokenizer

EXIT_NONFINITE, EXIT_PREEMPTED = 3, 75


# ---- the run's record and signals ----


class StopSignal:
    """Remembers SIGTERM, SIGUSR1 and a first Ctrl-C (SIGINT); the loop saves a checkpoint at the
    next step boundary, agreed by all ranks, and exits with EXIT_PREEMPTED. A second Ctrl-C ends
    the process at once: the newest complete checkpoint is intact whatever is being written."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        # (a process started with Ctrl-C ignored, as a shell's background jobs are, keeps ignoring it)
        wanted = [sig for sig in self.SIGNALS if not (sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN)]
        self.previous = {sig: signal.signal(sig, self._handle) for sig in wanted}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            print("\nsecond Ctrl-C: stopped at once, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        if signum == signal.SIGINT:
            print0("\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again: stop at once)")
        self.received = signum

    def restore(self) -> None:
        """Put back the handlers there were before, for whoever called main()."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def crash_if_injected(step: int, rank: int) -> None:
    """A crash for the test suite, on a run's first attempt only (not after a torchrun restart)."""
    if fault_injection("CRASH_AT_STEP", step, rank) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        raise RuntimeError(f"injected crash at step {step} (GPT2_TRAINER_TEST_CRASH_AT_STEP)")


def fault_injection(name: str, step: int, rank: int) -> bool:
    """Faults for the test suite, set through the environment: GPT2_TRAINER_TEST_<NAME>=STEP[:RANK]."""
    spec = os.environ.get(f"GPT2_TRAINER_TEST_{name}")
    if not spec:
        return False
    steps, _, ranks = spec.partition(":")
    in_steps = step in {int(s) for s in steps.split(",")}
    return in_steps and (not ranks or rank in {int(r) for r in ranks.split(",")})


# ---- evaluation and samples ----


@torch.no_grad()
def evaluate_val_loss(
    model, val_loader: ShardedDataLoader, n_chunks: int, d: Dist, device: torch.device, amp: torch.dtype | None
) -> float:
    """Mean loss over the same n_chunks validation chunks whatever the world size: rank r
    takes chunks r, r+W, ...; loss sums and token counts are added across ranks."""
    model.eval()
    # fp64 so that the sum does not depend on how chunks are split over ranks; MPS has no fp64
    total = torch.zeros(2, device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    # every rank runs as many forward passes (a sharded model gathers its weights with all ranks
    # in each): a rank short of a chunk evaluates the last one again and does not count it
    for c in range(d.rank, -(-n_chunks // d.world_size) * d.world_size, d.world_size):
        x, y = val_loader.batch_at(min(c, n_chunks - 1))  # already on the device
        with autocast_context(device, amp):
            loss = model(x, y)[1]
        if c < n_chunks:
            total[0] += loss.to(total.dtype) * y.numel()
            total[1] += y.numel()
    if d.enabled:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train()
    return (total[0] / total[1]).item()


@dataclass
class Evaluator:
    """The once-in-a-while work on the weights after some step: validation loss, HellaSwag
    accuracy and samples. Holds what it needs across the run; the loop says when."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    amp: torch.dtype | None
    val_loader: ShardedDataLoader | None
    val_chunks: int
    tokenizer: object
    hellaswag_examples: list[dict] | None

    seconds: dict[str, float] = field(default_factory=dict)  # the last duration of each kind

    def val_loss(self, step: int, model, metrics: MetricsLog) -> None:
        t0 = time.perf_counter()
        loss = evaluate_val_loss(model, self.val_loader, self.val_chunks, self.d, self.device, self.amp)
        self.seconds["val"] = time.perf_counter() - t0
        tokens = self.val_chunks * self.val_loader.batch_size * self.val_loader.seq_len
        print0(f"step {step:6d} | val loss {loss:.4f} | {tokens:,} tokens in {self.seconds['val']:.1f}s")
        metrics.log({"type": "eval", "step": step, "val_loss": loss})

    def hellaswag(self, step: int, model, metrics: MetricsLog) -> None:
        import hellaswag

        print0(f"step {step:6d} | hellaswag: scoring {len(self.hellaswag_examples):,} items ...")
        t0 = time.perf_counter()
        result = hellaswag.evaluate(
            model,
            self.hellaswag_examples,
            self.device,
            batch_size=self.cfg.hellaswag_batch_size,
            rank=self.d.rank,
            world_size=self.d.world_size,
            autocast_dtype=self.amp,
            tokenizer=self.tokenizer,
        )
        self.seconds["hellaswag"] = time.perf_counter() - t0
        print0(
            f"step {step:6d} | hellaswag acc_norm {result['acc_norm']:.4f} ({result['num_examples']} examples "
            f"in {self.seconds['hellaswag']:.1f}s)"
        )
        record = {"type": "hellaswag", "step": step, "hellaswag_acc": result["acc"]}
        metrics.log({**record, "hellaswag_acc_norm": result["acc_norm"], "hellaswag_examples": result["num_examples"]})

    def due(self, step: int, finished_before: bool, metrics: MetricsLog) -> tuple[bool, bool]:
        """Whether validation loss and HellaSwag are due on the weights after `step` updates. A run
        finished before evaluates only what a stop between its final checkpoint and its final
        evaluation left out: rank 0 reads the log, and every rank joins the evaluation."""
        last_step = step == self.cfg.max_steps
        val = bool(self.cfg.eval_every) and (step % self.cfg.eval_every == 0 or last_step)
        hellaswag = bool(self.cfg.hellaswag_every) and (step % self.cfg.hellaswag_every == 0 or last_step)
        if not finished_before:
            return val, hellaswag
        logged = metrics.logged_types(step)
        d = self.d
        return d.any(d.master and val and "eval" not in logged), d.any(
            d.master and hellaswag and "hellaswag" not in logged
        )

    def run(self, step: int, val: bool, hellaswag: bool, model, metrics: MetricsLog) -> None:
        if val:
            self.val_loss(step, model, metrics)
        if hellaswag:
            self.hellaswag(step, model, metrics)

    def seconds_left(self, step: int) -> float:
        """The time the evaluations still due after `step` will take, at their last duration."""
        total = 0.0
        for kind, every in (("val", self.cfg.eval_every), ("hellaswag", self.cfg.hellaswag_every)):
            if every and kind in self.seconds:
                end = self.cfg.max_steps
                total += (end // every - step // every + (end % every != 0)) * self.seconds[kind]
        return total

    @torch.no_grad()
    def print_samples(self, step: int, model: GPT) -> None:
        """Samples from the plain module (no compile or DDP wrapper), run eagerly: generation grows
        the sequence every token, which would recompile. Any attention kernel may serve: some
        refuse a one-token query. Rank 0 only; every rank with a sharded model, whose forward
        passes gather its weights from all of them (they sample alike: same generator seed)."""
        cfg = self.cfg
        if cfg.num_samples == 0 or not (self.d.master or sharding.is_sharded(model)):
            return
        model.eval()
        prompt = self.tokenizer.encode(cfg.sample_prompt) or [self.tokenizer.eot_id]
        idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        with autocast_context(self.device, self.amp), uncompiled(), attention_context("auto"):
            out = model.generate(idx, cfg.sample_tokens, temperature=1.0, top_k=50, generator=gen)
        model.train()
        for i, row in enumerate(out.tolist()):
            print0(f"---- sample {i + 1}/{cfg.num_samples} at step {step} ----\n{self.tokenizer.decode(row)}")


# ---- setting up a run: everything that can be wrong fails here ----


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


def check_wandb(cfg: TrainConfig, d: Dist) -> None:
    if cfg.wandb and d.master:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ConfigError("--wandb needs the wandb package: pip install wandb") from e


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, amp: torch.dtype | None) -> GPT:
    """The model on the device, from a preset or from weights, with the run's speed settings."""
    if cfg.init_from:
        if cfg.fsdp:  # rank 0 reads the weights, every rank gets its shards
            model = sharding.build_from_rank0(lambda: load_initial_weights(cfg, vocab_size), device, amp)
        else:
            model = load_initial_weights(cfg, vocab_size)
    else:
        overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None}
        try:
            config = config_from_preset(
                cfg.model, vocab_size=vocab_size, dropout=cfg.dropout, pad_vocab_to=cfg.pad_vocab, **overrides
            )
        except ValueError as e:
            raise ConfigError(str(e)) from e
        model = sharding.build_sharded_model(config, device, amp) if cfg.fsdp else GPT(config)
    model.to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.fused_loss = cfg.fused_loss
    c = model.config
    if cfg.activation_checkpointing > c.n_layer:  # every Nth block: no more than the first
        raise ConfigError(
            f"--activation-checkpointing {cfg.activation_checkpointing}: the model has {c.n_layer} blocks. "
            f"HINT: 1 recomputes every block, 2 every second, ... {c.n_layer} the first only"
        )
    check_attention_backend(cfg.attention, device, amp, c.n_head, c.n_embd // c.n_head, c.dropout)
    return model


def load_initial_weights(cfg: TrainConfig, vocab_size: int) -> GPT:
    overridden = [f"--{k.replace('_', '-')}" for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None]
    if overridden:
        print0(f"note: {', '.join(overridden)} ignored: with --init-from the model's shape comes from its weights")
    ours = ckpt_lib.is_checkpoint_path(cfg.init_from)
    print0(f"initialising weights from {'our checkpoint' if ours else 'Hugging Face'} {cfg.init_from}")
    # (a mistyped path is refused before the hub is asked for it; an unreachable hub is an error with a hint)
    model = ckpt_lib.load_pretrained(cfg.init_from, dropout=cfg.dropout, pad_vocab_to=cfg.pad_vocab)
    if model.config.vocab_size != vocab_size:
        raise ConfigError(
            f"--init-from {cfg.init_from} has a vocabulary of {model.config.vocab_size}, "
            f"the data {vocab_size}: they must be tokenized alike"
        )
    return model


def resolve_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to compile: --compile, or by default on CUDA; its other flags need it on."""
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    for name, value, default in (("mode", cfg.compile_mode, "default"), ("scope", cfg.compile_scope, "model")):
        if value != default and not use_compile:
            raise ConfigError(
                f"--compile-{name} {value} needs torch.compile, on by default only on CUDA: add --compile"
            )
    return use_compile


def check_batch_arithmetic(cfg: TrainConfig, seq_len: int, block_size: int, d: Dist) -> int:
    """Gradient accumulation steps; every inconsistency is an error before any work."""
    if seq_len > block_size:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's block size {block_size}")
    per_micro_step = cfg.batch_size * seq_len * d.world_size
    total = cfg.total_batch_size or per_micro_step
    if total % per_micro_step:
        raise ConfigError(
            f"--total-batch-size {total} is not divisible by batch-size * seq-len * world size = "
            f"{cfg.batch_size} * {seq_len} * {d.world_size} = {per_micro_step}.\nHINT: use a multiple of "
            f"{per_micro_step}, such as {max(1, round(total / per_micro_step)) * per_micro_step}, or another --batch-size"
        )
    return total // per_micro_step


def build_loaders(
    cfg: TrainConfig, data_dir: Path, seq_len: int, grad_accum: int, d: Dist, device: torch.device
) -> tuple[ShardedDataLoader, ShardedDataLoader | None, int]:
    """The training loader, and the validation loader with the chunks each evaluation reads."""
    chunks_per_step = d.world_size * grad_accum
    train_loader = ShardedDataLoader(
        data_dir, "train", cfg.batch_size, seq_len, d.rank, d.world_size, shuffle=cfg.shuffle, seed=cfg.seed,
        chunks_per_step=chunks_per_step, device=device,
    )  # fmt: skip
    if train_loader.num_chunks() < chunks_per_step:
        raise ConfigError(
            f"the training split of {data_dir} ({train_loader.num_tokens:,} tokens) is smaller than "
            f"one step ({chunks_per_step * cfg.batch_size * seq_len:,} tokens)"
        )
    if not cfg.eval_every:
        return train_loader, None, 0
    val_loader = ShardedDataLoader(data_dir, "val", cfg.batch_size, seq_len, d.rank, d.world_size, device=device)
    if val_loader.num_chunks() == 0:
        raise ConfigError(
            f"the validation split of {data_dir} has fewer than batch-size * seq-len + 1 tokens; "
            "lower them, prepare a larger validation split, or pass --eval-every 0"
        )
    val_chunks = min(val_loader.num_chunks(), max(1, cfg.eval_tokens // (cfg.batch_size * seq_len)))
    return train_loader, val_loader, val_chunks


def load_hellaswag(cfg: TrainConfig, d: Dist) -> list[dict] | None:
    if not cfg.hellaswag_every:
        return None
    import hellaswag

    def load() -> list[dict]:
        try:
            return hellaswag.load_examples(cfg.hellaswag_file or None, cfg.hellaswag_limit or None)
        except hellaswag.HellaSwagError as e:
            hint = "give a HellaSwag JSONL file" if cfg.hellaswag_file else "give a local copy with --hellaswag-file"
            raise ConfigError(f"--hellaswag-every: {e}\nHINT: {hint}, or leave --hellaswag-every at 0") from e

    examples = load() if d.master else None  # one download, then the other ranks read the cached file
    d.barrier()
    return examples or load()


def wrap_model(model: GPT, cfg: TrainConfig, d: Dist, device: torch.device, use_compile: bool):
    """(the compiled model, for evaluation; the model the step runs: compiled, in DDP if several ranks
    and not sharded by --fsdp, which build_model did)."""
    if use_compile:
        model = compile_model(model, cfg.compile_mode, cfg.compile_scope)
    if not d.enabled or cfg.fsdp:
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets instead of being
    # copied into them, one model-sized fp32 buffer less
    device_ids = [device.index] if device.type == "cuda" else None
    return model, DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)


def micro_step_sync(train_model, cfg: TrainConfig, d: Dist, last: bool):
    """DDP all-reduces gradients on the last micro-step only (no_sync, read in the forward pass).
    FSDP reduce-scatters them after every micro-step, or with --fsdp-grad-sync step after the last
    only (a switch read in the backward pass, so set here rather than scoped)."""
    if cfg.fsdp:
        sharding.set_gradient_sync(train_model, last or cfg.fsdp_grad_sync == "micro-step")
        return nullcontext()
    return nullcontext() if not d.enabled or last else train_model.no_sync()


def describe_run(
    cfg: TrainConfig, model: GPT, out_dir: Path, d: Dist, device: torch.device, amp: torch.dtype | None,
    use_compile: bool, seq_len: int, grad_accum: int, loader: ShardedDataLoader,
) -> None:  # fmt: skip
    settings = [
        f"autocast {amp or 'off (fp32)'}",
        f"compile {cfg.compile_mode}, scope {cfg.compile_scope}" if use_compile else "compile off",
        f"attention {cfg.attention}",
    ]
    if cfg.activation_checkpointing:
        settings.append(f"activation checkpointing every {cfg.activation_checkpointing} block(s)")
    if model.fused_loss:
        settings.append("fused loss")
    if cfg.fsdp:
        settings.append(f"FSDP, gradients reduce-scattered every {cfg.fsdp_grad_sync}")
    tokens_per_step = cfg.batch_size * seq_len * d.world_size * grad_accum
    c = model.config
    print0(f"run directory {out_dir}; {d.world_size} process(es) on {device}; {', '.join(settings)}")
    print0(
        f"model: {model.num_params() / 1e6:.2f}M parameters (the position table not counted), vocab {c.vocab_size} "
        f"(padded to {c.padded_vocab_size}), block {c.block_size}"
    )
    print0(
        f"batch: {cfg.batch_size} seqs x {seq_len} tokens x {d.world_size} ranks x {grad_accum} accumulation "
        f"= {tokens_per_step:,} tokens per step; {cfg.max_steps} steps = {tokens_per_step * cfg.max_steps:,} "
        f"tokens; train split {loader.num_tokens:,} tokens"
    )
    if cfg.warmup_steps >= cfg.max_steps > 0:
        print0(
            f"note: --warmup-steps {cfg.warmup_steps} >= --max-steps {cfg.max_steps}: the learning rate never reaches --lr"
        )
    step_tflop = model.flops_per_token(seq_len) * tokens_per_step / d.world_size / 1e12
    if device.type == "cpu" and step_tflop > 1:
        print0(
            f"warning: one step costs {step_tflop:,.1f} TFLOP per process, and a CPU does well under 1 TFLOP/s: "
            "expect minutes per step. HINT: --model tiny trains in minutes on a CPU; larger models want a GPU."
        )


# ---- logging one step ----


def settings_for_resume(
    cfg: TrainConfig, candidates: list[ckpt_lib.Checkpoint], typed: frozenset[str], tokens_per_step: int
) -> tuple[TrainConfig, tuple[list[str], list[str]]]:
    """The run's settings and how they differ from those of the checkpoint it resumes (if any).
    The batch is compared as resolved, not as flagged: without --total-batch-size it is the
    micro-batch times the number of processes, which a restart on other hardware changes."""
    if not candidates:
        return cfg, ([], [])
    meta = candidates[0].meta
    saved_tokens = meta.get("tokens_per_step", tokens_per_step)  # (not recorded by older checkpoints)
    if saved_tokens != tokens_per_step and not cfg.allow_changes:
        raise ConfigError(
            f"the run being resumed took {saved_tokens:,} tokens per step on {meta['world_size']} process(es); "
            f"these settings give {tokens_per_step:,}, which changes what is trained.\nHINT: pass "
            f"--total-batch-size {saved_tokens} (gradient accumulation makes up for fewer processes), "
            "or --allow-changes to go on with the new batch"
        )
    saved = meta.get("config", {})
    saved_chunk = (saved.get("batch_size", cfg.batch_size), saved.get("seq_len", cfg.seq_len))
    if saved_chunk != (cfg.batch_size, cfg.seq_len):
        # the loader keeps its place in the data in chunks of batch size x sequence length
        raise ConfigError(
            f"the run being resumed reads its data {saved_chunk[0]} sequences of {saved_chunk[1]} tokens at a time, "
            "and its place in the data is kept in those chunks: --batch-size and --seq-len cannot change when "
            f"it resumes.\nHINT: pass --batch-size {saved_chunk[0]} --seq-len {saved_chunk[1]} (for less memory, "
            "add --activation-checkpointing N instead, which may change); or start a new run with another --out"
        )
    cfg = keep_run_length(saved, cfg, typed)
    return cfg, config_changes(saved, cfg, candidates[0].step)


def build_checkpointer(cfg: TrainConfig, out_dir: Path, d: Dist, model: GPT, optimizer) -> ckpt_lib.Checkpointer:
    shards = sharding.ShardedState(model, optimizer) if cfg.fsdp else None  # every rank saves its own
    return ckpt_lib.Checkpointer(out_dir, cfg.checkpoint_every, cfg.keep_last, cfg.keep_every, d, print0, shards)


def save_checkpoint(
    checkpointer: ckpt_lib.Checkpointer, step: int, model: GPT, state: dict, run_meta: dict, required: bool
) -> None:
    """A periodic checkpoint that fails (a full disk) is reported and training goes on; the final
    one, or one a signal asked for, ends the run with the error."""
    try:
        checkpointer.save(step, model, state, {**run_meta, "tokens_seen": state["tokens_seen"]})
    except ckpt_lib.CheckpointError as e:
        if required:
            raise
        print0(f"error: {e}\ntraining goes on; the next checkpoint will be tried at its turn")
    if fault_injection("KILL_AFTER_CHECKPOINT", step, checkpointer.d.rank):
        os.kill(os.getpid(), signal.SIGKILL)


def step_status(loss_accum: torch.Tensor, grad_norm: torch.Tensor, stop: bool, d: Dist) -> torch.Tensor:
    """[loss, stop, grad norm] on the device, after the step's one collective: the loss summed
    over ranks, and how many ranks were asked to stop. A NaN on any rank spreads to all of them
    through this sum and the gradient all-reduce, so every rank takes the same skip decision.
    (full_like, not torch.tensor: a host-to-device copy would wait for the step.)"""
    status = torch.stack([loss_accum.float(), torch.full_like(loss_accum, float(stop))])
    if d.enabled:
        dist.all_reduce(status, op=dist.ReduceOp.SUM)
    return torch.cat([status, grad_norm.float().view(1)])


def update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, status: torch.Tensor) -> list[float]:
    """AdamW's update unless the loss or the gradient norm is not finite, and the status on the
    host: the step's one wait for the device. Fused AdamW takes the skip decision on the device
    (found_inf: the flag the fp16 gradient scaler hands it), so its kernels are queued before the
    host waits and the device never idles while the host launches them; other optimizers, and
    fp16's scaler, need the host's decision first."""
    if optimizer.defaults.get("fused") and not scaler.is_enabled():
        optimizer.found_inf = (~status.isfinite().all()).float()
        values = host_values(status)
        optimizer.step()
        del optimizer.found_inf
        return values()
    values = status.tolist()
    if all(map(math.isfinite, values)):
        scaler.step(optimizer)
    return values


def print_step(
    record: dict, cfg: TrainConfig, step_ms_avg: float, bad_steps: int, overflow: bool, eval_s_left: float
) -> None:
    step = record["step"]
    if overflow:
        print0(f"step {step:6d} | fp16 gradients overflowed: update skipped, loss scale lowered")
    elif record.get("skipped"):
        print0(
            f"step {step:6d} | non-finite loss {record['loss']} or grad norm {record['grad_norm']}: update skipped "
            f"({bad_steps} in a row, limit {cfg.max_bad_steps})"
        )
    if step % cfg.log_every and step != cfg.max_steps - 1:
        return
    eta_min = ((cfg.max_steps - step - 1) * step_ms_avg / 1000 + eval_s_left) / 60  # evaluations included
    mfu = f"{100 * record['mfu']:5.1f}%" if record["mfu"] is not None else "    -"
    print0(
        f"step {step:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | norm {record['grad_norm']:6.3f} | "
        f"{record['ms']:7.1f} ms | {record['tokens_per_sec']:10,.0f} tok/s | mfu {mfu} | eta {eta_min:.1f} min"
    )


def too_many_bad_steps(bad_steps: int, cfg: TrainConfig, out_dir: Path) -> bool:
    if bad_steps < cfg.max_bad_steps:
        return False
    print0(
        f"error: {bad_steps} consecutive steps had a non-finite loss or gradient norm; stopping. The last "
        f"good checkpoint in {out_dir / 'checkpoints'} is intact. HINT: lower --lr or check the data."
    )
    return True


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    stop = StopSignal()  # first: a signal during start-up stops the run before its first step
    d = Dist()
    try:
        cfg, args = parse_config(argv)
        if args.plot:
            import plot

            return plot.main(args.plot)
        if cfg.init_from and "model" in args.typed:
            print0(f"note: --model {cfg.model} ignored: with --init-from the model's shape comes from its weights")
        d, device = setup_distributed(cfg.device, cfg.dist_timeout_min)
        check_wandb(cfg, d)
        with attention_context(cfg.attention), claim_run_dir(run_dir(cfg), d):
            code = train(cfg, d, device, stop, args.typed)
        # Every rank is done with collectives before any closes its connections: without this,
        # gloo can abort a rank whose peer already tore down its side.
        d.barrier()
        return code
    except PeerStopped:
        return EXIT_CONFIG  # rank 0 said why
    except (ConfigError, ckpt_lib.CheckpointConflict) as e:
        print(f"{f'[rank {d.rank}] ' if d.enabled else ''}error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, DataPrepError, ckpt_lib.CheckpointError, TokenizerError) as e:
        print(f"{f'[rank {d.rank}] ' if d.enabled else ''}error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as e:  # torch.OutOfMemoryError is one, and so are a lost peer's errors
        where = f"[rank {d.rank}] " if d.enabled else ""
        if (what := out_of_memory(e)) is not None:
            print(f"{where}error: out of memory: {what}\n{OOM_HINT}", file=sys.stderr)
        elif d.enabled and peer_gone(e):
            print(f"{where}error: another process of this run stopped (its message says why): {e}", file=sys.stderr)
        else:
            raise
        return EXIT_ERROR
    finally:
        stop.restore()
        teardown_distributed()


OOM_HINT = (
    "HINT: recompute N of the blocks' activations in backward (--activation-checkpointing N; a run may "
    "resume with it); or, for a new run, lower --batch-size (--total-batch-size stays, and gradient "
    "accumulation makes up the difference) or train a smaller --model. Rerunning resumes from the newest "
    "checkpoint."
)


def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out or Path("runs") / Path(cfg.data or DEFAULT_CORPUS).name)


@contextmanager
def claim_run_dir(out_dir: Path, d: Dist) -> Iterator[None]:
    """Make --out and hold its lock for the run (rank 0): an unwritable folder fails now, before
    any set-up, and a second run started on the same folder is refused instead of writing into it.
    Every rank learns the outcome, so all of them stop together. The lock goes with the process,
    however it ends."""
    lock, refusal = None, None
    before = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else None
    if d.master:
        try:
            lock = lock_run_dir(out_dir)
        except ConfigError as e:
            refusal = e
    if d.any(refusal is not None):
        raise refusal or PeerStopped()
    try:
        yield
    finally:
        if lock is not None:
            lock.close()
            remove_if_unused(out_dir, before)


def remove_if_unused(out_dir: Path, before: set[str] | None) -> None:
    """A run that stopped before writing anything (a mistake found in set-up) leaves no trace:
    its lock file goes, and the folder too where the run made it (before: what the folder held,
    None where there was none)."""
    try:
        if {p.name for p in out_dir.iterdir()} - {".lock"} != (before or set()) - {".lock"}:
            return
        if before is None or ".lock" not in before:
            (out_dir / ".lock").unlink()
        if before is None:
            out_dir.rmdir()
    except OSError:
        pass  # (only tidiness is lost)


def lock_run_dir(out_dir: Path) -> IO[str]:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a+")
    except OSError as e:
        why = "it is a file, not a folder" if out_dir.is_file() else f"cannot write there ({e.strerror})"
        raise ConfigError(f"--out {out_dir}: {why}.\nHINT: pass an --out you can write to.") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(
            f"{out_dir} is in use by another run ({owner}).\nHINT: wait for it to end, stop it, or pass another --out."
        ) from None
    except OSError as e:  # a network filesystem mounted without locks (Lustre without -o flock)
        print0(f"WARNING: {out_dir} cannot be locked ({e.strerror}): a second run on it will not be refused")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def train(cfg: TrainConfig, d: Dist, device: torch.device, stop: StopSignal, typed: frozenset[str]) -> int:
    # ---- set-up: data, model, batch arithmetic, optimizer, resume ----
    data_dir = resolve_data_dir(cfg, d)
    data_meta = read_meta(data_dir)  # shards of other projects have none, and hold GPT-2 tokens
    amp, use_compile = autocast_dtype(cfg.dtype, device), resolve_compile(cfg, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, data_meta["vocab_size"] if data_meta else 50257, device, amp)
    seq_len = cfg.seq_len or model.config.block_size
    grad_accum = check_batch_arithmetic(cfg, seq_len, model.config.block_size, d)
    tokens_per_step = cfg.batch_size * seq_len * d.world_size * grad_accum
    train_loader, val_loader, val_chunks = build_loaders(cfg, data_dir, seq_len, grad_accum, d, device)
    out_dir = run_dir(cfg)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    checkpointer = build_checkpointer(cfg, out_dir, d, model, optimizer)
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank (a checkpoint's RNG state replaces this)
    candidates = checkpointer.candidates(cfg.resume)  # verified, newest first
    cfg, changes = settings_for_resume(cfg, candidates, typed, tokens_per_step)
    describe_run(cfg, model, out_dir, d, device, amp, use_compile, seq_len, grad_accum, train_loader)
    resume_from, tokens_seen = checkpointer.resume(candidates, model, optimizer, scaler, train_loader, cfg.seed)
    start_step = resume_from.step if resume_from else 0
    eval_model, train_model = wrap_model(model, cfg, d, device, use_compile)
    tokenizer = get_tokenizer(data_meta["tokenizer"] if data_meta else "gpt2")
    run_meta = {"config": dataclasses.asdict(cfg), "tokenizer": tokenizer.name, "tokens_per_step": tokens_per_step}
    evaluator = Evaluator(cfg, d, device, amp, val_loader, val_chunks, tokenizer, load_hellaswag(cfg, d))
    params = [p for p in model.parameters() if p.requires_grad]
    flops_per_token, peak = model.flops_per_token(seq_len), peak_flops(device)
    stop_requested, bad_steps, step_ms_avg, step_clock = d.any(stop.received is not None), 0, 0.0, None

    with MetricsLog(out_dir, cfg, d) as metrics:
        metrics.begin(start_step, resume_from is not None, run_metadata(cfg, d, device), changes)
        for step in range(start_step, cfg.max_steps + 1):
            last_step = step == cfg.max_steps
            # ---- once in a while, on the weights after `step` updates ----
            if step > start_step and (last_step or stop_requested or checkpointer.due(step)):
                state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "train_loader": train_loader.state_dict(), "tokens_seen": tokens_seen}  # fmt: skip
                save_checkpoint(checkpointer, step, model, state, run_meta, required=last_step or stop_requested)
                step_clock = None
            if stop_requested and not last_step:
                print0(f"stopped by a signal at step {step}; run the same command again to resume")
                return EXIT_PREEMPTED
            val_due, hellaswag_due = evaluator.due(step, finished_before=start_step == cfg.max_steps, metrics=metrics)
            evaluator.run(step, val_due, hellaswag_due, eval_model, metrics)
            if last_step or (cfg.sample_every and step > start_step and step % cfg.sample_every == 0):
                evaluator.print_samples(step, model)
            if last_step:
                break
            if val_due or hellaswag_due or step_clock is None:
                step_clock = time.perf_counter()  # a step's time leaves out evaluations and checkpoints

            # ---- one optimizer step: grad_accum micro-steps, then clipping and AdamW ----
            loss_accum, data_s = torch.zeros((), device=device), 0.0
            for micro_step in range(grad_accum):
                t_data = time.perf_counter()
                x, y = train_loader.next_batch()  # on the device; the copy is queued, not awaited
                data_s += time.perf_counter() - t_data
                sync = micro_step_sync(train_model, cfg, d, last=micro_step == grad_accum - 1)
                with sync, autocast_context(device, amp):
                    # [1]: the logits go at once; kept in a variable they would live through backward
                    loss = train_model(x, y)[1] / grad_accum
                if fault_injection("NAN_AT_STEP", step, d.rank):
                    loss = loss * float("nan")
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = sharding.clip_grad_norm_(params, cfg.grad_clip or math.inf)
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            status = step_status(loss_accum, grad_norm, stop.received is not None, d)
            loss_sum, stops, norm_value = update(optimizer, scaler, status)
            loss_value = loss_sum / d.world_size
            scaler.update()
            stop_requested, finite = stops > 0, math.isfinite(loss_value) and math.isfinite(norm_value)
            # fp16: gradients that overflow under a finite loss are the loss scale's to fix
            # (update() lowers it), not a sign that training diverged
            overflow = scaler.is_enabled() and math.isfinite(loss_value) and not finite
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            bad_steps = 0 if finite else bad_steps + (not overflow)
            # No device synchronisation: the optimizer's kernels run while the host logs and loads
            # the next batch, and the next step's update() waits for them.
            now = time.perf_counter()
            dt, step_clock = now - step_clock, now

            crash_if_injected(step, d.rank)
            # ---- log ----
            # the first step pays for compilation: the moving average starts at the second
            step_ms_avg = dt * 1000 if step <= start_step + 1 else 0.9 * step_ms_avg + 0.1 * dt * 1000
            mfu = flops_per_token * tokens_per_step / dt / (peak * d.world_size) if peak else None
            record = {"type": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                      "tokens_per_sec": tokens_per_step / dt, "mfu": mfu, "ms": dt * 1000, "data_ms": data_s * 1000,
                      "tokens_seen": tokens_seen, **({} if finite else {"skipped": True})}  # fmt: skip
            metrics.log(record)
            print_step(record, cfg, step_ms_avg, bad_steps, overflow, evaluator.seconds_left(step))
            if too_many_bad_steps(bad_steps, cfg, out_dir):
                return EXIT_NONFINITE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
