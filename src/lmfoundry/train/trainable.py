"""What is trained: the weights the optimizer sees, what a checkpoint stores, what is exported.

The trainable protocol (train(..., trainable=...); any object with these works):

    parameters(model) -> list[Parameter]   what the optimizer steps; the loop freezes every
                                           other parameter (requires_grad False), clips and
                                           decays only these
    state_dict(model) -> {name: Tensor}    what a periodic checkpoint stores and a resume
    load_state_dict(model, tensors)        restores (full tensors on CPU; state_dict is collective
                                           under FSDP, so every rank calls it). When the names are
                                           exactly the model's canonical weights, the checkpoint is
                                           a loadable Hugging Face directory; otherwise the tensors
                                           go to trainable.safetensors beside it
    export(model, path, format=, dtype=, tokenizer_from=)
                                           the final artifact, written to `path` by rank 0 (called
                                           on every rank: gathering is collective)
  optional:
    sharded_state_dict(model) -> {name: Tensor} | None
                                           the same state as the model holds it (DTensor shards
                                           under FSDP2), sharing its storage: checkpoints are then
                                           written by every rank with torch.distributed.checkpoint
                                           and loaded in place, resharded to any number of
                                           processes; without it (or None) state_dict()'s full
                                           tensors are kept whole (right for small adapters)

WholeModel is every weight, exported as a Hugging Face checkpoint in the model's format (the
loop streams that export from the last sharded checkpoint; export() here gathers the full state
and is the reference the tests compare it with). Adapters (only the adapters trained and saved) and heads are other
implementations of the same four methods; the loop does not change for them.
"""
from __future__ import annotations

import torch

from ..checkpoint import write_checkpoint
from . import distributed as D


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor by canonical name (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, tensors: dict[str, torch.Tensor], strict: bool = True):
    """Put full tensors (fp32 master weights) back into a model, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    weights = {name: t.to(torch.float32) for name, t in tensors.items()}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=strict))


class WholeModel:
    """Every weight that requires a gradient (all of them, unless the caller froze some)."""

    def parameters(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        return full_state_dict(model)

    def sharded_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        """Every weight, sharded as the model holds it; None for a subclass that redefines
        state_dict (its own selection is then what checkpoints keep)."""
        if type(self).state_dict is not WholeModel.state_dict:
            return None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(model)

    def load_state_dict(self, model, tensors: dict[str, torch.Tensor]):
        load_full_state_dict(model, tensors)

    def export(self, model, path, format=None, dtype=None, tokenizer_from=None):
        weights = full_state_dict(model)
        if D.rank_and_world()[0] == 0:
            write_checkpoint(path, model.config, weights, format=format, dtype=dtype, tokenizer_from=tokenizer_from,
                             overwrite=True)
