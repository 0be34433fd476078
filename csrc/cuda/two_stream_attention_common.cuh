// Pieces shared by the CUDA two-stream attention kernels (two_stream_attention_fwd.cu / _bwd.cu).
//
// Work split (mirrors kernels/two_stream_attention.py): a *row set* is 64 rows (4 warps x 16 rows) whose
// query positions lie in one block [m0, m0 + 64): either the content rows of that block or a chunk of
// query-stream rows whose target positions fall in it (chunk lists built on the device by
// build_chunks). For a (row set, key tile [n0, n0 + BN)) pair, every row reads r rows from one
// contiguous band of BM + BN - 1 rows starting at Lq - (m0 + BM - 1) + n0, so the position term is one
// MMA product Q R_band^T followed by a per-row shift (the skew) through shared memory.
//
// Tensor cores through CuTe's SM80 atoms (mma.sync m16n8k16 with fp32 accumulation, ldmatrix, cp.async):
// the fragment indexing is written out here (comments give the PTX fragment layouts), because query
// chunks gather rows by index and the skew moves values between columns per row, which the CuTe
// layout algebra would only hide.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include <cstddef>
#include <cstdint>

#include "pyobjectives/device_math.h"
#include "pyobjectives/params.h"

namespace pyobjectives::cuda::tsa {

constexpr int kBM = 64;  // rows per row set, and positions per position block
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
// sm_86 / sm_89 allow 99 KB of shared memory per block: every kernel fits it, so one build runs on
// sm_80 .. sm_90.
constexpr int kMaxSmem = 99 * 1024;

template <int D_>
struct Cfg {
  static constexpr int D = D_;
  // Key tile: 64 keys for D = 64; 32 for D = 128 keeps K, V and the r band double-buffered in 99 KB.
  static constexpr int BN = D == 64 ? 64 : 32;
  static constexpr int BAND = kBM + BN;  // band rows a tile reads: BM + BN - 1, plus one padding row
  static constexpr int NB = BN / 8;      // n8 MMA blocks across a key tile
  static constexpr int KD = D / 16;      // k16 MMA steps across the head dim
  static constexpr int BD_STRIDE = BN + 8;    // fp32 skew scratch row stride (bank spread)
  static constexpr int DB_STRIDE = BAND + 8;  // bf16 un-skewed band row stride (ldmatrix without conflicts)
  static constexpr int P_STRIDE = BN + 8;     // bf16 [rows, keys] tiles of the dk/dv kernel
  static constexpr int BM_PER_BN = kBM / BN;  // key tiles per position block (diagonal step)
};

// ---- index math shared with host code (PO_HD, so it can be unit-tested on the host) --------------

PO_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
PO_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
PO_HD int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
PO_HD int64_t n_row_blocks(int64_t Lq) { return ceil_div(Lq, kBM); }
// Query-stream chunk slots per batch: sum over blocks of ceil(count / BM) <= P / BM + n_mb.
PO_HD int64_t max_chunks(int64_t P, int64_t Lq) { return P > 0 ? ceil_div(P, kBM) + n_row_blocks(Lq) : 0; }
// First r row read by the tile (row block m0, key tile n0): r_row(Lq, m0 + BM - 1, n0).
PO_HD int64_t band_start(int64_t Lq, int64_t m0, int64_t n0) { return Lq - (m0 + kBM - 1) + n0; }
// Band column that the row at position pos (in block m0) reads for key n0 + c is band_offset + c.
PO_HD int band_offset(int64_t m0, int64_t pos) { return int(m0 + kBM - 1 - pos); }
// T5 per-distance table column of (query position, key).
PO_HD int64_t t5_column(int64_t Lq, int64_t pos, int64_t key) { return key - pos + Lq - 1; }
PO_HD uint64_t dropout_row_offset(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t P, int64_t b, int64_t h,
                                  int64_t row, bool content) {
  return content ? uint64_t(((b * H + h) * Lq + row) * Lk)
                 : uint64_t(B * H * Lq * Lk) + uint64_t(((b * H + h) * P + row) * Lk);
}

// Block diagonals: tiles with equal n0 - m0 share a band. Diagonal index di in [0, n_diag) stands for
// (n0 - m0) / BN = di - (n_mb - 1) * BM / BN; row block m_blk meets key tile n_blk = diag + m_blk * BM / BN.
template <int BN>
PO_HD int64_t n_diagonals(int64_t n_mb, int64_t n_nb) {
  return n_mb > 0 && n_nb > 0 ? (n_mb - 1) * (kBM / BN) + n_nb : 0;
}
template <int BN>
PO_HD int64_t diagonal_band_start(int64_t Lq, int64_t n_mb, int64_t di) {
  return Lq - (kBM - 1) + (di - (n_mb - 1) * (kBM / BN)) * BN;
}
// Diagonals whose band covers r row t (band rows [start, start + BM + BN - 1)), clamped to [0, n_diag).
template <int BN>
PO_HD void diagonals_covering(int64_t Lq, int64_t n_mb, int64_t n_diag, int64_t t, int64_t* lo, int64_t* hi) {
  const int64_t u = t - (Lq - (kBM - 1)) + (n_mb - 1) * (kBM / BN) * BN;  // t - start(di = 0)
  int64_t a = floor_div(u - (kBM + BN - 2) + BN - 1, BN);                 // ceil((u - BM - BN + 2) / BN)
  int64_t b = floor_div(u, BN);
  *lo = a < 0 ? 0 : a;
  *hi = b > n_diag - 1 ? n_diag - 1 : b;
}

// ---- workspace layout (bytes; every piece 256-byte aligned) --------------------------------------

PO_HD size_t ws_align(size_t x) { return (x + 255) & ~size_t(255); }

struct Workspace {
  int* sorted = nullptr;   // [B, P] q_g rows grouped by position block (stable)
  int* chunks = nullptr;   // [B, maxc, 3] (m_blk, start in sorted, count); count 0 = unused slot
  float* wk = nullptr;     // [B, H, Lk] r_w_bias . k_j (nullptr without r_w_bias)
  float* rr = nullptr;     // [Br, H, R] r_r_bias . r_t (Br = 1 for shared r)
  // backward only
  float* delta_h = nullptr;  // [B, H, Lq] rowsum(dO * O)
  float* delta_g = nullptr;  // [B, H, P]
  float* set_part = nullptr;  // [B, H, n_sets, 2 + 2 D]: sum de0, sum de1, sum de0 q, sum de1 q
  float* key_part = nullptr;  // [B, H, n_nb, D]: sum_j colsum(dS)_j k_j (r_w_bias gradient)
  float* dr_part = nullptr;   // [B, H, n_diag, BAND, D]
  float* dt_part = nullptr;   // [B, H, n_diag, BAND]: unscaled dS summed per band column
};

template <int D, int BN>
inline size_t workspace_layout(const AttentionParams& p, bool backward, char* base, Workspace* w) {
  const int64_t n_mb = n_row_blocks(p.Lq), maxc = max_chunks(p.has_query_stream() ? p.P : 0, p.Lq);
  const int64_t n_nb = ceil_div(p.Lk, BN), n_diag = n_diagonals<BN>(n_mb, n_nb);
  const int64_t Br = p.has_position_term() && p.r.s0 != 0 ? p.B : 1;
  const int64_t band = kBM + BN;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* ptr = base != nullptr ? base + off : nullptr;
    off += ws_align(bytes);
    return ptr;
  };
  Workspace ws;
  ws.sorted = reinterpret_cast<int*>(take(sizeof(int) * p.B * (p.has_query_stream() ? p.P : 0)));
  ws.chunks = reinterpret_cast<int*>(take(sizeof(int) * 3 * p.B * maxc));
  if (p.r_w_bias != nullptr) ws.wk = reinterpret_cast<float*>(take(sizeof(float) * p.B * p.H * p.Lk));
  if (p.has_position_term()) ws.rr = reinterpret_cast<float*>(take(sizeof(float) * Br * p.H * p.R));
  if (backward) {
    ws.delta_h = reinterpret_cast<float*>(take(sizeof(float) * p.B * p.H * p.Lq));
    ws.delta_g = reinterpret_cast<float*>(take(sizeof(float) * p.B * p.H * (p.has_query_stream() ? p.P : 0)));
    if (p.has_segments())
      ws.set_part = reinterpret_cast<float*>(take(sizeof(float) * p.B * p.H * (n_mb + maxc) * (2 + 2 * D)));
    ws.key_part = reinterpret_cast<float*>(take(sizeof(float) * p.B * p.H * n_nb * D));
    if (p.has_position_term() || p.t5_dist != nullptr) {
      if (p.has_position_term()) ws.dr_part = reinterpret_cast<float*>(take(sizeof(float) * p.B * p.H * n_diag * band * D));
      ws.dt_part = reinterpret_cast<float*>(take(sizeof(float) * p.B * p.H * n_diag * band));
    }
  }
  if (w != nullptr) *w = ws;
  return off;
}

// ---- device helpers ------------------------------------------------------------------------------

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  using Atom = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <>
struct Mma<__half> {
  using Atom = cute::SM80_16x8x16_F32F16F16F32_TN;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// d (16x8 fp32) += a (16x16, row) * b (16x8, col).
// Fragments (g = lane / 4, t = lane % 4): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
// b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); d0,d1 (g, 2t..2t+1), d2,d3 (g+8, 2t..2t+1).
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Mma<T>::Atom::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3]);
}

// ldmatrix x4: lanes 8m..8m+7 give the row addresses of matrix m; register m of lane l holds
// (row l / 4, cols 2 (l % 4), +1) of matrix m, or with .trans (rows 2 (l % 4), +1, col l / 4).
template <typename T>
__device__ __forceinline__ void ldsm_x4(const T* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r0, r1, r2, r3);
}
template <typename T>
__device__ __forceinline__ void ldsm_x4_t(const T* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r0, r1, r2, r3);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*reinterpret_cast<const cute::uint128_t*>(gmem),
                                                               *reinterpret_cast<cute::uint128_t*>(smem), pred);
}
__device__ __forceinline__ void cp_async_fence() { cute::cp_async_fence(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  cute::cp_async_wait<N>();
}

// [rows, D] half-precision tiles in shared memory: 16-byte chunks XOR-swizzled by row % 8, so the eight
// row addresses of one ldmatrix (same column, consecutive rows) hit distinct banks.
template <int D>
PO_HD int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// ---- fragment addressing: which element a lane addresses or holds (PO_HD for host checks) ----------
// PTX layouts (g = lane / 4, t = lane % 4). mma m16n8k16: a0 (g, 2t..2t+1), a1 (g+8, ..), a2 (g, 2t+8..),
// a3 (g+8, 2t+8..); b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); c0,c1 (g, 2t..2t+1), c2,c3 (g+8, ..).
// ldmatrix x4: lanes 8m..8m+7 address the rows of matrix m, register m of lane l gets (row l/4,
// cols 2(l%4), +1) of matrix m; with .trans (rows 2(l%4), +1, col l/4).
struct RowCol {
  int r, c;
};
// A block (16 rows x k16) from [rows, k]; also B (k16 x two n8) from [k, n] with .trans.
// Matrices: (0-7, 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) as (row, col) of the stored tile.
PO_HD RowCol ldsm_a_lane(int lane) { return {(lane & 7) + 8 * ((lane >> 3) & 1), 8 * (lane >> 4)}; }
// B (k16 x two n8 blocks) from B^T stored [n, k]: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), (n 8-15, k 8-15) -> b0, b1 of n block 0, b0, b1 of n block 1.
PO_HD RowCol ldsm_bt_lane(int lane) { return {(lane & 7) + ((lane >> 4) << 3), ((lane >> 3) & 1) * 8}; }
// B (k32 x one n8 block) from B^T stored [n, k]: matrices (n 0-7, k 0-7 / 8-15 / 16-23 / 24-31).
PO_HD RowCol ldsm_bt_k32_lane(int lane) { return {lane & 7, 8 * (lane >> 3)}; }
// A = X^T (16 x k16) from X stored [k, m] with .trans: matrices (k 0-7, m 0-7), (k 0-7, m 8-15),
// (k 8-15, m 0-7), (k 8-15, m 8-15) -> a0, a1, a2, a3.
PO_HD RowCol ldsm_at_lane(int lane) { return {(lane & 7) + 8 * ((lane >> 4) & 1), 8 * ((lane >> 3) & 1)}; }
// Accumulator element e (0..3) of a lane in its 16 x 8 block.
PO_HD RowCol acc_elem(int lane, int e) { return {(lane >> 2) + 8 * (e >> 1), 2 * (lane & 3) + (e & 1)}; }

// Element (i, d) of a [dim0, rows, H, D] tensor, as a typed pointer.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const Strided4& t, int64_t b, int64_t row, int64_t h) {
  return static_cast<const T*>(t.ptr) + b * t.s0 + row * t.s1 + h * t.s2;
}

// Rows whose chunks can travel as 16-byte cp.async: unit last stride, 16-byte aligned rows. Others
// (any strides are accepted) go through registers.
template <typename T>
__host__ __device__ inline bool vectorizable(const Strided4& t) {
  const bool strides = t.s3 == 1 && (t.s0 * sizeof(T)) % 16 == 0 && (t.s1 * sizeof(T)) % 16 == 0 &&
                       (t.s2 * sizeof(T)) % 16 == 0;
  return strides && reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0;
}

// Row maps for load_tile (plain structs: lambdas capturing locals by reference put them on the stack).
struct TableRows {
  const int* row;
  __device__ __forceinline__ int64_t operator()(int i) const { return row[i]; }
};
struct RangeRows {  // rows first + i inside [0, end)
  int64_t first, end;
  __device__ __forceinline__ int64_t operator()(int i) const {
    return first + i >= 0 && first + i < end ? first + i : int64_t(-1);
  }
};

// Copy rows of t into a swizzled [n_rows, D] tile; row_of(i) < 0 (or out of range) gives zeros.
// cp.async when vectorizable (caller fences / waits), else synchronous loads.
template <typename T, int D, int N_ROWS, typename RowOf>
__device__ __forceinline__ void load_tile(T* smem, const Strided4& t, bool vec, int64_t b, int64_t h, RowOf row_of) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < N_ROWS * kChunks; idx += kThreads) {
    const int i = idx / kChunks, c = idx % kChunks;
    const int64_t row = row_of(i);
    T* dst = smem + swz<D>(i, c * 8);
    if (vec) {
      const T* src = row >= 0 ? row_ptr<T>(t, b, row, h) + c * 8 : static_cast<const T*>(t.ptr);
      cp_async16(dst, src, row >= 0);
    } else {
      const T* src = row >= 0 ? row_ptr<T>(t, b, row, h) : nullptr;
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = row >= 0 ? src[(c * 8 + e) * t.s3] : from_f<T>(0.f);
    }
  }
}

// Store two adjacent head-dim elements of one row.
template <typename T>
__device__ __forceinline__ void store_pair(const Strided4& t, int64_t b, int64_t row, int64_t h, int d, float x0,
                                           float x1, bool vec) {
  T* dst = const_cast<T*>(row_ptr<T>(t, b, row, h));
  if (vec) {
    *reinterpret_cast<uint32_t*>(dst + d) = Mma<T>::pack(x0, x1);
  } else {
    dst[d * t.s3] = from_f<T>(x0);
    dst[(d + 1) * t.s3] = from_f<T>(x1);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
// Sum over the 8 row groups (lanes with equal lane % 4), fixed order.
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

// Which optional terms are present (uniform per launch).
struct Features {
  bool r, wk, seg, seg_ids, t5, rank, mask, kpm, causal, self, dropout, uniform;
  float inv_keep;
  PhiloxKey key;
};
inline Features features(const AttentionParams& p, const Workspace& ws) {
  Features f;
  f.r = p.has_position_term();
  f.wk = ws.wk != nullptr;
  f.seg = p.has_segments();
  f.seg_ids = p.seg_q != nullptr;
  f.t5 = p.t5_dist != nullptr;
  f.rank = p.q_rank != nullptr;
  f.mask = p.attn_mask != nullptr;
  f.kpm = p.key_padding != nullptr;
  f.causal = p.causal;
  f.self = p.content_sees_self;
  f.dropout = p.dropout_p > 0.f;
  f.uniform = p.empty_uniform;
  f.inv_keep = f.dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  f.key = philox_key(p.seed);
  return f;
}

// One row set of batch b: content block m_blk, or query chunk (m_blk, start, count) from the list.
struct RowSet {
  bool content;
  int m_blk, start, count;
};
// Row set x of batch b (x < n_mb: content block x; else chunk slot x - n_mb). False: empty slot.
__device__ __forceinline__ bool row_set(const AttentionParams& p, const Workspace& ws, int64_t b, int n_mb,
                                        int maxc, int x, RowSet& rs) {
  if (x < n_mb) {
    rs = {true, x, 0, int(min64(kBM, p.Lq - int64_t(x) * kBM))};
    return true;
  }
  const int* c = ws.chunks + (b * maxc + (x - n_mb)) * 3;
  rs = {false, c[0], c[1], c[2]};
  return rs.count > 0;
}

// Per-CTA row table in shared memory (per-row values live here rather than in registers).
struct RowTable {
  int row[kBM];    // row index in q (content) or q_g (query stream); -1 = no row
  int pos[kBM];    // query position (block start for missing rows)
  float e0[kBM], e1[kBM];  // segment terms (q + r_s_bias) . seg_embed[0 / 1]
  float lse[kBM], delta[kBM];
  int32_t qrank[kBM];
  int64_t segq[kBM];
  uint64_t drop[kBM];  // dropout offset of key 0
};

// Threads 0..63 fill the table for the set (lse / delta in the backward: pass non-null).
__device__ __forceinline__ void fill_rows(const AttentionParams& p, const Features& f, const Workspace& ws,
                                          int64_t b, int64_t h, const RowSet& rs, RowTable& rt, const float* lse_h,
                                          const float* lse_g, const float* delta_h, const float* delta_g) {
  const int i = threadIdx.x;
  if (i >= kBM) return;
  const int64_t m0 = int64_t(rs.m_blk) * kBM;
  int row = -1;
  int64_t pos = m0;
  if (rs.content) {
    if (m0 + i < p.Lq) row = int(m0 + i), pos = m0 + i;
  } else if (i < rs.count) {
    row = ws.sorted[b * p.P + rs.start + i];
    pos = p.target_pos[b * p.P + row];
  }
  rt.row[i] = row;
  rt.pos[i] = int(pos);
  rt.qrank[i] = f.rank && row >= 0 ? p.q_rank[b * p.Lq + pos] : 0;
  rt.segq[i] = f.seg_ids && row >= 0 ? p.seg_q[b * p.Lq + pos] : 0;
  rt.drop[i] = row >= 0 ? dropout_row_offset(p.B, p.H, p.Lq, p.Lk, p.P, b, h, row, rs.content) : 0;
  rt.e0[i] = rt.e1[i] = 0.f;
  if (lse_h != nullptr) {
    float lse = INFINITY, delta = 0.f;
    if (row >= 0) {
      const int64_t idx = rs.content ? (b * p.H + h) * p.Lq + row : (b * p.H + h) * p.P + row;
      lse = rs.content ? lse_h[idx] : lse_g[idx];
      delta = rs.content ? delta_h[idx] : delta_g[idx];
    }
    rt.lse[i] = lse;
    rt.delta[i] = delta;
  }
}

// e0 / e1 of every row from the staged queries (two threads per row, fp32 like the reference).
template <typename T, int D>
__device__ __forceinline__ void segment_terms(const AttentionParams& p, int64_t h, const T* sQ, RowTable& rt) {
  const int i = threadIdx.x >> 1, half = threadIdx.x & 1;
  const float* rs = p.r_s_bias + h * D;
  const float* s0 = p.seg_embed + h * D;
  const float* s1 = p.seg_embed + (p.H + h) * D;
  float e0 = 0.f, e1 = 0.f;
  for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) {
    const float qs = to_f(sQ[swz<D>(i, d)]) + rs[d];
    e0 += qs * s0[d];
    e1 += qs * s1[d];
  }
  e0 += __shfl_xor_sync(0xffffffffu, e0, 1);
  e1 += __shfl_xor_sync(0xffffffffu, e1, 1);
  if (half == 0) rt.e0[i] = e0, rt.e1[i] = e1;
}

// The two rows a thread holds in MMA accumulators: warp rows g and g + 8 (row within the set:
// warp * 16 + g + 8 k); the rest of their values is read from the row table when needed.
__device__ __forceinline__ int thread_row(int k) { return (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 2) + 8 * k; }

struct ThreadRows {
  const RowTable* rt;
  int pos[2];
  bool valid[2];
  int off[2];  // band offset
  __device__ __forceinline__ uint64_t drop(int k) const { return rt->drop[thread_row(k)]; }
};

__device__ __forceinline__ void thread_rows(const RowTable& rt, const RowSet& rs, ThreadRows& tr) {
  const int64_t m0 = int64_t(rs.m_blk) * kBM;
  tr.rt = &rt;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int rl = thread_row(k);
    tr.pos[k] = rt.pos[rl];
    tr.valid[k] = rt.row[rl] >= 0;
    tr.off[k] = band_offset(m0, tr.pos[k]);
  }
}

// A fragments of the warp's 16 rows of a swizzled [64, D] tile.
template <typename T, int D>
__device__ __forceinline__ void load_a_frags(const T* s, uint32_t (&a)[D / 16][4]) {
  const int warp = threadIdx.x >> 5;
  const RowCol rc = ldsm_a_lane(threadIdx.x & 31);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldsm_x4(s + swz<D>(warp * 16 + rc.r, kk * 16 + rc.c), a[kk][0], a[kk][1], a[kk][2], a[kk][3]);
}

// acc[nb] (16 rows x BN keys) += A (16 x D) * B^T where B is a swizzled [keys, D] tile (K or V).
template <typename T, int D, int NB>
__device__ __forceinline__ void mma_abt(float (&acc)[NB][4], const uint32_t (&a)[D / 16][4], const T* sB) {
  const RowCol rc = ldsm_bt_lane(threadIdx.x & 31);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int nb2 = 0; nb2 < NB / 2; ++nb2) {
      uint32_t b0, b1, b2, b3;
      ldsm_x4(sB + swz<D>(nb2 * 16 + rc.r, kk * 16 + rc.c), b0, b1, b2, b3);
      mma<T>(acc[2 * nb2], a[kk], b0, b1);
      mma<T>(acc[2 * nb2 + 1], a[kk], b2, b3);
    }
}

// acc (16 rows x D) += P (16 x K, as A fragments of k16 blocks) * B where B is a swizzled [K, D] tile.
template <typename T, int D, int KB>
__device__ __forceinline__ void mma_ab(float (&acc)[D / 8][4], const uint32_t (&pa)[KB][4], const T* sB) {
  const RowCol rc = ldsm_a_lane(threadIdx.x & 31);
#pragma unroll
  for (int kb = 0; kb < KB; ++kb)
#pragma unroll
    for (int nd2 = 0; nd2 < D / 16; ++nd2) {
      uint32_t b0, b1, b2, b3;
      ldsm_x4_t(sB + swz<D>(kb * 16 + rc.r, nd2 * 16 + rc.c), b0, b1, b2, b3);
      mma<T>(acc[2 * nd2], pa[kb], b0, b1);
      mma<T>(acc[2 * nd2 + 1], pa[kb], b2, b3);
    }
}

// C fragments (16 x 8 blocks) to A fragments of k16 blocks, converted to T.
template <typename T, int NB>
__device__ __forceinline__ void c_to_a(const float (&c)[NB][4], uint32_t (&a)[NB / 2][4]) {
#pragma unroll
  for (int kb = 0; kb < NB / 2; ++kb) {
    a[kb][0] = Mma<T>::pack(c[2 * kb][0], c[2 * kb][1]);
    a[kb][1] = Mma<T>::pack(c[2 * kb][2], c[2 * kb][3]);
    a[kb][2] = Mma<T>::pack(c[2 * kb + 1][0], c[2 * kb + 1][1]);
    a[kb][3] = Mma<T>::pack(c[2 * kb + 1][2], c[2 * kb + 1][3]);
  }
}

// n8 blocks of the band the warp's rows need: columns [min off, max off + BN - 1]. Rows without a
// query are left out; a warp with none gets lo > hi.
template <int BN>
__device__ __forceinline__ void band_blocks(const ThreadRows& tr, int& lo, int& hi) {
  int a = 1 << 30, z = -1;
#pragma unroll
  for (int k = 0; k < 2; ++k)
    if (tr.valid[k]) a = min(a, tr.off[k]), z = max(z, tr.off[k] + BN - 1);
  a = __reduce_min_sync(0xffffffffu, a);
  z = __reduce_max_sync(0xffffffffu, z);
  lo = a >> 3;
  hi = z < 0 ? -1 : z >> 3;
}

// Scores of the warp's 16 rows against key tile n0: s = scale (ac + bd + ef) + t5, hidden pairs = -inf.
// differ: bit (nb * 4 + e) set where the segments differ. sbd: the warp's [16, BD_STRIDE] fp32 scratch.
// rr: r_r_bias . r_t at band start (index t0 + cb, bounds-checked), nullptr without r.
template <typename T, int D>
__device__ __forceinline__ void score_tile(const AttentionParams& p, const Features& f, const ThreadRows& tr,
                                           bool content, int64_t b, int64_t h, int64_t n0, int64_t t0,
                                           const uint32_t (&qa)[D / 16][4], const T* sK, const T* sR, float* sbd,
                                           const float* wk, const float* rr, float (&s)[Cfg<D>::NB][4],
                                           uint32_t& differ) {
  using C = Cfg<D>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nb = 0; nb < C::NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
  mma_abt<T, D, C::NB>(s, qa, sK);

  if (f.r) {
    int lo, hi;
    band_blocks<C::BN>(tr, lo, hi);
    __syncwarp();
    for (int jb = lo; jb <= hi; ++jb) {
      float c4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kk2 = 0; kk2 < C::KD / 2; ++kk2) {
        uint32_t b0, b1, b2, b3;
        const RowCol rc = ldsm_bt_k32_lane(lane);
        ldsm_x4(sR + swz<D>(jb * 8 + rc.r, kk2 * 32 + rc.c), b0, b1, b2, b3);
        mma<T>(c4, qa[2 * kk2], b0, b1);
        mma<T>(c4, qa[2 * kk2 + 1], b2, b3);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int k = e >> 1, cb = jb * 8 + 2 * t + (e & 1), c = cb - tr.off[k];
        if (c >= 0 && c < C::BN) {
          const int64_t tr_row = t0 + cb;
          const float bias = tr_row >= 0 && tr_row < p.R ? rr[tr_row] : 0.f;
          sbd[(g + 8 * k) * C::BD_STRIDE + c] = c4[e] + bias;
        }
      }
    }
    __syncwarp();
#pragma unroll
    for (int nb = 0; nb < C::NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] += sbd[(g + 8 * (e >> 1)) * C::BD_STRIDE + nb * 8 + 2 * t + (e & 1)];
  }

  differ = 0;
  const int64_t n_dist = p.Lq + p.Lk - 1;
  const RowTable& rt = *tr.rt;
#pragma unroll
  for (int nb = 0; nb < C::NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = e >> 1, rl = thread_row(k);
      const int64_t j = n0 + nb * 8 + 2 * t + (e & 1);
      const bool kin = j < p.Lk, ok = kin && tr.valid[k];
      float x = s[nb][e];
      if (f.wk && kin) x += wk[j];
      if (f.seg) {
        bool d = false;
        if (ok)
          d = f.seg_ids ? p.seg_k[b * p.Lk + j] != rt.segq[rl]
                        : p.seg_diff[b * p.segd_s0 + tr.pos[k] * p.segd_s1 + j * p.segd_s2] != 0;
        differ |= uint32_t(d) << (nb * 4 + e);
        x += d ? rt.e1[rl] : rt.e0[rl];
      }
      x *= p.scale;
      if (f.t5 && ok) x += p.t5_dist[h * n_dist + t5_column(p.Lq, tr.pos[k], j)];
      bool vis = ok;
      if (f.rank && ok) vis = vis && rank_allows(p.k_rank[b * p.Lk + j], rt.qrank[rl]);
      if (f.mask && ok) vis = vis && p.attn_mask[b * p.mask_s0 + tr.pos[k] * p.mask_s1 + j * p.mask_s2] == 0;
      if (f.kpm && ok) vis = vis && p.key_padding[b * p.Lk + j] == 0;
      if (f.causal) vis = vis && causal_allows(j, p.M, tr.pos[k]);
      if (content && f.self && ok && j == content_diagonal(p.M, tr.pos[k])) vis = true;
      s[nb][e] = vis ? x : -INFINITY;
    }
}

// Dropout keep bit of (row offset, key), bit-identical to the reference's Philox stream.
__device__ __forceinline__ bool keep_bit(const Features& f, uint64_t row_off, int64_t j, float p) {
  return philox_uniform(f.key, row_off + uint64_t(j)) >= p;
}

// Defined in two_stream_attention_fwd.cu, used by both passes: chunk lists and bias dot products into the
// workspace; zeros (and lse = +inf) for query-stream rows outside [0, Lq).
void launch_prepare(const AttentionParams& p, const Workspace& ws, cudaStream_t stream);
void launch_padding_rows(const AttentionParams& p, const Strided4& t, float* lse, cudaStream_t stream);

}  // namespace pyobjectives::cuda::tsa
