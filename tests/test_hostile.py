"""Hostile and bad input: property tests over layer shapes, densities, dtypes and batch shapes;
fuzzed configs and data files; and a table of bad inputs, each of which must give a clear
SparseFTError (or a documented behaviour), never a traceback from deep inside torch."""

from __future__ import annotations

import bz2
import json
import math
import re
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
        (["--lr", "nan"], "must be > 0"),
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


# ------------------------------------------------------------------------------------ careless runs
# What a careless or hostile user did to the CLI and the library: each ran with exit 0 and a wrong
# answer, lost work, or ended in a raw traceback before it was fixed.
def _cli(tiny_checkpoint: Path, data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["train", "--model", str(tiny_checkpoint), "--data", str(data), "--steps", str(steps), "--calibration-steps", "1",
            "--no-progress", "--max-length", "16", "--threads", "1", "--output-dir", str(out), *extra]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from sparseft.app.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def other_checkpoint(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The tiny BERT with every weight nudged: the same shapes, another base."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path_factory.mktemp("otherbert")
    model = BertForSequenceClassification.from_pretrained(tiny_checkpoint)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(out)
    return out


def test_a_half_precision_model_trains_to_finite_weights() -> None:
    """fp16 heads reached NaN at AdamW's second step: a half model's heads train in float32."""
    from conftest import tiny_bert

    from sparseft import SparseAdamW

    for optimizer in (torch.optim.AdamW, SparseAdamW):
        torch.manual_seed(0)
        model = get_sparse_model(tiny_bert().half(), SparseGradConfig(density=0.05, modules_to_save=["classifier"]))
        batch = {"input_ids": torch.randint(0, 97, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
        model.calibrate([batch], show_progress=False)
        opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        assert all(torch.isfinite(p).all() for p in model.parameters()), optimizer.__name__
        assert model.base_model.classifier.weight.dtype == torch.float32
        assert model(**batch).logits.dtype == torch.float16  # the layers around the head see the model's dtype
        plain = model.merge_and_unload()
        assert {p.dtype for p in plain.parameters()} == {torch.float16} and not plain.classifier._forward_hooks


@pytest.mark.parametrize("lr,message", [("1e4", "diverged"), ("1e38", "overflowed")])
def test_a_diverged_run_is_an_error_and_saves_nothing(tiny_checkpoint: Path, tmp_path: Path, capsys, lr, message) -> None:
    """lr=1e4 ended at finite losses of 5,709-66,165 and was saved and scored (exit 0); lr=1e38
    raised torch's raw 'cannot be converted to type float without overflow'."""
    data = _file(tmp_path, "d.csv", _rows(120))
    code, err = _run(_cli(tiny_checkpoint, data, tmp_path / "out", "--method", "full", "--lr", lr, steps=5), capsys)
    assert code == 1 and message in err and "lower --lr" in err
    assert not (tmp_path / "out" / "adapters" / "seed-0" / "sparseft_run.json").exists()


def test_a_non_finite_learning_rate_is_a_usage_error(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """--lr inf was taken, and training ran into NaN."""
    code, err = _run(_cli(tiny_checkpoint, _file(tmp_path, "d.csv", _rows(120)), tmp_path / "out", "--lr", "inf"), capsys)
    assert code == 2 and "finite" in err


def test_resume_refuses_another_run_and_reports_a_finished_one(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """--resume went on silently with other data, another batch size or method variant, and
    recorded --steps 10 for a model at step 20; a finished seed was re-reported with
    step_time_s 0 and state_bytes 0; a corrupt newest checkpoint was not replaced by the older one."""
    data = _file(tmp_path, "d.csv", _rows(120))
    out = tmp_path / "out"
    run = lambda *extra, steps=8: _run(_cli(tiny_checkpoint, data, out, "--checkpoint-every", "4", *extra, steps=steps), capsys)  # noqa: E731
    assert run()[0] == 0
    first = json.loads((out / "results.json").read_text())[0]
    other = _file(tmp_path, "e.csv", _rows(120).replace("text number", "another text"))
    for extra, steps, part in [(("--resume", str(out), "--batch-size", "8"), 8, "--batch-size 16 there, 8 now"),
                               (("--resume", str(out)), 4, "--steps 8 there, 4 now"),
                               (("--resume", str(out), "--method", "sparsegrad[support_group=8]"), 8, "support_group=8"),
                               (("--resume", str(out), "--data", str(other)), 8, "the training data")]:
        if "--data" in extra:
            code, err = _run(_cli(tiny_checkpoint, other, out, "--checkpoint-every", "4", *extra[:2], steps=steps), capsys)
        else:
            code, err = run(*extra, steps=steps)
        assert code == 2 and "belongs to another run" in err and part in err, err
    code, _ = run("--resume", str(out))  # at its last step already: reported as it was
    again = json.loads((out / "results.json").read_text())[0]
    assert code == 0 and again["step_time_s"] > 0 and again["state_bytes"] == first["state_bytes"] > 0
    assert again["accuracy"] == first["accuracy"]
    newest = sorted((out / "checkpoints" / "seed-0").glob("checkpoint-*.safetensors"))[-1]
    raw = bytearray(newest.read_bytes())
    raw[-3] ^= 1
    newest.write_bytes(bytes(raw))
    code, err = run("--resume", str(out))
    assert code == 0 and "fails its checksum" in err and "older checkpoint" in err


def test_two_runs_into_one_output_dir(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Both exited 0 and printed 'saved' while one's results and adapter were lost: the second is refused."""
    from sparseft.app.outputs import claimed

    data = _file(tmp_path, "d.csv", _rows(120))
    with claimed(tmp_path / "out"):  # a run in progress
        code, err = _run(_cli(tiny_checkpoint, data, tmp_path / "out"), capsys)
    assert code == 2 and "Another sparseft run (pid" in err and "another --output-dir" in err
    assert _run(_cli(tiny_checkpoint, data, tmp_path / "out"), capsys)[0] == 0  # the lock went with its holder


def test_output_paths_are_checked_before_training(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """An --output-dir that is a file was found only after training."""
    import sparseft.app.train as train

    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before the output path was checked"))
    data = _file(tmp_path, "d.csv", _rows(120))
    _file(tmp_path, "taken", "a file")
    code, err = _run(_cli(tiny_checkpoint, data, tmp_path / "taken"), capsys)
    assert code == 2 and "is a file" in err
    (tmp_path / "out" / "adapters").mkdir(parents=True)
    _file(tmp_path / "out" / "adapters", "seed-0", "a file")
    code, err = _run(_cli(tiny_checkpoint, data, tmp_path / "out"), capsys)
    assert code == 2 and "adapters/seed-0" in err and "is a file" in err


@pytest.mark.parametrize("method,folder", [("lora-mlp", "adapters"), ("full", "adapters"), ("sparsegrad", "merged")])
def test_saved_folders_are_sealed_against_changes_and_other_bases(
        tiny_checkpoint: Path, other_checkpoint: Path, tmp_path: Path, capsys, method, folder) -> None:
    """A flipped byte in a merged, full or lora-mlp folder moved predict from 0.5037 to 1.0 (exit
    0); a LoRA adapter loaded onto another base of the same shape; a base that moved was a raw
    OSError."""
    data = _file(tmp_path, "d.csv", _rows(120))
    out = tmp_path / "out"
    assert _run(_cli(tiny_checkpoint, data, out, "--method", method, "--save-merged"), capsys)[0] == 0
    saved = out / folder / "seed-0"
    predict = ["predict", "--adapter", str(saved), "--data", str(data), "--threads", "1"]
    code, _ = _run(predict, capsys)
    assert code == 0
    if folder == "adapters" and method != "full":
        code, err = _run([*predict, "--model", str(other_checkpoint)], capsys)
        assert code == 2 and "not the base model this adapter was trained on" in err
        run_file = saved / "sparseft_run.json"  # the base moved: name the fix, then take it
        run_file.write_text(json.dumps(dict(json.loads(run_file.read_text()), model_dir=str(tmp_path / "gone"))))
        from sparseft.app.artifacts import seal

        seal(saved, json.loads((saved / "sparseft_manifest.json").read_text())["base_fingerprint"])
        code, err = _run(predict, capsys)
        assert code == 2 and "--model" in err and "gone" in err
        assert _run([*predict, "--model", str(tiny_checkpoint)], capsys)[0] == 0
    weights = max((p for p in saved.iterdir() if p.suffix == ".safetensors"), key=lambda p: p.stat().st_size)
    raw = bytearray(weights.read_bytes())
    raw[-7] ^= 1
    weights.write_bytes(bytes(raw))
    code, err = _run(predict, capsys)
    assert code == 2 and "fails its checksum" in err


@pytest.mark.parametrize("damage,part", [("run file missing", "holds no sparseft_run.json"),
                                         ("run file broken", "not valid JSON"),
                                         ("adapter_config.json missing", "is missing")])
def test_a_damaged_folder_is_named(tiny_checkpoint: Path, tmp_path: Path, capsys, damage, part) -> None:
    """A missing or broken adapter_config.json or sparseft_run.json was a raw FileNotFoundError,
    JSONDecodeError or KeyError."""
    data = _file(tmp_path, "d.csv", _rows(120))
    out = tmp_path / "out"
    assert _run(_cli(tiny_checkpoint, data, out), capsys)[0] == 0
    saved = out / "adapters" / "seed-0"
    (saved / "sparseft_manifest.json").unlink(missing_ok=True)  # (damage the manifest does not catch)
    if damage == "run file missing":
        (saved / "sparseft_run.json").unlink()
    elif damage == "run file broken":
        (saved / "sparseft_run.json").write_text("{not json")
    else:
        (saved / "adapter_config.json").unlink()
    code, err = _run(["predict", "--adapter", str(saved), "--data", str(data), "--threads", "1"], capsys)
    assert code == 2 and part in err, err


def test_an_interrupt_says_what_is_kept(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-C printed a KeyboardInterrupt traceback."""
    import sparseft.app.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    code, err = _run(_cli(tiny_checkpoint, _file(tmp_path, "d.csv", _rows(120)), tmp_path / "out", "--checkpoint-every", "2"), capsys)
    assert code == 130 and "interrupted" in err and f"--resume {tmp_path / 'out'}" in err


def _tiny_sparse(**config):
    from conftest import tiny_bert

    torch.manual_seed(0)
    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05, modules_to_save=["classifier"], **config))
    model.calibrate([{"input_ids": torch.randint(0, 97, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}], show_progress=False)
    return model


def test_merge_and_unload_leaves_the_base_frozen_and_nothing_to_save(tmp_path: Path) -> None:
    """merge_and_unload() then training trained densely (834 → 23,490 trainable parameters);
    save_pretrained then wrote 'values: 0', and loading that raised a raw KeyError."""
    from sparseft import AdapterMismatchError, SparseModel

    model = _tiny_sparse()
    model.save_pretrained(tmp_path / "a")
    plain = model.merge_and_unload()
    assert {n for n, p in plain.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    with pytest.raises(ConfigError, match="merged or unloaded"):
        model.save_pretrained(tmp_path / "b")
    with pytest.raises(ConfigError, match="merged or unloaded"):
        model.export_lora(tmp_path / "c")
    # an adapter file whose update tensors are missing: named, and the model is untouched
    from sparseft.serialization import load_tensors, save_tensors

    tensors, meta = load_tensors(tmp_path / "a" / "adapter_model.safetensors")
    save_tensors(tmp_path / "a" / "adapter_model.safetensors", {k: v for k, v in tensors.items() if ".values" not in k}, meta)
    from conftest import tiny_bert

    with pytest.raises(AdapterMismatchError, match="lacks the update tensors"):
        SparseModel.from_pretrained(tiny_bert(), tmp_path / "a")


def test_export_lora_does_not_replace_an_adapter_or_write_over_a_file(tmp_path: Path) -> None:
    """export_lora(d) into a folder holding a sparseft adapter replaced it silently; a path
    that is a file was a raw FileExistsError."""
    model = _tiny_sparse()
    model.save_pretrained(tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="holds a sparseft adapter"):
        model.export_lora(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    _file(tmp_path, "f", "a file")
    with pytest.raises(ConfigError, match="is a file"):
        model.export_lora(tmp_path / "f")
    with pytest.raises(ConfigError, match="is a file"):
        model.save_pretrained(tmp_path / "f")
    model.export_lora(tmp_path / "a", overwrite=True)
    assert "peft_type" in json.loads((tmp_path / "a" / "adapter_config.json").read_text())


def test_s2ft_adapters_load_only_on_their_base(tmp_path: Path) -> None:
    """S2FT adapters loaded onto another base of the same shape and answered differently."""
    from conftest import tiny_bert

    from sparseft import AdapterMismatchError, S2FTConfig, S2FTModel, get_s2ft_model

    torch.manual_seed(0)
    get_s2ft_model(tiny_bert(), S2FTConfig(match_lora_rank=2)).save_pretrained(tmp_path / "a")
    torch.manual_seed(1)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        S2FTModel.from_pretrained(tiny_bert(), tmp_path / "a")
    torch.manual_seed(0)
    S2FTModel.from_pretrained(tiny_bert(), tmp_path / "a")


@pytest.mark.parametrize("batch,part", [({"input_ids": torch.zeros(0, 8, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)}, "0 rows"),
                                        ({"input_ids": torch.randint(0, 97, (4, 8)), "labels": torch.tensor([0, 1, 5, 1])}, "outside the model's [0, 2)")])
def test_calibration_names_empty_batches_and_labels_out_of_range(batch, part) -> None:
    """calibrate() with labels out of range or a 0-row batch raised a raw IndexError / RuntimeError."""
    from conftest import tiny_bert

    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05))
    with pytest.raises(CalibrationError, match=re.escape(part)):
        model.calibrate([batch], show_progress=False)


def test_a_relative_model_path_still_loads_from_another_folder(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """`--model` given as a relative path, then `predict` run from another folder: a raw HF OSError."""
    data = _file(tmp_path, "d.csv", _rows(120))
    monkeypatch.chdir(tiny_checkpoint.parent)
    argv = _cli(tiny_checkpoint, data, tmp_path / "out")
    argv[argv.index("--model") + 1] = tiny_checkpoint.name
    assert _run(argv, capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    code, err = _run(["predict", "--adapter", str(tmp_path / "out" / "adapters" / "seed-0"), "--data", str(data), "--threads", "1"], capsys)
    assert code == 0, err


def test_a_non_finite_model_gives_no_score() -> None:
    """predict printed `"probability": NaN` (not JSON) and scored a NaN model's argmax."""
    from conftest import tiny_bert

    from sparseft.app.train import accuracy

    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight.fill_(math.nan)
    data = {"input_ids": torch.randint(0, 97, (6, 8)), "attention_mask": torch.ones(6, 8, dtype=torch.long),
            "labels": torch.zeros(6, dtype=torch.long)}
    with pytest.raises(FloatingPointError, match="not finite"):
        accuracy(model, data)
