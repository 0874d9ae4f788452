"""LoRA under torchrun semantics on 2 CPU processes (gloo): DDP and FSDP2 with gradient accumulation
give the losses and adapters of one process with the same global batch; FSDP2 (with activation
checkpointing) resumes exactly; the base stays bit-identical and the export is one PEFT adapter."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmfoundry.config import ModelConfig
from lmfoundry.lora import LoraConfig, apply_lora
from lmfoundry.model import Transformer
from lmfoundry.train import ListBatches, NextToken, TrainConfig, train
from lmfoundry.train.trainable import LoRA
from test_train_distributed import ACCUM, ROWS, STEPS, FailAt, free_port, global_batches

LORA = LoraConfig(rank=4, alpha=8, dora=True)


def tiny_lora():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    return apply_lora(model, LORA)


def config(**kw):
    return TrainConfig(**{"steps": STEPS, "grad_accum": ACCUM, "lr": 1e-2, "warmup": 1, "progress": False, **kw})


def worker(rank, world, port, out, fsdp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        mine = [{k: v[rows] for k, v in b.items()} for b in global_batches()]
        model = tiny_lora()
        base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        result = train(model, ListBatches(mine), NextToken(), config(fsdp=fsdp), f"{out}/run", trainable=LoRA())
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in model.named_parameters()}
        unchanged = all(torch.equal(full[n], base[n]) for n in base)
        losses = {"full": result.losses, "base_unchanged": unchanged}
        if fsdp:    # crash during step 3 (checkpoint at 2), then resume, with activation checkpointing
            kw = dict(fsdp=True, save_every=2, activation_checkpointing=True)
            try:
                train(tiny_lora(), ListBatches(mine), FailAt(2 * ACCUM), config(**kw), f"{out}/cut", trainable=LoRA())
            except RuntimeError:
                pass
            resumed = train(tiny_lora(), ListBatches(mine), NextToken(), config(**kw), f"{out}/cut", resume=True,
                            trainable=LoRA())
            losses["resumed"] = resumed.losses
        if rank == 0:
            with open(f"{out}/losses.json", "w") as f:
                json.dump(losses, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = train(tiny_lora(), ListBatches(global_batches()), NextToken(), config(), out / "run", trainable=LoRA())
    return result.losses, out / "run"


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_lora_on_two_processes_matches_one_process(tmp_path, single, fsdp):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), fsdp), nprocs=2, join=True)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["full"] == pytest.approx(single[0], abs=1e-5)
    assert losses["base_unchanged"]
    a = load_file(single[1] / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0)
    if fsdp:
        assert losses["resumed"] == pytest.approx(single[0][2:], abs=1e-5)
