"""FlexAttention block masks compute what the dense boolean masks compute (the reference):
packed documents, sliding windows and per-row KV-cache masks give equal outputs (fp32, max abs
diff <= 1e-5) and allow exactly the same (query, key) pairs, so gradients are equal too. CPU
runs FlexAttention's eager forward (it has no CPU backward: a CPU forward recording gradients
takes the dense path); the GPU tests (compiled kernel, gradients, memory linear in T) are
skipped without CUDA."""
import pytest
import torch

from lmfoundry.config import ModelConfig
from lmfoundry.generate import decode_step, prefill
from lmfoundry.model import Transformer, flex_available

pytestmark = [pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]
CASES = [("tiny", None), ("tiny-mistral", 16), ("tiny", 7)]
IDS = ["documents", "documents+window16", "documents+window7"]


def model(preset="tiny", device="cpu", **overrides):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset).replace(**overrides)).to(device)


def packed(T=48, vocab=512, device="cpu"):
    tokens = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 5 + [1] * 20 + [2] * (T - 25), [0] * T])
    return tokens.to(device), doc_ids.to(device)


def dense_of(block_mask, B, T, S):
    from torch.nn.attention.flex_attention import create_mask
    return create_mask(block_mask.mask_mod, B, 1, T, S, device="cpu")


@pytest.mark.parametrize("preset,window", CASES, ids=IDS)
def test_flex_equals_dense_for_packed_documents_and_windows(preset, window):
    m = model(preset, sliding_window=window)
    tokens, doc_ids = packed()
    with torch.no_grad():
        m.attn_impl = "dense"
        ref = m(tokens, doc_ids=doc_ids)
        m.attn_impl = "flex"
        out = m(tokens, doc_ids=doc_ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset,window", CASES, ids=IDS)
@pytest.mark.parametrize("docs", [True, False], ids=["packed", "unpacked"])
def test_flex_block_mask_allows_exactly_the_dense_masks_pairs(preset, window, docs):
    """Same pairs, same softmax: the gradients of both paths are those of the same function."""
    m = model(preset, sliding_window=window)
    doc_ids = packed()[1] if docs else None
    dense, block = m._mask(48, doc_ids, "cpu"), m._mask(48, doc_ids, "cpu", flex=True)
    if dense is None:                  # plain causal: no mask on either path
        assert block is None
        return
    flex = dense_of(block, 2 if docs else 1, 48, 48)
    assert torch.equal(flex, dense.expand_as(flex))


def test_training_forward_on_cpu_takes_the_dense_path_and_matches_it():
    m = model("tiny-mistral")
    tokens, doc_ids = packed()
    grads = []
    for impl in ("dense", "flex"):
        m.attn_impl = impl
        m.zero_grad()
        m(tokens, doc_ids=doc_ids).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def decode(m, impl, prompts, steps=6):
    """Right-padded prefill of rows of different lengths, then decode steps: every row's logits."""
    m.attn_impl = impl
    cache = m.new_cache(len(prompts), 64)
    out = [prefill(m, cache, prompts)]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        out.append(decode_step(m, cache, torch.randint(0, 512, (len(prompts),), generator=g)))
    return torch.stack(out)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mistral"], ids=["causal", "window16"])
def test_flex_equals_dense_for_per_row_cache_masks(preset):
    m = model(preset).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 21, 12)]
    with torch.no_grad():
        ref, out = decode(m, "dense", prompts), decode(m, "flex", prompts)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_auto_is_dense_on_cpu_and_unknown_impl_is_refused():
    m = model()
    with torch.no_grad():
        assert m._use_flex("cpu") is False and m._use_flex("cuda") is True
    m.attn_impl = "fast"
    with pytest.raises(ValueError, match="attn_impl must be one of auto, dense, flex"):
        m(torch.zeros(1, 4, dtype=torch.long))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("preset,window", CASES, ids=IDS)
def test_gpu_flex_outputs_and_gradients_equal_dense(preset, window):
    m = model(preset, device="cuda", sliding_window=window)
    tokens, doc_ids = packed(device="cuda")
    outs = []
    for impl in ("dense", "flex"):
        m.attn_impl = impl
        m.zero_grad()
        logits = m(tokens, doc_ids=doc_ids)
        logits.square().mean().backward()
        outs.append((logits.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=0)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


@cuda
def test_gpu_packed_training_memory_grows_linearly_in_sequence_length():
    m = model(device="cuda", max_seq_len=16384)

    def peak(T):
        tokens = torch.randint(0, 512, (1, T), device="cuda")
        doc_ids = (torch.arange(T, device="cuda") // 1000)[None]
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        m(tokens, doc_ids=doc_ids).float().mean().backward()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(4096), peak(16384)
    assert large < 6 * small           # 4x the tokens: ~4x memory (a dense mask alone would be 16x)
