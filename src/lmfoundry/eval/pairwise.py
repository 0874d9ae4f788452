"""Pairwise and checklist judge benchmarks with any OpenAI-compatible judge: Arena-Hard-Auto v0.1,
AlpacaEval 2.0 (length-controlled) and WildBench v2 (WB-Score, WB-Reward).

    from lmfoundry.eval.judge import JudgeClient
    from lmfoundry.eval.pairwise import run_pairwise_benchmark
    judge = JudgeClient("http://host:8000/v1", model="gpt-4-1106-preview", cache="judge_cache.jsonl")
    summary = run_pairwise_benchmark(lm, "arena-hard", "question.jsonl", judge, "runs/ah",
                                     baseline_path="model_answer/gpt-4-0314.jsonl")

Files are read in the benchmarks' own formats:
- questions: Arena-Hard {question_id, category, turns: [{content}]} (v0.1) or {uid, prompt} (v2);
  AlpacaEval {instruction[, output, generator]} (the eval set, whose `output` is the reference
  model's answer); WildBench {session_id, conversation_input: [{role, content}], checklist: [...],
  primary_tag, secondary_tags}.
- answers (the model's, when not generated, and the baseline's): Arena-Hard model_answer records
  ({question_id, choices: [{turns: [{content}]}]}, or v2 {uid, messages}), AlpacaEval outputs
  ({instruction, output, generator}) or WildBench results ({session_id, output}). Arena-Hard answer
  records may carry `conv_metadata` (token_len, header_count, list_count, bold_count) for style
  control; otherwise those are counted here (tokens with the model's tokenizer, else words).
The model's answers are generated with its chat template, greedily, in one batched
LM.generate_until call. Judge prompts are the published ones (eval/prompts/, sources in its
README). Every judge call goes through JudgeClient (on-disk cache, retries); a judgment without a
verdict is kept, counted and listed under "unparseable", never guessed. The statistics are in
eval.pairwise_stats; outputs are written in the upstream formats plus summary.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import JudgeError
from . import pairwise_stats as S
from .data import read_records
from .judge import write_jsonl

BENCHES = ("arena-hard", "alpaca-eval", "wildbench")
PROMPTS = Path(__file__).parent / "prompts"
ARENA_VERDICT = re.compile(r"\[\[([AB<>=]+)\]\]")   # judge_config.yaml regex_pattern (v0.1)


def prompt_text(name: str) -> str:
    return (PROMPTS / name).read_text(encoding="utf-8")


@dataclass
class Item:
    id: object
    messages: list                    # the conversation the model answers (ends with a user turn)
    tags: list = field(default_factory=list)
    checklist: list = field(default_factory=list)
    reference: str | None = None      # AlpacaEval: the eval set's own reference output
    index: int = 0                    # position in the question file (AlpacaEval's instruction index)

    @property
    def query(self) -> str:
        return self.messages[-1]["content"]


def _content(turn):
    return turn["content"] if isinstance(turn, dict) else turn


def read_items(path, bench: str) -> list[Item]:
    items = []
    for i, r in enumerate(read_records(path)):
        try:
            if bench == "arena-hard":
                text = _content(r["turns"][0]) if "turns" in r else r["prompt"]
                items.append(Item(r.get("question_id", r.get("uid")), [{"role": "user", "content": text}],
                                  [r.get("category", "")]))
            elif bench == "alpaca-eval":
                text = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
                items.append(Item(r["instruction"], [{"role": "user", "content": text}], reference=r.get("output")))
            else:
                conv = [{"role": m["role"], "content": m["content"]} for m in r["conversation_input"]]
                items.append(Item(r["session_id"], conv, [r.get("primary_tag")] + list(r.get("secondary_tags") or []),
                                  list(r.get("checklist") or [])))
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{path}: record {i} is not a {bench} question (see lmfoundry.eval.pairwise for the "
                             f"formats read)") from None
    if not items:
        raise JudgeError(f"{path}: no questions")
    for i, it in enumerate(items):
        it.index = i
    return items


def _answer_of(rec):
    if "choices" in rec:
        return _content(rec["choices"][0]["turns"][0])
    if "messages" in rec:
        last = rec["messages"][-1]["content"]
        return last.get("answer") if isinstance(last, dict) else last
    out = rec.get("output", rec.get("answer"))
    return out[0] if isinstance(out, list) else out


def read_answers(path, items, bench: str) -> tuple[list[str], list]:
    """(answer text per item, conv_metadata per item or None) from an answer file, matched by id
    (AlpacaEval: by instruction, as AlpacaEval merges outputs)."""
    by_key = {}
    for i, r in enumerate(read_records(path)):
        key = r.get("instruction") if bench == "alpaca-eval" else r.get("question_id", r.get("uid", r.get("session_id")))
        text = _answer_of(r)
        if not isinstance(text, str):
            raise JudgeError(f"{path}: record {i} has no answer text (choices/messages/output)")
        by_key[key] = (text, r.get("conv_metadata"))
    keys = [it.id for it in items]   # AlpacaEval: the instruction
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise JudgeError(f"{path}: no answers for {len(missing)} question(s), e.g. {str(missing[0])[:80]!r}")
    return [by_key[k][0] for k in keys], [by_key[k][1] for k in keys]


def generate_outputs(lm, items, max_new_tokens: int = 1024) -> list[str]:
    """The model's answers: each conversation rendered with its chat template, one batched call."""
    n = max(1, min(max_new_tokens, lm.max_length // 2))
    prompts = [lm.tokenizer.apply_chat_template(it.messages, add_generation_prompt=True) for it in items]
    return [t.strip() for t in lm.generate_until([(p, {"until": [], "max_gen_toks": n}) for p in prompts],
                                                 desc="answers")]


def style_counts(text: str, tokenizer=None) -> list[int]:
    """[tokens, markdown headers, list items, bold spans] of an answer, code blocks removed."""
    body = re.sub(r"```.*?```", "", text, flags=re.S)
    tokens = len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer is not None else len(text.split())
    headers = len(re.findall(r"^#{1,6}\s", body, flags=re.M))
    lists = len(re.findall(r"^\s*(?:\d+\.|[-*+])\s", body, flags=re.M))
    bold = len(re.findall(r"\*\*[^*\n]+\*\*", body)) + len(re.findall(r"__[^_\n]+__", body))
    return [tokens, headers, lists, bold]


def _meta_counts(meta):
    if not meta:
        return None
    def total(v):
        return sum(v.values()) if isinstance(v, dict) else int(v)
    return [total(meta["token_len"]), total(meta["header_count"]), total(meta["list_count"]),
            total(meta["bold_count"])]


def _swap(seed, key) -> bool:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[0] % 2 == 1


# ---- Arena-Hard v0.1 ----
def arena_verdict(judgment: str):
    """gen_judgment.get_score: the one distinct [[verdict]]; none or several distinct -> None."""
    found = {m for m in ARENA_VERDICT.findall(judgment or "") if m != ""}
    return found.pop().strip("\n") if len(found) == 1 else None


def judge_arena_hard(judge, items, answers, baselines, model_id, progress=True) -> list[dict]:
    from .lm import Progress
    system, template = prompt_text("arena_hard_v0.1_system.txt"), prompt_text("arena_hard_v0.1_user.txt")
    out = []
    with Progress(2 * len(items), "judging", progress) as bar:
        for it, ans, base in zip(items, answers, baselines):
            games = []
            for a, b in ((base, ans), (ans, base)):   # game 1: the baseline is assistant A
                user = template.format(question_1=it.query, answer_1=a, answer_2=b)
                judgment = judge.complete([{"role": "system", "content": system}, {"role": "user", "content": user}])
                games.append({"user_prompt": user, "judgment": judgment, "score": arena_verdict(judgment)})
                bar.update(1)
            out.append({"question_id": it.id, "model": model_id, "judge": judge.model, "games": games})
    return out


def summarize_arena_hard(records, items, answers, baselines, metas, style_control, rounds, seed, tokenizer=None):
    games = [(r["model"], r["question_id"], [g["score"] for g in r["games"]]) for r in records]
    battles = S.arena_battles(games)
    unparsed = [[r["question_id"], g] for r in records for g, game in enumerate(r["games"]) if game["score"] is None]
    out = {"games": 2 * len(records), "battles": len(battles), "unparseable": len(unparsed),
           "unparseable_ids": unparsed, "style_control": bool(style_control)}
    meta = None
    if style_control:
        model = records[0]["model"] if records else None
        meta = {}
        for it, ans, base, (m_meta, b_meta) in zip(items, answers, baselines, metas):
            meta[(model, it.id)] = _meta_counts(m_meta) or style_counts(ans, tokenizer)
            meta[(None, it.id)] = _meta_counts(b_meta) or style_counts(base, tokenizer)
    scores = S.arena_hard_scores(battles, meta, rounds, seed) if battles else {}
    s = next(iter(scores.values()), None)
    out.update({"score": s["score"] if s else None, "ci95": s["ci95"] if s else None,
                "avg_tokens": sum(len(a.split()) for a in answers) / max(len(answers), 1)})
    se = None if not s else (s["ci95"][1] - s["ci95"][0]) / (2 * 1.96)
    out["table"] = {"arena_hard_winrate": [out["score"], se]}
    return out


# ---- AlpacaEval 2.0 ----
def chatml_messages(text: str) -> list[dict]:
    """AlpacaEval's prompt_to_chatml: <|im_start|>role ... <|im_end|> turns, each stripped."""
    out = []
    for part in text.strip().split("<|im_start|>")[1:]:
        role, _, rest = part.partition("\n")
        out.append({"role": role.strip(), "content": rest.split("<|im_end|>", 1)[0].strip()})
    return out


def alpaca_preference(choice: dict):
    """2 - P(m) / (P(m) + P(M)) from the first token's top log-probs (logprob_parser, not binarised);
    without log-probs the answer text "m" / "M" gives 1 / 2; anything else None."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if content:
        tops = {t["token"]: t["logprob"] for t in content[0].get("top_logprobs") or [] if t["token"] in ("m", "M")}
        if not tops:
            return None
        pm, pM = math.exp(tops.get("m", -math.inf)), math.exp(tops.get("M", -math.inf))
        return 2 - pm / (pm + pM)
    return {"m": 1.0, "M": 2.0}.get(choice["message"]["content"].strip())


def judge_alpaca(judge, items, answers, baselines, model_id, seed=0, progress=True) -> list[dict]:
    from .lm import Progress
    template = prompt_text("alpaca_eval_clf.txt")
    out = []
    with Progress(len(items), "judging", progress) as bar:
        for it, ans, base in zip(items, answers, baselines):
            swapped = _swap(seed, it.query)
            o1, o2 = (ans, base) if swapped else (base, ans)
            values = {"instruction": it.query, "output_1": o1, "output_2": o2}
            prompt = re.sub(r"\{(instruction|output_1|output_2)\}", lambda m: values[m.group(1)], template)
            choice = judge.complete_choice(chatml_messages(prompt), max_tokens=1, logprobs=True, top_logprobs=5)
            pref = alpaca_preference(choice)
            if pref is not None and swapped:
                pref = 3 - pref
            out.append({"instruction": it.query, "output_1": base, "output_2": ans, "generator_1": "baseline",
                        "generator_2": model_id, "annotator": judge.model, "preference": pref,
                        "raw_completion": choice["message"]["content"], "is_switched": swapped})
            bar.update(1)
    return out


def summarize_alpaca(annotations, difficulty=None, gamed=None) -> dict:
    parsed = [a for a in annotations if a["preference"] is not None]
    out = {"unparseable": len(annotations) - len(parsed),
           "unparseable_ids": [a["instruction"][:80] for a in annotations if a["preference"] is None]}
    if not parsed:
        return {**out, "win_rate": None, "length_controlled_winrate": None, "table": {}}
    prefs = [a["preference"] for a in parsed]
    out.update(S.alpaca_winrate(prefs))
    missing = [a["index"] for a in parsed if difficulty is not None and a["index"] not in difficulty]
    if missing:
        raise JudgeError(f"the instruction-difficulty file has no value for instruction index {missing[0]}")
    diff = None if difficulty is None else [difficulty[a["index"]] for a in parsed]
    out.update(S.lc_winrate(prefs, [len(a["output_1"]) for a in parsed], [len(a["output_2"]) for a in parsed],
                            diff, gamed))
    out["instruction_difficulty"] = "given" if difficulty is not None else "not given: the GLM drops that term"
    out["avg_length"] = sum(len(a["output_2"]) for a in parsed) / len(parsed)
    out["table"] = {"lc_win_rate": [out["length_controlled_winrate"], out["lc_standard_error"]],
                    "win_rate": [out["win_rate"], out["standard_error"]]}
    return out


# ---- WildBench v2 ----
def _history(messages) -> str:
    return "".join(f"{'USER' if m['role'] == 'user' else 'ASSISTANT'}: {m['content']}\n\n"
                   for m in messages[:-1] if m["role"] in ("user", "assistant"))


def _checklist(items) -> str:
    return "".join(f"- {c}\n" for c in items)


def parse_json_judgment(text: str) -> dict | None:
    """The judge's JSON object (inside ``` fences or not; a trailing comma tolerated), else None."""
    body = re.sub(r"```(?:json)?", "", text or "")
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        return None
    blob = body[start:end + 1]
    for candidate in (blob, re.sub(r",\s*}", "}", blob)):
        try:
            data = json.loads(candidate)
            return data if isinstance(data, dict) else None
        except json.JSONDecodeError:
            continue
    return None


def _wb_score_value(judgment):
    data = parse_json_judgment(judgment)
    try:
        score = float(str(data["score"]).strip())
    except (TypeError, KeyError, ValueError):
        return None
    return score if 1 <= score <= 10 else None


def judge_wildbench_score(judge, items, answers, model_id, progress=True) -> list[dict]:
    from .lm import Progress
    template = prompt_text("wildbench_score_v2.txt")
    out = []
    with Progress(len(items), "judging (score)", progress) as bar:
        for it, ans in zip(items, answers):
            prompt = template.replace("{$history}", _history(it.messages)).replace("{$user_query}", it.query) \
                .replace("{$model_output}", ans).replace("{$checklist}", _checklist(it.checklist))
            judgment = judge.complete([{"role": "user", "content": prompt}])
            out.append({"session_id": it.id, "model_test": model_id, "model_output": ans, "judgment": judgment,
                        "score": _wb_score_value(judgment), "tags": it.tags})
            bar.update(1)
    return out


WB_CHOICES = {"A++": ("A", 2), "A+": ("A", 1), "A=B": ("tie", 0), "B+": ("B", 1), "B++": ("B", 2)}


def judge_wildbench_reward(judge, items, answers, refs, model_id, seed=0, progress=True) -> list[dict]:
    from .lm import Progress
    template = prompt_text("wildbench_pairwise_v2.txt")
    out = []
    with Progress(len(items), "judging (reward)", progress) as bar:
        for it, ans, ref in zip(items, answers, refs):
            model_is_a = not _swap(seed, it.id)
            a, b = (ans, ref) if model_is_a else (ref, ans)
            if not a.strip() or not b.strip():   # upstream decides empty answers without a judge
                judgment = json.dumps({"choice": "A=B" if not a.strip() and not b.strip()
                                       else ("B++" if not a.strip() else "A++")})
            else:
                prompt = template.replace("{$history}", _history(it.messages)).replace("{$user_query}", it.query) \
                    .replace("{$candidate_A}", a).replace("{$candidate_B}", b) \
                    .replace("{$checklist}", _checklist(it.checklist))
                judgment = judge.complete([{"role": "user", "content": prompt}])
            data = parse_json_judgment(judgment) or {}
            side, extent = WB_CHOICES.get(str(data.get("choice", "")).replace(" ", "").strip(), (None, 0))
            winner = None if side is None else "tie" if side == "tie" else \
                ("model" if (side == "A") == model_is_a else "ref")
            out.append({"session_id": it.id, "model_A": "model" if model_is_a else "ref", "judgment": judgment,
                        "winner": winner, "extent": extent, "len_model": len(ans), "len_ref": len(ref)})
            bar.update(1)
    return out


def summarize_wildbench(scored, rewarded, K) -> dict:
    ok = [r for r in scored if r["score"] is not None]
    out = {"unparseable": len(scored) - len(ok), "unparseable_ids": [r["session_id"] for r in scored
                                                                     if r["score"] is None]}
    table = {}
    if ok:
        out.update(S.wb_score([r["score"] for r in ok], [r["tags"] for r in ok]))
        table["wb_score"] = [out["wb_score"], out["wb_score_stderr"]]
    if rewarded is not None:
        out["reward"] = S.wb_reward([(r["winner"], r["extent"], r["len_model"], r["len_ref"]) for r in rewarded], K)
        out["unparseable_reward"] = sum(1 for r in rewarded if r["winner"] is None)
        table[f"wb_reward_K{K}"] = [out["reward"]["reward"], out["reward"]["reward_stderr"]]
    out["table"] = table
    return out


# ---- the runner ----
def _read_difficulty(path) -> dict:
    """AlpacaEval's instruction_difficulty.csv ({index, instruction_difficulty}) -> {index: value}."""
    rows = read_records(path)
    try:
        return {int(r.get("index", i)): float(r["instruction_difficulty"]) for i, r in enumerate(rows)}
    except (KeyError, TypeError, ValueError):
        raise JudgeError(f"{path}: expected rows {{index, instruction_difficulty}}") from None


def _read_gamed(path) -> list:
    rows = read_records(path)
    try:
        return [[float(r["preference"]), float(r["std_delta_len"]), float(r["instruction_difficulty"])]
                for r in rows if not r.get("not_gamed_baseline")]
    except (KeyError, TypeError, ValueError):
        raise JudgeError(f"{path}: expected AlpacaEval df_gamed rows {{preference, std_delta_len, "
                         f"instruction_difficulty, not_gamed_baseline}}") from None


def _answers(lm, items, answers_path, bench, max_new_tokens):
    if answers_path:
        return read_answers(answers_path, items, bench)
    if lm is None:
        raise JudgeError("need a model to generate answers, or --answers with existing ones")
    return generate_outputs(lm, items, max_new_tokens), [None] * len(items)


def _baselines(items, baseline_path, bench):
    if baseline_path:
        return read_answers(baseline_path, items, bench)
    if bench == "alpaca-eval" and all(isinstance(it.reference, str) for it in items):
        return [it.reference for it in items], [None] * len(items)
    if bench == "wildbench":
        return None, None
    raise JudgeError(f"{bench} needs the baseline model's answers (--baseline FILE)")


def run_pairwise_benchmark(lm, bench: str, questions_path, judge, out_dir, baseline_path=None, answers_path=None,
                           model_id=None, max_new_tokens: int = 1024, limit=None, style_control=False,
                           length_penalty: int = 500, difficulty_path=None, gamed_path=None, rounds: int = 100,
                           seed: int = 0, progress: bool = True) -> dict:
    """Answers (generated or read), judgments, upstream-format files and summary.json; returns the summary."""
    import time
    if bench not in BENCHES:
        raise JudgeError(f"unknown pairwise benchmark {bench!r} ({', '.join(BENCHES)})")
    items = read_items(questions_path, bench)
    items = items[:limit] if limit else items
    out_dir = Path(out_dir)
    model_id = model_id or (Path(str(lm.name)).name if lm is not None else "model")
    baselines, base_meta = _baselines(items, baseline_path, bench)
    answers, metas = _answers(lm, items, answers_path, bench, max_new_tokens)
    calls0, hits0, t0 = judge.calls, judge.cache_hits, time.time()
    tokenizer = getattr(lm, "tokenizer", None)
    if bench == "arena-hard":
        write_jsonl(out_dir / "model_answer" / f"{model_id}.jsonl",
                    [{"question_id": it.id, "model_id": model_id, "choices": [{"index": 0, "turns": [{"content": a}]}]}
                     for it, a in zip(items, answers)])
        records = judge_arena_hard(judge, items, answers, baselines, model_id, progress)
        write_jsonl(out_dir / "model_judgment" / judge.model.replace("/", "_") / f"{model_id}.jsonl", records)
        summary = summarize_arena_hard(records, items, answers, baselines, list(zip(metas, base_meta)),
                                       style_control, rounds, seed, tokenizer)
    elif bench == "alpaca-eval":
        write_jsonl(out_dir / "model_outputs.jsonl", [{"instruction": it.query, "output": a, "generator": model_id}
                                                      for it, a in zip(items, answers)])
        annotations = judge_alpaca(judge, items, answers, baselines, model_id, seed, progress)
        for it, a in zip(items, annotations):
            a["index"] = it.index
        write_jsonl(out_dir / "annotations.jsonl", annotations)
        summary = summarize_alpaca(annotations, _read_difficulty(difficulty_path) if difficulty_path else None,
                                   _read_gamed(gamed_path) if gamed_path else None)
    else:
        write_jsonl(out_dir / "model_outputs.jsonl", [{"session_id": it.id, "output": [a], "generator": model_id}
                                                      for it, a in zip(items, answers)])
        scored = judge_wildbench_score(judge, items, answers, model_id, progress)
        write_jsonl(out_dir / "score.jsonl", scored)
        rewarded = None
        if baselines is not None:
            rewarded = judge_wildbench_reward(judge, items, answers, baselines, model_id, seed, progress)
            write_jsonl(out_dir / "pairwise.jsonl", rewarded)
        summary = summarize_wildbench(scored, rewarded, length_penalty)
    summary.update({"benchmark": bench, "model": model_id, "baseline": str(baseline_path) if baseline_path else None,
                    "judge_model": judge.model, "judge_url": judge.url, "questions": len(items),
                    "judge_calls": judge.calls - calls0, "judge_cache_hits": judge.cache_hits - hits0,
                    "seconds": round(time.time() - t0, 3)})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def format_pairwise_summary(s: dict) -> str:
    def f(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
    lines = [f"{s['benchmark']}  model={s['model']}  judge={s['judge_model']}  calls={s['judge_calls']} "
             f"cached={s['judge_cache_hits']}"]
    for metric, (value, se) in s["table"].items():
        lines.append(f"{metric:<24} {f(value):>8}  ± {f(se)}")
    if s["benchmark"] == "arena-hard" and s.get("ci95"):
        lines.append(f"{'95% CI':<24} [{f(s['ci95'][0])}, {f(s['ci95'][1])}]  ({s['battles']} battles"
                     f"{', style control' if s['style_control'] else ''})")
    lines.append(f"unparseable judgments: {s['unparseable']}")
    return "\n".join(lines)
