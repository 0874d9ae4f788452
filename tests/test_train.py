"""The training loop and its objectives: each test states a property and checks it against
something independent of the code under test (a formula, a hand-written cross-entropy, an
uninterrupted run, a larger batch)."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmfoundry.checkpoint import convert, load_model
from lmfoundry.checkpoint.sharded import read_tensor, stored_tensors
from lmfoundry.config import ModelConfig
from lmfoundry.model import Transformer
from lmfoundry.train import (DPO, SFT, ListBatches, NextToken, TrainConfig, TrainError, WholeModel, dpo_loss,
                             evaluate_loss, lr_factor, sequence_logps, train)

V = 512   # the tiny preset's vocabulary


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny"))


def pattern_batches(n, B=4, T=32, seed=0):
    """Rows of a repeating counting pattern (learnable), two packed documents per row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, 16, (B, 1), generator=g)
        ids = (start + torch.arange(T + 1)) % 16 + 20
        labels = ids[:, 1:].clone()
        doc_ids = (torch.arange(T) >= T // 2).long().expand(B, T).clone()
        labels[:, T // 2 - 1] = -100          # nothing is predicted across the document boundary
        out.append({"input_ids": ids[:, :-1], "labels": labels, "doc_ids": doc_ids})
    return out


def cfg(**kw):
    return TrainConfig(**{"steps": 8, "lr": 3e-3, "warmup": 2, "progress": False, **kw})


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- learning at all

def test_loss_falls_on_a_tiny_corpus(tmp_path):
    result = train(tiny(), ListBatches(pattern_batches(8)), NextToken(), cfg(steps=40), tmp_path / "out")
    assert result.losses[0] > math.log(V) - 0.5
    assert result.losses[-1] < 0.25 * result.losses[0]
    model = load_model(tmp_path / "out")            # the output is a normal checkpoint directory
    assert model.config.shapes() == ModelConfig.from_preset("tiny").shapes()


def test_metrics_jsonl_has_one_row_per_logged_step_with_the_required_fields(tmp_path):
    eval_batches = pattern_batches(2, seed=9)
    train(tiny(), ListBatches(pattern_batches(4)), NextToken(), cfg(steps=6, log_every=2, eval_every=3),
          tmp_path / "out", eval_batches=eval_batches)
    rows = read_metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [2, 3, 4, 6]            # log steps, plus the eval step 3
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(r)
    assert "eval_loss" in rows[1] and "eval_loss" in rows[3] and "eval_loss" not in rows[0]
    assert rows[-1]["tokens"] == 6 * 4 * 32


# ---------------------------------------------------------------- objectives

def test_sft_loss_is_cross_entropy_over_assistant_tokens_only():
    model = tiny().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 20), generator=g)
    labels = torch.randint(0, V, (3, 20), generator=g)
    labels[:, :12] = -100                                         # prompt / non-assistant part
    labels[1, 15:] = -100
    loss_sum, _ = SFT()(model, {"input_ids": ids, "labels": labels})
    logits = model(ids).float()
    manual, n = 0.0, 0
    for b in range(3):
        for t in range(20):
            if labels[b, t] != -100:
                manual -= torch.log_softmax(logits[b, t], -1)[labels[b, t]].item()
                n += 1
    assert SFT().count({"labels": labels}) == n == 3 * 8 - 5
    assert loss_sum.item() == pytest.approx(manual, rel=1e-5)


def test_sft_learns_assistant_tokens_while_the_masked_part_is_noise(tmp_path):
    """The non-assistant half of every row is fresh random noise (unlearnable: a loss over it
    would stay near ln V); the assistant half is a fixed pattern. With the mask, the loss
    the loop reports drops towards zero."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(40):
        noise = torch.randint(0, V, (4, 16), generator=g)
        answer = (torch.arange(17) % 8 + 100).expand(4, 17)
        ids = torch.cat([noise, answer], dim=1)                   # [4, 33]
        labels = ids[:, 1:].clone()
        labels[:, :15] = -100                                     # predict only inside the answer
        batches.append({"input_ids": ids[:, :-1], "labels": labels})
    result = train(tiny(), batches, SFT(), cfg(steps=40, lr=1e-2), tmp_path / "out")
    assert result.losses[0] > 5.0 and result.losses[-1] < 0.3
    # the same rows with the noise labelled too: about half the targets are unpredictable
    unmasked = [{"input_ids": b["input_ids"], "labels": torch.cat([b["input_ids"][:, 1:], b["labels"][:, -1:]], 1)}
                for b in batches]
    counted = train(tiny(), unmasked, SFT(), cfg(steps=40, lr=1e-2), tmp_path / "unmasked")
    assert counted.losses[-1] > 2.0


def test_sequence_logps_sum_completion_tokens_as_trl_does():
    """TRL: shift logits/labels by one, log-softmax, gather, zero outside the completion, sum."""
    model = tiny().train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, 12), generator=g)
    completion_mask = torch.zeros(2, 12, dtype=torch.long)
    completion_mask[0, 5:10] = 1                                  # row 0: prompt 0..4, completion 5..9, pad
    completion_mask[1, 3:12] = 1
    logits = model(ids)
    per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    trl = (per_token * completion_mask[:, 1:]).sum(-1)
    labels = torch.where(completion_mask[:, 1:].bool(), ids[:, 1:], -100)
    labels = F.pad(labels, (0, 1), value=-100)                    # our alignment: labels[t] = target at t
    ours, lengths = sequence_logps(logits, labels)
    torch.testing.assert_close(ours, trl, rtol=1e-6, atol=1e-5)
    assert lengths.tolist() == [5, 9]


def test_dpo_loss_matches_the_published_formulas_on_fixed_logps():
    pc = torch.tensor([-10.0, -20.0, -5.5, -7.0])
    pr = torch.tensor([-12.0, -18.0, -6.0, -7.0])
    rc = torch.tensor([-11.0, -19.0, -5.0, -6.0])
    rr = torch.tensor([-11.5, -19.5, -6.5, -8.0])
    lc, lr = torch.tensor([4, 8, 2, 3]), torch.tensor([5, 6, 2, 4])
    logsig = lambda x: -math.log1p(math.exp(-x))                   # noqa: E731
    for beta, eps in ((0.1, 0.0), (0.5, 0.0), (0.1, 0.2)):
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta, eps, "sigmoid")
        for i in range(4):
            h = (pc[i] - rc[i]).item() - (pr[i] - rr[i]).item()
            want = -logsig(beta * h) * (1 - eps) - logsig(-beta * h) * eps
            assert losses[i].item() == pytest.approx(want, rel=1e-6)
            assert chosen_r[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
            assert rejected_r[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())
    losses, _, _ = dpo_loss(pc, pr, rc, rr, 0.1, 0.0, "ipo", lc, lr)
    for i in range(4):
        h = (pc[i] - rc[i]).item() / lc[i].item() - (pr[i] - rr[i]).item() / lr[i].item()
        assert losses[i].item() == pytest.approx((h - 1 / (2 * 0.1)) ** 2, rel=1e-6)
    same, _, _ = dpo_loss(pc, pr, pc, pr, 0.1)
    torch.testing.assert_close(same, torch.full((4,), math.log(2)))


def dpo_batches(n, B=4, seed=0):
    """Prompt + chosen (a counting pattern) vs prompt + rejected (noise), right-padded, with
    different lengths per row; labels -100 on prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = {}
        for side in ("chosen", "rejected"):
            ids = torch.zeros(B, 24, dtype=torch.long)
            labels = torch.full((B, 24), -100)
            for b in range(B):
                P, C = 6, int(torch.randint(6, 14, (1,), generator=g))
                prompt = torch.randint(0, V, (P,), generator=g)
                resp = (torch.arange(C) % 8 + 100) if side == "chosen" else torch.randint(0, V, (C,), generator=g)
                seq = torch.cat([prompt, resp])
                ids[b, :len(seq)] = seq
                labels[b, P - 1:len(seq) - 1] = seq[P:]            # targets: the response tokens
            batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
        out.append(batch)
    return out


def test_dpo_starts_at_ln2_and_learns_the_preference(tmp_path):
    result = train(tiny(), ListBatches(dpo_batches(4)), DPO(beta=0.1), cfg(steps=12, lr=1e-3), tmp_path / "out")
    rows = read_metrics(tmp_path / "out")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)   # policy == reference at step 0
    assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["rewards/margin"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["rewards/accuracy"] == 0.0
    assert result.losses[-1] < 0.5 * math.log(2)
    assert rows[-1]["rewards/accuracy"] == 1.0 and rows[-1]["rewards/margin"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in rows[-1]
    assert (tmp_path / "out" / "checkpoints" / "dpo_reference.safetensors").exists()


def test_dpo_objective_agrees_with_formula_on_model_logps():
    """The objective's loss = the formula applied to sequence log-probs computed separately."""
    model = tiny().train()
    batch = dpo_batches(1)[0]
    objective = DPO(beta=0.2, label_smoothing=0.1)
    objective.add_reference(tiny(seed=5).train(), batch)           # a different reference model
    loss_sum, stats = objective(model, batch)
    pc, _ = sequence_logps(model(batch["chosen_input_ids"]), batch["chosen_labels"])
    pr, _ = sequence_logps(model(batch["rejected_input_ids"]), batch["rejected_labels"])
    ref = tiny(seed=5).train()
    rc, _ = sequence_logps(ref(batch["chosen_input_ids"]), batch["chosen_labels"])
    rr, _ = sequence_logps(ref(batch["rejected_input_ids"]), batch["rejected_labels"])
    h = (pc - rc) - (pr - rr)
    want = (-F.logsigmoid(0.2 * h) * 0.9 - F.logsigmoid(-0.2 * h) * 0.1).sum()
    assert loss_sum.item() == pytest.approx(want.item(), rel=1e-5)
    assert stats["rewards/margin"].item() == pytest.approx((0.2 * h).sum().item(), rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- schedule, accumulation

def test_schedules_follow_their_formulas():
    total, warmup, m = 100, 10, 0.1
    for s in range(warmup):
        assert lr_factor(s, total, warmup, "cosine", m) == pytest.approx((s + 1) / warmup)
    for s in range(warmup, total):
        p = (s - warmup) / (total - 1 - warmup)
        want = m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
        assert lr_factor(s, total, warmup, "cosine", m) == pytest.approx(want)
    assert lr_factor(total - 1, total, warmup, "cosine", m) == pytest.approx(m)
    decay = 20                                                     # decay_frac 0.2 of 100
    for s in range(warmup, total):
        f = lr_factor(s, total, warmup, "wsd", m, decay_frac=0.2)
        if s < total - decay:
            assert f == 1.0
        else:
            assert f == pytest.approx(m + (1 - m) * (1 - (s - (total - decay) + 1) / decay))
        fs = lr_factor(s, total, warmup, "wsd-sqrt", m, decay_frac=0.2)
        if s >= total - decay:
            assert fs == pytest.approx(m + (1 - m) * (1 - math.sqrt((s - (total - decay) + 1) / decay)))
    assert lr_factor(total - 1, total, warmup, "wsd", m) == pytest.approx(m)
    assert lr_factor(50, total, warmup, "constant") == 1.0


def test_lr_in_metrics_follows_the_schedule(tmp_path):
    c = cfg(steps=10, warmup=3, schedule="wsd", decay_frac=0.3, min_lr_ratio=0.0)
    train(tiny(), ListBatches(pattern_batches(2)), NextToken(), c, tmp_path / "out")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "out")]
    assert lrs == pytest.approx([c.lr * lr_factor(s, 10, 3, "wsd", 0.0, 0.3) for s in range(10)])


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    """Two micro-batches of 2 rows with different numbers of labelled tokens = one batch of 4
    (the loss is normalised by the tokens of the whole step, not averaged per micro-batch)."""
    big = pattern_batches(6, B=4)
    for b in big:
        b["labels"][:2, :10] = -100                                # uneven label counts per half
    halves = [{k: v[s] for k, v in b.items()} for b in big for s in (slice(0, 2), slice(2, 4))]
    a = train(tiny(), ListBatches(big), NextToken(), cfg(steps=6), tmp_path / "big")
    b = train(tiny(), ListBatches(halves), NextToken(), cfg(steps=6, grad_accum=2), tmp_path / "accum")
    assert a.losses == pytest.approx(b.losses, abs=1e-6)
    wa, wb = load_file(tmp_path / "big" / "model.safetensors"), load_file(tmp_path / "accum" / "model.safetensors")
    for name in wa:   # 6 AdamW steps amplify fp32 summation-order noise (different GEMM shapes) to ~1e-6
        torch.testing.assert_close(wa[name], wb[name], atol=3e-6, rtol=0)


def test_activation_checkpointing_does_not_change_the_losses(tmp_path):
    a = train(tiny(), ListBatches(pattern_batches(3)), NextToken(), cfg(steps=4), tmp_path / "a")
    b = train(tiny(), ListBatches(pattern_batches(3)), NextToken(), cfg(steps=4, activation_checkpointing=True),
              tmp_path / "b")
    assert a.losses == pytest.approx(b.losses, abs=1e-6)


# ---------------------------------------------------------------- exact resume

def interrupting(objective_cls, after_calls):
    """The objective, but Ctrl-C (KeyboardInterrupt) arrives on forward number after_calls + 1."""
    class Interrupting(objective_cls):
        calls = 0

        def __call__(self, model, batch):
            self.calls += 1
            if self.calls > after_calls:
                raise KeyboardInterrupt
            return super().__call__(model, batch)
    return Interrupting()


@pytest.mark.parametrize("kind", ["next_token", "dpo", "plain_list"])
def test_resume_after_interrupt_reproduces_the_uninterrupted_run_exactly(tmp_path, kind):
    """Run 8 steps straight; then run again, press Ctrl-C in the middle of step 6 (grad_accum 2),
    and resume: the loss sequence and the final weights are bit-identical on CPU fp32.
    plain_list: batches without state_dict(); the loop replays them up to the saved position."""
    if kind == "dpo":
        data, objective = dpo_batches(5), DPO
    else:
        data, objective = pattern_batches(5, B=2), NextToken
    make = (lambda: itertools.cycle(data)) if kind == "plain_list" else (lambda: ListBatches(data))  # noqa: E731
    c = cfg(steps=8, grad_accum=2, save_every=4)
    full = train(tiny(), make(), objective(), c, tmp_path / "full")

    with pytest.raises(KeyboardInterrupt):
        train(tiny(), make(), interrupting(objective, 5 * 2 + 1), c, tmp_path / "cut")
    assert (tmp_path / "cut" / "checkpoints" / "step-00000005").is_dir()   # saved on Ctrl-C
    assert not (tmp_path / "cut" / "config.json").exists()
    first = [r["loss"] for r in read_metrics(tmp_path / "cut")]
    resumed = train(tiny(seed=123), make(), objective(), c, tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 5
    assert first + resumed.losses == full.losses                   # exact equality
    rows = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(tmp_path / "full")]
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_resume_restores_optimizer_moments_and_data_position(tmp_path):
    c = cfg(steps=3, save_every=2)
    train(tiny(), ListBatches(pattern_batches(5)), NextToken(), c, tmp_path / "out")
    ckpt = tmp_path / "out" / "checkpoints" / "step-00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"]["state"] == {"index": 2}
    assert state["schedule"]["name"] == "cosine" and "torch" in state["rng"]
    stored = stored_tensors(ckpt)
    assert "optimizer.embed.weight.exp_avg" in stored and "optimizer.embed.weight.exp_avg_sq" in stored
    assert float(read_tensor(ckpt, "optimizer.embed.weight.step")) == 2.0
    assert load_model(ckpt).config.shapes() == ModelConfig.from_preset("tiny").shapes()   # a loadable checkpoint


# ---------------------------------------------------------------- plug-ins: objectives with hooks, what is trained

class NoisyNextToken(NextToken):
    """Next-token loss scaled by (1 + u), u drawn from the objective's own generator each call
    (state only its state_dict carries across a resume), plus a weight prepare() derives from
    the upcoming batches (so a resume must show it the same ones)."""

    name = "noisy"

    def __init__(self):
        self.generator = torch.Generator().manual_seed(7)
        self.forwards, self.prepared = 0, []

    def prepare(self, ctx):
        upcoming = ctx.peek(ctx.micro_batches_left)
        self.prepared.append((ctx.resuming, ctx.micro_batches_left, len(upcoming), len(ctx.eval_batches)))
        self.weight = 1 + len(upcoming) / 100

    def __call__(self, model, batch):
        loss, stats = super().__call__(model, batch)
        self.forwards += 1
        u = torch.rand((), generator=self.generator)
        return loss * (1 + u), {"u": u * self.count(batch)}

    def state_dict(self):
        return {"generator": self.generator.get_state(), "forwards": self.forwards}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.forwards = state["forwards"]


def test_an_objective_with_prepare_and_state_hooks_resumes_exactly(tmp_path):
    data, c = pattern_batches(5, B=2), cfg(steps=8, grad_accum=2, save_every=4)
    full = train(tiny(), ListBatches(data), NoisyNextToken(), c, tmp_path / "full", eval_batches=data[:1])
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), ListBatches(data), interrupting(NoisyNextToken, 5 * 2 + 1), c, tmp_path / "cut")
    ckpt = tmp_path / "cut" / "checkpoints" / "step-00000005"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["objective"] == "noisy" and state["objective_state"] == {"forwards": 10}
    assert set(load_file(ckpt / "objective.safetensors")) == {"generator"}
    first = [r["loss"] for r in read_metrics(tmp_path / "cut")]
    objective = NoisyNextToken()
    resumed = train(tiny(seed=3), ListBatches(data), objective, c, tmp_path / "cut", resume=True,
                    eval_batches=data[:1])
    assert objective.prepared == [(True, 3 * 2, 3 * 2, 1)] and objective.forwards == 16 + 1   # + the eval batch
    assert first + resumed.losses == full.losses                   # exact equality
    assert [r["u"] for r in read_metrics(tmp_path / "cut")] == [r["u"] for r in read_metrics(tmp_path / "full")]


class OnlyNorms(WholeModel):
    """Trains the RMSNorm gains alone; checkpoints hold only them."""

    def parameters(self, model):
        return [p for name, p in model.named_parameters() if "norm" in name]

    def state_dict(self, model):
        return {k: v for k, v in super().state_dict(model).items() if "norm" in k}

    def load_state_dict(self, model, tensors):
        from lmfoundry.train.trainable import load_full_state_dict
        load_full_state_dict(model, tensors, strict=False)


def test_a_custom_trainable_trains_only_its_parameters_and_resumes_exactly(tmp_path):
    initial = tiny().state_dict()
    norms = {k for k in initial if "norm" in k}
    c = cfg(steps=6, save_every=3, weight_decay=0.1)
    full = train(tiny(), ListBatches(pattern_batches(4)), NextToken(), c, tmp_path / "full", trainable=OnlyNorms())
    final = load_model(tmp_path / "full").state_dict()
    assert all(torch.equal(final[k], initial[k]) for k in initial if k not in norms)     # bit-identical
    assert all(not torch.equal(final[k], initial[k]) for k in norms)
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000003"
    assert set(load_file(ckpt / "trainable.safetensors")) == norms and not (ckpt / "config.json").exists()
    moments = [k.removeprefix("optimizer.").rsplit(".", 1)[0] for k in stored_tensors(ckpt)]
    assert set(moments) == norms                                   # the optimizer saw nothing else

    with pytest.raises(KeyboardInterrupt):
        train(tiny(), ListBatches(pattern_batches(4)), interrupting(NextToken, 4), c, tmp_path / "cut",
              trainable=OnlyNorms())
    first = [r["loss"] for r in read_metrics(tmp_path / "cut")]
    resumed = train(tiny(), ListBatches(pattern_batches(4)), NextToken(), c, tmp_path / "cut", resume=True,
                    trainable=OnlyNorms())
    assert resumed.resumed_from == 4 and first + resumed.losses == full.losses
    assert all(torch.equal(v, final[k]) for k, v in load_model(tmp_path / "cut").state_dict().items())


def test_evaluate_loss_is_the_mean_cross_entropy_over_all_labelled_tokens():
    model, batches = tiny(), pattern_batches(3, B=2)
    batches[1]["labels"][:, :20] = -100                            # unequal counts: a mean of means would differ
    logits = [model(b["input_ids"], doc_ids=b["doc_ids"]).float() for b in batches]
    nll = torch.cat([F.cross_entropy(lg.flatten(0, 1), b["labels"].flatten(), reduction="none")[b["labels"].flatten()
                                                                                             != -100]
                     for lg, b in zip(logits, batches)])
    assert evaluate_loss(model, NextToken(), batches)["eval_loss"] == pytest.approx(nll.mean().item(), rel=1e-6)


# ---------------------------------------------------------------- bad input

class NaNAfter(NextToken):
    def __init__(self, calls):
        self.calls, self.seen = calls, 0

    def __call__(self, model, batch):
        loss, stats = super().__call__(model, batch)
        self.seen += 1
        return (loss * float("nan") if self.seen > self.calls else loss), stats


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainError, match=r"step 5: loss is nan.*last good checkpoint is .*step-00000004"):
        train(tiny(), ListBatches(pattern_batches(3)), NaNAfter(4), cfg(steps=10, save_every=2), out)
    assert (out / "checkpoints" / "step-00000004" / "trainer_state.json").exists()
    assert not (out / "config.json").exists()                      # no final model from a broken run
    weights = load_model(out / "checkpoints" / "step-00000004").state_dict()
    assert all(torch.isfinite(t).all() for t in weights.values())
    with pytest.raises(TrainError, match="no checkpoint was saved"):
        train(tiny(), ListBatches(pattern_batches(3)), NaNAfter(0), cfg(steps=3), tmp_path / "other")


def test_existing_output_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="already exists"):
        train(tiny(), ListBatches(pattern_batches(1)), NextToken(), cfg(steps=1), out)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(TrainError, match="no checkpoint to resume"):
        train(tiny(), ListBatches(pattern_batches(1)), NextToken(), cfg(steps=1), out, resume=True)
    train(tiny(), ListBatches(pattern_batches(1)), NextToken(), cfg(steps=1), out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "notes.txt").exists()


def test_bad_settings_are_one_clear_error():
    with pytest.raises(TrainError, match="schedule"):
        TrainConfig(schedule="linear-ish")
    with pytest.raises(TrainError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(TrainError, match="unknown training setting"):
        TrainConfig.from_dict({"stepz": 3})


# ---------------------------------------------------------------- continued pretraining from a checkpoint

def test_continued_pretraining_keeps_format_dtype_and_tokenizer(demo_dir, tmp_path):
    src = convert(demo_dir, tmp_path / "src", to="mistral", dtype="bfloat16")
    model = load_model(src)
    train(model, ListBatches(pattern_batches(2)), NextToken(), cfg(steps=2), tmp_path / "out",
          format="mistral", tokenizer_from=src)      # the CLI reads both from --model (test below)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["architectures"] == ["MistralForCausalLM"] and out_cfg["torch_dtype"] == "bfloat16"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (demo_dir / "tokenizer.json").read_bytes()
    trained = load_model(tmp_path / "out")
    assert trained.dtype == torch.bfloat16
    step_cfg = json.loads((tmp_path / "out" / "checkpoints" / "step-00000002" / "config.json").read_text())
    assert step_cfg["torch_dtype"] == "float32"                    # step checkpoints keep fp32 for exact resume


@pytest.mark.slow
def test_torch_compile_gives_the_same_losses(tmp_path):
    a = train(tiny(), ListBatches(pattern_batches(3)), NextToken(), cfg(steps=4), tmp_path / "a")
    b = train(tiny(), ListBatches(pattern_batches(3)), NextToken(), cfg(steps=4, compile=True), tmp_path / "b")
    assert a.losses == pytest.approx(b.losses, abs=1e-5)


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    from lmfoundry.demo import CORPUS
    root = tmp_path_factory.mktemp("cli_data")
    (root / "corpus.txt").write_text("\n\n".join(CORPUS.splitlines() * 4), encoding="utf-8")
    with open(root / "sft.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                             {"role": "assistant", "content": f"{i} + 1 = {i + 1}."}]}) + "\n")
    with open(root / "dpo.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": "No idea."}) + "\n")
    return root


def cli(capsys, *argv):
    from lmfoundry.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_pretrain_sft_dpo_produce_loadable_checkpoints(demo_dir, cli_data, tmp_path, capsys):
    from lmfoundry.tokenizer import load_tokenizer
    common = ["--seq-len", 64, "--batch-size", 2, "--steps", 3, "--no-progress"]
    code, _, err = cli(capsys, "pretrain", "--model", "tiny", "--tokenizer", demo_dir,
                       "--data", cli_data / "corpus.txt", "--out", tmp_path / "pre", "--tokenized", tmp_path / "tok", *common)
    assert code == 0, err
    code, _, err = cli(capsys, "sft", "--model", tmp_path / "pre", "--data", cli_data / "sft.jsonl",
                       "--out", tmp_path / "sft", *common)
    assert code == 0, err
    code, _, err = cli(capsys, "dpo", "--model", tmp_path / "sft", "--data", cli_data / "dpo.jsonl",
                       "--out", tmp_path / "dpo", "--beta", 0.2, *common)
    assert code == 0, err
    for name in ("pre", "sft", "dpo"):
        model = load_model(tmp_path / name)
        assert load_tokenizer(tmp_path / name).vocab_size <= model.config.vocab_size
        assert len(read_metrics(tmp_path / name)) == 3
    assert read_metrics(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pre_cfg = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert pre_cfg["eos_token_id"] == load_tokenizer(demo_dir).eos_token_id   # a preset takes the tokenizer's ids


def test_cli_resume_continues_exactly_and_refuses_an_existing_out(demo_dir, cli_data, tmp_path, capsys):
    args = ["pretrain", "--model", "tiny", "--tokenizer", demo_dir, "--data", cli_data / "corpus.txt", "--out",
            tmp_path / "run", "--tokenized", tmp_path / "tok", "--seq-len", 64, "--batch-size", 2, "--steps", 6,
            "--save-every", 3, "--no-progress"]
    assert cli(capsys, *args)[0] == 0
    straight = [r["loss"] for r in read_metrics(tmp_path / "run")]
    code, _, err = cli(capsys, *args)
    assert code == 1 and "already exists" in err and err.count("\n") == 1
    import shutil
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000006")      # as if it died after step 3..5
    assert cli(capsys, *args, "--resume")[0] == 0
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == straight
    assert cli(capsys, *args, "--overwrite")[0] == 0


def test_cli_config_file_is_overridden_by_flags(demo_dir, cli_data, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"model: {demo_dir}\ndata: [{cli_data / 'sft.jsonl'}]\nsteps: 4\nlr: 0.001\n"
                                     "seq-len: 64\nbatch_size: 2\nprogress: false\n")
    code, _, err = cli(capsys, "sft", "--config", tmp_path / "c.yaml", "--out", tmp_path / "o", "--steps", 2)
    assert code == 0, err
    rows = read_metrics(tmp_path / "o")
    assert len(rows) == 2 and rows[0]["lr"] == pytest.approx(1e-3)
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    code, _, err = cli(capsys, "sft", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "p")
    assert code == 1 and "unknown setting(s) for sft: stepz" in err


def test_cli_continued_pretraining_keeps_the_sources_format_dtype_and_tokenizer(demo_dir, cli_data, tmp_path,
                                                                               capsys):
    src = convert(demo_dir, tmp_path / "src", to="mistral", dtype="bfloat16")
    code, _, err = cli(capsys, "pretrain", "--model", src, "--data", cli_data / "corpus.txt", "--out", tmp_path / "o",
                       "--tokenized", tmp_path / "tok", "--seq-len", 64, "--batch-size", 2, "--steps", 2,
                       "--no-progress")
    assert code == 0, err
    out_cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out_cfg["architectures"] == ["MistralForCausalLM"] and out_cfg["torch_dtype"] == "bfloat16"
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (demo_dir / "tokenizer.json").read_bytes()


def test_cli_checks_the_output_directory_and_joins_the_process_group_once(demo_dir, cli_data, tmp_path, capsys,
                                                                         monkeypatch):
    from lmfoundry.train import distributed, loop, recipe, state
    calls = []

    def counted(name, fn):
        return lambda *a, **kw: calls.append(name) or fn(*a, **kw)
    monkeypatch.setattr(distributed, "init_distributed", counted("init", distributed.init_distributed))
    for module in (recipe, loop, state):
        if hasattr(module, "prepare_out_dir"):
            monkeypatch.setattr(module, "prepare_out_dir", counted("prepare", state.prepare_out_dir))
    code, _, err = cli(capsys, "sft", "--model", demo_dir, "--data", cli_data / "sft.jsonl", "--out", tmp_path / "o",
                       "--seq-len", 64, "--batch-size", 2, "--steps", 1, "--no-progress")
    assert code == 0, err
    assert sorted(calls) == ["init", "prepare"]


def test_cli_preset_without_tokenizer_is_one_clear_error(cli_data, tmp_path, capsys):
    code, _, err = cli(capsys, "pretrain", "--model", "tiny", "--data", cli_data / "corpus.txt",
                       "--out", tmp_path / "o")
    assert code == 1 and "--tokenizer" in err and err.count("\n") == 1


def test_an_output_format_that_cannot_hold_the_model_is_refused_before_training(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-openelm"))
    with pytest.raises(TrainError, match="llama format cannot hold"):
        train(model, ListBatches(pattern_batches(1)), NextToken(), cfg(steps=1), tmp_path / "o", format="llama")
    assert not (tmp_path / "o" / "checkpoints").exists()
