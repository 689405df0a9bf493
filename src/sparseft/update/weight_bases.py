"""Bases from each layer's own weights: the singular vectors of W0 (as SVFT and PiSSA use them).

``W0 = U S Vᵀ``; the output side's basis is U, the input side's V, leading = largest singular
value, the ordering contract of the gradient bases (so ``support_narrow`` and block restrictions
keep their meaning). They need no calibration pass, and an adapter file need not store them: the
base model gives them again (its fingerprint is checked) and a small sample kept in the file
checks the recomputation.

Reproducible by construction: the narrow side's factor of an SVD is square and complete; the
wide side's is taken thin (r = min(m, n) columns, the span of W0), since the completion beyond
it is whatever the solver returns. Each column's sign is fixed (its largest-magnitude entry
positive), since solvers differ in that too.
"""

from __future__ import annotations

import torch

CHECK = 8  # rows × columns of each basis an adapter file keeps to check the recomputation


def canonical_signs(B: torch.Tensor) -> torch.Tensor:
    """``B`` with each column's sign chosen so that its largest-magnitude entry is positive."""
    pivot = B.gather(0, B.abs().argmax(0, keepdim=True))
    return B * torch.where(pivot < 0, -1.0, 1.0).to(B.dtype)


def weight_bases(W0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) of an m×n W0, thin (m×r, n×r, r = min(m, n)): the narrow side's is square.
    Computed in float32 on W0's device."""
    W = W0.detach().float()
    if W.shape[0] < W.shape[1]:  # the solver is about 2x faster on the tall orientation (measured)
        V, U = weight_bases(W.T)
        return U, V
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    return canonical_signs(U), canonical_signs(Vh.T)


def check_sample(B: torch.Tensor) -> torch.Tensor:
    """The leading ``CHECK``×``CHECK`` corner of a basis (float32, on the CPU)."""
    return B[:CHECK, :CHECK].detach().float().cpu().contiguous()


__all__ = ["CHECK", "canonical_signs", "check_sample", "weight_bases"]
