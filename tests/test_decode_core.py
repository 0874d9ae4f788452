"""One decode core: generate() (static batches), the serving engine (continuous batching), eval's
generate_until and the judge runner give token-identical greedy output and identical seeded
samples for the same requests, because they all drive generate.py's prefill / decode_step /
Sampler / sample. Reference: generate() on each request alone."""
import pytest
import torch

from lmfoundry.eval.judge import Question, generate_answers
from lmfoundry.eval.lm import LM
from lmfoundry.generate import SamplingParams, fit_prompt, generate, generate_text
from lmfoundry.serve.engine import Engine

TEXTS = ["Depth up-scaling copies a base model", "언어 모델은 다음", "Tom has 3 apples and", "A"]


@pytest.fixture(scope="module")
def lm(demo_dir):
    lm = LM.load(demo_dir, progress=False, batch_size=3)
    torch.manual_seed(1)
    with torch.no_grad():   # peaked logits: greedy ties cannot hide a difference
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return lm


def alone(lm, ids, params):
    return [generate(lm.model, [i], p, tokenizer=lm.tokenizer)[0].tokens for i, p in zip(ids, params)]


def through_engine(lm, ids, params, max_batch=2):
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, prefill_chunk=5)
    seqs = []
    for k, (i, p) in enumerate(zip(ids, params)):
        seqs.append(engine.submit(i, p))
        for _ in range(k):    # staggered arrivals, chunked prefills beside decoding rows
            engine.step()
    while any(s.finish is None for s in seqs):
        engine.step()
    return [s.result().tokens for s in seqs]


def cut(lm, tokens, stops):
    text = lm.tokenizer.decode(tokens)
    for s in stops:
        text = text.split(s)[0]
    return text


@pytest.mark.parametrize("sampled", [False, True])
def test_every_driver_gives_the_same_tokens_for_the_same_requests(lm, sampled):
    kw = dict(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2) if sampled else dict(temperature=0)
    params = [SamplingParams(max_new_tokens=12 + 3 * k, seed=100 + k, stop_strings=(" the",), **kw)
              for k in range(len(TEXTS))]
    ids = [lm.tok_encode(t) for t in TEXTS]
    ref = alone(lm, ids, params)
    assert len({tuple(r) for r in ref}) == len(ref)                          # the requests differ
    assert [c.tokens for c in generate(lm.model, ids, params, tokenizer=lm.tokenizer)] == ref
    assert through_engine(lm, ids, params) == ref
    assert generate_text(lm.model, lm.tokenizer, ids, params, batch_size=2) == \
        [cut(lm, r, p.stop_strings) for r, p in zip(ref, params)]
    if not sampled:   # lm-eval's generate_until (greedy unless do_sample; no top-k/top-p there)
        reqs = [(t, {"until": list(p.stop_strings), "max_gen_toks": p.max_new_tokens}) for t, p in zip(TEXTS, params)]
        assert lm.generate_until(reqs) == [cut(lm, r, p.stop_strings) for r, p in zip(ref, params)]


def test_generate_until_samples_like_generate_with_the_request_seed(lm):
    reqs = [(t, {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": True, "temperature": 0.8, "seed": 7})
            for t in TEXTS]
    params = [SamplingParams(max_new_tokens=10, temperature=0.8, seed=7, stop_strings=("\n\n",))] * len(TEXTS)
    ref = alone(lm, [lm.tok_encode(t) for t in TEXTS], params)
    assert lm.generate_until(reqs) == [cut(lm, r, ("\n\n",)) for r in ref]


def test_judge_runner_answers_are_the_cores_answers(lm):
    questions = [Question(1, "math", ["What is 3 + 4?", "And times 2?"]),      # greedy category
                 Question(2, "writing", ["Write one sentence about apples."])]   # sampled at 0.7
    answers = generate_answers(lm, questions, "mt_bench", max_new_tokens=16, seed=5, progress=False)
    for q, got in zip(questions, answers):
        chat = []
        for turn, answer in zip(q.turns, got):
            chat.append({"role": "user", "content": turn})
            ids = lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            temp = 0.0 if q.category == "math" else 0.7
            p = SamplingParams(max_new_tokens=16, temperature=temp, seed=5 if temp else None)
            assert answer == cut(lm, alone(lm, [ids], [p])[0], ()).strip()
            chat.append({"role": "assistant", "content": answer})


def test_seeded_rows_of_one_params_differ_and_reproduce(lm):
    """One SamplingParams for a batch: row r samples with seed + r (k samples of one prompt differ)."""
    ids = [lm.tok_encode(TEXTS[0])] * 4
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    outs = [c.tokens for c in generate(lm.model, ids, p)]
    assert len({tuple(o) for o in outs}) > 1
    assert outs[2] == generate(lm.model, ids[:1], SamplingParams(max_new_tokens=10, temperature=1.0, seed=5))[0].tokens


def test_logprobs_are_the_raw_model_distribution(lm):
    ids = lm.tok_encode(TEXTS[2])
    (c,) = generate(lm.model, [ids], SamplingParams(max_new_tokens=6, temperature=0.7, seed=1, logprobs=2),
                    stop_ids=())
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids + c.tokens]))[0, len(ids) - 1:-1].float(), -1)
    expected = logp.gather(1, torch.tensor(c.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
    assert [t[0][0] for t in c.top_logprobs] == logp.argmax(-1).tolist()


def test_fit_prompt_keeps_the_last_tokens():
    assert fit_prompt(list(range(10)), 4, 12) == (list(range(2, 10)), 4)          # lm-eval: keep n, cut context
    assert fit_prompt(list(range(10)), 8, 12, min_room=3) == (list(range(1, 10)), 3)   # judges: shrink to room
    with pytest.raises(Exception, match="no room"):
        fit_prompt([1], 12, 12)
