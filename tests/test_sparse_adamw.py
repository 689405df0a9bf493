"""SparseAdamW against a plain reference of its documented rule: lazy Adam on the top-k entries
with per-entry bias correction, state for the state_factor·k most recently selected entries."""

from __future__ import annotations

import pytest
import torch

from sparseft import SparseAdamW


def reference_run(grads: list[torch.Tensor], k: int, cap: int | None, lr: float = 1e-2, b1: float = 0.9,
                  b2: float = 0.999, eps: float = 1e-8, wd: float = 0.0) -> torch.Tensor:
    theta = torch.zeros(grads[0].numel(), dtype=torch.float64)
    m: dict[int, float] = {}
    v: dict[int, float] = {}
    c: dict[int, int] = {}
    last: dict[int, int] = {}
    for t, grad in enumerate(grads, 1):
        flat = grad.reshape(-1).double()
        chosen = sorted(torch.topk(flat.abs(), k).indices.tolist())
        for i in chosen:
            g = float(flat[i])
            m[i] = b1 * m.get(i, 0.0) + (1 - b1) * g
            v[i] = b2 * v.get(i, 0.0) + (1 - b2) * g * g
            c[i] = c.get(i, 0) + 1
            last[i] = t
            m_hat, v_hat = m[i] / (1 - b1 ** c[i]), v[i] / (1 - b2 ** c[i])
            theta[i] = theta[i] * (1 - lr * wd) - lr * m_hat / (v_hat ** 0.5 + eps)
        if cap is not None and len(m) > cap * k:  # forget the least recently selected (ties: smaller index)
            ranked = sorted(m, key=lambda i: (last[i], i), reverse=True)[: cap * k]
            for i in set(m) - set(ranked):
                del m[i], v[i], c[i], last[i]
    return theta


@pytest.mark.parametrize("cap", [1, 2, 8, None])
def test_matches_the_documented_rule(cap) -> None:
    gen = torch.Generator().manual_seed(0)
    shape, k, steps = (6, 7), 5, 40
    # gradients that move around, so entries are selected, dropped, forgotten and selected again
    grads = [torch.randn(shape, generator=gen) * (1 + torch.rand(shape, generator=gen) * 3) for _ in range(steps)]
    p = torch.nn.Parameter(torch.zeros(shape))
    p._sparseft_k = k
    opt = SparseAdamW([p], lr=1e-2, state_factor=cap)
    sizes = set()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        sizes.add(opt.state[p]["index"].numel())
    expected = reference_run(grads, k, cap).float().reshape(shape)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)
    if cap is not None:  # fixed-size state: no data-dependent shapes from step to step
        assert sizes == {min(cap * k, p.numel())}


def test_dense_parameters_take_torch_adamw_steps() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    ours = SparseAdamW([a], lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(4, 3, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b)


def test_the_jobs_adamw_is_fused_where_everything_is_on_a_gpu() -> None:
    """As transformers' Trainer does by default: one kernel per step on a GPU, torch's own choice
    (foreach) elsewhere, and never fused over a mix (which torch refuses)."""
    from types import SimpleNamespace

    from conftest import ARCHS
    from sparseft.methods import DEFAULT_METHOD, prepare
    from sparseft.optim import fused_on_gpu

    gpu = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert fused_on_gpu([gpu, gpu]) is True
    assert fused_on_gpu([gpu, torch.zeros(2)]) is None
    assert fused_on_gpu([SimpleNamespace(is_cuda=True, dtype=torch.float64)]) is None
    assert fused_on_gpu([]) is None
    for method in (DEFAULT_METHOD, "lora-mlp", "full"):
        optimizer = prepare(method, ARCHS["llama"](), rank=2).make_optimizer(1e-3)
        assert optimizer.defaults["fused"] is None, method
