"""ELECTRA replaced-token-detection loss: fwd+bwd from the discriminator's last hidden state (fused-head
form) or from its logits (``Dd = 0``).

Inputs (same for every provider): hidden ``[B, L, Dd]`` (after the
discriminator head's dense + GELU), ``head_weight [Dd]``, ``head_bias []``,
or logits ``[B, L]`` when ``Dd = 0``; original and corrupted ids ``[B, L]``
int64 (15% replaced), attention mask ``[B, L]`` int64 (rows padded to random
lengths), ``loss_weight = 50``.

Memory-bound. Bytes (the fused floor): read hidden, both id tensors and the
mask once, write d hidden once::

    bytes = 2 * N * max(Dd, 1) * itemsize + N * (8 + 8 + 8)          (N = B * L tokens)

FLOPs: ``2 N Dd`` forward (the head's dot product) + ``4 N Dd`` backward
(d hidden, d head_weight) = ``6 N Dd``; the logits form counts ``10 N`` (softplus, sigmoid, products).
"""

from __future__ import annotations

import torch

from pyobjectives import functional, reference

from .common import Case, Provider, backend_providers, generator, randn, rotated_input_sets

OP = "rtd_loss"
TITLE = "RTD loss"
X_KEY = "tokens"
EAGER = "hf_eager"
VOCAB = 30522
LOSS_WEIGHT = 50.0
FLOAT_INPUTS = ("hidden", "head_weight", "head_bias")


def sweeps(profile: str) -> list:
    if profile == "gpu":
        base = dict(tokens=16384, L=128, Dd=256, dtype="bfloat16")
        return [("tokens", "tokens", [dict(base, tokens=t) for t in (16384, 1 << 20, 1 << 24)]),
                ("hidden", "Dd", [dict(base, tokens=1 << 20), dict(base, tokens=1 << 20, Dd=768)]),
                ("dtype", "dtype", [dict(base, tokens=1 << 20), dict(base, tokens=1 << 20, dtype="float32")])]
    if profile == "cpu":
        base = dict(tokens=16384, L=128, Dd=256, dtype="float32")
        return [("tokens", "tokens", [dict(base, tokens=t) for t in (16384, 262144)]),
                ("logits", "Dd", [dict(base, tokens=1 << 21, L=512, Dd=0)])]
    base = dict(tokens=512, L=64, Dd=32, dtype="float32")
    return [("tokens", "tokens", [dict(base, tokens=t) for t in (512, 1024)])]


def interpreter_config(profile: str) -> dict:
    return dict(tokens=256, L=64, Dd=32, dtype="float32")


def label(cfg: dict) -> str:
    form = f"Dd={cfg['Dd']}" if cfg["Dd"] else "logits"
    return f"N={cfg['tokens']} (B={cfg['tokens'] // cfg['L']} L={cfg['L']}) {form} {cfg['dtype']}"


def _float_inputs(s: dict) -> list:
    return [n for n in FLOAT_INPUTS if s.get(n) is not None]


def _input_set(cfg: dict, device: str, seed: int) -> dict:
    L, Dd = cfg["L"], cfg["Dd"]
    B = cfg["tokens"] // L
    dt = getattr(torch, cfg["dtype"])
    g = generator(seed)
    original = torch.randint(5, VOCAB, (B, L), generator=g)
    replaced = torch.rand(B, L, generator=g) < 0.15
    corrupted = torch.where(replaced, torch.randint(5, VOCAB, (B, L), generator=g), original)
    mask = (torch.arange(L)[None, :] < torch.randint(L // 2, L + 1, (B, 1), generator=g)).long()
    if Dd:
        s = dict(hidden=randn(B, L, Dd, gen=g, dtype=dt, device=device),
                 head_weight=randn(Dd, gen=g, dtype=dt, device=device, scale=Dd**-0.5),
                 head_bias=randn((), gen=g, dtype=dt, device=device))
    else:  # logits form
        s = dict(hidden=randn(B, L, gen=g, dtype=dt, device=device, scale=3.0), head_weight=None, head_bias=None)
    s.update(corrupted=corrupted.to(device), original=original.to(device), mask=mask.to(device))
    for n in _float_inputs(s):
        s[n].requires_grad_()
    return s


def _call_kwargs(s: dict) -> dict:
    return dict(logits_or_hidden=s["hidden"], corrupted_ids=s["corrupted"], original_ids=s["original"],
                attention_mask=s["mask"], loss_weight=LOSS_WEIGHT, reduction="mean", head_weight=s["head_weight"],
                head_bias=s["head_bias"], return_stats=False)


def _pyobjectives(backend: str):
    def fn(s):
        return [functional.rtd_loss(s["hidden"], s["corrupted"], s["original"], s["mask"], loss_weight=LOSS_WEIGHT,
                                    head_weight=s["head_weight"], head_bias=s["head_bias"], backend=backend)]
    return fn


def hf_eager(s: dict):
    """``ElectraForPreTraining``'s head and loss as HF writes them: linear head, then BCE-with-logits over
    the tokens selected by boolean indexing on ``attention_mask == 1``."""
    hidden = s["hidden"]
    L = hidden.shape[1]
    logits = (hidden @ s["head_weight"] + s["head_bias"]).reshape(-1, L) if s["head_weight"] is not None else hidden
    active = s["mask"].view(-1, L) == 1
    labels = (s["corrupted"] != s["original"]).long()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[active], labels[active].to(logits.dtype))
    return [LOSS_WEIGHT * loss]


def _oracle(dtype):
    def oracle(inputs, gouts, grad_names):
        hp = {n: (t.detach().to(dtype).requires_grad_(n in grad_names) if isinstance(t, torch.Tensor)
                  and t.is_floating_point() else t) for n, t in inputs.items()}
        loss = reference.rtd_loss(hp["hidden"], hp["corrupted"], hp["original"], hp["mask"], loss_weight=LOSS_WEIGHT,
                                  head_weight=hp["head_weight"], head_bias=hp["head_bias"])
        grads = torch.autograd.grad(loss, [hp[n] for n in grad_names], gouts[0].to(dtype))
        return [loss], dict(zip(grad_names, grads))
    return oracle


def make_case(cfg: dict, device: str, profile: str) -> Case:
    sets = rotated_input_sets(_input_set, cfg, device, seed=2000)
    first = sets[0]
    g = generator(8)
    dt = getattr(torch, cfg["dtype"])
    gouts = [[randn((), gen=g, dtype=dt, device=device)] for _ in sets]
    N, Dd = cfg["tokens"], cfg["Dd"]
    item = first["hidden"].element_size()
    return Case(op=OP, config=cfg, label=label(cfg), sets=sets, grad_names=_float_inputs(first), dtype=cfg["dtype"],
                device=device, flops=6 * N * Dd if Dd else 10 * N, bytes=2 * N * max(Dd, 1) * item + N * 24,
                oracle=_oracle(torch.float64 if device == "cpu" else torch.float32), gouts=gouts, tokens=N)


def providers(case: Case) -> list:
    out = backend_providers(OP, _call_kwargs(case.sets[0]), _pyobjectives, case.device)
    out.append(Provider(EAGER, "eager", fn=hf_eager,
                        note="ElectraForPreTraining's head + BCEWithLogits over attention_mask == 1 tokens"))
    return out
