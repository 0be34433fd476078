// The one torch boundary of pyobjectives._C: op schemas, argument checks naming the tensor, and the
// CPU and CUDA implementations that turn tensors into params structs for the kernels in cpu/ and
// cuda/ (the CUDA ones under PYOBJECTIVES_WITH_CUDA; the attention ones also need
// PYOBJECTIVES_CUDA_ATTENTION, defined by setup.py when the attention kernel sources exist).
//
// Autograd and fake (meta) implementations are registered from Python (pyobjectives/native.py), so
// torch.compile traces these ops without a graph break.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/kernels.h"
#include "pyobjectives/device_math.h"
#include "pyobjectives/params.h"

#ifdef PYOBJECTIVES_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launchers.h"
#endif

namespace po = pyobjectives;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define CHECK_DEVICE(x, dev) TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define CHECK_OPT_DEVICE(x, dev)                                                                 \
  TORCH_CHECK(!(x).has_value() || (x)->device() == (dev), #x " must be on ", (dev), ", got ", (x)->device())
#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                          \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              ") = ", at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define CHECK_FLOATING(x)                                                                                         \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||                             \
                  (x).scalar_type() == at::kHalf,                                                                  \
              #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())
#define CHECK_INTEGRAL(x) \
  TORCH_CHECK(at::isIntegralType((x).scalar_type(), false), #x " must be an integer tensor, got ", (x).scalar_type())
#define CHECK_CONTIGUOUS_LAST_DIM(x) \
  TORCH_CHECK((x).size(-1) <= 1 || (x).stride(-1) == 1, #x " must have a contiguous last dimension, got strides ", (x).strides())

namespace {

po::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return po::DType::kFloat32;
    case at::kBFloat16: return po::DType::kBFloat16;
    case at::kHalf: return po::DType::kFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

// Outputs start as NaN under PYOBJECTIVES_POISON_OUTPUTS=1 (tests), so unwritten elements fail.
Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  Tensor t = at::empty(shape, options);
  const char* poison = std::getenv("PYOBJECTIVES_POISON_OUTPUTS");
  if (poison != nullptr && std::string(poison) == "1") {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(-1);
  }
  return t;
}

po::Strided4 strided4(const Tensor& t) {
  po::Strided4 s;
  s.ptr = t.data_ptr();
  if (t.dim() == 4) {
    s.s0 = t.stride(0), s.s1 = t.stride(1), s.s2 = t.stride(2), s.s3 = t.stride(3);
  } else {  // [R, H, D] shared across the batch
    s.s0 = 0, s.s1 = t.stride(0), s.s2 = t.stride(1), s.s3 = t.stride(2);
  }
  return s;
}

Tensor f32c(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The Philox seed arrives as a one-element int64 CPU tensor (None when nothing is random), so that
// torch.compile can draw it inside the graph; reading a CPU scalar never waits for a device.
uint64_t philox_seed(const OptTensor& seed) {
  if (!seed.has_value()) return 0;
  TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() == 1,
              "seed must be a one-element int64 CPU tensor, got ", seed->scalar_type(), " of shape ", seed->sizes(),
              " on ", seed->device());
  const int64_t value = seed->item<int64_t>();
  TORCH_CHECK(value >= 0, "seed must be non-negative, got ", value);
  return uint64_t(value);
}

// The T5 bucket of every relative distance key - query_pos = i - (Lq - 1) - M, i < Lq + Lk - 1, built
// where the kernels run (on a GPU by a kernel: no host-to-device copy to wait for).
Tensor t5_bucket_table(int64_t Lq, int64_t Lk, bool bidirectional, int64_t num_buckets, int64_t max_distance,
                       at::Device dev) {
  const int64_t n_dist = Lq + Lk - 1, first = -(Lq - 1) - (Lk - Lq);
#ifdef PYOBJECTIVES_WITH_CUDA
  if (dev.is_cuda()) {
    Tensor rel = at::arange(first, first + n_dist, at::TensorOptions().dtype(at::kLong).device(dev));
    Tensor out = at::empty_like(rel);
    po::cuda::t5_bucket(rel.data_ptr<int64_t>(), n_dist, bidirectional, num_buckets, max_distance,
                        out.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
#endif
  std::vector<int64_t> bucket(n_dist);
  for (int64_t i = 0; i < n_dist; ++i) bucket[i] = po::t5_bucket(first + i, bidirectional, num_buckets, max_distance);
  return at::tensor(bucket, at::TensorOptions().dtype(at::kLong));
}

// Everything the attention kernels read, converted once per call (O(B*L) or O(H*D) each).
struct AttentionInputs {
  po::AttentionParams p;
  std::vector<Tensor> keep;  // converted tensors the params point into
  Tensor t5_bucket;          // [Lq + Lk - 1] bucket of each relative distance
};

AttentionInputs attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& r,
                                 const OptTensor& r_w_bias, const OptTensor& r_r_bias, const OptTensor& q_g,
                                 const OptTensor& target_pos, const OptTensor& q_rank, const OptTensor& k_rank,
                                 const OptTensor& attn_mask, const OptTensor& key_padding_mask, bool causal,
                                 const OptTensor& seg_q, const OptTensor& seg_k, const OptTensor& seg_diff,
                                 const OptTensor& r_s_bias, const OptTensor& seg_embed, const OptTensor& t5_bias,
                                 int64_t t5_num_buckets, int64_t t5_max_distance, bool t5_bidirectional,
                                 bool content_sees_self, double scale, double dropout_p, const OptTensor& seed,
                                 bool empty_uniform) {
  CHECK_DIM(q, 4);
  CHECK_FLOATING(q);
  const auto dev = q.device();
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), D = q.size(3);
  CHECK_DIM(k, 4);
  const int64_t Lk = k.size(1);
  // Shorter keys only mean something for cross-attention, where no rule relates key and query positions.
  TORCH_CHECK(Lk >= Lq || !(r.has_value() || t5_bias.has_value() || causal || content_sees_self),
              "k must have Lk >= Lq (Lk = M + Lq) with r, t5_bias, causal or content_sees_self, got Lk=", Lk,
              " < Lq=", Lq);
  CHECK_SHAPE(k, B, Lk, H, D);
  CHECK_SHAPE(v, B, Lk, H, D);
  for (const Tensor* t : {&k, &v}) {
    CHECK_DTYPE(*t, q.scalar_type());
    CHECK_DEVICE(*t, dev);
  }
  CHECK_OPT_DEVICE(r_w_bias, dev);
  CHECK_OPT_DEVICE(r_r_bias, dev);
  CHECK_OPT_DEVICE(target_pos, dev);
  CHECK_OPT_DEVICE(q_rank, dev);
  CHECK_OPT_DEVICE(k_rank, dev);
  CHECK_OPT_DEVICE(attn_mask, dev);
  CHECK_OPT_DEVICE(key_padding_mask, dev);
  CHECK_OPT_DEVICE(seg_q, dev);
  CHECK_OPT_DEVICE(seg_k, dev);
  CHECK_OPT_DEVICE(seg_diff, dev);
  CHECK_OPT_DEVICE(r_s_bias, dev);
  CHECK_OPT_DEVICE(seg_embed, dev);
  CHECK_OPT_DEVICE(t5_bias, dev);
  int64_t R = 0;
  if (r.has_value()) {
    TORCH_CHECK(r->dim() == 3 || r->dim() == 4, "r must have shape [R, H, D] or [B, R, H, D], got ", r->sizes());
    R = r->size(-3);
    if (r->dim() == 4) {
      CHECK_SHAPE(*r, B, R, H, D);
    } else {
      CHECK_SHAPE(*r, R, H, D);
    }
    TORCH_CHECK(R >= Lk + 1, "r must have at least Lk + 1 = ", Lk + 1, " rows (row Lk is distance 0), got R=", R);
    CHECK_DTYPE(*r, q.scalar_type());
    CHECK_DEVICE(*r, dev);
    TORCH_CHECK(r_w_bias.has_value() && r_r_bias.has_value(), "r needs r_w_bias [H, D] and r_r_bias [H, D]");
  } else {
    TORCH_CHECK(!r_r_bias.has_value(), "r_r_bias was given without r");
  }
  if (r_w_bias.has_value()) CHECK_SHAPE(*r_w_bias, H, D);
  if (r_r_bias.has_value()) CHECK_SHAPE(*r_r_bias, H, D);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);

  AttentionInputs in;
  po::AttentionParams& p = in.p;
  p.dtype = to_dtype(q.scalar_type());
  p.B = B, p.Lq = Lq, p.Lk = Lk, p.M = Lk - Lq, p.H = H, p.D = D, p.R = R;
  p.q = strided4(q), p.k = strided4(k), p.v = strided4(v);
  if (r.has_value()) p.r = strided4(*r);
  auto keep = [&](Tensor t) {
    in.keep.push_back(t);
    return t;
  };
  if (r_w_bias.has_value()) p.r_w_bias = keep(f32c(*r_w_bias)).data_ptr<float>();
  if (r_r_bias.has_value()) p.r_r_bias = keep(f32c(*r_r_bias)).data_ptr<float>();
  TORCH_CHECK(q_g.has_value() == target_pos.has_value(), "q_g and target_pos go together");
  if (q_g.has_value()) {
    CHECK_DIM(*q_g, 4);
    const int64_t P = q_g->size(1);
    CHECK_SHAPE(*q_g, B, P, H, D);
    CHECK_DTYPE(*q_g, q.scalar_type());
    CHECK_DEVICE(*q_g, dev);
    CHECK_SHAPE(*target_pos, B, P);
    CHECK_INTEGRAL(*target_pos);
    p.P = P;
    p.q_g = strided4(*q_g);
    p.target_pos = keep(target_pos->to(at::kLong).contiguous()).data_ptr<int64_t>();
  }
  TORCH_CHECK(q_rank.has_value() == k_rank.has_value(), "q_rank and k_rank go together");
  if (q_rank.has_value()) {
    CHECK_SHAPE(*q_rank, B, Lq);
    CHECK_SHAPE(*k_rank, B, Lk);
    CHECK_INTEGRAL(*q_rank);
    CHECK_INTEGRAL(*k_rank);
    p.q_rank = keep(q_rank->to(at::kInt).contiguous()).data_ptr<int32_t>();
    p.k_rank = keep(k_rank->to(at::kInt).contiguous()).data_ptr<int32_t>();
  }
  if (attn_mask.has_value()) {
    CHECK_SHAPE(*attn_mask, B, Lq, Lk);
    CHECK_DTYPE(*attn_mask, at::kBool);
    p.attn_mask = reinterpret_cast<const uint8_t*>(attn_mask->data_ptr<bool>());
    p.mask_s0 = attn_mask->stride(0), p.mask_s1 = attn_mask->stride(1), p.mask_s2 = attn_mask->stride(2);
  }
  if (key_padding_mask.has_value()) {
    CHECK_SHAPE(*key_padding_mask, B, Lk);
    CHECK_DTYPE(*key_padding_mask, at::kBool);
    p.key_padding = keep(key_padding_mask->to(at::kByte).contiguous()).data_ptr<uint8_t>();
  }
  p.causal = causal;
  TORCH_CHECK(seg_q.has_value() == seg_k.has_value(), "seg_q and seg_k go together");
  TORCH_CHECK(!(seg_q.has_value() && seg_diff.has_value()), "give seg_q/seg_k or seg_diff, not both");
  if (seg_q.has_value()) {
    CHECK_SHAPE(*seg_q, B, Lq);
    CHECK_SHAPE(*seg_k, B, Lk);
    CHECK_INTEGRAL(*seg_q);
    CHECK_INTEGRAL(*seg_k);
    p.seg_q = keep(seg_q->to(at::kLong).contiguous()).data_ptr<int64_t>();
    p.seg_k = keep(seg_k->to(at::kLong).contiguous()).data_ptr<int64_t>();
  }
  if (seg_diff.has_value()) {
    CHECK_SHAPE(*seg_diff, B, Lq, Lk);
    CHECK_DTYPE(*seg_diff, at::kBool);
    p.seg_diff = reinterpret_cast<const uint8_t*>(seg_diff->data_ptr<bool>());
    p.segd_s0 = seg_diff->stride(0), p.segd_s1 = seg_diff->stride(1), p.segd_s2 = seg_diff->stride(2);
  }
  if (p.has_segments()) {
    TORCH_CHECK(r_s_bias.has_value() && seg_embed.has_value(), "segments need r_s_bias [H, D] and seg_embed [2, H, D]");
    CHECK_SHAPE(*r_s_bias, H, D);
    CHECK_SHAPE(*seg_embed, 2, H, D);
    p.r_s_bias = keep(f32c(*r_s_bias)).data_ptr<float>();
    p.seg_embed = keep(f32c(*seg_embed)).data_ptr<float>();
  }
  if (t5_bias.has_value()) {
    CHECK_SHAPE(*t5_bias, t5_num_buckets, H);
    TORCH_CHECK(t5_num_buckets >= (t5_bidirectional ? 4 : 2), "t5_num_buckets too small: ", t5_num_buckets);
    TORCH_CHECK(t5_max_distance > t5_num_buckets / (t5_bidirectional ? 4 : 2),
                "t5_max_distance must exceed the exact-bucket range, got ", t5_max_distance);
    in.t5_bucket = t5_bucket_table(Lq, Lk, t5_bidirectional, t5_num_buckets, t5_max_distance, dev);
    Tensor table = f32c(*t5_bias).index_select(0, in.t5_bucket).t().contiguous();  // [H, n_dist]
    p.t5_dist = keep(table).data_ptr<float>();
  }
  p.content_sees_self = content_sees_self;
  p.scale = float(scale);
  p.dropout_p = float(dropout_p);
  p.seed = philox_seed(seed);
  p.empty_uniform = empty_uniform;
  return in;
}

#define ATTENTION_ARGS                                                                                             \
  const Tensor &q, const Tensor &k, const Tensor &v, const OptTensor &r, const OptTensor &r_w_bias,             \
      const OptTensor &r_r_bias, const OptTensor &q_g, const OptTensor &target_pos, const OptTensor &q_rank,          \
      const OptTensor &k_rank, const OptTensor &attn_mask, const OptTensor &key_padding_mask, bool causal,         \
      const OptTensor &seg_q, const OptTensor &seg_k, const OptTensor &seg_diff, const OptTensor &r_s_bias,        \
      const OptTensor &seg_embed, const OptTensor &t5_bias, int64_t t5_num_buckets, int64_t t5_max_distance,       \
      bool t5_bidirectional, bool content_sees_self, double scale, double dropout_p, const OptTensor &seed,       \
      bool empty_uniform
#define ATTENTION_NAMES                                                                                           \
  q, k, v, r, r_w_bias, r_r_bias, q_g, target_pos, q_rank, k_rank, attn_mask, key_padding_mask, causal, seg_q,     \
      seg_k, seg_diff, r_s_bias, seg_embed, t5_bias, t5_num_buckets, t5_max_distance, t5_bidirectional,           \
      content_sees_self, scale, dropout_p, seed, empty_uniform

// Allocates the outputs and hands them to run(inputs, outputs): the CPU kernel or the CUDA launcher.
template <typename Run>
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_fwd(ATTENTION_ARGS, Run&& run) {
  AttentionInputs in = attention_inputs(ATTENTION_NAMES);
  const po::AttentionParams& p = in.p;
  const auto opts = q.options();
  const auto f32 = opts.dtype(at::kFloat);
  Tensor out_h = new_output({p.B, p.Lq, p.H, p.D}, opts);
  Tensor out_g = new_output({p.B, p.P, p.H, p.D}, opts);
  Tensor lse_h = new_output({p.B, p.H, p.Lq}, f32);
  Tensor lse_g = new_output({p.B, p.H, p.P}, f32);
  po::AttentionForward f;
  f.out_h = strided4(out_h), f.out_g = strided4(out_g);
  f.lse_h = lse_h.data_ptr<float>(), f.lse_g = lse_g.data_ptr<float>();
  run(in, f);
  return {out_h, out_g, lse_h, lse_g};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> two_stream_attention_fwd_cpu(ATTENTION_ARGS) {
  return attention_fwd(ATTENTION_NAMES, [](const AttentionInputs& in, const po::AttentionForward& f) {
    po::cpu::two_stream_attention_forward(in.p, f);
  });
}

#define ATTENTION_BWD_ARGS                                                                                 \
  const Tensor &do_h, const Tensor &do_g, const Tensor &out_h, const Tensor &out_g, const Tensor &lse_h, \
      const Tensor &lse_g, ATTENTION_ARGS
#define ATTENTION_BWD_NAMES do_h, do_g, out_h, out_g, lse_h, lse_g, ATTENTION_NAMES

// Allocates the gradients, hands them to run(inputs, grads), then sums the per-(batch, head) partials
// over the batch in a fixed order (the same for both devices).
template <typename Run>
std::vector<Tensor> attention_bwd(ATTENTION_BWD_ARGS, Run&& run) {
  AttentionInputs in = attention_inputs(ATTENTION_NAMES);
  const po::AttentionParams& p = in.p;
  CHECK_SHAPE(do_h, p.B, p.Lq, p.H, p.D);
  CHECK_SHAPE(out_h, p.B, p.Lq, p.H, p.D);
  CHECK_SHAPE(do_g, p.B, p.P, p.H, p.D);
  CHECK_SHAPE(out_g, p.B, p.P, p.H, p.D);
  CHECK_SHAPE(lse_h, p.B, p.H, p.Lq);
  CHECK_SHAPE(lse_g, p.B, p.H, p.P);
  for (const Tensor* t : {&do_h, &do_g, &out_h, &out_g, &lse_h, &lse_g}) CHECK_DEVICE(*t, q.device());
  for (const Tensor* t : {&do_h, &do_g, &out_h, &out_g}) CHECK_DTYPE(*t, q.scalar_type());
  CHECK_DTYPE(lse_h, at::kFloat);
  CHECK_DTYPE(lse_g, at::kFloat);
  const Tensor lse_hc = lse_h.contiguous(), lse_gc = lse_g.contiguous();
  const auto opts = q.options();
  const auto f32 = opts.dtype(at::kFloat);
  const int64_t B = p.B, H = p.H, D = p.D, n_dist = p.Lq + p.Lk - 1;
  Tensor dq = new_output({B, p.Lq, H, D}, opts);
  Tensor dq_g = new_output({B, p.P, H, D}, opts);
  Tensor dk = at::empty({B, H, p.Lk, D}, f32), dv = at::empty({B, H, p.Lk, D}, f32);
  Tensor dr = at::empty({B, H, p.R, D}, f32), dbias = at::empty({B, H, 3, D}, f32);
  Tensor dseg = at::empty({B, H, 2, D}, f32), dt5 = at::empty({B, H, n_dist}, f32);
  po::AttentionBackward g;
  g.do_h = strided4(do_h), g.do_g = strided4(do_g), g.out_h = strided4(out_h), g.out_g = strided4(out_g);
  g.lse_h = lse_hc.data_ptr<float>(), g.lse_g = lse_gc.data_ptr<float>();
  g.dq = strided4(dq), g.dq_g = strided4(dq_g);
  g.dk = dk.data_ptr<float>(), g.dv = dv.data_ptr<float>(), g.dr = dr.data_ptr<float>();
  g.dbias = dbias.data_ptr<float>();
  g.dseg = p.has_segments() ? dseg.data_ptr<float>() : nullptr;
  g.dt5_dist = p.t5_dist != nullptr ? dt5.data_ptr<float>() : nullptr;
  run(in, g);

  // Per-(batch, head) partials to the callers' layouts; batch sums in a fixed order.
  const auto dt = q.scalar_type();
  Tensor dk_out = dk.permute({0, 2, 1, 3}).to(dt).contiguous();
  Tensor dv_out = dv.permute({0, 2, 1, 3}).to(dt).contiguous();
  Tensor bias_sum = dbias.sum(0);  // [H, 3, D]
  Tensor dr_out = at::empty({0}, opts), d_rw = at::empty({0}, opts), d_rr = at::empty({0}, opts);
  if (r.has_value()) {
    dr_out = r->dim() == 3 ? dr.sum(0).permute({1, 0, 2}).to(dt).contiguous()
                           : dr.permute({0, 2, 1, 3}).to(dt).contiguous();
    d_rr = bias_sum.select(1, 1).to(r_r_bias->scalar_type()).contiguous();
  }
  if (r_w_bias.has_value()) d_rw = bias_sum.select(1, 0).to(r_w_bias->scalar_type()).contiguous();
  Tensor d_rs = at::empty({0}, opts), d_se = at::empty({0}, opts), d_t5 = at::empty({0}, opts);
  if (p.has_segments()) {
    d_rs = bias_sum.select(1, 2).to(r_s_bias->scalar_type()).contiguous();
    d_se = dseg.sum(0).permute({1, 0, 2}).to(seg_embed->scalar_type()).contiguous();
  }
  if (p.t5_dist != nullptr) {
    // [n_dist, H] per distance -> [num_buckets, H]: one-hot product, deterministic
    Tensor one_hot = at::one_hot(in.t5_bucket, t5_num_buckets).to(at::kFloat);
    d_t5 = at::mm(one_hot.t(), dt5.sum(0).t()).to(t5_bias->scalar_type()).contiguous();
  }
  return {dq, dk_out, dv_out, dr_out, d_rw, d_rr, dq_g, d_rs, d_se, d_t5};
}

std::vector<Tensor> two_stream_attention_bwd_cpu(ATTENTION_BWD_ARGS) {
  return attention_bwd(ATTENTION_BWD_NAMES, [](const AttentionInputs& in, const po::AttentionBackward& g) {
    po::cpu::two_stream_attention_backward(in.p, g);
  });
}

// ---- RTD ----

po::RTDParams rtd_params(const Tensor& x, const OptTensor& head_weight, const OptTensor& head_bias,
                         const Tensor& corrupted_ids, const Tensor& original_ids, const OptTensor& attention_mask,
                         double loss_weight, std::vector<Tensor>& keep) {
  CHECK_FLOATING(x);
  const bool head = head_weight.has_value();
  TORCH_CHECK(!head || x.dim() >= 1, "logits_or_hidden must be [*, Dd] hidden states when head_weight is given");
  const at::IntArrayRef lead = head ? x.sizes().slice(0, x.dim() - 1) : x.sizes();
  TORCH_CHECK(corrupted_ids.sizes() == lead, "corrupted_ids must have shape ", lead, ", got ", corrupted_ids.sizes());
  TORCH_CHECK(original_ids.sizes() == lead, "original_ids must have shape ", lead, ", got ", original_ids.sizes());
  CHECK_INTEGRAL(corrupted_ids);
  CHECK_INTEGRAL(original_ids);
  po::RTDParams p;
  p.dtype = to_dtype(x.scalar_type());
  p.T = 1;
  for (int64_t s : lead) p.T *= s;
  Tensor xc = keep.emplace_back(x.contiguous());
  p.x = xc.data_ptr();
  if (head) {
    p.Dd = x.size(-1);
    TORCH_CHECK(p.Dd >= 1, "logits_or_hidden must be hidden states [*, Dd] with Dd >= 1, got shape ", x.sizes());
    CHECK_SHAPE(*head_weight, p.Dd);
    p.head_weight = keep.emplace_back(f32c(*head_weight)).data_ptr<float>();
    if (head_bias.has_value()) {
      TORCH_CHECK(head_bias->numel() == 1, "head_bias must be a scalar tensor, got shape ", head_bias->sizes());
      if (x.is_cuda()) p.head_bias_dev = keep.emplace_back(f32c(*head_bias).reshape({1})).data_ptr<float>();
      else p.head_bias = head_bias->item<float>();
    }
  }
  p.corrupted = keep.emplace_back(corrupted_ids.to(at::kLong).contiguous()).data_ptr<int64_t>();
  p.original = keep.emplace_back(original_ids.to(at::kLong).contiguous()).data_ptr<int64_t>();
  if (attention_mask.has_value()) {
    TORCH_CHECK(attention_mask->sizes() == lead, "attention_mask must have shape ", lead, ", got ",
                attention_mask->sizes());
    // bool / uint8 / int32 / int64 / float32 masks are read in place; other dtypes become bool first
    Tensor real = attention_mask->contiguous();
    switch (real.scalar_type()) {
      case at::kBool: case at::kByte: case at::kChar: p.real_kind = po::MaskKind::kBytes; break;
      case at::kInt: p.real_kind = po::MaskKind::kInt32; break;
      case at::kLong: p.real_kind = po::MaskKind::kInt64; break;
      case at::kFloat: p.real_kind = po::MaskKind::kFloat32; break;
      default: real = real.ne(0), p.real_kind = po::MaskKind::kBytes;
    }
    p.real = keep.emplace_back(real).data_ptr();
  }
  p.loss_weight = float(loss_weight);
  return p;
}

// Loss (mean / sum) and statistics from the float64 sums; device ops only (no host synchronisation).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rtd_results(const Tensor& x, Tensor loss, const Tensor& sums,
                                                               const Tensor& grad, const Tensor& dw,
                                                               double loss_weight, int64_t reduction) {
  Tensor n_real = sums[po::kReal];
  if (reduction == 1) loss = (sums[po::kLossSum] * loss_weight / n_real.clamp_min(1)).to(x.scalar_type());
  if (reduction == 2) loss = (sums[po::kLossSum] * loss_weight).to(x.scalar_type());
  Tensor real = n_real.to(at::kFloat), tp = sums[po::kTruePos].to(at::kFloat);
  Tensor stats = at::stack({sums[po::kCorrect].to(at::kFloat) / real.clamp_min(1),
                            tp / sums[po::kPredicted].to(at::kFloat).clamp_min(1),
                            tp / sums[po::kReplaced].to(at::kFloat).clamp_min(1), sums[po::kReplaced].to(at::kFloat),
                            real});
  return {loss, stats, grad, dw, sums};
}

// reduction: 0 none, 1 mean, 2 sum. Returns (loss, stats [5], grad [T] float32, dw [Dd] float32, sums [7] float64).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rtd_loss_fwd_cpu(
    const Tensor& x, const OptTensor& head_weight, const OptTensor& head_bias, const Tensor& corrupted_ids,
    const Tensor& original_ids, const OptTensor& attention_mask, double loss_weight, int64_t reduction,
    bool keep_grad, bool head_weight_grad) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  std::vector<Tensor> keep;
  po::RTDParams p = rtd_params(x, head_weight, head_bias, corrupted_ids, original_ids, attention_mask, loss_weight,
                               keep);
  const int64_t n_chunks = (p.T + po::kRTDChunk - 1) / po::kRTDChunk;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor partials = at::zeros({std::max<int64_t>(n_chunks, 1), po::kRTDSums}, x.options().dtype(at::kDouble));
  Tensor grad = keep_grad ? new_output({p.T}, f32) : at::empty({0}, f32);
  const bool dw_fwd = head_weight_grad && reduction != 0 && p.Dd > 0;
  Tensor dw_part = dw_fwd ? at::zeros({std::max<int64_t>(n_chunks, 1), p.Dd}, f32) : at::empty({0}, f32);
  const at::IntArrayRef lead = p.Dd > 0 ? x.sizes().slice(0, x.dim() - 1) : x.sizes();
  Tensor loss = reduction == 0 ? new_output(lead, x.options()) : Tensor();
  p.partials = partials.data_ptr<double>();
  p.grad = keep_grad ? grad.data_ptr<float>() : nullptr;
  p.dw_partials = dw_fwd ? dw_part.data_ptr<float>() : nullptr;
  p.loss_tok = reduction == 0 ? loss.data_ptr() : nullptr;
  if (p.T > 0) po::cpu::rtd_loss_forward(p);
  Tensor sums = partials.sum(0);  // float64, chunk order fixed
  Tensor dw = dw_fwd ? dw_part.sum(0) : at::empty({0}, f32);
  return rtd_results(x, loss, sums, grad, dw, loss_weight, reduction);
}

// dx = coef_t * grad_t * head_weight for hidden states x (coef: [T] or one element). Shared by the devices;
// launch(p, grad, coef, coef_stride, dx) runs the device's kernel.
template <typename Launch>
Tensor rtd_loss_head_bwd_impl(const Tensor& grad, const Tensor& coef, const Tensor& head_weight, const Tensor& x,
                              Launch launch) {
  CHECK_DTYPE(grad, at::kFloat);
  CHECK_DTYPE(coef, at::kFloat);
  CHECK_FLOATING(x);
  const auto dev = x.device();
  CHECK_DEVICE(grad, dev);
  CHECK_DEVICE(coef, dev);
  CHECK_DEVICE(head_weight, dev);
  const int64_t Dd = x.size(-1), T = x.numel() / std::max<int64_t>(Dd, 1);
  CHECK_SHAPE(grad, T);
  CHECK_SHAPE(head_weight, Dd);
  TORCH_CHECK(coef.numel() == 1 || coef.numel() == T, "coef must have 1 or ", T, " elements, got ", coef.numel());
  po::RTDParams p;
  p.dtype = to_dtype(x.scalar_type());
  p.T = T, p.Dd = Dd;
  Tensor w = f32c(head_weight), gc = grad.contiguous(), cc = coef.contiguous();
  p.head_weight = w.data_ptr<float>();
  Tensor dx = new_output(x.sizes(), x.options());
  if (T > 0) launch(p, gc.data_ptr<float>(), cc.data_ptr<float>(), coef.numel() == 1 ? 0 : 1, dx.data_ptr());
  return dx;
}

Tensor rtd_loss_head_bwd_cpu(const Tensor& grad, const Tensor& coef, const Tensor& head_weight, const Tensor& x) {
  return rtd_loss_head_bwd_impl(grad, coef, head_weight, x, po::cpu::rtd_loss_head_backward);
}

// ---- linear + cross-entropy ----

po::LinearCEParams lce_params(const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& targets,
                              int64_t ignore_index, std::vector<Tensor>& keep) {
  CHECK_DIM(hidden, 2);
  CHECK_FLOATING(hidden);
  const int64_t N = hidden.size(0), E = hidden.size(1);
  CHECK_DIM(weight, 2);
  const int64_t V = weight.size(0);
  TORCH_CHECK(V >= 1, "weight must have at least one row (V >= 1)");
  CHECK_SHAPE(weight, V, E);
  CHECK_DTYPE(weight, hidden.scalar_type());
  CHECK_SHAPE(targets, N);
  CHECK_INTEGRAL(targets);
  po::LinearCEParams p;
  p.dtype = to_dtype(hidden.scalar_type());
  p.N = N, p.E = E, p.V = V;
  p.hidden = keep.emplace_back(hidden.contiguous()).data_ptr();
  p.weight = keep.emplace_back(weight.contiguous()).data_ptr();
  if (bias.has_value()) {
    CHECK_SHAPE(*bias, V);
    // the reference adds the bias in the input dtype; the kernel rounds logits to it afterwards
    p.bias = keep.emplace_back(f32c(*bias)).data_ptr<float>();
  }
  p.targets = keep.emplace_back(targets.to(at::kLong).contiguous()).data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  return p;
}

std::tuple<Tensor, Tensor, Tensor> lce_grads(const po::LinearCEParams& p, const Tensor& hidden, const OptTensor& bias,
                                             const Tensor& row_coef) {
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor d_hidden = at::empty({p.N, p.E}, f32), d_weight = at::zeros({p.V, p.E}, f32);
  Tensor d_bias = bias.has_value() ? at::zeros({p.V}, f32) : at::empty({0}, f32);
  Tensor lse = at::empty({p.N}, f32), row_loss = at::empty({p.N}, f32);
  po::LinearCEParams q = p;
  q.lse = lse.data_ptr<float>(), q.row_loss = row_loss.data_ptr<float>();
  po::cpu::linear_cross_entropy_forward(q, row_coef.data_ptr<float>(), d_hidden.data_ptr<float>(),
                                        d_weight.data_ptr<float>(), bias.has_value() ? d_bias.data_ptr<float>() : nullptr);
  return {d_hidden, d_weight, d_bias};
}

#define LCE_FWD_ARGS                                                                                          \
  const Tensor &hidden, const Tensor &weight, const OptTensor &bias, const Tensor &targets, int64_t ignore_index, \
      int64_t reduction, bool sample, double temperature, const OptTensor &seed, const OptTensor &disallow,     \
      bool want_argmax, bool compute_grad
#define LCE_FWD_NAMES \
  hidden, weight, bias, targets, ignore_index, reduction, sample, temperature, seed, disallow, want_argmax, compute_grad
using LCEForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// reduction: 0 none, 1 mean, 2 sum. With compute_grad the gradients of the loss for a unit output gradient
// (mean / sum) come from the same sweep, in float32: (loss, sampled, argmax, d_hidden, d_weight, d_bias).
// Shared by the devices; sweep(p, keep, row_coef, d_hidden, d_weight, d_bias) runs the device's kernels
// (row_coef and the gradients are null without compute_grad; keep[0], keep[1] are hidden and weight).
template <typename Sweep>
LCEForwardResult linear_cross_entropy_fwd_impl(LCE_FWD_ARGS, Sweep sweep) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(!compute_grad || reduction != 0, "compute_grad needs a reduced loss (mean or sum)");
  TORCH_CHECK(!sample || temperature > 0.0, "temperature must be > 0 when sampling, got ", temperature);
  std::vector<Tensor> keep;
  po::LinearCEParams p = lce_params(hidden, weight, bias, targets, ignore_index, keep);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto i64 = hidden.options().dtype(at::kLong);
  p.sample = sample, p.temperature = float(temperature), p.seed = philox_seed(seed), p.want_argmax = want_argmax;
  if (disallow.has_value()) {
    CHECK_SHAPE(*disallow, p.N);
    CHECK_INTEGRAL(*disallow);
    p.disallow = keep.emplace_back(disallow->to(at::kLong).contiguous()).data_ptr<int64_t>();
  }
  Tensor row_loss = at::empty({p.N}, f32), lse = at::empty({p.N}, f32);
  Tensor sampled = sample ? new_output({p.N}, i64) : at::empty({0}, i64);
  Tensor argmax = want_argmax ? new_output({p.N}, i64) : at::empty({0}, i64);
  p.row_loss = row_loss.data_ptr<float>(), p.lse = lse.data_ptr<float>();
  p.sampled = sample ? sampled.data_ptr<int64_t>() : nullptr;
  p.argmax = want_argmax ? argmax.data_ptr<int64_t>() : nullptr;
  // An unchecked out-of-range target (value checks are off on accelerators) counts as ignored, as in the kernels.
  const Tensor kept = (targets != ignore_index) & (targets >= 0) & (targets < p.V);
  const Tensor n_kept = kept.sum().to(at::kDouble);
  Tensor d_hidden = at::empty({0}, f32), d_weight = at::empty({0}, f32), d_bias = at::empty({0}, f32);
  if (compute_grad) {
    Tensor coef = kept.to(at::kFloat);
    if (reduction == 1) coef = (kept.to(at::kDouble) / n_kept.clamp_min(1)).to(at::kFloat);
    coef = coef.contiguous();
    d_hidden = new_output({p.N, p.E}, f32), d_weight = at::zeros({p.V, p.E}, f32);
    if (bias.has_value()) d_bias = at::zeros({p.V}, f32);
    sweep(p, keep, coef.data_ptr<float>(), &d_hidden, &d_weight, bias.has_value() ? &d_bias : nullptr);
  } else {
    sweep(p, keep, nullptr, nullptr, nullptr, nullptr);
  }
  Tensor loss;
  if (reduction == 0) loss = row_loss.to(hidden.scalar_type());
  else if (reduction == 2) loss = row_loss.to(at::kDouble).sum().to(hidden.scalar_type());
  else loss = (row_loss.to(at::kDouble).sum() / n_kept.clamp_min(1)).to(hidden.scalar_type());
  return {loss, sampled, argmax, d_hidden, d_weight, d_bias};
}

LCEForwardResult linear_cross_entropy_fwd_cpu(LCE_FWD_ARGS) {
  return linear_cross_entropy_fwd_impl(
      LCE_FWD_NAMES, [](const po::LinearCEParams& p, const std::vector<Tensor>&, const float* row_coef,
                        Tensor* d_hidden, Tensor* d_weight, Tensor* d_bias) {
        auto ptr = [](Tensor* t) { return t != nullptr ? t->data_ptr<float>() : nullptr; };
        po::cpu::linear_cross_entropy_forward(p, row_coef, ptr(d_hidden), ptr(d_weight), ptr(d_bias));
      });
}

// Gradients for per-row output gradients (reduction "none"): the logits are recomputed chunk by chunk.
std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_bwd_cpu(const Tensor& hidden, const Tensor& weight,
                                                                const OptTensor& bias, const Tensor& targets,
                                                                int64_t ignore_index, const Tensor& grad_rows) {
  std::vector<Tensor> keep;
  po::LinearCEParams p = lce_params(hidden, weight, bias, targets, ignore_index, keep);
  CHECK_SHAPE(grad_rows, p.N);
  const Tensor coef = grad_rows.to(at::kFloat).contiguous();
  return lce_grads(p, hidden, bias, coef);
}

// The shared header's T5 bucket for each relative position (tests compare it with the reference).
Tensor t5_bucket_cpu(const Tensor& relative_position, bool bidirectional, int64_t num_buckets, int64_t max_distance) {
  CHECK_INTEGRAL(relative_position);
  Tensor rel = relative_position.to(at::kLong).contiguous();
  Tensor out = at::empty_like(rel);
  const int64_t* src = rel.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < rel.numel(); ++i) dst[i] = po::t5_bucket(src[i], bidirectional, num_buckets, max_distance);
  return out;
}

// The shared header's Philox uniforms at the given offsets (tests compare them with tl.rand's definition).
Tensor philox_uniform_cpu(int64_t seed, const Tensor& offsets) {
  CHECK_DTYPE(offsets, at::kLong);
  Tensor off = offsets.contiguous();
  Tensor out = at::empty(off.sizes(), off.options().dtype(at::kFloat));
  const po::PhiloxKey key = po::philox_key(uint64_t(seed));
  const int64_t* src = off.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < off.numel(); ++i) dst[i] = po::philox_uniform(key, uint64_t(src[i]));
  return out;
}

// The CPU kernels' vectorized Philox run (offsets start .. start + n - 1), for the same comparison.
Tensor philox_uniform_run_cpu(int64_t seed, const Tensor& start_offset, int64_t n) {
  TORCH_CHECK(start_offset.numel() == 1, "start_offset must hold one offset, got shape ", start_offset.sizes());
  const int64_t start = start_offset.item<int64_t>();
  TORCH_CHECK(start >= 0 && n >= 0, "start_offset and n must be non-negative, got ", start, " and ", n);
  Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  po::cpu::philox_uniforms(po::philox_key(uint64_t(seed)), uint64_t(start), n, out.data_ptr<float>());
  return out;
}


// ---- CUDA ----
#ifdef PYOBJECTIVES_WITH_CUDA

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

#ifdef PYOBJECTIVES_CUDA_ATTENTION
// The CUDA attention kernels' own limits (dtype, head dim, compute capability) as an error.
void check_cuda_attention(const po::AttentionParams& p, at::Device dev) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev.index());
  const char* why = po::cuda::two_stream_attention_unsupported(p, prop->major, prop->minor);
  TORCH_CHECK(why == nullptr || why[0] == '\0', "the CUDA two-stream attention kernels cannot run this call: ", why);
}

Tensor workspace(size_t bytes, at::Device dev) {
  return at::empty({int64_t(std::max<size_t>(bytes, 1))}, at::TensorOptions().dtype(at::kByte).device(dev));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> two_stream_attention_fwd_cuda(ATTENTION_ARGS) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_fwd(ATTENTION_NAMES, [&](const AttentionInputs& in, const po::AttentionForward& f) {
    check_cuda_attention(in.p, q.device());
    Tensor ws = workspace(po::cuda::two_stream_attention_forward_workspace(in.p), q.device());
    po::cuda::two_stream_attention_forward(in.p, f, ws.data_ptr(), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<Tensor> two_stream_attention_bwd_cuda(ATTENTION_BWD_ARGS) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_bwd(ATTENTION_BWD_NAMES, [&](const AttentionInputs& in, const po::AttentionBackward& g) {
    check_cuda_attention(in.p, q.device());
    Tensor ws = workspace(po::cuda::two_stream_attention_backward_workspace(in.p), q.device());
    po::cuda::two_stream_attention_backward(in.p, g, ws.data_ptr(), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
#else
constexpr const char* kNoCudaAttention =
    "the CUDA attention kernels are not built (pyobjectives._C was built without csrc/cuda/two_stream_attention_*.cu)";

std::tuple<Tensor, Tensor, Tensor, Tensor> two_stream_attention_fwd_cuda(ATTENTION_ARGS) {
  TORCH_CHECK(false, kNoCudaAttention);
}

std::vector<Tensor> two_stream_attention_bwd_cuda(ATTENTION_BWD_ARGS) { TORCH_CHECK(false, kNoCudaAttention); }
#endif

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rtd_loss_fwd_cuda(
    const Tensor& x, const OptTensor& head_weight, const OptTensor& head_bias, const Tensor& corrupted_ids,
    const Tensor& original_ids, const OptTensor& attention_mask, double loss_weight, int64_t reduction,
    bool keep_grad, bool head_weight_grad) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const auto dev = x.device();
  CHECK_OPT_DEVICE(head_weight, dev);
  CHECK_OPT_DEVICE(head_bias, dev);
  CHECK_DEVICE(corrupted_ids, dev);
  CHECK_DEVICE(original_ids, dev);
  CHECK_OPT_DEVICE(attention_mask, dev);
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<Tensor> keep;
  po::RTDParams p = rtd_params(x, head_weight, head_bias, corrupted_ids, original_ids, attention_mask, loss_weight,
                               keep);
  const int64_t chunk = po::cuda::rtd_loss_chunk_tokens(p);
  const int64_t n_chunks = std::max<int64_t>((p.T + chunk - 1) / chunk, 1);
  const auto f32 = x.options().dtype(at::kFloat);
  const auto f64 = x.options().dtype(at::kDouble);
  // every chunk's row is written by its block: no zero fill
  Tensor partials = at::empty({n_chunks, po::kRTDSums}, f64), sums = at::empty({po::kRTDSums}, f64);
  Tensor grad = keep_grad ? new_output({p.T}, f32) : at::empty({0}, f32);
  const bool dw_fwd = head_weight_grad && reduction != 0 && p.Dd > 0;
  Tensor dw_part = dw_fwd ? at::empty({n_chunks, p.Dd}, f32) : at::empty({0}, f32);
  Tensor dw = dw_fwd ? new_output({p.Dd}, f32) : at::empty({0}, f32);
  const at::IntArrayRef lead = p.Dd > 0 ? x.sizes().slice(0, x.dim() - 1) : x.sizes();
  Tensor loss = reduction == 0 ? new_output(lead, x.options()) : Tensor();
  p.partials = partials.data_ptr<double>();
  p.grad = keep_grad ? grad.data_ptr<float>() : nullptr;
  p.dw_partials = dw_fwd ? dw_part.data_ptr<float>() : nullptr;
  p.loss_tok = reduction == 0 ? loss.data_ptr() : nullptr;
  po::cuda::rtd_loss_forward(p, sums.data_ptr<double>(), dw_fwd ? dw.data_ptr<float>() : nullptr, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rtd_results(x, loss, sums, grad, dw, loss_weight, reduction);
}

Tensor rtd_loss_head_bwd_cuda(const Tensor& grad, const Tensor& coef, const Tensor& head_weight, const Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  return rtd_loss_head_bwd_impl(grad, coef, head_weight, x,
                                [](const po::RTDParams& p, const float* g, const float* c, int64_t stride, void* dx) {
                                  po::cuda::rtd_loss_head_backward(p, g, c, stride, dx, current_stream());
                                  C10_CUDA_KERNEL_LAUNCH_CHECK();
                                });
}

void check_lce_devices(const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& targets) {
  const auto dev = hidden.device();
  CHECK_DEVICE(weight, dev);
  CHECK_OPT_DEVICE(bias, dev);
  CHECK_DEVICE(targets, dev);
}

// The chunked sweep: per chunk of rows, float32 logits H_c W^T by cuBLAS (half-precision inputs, float32
// accumulation and output), the row kernel, then with row_coef d hidden = dZ W and d weight += dZ^T H_c
// (cuBLAS, float32 out) and d bias += column sums of dZ. Extra memory: one [chunk rows, V] float32 buffer
// (po::cuda::kLinearCEChunkBytes), reused by every chunk.
void lce_sweep_cuda(const po::LinearCEParams& p, const Tensor& hidden, const Tensor& weight, const float* row_coef,
                    Tensor* d_hidden, Tensor* d_weight, Tensor* d_bias) {
  if (p.N == 0) return;
  const bool half = p.dtype != po::DType::kFloat32;
  const int64_t rows = po::cuda::linear_cross_entropy_chunk_rows(p.N, p.V);
  Tensor buffer = at::empty({rows, p.V}, hidden.options().dtype(at::kFloat));
  const Tensor wt = weight.t();
  for (int64_t n0 = 0; n0 < p.N; n0 += rows) {
    const int64_t nc = std::min(rows, p.N - n0);
    const Tensor hc = hidden.narrow(0, n0, nc);
    Tensor z = buffer.narrow(0, 0, nc);
    if (half) at::mm_out(z, hc, wt, at::kFloat);
    else at::mm_out(z, hc, wt);
    po::cuda::linear_cross_entropy_chunk(p, z.data_ptr<float>(), n0, nc, row_coef, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (row_coef == nullptr) continue;
    // half precision: dZ in the input dtype over the first half of each float32 row (row stride 2V)
    const Tensor dz = half ? z.view(hidden.scalar_type()).narrow(1, 0, p.V) : z;
    Tensor dh = d_hidden->narrow(0, n0, nc);
    if (half) {
      at::mm_out(dh, dz, weight, at::kFloat);
      at::addmm_out(*d_weight, *d_weight, dz.t(), hc, at::kFloat);
    } else {
      at::mm_out(dh, dz, weight);
      d_weight->addmm_(dz.t(), hc);
    }
    if (d_bias != nullptr) d_bias->add_(dz.sum(0, false, at::kFloat));
  }
}

LCEForwardResult linear_cross_entropy_fwd_cuda(LCE_FWD_ARGS) {
  check_lce_devices(hidden, weight, bias, targets);
  CHECK_OPT_DEVICE(disallow, hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_cross_entropy_fwd_impl(
      LCE_FWD_NAMES, [](const po::LinearCEParams& p, const std::vector<Tensor>& keep, const float* row_coef,
                        Tensor* d_hidden, Tensor* d_weight, Tensor* d_bias) {
        lce_sweep_cuda(p, keep[0], keep[1], row_coef, d_hidden, d_weight, d_bias);
      });
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_bwd_cuda(const Tensor& hidden, const Tensor& weight,
                                                                 const OptTensor& bias, const Tensor& targets,
                                                                 int64_t ignore_index, const Tensor& grad_rows) {
  check_lce_devices(hidden, weight, bias, targets);
  CHECK_DEVICE(grad_rows, hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  std::vector<Tensor> keep;
  po::LinearCEParams p = lce_params(hidden, weight, bias, targets, ignore_index, keep);
  const Tensor hidden_c = keep[0], weight_c = keep[1];
  CHECK_SHAPE(grad_rows, p.N);
  const Tensor coef = grad_rows.to(at::kFloat).contiguous();
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor row_loss = at::empty({p.N}, f32), lse = at::empty({p.N}, f32);
  p.row_loss = row_loss.data_ptr<float>(), p.lse = lse.data_ptr<float>();
  Tensor d_hidden = new_output({p.N, p.E}, f32), d_weight = at::zeros({p.V, p.E}, f32);
  Tensor d_bias = bias.has_value() ? at::zeros({p.V}, f32) : at::empty({0}, f32);
  lce_sweep_cuda(p, hidden_c, weight_c, coef.data_ptr<float>(), &d_hidden, &d_weight,
                 bias.has_value() ? &d_bias : nullptr);
  return {d_hidden, d_weight, d_bias};
}

Tensor t5_bucket_cuda(const Tensor& relative_position, bool bidirectional, int64_t num_buckets, int64_t max_distance) {
  CHECK_INTEGRAL(relative_position);
  const c10::cuda::CUDAGuard guard(relative_position.device());
  Tensor rel = relative_position.to(at::kLong).contiguous();
  Tensor out = at::empty_like(rel);
  po::cuda::t5_bucket(rel.data_ptr<int64_t>(), rel.numel(), bidirectional, num_buckets, max_distance,
                      out.data_ptr<int64_t>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor philox_uniform_cuda(int64_t seed, const Tensor& offsets) {
  CHECK_DTYPE(offsets, at::kLong);
  const c10::cuda::CUDAGuard guard(offsets.device());
  Tensor off = offsets.contiguous();
  Tensor out = at::empty(off.sizes(), off.options().dtype(at::kFloat));
  po::cuda::philox_uniform(uint64_t(seed), off.data_ptr<int64_t>(), off.numel(), out.data_ptr<float>(),
                           current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// start_offset stays on the device (read by the kernel): unlike the CPU hook, its sign is not checked.
Tensor philox_uniform_run_cuda(int64_t seed, const Tensor& start_offset, int64_t n) {
  TORCH_CHECK(start_offset.numel() == 1, "start_offset must hold one offset, got shape ", start_offset.sizes());
  TORCH_CHECK(n >= 0, "n must be non-negative, got ", n);
  const c10::cuda::CUDAGuard guard(start_offset.device());
  Tensor start = start_offset.to(at::kLong).contiguous();
  Tensor out = at::empty({n}, start.options().dtype(at::kFloat));
  po::cuda::philox_uniform_run(uint64_t(seed), start.data_ptr<int64_t>(), n, out.data_ptr<float>(),
                               current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

#endif  // PYOBJECTIVES_WITH_CUDA

}  // namespace

#define ATTENTION_SCHEMA                                                                                       \
  "Tensor q, Tensor k, Tensor v, Tensor? r, Tensor? r_w_bias, Tensor? r_r_bias, Tensor? q_g, Tensor? target_pos, " \
  "Tensor? q_rank, Tensor? k_rank, Tensor? attn_mask, Tensor? key_padding_mask, bool causal, Tensor? seg_q, "   \
  "Tensor? seg_k, Tensor? seg_diff, Tensor? r_s_bias, Tensor? seg_embed, Tensor? t5_bias, int t5_num_buckets, "  \
  "int t5_max_distance, bool t5_bidirectional, bool content_sees_self, float scale, float dropout_p, Tensor? seed, " \
  "bool empty_uniform"

TORCH_LIBRARY(pyobjectives, m) {
  m.def("two_stream_attention_fwd(" ATTENTION_SCHEMA ") -> (Tensor out_h, Tensor out_g, Tensor lse_h, Tensor lse_g)");
  m.def("two_stream_attention_bwd(Tensor do_h, Tensor do_g, Tensor out_h, Tensor out_g, Tensor lse_h, Tensor lse_g, "
        ATTENTION_SCHEMA ") -> Tensor[]");
  m.def("rtd_loss_fwd(Tensor x, Tensor? head_weight, Tensor? head_bias, Tensor corrupted_ids, Tensor original_ids, "
        "Tensor? attention_mask, float loss_weight, int reduction, bool keep_grad, bool head_weight_grad) "
        "-> (Tensor loss, Tensor stats, Tensor grad, Tensor d_head_weight, Tensor sums)");
  m.def("rtd_loss_head_bwd(Tensor grad, Tensor coef, Tensor head_weight, Tensor x) -> Tensor");
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
        "int reduction, bool sample, float temperature, Tensor? seed, Tensor? disallow, bool want_argmax, "
        "bool compute_grad) -> (Tensor loss, Tensor sampled, Tensor argmax, Tensor d_hidden, Tensor d_weight, "
        "Tensor d_bias)");
  m.def("linear_cross_entropy_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
        "Tensor grad_rows) -> (Tensor d_hidden, Tensor d_weight, Tensor d_bias)");
  m.def("t5_bucket(Tensor relative_position, bool bidirectional, int num_buckets, int max_distance) -> Tensor");
  m.def("philox_uniform(int seed, Tensor offsets) -> Tensor");
  m.def("philox_uniform_run(int seed, Tensor start_offset, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyobjectives, CPU, m) {
  m.impl("two_stream_attention_fwd", &two_stream_attention_fwd_cpu);
  m.impl("two_stream_attention_bwd", &two_stream_attention_bwd_cpu);
  m.impl("rtd_loss_fwd", &rtd_loss_fwd_cpu);
  m.impl("rtd_loss_head_bwd", &rtd_loss_head_bwd_cpu);
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cpu);
  m.impl("t5_bucket", &t5_bucket_cpu);
  m.impl("philox_uniform", &philox_uniform_cpu);
  m.impl("philox_uniform_run", &philox_uniform_run_cpu);
}

#ifdef PYOBJECTIVES_WITH_CUDA
TORCH_LIBRARY_IMPL(pyobjectives, CUDA, m) {
  m.impl("two_stream_attention_fwd", &two_stream_attention_fwd_cuda);
  m.impl("two_stream_attention_bwd", &two_stream_attention_bwd_cuda);
  m.impl("rtd_loss_fwd", &rtd_loss_fwd_cuda);
  m.impl("rtd_loss_head_bwd", &rtd_loss_head_bwd_cuda);
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cuda);
  m.impl("t5_bucket", &t5_bucket_cuda);
  m.impl("philox_uniform", &philox_uniform_cuda);
  m.impl("philox_uniform_run", &philox_uniform_run_cuda);
}
#endif

// Loaded as a Python module so that `import pyobjectives._C` registers the ops.
#include <Python.h>

static PyObject* py_blas_name(PyObject*, PyObject*) { return PyUnicode_FromString(po::cpu::blas_name()); }

#ifdef PYOBJECTIVES_WITH_CUDA
static PyObject* py_cuda_built(PyObject*, PyObject*) { Py_RETURN_TRUE; }
#else
static PyObject* py_cuda_built(PyObject*, PyObject*) { Py_RETURN_FALSE; }
#endif
#ifdef PYOBJECTIVES_CUDA_ATTENTION
static PyObject* py_cuda_attention_built(PyObject*, PyObject*) { Py_RETURN_TRUE; }
#else
static PyObject* py_cuda_attention_built(PyObject*, PyObject*) { Py_RETURN_FALSE; }
#endif

static PyMethodDef methods[] = {
    {"blas_name", py_blas_name, METH_NOARGS, "Which BLAS the CPU kernels call."},
    {"cuda_built", py_cuda_built, METH_NOARGS, "Whether the CUDA kernels (rtd_loss, linear_cross_entropy) are built."},
    {"cuda_attention_built", py_cuda_attention_built, METH_NOARGS,
     "Whether the CUDA two-stream attention kernels are built."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pyobjectives native kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
