"""LoRA (with DoRA) on 2 CPU processes (gloo), through test_train_distributed's worker: DDP and FSDP2
with gradient accumulation give the losses and the adapters of one process with the same global
batch, and FSDP2 with activation checkpointing resumes exactly."""
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


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = train(tiny_lora(), ListBatches(global_batches()), NextToken(), config(), out / "run", trainable=LoRA())
    return result.losses, out / "run"


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_lora_on_two_processes_matches_one_process(tmp_path, single, fsdp):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), fsdp, tiny_lora, LoRA(), True), nprocs=2, join=True)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["full"] == pytest.approx(single[0], abs=1e-5)
    a = load_file(single[1] / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0)
    if fsdp:
        assert losses["resumed"] == pytest.approx(single[0][2:], abs=1e-5)
        assert not (tmp_path / "cut" / "model.safetensors").exists()
