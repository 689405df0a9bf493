"""How close the quantized formats come to ``sparseft.quantized.rounding_bounds``, on every entry
of a real model's linear layers: the worst |W − dequantized(W)| / bound per format.

    python benchmarks/rounding_bounds.py [--model DIR] [--sample N]

The bound is what lets an adapter trained beside a quantized base load onto the same checkpoint in
full precision (``fingerprint.same_base_in_another_precision``). A worst ratio above 1 would
refuse a true base; the smaller the bound, the closer another base must be to pass. Default
model: the embedded all-MiniLM-L6-v2 (37 linear layers). ``--sample N``: N seeded random entries
per layer instead of every entry (a larger model).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from transformers import AutoModel, BitsAndBytesConfig

from sparseft.app.resources import default_model_dir
from sparseft.quantized import dequantized, quantization_config, rounding_bounds


def worst_ratio(full: torch.nn.Module, quantized: torch.nn.Module, sample: int = 0) -> tuple[int, float]:
    """(layers, worst |W − dequantized| / bound over their entries: all, or ``sample`` per layer)."""
    layers, worst, gen = 0, 0.0, torch.Generator().manual_seed(0)
    for name, module in quantized.named_modules():
        if type(getattr(module, "weight", None)).__name__ not in ("Params4bit", "Int8Params"):
            continue
        W, D = full.get_submodule(name).weight.detach().float().reshape(-1), dequantized(module).float()
        positions = torch.randint(0, W.numel(), (sample,), generator=gen) if sample else torch.arange(W.numel())
        bound = torch.cat([rounding_bounds(module, D, part) for part in positions.split(1 << 16)])
        worst = max(worst, float(((D.reshape(-1)[positions] - W[positions]).abs() / bound).max()))
        layers += 1
    return layers, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local checkpoint (default: the embedded MiniLM)")
    parser.add_argument("--sample", type=int, default=0, help="entries per layer, drawn at random (default 0: all)")
    args = parser.parse_args()
    model_dir = args.model or default_model_dir()
    warnings.simplefilter("ignore")  # (bitsandbytes' and transformers' loading notes)
    full = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    formats = {
        "NF4, double quantization (sparseft train --quantize 4bit)": quantization_config("4bit"),
        "NF4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        "FP4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
        "FP4, double quantization": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32),
        "LLM.int8() (--quantize 8bit)": quantization_config("8bit"),
    }
    print(f"{'format':<58} {'layers':>6} {'worst |W - deq| / bound':>24}")
    for label, config in formats.items():
        quantized = AutoModel.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu", quantization_config=config)
        layers, worst = worst_ratio(full, quantized, args.sample)
        print(f"{label:<58} {layers:>6} {worst:>24.4f}")


if __name__ == "__main__":
    main()
