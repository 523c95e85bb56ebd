"""Benchmark the data pipeline; prints figures, asserts nothing.

    python -m bench.data                       # the Gutenberg corpus under ../shared/data, and it as one file
    python -m bench.data --corpus books/ --repeat 5

1. `python prepare_data.py INPUT` as a new process, end to end (interpreter, imports,
   tokenizer, reading, tokenizing, writing the shards and meta.json), against tiktoken alone
   on the same text already in memory, on all cores: in worker processes (a fork Pool started
   before the timing, the tokens sent back as uint16 arrays: what a user would write by hand)
   and on threads of this process (its first round is the first use of the tokenizer here).
   The text goes to tiktoken in pieces of about 1 MB cut at line ends, so that one large file
   spreads over the cores too. Inputs: the corpus directory, and all its text as one large
   file. Every round runs each measurement once, in turn, so that load from other processes
   hits all of them alike; the best of `--repeat` rounds is compared, and every round printed.
2. `--fresh-threads N`: tiktoken on threads in N new processes (the tokenizer loaded, the text
   read, then timed), and in N more whose main thread encodes a few characters first.
3. ShardedDataLoader.next_batch for B=64, T=1024 on the shards written.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import prepare_data
from dataloader import ShardedDataLoader
from runtime import EXIT_ERROR, EXIT_OK
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "gutenberg"
PIECE_CHARS = 1 << 20
_ENCODING = None  # the tiktoken Encoding, inherited by the forked Pool workers


def _encode(text: str) -> np.ndarray:
    return _ENCODING.encode_to_numpy(text, disallowed_special=()).astype(np.uint16)


def pieces_of(texts: list[str]) -> list[str]:
    """The texts in pieces of about PIECE_CHARS, cut after a line end."""
    pieces = []
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + PIECE_CHARS) + 1 or len(text)
            pieces.append(text[start:end])
            start = end
    return pieces


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (all threads)."""
    return sum(
        r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def _pool_cpu_seconds(pool: Any) -> float:
    """CPU seconds of this process and of a Pool's worker processes (Linux: from /proc)."""
    ticks = sum(
        sum(map(int, Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])) for p in pool._pool
    )
    return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


def tiktoken_processes(pool: Any, pieces: list[str]) -> tuple[float, int, float]:
    """Wall seconds of a running fork Pool encoding the pieces; the token count; CPU seconds."""
    start, cpu = time.perf_counter(), _pool_cpu_seconds(pool)
    tokens = sum(len(a) for a in pool.imap(_encode, pieces))
    return time.perf_counter() - start, tokens, _pool_cpu_seconds(pool) - cpu


def tiktoken_threads(pieces: list[str], workers: int) -> tuple[float, int, float]:
    start, cpu = time.perf_counter(), _cpu_seconds()
    with ThreadPoolExecutor(workers) as pool:
        tokens = sum(len(a) for a in pool.map(_encode, pieces))
    return time.perf_counter() - start, tokens, _cpu_seconds() - cpu


class PrepareFailed(RuntimeError):
    """prepare_data.py, run as the user would, stopped on the corpus."""


def prepare_data_cli(source: Path, out: Path, workers: int) -> tuple[float, int, float]:
    """Wall seconds of `python prepare_data.py` as a new process, its token count and CPU seconds."""
    command = [sys.executable, str(ROOT / "prepare_data.py"), str(source), "--out", str(out), "--overwrite"]
    start, cpu = time.perf_counter(), _cpu_seconds()
    done = subprocess.run([*command, "--workers", str(workers)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:  # its own message says why; the benchmark has nothing to time
        raise PrepareFailed(f"python prepare_data.py {source} failed:\n{done.stderr.strip()}")
    seconds = time.perf_counter() - start
    meta = json.loads((out / "meta.json").read_text())
    tokens = sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
    return seconds, tokens, _cpu_seconds() - cpu


FRESH_THREADS = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tokenizer import get_tokenizer
enc = get_tokenizer("gpt2").backend
if sys.argv[3] == "main-first":
    enc.encode_ordinary("a few words")
pieces = []
for text in [p.read_bytes().decode("utf-8", "replace") for p in map(Path, sys.argv[4:])]:
    start = 0
    while start < len(text):  # as pieces_of
        end = text.find("\\n", start + (1 << 20)) + 1 or len(text)
        pieces.append(text[start:end])
        start = end
start, cpu = time.perf_counter(), time.process_time()
with ThreadPoolExecutor(int(sys.argv[2])) as pool:
    tokens = sum(len(a) for a in pool.map(lambda t: enc.encode_to_numpy(t, disallowed_special=()), pieces))
print(tokens, time.perf_counter() - start, time.process_time() - cpu)
"""


def fresh_threads(files: list[Path], workers: int, runs: int) -> None:
    """tiktoken on threads, each run in a new process: cold, or after the main thread used it once."""
    print(f"tiktoken on {workers} threads in a new process (tokenizer loaded and text read first):")
    for how in ["cold", "main-first"] * runs:
        command = [sys.executable, "-c", FRESH_THREADS, str(ROOT), str(workers), how, *map(str, files)]
        tokens, wall, cpu = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
        print(
            f"  {how:10s} {int(tokens) / float(wall) / 1e6:5.2f} M tokens/s ({float(wall):.2f} s wall, "
            f"{float(cpu):.2f} s CPU: {int(tokens) / float(cpu) / 1e6:.2f} M tokens per CPU second)"
        )


def compare(name: str, source: Path, texts: list[str], workers: int, repeat: int, out: Path) -> None:
    pieces = pieces_of(texts)
    rounds = []
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # started before any timing
        for _ in range(repeat):  # each measurement once per round, in turn
            procs, threads = tiktoken_processes(pool, pieces), tiktoken_threads(pieces, workers)
            rounds.append((procs, threads, prepare_data_cli(source, out, workers)))
    tokens = rounds[0][0][1]
    best = [min(r[i][0] for r in rounds) for i in range(3)]
    ours = rounds[0][2][1]
    print(f"{name}: {source} ({sum(map(len, texts)) / 1e6:.1f} M characters, {ours:,} tokens), {workers} workers")
    print(f"  best of {repeat}, wall clock:")
    print(f"    tiktoken alone, {workers} worker processes, text in memory: {tokens / best[0] / 1e6:5.2f} M tokens/s")
    print(f"    tiktoken alone, {workers} threads, text in memory:          {tokens / best[1] / 1e6:5.2f} M tokens/s")
    print(
        f"    python prepare_data.py, a new process, end to end:     {ours / best[2] / 1e6:5.2f} M tokens/s "
        f"({best[2]:.2f} s) = {(ours / best[2]) / (tokens / best[0]):.0%} of the worker processes"
    )
    for i, (procs, threads, cli) in enumerate(rounds):
        print(
            f"    round {i}, wall (CPU) seconds: processes {procs[0]:.2f} ({procs[2]:.2f}), "
            f"threads {threads[0]:.2f} ({threads[2]:.2f}), prepare_data.py {cli[0]:.2f} ({cli[2]:.2f})"
        )


def bench_loader(data_dir: Path, batch_size: int, seq_len: int, steps: int, shuffle: bool) -> list[float]:
    loader = ShardedDataLoader(data_dir, "train", batch_size, seq_len, shuffle=shuffle)
    for _ in range(10):  # warm the page cache and the allocator
        loader.next_batch()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loader.next_batch()
        times.append(time.perf_counter() - start)
    return times


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[Path]]:
    """The flags, checked, and the corpus's text files."""
    p = argparse.ArgumentParser(
        prog="python -m bench.data",
        description="Time prepare_data.py against tiktoken alone, and the loader's next_batch.",
    )
    p.add_argument(
        "--corpus",
        default=str(DEFAULT_CORPUS),
        help="a directory of .txt files (default: %(default)s, the Gutenberg corpus beside this repository)",
    )
    p.add_argument("--workers", type=int, default=0, help="processes and threads for all (default: all cores)")
    p.add_argument("--repeat", type=int, default=5, help="rounds of the three measurements (default: 5)")
    p.add_argument("--fresh-threads", type=int, default=0, metavar="N", help="also N new-process thread runs")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch size B (default: 64)")
    p.add_argument("--seq-len", type=int, default=1024, help="loader sequence length T (default: 1024)")
    p.add_argument("--steps", type=int, default=500, help="timed next_batch calls (default: 500)")
    args = p.parse_args(argv)
    if min(args.repeat, args.batch_size, args.seq_len, args.steps) < 1 or min(args.workers, args.fresh_threads) < 0:
        p.error("--repeat, --batch-size, --seq-len and --steps must be >= 1, --workers and --fresh-threads >= 0")
    if not Path(args.corpus).exists():
        which = "the default --corpus" if args.corpus == str(DEFAULT_CORPUS) else "--corpus"
        p.error(f"no corpus at {args.corpus} ({which}). HINT: pass --corpus DIR, a folder of .txt files")
    try:
        return args, prepare_data.expand_inputs([args.corpus])
    except prepare_data.DataPrepError as e:
        p.error(f"--corpus {args.corpus}: {e}")


def main(argv: list[str] | None = None) -> int:
    args, files = parse_args(argv)
    try:
        run(args, files)
    except PrepareFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def run(args: argparse.Namespace, files: list[Path]) -> None:
    global _ENCODING
    workers = args.workers or prepare_data._cores()
    _ENCODING = get_tokenizer("gpt2").backend
    texts = [f.read_bytes().decode("utf-8", "replace") for f in files]  # as prepare_data reads them
    with tempfile.TemporaryDirectory() as tmp:
        large = Path(tmp, "large.txt")
        with open(large, "wb") as f:
            for path in files:
                f.write(path.read_bytes())
        out = Path(tmp, "shards")
        compare("the corpus", Path(args.corpus), texts, workers, args.repeat, out)
        compare("one large file", large, [large.read_bytes().decode("utf-8", "replace")], workers, args.repeat, out)
        if args.fresh_threads:
            fresh_threads(files, workers, args.fresh_threads)
        for shuffle in (False, True):
            times = bench_loader(out, args.batch_size, args.seq_len, args.steps, shuffle)
            print(
                f"next_batch B={args.batch_size} T={args.seq_len} shuffle={shuffle}: "
                f"median {statistics.median(times) * 1e3:.3f} ms, mean {statistics.fmean(times) * 1e3:.3f} ms, "
                f"max {max(times) * 1e3:.3f} ms over {args.steps} calls"
            )


if __name__ == "__main__":
    sys.exit(main())
