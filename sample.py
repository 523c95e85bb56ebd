"""Print continuations of a prompt from a Hugging Face GPT-2 or one of our checkpoints.

    python sample.py --init-from gpt2 --prompt "Hello, I'm a language model," \\
        --num-samples 4 --max-new-tokens 32 --top-k 50 --seed 42
    python sample.py --init-from runs/tinyshakespeare      # newest checkpoint of a run
"""

from __future__ import annotations

import argparse
import sys

import torch

from model import GPT


def load_for_sampling(init_from: str, device: torch.device) -> GPT:
    import checkpoint

    if checkpoint.is_checkpoint_path(init_from):
        return checkpoint.load_model(init_from, device)
    return GPT.from_pretrained(init_from).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--init-from", default="gpt2", help="Hugging Face GPT-2 name or directory, or our checkpoint / run directory"
    )
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    parser.add_argument("--num-samples", type=int, default=4, help="how many continuations")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to add to the prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=42, help="random seed: same seed, same samples")
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer the model was trained with")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 0 or args.top_k < 0 or args.temperature < 0:
        parser.error("--num-samples must be >= 1; --max-new-tokens, --top-k and --temperature >= 0")

    from runtime import resolve_device
    from tokenizer import get_tokenizer

    device = resolve_device(args.device)
    model = load_for_sampling(args.init_from, device).eval()
    tok = get_tokenizer(args.tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        print(
            f"error: the tokenizer {args.tokenizer!r} has {tok.vocab_size:,} ids, the model only "
            f"{model.config.vocab_size:,}. HINT: pass the --tokenizer the model was trained with",
            file=sys.stderr,
        )
        return 2
    prompt = tok.encode(args.prompt) or [tok.eot_id]
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None, generator=gen
    )
    for i, row in enumerate(out.tolist()):
        print(f"> sample {i}: {tok.decode(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
