// CUDA two-stream attention, backward, deterministic (no floating-point atomics):
//   delta_kernel    rowsum(dO * O) per row of both streams
//   dq_kernel       one CTA per row set (as the forward): dq, and per-set segment sums
//   dkdv_kernel     one CTA per key tile over all row sets of its batch: dk, dv, colsum(dS) . k
//   dr_kernel       one CTA per block diagonal (its tiles share one r band): dr band and the unscaled
//                   dS summed per band column (T5 per-distance gradient, r_r_bias gradient)
//   combine_kernel  fixed-order sums of those partials into AttentionBackward's per-(b, h) buffers
// Every pass recomputes the probabilities from the saved logsumexp.
#include "launchers.h"
#include "two_stream_attention_common.cuh"

namespace pyobjectives::cuda {
namespace tsa {

template <typename T>
__global__ void delta_kernel(AttentionParams p, AttentionBackward g, Workspace ws) {
  const int64_t n_h = p.B * p.Lq * p.H, n_g = ws.delta_g != nullptr && p.q_g.ptr != nullptr ? p.B * p.P * p.H : 0;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t idx = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; idx < n_h + n_g; idx += warps) {
    const bool content = idx < n_h;
    const int64_t i = content ? idx : idx - n_h, rows = content ? p.Lq : p.P;
    const int64_t h = i % p.H, row = (i / p.H) % rows, b = i / (p.H * rows);
    const Strided4 dO = content ? g.do_h : g.do_g;
    const Strided4 O = content ? g.out_h : g.out_g;
    const T* x = row_ptr<T>(dO, b, row, h);
    const T* y = row_ptr<T>(O, b, row, h);
    float acc = 0.f;
    for (int64_t d = lane; d < p.D; d += 32) acc += to_f(x[d * dO.s3]) * to_f(y[d * O.s3]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) (content ? ws.delta_h : ws.delta_g)[(b * p.H + h) * rows + row] = acc;
  }
}

// Per-thread row state of a backward tile: logsumexp, delta, HF-uniform empty row.
struct BwdRows {
  float lse[2], delta[2];
  bool uniform[2];
};
__device__ __forceinline__ BwdRows bwd_rows(const Features& f, const RowTable& rt, const ThreadRows& tr) {
  BwdRows r;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    r.lse[k] = rt.lse[thread_row(k)];
    r.delta[k] = rt.delta[thread_row(k)];
    r.uniform[k] = f.uniform && tr.valid[k] && r.lse[k] == INFINITY;
  }
  return r;
}

// s (scores) -> dS (unscaled) in place; the dropped probabilities P * keep / (1 - p) go to the
// [rows, keys] tile pd (row stride ld) when given. dp holds dO V^T on entry.
template <typename T, int NB>
__device__ __forceinline__ void softmax_grad(const AttentionParams& p, const Features& f, const ThreadRows& tr,
                                             const BwdRows& br, int64_t n0, float (&s)[NB][4],
                                             const float (&dp)[NB][4], T* pd, int ld) {
  const int t = (threadIdx.x & 31) & 3;
  const float uni = p.Lk > 0 ? 1.f / float(p.Lk) : 0.f;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = e >> 1;
      const int64_t j = n0 + nb * 8 + 2 * t + (e & 1);
      const float pr = br.uniform[k] ? (j < p.Lk ? uni : 0.f) : expf(s[nb][e] - br.lse[k]);
      float kf = 1.f;
      if (f.dropout && pr != 0.f) kf = keep_bit(f, tr.drop(k), j, p.dropout_p) ? f.inv_keep : 0.f;
      s[nb][e] = pr * (dp[nb][e] * kf - br.delta[k]);
      if (pd != nullptr) pd[thread_row(k) * ld + nb * 8 + 2 * t + (e & 1)] = from_f<T>(pr * kf);
    }
}

// ---- dq ------------------------------------------------------------------------------------------

template <int D>
struct WarpScratch {  // per warp: fp32 skew scratch, then the bf16 un-skewed dS band (same bytes)
  using C = Cfg<D>;
  static constexpr int kBytes0 = 16 * C::BD_STRIDE * 4, kBytes1 = 16 * C::DB_STRIDE * 2;
  static constexpr int kBytes = ((kBytes0 > kBytes1 ? kBytes0 : kBytes1) + 15) / 16 * 16;
};

template <int D>
constexpr bool kDqDoInSmem = D == 64;

template <typename T, int D>
struct DqSmem {
  using C = Cfg<D>;
  union {
    T stage[kBM * D];                                // q, then dO, read into registers
    __align__(16) char scratch[kWarps][WarpScratch<D>::kBytes];
    float red[kWarps][2 + 2 * D];                    // segment sums at the end
  } u;
  T k[2][C::BN * D];
  T v[2][C::BN * D];
  T r[2][C::BAND * D];
  // dO stays staged for D = 64 (its A fragments are reloaded per tile: registers are the limit there);
  // for D = 128 shared memory is the limit, so dO lives in registers
  T dO[kDqDoInSmem<D> ? kBM * D : 8];
  RowTable rt;
};

// acc (16 x D) += dband (the warp's bf16 [16, DB_STRIDE] scratch, k16 blocks kb_lo..kb_hi) * R_band.
template <typename T, int D>
__device__ __forceinline__ void band_times_r(float (&acc)[D / 8][4], const T* sdb, const T* sR, int kb_lo, int kb_hi) {
  using C = Cfg<D>;
  const RowCol rc = ldsm_a_lane(threadIdx.x & 31);
  for (int kb = kb_lo; kb <= kb_hi; ++kb) {
    uint32_t a[4];
    ldsm_x4(sdb + rc.r * C::DB_STRIDE + kb * 16 + rc.c, a[0], a[1], a[2], a[3]);
#pragma unroll
    for (int nd2 = 0; nd2 < D / 16; ++nd2) {
      uint32_t b0, b1, b2, b3;
      ldsm_x4_t(sR + swz<D>(kb * 16 + rc.r, nd2 * 16 + rc.c), b0, b1, b2, b3);
      mma<T>(acc[2 * nd2], a, b0, b1);
      mma<T>(acc[2 * nd2 + 1], a, b2, b3);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(AttentionParams p, AttentionBackward g, Workspace ws,
                                                      Features f, int n_mb, int maxc) {
  using C = Cfg<D>;
  extern __shared__ __align__(16) char smem_raw[];
  DqSmem<T, D>& sm = *reinterpret_cast<DqSmem<T, D>*>(smem_raw);
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, t = lane & 3;
  const int n_sets = n_mb + maxc;
  float* set_part = f.seg ? ws.set_part + ((b * p.H + h) * n_sets + blockIdx.x) * (2 + 2 * D) : nullptr;
  RowSet rs;
  if (!row_set(p, ws, b, n_mb, maxc, blockIdx.x, rs)) {
    if (set_part != nullptr)
      for (int i = threadIdx.x; i < 2 + 2 * D; i += kThreads) set_part[i] = 0.f;
    return;
  }
  const int64_t m0 = int64_t(rs.m_blk) * kBM;
  const Strided4 qt = rs.content ? p.q : p.q_g;
  const Strided4 dot = rs.content ? g.do_h : g.do_g;

  fill_rows(p, f, ws, b, h, rs, sm.rt, g.lse_h, g.lse_g, ws.delta_h, ws.delta_g);
  __syncthreads();
  load_tile<T, D, kBM>(sm.u.stage, qt, vectorizable<T>(qt), b, h, TableRows{sm.rt.row});
  cp_async_fence();
  cp_async_wait<0>();
  __syncthreads();
  if (f.seg) segment_terms<T, D>(p, h, sm.u.stage, sm.rt);
  constexpr bool kDoSmem = kDqDoInSmem<D>;
  uint32_t qa[C::KD][4], doa[kDoSmem ? 1 : C::KD][4];
  load_a_frags<T, D>(sm.u.stage, qa);
  __syncthreads();
  T* do_stage = kDoSmem ? sm.dO : sm.u.stage;
  load_tile<T, D, kBM>(do_stage, dot, vectorizable<T>(dot), b, h, TableRows{sm.rt.row});
  cp_async_fence();
  cp_async_wait<0>();
  __syncthreads();
  if constexpr (!kDoSmem) load_a_frags<T, D>(do_stage, doa);
  __syncthreads();  // sm.u becomes the per-warp scratch
  ThreadRows tr;
  thread_rows(sm.rt, rs, tr);
  const BwdRows br = bwd_rows(f, sm.rt, tr);
  float* sbd = reinterpret_cast<float*>(sm.u.scratch[warp]);
  T* sdb = reinterpret_cast<T*>(sm.u.scratch[warp]);

  const int64_t n_nb = ceil_div(p.Lk, C::BN);
  const bool kvec = vectorizable<T>(p.k), vvec = vectorizable<T>(p.v), rvec = f.r && vectorizable<T>(p.r);
  const float* wk = f.wk ? ws.wk + (b * p.H + h) * p.Lk : nullptr;
  const float* rr = f.r ? ws.rr + ((p.r.s0 != 0 ? b : 0) * p.H + h) * p.R : nullptr;
  auto load_stage = [&](int st, int64_t nt) {
    const int64_t n0 = nt * C::BN;
    load_tile<T, D, C::BN>(sm.k[st], p.k, kvec, b, h, RangeRows{n0, p.Lk});
    load_tile<T, D, C::BN>(sm.v[st], p.v, vvec, b, h, RangeRows{n0, p.Lk});
    if (f.r) load_tile<T, D, C::BAND>(sm.r[st], p.r, rvec, b, h, RangeRows{band_start(p.Lq, m0, n0), p.R});
    cp_async_fence();
  };

  float dq[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;
  float de0[2] = {0.f, 0.f}, de1[2] = {0.f, 0.f};

  if (n_nb > 0) load_stage(0, 0);
  for (int64_t nt = 0; nt < n_nb; ++nt) {
    if (nt + 1 < n_nb) {
      load_stage(int((nt + 1) & 1), nt + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int st = int(nt & 1);
    const int64_t n0 = nt * C::BN;
    float s[C::NB][4], dp[C::NB][4];
    uint32_t differ;
    score_tile<T, D>(p, f, tr, rs.content, b, h, n0, band_start(p.Lq, m0, n0), qa, sm.k[st], sm.r[st], sbd, wk, rr,
                     s, differ);
#pragma unroll
    for (int nb = 0; nb < C::NB; ++nb) dp[nb][0] = dp[nb][1] = dp[nb][2] = dp[nb][3] = 0.f;
    if constexpr (kDoSmem) {
      uint32_t da[C::KD][4];
      load_a_frags<T, D>(sm.dO, da);
      mma_abt<T, D, C::NB>(dp, da, sm.v[st]);
    } else {
      mma_abt<T, D, C::NB>(dp, doa, sm.v[st]);
    }
    softmax_grad<T, C::NB>(p, f, tr, br, n0, s, dp, static_cast<T*>(nullptr), 0);
#pragma unroll
    for (int nb = 0; nb < C::NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = s[nb][e] * p.scale;
        if (f.seg) {
          if ((differ >> (nb * 4 + e)) & 1u) de1[e >> 1] += x;
          else de0[e >> 1] += x;
        }
        s[nb][e] = x;
      }
    uint32_t pa[C::NB / 2][4];
    c_to_a<T, C::NB>(s, pa);
    mma_ab<T, D, C::NB / 2>(dq, pa, sm.k[st]);
    if (f.r) {
      // inverse skew: row i's dS for key n0 + c belongs to band column off_i + c
      int lo, hi;
      band_blocks<C::BN>(tr, lo, hi);
      const int kb_lo = lo >> 1, kb_hi = hi >> 1;
      __syncwarp();
      for (int idx = lane; idx < 16 * (kb_hi - kb_lo + 1) * 8; idx += 32) {
        const int row = idx / ((kb_hi - kb_lo + 1) * 8), c2 = idx % ((kb_hi - kb_lo + 1) * 8);
        *reinterpret_cast<uint32_t*>(sdb + row * C::DB_STRIDE + kb_lo * 16 + 2 * c2) = 0u;
      }
      __syncwarp();
#pragma unroll
      for (int nb = 0; nb < C::NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (tr.valid[e >> 1])
            sdb[(gq + 8 * (e >> 1)) * C::DB_STRIDE + tr.off[e >> 1] + nb * 8 + 2 * t + (e & 1)] = from_f<T>(s[nb][e]);
      __syncwarp();
      band_times_r<T, D>(dq, sdb, sm.r[st], kb_lo, kb_hi);
    }
    __syncthreads();
  }

  // segment term of dq: dE_s per row times seg_embed[s]
#pragma unroll
  for (int k = 0; k < 2; ++k) de0[k] = quad_sum(de0[k]), de1[k] = quad_sum(de1[k]);
  const Strided4 dqt = rs.content ? g.dq : g.dq_g;
  const bool ovec = dqt.s3 == 1 && reinterpret_cast<uintptr_t>(dqt.ptr) % 4 == 0 && dqt.s0 % 2 == 0 &&
                    dqt.s1 % 2 == 0 && dqt.s2 % 2 == 0;
  const float* se0 = f.seg ? p.seg_embed + h * D : nullptr;
  const float* se1 = f.seg ? p.seg_embed + (p.H + h) * D : nullptr;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int row = sm.rt.row[thread_row(k)];
    if (row < 0) continue;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const int d = nd * 8 + 2 * t;
      float x0 = dq[nd][2 * k], x1 = dq[nd][2 * k + 1];
      if (f.seg) x0 += de0[k] * se0[d] + de1[k] * se1[d], x1 += de0[k] * se0[d + 1] + de1[k] * se1[d + 1];
      store_pair<T>(dqt, b, row, h, d, x0, x1, ovec);
    }
  }

  if (f.seg) {
    // per-set sums: sum de_s and sum de_s q (q from the A fragments: a0 (g, 2t..), a1 (g+8, 2t..),
    // a2 (g, 2t+8..), a3 (g+8, 2t+8..) of each k16 step)
    const float s0 = group_sum(de0[0] + de0[1]), s1 = group_sum(de1[0] + de1[1]);
    if (lane == 0) sm.u.red[warp][0] = s0, sm.u.red[warp][1] = s1;
#pragma unroll
    for (int kk = 0; kk < C::KD; ++kk)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t lo = qa[kk][2 * half], hi = qa[kk][2 * half + 1];  // rows g and g + 8
        const T* ql = reinterpret_cast<const T*>(&lo);
        const T* qh = reinterpret_cast<const T*>(&hi);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int d = kk * 16 + half * 8 + 2 * t + e;
          const float a = group_sum(de0[0] * to_f(ql[e]) + de0[1] * to_f(qh[e]));
          const float z = group_sum(de1[0] * to_f(ql[e]) + de1[1] * to_f(qh[e]));
          if (gq == 0) sm.u.red[warp][2 + d] = a, sm.u.red[warp][2 + D + d] = z;
        }
      }
    __syncthreads();
    const float* rsb = p.r_s_bias + h * D;
    for (int i = threadIdx.x; i < 2 + 2 * D; i += kThreads) {
      float x = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) x += sm.u.red[w][i];
      if (i >= 2) {  // sum de_s (q + r_s_bias) = sum de_s q + (sum de_s) r_s_bias
        const int s_idx = (i - 2) / D, d = (i - 2) % D;
        float tot = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) tot += sm.u.red[w][s_idx];
        x += tot * rsb[d];
      }
      set_part[i] = x;
    }
  }
}

// ---- dk, dv --------------------------------------------------------------------------------------

template <typename T, int D>
struct DkvSmem {
  using C = Cfg<D>;
  T k[C::BN * D];
  T v[C::BN * D];
  T q[kBM * D];
  T dO[kBM * D];
  T r[C::BAND * D];
  float bd[kWarps][16 * C::BD_STRIDE];
  T pd[kBM * C::P_STRIDE];  // [rows, keys] dropped probabilities
  T ds[kBM * C::P_STRIDE];  // [rows, keys] scaled dS
  RowTable rt;
  float cs[kWarps][C::BN];
};

// acc (16 keys x DW head dims from d0) += X^T (the [64 rows, keys] tile x, keys kr0..kr0+15) * Y (rows x D).
template <typename T, int D, int DW>
__device__ __forceinline__ void mma_xt_y(float (&acc)[DW / 8][4], const T* x, const T* y, int kr0, int d0) {
  using C = Cfg<D>;
  const RowCol at = ldsm_at_lane(threadIdx.x & 31), bl = ldsm_a_lane(threadIdx.x & 31);
#pragma unroll
  for (int kb = 0; kb < kBM / 16; ++kb) {
    uint32_t a[4];
    ldsm_x4_t(x + (kb * 16 + at.r) * C::P_STRIDE + kr0 + at.c, a[0], a[1], a[2], a[3]);
#pragma unroll
    for (int nd2 = 0; nd2 < DW / 16; ++nd2) {
      uint32_t b0, b1, b2, b3;
      ldsm_x4_t(y + swz<D>(kb * 16 + bl.r, d0 + nd2 * 16 + bl.c), b0, b1, b2, b3);
      mma<T>(acc[2 * nd2], a, b0, b1);
      mma<T>(acc[2 * nd2 + 1], a, b2, b3);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dkdv_kernel(AttentionParams p, AttentionBackward g, Workspace ws,
                                                        Features f, int n_mb, int maxc) {
  using C = Cfg<D>;
  constexpr int kKeyWarps = C::BN / 16;           // warps along the key tile in the dk / dv products
  constexpr int DW = D * kKeyWarps / kWarps;      // head dims per warp there
  extern __shared__ __align__(16) char smem_raw[];
  DkvSmem<T, D>& sm = *reinterpret_cast<DkvSmem<T, D>*>(smem_raw);
  const int64_t b = blockIdx.z, h = blockIdx.y, n0 = int64_t(blockIdx.x) * C::BN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, t = lane & 3;
  const int kr0 = (warp % kKeyWarps) * 16, d0 = (warp / kKeyWarps) * DW;

  load_tile<T, D, C::BN>(sm.k, p.k, vectorizable<T>(p.k), b, h, RangeRows{n0, p.Lk});
  load_tile<T, D, C::BN>(sm.v, p.v, vectorizable<T>(p.v), b, h, RangeRows{n0, p.Lk});
  cp_async_fence();
  const bool rvec = f.r && vectorizable<T>(p.r);
  const float* wk = f.wk ? ws.wk + (b * p.H + h) * p.Lk : nullptr;
  const float* rr = f.r ? ws.rr + ((p.r.s0 != 0 ? b : 0) * p.H + h) * p.R : nullptr;

  float dk[DW / 8][4], dv[DW / 8][4];
#pragma unroll
  for (int nd = 0; nd < DW / 8; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;
  // colsum(dS) per key: each warp sums its rows into its own row of sm.cs (lanes own columns)
  for (int i = threadIdx.x; i < kWarps * C::BN; i += kThreads) sm.cs[i / C::BN][i % C::BN] = 0.f;

  for (int x = 0; x < n_mb + maxc; ++x) {
    RowSet rs;
    if (!row_set(p, ws, b, n_mb, maxc, x, rs)) continue;
    const int64_t m0 = int64_t(rs.m_blk) * kBM;
    const Strided4 qt = rs.content ? p.q : p.q_g;
    const Strided4 dot = rs.content ? g.do_h : g.do_g;
    __syncthreads();  // the previous set's tiles are consumed
    fill_rows(p, f, ws, b, h, rs, sm.rt, g.lse_h, g.lse_g, ws.delta_h, ws.delta_g);
    __syncthreads();
    load_tile<T, D, kBM>(sm.q, qt, vectorizable<T>(qt), b, h, TableRows{sm.rt.row});
    load_tile<T, D, kBM>(sm.dO, dot, vectorizable<T>(dot), b, h, TableRows{sm.rt.row});
    if (f.r) load_tile<T, D, C::BAND>(sm.r, p.r, rvec, b, h, RangeRows{band_start(p.Lq, m0, n0), p.R});
    cp_async_fence();
    cp_async_wait<0>();
    __syncthreads();
    if (f.seg) {
      segment_terms<T, D>(p, h, sm.q, sm.rt);
      __syncthreads();
    }
    ThreadRows tr;
    thread_rows(sm.rt, rs, tr);
    const BwdRows br = bwd_rows(f, sm.rt, tr);
    float s[C::NB][4], dp[C::NB][4];
    {
      uint32_t qa[C::KD][4];
      load_a_frags<T, D>(sm.q, qa);
      uint32_t differ;
      score_tile<T, D>(p, f, tr, rs.content, b, h, n0, band_start(p.Lq, m0, n0), qa, sm.k, sm.r, sm.bd[warp], wk,
                       rr, s, differ);
    }
    {
      uint32_t doa[C::KD][4];
      load_a_frags<T, D>(sm.dO, doa);
#pragma unroll
      for (int nb = 0; nb < C::NB; ++nb) dp[nb][0] = dp[nb][1] = dp[nb][2] = dp[nb][3] = 0.f;
      mma_abt<T, D, C::NB>(dp, doa, sm.v);
    }
    softmax_grad<T, C::NB>(p, f, tr, br, n0, s, dp, sm.pd, C::P_STRIDE);
#pragma unroll
    for (int nb = 0; nb < C::NB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nb][e] *= p.scale;
        sm.ds[thread_row(e >> 1) * C::P_STRIDE + nb * 8 + 2 * t + (e & 1)] = from_f<T>(s[nb][e]);
      }
#pragma unroll
      for (int c2 = 0; c2 < 2; ++c2) {
        const float x = group_sum(s[nb][c2] + s[nb][2 + c2]);
        if (gq == 0) sm.cs[warp][nb * 8 + 2 * t + c2] += x;
      }
    }
    __syncthreads();
    mma_xt_y<T, D, DW>(dv, sm.pd, sm.dO, kr0, d0);
    mma_xt_y<T, D, DW>(dk, sm.ds, sm.q, kr0, d0);
  }
  cp_async_wait<0>();  // K / V staged even when no row set exists

  __syncthreads();  // colsum over warps in a fixed order
  if (threadIdx.x < C::BN) {
    float x = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) x += sm.cs[w][threadIdx.x];
    sm.cs[0][threadIdx.x] = x;  // each column is read and rewritten by its own thread only
  }
  __syncthreads();
  const float* rwb = p.r_w_bias != nullptr ? p.r_w_bias + h * D : nullptr;
  float* dk_out = g.dk + (b * p.H + h) * p.Lk * D;
  float* dv_out = g.dv + (b * p.H + h) * p.Lk * D;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int key = kr0 + gq + 8 * k;
    const int64_t j = n0 + key;
    if (j >= p.Lk) continue;
    const float c = sm.cs[0][key];
#pragma unroll
    for (int nd = 0; nd < DW / 8; ++nd) {
      const int d = d0 + nd * 8 + 2 * t;
      float2 a = make_float2(dk[nd][2 * k], dk[nd][2 * k + 1]);
      if (rwb != nullptr) a.x += c * rwb[d], a.y += c * rwb[d + 1];  // d/dk of (q + r_w_bias) . k
      *reinterpret_cast<float2*>(dk_out + j * D + d) = a;
      *reinterpret_cast<float2*>(dv_out + j * D + d) = make_float2(dv[nd][2 * k], dv[nd][2 * k + 1]);
    }
  }
  // r_w_bias gradient part of this key tile: sum_j colsum_j k_j (keys past Lk are zero rows)
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float x = 0.f;
    for (int j = 0; j < C::BN; ++j) x += sm.cs[0][j] * to_f(sm.k[swz<D>(j, d)]);
    ws.key_part[((b * p.H + h) * gridDim.x + blockIdx.x) * D + d] = x;
  }
}

// ---- dr and the T5 per-distance gradient, per block diagonal --------------------------------------

template <typename T, int D>
struct DrSmem {
  using C = Cfg<D>;
  T r[C::BAND * D];
  T q[kBM * D];
  T dO[kBM * D];
  union {
    struct {
      T k[C::BN * D];
      T v[C::BN * D];
      float bd[kWarps][16 * C::BD_STRIDE];
    } tile;                        // until dS is known
    float band[kBM][C::BAND + 4];  // then: unscaled dS un-skewed onto the band
  } u;
  RowTable rt;
  float colsum[C::BAND];
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dr_kernel(AttentionParams p, AttentionBackward g, Workspace ws,
                                                      Features f, int n_mb, int maxc) {
  using C = Cfg<D>;
  constexpr int kUnits = (C::BAND / 16) * (D / 64) / kWarps;  // (16 band rows x 64 dims) blocks per warp
  static_assert((C::BAND / 16) * (D / 64) % kWarps == 0, "dr units must split evenly over the warps");
  extern __shared__ __align__(16) char smem_raw[];
  DrSmem<T, D>& sm = *reinterpret_cast<DrSmem<T, D>*>(smem_raw);
  const int64_t b = blockIdx.z, h = blockIdx.y, di = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, t = lane & 3;
  const int64_t n_nb = ceil_div(p.Lk, C::BN), n_diag = gridDim.x;
  const int64_t diag = di - int64_t(n_mb - 1) * C::BM_PER_BN;
  const int64_t t0 = diagonal_band_start<C::BN>(p.Lq, n_mb, di);
  if (f.r) load_tile<T, D, C::BAND>(sm.r, p.r, vectorizable<T>(p.r), b, h, RangeRows{t0, p.R});
  cp_async_fence();
  const float* wk = f.wk ? ws.wk + (b * p.H + h) * p.Lk : nullptr;
  const float* rr = f.r ? ws.rr + ((p.r.s0 != 0 ? b : 0) * p.H + h) * p.R : nullptr;

  float dr[kUnits][8][4];
#pragma unroll
  for (int i = 0; i < kUnits; ++i)
#pragma unroll
    for (int nd = 0; nd < 8; ++nd) dr[i][nd][0] = dr[i][nd][1] = dr[i][nd][2] = dr[i][nd][3] = 0.f;
  float colsum = 0.f;  // thread tid < BAND owns band column tid

  for (int x = 0; x < n_mb + maxc; ++x) {
    RowSet rs;
    if (!row_set(p, ws, b, n_mb, maxc, x, rs)) continue;
    const int64_t n_blk = diag + int64_t(rs.m_blk) * C::BM_PER_BN;
    if (n_blk < 0 || n_blk >= n_nb) continue;
    const int64_t m0 = int64_t(rs.m_blk) * kBM, n0 = n_blk * C::BN;
    const Strided4 qt = rs.content ? p.q : p.q_g;
    const Strided4 dot = rs.content ? g.do_h : g.do_g;
    __syncthreads();
    fill_rows(p, f, ws, b, h, rs, sm.rt, g.lse_h, g.lse_g, ws.delta_h, ws.delta_g);
    __syncthreads();
    load_tile<T, D, kBM>(sm.q, qt, vectorizable<T>(qt), b, h, TableRows{sm.rt.row});
    load_tile<T, D, kBM>(sm.dO, dot, vectorizable<T>(dot), b, h, TableRows{sm.rt.row});
    load_tile<T, D, C::BN>(sm.u.tile.k, p.k, vectorizable<T>(p.k), b, h, RangeRows{n0, p.Lk});
    load_tile<T, D, C::BN>(sm.u.tile.v, p.v, vectorizable<T>(p.v), b, h, RangeRows{n0, p.Lk});
    cp_async_fence();
    cp_async_wait<0>();
    __syncthreads();
    if (f.seg) {
      segment_terms<T, D>(p, h, sm.q, sm.rt);
      __syncthreads();
    }
    ThreadRows tr;
    thread_rows(sm.rt, rs, tr);
    const BwdRows br = bwd_rows(f, sm.rt, tr);
    float s[C::NB][4], dp[C::NB][4];
    {
      uint32_t qa[C::KD][4];
      load_a_frags<T, D>(sm.q, qa);
      uint32_t differ;
      score_tile<T, D>(p, f, tr, rs.content, b, h, n0, band_start(p.Lq, m0, n0), qa, sm.u.tile.k, sm.r,
                       sm.u.tile.bd[warp], wk, rr, s, differ);
    }
    {
      uint32_t doa[C::KD][4];
      load_a_frags<T, D>(sm.dO, doa);
#pragma unroll
      for (int nb = 0; nb < C::NB; ++nb) dp[nb][0] = dp[nb][1] = dp[nb][2] = dp[nb][3] = 0.f;
      mma_abt<T, D, C::NB>(dp, doa, sm.u.tile.v);
    }
    softmax_grad<T, C::NB>(p, f, tr, br, n0, s, dp, static_cast<T*>(nullptr), 0);
    __syncthreads();  // every warp is done with K, V and its skew scratch (the same bytes as sm.u.band)
    for (int idx = lane; idx < 16 * (C::BAND + 4); idx += 32) sm.u.band[warp * 16 + idx / (C::BAND + 4)][idx % (C::BAND + 4)] = 0.f;
    __syncwarp();
#pragma unroll
    for (int nb = 0; nb < C::NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (tr.valid[e >> 1]) sm.u.band[thread_row(e >> 1)][tr.off[e >> 1] + nb * 8 + 2 * t + (e & 1)] = s[nb][e];
    __syncthreads();
    if (threadIdx.x < C::BAND)
      for (int i = 0; i < kBM; ++i) colsum += sm.u.band[i][threadIdx.x];
    if (f.r) {
      // dR_band += (scale dband)^T Q; A fragments of the transposed band read straight from fp32:
      // a0 (band col g, rows 2t, 2t+1), a1 (col g + 8, ...), a2 (col g, rows 2t + 8, +9), a3 (g + 8, ...)
#pragma unroll
      for (int i = 0; i < kUnits; ++i) {
        const int unit = warp * kUnits + i, cb0 = (unit / (D / 64)) * 16, dh = (unit % (D / 64)) * 64;
#pragma unroll
        for (int kb = 0; kb < kBM / 16; ++kb) {
          const int r0 = kb * 16 + 2 * t;
          uint32_t a[4];
          a[0] = Mma<T>::pack(p.scale * sm.u.band[r0][cb0 + gq], p.scale * sm.u.band[r0 + 1][cb0 + gq]);
          a[1] = Mma<T>::pack(p.scale * sm.u.band[r0][cb0 + gq + 8], p.scale * sm.u.band[r0 + 1][cb0 + gq + 8]);
          a[2] = Mma<T>::pack(p.scale * sm.u.band[r0 + 8][cb0 + gq], p.scale * sm.u.band[r0 + 9][cb0 + gq]);
          a[3] = Mma<T>::pack(p.scale * sm.u.band[r0 + 8][cb0 + gq + 8], p.scale * sm.u.band[r0 + 9][cb0 + gq + 8]);
#pragma unroll
          for (int nd2 = 0; nd2 < 4; ++nd2) {
            uint32_t b0, b1, b2, b3;
            const RowCol bl = ldsm_a_lane(lane);
            ldsm_x4_t(sm.q + swz<D>(kb * 16 + bl.r, dh + nd2 * 16 + bl.c), b0, b1, b2, b3);
            mma<T>(dr[i][2 * nd2], a, b0, b1);
            mma<T>(dr[i][2 * nd2 + 1], a, b2, b3);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  if (threadIdx.x < C::BAND) sm.colsum[threadIdx.x] = colsum;
  __syncthreads();
  const int64_t part = (b * p.H + h) * n_diag + di;
  if (threadIdx.x < C::BAND) ws.dt_part[part * C::BAND + threadIdx.x] = colsum;
  if (f.r) {
    // dr_t = sum_i dband_it (q_i + r_r_bias): the bias part is colsum_t * scale * r_r_bias
    const float* rrb = p.r_r_bias + h * D;
    float* out = ws.dr_part + part * C::BAND * D;
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      const int unit = warp * kUnits + i, cb0 = (unit / (D / 64)) * 16, dh = (unit % (D / 64)) * 64;
#pragma unroll
      for (int nd = 0; nd < 8; ++nd)
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int cb = cb0 + gq + 8 * k, d = dh + nd * 8 + 2 * t;
          const float c = p.scale * sm.colsum[cb];
          *reinterpret_cast<float2*>(out + cb * D + d) =
              make_float2(dr[i][nd][2 * k] + c * rrb[d], dr[i][nd][2 * k + 1] + c * rrb[d + 1]);
        }
    }
  }
}

// ---- fixed-order combination into AttentionBackward's per-(b, h) buffers ---------------------------

template <typename T, int D>
__global__ void combine_kernel(AttentionParams p, AttentionBackward g, Workspace ws, Features f, int n_mb, int maxc,
                               int n_nb, int n_diag) {
  using C = Cfg<D>;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t n_dist = p.Lq + p.Lk - 1;
  // band column of r row t in diagonal di's band (BM + BN - 1 real columns)
  auto band_sum = [&](const float* part, int64_t stride, int64_t t, int d) {
    int64_t lo, hi;
    diagonals_covering<C::BN>(p.Lq, n_mb, n_diag, t, &lo, &hi);
    float x = 0.f;
    for (int64_t di = lo; di <= hi; ++di) {
      const int64_t cb = t - diagonal_band_start<C::BN>(p.Lq, n_mb, di);
      if (cb >= 0 && cb < kBM + C::BN - 1) x += part[(bh * n_diag + di) * C::BAND * stride + cb * stride + d];
    }
    return x;
  };
  if (f.r)
    for (int64_t idx = threadIdx.x; idx < p.R * D; idx += blockDim.x)
      g.dr[bh * p.R * D + idx] = band_sum(ws.dr_part, D, idx / D, int(idx % D));
  if (f.t5)
    for (int64_t idx = threadIdx.x; idx < n_dist; idx += blockDim.x)
      g.dt5_dist[bh * n_dist + idx] = band_sum(ws.dt_part, 1, idx + 1, 0);  // column idx reads r row idx + 1
  const int n_sets = n_mb + maxc;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float rw = 0.f;
    for (int kb = 0; kb < n_nb; ++kb) rw += ws.key_part[(bh * n_nb + kb) * D + d];
    float rrg = 0.f;
    if (f.r) {
      const T* r = row_ptr<T>(p.r, b, 0, h);
      for (int64_t t = 0; t < p.R; ++t) rrg += band_sum(ws.dt_part, 1, t, 0) * to_f(r[t * p.r.s1 + d * p.r.s3]);
      rrg *= p.scale;
    }
    float rs = 0.f;
    if (f.seg) {
      float s0 = 0.f, s1 = 0.f, q0 = 0.f, q1 = 0.f;
      for (int x = 0; x < n_sets; ++x) {
        const float* sp = ws.set_part + (bh * n_sets + x) * (2 + 2 * D);
        s0 += sp[0], s1 += sp[1], q0 += sp[2 + d], q1 += sp[2 + D + d];
      }
      rs = s0 * p.seg_embed[h * D + d] + s1 * p.seg_embed[(p.H + h) * D + d];
      g.dseg[(bh * 2) * D + d] = q0;
      g.dseg[(bh * 2 + 1) * D + d] = q1;
    }
    g.dbias[(bh * 3) * D + d] = rw;
    g.dbias[(bh * 3 + 1) * D + d] = rrg;
    g.dbias[(bh * 3 + 2) * D + d] = rs;
  }
}

template <typename K>
void set_smem(K kernel, size_t bytes) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

template <typename T, int D>
void backward_impl(const AttentionParams& p, const AttentionBackward& g, void* workspace, cudaStream_t stream) {
  using C = Cfg<D>;
  static_assert(sizeof(DqSmem<T, D>) <= kMaxSmem, "dq shared memory above 99 KB");
  static_assert(sizeof(DkvSmem<T, D>) <= kMaxSmem, "dk/dv shared memory above 99 KB");
  static_assert(sizeof(DrSmem<T, D>) <= kMaxSmem, "dr shared memory above 99 KB");
  if (p.B == 0 || p.H == 0) return;
  Workspace ws;
  workspace_layout<D, C::BN>(p, true, static_cast<char*>(workspace), &ws);
  const Features f = features(p, ws);
  launch_prepare(p, ws, stream);
  const int n_mb = int(n_row_blocks(p.Lq));
  const int maxc = int(max_chunks(p.has_query_stream() ? p.P : 0, p.Lq));
  const int n_nb = int(ceil_div(p.Lk, C::BN));
  const int n_diag = int(n_diagonals<C::BN>(n_mb, n_nb));
  const int64_t n_rows = p.B * p.H * (p.Lq + (p.has_query_stream() ? p.P : 0));
  if (n_rows > 0)
    delta_kernel<T><<<unsigned(min64(ceil_div(n_rows, 8), 65535)), 256, 0, stream>>>(p, g, ws);
  if (n_mb + maxc > 0) {
    set_smem(dq_kernel<T, D>, sizeof(DqSmem<T, D>));
    dq_kernel<T, D><<<dim3(unsigned(n_mb + maxc), unsigned(p.H), unsigned(p.B)), kThreads, sizeof(DqSmem<T, D>),
                      stream>>>(p, g, ws, f, n_mb, maxc);
  }
  if (n_nb > 0) {
    set_smem(dkdv_kernel<T, D>, sizeof(DkvSmem<T, D>));
    dkdv_kernel<T, D><<<dim3(unsigned(n_nb), unsigned(p.H), unsigned(p.B)), kThreads, sizeof(DkvSmem<T, D>),
                        stream>>>(p, g, ws, f, n_mb, maxc);
  }
  if ((f.r || f.t5) && n_diag > 0) {
    set_smem(dr_kernel<T, D>, sizeof(DrSmem<T, D>));
    dr_kernel<T, D><<<dim3(unsigned(n_diag), unsigned(p.H), unsigned(p.B)), kThreads, sizeof(DrSmem<T, D>),
                      stream>>>(p, g, ws, f, n_mb, maxc);
  }
  combine_kernel<T, D><<<unsigned(p.B * p.H), 256, 0, stream>>>(p, g, ws, f, n_mb, maxc, n_nb, n_diag);
  launch_padding_rows(p, g.dq_g, nullptr, stream);
}

}  // namespace tsa

size_t two_stream_attention_backward_workspace(const AttentionParams& p) {
  return p.D == 128 ? tsa::workspace_layout<128, tsa::Cfg<128>::BN>(p, true, nullptr, nullptr)
                    : tsa::workspace_layout<64, tsa::Cfg<64>::BN>(p, true, nullptr, nullptr);
}

void two_stream_attention_backward(const AttentionParams& p, const AttentionBackward& g, void* workspace,
                                   cudaStream_t stream) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.D == 64) {
    if (bf16) tsa::backward_impl<__nv_bfloat16, 64>(p, g, workspace, stream);
    else tsa::backward_impl<__half, 64>(p, g, workspace, stream);
  } else {
    if (bf16) tsa::backward_impl<__nv_bfloat16, 128>(p, g, workspace, stream);
    else tsa::backward_impl<__half, 128>(p, g, workspace, stream);
  }
}

}  // namespace pyobjectives::cuda
