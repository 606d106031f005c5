"""Fuzz target: Reassembler.receive and tick (V-Stream reassembly) with the clock advancing.
Input: a config byte (bit 0: decode with the test key's Codec), then operations (see
common.ops): frames to receive (mode bits: recompute the CRC, seal), ticks, clock steps.

    python3 fuzz/fuzz_reassembler.py -max_total_time=120      # see docs/fuzzing.md
"""

import atheris

with atheris.instrument_imports(include=["resonant"]):
    import resonant
    import resonant.stream
    import resonant.transforms
    from resonant.errors import ResonantError

import common

KEY = common.test_key()


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    codec = resonant.transforms.Codec(key=KEY, require_encryption=False) if data[0] & 1 else None
    r = resonant.stream.Reassembler(codec=codec)
    now = 1000.0
    for kind, mode, payload in common.ops(data):
        if kind == common.OP_DATAGRAM or kind == common.OP_DATA:
            try:
                r.receive(common.prepare(mode & (common.FIX_CRC | common.SEAL), payload), now)
            except ResonantError:
                pass
        elif kind == common.OP_TICK:
            r.tick(now)
        elif kind == common.OP_ADVANCE:
            now += payload[0] / 8 if payload else 256.0
    r.tick(now + 3600.0)
    r.close()


def seeds() -> list[bytes]:
    import numpy as np
    from resonant.stream import StreamSender
    rng = np.random.default_rng(3)
    objs = [rng.standard_normal((4, 40)).astype(np.float16), rng.standard_normal(300).astype(np.float32)]
    out = []
    for keyed in (0, 1):
        codec = resonant.transforms.Codec(zstd_level=3, key=KEY) if keyed else None
        frames = list(StreamSender(5, objs, max_frame_bytes=512, codec=codec, names=["k", "v"]))
        seq = bytes([keyed]) + b"".join(common.op(common.OP_DATAGRAM, f) for f in frames)
        out.append(seq)
        # reordered, duplicated, with ticks and clock steps, some frames with CRC fix-up
        mixed = frames[::-1] + frames[:2]
        seq = bytes([keyed]) + b"".join(common.op(common.OP_DATAGRAM, f, common.FIX_CRC) + common.op(common.OP_ADVANCE, b"\x10")
                                        + common.op(common.OP_TICK) for f in mixed)
        out.append(seq)
    return out


if __name__ == "__main__":
    common.run("reassembler", TestOneInput, seeds, max_len=262144)
