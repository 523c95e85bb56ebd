"""Mistakes and damage get a clear answer, and nothing the user had is lost: changed flags on a
rerun, damaged checkpoints, bad token ids, bad meta.json, an unwritable or busy --out, a full
disk under metrics.jsonl."""

import errno
import fcntl
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import dataloader
import train
from metrics import MetricsLog
from runs import TINY, read_metrics, run_train, train_losses


def flags(data, run, steps=6, every=3, extra=""):
    return [*TINY, *f"--data {data} --out {run} --max-steps {steps} --checkpoint-every {every}".split(), *extra.split()]


@pytest.fixture
def finished_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run)) == 0
    return run


# ---- a rerun with other flags ----


def test_rerun_with_another_learning_rate_is_refused_and_changes_nothing(tiny_data, finished_run, capsys):
    before = {p: p.read_bytes() for p in (finished_run / "config.json", finished_run / "metrics.jsonl")}
    assert train.main(flags(tiny_data, finished_run, extra="--lr 1e-2")) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "--lr: 0.003 -> 0.01" in err and "--allow-changes" in err and "--out DIR" in err
    assert "--resume never" not in err  # (refused itself on a folder holding this run's checkpoints)
    assert {p: p.read_bytes() for p in before} == before


def test_the_same_data_folder_named_another_way_is_no_change(tiny_data, finished_run, capsys):
    for spelling in (f"{tiny_data}/", os.path.relpath(tiny_data)):
        assert train.main(flags(spelling, finished_run)) == train.EXIT_OK
        assert "--data" not in capsys.readouterr().out


def test_abbreviated_flags_are_refused(tiny_data, tmp_path, capsys):
    """launch/ scripts set --out and --resume and refuse them from the user: --ou would slip past."""
    with pytest.raises(SystemExit) as exit:
        train.main([*TINY, "--data", str(tiny_data), "--ou", str(tmp_path / "run")])
    assert exit.value.code == 2 and "unrecognized arguments: --ou" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_allow_changes_continues_and_records_the_change(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=3)) == 0
    assert train.main(flags(tiny_data, run, steps=6, extra="--weight-decay 0.2 --allow-changes")) == 0
    assert "--weight-decay: 0.1 -> 0.2" in capsys.readouterr().out
    change = [r for r in read_metrics(run) if r["type"] == "config_change"]
    assert change[0]["step"] == 3 and change[0]["training"] == ["--weight-decay: 0.1 -> 0.2"]
    assert json.loads((run / "config.json").read_text())["weight_decay"] == 0.2
    assert sorted(train_losses(run)) == list(range(6))


def test_longer_max_steps_goes_on_and_says_what_the_schedule_does(tiny_data, finished_run, capsys):
    assert train.main(flags(tiny_data, finished_run, steps=9)) == 0
    out = capsys.readouterr().out
    assert "--max-steps: 6 -> 9" in out and "schedule now ends at step 9" in out
    assert sorted(train_losses(finished_run)) == list(range(9))


def test_rerun_without_max_steps_keeps_the_finished_run_as_it_is(tiny_data, finished_run, capsys):
    checkpoints = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    records = (finished_run / "metrics.jsonl").read_text().count('"type": "train"')
    args = flags(tiny_data, finished_run, extra="--keep-last 1")
    del args[args.index("--max-steps") : args.index("--max-steps") + 2]  # the default is far more than 6
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "--max-steps not given: the run's own 6" in out
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == checkpoints  # none pruned
    assert (finished_run / "metrics.jsonl").read_text().count('"type": "train"') == records  # not one step more


def test_max_steps_below_the_steps_taken_is_refused(tiny_data, finished_run, capsys):
    assert train.main(flags(tiny_data, finished_run, steps=4)) == train.EXIT_CONFIG
    assert "already took 6 steps" in capsys.readouterr().err


# ---- damaged checkpoints ----


def _rewrite_meta(ckpt_dir, change):
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    change(meta)
    (ckpt_dir / "meta.json").write_text(json.dumps(meta))


def _refresh_hash(ckpt_dir, name):
    """Damage that the sha256 does not catch: the file's own hash written into meta.json."""
    from files import sha256_file

    def change(meta):
        meta["files"][name] = {"bytes": (ckpt_dir / name).stat().st_size, "sha256": sha256_file(ckpt_dir / name)}

    _rewrite_meta(ckpt_dir, change)


@pytest.mark.parametrize("damage", ["unpicklable state", "missing key", "missing rng file", "step mismatch"])
def test_damaged_newest_checkpoint_is_skipped_for_the_one_before(tiny_data, finished_run, capsys, damage):
    newest = finished_run / "checkpoints" / "step_00000006"
    if damage == "unpicklable state":
        (newest / "train_state.pt").write_bytes(b"not a pickle at all")
        _refresh_hash(newest, "train_state.pt")
    elif damage == "missing key":
        state = torch.load(newest / "train_state.pt", weights_only=True)
        del state["optimizer"]
        torch.save(state, newest / "train_state.pt")
        _refresh_hash(newest, "train_state.pt")
    elif damage == "missing rng file":
        (newest / "rng_rank00000.pt").unlink()
        _rewrite_meta(newest, lambda meta: meta["files"].pop("rng_rank00000.pt"))
    else:
        _rewrite_meta(newest, lambda meta: meta.update(step=5))
    assert train.main(flags(tiny_data, finished_run)) == 0
    out = capsys.readouterr().out
    assert f"WARNING: skipping checkpoint {newest}" in out and "resumed from" in out and "step_00000003" in out
    assert sorted(train_losses(finished_run)) == list(range(6))


def test_no_usable_checkpoint_stops_instead_of_starting_over(tiny_data, finished_run, capsys):
    for ckpt in (finished_run / "checkpoints").glob("step_*"):
        (ckpt / "meta.json").write_text("{")
    metrics_before = (finished_run / "metrics.jsonl").read_bytes()
    assert train.main(flags(tiny_data, finished_run)) == train.EXIT_ERROR
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "pass another --out" in err and "--resume never" not in err
    assert (finished_run / "metrics.jsonl").read_bytes() == metrics_before


# ---- out of memory ----


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: 1 GB"),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_says_how_to_fit_and_keeps_the_checkpoints(tiny_data, finished_run, monkeypatch, capsys, error):
    checkpoints = sorted(p.name for p in (finished_run / "checkpoints").iterdir())

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(train.GPT, "forward", no_memory)
    assert train.main(flags(tiny_data, finished_run, steps=9)) == train.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: out of memory: {str(error).splitlines()[0]}\nHINT: recompute N of the blocks")
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == checkpoints


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tiny_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(train.GPT, "forward", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train.main(flags(tiny_data, tmp_path / "run"))


# ---- other files a run reads ----


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        (b"\xff\xfe not text\n", "is not UTF-8 text"),
        (b'{"ctx": "A", "endings": ["a"], "label": 0}\n', "'endings' must be a list of 4 strings"),
    ],
    ids=["missing", "not-utf8", "bad-item"],
)
def test_bad_hellaswag_file_is_a_clear_error_before_training(tiny_data, tmp_path, capsys, content, message):
    path = tmp_path / "hellaswag.jsonl"
    if content is not None:
        path.write_bytes(content)
    args = flags(tiny_data, tmp_path / "run", extra=f"--hellaswag-every 3 --hellaswag-file {path}")
    assert train.main(args) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert message in err and "HINT:" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_a_missing_path_is_a_clear_error(tiny_data, tmp_path, capsys):
    args = flags(tiny_data, tmp_path / "run", extra=f"--init-from {tmp_path / 'nope'}")
    assert train.main(args) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "does not exist, and it is not one of the Hugging Face names" in err and "HINT:" in err


def test_checkpoint_files_get_the_permissions_the_umask_gives(tiny_data, tmp_path):
    old = os.umask(0o022)  # a cluster's usual: readable by the group and others
    try:
        assert train.main(flags(tiny_data, tmp_path / "run", steps=2, every=2)) == 0
    finally:
        os.umask(old)
    saved = list((tmp_path / "run" / "checkpoints" / "step_00000002").iterdir())
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in saved} == {p.name: "0o644" for p in saved}


def test_saved_weights_have_no_wrapper_prefixes_whatever_wraps_the_model():
    from model import GPT, config_from_preset

    model = GPT(config_from_preset("tiny", n_layer=1))
    wrapped = torch.compile(model)  # a wrapper that prefixes every key with _orig_mod.
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    saved = checkpoint.model_state_for_saving(wrapped)
    assert set(saved) == set(model.state_dict()) - {"lm_head.weight"}


# ---- --out ----


def test_unwritable_out_is_an_error_before_set_up(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train.main(flags(tiny_data, blocker / "run")) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "cannot write there" in err and "HINT" in err and "Traceback" not in err


def test_a_mistake_found_in_set_up_leaves_no_folder_or_lock_behind(tiny_data, tmp_path, capsys):
    new, kept = tmp_path / "new" / "run", tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (new, kept):
        assert train.main(flags(tiny_data, out, extra="--seq-len 4096")) == train.EXIT_CONFIG
        assert "longer than the model's block size" in capsys.readouterr().err
    assert not new.exists()
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # the folder was there before: kept


def test_a_second_run_on_the_same_out_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        held.write("pid 12345 on elsewhere\n")
        held.flush()
        assert train.main(flags(tiny_data, run)) == train.EXIT_CONFIG
    assert "in use by another run (pid 12345 on elsewhere)" in capsys.readouterr().err
    assert not (run / "metrics.jsonl").exists()
    assert train.main(flags(tiny_data, run, steps=1)) == 0  # the lock went with its holder


def test_a_second_run_with_two_processes_is_refused_by_every_rank_without_a_traceback(tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_train(flags(tiny_data, run), nproc=2)
    assert result.returncode != 0
    assert result.stderr.count("in use by another run") == 1 and "[rank 1]" not in result.stderr  # said once, by rank 0
    assert 'train.py", line' not in result.stderr  # no traceback from a worker (torchrun prints its own)
    assert not (run / "metrics.jsonl").exists()


def test_a_folder_that_cannot_be_locked_trains_with_a_warning(tiny_data, tmp_path, monkeypatch, capsys):
    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(train.fcntl, "flock", no_locks)
    assert train.main(flags(tiny_data, tmp_path / "run", steps=1)) == 0
    assert (
        "cannot be locked (Function not implemented): a second run on it will not be refused" in capsys.readouterr().out
    )


# ---- data ----


def _own_data(tmp_path, tokens, vocab_size=100):
    """A data directory in this project's format with one train and one val shard."""
    out = tmp_path / "data"
    out.mkdir()
    np.save(out / "train_000000.npy", tokens.astype(np.uint16))
    np.save(out / "val_000000.npy", np.arange(200, dtype=np.uint16) % vocab_size)
    meta = {
        "format_version": 1, "vocab_size": vocab_size, "eot_id": 0, "dtype": "uint16", "tokenizer": "gpt2",
        "splits": {"train": {"shards": [{"file": "train_000000.npy", "tokens": len(tokens)}]},
                   "val": {"shards": [{"file": "val_000000.npy", "tokens": 200}]}},
    }  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_out_of_range_id_the_open_time_sample_misses_is_named_with_file_and_offset(tmp_path):
    tokens = np.arange(100_000) % 100
    tokens[54_321] = 100  # between two sampled positions
    data = _own_data(tmp_path, tokens)
    loader = dataloader.ShardedDataLoader(data, "train", batch_size=4, seq_len=64)
    with pytest.raises(dataloader.DataError, match=r"train_000000.npy: token id 100 at token offset 54,321"):
        for _ in range(loader.num_chunks()):
            loader.next_batch()


def test_id_in_the_padded_vocabulary_is_bad_data_not_a_nonfinite_step(tmp_path, capsys):
    tokens = np.arange(20_000) % 50257
    tokens[5_000] = 50300  # below the padded 50,304, above the real 50,257
    np.save(tmp_path / "edufineweb_train_000000.npy", tokens.astype(np.uint16))
    np.save(tmp_path / "edufineweb_val_000000.npy", (np.arange(2_000) % 50257).astype(np.uint16))
    args = [*TINY, "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--max-steps", "50", "--eval-every", "0"]
    assert train.main(args) == train.EXIT_ERROR
    err = capsys.readouterr().err
    assert "token id 50300" in err and "vocabulary size 50257" in err and "non-finite" not in err


def test_llmc_shard_with_ids_beyond_gpt2_is_refused_at_open(tmp_path):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, 1000)
    tokens = np.full(1000, 60000, dtype="<u2")
    (tmp_path / "fineweb_train_000000.bin").write_bytes(header.tobytes() + tokens.tobytes())
    with pytest.raises(dataloader.DataError, match="token id 60000 is not below the vocabulary size 50257"):
        dataloader.ShardedDataLoader(tmp_path, "train", batch_size=2, seq_len=16)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(vocab_size="50257"), "field 'vocab_size' is '50257', expected an integer"),
        (lambda m: m.update(splits=[]), "field 'splits' is [], expected dict"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="../train_000000.npy"), "points outside"),
        (lambda m: m["splits"]["train"].update(shards=None), "has no list of shards"),
    ],
)
def test_bad_meta_json_is_a_data_error_not_a_traceback(tmp_path, change, message):
    data = _own_data(tmp_path, np.arange(1000) % 100)
    meta = json.loads((data / "meta.json").read_text())
    change(meta)
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(dataloader.DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dataloader.read_meta(data)


def test_text_file_given_as_data_says_how_to_prepare_it(tmp_path, capsys):
    text = tmp_path / "input.txt"
    text.write_text("hello world\n")
    assert train.main([*TINY, "--data", str(text), "--out", str(tmp_path / "run")]) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"python prepare_data.py {text}" in err and "--data data/input" in err and "--out input.txt" not in err


# ---- a full disk under metrics.jsonl ----


class Disk:
    """Files whose writes fail while `full` is set, as on a full disk."""

    def __init__(self):
        self.full = False

    def open(self, path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)
        disk = self

        class File:
            def write(self, text):
                if disk.full:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real.write(text)

            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

        return File()


def test_metrics_writes_on_a_full_disk_keep_the_run_going_and_lose_nothing(tmp_path, monkeypatch, capsys):
    import metrics as metrics_module

    disk = Disk()
    monkeypatch.setattr(metrics_module, "open", disk.open, raising=False)
    with MetricsLog(tmp_path, train.TrainConfig(), train.Dist()) as metrics:
        metrics.log({"type": "train", "step": 0})
        disk.full = True
        metrics.log({"type": "train", "step": 1})
        metrics.log({"type": "train", "step": 2})
        disk.full = False
        metrics.log({"type": "train", "step": 3})
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert capsys.readouterr().out.count("could not write") == 1


def test_resuming_drops_a_cut_short_last_line_but_keeps_other_lines_it_cannot_read(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"type": "train", "step": 0}', "a note of mine", '{"type": "train", "step": 1}', '{"type": "tra']
    path.write_text("\n".join(lines) + "\n")
    with MetricsLog(tmp_path, train.TrainConfig(), train.Dist()) as metrics:
        metrics.truncate_from(1)
    assert path.read_text().splitlines() == lines[:2]
    assert f"{path}:2 is not a JSON record; left as it is" in capsys.readouterr().out
