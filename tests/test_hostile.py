"""Hostile and bad input: property tests over layer shapes, densities, dtypes and batch shapes;
fuzzed configs and data files; and a table of bad inputs, each of which must give a clear
SparseFTError (or a documented behaviour), never a traceback from deep inside torch."""

from __future__ import annotations

import bz2
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import save_tiny_bert_checkpoint
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sparseft import (
    CalibrationError,
    ConfigError,
    DataError,
    InputError,
    MePropConfig,
    NotCalibratedError,
    SparseConfig,
    SparseFTError,
    SparseGradConfig,
    TargetError,
    get_sparse_model,
)
from sparseft.app.data import encode, load_table, split_dataset

DTYPES = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 4e-2}


class Net(nn.Module):
    """One linear layer; the loss is a fixed random projection of its output."""

    def __init__(self, m: int, n: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc = nn.Linear(n, m).to(dtype)
        self.register_buffer("proj", torch.randn(m, dtype=dtype))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.fc(x)
        return {"loss": (y * self.proj).float().sum(), "y": y}


# ------------------------------------------------------------------------------------ properties
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    density=st.floats(0.01, 1.0),
    dtype=st.sampled_from(list(DTYPES)),
    selection=st.sampled_from(["fixed", "dynamic"]),
    identity=st.booleans(),
    compute_path=st.sampled_from(["auto", "activations", "weights"]),
    lead=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_sparse_layer_properties(m, n, density, dtype, selection, identity, compute_path, lead, seed) -> None:
    """For every shape/density/dtype/batch shape: the adapted layer starts equal to the base
    layer, computes x·(W0+ΔW)ᵀ+b, and its gradient is the dense gradient rotated (fixed) or its
    top-k (dynamic)."""
    torch.manual_seed(seed)
    tol = DTYPES[dtype]
    make = MePropConfig if identity else SparseGradConfig
    config = make(density=density, selection=selection, target_modules=["fc"], compute_path=compute_path)
    net = Net(m, n, dtype)
    base = nn.Linear(n, m).to(dtype)
    base.load_state_dict(net.fc.state_dict())
    model = get_sparse_model(net, config)
    model.calibrate([{"x": torch.randn(4, n, dtype=dtype)} for _ in range(2)], show_progress=False)
    layer = model.fc
    x = torch.randn(*lead, n, dtype=dtype)
    scale = 1 + float(base(x).detach().abs().max()) if x.numel() else 1.0
    torch.testing.assert_close(model(x=x)["y"], base(x), atol=tol * scale, rtol=tol)

    with torch.no_grad():  # a non-zero update
        (layer.values if selection == "fixed" else layer.delta).normal_(0, 0.5)
    y = model(x=x)["y"]
    assert y.shape == (*lead, m) and y.dtype == dtype
    with torch.no_grad():
        W = base.weight.double() + layer.delta_weight().double()
    expected = (x.double() @ W.T + base.bias.double()).detach()
    torch.testing.assert_close(y.double(), expected, atol=4 * tol * (1 + float(expected.abs().max()) if x.numel() else 1), rtol=4 * tol)

    x = torch.randn(3, n, dtype=dtype)  # gradient check on a non-empty batch
    model(x=x)["loss"].backward()
    g = net.proj.double().expand(3, m)
    G = g.T @ x.double()  # dense weight gradient, m×n
    if not identity:
        P = layer.basis.matrix("P", slice(None), m).double()  # the default rotates one side: I on the other
        Q = layer.basis.matrix("Q", slice(None), n).double()
        G = P.T @ G @ Q
    if selection == "fixed":
        want = G[layer.rows, layer.cols]
        torch.testing.assert_close(layer.values.grad.double(), want, atol=8 * tol * (1 + float(G.abs().max())), rtol=8 * tol)
    else:
        grad = layer.delta.grad
        assert int((grad != 0).sum()) <= layer.k  # per-backward top-k (no optimizer attached)
        kept = grad != 0
        torch.testing.assert_close(grad.double()[kept], G[: grad.shape[0], : grad.shape[1]][kept],
                                   atol=8 * tol * (1 + float(G.abs().max())), rtol=8 * tol)


_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["fixed", "dynamic", "auto", "weights", "float32", "bfloat16", "fc", ".*", "(", "sparsegrad", "meprop"]),
)
_FIELDS = ["density", "k", "match_lora_rank", "selection", "target_modules", "modules_to_save", "reselect_every",
           "reselect_fraction", "support_rows", "support_cols", "compute_path", "eigh_float64_max", "adapter_dtype",
           "method", "identity_bases", "unknown_field"]


@settings(max_examples=150, deadline=None)
@given(data=st.dictionaries(st.sampled_from(_FIELDS), _ANY, max_size=6))
def test_config_fuzz(data) -> None:
    """Any adapter_config dict: a valid config or a ConfigError; a valid config adapts a model
    or gives a SparseFTError; never another exception."""
    try:
        config = SparseConfig.from_dict(data)
    except ConfigError:
        return
    try:
        get_sparse_model(Net(6, 4, torch.float32), config)
    except SparseFTError:
        pass


@settings(max_examples=150, deadline=None)
@given(kwargs=st.dictionaries(st.sampled_from(_FIELDS[:13]), _ANY, max_size=5))
def test_config_constructor_fuzz(kwargs) -> None:
    try:
        SparseGradConfig(**kwargs).budget(8, 8)
    except ConfigError:
        pass


_CELLS = st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=False), st.none(), st.booleans())


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from([".csv", ".tsv", ".jsonl", ".csv.bz2", ".jsonl.gz"]),
    raw=st.one_of(st.binary(max_size=200), st.none()),
    rows=st.lists(st.dictionaries(st.sampled_from(["text", "label", "other", ""]), _CELLS, max_size=3), max_size=12),
)
def test_data_loader_fuzz(kind, raw, rows) -> None:
    """Random bytes or random rows: a dataset of ≥2 classes, or a DataError."""
    tmp = Path(tempfile.mkdtemp())
    try:
        path = tmp / f"data{kind}"
        if raw is None:
            if ".jsonl" in kind:
                body = "".join(json.dumps(r) + "\n" for r in rows)
            else:
                sep = "\t" if ".tsv" in kind else ","
                body = "text" + sep + "label\n" + "".join(f"{r.get('text', '')}{sep}{r.get('label', '')}\n" for r in rows)
            data = body.encode("utf-8")
        else:
            data = raw
        if kind.endswith(".bz2"):
            data = bz2.compress(data) if raw is None else data
        elif kind.endswith(".gz"):
            import gzip

            data = gzip.compress(data) if raw is None else data
        path.write_bytes(data)
        try:
            ds = load_table(path)
        except DataError:
            return
        assert len(ds) >= 2 and len(ds.label_names) >= 2
        assert all(isinstance(t, str) and t for t in ds.texts)
        assert set(ds.labels) <= set(range(len(ds.label_names)))
    finally:
        shutil.rmtree(tmp)


# ------------------------------------------------------------------------------------ the table
def _file(tmp: Path, name: str, content: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _calibrated(selection: str = "fixed"):
    # abs-sum: re-calibrating runs a gradient pass, whose input errors these cases check
    model = get_sparse_model(Net(8, 4, torch.float32), SparseGradConfig(density=0.25, selection=selection, target_modules=["fc"],
                                                                         support_criterion="abs-sum"))
    model.calibrate([{"x": torch.randn(3, 4)}], show_progress=False)
    return model


def _rows(n: int, classes: int = 2) -> str:
    return "text,label\n" + "".join(f"text number {i},{i % classes}\n" for i in range(n))


# (name, action(tmp) -> Any, expected exception type or None for a documented behaviour, message part)
BAD_INPUTS = [
    # data files
    ("empty file", lambda t: load_table(_file(t, "a.csv", "")), DataError, "no rows"),
    ("header only", lambda t: load_table(_file(t, "a.csv", "text,label\n")), DataError, "no rows"),
    ("missing text column", lambda t: load_table(_file(t, "a.csv", "txt,label\na,1\nb,0\n")), DataError, "--text-column"),
    ("missing label column", lambda t: load_table(_file(t, "a.csv", "text,y\na,1\nb,0\n")), DataError, "--label-column"),
    ("non-UTF-8 bytes", lambda t: load_table(_file(t, "a.csv", b"text,label\n\xff\xfe,1\nok,0\n")), DataError, "not UTF-8"),
    ("Latin-1 file", lambda t: load_table(_file(t, "a.csv", "text,label\ncafé,1\nthé,0\n".encode("latin-1"))), DataError, "UTF-8"),
    ("single class", lambda t: load_table(_file(t, "a.csv", _rows(50, classes=1))), DataError, "two classes"),
    ("1-row dataset", lambda t: load_table(_file(t, "a.csv", _rows(1))), DataError, "usable row"),
    ("2 rows: split empty", lambda t: split_dataset(load_table(_file(t, "a.csv", _rows(2)))), DataError, "split is empty"),
    ("all labels blank", lambda t: load_table(_file(t, "a.csv", "text,label\na,\nb, \n")), DataError, "usable row"),
    ("unterminated quote", lambda t: load_table(_file(t, "a.csv", 'text,label\n"open,1\nb,0\n')), DataError, "usable row"),
    ("field over csv limit", lambda t: load_table(_file(t, "a.csv", 'text,label\n"' + "x" * 200_000 + '",1\nb,0\n')), DataError, "Cannot read"),
    ("TSV read as CSV", lambda t: load_table(_file(t, "a.csv", "text\tlabel\na\t1\nb\t0\n")), DataError, "no column 'text'"),
    ("broken JSON line", lambda t: load_table(_file(t, "a.jsonl", '{"text": "a", "label": 1}\n{bad\n')), DataError, "line 2"),
    ("JSON line not an object", lambda t: load_table(_file(t, "a.jsonl", '{"text": "a", "label": 1}\n[1]\n')), DataError, "not a JSON object"),
    ("nested JSON label", lambda t: load_table(_file(t, "a.jsonl", '{"text": "a", "label": {"x": 1}}\n{"text": "b", "label": 0}\n')), DataError, "list/object"),
    ("corrupt .bz2", lambda t: load_table(_file(t, "a.csv.bz2", b"BZh9garbage")), DataError, "Cannot read"),
    ("unknown extension", lambda t: load_table(_file(t, "a.txt", "x")), DataError, "unknown file type"),
    ("missing file", lambda t: load_table(t / "nope.csv"), DataError, "No data file"),
    ("a directory", lambda t: load_table(t), DataError, "No data file"),
    # documented behaviours
    ("labels as strings", lambda t: load_table(_file(t, "a.csv", "text,label\na,pos\nb,neg\nc,pos\n")).label_names, None, ["neg", "pos"]),
    ("numeric labels", lambda t: load_table(_file(t, "a.csv", "text,label\na,10\nb,9\nc,2\n")).label_names, None, ["2", "9", "10"]),
    ("empty batch (0 rows)", lambda t: tuple(_calibrated()(x=torch.zeros(0, 4))["y"].shape), None, (0, 8)),
    # configs
    ("density 0", lambda t: SparseGradConfig(density=0), ConfigError, "density"),
    ("density NaN", lambda t: SparseGradConfig(density=math.nan), ConfigError, "density"),
    ("density as string", lambda t: SparseGradConfig(density="0.1"), ConfigError, "number"),
    ("k fractional", lambda t: SparseGradConfig(k=2.5), ConfigError, "whole number"),
    ("k as bool", lambda t: SparseGradConfig(k=True), ConfigError, "whole number"),
    ("k larger than layer", lambda t: get_sparse_model(Net(4, 4, torch.float32), SparseGradConfig(k=100, target_modules=["fc"])), ConfigError, "larger than"),
    ("selection unknown", lambda t: SparseGradConfig(selection="random"), ConfigError, "selection"),
    ("target_modules bad regex", lambda t: SparseGradConfig(target_modules="fc("), ConfigError, "regular expression"),
    ("target_modules an int", lambda t: SparseGradConfig(target_modules=5), ConfigError, "target_modules"),
    ("target_modules no match", lambda t: get_sparse_model(Net(4, 4, torch.float32), SparseGradConfig(target_modules=["nope"])), TargetError, "target_modules"),
    ("modules_to_save a string", lambda t: SparseGradConfig(modules_to_save="fc"), ConfigError, "list of module names"),
    ("adapter_dtype int8", lambda t: SparseGradConfig(adapter_dtype="int8"), ConfigError, "adapter_dtype"),
    ("from_dict(None)", lambda t: SparseConfig.from_dict(None), ConfigError, "JSON object"),
    ("from_dict unknown key", lambda t: SparseConfig.from_dict({"foo": 1}), ConfigError, "Unknown config keys"),
    ("from_dict method list", lambda t: SparseConfig.from_dict({"method": []}), ConfigError, "Unknown method"),
    ("config a dict", lambda t: get_sparse_model(Net(4, 4, torch.float32), {"density": 0.1}), ConfigError, "config must be"),
    ("model a string", lambda t: get_sparse_model("bert-base", SparseGradConfig()), ConfigError, "nn.Module"),
    ("model adapted twice", lambda t: get_sparse_model(_calibrated().base_model, SparseGradConfig(target_modules=["fc"])), ConfigError, "already adapted"),
    # model inputs
    ("wrong feature size", lambda t: _calibrated()(x=torch.randn(2, 5)), InputError, "last dimension is 4"),
    ("calibration batch wrong size", lambda t: get_sparse_model(Net(8, 4, torch.float32), SparseGradConfig(target_modules=["fc"], density=0.25)).calibrate([{"x": torch.randn(2, 5)}], show_progress=False), InputError, "last dimension"),
    ("calibrate(an int)", lambda t: _calibrated().calibrate(5), CalibrationError, "iterable"),
    ("calibrate(one dict)", lambda t: _calibrated().calibrate({"x": torch.randn(2, 4)}), CalibrationError, "iterable"),
    ("calibrate([tensor])", lambda t: _calibrated().calibrate([torch.randn(2, 4)]), InputError, "dicts"),
    ("calibrate([])", lambda t: _calibrated().calibrate([]), CalibrationError, "no batches"),
    ("batch key unknown", lambda t: _calibrated().calibrate([{"y": torch.randn(2, 4)}], show_progress=False), CalibrationError, "keys"),
    ("NaN inputs", lambda t: _calibrated().calibrate([{"x": torch.full((2, 4), math.nan)}], show_progress=False), CalibrationError, "nan"),
    ("calibrate(steps=0)", lambda t: _calibrated().calibrate([{"x": torch.randn(2, 4)}], steps=0), ConfigError, "at least 1"),
    ("train before calibrate", lambda t: get_sparse_model(Net(8, 4, torch.float32), SparseGradConfig(target_modules=["fc"], density=0.25)).train()(x=torch.randn(2, 4)), NotCalibratedError, "calibrate"),
]


@pytest.mark.parametrize("name,action,expected,part", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(name, action, expected, part, tmp_path: Path) -> None:
    if expected is None:
        assert action(tmp_path) == part
        return
    with pytest.raises(expected) as info:
        action(tmp_path)
    assert isinstance(info.value, SparseFTError)
    assert part.lower() in str(info.value).lower()


# ------------------------------------------------------------------------------------ encode / CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer random BERT with 16 positions and the embedded MiniLM tokenizer."""
    return save_tiny_bert_checkpoint(tmp_path_factory.mktemp("tinybert"), max_position_embeddings=16)


def test_long_sequences_are_truncated(tiny_checkpoint: Path) -> None:
    """Documented: texts longer than --max-length are cut to max_length tokens (ending in [SEP])."""
    from transformers import AutoTokenizer

    from sparseft.app.data import TextDataset

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ds = TextDataset(["word " * 5000, "short"], [0, 1], ["a", "b"], ["g1", "g2"])
    enc = encode(tok, ds, max_length=16)
    assert enc["input_ids"].shape == (2, 16)
    assert int(enc["input_ids"][0, -1]) == tok.sep_token_id and int(enc["attention_mask"][0].sum()) == 16


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--max-length", "64"], "longer than this model's 16 positions"),
        (["--batch-size", "0"], "must be > 0"),
        (["--lr", "-1"], "must be > 0"),
        (["--rank", "x"], "expected a int"),
        (["--method", "bogus"], "Unknown method"),
    ],
)
def test_cli_bad_arguments(tiny_checkpoint: Path, tmp_path: Path, capsys, extra, message) -> None:
    from sparseft.app.cli import main

    data = _file(tmp_path, "d.csv", _rows(120))
    argv = ["train", "--model", str(tiny_checkpoint), "--data", str(data), "--steps", "1", "--calibration-steps", "1",
            "--no-progress", "--max-length", "16", "--output-dir", str(tmp_path / "out"), *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
