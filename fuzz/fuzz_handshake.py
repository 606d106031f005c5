"""Fuzz target: handshake.parse (the control documents' JSON: ping, capability, head, tail,
error) and, for a head document, StreamLayout.from_head. Input: the JSON bytes.

    python3 fuzz/fuzz_handshake.py -max_total_time=120      # see docs/fuzzing.md
"""

import json

import atheris

with atheris.instrument_imports(include=["resonant"]):
    import resonant
    import resonant.handshake
    import resonant.stream
    from resonant.errors import ResonantError

import common


def TestOneInput(data: bytes) -> None:
    try:
        doc = resonant.handshake.parse(data)
    except ResonantError:
        return
    if doc.get("method") == "head":
        try:
            resonant.stream.StreamLayout.from_head(doc)
        except ResonantError:
            pass


def seeds() -> list[bytes]:
    out = [json.dumps(d).encode() for d in resonant.handshake.EXAMPLES.values()]
    for f in common.vector_frames() + common.encoder_frames():
        try:
            fr = resonant.decode(f)
        except ResonantError:
            continue
        if isinstance(fr, resonant.Sync) and fr.json is not None:
            out.append(fr.json.tobytes())
    return out


if __name__ == "__main__":
    common.run("handshake", TestOneInput, seeds)
