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
  optional, called when present:
    sharded_state_dict(model) -> {name: Tensor} | None
                                           the same state as the model holds it (DTensor shards
                                           under FSDP2), sharing its storage: checkpoints are then
                                           written by every rank with torch.distributed.checkpoint
                                           and loaded in place, resharded to any number of
                                           processes; without it (or None) state_dict()'s full
                                           tensors are kept whole (right for small adapters)
    place(model, device, dtype)            put the model on the training device before wrapping
                                           (default: WholeModel's, fp32 master weights; dtype is
                                           the autocast dtype or None)
    reference(model) -> context manager    inside it the model computes a reference policy (LoRA:
                                           the base, adapters off); DPO uses it, so a resumed run
                                           can still compute reference log-probs

WholeModel is every weight, exported as a Hugging Face checkpoint in the model's format (the
loop streams that export from the last sharded checkpoint; export() here gathers the full state
and is the reference the tests compare it with). LoRA trains and saves only the adapters
lora.apply_lora() put on the model and exports them as a PEFT adapter directory. Heads are other
implementations of the same methods; the loop does not change for them.
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

    def place(self, model, device, dtype=None):
        model.to(device=device, dtype=torch.float32)

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


class LoRA:
    """The adapters lora.apply_lora() put on the model (the base stays frozen and is never copied):
    checkpoints hold the adapters and their AdamW moments only, the export is a PEFT adapter
    directory (adapter_config.json naming `base_model`, adapter_model.safetensors in fp32)."""

    def __init__(self, base_model: str | None = None):
        self.base_model = base_model

    def named_parameters(self, model) -> dict[str, torch.nn.Parameter]:
        """What is trained, by the model's names (a subclass adds whole modules: a reward head)."""
        from ..lora import adapter_parameters
        return adapter_parameters(model)

    def parameters(self, model) -> list[torch.nn.Parameter]:
        return list(self.named_parameters(model).values())

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        """Trained tensors by the model's names, full and on CPU (collective under FSDP)."""
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", torch.float32)
                for name, p in self.named_parameters(model).items()}

    def load_state_dict(self, model, tensors: dict[str, torch.Tensor]):
        load_full_state_dict(model, tensors, strict=False)

    def export(self, model, path, format=None, dtype=None, tokenizer_from=None):
        from ..lora import save_adapter
        tensors = self.state_dict(model)
        if D.rank_and_world()[0] == 0:
            save_adapter(model, path, tensors, base_model=self.base_model, tokenizer_from=tokenizer_from,
                         overwrite=True)

    def place(self, model, device, dtype=None):
        """What is trained in fp32, the frozen base in the compute dtype (NF4 weights stay NF4), on `device`."""
        trained = {id(p) for p in self.parameters(model)}
        done: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    want = torch.float32 if id(p) in trained else dtype or torch.float32
                    moved = p.to(device) if hasattr(p, "get_original_weight") else p.to(device, want)
                    done[id(p)] = p if moved is p else torch.nn.Parameter(moved, requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
        for module in model.modules():
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(device)

    def reference(self, model):
        from ..lora import disable_adapters
        return disable_adapters(model)
