"""`lmfoundry plot RUN_DIR...`: curves from the training loop's metrics.jsonl, shared with the quickstart report."""
import json
import struct

import pytest

pytest.importorskip("matplotlib")

from lmfoundry.cli import main  # noqa: E402
from lmfoundry.errors import DataError  # noqa: E402
from lmfoundry.plots import plot_runs, read_metrics, series  # noqa: E402


def run_dir(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n, lr=True):
    out = [{"step": s, "loss": 5 / s, "tokens": 512 * s, "tokens_per_s": 1000.0 + s, **({"lr": 1e-3} if lr else {})}
           for s in range(1, n + 1)]
    out[-1]["eval_loss"] = 4.0
    return out


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_loss_lr_and_throughput_for_several_runs(tmp_path, capsys):
    a, b = run_dir(tmp_path / "a", rows(20)), run_dir(tmp_path / "b", rows(10))
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "png")]) == 0
    printed = capsys.readouterr().out
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert png_size(tmp_path / "png" / name) == (880, 550)
        assert f"wrote {tmp_path / 'png' / name}" in printed
    assert series(read_metrics(a), "eval_loss") == ([20], [4.0])


def test_a_figure_without_data_is_skipped_and_a_non_run_is_refused(tmp_path):
    run = run_dir(tmp_path / "run", rows(5, lr=False))
    assert [p.name for p in plot_runs([run], tmp_path / "png")] == ["loss.png", "throughput.png"]
    with pytest.raises(DataError, match="metrics.jsonl: not found"):
        plot_runs([tmp_path / "png"], tmp_path / "out")
    bad = run_dir(tmp_path / "bad", [{"loss": 1.0}])
    with pytest.raises(DataError, match="no rows with a 'step'"):
        read_metrics(bad)
    assert main(["plot", str(tmp_path / "nothing")]) == 1
