"""`lmfoundry quickstart`: the SOLAR 10.7B recipe end to end, on a laptop CPU, in minutes.

    run("runs/quickstart")              # ~6 minutes on 2 cores; run(..., fast=True): ~1 minute

Every stage is a real lmfoundry step on data the package generates itself (synth.py):

    data        bilingual EN/KO corpus, math SFT sets, preference pairs, held-out and test sets
    tokenizer   byte-level BPE on the corpus; EXAONE-style compression table (EN vs KO)
    base        pretrain an n-layer base model
    upscale     Depth Up-Scaling: keep layers [0, n-m) of one copy and [m, n) of another
    continue    continued pretraining of the up-scaled model
    control     the base model continued for the same training FLOPs (the comparison SOLAR implies)
    sft-a/sft-b two SFT variants on different mixtures (SOLAR's SFT v3 / v4)
    merge       their average
    dpo         DPO on Synth. Math-Alignment-style pairs (chosen: correct, rejected: flawed)
    online      online DPO on fresh math questions (EXAONE's order: offline, then online): the policy
                samples, the GSM8K verifier scores, best vs worst sample is the pair
    eval:*      after every model: held-out loss, math exact match (GSM8K format), multiple
                choice (ARC format), preference accuracy
    report      DIR/report.md with tables, plots and the claims checked (report.py)

Each stage's result goes into DIR/quickstart.json when it ends, so a rerun skips what is done,
and a training stage interrupted midway resumes from its last checkpoint (Ctrl-C saves one).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import QuickstartError
from . import synth
from .report import write_report
from .stages import STAGES, fmt_seconds

STATE = "quickstart.json"
VERSION = 1


@dataclass(frozen=True)
class Plan:
    name: str
    sizes: synth.Sizes
    vocab_size: int
    dim: int
    n_layers: int
    drop: int                      # DUS m: 2 * (n_layers - drop) layers after up-scaling
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    seq_len: int                   # pretraining rows (and the model's context)
    batch_size: int
    base_steps: int
    continue_steps: int            # the up-scaled model's; the control gets the same FLOPs
    sft_steps: int
    dpo_steps: int
    online_steps: int
    lr_base: float = 6e-3            # tiny models want large learning rates and many small steps
    lr_continue: float = 1.5e-3      # re-warming to a high peak costs a loss bump in both arms
    lr_sft: float = 1e-3
    lr_dpo: float = 1e-4
    dpo_beta: float = 0.1
    lr_online: float = 1e-4
    online_beta: float = 0.1
    online_k: int = 4                # samples per question (best vs worst)
    online_temperature: float = 1.0
    warmup: int = 20
    eval_points: int = 10            # held-out evaluations per training stage
    eval_batches: int = 16
    math_limit: int | None = None    # test problems evaluated (None: all)
    mc_limit: int | None = None
    max_gen_toks: int = 64

    def model_config(self, tokenizer=None, upscaled: bool = False):
        """The base model's config (special token ids from `tokenizer`), or the up-scaled one's."""
        from ..config import ModelConfig
        ids = {}
        if tokenizer is not None:
            ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "pad")}
            ids["eos_token_id"] = [t for t in (tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>"))
                                   if t is not None]
        layers = 2 * (self.n_layers - self.drop) if upscaled else self.n_layers
        return ModelConfig(vocab_size=self.vocab_size, dim=self.dim, n_layers=layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim, max_seq_len=self.seq_len, **ids)


PLANS = {
    "default": Plan("default", synth.Sizes(), vocab_size=2048, dim=128, n_layers=8, drop=2, n_heads=4, n_kv_heads=2,
                    ffn_dim=352, seq_len=256, batch_size=4, base_steps=750, continue_steps=300, sft_steps=130,
                    dpo_steps=40, online_steps=30, max_gen_toks=48),
    "fast": Plan("fast", synth.Sizes(pretrain_docs=2500, continue_docs=1200, heldout_docs=100, lang_docs=80,
                                     sft_general=400, sft_math=400, sft_heldout=40, dpo_pairs=200, dpo_heldout=40,
                                     math_test=30, mc_test=40, online_prompts=64),
                 vocab_size=1024, dim=64, n_layers=4, drop=1, n_heads=4, n_kv_heads=2, ffn_dim=176, seq_len=256,
                 batch_size=4, base_steps=150, continue_steps=60, sft_steps=40, dpo_steps=20, online_steps=6,
                 eval_batches=4, max_gen_toks=40),
}

def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (Kaplan et al.): 6 per matmul weight (forward + backward, the LM
    head included, the embedding lookup not) plus 6 * layers * context * dim for attention."""
    matmul = sum(math.prod(shape) for name, shape in cfg.shapes().items() if len(shape) == 2 and name != "embed.weight")
    matmul += cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0
    attn = sum(h * cfg.head_dim for h in cfg.n_heads)
    return 6.0 * matmul + 6.0 * seq_len * attn


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB


class Quickstart:
    def __init__(self, out, plan: Plan, seed: int = 0, force: bool = False, progress: bool = True):
        self.out, self.plan, self.seed, self.progress = Path(out), plan, seed, progress
        self.settings = {"version": VERSION, "plan": dataclasses.asdict(plan), "seed": seed}
        state_path = self.out / STATE
        if self.out.exists() and not self.out.is_dir():
            raise QuickstartError(f"{self.out}: not a directory; choose another --out")
        if force and self.out.exists():
            where = self.out.resolve()
            if where in (Path.home().resolve(), Path(where.anchor)) or Path.cwd().resolve().is_relative_to(where):
                raise QuickstartError(f"--force would delete {where}, which holds the current directory or is home "
                                      "or the root; choose a dedicated --out")
            shutil.rmtree(self.out)
        if state_path.is_file():
            try:
                self.state = json.loads(state_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise QuickstartError(f"{state_path}: unreadable ({e}); use --force to start over") from None
            if self.state.get("settings") != self.settings:
                was = (self.state.get("settings") or {}).get("plan", {}).get("name", "?")
                raise QuickstartError(f"{self.out} holds a quickstart run with other settings (plan {was!r}, "
                                      f"seed {self.state.get('settings', {}).get('seed')}); use --force to start "
                                      "over or choose another --out")
        elif self.out.exists() and any(self.out.iterdir()):
            raise QuickstartError(f"{self.out}: exists, is not empty and holds no quickstart run ({STATE}); "
                                  "use --force to replace it or choose another --out")
        else:
            self.state = {"settings": self.settings, "stages": {}}
        self.data = self.out / "data"
        self.models = self.out / "models"
        self.work = self.out / "work"
        self.tok_dir = self.out / "tokenizer"

    # ---- bookkeeping ----
    def _save_state(self):
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.out / STATE)

    def done(self, stage: str) -> dict | None:
        return self.state["stages"].get(stage)

    def _estimate(self, stage: str) -> float:
        """Seconds a stage should take: training FLOPs at the measured rate, evals by the last one."""
        measured = [s for k, s in self.state["stages"].items() if "flops" in s and k in TRAIN_STAGES]
        rate = (sum(s["flops"] for s in measured) / sum(s["train_seconds"] for s in measured)
                if measured else (4e10 if self.plan.name == "fast" else 8e10))
        evals = [s["seconds"] for k, s in self.state["stages"].items() if k.startswith("eval:")]
        if stage.startswith("eval:"):
            return sum(evals) / len(evals) if evals else (3.0 if self.plan.name == "fast" else 12.0)
        if stage in TRAIN_STAGES:
            return self._planned_flops(stage) / rate
        return {"data": 3.0, "tokenizer": 3.0, "report": 4.0,
                "online": self.plan.online_steps * (1.0 if self.plan.name == "fast" else 3.0)}.get(stage, 1.0)

    def _planned_flops(self, stage: str) -> float:
        p = self.plan
        cfg, big = p.model_config(), p.model_config(upscaled=True)
        rows = {"base": (cfg, p.base_steps * p.batch_size, p.seq_len),
                "continue": (big, p.continue_steps * p.batch_size, p.seq_len),
                "control": (cfg, self.control_steps() * p.batch_size, p.seq_len),
                "sft-a": (big, p.sft_steps * p.batch_size, p.seq_len),
                "sft-b": (big, p.sft_steps * p.batch_size, p.seq_len),
                "dpo": (big, p.dpo_steps * p.batch_size * 2 * 1.5, p.seq_len)}   # 2 sequences + reference
        c, rows_, T = rows[stage]
        return flops_per_token(c, T) * rows_ * T

    def control_steps(self) -> int:
        """Steps of the base model that cost what `continue_steps` of the up-scaled model cost."""
        p = self.plan
        ratio = flops_per_token(p.model_config(upscaled=True), p.seq_len) / flops_per_token(p.model_config(), p.seq_len)
        return round(p.continue_steps * ratio)

    # ---- the run ----
    def run(self) -> Path:
        t_start = time.perf_counter()
        before = sum(s.get("seconds", 0.0) for s in self.state["stages"].values())
        todo = [(k, (name, title)) for k, (name, title) in enumerate(STAGES, 1) if not self.done(name)]
        if not todo:
            print(f"quickstart: every stage of {self.out} is done; report: {self.out / 'report.md'}")
            return self.out / "report.md"
        if len(todo) < len(STAGES):
            print(f"quickstart: resuming {self.out} at stage {todo[0][0]}/{len(STAGES)} ({todo[0][1][0]})")
        self._save_state()
        for i, (k, (name, title)) in enumerate(todo):
            elapsed = before + time.perf_counter() - t_start
            left = sum(self._estimate(n) for _, (n, _) in todo[i:])
            print(f"\n[{k:>2}/{len(STAGES)}] {name}: {title}  (elapsed {fmt_seconds(elapsed)}, "
                  f"about {fmt_seconds(left)} left)", flush=True)
            t0 = time.perf_counter()
            try:
                if name.startswith("eval:"):
                    result = self.evaluate(name.split(":", 1)[1])
                else:
                    result = getattr(self, "stage_" + name.replace("-", "_"))()
            except KeyboardInterrupt:
                print(f"\nquickstart interrupted in stage {name}; run the same command again to continue from there",
                      file=sys.stderr, flush=True)
                raise
            result["seconds"] = round(time.perf_counter() - t0, 2)
            result["peak_rss_mib"] = round(peak_rss_mib(), 1)
            self.state["stages"][name] = result
            self._save_state()
        total = before + time.perf_counter() - t_start
        print(f"\nquickstart done in {fmt_seconds(total)} (peak memory {peak_rss_mib():,.0f} MiB).\n"
              f"  report:      {self.out / 'report.md'}\n  final model: {self.out / 'final'}\n"
              f"  try:         lmfoundry chat {self.out / 'final'}")
        return self.out / "report.md"

    # ---- stages ----
    def stage_data(self) -> dict:
        tmp = self.out / ".data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = synth.build(tmp, self.plan.sizes, seed=self.seed)
        _write_sft_mixtures(tmp, self.seed)
        shutil.rmtree(self.data, ignore_errors=True)
        os.replace(tmp, self.data)
        return {"files": manifest["files"]}

    def stage_tokenizer(self) -> dict:
        from ..records import read_texts
        from ..tokenizer_train import compression_report, train_tokenizer
        corpus = [self.data / "pretrain.txt"]
        train_tokenizer(corpus, self.tok_dir, self.plan.vocab_size, model_max_length=self.plan.seq_len,
                        overwrite=True)
        # the comparison EXAONE makes: a tokenizer that saw Korean vs one that did not
        en_only = self.work / "tokenizer-en"
        en_docs = self.work / "pretrain-en.txt"
        en_docs.parent.mkdir(parents=True, exist_ok=True)
        docs = [text for _, text in read_texts(self.data / "pretrain.txt")]
        en_docs.write_text("\n\n".join(d for d in docs if not _has_hangul(d)), encoding="utf-8")
        train_tokenizer([en_docs], en_only, self.plan.vocab_size, overwrite=True)
        langs = [self.data / "lang_en.txt", self.data / "lang_ko.txt"]
        rows = []
        for name, tok in (("bilingual BPE (ours)", self.tok_dir), ("English-only BPE", en_only)):
            for r in compression_report(tok, langs):
                rows.append({"tokenizer": name, "language": "English" if r["file"].endswith("en.txt") else "Korean",
                             **{k: r[k] for k in ("documents", "words", "chars", "tokens", "tokens_per_word",
                                                  "chars_per_token")}})
        for p in langs:          # UTF-8 bytes: what a tokenizer without merges would produce
            text = [d for _, d in read_texts(p)]
            words, chars = sum(len(d.split()) for d in text), sum(len(d) for d in text)
            nbytes = sum(len(d.encode("utf-8")) for d in text)
            rows.append({"tokenizer": "UTF-8 bytes", "language": "English" if p.name.endswith("en.txt") else "Korean",
                         "documents": len(text), "words": words, "chars": chars, "tokens": nbytes,
                         "tokens_per_word": nbytes / words, "chars_per_token": chars / nbytes})
        _print_table(["tokenizer", "language", "tokens/word", "chars/token"],
                     [[r["tokenizer"], r["language"], f"{r['tokens_per_word']:.2f}", f"{r['chars_per_token']:.2f}"]
                      for r in rows])
        return {"compression": rows}

    def stage_base(self) -> dict:
        import torch

        from ..checkpoint import save_model
        from ..model import Transformer
        from ..tokenizer import load_tokenizer
        init = self.models / "init"
        if not (init / "config.json").is_file():
            torch.manual_seed(self.seed)
            model = Transformer(self.plan.model_config(load_tokenizer(self.tok_dir)))
            save_model(model, init, format="llama", tokenizer_from=self.tok_dir, overwrite=True)
        return self._train("pretrain", "base", init, [self.data / "pretrain.txt"], [self.data / "heldout.txt"],
                           self.plan.base_steps, self.plan.lr_base, self.plan.batch_size, "pretrain")

    def stage_upscale(self) -> dict:
        from ..scale.upscale import upscale
        res = upscale(self.models / "base", self.models / "upscaled", drop=self.plan.drop, overwrite=True)
        print(res.summary())
        return {"summary": res.summary(), "from_layers": res.source.n_layers, "layers": res.config.n_layers,
                "sources": [layer.src for layer in res.layers]}

    def stage_continue(self) -> dict:
        return self._train("pretrain", "continued", self.models / "upscaled", [self.data / "continue.txt"],
                           [self.data / "heldout.txt"], self.plan.continue_steps, self.plan.lr_continue,
                           self.plan.batch_size, "continue")

    def stage_control(self) -> dict:
        return self._train("pretrain", "control", self.models / "base", [self.data / "continue.txt"],
                           [self.data / "heldout.txt"], self.control_steps(), self.plan.lr_continue,
                           self.plan.batch_size, "continue")

    def _sft(self, variant: str) -> dict:
        heldout = [self.data / "sft_general_heldout.jsonl", self.data / "sft_math_heldout.jsonl"]
        return self._train("sft", f"sft-{variant}", self.models / "continued", [self.data / f"sft_{variant}.jsonl"],
                           heldout, self.plan.sft_steps, self.plan.lr_sft, self.plan.batch_size, None)

    def stage_sft_a(self) -> dict:
        return self._sft("a")

    def stage_sft_b(self) -> dict:
        return self._sft("b")

    def stage_merge(self) -> dict:
        from ..scale.merge import merge
        recipe = {"merge_method": "linear", "dtype": "float32",
                  "models": [{"model": str(self.models / "sft-a"), "parameters": {"weight": 0.5}},
                             {"model": str(self.models / "sft-b"), "parameters": {"weight": 0.5}}]}
        merge(recipe, self.models / "merged", overwrite=True)
        return {"recipe": recipe}

    def stage_dpo(self) -> dict:
        return self._train("dpo", "dpo", self.models / "merged", [self.data / "dpo.jsonl"],
                           [self.data / "dpo_heldout.jsonl"], self.plan.dpo_steps, self.plan.lr_dpo,
                           self.plan.batch_size, None, beta=self.plan.dpo_beta)

    def stage_online(self) -> dict:
        p = self.plan
        return self._train("online-dpo", "online", self.models / "dpo", [self.data / "online_prompts.jsonl"], None,
                           p.online_steps, p.lr_online, p.batch_size, None, verifier="math", beta=p.online_beta,
                           num_generations=p.online_k, temperature=p.online_temperature,
                           max_new_tokens=p.max_gen_toks)

    def stage_final(self) -> dict:
        """models/online without the training bookkeeping: a plain Hugging Face directory."""
        src, dst = self.models / "online", self.out / "final"
        tmp = self.out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in src.iterdir():
            if f.is_file() and f.name != "metrics.jsonl":
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        return {"files": sorted(f.name for f in dst.iterdir())}

    def stage_report(self) -> dict:
        path = write_report(self.out, self.state, self.plan)
        print(f"wrote {path}")
        return {"report": str(path)}

    # ---- training ----
    def _train(self, verb, name, model, data, eval_data, steps, lr, batch_size, corpus, **extra) -> dict:
        from ..checkpoint import read_config
        from ..train.loop import latest_checkpoint
        from ..train.recipe import resolve, run
        from ..train.settings import ONLINE
        out = self.models / name
        resume = latest_checkpoint(out) is not None
        flags = {"model": str(model), "prompts" if verb in ONLINE else "data": [str(d) for d in data],
                 "eval_data": [str(d) for d in eval_data or []],
                 "out": str(out), "steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": self.plan.seq_len,
                 "warmup": min(self.plan.warmup, steps // 5), "eval_every": max(1, steps // self.plan.eval_points),
                 "eval_batches": self.plan.eval_batches, "save_every": max(10, steps // 4), "keep_checkpoints": 1,
                 "seed": self.seed, "progress": self.progress, "resume": resume, "overwrite": not resume,
                 "device": "cpu", "dtype": "float32", **extra}   # fp32: the same report on every CPU
        if corpus is not None:
            flags["tokenized"] = str(self.work / "tokenized" / corpus)
        if resume:
            print(f"resuming {out} from {latest_checkpoint(out).name}")
        t0 = time.perf_counter()
        result = run(verb, resolve(verb, flags))
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()]
        cfg, _ = read_config(out)
        tokens = rows[-1]["tokens"] if rows else 0
        shutil.rmtree(out / "checkpoints", ignore_errors=True)          # resume state, no longer needed
        return {"steps": result.step, "tokens": tokens, "flops": flops_per_token(cfg, self.plan.seq_len) * tokens,
                "train_seconds": round(seconds, 2), "layers": cfg.n_layers, "params": cfg.num_params(),
                "final_loss": rows[-1]["loss"] if rows else None,
                "eval_loss": next((r["eval_loss"] for r in reversed(rows) if "eval_loss" in r), None),
                "metrics": rows, "lr": lr, "from": Path(model).name}

    # ---- evaluation ----
    def evaluate(self, name: str) -> dict:
        """Held-out loss (the training loop's own evaluation, on the same batches), GSM8K-format
        math exact match (0-shot, chat template), ARC-format multiple choice (0-shot), and
        preference accuracy on held-out pairs."""
        import torch

        from ..eval import LM, evaluate
        lm = LM.load(self.models / name, batch_size=32, progress=False)
        lm.model.eval()
        out = {"model": name, "layers": lm.model.config.n_layers, "params": lm.model.config.num_params()}
        out["heldout_loss"] = self._heldout_loss(lm.model)
        eval_dir = self.data / "eval"
        math_res = evaluate(lm, ["gsm8k"], eval_dir, num_fewshot=0, limit=self.plan.math_limit,
                            apply_chat_template=True, max_gen_toks=self.plan.max_gen_toks, log_samples=True)
        r = math_res["results"]["gsm8k"]
        out["math_em"] = r["exact_match,strict-match"]
        out["math_em_flexible"] = r["exact_match,flexible-extract"]
        out["math_n"] = math_res["n-samples"]["gsm8k"]["effective"]
        out["math_samples"] = [{"question": s["doc"]["question"], "output": s["resps"][0] if isinstance(
            s["resps"], list) else s["resps"], "target": s["target"].split("####")[-1].strip()}
            for s in math_res["samples"]["gsm8k"][:3]]
        mc = evaluate(lm, ["arc_easy"], eval_dir, num_fewshot=0, limit=self.plan.mc_limit)
        out["mc_acc"] = mc["results"]["arc_easy"]["acc"]
        out["mc_acc_norm"] = mc["results"]["arc_easy"]["acc_norm"]
        out["mc_n"] = mc["n-samples"]["arc_easy"]["effective"]
        out.update(self._preference_accuracy(lm.model, lm.tokenizer))
        with torch.inference_mode():
            out["chat_samples"] = self._chat_samples(lm)
        print(f"{name}: held-out loss {out['heldout_loss']:.3f} · math EM {out['math_em']:.2f} "
              f"(n={out['math_n']}) · multiple choice acc {out['mc_acc']:.2f} (n={out['mc_n']}) · "
              f"preference acc {out['pref_acc']:.2f} (n={out['pref_n']})")
        return out

    def _heldout_loss(self, model) -> float:
        from contextlib import nullcontext

        import torch

        from ..data import PackedBatches, tokenize_corpus
        from ..train.loop import evaluate_loss
        from ..train.objectives import NextToken
        ds = tokenize_corpus([self.data / "heldout.txt"], self.tok_dir,
                             self.work / "tokenized" / "pretrain" / "corpus-eval", progress=False)
        batches = PackedBatches({"corpus": (ds, 1.0)}, self.plan.seq_len, self.plan.batch_size, self.seed)
        eval_list = [b for _, b in zip(range(self.plan.eval_batches), batches)]
        return evaluate_loss(model, NextToken(), eval_list, torch.device("cpu"), nullcontext)["eval_loss"]

    def _preference_accuracy(self, model, tokenizer) -> dict:
        """Share of held-out pairs whose chosen reply the model gives more log-probability than the
        rejected one (summed over the reply's tokens, end-of-turn included)."""
        import torch

        from ..data import DPOBatches
        from ..train.objectives import DPO
        pairs = DPOBatches(self.data / "dpo_heldout.jsonl", tokenizer, self.plan.seq_len, 1, epochs=1, progress=False)
        wins, margins = 0, []
        with torch.inference_mode():
            for batch in pairs:
                pc, pr, _, _ = DPO().policy_logps(model, batch)
                wins += int((pc > pr).sum())
                margins += (pc - pr).tolist()
        return {"pref_acc": wins / max(len(margins), 1), "pref_margin": sum(margins) / max(len(margins), 1),
                "pref_n": len(margins)}

    def _chat_samples(self, lm) -> list[dict]:
        from ..generate import SamplingParams, generate_text
        from ..records import read_records
        prompts = []
        for f in ("sft_general_heldout.jsonl", "sft_math_heldout.jsonl"):
            recs = [r for _, r in read_records(self.data / f)]
            en = next((r for r in recs if not _has_hangul(r["messages"][-2]["content"])), None)
            ko = next((r for r in recs if _has_hangul(r["messages"][-2]["content"])), None)
            prompts += [r for r in (en, ko) if r is not None]
        chats = [r["messages"][:-1] for r in prompts]
        outputs = generate_text(lm.model, lm.tokenizer, chats, SamplingParams(max_new_tokens=self.plan.max_gen_toks,
                                                                              temperature=0.0),
                                min_room=8, batch_size=len(chats) or 1)
        return [{"prompt": r["messages"][-2]["content"], "reference": r["messages"][-1]["content"],
                 "output": text.strip()} for r, text in zip(prompts, outputs)]


TRAIN_STAGES = ("base", "continue", "control", "sft-a", "sft-b", "dpo")     # timed by FLOPs (online: by sampling)


def _has_hangul(text: str) -> bool:
    return any("\uac00" <= ch <= "\ud7a3" for ch in text)


def _write_sft_mixtures(data: Path, seed: int):
    """SFT A: all general instructions + a third of the math; SFT B: all math + a third of the
    general ones (SOLAR's v3/v4 differed in their mixtures the same way)."""
    def lines(name):
        return [x for x in (data / name).read_text(encoding="utf-8").splitlines() if x.strip()]
    general, math_ = lines("sft_general.jsonl"), lines("sft_math.jsonl")
    for variant, (main, side) in {"a": (general, math_), "b": (math_, general)}.items():
        rnd = random.Random(f"{seed}-{variant}")
        mix = main + rnd.sample(side, len(side) // 3)
        rnd.shuffle(mix)
        (data / f"sft_{variant}.jsonl").write_text("\n".join(mix) + "\n", encoding="utf-8")


def _print_table(head, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def run(out="runs/quickstart", fast: bool = False, force: bool = False, seed: int = 0, threads: int | None = None,
        progress: bool = True) -> Path:
    """Run (or resume) the quickstart in `out`; returns the report's path."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    return Quickstart(out, PLANS["fast" if fast else "default"], seed=seed, force=force, progress=progress).run()
