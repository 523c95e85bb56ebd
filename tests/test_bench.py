import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import kernels
from bench import step as bench_step
from conftest import ROOT, requires_gpu

SMALL = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--steps", "2", "--warmup", "1"]


def script_env(**settings: str) -> dict[str, str]:
    """bench/gpu.sh's environment: these settings, and this interpreter, whatever python3 on PATH is."""
    return {**os.environ, "PYTHON": sys.executable, **settings}


def test_json_rows_carry_the_figures_and_the_variant(capsys, tmp_path):
    flags = ["--no-compile", "--fused-loss", "--activation-checkpointing", "2", "--attention", "math", "--json"]
    flags += ["--pad-vocab", "1", "--no-fused-adamw", "--save", str(tmp_path / "rows.jsonl")]
    assert bench_step.main([*SMALL, "--batch-size", "1", "2", *flags]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["pad_vocab"] == 1 and r["fused_adamw"] is False for r in rows)
    for row in rows:
        assert row["tokens_per_sec"] > 0 and row["step_ms"] > 0
        # both figures are rounded (tokens/s to an integer)
        assert row["tokens_per_sec"] == pytest.approx(row["batch_size"] * 32 / (row["step_ms"] / 1000), rel=0.01, abs=1)
        assert (row["fused_loss"], row["activation_checkpointing"], row["attention"]) == (True, 2, "math")
        assert row["mfu"] is None and row["peak_mem_gib"] is None  # no GPU: no peak FLOP/s, no CUDA memory


def test_a_step_accumulates_grad_accum_micro_batches_before_one_optimizer_step(monkeypatch, capsys):
    calls = {"forward": 0, "optimizer": 0}

    def count(name: str):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    real_build = bench_step.build_model

    def counting_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_hook(count("forward"))
        real_configure = model.configure_optimizers

        def configure(*args, **kwargs):
            optimizer = real_configure(*args, **kwargs)
            optimizer.register_step_post_hook(count("optimizer"))
            return optimizer

        model.configure_optimizers = configure
        return model

    monkeypatch.setattr(bench_step, "build_model", counting_build)
    assert bench_step.main([*SMALL, "--no-compile", "--grad-accum", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert calls == {"forward": 3 * 3, "optimizer": 3}  # three steps: the first (warm-up 1) and two timed
    assert row["grad_accum"] == 3
    # tokens/s counts every micro-batch of the step
    assert row["tokens_per_sec"] == pytest.approx(3 * 2 * 32 / (row["step_ms"] / 1000), rel=0.01, abs=1)


def test_grad_accum_below_one_is_refused():
    with pytest.raises(SystemExit) as exc:
        bench_step.main([*SMALL, "--no-compile", "--grad-accum", "0"])
    assert exc.value.code == 2


def test_table_row_names_the_configuration(capsys):
    assert bench_step.main([*SMALL, "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "B=  2 T=32" in out and "tok/s" in out and "compile=off" in out


def test_unavailable_attention_kernel_is_a_clear_error(capsys):
    assert bench_step.main([*SMALL, "--no-compile", "--attention", "efficient"]) == 2
    assert "--attention efficient: this kernel does not run on cpu" in capsys.readouterr().err


def test_compile_mode_without_compile_is_refused():
    with pytest.raises(SystemExit) as exc:
        bench_step.main([*SMALL, "--no-compile", "--compile-mode", "max-autotune"])
    assert exc.value.code == 2


def test_compile_scope_without_compile_is_refused():
    with pytest.raises(SystemExit) as exc:
        bench_step.main([*SMALL, "--no-compile", "--compile-scope", "blocks"])
    assert exc.value.code == 2


def test_each_batch_size_is_compiled_with_static_shapes(monkeypatch, capsys):
    """Batch sizes timed one after the other in one process must each get the static graph a
    training run would get: dynamo, seeing the batch dimension change, would otherwise compile
    a graph with a symbolic batch size for the second and reuse it for the third."""
    dynamic = []

    def recording_backend(gm, example_inputs):
        dims = [d for t in example_inputs if isinstance(t, torch.Tensor) for d in t.shape]
        dynamic.append(any(isinstance(v, torch.SymInt) for v in [*example_inputs, *dims]))
        return gm.forward

    monkeypatch.setattr(
        bench_step, "compile_model", lambda model, mode, scope: torch.compile(model, backend=recording_backend)
    )
    assert bench_step.main([*SMALL, "--batch-size", "1", "2", "3", "--compile", "--no-fused-loss", "--json"]) == 0
    assert [json.loads(line)["batch_size"] for line in capsys.readouterr().out.splitlines()] == [1, 2, 3]
    assert dynamic == [False, False, False]


def test_gpu_script_runs_its_overhead_item_on_a_cpu(tiny_data, tmp_path):
    """bench/gpu.sh runs for real only on a GPU machine; its plumbing is checked here with the
    tiny preset so that it does not rot in between. The results folder holds only the few files
    a remote machine is to send back."""
    logs, scratch = tmp_path / "logs", tmp_path / "scratch"
    env = script_env(LOGS=str(logs), SCRATCH=str(scratch), MODEL="tiny", SEQ="32", BATCH="2", DATA=str(tiny_data))
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "overhead"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loop overhead" in result.stdout and "=== overhead took" in result.stdout
    assert "=== items\noverhead: took" in result.stdout and "=== results" in result.stdout  # the closing tables
    rows = [json.loads(line) for line in (logs / "results.jsonl").read_text().splitlines()]
    assert rows[-1]["model"] == "tiny" and rows[-1]["batch_size"] == 2 and rows[-1]["seq_len"] == 32
    assert rows[-1]["fused_loss"] is False  # the loss train.py was given: like is compared with like
    assert (logs / "bench_gpu.log").read_text().count("loop overhead") == 1
    assert sorted(p.name for p in logs.iterdir()) == ["bench_gpu.log", "overhead_metrics.jsonl", "results.jsonl"]
    assert (scratch / "overhead_run" / "metrics.jsonl").is_file()


def test_gpu_script_refuses_an_unknown_item_before_running_any(tmp_path):
    env = script_env(LOGS=str(tmp_path))
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "gpt2", "nosuch"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown item nosuch" in result.stderr
    assert not (tmp_path / "bench_gpu.log").exists()


def test_gpu_script_starts_only_the_items_that_fit_its_budget(tmp_path):
    """With BUDGET_S an item starts only if its estimate fits in what is left: here env (10 s)
    runs and gpt2 (35 s) is skipped and said to be, not started and then cut off at the deadline."""
    env = script_env(LOGS=str(tmp_path), BUDGET_S="30")
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "env", "gpt2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "=== env took" in result.stdout and "torch" in (tmp_path / "bench_gpu.log").read_text()
    assert "=== gpt2 skipped: expected to take 35 s" in result.stdout
    assert "gpt2: skipped" in result.stdout.split("=== items")[1]
    assert not (tmp_path / "results.jsonl").exists()


def test_gpu_script_stops_a_command_still_running_when_the_budget_is_spent(tmp_path):
    """An estimate can be wrong: a command that outlives the budget is stopped, and the closing
    tables are still printed. (An interpreter that takes 60 s to start stands in for a slow item.)"""
    slow = tmp_path / "slow_python"
    slow.write_text(f'#!/bin/bash\nsleep 60\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    env = {**script_env(LOGS=str(tmp_path / "logs"), BUDGET_S="12"), "PYTHON": str(slow)}
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "env"], env=env, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - started < 40
    assert result.returncode == 1 and "FAILED (exit 124)" in result.stdout
    assert "=== items\nenv: FAILED" in result.stdout


def test_gpu_script_overhead_item_stops_where_train_py_fails(tmp_path):
    env = script_env(LOGS=str(tmp_path / "logs"), MODEL="tiny", SEQ="32", BATCH="2", DATA=str(tmp_path / "nodata"))
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "overhead"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "FAILED (exit 2)" in result.stdout  # (a missing --data: the user's mistake)
    assert not (tmp_path / "logs" / "results.jsonl").exists()  # no benchmark run for nothing


def test_activation_memory_counts_less_with_each_memory_option(capsys):
    base = ["--model", "tiny", "--seq-len", "128", "--device", "cpu", "--activation-memory", "--json"]
    per_sequence = {}
    for name, flags in {
        "plain": ["--no-fused-loss"],
        "fused": ["--fused-loss"],
        "checkpointed": ["--no-fused-loss", "--activation-checkpointing", "1"],
    }.items():
        assert bench_step.main([*base, *flags]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["model"] == "tiny" and row["weights_grads_adam_gib"] > 0
        per_sequence[name] = row["per_sequence_mib"]
    # the plain loss alone keeps 128 x 50,304 fp32 log-probabilities per sequence (24.6 MiB)
    assert per_sequence["plain"] - per_sequence["fused"] >= 128 * 50304 * 4 / 2**20
    assert 0 < per_sequence["checkpointed"] < per_sequence["plain"]


def test_sequence_length_defaults_to_the_presets_block_size(capsys):
    # tiny's block size is 128; a fixed default of 1024 would not fit it
    assert (
        bench_step.main(["--model", "tiny", "--batch-size", "1", "--device", "cpu", "--steps", "1", "--warmup", "1"])
        == 0
    )
    assert "T=128" in capsys.readouterr().out


def test_benchmarks_run_as_modules_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "bench.step", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "usage: python -m bench.step" in result.stdout


def test_a_device_that_is_not_there_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_step.main([*SMALL, "--device", "nosuch"])
    assert exc.value.code == 2 and "--device 'nosuch'" in capsys.readouterr().err


def test_hellaswag_benchmark_names_a_missing_data_file_with_a_hint(tmp_path, capsys):
    from bench import hellaswag as bench_hellaswag

    missing = tmp_path / "absent.jsonl"
    assert bench_hellaswag.main(["--device", "cpu", "--data-file", str(missing), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--data-file {missing}" in err and "HINT:" in err


@pytest.mark.parametrize(
    "name, kind",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
        ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT", "matmul"),
        ("triton_tem_fused_mm_0", "matmul"),
        ("aten::addmm", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
        ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
        ("triton_per_fused_add_native_layer_norm_3", "generated by torch.compile"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            "optimizer and clipping",
        ),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "communication"),
        ("Memcpy HtoD (Pinned -> Device)", "copies and fills"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ],
)
def test_kernels_are_sorted_into_kinds_by_name(name, kind):
    assert kernels.kind_of(name) == kind


def test_profile_counts_each_operator_once_per_call_in_a_step():
    """One optimizer step a step, and the fused loss once per micro-batch: the profiler's events
    are counted per step, not per profiled run or per nested call."""
    opts = bench_step.StepOptions(grad_accum=3, fused_loss=True)
    step, _, _ = bench_step.make_step("tiny", 2, 32, torch.device("cpu"), opts)
    step()  # warm-up, as bench_one does before profiling
    calls = {k.name: k.calls_per_step for k in kernels.profile_steps(step, torch.device("cpu"), 2)}
    assert calls["Optimizer.step#AdamW.step"] == 1
    assert calls["aten::_fused_adamw_"] == 2  # once for each parameter group: decayed, not decayed
    assert calls["_LinearCrossEntropy"] == calls["_LinearCrossEntropyBackward"] == 3


def test_profile_flag_prints_and_saves_where_the_time_goes(capsys, tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    assert bench_step.main([*SMALL, "--no-compile", "--profile", "1", "--save", str(rows_file)]) == 0
    out = capsys.readouterr().out
    assert "where the time goes (1 profiled step(s)" in out and "aten::mm" in out
    profile = json.loads(rows_file.read_text())["profile"]
    assert profile["ms_by_kind"]["matmul"] > 0
    assert profile["idle_ms"] is None  # on a CPU the operators run on the host: no device idle time
    assert "kernels" not in json.loads(rows_file.read_text())  # the full list is printed, not saved


@requires_gpu
def test_profile_on_a_gpu_finds_the_matmuls_attention_and_generated_kernels():
    result = bench_step.bench_one(
        "tiny", 8, 128, 3, 2, torch.device("cuda"), bench_step.StepOptions(compile=True), profile_steps=2
    )
    kinds = result["profile"]["ms_by_kind"]
    assert kinds["matmul"] > 0 and kinds["attention"] > 0 and kinds["generated by torch.compile"] > 0
    assert result["profile"]["idle_ms"] is not None
    # the kernels' time fits in the steps they ran in (one stream: they do not overlap)
    assert sum(kinds.values()) < 1.2 * result["step_ms"]


def test_generate_benchmark_gives_both_speeds_and_the_same_tokens_in_fp32(capsys):
    from bench import generate as bench_generate

    assert bench_generate.main(["--model", "tiny", "--tokens", "6", "--batch-size", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "12 tokens with the cache" in out and "12 tokens without it" in out
    assert "the same tokens: yes (float32)" in out


def no_timing(*args, **kwargs):
    raise AssertionError("the flags should have been refused before anything was timed")


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--batch-size 0", "--batch-size must be >= 1, got 0"),
        ("--batch-size 2 -1", "--batch-size must be >= 1, got -1"),
        ("--seq-len 0", "--seq-len must be >= 1, got 0"),
        ("--seq-len 4096", "--seq-len 4096 is longer than the block size of tiny (128). HINT: use --seq-len 128"),
        ("--save nowhere/rows.jsonl", "--save nowhere/rows.jsonl: cannot write there"),
    ],
)
def test_step_benchmark_refuses_a_flag_that_cannot_work_before_timing(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_step, "bench_one", no_timing)
    with pytest.raises(SystemExit) as exc:
        bench_step.main(["--model", "tiny", "--device", "cpu", "--no-compile", *flags.split()])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_data_benchmark_shows_its_default_corpus_and_refuses_a_missing_one(tmp_path, monkeypatch, capsys):
    from bench import data as bench_data

    absent = tmp_path / "gutenberg"
    monkeypatch.setattr(bench_data, "DEFAULT_CORPUS", absent)
    with pytest.raises(SystemExit) as exc:
        bench_data.main(["--help"])
    # (argparse wraps the help at spaces and hyphens; the path is compared without them)
    assert exc.value.code == 0 and f"(default:{absent}" in "".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exc:
        bench_data.main([])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"no corpus at {absent} (the default --corpus)" in err and "HINT: " in err
    assert "Traceback" not in err
