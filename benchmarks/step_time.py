"""Step time, memory, calibration and merge benchmarks of one transformer MLP block.

    python benchmarks/step_time.py [--quick] [--out benchmarks/results] [--tokens 2048 8192]

For each shape (BERT-base 768↔3072 with GELU, LLaMA-like 576↔1536 with SiLU; a Linear pair
up → act → down whose input requires grad, as inside a model) and token count N, every method
trains the same block side by side in this one process, interleaved round by round, and the
median training-step time (forward + backward + optimizer step) is reported with its ratios to
LoRA (peft, rank r) and to full fine-tuning, each the median over rounds of the paired ratio (the
two steps of one round), with the order of methods turning every round. Sparse methods get LoRA's trainable count,
k = r·(m+n) per layer. Absolute times on a shared CPU are noisy; the ratios are the result.

Sections (all printed, and written to OUT/step_time.json, OUT/step_time.png):
- step time of full, lora, sparsegrad-fixed (spread support, the worst case: |R|=m, |C|≈n),
  sparsegrad-fixed-narrow (support in the leading L directions of each layer's narrow side,
  L = --narrow), sparsegrad-dynamic, meprop;
- exact bytes of parameters + gradients + optimizer state + saved activations of the block;
- which bracketing of the rotated gradient is fastest, measured, next to ``path_for``'s choice;
- calibration: streaming Gram accumulation over the plain backward it rides on;
- eigendecomposition time per group size (``--eigh`` sizes);
- inference after merge_and_unload against the unmodified block.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from sparseft import MePropConfig, SparseAdamW, SparseGradConfig, get_sparse_model
from sparseft.update.bank import eigenbasis
from sparseft.update.kernels import TorchKernels, block_bounds, use_kernels
from sparseft.layer import GRAD_PATHS, SparseLinear

SHAPES = {"bert-base 768x3072": (768, 3072, nn.GELU), "llama-like 576x1536": (576, 1536, nn.SiLU),
          "llama7b 4096x11008": (4096, 11008, nn.SiLU)}  # (--shapes llama7b: a GPU's shape; minutes per step on a CPU)
# + sparsegrad-fixed-narrowL per --narrow (L a number or "auto"). "-cached" keeps W0 + ΔW between
# optimizer steps (cache_update=True); meprop-fixed is a fixed random support in the original
# basis (SHiRA's arithmetic, through this library's SDDMM path); shira is peft's own.
# "-1side" rotates only each layer's narrow side (rotation="narrow"), alone and with the
# narrow-side cost budget (support_narrow="auto"); "-blocksB": block-diagonal bases with B
# diagonal blocks (basis_blocks=B); "-groupR": a grouped support, runs of R wide rows sharing
# their directions (support_group=R). "-rowmajor": the wide activations handed on row-major (the
# layout before the column-major hand-off: the kernels' hand_off_n_major=False); "-w0given": W0
# left as the model gives it (the kernels' relay_base=False: the merge of a layer narrower in its
# outputs copies it across layouts, as before). Both run the reference kernels with that layout
# choice off (layout_kernels), in force while the variant is built and while its steps run.
METHODS: tuple[str, ...] = ("full", "lora", "sparsegrad-fixed", "sparsegrad-fixed-cached", "sparsegrad-dynamic", "meprop",
                            "meprop-fixed", "shira", "sparsegrad-fixed-1side", "sparsegrad-fixed-1side-narrowauto",
                            "sparsegrad-fixed-1side-blocks4", "sparsegrad-fixed-1side-cached", "sparsegrad-dynamic-1side",
                            "sparsegrad-fixed-1side-group16", "sparsegrad-fixed-1side-group32", "sparsegrad-fixed-1side-group64", "sparsegrad-fixed-1side-rowmajor",
                            "sparsegrad-fixed-1side-w0given")
# "-triton": the same method with the Triton backend's sampled product (sparseft.update.triton_kernels);
# by name only (--methods), and on a GPU: on a CPU it runs in Triton's interpreter.
# "sparse-random", the product's default (methods.DEFAULT_METHOD), is meprop-fixed's arithmetic
# exactly (MePropConfig, fixed, a random support); by name only, so that gpu.sh's table says which
# row is the default.
BY_NAME_ONLY = ("sparsegrad-fixed-1side-triton", "sparse-random", "sparse-random-triton")
SAME_BUILD = {"sparse-random": "meprop-fixed", "sparse-random-triton": "meprop-fixed-triton"}  # (what build reads)


class Block(nn.Module):
    def __init__(self, d: int, h: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, h), act(), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def orthogonal(size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, generator=gen))[0]


def block_orthogonal(size: int, blocks: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal basis, block-diagonal with ``blocks`` blocks as calibration makes them."""
    return torch.block_diag(*(orthogonal(b - a, gen) for a, b in block_bounds(size, blocks)))


def build(method: str, base: Block, rank: int, seed: int):
    """(model, optimizer) for ``method`` on a copy of ``base``; ``sparsegrad-fixed-narrowL``
    restricts each layer's support to the leading L directions of its narrow side."""
    method = SAME_BUILD.get(method, method)
    blocks = int(method.rsplit("-blocks", 1)[1]) if "-blocks" in method else 1
    group = int(method.rsplit("-group", 1)[1]) if "-group" in method else None
    tag = method.rsplit("narrow", 1)[1] if "narrow" in method else ""
    narrow = "auto" if tag == "auto" else int(tag) if tag else None
    block = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    weight = base.up.weight
    if method == "full":
        return block, torch.optim.AdamW(block.parameters(), lr=1e-5)
    block.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(block, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["up", "down"]))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if method == "shira":
        from peft import ShiraConfig, get_peft_model

        model = get_peft_model(block, ShiraConfig(r=rank, target_modules=["up", "down"], random_seed=seed))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    selection = "fixed" if "-fixed" in method else "dynamic"
    cls = MePropConfig if method.startswith("meprop") else SparseGradConfig
    # the methods without "-1side" are the paper's two-sided rotation (the library default is one-sided)
    extra = {} if cls is MePropConfig else {"rotation": "narrow" if "-1side" in method else "both"}
    with layout_kernels(method, str(base.up.weight.device)):
        model = get_sparse_model(block, cls(selection=selection, density=None, match_lora_rank=rank, target_modules=["up", "down"],
                                            support_narrow=narrow, cache_update=True if method.endswith("-cached") else None,
                                            **extra, **({"basis_blocks": blocks} if blocks > 1 else {}),
                                            **({"support_group": group} if group else {})))
    for layer in model.sparse_layers().values():
        if not method.startswith("meprop"):
            # Bases are random orthogonal here: step time depends on the support's shape, not on
            # which basis it is; real supports are measured by benchmarks/supports.py.
            if not model.bases.has(layer.group):
                P, Q = (block_orthogonal(size, blocks, gen).to(weight.device, weight.dtype) if part in layer.basis.rotated_parts
                        else None for part, size in (("P", layer.m), ("Q", layer.n)))
                model.bases.set(layer.group, P, Q)
        if selection == "fixed" and not layer.calibrated:  # a random support of the allowed block (narrowL: L leading
            # narrow directions); identity bases have their seeded random support already (get_sparse_model)
            layer.choose_support(torch.rand(layer.block, generator=gen))
        else:
            layer.calibrated = True
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if selection == "fixed" else SparseAdamW(params, lr=1e-5)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, w: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)  # the block sits inside a model: its input needs a gradient
    (model(x) * w).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def state_and_saved_bytes(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, w: torch.Tensor) -> dict[str, int]:
    """Exact bytes: trainable params, their grads, optimizer state, and the tensors autograd
    saves for backward that are not parameters/buffers (distinct storages), after one step."""
    train_step(model, opt, x, w)  # optimizer state exists from here on
    held = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.sparse_coo:  # peft SHiRA saves its sparse update: values + int64 indices
            saved[id(t)] = t._nnz() * (t.element_size() + 8 * t.sparse_dim())
            return t
        s = t.untyped_storage()
        if s.data_ptr() not in held:
            saved[s.data_ptr()] = s.nbytes()
        return t

    xg = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model(xg) * w).sum()
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    out = {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
        "saved_activations": sum(saved.values()),
    }
    # dynamic mode keeps the merged update P Δ̃ Qᵀ between optimizer steps
    out["merge_cache"] = sum(
        t.numel() * t.element_size() for m in model.modules() if isinstance(m, SparseLinear) and m.update._cache is not None
        for t in m.update._cache[1:2]
    )
    opt.zero_grad(set_to_none=True)
    out["total"] = sum(out.values())
    # what the method holds besides that: the support index of fixed selection, and the bases
    # (P, Q per group, shared by every layer of the group in a real model; here one per layer)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    out["support_index"] = sum(b.numel() * b.element_size() for m in layers for b in m.buffers(recurse=False))
    bank = getattr(model, "bases", None)  # a SparseModel's BasisBank
    out["bases"] = sum(b.numel() * b.element_size() for b in bank.buffers()) if isinstance(bank, nn.Module) else 0
    out["total_with_bases"] = out["total"] + out["support_index"] + out["bases"]
    return out


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def time_methods(models: dict, x: torch.Tensor, w: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Seconds of each method's training step, one per round. Interleaved (all methods see the
    same load), and the order turns by one place every round, so no method always runs right
    after the same neighbour (an A/A pair in a fixed order differed by 0.12× LoRA in bf16)."""
    for name, (model, opt) in models.items():  # warm-up: allocator, optimizer state, caches
        with layout_kernels(name, x.device.type):
            train_step(model, opt, x, w)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name in turned(list(models), r):
            model, opt = models[name]
            with layout_kernels(name, x.device.type):
                _sync(x)
                t0 = time.perf_counter()
                train_step(model, opt, x, w)
                _sync(x)
            times[name].append(time.perf_counter() - t0)
    return times


def layout_kernels(method: str, device: str):
    """The reference kernels with one layout choice off for a "-rowmajor"/"@rowmajor" (no
    column-major hand-off) or "-w0given"/"@w0given" (W0 not re-laid) variant, the Triton backend
    for a "-triton" one, in force inside the block; the registered kernels otherwise."""
    device_type = torch.device(device).type
    if method.endswith("-triton"):
        from sparseft.update.triton_kernels import TritonKernels

        return use_kernels(device_type, TritonKernels(measure_paths=False))  # (the kernel itself, not the timed choice)
    if method.endswith("rowmajor"):
        return use_kernels(device_type, TorchKernels(hand_off_n_major=False))
    if method.endswith("w0given"):
        return use_kernels(device_type, TorchKernels(relay_base=False))
    return contextlib.nullcontext()


def turned(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order of the methods: ``names`` turned by r places."""
    r %= len(names)
    return names[r:] + names[:r]


def paired_ratio(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Median over rounds of each method's step divided by ``reference``'s step of the same
    round: drift between rounds cancels, which a ratio of two medians does not do."""
    return {name: statistics.median(a / b for a, b in zip(t, times[reference])) for name, t in times.items()}


def fastest_ratio(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Each method's fastest step over ``reference``'s fastest: a second reading for a noisy
    machine, where interference only ever adds time (the paired median stays the headline)."""
    return {name: min(t) / min(times[reference]) for name, t in times.items()}


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each of ``fns`` (name: callable), one call per round, the order turning
    every round (``turned``), after one unrecorded call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in turned(list(fns), r):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def milliseconds_and_ratio(median: dict[str, float], new: str, old: str) -> str:
    """"name 1.23 ms, ...; ratio r" of ``interleaved``'s medians, r = ``new``'s over ``old``'s."""
    return ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in median.items()) + f"; ratio {median[new] / median[old]:.3f}"


def time_fn(fn, rounds: int) -> float:
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bracketing_check(layer: SparseLinear, tokens: int, rounds: int, gen: torch.Generator) -> dict:
    """Time ``_param_grad`` under each of the four bracketings; compare with ``path_for``."""
    g = torch.randn(tokens, layer.m, generator=gen)
    x = torch.randn(tokens, layer.n, generator=gen)
    saved = layer.compute_path
    measured = {}
    try:
        for path in GRAD_PATHS:
            layer.compute_path = path
            measured[path] = time_fn(lambda: layer._param_grad(g, x), rounds)
    finally:
        layer.compute_path = saved
    costs = layer.cost_model(tokens)
    return {
        "seconds": measured,
        "mflop": {p: 2 * costs[p] / 1e6 for p in GRAD_PATHS},
        "chosen": layer.path_for(tokens),
        "fastest": min(measured, key=measured.__getitem__),
    }


def calibration_overhead(base: Block, x: torch.Tensor, w: torch.Tensor, rounds: int) -> dict:
    """Backward of the plain block (weight gradients on, as in calibration) with and without the
    streaming Gram accumulation hooks that calibration hangs on the weights."""
    block = copy.deepcopy(base)
    layers = [block.up, block.down]
    grams = [[torch.zeros(l.out_features, l.out_features), torch.zeros(l.in_features, l.in_features)] for l in layers]

    def hook_for(i: int):
        def hook(p: torch.Tensor) -> None:
            G = p.grad
            p.grad = None
            grams[i][0].addmm_(G, G.T)
            grams[i][1].addmm_(G.T, G)

        return hook

    def backward(with_hooks: bool) -> float:
        handles = [l.weight.register_post_accumulate_grad_hook(hook_for(i)) for i, l in enumerate(layers)] if with_hooks else []
        try:
            xg = x.detach().requires_grad_(True)
            loss = (block(xg) * w).sum()
            t0 = time.perf_counter()
            loss.backward()
            return time.perf_counter() - t0
        finally:
            for h in handles:
                h.remove()
            block.zero_grad(set_to_none=True)

    backward(True), backward(False)
    plain, hooked = [], []
    for _ in range(rounds):
        plain.append(backward(False))
        hooked.append(backward(True))
    p, h = statistics.median(plain), statistics.median(hooked)
    tokens = x.numel() // x.shape[-1]
    flops_ratio = sum(l.out_features * l.in_features * (l.out_features + l.in_features) for l in layers) / sum(
        2 * tokens * l.out_features * l.in_features for l in layers
    )
    return {"plain_backward_s": p, "with_gram_s": h, "overhead": h / p - 1, "flop_model_overhead": flops_ratio}


def eigh_times(sizes: list[int], float64_max: int = 4096) -> dict[int, float]:
    out = {}
    gen = torch.Generator().manual_seed(0)
    for size in sizes:
        A = torch.randn(size, min(size, 512), generator=gen)
        gram = A @ A.T + 1e-3 * torch.eye(size)
        t0 = time.perf_counter()
        eigenbasis(gram, float64_max)
        out[size] = time.perf_counter() - t0
        print(f"  eigh {size:6d}: {out[size]:8.2f} s ({'float64' if size <= float64_max else 'float32'})", flush=True)
    return out


def merged_inference(base: Block, rank: int, x: torch.Tensor, rounds: int) -> dict:
    model, opt = build("sparsegrad-fixed", base, rank, seed=1)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_()
    merged = model.merge_and_unload().eval()
    plain = copy.deepcopy(base).eval()
    with torch.no_grad():
        t_plain = time_fn(lambda: plain(x), rounds)
        t_merged = time_fn(lambda: merged(x), rounds)
        t_plain2 = time_fn(lambda: plain(x), rounds)
    return {"unmodified_s": (t_plain + t_plain2) / 2, "merged_s": t_merged, "ratio": t_merged / ((t_plain + t_plain2) / 2),
            "merged_types": sorted({type(m).__name__ for m in merged.modules()})}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["step_time"])
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5 * (len(shapes) + 1), 4))
    for ax, shape in zip(axes, shapes):
        per_n = results["step_time"][shape]
        tokens = sorted(int(n) for n in per_n)
        for method in METHODS:
            ax.plot(tokens, [per_n[str(n)]["seconds"][method] for n in tokens], marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="training step s", title=shape)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for shape in shapes if "sparsegrad-dynamic" in METHODS else ():
        per_n = results["step_time"][shape]
        tokens = sorted(int(n) for n in per_n)
        ax.plot(tokens, [per_n[str(n)]["vs_full"]["sparsegrad-dynamic"] for n in tokens], marker="o", label=f"{shape} measured")
        ax.plot(tokens, [per_n[str(n)]["flop_model"]["sparsegrad-dynamic"] for n in tokens], ls="--", label=f"{shape} FLOP model")
    ax.axhline(1.25, color="grey", lw=0.8)
    ax.axhline(1.6, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="tokens N", ylabel="dynamic / full", title="SparseGrad dynamic vs full")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def flop_model(d: int, h: int, tokens: int, rank: int, narrow: list[int]) -> dict[str, float]:
    """Multiply-adds per training step of the block (matmuls only) relative to full fine-tuning,
    for a fixed support that fills its block's rows and columns (|R|, |C| = block) and is merged
    once per step from its k entries (the cached merge), and, for dynamic selection, the worst
    case of re-merging the whole update every step."""
    from sparseft.update.kernels import grad_costs, merge_cost, one_sided_costs

    layers = [(h, d), (d, h)]  # (m, n) of up and down
    base = sum(2 * tokens * m * n for m, n in layers)  # x W0ᵀ and g W0, every method
    out = {"full": base + sum(tokens * m * n for m, n in layers)}
    out["lora"] = base + sum(3 * tokens * rank * (m + n) for m, n in layers)

    def sparse(blocks, merges: int = 2) -> float:  # the merge: forward and input gradient, or once when cached
        total = base
        for (m, n), (a, b) in zip(layers, blocks):
            k = rank * (m + n)
            total += merges * merge_cost(m, n, a, b, k) + min(grad_costs(tokens, m, n, a, b, k).values())
        return total

    out["sparsegrad-fixed"] = sparse(layers)
    out["sparsegrad-fixed-cached"] = sparse(layers, merges=1)
    for L in narrow:
        Ls = [SparseGradConfig(support_narrow=L).narrow_directions(m, n) for m, n in layers]
        out[f"sparsegrad-fixed-narrow{L}"] = sparse([(m, min(n, l)) if m > n else (min(m, l), n) for (m, n), l in zip(layers, Ls)])
    out["sparsegrad-dynamic"] = base + sum(merge_cost(m, n, m, n) + min(grad_costs(tokens, m, n, m, n).values()) for m, n in layers)
    for name, narrowed, blocks, merges in (("sparsegrad-fixed-1side", False, 1, 2), ("sparsegrad-fixed-1side-narrowauto", True, 1, 2),
                                           ("sparsegrad-fixed-1side-blocks4", False, 4, 2), ("sparsegrad-fixed-1side-cached", False, 1, 1)):
        total = base
        for m, n in layers:
            k = rank * (m + n)
            L = SparseGradConfig(support_narrow="auto").narrow_directions(m, n) if narrowed else min(m, n)
            a, b = (m, min(n, L)) if m > n else (min(m, L), n)
            costs = one_sided_costs(tokens, m, n, a, b, k, "P" if m > n else "Q", blocks)
            total += merges * costs["merge"] + min(costs[p] for p in costs if p not in ("merge", "factored"))
        out[name] = total
    dyn = base
    for m, n in layers:  # dynamic, one side rotated: the whole block's gradient, re-merged once
        costs = one_sided_costs(tokens, m, n, m, n, None, "P" if m > n else "Q")
        dyn += costs["merge"] + min(v for p, v in costs.items() if p not in ("merge", "factored"))
    out["sparsegrad-dynamic-1side"] = dyn
    out["meprop"] = out["full"]
    # fixed random support in the original basis: the SDDMM gradient, N·k per layer
    out["meprop-fixed"] = out["shira"] = out["sparse-random"] = base + sum(tokens * rank * (m + n) for m, n in layers)
    return {name: v / out["full"] for name, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape (llama-like), N=2048, 2 rounds, small eigh sizes")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--narrow", type=lambda t: t if t == "auto" else int(t), nargs="*", default=["auto", 24],
                    help="one fixed-selection variant per L: support in the leading L directions of each layer's narrow side ('auto': the cost budget)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eigh", type=int, nargs="*", default=[384, 576, 768, 1536, 3072, 4096, 11008], help="group sizes to time (11008: LLaMA-7B MLP width)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", nargs="+", choices=["bert", "llama", "llama7b"], default=["bert", "llama"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the block trains (cuda: step time and memory sections only)")
    ap.add_argument("--steps-only", action="store_true", help="only the step-time and memory sections")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the frozen block's dtype (trained values stay float32)")
    ap.add_argument("--methods", default=None, help="comma list: time only these (full and lora always, for the ratios; implies --steps-only)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    steps_only = args.steps_only or args.device != "cpu"  # bracketing, calibration, merge, eigh: CPU studies
    if args.threads:
        torch.set_num_threads(args.threads)
    global METHODS
    METHODS = METHODS[:4] + tuple(f"sparsegrad-fixed-narrow{L}" for L in args.narrow) + METHODS[4:]
    if args.methods:
        wanted = {"full", "lora", *args.methods.split(",")}
        unknown = wanted - set(METHODS) - set(BY_NAME_ONLY)
        if unknown:
            ap.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
        METHODS = tuple(m for m in (*METHODS, *BY_NAME_ONLY) if m in wanted)
        steps_only = True
    shapes = {k: v for k, v in SHAPES.items() if k.split()[0].split("-")[0] in args.shapes}
    if args.quick:
        shapes = {"llama-like 576x1536": SHAPES["llama-like 576x1536"]}
        args.tokens, args.rounds, args.eigh = [2048], 2, [384, 768]
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results: dict = {"settings": vars(args) | {"torch": torch.__version__, "threads": torch.get_num_threads(), "device_name": device_name},
                     "step_time": {}, "memory": {}, "bracketing": {}, "calibration": {}, "merge": {}}
    for shape, (d, h, act) in shapes.items():
        base = Block(d, h, act).to(args.device, dtype)
        results["step_time"][shape], results["memory"][shape] = {}, {}
        results["bracketing"][shape], results["calibration"][shape] = {}, {}
        # built once per shape, for every N: building runs on the CPU (a random support's top-k, a
        # QR per rotated basis, SHiRA's randperm), seconds per LLaMA-7B layer, a GPU loan's minutes
        models = {m: build(m, base, args.rank, seed=0) for m in METHODS}
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, d, generator=gen).to(args.device, dtype)
            w = torch.randn(tokens, d, generator=gen).to(args.device, dtype)
            for model, _ in models.values():  # a path timed on the device is timed again at this N, as a fresh layer's
                for layer in getattr(model, "sparse_layers", dict)().values():
                    layer.update.measured.clear()
            print(f"[{shape}, N={tokens}] timing {len(models)} methods x {args.rounds} rounds", flush=True)
            rounds = time_methods(models, x, w, args.rounds)
            seconds = {m: statistics.median(t) for m, t in rounds.items()}
            spread = {}
            for name in (m for m in METHODS if "-fixed" in SAME_BUILD.get(m, m)):
                spread[name] = {ln: list(l.support.touched) for ln, l in models[name][0].sparse_layers().items()}
            results["step_time"][shape][str(tokens)] = {
                "seconds": seconds,
                "vs_lora": paired_ratio(rounds, "lora"),
                "vs_lora_fastest": fastest_ratio(rounds, "lora"),
                "vs_full": paired_ratio(rounds, "full"),
                "rounds": rounds,
                "flop_model": flop_model(d, h, tokens, args.rank, args.narrow),
                "support_block": {m: {ln: list(l.block) for ln, l in models[m][0].sparse_layers().items()} for m in METHODS if m.startswith("sparsegrad")},
                "support_rows_cols": spread,
                "paths": {m: {ln: l.path_for(tokens) for ln, l in models[m][0].sparse_layers().items()}
                          for m in METHODS if m not in ("full", "lora", "shira")},
            }
            results["memory"][shape][str(tokens)] = {m: state_and_saved_bytes(mo, op, x, w) for m, (mo, op) in models.items()}
            if steps_only:
                continue
            dyn = models["sparsegrad-dynamic"][0].sparse_layers()
            results["bracketing"][shape][str(tokens)] = {ln: bracketing_check(l, tokens, args.rounds, gen) for ln, l in dyn.items()}
            results["calibration"][shape][str(tokens)] = calibration_overhead(base, x, w, args.rounds)
        del models
        if not steps_only:
            x = torch.randn(max(args.tokens), d)
            results["merge"][shape] = merged_inference(base, args.rank, x, args.rounds + 2)
    print("eigendecomposition (one Gram matrix per basis):", flush=True)
    results["eigh_seconds"] = eigh_times([] if steps_only else args.eigh)
    # larger groups (LLaMA-7B's 11008) take too long for a shared 2-core CPU: extrapolate ~ size³
    # from the largest measured size, and say so
    biggest = max(results["eigh_seconds"], default=None)
    results["eigh_extrapolated_seconds"] = {
        s: results["eigh_seconds"][biggest] * (s / biggest) ** 3 for s in (4096, 8192, 11008) if biggest and s > biggest
    }
    for size, sec in results["eigh_extrapolated_seconds"].items():
        print(f"  eigh {size:6d}: ~{sec:7.1f} s (extrapolated as size³ from {biggest}; not measured)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(results, indent=2))  # first: the measurement is kept whatever follows
    report(results)
    plot(results, out / "step_time.png")
    print(f"wrote {out / 'step_time.json'} and {out / 'step_time.png'}")


def report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(title="Training step of one MLP block: ratio to LoRA / to full (FLOP model vs full)")
    for col in ("shape", "N", "method", "step s", "vs LoRA", "fastest vs LoRA", "vs full", "FLOP model vs full"):
        table.add_column(col, justify="left" if col in ("shape", "method") else "right")
    for shape, per_n in results["step_time"].items():
        for n, r in per_n.items():
            for m in METHODS:
                table.add_row(shape, n, m, f"{r['seconds'][m]:.3f}", f"{r['vs_lora'][m]:.2f}", f"{r['vs_lora_fastest'][m]:.2f}", f"{r['vs_full'][m]:.2f}",
                              f"{r['flop_model'][m]:.2f}" if m in r["flop_model"] else "—")  # (no FLOP model of grouped supports)
    console.print(table)
    mem = Table(title="Exact bytes (MiB) of the block's trainable state and saved activations, and ratio to LoRA")
    columns = ("params", "grads", "optimizer", "saved_activations", "merge_cache", "total", "support_index", "bases", "total_with_bases")
    for col in ("shape", "N", "method", "params", "grads", "optimizer", "saved act.", "merge cache", "total", "vs LoRA",
                "support index", "bases", "total + index + bases", "vs LoRA "):
        mem.add_column(col, justify="left" if col in ("shape", "method") else "right")
    for shape, per_n in results["memory"].items():
        for n, per_m in per_n.items():
            for m, b in per_m.items():
                cells = [f"{b[c] / 2**20:.2f}" for c in columns]
                mem.add_row(shape, n, m, *cells[:6], f"{b['total'] / per_m['lora']['total']:.2f}", *cells[6:],
                            f"{b['total_with_bases'] / per_m['lora']['total_with_bases']:.2f}")
    console.print(mem)
    br = Table(title="Rotated-gradient bracketing (dynamic, full block): measured fastest vs path_for's choice")
    for col in ("shape", "N", "layer", *GRAD_PATHS, "chosen", "fastest"):
        br.add_column(col)
    for shape, per_n in results["bracketing"].items():
        for n, per_l in per_n.items():
            for ln, r in per_l.items():
                br.add_row(shape, n, ln, *(f"{r['seconds'][p]:.3f}s" for p in GRAD_PATHS), r["chosen"], r["fastest"])
    console.print(br)
    cal = Table(title="Calibration: Gram accumulation over the plain backward")
    for col in ("shape", "N", "backward s", "with Gram s", "overhead", "FLOP model"):
        cal.add_column(col)
    for shape, per_n in results["calibration"].items():
        for n, r in per_n.items():
            cal.add_row(shape, n, f"{r['plain_backward_s']:.3f}", f"{r['with_gram_s']:.3f}", f"{100 * r['overhead']:.0f}%", f"{100 * r['flop_model_overhead']:.0f}%")
    console.print(cal)
    for shape, r in results["merge"].items():
        console.print(f"inference after merge_and_unload [{shape}]: merged/unmodified = {r['ratio']:.3f} "
                      f"({r['merged_s']:.4f} s vs {r['unmodified_s']:.4f} s; modules {r['merged_types']})")


if __name__ == "__main__":
    main()
