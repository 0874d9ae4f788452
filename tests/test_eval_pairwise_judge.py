"""Arena-Hard / AlpacaEval 2 / WildBench runners end to end: the CLI against a scripted judge (verdicts
follow the answers, so the scores are known), and the protocol path against a live `lmfoundry serve`
judge running a deterministic tiny model."""
import json
import math

import pytest
from test_eval_judge import FakeJudge

from lmfoundry.cli import main
from lmfoundry.errors import JudgeError
from lmfoundry.eval.judge import JudgeClient
from lmfoundry.eval.pairwise import run_pairwise_benchmark

N = 6   # questions; the model's answer to question 4 makes the judge ramble without a verdict


def _between(text, start, end):
    return text.split(start, 1)[1].split(end, 1)[0] if start in text else ""


def scripted_reply(body) -> dict:
    """A judge that prefers answers containing "GOOD" and cannot decide on "RAMBLE"."""
    user = body["messages"][-1]["content"]
    if "RAMBLE" in user:
        return {"message": {"role": "assistant", "content": "Both are interesting in their own way."}}
    if "<|The Start of Assistant A's Answer|>" in user:   # Arena-Hard
        a = "GOOD" in _between(user, "<|The Start of Assistant A's Answer|>", "<|The End")
        b = "GOOD" in _between(user, "<|The Start of Assistant B's Answer|>", "<|The End")
        verdict = "[[A>>B]]" if a and not b else "[[B>>A]]" if b and not a else "[[A=B]]"
        return {"message": {"role": "assistant", "content": f"My own answer first... final verdict: {verdict}"}}
    if '"model_identifier": "m"' in user:                # AlpacaEval: log-probs of the identifiers
        first = _between(user, '"model_identifier": "m"', '"model_identifier": "M"')
        p_m = 0.8 if "GOOD" in first else 0.2
        top = [{"token": "m", "logprob": math.log(p_m)}, {"token": "M", "logprob": math.log(1 - p_m)}]
        return {"message": {"role": "assistant", "content": "m" if p_m > 0.5 else "M"},
                "logprobs": {"content": [{"token": "m", "logprob": math.log(p_m), "top_logprobs": top}]}}
    if "<|begin_of_response_A|>" in user:                 # WildBench pairwise
        a = _between(user, "<|begin_of_response_A|>", "<|end_of_response_A|>")
        return {"message": {"role": "assistant", "content": json.dumps({"choice": "A++" if "GOOD" in a else "B+"})}}
    out = _between(user, "<|begin_of_response|>", "<|end_of_response|>")   # WildBench score
    return {"message": {"role": "assistant", "content": "```\n" + json.dumps({"score": "9" if "GOOD" in out else "3"})
                        + "\n```"}}


@pytest.fixture
def scripted():
    j = FakeJudge(scripted_reply)
    yield j
    j.close()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _answer(i):
    return "RAMBLE" if i == 4 else ("GOOD answer " if i % 3 else "weak answer ") + "x" * (10 * i)


def _files(tmp_path, bench):
    """(questions, model answers, baseline answers) in the benchmark's own formats."""
    if bench == "arena-hard":
        q = [{"question_id": f"q{i}", "category": "arena-hard-v0.1", "cluster": "c",
              "turns": [{"content": f"Question {i}?"}]} for i in range(N)]
        ans = [{"question_id": f"q{i}", "model_id": "m", "choices": [{"index": 0, "turns": [{"content": _answer(i)}]}]}
               for i in range(N)]
        base = [{"question_id": f"q{i}", "model_id": "gpt-4-0314",
                 "choices": [{"index": 0, "turns": [{"content": "baseline reply"}]}]} for i in range(N)]
    elif bench == "alpaca-eval":
        q = [{"instruction": f"Do thing {i}.", "output": "baseline reply", "generator": "gpt4_turbo",
              "dataset": "helpful_base"} for i in range(N)]
        ans = [{"instruction": f"Do thing {i}.", "output": _answer(i), "generator": "m"} for i in range(N)]
        base = None
    else:
        q = [{"session_id": f"s{i}", "conversation_input": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"},
                                                            {"role": "user", "content": f"Task {i}"}],
              "checklist": ["Is it right?", "Is it clear?"], "primary_tag": "Coding & Debugging",
              "secondary_tags": ["Math"]} for i in range(N)]
        ans = [{"session_id": f"s{i}", "output": [_answer(i)], "generator": "m"} for i in range(N)]
        base = [{"session_id": f"s{i}", "output": ["baseline reply"], "generator": "ref"} for i in range(N)]
    return (_jsonl(tmp_path / "q.jsonl", q), _jsonl(tmp_path / "ans.jsonl", ans),
            _jsonl(tmp_path / "base.jsonl", base) if base else None)


def _cli(tmp_path, bench, judge_url, extra=()):
    q, ans, base = _files(tmp_path, bench)
    args = ["judge", "unused-model", "--bench", bench, "--questions", str(q), "--answers", str(ans),
            "--judge-url", judge_url, "--judge-model", "scripted", "--model-id", "m", "--out", str(tmp_path / "out"),
            *(["--baseline", str(base)] if base else []), *extra]
    return main(args), json.loads((tmp_path / "out" / "summary.json").read_text())


def test_arena_hard_cli_scores_both_orders_and_reports_unparseable(tmp_path, scripted, capsys):
    rc, s = _cli(tmp_path, "arena-hard", scripted.url)
    assert rc == 0
    # 3 GOOD answers win both games 3x (18 battles), 2 weak ones tie both (4), RAMBLE (question 4) has no verdict
    assert s["unparseable"] == 2 and s["battles"] == 18 + 4
    assert s["score"] == pytest.approx(100 * (18 + 0.5 * 4) / 22, abs=1e-6)   # one opponent: the win share
    assert len(scripted.requests) == 2 * N and scripted.requests[0]["temperature"] == 0
    first = scripted.requests[0]["messages"][1]["content"]
    assert "Assistant A's Answer|>\nbaseline reply" in first        # game 1: the baseline is A
    judgment = (tmp_path / "out" / "model_judgment" / "scripted" / "m.jsonl").read_text().splitlines()
    assert [g["score"] for g in json.loads(judgment[1])["games"]] == ["B>>A", "A>>B"]   # question 1: GOOD
    assert "arena_hard_winrate" in capsys.readouterr().out
    rc, again = _cli(tmp_path, "arena-hard", scripted.url, ["--style-control"])
    assert again["judge_calls"] == 0 and again["judge_cache_hits"] == 2 * N    # all from the cache
    assert again["style_control"] and again["score"] is not None


def test_alpaca_eval_cli_uses_logprobs_and_both_orders(tmp_path, scripted):
    rc, s = _cli(tmp_path, "alpaca-eval", scripted.url)
    assert rc == 0 and s["unparseable"] == 1
    req = scripted.requests[0]
    assert req["max_tokens"] == 1 and req["logprobs"] is True and req["top_logprobs"] == 5
    assert [m["role"] for m in req["messages"]] == ["system", "user"]
    annotations = [json.loads(x) for x in (tmp_path / "out" / "annotations.jsonl").read_text().splitlines()]
    assert {a["is_switched"] for a in annotations} == {True, False}      # outputs shown in both orders
    good = [a["preference"] for a in annotations if "GOOD" in a["output_2"]]
    assert good and all(p == pytest.approx(1.8) for p in good)          # 2 - P(baseline) after un-switching
    assert s["win_rate"] == pytest.approx(100 * (0.8 * 3 + 0.2 * 2) / 5)
    assert s["length_controlled_winrate"] is not None


def test_wildbench_cli_scores_and_rewards(tmp_path, scripted):
    rc, s = _cli(tmp_path, "wildbench", scripted.url, ["--length-penalty", "20"])
    assert rc == 0 and s["unparseable"] == 1
    assert s["wb_score"] == pytest.approx(((9 * 3 + 3 * 2) / 5 - 5) * 2 * 10)
    assert s["reward"]["win_much"] + s["reward"]["win"] + s["reward"]["tie"] + s["reward"]["lose"] == N - 1
    prompt = scripted.requests[0]["messages"][0]["content"]
    assert "USER: Hi\n\nASSISTANT: Hello\n\n" in prompt and "- Is it right?\n- Is it clear?\n" in prompt


def test_bad_inputs_are_one_line_errors(tmp_path, scripted, capsys):
    q, ans, _ = _files(tmp_path, "arena-hard")
    assert main(["judge", "m", "--bench", "arena-hard", "--questions", str(q), "--answers", str(ans),
                 "--judge-url", scripted.url, "--out", str(tmp_path / "o")]) == 1
    assert "needs the baseline model's answers" in capsys.readouterr().err
    _jsonl(tmp_path / "partial.jsonl", [json.loads(x) for x in ans.read_text().splitlines()][:2])
    with pytest.raises(JudgeError, match="no answers for 4 question"):
        run_pairwise_benchmark(None, "arena-hard", q, JudgeClient(scripted.url), tmp_path / "o",
                               baseline_path=ans, answers_path=tmp_path / "partial.jsonl")
    _jsonl(tmp_path / "bad.jsonl", [{"what": 1}])
    with pytest.raises(JudgeError, match="record 0 is not a wildbench question"):
        run_pairwise_benchmark(None, "wildbench", tmp_path / "bad.jsonl", JudgeClient(scripted.url), tmp_path / "o")


# ---- a live lmfoundry serve judge (the protocol, not the quality) ----
@pytest.fixture(scope="module")
def live_judge(tmp_path_factory):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from lmfoundry.checkpoint import load_model
    from lmfoundry.demo import make_demo_checkpoint
    from lmfoundry.serve.api import create_app
    from lmfoundry.serve.engine import Engine
    from lmfoundry.tokenizer import load_tokenizer
    from test_serve import ThreadServer
    path = make_demo_checkpoint(tmp_path_factory.mktemp("judge") / "tiny")
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096   # room for the judge prompts; a random model reads any length
    (path / "config.json").write_text(json.dumps(cfg))
    engine = Engine(load_model(path), load_tokenizer(path), max_batch=2, max_queue=8)
    srv = ThreadServer(create_app(engine, load_tokenizer(path), "tiny-judge", api_key=None))
    yield f"http://127.0.0.1:{srv.port}/v1"
    srv.stop()


@pytest.mark.parametrize("bench", ["arena-hard", "alpaca-eval", "wildbench"])
def test_live_lmfoundry_serve_as_judge(tmp_path, demo_dir, live_judge, bench):
    from lmfoundry.eval import LM
    q, _, base = _files(tmp_path, bench)
    judge = JudgeClient(live_judge, model="tiny-judge", max_tokens=8, cache=tmp_path / "cache.jsonl")
    lm = LM.load(demo_dir, progress=False, batch_size=4)
    s = run_pairwise_benchmark(lm, bench, q, judge, tmp_path / "out", baseline_path=base, max_new_tokens=16,
                               limit=3, progress=False)
    calls = {"arena-hard": 6, "alpaca-eval": 3, "wildbench": 6}[bench]
    assert s["judge_calls"] == calls and s["questions"] == 3
    assert 0 <= s["unparseable"] <= (6 if bench == "arena-hard" else 3)
    assert (tmp_path / "out" / "summary.json").is_file()
    if bench == "alpaca-eval":   # the server answered the log-probs request: 5 alternatives for the one token
        cached = [json.loads(x) for x in (tmp_path / "cache.jsonl").read_text().splitlines()]
        assert all(len(c["choice"]["logprobs"]["content"][0]["top_logprobs"]) == 5 for c in cached)
    again = run_pairwise_benchmark(lm, bench, q, JudgeClient(live_judge, model="tiny-judge", max_tokens=8,
                                                             cache=tmp_path / "cache.jsonl"),
                                   tmp_path / "out", baseline_path=base, max_new_tokens=16, limit=3, progress=False)
    assert again["judge_calls"] == 0 and again["judge_cache_hits"] == calls   # same answers (greedy), same prompts
