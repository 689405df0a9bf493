"""Metamorphic checks: the same layer stored another way trains the same."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_batches, tiny_gpt2
from sparseft import MePropConfig, SparseGradConfig, get_sparse_model

TARGETS = ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # square (32×32) and both non-square Conv1D shapes


def _as_linear(model: nn.Module, suffixes: list[str]) -> nn.Module:
    """The same model with each matching GPT-2 Conv1D rebuilt as the equivalent nn.Linear."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if any(name.endswith(s) for s in suffixes) and type(module).__name__ == "Conv1D":
            n, m = module.weight.shape  # Conv1D stores (in, out)
            linear = nn.Linear(n, m)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, linear)
    return out


def _train(model: nn.Module, config) -> torch.Tensor:
    sparse = get_sparse_model(model, config)
    batches = make_batches("gpt2", 4)
    if config.selection == "fixed" or not config.identity_bases:
        sparse.calibrate(batches[:2], steps=2, show_progress=False)
    opt = torch.optim.SGD([p for p in sparse.parameters() if p.requires_grad], lr=0.5)
    for b in batches:
        sparse(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    sparse.eval()
    with torch.no_grad():
        return sparse(**make_batches("gpt2", 1, start=50)[0]).logits


@pytest.mark.parametrize("config", [SparseGradConfig(density=0.2, target_modules=TARGETS),
                                    SparseGradConfig(density=0.2, target_modules=TARGETS, selection="dynamic"),
                                    MePropConfig(density=0.2, target_modules=TARGETS, selection="fixed")],
                         ids=["sparsegrad-fixed", "sparsegrad-dynamic", "meprop-fixed"])
def test_conv1d_trains_like_the_equivalent_linear(config) -> None:
    """GPT-2's Conv1D (weight stored in×out, square for attn.c_proj) and nn.Linear holding the
    same weight train to the same outputs: calibration must not transpose a square layer's
    gradient by its shape."""
    torch.manual_seed(0)
    base = tiny_gpt2().eval()
    for m in base.modules():  # dropout off: both runs see the same network
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    as_linear = _as_linear(base, TARGETS)
    with torch.no_grad():
        b = make_batches("gpt2", 1, start=50)[0]
        torch.testing.assert_close(as_linear(**b).logits, base(**b).logits)  # the rebuild is exact
        untrained = base(**b).logits
    conv = _train(base, copy.deepcopy(config))
    lin = _train(as_linear, copy.deepcopy(config))
    change = float((conv - untrained).abs().max())
    assert change > 1e-3  # training moved the outputs
    torch.testing.assert_close(conv, lin, atol=1e-4 * max(1.0, change), rtol=1e-4)
