"""Batches of (x, y) token ids from memory-mapped shards, for any rank of any world size.

    loader = ShardedDataLoader("data/tinyshakespeare", "train", batch_size=8, seq_len=1024,
                               rank=rank, world_size=world_size, shuffle=True, seed=0, device="cuda:0")
    x, y = loader.next_batch()       # int64 tensors of shape (B, T) on the device; y is x shifted by one

The formats it reads and the checks it makes are in the README. What a code reader needs:

The shards of a split, in name order, form one virtual stream of N tokens. A *chunk* is B*T
tokens of it: chunk c covers tokens [c*B*T, c*B*T + B*T + 1) (one extra token for the shifted
targets) and may straddle two shards; there are (N - 1) // (B*T) whole chunks. Each
`next_batch` moves a global cursor by W (the world size); rank r reads the chunk at position
cursor + r. An epoch has num_chunks - num_chunks % S positions, S the chunks of one optimizer
step (`chunks_per_step`: W times the accumulation steps), so one process taking two steps reads
the same chunks as two processes taking one step each. With `shuffle`, position p reads chunk
perm[p], perm a permutation of all chunks drawn from (seed, epoch): independent of W.
`state_dict()` holds that global position (epoch, cursor), so a run resumes with the same or
another world size. `batch_at(c)` reads chunk c without shuffling: a fixed validation stream.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch

from prepare_data import FORMAT_VERSION, MARKER_NAME, META_NAME
from runtime import ConfigError, run_command

LLMC_HEADER_INTS = 256
LLMC_FORMATS = {20240520: (1, np.dtype(np.uint16)), 20240801: (7, np.dtype(np.uint32))}  # magic: (version, dtype)
ID_SAMPLE = 4096  # ids per shard checked against the vocabulary at start-up
FOREIGN_VOCAB_SIZE = 50257  # shards of other projects carry no meta.json: they hold GPT-2 tokens


class DataError(RuntimeError):
    """Bad or missing shards; the message names the file and says what to do."""


class DataNotFound(DataError, ConfigError):
    """--data names no folder of shards: the user's mistake (a ConfigError too, for its exit code)."""


def _hint(meta: dict | None, data_dir: Path) -> str:
    """How to rebuild the shards in `data_dir` itself: the folder may not be where the command
    that made it writes by default (moved, copied, or named by hand), so --out names it."""
    out = ["--out", str(data_dir), "--overwrite"]
    try:
        argv = shlex.split(meta["command"]) if meta and isinstance(meta.get("command"), str) else []
    except ValueError:
        argv = []
    if not argv:
        return f"HINT: run prepare_data.py again to rebuild them: `python prepare_data.py SOURCE {shlex.join(out)}`."
    kept, skip = [], False
    for arg in argv:  # (an --out missed here, say abbreviated, loses to the one added: the last one wins)
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif arg != "--overwrite" and not arg.startswith("--out="):
            kept.append(arg)
    return f"HINT: run prepare_data.py again to rebuild this folder with the command that made it:\n  {shlex.join(kept + out)}"


def _open_npy(path: Path, hint: str) -> np.ndarray:
    """Memory-map a 1-D .npy shard after checking its header against the file size."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _fortran_order, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e}).\n{hint}") from None
    if len(shape) != 1 or dtype.kind != "u" or dtype.itemsize > 4:
        raise DataError(
            f"{path}: holds a {dtype} array of shape {shape}, expected 1-D unsigned token ids of at most 32 bits.\n{hint}"
        )
    return _memmap(path, dtype, offset, shape[0], hint)


def _open_llmc(path: Path, hint: str) -> np.ndarray:
    """Memory-map an llm.c .bin shard: 256 int32 of header, then the tokens."""
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if len(header) < LLMC_HEADER_INTS:
        raise DataError(f"{path}: shorter than the {LLMC_HEADER_INTS * 4}-byte llm.c header.\n{hint}")
    magic, version, count = (int(v) for v in header[:3])
    if magic not in LLMC_FORMATS:
        raise DataError(
            f"{path}: bad magic number {magic} in the header, expected one of {list(LLMC_FORMATS)}.\n{hint}"
        )
    expected_version, dtype = LLMC_FORMATS[magic]
    if version != expected_version:
        raise DataError(
            f"{path}: unsupported version {version} for magic {magic}, expected {expected_version}.\n{hint}"
        )
    return _memmap(path, dtype.newbyteorder("<"), LLMC_HEADER_INTS * 4, count, hint)


def _memmap(path: Path, dtype: np.dtype, offset: int, count: int, hint: str) -> np.ndarray:
    size, expected = path.stat().st_size, offset + count * dtype.itemsize
    if size != expected:
        raise DataError(
            f"{path}: {size} bytes on disk, but its header promises {count} tokens = {expected} bytes "
            f"(truncated or corrupt).\n{hint}"
        )
    if count == 0:
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _check_ids(path: Path, tokens: np.ndarray, vocab_size: int, hint: str) -> None:
    """Read a spread of ids (first, last and evenly spaced) and check them against the vocabulary."""
    if len(tokens) == 0:
        return
    sample = tokens[np.linspace(0, len(tokens) - 1, min(len(tokens), ID_SAMPLE)).astype(np.int64)]
    if int(sample.max()) >= vocab_size:
        bad = int(np.argmax(sample >= vocab_size))
        raise DataError(
            f"{path}: token id {int(sample[bad])} is not below the vocabulary size {vocab_size} "
            f"(wrong tokenizer, or a corrupt shard).\n{hint}"
        )


def _foreign_shards(data_dir: Path, split: str) -> list[Path]:
    """build-nanogpt / llm.c shard files of a split: PREFIX_split_000001.npy or .bin, llm.c's PREFIX_split.bin."""
    npy = re.compile(rf".+_{split}_\d+\.npy")
    bin_ = re.compile(rf"(.+_)?{split}(_\d+)?\.bin")
    return sorted(p for p in data_dir.iterdir() if npy.fullmatch(p.name) or bin_.fullmatch(p.name))


def read_meta(data_dir: str | Path) -> dict | None:
    """A data directory's meta.json, checked for the fields the loader reads, or None for shards
    made by others; no shard is opened."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DataNotFound(
            f"{data_dir} is a file, not a directory of prepared shards.\n"
            f"HINT: prepare it first with `python prepare_data.py {data_dir}`, then pass --data "
            f"data/{_stem(data_dir)}."
        )
    if not data_dir.is_dir():
        raise DataNotFound(
            f"{data_dir}: no such data directory.\nHINT: make it with `python prepare_data.py INPUT --out {data_dir}`."
        )
    meta_path = data_dir / META_NAME
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: unreadable ({e}).\n{_hint(None, data_dir)}") from None
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{meta_path}: {problem}.\n{_hint(meta if isinstance(meta, dict) else None, data_dir)}")
    return meta


def _stem(path: Path) -> str:
    name = path.name
    return next((name[: -len(s)] for s in (".txt.gz", ".jsonl.gz", ".txt", ".jsonl") if name.endswith(s)), path.stem)


def _meta_problem(meta: object) -> str | None:
    """What makes a meta.json unusable, or None: the fields the loader reads, of the right types,
    and shard names that stay inside their own folder."""
    if not isinstance(meta, dict):
        return f"holds a {type(meta).__name__}, expected a JSON object"
    for key, kind in (("format_version", int), ("vocab_size", int), ("eot_id", int), ("dtype", str),
                      ("tokenizer", str), ("splits", dict)):  # fmt: skip
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"field {key!r} is {meta.get(key)!r}, expected {'an integer' if kind is int else kind.__name__}"
    if meta["vocab_size"] < 1:
        return f"vocab_size is {meta['vocab_size']}"
    for split, info in meta["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            return f"splits.{split} has no list of shards"
        for entry in shards:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                return f"splits.{split} lists a shard without a file name: {entry!r}"
            if not isinstance(entry.get("tokens"), int):
                return f"splits.{split}: shard {entry['file']!r} has no integer token count"
            if Path(entry["file"]).name != entry["file"] or entry["file"] in ("", ".", ".."):
                return f"shard name {entry['file']!r} points outside the data directory"
    return None


def open_split(data_dir: str | Path, split: str) -> tuple[list[tuple[str, np.ndarray]], dict | None]:
    """Validate and memory-map every shard of a split: ([(file name, tokens)], meta or None)."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if meta is not None:
        return _open_own_split(data_dir, split, meta), meta
    if (data_dir / MARKER_NAME).exists():
        raise DataError(
            f"{data_dir}: the preparation of this directory did not finish (no {META_NAME}).\n"
            "HINT: run the same prepare_data.py command again; it continues after the last shard written."
        )
    if any(data_dir.glob(f"{split}_*.npy*")):  # (.npy or .npy.tmp)
        # No marker: meta.json was removed after the run, so prepare_data.py cannot tell these
        # shards from someone else's and replaces them only with --overwrite.
        raise DataError(
            f"{data_dir}: holds {split} shards but no {META_NAME}, which prepare_data.py writes last "
            f"(removed, or not written).\n{_hint(None, data_dir)}"
        )
    paths = _foreign_shards(data_dir, split)
    if not paths:
        raise DataError(
            f"{data_dir}: no {split} shards here (no {META_NAME}, no files like {split}_000000.npy, "
            f"*_{split}_000000.npy or *_{split}_000000.bin).\nHINT: make them with `python prepare_data.py INPUT`."
        )
    if len({p.suffix for p in paths}) > 1:
        raise DataError(f"{data_dir}: both .npy and .bin {split} shards here; keep one format per directory.")
    hint = _hint(None, data_dir)
    shards = [(p.name, _open_npy(p, hint) if p.suffix == ".npy" else _open_llmc(p, hint)) for p in paths]
    for (_, tokens), path in zip(shards, paths):
        _check_ids(path, tokens, FOREIGN_VOCAB_SIZE, hint)
    return shards, None


def _open_own_split(data_dir: Path, split: str, meta: dict) -> list[tuple[str, np.ndarray]]:
    hint = _hint(meta, data_dir)
    where = data_dir / META_NAME
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{where}: format version {meta.get('format_version')!r}, this loader reads {FORMAT_VERSION}.\n{hint}"
        )
    if split not in meta.get("splits", {}) or not meta["splits"][split]["shards"]:
        raise DataError(
            f"{where}: no {split} shards in this data.\nHINT: give prepare_data.py --val-tokens > 0 to get a val split."
        )
    dtype = np.dtype(meta["dtype"])
    shards = []
    for entry in meta["splits"][split]["shards"]:
        path = data_dir / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: listed in {META_NAME} but missing.\n{hint}")
        tokens = _open_npy(path, hint)
        if tokens.dtype != dtype:
            raise DataError(f"{path}: holds {tokens.dtype} ids, {META_NAME} says {dtype}.\n{hint}")
        if len(tokens) != entry["tokens"]:
            raise DataError(f"{path}: holds {len(tokens)} tokens, {META_NAME} says {entry['tokens']}.\n{hint}")
        _check_ids(path, tokens, meta["vocab_size"], hint)
        shards.append((entry["file"], tokens))
    return shards


class PinnedStaging:
    """Host-to-GPU copies through page-locked buffers allocated once and used in turn.

    Pinning a fresh buffer for each batch (`tensor.pin_memory()`) goes to the pinned-memory
    allocator, and through it possibly to cudaHostAlloc, on every call, which showed in the
    training step's time (BENCHMARKS.md). Here a batch costs one host memcpy, one asynchronous
    copy and one CUDA event. A buffer is refilled
    only after the event of its previous copy has completed, so a batch still queued on the
    GPU is never overwritten. With one buffer per micro-step of an optimizer step, plus one,
    that wait never blocks a loop that syncs with the GPU once a step (train.py does).
    """

    def __init__(self, numel: int, device: torch.device, slots: int) -> None:
        if device.index is None:  # "cuda": the current device, fixed now so that copies and events agree
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        with torch.cuda.device(device):  # the pinned memory's CUDA context: this device's, not cuda:0's
            self._buffers = [torch.empty(numel, dtype=torch.int64, pin_memory=True) for _ in range(slots)]
        self._host = [buffer.numpy() for buffer in self._buffers]  # views of the same memory
        self._copied = [torch.cuda.Event() for _ in range(slots)]
        self._next = 0

    def to_device(self, *parts: np.ndarray) -> torch.Tensor:
        """The concatenation of `parts` as one int64 tensor on the device."""
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        self._copied[i].synchronize()  # (returns at once for an event never recorded)
        host = self._host[i]
        start = 0
        for part in parts:
            np.copyto(host[start : start + len(part)], part, casting="safe")
            start += len(part)
        out = self._buffers[i][:start].to(self.device, non_blocking=True)
        self._copied[i].record(torch.cuda.current_stream(self.device))
        return out


class ShardedDataLoader:
    """(x, y) batches for one rank; see the module docstring for how data is addressed."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        chunks_per_step: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        # Chunks one optimizer step reads over all ranks (world size x gradient accumulation).
        # Epochs hold a whole number of steps, so runs that split a step differently between
        # processes and accumulation read the same chunks in every epoch, not only the first.
        self.chunks_per_step = chunks_per_step or world_size
        if self.chunks_per_step % world_size:
            raise ValueError(
                f"chunks_per_step ({self.chunks_per_step}) must be a multiple of world_size ({world_size})"
            )
        self.device = torch.device(device)

        shards, meta = open_split(self.data_dir, split)
        self.vocab_size: int = meta["vocab_size"] if meta else FOREIGN_VOCAB_SIZE
        self.eot_id: int | None = meta["eot_id"] if meta else None
        self._names = [name for name, tokens in shards if len(tokens)]
        self._shards = [tokens for _, tokens in shards if len(tokens)]
        self._starts = np.cumsum([0] + [len(t) for t in self._shards]).tolist()
        self.num_tokens: int = self._starts[-1]
        self.chunk_tokens = batch_size * seq_len
        self._perm_epoch, self._perm = -1, None
        self._staging = None
        if self.device.type == "cuda":
            # one buffer per micro-step of a step, and one more (see PinnedStaging)
            slots = self.chunks_per_step // world_size + 1
            self._staging = PinnedStaging(2 * self.chunk_tokens, self.device, slots)
            self.device = self._staging.device
        self.reset()

    # ---- addressing ----

    def num_chunks(self) -> int:
        return max(0, (self.num_tokens - 1) // self.chunk_tokens)  # (an empty split has no "+1" token either)

    def _epoch_positions(self) -> int:
        n = self.num_chunks()
        return n - n % self.chunks_per_step

    def _chunk_at_position(self, position: int) -> int:
        if not self.shuffle:
            return position
        if self._perm_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.num_chunks()), self.epoch
        return int(self._perm[position])

    def _read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the split's virtual stream, across shard boundaries."""
        i = bisect_right(self._starts, start) - 1
        parts = []
        while count > 0:
            offset = start - self._starts[i]
            part = self._shards[i][offset : offset + count]
            parts.append(part)
            start, count, i = start + len(part), count - len(part), i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ---- batches ----

    def batch_at(self, chunk_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of unshuffled chunk `chunk_index`, whatever the rank, world size or position."""
        if not 0 <= chunk_index < self.num_chunks():
            raise IndexError(f"chunk {chunk_index} is not in [0, {self.num_chunks()})")
        start = chunk_index * self.chunk_tokens
        tokens = self._read(start, self.chunk_tokens + 1)
        # The shards' ids were sampled when they were opened; every batch is checked whole here,
        # on the host, so that a bad id is reported as bad data and never reaches an embedding.
        if int(tokens.max()) >= self.vocab_size:
            self._raise_bad_id(start, tokens)
        shape = (self.batch_size, self.seq_len)
        if self._staging is not None:
            # x then y, each whole, so that both start aligned and one copy moves them
            xy = self._staging.to_device(tokens[:-1], tokens[1:])
            return xy[: self.chunk_tokens].view(shape), xy[self.chunk_tokens :].view(shape)
        buf = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        return buf[:-1].view(shape), buf[1:].view(shape)

    def _raise_bad_id(self, start: int, tokens: np.ndarray) -> None:
        position = start + int(np.argmax(tokens >= self.vocab_size))
        i = bisect_right(self._starts, position) - 1
        raise DataError(
            f"{self.data_dir / self._names[i]}: token id {int(tokens[position - start])} at token offset "
            f"{position - self._starts[i]:,} is not below the vocabulary size {self.vocab_size} "
            f"(wrong tokenizer, or a corrupt shard).\nHINT: prepare the data again with prepare_data.py."
        )

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._epoch_positions() == 0:
            raise DataError(
                f"{self.data_dir}: the {self.split} split has {self.num_tokens:,} tokens: {self.num_chunks()} chunk(s) of "
                f"B*T = {self.chunk_tokens:,} (+1) tokens, fewer than the {self.chunks_per_step} that one step of all ranks needs.\n"
                "HINT: lower the batch size or sequence length, or prepare more data."
            )
        # Normally the cursor is a multiple of world_size and this reads `cursor >= epoch
        # positions`. A position saved by a run of another world size may not be; then the
        # epoch ends as soon as the ranks' next chunks no longer all fit in it.
        if self.cursor + self.world_size > self._epoch_positions():
            self.epoch, self.cursor = self.epoch + 1, 0
        chunk = self._chunk_at_position(self.cursor + self.rank)
        self.cursor += self.world_size
        return self.batch_at(chunk)

    # ---- position ----

    def reset(self) -> None:
        self.epoch, self.cursor = 0, 0

    def _fingerprint(self) -> dict:
        return {"num_tokens": self.num_tokens, "shards": [[n, len(t)] for n, t in zip(self._names, self._shards)]}

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "split": self.split,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "chunk_tokens": self.chunk_tokens,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "data": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved global position; the world size may differ, B*T and the data may not."""
        ours = self.state_dict()
        for key, what in (("split", "split"), ("chunk_tokens", "B*T"), ("shuffle", "shuffle"), ("seed", "seed")):
            if state.get(key) != ours[key]:
                raise DataError(
                    f"the saved data position was taken with {what} = {state.get(key)!r}, this loader has {ours[key]!r}.\n"
                    "HINT: resume with the same batch size x sequence length, split, shuffle and seed."
                )
        if json.loads(json.dumps(state.get("data"))) != json.loads(json.dumps(ours["data"])):
            raise DataError(
                f"{self.data_dir}: the saved data position refers to other data ({state.get('data', {}).get('num_tokens')} "
                f"tokens) than this {self.split} split ({self.num_tokens} tokens).\n"
                "HINT: resume with the data directory the run started with."
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# ---- command line: inspect a data directory ----


def _has_split(data_dir: Path, split: str) -> bool:
    """Whether the directory holds that split at all (an absent val split is legitimate)."""
    meta_path = data_dir / META_NAME
    if not meta_path.is_file():
        return bool(_foreign_shards(data_dir, split))
    try:
        return bool(json.loads(meta_path.read_text())["splits"][split]["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return True  # let open_split report what is wrong


def _verify_checksums(data_dir: Path, split: str, meta: dict) -> None:
    for entry in meta["splits"][split]["shards"]:
        digest = hashlib.sha256()
        with open(data_dir / entry["file"], "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            raise DataError(f"{data_dir / entry['file']}: sha256 differs from {META_NAME}.\n{_hint(meta, data_dir)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Validate a data directory and print what it holds.")
    p.add_argument("data_dir", help="a directory made by prepare_data.py, or build-nanogpt / llm.c shards")
    p.add_argument("--verify-checksums", action="store_true", help="also check every shard's sha256 against meta.json")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    try:
        for split in ("train", "val"):
            if split == "val" and not _has_split(data_dir, split):
                print("val: none")
                continue
            shards, meta = open_split(data_dir, split)
            tokens = sum(len(t) for _, t in shards)
            print(f"{split}: {tokens:,} tokens in {len(shards)} shard(s), dtype {shards[0][1].dtype}")
            if args.verify_checksums and meta:
                _verify_checksums(data_dir, split, meta)
        if meta:
            print(f"tokenizer {meta['tokenizer']}, vocab size {meta['vocab_size']}, end-of-text id {meta['eot_id']}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
