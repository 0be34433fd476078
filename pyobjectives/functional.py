"""Public functional API: validation, then dispatch to a backend (see :mod:`pyobjectives.backends`)."""

from __future__ import annotations

import torch

from . import _checks as check
from .backends import BACKEND_NAMES, resolve
from .reference.philox import draw_seed

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

EMPTY_ROWS = ("zero", "uniform")
REDUCTIONS = ("mean", "sum", "none")


def _seed(seed):
    return draw_seed() if seed is None else check.seed(seed)


def two_stream_attention(q, k, v, r=None, r_w_bias=None, r_r_bias=None, *, q_g=None, target_pos=None, q_rank=None,
                         k_rank=None, attn_mask=None, key_padding_mask=None, causal=False, seg_q=None, seg_k=None,
                         seg_diff=None, r_s_bias=None, seg_embed=None, t5_bias=None, t5_num_buckets=32,
                         t5_max_distance=128, t5_bidirectional=True, content_sees_self=True, scale=None,
                         dropout_p=0.0, seed=None, empty_rows="zero", backend="auto"):
    """XLNet two-stream relative attention (Transformer-XL positions, relative segments, memory, T5 bias),
    and plain / T5 attention with ``r=None``.

    Computes, for content row ``i`` (absolute key position ``M + i``, ``M = Lk - Lq``) and key ``j``::

        score[i, j] = scale * ((q_i + r_w_bias).k_j                       # content (ac)
                               + (q_i + r_r_bias).r[Lq - i + j]           # position (bd), only with r
                               + (q_i + r_s_bias).seg_embed[s(i, j)])     # segment (ef)
                      + t5_bias[bucket(j - (M + i)), h]
        out_h[i] = sum_j softmax_j(score[i, visible j]) v_j

    and the same for query-stream row ``p`` with ``q_g[p]`` and ``i = target_pos[p]``.
    ``docs/two_stream_attention.md`` is the exact contract; ``docs/t5.md`` shows the T5 calls.

    Shapes (batch-major; strided views such as HF's time-major tensors transposed are fine):

    =====================  ======================  ==================================================
    argument               shape                   meaning
    =====================  ======================  ==================================================
    q                      [B, Lq, H, D]           content-stream queries
    k, v                   [B, Lk, H, D]           keys / values of ``[mems; h]``, ``Lk = M + Lq``
                                                   (a KV cache is memory: ``M`` = cached positions)
    r                      [R, H, D] or            relative position keys; row t = distance ``Lk - t``
                           [B, R, H, D] or None    (per batch for XLNet's bi_data); rows outside
                                                   ``[0, R)`` contribute 0. None: no position term
                                                   (T5, plain attention); nothing is spent on it
    r_w_bias               [H, D] or None          content bias (required with r)
    r_r_bias               [H, D] or None          position bias (required with r, refused without)
    q_g                    [B, P, H, D]            query-stream queries (optional)
    target_pos             [B, P] int              position in ``[0, Lq)`` of each q_g row; -1 = padding
                                                   row (output 0)
    q_rank, k_rank         [B, Lq], [B, Lk] int    permutation ranks: key j visible to row i iff
                                                   ``k_rank[j] < q_rank[i]``
    attn_mask              [B, Lq, Lk] bool        True = masked (HF's ``attn_mask_g``)
    key_padding_mask       [B, Lk] bool            True = padding key
    causal                 bool                    visible only if ``j <= M + i``
    seg_q, seg_k           [B, Lq], [B, Lk] int    segment ids; segments differ iff ids differ
    seg_diff               [B, Lq, Lk] bool        dense "segments differ" (instead of ids)
    r_s_bias, seg_embed    [H, D], [2, H, D]       segment bias / embeddings (0 = same, 1 = different);
                                                   required with segment information
    t5_bias                [num_buckets, H]        T5 bucketed bias table (optional)
    =====================  ======================  ==================================================

    Mask semantics: all given masks combine (a pair is visible only if every
    mask allows it). With ``content_sees_self=True`` (XLNet, the default) the
    content stream always sees its own position ``j = M + i`` (HF's
    ``non_tgt_mask``); the query stream never does. ``content_sees_self=False``
    makes the masks mean exactly what they say, as in T5 and BERT-style
    attention. A row with no visible key outputs 0 with zero gradient
    (``empty_rows="zero"``) or, as HF does, the mean of all values
    (``"uniform"``), with HF's gradient: the softmax Jacobian at the uniform
    distribution, which autograd yields for HF's ``score - 1e30`` fill although
    the value no longer depends on the scores.

    Keys independent of the queries (cross-attention) may be shorter than the
    queries (``Lk < Lq``) when nothing gives ``M`` a meaning: ``r=None``, no
    ``t5_bias``, ``causal=False`` and ``content_sees_self=False``.

    Other options: ``scale`` defaults to ``1/sqrt(D)`` (T5: ``scale=1.0``).
    ``dropout_p`` drops attention probabilities with Philox noise keyed on
    ``seed`` (an int in [0, 2**63) or a one-element integer CPU tensor; drawn from
    torch's generator when None, inside the graph under torch.compile), identical on
    every backend.
    ``backend``: "auto" (``PYOBJECTIVES_BACKEND`` overrides) or a name from
    ``pyobjectives.backends.PRIORITY``; an explicit backend raises when it
    cannot run the call instead of falling back.

    Returns ``(out_h [B, Lq, H, D], out_g [B, P, H, D] or None)`` in q's dtype.

    Example (T5 encoder self-attention, HF's ``[B, H, L, D]`` projections)::

        out, _ = two_stream_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      key_padding_mask=attention_mask == 0, t5_bias=table.weight,
                                      t5_num_buckets=32, t5_max_distance=128, scale=1.0,
                                      content_sees_self=False, empty_rows="uniform")
    """
    x = check.tensor("q", q, [("B", None), ("Lq", None), ("H", None), ("D", None)], kind="float")
    B, Lq, H, D = x.shape
    if D == 0:
        raise ValueError(f"q must have a head dimension D >= 1, got shape {tuple(x.shape)}")
    dev, dt = x.device, x.dtype
    floats = dict(kind="float", device=dev, dtype=dt)
    ints = dict(kind="int", device=dev)
    bools = dict(kind="bool", device=dev)
    check.tensor("k", k, [("B", B), ("Lk", None), ("H", H), ("D", D)], **floats)
    Lk = k.shape[1]
    check.flag("causal", causal)
    check.flag("content_sees_self", content_sees_self)
    if Lk < Lq:
        positional = [name for name, on in (("r", r is not None), ("t5_bias", t5_bias is not None),
                                            ("causal=True", causal), ("content_sees_self=True", content_sees_self))
                      if on]
        if positional:
            raise ValueError(f"k must have Lk >= Lq (Lk = M + Lq with M memory positions) when query and key "
                             f"positions are related ({', '.join(positional)}), got Lk={Lk} < Lq={Lq}; "
                             f"cross-attention with shorter keys needs r=None, t5_bias=None, causal=False and "
                             f"content_sees_self=False")
    check.tensor("v", v, [("B", B), ("Lk", Lk), ("H", H), ("D", D)], **floats)
    bias_dims = [("H", H), ("D", D)]
    if r is not None:
        if not isinstance(r, torch.Tensor) or r.dim() not in (3, 4):
            raise ValueError(f"r must be a tensor of shape [R, H, D] or [B, R, H, D], got "
                             f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}")
        check.tensor("r", r, ([("B", B)] if r.dim() == 4 else []) + [("R", None), ("H", H), ("D", D)], **floats)
        if r.shape[-3] < Lk + 1:
            raise ValueError(f"r must have at least Lk + 1 = {Lk + 1} rows (row Lk is distance 0; XLNet passes "
                             f"Lk + Lq, or Lk + 1 for causal attention), got R={r.shape[-3]}")
        if r_w_bias is None or r_r_bias is None:
            raise ValueError("r (the Transformer-XL position term) needs r_w_bias [H, D] and r_r_bias [H, D]")
        r_r_bias = check.tensor("r_r_bias", r_r_bias, bias_dims, kind="float", device=dev).to(dt)
    elif r_r_bias is not None:
        raise ValueError("r_r_bias was given without r: the position bias only applies to the position term")
    if r_w_bias is not None:
        r_w_bias = check.tensor("r_w_bias", r_w_bias, bias_dims, kind="float", device=dev).to(dt)

    check.both_or_neither(q_g=q_g, target_pos=target_pos)
    if q_g is not None:
        check.tensor("q_g", q_g, [("B", B), ("P", None), ("H", H), ("D", D)], **floats)
        check.tensor("target_pos", target_pos, [("B", B), ("P", q_g.shape[1])], **ints)
        check.int_range("target_pos", target_pos, 0, Lq, allow=-1, what=" (-1 marks a padding row)")

    check.both_or_neither(q_rank=q_rank, k_rank=k_rank)
    check.optional("q_rank", q_rank, [("B", B), ("Lq", Lq)], **ints)
    check.optional("k_rank", k_rank, [("B", B), ("Lk", Lk)], **ints)
    for name, rank in (("q_rank", q_rank), ("k_rank", k_rank)):
        if rank is not None and rank.dtype in (torch.int64, torch.uint64, torch.uint32):
            check.int_range(name, rank, INT32_MIN, INT32_MAX + 1,
                            what=" (ranks are compared as int32; give -2**31 for always visible keys)")
    check.optional("attn_mask", attn_mask, [("B", B), ("Lq", Lq), ("Lk", Lk)], **bools)
    check.optional("key_padding_mask", key_padding_mask, [("B", B), ("Lk", Lk)], **bools)

    check.both_or_neither(seg_q=seg_q, seg_k=seg_k)
    check.optional("seg_q", seg_q, [("B", B), ("Lq", Lq)], **ints)
    check.optional("seg_k", seg_k, [("B", B), ("Lk", Lk)], **ints)
    check.optional("seg_diff", seg_diff, [("B", B), ("Lq", Lq), ("Lk", Lk)], **bools)
    if seg_q is not None and seg_diff is not None:
        raise ValueError("give segments either as seg_q/seg_k ids or as seg_diff, not both")
    has_segments = seg_q is not None or seg_diff is not None
    if has_segments:
        if r_s_bias is None or seg_embed is None:
            raise ValueError("segment information (seg_q/seg_k or seg_diff) needs r_s_bias [H, D] and seg_embed [2, H, D]")
        r_s_bias = check.tensor("r_s_bias", r_s_bias, bias_dims, kind="float", device=dev).to(dt)
        seg_embed = check.tensor("seg_embed", seg_embed, [("2", 2), ("H", H), ("D", D)], kind="float",
                                 device=dev).to(dt)
    elif r_s_bias is not None or seg_embed is not None:
        raise ValueError("r_s_bias / seg_embed were given without segment information (seg_q/seg_k or seg_diff)")

    if t5_bias is not None:
        check.flag("t5_bidirectional", t5_bidirectional)
        check.number("t5_num_buckets", t5_num_buckets, low=4 if t5_bidirectional else 2, integer=True)
        exact = t5_num_buckets // (4 if t5_bidirectional else 2)
        check.number("t5_max_distance", t5_max_distance, low=exact, low_open=True, integer=True)
        t5_bias = check.tensor("t5_bias", t5_bias, [("num_buckets", t5_num_buckets), ("H", H)], kind="float",
                               device=dev).to(dt)
    if scale is not None:
        check.number("scale", scale)
    check.number("dropout_p", dropout_p, low=0.0, high=1.0)
    check.choice("empty_rows", empty_rows, EMPTY_ROWS)
    check.choice("backend", backend, BACKEND_NAMES)
    seed = _seed(seed) if dropout_p > 0 else None

    inputs = dict(q=q, k=k, v=v, r=r, r_w_bias=r_w_bias, r_r_bias=r_r_bias, q_g=q_g, target_pos=target_pos,
                  q_rank=q_rank, k_rank=k_rank, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                  causal=causal, seg_q=seg_q, seg_k=seg_k, seg_diff=seg_diff, r_s_bias=r_s_bias,
                  seg_embed=seg_embed, t5_bias=t5_bias, t5_num_buckets=t5_num_buckets,
                  t5_max_distance=t5_max_distance, t5_bidirectional=bool(t5_bidirectional),
                  content_sees_self=content_sees_self, scale=scale,
                  dropout_p=float(dropout_p), seed=seed, empty_rows=empty_rows)
    _, impl = resolve("two_stream_attention", backend, inputs)
    return impl(**inputs)


def rtd_loss(logits_or_hidden, corrupted_ids, original_ids, attention_mask=None, *, loss_weight=1.0,
             reduction="mean", head_weight=None, head_bias=None, return_stats=False, backend="auto"):
    """ELECTRA's replaced-token-detection loss (BCE with logits), labels derived from the ids.

    ::

        label_t = corrupted_ids[t] != original_ids[t]
        loss_t  = softplus(z_t) - label_t * z_t
        mean:     loss_weight * sum_t(mask_t * loss_t) / sum_t(mask_t)   (0.0 with no real token)

    Shapes: ``logits_or_hidden`` is the logits ``[*]`` (any shape, e.g. ``[B, L]``)
    or, with ``head_weight [Dd]`` (and optional ``head_bias []``), the
    discriminator's last hidden state ``[*, Dd]`` from which ``z = hidden @
    head_weight + head_bias`` (the fused head). ``corrupted_ids``,
    ``original_ids`` are int ``[*]``; ``attention_mask`` ``[*]`` (nonzero = real
    token) defaults to all real.

    ``reduction``: "mean" (token mean over the batch), "sum", or "none" (``[*]``,
    zero at padding). ``return_stats=True`` returns ``(loss, stats)`` with 0-dim
    tensors ``accuracy``, ``precision``, ``recall`` (of "replaced", prediction
    ``z > 0``), ``replaced`` and ``tokens`` over real tokens.
    """
    x = logits_or_hidden
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"logits_or_hidden must be a torch.Tensor, got {type(x).__name__}")
    dev = x.device
    if head_weight is not None:
        if x.dim() < 1:
            raise ValueError("logits_or_hidden must be [*, Dd] hidden states when head_weight is given")
        lead = tuple(x.shape[:-1])
        Dd = x.shape[-1]
        if Dd == 0:
            raise ValueError(f"logits_or_hidden must be hidden states [*, Dd] with Dd >= 1 when head_weight is "
                             f"given, got shape {tuple(x.shape)}")
        ids = corrupted_ids
        if isinstance(ids, torch.Tensor) and x.shape == ids.shape:
            raise ValueError(f"logits_or_hidden must have shape [*, Dd] (hidden states) when head_weight is given, "
                             f"got {tuple(x.shape)}, the shape of corrupted_ids: logits need no head_weight")
        check.tensor("logits_or_hidden", x, [("*", s) for s in lead] + [("Dd", Dd)], kind="float")
        check.tensor("head_weight", head_weight, [("Dd", Dd)], kind="float", device=dev)
        check.optional("head_bias", head_bias, [], kind="float", device=dev)
    else:
        if head_bias is not None:
            raise ValueError("head_bias needs head_weight (the fused-head form)")
        ids = corrupted_ids
        if isinstance(ids, torch.Tensor) and x.dim() == ids.dim() + 1 and x.shape[:-1] == ids.shape:
            raise ValueError(f"logits_or_hidden has shape {tuple(x.shape)}, one dimension more than corrupted_ids "
                             f"{tuple(ids.shape)}: hidden states [*, Dd] need head_weight (the fused head) "
                             f"[Dd] = [{x.shape[-1]}]; logits must have the shape of corrupted_ids")
        lead = tuple(x.shape)
        check.tensor("logits_or_hidden", x, [("*", s) for s in lead], kind="float")
    lead_dims = [("*", s) for s in lead]
    check.tensor("corrupted_ids", corrupted_ids, lead_dims, kind="int", device=dev)
    check.tensor("original_ids", original_ids, lead_dims, kind="int", device=dev)
    check.optional("attention_mask", attention_mask, lead_dims, kind="any", device=dev)
    check.number("loss_weight", loss_weight)
    check.flag("return_stats", return_stats)
    check.choice("reduction", reduction, REDUCTIONS)
    check.choice("backend", backend, BACKEND_NAMES)
    inputs = dict(logits_or_hidden=x, corrupted_ids=corrupted_ids, original_ids=original_ids,
                  attention_mask=attention_mask, loss_weight=float(loss_weight), reduction=reduction,
                  head_weight=head_weight, head_bias=head_bias, return_stats=bool(return_stats))
    _, impl = resolve("rtd_loss", backend, inputs)
    return impl(**inputs)


def linear_cross_entropy(hidden, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", sample=False,
                         temperature=1.0, seed=None, disallow=None, backend="auto"):
    """Cross-entropy of ``hidden @ weight.T + bias`` without materializing the logits (fused backends),
    with optional Gumbel-max sampling from the same logits (ELECTRA's generator step).

    ::

        z = hidden @ weight.T + bias                       # [N, V], never stored by fused backends
        loss_n = logsumexp(z_n) - z_n[targets_n]           # rows with targets == ignore_index skipped
        sampled_n = argmax_v(z_nv / temperature + g_nv)    # g = -log(-log(u)), u = Philox(seed, n*V + v)

    Shapes: ``hidden [N, E]``, ``weight [V, E]`` (e.g. the tied embedding
    matrix), ``bias [V]``, ``targets [N]`` int in ``[0, V)`` or ``ignore_index``,
    ``disallow [N]`` int: an id per row excluded from sampling only (negative =
    none; ELECTRA's ``disallow_correct``).

    ``reduction``: "mean" over non-ignored rows (0.0 when there are none),
    "sum", or "none" (``[N]``, 0 at ignored rows). ``temperature`` (> 0) affects
    sampling only. ``seed`` (int or one-element integer CPU tensor) is drawn from
    torch's generator when None (inside the graph under torch.compile). Returns
    ``loss``, or ``(loss, sampled_ids [N] int64)`` when ``sample=True``; sampling
    carries no gradient.
    """
    h = check.tensor("hidden", hidden, [("N", None), ("E", None)], kind="float")
    N, E = h.shape
    dev, dt = h.device, h.dtype
    check.tensor("weight", weight, [("V", None), ("E", E)], kind="float", device=dev, dtype=dt)
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    check.tensor("targets", targets, [("N", N)], kind="int", device=dev)
    check.optional("bias", bias, [("V", V)], kind="float", device=dev, dtype=dt)
    check.number("ignore_index", ignore_index, integer=True)
    check.int_range("targets", targets, 0, V, allow=ignore_index, what=" (vocabulary ids, or ignore_index)")
    check.choice("reduction", reduction, REDUCTIONS)
    check.number("temperature", temperature, low=0.0, low_open=True, high=None)
    check.optional("disallow", disallow, [("N", N)], kind="int", device=dev)
    check.flag("sample", sample)
    if disallow is not None and not sample:
        raise ValueError("disallow only applies to sampling: pass sample=True")
    check.choice("backend", backend, BACKEND_NAMES)
    inputs = dict(hidden=h, weight=weight, targets=targets, bias=bias, ignore_index=int(ignore_index),
                  reduction=reduction, sample=bool(sample), temperature=float(temperature),
                  seed=_seed(seed) if sample else None, disallow=disallow)
    _, impl = resolve("linear_cross_entropy", backend, inputs)
    return impl(**inputs)
