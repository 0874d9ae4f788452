"""int8 weight-only quantization and the inference loader.

References: the per-channel symmetric formula (w ~ round(w / s) * s, s = max|w_row| / 127, so each
weight is off by at most s / 2), F.linear on the dequantized weights (the kernel must compute
exactly that product, up to bf16 rounding of the activations), and the fp32 model (logits close,
greedy tokens unchanged on most prompts)."""
import json

import pytest
import torch
import torch.nn.functional as F

from lmfoundry.cli import main
from lmfoundry.config import ModelConfig
from lmfoundry.errors import LMFoundryError
from lmfoundry.generate import generate
from lmfoundry.model import Transformer
from lmfoundry.quantize import Int8Linear, int8_weights, load_for_inference, native_bf16, quantize


def test_int8_weights_are_per_channel_symmetric_and_within_half_a_step():
    w = torch.randn(64, 48) * torch.linspace(0.01, 3, 64)[:, None]     # channels of very different scale
    q, s = int8_weights(w)
    assert q.dtype == torch.int8 and q.abs().amax(1).eq(127).all()      # each row uses the full range
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_computes_the_dequantized_product(dtype):
    lin = torch.nn.Linear(48, 40, bias=False)
    x = torch.randn(3, 5, 48).to(dtype)
    q, s = int8_weights(lin.weight)
    ref = F.linear(x.float().bfloat16().float(), q.float() * s[:, None])   # activations rounded to bf16
    out = Int8Linear(lin)(x)
    assert out.dtype == dtype and out.shape == (3, 5, 40)
    torch.testing.assert_close(out.float(), ref, atol=0.02 * ref.abs().max().item(), rtol=0)


def demo_models(demo_dir):
    return load_for_inference(demo_dir, "float32"), load_for_inference(demo_dir, quantize_method="int8")


def test_quantized_logits_stay_close_to_fp32(demo_dir):
    fp32, int8 = demo_models(demo_dir)
    assert isinstance(int8.lm_head, Int8Linear) and int8.dtype == torch.bfloat16
    tokens = torch.randint(0, fp32.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = fp32(tokens), int8(tokens).float()
    # bound: 5% of the logits' range (int8 weights + bf16 activations); measured 0.5%, 99% same argmax
    assert (got - ref).abs().max() <= 0.05 * (ref.max() - ref.min())
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_quantized_greedy_output_is_unchanged_for_most_prompts(demo_dir):
    fp32, int8 = demo_models(demo_dir)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, fp32.config.vocab_size, (n,), generator=g).tolist() for n in (4, 9, 14, 6, 11, 7)]
    kw = dict(max_new_tokens=8, temperature=0, stop_ids=())
    same = sum(a.tokens == b.tokens for a, b in zip(generate(fp32, prompts, **kw), generate(int8, prompts, **kw)))
    assert same >= 4, f"only {same} of {len(prompts)} prompts decode the same tokens"


def test_tied_output_layer_gets_its_own_int8_copy():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny").replace(tie_embeddings=True)).eval()
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        ref = m(tokens)
        got = quantize(m.bfloat16(), "int8")(tokens).float()
    assert isinstance(m.lm_head, Int8Linear) and m.embed.weight.dtype == torch.bfloat16
    assert (got - ref).abs().max() <= 0.05 * (ref.max() - ref.min())
    assert not any(p.requires_grad for p in m.parameters())


def test_unknown_quantization_is_refused():
    with pytest.raises(LMFoundryError, match="--quantize int4: unknown; known: int8"):
        quantize(Transformer(ModelConfig.from_preset("tiny")), "int4")


def test_native_bf16_detection_can_be_pinned(monkeypatch):
    monkeypatch.setenv("LMFOUNDRY_CPU_BF16", "1")
    assert native_bf16("cpu") == (True, "LMFOUNDRY_CPU_BF16=1")
    monkeypatch.setenv("LMFOUNDRY_CPU_BF16", "0")
    assert native_bf16("cpu")[0] is False
    monkeypatch.delenv("LMFOUNDRY_CPU_BF16")
    ok, why = native_bf16("cpu")
    assert why.startswith("CPU has") and (("bf16" in why) == ok)


def test_generate_and_eval_take_quantize_and_dtype_flags(demo_dir, tmp_path, capsys):
    from lmfoundry.eval.samples import write_sample_data
    assert main(["generate", str(demo_dir), "Tom has 3 apples", "--max-new-tokens", "4", "--quantize", "int8"]) == 0
    assert main(["generate", str(demo_dir), "Tom has", "--max-new-tokens", "4", "--dtype", "bf16"]) == 0
    data = write_sample_data(tmp_path / "data")
    out = tmp_path / "r.json"
    assert main(["eval", str(demo_dir), "--tasks", "arc_easy", "--data-dir", str(data), "--limit", "4",
                 "--quantize", "int8", "--out", str(out)]) == 0
    assert 0 <= json.loads(out.read_text())["results"]["arc_easy"]["acc"] <= 1
    capsys.readouterr()
    assert main(["generate", str(demo_dir), "hi", "--dtype", "int3"]) == 1
    assert "unknown dtype 'int3'" in capsys.readouterr().err
