"""pyobjectives.nn.ElectraObjective against a pure-PyTorch composition of HF's own Electra heads
(full logits, Gumbel-max with the same noise, HF's MLM and RTD losses), on the reference and the
triton backends; plain modules; and a 50-step training run on a generated corpus.

Tiny random-init configs only (no downloads). The triton cases run on the CPU interpreter here.
"""

import copy

import pytest
import torch
from conftest import assert_policy
from torch import nn

from pyobjectives import reference
from pyobjectives.backends import BACKENDS
from pyobjectives.data import electra_mask
from pyobjectives.nn import ElectraObjective

transformers = pytest.importorskip("transformers", reason="the HF tests need transformers")
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining  # noqa: E402

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = [PAD, CLS, SEP]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _triton_reasons():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return [f"Triton is not importable ({exc})"]
    return BACKENDS["triton"].op_reasons("linear_cross_entropy") + BACKENDS["triton"].op_reasons("rtd_loss")


def _cpu_reasons():
    return BACKENDS["cpu"].op_reasons("linear_cross_entropy")


BACKEND_PARAMS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    bool(_triton_reasons()), reason="triton backend unavailable: " + "; ".join(_triton_reasons()))),
    pytest.param("cpu", marks=pytest.mark.skipif(bool(_cpu_reasons()), reason="; ".join(_cpu_reasons())))]


def hf_pair(V=97, L=24, E=16, Hg=16, Hd=32):
    common = dict(vocab_size=V, embedding_size=E, max_position_embeddings=L, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, attn_implementation="eager", pad_token_id=PAD)
    gen = ElectraForMaskedLM(ElectraConfig(hidden_size=Hg, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=2 * Hg, **common))
    disc = ElectraForPreTraining(ElectraConfig(hidden_size=Hd, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=2 * Hd, **common))
    return gen, disc


def batch(B=3, L=20, V=97):
    ids = torch.randint(4, V, (B, L))
    ids[:, 0] = CLS
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 13:] = 0
    ids[1, 12] = SEP
    ids[1, 13:] = PAD
    ids[[0, 2], -1] = SEP
    return ids, am


def hf_composition(obj, ids, am, rng_seed, seed):
    """HF's own forward passes and losses; Gumbel-max over the full logits with the reference noise."""
    gen, disc = obj.generator, obj.discriminator
    m = electra_mask(ids, mask_token_id=MASK, special_token_ids=SPECIAL, attention_mask=am, mask_prob=obj.mask_prob,
                     generator=torch.Generator().manual_seed(rng_seed))
    g = gen(input_ids=m.input_ids, attention_mask=am, labels=m.labels)
    logits = g.logits[m.is_target]
    noise = reference.gumbel_noise(seed, torch.arange(logits.shape[0]), logits.shape[1])
    sampled = (logits.detach().float() / obj.temperature + noise).argmax(1)
    corrupted = ids.masked_scatter(m.is_target, sampled)
    d = disc(input_ids=corrupted, attention_mask=am, labels=(corrupted != ids).long())
    return obj.gen_weight * g.loss + obj.disc_weight * d.loss, g.loss, d.loss, corrupted


def plain_composition(obj, ids, am, rng_seed, seed):
    """The same objective written out with full logits for the plain-module wiring below."""
    m = electra_mask(ids, mask_token_id=MASK, special_token_ids=SPECIAL, attention_mask=am, mask_prob=obj.mask_prob,
                     generator=torch.Generator().manual_seed(rng_seed))
    hidden = obj.gen_head(obj.generator(m.input_ids, attention_mask=am)[m.is_target])
    logits = hidden @ obj.generator.emb.weight.t()
    gen_loss = nn.functional.cross_entropy(logits, ids[m.is_target])
    noise = reference.gumbel_noise(seed, torch.arange(logits.shape[0]), logits.shape[1])
    sampled = (logits.detach().float() / obj.temperature + noise).argmax(1)
    corrupted = ids.masked_scatter(m.is_target, sampled)
    z = obj.disc_output(obj.disc_head(obj.discriminator(corrupted, attention_mask=am)))[..., 0]
    real = am == 1
    disc_loss = nn.functional.binary_cross_entropy_with_logits(z[real], (corrupted != ids)[real].to(z.dtype))
    return obj.gen_weight * gen_loss + obj.disc_weight * disc_loss, gen_loss, disc_loss, corrupted


def grads_of(obj):
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in obj.named_parameters()}


def check_against_composition(obj0, composition, backend, ids, am):
    """Objective in fp32 on ``backend`` vs the composition in fp32 and in float64 (the oracle):
    the 2x rule on the total loss, both parts and every parameter gradient."""
    runs = {}
    for name, dtype, fn in (("candidate", torch.float32, None), ("ref", torch.float32, composition),
                            ("oracle", torch.float64, composition)):
        obj = copy.deepcopy(obj0).to(dtype)
        obj.backend = backend
        if fn is None:
            out = obj(ids, am, rng=torch.Generator().manual_seed(5), seed=123)
            parts = (out.loss, out.gen_loss, out.disc_loss, out.corrupted_ids)
        else:
            parts = fn(obj, ids, am, 5, 123)
        parts[0].backward()
        runs[name] = (parts, grads_of(obj))
    (c_parts, c_grads), (r_parts, r_grads), (o_parts, o_grads) = runs["candidate"], runs["ref"], runs["oracle"]
    # same masking and the same samples on all three (else the losses are not comparable)
    assert torch.equal(c_parts[3], r_parts[3]) and torch.equal(c_parts[3], o_parts[3])
    assert (c_parts[3] != ids).any(), "no replaced token: the test would not exercise RTD labels"
    for i, what in enumerate(("loss", "gen_loss", "disc_loss")):
        assert_policy(what, c_parts[i].detach(), r_parts[i].detach(), o_parts[i].detach(), torch.float32)
    assert set(c_grads) == set(o_grads)
    for n in c_grads:
        assert_policy(f"d {n}", c_grads[n], r_grads[n], o_grads[n], torch.float32)
    return runs


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_objective_matches_hf_composition(backend):
    gen, disc = hf_pair()
    obj = ElectraObjective(gen, disc, mask_token_id=MASK, special_token_ids=SPECIAL, temperature=0.9)
    ids, am = batch()
    check_against_composition(obj, hf_composition, backend, ids, am)


def test_hf_embeddings_shared_and_not_registered_twice():
    gen, disc = hf_pair()
    n_before = len({id(p) for p in list(gen.parameters()) + list(disc.parameters())})
    obj = ElectraObjective(gen, disc, mask_token_id=MASK)
    shared = disc.electra.embeddings
    assert gen.electra.embeddings is shared
    assert gen.generator_lm_head.weight is shared.word_embeddings.weight
    params = list(obj.parameters())
    assert len(params) == len({id(p) for p in params}) < n_before
    # each state_dict entry belongs to the generator or the discriminator: no extra copies
    assert all(k.startswith(("generator.", "discriminator.")) for k in obj.state_dict())
    assert obj.special_token_ids == [PAD]  # from the config when not given
    with pytest.raises(ValueError, match="mask_token_id is required"):
        ElectraObjective(gen, disc)
    g2, d2 = hf_pair(E=8)
    with pytest.raises(ValueError, match="tie_embeddings"):
        ElectraObjective(g2, hf_pair(E=16)[1], mask_token_id=MASK)
    ElectraObjective(g2, d2, mask_token_id=MASK, tie_embeddings=False)


class PlainBody(nn.Module):
    """A body that returns hidden states [B, L, H] (embedding shared with the other model)."""

    def __init__(self, emb: nn.Embedding, hidden: int):
        super().__init__()
        self.emb = emb
        self.proj = nn.Linear(emb.embedding_dim, hidden)
        self.mix = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None):
        x = torch.tanh(self.proj(self.emb(input_ids)))
        if attention_mask is not None:  # a crude sequence-level context so positions interact
            w = attention_mask[..., None].to(x.dtype)
            x = x + self.mix((x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True))
        return x


def plain_objective(V=61, E=12, backend="reference"):
    emb = nn.Embedding(V, E)
    gen, disc = PlainBody(emb, 16), PlainBody(emb, 24)
    return ElectraObjective(gen, disc, mask_token_id=MASK, special_token_ids=SPECIAL, backend=backend,
                            gen_head=nn.Sequential(nn.Linear(16, E), nn.GELU(), nn.LayerNorm(E)),
                            gen_output_weight=emb.weight,
                            disc_head=nn.Sequential(nn.Linear(24, 24), nn.GELU()), disc_output=nn.Linear(24, 1))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_objective_plain_modules(backend):
    obj = plain_objective()
    assert len(list(obj.parameters())) == len({id(p) for p in obj.parameters()})
    ids, am = batch(V=61)
    runs = check_against_composition(obj, plain_composition, backend, ids, am)
    assert runs["candidate"][1]["generator.emb.weight"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_objective_outputs_and_stats(backend):
    gen, disc = hf_pair()
    obj = ElectraObjective(gen, disc, mask_token_id=MASK, special_token_ids=SPECIAL, backend=backend,
                           disallow_correct=True)
    ids, am = batch()
    out = obj(ids, am, rng=torch.Generator().manual_seed(0), seed=1)
    t = out.is_target
    assert t.sum().item() == out.stats["targets"].item()
    assert out.sampled_ids.shape == ids.shape and out.sampled_ids.dtype == torch.int64
    assert (out.sampled_ids[~t] == -100).all() and torch.equal(out.corrupted_ids[t], out.sampled_ids[t])
    assert not (t & (am == 0)).any() and not (t & torch.isin(ids, torch.tensor(SPECIAL))).any()
    assert torch.equal(out.corrupted_ids[~t], ids[~t])
    assert (out.sampled_ids[t] != ids[t]).all()  # disallow_correct: every target is replaced
    assert out.stats["gen_sampled_accuracy"].item() == 0.0
    assert out.stats["replaced"].item() == t.sum().item() and out.stats["tokens"].item() == am.sum().item()
    for k in ("gen_accuracy", "disc_accuracy", "disc_precision", "disc_recall"):
        assert 0.0 <= out.stats[k].item() <= 1.0 and not out.stats[k].requires_grad
    torch.testing.assert_close(out.loss, obj.gen_weight * out.gen_loss + obj.disc_weight * out.disc_loss)


def corpus(n_batches, B, L, V, seed=0):
    """Arithmetic progressions over the non-special ids: learnable by both the generator (MLM)
    and the discriminator (a wrong step stands out)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        start = torch.randint(0, V - 4, (B, 1), generator=g)
        step = torch.randint(1, 4, (B, 1), generator=g)
        ids = (start + step * torch.arange(L - 2)) % (V - 4) + 4
        ids = torch.cat([torch.full((B, 1), CLS), ids, torch.full((B, 1), SEP)], 1)
        pad = torch.arange(L)[None] >= torch.randint(L // 2, L + 1, (B,), generator=g)[:, None]
        batches.append((ids.masked_fill(pad, PAD), (~pad).long()))
    return batches


def train_curve(obj0, data, backend, steps=50):
    obj = copy.deepcopy(obj0)
    obj.backend = backend
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        ids, am = data[step % len(data)]
        out = obj(ids, am, rng=torch.Generator().manual_seed(step), seed=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def test_training_50_steps_loss_decreases_and_backends_agree():
    """50 Adam steps from one initialisation on each backend: the loss goes down (last 10 steps'
    mean below 80% of the first 10's) and each fused backend's curve equals the reference's within a
    relative 1e-4 per step (same masks, same seeds; only rounding differs)."""
    V, L, B = 40, 16, 8
    gen, disc = hf_pair(V=V, L=L)
    obj0 = ElectraObjective(gen, disc, mask_token_id=MASK, special_token_ids=SPECIAL)
    data = corpus(10, B, L, V)
    fused = ([] if _triton_reasons() else ["triton"]) + ([] if _cpu_reasons() else ["cpu"])
    backends = ["reference"] + fused
    curves = {backend: train_curve(obj0, data, backend) for backend in backends}
    for backend in backends:
        first, last = curves[backend][:10].mean().item(), curves[backend][-10:].mean().item()
        assert last < 0.8 * first, f"{backend}: loss did not go down ({first:.3f} -> {last:.3f})"
    if not fused:
        pytest.skip("no fused backend available: " + "; ".join(_triton_reasons() + _cpu_reasons()))
    for backend in fused:
        rel = ((curves[backend] - curves["reference"]).abs() / curves["reference"].abs()).max().item()
        assert rel <= 1e-4, f"{backend}: loss curves differ by {rel:.2e} (relative) at some step"
