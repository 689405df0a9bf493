"""Grouped fixed supports (``SparseGradConfig.support_group``): runs of the wide side's rows share
their c rotated directions, and the value gradient and merge run as batched dense products.
They must give the numbers of the straightforward formulas, and fall back when the structure
is lost."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core import _backward_beside_dense
from test_fast_paths import check, make_layer, rebuilding_twin, same_twin_output, step_twins

from conftest import ARCHS, assert_save_load_merge_round_trip, make_batch, make_batches
from sparseft import ConfigError, SparseGradConfig, get_sparse_model
from sparseft.layer import GRAD_PATHS, adapted_weight
from sparseft.update.kernels import SAMPLED


def _grouped_layer(m: int, n: int, c: int, run: int, seed: int, cache: bool = False, path: str = SAMPLED,
                   longer: int = 0):
    """A one-sided layer with a grouped random support of c directions per wide row (c + 1 for
    the first ``longer`` runs); ``path`` SAMPLED: the value gradient through the grouped batched
    product (tiny layers would otherwise pick a dense bracketing)."""
    wide = max(m, n)
    layer, gen = make_layer(m, n, c * wide + longer * run, "fixed", False, False, path, seed, cache=cache, rotation="narrow",
                            support_group=run)
    layer.choose_support(torch.rand(layer.block, generator=gen))
    perm = torch.randperm(layer.k, generator=gen)  # values in no particular order (as after a reload)
    layer.set_support(layer.rows[perm], layer.cols[perm])
    with torch.no_grad():
        layer.values.normal_(generator=gen)
    return layer, gen


@settings(max_examples=40, deadline=None)
@given(narrow=st.integers(2, 7), runs=st.integers(1, 4), run=st.integers(1, 4), tall=st.booleans(),
       tokens=st.integers(1, 9), seed=st.integers(0, 2**16), data=st.data())
def test_grouped_paths_equal_the_straightforward_formulas(narrow, runs, run, tall, tokens, seed, data):
    """Forward, input gradient and value gradient through the grouped paths equal dense autograd
    of W0 + ΔW, for layers wider in their outputs (m > n) and in their inputs."""
    wide = max(runs * run, narrow + 1)
    wide += -wide % run  # a whole number of runs
    c = data.draw(st.integers(1, narrow - 1))
    longer = data.draw(st.integers(0, wide // run - 1))  # runs with c + 1 directions
    m, n = (wide, narrow) if tall else (narrow, wide)
    path = data.draw(st.sampled_from([SAMPLED, SAMPLED, "auto", *GRAD_PATHS]))
    layer, gen = _grouped_layer(m, n, c, run, seed, cache=data.draw(st.booleans()), path=path, longer=longer)
    runs_found = layer.support.grouped
    assert runs_found is not None
    assert [J.shape for J in runs_found.J] == [s for s in ((longer, c + 1), (wide // run - longer, c)) if s[0]]
    check(layer, gen, (tokens,))
    W0 = layer.base_layer.weight.detach()
    torch.testing.assert_close(layer._merge_into(W0), W0 + layer.delta_weight().detach(), atol=1e-5, rtol=1e-5)


def test_grouped_choice_is_runs_of_shared_directions():
    layer, _ = _grouped_layer(24, 6, 2, 4, seed=1)
    rows, cols = layer.rows, layer.cols
    assert torch.bincount(rows, minlength=24).eq(2).all()  # c directions for every wide row
    for start in range(0, 24, 4):  # each run of 4 rows shares its two directions
        sets = {tuple(sorted(cols[rows == r].tolist())) for r in range(start, start + 4)}
        assert len(sets) == 1
    # by score: a run gets the directions of its largest summed score
    scores = torch.zeros(24, 6)
    scores[:4, 5] = scores[:4, 3] = 1.0
    layer.choose_support(scores)
    assert sorted(layer.cols[layer.rows == 2].tolist()) == [3, 5]


def test_a_support_without_runs_falls_back_and_stays_exact():
    """Reselection (or a hand-set support) that breaks the runs loses the structure: the layer
    then takes the SDDMM and CSR paths and its numbers stay right."""
    layer, gen = _grouped_layer(12, 5, 2, 3, seed=2)
    assert layer.support.grouped is not None
    rows, cols = layer.rows.clone(), layer.cols.clone()
    cols[0] = (cols[0] + 1) % 5
    while bool(((rows == rows[0]) & (cols == cols[0])).sum() > 1):  # keep the entries distinct
        cols[0] = (cols[0] + 1) % 5
    layer.set_support(rows, cols)
    assert layer.support.grouped is None
    check(layer, gen, (7,))


def test_support_group_config():
    config = SparseGradConfig(match_lora_rank=2, support_group=8)
    assert config.budget(64, 32) == 2 * 96 // 64 * 64  # k rounded down to whole directions per wide row
    assert config.budget(32, 64) == 192
    assert config.budget(48, 20) == 136  # runs of 8 with 2 or 3 directions: exact
    for k, (m, n) in ((100, (64, 16)), (77, (16, 40)), (5, (24, 6))):
        got = SparseGradConfig(k=k, support_group=8).budget(m, n)
        wide = max(m, n)
        assert abs(got - max(k, wide)) <= 4 and (got - wide) % 8 == 0, (k, m, n, got)  # within half a run
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="support_group"):
            SparseGradConfig(support_group=bad)
    for kwargs in ({"rotation": "both"}, {"selection": "dynamic"}):
        with pytest.raises(ConfigError, match="support_group"):
            SparseGradConfig(support_group=4, **kwargs)
    with pytest.raises(ConfigError, match="larger than"):  # the asked k is checked, not the rounded one
        SparseGradConfig(k=64 * 32 + 1, support_group=16).budget(64, 32)
    restricted = SparseGradConfig(k=100, support_group=8, support_rows=10)
    assert restricted.run_rows(64, 32) is None and restricted.budget(64, 32) == 100  # wide side restricted: ungrouped
    assert SparseGradConfig().support_group is None  # the default support is ungrouped


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_grouped_model_gradient_is_the_rotated_dense_gradient(arch):
    """On a calibrated model, every layer's support is grouped and its values' gradient is the
    dense autograd gradient rotated on the narrow side."""
    torch.manual_seed(0)
    base = ARCHS[arch]().eval()
    model = get_sparse_model(copy.deepcopy(base), SparseGradConfig(match_lora_rank=2, support_group=4))
    model.calibrate(make_batches(arch, 4), steps=4, show_progress=False)
    for layer in model.sparse_layers().values():
        layer.compute_path = SAMPLED  # the grouped product (tiny layers would pick a dense bracketing)
    dense = _backward_beside_dense(base, model, arch, make_batch(arch, 12))
    for name, layer in model.sparse_layers().items():
        assert layer.support.grouped is not None, name
        P = layer.basis.matrix("P", slice(None), layer.m).float()
        Q = layer.basis.matrix("Q", slice(None), layer.n).float()
        rotated = P.T @ dense[name] @ Q
        torch.testing.assert_close(layer.values.grad, rotated[layer.rows, layer.cols], atol=1e-5, rtol=1e-4)


def test_grouped_save_load_and_merge_round_trip(tmp_path):
    torch.manual_seed(0)
    base = ARCHS["bert"]().eval()
    model = get_sparse_model(copy.deepcopy(base), SparseGradConfig(match_lora_rank=2, support_group=4))
    model.calibrate(make_batches("bert", 2), steps=2, show_progress=False)
    loaded = assert_save_load_merge_round_trip(model, copy.deepcopy(base), tmp_path)
    for name, layer in loaded.sparse_layers().items():
        assert layer.support.grouped is not None, name  # found again in the loaded entries
        torch.testing.assert_close(adapted_weight(layer), adapted_weight(model.sparse_layers()[name]))


def test_grouped_cached_merge_follows_steps_reloads_and_reselection():
    """Bit-for-bit, as for unstructured supports: a grouped layer keeping W0 + ΔW between calls
    computes what one rebuilding it every call computes, through optimizer steps, a
    load_state_dict of another grouped support, and a reselection that breaks the runs."""
    cached, gen = _grouped_layer(16, 6, 2, 4, seed=3, cache=True)
    fresh = rebuilding_twin(cached)
    opts = [torch.optim.AdamW([layer.values], lr=0.05) for layer in (cached, fresh)]

    def step_both():
        step_twins(cached, fresh, opts, gen, micro_batches=1)

    def same_output():
        return same_twin_output(cached, fresh, gen)

    for _ in range(3):
        step_both()
    assert same_output() and cached.update._cache is not None
    other, _ = _grouped_layer(16, 6, 2, 4, seed=99)
    for layer in (cached, fresh):
        layer.load_state_dict(other.state_dict())
        assert layer.support.grouped is not None
        assert torch.equal(layer.rows, other.rows)
    assert same_output()
    for layer in (cached, fresh):
        layer.support.regrow(layer.values, torch.rand(layer.block, generator=torch.Generator().manual_seed(1)), 5)
    assert cached.support.grouped is None  # the runs are gone: SDDMM and CSR from here on
    assert same_output()
    step_both()
    assert same_output()


def test_grouped_support_within_a_narrow_restriction():
    """support_narrow restricts the directions a run may take; the runs stay whole."""
    torch.manual_seed(0)
    model = get_sparse_model(ARCHS["bert"]().eval(), SparseGradConfig(match_lora_rank=1, support_group=4, support_narrow=5))
    model.calibrate(make_batches("bert", 2), steps=2, show_progress=False)
    for name, layer in model.sparse_layers().items():
        runs = layer.support.grouped
        assert runs is not None, name
        assert int(runs.used.max()) < 5  # only the 5 leading narrow directions
