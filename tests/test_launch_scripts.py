"""launch/*.sbatch without Slurm: what the scripts refuse, how they report a launch that
fails, and how they pass a stop signal on and requeue, with stand-in torchrun / srun /
scontrol commands. (tests/test_slurm.py runs them under a real Slurm.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = ["launch/single_node.sbatch", "launch/multi_node.sbatch"]


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def script_env(tmp_path: Path, commands: dict[str, str]) -> dict[str, str]:
    """The environment of a batch job on one node, with stand-ins for the commands named."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in commands.items():
        stub(bin_dir, name, body)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "t",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "RUN_DIR": str(tmp_path / "run"),
        "DEVICE": "cpu",
        "HOME": os.environ.get("HOME", "/tmp"),
    }


def run_script(
    script: str, tmp_path: Path, *args: str, commands: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / script), *args],
        cwd=cwd,
        env=script_env(tmp_path, commands),
        capture_output=True,
        text=True,
        timeout=60,
    )


CLUSTER = {"scontrol": 'echo "${@: -1}"'}  # `scontrol show hostnames LIST` prints the list


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_launcher_that_is_not_found_is_a_failure_not_a_finished_run(script, tmp_path):
    # exit 127 is what bash gives for a command it cannot find
    commands = {**CLUSTER, "torchrun": "exit 127", "srun": "exit 127"}
    out = run_script(script, tmp_path, *"--model tiny".split(), commands=commands)
    assert out.returncode == 127, out.stdout + out.stderr
    assert "training failed" in out.stderr and "training finished" not in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_torchrun_on_path_the_script_stops_at_once(script, tmp_path):
    out = run_script(script, tmp_path, *"--model tiny".split(), commands=CLUSTER)
    assert out.returncode == 2 and "torchrun is not on PATH" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--out mine".split(), ["--resume=never"]])
def test_an_out_or_resume_of_ones_own_is_refused(script, flag, tmp_path):
    started = tmp_path / "started"
    commands = {**CLUSTER, "torchrun": f"touch {started}", "srun": f"touch {started}"}
    out = run_script(script, tmp_path, *"--model tiny".split(), *flag, commands=commands)
    assert out.returncode == 2 and "is set by this script" in out.stderr and "RUN_DIR" in out.stderr
    assert not started.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_launch_that_succeeds_reports_training_finished(script, tmp_path):
    commands = {**CLUSTER, "torchrun": "exit 0", "srun": "exit 0"}
    out = run_script(script, tmp_path, *"--model tiny".split(), commands=commands)
    assert out.returncode == 0 and "launch: training finished" in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_outside_the_project_root_the_script_stops_at_once(script, tmp_path):
    commands = {**CLUSTER, "torchrun": "exit 0", "srun": "exit 0"}
    out = run_script(script, tmp_path, *"--model tiny".split(), commands=commands, cwd=tmp_path)
    assert out.returncode == 2 and "submit from the project root" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_device_is_refused(script, tmp_path):
    commands = {**CLUSTER, "torchrun": "exit 0", "srun": "exit 0"}
    env = {**script_env(tmp_path, commands), "DEVICE": "tpu"}
    out = subprocess.run(["bash", str(ROOT / script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "DEVICE must be cuda or cpu, not 'tpu'" in out.stderr


# ---- stop signals, with a stand-in trainer ----

# The trainer's part: exit 75 on USR1 (as train.py does after its checkpoint), after saying
# where it runs. A Python process, like the trainer: bash cannot trap a signal that was
# ignored when it started, and torchrun starts with USR1 ignored.
WORKER = (
    "import os, signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75)); "
    "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
)


# What scontrol says where a site forbids requeueing
REQUEUE_REFUSED = 'if [[ $1 == requeue ]]; then echo "Requested operation is presently disabled" >&2; exit 1; fi'


def launch_with_worker(script: str, tmp_path: Path, scontrol: str = "") -> tuple[subprocess.Popen, int]:
    """The script running a stand-in trainer: torchrun's workers are its children, and srun
    passes the signals it gets on to its task; scontrol records its calls, then runs `scontrol`.
    Returns the script's process and the worker's pid."""
    ready, calls = tmp_path / "worker.pid", tmp_path / "scontrol_calls"
    worker = f'{sys.executable} -c "{WORKER}" {ready}'
    commands = {
        "scontrol": f'echo "$@" >>{calls}; {scontrol or ":"}; echo "${{@: -1}}"',
        "torchrun": f"{worker} & wait $!; exit 1",  # torchrun reports a worker's failure as exit 1
        "srun": f"trap 'kill -USR1 $child' USR1; {worker} & child=$!; wait $child; wait $child",
    }
    proc = subprocess.Popen(
        ["bash", str(ROOT / script), *"--model tiny".split()],
        cwd=ROOT,
        env=script_env(tmp_path, commands),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stand-in trainer did not start"
        time.sleep(0.05)
    return proc, int(ready.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_usr1_reaches_the_trainer_and_the_job_is_requeued(script, tmp_path):
    proc, _ = launch_with_worker(script, tmp_path)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` does
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "asking the trainer to save a checkpoint and stop" in out
    assert "latest checkpoint: none; requeueing job 4242 to resume" in out
    assert "requeue 4242" in (tmp_path / "scontrol_calls").read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_refused_requeue_says_how_to_go_on_instead_of_ending_silently(script, tmp_path):
    proc, _ = launch_with_worker(script, tmp_path, scontrol=REQUEUE_REFUSED)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, out + err
    assert "requeue 4242" in (tmp_path / "scontrol_calls").read_text()
    assert "could not requeue job 4242" in err
    assert f"to go on, submit again with RUN_DIR={tmp_path / 'run'} and the same flags" in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_term_waits_for_the_trainer_and_says_how_to_go_on(script, tmp_path):
    proc, worker = launch_with_worker(script, tmp_path)
    # scancel: Slurm sends TERM to every process of the job, the batch script among them
    proc.send_signal(signal.SIGTERM)
    os.kill(worker, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "waiting for the trainer to save" in out
    assert f"to go on, submit again with RUN_DIR={tmp_path / 'run'}" in err
    # a preemption under PreemptMode=REQUEUE sends the same TERM, and Slurm requeues the job itself
    assert "PreemptMode=REQUEUE, Slurm requeues the job itself" in err and "`squeue -j 4242`" in err
    calls = tmp_path / "scontrol_calls"
    assert not calls.exists() or "requeue" not in calls.read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_flags_reach_train_py_unchanged(script, tmp_path):
    seen = tmp_path / "argv"
    commands = {**CLUSTER, "torchrun": f'echo "$@" > {seen}', "srun": f'echo "$@" > {seen}'}
    out = run_script(script, tmp_path, "--model", "gpt2-xl", "--fsdp", "--fsdp-grad-sync", "step", commands=commands)
    assert out.returncode == 0, out.stdout + out.stderr
    assert seen.read_text().split()[-5:] == ["--model", "gpt2-xl", "--fsdp", "--fsdp-grad-sync", "step"]
