"""Data-side masking for the permutation-LM (XLNet) and ELECTRA objectives.

Two entry points produce what the kernels consume:

* :func:`plm_ranks` samples XLNet prediction targets and a factorization order
  and returns them as O(L) *rank vectors* (``q_rank``, ``k_rank``) plus the
  list of target positions, instead of HF's dense ``[B, L, L]`` ``perm_mask``
  and one-hot ``[B, P, L]`` ``target_mapping``.
  :func:`ranks_to_dense_mask` expands ranks back into a dense mask for tests
  and for callers that need HF-style inputs.
* :func:`electra_mask` picks generator targets for ELECTRA (exact count per
  sequence, 85% ``[MASK]``) or for BERT-style MLM (Bernoulli, 80/10/10).
* :func:`t5_span_corruption` builds T5's span-corruption inputs and targets
  (``random_spans_noise_mask``, one sentinel per noise span), vectorized.

Everything here is plain PyTorch. Sampling uses ``torch`` random functions
only, so ``torch.manual_seed`` or an explicit ``torch.Generator`` makes every
result reproducible.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from . import _checks

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "ElectraMask",
    "PLMRanks",
    "T5SpanCorruption",
    "electra_mask",
    "plm_ranks",
    "ranks_to_dense_mask",
    "t5_span_corruption",
]


class PLMRanks(NamedTuple):
    """Result of :func:`plm_ranks`; see its docstring for the exact semantics.

    Fields: ``q_rank [B, L] int32``, ``k_rank [B, M+L] int32``,
    ``target_pos [B, P] int64`` (-1 = padding row), ``labels [B, P] int64``
    (-100 = padding row), ``is_target [B, L] bool`` and
    ``perm_index [B, L] int64`` (the sampled factorization order).
    """

    q_rank: torch.Tensor
    k_rank: torch.Tensor
    target_pos: torch.Tensor
    labels: torch.Tensor
    is_target: torch.Tensor
    perm_index: torch.Tensor


class ElectraMask(NamedTuple):
    """Result of :func:`electra_mask`; see its docstring.

    Fields: ``input_ids [B, L]`` (corrupted copy, input dtype),
    ``labels [B, L] int64`` (original id at targets, -100 elsewhere) and
    ``is_target [B, L] bool``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    is_target: torch.Tensor


class T5SpanCorruption(NamedTuple):
    """Result of :func:`t5_span_corruption`; see its docstring.

    Fields: ``input_ids [B, L - N + S (+1)]`` (input dtype: kept tokens, one
    sentinel per noise span, then EOS if given), ``labels [B, N + S (+1)] int64``
    (sentinel, noise span, sentinel, noise span, ..., then EOS if given) and
    ``noise_mask [B, L] bool`` (the mask used; True = noise). N = noise tokens
    per row, S = noise spans per row.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    noise_mask: torch.Tensor


# --------------------------------------------------------------------------
# argument checking


def _is_int(value) -> bool:
    # bool is an Integral subclass, but True as a length or token id is
    # almost always a bug at the call site.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value, *, minimum: int | None = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not _is_int(value):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_prob(name: str, value, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    low_ok = value > 0.0 if open_low else value >= 0.0
    if not (low_ok and value <= 1.0):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _check_ids(name: str, ids) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape [B, L], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(ids.shape)}")
    return ids


def _check_bool_mask(name: str, mask, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Accept a bool or 0/1 integer tensor of ``shape``; return it as bool on ``device``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must have dtype bool or an integer dtype, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like input_ids, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and mask.numel() and _checks.values_checkable(mask):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must contain only 0 and 1")
    return mask.to(device=device, dtype=torch.bool)


def _check_generator(generator, device: torch.device) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator must live on device type {device.type!r}, got a generator on {generator.device.type!r}"
        )
    return generator


# --------------------------------------------------------------------------
# permutation language modelling


def _local_perm_order(length: int, perm_size: int, generator) -> torch.Tensor:
    """Factorization order used by both XLNet and HF: one random permutation of
    ``perm_size`` slots, applied to every consecutive block of ``perm_size``
    positions, blocks kept in their original order.

    Position ``blk * perm_size + o`` gets order ``blk * perm_size + shuffle[o]``,
    which is what the transpose / shuffle-rows / transpose trick of both
    reference implementations computes. Exactly one ``torch.randperm`` call.
    """
    shuffle = torch.randperm(perm_size, generator=generator)
    return (torch.arange(0, length, perm_size)[:, None] + shuffle[None, :]).reshape(-1)


def _hf_sample(
    batch: int, length: int, functional: torch.Tensor, plm_probability: float, max_span_length: int, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    # The random calls and their order are load-bearing: they mirror
    # DataCollatorForPermutationLanguageModeling.torch_mask_tokens (all span
    # draws for every row first, then one randperm per row) so that the same
    # torch.manual_seed yields the same targets and order.
    chosen = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        cur = 0
        while cur < length:
            span = int(torch.randint(1, max_span_length + 1, (1,), generator=generator))
            context = int(span / plm_probability)
            start = cur + int(torch.randint(context - span + 1, (1,), generator=generator))
            chosen[b, start : start + span] = True
            cur += context
    order = torch.stack([_local_perm_order(length, length // 2, generator) for _ in range(batch)])
    return chosen & ~functional, order


def _xlnet_sample_spans(
    word_start: list[bool], goal: int | None, max_gram: int, plm_probability: float, generator
) -> torch.Tensor:
    """Port of XLNet's ``_sample_mask`` over one part of one sequence.

    ``word_start[t]`` plays the role of ``_is_start_piece``. As in the released
    XLNet code, a span starts at the first word start at or after
    ``cur + l_ctx`` and then covers exactly ``gram`` tokens (the released loop
    tests the piece at ``beg`` instead of ``end``, so every step counts as a new
    word); a span that would reach the last token ends the span phase.
    """
    n = len(word_start)
    picked = torch.zeros(n, dtype=torch.bool)
    gram_weights = 1.0 / torch.arange(1, max_gram + 1, dtype=torch.float64)
    count = 0
    cur = 0
    while cur < n and (goal is None or count < goal):
        gram = int(torch.multinomial(gram_weights, 1, generator=generator)) + 1
        if goal is not None:
            gram = min(gram, goal - count)
        context = int(gram / plm_probability)
        left = int(torch.randint(context, (1,), generator=generator))
        beg = cur + left
        while beg < n and not word_start[beg]:
            beg += 1
        end = beg + gram
        if end >= n:
            break
        picked[beg:end] = True
        count += gram
        cur = end + (context - left)
    if goal is not None and count < goal:
        # XLNet tops up with uniform draws with rejection of already-picked
        # positions; a random subset of the free positions has the same law
        # and cannot loop forever when the goal exceeds the free positions.
        free = (~picked).nonzero().flatten()
        picked[free[torch.randperm(free.numel(), generator=generator)[: goal - count]]] = True
    return picked


def _xlnet_sample(
    real: torch.Tensor,
    functional: torch.Tensor,
    word_start: torch.Tensor,
    reverse: torch.Tensor,
    parts: list[tuple[int, int]],
    perm_size: int | None,
    num_predict: int | None,
    plm_probability: float,
    max_gram: int,
    generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length = real.shape
    if num_predict is None:
        goals = [None] * len(parts)
    elif len(parts) == 1:
        goals = [num_predict]
    else:
        # XLNet's create_tfrecords gives the reused part the larger half.
        goals = [num_predict - num_predict // 2, num_predict // 2]
    is_masked = torch.zeros(batch, length, dtype=torch.bool)
    order = torch.empty(batch, length, dtype=torch.int64)
    for b in range(batch):
        for (start, stop), goal in zip(parts, goals):
            pos = real[b, start:stop].nonzero().flatten() + start
            if reverse[b]:
                # bi_data rows hold reversed text; XLNet samples them in
                # reading order, so spans start at word starts of the text.
                pos = pos.flip(0)
            picked = _xlnet_sample_spans(word_start[b, pos].tolist(), goal, max_gram, plm_probability, generator)
            is_masked[b, pos[picked]] = True
            order[b, start:stop] = start + _local_perm_order(stop - start, perm_size or stop - start, generator)
    return is_masked & ~functional, order


def _gather_targets(
    is_target: torch.Tensor, ids: torch.Tensor, num_predict: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length = is_target.shape
    counts = is_target.sum(dim=1)
    most = int(counts.max())
    if num_predict is None:
        width = most
    else:
        if most > num_predict:
            row = int(counts.argmax())
            raise ValueError(f"num_predict={num_predict} is too small: row {row} has {most} prediction targets")
        width = num_predict
    positions = torch.arange(length).expand(batch, length)
    # Non-targets get key `length` so that sorting puts targets first, in
    # increasing position order.
    target_pos = torch.where(is_target, positions, length).sort(dim=1).values[:, :width]
    if width > length:
        target_pos = torch.cat([target_pos, target_pos.new_full((batch, width - length), length)], dim=1)
    padding = target_pos >= length
    target_pos = target_pos.masked_fill(padding, -1)
    labels = ids.long().gather(1, target_pos.clamp(min=0)).masked_fill(padding, -100)
    return target_pos, labels


def plm_ranks(
    input_ids: torch.Tensor,
    *,
    special_tokens_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    style: str = "hf",
    plm_probability: float = 1 / 6,
    max_span_length: int = 5,
    mem_len: int = 0,
    num_predict: int | None = None,
    reuse_len: int | None = None,
    perm_size: int | None = None,
    word_start_mask: torch.Tensor | None = None,
    reverse: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> PLMRanks:
    """Sample XLNet permutation-LM targets and return them as O(L) rank vectors.

    Shapes (B = batch, L = sequence length, M = ``mem_len``, P = prediction rows)::

        input_ids            [B, L]      any integer dtype
        special_tokens_mask  [B, L]      bool or 0/1; 1 = functional token ([CLS], [SEP], ...)
        attention_mask       [B, L]      bool or 0/1; 1 = real token, 0 = padding
        -> q_rank            [B, L]      int32
           k_rank            [B, M + L]  int32
           target_pos        [B, P]      int64, increasing, padded with -1
           labels            [B, P]      int64, input_ids[target_pos], -100 on padding rows
           is_target         [B, L]      bool
           perm_index        [B, L]      int64, sampled factorization order

    **Visibility contract** (the kernel's rank mask, spec "Visibility", rule 1).
    Query-stream row ``p`` (the token at ``i = target_pos[p]``, ``q_rank[i]``)
    sees key ``j`` in ``[0, M + L)`` iff ``k_rank[j] < q_rank[i]``. The content
    stream row ``i`` sees key ``j`` iff ``k_rank[j] < q_rank[i]`` or
    ``j == M + i`` (a token's content always sees itself). Memory keys
    (``j < M``) have ``k_rank = INT32_MIN`` and are visible to every row.
    :func:`ranks_to_dense_mask` expands the rule into a dense ``[B, L, M+L]``
    mask. All outputs are on ``input_ids.device``; sampling itself runs on the
    host (it is a short per-row loop, as in both reference pipelines), so
    ``generator`` must be a CPU generator.

    Padding. Positions equal to ``pad_token_id`` and positions where
    ``attention_mask`` is 0 are never targets and count as functional tokens.
    If ``attention_mask`` is given, the key padding is also *folded into the
    ranks*: padded keys get ``k_rank = INT32_MAX`` and are masked for every row
    (except a content row's own position), so no separate key-padding mask is
    needed. ``pad_token_id`` alone does not fold; pass ``attention_mask`` (or a
    key-padding mask to the kernel) for that.

    ``style="hf"`` reproduces ``transformers``'
    ``DataCollatorForPermutationLanguageModeling.torch_mask_tokens``:

    * Spans: for each row, starting at ``cur = 0`` and while ``cur < L``, draw
      ``span = torch.randint(1, max_span_length + 1, (1,))``, set
      ``context = int(span / plm_probability)``, draw the span start
      ``cur + torch.randint(context - span + 1, (1,))``, mark ``span`` tokens
      (clipped at L) and advance ``cur`` by ``context``. Marked special and
      padding tokens are then dropped. Spans ignore padding, like the collator.
    * Order: per row, one ``torch.randperm(L // 2)`` shuffles the offsets inside
      each half of the sequence (halves stay in order: every position of the
      first half comes before every position of the second). L must be even.
    * The random calls and their order are exactly the collator's: with the
      same ``torch.manual_seed`` (and ``generator=None``) the targets and the
      mask are identical, and the global RNG ends in the same state. With a
      ``generator`` every draw uses it and the global RNG is untouched.
    * Ranks. The collator's mask is
      ``perm_mask[i, j] = (order'[i] <= order'[j]) & is_target[j]``, with
      ``order'`` = ``perm_index`` except -1 for plain (non-target,
      non-functional) tokens; note the ``is_target[j]`` is on the *key*
      (the collator's 1-D mask broadcasts along columns). Equivalently:
      ``k_rank[j] = perm_index[j]`` for targets and -1 for every other key
      (always visible); ``q_rank[i] = perm_index[i]`` for targets and
      functional tokens, 0 for plain tokens (they see every non-target and no
      target). ``ranks_to_dense_mask(q_rank, k_rank)`` equals the collator's
      ``perm_mask`` exactly; it is used as HF's ``attn_mask_g`` with
      ``target_mapping`` = identity, i.e. all L rows are query rows there.
      The collator also overwrites targets with ``[MASK]`` in the input;
      do ``input_ids.masked_fill(is_target, mask_token_id)`` for that.

    ``style="xlnet"`` follows the original pipeline (zihangdai/xlnet,
    ``data_utils.py``: ``_sample_mask`` in preprocessing, ``_local_perm`` and
    the two-part ``perm_mask`` of ``get_input_fn``'s parser):

    * Parts. With ``reuse_len`` the row is split into ``[0, reuse_len)`` (the
      part reused as memory by the next segment) and ``[reuse_len, L)``; each is
      sampled and permuted independently, and the first part never sees the
      second while the second sees all of the first. Without ``reuse_len`` the
      whole row is one part.
    * Targets (``_sample_mask``, per part, over its real tokens): n-gram size
      ``gram`` with probability proportional to ``1 / gram`` on
      ``1..max_span_length`` (XLNet's ``max_gram``); context
      ``int(gram / plm_probability)`` (XLNet: ``gram * mask_alpha //
      mask_beta``; the default 1/6 is XLNet's alpha=6, beta=1); a left context
      drawn uniformly; the span starts at the next word start
      (``word_start_mask``, default: every token starts a word) and covers
      ``gram`` tokens, exactly as the released code behaves. With
      ``num_predict`` the parts aim at ``num_predict - num_predict // 2`` and
      ``num_predict // 2`` targets (or ``num_predict`` for one part), grams
      are cut to the remaining goal, and missing targets are topped up with
      uniformly chosen free positions. As in XLNet, a pick that lands on a
      special token is dropped afterwards, so a row may end with fewer than
      ``num_predict`` targets; ``target_pos`` is then padded.
    * Order: ``_local_perm`` with ``perm_size`` (default: the part's length,
      i.e. a full permutation): one permutation of ``perm_size`` slots applied
      to every block of ``perm_size`` positions of the part.
    * Ranks: with XLNet's ``rev_index`` (-1 for plain tokens, the local order
      for targets and functional tokens) ``k_rank = rev_index`` and
      ``q_rank = rev_index`` for targets, ``rev_index + 1`` otherwise. So plain
      tokens get ``q_rank = 0`` (see only plain tokens) and a functional token
      sees up to and including itself; the query-stream mask equals XLNet's
      ``(self_rev_index[i] <= rev_index[j]) & masked_or_func[j]``. The second
      part's ranks are shifted by ``reuse_len + 1``, which reproduces the
      block structure of the two-part ``perm_mask`` exactly.
    * ``reverse`` ([B] bool) marks bi_data rows that hold reversed text: their
      spans are sampled from the far end, as ``_sample_mask(reverse=True)``.

    Simplifications against XLNet (documented rather than hidden): random
    numbers come from ``torch`` (the original used numpy for targets and
    TensorFlow for the order), so only the distribution is reproduced, not the
    draws; the top-up draws a random subset instead of rejection sampling
    (same law); padding, absent from XLNet's pretraining data, is excluded
    from sampling and treated as functional; a target goal larger than a
    part's real tokens takes them all instead of looping forever.

    Args:
        input_ids: ``[B, L]`` integer token ids.
        special_tokens_mask: ``[B, L]``, 1 for functional tokens (never targets).
        attention_mask: ``[B, L]``, 1 real / 0 padding; also folds key padding
            into ``k_rank`` (see above).
        pad_token_id: id whose positions are padding (never targets).
        style: ``"hf"`` or ``"xlnet"``.
        plm_probability: ratio span/context, in (0, 1].
        max_span_length: longest span (n-gram), >= 1.
        mem_len: number of memory keys M prepended to ``k_rank`` (>= 0).
        num_predict: fixed number P of prediction rows; ValueError if a row has
            more targets. Default: the largest target count in the batch. In
            the xlnet style it is also the sampling goal.
        reuse_len: xlnet style only; length of the first part, 0 < reuse_len < L.
        perm_size: xlnet style only; must divide the length of every part.
        word_start_mask: xlnet style only; ``[B, L]``, 1 where a word starts.
        reverse: xlnet style only; ``[B]`` bool, rows sampled from the end.
        generator: CPU ``torch.Generator`` used for every draw.

    Returns:
        :class:`PLMRanks` ``(q_rank, k_rank, target_pos, labels, is_target,
        perm_index)``.

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: a shape, range or style-specific constraint is violated
            (odd L in the hf style, xlnet-only arguments in the hf style,
            ``num_predict`` exceeded, ...).
    """
    input_ids = _check_ids("input_ids", input_ids)
    device = input_ids.device
    ids = input_ids.detach().cpu()
    batch, length = ids.shape
    if style not in ("hf", "xlnet"):
        raise ValueError(f"style must be 'hf' or 'xlnet', got {style!r}")
    special = _check_bool_mask("special_tokens_mask", special_tokens_mask, ids.shape, torch.device("cpu"))
    attn = _check_bool_mask("attention_mask", attention_mask, ids.shape, torch.device("cpu"))
    pad_token_id = _check_int("pad_token_id", pad_token_id, allow_none=True)
    plm_probability = _check_prob("plm_probability", plm_probability, open_low=True)
    max_span_length = _check_int("max_span_length", max_span_length, minimum=1)
    mem_len = _check_int("mem_len", mem_len, minimum=0)
    num_predict = _check_int("num_predict", num_predict, minimum=1, allow_none=True)
    generator = _check_generator(generator, torch.device("cpu"))

    padding = torch.zeros(batch, length, dtype=torch.bool)
    if pad_token_id is not None:
        padding |= ids == pad_token_id
    if attn is not None:
        padding |= ~attn
    functional = padding if special is None else padding | special

    if style == "hf":
        for name, value in (
            ("reuse_len", reuse_len),
            ("perm_size", perm_size),
            ("word_start_mask", word_start_mask),
            ("reverse", reverse),
        ):
            if value is not None:
                raise ValueError(f"{name} is only used with style='xlnet'; pass None for style='hf'")
        if length % 2:
            raise ValueError(
                f"input_ids: style='hf' needs an even sequence length L (the order permutes the two halves "
                f"of L // 2 positions alike, as the collator does), got L={length}"
            )
        is_target, order = _hf_sample(batch, length, functional, plm_probability, max_span_length, generator)
        rev = torch.where(is_target | functional, order, -1)
        k_local = torch.where(is_target, order, -1)
        q_local = rev.clamp(min=0)
    else:
        reuse_len = _check_int("reuse_len", reuse_len, minimum=1, allow_none=True)
        if reuse_len is not None and reuse_len >= length:
            raise ValueError(f"reuse_len must be < L={length}, got {reuse_len}")
        parts = [(0, length)] if reuse_len is None else [(0, reuse_len), (reuse_len, length)]
        perm_size = _check_int("perm_size", perm_size, minimum=1, allow_none=True)
        if perm_size is not None:
            for start, stop in parts:
                if (stop - start) % perm_size:
                    raise ValueError(
                        f"perm_size={perm_size} must divide the length of every part, got a part "
                        f"[{start}, {stop}) of length {stop - start}"
                    )
        word_start = _check_bool_mask("word_start_mask", word_start_mask, ids.shape, torch.device("cpu"))
        if word_start is None:
            word_start = torch.ones(batch, length, dtype=torch.bool)
        if reverse is None:
            reverse_rows = torch.zeros(batch, dtype=torch.bool)
        else:
            if not isinstance(reverse, torch.Tensor) or reverse.dtype != torch.bool:
                got = reverse.dtype if isinstance(reverse, torch.Tensor) else type(reverse).__name__
                raise TypeError(f"reverse must be a bool torch.Tensor of shape [B] or None, got {got}")
            if reverse.shape != (batch,):
                raise ValueError(f"reverse must have shape [B]=({batch},), got {tuple(reverse.shape)}")
            reverse_rows = reverse.cpu()
        is_target, order = _xlnet_sample(
            ~padding,
            functional,
            word_start,
            reverse_rows,
            parts,
            perm_size,
            num_predict,
            plm_probability,
            max_span_length,
            generator,
        )
        in_second = torch.arange(length) >= (reuse_len if reuse_len is not None else length)
        part_start = torch.where(in_second, reuse_len or 0, 0)
        rev = torch.where(is_target | functional, order - part_start, -1)
        self_rev = torch.where(is_target, rev, rev + 1)
        # Queries of the first part reach rank reuse_len at most and plain keys
        # of the second part sit at shift - 1, so shift = reuse_len + 1 hides
        # the whole second part from the first and shows the first to the
        # second, as XLNet's ones/zeros blocks do.
        shift = torch.where(in_second, (reuse_len or 0) + 1, 0)
        k_local = rev + shift
        q_local = self_rev + shift

    if attn is not None:
        k_local = k_local.masked_fill(~attn, INT32_MAX)
    k_rank = torch.cat([torch.full((batch, mem_len), INT32_MIN, dtype=torch.int64), k_local], dim=1)
    target_pos, labels = _gather_targets(is_target, ids, num_predict)
    return PLMRanks(
        q_rank=q_local.to(device=device, dtype=torch.int32),
        k_rank=k_rank.to(device=device, dtype=torch.int32),
        target_pos=target_pos.to(device),
        labels=labels.to(device),
        is_target=is_target.to(device),
        perm_index=order.to(device),
    )


def ranks_to_dense_mask(
    q_rank: torch.Tensor, k_rank: torch.Tensor, *, content: bool = False, mem_len: int = 0
) -> torch.Tensor:
    """Expand rank vectors into a dense boolean mask, True = masked.

    Shapes::

        q_rank  [B, Lq]  integer
        k_rank  [B, Lk]  integer
        ->      [B, Lq, Lk] bool

    ``out[b, i, j] = not (k_rank[b, j] < q_rank[b, i])``: the query-stream mask,
    in the layout of HF's ``perm_mask`` (``[batch, query, key]``, 1 = cannot
    attend). With ``content=True`` the content-stream mask is returned instead:
    the diagonal ``j == mem_len + i`` is made visible (HF's ``non_tgt_mask``),
    which requires ``Lk == mem_len + Lq``. ``mem_len`` is only used for that
    diagonal; memory keys carry ``INT32_MIN`` ranks and need no special case.

    The result is ``B * Lq * Lk`` bytes: meant for tests and for callers that
    must feed HF-style dense masks, not for the kernels.

    Raises:
        TypeError: non-tensor or non-integer ranks, non-bool ``content``.
        ValueError: shapes that are not ``[B, L]``, mismatched batch, bad
            ``mem_len``.
    """
    q_rank = _check_ids("q_rank", q_rank)
    k_rank = _check_ids("k_rank", k_rank)
    if q_rank.shape[0] != k_rank.shape[0] or q_rank.device != k_rank.device:
        raise ValueError(
            f"q_rank and k_rank must share batch size and device, got {tuple(q_rank.shape)} on {q_rank.device} "
            f"and {tuple(k_rank.shape)} on {k_rank.device}"
        )
    if not isinstance(content, bool):
        raise TypeError(f"content must be a bool, got {type(content).__name__}")
    mem_len = _check_int("mem_len", mem_len, minimum=0)
    q_len, k_len = q_rank.shape[1], k_rank.shape[1]
    masked = ~(k_rank[:, None, :] < q_rank[:, :, None])
    if content:
        if k_len != mem_len + q_len:
            raise ValueError(
                f"content=True needs k_rank of length mem_len + Lq = {mem_len} + {q_len}, got Lk={k_len}"
            )
        rows = torch.arange(q_len, device=q_rank.device)[:, None]
        cols = torch.arange(k_len, device=q_rank.device)[None, :]
        masked &= cols != rows + mem_len
    elif mem_len > k_len:
        raise ValueError(f"mem_len must be <= Lk={k_len}, got {mem_len}")
    return masked


# --------------------------------------------------------------------------
# ELECTRA / BERT masked-LM targets


def electra_mask(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    special_tokens_mask: torch.Tensor | None = None,
    special_token_ids: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    mask_prob: float = 0.15,
    max_predictions: int | None = None,
    replace_with_mask: float | None = None,
    replace_with_random: float | None = None,
    style: str = "electra",
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> ElectraMask:
    """Choose masked-LM targets and corrupt the input, ELECTRA- or BERT-style.

    Shapes::

        input_ids            [B, L]  any integer dtype
        special_tokens_mask  [B, L]  bool or 0/1, 1 = never a target
        attention_mask       [B, L]  bool or 0/1, 1 = real token, 0 = padding
        -> input_ids         [B, L]  same dtype/device as the input, corrupted copy
           labels            [B, L]  int64, original id at targets, -100 elsewhere
           is_target         [B, L]  bool

    Candidates (both styles): real tokens (``attention_mask`` 1, or every
    token without it) that are not flagged by ``special_tokens_mask``, whose
    id is not in ``special_token_ids`` (e.g. [CLS], [SEP], [PAD]) and that are
    not already ``mask_token_id``.

    ``style="electra"`` (default; google-research/electra ``pretrain_helpers.mask``
    as fixed by the objective's spec):

    * Per row exactly ``n = max(1, min(max_predictions, round(num_real *
      mask_prob)))`` targets, uniformly without replacement among the
      candidates (all candidates if there are fewer than n). ``num_real`` is
      the row's ``attention_mask`` sum (L without a mask), specials included.
      The product is taken in float32 and rounded half to even, as ELECTRA's
      TensorFlow code does (190 tokens x 0.15 gives 29, where
      float64 or Python's ``round`` give 28). ``max_predictions``
      None means no cap (ELECTRA's default is
      ``int((mask_prob + 0.005) * max_seq_length)``). ELECTRA's TensorFlow
      code draws positions *with* replacement and may lose some to
      collisions; here the count is exact.
    * Each target independently becomes ``[MASK]`` with probability
      ``replace_with_mask`` (default 0.85), as ELECTRA's per-position uniform
      draw; so the fraction is 85% in expectation, not exactly. The others
      keep their token (``replace_with_random`` defaults to 0).

    ``style="bert"`` (HF ``DataCollatorForLanguageModeling.torch_mask_tokens``):

    * Each candidate is a target with probability ``mask_prob`` (a Bernoulli
      draw over the whole ``[B, L]`` grid, non-candidates at probability 0).
    * Targets become ``[MASK]`` with probability ``replace_with_mask``
      (default 0.8), otherwise a token drawn uniformly from
      ``[0, vocab_size)`` with probability ``replace_with_random`` (default
      0.1; ``vocab_size`` is then required), otherwise they stay unchanged.
    * The random calls match the collator's (bernoulli, bernoulli, bernoulli,
      randint over ``[B, L]``), so with the same seed and the same special
      mask (HF marks [PAD] as special) the output is identical.

    Both styles draw from ``generator`` if given (it must be on
    ``input_ids.device``), else from the global RNG of that device.

    Args:
        input_ids: ``[B, L]`` token ids.
        mask_token_id: id of ``[MASK]`` (>= 0).
        special_tokens_mask: ``[B, L]``, 1 for tokens that are never targets.
        special_token_ids: ids that are never targets, wherever they occur.
        attention_mask: ``[B, L]``, 1 real / 0 padding.
        mask_prob: target rate in [0, 1].
        max_predictions: electra style: cap on targets per row (>= 1).
        replace_with_mask: probability that a target becomes ``[MASK]``.
        replace_with_random: probability that a target becomes a random token.
        style: ``"electra"`` or ``"bert"``.
        vocab_size: random-token range; required if ``replace_with_random > 0``.
        generator: ``torch.Generator`` for every draw.

    Returns:
        :class:`ElectraMask` ``(input_ids, labels, is_target)``.

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: a shape or range is violated, probabilities sum above 1,
            ``vocab_size`` missing, ``max_predictions`` with the bert style.
    """
    input_ids = _check_ids("input_ids", input_ids)
    device = input_ids.device
    batch, length = input_ids.shape
    if style not in ("electra", "bert"):
        raise ValueError(f"style must be 'electra' or 'bert', got {style!r}")
    mask_token_id = _check_int("mask_token_id", mask_token_id, minimum=0)
    special = _check_bool_mask("special_tokens_mask", special_tokens_mask, input_ids.shape, device)
    attn = _check_bool_mask("attention_mask", attention_mask, input_ids.shape, device)
    mask_prob = _check_prob("mask_prob", mask_prob)
    max_predictions = _check_int("max_predictions", max_predictions, minimum=1, allow_none=True)
    if max_predictions is not None and style == "bert":
        raise ValueError("max_predictions is only used with style='electra'; pass None for style='bert'")
    if replace_with_mask is None:
        replace_with_mask = 0.85 if style == "electra" else 0.8
    if replace_with_random is None:
        replace_with_random = 0.0 if style == "electra" else 0.1
    replace_with_mask = _check_prob("replace_with_mask", replace_with_mask)
    replace_with_random = _check_prob("replace_with_random", replace_with_random)
    if replace_with_mask + replace_with_random > 1.0:
        raise ValueError(
            f"replace_with_mask + replace_with_random must be <= 1, got {replace_with_mask} + {replace_with_random}"
        )
    vocab_size = _check_int("vocab_size", vocab_size, minimum=1, allow_none=True)
    if replace_with_random > 0.0 and vocab_size is None:
        raise ValueError(f"vocab_size is required when replace_with_random > 0 (got {replace_with_random})")
    generator = _check_generator(generator, device)

    real = attn if attn is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
    candidates = real & (input_ids != mask_token_id)
    if special is not None:
        candidates &= ~special
    if special_token_ids is not None:
        if isinstance(special_token_ids, (str, bytes, torch.Tensor)) or not isinstance(special_token_ids, Iterable):
            got = type(special_token_ids).__name__
            raise TypeError(f"special_token_ids must be a sequence of ints or None, got {got}")
        special_token_ids = list(special_token_ids)
        if not all(_is_int(t) for t in special_token_ids):
            raise TypeError(f"special_token_ids must contain only ints, got {special_token_ids!r}")
        # compared one by one: a tensor of the ids on the device would be a host-to-device copy per call
        for token in special_token_ids:
            candidates &= input_ids != token

    if style == "electra":
        # float32 on purpose: ELECTRA rounds a float32 product, and float64
        # lands some rows on the other side of a half (190 x 0.15: 28.500001
        # in float32 -> 29, exactly 28.5 in float64 -> 28 by half-to-even).
        num_real = real.sum(dim=1).to(torch.float32)
        n = torch.round(num_real * mask_prob).to(torch.int64)
        if max_predictions is not None:
            n = n.clamp(max=max_predictions)
        n = n.clamp(min=1)
        # A uniform random key per position and the n smallest keys among the
        # candidates give a uniform n-subset; non-candidates sort last.
        keys = torch.rand(batch, length, generator=generator, device=device).masked_fill(~candidates, 2.0)
        order = keys.argsort(dim=1)
        place = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=device).expand(batch, length))
        is_target = candidates & (place < n[:, None])
    else:
        rate = torch.full((batch, length), mask_prob, device=device).masked_fill(~candidates, 0.0)
        is_target = torch.bernoulli(rate, generator=generator).bool()

    replaced = torch.bernoulli(torch.full((batch, length), replace_with_mask, device=device), generator=generator)
    replaced = replaced.bool() & is_target
    corrupted = input_ids.masked_fill(replaced, mask_token_id)
    if replace_with_mask < 1.0 and replace_with_random > 0.0:
        # Conditional on "not [MASK]"; min() guards 0.2 / (1 - 0.8) landing a
        # hair above 1 in floating point.
        rate = min(1.0, replace_with_random / (1.0 - replace_with_mask))
        randomized = torch.bernoulli(torch.full((batch, length), rate, device=device), generator=generator)
        randomized = randomized.bool() & is_target & ~replaced
        words = torch.randint(vocab_size, (batch, length), generator=generator, device=device)
        corrupted = torch.where(randomized, words.to(corrupted.dtype), corrupted)
    labels = input_ids.long().masked_fill(~is_target, -100)
    return ElectraMask(input_ids=corrupted, labels=labels, is_target=is_target)


# --------------------------------------------------------------------------
# T5 span corruption


def _t5_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` of T5's ``random_spans_noise_mask``.

    Computed in float32 and rounded half to even, as T5's TensorFlow code does
    (``tf.math.round`` of a float32 product / quotient).
    """
    f32 = torch.float32
    num_noise = int(torch.round(torch.tensor(length, dtype=f32) * torch.tensor(noise_density, dtype=f32)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(torch.round(torch.tensor(num_noise, dtype=f32) / torch.tensor(mean_noise_span_length, dtype=f32)))
    return num_noise, max(num_spans, 1)


def _random_segmentation(batch: int, num_items: int, num_segments: int, generator, device) -> torch.Tensor:
    """T5's ``_random_segmentation`` for ``batch`` rows at once: ``[batch, num_segments]``
    positive lengths summing to ``num_items``, every composition equally likely.

    T5 shuffles ``num_segments - 1`` ones among ``num_items - 1`` slots, prepends a
    0 and takes the cumsum as segment ids. Here the ones go to the slots holding
    the ``num_segments - 1`` smallest of ``num_items - 1`` uniform float64 keys
    (a uniform subset, i.e. the same law as the shuffle), one draw per row.
    """
    first_in_segment = torch.zeros(batch, num_items, dtype=torch.int64, device=device)
    if num_segments > 1:
        keys = torch.rand(batch, num_items - 1, generator=generator, device=device, dtype=torch.float64)
        chosen = keys.argsort(dim=1)[:, : num_segments - 1] + 1  # slot s of T5's shuffle = item s + 1
        first_in_segment.scatter_(1, chosen, 1)
    segment_id = first_in_segment.cumsum(dim=1)
    lengths = torch.zeros(batch, num_segments, dtype=torch.int64, device=device)
    return lengths.scatter_add_(1, segment_id, torch.ones_like(segment_id))


def _random_spans_noise_mask(
    batch: int, length: int, num_noise: int, num_spans: int, generator, device
) -> torch.Tensor:
    """T5's ``random_spans_noise_mask`` for ``batch`` rows: ``[batch, length]`` bool."""
    noise_lengths = _random_segmentation(batch, num_noise, num_spans, generator, device)
    nonnoise_lengths = _random_segmentation(batch, length - num_noise, num_spans, generator, device)
    interleaved = torch.stack([nonnoise_lengths, noise_lengths], dim=2).reshape(batch, 2 * num_spans)
    span_starts = interleaved.cumsum(dim=1)[:, :-1]  # all < length: the last span is non-empty
    indicator = torch.zeros(batch, length, dtype=torch.int64, device=device)
    indicator.scatter_add_(1, span_starts, torch.ones_like(span_starts))
    return indicator.cumsum(dim=1) % 2 == 1


def _compact(values: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, the entries of ``values`` where ``keep`` holds, in order; every row
    keeps exactly ``width`` entries. A scatter into a spare last column, so no
    host synchronisation."""
    batch = values.shape[0]
    slot = torch.where(keep, keep.long().cumsum(dim=1) - 1, width)
    out = values.new_zeros(batch, width + 1)
    return out.scatter_(1, slot, values)[:, :width]


def t5_span_corruption(
    input_ids: torch.Tensor,
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    sentinel_start_id: int,
    eos_token_id: int | None = None,
    noise_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> T5SpanCorruption:
    """T5's span corruption (google-research/text-to-text-transfer-transformer,
    ``t5/data/preprocessors.py``: ``random_spans_noise_mask``,
    ``noise_span_to_unique_sentinel``, ``nonnoise_span_to_unique_sentinel``).

    Shapes (N = noise tokens per row, S = noise spans per row)::

        input_ids       [B, L]              any integer dtype, L >= 2
        noise_mask      [B, L]              optional, bool or 0/1, True = noise
        -> input_ids    [B, L - N + S (+1)] input dtype, on input_ids.device
           labels       [B, N + S (+1)]     int64
           noise_mask   [B, L]              bool, the mask used

    (+1: ``eos_token_id`` appended to both when given.)

    **Random mask** (``noise_mask=None``), per row exactly as T5's
    ``random_spans_noise_mask``: ``N = round(L * noise_density)`` clamped to
    ``[1, L - 1]`` and ``S = max(1, round(N / mean_noise_span_length))``, both
    rounded half to even from float32 arithmetic as T5's TensorFlow code does.
    The N noise tokens and the ``L - N`` kept tokens are each cut into S
    non-empty spans, every segmentation equally likely (T5's
    ``_random_segmentation``), and the spans alternate kept, noise, kept, noise,
    ...: the first token is always kept and the last is always noise. Since N
    and S depend only on L, every row has the same output lengths; for L = 568
    with the defaults (N = 85, S = 28) and an EOS, inputs have 512 tokens and
    labels 114, T5's pretraining shapes. S must not exceed ``L - N`` (T5 fails
    then too): e.g. ``noise_density=0.9`` needs a ``mean_noise_span_length``
    large enough; a ValueError says so. Only the law of T5's draws is
    reproduced, not its random stream.

    **Outputs from a mask** (random or given). A noise span is a maximal run
    of noise tokens; the k-th span of a row (k = 0, 1, ...) gets sentinel
    ``sentinel_start_id - k`` (``<extra_id_k>``: T5's sentinels count down
    from the top of the vocabulary, e.g. 32099, 32098, ...).

    * ``input_ids``: the row with each noise span replaced by its sentinel,
      i.e. the kept tokens plus a sentinel at each span start. This is T5's
      ``noise_span_to_unique_sentinel`` for any mask.
    * ``labels``: for each noise span in order, its sentinel followed by the
      span's tokens: ``s_0, span_0, s_1, span_1, ...``. So the k-th sentinel
      carries the same id in inputs and labels. This is T5's
      ``nonnoise_span_to_unique_sentinel`` whenever the mask starts with a
      kept token and ends with noise (always true for the random mask). For a
      given mask that starts with noise, the inputs begin with ``s_0`` and the
      labels still read ``s_0, span_0, ...`` (T5's function would emit
      ``span_0`` first with no sentinel and shift the pairing); for one that
      ends with kept tokens no trailing sentinel is added (T5's would add one).
      A row without noise gives its tokens unchanged and empty labels.

    A given ``noise_mask`` is used as is (``noise_density`` and
    ``mean_noise_span_length`` are still validated but unused); its rows must
    have equal N and equal S, else the outputs could not be dense and a
    ValueError says so.

    Sampling is vectorized over the batch (random float64 keys, argsort,
    scatter, cumsum) and draws from ``generator`` if given (it must be on
    ``input_ids.device``), else from the global RNG of that device: the same
    generator seed gives the same output.

    Args:
        input_ids: ``[B, L]`` token ids, L >= 2.
        noise_density: fraction of noise tokens, in (0, 1).
        mean_noise_span_length: mean noise span length, >= 1.
        sentinel_start_id: id of ``<extra_id_0>``, the highest sentinel;
            must be >= S - 1 so every sentinel id is non-negative, and must
            fit in ``input_ids``' dtype.
        eos_token_id: appended to inputs and labels when given (>= 0).
        noise_mask: ``[B, L]`` bool or 0/1 on ``input_ids.device``; replaces
            the random mask.
        generator: ``torch.Generator`` on ``input_ids.device`` for the draws.

    Returns:
        :class:`T5SpanCorruption` ``(input_ids, labels, noise_mask)``.

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: a shape, range or device is violated, S > L - N, or the
            rows of a given ``noise_mask`` differ in noise tokens or spans.
    """
    input_ids = _check_ids("input_ids", input_ids)
    device = input_ids.device
    batch, length = input_ids.shape
    if length < 2:
        raise ValueError(f"input_ids must have a sequence length L >= 2, got shape {tuple(input_ids.shape)}")
    if isinstance(noise_density, bool) or not isinstance(noise_density, numbers.Real):
        raise TypeError(f"noise_density must be a float, got {type(noise_density).__name__}")
    noise_density = float(noise_density)
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if isinstance(mean_noise_span_length, bool) or not isinstance(mean_noise_span_length, numbers.Real):
        raise TypeError(f"mean_noise_span_length must be a float, got {type(mean_noise_span_length).__name__}")
    mean_noise_span_length = float(mean_noise_span_length)
    if not 1.0 <= mean_noise_span_length < float("inf"):
        raise ValueError(f"mean_noise_span_length must be a finite number >= 1, got {mean_noise_span_length}")
    sentinel_start_id = _check_int("sentinel_start_id", sentinel_start_id, minimum=0)
    eos_token_id = _check_int("eos_token_id", eos_token_id, minimum=0, allow_none=True)
    top = torch.iinfo(input_ids.dtype).max
    for name, value in (("sentinel_start_id", sentinel_start_id), ("eos_token_id", eos_token_id)):
        if value is not None and value > top:
            raise ValueError(f"{name} must fit in input_ids' dtype {input_ids.dtype} (<= {top}), got {value}")
    if isinstance(noise_mask, torch.Tensor) and noise_mask.device != device:
        raise ValueError(f"noise_mask must be on input_ids' device {device}, got {noise_mask.device}")
    mask = _check_bool_mask("noise_mask", noise_mask, input_ids.shape, device)
    generator = _check_generator(generator, device)

    if mask is None:
        num_noise, num_spans = _t5_span_counts(length, noise_density, mean_noise_span_length)
        if num_spans > length - num_noise:
            raise ValueError(
                f"noise_density={noise_density} and mean_noise_span_length={mean_noise_span_length} give "
                f"{num_spans} noise spans for L={length}, but only {length - num_noise} non-noise tokens to "
                f"separate them (need num_spans <= L - num_noise; raise mean_noise_span_length or lower "
                f"noise_density)"
            )
        mask = _random_spans_noise_mask(batch, length, num_noise, num_spans, generator, device)
        span_start = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
    else:
        span_start = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
        noise_counts, span_counts = mask.sum(dim=1), span_start.sum(dim=1)
        n_lo, n_hi = int(noise_counts.min()), int(noise_counts.max())
        s_lo, s_hi = int(span_counts.min()), int(span_counts.max())
        if n_lo != n_hi or s_lo != s_hi:
            raise ValueError(
                f"noise_mask rows must have equal numbers of noise tokens and of noise spans to batch into dense "
                f"outputs, got noise tokens per row in [{n_lo}, {n_hi}] and noise spans per row in [{s_lo}, {s_hi}]"
            )
        num_noise, num_spans = n_lo, s_lo
    if sentinel_start_id < num_spans - 1:
        raise ValueError(
            f"sentinel_start_id must be >= num_spans - 1 = {num_spans - 1} (sentinels count down from it), "
            f"got {sentinel_start_id}"
        )

    ids = input_ids.long()
    sentinel = sentinel_start_id + 1 - span_start.long().cumsum(dim=1)  # valid at span starts
    inputs = _compact(torch.where(span_start, sentinel, ids), ~mask | span_start, length - num_noise + num_spans)
    # Labels: per position a (sentinel, token) pair; keep the sentinel at span
    # starts and the token at noise positions.
    pairs = torch.stack([sentinel, ids], dim=2).reshape(batch, 2 * length)
    keep = torch.stack([span_start, mask], dim=2).reshape(batch, 2 * length)
    labels = _compact(pairs, keep, num_noise + num_spans)
    if eos_token_id is not None:
        eos = ids.new_full((batch, 1), eos_token_id)
        inputs, labels = torch.cat([inputs, eos], dim=1), torch.cat([labels, eos], dim=1)
    return T5SpanCorruption(input_ids=inputs.to(input_ids.dtype), labels=labels, noise_mask=mask)
