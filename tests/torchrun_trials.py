"""Restart trials for `torchrun --max-restarts`: kill one worker (or the agent) of a two-process
CPU run at a random step, and check that the run recovers with the losses of an uninterrupted run.

    python tests/torchrun_trials.py --data DATA --trials 16 --json trials.jsonl

Each trial starts `torchrun --standalone --nproc-per-node=2 --max-restarts=3 train.py ...`, waits
until metrics.jsonl reaches a random step, sends SIGKILL or SIGTERM (chosen at random) to a random
worker and waits for torchrun to exit. It recovered when torchrun exits 0 within --timeout seconds
and every step's loss equals the uninterrupted run's. `--agent` kills torchrun itself instead:
its workers must exit on their own within --agent-grace seconds, and running the same command
again must finish the run with the same losses.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runs import worker_pids  # (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}


def train_flags(data: Path, out: Path, steps: int, every: int) -> list[str]:
    model = "--model tiny --n-layer 2 --n-embd 64 --n-head 2 --seq-len 32 --batch-size 4 --warmup-steps 2 --lr 3e-3"
    run = f"--device cpu --no-compile --eval-every 0 --num-samples 0 --max-steps {steps} --checkpoint-every {every}"
    return [*model.split(), *run.split(), "--data", str(data), "--out", str(out)]


def torchrun_command(flags: list[str], max_restarts: int) -> list[str]:
    """How the README and launch/single_node.sbatch start one node: a standalone rendezvous."""
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return [*head, f"--max-restarts={max_restarts}", str(ROOT / "train.py"), *flags]


def run_env() -> dict[str, str]:
    # one thread per process (two processes on a small machine) and one MKL thread: runs are
    # compared bit for bit, and thread counts change the order of float reductions
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(command, cwd=ROOT, env=run_env(), stdout=f, stderr=subprocess.STDOUT)


def train_losses(run: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice counts as a failure (None)."""
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "train":
            if record["step"] in losses:
                return {}
            losses[record["step"]] = record["loss"]
    return losses


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return max((r["step"] for r in map(json.loads, lines) if r.get("type") == "train"), default=-1)
    except (OSError, ValueError):  # not written yet, or a line half written
        return -1


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if last_step(run) >= step:
            return True
        time.sleep(0.05)
    return False


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def worker_trial(args, rng: random.Random, reference: dict, workdir: Path, number: int) -> dict:
    run = workdir / f"trial{number:02d}"
    step, sig = rng.randint(1, args.steps - 2), rng.choice(args.signals)
    proc = start(torchrun_command(train_flags(args.data, run, args.steps, args.every), 3), workdir / f"{run.name}.log")
    t0 = time.monotonic()
    result = {"trial": number, "signal": sig, "at_step": step}
    if wait_for_step(run, step, proc, args.timeout) and (workers := worker_pids(proc.pid)):
        rank = rng.choice(sorted(workers))
        os.kill(workers[rank], SIGNALS[sig])
        result.update(rank=rank, killed_at_step=last_step(run))
    try:
        result["rc"] = proc.wait(timeout=max(1.0, args.timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        for pid in worker_pids(proc.pid).values():
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        result["rc"] = "timeout"
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["losses_equal"] = (run / "metrics.jsonl").exists() and train_losses(run) == reference
    result["recovered"] = result["rc"] == 0 and result["losses_equal"] and "rank" in result
    return result


def agent_trial(args, rng: random.Random, reference: dict, workdir: Path, number: int) -> dict:
    run = workdir / f"agent{number:02d}"
    step = rng.randint(1, args.steps - 10)  # leaves steps that workers left alone would go on to train
    command = torchrun_command(train_flags(args.data, run, args.steps, args.every), 3)
    proc = start(command, workdir / f"{run.name}.log")
    result = {"trial": number, "signal": "KILL agent", "at_step": step}
    workers = worker_pids(proc.pid) if wait_for_step(run, step, proc, args.timeout) else {}
    proc.kill()
    proc.wait()
    killed_at, t0 = last_step(run), time.monotonic()
    while any(alive(pid) for pid in workers.values()) and time.monotonic() - t0 < args.agent_grace:
        time.sleep(0.05)
    result.update(killed_at_step=killed_at, workers_stopped_s=round(time.monotonic() - t0, 1))
    result["steps_after_agent_died"] = last_step(run) - killed_at
    stopped = bool(workers) and not any(alive(pid) for pid in workers.values())
    result["workers_stopped"] = stopped and last_step(run) < args.steps - 1  # stopped, not finished alone
    for pid in workers.values():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    rerun = start(command, workdir / f"{run.name}.log")
    try:
        result["rc"] = rerun.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        rerun.kill()
        rerun.wait()
        result["rc"] = "timeout"
    result["losses_equal"] = train_losses(run) == reference
    result["recovered"] = result["workers_stopped"] and result["rc"] == 0 and result["losses_equal"]
    return result


def run_trials(args) -> list[dict]:
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="torchrun_trials_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ref = workdir / "reference"
    proc = start(torchrun_command(train_flags(args.data, ref, args.steps, args.every), 0), workdir / "reference.log")
    if proc.wait(timeout=args.timeout) != 0:
        raise SystemExit(f"the uninterrupted run failed; see {workdir / 'reference.log'}")
    reference = train_losses(ref)
    trial = agent_trial if args.agent else worker_trial
    results = []
    for number in range(args.trials):
        results.append(trial(args, rng, reference, workdir, number))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared shards (prepare_data.py --out)")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5, help="--checkpoint-every")
    parser.add_argument("--signals", type=lambda s: s.split(","), default=["KILL", "TERM"], help="KILL,TERM")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a trial may take")
    parser.add_argument("--agent", action="store_true", help="kill torchrun itself, not a worker")
    parser.add_argument("--agent-grace", type=float, default=60, help="seconds the workers get to stop")
    parser.add_argument("--workdir", help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--json", help="append one JSON line per trial to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    results = run_trials(parse_args(argv))
    recovered = sum(r["recovered"] for r in results)
    seconds = sorted(r.get("seconds", r.get("workers_stopped_s", 0)) for r in results)
    median = seconds[len(seconds) // 2]
    print(f"{recovered} of {len(results)} recovered; seconds min {seconds[0]} median {median} max {seconds[-1]}")
    return 0 if recovered == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
