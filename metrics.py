"""The run's record: RUN/metrics.jsonl, one JSON object per event (the run's settings, each
step, each evaluation), and the same numbers sent to Weights & Biases when asked."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from config import TrainConfig
from files import write_text_atomic
from runtime import Dist


class MetricsLog:
    """RUN/metrics.jsonl, one JSON object per event, written by rank 0, and the W&B run when
    --wandb is set. A context manager, so both are closed however the loop ends."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, d: Dist):
        self.path, self.enabled = out_dir / "metrics.jsonl", d.master
        self.wandb_project = cfg.wandb if d.master else ""
        self.run_config = dataclasses.asdict(cfg)
        self.file, self.wandb_run, self.pending = None, None, []

    def __enter__(self) -> MetricsLog:
        if self.enabled:
            write_text_atomic(self.path.parent / "config.json", json.dumps(self.run_config, indent=2))
            self.file = open(self.path, "a")
        if self.wandb_project:
            import wandb

            # an id of the run directory's own, kept there: a resumed run logs on to the same W&B run
            id_file = self.path.parent / "wandb_run_id"
            if not id_file.is_file():
                write_text_atomic(id_file, f"{self.path.parent.resolve().name}-{os.urandom(4).hex()}\n")
            run_id = id_file.read_text().strip()
            self.wandb_run = wandb.init(project=self.wandb_project, config=self.run_config, resume="allow", id=run_id)
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            with contextlib.suppress(OSError):  # a full disk: the run's outcome matters more than its last lines
                self.file.write("".join(self.pending))
                self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def begin(self, start_step: int, resumed: bool, run_record: dict, changes: tuple[list[str], list[str]]) -> None:
        """The run's first records: what it runs on, and the flags changed since the run it resumes."""
        if start_step < self.run_config["max_steps"]:  # (a finished run keeps its record, final evaluation too)
            self.truncate_from(start_step)
        self.log({**run_record, "resumed_from_step": start_step if resumed else None})
        if changes[0] or changes[1]:
            if self.enabled:
                print("resuming with changed flags:\n  " + "\n  ".join(changes[0] + changes[1]), flush=True)
            self.log({"type": "config_change", "step": start_step, "training": changes[0], "other": changes[1]})

    def _records(self) -> Iterator[tuple[str, dict]]:
        """(line, record) for each whole record in the file; a line cut short by a crash is skipped."""
        for line in self.path.read_text().splitlines():
            if (record := parse_record(line)) is not None:
                yield line, record

    def truncate_from(self, step: int) -> None:
        """Drop events of steps >= step: they were logged after the checkpoint we resume from. A
        last line cut short by a crash goes too; any other line that is not a record is not ours
        to judge, and stays where it is, with a warning."""
        if not self.enabled or not self.path.exists():
            return
        self.file.close()
        lines = self.path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            record = parse_record(line)
            if record is None:
                if number < len(lines):  # (the last line is the one a crash cuts short)
                    print(f"WARNING: {self.path}:{number} is not a JSON record; left as it is", flush=True)
                    kept.append(line)
            elif record.get("step") is None or record["step"] < step:
                kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))
        self.file = open(self.path, "a")

    def logged_types(self, step: int) -> set[str]:
        """The types of the events logged at `step` ("eval", "hellaswag", ...); empty off rank 0."""
        if not self.enabled or not self.path.exists():
            return set()
        return {record.get("type") for _, record in self._records() if record.get("step") == step}

    def log(self, record: dict) -> None:
        """Append a record. A write that fails (a full disk) does not stop the run: the records
        wait in memory, and go to the file, in order, at the first write that succeeds."""
        if not self.enabled:
            return
        self.pending.append(json.dumps(record) + "\n")
        try:
            self.file.write("".join(self.pending))
            self.file.flush()
            self.pending.clear()
        except OSError as e:
            if len(self.pending) == 1:  # the first failure since the last good write
                print(f"warning: could not write {self.path} ({e.strerror}); training goes on, and the records "
                      "are kept in memory until it can be written. HINT: free some disk space.", flush=True)  # fmt: skip
            with contextlib.suppress(OSError):
                self._reopen()
        if self.wandb_run is not None and "step" in record:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def _reopen(self) -> None:
        """Drop whatever part of the failed write reached the file, so that the retry appends
        whole lines only."""
        try:
            self.file.close()
        except OSError:
            pass
        with open(self.path, "rb+") as f:
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
        self.file = open(self.path, "a")


def parse_record(line: str) -> dict | None:
    """The record on a line of metrics.jsonl, or None where the line holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def run_metadata(cfg: TrainConfig, d: Dist, device: torch.device) -> dict:
    try:
        git = ["git", "rev-parse", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent).stdout
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "type": "run",
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": commit.strip() or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "world_size": d.world_size,
        "config": dataclasses.asdict(cfg),
    }
