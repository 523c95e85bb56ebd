"""Every flag of train.py, declared once: a TrainConfig field with its default, its help text and
the range it must lie in. The command line, the checks and config.json all come from these
fields, and every value is checked before the run writes anything."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

from model import COMPILE_MODES, COMPILE_SCOPES, PRESETS
from runtime import ATTENTION_BACKENDS, ConfigError, HelpFormatter, print0

DEFAULT_CORPUS = "tinyshakespeare"
USAGE = """Train a GPT-2: one process (CPU, MPS, one GPU) or many under torchrun (DDP).

    python train.py                                    # small GPT on tiny Shakespeare, any machine
    python train.py --data data/fineweb_edu --model gpt2 --seq-len 1024 --batch-size 16 \\
        --total-batch-size 524288                      # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data ... --model gpt2
    torchrun --standalone --nproc_per_node=8 train.py --data ... --model gpt2-xl --fsdp   # sharded

Rerunning the same command resumes from the newest complete checkpoint in --out.
Exit codes: 0 finished; 1 error; 2 bad flags or configuration; 3 stopped after too many
consecutive non-finite steps; 75 stopped by a signal after saving a checkpoint (run the same
command again to continue).
"""


def _flag(default, help: str, at_least=None, above=None, below=None, **argparse_kw):
    """A TrainConfig field: its default, its --help text, the range it must lie in (checked for
    every numeric field, with finiteness), and anything else argparse should know."""
    return field(default=default, metadata={"help": help, "range": (at_least, above, below), **argparse_kw})


@dataclass
class TrainConfig:
    # data and run directory
    data: str = _flag("", f"prepared data directory (prepare_data.py); empty: {DEFAULT_CORPUS}, prepared on first use")
    out: str = _flag("", "run directory for config, metrics.jsonl and checkpoints; empty: runs/<data dir name>")
    # model
    model: str = _flag("tiny", f"model preset: {', '.join(PRESETS)}")
    n_layer: int | None = _flag(None, "override the preset's number of layers", at_least=1)
    n_head: int | None = _flag(None, "override the preset's number of attention heads", at_least=1)
    n_embd: int | None = _flag(None, "override the preset's embedding width", at_least=1)
    dropout: float = _flag(0.0, "dropout probability (0 for pretraining)", at_least=0, below=1)
    pad_vocab: int = _flag(
        64, "round the vocabulary up to a multiple of this for faster matmuls (1: no padding)", at_least=1
    )
    init_from: str = _flag("", "start from weights: a Hugging Face GPT-2 name or directory, or one of our checkpoints")
    # batch
    batch_size: int = _flag(8, "micro-batch size per process (sequences)", at_least=1)
    seq_len: int | None = _flag(None, "tokens per sequence; default: the model's block size", at_least=1)
    total_batch_size: int | None = _flag(
        None,
        "tokens per optimizer step over all processes; gradient accumulation makes up the difference; "
        "default: batch-size * seq-len * world size",
        at_least=1,
    )
    # optimisation
    max_steps: int = _flag(300, "optimizer steps to train for", at_least=1)
    lr: float = _flag(1e-3, "peak learning rate", above=0)
    min_lr: float | None = _flag(None, "learning rate at the end of the cosine decay; default: lr / 10", at_least=0)
    warmup_steps: int = _flag(20, "steps of linear warm-up from 0 to lr", at_least=0)
    weight_decay: float = _flag(0.1, "AdamW weight decay on matrices and embeddings", at_least=0)
    beta1: float = _flag(0.9, "AdamW beta1", at_least=0, below=1)
    beta2: float = _flag(0.95, "AdamW beta2", at_least=0, below=1)
    grad_clip: float = _flag(1.0, "clip the global gradient norm to this (0: no clipping)", at_least=0)
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
        at_least=0,
        metavar="N",
    )
    fused_loss: bool = _flag(
        True,
        "output layer and cross-entropy a chunk of positions at a time, never holding all the logits "
        "(--no-fused-loss: the plain F.cross_entropy path)",
    )
    device: str = _flag("auto", "cuda, cuda:N, mps, cpu, or auto (the best present)")
    fsdp: bool = _flag(
        False,
        "shard the weights, gradients and AdamW state over all processes (FSDP2) instead of keeping a whole "
        "copy on each (DDP): for models whose training state does not fit on one GPU; slower where it does",
    )
    fsdp_grad_sync: str = _flag(
        "micro-step",
        "with --fsdp and gradient accumulation, reduce-scatter the gradients after every micro-step "
        "(micro-step: they stay sharded, the least memory) or after the last one only (step: each process "
        "holds a whole fp32 gradient between micro-steps, in exchange for less communication)",
        choices=["micro-step", "step"],
    )
    seed: int = _flag(1337, "random seed (model init, data shuffle, dropout, sampling)", at_least=0, below=2**63)
    # evaluation, samples, logging
    eval_every: int = _flag(100, "validation loss every N steps and at the end (0: never)", at_least=0)
    eval_tokens: int = _flag(
        16384, "validation tokens per evaluation, the same tokens whatever the world size", at_least=1
    )
    sample_every: int = _flag(0, "print samples every N steps (0: only at the end)", at_least=0)
    sample_prompt: str = _flag("\n", "prompt that samples start from (default: a newline)")
    sample_tokens: int = _flag(64, "tokens per sample", at_least=0)
    num_samples: int = _flag(2, "samples printed each time (0: none)", at_least=0)
    hellaswag_every: int = _flag(0, "HellaSwag accuracy every N steps and at the end (0: never)", at_least=0)
    hellaswag_limit: int = _flag(0, "evaluate only the first N HellaSwag examples (0: all)", at_least=0)
    hellaswag_file: str = _flag("", "local HellaSwag JSONL instead of the downloaded validation split")
    hellaswag_batch_size: int = _flag(16, "HellaSwag items per forward pass (4 rows each)", at_least=1)
    log_every: int = _flag(1, "print a training line every N steps", at_least=1)
    wandb: str = _flag("", "also log to this Weights & Biases project (needs the wandb package)")
    # checkpoints and fault tolerance
    checkpoint_every: int = _flag(
        250, "save a checkpoint every N steps (0: only at the end and on signals)", at_least=0
    )
    keep_last: int = _flag(2, "keep the newest N checkpoints (0: keep all)", at_least=0)
    keep_every: int = _flag(0, "also keep every checkpoint whose step is a multiple of N (0: none)", at_least=0)
    resume: str = _flag(
        "auto", "auto: continue from the newest usable checkpoint in --out; never; or a checkpoint path"
    )
    allow_changes: bool = _flag(
        False, "resume even where flags that change what is trained (model, batch, schedule, data) differ"
    )
    max_bad_steps: int = _flag(
        5, "stop after this many consecutive steps with a non-finite loss or gradient norm", at_least=1
    )
    dist_timeout_min: float = _flag(10.0, "minutes a collective may wait before a hung rank becomes an error", above=0)

    def __post_init__(self) -> None:
        errors = [e for f in dataclasses.fields(self) if (e := _range_error(f, getattr(self, f.name)))]
        if self.model not in PRESETS:
            errors.append(f"--model {self.model!r} is not a preset; choose one of: {', '.join(PRESETS)}")
        if self.min_lr is not None and self.min_lr > self.lr:
            errors.append(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if self.fsdp and self.dtype == "fp16":
            errors.append(
                "--fsdp does not take --dtype fp16: the gradient scaler's overflow check would see each process's "
                "shards only; use --dtype bf16"
            )
        if self.fsdp_grad_sync != "micro-step" and not self.fsdp:
            errors.append(f"--fsdp-grad-sync {self.fsdp_grad_sync} needs --fsdp (add it, or leave the flag out)")
        if self.out and os.path.realpath(self.out) == os.path.realpath(self.data or f"data/{DEFAULT_CORPUS}"):
            errors.append(f"--out {self.out} is the --data folder: a run's files would mix with the shards")
        if self.resume not in ("auto", "never") and not os.path.isdir(self.resume):
            errors.append(
                f"--resume {self.resume}: no such folder. HINT: --resume auto (the newest checkpoint in --out), "
                "never, or a checkpoint's folder (RUN/checkpoints/step_N) or a run's folder"
            )
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            errors.append(f"--device {self.device!r}: use auto, cpu, mps, cuda or cuda:N")
        if errors:
            raise ConfigError("\n".join(errors))


def _range_error(f: dataclasses.Field, value) -> str | None:
    """What is wrong with a numeric field's value, or None."""
    if value is None or isinstance(value, (bool, str)):
        return None
    flag = "--" + f.name.replace("_", "-")
    at_least, above, below = f.metadata["range"]
    if isinstance(value, float) and not math.isfinite(value):
        return f"{flag} must be a finite number, got {value}"
    if at_least is not None and below is not None and not at_least <= value < below:
        return f"{flag} must be in [{at_least}, {below}), got {value}"
    if at_least is not None and value < at_least:
        return f"{flag} must be >= {at_least}, got {value}"
    if above is not None and value <= above:
        return f"{flag} must be > {above}, got {value}"
    return None


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev off: launch/ scripts set --out and --resume themselves and refuse those flags
    # from the user, which they could not see under a prefix such as --ou or --res
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=HelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {k: v for k, v in f.metadata.items() if k != "range"}
        kind = str(f.type)
        if kind in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=kw["help"])
            continue
        convert = {"int": int, "int | None": int, "float": float, "float | None": float}.get(kind, str)
        kw.setdefault("metavar", f.name.split("_")[-1].upper())
        parser.add_argument(flag, type=convert, default=f.default, **kw)
    parser.add_argument("--plot", nargs="+", metavar="RUN", help="draw the loss curves of these runs to a PNG and exit")
    return parser


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """The configuration, and the parsed arguments with `typed`: the names of the flags given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    for action in parser._actions:  # parsed again without defaults: what is left was typed
        action.default = argparse.SUPPRESS
    args.typed = frozenset(vars(parser.parse_args(argv)))
    return TrainConfig(**values), args


# ---- a rerun whose flags differ from the run it resumes ----

# Flags that change what is trained: resuming with another value would silently make the
# weights the product of two different runs. The others change only speed, memory, logging
# or evaluation, and may change between restarts.
TRAINING_FLAGS = (
    "data", "model", "n_layer", "n_head", "n_embd", "dropout", "pad_vocab", "init_from",
    "batch_size", "seq_len", "total_batch_size", "lr", "min_lr", "warmup_steps", "weight_decay",
    "beta1", "beta2", "grad_clip", "shuffle", "seed", "dtype",
)  # fmt: skip
# Flags that say how to run, not what the run is: never reported as changes.
INVOCATION_FLAGS = ("resume", "allow_changes", "out")


def keep_run_length(saved: dict, cfg: TrainConfig, typed: frozenset[str]) -> TrainConfig:
    """cfg with the resumed run's --max-steps unless one was typed: rerunning a run with fewer
    flags than it was started with (`python train.py --out DIR`) finishes it as it was planned,
    rather than training a finished run on to the default length."""
    if "max_steps" in typed or saved.get("max_steps", cfg.max_steps) == cfg.max_steps:
        return cfg
    print0(f"--max-steps not given: the run's own {saved['max_steps']} (pass --max-steps to train it longer)")
    return dataclasses.replace(cfg, max_steps=saved["max_steps"])


def config_changes(saved: dict, cfg: TrainConfig, resumed_step: int) -> tuple[list[str], list[str]]:
    """(changes to what is trained, other changes) between the saved run's flags and these, one
    line each. Raises ConfigError for changes to what is trained unless --allow-changes is set."""
    new = dataclasses.asdict(cfg)
    data_dir = {c["data"] or f"data/{DEFAULT_CORPUS}" for c in (saved, new) if "data" in c}
    if len({os.path.realpath(d) for d in data_dir}) == 1:  # one folder, however named (the default corpus too)
        saved = {**saved, "data": new["data"]}
    changed = [k for k in new if k in saved and saved[k] != new[k] and k not in INVOCATION_FLAGS]
    describe = [f"--{k.replace('_', '-')}: {saved[k]!r} -> {new[k]!r}" for k in changed]
    training = [line for k, line in zip(changed, describe) if k in TRAINING_FLAGS]
    other = [line for k, line in zip(changed, describe) if k not in TRAINING_FLAGS]
    if "max_steps" in changed:
        if cfg.max_steps < resumed_step:
            raise ConfigError(
                f"--max-steps {cfg.max_steps}: this run already took {resumed_step} steps.\n"
                "HINT: pass a larger --max-steps, or start afresh with another --out."
            )
        old_lr = learning_rate(resumed_step, TrainConfig(**{**new, "max_steps": saved["max_steps"]}))
        other.append(
            f"(the cosine schedule now ends at step {cfg.max_steps} instead of {saved['max_steps']}: the learning "
            f"rate at step {resumed_step} goes from {old_lr:.3g} to {learning_rate(resumed_step, cfg):.3g})"
        )
    if training and not cfg.allow_changes:
        raise ConfigError(
            f"these flags differ from the run being resumed (step {resumed_step}), and change what is trained:\n  "
            + "\n  ".join(training)
            + "\nHINT: pass the run's own values to continue it; or --out DIR to train a new run elsewhere; or "
            "--allow-changes to continue with the new values (recorded in metrics.jsonl)."
        )
    return training, other


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at max_steps."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - min_lr)
