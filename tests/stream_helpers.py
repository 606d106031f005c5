"""Helpers shared by the V-Stream tests (test_stream, test_stream_sender, test_stream_limits,
test_reassembler)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

import resonant
from resonant import MsgType, Reassembler, StreamLimits, Sync
from resonant.stream_layout import StreamLayout

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.int8)]
GRACE = StreamLimits().tail_grace
IDLE = StreamLimits().idle_timeout


def deliver(r: Reassembler, frames, now: float = 0.0) -> list:
    events: list = []
    for data in frames:
        events += r.receive(data, now)
    return events


def of(events, cls) -> list:
    return [e for e in events if isinstance(e, cls)]


def assert_bit_exact(got: np.ndarray, want: np.ndarray) -> None:
    want = np.asarray(want)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def random_array(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(rng.bytes(n * dtype.itemsize), dtype).reshape(shape)


def kv_cache(layers: int = 32, shape=(8, 16, 64), seed: int = 0):
    rng = np.random.default_rng(seed)
    objs, names, layer_of = [], [], []
    for i in range(layers):
        for part in ("keys", "values"):
            objs.append(rng.standard_normal(shape).astype(np.float16))
            names.append(f"layer{i}.{part}")
            layer_of.append(i)
    return objs, names, layer_of


def head_doc(objects, chunk_bytes=4096, total_bytes=None, **extra) -> dict:
    doc = {"method": "head", "v": 1, "msg_type": int(MsgType.CACHE), "chunk_bytes": chunk_bytes,
           "total_bytes": sum(o.get("nbytes", 0) for o in objects) if total_bytes is None else total_bytes,
           "objects": objects, "hash": "xxh3_64"}
    doc.update(extra)
    return doc


def head_frame(doc, stream_id: int) -> bytes:
    return resonant.encode(Sync(doc, stream_id=stream_id, frame_seq=0))


def chunk_range(layout: StreamLayout, k: int) -> tuple[int, int]:
    obj, start, length = layout.chunk(k)
    return obj.offset + start, obj.offset + start + length


def expected_missing(layout: StreamLayout, dropped) -> list[tuple[int, int]]:
    """The dropped chunks' byte ranges, in stream order, touching ranges joined, empty ones
    (an empty object's chunk) left out."""
    out: list[tuple[int, int]] = []
    for k in sorted(dropped):
        a, b = chunk_range(layout, k)
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def byte_mask(total: int, ranges) -> np.ndarray:
    mask = np.zeros(total, bool)
    for a, b in ranges:
        mask[a:b] = True
    return mask


@st.composite
def stream_objects(draw, max_total: int = 300_000, max_objects: int = 6):
    """Several tensors of random dtypes (f16/bf16/f32/i8), 0..max_total bytes in all."""
    count = draw(st.integers(1, max_objects))
    budget = draw(st.sampled_from([64, 4096, 65536, max_total])) // count
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    objs = []
    for _ in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        n = budget // dtype.itemsize * draw(st.integers(0, 100)) // 100
        rows = draw(st.integers(1, 8))
        shape = (rows, n // rows) if n % rows == 0 else (n,)
        objs.append(random_array(rng, dtype, shape))
    return objs
