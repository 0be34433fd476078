"""Tests for pyobjectives.data: PLM rank vectors and ELECTRA/BERT masking."""

import pytest
import torch

from pyobjectives.data import (
    INT32_MAX,
    INT32_MIN,
    electra_mask,
    plm_ranks,
    ranks_to_dense_mask,
)

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 6
VOCAB = 1000


class FakeTokenizer:
    """The few tokenizer members the two HF collators touch in torch_mask_tokens."""

    mask_token = "<mask>"
    mask_token_id = MASK_ID
    pad_token = "<pad>"
    pad_token_id = PAD_ID

    def get_special_tokens_mask(self, ids, already_has_special_tokens=False):
        return [int(t in (CLS_ID, SEP_ID)) for t in ids]

    def convert_tokens_to_ids(self, token):
        assert token == self.mask_token
        return MASK_ID

    def __len__(self):
        return VOCAB


@pytest.fixture(scope="module")
def collators():
    dc = pytest.importorskip("transformers.data.data_collator")
    tok = FakeTokenizer()
    return (
        dc.DataCollatorForPermutationLanguageModeling(tokenizer=tok),
        dc.DataCollatorForLanguageModeling(tokenizer=tok),
    )


def make_batch(seed, batch, length, pad=True):
    """Rows [CLS] w ... w [SEP] [PAD]...; returns ids, special mask, attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (batch, length), generator=g)
    if pad:
        lengths = torch.randint(max(2, length // 2), length + 1, (batch,), generator=g)
    else:
        lengths = torch.full((batch,), length)
    for b, n in enumerate(lengths.tolist()):
        ids[b, 0] = CLS_ID
        ids[b, n - 1] = SEP_ID
        ids[b, n:] = PAD_ID
    attn = torch.arange(length)[None, :] < lengths[:, None]
    special = (ids == CLS_ID) | (ids == SEP_ID)
    return ids, special, attn


def gen(seed):
    return torch.Generator().manual_seed(seed)


def eye_mask(batch, q_len, k_len, mem_len=0):
    rows = torch.arange(q_len)[:, None]
    cols = torch.arange(k_len)[None, :]
    return (cols == rows + mem_len).expand(batch, q_len, k_len)


def check_targets(out, ids, expected_is_target):
    """target_pos/labels are the sorted target positions and their ids, -1/-100 padded."""
    assert out.target_pos.dtype == torch.int64 and out.labels.dtype == torch.int64
    for b in range(ids.shape[0]):
        pos = expected_is_target[b].nonzero().flatten()
        n = pos.numel()
        assert torch.equal(out.target_pos[b, :n], pos)
        assert bool((out.target_pos[b, n:] == -1).all())
        assert torch.equal(out.labels[b, :n], ids[b, pos])
        assert bool((out.labels[b, n:] == -100).all())


# --------------------------------------------------------------------------
# plm_ranks, style="hf"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("length,pad", [(8, False), (12, True), (30, True), (64, True)])
def test_hf_style_matches_collator(collators, seed, length, pad):
    plm_collator, _ = collators
    ids, special, _ = make_batch(100 + seed, 4, length, pad)
    torch.manual_seed(seed)
    hf_inputs, hf_perm, _, hf_labels = plm_collator.torch_mask_tokens(ids.clone())
    hf_next = torch.rand(8)

    torch.manual_seed(seed)
    out = plm_ranks(ids, special_tokens_mask=special, pad_token_id=PAD_ID)
    # Same draws in the same order leave the global RNG in the same state.
    assert torch.equal(torch.rand(8), hf_next)

    assert out.q_rank.dtype == torch.int32 and out.k_rank.dtype == torch.int32
    assert out.q_rank.shape == (4, length) and out.k_rank.shape == (4, length)
    assert torch.equal(ranks_to_dense_mask(out.q_rank, out.k_rank), hf_perm.bool())
    assert torch.equal(out.is_target, hf_labels != -100)
    assert torch.equal(ids.masked_fill(out.is_target, MASK_ID), hf_inputs)
    check_targets(out, ids, hf_labels != -100)
    if length >= 30:  # short rows can legitimately draw no target at all
        assert out.is_target.any()


def test_hf_style_attention_mask_folds_key_padding(collators):
    plm_collator, _ = collators
    ids, special, attn = make_batch(7, 6, 40)
    torch.manual_seed(11)
    _, hf_perm, _, hf_labels = plm_collator.torch_mask_tokens(ids.clone())
    torch.manual_seed(11)
    out = plm_ranks(ids, special_tokens_mask=special, attention_mask=attn.long())

    assert torch.equal(out.is_target, hf_labels != -100)
    assert bool((out.k_rank[~attn] == INT32_MAX).all())
    # What HF's XLNetModel builds from perm_mask + attention_mask.
    expected = hf_perm.bool() | ~attn[:, None, :]
    assert torch.equal(ranks_to_dense_mask(out.q_rank, out.k_rank), expected)
    expected_content = expected & ~eye_mask(6, 40, 40)
    assert torch.equal(ranks_to_dense_mask(out.q_rank, out.k_rank, content=True), expected_content)


def test_hf_style_rank_values():
    ids, special, attn = make_batch(3, 8, 32)
    out = plm_ranks(ids, special_tokens_mask=special, pad_token_id=PAD_ID, generator=gen(0))
    functional = special | ~attn
    plain = ~out.is_target & ~functional
    assert bool((out.q_rank[plain] == 0).all())
    assert bool((out.k_rank[~out.is_target] == -1).all())
    assert torch.equal(out.q_rank[out.is_target], out.k_rank[out.is_target])
    assert torch.equal(out.k_rank[out.is_target], out.perm_index[out.is_target].int())
    assert torch.equal(out.q_rank[functional], out.perm_index[functional].int())
    # Halves stay in order, one shuffle of L/2 offsets shared by both halves.
    half = 16
    assert torch.equal(out.perm_index[:, :half].sort(dim=1).values, torch.arange(half).expand(8, half))
    assert torch.equal(out.perm_index[:, half:] - half, out.perm_index[:, :half])


def test_hf_style_generator_reproducible_and_global_rng_untouched():
    ids, special, _ = make_batch(5, 4, 24)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = plm_ranks(ids, special_tokens_mask=special, pad_token_id=PAD_ID, generator=gen(9))
    assert torch.equal(torch.get_rng_state(), before)
    b = plm_ranks(ids, special_tokens_mask=special, pad_token_id=PAD_ID, generator=gen(9))
    torch.manual_seed(9)
    c = plm_ranks(ids, special_tokens_mask=special, pad_token_id=PAD_ID)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_hf_style_odd_length_raises():
    with pytest.raises(ValueError, match="even sequence length"):
        plm_ranks(torch.randint(10, 50, (2, 7)))


def test_mem_len_prepends_always_visible_keys():
    ids, special, attn = make_batch(8, 3, 20)
    kwargs = dict(special_tokens_mask=special, attention_mask=attn)
    base = plm_ranks(ids, **kwargs, generator=gen(4))
    mem = plm_ranks(ids, **kwargs, mem_len=5, generator=gen(4))
    assert mem.k_rank.shape == (3, 25)
    assert bool((mem.k_rank[:, :5] == INT32_MIN).all())
    assert torch.equal(mem.k_rank[:, 5:], base.k_rank)
    assert torch.equal(mem.q_rank, base.q_rank)
    assert torch.equal(mem.target_pos, base.target_pos)
    for content in (False, True):
        dense = ranks_to_dense_mask(mem.q_rank, mem.k_rank, content=content, mem_len=5)
        assert dense.shape == (3, 20, 25)
        assert not dense[:, :, :5].any()
        assert torch.equal(dense[:, :, 5:], ranks_to_dense_mask(base.q_rank, base.k_rank, content=content))


def test_num_predict_pads_rows_and_rejects_overflow():
    ids, special, attn = make_batch(9, 5, 48)
    free = plm_ranks(ids, special_tokens_mask=special, attention_mask=attn, generator=gen(1))
    most = int(free.is_target.sum(1).max())
    assert free.target_pos.shape == (5, most)
    fixed = plm_ranks(ids, special_tokens_mask=special, attention_mask=attn, num_predict=most + 3, generator=gen(1))
    assert fixed.target_pos.shape == (5, most + 3) and fixed.labels.shape == (5, most + 3)
    assert torch.equal(fixed.target_pos[:, :most], free.target_pos)
    assert bool((fixed.target_pos[:, most:] == -1).all())
    assert bool((fixed.labels[:, most:] == -100).all())
    check_targets(fixed, ids, fixed.is_target)
    with pytest.raises(ValueError, match="num_predict"):
        plm_ranks(ids, special_tokens_mask=special, attention_mask=attn, num_predict=most - 1, generator=gen(1))


def test_num_predict_wider_than_sequence():
    ids = torch.randint(10, 50, (2, 6))
    out = plm_ranks(ids, num_predict=9, generator=gen(0))
    assert out.target_pos.shape == (2, 9)
    check_targets(out, ids, out.is_target)


def test_output_device_and_int64_labels():
    ids = torch.randint(10, 50, (2, 10), dtype=torch.int32)
    out = plm_ranks(ids, generator=gen(0))
    assert out.labels.dtype == torch.int64 and out.perm_index.dtype == torch.int64
    assert out.is_target.dtype == torch.bool
    assert all(t.device == ids.device for t in out)


# --------------------------------------------------------------------------
# plm_ranks, style="xlnet"


def xlnet_local_perm_mask(is_masked, index, functional):
    """Direct port of the perm_mask formula of XLNet's _local_perm (one part)."""
    non_func = ~functional
    non_mask = ~is_masked & non_func
    masked_or_func = ~non_mask
    rev_index = torch.where(non_mask, -1, index)
    target = masked_or_func & non_func
    self_rev_index = torch.where(target, rev_index, rev_index + 1)
    return (self_rev_index[:, None] <= rev_index[None, :]) & masked_or_func[None, :]


def xlnet_perm_mask(is_masked, index, functional, reuse_len):
    """Port of the two-part perm_mask assembly of XLNet's input parser (one row)."""
    length = is_masked.shape[0]
    if reuse_len is None:
        return xlnet_local_perm_mask(is_masked, index, functional)
    r = reuse_len
    m0 = xlnet_local_perm_mask(is_masked[:r], index[:r], functional[:r])
    m1 = xlnet_local_perm_mask(is_masked[r:], index[r:] - r, functional[r:])
    top = torch.cat([m0, torch.ones(r, length - r, dtype=torch.bool)], dim=1)
    bottom = torch.cat([torch.zeros(length - r, r, dtype=torch.bool), m1], dim=1)
    return torch.cat([top, bottom], dim=0)


@pytest.mark.parametrize(
    "reuse_len,perm_size,num_predict",
    [(None, None, None), (None, 8, 10), (16, None, None), (16, 8, 12), (16, 16, 12), (24, 4, None)],
)
def test_xlnet_style_matches_xlnet_perm_mask(reuse_len, perm_size, num_predict):
    ids, special, _ = make_batch(21, 6, 48, pad=False)
    # Functional tokens in the middle too, like XLNet's [SEP] between A and B.
    special[:, 20] = True
    out = plm_ranks(
        ids,
        special_tokens_mask=special,
        style="xlnet",
        reuse_len=reuse_len,
        perm_size=perm_size,
        num_predict=num_predict,
        generator=gen(2),
    )
    query = ranks_to_dense_mask(out.q_rank, out.k_rank)
    content = ranks_to_dense_mask(out.q_rank, out.k_rank, content=True)
    for b in range(6):
        expected = xlnet_perm_mask(out.is_target[b], out.perm_index[b], special[b], reuse_len)
        assert torch.equal(query[b], expected)
        # XLNet's non_tgt_mask: the content stream also sees itself.
        assert torch.equal(content[b], expected & ~torch.eye(48, dtype=torch.bool))
    assert not (out.is_target & special).any()
    check_targets(out, ids, out.is_target)


def test_xlnet_style_rank_values_and_parts():
    ids, special, _ = make_batch(22, 8, 64, pad=False)
    r = 32
    out = plm_ranks(ids, special_tokens_mask=special, style="xlnet", reuse_len=r, perm_size=8, generator=gen(3))
    plain = ~out.is_target & ~special
    first = torch.arange(64) < r
    shift = torch.where(first, 0, r + 1).expand(8, 64)
    assert torch.equal(out.q_rank[plain], shift[plain].int())
    assert torch.equal(out.k_rank[plain], (shift[plain] - 1).int())
    local = out.perm_index - torch.where(first, 0, r)
    assert torch.equal(out.k_rank[out.is_target], (local + shift)[out.is_target].int())
    assert torch.equal(out.q_rank[out.is_target], out.k_rank[out.is_target])
    assert torch.equal(out.q_rank[special], out.k_rank[special] + 1)

    for content in (False, True):
        dense = ranks_to_dense_mask(out.q_rank, out.k_rank, content=content)
        assert bool(dense[:, :r, r:].all())  # the reused part never sees the rest
        assert not dense[:, r:, :r].any()  # the rest sees all of the reused part
        # A plain token of the reused part sees exactly the plain tokens of it.
        for b in range(8):
            plain_rows = dense[b, :r, :r][plain[b, :r]]
            assert torch.equal(plain_rows, (~plain[b, :r]).expand_as(plain_rows))

    # _local_perm: every block of 8 is shuffled by the same permutation.
    for start, stop in ((0, r), (r, 64)):
        blocks = (out.perm_index[:, start:stop] - start).reshape(8, -1, 8)
        offsets = blocks - torch.arange(0, stop - start, 8)[None, :, None]
        assert torch.equal(offsets, offsets[:, :1].expand_as(offsets))
        assert torch.equal(offsets[:, 0].sort(dim=1).values, torch.arange(8).expand(8, 8))


def test_xlnet_style_spans_and_word_starts():
    ids = torch.randint(10, 50, (32, 60), generator=gen(5))
    word_start = torch.rand(32, 60, generator=gen(6)) < 0.6
    out = plm_ranks(ids, style="xlnet", word_start_mask=word_start, max_span_length=4, generator=gen(7))
    assert out.is_target.any()
    for b in range(32):
        t = out.is_target[b].tolist()
        assert not t[-1]  # XLNet never lets a span reach the last token
        run = 0
        for i in range(60):
            if t[i] and (i == 0 or not t[i - 1]):
                assert bool(word_start[b, i])
            run = run + 1 if t[i] else 0
            assert run <= 4


def test_xlnet_style_goal_split_between_parts():
    ids = torch.randint(10, 50, (16, 64), generator=gen(8))
    out = plm_ranks(ids, style="xlnet", reuse_len=32, num_predict=11, generator=gen(9))
    assert out.target_pos.shape == (16, 11)
    assert bool((out.is_target.sum(1) == 11).all())
    assert bool((out.is_target[:, :32].sum(1) == 6).all())  # the reused part gets n - n // 2
    assert bool((out.target_pos >= 0).all())


def test_xlnet_style_padding_and_specials():
    ids, special, attn = make_batch(23, 10, 40)
    out = plm_ranks(
        ids, special_tokens_mask=special, attention_mask=attn, style="xlnet", num_predict=6, generator=gen(1)
    )
    assert not (out.is_target & (special | ~attn)).any()
    assert bool((out.is_target.sum(1) <= 6).all())
    assert bool((out.k_rank[~attn] == INT32_MAX).all())
    # A goal above the number of real tokens takes them all instead of looping.
    short = torch.tensor([[CLS_ID, 11, 12, SEP_ID, PAD_ID, PAD_ID]])
    out = plm_ranks(short, special_tokens_mask=(short == CLS_ID) | (short == SEP_ID), pad_token_id=PAD_ID,
                    style="xlnet", num_predict=5, generator=gen(0))
    assert out.is_target.tolist() == [[False, True, True, False, False, False]]
    assert out.target_pos.tolist() == [[1, 2, -1, -1, -1]]


def test_xlnet_style_reverse_samples_from_the_end():
    ids = torch.randint(10, 50, (1, 50), generator=gen(10))
    word_start = torch.rand(1, 50, generator=gen(11)) < 0.7
    rev = plm_ranks(ids, style="xlnet", word_start_mask=word_start, reverse=torch.tensor([True]), generator=gen(12))
    fwd = plm_ranks(ids.flip(1), style="xlnet", word_start_mask=word_start.flip(1), generator=gen(12))
    assert rev.is_target.any()
    assert torch.equal(rev.is_target, fwd.is_target.flip(1))


@pytest.mark.parametrize("style", ["hf", "xlnet"])
def test_target_rate_near_plm_probability(style):
    ids = torch.randint(10, 50, (64, 128), generator=gen(13))
    out = plm_ranks(ids, style=style, generator=gen(14))
    rate = out.is_target.float().mean().item()
    assert 0.10 < rate < 0.22


# --------------------------------------------------------------------------
# ranks_to_dense_mask


def test_ranks_to_dense_mask_rule():
    q = torch.tensor([[0, 2, 5]], dtype=torch.int32)
    k = torch.tensor([[INT32_MIN, -1, 2, 4, INT32_MAX]], dtype=torch.int32)
    expected_visible = torch.tensor(
        [[[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]], dtype=torch.bool
    )
    assert torch.equal(ranks_to_dense_mask(q, k), ~expected_visible)
    content = ranks_to_dense_mask(q, k, content=True, mem_len=2)
    assert torch.equal(content, ~expected_visible & ~eye_mask(1, 3, 5, mem_len=2))
    assert not content[0, 0, 2] and not content[0, 2, 4]


# --------------------------------------------------------------------------
# plm_ranks / ranks_to_dense_mask validation

IDS = torch.randint(10, 50, (2, 8))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(input_ids=[[1, 2]]), TypeError, "input_ids"),
        (dict(input_ids=IDS.float()), TypeError, "input_ids.*integer"),
        (dict(input_ids=IDS[0]), ValueError, r"input_ids.*\[B, L\]"),
        (dict(input_ids=IDS[:, :0]), ValueError, "input_ids.*non-empty"),
        (dict(style="bert"), ValueError, "style"),
        (dict(special_tokens_mask=torch.zeros(2, 9, dtype=torch.bool)), ValueError, "special_tokens_mask.*shape"),
        (dict(special_tokens_mask=torch.zeros(2, 8)), TypeError, "special_tokens_mask.*dtype"),
        (dict(attention_mask=torch.full((2, 8), 2)), ValueError, "attention_mask.*0 and 1"),
        (dict(pad_token_id=True), TypeError, "pad_token_id"),
        (dict(plm_probability=0.0), ValueError, "plm_probability"),
        (dict(plm_probability=1.5), ValueError, "plm_probability"),
        (dict(max_span_length=0), ValueError, "max_span_length"),
        (dict(max_span_length=2.0), TypeError, "max_span_length"),
        (dict(mem_len=-1), ValueError, "mem_len"),
        (dict(num_predict=0), ValueError, "num_predict"),
        (dict(generator=1), TypeError, "generator"),
        (dict(reuse_len=4), ValueError, "reuse_len.*xlnet"),
        (dict(word_start_mask=torch.ones(2, 8, dtype=torch.bool)), ValueError, "word_start_mask.*xlnet"),
        (dict(style="xlnet", reuse_len=8), ValueError, "reuse_len"),
        (dict(style="xlnet", reuse_len=4, perm_size=3), ValueError, "perm_size"),
        (dict(style="xlnet", perm_size=0), ValueError, "perm_size"),
        (dict(style="xlnet", reverse=torch.tensor([True])), ValueError, "reverse.*shape"),
        (dict(style="xlnet", reverse=[True, False]), TypeError, "reverse"),
        (dict(style="xlnet", word_start_mask=torch.ones(8, dtype=torch.bool)), ValueError, "word_start_mask"),
    ],
)
def test_plm_ranks_validation(kwargs, exc, match):
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", IDS)
    with pytest.raises(exc, match=match):
        plm_ranks(ids, **kwargs)


def test_ranks_to_dense_mask_validation():
    q = torch.zeros(2, 4, dtype=torch.int32)
    k = torch.zeros(2, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="mem_len"):
        ranks_to_dense_mask(q, k, content=True, mem_len=1)
    with pytest.raises(ValueError, match="batch"):
        ranks_to_dense_mask(q[:1], k)
    with pytest.raises(TypeError, match="q_rank"):
        ranks_to_dense_mask(q.float(), k)
    with pytest.raises(TypeError, match="content"):
        ranks_to_dense_mask(q, k, content=1)
    with pytest.raises(ValueError, match="mem_len"):
        ranks_to_dense_mask(q, k, mem_len=7)


# --------------------------------------------------------------------------
# electra_mask


def expected_electra_count(attn, candidates, mask_prob, max_predictions):
    num_real = attn.sum(1).to(torch.float32)
    n = torch.round(num_real * torch.tensor(mask_prob, dtype=torch.float32)).long()
    if max_predictions is not None:
        n = n.clamp(max=max_predictions)
    return torch.minimum(n.clamp(min=1), candidates.sum(1))


@pytest.mark.parametrize("max_predictions", [None, 4])
@pytest.mark.parametrize("mask_prob", [0.15, 0.25])
def test_electra_exact_counts_and_labels(max_predictions, mask_prob):
    ids, _, attn = make_batch(31, 200, 48)
    ids[:, 5] = MASK_ID  # an existing [MASK] is never chosen again
    out = electra_mask(
        ids,
        mask_token_id=MASK_ID,
        special_token_ids=[CLS_ID, SEP_ID, PAD_ID],
        attention_mask=attn,
        mask_prob=mask_prob,
        max_predictions=max_predictions,
        generator=gen(0),
    )
    candidates = attn & (ids != CLS_ID) & (ids != SEP_ID) & (ids != MASK_ID)
    assert torch.equal(out.is_target.sum(1), expected_electra_count(attn, candidates, mask_prob, max_predictions))
    assert not (out.is_target & ~candidates).any()
    assert torch.equal(out.labels, torch.where(out.is_target, ids, -100))
    assert out.labels.dtype == torch.int64 and out.input_ids.dtype == ids.dtype
    assert torch.equal(out.input_ids[~out.is_target], ids[~out.is_target])
    kept = out.is_target & (out.input_ids != MASK_ID)
    assert torch.equal(out.input_ids[kept], ids[kept])  # no random replacement


def test_electra_count_rounds_in_float32_and_takes_all_when_few_candidates():
    ids = torch.randint(10, 50, (3, 200), generator=gen(1))
    attn = torch.zeros(3, 200, dtype=torch.bool)
    attn[0, :190] = True  # float32: 28.500001 -> 29; float64: 28.5 -> 28
    attn[1, :3] = True  # round(0.45) = 0, raised to the minimum of 1
    attn[2, :2] = True
    special = torch.zeros(3, 200, dtype=torch.bool)
    special[2, :2] = True  # no candidates at all
    out = electra_mask(ids, mask_token_id=MASK_ID, attention_mask=attn, special_tokens_mask=special, generator=gen(2))
    assert out.is_target.sum(1).tolist() == [29, 1, 0]


def test_electra_replacement_fraction_and_uniform_positions():
    ids = torch.randint(10, 50, (4000, 20), generator=gen(3))
    out = electra_mask(ids, mask_token_id=MASK_ID, generator=gen(4))
    assert bool((out.is_target.sum(1) == 3).all())
    masked = (out.input_ids == MASK_ID) & out.is_target
    frac = masked.sum().item() / out.is_target.sum().item()
    assert abs(frac - 0.85) < 0.015  # 12000 targets: sd about 0.0033
    per_position = out.is_target.sum(0).float()
    assert bool(((per_position - 600).abs() < 90).all())  # 600 expected, sd about 24


def test_electra_generator_reproducible_and_global_rng_untouched():
    ids, special, attn = make_batch(32, 8, 30)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = electra_mask(ids, mask_token_id=MASK_ID, special_tokens_mask=special, attention_mask=attn, generator=gen(5))
    assert torch.equal(torch.get_rng_state(), before)
    b = electra_mask(ids, mask_token_id=MASK_ID, special_tokens_mask=special, attention_mask=attn, generator=gen(5))
    c = electra_mask(ids, mask_token_id=MASK_ID, special_tokens_mask=special, attention_mask=attn, generator=gen(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.is_target, c.is_target)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bert_style_matches_hf_collator(collators, seed):
    _, mlm_collator = collators
    ids, special, attn = make_batch(40 + seed, 6, 32)
    hf_special = special | ~attn  # HF tokenizers flag [PAD] as special
    torch.manual_seed(seed)
    hf_inputs, hf_labels = mlm_collator.torch_mask_tokens(ids.clone(), special_tokens_mask=hf_special.long())
    torch.manual_seed(seed)
    out = electra_mask(ids, mask_token_id=MASK_ID, special_tokens_mask=hf_special, style="bert", vocab_size=VOCAB)
    assert torch.equal(out.input_ids, hf_inputs)
    assert torch.equal(out.labels, hf_labels)
    assert torch.equal(out.is_target, hf_labels != -100)


def test_bert_style_statistics():
    ids, special, attn = make_batch(50, 2000, 32)
    out = electra_mask(
        ids, mask_token_id=MASK_ID, special_tokens_mask=special, attention_mask=attn, style="bert",
        vocab_size=VOCAB, generator=gen(7),
    )
    candidates = attn & ~special
    assert not (out.is_target & ~candidates).any()
    rate = out.is_target.sum().item() / candidates.sum().item()
    assert abs(rate - 0.15) < 0.01
    t = out.is_target
    n = t.sum().item()
    to_mask = ((out.input_ids == MASK_ID) & t).sum().item() / n
    unchanged = ((out.input_ids == ids) & t).sum().item() / n
    assert abs(to_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.015  # a random draw equal to the original is about 0.1%
    assert abs(1 - to_mask - unchanged - 0.1) < 0.015
    assert torch.equal(out.labels, torch.where(t, ids, -100))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(mask_token_id=None), TypeError, "mask_token_id"),
        (dict(mask_token_id=-1), ValueError, "mask_token_id"),
        (dict(input_ids=torch.zeros(2, 4)), TypeError, "input_ids"),
        (dict(style="xlnet"), ValueError, "style"),
        (dict(mask_prob=1.5), ValueError, "mask_prob"),
        (dict(mask_prob="0.1"), TypeError, "mask_prob"),
        (dict(max_predictions=0), ValueError, "max_predictions"),
        (dict(style="bert", vocab_size=10, max_predictions=3), ValueError, "max_predictions"),
        (dict(style="bert"), ValueError, "vocab_size"),
        (dict(replace_with_mask=0.5, replace_with_random=0.2), ValueError, "vocab_size"),
        (dict(replace_with_mask=0.9, replace_with_random=0.2, vocab_size=10), ValueError, "<= 1"),
        (dict(special_token_ids="ab"), TypeError, "special_token_ids"),
        (dict(special_token_ids=3), TypeError, "special_token_ids"),
        (dict(special_token_ids=[1, 2.5]), TypeError, "special_token_ids"),
        (dict(attention_mask=torch.ones(2, 5)), TypeError, "attention_mask"),
        (dict(attention_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "attention_mask.*shape"),
        (dict(generator="seed"), TypeError, "generator"),
    ],
)
def test_electra_mask_validation(kwargs, exc, match):
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", torch.randint(10, 50, (2, 4)))
    kwargs.setdefault("mask_token_id", MASK_ID)
    with pytest.raises(exc, match=match):
        electra_mask(ids, **kwargs)
