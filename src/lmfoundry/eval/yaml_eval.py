"""Running lm-eval YAML tasks on lmfoundry's LM: prompts, requests, filters, metrics and groups, with
lm-eval 0.4's semantics (lm_eval/api/task.py ConfigurableTask, samplers.py, filters/, metrics.py,
api/group.py), so every request is byte-identical to lm-eval's and every metric equal.

    nodes = yaml_tasks.resolve(["kobest/"])                       # TaskSpec | GroupSpec
    res = evaluate_yaml(lm, nodes, data_dir="data/", allow_code=True)

Strings: a doc_to_* string equal to a column name is that column's value; otherwise it is a Jinja
template (undefined names raise) rendered with the document's columns. A rendered target (or text)
of digits becomes an int index when the task has choices; a target like "[...]" is a list of golds;
doc_to_choice renders to a Python list literal. The prompt is description + shots + query, each
shot `text + target_delimiter + answer + fewshot_delimiter`; a multiple-choice request is
(prompt, target_delimiter + choice). Shots: random.Random(seed) per task, documents in order,
`first_n` takes the first k; the evaluated document is drawn around when the few-shot split is the
test split. All requests of all tasks go to the model in one call per request type (shared prefixes
of a document's choices are scored once by LM.loglikelihood).
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import time

import numpy as np

from ..errors import EvalDataError
from . import metrics as M
from .data import read_records
from .yaml_tasks import METRICS, DEFAULT_METRICS, FunctionRef, GroupSpec, TaskSpec, Docs, split_files

_UNSET = object()


def _jinja():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


_ENV = None
_TEMPLATES: dict = {}


def render(template: str, doc: dict) -> str:
    global _ENV
    if _ENV is None:
        _ENV = _jinja()
    if template not in _TEMPLATES:
        _TEMPLATES[template] = _ENV.from_string(template)
    return _TEMPLATES[template].render(**doc)


def _maybe_delimit(prefix, suffix, delimiter=" ") -> str:
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix
    return prefix + suffix if prefix[-1].isspace() or suffix[0].isspace() else prefix + delimiter + suffix


def _requires_delimiter(prefix: str, suffix: str) -> bool:
    return prefix != "" and not (prefix[-1].isspace() or suffix[0].isspace())


def _sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, FunctionRef):
        return str(v)
    return v if v is None or isinstance(v, (str, int, float, bool)) else repr(v)


class YamlTask:
    """One leaf task: its code resolved, documents read, shots drawn, requests built and scored."""

    def __init__(self, spec: TaskSpec, allow_code: bool, data_dir, num_fewshot, seed: int, limit):
        self.spec, self.name, self.data_dir = spec, spec.name, data_dir
        self.cfg = cfg = {k: self._code(v, k, allow_code) for k, v in spec.cfg.items()}
        self.output_type = cfg.get("output_type", "generate_until")
        self.fs = {k: self._code(v, f"fewshot_config.{k}", allow_code)
                   for k, v in (spec.cfg.get("fewshot_config") or {}).items()}
        self.metrics = self._metric_table(allow_code)
        self.filters = self._filters()
        self.gen_kwargs = self._gen_kwargs()
        config_k = cfg.get("num_fewshot")
        self.k = int(num_fewshot) if num_fewshot is not None and config_k != 0 else int(config_k or 0)
        self.seed, self.files = seed, {}
        eval_split = cfg.get("test_split") or cfg.get("validation_split")
        if not eval_split:
            raise EvalDataError(f"{spec.where()}: needs test_split or validation_split (the documents to evaluate)")
        self.all_docs = self._split_docs(eval_split, cfg.get("process_docs"))
        if not self.all_docs:
            raise EvalDataError(f"{spec.where()}: split {eval_split!r} has no documents")
        self.docs = self.all_docs[:limit] if limit is not None else self.all_docs
        self.features = set(self.all_docs.column_names)
        doc0 = self.all_docs[0]
        self.multiple_input = (self._guard(0, "doc_to_text", self.doc_to_text, doc0) if cfg.get("doc_to_choice")
                               is not None else None)
        self.multiple_input = isinstance(self.multiple_input, int) and not isinstance(self.multiple_input, bool)
        self.multiple_target = isinstance(self._guard(0, "doc_to_target", self.doc_to_target, doc0), list)
        self.shots = self._draw_shots() if self.k > 0 else [[] for _ in self.docs]

    # ---- configuration ----
    def _code(self, value, key, allow_code):
        if isinstance(value, FunctionRef):
            return value.load(allow_code, key)
        if isinstance(value, list):
            return [self._code(v, key, allow_code) for v in value]
        if isinstance(value, dict):
            return {k: self._code(v, f"{key}.{k}", allow_code) for k, v in value.items()}
        return value

    def _metric_table(self, allow_code) -> dict:
        """{metric name: (function or None, kwargs, aggregation function, aggregation name, higher is better)}"""
        table = {}
        entries = self.cfg.get("metric_list") or [{"metric": m} for m in DEFAULT_METRICS[self.output_type]]
        for m in entries:
            fn, name = (m["metric"], m["metric"].__name__) if callable(m["metric"]) else (None, m["metric"])
            kwargs = {k: v for k, v in m.items() if k not in ("metric", "aggregation", "higher_is_better", "hf_evaluate")}
            agg = m.get("aggregation")
            if agg is None:
                agg = METRICS[name][1] if name in METRICS else "mean"
            agg_fn = agg if callable(agg) else M.AGGREGATIONS[agg]
            higher = m.get("higher_is_better", METRICS[name][2] if name in METRICS else True)
            table[name] = (fn, kwargs, agg_fn, agg if isinstance(agg, str) else None, bool(higher))
        return table

    def _filters(self) -> list:
        flist = self.cfg.get("filter_list")
        if not flist:
            return [("none", [M.FILTERS["take_first"]()])]
        return [(f["name"], [M.FILTERS[s["function"]](**{k: v for k, v in s.items() if k != "function"})
                             for s in f["filter"]]) for f in flist]

    def _gen_kwargs(self):
        if self.output_type != "generate_until":
            return None
        kw = dict(self.cfg.get("generation_kwargs") or {"do_sample": False, "temperature": 0.0, "max_gen_toks": 256})
        kw.setdefault("until", [self.cfg.get("fewshot_delimiter", "\n\n")])
        if isinstance(kw["until"], str):
            kw["until"] = [kw["until"]]
        return kw

    def _guard(self, i, what, fn, *args):
        """fn(*args), any failure of the user's template or code named with the task file and document."""
        try:
            return fn(*args)
        except EvalDataError:
            raise
        except Exception as e:
            raise EvalDataError(f"{self.spec.where(what)}: document {i}: {what} failed: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None

    # ---- documents ----
    def _split_docs(self, split, process) -> Docs:
        files = split_files(self.spec, split, self.data_dir)
        self.files[split] = files
        rows = [r for f in files for r in read_records(f)]
        columns = dict.fromkeys(k for r in rows for k in r)
        docs = Docs({k: r.get(k) for k in columns} for r in rows)   # missing columns are None, as in datasets
        if process is None:
            return docs
        out = self._guard(0, "process_docs", process, docs)
        return out if isinstance(out, Docs) else Docs(out)

    def _pool(self) -> tuple[list, bool]:
        """(few-shot documents, whether the evaluated document must be drawn around)."""
        cfg, fs = self.cfg, self.fs
        split = fs.get("split", cfg.get("fewshot_split"))
        if split:
            pool = self._split_docs(split, fs.get("process_docs", cfg.get("process_docs")))
        elif fs.get("samples") is not None:
            pool = fs["samples"]() if callable(fs["samples"]) else fs["samples"]
        else:
            split = next((cfg[k] for k in ("training_split", "validation_split", "test_split") if cfg.get(k)), None)
            pool = self._split_docs(split, cfg.get("process_docs"))
            split = fs.get("split", cfg.get("fewshot_split"))
        if fs.get("fewshot_indices"):
            pool = [pool[i] for i in fs["fewshot_indices"]]
        return list(pool), split == cfg.get("test_split")

    def _draw_shots(self) -> list[list[dict]]:
        pool, exclude = self._pool()
        rnd, k, first_n = random.Random(self.seed), self.k, self.fs.get("sampler", "default") == "first_n"
        need = k + 1 if exclude and not first_n else k
        if len(pool) < need:
            raise EvalDataError(f"{self.spec.where()}: {k}-shot needs {need} few-shot documents, the pool has {len(pool)}")
        out = []
        for doc in self.docs:
            if first_n:
                out.append(([x for x in pool if x != doc] if exclude else pool)[:k])
            elif not exclude:
                out.append(rnd.sample(pool, k))
            else:
                picked = [x for x in rnd.sample(pool, k + 1) if x != doc][:k]
                if len(picked) < k:   # the pool holds copies of the document: draw from the rest
                    picked = rnd.sample([x for x in pool if x != doc], k)
                out.append(picked)
        return out

    # ---- doc_to_text / doc_to_target / doc_to_choice (lm-eval's rules) ----
    def _value(self, key, spec, doc):
        """A column's value, a rendered template (digits -> an int index when the task has choices),
        or a function's result."""
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            text = render(spec, doc)
            return ast.literal_eval(text) if text.isdigit() and self.cfg.get("doc_to_choice") is not None else text
        if callable(spec):
            return spec(doc)
        raise EvalDataError(f"{self.spec.where(key)}: {key} must be a column, a template, an int"
                            f"{', a list' if key == 'doc_to_target' else ''} or a function, got {spec!r}")

    def doc_to_text(self, doc, spec=_UNSET):
        spec = self.cfg.get("doc_to_text") if spec is _UNSET else spec
        return spec if isinstance(spec, int) else self._value("doc_to_text", spec, doc)

    def doc_to_target(self, doc, spec=_UNSET):
        spec = self.cfg.get("doc_to_target") if spec is _UNSET else spec
        if isinstance(spec, (int, list)):
            return spec
        value = self._value("doc_to_target", spec, doc)
        if isinstance(spec, str) and spec not in self.features and isinstance(value, str) and len(value) >= 2 \
                and value[0] == "[" and value[-1] == "]":   # a rendered list: several golds
            try:
                return ast.literal_eval(value)
            except (SyntaxError, ValueError):
                return value
        return value

    def doc_to_choice(self, doc, spec=_UNSET):
        spec = self.cfg.get("doc_to_choice") if spec is _UNSET else spec
        if isinstance(spec, str):
            return doc[spec] if spec in self.features else ast.literal_eval(render(spec, doc))
        if isinstance(spec, list):
            return spec
        if isinstance(spec, dict):
            return list(spec.values())
        if callable(spec):
            return spec(doc)
        raise EvalDataError(f"{self.spec.where('doc_to_choice')}: doc_to_choice is needed here (a column, a "
                            f"template, a list, a mapping or a function), got {spec!r}")

    def _field(self, doc, field):
        if field:
            return doc[field] if field in doc else render(field, doc)
        return None

    # ---- prompts ----
    def _qa_turn(self, q, c, a, gen_prefix, tgt_delim, few_delim) -> list[tuple]:
        if not isinstance(q, str):
            raise EvalDataError(f"{self.spec.where('doc_to_text')}: the prompt text is {type(q).__name__}, not a string")
        has_answer = a is not None and a != ""
        user_delim = tgt_delim if (has_answer and not gen_prefix) or (gen_prefix and _requires_delimiter(q, gen_prefix)) \
            else ""
        msgs = [("user", q, user_delim)]
        if has_answer:
            text = c[a] if (c and isinstance(a, int)) else a[0] if isinstance(a, list) else a
            if not isinstance(text, str):
                raise EvalDataError(f"{self.spec.where('doc_to_target')}: a few-shot answer is {text!r}, not a string "
                                    f"(an int target needs doc_to_choice)")
            msgs.append(("assistant", _maybe_delimit(gen_prefix, text, " "), few_delim))
        elif gen_prefix:
            msgs.append(("assistant", gen_prefix, ""))
        return msgs

    def _shot_turns(self, shot) -> list[tuple]:
        cfg, fs = self.cfg, self.fs
        get = lambda key, default=None: fs.get(key, cfg.get(key, default))  # noqa: E731
        q = self.doc_to_text(shot, get("doc_to_text"))
        c = self.doc_to_choice(shot, get("doc_to_choice")) if get("doc_to_choice") else None
        a = self.doc_to_target(shot, get("doc_to_target"))
        if self.multiple_input:
            q, c = c[q], None
        return self._qa_turn(q, c, a, self._field(shot, get("gen_prefix")), get("target_delimiter", " "),
                             get("fewshot_delimiter", "\n\n"))

    def context(self, doc, shots, chat=None):
        """The prompt (a list of prompts for a multiple-input task)."""
        cfg = self.cfg
        msgs = []
        description = self._field(doc, cfg.get("description")) or ""
        if description:
            msgs.append(("system", description, ""))
        for shot in shots:
            msgs += self._shot_turns(shot)
        gen_prefix = self._field(doc, cfg.get("gen_prefix"))
        if gen_prefix and chat is not None:
            raise EvalDataError(f"{self.spec.where('gen_prefix')}: gen_prefix with --apply-chat-template is not "
                                f"supported")
        q = self.doc_to_text(doc)
        if self.multiple_input:
            return [self._render(msgs + self._qa_turn(ctx, None, None, gen_prefix, "", ""), chat)
                    for ctx in self.doc_to_choice(doc)]
        c = self.doc_to_choice(doc) if cfg.get("doc_to_choice") is not None else None
        return self._render(msgs + self._qa_turn(q, c, None, gen_prefix, cfg.get("target_delimiter", " "), ""), chat)

    @staticmethod
    def _render(msgs, chat) -> str:
        if chat is None:
            return "".join(content + delim for _, content, delim in msgs)
        return chat([{"role": role, "content": content} for role, content, _ in msgs])

    def requests(self, i, doc, chat=None):
        """lm-eval's Instance.args for one document."""
        ctx = self.context(doc, self.shots[i], chat)
        otype = self.output_type
        if otype == "loglikelihood":
            return [(ctx, self.doc_to_target(doc))]
        if otype == "loglikelihood_rolling":
            return [(self.doc_to_target(doc),)]
        if otype == "generate_until":
            return [(ctx, dict(self.gen_kwargs))]   # sent `repeats` times
        delim = self.cfg.get("target_delimiter", " ")
        if chat is not None:
            gp = self.cfg.get("gen_prefix")
            delim = delim if gp and not gp[-1:].isspace() else ""
        if self.multiple_input:
            reqs = [(c, f"{delim}{self.doc_to_target(doc)}") for c in ctx]
        else:
            reqs = [(ctx, f"{delim}{c}") for c in self.doc_to_choice(doc)]
        if "acc_mutual_info" in self.metrics:
            reqs += [("", f"{delim}{c}") for c in self.doc_to_choice(doc)]
        return reqs

    # ---- scoring (lm-eval's process_results) ----
    def score(self, doc, resps) -> tuple[dict, dict]:
        """({metric key: per-document value}, {filter name: filtered response} for generate_until)."""
        if callable(self.cfg.get("process_results")):
            results = self._filtered(resps) if self.output_type == "generate_until" else None
            if results is None:
                lm_results = [r[0] for r in resps] if self.output_type == "loglikelihood_rolling" else resps
                return dict(self.cfg["process_results"](doc, lm_results)), {}
            out = {}
            for name, value in results.items():
                out.update({_key(k, name): v for k, v in self.cfg["process_results"](doc, [value]).items()})
            return out, results
        if self.output_type == "multiple_choice":
            return self._score_choice(doc, resps), {}
        if self.output_type == "loglikelihood":
            ll, greedy = resps[0]
            return {k: v for k, v in (("perplexity", ll), ("acc", int(greedy))) if k in self.metrics}, {}
        if self.output_type == "loglikelihood_rolling":
            ll, target = resps[0][0], self.doc_to_target(doc)
            units = {"word_perplexity": len(re.split(r"\s+", target)), "byte_perplexity": len(target.encode("utf-8")),
                     "bits_per_byte": len(target.encode("utf-8"))}
            return {k: (ll, n) for k, n in units.items() if k in self.metrics}, {}
        filtered = self._filtered(resps)
        out = {}
        for name, result in filtered.items():
            out.update({_key(k, name): v for k, v in self._score_generation(doc, result).items()})
        return out, filtered

    def _filtered(self, resps) -> dict:
        out = {}
        for name, steps in self.filters:
            value = list(resps)
            for step in steps:
                value = step(value)
            out[name] = value
        return out

    def _gold(self, doc, n):
        gold = self.doc_to_text(doc) if self.multiple_input else self.doc_to_target(doc)
        if isinstance(gold, list):
            return [g if g < n else -100 for g in gold]
        if isinstance(gold, int):
            return gold if gold < n else -100
        choices = self.doc_to_choice(doc)
        return choices.index(gold) if gold in choices else -100

    def _score_choice(self, doc, resps) -> dict:
        lls, greedy = [float(r[0]) for r in resps], [bool(r[1]) for r in resps]
        choices = self.doc_to_choice(doc)
        n = len(choices)
        lls_u = lls[n:] if "acc_mutual_info" in self.metrics and len(lls) == 2 * n else None
        lls = np.array(lls[:n])
        with np.errstate(divide="ignore", invalid="ignore"):
            pred = int(np.argmax(lls))
            pred_norm = int(np.argmax(lls / np.array([float(len(c)) for c in choices])))
            pred_byte = int(np.argmax(lls / np.array([float(len(c.encode("utf-8"))) for c in choices])))
        gold = self._gold(doc, n)
        hit = (lambda p: float(p in gold)) if self.multiple_target else (lambda p: float(p == gold))
        em = int(any(greedy[g] for g in gold if g != -100)) if self.multiple_target else \
            (int(greedy[gold]) if gold != -100 else 0)
        values = {"acc": hit(pred), "acc_norm": hit(pred_norm), "acc_bytes": hit(pred_byte), "f1": (gold, pred),
                  "mcc": (gold, pred), "exact_match": em, "brier_score": (gold, M.softmax(list(lls)))}
        if lls_u is not None:
            values["acc_mutual_info"] = hit(int(np.argmax([c - u for c, u in zip(lls, lls_u)])))
        return {k: v for k, v in values.items() if k in self.metrics}

    def _score_generation(self, doc, result) -> dict:
        gold = self.doc_to_target(doc)
        if self.cfg.get("doc_to_choice") is not None:
            gold = self.doc_to_choice(doc)[gold]
        elif self.multiple_target:
            gold = list(gold)
        elif type(gold) is not type(result) and not isinstance(result, list):
            gold = type(result)(gold)
        golds = (gold if isinstance(gold, list) else [gold]) if self.multiple_target else [gold]
        out = {}
        for name, (fn, kwargs, *_rest) in self.metrics.items():
            if fn is None:   # exact_match: any gold matches
                out[name] = float(any(M.exact_match_hf(result, g, **kwargs) for g in golds))
                continue
            scores = []
            for g in golds:
                try:
                    value = fn(references=[g], predictions=[result], **kwargs)
                except TypeError:   # lm-eval's other metric calling convention
                    value = fn([g, result])
                scores.append(value[name] if isinstance(value, dict) and self.multiple_target else value)
            if self.multiple_target:
                out[name] = 1.0 if any(scores) else 0.0
            else:
                out.update(scores[0] if isinstance(scores[0], dict) else {name: scores[0]})
        return out

    # ---- aggregation ----
    def aggregate(self, rows: list[dict], bootstrap_iters: int) -> dict:
        out = {}
        for key in dict.fromkeys(k for r in rows for k in r):
            items = [r[key] for r in rows if key in r]
            metric, _, filt = key.partition(",")
            _, _, agg_fn, agg_name, _ = self.metrics.get(metric, (None, None, M.mean, "mean", True))
            out[key] = float(agg_fn(items))
            se = None
            if agg_name == "mean" and len(items) > 1:
                se = M.stderr(items)
            elif agg_name in M.BOOTSTRAPPED and bootstrap_iters > 0 and len(items) > 1:
                se = M.bootstrap_stderr(agg_fn, items, bootstrap_iters)
            out[_key(f"{metric}_stderr", filt or "none")] = se
        return out

    def config(self, prompt_sha256: str) -> dict:
        files = {s: [str(p) for p in fs] for s, fs in self.files.items()}
        return {**_jsonable(self.spec.cfg), "task": self.name, "output_type": self.output_type,
                "num_fewshot": self.k, "fewshot_seed": self.seed, "yaml": str(self.spec.path),
                "data_files": files, "data_sha256": _sha256_files(p for fs in self.files.values() for p in fs),
                "prompt_sha256": prompt_sha256}


def _key(metric: str, filt: str) -> str:
    """Result keys as the built-in tasks write them: "acc" for lm-eval's "acc,none"."""
    return metric if filt == "none" else f"{metric},{filt}"


def _flatten(nodes, groups: dict, leaves: dict, subtasks: dict):
    for node in nodes:
        if isinstance(node, GroupSpec):
            groups.setdefault(node.name, node)
            subtasks[node.name] = [c.name for c in node.children]
            _flatten(node.children, groups, leaves, subtasks)
        else:
            leaves.setdefault(node.name, node)


def prepare(nodes, data_dir=None, num_fewshot=None, limit=None, seed: int = 1234, allow_code: bool = False,
            max_gen_toks=None):
    """(YamlTasks in run order, {group name: GroupSpec}, {group: its children's names})."""
    groups, leaves, subtasks = {}, {}, {}
    _flatten(nodes, groups, leaves, subtasks)
    tasks = [YamlTask(spec, allow_code, data_dir, num_fewshot, seed, limit) for spec in leaves.values()]
    if max_gen_toks is not None:
        for t in tasks:
            if t.gen_kwargs is not None:
                t.gen_kwargs["max_gen_toks"] = int(max_gen_toks)
    return tasks, groups, subtasks


def render_yaml_requests(nodes, chat=None, **kw) -> dict:
    """{task: [(doc index, [requests])]}: what evaluate_yaml sends to the model, without a model."""
    tasks, _, _ = prepare(nodes, **kw)
    return {t.name: [(i, t._guard(i, "prompt", t.requests, i, d, chat)) for i, d in enumerate(t.docs)] for t in tasks}


def _run_model(lm, tasks, chat):
    """Every task's requests, sent in one call per request type; returns {task: [responses per doc]}."""
    per_doc, ll_reqs, ll_groups, rolling, gen = [], [], [], [], []
    for t in tasks:
        for i, doc in enumerate(t.docs):
            reqs = t._guard(i, "prompt", t.requests, i, doc, chat)
            kind = {"generate_until": gen, "loglikelihood_rolling": rolling}.get(t.output_type, ll_reqs)
            start = len(kind)
            sent = reqs * int(t.cfg.get("repeats", 1)) if kind is gen else reqs
            if kind is ll_reqs:
                ll_groups.extend([(t.name, i)] * len(reqs))
            kind.extend(r[0] if kind is rolling else r for r in sent)
            per_doc.append((t, i, reqs, kind, start, len(sent)))
    outs = {}
    if ll_reqs:
        outs[id(ll_reqs)] = lm.loglikelihood(ll_reqs, groups=ll_groups, desc="yaml tasks")
    if rolling:
        outs[id(rolling)] = lm.loglikelihood_rolling(rolling, desc="yaml perplexity")
    if gen:
        outs[id(gen)] = lm.generate_until(gen, desc="yaml generation")
    resps: dict = {t.name: [] for t in tasks}
    for t, i, reqs, kind, start, n in per_doc:
        resps[t.name].append((reqs, list(outs[id(kind)][start:start + n])))
    return resps


def _group_results(group: GroupSpec, results: dict, sizes: dict) -> dict:
    """lm-eval's Group.aggregate: size-weighted (or plain) means over the group's leaf tasks."""
    leaves = [t.name for t in group.leaves()]
    out = {"alias": group.alias}
    for agg in group.aggregate:
        metric = agg["metric"]
        filters = agg["filter_list"] or sorted({(k.partition(",")[2] or "none") for t in leaves
                                                for k in results.get(t, {}) if k.partition(",")[0] == metric})
        for filt in filters:
            key, se_key = _key(metric, filt), _key(f"{metric}_stderr", filt)
            have = [t for t in leaves if key in results.get(t, {})]
            if not have:
                continue
            vals, ns = [results[t][key] for t in have], [sizes[t] for t in have]
            weights = ns if agg["weight_by_size"] else [1] * len(ns)
            out[key] = sum(v * w for v, w in zip(vals, weights)) / sum(weights)
            ses = [results[t].get(se_key) for t in have]
            out[se_key] = None if any(s is None for s in ses) else \
                (M.pooled_stderr(ses, ns) if agg["weight_by_size"] else M.unweighted_stderr(ses))
    return out


def evaluate_yaml(lm, nodes, data_dir=None, num_fewshot=None, limit=None, seed: int = 1234, allow_code=False,
                  log_samples=False, chat=None, bootstrap_iters: int = 1000, max_gen_toks=None) -> dict:
    """lm-eval-shaped results (results, groups, group_subtasks, configs, versions, n-shot, n-samples,
    higher_is_better, [samples]) for resolved YAML tasks and groups."""
    prepared = prepare(nodes, data_dir, num_fewshot, limit, seed, allow_code, max_gen_toks)
    return run_prepared(lm, prepared, log_samples, chat, bootstrap_iters)


def run_prepared(lm, prepared, log_samples=False, chat=None, bootstrap_iters: int = 1000) -> dict:
    """evaluate_yaml on tasks already built by `prepare` (so bad input is refused before any model work)."""
    tasks, groups, subtasks = prepared
    t0 = time.time()
    responses = _run_model(lm, tasks, chat)
    res = {"results": {}, "groups": {}, "group_subtasks": subtasks, "configs": {}, "versions": {}, "n-shot": {},
           "n-samples": {}, "higher_is_better": {}}
    samples = {}
    for t in tasks:
        rows, h = [], hashlib.sha256()
        for i, (doc, (reqs, resp)) in enumerate(zip(t.docs, responses[t.name])):
            h.update(json.dumps([list(r) for r in reqs], ensure_ascii=False, default=str).encode("utf-8"))
            values, filtered = t._guard(i, "scoring", t.score, doc, resp)
            rows.append(values)
            if log_samples:
                samples.setdefault(t.name, []).append({
                    "doc_id": i, "doc": doc, "target": t._guard(i, "doc_to_target", t.doc_to_target, doc),
                    "arguments": [list(r) for r in reqs], "resps": resp, "filtered_resps": filtered,
                    "metrics": {k: v for k, v in values.items()}})
        res["results"][t.name] = {"alias": t.spec.alias, **t.aggregate(rows, bootstrap_iters)}
        res["configs"][t.name] = t.config(h.hexdigest())
        res["versions"][t.name] = (t.cfg.get("metadata") or {}).get("version", "yaml")
        res["n-shot"][t.name] = t.k
        res["n-samples"][t.name] = {"original": len(t.all_docs), "effective": len(t.docs)}
        res["higher_is_better"][t.name] = {k: v[4] for k, v in t.metrics.items()}
    sizes = {t.name: len(t.docs) for t in tasks}
    for name, g in groups.items():
        res["groups"][name] = _group_results(g, res["results"], sizes)
        res["versions"][name] = g.version
        res["n-samples"][name] = {"original": sum(len(t.all_docs) for t in tasks if t.name in {x.name for x in g.leaves()}),
                                  "effective": sum(sizes[x.name] for x in g.leaves() if x.name in sizes)}
        res["n-shot"][name] = max((res["n-shot"][x.name] for x in g.leaves()), default=0)
    res["results"] = {**res["groups"], **res["results"]}
    res["seconds"] = round(time.time() - t0, 3)
    if log_samples:
        res["samples"] = samples
    return res
