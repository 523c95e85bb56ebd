"""ShardedDataLoader on synthetic shards whose tokens equal their positions in the split."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import requires_gpu
from dataloader import DataError, ShardedDataLoader, main
from prepare_data import MARKER_NAME, ShardWriter, finish_dataset
from runs import run_with_stdout_closed
from runtime import EXIT_BROKEN_PIPE

B, T = 2, 8
CHUNK = B * T


def make_data(path: Path, n_train: int, shard_tokens: int, n_val: int = 0) -> Path:
    """A data directory whose val tokens are 0..n_val-1 and train tokens n_val..n_val+n_train-1."""
    path.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(path, np.dtype(np.uint16), shard_tokens, n_val)
    writer.write(np.arange(n_val + n_train, dtype=np.uint16))
    finish_dataset(path, writer.close(), tokenizer="positions", vocab_size=1 << 16, eot_id=0, command="test")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    # 3 shards of uneven length: 1000 train tokens, chunks of 16 straddle the shard boundaries.
    return make_data(tmp_path / "d", n_train=1000, shard_tokens=370)


def starts(x: torch.Tensor) -> int:
    """The position of the first token of a batch (tokens are positions, so x[0, 0])."""
    return int(x[0, 0])


def test_one_epoch_reads_every_token_once_without_gap_or_overlap(data):
    loader = ShardedDataLoader(data, "train", B, T)
    assert loader.num_chunks() == (1000 - 1) // CHUNK
    seen = []
    for _ in range(loader.num_chunks()):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        assert torch.equal(y, x + 1)
        seen.append(x.flatten())
    assert torch.equal(torch.cat(seen), torch.arange(loader.num_chunks() * CHUNK))


def test_chunks_straddle_shard_boundaries(data, tmp_path):
    loader = ShardedDataLoader(data, "train", B, T)
    x, y = loader.batch_at(370 // CHUNK)  # tokens 368..384 cross the boundary at 370
    assert torch.equal(x.flatten(), torch.arange(368, 384)) and int(y[-1, -1]) == 384
    tiny_shards = make_data(tmp_path / "tiny", n_train=100, shard_tokens=5)  # one chunk spans 4 shards
    x, y = ShardedDataLoader(tiny_shards, "train", B, T).batch_at(2)
    assert torch.equal(x.flatten(), torch.arange(32, 48)) and torch.equal(y, x + 1)


def test_ranks_are_disjoint_and_together_read_one_contiguous_span(data):
    world = 3
    loaders = [ShardedDataLoader(data, "train", B, T, rank=r, world_size=world) for r in range(world)]
    for step in range(loaders[0]._epoch_positions() // world):
        xs = [loader.next_batch()[0].flatten() for loader in loaders]
        span = step * CHUNK * world
        assert torch.equal(torch.cat(xs), torch.arange(span, span + CHUNK * world))


def test_epoch_rolls_over_to_the_start_skipping_only_the_tail(data):
    world = 4
    loader = ShardedDataLoader(data, "train", B, T, rank=0, world_size=world)
    positions = loader.num_chunks() - loader.num_chunks() % world
    for _ in range(positions // world):
        loader.next_batch()
    x, _ = loader.next_batch()
    assert loader.epoch == 1 and starts(x) == 0


def test_shuffle_is_a_permutation_that_changes_per_epoch_and_repeats_per_seed(data):
    def epoch_order(seed: int, epochs: int = 2) -> list[list[int]]:
        loader = ShardedDataLoader(data, "train", B, T, shuffle=True, seed=seed)
        n = loader.num_chunks()
        return [[starts(loader.next_batch()[0]) // CHUNK for _ in range(n)] for _ in range(epochs)]

    first, second = epoch_order(seed=1)
    assert sorted(first) == sorted(second) == list(range(len(first)))
    assert first != list(range(len(first))) and first != second
    assert epoch_order(seed=1) == [first, second] and epoch_order(seed=2)[0] != first


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_rank_two_steps_equal_two_ranks_one_step(data, shuffle):
    one = ShardedDataLoader(data, "train", B, T, shuffle=shuffle, seed=3)
    two = [ShardedDataLoader(data, "train", B, T, rank=r, world_size=2, shuffle=shuffle, seed=3) for r in range(2)]
    for _ in range(one._epoch_positions() // 2 + 5):  # runs into the second epoch
        for loader in two:
            x1, y1 = one.next_batch()
            x2, y2 = loader.next_batch()
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_accumulation_and_ranks_agree_across_epochs(tmp_path, shuffle):
    """One process with 2 accumulation steps and two processes with one read the same chunks
    in every step, also past epoch ends: with 61 chunks an epoch is 30 steps of 2 for both."""
    odd = make_data(tmp_path / "odd", n_train=61 * CHUNK + 1, shard_tokens=370)
    single = ShardedDataLoader(odd, "train", B, T, shuffle=shuffle, seed=3, chunks_per_step=2)
    pair = [ShardedDataLoader(odd, "train", B, T, rank=r, world_size=2, shuffle=shuffle, seed=3) for r in (0, 1)]
    assert single.num_chunks() == 61
    for _ in range(70):  # more than two epochs
        assert torch.equal(single.next_batch()[0], pair[0].next_batch()[0])
        assert torch.equal(single.next_batch()[0], pair[1].next_batch()[0])
    threes = ShardedDataLoader(odd, "train", B, T, chunks_per_step=3)  # 61 = 20 steps of 3 + a tail of 1
    firsts = [starts(threes.next_batch()[0]) // CHUNK for _ in range(63)]
    assert firsts[:60] == list(range(60)) and firsts[60:] == [0, 1, 2]


@pytest.mark.parametrize("world_after", [1, 2, 4])
def test_restored_loader_gives_the_same_next_batches(data, world_after):
    reference = [ShardedDataLoader(data, "train", B, T, shuffle=True, seed=7)]
    for _ in range(100):  # past the end of epoch 0 (62 chunks)
        reference[0].next_batch()
    state = json.loads(json.dumps(reference[0].state_dict()))  # survives a round trip through JSON
    expected = [reference[0].next_batch() for _ in range(8)]

    restored = [
        ShardedDataLoader(data, "train", B, T, rank=r, world_size=world_after, shuffle=True, seed=7)
        for r in range(world_after)
    ]
    for loader in restored:
        loader.load_state_dict(state)
    got = [loader.next_batch() for _ in range(8 // world_after) for loader in restored]
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


def test_load_state_dict_refuses_other_batch_shape_or_other_data(data, tmp_path):
    state = ShardedDataLoader(data, "train", B, T).state_dict()
    with pytest.raises(DataError, match="(?s)B\\*T"):
        ShardedDataLoader(data, "train", B, 2 * T).load_state_dict(state)
    with pytest.raises(DataError, match="(?s)shuffle"):
        ShardedDataLoader(data, "train", B, T, shuffle=True).load_state_dict(state)
    other = make_data(tmp_path / "other", n_train=1200, shard_tokens=370)
    with pytest.raises(DataError, match="(?s)other data"):
        ShardedDataLoader(other, "train", B, T).load_state_dict(state)
    # B and T may change as long as B*T does not
    ShardedDataLoader(data, "train", 2 * B, T // 2).load_state_dict(state)


def test_reset_goes_back_to_the_start_of_epoch_zero(data):
    loader = ShardedDataLoader(data, "train", B, T, shuffle=True)
    first = loader.next_batch()
    for _ in range(80):
        loader.next_batch()
    loader.reset()
    assert loader.epoch == 0 and torch.equal(loader.next_batch()[0], first[0])


def test_validation_stream_is_fixed_whatever_the_world_size(tmp_path):
    data = make_data(tmp_path / "d", n_train=600, shard_tokens=1000, n_val=200)
    val = ShardedDataLoader(data, "val", B, T, rank=1, world_size=4)
    assert val.num_tokens == 200 and val.num_chunks() == 199 // CHUNK
    x, y = val.batch_at(3)
    assert torch.equal(x.flatten(), torch.arange(48, 64)) and torch.equal(y, x + 1)
    with pytest.raises(IndexError):
        val.batch_at(val.num_chunks())
    train = ShardedDataLoader(data, "train", B, T)
    assert starts(train.next_batch()[0]) == 200  # train follows val in the token stream


def test_meta_fields_and_cpu_batches(data):
    loader = ShardedDataLoader(data, "train", B, T)
    assert (loader.vocab_size, loader.eot_id, loader.num_tokens) == (1 << 16, 0, 1000)
    x, y = loader.next_batch()
    assert (x.device.type, x.dtype, y.device.type, y.dtype) == ("cpu", torch.int64, "cpu", torch.int64)


@requires_gpu
@pytest.mark.parametrize("shuffle", [False, True])
def test_gpu_batches_equal_cpu_batches_while_pinned_buffers_are_reused(data, shuffle):
    cpu = ShardedDataLoader(data, "train", B, T, shuffle=shuffle, seed=1)
    gpu = ShardedDataLoader(data, "train", B, T, shuffle=shuffle, seed=1, device="cuda")
    expected = [cpu.next_batch() for _ in range(7)]
    # Keep the GPU busy so that the copies queue behind it: 7 batches go through 2 pinned
    # buffers, and a buffer refilled before its queued copy ran would corrupt an earlier batch.
    torch.cuda._sleep(100_000_000)
    got = [gpu.next_batch() for _ in range(7)]
    torch.cuda.synchronize()
    for (x, y), (gx, gy) in zip(expected, got):
        assert (gx.device.type, gx.dtype, gx.shape) == ("cuda", torch.int64, x.shape)
        assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
    assert torch.equal(gpu.batch_at(3)[1].cpu(), cpu.batch_at(3)[1])


@pytest.mark.parametrize("shuffle", [False, True])
def test_position_saved_by_another_world_size_near_the_epoch_end_goes_on_to_the_next_epoch(data, shuffle):
    one = ShardedDataLoader(data, "train", B, T, shuffle=shuffle)  # 62 chunks, 1 per step
    for _ in range(61):
        one.next_batch()
    state = one.state_dict()  # cursor 61: rank 1 of 2 would read position 62, past the last chunk
    two = [ShardedDataLoader(data, "train", B, T, rank=r, world_size=2, shuffle=shuffle) for r in range(2)]
    for loader in two:
        loader.load_state_dict(state)
    got = [starts(loader.next_batch()[0]) for loader in two]
    fresh = [ShardedDataLoader(data, "train", B, T, rank=r, world_size=2, shuffle=shuffle) for r in range(2)]
    for loader in fresh:
        for _ in range(31):
            loader.next_batch()
    assert got == [starts(loader.next_batch()[0]) for loader in fresh]
    assert all(loader.epoch == 1 for loader in two)


def test_an_empty_split_has_no_chunks_and_says_so(tmp_path):
    write_llmc(tmp_path / "x_train_000000.bin", np.arange(100))
    write_llmc(tmp_path / "x_val_000000.bin", np.arange(0))
    loader = ShardedDataLoader(tmp_path, "val", B, T)
    assert loader.num_chunks() == 0
    with pytest.raises(DataError, match="0 chunk"):
        loader.next_batch()


def test_too_little_data_for_one_step_fails_at_the_first_batch(tmp_path):
    data = make_data(tmp_path / "d", n_train=40, shard_tokens=100)
    small = ShardedDataLoader(data, "train", 4, 16)  # opening works: the caller can check num_chunks()
    assert small.num_chunks() == 0
    with pytest.raises(DataError, match="(?s)0 chunk\\(s\\).*HINT: lower the batch size"):
        small.next_batch()
    loader = ShardedDataLoader(data, "train", B, T, rank=0, world_size=4)  # 2 chunks, 4 ranks
    with pytest.raises(DataError, match="fewer than the 4 that one step"):
        loader.next_batch()


# ---- shards made by other projects ----


def test_reads_build_nanogpt_npy_shards(tmp_path):
    for i, split in enumerate(["val", "train", "train"]):
        np.save(tmp_path / f"edufineweb_{split}_{i:06d}.npy", np.arange(i * 100, i * 100 + 100, dtype=np.uint16))
    loader = ShardedDataLoader(tmp_path, "train", B, T)
    assert loader.vocab_size == 50257 and loader.eot_id is None and loader.num_tokens == 200
    assert torch.equal(loader.batch_at(6)[0].flatten(), torch.arange(196, 212))  # across the two train shards


@pytest.mark.parametrize("dtype", [np.int32, np.uint64, np.float32])
def test_npy_shards_of_other_than_unsigned_32_bit_ids_are_refused(tmp_path, dtype):
    np.save(tmp_path / "edufineweb_train_000000.npy", np.arange(100, dtype=dtype))
    with pytest.raises(DataError, match="(?s)edufineweb_train_000000.npy: holds a .* at most 32 bits"):
        ShardedDataLoader(tmp_path, "train", B, T)


def write_llmc(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1, count: int | None = None):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


def test_reads_llmc_bin_shards(tmp_path):
    write_llmc(tmp_path / "fineweb_train_000001.bin", np.arange(0, 300))
    write_llmc(tmp_path / "fineweb_train_000002.bin", np.arange(300, 500))
    write_llmc(tmp_path / "fineweb_val_000000.bin", np.arange(50))
    loader = ShardedDataLoader(tmp_path, "train", B, T, shuffle=True)
    assert loader.num_tokens == 500 and loader.vocab_size == 50257
    assert torch.equal(loader.batch_at(18)[0].flatten(), torch.arange(288, 304))
    assert ShardedDataLoader(tmp_path, "val", B, T).num_tokens == 50


# ---- bad shards: each error names the file and says what to do ----


def test_missing_data_directory_and_missing_split(tmp_path):
    with pytest.raises(DataError, match="(?s)no such data directory.*HINT"):
        ShardedDataLoader(tmp_path / "nope", "train", B, T)
    data = make_data(tmp_path / "d", n_train=100, shard_tokens=100)
    with pytest.raises(DataError, match="(?s)no val shards"):
        ShardedDataLoader(data, "val", B, T)
    with pytest.raises(DataError, match="(?s)no train shards here.*HINT"):
        ShardedDataLoader(tmp_path, "train", B, T)


def test_missing_shard(data):
    (data / "train_000001.npy").unlink()
    with pytest.raises(
        DataError, match="(?s)train_000001.npy: listed in meta.json but missing.*HINT: run prepare_data.py"
    ):
        ShardedDataLoader(data, "train", B, T)


def test_truncated_shard(data):
    path = data / "train_000002.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="(?s)train_000002.npy: .* bytes on disk.*truncated.*HINT: run prepare_data.py"):
        ShardedDataLoader(data, "train", B, T)


@pytest.mark.parametrize(
    ("command", "rebuild"),
    [
        ("python prepare_data.py input.txt", "python prepare_data.py input.txt --out {d} --overwrite"),
        (
            "python prepare_data.py a.txt --out data/a --val-tokens 5 --overwrite",
            "python prepare_data.py a.txt --val-tokens 5 --out {d} --overwrite",
        ),
        ("python prepare_data.py 'my books/' --out=x", "python prepare_data.py 'my books/' --out {d} --overwrite"),
        (None, "python prepare_data.py SOURCE --out {d} --overwrite"),
    ],
    ids=["default-out", "other-out", "quoted", "no-command"],
)
def test_the_hint_for_a_damaged_shard_rebuilds_the_folder_that_holds_it(data, command, rebuild):
    """The folder need not be where its command writes by default (moved, copied, or named by hand)."""
    meta = json.loads((data / "meta.json").read_text())
    meta["command"] = command
    (data / "meta.json").write_text(json.dumps(meta))
    path = data / "train_000002.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError) as e:
        ShardedDataLoader(data, "train", B, T)
    assert rebuild.format(d=data) in str(e.value)


def test_corrupt_header(data):
    (data / "train_000000.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(DataError, match="(?s)train_000000.npy: not a readable .npy file.*HINT"):
        ShardedDataLoader(data, "train", B, T)


def test_wrong_dtype(data):
    np.save(data / "train_000000.npy", np.arange(370, dtype=np.uint32))
    with pytest.raises(DataError, match="(?s)train_000000.npy: holds uint32 ids, meta.json says uint16"):
        ShardedDataLoader(data, "train", B, T)


def test_token_count_differs_from_meta(data):
    np.save(data / "train_000001.npy", np.arange(371, dtype=np.uint16))
    with pytest.raises(DataError, match="(?s)train_000001.npy: holds 371 tokens, meta.json says 370.*HINT"):
        ShardedDataLoader(data, "train", B, T)


def test_ids_beyond_the_vocabulary(data):
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_size"] = 500
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="(?s)train_000001.npy: token id \\d+ is not below the vocabulary size 500"):
        ShardedDataLoader(data, "train", B, T)


def test_unfinished_preparation_is_refused_with_the_command_that_finishes_it(data):
    (data / MARKER_NAME).write_text("{}")  # what prepare_data.py leaves until meta.json is written
    (data / "meta.json").unlink()
    with pytest.raises(DataError, match="(?s)did not finish.*HINT: run the same prepare_data.py command again"):
        ShardedDataLoader(data, "train", B, T)


def test_shards_whose_meta_json_was_removed_are_to_be_prepared_again_with_overwrite(data):
    (data / "meta.json").unlink()  # no marker either: prepare_data.py cannot tell them from others' shards
    with pytest.raises(DataError, match=f"(?s)no meta.json.*HINT: .*--out {data} --overwrite"):
        ShardedDataLoader(data, "train", B, T)


def test_bad_llmc_headers(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_llmc(path, np.arange(100), magic=12345)
    with pytest.raises(DataError, match="(?s)fineweb_train_000000.bin: bad magic number 12345"):
        ShardedDataLoader(tmp_path, "train", B, T)
    write_llmc(path, np.arange(100), version=2)
    with pytest.raises(DataError, match="(?s)unsupported version 2"):
        ShardedDataLoader(tmp_path, "train", B, T)
    write_llmc(path, np.arange(100), count=200)
    with pytest.raises(DataError, match="(?s)fineweb_train_000000.bin: .*promises 200 tokens.*HINT"):
        ShardedDataLoader(tmp_path, "train", B, T)
    path.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="(?s)shorter than the 1024-byte llm.c header"):
        ShardedDataLoader(tmp_path, "train", B, T)


def test_inspect_command_without_val_split(data, capsys):
    assert main([str(data)]) == 0
    assert "val: none" in capsys.readouterr().out


def test_inspect_command_checks_sha256(data, capsys):
    make_data(data, n_train=1000, shard_tokens=370, n_val=50)
    assert main([str(data), "--verify-checksums"]) == 0
    assert "train: 1,000 tokens in 3 shard(s)" in capsys.readouterr().out
    path = data / "train_000000.npy"
    path.write_bytes(path.read_bytes()[:-2] + b"\xff\x00")
    assert main([str(data), "--verify-checksums"]) == 1
    assert "train_000000.npy: sha256 differs" in capsys.readouterr().err


def test_inspect_command_with_a_closed_stdout_stops_quietly_with_the_sigpipe_exit_code(data):
    done = run_with_stdout_closed(["dataloader.py", str(data)])
    assert done.returncode == EXIT_BROKEN_PIPE and done.stderr == ""
