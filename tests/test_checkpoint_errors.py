"""Bad checkpoints: one clear error naming the file and the problem; nothing half-written."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmfoundry.checkpoint import convert, load_model, save_model
from lmfoundry.errors import CheckpointError, ConfigError


@pytest.fixture
def ckpt(llama_dir):
    return llama_dir[0]


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json: file not found"):
        load_model(ckpt)


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"config\.json: malformed JSON"):
        load_model(ckpt)


def test_missing_required_key(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: missing required key 'hidden_size'"):
        load_model(ckpt)


def test_unknown_architecture(ckpt):
    edit_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConfigError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(ckpt)


@pytest.mark.parametrize("changes,match", [
    ({"num_attention_heads": 3}, "not a multiple|head_dim"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "activation"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
    ({"rope_parameters": None, "rope_scaling": {"type": "llama3", "factor": 8.0}}, "low_freq_factor"),
])
def test_unsupported_or_inconsistent_config_values(ckpt, changes, match):
    edit_config(ckpt, **changes)
    with pytest.raises((ConfigError, CheckpointError), match=match):
        load_model(ckpt)


def test_tensor_of_wrong_shape(ckpt):
    edit_config(ckpt, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ckpt)


def test_unexpected_tensor_such_as_a_bias(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(ckpt)


def test_truncated_shard(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(ckpt)


def test_missing_shard_of_sharded_checkpoint(ckpt, tmp_path):
    save_model(load_model(ckpt), tmp_path / "sharded", max_shard_size=40_000)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard not found"):
        load_model(tmp_path / "sharded")


def test_only_pickled_weights_are_refused_without_unpickling(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_model(ckpt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(ckpt, bad):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = bad
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.k\.weight contains NaN or inf"):
        load_model(ckpt)


def test_failed_write_leaves_nothing_behind(ckpt, tmp_path):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")      # the last tensor written: fails mid-way
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError):
        convert(ckpt, tmp_path / "out", to="mistral", max_shard_size=40_000)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_destination_is_not_clobbered(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(ckpt, tmp_path / "out", to="llama")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert(ckpt, tmp_path / "out", to="llama", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()


def test_loaded_model_does_not_alias_the_checkpoint_files(ckpt):
    model = load_model(ckpt)
    before = model.embed.weight.clone()
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-4096:] = b"\x00" * 4096
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    assert all(torch.equal(a, b) for a, b in [(model.embed.weight, before)])
    assert torch.isfinite(model.lm_head.weight).all()


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("models: [a, b\n", "malformed YAML"),
    ("- just\n- a list\n", "expected"),
    (b"\xff\xfe not utf-8", "malformed YAML"),
])
@pytest.mark.parametrize("verb", ["merge", "sft"])
def test_yaml_files_bad_input_is_one_clear_error(tmp_path, capsys, verb, content, message):
    """merge recipes and --config files share one YAML reader: each failure is one line naming
    the file, and nothing is written."""
    from lmfoundry.cli import main
    path = tmp_path / "in.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    argv = ["merge", str(path), str(tmp_path / "out")] if verb == "merge" else \
        ["sft", "--config", str(path), "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmfoundry: error:") and err.count("\n") == 1 and str(path) in err and message in err
    assert not (tmp_path / "out").exists()


# ----- config.json errors name the file and the key as the user wrote it ---------------------

@pytest.mark.parametrize("preset, fmt, changes, message", [
    ("tiny", "llama", {"num_attention_heads": "six"}, "num_attention_heads must be a positive integer, got 'six'"),
    ("tiny", "llama", {"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0"),
    ("tiny-mistral", "mistral", {"num_key_value_heads": 3},
     "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("tiny-mistral", "mistral", {"sliding_window": -1}, "sliding_window must be a positive integer, got -1"),
    ("tiny-solar-pro", "solar", {"bskcn_3": [2, 50]}, "bskcn_3: layer 50 is outside 0..7"),
    ("tiny-solar-pro", "solar", {"bskcn_tv": [0.9, "high"]},
     "bskcn_tv must be (training weight, inference weight), got [0.9, 'high']"),
    ("tiny-exaone", "exaone", {"num_layers": "two"}, "num_layers must be a positive integer, got 'two'"),
    ("tiny-exaone", "exaone", {"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon must be a positive number, got -1e-05"),
    ("tiny-openelm", "openelm", {"model_dim": "six"}, "model_dim must be a positive integer, got 'six'"),
    ("tiny-openelm", "openelm", {"ffn_multipliers": "wide"},
     "ffn_multipliers must be a number, a (min, max) pair or a list of 4 numbers, got 'wide'"),
    ("tiny-openelm", "openelm", {"rope_freq_constant": "ten thousand"},
     "rope_freq_constant must be a positive number, got 'ten thousand'"),
])
def test_bad_config_value_is_reported_with_its_file_and_its_own_key(tmp_path, preset, fmt, changes, message):
    from lmfoundry.config import ModelConfig
    from lmfoundry.model import Transformer
    save_model(Transformer(ModelConfig.from_preset(preset)), tmp_path / fmt, format=fmt)
    edit_config(tmp_path / fmt, **changes)
    with pytest.raises(ConfigError) as e:
        load_model(tmp_path / fmt)
    assert str(e.value) == f"{tmp_path / fmt / 'config.json'}: {message}"


def test_rope_parameters_errors_name_rope_parameters(ckpt):
    edit_config(ckpt, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match=r"config\.json: rope_parameters: rope_type 'yarn' is not supported"):
        load_model(ckpt)
    edit_config(ckpt, rope_parameters={"rope_type": "default", "rope_theta": "big"})
    with pytest.raises(ConfigError, match=r"config\.json: rope_parameters\.rope_theta must be a positive number"):
        load_model(ckpt)


def test_nan_is_reported_with_the_shard_and_the_stored_tensor_name(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight "):
        load_model(ckpt)


def test_integer_weights_are_refused_by_name(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has dtype I32; weights must be"):
        load_model(ckpt)
