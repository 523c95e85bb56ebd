"""HellaSwag, completion style: does the model give the right ending the highest probability?

Each item is a context and four candidate endings. Every ending is appended to the context after
a space (its tokens are `encode(" " + ending)`) and scored by the model's loss on the ending
tokens alone; the context only conditions. Two accuracies:

- acc:      the ending with the highest summed log-probability (lowest summed loss);
- acc_norm: the ending with the lowest mean loss per ending token, so that an ending does not
            win merely by being short.

This is the scoring of the original GPT-2 reproduction, whose published figures on the official
validation split are acc 0.2859 / acc_norm 0.2955 for GPT-2 124M and 0.3842 / 0.4893 for
GPT-2 XL (`--model_type gpt2` / `gpt2-xl` with `--dtype float32` compare against them).

Fast because the four endings of many items share one forward pass: rows are sorted by length,
padded to a multiple of SEQ_MULTIPLE (few distinct shapes, so a compiled model rarely
recompiles), and the losses stay on the device until one copy at the end. Under torchrun each
rank scores items rank::world_size and the integer counts are summed, so the split is exact.

    python hellaswag.py --model_type gpt2 --device cuda
    torchrun --nproc_per_node 8 hellaswag.py --checkpoint runs/NAME --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

import files
from runtime import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_OK,
    ConfigError,
    HelpFormatter,
    out_of_memory,
    run_command,
    setup_distributed,
    teardown_distributed,
)

if TYPE_CHECKING:
    from model import GPT, GPTConfig
    from tokenizer import Tokenizer

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_EXAMPLES = 10042
NUM_ENDINGS = 4
SEQ_MULTIPLE = 32  # batch lengths are rounded up to this: HellaSwag then needs at most 5 shapes


# ---- data ----


def cache_dir() -> Path:
    """Where the official split is kept: the hellaswag folder of the download cache (files.cache_dir)."""
    return files.cache_dir("hellaswag")


class HellaSwagError(ValueError):
    """Bad or missing HellaSwag data; the message names the file and says what to do."""


def _check_item(item: dict, where: str) -> dict:
    ctx, endings, label = item.get("ctx"), item.get("endings"), item.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise HellaSwagError(f"{where}: 'ctx' must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    # the official file stores the label as an int; some exports store "0".."3"
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagError(f"{where}: 'label' must be an integer in [0, {NUM_ENDINGS})")
    return {"ctx": ctx, "endings": endings, "label": label}


def read_examples(path: str | Path) -> list[dict]:
    """Items of a HellaSwag JSONL file (only `ctx`, `endings`, `label` are read), checked line by
    line. Any fault of the file, unreadable or not UTF-8 included, is a HellaSwagError."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HellaSwagError(f"{path}:{line_no}: not a JSON object ({e})") from e
                examples.append(_check_item(item, f"{path}:{line_no}"))
    except UnicodeDecodeError as e:
        raise HellaSwagError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): not a HellaSwag JSONL file"
        ) from e
    except OSError as e:
        raise HellaSwagError(f"cannot read {path}: {e.strerror or e}") from e
    return examples


def download_validation(dest: Path, url: str = HELLASWAG_VAL_URL, expected: int = HELLASWAG_VAL_EXAMPLES) -> Path:
    """Download the validation split to dest. It is renamed to dest only once all `expected`
    items have parsed, so an interrupted or truncated download never leaves a file there."""

    def check(path: Path) -> None:
        got = len(read_examples(path))
        if got != expected:
            raise ValueError(f"downloaded {got} items, expected {expected}")

    hint = f"download {url} on a machine with network and either pass its path (hellaswag.py --data-file, train.py --hellaswag-file) or copy it to {dest}"
    try:
        return files.download(url, dest, check=check, hint=hint)
    except files.DownloadError as e:
        raise HellaSwagError(
            f"could not download the HellaSwag validation split from {str(e).removeprefix('could not download ')}"
        ) from e


def load_examples(data_file: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """HellaSwag items from data_file, or from the official validation split (downloaded once and
    cached, see cache_dir()) when data_file is None. limit keeps the first `limit` items."""
    if limit is not None and limit < 1:
        raise HellaSwagError(f"limit must be >= 1, got {limit}")
    if data_file is not None:
        examples = read_examples(data_file)
    else:
        path = cache_dir() / "hellaswag_val.jsonl"
        examples = None
        if path.is_file():
            try:
                examples = read_examples(path)
            except HellaSwagError:
                pass
            if examples is None or len(examples) != HELLASWAG_VAL_EXAMPLES:
                # only a complete, checked download is ever renamed to this name: someone changed it
                print(f"{path} is not the {HELLASWAG_VAL_EXAMPLES}-item validation split; downloading it again")
                examples = None
        if examples is None:
            examples = read_examples(download_validation(path))
    if not examples:
        raise HellaSwagError(f"no HellaSwag items in {data_file}")
    return examples[:limit] if limit is not None else examples


# ---- rendering ----


def _gpt2_tokenizer() -> Tokenizer:
    from tokenizer import get_tokenizer

    return get_tokenizer("gpt2")  # cached by get_tokenizer


def fit_to_window(ctx: list[int], ending: list[int], max_len: int) -> tuple[list[int], int]:
    """ctx + ending cut to at most max_len tokens, and the index where the ending starts.

    Tokens are dropped from the left of the context: the ending is what is scored, and the end
    of the context is what it depends on most. (HellaSwag items are under 150 GPT-2 tokens, so
    this only happens for models with a short block_size.) An ending that alone fills the window
    keeps its first max_len - 1 tokens after the last context token.
    """
    if len(ctx) + len(ending) <= max_len:
        return ctx + ending, len(ctx)
    ending = ending[: max_len - 1]
    ctx = ctx[-(max_len - len(ending)) :]
    return ctx + ending, len(ctx)


def render_rows(example: dict, tokenizer: Tokenizer, block_size: int) -> tuple[list[list[int]], list[int]]:
    """The four rows of an item (context + ending tokens) and where each ending starts.

    A row of n tokens is n - 1 inputs (its last token is only a target), so rows of up to
    block_size + 1 tokens fit the model's window."""
    ctx = tokenizer.encode(example["ctx"])
    rows, starts = [], []
    for ending in example["endings"]:
        row, start = fit_to_window(ctx, tokenizer.encode(" " + ending), block_size + 1)
        if start < 1:
            raise ValueError(f"context {example['ctx']!r} has no tokens: the first ending token would go unscored")
        if start == len(row):
            raise ValueError(f"ending {ending!r} has no tokens")
        rows.append(row)
        starts.append(start)
    return rows, starts


def render_example(
    example: dict, tokenizer: Tokenizer | None = None, block_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens, mask, label): tokens (4, L) with the rows right-padded with 0, mask (4, L) 1 on
    ending tokens and 0 on context and padding. The layout of the original script."""
    rows, starts = render_rows(example, tokenizer or _gpt2_tokenizer(), block_size)
    L = max(len(r) for r in rows)
    tokens = torch.zeros(NUM_ENDINGS, L, dtype=torch.long)
    mask = torch.zeros(NUM_ENDINGS, L, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, start : len(row)] = 1
    return tokens, mask, example["label"]


# ---- batched evaluation ----


def _gpt_config(model: torch.nn.Module) -> GPTConfig:
    """The GPTConfig of our GPT, also through torch.compile's wrapper (which forwards attributes)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"expected our GPT (or a torch.compile'd GPT), got {type(model).__name__}")
    return config


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    # DDP's forward may broadcast buffers, a collective; ranks here run different numbers of batches
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _make_batches(
    rows: list[list[int]], starts: list[int], rows_per_batch: int, block_size: int, pin: bool
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int]], list[int]]:
    """(idx, targets, n_real_rows) batches on the host, and the row order they follow.

    Longest rows first, so a batch that does not fit in memory fails at once. Every batch has
    rows_per_batch rows (the last is filled with empty rows) and a length rounded up to
    SEQ_MULTIPLE: a compiled model then sees only a handful of shapes. Targets are -1 except on
    ending tokens, so the model's per-token loss is the ending's loss and 0 elsewhere.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches = []
    for first in range(0, len(order), rows_per_batch):
        ids = order[first : first + rows_per_batch]
        T = min(-(-(len(rows[ids[0]]) - 1) // SEQ_MULTIPLE) * SEQ_MULTIPLE, block_size)
        # numpy fills rows from Python lists several times faster than torch does
        idx = np.zeros((rows_per_batch, T), dtype=np.int64)
        targets = np.full((rows_per_batch, T), -1, dtype=np.int64)
        for j, i in enumerate(ids):
            row, start, n = rows[i], starts[i], len(rows[i]) - 1
            idx[j, :n] = row[:-1]
            targets[j, start - 1 : n] = row[start:]
        idx, targets = torch.from_numpy(idx), torch.from_numpy(targets)
        if pin:  # page-locked memory lets the copy to the GPU run without blocking the host
            idx, targets = idx.pin_memory(), targets.pin_memory()
        batches.append((idx, targets, len(ids)))
    return batches, order


def score_rows(
    model: torch.nn.Module,
    rows: list[list[int]],
    starts: list[int],
    device: str | torch.device,
    rows_per_batch: int,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    min_batches: int = 0,
) -> torch.Tensor:
    """Summed loss of each row's ending tokens, as a CPU float32 tensor in the order of rows.
    progress: a progress bar (in items, four rows each) when stderr is a terminal. At least
    min_batches forward passes, the extra ones on empty rows of the last batch's shape."""
    from tqdm import tqdm

    device = torch.device(device)
    batches, order = _make_batches(
        rows, starts, rows_per_batch, _gpt_config(model).block_size, pin=device.type == "cuda"
    )
    T = batches[-1][0].shape[1] if batches else SEQ_MULTIPLE
    while len(batches) < min_batches:
        batches.append((torch.zeros(rows_per_batch, T, dtype=torch.long), torch.full((rows_per_batch, T), -1), 0))
    sums = []
    bar = tqdm(
        total=len(rows) // NUM_ENDINGS, desc="hellaswag", unit="item", disable=not (progress and sys.stderr.isatty())
    )
    with bar, _autocast(device, autocast_dtype):
        for idx, targets, n in batches:
            idx, targets = idx.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            loss = model(idx, targets, reduction="none")[1]
            sums.append(loss[:n].float().sum(dim=1))
            # (on a GPU the host runs a few batches ahead of the device: the bar leads a little)
            bar.update(n // NUM_ENDINGS)
    by_order = torch.cat(sums).cpu() if sums else torch.zeros(0)  # the one device-to-host copy
    result = torch.empty(len(rows))
    result[torch.tensor(order, dtype=torch.long)] = by_order
    return result


def compile_for_scoring(model: GPT) -> torch.nn.Module:
    """model compiled for evaluate(), where compilation takes longer than the scoring itself.
    Block by block: the blocks are alike, so one block's graph serves them all. Dynamic shapes:
    the batches come in a handful of lengths, and one graph for all of them compiles once, where
    static shapes compile a graph for the first length and another at the second."""
    from model import compile_model

    return compile_model(model, scope="blocks", dynamic=True)


def evaluate(
    model: torch.nn.Module,
    examples: list[dict],
    device: str | torch.device,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    tokenizer: Tokenizer | None = None,
    progress: bool = False,
) -> dict:
    """{"acc", "acc_norm", "num_examples"} of model on examples, batch_size items per forward pass.

    With world_size > 1 (torch.distributed initialised) every rank must pass the same examples:
    rank r scores items r::world_size and the integer counts are summed over ranks. The split
    and the batch size change only which items share a forward pass, never the counting; the
    scores themselves can differ in the last bits with the batch shape, which matters only for
    endings whose losses tie to rounding. tokenizer defaults to GPT-2's; it needs only `encode`.
    The model is put in eval mode and returned to the mode it was in. progress (for one rank):
    a progress bar of this rank's items on a terminal, else a line when scoring starts and one
    when it ends, on stderr.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    model = _unwrap_ddp(model)
    config = _gpt_config(model)
    tokenizer = tokenizer or _gpt2_tokenizer()
    if getattr(tokenizer, "vocab_size", 0) > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model only {config.vocab_size}")

    local = examples[rank::world_size]
    rows, starts = [], []
    for example in local:
        r, s = render_rows(example, tokenizer, config.block_size)
        rows += r
        starts += s

    log = progress and not sys.stderr.isatty()  # a log file gets two lines, not a bar's redraws
    if log:
        share = f", {len(local)} on this rank" if world_size > 1 else ""
        print(f"hellaswag: scoring {len(examples)} items{share}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # every rank runs as many forward passes, as many as the rank with the most items: a sharded
    # model (train.py --fsdp) gathers its weights with all ranks in each one
    most_batches = -(-len(examples[0::world_size]) // batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sums = score_rows(
                model, rows, starts, device, NUM_ENDINGS * batch_size, autocast_dtype, progress, most_batches
            )
    finally:
        model.train(was_training)
    if log:
        print(f"hellaswag: scored {len(local)} items in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    sums = sums.view(-1, NUM_ENDINGS)
    n_tokens = torch.tensor([len(r) - s for r, s in zip(rows, starts, strict=True)], dtype=torch.float32)
    labels = torch.tensor([e["label"] for e in local], dtype=torch.long)
    # argmin takes the first of equal values, so an exact tie goes to the lower ending index
    pred = sums.argmin(dim=1)
    pred_norm = (sums / n_tokens.view(-1, NUM_ENDINGS)).argmin(dim=1)
    counts = torch.tensor([int((pred == labels).sum()), int((pred_norm == labels).sum()), len(local)], dtype=torch.long)
    if world_size > 1:
        counts = counts.to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, correct_norm, n = counts.tolist()
    return {"acc": correct / n, "acc_norm": correct_norm / n, "num_examples": n}


# ---- reference: one item per forward pass ----


def evaluate_one_at_a_time(
    model: torch.nn.Module,
    examples: list[dict],
    device: str | torch.device,
    autocast_dtype: torch.dtype | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """The loop of the original script: one item's four rows per forward pass and a host sync
    per item. The baseline of bench/hellaswag.py and an independent check in the tests."""
    device = torch.device(device)
    model = _unwrap_ddp(model)
    block_size = _gpt_config(model).block_size
    tokenizer = tokenizer or _gpt2_tokenizer()
    correct = correct_norm = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, autocast_dtype):
            for example in examples:
                tokens, mask, label = render_example(example, tokenizer, block_size)
                tokens, mask = tokens.to(device), mask.to(device)
                targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
                loss = model(tokens[:, :-1].contiguous(), targets, reduction="none")[1]
                sums = loss.float().sum(dim=1)
                correct += int(sums.argmin().item() == label)
                correct_norm += int((sums / mask[:, 1:].sum(dim=1)).argmin().item() == label)
    finally:
        model.train(was_training)
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "num_examples": n}


# ---- command line ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model_type",
        "--model-type",
        dest="model_type",
        default=None,
        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (Hugging Face hub) or a local Hugging Face "
        "GPT-2 directory; loaded into this project's GPT (default: gpt2)",
    )
    source.add_argument(
        "--checkpoint",
        default=None,
        help="one of this project's checkpoints: a checkpoint directory, or a run directory (its latest checkpoint)",
    )
    p.add_argument("--device", default="auto", help="cuda, cuda:N, mps, cpu, or auto (the best present)")
    p.add_argument(
        "--data-file",
        default=None,
        help="a local HellaSwag JSONL (needs ctx, endings, label) instead of the downloaded validation split",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=int, default=32, help="items per forward pass (each is 4 rows)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="float32 (default) to compare with published figures; bfloat16 autocast for speed on GPUs, "
        "which can move the scores in their last digits",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (block by block, dynamic shapes) before evaluating",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object: acc, acc_norm, num_examples")
    args = p.parse_args(argv)
    if args.model_type is None and args.checkpoint is None:
        args.model_type = "gpt2"
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every flag that cannot work, before a model is loaded or the split downloaded."""
    errors = []
    if args.limit is not None and args.limit < 1:
        errors.append(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        errors.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.data_file is not None and not Path(args.data_file).is_file():
        errors.append(f"--data-file {args.data_file} is not a file")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        errors.append(
            f"--checkpoint {args.checkpoint} is not a folder. HINT: name a run folder (runs/NAME) or one of "
            "its checkpoints (runs/NAME/checkpoints/step_N)"
        )
    elif args.checkpoint is not None and _hugging_face_folder(Path(args.checkpoint)):
        errors.append(
            f"--checkpoint {args.checkpoint} is a Hugging Face model folder (an export: config.json and its "
            f"weights), not one of this project's checkpoints. HINT: evaluate it with --model_type {args.checkpoint}"
        )
    if errors:
        raise ConfigError("\n".join(errors))


def _hugging_face_folder(path: Path) -> bool:
    """Whether path holds a save_pretrained folder (what sharding.py export writes) and no run."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    has_weights = any((path / name).is_file() for name in weights)
    return (path / "config.json").is_file() and has_weights and not (path / "checkpoints").exists()


def _load_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from checkpoint import load_model, load_pretrained

    if args.checkpoint is not None:
        return load_model(args.checkpoint, device=str(device))
    return load_pretrained(args.model_type, device)


def _trained_tokenizer(args: argparse.Namespace) -> Tokenizer:
    """The tokenizer the checkpoint's run recorded (GPT-2's for Hugging Face models and older
    checkpoints): items must be tokenized as the model's training data was."""
    from checkpoint import saved_tokenizer
    from tokenizer import get_tokenizer

    return get_tokenizer(saved_tokenizer(args.checkpoint or args.model_type) or "gpt2")


def run(argv: list[str] | None = None) -> dict:
    """The command line's work: evaluate and print; returns acc, acc_norm, num_examples."""
    args = parse_args(argv)
    d, device = setup_distributed(args.device, timeout_min=30.0)
    rank, world_size = d.rank, d.world_size
    try:
        model = _load_model(args, device)
        if args.compile:
            model = compile_for_scoring(model)
        # rank 0 downloads the split (if needed) before the others read the cached copy
        if rank == 0:
            examples = load_examples(args.data_file, args.limit)
        if world_size > 1:
            dist.barrier()
        if rank != 0:
            examples = load_examples(args.data_file, args.limit)
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
        t0 = time.perf_counter()
        tokenizer = _trained_tokenizer(args)
        result = evaluate(
            model, examples, device, args.batch_size, rank, world_size, dtype, tokenizer, progress=rank == 0
        )
        elapsed = time.perf_counter() - t0
        if rank == 0:
            if args.json:
                print(json.dumps(result))
            else:
                name = args.checkpoint or args.model_type
                print(
                    f"hellaswag {name}: {result['num_examples']} items, acc {result['acc']:.4f}, "
                    f"acc_norm {result['acc_norm']:.4f} ({elapsed:.1f} s, "
                    f"{result['num_examples'] / elapsed:.0f} items/s)"
                )
        if world_size > 1:
            dist.barrier()  # no rank closes its connections while another still uses them (see train.main)
        return result
    finally:
        teardown_distributed()


def main(argv: list[str] | None = None) -> int:
    from checkpoint import CheckpointError
    from tokenizer import TokenizerError

    # under torchrun every rank may report; the prefix says which
    where = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    try:
        run(argv)
    except ConfigError as e:
        print(f"{where}error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        raise  # not an error of ours: the reader of stdout has gone (run_command ends quietly)
    except (HellaSwagError, CheckpointError, TokenizerError, OSError) as e:
        print(f"{where}error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if (what := out_of_memory(e)) is None:
            raise
        print(
            f"{where}error: out of memory: {what}\nHINT: lower --batch-size (items per forward pass)", file=sys.stderr
        )
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_command(main))
