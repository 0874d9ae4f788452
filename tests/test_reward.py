"""Bradley-Terry reward models: the loss and its gradients against TRL's RewardTrainer, the export
against transformers' AutoModelForSequenceClassification, learning a synthetic preference set,
exact resume, `lmfoundry reward` / `reward score` and their refusals."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CrashAfter, gloo_process

from lmfoundry.checkpoint import load_model
from lmfoundry.checkpoint.formats import SEQ_CLS, weight_plan
from lmfoundry.cli import main
from lmfoundry.config import ModelConfig
from lmfoundry.model import Transformer
from lmfoundry.train import ListBatches, TrainConfig, train
from lmfoundry.train.reward import (BradleyTerry, RewardModel, RewardModelWeights, load_reward_model,
                                    save_reward_model)

PAD = 0


def hf_reward_model(tmp_path, tie=False):
    """A random transformers LlamaForSequenceClassification (num_labels 1), saved, and its directory."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5, num_labels=1,
                                   pad_token_id=PAD, tie_word_embeddings=tie, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf_rm")
    return model, tmp_path / "hf_rm"


def pair_batch(B=3, T=12, seed=0):
    """Right-padded pairs whose reply is the last 4 real tokens of each row (labels on them)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side, lengths in (("chosen", [12, 9, 7]), ("rejected", [10, 12, 6])):
        ids = torch.randint(1, 128, (B, T), generator=g)
        labels = torch.full((B, T), -100)
        for b, n in enumerate(lengths[:B]):
            ids[b, n:] = PAD
            labels[b, n - 5:n - 1] = ids[b, n - 4:n]
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    return out


def test_loss_and_gradients_equal_trl_reward_trainer(tmp_path, demo_dir):
    import transformers
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    hf, path = hf_reward_model(tmp_path)
    ours = load_reward_model(path).train()
    batch = pair_batch()
    batch["margin"] = torch.tensor([0.5, 0.0, -1.0])
    args = RewardConfig(output_dir=str(tmp_path / "trl"), center_rewards_coefficient=0.01, report_to="none",
                        use_cpu=True, bf16=False, gradient_checkpointing=False)
    trainer = RewardTrainer(model=hf, args=args, processing_class=transformers.AutoTokenizer.from_pretrained(demo_dir),
                            train_dataset=Dataset.from_list([{"chosen": "a", "rejected": "b"}] * 2))
    hf.train()
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    trl_loss = trainer.compute_loss(hf, {"input_ids": ids, "attention_mask": (ids != PAD).long(),
                                         "margin": batch["margin"]})
    trl_loss.backward()

    loss_sum, stats = BradleyTerry(center_rewards_coefficient=0.01)(ours, batch)
    (loss_sum / 3).backward()
    assert float(loss_sum.detach() / 3) == pytest.approx(float(trl_loss.detach()), abs=1e-5)
    plan = weight_plan(ours.config, SEQ_CLS["llama"])
    grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        theirs = next(k for k, v in plan.items() if v == (name.removeprefix("body."),))
        torch.testing.assert_close(p.grad, grads[theirs].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_batch_margin_and_centering_enter_the_loss_as_trl_writes_them():
    torch.manual_seed(1)
    rm = RewardModel(Transformer(ModelConfig.from_preset("tiny").replace(pad_token_id=PAD)))
    batch = pair_batch()
    batch["margin"] = torch.tensor([1.0, float("nan"), 2.0])    # NaN: the record had none -> the default 0.25
    loss_sum, stats = BradleyTerry(center_rewards_coefficient=0.1, margin=0.25)(rm, batch)
    with torch.no_grad():
        from lmfoundry.train.reward import pair_rows
        ids, lengths = pair_rows(batch)
        c, r = rm(ids, lengths).chunk(2)
    expected = -F.logsigmoid(c - r - torch.tensor([1.0, 0.25, 2.0])) + 0.1 * (c + r) ** 2
    assert float(loss_sum) == pytest.approx(float(expected.sum()), abs=1e-6)
    assert float(stats["accuracy"]) == float((c > r).sum())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_saved_reward_model_scores_equal_transformers(tmp_path, tie):
    import transformers
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny").replace(pad_token_id=PAD, tie_embeddings=tie)
    rm = RewardModel(Transformer(cfg)).eval()
    with torch.no_grad():
        rm.score.weight.normal_()
    save_reward_model(rm.state_dict(), rm.config, tmp_path / "rm")
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm",
                                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    ids = torch.randint(1, 500, (4, 16), generator=torch.Generator().manual_seed(2))
    ids[1, 10:], ids[2, 3:] = PAD, PAD
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids).logits[:, 0]
        torch.testing.assert_close(rm(ids), theirs, atol=1e-4, rtol=0)
        torch.testing.assert_close(load_reward_model(tmp_path / "rm")(ids), theirs, atol=1e-4, rtol=0)


def test_a_transformers_reward_model_loads_as_a_scorer(tmp_path):
    hf, path = hf_reward_model(tmp_path, tie=True)
    ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(3))
    ids[0, 5:] = PAD
    with torch.no_grad():
        torch.testing.assert_close(load_reward_model(path)(ids), hf.eval()(input_ids=ids).logits[:, 0], atol=1e-4,
                                   rtol=0)


def test_a_reward_model_is_refused_where_a_causal_lm_is_expected_and_vice_versa(tmp_path, demo_dir):
    from lmfoundry.errors import CheckpointError
    _, path = hf_reward_model(tmp_path)
    with pytest.raises(CheckpointError, match="reward model"):
        load_model(path)
    with pytest.raises(CheckpointError, match="is not a reward model"):
        load_reward_model(demo_dir)


# ---------------------------------------------------------------- training end to end

def preference_records(n, seed):
    """Chosen: a reply giving a number; rejected: a refusal (a preference a tiny model can learn)."""
    import random
    r = random.Random(seed)
    things = ["apples", "trains", "models", "layers", "rivers", "books", "trees", "birds"]
    out = []
    for i in range(n):
        k, thing = r.randint(0, 9), r.choice(things)
        out.append({"prompt": f"How many {thing} are there? ({i})", "chosen": f"There are {k} {thing}. #### {k}",
                    "rejected": f"I am not sure about the {r.choice(things)}."})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_tiny_reward_model_learns_a_synthetic_preference_set(tmp_path, demo_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(64, 0))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", preference_records(32, 1))
    assert main(["reward", "--model", str(demo_dir), "--data", str(data), "--out", str(tmp_path / "rm"),
                 "--steps", "24", "--batch-size", "8", "--seq-len", "128", "--lr", "1e-3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["accuracy"] < 0.9 and rows[-1]["accuracy"] == 1.0
    capsys.readouterr()
    assert main(["reward", "score", str(tmp_path / "rm"), "--data", str(heldout), "--out",
                 str(tmp_path / "scores.json")]) == 0
    assert "accuracy 1.0000" in capsys.readouterr().out
    res = json.loads((tmp_path / "scores.json").read_text())
    assert res["pairs"] == 32 and res["accuracy"] == 1.0 and res["margin"] > 1.0
    assert res["chosen"]["min"] > res["rejected"]["max"]


def test_reward_training_resumes_exactly_from_its_checkpoint(tmp_path):
    batches = [pair_batch(seed=s) for s in range(6)]
    cfg = TrainConfig(steps=6, lr=1e-3, warmup=0, progress=False, save_every=2, weight_decay=0.0)

    def rm():
        torch.manual_seed(0)
        return RewardModel(Transformer(ModelConfig.from_preset("tiny").replace(pad_token_id=PAD)))
    full = train(rm(), ListBatches(batches), BradleyTerry(), cfg, tmp_path / "full", trainable=RewardModelWeights())
    with pytest.raises(RuntimeError):
        train(rm(), ListBatches(batches), CrashAfter(BradleyTerry(), 3), cfg, tmp_path / "cut", trainable=RewardModelWeights())
    assert (tmp_path / "cut" / "checkpoints" / "step-00000002" / "trainable.safetensors").is_file()
    resumed = train(rm(), ListBatches(batches), BradleyTerry(), cfg, tmp_path / "cut", resume=True,
                    trainable=RewardModelWeights())
    assert resumed.losses == pytest.approx(full.losses[2:], abs=1e-6)
    a, b = load_reward_model(tmp_path / "full"), load_reward_model(tmp_path / "cut")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


def test_bad_reward_inputs_fail_with_one_line(tmp_path, demo_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(8, 0))
    base = ["reward", "--model", str(demo_dir), "--data", str(data), "--steps", "1", "--batch-size", "2",
            "--seq-len", "128", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a"), "--format", "exaone"]) == 1
    assert "a reward model in the exaone format has no Hugging Face sequence-classification class" in \
        capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", preference_records(3, 0) + [{**preference_records(1, 0)[0],
                                                                          "margin": "big"}])
    assert main([*base[:4], str(bad), *base[5:], "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:4: 'margin' must be a number" in err and err.count("\n") == 1
    assert main(["reward", "score", str(demo_dir), "--data", str(data)]) == 1
    assert "is not a reward model" in capsys.readouterr().err
    assert not (tmp_path / "b" / "config.json").exists()


def distributed_worker(rank, world, port, out, fsdp):
    with gloo_process(rank, world, port, out) as save_losses:
        mine = [{k: v[rank::world] for k, v in pair_batch(B=2, seed=s).items()} for s in range(4)]
        torch.manual_seed(0)
        rm = RewardModel(Transformer(ModelConfig.from_preset("tiny").replace(pad_token_id=PAD)))
        cfg = TrainConfig(steps=4, lr=1e-3, warmup=0, progress=False, weight_decay=0.0, fsdp=fsdp)
        result = train(rm, ListBatches(mine), BradleyTerry(), cfg, f"{out}/run", trainable=RewardModelWeights())
        save_losses(result.losses)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_train_a_reward_model_like_one(tmp_path, fsdp):
    import torch.multiprocessing as mp
    from test_train_distributed import free_port
    torch.manual_seed(0)
    rm = RewardModel(Transformer(ModelConfig.from_preset("tiny").replace(pad_token_id=PAD)))
    cfg = TrainConfig(steps=4, lr=1e-3, warmup=0, progress=False, weight_decay=0.0)
    single = train(rm, ListBatches([pair_batch(B=2, seed=s) for s in range(4)]), BradleyTerry(), cfg,
                   tmp_path / "single", trainable=RewardModelWeights())
    mp.spawn(distributed_worker, args=(2, free_port(), str(tmp_path), fsdp), nprocs=2, join=True)
    assert json.loads((tmp_path / "losses.json").read_text()) == pytest.approx(single.losses, abs=1e-5)
    a, b = load_reward_model(tmp_path / "single"), load_reward_model(tmp_path / "run")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0, msg=name)
