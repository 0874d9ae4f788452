"""The statistics behind the pairwise judge benchmarks, as their authors compute them.

Arena-Hard v0.1 (lmarena/arena-hard-auto @0489bf384a show_result.py, utils_math.py):
- a question gives two games: the baseline as assistant A, then as assistant B. A verdict becomes
  one battle (baseline vs model) won by the better side, or a tie; a "much better" verdict (>>)
  counts as 3 battles; a game without a verdict counts as none.
- Bradley-Terry: logistic regression without intercept on rows x = ln(10) * (e_a - e_b), each
  battle twice (a tie once as an A win and once as a B win); ratings 400*beta + 1000 with the
  baseline at 1000; the score is the win probability against the baseline,
  1 / (1 + 10^((R_base - R_model) / 400)); the 95% interval comes from the 2.5 / 97.5
  percentiles of 100 refits on battles resampled with replacement.
- style control: four more columns, per battle (a - b) / (a + b + 1) for answer tokens, headers,
  list items and bold spans (a = baseline), standardised over the battles; fitted with an L2
  penalty (C = 1), as upstream's fit_bt.
AlpacaEval 2 (tatsu-lab/alpaca_eval @cd543a149d metrics/winrate.py, metrics/glm_winrate.py):
- preference 1 = baseline better, 2 = model better (0 = draw, read as 1.5); win rate = mean(p - 1).
- length-controlled: a logistic GLM without intercept on tanh(std_delta_len), the instruction's
  difficulty and a constant (not_gamed_baseline), std_delta_len = (len(baseline) - len(model))
  characters / their standard deviation; soft labels p - 1 with rows weighted p and 1 - p; L1
  penalty with C picked by 5-fold group cross-validation of the weighted log loss from
  10 values in [1e-4, 1e4]; LC win rate = 100 * mean of the fitted probability with the length
  term set to 0. Gamed-baseline rows, when given, join the fit with weight 0.1 each.
WildBench v2 (allenai/WildBench @d6b8dcaf37 src/view_wb_eval.py):
- WB-Score = (mean score - 5) * 2 * 10; the leaderboard's task-macro score averages
  (mean - 5) * 2 over five task groups (each task counted once per tag) and multiplies by 10.
- WB-Reward = 100 * mean of +1 / +0.5 / 0 / -0.5 / -1 (much better ... much worse) over all
  tasks; a slight win or loss whose winner is more than K characters longer is a tie (K = 500;
  K < 0 turns it off).
"""
from __future__ import annotations

import math

import numpy as np

# ---- Arena-Hard ----
# game 1 puts the baseline first (assistant A), game 2 the model
GAME_WINNER = {("A>>B", 0): ("base", 3), ("A>B", 0): ("base", 1), ("A=B", 0): ("tie", 1),
               ("B>A", 0): ("model", 1), ("B>>A", 0): ("model", 3),
               ("A>>B", 1): ("model", 3), ("A>B", 1): ("model", 1), ("A=B", 1): ("tie", 1),
               ("B>A", 1): ("base", 1), ("B>>A", 1): ("base", 3)}


def arena_battles(games, weight: int = 3) -> list:
    """[(model name, winner: "base" | "model" | "tie", (question id, game))] from
    [(model, question id, [verdict of game 1, verdict of game 2])]."""
    out = []
    for model, qid, verdicts in games:
        for g, verdict in enumerate(verdicts):
            winner, n = GAME_WINNER.get((verdict, g), (None, 0))
            if winner is not None:
                out.extend([(model, winner, (qid, g))] * (n if n == 1 else weight))
    return out


def _design(battles, models, style=None):
    """Upstream's doubled design: each battle twice; y = 1 for a baseline (A) win, a tie once 1 once 0."""
    n, p = len(battles), len(models)
    X = np.zeros((2 * n, p + (0 if style is None else style.shape[1])))
    col = {m: i for i, m in enumerate(models)}
    y = np.zeros(2 * n)
    for i, (model, winner, _) in enumerate(battles):
        for r in (i, i + n):
            X[r, col[None]] = math.log(10)
            X[r, col[model]] = -math.log(10)
        y[i] = y[i + n] = 1.0 if winner == "base" else 0.0
        if winner == "tie":
            y[i] = 1.0
    if style is not None:
        X[:, p:] = np.vstack([style, style])
    return X, y


def logistic_fit(X, y, l2: float = 0.0, weights=None, iters: int = 100):
    """Coefficients minimising sum w * logloss(y, sigmoid(X b)) + l2/2 |b|^2 (Newton's method)."""
    w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
    beta = np.zeros(X.shape[1])
    for _ in range(iters):
        z = X @ beta
        q = 1 / (1 + np.exp(-z))
        grad = X.T @ (w * (q - y)) + l2 * beta
        hess = (X * (w * q * (1 - q))[:, None]).T @ X + l2 * np.eye(X.shape[1]) + 1e-12 * np.eye(X.shape[1])
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        beta = beta - np.clip(step, -5, 5)
        if np.max(np.abs(step)) < 1e-12:
            break
    return beta


def bt_winrates(battles, style=None) -> dict:
    """{model: Bradley-Terry win probability against the baseline} (with style columns, if given)."""
    models = [None] + sorted({m for m, _, _ in battles})
    X, y = _design(battles, models, style)
    l2 = 0.0
    if style is not None:   # upstream fit_bt: sklearn's default L2 penalty, C = 1 (l2 = 1/C)
        l2 = 1.0
    else:   # no penalty; the baseline's coefficient is fixed at 0 (ratings are relative)
        X = X[:, 1:]
    beta = logistic_fit(X, y, l2=l2)
    if style is None:
        beta = np.concatenate([[0.0], beta])
    # P(model beats baseline) = 1 / (1 + 10^((R_b - R_m)/400)), R = 400 * beta + const
    return {m: 1 / (1 + 10 ** (beta[0] - beta[i])) for i, m in enumerate(models) if m is not None}


def style_features(battles, meta: dict) -> np.ndarray:
    """Standardised (a - b) / (a + b + 1) per battle for [tokens, headers, lists, bold]; `meta` maps
    (model name or None for the baseline, question id) to those four counts."""
    rows = []
    for model, _, (qid, _) in battles:
        a, b = np.array(meta[(None, qid)], float), np.array(meta[(model, qid)], float)
        rows.append((a - b) / (a + b + 1))
    d = np.array(rows)
    std = d.std(axis=0)
    return (d - d.mean(axis=0)) / np.where(std == 0, 1.0, std)


def bootstrap_indices(n: int, rounds: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, n) for _ in range(rounds)]


def arena_hard_scores(battles, meta=None, rounds: int = 100, seed: int = 0) -> dict:
    """{model: {"score", "ci95": [lo, hi], "battles"}}: win rate against the baseline (percent)."""
    style = style_features(battles, meta) if meta is not None else None
    full = bt_winrates(battles, style)
    boots = {m: [] for m in full}
    for idx in bootstrap_indices(len(battles), rounds, seed):
        sample = [battles[i] for i in idx]
        rates = bt_winrates(sample, None if style is None else style[idx])
        for m in boots:
            if m in rates:
                boots[m].append(rates[m])
    out = {}
    for m, p in full.items():
        lo, hi = np.percentile(boots[m], [2.5, 97.5]) if boots[m] else (float("nan"), float("nan"))
        out[m] = {"score": 100 * p, "ci95": [100 * float(lo), 100 * float(hi)],
                  "battles": sum(1 for b in battles if b[0] == m)}
    return out


# ---- AlpacaEval ----
def alpaca_winrate(prefs) -> dict:
    """AlpacaEval's get_winrate on preferences in [1, 2] (1 = baseline, 2 = model, 0 = draw)."""
    p = np.array([1.5 if x == 0 else x for x in prefs], float)
    n = len(p)
    return {"win_rate": 100 * float(np.mean(p - 1)),
            "standard_error": 100 * float(np.std(p - 1, ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "n_wins": int((p > 1.5).sum()), "n_wins_base": int((p < 1.5).sum()), "n_draws": int((p == 1.5).sum()),
            "n_total": n, "discrete_win_rate": 100 * float(((p > 1.5).sum() + 0.5 * (p == 1.5).sum()) / n)}


def l1_logistic(X, p, s, C: float, tol: float = 1e-12, sweeps: int = 20000):
    """argmin_w |w|_1 + C * sum_i s_i * logloss(p_i, sigmoid(x_i w)) (soft labels p; liblinear's L1
    objective without intercept), by coordinate descent with Newton steps and backtracking."""
    n, d = X.shape
    w = np.zeros(d)

    def objective(w):
        z = X @ w
        return np.abs(w).sum() + C * np.sum(s * (np.logaddexp(0, z) - p * z))
    f = objective(w)
    for _ in range(sweeps):
        biggest = 0.0
        for j in range(d):
            q = 1 / (1 + np.exp(-(X @ w)))
            g = C * np.sum(s * (q - p) * X[:, j])
            h = C * np.sum(s * q * (1 - q) * X[:, j] ** 2) + 1e-12
            z = w[j] - g / h
            target = math.copysign(max(abs(z) - 1 / h, 0.0), z)
            step = target - w[j]
            while step != 0.0:
                trial = w.copy()
                trial[j] += step
                f_trial = objective(trial)
                if f_trial <= f + 1e-15:
                    w, f = trial, f_trial
                    biggest = max(biggest, abs(step))
                    break
                step /= 2
                if abs(step) < 1e-16:
                    break
        if biggest < tol:
            break
    return w


def group_kfold(n_groups: int, k: int = 5) -> list:
    """sklearn's GroupKFold (>= 1.6) for equally sized groups: group g goes to fold (n - 1 - g) mod k."""
    return [(n_groups - 1 - g) % k for g in range(n_groups)]


def _weighted_logloss(p, q, s):
    q = np.clip(q, 1e-15, 1 - 1e-15)
    return -np.mean(s * (p * np.log(q) + (1 - p) * np.log(1 - q)))


def glm_fit(X, p, s, folds: int = 5) -> tuple[np.ndarray, float]:
    """AlpacaEval's LogisticRegressionCV: C from logspace(-4, 4, 10) by the mean weighted log loss of
    group-k-fold held-out rows, then the L1 fit on every row with that C."""
    Cs = np.logspace(-4, 4, 10)
    fold = np.array(group_kfold(len(p), folds))
    scores = []
    for C in Cs:
        fold_scores = []
        for f in range(folds):
            train, test = fold != f, fold == f
            w = l1_logistic(X[train], p[train], s[train], C)
            q = 1 / (1 + np.exp(-(X[test] @ w)))
            fold_scores.append(-_weighted_logloss(p[test], q, s[test]))
        scores.append(np.mean(fold_scores))
    best = float(Cs[int(np.argmax(scores))])
    return l1_logistic(X, p, s, best), best


def lc_winrate(prefs, len_baseline, len_model, difficulty=None, gamed=None) -> dict:
    """AlpacaEval 2's length-controlled win rate. `difficulty`: per instruction (None drops the term);
    `gamed`: extra rows (preference in [0, 1], std_delta_len, instruction_difficulty) from gamed
    baselines, weighted lambda / 2 = 0.1 each."""
    pref = np.array([0.5 if x == 0 else x - 1 for x in prefs], float)
    delta = np.array(len_baseline, float) - np.array(len_model, float)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    std_delta = delta / std if std > 0 else np.zeros_like(delta)
    diff = None if difficulty is None else np.array(difficulty, float)

    def design(sd, dif, not_gamed):
        cols = [np.tanh(sd)] + ([dif] if diff is not None else []) + [not_gamed]
        return np.column_stack(cols)
    X = design(std_delta, diff, np.ones(len(pref)))
    s = np.ones(len(pref))
    y = pref
    if gamed is not None and len(gamed):
        g = np.array(gamed, float)
        X = np.vstack([design(g[:, 1], g[:, 2], np.zeros(len(g))), X])
        y = np.concatenate([g[:, 0], pref])
        s = np.concatenate([np.full(len(g), 0.1), s])
    w, C = glm_fit(X, y, s)
    X_test = design(np.zeros(len(pref)), diff, np.ones(len(pref)))
    q = 1 / (1 + np.exp(-(X_test @ w)))
    names = ["np.tanh(std_delta_len)"] + (["instruction_difficulty"] if diff is not None else []) + \
        ["not_gamed_baseline.astype(float)"]
    return {"length_controlled_winrate": 100 * float(q.mean()),
            "lc_standard_error": 100 * float(q.std(ddof=1) / math.sqrt(len(q))) if len(q) > 1 else float("nan"),
            "glm_weights": dict(zip(names, map(float, w))), "glm_C": C}


# ---- WildBench ----
TASK_GROUP = {"Information seeking": "Information/Advice seeking", "Creative Writing": "Creative Tasks",
              "Coding & Debugging": "Coding & Debugging", "Reasoning": "Planning & Reasoning",
              "Editing": "Creative Tasks", "Math": "Math & Data Analysis", "Planning": "Planning & Reasoning",
              "Brainstorming": "Creative Tasks", "Role playing": "Creative Tasks",
              "Advice seeking": "Information/Advice seeking", "Data Analysis": "Math & Data Analysis",
              "Others": "Creative Tasks"}


def wb_score(scores, tags=None) -> dict:
    """WB-Score from judge scores 1-10 (and each task's tags, for the task-macro score)."""
    mean = float(np.mean(scores))
    out = {"raw_score": mean, "wb_score": (mean - 5) * 2 * 10,
           "wb_score_stderr": 20 * float(np.std(scores, ddof=1) / math.sqrt(len(scores))) if len(scores) > 1
           else float("nan")}
    if tags is not None:
        per_group: dict = {}
        for score, task_tags in zip(scores, tags):
            for t in task_tags:
                per_group.setdefault(TASK_GROUP.get(t, t), []).append(score)
        groups = {g: (float(np.mean(v)) - 5) * 2 for g, v in per_group.items()}
        out["task_macro_score"] = 10 * float(np.mean(list(groups.values())))
        out["per_task_group"] = {g: 10 * v for g, v in groups.items()}
    return out


REWARD = {("model", 2): 1.0, ("model", 1): 0.5, ("tie", 0): 0.0, ("ref", 1): -0.5, ("ref", 2): -1.0}


def wb_reward(outcomes, K: int = 500) -> dict:
    """WB-Reward from [(winner: "model" | "ref" | "tie" | None, extent 0/1/2, len(model), len(ref))]."""
    counts = {"win_much": 0, "win": 0, "tie": 0, "lose": 0, "lose_much": 0}
    rewards = []
    for winner, extent, len_model, len_ref in outcomes:
        if winner in ("model", "ref") and extent == 1 and K >= 0:
            longer = len_model > len_ref + K if winner == "model" else len_ref > len_model + K
            if longer:
                winner, extent = "tie", 0
        key = {("model", 2): "win_much", ("model", 1): "win", ("tie", 0): "tie", ("ref", 1): "lose",
               ("ref", 2): "lose_much"}.get((winner, extent))
        if key is not None:
            counts[key] += 1
        rewards.append(REWARD.get((winner, extent), 0.0))
    n = len(outcomes)
    return {**counts, "total": n, "K": K, "reward": 100 * float(np.mean(rewards)),
            "reward_stderr": 100 * float(np.std(rewards, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")}
