"""Per-document metrics and their aggregation, as lm-evaluation-harness defines them.

Multiple choice, from the per-choice log-likelihoods `lls`:
    acc        argmax(lls) == gold
    acc_norm   argmax(lls / len(choice))            character length, no delimiter
    acc_bytes  argmax(lls / len(choice.encode()))   UTF-8 byte length
    (ties go to the first choice, as numpy.argmax)
TruthfulQA mc2: sum over true answers of exp(ll_i) / sum_j exp(ll_j) (no length normalisation).
GSM8K: "strict-match" takes the first `#### N`, "flexible-extract" the last number-like string;
exact_match removes ",", "$", everything up to "#### " and a final "." from prediction and
reference, lower-cases both and compares. The Open LLM Leaderboard v1 harness (b281b09) used
only the `#### N` regex, removed commas, and scored an unmatched output as wrong.
"""
from __future__ import annotations

import math
import re

INVALID = "[invalid]"
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_RES = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]


def argmax(xs) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def multiple_choice(lls, choices, gold: int) -> dict:
    lls = [float(x) for x in lls]
    return {
        "acc": float(argmax(lls) == gold),
        "acc_norm": float(argmax([ll / len(c) if len(c) else ll for ll, c in zip(lls, choices)]) == gold),
        "acc_bytes": float(argmax([ll / len(c.encode("utf-8")) if c else ll for ll, c in zip(lls, choices)]) == gold),
    }


def mc2(lls, labels) -> float:
    """Normalised probability mass on the true answers (TruthfulQA MC2)."""
    m = max(lls)
    p = [math.exp(ll - m) for ll in lls]   # the common factor exp(m) cancels
    total = sum(p)
    return sum(pi for pi, lab in zip(p, labels) if int(lab) == 1) / total


def regex_extract(text: str, pattern: re.Pattern, group_select: int = 0) -> str:
    """lm-eval's regex filter: findall, pick one match, its first non-empty group, stripped."""
    found = pattern.findall(text if isinstance(text, str) else "")
    if not found:
        return INVALID
    m = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), INVALID)
    return m.strip()


def gsm8k_strict(text: str) -> str:
    return regex_extract(text, STRICT_RE, 0)


def gsm8k_flexible(text: str) -> str:
    return regex_extract(text, FLEXIBLE_RE, -1)


def _clean(s: str) -> str:
    for r in IGNORE_RES:
        s = r.sub("", s)
    return s.lower()


def exact_match(prediction: str, reference: str) -> float:
    """lm-eval's GSM8K exact_match: ignore_case and regexes_to_ignore [",", "$", ".*#### ", "."$]."""
    return float(_clean(prediction) == _clean(reference))


def gsm8k_leaderboard(completion: str, answer: str) -> float:
    """Harness b281b09 (Open LLM Leaderboard v1): the first `#### N`, commas removed, vs the reference's."""
    def extract(s):
        m = STRICT_RE.search(s)
        return m.group(1).strip().replace(",", "") if m else INVALID
    gold = extract(answer)
    return float(gold != INVALID and extract(completion) == gold)


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def stderr(xs) -> float:
    """Standard error of the mean with the n-1 sample deviation (lm-eval's mean_stderr)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)
