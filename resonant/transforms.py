"""Real compression and authenticated encryption of V-Frames (version 2 frames).

    key = resonant.Key.generate()                    # or Key.from_file("peer.key")
    codec = resonant.Codec(zstd_level=3, key=key)    # compress, then encrypt
    msg = codec.decode(codec.encode(resonant.Think(hidden)))

The wire layout (envelope, associated data, raw fallback, bounds) is specified in
schema/vframe.yaml and specs/vframe_binary_layout.md. Security properties and their limits
are in specs/security.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import zstandard
from nacl import bindings as _sodium
from nacl.exceptions import CryptoError

from resonant import _codec
from resonant.handshake import SESSION_RANDOM_BYTES
from resonant._spec import (
    BODY_TRANSFORM_FLAGS,
    CRC_BYTES,
    ENVELOPE_BASE_BYTES,
    ENVELOPE_FIELDS,
    KEY_BYTES,
    MAX_FRAME_BYTES,
    MAX_SEGMENTS,
    SEGMENT_COUNT_FORMAT,
    SEGMENT_LEN_FORMAT,
    NONCE_BYTES,
    TAG_BYTES,
    Filters,
    Flags,
)
from resonant.errors import DecompressionFailed, DecryptionFailed, EncodeError, KeyFileError, UnknownKey

__all__ = ["Codec", "Key", "Keyring", "SessionKeyring", "ControlKeyring", "session_key", "control_key",
           "CLIENT_TO_SERVER", "SERVER_TO_CLIENT", "default_codec"]

_ENV_FORMAT = {f.name: f.format for f in ENVELOPE_FIELDS}
_ENV_BASE = struct.Struct("<" + _ENV_FORMAT["body_len"][1:] + _ENV_FORMAT["filters"][1:])  # body_len, filters
_ZSTD, _XCHACHA, _SHUFFLE = int(Flags.ZSTD), int(Flags.XCHACHA), int(Filters.BYTE_SHUFFLE)  # ints: no enum work per frame
_TRANSFORM_BITS = int(BODY_TRANSFORM_FLAGS)
_SEG_COUNT = struct.Struct(SEGMENT_COUNT_FORMAT)
_SEG_LEN = struct.Struct(SEGMENT_LEN_FORMAT)
_KEY_ID = struct.Struct(_ENV_FORMAT["key_id"])
_ONE_SEGMENT_TABLE = _SEG_COUNT.size + _SEG_LEN.size  # a segment table of one segment
_TAG = slice(-(TAG_BYTES + CRC_BYTES), -CRC_BYTES)  # a sealed frame's Poly1305 tag: the bytes before the CRC-32
_HEX_KEY = re.compile(rb"^[0-9a-fA-F]{%d}$" % (2 * KEY_BYTES))
# The nonce source; tests replace it to check known answers. Never reuse a nonce under one key.
_urandom = os.urandom
# Zstd may use a window no larger than this while decompressing (frames are <= 64 KiB).
_MAX_WINDOW = 1 << 20


class Key:
    """A 32-byte XChaCha20-Poly1305 key and its 32-bit key id.

    The id travels in every encrypted frame so a receiver holding several keys (a Keyring)
    picks the right one; by default it is derived from the key (BLAKE2b, so it reveals
    nothing usable about the key), or it can be set explicitly.
    """

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: bytes, key_id: int | None = None) -> None:
        secret = bytes(secret)
        if len(secret) != KEY_BYTES:
            raise KeyFileError("key", f"{len(secret)} bytes, a key is exactly {KEY_BYTES}")
        if key_id is None:
            key_id = int.from_bytes(hashlib.blake2b(secret, digest_size=4, person=b"resonant-keyid").digest(), "little")
        if not isinstance(key_id, int) or not 0 <= key_id <= 0xFFFFFFFF:
            raise KeyFileError("key_id", f"{key_id!r} does not fit u32")
        self._secret = secret
        self.key_id = key_id

    @classmethod
    def generate(cls, key_id: int | None = None) -> "Key":
        """A fresh random key."""
        return cls(os.urandom(KEY_BYTES), key_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike, key_id: int | None = None) -> "Key":
        """Load a key file: 32 raw bytes, or 64 hexadecimal characters (surrounding whitespace ignored)."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise KeyFileError(str(path), f"cannot read the key file: {exc.strerror or exc}") from None
        if len(data) == KEY_BYTES:
            return cls(data, key_id)
        text = data.strip()
        if _HEX_KEY.match(text):
            return cls(bytes.fromhex(text.decode("ascii")), key_id)
        raise KeyFileError(str(path), f"{len(data)} bytes: a key file holds {KEY_BYTES} raw bytes or "
                           f"{2 * KEY_BYTES} hexadecimal characters")

    def to_file(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Write the key as hexadecimal text, readable by the owner only (an existing file's mode is
        reset to 0600 before the key is written; a symbolic link is refused). With overwrite=False
        an existing file is left alone and FileExistsError raised."""
        excl = os.O_TRUNC if overwrite else os.O_EXCL
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | excl | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "w") as f:
            f.write(self._secret.hex() + "\n")

    def __repr__(self) -> str:  # never print the secret
        return f"Key(key_id=0x{self.key_id:08x})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other._secret == self._secret and other.key_id == self.key_id

    __hash__ = None  # type: ignore[assignment]


class Keyring:
    """Keys by id: the primary one encrypts, any of them decrypts.

    Rotating keys without breaking a running stream: add the new key to both peers'
    keyrings, make it primary on the sender, and drop the old one once no frame under it
    can still arrive.
    """

    def __init__(self, keys: Iterable[Key] | Key, primary: int | None = None) -> None:
        keys = [keys] if isinstance(keys, Key) else list(keys)
        if not keys:
            raise KeyFileError("keyring", "at least one key is needed")
        self._keys: dict[int, Key] = {}
        for k in keys:
            if not isinstance(k, Key):
                raise TypeError(f"a Keyring holds Key objects, got {type(k).__name__}")
            if k.key_id in self._keys and self._keys[k.key_id] != k:
                raise KeyFileError("keyring", f"two different keys share key_id 0x{k.key_id:08x}")
            self._keys[k.key_id] = k
        self.primary = self._keys[keys[0].key_id if primary is None else primary]

    def add(self, key: Key, make_primary: bool = False) -> None:
        if key.key_id in self._keys and self._keys[key.key_id] != key:
            raise KeyFileError("keyring", f"two different keys share key_id 0x{key.key_id:08x}")
        self._keys[key.key_id] = key
        if make_primary:
            self.primary = key

    def remove(self, key_id: int) -> None:
        if key_id == self.primary.key_id:
            raise KeyFileError("keyring", "cannot remove the primary key; make another key primary first")
        self._keys.pop(key_id, None)

    def get(self, key_id: int) -> Key | None:
        return self._keys.get(key_id)

    def __contains__(self, key_id: int) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def ids(self) -> list[int]:
        """The key ids held, in the order the keys were added."""
        return list(self._keys)

    def __repr__(self) -> str:
        ids = ", ".join(f"0x{i:08x}" for i in self._keys)
        return f"Keyring([{ids}], primary=0x{self.primary.key_id:08x})"


#: BLAKE2b personalisations (16 bytes) and labels of the two derivations from a long-term key.
_SESSION_PERSON = b"resonant-sess-v2"
_SESSION_LABEL = b"resonant session key v2\x00"
_CONTROL_PERSON = b"resonant-ctrl-v1"
_CONTROL_LABEL = b"resonant control key v1\x00"
#: The two directions of a session. Each has its own keys, so that a frame reflected back to its
#: sender does not open there. The labels are of one length (16 bytes), so the KDF input is unambiguous.
CLIENT_TO_SERVER = "client-to-server"
SERVER_TO_CLIENT = "server-to-client"
_DIRECTION_LABELS = {CLIENT_TO_SERVER: b"client-to-server", SERVER_TO_CLIENT: b"server-to-client"}


def _direction(direction: str) -> bytes:
    try:
        return _DIRECTION_LABELS[direction]
    except (KeyError, TypeError):
        raise ValueError(f"direction {direction!r} is not {CLIENT_TO_SERVER!r} or {SERVER_TO_CLIENT!r}") from None


def session_key(key: Key, client_random: bytes, server_random: bytes, direction: str) -> Key:
    """The key of one direction of one session: keyed BLAKE2b-256 (libsodium's crypto_generichash,
    personalised) under the long-term key over a label, the direction, the client's random and the
    server's random (session_random_bytes each). It keeps the long-term key's key_id, so the frame
    still names the long-term key it descends from."""
    label = _direction(direction)
    if len(client_random) != SESSION_RANDOM_BYTES or len(server_random) != SESSION_RANDOM_BYTES:
        raise ValueError(f"client_random and server_random must be {SESSION_RANDOM_BYTES} bytes each, got "
                         f"{len(client_random)} and {len(server_random)}")
    secret = _sodium.crypto_generichash_blake2b_salt_personal(
        _SESSION_LABEL + label + bytes(client_random) + bytes(server_random), digest_size=KEY_BYTES,
        key=key._secret, person=_SESSION_PERSON)
    return Key(secret, key.key_id)


def control_key(key: Key, direction: str) -> Key:
    """The key that seals control documents (ping, capability, error) in one direction: keyed
    BLAKE2b-256 under the long-term key over a label and the direction. The long-term key itself
    is then only ever a BLAKE2b key, never an AEAD key, in a Session. Keeps the key_id."""
    secret = _sodium.crypto_generichash_blake2b_salt_personal(
        _CONTROL_LABEL + _direction(direction), digest_size=KEY_BYTES, key=key._secret, person=_CONTROL_PERSON)
    return Key(secret, key.key_id)


class _DerivedKeyring(Keyring):
    """Keys derived lazily, key id by key id, from a long-term Keyring. It follows the long-term
    keyring: a key added there (rotation) is usable here at once under the same key_id, the
    primary is the long-term primary's derived key, and a key removed there is gone here too."""

    def __init__(self, base: Keyring) -> None:  # noqa: D107
        self.base = base
        self._derived: dict[int, tuple[Key, Key]] = {}  # key_id -> (long-term key, derived key)

    def _derive(self, key: Key) -> Key:  # pragma: no cover - abstract
        raise NotImplementedError

    def get(self, key_id: int) -> Key | None:
        key = self.base._keys.get(key_id)
        hit = self._derived.get(key_id)
        if hit is not None and hit[0] is key:  # (per frame: two dict look-ups)
            return hit[1]
        if key is None:
            return None
        hit = (key, self._derive(key))
        self._derived[key_id] = hit
        return hit[1]

    @property  # type: ignore[override]
    def primary(self) -> Key:
        key = self.base.primary
        hit = self._derived.get(key.key_id)
        if hit is not None and hit[0] is key:
            return hit[1]
        return self.get(key.key_id)  # type: ignore[return-value]

    def add(self, key: Key, make_primary: bool = False) -> None:
        raise TypeError(f"a {type(self).__name__} follows its long-term keyring: add keys there")

    def remove(self, key_id: int) -> None:
        raise TypeError(f"a {type(self).__name__} follows its long-term keyring: remove keys there")

    def __contains__(self, key_id: int) -> bool:
        return key_id in self.base

    def __len__(self) -> int:
        return len(self.base)

    @property
    def ids(self) -> list[int]:
        return self.base.ids


class SessionKeyring(_DerivedKeyring):
    """The keys of one direction of one session (session_key), derived lazily from a long-term
    Keyring and the handshake's two randoms."""

    def __init__(self, base: Keyring, client_random: bytes, server_random: bytes, direction: str) -> None:  # noqa: D107
        super().__init__(base)
        self._randoms = (bytes(client_random), bytes(server_random))
        self.direction = direction
        session_key(Key(bytes(KEY_BYTES)), *self._randoms, direction)  # (checks the randoms and direction now)

    def _derive(self, key: Key) -> Key:
        return session_key(key, *self._randoms, self.direction)

    def __repr__(self) -> str:
        return f"SessionKeyring({self.direction}, of {self.base!r})"


class ControlKeyring(_DerivedKeyring):
    """The keys that seal control documents in one direction (control_key), derived lazily from a
    long-term Keyring."""

    def __init__(self, base: Keyring, direction: str) -> None:  # noqa: D107
        super().__init__(base)
        _direction(direction)
        self.direction = direction

    def _derive(self, key: Key) -> Key:
        return control_key(key, self.direction)

    def __repr__(self) -> str:
        return f"ControlKeyring({self.direction}, of {self.base!r})"


class Codec:
    """Encodes and decodes frames with optional zstd compression and XChaCha20-Poly1305.

    zstd_level: None (no compression) or a zstd level; compressor and decompressor contexts
    are reused. shuffle: apply BYTE_SHUFFLE to multi-byte payloads before compressing.
    key: a Key or Keyring to encrypt with (and decrypt with). require_encryption: decode rejects
    frames that are not encrypted with NotEncrypted (default: True when a key is given, as an
    unencrypted frame is unauthenticated and anyone on the path could inject it).
    expected_space_hash: decode rejects frames of any other embedding space with SpaceMismatch.

    A frame is sent compressed only when that makes it smaller (raw fallback), and as a
    plain version 1 frame when no transform applies. A Codec is not thread-safe (its zstd
    contexts are not); use one per thread.
    """

    def __init__(self, zstd_level: int | None = None, *, shuffle: bool = True, key: Key | Keyring | None = None,
                 require_encryption: bool | None = None, expected_space_hash: int | None = None,
                 record_tags: int = 0) -> None:
        if zstd_level is not None and not isinstance(zstd_level, int):
            raise TypeError(f"zstd_level must be an int or None, got {zstd_level!r}")
        if zstd_level is not None and not (zstandard.MAX_COMPRESSION_LEVEL * -1 <= zstd_level <= zstandard.MAX_COMPRESSION_LEVEL):
            raise ValueError(f"zstd_level {zstd_level} is outside zstd's range")
        self.zstd_level = zstd_level
        self.shuffle = bool(shuffle)
        self.keyring = key if isinstance(key, Keyring) or key is None else Keyring([key])
        self.require_encryption = self.keyring is not None if require_encryption is None else bool(require_encryption)
        if self.require_encryption and self.keyring is None:
            raise ValueError("require_encryption needs a key to decrypt with")
        self.expected_space_hash = expected_space_hash
        self._cctx = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, write_checksum=False) \
            if zstd_level is not None else None
        self._dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
        # The Poly1305 tags of the last record_tags encrypted frames encoded (a Session's proof that an
        # error is about a frame it sent under this codec's keys); None when not asked for.
        self.sent_tags: deque[bytes] | None = deque(maxlen=record_tags) if record_tags > 0 else None

    # ------------------------------------------------------------------ encode

    def encode(self, frame: _codec.Frame) -> bytes:
        """The frame's bytes, compressed and/or encrypted as configured."""
        data = self._encode(frame)
        if self.sent_tags is not None and self.keyring is not None:
            self.sent_tags.append(data[_TAG])
        return data

    def note_sent(self, data) -> None:
        """Record the tag of a frame another Codec (a clone()) encoded for this one, as encode() does."""
        if self.sent_tags is not None and self.keyring is not None:
            self.sent_tags.append(bytes(data[_TAG]))

    def clone(self, zstd: bool = True) -> "Codec":
        """A Codec that encodes as this one does (the same keyring, level and shuffle; without zstd
        when zstd is False), with contexts of its own, for another thread; it records no tags
        (the caller passes each frame it sends to note_sent)."""
        return Codec(self.zstd_level if zstd else None, shuffle=self.shuffle, key=self.keyring,
                     require_encryption=self.require_encryption, expected_space_hash=self.expected_space_hash)

    def zstd_saving(self, frame: _codec.Frame) -> float:
        """The fraction of the frame's body that this codec's zstd would save (0.0 without zstd;
        below 0 when the compressed body would be larger)."""
        if self._cctx is None:
            return 0.0
        raw = _codec.encode_body(frame, self.shuffle)
        if not raw:
            return 0.0
        return 1.0 - sum(map(len, self._compress(raw, _plane_cuts(frame) if self.shuffle else ()))) / len(raw)

    def _encode(self, frame: _codec.Frame) -> bytes:
        transforms = 0
        filters = 0
        body = None
        raw_len = 0
        if self._cctx is not None:
            raw = _codec.encode_body(frame, self.shuffle)
            raw_len = len(raw)
            parts = self._compress(raw, _plane_cuts(frame) if self.shuffle else ())
            if sum(map(len, parts)) < raw_len:  # raw fallback otherwise: never send a larger "compressed" body
                body = parts
                transforms |= _ZSTD
                filters = _SHUFFLE if self.shuffle else 0
        if self.keyring is not None:
            transforms |= _XCHACHA
        if not transforms:
            return _codec.encode(frame if not frame.flags & _TRANSFORM_BITS
                                 else frame.replace(flags=frame.flags & ~_TRANSFORM_BITS))
        if body is None:
            body = [_codec.encode_body(frame, False)]
            raw_len = len(body[0])
        header = _codec.encode_header(frame, transforms)
        envelope = _ENV_BASE.pack(raw_len, filters)
        if transforms & _XCHACHA:
            key = self.keyring.primary
            nonce = _urandom(NONCE_BYTES)
            head = header + envelope + _KEY_ID.pack(key.key_id) + nonce
            body = body[0] if len(body) == 1 else b"".join(body)
            if _codec.aead_backend() == "sodium-c":  # encrypt straight into the frame
                try:
                    return _codec.seal_frame(head, body, nonce, key._secret)
                except EncodeError:
                    raise EncodeError("frame", f"{len(head) + len(body) + 20} bytes after the transforms, more "
                                      f"than max_frame_bytes ({MAX_FRAME_BYTES}); send it as a stream") from None
            body = [_sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(body, head, nonce, key._secret)]
        else:
            head = header + envelope
        try:
            return _codec.assemble(head, *body)
        except EncodeError:
            raise EncodeError("frame", f"{len(head) + sum(map(len, body)) + 4} bytes after the transforms, more than "
                              f"max_frame_bytes ({MAX_FRAME_BYTES}); send it as a stream") from None

    # ------------------------------------------------------------------ decode

    def decode(self, data, *, strict: bool = False) -> _codec.Frame:
        """Decode a frame of either version, undoing compression and encryption (strict: as
        resonant.decode's, a frame whose slices fit none of its type's layouts raises LayoutError)."""
        return _codec.decode(data, codec=self, expected_space_hash=self.expected_space_hash,
                             require_encryption=self.require_encryption, strict=strict)

    def _open(self, key_id: int, nonce, aad, ciphertext, offset: int) -> bytes:
        key = self.keyring.get(key_id) if self.keyring is not None else None
        if key is None:
            have = ("no keyring was given" if self.keyring is None else "this peer holds key id"
                    + ("s " if len(self.keyring.ids) > 1 else " ") + ", ".join(f"0x{i:08x}" for i in self.keyring.ids))
            raise UnknownKey("key_id", f"0x{key_id:08x} is not a known key ({have})",
                             offset - NONCE_BYTES - _KEY_ID.size)
        if _codec.aead_backend() == "sodium-c":  # decrypt straight from the received buffer
            plain = _codec.open_body(ciphertext, aad, nonce, key._secret)
        else:
            try:
                plain = _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    bytes(ciphertext), bytes(aad), bytes(nonce), key._secret)
            except CryptoError:
                plain = None
        if plain is None:
            raise DecryptionFailed("body", f"authentication failed under key 0x{key_id:08x}: wrong key, or the "
                                   "frame was altered", offset)
        return plain

    def _compress(self, body: bytes, cuts: Iterable[int]) -> list[bytes]:
        """[segment table, zstd frame, ...]: one zstd frame per segment, cut at the byte planes."""
        bounds = [0, *sorted({c for c in cuts if 0 < c < len(body)}), len(body)]
        if len(bounds) - 1 > MAX_SEGMENTS:  # keep the first cuts; the last segment takes the rest
            bounds = bounds[:MAX_SEGMENTS] + [len(body)]
        if len(bounds) == 2:
            frames = [self._cctx.compress(body)]
        else:
            view = memoryview(body)
            frames = [self._cctx.compress(view[a:b]) for a, b in zip(bounds, bounds[1:])]
        table = _SEG_COUNT.pack(len(frames)) + b"".join(_SEG_LEN.pack(len(f)) for f in frames)
        return [table, *frames]

    def _inflate(self, data, body_len: int, offset: int) -> bytes:
        # Every segment must be one zstd frame that declares its content size, and the sizes
        # must add up to body_len (<= max_frame_bytes): all checked before anything is
        # allocated, because zstandard's decompress() trusts a declared size over max_output_size.
        one = _ONE_SEGMENT_TABLE
        if len(data) > one and data[0] == 1:  # one segment (no shuffle): the common case, checked the same way
            (length,) = _SEG_LEN.unpack_from(data, _SEG_COUNT.size)
            if length == len(data) - one:
                return self._inflate_one(memoryview(data)[one:], body_len, 0, offset + one)
        data = memoryview(data)
        if len(data) < _SEG_COUNT.size:
            raise DecompressionFailed("body.segment_count", "missing", offset)
        (count,) = _SEG_COUNT.unpack_from(data, 0)
        if not 1 <= count <= MAX_SEGMENTS:
            raise DecompressionFailed("body.segment_count", f"{count}, not in 1..max_segments ({MAX_SEGMENTS})", offset)
        pos = _SEG_COUNT.size + count * _SEG_LEN.size
        if pos > len(data):
            raise DecompressionFailed("body.segment_len", f"the table of {count} segments needs {pos} bytes, "
                                      f"{len(data)} remain", offset + _SEG_COUNT.size)
        segments, total = [], 0
        for i in range(count):
            (length,) = _SEG_LEN.unpack_from(data, _SEG_COUNT.size + i * _SEG_LEN.size)
            if length > len(data) - pos:
                raise DecompressionFailed(f"body.segments[{i}]", f"needs {length} bytes, {len(data) - pos} remain",
                                          offset + pos)
            seg = data[pos:pos + length]
            try:
                size = zstandard.frame_content_size(seg)
            except zstandard.ZstdError:
                size = -1
            if size < 0:
                raise DecompressionFailed(f"body.segments[{i}]", "not a zstd frame that records its content size",
                                          offset + pos)
            total += size
            if total > body_len:
                raise DecompressionFailed(f"body.segments[{i}]", f"the zstd frames declare more than body_len "
                                          f"({body_len}) bytes", offset + pos)
            segments.append((seg, size, pos))
            pos += length
        if pos != len(data):
            raise DecompressionFailed("body", f"{len(data) - pos} bytes after the last segment", offset + pos)
        if total != body_len:
            raise DecompressionFailed("body", f"the zstd frames declare {total} bytes, body_len is {body_len}", offset)
        out = [self._decompress(seg, size, i, offset + at) for i, (seg, size, at) in enumerate(segments)]
        return out[0] if count == 1 else b"".join(out)

    def _inflate_one(self, seg, body_len: int, i: int, at: int) -> bytes:
        """A body of one segment at frame offset `at` (the segment table is the 5 bytes before it)."""
        try:
            size = zstandard.frame_content_size(seg)
        except zstandard.ZstdError:
            size = -1
        if size < 0:
            raise DecompressionFailed(f"body.segments[{i}]", "not a zstd frame that records its content size", at)
        if size > body_len:
            raise DecompressionFailed(f"body.segments[{i}]", f"the zstd frames declare more than body_len ({body_len}) bytes", at)
        if size < body_len:
            raise DecompressionFailed("body", f"the zstd frames declare {size} bytes, body_len is {body_len}", at - 5)
        return self._decompress(seg, size, i, at)

    def _decompress(self, seg, size: int, i: int, at: int) -> bytes:
        try:
            return self._dctx.decompress(seg, max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise DecompressionFailed(f"body.segments[{i}]", f"zstd: {exc}", at) from None

    def __repr__(self) -> str:
        return (f"Codec(zstd_level={self.zstd_level}, shuffle={self.shuffle}, key={self.keyring!r}, "
                f"require_encryption={self.require_encryption}, expected_space_hash={self.expected_space_hash})")


def _plane_cuts(frame: _codec.Frame) -> list[int]:
    """Body offsets where BYTE_SHUFFLE starts a byte plane other than a payload's first."""
    cuts, pos = [], 0
    for s in frame.slices:
        pos += 2 + 4 * len(s.shape)
        width, n = _codec.element_bytes(s.dtype), s.nbytes
        if width > 1 and n and n % width == 0:
            cuts.extend(pos + k * (n // width) for k in range(1, width))
        pos += n
    return cuts


_local = threading.local()


def default_codec() -> Codec:
    """The codec `resonant.decode` uses for version 2 frames: decompresses, holds no key (per thread)."""
    codec = getattr(_local, "codec", None)
    if codec is None:
        codec = _local.codec = Codec()
    return codec


assert ENVELOPE_BASE_BYTES == _ENV_BASE.size
