"""Draw training and validation loss of one or more runs into a PNG (needs matplotlib).

python plot.py runs/a runs/b --output losses.png      # or: python train.py --plot runs/a runs/b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "train" and not record.get("skipped"):
            train.append((record["step"], record["loss"]))
        elif record.get("type") == "eval":
            val.append((record["step"], record["val_loss"]))
    return train, val


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--output", default="losses.png", help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: plotting needs matplotlib: pip install matplotlib (or the 'plot' extra)", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in map(Path, args.runs):
        if not (run / "metrics.jsonl").is_file():
            print(f"error: {run / 'metrics.jsonl'} not found", file=sys.stderr)
            return 1
        train, val = read_metrics(run)
        if train:
            (line,) = ax.plot(*zip(*train), alpha=0.6, label=f"{run.name} train")
            if val:
                ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{run.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
