"""Drop-in acceleration of HuggingFace XLNet models."""

from __future__ import annotations

from torch import nn

from ..nn import TwoStreamRelativeAttention


def _is_hf_xlnet_attention(module: nn.Module) -> bool:
    # Matched by class name so that importing pyobjectives does not import transformers.
    return type(module).__name__ == "XLNetRelativeAttention" and not isinstance(module, TwoStreamRelativeAttention)


_PATCHED_CLASSES: dict = {}


def _patched_class(hf_class: type) -> type:
    """:class:`TwoStreamRelativeAttention` that is also an ``hf_class``, created on first use.

    HF's ``_init_weights`` (run by ``post_init``, ``init_weights`` and for keys missing from a
    checkpoint) recognises attention layers with ``isinstance(module, XLNetRelativeAttention)``;
    a patched layer must pass that test to be initialised as HF would. Our class comes first in
    the MRO, so ``forward`` is ours; HF's ``__init__`` is never run (parameters are shared).
    """
    cls = _PATCHED_CLASSES.get(hf_class)
    if cls is None:
        cls = type("XLNetTwoStreamRelativeAttention", (TwoStreamRelativeAttention, hf_class),
                   {"__module__": __name__, "__doc__": TwoStreamRelativeAttention.__doc__})
        _PATCHED_CLASSES[hf_class] = cls
    return cls


def __getattr__(name: str):
    # Pickled patched models name their layer class by this module attribute; created on demand.
    if name == "XLNetTwoStreamRelativeAttention":
        from transformers.models.xlnet.modeling_xlnet import XLNetRelativeAttention
        return _patched_class(XLNetRelativeAttention)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_xlnet(model: nn.Module, backend: str = "auto", empty_rows: str = "uniform") -> nn.Module:
    """Replace every HF ``XLNetRelativeAttention`` in ``model`` (in place) by
    :class:`pyobjectives.nn.TwoStreamRelativeAttention` on ``backend``.

    Works on any model containing XLNet layers (``XLNetModel``,
    ``XLNetLMHeadModel``, ``XLNetForSequenceClassification``, ...). Parameters
    are shared, not copied: ``state_dict`` keys and tensors are unchanged and an
    optimizer built before the patch keeps working. The new layers are also
    instances of HF's ``XLNetRelativeAttention`` (a subclass made at patch time),
    so HF's weight initialisation (``init_weights``, missing checkpoint keys)
    treats them as it treats its own. ``empty_rows="uniform"`` matches HF
    exactly on rows whose keys are all masked. Returns ``model``.
    """
    targets = [(name, module) for name, module in model.named_modules() if _is_hf_xlnet_attention(module)]
    if not targets:
        raise ValueError("model contains no transformers XLNetRelativeAttention module to patch")
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = _patched_class(type(module)).from_hf(module, backend=backend, empty_rows=empty_rows)
        if hasattr(module, "_is_hf_initialized"):  # HF's "already initialised" mark belongs to the layer
            new._is_hf_initialized = module._is_hf_initialized
        setattr(parent, attr, new)
    return model
