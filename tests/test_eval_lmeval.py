"""Optional: compare with lm-evaluation-harness itself (skipped when lm_eval is not importable).

1. Prompts: lm-eval's own task configs (its installed YAML, pointed at our local sample files)
   build their requests; ours must be byte-identical, few-shot choice included, for all six tasks.
2. Adapter: `--model lmfoundry` runs a harness task through our primitives and agrees with our
   own evaluator on the same documents.
"""
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # local json files only; never the Hub
lm_eval = pytest.importorskip("lm_eval")

from lmfoundry.eval import render_requests  # noqa: E402
from lmfoundry.eval.samples import write_sample_data  # noqa: E402

TASK_DIR = Path(lm_eval.__file__).parent / "tasks"


def _task_yaml(ydir, name, include, files):
    (ydir / f"{name}.yaml").write_text(
        f"include: {TASK_DIR / include}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {json.dumps({k: str(v) for k, v in files.items()})}\n")


def _lmeval_task(manager, name, num_fewshot, **build):
    from lm_eval.tasks import get_task_dict
    task = get_task_dict([name], manager)[name]
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(**build)
    per_doc = {}
    for inst in task.instances:
        per_doc.setdefault(inst.doc_id, []).append(tuple(inst.args))
    return [per_doc[i] for i in sorted(per_doc)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = write_sample_data(tmp_path_factory.mktemp("evaldata"))
    # lm-eval's MMLU tasks are per subject: give it one file per subject and split
    for split in ("", ".dev"):
        rows = [json.loads(x) for x in (d / f"mmlu{split}.jsonl").read_text().splitlines()]
        for subject in {r["subject"] for r in rows}:
            with open(d / f"mmlu_{subject}{split}.lmeval.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r["subject"] == subject)
    return d


@pytest.fixture(scope="module")
def manager(data, tmp_path_factory):
    """Every lm-eval task the tests use, pointed at the local sample files."""
    from lm_eval.tasks import TaskManager
    ydir = tmp_path_factory.mktemp("lmeval_yaml")
    for task, include, files, _ in CASES:
        _task_yaml(ydir, f"lme_{task}", include, {s: data / f for s, f in files.items()})
    for subject in ("anatomy", "elementary_mathematics"):
        _task_yaml(ydir, f"lme_mmlu_{subject}", f"mmlu/default/mmlu_{subject}.yaml",
                   {"test": data / f"mmlu_{subject}.lmeval.jsonl", "dev": data / f"mmlu_{subject}.dev.lmeval.jsonl"})
    return TaskManager(include_path=str(ydir), include_defaults=False)   # the wrappers include by path


def _ours(data, task, k):
    return [reqs for _, reqs in render_requests([task], data, num_fewshot=k)[task]]


CASES = [
    # our task, lm-eval yaml, files, shots
    ("arc_challenge", "arc/arc_challenge.yaml",
     {"train": "arc_challenge.train.jsonl", "validation": "arc_challenge.jsonl", "test": "arc_challenge.jsonl"}, 2),
    ("arc_easy", "arc/arc_easy.yaml",
     {"train": "arc_easy.train.jsonl", "validation": "arc_easy.jsonl", "test": "arc_easy.jsonl"}, 1),
    ("hellaswag", "hellaswag/hellaswag.yaml", {"train": "hellaswag.train.jsonl", "validation": "hellaswag.jsonl"}, 2),
    ("winogrande", "winogrande/default.yaml", {"train": "winogrande.train.jsonl", "validation": "winogrande.jsonl"}, 2),
    ("truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml", {"validation": "truthfulqa_mc.jsonl"}, 0),
    ("truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", {"validation": "truthfulqa_mc.jsonl"}, 0),
    ("gsm8k", "gsm8k/gsm8k.yaml", {"train": "gsm8k.train.jsonl", "test": "gsm8k.jsonl"}, 2),
]


@pytest.mark.parametrize("task,include,files,k", CASES, ids=[c[0] for c in CASES])
def test_prompts_byte_identical_to_lm_eval(manager, data, task, include, files, k):
    theirs = _lmeval_task(manager, f"lme_{task}", k)
    ours = _ours(data, task, k)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a = [(c, x) if isinstance(x, str) else (c, x["until"]) for c, x in a]
        b = [(c, x) if isinstance(x, str) else (c, [u for u in x["until"]]) for c, x in b]
        assert a == b


@pytest.mark.parametrize("subject", ["anatomy", "elementary_mathematics"])
def test_mmlu_prompts_byte_identical_to_lm_eval(manager, data, subject):
    theirs = _lmeval_task(manager, f"lme_mmlu_{subject}", 2)
    ours = [reqs for _, reqs in render_requests([f"mmlu_{subject}"], data, num_fewshot=2)[f"mmlu_{subject}"]]
    assert ours == [[tuple(r) for r in doc] for doc in theirs]


def test_harness_adapter_runs_a_task_and_matches_our_evaluator(manager, data, demo_dir):
    import lm_eval as le

    import lmfoundry.eval.harness  # noqa: F401  (registers "lmfoundry")
    from lmfoundry.eval import LM, evaluate
    out = le.simple_evaluate(model="lmfoundry", model_args=f"pretrained={demo_dir},batch_size=4",
                             tasks=["lme_arc_easy"], num_fewshot=1, task_manager=manager,
                             log_samples=True, bootstrap_iters=0)
    theirs = out["results"]["lme_arc_easy"]
    ours = evaluate(LM.load(demo_dir, progress=False), ["arc_easy"], data, num_fewshot=1, log_samples=True)
    assert theirs["acc,none"] == pytest.approx(ours["results"]["arc_easy"]["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["results"]["arc_easy"]["acc_norm"])
    # per-choice log-likelihoods agree too
    their_lls = [[r[0][0] for r in s["resps"]]
                 for s in sorted(out["samples"]["lme_arc_easy"], key=lambda s: s["doc_id"])]
    our_lls = [[ll for ll, _ in s["resps"]] for s in ours["samples"]["arc_easy"]]
    for a, b in zip(their_lls, our_lls):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("task,include,files,k", [CASES[1], CASES[3]], ids=["arc_easy", "winogrande"])
def test_chat_template_prompts_match_lm_eval(manager, data, demo_dir, task, include, files, k):
    """--apply_chat_template (which implies --fewshot_as_multiturn): shots as user/assistant turns."""
    from lmfoundry.tokenizer import load_tokenizer
    tok = load_tokenizer(demo_dir)

    def chat(msgs, add_generation_prompt=True):
        return tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
    theirs = _lmeval_task(manager, f"lme_{task}", k, apply_chat_template=True, fewshot_as_multiturn=True,
                          chat_template=chat)
    ours = render_requests([task], data, num_fewshot=k, chat=chat)[task]
    assert [r for _, r in ours] == theirs
