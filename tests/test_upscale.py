"""Depth Up-Scaling and block expansion: tensors against the plan, logits against transformers'
own layers run in the stacked order, per-layer config and Solar Pro skips, errors, CLI."""
import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import hf_llama, random_tokens
from test_formats import BSKCN, make_openelm, openelm_reference, solar_reference
from lmfoundry.checkpoint import load_model, read_config, save_model
from lmfoundry.cli import main
from lmfoundry.errors import ConfigError, LMFoundryError
from lmfoundry.scale import plan_layers, upscale

TOL = 1e-4
NO_SKIPS = dict(bskcn_1=[], bskcn_2=[], bskcn_3=[], bskcn_4=[])
LAYER_KEYS = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def stacked(ref, order):
    """A transformers model's embeddings, norm and head around its own layers in `order`
    (the shape solar_reference reads)."""
    m = ref.model
    body = SimpleNamespace(embed_tokens=m.embed_tokens, rotary_emb=m.rotary_emb, norm=m.norm,
                           layers=[m.layers[i] for i in order])
    return SimpleNamespace(model=body, lm_head=ref.lm_head)


def layer(t, i, key):
    return t[f"model.layers.{i}.{key}.weight"]


@pytest.fixture
def llama8(tmp_path):
    ref = hf_llama(num_hidden_layers=8)
    ref.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return tmp_path / "src", ref


@pytest.fixture
def solar8(tmp_path):
    ref = hf_llama(num_hidden_layers=8)
    ref.save_pretrained(tmp_path / "solar")
    cfg = json.loads((tmp_path / "solar" / "config.json").read_text())
    cfg.update(architectures=["SolarForCausalLM"], model_type="solar", sliding_window=64, **BSKCN)
    (tmp_path / "solar" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "solar", ref


# ----- plans: the SOLAR arithmetic ------------------------------------------------------------

def test_plan_follows_solar_numbers_and_equivalent_spellings_agree():
    solar = plan_layers(32, drop=8)
    assert len(solar) == 48 and solar == list(range(24)) + list(range(8, 32))
    assert plan_layers(32, layers="0:24,8:32") == solar == plan_layers(32, target_layers=48)
    assert plan_layers(32, layers=[(0, 24), (8, 32)]) == solar
    assert plan_layers(8, drop=2) == plan_layers(8, layers="0:6,2:8") == plan_layers(8, target_layers=12)
    assert plan_layers(8, layers="0:4,2:6,4:8") == [0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7]
    assert plan_layers(8) == list(range(8))


# ----- DUS of a transformers Llama ------------------------------------------------------------

def test_dus_copies_each_layer_from_its_source_and_matches_stacked_transformers_layers(llama8, tmp_path):
    import transformers
    src, ref = llama8
    result = upscale(src, tmp_path / "out", drop=2)
    plan = list(range(6)) + list(range(2, 8))
    assert result.written and result.config.n_layers == 12
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert len(b) == 3 + 12 * 9
    for j, i in enumerate(plan):
        for key in LAYER_KEYS:
            assert torch.equal(layer(b, j, key), layer(a, i, key)), (j, key)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(b[name], a[name])
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert type(out).__name__ == "LlamaForCausalLM" and out.config.num_hidden_layers == 12
    tokens = random_tokens(2, 24)
    with torch.no_grad():
        want = solar_reference(stacked(ref, plan), tokens, 0.8, NO_SKIPS)
        assert (out(tokens).logits - want).abs().max() <= TOL
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    recipe = yaml.safe_load((tmp_path / "out" / "lmfoundry_recipe.yaml").read_text())
    assert recipe["operation"] == "upscale" and recipe["arguments"]["drop"] == 2
    assert recipe["layer_map"] == ["0-5 <- 0-5", "6-11 <- 2-7"]


def test_block_expansion_keeps_the_function_and_zeroes_the_new_output_projections(llama8, tmp_path):
    import transformers
    src, ref = llama8
    upscale(src, tmp_path / "out", expand=2)   # 8 layers -> blocks after layers 3 and 7
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    order = [0, 1, 2, 3, 3, 4, 5, 6, 7, 7]
    for j, i in enumerate(order):
        new = j in (4, 9)
        for key in LAYER_KEYS:
            zeroed = new and key in ("self_attn.o_proj", "mlp.down_proj")
            want = torch.zeros_like(layer(a, i, key)) if zeroed else layer(a, i, key)
            assert torch.equal(layer(b, j, key), want), (j, key)
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    tokens = random_tokens(2, 24)
    with torch.no_grad():
        assert (out(tokens).logits - ref(tokens).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("width,averaged", [(1, {5: (5, 1), 6: (6, 2)}),
                                            (2, {4: (4, 0), 5: (5, 1), 6: (6, 2), 7: (7, 3)})])
def test_seam_average_is_the_mean_of_both_copies_at_each_position(llama8, tmp_path, width, averaged):
    # drop 2 of 8: copy A holds source p at output p, copy B holds source p - 4; the seam is at 6
    src, _ = llama8
    upscale(src, tmp_path / "out", drop=2, seam="average", seam_width=width)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    plan = list(range(6)) + list(range(2, 8))
    for j in range(12):
        for key in LAYER_KEYS:
            if j in averaged:
                x, y = averaged[j]
                want = (layer(a, x, key) + layer(a, y, key)) / 2
            else:
                want = layer(a, plan[j], key)
            assert torch.equal(layer(b, j, key), want), (j, key)


# ----- per-layer configs: OpenELM lists, Solar Pro skips ------------------------------------------

def test_openelm_dus_rewrites_per_layer_lists_and_round_trips(tmp_path):
    t, c = make_openelm(tmp_path / "src")
    src_cfg = read_config(tmp_path / "src")[0]
    upscale(tmp_path / "src", tmp_path / "out", drop=1)
    plan = [0, 1, 2, 1, 2, 3]
    cfg, fmt = read_config(tmp_path / "out")
    assert fmt.name == "openelm" and cfg.n_layers == 6
    for key in ("n_heads", "n_kv_heads", "ffn_dim"):
        assert getattr(cfg, key) == [getattr(src_cfg, key)[i] for i in plan], key
    stacked_t = {k: v for k, v in t.items() if ".layers." not in k}
    for j, i in enumerate(plan):
        stacked_t.update({k.replace(f".layers.{i}.", f".layers.{j}."): v for k, v in t.items()
                          if f".layers.{i}." in k})
    c_out = {**c, "num_transformer_layers": 6, "num_query_heads": cfg.n_heads, "num_kv_heads": cfg.n_kv_heads}
    model = load_model(tmp_path / "out")
    tokens = random_tokens(1, 20)
    with torch.no_grad():
        assert (model(tokens) - openelm_reference(stacked_t, c_out, tokens)).abs().max() <= TOL
    save_model(model, tmp_path / "again")
    assert read_config(tmp_path / "again")[0] == cfg
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(again) == set(out) and all(torch.equal(again[k], out[k]) for k in out)


def test_openelm_dus_that_its_config_cannot_express_is_refused(tmp_path):
    make_openelm(tmp_path / "src")
    with pytest.raises(ConfigError, match="cannot be written as OpenELMForCausalLM"):
        upscale(tmp_path / "src", tmp_path / "out", layers="0:4,0:4")   # heads 2,4,4,4,2,...: not a linear schedule
    assert not (tmp_path / "out").exists()


def test_solar_pro_skips_follow_their_layers_into_each_copy(solar8, tmp_path):
    # source: slot 0 saves before 1 and 3, blends before 2 and 5; slot 1 saves before 3, blends before 6.
    # drop 1: copy A = 0-6 at outputs 0-6, copy B = 1-7 at outputs 7-13 (+6); every skip fits in a copy.
    src, ref = solar8
    upscale(src, tmp_path / "out", drop=1)
    cfg, fmt = read_config(tmp_path / "out")
    assert fmt.name == "solar" and cfg.n_layers == 14
    assert cfg.skip_save == [[1, 3, 7, 9], [3, 9]] and cfg.skip_blend == [[2, 5, 8, 11], [6, 12]]
    bskcn = {**BSKCN, "bskcn_1": [1, 3, 7, 9], "bskcn_2": [3, 9], "bskcn_3": [2, 5, 8, 11], "bskcn_4": [6, 12]}
    tokens = random_tokens(2, 24)
    with torch.no_grad():
        want = solar_reference(stacked(ref, list(range(7)) + list(range(1, 8))), tokens, 0.8, bskcn)
        assert (load_model(tmp_path / "out")(tokens) - want).abs().max() <= TOL


def test_solar_pro_skip_cut_by_a_seam_is_refused(solar8, tmp_path):
    # drop 2: copy B = source 2-7 keeps the blend before layer 2 but not the save before layer 1 that feeds it
    with pytest.raises(ConfigError, match="slot 0: layer 2 blends in the state saved at layer 1.*source 2-7"):
        upscale(solar8[0], tmp_path / "out", drop=2)
    assert not (tmp_path / "out").exists()


def test_solar_pro_block_expansion_shifts_skips_and_keeps_the_function(solar8, tmp_path):
    src, _ = solar8
    upscale(src, tmp_path / "out", expand=2)   # new blocks at 4 and 9: source i >= 4 moves to i + 1
    cfg = read_config(tmp_path / "out")[0]
    assert cfg.skip_save == [[1, 3], [3]] and cfg.skip_blend == [[2, 6], [7]]
    tokens = random_tokens(2, 24)
    with torch.no_grad():
        assert (load_model(tmp_path / "out")(tokens) - load_model(src)(tokens)).abs().max() <= 1e-5


# ----- errors and dry runs -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(drop=8), r"drop=8: must be between 1 and 7"),
    (dict(drop=0), r"drop=0: must be between 1 and 7"),
    (dict(drop="x"), r"drop='x': not an integer"),
    (dict(layers="0:9"), r"slice 0:9 needs 0 <= start < end <= 8"),
    (dict(layers="3:3"), r"slice 3:3 needs"),
    (dict(layers="5:2"), r"slice 5:2 needs"),
    (dict(layers="0:a"), r"layers slice '0:a'='a': not an integer"),
    (dict(layers="0-4"), r"'0-4' is not a slice start:end"),
    (dict(layers=""), r"at least one slice"),
    (dict(target_layers=13), r"target_layers=13: .*even number from 2 to 14"),
    (dict(target_layers=16), r"target_layers=16"),
    (dict(drop=2, layers="0:4"), r"only one of drop, layers, target_layers"),
    (dict(drop=2, seam="blend"), r"seam='blend': must be one of stack, average"),
    (dict(expand=3), r"expand=3: must divide the 8 layers .*1, 2, 4, 8"),
    (dict(layers="0:8", seam="average"), r"no seam"),
    (dict(drop=2, seam="average", seam_width=4), r"seam_width=4: .*source has 0..7"),
    (dict(drop=2, seam_width=2), r"seam_width=2: .*applies to seam='average' only"),
    (dict(), r"nothing to do"),
    (dict(drop=2, dtype="fp8"), r"unknown dtype 'fp8'"),
])
def test_bad_arguments_are_one_clear_error_and_write_nothing(llama8, tmp_path, kwargs, match):
    with pytest.raises(LMFoundryError, match=match):
        upscale(llama8[0], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]   # no temporary directory left behind either


def test_missing_source_and_occupied_output_are_refused(llama8, tmp_path):
    src, _ = llama8
    with pytest.raises(ConfigError, match=r"src .*nope: no such checkpoint directory"):
        upscale(tmp_path / "nope", tmp_path / "out", drop=2)
    with pytest.raises(ConfigError, match="is the source directory"):
        upscale(src, src, drop=2, overwrite=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        upscale(src, tmp_path / "out", drop=2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_dry_run_reports_the_plan_and_sizes_and_writes_nothing(llama8, tmp_path):
    src, _ = llama8
    r = upscale(src, tmp_path / "out", drop=2, dry_run=True, max_shard_size="100kB")
    assert not r.written and not (tmp_path / "out").exists()
    assert r.config.n_layers == 12 and r.n_tensors == 3 + 12 * 9
    assert r.write_bytes == r.config.num_params() * 4 == r.read_bytes   # fp32; every output tensor read once
    largest = 128 * 64 * 4                                               # the embedding
    assert r.peak_bytes == 2 * largest        # the writer streams: one tensor read + its cast copy
    text = r.describe()
    assert "0-5 <- 0-5; 6-11 <- 2-7" in text and f"{r.config.num_params():,} parameters" in text
    avg = upscale(src, tmp_path / "out", drop=2, seam="average", dry_run=True)
    per_layer = (2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64) * 4
    assert avg.read_bytes == r.read_bytes + 2 * per_layer   # outputs 5 and 6 each read two source layers


# ----- CLI -------------------------------------------------------------------------------------

def test_cli_upscale_dry_run_and_bad_argument(llama8, tmp_path, capsys):
    src, _ = llama8
    assert main(["upscale", str(src), str(tmp_path / "out"), "--target-layers", "12", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "layer map  0-5 <- 0-5; 6-11 <- 2-7" in printed and "would write" in printed
    assert not (tmp_path / "out").exists()
    assert main(["upscale", str(src), str(tmp_path / "out"), "--layers", "0:6,2:8", "--expand", "4"]) == 0
    assert "wrote" in capsys.readouterr().out and read_config(tmp_path / "out")[0].n_layers == 16
    assert main(["upscale", str(src), str(tmp_path / "bad"), "--drop", "9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmfoundry: error: drop=9: must be between 1 and 7")
    assert not (tmp_path / "bad").exists()
