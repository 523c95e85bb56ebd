"""Checkpoints, exact resume and fault tolerance, all on CPU."""

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from runs import ROOT, TINY, read_metrics, run_train, spawn_gloo, train_command, train_losses, worker_pids


def flags(data, run, steps=20, every=10, extra=()):
    args = f"--data {data} --out {run} --max-steps {steps} --eval-every 5 --checkpoint-every {every}"
    return [*TINY, *args.split(), *extra]


@pytest.fixture(scope="module")
def reference_1proc(tiny_data, tmp_path_factory):
    """An uninterrupted 20-step single-process run."""
    run = tmp_path_factory.mktemp("ref1") / "run"
    assert train.main(flags(tiny_data, run)) == 0
    return run


@pytest.fixture(scope="module")
def reference_2proc(tiny_data, tmp_path_factory):
    """An uninterrupted 20-step run of two processes under torchrun."""
    run = tmp_path_factory.mktemp("ref2") / "run"
    result = run_train(flags(tiny_data, run), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def assert_metrics_continue(run, steps):
    records = read_metrics(run)
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(steps))
    assert [r["step"] for r in records if r["type"] == "eval"] == sorted({*range(0, steps, 5), steps})


def test_checkpoint_holds_everything_and_no_wrapper_prefixes(reference_1proc):
    ckpt = checkpoint.find_checkpoint(reference_1proc)
    assert ckpt.step == 20
    names = {p.name for p in ckpt.path.iterdir()}
    assert names == {"model.safetensors", "train_state.pt", "rng_rank00000.pt", "meta.json"}
    meta = ckpt.meta
    assert meta["format_version"] == checkpoint.FORMAT_VERSION and meta["config"]["max_steps"] == 20
    assert meta["tokens_seen"] == 20 * 4 * 32 and meta["model_config"]["n_layer"] == 2
    from safetensors.torch import load_file

    from model import GPT, GPTConfig

    keys = load_file(str(ckpt.path / "model.safetensors")).keys()
    expected = GPT(GPTConfig.from_dict(meta["model_config"])).state_dict().keys() - {"lm_head.weight"}
    assert set(keys) == expected  # the plain module's names, the tied head stored once
    state = checkpoint.load_train_state(ckpt)
    assert {"optimizer", "scaler", "train_loader", "tokens_seen"} <= set(state)
    assert set(checkpoint.load_rng_state(ckpt, 0)) >= {"python", "numpy", "torch"}
    assert (reference_1proc / "checkpoints" / "latest").read_text().strip() == ckpt.path.name


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(tiny_data, tmp_path, reference_1proc):
    run = tmp_path / "run"
    killed = run_train(flags(tiny_data, run), env={"GPT2_TRAINER_TEST_KILL_AFTER_CHECKPOINT": "10"})
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint.find_checkpoint(run).step == 10
    resumed = run_train(flags(tiny_data, run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert train_losses(run) == train_losses(reference_1proc)  # bit for bit
    assert_metrics_continue(run, 20)


def test_two_process_sigkill_resume_is_bit_identical(tiny_data, tmp_path, reference_2proc):
    run = tmp_path / "run"
    killed = run_train(flags(tiny_data, run), nproc=2, env={"GPT2_TRAINER_TEST_KILL_AFTER_CHECKPOINT": "10:0"})
    assert killed.returncode != 0
    assert checkpoint.find_checkpoint(run).step == 10
    assert {p.name for p in checkpoint.find_checkpoint(run).path.glob("rng_rank*")} == {
        "rng_rank00000.pt",
        "rng_rank00001.pt",
    }
    resumed = run_train(flags(tiny_data, run), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(run) == train_losses(reference_2proc)
    assert_metrics_continue(run, 20)


def test_resume_on_other_world_size_keeps_data_order(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    total = ["--total-batch-size", str(4 * 32 * 2)]
    ref = tmp_path / "ref"
    assert train.main(flags(tiny_data, ref, extra=total)) == 0
    killed = run_train(
        flags(tiny_data, run, extra=total), nproc=2, env={"GPT2_TRAINER_TEST_KILL_AFTER_CHECKPOINT": "10:0"}
    )
    assert killed.returncode != 0
    assert train.main(flags(tiny_data, run)) == train.EXIT_CONFIG  # no --total-batch-size: half the batch
    assert "took 256 tokens per step on 2 process(es)" in capsys.readouterr().err
    assert train.main(flags(tiny_data, run, extra=total)) == 0  # one process, twice the accumulation
    one, mixed = train_losses(ref), train_losses(run)
    assert sorted(mixed) == list(range(20))
    for step in one:
        assert mixed[step] == pytest.approx(one[step], abs=1e-4)


def wait_for_step(run, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return
        try:
            if any(r["type"] == "train" and r["step"] >= step for r in read_metrics(run)):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"run did not reach step {step}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_saves_checkpoint_and_exits_75_then_resumes_exactly(tiny_data, tmp_path, reference_1proc, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(flags(tiny_data, run, every=0)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_PREEMPTED, err[-3000:]
    ckpt = checkpoint.find_checkpoint(run)
    assert ckpt is not None and 3 < ckpt.step < 20
    assert "stopped by a signal" in out and "Traceback" not in err
    assert train.main(flags(tiny_data, run, every=0)) == 0
    assert train_losses(run) == train_losses(reference_1proc)


def test_second_ctrl_c_stops_at_once_without_a_traceback(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(train.os, "_exit", exits.append)
    stop = train.StopSignal()
    try:
        signal.raise_signal(signal.SIGINT)  # the first: remembered, the run saves at the step's end
        assert stop.received == signal.SIGINT and exits == []
        signal.raise_signal(signal.SIGINT)  # the second: out at once
        assert exits == [130]
    finally:
        stop.restore()
    out, err = capsys.readouterr()
    assert "saving a checkpoint at the end of this step" in out and "second Ctrl-C" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_signal_to_one_rank_stops_all_ranks_with_a_checkpoint(tiny_data, tmp_path, reference_2proc):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        train_command(flags(tiny_data, run, every=0), nproc=2),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run, 3, proc)
    workers = worker_pids(proc.pid)
    assert set(workers) == {0, 1}
    os.kill(workers[1], signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports a worker that exited with 75 as failed
    assert "stopped by a signal" in out
    ckpt = checkpoint.find_checkpoint(run)
    assert ckpt is not None and 3 < ckpt.step < 20
    assert {p.name for p in ckpt.path.glob("rng_rank*")} == {"rng_rank00000.pt", "rng_rank00001.pt"}
    resumed = run_train(flags(tiny_data, run, every=0), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(run) == train_losses(reference_2proc)


def test_torchrun_restart_after_crash_resumes_from_checkpoint(tiny_data, tmp_path, reference_1proc):
    run = tmp_path / "run"
    result = run_train(flags(tiny_data, run), nproc=1, max_restarts=1, env={"GPT2_TRAINER_TEST_CRASH_AT_STEP": "13"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "injected crash" in result.stderr
    assert train_losses(run) == train_losses(reference_1proc)
    assert_metrics_continue(run, 20)


def test_nan_on_one_rank_skips_the_update_on_all_ranks(tiny_data, tmp_path):
    run = tmp_path / "run"
    result = run_train(flags(tiny_data, run, steps=8, every=0), nproc=2, env={"GPT2_TRAINER_TEST_NAN_AT_STEP": "4:1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [r for r in read_metrics(run) if r["type"] == "train"]
    assert [r["step"] for r in records if r.get("skipped")] == [4]
    assert all(r["loss"] == r["loss"] for r in records if r["step"] != 4)  # finite elsewhere


def test_consecutive_nonfinite_steps_stop_the_run_with_checkpoint_intact(tiny_data, tmp_path):
    run2 = tmp_path / "run2"
    result = run_train(
        flags(tiny_data, run2, steps=20, every=5, extra=["--max-bad-steps", "3"]),
        env={"GPT2_TRAINER_TEST_NAN_AT_STEP": "7,8,9,10"},
    )
    assert result.returncode == train.EXIT_NONFINITE
    assert "consecutive" in result.stdout
    ckpt = checkpoint.find_checkpoint(run2)
    assert ckpt.step == 5  # the last good one, loadable
    checkpoint.load_model(ckpt.path)


def _safetensors_disk_full(filename):
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    "disk_full",
    [
        lambda filename: OSError(errno.ENOSPC, "No space left on device", filename),
        _safetensors_disk_full,  # what safetensors really raises: not an OSError
    ],
    ids=["OSError", "SafetensorError"],
)
def test_full_disk_while_saving_keeps_training_and_previous_checkpoint(
    tiny_data, tmp_path, monkeypatch, capsys, disk_full
):
    run = tmp_path / "run"
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def save_file_then_disk_full(tensors, filename, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint hits a full disk
            raise disk_full(filename)
        return real_save(tensors, filename, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", save_file_then_disk_full)
    assert train.main(flags(tiny_data, run, steps=20, every=5)) == 0
    err_text = capsys.readouterr().out
    assert "No space left on device" in err_text and "training goes on" in err_text
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert 10 not in steps and 20 in steps
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert sorted(train_losses(run)) == list(range(20))


def test_full_disk_in_torch_save_keeps_training(tiny_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def torch_save_then_disk_full(obj, f, *a, **kw):
        if str(f).endswith("train_state.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # how torch.save reports a full disk
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", torch_save_then_disk_full)
    assert train.main(flags(tiny_data, run, steps=20, every=5)) == 0
    assert "unexpected pos" in capsys.readouterr().out
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert 10 not in steps and 20 in steps
    assert not list((run / "checkpoints").glob("*.tmp"))


def _save_while_rank_1_cannot_write(rank: int, world_size: int, run_dir: str) -> None:
    from model import GPT, config_from_preset
    from runtime import Dist

    if rank == 1:

        def disk_full(obj, f, *a, **kw):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

        torch.save = disk_full  # (this process only)
    d = Dist(rank=rank, world_size=world_size)
    model = GPT(config_from_preset("tiny", n_layer=1))
    try:
        checkpoint.save_checkpoint(Path(run_dir), 5, model, {"tokens_seen": 0}, {}, rank, 2, d.barrier, d.any)
        outcome = "saved"
    except checkpoint.CheckpointError as e:
        outcome = str(e)
    Path(run_dir, f"rank{rank}.txt").write_text(outcome)


def test_a_save_that_fails_on_one_rank_fails_on_every_rank_and_publishes_nothing(tmp_path):
    spawn_gloo(_save_while_rank_1_cannot_write, 2, tmp_path, str(tmp_path))
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert "another rank could not write its RNG state" in outcomes[0]
    assert "unexpected pos" in outcomes[1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []  # nothing published, no .tmp


def _candidates_per_rank(rank: int, world_size: int, run_dirs: list[str], out: str) -> None:
    from runtime import Dist

    checkpointer = checkpoint.Checkpointer(Path(run_dirs[rank]), 5, 0, 0, Dist(rank=rank, world_size=world_size))
    try:
        outcome = " ".join(str(c.step) for c in checkpointer.candidates("auto"))
    except checkpoint.CheckpointError as e:
        outcome = str(e)
    Path(out, f"rank{rank}.txt").write_text(outcome)


def test_ranks_that_see_different_newest_checkpoints_all_stop_with_the_reason(tiny_data, tmp_path):
    shared = tmp_path / "shared"
    assert train.main(flags(tiny_data, shared, steps=10, every=5)) == 0
    stale = tmp_path / "stale"  # what a node with a stale view of the folder sees: no step 10
    shutil.copytree(shared, stale)
    shutil.rmtree(stale / "checkpoints" / "step_00000010")
    spawn_gloo(_candidates_per_rank, 2, tmp_path, [str(shared), str(shared)], str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["10 5", "10 5"]
    spawn_gloo(_candidates_per_rank, 2, tmp_path, [str(shared), str(stale)], str(tmp_path))
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert "newest usable one is step 10" in outcomes[0] and "newest usable one is step 5" in outcomes[1]
    assert all(
        "the processes see different checkpoints" in o and "HINT: --out must be one folder" in o for o in outcomes
    )


def test_truncated_newest_checkpoint_is_skipped_with_warning(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=10, every=5, extra=["--keep-last", "3"])) == 0
    newest = checkpoint.find_checkpoint(run).path
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    ckpt = checkpoint.find_checkpoint(run)
    assert ckpt.step == 5
    assert f"skipping checkpoint {newest}" in capsys.readouterr().out


def test_checkpoint_of_other_model_shape_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=5, every=5)) == 0
    assert train.main(flags(tiny_data, run, steps=10, every=5, extra=["--n-layer", "3"])) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "--n-layer: 2 -> 3" in err and "--allow-changes" in err and "--out DIR" in err


def test_checkpoint_with_other_format_version_is_refused(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=5, every=5)) == 0
    path = checkpoint.find_checkpoint(run).path
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 999
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="format version 999"):
        checkpoint.resolve_checkpoint(path)


def test_pruning_keeps_what_was_just_saved_when_a_later_broken_checkpoint_exists(tmp_path):
    for step in (2, 4, 6):  # step 6: broken, skipped by the resume that went on from step 4
        (tmp_path / "checkpoints" / checkpoint.checkpoint_name(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / checkpoint.checkpoint_name(5)).mkdir()  # just saved
    removed = checkpoint.prune_checkpoints(tmp_path, keep_last=1, keep_every=0, newest_step=5)
    assert sorted(p.name for p in removed) == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005", "step_00000006"]


def test_keep_last_and_keep_every(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=12, every=2, extra=["--keep-last", "2", "--keep-every", "4"])) == 0
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert steps == [4, 8, 10, 12]


def test_init_from_checkpoint_starts_a_new_run_from_its_weights(tiny_data, tmp_path):
    src = tmp_path / "src"
    assert train.main(flags(tiny_data, src, steps=10, every=10)) == 0
    dst = tmp_path / "dst"
    assert train.main(flags(tiny_data, dst, steps=3, every=0, extra=["--init-from", str(src)])) == 0
    records = read_metrics(dst)
    assert records[0]["resumed_from_step"] is None
    losses = train_losses(dst)
    assert sorted(losses) == [0, 1, 2]
    assert losses[0] < train_losses(src)[0] - 1.0  # starts from trained weights, not from scratch


@pytest.mark.parametrize("resume", ["never", "step_00000005"])
def test_a_fresh_or_earlier_start_refuses_a_directory_holding_later_checkpoints(tiny_data, tmp_path, capsys, resume):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=10, every=5, extra=["--keep-last", "5"])) == 0
    if resume != "never":
        resume = str(run / "checkpoints" / resume)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    metrics_before = (run / "metrics.jsonl").read_bytes()
    assert train.main(flags(tiny_data, run, steps=10, every=5, extra=["--resume", resume])) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "step_00000010" in err and "left by a run started otherwise" in err and "another --out" in err
    assert "--resume auto continues from the newest of them" in err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_bytes() == metrics_before


class SignalledAfterStartUp(train.StopSignal):
    """A SIGTERM that arrives during the first step, after start-up."""

    @property
    def received(self):
        self.reads = getattr(self, "reads", 0) + 1
        return None if self.reads == 1 else signal.SIGTERM

    @received.setter
    def received(self, value):
        pass


@pytest.mark.parametrize("start", ["never", "checkpoint"])
def test_the_same_explicit_resume_command_again_continues_where_it_was_stopped(
    tiny_data, tmp_path, monkeypatch, capsys, start
):
    """A run started with --resume never or --resume PATH and stopped (exit 75: "run the same
    command again") continues from its own checkpoint when the same command runs again, and ends
    as a run never stopped; another --resume into its folder is still refused."""
    base = tmp_path / "base"
    assert train.main(flags(tiny_data, base, steps=4, every=2)) == 0
    resume = "never" if start == "never" else str(base / "checkpoints" / "step_00000002")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert train.main(flags(tiny_data, whole, steps=8, every=0, extra=["--resume", resume])) == 0
    with monkeypatch.context() as patch:
        patch.setattr(train, "StopSignal", SignalledAfterStartUp)
        assert train.main(flags(tiny_data, stopped, steps=8, every=0, extra=["--resume", resume])) == 75
    capsys.readouterr()
    assert train.main(flags(tiny_data, stopped, steps=8, every=0, extra=["--resume", resume])) == train.EXIT_OK
    assert "this command's own later checkpoints" in capsys.readouterr().out
    assert train_losses(stopped) == train_losses(whole)
    other = "never" if start != "never" else str(base / "checkpoints" / "step_00000002")
    assert train.main(flags(tiny_data, stopped, steps=8, every=0, extra=["--resume", other])) == train.EXIT_CONFIG
    assert "left by a run started otherwise" in capsys.readouterr().err


def test_a_resumed_run_keeps_its_micro_batch_even_with_allow_changes(tiny_data, tmp_path, capsys):
    """The loader's place in the data is kept in chunks of batch size x sequence length, so a
    smaller micro-batch under the same total is refused with the way out, before any file changes."""
    run = tmp_path / "run"
    total = ["--total-batch-size", "256"]  # 2 micro-batches of 4 x 32 tokens, or 4 of 2 x 32
    assert train.main(flags(tiny_data, run, steps=2, every=2, extra=total)) == 0
    metrics_before = (run / "metrics.jsonl").read_bytes()
    smaller = [*total, "--batch-size", "2", "--allow-changes"]
    assert train.main(flags(tiny_data, run, steps=4, every=2, extra=smaller)) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "--batch-size and --seq-len cannot change" in err and "HINT: pass --batch-size 4 --seq-len 32" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    assert train.main(flags(tiny_data, run, steps=4, every=2, extra=[*total, "--activation-checkpointing", "1"])) == 0


def test_stop_signal_on_the_last_step_finishes_the_run(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "StopSignal", SignalledAfterStartUp)
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=3, every=0)) == train.EXIT_PREEMPTED  # stops after step 0
    assert checkpoint.find_checkpoint(run).step == 1
    assert train.main(flags(tiny_data, run, steps=2, every=0)) == train.EXIT_OK  # step 1 is the last
    assert checkpoint.find_checkpoint(run).step == 2
    assert [r["step"] for r in read_metrics(run) if r["type"] == "eval"][-1] == 2


def test_signal_during_start_up_stops_before_the_first_step(tiny_data, tmp_path, monkeypatch, capsys):
    class SignalledAtOnce(train.StopSignal):
        def __init__(self):
            super().__init__()
            self.received = signal.SIGINT

    monkeypatch.setattr(train, "StopSignal", SignalledAtOnce)
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=3, every=0)) == train.EXIT_PREEMPTED
    assert "stopped by a signal at step 0" in capsys.readouterr().out
    assert checkpoint.find_checkpoint(run) is None
    assert not [r for r in read_metrics(run) if r["type"] == "train"]


def test_signal_handlers_are_put_back_when_training_returns(tiny_data, tmp_path):
    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        assert train.main(flags(tiny_data, tmp_path / "run", steps=1, every=0)) == 0
        assert signal.getsignal(signal.SIGUSR1) is handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_final_evaluation_is_of_the_final_weights(tiny_data, tmp_path):
    from dataloader import ShardedDataLoader

    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=4, every=0, extra=["--eval-every", "3"])) == 0
    evals = {r["step"]: r["val_loss"] for r in read_metrics(run) if r["type"] == "eval"}
    assert sorted(evals) == [0, 3, 4]
    model = checkpoint.load_model(run).eval()
    val = ShardedDataLoader(tiny_data, "val", batch_size=4, seq_len=32)
    n_chunks = 512 // (4 * 32)
    recomputed = train.evaluate_val_loss(model, val, n_chunks, train.Dist(), torch.device("cpu"), None)
    assert recomputed == pytest.approx(evals[4], rel=1e-6)
    # running the finished run again keeps its record, final evaluation included
    assert train.main(flags(tiny_data, run, steps=4, every=0, extra=["--eval-every", "3"])) == 0
    assert sorted(r["step"] for r in read_metrics(run) if r["type"] == "eval") == [0, 3, 4]


def test_run_stopped_before_its_final_evaluation_does_it_when_run_again(tiny_data, tmp_path):
    run = tmp_path / "run"
    command = flags(tiny_data, run, steps=4, every=0, extra=["--eval-every", "3"])
    assert train.main(command) == 0
    final = [r for r in read_metrics(run) if r["type"] == "eval" and r["step"] == 4]
    # as if killed after the final checkpoint, before the final evaluation was logged
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x) not in final))
    assert [r["step"] for r in read_metrics(run) if r["type"] == "eval"] == [0, 3]
    assert train.main(command) == 0
    evals = [r for r in read_metrics(run) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 4]
    assert evals[-1]["val_loss"] == pytest.approx(final[0]["val_loss"], rel=1e-6)


def test_init_from_checkpoint_takes_this_runs_dropout(tiny_data, tmp_path):
    src = tmp_path / "src"
    assert train.main(flags(tiny_data, src, steps=2, every=0)) == 0
    dst = tmp_path / "dst"
    assert train.main(flags(tiny_data, dst, steps=1, every=0, extra=["--init-from", str(src), "--dropout", "0.2"])) == 0
    assert checkpoint.find_checkpoint(dst).meta["model_config"]["dropout"] == 0.2
    model = checkpoint.load_model(src, dropout=0.2)
    assert model.config.dropout == 0.2
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}


def test_resume_never_and_explicit_path(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=10, every=5, extra=["--keep-last", "5"])) == 0
    fresh = tmp_path / "fresh"
    assert train.main(flags(tiny_data, fresh, steps=10, every=0, extra=["--resume", "never"])) == 0
    assert train_losses(fresh) == train_losses(run)
    again = tmp_path / "again"
    assert (
        train.main(
            flags(tiny_data, again, steps=10, every=0, extra=["--resume", str(run / "checkpoints" / "step_00000005")])
        )
        == 0
    )
    assert sorted(train_losses(again)) == list(range(5, 10))
    assert train_losses(again) == {s: v for s, v in train_losses(run).items() if s >= 5}
