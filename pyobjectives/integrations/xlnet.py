"""Drop-in acceleration of HuggingFace XLNet models."""

from __future__ import annotations

from torch import nn

from ..nn import TwoStreamRelativeAttention, _check_options


def _is_hf_xlnet_attention(module: nn.Module) -> bool:
    # Matched by class name so that importing pyobjectives does not import transformers.
    return type(module).__name__ == "XLNetRelativeAttention" and not isinstance(module, TwoStreamRelativeAttention)


def patch_xlnet(model: nn.Module, backend: str = "auto", empty_rows: str = "uniform") -> nn.Module:
    """Replace every HF ``XLNetRelativeAttention`` in ``model`` (in place) by
    :class:`pyobjectives.nn.TwoStreamRelativeAttention` on ``backend``.

    Works on any model containing XLNet layers (``XLNetModel``,
    ``XLNetLMHeadModel``, ``XLNetForSequenceClassification``, ...). Parameters
    are shared, not copied: ``state_dict`` keys and tensors are unchanged and an
    optimizer built before the patch keeps working. ``empty_rows="uniform"``
    matches HF exactly on rows whose keys are all masked. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module containing transformers XLNet layers, got "
                        f"{type(model).__name__}")
    _check_options(backend, empty_rows)
    targets = [(name, module) for name, module in model.named_modules() if _is_hf_xlnet_attention(module)]
    if not targets:
        if any(isinstance(m, TwoStreamRelativeAttention) for m in model.modules()):
            raise ValueError(f"model ({type(model).__name__}) is already patched: its XLNet attention layers are "
                             "pyobjectives TwoStreamRelativeAttention modules")
        raise ValueError(f"model ({type(model).__name__}) contains no transformers XLNetRelativeAttention module "
                         "to patch")
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, TwoStreamRelativeAttention.from_hf(module, backend=backend, empty_rows=empty_rows))
    return model
