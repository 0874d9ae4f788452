"""Run tasks on local files and aggregate like lm-evaluation-harness.

    from lmfoundry.eval import LM, evaluate
    res = evaluate(LM.load(path), ["arc_challenge", "hellaswag"], data_dir="data/")
    res["results"]["arc_challenge"]["acc_norm"]

Data: DIR/<task>.jsonl (or .json / .parquet; also <task>.<split>.jsonl) holds the evaluated split
in the public dataset's schema; the few-shot pool is DIR/<task>.<fewshot split>.jsonl (ARC,
HellaSwag, Winogrande, GSM8K: train; MMLU: dev) or DIR/<task>.fewshot.jsonl. Without a pool
file the shots come from the evaluated file itself, never the evaluated document.

Two protocols for choosing shots:
- "harness" (lm-eval 0.4, default): one random.Random(seed=1234) per task, documents in file
  order; MMLU takes the first k dev items of its subject; HellaSwag and Winogrande draw k+1 and
  drop the evaluated doc (their configs have no test split), as lm-eval does.
- "leaderboard" (harness b281b09, Open LLM Leaderboard v1): random.Random(42) shuffles each
  task's documents, --limit keeps the first N of the shuffle, and the same generator then
  draws every document's shots; GSM8K stops on ":", "Question:", "Question" and scores the
  `#### N` regex only; MMLU is the macro average of its subjects.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

from . import metrics as M
from ..errors import EvalDataError
from ..records import read_texts
from .data import find_file, read_records
from .tasks import GSM8K_UNTIL_LEADERBOARD, LEADERBOARD, Doc, Task, contexts_for, get_task, requests_for

HARNESS_SEED = 1234
LEADERBOARD_SEED = 42


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_text(s: str | None) -> str | None:
    return None if s is None else hashlib.sha256(s.encode("utf-8")).hexdigest()


def load_docs(task: Task, path: Path) -> list[Doc]:
    docs = []
    for i, rec in enumerate(read_records(path)):
        try:
            docs.append(task.make_doc(i, rec))
        except EvalDataError as e:
            raise EvalDataError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise EvalDataError(f"{path}: record {i}: not in the {task.name} schema ({task.schema}): "
                                f"{type(e).__name__}: {e}") from None
    return docs


def _sample_shots(task, doc, pool, pool_is_eval, k, rnd, protocol):
    if k == 0:
        return []
    if task.sampler == "first_n":
        cand = [d for d in pool if d.subject == doc.subject]
        if pool_is_eval:
            cand = [d for d in cand if d.record != doc.record]
        if len(cand) < k:
            raise EvalDataError(f"{task.name}: {k}-shot needs {k} examples of subject {doc.subject!r}, "
                                f"the few-shot pool has {len(cand)}")
        return cand[:k]
    drop = pool_is_eval or (task.exclude_eval_doc and protocol == "harness")
    need = k + 1 if drop else k
    if len(pool) < need:
        raise EvalDataError(f"{task.name}: {k}-shot needs {need} documents to draw from, the pool has {len(pool)}")
    picked = rnd.sample(pool, need)
    if drop:
        picked = [d for d in picked if d.record != doc.record][:k]
    return picked


class _Subtask:
    def __init__(self, name, task, docs, pool, pool_is_eval, k, protocol, limit, seed):
        self.name, self.task, self.k = name, task, k
        if protocol == "leaderboard":
            rnd = random.Random(LEADERBOARD_SEED)
            docs = list(docs)
            rnd.shuffle(docs)
        else:
            rnd = random.Random(seed)
        self.docs = docs[:limit] if limit is not None else docs
        self.n_total = len(docs)
        self.shots = [_sample_shots(task, d, pool, pool_is_eval, k, rnd, protocol) for d in self.docs]


def _resolve(lm, names, data_dir, num_fewshot, limit, protocol, seed, shots_override=None):
    """[(top-level name, Task, [subtasks], file info)]"""
    plan = []
    for name in names:
        task, subject = get_task(name)
        eval_file = find_file(data_dir, task.stems, (task.eval_split,))
        if eval_file is None:
            tried = ", ".join(f"{s}.jsonl" for s in task.stems)
            raise EvalDataError(f"{data_dir}: no data file for task {name} (looked for {tried}, .parquet, "
                                f"or <name>.{task.eval_split}.jsonl)")
        docs = load_docs(task, eval_file)
        if shots_override is not None:
            k = shots_override[name] if isinstance(shots_override, dict) else shots_override
        elif task.fixed_fewshot:
            k = task.num_fewshot
        else:
            k = task.num_fewshot if num_fewshot is None else int(num_fewshot)
        pool_file = None
        if k > 0:
            splits = (task.fewshot_split, "fewshot") if task.fewshot_split else ("fewshot",)
            for stem in task.stems:
                pool_file = find_file(data_dir, [f"{stem}.{s}" for s in splits] + [f"{stem}_{s}" for s in splits])
                if pool_file is not None:
                    break
        pool = load_docs(task, pool_file) if pool_file is not None else docs
        info = {"file": str(eval_file), "sha256": _sha256_file(eval_file),
                "fewshot_file": str(pool_file) if pool_file else None,
                "fewshot_sha256": _sha256_file(pool_file) if pool_file else None}
        if task.name == "mmlu":
            subjects = sorted({d.subject for d in docs}) if subject is None else [subject]
            if subject is not None and subject not in {d.subject for d in docs}:
                raise EvalDataError(f"{eval_file}: no records with subject {subject!r}")
            subs = [_Subtask(f"mmlu_{s}", task, [d for d in docs if d.subject == s], pool, pool_file is None, k,
                             protocol, limit, seed) for s in subjects]
        else:
            subs = [_Subtask(name, task, docs, pool, pool_file is None, k, protocol, limit, seed)]
        plan.append((name, task, subs, info, k))
    return plan


def _doc_requests(task, doc, shots, chat, protocol, max_gen_toks):
    ctx = contexts_for(task, doc, shots, chat)
    if task.kind == "generate_until":
        until = GSM8K_UNTIL_LEADERBOARD if protocol == "leaderboard" else task.until
        return [(ctx, {"until": list(until), "max_gen_toks": max_gen_toks or task.max_gen_toks})]
    return requests_for(task, doc, ctx, chat is not None)


def render_requests(tasks, data_dir, num_fewshot: int | None = None, limit: int | None = None,
                    protocol: str = "harness", seed: int = HARNESS_SEED, leaderboard: bool = False,
                    max_gen_toks: int | None = None, chat=None) -> dict:
    """{(sub)task: [(doc index, [requests])]}: exactly what evaluate() would send to the model
    (lm-eval's Instance.args), for inspecting prompts without a model."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    shots = None
    if leaderboard:
        protocol, shots = "leaderboard", {t: k for _, t, k, _ in LEADERBOARD}
    out = {}
    for name, task, subs, info, k in _resolve(None, tasks, data_dir, num_fewshot, limit, protocol, seed, shots):
        for sub in subs:
            out[sub.name] = [(d.index, _doc_requests(task, d, sh, chat, protocol, max_gen_toks))
                             for d, sh in zip(sub.docs, sub.shots)]
    return out


def split_tasks(tasks, include_paths=()) -> tuple[list, list]:
    """(built-in task names, lm-eval YAML items: files, directories, names under include_paths)."""
    from .yaml_tasks import index_paths, looks_like_yaml
    defined = set(index_paths(include_paths)) if include_paths else set()
    yaml_items = [t for t in tasks if looks_like_yaml(t) or t in defined]
    return [t for t in tasks if t not in yaml_items], yaml_items


def _check_tasks(tasks, yaml_items, data_dir, num_fewshot, protocol, leaderboard):
    """(built-in tasks, protocol, per-task shots or None) after the argument checks."""
    if yaml_items and leaderboard:
        raise EvalDataError("--leaderboard runs the six built-in tasks; drop the YAML tasks")
    shots_override = None
    if leaderboard:
        protocol = "leaderboard"
        if num_fewshot is not None:
            raise EvalDataError("--leaderboard fixes the shots (25/10/5/0/5/5); drop --fewshot")
        lb = {t: k for _, t, k, _ in LEADERBOARD}
        tasks = list(tasks) or list(lb)
        unknown = [t for t in tasks if t not in lb]
        if unknown:
            raise EvalDataError(f"--leaderboard covers {', '.join(lb)}; not {', '.join(unknown)}")
        shots_override = lb
    if protocol not in ("harness", "leaderboard"):
        raise EvalDataError(f"unknown protocol {protocol!r} (harness or leaderboard)")
    if not tasks and not yaml_items:
        raise EvalDataError("no tasks given")
    if tasks and data_dir is None:
        raise EvalDataError(f"built-in task(s) {', '.join(tasks)} read their files from a data directory: give "
                            f"--data-dir DIR")
    return tasks, protocol, shots_override


def evaluate(lm, tasks, data_dir=None, num_fewshot: int | None = None, limit: int | None = None,
             protocol: str = "harness", seed: int = HARNESS_SEED, log_samples: bool = False,
             apply_chat_template: bool = False, leaderboard: bool = False,
             max_gen_toks: int | None = None, include_paths=(), allow_code: bool = False,
             bootstrap_iters: int = 1000) -> dict:
    """Evaluate `lm` (an eval.LM) on the named tasks; returns lm-eval-shaped results.

    A task is a built-in name (read from `data_dir`) or an lm-eval YAML task: a .yaml file, a
    directory of them, or a name defined under `include_paths` (see eval.yaml_tasks; `!function`
    code runs only with allow_code=True; f1/mcc/perplexity standard errors are bootstrapped
    `bootstrap_iters` times).
    `max_gen_toks` overrides the generation budget of generate_until tasks (GSM8K: 256).
    `leaderboard=True` runs the Open LLM Leaderboard v1 protocol and settings (the six tasks
    when `tasks` is empty, 25/10/5/0/5/5 shots) and adds an "h6" section."""
    t0 = time.time()
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    tasks, yaml_items = split_tasks(tasks, include_paths)
    tasks, protocol, shots_override = _check_tasks(tasks, yaml_items, data_dir, num_fewshot, protocol, leaderboard)
    chat = None
    if apply_chat_template:
        chat = lambda msgs: lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)  # noqa: E731
    prepared = None
    if yaml_items:   # read and check every YAML task before any model work
        from .yaml_eval import prepare
        from .yaml_tasks import resolve
        prepared = prepare(resolve(yaml_items, include_paths), data_dir, num_fewshot, limit, seed, allow_code,
                           max_gen_toks)
    plan = _resolve(lm, tasks, data_dir, num_fewshot, limit, protocol, seed, shots_override)

    results, configs, samples, n_shot, n_samples = {}, {}, {}, {}, {}
    for name, task, subs, info, k in plan:
        t_task = time.time()
        per_sub, prompt_sha, logged = _run_task(lm, name, task, subs, chat, protocol, max_gen_toks, log_samples)
        if logged:
            samples[name] = logged
        _record_task(name, subs, per_sub, k, results, n_samples, n_shot)
        configs[name] = _task_config(name, task, k, info, protocol, seed, chat, limit, max_gen_toks, prompt_sha)
        configs[name]["seconds"] = round(time.time() - t_task, 3)

    res = {"results": results, "configs": configs, "n-shot": n_shot, "n-samples": n_samples,
           "config": {**_lm_info(lm), "protocol": protocol, "limit": limit, "data_dir": str(data_dir)},
           "chat_template_applied": bool(apply_chat_template),
           "chat_template_sha256": _sha256_text(getattr(lm, "chat_template_text", lambda: None)()),
           "tokenizer": _tokenizer_info(lm),
           "versions": {name: task.version for name, task, *_ in plan},
           "date": time.time(), "total_evaluation_time_seconds": round(time.time() - t0, 3)}
    try:
        from importlib.metadata import version
        res["lmfoundry_version"] = version("lmfoundry")
    except Exception:  # not installed as a distribution
        res["lmfoundry_version"] = None
    if leaderboard:
        res["h6"] = h6_table(results)
    if log_samples:
        res["samples"] = samples
    if prepared is not None:
        from .yaml_eval import run_prepared
        _merge_yaml(res, run_prepared(lm, prepared, log_samples, chat, bootstrap_iters))
        res["total_evaluation_time_seconds"] = round(time.time() - t0, 3)
    return res


def _run_task(lm, name, task, subs, chat, protocol, max_gen_toks, log_samples):
    """Every request of every subtask in one call (better batches), scored per document:
    ({subtask: [metrics per document]}, sha256 of the requests, the logged samples)."""
    per_doc = []           # (subtask, doc, shots, requests)
    flat, groups, gen = [], [], []
    for sub in subs:
        for doc, shots in zip(sub.docs, sub.shots):
            reqs = _doc_requests(task, doc, shots, chat, protocol, max_gen_toks)
            if task.kind == "generate_until":
                gen.append(reqs[0])
            else:
                flat.extend(reqs)
                groups.extend([(sub.name, doc.index)] * len(reqs))
            per_doc.append((sub, doc, shots, reqs))
    if task.kind == "generate_until":
        outputs = iter(lm.generate_until(gen, desc=name))
    else:
        outputs = iter(_chunks(lm.loglikelihood(flat, groups=groups, desc=name), [len(r) for *_, r in per_doc]))
    per_sub: dict = {s.name: [] for s in subs}
    prompt_hash, logged = hashlib.sha256(), []
    for (sub, doc, shots, reqs), resp in zip(per_doc, outputs):
        prompt_hash.update(json.dumps(reqs, ensure_ascii=False).encode("utf-8"))
        m, extra = _score(task, doc, resp, protocol)
        per_sub[sub.name].append(m)
        if log_samples:
            logged.append({"task": sub.name, "doc_id": doc.index, "doc": doc.record,
                           "fewshot_doc_ids": [s.index for s in shots], "arguments": [list(r) for r in reqs],
                           "resps": resp, "target": doc.gold if task.kind != "generate_until" else doc.target,
                           **extra, "metrics": m})
    return per_sub, prompt_hash.hexdigest(), logged


def _record_task(name, subs, per_sub, k, results, n_samples, n_shot):
    """Each subtask's aggregate into the results (and MMLU's group: micro and macro accuracy)."""
    for sub in subs:
        results[sub.name] = _aggregate(per_sub[sub.name])
        results[sub.name]["alias"] = sub.name
        n_samples[sub.name] = {"original": sub.n_total, "effective": len(sub.docs)}
        n_shot[sub.name] = k
    if name == "mmlu":
        every = [m for s in subs for m in per_sub[s.name]]
        group = _aggregate(every)
        group["acc_macro"] = M.mean([results[s.name]["acc"] for s in subs])
        group["alias"], group["subtasks"] = "mmlu", len(subs)
        results["mmlu"] = group
        n_samples["mmlu"] = {"original": sum(s.n_total for s in subs), "effective": len(every)}
        n_shot["mmlu"] = k


def _task_config(name, task, k, info, protocol, seed, chat, limit, max_gen_toks, prompt_sha) -> dict:
    """The task's entry in the results' "configs" (lm-eval's shape, plus our protocol and hashes)."""
    config = {
        "task": name, "output_type": task.kind, "version": task.version, "num_fewshot": k,
        "fewshot_sampler": task.sampler, "protocol": protocol,
        "fewshot_seed": LEADERBOARD_SEED if protocol == "leaderboard" else seed,
        "target_delimiter": "" if chat else " ", "fewshot_delimiter": "\n\n",
        "metrics": list(task.metrics) if not (protocol == "leaderboard" and task.name == "gsm8k") else ["acc"],
        "limit": limit, "prompt_sha256": prompt_sha, **info}
    if task.kind == "generate_until":
        config["generation_kwargs"] = {
            "until": list(GSM8K_UNTIL_LEADERBOARD if protocol == "leaderboard" else task.until),
            "max_gen_toks": max_gen_toks or task.max_gen_toks, "do_sample": False, "temperature": 0.0}
    return config


def _merge_yaml(res: dict, yres: dict):
    for key in ("results", "configs", "n-shot", "n-samples", "versions", "samples"):
        if key in yres:
            res.setdefault(key, {}).update(yres[key])
    for key in ("groups", "group_subtasks", "higher_is_better"):
        res[key] = yres[key]


def _lm_info(lm) -> dict:
    """Model settings for the results file (an LM-like stub may lack some)."""
    model = getattr(lm, "model", None)
    return {"model": getattr(lm, "name", type(lm).__name__),
            "model_args": {"dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
                           "device": str(getattr(model, "device", ""))},
            "batch_size": getattr(lm, "batch_size", None), "max_length": getattr(lm, "max_length", None),
            "share_prefix": getattr(lm, "share_prefix", None)}


def _tokenizer_info(lm) -> dict | None:
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        return None
    return {"bos_token": getattr(tok, "bos_token", None), "eos_token": getattr(tok, "eos_token", None),
            "prefix_token_id": getattr(lm, "prefix_token_id", None),
            "bos_policy": "the tokenizer's own post-processor; never a second BOS"}


def _chunks(xs, sizes):
    i = 0
    for n in sizes:
        yield [list(x) for x in xs[i:i + n]]
        i += n


def _score(task: Task, doc: Doc, resp, protocol: str) -> tuple[dict, dict]:
    if task.kind == "generate_until":
        text = resp
        if protocol == "leaderboard":
            return {"acc": M.gsm8k_leaderboard(text, doc.target)}, {"filtered_resps": {"strict": M.gsm8k_strict(text)}}
        strict, flexible = M.gsm8k_strict(text), M.gsm8k_flexible(text)
        return ({"exact_match,strict-match": M.exact_match(strict, doc.target),
                 "exact_match,flexible-extract": M.exact_match(flexible, doc.target)},
                {"filtered_resps": {"strict-match": strict, "flexible-extract": flexible}})
    lls = [ll for ll, _ in resp]
    if task.name == "truthfulqa_mc2":
        v = M.mc2(lls, doc.labels)
        return {"acc": v, "mc2": v}, {}
    m = M.multiple_choice(lls, doc.choices, doc.gold)
    return {k: m[k] for k in task.metrics}, {}


def _aggregate(rows: list[dict]) -> dict:
    out = {}
    for key in (rows[0] if rows else {}):
        xs = [r[key] for r in rows]
        metric, _, filt = key.partition(",")
        out[key] = M.mean(xs)
        out[f"{metric}_stderr" + (f",{filt}" if filt else "")] = M.stderr(xs)
    return out


def h6_table(results: dict) -> dict:
    """The Open LLM Leaderboard v1 columns (percent) and their average (None if any is missing)."""
    cols = {}
    for col, task, shots, metric in LEADERBOARD:
        v = results.get(task, {}).get(metric)
        cols[col] = None if v is None or (isinstance(v, float) and math.isnan(v)) else 100.0 * v
    vals = list(cols.values())
    return {"columns": cols, "shots": {c: s for c, _, s, _ in LEADERBOARD},
            "average": None if any(v is None for v in vals) else sum(vals) / len(vals)}


# ---- terminal output ----
def format_table(res: dict) -> str:
    rows = [("Task", "n-shot", "n", "Metric", "Value", "Stderr")]
    for name, r in res["results"].items():
        if name.startswith("mmlu_") and "mmlu" in res["results"] and len(res["results"]) > 12:
            continue   # 57 subject lines would bury the summary; they are in the JSON
        for key, v in r.items():
            if key == "alias" or key == "subtasks" or "_stderr" in key or not isinstance(v, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            se = r.get(f"{metric}_stderr" + (f",{filt}" if filt else ""))
            rows.append((name, str(res["n-shot"].get(name, "")), str(res["n-samples"].get(name, {}).get("effective", "")),
                         key, f"{v:.4f}", "" if se is None or (isinstance(se, float) and math.isnan(se)) else f"{se:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows[1:]]
    if "h6" in res:
        h = res["h6"]
        out.append("")
        out.append("Open LLM Leaderboard v1 (H6)")
        hdr = list(h["columns"]) + ["Average"]
        vals = [f"{v:.2f}" if v is not None else "n/a" for v in h["columns"].values()]
        vals.append(f"{h['average']:.2f}" if h["average"] is not None else "n/a")
        shots = [f"{h['shots'][c]}-shot" for c in h["columns"]] + [""]
        ws = [max(len(a), len(b), len(c)) for a, b, c in zip(hdr, vals, shots)]
        for r in (hdr, shots, vals):
            out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, ws)) + " |")
    return "\n".join(out)


# ---- perplexity ----
def perplexity_documents(path) -> list[str]:
    """A .txt file is one document; .jsonl/.json/.parquet give one per record ("text", "page" or "content")."""
    path = Path(path)
    if path.suffix == ".txt":
        return [text for _, text in read_texts(path, txt_mode="file", error=EvalDataError)]
    docs = []
    for i, r in enumerate(read_records(path)):
        key = next((k for k in ("text", "page", "content") if isinstance(r.get(k), str)), None)
        if key is None:
            raise EvalDataError(f"{path}: record {i} has no 'text' (or 'page' / 'content') string")
        docs.append(r[key])
    return docs


def perplexity(lm, path) -> dict:
    """Token, word and byte perplexity of a file (lm-eval's loglikelihood_rolling metrics)."""
    import re
    t0 = time.time()
    docs = [d for d in perplexity_documents(path) if d]
    if not docs:
        raise EvalDataError(f"{path}: no text to score")
    scored = lm.loglikelihood_rolling(docs)
    ll = sum(s for s, _ in scored)
    n_tok = sum(n for _, n in scored)
    n_words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    r = {"token_perplexity": math.exp(-ll / n_tok), "nll_per_token": -ll / n_tok,
         "word_perplexity": math.exp(-ll / n_words), "byte_perplexity": math.exp(-ll / n_bytes),
         "bits_per_byte": -ll / n_bytes / math.log(2), "loglikelihood": ll, "tokens": n_tok,
         "words": n_words, "bytes": n_bytes, "documents": len(docs)}
    return {"results": {"perplexity": r},
            "configs": {"perplexity": {"file": str(path), "sha256": _sha256_file(Path(path)),
                                       "window": lm.max_length, "prefix_token_id": lm.prefix_token_id,
                                       "special_tokens_added": False}},
            "config": {"model": lm.name, "batch_size": lm.batch_size, "max_length": lm.max_length},
            "chat_template_sha256": _sha256_text(lm.chat_template_text()),
            "total_evaluation_time_seconds": round(time.time() - t0, 3)}
