"""Scoring primitives against transformers' log-softmax and across batch compositions."""
import torch

from conftest import hf_llama, random_tokens
from lmfoundry.checkpoint import load_model
from lmfoundry.score import loglikelihood, token_logprobs


def test_token_logprobs_match_transformers(tmp_path):
    ref = hf_llama()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    seq = random_tokens(1, 30)[0].tolist()
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([seq])).logits[0, :-1].float(), -1)
    want = logp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    (got,) = token_logprobs(model, [seq])
    assert (got["logprobs"] - want).abs().max() <= 1e-4
    assert torch.equal(got["greedy"], logp.argmax(-1) == torch.tensor(seq[1:]))


def test_loglikelihood_is_batch_invariant(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    reqs = [(random_tokens(1, n, seed=n)[0].tolist(), random_tokens(1, 5, seed=100 + n)[0].tolist())
            for n in (3, 17, 9, 40, 1, 25)]
    alone = [loglikelihood(model, [r], batch_size=1)[0] for r in reqs]
    together = loglikelihood(model, reqs, batch_size=4)
    for (a, ga), (b, gb) in zip(alone, together):
        assert abs(a - b) <= 1e-5 and ga == gb


def test_greedy_flag_agrees_with_generation(tmp_path):
    from lmfoundry.generate import generate
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ctx = random_tokens(1, 8)[0].tolist()
    (c,) = generate(model, [ctx], max_new_tokens=6, temperature=0.0, stop_ids=())
    assert loglikelihood(model, [(ctx, c.tokens)])[0][1] is True
    other = [(t + 1) % 128 for t in c.tokens]
    assert loglikelihood(model, [(ctx, other)])[0][1] is False
