"""The curation pipeline end to end: outputs and audit trail, resume, --shard I/N + merge equal a
single run, workers, parquet, the classifier, and bad input (one clear error, or a warning)."""
import gzip
import textwrap
import json

import pytest

from lmfoundry.cli import main
from lmfoundry.curate import synth
from lmfoundry.curate.config import load_config, make_config
from lmfoundry.curate.pipeline import curate
from lmfoundry.records import read_texts

STEPS = ["gopher_quality", "gopher_repetition", "c4", "fineweb", "redact", {"dedup": {"threshold": 0.8}}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    docs = list(synth.corpus(360, seed=3))
    docs[10]["text"] += "\nWrite to kim@example.com or call 010-1234-5678 today."
    for i in range(3):
        _write(d / f"part{i}.jsonl", docs[i::3])
    return d, docs


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _kept(out):
    return sorted(r["id"] for f in sorted((out / "data").glob("*.jsonl")) for r in _lines(f))


def test_curate_keeps_good_removes_junk_and_records_why(inputs, tmp_path, capsys):
    src, docs = inputs
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"inputs": [str(src)], "output": str(tmp_path / "out"), "workers": 2,
                               "steps": [{"language": {"keep": ["en", "ko"]}}] + STEPS}))
    assert main(["data", "curate", str(cfg)]) == 0
    out = tmp_path / "out"
    kept = {r["id"]: r for f in (out / "data").glob("*.jsonl") for r in _lines(f)}
    removed = [r for f in (out / "removed").glob("*.jsonl") for r in _lines(f)]
    kinds = {d["id"]: d["kind"] for d in docs}
    assert len(kept) + len(removed) == len(docs)                      # nothing lost silently
    assert all(r["curate"]["removed"]["step"] and r["curate"]["source"] for r in removed)
    kept_kinds = {kinds[i] for i in kept}
    assert kept_kinds <= {"good", "good_ko", "near_dup", "exact_dup", "ellipsis", "hashtags", "boilerplate", "code",
                          "bullets", "symbols", "menu"}
    assert sum(kinds[i] == "good_ko" for i in kept) > 20               # Korean prose survives
    assert not any(kinds[i] in ("spam_ko", "keyword_spam", "repetitive", "lorem") for i in kept)
    texts = [" ".join(r["text"].lower().split()) for r in kept.values()]
    assert len(set(texts)) == len(texts)                               # exact copies: one survives
    dups = [r for r in removed if r["curate"]["removed"]["step"] == "dedup"]
    assert dups and all(r["curate"]["removed"]["duplicate_of"].startswith(str(src)) for r in dups)
    assert "<EMAIL>" in kept[10]["text"] and kept[10]["curate"]["pii"] == {"email": 1, "phone": 1}
    report = json.loads((out / "report.json").read_text())
    assert report["stats"]["documents"] == {"in": len(docs), "out": len(kept)}
    md = (out / "report.md").read_text()
    assert "## Removed, per rule" in md and "## Duplicates" in md and "## PII redacted" in md
    # the kept shards are what tokenize/pretrain read
    assert sum(1 for f in (out / "data").glob("*.jsonl") for _ in read_texts(f)) == len(kept)


def test_sharded_runs_and_merge_equal_one_run(inputs, tmp_path):
    src, _ = inputs
    base = {"inputs": [str(src)], "workers": 1, "steps": STEPS}
    curate(make_config({**base, "output": str(tmp_path / "one")}), progress=False)
    multi = make_config({**base, "output": str(tmp_path / "multi")})
    for i in range(2):
        curate(multi, shard=(i, 2), progress=False)                   # each "machine": its shards
    assert not (tmp_path / "multi" / "data").exists() or not list((tmp_path / "multi" / "data").glob("*"))
    curate(multi, merge_only=True, progress=False)                    # once: the signature merge
    for i in range(2):
        curate(multi, shard=(i, 2), progress=False)                   # each machine: drop duplicates
    assert _kept(tmp_path / "one") == _kept(tmp_path / "multi")


def test_an_interrupted_run_resumes_at_the_unfinished_shard(inputs, tmp_path, monkeypatch):
    from lmfoundry.curate import pipeline
    src, _ = inputs
    cfg = make_config({"inputs": [str(src)], "output": str(tmp_path / "r"), "workers": 1, "steps": STEPS})
    real, calls = pipeline.filter_shard, []

    def flaky(run, k, *a):
        calls.append(k)
        if k == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt
        return real(run, k, *a)
    monkeypatch.setattr(pipeline, "filter_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        curate(cfg, progress=False)
    assert not list((tmp_path / "r" / "work").glob("*.tmp*"))         # nothing half-written left behind
    curate(cfg, progress=False)
    assert calls == [0, 1, 1, 2]                                      # shard 0 was not redone
    one = tmp_path / "one"
    curate(make_config({"inputs": [str(src)], "output": str(one), "workers": 1, "steps": STEPS}), progress=False)
    assert _kept(tmp_path / "r") == _kept(one)


def test_a_changed_config_needs_force(inputs, tmp_path):
    src, _ = inputs
    base = {"inputs": [str(src / "part0.jsonl")], "output": str(tmp_path / "o"), "workers": 1}
    curate(make_config({**base, "steps": ["c4"]}), progress=False)
    with pytest.raises(Exception, match="different config"):
        curate(make_config({**base, "steps": ["fineweb"]}), progress=False)
    curate(make_config({**base, "steps": ["fineweb"]}), force=True, progress=False)


def test_parquet_output_and_gz_input(tmp_path):
    pytest.importorskip("pyarrow")
    docs = list(synth.corpus(40, seed=4, duplicate_rate=0))
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    assert main(["data", "filter", str(tmp_path / "in.jsonl.gz"), "--out", str(tmp_path / "o"), "--format",
                 "parquet", "--workers", "1"]) == 0
    texts = [t for _, t in read_texts(tmp_path / "o" / "data" / "part-00000.parquet")]
    assert 0 < len(texts) < len(docs)


def test_classifier_train_then_filter_writes_scores(tmp_path):
    pytest.importorskip("fasttext")
    rng = synth.random.Random(0)
    good = _write(tmp_path / "good.jsonl", [{"text": synth.english(rng, 3)} for _ in range(150)])
    bad = _write(tmp_path / "bad.jsonl", [{"text": synth.junk(rng, k)} for k in ("keyword_spam", "menu") * 75])
    model = tmp_path / "q.bin"
    assert main(["data", "classifier", "train", "--positive", str(good), "--negative", str(bad), "--out",
                 str(model), "--bucket", "20000"]) == 0
    mixed = _write(tmp_path / "mixed.jsonl", [{"text": synth.english(rng, 3), "k": "good"} for _ in range(20)]
                   + [{"text": synth.junk(rng, "keyword_spam"), "k": "bad"} for _ in range(20)])
    assert main(["data", "filter", str(mixed), "--out", str(tmp_path / "o"), "--steps", "", "--classifier",
                 str(model), "--threshold", "0.5", "--workers", "1"]) == 0
    kept = _lines(tmp_path / "o" / "data" / "part-00000.jsonl")
    removed = _lines(tmp_path / "o" / "removed" / "part-00000.jsonl")
    assert {r["k"] for r in kept} == {"good"} and {r["k"] for r in removed} == {"bad"}
    assert all(0 <= r["curate"]["quality"] <= 1 for r in kept + removed)   # scores next to the documents
    # a later run with another threshold reuses the scores instead of rescoring
    from lmfoundry.curate import classifier
    monkey_calls = []
    orig = classifier.QualityModel.score
    classifier.QualityModel.score = lambda self, t: monkey_calls.append(t) or orig(self, t)
    try:
        curate(make_config({"inputs": [str(tmp_path / "o" / "data")], "output": str(tmp_path / "o2"), "workers": 1,
                            "steps": [{"classifier": {"model": str(model), "threshold": 0.9}}]}), progress=False)
    finally:
        classifier.QualityModel.score = orig
    assert monkey_calls == []


# ---------------------------------------------------------------- bad input

def _error(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize("yaml_text,message", [
    ("inputs: [x.jsonl]\noutput: o\nsteps: [gopher_quality, dedupe]\n", "steps[1]: unknown step 'dedupe'"),
    ("inputs: [x.jsonl]\noutput: o\nsteps: [{c4: {min_sentences: 3}}]\n", "steps[0] (c4): unknown key 'min_sentences'"),
    ("inputs: [x.jsonl]\noutput: o\nstep: [c4]\n", "unknown key(s) ['step']"),
    ("inputs: [x.jsonl]\noutput: o\nsteps: [dedup, c4]\n", "dedup must be the last step"),
    ("inputs: [x.jsonl]\noutput: o\nsteps: [{classifier: {threshold: 0.5}}]\n", "'model' is required"),
    ("inputs: [x.jsonl]\noutput: o\nsteps: [{redact: {types: [ssn]}}]\n", "unknown PII type(s) ['ssn']"),
    ("inputs: [x.jsonl]\noutput: o\nsteps: [{language: {backend: cld3}}]\n", "backend must be one of script, langid"),
    ("inputs: [x.jsonl]\noutput: o\nsteps: [c4\n", "malformed YAML"),
])
def test_bad_yaml_is_one_error_naming_the_file_and_key(tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    err = _error(["data", "curate", str(cfg)], capsys)
    assert str(cfg) in err and message in err


def test_records_without_the_text_field_name_file_and_line(tmp_path, capsys):
    src = _write(tmp_path / "x.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    err = _error(["data", "redact", str(src), "--out", str(tmp_path / "o"), "--workers", "1"], capsys)
    assert f"{src}:2: record has no 'text' field" in err
    assert not list((tmp_path / "o").rglob("*.jsonl"))                # nothing half-written


def test_non_utf8_files_are_refused_or_skipped_when_asked(tmp_path, capsys):
    good = _write(tmp_path / "a.jsonl", [{"text": synth.english(synth.random.Random(0), 3)}])
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"fine first paragraph\n\n\xff\xfe broken bytes\n")
    err = _error(["data", "redact", str(good), str(bad), "--out", str(tmp_path / "o"), "--workers", "1"], capsys)
    assert f"{bad}:3: not UTF-8 text" in err
    assert main(["data", "redact", str(good), str(bad), "--out", str(tmp_path / "o2"), "--workers", "1",
                 "--skip-bad-files"]) == 0
    report = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert report["skipped_files"][0]["file"] == str(bad)
    assert report["stats"]["documents"]["in"] == 2                    # the paragraph before the bad bytes stays


def test_an_empty_result_is_a_warning_not_a_crash(tmp_path, capsys):
    src = _write(tmp_path / "x.jsonl", [{"text": "too short"}, {"text": "also short"}])
    assert main(["data", "filter", str(src), "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    assert "every document was removed" in capsys.readouterr().err
    assert (tmp_path / "o" / "data" / "part-00000.jsonl").read_text() == ""


def test_bad_shard_flag_and_missing_model(tmp_path, capsys):
    src = _write(tmp_path / "x.jsonl", [{"text": "hello"}])
    assert "expected I/N" in _error(["data", "redact", str(src), "--out", str(tmp_path / "o"), "--shard", "1of2"],
                                    capsys)
    assert "classifier model not found" in _error(["data", "filter", str(src), "--out", str(tmp_path / "o"),
                                                   "--classifier", str(tmp_path / "none.bin")], capsys)


def test_merge_before_every_shard_is_filtered_names_the_missing_ones(inputs, tmp_path):
    src, _ = inputs
    cfg = make_config({"inputs": [str(src)], "output": str(tmp_path / "m"), "workers": 1, "steps": STEPS})
    curate(cfg, shard=(0, 2), progress=False)
    with pytest.raises(Exception, match="missing part-00001"):
        curate(cfg, merge_only=True, progress=False)


def test_yaml_example_in_the_config_docstring_parses(tmp_path):
    from lmfoundry.curate import config
    doc = config.__doc__
    yaml_text = doc[doc.index("inputs:"):doc.index("Every unknown")]
    (tmp_path / "c.yaml").write_text(textwrap.dedent("    " + yaml_text))
    cfg = load_config(tmp_path / "c.yaml")
    assert [n for n, _ in cfg.steps][-1] == "dedup" and cfg.shards == 8


def test_readme_pipeline_example_parses():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("# curate.yaml"):]
    block = block[:block.index("```")]
    cfg = make_config(__import__("yaml").safe_load(block), "README.md")
    assert [n for n, _ in cfg.steps] == ["language", "length", "gopher_quality", "gopher_repetition", "c4", "fineweb",
                                         "classifier", "redact", "decontaminate", "dedup"]
