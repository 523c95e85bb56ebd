"""Shared test fixtures and stand-ins, one of each: the project root, the shared data folder,
a tiny Hugging Face GPT-2, a fake HTTP response, prepared shards. Tests never touch the
network; the real corpora in ../shared/data are used when present and the tests that need
them skip otherwise. (tests/runs.py runs processes: train.py, torchrun, gloo groups.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Several tests compare runs bit for bit. With MKL's own threads, an elementwise kernel right
# after a matmul can give different last digits from one fresh process to the next on Intel
# CPUs; with one MKL thread the runs agree. Set before torch loads MKL; subprocesses inherit it.
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


def save_tiny_hf_gpt2(path: Path, **config) -> Path:
    """A small random Hugging Face GPT2LMHeadModel with GPT-2's vocabulary saved to path (seeded:
    the same weights every time); keyword arguments override GPT2Config's fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    defaults = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(GPT2Config(**{**defaults, **config})).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory) -> Path:
    """save_tiny_hf_gpt2's defaults, saved once for the session; tests only read it."""
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("hf_tiny_gpt2"))


class FakeResponse:
    """Stands in for a streamed `requests` response (`requests.get(url, stream=True)`): body in
    pieces of `piece` bytes, a connection that drops once `fail_at` bytes have been sent, or an
    HTTP error status."""

    def __init__(self, body: bytes, piece: int = 65536, fail_at: int | None = None, status: int = 200):
        self.body, self.piece, self.fail_at, self.status_code = body, piece, fail_at, status

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def raise_for_status(self) -> None:
        import requests

        if self.status_code >= 400:
            raise requests.HTTPError(f"{self.status_code} error", response=self)

    def iter_content(self, chunk_size: int | None = None, decode_unicode: bool = False):
        import requests

        for start in range(0, len(self.body), self.piece):
            if self.fail_at is not None and start >= self.fail_at:
                raise requests.ConnectionError("connection reset by peer")
            yield self.body[start : start + self.piece]


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
