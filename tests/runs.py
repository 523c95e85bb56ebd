"""Helpers for tests that run processes: train.py as a subprocess or under torchrun, and
functions in a group of gloo processes."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT

# A model and batch small enough for a step to take milliseconds on a CPU.
TINY = (
    "--model tiny --n-layer 2 --n-embd 64 --n-head 2 --seq-len 32 --batch-size 4 --device cpu --no-compile "
    "--eval-tokens 512 --sample-tokens 4 --num-samples 1 --warmup-steps 2 --lr 3e-3"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(args: list[str], nproc: int = 1, max_restarts: int = 0) -> list[str]:
    if nproc == 1 and not max_restarts:
        return [sys.executable, str(ROOT / "train.py"), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        str(ROOT / "train.py"),
        *args,
    ]


def run_train(
    args: list[str], nproc: int = 1, env: dict | None = None, max_restarts: int = 0, timeout: float = 300
) -> subprocess.CompletedProcess:
    # Several processes on a small machine: one thread each. A single process keeps torch's
    # default, like the in-process runs it is compared with bit for bit (the thread count
    # changes the order of float reductions).
    threads = {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}
    full_env = {**os.environ, **threads, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        train_command(args, nproc, max_restarts),
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_with_stdout_closed(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root, its stdout a pipe whose reader has already gone
    (as behind `| head -0`): its first write to stdout fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=timeout
        )
    finally:
        os.close(write_end)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; fails if a step appears twice."""
    losses = {}
    for record in read_metrics(run_dir):
        if record["type"] == "train":
            assert record["step"] not in losses, f"step {record['step']} logged twice"
            losses[record["step"]] = record["loss"]
    return losses


# ---- a group of gloo processes ----


def spawn_gloo(fn: Callable, nprocs: int, tmp_path: Path, *args) -> None:
    """Run fn(rank, world_size, *args) in nprocs processes joined in a gloo process group (one
    CPU thread each); raises if any of them fails. fn must be a module-level function (it is
    pickled by name into the new processes)."""
    import torch.multiprocessing as mp

    store = tmp_path / "gloo_store"  # a file rendezvous: no port to pick, nothing left listening
    mp.spawn(_gloo_worker, args=(fn, nprocs, str(store), args), nprocs=nprocs)


def _gloo_worker(rank: int, fn: Callable, world_size: int, store: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several processes on a small CPU
    timeout = datetime.timedelta(seconds=120)  # a rank left waiting fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timeout)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears down its connections while another may still use them
    finally:
        dist.destroy_process_group()


def worker_pids(parent_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (children of the torchrun process)."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent_pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            workers[rank] = int(stat.parent.name)
    return workers
