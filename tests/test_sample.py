import pytest

import sample
import train
from runs import TINY


def run_sample(capsys, *args) -> list[str]:
    assert sample.main(["--device", "cpu", "--num-samples", "2", "--max-new-tokens", "8", *args]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("> sample")]
    assert len(lines) == 2
    return lines


def test_samples_from_a_hugging_face_directory_are_reproducible(hf_gpt2_dir, capsys):
    first = run_sample(
        capsys, "--init-from", str(hf_gpt2_dir), "--prompt", "Hello, I'm a language model,", "--seed", "42"
    )
    again = run_sample(
        capsys, "--init-from", str(hf_gpt2_dir), "--prompt", "Hello, I'm a language model,", "--seed", "42"
    )
    other = run_sample(
        capsys, "--init-from", str(hf_gpt2_dir), "--prompt", "Hello, I'm a language model,", "--seed", "7"
    )
    assert first == again and first != other
    assert all("Hello, I'm a language model," in line for line in first)


def test_samples_from_our_checkpoint(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main([*TINY, "--data", str(tiny_data), "--out", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    lines = run_sample(capsys, "--init-from", str(run), "--prompt", "ROMEO:")
    assert all(line.split(": ", 1)[1].startswith("ROMEO:") for line in lines)


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--num-samples", "0"])
    assert "--num-samples must be >= 1" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    small = tmp_path / "small_vocab"
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(small)
    assert sample.main(["--device", "cpu", "--init-from", str(small), "--max-new-tokens", "2"]) == 2
    assert "has 50,257 ids, the model only 1,000" in capsys.readouterr().err
