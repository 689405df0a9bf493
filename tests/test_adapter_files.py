"""The adapter file near the values' own size: a random support is stored as its seed (and a
digest of the positions it gives), any other support as one flat index per value; files of the
earlier layout (rows and columns) still load."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import tiny_bert

from sparseft import AdapterMismatchError, SparseGradConfig, SparseModel, get_sparse_model
from sparseft.serialization import load_tensors, save_tensors

BATCH = {"input_ids": torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([0, 1, 0, 1])}


def _trained(**config) -> SparseModel:
    torch.manual_seed(0)
    model = get_sparse_model(tiny_bert(), SparseGradConfig(match_lora_rank=2, modules_to_save=["classifier"], **config))
    model.calibrate([BATCH], steps=1, show_progress=False)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.param.normal_(0, 0.05)
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCH).logits


def _reload(folder) -> SparseModel:
    torch.manual_seed(0)
    return SparseModel.from_pretrained(tiny_bert(), folder).eval()


def test_a_random_support_is_stored_as_its_seed(tmp_path) -> None:
    model = _trained()  # the default: support_criterion "random"
    model.save_pretrained(tmp_path / "a")
    tensors, meta = load_tensors(tmp_path / "a" / "adapter_model.safetensors")
    layers = model.sparse_layers()
    assert set(meta["seeded_supports"]) == set(layers)
    assert not [k for k in tensors if k.endswith((".index", ".rows", ".cols"))]
    values = sum(v.nbytes for k, v in tensors.items() if k.endswith(".values"))
    assert values == 4 * sum(layer.k for layer in layers.values())  # the values, and no index beside them
    loaded = _reload(tmp_path / "a")
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    for name, layer in loaded.sparse_layers().items():
        assert torch.equal(layer.rows, layers[name].rows) and torch.equal(layer.cols, layers[name].cols)
    loaded.save_pretrained(tmp_path / "b")  # saved again, a loaded seeded support stays a seed
    assert load_tensors(tmp_path / "b" / "adapter_model.safetensors")[1]["seeded_supports"] == meta["seeded_supports"]


def test_a_support_rebuilt_differently_is_refused(tmp_path, monkeypatch) -> None:
    """If the generator drew differently (another torch), the values would land elsewhere: refused."""
    import sparseft.calibration as C

    _trained().save_pretrained(tmp_path / "a")
    monkeypatch.setattr(C, "seeded_scores", lambda block, seed: torch.rand(block, generator=torch.Generator().manual_seed(seed + 1)))
    with pytest.raises(AdapterMismatchError, match="rebuilt from its seed differs"):
        _reload(tmp_path / "a")


@pytest.mark.parametrize("config", [dict(support_criterion="abs-sum"), dict(selection="dynamic")])
def test_other_supports_store_one_flat_index_per_value(tmp_path, config) -> None:
    model = _trained(**config)
    if config.get("selection") == "dynamic":
        with torch.no_grad():  # a dynamic delta holds what training touched: keep some entries
            for layer in model.sparse_layers().values():
                layer.param.view(-1)[torch.randperm(layer.param.numel())[layer.k:]] = 0
    model.save_pretrained(tmp_path / "a")
    tensors, meta = load_tensors(tmp_path / "a" / "adapter_model.safetensors")
    assert meta["seeded_supports"] == {}
    for name in model.sparse_layers():
        index, values = tensors[f"layers.{name}.index"], tensors[f"layers.{name}.values"]
        assert index.dtype == torch.int32 and index.shape == values.shape
    torch.testing.assert_close(_logits(_reload(tmp_path / "a")), _logits(model), rtol=0, atol=0)


def test_files_of_the_earlier_layout_still_load(tmp_path) -> None:
    model = _trained()
    model.save_pretrained(tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors, meta = load_tensors(file)
    for name, layer in model.sparse_layers().items():  # as sparseft wrote it before: rows and columns, int32
        rows, cols, _ = layer.sparse_state()
        tensors[f"layers.{name}.rows"], tensors[f"layers.{name}.cols"] = rows.to(torch.int32), cols.to(torch.int32)
    del meta["seeded_supports"], meta["sha256"]
    save_tensors(file, tensors, meta)
    torch.testing.assert_close(_logits(_reload(tmp_path / "a")), _logits(model), rtol=0, atol=0)


def test_random_supports_chosen_side_by_side_are_those_chosen_one_at_a_time() -> None:
    """The layers' top-k run on torch's threads at once (one core each): each layer still gets its
    own seed's support, whatever the number of threads or the order they finish in."""
    from sparseft.calibration import choose_random_supports

    chosen = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            model = _trained()
            layers = model.sparse_layers()
            chosen.append({name: (layer.rows.clone(), layer.cols.clone(), layer.support.seed) for name, layer in layers.items()})
            choose_random_supports(layers, score_bytes=1)  # at most one block at a time: one thread
            assert all(torch.equal(layer.rows, chosen[-1][name][0]) for name, layer in layers.items())
    finally:
        torch.set_num_threads(threads)
    assert len({seed for _, _, seed in chosen[0].values()}) == len(chosen[0]) > 1
    for name, (rows, cols, seed) in chosen[0].items():
        assert torch.equal(rows, chosen[1][name][0]) and torch.equal(cols, chosen[1][name][1]) and seed == chosen[1][name][2]


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("trained,served", [("bf16", "fp32"), ("fp32", "bf16"), ("fp16", "bf16"), ("fp32", "fp16")])
def test_an_adapter_loads_onto_its_base_held_in_another_precision(tmp_path, trained, served) -> None:
    """Trained on a bf16 copy of the base on a GPU, served on the float32 checkpoint (or the other
    way round): rounding moves the fingerprint's samples, so the hash differs, but each sample
    agrees to within the coarser precision, and the adapter loads with its supports and values.
    The base with 1% noise on its weights, in either precision, is still refused."""
    from sparseft.methods import prepare

    from conftest import with_weights

    torch.manual_seed(0)
    weights = tiny_bert().state_dict()

    def base(dtype, noise=0.0):
        return with_weights(tiny_bert, weights, dtype, noise)

    sparse = prepare("sparse-random", base(PRECISIONS[trained]), rank=2).sparse
    with torch.no_grad():
        for layer in sparse.sparse_layers().values():
            layer.param.normal_(0, 0.05)
    sparse.save_pretrained(tmp_path / "a")
    loaded = SparseModel.from_pretrained(base(PRECISIONS[served]), tmp_path / "a")
    for (name, ours), theirs in zip(loaded.sparse_layers().items(), sparse.sparse_layers().values()):
        assert torch.equal(ours.rows, theirs.rows) and torch.equal(ours.cols, theirs.cols), name
        torch.testing.assert_close(ours.param.float(), theirs.param.float())
    for dtype in {PRECISIONS[trained], PRECISIONS[served]}:
        with pytest.raises(AdapterMismatchError, match="other base weights"):
            SparseModel.from_pretrained(base(dtype, noise=0.01), tmp_path / "a")


def test_bases_load_onto_their_base_held_in_another_precision(tmp_path) -> None:
    """Bases calibrated on a bf16 copy of the base load onto the float32 model (the same rule as
    adapters); onto a base with 1% noise they are refused."""
    from conftest import with_weights

    torch.manual_seed(0)
    weights = tiny_bert().state_dict()

    def base(dtype=torch.float32, noise=0.0):
        return with_weights(tiny_bert, weights, dtype, noise)

    config = dict(match_lora_rank=2, modules_to_save=["classifier"])
    calibrated = get_sparse_model(base(torch.bfloat16), SparseGradConfig(**config))
    calibrated.calibrate([BATCH], steps=1, show_progress=False)
    calibrated.save_bases(tmp_path / "bases.safetensors")
    get_sparse_model(base(), SparseGradConfig(**config)).load_bases(tmp_path / "bases.safetensors")
    with pytest.raises(AdapterMismatchError, match="calibrated on another base model"):
        get_sparse_model(base(noise=0.01), SparseGradConfig(**config)).load_bases(tmp_path / "bases.safetensors")


def test_the_basis_columns_an_adapter_holds_are_checked_once_and_read_in_place(tmp_path) -> None:
    """A loaded adapter holds the basis columns its support uses: all of them (a random support
    touches every one) load as the whole basis; some of them are read through a place per global
    column, checked once per support, and a support that needs a column not held is refused,
    naming the fix."""
    for criterion, partial in (("random", False), ("abs-sum", True)):
        model = _trained(support_criterion=criterion)
        model.save_pretrained(tmp_path / criterion)
        loaded = _reload(tmp_path / criterion)
        assert any(loaded.bases.is_partial(group) for group in loaded.bases.groups) == partial, criterion
        torch.testing.assert_close(_logits(loaded), _logits(model))
    # the checks it remembers are this process's: a copy or a pickle of the bank starts without them
    assert pickle.loads(pickle.dumps(loaded.bases)).groups == loaded.bases.groups
    torch.testing.assert_close(_logits(copy.deepcopy(loaded)), _logits(model))
    layer = next(layer for layer in loaded.sparse_layers().values() if loaded.bases.is_partial(layer.group))
    part = next(p for p in ("P", "Q") if loaded.bases.is_partial(layer.group) and p in layer.basis.rotated_parts)
    held = set(loaded.bases._buffers[f"g{loaded.bases.groups.index(layer.group)}_{part}_cols"].tolist())
    outside = next(c for c in range(layer.m if part == "P" else layer.n) if c not in held)
    rows, cols = layer.rows.clone(), layer.cols.clone()
    (rows if part == "P" else cols)[0] = outside  # one entry moved to a direction the file did not hold
    assert len(set(zip(rows.tolist(), cols.tolist()))) == layer.k
    layer.set_support(rows, cols)
    with pytest.raises(AdapterMismatchError, match="load the full bases"):
        _logits(loaded)


def test_loading_through_a_loaded_models_own_class_names_it_once(tmp_path) -> None:
    """``type(model).from_pretrained`` (the class a model was wrapped in, named for its base) loads
    into the same class, not a class named twice over."""
    model = _trained()
    model.save_pretrained(tmp_path)
    loaded = _reload(tmp_path)
    torch.manual_seed(0)
    again = type(loaded).from_pretrained(tiny_bert(), tmp_path)
    assert type(again) is type(loaded) and type(loaded).__name__ == "Sparse" + type(loaded.base_model).__name__
    torch.testing.assert_close(_logits(again.eval()), _logits(model))


def test_a_whole_model_pickles_and_copies(tmp_path) -> None:
    """``torch.save(model)`` of the whole model (its class is made at run time, named for its base)
    loads back as the same class, computing the same outputs; so does ``copy.deepcopy``."""
    model = _trained(support_criterion="abs-sum")
    torch.save(model, tmp_path / "model.pt")
    for again in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
        assert type(again) is type(model)
        torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)
