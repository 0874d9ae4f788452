"""Metrics against hand computations, through a stub model whose log-likelihoods we choose."""
import math

import pytest

from lmfoundry.eval import evaluate, h6_table
from lmfoundry.eval import metrics as M
from lmfoundry.eval.samples import write_sample_data


class StubLM:
    """An LM whose loglikelihood is a function of (context, continuation) we control."""
    name, batch_size, max_length, share_prefix = "stub", 1, 4096, True

    def __init__(self, ll=None, gen=None):
        self.ll, self.gen = ll, gen
        self.seen = []

    def loglikelihood(self, requests, groups=None, desc=""):
        self.seen.extend(requests)
        return [(self.ll(c, x), False) for c, x in requests]

    def generate_until(self, requests, desc=""):
        return [self.gen(c, kw) for c, kw in requests]


def test_acc_norm_and_acc_bytes_differ_from_acc_when_lengths_differ():
    # acc takes the raw sum; acc_norm divides by characters; acc_bytes by UTF-8 bytes
    assert M.multiple_choice([-2.0, -5.0], ["a", "bbbbbbbbbb"], gold=1) == {"acc": 0.0, "acc_norm": 1.0,
                                                                           "acc_bytes": 1.0}
    # "가나": 2 characters but 6 bytes; "ab c": 4 and 4
    m = M.multiple_choice([-3.0, -5.0], ["가나", "ab c"], gold=0)
    assert (m["acc"], m["acc_norm"], m["acc_bytes"]) == (1.0, 0.0, 1.0)
    assert M.argmax([1.0, 1.0, 0.5]) == 0           # ties go to the first, as numpy.argmax


def test_mc2_is_the_normalised_probability_mass_on_true_answers():
    assert M.mc2([math.log(0.5), math.log(0.3), math.log(0.2)], [1, 0, 1]) == pytest.approx(0.7)
    lls = [-1.0, -2.0, -3.0]
    want = (math.exp(-1) + math.exp(-2)) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert M.mc2(lls, [1, 1, 0]) == pytest.approx(want)
    assert M.mc2([-1000.0, -1001.0], [0, 1]) == pytest.approx(1 / (1 + math.e))   # no underflow


@pytest.mark.parametrize("text,strict,flexible", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", "72"),
    ("The total is #### -3,000 dollars", "-3,000", "-3,000"),
    ("He has 5 apples, then 12.", "[invalid]", "12."),
    ("It costs $1,234.50 in all", "[invalid]", "$1,234.50"),
    ("no numbers here", "[invalid]", "[invalid]"),
    ("#### 7 and later #### 8", "7", "8"),
])
def test_gsm8k_strict_and_flexible_extraction(text, strict, flexible):
    assert M.gsm8k_strict(text) == strict
    assert M.gsm8k_flexible(text) == flexible


def test_gsm8k_exact_match_ignores_commas_dollars_case_and_final_period():
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 1,800"
    assert M.exact_match("1800", ref) == 1.0
    assert M.exact_match("$1,800.", ref) == 1.0
    assert M.exact_match("1800.5", ref) == 0.0
    assert M.exact_match("[invalid]", ref) == 0.0
    # Leaderboard v1 (harness b281b09): the first "#### N", commas removed, nothing else
    assert M.gsm8k_leaderboard("so #### 1,800", ref) == 1.0
    assert M.gsm8k_leaderboard("so the answer is 1800", ref) == 0.0


def test_stderr_is_the_sample_standard_error():
    xs = [1.0, 0.0, 1.0, 1.0]
    mu = 0.75
    assert M.stderr(xs) == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in xs) / 3 / 4))


@pytest.fixture
def data(tmp_path):
    return write_sample_data(tmp_path)


def test_winogrande_partial_scoring_picks_the_context_under_which_the_rest_is_likelier(data):
    # the continuation is shared; the option that makes it likelier wins
    def ll(ctx, cont):
        assert cont.startswith(" ")
        return -1.0 if ctx.endswith(("Sarah", "trophy", "bottle")) else -2.0
    lm = StubLM(ll)
    res = evaluate(lm, ["winogrande"], data, log_samples=True)
    # gold: Sarah (1), trophy (1), cup (2): the stub is right twice, wrong once
    assert res["results"]["winogrande"]["acc"] == pytest.approx(2 / 3)
    assert set(res["results"]["winogrande"]) >= {"acc", "acc_stderr"}
    conts = {x for _, x in lm.seen}
    assert conts == {" always got the harder cases.", " is too large.", " was full."}


def test_mmlu_reports_micro_and_macro_averages(data):
    # right on anatomy (1 question), wrong on both mathematics questions
    def ll(ctx, cont):
        return 0.0 if ("anatomy" in ctx and cont == " C") else (-1.0 if cont == " D" else -2.0)
    res = evaluate(StubLM(ll), ["mmlu"], data)["results"]
    assert res["mmlu_anatomy"]["acc"] == 1.0 and res["mmlu_elementary_mathematics"]["acc"] == 0.0
    assert res["mmlu"]["acc"] == pytest.approx(1 / 3)          # micro: weighted by size (lm-eval's group)
    assert res["mmlu"]["acc_macro"] == pytest.approx(0.5)      # macro: Leaderboard v1


def test_arc_acc_and_acc_norm_through_the_evaluator(data):
    # the stub prefers the shortest choice by raw sum, the longest per character
    def ll(ctx, cont):
        return -1.0 * len(cont) ** 0.5
    res = evaluate(StubLM(ll), ["arc_easy"], data, log_samples=True)
    samples = res["samples"]["arc_easy"]
    for s in samples:
        choices = [x[1:] for _, x in s["arguments"]]
        lls = [r[0] for r in s["resps"]]
        assert s["metrics"]["acc"] == float(max(range(len(lls)), key=lambda i: (lls[i], -i)) == s["target"])
        norm = [ll / len(c) for ll, c in zip(lls, choices)]
        assert s["metrics"]["acc_norm"] == float(max(range(len(norm)), key=lambda i: (norm[i], -i)) == s["target"])
    assert res["results"]["arc_easy"]["acc"] != res["results"]["arc_easy"]["acc_norm"]


def test_truthfulqa_mc2_through_the_evaluator(data):
    def ll(ctx, cont):
        return {" Nothing in particular happens if you crack your knuckles a lot.": math.log(0.4),
                " It is harmless to crack your knuckles.": math.log(0.2),
                " If you crack your knuckles a lot, you will develop arthritis.": math.log(0.3),
                " Your fingers will fall off.": math.log(0.1),
                " No, it is too narrow to see from the Moon.": math.log(0.25),
                " Yes, it is easy to see.": math.log(0.75)}[cont]
    r = evaluate(StubLM(ll), ["truthfulqa_mc2"], data)["results"]["truthfulqa_mc2"]
    assert r["acc"] == pytest.approx((0.6 + 0.25) / 2)


def test_gsm8k_generation_metrics_through_the_evaluator(data):
    outs = {"Tom": " Tom has 7 apples.\n#### 7", "train": " It goes 180 km, so 170."}
    lm = StubLM(gen=lambda ctx, kw: outs["Tom" if "Tom has 3" in ctx.split("\n\n")[-1] else "train"])
    r = evaluate(lm, ["gsm8k"], data, num_fewshot=0)["results"]["gsm8k"]
    assert r["exact_match,strict-match"] == 0.5         # only the first has "#### N"
    assert r["exact_match,flexible-extract"] == 0.5     # the second's last number is 170, not 180


def test_h6_table_and_average():
    res = {"arc_challenge": {"acc_norm": 0.5}, "hellaswag": {"acc_norm": 0.7}, "mmlu": {"acc_macro": 0.4},
           "truthfulqa_mc2": {"mc2": 0.45}, "winogrande": {"acc": 0.6}, "gsm8k": {"acc": 0.1}}
    h = h6_table(res)
    assert h["columns"] == pytest.approx({"ARC": 50.0, "HellaSwag": 70.0, "MMLU": 40.0, "TruthfulQA": 45.0,
                                          "Winogrande": 60.0, "GSM8K": 10.0})
    assert h["average"] == pytest.approx(275 / 6)
    assert h["shots"] == {"ARC": 25, "HellaSwag": 10, "MMLU": 5, "TruthfulQA": 0, "Winogrande": 5, "GSM8K": 5}
    del res["gsm8k"]
    assert h6_table(res)["average"] is None
