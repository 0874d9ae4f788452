"""The quickstart end to end (`--fast`): report, plots, final checkpoint, resume, refusals."""
import json

import pytest
import torch

from lmfoundry.cli import main
from lmfoundry.quickstart.pipeline import STAGES, Quickstart, flops_per_token, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    assert main(["quickstart", "--fast", "--out", str(out), "--threads", "1"]) == 0
    return out


def test_every_stage_recorded(fast_run):
    state = json.loads((fast_run / "quickstart.json").read_text())
    assert list(state["stages"]) == [name for name, _ in STAGES]
    ev = state["stages"]["eval:dpo"]
    for key in ("heldout_loss", "math_em", "mc_acc", "pref_acc"):
        assert 0 <= ev[key] < 20
    online = state["stages"]["online"]
    assert online["steps"] == 6 and online["from"] == "dpo"
    assert {"score/mean", "pairs/usable", "pairs/tied"} <= set(online["metrics"][0])
    assert 0 <= state["stages"]["eval:online"]["math_em"] <= 1
    assert ev["math_n"] > 0 and ev["mc_n"] > 0 and ev["pref_n"] > 0
    s = state["stages"]
    assert s["continue"]["layers"] == 2 * (s["base"]["layers"] - 1)          # --fast: n=4, m=1
    # the control spent the same training FLOPs as the up-scaled model (within one step)
    step_flops = s["control"]["flops"] / s["control"]["steps"]
    assert abs(s["control"]["flops"] - s["continue"]["flops"]) <= step_flops
    assert max(st["peak_rss_mib"] for st in s.values()) < 4096


def test_report_and_plots(fast_run):
    report = (fast_run / "report.md").read_text()
    for heading in ("## The recipe", "## Tokenizer: compression, English vs Korean", "## Evaluation after every stage",
                    "## Depth Up-Scaling", "## The papers' claims at this scale (SOLAR; EXAONE's online stage)",
                    "## What the final model says"):
        assert heading in report
    assert report.count("— *") == 6                       # six claims, each with a verdict
    for name in ("training.png", "dus.png", "stages.png", "online.png"):
        png = (fast_run / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert f"plots/{name}" in report


def test_final_checkpoint_loads_in_lmfoundry_and_transformers(fast_run):
    transformers = pytest.importorskip("transformers")
    from lmfoundry.checkpoint import load_model
    from lmfoundry.generate import generate
    from lmfoundry.tokenizer import load_tokenizer
    final = fast_run / "final"
    assert not (final / "checkpoints").exists()
    model, tok = load_model(final), load_tokenizer(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                  tokenize=True)
    (c,) = generate(model, [ids], max_new_tokens=8, temperature=0.0)
    assert 0 < len(c.tokens) <= 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(final)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    assert hf_tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                      tokenize=False) == tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True)


def test_chat_cli_on_final(fast_run, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of Japan?\n"))
    assert main(["chat", str(fast_run / "final"), "--max-new-tokens", "8", "--temperature", "0"]) == 0


def test_rerun_of_a_finished_run_does_nothing(fast_run, capsys):
    before = (fast_run / "quickstart.json").read_text()
    assert main(["quickstart", "--fast", "--out", str(fast_run)]) == 0
    assert "every stage" in capsys.readouterr().out
    assert (fast_run / "quickstart.json").read_text() == before


def test_refuses_other_settings_and_foreign_directories(fast_run, tmp_path, capsys):
    assert main(["quickstart", "--out", str(fast_run)]) == 1           # default plan on a --fast run
    assert "other settings" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("mine")
    assert main(["quickstart", "--fast", "--out", str(tmp_path)]) == 1
    assert "holds no quickstart run" in capsys.readouterr().err
    assert (tmp_path / "x.txt").read_text() == "mine"


def test_interrupted_run_resumes_at_the_stage_it_stopped(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = Quickstart.stage_upscale

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Quickstart, "stage_upscale", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(out, fast=True, progress=False)
    state = json.loads((out / "quickstart.json").read_text())
    assert list(state["stages"]) == ["data", "tokenizer", "base", "eval:base"]
    base_weights = (out / "models" / "base" / "model.safetensors").read_bytes()
    monkeypatch.setattr(Quickstart, "stage_upscale", original)
    # Ctrl-C inside the next training stage, after 12 of its steps (the loop saves a checkpoint)
    from lmfoundry.train import loop
    real_train = loop.train

    class StopAfter:
        def __init__(self, inner, n):
            self.inner, self.n, self.it = inner, n, None

        def __iter__(self):
            self.it = iter(self.inner)
            return self

        def __next__(self):
            if self.n == 0:
                raise KeyboardInterrupt
            self.n -= 1
            return next(self.it)

        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

    def train_then_stop(model, batches, *a, **kw):
        return real_train(model, StopAfter(batches, 12), *a, **kw)

    monkeypatch.setattr("lmfoundry.train.recipe.train", train_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(out, fast=True, progress=False)
    state = json.loads((out / "quickstart.json").read_text())
    assert "continue" not in state["stages"] and "upscale" in state["stages"]
    assert loop.latest_checkpoint(out / "models" / "continued").name.endswith("12")
    monkeypatch.setattr("lmfoundry.train.recipe.train", real_train)
    run(out, fast=True, progress=False)
    state = json.loads((out / "quickstart.json").read_text())
    assert list(state["stages"]) == [name for name, _ in STAGES]
    steps = state["stages"]["continue"]["steps"]
    rows = [json.loads(x) for x in (out / "models" / "continued" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))           # resumed, not restarted
    assert (out / "models" / "base" / "model.safetensors").read_bytes() == base_weights   # not retrained


def test_flops_per_token_counts_weights_and_attention():
    from lmfoundry.config import ModelConfig
    cfg = ModelConfig(vocab_size=100, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16)
    matmul = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16) + 100 * 8      # q,k,v,o, gate/up/down, lm head
    assert flops_per_token(cfg, 32) == 6 * matmul + 6 * 32 * 2 * 8


def test_out_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["quickstart", "--fast", "--out", str(f)]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_force_refuses_to_delete_the_current_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["quickstart", "--fast", "--force", "--out", str(tmp_path)]) == 1
    assert "--force would delete" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
