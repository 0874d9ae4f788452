"""The streamed DCP writer (checkpoint/dcp_writer.py) against torch's HuggingFaceStorageWriter on
the same state: the same files, each readable by safetensors.safe_open with the same tensors and
the same `__metadata__` (DCP's sharding offsets, version, format), the same write results, and
torch's reader loads it back; it never builds a file in memory (safetensors.torch.save is not
called). Single process with plain tensors (bf16, int64, a non-contiguous view), and 2 gloo
processes saving FSDP2's DTensor shards (an uneven split too) and a plain tensor that only one
rank writes (the other writes no file, as with torch's writer)."""
import contextlib
import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from lmfoundry.checkpoint.dcp_writer import STREAMING, StreamingStorageWriter
from lmfoundry.checkpoint.sharded import load_state
from test_train_distributed import free_port, join, tiny

pytestmark = pytest.mark.skipif(not STREAMING, reason="this torch lacks the names the streamed writer needs")


def save_both(tensors, out):
    """Save `tensors` with torch's writer into out/torch and with ours into out/ours (where building
    a whole file in memory through safetensors.torch.save fails); each one's write results (the
    storage info per tensor) as JSON-able lists."""
    import safetensors.torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    single = not torch.distributed.is_initialized()
    results = {}
    for name, cls in (("torch", HuggingFaceStorageWriter), ("ours", StreamingStorageWriter)):
        forbid = mock.patch.object(safetensors.torch, "save", side_effect=AssertionError("the file built in memory"))
        writer = recording(cls)(str(out / name / "state"), save_distributed=True)
        with forbid if name == "ours" else contextlib.nullcontext():
            dcp.save(tensors, storage_writer=writer, no_dist=single)
        results[name] = sorted([r.index.fqn, list(r.index.offset or []), r.size_in_bytes, r.storage_data.relative_path,
                                r.storage_data.offset, r.storage_data.length]
                               for rank in getattr(writer, "results", []) for r in rank)
    return results


def recording(cls):
    """`cls` keeping the write results that every rank's write_data returned (on the coordinator)."""
    class Recording(cls):
        def finish(self, metadata, results):
            self.results = results
            return super().finish(metadata, results)
    return Recording


def assert_same_files(out):
    """out/ours/state holds out/torch/state's file names, each with the same metadata and tensors."""
    files = sorted(p.name for p in (out / "torch" / "state").iterdir())
    assert files and files == sorted(p.name for p in (out / "ours" / "state").iterdir())
    for name in files:
        with safe_open(str(out / "torch" / "state" / name), "pt") as a, \
                safe_open(str(out / "ours" / "state" / name), "pt") as b:
            assert decoded(a.metadata()) == decoded(b.metadata())
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                assert x.dtype == y.dtype and torch.equal(x, y), key


def decoded(metadata: dict) -> dict:
    return {k: json.loads(v) if k == "DCP_SHARDING_INFO" else v for k, v in metadata.items()}


def test_streamed_files_equal_torchs_and_never_build_the_file_in_memory(tmp_path):
    torch.manual_seed(0)
    wide = torch.randn(6, 10)
    tensors = {"model": {"w": torch.randn(7, 5), "h": torch.randn(3, 4).to(torch.bfloat16), "t": wide[:, ::3]},
               "optimizer": {"w.exp_avg": torch.randn(7, 5), "step": torch.tensor(12, dtype=torch.int64),
                             "empty": torch.zeros(0, 4)}}
    results = save_both(tensors, tmp_path)
    assert results["ours"] == results["torch"]
    assert_same_files(tmp_path)
    back = {k: {n: torch.empty_like(t) for n, t in v.items()} for k, v in tensors.items()}
    load_state(tmp_path / "ours", back)
    assert all(torch.equal(back[k][n], t) for k, v in tensors.items() for n, t in v.items())


def fsdp_worker(rank, world, port, out):
    """Save FSDP2's DTensor shards of a tiny model, and an unevenly split DTensor, with both writers."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    join(rank, world, port)
    try:
        model = tiny()
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        torch.manual_seed(1)
        odd = distribute_tensor(torch.randn(5, 3), model.embed.weight.device_mesh, [Shard(0)])
        results = save_both({"model": model.state_dict(), "odd": odd}, Path(out))
        save_both({"plain": torch.arange(6.0)}, Path(out) / "plain")    # written once: one rank has nothing
        if rank == 0:
            (Path(out) / "results.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_fsdp_shards_stream_into_the_files_torch_writes(tmp_path):
    mp.spawn(fsdp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ours"] == results["torch"]
    assert len({r[3] for r in results["ours"]}) == 2                  # a file per rank
    assert_same_files(tmp_path)
    assert_same_files(tmp_path / "plain")
    full = {n: torch.empty_like(t) for n, t in tiny().state_dict().items()}
    odd = torch.empty(5, 3)
    load_state(tmp_path / "ours", {"model": full, "odd": odd})
    torch.manual_seed(1)
    assert torch.equal(odd, torch.randn(5, 3))
    assert all(torch.equal(full[n], t) for n, t in tiny().state_dict().items())
