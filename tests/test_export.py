"""What torch.export and torch.compile need from a drop-in: every backend's kernels are opaque registered
ops (opcheck: schema, fake kernel, autograd registration, AOT dispatch), and a patched HF XLNet exports
(``torch.export.export(strict=False)``) with plain and generation-style inputs (``perm_mask`` + one-hot
``target_mapping``) on every backend, giving HF's own outputs.

The Triton ops run on the CPU interpreter here: tiny sizes only.
"""

import pytest
import torch
from attention_inputs import make_inputs
from conftest import backend_reasons
from test_native import attention_args, float_leaves, lce_op_args, rtd_op_args

from pyobjectives.integrations import patch_xlnet

transformers = pytest.importorskip("transformers", reason="the HF tests need transformers")
from transformers import XLNetConfig, XLNetLMHeadModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reasons(backend, op="two_stream_attention"):
    return [] if backend == "reference" else backend_reasons(backend, op)


def backend_params(names=("reference", "cpu", "triton")):
    return [pytest.param(n, id=n, marks=pytest.mark.skipif(bool(_reasons(n)), reason="; ".join(_reasons(n))))
            for n in names]


needs_triton = pytest.mark.skipif(bool(_reasons("triton", "rtd_loss")),
                                  reason="; ".join(_reasons("triton", "rtd_loss")))


def triton_ops():
    import pyobjectives.kernels.linear_cross_entropy  # noqa: F401  (the modules register the ops)
    import pyobjectives.kernels.rtd_loss  # noqa: F401
    import pyobjectives.kernels.two_stream_attention  # noqa: F401
    return torch.ops.pyobjectives_triton


# --- the Triton backend's ops ----------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("features,dropout_p", [
    pytest.param(("query", "rank", "padding", "seg_ids", "t5"), 0.0, id="query-rank-seg-t5"),
    pytest.param(("dense", "causal"), 0.2, id="content-only-dense-causal-dropout"),
])
def test_opcheck_triton_attention(features, dropout_p):
    x, kw = make_inputs(B=1, Lq=5, M=2, H=1, D=4, P=2, features=features)
    x, kw = float_leaves(x, kw)
    torch.library.opcheck(triton_ops().two_stream_attention_fwd, attention_args(x, kw, dropout_p=dropout_p, seed=5))


@needs_triton
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("head", [False, True], ids=["logits", "head"])
def test_opcheck_triton_rtd(head, reduction):
    lead, D = (2, 3), 5
    x, w, b, corr, orig, mask = rtd_op_args(lead, D, head)
    ops = triton_ops()
    torch.library.opcheck(ops.rtd_loss_fwd, (x, w, b, corr, orig, mask, 2.0, reduction, True, head, head))
    if head:
        torch.library.opcheck(ops.rtd_loss_head_bwd, (torch.randn(6), torch.randn(6), torch.randn(D),
                                                      torch.randn(*lead, D), D, torch.float32, True))


@needs_triton
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_opcheck_triton_linear_cross_entropy(reduction):
    h, w, b, t = lce_op_args(5, 4, 11, ignore_every=3)
    ops = triton_ops()
    torch.library.opcheck(ops.linear_cross_entropy_fwd, (h, w, b, t, -100, reduction, True, 0.7, torch.tensor(3), None, True))
    with torch.no_grad():
        loss, _, _, order, n_keep, lse, denom = ops.linear_cross_entropy_fwd(h, w, b, t, -100, reduction, False, 1.0,
                                                                             None, None, False)
    torch.library.opcheck(ops.linear_cross_entropy_bwd, (torch.randn(loss.shape), h.detach(), w.detach(), b.detach(),
                                                         t, order, n_keep, lse, denom, reduction, True, True, True))


# --- a patched HF XLNet under torch.export -----------------------------------------------------

V, L, B = 37, 7, 2


def tiny_xlnet():
    cfg = XLNetConfig(vocab_size=V, n_layer=2, d_model=16, n_head=2, d_inner=32, dropout=0.0)
    return XLNetLMHeadModel(cfg).eval()


def generation_inputs(P=1):
    """What HF's XLNet generation feeds the model: predict the last P positions, hidden from everyone."""
    ids = torch.randint(0, V, (B, L))
    perm = torch.zeros(B, L, L)
    perm[:, :, L - P:] = 1
    mapping = torch.zeros(B, P, L)
    mapping[:, torch.arange(P), torch.arange(L - P, L)] = 1
    return ids, perm, mapping


class Generation(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, perm_mask, target_mapping):
        return self.model(ids, perm_mask=perm_mask, target_mapping=target_mapping, use_cache=False).logits


class Plain(Generation):
    def forward(self, ids):
        return self.model(ids, use_cache=False).logits


def _ops_in(exported):
    return {str(n.target).split(".")[0] for n in exported.graph.nodes if "pyobjectives" in str(n.target)}


EXPECTED_OPS = {"reference": set(), "cpu": {"pyobjectives"}, "triton": {"pyobjectives_triton"}}


@pytest.mark.parametrize("backend", backend_params())
def test_export_patched_xlnet_forward(backend):
    hf = tiny_xlnet()
    ids = torch.randint(0, V, (B, L))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
    model = Plain(patch_xlnet(hf, backend=backend))
    exported = torch.export.export(model, (ids,), strict=False)
    assert _ops_in(exported) == EXPECTED_OPS[backend]
    fresh = torch.randint(0, V, (B, L))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exported.module()(fresh), model(fresh), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_export_patched_xlnet_generation(backend):
    """The exported graph reads no values of target_mapping: it is HF's general path, so it also gives
    HF's answer for a mapping that is not one-hot, with which it was never traced."""
    hf = tiny_xlnet()
    unpatched = tiny_xlnet()
    unpatched.load_state_dict(hf.state_dict())
    ids, perm, mapping = generation_inputs(P=2)
    model = Generation(patch_xlnet(hf, backend=backend))
    exported = torch.export.export(model, (ids, perm, mapping), strict=False)
    assert _ops_in(exported) == EXPECTED_OPS[backend]
    run = exported.module()
    soft = torch.softmax(torch.randn(B, 2, L), -1)  # every position weighted: not a partial permutation
    with torch.no_grad():
        for m in (mapping, soft):
            want = unpatched(ids, perm_mask=perm, target_mapping=m, use_cache=False).logits
            torch.testing.assert_close(run(ids, perm, m), want, rtol=1e-5, atol=1e-5)
        # eager takes the one-hot fast path (P query rows), the exported graph the scatter path: same result
        torch.testing.assert_close(run(ids, perm, mapping), model(ids, perm, mapping), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(("reference", "cpu")))
def test_export_patched_t5(backend):
    from test_t5_patch import make_model, seq2seq_inputs, tiny_config
    from transformers import T5ForConditionalGeneration

    from pyobjectives.integrations import patch_t5

    hf = make_model(T5ForConditionalGeneration, tiny_config())
    inputs = seq2seq_inputs()
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    with torch.no_grad():
        want = hf(**inputs).logits

    class Seq2Seq(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, mask, labels):
            return self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).logits

    exported = torch.export.export(Seq2Seq(patch_t5(hf, backend=backend).eval()), args, strict=False)
    assert _ops_in(exported) == EXPECTED_OPS[backend]
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*args), want, rtol=1e-5, atol=1e-5)
