"""lm-eval YAML tasks against lm-evaluation-harness 0.4.13 itself, on the same local files.

lm-eval's own task folders (KoBEST: all five, KMMLU: one subject and its direct variant, HAE-RAE,
lambada_openai, wikitext, gsm8k, cola, mrpc) run unchanged on our side, their Hub datasets found
under --data-dir; lm-eval runs the same YAML files through small wrappers that point dataset_path
at the same files (it cannot download). Both sides get one deterministic fake model (a hash of
each request's text), so every request must be byte-identical and every metric equal (f1 and mcc
bootstrap standard errors included: same resamples, same statistic).
"""
import csv
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # local files only; never the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DISABLE_MULTIPROC", "1")     # lm-eval's bootstrap in-process (same resamples either way)
lm_eval = pytest.importorskip("lm_eval")

from lmfoundry.eval import evaluate  # noqa: E402
from lmfoundry.eval.yaml_eval import render_yaml_requests  # noqa: E402
from lmfoundry.eval.yaml_tasks import resolve  # noqa: E402
from eval_stub import StubLM, fake_generation, fake_ll, fake_rolling  # noqa: E402

TASKS = Path(lm_eval.__file__).parent / "tasks"
BOOTSTRAP = 200


# ---- one deterministic model for both sides ----
def harness_lm():
    from lm_eval.api.model import LM

    class Fake(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [fake_ll(*r.args) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return [fake_rolling(r.args[0]) for r in requests]

        def generate_until(self, requests, disable_tqdm=False):
            return [fake_generation(r.args[0]) for r in requests]
    return Fake()


# ---- small local datasets in each dataset's own schema ----
KO = ["하늘이 맑고 바람이 분다", "학생이 도서관에서 책을 읽는다", "고양이가 창가에서 잠을 잔다", "시장이 아침부터 붐빈다",
      "기차가 눈 때문에 늦었다", "봄이 와서 꽃이 피었다", "그는 회의에 늦지 않았다", "아이가 우산을 잃어버렸다"]
EN = ["the quick brown fox jumps over the lazy dog", "a cat sat on the warm mat", "rain fell over the old town",
      "she opened the window and smiled", "they walked to the market together", "numbers are hard to read",
      "the river runs past the mill", "he never forgot the song"]


def _kobest(task, rnd, i):
    s, t = rnd.choice(KO), rnd.choice(KO)
    return {
        "boolq": {"paragraph": s + ". " + t + ".", "question": t + "?", "label": rnd.randrange(2)},
        "copa": {"premise": s + ".", "question": rnd.choice(["원인", "결과"]), "alternative_1": t + ".",
                 "alternative_2": rnd.choice(KO) + ".", "label": rnd.randrange(2)},
        "hellaswag": {"context": s + ".", **{f"ending_{k}": rnd.choice(KO) + f" {k}." for k in range(1, 5)},
                      "label": rnd.randrange(4)},
        "sentineg": {"sentence": s + ("." if i % 2 else " 정말 좋다."), "label": rnd.randrange(2)},
        "wic": {"word": s.split()[0], "context_1": s + ".", "context_2": t + ".", "label": rnd.randrange(2)},
    }[task]


def _jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _kmmlu_rows(rnd, n):
    rows = []
    for i in range(n):
        q = f"  {rnd.choice(KO)}에 대한 설명으로 옳은 것은? ({i})\n다음을 고르시오, 하나만.  "
        rows.append({"question": q, "answer": rnd.randint(1, 4), **{c: rnd.choice(KO) for c in "ABCD"},
                     "Category": "HUMSS", "Human Accuracy": round(rnd.random(), 3)})
    return rows


def _write_csv(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _dataset_files(data: Path) -> dict:
    """{task: (lm-eval yaml relative to its tasks folder, {split: file}, builder)}, files under data/."""
    rnd = random.Random(0)
    out = {}
    for task in ("boolq", "copa", "hellaswag", "sentineg", "wic"):
        files = {s: _jsonl(data / "skt/kobest_v1" / task / f"{s}.jsonl", [_kobest(task, rnd, i) for i in range(n)])
                 for s, n in (("train", 8), ("validation", 3), ("test", 7))}
        out[f"kobest_{task}"] = (f"kobest/kobest_{task}.yaml", files, "json")
    kmmlu = {s: _write_csv(data / "HAERAE-HUB/KMMLU/data" / f"Accounting-{s}.csv", _kmmlu_rows(rnd, n))
             for s, n in (("dev", 5), ("test", 7))}
    out["kmmlu_accounting"] = ("kmmlu/default/kmmlu_accounting.yaml", kmmlu, "csv")
    out["kmmlu_direct_accounting"] = ("kmmlu/direct/kmmlu_direct_accounting.yaml", kmmlu, "csv")
    letters = "ABCDE"
    haerae = [{"query": f"다음 중 {rnd.choice(KO)}와 관련된 것은?\n" + " ".join(f"({c}) {rnd.choice(KO)}" for c in letters),
               "answer": f"({rnd.choice(letters)})" if i != 3 else "(F)"} for i in range(8)]
    out["haerae_general_knowledge"] = ("haerae/haerae_gk.yaml", {"test": _jsonl(
        data / "HAERAE-HUB/HAE_RAE_BENCH/general_knowledge/test.jsonl", haerae)}, "json")
    out["lambada_openai"] = ("lambada/lambada_openai.yaml", {"test": _jsonl(
        data / "EleutherAI/lambada_openai/default/test.jsonl", [{"text": rnd.choice(EN) + " " + rnd.choice(EN)}
                                                                  for _ in range(6)])}, "json")
    pages = [{"page": f" = Title {i} = \n {rnd.choice(EN)} @-@ {rnd.choice(EN)} , ( x ) .\n" * 2} for i in range(4)]
    out["wikitext"] = ("wikitext/wikitext.yaml", {s: _jsonl(data / f"EleutherAI/wikitext_document_level/"
                                                             f"wikitext-2-raw-v1/{s}.jsonl", pages)
                                                   for s in ("train", "validation", "test")}, "json")
    gsm = [{"question": f"{rnd.choice(EN)}: how many {i}?", "answer": f"Think.\n#### {rnd.choice([7, 12, 42])}"}
           for i in range(16)]
    out["gsm8k"] = ("gsm8k/gsm8k.yaml", {"train": _jsonl(data / "openai/gsm8k/main/train.jsonl", gsm[:6]),
                                         "test": _jsonl(data / "openai/gsm8k/main/test.jsonl", gsm[6:])}, "json")
    out["gsm8k_cot_self_consistency"] = ("gsm8k/gsm8k-cot-self-consistency.yaml", out["gsm8k"][1], "json")
    from lmfoundry.eval.samples import WINOGRANDE, WINOGRANDE_TRAIN
    out["winogrande"] = ("winogrande/default.yaml", {
        "train": _jsonl(data / "allenai/winogrande/winogrande_xl/train.jsonl", WINOGRANDE_TRAIN),
        "validation": _jsonl(data / "allenai/winogrande/winogrande_xl/validation.jsonl", WINOGRANDE)}, "json")
    mmlu = [{"question": f" {rnd.choice(EN)}? ", "subject": "anatomy", "choices": [rnd.choice(EN) for _ in range(4)],
             "answer": rnd.randrange(4)} for _ in range(9)]
    out["mmlu_anatomy"] = ("mmlu/default/mmlu_anatomy.yaml", {
        "test": _jsonl(data / "cais/mmlu/anatomy/test.jsonl", mmlu[:6]),
        "dev": _jsonl(data / "cais/mmlu/anatomy/dev.jsonl", mmlu[6:])}, "json")
    for task, cols in (("cola", ("sentence",)), ("mrpc", ("sentence1", "sentence2"))):
        rows = [{**{c: rnd.choice(EN) for c in cols}, "label": rnd.randrange(2), "idx": i} for i in range(22)]
        out[task] = (f"glue/{task}/default.yaml", {
            "train": _jsonl(data / "nyu-mll/glue" / task / "train.jsonl", rows[:6]),
            "validation": _jsonl(data / "nyu-mll/glue" / task / "validation.jsonl", rows[6:])}, "json")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    datasets = _dataset_files(data)
    wrappers = tmp_path_factory.mktemp("lmeval_yaml")
    for task, (yaml_file, files, builder) in datasets.items():
        (wrappers / f"{task}.yaml").write_text(
            f"include: {TASKS / yaml_file}\ntask: {task}\ndataset_path: {builder}\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files: {json.dumps({s: str(p) for s, p in files.items()})}\n")
    (wrappers / "_kobest.yaml").write_text(f"include: {TASKS / 'kobest/_kobest.yaml'}\n")
    return data, wrappers, datasets


@pytest.fixture
def offline_metrics(monkeypatch):
    """KoBEST's f1 says `hf_evaluate: true`, so lm-eval tries to download HF evaluate's f1 (8 s of imports and
    retries here) although a multiple-choice task never calls it (it aggregates (gold, pred) pairs with the
    YAML's own function): look the name up in lm-eval's registry instead."""
    import lm_eval.api.task as task_module
    real = task_module.get_metric
    monkeypatch.setattr(task_module, "get_metric", lambda name, hf_evaluate_metric=False: real(name, False))


def _theirs(wrappers, names, num_fewshot):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(wrappers), include_defaults=False)
    return simple_evaluate(model=harness_lm(), tasks=names, task_manager=tm, num_fewshot=num_fewshot,
                           log_samples=True, bootstrap_iters=BOOTSTRAP)


def _ours(data, items, num_fewshot):
    return evaluate(StubLM(), items, data_dir=data, num_fewshot=num_fewshot, allow_code=True, log_samples=True,
                    bootstrap_iters=BOOTSTRAP)


def _compare(ours, theirs, names) -> list:
    """Asserts equal requests and metrics; returns the metric values compared."""
    compared = []
    for name in names:
        mine = {s["doc_id"]: [tuple(a) for a in s["arguments"]] for s in ours["samples"][name]}
        other = {s["doc_id"]: [tuple(a) for a in s["arguments"]] for s in theirs["samples"][name]}
        assert mine.keys() == other.keys(), name
        for d in mine:   # generation kwargs: compare the stop strings and budget
            norm = [tuple({k: v for k, v in x.items() if k in ("until", "max_gen_toks")} if isinstance(x, dict) else x
                          for x in r) for r in other[d]]
            got = [tuple({k: v for k, v in x.items() if k in ("until", "max_gen_toks")} if isinstance(x, dict) else x
                         for x in r) for r in mine[d]]
            assert got == norm, (name, d)
        for key, value in theirs["results"][name].items():
            if key in ("alias", "name", "sample_len", "sample_count") or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            ours_key = metric if filt == "none" else f"{metric},{filt}"
            assert ours["results"][name][ours_key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)
            compared.append(value)
    return compared


KOBEST = ["kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"]
OTHERS = ["kmmlu_accounting", "kmmlu_direct_accounting", "haerae_general_knowledge", "lambada_openai", "wikitext",
          "gsm8k", "gsm8k_cot_self_consistency", "winogrande", "mmlu_anatomy", "cola", "mrpc"]


@pytest.mark.parametrize("shots", [0, 3])
def test_kobest_folder_runs_unchanged_and_matches_lm_eval(setup, shots, offline_metrics):
    data, wrappers, _ = setup
    theirs = _theirs(wrappers, ["kobest"], shots)
    ours = _ours(data, [str(TASKS / "kobest")], shots)
    values = _compare(ours, theirs, KOBEST)
    assert len(values) >= 15 and any(0 < v < 1 for v in values)
    for key in ("acc", "acc_norm", "f1"):   # the group: size-weighted means, pooled standard errors
        assert ours["results"]["kobest"][key] == pytest.approx(theirs["results"]["kobest"][f"{key},none"], rel=1e-12)
        se = theirs["results"]["kobest"][f"{key}_stderr,none"]
        assert ours["results"]["kobest"][f"{key}_stderr"] == (None if se == "N/A" else pytest.approx(se, rel=1e-9))
    assert ours["group_subtasks"]["kobest"] == KOBEST


def test_kmmlu_haerae_and_four_output_types_match_lm_eval(setup):
    data, wrappers, datasets = setup
    theirs = _theirs(wrappers, OTHERS, None)
    items = [str(TASKS / datasets[n][0]) for n in OTHERS]
    ours = _ours(data, items, None)
    values = _compare(ours, theirs, OTHERS)
    assert len(values) >= 25 and sum(0 < v < 1 for v in values) >= 5
    assert ours["n-shot"]["gsm8k"] == 5 and ours["configs"]["gsm8k"]["output_type"] == "generate_until"
    assert {ours["configs"][n]["output_type"] for n in OTHERS} == {"multiple_choice", "generate_until",
                                                                   "loglikelihood", "loglikelihood_rolling"}
    assert ours["results"]["mrpc"]["f1_stderr"] is not None and ours["results"]["cola"]["mcc_stderr"] is not None


@pytest.mark.parametrize("name,shots", [("kmmlu_accounting", 5), ("mmlu_anatomy", 3)])
def test_few_shot_prompts_from_the_hub_layout_match_lm_eval(setup, name, shots):
    """The request texts alone (no model run): KMMLU 5-shot from dev (full-width colon, 1-based answers),
    MMLU's description and first_n shots."""
    from lm_eval.tasks import TaskManager
    data, wrappers, datasets = setup
    tm = TaskManager(include_path=str(wrappers), include_defaults=False)
    task = tm.load([name])["tasks"][name]
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests()
    theirs = {}
    for inst in task.instances:
        theirs.setdefault(inst.doc_id, []).append(tuple(inst.args))
    nodes = resolve([str(TASKS / datasets[name][0])])
    ours = render_yaml_requests(nodes, data_dir=data, num_fewshot=shots)[name]
    assert [r for _, r in ours] == [theirs[i] for i in sorted(theirs)]
    first = ours[0][1][0][0]
    assert first.endswith("정답：") if name.startswith("kmmlu") else first.startswith("The following are multiple")
