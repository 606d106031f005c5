"""Version 2 frames: zstd compression (with byte-shuffle), XChaCha20-Poly1305, space hashes, keys."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import strategies
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from nacl import bindings as sodium

import resonant
from resonant import Codec, Flags, Key, Keyring, ModelSignature, Think, space_hash32, transforms
from resonant.errors import (
    DecodeError,
    DecompressionFailed,
    DecryptionFailed,
    KeyFileError,
    LayoutError,
    LimitExceeded,
    NotEncrypted,
    SizeMismatch,
    SpaceMismatch,
    TrailingBytes,
    UnknownFlags,
    UnknownKey,
)

KEY = Key(bytes(range(32)), key_id=7)
HIDDEN = (np.sin(np.arange(2048, dtype=np.float32) / 17) * 3).astype(np.float16).reshape(1, 2048)
CODECS = {
    "zstd1": Codec(1), "zstd3": Codec(3), "zstd3-noshuffle": Codec(3, shuffle=False), "zstd19": Codec(19),
    "xchacha": Codec(key=KEY), "zstd+xchacha": Codec(3, key=KEY), "zstd+xchacha-noshuffle": Codec(3, shuffle=False, key=KEY),
    "none": Codec(),
}


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", sorted(CODECS))
@given(frame=strategies.frames())
def test_roundtrip_every_transform(name, frame):
    codec = CODECS[name]
    frame = frame.replace(flags=frame.flags & ~(Flags.ZSTD | Flags.XCHACHA))
    data = codec.encode(frame)
    back = codec.decode(data)
    assert back == frame
    assert back.ignored_flags == Flags(0)
    assert back.flags & Flags.STRONG_TAIL == frame.flags & Flags.STRONG_TAIL
    if codec.keyring is not None:
        assert data[0] == 2 and back.transforms & Flags.XCHACHA
    assert resonant.encode(back) == resonant.encode(frame)  # plain re-encoding claims no transform


@pytest.mark.parametrize("flags", range(8))
@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_flag_combination(name, flags):
    """The codec decides the transform flags: ZSTD/XCHACHA set by hand are replaced by what is applied."""
    codec = CODECS[name]
    frame = Think(HIDDEN, flags=flags, stream_id=3, frame_seq=9)
    data = codec.encode(frame)
    back = codec.decode(data)
    applied = (Flags.ZSTD if codec.zstd_level is not None else 0) | (Flags.XCHACHA if codec.keyring else 0)
    assert back.transforms == applied
    assert back.flags == Flags((flags & Flags.STRONG_TAIL) | applied)
    assert back.ignored_flags == Flags(0)
    assert data[0] == (2 if applied else 1)
    np.testing.assert_array_equal(back.hidden.numpy(), HIDDEN)


def test_plain_decode_reads_compressed_frames_and_views_the_decompressed_buffer():
    data = Codec(3).encode(Think(HIDDEN))
    assert data[0] == 2 and len(data) < 4143
    back = resonant.decode(data)
    arr = back.hidden.numpy()
    np.testing.assert_array_equal(arr, HIDDEN)
    assert arr.base is back.hidden and not arr.flags.writeable


def test_compressible_states_shrink_and_shuffle_helps():
    plain = len(Codec(3, shuffle=False).encode(Think(HIDDEN)))
    shuffled = len(Codec(3).encode(Think(HIDDEN)))
    assert shuffled < plain < 4143


def test_raw_fallback_when_compression_does_not_help():
    noise = np.frombuffer(np.random.default_rng(1).bytes(4096), np.float16).reshape(1, 2048)
    data = Codec(3).encode(Think(noise, stream_id=5))
    assert data == resonant.encode(Think(noise, stream_id=5))  # a plain version 1 frame, flag cleared
    assert resonant.decode(data).flags == Flags(0)
    enc = Codec(3, key=KEY).encode(Think(noise))
    assert enc[0] == 2 and struct.unpack_from("<H", enc, 2)[0] == Flags.XCHACHA  # encrypted, not compressed


@given(st.binary(max_size=600), st.sampled_from([1, 2, 4, 8]))
def test_byte_shuffle_is_invertible(data, width):
    data = data[: len(data) - len(data) % width]
    shuffled = resonant.byte_shuffle(data, width)
    assert resonant.byte_shuffle(shuffled, width, inverse=True) == data
    if width == 2 and data:
        assert shuffled == data[0::2] + data[1::2]


# ------------------------------------------------------------------ encryption


def test_xchacha20poly1305_known_answer():
    """draft-irtf-cfrg-xchacha-03, A.3.1: the primitive the frames use."""
    key, nonce = bytes(range(0x80, 0xA0)), bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    pt = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
          b"sunscreen would be it.")
    expected = bytes.fromhex(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39"
        "ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e" "c0875924c1c7987947deafd8780acf49")
    assert sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(pt, aad, nonce, key) == expected


def test_encrypted_frame_known_answer(monkeypatch):
    """Fixed key, nonce, header and body give fixed bytes, built as the spec says."""
    nonce = bytes(range(100, 124))
    monkeypatch.setattr(transforms, "_urandom", lambda n: nonce)
    frame = resonant.Sync({"method": "ping", "ts": 1730616000}, stream_id=0xABCD1234, space_hash32=2451163210)
    data = Codec(key=KEY).encode(frame)
    # by hand: version-1 header with version 2 and XCHACHA, envelope, AEAD(body, aad = header+envelope)
    plain = resonant.encode(frame)
    header = bytes([2]) + plain[1:2] + struct.pack("<H", Flags.XCHACHA) + plain[4:33]
    body = plain[33:-4]
    envelope = struct.pack("<IBI", len(body), 0, KEY.key_id) + nonce
    ct = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(body, header + envelope, nonce, bytes(range(32)))
    assert data == with_crc(header + envelope + ct)
    assert data.hex() == (
        "020302003412cdab00000000000000000100000000000000240000004ac81992002a0000000007000000646566676869"
        "6a6b6c6d6e6f707172737475767778797a7b7e72ddb0ff2ef2a0ea55e957c90b9ff37b9922188a4be89cac7710d40964"
        "58219c3573481d80c7f7da7bfe9241054c22f2f95d3e861c478708bb3d6f86a8")
    assert len(data) == 33 + 5 + 28 + 42 + 16 + 4
    assert Codec(key=KEY).decode(data) == frame


@given(data=st.data())
def test_any_single_byte_change_to_an_encrypted_frame_is_rejected(data):
    frame = data.draw(strategies.frames())
    wire = bytearray(CODECS[data.draw(st.sampled_from(["xchacha", "zstd+xchacha"]))].encode(frame))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] ^= data.draw(st.integers(1, 255))
    fix_crc = data.draw(st.booleans()) and i < len(wire) - 4
    mutated = with_crc(bytes(wire[:-4])) if fix_crc else bytes(wire)
    with pytest.raises(DecodeError):  # never a frame, never plaintext
        Codec(3, key=KEY).decode(mutated)


def _encrypted(frame=None, codec=None) -> bytes:
    return (codec or Codec(key=KEY)).encode(frame or Think(HIDDEN, stream_id=1, frame_seq=2))


def test_wrong_key_is_rejected():
    other = Key(os.urandom(32), key_id=KEY.key_id)  # same id, different secret
    with pytest.raises(DecryptionFailed, match=r"^body: authentication failed under key 0x00000007: wrong key, or the frame was altered \(at byte 66\)$"):
        Codec(key=other).decode(_encrypted())


def test_unknown_key_id_and_missing_keyring():
    with pytest.raises(UnknownKey, match=r"^key_id: 0x00000007 is not a known key \(this peer holds key id 0x00000009\) \(at byte 38\)$"):
        Codec(key=Key(os.urandom(32), key_id=9)).decode(_encrypted())
    with pytest.raises(UnknownKey, match=r"^key_id: 0x00000007 is not a known key \(no keyring was given\) \(at byte 38\)$"):
        resonant.decode(_encrypted())


@pytest.mark.parametrize("field, offset, fmt, value, error", [
    ("msg_type", 1, "B", 1, DecryptionFailed), ("stream_id", 4, "I", 99, DecryptionFailed),
    ("frame_seq", 8, "Q", 3, DecryptionFailed), ("space_hash32", 28, "I", 5, DecryptionFailed),
    ("modality", 32, "B", 1, DecryptionFailed), ("nonce", 42, "B", 0xEE, DecryptionFailed),
    ("body_len", 33, "I", 4101, SizeMismatch),  # caught by the length check before decryption
])
def test_tampered_header_and_envelope_fields_fail_authentication(field, offset, fmt, value, error):
    wire = bytearray(_encrypted())
    struct.pack_into("<" + fmt, wire, offset, value)
    with pytest.raises(error):
        Codec(key=KEY).decode(with_crc(bytes(wire[:-4])))


def test_swapped_frames_fail_authentication():
    a = _encrypted(Think(HIDDEN, stream_id=1, frame_seq=1))
    b = _encrypted(Think(HIDDEN, stream_id=2, frame_seq=1))
    spliced = with_crc(b[:71] + a[71:-4])  # b's header and envelope, a's ciphertext
    with pytest.raises(DecryptionFailed):
        Codec(key=KEY).decode(spliced)


def test_truncated_tag():
    wire = _encrypted()
    with pytest.raises(SizeMismatch, match=r"^body: 4111 bytes of ciphertext and tag, body_len 4106 needs 4122"):
        Codec(key=KEY).decode(with_crc(wire[:-15]))
    small = Codec(key=KEY).encode(resonant.Sync())
    with pytest.raises(DecodeError):
        Codec(key=KEY).decode(with_crc(small[:-4 - 16]))


def test_a_codec_with_a_key_refuses_unencrypted_frames():
    plain, compressed = resonant.encode(Think(HIDDEN)), Codec(3).encode(Think(HIDDEN))
    for data in (plain, compressed):
        with pytest.raises(NotEncrypted, match=r"^flags: the frame is not encrypted, and this receiver requires encryption"):
            Codec(key=KEY).decode(data)
        assert Codec(key=KEY, require_encryption=False).decode(data) == Think(HIDDEN)
    with pytest.raises(ValueError, match="needs a key"):
        Codec(require_encryption=True)


def test_key_rotation_without_breaking_a_stream():
    old, new = Key.generate(), Key.generate()
    sender, receiver = Codec(key=Keyring([old])), Codec(key=Keyring([old]))
    in_flight = sender.encode(Think(HIDDEN, frame_seq=1))
    receiver.keyring.add(new)
    sender.keyring.add(new, make_primary=True)
    after = sender.encode(Think(HIDDEN, frame_seq=2))
    assert struct.unpack_from("<I", after, 38)[0] == new.key_id
    assert receiver.decode(in_flight).frame_seq == 1 and receiver.decode(after).frame_seq == 2
    receiver.keyring.remove(old.key_id) if receiver.keyring.primary is not old else None
    with pytest.raises(KeyFileError, match="cannot remove the primary key"):
        receiver.keyring.remove(receiver.keyring.primary.key_id)


def test_keys_from_files(tmp_path):
    k = Key.generate()
    k.to_file(tmp_path / "k.hex")
    assert stat.S_IMODE(os.stat(tmp_path / "k.hex").st_mode) == 0o600
    assert Key.from_file(tmp_path / "k.hex") == k
    loose = tmp_path / "loose"
    loose.write_text("x")
    os.chmod(loose, 0o644)
    k.to_file(loose)  # an existing file is tightened before the key is written
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o600 and Key.from_file(loose) == k
    (tmp_path / "raw").write_bytes(bytes(range(32)))
    assert Key.from_file(tmp_path / "raw") == Key(bytes(range(32)))
    (tmp_path / "bad").write_text("not a key")
    with pytest.raises(KeyFileError, match=r"bad: 9 bytes: a key file holds 32 raw bytes or 64 hexadecimal characters$"):
        Key.from_file(tmp_path / "bad")
    with pytest.raises(KeyFileError, match="cannot read the key file"):
        Key.from_file(tmp_path / "missing")
    with pytest.raises(KeyFileError, match=r"^key: 31 bytes, a key is exactly 32$"):
        Key(bytes(31))
    assert "secret" not in repr(k) and k._secret.hex() not in repr(k)
    assert Key(bytes(32)).key_id == Key(bytes(32)).key_id != Key(bytes([1] * 32)).key_id


# ------------------------------------------------------------------ compression bounds


def _segments(*frames: bytes, count: int | None = None) -> bytes:
    n = len(frames) if count is None else count
    return struct.pack("<B", n) + b"".join(struct.pack("<I", len(f)) for f in frames) + b"".join(frames)


def _v2_compressed(frame, zbody: bytes, body_len: int | None = None, filters: int = 0) -> bytes:
    """A version 2 ZSTD frame around a hand-made compressed body (segment table included)."""
    plain = resonant.encode(frame)
    hlen = 29 + 4 * len(frame.slices)
    header = bytes([2]) + plain[1:2] + struct.pack("<H", Flags.ZSTD) + plain[4:hlen]
    raw_len = len(plain) - 4 - hlen if body_len is None else body_len
    return with_crc(header + struct.pack("<IB", raw_len, filters) + zbody)


FRAME16 = Think(np.zeros(16, np.float16))
BODY16 = resonant.encode(FRAME16)[33:-4]  # 38 bytes
Z = zstandard.ZstdCompressor()


def test_zstd_bomb_is_rejected_before_allocating():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * 200_000_000)  # declares 200 MB
    data = _v2_compressed(FRAME16, _segments(bomb))
    tracemalloc.start()
    with pytest.raises(DecompressionFailed, match=r"^body.segments\[0\]: the zstd frames declare more than body_len \(38\) bytes"):
        resonant.decode(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000


def test_unknown_content_size_and_garbage():
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 10_000_000)
    with pytest.raises(DecompressionFailed, match=r"^body.segments\[0\]: not a zstd frame that records its content size"):
        resonant.decode(_v2_compressed(FRAME16, _segments(streamed)))
    with pytest.raises(DecompressionFailed, match="not a zstd frame"):
        resonant.decode(_v2_compressed(FRAME16, _segments(b"\x00garbage")))


def test_segment_table_bounds():
    z = Z.compress(BODY16)
    assert resonant.decode(_v2_compressed(FRAME16, _segments(z))) == FRAME16
    halves = _segments(Z.compress(BODY16[:10]), Z.compress(BODY16[10:]))
    assert resonant.decode(_v2_compressed(FRAME16, halves)) == FRAME16
    cases = [
        (_segments(z, count=0), r"^body.segment_count: 0, not in 1..max_segments \(64\)"),
        (_segments(z, count=65), r"^body.segment_count: 65, not in 1..max_segments"),
        (_segments(z, count=40), r"^body.segment_len: the table of 40 segments needs 161 bytes"),
        (struct.pack("<BI", 1, 10_000) + z, r"^body.segments\[0\]: needs 10000 bytes"),
        (_segments(z) + b"xx", r"^body: 2 bytes after the last segment"),
        (_segments(Z.compress(BODY16[:10])), r"^body: the zstd frames declare 10 bytes, body_len is 38"),
        (_segments(z, Z.compress(b"x")), r"^body.segments\[1\]: the zstd frames declare more than body_len"),
    ]
    for body, message in cases:
        with pytest.raises(DecompressionFailed, match=message):
            resonant.decode(_v2_compressed(FRAME16, body))


def test_lying_sizes():
    z = Z.compress(BODY16)
    with pytest.raises(DecompressionFailed, match="declare more than body_len \\(30\\)"):
        resonant.decode(_v2_compressed(FRAME16, _segments(z), body_len=30))
    with pytest.raises(LimitExceeded, match=r"^body_len: 70000, more than max_frame_bytes \(65536\) \(at byte 33\)$"):
        resonant.decode(_v2_compressed(FRAME16, _segments(z), body_len=70000))
    with pytest.raises(DecompressionFailed, match="unused data"):
        resonant.decode(_v2_compressed(FRAME16, struct.pack("<BI", 1, len(z) + 2) + z + b"xx"))
    longer = Z.compress(BODY16 + b"\0\0")  # honest zstd, body 2 bytes too long
    with pytest.raises(TrailingBytes, match=r"^body: 2 unexpected bytes between the last slice and the end of the body"):
        resonant.decode(_v2_compressed(FRAME16, _segments(longer), body_len=len(BODY16) + 2))
    with pytest.raises(UnknownFlags, match=r"^filters: 0x80"):
        resonant.decode(_v2_compressed(FRAME16, _segments(z), filters=0x80))


def test_shuffled_bodies_are_cut_at_byte_planes():
    frame = Think(HIDDEN)
    data = Codec(3).encode(frame)
    count = data[38]
    assert count == 2  # metadata + low bytes, then high bytes
    crit = resonant.Critique(HIDDEN.reshape(-1)[:100], np.ones(3, np.int8), {"a": 1})
    assert Codec(3).decode(Codec(3).encode(crit)) == crit
    assert Codec(3, shuffle=False).encode(frame)[38] == 1


def test_version_2_needs_a_transform():
    plain = bytearray(resonant.encode(resonant.Sync()))
    plain[0] = 2
    with pytest.raises(LayoutError, match=r"^flags: a version 2 frame must set ZSTD or XCHACHA \(or both\) \(at byte 2\)$"):
        resonant.decode(with_crc(bytes(plain[:-4])))


def test_frame_too_large_after_encryption():
    big = Think(np.zeros(32_740, np.float16))  # fits raw (65,523 bytes), not with the envelope and tag
    assert len(resonant.encode(big)) <= 65536
    with pytest.raises(resonant.EncodeError, match="after the transforms, more than max_frame_bytes"):
        Codec(key=KEY).encode(big)
    assert Codec(3, key=KEY).decode(Codec(3, key=KEY).encode(big)) == big  # compressed, it fits


# ------------------------------------------------------------------ embedding space


def test_space_hash_vectors():
    assert space_hash32("universal-llm-v3", "llama", "v1") == int.from_bytes(
        hashlib.sha256(b"universal-llm-v3:llama:v1").digest()[:4], "little")
    assert space_hash32("universal-llm-v3", "llama", "v1") == 258700663
    assert space_hash32("", "", "") == 1432900721
    assert space_hash32("é", "a", "b") == int.from_bytes(hashlib.sha256("é:a:b".encode()).digest()[:4], "little")
    with pytest.raises(TypeError):
        space_hash32("a", 1, "b")


def test_space_mismatch_names_both_values():
    data = resonant.encode(Think(HIDDEN, space_hash32=2451163210))
    assert resonant.decode(data, expected_space_hash=2451163210).space_hash32 == 2451163210
    with pytest.raises(SpaceMismatch) as exc:
        resonant.decode(data, expected_space_hash=17)
    assert str(exc.value) == ("space_hash32: the frame is for embedding space 2451163210 (0x9219c84a), "
                              "this receiver expects 17 (0x00000011) (at byte 28)")
    enc = Codec(3, key=KEY, expected_space_hash=17)
    with pytest.raises(SpaceMismatch):
        enc.decode(enc.encode(Think(HIDDEN, space_hash32=5)))
    with pytest.raises(TypeError):
        resonant.decode(data, expected_space_hash="x")


def test_model_signature():
    sig = ModelSignature("sentence-transformers/all-MiniLM-L6-v2", "main", "f16", 6, 384, 12, 32, "ab12")
    assert ModelSignature.from_json(sig.to_json()) == sig
    assert sig.space_hash32() == space_hash32(sig.model_id, sig.arch, sig.data_sig)
    other = ModelSignature(sig.model_id, "main", "bf16", 6, 384, 12, 32, "ab12")
    assert sig.differences(other) == {"dtype": ("f16", "bf16")}
    assert sig.explain(other) == "dtype: ours 'f16', theirs 'bf16'"
    assert sig.space_hash32() != other.space_hash32()
    with pytest.raises(resonant.HandshakeError, match=r"^model_signature.hidden_size: expected a non-negative integer"):
        ModelSignature.from_json({**sig.to_json(), "hidden_size": "384"})
    with pytest.raises(resonant.HandshakeError, match=r"^model_signature.version: 2: only version 1"):
        ModelSignature.from_json({**sig.to_json(), "version": 2})


@given(data=st.data())
def test_mutated_compressed_frames_raise_only_decode_errors(data):
    frame = data.draw(strategies.frames()).replace(flags=0)
    wire = bytearray(Codec(1).encode(frame))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    for candidate in (bytes(wire), with_crc(bytes(wire[:-4]))):
        try:
            resonant.decode(candidate)
        except DecodeError:
            pass


def test_aead_backends_interoperate(monkeypatch):
    """Frames sealed through the C pointers into PyNaCl's libsodium open through nacl.bindings, and back."""
    from resonant import _codec
    assert _codec.aead_backend() == "sodium-c"
    nonce = bytes(range(24))
    monkeypatch.setattr(transforms, "_urandom", lambda n: nonce)
    frame = Think(HIDDEN, stream_id=4)
    fast = Codec(3, key=KEY).encode(frame)
    try:
        assert _codec._select_aead("pynacl") == "pynacl" and _codec.aead_backend() == "pynacl"
        slow = Codec(3, key=KEY).encode(frame)
        assert slow == fast  # same nonce, same bytes
        assert Codec(3, key=KEY).decode(fast) == frame
        with pytest.raises(DecryptionFailed):
            Codec(key=Key(os.urandom(32), key_id=7)).decode(fast)
    finally:
        assert _codec._select_aead() == "sodium-c"
    assert Codec(3, key=KEY).decode(slow) == frame
