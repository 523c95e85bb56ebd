"""Benchmark the data pipeline; prints figures, asserts nothing.

    python bench_data.py                                  # the Gutenberg corpus under ../shared/data
    python bench_data.py --corpus books/ --repeat 5

1. prepare_data.py end to end (read, tokenize, write shards and meta.json) against tiktoken
   alone on the same text already in memory, on all cores, with no I/O. The two are measured
   alternately in the same run, so load from other processes hits both alike; the best of
   `--repeat` runs of each is compared.
2. ShardedDataLoader.next_batch for B=64, T=1024 on the shards just written.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import prepare_data
from dataloader import ShardedDataLoader
from tokenizer import get_tokenizer


def tiktoken_alone(texts: list[str], workers: int) -> dict[str, float]:
    """Wall and CPU seconds of tiktoken's own batch API, and of its numpy output on a thread pool."""
    enc = get_tokenizer("gpt2").backend
    wall, cpu = time.perf_counter(), time.process_time()
    n = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=workers)))
    result = {"tokens": n, "batch_wall": time.perf_counter() - wall, "batch_cpu": time.process_time() - cpu}
    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as pool:
        n = sum(map(len, pool.map(lambda t: enc.encode_to_numpy(t, disallowed_special=()), texts)))
    return {**result, "numpy_wall": time.perf_counter() - wall, "numpy_cpu": time.process_time() - cpu}


def prepare_in_process(corpus: Path, out: Path, workers: int) -> dict[str, float]:
    """Wall and CPU seconds (all threads) of prepare_data.main on the corpus, tokenizer loading included."""
    wall, cpu = time.perf_counter(), time.process_time()
    rc = prepare_data.main([str(corpus), "--out", str(out), "--workers", str(workers), "--overwrite"])
    if rc != 0:
        raise SystemExit(f"prepare_data.py failed with exit status {rc}")
    return {"ours_wall": time.perf_counter() - wall, "ours_cpu": time.process_time() - cpu}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time prepare_data.py against tiktoken alone, and the loader's next_batch.")
    p.add_argument(
        "--corpus", default="../shared/data/gutenberg", help="a directory of .txt files (default: %(default)s)"
    )
    p.add_argument(
        "--workers", type=int, default=0, help="threads for both tiktoken and prepare_data (default: all cores)"
    )
    p.add_argument("--repeat", type=int, default=3, help="alternating runs of each measurement (default: 3)")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch size B (default: 64)")
    p.add_argument("--seq-len", type=int, default=1024, help="loader sequence length T (default: 1024)")
    p.add_argument("--steps", type=int, default=500, help="timed next_batch calls (default: 500)")
    args = p.parse_args(argv)

    corpus = Path(args.corpus)
    files = prepare_data.expand_inputs([str(corpus)])
    workers = args.workers or prepare_data._cores()
    # The same text prepare_data sees: bytes decoded as UTF-8, line ends untouched.
    texts = [f.read_bytes().decode("utf-8", "replace") for f in files]
    print(
        f"corpus: {corpus} ({len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB), {workers} workers"
    )

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        runs = []
        for _ in range(args.repeat):  # alternate, so that load from other processes hits both alike
            runs.append({**tiktoken_alone(texts, workers), **prepare_in_process(corpus, out, workers)})
        written = sum(np.load(f, mmap_mode="r").shape[0] for f in out.glob("*.npy"))
        best = {key: min(run[key] for run in runs) for key in runs[0] if key != "tokens"}
        tokens, walls = runs[0]["tokens"], [run["ours_wall"] for run in runs]
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("prepare_data.py")), str(corpus), "--out", str(out),
             "--workers", str(workers), "--overwrite"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess_seconds = time.perf_counter() - start

        print(f"tokens written: {written:,} (tiktoken alone: {tokens:,}, plus one end-of-text per document)")
        print(f"wall clock, best of {args.repeat}:")
        print(f"  tiktoken alone, encode_ordinary_batch:      {tokens / best['batch_wall'] / 1e6:5.2f} M tokens/s")
        print(f"  tiktoken alone, encode_to_numpy on threads: {tokens / best['numpy_wall'] / 1e6:5.2f} M tokens/s")
        print(
            f"  prepare_data.main end to end:               {written / best['ours_wall'] / 1e6:5.2f} M tokens/s "
            f"({best['ours_wall']:.2f} s; every run: {', '.join(f'{run_wall:.2f}' for run_wall in walls)} s)"
        )
        print(
            f"  = {best['batch_wall'] / best['ours_wall']:.0%} of encode_ordinary_batch, "
            f"{best['numpy_wall'] / best['ours_wall']:.0%} of encode_to_numpy"
        )
        print(
            f"CPU seconds, all threads, best of {args.repeat} (less sensitive to other load): "
            f"encode_ordinary_batch {best['batch_cpu']:.2f}, encode_to_numpy {best['numpy_cpu']:.2f}, "
            f"prepare_data {best['ours_cpu']:.2f} ({best['ours_cpu'] / best['numpy_cpu'] - 1:+.0%})"
        )
        print(
            f"python prepare_data.py as a new process: {subprocess_seconds:.2f} s wall (interpreter and imports included)"
        )

        for shuffle in (False, True):
            times = bench_loader(out, args.batch_size, args.seq_len, args.steps, shuffle)
            print(
                f"next_batch B={args.batch_size} T={args.seq_len} shuffle={shuffle}: "
                f"median {statistics.median(times) * 1e3:.3f} ms, mean {statistics.fmean(times) * 1e3:.3f} ms, "
                f"max {max(times) * 1e3:.3f} ms over {args.steps} calls"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
