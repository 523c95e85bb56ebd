import json
import math
import os
import stat
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, requires_gpu, save_tiny_hf_gpt2
from model import GPT, HF_TOKENIZER_KEY, PRESETS, GPTConfig, KVCache, config_from_preset


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(config_from_preset("tiny", **overrides))


def test_presets_have_gpt2_parameter_counts():
    # counted on the meta device: no memory for 1.5B parameters is needed
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, count in expected.items():
        with torch.device("meta"):
            model = GPT(config_from_preset(name))
        assert model.num_params(non_embedding=False) == count, name


def test_flops_per_token_matches_formula_for_124m():
    with torch.device("meta"):
        model = GPT(config_from_preset("gpt2"))
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert model.flops_per_token(1024) == pytest.approx(0.855e9, rel=1e-3)


def test_lm_head_is_tied_to_token_embedding():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, block_size=64))
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)


def test_initial_loss_is_near_log_vocab():
    model = tiny()
    idx, targets = torch.randint(0, 50257, (2, 4, 64))  # targets unlike inputs: tied weights favour the input id
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(50257)) < 0.1


def test_forward_shapes_and_last_position_logits():
    model = tiny(pad_vocab_to=64).eval()
    idx = torch.randint(0, 50257, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 50257) and loss.dim() == 0
    last, none = model(idx)
    assert none is None and last.shape == (2, 1, 50257)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    per_token, token_losses = model(idx, idx, reduction="none")
    assert token_losses.shape == (2, 16)
    torch.testing.assert_close(token_losses.mean(), loss)


def test_padded_vocab_never_gets_probability():
    model = tiny(pad_vocab_to=64)
    assert model.config.padded_vocab_size == 50304
    with torch.no_grad():  # make the padded rows the most attractive outputs
        model.transformer.wte.weight[50257:] = 10.0
    idx = torch.randint(0, 50257, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape[-1] == 50257 and torch.isfinite(loss)
    out = model.generate(idx, 20, top_k=None, generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 50257


def test_ignore_index_targets_do_not_count():
    model = tiny()
    idx = torch.randint(0, 50257, (1, 8))
    targets = idx.clone()
    targets[0, 4:] = -1
    _, loss_masked = model(idx, targets)
    _, per_token = model(idx, idx, reduction="none")
    torch.testing.assert_close(loss_masked, per_token[0, :4].mean())


def test_generate_is_reproducible_with_a_seed():
    model = tiny().eval()
    idx = torch.zeros((2, 1), dtype=torch.long)
    a = model.generate(idx, 10, top_k=50, generator=torch.Generator().manual_seed(42))
    b = model.generate(idx, 10, top_k=50, generator=torch.Generator().manual_seed(42))
    c = model.generate(idx, 10, top_k=50, generator=torch.Generator().manual_seed(43))
    assert a.shape == (2, 11) and torch.equal(a, b) and not torch.equal(a, c)


def test_cached_forward_gives_the_logits_of_the_whole_sequence():
    model = tiny(block_size=32).eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        full, _ = model(idx, idx)  # logits at every position
        cache = KVCache(model.config.n_layer)
        prompt, _ = model(idx[:, :5], cache=cache)
        torch.testing.assert_close(prompt[:, -1], full[:, 4], rtol=1e-5, atol=1e-5)
        for t in range(5, 20):
            step, _ = model(idx[:, t : t + 1], cache=cache)
            torch.testing.assert_close(step[:, -1], full[:, t], rtol=1e-5, atol=1e-5)
    assert len(cache) == 20
    with pytest.raises(ValueError, match="one new token at a time"):
        model(idx[:, :2], cache=cache)
    full = KVCache(model.config.n_layer)
    with torch.no_grad():
        model(torch.zeros((2, 32), dtype=torch.long), cache=full)
    with pytest.raises(ValueError, match="sequence of length 33 is longer than block_size 32"):
        model(torch.zeros((2, 1), dtype=torch.long), cache=full)


def test_generate_past_block_size_predicts_from_the_last_block_size_tokens():
    """The cache must give the tokens a model without one gives: each predicted from the last
    block_size tokens, also once the window slides (here from the 17th token on)."""
    model = tiny(block_size=16).eval()
    idx = torch.randint(0, 50257, (2, 3))
    expected = idx
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(expected[:, -16:])
            expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(idx, 30, temperature=0), expected)


def test_top_k_one_is_greedy():
    model = tiny().eval()
    idx = torch.randint(0, 50257, (1, 4))
    sampled = model.generate(idx, 5, top_k=1, generator=torch.Generator().manual_seed(1))
    greedy = model.generate(idx, 5, temperature=0)
    assert torch.equal(sampled, greedy)


def test_top_k_zero_means_no_limit():
    model = tiny().eval()
    idx = torch.zeros((2, 1), dtype=torch.long)
    unlimited = model.generate(idx, 5, top_k=None, generator=torch.Generator().manual_seed(3))
    zero = model.generate(idx, 5, top_k=0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(unlimited, zero)


def test_configure_optimizers_decays_only_matrices():
    model = tiny()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params(non_embedding=False)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        config_from_preset("gpt5")
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"}


def test_sequence_longer_than_block_size_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, 257), dtype=torch.long))


def test_from_pretrained_matches_transformers_logits(hf_gpt2_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    ours = GPT.from_pretrained(str(hf_gpt2_dir)).eval()
    padded = GPT.from_pretrained(str(hf_gpt2_dir), pad_vocab_to=64).eval()
    idx = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        ref = hf(idx).logits
        assert (ours(idx, idx)[0] - ref).abs().max().item() < 1e-5
        assert (padded(idx, idx)[0] - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "variant",
    [
        {"tie_word_embeddings": False},
        {"layer_norm_epsilon": 1e-3},
        {"scale_attn_weights": False},
        {"scale_attn_by_inverse_layer_idx": True},
        {"n_inner": 64},
        {"activation_function": "relu"},
    ],
)
def test_from_pretrained_refuses_variants_it_would_compute_differently(tmp_path, variant):
    save_tiny_hf_gpt2(tmp_path, vocab_size=64, n_positions=16, n_layer=1, **variant)
    key = next(iter(variant))
    with pytest.raises(ValueError, match=f"not a GPT-2 this model can load: {key}="):
        GPT.from_pretrained(str(tmp_path))


@pytest.fixture
def run_folder(tmp_path):
    """One of our run folders as train.py leaves it: its config.json the training configuration."""
    import checkpoint

    run = tmp_path / "run"
    checkpoint.save_checkpoint(run, 5, tiny(), {}, {})
    (run / "config.json").write_text(json.dumps({"model": "tiny", "n_embd": None, "lr": 1e-3}))
    (run / "metrics.jsonl").write_text("")
    return run


def test_from_pretrained_on_our_run_or_checkpoint_folder_points_to_load_pretrained(run_folder):
    step_dir = run_folder / "checkpoints" / "step_00000005"
    for folder, what in ((run_folder, "a run folder"), (step_dir, "a checkpoint folder")):
        with pytest.raises(ValueError) as exc:
            GPT.from_pretrained(str(folder))
        message = str(exc.value)
        assert message.startswith(f"{folder} is {what} of this trainer, not a Hugging Face model folder. HINT: ")
        assert f"checkpoint.load_pretrained({str(folder)!r})" in message and f"--init-from {folder}" in message


def test_from_pretrained_on_a_run_without_checkpoints_says_it_has_none_yet(run_folder):
    import shutil

    shutil.rmtree(run_folder / "checkpoints")
    with pytest.raises(ValueError, match="is a run folder of this trainer.*HINT: it has saved no checkpoint yet"):
        GPT.from_pretrained(str(run_folder))


def test_running_model_py_prints_what_to_run_instead(capsys):
    from model import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "python sample.py" in out and "python sharding.py export" in out and "from model import GPT" in out
    with pytest.raises(SystemExit) as exc:
        main(["--prompt", "hi"])
    assert exc.value.code == 2 and "unrecognized arguments: --prompt hi" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "model.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "python sample.py" in done.stdout


def test_loading_an_untied_output_layer_is_an_error():
    model = tiny()
    hf_sd = {k: v.clone() for k, v in model.state_dict().items()}
    hf_sd["lm_head.weight"] = torch.randn_like(hf_sd["lm_head.weight"])
    with pytest.raises(ValueError, match="ties them"):
        tiny().load_hf_state_dict(hf_sd)


def test_export_round_trip_through_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny(pad_vocab_to=64).eval()
    out = model.export_hf(tmp_path / "export")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.transformer.wte.weight.shape[0] == 50257  # padding is not exported
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx, idx)[0]).abs().max().item() < 1e-5
    back = GPT.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (back(idx, idx)[0] - model(idx, idx)[0]).abs().max().item() < 1e-5


def test_exported_files_have_the_permissions_the_umask_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        out = tiny().export_hf(tmp_path / "export")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_export_refuses_a_run_folder_and_leaves_it_as_it_was(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"model": "tiny"}')
    with pytest.raises(FileExistsError, match="is a run folder.*HINT: choose an empty or new folder"):
        tiny().export_hf(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json"]
    assert (run / "config.json").read_text() == '{"model": "tiny"}'


def test_export_writes_over_an_earlier_export_and_names_the_tokenizer(tmp_path):
    out = tmp_path / "export"
    tiny().export_hf(out)
    tiny(n_layer=1).export_hf(out, tokenizer="cl100k_base")
    assert GPT.from_pretrained(str(out)).config.n_layer == 1
    assert json.loads((out / "config.json").read_text())[HF_TOKENIZER_KEY] == "cl100k_base"


def loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks for every call
    _, loss = model(idx, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def saved_bytes(model: GPT, idx: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return total


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients_and_stores_less(every):
    model = tiny(dropout=0.1, pad_vocab_to=64).train()  # dropout: the recomputation must replay the masks
    idx = torch.randint(0, 50257, (2, 64))
    targets = torch.randint(0, 50257, (2, 64))
    loss, grads = loss_and_grads(model, idx, targets)
    plain_saved = saved_bytes(model, idx)
    model.activation_checkpointing = every
    ac_loss, ac_grads = loss_and_grads(model, idx, targets)
    assert saved_bytes(model, idx) < plain_saved
    assert ac_loss.item() == loss.item()
    for name, g in grads.items():
        torch.testing.assert_close(ac_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_loss_model_matches_plain_model_and_eval_still_returns_logits():
    model = tiny(pad_vocab_to=64).train()
    model.fused_loss_chunk_rows = 48  # several chunks, the last one short
    idx = torch.randint(0, 50257, (2, 64))
    targets = torch.randint(0, 50257, (2, 64))
    targets[0, :10] = -1
    loss, grads = loss_and_grads(model, idx, targets)
    model.fused_loss = True
    fused_logits, _ = model(idx, targets)
    assert fused_logits is None  # never built
    fused_loss, fused_grads = loss_and_grads(model, idx, targets)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation needs no gradients: the plain path, with logits
        logits, eval_loss = model(idx, targets)
    assert logits.shape == (2, 64, 50257)
    torch.testing.assert_close(eval_loss, loss, rtol=1e-5, atol=1e-6)


@requires_gpu
def test_bf16_autocast_forward_backward_on_gpu():
    model = tiny(pad_vocab_to=64).cuda()
    idx = torch.randint(0, 50257, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"fused_loss": True, "activation_checkpointing": 1}], ids=["plain", "fused"])
def test_training_forward_compiles_to_one_graph(options):
    """fullgraph=True turns any graph break into an error: the training step's forward and
    backward stay one compiled graph, the speed options included."""
    model = tiny(pad_vocab_to=64).train()
    for name, value in options.items():
        setattr(model, name, value)
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, 50257, (2, 32))
    _, loss = compiled(idx, idx)
    loss.backward()
    _, eager_loss = model(idx, idx)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters())
