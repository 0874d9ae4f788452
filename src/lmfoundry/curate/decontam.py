"""Benchmark decontamination: n-gram overlap between corpus documents and evaluation tasks.

    index = BenchmarkIndex.from_tasks(["arc_challenge", "gsm8k"], "evaldata/", n=13)
    index.match(text)          # {"arc_challenge": [doc indices of the benchmark], ...}

The benchmark side is read exactly as `lmfoundry eval` reads it: `render_requests` gives every
(sub)task's prompts and continuations (zero-shot, so each prompt is the document's own query),
and for generation tasks the gold answer comes from the task's own documents (`get_task`,
`find_file`, `load_docs`), so a GSM8K solution in the corpus is caught as well as its question.

Matching follows GPT-3 / lm-eval's "janitor": words normalised (text.shingle_words: lower case,
punctuation dropped, numbers -> 0), a document is contaminated when it shares any n-gram
(13 by default) with a benchmark document. An n-gram found in more than MAX_DOCS_PER_NGRAM
documents of one task is template text (TruthfulQA's fixed preamble, MMLU's header) and is
not indexed.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..errors import DataError
from .dedup import ngram_hashes
from .text import shingle_words

MAX_DOCS_PER_NGRAM = 10


def benchmark_texts(tasks, data_dir) -> dict[str, list[tuple[int, str]]]:
    """{(sub)task: [(document index, text)]} of every task, via lmfoundry.eval."""
    from ..eval import render_requests
    from ..eval.data import find_file
    from ..eval.runner import load_docs
    from ..eval.tasks import get_task

    out: dict[str, list[tuple[int, str]]] = {}
    for name in tasks:
        rendered = render_requests([name], data_dir, num_fewshot=0)
        answers = {}
        task, _ = get_task(name)
        if task.kind == "generate_until":
            answers = {d.index: d.target for d in load_docs(task, find_file(data_dir, task.stems, (task.eval_split,)))}
        for sub, docs in rendered.items():
            texts = []
            for index, requests in docs:
                parts = [ctx + (cont if isinstance(cont, str) else "") for ctx, cont in requests]
                texts.append((index, "\n".join(parts + [answers.get(index, "")])))
            out[sub] = texts
    return out


class BenchmarkIndex:
    """Sorted n-gram hashes of every benchmark document, each pointing at its (task, doc)."""

    def __init__(self, entries: dict[str, list[tuple[int, str]]], n: int = 13):
        self.n = n
        self.tasks = sorted(entries)
        self.sizes = {t: len(entries[t]) for t in self.tasks}
        hashes, owners = [], []
        for t_id, task in enumerate(self.tasks):
            per_gram: dict[int, set[int]] = defaultdict(set)
            for index, text in entries[task]:
                tokens = shingle_words(text)
                if len(tokens) < n:
                    continue                      # shorter than one n-gram: cannot be matched reliably
                for h in np.unique(ngram_hashes(tokens, n)).tolist():
                    per_gram[h].add(index)
            for h, docs in per_gram.items():
                if len(docs) <= MAX_DOCS_PER_NGRAM:
                    for d in docs:
                        hashes.append(h)
                        owners.append((t_id, d))
        order = np.argsort(np.array(hashes, dtype=np.uint64), kind="stable")
        self.hashes = np.array(hashes, dtype=np.uint64)[order]
        self.owners = np.array(owners, dtype=np.int64).reshape(-1, 2)[order]

    @classmethod
    def from_tasks(cls, tasks, data_dir, n: int = 13) -> BenchmarkIndex:
        if not tasks:
            raise DataError("decontaminate: no tasks given (--tasks arc_challenge,gsm8k,...)")
        return cls(benchmark_texts(tasks, data_dir), n)

    def __len__(self) -> int:
        return len(self.hashes)

    def match(self, text: str) -> dict[str, list[int]]:
        """{task: sorted benchmark doc indices} whose n-grams occur in `text` (empty if clean)."""
        if not len(self.hashes):
            return {}
        h = ngram_hashes(shingle_words(text), self.n)
        if len(shingle_words(text)) < self.n:
            return {}
        lo = np.searchsorted(self.hashes, h, side="left")
        hi = np.searchsorted(self.hashes, h, side="right")
        hit = np.nonzero(hi > lo)[0]
        if not len(hit):
            return {}
        found: dict[str, set[int]] = defaultdict(set)
        for i in hit:
            for t_id, d in self.owners[lo[i]:hi[i]].tolist():
                found[self.tasks[t_id]].add(d)
        return {t: sorted(ds) for t, ds in found.items()}
