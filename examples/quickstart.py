"""Quickstart: build messages from numpy arrays, encode them to V-Frames, decode them back.

Run: python examples/quickstart.py
"""

import numpy as np

import resonant
from resonant import Critique, DType, Slice, Sync, Think

rng = np.random.default_rng(0)
hidden = rng.standard_normal((1, 2048)).astype(np.float16)  # one token's hidden state

# A Think message from one array; header fields have sensible defaults.
think = Think(hidden, stream_id=7, frame_seq=1, space_hash32=2451163210)
wire = resonant.encode(think)
back = resonant.decode(wire)
view = back.hidden.numpy()  # a numpy view of `wire`: no copy
print(f"Think: {len(wire)} bytes on the wire, shape {view.shape} {view.dtype}, "
      f"identical: {np.array_equal(view, hidden)}, shares memory with the frame: "
      f"{np.shares_memory(view, np.frombuffer(wire, np.uint8))}")

# Control messages carry JSON; a Critique carries a divergence vector, a mask and an explanation.
ping = Sync({"method": "ping", "ts": 1730616000}, stream_id=7)
crit = Critique(np.zeros(16, np.float16), np.array([3, 17], np.int8),
                {"note": "divergence at dims [3, 17]", "magnitude": 0.042}, stream_id=7, frame_seq=2)
for msg in (ping, crit):
    data = resonant.encode(msg)
    print(f"{type(msg).__name__}: {len(data)} bytes -> {resonant.decode(data)!r}")

# float32 activations convert explicitly: nothing is narrowed behind your back.
f32 = rng.standard_normal(384).astype(np.float32)
print("f32 -> F16:", resonant.decode(resonant.encode(Think(Slice.from_array(f32, dtype=DType.F16)))).hidden)

# Malformed input raises one of Resonant's errors, naming the field and the byte offset.
broken = bytearray(wire)
broken[40] ^= 0xFF
try:
    resonant.decode(bytes(broken))
except resonant.DecodeError as exc:
    print(f"{type(exc).__name__}: {exc}")
try:
    resonant.decode(wire[:-1])
except resonant.DecodeError as exc:
    print(f"{type(exc).__name__}: {exc}")
