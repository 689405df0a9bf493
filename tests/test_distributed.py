"""DDP on CPU (gloo) through torchrun and accelerate launch: 2 processes train the same weights as
1 process with the same global batch, for fixed and dynamic selection; every rank builds the
same bases and support. The worker is tests/ddp_worker.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.torch_version import TorchVersion

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker as worker  # noqa: E402

from sparseft import SparseAdamW, SparseGradConfig, get_sparse_model  # noqa: E402
from sparseft.serialization import load_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("ddp_worker.py"))
LAUNCHERS = {
    "torch": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"],
    "fsdp2": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"],
    "ddp-compiled": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"],
    # --multi_gpu is accelerate's switch for "launch N processes with torch.distributed"; on a
    # machine without GPUs the processes join a gloo group on CPU.
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


def _free_port() -> int:
    """A port nothing listens on now (the OS picks it), so no two launches share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(launcher: str, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_PORT=str(_free_port()))
    cmd = LAUNCHERS[launcher] + (["--master-port", env["MASTER_PORT"]] if launcher != "accelerate" else
                                 ["--main_process_port", env["MASTER_PORT"]]) + [WORKER, str(out), launcher]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # a crashed rank's Python and C++ frames (the worker enables both dumps) come before the
    # launcher's own report, so keep a long tail
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-20000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torch", "accelerate"])
def test_two_processes_train_like_one(launcher: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    _launch(launcher, tmp_path)
    assert (tmp_path / "backend.txt").read_text() == "gloo"
    for variant in ("fixed", "dynamic-sparseadamw", "dynamic-attach"):
        rank0, _ = load_tensors(tmp_path / f"{variant}.calib.rank0.safetensors")
        rank1, _ = load_tensors(tmp_path / f"{variant}.calib.rank1.safetensors")
        # every rank builds bit-identical bases (and support): gradients are reduced over ranks first
        assert rank0.keys() == rank1.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), variant
        # ... equal to 1-process calibration on the same global batches, in the leading
        # directions (the tail of the spectrum is round-off and may rotate freely)
        single = worker.calibration_state(worker.build(variant, 0, 1)[0])
        for key in (k for k in rank0 if k.startswith("bases.")):
            cos = (single[key][:, :16] * rank0[key][:, :16]).sum(0).abs()
            assert float(cos.min()) > 0.9999, (variant, key)
        for key in (k for k in rank0 if k.endswith((".rows", ".cols"))):
            assert torch.equal(single[key], rank0[key]), (variant, key)
        # training: 1 process, global batch 8 == 2 processes × 4, on the same bases/support
        distributed, _ = load_tensors(tmp_path / f"{variant}.weights.safetensors")
        reference, _ = worker.train(variant, calib=rank0)
        untrained = worker.weights(worker.build(variant, 0, 1, calib=rank0)[0])
        diff = max(float((reference[k] - distributed[k]).abs().max()) for k in reference)
        moved = max(float((reference[k] - untrained[k]).abs().max()) for k in reference if not k.startswith("classifier"))
        print(f"{launcher} {variant}: max |1-process - 2-process| = {diff:.3e} (training moved adapted weights by {moved:.3e})")
        assert moved > 1e-3
        assert diff < 1e-5, (variant, diff)
        # and with calibration included: 1 process, calibrated and trained on the global batches.
        # Fixed selection reproduces it to round-off. Dynamic selection re-takes a top-k every
        # step, which turns the round-off between the two runs' bases into different entries at
        # the k-th place, so its trajectories part (measured: 6e-3 of a 3e-2 move); its bases and
        # the training on given bases are checked above.
        scratch, _ = worker.train(variant)
        whole = max(float((scratch[k] - distributed[k]).abs().max()) for k in scratch)
        print(f"{launcher} {variant}: calibration included, max |1-process - 2-process| = {whole:.3e}")
        if variant == "fixed":
            assert whole < 2e-3 * moved, (variant, whole, moved)
        # default DDP settings: the bases/supports are not re-broadcast before each forward
        sent = json.loads((tmp_path / f"{variant}.broadcast.json").read_text())
        assert sent["broadcast"] < sent["bases"] / 10, sent
    # plain AdamW with per-backward masking would cut local gradients before the all-reduce
    for rank in (0, 1):
        assert "attach_optimizer" in (tmp_path / f"dynamic-hook.error.rank{rank}.txt").read_text()


@pytest.mark.slow
def test_two_compiled_processes_train_like_one(tmp_path: Path) -> None:
    """``torch.compile(DistributedDataParallel(model))``: DDP splits the graph at its buckets and
    each adapted layer is one operator (sparseft::update); 2 processes train as 1 does."""
    torch.set_num_threads(1)
    _launch("ddp-compiled", tmp_path)
    for variant in ("fixed", "dynamic-sparseadamw"):
        rank0, _ = load_tensors(tmp_path / f"{variant}.calib.rank0.safetensors")
        distributed, _ = load_tensors(tmp_path / f"{variant}.weights.safetensors")
        reference, _ = worker.train(variant, calib=rank0)
        untrained = worker.weights(worker.build(variant, 0, 1, calib=rank0)[0])
        moved = max(float((reference[k] - untrained[k]).abs().max()) for k in reference if not k.startswith("classifier"))
        diff = max(float((reference[k] - distributed[k]).abs().max()) for k in reference)
        assert moved > 1e-3
        assert diff < 1e-5, (variant, diff)


# torch 2.8's FSDP2 over gloo sums the ranks' gradients where it should average them (every
# gradient 2.0x one process's, the task head's too; 2.11 and 2.13 give 1.0x; 2.9 and 2.10 not
# checked): Adam hides most of it, but not where a gradient is near its epsilon (docs/performance.md).
@pytest.mark.skipif(TorchVersion(torch.__version__) < "2.11", reason="torch 2.8's FSDP2 on gloo sums gradients across ranks (2.11 averages)")
@pytest.mark.slow
def test_fsdp2_fully_shard_on_cpu(tmp_path: Path) -> None:
    """FSDP2 (fully_shard, gloo, CPU): fixed selection trains the same weights as 1 process;
    dynamic selection (whose top-k needs the unsharded gradient) is refused with a clear error."""
    torch.set_num_threads(1)
    _launch("fsdp2", tmp_path)
    rank0, _ = load_tensors(tmp_path / "fixed.calib.rank0.safetensors")
    distributed, _ = load_tensors(tmp_path / "fixed.weights.safetensors")
    reference, _ = worker.train("fixed", calib=rank0)
    diff = max(float((reference[k] - distributed[k]).abs().max()) for k in reference)
    print(f"fsdp2 fixed: max |1-process - 2-process| = {diff:.3e}")
    assert diff < 1e-5
    # a training checkpoint saved under FSDP2 at step 2 resumes a fresh sharded model to the
    # uninterrupted run's weights (and saving changes nothing about the run itself)
    through, _ = load_tensors(tmp_path / "fixed.saving.safetensors")
    resumed, _ = load_tensors(tmp_path / "fixed.resumed.safetensors")
    assert all(torch.equal(through[k], distributed[k]) for k in distributed)
    gap = max(float((resumed[k] - distributed[k]).abs().max()) for k in distributed)
    print(f"fsdp2 fixed: max |resumed - uninterrupted| = {gap:.3e}")
    assert gap < 1e-6
    # the file holds whole tensors: it loads into a 1-process model as well
    from sparseft.app.checkpoint import load_checkpoint

    single, opt = worker.build("fixed", 0, 1, calib=rank0)
    assert load_checkpoint(tmp_path / "ckpt", single, opt)["step"] == 2
    for variant in ("dynamic-sparseadamw", "dynamic-attach"):
        for rank in (0, 1):
            assert "selection='fixed' with FSDP" in (tmp_path / f"{variant}.error.rank{rank}.txt").read_text()


def test_dynamic_delta_survives_deepcopy_and_to() -> None:
    """The FSDP guard (delta must stay the registered object) does not fire on ordinary moves."""
    import copy

    model = get_sparse_model(worker.tiny_bert(), SparseGradConfig(density=0.05, selection="dynamic"))
    model.calibrate(worker.calibration_batches(0, 1), show_progress=False)
    clone = copy.deepcopy(model).to(torch.float64).to(torch.float32)
    clone(**worker.global_batches(1, 3)[0]).loss.backward()


def test_ddp_ignores_bases_and_support_buffers() -> None:
    model = get_sparse_model(worker.tiny_bert(), SparseGradConfig(density=0.05))
    model.calibrate(worker.calibration_batches(0, 1), show_progress=False)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    buffers = dict(model.named_buffers())
    assert ignored <= set(buffers)
    assert {n for n in buffers if n.startswith("bases.")} <= ignored
    assert all(f"base_model.{name}.local" in ignored for name in model.sparse_layers())
    assert not any("position_ids" in n for n in ignored)  # the model's own buffers stay synced


def test_sparseadamw_takes_topk_itself_not_per_backward() -> None:
    """With SparseAdamW the layer hook leaves the gradient whole (the optimizer selects), so
    under DDP the top-k is taken from the all-reduced gradient."""
    model = get_sparse_model(worker.tiny_bert(), SparseGradConfig(density=0.05, selection="dynamic"))
    model.calibrate(worker.calibration_batches(0, 1), show_progress=False)
    SparseAdamW([p for p in model.parameters() if p.requires_grad])
    model(**worker.global_batches(1, 3)[0]).loss.backward()
    layer = next(iter(model.sparse_layers().values()))
    assert int((layer.delta.grad != 0).sum()) > layer.k


@pytest.mark.slow
def test_per_backward_masking_kept_for_one_rank(tmp_path: Path) -> None:
    """A 1-rank group is not refused: the hook masks as before (the world>1 refusal is checked
    by the 2-process worker's dynamic-hook variant above)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = get_sparse_model(worker.tiny_bert(), SparseGradConfig(density=0.05, selection="dynamic"))
        model.calibrate(worker.calibration_batches(0, 1), show_progress=False)
        model(**worker.global_batches(1, 3)[0]).loss.backward()
        layer = next(iter(model.sparse_layers().values()))
        assert int((layer.delta.grad != 0).sum()) <= layer.k
    finally:
        torch.distributed.destroy_process_group()
