"""What a run reports: OUT/metrics.jsonl, and the same series in the trackers of `report_to`.

    metrics.jsonl   one JSON object per logged step: step, loss, lr, grad_norm, tokens,
                    tokens_per_s, step_seconds, the objective's statistics, eval_* at evaluation steps
    tensorboard     OUT/tensorboard/ event files: every series as a scalar, the run's settings as text
    wandb           a Weights & Biases run in OUT/wandb/, offline unless WANDB_MODE says otherwise
                    (`wandb sync OUT/wandb/offline-run-*` uploads it later); the settings as its config

Everything is written by rank 0 only. A resume drops the rows after its step (metrics.jsonl,
TensorBoard's purge_step) so the series reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

from ..errors import TrainError


def _step_of(line: str) -> float:
    """The step of a metrics row; a row cut short by a crash counts as after any resume point."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _need(package: str, tracker: str):
    try:
        return __import__(package, fromlist=["_"])
    except ImportError:
        raise TrainError(f"--report-to {tracker} needs the {tracker} package (pip install {tracker})") from None


class TensorBoard:
    def __init__(self, out: Path, resumed_from: int | None, config: dict):
        tb = _need("torch.utils.tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(str(out / "tensorboard"), purge_step=resumed_from)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```",
                             resumed_from or 0)

    def log(self, row: dict):
        for k, v in row.items():
            if k != "step":
                self.writer.add_scalar(k, v, row["step"])

    def close(self):
        self.writer.close()


class Wandb:
    def __init__(self, out: Path, resumed_from: int | None, config: dict):
        wandb = _need("wandb", "wandb")
        id_file = out / "wandb" / "lmfoundry-run-id"
        if resumed_from is not None and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmfoundry"), name=out.name, id=run_id,
                              resume="allow", dir=str(out), mode=os.environ.get("WANDB_MODE", "offline"),
                              config=config, settings=wandb.Settings(console="off", silent=True))

    def log(self, row: dict):
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self):
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb}


class Metrics:
    """OUT/metrics.jsonl and the trackers named in `report_to`, on rank 0."""

    def __init__(self, out: Path, rank: int, resumed_from: int | None, report_to=(), config: dict | None = None):
        self.file, self.trackers = None, []
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if resumed_from is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= resumed_from]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        try:
            for name in report_to:
                self.trackers.append(TRACKERS[name](out, resumed_from, config or {}))
        except BaseException:
            self.close()
            raise
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict):
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.log(row)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


class Window:
    """Running sums between two logged rows: a row reports the mean over its steps."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss, self.steps, self.tokens, self.time, self.stats = 0.0, 0, 0, 0.0, {}

    def add(self, loss: float, stats: dict[str, float], tokens: int, seconds: float):
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        self.time += seconds
        for name, v in stats.items():
            self.stats[name] = self.stats.get(name, 0.0) + v

    def row(self, step: int, lr: float, grad_norm: float, tokens_seen: int) -> dict:
        """The row for `step`; the window starts over."""
        row = {"step": step, "loss": self.loss / self.steps, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
               "tokens_per_s": self.tokens / max(self.time, 1e-9), "step_seconds": self.time / self.steps,
               **{n: v / self.steps for n, v in self.stats.items()}}
        self.reset()
        return row
