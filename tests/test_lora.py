"""LoRA / DoRA / QLoRA against PEFT (and bitsandbytes for NF4) on the same random checkpoints and
the same adapter weights: logits within 1e-5 and adapter gradients within 1e-4 (fp32), for Llama
(GQA, tied embeddings) and for EXAONE and OpenELM through their own Hugging Face module names.

transformers cannot build EXAONE or OpenELM without remote code, so PEFT is applied to a torch
module tree that carries their Hugging Face module names: for EXAONE the tree shares its linears
with a transformers Llama (EXAONE is Llama math under other names), so PEFT's wrapped modules run
inside transformers' forward; for OpenELM the forward is the written-out reference of
test_formats.py, calling the tree's (PEFT-wrapped) fused qkv_proj / proj_1 modules.
"""
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import hf_llama, random_tokens
from lmfoundry.checkpoint import load_model
from lmfoundry.errors import AdapterError
from lmfoundry.lora import (LoraConfig, adapter_parameters, apply_lora, disable_adapters, load_adapter, peft_tensors,
                            save_adapter)
from lmfoundry.train import NextToken
from lmfoundry.train.objectives import token_logps
from test_formats import make_exaone, make_openelm, openelm_reference
from test_train import interrupting

LOGITS_TOL, GRAD_TOL = 1e-5, 1e-4
LLAMA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                 "down": "down_proj", "lm_head": "lm_head", "embed": "embed_tokens"}
CASES = {   # transformers Llama overrides, our LoraConfig
    "gqa-all-linear": (dict(num_key_value_heads=2), LoraConfig(rank=4, alpha=8)),
    "tied-embed-rslora": (dict(tie_word_embeddings=True), LoraConfig(rank=4, alpha=3, rslora=True,
                                                                      targets=("q", "v", "down", "embed"))),
    "dora-lm-head": (dict(num_key_value_heads=1), LoraConfig(rank=2, alpha=5, dora=True,
                                                             targets=("k", "o", "up", "lm_head"))),
}


def peft_config(lc: LoraConfig, modules: dict):
    return peft.LoraConfig(r=lc.rank, lora_alpha=lc.alpha, target_modules=[modules[t] for t in lc.targets],
                           use_rslora=lc.rslora, use_dora=lc.dora, init_lora_weights=False, lora_dropout=0.0)


def loss_of(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def peft_grads(peft_model) -> dict:
    """PEFT's adapter gradients under its saved key names (adapter name removed)."""
    out = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.grad is not None:
            key = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            out[key if key.startswith("base_model.model.") else "base_model.model." + key] = p.grad
    return out


def our_grads(model) -> dict:
    return peft_tensors(model, {n: p.grad for n, p in adapter_parameters(model).items()})


def assert_grads_match(ours: dict, theirs: dict):
    assert set(ours) == set(theirs)
    for k in ours:
        assert (ours[k] - theirs[k]).abs().max() <= GRAD_TOL, k


def assert_matches_peft(ours, theirs_forward, pm, tokens):
    """Same logits (1e-5) and, after the same loss, the same adapter gradients (1e-4) as PEFT."""
    theirs_logits, ours_logits = theirs_forward(tokens), ours(tokens)
    assert (ours_logits - theirs_logits).abs().max() <= LOGITS_TOL
    loss_of(theirs_logits, tokens).backward()
    loss_of(ours_logits, tokens).backward()
    assert_grads_match(our_grads(ours), peft_grads(pm))


def perturb(model, seed=1):
    """Random adapter values (a fresh adapter is a no-op, which would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- Llama, through transformers + PEFT

@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_gives_peft_logits_and_gradients(tmp_path, case):
    kw, lc = CASES[case]
    hf_llama(**kw).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(hf_llama(**kw), peft_config(lc, LLAMA_MODULES))
    pm.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    assert_matches_peft(ours, lambda tokens: pm(tokens).logits, pm, random_tokens(2, 24))


@pytest.mark.parametrize("summed", [True, False], ids=["summed", "per-token"])
@pytest.mark.parametrize("case", CASES)
def test_the_training_losses_give_peft_loss_and_gradients(tmp_path, case, summed):
    """The losses run the output layer inside the chunked loss (token_logps), not through
    lm_head's forward: an lm_head adapter (with DoRA) must act there too."""
    kw, lc = CASES[case]
    hf_llama(**kw).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(hf_llama(**kw), peft_config(lc, LLAMA_MODULES))
    pm.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    tokens = random_tokens(2, 24)
    theirs = loss_of(pm(tokens).logits, tokens)
    theirs.backward()
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    logps = token_logps(ours, tokens, labels, summed=summed)
    loss = -(logps if summed else logps.sum()) / labels[:, :-1].numel()
    assert abs(loss.item() - theirs.item()) <= LOGITS_TOL
    loss.backward()
    assert_grads_match(our_grads(ours), peft_grads(pm))


def test_dropout_on_an_lm_head_adapter_is_refused_in_the_training_loss(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    ours = apply_lora(load_model(tmp_path), LoraConfig(rank=2, dropout=0.1, targets=("o", "lm_head")))
    tokens = random_tokens(1, 8)
    with pytest.raises(AdapterError, match="--lora-dropout 0 or leave lm_head out"):
        token_logps(ours.train(), tokens, tokens)
    ours.eval()
    token_logps(ours, tokens, tokens)       # no dropout at inference: the merged weight is exact


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, case):
    kw, lc = CASES[case]
    hf_llama(**kw).save_pretrained(tmp_path / "base")
    ours = apply_lora(load_model(tmp_path / "base"), lc)
    perturb(ours)
    save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == lc.rank and conf["use_dora"] == lc.dora
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in keys)
    pm = peft.PeftModel.from_pretrained(hf_llama(**kw), tmp_path / "adapter")
    tokens = random_tokens(2, 24)
    with torch.no_grad():
        assert (ours(tokens) - pm(tokens).logits).abs().max() <= LOGITS_TOL


def test_a_new_adapter_changes_nothing_and_disabled_adapters_give_the_base(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    base, ours = load_model(tmp_path), apply_lora(load_model(tmp_path), LoraConfig(rank=4, dora=True))
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(ours(tokens), base(tokens))     # B = 0 and DoRA's m = ||W||: exactly the base
        perturb(ours)
        assert (ours(tokens) - base(tokens)).abs().max() > 1e-3
        with disable_adapters(ours):
            assert torch.equal(ours(tokens), base(tokens))
        assert (ours(tokens) - base(tokens)).abs().max() > 1e-3
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    shared = {id(p) for n, p in ours.named_parameters() if "lora_" not in n} & {id(p) for p in base.parameters()}
    assert not shared and ours.layers[0].attn.q.weight.data_ptr() != base.layers[0].attn.q.weight.data_ptr()


def test_base_weights_are_wrapped_never_copied(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    apply_lora(model, LoraConfig(rank=4, targets=("q", "k", "v", "o", "gate", "up", "down", "lm_head", "embed")))
    after = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    assert after == before                                  # same names, same storage


# ---------------------------------------------------------------- EXAONE and OpenELM module names

def module_tree(paths: dict) -> nn.Module:
    """A torch module tree holding each given module at its dotted Hugging Face path."""
    root = nn.Module()
    for path, module in paths.items():
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(leaf, module)
    return root


EXAONE_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "gate": "c_fc_0", "up": "c_fc_1",
                  "down": "c_proj"}
EXAONE_OF_LLAMA = {"self_attn.q_proj": "attn.attention.q_proj", "self_attn.k_proj": "attn.attention.k_proj",
                   "self_attn.v_proj": "attn.attention.v_proj", "self_attn.o_proj": "attn.attention.out_proj",
                   "mlp.gate_proj": "mlp.c_fc_0", "mlp.up_proj": "mlp.c_fc_1", "mlp.down_proj": "mlp.c_proj"}


def test_exaone_adapter_matches_peft_through_its_own_module_names(tmp_path):
    ref, _ = make_exaone(tmp_path / "base")
    llama_names = {f"transformer.h.{i}.{theirs}": f"model.layers.{i}.{ours}" for i in range(2)
                   for ours, theirs in EXAONE_OF_LLAMA.items()}
    tree = module_tree({name: ref.get_submodule(llama) for name, llama in llama_names.items()})
    lc = LoraConfig(rank=4, alpha=6)
    pm = peft.get_peft_model(tree, peft_config(lc, EXAONE_MODULES))
    for name, llama in llama_names.items():     # the PEFT-wrapped modules now run inside transformers' Llama
        parent, _, leaf = llama.rpartition(".")
        setattr(ref.get_submodule(parent), leaf, tree.get_submodule(name))
    pm.save_pretrained(tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.attention.out_proj.lora_A.weight" in keys
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    assert_matches_peft(ours, lambda tokens: ref(tokens).logits, pm, random_tokens(2, 20))


OPENELM_MODULES = {"q": "qkv_proj", "k": "qkv_proj", "v": "qkv_proj", "o": "out_proj", "gate": "proj_1",
                   "up": "proj_1", "down": "proj_2"}
OPENELM_LINEARS = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")


@pytest.mark.parametrize("dora", [False, True])
def test_openelm_fused_modules_match_peft_on_qkv_proj_and_proj_1(tmp_path, dora):
    t, c = make_openelm(tmp_path / "base")
    paths = {}
    for i in range(c["num_transformer_layers"]):
        for name in OPENELM_LINEARS:
            w = t[f"transformer.layers.{i}.{name}.weight"]
            paths[f"transformer.layers.{i}.{name}"] = lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
    tree = module_tree(paths)
    lc = LoraConfig(rank=3, alpha=4, dora=dora)
    pm = peft.get_peft_model(tree, peft_config(lc, OPENELM_MODULES))
    pm.save_pretrained(tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys["base_model.model.transformer.layers.0.attn.qkv_proj.lora_B.weight"].shape[0] == \
        t["transformer.layers.0.attn.qkv_proj.weight"].shape[0]
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    assert ours.layers[0].attn.q.lora_A is ours.layers[0].attn.v.lora_A          # one A for the fused module
    linear = lambda name, x: tree.get_submodule(name.removesuffix(".weight"))(x)   # noqa: E731
    assert_matches_peft(ours, lambda tokens: openelm_reference(t, c, tokens, linear), pm, random_tokens(2, 20))
    # and back: our saved adapter has PEFT's fused keys and shapes
    save_adapter(ours, tmp_path / "ours")
    again = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(again) == set(keys) and all(torch.equal(again[k], keys[k]) for k in keys)


def test_openelm_refuses_half_of_a_fused_module(tmp_path):
    from lmfoundry.errors import AdapterError
    make_openelm(tmp_path)
    with pytest.raises(AdapterError, match="qkv_proj"):
        apply_lora(load_model(tmp_path), LoraConfig(rank=2, targets=("q", "v")))


# ---------------------------------------------------------------- QLoRA: NF4 against bitsandbytes

def nf4_codes(q) -> torch.Tensor:
    """torchao's packed codes, first element in the high nibble."""
    return torch.stack([q.quantized_data >> 4, q.quantized_data & 15], -1).reshape(-1)


def test_nf4_codes_and_values_match_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from lmfoundry.lora import to_nf4
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    q = to_nf4(w)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    bnb_codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], -1).reshape(-1)
    ours = nf4_codes(q)
    assert (ours == bnb_codes).float().mean() >= 0.999       # the same nearest code (ties of the rounded table aside)
    table = bnb_f.get_4bit_type("nf4", device="cpu")
    assert (q.nf4.float() - table).abs().max() <= 5e-5       # torchao's table is bitsandbytes' to 4 decimals
    ref = bnb_f.dequantize_4bit(packed, state)
    absmax = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64).reshape(w.shape)
    # double quantization of the absmaxes (int8 per 256) is the only other difference
    assert ((q.get_original_weight() - ref).abs() <= absmax * 0.01 + 1e-7).float().mean() >= 0.999


def qlora_pair(tmp_path, dtype=torch.float32):
    """The same LoRA model twice: once with NF4 projections, once with those weights dequantized."""
    from lmfoundry.lora import LoraConfig, dense, load_lora_model
    from lmfoundry.checkpoint import read_checkpoint
    hf_llama(hidden_size=128, intermediate_size=256, num_key_value_heads=2).save_pretrained(tmp_path)
    cfg, fmt, loaders = read_checkpoint(tmp_path)
    q = load_lora_model(cfg, loaders, LoraConfig(rank=4, qlora=True), fmt, "cpu", dtype, seed=0)
    plain = load_lora_model(cfg, loaders, LoraConfig(rank=4), fmt, "cpu", dtype, seed=0)
    with torch.no_grad():
        for name, m in q.named_modules():
            if hasattr(m, "weight") and hasattr(m.weight, "get_original_weight"):
                plain.get_submodule(name).weight.copy_(dense(m.weight))
    perturb(q), perturb(plain)
    return q, plain


def test_qlora_forward_equals_dequantize_then_lora_within_bf16_tolerance(tmp_path):
    q, plain = qlora_pair(tmp_path, torch.bfloat16)
    assert hasattr(q.layers[0].mlp.down.weight, "get_original_weight")          # stored as NF4
    assert hasattr(q.layers[1].attn.k.weight, "quantized_data")
    tokens = random_tokens(2, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = q(tokens).float(), plain(tokens).float()
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    q32, plain32 = qlora_pair(tmp_path / "fp32")
    with torch.no_grad():
        assert (q32(tokens) - plain32(tokens)).abs().max() <= 1e-5


def test_qlora_weights_take_about_half_a_byte_per_parameter(tmp_path):
    q, plain = qlora_pair(tmp_path)
    nf4 = plain_bytes = 0
    for name, m in q.named_modules():
        w = getattr(m, "weight", None)
        if w is not None and hasattr(w, "quantized_data"):
            nf4 += sum(t.numel() * t.element_size() for t in (w.quantized_data, w.quantized_scalers,
                                                              w.quantization_factor))
            plain_bytes += w.numel() * 4
    assert 0.5 / 4 <= nf4 / plain_bytes <= 0.53 / 4


# ---------------------------------------------------------------- training through the one loop

def lora_batches(n=6, B=4, T=24, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (B, T + 1), generator=g)
        ids[:, 1::2] = (ids[:, 0::2][:, :ids[:, 1::2].shape[1]] * 7) % vocab      # half the targets are learnable
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()})
    return out


def lora_run(tmp_path, name="run", steps=4, objective=None, batches=None, resume=False, lc=None, **kw):
    from lmfoundry.train import ListBatches, NextToken, TrainConfig, train
    from lmfoundry.train.trainable import LoRA
    torch.manual_seed(0)                                    # the adapters' initial values
    model = apply_lora(load_model(tmp_path / "base"), lc or LoraConfig(rank=4, dropout=0.1))
    cfg = TrainConfig(**{"steps": steps, "lr": 1e-2, "warmup": 1, "progress": False, **kw})
    result = train(model, ListBatches(batches or lora_batches()), objective or NextToken(), cfg, tmp_path / name,
                   trainable=LoRA(str(tmp_path / "base")), resume=resume)
    return model, result


def test_lora_training_leaves_the_base_bit_identical_and_optimizes_only_adapters(tmp_path):
    hf_llama(num_key_value_heads=2).save_pretrained(tmp_path / "base")
    base = load_model(tmp_path / "base").state_dict()
    model, result = lora_run(tmp_path, save_every=2)
    assert result.losses[-1] < result.losses[0]
    now = {n: p for n, p in model.state_dict().items() if "lora_" not in n}
    assert set(now) == set(base) and all(torch.equal(now[n], base[n]) for n in base)
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    adapters = load_file(str(step / "trainable.safetensors"))
    assert set(adapters) == set(adapter_parameters(model))
    moments = {k for shard in (step / "state").glob("*.safetensors") for k in load_file(str(shard))}
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in moments} == set(adapters)   # AdamW state of the adapters only
    assert all(k.startswith("optimizer.") for k in moments)
    assert not (step / "model.safetensors").exists()
    out = tmp_path / "run"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    pm = peft.PeftModel.from_pretrained(hf_llama(num_key_value_heads=2), out)
    tokens = random_tokens(2, 16)
    with torch.no_grad():
        model.eval()
        assert (model(tokens) - pm(tokens).logits).abs().max() <= LOGITS_TOL


def test_lora_resume_continues_exactly(tmp_path):
    hf_llama().save_pretrained(tmp_path / "base")
    _, whole = lora_run(tmp_path, "whole", steps=6)
    with pytest.raises(KeyboardInterrupt):        # Ctrl-C in step 5 (test_train's stand-in)
        lora_run(tmp_path, "cut", steps=6, objective=interrupting(NextToken, 4), save_every=2)
    _, resumed = lora_run(tmp_path, "cut", steps=6, resume=True, save_every=2)
    assert resumed.resumed_from == 4
    assert resumed.losses == whole.losses[4:]
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_does_not_change_lora_losses(tmp_path):
    hf_llama().save_pretrained(tmp_path / "base")
    _, plain = lora_run(tmp_path, "plain", lc=LoraConfig(rank=4, dora=True))
    _, ckpt = lora_run(tmp_path, "ckpt", lc=LoraConfig(rank=4, dora=True), activation_checkpointing=True)
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-6)


def dpo_pairs(n=4, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = {}
        for side in ("chosen", "rejected"):
            ids = torch.randint(3, 128, (B, T), generator=g)
            labels = ids.clone()
            labels[:, :4] = -100
            batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids, labels
        out.append(batch)
    return out


def test_dpo_with_lora_uses_the_base_as_reference_even_after_a_resume(tmp_path):
    from lmfoundry.train import DPO
    hf_llama().save_pretrained(tmp_path / "base")
    data = dpo_pairs()
    model, first = lora_run(tmp_path, "dpo", steps=4, objective=DPO(beta=0.5), batches=data, save_every=2)
    assert first.losses[0] == pytest.approx(0.6931471805599453, abs=1e-6)   # policy = reference at step 0
    ref_file = tmp_path / "dpo" / "checkpoints" / "dpo_reference.safetensors"
    saved = load_file(str(ref_file))
    ref_file.unlink()   # a resume must recompute it: with LoRA the reference is the base, adapters off
    _, again = lora_run(tmp_path, "dpo", steps=6, objective=DPO(beta=0.5), batches=data, resume=True)
    recomputed = load_file(str(ref_file))
    order = lambda t: {bytes(k.tolist()): v for k, v in zip(t["keys"], t["logps"])}   # noqa: E731
    a, b = order(saved), order(recomputed)
    assert b and set(b) <= set(a) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)
    assert again.resumed_from == 4 and len(again.losses) == 2


# ---------------------------------------------------------------- using adapters: merge, --adapter

def cli(capsys, *argv):
    from lmfoundry.cli import main
    capsys.readouterr()                                     # what the fixtures printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def trained(tmp_path):
    """A base checkpoint and a random (non-trivial) DoRA-free adapter of ours for it."""
    hf_llama(num_key_value_heads=2).save_pretrained(tmp_path / "base")
    model = apply_lora(load_model(tmp_path / "base"), LoraConfig(rank=4, alpha=8, rslora=True,
                                                                 targets=("q", "k", "v", "o", "gate", "up", "down",
                                                                          "lm_head", "embed")))
    perturb(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model.eval()


def test_lora_merge_equals_base_plus_adapter_and_loads_in_transformers(trained, tmp_path, capsys):
    import transformers
    base, adapter, unmerged = trained
    code, out, err = cli(capsys, "lora", "merge", base, adapter, tmp_path / "merged")
    assert code == 0, err
    merged = load_model(tmp_path / "merged")
    tokens = random_tokens(2, 20)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    peft_merged = peft.PeftModel.from_pretrained(hf_llama(num_key_value_heads=2), adapter).merge_and_unload()
    with torch.no_grad():
        want = unmerged(tokens)
        assert (merged(tokens) - want).abs().max() <= LOGITS_TOL
        assert (hf(tokens).logits - want).abs().max() <= 1e-4      # transformers' own Llama math
        for name, t in peft_merged.state_dict().items():           # and PEFT's merge_and_unload, tensor by tensor
            assert (hf.state_dict()[name] - t).abs().max() <= 1e-6, name


def test_dora_adapter_folds_to_what_it_computes(tmp_path, capsys):
    hf_llama().save_pretrained(tmp_path / "base")
    model = apply_lora(load_model(tmp_path / "base"), LoraConfig(rank=3, dora=True, targets=("q", "down")))
    perturb(model)
    save_adapter(model, tmp_path / "adapter")
    tokens = random_tokens(1, 12)
    with torch.no_grad():
        assert (load_model(tmp_path / "base", adapter=tmp_path / "adapter")(tokens) - model(tokens)).abs().max() \
            <= LOGITS_TOL


def test_generate_and_eval_take_an_adapter(tmp_path, capsys, demo_dir):
    from lmfoundry.eval import LM
    model = apply_lora(load_model(demo_dir), LoraConfig(rank=2)).eval()
    perturb(model, seed=3)
    save_adapter(model, tmp_path / "demo-adapter")
    lm = LM.load(demo_dir, adapter=tmp_path / "demo-adapter")
    tokens = random_tokens(1, 10)
    with torch.no_grad():
        assert (lm.model(tokens) - model(tokens)).abs().max() <= LOGITS_TOL
    # the CLI: generate with --adapter equals generate on the merged checkpoint
    assert cli(capsys, "lora", "merge", demo_dir, tmp_path / "demo-adapter", tmp_path / "demo-merged")[0] == 0
    args = ["hello there", "--max-new-tokens", 8]
    code, with_adapter, err = cli(capsys, "generate", demo_dir, *args, "--adapter", tmp_path / "demo-adapter")
    assert code == 0, err
    assert with_adapter == cli(capsys, "generate", tmp_path / "demo-merged", *args)[1]
    assert with_adapter != cli(capsys, "generate", demo_dir, *args)[1]


def test_merge_recipes_accept_mergekit_base_plus_adapter(trained, tmp_path, capsys):
    import yaml
    base, adapter, unmerged = trained
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": f"{base}+{adapter}", "parameters": {"weight": 0.5}},
        {"model": str(base), "parameters": {"weight": 0.5}}]}))
    code, _, err = cli(capsys, "merge", recipe, tmp_path / "out")
    assert code == 0, err
    folded = load_model(base, adapter=adapter).state_dict()
    plain = load_model(base).state_dict()
    got = load_model(tmp_path / "out").state_dict()
    assert all((got[n] - (folded[n] + plain[n]) / 2).abs().max() <= 1e-6 for n in got)
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": f"{base}+{adapter}+{adapter}"}]}))
    code, _, err = cli(capsys, "merge", recipe, tmp_path / "bad")
    assert code == 1 and "one '+'" in err and not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- bad input: one line, exit 1, nothing written

def other_model_adapter(tmp_path, **overrides):
    hf_llama(**overrides).save_pretrained(tmp_path / "other")
    model = apply_lora(load_model(tmp_path / "other"), LoraConfig(rank=2))
    save_adapter(model, tmp_path / "other-adapter")
    return tmp_path / "other-adapter"


def bad_adapter(kind, tmp_path, adapter):
    import shutil
    if kind == "shape":                                  # trained on a wider model
        return other_model_adapter(tmp_path, hidden_size=96, intermediate_size=64)
    if kind == "architecture":                           # a Llama adapter for an EXAONE checkpoint's names
        bad = tmp_path / "renamed"
        shutil.copytree(adapter, bad)
        tensors = load_file(str(bad / "adapter_model.safetensors"))
        save_file({k.replace("model.layers", "transformer.h"): v for k, v in tensors.items()},
                  str(bad / "adapter_model.safetensors"))
        return bad
    if kind == "no-config":
        bad = tmp_path / "no-config"
        shutil.copytree(adapter, bad)
        (bad / "adapter_config.json").unlink()
        return bad
    if kind == "not-lora":
        bad = tmp_path / "ia3"
        shutil.copytree(adapter, bad)
        conf = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**conf, "peft_type": "IA3"}))
        return bad
    return tmp_path / "missing"


BAD = {"shape": "needs [", "architecture": "does not exist in this LlamaForCausalLM", "no-config": "no adapter_config.json",
       "not-lora": "only LoRA adapters", "missing": "adapter directory not found"}


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_adapter_is_one_clear_error_and_nothing_is_written(trained, tmp_path, capsys, kind):
    base, adapter, _ = trained
    bad = bad_adapter(kind, tmp_path, adapter)
    code, _, err = cli(capsys, "lora", "merge", base, bad, tmp_path / "out")
    assert code == 1 and BAD[kind] in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    code, _, err = cli(capsys, "generate", base, "hi", "--adapter", bad)
    assert code == 1 and BAD[kind] in err


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
    (["--lora-rank", "4", "--lora-targets", "q,attention"], "--lora-targets must name modules from"),
    (["--qlora"], "--qlora configures LoRA adapters: give --lora-rank R too"),
    (["--lora-rank", "4", "--dora", "--lora-targets", "q,embed"], "DoRA on the embeddings is not supported"),
    (["--lora-rank", "4", "--lora-dropout", "0.1", "--lora-targets", "q,lm_head"],
     "--lora-dropout with lm_head in --lora-targets"),
])
def test_bad_lora_settings_are_one_clear_error(demo_dir, tmp_path, capsys, flags, message):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    code, _, err = cli(capsys, "sft", "--model", demo_dir, "--data", data, "--out", tmp_path / "out", *flags)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_qlora_where_torchao_cannot_run_is_one_clear_error(demo_dir, tmp_path, capsys, monkeypatch):
    import sys
    for name in [n for n in sys.modules if n.startswith("torchao")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)                  # as if it were not installed
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    code, _, err = cli(capsys, "sft", "--model", demo_dir, "--data", data, "--out", tmp_path / "out",
                       "--lora-rank", "4", "--qlora")
    assert code == 1 and "--qlora needs torchao" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
