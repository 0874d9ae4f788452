"""LoRA on the RL policy and on the reward model: online DPO and GRPO take their reference from the
trainable (the base, adapters off: no second model), sample with the adapters on (QLoRA too), and
export PEFT adapters; a LoRA reward model exports a PEFT SEQ_CLS adapter that transformers + PEFT
score the same, and that `reward score` and `--reward` read."""
import json

import peft
import pytest
import torch
from conftest import gloo_process, has_digit, number_prompts
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


def lora_policy(demo_dir, tok, qlora=False, seed=1, spec=None):
    """The demo model (or a preset with the demo tokenizer) with rank-4 adapters holding random
    (non-trivial) values."""
    model = build_model(spec or str(demo_dir), tok, 0, LoraConfig(rank=4, qlora=qlora))
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
    beta = ["--beta", "0.04"] if verb == "grpo" else []
    return cli(verb, "--model", demo_dir, "--prompts", prompts, "--out", out, "--steps", steps, "--no-progress",
               "--lora-rank", 4, "--max-new-tokens", 8, "--batch-size", 2, "--num-generations", 4, "--lr", "1e-2",
               "--warmup", 0, "--schedule", "constant", "--save-every", 1, *beta, *extra)


@pytest.fixture(scope="module")
def rm_adapter(tmp_path_factory, demo_dir):
    """A LoRA reward model (4 steps on the synthetic preference set), as a PEFT SEQ_CLS adapter directory."""
    from test_reward import preference_records, write_jsonl
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "pairs.jsonl", preference_records(32, 0))
    assert reward_cli(demo_dir, data, tmp / "rm", 4) == 0
    return tmp / "rm"


def reward_cli(demo_dir, data, out, steps, *extra):
    return cli("reward", "--model", demo_dir, "--data", data, "--out", out, "--steps", steps, "--batch-size", 8,
               "--seq-len", 128, "--lr", "1e-3", "--no-progress", "--lora-rank", 4, "--save-every", 1,
               "--schedule", "constant", "--warmup", 0, *extra)


@pytest.mark.parametrize("verb, scorer", [("online-dpo", "math"), ("grpo", "rm")])
def test_online_lora_cli_writes_a_peft_adapter_builds_one_model_and_resumes_exactly(tmp_path, demo_dir, verb, scorer,
                                                                                    rm_adapter, monkeypatch):
    import transformers
    scorer = ["--verifier", "math"] if scorer == "math" else ["--reward", rm_adapter]   # an RM adapter directory
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in number_prompts()))
    built = []
    real_init = Transformer.__init__
    monkeypatch.setattr(Transformer, "__init__", lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    assert online_cli(verb, demo_dir, prompts, tmp_path / "full", 3, *scorer) == 0
    assert len(built) == 1 + (scorer[0] == "--reward")         # the policy (and the RM): the reference is its base
    assert online_cli(verb, demo_dir, prompts, tmp_path / "cut", 2, *scorer) == 0
    assert online_cli(verb, demo_dir, prompts, tmp_path / "cut", 3, "--resume", *scorer) == 0
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
        if scorer[0] == "--reward":                            # continuous rewards: the adapters moved
            assert (ours(tokens) - load_model(demo_dir)(tokens)).abs().max() > 1e-4


# ---------------------------------------------------------------- LoRA reward models

def test_a_lora_reward_model_is_a_peft_seq_cls_adapter_scoring_as_transformers_and_resumes_exactly(
        tmp_path, demo_dir, rm_adapter, capsys):
    import transformers
    from test_reward import preference_records, write_jsonl

    from lmfoundry.train.reward import load_reward_model
    conf = json.loads((rm_adapter / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and conf["modules_to_save"] == ["score"]
    tensors = load_file(str(rm_adapter / "adapter_model.safetensors"))
    assert tensors["base_model.model.score.weight"].shape == (1, 64)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(demo_dir, num_labels=1).float()
    hf = peft.PeftModel.from_pretrained(hf, rm_adapter).eval()
    ours = load_reward_model(rm_adapter)
    pad = ours.pad_id
    ids = torch.randint(0, 128, (3, 14))
    ids[ids == pad] = pad + 1
    ids[1, 9:] = pad                                            # right padding: the last real token is read
    with torch.no_grad():
        assert (hf(input_ids=ids).logits[:, 0] - ours(ids)).abs().max() <= 1e-4
        assert ours(ids).std() > 0

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(32, 0))
    assert reward_cli(demo_dir, data, tmp_path / "cut", 2) == 0
    assert reward_cli(demo_dir, data, tmp_path / "cut", 4, "--resume") == 0
    rows = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (rm_adapter, tmp_path / "cut")]
    assert rows[1] == pytest.approx(rows[0], abs=1e-6)
    cut = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert set(cut) == set(tensors) and all(torch.allclose(cut[k], tensors[k], atol=1e-6) for k in cut)

    heldout = write_jsonl(tmp_path / "heldout.jsonl", preference_records(8, 1))
    capsys.readouterr()
    assert cli("reward", "score", rm_adapter, "--data", heldout) == 0
    assert "8 pairs: accuracy" in capsys.readouterr().out


def test_qlora_and_dora_reward_models_train_and_score(tmp_path, demo_dir, capsys):
    from test_reward import preference_records, write_jsonl
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(8, 0))
    for name, flags in (("q", ["--qlora"]), ("d", ["--dora", "--lora-targets", "q,v"])):
        assert reward_cli(demo_dir, data, tmp_path / name, 2, *flags) == 0
        capsys.readouterr()
        assert cli("reward", "score", tmp_path / name, "--data", data) == 0
        assert "8 pairs: accuracy" in capsys.readouterr().out


def test_what_cannot_work_with_a_lora_reward_model_is_one_clear_line(tmp_path, demo_dir, rm_adapter, capsys):
    from test_reward import preference_records, write_jsonl
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(8, 0))
    capsys.readouterr()
    assert reward_cli(demo_dir, data, tmp_path / "a", 1, "--lora-targets", "q,lm_head") == 1
    assert capsys.readouterr().err == ("lmfoundry: error: --lora-targets lm_head: a reward model has no LM head "
                                       "(its score head is trained in full)\n")
    assert cli("generate", demo_dir, "hi", "--adapter", rm_adapter) == 1          # a causal LM cannot use its head
    err = capsys.readouterr().err
    assert "base_model.model.score.weight is a whole module saved beside the adapter" in err and err.count("\n") == 1
    conf = json.loads((rm_adapter / "adapter_config.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter_model.safetensors").write_bytes((rm_adapter / "adapter_model.safetensors").read_bytes())
    (moved / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": "/nowhere"}))
    assert cli("reward", "score", moved, "--data", data) == 1
    assert "base_model_name_or_path '/nowhere' is not a checkpoint directory here" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def qlora_base(tmp_path, demo_dir):
    """A random Llama whose NF4 weights FSDP2 can split in two (the demo model's are too small), with
    the demo tokenizer."""
    from lmfoundry.checkpoint import write_checkpoint
    cfg = load_model(demo_dir).config.replace(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512)
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "qbase", cfg, Transformer(cfg).state_dict(), tokenizer_from=demo_dir)
    return str(tmp_path / "qbase")


def lora_worker(rank, world, port, out, demo_dir, fsdp, spec):
    with gloo_process(rank, world, port, out) as save_losses:
        tok = load_tokenizer(demo_dir)
        objective = GRPO(Verifier(has_digit), PARAMS, num_generations=4, tokenizer=tok, beta=0.04)
        batches = PromptBatches(number_prompts(), tok, 2, rank=rank, world_size=world)
        cfg = TrainConfig(steps=2, lr=1e-2, warmup=0, weight_decay=0.0, progress=False, fsdp=fsdp)
        policy = lora_policy(demo_dir, tok, spec is not None, spec=spec)
        save_losses(train(policy, batches, objective, cfg, f"{out}/run", trainable=LoRA()).losses)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp, qlora", [(False, False), (True, False), (True, True)],
                         ids=["ddp", "fsdp2", "fsdp2-qlora"])
def test_two_processes_train_a_lora_policy_like_one(tmp_path, demo_dir, fsdp, qlora):
    import torch.multiprocessing as mp
    from test_train_distributed import free_port
    tok = load_tokenizer(demo_dir)
    objective = GRPO(Verifier(has_digit), PARAMS, num_generations=4, tokenizer=tok, beta=0.04)
    cfg = TrainConfig(steps=2, lr=1e-2, warmup=0, weight_decay=0.0, progress=False)
    spec = qlora_base(tmp_path, demo_dir) if qlora else None
    single = train(lora_policy(demo_dir, tok, qlora, spec=spec), PromptBatches(number_prompts(), tok, 4), objective,
                   cfg, tmp_path / "single", trainable=LoRA())
    mp.spawn(lora_worker, args=(2, free_port(), str(tmp_path), demo_dir, fsdp, spec), nprocs=2, join=True)
    two = json.loads((tmp_path / "losses.json").read_text())
    assert two[0] == pytest.approx(single.losses[0], abs=1e-6)   # the same samples, rewards and reference
