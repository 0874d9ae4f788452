"""bf16 on CPU: training under bf16 autocast with fp32 master weights and AdamW, and what `auto`
picks. References: transformers' Llama under the same autocast (logits), and our own fp32 run
(losses). Tolerances: bf16 has an 8-bit mantissa (relative rounding 2^-9 = 0.2%), so logits agree
within 2% of their range and a few training losses within 2% of fp32's."""
import json

import pytest
import torch

from lmfoundry.checkpoint import load_model
from lmfoundry.checkpoint.sharded import stored_tensors
from lmfoundry.config import ModelConfig
from lmfoundry.model import Transformer
from lmfoundry.train import ListBatches, NextToken, TrainConfig, train


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny"))


def batches(n=4, B=4, T=32):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 512, (B, T + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def run(tmp_path, name, **kw):
    cfg = TrainConfig(**{"steps": 4, "lr": 1e-3, "progress": False, "device": "cpu", **kw})
    return train(tiny(), ListBatches(batches()), NextToken(), cfg, tmp_path / name)


def test_bf16_logits_match_transformers_under_the_same_autocast(llama_dir):
    path, hf = llama_dir
    ours = load_model(path)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(tokens).float(), hf(tokens).logits.float()
    assert (a - b).abs().max() <= 0.02 * (b.max() - b.min())


def test_bf16_training_keeps_fp32_master_weights_and_tracks_fp32_losses(tmp_path):
    fp32 = run(tmp_path, "fp32", dtype="float32")
    bf16 = run(tmp_path, "bf16", dtype="bf16")
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)
    assert bf16.losses != fp32.losses                          # it really ran in bf16
    stored = stored_tensors(tmp_path / "bf16" / "checkpoints" / "step-00000004")    # weights and AdamW moments
    assert {dtype for _, dtype in stored.values()} == {torch.float32} and "optimizer.embed.weight.exp_avg" in stored


@pytest.mark.parametrize("flag,expect", [("1", "bf16 autocast"), ("0", "fp32")])
def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units_and_says_so(tmp_path, monkeypatch, capsys, flag, expect):
    monkeypatch.setenv("LMFOUNDRY_CPU_BF16", flag)
    result = run(tmp_path, "auto", steps=1, progress=True)
    out = capsys.readouterr().out
    assert f"precision: {expect}" in out and f"LMFOUNDRY_CPU_BF16={flag}" in out
    pinned = run(tmp_path, "pinned", steps=1, dtype="bf16" if flag == "1" else "fp32")
    assert result.losses == pinned.losses
    state = json.loads((tmp_path / "auto" / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert state["config"]["dtype"] == "auto"
