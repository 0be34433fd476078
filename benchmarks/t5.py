"""T5: the self-attention op alone (bucketed relative bias, padding, bias gradient) and a T5 training step.

Op (``t5_attention``): encoder self-attention fwd+bwd, gradients to q, k, v and the ``[num_buckets, H]``
bias table, ``scale = 1``, key padding (rows of lengths L, 7L/8, 3L/4, L/2). Providers: every pyobjectives
backend (``two_stream_attention(q, k, v, t5_bias=..., content_sees_self=False, empty_rows="uniform")``:
the bias read from the table in-kernel), HF eager (``T5Attention.compute_bias`` builds the dense
``[1, H, L, L]`` bias, ``eager_attention_forward`` adds it and the float mask) and HF sdpa
(``sdpa_attention_forward`` folds the bias into a float mask for ``scaled_dot_product_attention``).
FLOPs (dense count, masked pairs included): ``QK^T`` and ``PV`` are ``2 * 2 B H L^2 D`` forward, x3 with
the backward. Bytes (floor): q, k, v, outputs and their gradients once, plus the table.

Step (``t5_step``): ``T5ForConditionalGeneration`` forward + backward + AdamW on span-corrupted batches
(``pyobjectives.data.t5_span_corruption``: 568 tokens -> 512 inputs, 114 labels at T5's 15 % / 3.0),
encoder padding, HF eager and sdpa against ``patch_t5`` on each backend. Checked (float32, eval, before
any optimizer step): loss and every parameter gradient of the patched model equal the unpatched eager HF.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

import pyobjectives as po
from pyobjectives import functional, reference

from .common import (Case, Provider, autograd_oracle, backend_providers, generator, make_gouts, randn,
                     rotated_input_sets, tensor_bytes)
from .e2e import XLNetStep, _transformers_reason

GRAD_NAMES = ["q", "k", "v", "t5_bias"]


class T5Attention:
    OP = "t5_attention"
    TITLE = "T5 self-attention (bucketed bias)"
    X_KEY = "L"
    EAGER = "hf_eager"

    @staticmethod
    def sweeps(profile: str) -> list:
        if profile == "gpu":
            base = dict(B=16, L=512, H=12, D=64, buckets=32, max_distance=128, dtype="bfloat16")
            return [("L", "L", [base, dict(base, L=2048, B=4)])]
        if profile == "cpu":  # issue 10's sizes: B=4, L=512 and 2048, H=8, D=64
            base = dict(B=4, L=512, H=8, D=64, buckets=32, max_distance=128, dtype="float32")
            return [("L", "L", [base, dict(base, L=2048)])]
        return [("L", "L", [dict(B=2, L=48, H=2, D=16, buckets=8, max_distance=20, dtype="float32")])]

    @staticmethod
    def interpreter_config(profile: str) -> dict:
        return dict(B=2, L=24, H=2, D=16, buckets=8, max_distance=12, dtype="float32")

    @staticmethod
    def label(cfg: dict) -> str:
        return f"B={cfg['B']} L={cfg['L']} H={cfg['H']} D={cfg['D']} buckets={cfg['buckets']} {cfg['dtype']}"

    @staticmethod
    def _input_set(cfg: dict, device: str, seed: int) -> dict:
        B, L, H, D = cfg["B"], cfg["L"], cfg["H"], cfg["D"]
        g = generator(seed)
        f = dict(gen=g, dtype=getattr(torch, cfg["dtype"]), device=device)
        s = dict(q=randn(B, L, H, D, **f), k=randn(B, L, H, D, **f), v=randn(B, L, H, D, **f),
                 t5_bias=randn(cfg["buckets"], H, **f))
        for n in GRAD_NAMES:
            s[n].requires_grad_()
        lengths = torch.tensor([L, L - L // 8, L - L // 4, L // 2])[torch.arange(B) % 4]
        s["key_padding_mask"] = (torch.arange(L)[None, :] >= lengths[:, None]).to(device)
        return s

    @classmethod
    def make_case(cls, cfg: dict, device: str, profile: str) -> Case:
        B, L, H, D = cfg["B"], cfg["L"], cfg["H"], cfg["D"]
        dt = getattr(torch, cfg["dtype"])
        sets = rotated_input_sets(cls._input_set, cfg, device, seed=5000)
        flops = 3 * 2 * 2 * B * H * L * L * D
        nbytes = 2 * tensor_bytes([sets[0][n] for n in GRAD_NAMES]) + 2 * B * L * H * D * dt.itemsize
        outs = [torch.empty(B, L, H, D, dtype=dt, device=device)]
        gouts = [make_gouts(outs, generator(6000 + i), dt) for i in range(len(sets))]
        return Case(op=cls.OP, config=cfg, label=cls.label(cfg), sets=sets, grad_names=list(GRAD_NAMES),
                    dtype=cfg["dtype"], device=device, flops=flops, bytes=nbytes,
                    oracle=autograd_oracle(cls._reference(cfg), torch.float64), gouts=gouts, tokens=B * L)

    @staticmethod
    def _op_kwargs(cfg: dict, s: dict) -> dict:
        return dict(t5_bias=s["t5_bias"], t5_num_buckets=cfg["buckets"], t5_max_distance=cfg["max_distance"],
                    key_padding_mask=s["key_padding_mask"], scale=1.0, content_sees_self=False,
                    empty_rows="uniform")

    @classmethod
    def _reference(cls, cfg: dict):
        def fn(s):
            return [reference.two_stream_attention(s["q"], s["k"], s["v"], **cls._op_kwargs(cfg, s))[0]]
        return fn

    @classmethod
    def _pyobjectives(cls, cfg: dict):
        def make(backend):
            def fn(s):
                return [functional.two_stream_attention(s["q"], s["k"], s["v"], **cls._op_kwargs(cfg, s),
                                                        backend=backend)[0]]
            return fn
        return make

    @staticmethod
    def _hf(cfg: dict, impl: str):
        """HF's T5 attention core as ``T5Attention.forward`` runs it on [B, H, L, D] projections: the dense
        bias from ``compute_bias`` (an embedding lookup of the table, so the table gets its gradient), then the
        registered attention function with HF's mask (eager: additive float, sdpa: bool)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.t5.modeling_t5 import T5Attention as HF
        from transformers.models.t5.modeling_t5 import eager_attention_forward

        def fn(s):
            layer = SimpleNamespace(relative_attention_num_buckets=cfg["buckets"], is_decoder=False,
                                    relative_attention_max_distance=cfg["max_distance"], training=False,
                                    _relative_position_bucket=HF._relative_position_bucket, is_causal=False,
                                    relative_attention_bias=lambda bucket: torch.nn.functional.embedding(
                                        bucket, s["t5_bias"]))
            q, k, v = (s[n].transpose(1, 2) for n in ("q", "k", "v"))
            L = q.shape[2]
            bias = HF.compute_bias(layer, L, L, device=q.device)
            keep = ~s["key_padding_mask"][:, None, None, :]
            if impl == "eager":
                mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~keep, torch.finfo(q.dtype).min)
                out, _ = eager_attention_forward(layer, q, k, v, mask, scaling=1.0, dropout=0.0, position_bias=bias)
            else:
                out, _ = sdpa_attention_forward(layer, q, k, v, keep, scaling=1.0, dropout=0.0, position_bias=bias)
            return [out]
        return fn

    @classmethod
    def providers(cls, case: Case) -> list:
        cfg, s = case.config, case.sets[0]
        call_inputs = dict(q=s["q"], k=s["k"], v=s["v"], r=None, r_w_bias=None, r_r_bias=None, q_g=None,
                           target_pos=None, q_rank=None, k_rank=None, attn_mask=None, causal=False, seg_q=None,
                           seg_k=None, seg_diff=None, r_s_bias=None, seg_embed=None, t5_bidirectional=True,
                           dropout_p=0.0, seed=None, **cls._op_kwargs(cfg, s))
        out = backend_providers("two_stream_attention", call_inputs, cls._pyobjectives(cfg), case.device)
        reason = _transformers_reason()
        for name, impl, note in (("hf_eager", "eager", "HF T5: dense [1, H, L, L] bias + eager softmax"),
                                 ("hf_sdpa", "sdpa", "HF T5: dense bias folded into SDPA's float mask")):
            out.append(Provider(name, "eager", fn=None if reason else cls._hf(cfg, impl), reason=reason, note=note))
        return out


class T5Step(XLNetStep):
    """HF T5 step: the XLNet step's providers and checks (``patch_t5`` instead of ``patch_xlnet``), plus HF sdpa."""

    OP = "t5_step"
    TITLE = "HF T5 training step"
    MODEL = "T5ForConditionalGeneration"

    @staticmethod
    def _patch(model, backend):
        return po.integrations.patch_t5(model, backend=backend)

    @staticmethod
    def sweeps(profile: str) -> list:
        if profile == "gpu":   # T5-base
            cfg = dict(layers=12, d_model=768, d_kv=64, heads=12, d_ff=3072, vocab=32128, B=16, L=568,
                       mode="bf16-autocast")
        elif profile == "cpu":  # T5-small width, 2 + 2 layers
            cfg = dict(layers=2, d_model=512, d_kv=64, heads=8, d_ff=2048, vocab=32128, B=4, L=568, mode="float32")
        else:
            cfg = dict(layers=1, d_model=32, d_kv=8, heads=4, d_ff=64, vocab=200, B=2, L=40, mode="float32")
        return [("step", "L", [cfg])]

    @staticmethod
    def label(cfg: dict) -> str:
        return (f"T5 {cfg['layers']}+{cfg['layers']}x{cfg['d_model']} h{cfg['heads']} B={cfg['B']} "
                f"L={cfg['L']} V={cfg['vocab']} {cfg['mode']}")

    @staticmethod
    def _batch(cfg: dict, device: str, seed: int) -> dict:
        g = generator(seed)
        ids = torch.randint(2, cfg["vocab"] - 100, (cfg["B"], cfg["L"]), generator=g)  # ids above: sentinels
        spans = po.data.t5_span_corruption(ids, sentinel_start_id=cfg["vocab"] - 1, eos_token_id=1, generator=g)
        mask = torch.ones_like(spans.input_ids)
        mask[1::2, -spans.input_ids.shape[1] // 8:] = 0  # padded rows, as in a real batch
        return {k: v.to(device) for k, v in dict(input_ids=spans.input_ids, attention_mask=mask,
                                                  labels=spans.labels).items()}

    @classmethod
    def make_case(cls, cfg: dict, device: str, profile: str) -> Case:
        from transformers import T5Config, T5ForConditionalGeneration
        torch.manual_seed(0)
        config = T5Config(vocab_size=cfg["vocab"], d_model=cfg["d_model"], d_kv=cfg["d_kv"], num_heads=cfg["heads"],
                          d_ff=cfg["d_ff"], num_layers=cfg["layers"], num_decoder_layers=cfg["layers"],
                          dropout_rate=0.1, decoder_start_token_id=0)
        config._attn_implementation = "eager"
        base = T5ForConditionalGeneration(config)
        sets = [cls._batch(cfg, device, seed=7000 + i) for i in range(2)]
        tokens = sets[0]["input_ids"].numel() + sets[0]["labels"].numel()
        case = Case(op=cls.OP, config=cfg, label=cls.label(cfg), sets=sets, grad_names=[], dtype="float32",
                    device=device, tokens=tokens, step=True)
        case.extra.update(base=base, hf_check=None)
        return case

    @classmethod
    def providers(cls, case: Case) -> list:
        out = super().providers(case)
        sdpa = cls._provider(case, "hf_sdpa", None, impl="sdpa")
        sdpa.reason = out[0].reason
        return out[:1] + [sdpa] + out[1:]
