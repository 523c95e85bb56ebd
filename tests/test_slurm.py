"""launch/*.sbatch under a real Slurm, in CPU mode: one node, two gloo processes.

Each script trains a tiny model to its last step, and each is preempted the way a time
limit would do it (USR1 to the batch script), then must checkpoint, requeue itself, resume
and end with the losses of an uninterrupted run. `tests/slurm_setup.sh` starts a one-node
Slurm on localhost; where no Slurm answers, these tests skip.

    sudo bash tests/slurm_setup.sh && python -m pytest -m slurm
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT
from runs import train_losses

pytestmark = pytest.mark.slurm

NPROC = 2
STEPS = 30
TRAIN_FLAGS = (
    "--model tiny --seq-len 64 --batch-size 4 --eval-every 0 --checkpoint-every 0 "
    f"--sample-tokens 4 --num-samples 1 --seed 1 --no-compile --max-steps {STEPS}"
).split()
FINAL_STATES = set("COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY BOOT_FAIL DEADLINE PREEMPTED".split())
SETUP_HINT = "`sudo bash tests/slurm_setup.sh` starts a one-node cluster on localhost"


@dataclass
class Job:
    id: str
    log: Path
    run_dir: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log yet)"


# ---- Slurm ----


@pytest.fixture(scope="module")
def slurm() -> None:
    """Skips, saying why, unless a Slurm controller answers and has a node with room for the jobs."""
    missing = [tool for tool in ("sinfo", "sbatch", "scontrol", "scancel") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}); {SETUP_HINT}")
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%N %t %c"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"sinfo did not answer within 30 s; {SETUP_HINT}")
    if out.returncode != 0:
        pytest.skip(f"Slurm is installed but not running (sinfo: {out.stderr.strip()}); {SETUP_HINT}")
    usable = [
        line
        for line in out.stdout.splitlines()
        if line.split()[1].rstrip("*~#$@+") in {"idle", "mix", "alloc", "comp"} and int(line.split()[2]) >= NPROC
    ]
    if not usable:
        pytest.skip(f"no Slurm node is up with {NPROC} CPUs (sinfo: {out.stdout.strip()!r}); {SETUP_HINT}")


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def submit(script: str, tmp_path: Path, data: Path, sbatch_flags: tuple[str, ...] = ()) -> Job:
    """sbatch the script in CPU mode with NPROC processes; the job's environment is ours."""
    job_name = f"test-{Path(script).stem}"
    run_dir, log = tmp_path / "run", tmp_path / f"{job_name}.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(
        DEVICE="cpu",
        NPROC_PER_NODE=str(NPROC),
        RUN_DIR=str(run_dir),
        PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    cmd = [
        *f"sbatch --parsable --time=15 --gpus-per-node=0 --cpus-per-task={NPROC}".split(),
        f"--job-name={job_name}",
        f"--output={log}",
        *sbatch_flags,
        str(ROOT / "launch" / script),
        *["--data", str(data)],
        *TRAIN_FLAGS,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return Job(id=out.stdout.strip().split(";")[0], log=log, run_dir=run_dir)


def wait_until_done(job: Job, timeout: float = 400) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    released = set()
    while time.monotonic() < deadline:
        info = job_info(job.id)
        if info["JobState"] in FINAL_STATES:
            return info
        restarts = info.get("Restarts", "0")
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime" and restarts not in released:
            # Slurm holds a requeued job back for about two minutes; a test need not wait that
            # long, but a few seconds: slurmd refuses to launch it in the same second as it
            # revoked the first attempt's credential ("Job credential revoked").
            subprocess.run(
                ["scontrol", "update", f"JobId={job.id}", "StartTime=now+5"], capture_output=True, timeout=30
            )
            released.add(restarts)
        time.sleep(1)
    subprocess.run(["scancel", job.id], timeout=30)
    pytest.fail(f"job {job.id} did not finish within {timeout:.0f} s; its log:\n{job.log_text()}")


def trained_steps(run_dir: Path) -> int:
    """Training steps logged so far; the trainer may be writing the last line."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = 0
    for line in path.read_text().splitlines():
        try:
            steps += json.loads(line).get("type") == "train"
        except json.JSONDecodeError:
            pass
    return steps


def wait_for_steps(job: Job, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while trained_steps(job.run_dir) < steps:
        assert job_info(job.id)["JobState"] in {"PENDING", "RUNNING"}, f"job ended early:\n{job.log_text()}"
        assert time.monotonic() < deadline, f"fewer than {steps} steps after {timeout:.0f} s:\n{job.log_text()}"
        time.sleep(0.2)


def assert_finished(job: Job, info: dict[str, str]) -> dict[int, float]:
    log = job.log_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"job {job.id}: {info['JobState']}\n{log}"
    assert "launch: training finished" in log, log
    losses = train_losses(job.run_dir)
    assert sorted(losses) == list(range(STEPS)), log
    assert (job.run_dir / "checkpoints" / "latest").read_text().strip().endswith(f"{STEPS:08d}")
    return losses


# ---- tests ----


@pytest.fixture(scope="module")
def uninterrupted(slurm, tiny_data, tmp_path_factory) -> tuple[Job, dict[str, str]]:
    job = submit("single_node.sbatch", tmp_path_factory.mktemp("uninterrupted"), tiny_data)
    return job, wait_until_done(job)


def test_single_node_job_trains_to_the_last_step(uninterrupted):
    job, info = uninterrupted
    losses = assert_finished(job, info)
    assert info["Restarts"] == "0"
    assert all(0 < loss < 20 for loss in losses.values())
    assert losses[STEPS - 1] < losses[0], "the loss should fall over the run"
    assert f"{NPROC} processes on cpu" in job.log_text()


def test_multi_node_job_reproduces_the_single_node_losses(uninterrupted, tiny_data, tmp_path):
    reference, _ = uninterrupted
    job = submit("multi_node.sbatch", tmp_path, tiny_data, ("--nodes=1",))
    info = wait_until_done(job)
    assert assert_finished(job, info) == train_losses(reference.run_dir)
    node = subprocess.run(
        ["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True
    ).stdout.split()[0]
    assert f"rendezvous {node}:" in job.log_text()


@pytest.mark.parametrize("script", ["single_node.sbatch", "multi_node.sbatch"])
def test_usr1_checkpoints_requeues_and_resumes_with_the_uninterrupted_losses(
    script, uninterrupted, tiny_data, tmp_path
):
    reference, _ = uninterrupted
    job = submit(script, tmp_path, tiny_data, ("--nodes=1",))

    # Signal the batch script, as `#SBATCH --signal=B:USR1@...` does before the time limit.
    wait_for_steps(job, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=30)

    info = wait_until_done(job)
    log = job.log_text()
    assert info["Restarts"] == "1", log
    assert "stopped by a signal at step" in log, log
    saved = re.search(r"latest checkpoint: step_(\d+); requeueing job", log)
    assert saved and 3 <= int(saved.group(1)) < STEPS, f"no checkpoint from the stop:\n{log}"
    assert "(restart 1)" in log, log
    assert assert_finished(job, info) == train_losses(reference.run_dir)


@pytest.mark.parametrize("script", ["single_node.sbatch", "multi_node.sbatch"])
def test_scancel_saves_a_checkpoint_and_a_new_job_with_the_run_dir_goes_on(script, uninterrupted, tiny_data, tmp_path):
    reference, _ = uninterrupted
    job = submit(script, tmp_path, tiny_data, ("--nodes=1",))
    wait_for_steps(job, 3)
    subprocess.run(["scancel", job.id], check=True, timeout=30)

    info = wait_until_done(job)
    log = job.log_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    assert "stopped by a signal at step" in log and "requeueing" not in log, log
    assert f"to go on, submit again with RUN_DIR={job.run_dir}" in log, log
    stopped_at = int((job.run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    assert 3 <= stopped_at < STEPS, log

    # A new job (new id) given the same RUN_DIR resumes the run.
    again = submit(script, tmp_path, tiny_data, ("--nodes=1",))
    assert again.id != job.id and again.run_dir == job.run_dir
    info = wait_until_done(again)
    assert f"resumed from {job.run_dir / 'checkpoints'}" in again.log_text()
    assert assert_finished(again, info) == train_losses(reference.run_dir)
