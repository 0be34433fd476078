"""HF's weight initialisation reaches patched XLNet attention layers exactly as it reaches its own.

HF's ``_init_weights`` recognises attention layers by ``isinstance(module, XLNetRelativeAttention)``;
it runs from ``post_init``, ``init_weights`` and, in ``from_pretrained``, for keys missing from the
checkpoint. Each case is run on an unpatched and a patched model from the same seed: the parameters
must be equal, and the attention parameters must actually have been redrawn (so that an
initialisation that skipped them could not pass).
"""

import pickle

import pytest
import torch

from pyobjectives.integrations import patch_xlnet
from pyobjectives.nn import TwoStreamRelativeAttention

transformers = pytest.importorskip("transformers", reason="the HF tests need transformers")
from transformers import XLNetConfig, XLNetLMHeadModel  # noqa: E402
from transformers.models.xlnet.modeling_xlnet import XLNetRelativeAttention  # noqa: E402

ATTN_PARAMS = ("q", "k", "v", "o", "r", "r_r_bias", "r_s_bias", "r_w_bias", "seg_embed")


def config():
    return XLNetConfig(vocab_size=41, n_layer=2, d_model=16, n_head=2, d_inner=32, dropout=0.0,
                       initializer_range=0.05)


class PatchedAtConstruction(XLNetLMHeadModel):
    """How HF's own test suite meets a drop-in: the model patched right after it is built."""

    def __init__(self, cfg):
        super().__init__(cfg)
        patch_xlnet(self, backend="reference")


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


def attention(model, layer):
    return model.transformer.layer[layer].rel_attn


def test_patched_layer_is_an_hf_attention_layer():
    model = patch_xlnet(XLNetLMHeadModel(config()))
    layer = attention(model, 0)
    assert isinstance(layer, TwoStreamRelativeAttention) and isinstance(layer, XLNetRelativeAttention)
    assert type(layer).forward is TwoStreamRelativeAttention.forward
    with pytest.raises(ValueError, match="no transformers XLNetRelativeAttention"):
        patch_xlnet(model)  # already patched: nothing left to replace
    clone = pickle.loads(pickle.dumps(model))
    assert type(attention(clone, 0)) is type(layer)


def test_construction_initialises_as_hf():
    torch.manual_seed(0)
    hf = XLNetLMHeadModel(config())
    torch.manual_seed(0)
    patched = PatchedAtConstruction(config())
    assert isinstance(attention(patched, 0), TwoStreamRelativeAttention)
    assert_same_parameters(hf, patched)


@pytest.mark.parametrize("how", ["init_weights", "_init_weights"])
def test_reinitialisation_reaches_patched_layers(how):
    torch.manual_seed(0)
    hf = XLNetLMHeadModel(config())
    patched = patch_xlnet(XLNetLMHeadModel(config()), backend="reference")
    patched.load_state_dict(hf.state_dict())
    before = attention(hf, 1).q.detach().clone()
    for model in (hf, patched):
        torch.manual_seed(1)
        if how == "init_weights":
            for module in model.modules():  # HF marks initialised modules; clear the mark to redo them all
                module._is_hf_initialized = False
            model.init_weights()
        else:
            model._init_weights(attention(model, 1))
    assert not torch.equal(attention(hf, 1).q, before), "the unpatched reference was not re-initialised"
    assert_same_parameters(hf, patched)


def test_from_pretrained_initialises_missing_attention_keys(tmp_path):
    torch.manual_seed(0)
    source = XLNetLMHeadModel(config())
    missing = [f"transformer.layer.0.rel_attn.{p}" for p in ATTN_PARAMS]
    state = {k: v for k, v in source.state_dict().items() if k not in missing}
    source.save_pretrained(tmp_path, state_dict=state)
    torch.manual_seed(3)
    hf = XLNetLMHeadModel.from_pretrained(tmp_path)
    torch.manual_seed(3)
    patched = PatchedAtConstruction.from_pretrained(tmp_path)
    assert isinstance(attention(patched, 0), TwoStreamRelativeAttention)
    assert_same_parameters(hf, patched)
    std = torch.cat([getattr(attention(patched, 0), p).detach().flatten() for p in ATTN_PARAMS]).std().item()
    assert abs(std - 0.05) < 0.01, f"missing keys not drawn from normal(0, initializer_range): std {std}"
    torch.testing.assert_close(attention(patched, 1).q, attention(source, 1).q, rtol=0, atol=0)


def test_t5_reinitialisation_reaches_patched_layers():
    """patch_t5 swaps each attention module's class for a subclass of HF's: HF's init still applies."""
    from test_t5_patch import tiny_config
    from transformers import T5ForConditionalGeneration

    from pyobjectives.integrations import patch_t5

    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(tiny_config())
    patched = patch_t5(T5ForConditionalGeneration(tiny_config()), backend="reference")
    patched.load_state_dict(hf.state_dict())
    before = hf.encoder.block[0].layer[0].SelfAttention.q.weight.detach().clone()
    for model in (hf, patched):
        torch.manual_seed(1)
        for module in model.modules():
            module._is_hf_initialized = False
        model.init_weights()
    assert not torch.equal(hf.encoder.block[0].layer[0].SelfAttention.q.weight, before)
    assert_same_parameters(hf, patched)
