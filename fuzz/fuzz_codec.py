"""Fuzz target: Codec.decode with a key (the fixed test key) and zstd: frames in the clear,
compressed, encrypted, both. Input: a mode byte (bit 0: recompute the CRC; bit 1: encrypt the
body in place with the test key, so that mutations reach decompression and the slices; bit 3:
require encryption), then the frame.

    python3 fuzz/fuzz_codec.py -max_total_time=120      # see docs/fuzzing.md
"""

import atheris

with atheris.instrument_imports(include=["resonant"]):
    import resonant
    import resonant.inspect
    import resonant.quant
    import resonant.transforms
    from resonant.errors import ResonantError

import common
from fuzz_decode import consume

KEY = common.test_key()
CODECS = {False: resonant.transforms.Codec(key=KEY, require_encryption=False),
          True: resonant.transforms.Codec(key=KEY, require_encryption=True)}


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode = data[0]
    frame = common.prepare(mode & (common.FIX_CRC | common.SEAL), data[1:])
    try:
        f = CODECS[bool(mode & 8)].decode(frame)
    except ResonantError:
        return
    consume(f)
    resonant.inspect.render_json(frame, codec=CODECS[False])


if __name__ == "__main__":
    common.run("codec", TestOneInput, lambda: common.frame_seeds(keyed=True))
