"""The continuous-batching engine without HTTP: a sequence's tokens do not depend on what it
is batched with or when it arrives (reference: lmfoundry.generate run on that prompt alone),
rows are freed on cancel, admission follows the queue and KV budget, and the per-row KV cache
computes what a full forward computes."""
import pytest
import torch

from lmfoundry.config import ModelConfig
from lmfoundry.errors import GenerationError
from lmfoundry.generate import SamplingParams, generate
from lmfoundry.model import Transformer
from lmfoundry.serve.engine import Engine, QueueFull


def random_model(preset, **overrides):
    torch.manual_seed(0)
    # init_std 0.1: peaked logits, so a greedy tie cannot hide or fake a difference
    return Transformer(ModelConfig.from_preset(preset, init_std=0.1, **overrides)).eval()


def workload(n, seed=1, vocab=512, max_prompt=40, max_new=40):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (int(L),), generator=g).tolist()
               for L in torch.randint(2, max_prompt, (n,), generator=g)]
    news = [int(x) for x in torch.randint(1, max_new, (n,), generator=g)]
    return prompts, news


def run_staggered(engine, prompts, params_list, gaps):
    """Submit request i after gaps[i] engine steps, stepping by hand until all finish."""
    seqs = []
    for prompt, params, gap in zip(prompts, params_list, gaps):
        for _ in range(gap):
            engine.step()
        seqs.append(engine.submit(prompt, params))
    while any(s.finish is None for s in seqs):
        engine.step()
    return [s.result() for s in seqs]


@pytest.mark.parametrize("preset", ["tiny", "tiny-mistral"])   # tiny-mistral: sliding window of 16
def test_greedy_identical_alone_and_in_a_full_batch_with_staggered_arrivals(preset):
    model = random_model(preset, eos_token_id=None)
    prompts, news = workload(12, max_new=60)   # windowed: prompts + generations cross the window
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in news]
    alone = [generate(model, [p], q)[0] for p, q in zip(prompts, params)]
    engine_alone = [run_staggered(Engine(model, max_batch=1), [p], [q], [0])[0] for p, q in zip(prompts, params)]
    batched = run_staggered(Engine(model, max_batch=4, max_queue=16, prefill_chunk=16), prompts, params,
                            gaps=[0, 0, 3, 1, 0, 7, 2, 0, 0, 5, 1, 0])
    assert [c.tokens for c in engine_alone] == [c.tokens for c in alone]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert all(len(c.tokens) == n and c.finish_reason == "length" for c, n in zip(batched, news))


def test_batch_rows_really_share_steps():
    model = random_model("tiny", eos_token_id=None)
    prompts, _ = workload(8)
    engine = Engine(model, max_batch=8)
    run_staggered(engine, prompts, [SamplingParams(max_new_tokens=20, temperature=0)] * 8, [0] * 8)
    assert engine.stats.steps == 19                       # the first token comes from the prefill
    assert engine.stats.decode_rows == 8 * 19


def test_sampling_and_stops_follow_generate():
    model = random_model("tiny", eos_token_id=None)
    prompts, _ = workload(6)
    from lmfoundry.demo import train_demo_tokenizer

    class Tok:   # generate's stop strings need only decode()
        backend = train_demo_tokenizer()

        def decode(self, ids, skip_special_tokens=True):
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
    tok = Tok()
    free_text = tok.decode(generate(model, [prompts[3]], max_new_tokens=30, temperature=0)[0].tokens)
    stop_string = next(free_text[i:i + 2] for i in range(len(free_text) // 2, len(free_text))
                       if "\ufffd" not in free_text[i:i + 2])
    cases = [
        SamplingParams(max_new_tokens=25, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7),
        SamplingParams(max_new_tokens=25, temperature=1.0, seed=3),
        SamplingParams(max_new_tokens=25, temperature=0, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=30, temperature=0, stop_strings=(stop_string,)),
        SamplingParams(max_new_tokens=30, temperature=0, stop_ids=[generate(model, [prompts[4]], max_new_tokens=5,
                                                                            temperature=0)[0].tokens[3]]),
        SamplingParams(max_new_tokens=25, temperature=0.7, top_p=0.5, seed=11),
    ]
    alone = [generate(model, [p], q, tokenizer=tok)[0] for p, q in zip(prompts, cases)]
    batched = run_staggered(Engine(model, tok, max_batch=3), prompts, cases, gaps=[0, 1, 0, 2, 0, 1])
    assert batched == alone
    assert alone[3].finish_reason == "stop" and alone[3].stop == stop_string
    assert alone[4].finish_reason == "stop" and len(alone[4].tokens) == 3


def test_cancel_frees_the_row_at_the_next_step():
    model = random_model("tiny", eos_token_id=None)
    prompts, _ = workload(3)
    engine = Engine(model, max_batch=2, max_queue=1)
    a, b, c = (engine.submit(p, SamplingParams(max_new_tokens=50, temperature=0)) for p in prompts)
    engine.step()
    assert engine.snapshot()["running"] == 2 and engine.snapshot()["waiting"] == 1
    with pytest.raises(QueueFull):
        engine.submit(prompts[0], SamplingParams(max_new_tokens=5))
    a.cancel()
    engine.step()   # a leaves, c takes its row in the same step
    assert a.finish.reason == "abort" and c.state == "decode"
    assert engine.snapshot() == {**engine.snapshot(), "running": 2, "waiting": 0}
    while b.finish is None or c.finish is None:
        engine.step()
    assert c.result().tokens == generate(model, [prompts[2]], max_new_tokens=50, temperature=0)[0].tokens
    assert engine.snapshot()["running"] == 0 and engine.snapshot()["kv_reserved"] == 0


def test_kv_budget_decides_admission():
    model = random_model("tiny", eos_token_id=None)
    prompts = [[5] * 30, [6] * 30, [7] * 30]
    engine = Engine(model, max_batch=3, kv_budget=100)   # 30 + 40 each: one at a time
    seqs = [engine.submit(p, SamplingParams(max_new_tokens=40, temperature=0)) for p in prompts]
    peak = 0
    while any(s.finish is None for s in seqs):
        engine.step()
        peak = max(peak, engine.snapshot()["running"])
    assert peak == 1
    assert [s.result().tokens for s in seqs] == [c.tokens for c in generate(model, prompts, max_new_tokens=40,
                                                                             temperature=0)]
    with pytest.raises(GenerationError, match="budget"):
        engine.submit([1] * 80, SamplingParams(max_new_tokens=40))
    with pytest.raises(GenerationError, match="context length is 256"):
        Engine(model).submit([1] * 250, SamplingParams(max_new_tokens=10))
    short = Engine(model, max_batch=2, max_len=64)   # --max-model-len: smaller rows, smaller cache
    assert short.cache.k[0].shape[2] == 64
    with pytest.raises(GenerationError, match="context length is 64"):
        short.submit([1] * 60, SamplingParams(max_new_tokens=10))


def test_engine_thread_serves_concurrent_submissions():
    model = random_model("tiny", eos_token_id=None)
    prompts, news = workload(10)
    engine = Engine(model, max_batch=4, max_queue=8).start()
    try:
        seqs = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, news)]
        got = [s.result(timeout=30).tokens for s in seqs]
    finally:
        engine.shutdown()
    assert got == [generate(model, [p], max_new_tokens=n, temperature=0)[0].tokens for p, n in zip(prompts, news)]
    assert not engine.alive


def test_per_row_cache_matches_full_forward():
    """Rows at different lengths decode together; each row's logits equal a full forward of its sequence."""
    model = random_model("tiny-mistral")
    seqs = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 30, 19)]
    with torch.inference_mode():
        cache = model.new_cache(3, 64)
        for r, s in enumerate(seqs):
            model(torch.tensor([s[:-1]]), cache.row(r))
            cache.lengths[r] = len(s) - 1
        step = model(torch.tensor([[s[-1]] for s in seqs]), cache)[:, -1]
        full = [model(torch.tensor([s]))[0, -1] for s in seqs]
    assert cache.lengths.tolist() == [len(s) for s in seqs]
    for r in range(3):
        torch.testing.assert_close(step[r], full[r], atol=1e-5, rtol=1e-5)


def test_missing_serving_extra_is_one_clear_error(monkeypatch):
    import sys

    from lmfoundry.errors import LMFoundryError
    from lmfoundry.serve.api import require_serving
    monkeypatch.setitem(sys.modules, "fastapi", None)   # import fastapi -> ImportError
    with pytest.raises(LMFoundryError, match=r"pip install 'lmfoundry\[serve\]'"):
        require_serving()
