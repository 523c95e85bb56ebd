"""train.py --fsdp on CPU with gloo: the sharded model's initial weights, each rank's share of
the memory, losses against unsharded training, and checkpoints (exact resume, resume on
another number of processes, export, loading in sample.py, hellaswag.py and --init-from)."""

from __future__ import annotations

import datetime
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import checkpoint
import hellaswag
import sample
import sharding
import train
from conftest import requires_gpu
from model import GPT, GPTConfig
from runs import TINY, read_metrics, run_train, run_with_stdout_closed, train_losses
from runtime import EXIT_BROKEN_PIPE, Dist

SEED = 1234
CONFIG = dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64, pad_vocab_to=64)
ITEMS = [
    {"ctx": f"A man opens door number {i} and", "label": i % 4, "endings": ["walks in.", "sings.", "waits.", "runs."]}
    for i in range(5)
]


def flags(data, run, steps=20, every=10, extra=()):
    """Two processes of batch 4 or one accumulating two micro-batches: 256 tokens a step. Without
    gradient clipping: the norm of sharded gradients rounds otherwise than the norm of whole ones
    (a test below compares the two), and a clipped update passes that last bit on to the weights."""
    schedule = f"--max-steps {steps} --eval-every 5 --checkpoint-every {every} --total-batch-size 256".split()
    return [*TINY, "--data", str(data), "--out", str(run), *schedule, "--grad-clip", "0", *extra]


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hellaswag") / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


def hellaswag_flags(path: Path) -> list[str]:
    """Two items a batch: the first of two ranks has two batches, the second one (and a blank)."""
    return [*"--hellaswag-every 10 --hellaswag-batch-size 2 --hellaswag-file".split(), str(path)]


# ---- two gloo ranks in this test's own processes: initialisation, memory, one checkpoint ----


def _two_ranks(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=120)  # a rank left waiting fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timeout)
    try:
        report = _sharded_step(rank, Path(out))
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()  # no rank tears down its connections while the other may still use them
    finally:
        dist.destroy_process_group()


def _sharded_step(rank: int, out: Path) -> dict:
    """Build the sharded model and an unsharded one from the same seed, take one step on each
    (each rank half the batch, the unsharded model all of it), save two checkpoints and the
    logits of the unsharded model the shards make up."""
    config = GPTConfig(**CONFIG)
    torch.manual_seed(SEED)
    reference = GPT(config)
    generator_after_reference = torch.rand(4)
    torch.manual_seed(SEED)
    model = sharding.build_sharded_model(config, torch.device("cpu"), None)
    pairs = list(zip(model.named_parameters(), reference.named_parameters(), strict=True))
    report = {
        "same_names": all(a[0] == b[0] for a, b in pairs),
        "same_initial_weights": all(torch.equal(a[1].full_tensor(), b[1]) for a, b in pairs),
        "same_generator_state": torch.equal(torch.rand(4), generator_after_reference),
        "tied": model.transformer.wte.weight is model.lm_head.weight,
    }
    x = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, dims=1)
    model(x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2])[1].backward()
    report["grad_norm"] = sharding.clip_grad_norm_(list(model.parameters()), 1.0).item()
    reference(x, y)[1].backward()
    report["reference_grad_norm"] = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item()
    optimizer = model.configure_optimizers(0.1, 1e-3, device_type="cpu")
    optimizer.step()
    report["local_bytes"] = _local_bytes(model, optimizer)
    report["expected_bytes"] = sharding.per_rank_bytes(config, 2)
    d = Dist(rank, rank, 2)
    shards = sharding.ShardedState(model, optimizer)
    for step in (1, 2):
        checkpoint.save_checkpoint(
            out / "run", step, model, {"tokens_seen": 0}, {"tokenizer": "gpt2"}, rank, 2, d.barrier, d.any, shards.save
        )
    full = {name: p.full_tensor() for name, p in model.state_dict().items()}  # (a collective: every rank)
    if rank == 0:
        unsharded = GPT(config)
        unsharded.load_state_dict(full)
        with torch.no_grad():
            torch.save({"x": x, "logits": unsharded(x, y)[0]}, out / "logits.pt")
    return report


def _local_bytes(model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the storages behind this rank's weights, gradients and AdamW moments, each once."""

    def storage_bytes(tensors: list[torch.Tensor]) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    params = list(model.parameters())
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    return {
        "weights": storage_bytes([p.to_local() for p in params]),
        "gradients": storage_bytes([p.grad.to_local() for p in params]),
        "adamw": storage_bytes([m.to_local() for m in moments]),
        "dtensors": all(isinstance(t, DTensor) for t in [*params, *moments]),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("two_ranks")
    torch.multiprocessing.spawn(_two_ranks, args=(str(out / "store"), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], out


def test_sharded_initialisation_is_the_unsharded_models_for_the_same_seed(two_ranks):
    for report in two_ranks[0]:
        assert report["same_names"] and report["same_initial_weights"] and report["same_generator_state"]
        assert report["tied"]  # the token table is still the output layer


def test_gradient_norm_over_the_shards_is_the_whole_gradients(two_ranks):
    for report in two_ranks[0]:
        assert report["grad_norm"] == pytest.approx(report["reference_grad_norm"], rel=1e-6)


def test_each_of_two_ranks_holds_half_of_the_weights_gradients_and_adamw_state(two_ranks):
    n = sum(p.numel() for p in GPT(GPTConfig(**CONFIG)).parameters())
    for report in two_ranks[0]:
        held = report["local_bytes"]
        assert held["dtensors"]
        for kind, unsharded in (("weights", 4 * n), ("gradients", 4 * n), ("adamw", 8 * n)):
            assert held[kind] == pytest.approx(unsharded / 2, rel=0.01), kind
        total = held["weights"] + held["gradients"] + held["adamw"]
        assert total == pytest.approx(report["expected_bytes"]["state"], rel=0.01)
        assert report["expected_bytes"]["unsharded"] == 16 * n


def test_sharded_checkpoint_holds_every_ranks_shards_and_is_published_as_any_other(two_ranks):
    run = two_ranks[1] / "run"
    ckpt = checkpoint.find_checkpoint(run)
    assert ckpt.step == 2 and ckpt.meta["sharded"] and ckpt.meta["world_size"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.path.name
    names = {p.name for p in ckpt.path.iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.pt", "meta.json"} <= names
    assert "model.safetensors" not in names and set(ckpt.meta["files"]) == names - {"meta.json"}
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_a_corrupt_shard_makes_the_checkpoint_skipped_with_a_warning(two_ranks, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_ranks[1] / "run", run)
    shard = run / "checkpoints" / "step_00000002" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert checkpoint.find_checkpoint(run).step == 1
    assert "skipping checkpoint" in capsys.readouterr().out


def test_export_of_a_sharded_checkpoint_gives_the_unsharded_models_logits(two_ranks, tmp_path):
    saved = torch.load(two_ranks[1] / "logits.pt")
    out = tmp_path / "exported"
    assert sharding.main(["export", str(two_ranks[1] / "run"), str(out)]) == 0
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    y = saved["x"].roll(-1, dims=1)
    with torch.no_grad():
        from_export = GPT.from_pretrained(str(out), pad_vocab_to=64).eval()(saved["x"], y)[0]
        from_checkpoint = checkpoint.load_model(two_ranks[1] / "run").eval()(saved["x"], y)[0]
    assert torch.equal(from_checkpoint, saved["logits"])
    torch.testing.assert_close(from_export, saved["logits"], rtol=0, atol=1e-6)


def test_export_records_the_checkpoints_tokenizer_where_saved_tokenizer_finds_it(two_ranks, tmp_path):
    run, out = two_ranks[1] / "run", tmp_path / "exported"
    assert sharding.main(["export", str(run), str(out)]) == 0
    assert checkpoint.saved_tokenizer(run) == "gpt2"
    assert checkpoint.saved_tokenizer(out) == "gpt2"  # None where config.json does not record it


def test_export_over_an_earlier_export_is_done_in_place(two_ranks, tmp_path):
    out = tmp_path / "exported"
    for _ in range(2):
        assert sharding.main(["export", str(two_ranks[1] / "run"), str(out)]) == 0
    assert GPT.from_pretrained(str(out)).config.n_layer == CONFIG["n_layer"]


def test_export_to_a_closed_stdout_still_exports_and_stops_quietly(tiny_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    assert train.main([*TINY, "--data", str(tiny_data), "--out", str(run), "--max-steps", "1"]) == 0
    done = run_with_stdout_closed(["sharding.py", "export", str(run), str(out)])
    assert done.returncode == EXIT_BROKEN_PIPE, done.stderr
    assert "Traceback" not in done.stderr and "Broken pipe" not in done.stderr
    assert GPT.from_pretrained(str(out)).config.n_layer == 2


def folder_contents(folder: Path) -> list[tuple[str, bytes | None]]:
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("files", "said"),
    [
        (["config.json", "metrics.jsonl", "checkpoints/step_00000001/meta.json"], "is a run folder"),
        (["config.json", "model.safetensors", "notes.txt"], "holds files an export does not write (notes.txt)"),
    ],
)
def test_export_into_a_run_folder_or_one_with_other_files_is_refused_and_touches_nothing(files, said, tmp_path, capsys):
    folder = tmp_path / "target"
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    before = folder_contents(folder)
    # refused before the source is read, as in `export RUN RUN`
    assert sharding.main(["export", str(folder), str(folder)]) == sharding.EXIT_CONFIG
    err = capsys.readouterr().err
    assert said in err and "HINT: choose an empty or new folder" in err and "Traceback" not in err
    assert folder_contents(folder) == before


@pytest.mark.slow
def test_sample_and_hellaswag_load_a_sharded_checkpoint_and_its_export(two_ranks, tmp_path, hellaswag_file, capsys):
    run = two_ranks[1] / "run"
    out = tmp_path / "exported"
    assert sharding.main(["export", str(run), str(out)]) == 0
    for source in (run, out):
        assert (
            sample.main(["--init-from", str(source), *"--device cpu --num-samples 1 --max-new-tokens 3".split()]) == 0
        )
    for source in (["--checkpoint", str(run)], ["--model-type", str(out)]):
        assert hellaswag.main([*source, "--data-file", str(hellaswag_file), *"--device cpu --json".split()]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(results) == 2 and results[0] == results[1] and results[0]["num_examples"] == len(ITEMS)


# ---- train.py in one process: a process group of one ----


@pytest.mark.slow
def test_fsdp_in_one_process_trains_as_the_unsharded_model(tiny_data, tmp_path):
    plain, sharded, checkpointed = tmp_path / "plain", tmp_path / "fsdp", tmp_path / "fsdp_ac"
    assert train.main(flags(tiny_data, plain, steps=4, every=0)) == 0
    assert train.main(flags(tiny_data, sharded, steps=4, every=0, extra=["--fsdp"])) == 0
    ac = ["--fsdp", "--activation-checkpointing", "1"]
    assert train.main(flags(tiny_data, checkpointed, steps=4, every=0, extra=ac)) == 0
    assert train_losses(sharded) == train_losses(plain) == train_losses(checkpointed)
    evals = [[r["val_loss"] for r in read_metrics(run) if r["type"] == "eval"] for run in (plain, sharded)]
    assert evals[0] == evals[1]


def test_fsdp_resume_of_an_unsharded_checkpoint_is_refused_with_a_hint(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(flags(tiny_data, run, steps=2, every=2)) == 0
    assert train.main(flags(tiny_data, run, steps=4, every=2, extra=["--fsdp"])) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "saved without --fsdp" in err and "--init-from" in err


def test_fsdp_with_fp16_or_grad_sync_without_fsdp_is_a_config_error(tiny_data, tmp_path, capsys):
    assert train.main(flags(tiny_data, tmp_path / "a", extra=["--fsdp", "--dtype", "fp16"])) == train.EXIT_CONFIG
    assert train.main(flags(tiny_data, tmp_path / "b", extra=["--fsdp-grad-sync", "step"])) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "use --dtype bf16" in err and "needs --fsdp" in err


@pytest.mark.slow
def test_init_from_a_sharded_checkpoint_with_and_without_fsdp_starts_alike(two_ranks, tiny_data, tmp_path):
    # the checkpoint's vocabulary (50257) is GPT-2's, as the test data's
    source = ["--init-from", str(two_ranks[1] / "run")]
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    assert train.main(flags(tiny_data, plain, steps=2, every=0, extra=source)) == 0
    assert train.main(flags(tiny_data, sharded, steps=2, every=0, extra=[*source, "--fsdp"])) == 0
    assert train_losses(sharded) == train_losses(plain)


@pytest.mark.slow
def test_init_from_under_two_fsdp_processes_gives_each_its_shards_of_rank_0s_weights(two_ranks, tiny_data, tmp_path):
    source = ["--init-from", str(two_ranks[1] / "run")]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(flags(tiny_data, one, steps=3, every=0, extra=source)) == 0
    result = run_train(flags(tiny_data, two, steps=3, every=0, extra=[*source, "--fsdp"]), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    for step, loss in train_losses(one).items():
        assert train_losses(two)[step] == pytest.approx(loss, abs=1e-6)


@pytest.mark.slow
def test_bench_step_times_fsdp_and_gives_each_ranks_share(capsys):
    from bench import step

    assert step.main("--model tiny --device cpu --no-compile --steps 1 --warmup 1 --fsdp --json".split()) == 0
    timed = json.loads(capsys.readouterr().out)
    assert timed["fsdp"] and timed["tokens_per_sec"] > 0
    assert step.main("--model tiny --device cpu --activation-memory --fsdp --world-size 4 --json".split()) == 0
    row = json.loads(capsys.readouterr().out)
    share = sharding.per_rank_bytes(GPTConfig(**{**step.PRESETS["tiny"], "pad_vocab_to": 64}), 4, 4)
    assert row["fsdp_world_size"] == 4
    assert row["per_rank_weights_grads_adam_gib"] == round(share["state"] / 2**30, 2)
    assert row["per_sequence_mib"] > 0 and not dist.is_initialized()


# ---- train.py under torchrun ----


@pytest.fixture(scope="module")
def one_process(tiny_data, hellaswag_file, tmp_path_factory) -> Path:
    """Unsharded, one process accumulating two micro-batches a step."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert train.main(flags(tiny_data, run, extra=hellaswag_flags(hellaswag_file))) == 0
    return run


@pytest.fixture(scope="module")
def two_fsdp_processes(tiny_data, hellaswag_file, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp2") / "run"
    result = run_train(flags(tiny_data, run, extra=["--fsdp", *hellaswag_flags(hellaswag_file)]), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def assert_losses_close(run, reference, abs=1e-6):
    losses, expected = train_losses(run), train_losses(reference)
    assert sorted(losses) == sorted(expected) == list(range(20))
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], abs=abs), step


@pytest.mark.slow
def test_two_fsdp_processes_match_one_process_with_twice_the_accumulation(two_fsdp_processes, one_process):
    assert_losses_close(two_fsdp_processes, one_process)
    records = {run: read_metrics(run) for run in (two_fsdp_processes, one_process)}
    evals = [{r["step"]: r["val_loss"] for r in rs if r["type"] == "eval"} for rs in records.values()]
    assert sorted(evals[0]) == [0, 5, 10, 15, 20] and evals[0] == pytest.approx(evals[1], abs=1e-6)
    scores = [[(r["step"], r["hellaswag_examples"]) for r in rs if r["type"] == "hellaswag"] for rs in records.values()]
    assert scores[0] == scores[1] == [(0, 5), (10, 5), (20, 5)]


@pytest.mark.slow
def test_reduce_scatter_once_a_step_matches_one_process(tiny_data, tmp_path):
    """Two processes accumulating two micro-batches each, reduce-scattering after the last only."""
    total = ["--total-batch-size", "512"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(flags(tiny_data, one, steps=8, every=0, extra=total)) == 0
    result = run_train(flags(tiny_data, two, steps=8, every=0, extra=[*total, "--fsdp", "--fsdp-grad-sync", "step"]), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    for step, loss in train_losses(one).items():
        assert train_losses(two)[step] == pytest.approx(loss, abs=1e-5)  # the micro-steps summed in another order


@pytest.mark.slow
def test_fsdp_sigkill_after_checkpoint_then_resume_is_bit_identical(tiny_data, tmp_path, two_fsdp_processes):
    run = tmp_path / "run"
    kill = {"GPT2_TRAINER_TEST_KILL_AFTER_CHECKPOINT": "10:0"}
    killed = run_train(flags(tiny_data, run, extra=["--fsdp"]), nproc=2, env=kill)
    assert killed.returncode != 0
    assert checkpoint.find_checkpoint(run).step == 10
    resumed = run_train(flags(tiny_data, run, extra=["--fsdp"]), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert train_losses(run) == train_losses(two_fsdp_processes)  # bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_fsdp_resume_on_another_number_of_processes(tiny_data, tmp_path, one_process, before, after):
    run = tmp_path / "run"
    kill = {"GPT2_TRAINER_TEST_KILL_AFTER_CHECKPOINT": "10:0" if before == 2 else "10"}
    killed = run_train(flags(tiny_data, run, extra=["--fsdp"]), nproc=before, env=kill)
    assert killed.returncode != 0 and checkpoint.find_checkpoint(run).meta["world_size"] == before
    resumed = run_train(flags(tiny_data, run, extra=["--fsdp"]), nproc=after)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"saved by {before} ranks" in resumed.stdout
    assert_losses_close(run, one_process)
    if killed.returncode == -signal.SIGKILL:  # one process: killed at once, nothing after the checkpoint
        assert [r["step"] for r in read_metrics(run) if r["type"] == "train"] == list(range(20))


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_fsdp_composes_with_compile_and_activation_checkpointing(tiny_data, tmp_path, scope):
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    assert train.main(flags(tiny_data, plain, steps=3, every=0)) == 0
    composed = ["--fsdp", "--compile", "--compile-scope", scope, "--activation-checkpointing", "1"]
    assert train.main(flags(tiny_data, sharded, steps=3, every=0, extra=composed)) == 0
    for step, loss in train_losses(plain).items():
        assert train_losses(sharded)[step] == pytest.approx(loss, abs=1e-4)  # compiled kernels round otherwise


@requires_gpu
def test_fsdp_on_one_gpu_in_bf16_compiled_block_by_block_trains_and_resumes(tiny_data, tmp_path):
    on_gpu = [a for a in TINY if a not in ("--device", "cpu", "--no-compile")]
    gpu = [*"--device cuda --dtype bf16 --compile --compile-scope blocks --fsdp --num-samples 1".split()]
    common = [*on_gpu, *gpu, "--data", str(tiny_data), "--eval-every", "5", "--checkpoint-every", "5"]
    common += ["--max-steps", "10"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train.main([*common, "--out", str(whole)]) == 0
    killed = run_train([*common, "--out", str(resumed)], env={"GPT2_TRAINER_TEST_KILL_AFTER_CHECKPOINT": "5"})
    assert killed.returncode == -signal.SIGKILL
    assert train.main([*common, "--out", str(resumed)]) == 0
    losses = train_losses(whole)
    assert losses[9] < losses[0]
    assert train_losses(resumed) == pytest.approx(losses, abs=1e-3)  # (compiled in another process)
    assert checkpoint.load_model(whole).config.n_layer == 2  # the sharded checkpoint, read whole
