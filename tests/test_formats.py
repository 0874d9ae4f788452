"""Solar Pro, OpenELM and EXAONE against independent references that follow the published
semantics (../shared/reference/architectures.md), built from transformers' own layers or
written out here; round trips through every format; conversions and refusals."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import hf_llama, random_tokens
from lmfoundry.checkpoint import convert, load_model, read_config, save_model
from lmfoundry.config import ModelConfig, openelm_layerwise
from lmfoundry.errors import ConfigError
from lmfoundry.model import Transformer

TOL = 1e-4


# ----- Solar Pro: transformers' Llama layers + the bskcn loop as vLLM/SGLang run it ----------

BSKCN = dict(bskcn_1=[1, 3], bskcn_2=[3], bskcn_3=[2, 5], bskcn_4=[6], bskcn_tv=[0.9, 0.8])


def solar_reference(ref, tokens, tv, bskcn=BSKCN):
    """Before layer i: save1 if i in bskcn_1, save2 if in bskcn_2, then blend
    x = tv*save1 + (1-tv)*x if in bskcn_3, x = tv*save2 + (1-tv)*x if in bskcn_4."""
    m = ref.model
    h = m.embed_tokens(tokens)
    pos = torch.arange(tokens.shape[1])[None]
    pe = m.rotary_emb(h, position_ids=pos)
    save1 = save2 = None
    for i, layer in enumerate(m.layers):
        if i in bskcn["bskcn_1"]:
            save1 = h
        if i in bskcn["bskcn_2"]:
            save2 = h
        if i in bskcn["bskcn_3"]:
            h = save1 * tv + h * (1 - tv)
        if i in bskcn["bskcn_4"]:
            h = save2 * tv + h * (1 - tv)
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
    return ref.lm_head(m.norm(h))


@pytest.fixture
def solar_dir(tmp_path):
    ref = hf_llama(num_hidden_layers=8)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["SolarForCausalLM"], model_type="solar", sliding_window=64, **BSKCN)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path, ref


def test_solar_pro_matches_reference_in_eval_and_training(solar_dir):
    path, ref = solar_dir
    model = load_model(path)
    tokens = random_tokens(2, 40)
    with torch.no_grad():
        assert (model.eval()(tokens) - solar_reference(ref, tokens, 0.8)).abs().max() <= TOL
        assert (model.train()(tokens) - solar_reference(ref, tokens, 0.9)).abs().max() <= TOL


def test_solar_reference_detects_wrong_blend_order(solar_dir):
    path, ref = solar_dir
    model = load_model(path).eval()
    tokens = random_tokens(1, 24)
    with torch.no_grad():
        # weight on the current state instead of the saved one must not pass
        assert (model(tokens) - solar_reference(ref, tokens, 0.2)).abs().max() > 1e-2
        # blending after the layer instead of before must not pass
        shifted = {**BSKCN, "bskcn_3": [3, 6], "bskcn_4": [7]}
        assert (model(tokens) - solar_reference(ref, tokens, 0.8, shifted)).abs().max() > 1e-2


def test_solar_pro_config_round_trip(solar_dir, tmp_path):
    path, _ = solar_dir
    cfg, fmt = read_config(path)
    assert fmt.name == "solar" and cfg.skip_save == [[1, 3], [3]] and cfg.skip_blend == [[2, 5], [6]]
    assert cfg.skip_weights == (0.9, 0.8) and cfg.sliding_window == 64
    save_model(load_model(path), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["SolarForCausalLM"]
    assert {k: written[k] for k in BSKCN} == BSKCN
    tokens = random_tokens(1, 20)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "out")(tokens), load_model(path)(tokens))


def test_solar_pro_preset_is_the_published_schedule():
    cfg = ModelConfig.from_preset("solar-pro-22b")
    assert cfg.skip_save == [[12, 20, 32, 44], [20, 32]] and cfg.skip_blend == [[16, 24, 36, 48], [28, 40]]
    assert cfg.sliding_window == 2047 and cfg.vocab_size == 32128


# ----- OpenELM: written out from corenet's semantics over the fused checkpoint tensors -------

def openelm_reference(t, c, tokens, linear=None):
    """Fused qkv split [q|k|v] by heads, q/k RMSNorm over head_dim before rotate-half RoPE,
    GQA by repeat_interleave, GLU with the first half of proj_1 as the gate, tied logits.
    `linear(name, x)` computes the projection stored as `name` (default: x @ t[name].T)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    linear = linear or (lambda name, x: x @ t[name].T)

    def rms(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    hd, d = c["head_dim"], c["model_dim"]
    B, T = tokens.shape
    inv = 1.0 / (c["rope_freq_constant"] ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.arange(T).float()[:, None] * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[None], emb.sin()[None]
    x = t["transformer.token_embeddings.weight"][tokens]
    for i in range(c["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        nq, nkv = c["num_query_heads"][i], c["num_kv_heads"][i]
        qkv = linear(p + "attn.qkv_proj.weight", rms(x, t[p + "attn_norm.weight"])).view(B, T, nq + 2 * nkv, hd)
        q, k, v = qkv.transpose(1, 2).split([nq, nkv, nkv], dim=1)
        q, k = rms(q, t[p + "attn.q_norm.weight"]), rms(k, t[p + "attn.k_norm.weight"])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, nq * hd)
        x = x + linear(p + "attn.out_proj.weight", y)
        y1, y2 = linear(p + "ffn.proj_1.weight", rms(x, t[p + "ffn_norm.weight"])).chunk(2, -1)
        x = x + linear(p + "ffn.proj_2.weight", F.silu(y1) * y2)
    return rms(x, t["transformer.norm.weight"]) @ t["transformer.token_embeddings.weight"].T


def make_openelm(path, d=64, L=4, hd=16, g=2, vocab=128, seed=0):
    sizes = openelm_layerwise(d, L, hd, (0.5, 1.0), (0.5, 4.0), gqa_group=g, ffn_divisor=32)
    c = {"architectures": ["OpenELMForCausalLM"], "model_type": "openelm", "model_dim": d,
         "num_transformer_layers": L, "head_dim": hd, "num_gqa_groups": g, "qkv_multipliers": [0.5, 1.0],
         "ffn_multipliers": [0.5, 4.0], "ffn_dim_divisor": 32, "ffn_with_glu": True, "vocab_size": vocab,
         "normalize_qk_projections": True, "share_input_output_layers": True, "rope_freq_constant": 10000,
         "rope_max_length": 512, "max_context_length": 256, "bos_token_id": 1, "eos_token_id": 2,
         "num_query_heads": sizes["n_heads"], "num_kv_heads": sizes["n_kv_heads"]}
    g_ = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g_) * 0.1  # noqa: E731
    t = {"transformer.token_embeddings.weight": r(vocab, d), "transformer.norm.weight": 1 + r(d)}
    for i, (nq, nkv, f) in enumerate(zip(sizes["n_heads"], sizes["n_kv_heads"], sizes["ffn_dim"])):
        p = f"transformer.layers.{i}."
        t.update({p + "attn_norm.weight": 1 + r(d), p + "attn.qkv_proj.weight": r((nq + 2 * nkv) * hd, d),
                  p + "attn.q_norm.weight": 1 + r(hd), p + "attn.k_norm.weight": 1 + r(hd),
                  p + "attn.out_proj.weight": r(d, nq * hd), p + "ffn_norm.weight": 1 + r(d),
                  p + "ffn.proj_1.weight": r(2 * f, d), p + "ffn.proj_2.weight": r(d, f)})
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(c))
    return t, c


def test_openelm_matches_reference(tmp_path):
    t, c = make_openelm(tmp_path)
    model = load_model(tmp_path)
    assert model.config.n_heads == c["num_query_heads"] and len(set(model.config.ffn_dim)) > 1
    tokens = random_tokens(2, 30)
    with torch.no_grad():
        assert (model(tokens) - openelm_reference(t, c, tokens)).abs().max() <= TOL


@pytest.mark.parametrize("break_it", ["swap_gate_up", "drop_qk_norm", "swap_k_v"])
def test_openelm_reference_detects_layout_mistakes(tmp_path, break_it):
    t, c = make_openelm(tmp_path)
    model = load_model(tmp_path)
    bad = dict(t)
    for i in range(c["num_transformer_layers"]):
        p = f"transformer.layers.{i}."
        nq, nkv, hd = c["num_query_heads"][i], c["num_kv_heads"][i], c["head_dim"]
        if break_it == "swap_gate_up":
            bad[p + "ffn.proj_1.weight"] = torch.cat(t[p + "ffn.proj_1.weight"].chunk(2)[::-1])
        elif break_it == "drop_qk_norm":
            bad[p + "attn.q_norm.weight"] = torch.ones(hd)
        else:
            q, k, v = t[p + "attn.qkv_proj.weight"].split([nq * hd, nkv * hd, nkv * hd])
            bad[p + "attn.qkv_proj.weight"] = torch.cat([q, v, k])
    tokens = random_tokens(1, 20)
    with torch.no_grad():
        assert (model(tokens) - openelm_reference(bad, c, tokens)).abs().max() > 1e-3


def test_openelm_presets_follow_the_scaling_formula():
    cfg = ModelConfig.from_preset("openelm-270m")
    assert cfg.n_heads == [12] * 5 + [16] * 7 + [20] * 4 and cfg.n_kv_heads == [3] * 5 + [4] * 7 + [5] * 4
    assert cfg.ffn_dim[:4] == [768, 1024, 1280, 1536] and cfg.ffn_dim[-1] == 5120
    assert ModelConfig.from_preset("openelm-1.1b").ffn_dim[13:15] == [4608, 4608]   # rounding collision
    # new widths and depths from the same alpha/beta ranges
    new = openelm_layerwise(dim=1024, n_layers=10, head_dim=64)
    assert len(new["n_heads"]) == 10 and new["n_heads"] == sorted(new["n_heads"])
    assert all(f % 256 == 0 for f in new["ffn_dim"]) and new["ffn_dim"][0] < new["ffn_dim"][-1]


def test_openelm_round_trip_rewrites_fused_tensors_exactly(tmp_path):
    from safetensors.torch import load_file
    t, _ = make_openelm(tmp_path / "src")
    save_model(load_model(tmp_path / "src"), tmp_path / "dst")
    written = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert set(written) == set(t) and all(torch.equal(written[k], t[k]) for k in t)
    assert read_config(tmp_path / "dst")[0] == read_config(tmp_path / "src")[0]


# ----- EXAONE: its names over Llama math; the reference is transformers' Llama ----------------

EXAONE_RENAMES = [("model.", "transformer."), (".layers.", ".h."), ("embed_tokens", "wte"),
                  ("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2"),
                  (".self_attn.", ".attn.attention."), ("o_proj", "out_proj"), ("gate_proj", "c_fc_0"),
                  ("up_proj", "c_fc_1"), ("down_proj", "c_proj"), ("transformer.norm", "transformer.ln_f")]


def make_exaone(path):
    ref = hf_llama(rope_theta=500000.0)
    tensors = {}
    for name, t in ref.state_dict().items():
        for a, b in EXAONE_RENAMES:
            name = name.replace(a, b)
        tensors[name] = t.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    c = ref.config
    (path / "config.json").write_text(json.dumps({
        "architectures": ["ExaoneForCausalLM"], "model_type": "exaone", "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "rope_theta": 500000.0, "rope_scaling": None, "vocab_size": c.vocab_size, "max_position_embeddings": 256,
        "activation_function": "silu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 361, "pad_token_id": 0}))
    return ref, tensors


def test_exaone_matches_transformers_llama(tmp_path):
    ref, _ = make_exaone(tmp_path)
    model = load_model(tmp_path)
    assert model.config.rope_theta == 500000.0 and not model.config.tie_embeddings
    tokens = random_tokens(2, 32)
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() <= TOL


def test_exaone_gate_and_up_are_not_interchangeable(tmp_path):
    ref, tensors = make_exaone(tmp_path / "x")
    for i in range(2):
        p = f"transformer.h.{i}.mlp."
        tensors[p + "c_fc_0.weight"], tensors[p + "c_fc_1.weight"] = tensors[p + "c_fc_1.weight"], tensors[p + "c_fc_0.weight"]
    save_file(tensors, str(tmp_path / "x" / "model.safetensors"))
    tokens = random_tokens(1, 16)
    with torch.no_grad():
        assert (load_model(tmp_path / "x")(tokens) - ref(tokens).logits).abs().max() > 1e-3


def test_exaone_converts_to_llama_that_transformers_loads(tmp_path):
    import transformers
    ref, _ = make_exaone(tmp_path / "exaone")
    convert(tmp_path / "exaone", tmp_path / "llama", to="llama")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama").float().eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    tokens = random_tokens(1, 24)
    with torch.no_grad():
        assert (loaded(tokens).logits - ref(tokens).logits).abs().max() <= TOL
    convert(tmp_path / "llama", tmp_path / "back", to="exaone")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "back")(tokens), load_model(tmp_path / "exaone")(tokens))


# ----- Llama and Mistral out: transformers loads what we write ---------------------------------

@pytest.mark.parametrize("arch,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                     ("mistral", {"sliding_window": 16})])
def test_saved_directory_loads_in_transformers_with_same_logits(tmp_path, arch, kw):
    import transformers
    hf_llama(arch=arch, **kw).save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    save_model(ours, tmp_path / "dst", max_shard_size=40_000)   # several shards + index
    assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").float().eval()
    tokens = random_tokens(2, 40)
    with torch.no_grad():
        assert (loaded(tokens).logits - ours(tokens)).abs().max() <= TOL


def test_preset_model_saves_as_llama_and_loads_in_transformers(tmp_path):
    import transformers
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    save_model(model, tmp_path / "tiny", dtype="bfloat16")
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32).eval()
    ours = load_model(tmp_path / "tiny", dtype="float32")
    tokens = random_tokens(1, 20, vocab=512)
    with torch.no_grad():
        assert (loaded(tokens).logits - ours(tokens)).abs().max() <= TOL


# ----- refusals ----------------------------------------------------------------------------

def test_convert_refuses_per_layer_widths_into_llama(tmp_path):
    make_openelm(tmp_path / "elm")
    with pytest.raises(ConfigError, match="per-layer"):
        convert(tmp_path / "elm", tmp_path / "out", to="llama")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("to,why", [("llama", "skip connections"), ("exaone", "sliding"),
                                    ("openelm", "skip connections")])
def test_convert_refuses_what_the_target_cannot_represent(solar_dir, tmp_path, to, why):
    path, _ = solar_dir
    with pytest.raises(ConfigError, match=why):
        convert(path, tmp_path / "out", to=to)


def test_llama_converts_to_mistral_and_solar_without_change(llama_dir, tmp_path):
    path, ref = llama_dir
    tokens = random_tokens(1, 16)
    for to in ("mistral", "solar"):
        convert(path, tmp_path / to, to=to)
        with torch.no_grad():
            assert (load_model(tmp_path / to)(tokens) - ref(tokens).logits).abs().max() <= TOL


def test_legacy_rope_keys_load_like_rope_parameters(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    ref = hf_llama(rope_theta=500000.0, rope_scaling=scaling)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=500000.0, rope_scaling={**scaling, "type": scaling["rope_type"]})  # transformers 4 layout
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tokens = random_tokens(1, 48)
    with torch.no_grad():
        assert (load_model(tmp_path)(tokens) - ref(tokens).logits).abs().max() <= TOL
