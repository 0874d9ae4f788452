"""The quickstart's report: DIR/report.md and DIR/plots/*.png, from the results in quickstart.json.

Every number comes from the run's own state; the claims section states, for each SOLAR claim,
what was measured and a verdict: reproduced, not reproduced, or inconclusive (the difference is
within two standard errors of the sample-size noise of an accuracy).
"""
from __future__ import annotations

import functools

import math
import os
import platform
import time
from pathlib import Path

from ..plots import loss_curves, pyplot, series
from .stages import STAGES, fmt_seconds

EVALS = [("base", "base", "pretrained base"), ("upscaled", "upscaled", "up-scaled, before training"),
         ("continued", "continued", "up-scaled + continued"), ("control", "control", "base continued (control)"),
         ("sft-a", "SFT A", "SFT variant A"), ("sft-b", "SFT B", "SFT variant B"),
         ("merged", "merged", "merge of A and B"), ("dpo", "DPO", "DPO on the merge"),
         ("online", "online DPO (final)", "online DPO after DPO, the verifier as reward")]
FINAL = "online"


def se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n items, Agresti-Coull adjusted
    (p~ = (x + 2) / (n + 4)) so that 0 of n is not reported as certain."""
    p_adj = (p * n + 2) / (n + 4)
    return math.sqrt(p_adj * (1 - p_adj) / (n + 4))


def compare(a: float, se_a: float, b: float, se_b: float) -> str:
    """'up' if a > b by more than two standard errors of the difference, 'down' if below, else 'noise'."""
    d, s = a - b, math.sqrt(se_a ** 2 + se_b ** 2)
    return "up" if d > 2 * s else "down" if d < -2 * s else "noise"


def claims(stages: dict, plan) -> list[dict]:
    """The SOLAR paper's claims (and EXAONE's online one), checked against this run:
    [{claim, measured, verdict}]."""
    ev = {k.split(":", 1)[1]: v for k, v in stages.items() if k.startswith("eval:")}
    return _upscaling_claims(stages, ev) + _tuning_claims(stages, ev) + _online_claims(stages, ev)


def _acc(ev: dict, name: str, key: str, n_key: str) -> tuple[float, float]:
    """A stage's accuracy and its standard error."""
    return ev[name][key], se(ev[name][key], ev[name][n_key])


def _upscaling_claims(stages: dict, ev: dict) -> list[dict]:
    """Claims 1-2: depth up-scaling and its equal-compute control."""
    acc, out = functools.partial(_acc, ev), []
    # 1. DUS starts worse than the base and recovers quickly
    base, up = ev["base"]["heldout_loss"], ev["upscaled"]["heldout_loss"]
    curve = [(r["step"], r["eval_loss"]) for r in stages["continue"]["metrics"] if "eval_loss" in r]
    recovered = next((s for s, loss in curve if loss <= base), None)
    control = [(r["step"], r["eval_loss"]) for r in stages["control"]["metrics"] if "eval_loss" in r]
    control_back = next((s for s, loss in control if loss <= base), None)
    steps = stages["continue"]["steps"]
    worse = up > base
    quick = recovered is not None and recovered <= steps / 2
    measured = (f"held-out loss {base:.3f} (base) → {up:.3f} right after up-scaling ({up - base:+.3f}); "
                + (f"back at or below the base's loss by step {recovered} of {steps} of continued pretraining"
                   if recovered is not None else f"still above the base's loss after {steps} steps")
                + (f" (the control, which only restarts the learning-rate schedule, is back below it by step "
                   f"{control_back} of {stages['control']['steps']}: part of any bump is the re-warmed learning rate, "
                   "not the up-scaling)" if control_back and control_back > control[0][0] else ""))
    out.append({"claim": "The up-scaled model starts worse than the base and recovers quickly in continued pretraining",
                "measured": measured,
                "verdict": "reproduced" if worse and quick else
                           ("partly: it starts worse but recovers only late" if worse and recovered else
                            "partly: it starts worse and does not recover within the budget" if worse else
                            "not reproduced: up-scaling did not hurt")})

    # 2. equal extra compute: DUS + continued beats the base continued
    cont, ctrl = ev["continued"]["heldout_loss"], ev["control"]["heldout_loss"]
    fl_c, fl_b = stages["continue"]["flops"], stages["control"]["flops"]
    mc = compare(*acc("continued", "mc_acc", "mc_n"), *acc("control", "mc_acc", "mc_n"))
    out.append({"claim": "With equal extra compute, up-scaled + continued pretraining beats the base model "
                         "continued for the same compute",
                "measured": f"held-out loss {cont:.3f} (up-scaled, {fl_c:.2e} FLOPs, {stages['continue']['tokens']:,} "
                            f"tokens) vs {ctrl:.3f} (control, {fl_b:.2e} FLOPs, {stages['control']['tokens']:,} tokens); "
                            f"multiple choice {ev['continued']['mc_acc']:.2f} vs {ev['control']['mc_acc']:.2f} "
                            f"({'within noise' if mc == 'noise' else 'higher' if mc == 'up' else 'lower'})",
                "verdict": "reproduced" if cont < ctrl else "not reproduced: the control reached a lower loss"})
    return out


def _tuning_claims(stages: dict, ev: dict) -> list[dict]:
    """Claims 3-5: SFT, DPO and the merge."""
    acc, out = functools.partial(_acc, ev), []
    # 3. SFT raises math exact match
    c = acc("continued", "math_em", "math_n")
    parts, verdicts = [], []
    for v in ("sft-a", "sft-b"):
        a = acc(v, "math_em", "math_n")
        verdicts.append(compare(*a, *c))
        parts.append(f"{v.upper()} {a[0]:.2f} ± {a[1]:.2f}")
    out.append({"claim": "SFT raises math exact match",
                "measured": f"GSM8K-format exact match {c[0]:.2f} ± {c[1]:.2f} before SFT; " + ", ".join(parts),
                "verdict": _verdict(verdicts)})

    # 4. DPO raises preference accuracy
    m, d = acc("merged", "pref_acc", "pref_n"), acc("dpo", "pref_acc", "pref_n")
    dpo_acc = next((r["eval_rewards/accuracy"] for r in reversed(stages["dpo"]["metrics"])
                    if "eval_rewards/accuracy" in r), None)
    out.append({"claim": "DPO raises preference accuracy",
                "measured": f"held-out pairs where the correct solution is more likely than the flawed one: "
                            f"{m[0]:.2f} ± {m[1]:.2f} before DPO, {d[0]:.2f} ± {d[1]:.2f} after "
                            f"(mean log-prob margin {ev['merged']['pref_margin']:+.2f} → {ev['dpo']['pref_margin']:+.2f}"
                            + (f"; DPO's own held-out reward accuracy, against the merge as reference: {dpo_acc:.2f}"
                               if dpo_acc is not None else "") + ")",
                "verdict": _verdict([compare(*d, *m)])})

    # 5. the merge is at least as good as the weaker SFT variant
    a, b, mg = (acc(v, "math_em", "math_n") for v in ("sft-a", "sft-b", "merged"))
    weak = min((a, b), key=lambda x: x[0])
    ma, mb, mm = (ev[v]["mc_acc"] for v in ("sft-a", "sft-b", "merged"))
    cmp = compare(*mg, *weak)
    out.append({"claim": "The merge is at least as good as the weaker SFT variant",
                "measured": f"math exact match: merge {mg[0]:.2f} vs A {a[0]:.2f}, B {b[0]:.2f}; multiple choice: "
                            f"merge {mm:.2f} vs A {ma:.2f}, B {mb:.2f}",
                "verdict": "reproduced" if mg[0] >= weak[0] else
                           "inconclusive: slightly below the weaker variant, within noise" if cmp == "noise" else
                           "not reproduced: the merge is worse than both variants"})
    return out


def _online_claims(stages: dict, ev: dict) -> list[dict]:
    """Claim 6: online DPO after offline DPO (EXAONE)."""
    acc, out = functools.partial(_acc, ev), []
    # 6. EXAONE: online preference optimisation after offline DPO raises math exact match further
    d, o = acc("dpo", "math_em", "math_n"), acc("online", "math_em", "math_n")
    rows = stages["online"]["metrics"]
    window = max(1, len(rows) // 4)
    first, last = (sum(r["score/mean"] for r in part) / len(part) for part in (rows[:window], rows[-window:]))
    usable = sum(r["pairs/usable"] for r in rows) / max(len(rows), 1)
    out.append({"claim": "Online preference optimisation (online DPO, the verifier as reward) raises math exact match "
                         "beyond offline DPO",
                "measured": f"GSM8K-format exact match {d[0]:.2f} ± {d[1]:.2f} after DPO, {o[0]:.2f} ± {o[1]:.2f} after "
                            f"online DPO; on its own samples the verifier's reward went from {first:.2f} (first "
                            f"{window} steps) to {last:.2f} (last {window}), with a usable best-vs-worst pair for "
                            f"{usable:.0%} of the questions",
                "verdict": _verdict([compare(*o, *d)])})
    return out


def _verdict(results: list[str]) -> str:
    if all(r == "up" for r in results):
        return "reproduced"
    if any(r == "down" for r in results):
        return "not reproduced: it went down"
    if any(r == "up" for r in results):
        return "partly: up beyond noise for one variant, within noise for the other"
    return "inconclusive: the change is within two standard errors"


# ---------------------------------------------------------------- plots

def write_plots(out: Path, stages: dict) -> list[str]:
    """PNG plots in out/plots; returns their names ([] when matplotlib is missing)."""
    plt = pyplot()
    if plt is None:
        return []
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    ev = {k.split(":", 1)[1]: v for k, v in stages.items() if k.startswith("eval:")}
    names = []
    for name, draw in (("training.png", _plot_training), ("dus.png", _plot_dus), ("stages.png", _plot_stages),
                       ("online.png", _plot_online)):
        fig = draw(plt, stages, ev)
        fig.tight_layout()
        fig.savefig(plots / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _series(stages, stage, key, x="step"):
    return series(stages[stage]["metrics"], key, x)


def _plot_training(plt, stages, ev):
    """Training curves: thin line = training loss, dots = held-out, one colour per run."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))

    def pair(ax, stage, label, color, x="step", scale=1.0):
        loss_curves(ax, stages[stage]["metrics"], label, color, x, scale)

    pair(axes[0][0], "base", "base", "black")
    axes[0][0].set(title="pretraining the base", xlabel="step", ylabel="loss (nats/token)")
    for stage, label, color in (("continue", "up-scaled", "tab:red"), ("control", "control (base)", "tab:blue")):
        pair(axes[0][1], stage, label, color, "tokens", stages[stage]["flops"] / max(stages[stage]["tokens"], 1))
    axes[0][1].set(title="continued pretraining (equal FLOPs)", xlabel="training FLOPs", ylabel="loss")
    for stage, color in (("sft-a", "tab:orange"), ("sft-b", "tab:purple")):
        pair(axes[1][0], stage, stage.upper(), color)
    axes[1][0].set(title="SFT (loss on assistant tokens)", xlabel="step", ylabel="loss")
    ax = axes[1][1]
    pair(ax, "dpo", "DPO loss", "tab:gray")
    ax.set(title="DPO", xlabel="step", ylabel="loss")
    ax2 = ax.twinx()
    ax2.plot(*_series(stages, "dpo", "rewards/accuracy"), lw=1, alpha=0.6, color="tab:green",
             label="reward accuracy, train")
    ax2.plot(*_series(stages, "dpo", "eval_rewards/accuracy"), "o-", ms=3, color="tab:green",
             label="reward accuracy, held-out")
    ax2.set_ylabel("reward accuracy (implicit reward, chosen > rejected)")
    ax2.set_ylim(0, 1.05)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    for a in (axes[0][0], axes[0][1], axes[1][0]):
        a.legend(fontsize=8)
    return fig


def _plot_online(plt, stages, ev):
    """Online DPO: the verifier's reward on the policy's own samples, and the DPO loss, per step."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(stages, "online", "score/mean"), "o-", ms=3, color="tab:green",
            label="reward: share of its own samples the verifier accepts")
    ax.plot(*_series(stages, "online", "pairs/usable"), lw=1, color="tab:olive",
            label="questions with a usable pair (not all tied)")
    ax.set(title="online DPO: sample, verify, best vs worst", xlabel="step", ylabel="share", ylim=(0, 1.05))
    ax2 = ax.twinx()
    ax2.plot(*_series(stages, "online", "loss"), lw=1, color="tab:gray", label="DPO loss")
    ax2.set_ylabel("loss")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    return fig


def _plot_dus(plt, stages, ev):
    """The DUS curve: held-out loss against cumulative training compute."""
    fig, ax = plt.subplots(figsize=(8, 5))
    fpt_base = stages["base"]["flops"] / max(stages["base"]["tokens"], 1)
    x, y = _series(stages, "base", "eval_loss", "tokens")
    ax.plot([t * fpt_base for t in x], y, "o-", ms=3, color="black", label="base pretraining")
    f0 = stages["base"]["flops"]
    for stage, start, color, label in (("continue", "upscaled", "tab:red", "up-scaled + continued"),
                                       ("control", "base", "tab:blue", "base continued (control)")):
        fpt = stages[stage]["flops"] / max(stages[stage]["tokens"], 1)
        x, y = _series(stages, stage, "eval_loss", "tokens")
        ax.plot([f0] + [f0 + t * fpt for t in x], [ev[start]["heldout_loss"]] + y, "o-", ms=3, color=color,
                label=label)
    ax.axvline(f0, ls="--", color="gray", lw=1)
    ax.axhline(ev["base"]["heldout_loss"], ls=":", color="gray", lw=1)
    ax.annotate(f"up-scaling {ev['base']['layers']}→{ev['upscaled']['layers']} layers", (f0, ev["upscaled"]["heldout_loss"]),
                textcoords="offset points", xytext=(8, 4), fontsize=9)
    ax.set(title="Depth Up-Scaling: the drop and the recovery, against the control",
           xlabel="cumulative training FLOPs", ylabel="held-out loss (nats/token)")
    lo = min(ev["continued"]["heldout_loss"], ev["control"]["heldout_loss"])
    ax.set_ylim(lo - 0.2, max(ev["upscaled"]["heldout_loss"], ev["base"]["heldout_loss"]) + 0.6)
    ax.legend()
    return fig


def _plot_stages(plt, stages, ev):
    """Metrics by stage, with one standard error."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    keys = [k for k, _, _ in EVALS if k in ev]
    labels = [lab for k, lab, _ in EVALS if k in ev]
    for ax, (key, n_key, title) in zip(axes, (("heldout_loss", None, "held-out loss (lower is better)"),
                                              ("math_em", "math_n", "math exact match"),
                                              ("mc_acc", "mc_n", "multiple choice accuracy"),
                                              ("pref_acc", "pref_n", "preference accuracy"))):
        vals = [ev[k][key] for k in keys]
        err = None
        if n_key:                       # one standard error, not below zero
            up = [se(ev[k][key], ev[k][n_key]) for k in keys]
            err = [[min(e, v) for e, v in zip(up, vals)], up]
        ax.bar(range(len(keys)), vals, yerr=err, color="tab:gray", capsize=3)
        ax.set_xticks(range(len(keys)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if key == "mc_acc":
            ax.axhline(0.25, ls=":", color="gray", lw=1)
    return fig


# ---------------------------------------------------------------- report.md

def _table(head, rows) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def write_report(out, state: dict, plan) -> Path:
    out = Path(out)
    stages = state["stages"]
    ev = {k.split(":", 1)[1]: v for k, v in stages.items() if k.startswith("eval:")}
    plots = write_plots(out, stages)
    L = (_intro(state, plan) + _recipe(stages, plan) + _data(stages) + _tokenizer(stages, plan)
         + _evaluation(ev, plan, plots) + _curves(stages, plots) + _claims(stages, plan) + _use_it(ev, out))
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(L), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _intro(state: dict, plan) -> list[str]:
    """Title, what ran where and how long, and how to read it."""
    import torch
    stages = state["stages"]
    total = sum(s.get("seconds", 0.0) for s in stages.values())
    rss = max(s.get("peak_rss_mib", 0.0) for s in stages.values())
    cmd = "lmfoundry quickstart" + (" --fast" if plan.name == "fast" else "")
    L = []
    L.append("# lmfoundry quickstart: the SOLAR recipe at toy scale\n")
    L.append(f"One run of `{cmd}` (plan `{plan.name}`, seed {state['settings']['seed']}) on "
             f"{platform.machine()} with {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}: **{fmt_seconds(total)}** wall time (stages below; the report itself is "
             f"not counted), peak memory **{rss:,.0f} MiB**. Every number here was measured in this run from data "
             "the package generated itself; nothing is taken from the paper. It is a single seed with about four "
             "orders of magnitude fewer parameters than SOLAR 10.7B and six fewer training tokens, so read it as a "
             "working, inspectable miniature of the recipe, not as evidence about large models.\n")
    if plan.name == "fast":
        L.append("> This is the `--fast` plan: a smoke test of the pipeline with too little training for the "
                 "claims below to be meaningful. Run `lmfoundry quickstart` without `--fast` for the real thing.\n")
    return L


def _recipe(stages: dict, plan) -> list[str]:
    """The stages as run, and the model."""
    base_cfg, big_layers = stages["base"], stages["continue"]["layers"]
    L = []
    L.append("## The recipe\n")
    rows = []
    for name, title in STAGES:
        s = stages.get(name)
        if s is None or name.startswith("eval:") or name in ("report",):
            continue
        extra = ""
        if "steps" in s:
            extra = f"{s['steps']} steps, {s['tokens']:,} tokens, {s['flops']:.2e} FLOPs"
        rows.append([f"`{name}`", title, extra, fmt_seconds(s["seconds"])])
    L.append(_table(["stage", "what", "training", "time"], rows) + "\n")
    L.append(f"Model: Llama architecture (RMSNorm, RoPE, SwiGLU, GQA {plan.n_heads}/{plan.n_kv_heads} heads), "
             f"dim {plan.dim}, FFN {plan.ffn_dim}, vocabulary {plan.vocab_size}, context {plan.seq_len}. "
             f"Base: {base_cfg['layers']} layers, {base_cfg['params']:,} parameters. Depth Up-Scaling with n = "
             f"{plan.n_layers}, m = {plan.drop}: layers [0, {plan.n_layers - plan.drop}) of one copy and "
             f"[{plan.drop}, {plan.n_layers}) of another, {big_layers} layers, {stages['continue']['params']:,} "
             f"parameters (SOLAR: n = 32, m = 8 → 48 layers). The control continues the base for "
             f"{stages['control']['steps']} steps against the up-scaled model's {stages['continue']['steps']}, "
             "so both spend the same training FLOPs (6 per weight per token plus attention).\n")
    return L


def _data(stages: dict) -> list[str]:
    """The generated data files."""
    L = []
    L.append("## Data\n")
    files = stages["data"]["files"]
    L.append(_table(["file", "records", "what"], [[f"`{k}`", f"{v['records']:,}", _md(v["description"])]
                                                  for k, v in files.items()]) + "\n")
    L.append("SFT A = every general instruction + a third of the math problems; SFT B = every math problem + a "
             "third of the general instructions. The math test, the held-out SFT and preference sets and the "
             "held-out documents share no question or document with anything trained on. The multiple-choice "
             "questions ask about the world facts the corpus states (the knowledge under test), so those facts, "
             "and quiz-style questions about them, do appear in training.\n")
    return L


def _tokenizer(stages: dict, plan) -> list[str]:
    """Compression, English vs Korean."""
    L = []
    L.append("## Tokenizer: compression, English vs Korean\n")
    comp = stages["tokenizer"]["compression"]
    L.append(_table(["tokenizer", "language", "words", "tokens", "tokens/word", "chars/token"],
                    [[r["tokenizer"], r["language"], f"{r['words']:,}", f"{r['tokens']:,}",
                      f"{r['tokens_per_word']:.2f}", f"{r['chars_per_token']:.2f}"] for r in comp]) + "\n")
    get = {(r["tokenizer"], r["language"]): r["tokens_per_word"] for r in comp}
    ko, ko_en = get[("bilingual BPE (ours)", "Korean")], get[("English-only BPE", "Korean")]
    L.append(f"The table EXAONE 3.0 reports for its tokenizer, here with {plan.vocab_size}-token byte-level BPEs on "
             f"the held-out documents: a tokenizer that never saw Korean spends {ko_en:.2f} tokens per Korean word, "
             f"the bilingual one {ko:.2f} ({ko_en / ko:.1f}× fewer), which is why a model meant for Korean "
             "needs Korean in its vocabulary.\n")
    return L


def _evaluation(ev: dict, plan, plots: list) -> list[str]:
    """Every model's evaluation."""
    L = []
    L.append("## Evaluation after every stage\n")
    rows = []
    for key, label, what in EVALS:
        if key not in ev:
            continue
        e = ev[key]
        rows.append([label, e["layers"], f"{e['params']:,}", f"{e['heldout_loss']:.3f}",
                     f"{e['math_em']:.2f} ± {se(e['math_em'], e['math_n']):.2f}",
                     f"{e['mc_acc']:.2f} ± {se(e['mc_acc'], e['mc_n']):.2f}",
                     f"{e['pref_acc']:.2f} ± {se(e['pref_acc'], e['pref_n']):.2f}"])
    n = ev["dpo"]
    L.append(_table(["model", "layers", "parameters", "held-out loss", "math EM", "multiple choice acc",
                     "preference acc"], rows) + "\n")
    L.append(f"Held-out loss: nats per token on held-out documents, computed exactly as the training loop's "
             f"evaluation (the same {plan.eval_batches} packed batches for every model). Math EM: GSM8K format and "
             f"metric (`#### N`, strict match), 0-shot with the chat template, greedy, on {n['math_n']} test "
             f"problems. Multiple choice: ARC format and metric (acc, 4 options, chance 0.25), 0-shot, on "
             f"{n['mc_n']} questions about the world the corpus describes. Preference accuracy: held-out pairs "
             f"({n['pref_n']}) where the model gives the correct solution more log-probability than the flawed one. "
             "± is one standard error (Agresti-Coull: sqrt(p~(1-p~)/(n+4)), p~ = (x+2)/(n+4)).\n")
    if "stages.png" in plots:
        L.append("![metrics by stage](plots/stages.png)\n")
    return L


def _curves(stages: dict, plots: list) -> list[str]:
    """The DUS curve and the training curves."""
    L = []
    L.append("## Depth Up-Scaling\n")
    if "dus.png" in plots:
        L.append("![DUS curve](plots/dus.png)\n")
    L.append("Held-out loss against cumulative training compute: the base's pretraining, the jump when the "
             "model is up-scaled (the seam joins layers that were never adjacent), and continued pretraining of "
             "the up-scaled model against the base continued for the same FLOPs.\n")

    L.append("## Training curves\n")
    if "training.png" in plots:
        L.append("![training curves](plots/training.png)\n")
    if "online.png" in plots:
        L.append("![online DPO](plots/online.png)\n")
    rows = [[f"`{k}`", stages[k]["from"], stages[k]["steps"], f"{stages[k]['lr']:g}",
             f"{stages[k]['final_loss']:.3f}", f"{stages[k]['eval_loss']:.3f}" if stages[k]["eval_loss"] is not None
             else "", f"{stages[k]['tokens'] / max(stages[k]['train_seconds'], 1e-9):,.0f}"]
            for k in ("base", "continue", "control", "sft-a", "sft-b", "dpo", "online")]
    L.append(_table(["stage", "from", "steps", "peak lr", "last train loss", "last held-out loss", "tokens/s"], rows)
             + "\n")
    if not plots:
        L.append("(Plots skipped: matplotlib is not installed; `pip install 'lmfoundry[plots]'`.)\n")
    return L


def _claims(stages: dict, plan) -> list[str]:
    """The SOLAR paper's claims, checked."""
    L = []
    L.append("## The papers' claims at this scale (SOLAR; EXAONE's online stage)\n")
    for c in claims(stages, plan):
        L.append(f"- **{c['claim']}** — *{c['verdict']}*. {c['measured']}.")
    L.append("\nVerdicts on accuracies call a difference real only beyond two standard errors; losses are compared "
             "directly (one seed, so small loss gaps may not survive another seed). What this run cannot show: "
             "anything about scale (SOLAR's gains are at 10.7B parameters and trillions of tokens), about real "
             "benchmarks (the tasks here only share their formats and metrics), or about variance across seeds.\n")
    return L


def _use_it(ev: dict, out: Path) -> list[str]:
    """The final model's answers and how to use it."""
    L = []
    L.append("## What the final model says\n")
    rows = [[_md(s["prompt"]), _md(s["output"]), _md(s["reference"])] for s in ev[FINAL]["chat_samples"]]
    L.append(_table(["prompt (held out)", "final model (greedy)", "reference"], rows) + "\n")

    L.append("## Use it\n")
    L.append("```bash\n"
             f"lmfoundry chat {out / 'final'}\n"
             f"lmfoundry eval {out / 'final'} --tasks gsm8k --data-dir {out / 'data' / 'eval'}"
             " --apply-chat-template --fewshot 0\n"
             f"lmfoundry serve {out / 'final'}\n"
             "```\n"
             "```python\n"
             "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
             f"model = AutoModelForCausalLM.from_pretrained({str(out / 'final')!r})\n"
             f"tok = AutoTokenizer.from_pretrained({str(out / 'final')!r})\n"
             "```\n")
    L.append(f"Every model of the run is in `{out / 'models'}` (Hugging Face directories with `metrics.jsonl`), "
             f"every evaluation in `{out / 'quickstart.json'}`.\n")
    return L
