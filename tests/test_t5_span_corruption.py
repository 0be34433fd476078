"""Tests for pyobjectives.data.t5_span_corruption: T5's random_spans_noise_mask and sentinel layout."""

import math

import numpy as np
import pytest
import torch

import pyobjectives as po
from pyobjectives.data import T5SpanCorruption, t5_span_corruption

SENTINEL = 32099  # <extra_id_0> in T5's vocabulary
EOS = 1
VOCAB = 1000  # test tokens are drawn below the sentinel range, so a sentinel is never a real token


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tokens(batch, length, seed=0):
    return torch.randint(2, VOCAB, (batch, length), generator=gen(seed))


# --------------------------------------------------------------------------
# independent oracles, per row, plain Python / NumPy


def t5_counts(length, noise_density, mean_noise_span_length):
    """Counts of T5's random_spans_noise_mask (float32 arithmetic, round half to even as tf.math.round)."""
    num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
    return num_noise, max(num_spans, 1)


def t5_random_spans_noise_mask_np(length, noise_density, mean_noise_span_length, rng):
    """Straight NumPy port of T5's random_spans_noise_mask (its logic, not its random stream)."""
    num_noise_tokens, num_noise_spans = t5_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise_tokens = length - num_noise_tokens

    def _random_segmentation(num_items, num_segments):
        first_in_segment = np.pad(rng.permutation((np.arange(num_items - 1) < num_segments - 1).astype(np.int64)),
                                  [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        return np.bincount(segment_id)  # tf.math.segment_sum(ones, segment_id)

    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    # tf.stack fails here when the segmentations disagree in length (too few non-noise tokens)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, dtype=np.int64)
    np.add.at(indicator, span_starts, 1)
    return np.cumsum(indicator) % 2 == 1


def t5_noise_span_to_unique_sentinel(row, mask, sentinel_id):
    """Port of T5's noise_span_to_unique_sentinel (sentinel_id = vocab_size - 1 = <extra_id_0>)."""
    out, prev, count = [], False, 0
    for tok, noise in zip(row, mask):
        if noise and not prev:
            count += 1
            out.append(sentinel_id + 1 - count)
        elif not noise:
            out.append(tok)
        prev = noise
    return out


def t5_nonnoise_span_to_unique_sentinel(row, mask, sentinel_id):
    return t5_noise_span_to_unique_sentinel(row, [not m for m in mask], sentinel_id)


def spans_of(mask_row):
    """Lengths of the maximal runs of a 0/1 list: [(value, length), ...]."""
    runs = []
    for m in mask_row:
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return [tuple(r) for r in runs]


def decode(inputs, labels, sentinel_start, num_spans, eos=None):
    """Rebuild the original row from inputs + labels; checks the layout on the way."""
    inputs, labels = list(inputs), list(labels)
    if eos is not None:
        assert inputs.pop() == eos and labels.pop() == eos
    sentinels = set(range(sentinel_start - num_spans + 1, sentinel_start + 1))
    spans, current = {}, None
    for t in labels:
        if t in sentinels:
            assert t not in spans, f"sentinel {t} twice in labels"
            current = t
            spans[t] = []
        else:
            assert current is not None, "labels must start with a sentinel"
            spans[current].append(t)
    assert all(spans.values()), "every sentinel in labels is followed by a non-empty span"
    out = []
    for t in inputs:
        if t in sentinels:
            out.extend(spans.pop(t))
        else:
            out.append(t)
    assert not spans, f"sentinels {sorted(spans)} in labels but not in inputs"
    return out


# --------------------------------------------------------------------------
# exact layout


def test_hand_worked_example():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    out = t5_span_corruption(ids, sentinel_start_id=99, noise_mask=mask)
    assert isinstance(out, T5SpanCorruption)
    assert out.input_ids.tolist() == [[10, 99, 13, 14, 98, 16, 97]]
    assert out.labels.tolist() == [[99, 11, 12, 98, 15, 97, 17]]
    assert torch.equal(out.noise_mask, mask)
    out = t5_span_corruption(ids, sentinel_start_id=99, noise_mask=mask, eos_token_id=EOS)
    assert out.input_ids.tolist() == [[10, 99, 13, 14, 98, 16, 97, EOS]]
    assert out.labels.tolist() == [[99, 11, 12, 98, 15, 97, 17, EOS]]


def test_mask_starting_with_noise_and_ending_kept():
    # Documented generic rule: inputs start with s0, labels still read s0, span0, s1, span1; no trailing sentinel.
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    out = t5_span_corruption(ids, sentinel_start_id=50, noise_mask=mask)
    assert out.input_ids.tolist() == [[50, 12, 49, 14, 15]]
    assert out.labels.tolist() == [[50, 10, 11, 49, 13]]
    # the inputs are T5's noise_span_to_unique_sentinel for any mask
    assert out.input_ids[0].tolist() == t5_noise_span_to_unique_sentinel(ids[0].tolist(), mask[0].tolist(), 50)


def test_mask_without_noise_and_all_noise():
    ids = torch.tensor([[5, 6, 7], [8, 9, 4]])
    out = t5_span_corruption(ids, sentinel_start_id=20, noise_mask=torch.zeros(2, 3, dtype=torch.bool),
                             eos_token_id=EOS)
    assert out.input_ids.tolist() == [[5, 6, 7, EOS], [8, 9, 4, EOS]]
    assert out.labels.tolist() == [[EOS], [EOS]]
    out = t5_span_corruption(ids, sentinel_start_id=20, noise_mask=torch.ones(2, 3, dtype=torch.int64))
    assert out.input_ids.tolist() == [[20], [20]]
    assert out.labels.tolist() == [[20, 5, 6, 7], [20, 8, 9, 4]]


@pytest.mark.parametrize("length,density,mean", [(568, 0.15, 3.0), (100, 0.15, 3.0), (64, 0.5, 2.0), (37, 0.3, 1.0)])
def test_matches_t5_sentinel_functions(length, density, mean):
    ids = tokens(6, length, seed=length)
    out = t5_span_corruption(ids, noise_density=density, mean_noise_span_length=mean, sentinel_start_id=SENTINEL,
                             generator=gen(1))
    for b in range(ids.shape[0]):
        row, mask = ids[b].tolist(), out.noise_mask[b].tolist()
        assert out.input_ids[b].tolist() == t5_noise_span_to_unique_sentinel(row, mask, SENTINEL)
        assert out.labels[b].tolist() == t5_nonnoise_span_to_unique_sentinel(row, mask, SENTINEL)


def test_sentinel_order_and_pairing():
    ids = tokens(8, 200, seed=3)
    out = t5_span_corruption(ids, sentinel_start_id=SENTINEL, eos_token_id=EOS, generator=gen(3))
    num_noise, num_spans = t5_counts(200, 0.15, 3.0)
    expected = list(range(SENTINEL, SENTINEL - num_spans, -1))
    for b in range(8):
        inp, lab = out.input_ids[b].tolist(), out.labels[b].tolist()
        assert [t for t in inp if t >= VOCAB] == expected
        assert [t for t in lab if t >= VOCAB] == expected
        # in labels, sentinel k sits right after the k earlier spans: positions k + (noise before span k)
        runs = [n for m, n in spans_of(out.noise_mask[b].tolist()) if m]
        starts = [k + sum(runs[:k]) for k in range(num_spans)]
        assert [lab[s] for s in starts] == expected
        # in inputs, sentinel k replaces noise span k: right after the kept tokens before it
        kept = [n for m, n in spans_of(out.noise_mask[b].tolist()) if not m]
        assert [inp[k + sum(kept[: k + 1])] for k in range(num_spans)] == expected
        assert inp[-1] == EOS and lab[-1] == EOS


# --------------------------------------------------------------------------
# counts, lengths, structure of the random mask


@pytest.mark.parametrize("length,density,mean", [(568, 0.15, 3.0), (512, 0.15, 3.0), (10, 0.15, 3.0),
                                                 (190, 0.15, 3.0), (77, 0.4, 2.5), (2, 0.15, 3.0),
                                                 (4, 0.5, 1.0), (100, 0.9, 30.0), (31, 0.15, 3.0)])
def test_counts_lengths_and_structure(length, density, mean):
    batch = 16
    out = t5_span_corruption(tokens(batch, length, seed=1), noise_density=density, mean_noise_span_length=mean,
                             sentinel_start_id=SENTINEL, eos_token_id=EOS, generator=gen(length))
    num_noise = min(max(int(np.round(np.float32(length) * np.float32(density))), 1), length - 1)
    num_spans = max(1, int(np.round(np.float32(num_noise) / np.float32(mean))))
    mask = out.noise_mask
    assert mask.dtype == torch.bool and mask.shape == (batch, length)
    assert mask.sum(dim=1).tolist() == [num_noise] * batch
    starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0))
    assert starts.sum(dim=1).tolist() == [num_spans] * batch
    assert not mask[:, 0].any(), "the first token is always kept"
    assert mask[:, -1].all(), "the last token is always noise"
    assert out.input_ids.shape == (batch, length - num_noise + num_spans + 1)
    assert out.labels.shape == (batch, num_noise + num_spans + 1)
    for b in range(batch):
        runs = spans_of(mask[b].tolist())
        assert [m for m, _ in runs] == [False, True] * num_spans  # kept, noise, kept, noise, ...


def test_t5_pretraining_shapes():
    out = t5_span_corruption(tokens(3, 568), sentinel_start_id=SENTINEL, eos_token_id=EOS, generator=gen(0))
    assert out.input_ids.shape == (3, 512)
    assert out.labels.shape == (3, 114)
    assert out.noise_mask.sum(dim=1).tolist() == [85] * 3
    out = t5_span_corruption(tokens(3, 568), sentinel_start_id=SENTINEL, generator=gen(0))
    assert out.input_ids.shape == (3, 511) and out.labels.shape == (3, 113)


def test_rounding_is_t5_float32():
    # 190 * 0.15 is 28.5 in float64 (Python rounds to 28) but 28.500002 in float32: T5 gets 29.
    out = t5_span_corruption(tokens(2, 190), sentinel_start_id=SENTINEL, generator=gen(0))
    assert out.noise_mask.sum(dim=1).tolist() == [29, 29]
    assert t5_counts(190, 0.15, 3.0) == (29, 10)


def test_tiny_length_and_single_row():
    ids = torch.tensor([[7, 8]])
    out = t5_span_corruption(ids, sentinel_start_id=SENTINEL, eos_token_id=EOS, generator=gen(0))
    assert out.noise_mask.tolist() == [[False, True]]
    assert out.input_ids.tolist() == [[7, SENTINEL, EOS]]
    assert out.labels.tolist() == [[SENTINEL, 8, EOS]]
    assert out.input_ids.dtype == ids.dtype and out.labels.dtype == torch.int64


def test_high_noise_density():
    ids = tokens(4, 100, seed=9)
    out = t5_span_corruption(ids, noise_density=0.9, mean_noise_span_length=30.0, sentinel_start_id=SENTINEL,
                             generator=gen(9))
    assert out.noise_mask.sum(dim=1).tolist() == [90] * 4
    assert out.input_ids.shape == (4, 13) and out.labels.shape == (4, 93)
    for b in range(4):
        assert decode(out.input_ids[b].tolist(), out.labels[b].tolist(), SENTINEL, 3) == ids[b].tolist()
    # 30 spans cannot be separated by 10 kept tokens: T5's segmentation fails there, here it is a ValueError
    with pytest.raises(ValueError, match="mean_noise_span_length"):
        t5_span_corruption(ids, noise_density=0.9, sentinel_start_id=SENTINEL)


@pytest.mark.parametrize("length", [2, 3, 5, 8, 13, 30, 31, 64, 101])
@pytest.mark.parametrize("density,mean", [(0.05, 3.0), (0.15, 3.0), (0.3, 1.0), (0.5, 2.0), (0.9, 3.0), (0.7, 8.0)])
def test_structure_matches_numpy_port(length, density, mean):
    rng = np.random.default_rng(length)
    try:
        ref = t5_random_spans_noise_mask_np(length, density, mean, rng)
    except ValueError:  # the port's np.stack: fewer non-noise tokens than spans
        with pytest.raises(ValueError, match="noise_density"):
            t5_span_corruption(tokens(2, length), noise_density=density, mean_noise_span_length=mean,
                               sentinel_start_id=SENTINEL)
        return
    out = t5_span_corruption(tokens(2, length), noise_density=density, mean_noise_span_length=mean,
                             sentinel_start_id=SENTINEL, generator=gen(length))
    ref_runs = spans_of(ref.tolist())
    for b in range(2):
        runs = spans_of(out.noise_mask[b].tolist())
        assert [m for m, _ in runs] == [m for m, _ in ref_runs]  # same alternation and span count
        assert int(out.noise_mask[b].sum()) == int(ref.sum())
    num_noise, num_spans = int(ref.sum()), len(ref_runs) // 2
    assert out.input_ids.shape[1] == length - num_noise + num_spans
    assert out.labels.shape[1] == num_noise + num_spans


# --------------------------------------------------------------------------
# reconstruction, reproducibility, statistics


@pytest.mark.parametrize("length,density,mean", [(568, 0.15, 3.0), (50, 0.3, 2.0), (9, 0.5, 1.0)])
def test_reconstruction_random_mask(length, density, mean):
    ids = tokens(8, length, seed=length)
    out = t5_span_corruption(ids, noise_density=density, mean_noise_span_length=mean, sentinel_start_id=SENTINEL,
                             eos_token_id=EOS, generator=gen(length))
    _, num_spans = t5_counts(length, density, mean)
    for b in range(8):
        assert decode(out.input_ids[b].tolist(), out.labels[b].tolist(), SENTINEL, num_spans, EOS) == ids[b].tolist()


def test_reconstruction_given_masks():
    # Rows with equal noise and span counts but any placement, including noise first and kept last.
    ids = tokens(4, 10, seed=5)
    mask = torch.tensor([
        [1, 1, 0, 0, 1, 0, 0, 0, 0, 0],  # noise first, kept last
        [0, 0, 0, 1, 0, 0, 0, 0, 1, 1],  # T5's shape: kept first, noise last
        [1, 0, 0, 0, 0, 0, 0, 0, 1, 1],  # noise first and last
        [0, 0, 1, 0, 1, 1, 0, 0, 0, 0],  # kept first and last
    ], dtype=torch.bool)  # every row: 3 noise tokens in 2 spans
    out = t5_span_corruption(ids, sentinel_start_id=5, noise_mask=mask, eos_token_id=EOS)
    assert torch.equal(out.noise_mask, mask)
    assert out.input_ids.shape == (4, 10 - 3 + 2 + 1) and out.labels.shape == (4, 3 + 2 + 1)
    for b in range(4):
        assert decode(out.input_ids[b].tolist(), out.labels[b].tolist(), 5, 2, EOS) == ids[b].tolist()
        assert [t for t in out.labels[b].tolist()[:-1] if t in (4, 5)] == [5, 4]
    # the given-mask path ignores noise_density and the generator
    again = t5_span_corruption(ids, sentinel_start_id=5, noise_mask=mask.long(), eos_token_id=EOS,
                               noise_density=0.5, generator=gen(123))
    assert torch.equal(again.input_ids, out.input_ids) and torch.equal(again.labels, out.labels)


def test_given_mask_rows_must_batch():
    ids = tokens(2, 6)
    unequal_noise = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    unequal_spans = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    for mask in (unequal_noise, unequal_spans):
        with pytest.raises(ValueError, match="noise_mask rows must have equal numbers"):
            t5_span_corruption(ids, sentinel_start_id=SENTINEL, noise_mask=mask)


def test_seeded_reproducibility():
    ids = tokens(4, 300)
    a = t5_span_corruption(ids, sentinel_start_id=SENTINEL, generator=gen(11))
    b = t5_span_corruption(ids, sentinel_start_id=SENTINEL, generator=gen(11))
    c = t5_span_corruption(ids, sentinel_start_id=SENTINEL, generator=gen(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.noise_mask, c.noise_mask)
    assert not torch.equal(a.noise_mask[0], a.noise_mask[1]), "rows are sampled independently"
    torch.manual_seed(5)
    d = t5_span_corruption(ids, sentinel_start_id=SENTINEL)
    torch.manual_seed(5)
    e = t5_span_corruption(ids, sentinel_start_id=SENTINEL)
    assert torch.equal(d.noise_mask, e.noise_mask)


def first_span_law(num_items, num_segments):
    """Exact P(first segment has length k) for a uniform composition of num_items into num_segments parts."""
    total = math.comb(num_items - 1, num_segments - 1)
    return {k: math.comb(num_items - k - 1, num_segments - 2) / total for k in range(1, num_items - num_segments + 2)}


def test_span_lengths_are_a_uniform_segmentation():
    batch, length = 20000, 40
    out = t5_span_corruption(torch.zeros(batch, length, dtype=torch.long), noise_density=0.3,
                             mean_noise_span_length=3.0, sentinel_start_id=SENTINEL, generator=gen(2024))
    num_noise, num_spans = 12, 4
    assert t5_counts(length, 0.3, 3.0) == (num_noise, num_spans)
    runs = [spans_of(row) for row in out.noise_mask.tolist()]
    noise = np.array([[n for m, n in r if m] for r in runs])
    kept = np.array([[n for m, n in r if not m] for r in runs])
    assert noise.shape == kept.shape == (batch, num_spans)
    assert (noise.sum(axis=1) == num_noise).all() and (kept.sum(axis=1) == length - num_noise).all()
    assert noise.mean() == pytest.approx(num_noise / num_spans)  # mean noise span length
    for lengths, items in ((noise, num_noise), (kept, length - num_noise)):
        law = first_span_law(items, num_spans)
        # every span (first, last, middle) has the same law; check the first and the last one
        for column in (0, num_spans - 1):
            counts = np.bincount(lengths[:, column], minlength=max(law) + 1)
            for k, p in law.items():
                sigma = math.sqrt(p * (1 - p) / batch)
                assert abs(counts[k] / batch - p) <= 5 * sigma + 1e-4, (items, column, k, counts[k] / batch, p)
            assert lengths[:, column].mean() == pytest.approx(items / num_spans, abs=0.1)


def test_numpy_port_has_the_same_span_law():
    # The port (T5's shuffle) and the exact law agree: the law the kernel is tested against is T5's.
    rng = np.random.default_rng(0)
    batch, length = 4000, 40
    firsts = []
    for _ in range(batch):
        runs = spans_of(t5_random_spans_noise_mask_np(length, 0.3, 3.0, rng).tolist())
        firsts.append(runs[1][1])
    law = first_span_law(12, 4)
    counts = np.bincount(firsts, minlength=max(law) + 1)
    for k, p in law.items():
        assert abs(counts[k] / batch - p) <= 5 * math.sqrt(p * (1 - p) / batch) + 1e-3


# --------------------------------------------------------------------------
# dtypes and validation


def test_dtypes_and_export():
    ids = tokens(2, 20).to(torch.int32)
    out = t5_span_corruption(ids, sentinel_start_id=SENTINEL, eos_token_id=EOS, generator=gen(0))
    assert out.input_ids.dtype == torch.int32 and out.labels.dtype == torch.int64
    assert out.input_ids.device == ids.device
    assert po.data.t5_span_corruption is t5_span_corruption
    assert {"t5_span_corruption", "T5SpanCorruption"} <= set(po.data.__all__)


IDS = torch.randint(0, 100, (2, 568))

BAD = [
    (dict(input_ids=[[1, 2]]), TypeError, "input_ids"),
    (dict(input_ids=torch.zeros(2, 8)), TypeError, "input_ids"),
    (dict(input_ids=torch.zeros(2, 8, dtype=torch.bool)), TypeError, "input_ids"),
    (dict(input_ids=torch.zeros(8, dtype=torch.long)), ValueError, "input_ids"),
    (dict(input_ids=torch.zeros(2, 1, dtype=torch.long)), ValueError, "input_ids must have a sequence length L >= 2"),
    (dict(noise_density=0.0), ValueError, r"noise_density must be in \(0, 1\)"),
    (dict(noise_density=1.0), ValueError, r"noise_density must be in \(0, 1\)"),
    (dict(noise_density=float("nan")), ValueError, "noise_density"),
    (dict(noise_density="0.15"), TypeError, "noise_density"),
    (dict(noise_density=True), TypeError, "noise_density"),
    (dict(mean_noise_span_length=0.5), ValueError, "mean_noise_span_length must be a finite number >= 1"),
    (dict(mean_noise_span_length=float("inf")), ValueError, "mean_noise_span_length"),
    (dict(mean_noise_span_length=None), TypeError, "mean_noise_span_length"),
    (dict(sentinel_start_id=1.5), TypeError, "sentinel_start_id"),
    (dict(sentinel_start_id=True), TypeError, "sentinel_start_id"),
    (dict(sentinel_start_id=-1), ValueError, "sentinel_start_id"),
    (dict(sentinel_start_id=26), ValueError, r"sentinel_start_id must be >= num_spans - 1 = 27"),
    (dict(input_ids=IDS.to(torch.int16), sentinel_start_id=40000), ValueError, "sentinel_start_id must fit"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id"),
    (dict(eos_token_id="1"), TypeError, "eos_token_id"),
    (dict(noise_mask=torch.zeros(2, 567, dtype=torch.bool)), ValueError, "noise_mask must have shape"),
    (dict(noise_mask=torch.zeros(2, 568)), TypeError, "noise_mask must have dtype"),
    (dict(noise_mask=torch.full((2, 568), 2)), ValueError, "noise_mask must contain only 0 and 1"),
    (dict(noise_mask=[[0] * 568] * 2), TypeError, "noise_mask"),
    (dict(noise_mask=torch.zeros(2, 568, dtype=torch.bool, device="meta")), ValueError, "noise_mask must be on"),
    (dict(noise_mask=(torch.arange(568) % 2 == 1).expand(2, 568), sentinel_start_id=100), ValueError,
     r"sentinel_start_id must be >= num_spans - 1 = 283"),
    (dict(generator=123), TypeError, "generator"),
    (dict(input_ids=torch.zeros(2, 100, dtype=torch.long), noise_density=0.9), ValueError,
     "noise_density=0.9 and mean_noise_span_length=3.0 give 30 noise spans"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD)])
def test_validation(kwargs, exc, match):
    args = dict(input_ids=IDS, sentinel_start_id=SENTINEL)
    args.update(kwargs)
    input_ids = args.pop("input_ids")
    with pytest.raises(exc, match=match):
        t5_span_corruption(input_ids, **args)


def test_sentinel_start_id_is_required():
    with pytest.raises(TypeError, match="sentinel_start_id"):
        t5_span_corruption(IDS)  # noqa
