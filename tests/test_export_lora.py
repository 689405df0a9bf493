"""Export to a standard peft LoRA adapter: PeftModel.from_pretrained reproduces the model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from conftest import adapted, make_batch, tiny_bert, tiny_gpt2, tiny_llama

BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
KINDS = ["fixed", "dynamic", "meprop", "s2ft", "one-sided"]


def _trained(arch: str, kind: str):
    tuner = adapted(arch, kind)
    opt = torch.optim.SGD([p for p in tuner.parameters() if p.requires_grad], lr=0.5)
    if kind in ("dynamic", "meprop"):
        tuner.attach_optimizer(opt)
    tuner.train()
    for i in range(3):  # dynamic: three different top-k sets, a union larger than k
        tuner(**make_batch(arch, 10 + i)).loss.backward()
        opt.step()
        opt.zero_grad()
    return tuner.eval()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_the_export_and_computes_the_same(arch: str, kind: str, tmp_path) -> None:
    tuner = _trained(arch, kind)
    batch = make_batch(arch, 99)
    with torch.no_grad():
        want = tuner(**batch).logits
    errors = tuner.export_lora(tmp_path)
    assert set(errors.values()) == {0.0}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (arch == "gpt2")
    assert config["modules_to_save"] == (["classifier"] if arch == "bert" else None)
    torch.manual_seed(0)
    base = BUILD[arch]().eval()
    with torch.no_grad():
        before = base(**batch).logits
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        got = peft_model(**batch).logits
    assert float((want - before).abs().max()) > 1e-4  # training changed the outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_truncated_export_reports_its_error(tmp_path) -> None:
    tuner = _trained("bert", "dynamic")
    exact = {n: int(layer.lora_factors()[0].shape[1]) for n, layer in tuner.adapted_layers().items()}
    errors = tuner.export_lora(tmp_path, rank=1)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {1}
    for name, err in errors.items():
        assert (err > 0) == (exact[name] > 1) and err < 1
        # the error is the Frobenius norm of the cut singular values: check it directly
        delta = tuner.adapted_layers()[name].delta_weight().detach().double()
        s = torch.linalg.svdvals(delta)
        assert err == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-3, abs=1e-6)
    assert set(tuner.export_lora(tmp_path, rank=10_000).values()) == {0.0}
