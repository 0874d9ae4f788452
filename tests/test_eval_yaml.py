"""lm-eval task YAML in lmfoundry without lm-eval installed: same scorers as the built-in tasks,
groups and tags, process_docs' Dataset methods, CSV typing, the CLI, and bad input refused by name."""
import json
import math

import pytest

from lmfoundry.cli import main
from lmfoundry.errors import EvalDataError
from lmfoundry.eval import LM, evaluate
from lmfoundry.eval.data import read_records
from lmfoundry.eval.samples import write_sample_data
from lmfoundry.eval.yaml_eval import render_yaml_requests
from lmfoundry.eval.yaml_tasks import Docs, resolve

from eval_stub import StubLM

ARC_YAML = """task: my_arc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}/arc_easy.train.jsonl
    test: {data}/arc_easy.jsonl
output_type: multiple_choice
training_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("evaldata"))


@pytest.fixture
def arc_yaml(tmp_path, data):
    path = tmp_path / "my_arc.yaml"
    path.write_text(ARC_YAML.format(data=data))
    return path


def test_yaml_task_scores_exactly_like_the_builtin_task(demo_dir, data, arc_yaml):
    lm = LM.load(demo_dir, progress=False, batch_size=4)
    calls = []
    real = lm.loglikelihood

    def spy(reqs, groups=None, desc=None):
        calls.append(groups)
        return real(reqs, groups=groups, desc=desc)
    lm.loglikelihood = spy
    res = evaluate(lm, [str(arc_yaml), "arc_easy"], data, num_fewshot=1, log_samples=True)
    yaml_s, builtin_s = res["samples"]["my_arc"], res["samples"]["arc_easy"]
    assert [s["arguments"] for s in yaml_s] == [s["arguments"] for s in builtin_s]
    for a, b in zip(yaml_s, builtin_s):
        assert [r[0] for r in a["resps"]] == pytest.approx([r[0] for r in b["resps"]], abs=1e-5)
    for key in ("acc", "acc_norm", "acc_stderr"):
        assert res["results"]["my_arc"][key] == pytest.approx(res["results"]["arc_easy"][key])
    # the YAML requests went through LM.loglikelihood with one prefix-sharing group per document
    yaml_groups = next(g for g in calls if g and g[0][0] == "my_arc")
    assert len(set(yaml_groups)) == len(yaml_s) and len(yaml_groups) == sum(len(s["arguments"]) for s in yaml_s)


def test_chat_template_renders_yaml_shots_as_turns_like_the_builtin(demo_dir, data, arc_yaml):
    lm = LM.load(demo_dir, progress=False)
    res = evaluate(lm, [str(arc_yaml), "arc_easy"], data, num_fewshot=2, log_samples=True, apply_chat_template=True)
    assert [s["arguments"] for s in res["samples"]["my_arc"]] == [s["arguments"] for s in res["samples"]["arc_easy"]]
    assert res["samples"]["my_arc"][0]["arguments"][0][1] == "oxygen"   # no delimiter under a chat template


def test_cli_runs_a_yaml_file_and_compares_results(demo_dir, arc_yaml, tmp_path, capsys):
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", str(demo_dir), "--tasks", str(arc_yaml), "--out", str(out1)]) == 0
    assert main(["eval", str(demo_dir), "--tasks", str(arc_yaml), "--fewshot", "1", "--out", str(out2)]) == 0
    res = json.loads(out1.read_text())
    assert res["configs"]["my_arc"]["output_type"] == "multiple_choice" and res["n-shot"]["my_arc"] == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(out1), str(out2)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "| acc " in line)
    assert f"{res['results']['my_arc']['acc']:.4f} ± {res['results']['my_arc']['acc_stderr']:.4f}" in row
    assert row.count("±") == 2 and "(a.json)" in table.splitlines()[0]


def test_groups_tags_and_include_path(tmp_path, data):
    """A group over a tag and a nested group with an override; plain and size-weighted means."""
    d = tmp_path / "tasks"
    d.mkdir()
    base = ARC_YAML.format(data=data)
    small = tmp_path / "two.jsonl"
    small.write_text("".join((data / "arc_easy.jsonl").read_text().splitlines(keepends=True)[:2]))
    (d / "a.yaml").write_text(base.replace("task: my_arc", "task: arc_a\ntag: arcs"))
    (d / "b.yaml").write_text(base.replace("task: my_arc", "task: arc_b\ntag: arcs") + "num_fewshot: 2\n")
    (d / "c.yaml").write_text(base.replace("task: my_arc", "task: arc_c").replace(f"{data}/arc_easy.jsonl", str(small)))
    (d / "_group.yaml").write_text(
        "group: all_arc\ntask:\n  - arcs\n  - group: inner\n    task:\n      - task: arc_c\n        num_fewshot: 1\n"
        "    aggregate_metric_list:\n      - metric: acc\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: false\n  - metric: acc_norm\n")
    res = evaluate(StubLM(), ["all_arc"], include_paths=[d])
    assert res["group_subtasks"]["all_arc"] == ["arc_a", "arc_b", "all_arc::inner"]
    r = res["results"]
    assert res["n-shot"]["arc_b"] == 2 and res["n-shot"]["arc_c"] == 1 and res["n-samples"]["arc_c"]["effective"] == 2
    assert r["all_arc"]["acc"] == pytest.approx((r["arc_a"]["acc"] + r["arc_b"]["acc"] + r["arc_c"]["acc"]) / 3)
    assert r["all_arc"]["acc_norm"] == pytest.approx(
        (3 * r["arc_a"]["acc_norm"] + 3 * r["arc_b"]["acc_norm"] + 2 * r["arc_c"]["acc_norm"]) / 8)
    assert r["all_arc::inner"]["acc"] == pytest.approx(r["arc_c"]["acc"])
    res2 = evaluate(StubLM(), [str(d)])   # a directory runs its top-level group only
    assert set(res2["groups"]) == {"all_arc", "all_arc::inner"} and set(res2["results"]) == set(r)


def test_process_docs_dataset_methods_match_hugging_face_datasets():
    datasets = pytest.importorskip("datasets")
    rows = [{"q": f"q{i}", "n": i, "tags": ["a", "b"][: i % 3]} for i in range(7)]
    theirs, ours = datasets.Dataset.from_list(rows), Docs(rows)
    steps = [
        lambda d: d.map(lambda r: {"q2": r["q"] + "!", "n": r["n"] * 2}),
        lambda d: d.map(lambda r, i: {"i": i}, with_indices=True, remove_columns=["tags"]),
        lambda d: d.map(lambda b: {"len": [len(x) for x in b["q"]]}, batched=True, batch_size=3),
        lambda d: d.filter(lambda r: r["n"] % 2 == 0),
        lambda d: d.select([2, 0]),
        lambda d: d.rename_column("q", "question"),
    ]
    for step in steps:
        theirs, ours = step(theirs), step(ours)
        assert list(ours) == theirs.to_list()
        assert ours.column_names == theirs.column_names
    assert ours["question"] == theirs["question"]


def test_csv_columns_are_typed_like_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "Accounting-test.csv"
    path.write_text('question,answer,A,Human Accuracy,flag,note\n"multi\nline, with comma",1,x,0.5,True,\n'
                    'plain,4,"y ""quoted""",1,False,text\n', encoding="utf-8")
    ours = read_records(path)
    theirs = pd.read_csv(path).to_dict("records")
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(b[k], float) and math.isnan(b[k]):
                assert a[k] is None
            else:
                assert a[k] == b[k] and type(a[k]) is type(b[k].item() if hasattr(b[k], "item") else b[k])


# ---- bad input: refused by name ----
def _write(tmp_path, text, name="t.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("extra,match", [
    ("doc_to_txt: x\n", r"unknown key 'doc_to_txt'"),
    ("use_prompt: promptsource:x\n", r"key 'use_prompt' \(promptsource prompts\) is not supported"),
    ("output_type: ranking\n", r"output_type 'ranking'"),
    ("metric_list:\n  - metric: bleu\n", r"metric 'bleu' is not supported"),
    ("fewshot_config:\n  sampler: balanced\n", r"fewshot_config.sampler 'balanced'"),
    ("fewshot_config:\n  split: train\n  shuffle: true\n", r"fewshot_config.shuffle"),
    ("dataset_kwargs:\n  data_files: x.jsonl\n  revision: main\n", r"dataset_kwargs.revision"),
])
def test_unsupported_keys_are_refused_by_name(tmp_path, arc_yaml, extra, match):
    bad = _write(tmp_path, arc_yaml.read_text().replace("metric_list:\n  - metric: acc\n  - metric: acc_norm\n", "")
                 + extra, "bad.yaml")
    with pytest.raises(EvalDataError, match=match) as e:
        resolve([str(bad)])
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("gen,match", [
    ("generation_kwargs:\n  until: [x]\n  do_sample: true\n  top_p: 0.9\n", "generation_kwargs.top_p"),
    ("filter_list:\n  - name: f\n    filter:\n      - function: multi_choice_regex\n", "filter function 'multi_choice_regex'"),
])
def test_unsupported_generation_settings_are_refused(tmp_path, gen, match):
    bad = _write(tmp_path, "task: g\ndataset_path: json\ndata_files: x.jsonl\ntest_split: train\n"
                 "output_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n" + gen)
    with pytest.raises(EvalDataError, match=match):
        resolve([str(bad)])


def test_function_needs_allow_code(tmp_path, data):
    (tmp_path / "utils.py").write_text("def text(doc):\n    return 'Q: ' + doc['question'] + '\\nA:'\n")
    y = _write(tmp_path, ARC_YAML.format(data=data).replace('doc_to_text: "{{question}}\\nAnswer:"', "")
               .replace("doc_to_text: \"Question: {{question}}\\nAnswer:\"", "doc_to_text: !function utils.text"))
    nodes = resolve([str(y)])
    with pytest.raises(EvalDataError, match=r"doc_to_text is `!function utils.text`.*--allow-code") as e:
        render_yaml_requests(nodes)
    assert str(tmp_path / "utils.py") in str(e.value)
    reqs = render_yaml_requests(nodes, allow_code=True)["my_arc"]
    assert reqs[0][1][0][0].startswith("Q: Which gas")


def test_missing_data_and_hub_datasets_are_named(tmp_path, data):
    gone = _write(tmp_path, ARC_YAML.format(data=tmp_path / "nowhere"), "gone.yaml")
    with pytest.raises(EvalDataError, match=r"data file .*nowhere/arc_easy.jsonl not found"):
        render_yaml_requests(resolve([str(gone)]))
    hub = _write(tmp_path, "task: h\ndataset_path: skt/kobest_v1\ndataset_name: boolq\ntest_split: test\n"
                 "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n", "hub.yaml")
    with pytest.raises(EvalDataError, match=r"dataset_path 'skt/kobest_v1' is a Hugging Face Hub dataset.*--data-dir"):
        render_yaml_requests(resolve([str(hub)]))
    with pytest.raises(EvalDataError, match=r"no local files for split 'test' of skt/kobest_v1/boolq"):
        (tmp_path / "d" / "skt/kobest_v1").mkdir(parents=True)
        render_yaml_requests(resolve([str(hub)]), data_dir=tmp_path / "d")


def test_template_errors_name_the_task_and_document(tmp_path, arc_yaml):
    bad = _write(tmp_path, arc_yaml.read_text().replace("Question: {{question}}", "Question: {{questoin}}"), "b.yaml")
    with pytest.raises(EvalDataError, match=r"b.yaml \(task my_arc\): document 0: .*'questoin' is undefined"):
        render_yaml_requests(resolve([str(bad)]))


def test_include_cycle_and_cli_errors_are_one_line(tmp_path, demo_dir, capsys):
    _write(tmp_path, "include: b.yaml\ntask: a\n", "a.yaml")
    _write(tmp_path, "include: a.yaml\n", "b.yaml")
    with pytest.raises(EvalDataError, match="include cycle"):
        resolve([str(tmp_path / "a.yaml")])
    assert main(["eval", str(demo_dir), "--tasks", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.yaml: task file not found" in err
    assert main(["eval", str(demo_dir), "--tasks", "arc_easy"]) == 1
    assert "--data-dir" in capsys.readouterr().err
