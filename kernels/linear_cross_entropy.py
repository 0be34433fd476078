"""Fused generator linear + cross-entropy + Gumbel-max sampling (Triton); the logits are never stored.

``z = hidden @ weight.T + bias`` is produced one ``[BLOCK_N, BLOCK_V]`` tile at a time by
``tl.dot`` over ``BLOCK_E`` slices (float32 accumulation, float64 for float64 inputs) and
consumed in registers:

* forward (grid: row blocks x vocabulary splits): online logsumexp, the target logit, and
  with ``sample=True`` a running argmax of ``float(z) / temperature + g`` with Gumbel noise
  ``g = -log(-log(tl.rand(seed, n * V + v)))`` keyed on the *original* row n; optionally a
  running argmax of z (generator accuracy). Splits combine like a running max, so samples do
  not depend on tile sizes or splits and equal the reference's.
* backward, exact (every tile, no filtering), recomputing z:
  ``dz = (softmax(z) - onehot(target)) * coef_n`` with ``coef = grad_out / n_kept`` (mean),
  ``grad_out`` (sum) or ``grad_out[n]`` (none);
  ``d hidden = dz @ weight`` (grid: row blocks x E slices [x vocabulary splits]) and
  ``d weight = dz^T @ hidden``, ``d bias = sum_n dz`` (grid: vocabulary tiles x E slices);
  each output tile is owned by one program: no atomics, deterministic.

Rows whose target is ``ignore_index`` are compacted away without a host synchronisation: a
stable argsort puts the kept rows first and the kernels read their count from device memory,
so row blocks past it do nothing (when sampling, every row is still swept for its sample,
as the reference samples every row). Extra memory is O(N) (log-sum-exp, per-row partials)
plus the gradients themselves, against eager PyTorch's ``[N, V]`` logits, softmax and
logit gradient.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES as _FLOATS
from .utils import TL_DTYPE as _TL
from .utils import cast as _cast
from .utils import interpreting as _interpreting
from .utils import new_output
from pyobjectives.reference.philox import seed_tensor, seed_value


#: Tests may override block sizes / splits here (keys of :func:`_config`'s result) to exercise tilings.
CONFIG_OVERRIDE: dict = {}


@triton.jit
def _logits_tile(acc, h_ptr, w_ptr, rows, r_ok, v, v_ok, E, s_hn, s_he, s_wv, s_we,
                 BLOCK_E: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """``acc + hidden[rows] @ weight[v].T`` as a ``[len(rows), len(v)]`` tile."""
    offs_e = tl.arange(0, BLOCK_E)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + offs_e
        e_ok = e < E
        a = tl.load(h_ptr + rows[:, None] * s_hn + e[None, :] * s_he, mask=r_ok[:, None] & e_ok[None, :], other=0)
        b = tl.load(w_ptr + e[:, None] * s_we + v[None, :] * s_wv, mask=e_ok[:, None] & v_ok[None, :], other=0)
        acc = tl.dot(a.to(DOT_DT), b.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _running_argmax(best, idx, x, v):
    """Merge tile ``x [rows, BLOCK_V]`` (ids ``v``) into a running ``(best, idx)`` as torch.argmax does: the
    first maximum, and a NaN beats everything (tl.max's NaN handling differs between the GPU and the
    interpreter, so NaN is found explicitly)."""
    nan_idx = tl.min(tl.where(x != x, v[None, :], 2147483647), 1)
    tile_nan = nan_idx < 2147483647
    t_max = tl.max(x, 1)
    t_idx = tl.min(tl.where(x == t_max[:, None], v[None, :], 2147483647), 1)
    better = (best == best) & (tile_nan | (t_max > best))
    best = tl.where(better, tl.where(tile_nan, float("nan"), t_max), best)
    idx = tl.where(better, tl.where(tile_nan, nan_idx, t_idx), idx)
    return best, idx


@triton.jit
def _lce_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, order_ptr, nkeep_ptr, dis_ptr,
    lse_ptr, tgl_ptr, smax_ptr, sidx_ptr, amax_ptr, aidx_ptr,
    N, V, E, seed, temperature, tiles_per_split,
    s_hn, s_he, s_wv, s_we, s_t, s_dis,
    HAS_BIAS: tl.constexpr, SAMPLE: tl.constexpr, ARGMAX: tl.constexpr, HAS_DIS: tl.constexpr,
    IN_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < N
    n_keep = tl.load(nkeep_ptr)
    kept = r < n_keep
    rows = tl.load(order_ptr + r, mask=r_ok, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows * s_t, mask=r_ok & kept, other=-1).to(tl.int32)
    tgt = tl.where(kept, tgt, -1)
    if HAS_DIS:
        dis = tl.load(dis_ptr + rows * s_dis, mask=r_ok, other=-1).to(tl.int64)
    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    if not SAMPLE and not ARGMAX:
        # rows past the kept ones have nothing to compute
        v_hi = tl.where(pid_n * BLOCK_N < n_keep, v_hi, v_lo)
    offs_v = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_N], float("-inf"), ACC)
    ssum = tl.zeros([BLOCK_N], ACC)
    tlogit = tl.zeros([BLOCK_N], ACC)
    s_best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_idx = tl.zeros([BLOCK_N], tl.int32)
    a_best = tl.full([BLOCK_N], float("-inf"), ACC)
    a_idx = tl.zeros([BLOCK_N], tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        v = v0 + offs_v
        v_ok = v < V
        z = _logits_tile(tl.zeros([BLOCK_N, BLOCK_V], ACC), h_ptr, w_ptr, rows, r_ok, v.to(tl.int64), v_ok, E,
                         s_hn, s_he, s_wv, s_we, BLOCK_E, DOT_DT, PREC, ACC)
        if HAS_BIAS:
            bias = tl.load(b_ptr + v, mask=v_ok, other=0)
            zb = z + bias.to(ACC)[None, :]
        else:
            zb = z
        zb = tl.where(v_ok[None, :], zb, float("-inf"))
        m_new = tl.maximum(m, tl.max(zb, 1))
        ssum = ssum * tl.exp(m - m_new) + tl.sum(tl.exp(zb - m_new[:, None]), 1)
        m = m_new
        tlogit += tl.sum(tl.where(v[None, :] == tgt[:, None], zb, 0.0), 1)
        if SAMPLE:
            # as the reference: the logits in the input dtype (matmul, then + bias, each rounded
            # to it), then float32 / temperature + Gumbel noise
            zs = _cast(z, IN_DT, INTERP)
            if HAS_BIAS:
                zs = _cast(zs.to(ACC) + bias.to(ACC)[None, :], IN_DT, INTERP)
            zs = zs.to(tl.float32) / temperature
            u = tl.rand(seed, rows[:, None] * V + v[None, :].to(tl.int64))
            score = zs - tl.log(-tl.log(u))
            if HAS_DIS:
                score = tl.where(v[None, :].to(tl.int64) == dis[:, None], float("-inf"), score)
            score = tl.where(v_ok[None, :], score, float("-inf"))
            s_best, s_idx = _running_argmax(s_best, s_idx, score, v)
        if ARGMAX:
            a_best, a_idx = _running_argmax(a_best, a_idx, zb, v)
    out = pid_s * N + rows
    # ssum == 0: no finite logit; NaN (a NaN logit) must reach the loss, as in the reference
    has_sum = kept & (ssum != 0)
    # max and log(sum) stay apart: their float32 sum would be off by up to half an ulp of the max
    # (5e-4 at logits of 1e4), an error every probability of the backward would inherit
    tl.store(lse_ptr + 2 * out, tl.where(has_sum, m, 0.0), mask=r_ok)
    tl.store(lse_ptr + 2 * out + 1, tl.where(has_sum, tl.log(tl.where(has_sum, ssum, 1.0)), 0.0), mask=r_ok)
    tl.store(tgl_ptr + out, tlogit, mask=r_ok)
    if SAMPLE:
        tl.store(smax_ptr + out, s_best, mask=r_ok)
        tl.store(sidx_ptr + out, s_idx, mask=r_ok)
    if ARGMAX:
        tl.store(amax_ptr + out, a_best, mask=r_ok)
        tl.store(aidx_ptr + out, a_idx, mask=r_ok)


@triton.jit
def _lce_bwd_dh_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, order_ptr, nkeep_ptr, lse_ptr, coef_ptr, dh_ptr,
    N, V, E, tiles_per_split, coef_stride,
    s_hn, s_he, s_wv, s_we, s_t,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    IN_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EO: tl.constexpr,
):
    """``d hidden[rows, e-slice] = sum_v dz[rows, v] weight[v, e-slice]`` over this split's vocabulary."""
    pid_n = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_s = tl.program_id(2)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < N
    n_keep = tl.load(nkeep_ptr)
    kept = r < n_keep
    rows = tl.load(order_ptr + r, mask=r_ok, other=0).to(tl.int64)
    tgt = tl.where(kept, tl.load(tgt_ptr + rows * s_t, mask=r_ok & kept, other=-1).to(tl.int32), -1)
    row_max = tl.load(lse_ptr + 2 * rows, mask=r_ok & kept, other=0)
    row_logl = tl.load(lse_ptr + 2 * rows + 1, mask=r_ok & kept, other=0)
    coef = tl.where(kept, tl.load(coef_ptr + rows * coef_stride, mask=r_ok & kept, other=0).to(ACC), 0.0)
    eo = pid_e * BLOCK_EO + tl.arange(0, BLOCK_EO)
    eo_ok = eo < E
    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    v_hi = tl.where(pid_n * BLOCK_N < n_keep, v_hi, v_lo)
    offs_v = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_N, BLOCK_EO], ACC)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        v = v0 + offs_v
        v_ok = v < V
        v64 = v.to(tl.int64)
        z = _logits_tile(tl.zeros([BLOCK_N, BLOCK_V], ACC), h_ptr, w_ptr, rows, r_ok, v64, v_ok, E,
                         s_hn, s_he, s_wv, s_we, BLOCK_E, DOT_DT, PREC, ACC)
        if HAS_BIAS:
            z += tl.load(b_ptr + v, mask=v_ok, other=0).to(ACC)[None, :]
        # ignored rows (coef 0, statistics 0) select 0: exp(z) of their logits may overflow, and inf * 0 is NaN
        p = tl.where(v_ok[None, :] & kept[:, None], tl.exp((z - row_max[:, None]) - row_logl[:, None]), 0.0)
        dz = (p - tl.where(v[None, :] == tgt[:, None], 1.0, 0.0)) * coef[:, None]
        wt = tl.load(w_ptr + v64[:, None] * s_wv + eo[None, :] * s_we, mask=v_ok[:, None] & eo_ok[None, :], other=0)
        acc = tl.dot(_cast(dz, IN_DT, INTERP).to(DOT_DT), wt.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC)
    mask = r_ok[:, None] & eo_ok[None, :]
    if PARTIAL:
        tl.store(dh_ptr + (pid_s * N + rows)[:, None] * E + eo[None, :], acc.to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dh_ptr + rows[:, None] * E + eo[None, :], _cast(acc, dh_ptr.dtype.element_ty, INTERP), mask=mask)


@triton.jit
def _lce_bwd_dw_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, order_ptr, nkeep_ptr, lse_ptr, coef_ptr, dw_ptr, db_ptr,
    N, V, E, coef_stride,
    s_hn, s_he, s_wv, s_we, s_t,
    HAS_BIAS: tl.constexpr, DW: tl.constexpr, DB: tl.constexpr,
    IN_DT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EO: tl.constexpr,
):
    """``d weight[v-tile, e-slice] = sum_n dz[n, v-tile]^T hidden[n, e-slice]`` over the kept rows;
    ``d bias[v-tile] = sum_n dz[n, v-tile]`` (E-slice 0)."""
    pid_v = tl.program_id(0)
    pid_e = tl.program_id(1)
    v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = v < V
    v64 = v.to(tl.int64)
    eo = pid_e * BLOCK_EO + tl.arange(0, BLOCK_EO)
    eo_ok = eo < E
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(b_ptr + v, mask=v_ok, other=0).to(ACC)
    n_keep = tl.load(nkeep_ptr)
    acc = tl.zeros([BLOCK_V, BLOCK_EO], ACC)
    db = tl.zeros([BLOCK_V], ACC)
    for r0 in range(0, n_keep, BLOCK_N):
        r = r0 + offs_n
        kept = r < n_keep
        rows = tl.load(order_ptr + r, mask=kept, other=0).to(tl.int64)
        tgt = tl.where(kept, tl.load(tgt_ptr + rows * s_t, mask=kept, other=-1).to(tl.int32), -1)
        row_max = tl.load(lse_ptr + 2 * rows, mask=kept, other=0)
        row_logl = tl.load(lse_ptr + 2 * rows + 1, mask=kept, other=0)
        coef = tl.where(kept, tl.load(coef_ptr + rows * coef_stride, mask=kept, other=0).to(ACC), 0.0)
        # the forward's orientation (rows x vocabulary), then transposed: computed as weight @ hidden.T
        # the logits may round differently (operand roles), and at |logit| ~ 1e4 one ulp is 1e-3
        zt = tl.trans(_logits_tile(tl.zeros([BLOCK_N, BLOCK_V], ACC), h_ptr, w_ptr, rows, kept, v64, v_ok, E,
                                   s_hn, s_he, s_wv, s_we, BLOCK_E, DOT_DT, PREC, ACC))
        if HAS_BIAS:
            zt += bias[:, None]
        p = tl.where(v_ok[:, None] & kept[None, :], tl.exp((zt - row_max[None, :]) - row_logl[None, :]), 0.0)
        dzt = (p - tl.where(v[:, None] == tgt[None, :], 1.0, 0.0)) * coef[None, :]
        if DB:
            db += tl.sum(dzt, 1)
        if DW:
            hh = tl.load(h_ptr + rows[:, None] * s_hn + eo[None, :] * s_he, mask=kept[:, None] & eo_ok[None, :],
                         other=0)
            acc = tl.dot(_cast(dzt, IN_DT, INTERP).to(DOT_DT), hh.to(DOT_DT), acc, input_precision=PREC,
                         out_dtype=ACC)
    if DW:
        tl.store(dw_ptr + v64[:, None] * E + eo[None, :], _cast(acc, dw_ptr.dtype.element_ty, INTERP),
                 mask=v_ok[:, None] & eo_ok[None, :])
    if DB:
        if pid_e == 0:
            tl.store(db_ptr + v, _cast(db, db_ptr.dtype.element_ty, INTERP), mask=v_ok)


# --- launch configuration ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(N: int, E: int, V: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes ``fwd = (BLOCK_N, BLOCK_V, BLOCK_E)``, ``dh`` / ``dw = (BLOCK_N, BLOCK_V, BLOCK_E,
    BLOCK_EO)`` (BLOCK_EO: the slice of E one backward program owns).

    The interpreter runs one program at a time with numpy: a few row blocks and about 8
    vocabulary tiles (so block boundaries are exercised), within [4, 64] rows and [32, 512] ids;
    it pays per program, per step and per multiply-add of its (non-BLAS) tl.dot, and has no
    minimum dot size. On an H100 (sm_90, 16-bit inputs): 64 x 128 forward tiles with K slices of
    64; backward 64 x 64 tiles owning all of E up to 128, and for wider E 32-row tiles owning 512
    (d hidden) / 256 (d weight) columns, since every E slice recomputes the logits (E = 768: 2 and
    3 slices); float32 (ieee, FMA) and float64 use 64 x 64 tiles with K slices of 32 / 16 and 64
    columns of E. All compile for sm_90 with no or few (<= 64 bytes) register spills (ptxas);
    vocabulary splits add programs whenever the row blocks alone would leave SMs idle.
    """
    e_p2 = triton.next_power_of_2(max(E, 16))
    if _interpreting() or device.type != "cuda":
        bn = min(64, max(4, triton.next_power_of_2(triton.cdiv(N, 2))))
        bv = min(512, max(32, triton.next_power_of_2(triton.cdiv(V, 8))))
        bvb = min(1024, bv * 2)
        cfg = dict(fwd=(bn, bv, 32), dh=(bn, bvb, 32, min(e_p2, 128)), dw=(bn, bvb, 32, min(e_p2, 128)),
                   num_warps=4, num_stages=1, target_programs=1)
    elif dtype in (torch.float16, torch.bfloat16):
        if E <= 128:
            dh, dw = (64, 64, 64, e_p2), (64, 64, 64, e_p2)
        else:  # wide E: fewer, wider E slices (each slice recomputes the logits) on smaller row tiles
            dh, dw = (32, 32, 64, min(e_p2, 512)), (32, 64, 64, min(e_p2, 256))
        cfg = dict(fwd=(64, 128, 64), dh=dh, dw=dw, num_warps=8, num_stages=2,
                   target_programs=2 * _sm_count(device.index or 0))
    else:
        k = 32 if dtype == torch.float32 else 16
        cfg = dict(fwd=(64, 64, k), dh=(64, 64, 16, min(e_p2, 64)), dw=(64, 64, 16, min(e_p2, 64)),
                   num_warps=8, num_stages=2, target_programs=2 * _sm_count(device.index or 0))
    cfg.update(CONFIG_OVERRIDE)
    return cfg


def _splits(row_programs: int, v_tiles: int, cfg: dict, key: str) -> tuple:
    """``(splits, tiles_per_split)``: split the vocabulary so that row blocks x splits reaches the
    target number of programs (no empty split)."""
    want = cfg.get(key)
    if want is None:
        want = max(1, -(-cfg["target_programs"] // max(row_programs, 1)))
    want = max(1, min(int(want), v_tiles))
    per = triton.cdiv(v_tiles, want)
    return triton.cdiv(v_tiles, per), per


def _dtypes(dtype: torch.dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # the interpreter's tl.dot mishandles 16-bit floats: feed it float32 (exact for those values)
    dot = _TL[dtype] if not _interpreting() else (tl.float64 if dtype == torch.float64 else tl.float32)
    prec = "ieee" if dtype in (torch.float32, torch.float64) else None
    return acc, dot, prec


OP_FWD, OP_BWD = "pyobjectives_triton::linear_cross_entropy_fwd", "pyobjectives_triton::linear_cross_entropy_bwd"

# Registered ops (fake kernels, autograd) so that torch.compile / torch.export treat the launches as opaque.
_lib = torch.library.Library("pyobjectives_triton", "FRAGMENT")
_lib.define("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
            "str reduction, bool sample, float temperature, Tensor? seed, Tensor? disallow, bool want_argmax) "
            "-> (Tensor loss, Tensor sampled, Tensor argmax, Tensor order, Tensor n_keep, Tensor lse, Tensor denom)")
_lib.define("linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
            "Tensor order, Tensor n_keep, Tensor lse, Tensor denom, str reduction, bool need_h, bool need_w, "
            "bool need_b) -> (Tensor dh, Tensor dw, Tensor db)")


@torch.library.register_kernel(OP_FWD, ("cpu", "cuda"))
def _lce_fwd(hidden, weight, bias, targets, ignore_index, reduction, sample, temperature, seed, disallow,
             want_argmax):
    """``(loss, sampled [N] or [0], argmax [N] or [0], row order, kept-row count [1], row max and log-sum [N, 2], mean's
    denominator [] or [0])``; the last four are what the backward pass reads."""
    N, E = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    acc, dot_dt, prec = _dtypes(dt)
    interp = _interpreting()
    # an unchecked out-of-range target (no value checks on accelerators) is ignored, as on every backend
    keep = (targets != ignore_index) & (targets >= 0) & (targets < V)
    # kept rows first, in order; their count stays on the device (no host synchronisation)
    order = torch.argsort((~keep).to(torch.int8), stable=True).to(torch.int32)
    n_keep = keep.sum().to(torch.int32).reshape(1)
    cfg = _config(N, E, V, dt, dev)
    BN, BV, BE = cfg["fwd"]
    row_blocks = triton.cdiv(N, BN)
    S, per = _splits(row_blocks, triton.cdiv(V, BV), cfg, "fwd_splits")
    stats_p = new_output((S, N, 2), acc, dev)
    tgl_p = new_output((S, N), acc, dev)
    smax = new_output((S, N), torch.float32, dev) if sample else None
    sidx = new_output((S, N), torch.int32, dev) if sample else None
    amax = new_output((S, N), acc, dev) if want_argmax else None
    aidx = new_output((S, N), torch.int32, dev) if want_argmax else None
    if N > 0:
        _lce_fwd_kernel[(row_blocks, S)](
            hidden, weight, bias if bias is not None else weight, targets, order, n_keep,
            disallow if disallow is not None else targets,
            stats_p, tgl_p, smax if sample else tgl_p, sidx if sample else order,
            amax if want_argmax else tgl_p, aidx if want_argmax else order,
            N, V, E, seed_value(seed) if sample else 0, float(temperature), per,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), targets.stride(0),
            disallow.stride(0) if disallow is not None else 0,
            HAS_BIAS=bias is not None, SAMPLE=bool(sample), ARGMAX=bool(want_argmax),
            HAS_DIS=disallow is not None, IN_DT=_TL[dt], DOT_DT=dot_dt, PREC=prec, ACC=_TL[acc],
            INTERP=interp, BLOCK_N=BN, BLOCK_V=BV, BLOCK_E=BE, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    if S == 1:
        stats, tlogit = stats_p[0], tgl_p[0]
    else:  # splits merge like the online softmax: max of the maxima, sums rescaled to it
        row_max = stats_p[..., 0].amax(0)
        logl = torch.log(torch.exp(stats_p[..., 0] - row_max + stats_p[..., 1]).sum(0))
        stats, tlogit = torch.stack((row_max, logl), -1), tgl_p.sum(0)
    # (max - target logit) first: near-equal large logits cancel exactly before log(sum) is added
    per_row = torch.where(keep, (stats[:, 0] - tlogit) + stats[:, 1], torch.zeros_like(tlogit))
    denom = None
    if reduction == "none":
        loss = per_row.to(dt)
    elif reduction == "sum":  # float64 over N values: the scalar is rounded once
        loss = per_row.to(torch.float64).sum().to(dt)
    else:
        denom = n_keep[0].to(torch.float64).clamp(min=1)
        loss = (per_row.to(torch.float64).sum() / denom).to(dt)
    no_ids = lambda: order.new_empty(0, dtype=torch.int64)  # noqa: E731  (outputs never alias each other)
    sampled = sidx.gather(0, smax.argmax(0, keepdim=True))[0].long() if sample else no_ids()
    argmax = aidx.gather(0, amax.argmax(0, keepdim=True))[0].long() if want_argmax else no_ids()
    if denom is None:
        denom = tlogit.new_empty(0, dtype=torch.float64)
    return loss, sampled, argmax, order, n_keep, stats, denom


@torch.library.register_fake(OP_FWD)
def _lce_fwd_fake(hidden, weight, bias, targets, ignore_index, reduction, sample, temperature, seed, disallow,
                  want_argmax):
    N = hidden.shape[0]
    acc = _dtypes(hidden.dtype)[0]
    i64 = dict(dtype=torch.int64)
    return (hidden.new_empty(N if reduction == "none" else ()), hidden.new_empty(N if sample else 0, **i64),
            hidden.new_empty(N if want_argmax else 0, **i64), hidden.new_empty(N, dtype=torch.int32),
            hidden.new_empty(1, dtype=torch.int32), hidden.new_empty(N, 2, dtype=acc),
            hidden.new_empty(() if reduction == "mean" else 0, dtype=torch.float64))


@torch.library.register_kernel(OP_BWD, ("cpu", "cuda"))
def _lce_bwd(grad_loss, hidden, weight, bias, targets, order, n_keep, lse, denom, reduction, need_h, need_w, need_b):
    """``(d hidden, d weight, d bias)``, each an empty tensor when not needed."""
    N, E = hidden.shape
    V = weight.shape[0]
    dt = hidden.dtype
    acc, dot_dt, prec = _dtypes(dt)
    interp = _interpreting()
    dev = hidden.device
    if reduction == "none":
        coef, coef_stride = grad_loss.to(acc).contiguous(), 1
    elif reduction == "sum":
        coef, coef_stride = grad_loss.to(acc).reshape(1), 0
    else:
        coef, coef_stride = (grad_loss.to(torch.float64) / denom).to(acc).reshape(1), 0
    lse = lse.contiguous()
    cfg = _config(N, E, V, dt, dev)
    common = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), targets.stride(0))
    flags = dict(IN_DT=_TL[dt], DOT_DT=dot_dt, PREC=prec, ACC=_TL[acc], INTERP=interp,
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    b_arg = bias if bias is not None else weight
    dh = dw = db = None
    if need_h:
        BN, BV, BE, BEO = cfg["dh"]
        row_blocks, e_blocks = triton.cdiv(N, BN), triton.cdiv(E, BEO)
        S, per = _splits(row_blocks * e_blocks, triton.cdiv(V, BV), cfg, "dh_splits")
        part = new_output((S, N, E), acc, dev) if S > 1 else None
        dh = new_output((N, E), dt, dev) if S == 1 else None
        if N > 0 and E > 0:
            _lce_bwd_dh_kernel[(row_blocks, e_blocks, S)](
                hidden, weight, b_arg, targets, order, n_keep, lse, coef, part if S > 1 else dh,
                N, V, E, per, coef_stride, *common, HAS_BIAS=bias is not None, PARTIAL=S > 1,
                BLOCK_N=BN, BLOCK_V=BV, BLOCK_E=BE, BLOCK_EO=BEO, **flags)
            if S > 1:
                dh = part.sum(0).to(dt)
        elif dh is None:
            dh = torch.zeros((N, E), dtype=dt, device=dev)
    if need_w or need_b:
        BN, BV, BE, BEO = cfg["dw"]
        e_blocks = max(1, triton.cdiv(E, BEO)) if need_w else 1
        dw = new_output((V, E), weight.dtype, dev) if need_w else None
        db = new_output((V,), bias.dtype, dev) if need_b else None
        _lce_bwd_dw_kernel[(triton.cdiv(V, BV), e_blocks)](
            hidden, weight, b_arg, targets, order, n_keep, lse, coef,
            dw if dw is not None else lse, db if db is not None else lse,
            N, V, E, coef_stride, *common, HAS_BIAS=bias is not None, DW=bool(need_w), DB=bool(need_b),
            BLOCK_N=BN, BLOCK_V=BV, BLOCK_E=BE, BLOCK_EO=BEO, **flags)
    return tuple(hidden.new_empty(0) if t is None else t for t in (dh, dw, db))


@torch.library.register_fake(OP_BWD)
def _lce_bwd_fake(grad_loss, hidden, weight, bias, targets, order, n_keep, lse, denom, reduction, need_h, need_w,
                  need_b):
    empty = lambda: hidden.new_empty(0)  # noqa: E731
    return (hidden.new_empty(hidden.shape) if need_h else empty(), weight.new_empty(weight.shape) if need_w else empty(),
            bias.new_empty(bias.shape) if need_b else empty())


def _lce_setup(ctx, inputs, output):
    hidden, weight, bias, targets, _, reduction = inputs[:6]
    _, _, _, order, n_keep, lse, denom = output
    ctx.reduction = reduction
    ctx.save_for_backward(hidden, weight, bias, targets, order, n_keep, lse, denom)


def _lce_backward(ctx, grad_loss, *_):
    hidden, weight, bias, targets, order, n_keep, lse, denom = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dh, dw, db = torch.ops.pyobjectives_triton.linear_cross_entropy_bwd(
        grad_loss, hidden, weight, bias, targets, order, n_keep, lse, denom, ctx.reduction, need_h, need_w, need_b)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None) + (None,) * 8


torch.library.register_autograd(OP_FWD, _lce_backward, setup_context=_lce_setup)


def not_supported_reasons(inputs) -> list:
    reasons = []
    h = inputs["hidden"]
    if h.dtype not in _FLOATS:
        reasons.append(f"hidden dtype {h.dtype} is not one of float16, bfloat16, float32, float64")
    N, V = h.shape[0], inputs["weight"].shape[0]
    if N >= 2**31 or V >= 2**31:
        reasons.append(f"N={N}, V={V}: rows and vocabulary ids are indexed with int32")
    return reasons


def linear_cross_entropy(hidden, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", sample=False,
                         temperature=1.0, seed=None, disallow=None, return_argmax=False):
    """Triton backend of :func:`pyobjectives.linear_cross_entropy` (arguments already validated there).

    ``return_argmax=True`` (not part of the public signature; used by
    :class:`pyobjectives.nn.ElectraObjective`) appends ``argmax_v z [N]`` from the same sweep.
    """
    loss, sampled, argmax, *_ = torch.ops.pyobjectives_triton.linear_cross_entropy_fwd(
        hidden, weight, bias, targets, int(ignore_index), reduction, bool(sample), float(temperature),
        seed_tensor(seed) if sample else None, disallow, bool(return_argmax))
    if not sample and not return_argmax:
        return loss
    return (loss,) + ((sampled,) if sample else ()) + ((argmax,) if return_argmax else ())
