"""Progress: a live bar with rate and ETA on a terminal, plain lines in a pipe, never both in one line."""

from __future__ import annotations

import io
import re

import pytest
from terminal import run_in_pipe, run_in_pty, screen

from edgekidney.progress import Display, format_rate, format_seconds, render_bar

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_shows_count_rate_eta_and_status():
    text = render_bar("epoch 2/10", 5, 25, 10.0, "batch", "loss 0.412", width=200)
    assert "5/25 batch" in text and "2.0 s/batch" in text  # 5 batches in 10 s
    assert "0:10 elapsed, ETA 0:40" in text and text.endswith("loss 0.412")
    assert format_rate(30, 10.0, "slice") == "3.0 slice/s"
    assert format_seconds(3725) == "1:02:05" and format_seconds(65) == "1:05"


def test_bar_is_cut_to_the_terminal_width():
    text = render_bar("epoch 1/2", 1, 3, 1.0, "batch", "x" * 300, width=80)
    assert len(text) < 80 and text.endswith("…")


def test_in_a_pipe_only_log_lines_are_written_once_each():
    out, err = io.StringIO(), io.StringIO()
    d = Display(out=out, err=err)
    with d.stage("epoch 1/1", 4, "batch") as s:
        for _ in range(4):
            s.advance(1, status="loss 0.5")
        d.log("epoch 1: done")
    d.log("warned", err=True)
    assert out.getvalue() == "epoch 1: done\n" and err.getvalue() == "warned\n"


def test_on_a_terminal_the_bar_never_shares_a_line_with_a_log_line():
    tty = FakeTTY()
    d = Display(out=tty, err=tty, min_interval=0.0)
    for epoch in (1, 2):
        with d.stage(f"epoch {epoch}/2", 3, "batch") as s:
            for _ in range(3):
                s.advance(1, status="loss 0.5")
            d.log(f"epoch {epoch}: train_loss 0.5")
    raw = tty.getvalue()
    assert raw.count("3/3 batch") >= 2 and "ETA" in raw  # the bar was drawn, with its rate and ETA
    assert screen(raw) == ["epoch 1: train_loss 0.5", "epoch 2: train_loss 0.5"]  # and erased


TRAIN = ["-m", "edgekidney", "train", "{data}", "--out", "{out}", "--weights", "none", "--epochs", "2",
         "--image-size", "32", "--batch-size", "8", "--block-size", "8", "--val-fraction", "0.34", "--threads", "1"]


def _train_args(small_real, out):
    return [a.format(data=small_real, out=out) for a in TRAIN]


def test_train_in_a_pipe_prints_each_epoch_once_without_escape_codes(small_real, tmp_path):
    r = run_in_pipe(_train_args(small_real, tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    both = r.stdout + r.stderr
    assert not ANSI.search(both) and "\r" not in both and "━" not in both
    epochs = [l for l in r.stdout.splitlines() if l.startswith("epoch ")]
    assert [l.split(":")[0] for l in epochs] == ["epoch 1", "epoch 2"]
    assert "1 thread(s)" in r.stdout


def test_train_in_a_terminal_shows_a_live_bar_and_each_epoch_line_once(small_real, tmp_path):
    code, raw = run_in_pty(_train_args(small_real, tmp_path / "run"))
    assert code == 0, raw
    assert re.search(r"epoch 1/2 \S+ \d+/\d+ batch · [\d.]+ (s/batch|batch/s) · .*ETA", raw), raw  # live bar frames
    lines = screen(raw)
    epochs = [l for l in lines if l.startswith("epoch ") and "train_loss" in l]
    assert [l.split(":")[0] for l in epochs] == ["epoch 1", "epoch 2"]
    assert sum("train_loss" in l for l in lines) == 2  # no epoch line twice, none glued to a bar
    assert not any("━" in l or "─" in l for l in lines)  # every bar was erased
    assert lines[-1].startswith("wrote ")


@pytest.mark.parametrize("where", ["pipe", "pty"])
def test_infer_over_a_folder_prints_one_table(where, tiny_onnx, small_real):
    args = ["-m", "edgekidney", "infer", str(tiny_onnx), str(small_real / "Stone")]
    if where == "pipe":
        r = run_in_pipe(args)
        assert r.returncode == 0, r.stderr
        lines, raw = r.stdout.splitlines(), r.stdout + r.stderr
        assert not ANSI.search(raw)
    else:
        code, raw = run_in_pty(args)
        assert code == 0, raw
        lines = screen(raw)
        assert "file/s" in raw or "s/file" in raw
    rows = [l for l in lines if "Stone- (" in l]
    assert len(rows) == 24 and len(set(rows)) == 24
    assert lines[0].startswith("label = Stone when p(Stone) >= ")


def test_a_line_cannot_drive_the_terminal_with_control_characters_from_a_file_name():
    """A file named with ESC sequences or a carriage return, printed in the infer table or an error, would
    recolour, rewrite or hide lines on the reader's terminal; they are shown escaped, newlines and tabs
    of the line itself kept."""
    out = io.StringIO()
    Display(out=out, err=io.StringIO()).log("evil\x1b[2J\x1b]0;title\x07.png\rok\x9b\tp 0.1\nnext")
    assert out.getvalue() == "evil\\x1b[2J\\x1b]0;title\\x07.png\\x0dok\\x9b\tp 0.1\nnext\n"


def test_a_table_field_stays_on_its_row_whatever_the_file_name_or_series_description_holds():
    from edgekidney.cli import format_predictions
    from edgekidney.progress import one_line

    assert one_line("a\nb\tc\x1b[1m") == "a\\x0ab\\x09c\\x1b[1m"
    rows = [{"path": "fake\nStone  0.9999  yes  Stone.png", "probability": 0.1, "threshold": 0.5, "in_scope": True,
             "label": "Normal"}]
    table = format_predictions(rows, "Stone", 0.5, "the model's sidecar").splitlines()
    assert len(table) == 3 and table[2].startswith("fake\\x0aStone") and table[2].endswith("Normal")
