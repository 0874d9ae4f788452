"""LoRA (with DoRA) and QLoRA on 2 CPU processes (gloo), through test_train_distributed's worker: DDP
and FSDP2 with gradient accumulation give the losses and the adapters of one process with the same
global batch, and FSDP2 with activation checkpointing resumes exactly. QLoRA's model has weights of
at least two NF4 scaler blocks per rank (FSDP2 shards torchao's NF4 tensors by their blocks)."""
import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmfoundry.config import ModelConfig
from lmfoundry.lora import LoraConfig, apply_lora
from lmfoundry.model import Transformer
from lmfoundry.train import ListBatches, NextToken, train
from lmfoundry.train.trainable import LoRA
from test_train_distributed import config, free_port, global_batches, worker


def tiny_lora():
    torch.manual_seed(0)
    return apply_lora(Transformer(ModelConfig.from_preset("tiny")), LoraConfig(rank=4, alpha=8, dora=True))


def small_qlora():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=256)
    return apply_lora(Transformer(cfg), LoraConfig(rank=4, qlora=True))


MODELS = {"lora": (tiny_lora, 1e-5), "qlora": (small_qlora, 1e-3)}   # (factory, loss tolerance)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    runs = {}
    for name, (make, _) in MODELS.items():
        out = tmp_path_factory.mktemp(f"single-{name}")
        result = train(make(), ListBatches(global_batches()), NextToken(), config(), out / "run", trainable=LoRA())
        runs[name] = result.losses, out / "run"
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_lora_on_two_processes_matches_one_process(tmp_path, single, fsdp, kind):
    make, tol = MODELS[kind]
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), fsdp, make, LoRA(), True), nprocs=2, join=True)
    losses = json.loads((tmp_path / "losses.json").read_text())
    one, out = single[kind]
    assert losses["full"] == pytest.approx(one, abs=tol)
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=10 * tol, rtol=0)
    if fsdp:
        assert losses["resumed"] == pytest.approx(losses["full"][2:], abs=1e-6)     # the resume is exact
        assert not (tmp_path / "cut" / "model.safetensors").exists()
