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
- The main process reads the input as bytes and cuts it into tasks of about 1 MB, only where
  tiktoken's GPT-2, cl100k and o200k patterns always start a new pre-token (a space between
  two letters; a newline after a non-space, before a letter or digit); worker processes
  decode, parse and tokenize them. The tokens are then exactly those of the whole document,
  memory stays bounded on a file larger than RAM, and one big file still spreads over all
  workers. (Tokenizers that prepend a marker to every call, as some SentencePiece models do,
  can differ at these cuts.) Results are collected in input order, so the shards are
  byte-identical for any `--workers`.
- Text is UTF-8; a UTF-8 byte-order mark is dropped, and a file that starts with a UTF-16 or
  UTF-32 byte-order mark is read in that encoding. Bytes that are not UTF-8 are replaced by
  U+FFFD and counted (a warning names the file and the first byte offset; the count is in
  meta.json); `--strict-utf8` stops instead. Lone UTF-16 surrogates in JSON strings
  ("\\ud83d" alone) are replaced and counted alike. A file that does not look like text at
  all (NUL bytes, or mostly invalid UTF-8 and control characters) is refused with a hint.
- Files whose name says they are not text (`.json`, `.parquet`, `.bz2`, `.zst`, `.zip`, ...)
  are refused with a hint rather than tokenized as bytes.
- Empty and whitespace-only documents are skipped and counted.
- Interruptions: every shard is written under a `.tmp` name and renamed; meta.json is
  written last. Once a shard is on disk, the in-progress marker records it with the input
  position its last token came from (file and byte offset, or the dataset examples read and
  the dataset's own state). Running the same command again after an interruption (Ctrl-C,
  kill -9, a dropped stream, a full disk) keeps those shards and continues from that
  position, and ends byte-identical to an uninterrupted run. Running it on a finished
  directory does nothing. A finished directory made from other input is only replaced with
  `--overwrite` (an unfinished one is replaced anyway); an unfinished one of the same input
  and settings is continued, with `--overwrite` too.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import dataclasses
import glob
import gzip
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import shlex
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from files import (
    DownloadError,
    cache_dir,
    discard_output,
    download,
    sha256_check,
    write_atomic,
    write_text_atomic,
)
from tokenizer import Tokenizer, TokenizerError, get_tokenizer, load_tokenizer

FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_TOKENS = 10_000_000
DEFAULT_VAL_FRACTION = 0.1
SMALL_INPUT_BYTES = 1 << 30  # local input below this gets a val fraction by default
READ_BYTES = 1 << 20
TASK_BYTES = 1 << 20  # input per worker task: big enough to amortise the hand-over, small enough to balance
MAX_TASK_BYTES = 1 << 24  # text with no safe cut point this long is cut anyway (and counted)
PIECE_CHARS = 1 << 18  # a long document (a JSONL line, a dataset example) is tokenized in pieces this long
MAX_PIECE_CHARS = 1 << 24
SNIFF_BYTES = 1 << 13  # the start of each file, checked to be text before anything is written
MAX_NOT_TEXT = 0.3  # a file is refused as not text when more of its first characters are invalid or control
META_NAME = "meta.json"
MARKER_NAME = ".prepare_in_progress.json"
STAGE_NAME = "tokens.stage"  # all tokens, before a --val-fraction split
EXIT_ERROR, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130
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
# Byte-order marks, longest first: a UTF-32 LE mark starts like a UTF-16 LE one.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

# A cut point where every tiktoken pattern (GPT-2, cl100k, o200k) starts a new pre-token in
# the whole text as well as in the piece: before " x" that follows a letter, or after a lone
# "\n" that follows a non-space and precedes a letter or digit. No pattern lets a letter run
# swallow a following space, or a newline join a following letter or digit. (Not any
# non-space after the newline: o200k keeps ".\n/" together.)
_SAFE_CUT = re.compile(r"(?<=[^\W\d_])(?= [^\W\d_])|(?<=\S\n)(?=[^\W_])")
_CUT_SEARCH_CHARS = 4096
_CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")  # C0 controls but tab, newlines, form feed, escape


class DataPrepError(RuntimeError):
    """Bad input or output location; the message names the file and says what to do."""


class FlagError(DataPrepError):
    """Flags that cannot work together (exit status 2)."""


class InputError(DataPrepError):
    """Inputs that give nothing to read: a missing path, or no text at all (exit status 2)."""


class OutputError(DataPrepError):
    """An --out that cannot be written: a file, read-only, or under a file (exit status 2)."""


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
    warning: str | None = field(default=None, compare=False)  # about first_invalid; not recorded

    def add(self, other: Stats) -> str | None:
        """Add another task's counts (which come later in the input); return its warning if it
        holds the first invalid text of all."""
        warning = other.warning if self.first_invalid is None else None
        for name in ("documents", "empty_documents", "invalid_utf8", "forced_cuts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_empty = self.first_empty or other.first_empty
        self.first_invalid = self.first_invalid or other.first_invalid
        return warning

    def snapshot(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "warning"}


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


def _nul_error(where: str, offset: int) -> DataPrepError:
    name = Path(where).name
    return DataPrepError(
        f"{where}: byte offset {offset} is a NUL byte, which text does not hold: this is binary data, or text in "
        "UTF-16 or UTF-32 without a byte-order mark.\nHINT: leave it out, or convert it to UTF-8 first "
        f"(for example `iconv -f UTF-16LE -t UTF-8 {name} > {Path(name).stem}.utf8.txt`)."
    )


def _refuse_if_not_text(path: Path, sample: bytes) -> None:
    """Stop on a file that is binary, or text in an encoding other than UTF-8, judged by its start."""
    if b"\x00" in sample:
        raise _nul_error(str(path), sample.index(b"\x00"))
    sample = sample[: len(sample) - _incomplete_utf8_tail(sample)]
    text = sample.decode("utf-8", "replace")
    bad = text.count("\ufffd") - sample.count("\ufffd".encode()) + len(_CONTROL.findall(text))
    if bad > MAX_NOT_TEXT * len(text):
        raise DataPrepError(
            f"{path}: does not look like UTF-8 text: {bad} of its first {len(text)} characters are not valid UTF-8 "
            "or are control characters.\nHINT: if it is text in another encoding, convert it to UTF-8 first "
            f"(for example `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`); if it is binary, leave it out."
        )


class _Utf8Stream:
    """One input file as a stream of UTF-8 bytes: gunzipped, with a UTF-8 byte-order mark
    dropped, and converted from UTF-16 or UTF-32 when it starts with their byte-order mark.

    Positions count bytes of that stream: file offsets for a UTF-8 file, which is the usual
    case, and offsets into the converted text otherwise."""

    def __init__(self, path: Path, position: int = 0) -> None:
        self.path = path
        self.file = _open_binary(path)
        try:
            head = self.file.read(SNIFF_BYTES)
            self.encoding, bom = next(
                ((enc, bom) for bom, enc in BYTE_ORDER_MARKS if head.startswith(bom)), ("utf-8", b"")
            )
            if self.encoding == "utf-8":
                _refuse_if_not_text(path, head[len(bom) :])
            self.file.seek(len(bom) if self.encoding == "utf-8" else 0)
            self.decoder = None if self.encoding == "utf-8" else codecs.getincrementaldecoder(self.encoding)()
            self.pending = b""
            self.position = len(bom) if self.encoding == "utf-8" else 0
            if position > self.position:
                self._skip(position - self.position)
        except BaseException:
            self.file.close()
            raise

    def raw_position(self) -> int:
        """Bytes of the file on disk read so far (of the compressed file, for .gz), for progress."""
        return (self.file.fileobj if isinstance(self.file, gzip.GzipFile) else self.file).tell()

    def read(self, size: int) -> bytes:
        if self.decoder is None:
            data = self.file.read(size)
        else:
            while len(self.pending) < size:
                raw = self.file.read(size)
                try:
                    self.pending += self.decoder.decode(raw, final=not raw).encode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataPrepError(
                        f"{self.path}: starts with a {self.encoding.upper()} byte-order mark but is not valid "
                        f"{self.encoding.upper()} ({e.reason}).\nHINT: convert it to UTF-8 with a tool that "
                        "reports where (for example iconv), or leave it out."
                    ) from None
                if not raw:
                    break
            data, self.pending = self.pending[:size], self.pending[size:]
        self.position += len(data)
        return data

    def _skip(self, size: int) -> None:
        if self.decoder is None:
            self.file.seek(self.position + size)  # (.gz: decompressed and dropped, much faster than tokenizing)
            self.position += size
            return
        while size:
            size -= len(self.read(min(size, READ_BYTES))) or size

    def close(self) -> None:
        self.file.close()


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
            stats.warning = f"{where}: bytes that are not UTF-8 at byte offset {position}; replaced by U+FFFD"
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
            stats.warning = f"{where}: lone surrogate at character {e.start}; replaced by U+FFFD"
        return clean


# ---- cut points ----


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


def _char_start(data: bytes, i: int) -> int:
    """Byte offset i, moved back to the first byte of the UTF-8 character it falls inside."""
    for _ in range(3):
        if 0 < i < len(data) and data[i] & 0xC0 == 0x80:
            i -= 1
    return i


def _window(data: bytes, lo: int, hi: int) -> tuple[str, int]:
    """data[lo:hi] as text, lo first moved forward to a character's start. Invalid bytes become
    one lone surrogate each (surrogateescape), so that character offsets map back to bytes;
    they are no letter, digit or space, as U+FFFD is not."""
    for _ in range(3):
        if lo < hi and data[lo] & 0xC0 == 0x80:
            lo += 1
    return data[lo:hi].decode("utf-8", "surrogateescape"), lo


def _byte_offset(text: str, index: int, lo: int) -> int:
    return lo + len(text[:index].encode("utf-8", "surrogateescape"))


def _find_cut(data: bytes, searched: int, base: int = 0) -> tuple[int | None, int]:
    """A safe cut point, as a byte offset from the start of the task: the last in the
    _CUT_SEARCH_CHARS bytes before TASK_BYTES, else the first after it and before MAX_TASK_BYTES.
    `data` holds the text from byte `base` of the task on (a window around TASK_BYTES for base > 0,
    which can only give the first answer); its first `searched` bytes are known to hold none.
    Returns (None, searched) when none is found yet. Only the bytes decide, never how they were
    read, so a resumed run cuts where an uninterrupted one did."""
    target = base + _char_start(data, TASK_BYTES - base)
    if base + len(data) < target + 8:  # (a match needs up to 8 bytes after it)
        return None, searched
    if searched < target:
        text, lo = _window(data, max(0, target - _CUT_SEARCH_CHARS) - base, target - base + 8)
        head = len(data[lo : target - base].decode("utf-8", "surrogateescape"))
        last = None
        for match in _SAFE_CUT.finditer(text):
            if match.start() > head:
                break
            last = match.start()
        if last:
            return base + _byte_offset(text, last, lo), searched
    if base:
        return None, target
    start = _char_start(data, max(target, searched))
    end = min(len(data), MAX_TASK_BYTES + 8)
    text, lo = _window(data, max(0, start - 8), end)
    match = _SAFE_CUT.search(text, len(data[lo:start].decode("utf-8", "surrogateescape")))
    if match and _byte_offset(text, match.start(), lo) < MAX_TASK_BYTES:
        return _byte_offset(text, match.start(), lo), searched
    return None, max(target, end - 8)


# ---- tasks: what the main process reads, for the workers to tokenize ----


@dataclass
class _Task:
    kind: str  # "text" (a stretch of one text file), "jsonl" (whole lines) or "docs" (dataset examples)
    data: bytes | list[str] | None  # None: the worker reads `length` bytes at `offset` of the file `where`
    where: str  # the file or dataset, for messages
    offset: int = 0  # of data in the file (bytes), or the first example's index
    length: int = 0
    lineno: int = 1  # of the first line, for "jsonl"
    forced_cuts: int = 0
    file_end: bool = False  # the last task of its file
    end: Any = None  # the input position right after this task, for the in-progress marker
    read: int = 0  # input bytes read up to the end of this task, for the progress bar


def _text_file_tasks(stream: _Utf8Stream, index: int, done: int) -> Iterator[_Task]:
    """One .txt file (one document) in tasks of about TASK_BYTES, cut at safe cut points."""
    where, offset = str(stream.path), stream.position
    data, searched, forced = b"", 0, 0
    while True:
        block = stream.read(READ_BYTES)
        data += block
        while len(data) > TASK_BYTES:
            cut, searched = _find_cut(data, searched)
            if cut is None:
                if len(data) < MAX_TASK_BYTES + 8:
                    break  # wait for more text
                cut, forced = _char_start(data, TASK_BYTES), forced + 1
            end, read = (index, offset + cut, 1), done + stream.raw_position()
            yield _Task("text", data[:cut], where, offset, forced_cuts=forced, end=end, read=read)
            data, offset, searched, forced = data[cut:], offset + cut, max(0, searched - cut), 0
        if not block:
            end, read = (index + 1, 0, 1), done + stream.raw_position()
            yield _Task("text", data, where, offset, forced_cuts=forced, file_end=True, end=end, read=read)
            return


def _plain_text_file_tasks(stream: _Utf8Stream, index: int, done: int) -> Iterator[_Task]:
    """A .txt file in UTF-8 as _text_file_tasks cuts it, but reading only a few kB around each
    cut point: the workers read the text themselves, so this process never holds or copies it."""
    where, offset, size = str(stream.path), stream.position, stream.path.stat().st_size
    while True:
        cut, forced = _next_cut(stream.file, offset) if size - offset > TASK_BYTES else (None, 0)
        end, read = ((index, offset + cut, 1), done + offset + cut) if cut else ((index + 1, 0, 1), done + size)
        length = cut or size - offset
        yield _Task("text", None, where, offset, length, forced_cuts=forced, file_end=not cut, end=end, read=read)
        if not cut:
            return
        offset += cut


def _next_cut(file: BinaryIO, offset: int) -> tuple[int | None, int]:
    """(cut, forced cuts) for the task at `offset` of a plain file; (None, 0) when the rest of the
    file is one task. The window around TASK_BYTES nearly always holds a cut point; where it does
    not, the task's bytes are read from its start, as _text_file_tasks would."""
    base = max(0, TASK_BYTES - _CUT_SEARCH_CHARS - 16)
    file.seek(offset + base)
    cut, searched = _find_cut(file.read(TASK_BYTES - base + 8), 0, base)
    if cut is not None:
        return cut, 0
    file.seek(offset)
    data = b""
    while True:
        block = file.read(READ_BYTES)
        data += block
        if len(data) > TASK_BYTES:
            cut, searched = _find_cut(data, searched)
            if cut is not None:
                return cut, 0
            if len(data) >= MAX_TASK_BYTES + 8:
                return _char_start(data, TASK_BYTES), 1
        if not block:
            return None, 0


def _jsonl_file_tasks(stream: _Utf8Stream, index: int, lineno: int, done: int) -> Iterator[_Task]:
    """One .jsonl file in tasks of whole lines, about TASK_BYTES each."""
    where, offset, data = str(stream.path), stream.position, b""
    while True:
        block = stream.read(READ_BYTES)
        data += block
        if len(data) >= TASK_BYTES or not block:
            cut = data.rfind(b"\n") + 1 if block else len(data)
            lines = data.count(b"\n", 0, cut)
            end = (index + 1, 0, 1) if not block else (index, offset + cut, lineno + lines)
            read = done + stream.raw_position()
            if cut or not block:
                yield _Task("jsonl", data[:cut], where, offset, lineno, file_end=not block, end=end, read=read)
                data, offset, lineno = data[cut:], offset + cut, lineno + lines
        if not block:
            return


def _file_tasks(files: list[Path], start: list) -> Iterator[_Task]:
    """The tasks of all files from position `start` ([file index, byte offset, line number])."""
    index, offset, lineno = start
    done = sum(p.stat().st_size for p in files[:index])
    for i in range(index, len(files)):
        path = files[i]
        try:
            stream = _Utf8Stream(path, offset if i == index else 0)
            try:
                if path.name.endswith((".jsonl", ".jsonl.gz")):
                    yield from _jsonl_file_tasks(stream, i, lineno if i == index else 1, done)
                elif stream.decoder is None and not isinstance(stream.file, gzip.GzipFile):
                    yield from _plain_text_file_tasks(stream, i, done)
                else:
                    yield from _text_file_tasks(stream, i, done)
            finally:
                stream.close()
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataPrepError(f"{path}: could not be read ({type(e).__name__}: {e}).") from e
        done += path.stat().st_size


def _dataset_state(dataset: Any) -> dict | None:
    """The dataset's own resumable position (datasets' IterableDataset.state_dict), if it has one."""
    try:
        state = dataset.state_dict()
        json.dumps(state)
        return state
    except Exception:  # no such method, or a state that cannot be written down: count examples instead
        return None


def _open_dataset(cfg: PrepareConfig, start: dict) -> tuple[Any, Iterator]:
    """The dataset stream, at example start["examples"] (by the dataset's state where it has one)."""
    try:
        from datasets import load_dataset

        dataset = load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=True)
        skip = start["examples"]
        if start.get("state") is not None and hasattr(dataset, "load_state_dict"):
            dataset.load_state_dict(start["state"])
            skip = 0
        return dataset, itertools.islice(iter(dataset), skip, None)
    except Exception as e:
        raise DataPrepError(
            f"could not open Hugging Face dataset {cfg.hf_dataset!r} (config {cfg.hf_config!r}, split "
            f"{cfg.hf_split!r}): {type(e).__name__}: {e}\nHINT: check the name, --hf-config and --hf-split; "
            "offline, set HF_DATASETS_OFFLINE=1 and have it in the Hugging Face cache, or pass local .jsonl files."
        ) from e


def _dataset_tasks(cfg: PrepareConfig, start: dict) -> Iterator[_Task]:
    """Dataset examples in tasks of about TASK_BYTES characters."""
    dataset, examples = _open_dataset(cfg, start)
    index = first = start["examples"]
    batch, size = [], 0
    while True:
        try:
            example = next(examples)
        except StopIteration:
            example = None
        except Exception as e:
            raise DataPrepError(
                f"Hugging Face dataset {cfg.hf_dataset!r}: reading example {index} failed: {type(e).__name__}: {e}\n"
                "HINT: if the network dropped, run the same command again: it continues after the last shard "
                "written."
            ) from e
        if example is not None:
            batch.append(_field_text(example, cfg.text_field, f"{cfg.hf_dataset} example {index}"))
            size, index = size + len(batch[-1]), index + 1
        if batch and (size >= TASK_BYTES or example is None):
            end = {"examples": index, "state": _dataset_state(dataset)}
            yield _Task("docs", batch, cfg.hf_dataset, first, end=end, read=index)
            batch, size, first = [], 0, index
        if example is None:
            return


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


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files named by paths, directories and globs, each checked to be readable text, in order."""
    files: list[Path] = []
    for spec in specs:
        if glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise InputError(f"{spec}: no files match this pattern.")
        elif Path(spec).is_dir():
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise InputError(f"{spec}: directory holds no {', '.join(TEXT_SUFFIXES)} files.")
        elif Path(spec).is_file():
            found = [Path(spec)]
        else:
            raise InputError(f"{spec}: no such file or directory.\nHINT: check the path.")
        for path in found:
            hint = NOT_TEXT_HINTS.get(path.suffix.lower())
            if hint and not path.name.endswith(TEXT_SUFFIXES):
                raise DataPrepError(
                    f"{path}: a {path.suffix} file is not text or JSONL, which is what this reads.\nHINT: {hint}."
                )
        files.extend(found)
    files = _each_once(files)
    empty = {}
    for path in files:  # refused before anything is written
        try:
            reason = _no_text(path)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataPrepError(f"{path}: could not be read ({type(e).__name__}: {e}).") from e
        except OSError as e:
            raise DataPrepError(f"{path}: cannot be opened ({e.strerror or e}).") from e
        if reason:
            empty[path] = reason
    if files and len(empty) == len(files):
        raise InputError(_no_text_message(empty))
    return files


def _each_once(files: list[Path]) -> list[Path]:
    """The files in order, each once (by resolved path): overlapping inputs (`a.txt a.txt`,
    `books/ books/*.txt`) would otherwise tokenize the same text twice."""
    seen: set[Path] = set()
    unique, repeated = [], []
    for path in files:
        real = path.resolve()
        (repeated if real in seen else unique).append(path)
        seen.add(real)
    if repeated:
        _say(f"note: {len(repeated)} input file(s) named more than once, the first {repeated[0]}; each is read once")
    return unique


def _no_text(path: Path) -> str | None:
    """Why a file holds no text ("0 bytes", "only whitespace"), judged by its start, which is
    checked to be text; None when it has text or is too long to tell without reading it all."""
    stream = _Utf8Stream(path)
    try:
        head = stream.read(SNIFF_BYTES + 1)
    finally:
        stream.close()
    if len(head) > SNIFF_BYTES:
        return None
    text = head.decode("utf-8", "replace")
    return "0 bytes" if not text else None if text.strip() else "only whitespace"


def _no_text_message(empty: dict[Path, str]) -> str:
    if len(empty) == 1:
        [(path, reason)] = empty.items()
        return f"{path} has no text ({reason}), so there is nothing to tokenize.\nHINT: give a file with text."
    listed = ", ".join(f"{path} ({reason})" for path, reason in itertools.islice(empty.items(), 5))
    more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
    return f"the input is empty: none of its {len(empty)} files has text: {listed}{more}.\nHINT: give files with text."


# ---- tokenizing (in the worker processes) ----


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class _Result:
    tokens: np.ndarray
    stats: Stats
    blank: bool = False  # a "text" task of whitespace only


class _Encoder:
    """Turns one task into one token array (with the end-of-text token before each JSONL or
    dataset document; a text file's goes in when the results are put in order)."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, text_field: str, strict: bool) -> None:
        self.tokenizer, self.dtype, self.text_field, self.strict = tokenizer, dtype, text_field, strict
        self.eot = np.array([tokenizer.eot_id], dtype=dtype)

    def __getstate__(self) -> dict:  # to a spawned worker: the tokenizer by name, loaded there
        return {"name": self.tokenizer.name, "dtype": self.dtype.str, "field": self.text_field, "strict": self.strict}

    def __setstate__(self, state: dict) -> None:
        self.__init__(load_tokenizer(state["name"]), np.dtype(state["dtype"]), state["field"], state["strict"])

    def __call__(self, task: _Task) -> _Result:
        stats = Stats(forced_cuts=task.forced_cuts)
        if task.kind == "text":
            data = task.data if task.data is not None else _read_range(task.where, task.offset, task.length)
            text = _decode(data, task.where, task.offset, stats, self.strict)
            if "\x00" in text:  # (the start of the file was checked; this is further in)
                raise _nul_error(task.where, task.offset + len(text[: text.index("\x00")].encode()))
            return _Result(self.tokens([(text, False)]), stats, blank=not text.strip())
        if task.kind == "jsonl":
            pieces = list(self._jsonl_pieces(task, stats))
        else:
            pieces = []
            for i, text in enumerate(task.data):
                where = f"{task.where} example {task.offset + i}"
                text = _without_lone_surrogates(text, where, stats, self.strict)
                pieces.extend(_document_pieces(text, where, stats))
        return _Result(self.tokens(pieces), stats)

    def _jsonl_pieces(self, task: _Task, stats: Stats) -> Iterator[tuple[str, bool]]:
        offset = task.offset
        for lineno, raw in enumerate(task.data.split(b"\n"), task.lineno):
            start, offset = offset, offset + len(raw) + 1
            if not raw.strip():
                continue
            where = f"{task.where}:{lineno}"
            try:
                record = json.loads(_decode(raw, where, start, stats, self.strict))
            except json.JSONDecodeError as e:
                raise DataPrepError(
                    f"{where}: not valid JSON ({e.msg}, column {e.colno}).\n"
                    "HINT: every line of a .jsonl file must be one JSON object."
                ) from None
            text = _without_lone_surrogates(_field_text(record, self.text_field, where), where, stats, self.strict)
            yield from _document_pieces(text, where, stats)

    def tokens(self, pieces: list[tuple[str, bool]]) -> np.ndarray:
        """The tokens of (text, starts_document) pieces, an end-of-text token before each document."""
        tok = self.tokenizer
        texts = [text for text, _ in pieces]
        if tok.kind == "tiktoken" and hasattr(tok.backend, "encode_to_numpy"):
            # Same ids as encode_ordinary (no special tokens allowed), without building a Python list.
            ids = [tok.backend.encode_to_numpy(text, disallowed_special=()) for text in texts]
        else:
            ids = [np.asarray(x, dtype=np.int64) for x in tok.encode_batch(texts)] if texts else []
        parts = [self.eot[:0]]
        for (_, starts_document), arr in zip(pieces, ids):
            if starts_document:
                parts.append(self.eot)
            parts.append(arr)
        # Every id is below vocab_size, which fits the dtype by construction (token_dtype).
        return np.concatenate(parts, dtype=self.dtype, casting="unsafe")


def _read_range(path: str, offset: int, length: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as e:
        raise DataPrepError(f"{path}: could not be read ({type(e).__name__}: {e}).") from e
    if len(data) != length:
        raise DataPrepError(f"{path}: changed while it was being read.\nHINT: run again once it is complete.")
    return data


def _document_pieces(text: str, where: str, stats: Stats) -> Iterator[tuple[str, bool]]:
    if not text.strip():
        stats.empty_documents += 1
        stats.first_empty = stats.first_empty or where
        return
    stats.documents += 1
    for i, piece in enumerate(_split_pieces([text], stats)):
        yield piece, i == 0


_WORKER_ENCODER: _Encoder | None = None


def _start_worker(encoder: _Encoder, parent: int) -> None:
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which stops the pool
    if sys.platform == "linux":  # a main process killed (kill -9) takes its workers with it
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    _WORKER_ENCODER = encoder


def _encode_in_worker(task: _Task) -> _Result:
    return _WORKER_ENCODER(task)


@contextmanager
def _worker_pool(encoder: _Encoder, workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` tokenizer processes (None for one: the work is then done in this process)."""
    if workers == 1:
        yield None
        return
    # Processes, not threads: threads share tiktoken's regex scratch pools; two often halve each other's speed.
    # fork passes the loaded tokenizer to the workers at no cost; elsewhere they load it by name.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(encoder, os.getpid()))
    try:
        pool.submit(int)  # forks the workers at once, before this process starts threads of its own
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _results(
    tasks: Iterable[_Task], encoder: _Encoder, pool: ProcessPoolExecutor | None, workers: int
) -> Iterator[tuple[_Task, _Result]]:
    """Each task with its result, in input order."""
    if pool is None:
        for task in tasks:
            yield task, encoder(task)
        return
    try:
        in_flight: collections.deque = collections.deque()
        for task in tasks:
            in_flight.append((task, pool.submit(_encode_in_worker, task)))
            # Enough queued to keep every worker busy while we write; few enough to bound memory.
            if len(in_flight) > 2 * workers:
                task, future = in_flight.popleft()
                yield task, future.result()
        while in_flight:
            task, future = in_flight.popleft()
            yield task, future.result()
    except BrokenProcessPool as e:
        raise DataPrepError(
            f"a tokenizer process died ({e}); the system may have run out of memory.\n"
            "HINT: run the same command again, with fewer --workers if memory is short: it continues after "
            "the last shard written."
        ) from e


# ---- putting results in order ----


class _Assembler:
    """Puts task results together into one token stream, in input order: the end-of-text token
    before each text file's first task that is not blank, the counts of all tasks summed, and
    each first problem warned about once."""

    def __init__(self, eot: np.ndarray, stats: Stats, started: bool, warn: Callable[[str], None]) -> None:
        self.eot, self.stats, self.warn = eot, stats, warn
        self.started = started  # the current text file's document has begun
        self.held: list[np.ndarray] = []  # a text file's leading whitespace, until its text begins

    @property
    def resumable(self) -> bool:
        """A run can restart right after the last task added (nothing is held back)."""
        return not self.held

    def add(self, task: _Task, result: _Result) -> list[np.ndarray]:
        warning = self.stats.add(result.stats)
        if warning:
            self.warn(f"warning: {warning}")
        if task.kind != "text":
            return [result.tokens]
        out = []
        if self.started:
            out = [result.tokens]
        elif result.blank:
            self.held.append(result.tokens)
        else:
            out = [self.eot, *self.held, result.tokens]
            self.held, self.started = [], True
            self.stats.documents += 1
        if task.file_end:
            if not self.started:
                self.stats.empty_documents += 1
                self.stats.first_empty = self.stats.first_empty or task.where
                reason = "only whitespace" if any(len(tokens) for tokens in self.held) else "0 bytes"
                self.warn(f"warning: {task.where} has no text ({reason}); skipped")
            self.held, self.started = [], False
        return out


# ---- writing shards ----


class ShardWriter:
    """Cuts a token stream into val shards (the first `val_tokens`) and then train shards.

    A full shard is hashed and written on a background thread (hashlib and file writes release
    the GIL) while the next one fills a second buffer, so that writing never stalls the workers.
    `done` holds the shards an interrupted run finished, to continue after; `on_disk(tokens,
    {"shards": ...})` is called each time a shard is on disk."""

    def __init__(
        self,
        out_dir: Path,
        dtype: np.dtype,
        shard_tokens: int,
        val_tokens: int,
        done: dict[str, list[dict]] | None = None,
        on_disk: Callable[[int, dict], None] | None = None,
    ) -> None:
        self.out_dir, self.on_disk = out_dir, on_disk
        self.buffers = [np.empty(shard_tokens, dtype=dtype), np.empty(shard_tokens, dtype=dtype)]
        self.buf = self.buffers[0]
        self.fill = 0
        self.shards: dict[str, list[dict]] = {s: [dict(x) for x in (done or {}).get(s, [])] for s in ("train", "val")}
        self.on_disk_tokens = sum(x["tokens"] for split in self.shards.values() for x in split)
        self.val_left = max(0, val_tokens - sum(x["tokens"] for x in self.shards["val"]))
        self.split = "val" if self.val_left > 0 else "train"
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-shards")
        self.pending = None  # the shard being written, at most one at a time

    def write(self, tokens: np.ndarray) -> None:
        if self.pending is not None and self.pending[1].done():
            self._wait()
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
            self.on_disk_tokens += entry["tokens"]
            if self.on_disk is not None:
                self.on_disk(self.on_disk_tokens, {"shards": json.loads(json.dumps(self.shards))})

    def close(self) -> dict[str, list[dict]]:
        try:
            if self.fill:
                self._flush()
            self._wait()
        finally:
            self.io.shutdown()
        return self.shards

    def abort(self) -> None:
        """Stop after a failure: the shard being written is finished or removed, nothing else starts."""
        try:
            self._wait()
        except Exception:
            pass  # (its .tmp file is gone: write_atomic removes it on failure)
        finally:
            self.io.shutdown()


def _write_npy(path: Path, tokens: np.ndarray) -> str:
    """Write a 1-D array as a .npy file (atomically); return the file's sha256."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(tokens.dtype), "fortran_order": False, "shape": (len(tokens),)}
    )
    return write_atomic(path, [header.getvalue(), memoryview(tokens).cast("B")])


class _Stage:
    """All tokens, for --val-fraction, whose split needs the total first. They gather in memory,
    `every` tokens at most (the size of a shard); each time that fills, it is appended to the
    staging file, synced, and `on_disk(tokens, state)` told. A corpus smaller than that never
    touches the disk before its shards are written."""

    def __init__(self, path: Path, dtype: np.dtype, every: int, done: int, on_disk: Callable[[int, dict], None]):
        self.path, self.on_disk = path, on_disk
        self.buf, self.fill = np.empty(every, dtype=dtype), 0
        self.filed = self.synced = done  # tokens in the file, and of those on disk for sure
        if done:
            self.abort()  # (drops what a failed run wrote after its last sync)

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = tokens[: len(self.buf) - self.fill]
            self.buf[self.fill : self.fill + len(take)] = take
            self.fill += len(take)
            tokens = tokens[len(take) :]
            if self.fill == len(self.buf):
                self._append(sync=True)
                self.on_disk(self.synced, {"staged": self.synced, "itemsize": self.buf.itemsize})

    def _append(self, sync: bool) -> None:
        with open(self.path, "ab") as f:
            f.write(memoryview(self.buf[: self.fill]).cast("B"))
            if sync:
                f.flush()
                os.fsync(f.fileno())
        self.filed += self.fill
        self.synced = self.filed if sync else self.synced
        self.fill = 0

    def tokens(self) -> np.ndarray:
        """All tokens: from memory when they never reached the file, else from its pages."""
        if not self.filed:
            return self.buf[: self.fill]
        if self.fill:
            # (not synced: if the shards cut from it are not all written, a rerun resumes from the last sync)
            self._append(sync=False)
        return np.memmap(self.path, dtype=self.buf.dtype, mode="r", shape=(self.filed,))

    def abort(self) -> None:
        """Drop what is in the staging file after its last sync (after a failure, a full disk gets it back)."""
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(self.synced * self.buf.itemsize)


def _shards_from_stage(out: Path, staged: np.ndarray, shard_tokens: int, val_tokens: int) -> dict:
    """Cut all tokens into val and train shards, as a ShardWriter would, without copying them."""
    total = len(staged)
    shards: dict[str, list[dict]] = {"train": [], "val": []}
    for split, lo, hi in (("val", 0, min(val_tokens, total)), ("train", min(val_tokens, total), total)):
        for i, start in enumerate(range(lo, hi, shard_tokens)):
            name, piece = f"{split}_{i:06d}.npy", staged[start : min(start + shard_tokens, hi)]
            shards[split].append({"file": name, "tokens": len(piece), "sha256": _write_npy(out / name, piece)})
    return shards


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
    write_text_atomic(out / META_NAME, json.dumps(meta, indent=2))
    (out / MARKER_NAME).unlink(missing_ok=True)
    (out / STAGE_NAME).unlink(missing_ok=True)
    return meta


# ---- the output directory and the in-progress marker ----


class _Marker:
    """The in-progress marker: the request, and how far the run has got on disk.

    After each task the input position right after it and the token count up to there are
    noted. When the shards (or the staging file) hold N tokens on disk, the last position
    noted at or before N is written down with them: a rerun reads from there and drops the
    tokens before N, which it has already."""

    def __init__(self, out: Path, request: dict, start: dict) -> None:
        self.path, self.request = out / MARKER_NAME, request
        self.noted: collections.deque[dict] = collections.deque([start])
        self.resume = start

    def note(self, position: Any, tokens: int, stats: Stats) -> None:
        self.noted.append({"position": position, "tokens": tokens, "stats": stats.snapshot()})

    def on_disk(self, tokens: int, state: dict) -> None:
        while self.noted and self.noted[0]["tokens"] <= tokens:
            self.resume = self.noted.popleft()
        progress = {"tokens": tokens, **state, "resume": self.resume}
        write_text_atomic(self.path, json.dumps({"request": self.request, "progress": progress}, indent=1))


def _our_files(out: Path) -> list[Path]:
    ours = [r"(train|val)_\d{6}\.npy", *(re.escape(name) for name in (META_NAME, MARKER_NAME, STAGE_NAME))]
    names = re.compile(f"({'|'.join(ours)})(\\.tmp)?")
    return [p for p in out.iterdir() if names.fullmatch(p.name)] if out.is_dir() else []


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on the output directory, so that concurrent runs (every rank of a job
    calling prepare_named_corpus, say) take turns: the first prepares, the rest find it done.

    A run that fails in a directory that was empty when it took the lock, before a rerun
    would have anything to continue from, removes what it wrote there, and the directory itself
    and those above it if it made them."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory.\nHINT: choose another --out.")
    existed = out.is_dir()
    try:
        fd, made = _lock(out)
    except OSError as e:
        raise OutputError(_unwritable_message(out, e)) from None
    try:
        fresh = not any(out.iterdir())
        try:
            yield
        except BaseException:
            if fresh:
                _remove_unfinished(out, made if existed else [out, *made])
            raise
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def _lock(out: Path) -> tuple[int | None, list[Path]]:
    """Make `out` and lock it: (the descriptor that holds the lock, None where there is no flock;
    the directories above `out` that this run found missing and made, deepest first)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    made: set[Path] = set()
    while True:
        made |= {p for p in out.parents if not p.exists()}
        out.mkdir(parents=True, exist_ok=True)
        deepest_first = sorted(made, key=lambda p: len(p.parts), reverse=True)
        if fcntl is None:  # no flock on this platform: no locking
            return None, deepest_first
        try:
            fd = os.open(out, os.O_RDONLY)
        except FileNotFoundError:  # removed since, by a run that failed: make it again
            continue
        _wait_for_lock(fd, out, fcntl)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(out)):
                return fd, deepest_first
        except FileNotFoundError:
            pass
        os.close(fd)  # the run that held it failed and removed the directory: lock the one there now


def _wait_for_lock(fd: int, out: Path, fcntl: Any) -> None:
    """Lock `fd`, saying so on stderr first if another run holds it: a wait with no output
    would look like a hang."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _say_waiting(out)
        fcntl.flock(fd, fcntl.LOCK_EX)


def _say_waiting(out: Path) -> None:
    print(f"waiting for another preparation into {out} to finish ...", file=sys.stderr, flush=True)


def _unwritable_message(out: Path, e: OSError) -> str:
    where = f": {e.filename}" if e.filename and Path(e.filename) != out else ""
    return (
        f"cannot write to --out {out} ({e.strerror or e}{where}).\n"
        "HINT: choose an --out in a folder you can write to (every part of its path a directory), "
        "or fix that folder's permissions."
    )


def _remove_unfinished(out: Path, made: list[Path]) -> None:
    """Remove a failed run's files, unless they are finished data or hold progress to continue
    from, then the directories in `made` (deepest first), each only if it is empty."""
    marker = _read_json(out / MARKER_NAME)
    if (out / META_NAME).exists() or (marker or {}).get("progress") is not None:
        return
    for path in _our_files(out):
        path.unlink(missing_ok=True)
    for directory in made:
        try:
            directory.rmdir()
        except OSError:  # not empty: it holds something this run did not write
            return


def _usable_progress(out: Path, progress: dict | None) -> dict | None:
    """An interrupted run's progress, if the files it lists are all there as it left them."""
    if not progress or "resume" not in progress:
        return None
    try:
        if "staged" in progress:
            intact = (out / STAGE_NAME).stat().st_size >= progress["staged"] * progress["itemsize"]
        else:
            entries = [x for split in progress["shards"].values() for x in split]
            intact = all(np.load(out / x["file"], mmap_mode="r").shape == (x["tokens"],) for x in entries)
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        _say(f"note: {out}: the files of the interrupted preparation are not as it left them; starting over")
    return progress if intact else None


def _claim_output_dir(out: Path, request: dict, overwrite: bool) -> tuple[bool, dict | None]:
    """(True, None) when `out` already holds exactly this request's output. Else `out` is made
    ready for writing and (False, progress): `progress` describes what an interrupted run of the
    same request left on disk, kept to continue from (None: start from the beginning).

    An unfinished preparation of the same request is this command's own work, so it is
    continued even with --overwrite, which replaces only what this command did not leave
    half-done: a finished directory, or one of other input or settings."""
    meta = _read_json(out / META_NAME)
    marker = _read_json(out / MARKER_NAME)
    if meta is not None and _same_request(meta, request) and not overwrite:
        return True, None
    if meta is not None and not overwrite:
        raise DataPrepError(
            f"{out} already holds data prepared from other input or settings ({_difference(meta, request)}; "
            f"made by: {meta.get('command', '?')}).\nHINT: pass --overwrite to replace it, or choose another --out."
        )
    if marker is None and meta is None and not overwrite and any(p.name.endswith(".npy") for p in _our_files(out)):
        raise DataPrepError(
            f"{out} holds shards without {META_NAME}; they were not made by this command.\n"
            "HINT: pass --overwrite to replace them, or choose another --out."
        )
    progress = None
    if meta is None and marker is not None:
        if marker.get("request") == request:
            progress = _usable_progress(out, marker.get("progress"))
        else:
            difference = _difference(marker.get("request"), request)
            _say(f"note: {out} holds an unfinished preparation of other input or settings ({difference}); replacing it")
    try:
        _clear_for(out, request, progress)
    except OSError as e:
        raise OutputError(_unwritable_message(out, e)) from None
    return False, progress


def _clear_for(out: Path, request: dict, progress: dict | None) -> None:
    """Remove this project's files from `out` but those `progress` continues from, and mark it
    as being prepared for `request`."""
    # meta.json goes first, so that nothing here looks complete while old shards are replaced.
    (out / META_NAME).unlink(missing_ok=True)
    if progress is None:
        write_text_atomic(out / MARKER_NAME, json.dumps({"request": request, "progress": None}, indent=1))
    keep = {MARKER_NAME}
    if progress is not None:
        keep |= {STAGE_NAME} if "staged" in progress else {x["file"] for s in progress["shards"].values() for x in s}
    for path in _our_files(out):
        if path.name not in keep:
            path.unlink()


def _same_request(meta: dict, request: dict) -> bool:
    return {k: meta.get(k) for k in request} == request


# The flags behind the request's fields, to name a difference as the user typed it.
_FLAG_NAMES = {
    "text_field": "--text-field",
    "hf_dataset": "--hf-dataset",
    "config": "--hf-config",
    "split": "--hf-split",
}


def _difference(earlier: Any, request: dict) -> str:
    """What sets `request` apart from an earlier one, in a few words: each setting that differs
    with both values, or how the input files differ. A typo in a flag shows up here."""
    if not isinstance(earlier, dict):
        return "its settings are unreadable"
    settings, source = earlier.get("settings") or {}, earlier.get("source") or {}
    found = [
        f"{_setting_text(key, settings.get(key))} there, {_setting_text(key, value)} here"
        for key, value in request["settings"].items()
        if settings.get(key) != value
    ]
    if "files" in source and "files" in request["source"]:
        found += _files_difference(source["files"], request["source"]["files"])
    found += [
        f"{_FLAG_NAMES.get(key, key)} {source.get(key)} there, {value} here"
        for key, value in request["source"].items()
        if key != "files" and source.get(key) != value
    ]
    if earlier.get("format_version") != request["format_version"]:
        found.append(f"format version {earlier.get('format_version')} there, {request['format_version']} here")
    return "; ".join(found[:3]) or "other input"


def _setting_text(key: str, value: Any) -> str:
    if key == "val" and isinstance(value, dict) and len(value) == 1:
        [(kind, amount)] = value.items()
        return f"--val-{kind} {amount}"
    return f"--{key.replace('_', '-')} {value}"


def _files_difference(earlier: list[dict], files: list[dict]) -> list[str]:
    """How two lists of input files ({"path", "bytes", "mtime_ns"}) differ, in at most three phrases."""
    before, now = [x.get("path") for x in earlier], [x["path"] for x in files]
    if before != now:
        gone, added = [p for p in before if p not in now], [p for p in now if p not in before]
        found = [f"{len(before)} input file(s) there, {len(now)} here"]
        found += [
            f"{what}: {paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
            for what, paths in (("only there", gone), ("only here", added))
            if paths
        ]
        return found if gone or added else ["input files in another order"]
    changed = [x["path"] for x, y in zip(earlier, files) if x != y]
    return [f"{changed[0]} changed since (size or modification time)"] if changed else []


# ---- settings ----


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


def _flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A PrepareConfig field that is also a command-line flag."""
    if isinstance(default, list):
        return field(default_factory=list, metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class PrepareConfig:
    inputs: list[str] = _flag(
        [],
        ".txt / .jsonl files (or .gz of them), directories or globs; or the name of a known corpus "
        f"({', '.join(NAMED_CORPORA)})",
        nargs="*",
        positional=True,
    )
    hf_dataset: str | None = _flag(
        None, "stream a Hugging Face dataset instead, e.g. HuggingFaceFW/fineweb-edu", metavar="NAME"
    )
    hf_config: str | None = _flag(None, "dataset configuration, e.g. sample-10BT", metavar="CONFIG")
    hf_split: str = _flag("train", "dataset split to read (default: train)", metavar="SPLIT")
    text_field: str = _flag(
        "text", "JSON / dataset field holding each document's text (default: text)", metavar="FIELD"
    )
    out: str | None = _flag(
        None, "output directory (default: data/NAME, NAME from the input's file or directory name)", metavar="DIR"
    )
    tokenizer: str = _flag(
        "gpt2",
        "gpt2 (default), another tiktoken encoding (cl100k_base, ...), or a Hugging Face tokenizer name or path",
        metavar="NAME",
    )
    shard_tokens: int = _flag(DEFAULT_SHARD_TOKENS, "tokens per shard (default: 100M)", type=_count, metavar="N")
    val_tokens: int | None = _flag(
        None,
        "take the first N tokens as the validation split "
        "(default: 10M, or 10%% of the tokens for local input under 1 GB)",
        type=_count,
        metavar="N",
    )
    val_fraction: float | None = _flag(
        None, "take this fraction of all tokens, from the front, as validation", type=float, metavar="F"
    )
    workers: int = _flag(0, "tokenizer processes (default: all cores)", type=int, metavar="N")
    overwrite: bool = _flag(
        False,
        "replace a finished output directory, or one made from other input (an unfinished preparation "
        "of the same input and settings is continued)",
    )
    strict_utf8: bool = _flag(False, "stop at the first byte that is not UTF-8 instead of replacing it")
    command: str = ""  # the command line, recorded in meta.json (not a flag)

    def __post_init__(self) -> None:
        if bool(self.inputs) == bool(self.hf_dataset):
            raise FlagError("give input files, directories or globs, or --hf-dataset NAME (one of the two).")
        if self.shard_tokens < 1:
            raise FlagError("--shard-tokens must be at least 1.")
        if self.workers < 0:
            raise FlagError("--workers must be 0 (all cores) or more.")
        if Path(self.tokenizer).is_dir():  # a local tokenizer: meta.json must find it from anywhere
            self.tokenizer = str(Path(self.tokenizer).resolve())
        if self.val_tokens is not None and self.val_fraction is not None:
            raise FlagError("give --val-tokens or --val-fraction, not both.")
        if self.val_tokens is not None and self.val_tokens < 0:
            raise FlagError("--val-tokens must be 0 or more.")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise FlagError("--val-fraction must be in [0, 1).")


def _default_out(cfg: PrepareConfig) -> Path:
    """data/NAME, NAME from the dataset, the file's stem, the directory, or a glob's fixed directory."""
    if cfg.hf_dataset:
        return Path("data") / "-".join(filter(None, [cfg.hf_dataset.rstrip("/").split("/")[-1], cfg.hf_config]))
    if len(cfg.inputs) > 1:
        raise FlagError("several inputs: say where the shards go with --out DIR.")
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


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- the whole job ----


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
        done, progress = _claim_output_dir(out, request, cfg.overwrite)
        if done:
            _say(f"{out} is already prepared from this input; nothing to do (--overwrite redoes it).")
            _say(_where_lines(out))
            return out
        if named:
            files = [fetch_named_corpus(named, out)]
        meta = _run(cfg, out, request, files, progress)
    _say(_summary(meta, out, time.perf_counter() - start))
    return out


def _run(cfg: PrepareConfig, out: Path, request: dict, files: list[Path], progress: dict | None) -> dict:
    """Tokenize into `out` (continuing after `progress` where given) and write meta.json; return it."""
    tokenizer = get_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    first = [0, 0, 1] if files else {"examples": 0, "state": None}
    resume = progress["resume"] if progress else {"position": first, "tokens": 0, "stats": {}}
    if progress:
        _say(f"continuing the interrupted preparation in {out}: {progress['tokens']:,} tokens are on disk already")
    marker = _Marker(out, request, resume)
    val = request["settings"]["val"]
    if "tokens" in val:
        done = progress["shards"] if progress else None
        sink = ShardWriter(out, dtype, cfg.shard_tokens, val["tokens"], done, marker.on_disk)
    else:
        sink = _Stage(out / STAGE_NAME, dtype, cfg.shard_tokens, progress["tokens"] if progress else 0, marker.on_disk)
    stats = Stats(**resume["stats"])
    try:
        _tokenize(cfg, files, tokenizer, dtype, resume, progress["tokens"] if progress else 0, stats, sink, marker)
        if stats.documents == 0:
            raise InputError(_empty_input_message(cfg, stats, files))
        if "tokens" in val:
            shards = sink.close()
        else:
            staged = sink.tokens()
            shards = _shards_from_stage(out, staged, cfg.shard_tokens, int(len(staged) * val["fraction"]))
    except BaseException as e:
        sink.abort()
        if isinstance(e, OSError):
            raise DataPrepError(_write_failed_message(out, e)) from e
        raise
    if not shards["train"]:
        total = sum(x["tokens"] for x in shards["val"])
        raise DataPrepError(
            f"the input gave only {total:,} tokens, all of them taken for validation; nothing is left to train on.\n"
            "HINT: lower --val-tokens or --val-fraction, or add input."
        )
    return finish_dataset(
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


def _tokenize(
    cfg: PrepareConfig,
    files: list[Path],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    resume: dict,
    on_disk: int,
    stats: Stats,
    sink: ShardWriter | _Stage,
    marker: _Marker,
) -> None:
    """Read, tokenize and write the input from `resume`'s position on; the first tokens, up
    to `on_disk`, are on disk already and are dropped."""
    position, tokens = resume["position"], resume["tokens"]
    if position == "end":
        tasks: Iterable[_Task] = []
    elif files:
        tasks = _file_tasks(files, position)
    else:
        tasks = _dataset_tasks(cfg, position)
    encoder = _Encoder(tokenizer, dtype, cfg.text_field, cfg.strict_utf8)
    workers = cfg.workers or _cores()
    with _worker_pool(encoder, workers) as pool, _progress_bar(files, position) as bar:
        started = bool(files) and position != "end" and position[1] > 0  # mid-way into a text file
        assembler = _Assembler(encoder.eot, stats, started, lambda message: bar.write(message, file=sys.stderr))
        for task, result in _results(tasks, encoder, pool, workers):
            for part in assembler.add(task, result):
                tokens += len(part)
                drop = max(0, min(len(part), on_disk - tokens + len(part)))
                if drop < len(part):
                    sink.write(part[drop:])
            if assembler.resumable:
                marker.note(task.end, tokens, stats)
            bar.update(task.read - bar.n)
            bar.set_postfix_str(f"{tokens / 1e6:,.1f}M tokens", refresh=False)
    marker.note("end", tokens, stats)


@contextmanager
def _progress_bar(files: list[Path], position: Any) -> Iterator[Any]:
    """Input read so far, with a percentage and time left where the input's size is known; on a
    terminal only (elsewhere, a stand-in that prints the warnings and draws nothing)."""
    if not sys.stderr.isatty():
        yield _NoBar()
        return
    from tqdm import tqdm

    if files:
        index = len(files) if position == "end" else position[0]
        done = sum(p.stat().st_size for p in files[:index])
        total = sum(p.stat().st_size for p in files)
        kwargs = {"total": total, "initial": done, "unit": "B", "unit_scale": True}
    else:
        kwargs = {"initial": 0 if position == "end" else position["examples"], "unit": " examples"}
    with tqdm(desc="tokenizing", disable=None, file=sys.stderr, **kwargs) as bar:
        yield bar


class _NoBar:
    n = 0

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def write(self, text: str, file: Any = None) -> None:
        print(text, file=file or sys.stdout)


def _empty_input_message(cfg: PrepareConfig, stats: Stats, files: list[Path]) -> str:
    what = cfg.hf_dataset or " ".join(cfg.inputs)
    found = (
        f"only {stats.empty_documents:,} empty or whitespace-only document(s)"
        if stats.empty_documents
        else "no documents"
    )
    hint = "give input with text"
    if cfg.hf_dataset or any(p.name.endswith((".jsonl", ".jsonl.gz")) for p in files):
        hint += f", and check that --text-field ({cfg.text_field}) names the field that holds it"
    return f"the input is empty: {what} holds {found}, no text to tokenize.\nHINT: {hint}."


def _write_failed_message(out: Path, e: OSError) -> str:
    kept = [p.name for p in _our_files(out) if p.name.endswith(".npy") or p.name == STAGE_NAME]
    return (
        f"could not write to {out}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "") + ".\n"
        f"HINT: make room (or fix the permissions) and run the same command again: it keeps the {len(kept)} "
        f"file(s) already complete in {out} and continues after them; deleting {out} frees their space."
    )


def _say(text: str) -> None:
    """Print the report on stdout. The shards are what this command makes, the report only
    describes them: when its reader goes away (`| head -1`), the report stops quietly, as a Unix
    tool's output does, and the preparation goes on to finish."""
    try:
        print(text)
    except BrokenPipeError:
        discard_output()


def _where_lines(out: Path) -> str:
    return f"shards: {out}{os.sep}\ntrain on them: python train.py --data {shlex.quote(str(out))}"


def _summary(meta: dict, out: Path, seconds: float) -> str:
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
    return line + "\n" + _where_lines(out)


# ---- named corpora ----


def fetch_named_corpus(name: str, out: Path) -> Path:
    """The cached raw text of a named corpus, downloaded first if needed (never left half-written);
    `out`, where it is to be prepared, goes in the hint for preparing it from a copy."""
    from files import sha256_file

    corpus = NAMED_CORPORA[name]
    dest = cache_dir(name) / corpus.filename
    if dest.is_file() and sha256_file(dest) == corpus.sha256:
        return dest
    hint = (
        f"with no network, fetch that file elsewhere and run\n  python prepare_data.py path/to/{corpus.filename} "
        f"--out {shlex.quote(str(out))}\nor place it at {dest}"
    )
    try:
        return download(corpus.url, dest, check=sha256_check(corpus.sha256), hint=hint)
    except DownloadError as e:
        raise DataPrepError(f"could not download {name}: {str(e).removeprefix('could not download ')}") from e


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokenize text into uint16/uint32 .npy shards plus meta.json for dataloader.py.",
        epilog="Token counts take suffixes: 100M, 1.5B, 10k. The end-of-text token goes before every document. "
        "The shards are byte-identical for any --workers. Run the same command again after an interruption "
        "to continue where it stopped.",
    )
    for f in dataclasses.fields(PrepareConfig):
        if not f.metadata:
            continue  # set by the program, not a flag
        kwargs = dict(f.metadata)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if kwargs.pop("positional", False):
            p.add_argument(f.name, default=default, **kwargs)
        elif isinstance(default, bool):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", **kwargs)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), default=default, **kwargs)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(PrepareConfig) if f.metadata}
    named = args.inputs[0] if len(args.inputs) == 1 and args.inputs[0] in NAMED_CORPORA else None
    if named and Path(named).exists():
        named = None  # a real file or directory of that name wins
    try:
        cfg = PrepareConfig(**flags, command=shlex.join(["python", "prepare_data.py", *argv]))
        prepare(cfg, named=named)
    except (FlagError, InputError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataPrepError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # a line printed by other code than _say (a download's): it stopped the run
        discard_output()
        print("interrupted: stdout was closed; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        _flush_report()
    # 0 even when the report lost its reader: the shards and meta.json are complete, and they,
    # not the lines on stdout, are what this command is run for.
    return 0


def _flush_report() -> None:
    """Flush stdout now, while a reader gone away can still be handled, not at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        discard_output()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # (main itself lets it through, as Python code calling it expects)
        print("\ninterrupted: run the same command again to continue after the last shard written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
