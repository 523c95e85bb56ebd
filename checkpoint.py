"""Checkpoints that survive crashes at any moment, and load without executing code.

Layout of a run directory:

    RUN/checkpoints/step_00001000/     one complete checkpoint (the state *before* step 1000)
        model.safetensors              unwrapped weights (tied head stored once)
        train_state.pt                 optimizer, grad scaler, data loader positions
        rng_rank00000.pt ...           Python, NumPy, torch CPU and CUDA RNG of every rank
        meta.json                      format version, step, config, file sizes and sha256
    RUN/checkpoints/latest             name of the newest complete checkpoint, written last

A sharded run (train.py --fsdp) writes no model.safetensors and keeps the optimizer out of
train_state.pt: each rank writes its shards of both through torch.distributed.checkpoint
(`__RANK_0.distcp`, and `.metadata` from rank 0), listed in meta.json like the other files.

A checkpoint is assembled in `step_XXXXXXXX.tmp/`, every file flushed to disk, then the
directory is renamed into place: a crash at any moment leaves either no new checkpoint or a
complete one, and the previous ones untouched. Loading uses safetensors and
`torch.load(weights_only=True)`, so a checkpoint file can never run code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dataloader import DataError
from files import fsync_dir, fsync_file, readable_as_usual, sha256_file, write_text_atomic
from model import GPT, HF_TOKENIZER_KEY, GPTConfig
from runtime import ConfigError, Dist, print0

FORMAT_VERSION = 1
CKPT_DIR_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or is unusable; the message says which and why."""


# ---- what a checkpoint holds ----


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights without `module.` / `_orig_mod.` prefixes, the tied head stored once."""
    sd = unwrap_model(model).state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in sd.items() if k != "lm_head.weight"}


def unwrap_model(model: torch.nn.Module) -> GPT:
    """The GPT inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def capture_rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        # NumPy's state holds an ndarray, which weights_only loading refuses: store a list
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": np_state["has_gauss"],
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- saving ----


@dataclass
class Checkpoint:
    path: Path
    meta: dict

    @property
    def step(self) -> int:
        return self.meta["step"]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(CKPT_DIR_RE.match(path.name).group(1))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    train_state: dict,
    meta: dict,
    rank: int = 0,
    world_size: int = 1,
    barrier=lambda: None,
    any_rank=lambda flag: flag,
    write_shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write the checkpoint holding the state before `step`. Every rank calls this (each
    saves its RNG state, and with write_shards, a collective, its shards of the weights and
    optimizer into the directory it is given); rank 0 writes the rest and publishes it.
    Raises CheckpointError on any failure, on every rank alike (any_rank(flag): whether flag
    is true on some rank), leaving earlier checkpoints as they were."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / (checkpoint_name(step) + ".tmp")
    failed = False
    try:
        if rank == 0:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that crashed half-way
            tmp.mkdir()
    except Exception as e:
        failed = e
    barrier()
    try:
        torch.save(capture_rng_state(), tmp / f"rng_rank{rank:05d}.pt")
        fsync_file(tmp / f"rng_rank{rank:05d}.pt")
    except Exception as e:  # a full disk is a RuntimeError from torch.save, not an OSError
        failed = failed or e
    if any_rank(bool(failed)) and not failed:  # (a checkpoint missing a rank's RNG state is not published)
        failed = "another rank could not write its RNG state"
    if write_shards is not None and not failed:
        try:
            write_shards(tmp)
        except Exception as e:
            failed = e
        if any_rank(bool(failed)) and not failed:
            failed = "another rank could not write its shards"
    if rank == 0 and not failed:
        try:
            if write_shards is None:
                save_file(model_state_for_saving(model), str(tmp / "model.safetensors"))
                readable_as_usual(tmp / "model.safetensors")
            torch.save(train_state, tmp / "train_state.pt")
            files = {}
            for p in sorted(tmp.iterdir()):
                fsync_file(p)
                files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            full_meta = {
                **meta,
                "format_version": FORMAT_VERSION,
                "step": step,
                "world_size": world_size,
                "sharded": write_shards is not None,
                "model_config": unwrap_model(model).config.to_dict(),
                "files": files,
            }
            write_text_atomic(tmp / "meta.json", json.dumps(full_meta, indent=2))
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(ckpt_root)
            write_text_atomic(ckpt_root / "latest", final.name + "\n")
        except Exception as e:  # safetensors reports a full disk as a SafetensorError
            failed = e
    if any_rank(bool(failed)) and not failed:  # every rank raises, or none does
        failed = "rank 0 could not write it"
    if failed and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        raise CheckpointError(
            f"could not write checkpoint {final} ({failed}). The training state in memory is intact and "
            f"earlier checkpoints in {ckpt_root} are untouched. HINT: free disk space or fix the "
            f"permissions of {ckpt_root}."
        )
    return final


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int, newest_step: int) -> list[Path]:
    """Delete complete checkpoints up to newest_step other than the newest `keep_last` and every
    `keep_every`-th step. Later ones (a broken checkpoint that resuming skipped) are left alone:
    they are not newer than what was just saved, and the run replaces them when it gets there."""
    ckpts = [p for p in list_checkpoint_dirs(run_dir) if checkpoint_step(p) <= newest_step]
    keep = set(ckpts[:keep_last]) if keep_last > 0 else set(ckpts)
    removed = []
    for path in ckpts:
        if path in keep or (keep_every > 0 and checkpoint_step(path) % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ---- finding and loading ----


def list_checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint directories, newest first (no .tmp leftovers)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_DIR_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


REQUIRED_FILES = ("model.safetensors", "train_state.pt", "rng_rank00000.pt")


def started_with(path: Path, resume: str) -> bool:
    """Whether the checkpoint at path was saved by a run started with this --resume value (a
    checkpoint path compared as the file it names); False where its meta cannot tell."""
    try:
        recorded = json.loads((path / "meta.json").read_text())["config"]["resume"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(recorded, str) or resume in ("auto", "never") or recorded in ("auto", "never"):
        return recorded == resume
    return os.path.realpath(recorded) == os.path.realpath(resume)


def verify_checkpoint(path: Path, weights_only: bool = False) -> dict:
    """Meta of a checkpoint after checking it against its directory: its step, the files every
    checkpoint has, and every listed file's size and sha256. weights_only: the optimizer's and
    the RNGs' files are not checked (sampling and evaluation can use a checkpoint without them)."""
    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format version {version}, this code reads {FORMAT_VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{meta_path}: no list of files or no model_config")
    if CKPT_DIR_RE.match(path.name) and meta.get("step") != checkpoint_step(path):
        raise CheckpointError(
            f"{meta_path}: says step {meta.get('step')!r}, the directory's name step {checkpoint_step(path)}"
        )
    for name in REQUIRED_FILES[1:] if meta.get("sharded") else REQUIRED_FILES:  # (shards hold the weights)
        if name not in files:
            raise CheckpointError(f"{meta_path}: lists no {name}")
    for name, info in files.items():
        f = path / name
        if weights_only and (name == "train_state.pt" or name.startswith("rng_")):
            continue
        if Path(name).name != name:
            raise CheckpointError(f"{meta_path}: file name {name!r} points outside the checkpoint")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {info['bytes']} (truncated?)")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match meta.json (corrupt)")
    return meta


def find_checkpoint(run_dir: Path, warn=print, weights_only: bool = False) -> Checkpoint | None:
    """Newest checkpoint of a run that passes verification; broken ones are skipped with a warning."""
    for path in list_checkpoint_dirs(run_dir):
        try:
            return Checkpoint(path, verify_checkpoint(path, weights_only))
        except CheckpointError as e:
            warn(f"WARNING: skipping checkpoint {path}: {e}")
    return None


def resolve_checkpoint(path: str | Path, warn=print, weights_only: bool = False) -> Checkpoint:
    """A checkpoint directory, or a run directory (its newest usable checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file() and CKPT_DIR_RE.match(path.name):
        return Checkpoint(path, verify_checkpoint(path, weights_only))
    ckpt = find_checkpoint(path, warn=warn, weights_only=weights_only)
    if ckpt is None:
        raise CheckpointError(f"no usable checkpoint in {path}")
    return ckpt


def is_checkpoint_path(path: str | Path) -> bool:
    """True for one of our checkpoint directories or a run directory holding some."""
    path = Path(path)
    return (
        (path / "meta.json").is_file() and CKPT_DIR_RE.match(path.name) is not None or bool(list_checkpoint_dirs(path))
    )


def saved_tokenizer(path: str | Path) -> str | None:
    """The tokenizer a run of ours was trained with, as its checkpoints record it (or its export,
    in config.json); None for other sources and for checkpoints from before the record. Read
    from meta.json alone: every checkpoint of a run records the same one, so a damaged one
    still tells."""
    path = Path(path)
    if not is_checkpoint_path(path):
        try:
            name = json.loads((path / "config.json").read_text()).get(HF_TOKENIZER_KEY)
        except (OSError, ValueError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    for step_dir in [path] if CKPT_DIR_RE.match(path.name) else list_checkpoint_dirs(path):
        try:
            name = json.loads((step_dir / "meta.json").read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str):
            return name
    return None


def check_model_shape(ckpt: Checkpoint, config: GPTConfig) -> None:
    expected = config.to_dict()
    saved = ckpt.meta["model_config"]
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, this run {expected[k]!r}"
        for k in ("vocab_size", "pad_vocab_to", "n_layer", "n_head", "n_embd", "block_size", "bias")
        if saved.get(k) != expected[k]
    ]
    if diffs:
        raise CheckpointError(f"{ckpt.path} was made for another model shape: " + "; ".join(diffs))


def load_model_weights(ckpt: Checkpoint, model: GPT) -> None:
    check_model_shape(ckpt, model.config)
    if ckpt.meta.get("sharded"):
        sd = read_sharded_weights(ckpt.path)
    else:
        sd = load_file(str(ckpt.path / "model.safetensors"))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd)


def read_sharded_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded checkpoint, read in this process alone (no process group
    needed), on the CPU: each tensor assembled from the shards every rank wrote."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    try:
        sd = {
            name.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
            for name, item in reader.read_metadata().state_dict_metadata.items()
            if name.startswith("model.") and isinstance(item, TensorStorageMetadata)
        }
        with warnings.catch_warnings():  # that no process group takes part is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": sd}, storage_reader=reader, no_dist=True)
    except Exception as e:  # DCP wraps a short or unreadable file in its own exception types
        raise CheckpointError(f"{path}: could not read its sharded weights ({e})") from e
    return sd


def load_train_state(ckpt: Checkpoint) -> dict:
    return torch.load(ckpt.path / "train_state.pt", map_location="cpu", weights_only=True)


def load_rng_state(ckpt: Checkpoint, rank: int) -> dict | None:
    path = ckpt.path / f"rng_rank{rank:05d}.pt"
    if not path.is_file():
        return None  # resumed on more ranks than saved
    return torch.load(path, map_location="cpu", weights_only=True)


def print0_err(message: str) -> None:
    print0(message, file=sys.stderr)


def load_model(path: str | Path, device: str | torch.device = "cpu", dropout: float | None = None) -> GPT:
    """Our GPT from a checkpoint directory or a run directory (newest usable checkpoint);
    dropout, if given, replaces the saved model's. Only the weights' files need be intact; which
    checkpoint of a run folder was loaded is said on stderr."""
    ckpt = resolve_checkpoint(path, warn=print0_err, weights_only=True)
    if ckpt.path != Path(path):
        print0_err(f"loading {ckpt.path} (step {ckpt.step})")
    config = GPTConfig.from_dict(ckpt.meta["model_config"])
    if dropout is not None:
        config = replace(config, dropout=dropout)
    model = GPT(config)
    load_model_weights(ckpt, model)
    return model.to(device)


# ---- the training loop's checkpointer ----


class Checkpointer:
    """What train.py needs of checkpoints: whether a save is due, saving and pruning, and
    resuming. Every rank calls every method; rank 0 alone writes, prunes and prints."""

    def __init__(self, run_dir: Path, every: int, keep_last: int, keep_every: int, d: Dist, warn=print, shards=None):
        self.run_dir, self.every, self.keep_last, self.keep_every = Path(run_dir), every, keep_last, keep_every
        self.d, self.warn = d, warn
        self.auto = True
        # a sharded run's weights and optimizer (sharding.ShardedState): saved and restored by every
        # rank through its save(directory) and load(directory) instead of by rank 0
        self.shards = shards

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, model: torch.nn.Module, train_state: dict, meta: dict) -> Path:
        """The checkpoint of the state before `step`; raises CheckpointError on every rank alike."""
        d, write_shards = self.d, None
        if self.shards is not None:
            train_state = {k: v for k, v in train_state.items() if k != "optimizer"}  # in the shards
            write_shards = self.shards.save
        path = save_checkpoint(
            self.run_dir, step, model, train_state, meta, d.rank, d.world_size, d.barrier, d.any, write_shards
        )
        if d.master:
            prune_checkpoints(self.run_dir, self.keep_last, self.keep_every, step)
            print(f"saved checkpoint {path}", flush=True)
        return path

    def resume(self, candidates: list[Checkpoint], model: GPT, optimizer, scaler, train_loader, seed: int):
        """Load the newest of `candidates` that loads into the run's objects: (that checkpoint or
        None, the tokens seen before it). One that cannot be loaded is skipped with a warning for
        the one before it; when checkpoints exist but none is usable the run stops instead of
        starting over on top of them."""
        for ckpt in candidates:
            error = None
            try:
                tokens_seen = self.restore(ckpt, model, optimizer, scaler, train_loader, seed)
            except (DataError, CheckpointConflict):
                raise  # other data or settings than the run's: not a damaged checkpoint
            except (CheckpointError, RuntimeError, KeyError, ValueError, TypeError, EOFError, pickle.PickleError) as e:
                error = e
            if not self.d.any(error is not None):  # every rank resumes from the same one, or none does
                self.warn(f"resumed from {ckpt.path} (step {ckpt.step}, saved by {ckpt.meta['world_size']} ranks)")
                return ckpt, tokens_seen
            why = f"{type(error).__name__}: {error}" if error else "another rank could not load it"
            if len(candidates) == 1 and not self.auto:
                raise CheckpointError(f"{ckpt.path} cannot be loaded ({why})") from error
            self.warn(f"WARNING: skipping checkpoint {ckpt.path}: cannot be loaded ({why})")
        if candidates or (self.auto and list_checkpoint_dirs(self.run_dir)):
            raise CheckpointError(
                f"no checkpoint in {self.run_dir / 'checkpoints'} is usable (see the warnings above), and starting "
                "over would mix a new run with this one's record.\nHINT: to start afresh, pass another --out (this "
                "run's files stay as they are), or move the checkpoints away."
            )
        return None, 0

    def candidates(self, resume: str) -> list[Checkpoint]:
        """Verified checkpoints to try, newest first, the same on every rank: a rank that sees
        another newest one (a node-local --out, a stale network-filesystem cache) is an error on
        all of them, where it would otherwise train from another step than the rest."""
        found = self._candidates(resume)
        newest = found[0].step if found else -1
        if not self.d.same(newest):
            raise CheckpointError(
                f"the processes see different checkpoints in {self.run_dir}: this one's newest usable one is "
                f"{f'step {newest}' if found else 'none'}, and another's differs.\nHINT: --out must be one folder "
                "that every node sees whole (shared storage, not a node-local disk); check that all nodes mount it"
            )
        return found

    def _candidates(self, resume: str) -> list[Checkpoint]:
        """With an explicit choice, later checkpoints of another run in this directory are an error:
        resuming and pruning go by step number, so they would be taken for this run's newest."""
        self.auto = resume == "auto"
        if self.auto:
            found = []
            for path in list_checkpoint_dirs(self.run_dir):
                try:
                    found.append(Checkpoint(path, verify_checkpoint(path)))
                except CheckpointError as e:
                    self.warn(f"WARNING: skipping checkpoint {path}: {e}")
            return found
        chosen = None if resume == "never" else resolve_checkpoint(resume, warn=self.warn)
        first_step = chosen.step if chosen else 0
        later = [p for p in list_checkpoint_dirs(self.run_dir) if checkpoint_step(p) > first_step]
        if later and all(started_with(p, resume) for p in later):
            # the checkpoints this same command wrote before it was stopped: running it again
            # continues from them, as --resume auto would (its flags are compared as for any resume)
            self.warn(f"{self.run_dir} holds this command's own later checkpoints (--resume {resume}): continuing")
            return self._candidates("auto")
        if later:
            raise CheckpointConflict(
                f"{self.run_dir / 'checkpoints'} holds checkpoints of steps after {first_step} "
                f"({', '.join(p.name for p in reversed(later))}), left by a run started otherwise; this run would "
                "mix with them. HINT: --resume auto continues from the newest of them; to start a new run, pass "
                "another --out, or move those checkpoints out of the way."
            )
        return [chosen] if chosen else []

    def restore(self, ckpt: Checkpoint, model: GPT, optimizer, scaler, train_loader, seed: int) -> int:
        """Load a checkpoint into the run's objects; returns the tokens seen before it."""
        if bool(ckpt.meta.get("sharded")) != (self.shards is not None):
            made, run = ("with", "without") if ckpt.meta.get("sharded") else ("without", "with")
            raise CheckpointConflict(
                f"{ckpt.path} was saved {made} --fsdp and this run is {run} it. HINT: resume with the "
                f"same --fsdp setting, or start a new run from its weights with --init-from {ckpt.path}"
            )
        state = load_train_state(ckpt)
        if self.shards is not None:
            check_model_shape(ckpt, unwrap_model(model).config)
            self.shards.load(ckpt.path)
        else:
            load_model_weights(ckpt, model)
            optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        train_loader.load_state_dict(state["train_loader"])
        rng = load_rng_state(ckpt, self.d.rank)
        if rng is not None:
            restore_rng_state(rng)
        else:  # a rank the saving run did not have
            torch.manual_seed(seed + self.d.rank)
        return int(state["tokens_seen"])


class CheckpointConflict(CheckpointError):
    """Checkpoints of another run stand where this run would write its own: a configuration error."""


# ---- weights from anywhere: our runs, Hugging Face folders, the hub ----

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def load_pretrained(
    source: str, device: str | torch.device = "cpu", dropout: float | None = None, pad_vocab_to: int = 1
) -> GPT:
    """Our GPT from one of our run or checkpoint folders, a Hugging Face GPT-2 folder, or one
    of OpenAI's GPT-2 sizes on the Hugging Face hub. dropout, if given, replaces the saved
    model's; pad_vocab_to applies to Hugging Face weights (our checkpoints keep their own).

    A source that is none of these raises runtime.ConfigError before anything is loaded: a
    mistyped path would otherwise be taken for a hub name, and the hub client retries for
    tens of seconds before failing. A hub that cannot be reached is a CheckpointError."""
    path = Path(source)
    if is_checkpoint_path(path):
        return load_model(path, device, dropout)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(
            f"{source} holds no checkpoint (no checkpoints/step_*) and is no Hugging Face model folder "
            "(no config.json). HINT: name a run folder that has saved a checkpoint, a checkpoint folder "
            "(RUN/checkpoints/step_N), or a folder written by save_pretrained"
        )
    if not path.is_dir() and source not in HUB_MODELS:
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ConfigError(
            f"{source} {what}, and it is not one of the Hugging Face names {', '.join(HUB_MODELS)}. "
            "HINT: check the path (runs are in runs/ unless --out said otherwise: ls runs)"
        )
    try:
        return GPT.from_pretrained(source, pad_vocab_to, dropout or 0.0).to(device)
    except ValueError as e:  # a GPT-2 variant this model would compute differently
        raise ConfigError(str(e)) from e
    except OSError as e:
        if path.is_dir():
            raise CheckpointError(f"could not read the Hugging Face model in {source}: {e}") from e
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"could not load {source} from the Hugging Face hub: {reason}\n"
            "HINT: without network, load it once where there is network (it is cached in ~/.cache/huggingface, "
            "or $HF_HOME) and set HF_HUB_OFFLINE=1; or pass a folder written by save_pretrained"
        ) from e
