"""Shared fixtures: tiny random checkpoints made by transformers' own save_pretrained."""
import contextlib
import os

import pytest
import torch

torch.set_num_threads(1)   # CI has 2 cores and runs 2 pytest workers
# Training dtype "auto" means bf16 on CPUs with bf16 units: pin fp32 so the suite's numbers do not
# depend on the machine (also in the torchrun subprocesses). Tests of bf16 ask for it explicitly.
os.environ["LMFOUNDRY_CPU_BF16"] = "0"

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, max_position_embeddings=256)


def hf_llama(**overrides):
    """A random transformers LlamaForCausalLM (or MistralForCausalLM with arch='mistral'), fp32, eval."""
    import transformers
    arch = overrides.pop("arch", "llama")
    theta = overrides.pop("rope_theta", 10000.0)
    scaling = overrides.pop("rope_scaling", None)
    kw = {**TINY, **overrides, "rope_parameters": {"rope_type": "default", "rope_theta": theta, **(scaling or {})}}
    cls_cfg, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls(cls_cfg(**kw)).float().eval()
    # random norms too, so a missing or misplaced norm cannot hide behind weight == 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def llama_dir(tmp_path):
    model = hf_llama()
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


def random_tokens(batch, length, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a trained byte-level BPE tokenizer and a ChatML template."""
    from lmfoundry.demo import make_demo_checkpoint
    return make_demo_checkpoint(tmp_path_factory.mktemp("demo") / "tiny")


# ---- online objectives (tests/test_grpo.py, tests/test_online_dpo.py)

def has_digit(text: str, answer) -> float:
    """A verifier a tiny random policy can learn: 1 when the completion holds a digit."""
    return float(any(ch.isdigit() for ch in text))


def number_prompts(n: int = 16) -> list[dict]:
    return [{"prompt": f"Give me a number please ({i})", "answer": str(i % 10)} for i in range(n)]


class CrashAfter:
    """Wraps an objective (hooks and all): its forward number `calls + 1` raises, as a preempted
    job would die mid-step."""

    def __init__(self, objective, calls: int):
        self.objective, self.calls, self.seen = objective, calls, 0

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, model, batch):
        self.seen += 1
        if self.seen > self.calls:
            raise RuntimeError("simulated crash")
        return self.objective(model, batch)


@contextlib.contextmanager
def gloo_process(rank: int, world: int, port: int, out=None):
    """One process of a CPU process group (torch.multiprocessing.spawn workers); yields a function
    that rank 0 uses to write a run's losses to OUT/losses.json."""
    import json
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)

    def save_losses(losses):
        if rank == 0:
            with open(f"{out}/losses.json", "w") as f:
                json.dump(losses, f)
    try:
        yield save_losses
    finally:
        torch.distributed.destroy_process_group()
