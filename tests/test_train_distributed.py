"""Data-parallel training on 2 CPU processes (gloo) equals one process with the same global
batch: DDP, and FSDP2 (fully_shard), both with gradient accumulation; FSDP also resumes."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lmfoundry.config import ModelConfig
from lmfoundry.model import Transformer
from lmfoundry.train import ListBatches, NextToken, TrainConfig, train

STEPS, ACCUM, ROWS = 4, 2, 4          # global micro-batch of 4 rows = 2 ranks x 2 rows


def global_batches(n=6, T=32):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(20, 60, (ROWS, T + 1), generator=g)
        ids[:, 1::2] = ids[:, 0::2][:, :ids[:, 1::2].shape[1]] + 1     # half the targets are learnable
        labels = ids[:, 1:].clone()
        labels[0, :7] = -100                                            # ranks see different label counts
        out.append({"input_ids": ids[:, :-1], "labels": labels})
    return out


def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny"))


def config(**kw):
    return TrainConfig(**{"steps": STEPS, "grad_accum": ACCUM, "lr": 3e-3, "warmup": 1, "progress": False, **kw})


class FailAt(NextToken):
    """Stands in for a crash (a preempted job) on forward number `calls + 1`."""

    def __init__(self, calls):
        self.calls, self.seen = calls, 0

    def __call__(self, model, batch):
        self.seen += 1
        if self.seen > self.calls:
            raise RuntimeError("simulated crash")
        return super().__call__(model, batch)


def join(rank, world, port) -> list[dict]:
    """Join a gloo group of `world` processes as `rank`; this rank's rows of the global batches."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    return [{k: v[rows] for k, v in b.items()} for b in global_batches()]


def worker(rank, world, port, out, fsdp, make=tiny, trainable=None, checkpointing=False):
    """One rank: train `make()` (what `trainable` says is trained) on its half of the global batch;
    with FSDP also crash and resume (with activation checkpointing if asked)."""
    mine = join(rank, world, port)
    try:
        result = train(make(), ListBatches(mine), NextToken(), config(fsdp=fsdp), f"{out}/run", trainable=trainable)
        losses = {"full": result.losses}
        if fsdp:    # crash during step 3 (checkpoint at 2), then resume
            cut = config(fsdp=True, save_every=2, activation_checkpointing=checkpointing)
            try:
                train(make(), ListBatches(mine), FailAt(2 * ACCUM), cut, f"{out}/cut", trainable=trainable)
            except RuntimeError:
                pass
            resumed = train(make(), ListBatches(mine), NextToken(), cut, f"{out}/cut", resume=True,
                            trainable=trainable)
            losses["resumed"] = resumed.losses
        if rank == 0:
            with open(f"{out}/losses.json", "w") as f:
                json.dump(losses, f)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = train(tiny(), ListBatches(global_batches()), NextToken(), config(), out / "run")
    return result.losses, out / "run"


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, single, fsdp):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), fsdp), nprocs=2, join=True)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["full"] == pytest.approx(single[0], abs=1e-5)
    from safetensors.torch import load_file
    a, b = load_file(single[1] / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    for name in a:   # Adam's m / sqrt(v) turns rounding noise in near-zero gradients into lr-sized steps
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0)
    if fsdp:
        assert losses["resumed"] == pytest.approx(single[0][2:], abs=1e-5)
        state = json.loads((tmp_path / "cut" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
        assert state["world_size"] == 2


def test_torchrun_cli_trains_with_fsdp_and_writes_one_checkpoint(demo_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m lmfoundry pretrain --fsdp ...` end to end on CPU."""
    import subprocess
    import sys

    from lmfoundry.checkpoint import load_model
    from lmfoundry.demo import CORPUS
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS.splitlines() * 4), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lmfoundry", "pretrain", "--model", "tiny", "--tokenizer", str(demo_dir), "--data",
           str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "out"), "--tokenized", str(tmp_path / "tok"),
           "--steps", "3", "--seq-len", "64", "--batch-size", "2", "--fsdp", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["tokens"] == 3 * 2 * 2 * 64            # steps x ranks x rows x seq_len
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    load_model(tmp_path / "out")
