"""The library runs without the application's packages: `import sparseft`, wrapping a plain torch
model, calibration and training need only torch, safetensors and numpy.

In a fresh interpreter every import finder is wrapped so that the `bench` extra's packages
(matplotlib, rich, gguf, yaml, tqdm) and the `hf` extra's (transformers, peft, accelerate) are not
found, as on a `pip install sparseft` without extras; then a tiny torch-only model is wrapped, calibrated and
trained a few steps through the public API, and none of those packages (nor ``sparseft.app``)
may have been loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BENCH_ONLY = ("matplotlib", "rich", "gguf", "yaml", "tqdm")
HF_ONLY = ("transformers", "peft", "accelerate")

# Run as `python -c SCRIPT BLOCKED_JSON`; prints one JSON line with what happened.
SCRIPT = r'''
import importlib.abc, json, sys

BLOCKED = set(json.loads(sys.argv[1]))
attempts = []


class Hide(importlib.abc.MetaPathFinder):
    """Wraps one finder: blocked names are not found, exactly as when they are not installed
    (``import`` raises ModuleNotFoundError, ``importlib.util.find_spec`` returns None, which
    torch._dynamo relies on)."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]

import torch
from torch import nn
import torch.nn.functional as F

from sparseft import SparseGradConfig, get_sparse_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x, labels=None):
        return self.head(x + self.mlp(x))


torch.manual_seed(0)
x = torch.randn(32, 16)
labels = torch.randint(0, 4, (32,))
batches = [{"x": x[i : i + 8], "labels": labels[i : i + 8]} for i in range(0, 32, 8)]


def loss_fn(out, batch):
    return F.cross_entropy(out, batch["labels"])


model = get_sparse_model(Tiny(), SparseGradConfig(target_modules=["mlp.0", "mlp.2"], k=64, support_criterion="abs-sum"))
model.calibrate(batches, steps=4, loss_fn=loss_fn, show_progress=False)
params = [p for p in model.parameters() if p.requires_grad]
before = [p.detach().clone() for p in params]
optimizer = torch.optim.AdamW(params, lr=3e-2)
model.train()
losses = []
for step in range(12):
    batch = batches[step % len(batches)]
    loss = loss_fn(model(**batch), batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
with torch.no_grad():
    final = sum(loss_fn(model(**b), b).item() for b in batches) / len(batches)
print(json.dumps({
    "calibrated": bool(model.is_calibrated),
    "trainable": sum(p.numel() for p in params),
    "changed": any(not torch.equal(a, p.detach()) for a, p in zip(before, params)),
    "first_loss": losses[0],
    "final_loss": final,
    "attempted": sorted(set(attempts)),
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("sparseft.app")),
}))
'''


def run_core(blocked: tuple[str, ...]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(list(blocked))], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_runs_without_bench_and_hf_packages():
    result = run_core(BENCH_ONLY + HF_ONLY)
    assert result["calibrated"]
    assert result["trainable"] > 0
    assert result["changed"]
    assert result["final_loss"] < result["first_loss"]
    assert result["loaded"] == []
