"""Evaluation: the benchmarks of the SOLAR / OpenELM / EXAONE papers on lmfoundry's primitives.

    from lmfoundry.eval import LM, evaluate, perplexity
    lm = LM.load("ckpt/")
    res = evaluate(lm, ["arc_challenge", "hellaswag"], data_dir="data/")   # lm-eval-shaped dict
    res = evaluate(lm, [], data_dir="data/", leaderboard=True)             # Open LLM Leaderboard v1 (H6)

    res = evaluate(lm, ["lm_eval/tasks/kobest/"], data_dir="data/", allow_code=True)  # lm-eval task YAML

Modules: lm (loglikelihood / generate_until on strings), tasks (prompts as data), metrics,
runner (few-shot, aggregation, tables), yaml_tasks + yaml_eval (lm-eval 0.4 task YAML),
judge (MT-Bench / KoMT-Bench / LogicKor with an OpenAI-compatible judge), pairwise +
pairwise_stats (Arena-Hard, AlpacaEval 2 LC, WildBench), compare (results side by side),
redteam (pass / fail / skipped by category), harness (the lm-evaluation-harness model adapter;
optional).
"""
from ..errors import EvalDataError
from .data import read_records
from .lm import LM
from .runner import evaluate, format_table, h6_table, perplexity, render_requests
from .tasks import TASKS, Doc, Task, get_task

__all__ = ["LM", "evaluate", "perplexity", "format_table", "h6_table", "TASKS", "Task", "Doc", "get_task",
           "EvalDataError", "read_records", "render_requests"]
