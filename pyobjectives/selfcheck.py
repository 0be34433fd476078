"""One-time self-check of the ``cuda`` backend against the reference, before dispatch trusts it.

The CUDA kernels can be compiled anywhere but only run where a GPU is, so a build may carry
kernels that were never executed on that GPU. Before ``backend="auto"`` (or an explicit
``backend="cuda"``) runs an op on CUDA in a process, that op runs once on a tiny fixed input on
the call's device and dtype, forward and backward, and is compared with the reference on the same
device (outputs within a tolerance for the dtype; sampled ids equal). A mismatch or an error makes
the op's ``cuda`` backend unavailable with the reason ``self-check against the reference failed:
...`` (``auto`` then takes the next backend, an explicit ``backend="cuda"`` raises it).

Cost: one small forward + backward per (op, device, dtype) and one host synchronisation, on the
first eager call only; afterwards a dictionary look-up. While torch.compile traces, no check can
run: the recorded result is used, and without one ``auto`` does not pick ``cuda`` (an explicit
``backend="cuda"`` runs unchecked).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

#: (op, device, dtype) -> reasons ([] when the check passed)
_RESULTS: dict = {}
_RUNNING: set = set()
#: Tolerances (absolute, relative) of the comparison with the float64 reference, per dtype.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def _first_tensor(inputs: Mapping[str, Any]) -> torch.Tensor:
    return next(t for t in inputs.values() if isinstance(t, torch.Tensor))


def reasons(op: str, inputs: Mapping[str, Any], explicit: bool = False, backend: str = "cuda") -> list:
    """Why ``backend`` must not run ``op`` on inputs like these: [] once its self-check passed."""
    t = _first_tensor(inputs)
    key = (backend, op, str(t.device), t.dtype)
    if key in _RESULTS:
        return _RESULTS[key]
    if key in _RUNNING:  # the check's own calls
        return []
    if torch.compiler.is_compiling():
        return [] if explicit else [f"the {backend} backend's self-check of {op} has not run in this process "
                                    "(it runs on the first call outside torch.compile)"]
    _RUNNING.add(key)
    try:
        error = CHECKS[op](backend, t.device, t.dtype)
    except Exception as exc:  # a kernel error is a failed check, not a crash of the caller's op
        error = f"{type(exc).__name__}: {exc}"
    finally:
        _RUNNING.discard(key)
    _RESULTS[key] = [] if error is None else [f"self-check against the reference failed: {error}"]
    return _RESULTS[key]


def recorded_failures(op: str, backend: str = "cuda") -> list:
    """The failed checks of ``op`` so far (any device / dtype), for ``info`` and test skips."""
    return [f"{r} ({device}, {str(dtype).replace('torch.', '')})"
            for (b, o, device, dtype), rs in _RESULTS.items() if b == backend and o == op for r in rs]


def _compare(name: str, got, want, dtype) -> str | None:
    if got is None or want is None:
        return None if got is None and want is None else f"{name}: one side has no value"
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    if not torch.isfinite(got).all():
        return f"{name}: NaN or Inf"
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    if bool((err > bound).any()):
        return f"{name}: max error {err.max().item():.3e} (atol {atol:g}, rtol {rtol:g})"
    return None


def _run_both(backend: str, fn: Callable, leaves: dict, dtype) -> tuple:
    """fn(backend, tensors) on the backend (its dtype) and on the reference in float64: outputs and grads."""
    results = []
    for name, cast in ((backend, dtype), ("reference", torch.float64)):
        # both sides see the same values: the reference gets the backend's rounded inputs, upcast
        xs = {k: (v.detach().to(dtype).to(cast).requires_grad_(True) if v.is_floating_point() else v)
              for k, v in leaves.items()}
        outs = fn(name, xs)
        loss = sum((o.double() * w).sum() for o, w in outs["grad_of"])
        floats = [x for x in xs.values() if x.requires_grad]
        grads = torch.autograd.grad(loss, floats, allow_unused=True)
        named = dict(zip([k for k, x in xs.items() if x.requires_grad], grads))
        results.append((outs, named))
    return results


def _check(backend: str, fn: Callable, leaves: dict, dtype, exact: tuple = ()) -> str | None:
    with torch.enable_grad():
        (got, got_grads), (want, want_grads) = _run_both(backend, fn, leaves, dtype)
    for name in got["compare"]:
        error = _compare(name, got["compare"][name], want["compare"][name], dtype)
        if error:
            return error
    for name in got_grads:
        error = _compare(f"d {name}", got_grads[name], want_grads[name], dtype)
        if error:
            return error
    for name in exact:
        if not torch.equal(got["exact"][name].cpu(), want["exact"][name].cpu()):
            return f"{name}: differs from the reference"
    return None


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(20240611)


def _check_rtd(backend: str, device, dtype) -> str | None:
    from pyobjectives import functional as F
    g = _generator()
    B, L, Dd = 2, 37, 24  # 74 tokens: vector groups and a tail
    original = torch.randint(0, 100, (B, L), generator=g)
    corrupted = torch.where(torch.rand(B, L, generator=g) < 0.3, torch.randint(0, 100, (B, L), generator=g), original)
    mask = torch.rand(B, L, generator=g) > 0.1
    leaves = {"logits": torch.randn(B, L, generator=g) * 3, "hidden": torch.randn(B, L, Dd, generator=g),
              "w": torch.randn(Dd, generator=g) * 0.3, "b": torch.tensor(0.1)}
    ids = dict(corrupted_ids=corrupted.to(device), original_ids=original.to(device), attention_mask=mask.to(device))
    leaves = {k: v.to(device) for k, v in leaves.items()}

    def fn(name, xs):
        loss, stats = F.rtd_loss(xs["logits"], **ids, loss_weight=2.0, return_stats=True, backend=name)
        per_token = F.rtd_loss(xs["logits"], **ids, reduction="none", backend=name)
        head = F.rtd_loss(xs["hidden"], **ids, head_weight=xs["w"], head_bias=xs["b"], reduction="sum", backend=name)
        return {"compare": {"loss": loss, "per-token loss": per_token, "head loss": head,
                            **{f"stats[{k}]": v for k, v in stats.items()}},
                "grad_of": [(loss, 1.0), (per_token, 0.5), (head, 1.0)]}
    return _check(backend, fn, leaves, dtype)


def _check_lce(backend: str, device, dtype) -> str | None:
    from pyobjectives import functional as F
    g = _generator()
    N, E, V = 13, 16, 50
    # values on a coarse grid: every logit is a multiple of 1/8 below 17 in magnitude, exact in every
    # dtype and summation order, so the sampled ids must equal the reference's
    leaves = {"hidden": torch.randint(-2, 3, (N, E), generator=g) / 2.0,
              "weight": torch.randint(-4, 5, (V, E), generator=g) / 4.0,
              "bias": torch.randint(-8, 9, (V,), generator=g) / 8.0}
    targets = torch.randint(0, V, (N,), generator=g)
    targets[3] = -100
    disallow = torch.randint(0, V, (N,), generator=g).to(device)
    targets = targets.to(device)
    leaves = {k: v.to(device) for k, v in leaves.items()}

    def fn(name, xs):
        loss, sampled = F.linear_cross_entropy(xs["hidden"], xs["weight"], targets, xs["bias"], sample=True,
                                               temperature=0.7, seed=11, disallow=disallow, backend=name)
        rows = F.linear_cross_entropy(xs["hidden"], xs["weight"], targets, reduction="none", backend=name)
        return {"compare": {"loss": loss, "per-row loss": rows}, "exact": {"sampled ids": sampled},
                "grad_of": [(loss, 1.0), (rows, 0.25)]}
    return _check(backend, fn, leaves, dtype, exact=("sampled ids",))


def _check_attention(backend: str, device, dtype) -> str | None:
    from pyobjectives import functional as F
    g = _generator()
    B, L, H, D, P = 1, 40, 2, 64, 6
    leaves = {"q": torch.randn(B, L, H, D, generator=g), "k": torch.randn(B, L, H, D, generator=g),
              "v": torch.randn(B, L, H, D, generator=g), "r": torch.randn(2 * L, H, D, generator=g),
              "r_w_bias": torch.randn(H, D, generator=g) * 0.1, "r_r_bias": torch.randn(H, D, generator=g) * 0.1,
              "q_g": torch.randn(B, P, H, D, generator=g)}
    rank = torch.randperm(L, generator=g)[None].to(device)
    target_pos = torch.sort(torch.randperm(L, generator=g)[:P]).values[None].to(device)
    leaves = {k: v.to(device) for k, v in leaves.items()}

    def fn(name, xs):
        out_h, out_g = F.two_stream_attention(xs["q"], xs["k"], xs["v"], xs["r"], xs["r_w_bias"], xs["r_r_bias"],
                                              q_g=xs["q_g"], target_pos=target_pos, q_rank=rank, k_rank=rank,
                                              backend=name)
        return {"compare": {"out_h": out_h, "out_g": out_g}, "grad_of": [(out_h, 1.0), (out_g, 1.0)]}
    return _check(backend, fn, leaves, dtype)


CHECKS = {"two_stream_attention": _check_attention, "rtd_loss": _check_rtd, "linear_cross_entropy": _check_lce}
