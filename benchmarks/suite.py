"""What the suite measures: the ops, their configurations per profile, provider names and test ids.

``benchmarks/conftest.py`` turns this into pytest parameters (op x configuration x provider); the op
modules (:mod:`benchmarks.attention`, :mod:`benchmarks.rtd`, :mod:`benchmarks.lce`,
:mod:`benchmarks.e2e`) build the inputs, the providers and the oracle of one configuration.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from . import attention, e2e, lce, rtd, t5
from .common import backend_names

#: Short op names (test ids, ``--ops`` of ``python -m benchmarks.run``) -> op module.
OPS = {"attention": attention, "rtd": rtd, "lce": lce, "t5": t5.T5Attention, "xlnet": e2e.XLNetStep,
       "electra": e2e.ElectraStep, "t5_step": t5.T5Step}
#: Per op: the provider the "x ref" column divides by.
REFERENCE = {"two_stream_attention": "reference", "rtd_loss": "reference", "linear_cross_entropy": "reference",
             "t5_attention": "reference", "xlnet_step": "patched[reference]", "electra_step": "ops[reference]",
             "t5_step": "patched[reference]"}
#: Ops with a sweep plot (the first sweep of the op); steps get one bar plot together.
PLOTTED = ("attention", "rtd", "lce", "t5")
#: Per profile: seconds of timed calls per benchmark (the rounds fit it within [min_rounds, max_rounds]) and
#: warm-up rounds (untimed) before them.
TIMING = {"tiny": dict(budget_s=0.05, min_rounds=3, max_rounds=10, warmup_rounds=1),
          "cpu": dict(budget_s=0.6, min_rounds=3, max_rounds=30, warmup_rounds=1),
          "gpu": dict(budget_s=0.4, min_rounds=10, max_rounds=200, warmup_rounds=3)}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
               "bf16-autocast": "bf16amp"}


def op_name(mod) -> str:
    """The short name of an op module (``attention``, ``rtd``, ...)."""
    return next(name for name, m in OPS.items() if m is mod)


def module_of(op: str):
    """The op module of a long op name (``two_stream_attention``) or a short one (``attention``)."""
    return OPS.get(op) or next(m for m in OPS.values() if m.OP == op)


def provider_names(mod) -> list:
    """Every provider an op's ``providers(case)`` returns, in that order, known before any input exists."""
    backends = backend_names()
    if mod is attention:
        return backends + [attention.EAGER, "sdpa_content", "flex_bd"]
    if mod is rtd:
        return backends + [rtd.EAGER]
    if mod is lce:
        return backends + [lce.EAGER, "liger_flce", "cut_cross_entropy"]
    if mod is t5.T5Attention:
        return backends + [mod.EAGER, "hf_sdpa"]
    if mod is e2e.XLNetStep:
        return [mod.EAGER] + [f"patched[{b}]" for b in backends]
    if mod is t5.T5Step:
        return [mod.EAGER, "hf_sdpa"] + [f"patched[{b}]" for b in backends]
    if mod is e2e.ElectraStep:
        import pyobjectives as po
        objective = ([f"ElectraObjective[{b}]" for b in backends] if hasattr(po.nn, "ElectraObjective")
                     else ["ElectraObjective"])
        return [mod.EAGER] + [f"ops[{b}]" for b in backends] + objective
    raise KeyError(mod)


def config_id(mod, cfg: dict) -> str:
    """The readable id of one configuration, e.g. ``attention-B2-L512-H8-D64-P85-fp32``."""
    dt = SHORT_DTYPE.get(cfg.get("dtype") or cfg.get("mode"), cfg.get("dtype") or cfg.get("mode"))
    if mod is attention:
        B, L, M, H, D, P = attention.dims(cfg)
        return f"attention-B{B}-L{L}-H{H}-D{D}-P{P}" + (f"-M{M}" if M else "") + f"-{dt}"
    if mod is rtd:
        form = f"Dd{cfg['Dd']}" if cfg["Dd"] else "logits"
        return f"rtd-N{cfg['tokens']}-B{cfg['tokens'] // cfg['L']}-L{cfg['L']}-{form}-{dt}"
    if mod is lce:
        return f"lce-N{cfg['N']}-E{cfg['E']}-V{cfg['V']}-{dt}" + ("-sample" if cfg["sample"] else "")
    if mod is t5.T5Attention:
        return f"t5_attention-B{cfg['B']}-L{cfg['L']}-H{cfg['H']}-D{cfg['D']}-NB{cfg['buckets']}-{dt}"
    if mod is t5.T5Step:
        return (f"t5_step-enc{cfg['layers']}-dec{cfg['layers']}-d{cfg['d_model']}-h{cfg['heads']}-B{cfg['B']}"
                f"-L{cfg['L']}-V{cfg['vocab']}-{dt}")
    if mod is e2e.XLNetStep:
        return (f"xlnet_step-{cfg['n_layer']}x{cfg['d_model']}-h{cfg['n_head']}-B{cfg['B']}-L{cfg['L']}"
                f"-V{cfg['vocab']}-{dt}")
    if mod is e2e.ElectraStep:
        return (f"electra_step-{cfg['layers']}L-D{cfg['disc_hidden']}-G{cfg['gen_hidden']}-E{cfg['emb']}"
                f"-B{cfg['B']}-L{cfg['L']}-V{cfg['vocab']}-{dt}")
    raise KeyError(mod)


def provider_id(name: str) -> str:
    """``patched[cpu]`` -> ``patched-cpu`` (brackets inside pytest ids are hard to select with ``-k``)."""
    return re.sub(r"[\[\]]+", "-", name).strip("-")


@dataclass(repr=False)
class Param:
    """One benchmark test: an op module at one configuration on one provider."""

    mod: object
    cfg: dict
    provider: str
    sweeps: list = field(default_factory=list)
    tier: int = 2                 #: run order: 0 the first (plotted) sweep, 1 the training steps, 2 the rest
    interpreter_check: bool = False  #: Triton under TRITON_INTERPRET=1 on a tiny config: checked, never timed

    def __repr__(self) -> str:   # what pytest-benchmark's JSON shows as the parameter
        return self.id

    @property
    def op(self) -> str:
        return op_name(self.mod)

    @property
    def id(self) -> str:
        tail = "-interpreter-check" if self.interpreter_check else ""
        return f"{config_id(self.mod, self.cfg)}-{provider_id(self.provider)}{tail}"

    @property
    def group(self) -> str:
        """pytest-benchmark group: one per (op, configuration), so that its table shows providers side by side."""
        return f"{self.mod.OP}: {self.mod.label(self.cfg)}"


def params(mod, profile: str, interpreter: bool) -> list:
    """The tests of one op: each configuration once (with every sweep it belongs to), every provider;
    with ``interpreter``, one more configuration on which Triton is checked under the CPU interpreter."""
    configs = {}
    step = getattr(mod, "STEP", False)
    for index, (sweep, _x, cfgs) in enumerate(mod.sweeps(profile)):
        for cfg in cfgs:
            entry = configs.setdefault(json.dumps(cfg, sort_keys=True), [cfg, [], 2])
            entry[1].append(sweep)
            entry[2] = min(entry[2], 1 if step else (0 if index == 0 else 2))
    names = provider_names(mod)
    out = [Param(mod, cfg, name, sweeps, tier) for cfg, sweeps, tier in configs.values() for name in names]
    if interpreter and hasattr(mod, "interpreter_config") and "triton" in names:
        out.append(Param(mod, mod.interpreter_config(profile), "triton", ["interpreter check"], 3,
                         interpreter_check=True))
    return out
