"""Turn text into token shards that dataloader.py memory-maps.

    python prepare_data.py tinyshakespeare                  # download, cache and prepare the default corpus
    python prepare_data.py input.txt                        # -> data/input/
    python prepare_data.py books/ more/*.txt --out data/books
    python prepare_data.py corpus.jsonl.gz --text-field text
    python prepare_data.py --hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-10BT

Inputs. A `.txt` file is one document. A `.jsonl` line is one document, its text in
`--text-field`. Either may be gzipped (`.txt.gz`, `.jsonl.gz`). A directory stands for
those files under it, a glob for what it matches, both in name order. A Hugging Face dataset is
streamed, so it never has to fit on disk in its raw form.

Output. `train_000000.npy, ...` and `val_000000.npy, ...`: plain 1-D `.npy` arrays of
uint16 (uint32 when the vocabulary has more than 65,536 ids), `--shard-tokens` each except
the last of a split; then `meta.json` with the tokenizer, vocabulary size, end-of-text id,
dtype, per-shard token counts and sha256, document counts, source and command.

Choices worth knowing:

- The end-of-text token goes *before* every document, as in build-nanogpt and llm.c, so
  the stream reads `<eot> doc0 <eot> doc1 ...` and every document is preceded by a
  delimiter the model can condition on.
- Text is encoded as plain text: a literal "<|endoftext|>" inside a document becomes
  ordinary tokens, never the special id.
- Validation is a prefix of the token stream: the first `--val-tokens` tokens, or with
  `--val-fraction` that fraction of all tokens. Default: 10% for local input under 1 GB
  (tiny Shakespeare: 33,802 tokens), else the first 10M tokens. A prefix can be cut while
  streaming and does not depend on the number of workers; a fraction needs the total
  first, so those tokens go to a staging file once and are then cut into shards.
- Long documents are cut into pieces of about 256k characters, only where tiktoken's
  GPT-2, cl100k and o200k patterns always start a new pre-token (a space between two
  letters; a newline after a non-space, before a letter or digit). The tokens are then
  exactly those of the whole document, memory stays bounded on a file larger than RAM,
  and one big file still spreads over all workers. (Tokenizers that prepend a marker to
  every call, as some SentencePiece models do, can differ at these cuts.)
- Workers are threads: tiktoken and Hugging Face's Rust tokenizers release the GIL, so
  threads tokenize in parallel with no copying between processes. Tasks are submitted
  and collected in order, so the shards are byte-identical for any `--workers`.
- Bytes that are not UTF-8 are replaced by U+FFFD and counted (a warning names the file
  and the first byte offset; the count is in meta.json). `--strict-utf8` stops instead.
  A UTF-8 byte-order mark at the start of a `.txt` or `.jsonl` file is dropped. Lone UTF-16
  surrogates in JSON strings ("\\ud83d" alone) are replaced and counted alike.
- Files whose name says they are not text (`.json`, `.parquet`, `.bz2`, `.zst`, `.zip`, ...)
  are refused with a hint rather than tokenized as bytes.
- Empty and whitespace-only documents are skipped and counted.
- Crash safety: every shard is written under a `.tmp` name and renamed; meta.json is
  written last. Running the same command again after an interruption starts over and
  finishes; running it on a finished directory does nothing. A finished directory made from
  other input is only replaced with `--overwrite` (an unfinished one is replaced anyway: its
  run starts over too).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import hashlib
import io
import json
import math
import os
import re
import shlex
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tokenizer import Tokenizer, TokenizerError, get_tokenizer, load_tokenizer

FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_TOKENS = 10_000_000
DEFAULT_VAL_FRACTION = 0.1
SMALL_INPUT_BYTES = 1 << 30  # local input below this gets a val fraction by default
READ_BYTES = 1 << 20
PIECE_CHARS = 1 << 18  # text per tokenizer call: small enough to balance threads, big enough to amortise calls
MAX_PIECE_CHARS = 1 << 24  # text with no safe cut point this long is cut anyway (and counted)
STAGE_BLOCK_TOKENS = 1 << 24
META_NAME = "meta.json"
MARKER_NAME = ".prepare_in_progress.json"
STAGE_NAME = "tokens.stage.tmp"  # all tokens, before a --val-fraction split
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
# Not text, and not read as such: tokenizing their bytes would make shards of noise.
# (Files named otherwise, .md or no suffix at all, are text documents.)
NOT_TEXT_HINTS = {
    suffix: hint
    for suffixes, hint in (
        (
            (".json",),
            "a .json file is one JSON value; write one object per line as .jsonl (`jq -c '.[]' in.json > in.jsonl`)",
        ),
        ((".parquet", ".arrow"), "load it as a Hugging Face dataset, or write its text column out as .jsonl"),
        ((".bz2", ".xz", ".zst", ".lz4"), "decompress it, or recompress it with gzip (.txt.gz / .jsonl.gz)"),
        ((".zip", ".tar", ".7z"), "unpack it and pass the files or their directory"),
        ((".npy", ".bin"), "it looks like token shards already: pass its directory to train.py --data"),
        ((".pdf",), "extract its text first (for example with pdftotext)"),
    )
    for suffix in suffixes
}

# A cut point where every tiktoken pattern (GPT-2, cl100k, o200k) starts a new pre-token in
# the whole text as well as in the piece: before " x" that follows a letter, or after a lone
# "\n" that follows a non-space and precedes a letter or digit. No pattern lets a letter run
# swallow a following space, or a newline join a following letter or digit. (Not any
# non-space after the newline: o200k keeps ".\n/" together.)
_SAFE_CUT = re.compile(r"(?<=[^\W\d_])(?= [^\W\d_])|(?<=\S\n)(?=[^\W_])")
_CUT_SEARCH_CHARS = 4096


class DataPrepError(RuntimeError):
    """Bad input or output location; the message names the file and says what to do."""


@dataclass(frozen=True)
class NamedCorpus:
    url: str
    sha256: str
    filename: str
    size: int


NAMED_CORPORA = {
    "tinyshakespeare": NamedCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="input.txt",
        size=1_115_394,
    ),
}


@dataclass
class Stats:
    documents: int = 0
    empty_documents: int = 0
    first_empty: str | None = None
    invalid_utf8: int = 0
    first_invalid: str | None = None
    forced_cuts: int = 0


# ---- reading text ----


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _incomplete_utf8_tail(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that is not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return back if need > back else 0
    return 0


def _decode(data: bytes, where: str, offset: int, stats: Stats, strict: bool) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        position = offset + e.start
        if strict:
            raise DataPrepError(
                f"{where}: byte offset {position} (byte 0x{data[e.start]:02x}) is not valid UTF-8.\n"
                "HINT: convert the file to UTF-8 (for example `iconv -f latin1 -t utf-8`), or leave out "
                "--strict-utf8 to replace such bytes with U+FFFD."
            ) from None
        text = data.decode("utf-8", "replace")
        stats.invalid_utf8 += text.count("\ufffd") - data.count("\ufffd".encode())
        if stats.first_invalid is None:
            stats.first_invalid = f"{where} at byte offset {position}"
            print(
                f"warning: {where}: bytes that are not UTF-8 at byte offset {position}; replaced by U+FFFD",
                file=sys.stderr,
            )
        return text


def _without_lone_surrogates(text: str, where: str, stats: Stats, strict: bool) -> str:
    """JSON ("\\ud83d" on its own) and datasets can hold lone UTF-16 surrogates, which are not
    text UTF-8 can carry nor tiktoken can encode: replaced by U+FFFD and counted, as invalid
    bytes are."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        if strict:
            raise DataPrepError(
                f"{where}: character {e.start} is a lone surrogate (U+{ord(text[e.start]):04X}), not valid text.\n"
                "HINT: fix the source, or leave out --strict-utf8 to replace such characters with U+FFFD."
            ) from None
        # (through UTF-16, as tiktoken does: a high and a low surrogate side by side join up)
        clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        stats.invalid_utf8 += clean.count("\ufffd") - text.count("\ufffd")
        if stats.first_invalid is None:
            stats.first_invalid = f"{where} at character {e.start}"
            print(f"warning: {where}: lone surrogate at character {e.start}; replaced by U+FFFD", file=sys.stderr)
        return clean


def _safe_cut(text: str, target: int, searched: int = 0) -> int | None:
    """The last safe cut point at or before `target`, else the first after it, else None.
    text[:searched] is known to hold none."""
    last = None
    if searched <= target:
        for match in _SAFE_CUT.finditer(text, max(1, target - _CUT_SEARCH_CHARS), target):
            last = match.start()
    if last:
        return last
    # (a match needs up to 2 characters after its position, which may have arrived since)
    match = _SAFE_CUT.search(text, max(target, searched - 2))
    return match.start() if match else None


def _split_pieces(blocks: Iterable[str], stats: Stats) -> Iterator[str]:
    """Re-cut a stream of text blocks into pieces of about PIECE_CHARS at safe cut points."""
    buf = ""
    searched = 0  # buf[:searched] holds no safe cut point: text without one is scanned once
    for block in blocks:
        buf += block
        while len(buf) > PIECE_CHARS:
            cut = _safe_cut(buf, PIECE_CHARS, searched)
            searched = 0
            if cut is None:
                searched = len(buf)
                if len(buf) < MAX_PIECE_CHARS:
                    break  # wait for more text
                cut = PIECE_CHARS
                stats.forced_cuts += 1
            yield buf[:cut]
            buf = buf[cut:]
            searched = max(0, searched - cut)
    if buf:
        yield buf


def _text_file_blocks(path: Path, stats: Stats, strict: bool) -> Iterator[str]:
    offset, carry = 0, b""
    with _open_binary(path) as f:
        while True:
            data = f.read(READ_BYTES)
            block = carry + data
            keep = _incomplete_utf8_tail(block) if data else 0
            carry, block = block[len(block) - keep :], block[: len(block) - keep]
            text = _decode(block, str(path), offset, stats, strict)
            if offset == 0 and text.startswith("\ufeff"):
                text = text[1:]
            offset += len(block)
            if text:
                yield text
            if not data:
                return


def _text_file_pieces(path: Path, stats: Stats, strict: bool) -> Iterator[tuple[str, bool]]:
    """One document per file, streamed: the file is never held in memory whole."""
    leading_space = ""  # whitespace before the first content, held until we know the file is not blank
    first = True
    for piece in _split_pieces(_text_file_blocks(path, stats, strict), stats):
        if first and not piece.strip():
            leading_space += piece
            continue
        if first:
            stats.documents += 1
            piece = leading_space + piece
        yield piece, first
        first = False
    if first:
        stats.empty_documents += 1
        stats.first_empty = stats.first_empty or str(path)
        print(f"warning: {path}: empty file, skipped", file=sys.stderr)


def _document_pieces(text: str, where: str, stats: Stats) -> Iterator[tuple[str, bool]]:
    if not text.strip():
        stats.empty_documents += 1
        stats.first_empty = stats.first_empty or where
        return
    stats.documents += 1
    for i, piece in enumerate(_split_pieces([text], stats)):
        yield piece, i == 0


def _field_text(record: object, text_field: str, where: str) -> str:
    """The text of one JSON record or dataset example; null counts as an empty document."""
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise DataPrepError(
            f"{where}: no field {text_field!r} (it has: {keys}).\n"
            "HINT: pass --text-field with the name of the field that holds the text."
        )
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise DataPrepError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string.")
    return text or ""


def _jsonl_pieces(path: Path, text_field: str, stats: Stats, strict: bool) -> Iterator[tuple[str, bool]]:
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            line = _decode(raw, where, start, stats, strict)
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataPrepError(
                    f"{where}: not valid JSON ({e.msg}, column {e.colno}).\n"
                    "HINT: every line of a .jsonl file must be one JSON object."
                ) from None
            text = _without_lone_surrogates(_field_text(record, text_field, where), where, stats, strict)
            yield from _document_pieces(text, where, stats)


def _file_pieces(files: list[Path], text_field: str, stats: Stats, strict: bool) -> Iterator[tuple[str, bool]]:
    for path in files:
        try:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                yield from _jsonl_pieces(path, text_field, stats, strict)
            else:
                yield from _text_file_pieces(path, stats, strict)
        except (OSError, EOFError, zlib.error) as e:
            raise DataPrepError(f"{path}: could not be read ({type(e).__name__}: {e}).") from e


def _hf_pieces(
    name: str, config: str | None, split: str, text_field: str, stats: Stats, strict: bool
) -> Iterator[tuple[str, bool]]:
    try:
        from datasets import load_dataset

        examples = iter(load_dataset(name, config, split=split, streaming=True))
    except Exception as e:
        raise DataPrepError(
            f"could not open Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}\nHINT: check the name, --hf-config and --hf-split; offline, set "
            "HF_DATASETS_OFFLINE=1 and have it in the Hugging Face cache, or pass local .jsonl files."
        ) from e
    index = 0
    while True:
        try:
            example = next(examples)
        except StopIteration:
            return
        except Exception as e:
            raise DataPrepError(
                f"Hugging Face dataset {name!r}: reading example {index} failed: {type(e).__name__}: {e}\n"
                "HINT: if the network dropped, run the same command again (it starts over); nothing "
                "incomplete is left that looks finished."
            ) from e
        where = f"{name} example {index}"
        text = _without_lone_surrogates(_field_text(example, text_field, where), where, stats, strict)
        yield from _document_pieces(text, where, stats)
        index += 1


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files named by paths, directories and globs, each checked to be readable, in order."""
    files: list[Path] = []
    for spec in specs:
        if glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise DataPrepError(f"{spec}: no files match this pattern.")
        elif Path(spec).is_dir():
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise DataPrepError(f"{spec}: directory holds no {', '.join(TEXT_SUFFIXES)} files.")
        elif Path(spec).is_file():
            found = [Path(spec)]
        else:
            raise DataPrepError(f"{spec}: no such file or directory.")
        for path in found:
            hint = NOT_TEXT_HINTS.get(path.suffix.lower())
            if hint and not path.name.endswith(TEXT_SUFFIXES):
                raise DataPrepError(
                    f"{path}: a {path.suffix} file is not text or JSONL, which is what this reads.\nHINT: {hint}."
                )
        files.extend(found)
    for path in files:
        try:
            _open_binary(path).close()
        except OSError as e:
            raise DataPrepError(f"{path}: cannot be opened ({e.strerror or e}).") from e
    return files


# ---- tokenizing ----


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _TaskEncoder:
    """Encodes one task (a list of (text, starts_document) pieces) into one token array."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype) -> None:
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.eot = np.array([tokenizer.eot_id], dtype=dtype)
        self.local = threading.local()

    def _thread_tokenizer(self) -> Tokenizer:
        if self.tokenizer.kind == "tiktoken":
            return self.tokenizer  # a tiktoken Encoding is safe to share between threads
        # transformers flips settings on the tokenizer object while encoding: one per thread.
        if not hasattr(self.local, "tokenizer"):
            self.local.tokenizer = load_tokenizer(self.tokenizer.name)  # not the cached, shared one
        return self.local.tokenizer

    def __call__(self, task: list[tuple[str, bool]]) -> np.ndarray:
        tok = self._thread_tokenizer()
        texts = [text for text, _ in task]
        if tok.kind == "tiktoken" and hasattr(tok.backend, "encode_to_numpy"):
            # Same ids as encode_ordinary (no special tokens allowed), without building a Python list.
            ids = [tok.backend.encode_to_numpy(text, disallowed_special=()) for text in texts]
        else:
            ids = [np.asarray(x, dtype=np.int64) for x in tok.encode_batch(texts)]
        parts = []
        for (_, starts_document), arr in zip(task, ids):
            if starts_document:
                parts.append(self.eot)
            parts.append(arr)
        # Every id is below vocab_size, which fits the dtype by construction (token_dtype).
        return np.concatenate(parts, dtype=self.dtype, casting="unsafe")


def _tasks(pieces: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Group pieces (many short documents, or parts of a long one) into tasks of ~PIECE_CHARS."""
    task, size = [], 0
    for text, starts_document in pieces:
        task.append((text, starts_document))
        size += len(text)
        if size >= PIECE_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


def token_stream(
    pieces: Iterable[tuple[str, bool]], tokenizer: Tokenizer, dtype: np.dtype, workers: int
) -> Iterator[np.ndarray]:
    """Token arrays in input order, encoded on `workers` threads."""
    encode = _TaskEncoder(tokenizer, dtype)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize") as pool:
        in_flight: collections.deque = collections.deque()
        for task in _tasks(pieces):
            in_flight.append(pool.submit(encode, task))
            # Enough queued to keep every thread busy while we write; few enough to bound memory.
            if len(in_flight) > 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


# ---- writing shards ----


def _write_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write to `path` under a .tmp name, fsync, rename; return the sha256 of what was written."""
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


class ShardWriter:
    """Cuts a token stream into val shards (the first `val_tokens`) and then train shards.

    A full shard is hashed and written on a background thread (hashlib and file writes release
    the GIL) while the next one fills a second buffer: on a many-core machine tokenizing
    100M tokens takes well under a second, so writing in line would stall every worker."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int, val_tokens: int) -> None:
        self.out_dir = out_dir
        self.buffers = [np.empty(shard_tokens, dtype=dtype), np.empty(shard_tokens, dtype=dtype)]
        self.buf = self.buffers[0]
        self.fill = 0
        self.split = "val" if val_tokens > 0 else "train"
        self.val_left = val_tokens
        self.shards: dict[str, list[dict]] = {"train": [], "val": []}
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-shards")
        self.pending = None  # the shard being written, at most one at a time

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            room = len(self.buf) - self.fill
            if self.split == "val":
                room = min(room, self.val_left)
            take = tokens[:room]
            self.buf[self.fill : self.fill + len(take)] = take
            self.fill += len(take)
            tokens = tokens[len(take) :]
            if self.split == "val":
                self.val_left -= len(take)
            if self.fill == len(self.buf) or (self.split == "val" and self.val_left == 0):
                self._flush()

    def _flush(self) -> None:
        self._wait()  # the other buffer is free again once its shard is on disk
        name = f"{self.split}_{len(self.shards[self.split]):06d}.npy"
        self.shards[self.split].append({"file": name, "tokens": self.fill, "sha256": None})
        self.pending = (
            self.shards[self.split][-1],
            self.io.submit(_write_npy, self.out_dir / name, self.buf[: self.fill]),
        )
        self.buf = self.buffers[1] if self.buf is self.buffers[0] else self.buffers[0]
        self.fill = 0
        if self.split == "val" and self.val_left == 0:
            self.split = "train"

    def _wait(self) -> None:
        if self.pending is not None:
            entry, future = self.pending
            self.pending = None
            entry["sha256"] = future.result()

    def close(self) -> dict[str, list[dict]]:
        try:
            if self.fill:
                self._flush()
            self._wait()
        finally:
            self.io.shutdown()
        return self.shards


def _write_npy(path: Path, tokens: np.ndarray) -> str:
    """Write a 1-D array as a .npy file (atomically); return the file's sha256."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(tokens.dtype), "fortran_order": False, "shape": (len(tokens),)}
    )
    return _write_atomic(path, [header.getvalue(), memoryview(tokens).cast("B")])


def finish_dataset(
    out: Path, shards: dict[str, list[dict]], tokenizer: str, vocab_size: int, eot_id: int, **extra
) -> dict:
    """Write meta.json for the shards a ShardWriter made (last, atomically); return it."""
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "dtype": token_dtype(vocab_size).name,
        "eot_position": "before each document",
        "splits": {s: {"tokens": sum(x["tokens"] for x in shards[s]), "shards": shards[s]} for s in ("train", "val")},
        **extra,
    }
    _write_atomic(out / META_NAME, [json.dumps(meta, indent=2).encode()])
    (out / MARKER_NAME).unlink(missing_ok=True)
    return meta


# ---- the output directory ----


def _our_files(out: Path) -> list[Path]:
    ours = [r"(train|val)_\d{6}\.npy", *(re.escape(name) for name in (META_NAME, MARKER_NAME, STAGE_NAME))]
    names = re.compile(f"({'|'.join(ours)})(\\.tmp)?")
    return [p for p in out.iterdir() if names.fullmatch(p.name)] if out.is_dir() else []


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on the output directory, so that concurrent runs (every rank of a job
    calling prepare_named_corpus, say) take turns: the first prepares, the rest find it done."""
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"{out}: exists and is not a directory.\nHINT: choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no locking
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _claim_output_dir(out: Path, request: dict, overwrite: bool) -> bool:
    """True when `out` already holds exactly this request's output; else clear it for writing."""
    meta = _read_json(out / META_NAME)
    marker = _read_json(out / MARKER_NAME)
    if meta is not None and {k: meta.get(k) for k in request} == request and not overwrite:
        return True
    if not overwrite:
        if meta is not None:
            raise DataPrepError(
                f"{out} already holds data prepared from other input or settings "
                f"(made by: {meta.get('command', '?')}).\nHINT: pass --overwrite to replace it, or choose another --out."
            )
        if marker is not None and marker != request:
            # what an interrupted or failed run left: nothing usable, and it starts over anyway
            print(f"note: {out} holds an unfinished preparation of other input or settings; replacing it")
        if marker is None and any(p.name.endswith(".npy") for p in _our_files(out)):
            raise DataPrepError(
                f"{out} holds shards without {META_NAME}; they were not made by this command.\n"
                "HINT: pass --overwrite to replace them, or choose another --out."
            )
    # meta.json goes first, so that nothing here looks complete while old shards are replaced.
    (out / META_NAME).unlink(missing_ok=True)
    _write_atomic(out / MARKER_NAME, [json.dumps(request, indent=2).encode()])
    for path in _our_files(out):
        if path.name != MARKER_NAME:
            path.unlink()
    return False


# ---- the whole job ----


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    out: str | None = None
    tokenizer: str = "gpt2"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_tokens: int | None = None
    val_fraction: float | None = None
    workers: int = 0  # 0: all cores
    overwrite: bool = False
    strict_utf8: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        if bool(self.inputs) == bool(self.hf_dataset):
            raise DataPrepError("give input files, directories or globs, or --hf-dataset NAME (one of the two).")
        if self.shard_tokens < 1:
            raise DataPrepError("--shard-tokens must be at least 1.")
        if self.workers < 0:
            raise DataPrepError("--workers must be 0 (all cores) or more.")
        if Path(self.tokenizer).is_dir():  # a local tokenizer: meta.json must find it from anywhere
            self.tokenizer = str(Path(self.tokenizer).resolve())
        if self.val_tokens is not None and self.val_fraction is not None:
            raise DataPrepError("give --val-tokens or --val-fraction, not both.")
        if self.val_tokens is not None and self.val_tokens < 0:
            raise DataPrepError("--val-tokens must be 0 or more.")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise DataPrepError("--val-fraction must be in [0, 1).")


def _default_out(cfg: PrepareConfig) -> Path:
    """data/NAME, NAME from the dataset, the file's stem, the directory, or a glob's fixed directory."""
    if cfg.hf_dataset:
        return Path("data") / "-".join(filter(None, [cfg.hf_dataset.rstrip("/").split("/")[-1], cfg.hf_config]))
    if len(cfg.inputs) > 1:
        raise DataPrepError("several inputs: say where the shards go with --out DIR.")
    spec = cfg.inputs[0]
    if glob.has_magic(spec):
        fixed = []
        for part in Path(spec).parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        return Path("data") / Path(*fixed or ["."]).resolve().name
    path = Path(spec)
    if path.is_dir():
        return Path("data") / path.resolve().name
    for suffix in TEXT_SUFFIXES:
        if path.name.endswith(suffix):
            return Path("data") / path.name[: -len(suffix)]
    return Path("data") / path.stem


def _source(cfg: PrepareConfig, named: str | None, files: list[Path]) -> dict:
    if named:
        corpus = NAMED_CORPORA[named]
        return {"named_corpus": named, "url": corpus.url, "sha256": corpus.sha256}
    if cfg.hf_dataset:
        return {
            "hf_dataset": cfg.hf_dataset,
            "config": cfg.hf_config,
            "split": cfg.hf_split,
            "text_field": cfg.text_field,
        }
    entries = []
    for path in files:
        st = path.stat()
        entries.append({"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": entries, "text_field": cfg.text_field}


def _val_setting(cfg: PrepareConfig, input_bytes: int | None) -> dict:
    if cfg.val_tokens is not None:
        return {"tokens": cfg.val_tokens}
    if cfg.val_fraction is not None:
        return {"fraction": cfg.val_fraction}
    if input_bytes is not None and input_bytes < SMALL_INPUT_BYTES:
        return {"fraction": DEFAULT_VAL_FRACTION}
    return {"tokens": DEFAULT_VAL_TOKENS}


def _summary_line(meta: dict, seconds: float) -> str:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    total = train["tokens"] + val["tokens"]
    line = (
        f"{meta['documents']:,} documents -> {train['tokens']:,} train tokens in {len(train['shards'])} shard(s), "
        f"{val['tokens']:,} val tokens in {len(val['shards'])} shard(s); {seconds:.1f} s, {total / max(seconds, 1e-9):,.0f} tokens/s"
    )
    if meta["empty_documents_skipped"]:
        line += f"\nskipped {meta['empty_documents_skipped']:,} empty document(s), the first: {meta['first_empty_document']}"
    if meta["invalid_utf8_replaced"]:
        line += f"\nreplaced {meta['invalid_utf8_replaced']:,} invalid UTF-8 sequence(s), the first: {meta['first_invalid_utf8']}"
    if meta["forced_cuts"]:
        line += f"\ncut {meta['forced_cuts']} over-long stretch(es) of text with no safe cut point; tokens near those cuts may differ"
    return line


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_shards(
    stream: Iterable[np.ndarray], out: Path, dtype: np.dtype, shard_tokens: int, val: dict, stats: Stats
) -> dict[str, list[dict]]:
    """Drain the token stream into shards, with a progress bar of documents, tokens and tokens/s."""
    from tqdm import tqdm

    if "tokens" in val:
        writer = ShardWriter(out, dtype, shard_tokens, val["tokens"])
    stage_path = out / STAGE_NAME
    total = 0
    with tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=None, file=sys.stderr) as progress:
        staging = open(stage_path, "wb") if "fraction" in val else contextlib.nullcontext()
        with contextlib.closing(stream), staging as stage:
            for tokens in stream:
                writer.write(tokens) if stage is None else stage.write(tokens)
                total += len(tokens)
                progress.update(len(tokens))
                progress.set_postfix_str(f"docs={stats.documents:,}", refresh=False)
    if "fraction" in val:
        # The total is known only now: cut the staged stream into val and train shards.
        writer = ShardWriter(out, dtype, shard_tokens, int(total * val["fraction"]))
        if total:
            staged = np.memmap(stage_path, dtype=dtype, mode="r")
            for i in range(0, total, STAGE_BLOCK_TOKENS):
                writer.write(staged[i : i + STAGE_BLOCK_TOKENS])
            del staged
        stage_path.unlink()
    shards = writer.close()
    if not shards["train"]:
        raise DataPrepError(
            f"the input gave only {total:,} tokens, all of them taken for validation; nothing is left to train on.\n"
            "HINT: lower --val-tokens or --val-fraction, or add input."
        )
    return shards


def prepare(cfg: PrepareConfig, named: str | None = None) -> Path:
    """Run one preparation; return the output directory. `named` is a key of NAMED_CORPORA."""
    start = time.perf_counter()
    out = Path(cfg.out) if cfg.out else (Path("data") / named if named else _default_out(cfg))
    files = [] if (named or cfg.hf_dataset) else expand_inputs(cfg.inputs)
    input_bytes = (
        NAMED_CORPORA[named].size if named else None if cfg.hf_dataset else sum(p.stat().st_size for p in files)
    )
    request = {
        "format_version": FORMAT_VERSION,
        "source": _source(cfg, named, files),
        "settings": {
            "tokenizer": cfg.tokenizer,
            "shard_tokens": cfg.shard_tokens,
            "val": _val_setting(cfg, input_bytes),
            "strict_utf8": cfg.strict_utf8,
        },
    }
    request = json.loads(json.dumps(request))  # compare like with like after a round trip through meta.json
    with _exclusive(out):
        if _claim_output_dir(out, request, cfg.overwrite):
            print(f"{out} is already prepared from this input; nothing to do (--overwrite redoes it).")
            return out
        _run(cfg, named, out, request, files, start)
    return out


def _run(cfg: PrepareConfig, named: str | None, out: Path, request: dict, files: list[Path], start: float) -> None:
    if named:
        files = [fetch_named_corpus(named)]
    tokenizer = get_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    stats = Stats()
    if cfg.hf_dataset:
        pieces = _hf_pieces(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.text_field, stats, cfg.strict_utf8)
    else:
        pieces = _file_pieces(files, cfg.text_field, stats, cfg.strict_utf8)
    stream = token_stream(pieces, tokenizer, dtype, cfg.workers or _cores())
    shards = _write_shards(stream, out, dtype, cfg.shard_tokens, request["settings"]["val"], stats)
    meta = finish_dataset(
        out,
        shards,
        tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        eot_id=tokenizer.eot_id,
        documents=stats.documents,
        empty_documents_skipped=stats.empty_documents,
        first_empty_document=stats.first_empty,
        invalid_utf8_replaced=stats.invalid_utf8,
        first_invalid_utf8=stats.first_invalid,
        forced_cuts=stats.forced_cuts,
        **request,
        command=cfg.command,
    )
    print(_summary_line(meta, time.perf_counter() - start))


# ---- named corpora ----


def cache_dir() -> Path:
    """Where downloads are cached: $GPT2_TRAINER_CACHE, else $XDG_CACHE_HOME/gpt2-trainer, else ~/.cache/gpt2-trainer."""
    if os.environ.get("GPT2_TRAINER_CACHE"):
        return Path(os.environ["GPT2_TRAINER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-trainer"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_named_corpus(name: str) -> Path:
    """The cached raw text of a named corpus, downloaded first if needed (never left half-written)."""
    import requests

    corpus = NAMED_CORPORA[name]
    dest = cache_dir() / name / corpus.filename
    if dest.is_file() and _sha256_file(dest) == corpus.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    print(f"downloading {corpus.url}")
    try:
        with requests.get(corpus.url, stream=True, timeout=30) as response:
            response.raise_for_status()
            with open(partial, "wb") as f:
                for chunk in response.iter_content(READ_BYTES):
                    digest.update(chunk)
                    f.write(chunk)
    except (requests.RequestException, OSError) as e:
        partial.unlink(missing_ok=True)
        raise DataPrepError(
            f"could not download {name} from {corpus.url} ({type(e).__name__}: {e}).\n"
            f"HINT: with no network, fetch that file elsewhere and run\n"
            f"  python prepare_data.py path/to/{corpus.filename} --out data/{name}\n"
            f"or place it at {dest}"
        ) from e
    if digest.hexdigest() != corpus.sha256:
        partial.unlink(missing_ok=True)
        raise DataPrepError(
            f"the download of {name} from {corpus.url} has sha256 {digest.hexdigest()}, expected {corpus.sha256}.\n"
            f"HINT: a proxy may have answered instead of the server; fetch the file by hand and pass its path."
        )
    os.replace(partial, dest)
    return dest


def prepare_named_corpus(name: str, data_root: str | Path = "data") -> Path:
    """Prepare a named corpus (e.g. "tinyshakespeare") with default settings into data_root/name.

    Does nothing, and needs no network, when that directory is already prepared."""
    if name not in NAMED_CORPORA:
        raise DataPrepError(f"unknown corpus {name!r}; known: {', '.join(NAMED_CORPORA)}.")
    out = Path(data_root) / name
    cfg = PrepareConfig(
        inputs=[name], out=str(out), command=shlex.join(["python", "prepare_data.py", name, "--out", str(out)])
    )
    return prepare(cfg, named=name)


# ---- command line ----


def _count(text: str) -> int:
    """A token count: 100000000, 100_000_000, 100M, 1.5B, 10k or 1e8."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text.replace("_", "")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of tokens: {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokenize text into uint16/uint32 .npy shards plus meta.json for dataloader.py.",
        epilog="Token counts take suffixes: 100M, 1.5B, 10k. The end-of-text token goes before every document. "
        "The shards are byte-identical for any --workers.",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        help=f".txt / .jsonl files (or .gz of them), directories or globs; or the name of a known corpus ({', '.join(NAMED_CORPORA)})",
    )
    p.add_argument(
        "--hf-dataset", metavar="NAME", help="stream a Hugging Face dataset instead, e.g. HuggingFaceFW/fineweb-edu"
    )
    p.add_argument("--hf-config", metavar="CONFIG", help="dataset configuration, e.g. sample-10BT")
    p.add_argument("--hf-split", default="train", metavar="SPLIT", help="dataset split to read (default: train)")
    p.add_argument(
        "--text-field",
        default="text",
        metavar="FIELD",
        help="JSON / dataset field holding each document's text (default: text)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output directory (default: data/NAME, NAME from the input's file or directory name)",
    )
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        metavar="NAME",
        help="gpt2 (default), another tiktoken encoding (cl100k_base, ...), or a Hugging Face tokenizer name or path",
    )
    p.add_argument(
        "--shard-tokens",
        type=_count,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help="tokens per shard (default: 100M)",
    )
    val = p.add_mutually_exclusive_group()
    val.add_argument(
        "--val-tokens",
        type=_count,
        metavar="N",
        help="take the first N tokens as the validation split (default: 10M, or 10%% of the tokens for local input under 1 GB)",
    )
    val.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="take this fraction of all tokens, from the front, as validation",
    )
    p.add_argument("--workers", type=int, default=0, metavar="N", help="tokenizer threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory made from other input")
    p.add_argument(
        "--strict-utf8", action="store_true", help="stop at the first byte that is not UTF-8 instead of replacing it"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    named = args.inputs[0] if len(args.inputs) == 1 and args.inputs[0] in NAMED_CORPORA else None
    if named and Path(named).exists():
        named = None  # a real file or directory of that name wins
    try:
        cfg = PrepareConfig(
            inputs=args.inputs,
            hf_dataset=args.hf_dataset,
            hf_config=args.hf_config,
            hf_split=args.hf_split,
            text_field=args.text_field,
            out=args.out,
            tokenizer=args.tokenizer,
            shard_tokens=args.shard_tokens,
            val_tokens=args.val_tokens,
            val_fraction=args.val_fraction,
            workers=args.workers,
            overwrite=args.overwrite,
            strict_utf8=args.strict_utf8,
            command=shlex.join(["python", "prepare_data.py", *argv]),
        )
        prepare(cfg, named=named)
    except (DataPrepError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
