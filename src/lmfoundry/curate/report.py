"""OUT/report.md and OUT/report.json: what a curation run kept, removed and why.

Built from the per-shard state files, so it is rewritten after every invocation (a
multi-machine run's report fills in as shards finish). "words" are whitespace-separated words,
the tokenizer-free stand-in for tokens. Plots (OUT/plots/*.png) need matplotlib (`plots` extra);
without it the report says so and keeps the histogram counts in report.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from . import steps as S

# The state files live in work/; pipeline.Run names them.


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def gather(run) -> dict:
    """Every shard's statistics merged, with examples, skipped files and the dedup summary."""
    stats, examples, skipped, shards_done, shards_filtered = S.new_stats(), {}, [], 0, 0
    for k in range(len(run.shards)):
        for path in (run.filtered(k), run.done(k)):
            if not path.is_file():
                continue
            state = json.loads(path.read_text(encoding="utf-8"))
            S.merge_stats(stats, state["stats"])
            for rule, rows in state.get("examples", {}).items():
                examples.setdefault(rule, []).extend(rows[:3 - len(examples.get(rule, []))])
            skipped += state.get("skipped_files", [])
        shards_filtered += run.filtered(k).is_file()
        shards_done += run.done(k).is_file()
    dedup_file = run.work / "dedup.json"
    return {"shards": {"total": len(run.shards), "filtered": shards_filtered, "done": shards_done},
            "stats": stats, "examples": examples, "skipped_files": skipped,
            "dedup": json.loads(dedup_file.read_text()) if dedup_file.is_file() else None,
            "config": run.cfg.describe()}


def _benchmark_sizes(cfg) -> dict:
    from .decontam import benchmark_texts
    sizes = {}
    for name, p in cfg.steps:
        if name == "decontaminate":
            sizes.update({t: len(docs) for t, docs in benchmark_texts(p["tasks"], p["data_dir"]).items()})
    return sizes


def plot(report: dict, out: Path) -> list[str]:
    """Histograms of document length and classifier score; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    made = []
    hists = report["stats"]["histograms"]
    for name, bins, xlabel, log in (("length", S.LENGTH_BINS, "characters (input documents)", True),
                                    ("quality", S.SCORE_BINS, "classifier score P(hq)", False)):
        counts = hists[name]
        if not sum(counts):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.stairs(counts, bins, fill=True)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("documents")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        made.append(f"plots/{name}.png")
    return made


def write_report(run, seconds: float) -> dict:
    report = gather(run)
    report["seconds_this_invocation"] = round(seconds, 2)
    if report["stats"]["contamination"]:
        report["benchmark_sizes"] = _benchmark_sizes(run.cfg)
    report["plots"] = plot(report, run.out / "plots")
    tmp = run.out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(run.out / "report.json")
    (run.out / "report.md").write_text(markdown(report), encoding="utf-8")
    st = report["stats"]
    if report["shards"]["done"] == report["shards"]["total"] and st["documents"]["in"] and not st["documents"]["out"]:
        print(f"curate: warning: every document was removed (see {run.out / 'report.md'} and "
              f"{run.out / 'removed'})", file=sys.stderr)
    return report


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def markdown(report: dict) -> str:
    st = report["stats"]
    d_in, d_out, w_in, w_out = st["documents"]["in"], st["documents"]["out"], st["words"]["in"], st["words"]["out"]
    sh = report["shards"]
    lines = ["# Curation report", "",
             f"Shards: {sh['filtered']}/{sh['total']} filtered, {sh['done']}/{sh['total']} finished.", "",
             f"Documents: {d_in:,} in, {d_out:,} kept ({_pct(d_out, d_in)}). "
             f"Words: {w_in:,} in, {w_out:,} kept ({_pct(w_out, w_in)}).", "", "## Steps", ""]
    lines += _table(["step", "docs in", "docs out", "removed", "words in", "words out"],
                    [[k, f"{v.get('docs_in', 0):,}", f"{v.get('docs_out', 0):,}",
                      _pct(v.get("docs_in", 0) - v.get("docs_out", 0), v.get("docs_in", 0)),
                      f"{v.get('words_in', 0):,}", f"{v.get('words_out', 0):,}"] for k, v in st["steps"].items()])
    lines += ["", "## Removed, per rule", ""]
    rules = sorted(st["removed"].items(), key=lambda kv: -kv[1]["docs"])
    lines += _table(["step/rule", "documents", "words"], [[r, f"{v['docs']:,}", f"{v['words']:,}"] for r, v in rules])
    lines += _languages_pii(st) + _dedup(report) + _contamination(report) + _examples(report)
    if report["plots"]:
        lines += ["", "## Histograms", ""] + [f"![{p}]({p})" for p in report["plots"]]
    elif sum(st["histograms"]["length"]):
        lines += ["", "(plots need matplotlib: pip install 'lmfoundry[plots]'; counts are in report.json)"]
    if report["skipped_files"]:
        lines += ["", "## Skipped files", ""] + [f"- {s['file']}: {s['error']}" for s in report["skipped_files"]]
    return "\n".join(lines) + "\n"


def _languages_pii(st: dict) -> list[str]:
    out = ["", "## Languages", ""] + _table(["language", "documents"], sorted(st["languages"].items(),
                                                                               key=lambda kv: -kv[1]))
    if st["pii"]:
        out += ["", f"## PII redacted ({st['pii_documents']:,} documents)", ""]
        out += _table(["type", "replaced"], sorted(st["pii"].items()))
    return out


def _dedup(report: dict) -> list[str]:
    d = report["dedup"]
    if not d:
        return []
    return ["", "## Duplicates", "",
            f"{d['exact_duplicates']:,} exact and {d['near_duplicates']:,} near duplicates removed "
            f"(of {d['documents']:,} documents reaching dedup) in {d['clusters']:,} clusters, the largest of "
            f"{d['largest_cluster']} documents; MinHash {d['num_perm']} hashes over word {d['ngram']}-grams, "
            f"{d['bands']} bands x {d['rows']} rows, Jaccard threshold {d['threshold']}."]


def _contamination(report: dict) -> list[str]:
    c = report["stats"]["contamination"]
    if not c:
        return []
    sizes = report.get("benchmark_sizes", {})
    rows = [[t, v["corpus_docs"], f"{len(v['benchmark_docs'])}/{sizes.get(t, '?')}",
             _pct(len(v["benchmark_docs"]), sizes.get(t, 0))] for t, v in sorted(c.items())]
    return ["", "## Benchmark contamination", ""] + _table(
        ["benchmark", "corpus documents overlapping", "benchmark documents found", "share"], rows)


def _examples(report: dict) -> list[str]:
    out = ["", "## Examples of removed documents", ""]
    for rule, rows in sorted(report["examples"].items()):
        out.append(f"### {rule}")
        for r in rows:
            snippet = " ".join(r["text"].split())[:200]
            out.append(f"- `{r['source']}` (value {r['value']}): {snippet}")
        out.append("")
    return out
