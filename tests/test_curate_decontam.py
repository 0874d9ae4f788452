"""Decontamination: planted benchmark questions are found (pretraining, SFT and preference
records), a clean corpus has none, and the benchmark side is what `lmfoundry eval` reads."""
import json

import pytest

from lmfoundry.curate import synth
from lmfoundry.curate.config import make_config
from lmfoundry.curate.decontam import BenchmarkIndex, benchmark_texts
from lmfoundry.curate.pipeline import curate
from lmfoundry.eval import render_requests
from lmfoundry.eval.samples import write_sample_data

TASKS = ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"]


@pytest.fixture(scope="module")
def evaldata(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("evaldata"))


@pytest.fixture(scope="module")
def index(evaldata):
    return BenchmarkIndex.from_tasks(TASKS, evaldata)


def test_benchmark_texts_are_the_prompts_eval_renders(evaldata):
    texts = benchmark_texts(["arc_challenge", "gsm8k"], evaldata)
    rendered = render_requests(["arc_challenge"], evaldata, num_fewshot=0)["arc_challenge"]
    for (index, requests), (i, text) in zip(rendered, texts["arc_challenge"]):
        assert index == i and requests[0][0] in text
    # generation tasks: the gold solution is indexed too
    assert "####" in texts["gsm8k"][0][1]


def test_planted_questions_are_found_and_a_clean_corpus_has_none(index, evaldata):
    texts = benchmark_texts(TASKS, evaldata)
    rng = synth.random.Random(0)
    for task in ("arc_challenge", "gsm8k", "hellaswag", "winogrande", "mmlu_anatomy"):
        i, text = texts[task][0]
        lines = text.split("\n\n")[-1].split("\n")                 # the question, then its answer lines
        question = next("\n".join(lines[:k]) for k in range(1, len(lines) + 1)
                        if len(" ".join(lines[:k]).split()) >= 13)
        planted = synth.english(rng, 2) + "\n" + question.lower().replace("?", " ?") + "\n" + synth.english(rng, 1)
        assert index.match(planted).get(task) == [i], (task, question)
    clean = [d["text"] for d in synth.corpus(200, seed=5)]
    assert not any(index.match(t) for t in clean)


def test_template_text_shared_by_many_documents_is_not_indexed():
    docs = {"t": [(i, "The following are multiple choice questions with answers about the topic at hand today "
                   f"and question {'x' * (i % 7 + 1)} number {chr(97 + i % 26)}{i}") for i in range(30)]}
    index = BenchmarkIndex(docs, n=13)
    assert not index.match("The following are multiple choice questions with answers about the topic at hand today")


def _records(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pipeline_removes_contaminated_sft_and_preference_records(tmp_path, evaldata):
    q = benchmark_texts(["gsm8k"], evaldata)["gsm8k"][0][1]
    question = q.split("\nAnswer:")[0].replace("Question: ", "")
    sft = _records(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "7"}]},
        {"messages": [{"role": "user", "content": "Write a poem about autumn leaves in the park please now"},
                      {"role": "assistant", "content": "Leaves fall."}]}])
    pref = _records(tmp_path / "pref.jsonl", [
        {"prompt": "Explain: " + question, "chosen": "Seven apples.", "rejected": "Five."},
        {"prompt": "Name a colour of the sky on a clear summer day at noon in Seoul", "chosen": "Blue",
         "rejected": "x"}])
    cfg = make_config({"inputs": [str(sft), str(pref)], "output": str(tmp_path / "out"), "workers": 1,
                       "steps": [{"decontaminate": {"tasks": ["gsm8k"], "data_dir": str(evaldata), "n": 8}}]})
    report = curate(cfg, progress=False)
    assert report["stats"]["contamination"]["gsm8k"]["corpus_docs"] == 2
    assert report["stats"]["contamination"]["gsm8k"]["benchmark_docs"] == [0]
    kept = [json.loads(x) for f in sorted((tmp_path / "out" / "data").glob("*.jsonl"))
            for x in f.read_text().splitlines()]
    assert len(kept) == 2 and {"messages", "prompt"} & set(kept[0])   # records kept whole, not flattened
    assert "Benchmark contamination" in (tmp_path / "out" / "report.md").read_text()


def test_flag_only_keeps_and_marks_documents(tmp_path, evaldata):
    text = benchmark_texts(["arc_challenge"], evaldata)["arc_challenge"][0][1]
    src = _records(tmp_path / "c.jsonl", [{"text": "Notes. " + text}, {"text": synth.english(synth.random.Random(1))}])
    cfg = make_config({"inputs": [str(src)], "output": str(tmp_path / "o"), "workers": 1,
                       "steps": [{"decontaminate": {"tasks": "arc_challenge", "data_dir": str(evaldata),
                                                    "action": "flag"}}]})
    curate(cfg, progress=False)
    kept = [json.loads(x) for x in (tmp_path / "o" / "data" / "part-00000.jsonl").read_text().splitlines()]
    assert len(kept) == 2 and kept[0]["curate"]["contaminated"] == {"arc_challenge": [0]}
    assert "contaminated" not in kept[1]["curate"]
