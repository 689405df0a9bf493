"""Every compute path of SparseLinear gives the numbers of the straightforward formulas:

    y = x (W0 + P Δ̃ Qᵀ)ᵀ + b,   ∂L/∂x by autograd of that,   ∂L/∂Δ̃ = Pᵀ (∂L/∂W) Q on the support,

for fixed and dynamic selection, rotated and identity bases, nn.Linear and GPT-2's Conv1D.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparseft.update.bank import BasisBank
from sparseft.layer import GRAD_PATHS, SparseLinear, adapted_weight, grad_costs
from sparseft.update.kernels import REFERENCE, SAMPLED, TorchKernels, is_n_major, use_kernels
from sparseft.targets import weight_of

PATHS = ("auto", *GRAD_PATHS)


def orthogonal(size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))[0].float()


def make_layer(m, n, k, selection, identity, conv, path, seed, block=None, cache=True, rotation="both", support_group=None):
    gen = torch.Generator().manual_seed(seed)
    if conv:
        base = Conv1D(m, n)  # weight stored (n, m)
        nn.init.normal_(base.weight, generator=gen)
        nn.init.normal_(base.bias, generator=gen)
    else:
        base = nn.Linear(n, m)
    base.requires_grad_(False)
    bank = BasisBank()
    P, Q = orthogonal(m, gen), orthogonal(n, gen)
    if rotation == "narrow":  # only the narrow side's basis is stored (the wide side is I)
        P, Q = (None, Q) if m > n else (P, None)
    bank.set("g", P, Q)
    layer = SparseLinear(base, group="g", k=k, selection=selection, identity=identity, bank=bank,
                         block=block or (m, n), compute_path=path, cache_update=cache, rotation=rotation,
                         support_group=support_group)
    with torch.no_grad():
        if selection == "fixed":
            layer.choose_support(torch.rand(layer.block, generator=gen))
            perm = torch.randperm(layer.k, generator=gen)  # values in no particular order (as after a regrow)
            layer.set_support(layer.rows[perm], layer.cols[perm])
            layer.values.normal_(generator=gen)
        else:
            layer.calibrated = True
            layer.select_on_backward = False  # compare the whole gradient, not its top-k
            layer.delta.normal_(generator=gen)
    return layer, gen


def reference(layer: SparseLinear, x: torch.Tensor, grad_y: torch.Tensor):
    """Output, input gradient and Δ̃ gradient (on the support / block) by dense autograd."""
    m, n = layer.m, layer.n
    P = layer.basis.matrix("P", slice(None), m)  # I for an identity side
    Q = layer.basis.matrix("Q", slice(None), n)
    dense = torch.zeros(m, n)
    with torch.no_grad():
        if layer.selection == "fixed":
            dense[layer.rows, layer.cols] = layer.values
        else:
            dense[: layer.block[0], : layer.block[1]] = layer.delta
    dense.requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    W = weight_of(layer.base_layer) + P @ dense @ Q.T
    y = x @ W.T + layer.base_layer.bias
    y.backward(grad_y)
    rotated = dense.grad
    if layer.selection == "fixed":
        g = rotated[layer.rows, layer.cols]
    else:
        g = rotated[: layer.block[0], : layer.block[1]]
    return y.detach(), x.grad, g


def as_n_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` laid out column-major over its tokens, as a wider partner layer hands it on
    (ops.linear_n_major)."""
    return x.reshape(-1, x.shape[-1]).T.contiguous().T.reshape(x.shape)


def check(layer, gen, lead, n_major=False):
    x = torch.randn(*lead, layer.n, generator=gen)
    if n_major:
        x = as_n_major(x)
    x.requires_grad_(True)
    y = layer(x)
    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)
    param = layer.values if layer.selection == "fixed" else layer.delta
    y_ref, gx_ref, gp_ref = reference(layer, x, grad_y)
    scale = 1 + float(y_ref.abs().max())
    torch.testing.assert_close(y, y_ref, atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(x.grad, gx_ref, atol=1e-4 * (1 + float(gx_ref.abs().max())), rtol=1e-4)
    torch.testing.assert_close(param.grad, gp_ref, atol=1e-4 * (1 + float(gp_ref.abs().max())), rtol=1e-4)


shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=60, deadline=None)
@given(
    mn=shapes,
    tokens=st.integers(1, 12),
    selection=st.sampled_from(["fixed", "dynamic"]),
    identity=st.booleans(),
    conv=st.booleans(),
    path=st.sampled_from(PATHS),
    seed=st.integers(0, 2**16),
    cache=st.booleans(),
    rotation=st.sampled_from(["both", "narrow"]),
    n_major=st.booleans(),
    data=st.data(),
)
def test_paths_match_straightforward_formulas(mn, tokens, selection, identity, conv, path, seed, cache, rotation, n_major, data):
    m, n = mn
    block = (data.draw(st.integers(1, m)), data.draw(st.integers(1, n)))
    k = data.draw(st.integers(1, block[0] * block[1]))
    if selection == "fixed" and data.draw(st.booleans()):
        path = SAMPLED  # the SDDMM value gradient (fixed supports only)
    layer, gen = make_layer(m, n, k, selection, identity, conv, path, seed, block, cache, "both" if identity else rotation)
    check(layer, gen, (2, tokens), n_major)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_every_bracketing_of_the_rotated_gradient_agrees(shape):
    for path in (*GRAD_PATHS, SAMPLED):
        for selection in ("fixed", "dynamic") if path != SAMPLED else ("fixed",):
            for identity, rotation in ((False, "both"), (True, "both"), (False, "narrow")):
                for cache in (False, True):  # uncached with "activations": the factored forward too
                    layer, gen = make_layer(*shape, 17, selection, identity, False, path, seed=3, cache=cache, rotation=rotation)
                    assert layer.path_for(4) == path
                    check(layer, gen, (4,))


@pytest.mark.parametrize("basis", ["rotated", "identity", "narrow"])
def test_a_support_on_every_row_and_column_indexes_by_slices(basis):
    """A support touching rows 0..a-1 and columns 0..b-1 (a random 1% support touches them all)
    hands the compute paths slices (views of the bases, no gather) and computes the same."""
    for path in (*GRAD_PATHS, SAMPLED):
        layer, gen = make_layer(12, 7, 30, "fixed", basis == "identity", False, path, seed=4, cache=False,
                                rotation="narrow" if basis == "narrow" else "both")
        rows = torch.cat([torch.arange(12), torch.arange(12), torch.arange(6)])
        cols = torch.cat([torch.arange(12) % 7, (torch.arange(12) + 3) % 7, torch.arange(6) + 1])
        layer.set_support(rows, cols)
        assert len(set(zip(rows.tolist(), cols.tolist()))) == 30
        with torch.no_grad():
            layer.values.normal_(generator=gen)
        R, C = layer.support.index()
        assert R == slice(0, 12) and C == slice(0, 7)
        check(layer, gen, (5,))
        i = torch.arange(30)
        layer.set_support(i % 10, i // 10)  # rows 0..9, columns 0..2: still leading runs
        assert layer.support.index() == (slice(0, 10), slice(0, 3))
        layer.values.grad = None
        check(layer, gen, (5,))
        layer.set_support(2 + i % 10, i // 10)  # rows 0, 1 unused (10 of 12, under FULL_COVER): indices
        assert isinstance(layer.support.index()[0], torch.Tensor)
        layer.values.grad = None
        check(layer, gen, (5,))


def _ops_inside(events, name: str, op: str, shape: tuple[int, int]) -> int:
    """Calls of ``name`` on a tensor of ``shape`` (either orientation) made inside ``op``."""
    def inside(e):
        while e is not None:
            if e.name == op:
                return True
            e = e.cpu_parent
        return False
    shapes = ([*shape], [*shape[::-1]])
    return sum(1 for e in events if e.name == name and e.input_shapes and e.input_shapes[0] in shapes and inside(e))


@pytest.mark.parametrize("identity", [False, True])
def test_wide_activations_reach_the_sampled_gradient_without_a_copy(identity):
    """In an MLP (up: wide output → GELU → down: wide input) the up layer returns its output
    column-major over the tokens and the down layer its input gradient the same way, so both
    SDDMMs read their N×wide factor as it lies: no transposing copy inside the kernel. The
    numbers equal those of the plain layout (the hand-off broken by a contiguous copy)."""
    from torch.profiler import profile

    rotation = "both" if identity else "narrow"
    up, gen = make_layer(24, 8, 30, "fixed", identity, False, SAMPLED, seed=5, cache=False, rotation=rotation)
    down, _ = make_layer(8, 24, 30, "fixed", identity, False, SAMPLED, seed=6, cache=False, rotation=rotation)
    x = torch.randn(3, 10, 8, generator=gen, requires_grad=True)
    weights = torch.randn(3, 10, 8, generator=gen)

    def run(plain: bool) -> tuple[dict, tuple]:
        seen = {}
        h = up(x)
        h.register_hook(lambda g: seen.__setitem__("grad_h", is_n_major(g)))
        a = F.gelu(h)
        seen.update(h=is_n_major(h), a=is_n_major(a))
        y = down(a.contiguous() if plain else a)
        seen["y"] = is_n_major(y)
        (y * weights).sum().backward()
        grads = tuple(t.grad.clone() for t in (x, up.values, down.values))
        for t in (x, up.values, down.values):
            t.grad = None
        return seen, grads

    with profile(record_shapes=True) as prof:
        seen, got = run(plain=False)
    assert seen == {"h": True, "a": True, "y": False, "grad_h": True}
    assert _ops_inside(prof.events(), "aten::copy_", "aten::sparse_sampled_addmm", (30, 24)) == 0
    assert got[0].is_contiguous()  # a narrow input's gradient keeps the input's layout
    seen, want = run(plain=True)
    assert seen["grad_h"] is False
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_merge_reads_the_stored_basis_without_a_copy(shape):
    """The bank holds each basis column-major, so the fused merge (CSR × Bᵀ + W0) reads Bᵀ as it
    lies; the layout survives a state-dict round trip onto a fresh bank, and the state dict itself
    is packed (safetensors takes only contiguous tensors)."""
    from torch.profiler import profile

    layer, _ = make_layer(*shape, 30, "fixed", False, False, "auto", seed=2, cache=False, rotation="narrow")
    d = min(shape)
    W0 = weight_of(layer.base_layer)
    with profile(record_shapes=True) as prof:
        merged = layer._merge_into(W0)
    assert sum(_ops_inside(prof.events(), name, "aten::addmm", (d, d)) for name in ("aten::clone", "aten::copy_")) == 0
    torch.testing.assert_close(merged, adapted_weight(layer))
    state = layer._bank.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    fresh = BasisBank()
    fresh.load_state_dict(state)
    B = fresh.full("g", layer.basis.rotated_side)
    assert B.T.is_contiguous() and torch.equal(B, layer._bank.full("g", layer.basis.rotated_side))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_base_weight_is_stored_as_the_merge_reads_it(shape, conv):
    """A fixed one-sided float32 layer stores W0 in the layout its fused merge writes the sum in
    (Wᵀ row-major where m ≤ n, W row-major where m > n; Conv1D's (in, out) weight likewise), so
    the merge reads it as it lies. The values do not change, and the layer computes what the same
    layer with W0 as given computes."""
    m, n = shape
    with use_kernels("cpu", TorchKernels(relay_base=False)):
        torch.manual_seed(4)  # nn.Linear draws its weight from the global generator
        given, _ = make_layer(m, n, 30, "fixed", False, conv, "auto", seed=4, cache=False, rotation="narrow")
    torch.manual_seed(4)
    layer, gen = make_layer(m, n, 30, "fixed", False, conv, "auto", seed=4, cache=False, rotation="narrow")
    W0 = weight_of(layer.base_layer)
    assert (W0.T if m <= n else W0).is_contiguous()
    assert torch.equal(W0, weight_of(given.base_layer))
    merged = layer._merge_into(W0)
    assert (merged.T if m <= n else merged).is_contiguous()  # written in W0's layout: no cross-layout copy
    torch.testing.assert_close(merged, adapted_weight(given))
    x = torch.randn(3, 5, n, generator=gen)
    outs = []
    for lay in (layer, given):
        xi = x.clone().requires_grad_(True)
        y = lay(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, lay.values.grad))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotation,identity", [("narrow", False), ("both", False), ("both", True)])
def test_delta_weight_in_either_layout(rotation, identity):
    """ΔW formed column-major (for a re-laid W0) is the same matrix, in that layout."""
    layer, _ = make_layer(8, 24, 30, "fixed", identity, False, "auto", seed=3, cache=False, rotation=rotation)
    row, col = layer.delta_weight(), layer.delta_weight(column_major=True)
    assert row.is_contiguous() and col.T.is_contiguous()
    torch.testing.assert_close(col, row, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["autocast", "part of the wide side"])
def test_merge_keeps_a_relaid_w0_layout_on_every_route(case):
    """The routes besides the fused product (autocast's dense ΔW; a support that leaves wide
    columns out) also add ΔW in W0's stored layout, so no merge adds across layouts."""
    layer, gen = make_layer(8, 24, 30, "fixed", False, False, "auto", seed=7, cache=False, rotation="narrow")
    if case != "autocast":
        scores = torch.rand(layer.block, generator=gen)
        scores[:, 12:] = -1.0  # the right half of W gets no update
        layer.choose_support(scores)
        assert int(layer.cols.max()) < 12
    from torch.utils._python_dispatch import TorchDispatchMode

    class AddLayouts(TorchDispatchMode):
        """The strides of both operands of every tensor addition."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.add.Tensor and all(isinstance(a, torch.Tensor) for a in args[:2]):
                self.seen.append((args[0].stride(), args[1].stride()))
            return func(*args, **(kwargs or {}))

    W0 = weight_of(layer.base_layer)
    assert W0.T.is_contiguous()
    adds = AddLayouts()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"), adds:
        merged = layer._merge_into(W0)
    assert adds.seen and all(a == b for a, b in adds.seen), adds.seen  # W0 + ΔW in one layout
    assert merged.T.is_contiguous()
    torch.testing.assert_close(merged, adapted_weight(layer), atol=2e-2 if case == "autocast" else 1e-6, rtol=1e-2)


def test_unload_hands_the_base_weights_back_packed():
    """unload() and merge_and_unload() give back base weights stored as the model had them
    (contiguous: safetensors and .view() users rely on it): unload with the original values bit
    for bit, merge_and_unload with W0 + ΔW."""
    from conftest import VOCAB, tiny_llama
    from sparseft import SparseGradConfig, get_sparse_model

    torch.manual_seed(0)
    for merge in (False, True):
        base = tiny_llama()
        original = {k: v.clone() for k, v in base.state_dict().items()}
        model = get_sparse_model(base, SparseGradConfig(density=0.5))
        layers = model.sparse_layers()
        assert any(not l.base_layer.weight.is_contiguous() for l in layers.values())  # down projections re-laid
        ids = torch.randint(0, VOCAB, (2, 12))
        model.calibrate([{"input_ids": ids, "labels": ids}], steps=1, show_progress=False)
        for layer in layers.values():
            layer.values.data.normal_()
        want = {name: adapted_weight(l).detach().clone() for name, l in layers.items()}
        out = model.merge_and_unload() if merge else model.unload()
        for name, p in out.named_parameters():
            assert p.is_contiguous(), name
        state = out.state_dict()
        for name, W in want.items():
            got = state[f"{name}.weight"]
            if merge:
                torch.testing.assert_close(got, W, atol=1e-6, rtol=1e-6)
            else:
                assert torch.equal(got, original[f"{name}.weight"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_mlps_feed_their_sddmms_without_a_copy(family):
    """A whole model, calibrated, one backward: LLaMA's gated MLP (SiLU(gate) * up → down)
    and GPT-2's Conv1D MLP hand their wide activations on column-major, so no SDDMM copies an
    N×intermediate tensor; the value gradients equal the plain layout's."""
    from torch.profiler import profile

    from conftest import VOCAB, tiny_gpt2, tiny_llama
    from sparseft import SparseGradConfig, get_sparse_model

    torch.manual_seed(0)
    base = tiny_llama() if family == "llama" else tiny_gpt2()
    model = get_sparse_model(base, SparseGradConfig(density=0.5))  # every wide row in use, as at 1% of a real layer
    ids = torch.randint(0, VOCAB, (3, 20))
    model.calibrate([{"input_ids": ids, "labels": ids}], steps=1, show_progress=False)
    model.eval()  # no dropout: the two layouts see the same network (gradients still flow)
    layers = model.sparse_layers()
    for layer in layers.values():
        layer.compute_path = SAMPLED  # what the cost model picks at training sizes (tiny ones go dense)
        assert layer.support.index()[0 if layer.m > layer.n else 1] == slice(0, max(layer.m, layer.n))
    wide = max(max(l.m, l.n) for l in layers.values())

    def grads(hand_off: bool) -> list[torch.Tensor]:
        with use_kernels("cpu", TorchKernels(hand_off_n_major=hand_off)):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        return [l.param.grad.clone() for l in layers.values()]

    with profile(record_shapes=True) as prof:
        got = grads(True)
    assert _ops_inside(prof.events(), "aten::copy_", "aten::sparse_sampled_addmm", (ids.numel(), wide)) == 0
    with profile(record_shapes=True) as prof:
        want = grads(False)
    assert _ops_inside(prof.events(), "aten::copy_", "aten::sparse_sampled_addmm", (ids.numel(), wide)) > 0  # the check sees copies
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_no_column_major_hand_off_without_an_sddmm():
    """Half precision and autocast take the dense value gradient (no SDDMM to feed), where the
    column-major layout only cost time: the output stays row-major, and the numbers are the same."""
    up, gen = make_layer(24, 8, 30, "fixed", False, False, SAMPLED, seed=5, cache=False, rotation="narrow")
    x = torch.randn(3, 10, 8, generator=gen, requires_grad=True)
    assert is_n_major(up(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not is_n_major(up(x))
    half = copy.deepcopy(up).to(torch.bfloat16)
    half._bank.to(dtype=torch.bfloat16)
    y = half(x.detach().bfloat16().requires_grad_(True))
    assert not is_n_major(y)
    torch.testing.assert_close(y.float(), up(x).detach(), atol=0.1, rtol=0.05)


def test_sampled_path_is_chosen_where_it_is_cheapest():
    """A SHiRA-like support (identity basis, k spread over all rows and columns) takes the SDDMM
    value gradient: N·k multiply-adds instead of N·m·n."""
    layer, _ = make_layer(64, 48, 60, "fixed", True, False, "auto", seed=0)
    costs = layer.cost_model(256)
    assert costs[SAMPLED] == 256 * 60 < min(costs[p] for p in GRAD_PATHS)
    assert layer.path_for(256) == SAMPLED


def _count_matmul_flops(layer, tokens: int, path: str) -> int:
    """Multiply-adds the value gradient really performs on ``path`` (counted by torch's
    FlopCounterMode: 2 flops per multiply-add), independent of the cost model."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.randn(tokens, layer.m)
    x = torch.randn(tokens, layer.n)
    layer.compute_path = path
    with FlopCounterMode(display=False) as counter:
        layer._param_grad(g, x)
    layer.compute_path = "auto"
    return counter.get_total_flops() // 2


def test_auto_picks_the_cheapest_bracketing():
    layer, _ = make_layer(48, 12, 40, "dynamic", False, False, "auto", seed=0)
    for tokens in (1, 8, 64, 4096):
        measured = {path: _count_matmul_flops(layer, tokens, path) for path in GRAD_PATHS}
        assert measured == grad_costs(tokens, 48, 12, 48, 12)  # the cost model counts what runs
        assert measured[layer.path_for(tokens)] == min(measured.values())
    # few tokens: rotate the activations; many: rotate the (N-independent) dense gradient
    assert layer.path_for(1) in ("activations", "input-side", "output-side")
    assert layer.path_for(10**6) == "weights"


@pytest.mark.parametrize("shape", [(48, 12), (12, 48)])
def test_one_sided_cost_model_counts_what_runs(shape):
    """rotation="narrow": the cost model counts the multiply-adds each bracketing performs, and
    the wide side's rotation is gone (the value gradient costs far less than rotating both sides)."""
    from sparseft.update.kernels import one_sided_costs, rotated_costs

    m, n = shape
    layer, _ = make_layer(m, n, 40, "dynamic", False, False, "auto", seed=0, rotation="narrow")
    side = layer.basis.identity_side
    assert side == ("P" if m > n else "Q")
    for tokens in (1, 8, 64, 4096):
        measured = {path: _count_matmul_flops(layer, tokens, path) for path in GRAD_PATHS}
        costs = one_sided_costs(tokens, m, n, m, n, None, side)
        assert measured == {p: costs[p] for p in GRAD_PATHS}
        assert measured[layer.path_for(tokens)] == min(measured.values())
        assert min(measured.values()) < min(rotated_costs(tokens, m, n, m, n)[p] for p in GRAD_PATHS)


def test_dynamic_cached_merge_follows_optimizer_steps():
    """The cached merged update follows every optimizer step (rebuilt when delta changes)."""
    layer, gen = make_layer(11, 7, 9, "dynamic", False, False, "auto", seed=5)
    layer.select_on_backward = True
    opt = torch.optim.SGD([layer.delta], lr=0.5)
    for _ in range(4):
        x = torch.randn(6, 7, generator=gen)
        layer(x).square().sum().backward()
        assert int((layer.delta.grad != 0).sum()) <= layer.k
        opt.step()
        opt.zero_grad()
        layer.select_on_backward = False  # compare the whole gradient at the new weights
        check(layer, gen, (3,))
        layer.select_on_backward = True
        opt.zero_grad()


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**16),
       basis=st.sampled_from(["rotated", "identity", "narrow"]), data=st.data())
def test_sparse_merge_equals_the_dense_product(m, n, seed, basis, data):
    """The merge from the k-entry sparse D (either bracketing) equals P_R D Q_Cᵀ from the dense D."""
    k = data.draw(st.integers(1, m * n))
    identity = basis == "identity"
    layer, _ = make_layer(m, n, k, "fixed", identity, False, "auto", seed, rotation="narrow" if basis == "narrow" else "both")
    dense = layer.delta_weight().detach()
    W0 = layer.base_layer.weight.detach()
    torch.testing.assert_close(layer._merge_into(W0), W0 + dense, atol=1e-5, rtol=1e-5)
    if basis == "rotated":
        R, C = layer.support.index()
        P_R, Q_C = layer.basis.matrix("P", R, m), layer.basis.matrix("Q", C, n)
        for side in ("P", "Q"):  # both bracketings, whichever sparse_side picks
            merged = REFERENCE.merge(P_R, layer.support.csr(layer.values, side), Q_C, side)
            torch.testing.assert_close(merged, dense, atol=1e-5, rtol=1e-5)
            fused = REFERENCE.merge(P_R, layer.support.csr(layer.values, side), Q_C, side, base=W0)
            torch.testing.assert_close(fused, W0 + dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(24, 9), (9, 24)])
def test_one_sided_merge_fused_over_the_whole_wide_side(shape):
    """A one-sided support that touches every wide row (or column), as a random one does, takes
    the fused route (W0 as the sparse product's addend; Wᵀ formed for m < n) and still equals
    W0 + ΔW; the route really is the fused one (the scattered fallback would not be a view)."""
    m, n = shape
    layer, _ = make_layer(m, n, m * n // 2, "fixed", False, False, "auto", 3, rotation="narrow")
    rows, cols = torch.cartesian_prod(torch.arange(m), torch.arange(n)).T
    on = (rows + cols) % 2 == 0  # a checkerboard: every row and every column of W is touched
    layer.set_support(rows[on], cols[on])
    with torch.no_grad():
        layer.values.normal_()
    W0 = layer.base_layer.weight.detach()
    merged = layer._merge_into(W0)
    torch.testing.assert_close(merged, W0 + layer.delta_weight().detach(), atol=1e-5, rtol=1e-5)
    assert merged.is_contiguous() == (m > n)  # m < n: Wᵀ formed, returned as a transposed view


def _twins(selection, identity, seed=7):
    """Two copies of one layer, one caching its merged weight and one rebuilding it per call."""
    cached, gen = make_layer(13, 9, 20, selection, identity, False, "auto", seed, cache=True)
    return cached, rebuilding_twin(cached), gen


def rebuilding_twin(cached):
    """A copy of ``cached`` that merges W0 + ΔW on every call (never the factored way)."""
    fresh = copy.deepcopy(cached)
    fresh.cache_update = False
    fresh.update.merged_forward = lambda tokens: True
    fresh._merge_pays = lambda tokens: True  # (inference too: not the sparse form beside W0)
    return fresh


def step_twins(cached, fresh, opts, gen, micro_batches=2):
    """One optimizer step of both twins on the same micro-batches: outputs and gradients must be
    bit-identical."""
    x = torch.randn(2, 5, cached.n, generator=gen)
    for _ in range(micro_batches):  # micro-batches share one optimizer step
        outs = [layer(x) for layer in (cached, fresh)]
        assert torch.equal(outs[0], outs[1])
        for out in outs:
            out.square().sum().backward()
    assert torch.equal(cached.param.grad, fresh.param.grad)
    for opt in opts:
        opt.step()
        opt.zero_grad()


def same_twin_output(cached, fresh, gen) -> bool:
    x = torch.randn(3, cached.n, generator=gen)
    with torch.no_grad():
        return torch.equal(cached(x), fresh(x))


@pytest.mark.parametrize("fused", [False, True])  # fused AdamW updates without bumping versions
@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
@pytest.mark.parametrize("identity", [False, True])
def test_cached_merge_follows_steps_reloads_and_reselection(selection, identity, fused):
    """Bit-for-bit: a layer that keeps W0 + ΔW between calls computes exactly what one that
    rebuilds it every call computes, through optimizer steps, gradient accumulation,
    load_state_dict and a change of support. A stale cache anywhere breaks equality."""
    cached, fresh, gen = _twins(selection, identity)
    opts = [torch.optim.AdamW([layer.param], lr=0.05, fused=fused) for layer in (cached, fresh)]

    def step_both():
        step_twins(cached, fresh, opts, gen)

    def same_output():
        return same_twin_output(cached, fresh, gen)

    for _ in range(3):
        step_both()
    assert same_output() and cached.update._cache is not None and fresh.update._cache is None
    # load_state_dict: other values into both (copy_ in place, same tensor)
    other, _ = make_layer(13, 9, 20, selection, identity, False, "auto", seed=99)
    with torch.no_grad():
        before = cached(torch.ones(1, 9))
    for layer in (cached, fresh):
        layer.load_state_dict(other.state_dict())
    assert same_output()
    with torch.no_grad():
        assert not torch.equal(cached(torch.ones(1, 9)), before)
    if selection == "fixed":  # reselection: a new support under the same values tensor
        for layer in (cached, fresh):
            layer.support.regrow(layer.values, torch.rand(layer.block, generator=torch.Generator().manual_seed(1)), 5)
        assert same_output()
        for layer in (cached, fresh):  # the same values moved to other positions, values untouched
            layer.set_support(layer.rows.flip(0), layer.cols.flip(0))
        assert same_output()
    step_both()
    assert same_output()


def test_cached_merge_follows_the_basis_and_the_base_weight():
    cached, fresh, gen = _twins("fixed", False)
    x = torch.randn(4, 9, generator=gen)
    with torch.no_grad():
        cached(x)
        P, Q = orthogonal(13, gen), orthogonal(9, gen)
        for layer in (cached, fresh):  # a new basis (recalibration) and an edited base weight
            layer._bank.set("g", P.clone(), Q.clone())
        assert torch.equal(cached(x), fresh(x))
        for layer in (cached, fresh):
            layer.base_layer.weight.mul_(0.5)
        assert torch.equal(cached(x), fresh(x))


def test_no_grad_forward_and_frozen_adapter():
    layer, gen = make_layer(8, 5, 6, "fixed", False, True, "auto", seed=1)
    x = torch.randn(4, 5, generator=gen)
    with torch.no_grad():
        y = layer(x)
    y_ref, _, _ = reference(layer, x, torch.zeros(4, 8))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    layer.values.requires_grad_(False)  # frozen adapter: only the input gradient is formed
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert xg.grad is not None and layer.values.grad is None


def test_trainable_base_falls_back_to_autograd():
    layer, gen = make_layer(6, 4, 5, "fixed", False, False, "auto", seed=2)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 4, generator=gen)
    layer(x).sum().backward()
    assert layer.base_layer.bias.grad is not None
    torch.testing.assert_close(layer.base_layer.bias.grad, torch.full((6,), 3.0))
    y_ref, _, g_ref = reference(layer, x, torch.ones(3, 6))
    torch.testing.assert_close(layer.values.grad, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("every_row", [True, False])
def test_identity_merge_scatters_through_an_index_built_once(every_row):
    """The default's merge (a copy of W0, the values added at their entries) scatters through the
    support's flat index, built once per support: a merge after the first runs only the copy, the
    scatter and view ops, no index arithmetic (on a GPU each op is a kernel launch, six merges per
    MLP and step). A new support gets a new index."""
    from conftest import OpCounter

    layer, gen = make_layer(12, 7, 30, "fixed", True, False, "auto", seed=4, cache=False)
    i = torch.arange(30)
    layer.set_support(i % 11 + (i >= 22) if every_row else 2 + i % 10, i // 11 + (i >= 22) if every_row else i // 10)
    assert isinstance(layer.support.index()[0], slice) == every_row
    W0 = weight_of(layer.base_layer)
    for _ in range(2):
        assert torch.equal(layer.support.flat_index(7).long(), layer.rows * 7 + layer.cols)
        layer._merge_into(W0)
        with OpCounter() as rec:
            merged = layer._merge_into(W0)
        assert set(rec.ops) <= {"clone", "index_add_", "view", "_to_copy", "detach", "alias"}, rec.ops
        torch.testing.assert_close(merged, adapted_weight(layer))
        layer.set_support(layer.rows.flip(0), layer.cols.flip(0))  # the same entries, values in another order


@pytest.mark.parametrize("shape", [(12, 6), (6, 12)])
def test_a_half_precision_merge_is_one_fused_product_where_the_device_has_the_kernel(shape, monkeypatch):
    """Where the device multiplies sparse matrices in bf16 (cuSPARSE on a recent GPU; this CPU's
    MKL cannot, so a float32 product stands in for it here), a one-sided bf16 merge is one
    addmm with W0 as its addend, and equals W0 + ΔW to bf16's precision; where it cannot, the
    merge takes the float32 product, a cast and an addition, as before."""
    import sparseft.update.basis as basis_module
    import sparseft.update.kernels as kernels_module

    m, n = shape
    layer, _ = make_layer(m, n, m * n // 2, "fixed", False, False, "weights", 3, rotation="narrow", cache=False)
    rows, cols = torch.cartesian_prod(torch.arange(m), torch.arange(n)).T
    on = (rows + cols) % 2 == 0  # every row and column touched: the fused route
    layer.set_support(rows[on], cols[on])
    with torch.no_grad():
        layer.values.normal_()
    layer._bank.to(dtype=torch.bfloat16)
    W0 = layer.base_layer.weight.detach().to(torch.bfloat16)
    want = W0.float() + layer.delta_weight().detach().float()
    fused = []

    def addmm(base, D, B_T):  # what cuSPARSE computes, in float32 on this CPU
        assert base.dtype == D.dtype == B_T.dtype == torch.bfloat16 and D.layout == torch.sparse_csr
        fused.append(True)
        return (base.float() + D.to(torch.float32).to_dense() @ B_T.float()).to(torch.bfloat16)

    assert not kernels_module.sparse_products_in(torch.bfloat16, W0.device)  # (this CPU)
    layer._merge_into(W0)
    assert not fused
    monkeypatch.setattr(basis_module, "sparse_products_in", lambda dtype, device: True)
    monkeypatch.setattr(kernels_module.torch, "addmm", addmm)
    merged = layer._merge_into(W0)
    assert fused == [True] and merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("path", ["auto", "activations"])
def test_a_support_missing_a_few_rows_keeps_them_all_in_d(identity, path):
    """A support on all but a row and a column of its block keeps every row and column in D (zero
    where it has no entry), so the compute paths read g, x and the bases whole instead of copying
    the rows they touch on every call (a random 1% support misses a row of about one layer in
    seven): a training step runs the same ops as with a support on every row, and every product
    still equals the formulas. A support on few rows stays compact."""
    from conftest import OpCounter

    def step_ops(layer, gen):  # (the second step: the first builds the support's patterns once)
        for _ in range(2):
            layer.values.grad = None
            x = torch.randn(5, 3, 12, generator=gen, requires_grad=True)
            with OpCounter() as rec:
                layer(x).backward(torch.randn(5, 3, 40, generator=gen))
        return rec.ops

    i = torch.arange(60)
    layer, gen = make_layer(40, 12, 60, "fixed", identity, False, path, seed=5)
    layer.set_support(i % 40, i % 12)  # every row and column
    every_row = step_ops(layer, gen)
    skip = i % 39 + (i % 39 >= 5), i % 11 + (i % 11 >= 3)  # all but row 5 and column 3
    layer.set_support(*skip)
    assert layer.support.shape() == (40, 12) and layer.support.touched == (39, 11)
    assert all(isinstance(idx, slice) for idx in layer.support.index())
    assert step_ops(layer, gen) == every_row
    assert torch.equal(layer.rows, skip[0]) and torch.equal(layer.cols, skip[1])
    layer.values.grad = None
    check(layer, gen, (4, 3))
    layer.set_support(i % 10, i // 10)  # 10 of 40 rows, 6 of 12 columns
    assert layer.support.shape() == layer.support.touched == (10, 6)
    layer.values.grad = None
    check(layer, gen, (4, 3))
