"""Sharded distributed checkpoints (torch.distributed.checkpoint, safetensors): every rank writes
its own shards; a run saved by 2 processes resumes on 2 or on 1 with the same global batch and
continues exactly as an uninterrupted run (losses within 1e-5); the Hugging Face export streamed
from the shards is byte-identical to the full-state export (the reference: gather everything,
write_checkpoint); kill -9 during a save leaves the last good checkpoint the newest."""
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

from lmfoundry.checkpoint import load_model
from lmfoundry.checkpoint.sharded import export_checkpoint, read_tensor, stored_tensors
from lmfoundry.cli import main
from lmfoundry.train import ListBatches, NextToken, TrainConfig, WholeModel, latest_checkpoint, train
from test_train_distributed import ACCUM, FailAt, free_port, global_batches, join, tiny

STEPS = 6


def config(**kw):
    return TrainConfig(**{"steps": STEPS, "grad_accum": ACCUM, "lr": 3e-3, "warmup": 1, "progress": False,
                          "save_every": 2, "keep_checkpoints": 0, **kw})


def same_files(a, b, besides=()):
    """Directory a holds exactly b's files with the same bytes (and the names in `besides`)."""
    names = sorted(p.name for p in b.iterdir() if p.is_file())
    assert sorted(p.name for p in a.iterdir() if p.is_file() and p.name not in besides) == names
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def worker(rank, world, port, out, tokenizer_dir):
    mine = join(rank, world, port)
    try:
        kw = dict(tokenizer_from=tokenizer_dir, format="mistral")
        try:        # crash during step 5: the newest checkpoint is step 4
            train(tiny(), ListBatches(mine), FailAt(4 * ACCUM), config(fsdp=True), f"{out}/cut", **kw)
        except RuntimeError:
            pass
        if rank == 0:
            shutil.copytree(f"{out}/cut", f"{out}/cut-for-one")
        torch.distributed.barrier()
        model = tiny()
        resumed = train(model, ListBatches(mine), NextToken(), config(fsdp=True), f"{out}/cut", resume=True, **kw)
        WholeModel().export(model, f"{out}/full-state", format="mistral", dtype=torch.float32,
                            tokenizer_from=tokenizer_dir)     # the reference: gathered, then written
        if rank == 0:
            with open(f"{out}/losses.json", "w") as f:
                json.dump(resumed.losses, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp("dcp")
    single = train(tiny(), ListBatches(global_batches()), NextToken(), config(), out / "single",
                   tokenizer_from=demo_dir, format="mistral")
    mp.spawn(worker, args=(2, free_port(), str(out), str(demo_dir)), nprocs=2, join=True)
    return out, single.losses


def test_two_process_checkpoint_resumes_on_two_processes_like_an_uninterrupted_run(runs):
    out, single = runs
    assert json.loads((out / "losses.json").read_text()) == pytest.approx(single[4:], abs=1e-5)


def test_two_process_checkpoint_resumes_on_one_process_with_the_same_global_batch(runs, demo_dir):
    out, single = runs
    resumed = train(tiny(), ListBatches(global_batches()), NextToken(), config(), out / "cut-for-one", resume=True,
                    tokenizer_from=demo_dir, format="mistral")
    assert resumed.resumed_from == 4 and resumed.losses == pytest.approx(single[4:], abs=1e-5)


def test_each_rank_writes_only_its_own_shards(runs):
    state = runs[0] / "cut" / "checkpoints" / "step-00000004" / "state"
    files = sorted(p.name for p in state.iterdir())
    assert files == ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    full = sum(t.numel() * 4 for t in tiny().state_dict().values())
    for f in files:      # each holds about half of the weights and of the two AdamW moments
        assert (state / f).stat().st_size < 0.75 * 3 * full
    assert json.loads((state.parent / "trainer_state.json").read_text())["world_size"] == 2


def test_streamed_export_is_byte_identical_to_the_full_state_export(runs, tmp_path, capsys):
    out = runs[0]
    assert same_files(out / "cut", out / "full-state", besides=["metrics.jsonl"])   # the loop's final export
    step = latest_checkpoint(out / "cut")
    assert main(["export-checkpoint", str(step), str(tmp_path / "exported")]) == 0
    assert same_files(tmp_path / "exported", out / "full-state")
    assert "wrote" in capsys.readouterr().out


def test_a_step_directory_loads_as_a_model_and_its_tensors_are_readable(runs):
    step = latest_checkpoint(runs[0] / "cut")
    model, final = load_model(step), load_model(runs[0] / "full-state")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), final.state_dict().values()))
    assert torch.equal(read_tensor(step, "model.norm.weight"), final.norm.weight)
    assert stored_tensors(step)["optimizer.embed.weight.exp_avg"][0] == list(final.embed.weight.shape)


def test_export_of_something_else_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["export-checkpoint", str(tmp_path / "x"), str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert "not a training checkpoint" in err and err.count("\n") == 1 and not (tmp_path / "y").exists()


KILLER = """
import os, signal, sys, torch
import lmfoundry.train.state as state
sys.path.insert(0, {tests!r})
from test_train_distributed import global_batches, tiny
from lmfoundry.train import ListBatches, NextToken, TrainConfig, train
real, saves = state.save_state, []
def dying(directory, tensors):
    real(directory, tensors)                  # the shards are on disk, trainer_state.json is not yet
    saves.append(directory)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
state.save_state = dying
train(tiny(), ListBatches(global_batches()), NextToken(), TrainConfig(steps=6, lr=3e-3, warmup=1, save_every=2,
      progress=False), {out!r})
"""


def test_kill_9_during_a_save_leaves_the_last_good_checkpoint(tmp_path):
    script = textwrap.dedent(KILLER).format(tests=os.path.dirname(__file__), out=str(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / ".step-00000004.partial" / "state").is_dir()       # the interrupted save, never renamed
    assert latest_checkpoint(tmp_path / "run") == ckpts / "step-00000002"
    cfg = TrainConfig(steps=6, lr=3e-3, warmup=1, save_every=2, progress=False)
    whole = train(tiny(), ListBatches(global_batches()), NextToken(), cfg, tmp_path / "whole")
    resumed = train(tiny(), ListBatches(global_batches()), NextToken(), cfg, tmp_path / "run", resume=True)
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses[2:]
    assert not (ckpts / ".step-00000004.partial").exists()             # the next save replaced it
