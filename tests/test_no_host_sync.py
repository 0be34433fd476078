"""No host synchronisation on the hot path, and kernels safe for values no check looked at.

On a GPU, reading a device tensor on the host (``.item()``, ``bool(t)``, ``.tolist()``, a boolean-mask
gather, ...) waits for the device queue: a sync per layer per step. Value-range checks therefore read
only tensors whose data is host memory, or every tensor in debug mode (``PYOBJECTIVES_DEBUG=1``); the
decision is ``pyobjectives._checks.reads_are_free``. Without a GPU, the tests below make that decision
answer as it does for CUDA tensors and then count host reads with two spies:

* Python: ``Tensor.item / tolist / cpu / numpy / __bool__ / __int__ / __float__ / __index__`` and
  ``torch.tensor(..., device=...)`` (a host-to-device copy, synchronous for pageable memory);
* aten, through a ``TorchDispatchMode``: ``_local_scalar_dense`` and the ops whose output size depends on
  values (``nonzero``, boolean indexing, ``masked_select``, ``repeat_interleave`` without ``output_size``,
  ``unique``, ``equal``, ``is_nonzero``), which sync inside C++ where no Python spy sees them.

A read counts against pyobjectives when the first frame outside torch that made it is pyobjectives code
(``pyobjectives/`` or ``kernels/``); reads made by transformers or by Triton's CPU interpreter are not ours.
"""

import contextlib
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyobjectives as po
from attention_inputs import make_inputs
from conftest import fused_backend_params
from pyobjectives import _checks
from pyobjectives import nn as pnn
from pyobjectives.electra import ElectraObjective

OURS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
             for m in (po, __import__("pyobjectives.kernels", fromlist=["_"])))
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
HERE = os.path.abspath(__file__)
BACKEND_PARAMS = [pytest.param("reference", id="reference")] + fused_backend_params()
#: ``draw_seed`` reads torch's CPU generator, and ``seed_value`` the ops' seed, a CPU tensor by contract:
#: host tensors whatever device the inputs are on.
HOST_BY_CONSTRUCTION = {("philox.py", "draw_seed"), ("philox.py", "seed_value")}

_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
             "aten.unique_consecutive", "aten.equal", "aten.is_nonzero", "aten.allclose"}


def _site():
    """The first frame outside torch, this file and contextlib: who asked for the read."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(TORCH) or path == HERE or "contextlib" in path):
            return path, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back
    return "?", 0, "?"


class HostReads(TorchDispatchMode):
    """Records (what, file, line, function) for every host read made by pyobjectives code."""

    def __init__(self):
        super().__init__()
        self.ours, self.others = [], []

    def record(self, what):
        path, line, func = _site()
        if (os.path.basename(path), func) in HOST_BY_CONSTRUCTION:
            return
        (self.ours if path.startswith(OURS) else self.others).append(
            (what, f"{os.path.relpath(path)}:{line}", func))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        unsized = name == "aten.repeat_interleave" and func._overloadname.startswith("Tensor") and \
            kwargs.get("output_size", args[2] if len(args) > 2 else None) is None
        if name in _SYNC_OPS or bool_index or unsized:
            self.record(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_reads(monkeypatch):
    spy = HostReads()

    def wrap(owner, attr):
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            if attr in ("tensor", "as_tensor") and kwargs.get("device") is None:
                return original(*args, **kwargs)
            spy.record(f"{getattr(owner, '__name__', owner)}.{attr}")
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, attr, counted)

    for attr in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        wrap(torch.Tensor, attr)
    wrap(torch, "tensor")
    wrap(torch, "as_tensor")
    with spy:
        yield spy
    monkeypatch.undo()


@pytest.fixture
def as_on_cuda(monkeypatch):
    """Value checks decide as for CUDA tensors outside debug mode."""
    monkeypatch.delenv(_checks.DEBUG_ENV, raising=False)
    monkeypatch.setattr(_checks, "reads_are_free", lambda t: False)


# --- inputs of each op ------------------------------------------------------------------------

def attention_call(backend):
    x, kw = make_inputs(B=2, Lq=6, M=2, H=2, D=8, P=3, dtype=torch.float32,
                        features=("query", "rank", "padding", "seg_ids", "t5"))
    kw.update(dropout_p=0.1, seed=11, empty_rows="uniform")
    leaves = [t.requires_grad_() for t in (x["q"], x["k"], x["v"], x["r"], kw["q_g"])]

    def run():
        out_h, out_g = po.two_stream_attention(**x, **kw, backend=backend)
        (out_h.sum() + out_g.sum()).backward()
        return leaves
    return run


def rtd_call(backend):
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    corrupted, original = torch.randint(0, 9, (2, 7)), torch.randint(0, 9, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0

    def run():
        loss, stats = po.rtd_loss(hidden, corrupted, original, mask, head_weight=weight, head_bias=torch.tensor(0.3),
                                  return_stats=True, backend=backend)
        loss.backward()
        return [hidden, weight]
    return run


def lce_call(backend):
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    targets[2] = -100

    def run():
        loss, sampled = po.linear_cross_entropy(hidden, weight, targets, bias, sample=True, seed=5,
                                                disallow=targets.clamp(min=0), backend=backend)
        loss.backward()
        return [hidden, weight, bias]
    return run


OPS = {"two_stream_attention": attention_call, "rtd_loss": rtd_call, "linear_cross_entropy": lce_call}


def _known_triton_sync(read):
    """kernels/two_stream_attention.py ``_query_chunks``: the grid size is the number of query chunks,
    counted on the device (one documented sync per call with a query stream, cached per target_pos)."""
    return read[2] == "_query_chunks" and read[0] == "aten.repeat_interleave"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("op", OPS)
def test_ops_forward_and_backward_read_nothing_on_the_host(op, backend, as_on_cuda, monkeypatch, one_torch_thread):
    run = OPS[op](backend)
    with host_reads(monkeypatch) as reads:
        leaves = run()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    ours = [r for r in reads.ours if not (backend == "triton" and _known_triton_sync(r))]
    # (The Triton ops are registered torch ops: a dispatch mode sees the op itself, not the aten calls inside
    # its kernel, so the documented _query_chunks sync is not always visible here; Python-level reads are.)
    assert ours == [], f"host reads on the {backend} hot path: {ours}"


@pytest.mark.parametrize("op", OPS)
def test_the_spy_sees_value_checks(op, monkeypatch):
    """The same calls with value checks on (debug mode on CUDA): the spy must see them, else the test above
    proves nothing."""
    monkeypatch.setattr(_checks, "reads_are_free", lambda t: False)
    monkeypatch.setenv(_checks.DEBUG_ENV, "1")
    if op == "rtd_loss":  # no value check: its ids are only compared, any value is valid
        pytest.skip("rtd_loss has no value-range check")
    run = OPS[op]("reference")
    with host_reads(monkeypatch) as reads:
        run()
    assert any(what == "Tensor.__bool__" and "_checks.py" in where for what, where, _ in reads.ours), reads.ours


# --- modules --------------------------------------------------------------------------------------

def tiny_electra(backend, masking="electra"):
    emb = torch.nn.Embedding(29, 6)

    class Body(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.emb, self.proj = emb, torch.nn.Linear(6, width)

        def forward(self, input_ids, attention_mask=None):
            return torch.tanh(self.proj(self.emb(input_ids)))

    return ElectraObjective(Body(6), Body(8), mask_token_id=3, special_token_ids=[0, 1], gen_output_weight=emb.weight,
                            disc_output=torch.nn.Linear(8, 1), backend=backend, masking=masking)


def _counts_targets(read):
    """With Bernoulli (bert) masking, eager ElectraObjective reads the number of targets to run the generator
    on those rows only (the shape-known bound would be every token); electra masking never does."""
    path, line = read[1].rsplit(":", 1)
    source = open(path).read().splitlines()[int(line) - 1]
    return read[2] == "_target_rows" and "flat.sum()" in source


@pytest.mark.parametrize("masking", ["electra", "bert"])
@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.id != "triton"])
def test_electra_objective_reads_nothing(backend, masking, as_on_cuda, monkeypatch):
    obj = tiny_electra(backend, masking)
    ids = torch.randint(4, 29, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 7:] = 0
    with host_reads(monkeypatch) as reads:
        out = obj(ids, mask, seed=4, rng=torch.Generator().manual_seed(2))
        out.loss.backward()
    assert torch.isfinite(out.loss)
    counts = [r for r in reads.ours if _counts_targets(r)]
    rest = [r for r in reads.ours if not _counts_targets(r)]
    assert rest == [], f"host reads in ElectraObjective: {rest}"
    # one read, seen both as Tensor.__int__ and as the aten call behind it
    assert [r[0] for r in counts] == (["Tensor.__int__", "aten._local_scalar_dense"] if masking == "bert" else [])


def _xlnet(dropout):
    transformers = pytest.importorskip("transformers")
    config = transformers.XLNetConfig(vocab_size=23, d_model=16, n_layer=2, n_head=2, d_inner=24, dropout=dropout,
                                      mem_len=4)
    return transformers.XLNetLMHeadModel(config)


def _xlnet_inputs(target_mapping):
    B, L, P = 2, 8, 3
    kw = dict(input_ids=torch.randint(0, 23, (B, L)), token_type_ids=(torch.arange(L) >= 5).long().expand(B, L),
              attention_mask=torch.ones(B, L), perm_mask=(torch.rand(B, L, L) < 0.4).float())
    kw["attention_mask"][1, -2:] = 0
    if target_mapping:
        tm = torch.zeros(B, P, L)
        for b in range(B):
            tm[b, torch.arange(P), torch.randperm(L)[:P]] = 1.0
        kw["target_mapping"] = tm
    return kw


XLNET_CASES = [
    pytest.param(False, 0.0, id="content-stream-eval"),
    pytest.param(False, 0.1, id="content-stream-dropout"),
    # on an accelerator (values not checkable) the layer takes HF's scatter path instead of reading
    # target_mapping to find its one-hot rows
    pytest.param(True, 0.1, id="two-stream-target_mapping"),
]


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.id != "triton"])
@pytest.mark.parametrize("target_mapping,dropout", XLNET_CASES)
def test_patched_xlnet_reads_nothing_on_the_host(target_mapping, dropout, backend, as_on_cuda, monkeypatch):
    model = po.integrations.patch_xlnet(_xlnet(dropout), backend=backend).train()
    assert all(isinstance(layer.rel_attn, pnn.TwoStreamRelativeAttention) for layer in model.transformer.layer)
    kw = _xlnet_inputs(target_mapping)
    with host_reads(monkeypatch) as reads:
        out = model(**kw)
        out.logits.sum().backward()
    assert torch.isfinite(out.logits).all()
    assert reads.ours == [], f"host reads in the patched XLNet forward/backward: {reads.ours}"


# --- debug mode -------------------------------------------------------------------------------------

def test_debug_mode_turns_accelerator_value_checks_on(monkeypatch):
    x, kw = make_inputs(B=1, Lq=4, P=2, dtype=torch.float32, features=("query",))
    kw["target_pos"] = torch.tensor([[1, 4]])
    monkeypatch.setattr(_checks, "reads_are_free", lambda t: False)
    monkeypatch.delenv(_checks.DEBUG_ENV, raising=False)
    out_h, out_g = po.two_stream_attention(**x, **kw, backend="reference")  # unchecked: row 1 is padding
    assert torch.equal(out_g[0, 1], torch.zeros_like(out_g[0, 1]))
    monkeypatch.setenv(_checks.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match=r"target_pos must be in \[0, 4\) or -1 .*got 4"):
        po.two_stream_attention(**x, **kw, backend="reference")
    monkeypatch.setenv(_checks.DEBUG_ENV, "0")
    po.two_stream_attention(**x, **kw, backend="reference")


def test_cpu_tensors_are_always_value_checked(monkeypatch):
    monkeypatch.delenv(_checks.DEBUG_ENV, raising=False)
    assert _checks.values_checkable(torch.zeros(2))
    assert not _checks.values_checkable(torch.zeros(2, device="meta"))


# --- kernels with unchecked values ------------------------------------------------------------------

def _grads(leaves):
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_unchecked_target_pos_out_of_range_is_a_padding_row(backend, as_on_cuda, one_torch_thread):
    """target_pos outside [0, Lq) reaches the kernels when nothing checks it: every backend treats the row
    as padding (output 0, no gradient) and every other row is exactly as with -1 there."""
    x, kw = make_inputs(B=2, Lq=7, M=1, H=2, D=8, P=4, dtype=torch.float32, features=("query", "seg_ids"))
    bad = kw["target_pos"].clone()
    bad[0, 0], bad[1, 1], bad[1, 2] = 7, 2**40, -9
    padded = torch.where((bad >= 0) & (bad < 7), bad, -1)
    results = []
    for tp in (bad, padded):
        leaves = [t.detach().clone().requires_grad_() for t in (x["q"], x["k"], x["v"], kw["q_g"])]
        args = {**x, "q": leaves[0], "k": leaves[1], "v": leaves[2]}
        out_h, out_g = po.two_stream_attention(**args, **{**kw, "q_g": leaves[3], "target_pos": tp}, backend=backend)
        g_h, g_g = torch.randn_like(out_h, generator=torch.Generator().manual_seed(1)), \
            torch.randn_like(out_g, generator=torch.Generator().manual_seed(2))
        ((out_h * g_h).sum() + (out_g * g_g).sum()).backward()
        results.append([out_h, out_g, *_grads(leaves)])
    invalid = padded < 0
    assert torch.equal(results[0][1][invalid], torch.zeros_like(results[0][1][invalid]))
    assert torch.equal(results[0][5][invalid], torch.zeros_like(results[0][5][invalid]))
    for name, a, b in zip(("out_h", "out_g", "dq", "dk", "dv", "dq_g"), *results):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), f"{name} differs from the padded call"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_unchecked_targets_out_of_range_are_ignored_rows(backend, reduction, as_on_cuda, one_torch_thread):
    """targets outside [0, V) (not ignore_index) reach the kernels when nothing checks them: every backend
    ignores the row (loss 0, no gradient, not counted in the mean), exactly as with ignore_index there."""
    hidden, weight, bias = torch.randn(8, 5), torch.randn(11, 5), torch.randn(11)
    bad = torch.randint(0, 11, (8,))
    bad[1], bad[4], bad[6] = 11, 2**40, -3
    ignored = torch.where((bad >= 0) & (bad < 11), bad, -100)
    results = []
    for targets in (bad, ignored):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, sampled = po.linear_cross_entropy(*leaves[:2], targets, leaves[2], reduction=reduction, sample=True,
                                                seed=9, backend=backend)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
        results.append([loss, sampled, *_grads(leaves)])
    for name, a, b in zip(("loss", "sampled", "d_hidden", "d_weight", "d_bias"), *results):
        assert torch.isfinite(a.float()).all(), name
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), f"{name} differs from the ignore_index call"
    if reduction == "none":
        assert torch.equal(results[0][0][[1, 4, 6]], torch.zeros(3))
