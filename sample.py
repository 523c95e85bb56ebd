"""Print continuations of a prompt from a Hugging Face GPT-2 or one of our checkpoints.

    python sample.py --init-from gpt2 --prompt "Hello, I'm a language model," \\
        --num-samples 4 --max-new-tokens 32 --top-k 50 --seed 42
    python sample.py --init-from runs/tinyshakespeare      # newest checkpoint of a run
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from runtime import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, ConfigError, HelpFormatter, resolve_device, run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--init-from",
        default="gpt2",
        help="gpt2, gpt2-medium, gpt2-large or gpt2-xl (Hugging Face hub), a Hugging Face GPT-2 folder, "
        "or one of our run or checkpoint folders",
    )
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    parser.add_argument("--num-samples", type=int, default=4, help="how many continuations")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to add to the prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=42, help="random seed: same seed, same samples")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, mps, cpu or auto")
    parser.add_argument(
        "--tokenizer", default=None,
        help="tokenizer the model was trained with (default: the one our checkpoints record, else gpt2)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every flag's range, before a model is loaded; all the mistakes at once."""
    errors = []
    if args.num_samples < 1:
        errors.append(f"--num-samples must be >= 1, got {args.num_samples}")
    for name in ("max_new_tokens", "top_k"):
        if getattr(args, name) < 0:
            errors.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.temperature < math.inf:  # (also false for NaN)
        errors.append(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed accepts
        errors.append(f"--seed must be in [0, 2**64), got {args.seed}")
    if errors:
        raise ConfigError("\n".join(errors))


def generate(args: argparse.Namespace) -> list[str]:
    """The prompt and its continuations, one string per sample."""
    from checkpoint import load_pretrained, saved_tokenizer
    from tokenizer import get_tokenizer

    device = resolve_device(args.device)
    args.tokenizer = args.tokenizer or saved_tokenizer(args.init_from) or "gpt2"
    tok = get_tokenizer(args.tokenizer)  # before the model: it is the quicker to fail
    model = load_pretrained(args.init_from, device).eval()
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer {args.tokenizer!r} has {tok.vocab_size:,} ids, the model only "
            f"{model.config.vocab_size:,}. HINT: pass the --tokenizer the model was trained with"
        )
    # an empty prompt starts a new document, after the end-of-text token as GPT-2's own samples do;
    # that token is context, not text the user wrote, so it is not printed
    prompt = tok.encode(args.prompt)
    context = prompt or [tok.eot_id]
    idx = torch.tensor([context] * args.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None, generator=gen
    )
    return [tok.decode(row[len(context) - len(prompt) :]) for row in out.tolist()]


def main(argv: list[str] | None = None) -> int:
    from checkpoint import CheckpointError
    from tokenizer import TokenizerError

    try:
        samples = generate(parse_args(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    for i, text in enumerate(samples):
        # the text as written, newlines included: a sample is read, not parsed
        print(f"---- sample {i + 1} of {len(samples)} ----")
        print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_command(main))
