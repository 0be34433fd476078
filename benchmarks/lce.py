"""ELECTRA generator head: linear + cross-entropy (+ Gumbel-max sampling), fwd+bwd.

Inputs (same for every provider): hidden ``[N, E]`` (generator head output at
the N masked positions), the tied embedding matrix ``weight [V, E]``,
``bias [V]``, targets ``[N]`` (1 in 16 rows ``ignore_index``), seed.

Compute-bound. FLOPs (stated formula): logits ``2 N E V`` forward, ``d hidden``
and ``d weight`` ``4 N E V`` backward::

    flops = 6 * N * E * V

Bytes (floor): hidden, weight and bias read in forward and backward, their
grads written: ``3 * (N E + V E + V) * itemsize + 16 N`` (targets, samples).
Providers that do not sample (Liger, CCE) are checked and timed on the loss
alone; torch eager samples with its own RNG, so only its loss is checked.
"""

from __future__ import annotations

import importlib.util

import torch

from pyobjectives import functional
from pyobjectives.reference.electra import gumbel_noise

from .common import Case, Provider, backend_providers, generator, randn, rotated_input_sets

OP = "linear_cross_entropy"
TITLE = "linear + cross-entropy (+ sampling)"
X_KEY = "N"
EAGER = "torch_eager"
SEED = 1234
FLOAT_INPUTS = ("hidden", "weight", "bias")


def sweeps(profile: str) -> list:
    if profile == "gpu":
        base = dict(N=2432, E=768, V=30522, dtype="bfloat16", sample=True)
        return [("N", "N", [dict(base, N=n) for n in (2432, 8192, 20224)]),
                ("ELECTRA-Small", "E", [dict(base, E=128)]),
                ("sampling", "sample", [dict(base, N=8192), dict(base, N=8192, sample=False)])]
    if profile == "cpu":  # the native CPU backend's targets: N=4096, E=256, V=30522
        base = dict(N=4096, E=256, V=30522, dtype="float32", sample=False)
        return [("N", "N", [dict(base, N=1024), base]),
                ("sampling", "sample", [dict(base, N=1024), dict(base, N=1024, sample=True)])]
    base = dict(N=16, E=16, V=101, dtype="float32", sample=True)
    return [("N", "N", [dict(base, N=n) for n in (16, 32)])]


def interpreter_config(profile: str) -> dict:
    return dict(N=24, E=16, V=257, dtype="float32", sample=True)


def label(cfg: dict) -> str:
    return f"N={cfg['N']} E={cfg['E']} V={cfg['V']} {cfg['dtype']}" + (" +sample" if cfg["sample"] else "")


def _input_set(cfg: dict, device: str, seed: int) -> dict:
    N, E, V = cfg["N"], cfg["E"], cfg["V"]
    dt = getattr(torch, cfg["dtype"])
    g = generator(seed)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::16] = -100
    s = dict(hidden=randn(N, E, gen=g, dtype=dt, device=device),
             weight=randn(V, E, gen=g, dtype=dt, device=device, scale=E**-0.5),
             bias=randn(V, gen=g, dtype=dt, device=device, scale=0.1), targets=targets.to(device))
    for n in FLOAT_INPUTS:
        s[n].requires_grad_()
    return s


def _call_kwargs(s: dict, sample: bool) -> dict:
    return dict(hidden=s["hidden"], weight=s["weight"], targets=s["targets"], bias=s["bias"], ignore_index=-100,
                reduction="mean", sample=sample, temperature=1.0, seed=SEED if sample else None, disallow=None)


def _pyobjectives(sample: bool):
    def make(backend: str):
        def fn(s):
            out = functional.linear_cross_entropy(s["hidden"], s["weight"], s["targets"], s["bias"], sample=sample,
                                                  seed=SEED if sample else None, backend=backend)
            return list(out) if sample else [out]
        return fn
    return make


def torch_eager(sample: bool):
    """What an eager training loop writes: full logits, ``F.cross_entropy``, Gumbel-max with ``torch.rand``."""
    def fn(s):
        logits = torch.nn.functional.linear(s["hidden"], s["weight"], s["bias"])
        loss = torch.nn.functional.cross_entropy(logits, s["targets"], ignore_index=-100)
        if not sample:
            return [loss]
        with torch.no_grad():
            u = torch.rand(logits.shape, device=logits.device).clamp_(min=1e-20)
            sampled = (logits.float() - torch.log(-torch.log(u))).argmax(1)
        return [loss, sampled]
    return fn


def _chunked_oracle(dtype: torch.dtype, sample: bool):
    """Float64 (CPU) / float32 (CUDA) reference, row chunks so that the ``[N, V]`` logits never exist at once;
    samples from the shared Philox definition (offset ``n * V + v``)."""
    def oracle(inputs, gouts, grad_names):
        h, w, b = (inputs[n].detach().to(dtype).requires_grad_() for n in FLOAT_INPUTS)
        targets = inputs["targets"]
        N, V = h.shape[0], w.shape[0]
        keep = targets != -100
        n_keep = keep.sum().clamp(min=1).to(dtype)
        chunk = max(1, (1 << 25) // V)
        loss = torch.zeros((), dtype=dtype, device=h.device)
        grads = [torch.zeros_like(t) for t in (h, w, b)]
        samples = []
        gout = gouts[0].to(dtype)
        for start in range(0, N, chunk):
            rows = slice(start, min(N, start + chunk))
            logits = h[rows] @ w.t() + b
            t, k = targets[rows], keep[rows]
            safe = torch.where(k, t, torch.zeros_like(t)).long()
            per_row = torch.logsumexp(logits, 1) - logits.gather(1, safe[:, None])[:, 0]
            part = torch.where(k, per_row, torch.zeros_like(per_row)).sum() / n_keep
            for acc, g in zip(grads, torch.autograd.grad(part, (h, w, b), gout)):
                acc += g
            loss = loss + part.detach()
            if sample:
                noise = gumbel_noise(SEED, torch.arange(rows.start, rows.stop, device=h.device), V)
                samples.append((logits.detach().float() + noise).argmax(1))
        outs = [loss] + ([torch.cat(samples)] if sample else [])
        return outs, dict(zip(FLOAT_INPUTS, grads))
    return oracle


def make_case(cfg: dict, device: str, profile: str) -> Case:
    sets = rotated_input_sets(_input_set, cfg, device, seed=3000)
    first = sets[0]
    g = generator(9)
    dt = getattr(torch, cfg["dtype"])
    gouts = [[randn((), gen=g, dtype=dt, device=device), None] for _ in sets]
    N, E, V = cfg["N"], cfg["E"], cfg["V"]
    item = first["hidden"].element_size()
    return Case(op=OP, config=cfg, label=label(cfg), sets=sets, grad_names=list(FLOAT_INPUTS), dtype=cfg["dtype"],
                device=device, flops=6 * N * E * V, bytes=3 * (N * E + V * E + V) * item + 16 * N,
                oracle=_chunked_oracle(torch.float64 if device == "cpu" else torch.float32, cfg["sample"]),
                gouts=gouts, tokens=N)


def _third_party(name: str, module: str, pip_name: str, device: str, build) -> Provider:
    prov = Provider(name, "third-party", compare=[0], note="loss only (no sampling)")
    if importlib.util.find_spec(module) is None:
        prov.reason = f"{pip_name} is not installed (pip install {pip_name})"
    elif device != "cuda":
        prov.reason = f"{pip_name} runs on CUDA only"
    else:
        prov.setup = build
    return prov


def _liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda s: [loss_fn(s["weight"], s["hidden"], s["targets"], s["bias"])]


def _cce():
    from cut_cross_entropy import linear_cross_entropy
    return lambda s: [linear_cross_entropy(s["hidden"], s["weight"], s["targets"], bias=s["bias"], ignore_index=-100)]


def providers(case: Case) -> list:
    sample = case.config["sample"]
    out = backend_providers(OP, _call_kwargs(case.sets[0], sample), _pyobjectives(sample), case.device)
    if sample and case.device == "cpu" and case.config["N"] * case.config["V"] > 1 << 22:
        for prov in out:
            if prov.name == "reference" and prov.reason is None:
                # the oracle already checks every provider's samples; timing the reference's
                # tensor-op Philox over N x V draws (int64 [N, V] temporaries) would dominate the run
                prov.reason = ("the reference draws Gumbel noise with int64 tensor ops over N x V (about 15 s "
                               "and several GB per call at N=1024, V=30522): not timed on CPU")
                prov.fn = None
    out.append(Provider(EAGER, "eager", fn=torch_eager(sample), compare=[0],
                        note="F.linear + F.cross_entropy" + (" + Gumbel-max with torch.rand (own RNG: "
                                                             "only the loss is checked)" if sample else "")))
    out.append(_third_party("liger_flce", "liger_kernel", "liger-kernel", case.device, _liger))
    out.append(_third_party("cut_cross_entropy", "cut_cross_entropy", "cut-cross-entropy", case.device, _cce))
    return out
