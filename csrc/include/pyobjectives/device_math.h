// Small pieces every backend must compute identically, usable from host and device code.
// No torch headers: the CPU kernels, the CUDA kernels and ops.cpp all include this file.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PO_HD __host__ __device__ __forceinline__
#else
#define PO_HD inline
#endif

namespace pyobjectives {

// ---- Philox-4x32-10, bit-identical to Triton's tl.rand(seed, offset) and reference/philox.py ----

struct PhiloxKey {
  uint32_t k0, k1;
};

PO_HD PhiloxKey philox_key(uint64_t seed) { return {uint32_t(seed), uint32_t(seed >> 32)}; }

// First output word for the counter (c0, c1, 0, 0): all 32-bit lanes, so CPU loops over c0 vectorize
// with 32x32->64 multiplies.
PO_HD uint32_t philox_counter_word(PhiloxKey key, uint32_t c0, uint32_t c1) {
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = key.k0, k1 = key.k1;
#if !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t(0xCD9E8D57u) * c2;
    const uint64_t pa = uint64_t(0xD2511F53u) * c0;
    const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Counter of a 64-bit offset: (offset & 0xffffffff, offset >> 32, 0, 0).
PO_HD uint32_t philox_word(PhiloxKey key, uint64_t offset) {
  return philox_counter_word(key, uint32_t(offset), uint32_t(offset >> 32));
}

// Uniform float in [0, 1): the word read as int32, folded to non-negative (~x), times 2^-31 rounded down.
PO_HD float uniform_from_word(uint32_t word) {
  const int32_t x = int32_t(word);
  const int32_t folded = x < 0 ? ~x : x;
  return float(folded) * 4.6566127342e-10f;
}

PO_HD float philox_uniform(PhiloxKey key, uint64_t offset) { return uniform_from_word(philox_word(key, offset)); }

// ---- T5 relative position bucket (relative_position = key_pos - query_pos), as HF T5 computes it ----
// The log is taken in float32 like T5; ops.cpp tabulates it once per distance per call, so every
// kernel reads buckets from a table instead of recomputing logs per pair.
PO_HD int64_t t5_bucket(int64_t relative_position, bool bidirectional, int64_t num_buckets, int64_t max_distance) {
  int64_t bucket = 0;
  int64_t distance;
  if (bidirectional) {
    num_buckets /= 2;
    if (relative_position > 0) bucket += num_buckets;
    distance = relative_position < 0 ? -relative_position : relative_position;
  } else {
    distance = relative_position < 0 ? -relative_position : 0;
  }
  const int64_t max_exact = num_buckets / 2;
  if (distance < max_exact) return bucket + distance;
  const float log_ratio = logf(float(distance) / float(max_exact));
  const float log_span = float(log(double(max_distance) / double(max_exact)));
  int64_t large = max_exact + int64_t(log_ratio / log_span * float(num_buckets - max_exact));
  if (large > num_buckets - 1) large = num_buckets - 1;
  return bucket + large;
}

// ---- Transformer-XL relative positions ----
// r row t encodes distance Lk - t; query position i (absolute M + i) and key j read row Lq - i + j.
PO_HD int64_t r_row(int64_t Lq, int64_t query_pos, int64_t key) { return Lq - query_pos + key; }

// ---- Visibility rules (spec: "Visibility"); a pair is visible iff every given rule allows it ----
PO_HD bool rank_allows(int32_t k_rank, int32_t q_rank) { return k_rank < q_rank; }
PO_HD bool causal_allows(int64_t key, int64_t M, int64_t query_pos) { return key <= M + query_pos; }
// The key a content row always sees, whatever the masks say: its own position (HF's non_tgt_mask).
PO_HD int64_t content_diagonal(int64_t M, int64_t query_pos) { return M + query_pos; }

// ---- Online softmax: running (max, sum of exp) over a stream of scores ----
struct OnlineSoftmax {
  float max = -INFINITY;
  float sum = 0.f;
  // Merge a block whose own max is block_max and sum of exp(x - block_max) is block_sum.
  // A NaN block max (a block of NaN scores) makes max, sum and the logsumexp NaN, as torch's.
  PO_HD void merge(float block_max, float block_sum) {
    if (block_max == -INFINITY) return;
    if (block_max > max || block_max != block_max) {
      sum = sum * expf(max - block_max) + block_sum;
      max = block_max;
    } else {
      sum += block_sum * expf(block_max - max);
    }
  }
  PO_HD float logsumexp() const { return max == -INFINITY ? -INFINITY : max + logf(sum); }
};

}  // namespace pyobjectives
