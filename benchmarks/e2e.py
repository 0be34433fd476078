"""End-to-end training steps: HF XLNet patched vs unpatched, and the ELECTRA objective fused vs eager.

A step is forward + backward + ``AdamW.step()`` + ``zero_grad``, on the same
batches for every provider, each provider with its own copy of the same
initial weights. GPU runs use bf16 autocast, CPU runs float32. No FLOP count
is claimed for whole models: rows report ms per step and tokens/s.

Checks (before any optimizer step, dropout off, float32, on the first rows of
the first benchmark batch): a patched XLNet must reproduce the unpatched HF
loss and every parameter gradient; the hand-composed pyobjectives ELECTRA step
must reproduce the eager HF composition (same masking, same Philox Gumbel
noise) in its losses and every parameter gradient; so must ``ElectraObjective``,
given the same masking generator and sampling seed (an ``ElectraObjective``
without ``rng`` / ``seed`` arguments would be checked for finite losses and
gradients only). The timed eager step samples with ``torch.rand`` (what an
eager loop uses); its check uses the shared Philox noise.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch

import pyobjectives as po
from pyobjectives.backends import BACKENDS

from .common import TOLERANCE, Case, Provider, backend_names, generator, rel_err

AUTOCAST = {"bf16-autocast": torch.bfloat16, "float32": None}


def _autocast(device: str, mode: str):
    dt = AUTOCAST[mode]
    return torch.autocast(device_type=device, dtype=dt) if dt is not None else torch.autocast(device, enabled=False)


def _tolerance(mode: str) -> float:
    """Checks of whole steps run in float32 whatever ``mode`` is; a model compounds rounding across layers."""
    return TOLERANCE["float32"] * 5


def _grads_err(model_a, model_b) -> float:
    """Max over parameters of max |grad_a - grad_b| / max |grad_b|, the denominator floored at 1e-6 of the
    largest gradient of the model (analytically-zero gradients, such as attention key biases, are rounding
    noise on both sides)."""
    params_b = dict(model_b.named_parameters())
    pairs = [(p.grad, params_b[name].grad) for name, p in model_a.named_parameters()
             if p.grad is not None or params_b[name].grad is not None]
    if any(a is None or b is None for a, b in pairs):
        return math.inf
    floor = 1e-6 * max((b.abs().max().item() for _, b in pairs), default=0.0)
    err = 0.0
    for a, b in pairs:
        if not torch.isfinite(a).all():
            return math.inf
        scale = max(b.abs().max().item(), floor, 1e-30)
        err = max(err, (a.double() - b.double()).abs().max().item() / scale)
    return err


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def _transformers_reason() -> str | None:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers not importable ({exc})"
    return None


# === XLNet =========================================================================================

class XLNetStep:
    OP = "xlnet_step"
    STEP = True
    TITLE = "HF XLNet training step"
    X_KEY = "L"
    EAGER = "hf_eager"

    @staticmethod
    def sweeps(profile: str) -> list:
        if profile == "gpu":   # XLNet-base
            cfg = dict(n_layer=12, d_model=768, n_head=12, d_inner=3072, vocab=32000, L=512, B=8, mode="bf16-autocast")
        elif profile == "cpu":
            cfg = dict(n_layer=2, d_model=128, n_head=4, d_inner=512, vocab=1000, L=128, B=4, mode="float32")
        else:
            cfg = dict(n_layer=1, d_model=32, n_head=2, d_inner=64, vocab=100, L=32, B=2, mode="float32")
        return [("step", "L", [cfg])]

    @staticmethod
    def label(cfg: dict) -> str:
        return (f"XLNet {cfg['n_layer']}x{cfg['d_model']} h{cfg['n_head']} B={cfg['B']} L={cfg['L']} "
                f"V={cfg['vocab']} {cfg['mode']}")

    @staticmethod
    def _batch(cfg: dict, device: str, seed: int) -> dict:
        g = generator(seed)
        ids = torch.randint(5, cfg["vocab"], (cfg["B"], cfg["L"]), generator=g)
        ranks = po.data.plm_ranks(ids, style="hf", generator=g)
        perm_mask = po.data.ranks_to_dense_mask(ranks.q_rank, ranks.k_rank).float()
        B, P = ranks.target_pos.shape
        tm = torch.zeros(B, P, cfg["L"])
        valid = ranks.target_pos >= 0
        b_idx, p_idx = torch.nonzero(valid, as_tuple=True)
        tm[b_idx, p_idx, ranks.target_pos[valid]] = 1.0
        return {k: v.to(device) for k, v in dict(input_ids=ids, perm_mask=perm_mask, target_mapping=tm,
                                                  labels=ranks.labels).items()}

    @classmethod
    def make_case(cls, cfg: dict, device: str, profile: str) -> Case:
        from transformers import XLNetConfig, XLNetLMHeadModel
        torch.manual_seed(0)
        config = XLNetConfig(vocab_size=cfg["vocab"], d_model=cfg["d_model"], n_layer=cfg["n_layer"],
                             n_head=cfg["n_head"], d_inner=cfg["d_inner"], dropout=0.1, mem_len=None)
        base = XLNetLMHeadModel(config)
        sets = [cls._batch(cfg, device, seed=4000 + i) for i in range(2)]
        case = Case(op=cls.OP, config=cfg, label=cls.label(cfg), sets=sets, grad_names=[], dtype="float32",
                    device=device, tokens=cfg["B"] * cfg["L"], step=True)
        case.extra.update(base=base, hf_check=None)
        return case

    @staticmethod
    def _loss(model, batch, device, mode):
        with _autocast(device, mode):
            return model(**batch).loss

    @classmethod
    def _check_batch(cls, case):
        rows = min(2, case.config["B"])
        return {k: v[:rows] for k, v in case.sets[0].items()}

    @classmethod
    def _hf_check(cls, case):
        """Unpatched HF loss and gradients on the check batch (float32, dropout off), computed once."""
        if case.extra["hf_check"] is None:
            model = copy.deepcopy(case.extra["base"]).to(case.device).eval()
            loss = cls._loss(model, cls._check_batch(case), case.device, "float32")
            loss.backward()
            case.extra["hf_check"] = (loss.detach(), model)
        return case.extra["hf_check"]

    MODEL = "XLNetLMHeadModel"

    @staticmethod
    def _patch(model, backend):
        return po.integrations.patch_xlnet(model, backend=backend)

    @classmethod
    def _provider(cls, case: Case, name: str, backend: str | None, impl: str | None = None) -> Provider:
        """HF's model (``backend=None``, with ``attn_implementation=impl`` when given) or the patched one."""
        prov = Provider(name, "eager" if backend is None else "pyobjectives",
                        note=f"unpatched transformers {cls.MODEL}" + (f" ({impl})" if impl else "")
                        if backend is None else f"{cls._patch.__name__}(model, backend={backend!r})")
        state = {}

        def setup():
            model = copy.deepcopy(case.extra["base"]).to(case.device)
            if impl is not None:
                model.config._attn_implementation = impl
            if backend is not None:
                cls._patch(model, backend)
            state.update(model=model, opt=_optimizer(model))

            def step(batch):
                loss = cls._loss(state["model"], batch, case.device, case.config["mode"])
                loss.backward()
                state["opt"].step()
                state["opt"].zero_grad(set_to_none=True)
                return loss.detach()
            return step

        def check():
            want_loss, want_model = cls._hf_check(case)
            model = state["model"].eval()
            try:
                loss = cls._loss(model, cls._check_batch(case), case.device, "float32")
                loss.backward()
                err = max(rel_err(loss.detach(), want_loss), _grads_err(model, want_model))
            finally:
                model.zero_grad(set_to_none=True)
                model.train()
            return err, _tolerance(case.config["mode"]), "loss + every parameter grad vs unpatched HF (fp32, eval)"

        prov.setup, prov.check, prov.release = setup, check, state.clear
        return prov

    @classmethod
    def providers(cls, case: Case) -> list:
        reason = _transformers_reason()
        out = []
        hf = cls._provider(case, cls.EAGER, None)
        hf.reason = reason
        out.append(hf)
        for name in backend_names():
            prov = cls._provider(case, f"patched[{name}]", name)
            reasons = BACKENDS[name].op_reasons("two_stream_attention")
            prov.reason = reason or ("; ".join(reasons) if reasons else None)
            if name == "triton" and case.device == "cpu" and not reasons:
                prov.reason = "Triton CPU interpreter: the kernels are checked per op, not run in a model"
            out.append(prov)
        return out


# === ELECTRA =======================================================================================

class ElectraStep:
    OP = "electra_step"
    STEP = True
    TITLE = "ELECTRA objective step"
    X_KEY = "L"
    EAGER = "hf_eager"
    MASK_ID, SPECIALS = 4, (0, 1, 2, 3)

    @staticmethod
    def sweeps(profile: str) -> list:
        if profile == "gpu":   # ELECTRA-Small (google-research/electra: generator hidden = 1/4 of 256)
            cfg = dict(layers=12, disc_hidden=256, disc_heads=4, disc_inner=1024, gen_hidden=64, gen_heads=1,
                       gen_inner=256, emb=128, vocab=30522, L=128, B=128, mode="bf16-autocast")
        elif profile == "cpu":
            cfg = dict(layers=2, disc_hidden=128, disc_heads=2, disc_inner=256, gen_hidden=32, gen_heads=1,
                       gen_inner=128, emb=64, vocab=8192, L=128, B=8, mode="float32")
        else:
            cfg = dict(layers=1, disc_hidden=32, disc_heads=2, disc_inner=64, gen_hidden=16, gen_heads=1,
                       gen_inner=32, emb=16, vocab=101, L=32, B=2, mode="float32")
        return [("step", "L", [cfg])]

    @staticmethod
    def label(cfg: dict) -> str:
        return (f"ELECTRA {cfg['layers']}L D{cfg['disc_hidden']}/G{cfg['gen_hidden']} E{cfg['emb']} "
                f"B={cfg['B']} L={cfg['L']} V={cfg['vocab']} {cfg['mode']}")

    @classmethod
    def _batch(cls, cfg: dict, device: str, seed: int) -> dict:
        g = generator(seed)
        B, L = cfg["B"], cfg["L"]
        ids = torch.randint(len(cls.SPECIALS) + 1, cfg["vocab"], (B, L), generator=g)
        lengths = torch.randint(L // 2, L + 1, (B, 1), generator=g)
        mask = (torch.arange(L)[None, :] < lengths).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        return dict(input_ids=ids.to(device), attention_mask=mask.to(device), seed=seed)

    @classmethod
    def make_case(cls, cfg: dict, device: str, profile: str) -> Case:
        from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining
        torch.manual_seed(0)
        common = dict(vocab_size=cfg["vocab"], embedding_size=cfg["emb"], num_hidden_layers=cfg["layers"],
                      max_position_embeddings=max(512, cfg["L"]))
        disc = ElectraForPreTraining(ElectraConfig(hidden_size=cfg["disc_hidden"],
                                                   num_attention_heads=cfg["disc_heads"],
                                                   intermediate_size=cfg["disc_inner"], **common))
        gen = ElectraForMaskedLM(ElectraConfig(hidden_size=cfg["gen_hidden"], num_attention_heads=cfg["gen_heads"],
                                               intermediate_size=cfg["gen_inner"], **common))
        gen.electra.embeddings = disc.electra.embeddings      # ELECTRA shares the embeddings
        gen.generator_lm_head.weight = disc.electra.embeddings.word_embeddings.weight
        pair = torch.nn.ModuleDict(dict(gen=gen, disc=disc))
        sets = [cls._batch(cfg, device, seed=5000 + i) for i in range(2)]
        case = Case(op=cls.OP, config=cfg, label=cls.label(cfg), sets=sets, grad_names=[], dtype="float32",
                    device=device, tokens=cfg["B"] * cfg["L"], step=True)
        case.extra.update(base=pair, eager_check=None)
        return case

    @classmethod
    def _mask(cls, batch):
        """ELECTRA masking with a generator on the batch's device seeded by the batch (as ElectraObjective does
        when given ``rng``), so that every provider masks the same positions."""
        ids = batch["input_ids"]
        g = torch.Generator(device=ids.device).manual_seed(batch["seed"])
        m = po.data.electra_mask(ids, mask_token_id=cls.MASK_ID, special_token_ids=list(cls.SPECIALS),
                                 attention_mask=batch["attention_mask"], generator=g)
        return m.input_ids, m.labels, m.is_target

    @classmethod
    def eager_losses(cls, pair, batch, mode, philox_noise: bool):
        """Eager composition of HF's heads: full ``[B, L, V]`` generator logits and HF's MLM loss, Gumbel-max
        sampling at the masked rows, HF's discriminator with its BCE loss."""
        gen, disc = pair["gen"], pair["disc"]
        ids, am = batch["input_ids"], batch["attention_mask"]
        device = ids.device.type
        masked, labels, target = cls._mask(batch)
        with _autocast(device, mode):
            g_out = gen(input_ids=masked, attention_mask=am, labels=labels)
        with torch.no_grad():
            logits = g_out.logits[target].float()
            N, V = logits.shape
            if philox_noise:
                noise = po.reference.gumbel_noise(batch["seed"], torch.arange(N, device=logits.device), V)
            else:
                noise = -torch.log(-torch.log(torch.rand(N, V, device=logits.device).clamp_(min=1e-20)))
            sampled = (logits + noise).argmax(1)
        corrupted = ids.clone()
        corrupted[target] = sampled
        with _autocast(device, mode):
            d_out = disc(input_ids=corrupted, attention_mask=am, labels=(corrupted != ids).long())
        return g_out.loss, d_out.loss

    @classmethod
    def ops_losses(cls, pair, batch, mode, backend):
        """The same objective composed from pyobjectives ops: the generator head only at the masked rows, fused
        linear-CE + sampling (shared Philox noise), fused RTD loss with the discriminator's last projection."""
        gen, disc = pair["gen"], pair["disc"]
        ids, am = batch["input_ids"], batch["attention_mask"]
        device = ids.device.type
        masked, labels, target = cls._mask(batch)
        cast = AUTOCAST[mode]
        with _autocast(device, mode):
            hidden = gen.electra(input_ids=masked, attention_mask=am).last_hidden_state
            h = gen.generator_predictions(hidden[target])
        weight, bias = gen.generator_lm_head.weight, gen.generator_lm_head.bias
        if cast is not None:
            h, weight, bias = h.to(cast), weight.to(cast), bias.to(cast)
        else:
            h = h.float()
        gen_loss, sampled = po.linear_cross_entropy(h, weight, labels[target], bias, sample=True, seed=batch["seed"],
                                                    backend=backend)
        corrupted = ids.clone()
        corrupted[target] = sampled
        head = disc.discriminator_predictions
        with _autocast(device, mode):
            d_hidden = disc.electra(input_ids=corrupted, attention_mask=am).last_hidden_state
            x = head.activation(head.dense(d_hidden))
        rtd = po.rtd_loss(x, corrupted, ids, am, head_weight=head.dense_prediction.weight[0].to(x.dtype),
                          head_bias=head.dense_prediction.bias[0].to(x.dtype), backend=backend)
        return gen_loss, rtd

    @classmethod
    def _check_batch(cls, case):
        rows = min(2, case.config["B"])
        b = case.sets[0]
        return dict(input_ids=b["input_ids"][:rows], attention_mask=b["attention_mask"][:rows], seed=b["seed"])

    @classmethod
    def _eager_check(cls, case):
        if case.extra["eager_check"] is None:
            pair = copy.deepcopy(case.extra["base"]).to(case.device).eval()
            g_loss, d_loss = cls.eager_losses(pair, cls._check_batch(case), "float32", philox_noise=True)
            (g_loss + 50.0 * d_loss).backward()
            case.extra["eager_check"] = (torch.stack([g_loss, d_loss]).detach(), pair)
        return case.extra["eager_check"]

    @classmethod
    def _provider(cls, case: Case, name: str, kind: str, losses, checked: str) -> Provider:
        prov = Provider(name, kind)
        state = {}
        mode = case.config["mode"]

        def setup():
            pair = copy.deepcopy(case.extra["base"]).to(case.device)
            state.update(pair=pair, opt=_optimizer(pair), losses=losses(pair))

            def step(batch):
                g_loss, d_loss = state["losses"](batch, mode, False)
                total = g_loss + 50.0 * d_loss
                total.backward()
                state["opt"].step()
                state["opt"].zero_grad(set_to_none=True)
                return total.detach()
            return step

        def check():
            pair = state["pair"].eval()
            try:
                g_loss, d_loss = state["losses"](cls._check_batch(case), "float32", True)
                (g_loss + 50.0 * d_loss).backward()
                got = torch.stack([g_loss, d_loss]).detach()
                if checked == "finite":
                    finite = bool(torch.isfinite(got).all()) and all(
                        torch.isfinite(p.grad).all() for p in pair.parameters() if p.grad is not None)
                    return (0.0 if finite else math.inf), 0.0, "losses and grads finite (own masking)"
                want, want_pair = cls._eager_check(case)
                err = max(rel_err(got, want), _grads_err(pair, want_pair))
                return err, _tolerance(mode), "both losses + every parameter grad vs eager HF heads (fp32, eval)"
            finally:
                pair.zero_grad(set_to_none=True)
                pair.train()

        prov.setup, prov.check, prov.release = setup, check, state.clear
        return prov

    @classmethod
    def providers(cls, case: Case) -> list:
        reason = _transformers_reason()
        out = []
        eager = cls._provider(case, cls.EAGER, "eager",
                              lambda pair: (lambda b, mode, philox: cls.eager_losses(pair, b, mode, philox)), "eager")
        eager.note = "HF ElectraForMaskedLM (full [B, L, V] logits) + Gumbel-max + ElectraForPreTraining"
        eager.reason = reason
        out.append(eager)
        for name in backend_names():
            reasons = [r for op in ("linear_cross_entropy", "rtd_loss") for r in BACKENDS[name].op_reasons(op)]
            prov = cls._provider(case, f"ops[{name}]", "pyobjectives",
                                 lambda pair, name=name: (lambda b, mode, philox: cls.ops_losses(pair, b, mode, name)),
                                 "eager")
            prov.note = f"HF bodies + po.linear_cross_entropy / po.rtd_loss (backend={name!r}) at masked rows"
            prov.reason = reason or ("; ".join(dict.fromkeys(reasons)) if reasons else None)
            if name == "triton" and case.device == "cpu" and not reasons:
                prov.reason = "Triton CPU interpreter: the kernels are checked per op, not run in a model"
            out.append(prov)
        out.extend(cls._objective_providers(case, reason))
        return out

    @classmethod
    def _objective_providers(cls, case: Case, reason: str | None) -> list:
        objective = getattr(po.nn, "ElectraObjective", None)
        if objective is None:
            return [Provider("ElectraObjective", "pyobjectives",
                             reason="pyobjectives.nn.ElectraObjective does not exist yet (issue 4)")]
        params = inspect.signature(objective).parameters
        call_params = inspect.signature(objective.forward).parameters
        exact = "rng" in call_params and "seed" in call_params
        out = []
        for name in backend_names():
            reasons = [r for op in ("linear_cross_entropy", "rtd_loss") for r in BACKENDS[name].op_reasons(op)]

            def losses(pair, name=name):
                kwargs = dict(gen_weight=1.0, disc_weight=50.0, mask_prob=0.15, temperature=1.0, backend=name,
                              mask_token_id=cls.MASK_ID, special_token_ids=list(cls.SPECIALS))
                obj = objective(pair["gen"], pair["disc"], **{k: v for k, v in kwargs.items() if k in params})

                def run(batch, mode, philox):
                    ids = batch["input_ids"]
                    extra = {}
                    if exact:   # same masking generator and sampling seed as the other providers
                        extra = dict(rng=torch.Generator(device=ids.device).manual_seed(batch["seed"]),
                                     seed=batch["seed"])
                    with _autocast(ids.device.type, mode):
                        result = obj(ids, attention_mask=batch["attention_mask"], **extra)
                    return _objective_parts(result)
                return run
            prov = cls._provider(case, f"ElectraObjective[{name}]", "pyobjectives", losses,
                                 "eager" if exact else "finite")
            prov.note = "pyobjectives.nn.ElectraObjective" + (" (masking rng and sampling seed passed in)" if exact
                                                              else " (own masking and sampling)")
            prov.reason = reason or ("; ".join(dict.fromkeys(reasons)) if reasons else None)
            if name == "triton" and case.device == "cpu" and not reasons:
                prov.reason = "Triton CPU interpreter: the kernels are checked per op, not run in a model"
            out.append(prov)
        return out


def _objective_parts(result):
    """``(gen_loss, disc_loss)`` (unweighted) from ElectraObjective's output; ``(loss / 50, 0)`` is never
    guessed: an output without both parts raises."""
    get = (lambda k: result.get(k)) if isinstance(result, dict) else (lambda k: getattr(result, k, None))
    g, d = get("gen_loss"), get("disc_loss")
    if isinstance(g, torch.Tensor) and isinstance(d, torch.Tensor):
        return g, d
    raise TypeError(f"ElectraObjective's output {type(result).__name__} has no gen_loss / disc_loss tensors")


__all__ = ["XLNetStep", "ElectraStep"]
