"""Shared test fixtures. Tests never touch the network; the real corpora in ../shared/data
are used when present and the tests that need them skip otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Several tests compare runs bit for bit. With MKL's own threads, an elementwise kernel right
# after a matmul gave different last digits in some fresh processes (an Intel Xeon, torch
# 2.13's CPU build: exp gave one of two results in 5 of 30 processes; with one MKL thread, 30
# of 30 agreed). Set before torch loads MKL; subprocesses inherit it.
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))  # the scripts are top-level modules


def requires_gpu(test):
    """Marked `gpu` (so `pytest -m gpu` selects it on a GPU machine) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or a clean skip where that folder is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{relative} not found in ../shared/data (only present on development machines)")
    return path


@pytest.fixture
def hf_gpt2_dir(tmp_path):
    """A small random Hugging Face GPT2LMHeadModel saved to a directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config).eval()
    out = tmp_path / "hf_tiny_gpt2"
    model.save_pretrained(out)
    return out


def _synthetic_text(n_docs: int = 400) -> str:
    import random

    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he I this are or his from at which".split()
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(50, 200))) + ".\n\n" for _ in range(n_docs))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Prepared shards: tiny Shakespeare where ../shared/data has it, else synthetic text."""
    import prepare_data

    src_dir = tmp_path_factory.mktemp("corpus")
    shakespeare = SHARED_DATA / "tinyshakespeare" / "input.txt"
    source = src_dir / "input.txt"
    source.write_text(shakespeare.read_text() if shakespeare.exists() else _synthetic_text())
    out = src_dir / "prepared"
    assert prepare_data.main([str(source), "--out", str(out), "--workers", "1"]) in (0, None)
    return out
