"""What `benchmarks/gpu.sh` needs to run `sparseft train --device cuda` on the embedded default, in
a folder small enough to carry to the device machine (its working tree may hold 64 MiB): the
all-MiniLM-L6-v2 checkpoint in bfloat16 (44 MB; loaded back as float32) and Rotten Tomatoes as
a CSV with its group column, so the GPU run sees the same split as the CPU run.

    python scripts/gpu_payload.py [--out .gpu]

then carry ``.gpu`` (ignored by git) to the device machine. The CPU reference for the same inputs:
``sparseft train --model .gpu/minilm --data .gpu/rotten_tomatoes.csv --group-column group --device cpu``.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu")
    out = Path(ap.parse_args().out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    from sparseft.app.data import rotten_tomatoes
    from sparseft.app.resources import default_model_dir

    source = str(default_model_dir())
    AutoModel.from_pretrained(source, dtype=torch.float32).to(torch.bfloat16).save_pretrained(out / "minilm")
    AutoTokenizer.from_pretrained(source).save_pretrained(out / "minilm")
    table = rotten_tomatoes()
    with open(out / "rotten_tomatoes.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "group"])
        for text, label, group in zip(table.texts, table.labels, table.groups):
            writer.writerow([text, table.label_names[label], group])
    print(f"wrote {out}: minilm/ (bfloat16), rotten_tomatoes.csv ({len(table)} rows)")


if __name__ == "__main__":
    main()
