"""Drop-in acceleration of HuggingFace T5, mT5 and UMT5 models.

:func:`patch_t5` turns every HF ``T5Attention`` / ``MT5Attention`` /
``UMT5Attention`` of a model, in place, into an instance of a subclass
(``PatchedT5Attention``, ...) whose ``forward`` computes q/k/v with HF's own
Linear layers, handles HF's cache objects exactly as HF's forward does, and
calls :func:`pyobjectives.two_stream_attention` with the T5 bucketed bias
computed in-kernel from the ``relative_attention_bias`` table. HF's dense
``position_bias [1, H, Lq, Lk]`` is never built: the patched layers return
``None`` in its place, which the next layers ignore.

Only the class of each attention module changes: parameters, submodules,
``state_dict`` keys and tensors stay exactly as they were. Importing this
module does not import transformers.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .. import functional as F
from .. import reference
from ..backends import BACKEND_NAMES
from .. import _checks as check

#: The HF attention classes patch_t5 knows, by class name, with their module and forward flavour.
_HF_CLASSES = {
    "T5Attention": ("transformers.models.t5.modeling_t5", "t5"),
    "MT5Attention": ("transformers.models.mt5.modeling_mt5", "t5"),
    "UMT5Attention": ("transformers.models.umt5.modeling_umt5", "umt5"),
}
#: Attention classes of HF models built on T5 that patch_t5 does not know (their forwards differ).
_UNKNOWN_VARIANTS = ("LongT5Attention", "LongT5LocalAttention", "LongT5TransientGlobalAttention",
                     "SwitchTransformersAttention", "UdopAttention", "Pop2PianoAttention", "Pix2StructTextAttention",
                     "MoonshineAttention")
#: HF mask formats this module reads (``config._attn_implementation``): eager's float masks, sdpa's bool masks.
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
_EXPECTED = ("a transformers T5 / mT5 / UMT5 model (T5Model, T5ForConditionalGeneration, T5EncoderModel, "
             "MT5*, UMT5*, or another model made of their T5Attention / MT5Attention / UMT5Attention layers)")


def _hf_mask_to_op(mask, batch: int, q_len: int, k_len: int):
    """HF's attention mask as ``(key_padding_mask [B, Lk], attn_mask [B, Lq, Lk])`` booleans (True = masked).

    Accepted: None; a 2-D ``[B, Lk]`` padding mask (1 / True = keep); HF's 4-D masks ``[B or 1, 1, Lq or 1, Lk]``,
    bool (sdpa: True = attend) or float (eager: 0 = attend, ``finfo.min`` / -inf = masked, so ``< 0`` is masked
    exactly). Decided from shapes, strides and dtypes only (nothing is read on the host): a mask that does not
    vary along the query dimension (sdpa's padding mask is an expanded view) becomes a key padding mask.
    """
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"patch_t5: attention masks of type {type(mask).__name__} are not supported (flex_attention "
                         f"BlockMask?); use attn_implementation='eager' or 'sdpa'")
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, k_len):
            raise ValueError(f"patch_t5: a 2-D attention mask must be [batch, key_len] = [{batch}, {k_len}], "
                             f"got {tuple(mask.shape)}")
        return (~mask if mask.dtype == torch.bool else mask == 0), None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, q_len) \
            or mask.shape[3] != k_len:
        raise ValueError(f"patch_t5: expected HF's 4-D attention mask [batch, 1, query_len or 1, key_len] = "
                         f"[{batch}, 1, {q_len}, {k_len}] (per-head masks are not supported), got {tuple(mask.shape)}")
    masked = ~mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] < 0
    if mask.shape[2] == 1 or mask.stride(2) == 0:
        return masked[:, 0].expand(batch, k_len), None
    return None, masked.expand(batch, q_len, k_len)


def _encoder_decoder_cache():
    from transformers.cache_utils import EncoderDecoderCache
    return EncoderDecoderCache


class _PatchedT5AttentionMixin:
    """The patched forward, shared by the T5 / mT5 (T5-style signature) and UMT5 classes."""

    #: Set by :func:`patch_t5`: ``_pyobjectives_backend`` (str) and, for T5 / mT5 self-attention without an own
    #: table, ``_pyobjectives_bias_owner`` (the stack's first layer, a plain attribute: not a submodule, so the
    #: state_dict is unchanged).

    def _bias_table(self):
        if getattr(self, "has_relative_attention_bias", False):
            return self.relative_attention_bias.weight
        owner = self.__dict__.get("_pyobjectives_bias_owner")
        return None if owner is None else owner.relative_attention_bias.weight

    def _pyobjectives_attention(self, hidden_states, key_value_states, mask, cache, kwargs):
        impl = getattr(self.config, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise ValueError(f"patch_t5: attn_implementation={impl!r} is not supported (its masks are not "
                             f"readable here); use one of {SUPPORTED_ATTN_IMPLEMENTATIONS}")
        for name in ("head_mask", "layer_head_mask", "cross_attn_layer_head_mask"):
            if kwargs.get(name) is not None:
                raise ValueError(f"patch_t5: {name} is not supported by the patched T5 attention")
        output_attentions = kwargs.get("output_attentions")
        if output_attentions is None:
            output_attentions = bool(getattr(self.config, "output_attentions", False))

        B, Lq = hidden_states.shape[:2]
        H, D = self.n_heads, self.key_value_proj_dim
        is_cross = key_value_states is not None
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0

        # q/k/v and the cache exactly as HF's forward (batch-major [B, H, L, D] projections).
        query_states = self.q(hidden_states).view(B, Lq, H, D).transpose(1, 2)
        is_updated = False
        curr_cache = cache
        if isinstance(cache, _encoder_decoder_cache()):
            is_updated = cache.is_updated.get(self.layer_idx)
            curr_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        current_states = key_value_states if is_cross else hidden_states
        if is_cross and cache is not None and is_updated:
            key_states = curr_cache.layers[self.layer_idx].keys
            value_states = curr_cache.layers[self.layer_idx].values
        else:
            key_states = self.k(current_states).view(B, -1, H, D).transpose(1, 2)
            value_states = self.v(current_states).view(B, -1, H, D).transpose(1, 2)
            if cache is not None:
                key_states, value_states = curr_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
                if is_cross and isinstance(cache, _encoder_decoder_cache()):
                    cache.is_updated[self.layer_idx] = True
        Lk = key_states.shape[-2]

        table = None
        if not is_cross:
            if isinstance(past, torch.Tensor) or Lk != past + Lq:  # ints (SymInts under torch.compile) only
                raise ValueError(f"patch_t5: the self-attention cache must hold exactly the past keys "
                                 f"(DynamicCache); got {Lk} keys for {past!r} past + {Lq} new positions from "
                                 f"{type(curr_cache).__name__} (static / sliding-window caches are not supported)")
            table = self._bias_table()
        key_padding_mask, attn_mask = _hf_mask_to_op(mask, B, Lq, Lk)
        kw = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                  causal=bool(self.is_causal) and not is_cross, content_sees_self=False, scale=1.0,
                  empty_rows="uniform")
        if table is not None:
            kw.update(t5_bias=table, t5_num_buckets=self.relative_attention_num_buckets,
                      t5_max_distance=self.relative_attention_max_distance, t5_bidirectional=not self.is_decoder)
        dropout_p = float(self.dropout) if self.training else 0.0
        q, k, v = query_states.transpose(1, 2), key_states.transpose(1, 2), value_states.transpose(1, 2)
        probs = None
        if output_attentions:
            if table is not None:
                kw["t5_bias"] = table.to(q.dtype)
            out, _, probs, _ = reference.two_stream_attention(
                q, k, v, **kw, dropout_p=dropout_p, seed=reference.draw_seed() if dropout_p > 0 else None,
                return_probs=True)
        else:
            out, _ = F.two_stream_attention(q, k, v, **kw, dropout_p=dropout_p, backend=self._pyobjectives_backend)
        return self.o(out.reshape(B, Lq, H * D)), probs


class _T5Forward(_PatchedT5AttentionMixin):
    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if position_bias is not None:
            raise ValueError("patch_t5: the patched T5 attention computes the position bias in-kernel and does not "
                             "take a dense position_bias")
        out, probs = self._pyobjectives_attention(hidden_states, key_value_states, mask, cache, kwargs)
        # HF returns (output, position_bias, weights); the position bias placeholder stays None.
        return out, None, probs


class _UMT5Forward(_PatchedT5AttentionMixin):
    def forward(self, hidden_states, encoder_hidden_states=None, cache=None, attention_mask=None, **kwargs):
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        out, probs = self._pyobjectives_attention(hidden_states, encoder_hidden_states, attention_mask, cache, kwargs)
        return out, probs


_PATCHED: dict = {}


def _patched_class(hf_cls):
    """``Patched<HF class name>``: the HF class with the patched forward (created once, module-level, so that a
    patched model pickles and deep-copies)."""
    name = "Patched" + hf_cls.__name__
    cls = _PATCHED.get(name)
    if cls is None:
        mixin = _UMT5Forward if _HF_CLASSES[hf_cls.__name__][1] == "umt5" else _T5Forward
        cls = type(name, (mixin, hf_cls), {"__module__": __name__, "__qualname__": name,
                                           "__doc__": f"HF ``{hf_cls.__name__}`` computed through "
                                                      f":func:`pyobjectives.two_stream_attention`."})
        _PATCHED[name] = cls
        globals()[name] = cls
    return cls


def __getattr__(name):  # PEP 562: unpickling a patched model finds its classes without patching first
    base = name[len("Patched"):] if name.startswith("Patched") else None
    if base in _HF_CLASSES:
        return _patched_class(getattr(importlib.import_module(_HF_CLASSES[base][0]), base))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hf_class(module):
    """The known HF attention class ``module`` is (or was patched from), or None."""
    for cls in type(module).__mro__:
        spec = _HF_CLASSES.get(cls.__name__)
        if spec is not None and cls.__module__ == spec[0]:
            return cls
    return None


def patch_t5(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Compute every attention of an HF T5 / mT5 / UMT5 model (in place) through
    :func:`pyobjectives.two_stream_attention` on ``backend``; returns ``model``.

    Self-attention gets the bucketed relative bias computed in-kernel from the
    ``relative_attention_bias`` table (each layer's own in UMT5, the stack's first
    layer's in T5 / mT5: later layers hold a non-registered reference to it), so
    HF's dense ``position_bias`` is never built; cross-attention runs without bias.
    Parameters are shared (only the attention modules' classes change), the
    ``state_dict`` is unchanged. Padding masks, ``labels``, ``generate()`` with
    HF's DynamicCache / EncoderDecoderCache, gradient checkpointing, dropout and
    ``output_attentions`` (computed by the reference, pre-dropout probabilities)
    keep working. Masks are read from ``attn_implementation`` "eager" or "sdpa".

    Raises ValueError for anything else than T5 / mT5 / UMT5 layers (LongT5,
    SwitchTransformers, ... and subclasses of the HF attention classes), at patch
    time; and, at call time, for static / sliding-window caches, flex_attention
    masks, per-head masks, a dense ``position_bias`` or a head mask.
    """
    check.choice("backend", backend, BACKEND_NAMES)
    if not isinstance(model, nn.Module):
        raise ValueError(f"patch_t5 expects {_EXPECTED}, got {type(model).__name__}")
    targets, unknown = [], []
    for name, module in model.named_modules():
        cls_name = type(module).__name__
        hf_cls = _hf_class(module)
        if hf_cls is not None and (type(module) is hf_cls or isinstance(module, _PatchedT5AttentionMixin)):
            targets.append((name, module, hf_cls))
        elif cls_name in _UNKNOWN_VARIANTS or hf_cls is not None or cls_name.endswith("T5Attention"):
            unknown.append(f"{name or '<model>'} ({type(module).__module__}.{cls_name})")
    if unknown:
        raise ValueError(f"patch_t5: unsupported T5 variant: {', '.join(unknown[:4])}"
                         f"{' ...' if len(unknown) > 4 else ''}; expected {_EXPECTED}")
    if not targets:
        raise ValueError(f"patch_t5 expects {_EXPECTED}; {type(model).__name__} contains no such attention layer")

    # Roles from HF's structure: block.<i>.layer.0.SelfAttention, block.<i>.layer.1.EncDecAttention.
    plans = []
    for name, module, hf_cls in targets:
        attr = name.rpartition(".")[2]
        if attr not in ("SelfAttention", "EncDecAttention"):
            raise ValueError(f"patch_t5: {name} ({hf_cls.__name__}) is not HF's SelfAttention or EncDecAttention "
                             f"of a T5 block; expected {_EXPECTED}")
        role = "self" if attr == "SelfAttention" else "cross"
        if role == "cross" and module.has_relative_attention_bias:
            raise ValueError(f"patch_t5: {name} is a cross-attention with its own relative_attention_bias, which "
                             f"transformers' T5 never builds; not supported")
        owner = None
        if role == "self" and not module.has_relative_attention_bias and _HF_CLASSES[hf_cls.__name__][1] == "t5":
            # T5 / mT5: block.<i>.layer.0.SelfAttention uses block.0.layer.0.SelfAttention's table.
            prefix, sep, rest = name.rpartition("block.")
            index, _, tail = rest.partition(".")
            first = model.get_submodule(f"{prefix}{sep}0.{tail}") if sep and index.isdigit() else None
            if first is None or _hf_class(first) is not hf_cls:
                raise ValueError(f"patch_t5: cannot find the first layer of the stack holding {name}; "
                                 f"expected {_EXPECTED}")
            owner = first if first.has_relative_attention_bias else None
        plans.append((module, hf_cls, owner))

    for module, hf_cls, owner in plans:
        module.__class__ = _patched_class(hf_cls)
        module.__dict__["_pyobjectives_backend"] = backend
        module.__dict__["_pyobjectives_bias_owner"] = owner
    return model
