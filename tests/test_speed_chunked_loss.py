"""The chunked loss (token_logps -> label_logps) equals cross-entropy on the full [B, T, V] logits
(the reference: F.cross_entropy as the loop computed it before): loss and every gradient within
1e-6 in fp32, for next-token/SFT (-100 labels, packed documents), DPO, tied and untied output
layers, whatever the chunking (gradients: max abs difference <= 1e-6 x the tensor's largest
entry, as they are sums over all tokens); within bf16 rounding under bf16 autocast."""
import pytest
import torch
import torch.nn.functional as F

from lmfoundry.config import ModelConfig
from lmfoundry.model import Transformer
from lmfoundry.train import DPO, NextToken, objectives, token_logps


def model(tied=False, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny").replace(tie_embeddings=tied))


def batch(B=3, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (B, T + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :6] = -100                        # an SFT prompt
    labels[2, -4:] = -100                       # padding
    doc_ids = torch.tensor([[0] * 8 + [1] * (T - 8)] * B)
    return {"input_ids": ids[:, :-1], "labels": labels, "doc_ids": doc_ids}


def plain_logps(m, ids, labels, doc_ids=None):
    logits = m(ids, doc_ids=doc_ids)
    return -F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                            reduction="none").view(labels.shape)


def assert_grads_close(grads, ref, tol=1e-6):
    for name in ref:
        err = (grads[name] - ref[name]).abs().max()
        assert err <= tol * ref[name].abs().max(), f"{name}: {err}"


def loss_and_grads(m, fn):
    m.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [objectives.LOGITS_PER_CHUNK, 512 * 7, 1], ids=["default", "7rows", "1row"])
def test_chunked_next_token_loss_and_gradients_equal_full_logits(tied, chunk, monkeypatch):
    monkeypatch.setattr(objectives, "LOGITS_PER_CHUNK", chunk)
    m, b = model(tied), batch()
    ref_loss, ref_grads = loss_and_grads(m, lambda: -plain_logps(m, b["input_ids"], b["labels"], b["doc_ids"]).sum())
    loss, grads = loss_and_grads(m, lambda: NextToken()(m, b)[0])
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_label_logps_are_zero_and_gradient_free_where_labels_are_ignored():
    m, b = model(), batch()
    ref = plain_logps(m, b["input_ids"], b["labels"], b["doc_ids"])
    got = token_logps(m, b["input_ids"], b["labels"], b["doc_ids"])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert got.dtype == torch.float32 and (got[b["labels"] == -100] == 0).all()


def test_chunked_dpo_loss_and_gradients_equal_full_logits(monkeypatch):
    monkeypatch.setattr(objectives, "LOGITS_PER_CHUNK", 512 * 5)
    m = model()
    c, r = batch(seed=1), batch(seed=2)
    b = {"chosen_input_ids": c["input_ids"], "chosen_labels": c["labels"], "rejected_input_ids": r["input_ids"],
         "rejected_labels": r["labels"], "ref_chosen_logps": torch.tensor([-90.0, -80.0, -70.0]),
         "ref_rejected_logps": torch.tensor([-85.0, -95.0, -60.0])}
    dpo = DPO(beta=0.5)
    loss, grads = loss_and_grads(m, lambda: dpo(m, b)[0])
    monkeypatch.setattr(objectives, "token_logps", plain_logps)     # the full-logits reference
    ref_loss, ref_grads = loss_and_grads(m, lambda: dpo(m, b)[0])
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_chunked_loss_under_bf16_autocast_matches_full_logits_within_bf16_rounding(monkeypatch):
    monkeypatch.setattr(objectives, "LOGITS_PER_CHUNK", 512 * 9)
    m, b = model(), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(m, lambda: -plain_logps(m, b["input_ids"], b["labels"]).sum())
        loss, grads = loss_and_grads(m, lambda: -token_logps(m, b["input_ids"], b["labels"]).sum())
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=2e-3)
    assert_grads_close(grads, ref_grads, 2e-2)   # both round the same products to bf16
