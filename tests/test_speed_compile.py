"""Compiled decoding: one torch.compile'd decode step over a static KV cache gives the same tokens
as eager decoding (the reference) for every driver, rows of different lengths included; a
compiler failure falls back to eager decoding with a warning."""
import copy

import pytest
import torch

from lmfoundry.generate import SamplingParams, compile_decoding, decode_step, generate, prefill
from lmfoundry.quantize import load_for_inference
from lmfoundry.serve.engine import Engine


@pytest.fixture(scope="module")
def peaked(demo_dir):
    model = load_for_inference(demo_dir, "float32")
    with torch.no_grad():   # peaked logits: greedy ties cannot hide a difference (as test_decode_core)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model


def prompts(n=(3, 11, 7)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (k,), generator=g).tolist() for k in n]


def test_a_static_cache_decodes_like_the_growing_cache(peaked):
    """The compiled step's math, uncompiled: all keys read, masked by position."""
    caches = [peaked.new_cache(3, 32), peaked.new_cache(3, 32)]
    caches[1].static = True
    with torch.no_grad():
        outs = [[prefill(peaked, c, prompts())] for c in caches]
        for t in range(5):
            tokens = torch.tensor([t, 40 + t, 90])
            for out, c in zip(outs, caches):
                out.append(decode_step(peaked, c, tokens))
    torch.testing.assert_close(torch.stack(outs[1]), torch.stack(outs[0]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens_for_generate_and_the_engine(peaked, demo_dir):
    from lmfoundry.tokenizer import load_tokenizer
    params = [SamplingParams(max_new_tokens=10, temperature=0, stop_ids=()),
              SamplingParams(max_new_tokens=12, temperature=0.8, seed=3, stop_ids=()),
              SamplingParams(max_new_tokens=6, temperature=0, stop_ids=())]
    ref = [c.tokens for c in generate(peaked, prompts(), params)]
    compiled = compile_decoding(copy.deepcopy(peaked))
    assert [c.tokens for c in generate(compiled, prompts(), params)] == ref
    assert compiled.compiled_decode is not None                      # it did not fall back
    engine = Engine(compiled, load_tokenizer(demo_dir), max_batch=3, prefill_chunk=4)
    seqs = [engine.submit(p, sp) for p, sp in zip(prompts(), params)]
    while any(s.finish is None for s in seqs):
        engine.step()
    assert [s.result().tokens for s in seqs] == ref


def test_a_failing_compiler_falls_back_to_eager_decoding_with_a_warning(peaked):
    model = copy.deepcopy(peaked)

    def broken(*args):
        raise RuntimeError("no C++ compiler found")
    model.compiled_decode = broken
    kw = dict(max_new_tokens=6, temperature=0, stop_ids=())
    with pytest.warns(UserWarning, match="compiled decoding failed .*no C\\+\\+ compiler found"):
        out = generate(model, prompts(), **kw)
    assert model.compiled_decode is None
    assert [c.tokens for c in out] == [c.tokens for c in generate(peaked, prompts(), **kw)]
