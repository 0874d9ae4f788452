"""ModelConfig and its presets: published shapes give published parameter counts; errors name
the field as the caller knows it."""
import pytest

from lmfoundry.config import PRESETS, ModelConfig
from lmfoundry.errors import ConfigError

# The parameter counts their model cards and papers state (embeddings and lm_head included).
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-3-8b": 8_030_261_248,
             "mistral-7b": 7_241_732_096, "solar-10.7b": 10_731_524_096}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_presets_have_the_published_parameter_counts(name):
    assert ModelConfig.from_preset(name).num_params() == PUBLISHED[name]


def test_presets_are_keyword_data_and_from_preset_does_not_alias_them():
    for name, fields in PRESETS.items():
        assert isinstance(fields, dict) and ModelConfig.from_preset(name).to_dict() == ModelConfig(**fields).to_dict()
    cfg = ModelConfig.from_preset("tiny-solar-pro")
    cfg.skip_save[0].append(7)
    assert PRESETS["tiny-solar-pro"]["skip_save"][0] == [1, 3]


def test_solar_10_7b_is_mistral_7b_up_scaled_to_48_layers():
    solar, mistral = ModelConfig.from_preset("solar-10.7b"), ModelConfig.from_preset("mistral-7b")
    assert solar.n_layers == 48 == 2 * (mistral.n_layers - 8)
    assert (solar.dim, solar.n_heads[0], solar.n_kv_heads[0], solar.ffn_dim[0]) == (
        mistral.dim, mistral.n_heads[0], mistral.n_kv_heads[0], mistral.ffn_dim[0])


@pytest.mark.parametrize("fields, message", [
    ({"n_heads": "six"}, "heads must be a positive integer, got 'six'"),
    ({"n_heads": [4, 0]}, r"heads must be a positive integer per layer, got \[4, 0\]"),
    ({"n_heads": [4, 4, 4]}, "heads has 3 entries but the model has 2 layers"),
    ({"dim": 64.0}, "width must be a positive integer, got 64.0"),
    ({"n_kv_heads": 3}, "heads 4 is not a multiple of n_kv_heads 3"),
    ({"norm_eps": "small"}, "norm_eps must be a positive number, got 'small'"),
    ({"skip_save": [[0]], "skip_blend": [[5]]}, r"skip_blend\[0\]: layer 5 is outside 0..1"),
])
def test_errors_name_each_field_as_the_caller_calls_it(fields, message):
    base = dict(vocab_size=32, dim=64, n_layers=2, n_heads=4, ffn_dim=96)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**base, **fields}, names={"n_heads": "heads", "dim": "width"})


def test_names_are_not_a_field():
    cfg = ModelConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, ffn_dim=96, names={"dim": "width"})
    assert "names" not in cfg.to_dict() and cfg.replace(vocab_size=64).vocab_size == 64
    assert cfg == ModelConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4, ffn_dim=96)
