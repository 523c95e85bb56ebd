"""launch/*.sbatch without Slurm: what the scripts refuse and how they report a launch that
fails, with stand-in torchrun / srun / scontrol commands. (tests/test_slurm.py runs them
under a real Slurm.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runs import ROOT

SCRIPTS = ["launch/single_node.sbatch", "launch/multi_node.sbatch"]


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def run_script(script: str, tmp_path: Path, *args: str, commands: dict[str, str]) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in commands.items():
        stub(bin_dir, name, body)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "t",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "RUN_DIR": str(tmp_path / "run"),
        "DEVICE": "cpu",
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    return subprocess.run(
        ["bash", str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


CLUSTER = {"scontrol": 'echo "${@: -1}"'}  # `scontrol show hostnames LIST` prints the list


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_launcher_that_is_not_found_is_a_failure_not_a_finished_run(script, tmp_path):
    # exit 127 is what bash gives for a command it cannot find
    commands = {**CLUSTER, "torchrun": "exit 127", "srun": "exit 127"}
    out = run_script(script, tmp_path, "--model", "tiny", commands=commands)
    assert out.returncode == 127, out.stdout + out.stderr
    assert "training failed" in out.stderr and "training finished" not in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_torchrun_on_path_the_script_stops_at_once(script, tmp_path):
    out = run_script(script, tmp_path, "--model", "tiny", commands=CLUSTER)
    assert out.returncode == 2 and "torchrun is not on PATH" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", [["--out", "mine"], ["--resume=never"]])
def test_an_out_or_resume_of_ones_own_is_refused(script, flag, tmp_path):
    started = tmp_path / "started"
    commands = {**CLUSTER, "torchrun": f"touch {started}", "srun": f"touch {started}"}
    out = run_script(script, tmp_path, "--model", "tiny", *flag, commands=commands)
    assert out.returncode == 2 and "is set by this script" in out.stderr and "RUN_DIR" in out.stderr
    assert not started.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_launch_that_succeeds_reports_training_finished(script, tmp_path):
    commands = {**CLUSTER, "torchrun": "exit 0", "srun": "exit 0"}
    out = run_script(script, tmp_path, "--model", "tiny", commands=commands)
    assert out.returncode == 0 and "launch: training finished" in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_flags_reach_train_py_unchanged(script, tmp_path):
    seen = tmp_path / "argv"
    commands = {**CLUSTER, "torchrun": f'echo "$@" > {seen}', "srun": f'echo "$@" > {seen}'}
    out = run_script(script, tmp_path, "--model", "gpt2-xl", "--fsdp", "--fsdp-grad-sync", "step", commands=commands)
    assert out.returncode == 0, out.stdout + out.stderr
    assert seen.read_text().split()[-5:] == ["--model", "gpt2-xl", "--fsdp", "--fsdp-grad-sync", "step"]
