"""Reward models, online DPO and GRPO: lmfoundry vs TRL 1.16, side by side in one run.

    .venv/bin/python benchmarks/rl.py                 # CPU, fp32, a ~3M-parameter Llama policy, 2 threads
    .venv/bin/python benchmarks/rl.py --only grpo --rounds 3

The same policy (a random Llama saved as a Hugging Face directory with lmfoundry's demo BPE
tokenizer and ChatML template, loaded by both), the same prompts and the same settings:

1. GRPO: lmfoundry's `GRPO` objective vs TRL's `GRPOTrainer`: G = 8 samples of 2 math questions
   per step (16 completions), up to --new-tokens each at temperature 1, beta 0, loss_type dapo,
   one optimizer step per rollout. The same Python function scores both sides (digit_share: a
   verifier whose scores vary across a random policy's samples, so no pair is skipped as a tie).
2. Online DPO: lmfoundry's `OnlineDPO` vs TRL's `trl.experimental.online_dpo.OnlineDPOTrainer`:
   2 samples of 4 questions per step, temperature 0.9, the same verifier, beta 0.1, the frozen
   initial policy as reference.
3. Reward model: lmfoundry's `BradleyTerry` objective on a `RewardModel` vs TRL's `RewardTrainer`
   on `AutoModelForSequenceClassification` (num_labels 1) with the same body weights, the same
   pairs as token ids (our DPOBatches rendering, handed to TRL pre-tokenized), 8 pairs per step.

Figures: optimizer steps per second of wall time and CPU seconds per step over the steps after
--warmup (generation included: it is most of an online step), and the peak RSS of the process.
Each measurement runs in a fresh subprocess (its own ru_maxrss); the machine is shared, so the
two sides alternate --rounds times and each side's best round is reported (CPU seconds, which
other processes inflate less than wall time, come with it). TRL, accelerate and datasets are
test dependencies (pyproject's `test` extra); TRL's gradient checkpointing is switched off so
both sides do the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SIZES = {"tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512),   # the test preset's
         "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=512)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- shared setup

def policy_dir(tmp, size="tiny") -> Path:
    """A random Llama policy with the demo tokenizer (chat template) as a Hugging Face directory."""
    from lmfoundry.checkpoint import save_model
    from lmfoundry.config import ModelConfig
    from lmfoundry.demo import make_demo_checkpoint
    from lmfoundry.model import Transformer
    demo = make_demo_checkpoint(Path(tmp) / "demo")
    from lmfoundry.checkpoint import read_config
    base = read_config(demo)[0]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=base.vocab_size, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                      pad_token_id=base.pad_token_id, **SIZES[size])
    return save_model(Transformer(cfg), Path(tmp) / "policy", format="llama", tokenizer_from=demo)


def prompts(n=64) -> list[dict]:
    import random
    r = random.Random(0)
    out = []
    for _ in range(n):
        a, b = r.randint(1, 20), r.randint(1, 20)
        out.append({"prompt": [{"role": "user", "content": f"Tom has {a} apples and buys {b} more. How many apples "
                                                            "does he have?"}], "answer": f"#### {a + b}"})
    return out


def preference_pairs(n=64) -> list[dict]:
    words = "the model learns which answer people prefer and why that answer is better than the other".split()
    g = torch.Generator().manual_seed(0)

    def pick(k):
        return " ".join(words[int(j)] for j in torch.randint(0, len(words), (k,), generator=g))
    return [{"prompt": f"Question {i}: {pick(12)}?", "chosen": pick(40), "rejected": pick(30)} for i in range(n)]


def digit_share(text: str, answer) -> float:
    """The benchmark's verifier: the share of the completion's characters that are digits. A random
    policy never writes a correct `#### N`, so GSM8K's 0/1 check would tie every sample (online DPO
    would then skip every pair and train on nothing, TRL would not); this one varies per sample."""
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


def trl_reward(prompts, completions, answer, **kw):
    """TRL's reward-function signature around the very function lmfoundry's Verifier calls."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [digit_share(t, a) for t, a in zip(texts, answer)]


class Clock:
    """Wall and CPU time from the start of step `warmup + 1` to the end of the run."""

    def __init__(self, warmup: int):
        self.warmup, self.start = warmup, None

    def mark(self, step: int):
        if step == self.warmup and self.start is None:
            self.start = (time.perf_counter(), time.process_time())

    def result(self, steps: int) -> dict:
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        timed = steps - self.warmup
        return {"steps_per_s": timed / wall, "cpu_s_per_step": cpu / timed}


class Counted:
    """A batch iterator (with exact-resume state) that tells the clock which step is starting."""

    def __init__(self, inner, clock):
        self.inner, self.clock, self.n = inner, clock, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.clock.mark(self.n)
        self.n += 1
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def trl_clock_callback(clock):
    import transformers

    class Tick(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.mark(state.global_step)
    return Tick()


TRL_COMMON = dict(logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0)


def our_config(a, lr):
    from lmfoundry.train import TrainConfig
    return TrainConfig(steps=a.steps, lr=lr, schedule="constant", weight_decay=0.0, betas=(0.9, 0.999), clip=1.0,
                       progress=False, device="cpu", dtype="float32", keep_checkpoints=1)


# ---------------------------------------------------------------- children (one measurement each)

def child_online_lmfoundry(a, tmp, verb):
    from lmfoundry.checkpoint import load_model
    from lmfoundry.generate import SamplingParams
    from lmfoundry.tokenizer import load_tokenizer
    from lmfoundry.train import train
    from lmfoundry.train.online import GRPO, OnlineDPO
    from lmfoundry.train.rollout import PromptBatches, Verifier
    path = policy_dir(tmp, a.size)
    tok = load_tokenizer(path)
    if verb == "grpo":
        objective = GRPO(Verifier(digit_share), SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0),
                         num_generations=8, tokenizer=tok, loss_type="dapo")
        batch, lr = 2, 1e-6
    else:
        objective = OnlineDPO(Verifier(digit_share), SamplingParams(max_new_tokens=a.new_tokens, temperature=0.9),
                              num_generations=2, tokenizer=tok, beta=0.1)
        batch, lr = 4, 5e-7
    clock = Clock(a.warmup)
    batches = Counted(PromptBatches(prompts(), tok, batch), clock)
    train(load_model(path), batches, objective, our_config(a, lr), Path(tmp) / "out")
    return clock.result(a.steps)


def child_grpo_trl(a, tmp):
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    path = policy_dir(tmp, a.size)
    clock = Clock(a.warmup)
    args = GRPOConfig(output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=16, num_generations=8,
                      max_completion_length=a.new_tokens, temperature=1.0, learning_rate=1e-6, beta=0.0,
                      loss_type="dapo", max_steps=a.steps, **TRL_COMMON)
    trainer = GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(path), reward_funcs=trl_reward,
                          args=args, train_dataset=Dataset.from_list(prompts()),
                          processing_class=transformers.AutoTokenizer.from_pretrained(path),
                          callbacks=[trl_clock_callback(clock)])
    trainer.train()
    return clock.result(a.steps)


def child_online_dpo_trl(a, tmp):
    import transformers
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    path = policy_dir(tmp, a.size)
    clock = Clock(a.warmup)
    args = OnlineDPOConfig(output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=4,
                           max_new_tokens=a.new_tokens, temperature=0.9, learning_rate=5e-7, beta=[0.1],
                           max_steps=a.steps, **TRL_COMMON)
    trainer = OnlineDPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(path), reward_funcs=[trl_reward],
                               args=args, train_dataset=Dataset.from_list(prompts()),
                               processing_class=transformers.AutoTokenizer.from_pretrained(path),
                               callbacks=[trl_clock_callback(clock)])
    trainer.train()
    return clock.result(a.steps)


def reward_data(path):
    from lmfoundry.data import DPOBatches
    from lmfoundry.tokenizer import load_tokenizer
    return DPOBatches(preference_pairs(), load_tokenizer(path), seq_len=256, batch_size=8, seed=0, epochs=None,
                      progress=False)


def child_reward_lmfoundry(a, tmp):
    from lmfoundry.checkpoint import load_model
    from lmfoundry.train import train
    from lmfoundry.train.reward import BradleyTerry, RewardModel, RewardModelWeights
    path = policy_dir(tmp, a.size)
    torch.manual_seed(0)
    clock = Clock(a.warmup)
    train(RewardModel(load_model(path)), Counted(reward_data(path), clock), BradleyTerry(), our_config(a, 1e-4),
          Path(tmp) / "out", trainable=RewardModelWeights())
    return clock.result(a.steps)


def child_reward_trl(a, tmp):
    import transformers
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    path = policy_dir(tmp, a.size)
    rows = []
    for c_ids, c_lab, r_ids, r_lab in reward_data(path).pairs:     # the same ids, cut after the reply's last token
        ends = [int((torch.as_tensor(lab) != -100).nonzero()[-1]) + 2 for lab in (c_lab, r_lab)]
        rows.append({"chosen_ids": [int(x) for x in c_ids[:ends[0]]], "rejected_ids": [int(x) for x in r_ids[:ends[1]]]})
    clock = Clock(a.warmup)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=8, learning_rate=1e-4,
                        max_steps=a.steps, **TRL_COMMON)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                            callbacks=[trl_clock_callback(clock)])
    trainer.train()
    return clock.result(a.steps)


CHILDREN = {"grpo/lmfoundry": lambda a, t: child_online_lmfoundry(a, t, "grpo"), "grpo/TRL GRPOTrainer": child_grpo_trl,
            "online-dpo/lmfoundry": lambda a, t: child_online_lmfoundry(a, t, "online-dpo"),
            "online-dpo/TRL OnlineDPOTrainer": child_online_dpo_trl,
            "reward/lmfoundry": child_reward_lmfoundry, "reward/TRL RewardTrainer": child_reward_trl}
TARGETS = {"grpo": 2.0, "online-dpo": 2.0, "reward": 1.3}


def run_child(name, argv):
    cmd = [sys.executable, __file__, "--child", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    top = max(ok, key=lambda r: r["steps_per_s"])
    return {**top, "cpu_s_per_step": min(r["cpu_s_per_step"] for r in ok),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "rounds": [round(r["steps_per_s"], 3) for r in ok]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per completion (at most)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; the best is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side (1: the machine is shared)")
    ap.add_argument("--size", default="tiny", choices=list(SIZES), help="the policy: tiny (0.1M, the tests' "
                    "preset) or small (3.4M)")
    ap.add_argument("--only", default=None, help="grpo, online-dpo or reward")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child:
        with tempfile.TemporaryDirectory() as tmp:
            result = CHILDREN[a.child](a, tmp)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    import transformers
    import trl
    from lmfoundry.config import ModelConfig
    params = ModelConfig(vocab_size=512, **SIZES[a.size]).num_params()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}; {a.threads} "
          f"threads, CPU fp32 (a shared machine); Llama policy {params / 1e6:.1f}M params, {a.steps} steps "
          f"({a.warmup} untimed), {a.new_tokens} new tokens per completion, {a.rounds} alternating rounds")
    argv = [x for x in sys.argv[1:] if x]
    for task, target in TARGETS.items():
        if a.only and task != a.only:
            continue
        names = [n for n in CHILDREN if n.startswith(task + "/")]
        results = {n: [] for n in names}
        for _ in range(a.rounds):
            for n in names:
                results[n].append(run_child(n, argv))
        print(f"\n{task:<34} steps/s   CPU s/step   peak RSS MB   (rounds: steps/s)")
        shown = {n: best(r) for n, r in results.items()}
        for n, r in shown.items():
            print(f"  {n.split('/', 1)[1]:<32} {r.get('steps_per_s', 0):>6.2f}   {r.get('cpu_s_per_step', 0):>9.2f}   "
                  f"{r.get('peak_rss_mb', 0):>10,.0f}   {r.get('rounds', r.get('error', ''))}")
        ours, theirs = shown[names[0]], shown[names[1]]
        if "error" in ours or "error" in theirs:
            continue
        speed, cpu = ours["steps_per_s"] / theirs["steps_per_s"], theirs["cpu_s_per_step"] / ours["cpu_s_per_step"]
        rss = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
        print(f"  ratio lmfoundry / TRL: {speed:.2f}x steps/s (target >= {target}x), {cpu:.2f}x fewer CPU s/step, "
              f"{rss:.2f}x peak RSS")


if __name__ == "__main__":
    main()
