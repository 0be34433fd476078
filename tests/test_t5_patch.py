"""patch_t5: a patched HF T5 / mT5 / UMT5 equals the unpatched (eager) one in loss, logits, every parameter
gradient, generation and attentions, computes through two_stream_attention and never builds HF's dense bias."""

import copy
import pickle

import pytest
import torch

from pyobjectives import backends
from pyobjectives import functional as F
from pyobjectives.integrations import patch_t5

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    MT5Config, MT5ForConditionalGeneration, T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Model,
    UMT5Config, UMT5ForConditionalGeneration)
from transformers.models.mt5.modeling_mt5 import MT5Attention  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402
from transformers.models.umt5.modeling_umt5 import UMT5Attention  # noqa: E402

V, B = 50, 2
KINDS = {"t5": (T5Config, T5ForConditionalGeneration), "mt5": (MT5Config, MT5ForConditionalGeneration),
         "umt5": (UMT5Config, UMT5ForConditionalGeneration)}


def tiny_config(kind="t5", **overrides):
    base = dict(vocab_size=V, d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, d_ff=48,
                relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base.update(overrides)
    return KINDS[kind][0](**base)


def make_model(cls, config, attn_implementation="eager"):
    """Random weights large enough that attention (and the bias table) matter and greedy decoding varies."""
    model = cls._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0, 1.0)
            elif "layer_norm" not in name:
                p.normal_(0, 0.2)
    return model


def rel_close(name, got, want, rtol=1e-5, min_scale=1e-30):
    """max |got - want| <= rtol * max |want| (at least ``min_scale``)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().clamp(min=min_scale)
    err = (got - want).abs().max()
    assert torch.isfinite(got).all(), f"{name}: NaN/Inf"
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol} x {scale:.3e}"


# --- backends -------------------------------------------------------------------------------------------------

class _Captured(Exception):
    pass


def _probe_reasons(name):
    """Why ``name`` cannot run T5's calls (encoder, cached causal decoder, shorter-key cross-attention, dropout):
    the registry's reasons for the exact validated inputs, then one tiny call per form; a backend that does not
    know the options yet (TypeError / NotImplementedError / BackendUnavailableError) is skipped with the error.
    Wrong numbers are not a reason: they fail the tests."""
    g = torch.Generator().manual_seed(0)
    x = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t5 = dict(t5_bias=x(8, 2), t5_num_buckets=8, t5_max_distance=12, scale=1.0, content_sees_self=False,
              empty_rows="uniform")
    calls = [
        ((x(2, 5, 2, 4), x(2, 5, 2, 4), x(2, 5, 2, 4)),
         dict(t5, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))),
        ((x(2, 1, 2, 4), x(2, 4, 2, 4), x(2, 4, 2, 4)),
         dict(t5, t5_bidirectional=False, causal=True, attn_mask=torch.zeros(2, 1, 4, dtype=torch.bool))),
        ((x(2, 5, 2, 4), x(2, 3, 2, 4), x(2, 3, 2, 4)),
         dict(scale=1.0, content_sees_self=False, empty_rows="uniform", key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))),
        ((x(2, 5, 2, 4), x(2, 5, 2, 4), x(2, 5, 2, 4)), dict(t5, dropout_p=0.1, seed=3)),
    ]
    real_resolve = F.resolve
    for args, kwargs in calls:
        captured = {}

        def capture(op, backend, inputs):
            captured.update(inputs)
            raise _Captured

        F.resolve = capture
        try:
            F.two_stream_attention(*args, **kwargs)
        except _Captured:
            pass
        finally:
            F.resolve = real_resolve
        reasons = backends.BACKENDS[name].not_supported_reasons("two_stream_attention", captured)
        if reasons:
            return reasons
        try:
            F.two_stream_attention(*args, **kwargs, backend=name)
        except (TypeError, NotImplementedError, backends.BackendUnavailableError) as exc:
            return [f"{name} does not run T5's options yet ({type(exc).__name__}: {str(exc)[:200]})"]
    return []


_REASONS = {}


@pytest.fixture
def backend(request):
    name = request.param
    if name not in _REASONS:
        _REASONS[name] = _probe_reasons(name) if name != "reference" else []
    if _REASONS[name]:
        pytest.skip(f"{name} backend unavailable for T5: " + "; ".join(_REASONS[name]))
    return name


def backend_params(*names):
    return pytest.mark.parametrize("backend", [pytest.param(n, id=n) for n in names], indirect=True)


ALL_BACKENDS = backend_params("reference", "cpu", "triton")
CPU_BACKENDS = backend_params("reference", "cpu")


# --- inputs and comparisons -----------------------------------------------------------------------------------

def seq2seq_inputs(Ls=9, Lt=6, padding=True):
    ids = torch.randint(2, V, (B, Ls))
    mask = torch.ones(B, Ls, dtype=torch.long)
    labels = torch.randint(2, V, (B, Lt))
    if padding:
        mask[1, -3:] = 0
        ids[1, -3:] = 0
        labels[1, -2:] = -100
        labels[0, 1] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def run(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    if getattr(out, "loss", None) is not None:
        logits = out.logits
        weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
        (out.loss + 1e-2 * (logits * weights).sum()).backward()
    else:
        hidden = out.last_hidden_state
        (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(hf, patched, inputs):
    want, want_grads = run(hf, inputs)
    got, got_grads = run(patched, inputs)
    if getattr(want, "loss", None) is not None:
        rel_close("loss", got.loss, want.loss)
        rel_close("logits", got.logits, want.logits)
    else:
        rel_close("last_hidden_state", got.last_hidden_state, want.last_hidden_state)
    assert got_grads.keys() == want_grads.keys()
    assert any("relative_attention_bias" in n for n in want_grads)
    model_scale = max(g.abs().max().item() for g in want_grads.values())
    for name in want_grads:
        rel_close(f"grad {name}", got_grads[name], want_grads[name], min_scale=0.01 * model_scale)


def patched_pair(kind="t5", model_cls=None, attn_implementation="eager", backend="reference", **config):
    torch.manual_seed(0)
    hf = make_model(model_cls or KINDS[kind][1], tiny_config(kind, **config))
    patched = patch_t5(copy.deepcopy(hf), backend=backend)
    if attn_implementation != "eager":
        patched.set_attn_implementation(attn_implementation)
    return hf, patched


CASES = {
    "t5-padding-labels": ("t5", dict(), dict()),
    "t5-longer-than-max_distance": ("t5", dict(), dict(Ls=23, Lt=17)),
    "t5-gated-gelu": ("t5", dict(feed_forward_proj="gated-gelu"), dict()),
    "t5-source-shorter-than-target": ("t5", dict(), dict(Ls=5, Lt=11)),
    "t5-3-layers-no-padding": ("t5", dict(num_layers=3, num_decoder_layers=3), dict(padding=False)),
    "mt5": ("mt5", dict(), dict(Ls=15)),
    "umt5": ("umt5", dict(), dict(Ls=15, Lt=13)),
}


@CPU_BACKENDS
@pytest.mark.parametrize("kind,config,shape", CASES.values(), ids=CASES.keys())
def test_patched_model_equals_hf(kind, config, shape, backend):
    hf, patched = patched_pair(kind, backend=backend, **config)
    assert_same(hf.train(), patched.train(), seq2seq_inputs(**shape))


@backend_params("triton")
def test_patched_model_equals_hf_triton(backend, one_torch_thread):
    hf, patched = patched_pair("t5", backend=backend, num_layers=1, num_decoder_layers=1)
    assert_same(hf.train(), patched.train(), seq2seq_inputs(Ls=7, Lt=4))


@pytest.mark.parametrize("kind", ["t5", "umt5"])
@CPU_BACKENDS
def test_sdpa_masks_equal_hf(kind, backend):
    """With attn_implementation="sdpa" HF hands over bool masks (an expanded padding view for the encoder and
    the cross-attention, None for an unpadded decoder): key_padding_mask + causal, no dense mask."""
    hf, patched = patched_pair(kind, attn_implementation="sdpa", backend=backend)
    assert patched.config._attn_implementation == "sdpa"
    assert_same(hf.train(), patched.train(), seq2seq_inputs())


@ALL_BACKENDS
def test_encoder_model_equals_hf(backend):
    hf, patched = patched_pair("t5", model_cls=T5EncoderModel, backend=backend)
    inputs = seq2seq_inputs(Ls=14)
    inputs.pop("labels")
    assert_same(hf.train(), patched.train(), inputs)


def test_t5model_decoder_padding_equals_hf():
    """T5Model with a decoder padding mask: a dense causal + padding mask (some rows see nothing: uniform)."""
    hf, patched = patched_pair("t5", model_cls=T5Model)
    inputs = seq2seq_inputs()
    dec_mask = torch.ones(B, 6, dtype=torch.long)
    dec_mask[0, :2] = 0  # left padding: row 0 of batch 0 sees no key
    inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  decoder_input_ids=torch.randint(2, V, (B, 6)), decoder_attention_mask=dec_mask)
    assert_same(hf.train(), patched.train(), inputs)


def generate_kwargs(inputs, **extra):
    return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=14,
                output_scores=True, return_dict_in_generate=True, **extra)


@pytest.mark.parametrize("kind", ["t5", "umt5"])
@CPU_BACKENDS
def test_greedy_generate_equals_hf(kind, backend):
    hf, patched = patched_pair(kind, backend=backend)
    hf.eval(), patched.eval()
    inputs = seq2seq_inputs(Ls=15)
    want = hf.generate(**generate_kwargs(inputs, do_sample=False))
    got = patched.generate(**generate_kwargs(inputs, do_sample=False))
    assert torch.equal(got.sequences, want.sequences)
    assert len(set(want.sequences[:, 1:].flatten().tolist())) > 1, "degenerate test: greedy decoding is constant"
    for step, (a, b) in enumerate(zip(got.scores, want.scores)):
        rel_close(f"scores[{step}]", a, b)


@backend_params("triton")
def test_greedy_generate_equals_hf_triton(backend, one_torch_thread):
    hf, patched = patched_pair("t5", backend=backend, num_layers=1, num_decoder_layers=1)
    hf.eval(), patched.eval()
    inputs = seq2seq_inputs(Ls=6)
    want = hf.generate(**generate_kwargs(inputs, do_sample=False) | dict(max_new_tokens=3))
    got = patched.generate(**generate_kwargs(inputs, do_sample=False) | dict(max_new_tokens=3))
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores)):
        rel_close(f"scores[{step}]", a, b)


@CPU_BACKENDS
def test_sampling_generate_with_a_fixed_seed(backend):
    hf, patched = patched_pair("t5", backend=backend)
    hf.eval(), patched.eval()
    inputs = seq2seq_inputs(Ls=12)
    runs = []
    for model in (hf, patched, patched):
        torch.manual_seed(1234)
        runs.append(model.generate(**generate_kwargs(inputs, do_sample=True, top_k=0)))
    want, got, again = runs
    assert torch.equal(got.sequences, again.sequences)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores)):
        rel_close(f"scores[{step}]", a, b)


class _CountingResolve:
    def __init__(self):
        self.names = []
        self.real = F.resolve

    def __call__(self, op, backend, inputs):
        name, impl = self.real(op, backend, inputs)
        self.names.append((name, inputs["t5_bias"] is not None, inputs["causal"], inputs["k"].shape[1]))
        return name, impl


@ALL_BACKENDS
def test_patched_model_calls_the_op_and_never_builds_the_bias(backend, monkeypatch):
    hf, patched = patched_pair("t5", backend=backend, num_layers=3, num_decoder_layers=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("HF's compute_bias was called on the patched path")

    for cls in (T5Attention, MT5Attention, UMT5Attention):
        monkeypatch.setattr(cls, "compute_bias", forbidden)
        monkeypatch.setattr(cls, "_relative_position_bucket", forbidden, raising=False)
    seen_bias = []
    for module in patched.modules():
        if isinstance(module, T5Attention):
            module.register_forward_pre_hook(lambda m, a, kw: seen_bias.append(kw.get("position_bias")),
                                             with_kwargs=True)
            module.register_forward_hook(lambda m, a, out: seen_bias.append(out[1]))
    counter = _CountingResolve()
    monkeypatch.setattr(F, "resolve", counter)
    inputs = seq2seq_inputs(Ls=7, Lt=5)
    patched(**inputs).loss.backward()
    assert seen_bias and all(b is None for b in seen_bias)
    # encoder: 3 self-attentions with the bidirectional bias; decoder: 2 causal self + 2 cross without bias
    assert sorted(counter.names) == sorted([(backend, True, False, 7)] * 3 + [(backend, True, True, 5)] * 2
                                           + [(backend, False, False, 7)] * 2)
    with pytest.raises(AssertionError, match="compute_bias"):
        hf(**inputs)  # the spy works


def test_patch_keeps_parameters_and_state_dict():
    torch.manual_seed(0)
    model = make_model(T5ForConditionalGeneration, tiny_config())
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    patch_t5(model)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(m is modules[n] for n, m in model.named_modules())
    assert patch_t5(model, backend="reference") is model  # patching again only changes the backend
    assert model.decoder.block[1].layer[1].EncDecAttention._pyobjectives_backend == "reference"
    assert list(model.state_dict()) == list(state)
    fresh = make_model(T5ForConditionalGeneration, tiny_config())
    patch_t5(fresh).load_state_dict(model.state_dict())
    # later layers read the first layer's table: a reload (or .to()) is seen by them
    inputs = seq2seq_inputs()
    rel_close("logits after load_state_dict", fresh(**inputs).logits, model(**inputs).logits)
    # a patched model deep-copies and pickles
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        rel_close("logits of a copy", clone(**inputs).logits, model(**inputs).logits)
        layer1 = clone.encoder.block[1].layer[0].SelfAttention
        assert layer1.__dict__["_pyobjectives_bias_owner"] is clone.encoder.block[0].layer[0].SelfAttention


def test_from_pretrained_then_patch(tmp_path):
    torch.manual_seed(0)
    model = make_model(T5ForConditionalGeneration, tiny_config())
    model.save_pretrained(tmp_path / "hf")
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    patched = patch_t5(T5ForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager"))
    assert_same(hf.train(), patched.train(), seq2seq_inputs())
    patched.save_pretrained(tmp_path / "patched")  # a patched model saves HF's checkpoint
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "patched", attn_implementation="eager")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), hf.state_dict().values()))


@CPU_BACKENDS
def test_gradient_checkpointing_equals_hf(backend):
    hf, patched = patched_pair("t5", backend=backend)
    for model in (hf, patched):  # transformers 5 renamed gradient_checkpointing_enable (a deprecated alias now)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert all(block.gradient_checkpointing for block in patched.decoder.block)
    assert_same(hf.train(), patched.train(), seq2seq_inputs())


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_output_attentions_equal_hf(kind):
    hf, patched = patched_pair(kind)
    inputs = seq2seq_inputs()
    want = hf(**inputs, output_attentions=True)
    got = patched(**inputs, output_attentions=True)
    rel_close("logits", got.logits, want.logits)
    for field in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        a, b = getattr(got, field), getattr(want, field)
        assert len(a) == len(b) == 2, field
        for layer, (x, y) in enumerate(zip(a, b)):
            rel_close(f"{field}[{layer}]", x, y)
    assert patched(**inputs).encoder_attentions is None


@CPU_BACKENDS
def test_dropout_in_train_mode_only(backend):
    hf, patched = patched_pair("t5", backend=backend, dropout_rate=0.3)
    inputs = seq2seq_inputs()
    patched.train()
    first, second = patched(**inputs), patched(**inputs)
    assert torch.isfinite(first.logits).all() and torch.isfinite(second.logits).all()
    assert not torch.equal(first.logits, second.logits)
    first.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)
    patched.eval(), hf.eval()
    rel_close("eval logits", patched(**inputs).logits, hf(**inputs).logits)
    assert torch.equal(patched(**inputs).logits, patched(**inputs).logits)


def test_attention_dropout_uses_the_op(monkeypatch):
    """Attention-probability dropout goes to the op (its own Philox RNG), only in train mode."""
    hf, patched = patched_pair("t5", dropout_rate=0.25)
    seen = []
    real = F.two_stream_attention
    monkeypatch.setattr(F, "two_stream_attention", lambda *a, **kw: seen.append(kw["dropout_p"]) or real(*a, **kw))
    inputs = seq2seq_inputs()
    patched.train()(**inputs)
    assert seen and all(p == 0.25 for p in seen)
    seen.clear()
    patched.eval()(**inputs)
    assert seen and all(p == 0.0 for p in seen)


def test_hf_masks_become_key_padding_or_dense_masks():
    from pyobjectives.integrations.t5 import _hf_mask_to_op
    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    # sdpa's padding mask: an expanded view along the queries -> key_padding_mask
    kpm, dense = _hf_mask_to_op(pad[:, None, None, :].expand(2, 1, 3, 4), 2, 3, 4)
    assert dense is None and torch.equal(kpm, ~pad)
    kpm, dense = _hf_mask_to_op(pad, 2, 3, 4)
    assert dense is None and torch.equal(kpm, ~pad)
    # eager's float mask (materialized): the exact dense form
    eager = torch.where(pad[:, None, None, :] & torch.ones(3, 4).tril(1).bool(), 0.0, torch.finfo(torch.float32).min)
    kpm, dense = _hf_mask_to_op(eager, 2, 3, 4)
    assert kpm is None and torch.equal(dense, eager[:, 0] < 0)
    assert _hf_mask_to_op(None, 2, 3, 4) == (None, None)
    with pytest.raises(ValueError, match="per-head masks are not supported"):
        _hf_mask_to_op(torch.zeros(2, 4, 3, 4), 2, 3, 4)
    with pytest.raises(ValueError, match="BlockMask"):
        _hf_mask_to_op(object(), 2, 3, 4)


# --- the tests catch a wrong bias -----------------------------------------------------------------------------

def _reversed_direction(real):
    """The op with the bidirectional bucket direction reversed (query - key instead of key - query): the same
    call on sequences reversed in time, outputs reversed back."""
    def call(q, k, v, *args, key_padding_mask=None, attn_mask=None, **kw):
        if not kw.get("t5_bidirectional", True) or kw.get("t5_bias") is None:
            return real(q, k, v, *args, key_padding_mask=key_padding_mask, attn_mask=attn_mask, **kw)
        flip = lambda t, *dims: None if t is None else t.flip(dims)  # noqa: E731
        out, g = real(flip(q, 1), flip(k, 1), flip(v, 1), *args, key_padding_mask=flip(key_padding_mask, 1),
                      attn_mask=flip(attn_mask, 1, 2), **kw)
        return out.flip(1), g
    return call


@pytest.mark.parametrize("mutation", ["encoder-direction", "decoder-bidirectional", "cross-with-bias"])
def test_a_wrong_bias_fails_the_checks(mutation, monkeypatch):
    hf, patched = patched_pair("t5")
    real = F.two_stream_attention
    if mutation == "encoder-direction":
        monkeypatch.setattr(F, "two_stream_attention", _reversed_direction(real))
    elif mutation == "decoder-bidirectional":
        monkeypatch.setattr(F, "two_stream_attention",
                            lambda *a, **kw: real(*a, **{**kw, "t5_bidirectional": True}))
    else:
        table = patched.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        monkeypatch.setattr(F, "two_stream_attention", lambda q, k, v, **kw: real(q, k, v, **(
            kw if kw.get("t5_bias") is not None or q.shape[1] > k.shape[1] else
            {**kw, "t5_bias": table, "t5_num_buckets": 8, "t5_max_distance": 12})))
    with pytest.raises(AssertionError, match="max error"):
        assert_same(hf.train(), patched.train(), seq2seq_inputs(Ls=9, Lt=9))


# --- refusals -------------------------------------------------------------------------------------------------

def test_refuses_what_it_does_not_support():
    with pytest.raises(ValueError, match="expects a transformers T5 / mT5 / UMT5 model"):
        patch_t5(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="expects a transformers T5"):
        patch_t5("t5")
    from transformers import LongT5Config, LongT5Model
    longt5 = LongT5Model(LongT5Config(vocab_size=V, d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=16))
    with pytest.raises(ValueError, match="unsupported T5 variant.*LongT5"):
        patch_t5(longt5)

    class MyAttention(T5Attention):
        pass

    model = make_model(T5EncoderModel, tiny_config())
    attn = model.encoder.block[1].layer[0].SelfAttention
    attn.__class__ = MyAttention
    with pytest.raises(ValueError, match="unsupported T5 variant.*MyAttention"):
        patch_t5(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_t5(make_model(T5EncoderModel, tiny_config()), backend="tpu")


def test_refuses_static_caches_and_dense_bias():
    hf, patched = patched_pair("t5")
    inputs = seq2seq_inputs()
    with pytest.raises(ValueError, match="static / sliding-window caches are not supported"):
        patched.generate(input_ids=inputs["input_ids"], max_new_tokens=3, cache_implementation="static")
    attn = patched.encoder.block[0].layer[0].SelfAttention
    with pytest.raises(ValueError, match="layer_head_mask is not supported"):
        attn(torch.randn(B, 4, 32), layer_head_mask=torch.ones(4))
    with pytest.raises(ValueError, match="dense position_bias"):
        attn(torch.randn(B, 4, 32), position_bias=torch.zeros(1, 4, 4, 4))
    attn.config._attn_implementation_internal = "flex_attention"  # its masks are BlockMasks
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported"):
        attn(torch.randn(B, 4, 32))
