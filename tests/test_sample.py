"""sample.py: what it prints is the model's own continuation, and every mistake is one clear error."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import sample
import train
from conftest import ROOT, save_tiny_hf_gpt2
from model import GPT
from runs import TINY, run_with_stdout_closed
from runtime import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from tokenizer import get_tokenizer

FLAGS = "--device cpu --num-samples 2 --max-new-tokens 8".split()


def printed_samples(out: str) -> list[str]:
    """The texts sample.py printed, each exactly as decoded (newlines included)."""
    return [text.removesuffix("\n") for text in re.split(r"^---- sample \d+ of \d+ ----\n", out, flags=re.M)[1:]]


def run_sample(capsys, *flags: str) -> list[str]:
    assert sample.main([*FLAGS, *flags]) == 0
    texts = printed_samples(capsys.readouterr().out)
    assert len(texts) == 2
    return texts


def continuations(model: GPT, prompt: str, seed: int) -> list[str]:
    """What sample.py's defaults (temperature 1, top-k 50) should print for FLAGS, computed here."""
    tok = get_tokenizer("gpt2")
    idx = torch.tensor([tok.encode(prompt)] * 2)
    out = model.eval().generate(idx, 8, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(seed))
    return [tok.decode(row) for row in out.tolist()]


def test_samples_from_a_hugging_face_directory_are_its_seeded_continuations(hf_gpt2_dir, capsys):
    prompt = "Hello, I'm a language model,"
    first = run_sample(capsys, "--init-from", str(hf_gpt2_dir), "--prompt", prompt, "--seed", "42")
    again = run_sample(capsys, "--init-from", str(hf_gpt2_dir), "--prompt", prompt, "--seed", "42")
    other = run_sample(capsys, "--init-from", str(hf_gpt2_dir), "--prompt", prompt, "--seed", "7")
    assert first == again and first != other
    assert first == continuations(GPT.from_pretrained(str(hf_gpt2_dir)), prompt, 42)
    assert first[0] != first[1]  # two samples, not one printed twice


def test_samples_from_our_checkpoint_use_its_weights(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main([*TINY, "--data", str(tiny_data), "--out", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    texts = run_sample(capsys, "--init-from", str(run), "--prompt", "ROMEO:")
    assert texts == continuations(checkpoint.load_model(run), "ROMEO:", 42)


def test_samples_need_only_the_weights_and_say_which_checkpoint_they_use(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [*TINY, "--data", str(tiny_data), "--out", str(run), "--max-steps", "4", "--checkpoint-every", "2"]
    assert train.main(flags) == 0
    newest, before = (run / "checkpoints" / name for name in ("step_00000004", "step_00000002"))
    for step_dir in (newest, before):  # the optimizer's state, damaged everywhere: no run can resume
        (step_dir / "train_state.pt").write_bytes(b"truncated")
    (newest / "model.safetensors").write_bytes(b"truncated")  # the newest's weights too
    capsys.readouterr()
    assert sample.main([*FLAGS, "--init-from", str(run), "--prompt", "ROMEO:"]) == 0
    printed = capsys.readouterr()
    texts, err = printed_samples(printed.out), printed.err
    assert f"skipping checkpoint {newest}" in err and f"loading {before} (step 2)" in err
    assert texts == continuations(checkpoint.load_model(before), "ROMEO:", 42)


def test_samples_use_the_tokenizer_the_run_was_trained_with(tiny_data, tmp_path, capsys, monkeypatch):
    import json

    import tokenizer

    run = tmp_path / "run"
    assert train.main([*TINY, "--data", str(tiny_data), "--out", str(run), "--max-steps", "2"]) == 0
    meta_path = run / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["tokenizer"] == json.loads((tiny_data / "meta.json").read_text())["tokenizer"]
    meta_path.write_text(json.dumps({**meta, "tokenizer": "the-runs-own"}))  # (meta.json is not in its file list)
    asked = []

    def get_tokenizer(name):
        asked.append(name)
        raise tokenizer.TokenizerError(f"no tokenizer {name}")

    monkeypatch.setattr(tokenizer, "get_tokenizer", get_tokenizer)
    assert sample.main([*FLAGS, "--init-from", str(run)]) == 1
    assert sample.main([*FLAGS, "--init-from", str(run), "--tokenizer", "gpt2"]) == 1
    assert asked == ["the-runs-own", "gpt2"]  # a --tokenizer given still wins


def test_a_sample_with_newlines_is_printed_as_text_not_as_a_repr(hf_gpt2_dir, capsys):
    assert sample.main([*FLAGS, "--init-from", str(hf_gpt2_dir), "--prompt", "First line\nsecond line"]) == 0
    out = capsys.readouterr().out
    assert "First line\nsecond line" in out and "\\n" not in out and "'First" not in out


def test_an_empty_prompt_starts_after_end_of_text_without_printing_it(hf_gpt2_dir, capsys):
    texts = run_sample(capsys, "--init-from", str(hf_gpt2_dir), "--prompt", "")
    tok = get_tokenizer("gpt2")
    idx = torch.tensor([[tok.eot_id]] * 2)
    gen = torch.Generator().manual_seed(42)
    out = GPT.from_pretrained(str(hf_gpt2_dir)).eval().generate(idx, 8, temperature=1.0, top_k=50, generator=gen)
    assert texts == [tok.decode(row[1:]) for row in out.tolist()]
    assert not any(text.startswith("<|endoftext|>") for text in texts)


# ---- a reader that goes away, Ctrl-C: a quiet stop, no traceback ----


def test_a_closed_stdout_stops_quietly_with_the_sigpipe_exit_code(hf_gpt2_dir):
    done = run_with_stdout_closed(["sample.py", *FLAGS, "--init-from", str(hf_gpt2_dir)])
    assert done.returncode == EXIT_BROKEN_PIPE, done.stderr
    assert "Traceback" not in done.stderr and "Broken pipe" not in done.stderr and "error" not in done.stderr


def test_ctrl_c_is_one_line_and_exit_code_130(hf_gpt2_dir):
    # The samples print more than a pipe holds, so sample.py is still printing, blocked on the
    # pipe, when SIGINT comes: it comes after the first line is read and before the rest.
    prompt = "To be, or not to be, that is the question. " * 200
    flags = ["--device", "cpu", "--init-from", str(hf_gpt2_dir), "--num-samples", "200", "--max-new-tokens", "0"]
    with subprocess.Popen(
        [sys.executable, "sample.py", *flags, "--prompt", prompt],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background jobs ignore SIGINT, and Python then installs no handler of its own
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as proc:
        assert proc.stdout.readline().startswith("---- sample 1 of 200 ----")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err


# ---- mistakes: one clear error, exit code 2, no traceback ----


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--num-samples 0", "--num-samples must be >= 1, got 0"),
        ("--max-new-tokens -1", "--max-new-tokens must be >= 0, got -1"),
        ("--top-k -5", "--top-k must be >= 0, got -5"),
        ("--temperature nan", "--temperature must be >= 0 and finite, got nan"),
        ("--temperature inf", "--temperature must be >= 0 and finite, got inf"),
        ("--temperature -0.5", "--temperature must be >= 0 and finite, got -0.5"),
        ("--seed -1", "--seed must be in [0, 2**64), got -1"),
        ("--seed 18446744073709551616", "--seed must be in [0, 2**64)"),
    ],
)
def test_a_flag_out_of_range_is_refused_before_any_work(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "load_pretrained", no_loading)
    assert sample.main(flags.split()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_several_bad_flags_are_all_named(monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "load_pretrained", no_loading)
    assert sample.main("--num-samples 0 --temperature nan".split()) == 2
    err = capsys.readouterr().err
    assert "--num-samples" in err and "--temperature" in err


def no_loading(*args, **kwargs):
    raise AssertionError("the flags should have been refused before any model was loaded")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_a_config_error(hf_gpt2_dir, capsys):
    assert sample.main(["--device", "cuda", "--init-from", str(hf_gpt2_dir)]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda, but torch sees no CUDA GPU")


def never_the_hub(*args, **kwargs):
    raise AssertionError("a path that does not exist must not be looked up on the Hugging Face hub")


@pytest.mark.parametrize("init_from", ["runs/typo", "./typo", "typo", "gpt2-small"])
def test_a_run_path_that_does_not_exist_is_named_at_once(init_from, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(GPT, "from_pretrained", never_the_hub)
    assert sample.main([*FLAGS, "--init-from", init_from]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {init_from} does not exist") and "HINT: " in err
    assert "gpt2, gpt2-medium, gpt2-large, gpt2-xl" in err


def test_a_folder_with_neither_checkpoints_nor_config_json_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    monkeypatch.setattr(GPT, "from_pretrained", never_the_hub)
    assert sample.main([*FLAGS, "--init-from", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'run'} holds no checkpoint") and "config.json" in err


def test_an_unreachable_hub_is_one_error_with_the_offline_hint(monkeypatch, capsys):
    def unreachable(*args, **kwargs):  # what transformers raises once the hub client gives up
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
            "the cached files.\nCheck your internet connection or see how to run the library in offline mode."
        )

    monkeypatch.setattr(GPT, "from_pretrained", unreachable)
    assert sample.main([*FLAGS, "--init-from", "gpt2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not load gpt2 from the Hugging Face hub: We couldn't connect")
    assert err.count("\n") == 2 and "\nHINT: " in err and "HF_HUB_OFFLINE=1" in err


@pytest.mark.slow
def test_an_unreachable_hub_is_a_short_error_in_a_real_process(tmp_path):
    # HF_HUB_OFFLINE makes the hub client fail at once, as it does after its retries without network
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))  # an empty cache
    out = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *"--device cpu --init-from gpt2".split()],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: could not load gpt2 from the Hugging Face hub")
    assert "HINT: " in out.stderr and "HF_HUB_OFFLINE=1" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 3


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys):
    small = save_tiny_hf_gpt2(tmp_path / "small_vocab", vocab_size=1000, n_positions=32, n_layer=1)
    assert sample.main(["--device", "cpu", "--init-from", str(small), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "has 50,257 ids, the model only 1,000" in err and "HINT: pass the --tokenizer" in err
