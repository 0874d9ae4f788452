"""`lmfoundry eval compare A.json B.json ...`: any results files side by side, with standard errors.

Reads lm-eval-shaped results (lmfoundry's and lm-evaluation-harness's own: "acc" or "acc,none",
"acc_stderr[,none]", "N/A"), and lmfoundry's judge summaries (MT-Bench / KoMT-Bench / LogicKor
summary.json, and the Arena-Hard / AlpacaEval / WildBench ones, whose "table" lists each metric
with its standard error). One row per (task, metric), one column per file, "value ± stderr".
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import EvalDataError


def _num(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return float(x)


def _from_results(results: dict) -> dict:
    rows = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or _num(value) is None or key in ("alias", "sample_len"):
                continue
            name = metric if filt in ("", "none") else f"{metric},{filt}"
            se = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            rows[(task, name)] = (float(value), _num(se))
    return rows


def _from_judge(summary: dict) -> dict:
    bench = summary.get("benchmark", "judge")
    if "table" in summary:
        return {(bench, m): (_num(v), _num(se)) for m, (v, se) in summary["table"].items()}
    rows = {}
    for name in ("overall", "single_turn", "multi_turn"):
        part = summary.get(name)
        if isinstance(part, dict) and _num(part.get("mean")) is not None:
            ci = part.get("ci95_normal")
            rows[(bench, name)] = (part["mean"], (ci[1] - part["mean"]) / 1.96 if ci else None)
        elif _num(part) is not None:
            rows[(bench, name)] = (float(part), None)
    return rows


def load_scores(path) -> tuple[str, dict]:
    """(column label, {(task, metric): (value, stderr or None)}) from one results file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{path}: not a JSON results file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        label = str((data.get("config") or {}).get("model") or (data.get("config") or {}).get("model_args") or path.stem)
        return Path(label).name or path.stem, _from_results(data["results"])
    if isinstance(data, dict) and "benchmark" in data:
        return str(data.get("model") or path.stem), _from_judge(data)
    raise EvalDataError(f"{path}: neither lm-eval-shaped results (a 'results' mapping) nor a judge summary.json")


def compare_table(paths) -> str:
    if len(paths) < 1:
        raise EvalDataError("eval compare needs at least one results file")
    columns = [load_scores(p) for p in paths]
    labels = [label for label, _ in columns]
    if len(set(labels)) < len(labels):   # same model twice: tell the columns apart by file
        labels = [f"{label} ({Path(p).name})" for label, p in zip(labels, paths)]
    keys = list(dict.fromkeys(k for _, scores in columns for k in scores))
    if not keys:
        raise EvalDataError(f"no scores found in {', '.join(map(str, paths))}")

    def cell(scores, key):
        if key not in scores or scores[key][0] is None:
            return "-"
        v, se = scores[key]
        return f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else "")
    rows = [("Task", "Metric", *labels)] + [(t, m, *(cell(s, (t, m)) for _, s in columns)) for t, m in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]])
