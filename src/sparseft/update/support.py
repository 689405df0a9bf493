"""Supports: which entries of the rotated update Δ̃ train, the parameter that holds them, and
the kernels that read them.

A support owns:

- the trainable parameter's shape (``new_parameter``) and how it becomes the a×b matrix
  D = Δ̃[R, C] (``dense``), with R, C the rotated rows/columns it covers (``index``);
- the parameter's gradient from the activations (``value_grad``: a gather of the basis' a×b
  value gradient, a sampled product at its k entries, or its own batched products);
- its O(k) export (``sparse_state`` / ``load_sparse_state``) and its state-dict extra state.

One class per kind, registered by name (:func:`register_support`; ``SparseConfig.support``
picks one, :func:`make_support` builds it):

- :class:`FixedSupport` ("fixed"): k positions chosen once in calibration; the parameter is the
  k-vector ``values``, so any optimizer keeps O(k) state.
- :class:`GroupedSupport` ("grouped", ``SparseConfig.support_group``): a fixed support whose wide
  rows come in runs that share their narrow directions; its value gradient is one batched dense
  product per segment of runs.
- :class:`DynamicSupport` ("dynamic", the paper's): the parameter is the dense ``delta`` over the
  allowed block; its gradient is cut to its top-k entries before each optimizer step.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from ..config import run_counts
from ..distributed import SHARDED_DYNAMIC, is_sharded
from ..errors import ConfigError
from .kernels import REFERENCE, SAMPLED, TorchKernels


FULL_COVER = 0.9  # a support on at least this share of its block's rows (columns) keeps all of them in D


def _compact(idx: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the rows D keeps, each entry's place among them, how many distinct rows ``idx`` touches)
    for entries ``idx`` in 0..size-1: the distinct rows, or all of them where the entries touch
    at least ``FULL_COVER`` of them. A random 1% support misses a row of a 5632×2048 layer in
    about one layer in seven, and restricting g and x to the rows it touches copies them on
    every step (docs/performance.md); a few zero rows of D cost less."""
    distinct, place = torch.unique(idx, return_inverse=True)
    touched = distinct.numel()
    if FULL_COVER * size <= touched < size:
        return torch.arange(size, device=idx.device), idx.long(), touched
    return distinct, place, touched


def _is_leading(idx: torch.Tensor) -> bool:
    """Whether the sorted distinct indices ``idx`` are exactly 0..len-1 (reads one value back)."""
    size = idx.numel()
    return bool(size) and int(idx[-1]) == size - 1


class Grouped(NamedTuple):
    """A grouped support's runs (``SparseGradConfig.support_group``): runs of ``run`` wide rows,
    each training its own narrow directions. Runs with the same count form a segment (in
    practice two: c + 1 directions, then c): ``J[s]`` holds segment s's directions (runs × c_s).
    ``order`` lists the values segment by segment, run by run, row by row, direction by
    direction (the blocks of the batched products); ``directions`` is the J's flattened in turn,
    ``used`` its distinct entries (sorted) and ``where`` the place of each among them."""

    J: tuple[torch.Tensor, ...]
    order: torch.Tensor
    directions: torch.Tensor
    used: torch.Tensor
    where: torch.Tensor
    run: int

    def to(self, device: torch.device) -> "Grouped":
        return Grouped(tuple(J.to(device) for J in self.J), *(t.to(device) for t in self[1:5]), self.run)


_MAX_SEGMENTS = 8  # a support with more changes of count than this is no longer "grouped"


def seeded_scores(block: tuple[int, int], seed: int) -> torch.Tensor:
    """Uniform scores of a ``block`` from ``seed`` (CPU generator): their top-k is a random support
    that the seed alone defines, so an adapter file stores the seed, not k indices."""
    return torch.rand(block, generator=torch.Generator().manual_seed(int(seed)))


def index_digest(rows: torch.Tensor, cols: torch.Tensor) -> str:
    """A short SHA-256 of a support's positions, in value order: a support rebuilt from its
    seed must match it (a change of torch's generator would otherwise move the values silently)."""
    flat = torch.stack([rows.long().cpu(), cols.long().cpu()]).contiguous()
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


class FixedSupport:
    """k fixed positions of the ``block`` (rows × cols) of the rotated space.

    Its tensors are non-persistent buffers ``R``, ``C``, ``local`` of the ``owner`` layer (so
    they follow ``.to(device)`` and keep their names there). Stored compactly: the rotated rows R
    and columns C it touches (all of a side it nearly covers, ``FULL_COVER``), and per value its
    position in D = Δ̃[R, C] (flattened), int32 where that fits. 4 bytes per entry instead of the
    16 of (rows, cols) as int64: next to the 16 bytes of value, gradient and AdamW moments that
    LoRA also pays, the index is the only memory LoRA does not need."""

    selection = "fixed"  # chosen once (in calibration), not every step
    param_name = "values"

    def __init__(self, owner: nn.Module, k: int, block: tuple[int, int], device: torch.device | None = None) -> None:
        self.owner, self.k, self.block = owner, int(k), block
        self.generation = 0  # bumped whenever the support changes (for caches of the merged update)
        self.seed: int | None = None  # while the support is seeded_scores(block, seed)'s choice (the layer sets it)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        self._store(empty, empty)

    R = property(lambda self: self.owner.R)
    C = property(lambda self: self.owner.C)
    local = property(lambda self: self.owner.local)

    def new_parameter(self, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        return nn.Parameter(torch.zeros(self.k, dtype=dtype, device=device))

    def _store(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        R, local_r, touched_rows = _compact(rows, self.block[0])
        C, local_c, touched_cols = _compact(cols, self.block[1])
        self.touched = (touched_rows, touched_cols)  # distinct rows and columns with an entry (R, C may hold more)
        local = local_r * C.numel() + local_c
        index_dtype = torch.int32 if R.numel() * C.numel() < 2**31 else torch.long
        self.owner.register_buffer("R", R.to(torch.long), persistent=False)
        self.owner.register_buffer("C", C.to(torch.long), persistent=False)
        self.owner.register_buffer("local", local.to(index_dtype), persistent=False)
        self.generation += 1
        self._patterns: dict = {}  # per side, its CSR pattern; per ("flat", width), flat_index
        # decided here, once per support: index() then reads nothing back, on whatever device R and C move to
        self._leading = (_is_leading(R), _is_leading(C))

    def csr(self, values: torch.Tensor, side: str, kn: TorchKernels = REFERENCE) -> torch.Tensor:
        """D (a×b, ``side`` "Q") or Dᵀ (b×a, ``side`` "P") as a sparse CSR tensor of ``values``
        (not differentiable). The pattern (row pointers, columns, order of the values) depends only
        on the support, so it is built once per support, and copied to another device (building
        reads a value back: bincount's size)."""
        pattern = self._patterns.get(side)
        if pattern is not None and pattern[0].device != values.device:
            pattern = self._patterns[side] = (*(t.to(values.device) for t in pattern[:3]), pattern[3])
        if pattern is None:
            a, b = self.shape()
            local = self.local.long().to(values.device)
            r, c = local // max(1, b), local % max(1, b)
            if side == "P":
                r, c, a, b = c, r, b, a
            order = torch.argsort(r * b + c)
            crow = torch.zeros(a + 1, dtype=torch.long, device=values.device)
            crow[1:] = torch.bincount(r, minlength=a).cumsum(0)
            pattern = self._patterns[side] = (crow, c.index_select(0, order), order, (a, b))
        crow, col, order, shape = pattern
        return kn.csr(crow, col, values.detach().index_select(0, order), shape)

    def flat_index(self, width: int) -> torch.Tensor:
        """rows·width + cols of each value, in the order of ``values``: where it sits in a row-major
        matrix ``width`` columns wide. Built once per support and device, since a merge scatters
        through it on every forward and input gradient, and on a GPU each of the eight small ops
        that build it is a kernel launch. A support on every row and column already stores it
        (``local``); otherwise int32 where that fits."""
        cached = self._patterns.get(("flat", width))
        if cached is None or cached.device != self.local.device:
            rows, cols = self.index()
            if isinstance(rows, slice) and isinstance(cols, slice) and self.C.numel() == width:
                cached = self.local
            else:
                cached = self.rows * width + self.cols
                cached = cached.to(torch.int32) if self.block[0] * width < 2**31 else cached
            self._patterns[("flat", width)] = cached
        return cached

    @property
    def rows(self) -> torch.Tensor:
        """Rotated row of each value (int64, computed from the compact support)."""
        return self.R.index_select(0, self.local.long() // max(1, self.C.numel()))

    @property
    def cols(self) -> torch.Tensor:
        """Rotated column of each value (int64, computed from the compact support)."""
        return self.C.index_select(0, self.local.long() % max(1, self.C.numel()))

    @torch.no_grad()
    def set(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Entry i of ``values`` lives at rotated position (rows[i], cols[i])."""
        if rows.numel() != self.k or cols.numel() != self.k:
            raise ValueError(f"support needs {self.k} entries, got {rows.numel()}")
        if int(rows.max()) >= self.block[0] or int(cols.max()) >= self.block[1]:
            raise ValueError("support lies outside the allowed block")
        device = self.R.device
        self._store(rows.to(device), cols.to(device))
        self.seed = None

    @torch.no_grad()
    def choose(self, scores: torch.Tensor) -> None:
        """The k entries of the largest ``scores`` (shape = block)."""
        idx = torch.topk(scores.flatten().float(), self.k, sorted=False).indices.sort().values
        self.set(idx // self.block[1], idx % self.block[1])

    def sampled_grad(self, left: torch.Tensor, right: torch.Tensor, kn: TorchKernels = REFERENCE) -> torch.Tensor:
        """The k entries of ``leftᵀ right`` (left N×a, right N×b) at the support, in the order of
        ``values`` (``kn.sampled_product``: N·k multiply-adds instead of N·a·b)."""
        entries = kn.sampled_product(self.csr(left.new_zeros(self.k), "Q", kn), left, right)
        order = self._patterns["Q"][2]
        return torch.empty_like(entries).index_copy_(0, order, entries)

    def value_grad(self, basis, g: torch.Tensor, x: torch.Tensor, path: str, kn: TorchKernels) -> torch.Tensor:
        """∂L/∂values: P_Rᵀ gᵀ x Q_C at the support, by the sampled product (``SAMPLED``, where the
        kernels take these activations) or by the basis' bracketing ``path``, then gathered."""
        rows, cols = self.index()
        if path == SAMPLED:
            if kn.sddmm_supported(x):
                return self.sampled_grad(*basis.sampled_factors(g, x, rows, cols, kn), kn)
            path = "activations"  # the same bracketing, whole
        return kn.gather(basis.value_grad(g, x, rows, cols, path, kn), self.local)

    def index(self) -> tuple[torch.Tensor | slice, torch.Tensor | slice]:
        """(R, C) for the compute paths: a leading run 0..a-1 (every row of a random support
        at ~1% density, every direction of a narrow block) as a slice, so the basis columns
        are a view instead of an index_select copy of P[:, R] on every call."""
        R, C = self.R, self.C
        return (slice(0, R.numel()) if self._leading[0] else R), (slice(0, C.numel()) if self._leading[1] else C)

    def shape(self) -> tuple[int, int]:
        return self.R.numel(), self.C.numel()

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """D = Δ̃[R, C] (a×b); differentiable in ``values``."""
        # index_copy, not advanced indexing: the latter is much slower on CPU
        a, b = self.shape()
        return values.new_zeros(a * b).index_copy(0, self.local.long(), values).view(a, b)

    def compact(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(D, R, C): the update's a×b core and the rotated rows/columns it touches."""
        return self.dense(values.detach()), self.R, self.C

    @torch.no_grad()
    def regrow(self, values: torch.Tensor, scores: torch.Tensor, n_swap: int, optimizer: Any = None,
               grads: torch.Tensor | None = None) -> int:
        """SpIEL-style drop/grow: the ``n_swap`` smallest |values| leave (back to the base weight),
        the largest ``scores`` off the support come in. Returns the count.

        Optimizer state of the swapped slots: a grown entry must not inherit the global step
        count with zero moments (Adam's bias correction would then scale its first update by
        (1-β1)/sqrt(1-β2)·sqrt(1-β2^t)/(1-β1^t): up to ≈3.2× lr late in training). With ``grads``
        (the rotated gradient, block-shaped) its moments are seeded as m = (1-β1^t)·g,
        v = (1-β2^t)·g², the state a fresh Adam would have after seeing g with the current step
        count, so its next update is ≈ lr·g/|g|; other state tensors of the slot are zeroed."""
        flat = scores.flatten().clone()
        flat[self.rows * self.block[1] + self.cols] = -float("inf")
        n_swap = min(n_swap, int(torch.isfinite(flat).sum()))
        if n_swap == 0:
            return 0
        drop = torch.topk(values.abs().float(), n_swap, largest=False).indices
        grow = torch.topk(flat, n_swap).indices
        rows, cols = self.rows.clone(), self.cols.clone()
        rows[drop], cols[drop] = grow // self.block[1], grow % self.block[1]
        values[drop] = 0
        self.set(rows, cols)
        if optimizer is not None:
            state = optimizer.state.get(values, {})
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == values.shape:
                    value[drop] = 0
            group = next((g for g in optimizer.param_groups if any(p is values for p in g["params"])), None)
            step = state.get("step")
            if grads is not None and group is not None and "betas" in group and step is not None \
                    and "exp_avg" in state and "exp_avg_sq" in state:
                t = float(step)
                beta1, beta2 = group["betas"]
                g = grads.flatten().index_select(0, grow).to(values.dtype)
                state["exp_avg"][drop] = (1 - beta1**t) * g
                state["exp_avg_sq"][drop] = (1 - beta2**t) * g * g
        return n_swap

    @torch.no_grad()
    def sparse_state(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rows.clone(), self.cols.clone(), values.detach().clone()

    @torch.no_grad()
    def load_sparse_state(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, saved: torch.Tensor) -> None:
        self.set(rows, cols)
        values.copy_(saved.to(values.dtype))

    # State dict: the support's length is only known after calibration, so its buffers are not
    # persistent; the layer's extra state carries one (2, k) index tensor (int32 where that fits),
    # (2, 0) before calibration.
    def extra_state(self, calibrated: bool) -> torch.Tensor:
        if not calibrated:
            return torch.zeros(2, 0, dtype=torch.long)
        return torch.stack([self.rows, self.cols]).to(torch.int32 if max(self.block) < 2**31 else torch.long)

    def load_extra_state(self, state: torch.Tensor) -> bool:
        """Returns whether the state held a support (the layer is then calibrated)."""
        if state.numel():
            self.set(state[0].long(), state[1].long())
            return True
        return False


class GroupedSupport(FixedSupport):
    """A fixed support whose wide side (dim ``dim`` of the block) comes in runs of ``run`` rows,
    every row of a run training the same narrow directions (``SparseConfig.support_group``). Its
    value gradient is one batched dense product per segment of runs (``kn.run_products``): N·k
    multiply-adds, as the sampled product, but read as the activations lie. The run structure
    is found in the stored entries themselves, so a reloaded support has it too, and one that
    lost it (a reselection) falls back to the plain fixed support's paths."""

    def __init__(self, owner: nn.Module, k: int, block: tuple[int, int], device: torch.device | None = None, *,
                 dim: int, run: int) -> None:
        self.grouping = (dim, run)
        self.grouped: Grouped | None = None
        super().__init__(owner, k, block, device)

    def _store(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        super()._store(rows, cols)
        self.grouped = self._find_runs(rows, cols)

    def _find_runs(self, rows: torch.Tensor, cols: torch.Tensor) -> Grouped | None:
        """The run structure of a grouped support, found in the stored entries themselves (so a
        reloaded support has it too, and a reselected one that lost it falls back to the SDDMM):
        every row of a run holds the same narrow directions."""
        if rows.numel() != self.k or self.k == 0:
            return None
        dim, run = self.grouping
        width, depth = self.block[dim], self.block[1 - dim]
        if width % run:
            return None
        wide, thin = (rows, cols) if dim == 0 else (cols, rows)
        per_run = torch.bincount(wide, minlength=width).view(width // run, run)
        if not bool((per_run == per_run[:, :1]).all()) or int(per_run.min()) < 1:
            return None
        counts, lengths = torch.unique_consecutive(per_run[:, 0], return_counts=True)
        if counts.numel() > _MAX_SEGMENTS:
            return None
        order = torch.argsort(wide * depth + thin)
        directions = thin.index_select(0, order)
        J, start = [], 0
        for c, runs in zip(counts.tolist(), lengths.tolist()):
            seg = directions[start:start + runs * run * c].view(runs, run, c)
            if not bool((seg == seg[:, :1]).all()):
                return None
            J.append(seg[:, 0].contiguous())
            start += runs * run * c
        flat = torch.cat([j.reshape(-1) for j in J])
        used, where = torch.unique(flat, return_inverse=True)
        return Grouped(tuple(J), order, flat, used, where, run)

    def runs_on(self, device: torch.device) -> Grouped | None:
        """``grouped`` on ``device`` (moved once: it is plain data, not buffers of the layer)."""
        runs = self.grouped
        if runs is not None and runs.order.device != device:
            runs = self.grouped = runs.to(device)
        return runs

    def _choose_runs(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, cols) of a grouped support: per run of the wide side, the c (or c + 1) narrow
        directions of the largest summed ``scores`` (random scores: random directions)."""
        dim, run = self.grouping
        width = self.block[dim]
        c, h = run_counts(self.k, width, run)
        if width % run or c * width + h * run != self.k or c + (h > 0) > scores.shape[1 - dim]:
            return None
        per_run = (scores if dim == 0 else scores.T).float().reshape(width // run, run, -1).sum(1)
        best = torch.topk(per_run, c + (h > 0), dim=1).indices
        wide, thin = [], []
        for first, last, count in ((0, h, c + 1), (h, width // run, c)):
            if last > first and count:
                J = best[first:last, :count].sort(dim=1).values
                wide.append(torch.arange(first * run, last * run, device=scores.device).repeat_interleave(count))
                thin.append(J.repeat_interleave(run, dim=0).reshape(-1))
        wide, thin = torch.cat(wide), torch.cat(thin)
        return (wide, thin) if dim == 0 else (thin, wide)

    @torch.no_grad()
    def choose(self, scores: torch.Tensor) -> None:
        """The best c directions of each run by summed ``scores`` (any k entries where the budget
        does not split into runs)."""
        chosen = self._choose_runs(scores)
        if chosen is None:
            super().choose(scores)
        else:
            self.set(*chosen)

    def value_grad(self, basis, g: torch.Tensor, x: torch.Tensor, path: str, kn: TorchKernels) -> torch.Tensor:
        runs = self.runs_on(x.device)
        if path != SAMPLED or runs is None:
            return super().value_grad(basis, g, x, path, kn)
        wide, thin = (g, x) if self.grouping[0] == 0 else (x, g)
        directions = self._run_directions(basis, thin, runs, kn).to(wide.dtype)  # N × Σ runs·c
        flat = kn.run_products(wide, directions, [tuple(J.shape) for J in runs.J], runs.run)
        return flat.new_empty(flat.numel()).index_copy_(0, runs.order, flat)

    @staticmethod
    def _run_directions(basis, thin: torch.Tensor, runs: Grouped, kn: TorchKernels) -> torch.Tensor:
        """N×(Σ runs·c): ``thin`` (N×d, the narrow side's activations) on every run's directions.
        Only the distinct directions in use are rotated (N·d·|used| multiply-adds; the whole
        basis, block by block, once they are most of it), then gathered run by run."""
        d = thin.shape[1]
        if runs.used.numel() * 2 > d or basis.blocks > 1:
            return kn.rotate(thin, basis.columns(slice(0, d), thin.device), slice(0, d), basis.blocks).index_select(1, runs.directions)
        return (thin @ basis.columns(runs.used, thin.device).to(thin.dtype)).index_select(1, runs.where)


class DynamicSupport:
    """Any k entries of the ``block``, re-chosen as the top-k of the gradient every step."""

    selection = "dynamic"
    param_name = "delta"
    generation = 0  # the block never changes

    def __init__(self, owner: nn.Module, k: int, block: tuple[int, int], device: torch.device | None = None) -> None:
        self.k, self.block = int(k), block
        # Until an optimizer takes over selection (attach_optimizer), cut the gradient to its
        # top-k after every backward, so plain loops never train densely by accident.
        self.select_on_backward = True
        self._hooked_param_id = 0

    def new_parameter(self, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        delta = nn.Parameter(torch.zeros(self.block, dtype=dtype, device=device))
        delta._sparseft_k = self.k  # read by SparseAdamW
        # FSDP replaces parameters by shards and gathered copies that carry neither the marker
        # nor the hook: check_parameter() tests that `delta` is still this object.
        self._param = delta
        self.ensure_hook(delta)
        return delta

    def check_parameter(self, delta: torch.Tensor | None) -> None:
        if delta is not self._param:
            raise ConfigError(SHARDED_DYNAMIC)

    def index(self) -> tuple[slice, slice]:
        return slice(0, self.block[0]), slice(0, self.block[1])

    def shape(self) -> tuple[int, int]:
        return self.block

    def dense(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def compact(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(D, R, C) over the rows and columns any trained entry occupies."""
        delta = delta.detach()
        R = (delta != 0).any(1).nonzero().flatten()
        C = (delta != 0).any(0).nonzero().flatten()
        return delta.index_select(0, R).index_select(1, C), R, C

    def value_grad(self, basis, g: torch.Tensor, x: torch.Tensor, path: str, kn: TorchKernels) -> torch.Tensor:
        """∂L/∂delta: the whole block's P_Rᵀ gᵀ x Q_C (its top-k is taken after the backward)."""
        rows, cols = self.index()
        return basis.value_grad(g, x, rows, cols, path, kn)

    def ensure_hook(self, delta: torch.Tensor) -> None:
        """Register the top-k hook on ``delta`` once per parameter object: a deep copy (or a
        replaced parameter) gets a new object, and hooks do not travel with copies."""
        if self._hooked_param_id != id(delta):
            delta.register_post_accumulate_grad_hook(self._after_backward)
            self._hooked_param_id = id(delta)

    def _after_backward(self, param: torch.Tensor) -> None:
        # SparseAdamW (or an attached optimizer) takes the top-k itself, at step time.
        if not self.select_on_backward or getattr(param, "_sparseft_optimizer_selects", False):
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Masking here would cut each rank's local gradient before DDP's all-reduce: the ranks'
            # top-k differ and the reduced update is not the top-k of the global gradient.
            raise ConfigError(
                "Dynamic selection under torch.distributed must run after the gradient all-reduce: "
                "use SparseAdamW, or call model.attach_optimizer(optimizer) before training."
            )
        self.mask_grad_to_topk_(param)

    @torch.no_grad()
    def mask_grad_to_topk_(self, delta: torch.Tensor) -> torch.Tensor | None:
        """Keep the k largest |entries| of ``delta.grad``, zero the rest. Returns the flat
        indices kept (None without a gradient)."""
        grad = delta.grad
        if grad is None:
            return None
        if is_sharded(grad):
            raise ConfigError(SHARDED_DYNAMIC)
        flat = grad.view(-1)
        idx = torch.topk(flat.abs(), self.k, sorted=False).indices.sort().values
        kept = flat.index_select(0, idx)
        flat.zero_()
        flat.index_copy_(0, idx, kept)
        # SparseAdamW reuses this selection while the gradient is untouched (no second top-k)
        delta._sparseft_selected = (grad, grad._version, idx)
        return idx

    @torch.no_grad()
    def sparse_state(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nz = delta.nonzero(as_tuple=True)
        return nz[0], nz[1], delta[nz].detach().clone()

    @torch.no_grad()
    def load_sparse_state(self, delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, saved: torch.Tensor) -> None:
        delta.zero_()
        delta[rows.to(delta.device), cols.to(delta.device)] = saved.to(delta)

    def extra_state(self, calibrated: bool) -> torch.Tensor:
        return torch.tensor([int(calibrated)], dtype=torch.long)

    def load_extra_state(self, state: torch.Tensor) -> bool:
        return bool(int(state[0]))


class Support(Protocol):
    """What a layer asks of its support (``values``/``delta``: the parameter it owns)."""

    selection: str  # "fixed" (chosen in calibration) or "dynamic" (every step)
    param_name: str
    k: int
    block: tuple[int, int]
    generation: int  # bumped whenever the support changes

    def new_parameter(self, dtype: torch.dtype, device: torch.device) -> nn.Parameter: ...
    def index(self) -> tuple[torch.Tensor | slice, torch.Tensor | slice]: ...
    def shape(self) -> tuple[int, int]: ...
    def dense(self, param: torch.Tensor) -> torch.Tensor: ...
    def compact(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def value_grad(self, basis, g: torch.Tensor, x: torch.Tensor, path: str, kn: TorchKernels) -> torch.Tensor: ...
    def sparse_state(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def load_sparse_state(self, param: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None: ...
    def extra_state(self, calibrated: bool) -> torch.Tensor: ...
    def load_extra_state(self, state: torch.Tensor) -> bool: ...


SUPPORTS: dict[str, type] = {}


def register_support(name: str, cls: type) -> type:
    """Make support class ``cls`` known as ``name`` (``SparseConfig.support``). Its constructor
    takes (layer, k, block, device); a fixed one (``selection = "fixed"``) is chosen in
    calibration through ``choose(scores)``."""
    SUPPORTS[name] = cls
    return cls


register_support("fixed", FixedSupport)
register_support("grouped", GroupedSupport)
register_support("dynamic", DynamicSupport)


def make_support(name: str, owner: nn.Module, k: int, block: tuple[int, int], device: torch.device | None = None,
                 run_rows: int | None = None, wide_dim: int = 0) -> Support:
    """The support ``name`` of a layer; "fixed" with ``run_rows`` (wide rows per run) is grouped."""
    if name not in SUPPORTS:
        raise ConfigError(f"support={name!r} is not known; use one of {sorted(SUPPORTS)} (or register_support() your own).")
    if name == "fixed" and run_rows is not None:
        name = "grouped"
    if name == "grouped":
        return GroupedSupport(owner, k, block, device, dim=wide_dim, run=int(run_rows))
    return SUPPORTS[name](owner, k, block, device)


__all__ = ["DynamicSupport", "FixedSupport", "GroupedSupport", "SUPPORTS", "Support", "make_support",
           "register_support"]
