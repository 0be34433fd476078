// One params struct per op: pointers, sizes, strides (in elements) and flags. ops.cpp fills them from
// tensors after its checks; the CPU and CUDA launchers take nothing else. No torch headers.
#pragma once

#include <cstdint>

namespace pyobjectives {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class MaskKind : int { kBytes = 0, kInt32 = 1, kInt64 = 2, kFloat32 = 3 };

// A [dim0, rows, H, D] tensor read through its strides (q, k, v, q_g, r, outputs, gradients).
struct Strided4 {
  void* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // s0 = 0 for r shared across the batch
};

struct AttentionParams {
  DType dtype = DType::kFloat32;
  int64_t B = 0, Lq = 0, Lk = 0, M = 0, H = 0, D = 0, R = 0, P = 0;
  Strided4 q, k, v, r, q_g;  // r.ptr == nullptr: no position term (T5 / plain attention), R = 0
  // [H, D] float32 contiguous biases or nullptr (r_r_bias only with r; r_s_bias / seg_embed [2, H, D] only
  // with segments)
  const float *r_w_bias = nullptr, *r_r_bias = nullptr, *r_s_bias = nullptr, *seg_embed = nullptr;
  const int64_t* target_pos = nullptr;  // [B, P] contiguous, -1 = padding row
  const int32_t *q_rank = nullptr, *k_rank = nullptr;  // [B, Lq], [B, Lk] contiguous
  const uint8_t* attn_mask = nullptr;  // [B, Lq, Lk] bool, strided, true = masked
  int64_t mask_s0 = 0, mask_s1 = 0, mask_s2 = 0;
  const uint8_t* key_padding = nullptr;  // [B, Lk] contiguous, true = padding
  bool causal = false;
  bool content_sees_self = true;  // XLNet: content row i always sees key M + i, whatever the masks say
  const int64_t *seg_q = nullptr, *seg_k = nullptr;  // [B, Lq], [B, Lk] contiguous
  const uint8_t* seg_diff = nullptr;  // [B, Lq, Lk] bool, strided
  int64_t segd_s0 = 0, segd_s1 = 0, segd_s2 = 0;
  // T5 bias per relative distance: [H, Lq + Lk - 1] float32, index key - query_pos + Lq - 1.
  const float* t5_dist = nullptr;
  float scale = 1.f;
  float dropout_p = 0.f;
  uint64_t seed = 0;
  bool empty_uniform = false;  // rows with no visible key: mean of all values (HF) instead of 0
  bool has_segments() const { return seg_q != nullptr || seg_diff != nullptr; }
  bool has_query_stream() const { return P > 0 && q_g.ptr != nullptr; }
  bool has_position_term() const { return r.ptr != nullptr; }
};

struct AttentionForward {
  Strided4 out_h, out_g;           // [B, Lq, H, D], [B, P, H, D] in dtype
  float *lse_h = nullptr, *lse_g = nullptr;  // [B, H, Lq], [B, H, P] contiguous
};

struct AttentionBackward {
  Strided4 do_h, do_g, out_h, out_g;  // read
  const float *lse_h = nullptr, *lse_g = nullptr;
  Strided4 dq, dq_g;                  // written, dtype
  // float32 per-(b, h) partials, reduced over the batch in a fixed order by the caller:
  float* dk = nullptr;          // [B, H, Lk, D]
  float* dv = nullptr;          // [B, H, Lk, D]
  float* dr = nullptr;          // [B, H, R, D]
  float* dbias = nullptr;       // [B, H, 3, D]: r_w_bias, r_r_bias, r_s_bias
  float* dseg = nullptr;        // [B, H, 2, D] (segments only)
  float* dt5_dist = nullptr;    // [B, H, Lq + Lk - 1] (T5 only)
};

struct RTDParams {
  DType dtype = DType::kFloat32;
  int64_t T = 0;     // tokens
  int64_t Dd = 0;    // hidden size with the fused head, 0 for logits
  const void* x = nullptr;        // logits [T] or hidden [T, Dd], contiguous
  const float* head_weight = nullptr;  // [Dd] float32
  float head_bias = 0.f;
  const float* head_bias_dev = nullptr;  // CUDA: the bias as one float32 on the device (read there, no sync)
  const int64_t *corrupted = nullptr, *original = nullptr;  // [T]
  // [T] attention mask, nonzero = real token, read in its own dtype; nullptr = all real
  const void* real = nullptr;
  MaskKind real_kind = MaskKind::kBytes;
  float loss_weight = 1.f;
  // outputs
  void* loss_tok = nullptr;   // [T] dtype, reduction "none" (loss_weight applied, 0 at padding)
  float* grad = nullptr;      // [T] d loss_t / d z_t times real_t (unweighted), or nullptr
  double* partials = nullptr;  // [n_chunks, kRTDSums]
  float* dw_partials = nullptr;  // [n_chunks, Dd]: sum_t grad_t * x_t (fused head), or nullptr
};

// Partial sums of the RTD pass, in this order.
enum RTDSum : int { kLossSum = 0, kReal, kCorrect, kTruePos, kPredicted, kReplaced, kGradSum, kRTDSums };
constexpr int64_t kRTDChunk = 4096;  // tokens per partial sum: results independent of the thread count

struct LinearCEParams {
  DType dtype = DType::kFloat32;
  int64_t N = 0, E = 0, V = 0;
  const void* hidden = nullptr;  // [N, E] contiguous
  const void* weight = nullptr;  // [V, E] contiguous
  const float* bias = nullptr;   // [V] float32 or nullptr
  const int64_t* targets = nullptr;  // [N]
  int64_t ignore_index = -100;
  bool sample = false;
  float temperature = 1.f;
  uint64_t seed = 0;
  const int64_t* disallow = nullptr;  // [N] or nullptr
  bool want_argmax = false;
  // outputs
  float* row_loss = nullptr;    // [N] float32 (0 at ignored rows)
  int64_t* sampled = nullptr;   // [N]
  int64_t* argmax = nullptr;    // [N]
  float* lse = nullptr;         // [N] float32
};

}  // namespace pyobjectives
