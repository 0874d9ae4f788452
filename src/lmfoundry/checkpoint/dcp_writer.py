"""torch.distributed.checkpoint's safetensors writer, streamed: a tensor in hand, never the file.

torch's HuggingFaceStorageWriter collects every tensor of a rank's file and hands them to
safetensors.torch.save, which builds the whole file in memory (and copies it into a Python bytes
object) before writing it: twice the file in host RAM, 24 bytes per parameter for a full
fine-tune's fp32 weights and AdamW moments. StreamingStorageWriter writes the same file the way
checkpoint/io.py writes model shards: the header first (the shapes and dtypes are in the save
plan), then each tensor's bytes as the planner resolves it, with the `__metadata__` entries
torch's reader needs (each tensor's offsets in the full tensor, the DCP version, the format).

It leans on torch's private names (_hf_utils' metadata keys, filesystem's _StorageInfo); where
they are missing (another torch), `storage_writer` returns torch's own writer.
"""
from __future__ import annotations

import json
import os
from io import UnsupportedOperation

from .io import ST_NAMES, safetensors_header, write_tensor_bytes

try:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint._hf_utils import (CUSTOM_METADATA_KEY, DCP_VERSION_KEY, FORMAT_KEY,
                                                        FORMAT_VALUE, HF_DCP_VERSION, SAVED_OFFSETS_KEY,
                                                        _gen_file_name)
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future
    STREAMING = hasattr(HuggingFaceStorageWriter, "_split_by_storage_plan")
except ImportError:                                        # an older or newer torch: its own writer
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    STREAMING = False


def storage_writer(path: str):
    """The writer save_state hands dcp.save: one safetensors file per rank, streamed when it can be."""
    cls = StreamingStorageWriter if STREAMING else HuggingFaceStorageWriter
    return cls(path, save_distributed=True)


class StreamingStorageWriter(HuggingFaceStorageWriter):
    """HuggingFaceStorageWriter whose files are written tensor by tensor (same files, same results)."""

    def write_data(self, plan, planner):
        """One file per storage index, named as torch names it; torch's writer where any item is not
        a plain tensor of a safetensors dtype."""
        if not plan.items or not streamable(self, plan.items):       # nothing to write: no file, as torch
            return super().write_data(plan, planner)
        mapping = plan.storage_data.get("fqn_to_index_mapping")
        last = max(mapping.values()) if mapping else 1
        results = []
        for index, items in self._split_by_storage_plan(mapping, plan.items).items():
            name = _gen_file_name(index, last, plan.storage_data.get("shard_index"))
            results += self._write_file(self.fs.concat_path(self.path, name), name, items, planner)
        future = Future()
        future.set_result(results)
        return future

    def _write_file(self, path, storage_key: str, items: list, planner) -> list:
        """One rank's file: the header from the plan's shapes, then each tensor's bytes. Tensors are
        laid out as safetensors.torch.save lays them out (wider dtypes first, then by name), which
        keeps every tensor aligned to its element size."""
        offsets = {w.index.fqn: {SAVED_OFFSETS_KEY: list(w.tensor_data.chunk.offsets)} for w in items}
        items = sorted(items, key=lambda w: (-w.tensor_data.properties.dtype.itemsize, w.index.fqn))
        specs = [(w.index.fqn, tuple(w.tensor_data.chunk.sizes), w.tensor_data.properties.dtype) for w in items]
        header, _ = safetensors_header(specs, {CUSTOM_METADATA_KEY: json.dumps(offsets),
                                               DCP_VERSION_KEY: str(HF_DCP_VERSION), FORMAT_KEY: FORMAT_VALUE})
        results = []
        with self.fs.create_stream(path, "wb") as stream:
            stream.write(header)
            for item, (name, shape, dtype) in zip(items, specs):
                tensor = planner.resolve_data(item).detach().cpu()
                if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    raise AssertionError(f"{name}: the plan says {list(shape)} {dtype}, the state holds "
                                         f"{list(tensor.shape)} {tensor.dtype}")
                write_tensor_bytes(stream, tensor)
                size = tensor.numel() * tensor.element_size()
                # torch's writer records offset 0 (it writes nothing until the whole file is built)
                results.append(WriteResult(index=item.index, size_in_bytes=size,
                                           storage_data=_StorageInfo(storage_key, 0, size)))
                del tensor
            if self.sync_files:
                stream.flush()
                try:
                    os.fsync(stream.fileno())
                except (AttributeError, UnsupportedOperation):
                    os.sync()
        return results


def streamable(writer, items: list) -> bool:
    """Whether every item is a tensor with a safetensors dtype and no stream transforms are set up
    (byte payloads and extensions go through torch's writer)."""
    if getattr(writer.transforms, "extensions", None):
        return False
    return all(w.type != WriteItemType.BYTE_IO and w.tensor_data is not None
               and w.tensor_data.properties.dtype in ST_NAMES for w in items)


__all__ = ["STREAMING", "StreamingStorageWriter", "storage_writer", "streamable"]
