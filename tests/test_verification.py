"""Adapter, bases and checkpoint files are verified on load: a truncated or corrupted file, a file
for another base model, or something that is not a sparseft file gives a clear
AdapterMismatchError, never a silently wrong model and never code execution."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from sparseft import AdapterMismatchError, SparseGradConfig, SparseModel, get_sparse_model
from sparseft.app.checkpoint import load_checkpoint, save_checkpoint
from sparseft.model import ADAPTER_FILE


def tiny(seed: int = 0, hidden: int = 32):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def batches(n: int = 3):
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (4, 10), generator=gen), "labels": torch.randint(0, 2, (4,), generator=gen)}
            for _ in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter")
    model = get_sparse_model(tiny(), SparseGradConfig(density=0.05))
    model.calibrate(batches(), show_progress=False)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_()
    model.save_pretrained(out / "adapter")
    model.save_bases(out / "bases.safetensors")
    save_checkpoint(out / "ckpt", model, step=1)
    return out


def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(edit(bytearray(src.read_bytes())))
    return dst


def test_round_trip_is_accepted(saved: Path) -> None:
    loaded = SparseModel.from_pretrained(tiny(), saved / "adapter")
    assert loaded.is_calibrated


@pytest.mark.parametrize("cut", [0, 7, 100, -1, -200])
def test_truncated_adapter(saved: Path, tmp_path: Path, cut: int) -> None:
    bad = _copy_with(saved / "adapter" / ADAPTER_FILE, tmp_path / ADAPTER_FILE, lambda b: b[:cut] if cut >= 0 else b[:cut])
    with pytest.raises(AdapterMismatchError, match="truncated or corrupted|checksum"):
        SparseModel.from_pretrained(tiny(), bad)


@pytest.mark.parametrize("where", [0.5, 0.9, -3])
def test_flipped_bytes_in_tensor_data(saved: Path, tmp_path: Path, where: float) -> None:
    def flip(b: bytearray) -> bytearray:
        i = int(len(b) * where) if where > 0 else len(b) + int(where)
        b[i] ^= 0xFF
        return b

    bad = _copy_with(saved / "adapter" / ADAPTER_FILE, tmp_path / ADAPTER_FILE, flip)
    with pytest.raises(AdapterMismatchError, match="checksum|truncated or corrupted"):
        SparseModel.from_pretrained(tiny(), bad)


def test_flipped_bytes_in_header(saved: Path, tmp_path: Path) -> None:
    def flip(b: bytearray) -> bytearray:
        b[20] ^= 0x55  # inside the JSON header
        return b

    bad = _copy_with(saved / "adapter" / ADAPTER_FILE, tmp_path / ADAPTER_FILE, flip)
    with pytest.raises(AdapterMismatchError):
        SparseModel.from_pretrained(tiny(), bad)


def test_edited_metadata(saved: Path, tmp_path: Path) -> None:
    """The checksum covers the JSON metadata too: pointing an adapter at another base model (or
    changing its config) by editing the header is caught."""
    import json

    from safetensors import safe_open

    with safe_open(str(saved / "adapter" / ADAPTER_FILE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["sparseft"])
    meta["fingerprint"] = get_sparse_model(tiny(seed=7), SparseGradConfig(density=0.05)).fingerprint
    save_file(tensors, str(tmp_path / ADAPTER_FILE), metadata={"sparseft": json.dumps(meta)})
    with pytest.raises(AdapterMismatchError, match="checksum"):
        SparseModel.from_pretrained(tiny(seed=7), tmp_path / ADAPTER_FILE)


def test_broken_sparseft_metadata(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, str(tmp_path / "a.safetensors"), metadata={"sparseft": "{not json"})
    with pytest.raises(AdapterMismatchError, match="metadata"):
        SparseModel.from_pretrained(tiny(), tmp_path / "a.safetensors")


def test_foreign_safetensors_and_pickle(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterMismatchError, match="not a sparseft"):
        SparseModel.from_pretrained(tiny(), tmp_path / "plain.safetensors")

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "EXECUTED",))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(AdapterMismatchError, match="truncated or corrupted"):
        SparseModel.from_pretrained(tiny(), tmp_path / "evil.safetensors")
    with pytest.raises(AdapterMismatchError):
        load_checkpoint(tmp_path / "evil.safetensors", get_sparse_model(tiny(), SparseGradConfig(density=0.05)))
    assert not (tmp_path / "EXECUTED").exists()


def test_adapter_for_other_weights_same_shape(saved: Path) -> None:
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        SparseModel.from_pretrained(tiny(seed=7), saved / "adapter")


def test_adapter_for_other_architecture(saved: Path) -> None:
    with pytest.raises(AdapterMismatchError, match="do not fit this model"):
        SparseModel.from_pretrained(tiny(hidden=48), saved / "adapter")
    from transformers import BertModel

    torch.manual_seed(0)
    with pytest.raises(AdapterMismatchError, match="BertForSequenceClassification, not a BertModel"):
        SparseModel.from_pretrained(BertModel(tiny().config), saved / "adapter")


def test_bases_for_other_model(saved: Path) -> None:
    other = get_sparse_model(tiny(seed=7), SparseGradConfig(density=0.05))
    with pytest.raises(AdapterMismatchError, match="another base model"):
        other.load_bases(saved / "bases.safetensors")
    with pytest.raises(AdapterMismatchError, match="another base model"):
        get_sparse_model(tiny(seed=7), SparseGradConfig(density=0.05), bases=saved / "bases.safetensors")
    wider = get_sparse_model(tiny(hidden=48), SparseGradConfig(density=0.05))
    with pytest.raises(AdapterMismatchError):
        wider.load_bases(saved / "bases.safetensors")


def test_wrong_kind_of_file(saved: Path) -> None:
    model = get_sparse_model(tiny(), SparseGradConfig(density=0.05))
    with pytest.raises(AdapterMismatchError, match="not an adapter"):
        SparseModel.from_pretrained(tiny(), saved / "bases.safetensors")
    with pytest.raises(AdapterMismatchError, match="not a checkpoint"):
        load_checkpoint(saved / "adapter" / ADAPTER_FILE, model)
    with pytest.raises(AdapterMismatchError, match="No bases file"):
        model.load_bases(saved / "missing.safetensors")


def test_truncated_checkpoint(saved: Path, tmp_path: Path) -> None:
    ckpt = next((saved / "ckpt").glob("checkpoint-*.safetensors"))
    bad = _copy_with(ckpt, tmp_path / ckpt.name, lambda b: b[: len(b) // 2])
    with pytest.raises(AdapterMismatchError, match="truncated or corrupted"):
        load_checkpoint(bad, get_sparse_model(tiny(), SparseGradConfig(density=0.05)))
    (tmp_path / "latest.json").write_text("{oops")
    with pytest.raises(AdapterMismatchError, match="pointer"):
        load_checkpoint(tmp_path, get_sparse_model(tiny(), SparseGradConfig(density=0.05)))
