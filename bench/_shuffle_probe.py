"""Temporary probe: zstd on real MiniLM-L6 hidden states, with and without a byte shuffle.

    python3 bench/_shuffle_probe.py

For f16 and bf16, all 7 layers' states are concatenated into one buffer and compressed with
zstd levels 1, 3, 9 (reused compressor/decompressor contexts) as (a) raw bytes and (b)
byte-shuffled bytes (all low bytes, then all high bytes). MB/s counts uncompressed bytes
(1 MB = 1e6 B); times are the best of several auto-calibrated samples. "ratio/layer" is the
ratio when each layer is compressed as its own frame (~91 KB each, below zstd's 128 KB
block); "ratio/layer planes" compresses each byte plane of each layer as its own frame.
Prints Markdown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _minilm import as_bf16, as_f16, hidden_states  # noqa: E402

LEVELS = (1, 3, 9)
REPEATS = 5
MIN_SAMPLE_S = 0.05


def shuffle(b: bytes | np.ndarray, itemsize: int = 2) -> bytes:
    """Group the bytes of each element by significance (byte 0 of all, then byte 1, ...)."""
    a = np.frombuffer(b, dtype=np.uint8) if isinstance(b, bytes) else b.view(np.uint8).ravel()
    return a.reshape(-1, itemsize).T.copy().tobytes()


def unshuffle(b: bytes, itemsize: int = 2) -> bytes:
    """Inverse of shuffle() (transpose copy: generic but slow, a strided byte gather)."""
    return np.frombuffer(b, dtype=np.uint8).reshape(itemsize, -1).T.copy().tobytes()


def unshuffle2(b: bytes) -> bytes:
    """Inverse of shuffle() for 2-byte elements, by widening to uint16 (vectorised, fast)."""
    planes = np.frombuffer(b, dtype=np.uint8).reshape(2, -1).astype("<u2")
    return (planes[0] | (planes[1] << 8)).astype("<u2").tobytes()


def planes(x: np.ndarray) -> list[bytes]:
    """The byte planes of a 2-byte array: [low bytes, high bytes]."""
    u = x.view(np.uint8).reshape(-1, 2)
    return [u[:, 0].tobytes(), u[:, 1].tobytes()]


def best_time(fn: Callable[[], object]) -> float:
    """Best per-call seconds over REPEATS samples of an auto-calibrated loop."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= MIN_SAMPLE_S:
            break
        n *= 2
    best = dt / n
    for _ in range(REPEATS - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    states = hidden_states()
    tokens = states[0].shape[0]
    print(f"MiniLM-L6: {len(states)} states x ({tokens} tokens, {states[0].shape[1]}), "
          f"zstandard {zstandard.__version__}, numpy {np.__version__}\n")
    print("| dtype | level | layout | bytes | ratio | ratio/layer | ratio/layer planes | comp MB/s | decomp MB/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    dctx = zstandard.ZstdDecompressor()
    for name, conv in (("f16", as_f16), ("bf16", as_bf16)):
        layers = [conv(s) for s in states]
        raw = np.concatenate([x.ravel() for x in layers]).tobytes()
        variants = {
            "raw": (raw, [x.tobytes() for x in layers]),
            "shuffled": (shuffle(raw), [shuffle(x) for x in layers]),
        }
        assert unshuffle(variants["shuffled"][0]) == raw == unshuffle2(variants["shuffled"][0])
        plane_bytes = [p for x in layers for p in planes(x)]
        for level in LEVELS:
            cctx = zstandard.ZstdCompressor(level=level)
            for layout, (data, per_layer) in variants.items():
                comp = cctx.compress(data)
                assert dctx.decompress(comp) == data
                per = sum(len(cctx.compress(p)) for p in per_layer)
                per_planes = sum(len(cctx.compress(p)) for p in plane_bytes)
                split = f"{len(data) / per_planes:.3f}" if layout == "shuffled" else "-"
                tc = best_time(lambda: cctx.compress(data))
                td = best_time(lambda: dctx.decompress(comp))
                mb = len(data) / 1e6
                print(f"| {name} | {level} | {layout} | {len(data)} | {len(data) / len(comp):.3f} "
                      f"| {len(data) / per:.3f} | {split} | {mb / tc:.0f} | {mb / td:.0f} |")

    chunk = as_f16(np.concatenate([s.ravel() for s in states]))[: 64 * 1024 // 2].tobytes()
    assert len(chunk) == 64 * 1024
    sh = shuffle(chunk)
    ts = best_time(lambda: shuffle(chunk))
    tu = best_time(lambda: unshuffle(sh))
    tu2 = best_time(lambda: unshuffle2(sh))
    print(f"\nnumpy byte shuffle of 64 KB (2-byte elements), incl. tobytes():\n"
          f"- shuffle (a.view(u8).reshape(-1, 2).T.copy()): {ts * 1e6:.1f} us ({0.065536 / ts:.0f} MB/s)\n"
          f"- unshuffle (reshape(2, -1).T.copy()): {tu * 1e6:.1f} us ({0.065536 / tu:.0f} MB/s)\n"
          f"- unshuffle (uint16 lo | hi << 8): {tu2 * 1e6:.1f} us ({0.065536 / tu2:.0f} MB/s)")


if __name__ == "__main__":
    main()
