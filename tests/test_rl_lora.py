"""LoRA on the RL policy and on the reward model: online DPO and GRPO take their reference from the
trainable (the base, adapters off: no second model), sample with the adapters on (QLoRA too), and
export PEFT adapters; a LoRA reward model exports a PEFT SEQ_CLS adapter that transformers + PEFT
score the same, and that `reward score` and `--reward` read."""
import json

import peft
import pytest
import torch
from conftest import has_digit, number_prompts
from safetensors.torch import load_file

from lmfoundry.checkpoint import load_model
from lmfoundry.cli import main
from lmfoundry.generate import SamplingParams, generate
from lmfoundry.lora import LoraConfig, adapter_parameters, disable_adapters, load_adapter
from lmfoundry.model import Transformer
from lmfoundry.tokenizer import load_tokenizer
from lmfoundry.train import TrainConfig, train
from lmfoundry.train.objectives import token_logps
from lmfoundry.train.online import GRPO, OnlineDPO
from lmfoundry.train.recipe import build_model
from lmfoundry.train.rollout import PromptBatches, Verifier
from lmfoundry.train.trainable import LoRA

PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)


def lora_policy(demo_dir, tok, qlora=False, seed=1):
    """The demo model with rank-4 adapters holding random (non-trivial) values."""
    model = build_model(str(demo_dir), tok, 0, LoraConfig(rank=4, qlora=qlora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


class Recording(GRPO):
    def build(self, samples, scores):
        r = super().build(samples, scores)
        self.built = getattr(self, "built", []) + [r]
        return r


@pytest.mark.parametrize("cls", [OnlineDPO, Recording], ids=["online-dpo", "grpo"])
def test_the_lora_reference_is_the_policy_with_adapters_off_and_equals_the_base_exactly(tmp_path, demo_dir, cls):
    tok = load_tokenizer(demo_dir)
    model = lora_policy(demo_dir, tok)
    kw = {"beta": 0.04} if cls is Recording else {}
    objective = cls(Verifier(has_digit), PARAMS, num_generations=4, tokenizer=tok, **kw)
    cfg = TrainConfig(steps=2, lr=1e-2, warmup=0, schedule="constant", progress=False)
    train(model, PromptBatches(number_prompts(), tok, 2), objective, cfg, tmp_path / "out", trainable=LoRA())
    assert objective.reference is model                       # no second model
    base = load_model(demo_dir)
    ids, labels = torch.randint(0, 128, (3, 12)), torch.randint(0, 128, (3, 12))
    with torch.no_grad(), objective.reference_context():
        ours = token_logps(objective.reference, ids, labels)
    assert torch.equal(ours, token_logps(base, ids, labels))
    with torch.no_grad():
        assert not torch.equal(token_logps(model, ids, labels), ours)   # adapters back on afterwards
    for r in getattr(objective, "built", []):                 # GRPO's KL reference, computed during training
        assert torch.equal(r["ref_logps"], token_logps(base, r["ids"], r["labels"]))


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_sampling_uses_the_adapters_and_the_kv_cache_matches_full_forwards(demo_dir, qlora):
    tok = load_tokenizer(demo_dir)
    model = lora_policy(demo_dir, tok, qlora=qlora).eval()
    prompt = tok.encode("Give me a number")
    out = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0.0))[0].tokens
    seq = list(prompt)
    with torch.no_grad():
        for _ in out:                                          # greedy by full forwards, no cache
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        with disable_adapters(model):
            base_out = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0.0))[0].tokens
    assert out == seq[len(prompt):]
    assert base_out != out                                     # the adapters change what is sampled


def cli(*argv):
    return main([str(a) for a in argv])


def online_cli(verb, demo_dir, prompts, out, steps, *extra):
    scorer = ["--verifier", "math"] + (["--beta", "0.04"] if verb == "grpo" else [])
    return cli(verb, "--model", demo_dir, "--prompts", prompts, "--out", out, "--steps", steps, "--no-progress",
               "--lora-rank", 4, "--max-new-tokens", 8, "--batch-size", 2, "--num-generations", 4, "--lr", "1e-2",
               "--warmup", 0, "--schedule", "constant", "--save-every", 1, *scorer, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["online-dpo", "grpo"])
def test_online_lora_cli_writes_a_peft_adapter_builds_one_model_and_resumes_exactly(tmp_path, demo_dir, verb,
                                                                                    monkeypatch):
    import transformers
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in number_prompts()))
    built = []
    real_init = Transformer.__init__
    monkeypatch.setattr(Transformer, "__init__", lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    assert online_cli(verb, demo_dir, prompts, tmp_path / "full", 3) == 0
    assert len(built) == 1                                     # the policy only: the reference is its base
    assert online_cli(verb, demo_dir, prompts, tmp_path / "cut", 2) == 0
    assert online_cli(verb, demo_dir, prompts, tmp_path / "cut", 3, "--resume") == 0
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("full", "cut")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3]
    for k in ("loss", "score/mean", "completions/length"):
        assert [r[k] for r in rows[1]] == pytest.approx([r[k] for r in rows[0]], abs=1e-6), k
    full, cut = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "cut"))
    assert all(torch.allclose(full[k], cut[k], atol=1e-6) for k in full)
    conf = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM" and conf["base_model_name_or_path"] == str(demo_dir.resolve())

    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(demo_dir).float(),
                                        tmp_path / "full").eval()
    ours = load_adapter(load_model(demo_dir), tmp_path / "full").eval()
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() <= 1e-5
