"""Per-document work: a pipeline's steps applied to one document at a time (inside the workers).

`build(config)` turns each declared step into a function `run(doc, ctx) -> Removal | None` that
may also rewrite `doc` (C4 keeps lines, redaction replaces identifiers) and annotate `ctx.meta`
(language, classifier score, PII counts, contamination), which is written next to the document.
`process_chunk` runs them over a batch and returns per-document outcomes plus the batch's
statistics (documents and words in and out per step and per rule, PII counts, histograms).
"""
from __future__ import annotations

import math

import numpy as np

from .filters import DEFAULTS as FILTER_DEFAULTS
from .filters import Doc, Removal, check
from .lang import identify
from .pii import redact

LENGTH_BINS = np.logspace(1, 7, 31)          # characters, 10 .. 10M
SCORE_BINS = np.linspace(0, 1, 21)


class Context:
    """What the steps learn about one document besides its text."""
    __slots__ = ("meta", "prior", "exact", "signature")

    def __init__(self, meta: dict, prior: dict | None):
        self.meta, self.prior, self.exact, self.signature = meta, prior or {}, None, None


def _language(p):
    keep, min_score = set(p["keep"] or ()), p["min_score"]

    def run(doc, ctx):
        if keep and doc.lang not in keep:
            return Removal("language", "not_kept", doc.lang, sorted(keep))
        if min_score and ctx.meta["lang_score"] < min_score:
            return Removal("language", "min_score", ctx.meta["lang_score"], min_score)
    return run


def _rules(name):
    def make(p):
        return lambda doc, ctx: check(name, doc, p)
    return make


def _classifier(p):
    from .classifier import QualityModel
    model, threshold = QualityModel(p["model"]), p["threshold"]

    def run(doc, ctx):
        prior = ctx.prior
        score = prior.get("quality") if prior.get("quality_model") == model.fingerprint else None
        if score is None:
            score = model.score(doc.text)
        ctx.meta["quality"], ctx.meta["quality_model"] = round(score, 6), model.fingerprint
        if threshold is not None and score < threshold:
            return Removal("classifier", "min_score", score, threshold)
    return run


def _redact(p):
    types, public_only = tuple(p["types"]), p["public_ips_only"]

    def run(doc, ctx):
        text, counts = redact(doc.text, types, public_only)
        if counts:
            doc.set_text(text)
            ctx.meta["pii"] = counts
    return run


def _decontaminate(p):
    from .decontam import BenchmarkIndex
    index, remove = BenchmarkIndex.from_tasks(p["tasks"], p["data_dir"], p["n"]), p["action"] == "remove"

    def run(doc, ctx):
        found = index.match(doc.text)
        if found:
            ctx.meta["contaminated"] = found
            if remove:
                return Removal("decontaminate", f"{p['n']}-gram_overlap", ",".join(sorted(found)), p["n"])
    return run


def _dedup(p):
    from .dedup import MinHasher, exact_hash
    hasher = MinHasher(p["num_perm"], p["ngram"], p["seed"])
    ab = hasher.params()

    def run(doc, ctx):
        if p["exact"]:
            ctx.exact = exact_hash(doc.text)
        if p["near"]:
            ctx.signature = hasher.signature(doc.text, ab)
    return run


BUILDERS = {"language": _language, **{name: _rules(name) for name in FILTER_DEFAULTS}, "classifier": _classifier,
            "redact": _redact, "decontaminate": _decontaminate, "dedup": _dedup}


def build(steps: list[tuple[str, dict]]) -> list[tuple[str, callable]]:
    """[(unique step label, run)]; a step used twice is labelled name#2."""
    out, seen = [], {}
    for name, params in steps:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", BUILDERS[name](params)))
    return out


# ---------------------------------------------------------------- statistics

def new_stats() -> dict:
    return {"documents": {"in": 0, "out": 0}, "words": {"in": 0, "out": 0}, "steps": {}, "removed": {},
            "languages": {}, "pii": {}, "pii_documents": 0, "contamination": {},
            "histograms": {"length": [0] * (len(LENGTH_BINS) - 1), "quality": [0] * (len(SCORE_BINS) - 1)}}


def merge_stats(a: dict, b: dict) -> dict:
    """a += b, recursively: numbers add, histograms add bin by bin, id lists take the union."""
    for k, v in b.items():
        if k not in a:
            a[k] = v if not isinstance(v, dict) else merge_stats({}, v)
        elif isinstance(v, dict):
            merge_stats(a[k], v)
        elif k == "benchmark_docs":
            a[k] = sorted(set(a[k]) | set(v))
        elif isinstance(v, list):
            a[k] = [x + y for x, y in zip(a[k], v)]
        else:
            a[k] += v
    return a


def bump(d: dict, key: str, **counts):
    row = d.setdefault(key, {})
    for k, n in counts.items():
        row[k] = row.get(k, 0) + n


def _bin(bins: np.ndarray, value: float) -> int:
    return int(min(max(np.searchsorted(bins, value, side="right") - 1, 0), len(bins) - 2))


def process(steps, backend: str, text: str, prior: dict | None, stats: dict):
    """(removal dict or None, new text or None, meta, exact hash, signature) for one document."""
    original = text
    lang, score = identify(text, backend)
    doc, ctx = Doc(text, lang), Context({"lang": lang, "lang_score": score}, prior)
    words = len(text.split())
    stats["documents"]["in"] += 1
    stats["words"]["in"] += words
    stats["languages"][lang] = stats["languages"].get(lang, 0) + 1
    stats["histograms"]["length"][_bin(LENGTH_BINS, len(text))] += 1
    removal = None
    for label, run in steps:
        if label != "dedup":                 # dedup is counted when duplicates are dropped (phase 3)
            bump(stats["steps"], label, docs_in=1, words_in=words)
        removal = run(doc, ctx)
        if doc.text is not text:
            text, words = doc.text, len(doc.text.split())
        if removal is not None:
            bump(stats["removed"], f"{label}/{removal.rule}", docs=1, words=words)
            break
        if label != "dedup":
            bump(stats["steps"], label, docs_out=1, words_out=words)
    _annotate_stats(stats, ctx.meta, removal is None, words)
    return (removal.as_dict() if removal else None, None if doc.text is original else doc.text, ctx.meta, ctx.exact,
            ctx.signature)


def _annotate_stats(stats: dict, meta: dict, kept: bool, words: int):
    if kept:
        stats["documents"]["out"] += 1
        stats["words"]["out"] += words
    if "quality" in meta and not math.isnan(meta["quality"]):
        stats["histograms"]["quality"][_bin(SCORE_BINS, meta["quality"])] += 1
    if "pii" in meta:
        stats["pii_documents"] += 1
        for k, n in meta["pii"].items():
            stats["pii"][k] = stats["pii"].get(k, 0) + n
    for task, ids in meta.get("contaminated", {}).items():
        row = stats["contamination"].setdefault(task, {"corpus_docs": 0, "benchmark_docs": []})
        row["corpus_docs"] += 1
        row["benchmark_docs"] = sorted(set(row["benchmark_docs"]) | set(ids))


# ---------------------------------------------------------------- worker entry points

_STATE: dict = {}


def init_worker(step_list, backend):
    _STATE["steps"], _STATE["backend"] = build(step_list), backend


def process_chunk(items):
    """Worker task: [(text, prior meta)] -> ([outcome per document], statistics of the chunk)."""
    stats = new_stats()
    out = [process(_STATE["steps"], _STATE["backend"], text, prior, stats) for text, prior in items]
    return out, stats
