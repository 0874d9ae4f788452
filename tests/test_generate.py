"""Generation: greedy parity with transformers, batch invariance, KV cache vs full forward,
logits processing vs transformers' processors, sampling, stopping, streaming, errors."""
import re

import pytest
import torch

from lmfoundry.config import ModelConfig
from lmfoundry.errors import GenerationError
from lmfoundry.generate import Completion, SamplingParams, generate, process_logits
from lmfoundry.model import Transformer

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

V = 160
GREEDY = dict(temperature=0, stop_ids=())


def hf_name(name: str) -> str:
    """transformers Llama parameter name -> ours."""
    name = name.replace("model.embed_tokens.", "embed.").replace("model.norm.", "norm.")
    name = name.replace("model.layers.", "layers.").replace("input_layernorm", "attn_norm")
    name = name.replace("post_attention_layernorm", "mlp_norm").replace("self_attn.", "attn.")
    return re.sub(r"_proj\.", ".", name)


@pytest.fixture(scope="module")
def pair():
    """A random transformers Llama (fp32, peaked logits) and our Transformer with its weights."""
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hc).float().eval()
    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, norm_eps=1e-5,
                      max_seq_len=256, eos_token_id=None)
    ours = Transformer(cfg)
    ours.load_state_dict({hf_name(k): v for k, v in hf.state_dict().items()})
    return hf, ours.eval()


def ours_with(model: Transformer, **changes) -> Transformer:
    """Same weights, config changed."""
    other = Transformer(model.config.replace(**changes))
    other.load_state_dict(model.state_dict())
    return other.eval()


def random_model(cfg: ModelConfig, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def prompts_of(lengths, vocab=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def full_forward_greedy(model, prompt, n):
    """Reference decoding without a cache: argmax of a full forward at every step."""
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def window_model():
    return random_model(ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                    sliding_window=8, max_seq_len=128, init_std=0.2))


@pytest.fixture(scope="module")
def skip_model():
    return random_model(ModelConfig.from_preset("tiny-solar-pro", sliding_window=8, init_std=0.1))


# ----- greedy parity, batch invariance, cache ----------------------------------------------

@pytest.mark.parametrize("lengths", [[7], [5, 11, 1, 8]])
def test_greedy_matches_transformers(pair, lengths):
    hf, ours = pair
    prompts = prompts_of(lengths)
    got = generate(ours, prompts, max_new_tokens=32, **GREEDY)
    for prompt, c in zip(prompts, got):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0)
        assert c.tokens == ref[0, len(prompt):].tolist()
        assert c.finish_reason == "length" and len(c.tokens) == 32


@pytest.mark.parametrize("which", ["llama", "window", "skip"])
def test_batch_invariance_and_cache(pair, window_model, skip_model, which):
    model = {"llama": pair[1], "window": window_model, "skip": skip_model}[which]
    vocab = model.config.vocab_size
    prompts = prompts_of([3, 13, 20, 1], vocab=vocab, seed=2)   # longer than the window of 8
    batched = generate(model, prompts, max_new_tokens=16, **GREEDY)
    for prompt, c in zip(prompts, batched):
        assert c.tokens == generate(model, [prompt], max_new_tokens=16, **GREEDY)[0].tokens
        assert c.tokens == full_forward_greedy(model, prompt, 16)


def test_eval_mode_used_and_restored(skip_model):
    prompt = prompts_of([6], vocab=512)[0]
    expected = full_forward_greedy(skip_model, prompt, 8)   # eval mode: inference blend weight
    skip_model.train()
    try:
        assert generate(skip_model, [prompt], max_new_tokens=8, **GREEDY)[0].tokens == expected
        assert skip_model.training
    finally:
        skip_model.eval()
    assert not skip_model.training


# ----- logits processing ---------------------------------------------------------------------

@pytest.mark.parametrize("rp,temp,top_k,top_p", [
    (1.3, 0.7, 10, 0.9), (1.0, 1.0, 0, 0.5), (0.8, 1.5, 3, 1.0), (1.2, 1.0, 0, 0.0), (1.0, 2.0, 500, 0.97)])
def test_process_logits_matches_transformers(rp, temp, top_k, top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g) * 3
    logits[0, :5] = 2.0   # ties
    ids = torch.randint(0, V, (4, 12), generator=g)
    seen = torch.zeros(4, V, dtype=torch.bool).scatter_(1, ids, True)
    params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, repetition_penalty=rp)
    got = process_logits(logits.clone(), params, seen)

    ref = logits.clone()
    if rp != 1.0:
        ref = RepetitionPenaltyLogitsProcessor(rp)(ids, ref)
    if temp != 1.0:
        ref = TemperatureLogitsWarper(temp)(ids, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(ids, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(ids, ref)
    assert torch.equal(got, ref)
    assert torch.isfinite(got).any(-1).all()


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.zeros(2, 8)   # probabilities exactly 1/8: cumulative mass hits 0.5 exactly
    got = process_logits(logits, SamplingParams(top_p=0.5))
    assert torch.equal(got, TopPLogitsWarper(0.5)(None, logits.clone()))
    assert (got == 0).sum(-1).tolist() == [4, 4]


def test_process_logits_greedy_only_penalises():
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    seen = torch.tensor([[False, True, True, False]])
    out = process_logits(logits, SamplingParams(temperature=0, top_k=1, top_p=0.1, repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -4.0, 1.5, 0.5]]


def test_repetition_penalty_generation_matches_transformers(pair):
    hf, ours = pair
    for prompt in prompts_of([4, 9], seed=5):
        got = generate(ours, [prompt], max_new_tokens=20, repetition_penalty=1.5, **GREEDY)[0].tokens
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=20, repetition_penalty=1.5, eos_token_id=None,
                          pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()
    # batched + left-padded: padding slots are not penalised
    prompts = prompts_of([4, 9], seed=5)
    batched = generate(ours, prompts, max_new_tokens=20, repetition_penalty=1.5, **GREEDY)
    assert [c.tokens for c in batched] == [
        generate(ours, [p], max_new_tokens=20, repetition_penalty=1.5, **GREEDY)[0].tokens for p in prompts]


def constant_logits_model(values) -> Transformer:
    """Every position predicts the same logits `values`, whatever the input."""
    model = Transformer(ModelConfig(vocab_size=len(values), dim=8, n_layers=1, n_heads=2, ffn_dim=8))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        model.lm_head.weight[:, 0] = torch.tensor(values)
    return model.eval()


def test_repetition_penalty_ignores_padding():
    model = constant_logits_model([2.0, 1.5] + [0.0] * 6)
    # row 1 is left-padded with id 0 but does not contain 0: it must not be penalised
    got = generate(model, [[0, 3, 4], [5]], max_new_tokens=3, repetition_penalty=1.5, **GREEDY)
    assert [c.tokens for c in got] == [[1, 0, 0], [0, 1, 0]]


# ----- sampling ------------------------------------------------------------------------------

def test_seeded_sampling_reproducible():
    flat = random_model(ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2, ffn_dim=64, init_std=1e-4))
    prompts = prompts_of([3, 6])
    a = generate(flat, prompts, max_new_tokens=20, seed=7, stop_ids=())
    b = generate(flat, prompts, max_new_tokens=20, seed=7, stop_ids=())
    c = generate(flat, prompts, max_new_tokens=20, seed=8, stop_ids=())
    assert a == b
    assert [x.tokens for x in a] != [x.tokens for x in c]
    assert len(generate(flat, prompts, max_new_tokens=5, stop_ids=())[1].tokens) == 5   # seed None


def test_sampling_respects_top_k(pair):
    _, ours = pair
    prompts = prompts_of([4, 10], seed=6)
    outs = generate(ours, prompts, max_new_tokens=24, temperature=1.5, top_k=3, seed=0, stop_ids=())
    with torch.inference_mode():
        for prompt, c in zip(prompts, outs):
            logits = ours(torch.tensor([prompt + c.tokens]))[0, len(prompt) - 1:-1]
            allowed = logits.topk(3).indices
            assert all(t in allowed[i].tolist() for i, t in enumerate(c.tokens))


# ----- stopping and streaming ----------------------------------------------------------------

def first_new_at(seq, start):
    return next(j for j in range(start, len(seq)) if seq[j] not in seq[:j])


def test_stop_ids(pair):
    _, ours = pair
    prompts = prompts_of([5, 8], seed=4)
    ref = [c.tokens for c in generate(ours, prompts, max_new_tokens=24, **GREEDY)]
    j = first_new_at(ref[0], 4)
    eos = ref[0][j]
    assert eos not in ref[1]
    got = generate(ours, prompts, max_new_tokens=24, temperature=0, stop_ids=[eos])
    assert got[0] == Completion(ref[0][:j], "stop", eos)
    assert got[1] == Completion(ref[1], "length")     # the other row is unaffected
    # default stop ids come from the config (int or list)
    for eos_cfg in (eos, [V + 5, eos]):
        got = generate(ours_with(ours, eos_token_id=eos_cfg), prompts[:1], max_new_tokens=24, temperature=0)
        assert got[0] == Completion(ref[0][:j], "stop", eos)
    # stop at the very first token
    got = generate(ours, prompts[:1], max_new_tokens=24, temperature=0, stop_ids=[ref[0][0]])
    assert got[0] == Completion([], "stop", ref[0][0])


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_and_streaming(pair):
    _, ours = pair
    tok = CharTokenizer()
    prompts = prompts_of([5, 8], seed=4)
    ref = [c.tokens for c in generate(ours, prompts, max_new_tokens=24, **GREEDY)]
    text = tok.decode(ref[0])
    stop = text[6:9]
    k = next(k for k in range(len(ref[0]) + 1) if stop in tok.decode(ref[0][:k]))
    calls = []
    got = generate(ours, prompts, max_new_tokens=24, on_token=lambda r, t: calls.append((r, t)), tokenizer=tok,
                   stop_strings=[stop, "never!"], **GREEDY)
    assert got[0] == Completion(ref[0][:k], "stop", stop)
    if stop not in tok.decode(ref[1]):
        assert got[1] == Completion(ref[1], "length")
    for row in (0, 1):
        assert [t for r, t in calls if r == row] == got[row].tokens
    # calls come step by step: the i-th token of every live row before any (i+1)-th token
    counts, positions = {}, []
    for r, _ in calls:
        counts[r] = counts.get(r, 0) + 1
        positions.append(counts[r])
    assert positions == sorted(positions)


def test_streaming_matches_output_with_stop_ids(pair):
    _, ours = pair
    prompts = prompts_of([2, 7, 4], seed=9)
    ref = [c.tokens for c in generate(ours, prompts, max_new_tokens=16, **GREEDY)]
    calls = []
    got = generate(ours, prompts, max_new_tokens=16, temperature=0, stop_ids=[ref[1][3]],
                   on_token=lambda r, t: calls.append((r, t)))
    assert got[1].finish_reason == "stop" and len(got[1].tokens) <= 3
    for row in range(3):
        assert [t for r, t in calls if r == row] == got[row].tokens


# ----- errors and edge cases ------------------------------------------------------------------

def test_errors(pair):
    _, ours = pair   # max_seq_len 256
    with pytest.raises(GenerationError, match="empty"):
        generate(ours, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(GenerationError, match="300 tokens.*256"):
        generate(ours, [[1] * 300], max_new_tokens=4)
    with pytest.raises(GenerationError, match="256"):
        generate(ours, [[1] * 256], max_new_tokens=1)
    with pytest.raises(GenerationError, match="max_new_tokens=10.*256"):
        generate(ours, [[1] * 250], max_new_tokens=10)
    with pytest.raises(GenerationError, match="vocabulary"):
        generate(ours, [[1, V]], max_new_tokens=1)
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(ours, [[1, 2]], max_new_tokens=1, stop_strings=["x"])
    with pytest.raises(GenerationError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(GenerationError, match="top_p"):
        generate(ours, [[1]], top_p=1.5)
    assert len(generate(ours, [[1] * 250], max_new_tokens=6, **GREEDY)[0].tokens) == 6   # exactly fits


def test_edge_cases(pair):
    _, ours = pair
    assert generate(ours, [], max_new_tokens=4) == []
    assert generate(ours, [[1, 2]], max_new_tokens=0) == [Completion([], "length")]
    params = SamplingParams(max_new_tokens=3, temperature=0, stop_ids=())
    assert generate(ours, [[1, 2]], params)[0].tokens == generate(ours, [[1, 2]], max_new_tokens=3, **GREEDY)[0].tokens
    assert len(generate(ours, [[1, 2]], params, max_new_tokens=5)[0].tokens) == 5   # overrides win
