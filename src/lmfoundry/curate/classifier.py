"""Model-based quality filter: a fastText classifier of "hq" (positive) against "cc" (negative)
documents, as DCLM trained its OH-2.5 + ELI5 vs RefinedWeb filter.

    train_classifier(["good.jsonl"], ["web.jsonl"], "quality.bin")     # bigrams, DCLM's settings
    QualityModel("quality.bin").score(text)                              # P(hq) in [0, 1]

Training lines are `__label__hq <text>` / `__label__cc <text>` with newlines turned into spaces
(DCLM's inference does the same), shuffled with a fixed seed; a held-out tenth reports accuracy.
Defaults follow DCLM's released model: wordNgrams 2, otherwise fastText's defaults (lr 0.1,
dim 100, epoch 5, minCount 1, 2M hash buckets for the bigrams: a ~0.8 GB model; fewer
buckets make it smaller). The model file is fastText's own binary format (no pickle).
Needs the `fasttext` package: pip install 'lmfoundry[curate]'.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path

from ..errors import DataError
from ..records import expand_files, read_texts

LABELS = ("hq", "cc")
TRAIN_DEFAULTS = {"lr": 0.1, "dim": 100, "epoch": 5, "wordNgrams": 2, "minCount": 1, "bucket": 2_000_000}


def _fasttext():
    try:
        import fasttext
    except ImportError:
        raise DataError("the quality classifier needs fastText (pip install 'lmfoundry[curate]')") from None
    return fasttext


def _line(label: str, text: str) -> str:
    return f"__label__{label} " + " ".join(text.split()) + "\n"


def train_classifier(positive, negative, out, text_field: str = "text", holdout: float = 0.1, seed: int = 0,
                     **settings) -> dict:
    """Train on documents of the `positive` and `negative` files; write the model to `out`.
    Returns {"documents": {...}, "holdout_accuracy": ..., "settings": ...}."""
    fasttext = _fasttext()
    unknown = set(settings) - set(TRAIN_DEFAULTS)
    if unknown:
        raise DataError(f"classifier train: unknown setting(s) {sorted(unknown)} (known: {sorted(TRAIN_DEFAULTS)})")
    lines = []
    counts = {}
    for label, files in zip(LABELS, (positive, negative)):
        before = len(lines)
        for path in expand_files(files):
            lines += [_line(label, t) for _, t in read_texts(path, text_field)]
        counts[label] = len(lines) - before
        if not counts[label]:
            raise DataError(f"classifier train: no {('positive', 'negative')[LABELS.index(label)]} documents")
    random.Random(seed).shuffle(lines)
    n_hold = int(len(lines) * holdout) if len(lines) >= 20 else 0
    held, train = lines[:n_hold], lines[n_hold:]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.txt"
        data.write_text("".join(train), encoding="utf-8")
        model = fasttext.train_supervised(str(data), **{**TRAIN_DEFAULTS, **settings}, thread=1, seed=seed,
                                          verbose=0)
        part = out.with_name(out.name + ".tmp")
        model.save_model(str(part))
        os.replace(part, out)
    result = {"documents": counts, "settings": {**TRAIN_DEFAULTS, **settings}, "holdout": len(held)}
    if held:
        qm = QualityModel(out)
        right = sum((qm.score(line.split(" ", 1)[1]) >= 0.5) == line.startswith("__label__hq") for line in held)
        result["holdout_accuracy"] = right / len(held)
    return result


class QualityModel:
    """A trained classifier; `score(text)` is the probability of the "hq" label."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: classifier model not found (train one with `lmfoundry data classifier "
                            "train`)")
        fasttext = _fasttext()
        try:
            self.model = fasttext.load_model(str(self.path))
        except ValueError as e:
            raise DataError(f"{self.path}: not a fastText model ({e})") from None
        labels = [lab.replace("__label__", "") for lab in self.model.get_labels()]
        if "hq" not in labels:
            raise DataError(f"{self.path}: the model has no '__label__hq' label (labels: {labels})")
        with open(self.path, "rb") as f:
            self.fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]

    def score(self, text: str) -> float:
        # the list form of predict (one line per string): the single-string form breaks on numpy 2
        labels, probs = self.model.predict([" ".join(text.split())], k=-1)
        for label, p in zip(labels[0], probs[0]):
            if label == "__label__hq":
                return float(min(max(p, 0.0), 1.0))
        return 0.0
