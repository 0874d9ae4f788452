"""Online DPO: reward rises on a verifiable task, best and worst samples become the pair, ties are
skipped and counted, kill -9 then --resume continues the same metric sequence, and the three
scorers (verifier, reward model re-tokenizing with its own tokenizer, judge endpoint) with their
bad inputs."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import has_digit, number_prompts

from lmfoundry.checkpoint import load_model
from lmfoundry.cli import main
from lmfoundry.errors import DataError, JudgeError, TrainError
from lmfoundry.generate import SamplingParams
from lmfoundry.tokenizer import load_tokenizer
from lmfoundry.train import TrainConfig, train
from lmfoundry.train.online import OnlineDPO
from lmfoundry.train.rollout import JudgeScorer, PromptBatches, RewardModelScorer, Samples, Verifier

PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)


def run(tmp_path, demo_dir, scorer, steps=4, out="out", k=4, **kw):
    tok = load_tokenizer(demo_dir)
    objective = OnlineDPO(scorer, PARAMS, num_generations=k, tokenizer=tok, beta=0.1)
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup=0, weight_decay=0.0, schedule="constant", progress=False, **kw)
    return train(load_model(demo_dir), PromptBatches(number_prompts(), tok, 4), objective, cfg, tmp_path / out)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_online_dpo_with_a_verifier_raises_the_reward(tmp_path, demo_dir):
    rows = metrics(run(tmp_path, demo_dir, Verifier(has_digit), steps=30).out_dir)
    first, last = (sum(r["score/mean"] for r in rows[i:i + 5]) / 5 for i in (0, len(rows) - 5))
    assert first < 0.4 and last > first + 0.25
    assert {"score/max", "score/gap", "pairs/usable", "pairs/tied", "rewards/accuracy", "time/generate",
            "time/score", "step_seconds"} <= set(rows[0])


def test_the_pair_is_the_best_and_the_worst_sample_and_ties_are_skipped(demo_dir):
    objective = OnlineDPO(Verifier(has_digit), PARAMS, num_generations=3, tokenizer=load_tokenizer(demo_dir))
    ids = torch.arange(9 * 5).view(9, 5)
    samples = Samples(ids, ids + 1000, ["x"] * 9, torch.zeros(9, dtype=torch.bool), torch.full((9,), 4))
    nan = float("nan")
    scores = torch.tensor([[0.2, 0.9, 0.5], [1.0, 1.0, 1.0], [nan, 0.3, 0.1]])
    r = objective.build(samples, scores)
    assert r["count"] == 2 and r["pairs/usable"] == [2, 3] and r["pairs/tied"] == [1, 3]
    assert r["pair"]["chosen_input_ids"].tolist() == [ids[1].tolist(), ids[7].tolist()]
    assert r["pair"]["rejected_input_ids"].tolist() == [ids[0].tolist(), ids[8].tolist()]
    assert r["score/unparseable"] == [1, 9] and r["score/gap"][0] == pytest.approx(0.7 + 0.2)


def test_equal_scores_everywhere_train_nothing(tmp_path, demo_dir):
    result = run(tmp_path, demo_dir, Verifier(lambda text, answer: 0.5), steps=1)
    row = metrics(result.out_dir)[0]
    assert row["pairs/usable"] == 0.0 and row["pairs/tied"] == 1.0 and row["loss"] == 0.0 and row["grad_norm"] == 0
    before, after = load_model(demo_dir).state_dict(), load_model(result.out_dir).state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


# ---------------------------------------------------------------- kill -9 and --resume

SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import has_digit, number_prompts
from lmfoundry.checkpoint import load_model
from lmfoundry.generate import SamplingParams
from lmfoundry.tokenizer import load_tokenizer
from lmfoundry.train import TrainConfig, train
from lmfoundry.train.online import OnlineDPO
from lmfoundry.train.rollout import PromptBatches, Verifier
torch.set_num_threads(1)

def slow(text, answer):          # slow enough for the test to kill the run mid-way
    time.sleep({sleep})
    return has_digit(text, answer)

tok = load_tokenizer({demo!r})
objective = OnlineDPO(Verifier(slow), SamplingParams(max_new_tokens=8), num_generations=4, tokenizer=tok,
                      reference=load_model({demo!r}))
cfg = TrainConfig(steps=8, lr=3e-3, warmup=0, weight_decay=0.0, progress=False, save_every=2)
train(load_model({demo!r}), PromptBatches(number_prompts(), tok, 4), objective, cfg, {out!r}, resume={resume})
"""


def script(tmp_path, demo_dir, out, resume, sleep=0.0):
    path = tmp_path / f"run-{out}-{resume}.py"
    path.write_text(SCRIPT.format(tests=os.path.dirname(__file__), demo=str(demo_dir), out=str(tmp_path / out),
                                  resume=resume, sleep=sleep))
    return [sys.executable, str(path)]


@pytest.mark.slow
def test_resume_after_kill_9_continues_the_same_metric_sequence(tmp_path, demo_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(script(tmp_path, demo_dir, "full", False), check=True, env=env, timeout=300)
    proc = subprocess.Popen(script(tmp_path, demo_dir, "cut", False, sleep=0.02), env=env)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step-00000004").is_dir() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "cut" / "config.json").exists()
    subprocess.run(script(tmp_path, demo_dir, "cut", True), check=True, env=env, timeout=300)
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))
    for key in ("loss", "score/mean", "pairs/usable", "rewards/chosen", "rewards/margin", "completions/length"):
        assert [r[key] for r in cut] == pytest.approx([r[key] for r in full], abs=1e-6), key


# ---------------------------------------------------------------- scorers and bad input

def test_prompts_without_the_verifiers_field_fail_with_one_line(tmp_path, demo_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "2 + 2?"}) + "\n")
    base = ["online-dpo", "--model", str(demo_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
            "--steps", "1", "--no-progress", "--max-new-tokens", "8"]
    assert main(base + ["--verifier", "math"]) == 1
    err = capsys.readouterr().err
    assert err == f"lmfoundry: error: {prompts}:2: record has no 'answer' field (the math verifier compares " \
                  "completions with it)\n"
    assert main(base + ["--verifier", "math", "--num-generations", "1"]) == 1
    assert "--num-generations must be >= 2, got 1" in capsys.readouterr().err
    assert main(base) == 1
    assert "give exactly one scorer: --reward RM, --verifier math or --judge URL" in capsys.readouterr().err
    assert main(base + ["--verifier", "math", "--judge", "http://127.0.0.1:9/v1"]) == 1
    assert "(got --verifier and --judge)" in capsys.readouterr().err
    assert main(["grpo", *base[1:], "--verifier", "math", "--max-new-tokens", "300"]) == 1
    assert "--max-new-tokens 300 leaves no room for a prompt in the model's context of 256" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(TrainError, match="num_generations must be >= 2"):
        OnlineDPO(Verifier(has_digit), PARAMS, num_generations=1, tokenizer=load_tokenizer(demo_dir))
    with pytest.raises(DataError, match="unknown verifier 'chess'"):
        Verifier("chess")


def test_a_reward_model_with_another_tokenizer_scores_re_tokenized_texts(tmp_path, demo_dir):
    """Refuse or re-tokenize: lmfoundry re-tokenizes. The scorer renders prompt and completion with
    the reward model's own tokenizer and chat template, as reward training renders replies."""
    from lmfoundry.data import DPOBatches
    from lmfoundry.demo import train_demo_tokenizer
    from lmfoundry.train.reward import RewardModel, collate_pairs, pair_rows, save_reward_model
    from lmfoundry.config import ModelConfig
    from lmfoundry.model import Transformer
    other = tmp_path / "rm"
    tok = train_demo_tokenizer(vocab_size=300)                       # not the policy's 512-token BPE
    cfg = json.loads((demo_dir / "tokenizer_config.json").read_text())
    torch.manual_seed(0)
    rm = RewardModel(Transformer(ModelConfig.from_preset("tiny").replace(pad_token_id=tok.token_to_id("<|pad|>"))))
    save_reward_model(rm.state_dict(), rm.config, other)
    (other / "tokenizer.json").write_text(tok.to_str())
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(other).vocab_size != load_tokenizer(demo_dir).vocab_size
    texts = ["There are 3.", "I do not know", ""]
    scores = RewardModelScorer(other)([{}] * 3, ["How many?"] * 3, texts)
    pairs = DPOBatches([{"prompt": "How many?", "chosen": t, "rejected": t} for t in texts], load_tokenizer(other),
                       256, 1, progress=False).pairs
    ids, lengths = pair_rows(collate_pairs(pairs))
    with torch.no_grad():
        expected = rm.eval()(ids, lengths)[:3]
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    result = run(tmp_path, demo_dir, RewardModelScorer(other), steps=2, k=2)     # and it trains with it
    assert metrics(result.out_dir)[-1]["pairs/usable"] == 1.0


class Judge:
    """An OpenAI-compatible /chat/completions stub: `answer(request body) -> (status, body text)`."""

    def __init__(self, answer):
        self.hits, judge = 0, self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                judge.hits += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, text = answer(body)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    @staticmethod
    def reply(content: str) -> tuple[int, str]:
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def judge():
    made = []
    yield lambda answer: made.append(Judge(answer)) or made[-1]
    for j in made:
        j.server.shutdown()


def scorer(url, tmp_path, **kw):
    return JudgeScorer(url, cache=tmp_path / "cache.jsonl", retries=2, retry_sleep=0.01, timeout=5, **kw)


def test_a_judge_scores_samples_and_its_grades_are_cached(tmp_path, demo_dir, judge):
    def grade(body):   # the completion is quoted in the prompt: a digit in it earns 9
        answer = body["messages"][1]["content"].split("[The Start of Assistant's Answer]")[1]
        return Judge.reply(f"Fine. Rating: [[{9 if any(c.isdigit() for c in answer) else 2}]]")
    j = judge(grade)
    result = run(tmp_path, demo_dir, scorer(j.url, tmp_path), steps=2)
    assert j.hits == 2 * 4 * 4 and metrics(result.out_dir)[0]["score/unparseable"] == 0.0
    s = scorer(j.url, tmp_path)
    assert s([{"answer": "4"}], ["2 + 2?"], ["#### 4"]) == [9.0] and j.hits == 33
    assert s([{"answer": "4"}], ["2 + 2?"], ["#### 4"]) == [9.0] and j.hits == 33      # from the cache


def test_unparseable_grades_are_counted_and_a_judge_that_never_grades_is_refused(tmp_path, demo_dir, judge):
    count = iter(range(10**6))
    j = judge(lambda body: Judge.reply("[[5]]" if next(count) % 4 else "I would rather not say."))
    rows = metrics(run(tmp_path, demo_dir, scorer(j.url, tmp_path), steps=2).out_dir)
    assert sum(r["score/unparseable"] for r in rows) / 2 == pytest.approx(0.25)
    mute = judge(lambda body: Judge.reply("no grade here"))
    with pytest.raises(JudgeError, match="none of its first 16 answers holds a grade in the form"):
        run(tmp_path, demo_dir, scorer(mute.url, tmp_path / "b"), steps=1, out="mute")
    assert not (tmp_path / "mute" / "config.json").exists()


def test_a_judge_that_is_down_or_answers_garbage_is_retried_then_refused(tmp_path, demo_dir, judge):
    from test_train_distributed import free_port
    down = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(JudgeError, match=f"judge endpoint {down}/chat/completions failed: URLError"):
        run(tmp_path, demo_dir, scorer(down, tmp_path), steps=1, out="down")
    garbage = judge(lambda body: (200, "<html>bad gateway</html>"))
    with pytest.raises(JudgeError, match="failed: JSONDecodeError"):
        run(tmp_path, demo_dir, scorer(garbage.url, tmp_path), steps=1, out="garbage")
    assert garbage.hits == 3                                  # the first call and two retries
    missing = judge(lambda body: (404, "no such route"))
    with pytest.raises(JudgeError, match="HTTP Error 404"):
        run(tmp_path, demo_dir, scorer(missing.url, tmp_path), steps=1, out="missing")
    assert missing.hits == 1                                  # a 404 does not get better by retrying
    for out in ("down", "garbage", "missing"):
        assert not (tmp_path / out / "config.json").exists() and not (tmp_path / out / "checkpoints").exists()
