"""Arena-Hard, AlpacaEval 2 LC and WildBench statistics against the published formulas.

The references are the upstream computations written out here with scikit-learn / numpy exactly as
the benchmarks' code calls them (arena-hard-auto v0.1 compute_mle_elo / fit_bt / bootstrap,
alpaca_eval's fit_LogisticRegressionCV with its soft-label duplication and scorer, WildBench's
view_wb_eval arithmetic), on fixed, stored judgements.
"""
import math
import random

import numpy as np
import pytest

from lmfoundry.eval import pairwise as P
from lmfoundry.eval import pairwise_stats as S

sklearn = pytest.importorskip("sklearn")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


# ---- Arena-Hard ----
VERDICTS = ["A>>B", "A>B", "A=B", "B>A", "B>>A", None]


def _games(seed, n=40, models=("m1", "m2")):
    rnd = random.Random(seed)
    return [(m, q, [rnd.choice(VERDICTS), rnd.choice(VERDICTS)]) for m in models for q in range(n)]


def test_arena_battles_follow_v01_show_result():
    battles = S.arena_battles([("m", 7, ["A>>B", "A>>B"]), ("m", 8, ["B>A", None]), ("m", 9, ["A=B", "A<B"])])
    winners = [w for _, w, _ in battles]
    # game 1 (baseline = A): A>>B is 3 baseline wins; game 2 (model = A): A>>B is 3 model wins
    assert winners == ["base"] * 3 + ["model"] * 3 + ["model", "tie"]
    assert all(m == "m" for m, _, _ in battles)


def _mle_elo_reference(battles, baseline="base"):
    """arena-hard-auto v0.1 utils_math.compute_mle_elo, model_a = baseline in every battle."""
    from sklearn.linear_model import LogisticRegression
    models = sorted({m for m, _, _ in battles}) + [baseline]
    idx = {m: i for i, m in enumerate(models)}
    rows = battles + battles                       # duplicate battles
    X = np.zeros((len(rows), len(models)))
    Y = np.zeros(len(rows))
    for r, (m, winner, _) in enumerate(rows):
        X[r, idx[baseline]] = math.log(10)
        X[r, idx[m]] = -math.log(10)
        Y[r] = 1.0 if winner == "base" else 0.0
        if winner == "tie" and r < len(battles):  # one tie = one A win + one B win
            Y[r] = 1.0
    lr = LogisticRegression(fit_intercept=False, penalty=None, tol=1e-8).fit(X, Y)
    elo = 400 * lr.coef_[0] + 1000
    elo += 1000 - elo[idx[baseline]]
    return {m: 1 / (1 + 10 ** ((elo[idx[baseline]] - elo[idx[m]]) / 400)) for m in models if m != baseline}


def test_bradley_terry_win_rates_match_sklearn_mle_elo():
    battles = S.arena_battles(_games(0))
    ours = S.bt_winrates(battles)
    ref = _mle_elo_reference(battles)
    assert ours.keys() == ref.keys()
    for m in ours:
        assert ours[m] == pytest.approx(ref[m], abs=1e-6)
    # with one opponent the MLE is the win share (ties count half)
    m1 = [w for m, w, _ in battles if m == "m1"]
    share = (m1.count("model") + 0.5 * m1.count("tie")) / len(m1)
    assert ours["m1"] == pytest.approx(share, abs=1e-9)


def test_bootstrap_interval_is_percentiles_of_refits_on_resampled_battles():
    battles = S.arena_battles(_games(1, n=25, models=("m1",)))
    ours = S.arena_hard_scores(battles, rounds=30, seed=5)["m1"]
    refits = [_mle_elo_reference([battles[i] for i in idx])["m1"]
              for idx in S.bootstrap_indices(len(battles), 30, 5)]
    lo, hi = np.percentile(refits, [2.5, 97.5])
    assert ours["ci95"] == pytest.approx([100 * lo, 100 * hi], abs=1e-4)
    assert ours["score"] == pytest.approx(100 * _mle_elo_reference(battles)["m1"], abs=1e-4)
    assert ours["ci95"][0] < ours["score"] < ours["ci95"][1]


def test_style_control_matches_sklearn_fit_bt():
    from sklearn.linear_model import LogisticRegression
    rnd = random.Random(3)
    battles = S.arena_battles(_games(2, n=30, models=("m1",)))
    meta = {}
    for q in range(30):
        meta[(None, q)] = [rnd.randint(50, 900), rnd.randint(0, 5), rnd.randint(0, 9), rnd.randint(0, 6)]
        meta[("m1", q)] = [rnd.randint(50, 900), rnd.randint(0, 5), rnd.randint(0, 9), rnd.randint(0, 6)]
    ours = S.bt_winrates(battles, S.style_features(battles, meta))["m1"]
    # v0.1 construct_style_matrices (add_one, all ratios) + fit_bt (sklearn defaults: L2, C=1)
    a = np.array([meta[(None, q)] for _, _, (q, _) in battles], float)
    b = np.array([meta[(m, q)] for m, _, (q, _) in battles], float)
    diff = (a - b) / (a + b + 1)
    style = (diff - diff.mean(axis=0)) / diff.std(axis=0)
    n = len(battles)
    X = np.zeros((2 * n, 2 + 4))
    X[:, 0], X[:, 1] = -math.log(10), math.log(10)          # columns: m1, baseline
    X[:, 2:] = np.vstack([style, style])
    Y = np.array([1.0 if w == "base" else 0.0 for _, w, _ in battles] * 2)
    Y[:n][[w == "tie" for _, w, _ in battles]] = 1.0
    coef = LogisticRegression(fit_intercept=False, tol=1e-12, max_iter=10000).fit(X, Y).coef_[0]
    elo = 400 * coef[:2] + 1000
    assert ours == pytest.approx(1 / (1 + 10 ** ((elo[1] - elo[0]) / 400)), abs=1e-6)


def test_arena_verdict_parsing_follows_gen_judgment():
    assert P.arena_verdict("blah [[B>A]] so [[B>A]]") == "B>A"
    assert P.arena_verdict("first [[A>B]] then [[B>A]]") is None      # two different verdicts
    assert P.arena_verdict("My final verdict is tie: A=B") is None


# ---- AlpacaEval 2 ----
def _alpaca_table(seed=0, n=60):
    rnd = np.random.default_rng(seed)
    len_base = rnd.integers(200, 2000, n)
    len_model = rnd.integers(100, 3000, n)
    difficulty = rnd.normal(0, 1, n)
    logit = 0.8 * np.tanh((len_base - len_model) / 700.0) - 0.5 * difficulty + 0.3
    prefs = 2 - 1 / (1 + np.exp(-logit)) + rnd.normal(0, 0.05, n)
    prefs = np.clip(prefs, 1.0, 2.0)
    prefs[3] = 0.0   # a draw
    return list(prefs), list(len_base), list(len_model), list(difficulty)


def test_alpaca_raw_win_rate_formula():
    prefs, *_ = _alpaca_table()
    got = S.alpaca_winrate(prefs)
    p = np.array([1.5 if x == 0 else x for x in prefs])
    assert got["win_rate"] == pytest.approx(100 * (p - 1).mean())
    assert got["standard_error"] == pytest.approx(100 * (p - 1).std(ddof=1) / math.sqrt(len(p)))
    assert got["n_wins"] + got["n_wins_base"] + got["n_draws"] == len(p) and got["n_draws"] >= 1


def _published_lc(prefs, len_base, len_model, difficulty, gamed=None):
    """alpaca_eval metrics/glm_winrate.py: features (gamed-baseline rows first, weight lambda/2), soft-label
    duplication, LogisticRegressionCV(L1, liblinear, no intercept, 5-fold GroupKFold, its log-loss scorer)."""
    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold
    delta = np.array(len_base, float) - np.array(len_model, float)
    sd = delta / delta.std(ddof=1)
    y = np.array([1.5 if x == 0 else x for x in prefs]) - 1
    X = np.column_stack([np.tanh(sd), difficulty, np.ones(len(y))])
    weight = None
    if gamed is not None:
        g = np.array(gamed)
        X = np.vstack([np.column_stack([np.tanh(g[:, 1]), g[:, 2], np.zeros(len(g))]), X])
        y = np.concatenate([g[:, 0], y])
        weight = np.concatenate([np.full(len(g), 0.2 / 2), np.ones(len(prefs))])
    n, n_model = len(y), len(prefs)
    X_dup, y_dup = np.vstack([X, X]), np.concatenate([np.ones(n), np.zeros(n)])
    true_prob = np.concatenate([y, 1 - y])
    true_weight = None if weight is None else np.concatenate([weight, weight])
    groups = np.concatenate([np.arange(n), np.arange(n)])

    def logloss_continuous(y_true, y_pred, true_prob, true_sample_weight=None):
        y_true = np.where(y_true == 1, true_prob, 1 - true_prob)
        y_pred = np.clip(y_pred, 1e-15, 1 - 1e-15)
        ll = y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred)
        return -np.mean(ll if true_sample_weight is None else ll * true_sample_weight)
    sklearn.set_config(enable_metadata_routing=True)
    try:
        scorer = make_scorer(logloss_continuous, response_method="predict_proba", greater_is_better=False) \
            .set_score_request(true_sample_weight=True, true_prob=True)
        model = LogisticRegressionCV(cv=GroupKFold(n_splits=5), scoring=scorer, random_state=123, dual=False,
                                     penalty="l1", solver="liblinear", fit_intercept=False, tol=1e-10,
                                     max_iter=100000)
        model.set_fit_request(sample_weight=True)
        model.fit(X_dup, y_dup, sample_weight=true_prob * (1 if true_weight is None else true_weight), groups=groups,
                  true_sample_weight=true_weight, true_prob=true_prob)
    finally:
        sklearn.set_config(enable_metadata_routing=False)
    X_test = np.column_stack([np.zeros(n_model), difficulty, np.ones(n_model)])
    return 100 * model.predict_proba(X_test)[:, 1].mean(), model.C_[0]


@pytest.mark.parametrize("with_gamed", [False, True], ids=["plain", "gamed-baselines"])
def test_length_controlled_win_rate_matches_alpaca_evals_glm(with_gamed):
    prefs, lb, lm, diff = _alpaca_table()
    gamed = None
    if with_gamed:   # two length-gamed baselines' rows: (preference in [0, 1], std_delta_len, difficulty)
        rnd = np.random.default_rng(7)
        gamed = [[float(np.clip(0.5 + 0.3 * np.tanh(s) + rnd.normal(0, 0.1), 0, 1)), float(s), float(d)]
                 for s, d in zip(rnd.normal(0, 1.5, 40), rnd.normal(0, 1, 40))]
    ours = S.lc_winrate(prefs, lb, lm, diff, gamed)
    ref, ref_C = _published_lc(prefs, lb, lm, diff, gamed)
    assert ours["glm_C"] == pytest.approx(ref_C)
    assert ours["length_controlled_winrate"] == pytest.approx(ref, abs=1e-4)
    # the LC rate is the mean fitted probability with the length term at zero
    w = ours["glm_weights"]
    direct = 100 * np.mean(1 / (1 + np.exp(-(w["instruction_difficulty"] * np.array(diff)
                                             + w["not_gamed_baseline.astype(float)"]))))
    assert ours["length_controlled_winrate"] == pytest.approx(direct)


def test_l1_logistic_matches_liblinear():
    from sklearn.linear_model import LogisticRegression
    rnd = np.random.default_rng(1)
    X = np.column_stack([rnd.normal(size=80), rnd.normal(size=80), np.ones(80)])
    p = 1 / (1 + np.exp(-(X @ np.array([1.0, -0.4, 0.2])))) * 0.9 + 0.05
    for C in (0.05, 1.0, 30.0):
        ours = S.l1_logistic(X, p, np.ones(80), C)
        lr = LogisticRegression(C=C, penalty="l1", solver="liblinear", fit_intercept=False, tol=1e-12,
                                max_iter=100000).fit(np.vstack([X, X]), np.r_[np.ones(80), np.zeros(80)],
                                                     sample_weight=np.r_[p, 1 - p])
        assert ours == pytest.approx(lr.coef_[0], abs=2e-5)


def test_alpaca_preference_from_logprobs_text_or_nothing():
    lp = {"message": {"content": "M"}, "logprobs": {"content": [{"token": "M", "logprob": -0.1, "top_logprobs": [
        {"token": "M", "logprob": math.log(0.75)}, {"token": "m", "logprob": math.log(0.25)},
        {"token": "Both", "logprob": -9.0}]}]}}
    assert P.alpaca_preference(lp) == pytest.approx(2 - 0.25)
    assert P.alpaca_preference({"message": {"content": " m "}}) == 1.0
    assert P.alpaca_preference({"message": {"content": "Output (a) is better"}}) is None
    assert P.alpaca_preference({"message": {"content": "x"}, "logprobs": {"content": [
        {"token": "x", "logprob": 0.0, "top_logprobs": [{"token": "x", "logprob": 0.0}]}]}}) is None


# ---- WildBench ----
def test_wb_score_and_task_macro_score():
    scores = [8.0, 6.0, 3.0, 9.0]
    tags = [["Coding & Debugging"], ["Creative Writing", "Editing"], ["Math", "Data Analysis"], ["Planning"]]
    got = S.wb_score(scores, tags)
    assert got["wb_score"] == pytest.approx((np.mean(scores) - 5) * 2 * 10)
    # view_wb_eval.py: a task counts once per tag, so task 2 counts twice in "Creative Tasks"
    groups = {"Coding & Debugging": [8.0], "Creative Tasks": [6.0, 6.0], "Math & Data Analysis": [3.0, 3.0],
              "Planning & Reasoning": [9.0]}
    macro = np.mean([(np.mean(v) - 5) * 2 for v in groups.values()]) * 10
    assert got["task_macro_score"] == pytest.approx(macro)


def test_wb_reward_with_length_penalty():
    outcomes = [("model", 2, 3000, 100),   # much better: never penalised
                ("model", 1, 2000, 1000),  # slightly better but 1000 chars longer than K=500: a tie
                ("model", 1, 1200, 1000),  # slightly better, within K
                ("ref", 1, 100, 900),      # reference slightly better and longer by 800: a tie
                ("ref", 2, 10, 10), ("tie", 0, 5, 5), (None, 0, 5, 5)]   # unparseable: counted, no reward
    got = S.wb_reward(outcomes, K=500)
    assert (got["win_much"], got["win"], got["tie"], got["lose"], got["lose_much"]) == (1, 1, 3, 0, 1)
    assert got["reward"] == pytest.approx(100 * (1 + 0.5 + 0 + 0 - 1 + 0 + 0) / 7)
    off = S.wb_reward(outcomes, K=-1)
    assert off["reward"] == pytest.approx(100 * (1 + 0.5 + 0.5 - 0.5 - 1) / 7)


def test_json_judgment_parsing():
    assert P.parse_json_judgment('```\n{\n  "score": "7"\n}\n```')["score"] == "7"
    assert P.parse_json_judgment('{"choice": "A+",\n}')["choice"] == "A+"      # trailing comma, as the template has
    assert P.parse_json_judgment("no json here") is None
