"""Quantizing a language model's KV cache: does the continuation keep its tokens?

    python3 bench/bench_kv_quant.py [--tokens 32] [--json PATH|-] [--tiny]

SmolLM2-135M-Instruct (examples/_smollm2.py; 30 layers, 3 KV heads, head_dim 64), a prompt set
of 8 chat prompts of ~50-300 tokens plus one of ~1,000. For each prompt the model prefills all
but the last prompt token (the KV cache a sender would hand over); the cache's 60 tensors
(keys, values of shape (1, 3, seq, 64)) are round-tripped through each dtype -- F16, BF16
(casts), Q8_0, Q4_0 (resonant.quant.quantize / dequantize) -- and the model continues from the
round-tripped cache: the last prompt token, then greedy decoding of --tokens tokens. Compared
with the continuation from the exact float32 cache (same process, same run):

- identical: prompts whose continuation is token for token the same (n of N);
- first diff: the first differing position (0 = the first generated token), min / median over
  the prompts that differ;
- max |logit diff|: the largest |logit - exact logit| over the steps where both runs had seen
  the same tokens (up to and including the first differing position), over all prompts;
- worst-row cosine: the lowest cosine of one cached row (one head's 64-value vector of one
  token, quant.row_errors) over every tensor of every prompt;
- B/token: cache bytes per token of context in that dtype (float32: 46,080).

Then resonant.quant.choose(tensor, min_cosine=c) (per row: the worst token must meet c) for
each of the 60 tensors, c in (0.999, 0.9999, 0.99999): the dtypes it picks, their bytes per
token, and whether that choice kept the tokens. One process, no network. --tiny runs the same
on a small random Llama (no download; a smoke test of the script, not a measurement).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

from resonant import DType, quant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from bench_codec import machine, print_machine, write_json  # noqa: E402

DTYPES = ("F16", "BF16", "Q8_0", "Q4_0")
BUDGETS = (0.999, 0.9999, 0.99999)
# (tokens, question): 8 prompts of ~50-300 tokens and one of ~1,000
PROMPTS = [(50, "Summarise the text above in one sentence."),
           (80, "What is the main claim of the text?"),
           (120, "List three rights the text names."),
           (150, "Who wrote this, and when?"),
           (180, "Rewrite the first sentence in plain English."),
           (220, "What does the text say about governments?"),
           (260, "Give the text a short title."),
           (300, "Translate the first sentence into French."),
           (1000, "Summarise the text above in one sentence.")]


def _roundtrip(x: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """(x through dtype `name`, back as float32; the bytes it took)."""
    if name in ("Q8_0", "Q4_0"):
        s = quant.quantize(x, name)
        return quant.dequantize(s), s.nbytes
    if name == "F32":
        return x, x.nbytes
    import ml_dtypes
    dt = np.float16 if name == "F16" else ml_dtypes.bfloat16
    y = x.astype(dt)
    return y.astype(np.float32), y.nbytes


class Model:
    def __init__(self, tiny: bool):
        import torch
        self.torch = torch
        if tiny:
            from transformers import LlamaConfig, LlamaForCausalLM
            torch.manual_seed(0)
            self.model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=4, num_attention_heads=4,
                                                      num_key_value_heads=2)).eval()
            self.tok = None
        else:
            import _smollm2
            if not _smollm2.available():
                raise SystemExit(f"SmolLM2 is not installed: {_smollm2.INSTALL_HINT}")
            self.tok, self.model = _smollm2.load()

    def prompt(self, n: int, question: str):
        if self.tok is None:
            g = self.torch.Generator().manual_seed(n)
            return self.torch.randint(0, 256, (1, n), generator=g)
        import _smollm2
        return _smollm2.prompt_ids(self.tok, n, question)

    def prefill(self, ids) -> list[tuple[np.ndarray, np.ndarray]]:
        """The cache of ids[:, :-1], as (keys, values) float32 arrays per layer."""
        with self.torch.no_grad():
            out = self.model(ids[:, :-1], use_cache=True)
        return [(layer.keys.numpy().copy(), layer.values.numpy().copy()) for layer in out.cache.layers]

    def continue_from(self, cache: list[tuple[np.ndarray, np.ndarray]], last, n: int):
        """(generated tokens, the logits of each step) from a cache and the last prompt token."""
        from transformers import DynamicCache
        torch = self.torch
        dc = DynamicCache()
        for i, (k, v) in enumerate(cache):
            dc.update(torch.from_numpy(np.ascontiguousarray(k)), torch.from_numpy(np.ascontiguousarray(v)), i)
        tokens, logits = [], []
        nxt = last
        with torch.no_grad():
            for _ in range(n):
                out = self.model(nxt, cache=dc, use_cache=True)
                lg = out.logits[0, -1]
                logits.append(lg.numpy().copy())
                nxt = lg.argmax(-1).reshape(1, 1)
                tokens.append(int(nxt))
                dc = out.cache
        return tokens, logits


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def run(args) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = Model(args.tiny)
    load_s = time.perf_counter() - t0
    per: dict[str, list] = {d: [] for d in DTYPES}
    picks: dict[float, list] = {c: [] for c in BUDGETS}
    prompts = []
    for n, question in PROMPTS:
        ids = m.prompt(n, question)
        cache = m.prefill(ids)
        seq = cache[0][0].shape[2]
        last = ids[:, -1:]
        exact, exact_logits = m.continue_from(cache, last, args.tokens)
        prompts.append({"tokens": int(ids.shape[1]), "cached": seq, "question": question})
        tensors = [t for kv in cache for t in kv]

        def score(rt: list[np.ndarray], nbytes: int) -> dict[str, Any]:
            got, logits = m.continue_from(list(zip(rt[0::2], rt[1::2])), last, args.tokens)
            d = _first_diff(got, exact)
            upto = args.tokens if d is None else d + 1
            return {"identical": d is None, "first_diff": d,
                    "max_logit_diff": float(max(np.abs(a - b).max() for a, b in zip(logits[:upto], exact_logits[:upto]))),
                    "bytes_per_token": nbytes / seq}

        for name in DTYPES:
            rt, nbytes, worst = [], 0, 1.0
            for x in tensors:
                y, b = _roundtrip(x, name)
                rt.append(y)
                nbytes += b
                worst = min(worst, float(quant.row_errors(x, y)[2].min()))
            per[name].append({**score(rt, nbytes), "worst_row_cosine": worst})
        for c in BUDGETS:
            rt, nbytes, used, worst = [], 0, Counter(), 1.0
            for x in tensors:
                ch = quant.choose(x, min_cosine=c)
                rt.append(quant.to_float(ch.slice).astype(np.float32))
                nbytes += ch.nbytes
                used[DType(ch.dtype).name] += 1
                worst = min(worst, ch.cosine)
            picks[c].append({**score(rt, nbytes), "dtypes": dict(used), "worst_row_cosine": worst})
        print(f"prompt of {ids.shape[1]} tokens done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    f32_per_token = sum(t.nbytes for t in tensors) / seq

    def summary(rows: list[dict]) -> dict[str, Any]:
        diffs = [r["first_diff"] for r in rows if r["first_diff"] is not None]
        return {"identical": sum(r["identical"] for r in rows), "prompts": len(rows),
                "first_diff_min": min(diffs) if diffs else None,
                "first_diff_median": statistics.median(diffs) if diffs else None,
                "max_logit_diff": max(r["max_logit_diff"] for r in rows),
                "worst_row_cosine": min(r["worst_row_cosine"] for r in rows),
                "bytes_per_token": statistics.mean(r["bytes_per_token"] for r in rows)}

    return {"model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct", "load_s": load_s,
            "generated_tokens": args.tokens, "prompts": prompts, "f32_bytes_per_token": f32_per_token,
            "dtypes": {d: {**summary(per[d]), "per_prompt": per[d]} for d in DTYPES},
            "choose": {str(c): {**summary(picks[c]),
                                "dtypes": dict(sum((Counter(r["dtypes"]) for r in picks[c]), Counter())),
                                "per_prompt": picks[c]} for c in BUDGETS},
            "seconds": time.perf_counter() - t0}


def _fd(s: dict) -> str:
    return "—" if s["first_diff_min"] is None else f"{s['first_diff_min']} / {s['first_diff_median']:g}"


def print_tables(doc: dict[str, Any], out) -> None:
    n = len(doc["prompts"])
    lens = ", ".join(str(p["tokens"]) for p in doc["prompts"])
    print(f"\n### KV cache round-tripped per dtype, {doc['model']}: {n} prompts ({lens} tokens), "
          f"{doc['generated_tokens']} greedy tokens from the round-tripped cache vs from the float32 cache\n", file=out)
    print("| dtype | identical continuations | first diff (min / median) | max abs logit diff | "
          "worst-row cosine | B/token | vs F32 |\n|---|--:|--:|--:|--:|--:|--:|", file=out)
    f32 = doc["f32_bytes_per_token"]
    print(f"| F32 (exact) | {n} / {n} | — | 0 | 1 | {f32:,.0f} | 1.00× |", file=out)
    for d, s in doc["dtypes"].items():
        print(f"| {d} | {s['identical']} / {s['prompts']} | {_fd(s)} | {s['max_logit_diff']:.3g} | "
              f"{s['worst_row_cosine']:.6f} | {s['bytes_per_token']:,.0f} | {f32 / s['bytes_per_token']:.2f}× |",
              file=out)
    print("\n### quant.choose(tensor, min_cosine=c), per row (worst token), for each cache tensor\n", file=out)
    print("| c | dtypes picked (tensors, all prompts) | identical continuations | first diff (min / median) | "
          "max abs logit diff | worst-row cosine | B/token |\n|--:|---|--:|--:|--:|--:|--:|", file=out)
    for c, s in doc["choose"].items():
        used = ", ".join(f"{k} {v}" for k, v in sorted(s["dtypes"].items()))
        print(f"| {c} | {used} | {s['identical']} / {s['prompts']} | {_fd(s)} | {s['max_logit_diff']:.3g} | "
              f"{s['worst_row_cosine']:.6f} | {s['bytes_per_token']:,.0f} |", file=out)
    print("\nfirst diff: 0 = the first generated token; max abs logit diff over the steps with the same "
          "context (up to the first difference); B/token: mean over prompts.", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens generated per prompt (default 32)")
    ap.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2 (smoke test)")
    ap.add_argument("--json", help="write the results as JSON to PATH, or - for stdout")
    args = ap.parse_args(argv)
    doc = run(args)
    out = sys.stderr if args.json == "-" else sys.stdout
    print_machine(machine(), out)
    print_tables(doc, out)
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
