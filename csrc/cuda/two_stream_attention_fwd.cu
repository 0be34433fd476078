// CUDA two-stream attention, forward: FlashAttention-2 style online softmax over key tiles, one CTA per
// row set (content blocks and query-stream chunks in one launch), fp32 accumulation, logsumexp saved.
// Also the preparation kernels the backward shares (chunk lists, bias dot products, padding rows).
#include "launchers.h"
#include "two_stream_attention_common.cuh"

namespace pyobjectives::cuda {
namespace tsa {

// ---- preparation ---------------------------------------------------------------------------------

// Query-stream rows of batch b grouped by position block (stable counting sort, one warp, no atomics:
// __match_any_sync ranks equal keys), then cut into chunks of <= BM rows; unused slots get count 0.
__global__ void build_chunks_kernel(AttentionParams p, Workspace ws, int n_mb, int maxc) {
  extern __shared__ int counts[];  // [n_mb] counts, then [n_mb] cursors
  int* cursor = counts + n_mb;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x;
  for (int k = lane; k < n_mb; k += 32) counts[k] = 0;
  __syncwarp();
  const int64_t* tp = p.target_pos + b * p.P;
  auto key_of = [&](int64_t i) -> int {
    if (i >= p.P) return -1;
    const int64_t pos = tp[i];
    return pos >= 0 && pos < p.Lq ? int(pos / kBM) : -1;
  };
  const unsigned lt = (1u << lane) - 1u;
  for (int64_t base = 0; base < p.P; base += 32) {
    const int k = key_of(base + lane);
    const unsigned same = __match_any_sync(0xffffffffu, k);
    if (k >= 0 && (same & lt) == 0) counts[k] += __popc(same);
    __syncwarp();
  }
  if (lane == 0) {
    int start = 0, c = 0;
    int* chunks = ws.chunks + b * maxc * 3;
    for (int k = 0; k < n_mb; ++k) {
      cursor[k] = start;
      for (int s = 0; s < counts[k]; s += kBM, ++c) {
        chunks[c * 3] = k;
        chunks[c * 3 + 1] = start + s;
        chunks[c * 3 + 2] = min(kBM, counts[k] - s);
      }
      start += counts[k];
    }
    for (; c < maxc; ++c) chunks[c * 3] = chunks[c * 3 + 1] = chunks[c * 3 + 2] = 0;
  }
  __syncwarp();
  for (int64_t base = 0; base < p.P; base += 32) {
    const int64_t i = base + lane;
    const int k = key_of(i);
    const unsigned same = __match_any_sync(0xffffffffu, k);
    int at = 0;
    if (k >= 0) at = cursor[k] + __popc(same & lt);
    __syncwarp();
    if (k >= 0) {
      ws.sorted[b * p.P + at] = int(i);
      if ((same & lt) == 0) cursor[k] += __popc(same);
    }
    __syncwarp();
  }
}

// r_w_bias . k_j per key and r_r_bias . r_t per r row, in fp32 (so q + bias is never rounded to the
// input dtype), one warp per dot product, lanes summed in a fixed order.
template <typename T>
__global__ void bias_dots_kernel(AttentionParams p, Workspace ws, int64_t Br) {
  const int64_t n_wk = ws.wk != nullptr ? p.B * p.H * p.Lk : 0;
  const int64_t n_rr = ws.rr != nullptr ? Br * p.H * p.R : 0;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t idx = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; idx < n_wk + n_rr; idx += warps) {
    const T* src;
    const float* bias;
    int64_t s3;
    if (idx < n_wk) {
      const int64_t b = idx / (p.H * p.Lk), h = (idx / p.Lk) % p.H, j = idx % p.Lk;
      src = row_ptr<T>(p.k, b, j, h), bias = p.r_w_bias + h * p.D, s3 = p.k.s3;
    } else {
      const int64_t i = idx - n_wk;
      const int64_t b = i / (p.H * p.R), h = (i / p.R) % p.H, t = i % p.R;
      src = row_ptr<T>(p.r, b, t, h), bias = p.r_r_bias + h * p.D, s3 = p.r.s3;
    }
    float acc = 0.f;
    for (int64_t d = lane; d < p.D; d += 32) acc += to_f(src[d * s3]) * bias[d];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) (idx < n_wk ? ws.wk + idx : ws.rr + (idx - n_wk))[0] = acc;
  }
}

// Query-stream rows that belong to no chunk (target_pos outside [0, Lq)): zeros, lse = +inf.
template <typename T>
__global__ void padding_rows_kernel(AttentionParams p, Strided4 t, float* lse) {
  const int64_t n = p.B * p.P * p.H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * p.D;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = idx % p.D, r = idx / p.D;
    const int64_t h = r % p.H, i = (r / p.H) % p.P, b = r / (p.H * p.P);
    const int64_t pos = p.target_pos[b * p.P + i];
    if (pos >= 0 && pos < p.Lq) continue;
    T* row = const_cast<T*>(row_ptr<T>(t, b, i, h));
    row[d * t.s3] = from_f<T>(0.f);
    if (d == 0 && lse != nullptr) lse[(b * p.H + h) * p.P + i] = INFINITY;
  }
}

template <typename T>
void launch_prepare_t(const AttentionParams& p, const Workspace& ws, cudaStream_t stream) {
  const int n_mb = int(n_row_blocks(p.Lq));
  const int maxc = int(max_chunks(p.has_query_stream() ? p.P : 0, p.Lq));
  if (p.has_query_stream() && p.B > 0)
    build_chunks_kernel<<<unsigned(p.B), 32, 2 * sizeof(int) * size_t(n_mb), stream>>>(p, ws, n_mb, maxc);
  const int64_t Br = p.has_position_term() && p.r.s0 != 0 ? p.B : 1;
  const int64_t n = (ws.wk != nullptr ? p.B * p.H * p.Lk : 0) + (ws.rr != nullptr ? Br * p.H * p.R : 0);
  if (n > 0) bias_dots_kernel<T><<<unsigned(min64(ceil_div(n, 8), 65535)), 256, 0, stream>>>(p, ws, Br);
}

void launch_prepare(const AttentionParams& p, const Workspace& ws, cudaStream_t stream) {
  if (p.dtype == DType::kBFloat16) launch_prepare_t<__nv_bfloat16>(p, ws, stream);
  else launch_prepare_t<__half>(p, ws, stream);
}

void launch_padding_rows(const AttentionParams& p, const Strided4& t, float* lse, cudaStream_t stream) {
  const int64_t n = p.B * p.P * p.H * p.D;
  if (!p.has_query_stream() || n == 0) return;
  const unsigned blocks = unsigned(min64(ceil_div(n, 256), 65535));
  if (p.dtype == DType::kBFloat16) padding_rows_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(p, t, lse);
  else padding_rows_kernel<__half><<<blocks, 256, 0, stream>>>(p, t, lse);
}

// ---- forward -------------------------------------------------------------------------------------

template <typename T, int D>
struct FwdSmem {
  using C = Cfg<D>;
  union {
    T q[kBM * D];                          // staged queries, read once into registers
    float bd[kWarps][16 * C::BD_STRIDE];   // per-warp skew scratch of the position term
  } u;
  T k[2][C::BN * D];
  T v[2][C::BN * D];
  T r[2][C::BAND * D];
  RowTable rt;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(AttentionParams p, AttentionForward o, Workspace ws,
                                                           Features f, int n_mb, int maxc) {
  using C = Cfg<D>;
  extern __shared__ __align__(16) char smem_raw[];
  FwdSmem<T, D>& sm = *reinterpret_cast<FwdSmem<T, D>*>(smem_raw);
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  RowSet rs;
  if (!row_set(p, ws, b, n_mb, maxc, blockIdx.x, rs)) return;
  const int64_t m0 = int64_t(rs.m_blk) * kBM;
  const Strided4 qt = rs.content ? p.q : p.q_g;

  fill_rows(p, f, ws, b, h, rs, sm.rt, nullptr, nullptr, nullptr, nullptr);
  __syncthreads();
  load_tile<T, D, kBM>(sm.u.q, qt, vectorizable<T>(qt), b, h, TableRows{sm.rt.row});
  cp_async_fence();
  cp_async_wait<0>();
  __syncthreads();
  if (f.seg) segment_terms<T, D>(p, h, sm.u.q, sm.rt);
  uint32_t qa[C::KD][4];
  load_a_frags<T, D>(sm.u.q, qa);
  __syncthreads();  // sm.u becomes the skew scratch; rt.e0 / e1 are complete
  ThreadRows tr;
  thread_rows(sm.rt, rs, tr);

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

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float acc[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;

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
    float s[C::NB][4];
    uint32_t differ;
    score_tile<T, D>(p, f, tr, rs.content, b, h, n0, band_start(p.Lq, m0, n0), qa, sm.k[st], sm.r[st],
                     sm.u.bd[warp], wk, rr, s, differ);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < C::NB; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * k], s[nb][2 * k + 1]));
      mx = quad_max(mx);
      const float m_new = fmaxf(m_run[k], mx);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = expf(m_run[k] - m_safe);
      l_run[k] *= alpha;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) acc[nd][2 * k] *= alpha, acc[nd][2 * k + 1] *= alpha;
#pragma unroll
      for (int nb = 0; nb < C::NB; ++nb)
#pragma unroll
        for (int e = 2 * k; e < 2 * k + 2; ++e) {
          float pr = expf(s[nb][e] - m_safe);
          l_run[k] += pr;
          // the normaliser counts dropped entries; 1 / (1 - p) is applied once at the end
          if (f.dropout && pr != 0.f && !keep_bit(f, tr.drop(k), n0 + nb * 8 + 2 * t + (e & 1), p.dropout_p))
            pr = 0.f;
          s[nb][e] = pr;
        }
      m_run[k] = m_new;
    }
    uint32_t pa[C::NB / 2][4];
    c_to_a<T, C::NB>(s, pa);
    mma_ab<T, D, C::NB / 2>(acc, pa, sm.v[st]);
    __syncthreads();
  }

  bool empty[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) l_run[k] = quad_sum(l_run[k]), empty[k] = l_run[k] == 0.f;
  // HF's -1e30 fill: a row with no visible key averages all Lk values (dropout still applies). Rows
  // that are not empty get zero A rows, so the same accumulator serves (it is zero for empty rows).
  if (f.uniform && __syncthreads_or((empty[0] && tr.valid[0]) || (empty[1] && tr.valid[1]))) {
    for (int64_t nt = 0; nt < n_nb; ++nt) {
      const int64_t n0 = nt * C::BN;
      __syncthreads();
      load_tile<T, D, C::BN>(sm.v[0], p.v, vvec, b, h, RangeRows{n0, p.Lk});
      cp_async_fence();
      cp_async_wait<0>();
      __syncthreads();
      float s[C::NB][4];
#pragma unroll
      for (int nb = 0; nb < C::NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int k = e >> 1;
          const int64_t j = n0 + nb * 8 + 2 * t + (e & 1);
          const bool on = empty[k] && tr.valid[k] && j < p.Lk;
          s[nb][e] = on && (!f.dropout || keep_bit(f, tr.drop(k), j, p.dropout_p)) ? 1.f : 0.f;
        }
      uint32_t pa[C::NB / 2][4];
      c_to_a<T, C::NB>(s, pa);
      mma_ab<T, D, C::NB / 2>(acc, pa, sm.v[0]);
    }
  }

  const Strided4 ot = rs.content ? o.out_h : o.out_g;
  float* lse_out = rs.content ? o.lse_h + (b * p.H + h) * p.Lq : o.lse_g + (b * p.H + h) * p.P;
  const bool ovec = ot.s3 == 1 && reinterpret_cast<uintptr_t>(ot.ptr) % 4 == 0 && ot.s0 % 2 == 0 &&
                    ot.s1 % 2 == 0 && ot.s2 % 2 == 0;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int row = sm.rt.row[thread_row(k)];
    if (row < 0) continue;
    const float inv = empty[k] ? (f.uniform && p.Lk > 0 ? f.inv_keep / float(p.Lk) : 0.f) : f.inv_keep / l_run[k];
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      store_pair<T>(ot, b, row, h, nd * 8 + 2 * t, acc[nd][2 * k] * inv, acc[nd][2 * k + 1] * inv, ovec);
    if (t == 0) lse_out[row] = empty[k] ? INFINITY : m_run[k] + logf(l_run[k]);
  }
}

template <typename T, int D>
void forward_impl(const AttentionParams& p, const AttentionForward& o, void* workspace, cudaStream_t stream) {
  Workspace ws;
  workspace_layout<D, Cfg<D>::BN>(p, false, static_cast<char*>(workspace), &ws);
  launch_prepare(p, ws, stream);
  const int n_mb = int(n_row_blocks(p.Lq));
  const int maxc = int(max_chunks(p.has_query_stream() ? p.P : 0, p.Lq));
  const size_t smem = sizeof(FwdSmem<T, D>);
  static_assert(sizeof(FwdSmem<T, D>) <= kMaxSmem, "forward shared memory above 99 KB");
  if (n_mb + maxc > 0 && p.B > 0 && p.H > 0) {
    cudaFuncSetAttribute(forward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    const dim3 grid(unsigned(n_mb + maxc), unsigned(p.H), unsigned(p.B));
    forward_kernel<T, D><<<grid, kThreads, smem, stream>>>(p, o, ws, features(p, ws), n_mb, maxc);
  }
  launch_padding_rows(p, o.out_g, o.lse_g, stream);
}

}  // namespace tsa

const char* two_stream_attention_unsupported(const AttentionParams& p, int sm_major, int sm_minor) {
  (void)sm_minor;
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16)
    return "dtype float32 (the cuda kernels take bfloat16 or float16)";
  if (p.D != 64 && p.D != 128) return "head dim other than 64 or 128 (the cuda kernels are compiled for those)";
  if (sm_major < 8) return "compute capability below 8.0 (the cuda kernels need sm_80 tensor cores)";
  const int64_t kMax = int64_t(1) << 30;  // row and key indices are 32-bit inside the kernels
  if (p.Lq > kMax || p.Lk > kMax || p.P > kMax || p.R > kMax) return "sequence longer than 2^30";
  if (p.B > 65535 || p.H > 65535) return "batch or head count above 65535 (grid dimensions)";
  return "";
}

size_t two_stream_attention_forward_workspace(const AttentionParams& p) {
  return p.D == 128 ? tsa::workspace_layout<128, tsa::Cfg<128>::BN>(p, false, nullptr, nullptr)
                    : tsa::workspace_layout<64, tsa::Cfg<64>::BN>(p, false, nullptr, nullptr);
}

void two_stream_attention_forward(const AttentionParams& p, const AttentionForward& f, void* workspace,
                                  cudaStream_t stream) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.D == 64) {
    if (bf16) tsa::forward_impl<__nv_bfloat16, 64>(p, f, workspace, stream);
    else tsa::forward_impl<__half, 64>(p, f, workspace, stream);
  } else {
    if (bf16) tsa::forward_impl<__nv_bfloat16, 128>(p, f, workspace, stream);
    else tsa::forward_impl<__half, 128>(p, f, workspace, stream);
  }
}

}  // namespace pyobjectives::cuda
