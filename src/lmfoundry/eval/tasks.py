"""The benchmark tasks as data: how a record of the public dataset becomes a prompt, choices
and a gold answer, byte for byte as lm-evaluation-harness renders them.

A prompt is `description + shot_1 + ... + shot_k + query`, each shot being
`shot.query + " " + shot.target + "\\n\\n"` (lm-eval's target_delimiter and fewshot_delimiter).
A multiple-choice request is `(prompt, " " + choice)`; Winogrande reverses it (partial
scoring): one prompt per option, all continued by the rest of the sentence.

| task            | record schema                                         | query
| arc_easy/_challenge | question, choices{text,label}, answerKey          | "Question: {question}\\nAnswer:"
| hellaswag       | activity_label, ctx_a, ctx_b, endings, label          | preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
| mmlu[_subject]  | question, subject, choices, answer                    | header + "{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"
| truthfulqa_mc1/2| question, mc1_targets, mc2_targets {choices, labels}  | 6 fixed QA pairs + "\\n\\nQ: {question}\\nA:"
| winogrande      | sentence, option1, option2, answer ("1"/"2")          | sentence up to "_" with the option filled in
| gsm8k           | question, answer ("... #### N")                       | "Question: {question}\\nAnswer:"
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import EvalDataError


@dataclass
class Doc:
    index: int                 # position in its file
    record: dict               # the record as read
    query: str                 # the document's own prompt text (Winogrande: the context with the gold option)
    choices: list[str]         # continuations without the delimiter (Winogrande: the per-option contexts)
    gold: int | None           # index of the right choice
    target: str                # the answer as a few-shot example shows it
    contexts: list[str] | None = None   # Winogrande: one context per option
    subject: str | None = None           # MMLU
    labels: list[int] | None = None      # TruthfulQA mc2


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                           # "multiple_choice", "multiple_input" or "generate_until"
    stems: tuple[str, ...]              # file names looked for in the data directory
    eval_split: str
    fewshot_split: str | None
    schema: str
    make_doc: Callable[[int, dict], Doc]
    metrics: tuple[str, ...]
    num_fewshot: int = 0
    fixed_fewshot: bool = False         # lm-eval never overrides a task whose config sets 0 (TruthfulQA)
    sampler: str = "default"            # "default" (seeded random) or "first_n" (MMLU)
    exclude_eval_doc: bool = False      # lm-eval draws k+1 and drops the evaluated doc (its test_split is null)
    description: Callable[[Doc], str] | None = None
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    version: str = "1.0"
    extra: dict = field(default_factory=dict)


def _need(rec: dict, i: int, schema: str, *keys):
    for k in keys:
        if k not in rec or rec[k] is None:
            raise EvalDataError(f"record {i}: missing field {k!r} (schema: {schema})")


# ---- ARC ----
ARC_SCHEMA = "question, choices{text,label}, answerKey"


def _arc(i, rec):
    _need(rec, i, ARC_SCHEMA, "question", "choices", "answerKey")
    ch = rec["choices"]
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
        raise EvalDataError(f"record {i}: 'choices' must be {{text: [...], label: [...]}} (schema: {ARC_SCHEMA})")
    labels, texts = list(ch["label"]), list(ch["text"])
    if rec["answerKey"] not in labels:
        raise EvalDataError(f"record {i}: answerKey {rec['answerKey']!r} is not one of the labels {labels}")
    gold = labels.index(rec["answerKey"])
    return Doc(i, rec, f"Question: {rec['question']}\nAnswer:", texts, gold, texts[gold])


# ---- HellaSwag ----
HELLASWAG_SCHEMA = "activity_label, ctx_a, ctx_b, endings, label"


def hellaswag_preprocess(text: str) -> str:
    """Strip, turn " [title]" into ". ", drop every [...] WikiHow artifact, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(i, rec):
    _need(rec, i, HELLASWAG_SCHEMA, "activity_label", "ctx_a", "ctx_b", "endings", "label")
    if str(rec["label"]).strip() == "":
        raise EvalDataError(f"record {i}: empty label (HellaSwag's test split has none; use validation)")
    query = hellaswag_preprocess(rec["activity_label"] + ": " + rec["ctx_a"] + " " + rec["ctx_b"].capitalize())
    choices = [hellaswag_preprocess(e) for e in rec["endings"]]
    gold = int(rec["label"])
    return Doc(i, rec, query, choices, gold, choices[gold])


# ---- MMLU ----
MMLU_SCHEMA = "question, subject, choices (4), answer (0-3 or A-D)"
LETTERS = ["A", "B", "C", "D"]


def _mmlu(i, rec):
    _need(rec, i, MMLU_SCHEMA, "question", "choices", "answer")
    ch = list(rec["choices"])
    if len(ch) != 4:
        raise EvalDataError(f"record {i}: MMLU needs 4 choices, got {len(ch)}")
    ans = rec["answer"]
    gold = LETTERS.index(ans) if isinstance(ans, str) and ans in LETTERS else int(ans)
    query = (f"{rec['question'].strip()}\nA. {ch[0]}\nB. {ch[1]}\nC. {ch[2]}\nD. {ch[3]}\nAnswer:")
    return Doc(i, rec, query, list(LETTERS), gold, LETTERS[gold], subject=rec.get("subject") or "")


def mmlu_description(doc: Doc) -> str:
    subject = (doc.subject or "").replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


# ---- TruthfulQA ----
TRUTHFULQA_SCHEMA = "question, mc1_targets{choices,labels}, mc2_targets{choices,labels}"
TRUTHFULQA_QA = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


def _truthfulqa(key):
    def make(i, rec):
        _need(rec, i, TRUTHFULQA_SCHEMA, "question", key)
        t = rec[key]
        if not isinstance(t, dict) or "choices" not in t or "labels" not in t:
            raise EvalDataError(f"record {i}: {key!r} must be {{choices: [...], labels: [...]}}")
        choices, labels = list(t["choices"]), [int(x) for x in t["labels"]]
        query = TRUTHFULQA_QA + "\n\nQ: " + rec["question"] + "\nA:"
        return Doc(i, rec, query, choices, 0, choices[0], labels=labels)
    return make


# ---- Winogrande ----
WINOGRANDE_SCHEMA = "sentence (with one _), option1, option2, answer ('1' or '2')"


def _winogrande(i, rec):
    _need(rec, i, WINOGRANDE_SCHEMA, "sentence", "option1", "option2", "answer")
    s = rec["sentence"]
    if "_" not in s:
        raise EvalDataError(f"record {i}: sentence has no '_' blank")
    if str(rec["answer"]) not in ("1", "2"):
        raise EvalDataError(f"record {i}: answer must be '1' or '2', got {rec['answer']!r}")
    cut = s.index("_")
    contexts = [s[:cut] + rec["option1"], s[:cut] + rec["option2"]]
    gold = int(rec["answer"]) - 1
    rest = s[cut + 1:].strip()
    return Doc(i, rec, contexts[gold], contexts, gold, rest, contexts=contexts)


# ---- GSM8K ----
GSM8K_SCHEMA = "question, answer (ending '#### N')"


def _gsm8k(i, rec):
    _need(rec, i, GSM8K_SCHEMA, "question", "answer")
    return Doc(i, rec, f"Question: {rec['question']}\nAnswer:", [], None, rec["answer"])


GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
GSM8K_UNTIL_LEADERBOARD = (":", "Question:", "Question")

TASKS: dict[str, Task] = {
    "arc_easy": Task("arc_easy", "multiple_choice", ("arc_easy",), "test", "train", ARC_SCHEMA, _arc,
                     ("acc", "acc_norm", "acc_bytes")),
    "arc_challenge": Task("arc_challenge", "multiple_choice", ("arc_challenge",), "test", "train", ARC_SCHEMA, _arc,
                          ("acc", "acc_norm", "acc_bytes")),
    "hellaswag": Task("hellaswag", "multiple_choice", ("hellaswag",), "validation", "train", HELLASWAG_SCHEMA,
                      _hellaswag, ("acc", "acc_norm", "acc_bytes"), exclude_eval_doc=True),
    "mmlu": Task("mmlu", "multiple_choice", ("mmlu",), "test", "dev", MMLU_SCHEMA, _mmlu, ("acc",),
                 sampler="first_n", description=mmlu_description),
    "truthfulqa_mc1": Task("truthfulqa_mc1", "multiple_choice", ("truthfulqa_mc1", "truthfulqa_mc", "truthfulqa"),
                           "validation", None, TRUTHFULQA_SCHEMA, _truthfulqa("mc1_targets"), ("acc",),
                           fixed_fewshot=True, version="2.0"),
    "truthfulqa_mc2": Task("truthfulqa_mc2", "multiple_choice", ("truthfulqa_mc2", "truthfulqa_mc", "truthfulqa"),
                           "validation", None, TRUTHFULQA_SCHEMA, _truthfulqa("mc2_targets"), ("acc",),
                           fixed_fewshot=True, version="3.0"),
    "winogrande": Task("winogrande", "multiple_input", ("winogrande",), "validation", "train", WINOGRANDE_SCHEMA,
                       _winogrande, ("acc",), exclude_eval_doc=True),
    "gsm8k": Task("gsm8k", "generate_until", ("gsm8k",), "test", "train", GSM8K_SCHEMA, _gsm8k,
                  ("exact_match,strict-match", "exact_match,flexible-extract"), num_fewshot=5, until=GSM8K_UNTIL,
                  version="3.0"),
}

# Open LLM Leaderboard v1 ("H6"): harness b281b09, these shots, these metrics.
LEADERBOARD = [
    # (column, task, shots, metric key in results)
    ("ARC", "arc_challenge", 25, "acc_norm"),
    ("HellaSwag", "hellaswag", 10, "acc_norm"),
    ("MMLU", "mmlu", 5, "acc_macro"),
    ("TruthfulQA", "truthfulqa_mc2", 0, "mc2"),
    ("Winogrande", "winogrande", 5, "acc"),
    ("GSM8K", "gsm8k", 5, "acc"),
]


def get_task(name: str) -> tuple[Task, str | None]:
    """The task and, for mmlu_<subject>, the subject."""
    if name in TASKS:
        return TASKS[name], None
    if name.startswith("mmlu_"):
        return TASKS["mmlu"], name[len("mmlu_"):]
    raise EvalDataError(f"unknown task {name!r}; known: {', '.join(TASKS)} (and mmlu_<subject>)")


# ---- prompts ----
def fewshot_prefix(task: Task, doc: Doc, shots: list[Doc]) -> str:
    desc = task.description(doc) if task.description else ""
    return desc + "".join(s.query + " " + s.target + "\n\n" for s in shots)


def contexts_for(task: Task, doc: Doc, shots: list[Doc], chat=None) -> str | list[str]:
    """The prompt(s) of a document: one string, or one per option for Winogrande.

    `chat(messages) -> str`, when given, renders the prompt with a chat template instead: the
    description as a system turn, each shot as a user/assistant exchange (lm-eval's
    --apply_chat_template, which implies --fewshot_as_multiturn)."""
    finals = doc.contexts if task.kind == "multiple_input" else [doc.query]
    if chat is None:
        prefix = fewshot_prefix(task, doc, shots)
        out = [prefix + q for q in finals]
    else:
        msgs = []
        desc = task.description(doc) if task.description else ""
        if desc:
            msgs.append({"role": "system", "content": desc})
        for s in shots:
            msgs += [{"role": "user", "content": s.query}, {"role": "assistant", "content": s.target}]
        out = [chat(msgs + [{"role": "user", "content": q}]) for q in finals]
    return out if task.kind == "multiple_input" else out[0]


def requests_for(task: Task, doc: Doc, ctx, chat: bool = False) -> list[tuple[str, str]]:
    """lm-eval's (context, continuation) pairs; the delimiter is "" under a chat template."""
    delim = "" if chat else " "
    if task.kind == "multiple_input":
        return [(c, delim + doc.target) for c in ctx]
    return [(ctx, delim + c) for c in doc.choices]
