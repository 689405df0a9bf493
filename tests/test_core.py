"""SparseGrad core: conversion, gradients, selection, calibration invariants, round-trips."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, make_batch, make_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseft import MePropConfig, SparseAdamW, SparseGradConfig, SparseModel, get_sparse_model
from sparseft.update.bank import eigenbasis
from sparseft.errors import AdapterMismatchError
from sparseft.layer import SparseLinear, adapted_weight
from sparseft.targets import find_targets, is_transposed, weight_of

EXPECTED_TARGETS = {
    "bert": {"intermediate.dense", "output.dense"},
    "roberta": {"intermediate.dense", "output.dense"},
    "llama": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
}
CONFIGS = {
    "sparsegrad-fixed": lambda: SparseGradConfig(rotation="both", density=0.05, selection="fixed"),
    "sparsegrad-dynamic": lambda: SparseGradConfig(rotation="both", density=0.05, selection="dynamic"),
    "sparsegrad-one-sided": lambda: SparseGradConfig(density=0.05, rotation="narrow"),
    "meprop-dynamic": lambda: MePropConfig(density=0.05),
    "meprop-fixed": lambda: MePropConfig(density=0.05, selection="fixed"),
}


def logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def calibrated(arch: str, config, steps: int = 4):
    base = ARCHS[arch]().eval()
    model = get_sparse_model(copy.deepcopy(base), config)
    model.calibrate(make_batches(arch, steps), steps=steps, show_progress=False)
    return base, model


def train_steps(model, arch, n=3, lr=1e-2, optimizer=None):
    model.train()
    opt = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(n):
        loss = model(**make_batch(arch, 100 + i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("arch", ARCHS)
def test_finds_the_mlp_layers_of_every_architecture(arch):
    model = ARCHS[arch]()
    targets = find_targets(model)
    roles = {".".join(t.name.split(".")[-2:]) for t in targets}
    assert roles == EXPECTED_TARGETS[arch]
    assert not any("attention" in t.name or "attn" in t.name for t in targets)
    groups = {t.group for t in targets}
    assert len(groups) == len(EXPECTED_TARGETS[arch])  # one basis pair per role, shared by the blocks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", CONFIGS)
def test_converted_model_equals_original_before_training(arch, method):
    base, model = calibrated(arch, CONFIGS[method]())
    batch = make_batch(arch, 7)
    model.eval()
    torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["sparsegrad-fixed", "sparsegrad-dynamic", "sparsegrad-one-sided"])
def test_merge_and_save_round_trips(arch, method, tmp_path):
    base, model = calibrated(arch, CONFIGS[method]())
    train_steps(model, arch)
    batch = make_batch(arch, 9)
    model.eval()
    adapted = logits(model, batch)
    assert not torch.allclose(adapted, logits(base, batch))  # training moved the outputs

    info = model.save_pretrained(tmp_path / "adapter")
    again = SparseModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert torch.equal(logits(again, batch), adapted)  # exactly

    file_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert info["adapter_bytes"] == file_bytes
    k_total = sum(layer.k for layer in model.sparse_layers().values())
    if method != "sparsegrad-dynamic":
        assert info["values"] == k_total
    else:
        assert k_total <= info["values"] <= 3 * k_total  # at most k new entries per step

    merged = model.merge_and_unload().eval()
    assert type(merged) is type(base)
    assert not any(isinstance(m, SparseLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), adapted, atol=1e-5, rtol=1e-5)


def test_adapter_file_is_small(tmp_path):
    """O(k) values + the basis columns the support uses + the head, nothing like the model."""
    # a calibrated support (a random one touches nearly every basis column: the file then holds
    # the whole bases, which the test below would rightly not call small)
    base, model = calibrated("bert", SparseGradConfig(rotation="both", k=20, selection="fixed", support_criterion="abs-sum"))
    info = model.save_pretrained(tmp_path)
    full_bytes = sum(p.numel() * 4 for p in base.parameters())
    layers = len(model.sparse_layers())
    assert info["values"] == 20 * layers
    assert info["adapter_bytes"] < full_bytes / 4
    # basis columns saved are exactly those the support touches, per group: m·|∪R| + n·|∪C|
    used: dict[str, tuple[set, set, int, int]] = {}
    for layer in model.sparse_layers().values():
        rows, cols, _, _ = used.setdefault(layer.group, (set(), set(), layer.m, layer.n))
        rows.update(layer.R.tolist())
        cols.update(layer.C.tolist())
    expected = sum(m * len(r) + n * len(c) for r, c, m, n in used.values())
    full = sum(m * m + n * n for _, _, m, n in used.values())
    assert info["basis_numbers"] == expected < full


def _backward_beside_dense(base, model, arch, batch):
    """Backward of ``model`` on ``batch`` with the dense run's dropout masks; returns the dense
    autograd weight gradients of ``base`` for every adapted layer."""
    dense = _dense_gradients(base, arch, batch, list(model.sparse_layers()))
    model.train()
    torch.manual_seed(5)  # same dropout masks as the dense run
    model(**batch).loss.backward()
    return dense


def _dense_gradients(base, arch, batch, names):
    """Dense autograd weight gradients (m×n) of the unmodified model, dropout seeded with 5."""
    model = copy.deepcopy(base).train()
    torch.manual_seed(5)
    loss = model(**batch).loss
    modules = [model.get_submodule(n) for n in names]
    grads = torch.autograd.grad(loss, [m.weight for m in modules])
    return {n: (g.t() if is_transposed(m) else g) for n, m, g in zip(names, modules, grads)}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_rotated_gradient_is_P_T_G_Q(arch):
    """The dynamic delta's gradient equals Pᵀ (dense autograd weight gradient) Q."""
    base, model = calibrated(arch, SparseGradConfig(rotation="both", density=0.05, selection="dynamic"))
    for layer in model.sparse_layers().values():
        layer.select_on_backward = False  # look at the whole rotated gradient
    dense = _backward_beside_dense(base, model, arch, make_batch(arch, 11))
    for name, layer in model.sparse_layers().items():
        P = model.bases.full(layer.group, "P")
        Q = model.bases.full(layer.group, "Q")
        expected = P.T @ dense[name] @ Q
        torch.testing.assert_close(layer.delta.grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_one_sided_rotation_rotates_the_narrow_side_only(arch, tmp_path):
    """rotation="narrow": each group stores one basis (its narrow side's, from that side's Gram
    alone), the gradient is the dense one rotated on that side only, and the bases files say
    which: whole bases load into such a model, one-sided ones into a two-sided model do not."""
    base, model = calibrated(arch, SparseGradConfig(density=0.05, selection="dynamic", rotation="narrow"))
    for layer in model.sparse_layers().values():
        layer.select_on_backward = False
    dense = _backward_beside_dense(base, model, arch, make_batch(arch, 11))
    for name, layer in model.sparse_layers().items():
        narrow = "P" if layer.m <= layer.n else "Q"
        assert layer.basis.rotated_parts == (narrow,)
        stored = {part for part in ("P", "Q") if model.bases._buffers.get(f"g{model.bases.groups.index(layer.group)}_{part}") is not None}
        assert stored == {narrow}
        B = model.bases.full(layer.group, narrow)
        expected = B.T @ dense[name] if narrow == "P" else dense[name] @ B
        torch.testing.assert_close(layer.delta.grad, expected, atol=1e-5, rtol=1e-4)
    # bases files: the one-sided file does not serve a two-sided model; a whole one serves both
    model.save_bases(tmp_path / "one.safetensors")
    with pytest.raises(AdapterMismatchError, match="rotate one side only"):
        get_sparse_model(copy.deepcopy(base), SparseGradConfig(rotation="both", density=0.05), bases=tmp_path / "one.safetensors")
    both = get_sparse_model(copy.deepcopy(base), SparseGradConfig(rotation="both", density=0.05))
    both.calibrate(make_batches(arch, 2), steps=2, show_progress=False)
    both.save_bases(tmp_path / "both.safetensors")
    reuse = get_sparse_model(copy.deepcopy(base), SparseGradConfig(density=0.05, rotation="narrow"), bases=tmp_path / "both.safetensors")
    assert reuse.calibrate(make_batches(arch, 2), steps=2, show_progress=False).eigh_seconds == {}
    for layer in reuse.sparse_layers().values():
        part = layer.basis.rotated_side
        torch.testing.assert_close(reuse.bases.full(layer.group, part), both.bases.full(layer.group, part))


@pytest.mark.parametrize("path", ["activations", "weights"])
def test_fixed_values_gradient_is_rotated_gradient_on_support(path):
    base, model = calibrated("bert", SparseGradConfig(rotation="both", density=0.05, selection="fixed", compute_path=path))
    dense = _backward_beside_dense(base, model, "bert", make_batch("bert", 12))
    for name, layer in model.sparse_layers().items():
        P, Q = model.bases.full(layer.group, "P"), model.bases.full(layer.group, "Q")
        rotated = P.T @ dense[name] @ Q
        torch.testing.assert_close(layer.values.grad, rotated[layer.rows, layer.cols], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [SparseGradConfig(rotation="both", k=17, selection="dynamic"), MePropConfig(k=17)], ids=["sparsegrad", "meprop"])
@pytest.mark.parametrize("opt", ["sgd", "sparse_adamw", "attached_sgd"])
def test_dynamic_changes_exactly_k_entries_per_step(config, opt):
    _, model = calibrated("bert", config)
    params = [p for p in model.parameters() if p.requires_grad]
    if opt == "sparse_adamw":
        optimizer = SparseAdamW(params, lr=1e-2)
    else:
        optimizer = torch.optim.SGD(params, lr=1e-2)
        if opt == "attached_sgd":
            model.attach_optimizer(optimizer)
    model.train()
    for step in range(3):
        before = {n: adapted_weight(l) for n, l in model.sparse_layers().items()}
        rotated_before = {n: l.delta.detach().clone() for n, l in model.sparse_layers().items()}
        model(**make_batch("bert", 20 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, layer in model.sparse_layers().items():
            changed = (layer.delta.detach() != rotated_before[name]).sum().item()
            assert changed == 17, (name, step, changed)
            assert not torch.equal(adapted_weight(layer), before[name])


def test_sparse_adamw_state_is_bounded():
    _, model = calibrated("bert", SparseGradConfig(rotation="both", k=10, selection="dynamic"))
    optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, state_factor=2)
    train_steps(model, "bert", n=6, optimizer=optimizer)
    for layer in model.sparse_layers().values():
        state = optimizer.state[layer.delta]
        assert state["index"].numel() <= 20 < layer.delta.numel()
        assert state["exp_avg"].numel() == state["index"].numel()


def test_fixed_changes_only_the_support():
    base, model = calibrated("bert", SparseGradConfig(rotation="both", k=15, selection="fixed"))
    before = {n: adapted_weight(l) for n, l in model.sparse_layers().items()}
    train_steps(model, "bert", optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    for name, layer in model.sparse_layers().items():
        P, Q = model.bases.full(layer.group, "P").double(), model.bases.full(layer.group, "Q").double()
        rotated_change = P.T @ (adapted_weight(layer).double() - before[name].double()) @ Q
        off_support = rotated_change.clone()
        off_support[layer.rows, layer.cols] = 0
        assert off_support.abs().max() < 1e-5
        assert rotated_change[layer.rows, layer.cols].abs().min() > 0
    # frozen: everything but the values and the head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".values") or ".classifier." in n for n in trainable)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_bases_are_orthogonal_and_energy_sorted(arch):
    base = ARCHS[arch]().eval()
    batches = make_batches(arch, 4)
    model = get_sparse_model(copy.deepcopy(base), SparseGradConfig(rotation="both", density=0.05))
    torch.manual_seed(0)
    model.calibrate(batches, steps=4, show_progress=False)
    # replay the calibration's passes (same RNG → same dropout masks) to get its gradients
    torch.manual_seed(0)
    replay = copy.deepcopy(base).train()
    names = list(model.sparse_layers())
    modules = [replay.get_submodule(n) for n in names]
    grads: dict[str, list[torch.Tensor]] = {}
    for b in batches:
        for n, m, g in zip(names, modules, torch.autograd.grad(replay(**b).loss, [m.weight for m in modules])):
            grads.setdefault(model.sparse_layers()[n].group, []).append((g.t() if is_transposed(m) else g).double())
    for group, gs in grads.items():
        P, Q = model.bases.full(group, "P").double(), model.bases.full(group, "Q").double()
        torch.testing.assert_close(P.T @ P, torch.eye(P.shape[0], dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0], dtype=torch.float64), atol=1e-4, rtol=0)
        # energy of the calibration gradients along each basis direction, largest first
        energy_P = sum(((P.T @ G) ** 2).sum(1) for G in gs)
        energy_Q = sum(((G @ Q) ** 2).sum(0) for G in gs)
        for energy in (energy_P, energy_Q):
            assert bool((energy[:-1] >= energy[1:] - 1e-6 * energy[0]).all())
            assert energy[0] > energy[-1]


@settings(max_examples=15, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), count=st.integers(1, 6))
def test_gram_accumulation_equals_hosvd_of_the_stack(m, n, count):
    g = torch.Generator().manual_seed(m * 100 + n * 10 + count)
    stack = torch.randn(count, m, n, generator=g, dtype=torch.float64)
    gram_P = sum(G @ G.T for G in stack)
    gram_Q = sum(G.T @ G for G in stack)
    P, sP = eigenbasis(gram_P)
    Q, sQ = eigenbasis(gram_Q)
    # HOSVD factors: left singular vectors of the mode-1 and mode-2 unfoldings of the stack
    U1, S1, _ = torch.linalg.svd(stack.permute(1, 0, 2).reshape(m, -1), full_matrices=True)
    U2, S2, _ = torch.linalg.svd(stack.permute(2, 0, 1).reshape(n, -1), full_matrices=True)
    torch.testing.assert_close(sP[: S1.numel()].double(), S1**2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sQ[: S2.numel()].double(), S2**2, atol=1e-4, rtol=1e-4)
    # the same subspaces (columns agree up to sign where the singular values are distinct)
    for U, V, S in ((P.double(), U1, S1), (Q.double(), U2, S2)):
        for j in range(S.numel()):
            distinct = all(abs(S[j] - S[i]) > 1e-3 * (S[0] + 1e-12) for i in range(S.numel()) if i != j)
            if distinct and S[j] > 1e-6:
                assert abs(abs(float(U[:, j] @ V[:, j])) - 1) < 1e-4


def test_calibration_leaves_model_and_rng_untouched():
    base = ARCHS["bert"]()
    model = get_sparse_model(base, SparseGradConfig(rotation="both", density=0.05))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    rng = torch.get_rng_state()
    model.calibrate(make_batches("bert", 3), steps=3, show_progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert all(not l.base_layer.weight.requires_grad for l in model.sparse_layers().values())


def test_calibration_is_streaming_not_stacking(monkeypatch):
    """Gram accumulation keeps no per-step gradient: each layer's gradient is folded into the
    Grams and freed as it is produced, so at most one weight gradient is alive at a time."""
    import sparseft.calibration as calibration

    alive, peak = set(), [0]
    real = calibration.gradient_pass

    def watching(model, layers, batches, loss_fn, on_grad, desc, show_progress):
        def on_grad_watched(name, layer, G):
            for n, l in layers.items():  # every other layer's weight gradient is already freed
                if l.base_layer.weight.grad is not None:
                    alive.add(n)
            peak[0] = max(peak[0], len(alive) + 1)
            alive.clear()
            on_grad(name, layer, G)

        return real(model, layers, batches, loss_fn, on_grad_watched, desc, show_progress)

    monkeypatch.setattr(calibration, "gradient_pass", watching)
    _, model = calibrated("bert", SparseGradConfig(rotation="both", density=0.05), steps=5)
    report = model.calibration_report
    assert report.steps == 5 and set(report.eigh_seconds) == {l.group for l in model.sparse_layers().values()}
    assert peak[0] == 1


def test_budget_matches_lora_rank_and_density():
    model = get_sparse_model(ARCHS["bert"](), SparseGradConfig(rotation="both", match_lora_rank=2))
    for layer in model.sparse_layers().values():
        assert layer.k == 2 * (layer.m + layer.n)
    model = get_sparse_model(ARCHS["bert"](), SparseGradConfig(rotation="both", density=0.1))
    for layer in model.sparse_layers().values():
        assert layer.k == round(0.1 * layer.m * layer.n)
    trainable, total = model.get_nb_trainable_parameters()
    head = sum(p.numel() for p in model.base_model.classifier.parameters())
    assert trainable == sum(l.k for l in model.sparse_layers().values()) + head
    assert total == sum(p.numel() for p in ARCHS["bert"]().parameters())


def test_print_trainable_parameters(capsys):
    model = get_sparse_model(ARCHS["bert"](), SparseGradConfig(rotation="both", k=10))
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in out and f"all params: {total:,d}" in out


def test_bases_reused_for_another_task(tmp_path):
    base, model = calibrated("bert", SparseGradConfig(rotation="both", density=0.05))
    model.save_bases(tmp_path / "bases.safetensors")
    other = get_sparse_model(copy.deepcopy(base), SparseGradConfig(rotation="both", k=12), bases=tmp_path / "bases.safetensors")
    report = other.calibrate(make_batches("bert", 2, start=50), steps=2, show_progress=False)
    assert report.eigh_seconds == {}  # no new eigendecomposition: the saved bases are used
    for layer in other.sparse_layers().values():
        torch.testing.assert_close(other.bases.full(layer.group, "P"), model.bases.full(layer.group, "P"))
    # the adapter can also be saved without bases and loaded with them
    train_steps(other, "bert", n=1)
    other.save_pretrained(tmp_path / "ad", save_bases=False)
    loaded = SparseModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad", bases=tmp_path / "bases.safetensors").eval()
    other.eval()
    batch = make_batch("bert", 3)
    assert torch.equal(logits(loaded, batch), logits(other, batch))


def test_reselect_in_chunks_equals_one_pass():
    """Scoring the layers one chunk at a time (bounded memory) swaps the same entries and seeds
    the same moments as scoring them all in one pass."""
    _, model = calibrated("bert", SparseGradConfig(rotation="both", k=20, selection="fixed"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, "bert", n=2, optimizer=optimizer)
    twin, twin_opt = copy.deepcopy((model, optimizer))
    batches = make_batches("bert", 2, start=70)
    model.reselect_support(batches, optimizer=optimizer, fraction=0.25, max_score_bytes=None)
    twin.reselect_support(batches, optimizer=twin_opt, fraction=0.25, max_score_bytes=1)  # every layer alone
    for (name, a), b in zip(model.sparse_layers().items(), twin.sparse_layers().values()):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols), name
        assert torch.equal(a.values, b.values)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[a.values][key], twin_opt.state[b.values][key])


def test_reselect_support_swaps_entries_and_keeps_outputs_defined():
    _, model = calibrated("bert", SparseGradConfig(rotation="both", k=20, selection="fixed"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, "bert", n=2, optimizer=optimizer)
    before = {n: set(zip(l.rows.tolist(), l.cols.tolist())) for n, l in model.sparse_layers().items()}
    moments = {n: optimizer.state[l.values]["exp_avg"].clone() for n, l in model.sparse_layers().items()}
    swapped = model.reselect_support(make_batches("bert", 2, start=70), optimizer=optimizer, fraction=0.25)
    assert swapped == 5 * len(before)
    for name, layer in model.sparse_layers().items():
        after = set(zip(layer.rows.tolist(), layer.cols.tolist()))
        assert len(after) == 20 and len(after - before[name]) == 5
        # the swapped slots' moments are replaced (a fresh start: tests/test_reselect_adam.py), the rest kept
        assert int((optimizer.state[layer.values]["exp_avg"] != moments[name]).sum()) == 5
    train_steps(model, "bert", n=1, optimizer=optimizer)


def test_support_block_restricts_rows_and_columns():
    _, model = calibrated("bert", SparseGradConfig(rotation="both", k=30, support_rows=8, support_cols=6))
    for layer in model.sparse_layers().values():
        assert int(layer.rows.max()) < 8 and int(layer.cols.max()) < 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_follows_the_model(dtype):
    base = ARCHS["llama"]().to(dtype)
    model = get_sparse_model(base, SparseGradConfig(rotation="both", density=0.05))
    model.calibrate(make_batches("llama", 2), steps=2, show_progress=False)
    for layer in model.sparse_layers().values():
        assert model.bases.full(layer.group, "P").dtype == dtype
        # half-precision models train their values in float32 (like peft's adapters)
        assert layer.values.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    out = model(**make_batch("llama", 1))
    assert out.logits.dtype == dtype
    out.loss.backward()


def _scaled_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(actual / scale, expected / scale, atol=rtol, rtol=0)


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
@pytest.mark.parametrize("path", ["activations", "weights"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_both_compute_paths_equal_the_explicit_formula(selection, path, arch):
    """y = x (W0 + P Δ̃ Qᵀ)ᵀ + b with Δ̃ the dense rotated update, for large random values."""
    _, model = calibrated(arch, SparseGradConfig(rotation="both", density=0.2, selection=selection, compute_path=path))
    g = torch.Generator().manual_seed(3)
    for name, layer in model.sparse_layers().items():
        param = layer.values if selection == "fixed" else layer.delta
        with torch.no_grad():
            param.copy_(torch.randn(param.shape, generator=g))
        P, Q = model.bases.full(layer.group, "P").double(), model.bases.full(layer.group, "Q").double()
        dense = torch.zeros(layer.m, layer.n, dtype=torch.float64)
        if selection == "fixed":
            dense[layer.rows, layer.cols] = layer.values.detach().double()
        else:
            dense[: layer.block[0], : layer.block[1]] = layer.delta.detach().double()
        W = weight_of(layer.base_layer).double() + P @ dense @ Q.T
        x = torch.randn(3, 5, layer.n, generator=g, requires_grad=True)
        y = layer(x)
        expected = torch.nn.functional.linear(x.double(), W, layer.base_layer.bias.double())
        _scaled_close(y.double(), expected)
        # input gradient and parameter gradient against the formulas
        upstream = torch.randn(y.shape, generator=g)
        y.backward(upstream)
        _scaled_close(x.grad.double(), upstream.double() @ W)
        G = upstream.reshape(-1, layer.m).double().T @ x.detach().reshape(-1, layer.n).double()
        rotated = P.T @ G @ Q
        expected_grad = rotated[layer.rows, layer.cols] if selection == "fixed" else rotated[: layer.block[0], : layer.block[1]]
        if selection == "dynamic":  # the per-backward hook keeps the top-k only
            kept = param.grad != 0
            assert int(kept.sum()) == layer.k
            expected_grad = torch.where(kept, expected_grad, torch.zeros_like(expected_grad))
        _scaled_close(param.grad.double(), expected_grad)


def test_deep_copy_keeps_dynamic_selection():
    _, model = calibrated("bert", SparseGradConfig(rotation="both", k=5, selection="dynamic"))
    clone = copy.deepcopy(model).train()
    clone(**make_batch("bert", 1)).loss.backward()
    for layer in clone.sparse_layers().values():
        assert int((layer.delta.grad != 0).sum()) == 5
        assert layer._bank is clone.bases


def test_dense_optimizer_state_in_dynamic_mode_is_not_silent():
    _, model = calibrated("bert", SparseGradConfig(rotation="both", k=5, selection="dynamic"))
    with pytest.warns(UserWarning, match="SparseAdamW"):
        train_steps(model, "bert", n=1, optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, "bert", n=1, optimizer=SparseAdamW([p for p in model.parameters() if p.requires_grad]))
        train_steps(model, "bert", n=1)  # plain SGD without momentum keeps no state
