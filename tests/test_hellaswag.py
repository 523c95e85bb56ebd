"""HellaSwag scoring: rendering, batch- and rank-invariance, the Hugging Face path, the download cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import hellaswag
from conftest import ROOT, SHARED_DATA, FakeResponse, requires_gpu, save_tiny_hf_gpt2
from hellaswag import HELLASWAG_VAL_EXAMPLES, evaluate, evaluate_one_at_a_time, load_examples, render_example
from model import GPT, GPTConfig
from runs import run_with_stdout_closed, spawn_gloo
from runtime import EXIT_BROKEN_PIPE
from tokenizer import get_tokenizer

SHARED_FILE = SHARED_DATA / "hellaswag" / "hellaswag_val_derived.jsonl"
N_ITEMS = 64  # of the shared file, when present: enough for several batches, quick on a CPU

HANDFUL = [
    {
        "ctx": "A man fills a kettle at the sink. He",
        "endings": [
            "puts it on the stove and lights the burner.",
            "throws the kettle into the garden.",
            "paints the kettle blue.",
            "sings to the sink.",
        ],
        "label": 0,
    },
    {
        "ctx": "A girl ties her running shoes on the porch. She",
        "endings": ["eats the laces.", "jogs down the street.", "falls asleep in the shoes.", "reads a shoe."],
        "label": 1,
    },
    {
        "ctx": "Two people carry a canoe to the edge of a lake. They",
        "endings": ["bury it.", "set it in the water and climb in.", "fold it in half.", "ask it a question."],
        "label": 1,
    },
    {
        "ctx": "A chef slices onions on a wooden board. The chef",
        "endings": ["cries into a bucket.", "drives away.", "sweeps the onions into a hot pan.", "plants a tree."],
        "label": 2,
    },
    {
        "ctx": "A boy kicks a ball against a wall over and over. The ball",
        "endings": ["turns into a bird.", "melts.", "writes a letter.", "bounces back to his feet each time."],
        "label": 3,
    },
    {
        "ctx": "A woman opens an umbrella as the rain starts. She",
        "endings": ["walks on with the umbrella over her head.", "eats the umbrella.", "swims.", "sells the rain."],
        "label": 0,
    },
    {
        "ctx": "A mechanic slides under a car on a creeper. He",
        "endings": ["bakes bread.", "loosens the drain plug and the oil runs out.", "flies off.", "counts sheep."],
        "label": 1,
    },
    {
        "ctx": "A child holds a kite as the wind picks up. The kite",
        "endings": ["sinks.", "barks.", "is ironed flat.", "lifts into the air and tugs at the string."],
        "label": 3,
    },
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """The shared copy of the validation split when present, else a handful of items written here."""
    if SHARED_FILE.is_file():
        return SHARED_FILE
    path = tmp_path_factory.mktemp("hellaswag") / "handful.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in HANDFUL))
    return path


@pytest.fixture(scope="module")
def examples(data_file) -> list[dict]:
    return load_examples(data_file, limit=N_ITEMS)


class FoldedTokenizer:
    """GPT-2 BPE with ids folded into 1,021: real token counts, but a tiny model's logits stay small."""

    vocab_size = 1021

    def __init__(self):
        self.gpt2 = get_tokenizer("gpt2")

    def encode(self, text: str) -> list[int]:
        return [t % self.vocab_size for t in self.gpt2.encode(text)]


def tiny_model() -> GPT:
    # block_size 64 is shorter than some HellaSwag rows (up to 149 tokens): truncation is exercised
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=FoldedTokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64))


@pytest.fixture(scope="module")
def folded() -> FoldedTokenizer:
    return FoldedTokenizer()


# ---- rendering ----


def test_render_example_appends_each_ending_after_a_space():
    tok = get_tokenizer("gpt2")
    example = HANDFUL[0]
    tokens, mask, label = render_example(example, tok)
    ctx = tok.encode(example["ctx"])
    endings = [tok.encode(" " + e) for e in example["endings"]]
    L = len(ctx) + max(len(e) for e in endings)
    assert label == 0
    assert tokens.shape == mask.shape == (4, L)
    for i, ending in enumerate(endings):
        n = len(ctx) + len(ending)
        assert tokens[i, :n].tolist() == ctx + ending
        assert tokens[i, n:].tolist() == [0] * (L - n)  # right padding
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(ending) + [0] * (L - n)
        assert tok.decode(tokens[i, mask[i] == 1].tolist()) == " " + example["endings"][i]
    assert tok.decode(tokens[0, : len(ctx)].tolist()) == example["ctx"]


def test_rows_longer_than_the_window_lose_just_enough_context_from_the_left():
    tok = get_tokenizer("gpt2")
    example = {"ctx": " ".join(["word"] * 50) + " and then", "endings": ["it ends here."] * 4, "label": 2}
    ctx, ending = tok.encode(example["ctx"]), tok.encode(" it ends here.")
    tokens, mask, _ = render_example(example, tok, block_size=20)
    # 21 tokens are 20 inputs (the last token is only a target): the window is full, not cut short
    assert tokens.shape == (4, 21)
    assert tokens[0].tolist() == ctx[-(21 - len(ending)) :] + ending
    assert mask[0].tolist() == [0] * (21 - len(ending)) + [1] * len(ending)


# ---- scoring ----


def test_batched_evaluation_matches_one_at_a_time_loop(examples, folded):
    model = tiny_model()
    model.train()
    batched = evaluate(model, examples, "cpu", batch_size=16, tokenizer=folded)
    assert model.training  # evaluate hands the model back in the mode it found it
    reference = evaluate_one_at_a_time(model, examples, "cpu", tokenizer=folded)
    assert batched == reference
    assert batched["num_examples"] == len(examples)


def test_accuracy_is_the_same_for_batch_size_1_and_32(examples, folded):
    model = tiny_model()
    one = evaluate(model, examples, "cpu", batch_size=1, tokenizer=folded)
    many = evaluate(model, examples, "cpu", batch_size=32, tokenizer=folded)
    assert one == many


def _evaluate_on_rank(rank: int, world_size: int, weights: str, data_file: str, out_dir: str) -> None:
    model = tiny_model()
    model.load_state_dict(torch.load(weights))
    examples = load_examples(data_file, limit=N_ITEMS)
    result = evaluate(model, examples, "cpu", 8, rank, world_size, tokenizer=FoldedTokenizer())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_accuracy_is_the_same_for_one_and_two_gloo_processes(tmp_path, data_file, examples, folded):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    single = evaluate(model, examples, "cpu", batch_size=8, tokenizer=folded)
    spawn_gloo(_evaluate_on_rank, 2, tmp_path, str(tmp_path / "weights.pt"), str(data_file), str(tmp_path))
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single


# ---- Hugging Face models ----


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """The tiny Hugging Face GPT-2 with a window of 256, room for any HellaSwag item: the
    reference below runs Hugging Face's forward pass on whole rows, never cut to a window."""
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2"), n_positions=256)


def _accuracy_from_hf_logits(hf_model, examples: list[dict]) -> dict:
    """The definition, written out once more on Hugging Face's own forward pass."""
    tok = get_tokenizer("gpt2")
    correct = correct_norm = 0
    for example in examples:
        ctx = tok.encode(example["ctx"])
        sums, means = [], []
        for ending in example["endings"]:
            ids = torch.tensor([ctx + tok.encode(" " + ending)])
            with torch.no_grad():
                logprobs = hf_model(ids).logits[0, :-1].float().log_softmax(dim=-1)
            token_logprobs = logprobs.gather(1, ids[0, 1:, None])[len(ctx) - 1 :, 0]
            sums.append(-token_logprobs.sum())
            means.append(-token_logprobs.mean())
        correct += int(torch.stack(sums).argmin()) == example["label"]
        correct_norm += int(torch.stack(means).argmin()) == example["label"]
    return {"acc": correct / len(examples), "acc_norm": correct_norm / len(examples), "num_examples": len(examples)}


def test_hf_directory_through_cli_matches_from_pretrained(hf_dir, data_file, capsys):
    from transformers import GPT2LMHeadModel

    source = ["--model_type", str(hf_dir), "--data-file", str(data_file)]
    cli = hellaswag.run([*source, *"--device cpu --limit 16 --batch-size 4 --json".split()])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == cli
    examples = load_examples(data_file, limit=16)
    ours = evaluate(GPT.from_pretrained(str(hf_dir)), examples, "cpu", batch_size=4)
    assert cli == ours
    assert ours == _accuracy_from_hf_logits(GPT2LMHeadModel.from_pretrained(hf_dir).eval(), examples)


def test_checkpoint_through_cli_matches_evaluate(tmp_path, data_file, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=32))
    run_dir = tmp_path / "run"
    checkpoint.save_checkpoint(run_dir, 5, model, {}, {})
    source = ["--checkpoint", str(run_dir), "--data-file", str(data_file)]
    cli = hellaswag.run([*source, *"--device cpu --limit 16 --batch-size 4".split()])
    assert cli == evaluate(model, load_examples(data_file, limit=16), "cpu", batch_size=4)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"hellaswag {run_dir}: 16 items, acc {cli['acc']:.4f}, acc_norm {cli['acc_norm']:.4f} (")


@pytest.mark.slow
def test_cli_under_torchrun_with_two_processes_matches_one(hf_dir, data_file, tmp_path):
    common = ["--model_type", str(hf_dir), "--data-file", str(data_file)]
    common += "--device cpu --limit 40 --batch-size 4 --json".split()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = subprocess.run(
        [*torchrun, str(ROOT / "hellaswag.py"), *common], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout.strip().splitlines()[-1])
    one = hellaswag.run(common)
    assert two == one


# ---- the download ----


def _official_like_body() -> bytes:
    line = json.dumps({"ctx": "A context.", "endings": ["a.", "b.", "c.", "d."], "label": 1}) + "\n"
    return (line * HELLASWAG_VAL_EXAMPLES).encode()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GPT2_TRAINER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hellaswag"


@pytest.mark.parametrize("how", ["connection_drops", "body_cut_short"])
def test_failed_download_leaves_no_cached_file(cache, monkeypatch, how):
    import requests

    body = _official_like_body()
    if how == "connection_drops":
        response = FakeResponse(body, fail_at=len(body) // 2)
    else:
        response = FakeResponse(body[: len(body) // 2])
    monkeypatch.setattr(requests, "get", lambda *args, **kwargs: response)
    with pytest.raises(hellaswag.HellaSwagError, match="HINT"):
        load_examples()
    assert list(cache.iterdir()) == []  # neither the final name nor a leftover partial file


def test_download_is_cached_and_reused(cache, monkeypatch):
    import requests

    monkeypatch.setattr(requests, "get", lambda *args, **kwargs: FakeResponse(_official_like_body()))
    assert len(load_examples()) == HELLASWAG_VAL_EXAMPLES
    assert [p.name for p in cache.iterdir()] == ["hellaswag_val.jsonl"]

    def no_network(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(requests, "get", no_network)
    assert len(load_examples(limit=10)) == 10


# ---- the full split, a compiled model, a GPU ----


@pytest.mark.slow
def test_full_split_batched_matches_one_at_a_time_loop(data_file, folded):
    examples = load_examples(data_file)
    model = tiny_model()
    assert evaluate(model, examples, "cpu", batch_size=64, tokenizer=folded) == evaluate_one_at_a_time(
        model, examples, "cpu", tokenizer=folded
    )


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler"
)
def test_model_compiled_for_scoring_compiles_once_for_every_length_and_gives_the_same_accuracy(examples, folded):
    # n_embd 48: not a length a batch can have, which one graph for every shape would take for a
    # constant (dynamo gives sizes equal when first seen the same symbol)
    torch._dynamo.reset()  # the blocks' code may have been compiled by tests before, for training
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=FoldedTokenizer.vocab_size, n_layer=2, n_head=2, n_embd=48))
    eager = evaluate(model, examples, "cpu", batch_size=8, tokenizer=folded)
    rows = [row for example in examples for row in hellaswag.render_rows(example, folded, 64)[0]]
    assert len({-(-(len(row) - 1) // hellaswag.SEQ_MULTIPLE) for row in rows}) > 1  # batches of several lengths
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert evaluate(hellaswag.compile_for_scoring(model), examples, "cpu", batch_size=8, tokenizer=folded) == eager


@requires_gpu
def test_bf16_compiled_on_gpu_agrees_with_one_at_a_time_loop(data_file):
    examples = load_examples(data_file, limit=512)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=128)).cuda()
    bf16 = torch.bfloat16
    reference = evaluate_one_at_a_time(model, examples, "cuda", autocast_dtype=bf16)
    batched = evaluate(hellaswag.compile_for_scoring(model), examples, "cuda", batch_size=32, autocast_dtype=bf16)
    # bf16 rounding differs with the batch shape; a near-tie may flip, but only a few
    assert abs(batched["acc"] - reference["acc"]) <= 0.01
    assert abs(batched["acc_norm"] - reference["acc_norm"]) <= 0.01


def test_command_line_reports_bad_data_without_a_traceback(tmp_path, capsys, hf_gpt2_dir):
    model = ["--model_type", str(hf_gpt2_dir), "--device", "cpu"]
    missing = tmp_path / "missing.jsonl"
    assert hellaswag.main([*model, "--data-file", str(missing)]) == 2  # a mistyped name: the user's mistake
    assert capsys.readouterr().err == f"error: --data-file {missing} is not a file\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "A", "endings": ["a", "b", "c", "d"], "label": 1}\nnot json\n')
    assert hellaswag.main([*model, "--data-file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"error: {bad}:2: not a JSON object" in err and "Traceback" not in err


def test_command_line_reports_non_utf8_data_and_running_out_of_memory(tmp_path, capsys, hf_gpt2_dir, monkeypatch):
    model = ["--model_type", str(hf_gpt2_dir), "--device", "cpu"]
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"ctx": "caf\u00e9"}\n'.encode("latin-1"))
    assert hellaswag.main([*model, "--data-file", str(latin1)]) == 1
    assert f"error: {latin1} is not UTF-8 text" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"ctx": "A", "endings": ["a", "b", "c", "d"], "label": 1}\n')

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")

    monkeypatch.setattr(GPT, "forward", no_memory)
    assert hellaswag.main([*model, "--data-file", str(good)]) == 1
    err = capsys.readouterr().err
    assert "error: out of memory: DefaultCPUAllocator" in err and "HINT: lower --batch-size" in err


# ---- mistakes: one clear error, exit code 2, nothing loaded ----


def nothing_loaded(*args, **kwargs):
    raise AssertionError("the command line should have been refused before any model was loaded")


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(checkpoint, "load_model", nothing_loaded)
    monkeypatch.setattr(GPT, "from_pretrained", nothing_loaded)  # and no look-up on the hub


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--limit 0", "--limit must be >= 1, got 0"),
        ("--batch-size 0", "--batch-size must be >= 1, got 0"),
        ("--checkpoint runs/typo", "--checkpoint runs/typo is not a folder. HINT: "),
        ("--model_type runs/typo", "runs/typo does not exist, and it is not one of the Hugging Face names"),
        ("--model_type gpt2-small", "gpt2-small does not exist, and it is not one of the Hugging Face names"),
    ],
)
def test_a_bad_flag_is_one_error_before_any_work(flags, message, data_file, tmp_path, monkeypatch, no_loading, capsys):
    monkeypatch.chdir(tmp_path)
    assert hellaswag.main([*flags.split(), "--device", "cpu", "--data-file", str(data_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_hugging_face_folder_given_as_checkpoint_is_pointed_to_model_type(hf_gpt2_dir, data_file, no_loading, capsys):
    assert hellaswag.main(["--checkpoint", str(hf_gpt2_dir), "--device", "cpu", "--data-file", str(data_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --checkpoint {hf_gpt2_dir} is a Hugging Face model folder")
    assert err.rstrip().endswith(f"HINT: evaluate it with --model_type {hf_gpt2_dir}")


def test_json_to_a_closed_stdout_stops_quietly_with_the_sigpipe_exit_code(hf_gpt2_dir, data_file):
    flags = ["--model_type", str(hf_gpt2_dir), "--data-file", str(data_file), *"--device cpu --limit 2 --json".split()]
    done = run_with_stdout_closed(["hellaswag.py", *flags])
    assert done.returncode == EXIT_BROKEN_PIPE, done.stderr
    assert "error" not in done.stderr and "Broken pipe" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_a_config_error(data_file, no_loading, capsys):
    assert hellaswag.main(["--device", "cuda", "--data-file", str(data_file)]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda, but torch sees no CUDA GPU")


# ---- progress ----


def test_progress_in_a_log_file_is_a_line_at_the_start_and_one_at_the_end(examples, folded, capsys):
    evaluate(tiny_model(), examples, "cpu", batch_size=8, tokenizer=folded, progress=True)
    lines = capsys.readouterr().err.splitlines()  # capsys's stderr is no terminal
    assert len(lines) == 2, lines
    assert lines[0] == f"hellaswag: scoring {len(examples)} items"
    assert lines[1].startswith(f"hellaswag: scored {len(examples)} items in ")


def test_progress_on_a_terminal_is_a_bar_that_reaches_every_item(examples, folded, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    evaluate(tiny_model(), examples, "cpu", batch_size=8, tokenizer=folded, progress=True)
    err = capsys.readouterr().err
    assert "hellaswag: 100%" in err and f"{len(examples)}/{len(examples)}" in err
    assert "scored" not in err  # the bar alone


def test_no_progress_unless_asked(examples, folded, capsys):
    # train.py calls evaluate between steps: its log stays its own
    evaluate(tiny_model(), examples, "cpu", batch_size=8, tokenizer=folded)
    assert capsys.readouterr().err == ""


def test_benchmark_times_both_paths_and_they_agree_in_fp32(data_file, capsys):
    from bench import hellaswag as bench_hellaswag

    argv = ["--device", "cpu", "--model", "tiny", "--data-file", str(data_file), "--limit", "6"]
    assert bench_hellaswag.main([*argv, "--slow-limit", "3", "--warmup", "2", "--repeat", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["items"], report["items_one_at_a_time"], report["dtype"]) == (6, 3, "float32")
    assert report["batched_items_per_s"] > 0 and report["one_at_a_time_items_per_s"] > 0
    shared = report["shared_items_acc"]
    assert shared["batched"] == shared["one_at_a_time"]
