"""Encode/decode benchmark of the resonant V-Frame codec against its peers, in one process.

Not part of the test suite. Run from the repository root:

    python3 bench/bench_codec.py [--quick] [--json PATH|-] [--check] [--require-all]

Every implementation carries the same logical content (header fields + slices). Times are
the best (minimum) of N samples of an auto-calibrated loop, per call, with the GC disabled.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import timeit
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

import resonant

refcodec: ModuleType | None
try:
    from resonant import refcodec
except ImportError:
    refcodec = None
msgspec: ModuleType | None
try:
    import msgspec
except ImportError:
    msgspec = None
st_numpy: ModuleType | None
try:
    import safetensors.numpy as st_numpy
except ImportError:
    st_numpy = None

SYNC_JSON = {"method": "ping", "ts": 1730616000}
SEED = 20241103
RESONANT, ACCESS, REFCODEC, MSGSPEC = "resonant", "resonant +access", "refcodec", "msgspec msgpack"
CRC = "crc32 over frame"

if msgspec is not None:

    class MsgSlice(msgspec.Struct, array_like=True, gc=False):
        dtype: int
        shape: tuple[int, ...]
        payload: bytes

    class MsgFrame(msgspec.Struct, array_like=True, gc=False):
        version: int
        msg_type: int
        flags: int
        stream_id: int
        frame_seq: int
        space_hash32: int
        modality: int
        slices: list[MsgSlice]


@dataclass
class Case:
    """One implementation on one payload: timed statements over the names in `ns`."""

    name: str
    encode: str | None  # statement, or None when the row has no encode side
    decode: str
    ns: dict[str, Any]
    wire: bytes


@dataclass
class Row:
    name: str
    encode_ns: float | None
    decode_ns: float
    wire_bytes: int


@dataclass
class Target:
    name: str
    value: float | None  # None: the peer is missing (SKIP)
    op: str  # ">=": speedup (peer / resonant); "<=": resonant / reference
    limit: float
    note: str = ""
    status: str = field(init=False)

    def __post_init__(self) -> None:
        if self.value is None:
            self.status = "SKIP"
        else:
            ok = self.value >= self.limit if self.op == ">=" else self.value <= self.limit
            self.status = "PASS" if ok else "FAIL"


def payloads() -> dict[str, resonant.Frame]:
    rng = np.random.default_rng(SEED)

    def f16(n: int) -> np.ndarray:
        return rng.standard_normal((1, n)).astype(np.float16)

    common = dict(stream_id=0xABCD1234, space_hash32=0x9219C84A)
    return {
        "Sync ping (~80 B)": resonant.Sync(SYNC_JSON, **common),
        "Think f16 (1, 2048) (4 KiB)": resonant.Think(f16(2048), frame_seq=1, **common),
        "Think f16 (1, 32000) (~64 KB)": resonant.Think(f16(32000), frame_seq=2, **common),
    }


def header_fields(frame: resonant.Frame) -> dict[str, int]:
    names = ("version", "msg_type", "flags", "stream_id", "frame_seq", "space_hash32", "modality")
    return {n: int(getattr(frame, n)) for n in names}


def cases(frame: resonant.Frame) -> list[Case]:
    """Each implementation's encode input and wire bytes, checked to round-trip to the same content."""
    wire = resonant.encode(frame)
    assert resonant.decode(wire) == frame
    sl = frame.slices[0]
    access = "payload" if frame.msg_type == resonant.MsgType.SYNC else "numpy()"
    r_ns = {"encode": resonant.encode, "decode": resonant.decode, "frame": frame, "data": wire}
    out = [Case(RESONANT, "encode(frame)", "decode(data)", r_ns, wire),
           Case(ACCESS, None, f"decode(data).slices[0].{access}", r_ns, wire)]
    if refcodec is not None:
        ref = refcodec.from_frame(frame)
        ref_wire = refcodec.encode(ref)
        assert ref_wire == wire and refcodec.decode(wire) == ref, "refcodec disagrees with resonant"
        out.append(Case(REFCODEC, "encode(ref)", "decode(data)",
                        {"encode": refcodec.encode, "decode": refcodec.decode, "ref": ref, "data": wire}, wire))
    if msgspec is not None:
        obj = MsgFrame(**header_fields(frame), slices=[
            MsgSlice(int(s.dtype), tuple(int(d) for d in s.shape), s.tobytes()) for s in frame.slices])
        enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(type=MsgFrame)
        m_wire = enc.encode(obj)
        assert dec.decode(m_wire) == obj
        out.append(Case(MSGSPEC, "encode(obj)", "decode(data)",
                        {"encode": enc.encode, "decode": dec.decode, "obj": obj, "data": m_wire}, m_wire))
    if st_numpy is not None:
        arr = np.frombuffer(sl.tobytes(), np.uint8) if access == "payload" else sl.numpy()
        tensors = {"slice0": arr}
        meta = {k: str(v) for k, v in header_fields(frame).items()}  # load() does not return metadata
        s_wire = st_numpy.save(tensors, metadata=meta)
        assert np.array_equal(st_numpy.load(s_wire)["slice0"], arr)
        out.append(Case("safetensors", "save(tensors, metadata=meta)", "load(data)",
                        {"save": st_numpy.save, "load": st_numpy.load, "tensors": tensors, "meta": meta,
                         "data": s_wire}, s_wire))
    out.append(Case(CRC, None, "crc32(data)", {"crc32": resonant.crc32, "data": wire}, wire))
    return out


def time_stmt(stmt: str, ns: dict[str, Any], min_ns: int, repeat: int) -> float:
    """Per-call ns: the best of `repeat` samples, each a loop calibrated to last >= min_ns."""
    timer = timeit.Timer(stmt, globals=ns, timer=time.perf_counter_ns)  # the statement is inlined in the loop
    gc.collect()
    gc.disable()
    try:
        number = 1
        while (elapsed := timer.timeit(number)) < min_ns:
            number = max(number * 2, int(number * 1.1 * min_ns / max(elapsed, 1)))
        return min(timer.timeit(number) for _ in range(repeat)) / number
    finally:
        gc.enable()


def run_payload(frame: resonant.Frame, min_ns: int, repeat: int) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for c in cases(frame):
        enc = time_stmt(c.encode, c.ns, min_ns, repeat) if c.encode else None
        rows[c.name] = Row(c.name, enc, time_stmt(c.decode, c.ns, min_ns, repeat), len(c.wire))
    return rows


def fmt_ns(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def ratio(peer: float | None, base: float | None) -> float | None:
    return None if peer is None or base is None else peer / base


def fmt_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def table(title: str, rows: dict[str, Row]) -> str:
    base = rows[RESONANT]
    lines = [f"### {title}", "",
             "| implementation | encode ns | decode ns | wire bytes | encode × vs resonant | decode × vs resonant |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in rows.values():
        lines.append(f"| {r.name} | {fmt_ns(r.encode_ns)} | {fmt_ns(r.decode_ns)} | {r.wire_bytes:,} | "
                     f"{fmt_x(ratio(r.encode_ns, base.encode_ns))} | {fmt_x(ratio(r.decode_ns, base.decode_ns))} |")
    return "\n".join(lines)


def targets(results: dict[str, dict[str, Row]]) -> tuple[list[Target], list[Target]]:
    """Targets judge decode on "resonant +access" (materialized, like the peers); lazy decode as a note."""
    sync, think4k, think64k = results.values()

    def t(name: str, rows: dict[str, Row], peer: str, side: str, op: str, limit: float) -> Target:
        if peer not in rows:
            return Target(name, None, op, limit, f"{peer} not available")
        peer_ns = getattr(rows[peer], f"{side}_ns")
        value = (lambda ns: peer_ns / ns) if op == ">=" else (lambda ns: ns / peer_ns)
        if side == "encode":
            return Target(name, value(rows[RESONANT].encode_ns), op, limit)
        return Target(name, value(rows[ACCESS].decode_ns), op, limit,
                      f"lazy decode: {value(rows[RESONANT].decode_ns):.2f}×")

    main = [
        t("Sync decode speedup vs refcodec", sync, REFCODEC, "decode", ">=", 8.0),
        t("Sync encode speedup vs refcodec", sync, REFCODEC, "encode", ">=", 5.0),
        t("Sync decode time / msgspec", sync, MSGSPEC, "decode", "<=", 1.5),
        t("Sync encode time / msgspec", sync, MSGSPEC, "encode", "<=", 1.5),
        t("64 KB decode time / crc32 over its bytes", think64k, CRC, "decode", "<=", 2.0),
    ]
    info = [t("4 KiB Think decode speedup vs refcodec", think4k, REFCODEC, "decode", ">=", 0.0),
            t("4 KiB Think encode speedup vs refcodec", think4k, REFCODEC, "encode", ">=", 0.0)]
    return main, info


def print_targets(main_t: list[Target], info_t: list[Target], out, unit: str = "×") -> None:
    """PASS/FAIL lines for the targets (values in `unit`), then the informational ratios."""
    sep = " " if unit[:1].isalpha() else ""
    for tg in main_t:
        val = "n/a" if tg.value is None else f"{tg.value:.2f}{sep}{unit}"
        note = f" ({tg.note})" if tg.note else ""
        print(f"- {tg.status} {tg.name}: {val} (need {tg.op} {tg.limit:g}{sep}{unit}){note}", file=out)
    for tg in info_t:
        val = "n/a" if tg.value is None else f"{tg.value:.2f}×"
        print(f"- info {tg.name}: {val}" + (f" ({tg.note})" if tg.note else ""), file=out)


def peak_rss_mb(reset: bool = False) -> float:
    """This process's peak resident memory in MiB: VmHWM (the high-water mark of its own address
    space; ru_maxrss would carry the parent's over fork and exec); reset=True starts it again from
    the current RSS (Linux: /proc/self/clear_refs)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(dest: str | None, doc: Any) -> None:
    """The benches' --json: the document to PATH, or to stdout for "-"; nothing without one."""
    if not dest or doc is None:
        return
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")


def finish(args: argparse.Namespace, doc: dict[str, Any] | None, main_t: list[Target]) -> int:
    """Write the JSON document (--json PATH, or - for stdout); exit 1 on a failed target with --check."""
    write_json(args.json, doc)
    return 1 if args.check and any(t.status == "FAIL" for t in main_t) else 0


def best_of(fn, repeat: int) -> float:
    """Seconds of the fastest of `repeat` calls (after one warm-up call), GC off."""
    fn()
    gc.collect()
    gc.disable()
    try:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        gc.enable()


def load_states() -> tuple[list[np.ndarray] | None, str]:
    """MiniLM-L6 hidden states (7 float32 (tokens, 384) arrays), or None and why not."""
    try:
        import _minilm
    except ImportError as exc:  # ml_dtypes missing
        return None, f"cannot import bench/_minilm.py: {exc}"
    try:
        return _minilm.hidden_states(), ""
    except RuntimeError as exc:  # torch or the model package missing: the message names the install command
        return None, str(exc)
    except ImportError as exc:  # transformers missing
        return None, f"{exc}; run: {_minilm.INSTALL_HINT}"


def print_machine(info: dict[str, Any], out, extra: str = "") -> None:
    """The machine and versions lines every benchmark starts with."""
    v = info["versions"]
    print(f"machine: {info['cpu']}, {info['cpu_count']} CPUs ({info['uname']})", file=out)
    print(f"python: {info['python']}; " + ", ".join(f"{k} {v[k] or 'n/a'}" for k in v)
          + f"; crc32 backend: {info['crc32_backend']}" + extra, file=out)


def machine(modules: tuple = ("msgspec", "safetensors", "Cython")) -> dict[str, Any]:
    """The machine, Python and backends, and the versions of resonant, numpy and `modules`
    (import names, or (import name, distribution name) pairs; None when not installed)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions: dict[str, str | None] = {"resonant": resonant.__version__, "numpy": np.__version__}
    for item in modules:
        mod, dist = item if isinstance(item, tuple) else (item, item)
        try:
            versions[dist] = __import__(mod).__version__
        except ImportError:
            versions[dist] = None
    return {"cpu": cpu or "unknown", "uname": " ".join(platform.uname()), "cpu_count": os.cpu_count(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "versions": versions, "crc32_backend": resonant.crc32_backend()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 samples of >= 0.05 s (default: 5 of >= 0.2 s)")
    p.add_argument("--repeat", type=int, help="samples per measurement (best is kept)")
    p.add_argument("--json", metavar="PATH", help="write raw numbers and targets as JSON ('-' for stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 if any target fails")
    p.add_argument("--require-all", action="store_true", help="error if a peer (refcodec, msgspec, ...) is missing")
    args = p.parse_args(argv)
    missing = [n for n, m in (("resonant.refcodec", refcodec), ("msgspec", msgspec), ("safetensors", st_numpy))
               if m is None]
    if args.require_all and missing:
        p.error(f"--require-all: cannot import {', '.join(missing)}")
    repeat = args.repeat or (2 if args.quick else 5)
    min_ns = 50_000_000 if args.quick else 200_000_000
    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON

    info = machine()
    print_machine(info, out)
    print(f"timing: best of {repeat} sample(s) of >= {min_ns / 1e9:g} s each, ns per call, GC off"
          + (f"; missing: {', '.join(missing)}" if missing else ""), file=out)

    results = {title: run_payload(frame, min_ns, repeat) for title, frame in payloads().items()}
    for title, rows in results.items():
        print("\n" + table(title, rows), file=out)

    main_t, info_t = targets(results)
    print("\n## Targets (decode measured as decode+access)\n", file=out)
    print_targets(main_t, info_t, out)
    doc = None
    if args.json:
        doc = {"machine": info, "repeat": repeat, "min_sample_ns": min_ns,
               "payloads": {t: {n: asdict(r) for n, r in rows.items()} for t, rows in results.items()},
               "targets": [asdict(t) for t in main_t], "info": [asdict(t) for t in info_t]}
    return finish(args, doc, main_t)


if __name__ == "__main__":
    sys.exit(main())
