import copy
import json
import math

import pytest
import torch

import model as model_lib
import train
from conftest import requires_gpu
from runs import TINY, read_metrics, run_train, train_losses


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "gpt5"], "not a preset"),
        (["--total-batch-size", "1000"], "HINT: use a multiple of 128, such as 1024"),
        (["--seq-len", "4096"], "longer than the model's block size"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--grad-clip", "inf"], "--grad-clip must be a finite number"),
        (["--seed", "-1"], "--seed must be in [0, "),
        (["--dist-timeout-min", "-1"], "--dist-timeout-min must be > 0"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--dtype", "fp16"], "fp16 needs CUDA"),
        (["--n-head", "3"], "divisible by n_head"),
        (["--min-lr", "1.0"], "--min-lr must be between"),
        (["--compile-mode", "max-autotune"], "needs torch.compile"),
        (["--compile-scope", "blocks"], "needs torch.compile"),
        (["--activation-checkpointing", "-1"], "--activation-checkpointing must be >= 0"),
        (["--activation-checkpointing", "9"], "--activation-checkpointing 9: the model has 2 blocks"),
        (["--out", "DATA"], "is the --data folder"),
        (["--num-samples", "-1"], "--num-samples must be >= 0"),
        (["--attention", "cudnn"], "--attention cudnn: this kernel does not run on cpu"),
        (["--resume", "runs/no-such-run"], "--resume runs/no-such-run: no such folder"),
    ],
)
def test_bad_configuration_gives_clear_error(tiny_data, tmp_path, capsys, flags, message):
    flags = [str(tiny_data) if flag == "DATA" else flag for flag in flags]
    code = train.main([*TINY, "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--max-steps", "1", *flags])
    assert code == train.EXIT_CONFIG
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any work


def test_zero_samples_trains_and_prints_none(tiny_data, tmp_path, capsys):
    flags = ["--max-steps", "2", "--sample-every", "1", "--num-samples", "0", "--eval-every", "0"]
    assert train.main([*TINY, "--data", str(tiny_data), "--out", str(tmp_path / "run"), *flags]) == 0
    out = capsys.readouterr().out
    assert "step      1 | loss" in out and "---- sample" not in out


def test_warm_up_longer_than_the_run_is_noted(tiny_data, tmp_path, capsys):
    args = [*TINY, "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--max-steps", "2", "--warmup-steps", "5"]
    assert train.main([*args, "--eval-every", "0", "--num-samples", "0"]) == 0
    assert "--warmup-steps 5 >= --max-steps 2: the learning rate never reaches --lr" in capsys.readouterr().out


def test_missing_data_directory_says_what_to_do(tmp_path, capsys):
    code = train.main([*TINY, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert code == train.EXIT_CONFIG  # the user's mistake
    assert "prepare_data.py" in capsys.readouterr().err


def test_only_a_lost_peer_is_taken_for_one():
    from runtime import peer_gone

    assert peer_gone(RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:29500"))
    assert peer_gone(torch.distributed.DistNetworkError("store lost"))
    assert not peer_gone(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert train.learning_rate(0, cfg) == pytest.approx(1e-4)
    assert train.learning_rate(9, cfg) == pytest.approx(1e-3)
    assert train.learning_rate(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert train.learning_rate(110, cfg) == pytest.approx(1e-4)
    lrs = [train.learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


ON_GPU = pytest.param(
    True,
    "cuda",
    id="skip-on-gpu",  # the path train.py takes there: a pinned read-back behind a CUDA event
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@pytest.mark.parametrize(
    "fused, device", [(True, "cpu"), (False, "cpu"), ON_GPU], ids=["skip-on-device", "skip-on-host", "skip-on-gpu"]
)
def test_update_skips_a_nonfinite_step_leaving_weights_and_optimizer_state_unchanged(fused, device):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler(device, enabled=False)

    def step(loss_sum: float) -> list[float]:
        net(torch.randn(5, 4, device=device)).square().mean().backward()
        # [loss, stop, grad norm], as step_status gives
        status = torch.tensor([loss_sum, 0.0, 1.5], device=device)
        values = train.update(optimizer, scaler, status)
        optimizer.zero_grad(set_to_none=True)
        return values

    assert step(2.0) == [2.0, 0.0, 1.5]
    weights, state = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    values = step(float("nan"))
    assert math.isnan(values[0])
    for key, value in net.state_dict().items():
        assert torch.equal(value, weights[key]), key
    after = optimizer.state_dict()["state"]
    for i, param_state in state["state"].items():
        for key, value in param_state.items():
            assert torch.equal(after[i][key], value), (i, key)
    step(2.0)  # a finite step updates again, and counts from where the skipped one left off
    assert not torch.equal(net.weight, weights["weight"])
    assert all(s["step"].item() == 2 for s in optimizer.state_dict()["state"].values())


def test_loss_falls_from_log_vocab_and_metrics_parse(tiny_data, tmp_path):
    run = tmp_path / "run"
    code = train.main(
        [
            *TINY,
            "--data",
            str(tiny_data),
            "--out",
            str(run),
            "--max-steps",
            "60",
            "--eval-every",
            "30",
            "--checkpoint-every",
            "0",
        ]
    )
    assert code == 0
    records = read_metrics(run)
    assert records[0]["type"] == "run" and records[0]["config"]["max_steps"] == 60 and records[0]["world_size"] == 1
    losses = train_losses(run)
    assert sorted(losses) == list(range(60))
    assert abs(losses[0] - math.log(50257)) < 0.5
    assert min(losses[s] for s in range(50, 60)) < losses[0] - 3.0
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30, 60] and evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0
    train_record = next(r for r in records if r["type"] == "train")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "ms", "data_ms"} <= set(train_record)
    for r in records:
        if r["type"] == "train":  # a step's time includes loading its batch, and gives its tokens/s
            assert 0 < r["data_ms"] < r["ms"]
            assert r["tokens_per_sec"] == pytest.approx(4 * 32 / (r["ms"] / 1000))
    assert json.loads((run / "config.json").read_text())["max_steps"] == 60


@pytest.mark.parametrize(
    "options", [["--no-fused-loss"], ["--fused-loss", "--activation-checkpointing", "1"]], ids=["plain", "fused"]
)
def test_two_processes_match_one_process_with_double_accumulation(tiny_data, tmp_path, options):
    common = [
        *TINY,
        *options,
        "--data",
        str(tiny_data),
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "0",
        "--total-batch-size",
        str(4 * 32 * 2),
    ]
    single = train.main([*common, "--out", str(tmp_path / "one")])
    assert single == 0
    double = run_train([*common, "--out", str(tmp_path / "two")], nproc=2)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(6))
    for step in one:
        assert one[step] == pytest.approx(two[step], abs=1e-5)
    val_one = [r["val_loss"] for r in read_metrics(tmp_path / "one") if r["type"] == "eval"]
    val_two = [r["val_loss"] for r in read_metrics(tmp_path / "two") if r["type"] == "eval"]
    assert val_one == pytest.approx(val_two, abs=1e-5)
    assert "world_size" in read_metrics(tmp_path / "two")[0] and read_metrics(tmp_path / "two")[0]["world_size"] == 2


def test_compile_scope_blocks_shares_one_block_graph_and_matches_eager(monkeypatch):
    """Each block and the output half are compiled apart; the blocks are alike, so dynamo traces
    one graph for all of them and the output half another. Traced through AOTAutograd without
    code generation, which keeps it fast; the slow test below trains with the real compiler."""
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend=counting_backend, **kw))
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = model_lib.GPT(model_lib.config_from_preset("tiny", n_layer=3))
    eager.fused_loss, eager.activation_checkpointing = True, 1
    compiled = copy.deepcopy(eager)
    assert model_lib.compile_model(compiled, "default", "blocks") is compiled  # compiled in place
    idx = torch.randint(0, 50257, (2, 32))
    losses = []
    for model in (eager, compiled):
        loss = model(idx, idx)[1]
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p_eager), (_, p_compiled) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert len(graphs) == 2
    # the weights are the module's own: checkpoints made from it load into a plain GPT
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_plot_writes_png(tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert train.main([*TINY, "--data", str(tiny_data), "--out", str(run), "--max-steps", "3"]) == 0
    png = tmp_path / "loss.png"
    import plot

    assert plot.main([str(run), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@requires_gpu
def test_compiled_bf16_run_on_gpu_with_eval_and_samples(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [a for a in TINY if a not in ("--device", "cpu", "--no-compile")]
    code = train.main(
        [
            *flags,
            "--device",
            "cuda",
            "--compile",
            "--dtype",
            "bf16",
            "--data",
            str(tiny_data),
            "--out",
            str(run),
            "--max-steps",
            "20",
            "--eval-every",
            "10",
            "--sample-every",
            "10",
        ]
    )
    assert code == 0
    assert "---- sample" in capsys.readouterr().out
    losses = train_losses(run)
    assert losses[19] < losses[0]


@pytest.mark.slow
def test_compiled_run_matches_eager_loss_curve(tiny_data, tmp_path):
    """The optimised paths (torch.compile, and with it the fused loss and activation
    checkpointing) train like the plain one: same seed, same data, losses within a small
    tolerance over a couple of hundred steps."""
    common = [
        *[a for a in TINY if a != "--no-compile"],
        "--data",
        str(tiny_data),
        "--max-steps",
        "200",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
        "--no-fused-loss",
    ]
    assert train.main([*common, "--out", str(tmp_path / "eager"), "--no-compile"]) == 0
    assert train.main([*common, "--out", str(tmp_path / "compiled"), "--compile"]) == 0
    fused = ["--compile", "--fused-loss", "--activation-checkpointing", "1"]
    assert train.main([*common, "--out", str(tmp_path / "compiled_fused"), *fused]) == 0
    assert train.main([*common, "--out", str(tmp_path / "blocks_fused"), *fused, "--compile-scope", "blocks"]) == 0
    eager = train_losses(tmp_path / "eager")
    assert eager[199] < eager[0] - 3.0
    for name in ("compiled", "compiled_fused", "blocks_fused"):
        optimised = train_losses(tmp_path / name)
        assert sorted(eager) == sorted(optimised) == list(range(200))
        # Early steps agree to rounding; later, rounding differences compound as in any two
        # runs on different kernels, so the curves are compared over 20-step windows.
        for step in range(30):
            assert optimised[step] == pytest.approx(eager[step], abs=1e-3), (name, step)
        for start in range(0, 200, 20):
            window = range(start, start + 20)
            mean_eager, mean_optimised = (sum(run[s] for s in window) / 20 for run in (eager, optimised))
            assert mean_optimised == pytest.approx(mean_eager, abs=0.05), (name, start)


def test_memory_and_speed_options_keep_the_loss_curve(tiny_data, tmp_path):
    """Fused loss, activation checkpointing and a fixed attention kernel change how the step
    is computed, not what: same seed and data, the same losses to rounding."""
    common = [*TINY, "--data", str(tiny_data), "--max-steps", "100", "--eval-every", "0", "--checkpoint-every", "0"]
    # dropout on: checkpointed blocks must replay the same masks (the CPU flash kernel has no dropout)
    options = ["--fused-loss", "--activation-checkpointing", "1", "--attention", "math", "--dropout", "0.1"]
    assert train.main([*common, "--no-fused-loss", "--dropout", "0.1", "--out", str(tmp_path / "plain")]) == 0
    assert train.main([*common, *options, "--out", str(tmp_path / "optimised")]) == 0
    plain, optimised = train_losses(tmp_path / "plain"), train_losses(tmp_path / "optimised")
    assert sorted(plain) == sorted(optimised) == list(range(100))
    for step in range(30):
        assert optimised[step] == pytest.approx(plain[step], abs=1e-3), step
    for start in range(0, 100, 20):
        window = range(start, start + 20)
        assert sum(optimised[s] for s in window) / 20 == pytest.approx(sum(plain[s] for s in window) / 20, abs=0.02)
    assert plain[99] < plain[0] - 2.0


@requires_gpu
def test_memory_and_speed_options_keep_the_loss_curve_on_gpu(tiny_data, tmp_path):
    flags = [a for a in TINY if a not in ("--device", "cpu", "--no-compile")]
    common = [*flags, "--device", "cuda", "--compile", "--dtype", "bf16", "--data", str(tiny_data)]
    common += ["--max-steps", "100", "--eval-every", "50", "--checkpoint-every", "0"]
    variants = {
        "memory": "--fused-loss --activation-checkpointing 1 --compile-scope blocks --attention flash".split(),
        "cudnn": "--no-fused-loss --attention cudnn".split(),  # the kernel of the fastest 124M configuration
    }
    assert train.main([*common, "--no-fused-loss", "--out", str(tmp_path / "plain")]) == 0
    plain = train_losses(tmp_path / "plain")
    assert plain[99] < plain[0] - 2.0
    for name, options in variants.items():
        assert train.main([*common, *options, "--out", str(tmp_path / name)]) == 0
        optimised = train_losses(tmp_path / name)
        for start in range(0, 100, 20):
            window = range(start, start + 20)
            mean_plain = sum(plain[s] for s in window) / 20
            assert sum(optimised[s] for s in window) / 20 == pytest.approx(mean_plain, abs=0.05), (name, start)


@pytest.mark.parametrize("flags, fused", [([], True), (["--no-fused-loss"], False), (["--fused-loss"], True)])
def test_fused_loss_is_the_default_and_can_be_turned_off(tiny_data, tmp_path, capsys, flags, fused):
    common = [*TINY, "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--max-steps", "1", "--eval-every", "0"]
    assert train.main([*common, *flags]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("run directory") and ("fused loss" in first_line) == fused


def test_hellaswag_in_the_loop_logs_accuracy(tiny_data, tmp_path):
    items = [
        {
            "ctx": f"A man opens the door number {i} and",
            "label": i % 4,
            "endings": ["walks in.", "sings a song.", "closes it again.", "looks at the sky."],
        }
        for i in range(6)
    ]
    data_file = tmp_path / "hellaswag.jsonl"
    data_file.write_text("".join(json.dumps(item) + "\n" for item in items))
    run = tmp_path / "run"
    args = f"--data {tiny_data} --out {run} --max-steps 4 --hellaswag-every 2 --hellaswag-file {data_file}"
    assert train.main([*TINY, *args.split(), *"--hellaswag-limit 5 --eval-every 0".split()]) == 0
    records = [r for r in read_metrics(run) if r["type"] == "hellaswag"]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(r["hellaswag_examples"] == 5 for r in records)
    # the last record is of the final weights: the same items scored apart give the same accuracies
    import checkpoint
    import hellaswag

    final = hellaswag.evaluate(checkpoint.load_model(run).eval(), items[:5], torch.device("cpu"), batch_size=2)
    assert (records[-1]["hellaswag_acc"], records[-1]["hellaswag_acc_norm"]) == (final["acc"], final["acc_norm"])


def test_default_run_offline_says_how_to_give_a_corpus(tmp_path, monkeypatch, capsys):
    import requests

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2_TRAINER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(requests, "get", offline)
    assert train.main(["--max-steps", "1"]) == train.EXIT_ERROR
    err = capsys.readouterr().err
    assert "could not download tinyshakespeare" in err and "python prepare_data.py path/to/input.txt" in err
    assert not (tmp_path / "data" / "tinyshakespeare" / "meta.json").exists()


def test_default_run_prepares_tinyshakespeare_and_prints_samples(tmp_path, monkeypatch, capsys):
    import shutil

    from conftest import shared_file

    cache = tmp_path / "cache"
    (cache / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(shared_file("tinyshakespeare/input.txt"), cache / "tinyshakespeare" / "input.txt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2_TRAINER_CACHE", str(cache))  # the download is already cached
    assert train.main(["--max-steps", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "data" / "tinyshakespeare" / "meta.json").is_file()
    assert sorted(train_losses(tmp_path / "runs" / "tinyshakespeare")) == [0, 1]
    assert capsys.readouterr().out.count("---- sample ") == 2


def test_fine_tune_from_hugging_face_weights(hf_gpt2_dir, tiny_data, tmp_path, capsys):
    from model import GPT

    run = tmp_path / "run"
    args = [*TINY, "--data", str(tiny_data), "--out", str(run), "--max-steps", "3", "--init-from", str(hf_gpt2_dir)]
    assert train.main(args) == 0
    assert "--n-layer, --n-head, --n-embd ignored" in capsys.readouterr().out
    records = read_metrics(run)
    assert records[0]["config"]["init_from"] == str(hf_gpt2_dir)
    import checkpoint

    tuned = checkpoint.load_model(run)
    source = GPT.from_pretrained(str(hf_gpt2_dir))
    assert tuned.config.n_embd == source.config.n_embd == 32  # the HF shape, not the --n-embd flag
    assert tuned.config.block_size == 64


def test_wandb_receives_the_same_metrics(tiny_data, tmp_path, monkeypatch):
    import sys
    import types

    logged, inits = [], []

    class FakeRun:
        finished = False

        def log(self, values, step):
            assert not self.finished
            logged.append((step, values))

        def finish(self):
            self.finished = True

    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or runs.append(FakeRun()) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    args = [*TINY, "--data", str(tiny_data), "--out", str(run), "--max-steps", "3", "--wandb", "my-project"]
    assert train.main(args) == 0
    assert inits[0]["project"] == "my-project" and inits[0]["config"]["max_steps"] == 3
    train_steps = [(step, v["loss"]) for step, v in logged if "loss" in v]
    assert train_steps == sorted(train_losses(run).items())
    assert runs[0].finished  # the W&B run is closed with the metrics file


def test_wandb_missing_package_is_a_clear_error(tiny_data, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    args = [*TINY, "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--wandb", "p"]
    assert train.main(args) == train.EXIT_CONFIG
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # failed before any work


def test_help_shows_each_flags_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps to train for (default: 300)" in text and "peak learning rate (default: 0.001)" in text
