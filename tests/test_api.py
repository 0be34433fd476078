"""Public API: argument validation names the argument; backend dispatch and its reasons; CLI."""

import subprocess
import sys

import pytest
import torch

import pyobjectives
from pyobjectives import BackendUnavailableError, backends, linear_cross_entropy, rtd_loss, two_stream_attention


def attn_args(B=2, Lq=5, M=1, H=2, D=4, P=2):
    Lk = M + Lq
    return dict(q=torch.randn(B, Lq, H, D), k=torch.randn(B, Lk, H, D), v=torch.randn(B, Lk, H, D),
                r=torch.randn(Lk + Lq, H, D), r_w_bias=torch.randn(H, D), r_r_bias=torch.randn(H, D)), \
        dict(q_g=torch.randn(B, P, H, D), target_pos=torch.tensor([[0, 4], [1, -1]]))


BAD_ATTENTION = {
    "q-3d": (dict(q=torch.randn(2, 5, 8)), {}, ValueError, "q must have shape"),
    "k-batch": (dict(k=torch.randn(3, 6, 2, 4)), {}, ValueError, r"k must have shape \[B, Lk, H, D\] = \[2, \?, 2, 4\]"),
    "k-short": (dict(k=torch.randn(2, 4, 2, 4), v=torch.randn(2, 4, 2, 4)), {}, ValueError, "Lk >= Lq"),
    "v-dtype": (dict(v=torch.randn(2, 6, 2, 4, dtype=torch.float64)), {}, TypeError, "v must have dtype"),
    "r-2d": (dict(r=torch.randn(11, 8)), {}, ValueError, r"r must be a tensor of shape \[R, H, D\]"),
    "r-short": (dict(r=torch.randn(6, 2, 4)), {}, ValueError, r"r must have at least Lk \+ 1 = 7 rows"),
    "q-int": (dict(q=torch.ones(2, 5, 2, 4, dtype=torch.long)), {}, TypeError, "q must be a float tensor"),
    "bias-shape": (dict(r_w_bias=torch.randn(4, 2)), {}, ValueError, "r_w_bias must have shape"),
    "target_pos-range": ({}, dict(target_pos=torch.tensor([[0, 5], [1, 1]])), ValueError,
                         r"target_pos must be in \[0, 5\) or -1"),
    "target_pos-below": ({}, dict(target_pos=torch.tensor([[0, -2], [1, 1]])), ValueError, "target_pos must be in"),
    "target_pos-float": ({}, dict(target_pos=torch.zeros(2, 2)), TypeError, "target_pos must be a int"),
    "q_g-alone": ({}, dict(target_pos=None), ValueError, "q_g and target_pos go together"),
    "rank-alone": ({}, dict(q_rank=torch.zeros(2, 5, dtype=torch.int32)), ValueError, "q_rank and k_rank go together"),
    "mask-dtype": ({}, dict(attn_mask=torch.zeros(2, 5, 6)), TypeError, "attn_mask must be a bool tensor"),
    "mask-shape": ({}, dict(attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool)), ValueError, "attn_mask must have shape"),
    "kpm-shape": ({}, dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
                  "key_padding_mask must have shape"),
    "causal-int": ({}, dict(causal=1), TypeError, "causal must be a bool"),
    "seg-no-bias": ({}, dict(seg_diff=torch.zeros(2, 5, 6, dtype=torch.bool)), ValueError, "needs r_s_bias"),
    "seg-both": ({}, dict(seg_q=torch.zeros(2, 5, dtype=torch.long), seg_k=torch.zeros(2, 6, dtype=torch.long),
                          seg_diff=torch.zeros(2, 5, 6, dtype=torch.bool), r_s_bias=torch.randn(2, 4),
                          seg_embed=torch.randn(2, 2, 4)), ValueError, "not both"),
    "seg_embed-alone": ({}, dict(seg_embed=torch.randn(2, 2, 4)), ValueError, "without segment information"),
    "t5-shape": ({}, dict(t5_bias=torch.randn(8, 2)), ValueError, r"t5_bias must have shape \[num_buckets, H\]"),
    "t5-buckets": ({}, dict(t5_bias=torch.randn(2, 2), t5_num_buckets=2), ValueError, "t5_num_buckets must be in"),
    "t5-distance": ({}, dict(t5_bias=torch.randn(32, 2), t5_max_distance=8), ValueError, "t5_max_distance must be in"),
    "dropout-1": ({}, dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0.0, 1.0\)"),
    "dropout-neg": ({}, dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    "seed-neg": ({}, dict(dropout_p=0.1, seed=-3), ValueError, "seed must be in"),
    "scale-nan": ({}, dict(scale=float("nan")), TypeError, "scale must be a finite number"),
    "empty_rows": ({}, dict(empty_rows="mean"), ValueError, "empty_rows must be one of"),
    "backend": ({}, dict(backend="tpu"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("override,kw,error,message", BAD_ATTENTION.values(), ids=BAD_ATTENTION.keys())
def test_attention_rejects_bad_input(override, kw, error, message):
    args, extra = attn_args()
    args.update(override)
    extra.update(kw)
    extra = {n: t for n, t in extra.items() if t is not None}
    with pytest.raises(error, match=message):
        two_stream_attention(**args, **extra)


def lce_args(N=4, E=3, V=7):
    return dict(hidden=torch.randn(N, E), weight=torch.randn(V, E), targets=torch.tensor([0, 6, -100, 2]))


BAD_LCE = {
    "targets-vocab": (dict(targets=torch.tensor([0, 7, -100, 2])), {}, ValueError,
                      r"targets must be in \[0, 7\) or -100"),
    "targets-float": (dict(targets=torch.zeros(4)), {}, TypeError, "targets must be a int"),
    "targets-len": (dict(targets=torch.zeros(5, dtype=torch.long)), {}, ValueError, "targets must have shape"),
    "weight-E": (dict(weight=torch.randn(7, 4)), {}, ValueError, r"weight must have shape \[V, E\] = \[\?, 3\]"),
    "weight-dtype": (dict(weight=torch.randn(7, 3, dtype=torch.float64)), {}, TypeError, "weight must have dtype"),
    "bias-len": ({}, dict(bias=torch.randn(6)), ValueError, "bias must have shape"),
    "reduction": ({}, dict(reduction="avg"), ValueError, "reduction must be one of"),
    "temperature": ({}, dict(sample=True, temperature=0.0), ValueError, r"temperature must be in \(0.0, inf"),
    "disallow-nosample": ({}, dict(disallow=torch.zeros(4, dtype=torch.long)), ValueError, "sample=True"),
    "hidden-3d": (dict(hidden=torch.randn(2, 2, 3)), {}, ValueError, "hidden must have shape"),
}


@pytest.mark.parametrize("override,kw,error,message", BAD_LCE.values(), ids=BAD_LCE.keys())
def test_linear_cross_entropy_rejects_bad_input(override, kw, error, message):
    args = lce_args()
    args.update(override)
    with pytest.raises(error, match=message):
        linear_cross_entropy(**args, **kw)


BAD_RTD = {
    "ids-shape": (dict(corrupted_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "corrupted_ids must have shape"),
    "ids-float": (dict(original_ids=torch.zeros(2, 5)), TypeError, "original_ids must be a int"),
    "mask-shape": (dict(attention_mask=torch.ones(5, 2)), ValueError, "attention_mask must have shape"),
    "head-dim": (dict(head_weight=torch.randn(3)), ValueError, "logits_or_hidden must have shape|head_weight must"),
    "bias-alone": (dict(head_bias=torch.randn(())), ValueError, "head_bias needs head_weight"),
    "reduction": (dict(reduction="mean_tokens"), ValueError, "reduction must be one of"),
    "weight-nan": (dict(loss_weight=float("inf")), TypeError, "loss_weight must be a finite number"),
}


@pytest.mark.parametrize("override,error,message", BAD_RTD.values(), ids=BAD_RTD.keys())
def test_rtd_loss_rejects_bad_input(override, error, message):
    args = dict(logits_or_hidden=torch.randn(2, 5), corrupted_ids=torch.zeros(2, 5, dtype=torch.long),
                original_ids=torch.ones(2, 5, dtype=torch.long))
    args.update(override)
    with pytest.raises(error, match=message):
        rtd_loss(**args)


def test_auto_falls_back_to_reference_and_explicit_backend_raises_with_reasons(monkeypatch):
    args, extra = attn_args()
    inputs = {**args, **extra}
    name, _ = backends.resolve("two_stream_attention", "auto", inputs)
    assert name in backends.available("two_stream_attention", inputs)
    monkeypatch.setattr(backends.BACKENDS["cuda"], "ops", {})
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run two_stream_attention: "
                                                      "pyobjectives has no cuda implementation"):
        two_stream_attention(**args, **extra, backend="cuda")


def test_input_level_reasons_and_env_override(monkeypatch):
    """A backend that works but cannot take these inputs says why; PYOBJECTIVES_BACKEND overrides auto."""
    args, extra = attn_args()
    calls = []
    fake = backends.Backend("cuda", "test double", probe=lambda: [], common_reasons=backends._device_is("cuda"))
    fake.register("two_stream_attention", lambda: (lambda **kw: calls.append(kw) or ("fake", None)))
    monkeypatch.setitem(backends.BACKENDS, "cuda", fake)
    assert fake.not_supported_reasons("two_stream_attention", args) == ["needs cuda tensors, got ['cpu']"]
    name, _ = backends.resolve("two_stream_attention", "auto", args)
    assert name != "cuda"
    monkeypatch.setenv("PYOBJECTIVES_BACKEND", "reference")
    assert backends.resolve("two_stream_attention", "auto", args)[0] == "reference"
    monkeypatch.setenv("PYOBJECTIVES_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="needs cuda tensors"):
        two_stream_attention(**args, **extra)
    monkeypatch.setenv("PYOBJECTIVES_BACKEND", "gpu")
    with pytest.raises(ValueError, match="PYOBJECTIVES_BACKEND must be one of"):
        two_stream_attention(**args, **extra)


def test_triton_probe_explains_itself(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = backends._probe_triton()
    if torch.cuda.is_available():
        assert reasons == [] or "Triton is not importable" in reasons[0]
    else:
        assert reasons and ("TRITON_INTERPRET=1" in reasons[0] or "Triton is not importable" in reasons[0])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends._triton_device_reasons({"x": torch.zeros(1)}) == []


def test_modules_forward_to_functional():
    from pyobjectives import nn as pnn
    hidden, weight = torch.randn(6, 4), torch.randn(9, 4)
    targets = torch.tensor([1, 2, 3, -100, 8, 0])
    torch.testing.assert_close(pnn.LinearCrossEntropy(reduction="sum")(hidden, weight, targets),
                               linear_cross_entropy(hidden, weight, targets, reduction="sum"))
    z, c, o = torch.randn(2, 3), torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 0, 3], [4, 5, 0]])
    torch.testing.assert_close(pnn.RTDLoss(loss_weight=50.0)(z, c, o), rtd_loss(z, c, o, loss_weight=50.0))


def test_import_does_not_import_triton_or_transformers():
    code = "import sys, pyobjectives; print('triton' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("command", ["info", "compare"])
def test_cli_runs(command):
    proc = subprocess.run([sys.executable, "-m", "pyobjectives", command], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    if command == "info":
        assert "two_stream_attention" in proc.stdout and "reference  available" in proc.stdout
        assert pyobjectives.__version__ in proc.stdout
    else:
        assert proc.stdout.count(" ok ") >= 3 and "FAIL" not in proc.stdout


def test_readme_example_runs():
    import pathlib
    import re
    readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    code = re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out_g"].shape[1] == scope["P"] and torch.isfinite(scope["out_h"]).all()
