"""Shared parts of the fuzz targets: the finding rule, input fix-ups, seeds and the runner.

A finding is (docs/fuzzing.md):
  * any exception out of an entry point that is not a resonant.errors.ResonantError
    (for the Session targets, whose receive_* and tick "never raise for anything the peer
    sent", any exception at all);
  * a crash (a signal: segfault, abort) or a timeout (-timeout, default 10 s per input);
  * a memory blow-up: the process over -rss_limit_mb (default here 2048 MB), or one malloc
    over -malloc_limit_mb (default: the rss limit).
atheris reports a finding by printing the traceback and writing the input to
<artifact_prefix>crash-<sha1> (or oom-/timeout-/leak-), then exits non-zero.

Input fix-ups. Almost every mutation of a frame breaks its CRC-32, and every mutation of an
encrypted frame breaks its Poly1305 tag, so a fuzzer that fed the bytes as they come would
spend its time on ChecksumMismatch and DecryptionFailed. Each target therefore reads one mode
byte first (see `prepare`): it can recompute the CRC, and it can encrypt the body in place
with the known test key (the fuzzer then mutates the plaintext: the zstd segments, body_len,
the slices), before the bytes reach the entry point. Inputs with mode 0 go in as they are.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("RESONANT_FUZZ_DIR", ROOT / "build" / "fuzz"))

# A fixed test key (never a real secret) for the keyed targets and their seeds.
TEST_KEY_BYTES = bytes(range(32))
TEST_KEY_ID = 0x5E57_0001

FIX_CRC = 1      # mode bit: recompute the trailing CRC-32
SEAL = 2         # mode bit: encrypt the body in place with the test key (version 2, XCHACHA)
WRAP = 4         # mode bit (receive_data): prefix the frame with its u32 record length

_CRC = struct.Struct("<I")
PREFIX_SIZE = 24       # version .. num_slices
SUFFIX_SIZE = 5        # space_hash32, modality
ENVELOPE_KEYED = 4 + 1 + 4 + 24   # body_len, filters, key_id, nonce


def fix_crc(frame: bytes) -> bytes:
    if len(frame) < 4:
        return frame
    return frame[:-4] + _CRC.pack(zlib.crc32(frame[:-4]))


def seal(frame: bytes, key: bytes = TEST_KEY_BYTES) -> bytes:
    """Treat frame as a version 2 XCHACHA frame whose ciphertext region (after the envelope,
    before the CRC) holds the plaintext without a tag: encrypt it with key (AAD = the header
    and envelope as given, nonce = the envelope's) and append tag and CRC. Frames whose header
    cannot be laid out are returned unchanged."""
    from resonant import _codec
    if len(frame) < PREFIX_SIZE:
        return frame
    (num,) = struct.unpack_from("<Q", frame, 16)
    if num > 1024:
        return frame
    h = PREFIX_SIZE + 4 * num + SUFFIX_SIZE + ENVELOPE_KEYED
    if len(frame) < h + 4:
        return frame
    head = bytes(frame[:h])
    body = frame[h:-4]
    try:
        return _codec.seal_frame(head, body, head[-24:], key)
    except Exception:  # too large for a frame: leave it as it is
        return frame


def unseal(frame: bytes, key: bytes = TEST_KEY_BYTES) -> bytes | None:
    """The inverse of seal for a real encrypted frame (to make seeds): the plaintext body in
    place of ciphertext and tag; None if it does not open."""
    from resonant import _codec
    (num,) = struct.unpack_from("<Q", frame, 16)
    h = PREFIX_SIZE + 4 * num + SUFFIX_SIZE + ENVELOPE_KEYED
    head = frame[:h]
    body = _codec.open_body(frame[h:-4], head, head[-24:], key)
    if body is None:
        return None
    return head + body + frame[-4:]


def prepare(mode: int, frame: bytes) -> bytes:
    if mode & SEAL:
        frame = seal(frame)
    elif mode & FIX_CRC:
        frame = fix_crc(frame)
    if mode & WRAP:
        frame = _CRC.pack(len(frame)) + frame
    return frame


def test_key():
    from resonant.transforms import Key
    return Key(TEST_KEY_BYTES, TEST_KEY_ID)


# ------------------------------------------------------------------ operation sequences (Session targets)

# An input is a config byte, then operations: op (u8), length (u16 LE), payload.
# op & 0x0F: 0 receive_datagram, 1 receive_data, 2 tick, 3 advance the clock by payload[0]/8 s
#            (and by 256 s when payload is empty), 4 drain the send queue;
# op >> 4: the mode bits applied to the payload (FIX_CRC, SEAL, WRAP).
OP_DATAGRAM, OP_DATA, OP_TICK, OP_ADVANCE, OP_DRAIN = range(5)


def ops(data: bytes):
    pos = 1
    while pos + 3 <= len(data):
        op = data[pos]
        (n,) = struct.unpack_from("<H", data, pos + 1)
        pos += 3
        yield op & 0x0F, op >> 4, data[pos:pos + n]
        pos += n


def op(kind: int, payload: bytes = b"", mode: int = 0) -> bytes:
    return bytes([kind | (mode << 4)]) + struct.pack("<H", len(payload)) + payload


# ------------------------------------------------------------------ seeds


def vector_frames() -> list[bytes]:
    vec = ROOT / "tests" / "vectors" / "reference"
    return [p.read_bytes() for p in sorted(vec.glob("*.bin"))]


def encoder_frames(keyed: bool = False) -> list[bytes]:
    """Real frames made by the encoder: every message type, dtype family and transform."""
    import numpy as np

    import resonant
    from resonant import Ask, Cache, Critique, Sync, Think, handshake, quant
    from resonant.stream import StreamSender
    from resonant.transforms import Codec

    rng = np.random.default_rng(14)
    h = rng.standard_normal((4, 64)).astype(np.float16)
    frames = [
        Think(h, stream_id=1, frame_seq=1),
        Think(np.zeros((2, 0, 3), np.float32), stream_id=1, frame_seq=2),
        Cache(h, h[::-1].copy(), stream_id=2),
        Ask(rng.standard_normal(32).astype(np.float32), "context text", stream_id=3),
        Critique(h[0], explanation={"why": "fuzz"}, stream_id=4),
        Sync({"method": "ping", "ts": 1.0, "v": 2}, stream_id=5),
        Sync(handshake.EXAMPLES["capability"], stream_id=5),
        Sync(stream_id=6),
        Think(quant.quantize(h.astype(np.float32), "q8_0"), stream_id=7),
        Think(quant.quantize(h.astype(np.float32), "q4_0"), stream_id=7),
        Think(quant.sparse_from_dense(h.astype(np.float32), top_k=5), stream_id=8),
    ]
    out = [resonant.encode(f) for f in frames]
    codecs = [Codec(zstd_level=3)]
    if keyed:
        codecs += [Codec(key=test_key()), Codec(zstd_level=3, key=test_key())]
    for c in codecs:
        out += [c.encode(f) for f in frames]
        z = np.zeros((256, 64), np.float16)
        out.append(c.encode(Think(z, stream_id=9)))
    out.append(large_body_chunk())
    # A small V-Stream: HEAD, chunks, TAIL, HEART.
    objs = [h.astype(np.float16), rng.standard_normal((3, 50)).astype(np.float32)]
    for c in [None] + (codecs if keyed else []):
        sender = StreamSender(20, objs, max_frame_bytes=600, codec=c, names=["a", "b"])
        out += list(sender)
    return out


def large_body_chunk(stream_id: int = 21, n: int = 65536 - 6) -> bytes:
    """A zstd (version 2) Chunk frame whose body is 64 KiB before compression (legal, ~70 bytes):
    more payload than a plain frame carries, which no encoder makes (an early-held frame of a
    Reassembler once re-encoded it and raised EncodeError)."""
    import zstandard

    from resonant import _codec
    from resonant._codec import Chunk, Slice
    from resonant._spec import DType
    from resonant.transforms import _ENV_BASE, _ZSTD

    body = bytes([DType.I8, 1]) + struct.pack("<I", n) + bytes(n)
    seg = zstandard.ZstdCompressor(level=3).compress(body)
    header = _codec.encode_header(Chunk(Slice(DType.I8, (n,), bytes(n)), stream_id=stream_id, frame_seq=1), _ZSTD)
    return _codec.assemble(header + _ENV_BASE.pack(len(body), 0), struct.pack("<BI", 1, len(seg)), seg)


def write_seeds(corpus: Path, seeds: list[bytes]) -> None:
    import hashlib
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    for s in seeds:
        (corpus / hashlib.sha1(s).hexdigest()).write_bytes(s)


def frame_seeds(keyed: bool) -> list[bytes]:
    """Mode byte + frame, for the single-frame targets: each frame as it is, with the CRC
    recomputed, and (keyed) its plaintext body to be sealed again."""
    seeds = []
    for f in vector_frames() + encoder_frames(keyed):
        seeds.append(bytes([0]) + f)
        seeds.append(bytes([FIX_CRC]) + f)
        if keyed and f[0] == 2 and struct.unpack_from("<H", f, 2)[0] & 2:
            plain = unseal(f)
            if plain is not None:
                seeds.append(bytes([SEAL]) + plain)
    return seeds


# ------------------------------------------------------------------ runner


def run(name: str, test_one_input, seeds, max_len: int = 65540) -> None:
    """atheris main: the corpus directory defaults to build/fuzz/<name>/corpus (seeded on first
    use) and crash files go to build/fuzz/<name>/ unless the command line says otherwise."""
    import atheris

    argv = list(sys.argv)
    files = [a for a in argv[1:] if not a.startswith("-")]
    if not files:
        corpus = WORK / name / "corpus"
        write_seeds(corpus, seeds())
        argv.append(str(corpus))
    if not any(a.startswith("-artifact_prefix=") for a in argv):
        (WORK / name).mkdir(parents=True, exist_ok=True)
        argv.append(f"-artifact_prefix={WORK / name}/")
    if not any(a.startswith("-rss_limit_mb=") for a in argv):
        argv.append("-rss_limit_mb=2048")
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append(f"-max_len={max_len}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
