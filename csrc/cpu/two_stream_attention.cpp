// Two-stream relative attention on the CPU: forward and backward, every feature of the spec.
//
// Work split: one work item per (batch, head), so K, V, r (and dK, dV, dr) of that head belong to
// one thread: nothing is shared between threads, gradients need no reduction across threads and are
// bitwise deterministic whatever the thread count. Inside an item, rows come in row sets of at most
// kBlockRows rows whose positions lie within kBlockRows of each other: the content rows in blocks,
// then the query-stream rows sorted by target position and cut into chunks (so the query stream
// costs its P rows, not Lq).
//
// A row set's scores for *all* keys come from two BLAS products: ac = (Q + r_w_bias) K^T and the
// position term bd = (Q + r_r_bias) R_band^T over the band of r rows the set needs
// (p_hi - p_lo + Lk rows starting at Lq - p_hi). Row i then reads bd at column offset p_hi - pos_i
// (the diagonal skew is a pointer offset), so bd costs one GEMM unit. The whole row of scores fits in
// cache ([rows, Lk] floats per thread), so the softmax is exact in one sweep and the row logsumexp is
// saved for the backward pass, which recomputes the probabilities. Nothing of size B*H*Lq*Lk exists.
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu_common.h"
#include "pyobjectives/device_math.h"
#include "kernels.h"

namespace pyobjectives::cpu {
namespace {

constexpr int64_t kBlockRows = 64;
// Positions one query-stream chunk may span: wider chunks mean fewer, larger products but a longer r band.
constexpr int64_t kQuerySpan = 256;

// A row-major [rows, D] float matrix: the caller's tensor when it already is one (float32, rows
// contiguous), else a packed float32 copy. Packing a head once is cheap next to its products, and
// contiguous rows let BLAS use its no-copy kernels (measured: about 5% faster than strided rows).
struct Mat {
  const float* p = nullptr;
  int64_t ld = 0;
};

template <typename T>
Mat head_matrix(const Strided4& t, int64_t b, int64_t h, int64_t rows, int64_t D, std::vector<float>& buf) {
  const T* base = static_cast<const T*>(t.ptr) + b * t.s0 + h * t.s2;
  if (std::is_same<T, float>::value && t.s3 == 1 && t.s1 == D) return {reinterpret_cast<const float*>(base), t.s1};
  buf.resize(std::max<int64_t>(rows * D, 1));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < D; ++d) buf[i * D + d] = to_float(base[i * t.s1 + d * t.s3]);
  return {buf.data(), D};
}

// Plain attention (T5, cross-attention) has no r: the band product and its gradient are skipped.

// A set of rows of one stream that the kernels treat together.
struct RowSet {
  bool content = true;
  int64_t count = 0;
  int64_t pos[kBlockRows];  // query positions in [0, Lq)
  int64_t row[kBlockRows];  // row index in q (content) or q_g (query stream)
  int64_t p_lo = 0, p_hi = 0;
};

// Row sets of batch b: content blocks, then the query-stream chunks.
std::vector<RowSet> row_sets(const AttentionParams& p, int64_t b) {
  std::vector<RowSet> sets;
  for (int64_t m0 = 0; m0 < p.Lq; m0 += kBlockRows) {
    RowSet s;
    s.count = std::min(kBlockRows, p.Lq - m0);
    for (int64_t i = 0; i < s.count; ++i) s.pos[i] = s.row[i] = m0 + i;
    s.p_lo = m0;
    s.p_hi = m0 + s.count - 1;
    sets.push_back(s);
  }
  if (!p.has_query_stream()) return sets;
  const int64_t* tp = p.target_pos + b * p.P;
  std::vector<int64_t> order;
  for (int64_t i = 0; i < p.P; ++i)
    if (tp[i] >= 0 && tp[i] < p.Lq) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [tp](int64_t x, int64_t y) { return tp[x] < tp[y]; });
  RowSet s;
  s.content = false;
  for (int64_t idx : order) {
    if (s.count == kBlockRows || (s.count > 0 && tp[idx] - s.p_lo >= kQuerySpan)) {
      sets.push_back(s);
      s.count = 0;
    }
    if (s.count == 0) s.p_lo = tp[idx];
    s.pos[s.count] = tp[idx];
    s.row[s.count] = idx;
    s.p_hi = tp[idx];
    ++s.count;
  }
  if (s.count > 0) sets.push_back(s);
  return sets;
}

// Per-thread scratch space, sized once per work range.
struct Scratch {
  std::vector<float> k, v, r;           // packed operands (half precision or strided inputs)
  std::vector<float> qw, qr, qs, e;     // [rows, D] q + biases; [rows, 2] segment terms
  std::vector<float> s, band;           // [rows, Lk] scores / probabilities; [rows, W] position band
  std::vector<float> o, g, dband, dqw, dqr;  // output rows; backward buffers
  std::vector<float> keep;              // [Lk] dropout factors of one row
  std::vector<float> row_max;           // [rows] max visible score
  std::vector<uint8_t> empty;           // [rows] row has no visible key
  Scratch(const AttentionParams& p) {
    const int64_t W = kBlockRows - 1 + p.Lk, n = kBlockRows, D = p.D;
    qw.resize(n * D), qr.resize(n * D), qs.resize(n * D), e.resize(n * 2), o.resize(n * D);
    s.resize(n * std::max<int64_t>(p.Lk, 1));
    if (p.has_position_term()) band.resize(n * W);
    empty.resize(n), row_max.resize(n);
    if (p.dropout_p > 0.f) keep.resize(std::max<int64_t>(p.Lk, 1));
  }
};

struct HeadOperands {
  Mat k, v, r;
};

struct BandWindow {
  int64_t t0, W, ta, tb;  // band rows [t0, t0 + W); rows [ta, tb) exist in r
};

BandWindow band_window(const AttentionParams& p, const RowSet& set) {
  BandWindow w;
  w.t0 = r_row(p.Lq, set.p_hi, 0);  // the lowest row any (row, key) pair of the set reads
  w.W = set.p_hi - set.p_lo + p.Lk;
  w.ta = std::max<int64_t>(w.t0, 0);
  w.tb = std::min<int64_t>(w.t0 + w.W, p.R);
  return w;
}

template <typename T>
const T* query_row(const AttentionParams& p, const RowSet& set, int64_t b, int64_t h, int64_t i) {
  const Strided4& t = set.content ? p.q : p.q_g;
  return static_cast<const T*>(t.ptr) + b * t.s0 + set.row[i] * t.s1 + h * t.s2;
}

// Everything that turns row i's ac into its final scores (pointers are null when a feature is off).
struct RowTerms {
  const float* bd = nullptr;  // position term, already skewed: bd[j] belongs to key j; nullptr without r
  float scale = 1.f;
  float e0 = 0.f, e1 = 0.f;   // segment terms (same / different segment)
  int64_t seg_q = 0;
  const int64_t* seg_k = nullptr;
  const uint8_t* seg_diff = nullptr;
  int64_t seg_diff_stride = 0;
  const float* t5 = nullptr;  // T5 bias per key
  int32_t q_rank = 0;
  const int32_t* k_rank = nullptr;
  const uint8_t* mask = nullptr;
  int64_t mask_stride = 0;
  const uint8_t* key_padding = nullptr;
  int64_t M = 0;
  int64_t causal_pos = -1;  // query position when the causal rule applies, else -1
  int64_t diagonal = -1;    // content rows always see this key
};

// Where row (b, pos) reads "segments differ" from: ids (seg_q vs seg_k) or the dense seg_diff matrix.
void segment_source(const AttentionParams& p, int64_t b, int64_t pos, RowTerms& t) {
  if (p.seg_q != nullptr) {
    t.seg_q = p.seg_q[b * p.Lq + pos];
    t.seg_k = p.seg_k + b * p.Lk;
  } else {
    t.seg_diff = p.seg_diff + b * p.segd_s0 + pos * p.segd_s1;
    t.seg_diff_stride = p.segd_s2;
  }
}

// s = scale * (ac + bd + ef) + t5, masked pairs -inf; returns the row max (-inf: no visible key; NaN:
// every visible score is NaN).
PO_VECTORIZED float finish_row(float* s, int64_t Lk, const RowTerms& t) {
  const float scale = t.scale;
  const float* bd = t.bd;
  if (bd == nullptr) {
    if (t.seg_k != nullptr) {
      const float e0 = t.e0, e1 = t.e1;
      const int64_t sq = t.seg_q;
      const int64_t* sk = t.seg_k;
      for (int64_t j = 0; j < Lk; ++j) s[j] = (s[j] + (sk[j] != sq ? e1 : e0)) * scale;
    } else if (t.seg_diff != nullptr) {
      const float e0 = t.e0, e1 = t.e1;
      for (int64_t j = 0; j < Lk; ++j) s[j] = (s[j] + (t.seg_diff[j * t.seg_diff_stride] ? e1 : e0)) * scale;
    } else if (scale != 1.f) {
      for (int64_t j = 0; j < Lk; ++j) s[j] *= scale;
    }
  } else if (t.seg_k != nullptr) {
    const float e0 = t.e0, e1 = t.e1;
    const int64_t sq = t.seg_q;
    const int64_t* sk = t.seg_k;
    for (int64_t j = 0; j < Lk; ++j) s[j] = (s[j] + bd[j] + (sk[j] != sq ? e1 : e0)) * scale;
  } else if (t.seg_diff != nullptr) {
    const float e0 = t.e0, e1 = t.e1;
    for (int64_t j = 0; j < Lk; ++j) s[j] = (s[j] + bd[j] + (t.seg_diff[j * t.seg_diff_stride] ? e1 : e0)) * scale;
  } else {
    for (int64_t j = 0; j < Lk; ++j) s[j] = (s[j] + bd[j]) * scale;
  }
  if (t.t5 != nullptr)
    for (int64_t j = 0; j < Lk; ++j) s[j] += t.t5[j];
  const bool has_diag = t.diagonal >= 0 && t.diagonal < Lk;
  const float diag_score = has_diag ? s[t.diagonal] : 0.f;
  if (t.k_rank != nullptr) {
    const int32_t qr = t.q_rank;
    const int32_t* kr = t.k_rank;
    for (int64_t j = 0; j < Lk; ++j) s[j] = rank_allows(kr[j], qr) ? s[j] : kNegInf;
  }
  if (t.mask != nullptr)
    for (int64_t j = 0; j < Lk; ++j) s[j] = t.mask[j * t.mask_stride] ? kNegInf : s[j];
  if (t.key_padding != nullptr)
    for (int64_t j = 0; j < Lk; ++j) s[j] = t.key_padding[j] ? kNegInf : s[j];
  if (t.causal_pos >= 0)
    for (int64_t j = 0; j < Lk; ++j) s[j] = causal_allows(j, t.M, t.causal_pos) ? s[j] : kNegInf;
  if (has_diag) s[t.diagonal] = diag_score;
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < Lk; ++j) mx = s[j] > mx ? s[j] : mx;
  // The max drops NaN: a row whose visible scores are all NaN would look empty (output 0). As in the
  // reference, it is NaN; a NaN next to finite scores already makes the row's sum of exp NaN.
  if (mx == kNegInf) {
    const int64_t j = first_nan(s, Lk);
    if (j >= 0) return s[j];
  }
  return mx;
}

// The row set's visible scores (masked pairs = -inf) in sc.s[i * Lk + j]; sc.empty[i] for rows
// with no visible key. Leaves q + biases in sc.qw / sc.qr / sc.qs and E0 / E1 in sc.e.
template <typename T>
PO_VECTORIZED void scores(const AttentionParams& p, const RowSet& set, int64_t b, int64_t h, const HeadOperands& op,
                          Scratch& sc) {
  const int64_t n = set.count, D = p.D, Lk = p.Lk;
  const int64_t qs3 = set.content ? p.q.s3 : p.q_g.s3;
  const float* rw = p.r_w_bias != nullptr ? p.r_w_bias + h * D : nullptr;
  const float* rr = p.has_position_term() ? p.r_r_bias + h * D : nullptr;
  const bool seg = p.has_segments();
  for (int64_t i = 0; i < n; ++i) {
    const T* qv = query_row<T>(p, set, b, h, i);
    float* qw = sc.qw.data() + i * D;
    float* qr = sc.qr.data() + i * D;
    for (int64_t d = 0; d < D; ++d) qw[d] = to_float(qv[d * qs3]) + (rw != nullptr ? rw[d] : 0.f);
    if (rr != nullptr)
      for (int64_t d = 0; d < D; ++d) qr[d] = to_float(qv[d * qs3]) + rr[d];
    if (seg) {
      const float* rs = p.r_s_bias + h * D;
      const float* se0 = p.seg_embed + h * D;
      const float* se1 = p.seg_embed + (p.H + h) * D;
      float* qs = sc.qs.data() + i * D;
      float e0 = 0.f, e1 = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        qs[d] = to_float(qv[d * qs3]) + rs[d];
        e0 += qs[d] * se0[d];
        e1 += qs[d] * se1[d];
      }
      sc.e[2 * i] = e0;
      sc.e[2 * i + 1] = e1;
    }
  }
  float* S = sc.s.data();
  gemm(false, true, n, Lk, D, 1.f, sc.qw.data(), D, op.k.p, op.k.ld, 0.f, S, Lk);

  const BandWindow w = band_window(p, set);
  float* band = nullptr;
  if (p.has_position_term()) {
    sc.band.resize(std::max<int64_t>(n * w.W, 1));
    band = sc.band.data();
    if (w.tb > w.ta)
      gemm(false, true, n, w.tb - w.ta, D, 1.f, sc.qr.data(), D, op.r.p + w.ta * op.r.ld, op.r.ld, 0.f,
           band + (w.ta - w.t0), w.W);
    // r rows outside [0, R) contribute 0 (spec); they only occur for pairs a mask must hide.
    for (int64_t i = 0; i < n; ++i) {
      float* bi = band + i * w.W;
      std::fill(bi, bi + std::max<int64_t>(std::min(w.ta - w.t0, w.W), 0), 0.f);
      if (w.tb - w.t0 < w.W) std::fill(bi + std::max<int64_t>(w.tb - w.t0, 0), bi + w.W, 0.f);
    }
  }

  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = set.pos[i];
    RowTerms t;
    if (band != nullptr) t.bd = band + i * w.W + (set.p_hi - pos);
    t.scale = p.scale;
    if (seg) {
      t.e0 = sc.e[2 * i], t.e1 = sc.e[2 * i + 1];
      segment_source(p, b, pos, t);
    }
    if (p.t5_dist != nullptr) t.t5 = p.t5_dist + h * (p.Lq + Lk - 1) + (p.Lq - 1 - pos);
    if (p.q_rank != nullptr) {
      t.q_rank = p.q_rank[b * p.Lq + pos];
      t.k_rank = p.k_rank + b * Lk;
    }
    if (p.attn_mask != nullptr) {
      t.mask = p.attn_mask + b * p.mask_s0 + pos * p.mask_s1;
      t.mask_stride = p.mask_s2;
    }
    if (p.key_padding != nullptr) t.key_padding = p.key_padding + b * Lk;
    if (p.causal) t.causal_pos = pos;
    t.M = p.M;
    t.diagonal = set.content && p.content_sees_self ? content_diagonal(p.M, pos) : -1;
    sc.row_max[i] = finish_row(S + i * Lk, Lk, t);
    sc.empty[i] = sc.row_max[i] == kNegInf;
  }
}

// Dropout factors of one row: keep_j / (1 - dropout_p), with the reference's Philox offsets.
PO_VECTORIZED void dropout_factors(float* f, int64_t Lk, PhiloxKey key, uint64_t offset, float dropout_p) {
  const float inv_keep = 1.f / (1.f - dropout_p);
  philox_uniforms(key, offset, Lk, f);
  for (int64_t j = 0; j < Lk; ++j) f[j] = f[j] >= dropout_p ? inv_keep : 0.f;
}

PO_VECTORIZED void multiply_row(float* x, const float* f, int64_t Lk) {
  for (int64_t j = 0; j < Lk; ++j) x[j] *= f[j];
}

uint64_t dropout_offset(const AttentionParams& p, const RowSet& set, int64_t b, int64_t h, int64_t i) {
  const int64_t rows = set.content ? p.Lq : p.P;
  const uint64_t base = set.content ? 0 : uint64_t(p.B * p.H * p.Lq * p.Lk);
  return base + uint64_t(((b * p.H + h) * rows + set.row[i]) * p.Lk);
}

// exp(s - mx) in place, returns the sum.
PO_VECTORIZED float exp_row(float* s, int64_t Lk, float mx) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < Lk; ++j) {
    s[j] = fast_exp(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

PO_VECTORIZED void scale_row(float* s, int64_t Lk, float c) {
  for (int64_t j = 0; j < Lk; ++j) s[j] *= c;
}

template <typename T>
void store_rows(const Strided4& out, const RowSet& set, int64_t b, int64_t h, const float* src, int64_t D) {
  for (int64_t i = 0; i < set.count; ++i) {
    T* dst = static_cast<T*>(out.ptr) + b * out.s0 + set.row[i] * out.s1 + h * out.s2;
    for (int64_t d = 0; d < D; ++d) dst[d * out.s3] = from_float<T>(src[i * D + d]);
  }
}

template <typename T>
HeadOperands head_operands(const AttentionParams& p, int64_t b, int64_t h, Scratch& sc) {
  return {head_matrix<T>(p.k, b, h, p.Lk, p.D, sc.k), head_matrix<T>(p.v, b, h, p.Lk, p.D, sc.v),
          p.has_position_term() ? head_matrix<T>(p.r, b, h, p.R, p.D, sc.r) : Mat{}};
}

template <typename T>
void forward_impl(const AttentionParams& p, const AttentionForward& f) {
  const int64_t Lk = p.Lk, D = p.D;
  std::vector<std::vector<RowSet>> sets(p.B);
  for (int64_t b = 0; b < p.B; ++b) sets[b] = row_sets(p, b);
  const PhiloxKey key = philox_key(p.seed);
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    Scratch sc(p);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const HeadOperands op = head_operands<T>(p, b, h, sc);
      for (const RowSet& set : sets[b]) {
        scores<T>(p, set, b, h, op, sc);
        float* lse = set.content ? f.lse_h + bh * p.Lq : f.lse_g + bh * p.P;
        for (int64_t i = 0; i < set.count; ++i) {
          float* s = sc.s.data() + i * Lk;
          if (sc.empty[i]) {
            std::fill(s, s + Lk, p.empty_uniform ? 1.f / float(Lk) : 0.f);
            lse[set.row[i]] = INFINITY;
          } else {
            const float mx = sc.row_max[i];
            const float sum = exp_row(s, Lk, mx);
            scale_row(s, Lk, 1.f / sum);
            lse[set.row[i]] = mx + std::log(sum);
          }
          if (p.dropout_p > 0.f) {
            dropout_factors(sc.keep.data(), Lk, key, dropout_offset(p, set, b, h, i), p.dropout_p);
            multiply_row(s, sc.keep.data(), Lk);
          }
        }
        gemm(false, false, set.count, D, Lk, 1.f, sc.s.data(), Lk, op.v.p, op.v.ld, 0.f, sc.o.data(), D);
        store_rows<T>(set.content ? f.out_h : f.out_g, set, b, h, sc.o.data(), D);
      }
    }
  });
}

template <typename T>
void load_rows(const Strided4& t, const RowSet& set, int64_t b, int64_t h, int64_t D, float* dst) {
  for (int64_t i = 0; i < set.count; ++i) {
    const T* src = static_cast<const T*>(t.ptr) + b * t.s0 + set.row[i] * t.s1 + h * t.s2;
    for (int64_t d = 0; d < D; ++d) dst[i * D + d] = to_float(src[d * t.s3]);
  }
}

// dS = P * (dP - delta) in g (dP arrives as dO V^T), the dropped probabilities P_d in s; keep: dropout
// factors or nullptr. The probabilities are those of the forward pass, bit for bit (same max, same sums),
// not exp(s - lse): a float32 lse of scores near 1e4 is off by half an ulp of 1e4, 5e-4 relative in every
// probability. delta = sum_j P_d g_j from the same probabilities (not dO . O from the rounded output), so
// a one-hot row gets dS = 0 exactly, as autograd does.
PO_VECTORIZED void softmax_grad_row(float* s, float* g, int64_t Lk, float mx, const float* keep) {
  const float inv = 1.f / exp_row(s, Lk, mx);
  scale_row(s, Lk, inv);
  float delta = 0.f;
  if (keep == nullptr) {
#pragma omp simd reduction(+ : delta)
    for (int64_t j = 0; j < Lk; ++j) delta += s[j] * g[j];
    for (int64_t j = 0; j < Lk; ++j) g[j] = s[j] * (g[j] - delta);
  } else {
#pragma omp simd reduction(+ : delta)
    for (int64_t j = 0; j < Lk; ++j) delta += s[j] * keep[j] * g[j];
    for (int64_t j = 0; j < Lk; ++j) {
      g[j] = s[j] * (g[j] * keep[j] - delta);
      s[j] *= keep[j];
    }
  }
}

// HF's empty rows: the uniform 1 / Lk.
PO_VECTORIZED void uniform_grad_row(float* s, float* g, int64_t Lk, const float* keep) {
  const float prob = 1.f / float(Lk);
  float delta = 0.f;
#pragma omp simd reduction(+ : delta)
  for (int64_t j = 0; j < Lk; ++j) delta += prob * (keep == nullptr ? 1.f : keep[j]) * g[j];
  for (int64_t j = 0; j < Lk; ++j) {
    const float k = keep == nullptr ? 1.f : keep[j];
    g[j] = prob * (g[j] * k - delta);
    s[j] = prob * k;
  }
}

// Sums of dS over keys in the same / a different segment (for ef's gradient). A row's dS sums to zero,
// so the two sums cancel each other: accumulated in double, or their rounding shows in d r_s_bias.
PO_VECTORIZED void segment_sums(const float* g, int64_t Lk, const RowTerms& t, double* same_out, double* differ_out) {
  double same = 0.0, differ = 0.0;
  if (t.seg_k != nullptr) {
    const int64_t sq = t.seg_q;
#pragma omp simd reduction(+ : same, differ)
    for (int64_t j = 0; j < Lk; ++j) {
      const bool d = t.seg_k[j] != sq;
      differ += d ? double(g[j]) : 0.0;
      same += d ? 0.0 : double(g[j]);
    }
  } else {
#pragma omp simd reduction(+ : same, differ)
    for (int64_t j = 0; j < Lk; ++j) {
      const bool d = t.seg_diff[j * t.seg_diff_stride] != 0;
      differ += d ? double(g[j]) : 0.0;
      same += d ? 0.0 : double(g[j]);
    }
  }
  *same_out = same;
  *differ_out = differ;
}

PO_VECTORIZED void add_row(float* dst, const float* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

struct HeadGrads {
  float *dk, *dv, *dr, *dt5;
  // bias and segment-embedding gradients sum one row per query (thousands per head): kept in double
  double *dbias, *dseg;
};

template <typename T>
void backward_rows(const AttentionParams& p, const AttentionBackward& g, const RowSet& set, int64_t b, int64_t h,
                   const HeadOperands& op, const HeadGrads& hg, PhiloxKey key, Scratch& sc) {
  const int64_t n = set.count, Lk = p.Lk, D = p.D;
  scores<T>(p, set, b, h, op, sc);
  sc.o.resize(n * D);
  sc.dqw.resize(kBlockRows * D);
  float* dO = sc.o.data();
  load_rows<T>(set.content ? g.do_h : g.do_g, set, b, h, D, dO);
  sc.g.resize(std::max<int64_t>(n * Lk, 1));
  float* G = sc.g.data();
  float* S = sc.s.data();
  gemm(false, true, n, Lk, D, 1.f, dO, D, op.v.p, op.v.ld, 0.f, G, Lk);
  const bool dropout = p.dropout_p > 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float* s = S + i * Lk;
    float* gi = G + i * Lk;
    const float* keep = nullptr;
    if (dropout && (!sc.empty[i] || p.empty_uniform)) {
      dropout_factors(sc.keep.data(), Lk, key, dropout_offset(p, set, b, h, i), p.dropout_p);
      keep = sc.keep.data();
    }
    if (!sc.empty[i]) {
      softmax_grad_row(s, gi, Lk, sc.row_max[i], keep);
    } else if (p.empty_uniform) {
      uniform_grad_row(s, gi, Lk, keep);
    } else {
      std::fill(s, s + Lk, 0.f);
      std::fill(gi, gi + Lk, 0.f);
    }
  }
  gemm(true, false, Lk, D, n, 1.f, S, Lk, dO, D, 1.f, hg.dv, D);

  // T5 (unscaled), segment terms, then the scale of ac + bd + ef
  const bool seg = p.has_segments();
  double de[2 * kBlockRows];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = set.pos[i];
    float* gi = G + i * Lk;
    if (hg.dt5 != nullptr) add_row(hg.dt5 + (p.Lq - 1 - pos), gi, Lk);
    if (seg) {
      RowTerms t;
      segment_source(p, b, pos, t);
      double same, differ;
      segment_sums(gi, Lk, t, &same, &differ);
      de[2 * i] = same * p.scale;
      de[2 * i + 1] = differ * p.scale;
    }
    scale_row(gi, Lk, p.scale);
  }

  // ac: dQw = dS K, dK += dS^T Qw
  gemm(false, false, n, D, Lk, 1.f, G, Lk, op.k.p, op.k.ld, 0.f, sc.dqw.data(), D);
  gemm(true, false, Lk, D, n, 1.f, G, Lk, sc.qw.data(), D, 1.f, hg.dk, D);

  // bd: dS scattered back onto the band (the inverse skew), then dQr = dBand R_band, dR_band += dBand^T Qr
  const BandWindow w = band_window(p, set);
  sc.dqr.assign(kBlockRows * D, 0.f);
  if (p.has_position_term()) {
    sc.dband.resize(std::max<int64_t>(n * w.W, 1));
    for (int64_t i = 0; i < n; ++i) {  // row i covers band columns [off, off + Lk); the rest is zero
      float* row = sc.dband.data() + i * w.W;
      const int64_t off = set.p_hi - set.pos[i];
      std::fill(row, row + off, 0.f);
      std::copy(G + i * Lk, G + (i + 1) * Lk, row + off);
      std::fill(row + off + Lk, row + w.W, 0.f);
    }
  }
  if (p.has_position_term() && w.tb > w.ta) {
    const float* db = sc.dband.data() + (w.ta - w.t0);
    gemm(false, false, n, D, w.tb - w.ta, 1.f, db, w.W, op.r.p + w.ta * op.r.ld, op.r.ld, 0.f, sc.dqr.data(), D);
    gemm(true, false, w.tb - w.ta, D, n, 1.f, db, w.W, sc.qr.data(), D, 1.f, hg.dr + w.ta * D, D);
  }

  // dq and the bias gradients
  double* d_rw = hg.dbias;
  double* d_rr = hg.dbias + D;
  double* d_rs = hg.dbias + 2 * D;
  const float* se0 = seg ? p.seg_embed + h * D : nullptr;
  const float* se1 = seg ? p.seg_embed + (p.H + h) * D : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    float* dqw = sc.dqw.data() + i * D;
    const float* dqr = sc.dqr.data() + i * D;
    for (int64_t d = 0; d < D; ++d) {
      d_rw[d] += dqw[d];
      d_rr[d] += dqr[d];
    }
    if (seg) {
      const double e0 = de[2 * i], e1 = de[2 * i + 1];
      const float* qs = sc.qs.data() + i * D;
      for (int64_t d = 0; d < D; ++d) {
        const double ds = e0 * se0[d] + e1 * se1[d];
        d_rs[d] += ds;
        hg.dseg[d] += e0 * qs[d];
        hg.dseg[D + d] += e1 * qs[d];
        dqw[d] += float(ds);
      }
    }
    for (int64_t d = 0; d < D; ++d) dqw[d] += dqr[d];
  }
  store_rows<T>(set.content ? g.dq : g.dq_g, set, b, h, sc.dqw.data(), D);
}

template <typename T>
void backward_impl(const AttentionParams& p, const AttentionBackward& g) {
  std::vector<std::vector<RowSet>> sets(p.B);
  for (int64_t b = 0; b < p.B; ++b) sets[b] = row_sets(p, b);
  const PhiloxKey key = philox_key(p.seed);
  const int64_t Lk = p.Lk, D = p.D, R = p.R, n_dist = p.Lq + p.Lk - 1;
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    Scratch sc(p);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      std::vector<double> bias_sums(3 * D, 0.0), seg_sums(2 * D, 0.0);
      HeadGrads hg{g.dk + bh * Lk * D, g.dv + bh * Lk * D, g.dr + bh * R * D,
                   g.dt5_dist != nullptr ? g.dt5_dist + bh * n_dist : nullptr, bias_sums.data(),
                   g.dseg != nullptr ? seg_sums.data() : nullptr};
      std::fill(hg.dk, hg.dk + Lk * D, 0.f);
      std::fill(hg.dv, hg.dv + Lk * D, 0.f);
      std::fill(hg.dr, hg.dr + R * D, 0.f);
      if (hg.dt5 != nullptr) std::fill(hg.dt5, hg.dt5 + n_dist, 0.f);
      const HeadOperands op = head_operands<T>(p, b, h, sc);
      for (const RowSet& set : sets[b]) backward_rows<T>(p, g, set, b, h, op, hg, key, sc);
      std::copy(bias_sums.begin(), bias_sums.end(), g.dbias + bh * 3 * D);
      if (g.dseg != nullptr) std::copy(seg_sums.begin(), seg_sums.end(), g.dseg + bh * 2 * D);
    }
  });
}

// Query-stream rows that belong to no row set (target_pos = -1) get zeros (and lse = inf, as empty rows).
template <typename T>
void zero_padding_rows(const AttentionParams& p, const Strided4& t, float* lse = nullptr) {
  if (!p.has_query_stream()) return;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t i = 0; i < p.P; ++i) {
      const int64_t pos = p.target_pos[b * p.P + i];
      if (pos >= 0 && pos < p.Lq) continue;
      for (int64_t h = 0; h < p.H; ++h) {
        if (lse != nullptr) lse[(b * p.H + h) * p.P + i] = INFINITY;
        T* row = static_cast<T*>(t.ptr) + b * t.s0 + i * t.s1 + h * t.s2;
        for (int64_t d = 0; d < p.D; ++d) row[d * t.s3] = from_float<T>(0.f);
      }
    }
}

}  // namespace

void two_stream_attention_forward(const AttentionParams& p, const AttentionForward& f) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_impl<T>(p, f);
    zero_padding_rows<T>(p, f.out_g, f.lse_g);
  });
}

void two_stream_attention_backward(const AttentionParams& p, const AttentionBackward& g) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T>(p, g);
    zero_padding_rows<T>(p, g.dq_g);
  });
}

}  // namespace pyobjectives::cpu
