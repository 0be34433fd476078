"""Two-stream relative attention (XLNet): fwd+bwd of both streams at a fixed token budget.

Inputs (same for every provider): content queries ``q [B, L, H, D]``, keys and
values ``[B, M+L, H, D]``, relative position keys ``r [M+2L, H, D]``, biases,
query-stream queries ``q_g [B, P, H, D]`` at ``P`` target positions per row
(XLNet permutation ranks: each target sees the non-targets and the targets
before it in a random order; non-targets see the non-targets), two segments
per row with relative segment encoding.

FLOPs (stated formula, dense count, masked pairs included): the forward
computes three products per (row, key) pair, ``ac`` (content), the ``bd`` band
(position) and ``PV``, each ``2 D`` FLOPs, for the ``L`` content rows and the
``P`` query rows against ``Lk = M + L`` keys::

    fwd = 3 * 2 * B * H * D * Lk * (L + P);  fwd+bwd = 3 * fwd   (backward: 2 products per forward product;
                                                                   recomputation not counted)

The plain-SDPA lower bound counts its own work: ``2 * 2 * B * H * D * Lk * L``
forward, times 3. Bytes (floor): forward reads the inputs and writes the
outputs; backward reads inputs, outputs and output grads and writes input
grads: ``3 * (float inputs + outputs) + integer inputs``.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch

from pyobjectives import functional, reference
from pyobjectives.data import ranks_to_dense_mask

from .common import Case, Provider, backend_providers, generator, randn, rotated_input_sets, tensor_bytes

OP = "two_stream_attention"
TITLE = "two-stream attention"
X_KEY = "L"
EAGER = "hf_eager"
INT32_MIN = -(2**31)
FLOAT_INPUTS = ("q", "k", "v", "r", "r_w_bias", "r_r_bias", "q_g", "r_s_bias", "seg_embed")


def sweeps(profile: str) -> list:
    """``[(sweep name, x key, [config, ...]), ...]``; the first sweep is the plotted one."""
    if profile == "gpu":
        base = dict(tokens=16384, L=512, H=16, D=64, P_frac=1 / 6, M=0, dtype="bfloat16", flex=True)
        return [
            ("L", "L", [dict(base, L=L) for L in (512, 1024, 2048)]),
            ("head dim", "D", [base, dict(base, D=128, flex=False)]),
            ("P/L", "P_frac", [base, dict(base, P_frac=0.5, flex=False)]),
            ("dtype", "dtype", [base, dict(base, dtype="float16", flex=False),
                                dict(base, dtype="float32", flex=False)]),
        ]
    if profile == "cpu":  # the native CPU backend's targets: B=2, H=8, D=64, P=L/6
        base = dict(tokens=1024, L=512, H=8, D=64, P_frac=1 / 6, M=0, dtype="float32", flex=False)
        return [
            ("L", "L", [dict(base, L=256, tokens=512), base, dict(base, L=2048, tokens=4096)]),
            ("dtype", "dtype", [base, dict(base, dtype="bfloat16")]),
        ]
    base = dict(tokens=128, L=32, H=2, D=16, P_frac=1 / 4, M=0, dtype="float32", flex=False)
    return [("L", "L", [dict(base, L=L) for L in (32, 64)])]


def interpreter_config(profile: str) -> dict:
    """A tiny config on which the Triton interpreter is checked (never timed)."""
    return dict(tokens=64, L=32, H=2, D=16, P_frac=1 / 4, M=8, dtype="float32", flex=False)


def dims(cfg: dict) -> tuple:
    L = cfg["L"]
    B = max(1, cfg["tokens"] // L)
    P = max(1, round(L * cfg["P_frac"]))
    return B, L, cfg["M"], cfg["H"], cfg["D"], P


def label(cfg: dict) -> str:
    B, L, M, H, D, P = dims(cfg)
    return f"B={B} L={L} H={H} D={D} P={P}" + (f" M={M}" if M else "") + f" {cfg['dtype']}"


def _input_set(cfg: dict, device: str, seed: int) -> dict:
    B, L, M, H, D, P = dims(cfg)
    Lk = M + L
    dt = getattr(torch, cfg["dtype"])
    g = generator(seed)
    f = dict(gen=g, dtype=dt, device=device)
    s = dict(q=randn(B, L, H, D, **f), k=randn(B, Lk, H, D, **f), v=randn(B, Lk, H, D, **f),
             r=randn(Lk + L, H, D, **f), r_w_bias=randn(H, D, **f, scale=0.5), r_r_bias=randn(H, D, **f, scale=0.5),
             q_g=randn(B, P, H, D, **f), r_s_bias=randn(H, D, **f, scale=0.5), seg_embed=randn(2, H, D, **f))
    for n in FLOAT_INPUTS:
        s[n].requires_grad_()
    # XLNet permutation ranks: P targets per row in a random factorization order.
    perm = torch.stack([torch.randperm(L, generator=g) for _ in range(B)]).int()
    target = perm >= L - P
    k_rank = torch.cat([torch.full((B, M), INT32_MIN, dtype=torch.int32),
                        torch.where(target, perm, torch.full_like(perm, -1))], 1)
    q_rank = torch.where(target, perm, torch.zeros_like(perm))
    target_pos = torch.stack([torch.nonzero(t)[:, 0] for t in target])
    split = torch.randint(L // 4, 3 * L // 4 + 1, (B, 1), generator=g)
    seg_k = torch.cat([torch.zeros(B, M, dtype=torch.long), (torch.arange(L)[None, :] >= split).long()], 1)
    s.update(target_pos=target_pos.to(device), q_rank=q_rank.to(device), k_rank=k_rank.to(device),
             seg_q=seg_k[:, M:].to(device), seg_k=seg_k.to(device))
    # HF's dense inputs (built once per batch by XLNetModel, outside the attention layers).
    s["hf"] = _hf_inputs(s, M, dt)
    return s


def _hf_inputs(s: dict, M: int, dt: torch.dtype) -> dict:
    B, L = s["q_rank"].shape
    P = s["target_pos"].shape[1]
    mask_g = ranks_to_dense_mask(s["q_rank"], s["k_rank"])
    mask_h = ranks_to_dense_mask(s["q_rank"], s["k_rank"], content=True, mem_len=M)
    to_hf = lambda m: m.permute(1, 2, 0)[..., None].to(dt)  # noqa: E731  [B, Lq, Lk] -> [Lq, Lk, B, 1]
    diff = s["seg_q"][:, :, None] != s["seg_k"][:, None, :]
    seg_mat = torch.nn.functional.one_hot(diff.long(), 2).permute(1, 2, 0, 3).to(dt)
    tm = torch.zeros(B, P, L, dtype=dt, device=s["q"].device)
    tm.scatter_(2, s["target_pos"][:, :, None], 1.0)
    return dict(mask_h=to_hf(mask_h), mask_g=to_hf(mask_g), seg_mat=seg_mat, target_mapping=tm.permute(1, 2, 0))


def _call_kwargs(s: dict) -> dict:
    """The keyword arguments every backend receives (the functional API's full set)."""
    return dict(q=s["q"], k=s["k"], v=s["v"], r=s["r"], r_w_bias=s["r_w_bias"], r_r_bias=s["r_r_bias"],
                q_g=s["q_g"], target_pos=s["target_pos"], q_rank=s["q_rank"], k_rank=s["k_rank"], attn_mask=None,
                key_padding_mask=None, causal=False, seg_q=s["seg_q"], seg_k=s["seg_k"], seg_diff=None,
                r_s_bias=s["r_s_bias"], seg_embed=s["seg_embed"], t5_bias=None, t5_num_buckets=32,
                t5_max_distance=128, t5_bidirectional=True, scale=None, dropout_p=0.0, seed=None,
                empty_rows="zero")


def _public_kwargs(s: dict) -> dict:
    keys = ("q_g", "target_pos", "q_rank", "k_rank", "seg_q", "seg_k", "r_s_bias", "seg_embed")
    return {k: s[k] for k in keys}


def _pyobjectives(backend: str):
    def fn(s):
        return functional.two_stream_attention(s["q"], s["k"], s["v"], s["r"], s["r_w_bias"], s["r_r_bias"],
                                               **_public_kwargs(s), backend=backend)
    return fn


def _reference_forward(s: dict):
    return reference.two_stream_attention(s["q"], s["k"], s["v"], s["r"], s["r_w_bias"], s["r_r_bias"],
                                          **_public_kwargs(s))


def _oracle(inputs, gouts, grad_names, dtype):
    hp = {n: (t.detach().to(dtype).requires_grad_(n in grad_names) if isinstance(t, torch.Tensor)
              and t.is_floating_point() else t) for n, t in inputs.items()}
    out = _reference_forward(hp)
    got = torch.autograd.grad(list(out), [hp[n] for n in grad_names], [g.to(dtype) for g in gouts])
    return list(out), dict(zip(grad_names, got))


# --- HF eager ------------------------------------------------------------------------------------

def hf_two_stream(s: dict, scale: float):
    """HF ``XLNetRelativeAttention.rel_attn_core`` for both streams, as ``XLNetRelativeAttention.forward``
    calls it: HF float masks ``[Lq, Lk, B, 1]``, one-hot ``seg_mat``, and the query stream scattered to all
    L rows through ``target_mapping`` and gathered back."""
    from transformers.models.xlnet.modeling_xlnet import XLNetRelativeAttention as HF
    layer = SimpleNamespace(r_w_bias=s["r_w_bias"], r_r_bias=s["r_r_bias"], r_s_bias=s["r_s_bias"],
                            seg_embed=s["seg_embed"], scale=scale, dropout=torch.nn.Identity(),
                            rel_shift_bnij=HF.rel_shift_bnij)
    hf = s["hf"]
    B = s["q"].shape[0]
    k, v = s["k"].transpose(0, 1), s["v"].transpose(0, 1)
    k_r = s["r"][:, None].expand(-1, B, -1, -1)
    out_h = HF.rel_attn_core(layer, s["q"].transpose(0, 1), k, v, k_r, seg_mat=hf["seg_mat"], attn_mask=hf["mask_h"])
    tm = hf["target_mapping"]
    q_g = torch.einsum("mbnd,mlb->lbnd", s["q_g"].transpose(0, 1), tm)
    out_g = HF.rel_attn_core(layer, q_g, k, v, k_r, seg_mat=hf["seg_mat"], attn_mask=hf["mask_g"])
    out_g = torch.einsum("lbnd,mlb->mbnd", out_g, tm)
    return out_h.transpose(0, 1), out_g.transpose(0, 1)


# --- plain SDPA lower bound ----------------------------------------------------------------------

def sdpa_content(s: dict, scale: float):
    q, k, v = (s[n].transpose(1, 2) for n in ("q", "k", "v"))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return [out.transpose(1, 2)]


def _sdpa_oracle(scale: float, dtype: torch.dtype):
    def oracle(inputs, gouts, grad_names):
        q, k, v = (inputs[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v"))
        p = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * scale, -1)
        out = torch.einsum("bhij,bjhd->bihd", p, v)
        grads = torch.autograd.grad(out, (q, k, v), gouts[0].to(dtype))
        return [out], dict(zip(("q", "k", "v"), grads))
    return oracle


# --- FlexAttention with a precomputed bd tensor --------------------------------------------------

def flex_two_stream(s: dict, scale: float, flex_attention, block_masks: tuple):
    """Both streams through FlexAttention: ``q + r_w_bias`` against k (ac) in the kernel, the position
    (bd) and segment (ef) terms precomputed as one dense ``[B, H, rows, Lk]`` bias added by ``score_mod``,
    the permutation mask as a block mask."""
    q, k, v, r = s["q"], s["k"], s["v"], s["r"]
    B, L, H, D = q.shape
    Lk = k.shape[1]
    keys = torch.arange(Lk, device=q.device)

    def bias(qx, pos):  # qx [B, R, H, D] at absolute query positions pos [B, R]
        full = torch.einsum("bihd,thd->bhit", qx + s["r_r_bias"], r)          # [B, H, R, Lk+L]
        idx = (L - pos)[:, None, :, None] + keys                               # [B, 1, R, Lk]
        bd = full.gather(-1, idx.expand(-1, H, -1, -1))
        ef = torch.einsum("bihd,shd->bhis", qx + s["r_s_bias"], s["seg_embed"])  # [B, H, R, 2]
        diff = s["seg_q"].gather(1, pos)[:, None, :, None] != s["seg_k"][:, None, None, :]
        return (bd + torch.where(diff, ef[..., 1:], ef[..., :1])) * scale

    def attend(qx, pos, block_mask):
        b = bias(qx, pos)

        def score_mod(score, bi, hi, qi, kj):
            return score + b[bi, hi, qi, kj]
        out = flex_attention((qx + s["r_w_bias"]).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             score_mod=score_mod, block_mask=block_mask, scale=scale)
        return out.transpose(1, 2)

    rows = torch.arange(L, device=q.device).expand(B, -1)
    return attend(q, rows, block_masks[0]), attend(s["q_g"], s["target_pos"], block_masks[1])


def flex_block_masks(s: dict, M: int):
    from torch.nn.attention.flex_attention import create_block_mask
    B, L = s["q_rank"].shape
    Lk = s["k_rank"].shape[1]
    q_rank, k_rank = s["q_rank"], s["k_rank"]
    q_rank_g = q_rank.gather(1, s["target_pos"])
    device = s["q"].device

    def content(b, h, i, j):
        return (k_rank[b, j] < q_rank[b, i]) | (j == i + M)

    def query(b, h, p, j):
        return k_rank[b, j] < q_rank_g[b, p]
    return (create_block_mask(content, B, None, L, Lk, device=device),
            create_block_mask(query, B, None, q_rank_g.shape[1], Lk, device=device))


def _flex_provider(case: Case, cfg: dict, scale: float) -> Provider:
    prov = Provider("flex_bd", "compiled", note="FlexAttention + precomputed bd/ef bias, torch.compile; "
                    "block masks built outside the timed region")
    if case.device != "cuda":
        prov.reason = "FlexAttention is benchmarked on CUDA only (under torch.compile)"
        return prov
    if not cfg.get("flex"):
        prov.reason = "compiled only in the L sweep (each new shape recompiles)"
        return prov
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        prov.reason = f"torch.nn.attention.flex_attention not importable ({exc})"
        return prov

    def setup():
        compiled = torch.compile(flex_two_stream, dynamic=False)
        masks = {id(st): flex_block_masks(st, cfg["M"]) for st in case.sets}
        return lambda st: compiled(st, scale, flex_attention, masks[id(st)])
    prov.setup = setup
    return prov


# --- case ----------------------------------------------------------------------------------------

def make_case(cfg: dict, device: str, profile: str) -> Case:
    B, L, M, H, D, P = dims(cfg)
    Lk = M + L
    int_inputs = ("target_pos", "q_rank", "k_rank", "seg_q", "seg_k")

    def set_bytes(one):
        return tensor_bytes([one[n] for n in FLOAT_INPUTS + int_inputs]) + tensor_bytes(one["hf"].values())

    sets = rotated_input_sets(_input_set, cfg, device, seed=1000, set_bytes=set_bytes)
    first = sets[0]
    floats = [first[n] for n in FLOAT_INPUTS]
    ints = [first[n] for n in int_inputs]
    g = generator(7)
    dt = getattr(torch, cfg["dtype"])
    gouts = [[randn(B, L, H, D, gen=g, dtype=dt, device=device), randn(B, P, H, D, gen=g, dtype=dt, device=device)]
             for _ in sets]
    item = first["q"].element_size()
    out_bytes = (B * L * H * D + B * P * H * D) * item
    oracle_dtype = torch.float64 if device == "cpu" else torch.float32
    case = Case(op=OP, config=cfg, label=label(cfg), sets=sets, grad_names=list(FLOAT_INPUTS), dtype=cfg["dtype"],
                device=device, flops=3 * 6 * B * H * D * Lk * (L + P),
                bytes=3 * (tensor_bytes(floats) + out_bytes) + tensor_bytes(ints),
                oracle=lambda inputs, gouts, names: _oracle(inputs, gouts, names, oracle_dtype), gouts=gouts,
                tokens=B * L)
    return case


def providers(case: Case) -> list:
    cfg, s = case.config, case.sets[0]
    B, L, M, H, D, P = dims(cfg)
    scale = 1 / D**0.5
    out = backend_providers(OP, _call_kwargs(s), _pyobjectives, case.device)
    if importlib.util.find_spec("transformers") is not None:
        hf = Provider(EAGER, "eager", fn=lambda st: hf_two_stream(st, scale),
                      note="transformers XLNetRelativeAttention.rel_attn_core, HF masks and target_mapping")
    else:
        hf = Provider(EAGER, "eager", reason="transformers is not installed (pip install transformers)")
    out.append(hf)
    oracle_dtype = torch.float64 if case.device == "cpu" else torch.float32
    out.append(Provider("sdpa_content", "lower-bound", fn=lambda st: sdpa_content(st, scale),
                        grad_names=["q", "k", "v"], compare=[0], oracle=_sdpa_oracle(scale, oracle_dtype),
                        flops=3 * 4 * B * H * D * (M + L) * L,
                        note="scaled_dot_product_attention on the content stream alone, no mask, no bd: "
                             "a lower bound, not the same function"))
    out.append(_flex_provider(case, cfg, scale))
    return out
