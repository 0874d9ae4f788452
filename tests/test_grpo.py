"""GRPO: the per-token loss of every loss_type against TRL's GRPOTrainer on fixed log-probs,
advantages and masks; advantages against TRL's formula; the loop's normalisation giving TRL's
per-step loss under gradient accumulation; zero advantages (no update) for a group of equal
rewards; learning a verifiable task; several optimizer steps per rollout, resumed mid-cycle;
two processes (DDP, FSDP2) sampling as they train."""
import json

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CrashAfter, gloo_process, has_digit, number_prompts

from lmfoundry.checkpoint import load_model
from lmfoundry.errors import TrainError
from lmfoundry.generate import SamplingParams
from lmfoundry.tokenizer import load_tokenizer
from lmfoundry.train import TrainConfig, train
from lmfoundry.train.online import GRPO, LOSS_TYPES, group_advantages, grpo_count, grpo_loss_sum, grpo_token_loss
from lmfoundry.train.rollout import PromptBatches, Verifier

PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)


def fixed_inputs(N=4, T=6):
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(N, T, generator=g) * 3
    old = logps + 0.3 * torch.randn(N, T, generator=g)          # ratios well outside [0.8, 1.28]
    ref = logps + 0.2 * torch.randn(N, T, generator=g)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 4:], mask[2, 2:] = False, False
    return logps, old, ref, mask, torch.tensor([1.0, -0.5, 0.3, -1.2])


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """A real TRL GRPOTrainer on a tiny model; its _compute_loss is what we compare with."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from lmfoundry.demo import make_demo_checkpoint
    d = make_demo_checkpoint(tmp_path_factory.mktemp("trl") / "demo")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d)

    def make(loss_type, beta, kl_bias_correction):
        args = GRPOConfig(output_dir=str(d / "out"), loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,
                          use_bias_correction_kl=kl_bias_correction,
                          max_completion_length=6, num_generations=2, per_device_train_batch_size=4,
                          report_to="none", use_cpu=True, bf16=False)
        trainer = GRPOTrainer(model=model, args=args, processing_class=tok,
                              reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4))
        trainer.current_gradient_accumulation_steps = 1       # what Trainer's loop sets before each step
        model.train()
        return trainer
    return make


@pytest.mark.parametrize("beta, kl_bias_correction", [(0.0, True), (0.04, True), (0.04, False)],
                         ids=["no-kl", "kl", "plain-kl"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_equals_trl_for_each_loss_type(trl_trainer, loss_type, beta, kl_bias_correction):
    logps, old, ref, mask, adv = fixed_inputs()
    trainer = trl_trainer(loss_type, beta, kl_bias_correction)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    N, T = logps.shape
    theirs = trainer._compute_loss(trainer.model, {
        "prompt_ids": torch.ones(N, 3, dtype=torch.long), "prompt_mask": torch.ones(N, 3, dtype=torch.long),
        "completion_ids": torch.ones(N, T, dtype=torch.long), "completion_mask": mask.long(), "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()})
    per_token = grpo_token_loss(logps, old, adv, epsilon=0.2, epsilon_high=0.28, beta=beta, ref_logps=ref,
                                kl_bias_correction=kl_bias_correction)
    ours = grpo_loss_sum(per_token, mask, loss_type, max_completion_length=T) / grpo_count(mask, loss_type)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)


def test_advantages_are_trls_group_normalised_rewards():
    from trl.trainer.utils import nanstd
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [2.0, 2.0, 2.0, 2.0], [1.0, float("nan"), 3.0, 0.0]])
    adv, zero_std = group_advantages(rewards, "group")
    mean = torch.nanmean(rewards, dim=1, keepdim=True)
    expected = torch.nan_to_num((rewards - mean) / (nanstd(rewards, dim=1, keepdim=True) + 1e-4), nan=0.0)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert zero_std.tolist() == [False, True, False]
    assert adv[1].tolist() == [0.0] * 4 and adv[2, 1] == 0          # equal rewards, an unscored sample
    plain, _ = group_advantages(rewards, "none")
    torch.testing.assert_close(plain, torch.nan_to_num(rewards - mean, nan=0.0))


def run(tmp_path, demo_dir, scorer=Verifier(has_digit), steps=4, out="out", batch_size=4, **kw):
    tok = load_tokenizer(demo_dir)
    cfg_kw = {k: kw.pop(k) for k in ("grad_accum", "save_every", "lr") if k in kw}
    resume = kw.pop("resume", False)
    objective = kw.pop("objective", None) or GRPO(scorer, PARAMS, num_generations=4, tokenizer=tok, **kw)
    batches = PromptBatches(number_prompts(), tok, batch_size, repeat=objective.iterations,
                            group=cfg_kw.get("grad_accum", 1))
    cfg = TrainConfig(**{"steps": steps, "lr": 3e-3, "warmup": 0, "weight_decay": 0.0, "schedule": "constant",
                         "progress": False, **cfg_kw})
    return train(load_model(demo_dir), batches, objective, cfg, tmp_path / out, resume=resume)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_group_with_equal_rewards_gets_zero_advantages_and_no_update(tmp_path, demo_dir):
    result = run(tmp_path, demo_dir, scorer=Verifier(lambda text, answer: 1.0), steps=1)
    row = metrics(result.out_dir)[0]
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0 and row["score/zero_std"] == 1.0
    before, after = load_model(demo_dir).state_dict(), load_model(result.out_dir).state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]), name


class Recording(GRPO):
    """GRPO that keeps every rollout it builds."""

    def build(self, samples, scores):
        r = super().build(samples, scores)
        self.built = getattr(self, "built", []) + [r]
        return r


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_loops_normalisation_gives_trls_loss_under_gradient_accumulation(tmp_path, demo_dir, loss_type):
    """TRL's per-micro-batch losses with GA = 2, summed over the step, equal what the loop logs.
    On the first pass the ratio is 1, so each token's loss is -A."""
    tok = load_tokenizer(demo_dir)
    objective = Recording(Verifier(has_digit), PARAMS, num_generations=4, tokenizer=tok, loss_type=loss_type)
    result = run(tmp_path, demo_dir, steps=1, grad_accum=2, batch_size=2, objective=objective)
    total_tokens = sum(r["mask"].sum() for r in objective.built)
    expected = 0.0
    for r in objective.built:
        m, tok_loss = r["mask"].float(), -r["advantages"][:, None] * r["mask"].float()
        expected += {"grpo": (tok_loss.sum(-1) / m.sum(-1).clamp(min=1)).mean() / 2,
                     "bnpo": tok_loss.sum() / m.sum() / 2,
                     "dr_grpo": tok_loss.sum() / (m.shape[0] * PARAMS.max_new_tokens) / 2,
                     "dapo": tok_loss.sum() / total_tokens}[loss_type]
    assert len(objective.built) == 2
    assert result.losses[0] == pytest.approx(float(expected), abs=1e-6)


def test_grpo_raises_the_reward_of_a_verifiable_task(tmp_path, demo_dir):
    result = run(tmp_path, demo_dir, steps=30)
    rows = metrics(result.out_dir)
    first, last = (sum(r["score/mean"] for r in rows[i:i + 5]) / 5 for i in (0, len(rows) - 5))
    assert first < 0.4 and last > first + 0.3


def test_several_steps_per_rollout_reuse_its_samples_and_resume_mid_cycle(tmp_path, demo_dir, monkeypatch):
    import lmfoundry.train.online as online
    calls = []
    real = online.sample
    monkeypatch.setattr(online, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    full = run(tmp_path, demo_dir, steps=6, num_iterations=2, beta=0.04)
    assert len(calls) == 3                                        # one rollout per two optimizer steps
    rows = metrics(full.out_dir)
    assert rows[0]["clip_ratio"] == 0.0 and rows[0]["kl"] == 0.0  # first pass: the sampling policy itself
    assert rows[1]["kl"] > 0                                      # second pass: the policy has moved
    tok = load_tokenizer(demo_dir)
    crash = CrashAfter(GRPO(Verifier(has_digit), PARAMS, num_generations=4, tokenizer=tok, num_iterations=2,
                            beta=0.04), calls=3)
    with pytest.raises(RuntimeError):       # dies in step 4, the second pass over the second rollout
        run(tmp_path, demo_dir, steps=6, out="cut", save_every=1, objective=crash)
    resumed = run(tmp_path, demo_dir, steps=6, out="cut", save_every=1, num_iterations=2, beta=0.04, resume=True,
                  reference=load_model(demo_dir))            # the initial policy, which the resumed run lacks
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(full.losses[3:], abs=1e-6)
    keep = ("loss", "score/mean", "kl", "clip_ratio", "completions/length")
    cut = metrics(tmp_path / "cut")
    for k in keep:                                                # the same metric sequence, rows 1..6
        assert [r[k] for r in cut] == pytest.approx([r[k] for r in rows], abs=1e-6), k


def test_grpo_settings_are_checked(demo_dir):
    tok = load_tokenizer(demo_dir)
    with pytest.raises(TrainError, match="num_generations must be >= 2"):
        GRPO(Verifier(has_digit), PARAMS, num_generations=1, tokenizer=tok)
    with pytest.raises(TrainError, match="unknown GRPO loss_type 'ppo'"):
        GRPO(Verifier(has_digit), PARAMS, tokenizer=tok, loss_type="ppo")


# ---------------------------------------------------------------- two processes

def worker(rank, world, port, out, demo_dir, fsdp):
    with gloo_process(rank, world, port, out) as save_losses:
        tok = load_tokenizer(demo_dir)
        objective = GRPO(Verifier(has_digit), PARAMS, num_generations=4, tokenizer=tok, beta=0.04)
        batches = PromptBatches(number_prompts(), tok, 2, rank=rank, world_size=world)
        cfg = TrainConfig(steps=3, lr=3e-3, warmup=0, weight_decay=0.0, progress=False, fsdp=fsdp)
        save_losses(train(load_model(demo_dir), batches, objective, cfg, f"{out}/run").losses)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_sample_and_train_like_one_with_the_same_global_batch(tmp_path, demo_dir, fsdp):
    from test_train_distributed import free_port
    single = run(tmp_path, demo_dir, steps=3, beta=0.04, lr=3e-3, out="single")
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), str(demo_dir), fsdp), nprocs=2, join=True)
    two = json.loads((tmp_path / "losses.json").read_text())
    # step 1: the same samples (each seeded by its global row), rewards and loss; later steps sample from
    # weights that differ by Adam's amplified rounding noise (see test_train_distributed), so only run
    rows, alone = metrics(tmp_path / "run"), metrics(tmp_path / "single")
    assert len(two) == 3 and rows[0]["score/mean"] == alone[0]["score/mean"]
    assert two[0] == pytest.approx(single.losses[0], abs=1e-6)
    assert rows[0]["kl"] == alone[0]["kl"] == 0.0 and rows[-1]["kl"] > 0
