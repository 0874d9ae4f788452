"""Training curves as PNGs (matplotlib, the `plots` extra): the quickstart's report and
`lmfoundry plot RUN_DIR...` draw with the same pieces.

    plot_runs(["runs/a", "runs/b"], out="plots")   -> [plots/loss.png, plots/lr.png, plots/throughput.png]

A run directory is what the training loop writes: OUT/metrics.jsonl, one JSON object per logged
step (step, loss, lr, tokens, tokens_per_s, eval_loss on evaluation steps, ...).
"""
from __future__ import annotations

from pathlib import Path

from .errors import DataError, LMFoundryError

COLORS = ("black", "tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:green", "tab:brown", "tab:pink",
          "tab:gray", "tab:olive", "tab:cyan")
# file name -> (title, y label, [(metrics key, line style label)])
FIGURES = {
    "loss.png": ("loss", "loss (nats/token)", [("loss", "train"), ("eval_loss", "held-out")]),
    "lr.png": ("learning rate", "learning rate", [("lr", None)]),
    "throughput.png": ("throughput", "tokens/s", [("tokens_per_s", None)]),
}


def pyplot(required: bool = False):
    """matplotlib.pyplot on the file-only Agg backend; None when matplotlib is missing (or an error if required)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if required:
            raise LMFoundryError("plots need matplotlib: pip install 'lmfoundry[plots]'") from None
        return None
    return plt


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of the rows that have `key`."""
    rows = [r for r in rows if key in r and x in r]
    return [r[x] for r in rows], [r[key] for r in rows]


def loss_curves(ax, rows: list[dict], label: str, color: str, x: str = "step", scale: float = 1.0):
    """Training loss as a thin line and held-out loss as dots, in one colour per run."""
    xs, ys = series(rows, "loss", x)
    ax.plot([v * scale for v in xs], ys, lw=1, alpha=0.6, color=color, label=f"{label}, train")
    xs, ys = series(rows, "eval_loss", x)
    ax.plot([v * scale for v in xs], ys, "o-", ms=3, color=color, label=f"{label}, held-out")


def read_metrics(run_dir) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl (RUN_DIR may also name the file itself)."""
    from .records import read_records
    path = Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: not found (a training run directory holds metrics.jsonl)")
    rows = [r for _, r in read_records(path)]
    if not any("step" in r for r in rows):
        raise DataError(f"{path}: no rows with a 'step' (is this a training run's metrics.jsonl?)")
    return rows


def plot_runs(run_dirs, out=".", x: str = "step") -> list[Path]:
    """Loss, learning-rate and throughput curves of one or several runs, one PNG each, in `out`."""
    plt = pyplot(required=True)
    runs = {str(d): read_metrics(d) for d in run_dirs}
    labels = _labels(list(runs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, ylabel, keys) in FIGURES.items():
        if not any(series(rows, k, x)[0] for rows in runs.values() for k, _ in keys):
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for k, (run, rows) in enumerate(runs.items()):
            color = COLORS[k % len(COLORS)]
            if name == "loss.png":
                loss_curves(ax, rows, labels[run], color, x)
            else:
                ax.plot(*series(rows, keys[0][0], x), lw=1.2, color=color, label=labels[run])
        ax.set(title=title, xlabel=x, ylabel=ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def _labels(runs: list[str]) -> dict[str, str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [Path(r).name or r for r in runs]
    return {r: (n if names.count(n) == 1 else r) for r, n in zip(runs, names)}
