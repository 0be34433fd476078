"""Bad input, on every backend: each public function and module raises ValueError / TypeError (or
BackendUnavailableError for a backend that cannot run) whose message names the argument, before any kernel
runs. One table; every case runs once per backend (reference, cpu, triton), the data utilities once."""

import re
from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn

import pyobjectives as po
from conftest import fused_backend_params
from pyobjectives import BackendUnavailableError, backends, data
from pyobjectives import nn as pnn
from pyobjectives.electra import ElectraObjective
from pyobjectives.integrations import patch_t5, patch_xlnet

BACKEND_PARAMS = [pytest.param("reference", id="reference")] + fused_backend_params()
DROP = object()  # an argument left out of the call
META = "meta"  # a device other than the main input's: a mismatch that needs no GPU


class Case(NamedTuple):
    id: str
    arg: str  # the argument the message must name
    call: Callable  # call(backend)
    error: type
    pattern: str


def _call(fn, defaults, backend, over):
    kw = {**defaults, "backend": backend, **over}
    return fn(**{k: v for k, v in kw.items() if v is not DROP})


# --- two_stream_attention: B=2, Lq=5, M=1 (Lk=6), H=2, D=4, P=2 ---------------------------------

def attn(backend, /, **over):
    B, Lq, Lk, H, D, P = 2, 5, 6, 2, 4, 2
    base = dict(q=torch.randn(B, Lq, H, D), k=torch.randn(B, Lk, H, D), v=torch.randn(B, Lk, H, D),
                r=torch.randn(Lk + Lq, H, D), r_w_bias=torch.randn(H, D), r_r_bias=torch.randn(H, D),
                q_g=torch.randn(B, P, H, D), target_pos=torch.tensor([[0, 4], [1, -1]]))
    return _call(po.two_stream_attention, base, backend, over)


def ids(*shape, high=5, dtype=torch.long):
    return torch.randint(0, high, shape, dtype=dtype)


SEG = dict(r_s_bias=torch.randn(2, 4), seg_embed=torch.randn(2, 2, 4))

ATTENTION = [
    Case("q-rank", "q", lambda be: attn(be, q=torch.randn(2, 5, 8)), ValueError,
         r"q must have shape \[B, Lq, H, D\] = \[\?, \?, \?, \?\], got \(2, 5, 8\)"),
    Case("q-int", "q", lambda be: attn(be, q=ids(2, 5, 2, 4)), TypeError, r"q must be a float tensor .* got torch.int64"),
    Case("q-list", "q", lambda be: attn(be, q=[[0.0]]), TypeError, r"q must be a torch.Tensor, got list"),
    Case("q-D0", "q", lambda be: attn(be, q=torch.randn(2, 5, 2, 0)), ValueError, r"q must have a head dimension D >= 1"),
    Case("k-heads", "k", lambda be: attn(be, k=torch.randn(2, 6, 3, 4)), ValueError,
         r"k must have shape \[B, Lk, H, D\] = \[2, \?, 2, 4\], got \(2, 6, 3, 4\)"),
    Case("k-dtype", "k", lambda be: attn(be, k=torch.randn(2, 6, 2, 4, dtype=torch.float64)), TypeError,
         r"k must have dtype torch.float32 .* got torch.float64"),
    Case("k-device", "k", lambda be: attn(be, k=torch.randn(2, 6, 2, 4, device=META)), ValueError,
         r"k must be on device cpu .* got meta"),
    Case("k-shorter-with-r", "k", lambda be: attn(be, k=torch.randn(2, 4, 2, 4), v=torch.randn(2, 4, 2, 4)),
         ValueError, r"k must have Lk >= Lq .*\(r, content_sees_self=True\), got Lk=4 < Lq=5"),
    Case("k-shorter-causal", "k", lambda be: attn(be, k=torch.randn(2, 4, 2, 4), v=torch.randn(2, 4, 2, 4), r=None,
                                                  r_r_bias=None, content_sees_self=False, causal=True),
         ValueError, r"k must have Lk >= Lq .*\(causal=True\)"),
    Case("v-length", "v", lambda be: attn(be, v=torch.randn(2, 5, 2, 4)), ValueError,
         r"v must have shape \[B, Lk, H, D\] = \[2, 6, 2, 4\], got \(2, 5, 2, 4\)"),
    Case("v-int", "v", lambda be: attn(be, v=ids(2, 6, 2, 4)), TypeError, r"v must be a float tensor"),
    Case("r-2d", "r", lambda be: attn(be, r=torch.randn(11, 8)), ValueError,
         r"r must be a tensor of shape \[R, H, D\] or \[B, R, H, D\], got \(11, 8\)"),
    Case("r-too-few-rows", "r", lambda be: attn(be, r=torch.randn(6, 2, 4)), ValueError,
         r"r must have at least Lk \+ 1 = 7 rows .* got R=6"),
    Case("r-int", "r", lambda be: attn(be, r=ids(11, 2, 4)), TypeError, r"r must be a float tensor"),
    Case("r-batch", "r", lambda be: attn(be, r=torch.randn(3, 11, 2, 4)), ValueError,
         r"r must have shape \[B, R, H, D\] = \[2, \?, 2, 4\]"),
    Case("r-heads", "r", lambda be: attn(be, r=torch.randn(11, 3, 4)), ValueError, r"r must have shape \[R, H, D\]"),
    Case("r_w_bias-missing", "r_w_bias", lambda be: attn(be, r_w_bias=DROP), ValueError,
         r"r \(the Transformer-XL position term\) needs r_w_bias \[H, D\] and r_r_bias \[H, D\]"),
    Case("r_r_bias-without-r", "r_r_bias", lambda be: attn(be, r=None), ValueError, r"r_r_bias was given without r"),
    Case("r_r_bias-shape", "r_r_bias", lambda be: attn(be, r_r_bias=torch.randn(4, 2)), ValueError,
         r"r_r_bias must have shape \[H, D\] = \[2, 4\], got \(4, 2\)"),
    Case("r_w_bias-device", "r_w_bias", lambda be: attn(be, r_w_bias=torch.randn(2, 4, device=META)), ValueError,
         r"r_w_bias must be on device cpu"),
    Case("r_w_bias-int", "r_w_bias", lambda be: attn(be, r_w_bias=ids(2, 4)), TypeError,
         r"r_w_bias must be a float tensor"),
    Case("q_g-heads", "q_g", lambda be: attn(be, q_g=torch.randn(2, 2, 3, 4)), ValueError,
         r"q_g must have shape \[B, P, H, D\] = \[2, \?, 2, 4\]"),
    Case("q_g-dtype", "q_g", lambda be: attn(be, q_g=torch.randn(2, 2, 2, 4, dtype=torch.float16)), TypeError,
         r"q_g must have dtype torch.float32"),
    Case("q_g-without-target_pos", "target_pos", lambda be: attn(be, target_pos=DROP), ValueError,
         r"q_g and target_pos go together: got q_g without target_pos"),
    Case("target_pos-float", "target_pos", lambda be: attn(be, target_pos=torch.zeros(2, 2)), TypeError,
         r"target_pos must be a int tensor .* got torch.float32"),
    Case("target_pos-shape", "target_pos", lambda be: attn(be, target_pos=torch.zeros(2, 3, dtype=torch.long)),
         ValueError, r"target_pos must have shape \[B, P\] = \[2, 2\], got \(2, 3\)"),
    Case("target_pos-too-high", "target_pos", lambda be: attn(be, target_pos=torch.tensor([[0, 5], [1, 1]])),
         ValueError, r"target_pos must be in \[0, 5\) or -1 \(-1 marks a padding row\), got 5"),
    Case("target_pos-below-padding", "target_pos", lambda be: attn(be, target_pos=torch.tensor([[0, -2], [1, 1]])),
         ValueError, r"target_pos must be in \[0, 5\) or -1 .*got -2"),
    Case("q_rank-without-k_rank", "k_rank", lambda be: attn(be, q_rank=ids(2, 5)), ValueError,
         r"q_rank and k_rank go together: got q_rank without k_rank"),
    Case("q_rank-float", "q_rank", lambda be: attn(be, q_rank=torch.zeros(2, 5), k_rank=ids(2, 6)), TypeError,
         r"q_rank must be a int tensor"),
    Case("k_rank-shape", "k_rank", lambda be: attn(be, q_rank=ids(2, 5), k_rank=ids(2, 5)), ValueError,
         r"k_rank must have shape \[B, Lk\] = \[2, 6\], got \(2, 5\)"),
    Case("k_rank-beyond-int32", "k_rank", lambda be: attn(be, q_rank=ids(2, 5), k_rank=torch.full((2, 6), 2**40)),
         ValueError, r"k_rank must be in \[-2147483648, 2147483648\) \(ranks are compared as int32.*got 1099511627776"),
    Case("attn_mask-float", "attn_mask", lambda be: attn(be, attn_mask=torch.zeros(2, 5, 6)), TypeError,
         r"attn_mask must be a bool tensor"),
    Case("attn_mask-shape", "attn_mask", lambda be: attn(be, attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool)),
         ValueError, r"attn_mask must have shape \[B, Lq, Lk\] = \[2, 5, 6\], got \(2, 5, 5\)"),
    Case("key_padding_mask-shape", "key_padding_mask",
         lambda be: attn(be, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \[B, Lk\] = \[2, 6\]"),
    Case("key_padding_mask-int", "key_padding_mask", lambda be: attn(be, key_padding_mask=ids(2, 6)), TypeError,
         r"key_padding_mask must be a bool tensor"),
    Case("key_padding_mask-device", "key_padding_mask",
         lambda be: attn(be, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device=META)), ValueError,
         r"key_padding_mask must be on device cpu"),
    Case("causal-int", "causal", lambda be: attn(be, causal=1), TypeError, r"causal must be a bool, got 1"),
    Case("content_sees_self-str", "content_sees_self", lambda be: attn(be, content_sees_self="yes"), TypeError,
         r"content_sees_self must be a bool, got 'yes'"),
    Case("seg_q-without-seg_k", "seg_k", lambda be: attn(be, seg_q=ids(2, 5), **SEG), ValueError,
         r"seg_q and seg_k go together: got seg_q without seg_k"),
    Case("seg_k-float", "seg_k", lambda be: attn(be, seg_q=ids(2, 5), seg_k=torch.zeros(2, 6), **SEG), TypeError,
         r"seg_k must be a int tensor"),
    Case("seg_diff-shape", "seg_diff", lambda be: attn(be, seg_diff=torch.zeros(2, 6, 5, dtype=torch.bool), **SEG),
         ValueError, r"seg_diff must have shape \[B, Lq, Lk\] = \[2, 5, 6\]"),
    Case("segments-without-biases", "r_s_bias", lambda be: attn(be, seg_diff=torch.zeros(2, 5, 6, dtype=torch.bool)),
         ValueError, r"segment information \(seg_q/seg_k or seg_diff\) needs r_s_bias \[H, D\] and seg_embed"),
    Case("seg_embed-shape", "seg_embed",
         lambda be: attn(be, seg_diff=torch.zeros(2, 5, 6, dtype=torch.bool), r_s_bias=torch.randn(2, 4),
                         seg_embed=torch.randn(3, 2, 4)), ValueError,
         r"seg_embed must have shape \[2, H, D\] = \[2, 2, 4\], got \(3, 2, 4\)"),
    Case("seg_embed-without-segments", "seg_embed", lambda be: attn(be, **SEG), ValueError,
         r"r_s_bias / seg_embed were given without segment information"),
    Case("t5_bias-shape", "t5_bias", lambda be: attn(be, t5_bias=torch.randn(8, 2)), ValueError,
         r"t5_bias must have shape \[num_buckets, H\] = \[32, 2\], got \(8, 2\)"),
    Case("t5_bias-int", "t5_bias", lambda be: attn(be, t5_bias=ids(32, 2)), TypeError, r"t5_bias must be a float"),
    Case("t5_num_buckets-small", "t5_num_buckets", lambda be: attn(be, t5_bias=torch.randn(2, 2), t5_num_buckets=2),
         ValueError, r"t5_num_buckets must be in \[4, inf\), got 2"),
    Case("t5_max_distance-small", "t5_max_distance",
         lambda be: attn(be, t5_bias=torch.randn(32, 2), t5_max_distance=8), ValueError,
         r"t5_max_distance must be in \(8, inf\), got 8"),
    Case("t5_bidirectional-int", "t5_bidirectional",
         lambda be: attn(be, t5_bias=torch.randn(32, 2), t5_bidirectional=1), TypeError,
         r"t5_bidirectional must be a bool"),
    Case("dropout_p-one", "dropout_p", lambda be: attn(be, dropout_p=1.0), ValueError,
         r"dropout_p must be in \[0.0, 1.0\), got 1.0"),
    Case("dropout_p-negative", "dropout_p", lambda be: attn(be, dropout_p=-0.1), ValueError,
         r"dropout_p must be in \[0.0, 1.0\), got -0.1"),
    Case("dropout_p-str", "dropout_p", lambda be: attn(be, dropout_p="0.1"), TypeError,
         r"dropout_p must be a finite number"),
    Case("seed-negative", "seed", lambda be: attn(be, dropout_p=0.1, seed=-3), ValueError, r"seed must be in \[0, "),
    Case("seed-tensor-negative", "seed", lambda be: attn(be, dropout_p=0.1, seed=torch.tensor(-3)), ValueError,
         r"seed must be in \[0, "),
    Case("seed-float-tensor", "seed", lambda be: attn(be, dropout_p=0.1, seed=torch.tensor(3.0)), TypeError,
         r"seed must be an int or a one-element integer CPU tensor, got a torch.float32"),
    Case("seed-tensor-two-elements", "seed", lambda be: attn(be, dropout_p=0.1, seed=torch.tensor([3, 4])),
         TypeError, r"seed must be an int or a one-element integer CPU tensor.*shape \(2,\)"),
    Case("scale-nan", "scale", lambda be: attn(be, scale=float("nan")), TypeError, r"scale must be a finite number"),
    Case("empty_rows-unknown", "empty_rows", lambda be: attn(be, empty_rows="mean"), ValueError,
         r"empty_rows must be one of \('zero', 'uniform'\), got 'mean'"),
    Case("backend-unknown", "backend", lambda be: attn(be, backend="tpu"), ValueError,
         r"backend must be one of \(.*\), got 'tpu'"),
    Case("backend-cannot-run", "backend", lambda be: attn(be, backend="cuda"), BackendUnavailableError,
         r"backend 'cuda' cannot run two_stream_attention: \S"),
]


# --- rtd_loss: logits [2, 5] or hidden [2, 5, 3] -------------------------------------------------

def rtd(backend, /, **over):
    base = dict(logits_or_hidden=torch.randn(2, 5), corrupted_ids=ids(2, 5), original_ids=ids(2, 5))
    return _call(po.rtd_loss, base, backend, over)


def rtd_head(backend, /, **over):
    return rtd(backend, **{"logits_or_hidden": torch.randn(2, 5, 3), "head_weight": torch.randn(3), **over})


RTD = [
    Case("hidden-without-head", "logits_or_hidden", lambda be: rtd(be, logits_or_hidden=torch.randn(2, 5, 3)),
         ValueError, r"logits_or_hidden has shape \(2, 5, 3\).* hidden states \[\*, Dd\] need head_weight "
                     r"\(the fused head\)"),
    Case("logits-with-head", "logits_or_hidden", lambda be: rtd(be, head_weight=torch.randn(5)), ValueError,
         r"logits_or_hidden must have shape \[\*, Dd\] \(hidden states\) when head_weight is given, got \(2, 5\)"),
    Case("logits-int", "logits_or_hidden", lambda be: rtd(be, logits_or_hidden=ids(2, 5)), TypeError,
         r"logits_or_hidden must be a float tensor"),
    Case("logits-list", "logits_or_hidden", lambda be: rtd(be, logits_or_hidden=[0.5]), TypeError,
         r"logits_or_hidden must be a torch.Tensor, got list"),
    Case("hidden-Dd0", "logits_or_hidden", lambda be: rtd_head(be, logits_or_hidden=torch.randn(2, 5, 0),
                                                               head_weight=torch.randn(0)),
         ValueError, r"logits_or_hidden must be hidden states \[\*, Dd\] with Dd >= 1"),
    Case("head_weight-shape", "head_weight", lambda be: rtd_head(be, head_weight=torch.randn(4)), ValueError,
         r"head_weight must have shape \[Dd\] = \[3\], got \(4,\)"),
    Case("head_weight-int", "head_weight", lambda be: rtd_head(be, head_weight=ids(3)), TypeError,
         r"head_weight must be a float tensor"),
    Case("head_weight-device", "head_weight", lambda be: rtd_head(be, head_weight=torch.randn(3, device=META)),
         ValueError, r"head_weight must be on device cpu"),
    Case("head_bias-shape", "head_bias", lambda be: rtd_head(be, head_bias=torch.randn(2)), ValueError,
         r"head_bias must have shape \[\] = \[\], got \(2,\)"),
    Case("head_bias-without-head", "head_bias", lambda be: rtd(be, head_bias=torch.randn(())), ValueError,
         r"head_bias needs head_weight"),
    Case("corrupted_ids-shape", "corrupted_ids", lambda be: rtd(be, corrupted_ids=ids(2, 4)), ValueError,
         r"corrupted_ids must have shape \[\*, \*\] = \[2, 5\], got \(2, 4\)"),
    Case("corrupted_ids-float", "corrupted_ids", lambda be: rtd(be, corrupted_ids=torch.zeros(2, 5)), TypeError,
         r"corrupted_ids must be a int tensor"),
    Case("original_ids-device", "original_ids", lambda be: rtd(be, original_ids=ids(2, 5).to(META)), ValueError,
         r"original_ids must be on device cpu"),
    Case("original_ids-hidden-shape", "original_ids", lambda be: rtd_head(be, original_ids=ids(2, 5, 3)), ValueError,
         r"original_ids must have shape \[\*, \*\] = \[2, 5\]"),
    Case("attention_mask-shape", "attention_mask", lambda be: rtd(be, attention_mask=torch.ones(5, 2)), ValueError,
         r"attention_mask must have shape \[\*, \*\] = \[2, 5\], got \(5, 2\)"),
    Case("reduction-unknown", "reduction", lambda be: rtd(be, reduction="mean_tokens"), ValueError,
         r"reduction must be one of \('mean', 'sum', 'none'\), got 'mean_tokens'"),
    Case("loss_weight-inf", "loss_weight", lambda be: rtd(be, loss_weight=float("inf")), TypeError,
         r"loss_weight must be a finite number, got inf"),
    Case("return_stats-str", "return_stats", lambda be: rtd(be, return_stats="yes"), TypeError,
         r"return_stats must be a bool"),
    Case("backend-cannot-run", "backend", lambda be: rtd(be, backend="cuda"), BackendUnavailableError,
         r"backend 'cuda' cannot run rtd_loss: \S"),
]


# --- linear_cross_entropy: hidden [4, 3], weight [7, 3] ------------------------------------------

def lce(backend, /, **over):
    base = dict(hidden=torch.randn(4, 3), weight=torch.randn(7, 3), targets=torch.tensor([0, 6, -100, 2]))
    return _call(po.linear_cross_entropy, base, backend, over)


LCE = [
    Case("hidden-3d", "hidden", lambda be: lce(be, hidden=torch.randn(2, 2, 3)), ValueError,
         r"hidden must have shape \[N, E\] = \[\?, \?\], got \(2, 2, 3\)"),
    Case("hidden-int", "hidden", lambda be: lce(be, hidden=ids(4, 3)), TypeError, r"hidden must be a float tensor"),
    Case("weight-E", "weight", lambda be: lce(be, weight=torch.randn(7, 4)), ValueError,
         r"weight must have shape \[V, E\] = \[\?, 3\], got \(7, 4\)"),
    Case("weight-dtype", "weight", lambda be: lce(be, weight=torch.randn(7, 3, dtype=torch.float64)), TypeError,
         r"weight must have dtype torch.float32 .*got torch.float64"),
    Case("weight-empty-vocab", "weight", lambda be: lce(be, weight=torch.randn(0, 3)), ValueError,
         r"weight must have at least one row \(V >= 1\)"),
    Case("weight-device", "weight", lambda be: lce(be, weight=torch.randn(7, 3, device=META)), ValueError,
         r"weight must be on device cpu"),
    Case("targets-float", "targets", lambda be: lce(be, targets=torch.zeros(4)), TypeError,
         r"targets must be a int tensor"),
    Case("targets-length", "targets", lambda be: lce(be, targets=torch.zeros(5, dtype=torch.long)), ValueError,
         r"targets must have shape \[N\] = \[4\], got \(5,\)"),
    Case("targets-beyond-vocab", "targets", lambda be: lce(be, targets=torch.tensor([0, 7, -100, 2])), ValueError,
         r"targets must be in \[0, 7\) or -100 \(vocabulary ids, or ignore_index\), got 7"),
    Case("targets-negative", "targets", lambda be: lce(be, targets=torch.tensor([0, -5, -100, 2])), ValueError,
         r"targets must be in \[0, 7\) or -100 .*got -5"),
    Case("bias-length", "bias", lambda be: lce(be, bias=torch.randn(6)), ValueError,
         r"bias must have shape \[V\] = \[7\], got \(6,\)"),
    Case("bias-dtype", "bias", lambda be: lce(be, bias=torch.randn(7, dtype=torch.float16)), TypeError,
         r"bias must have dtype torch.float32"),
    Case("ignore_index-float", "ignore_index", lambda be: lce(be, ignore_index=-100.0), TypeError,
         r"ignore_index must be a finite int, got -100.0"),
    Case("reduction-unknown", "reduction", lambda be: lce(be, reduction="avg"), ValueError,
         r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    Case("temperature-zero-sampling", "temperature", lambda be: lce(be, sample=True, temperature=0.0), ValueError,
         r"temperature must be in \(0.0, inf\), got 0.0"),
    Case("temperature-negative-sampling", "temperature", lambda be: lce(be, sample=True, temperature=-1.0),
         ValueError, r"temperature must be in \(0.0, inf\), got -1.0"),
    Case("disallow-without-sample", "disallow", lambda be: lce(be, disallow=ids(4)), ValueError,
         r"disallow only applies to sampling: pass sample=True"),
    Case("disallow-shape", "disallow", lambda be: lce(be, sample=True, disallow=ids(3)), ValueError,
         r"disallow must have shape \[N\] = \[4\]"),
    Case("disallow-float", "disallow", lambda be: lce(be, sample=True, disallow=torch.zeros(4)), TypeError,
         r"disallow must be a int tensor"),
    Case("seed-negative", "seed", lambda be: lce(be, sample=True, seed=-1), ValueError, r"seed must be in \[0, "),
    Case("seed-bool-tensor", "seed", lambda be: lce(be, sample=True, seed=torch.tensor(True)), TypeError,
         r"seed must be an int or a one-element integer CPU tensor, got a torch.bool"),
    Case("sample-str", "sample", lambda be: lce(be, sample="no"), TypeError, r"sample must be a bool, got 'no'"),
    Case("backend-cannot-run", "backend", lambda be: lce(be, backend="cuda"), BackendUnavailableError,
         r"backend 'cuda' cannot run linear_cross_entropy: \S"),
]


# --- nn modules -----------------------------------------------------------------------------------

def layer_forward(backend, /, **over):
    """TwoStreamRelativeAttention(16, 2) on HF's time-major inputs: Lq=5, B=2, P=2."""
    layer = pnn.TwoStreamRelativeAttention(16, 2, backend=backend)
    tm = torch.zeros(2, 5, 2)
    tm[0, 1], tm[1, 3] = 1.0, 1.0
    base = dict(h=torch.randn(5, 2, 16), g=torch.randn(2, 2, 16), attn_mask_h=None, attn_mask_g=None,
                r=torch.randn(10, 2, 16), seg_mat=None, mems=None, target_mapping=tm)
    kw = {**base, **over}
    return layer(**{k: v for k, v in kw.items() if v is not DROP})


def tiny_xlnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.XLNetConfig(vocab_size=11, d_model=8, n_layer=1, n_head=2, d_inner=8, dropout=0.0)
    return transformers.XLNetLMHeadModel(config)


def tiny_t5(cls="T5EncoderModel"):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=11, d_model=8, d_kv=4, num_heads=2, num_layers=1, d_ff=8,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                   decoder_start_token_id=0)
    return getattr(transformers, cls)(config)


def tiny_longt5():
    transformers = pytest.importorskip("transformers")
    return transformers.LongT5Model(transformers.LongT5Config(vocab_size=11, d_model=8, d_kv=4, num_heads=2,
                                                              num_layers=1, d_ff=8))


def patched_t5_attention_with_dense_bias(backend):
    attention = patch_t5(tiny_t5(), backend=backend).encoder.block[0].layer[0].SelfAttention
    return attention(torch.randn(1, 3, 8), position_bias=torch.zeros(1, 2, 3, 3))


MODULES = [
    Case("RTDLoss-reduction", "reduction", lambda be: pnn.RTDLoss(reduction="avg", backend=be), ValueError,
         r"reduction must be one of"),
    Case("RTDLoss-loss_weight", "loss_weight", lambda be: pnn.RTDLoss(loss_weight="1", backend=be), TypeError,
         r"loss_weight must be a finite number"),
    Case("RTDLoss-forward-hidden-without-head", "logits_or_hidden",
         lambda be: pnn.RTDLoss(backend=be)(torch.randn(2, 5, 3), ids(2, 5), ids(2, 5)), ValueError,
         r"hidden states \[\*, Dd\] need head_weight"),
    Case("LinearCrossEntropy-ignore_index", "ignore_index",
         lambda be: pnn.LinearCrossEntropy(ignore_index=1.5, backend=be), TypeError, r"ignore_index must be a finite int"),
    Case("LinearCrossEntropy-backend", "backend", lambda be: pnn.LinearCrossEntropy(backend="gpu"), ValueError,
         r"backend must be one of"),
    Case("LinearCrossEntropy-forward-targets", "targets",
         lambda be: pnn.LinearCrossEntropy(backend=be)(torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 6, 1])),
         ValueError, r"targets must be in \[0, 6\) or -100"),
    Case("TwoStream-n_head-zero", "n_head", lambda be: pnn.TwoStreamRelativeAttention(16, 0, backend=be), ValueError,
         r"n_head must be in \[1, inf\), got 0"),
    Case("TwoStream-d_model-not-multiple", "d_model", lambda be: pnn.TwoStreamRelativeAttention(16, 3, backend=be),
         ValueError, r"d_model \(16\) must be a multiple of n_head \(3\)"),
    Case("TwoStream-dropout-one", "dropout", lambda be: pnn.TwoStreamRelativeAttention(16, 2, dropout=1.0, backend=be),
         ValueError, r"dropout must be in \[0.0, 1.0\), got 1.0"),
    Case("TwoStream-empty_rows", "empty_rows",
         lambda be: pnn.TwoStreamRelativeAttention(16, 2, empty_rows="nan", backend=be), ValueError,
         r"empty_rows must be one of"),
    Case("TwoStream-h-d_model", "h", lambda be: layer_forward(be, h=torch.randn(5, 2, 12)), ValueError,
         r"h must have shape \[Lq, B, d_model\] = \[\?, \?, 16\], got \(5, 2, 12\)"),
    Case("TwoStream-g-batch", "g", lambda be: layer_forward(be, g=torch.randn(2, 3, 16)), ValueError,
         r"g must have shape \[P, B, d_model\] = \[\?, 2, 16\]"),
    Case("TwoStream-r-batch", "r", lambda be: layer_forward(be, r=torch.randn(10, 3, 16)), ValueError,
         r"r must have shape \[R, B or 1, d_model\] = \[\?, 2 or 1, 16\], got \(10, 3, 16\)"),
    Case("TwoStream-mems-width", "mems", lambda be: layer_forward(be, mems=torch.randn(3, 2, 8)), ValueError,
         r"mems must have shape \[M, B, d_model\] = \[\?, 2, 16\]"),
    Case("TwoStream-seg_mat-shape", "seg_mat", lambda be: layer_forward(be, seg_mat=torch.zeros(5, 5, 2, 3)),
         ValueError, r"seg_mat must have shape \[Lq, Lk, B, 2\] = \[5, 5, 2, 2\], got \(5, 5, 2, 3\)"),
    Case("TwoStream-target_mapping-shape", "target_mapping",
         lambda be: layer_forward(be, target_mapping=torch.zeros(3, 5, 2)), ValueError,
         r"target_mapping must have shape \[P, Lq, B\] = \[2, 5, 2\], got \(3, 5, 2\)"),
    Case("TwoStream-mask-shape", "attention masks", lambda be: layer_forward(be, attn_mask_g=torch.zeros(5, 5, 2)),
         ValueError, r"attention masks must have HF's shape \[qlen, klen, batch, 1\], got \(5, 5, 2\)"),
    Case("TwoStream-from_hf-wrong-module", "module",
         lambda be: pnn.TwoStreamRelativeAttention.from_hf(nn.Linear(2, 2), backend=be), TypeError,
         r"module must be a transformers XLNetRelativeAttention, got Linear \(without n_head, "),
    Case("patch_xlnet-not-a-module", "model", lambda be: patch_xlnet("xlnet-base-cased", backend=be), TypeError,
         r"model must be a torch.nn.Module containing transformers XLNet layers, got str"),
    Case("patch_xlnet-no-xlnet", "model", lambda be: patch_xlnet(nn.Sequential(nn.Linear(2, 2)), backend=be),
         ValueError, r"model \(Sequential\) contains no transformers XLNetRelativeAttention module to patch"),
    Case("patch_xlnet-twice", "model", lambda be: patch_xlnet(patch_xlnet(tiny_xlnet(), backend=be), backend=be),
         ValueError, r"model \(XLNetLMHeadModel\) is already patched"),
    Case("patch_xlnet-empty_rows", "empty_rows", lambda be: patch_xlnet(tiny_xlnet(), backend=be, empty_rows="x"),
         ValueError, r"empty_rows must be one of"),
    Case("patch_xlnet-backend", "backend", lambda be: patch_xlnet(tiny_xlnet(), backend="gpu"), ValueError,
         r"backend must be one of"),
    Case("patch_t5-not-a-module", "model", lambda be: patch_t5("t5-small", backend=be), ValueError,
         r"patch_t5 expects a transformers T5 / mT5 / UMT5 model .*, got str"),
    Case("patch_t5-no-t5", "model", lambda be: patch_t5(nn.Sequential(nn.Linear(2, 2)), backend=be), ValueError,
         r"patch_t5 expects a transformers T5 .*; Sequential contains no such attention layer"),
    Case("patch_t5-longt5", "model", lambda be: patch_t5(tiny_longt5(), backend=be), ValueError,
         r"patch_t5: unsupported T5 variant: .*LongT5.*; expected a transformers T5 / mT5 / UMT5 model"),
    Case("patch_t5-backend", "backend", lambda be: patch_t5(tiny_t5(), backend="gpu"), ValueError,
         r"backend must be one of"),
    Case("patch_t5-dense-position_bias", "position_bias", patched_t5_attention_with_dense_bias, ValueError,
         r"patch_t5: the patched T5 attention computes the position bias in-kernel and does not take a dense "
         r"position_bias"),
]


# --- ElectraObjective with plain modules: V=31, E=6, Dd=8 ------------------------------------------

class Body(nn.Module):
    def __init__(self, emb, width):
        super().__init__()
        self.emb, self.proj = emb, nn.Linear(emb.embedding_dim, width)

    def forward(self, input_ids, attention_mask=None):
        return torch.tanh(self.proj(self.emb(input_ids)))


def electra(backend, /, **over):
    emb = nn.Embedding(31, 6)
    base = dict(generator=Body(emb, 6), discriminator=Body(emb, 8), mask_token_id=4, special_token_ids=[0, 1],
                gen_output_weight=emb.weight, disc_output=nn.Linear(8, 1))
    return _call(ElectraObjective, base, backend, over)


def electra_forward(backend, /, **over):
    base = dict(input_ids=torch.randint(5, 31, (2, 8)), attention_mask=torch.ones(2, 8, dtype=torch.long), seed=7)
    kw = {**base, **over}
    return electra(backend)(**{k: v for k, v in kw.items() if v is not DROP})


ELECTRA = [
    Case("generator-not-module", "generator", lambda be: electra(be, generator="electra-small"), TypeError,
         r"generator must be a torch.nn.Module .* got str"),
    Case("mask_token_id-missing", "mask_token_id", lambda be: electra(be, mask_token_id=None), ValueError,
         r"mask_token_id is required"),
    Case("mask_token_id-negative", "mask_token_id", lambda be: electra(be, mask_token_id=-1), ValueError,
         r"mask_token_id must be in \[0, inf\), got -1"),
    Case("special_token_ids-str", "special_token_ids", lambda be: electra(be, special_token_ids="[CLS]"), TypeError,
         r"special_token_ids must be a sequence of ints"),
    Case("temperature-zero", "temperature", lambda be: electra(be, temperature=0.0), ValueError,
         r"temperature must be in \(0.0, inf\)"),
    Case("mask_prob-above-one", "mask_prob", lambda be: electra(be, mask_prob=1.5), ValueError,
         r"mask_prob must be in \[0.0, 1.0\], got 1.5"),
    Case("max_predictions-zero", "max_predictions", lambda be: electra(be, max_predictions=0), ValueError,
         r"max_predictions must be in \[1, inf\), got 0"),
    Case("masking-unknown", "masking", lambda be: electra(be, masking="span"), ValueError, r"masking must be one of"),
    Case("gen_output_weight-1d", "gen_output_weight", lambda be: electra(be, gen_output_weight=torch.randn(31)),
         ValueError, r"gen_output_weight must have shape \[V, E\]"),
    Case("gen_output_bias-length", "gen_output_bias", lambda be: electra(be, gen_output_bias=torch.randn(30)),
         ValueError, r"gen_output_bias must have shape \[V\] = \[31\], got \(30,\)"),
    Case("disc_output-two-outputs", "disc_output", lambda be: electra(be, disc_output=nn.Linear(8, 2)), ValueError,
         r"disc_output must be a linear layer with one output .* got \(2, 8\)"),
    Case("backend-unknown", "backend", lambda be: electra(be, backend="gpu"), ValueError, r"backend must be one of"),
    Case("forward-input_ids-float", "input_ids", lambda be: electra_forward(be, input_ids=torch.zeros(2, 8)),
         TypeError, r"input_ids must have an integer dtype, got torch.float32"),
    Case("forward-input_ids-beyond-vocab", "input_ids",
         lambda be: electra_forward(be, input_ids=torch.full((2, 8), 31)), ValueError,
         r"input_ids must be in \[0, 31\) \(ids must index the generator's output embedding\), got 31"),
    Case("forward-attention_mask-shape", "attention_mask",
         lambda be: electra_forward(be, attention_mask=torch.ones(2, 7, dtype=torch.long)), ValueError,
         r"attention_mask must have shape \(2, 8\) like input_ids, got \(2, 7\)"),
    Case("forward-attention_mask-values", "attention_mask",
         lambda be: electra_forward(be, attention_mask=torch.full((2, 8), 2)), ValueError,
         r"attention_mask must contain only 0 and 1"),
    Case("forward-token_type_ids-shape", "token_type_ids",
         lambda be: electra_forward(be, token_type_ids=ids(2, 7)), ValueError,
         r"token_type_ids must have shape \[B, L\] = \[2, 8\], got \(2, 7\)"),
    Case("forward-rng-type", "rng", lambda be: electra_forward(be, rng=7), TypeError,
         r"rng must be a torch.Generator or None, got int"),
    Case("forward-seed-negative", "seed", lambda be: electra_forward(be, seed=-1), ValueError,
         r"seed must be in \[0, "),
]

CASES = ATTENTION + RTD + LCE + MODULES + ELECTRA


# --- data utilities (no backend) --------------------------------------------------------------------

def plm(**over):
    base = dict(input_ids=torch.randint(5, 30, (2, 8)))
    return data.plm_ranks(**{**base, **over})


DATA = [
    Case("plm_ranks-input_ids-float", "input_ids", lambda: plm(input_ids=torch.zeros(2, 8)), TypeError,
         r"input_ids must have an integer dtype"),
    Case("plm_ranks-input_ids-1d", "input_ids", lambda: plm(input_ids=ids(8)), ValueError,
         r"input_ids must have shape \[B, L\], got shape \(8,\)"),
    Case("plm_ranks-odd-length", "input_ids", lambda: plm(input_ids=ids(2, 7)), ValueError,
         r"input_ids: style='hf' needs an even sequence length L"),
    Case("plm_ranks-style", "style", lambda: plm(style="bert"), ValueError, r"style must be 'hf' or 'xlnet'"),
    Case("plm_ranks-plm_probability", "plm_probability", lambda: plm(plm_probability=0.0), ValueError,
         r"plm_probability must be in \(0, 1\]"),
    Case("plm_ranks-attention_mask-shape", "attention_mask", lambda: plm(attention_mask=torch.ones(2, 6)),
         TypeError, r"attention_mask must have dtype bool or an integer dtype"),
    Case("plm_ranks-attention_mask-values", "attention_mask", lambda: plm(attention_mask=torch.full((2, 8), 3)),
         ValueError, r"attention_mask must contain only 0 and 1"),
    Case("plm_ranks-reuse_len-hf", "reuse_len", lambda: plm(reuse_len=4), ValueError,
         r"reuse_len is only used with style='xlnet'"),
    Case("plm_ranks-max_span_length", "max_span_length", lambda: plm(max_span_length=0), ValueError,
         r"max_span_length must be >= 1, got 0"),
    Case("ranks_to_dense_mask-float", "q_rank", lambda: data.ranks_to_dense_mask(torch.zeros(2, 5), ids(2, 5)),
         TypeError, r"q_rank must have an integer dtype"),
    Case("ranks_to_dense_mask-batch", "k_rank", lambda: data.ranks_to_dense_mask(ids(2, 5), ids(3, 5)), ValueError,
         r"q_rank and k_rank must share batch size and device"),
    Case("ranks_to_dense_mask-content", "content", lambda: data.ranks_to_dense_mask(ids(2, 5), ids(2, 5), content=1),
         TypeError, r"content must be a bool, got int"),
    Case("ranks_to_dense_mask-mem_len", "mem_len", lambda: data.ranks_to_dense_mask(ids(2, 5), ids(2, 5), mem_len=-1),
         ValueError, r"mem_len must be >= 0, got -1"),
    Case("ranks_to_dense_mask-content-length", "k_rank",
         lambda: data.ranks_to_dense_mask(ids(2, 5), ids(2, 7), content=True, mem_len=1), ValueError,
         r"content=True needs k_rank of length mem_len \+ Lq = 1 \+ 5, got Lk=7"),
    Case("electra_mask-mask_token_id", "mask_token_id", lambda: data.electra_mask(ids(2, 8), mask_token_id=None),
         TypeError, r"mask_token_id must be an int, got NoneType"),
    Case("electra_mask-mask_prob", "mask_prob", lambda: data.electra_mask(ids(2, 8), mask_token_id=4, mask_prob=2.0),
         ValueError, r"mask_prob must be in \[0, 1\], got 2.0"),
    Case("electra_mask-special_tokens_mask", "special_tokens_mask",
         lambda: data.electra_mask(ids(2, 8), mask_token_id=4, special_tokens_mask=torch.full((2, 8), 2)),
         ValueError, r"special_tokens_mask must contain only 0 and 1"),
    Case("electra_mask-vocab_size", "vocab_size",
         lambda: data.electra_mask(ids(2, 8), mask_token_id=4, style="bert"), ValueError,
         r"vocab_size is required when replace_with_random > 0"),
    Case("electra_mask-max_predictions-bert", "max_predictions",
         lambda: data.electra_mask(ids(2, 8), mask_token_id=4, style="bert", vocab_size=9, max_predictions=2),
         ValueError, r"max_predictions is only used with style='electra'"),
    Case("electra_mask-generator", "generator", lambda: data.electra_mask(ids(2, 8), mask_token_id=4, generator=3),
         TypeError, r"generator must be a torch.Generator or None, got int"),
    Case("electra_mask-replace-sum", "replace_with_mask",
         lambda: data.electra_mask(ids(2, 8), mask_token_id=4, replace_with_mask=0.9, replace_with_random=0.2,
                                   vocab_size=9), ValueError, r"replace_with_mask \+ replace_with_random must be <= 1"),
    Case("t5_span_corruption-short", "input_ids", lambda: data.t5_span_corruption(ids(2, 1), sentinel_start_id=99), ValueError,
         r"input_ids must have a sequence length L >= 2"),
    Case("t5_span_corruption-noise_density", "noise_density",
         lambda: data.t5_span_corruption(ids(2, 20), noise_density=1.0, sentinel_start_id=99), ValueError,
         r"noise_density must be in \(0, 1\), got 1.0"),
    Case("t5_span_corruption-mean_noise_span_length", "mean_noise_span_length",
         lambda: data.t5_span_corruption(ids(2, 20), mean_noise_span_length=0.5,
                                                 sentinel_start_id=99), ValueError,
         r"mean_noise_span_length must be a finite number >= 1, got 0.5"),
    Case("t5_span_corruption-noise_mask-shape", "noise_mask",
         lambda: data.t5_span_corruption(ids(2, 20), noise_mask=torch.zeros(2, 19, dtype=torch.bool),
                                         sentinel_start_id=99), ValueError,
         r"noise_mask must have shape \(2, 20\) like input_ids, got \(2, 19\)"),
    Case("t5_span_corruption-sentinel", "sentinel_start_id",
         lambda: data.t5_span_corruption(ids(2, 20), sentinel_start_id=-1), ValueError,
         r"sentinel_start_id must be >= 0, got -1"),
]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every backend implementation the calls reach, recorded: a validation error must leave it empty."""
    calls = []
    original = backends.Backend.implementation

    def recording(self, op):
        impl = original(self, op)

        def run(*args, **kwargs):
            calls.append((self.name, op))
            return impl(*args, **kwargs)
        return run

    monkeypatch.setattr(backends.Backend, "implementation", recording)
    return calls


def assert_names_argument(case, info):
    message = str(info.value)
    assert re.search(case.pattern, message), f"message {message!r} does not match {case.pattern!r}"
    assert re.search(rf"(?<![\w.]){re.escape(case.arg)}(?!\w)", message), f"message {message!r} does not name {case.arg}"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", CASES, ids=[f"{op}-{c.id}" for op, cases in (
    ("attn", ATTENTION), ("rtd", RTD), ("lce", LCE), ("nn", MODULES), ("electra", ELECTRA)) for c in cases])
def test_bad_input_is_refused_before_any_kernel(case, backend, kernel_calls):
    with pytest.raises(case.error) as info:
        case.call(backend)
    assert_names_argument(case, info)
    assert kernel_calls == [], f"a kernel ran before the error: {kernel_calls}"


@pytest.mark.parametrize("case", DATA, ids=[c.id for c in DATA])
def test_data_utilities_refuse_bad_input(case, kernel_calls):
    with pytest.raises(case.error) as info:
        case.call()
    assert_names_argument(case, info)
    assert kernel_calls == []


def test_case_table_size():
    """The issue asks for at least 50 cases per backend."""
    assert len({c.id for c in ATTENTION}) == len(ATTENTION) and len(CASES) >= 50
    print(f"\n{len(CASES)} cases per backend ({len(ATTENTION)} attention, {len(RTD)} rtd_loss, {len(LCE)} "
          f"linear_cross_entropy, {len(MODULES)} nn / patch_xlnet / patch_t5, {len(ELECTRA)} ElectraObjective) "
          f"+ {len(DATA)} data-utility cases")


VALID = {
    "two_stream_attention": lambda be: attn(be, q=torch.randn(2, 5, 2, 4), k=torch.randn(2, 6, 2, 4)),
    "rtd_loss": lambda be: rtd_head(be),
    "linear_cross_entropy": lambda be: lce(be),
}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("op", VALID)
def test_valid_baseline_reaches_the_kernel(op, backend, kernel_calls, one_torch_thread):
    """The same calls without the defect run on the requested backend: the recorder sees it, so an empty
    record above means no kernel ran (not that the recorder is blind)."""
    out = VALID[op](backend)
    out = out[0] if isinstance(out, tuple) else out
    assert kernel_calls == [(backend, op)]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.id != "reference"])
def test_backend_that_cannot_take_the_inputs_says_why(backend, kernel_calls):
    """float64 attention is the reference's: a fused backend asked for it explains why not, and nothing runs."""
    x = dict(q=torch.randn(2, 5, 2, 4, dtype=torch.float64), k=torch.randn(2, 6, 2, 4, dtype=torch.float64),
             v=torch.randn(2, 6, 2, 4, dtype=torch.float64), r=torch.randn(11, 2, 4, dtype=torch.float64),
             q_g=torch.randn(2, 2, 2, 4, dtype=torch.float64))
    with pytest.raises(BackendUnavailableError, match=rf"backend '{backend}' cannot run two_stream_attention: .*float64"):
        attn(backend, **x)
    assert kernel_calls == []
