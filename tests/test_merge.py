"""Merging: each method against its formula, recipes end to end, the streaming writer, peak memory,
and (optionally) mergekit itself as an oracle."""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import hf_llama
from lmfoundry.checkpoint.io import write_safetensors
from lmfoundry.cli import main
from lmfoundry.errors import CheckpointError, ConfigError
from lmfoundry.scale.merge import METHODS, evaluate, merge, plan_merge

T = torch.tensor


def run(method, base, xs, ws=None, seed=0, **shared):
    """Call a method's per-tensor function with its defaults; inputs are cloned (methods work in place)."""
    m = METHODS[method]
    p = {k: d for k, (_, d) in m.shared_params.items()} | shared
    ws = [{k: d for k, (_, d) in m.model_params.items()} | w for w in (ws or [{} for _ in xs])]
    return m.fn(None if base is None else base.clone(), [x.clone() for x in xs], ws, p,
                torch.Generator().manual_seed(seed))


# ----- per-tensor formulas ------------------------------------------------------------------------

def test_linear_normalize_on_and_off():
    a, b = T([1.0, 2.0]), T([3.0, -4.0])
    ws = [{"weight": 1.0}, {"weight": 3.0}]
    assert torch.allclose(run("linear", None, [a, b], ws), (a + 3 * b) / 4)
    assert torch.allclose(run("linear", None, [a, b], ws, normalize=False), a + 3 * b)
    with pytest.raises(ConfigError, match="sum to 0"):
        run("linear", None, [a, b], [{"weight": 1.0}, {"weight": -1.0}])


def test_slerp_endpoints_orthogonal_and_colinear():
    a, b = T([1.0, 0.0]), T([0.0, 2.0])
    assert torch.allclose(run("slerp", a, [b], t=0.0), a)
    assert torch.allclose(run("slerp", a, [b], t=1.0), b)
    # orthogonal: theta = pi/2, coefficients sin(theta/2)/sin(theta) on the unnormalised inputs
    assert torch.allclose(run("slerp", a, [b], t=0.5), math.sin(math.pi / 4) * (a + b))
    # colinear and anti-parallel fall back to lerp
    assert torch.allclose(run("slerp", a, [3 * a], t=0.25), 0.75 * a + 0.75 * a)
    assert torch.allclose(run("slerp", a, [-a], t=0.25), 0.75 * a - 0.25 * a)


def test_task_arithmetic_and_lambda():
    base, x, y = T([1.0, 1.0]), T([2.0, 0.0]), T([1.0, 3.0])
    ws = [{"weight": 0.5}, {"weight": 1.0}]
    assert torch.allclose(run("task_arithmetic", base, [x, y], ws), base + 0.5 * (x - base) + (y - base))
    assert torch.allclose(run("task_arithmetic", base, [x, y], ws, normalize=True, **{"lambda": 2.0}),
                          base + 2 * (0.5 * (x - base) + (y - base)) / 1.5)


def test_ties_trim_sign_election_and_zero_sum_tie():
    base = torch.zeros(4)
    # trim: density 0.5 keeps the two largest |d| of each model
    assert torch.equal(run("ties", base, [T([1.0, -4.0, 2.0, -3.0])], [{"weight": 1.0, "density": 0.5}]),
                       T([0.0, -4.0, 0.0, -3.0]))
    # sign election; a zero sum elects + (entries 0 and 1), zeros never agree (entry 3)
    d1, d2 = T([1.0, -1.0, 2.0, 0.0]), T([-1.0, 1.0, -3.0, 5.0])
    out = run("ties", base, [d1, d2], [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(out, T([1.0, 1.0, -3.0, 5.0]))
    # normalize: the divisor is the weight of the agreeing models; off: the weighted sum
    out = run("ties", base[:1], [T([2.0]), T([4.0])], [{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(out, T([(2 + 12) / 4]))
    out = run("ties", base[:1], [T([2.0]), T([4.0])], [{"weight": 1.0}, {"weight": 3.0}], normalize=False)
    assert torch.allclose(out, T([14.0]))


def test_ties_weighted_vote_vs_paper_vote():
    base, ws = torch.zeros(1), [{"weight": 3.0}, {"weight": 1.0}]
    # mergekit: signs of w*d: 3*1 - 2 > 0 elects +, the weighted mean of the agreeing = 1
    assert torch.allclose(run("ties", base, [T([1.0]), T([-2.0])], ws), T([1.0]))
    # paper: unweighted 1 - 2 < 0 elects -, the mean over the agreeing count (1) of w*d = -2
    assert torch.allclose(run("ties", base, [T([1.0]), T([-2.0])], ws, paper=True), T([-2.0]))


def test_dare_density_one_is_task_arithmetic_and_rescales():
    g = torch.Generator().manual_seed(1)
    base, xs = torch.randn(64, 8, generator=g), [torch.randn(64, 8, generator=g) for _ in range(2)]
    ws = [{"weight": 0.7, "density": 1.0}, {"weight": 0.4, "density": 1.0}]
    ta = run("task_arithmetic", base, xs, ws)
    assert torch.allclose(run("dare_linear", base, xs, ws), ta)
    assert torch.allclose(run("dare_ties", base, xs, ws), run("ties", base, xs, ws, normalize=False))
    # density 0.5: about half dropped; L1 norm of the kept part matched (mergekit), or / density (paper)
    w = [{"weight": 1.0, "density": 0.5}]
    d = xs[0] - base
    kept = run("dare_linear", base, [xs[0]], w) - base
    assert 0.4 < (kept != 0).float().mean() < 0.6
    assert torch.allclose(kept.abs().sum(), d.abs().sum(), rtol=1e-4)
    paper = run("dare_linear", base, [xs[0]], w, paper=True) - base
    mask = paper != 0
    assert torch.equal(mask, kept != 0)                          # same seed, same mask
    assert torch.allclose(paper[mask], d[mask] / 0.5, atol=1e-5)
    assert not torch.equal(run("dare_linear", base, [xs[0]], w, seed=1), kept + base)


def test_breadcrumbs_drops_outliers_and_small_values():
    base, d = torch.zeros(10), torch.arange(1.0, 11.0)
    out = run("breadcrumbs", base, [d], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    assert torch.equal(out, T([0, 0, 0, 0, 5, 6, 7, 8, 9, 0.0]))
    # gamma * N < 1: no outlier removed, the top half kept (not the whole delta dropped)
    out = run("breadcrumbs", base, [d], [{"weight": 1.0, "density": 0.5, "gamma": 0.01}])
    assert torch.equal(out, T([0, 0, 0, 0, 0, 6, 7, 8, 9, 10.0]))


def test_model_stock_two_models_matches_the_paper():
    w0, w1, w2 = T([0.0, 0.0, 1.0]), T([1.0, 0.0, 1.0]), T([1.0, 1.0, 1.0])
    cos = 1 / math.sqrt(2)                                       # angle between (1,0,0) and (1,1,0)
    t = 2 * cos / (1 + cos)                                      # Model Stock, N = 2
    assert torch.allclose(run("model_stock", w0, [w1, w2]), t * (w1 + w2) / 2 + (1 - t) * w0)
    # filter_wise: one ratio per row
    b, x, y = torch.zeros(2, 2), T([[1.0, 0.0], [1.0, 0.0]]), T([[0.0, 1.0], [2.0, 0.0]])
    out = run("model_stock", b, [x, y], filter_wise=True)
    assert torch.allclose(out[0], torch.zeros(2)) and torch.allclose(out[1], T([1.5, 0.0]))


def test_passthrough_scale():
    x = T([1.0, -2.0])
    assert torch.equal(run("passthrough", None, [x], [{"scale": None}]), x)
    assert torch.equal(run("passthrough", None, [x], [{"scale": 0.0}]), torch.zeros(2))


def test_gradients_and_filters():
    assert evaluate([0, 1], "x", 0.5) == 0.5
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.3) == pytest.approx(0.46)       # x = 1.2 -> 0.5 + 0.2 (0.3 - 0.5)
    cond = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.7}]
    assert evaluate(cond, "model.layers.0.self_attn.q_proj.weight", 1.0) == 1
    assert evaluate(cond, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.7
    assert evaluate(cond, "model.norm.weight", 0.0) is None                      # falls through to the next level
    assert evaluate(cond + [{"value": 3}], "model.norm.weight", 0.0) == 3
    assert evaluate([True, False], "x", 0.9) is True                              # non-numbers are picked


# ----- end to end ---------------------------------------------------------------------------------

def _perturbed(seed, scale=0.02, **overrides):
    model = hf_llama(**overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sds = []
    for k in range(3):
        model = hf_llama() if k == 0 else _perturbed(k)
        model.save_pretrained(root / f"m{k}")
        sds.append({n: t.detach().clone() for n, t in model.state_dict().items()})
    return root, sds


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_linear_recipe_file_end_to_end(trio, tmp_path):
    import transformers
    root, sds = trio
    recipe = tmp_path / "linear.yml"
    recipe.write_text(textwrap.dedent(f"""\
        models:
          - model: {root / 'm1'}
            parameters: {{weight: 0.25}}
          - model: {root / 'm2'}
            parameters: {{weight: 0.75}}
        merge_method: linear
        dtype: float32
        """))
    out = merge(recipe, tmp_path / "out")
    got = _weights(out)
    assert set(got) == set(sds[1])
    for name, t in got.items():
        torch.testing.assert_close(t, 0.25 * sds[1][name] + 0.75 * sds[2][name], rtol=1e-6, atol=1e-7)
    assert (out / "mergekit_config.yml").read_text().endswith(recipe.read_text())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.isfinite(model(ids).logits).all()


def test_passthrough_slices_reproduce_dus_stacking(trio, tmp_path):
    import transformers
    root, sds = trio
    recipe = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": str(root / "m0"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(root / "m1"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(root / "m0"), "layer_range": [1, 2]}]}]}
    out = merge(recipe, tmp_path / "dus")
    got = _weights(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    src = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 1)]                  # output layer -> (model, layer)
    for i, (k, j) in enumerate(src):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(got[f"model.layers.{i}.{suffix}"], sds[k][f"model.layers.{j}.{suffix}"].bfloat16())
    assert torch.equal(got["model.embed_tokens.weight"], sds[0]["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(got["lm_head.weight"], sds[0]["lm_head.weight"].bfloat16())    # from the last slice
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5 and model.dtype == torch.bfloat16


def test_gradients_and_filters_apply_per_layer(trio, tmp_path):
    root, sds = trio
    recipe = {"merge_method": "task_arithmetic", "base_model": str(root / "m0"),
              "models": [{"model": str(root / "m1"), "parameters": {
                  "weight": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.5},
                             {"value": 0.25}]}}]}
    got = _weights(merge(recipe, tmp_path / "out"))
    b, x = sds[0], sds[1]
    for name, t in got.items():
        w = (0.0 if ".0." in name else 1.0) if "self_attn" in name else 0.5 if "mlp" in name else 0.25
        torch.testing.assert_close(t, b[name] + w * (x[name] - b[name]), rtol=1e-6, atol=1e-6, msg=name)


def test_dare_ties_same_bytes_every_run(trio, tmp_path):
    root, _ = trio
    recipe = {"merge_method": "dare_ties", "base_model": str(root / "m0"), "parameters": {"density": 0.5},
              "models": [{"model": str(root / f"m{k}"), "parameters": {"weight": 0.5}} for k in (1, 2)]}
    a, b = merge(recipe, tmp_path / "a"), merge(recipe, tmp_path / "b")
    c = merge(recipe, tmp_path / "c", seed=1)
    blob = lambda p: (p / "model.safetensors").read_bytes()      # noqa: E731
    assert blob(a) == blob(b) != blob(c)


def test_paper_ties_trims_over_the_whole_model(trio, tmp_path):
    root, sds = trio
    recipe = {"merge_method": "ties", "base_model": str(root / "m0"), "parameters": {"paper": True},
              "models": [{"model": str(root / "m1"), "parameters": {"weight": 1.0, "density": 0.3}}]}
    got = _weights(merge(recipe, tmp_path / "out"))
    deltas = {n: sds[1][n] - sds[0][n] for n in got}
    flat = torch.cat([d.abs().reshape(-1) for d in deltas.values()])
    tau = flat.kthvalue(flat.numel() - int(0.3 * flat.numel())).values   # prateeky2806/ties-merging
    for name, d in deltas.items():
        torch.testing.assert_close(got[name], sds[0][name] + d * (d.abs() >= tau), rtol=0, atol=1e-6)
    kept = sum(int((got[n] != sds[0][n]).sum()) for n in got)
    assert abs(kept / flat.numel() - 0.3) < 0.01


def _word_tokenizer(path, tokens):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0])).save(str(path / "tokenizer.json"))


def test_vocabularies_refused_or_matched_by_token(trio, tmp_path):
    root, sds = trio
    other = _perturbed(5, vocab_size=130)
    other.save_pretrained(tmp_path / "wide")
    base_tokens = [f"t{i}" for i in range(128)]
    shutil.copytree(root / "m0", tmp_path / "base")
    _word_tokenizer(tmp_path / "base", base_tokens)
    _word_tokenizer(tmp_path / "wide", ["x0", "x1"] + base_tokens)          # same tokens, two rows later
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / "base"), "parameters": {"weight": 0.5}},
                                                   {"model": str(tmp_path / "wide"), "parameters": {"weight": 0.5}}]}
    with pytest.raises(ConfigError, match=r"vocabularies differ.*128 rows.*130 rows.*embed"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plan = merge({**recipe, "tokenizer_source": "base"}, tmp_path / "out", dry_run=True)
    assert any("2 of its own dropped" in n for n in plan.notes)
    got = _weights(merge({**recipe, "tokenizer_source": "base"}, tmp_path / "out"))
    wide = other.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[name], 0.5 * sds[0][name] + 0.5 * wide[name][2:])
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()
    # same number of rows, different tokens: refused too
    _word_tokenizer(tmp_path / "base", base_tokens[::-1])
    shutil.copytree(root / "m1", tmp_path / "m1")
    _word_tokenizer(tmp_path / "m1", base_tokens)
    with pytest.raises(ConfigError, match="vocabularies differ"):
        plan_merge({**recipe, "models": [recipe["models"][0], {"model": str(tmp_path / "m1"),
                                                               "parameters": {"weight": 0.5}}]})


def test_nan_result_is_an_error_and_nothing_is_written(trio, tmp_path):
    root, _ = trio
    recipe = {"merge_method": "task_arithmetic", "base_model": str(root / "m0"), "parameters": {"lambda": 1e38},
              "models": [{"model": str(root / "m1"), "parameters": {"weight": 1e3}}]}
    with pytest.raises(CheckpointError, match="NaN or inf.*nothing was written"):
        merge(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change,match", [
    ({"merge_method": "frankenstein"}, "unknown merge_method 'frankenstein'"),
    ({"base_model": "/nonexistent/model"}, "not found"),
    ({"parameters": {"densty": 0.5}}, "unknown key 'densty'"),
    ({"models": [{"model": "M1", "parameters": {"normalize": True}}]}, "'normalize' is a shared parameter"),
    ({"models": [{"model": "M1"}]}, "missing required parameter 'weight'"),
    ({"models": [{"model": "M1", "parameters": {"weight": 1, "density": 1.5}}]}, r"must be in \[0, 1\]"),
    ({"tokenizer_source": "union"}, "union is not supported"),
    ({"models": None, "slices": [{"sources": [{"model": "M1", "layer_range": [0, 3]}]}]}, r"layer_range \[0, 3\]"),
    ({"merge_method": "slerp", "parameters": {"t": 0.5}, "models": [{"model": "M1"}, {"model": "M2"}]},
     "exactly 2 inputs"),
    ({"base_model": None}, "needs a base_model"),
])
def test_bad_recipes_get_one_clear_error(trio, tmp_path, change, match):
    root, _ = trio
    recipe = {"merge_method": "ties", "base_model": str(root / "m0"),
              "models": [{"model": str(root / "m1"), "parameters": {"weight": 1.0}}]}
    recipe.update(change)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    recipe = yaml.safe_load(yaml.safe_dump(recipe).replace("M1", str(root / "m1")).replace("M2", str(root / "m2")))
    with pytest.raises(ConfigError, match=match):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_writes_nothing_then_merges(trio, tmp_path, capsys):
    root, _ = trio
    recipe = root / "cli-slerp.yml"                 # model paths relative to the recipe's folder
    recipe.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": "m0",
                                      "models": [{"model": "m0"}, {"model": "m2"}], "parameters": {"t": [0, 0.5, 1]}}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "slerp" in text and "peak memory" in text and "tensors       21" in text
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())["models"][1] == {"model": "m2"}
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 1            # exists: refused without --force
    assert "already exists" in capsys.readouterr().err


def test_fused_format_merges_by_canonical_parts(tmp_path):
    from lmfoundry.checkpoint import read_checkpoint, write_checkpoint
    from lmfoundry.config import ModelConfig
    cfg = ModelConfig.from_preset("tiny-openelm")
    tensors = []
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        tensors.append({n: torch.randn(s, generator=g) for n, s in cfg.shapes().items()})
        write_checkpoint(tmp_path / f"e{k}", cfg, tensors[-1], format="openelm")
    out = merge({"merge_method": "linear", "models": [
        {"model": str(tmp_path / f"e{k}"), "parameters": {"weight": w}} for k, w in ((0, 1.0), (1, 3.0))]},
        tmp_path / "out")
    got_cfg, fmt, loaders = read_checkpoint(out)
    assert fmt.name == "openelm" and got_cfg == cfg
    for name, load in loaders.items():
        torch.testing.assert_close(load(), (tensors[0][name] + 3 * tensors[1][name]) / 4)


@pytest.mark.parametrize("change, message", [
    ({"dtype": "fp8"}, "dtype: unknown dtype 'fp8'"),
    ({"tokenizer_source": "nowhere"}, "tokenizer_source 'nowhere' not found"),
    ({"parameters": {"weight": []}}, "parameter 'weight' for M1: parameter value []: a gradient is a non-empty list"),
    ({"parameters": {"weight": 1, "density": 2}}, "parameter 'density' for M1 (tensor model.embed_tokens.weight) "
                                                  "must be in [0, 1], got 2.0"),
])
def test_recipe_errors_name_the_recipe_file_and_the_key_as_written(trio, tmp_path, change, message):
    root, _ = trio
    recipe = {"merge_method": "ties", "base_model": str(root / "m0"), "models": [{"model": str(root / "m1")}], **change}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError) as e:
        merge(tmp_path / "r.yml", tmp_path / "out")
    assert str(e.value).startswith(f"{tmp_path / 'r.yml'}: " + message.replace("M1", str(root / "m1")))


def test_tensor_errors_use_the_checkpoint_names(trio, tmp_path):
    root, _ = trio
    recipe = {"merge_method": "task_arithmetic", "base_model": str(root / "m0"), "parameters": {"lambda": 1e38},
              "models": [{"model": str(root / "m1"), "parameters": {"weight": 1e3}}]}
    with pytest.raises(CheckpointError, match=r"NaN or inf values in model\.embed_tokens\.weight; nothing was"):
        merge(recipe, tmp_path / "out")
    shutil.copytree(root / "m1", tmp_path / "m1")
    weights = load_file(str(tmp_path / "m1" / "model.safetensors"))
    weights["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(weights, str(tmp_path / "m1" / "model.safetensors"))
    recipe = {"merge_method": "linear", "models": [{"model": str(root / "m0"), "parameters": {"weight": 1.0}},
                                                   {"model": str(tmp_path / "m1"), "parameters": {"weight": 1.0}}]}
    with pytest.raises(CheckpointError, match=r"m1/model\.safetensors: tensor model\.layers\.1\.self_attn\.o_proj\."
                                              r"weight read as layers\.1\.attn\.o\.weight contains NaN or inf"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----- the streaming writer and peak memory ------------------------------------------------------

def test_streaming_writer_writes_exact_safetensors(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.arange(6).reshape(2, 3)}
    specs = [(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    write_safetensors(tmp_path, iter(ts.items()), specs=specs)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header["__metadata__"] == {"format": "pt"} and header["b"]["dtype"] == "BF16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name, t in ts.items():
            assert torch.equal(f.get_tensor(name), t)
    (tmp_path / "s").mkdir()
    write_safetensors(tmp_path / "s", iter(ts.items()), max_shard_size=64, specs=specs)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    for name, t in ts.items():
        assert torch.equal(load_file(str(tmp_path / "s" / index["weight_map"][name]))[name], t)
    with pytest.raises(CheckpointError, match="expected tensor b"):
        write_safetensors(tmp_path / "s", iter([("a", ts["a"]), ("c", ts["c"])]), specs=specs)


PEAK_SCRIPT = """
import json, re, sys, torch
torch.set_num_threads(1)
from lmfoundry.scale.merge import merge, plan_merge
# /proc, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (it survives exec)
kb = lambda key: int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
recipe = json.loads(sys.argv[1])
plan = plan_merge(recipe)
before = kb("VmRSS")
merge(recipe, sys.argv[2])
print(json.dumps({"baseline": before, "delta": kb("VmHWM") - before, "bound": plan.peak_bytes,
                  "written": plan.write_bytes}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_peak_rss_stays_within_the_stated_bound(tmp_path):
    from lmfoundry.checkpoint import write_checkpoint
    from lmfoundry.config import ModelConfig
    # 16 MiB float32 tensors (embeddings and every MLP matrix), 277 MB per model
    cfg = ModelConfig(vocab_size=4096, dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=4096)
    g = torch.Generator().manual_seed(0)
    for k in range(2):
        write_checkpoint(tmp_path / f"b{k}", cfg, {n: (lambda s=s: torch.randn(s, generator=g)) for n, s in
                                                   cfg.shapes().items()})
    recipe = {"merge_method": "ties", "base_model": str(tmp_path / "b0"),
              "models": [{"model": str(tmp_path / "b1"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, json.dumps(recipe), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    largest = 4096 * 1024 * 4
    assert r["bound"] == (2 + 5) * largest + (128 << 20)
    assert r["delta"] <= r["bound"], r
    assert r["delta"] < r["written"], r          # a writer holding the output (one 5 GB shard) would exceed this


# ----- mergekit as an oracle (optional: LMFOUNDRY_MERGEKIT=1 and mergekit-yaml on PATH) ------------

_MK = os.environ.get("LMFOUNDRY_MERGEKIT")        # 1, or the path of mergekit-yaml (e.g. in its own venv)
MERGEKIT = (_MK if os.path.isfile(_MK) else shutil.which("mergekit-yaml")) if _MK else None


def _oracle_recipes(root):
    m = lambda k: str(root / f"m{k}")                              # noqa: E731
    two = lambda **p: [{"model": m(1), "parameters": {"weight": 0.6, **p}},   # noqa: E731
                       {"model": m(2), "parameters": {"weight": 0.4, **p}}]
    yield "linear", {"merge_method": "linear", "base_model": m(0), "models": two(), "parameters": {"weight": 0.3}}
    yield "task_arithmetic", {"merge_method": "task_arithmetic", "base_model": m(0), "models": two(),
                              "parameters": {"lambda": 0.8}}
    yield "ties", {"merge_method": "ties", "base_model": m(0), "models": two(density=0.4)}
    yield "breadcrumbs", {"merge_method": "breadcrumbs", "base_model": m(0), "models": two(density=0.6, gamma=0.05)}
    yield "breadcrumbs_ties", {"merge_method": "breadcrumbs_ties", "base_model": m(0), "models": two(density=0.5)}
    yield "dare_ties_density_1", {"merge_method": "dare_ties", "base_model": m(0), "models": two(density=1.0)}
    yield "model_stock", {"merge_method": "model_stock", "base_model": m(0), "models": [{"model": m(1)},
                                                                                        {"model": m(2)}]}
    yield "slerp", {"merge_method": "slerp", "base_model": m(0), "slices": [{"sources": [
        {"model": m(0), "layer_range": [0, 2]}, {"model": m(1), "layer_range": [0, 2]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0.2]},
                             {"value": 0.5}]}}
    yield "passthrough", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m(0), "layer_range": [0, 2]}]},
        {"sources": [{"model": m(1), "layer_range": [1, 2], "parameters": {
            "scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]}]}


@pytest.mark.skipif(MERGEKIT is None, reason="set LMFOUNDRY_MERGEKIT=1 with mergekit-yaml on PATH "
                                             "(or LMFOUNDRY_MERGEKIT=/path/to/mergekit-yaml)")
def test_same_tensors_as_mergekit(trio, tmp_path):
    root, _ = trio
    for name, recipe in _oracle_recipes(root):
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(recipe))
        subprocess.run([MERGEKIT, str(tmp_path / f"{name}.yml"), str(tmp_path / f"mk-{name}")], check=True,
                       capture_output=True)
        theirs = {}
        for f in (tmp_path / f"mk-{name}").glob("*.safetensors"):
            theirs.update(load_file(str(f)))
        ours = _weights(merge(recipe, tmp_path / f"lm-{name}"))
        assert set(ours) == set(theirs), name
        for t in ours:
            torch.testing.assert_close(ours[t], theirs[t], rtol=1e-5, atol=1e-6, msg=f"{name}: {t}")
