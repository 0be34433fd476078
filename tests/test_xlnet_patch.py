"""patch_xlnet: a patched HF XLNet equals the unpatched one in logits, mems and every parameter gradient."""

import copy

import pytest
import torch

from pyobjectives import backends
from pyobjectives import nn as pnn
from pyobjectives.integrations import patch_xlnet

transformers = pytest.importorskip("transformers")
from transformers import XLNetConfig, XLNetLMHeadModel  # noqa: E402

B, L, V = 2, 10, 40
# Compiled Triton kernels need CUDA tensors; under TRITON_INTERPRET=1 everything stays on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and not backends.triton_interpreter_enabled() else "cpu"


def tiny_config(**overrides):
    base = dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_inner=48, dropout=0.0, mem_len=6,
                initializer_range=0.2)
    base.update(overrides)
    return XLNetConfig(**base)


def rel_close(name, got, want, rtol=1e-5, min_scale=1e-30):
    """max |got - want| <= rtol * scale, scale = max |want| (at least ``min_scale``, for tensors that are
    exactly 0 in HF, e.g. a layer whose rows each see a single key)."""
    scale = want.abs().max().clamp(min=min_scale)
    err = (got - want).abs().max()
    assert torch.isfinite(got).all(), f"{name}: NaN/Inf"
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol} x {scale:.3e}"


def perm_inputs(one_hot=True, P=4):
    perm_mask = (torch.rand(B, L, L) < 0.5).float()
    perm_mask[0, 3, :] = 1.0  # a query row that sees nothing (HF: uniform attention)
    target_mapping = torch.zeros(B, P, L)
    for b in range(B):
        positions = torch.randperm(L)[:P]
        if b == 0 and 3 not in positions:
            positions[0] = 3  # predict the fully masked row
        target_mapping[b, torch.arange(P), positions] = 1.0
    if one_hot:
        target_mapping[1, -1] = 0.0  # an empty prediction row
    else:
        target_mapping[1, 0, 5] = 0.5  # not a permutation: applied as HF does, over all L rows
    return dict(perm_mask=perm_mask, target_mapping=target_mapping)


CASES = {
    "plain": (dict(), dict()),
    "uni-same_length": (dict(attn_type="uni", same_length=True), dict()),
    "bi_data-clamp": (dict(bi_data=True, clamp_len=3), dict()),
    "token_types": (dict(), dict(token_type_ids=True)),
    "padding": (dict(), dict(attention_mask=True)),
    "perm-onehot": (dict(), dict(perm=True)),
    "perm-general": (dict(), dict(perm="general")),
    "mems-segments-perm": (dict(), dict(mems=True, token_type_ids=True, perm=True, attention_mask=True)),
    "uni-mems": (dict(attn_type="uni"), dict(mems=True)),
}


def build_inputs(spec):
    ids = torch.randint(0, V, (B, L))
    kwargs = dict(input_ids=ids)
    if spec.get("token_type_ids"):
        kwargs["token_type_ids"] = torch.cat([torch.zeros(B, L // 2), torch.ones(B, L - L // 2)], 1).long()
        kwargs["token_type_ids"][:, -1] = 2
    if spec.get("attention_mask"):
        mask = torch.ones(B, L)
        mask[1, -3:] = 0
        kwargs["attention_mask"] = mask
    if spec.get("perm"):
        kwargs.update(perm_inputs(one_hot=spec["perm"] is True))
    return kwargs


def run(model, kwargs, with_mems):
    model.zero_grad()
    mems = None
    if with_mems:
        first = model(input_ids=torch.randint(0, V, (B, L)).to(DEVICE), use_mems=True)
        mems = [m.detach() for m in first.mems]
    out = model(**kwargs, mems=mems, use_mems=True)
    weights = torch.linspace(-1, 1, out.logits.numel(), device=out.logits.device).view_as(out.logits)
    (out.logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def backend_param(name):
    reasons = backends.BACKENDS[name].op_reasons("two_stream_attention")
    return pytest.param(name, id=name, marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons)))


@pytest.mark.parametrize("backend", [backend_param("reference"), backend_param("triton"), backend_param("cpu")])
@pytest.mark.parametrize("config_kw,spec", CASES.values(), ids=CASES.keys())
def test_patched_model_equals_hf(config_kw, spec, backend):
    torch.manual_seed(0)
    hf = XLNetLMHeadModel(tiny_config(**config_kw)).to(DEVICE).train()
    patched = patch_xlnet(copy.deepcopy(hf), backend=backend)
    assert all(isinstance(layer.rel_attn, pnn.TwoStreamRelativeAttention) for layer in patched.transformer.layer)
    kwargs = {n: t.to(DEVICE) for n, t in build_inputs(spec).items()}
    rng = torch.get_rng_state()
    want, want_grads = run(hf, kwargs, spec.get("mems", False))
    torch.set_rng_state(rng)
    got, got_grads = run(patched, kwargs, spec.get("mems", False))
    rel_close("logits", got.logits, want.logits)
    for i, (a, b) in enumerate(zip(got.mems, want.mems)):
        rel_close(f"mems[{i}]", a, b)
    assert got_grads.keys() == want_grads.keys()
    model_scale = max(g.abs().max().item() for g in want_grads.values())
    for name in want_grads:
        rel_close(f"grad {name}", got_grads[name], want_grads[name], min_scale=0.01 * model_scale)


def test_output_attentions_equal_hf():
    torch.manual_seed(1)
    hf = XLNetLMHeadModel(tiny_config()).eval()
    patched = patch_xlnet(copy.deepcopy(hf))
    kwargs = build_inputs(dict(perm=True, token_type_ids=True))
    want = hf(**kwargs, output_attentions=True)
    got = patched(**kwargs, output_attentions=True)
    rel_close("logits", got.logits, want.logits)
    for layer_got, layer_want in zip(got.attentions, want.attentions):
        for a, b in zip(layer_got, layer_want):
            rel_close("attentions", a, b)


def test_state_dict_and_parameters_are_shared():
    hf = XLNetLMHeadModel(tiny_config())
    before = {n: p for n, p in hf.named_parameters()}
    keys = list(hf.state_dict())
    patch_xlnet(hf)
    assert list(hf.state_dict()) == keys
    assert all(p is before[n] for n, p in hf.named_parameters())
    fresh = XLNetLMHeadModel(tiny_config())
    patch_xlnet(fresh).load_state_dict(hf.state_dict())


def test_patch_requires_xlnet_layers_and_valid_options():
    with pytest.raises(ValueError, match="no transformers XLNetRelativeAttention"):
        patch_xlnet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_xlnet(XLNetLMHeadModel(tiny_config()), backend="tpu")
    with pytest.raises(ValueError, match="empty_rows must be one of"):
        pnn.TwoStreamRelativeAttention(32, 4, empty_rows="nan")


def test_standalone_module_matches_hf_layer():
    """nn.TwoStreamRelativeAttention built from scratch, loaded with an HF layer's state dict, equals it."""
    from transformers.models.xlnet.modeling_xlnet import XLNetRelativeAttention
    cfg = tiny_config()
    hf = XLNetRelativeAttention(cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = pnn.TwoStreamRelativeAttention(cfg.d_model, cfg.n_head, layer_norm_eps=cfg.layer_norm_eps).eval()
    ours.load_state_dict(hf.state_dict())
    h, g = torch.randn(L, B, cfg.d_model), torch.randn(L, B, cfg.d_model)
    r = torch.randn(2 * L, 1, cfg.d_model).expand(-1, B, -1)
    want = hf(h, g, None, None, r, None)
    got = ours(h, g, None, None, r, None)
    rel_close("h", got[0], want[0])
    rel_close("g", got[1], want[1])
