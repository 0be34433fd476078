"""Real training setups on the `reference` and `cpu` backends: torch.compile(fullgraph=True) of every op
(forward and backward) and of a patched HF XLNet, the ELECTRA objective under torch.compile, autocast
(bf16 on the CPU), DDP and FSDP2 on gloo with 2 processes, gradient accumulation, and activation
checkpointing through the attention op with dropout.

Tiny configs only; the distributed tests spawn 2 processes each.
"""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from attention_inputs import make_inputs
from conftest import backend_reasons
from torch.utils.checkpoint import checkpoint

import pyobjectives as po
from pyobjectives.integrations import patch_xlnet

transformers = pytest.importorskip("transformers", reason="the HF tests need transformers")
from transformers import XLNetConfig, XLNetLMHeadModel  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # spawned workers import this module
from test_electra_objective import MASK, SPECIAL, batch, hf_pair  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKENDS = [pytest.param("reference", id="reference"),
            pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(bool(backend_reasons("cpu")),
                                                                   reason="; ".join(backend_reasons("cpu"))))]
#: The backend the multi-process tests use: the native one when built (what a CPU job would run).
DIST_BACKEND = "reference" if backend_reasons("cpu") else "cpu"
V, L = 37, 8


def tiny_xlnet(backend, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = XLNetConfig(vocab_size=V, n_layer=2, d_model=16, n_head=2, d_inner=32, dropout=dropout)
    return patch_xlnet(XLNetLMHeadModel(cfg), backend=backend)


def xlnet_batch(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    perm = (torch.rand(B, L, L, generator=g) < 0.4).float()
    mapping = torch.zeros(B, 2, L)
    mapping[:, 0, 3], mapping[:, 1, 6] = 1, 1
    labels = torch.randint(0, V, (B, 2), generator=g)
    return ids, perm, mapping, labels


def xlnet_loss(model, ids, perm, mapping, labels):
    return model(ids, perm_mask=perm, target_mapping=mapping, labels=labels, use_cache=False).loss


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_dicts(a, b, **tol):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=lambda m, n=n: f"{n}: {m}", **tol)


# --- torch.compile ------------------------------------------------------------------------

def _op_case(op, backend):
    """``(fn, leaves)``: one op's forward whose output is a scalar to differentiate."""
    if op == "two_stream_attention":
        x, kw = make_inputs(B=2, Lq=9, M=3, H=2, D=8, P=4, dtype=torch.float32,
                            features=("query", "rank", "padding", "seg_ids", "t5"))
        leaves = {n: t.requires_grad_() for n, t in {**x, **kw}.items()
                  if isinstance(t, torch.Tensor) and t.is_floating_point()}
        rest = {n: t for n, t in kw.items() if n not in leaves}

        def fn(**f):
            out_h, out_g = po.two_stream_attention(**f, **rest, dropout_p=0.1, seed=11, backend=backend)
            return (out_h * out_h).sum() + (out_g * out_g).sum()
        return fn, leaves
    if op == "rtd_loss":
        orig = torch.randint(0, 9, (3, 6))
        corr = torch.where(torch.rand(3, 6) < 0.4, torch.randint(0, 9, (3, 6)), orig)
        leaves = dict(hidden=torch.randn(3, 6, 8, requires_grad=True), w=torch.randn(8, requires_grad=True),
                      b=torch.randn((), requires_grad=True))

        def fn(hidden, w, b):
            return po.rtd_loss(hidden, corr, orig, head_weight=w, head_bias=b, loss_weight=50.0, backend=backend)
        return fn, leaves
    targets = torch.randint(0, 31, (13,))
    targets[::4] = -100
    leaves = dict(h=torch.randn(13, 8, requires_grad=True), w=torch.randn(31, 8, requires_grad=True),
                  b=torch.randn(31, requires_grad=True))

    def fn(h, w, b):
        loss, sampled = po.linear_cross_entropy(h, w, targets, b, sample=True, seed=3, backend=backend)
        return loss + 0 * sampled.sum()
    return fn, leaves


OPS = ("two_stream_attention", "rtd_loss", "linear_cross_entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_op(op, backend):
    torch._dynamo.reset()
    fn, leaves = _op_case(op, backend)
    eager = fn(**leaves)
    eager_grads = torch.autograd.grad(eager, list(leaves.values()))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(**leaves)
    out_grads = torch.autograd.grad(out, list(leaves.values()))
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(leaves, out_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"d {name}")


def test_compile_inductor_rtd_loss_cpu():
    """Inductor compiles the code around the opaque native op (one small case: inductor's C++ builds
    take most of a minute here; the attention case took 96 s)."""
    if backend_reasons("cpu"):
        pytest.skip("; ".join(backend_reasons("cpu")))
    torch._dynamo.reset()
    fn, leaves = _op_case("rtd_loss", "cpu")
    eager = fn(**leaves)
    eager_grads = torch.autograd.grad(eager, list(leaves.values()))
    out = torch.compile(fn, fullgraph=True)(**leaves)
    out_grads = torch.autograd.grad(out, list(leaves.values()))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(leaves, out_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_patched_xlnet(backend):
    """A training step of a patched XLNet (permutation mask + one-hot target mapping) as one graph:
    no graph break anywhere, the same loss and gradients as eager."""
    torch._dynamo.reset()
    model = tiny_xlnet(backend)
    batch_ = xlnet_batch()
    eager = xlnet_loss(model, *batch_)
    eager.backward()
    want = grads(model)
    model.zero_grad()
    loss = torch.compile(xlnet_loss, fullgraph=True, backend="aot_eager")(model, *batch_)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    assert_close_dicts(grads(model), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["eval", "train-dropout0.2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_patched_t5(backend, dropout):
    """One graph; with dropout (training mode, seed drawn in the graph) Dynamo's graph run as is equals
    eager under the same torch.manual_seed (AOT autograd would draw HF's own dropout masks differently)."""
    from test_t5_patch import make_model, seq2seq_inputs, tiny_config
    from transformers import T5ForConditionalGeneration

    from pyobjectives.integrations import patch_t5

    torch._dynamo.reset()
    model = patch_t5(make_model(T5ForConditionalGeneration, tiny_config(dropout_rate=dropout)), backend=backend)
    model.train(dropout > 0)
    inputs = seq2seq_inputs()

    def loss_of(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss

    args = (inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    torch.manual_seed(3)
    eager = loss_of(*args)
    eager.backward()
    want = grads(model)
    model.zero_grad()
    torch.manual_seed(3)
    loss = torch.compile(loss_of, fullgraph=True, backend="eager" if dropout else "aot_eager")(*args)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    assert_close_dicts(grads(model), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_patched_xlnet_with_dropout(backend):
    """Training mode with attention dropout and no explicit seed: the seed is drawn inside the graph (a CPU
    int64 tensor, no .item()) from torch's generator, as eager draws it. Dynamo's graph run as is
    (backend "eager") gives eager's loss and gradients for the same torch.manual_seed; under AOT autograd
    (which decomposes HF's own dropout, drawing its masks differently) the same seed gives the same loss
    again and another seed another one: no seed is frozen into the graph."""
    torch._dynamo.reset()
    model = tiny_xlnet(backend, dropout=0.3).train()
    batch_ = xlnet_batch()
    ids, perm = batch_[:2]

    def loss_without_mapping(model, ids, perm):
        # (eager reads a one-hot target_mapping to run P query rows; a traced call takes HF's dense path,
        # whose query stream has Lq rows and so other dropout counters)
        return model(ids, perm_mask=perm, labels=ids, use_cache=False).loss

    torch.manual_seed(21)
    eager = loss_without_mapping(model, ids, perm)
    eager.backward()
    want = grads(model)
    model.zero_grad()
    torch.manual_seed(21)
    loss = torch.compile(loss_without_mapping, fullgraph=True, backend="eager")(model, ids, perm)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    assert_close_dicts(grads(model), want, rtol=1e-5, atol=1e-6)
    aot = torch.compile(xlnet_loss, fullgraph=True, backend="aot_eager")

    def aot_loss(seed):
        torch.manual_seed(seed)
        return aot(model, *batch_)

    first, again, other = aot_loss(21), aot_loss(21), aot_loss(22)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("masking", ["electra", "bert"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_electra_objective(backend, masking):
    """The whole objective as one graph: masking, the generator's target rows (a size known from shapes),
    sampling with a seed drawn in the graph, the discriminator and both losses. With the same
    torch.manual_seed the compiled step equals the eager one: loss, samples, corrupted ids, gradients.
    (A ``rng=torch.Generator`` cannot be traced by Dynamo: under compile, torch's generator governs.)"""
    torch._dynamo.reset()
    gen, disc = hf_pair()
    objective = po.nn.ElectraObjective(gen, disc, mask_token_id=MASK, special_token_ids=SPECIAL, backend=backend,
                                       masking=masking, max_predictions=3 if masking == "electra" else None)
    ids, am = batch()

    def step(ids, am):
        out = objective(ids, am)
        return out.loss, out.sampled_ids, out.corrupted_ids, out.stats["gen_accuracy"]

    torch.manual_seed(5)
    eager = step(ids, am)
    eager[0].backward()
    want = grads(objective)
    objective.zero_grad()
    torch.manual_seed(5)  # Dynamo's graph as is: AOT autograd would draw the masking's randomness differently
    got = torch.compile(step, fullgraph=True, backend="eager")(ids, am)
    got[0].backward()
    torch.testing.assert_close(got[0], eager[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(got[1:], eager[1:]):
        assert torch.equal(a, b)
    assert_close_dicts(grads(objective), want, rtol=1e-5, atol=1e-6)


# --- autocast --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_autocast_op_runs_in_its_inputs_dtype(op, backend):
    """Policy: the ops are autocast-neutral on every backend: they compute in their inputs' dtype
    (fp32 accumulation in the fused kernels) and autocast changes nothing inside them, so an op
    given fp32 tensors under autocast returns exactly what it returns without autocast, and one
    given bf16 tensors returns bf16, within bf16 tolerance of the fp32 result."""
    fn, leaves = _op_case(op, backend)
    want = fn(**leaves)
    want_grads = torch.autograd.grad(want, list(leaves.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(**leaves)
    got_grads = torch.autograd.grad(got, list(leaves.values()))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    low = {n: t.detach().bfloat16().requires_grad_() for n, t in leaves.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(**low)
    got_grads = torch.autograd.grad(got, list(low.values()))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got)
    scale = want.abs().item() + 1
    assert abs(got.float().item() - want.item()) <= 0.05 * scale
    for name, a, b in zip(leaves, got_grads, want_grads):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05 * (b.abs().max().item() + 1e-3), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_patched_xlnet_and_electra(backend):
    """The modules under bf16 autocast: the projections arrive in bf16, attention runs on bf16 inputs;
    losses finite and within bf16 tolerance of fp32, every gradient finite."""
    model = tiny_xlnet(backend)
    want = xlnet_loss(model, *xlnet_batch())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = xlnet_loss(model, *xlnet_batch())
    got.backward()
    assert torch.isfinite(got) and abs(got.item() - want.item()) < 0.05 * want.item()
    assert all(torch.isfinite(g).all() for g in grads(model).values())

    gen, disc = hf_pair()
    objective = po.nn.ElectraObjective(gen, disc, mask_token_id=MASK, special_token_ids=SPECIAL, backend=backend)
    ids, am = batch()
    want = objective(ids, am, rng=torch.Generator().manual_seed(5), seed=123)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = objective(ids, am, rng=torch.Generator().manual_seed(5), seed=123)
    got.loss.backward()
    for part in ("gen_loss", "disc_loss"):
        g, w = getattr(got, part).float().item(), getattr(want, part).item()
        assert abs(g - w) < 0.05 * abs(w) + 0.02, (part, g, w)
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)


# --- gradient accumulation and activation checkpointing -------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_equals_full_batch(backend):
    model = tiny_xlnet(backend)
    ids, perm, mapping, labels = xlnet_batch(B=4)
    xlnet_loss(model, ids, perm, mapping, labels).backward()
    full = grads(model)
    model.zero_grad()
    for part in range(2):
        rows = slice(2 * part, 2 * part + 2)
        (xlnet_loss(model, ids[rows], perm[rows], mapping[rows], labels[rows]) / 2).backward()
    assert_close_dicts(grads(model), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointing_replays_dropout(backend):
    """Through the op with dropout and no explicit seed, and through a patched layer (attention dropout
    and the layer's own dropout): the seed is drawn from torch's generator inside the checkpointed
    region, checkpoint restores the RNG state, so the recomputation draws the same seed and the
    gradients are those of the plain run, bit for bit."""
    x, kw = make_inputs(B=2, Lq=9, M=2, H=2, D=8, P=3, dtype=torch.float32, features=("query", "rank"))
    leaves = {n: t.requires_grad_() for n, t in {**x, **kw}.items() if t.is_floating_point()}
    rest = {n: t for n, t in kw.items() if n not in leaves}

    def attention(*tensors):
        out_h, out_g = po.two_stream_attention(**dict(zip(leaves, tensors)), **rest, dropout_p=0.3, backend=backend)
        return out_h.square().sum() + out_g.square().sum()

    runs = []
    for wrap in (False, True):
        torch.manual_seed(7)
        out = checkpoint(attention, *leaves.values(), use_reentrant=False) if wrap else attention(*leaves.values())
        runs.append(torch.autograd.grad(out, list(leaves.values())))
    for name, a, b in zip(leaves, *runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.manual_seed(8)
    assert not torch.equal(torch.autograd.grad(attention(*leaves.values()), leaves["q"])[0], runs[0][0]), \
        "another seed gave the same gradient: dropout is not exercised"

    model = tiny_xlnet(backend, dropout=0.3).train()
    layer = model.transformer.layer[0].rel_attn
    Lq, B, d = 7, 2, 16
    h, g = torch.randn(Lq, B, d, requires_grad=True), torch.randn(2, B, d, requires_grad=True)
    mask = (torch.rand(Lq, Lq, B, 1) < 0.3).float()
    pos = torch.randn(2 * Lq, B, d)
    mapping = torch.zeros(2, Lq, B)
    mapping[0, 1], mapping[1, 5] = 1, 1

    def run_layer(h, g):
        out_h, out_g = layer(h, g, mask * (1 - torch.eye(Lq)[:, :, None, None]), mask, pos, None,
                             target_mapping=mapping)
        return out_h.square().sum() + out_g.square().sum()

    runs = []
    for wrap in (False, True):
        model.zero_grad()
        torch.manual_seed(9)
        out = checkpoint(run_layer, h, g, use_reentrant=False) if wrap else run_layer(h, g)
        out.backward()
        runs.append({"h": h.grad.clone(), "g": g.grad.clone(), **grads(layer)})
        h.grad = g.grad = None
    assert_close_dicts(runs[1], runs[0], rtol=0, atol=0)


# --- DDP / FSDP2 on gloo ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS, LR = 3, 0.5


def _electra_objective(backend):
    torch.manual_seed(0)
    gen, disc = hf_pair()
    return po.nn.ElectraObjective(gen, disc, mask_token_id=MASK, special_token_ids=SPECIAL, backend=backend)


def _half_loss(model, model_kind, half, step):
    """The loss of one half of the step's batch (rows 2*half, 2*half + 1). ELECTRA's masking and
    samples are keyed on (step, half), as each rank of a data-parallel job draws its own."""
    rows = slice(2 * half, 2 * half + 2)
    if model_kind == "xlnet":
        return xlnet_loss(model, *[t[rows] for t in xlnet_batch(B=4, seed=step)])
    with torch.random.fork_rng():  # the same batch in every process, whatever its RNG state
        torch.manual_seed(step)
        ids, am = batch(B=4)
    return model(ids[rows], am[rows], rng=torch.Generator().manual_seed(100 * step + half),
                 seed=1000 * step + half).loss


def _train(model_kind, backend, wrap, rank):
    """STEPS SGD steps on 2 halves per batch; returns the final parameters.
    ``wrap``: None (one process runs both halves and averages), "ddp" or "fsdp" (this rank's half)."""
    model = tiny_xlnet(backend) if model_kind == "xlnet" else _electra_objective(backend)
    names = [n for n, _ in model.named_parameters()]
    if wrap == "ddp":
        # XLNet without token types leaves the segment parameters unused
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=model_kind == "xlnet")
    elif wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard
        if model_kind == "xlnet":
            for layer in model.transformer.layer:
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    halves = [rank] if wrap else [0, 1]
    for step in range(STEPS):
        opt.zero_grad()
        (sum(_half_loss(model, model_kind, h, step) for h in halves) / len(halves)).backward()
        opt.step()
    params = dict((model.module if wrap == "ddp" else model).named_parameters())
    return {n: (params[n].full_tensor() if wrap == "fsdp" else params[n]).detach().clone() for n in names}


def _worker(rank, world, port, model_kind, backend, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for wrap in WRAPS:
            params = _train(model_kind, backend, wrap, rank)
            if rank == 0:
                torch.save(params, os.path.join(result_dir, f"{wrap}.pt"))
    finally:
        dist.destroy_process_group()


#: DDP, and FSDP2 (``fully_shard``: per XLNet layer and the root; the ELECTRA objective as one unit,
#: since its generator and discriminator share the embedding module), both on gloo on the CPU.
WRAPS = ("ddp", "fsdp")


@pytest.mark.parametrize("model_kind", ["xlnet", "electra"])
def test_data_parallel_matches_one_process(model_kind, tmp_path):
    """2 processes on gloo, each on half the batch, vs one process averaging the same two halves:
    for XLNet that is the full batch's loss (equal token counts); for ELECTRA each half's masking
    and samples are keyed on its rank, as in real data-parallel training, and reproduced here.
    One spawn runs DDP then FSDP2 (the processes' start-up is most of the time)."""
    want = _train(model_kind, DIST_BACKEND, None, 0)
    start = (tiny_xlnet(DIST_BACKEND) if model_kind == "xlnet" else _electra_objective(DIST_BACKEND)).state_dict()
    assert any(not torch.equal(want[n], start[n]) for n in want), "training changed nothing"
    mp.spawn(_worker, args=(2, _free_port(), model_kind, DIST_BACKEND, str(tmp_path)), nprocs=2, join=True)
    for wrap in WRAPS:
        got = torch.load(tmp_path / f"{wrap}.pt")
        # fp32: the all-reduce sums the halves' gradients in another order than one process does
        assert_close_dicts(got, want, rtol=1e-4, atol=1e-5)
