"""The sparse-update package's seams: a new support shape or basis is one class (registered by
name and picked by a config), and a kernels backend registered for a device runs every product."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from test_core import calibrated
from test_fast_paths import check, make_layer


from sparseft import ConfigError, SparseGradConfig
from sparseft.update import BASES, SUPPORTS, FixedSupport, RotatedBasis, TorchKernels, register_basis, register_support, use_kernels
from sparseft.update.kernels import SAMPLED


def check_every_route(layer) -> None:
    """Output, input gradient and values' gradient equal dense autograd in the layer's basis, by
    every route the layer can take."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.values.normal_(generator=gen)
    for path in ("auto", SAMPLED, "activations", "weights"):
        layer.compute_path = path
        layer.values.grad = None
        check(layer, gen, (2, 5))


class BandSupport(FixedSupport):
    """A toy shape: the k entries of largest score inside a diagonal band of the block."""

    def choose(self, scores: torch.Tensor) -> None:
        rows, cols = self.block
        r, c = torch.arange(rows).unsqueeze(1), torch.arange(cols).unsqueeze(0)
        outside = (r * cols - c * rows).abs() > 2 * max(rows, cols)  # ~2 entries either side of the diagonal
        idx = torch.topk(scores.float().masked_fill(outside, -float("inf")).flatten(), self.k).indices.sort().values
        self.set(idx // cols, idx % cols)


def test_a_toy_support_is_one_class_registered_by_name():
    register_support("band", BandSupport)
    try:
        base, model = calibrated("bert", SparseGradConfig(support="band", density=0.05))
        for layer in model.sparse_layers().values():
            assert isinstance(layer.support, BandSupport)
            rows, cols = layer.block
            assert bool(((layer.rows * cols - layer.cols * rows).abs() <= 2 * max(rows, cols)).all())
            check_every_route(layer)
    finally:
        SUPPORTS.pop("band")
    with pytest.raises(ConfigError, match="band"):
        SparseGradConfig(support="band")  # known only while registered


class SeededBasis(RotatedBasis):
    """A toy basis: both sides rotated by seeded random orthogonal matrices the basis builds and
    holds itself, so calibration computes nothing for it and the bank stores nothing."""

    rotated_parts = ()
    label = "seeded"

    def __init__(self, bank, group: str, m: int, n: int, blocks: int = 1) -> None:
        super().__init__(bank, group, blocks)
        gen = torch.Generator().manual_seed(len(group))
        self.P_, self.Q_ = (torch.linalg.qr(torch.randn(d, d, generator=gen))[0] for d in (m, n))

    def matrix(self, side: str, idx, size: int, device=None) -> torch.Tensor:
        return (self.P_ if side == "P" else self.Q_)[:, idx].to(device=device)

    def version(self) -> tuple:
        return ()


def test_a_toy_basis_is_one_class_registered_by_name():
    register_basis("seeded", SeededBasis)
    try:
        _, model = calibrated("bert", SparseGradConfig(rotation="seeded", density=0.05))
        assert not model.bases.groups  # nothing computed into the bank
        for layer in model.sparse_layers().values():
            assert isinstance(layer.basis, SeededBasis)
            check_every_route(layer)
    finally:
        BASES.pop("seeded")
    with pytest.raises(ConfigError, match="seeded"):
        SparseGradConfig(rotation="seeded")  # known only while registered


@dataclasses.dataclass(frozen=True)
class CountingKernels(TorchKernels):
    """The reference, counting each primitive it runs (a device backend overrides the same)."""

    calls: dict = dataclasses.field(default_factory=dict)

    def __getattribute__(self, name: str):
        value = object.__getattribute__(self, name)
        if callable(value) and not name.startswith("_") and name not in ("calls", "sddmm_supported"):
            calls = object.__getattribute__(self, "calls")
            calls[name] = calls.get(name, 0) + 1
        return value


def test_registered_kernels_run_every_product():
    """With a backend registered for the CPU, the rotation, the sampled product, the merge and the
    linear products all go through it, and the layer computes what the reference computes."""
    for rotation, cache in (("narrow", False), ("both", True)):
        layer, gen = make_layer(24, 8, 40, "fixed", False, False, SAMPLED, seed=1, cache=cache, rotation=rotation)
        kn = CountingKernels()
        with use_kernels("cpu", kn):
            check(layer, gen, (3, 4))
            layer.values.grad = None
            layer._merge_into(layer.base_layer.weight.detach())
        assert {"rotate", "sampled_product", "linear", "csr"} <= set(kn.calls), kn.calls
        assert "merge" in kn.calls or "sparse_dense" in kn.calls, kn.calls
        layer.values.grad = None
        check(layer, gen, (3, 4))  # and the reference again, outside the block


def test_meprop_is_the_basis_that_rotates_nothing():
    """MeProp's basis is rotation="none" (no flag lines up with "both" any more); MeProp files
    written before read "both" as the identity, and SparseGrad refuses "none", naming MeProp."""
    from sparseft import MePropConfig
    from sparseft.config import SparseConfig
    from sparseft.update import IdentityBasis

    assert MePropConfig().rotation == "none"
    legacy = SparseConfig.from_dict({"method": "meprop", "rotation": "both", "density": 0.05})
    assert isinstance(legacy, MePropConfig) and legacy.rotation == "none"
    with pytest.raises(ConfigError, match="MePropConfig"):
        SparseGradConfig(rotation="none")
    _, model = calibrated("bert", MePropConfig(density=0.05, selection="fixed"))
    assert all(isinstance(layer.basis, IdentityBasis) for layer in model.sparse_layers().values())


@dataclasses.dataclass(frozen=True)
class SlowKernels(TorchKernels):
    """The reference with one primitive made slow: what the measured choice must route around."""

    slow: str = "sampled_product"
    measure_paths: bool = True
    calls: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def sampled_product(self, mask, left, right):
        self.calls["sampled_product"] = self.calls.get("sampled_product", 0) + 1
        if self.slow == "sampled_product":
            time.sleep(0.02)
        return super().sampled_product(mask, left, right)

    def gather(self, t, index):
        if self.slow == "gather":
            time.sleep(0.02)
        return super().gather(t, index)


@pytest.mark.parametrize("rotation,identity", [("narrow", False), ("both", True)])  # sparsegrad; the default's identity bases
def test_measured_paths_take_the_faster_on_this_device_and_keep_it(rotation, identity):
    """``measure_paths``: the sampled product and the cheapest whole bracketing are timed once
    per layer and dtype, the faster kept; either way the gradients are the reference's."""
    for slow, want in (("sampled_product", "not sampled"), ("gather", SAMPLED)):
        layer, gen = make_layer(24, 8, 40, "fixed", identity, False, "auto", seed=2, cache=False, rotation=rotation)
        assert layer.update.path_for(12) == SAMPLED  # what the count alone chooses here
        with use_kernels("cpu", SlowKernels(slow=slow)) as kn:
            check(layer, gen, (3, 4))
            ((path, seconds),) = layer.update.measured.values()
            assert SAMPLED in seconds and len(seconds) == 2
            assert (path == SAMPLED) == (want == SAMPLED), (slow, seconds)
            assert max(seconds.values()) >= 0.02
            layer.values.grad = None
            before = dict(layer.update.measured)
            kn.calls.clear()
            check(layer, gen, (5, 4))  # another token count: the choice is kept, not timed again
            assert layer.update.measured == before
            assert bool(kn.calls) == (path == SAMPLED)  # and the gradient took the chosen path
        layer.values.grad = None
        check(layer, gen, (3, 4))  # the reference (nothing measured) computes the same


def test_the_package_has_no_import_loop():
    """Every import counted, inside functions too (scripts/import_graph.py): a loop means two
    modules that cannot be read, or loaded, one before the other."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("import_graph", root / "scripts" / "import_graph.py")
    graph_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_module)
    mods = graph_module.modules(root / "src", "sparseft")
    graph = {name: graph_module.imports(name, path, set(mods)) for name, path in mods.items()}
    assert graph_module.cycles(graph) == []
