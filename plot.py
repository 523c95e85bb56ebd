"""Draw training and validation loss of one or more runs into a PNG (needs matplotlib).

    python plot.py                                  # the newest run in runs/ -> runs/NAME/losses.png
    python plot.py runs/a runs/b --output ab.png    # or: python train.py --plot runs/a runs/b

Training losses are a line. Validation losses are markers joined by a faint dotted line:
they are measured only every --eval-every steps, and a solid line between two of them would
read as measurements that were never made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from runtime import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, ConfigError, run_command

RUNS = Path("runs")  # where train.py puts a run unless --out says otherwise
OUTPUT_NAME = "losses.png"


def read_metrics(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: the rest still plots
        if not isinstance(record, dict):
            continue  # (not a record of ours)
        if record.get("type") == "train" and not record.get("skipped"):
            train.append((record["step"], record["loss"]))
        elif record.get("type") == "eval":
            val.append((record["step"], record["val_loss"]))
    return train, val


def newest_run(root: Path = RUNS) -> Path:
    """The run folder under root whose metrics.jsonl was written last."""
    runs = [path.parent for path in root.glob("*/metrics.jsonl")]
    if not runs:
        raise ConfigError(
            f"no run to plot: {root}/ holds no run folder with a metrics.jsonl. "
            "HINT: name the run folders, python plot.py RUN [RUN ...]"
        )
    return max(runs, key=lambda run: (run / "metrics.jsonl").stat().st_mtime)


def check_runs(runs: list[Path]) -> None:
    missing = [run for run in runs if not (run / "metrics.jsonl").is_file()]
    if missing:
        raise ConfigError(
            f"no metrics.jsonl in {', '.join(map(str, missing))}. HINT: name run folders, the --out of train.py"
        )
    if not any(any(read_metrics(run)) for run in runs):  # an empty picture is no answer
        raise ConfigError(
            f"nothing to plot: {', '.join(map(str, runs))} recorded no loss yet. HINT: plot once a run has "
            "logged its first step"
        )


def import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError(
            "plotting needs matplotlib, which is not installed. "
            'HINT: pip install matplotlib (or pip install -e ".[plot]")'
        ) from e
    return plt


def output_path(output: str | None, runs: list[Path]) -> Path:
    """The file to write: --output as given, in PNG where it names no format, or losses.png
    inside it where it is a folder; a format matplotlib cannot write, or a folder that is not
    there, is refused before anything is drawn."""
    if output is None:
        return runs[0] / OUTPUT_NAME
    path = Path(output)
    if path.is_dir() or output.endswith(("/", os.sep)):
        if not path.is_dir():
            raise ConfigError(f"--output {output}: no such folder. HINT: create it, or name a file to write")
        return path / OUTPUT_NAME
    if not path.parent.is_dir():
        raise ConfigError(f"--output {output}: no folder {path.parent}. HINT: create it, or write somewhere else")
    if not path.suffix:
        return path.with_name(path.name + ".png")  # (what matplotlib would write, said in the message)
    from matplotlib.backend_bases import FigureCanvasBase  # (import_pyplot has checked it is installed)

    supported = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix[1:].lower() not in supported:
        raise ConfigError(
            f"--output {output}: matplotlib cannot write {path.suffix} files. HINT: end the name with one of "
            f"{', '.join('.' + ext for ext in supported)}"
        )
    return path


def draw(runs: list[Path], output: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        train, val = read_metrics(run)
        color = None
        if train:
            (line,) = ax.plot(*zip(*train), alpha=0.6, label=f"{run.name} train")
            color = line.get_color()
        if val:
            ax.plot(*zip(*val), "o:", color=color, markersize=4, linewidth=0.8, label=f"{run.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs", nargs="*", type=Path, help=f"run folders, each with a metrics.jsonl (default: the newest in {RUNS}/)"
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"the file to write: PNG, or the format its extension names (.pdf, .svg ...); a folder: {OUTPUT_NAME} "
        f"in it (default: {OUTPUT_NAME} in the first run folder)",
    )
    args = parser.parse_args(argv)
    try:
        runs = args.runs
        if not runs:
            runs = [newest_run()]
            print(f"plotting {runs[0]}, the newest run in {RUNS}/")
        check_runs(runs)
        plt = import_pyplot()
        output = output_path(args.output, runs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        draw(runs, output, plt)
    except OSError as e:
        print(f"error: could not write {output}: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {output}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_command(main))
