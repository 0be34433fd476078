"""ELECTRA's pretraining objective as one module: masking, generator MLM with sampling, RTD.

See :class:`ElectraObjective`; ``docs/electra_objective.md`` is the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from . import _checks as check
from . import functional as F
from .backends import BACKEND_NAMES, resolve
from .data import electra_mask
from .reference.philox import draw_seed

__all__ = ["ElectraObjective", "ElectraObjectiveOutput"]


@dataclass
class ElectraObjectiveOutput:
    """What :meth:`ElectraObjective.forward` returns.

    ``loss = gen_weight * gen_loss + disc_weight * disc_loss`` (the one to backpropagate);
    ``gen_loss``: the generator's MLM cross-entropy, mean over targets; ``disc_loss``: the
    RTD loss, token mean over real tokens (both unweighted). ``stats``: 0-dim float32 tensors
    (no gradient) ``gen_accuracy`` (argmax == original at targets), ``gen_sampled_accuracy``
    (sample == original), ``disc_accuracy``, ``disc_precision``, ``disc_recall`` (of
    "replaced"), ``replaced`` (replaced real tokens), ``tokens`` (real tokens), ``targets``
    (generator targets). ``corrupted_ids [B, L]`` is the discriminator's input,
    ``is_target [B, L]`` the generator targets, ``sampled_ids [B, L]`` int64 the generator's
    sample at each target and -100 elsewhere (as labels).
    """

    loss: torch.Tensor
    gen_loss: torch.Tensor
    disc_loss: torch.Tensor
    stats: dict = field(default_factory=dict)
    corrupted_ids: Optional[torch.Tensor] = None
    is_target: Optional[torch.Tensor] = None
    sampled_ids: Optional[torch.Tensor] = None


def _is_hf_generator(m) -> bool:
    return all(hasattr(m, a) for a in ("electra", "generator_predictions", "generator_lm_head"))


def _is_hf_discriminator(m) -> bool:
    return hasattr(m, "electra") and hasattr(m, "discriminator_predictions")


def _last_hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is not None:
        return hidden
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError("a generator / discriminator body must return hidden states: a tensor [B, L, H], a tuple "
                    f"starting with one, or an object with .last_hidden_state; got {type(out).__name__}")


class ElectraObjective(nn.Module):
    """ELECTRA pretraining loss (Clark et al., 2020) for a generator and a discriminator.

    ``forward(input_ids, attention_mask)`` does, per batch:

    1. masking with :func:`pyobjectives.data.electra_mask` (ELECTRA's exact count of targets
       per sequence, 85% ``[MASK]``; ``masking="bert"`` for 80/10/10 Bernoulli);
    2. the generator body on the masked ids, then its head (dense + GELU + LayerNorm) at the
       target positions only;
    3. :func:`pyobjectives.linear_cross_entropy` against the generator's output embedding
       (tied to the shared token embeddings) with Gumbel-max sampling at ``temperature``
       (the ``[n, V]`` logits are never stored on fused backends);
    4. the corrupted ids (targets replaced by the samples; a sample equal to the original
       counts as original), the discriminator body on them, its dense + activation, and
       :func:`pyobjectives.rtd_loss` with the final projection folded in.

    ``loss = gen_weight * MLM + disc_weight * RTD``; no gradient flows through sampling.

    ``generator`` / ``discriminator``: HF ``ElectraForMaskedLM`` / ``ElectraForPreTraining``
    (their bodies ``.electra`` and heads are used; with ``tie_embeddings=True``, the default,
    the generator's embedding layer -- token, position, type embeddings and their LayerNorm --
    is replaced by the discriminator's, as in the ELECTRA paper, and the generator's output
    embedding re-tied to it), or plain modules called as ``module(input_ids,
    attention_mask=...)`` that return hidden states. For plain modules give
    ``gen_output_weight`` ([V, E], e.g. the shared embedding matrix; defaults to
    ``generator.get_input_embeddings().weight``), optionally ``gen_output_bias`` [V] and
    ``gen_head`` (module on the target rows, default identity), and ``disc_output`` (an
    ``nn.Linear(Dd, 1)``) with optional ``disc_head`` (default identity).

    ``mask_token_id`` is required unless ``generator.config.mask_token_id`` exists;
    ``special_token_ids`` (e.g. [CLS], [SEP], [PAD]) are never targets (defaults to the
    config's pad / bos / eos / sep / cls ids when present). ``disallow_correct=True``
    excludes the original token from sampling (ELECTRA's option, default off).
    ``backend`` is passed to both fused ops.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, gen_weight: float = 1.0,
                 disc_weight: float = 50.0, mask_prob: float = 0.15, temperature: float = 1.0, *,
                 mask_token_id: int | None = None, special_token_ids: Sequence[int] | None = None,
                 max_predictions: int | None = None, replace_with_mask: float | None = None,
                 masking: str = "electra", disallow_correct: bool = False, tie_embeddings: bool = True,
                 backend: str = "auto", gen_head: nn.Module | None = None,
                 gen_output_weight: torch.Tensor | None = None, gen_output_bias: torch.Tensor | None = None,
                 disc_head: nn.Module | None = None, disc_output: nn.Module | None = None):
        super().__init__()
        check.number("gen_weight", gen_weight)
        check.number("disc_weight", disc_weight)
        check.number("mask_prob", mask_prob, low=0.0, high=1.0, high_open=False)
        check.number("temperature", temperature, low=0.0, low_open=True)
        check.choice("masking", masking, ("electra", "bert"))
        check.choice("backend", backend, BACKEND_NAMES)
        for name, m in (("generator", generator), ("discriminator", discriminator)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module (an HF ELECTRA model or a module returning hidden "
                                f"states), got {type(m).__name__}")
        if max_predictions is not None:
            check.number("max_predictions", max_predictions, low=1, high=None, integer=True)
        if replace_with_mask is not None:
            check.number("replace_with_mask", replace_with_mask, low=0.0, high=1.0, high_open=False)
        check.flag("disallow_correct", disallow_correct)
        check.flag("tie_embeddings", tie_embeddings)
        self.generator, self.discriminator = generator, discriminator
        self.gen_weight, self.disc_weight = float(gen_weight), float(disc_weight)
        self.mask_prob, self.temperature = float(mask_prob), float(temperature)
        self.max_predictions, self.replace_with_mask, self.masking = max_predictions, replace_with_mask, masking
        self.disallow_correct, self.backend = bool(disallow_correct), backend

        gen_cfg = getattr(generator, "config", None)
        if mask_token_id is None:
            mask_token_id = getattr(gen_cfg, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError("mask_token_id is required (the id of [MASK]; the generator's config has none)")
        check.number("mask_token_id", mask_token_id, low=0, high=None, integer=True)
        self.mask_token_id = int(mask_token_id)
        if special_token_ids is None:
            special_token_ids = sorted({i for i in (getattr(gen_cfg, n, None) for n in (
                "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")) if i is not None})
        elif isinstance(special_token_ids, (str, bytes, torch.Tensor)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in special_token_ids):
            raise TypeError(f"special_token_ids must be a sequence of ints, got {special_token_ids!r}")
        self.special_token_ids = [int(i) for i in special_token_ids]

        self._hf_gen = _is_hf_generator(generator)
        self._hf_disc = _is_hf_discriminator(discriminator)
        if self._hf_gen and self._hf_disc and tie_embeddings:
            self._share_embeddings(generator, discriminator)
        # Pieces that already belong to the generator / discriminator are kept as references
        # (not registered again, so state_dict has each parameter once); pieces given here are
        # registered as submodules / parameters of this module.
        refs = {}
        if gen_head is not None:
            self.gen_head = gen_head
        else:
            refs["gen_head"] = generator.generator_predictions if self._hf_gen else nn.Identity()
        if self._hf_gen and gen_output_weight is None:
            refs["gen_output"] = generator.generator_lm_head
        else:
            if gen_output_weight is None:
                if not hasattr(generator, "get_input_embeddings"):
                    raise ValueError("a plain generator module needs gen_output_weight [V, E] (the shared embeddings)")
                gen_output_weight = generator.get_input_embeddings().weight
            owned = {id(p) for p in list(generator.parameters()) + list(discriminator.parameters())}
            out = nn.Module()
            for name, t in (("weight", gen_output_weight), ("bias", gen_output_bias)):
                if t is None or (isinstance(t, nn.Parameter) and id(t) not in owned):
                    setattr(out, name, t)
                else:
                    refs["gen_output_" + name] = t
            self.gen_output = out
        if disc_head is not None:
            self.disc_head = disc_head
        elif self._hf_disc:
            preds = discriminator.discriminator_predictions
            refs["disc_head"] = nn.Sequential(preds.dense, preds.activation)
        else:
            refs["disc_head"] = nn.Identity()
        if disc_output is not None:
            self.disc_output = disc_output
        elif self._hf_disc:
            refs["disc_output"] = discriminator.discriminator_predictions.dense_prediction
        else:
            raise ValueError("a plain discriminator module needs disc_output (an nn.Linear(Dd, 1))")
        object.__setattr__(self, "_refs", refs)
        self._check_heads()

    def _check_heads(self) -> None:
        weight, bias = self._gen_output()
        name = "gen_output_weight" if "gen_output" not in self._refs else "generator.generator_lm_head.weight"
        check.tensor(name, weight, [("V", None), ("E", None)], kind="float")
        if weight.shape[0] == 0:
            raise ValueError(f"{name} must have at least one row (V >= 1), got {tuple(weight.shape)}")
        bias_name = "gen_output_bias" if "gen_output" not in self._refs else "generator.generator_lm_head.bias"
        check.optional(bias_name, bias, [("V", weight.shape[0])], kind="float", device=weight.device)
        out = self._piece("disc_output")
        w = getattr(out, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != 1:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(out).__name__
            raise ValueError(f"disc_output must be a linear layer with one output (nn.Linear(Dd, 1), weight [1, Dd]), "
                             f"got {got}")

    def _piece(self, name):
        return self._refs[name] if name in self._refs else getattr(self, name)

    @staticmethod
    def _share_embeddings(generator, discriminator) -> None:
        g_emb, d_emb = generator.electra.embeddings, discriminator.electra.embeddings
        if g_emb is d_emb:
            return
        g_w, d_w = g_emb.word_embeddings.weight, d_emb.word_embeddings.weight
        if g_w.shape != d_w.shape:
            raise ValueError(f"tie_embeddings=True needs the same embedding table shape in both models, got generator "
                             f"{tuple(g_w.shape)} and discriminator {tuple(d_w.shape)} (set embedding_size equal, or "
                             "pass tie_embeddings=False)")
        tied_head = generator.generator_lm_head.weight is g_w
        generator.electra.embeddings = d_emb
        if tied_head:
            generator.generator_lm_head.weight = d_emb.word_embeddings.weight

    # --- pieces -----------------------------------------------------------------------------

    def _body(self, model, hf: bool, input_ids, attention_mask, token_type_ids):
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return _last_hidden((model.electra if hf else model)(input_ids, **kwargs))

    def _gen_output(self):
        if "gen_output" in self._refs:
            lm_head = self._refs["gen_output"]
            return lm_head.weight, lm_head.bias
        weight = self._refs.get("gen_output_weight", getattr(self.gen_output, "weight", None))
        bias = self._refs.get("gen_output_bias", getattr(self.gen_output, "bias", None))
        return weight, bias

    def _max_targets_per_row(self, length: int) -> int:
        """An upper bound on the targets of one row, known from shapes alone."""
        if self.masking == "bert":
            return length  # Bernoulli targets: any candidate may be one
        # electra_mask takes round(num_real * mask_prob) in float32, num_real <= length; the ceiling of the
        # product (nudged up past float32 rounding) is never below it
        bound = max(1, min(length, math.ceil(length * self.mask_prob * (1 + 2**-20))))
        return bound if self.max_predictions is None else min(bound, self.max_predictions)

    def _target_rows(self, is_target):
        """``(rows, valid)``: flat ``[B * L]`` indices of the targets in row-major order (the order of
        ``input_ids[is_target]``), then padding up to a size known from shapes, and which are targets.

        With the electra masking (exact counts per row) the padding is the rows' rounding slack and any
        padding tokens, and the selection needs no host synchronisation and no data-dependent shape, so
        torch.compile traces it into the graph. Generator rows past the targets are ignored by the loss
        (target -100); their samples are dropped. The sampling noise is keyed on the row, and the
        targets keep their rows, so samples do not depend on the padding. With the bert masking the
        bound is every token: eager mode then keeps only the targets (a host read of their count)."""
        B, L = is_target.shape
        flat = is_target.reshape(-1)
        # stable: targets first, each group in row-major order
        order = torch.argsort((~flat).to(torch.int8), stable=True)
        if self.masking == "bert" and not torch.compiler.is_compiling():
            count = int(flat.sum())
        else:
            count = B * self._max_targets_per_row(L)
        rows = order[:count]
        return rows, flat[rows]

    def _generator_step(self, hidden, targets, original, seed):
        weight, bias = self._gen_output()
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
        inputs = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, ignore_index=-100,
                      reduction="mean", sample=True, temperature=self.temperature, seed=seed,
                      disallow=original if self.disallow_correct else None)
        name, impl = resolve("linear_cross_entropy", self.backend, inputs)
        if name in ("triton", "cpu", "cuda"):
            loss, sampled, argmax = impl(**inputs, return_argmax=True)
        else:
            loss, sampled = impl(**inputs)
            with torch.no_grad():  # the reference materialises the logits anyway; bounded chunks here
                argmax = torch.cat([(h @ weight.t() + (0 if bias is None else bias)).argmax(1)
                                    for h in hidden.detach().split(1024)]) if hidden.shape[0] else sampled
        return loss, sampled, argmax

    # --- forward ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, special_tokens_mask: torch.Tensor | None = None, *,
                rng: torch.Generator | None = None, seed: int | None = None) -> ElectraObjectiveOutput:
        """``input_ids [B, L]`` (original text), ``attention_mask [B, L]`` (1 = real token),
        optional ``token_type_ids``, ``special_tokens_mask`` (1 = never a target). ``rng``: a
        ``torch.Generator`` for the masking; ``seed``: the sampling seed (drawn from torch's
        generator when None). Returns :class:`ElectraObjectiveOutput`."""
        seed = draw_seed() if seed is None else check.seed(seed)
        if rng is not None and not isinstance(rng, torch.Generator):
            raise TypeError(f"rng must be a torch.Generator or None, got {type(rng).__name__}")
        if isinstance(input_ids, torch.Tensor):
            if rng is not None and rng.device.type != input_ids.device.type:
                raise ValueError(f"rng must be on input_ids' device type {input_ids.device.type!r}, got a generator "
                                 f"on {rng.device.type!r}")
            if input_ids.dim() == 2:
                check.optional("token_type_ids", token_type_ids, [("B", input_ids.shape[0]), ("L", input_ids.shape[1])],
                               kind="int", device=input_ids.device)
        m = electra_mask(input_ids, mask_token_id=self.mask_token_id, special_tokens_mask=special_tokens_mask,
                         special_token_ids=self.special_token_ids, attention_mask=attention_mask,
                         mask_prob=self.mask_prob, max_predictions=self.max_predictions,
                         replace_with_mask=self.replace_with_mask, style=self.masking, generator=rng,
                         vocab_size=self._gen_output()[0].shape[0])
        check.int_range("input_ids", input_ids, 0, self._gen_output()[0].shape[0],
                        what=" (ids must index the generator's output embedding)")
        is_target = m.is_target
        rows, valid = self._target_rows(is_target)
        original = input_ids.reshape(-1)[rows]
        targets = torch.where(valid, original.long(), -100)

        gen_hidden = self._body(self.generator, self._hf_gen, m.input_ids, attention_mask, token_type_ids)
        gen_hidden = self._piece("gen_head")(gen_hidden.reshape(-1, gen_hidden.shape[-1])[rows])
        gen_loss, sampled, argmax = self._generator_step(gen_hidden, targets, original.long(), seed)

        replacement = torch.where(valid, sampled.to(input_ids.dtype), original)
        corrupted = input_ids.reshape(-1).scatter(0, rows, replacement).view_as(input_ids)
        disc_hidden = self._piece("disc_head")(self._body(self.discriminator, self._hf_disc, corrupted, attention_mask,
                                                token_type_ids))
        disc_output = self._piece("disc_output")
        w_out, b_out = disc_output.weight, disc_output.bias
        disc_loss, rtd = F.rtd_loss(disc_hidden, corrupted, input_ids, attention_mask,
                                    head_weight=w_out.reshape(-1).to(disc_hidden.dtype),
                                    head_bias=None if b_out is None else b_out.reshape(()).to(disc_hidden.dtype),
                                    return_stats=True, backend=self.backend)
        loss = self.gen_weight * gen_loss + self.disc_weight * disc_loss
        # a fill, not torch.tensor(..., device=): a host-to-device copy would wait for the device
        n = valid.sum().float()
        with torch.no_grad():
            stats = {
                "gen_accuracy": (argmax == targets).sum().float() / n.clamp(min=1),
                "gen_sampled_accuracy": (sampled == targets).sum().float() / n.clamp(min=1),
                "disc_accuracy": rtd["accuracy"], "disc_precision": rtd["precision"],
                "disc_recall": rtd["recall"], "replaced": rtd["replaced"], "tokens": rtd["tokens"],
                "targets": n,
            }
        sampled_ids = torch.full_like(input_ids, -100, dtype=torch.long).reshape(-1).scatter(
            0, rows, torch.where(valid, sampled, -100)).view_as(input_ids)
        return ElectraObjectiveOutput(loss=loss, gen_loss=gen_loss, disc_loss=disc_loss, stats=stats,
                                      corrupted_ids=corrupted, is_target=is_target, sampled_ids=sampled_ids)
