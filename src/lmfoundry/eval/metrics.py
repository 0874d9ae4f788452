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


def regex_extract(text: str, pattern: re.Pattern, group_select: int = 0, fallback: str = INVALID) -> str:
    """lm-eval's regex filter: findall, pick one match, its first non-empty group, stripped."""
    found = pattern.findall(text if isinstance(text, str) else "")
    if not found:
        return fallback
    m = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def gsm8k_strict(text: str) -> str:
    return regex_extract(text, STRICT_RE, 0)


def gsm8k_flexible(text: str) -> str:
    return regex_extract(text, FLEXIBLE_RE, -1)


def exact_match(prediction: str, reference: str) -> float:
    """lm-eval's GSM8K exact_match: ignore_case and regexes_to_ignore [",", "$", ".*#### ", "."$]."""
    return exact_match_hf(prediction, reference, regexes_to_ignore=IGNORE_RES, ignore_case=True)


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


# ---- lm-eval's metric_list / filter_list vocabulary (YAML tasks) ----
# Per-document values are aggregated by name; "f1" and "mcc" keep (gold, pred) pairs per document
# and score the whole set at once, as lm-eval's aggregations do (sklearn's binary F1 and MCC there,
# the same formulas written out here).

def exact_match_hf(prediction: str, reference: str, regexes_to_ignore=None, ignore_case=False,
                   ignore_punctuation=False, ignore_numbers=False) -> float:
    """lm-eval's exact_match (HF evaluate's): drop each regex from both, then optionally lower-case,
    strip string.punctuation and digits; 1.0 when equal."""
    import string
    for pattern in regexes_to_ignore or ():
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for on, chars in ((ignore_punctuation, string.punctuation), (ignore_numbers, string.digits)):
        if on:
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


EXACT_MATCH_OPTIONS = ("regexes_to_ignore", "ignore_case", "ignore_punctuation", "ignore_numbers")


def median(xs) -> float:
    return sorted(xs)[len(xs) // 2]


def nanmean(xs) -> float:
    vals = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return mean(vals) if vals else float("nan")


def perplexity_of(lls) -> float:
    """exp(-mean log-likelihood): lm-eval's "perplexity" aggregation of per-document log-likelihoods."""
    return math.exp(-mean(lls))


def weighted_perplexity(pairs) -> float:
    """exp(-sum ll / sum units) over (log-likelihood, words or bytes) pairs."""
    return math.exp(-sum(a for a, _ in pairs) / sum(b for _, b in pairs))


def bits_per_byte(pairs) -> float:
    return -sum(a for a, _ in pairs) / sum(b for _, b in pairs) / math.log(2)


def f1_binary(pairs) -> float:
    """F1 of class 1 over (gold, pred) pairs (sklearn's f1_score default); 0.0 with no positives."""
    labels = {int(g) for g, _ in pairs} | {int(p) for _, p in pairs}
    if len(labels) > 2 or not labels <= {0, 1}:
        from ..errors import EvalDataError
        raise EvalDataError(f"metric f1 is lm-eval's binary F1 (classes 0 and 1); these documents have classes "
                            f"{sorted(labels)}: give the metric an aggregation for more classes")
    tp = sum(1 for g, p in pairs if int(g) == 1 and int(p) == 1)
    fp = sum(1 for g, p in pairs if int(g) != 1 and int(p) == 1)
    fn = sum(1 for g, p in pairs if int(g) == 1 and int(p) != 1)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(pairs) -> float:
    """Matthews correlation over (gold, pred) pairs, any number of classes (sklearn's formula)."""
    n = len(pairs)
    labels = sorted({int(g) for g, _ in pairs} | {int(p) for _, p in pairs})
    t_sum = [sum(1 for g, _ in pairs if int(g) == c) for c in labels]
    p_sum = [sum(1 for _, p in pairs if int(p) == c) for c in labels]
    correct = sum(1 for g, p in pairs if int(g) == int(p))
    cov_ytyp = correct * n - sum(t * p for t, p in zip(t_sum, p_sum))
    cov_ypyp = n * n - sum(p * p for p in p_sum)
    cov_ytyt = n * n - sum(t * t for t in t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp)


def brier_score(pairs) -> float:
    """Mean over documents of sum_k (p_k - [k == gold])^2, p the softmax of the choices' log-likelihoods."""
    return mean([sum((p - (k == gold)) ** 2 for k, p in enumerate(probs)) for gold, probs in pairs])


def softmax(xs) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


AGGREGATIONS = {"mean": mean, "median": median, "nanmean": nanmean, "perplexity": perplexity_of,
                "weighted_perplexity": weighted_perplexity, "bits_per_byte": bits_per_byte, "f1": f1_binary,
                "matthews_corrcoef": matthews_corrcoef, "brier_score": brier_score}
# lm-eval bootstraps the standard error of these (mean has its closed form; the rest get none)
BOOTSTRAPPED = ("median", "nanmean", "perplexity", "f1", "matthews_corrcoef")


def bootstrap_stderr(fn, xs, iters: int) -> float:
    """lm-eval's bootstrap: chunks of min(1000, iters) resamples, chunk i drawn by random.Random(i);
    the sample standard deviation of the statistic over all resamples."""
    import random
    chunk = min(1000, iters)
    stats = []
    for i in range(iters // chunk):
        rnd = random.Random(i)
        stats.extend(fn(rnd.choices(xs, k=len(xs))) for _ in range(chunk))
    mu = mean(stats)
    return math.sqrt(sum((s - mu) ** 2 for s in stats) / (len(stats) - 1))


def pooled_stderr(stderrs, sizes) -> float:
    """The standard error of a size-weighted mean of subtasks (lm-eval's pooled_sample_stderr)."""
    var = sum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def unweighted_stderr(stderrs) -> float:
    return math.sqrt(sum(se ** 2 for se in stderrs)) / len(stderrs)


# filters: each maps one document's list of responses to a new list (or, take_first, to one value)
def _regex_filter(regex_pattern=r"#### (\-?[0-9\.\,]+)", group_select=0, fallback=INVALID):
    pattern = re.compile(regex_pattern)
    return lambda resps: [regex_extract(r, pattern, group_select, fallback) for r in resps]


def _take_first_k(k):
    def apply(resps):
        if len(resps) < k:
            from ..errors import EvalDataError
            raise EvalDataError(f"filter take_first_k needs {k} responses per document (repeats), got {len(resps)}")
        return resps[:k]
    return apply


def _majority_vote():
    from collections import Counter
    return lambda resps: [Counter(resps).most_common(1)[0][0]]


def _map_filter(mapping_dict=None, default_value=None):
    mapping = mapping_dict or {}
    return lambda resps: [mapping.get(r, default_value) for r in resps]


FILTERS = {
    "regex": _regex_filter,
    "take_first": lambda: (lambda resps: resps[0]),
    "take_first_k": _take_first_k,
    "majority_vote": _majority_vote,
    "remove_whitespace": lambda: (lambda resps: [r.strip() for r in resps]),
    "lowercase": lambda: (lambda resps: [r.lower() for r in resps]),
    "uppercase": lambda: (lambda resps: [r.upper() for r in resps]),
    "map": _map_filter,
}
