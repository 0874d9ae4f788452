"""`lmfoundry eval` end to end on the demo checkpoint (a real Transformer) with tiny task files."""
import json
import math

import pytest
import torch

from lmfoundry.cli import main
from lmfoundry.eval.samples import write_sample_data

ALL = "arc_challenge,arc_easy,hellaswag,mmlu,truthfulqa_mc1,truthfulqa_mc2,winogrande,gsm8k"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("evaldata"))


def test_eval_writes_lm_eval_shaped_results(demo_dir, data, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, stdout, err = run(capsys, "eval", demo_dir, "--tasks", ALL, "--data-dir", data, "--fewshot", 1,
                            "--max-gen-toks", 8, "--batch-size", 4, "--log-samples", "--out", out)
    assert code == 0, err
    res = json.loads(out.read_text())
    r = res["results"]
    for task, metrics in [("arc_challenge", ("acc", "acc_norm", "acc_bytes")), ("hellaswag", ("acc", "acc_norm")),
                          ("mmlu", ("acc", "acc_macro")), ("mmlu_anatomy", ("acc",)), ("truthfulqa_mc1", ("acc",)),
                          ("truthfulqa_mc2", ("acc",)), ("winogrande", ("acc",)),
                          ("gsm8k", ("exact_match,strict-match", "exact_match,flexible-extract"))]:
        for m in metrics:
            assert 0.0 <= r[task][m] <= 1.0, (task, m)
    assert res["n-shot"]["arc_challenge"] == 1 and res["n-shot"]["truthfulqa_mc2"] == 0
    assert res["config"]["model"] == str(demo_dir)
    assert len(res["chat_template_sha256"]) == 64
    assert len(res["configs"]["hellaswag"]["prompt_sha256"]) == 64 and res["configs"]["hellaswag"]["sha256"]
    assert res["configs"]["gsm8k"]["generation_kwargs"]["until"] == ["Question:", "</s>", "<|im_end|>"]
    s = res["samples"]["arc_challenge"][0]
    assert s["arguments"][0][0].endswith("\nAnswer:") and len(s["resps"]) == 4
    assert "| arc_challenge" in stdout and "acc_norm" in stdout          # the terminal table
    # deterministic: the same run gives the same numbers; prompts hash the same
    out2 = tmp_path / "again.json"
    assert run(capsys, "eval", demo_dir, "--tasks", "hellaswag,winogrande", "--data-dir", data, "--fewshot", 1,
               "--out", out2)[0] == 0
    again = json.loads(out2.read_text())
    assert again["results"]["hellaswag"] == r["hellaswag"]
    assert again["configs"]["winogrande"]["prompt_sha256"] == res["configs"]["winogrande"]["prompt_sha256"]


def test_kv_reuse_and_plain_scoring_give_the_same_log_likelihoods(demo_dir, data):
    from lmfoundry.eval import LM, evaluate
    shared = evaluate(LM.load(demo_dir, progress=False), ["hellaswag", "winogrande", "mmlu"], data, num_fewshot=1,
                      log_samples=True)
    plain = evaluate(LM.load(demo_dir, progress=False, share_prefix=False, batch_size=1),
                     ["hellaswag", "winogrande", "mmlu"], data, num_fewshot=1, log_samples=True)
    for task in ("hellaswag", "winogrande", "mmlu"):
        for a, b in zip(shared["samples"][task], plain["samples"][task]):
            assert a["arguments"] == b["arguments"]
            for (la, ga), (lb, gb) in zip(a["resps"], b["resps"]):
                assert abs(la - lb) <= 1e-5 and ga == gb


def test_leaderboard_prints_the_h6_table(demo_dir, tmp_path, capsys):
    d = write_sample_data(tmp_path / "lb")
    # the few-shot pools need 25 / 10 / 5 examples
    arc = [{"question": f"Which number comes after {i}?", "choices": {"text": [str(i + 1), str(i + 2)],
            "label": ["A", "B"]}, "answerKey": "A"} for i in range(26)]
    (d / "arc_challenge.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    hs = json.loads((d / "hellaswag.train.jsonl").read_text().splitlines()[0])
    (d / "hellaswag.train.jsonl").write_text("".join(json.dumps({**hs, "ind": i}) + "\n" for i in range(11)))
    wg = json.loads((d / "winogrande.train.jsonl").read_text().splitlines()[0])
    (d / "winogrande.train.jsonl").write_text("".join(json.dumps(wg) + "\n" for _ in range(6)))
    gs = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]
    (d / "gsm8k.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gs))
    mm = [{"question": f"q{i}", "subject": s, "choices": ["a", "b", "c", "d"], "answer": 0}
          for s in ("anatomy", "elementary_mathematics") for i in range(5)]
    (d / "mmlu.dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mm))
    out = tmp_path / "h6.json"
    code, stdout, err = run(capsys, "eval", demo_dir, "--leaderboard", "--data-dir", d, "--max-gen-toks", 8,
                            "--limit", 2, "--out", out)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["n-shot"] == {**res["n-shot"], "arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0,
                             "winogrande": 5, "gsm8k": 5}
    assert res["configs"]["gsm8k"]["generation_kwargs"]["until"] == [":", "Question:", "Question"]
    assert set(res["h6"]["columns"]) == {"ARC", "HellaSwag", "MMLU", "TruthfulQA", "Winogrande", "GSM8K"}
    assert res["h6"]["average"] == pytest.approx(sum(res["h6"]["columns"].values()) / 6)
    assert "Open LLM Leaderboard v1 (H6)" in stdout and "Average" in stdout
    assert res["results"]["gsm8k"]["acc"] in (0.0, 0.5, 1.0)


def _hf_nll(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].double().sum().item()


@pytest.mark.parametrize("max_length", [None, 48])
def test_perplexity_equals_exp_mean_nll_from_transformers(demo_dir, tmp_path, capsys, max_length):
    import transformers
    text = ("Depth up-scaling copies a base model and stacks two copies. 민수는 사과 3개를 가지고 있습니다. "
            "A merged model averages the weights of two variants. The answer is 7.")
    f = tmp_path / "doc.txt"
    f.write_text(text)
    out = tmp_path / "ppl.json"
    args = ["eval", demo_dir, "--perplexity", f, "--out", out] + (["--max-length", max_length] if max_length else [])
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    r = json.loads(out.read_text())["results"]["perplexity"]

    tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    L = max_length or 256
    assert len(ids) > L if max_length else len(ids) < L
    # independent windows: predict every token once; the first window is conditioned on BOS,
    # each later one on the L tokens before its last token
    nll, done = 0.0, 0
    while done < len(ids):
        end = min(done + L, len(ids))
        window = [tok.bos_token_id] + ids[:end] if done == 0 else ids[end - L - 1:end]
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([window[:-1]])).logits[0].float(), -1)
        tgt = torch.tensor(window[1:])
        per_tok = -logp[torch.arange(len(tgt)), tgt].double()
        nll += per_tok[-(end - done):].sum().item()
        done = end
    assert r["tokens"] == len(ids)
    assert r["token_perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-5)
    assert r["byte_perplexity"] == pytest.approx(math.exp(nll / len(text.encode())), rel=1e-5)
    assert "perplexity of" in stdout


def test_eval_errors_are_one_line(demo_dir, tmp_path, capsys):
    code, out, err = run(capsys, "eval", demo_dir, "--tasks", "arc_easy", "--data-dir", tmp_path)
    assert code == 1 and err.startswith("lmfoundry: error:") and err.count("\n") == 1
    assert "no data file for task arc_easy" in err
    code, out, err = run(capsys, "eval", demo_dir)
    assert code == 1 and "--tasks" in err
    (tmp_path / "gsm8k.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    code, out, err = run(capsys, "eval", demo_dir, "--tasks", "gsm8k", "--data-dir", tmp_path, "--fewshot", 0)
    assert code == 1 and "max-gen-toks" in err       # 256 new tokens do not fit the demo's 256-token context
