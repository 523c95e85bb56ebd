"""plot.py: which run it draws, where the PNG goes, how validation points look, and its errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import plot
from runs import run_with_stdout_closed
from runtime import EXIT_BROKEN_PIPE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run: Path, train_steps: range, eval_steps: range = range(0)) -> Path:
    run.mkdir(parents=True)
    records = [{"type": "run"}]
    records += [{"type": "train", "step": s, "loss": 5.0 - s / 100} for s in train_steps]
    records += [{"type": "eval", "step": s, "val_loss": 5.1 - s / 100} for s in eval_steps]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture
def pyplot():
    return pytest.importorskip("matplotlib.pyplot")


@pytest.fixture
def drawn_lines(pyplot, monkeypatch) -> list:
    """The lines of the figures plot.py draws, kept open to be looked at."""
    figures = []
    real_subplots, real_close = pyplot.subplots, pyplot.close

    def subplots(*args, **kwargs):
        fig, ax = real_subplots(*args, **kwargs)
        figures.append(fig)
        return fig, ax

    monkeypatch.setattr(pyplot, "subplots", subplots)
    monkeypatch.setattr(pyplot, "close", lambda fig: None)
    yield lambda: [line for fig in figures for ax in fig.axes for line in ax.get_lines()]
    for fig in figures:
        real_close(fig)


def test_without_arguments_the_newest_run_is_drawn_into_its_own_folder(pyplot, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    older = write_run(Path("runs/older"), range(10))
    newer = write_run(Path("runs/newer"), range(10))
    os.utime(older / "metrics.jsonl", (1_000_000, 1_000_000))  # mtimes set, not left to the clock's resolution
    os.utime(newer / "metrics.jsonl", (2_000_000, 2_000_000))
    assert plot.main([]) == 0
    out = capsys.readouterr().out
    assert "plotting runs/newer, the newest run in runs/" in out and "wrote runs/newer/losses.png" in out
    assert (newer / "losses.png").read_bytes()[:8] == PNG_MAGIC
    assert not (older / "losses.png").exists() and not Path("losses.png").exists()


def test_output_names_the_png(pyplot, tmp_path, capsys):
    run = write_run(tmp_path / "run", range(10))
    png = tmp_path / "elsewhere" / "curves.png"
    png.parent.mkdir()
    assert plot.main([str(run), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and not (run / "losses.png").exists()


def test_validation_points_are_markers_not_a_solid_line(drawn_lines, tmp_path):
    run = write_run(tmp_path / "run", range(0, 301), range(0, 301, 100))
    assert plot.main([str(run)]) == 0
    lines = {line.get_label(): line for line in drawn_lines()}
    val = lines["run val"]
    assert list(val.get_xdata()) == [0, 100, 200, 300]
    assert val.get_marker() == "o" and val.get_linestyle() != "-"
    assert lines["run train"].get_color() == val.get_color()


def test_validation_points_are_drawn_even_without_training_records(drawn_lines, tmp_path):
    run = write_run(tmp_path / "run", range(0), range(0, 301, 100))
    assert plot.main([str(run)]) == 0
    assert [line.get_label() for line in drawn_lines()] == ["run val"]


def test_lines_that_are_not_records_are_passed_over(tmp_path):
    run = write_run(tmp_path / "run", range(3))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('5\n["a list"]\n{"type": "train", "step": 3, "loss": 4.9}\n{"type": "tra')
    train, _ = plot.read_metrics(run)
    assert [step for step, _ in train] == [0, 1, 2, 3]


def test_no_run_anywhere_is_an_error_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert plot.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run to plot: runs/ holds no run folder") and "HINT: " in err


def test_a_folder_without_metrics_is_named(tmp_path, capsys):
    assert plot.main([str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err.startswith(f"error: no metrics.jsonl in {tmp_path / 'typo'}. HINT: ")


def test_without_matplotlib_the_error_gives_the_pip_command(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", range(3))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it gives: ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plotting needs matplotlib") and "HINT: pip install matplotlib" in err
    assert not (run / "losses.png").exists()


def test_a_run_with_no_loss_yet_is_an_error_not_an_empty_picture(tmp_path, capsys):
    run = write_run(tmp_path / "run", range(0))
    assert plot.main([str(run)]) == 2
    assert capsys.readouterr().err.startswith(f"error: nothing to plot: {run} recorded no loss yet. HINT: ")
    assert not (run / "losses.png").exists()


def test_an_output_without_extension_gets_png_and_the_message_names_that_file(pyplot, tmp_path, capsys):
    run = write_run(tmp_path / "run", range(5))
    assert plot.main([str(run), "--output", str(tmp_path / "losses")]) == 0
    written = tmp_path / "losses.png"
    assert capsys.readouterr().out == f"wrote {written}\n" and written.read_bytes()[:8] == PNG_MAGIC


def test_an_output_folder_gets_losses_png_inside_it(pyplot, tmp_path, capsys):
    run = write_run(tmp_path / "run", range(5))
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert plot.main([str(run), "--output", str(folder)]) == 0
    assert capsys.readouterr().out == f"wrote {folder / 'losses.png'}\n"
    assert (folder / "losses.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "output, message",
    [
        ("losses.txt", "matplotlib cannot write .txt files. HINT: end the name with one of"),
        ("absent/losses.png", "no folder absent. HINT: "),
        ("absent/", "no such folder. HINT: "),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_drawing(output, message, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    run = write_run(tmp_path / "run", range(5))
    monkeypatch.setattr(plot, "draw", lambda *args: pytest.fail("drawn although --output cannot be written"))
    assert plot.main([str(run), "--output", output]) == plot.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {output}: ") and message in err
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_a_closed_stdout_stops_quietly_with_the_sigpipe_exit_code(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", range(5))
    done = run_with_stdout_closed(["plot.py", str(run)])
    assert done.returncode == EXIT_BROKEN_PIPE and done.stderr == ""
    assert (run / "losses.png").read_bytes()[:8] == PNG_MAGIC
