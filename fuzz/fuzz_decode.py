"""Fuzz target: resonant.decode (the C codec), the reference codec on the same bytes, and what a
receiver does with a decoded frame (Slice.numpy, quant.to_float / sparse_to_dense, text/json,
resonant.inspect). Input: a mode byte (bit 0: recompute the CRC), then the frame.

    python3 fuzz/fuzz_decode.py -max_total_time=120      # see docs/fuzzing.md
"""


import atheris

with atheris.instrument_imports(include=["resonant"]):
    import resonant
    import resonant.inspect
    import resonant.quant
    import resonant.refcodec
    from resonant.errors import ResonantError

import common


def consume(frame) -> None:
    """What a receiver may do with a decoded frame: every step raises a ResonantError or works."""
    for s in frame.slices:
        for fn in (lambda s: s.numpy(), resonant.quant.to_float, resonant.quant.sparse_to_dense,
                   lambda s: s.json()):
            try:
                fn(s)
            except ResonantError:
                pass
        repr(s), s.shape, s.nbytes, s.tobytes()
    repr(frame)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    frame = common.prepare(data[0] & common.FIX_CRC, data[1:])
    try:
        f = resonant.decode(frame)
    except ResonantError:
        f = None
    try:
        resonant.refcodec.decode(frame)
    except ResonantError:
        pass
    if f is not None:
        consume(f)
    resonant.inspect.render_json(frame)
    resonant.inspect.render_text(frame)


if __name__ == "__main__":
    common.run("decode", TestOneInput, lambda: common.frame_seeds(keyed=False))
