"""A peer session, sans-IO: the capability handshake, negotiation, replay protection and streams.

Bytes go in (`receive_datagram` for UDP, `receive_data` for a TCP byte stream), events come
out, and the frames to send back wait in `datagrams_to_send()` / `data_to_send()`. The clock
is passed in (`now=`); nothing here reads the time or touches a socket.

    client = Session(SessionConfig(role="client"))
    client.initiate(now)                          # queues the ping
    for d in client.datagrams_to_send(): sock.send(d)
    events = client.receive_datagram(reply, now)  # -> HandshakeComplete(agreed)
    client.send(Think(hidden), now)               # encoded with what was agreed

The handshake is the explicit table `TRANSITIONS` (resonant.transitions): (role, state, input) -> (action, next
state). Received bytes are first classified into one input (a compatible ping, an incompatible
ping, a capability, an error, data, a bad frame...), so every row is deterministic and a
property test drives every row. TCP records are resonant.records; the replay window, resonant.replay.
"""

from __future__ import annotations

import json
import operator
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from resonant import _codec, handshake
from resonant import fec as _fec
from resonant.delivery import REPORT_INTERVAL, Delivery
from resonant._codec import Chunk, Frame, MessageReceived, Slice, Sync, make_frame
from resonant._codec import SessionCore, accept_message, count_in, message_event, next_frame_seq, queue_frame
from resonant._spec import (DEFAULT_DTYPES, DTYPE_FALLBACK, DTYPE_OF_WIRE_NAME, DTYPE_SIZE_RULES, DTYPE_WIRE_NAMES,
                            CRC_BYTES, HEADER_FIELDS, MAX_FRAME_BYTES, PREFIX_BYTES, PREFIX_OFFSETS,
                            REFERENCE_DTYPES, TAG_BYTES, TCP_LENGTH_PREFIX_BYTES, VERSION, VERSION_TRANSFORMED, Flags,
                            MsgType, space_hash32_offset)
from resonant.errors import (
    DecodeError,
    EncodeError,
    DecryptionFailed,
    UnknownKey,
    FramingError,
    HandshakeError,
    LocalProtocolError,
    NotEncrypted,
    SpaceMismatch,
)
from resonant.space import ModelSignature
from resonant.kv import KVReceiver
from resonant.reassembler import Reassembler
from resonant.records import RecordReader, frame_record
from resonant.replay import IdRanges, ReplayWindow
from resonant.stream_layout import MIN_STREAM_FRAME, StreamLayout
from resonant.stream_limits import MemoryBudget, StreamLimits
from resonant.stream_sender import StreamSender
from resonant.transforms import CLIENT_TO_SERVER, SERVER_TO_CLIENT, Codec, ControlKeyring, Key, Keyring, SessionKeyring
from resonant.transitions import ACTION_METHOD, TRANSITIONS, Action, Input, Role, State

__all__ = [
    "Role", "State", "Input", "Action", "TRANSITIONS", "SessionConfig", "Agreement", "Session",
    "ReplayWindow", "IdRanges", "RecordReader", "frame_record",
    "HandshakeComplete", "HandshakeFailed", "RemoteError", "MessageReceived", "FrameRejected", "ConnectionBroken",
    "PROTOCOL_VERSION", "PROTOCOL_VERSIONS",
]

#: Protocol versions: 1 = version-1 frames only (the reference; a ping without "v"),
#: 2 = version-2 frames too (compression and encryption).
PROTOCOL_VERSIONS = (VERSION, VERSION_TRANSFORMED)  # the frame versions of schema/vframe.yaml
PROTOCOL_VERSION = max(PROTOCOL_VERSIONS)
_CHUNK = int(MsgType.CHUNK)
_SYNC = int(MsgType.SYNC)
_CRITIQUE = int(MsgType.CRITIQUE)
_EMPTY_MASK = Slice.from_array(np.zeros(0, np.int8))  # reference mode: a Critique's absent mask, before its explanation
_XCHACHA = int(Flags.XCHACHA)
_TAG = slice(-(TAG_BYTES + CRC_BYTES), -CRC_BYTES)  # an encrypted frame's Poly1305 tag: the bytes before the CRC-32
_FORMAT = {f.name: f.format for f in HEADER_FIELDS}
_VERSION_AT, _MSG_TYPE_AT, _FLAGS_AT, _STREAM_ID_AT = (PREFIX_OFFSETS[name] for name in
                                                       ("version", "msg_type", "flags", "stream_id"))
_FLAGS = struct.Struct(_FORMAT["flags"])
_STREAM_ID = struct.Struct(_FORMAT["stream_id"])
_CLOSED = State.CLOSED  # (a module constant: an Enum class attribute is slow to look up)
_CONTROL_METHODS = ("ping", "capability", "error")  # the documents sealed under the control keys
_RANDOM_BYTES = handshake.SESSION_RANDOM_BYTES
_SENT_TAGS = handshake.SENT_TAGS_REMEMBERED
#: Why reference mode sends one frame per message (Session._send_reference, Session.stream, the CLI).
REFERENCE_ONE_FRAME = ("reference mode (the peer never answered a ping: taken for a reference receiver) sends one "
                        "frame per message, because the reference has no V-Stream reassembly; send smaller tensors, "
                        "or use a resonant receiver")
_RANDOM_HEX = re.compile(r"[0-9a-f]{%d}" % (2 * _RANDOM_BYTES)).fullmatch


# ------------------------------------------------------------------ configuration and agreement


# The dtypes' names in handshake documents, what a protocol-1 peer reads, what a session offers by
# default and what a tensor becomes when the peer lacks its dtype: all from schema/vframe.yaml.
_DTYPE_CODE_NAMES = {int(code): name for code, name in DTYPE_WIRE_NAMES.items()}

_CONFIRM = json.dumps(handshake.build("confirm"), separators=(",", ":")).encode()  # key confirmation (keyed sessions)

# The fields of its ping (client) and capability (server) that the Session sets itself; any other
# field of the schema may be given a value in SessionConfig.extra_fields (the others take their default).
_SESSION_FIELDS = {
    Role.CLIENT: ("ping", ("method", "v", "space_hash32", "compress", "crypto", "max_frame_bytes", "supports",
                           "model_signature", "client_random")),
    Role.SERVER: ("capability", ("method", "v", "agreed_proto", "space_hash32", "compress", "crypto",
                                 "max_frame_bytes", "supports", "d_model", "embedding_space_id", "model_signature",
                                 "client_random", "server_random")),
}


@dataclass(frozen=True)
class SessionConfig:
    """What one side supports and insists on.

    compress / crypto: what this side can use, preferred first ("none" included when plain
    frames are acceptable). A key turns encryption on: crypto defaults to xchacha20poly1305
    alone, and the session becomes strict. strict: refuse data before the handshake (default:
    on when a key or an expected space hash is configured). zstd_level: the level this side
    compresses with once zstd is agreed. dtypes: the dtypes this side sends and reads, by their
    handshake names (schema/vframe.yaml; default: every dtype the spec offers). extra_fields: values
    for fields of the ping (client) or capability (server) that the Session does not set itself,
    e.g. an optional field added to schema/handshake.yaml (absent ones are sent with their default).

    expected_signature: the model this side runs (ModelSignature.from_hf); a KV-cache stream (HEAD's
    kv) whose model signature differs, or that names none, fails at its HEAD with reason model_mismatch
    (the sender's send_kv_cache raises DeliveryFailed with it), before anything is allocated.

    reference_fallback (client): when no capability and no error came within reference_fallback_wait
    seconds of the first ping (default: reference_fallback_ms of schema/handshake.yaml), take the peer
    for a reference receiver (which reads pings but never answers them) and go on in reference mode
    (Session.reference_mode): version-1 frames, only the dtypes the reference reads (others converted
    by the dtype fallback rules, or refused), one frame per message (no V-Stream). Not allowed with a
    key or a strict session (ValueError): they never fall back. A capability that answers the ping
    after the fallback (a resonant server that answered late) ends reference mode: the session adopts
    what it agrees and reports HandshakeComplete again, with Agreement.reference unset (the frames
    sent so far, version 1, are read by any peer). See "Talking to reference peers" in
    specs/capability_handshake.md.
    strict_layout: refuse a frame whose slices fit none of its message type's layouts (LayoutError,
    reported as a malformed frame); by default such a frame, valid on the wire, is delivered with
    layout_ok False (a V-Stream chunk is always held to its layout).
    """

    role: Role | str = Role.CLIENT
    key: Key | Keyring | None = None
    expected_space_hash: int | None = None
    space_hash32: int = 0                     # this side's own space, announced in ping/capability
    model_signature: ModelSignature | None = None
    embedding_space_id: str | None = None
    d_model: int | None = None
    compress: tuple[str, ...] = ("none", "zstd")
    zstd_level: int = 3
    crypto: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    critique: bool = True
    versions: tuple[int, ...] = PROTOCOL_VERSIONS
    max_frame_bytes: int = MAX_FRAME_BYTES
    strict: bool | None = None
    strict_layout: bool = False               # refuse (as malformed) a message whose slices fit no layout of its type
    stream_limits: StreamLimits = StreamLimits()
    replay_window: int = 1024                 # frame_seq positions remembered per stream
    replay_streams: int = 4096                # streams whose window is kept (least recently used dropped)
    replay_ranges: int = handshake.REPLAY_EVICTED_RANGES  # ranges of dropped windows' stream ids remembered
    control_tags: int = handshake.CONTROL_TAGS_REMEMBERED  # sealed control documents remembered (acted on once)
    handshake_retry: float = 0.5              # seconds between pings while no capability came
    handshake_attempts: int = 6               # pings before the handshake fails
    error_interval: float = 1.0               # at most one unsolicited error reply per interval
    rekey_interval: float = 0.25              # keyed server, established: at most one new session offered per interval
    extra_fields: Mapping[str, Any] | None = None  # more fields of this side's ping / capability (see above)
    reference_fallback: bool = False          # client: no answer within reference_fallback_wait -> reference mode
    reference_fallback_wait: float = handshake.REFERENCE_FALLBACK_MS / 1000  # seconds after the first ping
    feedback: bool = True                     # offer V-Stream feedback (reports, verdicts; supports.feedback)
    hold_verdicts: bool = False               # receiver: a verified stream's verdict waits for verdict() (the application)
    feedback_timeout: float = handshake.FEEDBACK_TIMEOUT_MS / 1000  # sender: give a stream up after this silence
    expected_signature: ModelSignature | None = None  # receiver: refuse KV streams of another model (model_mismatch)

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        if self.crypto is None:
            object.__setattr__(self, "crypto", ("xchacha20poly1305",) if self.key is not None else ("none",))
        if not MIN_STREAM_FRAME <= self.max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes {self.max_frame_bytes} is outside {MIN_STREAM_FRAME}..{MAX_FRAME_BYTES} "
                             "(a V-Stream HEAD must fit one frame)")
        if "xchacha20poly1305" in self.crypto and self.key is None:
            raise ValueError("crypto offers xchacha20poly1305 but no key is configured")
        for name, values, allowed in (("compress", self.compress, ("zstd", "none")),
                                      ("crypto", self.crypto, ("xchacha20poly1305", "none")),
                                      ("dtypes", self.dtypes, tuple(DTYPE_OF_WIRE_NAME))):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name} {list(values)!r}: each must be one of {', '.join(allowed)}")
        method, own = _SESSION_FIELDS[self.role]
        for name, value in (self.extra_fields or {}).items():
            if name in own:
                raise ValueError(f"extra_fields: {method}.{name} is set by the Session itself")
            try:
                handshake.check_field(method, name, value)
            except (HandshakeError, ValueError) as exc:
                raise ValueError(f"extra_fields: {exc}") from None
        if self.reference_fallback:
            if self.key is not None or self.is_strict:
                raise ValueError("reference_fallback: a session with a key or a strict one never falls back to "
                                 "reference mode (version-1 frames to a reference receiver are neither encrypted nor "
                                 "authenticated, and it does no handshake)")
            if not any(d in REFERENCE_DTYPES for d in self.dtypes):
                raise ValueError(f"reference_fallback: dtypes {list(self.dtypes)} has none of what a reference "
                                 f"receiver reads ({', '.join(REFERENCE_DTYPES)})")
            if not self.reference_fallback_wait > 0:
                raise ValueError(f"reference_fallback_wait {self.reference_fallback_wait!r} must be > 0 seconds")
        if self.extra_fields is not None:  # a read-only copy: the config stays immutable
            object.__setattr__(self, "extra_fields", MappingProxyType(dict(self.extra_fields)))

    @property
    def is_strict(self) -> bool:
        if self.strict is not None:
            return self.strict
        return self.key is not None or self.expected_space_hash is not None


@dataclass(frozen=True)
class Agreement:
    """What both sides settled on: the protocol version, what frames are compressed and
    encrypted with, the dtypes both understand and the largest frame either may send."""

    proto: int
    compress: str               # "zstd" or "none": what this side sends with
    crypto: str                 # "xchacha20poly1305" or "none"
    dtypes: tuple[str, ...]
    max_frame_bytes: int
    critique: bool
    peer_space_hash32: int | None = None
    peer_model_signature: ModelSignature | None = None
    reference: bool = False     # assumed, not agreed: no answer came and the peer is taken for a reference receiver
    feedback: bool = False      # V-Stream feedback agreed: receivers report and send verdicts, senders repair and wait
    fec: bool = False           # the peer reads V-Streams with forward error correction (StreamSender(fec=(k, m)))


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class HandshakeComplete:
    agreement: Agreement


@dataclass(frozen=True)
class HandshakeFailed:
    code: str
    message: str


@dataclass(frozen=True)
class RemoteError:
    """The peer sent an error document outside the handshake (about one of our frames)."""

    code: str
    message: str
    document: dict


# MessageReceived (a frame that is not part of a V-Stream, with its control document when it is
# a Sync) is defined in the codec, whose fast path builds it in C.


@dataclass(frozen=True)
class FrameRejected:
    """A frame was dropped and counted. reason: 'malformed', 'space_mismatch', 'not_encrypted',
    'replay', 'too_old', 'handshake_required', 'closed', 'ping_refused' (a server's refusal of a ping,
    answered with an error document: detail is "CODE: message"); with a key: 'unauthenticated' (an error
    in the clear), 'stale' (sealed for another session or handshake, or an error about a frame this
    client did not send under its current session key), 'rate_limited' (a server's answer to a ping
    offering a new session within rekey_interval of the last), 'evicted' (a stream whose
    replay window was dropped), 'exhausted' (no replay state left for a new stream: re-key)."""

    reason: str
    detail: str
    error: DecodeError | None = None


@dataclass(frozen=True)
class ConnectionBroken:
    """The byte stream cannot continue (a bad TCP record length, or EOF inside a record)."""

    error: FramingError



def _immutable(data) -> bool:
    """bytes, or a view of bytes: what a decoded message may keep pointing into."""
    return type(data) is bytes or type(data) is memoryview and type(data.obj) is bytes



# ------------------------------------------------------------------ the session


class Session(SessionCore):
    """One peer relationship, sans-IO. See the module docstring.

    The per-message paths (send, receive_datagram, receive_data, datagrams_to_send,
    data_to_send, records_to_send) are SessionCore's, in C; they hand everything but plain
    data messages to the methods here."""

    def __init__(self, config: SessionConfig | None = None, *, budget: MemoryBudget | None = None,
                 allocate: Callable[[int, StreamLayout], Any] | None = None, **kwargs: Any) -> None:
        """budget: a MemoryBudget shared with other sessions (a server's peers), so that
        their streams together stay within one limit. allocate: the Reassembler's hook for
        output buffers the caller supplies (see Reassembler)."""
        if config is None:
            config = SessionConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass a SessionConfig or keyword arguments, not both")
        self.config = config
        self.role = config.role
        self._space = config.expected_space_hash  # (the config is frozen)
        self.state = State.IDLE
        self._closed = State.CLOSED
        self.agreement = None  # (sets _limit and _reduce)
        self._direct_state: State | None = None  # _chunks_direct's answer, for this state
        self._direct = False
        self._keyring = config.key if isinstance(config.key, Keyring) or config.key is None else Keyring([config.key])
        # What this side reads: anything it can (compressed or not, encrypted when it holds a key).
        # The space hash is checked here, not in the decoder, so that a ping from another space
        # is answered with an explained SPACE_MISMATCH rather than dropped.
        self._decoder = Codec(key=self._keyring, require_encryption=self._keyring is not None)
        self._encoder: Codec | None = None  # until agreed: plain frames (or encrypted when a key is held)
        # With a key, every key is derived from the long-term keyring, per direction (this side sends
        # under one, reads under the other, so a frame reflected to its sender does not open there):
        # ping, capability and error are sealed under the control keys (_sealer / _lt_decoder); once
        # agreed, everything else under the session's keys (_send_keys / _session_keys, from the
        # long-term keys and both sides' randoms), which _encoder / _decoder then hold.
        self._sealer: Codec | None = None
        self._lt_decoder: Codec | None = None
        if self._keyring is not None:
            mine, theirs = ((CLIENT_TO_SERVER, SERVER_TO_CLIENT) if self.role is Role.CLIENT
                            else (SERVER_TO_CLIENT, CLIENT_TO_SERVER))
            self._directions = (mine, theirs)
            self._decoder.keyring = ControlKeyring(self._keyring, theirs)
            self._encoder = Codec(key=ControlKeyring(self._keyring, mine))
            self._sealer = self._encoder
            self._lt_decoder = Codec(key=self._decoder.keyring, require_encryption=True)
        self._session_keys: SessionKeyring | None = None  # what this side reads under (the peer's direction)
        self._send_keys: SessionKeyring | None = None
        # A re-key that is not proven yet: a keyed server in established that answered a new ping keeps
        # its session until a frame authenticates under the new keys (_pending: randoms, agreement,
        # decoder); a client that adopted new keys still reads frames under the old ones until one
        # arrives under the new (_previous: decoder, replay window).
        self._pending: tuple[tuple[bytes, bytes], Agreement, Codec] | None = None
        self._previous: tuple[Codec, ReplayWindow] | None = None
        self._committed: HandshakeComplete | None = None  # a pending re-key that a frame just proved
        self._last_rekey_answer = float("-inf")
        self._client_random: bytes | None = None  # this handshake's randoms (keyed sessions)
        self._server_random: bytes | None = None
        self._seen_tags: OrderedDict[bytes, None] = OrderedDict()  # sealed control documents acted on
        self._last_unauthenticated: str | None = None  # the last error in the clear, for the TIMEOUT message
        self._undecryptable: tuple[int, int, bytes] | None = None  # (msg_type, stream_id, tag) of a frame that failed to open
        self._current = None  # the keyed frame being handled (_frame)
        self._used_streams = IdRanges()  # stream ids opened by stream() in this session
        self._fb = False  # V-Stream feedback agreed (and not in reference mode)
        self._deliveries: dict[int, Delivery] = {}  # this side's streams waiting for their verdict
        self._next_stream_id = 1
        self.reassembler = Reassembler(config.stream_limits, codec=self._decoder, budget=budget, allocate=allocate,
                                       expected_signature=config.expected_signature)
        self.kv = KVReceiver()  # KV-cache streams' events (kv.expand(events): KVLayerReceived, KVCacheReceived)
        self.replay = ReplayWindow(config.replay_window, config.replay_streams, config.replay_ranges)
        self.records = RecordReader(config.max_frame_bytes)
        self._out: list[bytes] = []
        self._pings_sent = 0
        self._next_ping = 0.0
        self._silence_at = 0.0  # when the reference fallback is due (reference_fallback: initiate() + its wait)
        self._last_error_reply = float("-inf")
        self._seq: dict[int, int] = {}
        self.stats: dict[str, int] = {k: 0 for k in (
            "frames_in", "frames_out", "bytes_in", "bytes_out", "dtype_converted", "messages", "malformed", "space_mismatch", "not_encrypted", "replay",
            "too_old", "handshake_required", "dropped_closed", "errors_sent", "unauthenticated", "stale", "evicted",
            "exhausted", "rekeys", "rekey_limited", "feedback_ignored")}

    # -------------------------------------------------------------- local calls

    def initiate(self, now: float) -> None:
        """Client: start (or restart) the handshake; the ping waits in the send queue.

        Called again once established (e.g. on RemoteError(code="HANDSHAKE_REQUIRED"): the server
        lost this session), it starts a new one: a new client_random, so a new session key once the
        capability comes; frames still arrive under the old key until then."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("initiate", "only a client starts the handshake")
        if TRANSITIONS[self.role, self.state, Input.START][0] is not Action.INVALID:
            self._pings_sent = 0
            self._silence_at = now + self.config.reference_fallback_wait
            self._client_random = None  # a new handshake: fresh randomness (retries repeat it)
            self._last_unauthenticated = None
        self._step(Input.START, now, None, None)

    def close(self, now: float = 0.0) -> None:
        self._step(Input.CLOSE, now, None, None)
        for d in self._deliveries.values():  # (their sources are the caller's again)
            d.close("the session was closed", now)
        self._deliveries.clear()

    def _send(self, frame: Frame, now: float, keep_seq: bool) -> None:
        """send() for everything but a plain frame numbered as it goes (SessionCore.send)."""
        if self.state is _CLOSED:
            raise LocalProtocolError("send", "the session is closed")
        if not isinstance(frame, Frame):
            raise TypeError(f"send() takes a message (Think, Cache, ...), got {type(frame).__name__}")
        if self._reduce:
            frame = self._reduce_dtypes(frame)
        if self._agreement is not None and self._agreement.reference:
            self._send_reference(frame, keep_seq)
            return
        enc = self._encoder
        if keep_seq:
            self._queue(enc.encode(frame) if enc is not None else _codec.encode(frame))
            return
        sid = frame.stream_id
        if self._keyring is None:  # as the C path (SessionCore.send) numbers plain frames
            frame = frame.replace(frame_seq=self._next_seq(sid))
            self._queue(enc.encode(frame) if enc is not None else _codec.encode(frame))
            return
        # With a key (never the C path): the ids of numbered sends are closed to stream(), so a send
        # that fails (too large) gives its number back, and a V-Stream's id is closed to numbered sends.
        if sid in self._used_streams:
            raise LocalProtocolError("send", f"stream id {sid} carried a V-Stream in this session: numbered sends on it "
                                     "would start again at frame_seq 0 and be dropped as replays; use another id")
        before = self._seq.get(sid)
        frame = frame.replace(frame_seq=self._next_seq(sid))
        try:
            self._queue(enc.encode(frame) if enc is not None else _codec.encode(frame))
        except BaseException:  # nothing was sent: the number (and the stream id, for stream()) stays free
            if before is None:
                del self._seq[sid]
            else:
                self._seq[sid] = before
            raise

    def _send_reference(self, frame: Frame, keep_seq: bool) -> None:
        """send() in reference mode: a plain version-1 frame, which must fit one frame (the
        reference has no V-Stream reassembly, so nothing larger can reach it)."""
        if not frame.slices:  # (its decoder rejects both forms: "slice_len field is empty")
            raise LocalProtocolError("send", "reference mode (the peer never answered a ping: taken for a reference "
                                     f"receiver): the reference rejects a frame with no slices; this "
                                     f"{type(frame).__name__} has none, so it is not sent")
        if frame.msg_type == _CRITIQUE and len(frame.slices) == 2 and frame.explanation is not None:
            # the reference reads slices[1] of a 2-slice Critique as the mask: an empty mask goes before
            frame = make_frame(_CRITIQUE, (frame.slices[0], _EMPTY_MASK, frame.slices[1]), stream_id=frame.stream_id,
                               frame_seq=frame.frame_seq, space_hash32=frame.space_hash32, modality=frame.modality,
                               flags=frame.flags)
        if not keep_seq:
            frame = frame.replace(frame_seq=self._next_seq(frame.stream_id))
        try:
            data = _codec.encode(frame)
        except EncodeError as exc:
            if "max_frame_bytes" not in exc.detail:
                raise
            data = None
        if data is None or len(data) > self._limit:
            size = (f"is a {len(data)}-byte frame" if data is not None else
                    f"holds {sum(sl.nbytes for sl in frame.slices)} bytes of tensors")
            raise LocalProtocolError("send", f"the message {size}, over max_frame_bytes ({self._limit}); "
                                     f"{REFERENCE_ONE_FRAME}")
        self._queue(data)

    def new_stream_id(self) -> int:
        """A stream id not used yet in this session (not by send(), the handshake or stream()),
        for stream(): ids are handed out in order from 1, so the receiver's record of used ids
        stays one range."""
        sid = self._next_stream_id
        while sid == 0 or sid in self._seq or sid in self._used_streams:
            sid += 1
        if sid > 0xFFFFFFFF:
            raise LocalProtocolError("stream", "every u32 stream id was used in this session: start a new session")
        self._next_stream_id = sid + 1
        return sid

    def stream(self, stream_id: int, objects: Sequence, *, rate: float | None = None, **kwargs: Any) -> StreamSender:
        """A StreamSender configured with what was agreed (codec, frame size, space hash);
        iterate it and pass each frame to `send_encoded` (or write it yourself).

        With feedback agreed (SessionConfig.feedback on both sides), the stream also gets a Delivery
        (delivery(stream_id), resonant.delivery) that keeps it until the receiver's verdict, which comes
        out of receive_* as StreamDelivered or StreamUndelivered; over UDP, send what
        delivery(stream_id).poll(now) returns instead of iterating the sender (it resends what reports
        list as missing and paces at up to `rate` bytes/s).

        stream_id must be new in this session (new_stream_id() gives one): a V-Stream's frames
        start at frame_seq 0, and the receiver drops frames it has seen on a stream id as replays."""
        if self.state is _CLOSED:
            raise LocalProtocolError("stream", "the session is closed")
        if self.reference_mode:
            raise LocalProtocolError("stream", f"a V-Stream cannot be sent in reference mode: {REFERENCE_ONE_FRAME} "
                                     f"(at most {self._limit} bytes per frame)")
        try:
            stream_id = operator.index(stream_id)
        except TypeError:
            raise LocalProtocolError("stream", f"stream id {stream_id!r} is not an integer") from None
        if not 0 <= stream_id <= 0xFFFFFFFF:
            raise LocalProtocolError("stream", f"stream id {stream_id} is not a u32")
        # (With a key, numbered sends count too: the receiver's replay window has seen their frame_seq
        # 0, 1...; plain frames have no window, and a V-Stream beside them on one id is delivered.)
        by_send = self._keyring is not None and stream_id in self._seq
        if stream_id == 0 or by_send or stream_id in self._used_streams:
            what = ("0 carries the handshake" if stream_id == 0 else
                    "it was used by send()" if by_send else "a V-Stream was already sent on it")
            raise LocalProtocolError("stream", f"stream id {stream_id} was already used in this session ({what}); the "
                                     "receiver would drop the stream's frames as replays: take one from new_stream_id()")
        self._used_streams.add(stream_id)
        kwargs.setdefault("max_frame_bytes", self.max_frame_bytes)
        kwargs.setdefault("space_hash32", self.config.space_hash32)
        if kwargs.get("fec") is not None and (self._agreement is None or not self._agreement.fec):
            raise LocalProtocolError("stream", "the peer does not read V-Streams with forward error correction "
                                     "(its handshake did not say supports.fec: no Reed-Solomon coder there; pip install "
                                     "'resonant[fec]' on that side); send without fec=")
        if self._reduce:  # as send() does, object by object
            objects = [self._reduce_slice(o if isinstance(o, Slice) else Slice.from_array(o), "stream")
                       for o in objects]
        sender = StreamSender(stream_id, objects, codec=self._encoder, **kwargs)
        if self._fb:  # the receiver will report and judge it: kept (views of the objects) until then
            self._deliveries[stream_id] = Delivery(sender, rate=rate, feedback_timeout=self.config.feedback_timeout)
        return sender

    def kv_stream(self, stream_id: int, cache: Any, *, signature: ModelSignature | None = None,
                  dtype: str | None = None, **kwargs: Any) -> StreamSender:
        """stream() of a transformers KV cache (DynamicCache or legacy tuple): objects l{i}.keys,
        l{i}.values per layer and HEAD's kv (layers, seq_len, the tensors' torch dtype, the wire dtype,
        the model signature), which the receiver checks and turns into a DynamicCache (resonant.kv).
        dtype: None as they are, or "f32", "f16", "bf16", "q8_0", "q4_0" on the wire (see
        torch_utils.kv_objects). signature: the sender's model (ModelSignature.from_hf), checked against
        the cache's shapes here and against the receiver's model there. Needs torch."""
        from resonant import torch_utils  # (torch only when a KV cache is sent)

        objects, names, layers, kv = torch_utils.kv_objects(cache, signature=signature, dtype=dtype)
        a = self._agreement
        if a is not None and kv.wire_dtype not in a.dtypes:
            raise LocalProtocolError("kv_stream", f"the peer does not accept {kv.wire_dtype} tensors (it agreed to "
                                     f"{', '.join(a.dtypes)}): send the cache with dtype= one of them")
        kwargs.setdefault("msg_type", MsgType.CACHE)
        return self.stream(stream_id, objects, names=names, layers=layers, kv=kv, **kwargs)

    def stream_records(self, stream_id: int, objects: Sequence, *, per_write: int = 8,
                       **kwargs: Any) -> Iterator[list]:
        """TCP, zero-copy: a V-Stream as lists of buffers, each for one `socket.sendmsg` (the
        records of per_write chunks; StreamSender.records). Chunk payloads are views of the
        objects, so nothing is copied before the kernel's copy; the objects must not change until
        every list is sent. Counted in `stats` as they are handed out. (UDP, or a transport that
        may keep the buffers after a write returns: stream() and send_encoded(), which copy.)"""
        return self._records_of(self.stream(stream_id, objects, **kwargs), per_write)

    def _records_of(self, sender: StreamSender, per_write: int) -> Iterator[list]:
        """sender.records(per_write), counted in stats; refused once the session is closed."""
        stats = self.stats
        for parts, frames, nbytes in sender._record_batches(per_write):
            if self.state is _CLOSED:
                raise LocalProtocolError("send", "the session is closed")
            stats["frames_out"] += frames
            stats["bytes_out"] += nbytes
            yield parts

    def send_encoded(self, data: bytes) -> None:
        """Queue bytes that are already one encoded frame (e.g. from `stream()`)."""
        if self.state is _CLOSED:
            raise LocalProtocolError("send", "the session is closed")
        self._queue(bytes(data))

    @property
    def agreement(self) -> Agreement | None:
        """What the handshake settled on; None before it (or after it failed)."""
        return self._agreement

    @agreement.setter
    def agreement(self, agreement: Agreement | None) -> None:
        self._agreement = agreement
        self._limit = agreement.max_frame_bytes if agreement is not None else self.config.max_frame_bytes
        self._reduce = False  # whether sent tensors may need converting: set by _apply_agreement

    @property
    def max_frame_bytes(self) -> int:
        return self._limit

    @property
    def reference_mode(self) -> bool:
        """Whether this client took its peer for a reference receiver (SessionConfig.reference_fallback:
        no answer to its pings in time) and sends as the reference reads: version-1 frames, the
        reference dtypes, one frame per message (no V-Stream). It ends when a capability comes late
        (or a new handshake completes): read it when it matters, not once."""
        a = self._agreement
        return a is not None and a.reference

    # -------------------------------------------------------------- input

    def _chunk_or_frame(self, data, now: float) -> list:
        """receive_datagram, in a state that takes data as it is, for anything but a data message."""
        if self._fast:
            events = self.reassembler.receive_chunk(data, now, self._space)
            if events is not None:
                count_in(self.stats, 1, len(data))
                if events and self._fb:  # (a completed stream's verdict)
                    self._feedback_out(now, False)
                return events
        return self._frame(data, now, copy=True)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """TCP, zero-copy: a buffer for the next read (see RecordReader.get_buffer)."""
        return self.records.get_buffer(sizehint)

    def buffer_updated(self, n: int, now: float) -> list:
        """TCP, zero-copy: n bytes were read into get_buffer(); same events as receive_data.
        Runs of stream chunks are placed by one C call, data messages are copied out and take the fast
        path; every other record goes through _frame."""
        rr = self.records
        try:
            rr.add(n)
        except FramingError as exc:
            return [ConnectionBroken(exc)]
        if not self._fast:
            return self._records(now, rr.parse)
        if rr._end - rr._start > TCP_LENGTH_PREFIX_BYTES and rr.broken is None and self._chunks_direct():
            # The common case, the read holds exactly one record of a data message: copied out, decoded.
            events = message_event(self._decoder, rr._buf, rr._start, rr._end, True, self._space, self.stats,
                                   rr.max_frame_bytes)
            if events is not None:
                rr.skip(rr._end)
                rr.settle()
                return events
        events: list = []
        space = self._space
        while self._chunks_direct():
            pos, count, nbytes, ev = self.reassembler.place_records(rr._buf, rr._start, rr._end, rr.max_frame_bytes,
                                                                    space, now)
            if count:
                count_in(self.stats, count, nbytes)
                rr.skip(pos)
                events += ev
                if ev:
                    if self._fb:
                        self._feedback_out(now, False)
                    continue
            try:
                record = rr.next_record()
            except FramingError as exc:
                return events + [ConnectionBroken(exc)]
            if record is None:
                rr.settle()
                return events
            ev = message_event(self._decoder, record, 0, -1, True, space, self.stats)  # (copied out: the buffer is reused)
            events += self._frame(record, now, copy=True) if ev is None else ev
        return events + self._records(now, rr.parse)

    def _records(self, now: float, read: Callable[..., list], *args: Any) -> list:
        """The frames of the records read(*args) returns; ConnectionBroken when the record stream
        breaks (after the records before the break)."""
        try:
            views = read(*args)
        except FramingError as exc:
            return [ConnectionBroken(exc)]
        if self.records.broken is not None:  # broken by this read, after the records it returned
            return self._frames(views, now) + [ConnectionBroken(self.records.broken)]
        return self._frames(views, now)

    def _frames(self, views: list, now: float) -> list:
        events: list = []
        direct = self._fast and self._chunks_direct()
        space = self._space
        for v in views:
            if direct:  # the fast paths: a stream chunk placed in C, a data message decoded in C
                ev = self.reassembler.receive_chunk(v, now, space)
                if ev is not None:
                    count_in(self.stats, 1, len(v))
                    events += ev
                    if ev and self._fb:
                        self._feedback_out(now, False)
                    continue
                ev = message_event(self._decoder, v, 0, -1, True, space, self.stats)
                if ev is not None:
                    events += ev
                    continue
            events += self._frame(v, now, copy=True)
            direct = self._fast and self._chunks_direct()  # the state may have changed
        return events

    def _chunks_direct(self) -> bool:
        """Whether a plain stream chunk may take the Reassembler's fast path: this state accepts
        data frames as they are (no refusal, no transition) and no key requires encryption.
        Everything the fast path does not take goes through _frame."""
        state = self.state
        if state is self._direct_state:  # the answer depends only on the state (config and keyring are fixed)
            return self._direct
        action, nxt = TRANSITIONS[self.role, state, Input.DATA]
        self._direct = (nxt is state and self._keyring is None
                        and (action is Action.ACCEPT or action is Action.ACCEPT_IF_LENIENT and not self.config.is_strict))
        self._direct_state = state
        return self._direct

    def receive_eof(self, now: float) -> list:
        """The peer closed its side of a TCP connection."""
        try:
            self.records.eof()
        except FramingError as exc:
            return [ConnectionBroken(exc)]
        return []

    def tick(self, now: float) -> list:
        """Timers: ping retries and the handshake deadline, stream timeouts."""
        events: list = []
        if self.state is State.AWAIT_CAPABILITY and self.config.reference_fallback and now >= self._silence_at:
            events += self._step(Input.SILENCE, now, None, None)  # no answer: a reference receiver (reference mode)
        if self.state is State.AWAIT_CAPABILITY and now >= self._next_ping:
            inp = Input.DEADLINE if self._pings_sent >= self.config.handshake_attempts else Input.RETRY
            events += self._step(inp, now, None, None)
        events += self.reassembler.tick(now)
        if self._fb and self.state is not _CLOSED:
            self._feedback_out(now, True)
            for d in list(self._deliveries.values()):
                events += d.tick(now)
                if d.done and d._unreported is None:
                    del self._deliveries[d.stream_id]
        return events

    # -------------------------------------------------------------- classification

    def _frame(self, data, now: float, copy: bool) -> list:
        if self._keyring is None:
            events = self._frame1(data, now, copy)
            if self._fb:
                self._feedback_out(now, False)
            return events
        self._current = data  # (for the tag that an error about this frame echoes)
        try:
            events = self._frame1(data, now, copy)
        finally:
            self._current = None
        if self._committed is not None:  # this frame proved a pending re-key
            events.insert(0, self._committed)
            self._committed = None
        if self._fb:  # (what this frame queued: a report, a verdict)
            self._feedback_out(now, False)
        return events

    def _frame1(self, data, now: float, copy: bool) -> list:
        count_in(self.stats, 1, len(data))
        if self.state is _CLOSED:
            return self._step(Input.DATA, now, None, "frame")
        sealed = False  # sealed under the control keys (not a session key)
        replay = self.replay
        try:
            # Messages are handed to the caller and must outlive the receive buffer: a message
            # decoded in place from a reused buffer is decoded again from a copy.
            if copy and not _immutable(data) and (len(data) <= _MSG_TYPE_AT or data[_MSG_TYPE_AT] != _CHUNK):
                data = bytes(data)  # (a stream chunk is consumed at once, from the receive buffer: no copy;
                # a view of bytes the caller passed in is immutable and keeps them alive: no copy either)
            frame = self._decoder.decode(data, strict=self._strict_layout(data))
            sealed = self._keyring is not None and self._session_keys is None
            if self._previous is not None and not sealed:  # the peer sends under the new keys: the old are done
                self._previous = None
        except NotEncrypted as exc:
            return self._unencrypted(data, now, exc)
        except DecryptionFailed as exc:
            frame, replay = self._open_other(data)  # under a re-key's pending or previous keys
            if frame is None:
                frame = self._open_sealed(data)  # a control document under the control keys, after the handshake
                if frame is None:
                    self._undecryptable = (data[_MSG_TYPE_AT], _STREAM_ID.unpack_from(data, _STREAM_ID_AT)[0],
                                           bytes(data[_TAG]))
                    return self._step(Input.BAD_FRAME, now, None, exc)
                sealed = True
        except DecodeError as exc:
            return self._step(Input.BAD_FRAME, now, None, exc)
        want = self.config.expected_space_hash
        if want is not None and frame.space_hash32 != want and not isinstance(frame, Sync):
            exc = SpaceMismatch("space_hash32", f"the frame is of embedding space {frame.space_hash32}, this peer "
                                f"expects {want}", space_hash32_offset(frame.num_slices + frame.empty_slice_len))
            self.stats["space_mismatch"] += 1
            self._reply_error("SPACE_MISMATCH", str(exc), now, expected=str(want), got=str(frame.space_hash32))
            return [FrameRejected("space_mismatch", str(exc), exc)]
        doc = None
        if frame.version != 1 and int(frame.transforms) & _XCHACHA:
            if sealed and isinstance(frame, Sync) and frame.json is not None:
                try:
                    doc = handshake.parse(frame.json.payload)
                except HandshakeError as exc:
                    return self._step(Input.BAD_FRAME, now, frame, exc)
            if doc is not None and doc["method"] in _CONTROL_METHODS:
                # Sealed control documents are outside the data replay window (a server that lost the
                # session numbers its errors from 0 again); each is acted on once, by its tag.
                tag = bytes(data[_TAG])
                if tag in self._seen_tags:
                    self.stats["replay"] += 1
                    return [FrameRejected("replay", f"a sealed {doc['method']} seen before")]
                self._seen_tags[tag] = None
                if len(self._seen_tags) > self.config.control_tags:
                    self._seen_tags.popitem(last=False)
            elif sealed and self._session_keys is not None:
                self.stats["stale"] += 1
                return [FrameRejected("stale", f"{type(frame).__name__} frame of stream {frame.stream_id} sealed under "
                                      "the control key after the handshake: data must use the session key")]
            else:
                verdict = replay.check(frame.stream_id, frame.frame_seq)
                if verdict != "ok" and not self._repair_frame(frame, verdict):
                    return self._refuse_replay(verdict, frame, now)
        if doc is None and isinstance(frame, Sync) and frame.json is not None:
            # (a Sync whose payload is not JSON at all is no control document: a message, delivered as data)
            try:
                doc = handshake.parse_if_json(frame.json.payload)
            except HandshakeError as exc:
                return self._step(Input.BAD_FRAME, now, frame, exc)
        if doc is not None:
            method = doc["method"]
            if method == "ping":
                return self._step(Input.PING_OK if self._ping_problem(doc, frame) is None else Input.PING_BAD,
                                  now, frame, doc)
            if method == "capability":
                # A client takes only a capability that answers its current ping: with a key, one that echoes
                # its client_random (with a server_random); without, one that echoes none (it answers a
                # keyed ping, not this client's). The same check in every state (await_capability, and
                # established in reference mode, where a late capability is adopted).
                if (self.role is Role.CLIENT and (self._keyring is not None or "client_random" in doc)
                        and not self._answers_my_ping(doc)):
                    return self._stale(doc, "a capability that does not answer this client's current ping (its "
                                       "client_random is not echoed, or it has no server_random)")
                return self._step(Input.CAPABILITY_OK if self._capability_problem(doc) is None
                                  else Input.CAPABILITY_BAD, now, frame, doc)
            if method == "error":
                if self._keyring is not None and self.role is Role.CLIENT:
                    if self.state is State.AWAIT_CAPABILITY:
                        if not self._answers_my_ping(doc):
                            return self._stale(doc, f"an error that does not answer this client's current ping "
                                               f"({doc['code']}: {doc['message'][:200]})")
                    elif (self._send_keys is not None and ("tag" in doc or doc["code"] == "HANDSHAKE_REQUIRED")
                          and not self._echoes_my_frame(doc)):
                        return self._stale(doc, f"an error about a frame this client did not send under its current "
                                           f"session key ({doc['code']}: {doc['message'][:200]})")
                return self._step(Input.ERROR, now, frame, doc)
            if method == "confirm":  # key confirmation: it proved a re-key on its way in (_open_other); no more
                return []
            if method == "report" or method == "verdict":
                return self._feedback_in(doc, now)
        return self._step(Input.DATA, now, frame, doc)

    def _feedback_in(self, doc: dict, now: float) -> list:
        """A report or verdict about a stream this side sends: to its Delivery (never delivered as a
        message). Ignored (counted) when feedback was not agreed, or the stream is unknown or done."""
        d = self._deliveries.get(doc["stream_id"]) if self._fb and self.state is State.ESTABLISHED else None
        if d is None:
            self.stats["feedback_ignored"] += 1
            return []
        events = d.on_report(doc, now) if doc["method"] == "report" else d.on_verdict(doc, now)
        if d.done:
            del self._deliveries[d.stream_id]
        return events

    def _feedback_out(self, now: float, periodic: bool) -> None:
        """Queue the receiver's due verdicts and reports (periodic: the timer's reports too; else only
        those due at once) on stream 0, under the session's encoding."""
        r = self.reassembler
        if r._verdicts:
            for doc in r.take_verdicts():
                self._send_doc(doc)
        if periodic or r._report_now:
            for doc in r.reports(now, REPORT_INTERVAL, self.config.feedback_timeout / handshake.FEEDBACK_PROBES):
                self._send_doc(doc)

    def _send_doc(self, doc: dict) -> None:
        frame = Sync(json.dumps(doc, separators=(",", ":")).encode(), stream_id=0, frame_seq=self._next_seq(0),
                     space_hash32=self.config.space_hash32)
        enc = self._encoder
        self._queue(enc.encode(frame) if enc is not None else _codec.encode(frame))

    def verdict(self, stream_id: int, ok: bool, reason: str = "", detail: str = "") -> bool:
        """Receiver with SessionConfig(hold_verdicts=True): the application's verdict on a stream that
        completed verified (after it kept the data: ok=True; or not, e.g. reason="save_failed",
        detail="No space left on device"); queued for the sender. False when no verdict is held for
        stream_id (never completed, already judged, or feedback not agreed)."""
        doc = self.reassembler.verdict(stream_id, ok, reason, detail)
        if doc is None:
            return False
        if self.state is not _CLOSED:
            self._send_doc(doc)
        return True

    @property
    def feedback_busy(self) -> bool:
        """Whether V-Stream feedback is under way (streams received or sent, verdicts held): tick()
        is then due every report interval (report_interval_ms)."""
        r = self.reassembler
        return self._fb and bool(r._streams or self._deliveries or r._held or r._verdicts)

    def delivery(self, stream_id: int) -> Delivery | None:
        """The Delivery of a stream this side sends with feedback, until its verdict (see resonant.delivery)."""
        return self._deliveries.get(stream_id)

    def _repair_frame(self, frame: Frame, verdict: str) -> bool:
        """Whether an authenticated frame the replay window refuses is a V-Stream's own repair
        traffic, taken all the same: a chunk of a stream that is open (resent after the window moved
        past it, or a duplicate: the Reassembler places each chunk once, and a chunk has no effect
        outside its stream), or the HEAD of a stream never opened whose frames are held waiting for
        it (resent after more than the window's worth of chunks arrived). Replays of anything else,
        and of finished streams (also once they are forgotten as closed), are refused as before."""
        r = self.reassembler
        sid = frame.stream_id
        if isinstance(frame, Chunk):
            return sid in r._streams
        return (verdict == "too_old" and isinstance(frame, Sync) and frame.frame_seq == 0 and sid in r._early
                and sid not in r._streams and sid not in r._closed
                and not r.opened_overflow and sid not in r.opened)  # (never a stream opened before: a replay)

    def _strict_layout(self, data) -> bool:
        """Whether a frame must fit its type's layouts to be taken: with strict_layout, and always
        for a V-Stream chunk (its one slice is the stream's data)."""
        return self.config.strict_layout or (len(data) > _MSG_TYPE_AT and data[_MSG_TYPE_AT] == _CHUNK)

    def _unencrypted(self, data, now: float, exc: NotEncrypted) -> list:
        """A frame in the clear to a session that holds a key: refused; a plain ping is answered
        (plainly) with the refusal, a plain error changes nothing (it is unauthenticated: anyone can
        send one) but is counted and its text kept for the TIMEOUT message."""
        self.stats["not_encrypted"] += 1
        rejected = [FrameRejected("not_encrypted", str(exc), exc)]
        plain = _plain_control(data)
        if plain is not None:  # a plain handshake document: answer it (plainly) or note the error
            frame, doc = plain
            if doc["method"] == "ping" and self.role is Role.SERVER:
                # Anyone can send a ping in the clear: it is answered (in the clear, rate-limited) and
                # changes nothing, whatever the state.
                code, message, extra = self._ping_problem(doc, frame)  # (with a key: never None in the clear)
                self._reply_error(code, message, now, plain=True, **extra)
                return rejected
            if doc["method"] == "error":
                self.stats["unauthenticated"] += 1
                text = f"{doc['code']}: {doc['message']}"
                if self.state is State.AWAIT_CAPABILITY:
                    self._last_unauthenticated = text
                return [FrameRejected("unauthenticated", f"an error in the clear ({text[:200]}) changes nothing "
                                      "for a peer that holds a key", exc)]
        self._reply_error("UNSUPPORTED_FEATURE", "this peer accepts encrypted frames only", now, plain=True)
        return rejected

    def _open_other(self, data) -> tuple[Frame | None, ReplayWindow | None]:
        """A frame that did not open under the session keys, opened under a re-key's other keys: a
        server's pending ones (which commits the re-key: the frame proves the client holds them), or
        a client's previous ones (frames the server sent before it switched); (None, None) otherwise."""
        if self._pending is not None:
            try:
                frame = self._pending[2].decode(data, strict=self._strict_layout(data))
            except DecodeError:
                pass
            else:
                self._commit_pending()
                return frame, self.replay
        if self._previous is not None:
            try:
                frame = self._previous[0].decode(data, strict=self._strict_layout(data))
            except DecodeError:
                pass
            else:
                return frame, self._previous[1]
        return None, None

    def _commit_pending(self) -> None:
        (self._client_random, self._server_random), agreement, _ = self._pending
        self._pending = None
        self.agreement = agreement
        self._apply_agreement()
        self._committed = HandshakeComplete(agreement)

    def _echoes_my_frame(self, doc: dict) -> bool:
        """Whether an error's tag is one of the frames this client sent under its current session key.
        Each is acted on once: that tag is forgotten, and after a HANDSHAKE_REQUIRED all of them (the
        session is over; a new one brings new tags)."""
        tags = self._encoder.sent_tags if self._encoder is not None else None
        tag = doc.get("tag")
        raw = bytes.fromhex(tag) if tag is not None else None
        if tags is None or raw is None or raw not in tags:
            return False
        if doc["code"] == "HANDSHAKE_REQUIRED":
            tags.clear()
        else:
            tags.remove(raw)
        return True

    def _current_tag(self) -> dict:
        """{"tag": hex} of the encrypted frame being handled, for an error about it; {} otherwise."""
        data = self._current
        if (data is None or len(data) < PREFIX_BYTES or data[_VERSION_AT] != VERSION_TRANSFORMED
                or not _FLAGS.unpack_from(data, _FLAGS_AT)[0] & _XCHACHA):
            return {}
        return {"tag": bytes(data[_TAG]).hex()}

    def _open_sealed(self, data) -> Frame | None:
        """After the handshake: a Sync that did not open under the session key, opened under the
        control key of the peer's direction (a control document: ping, capability, error), or None."""
        if self._session_keys is None or len(data) <= _MSG_TYPE_AT or data[_MSG_TYPE_AT] != _SYNC:
            return None
        try:
            return self._lt_decoder.decode(data, strict=self._strict_layout(data))
        except DecodeError:
            return None

    def _answers_my_ping(self, doc: dict) -> bool:
        """Whether a capability or error echoes this client's current client_random (and a
        capability brings a well-formed server_random)."""
        if self._client_random is None or _random_of(doc, "client_random") != self._client_random:
            return False
        return doc["method"] != "capability" or _random_of(doc, "server_random") is not None

    def _stale(self, doc: dict, detail: str) -> list:
        self.stats["stale"] += 1
        if self.state is State.AWAIT_CAPABILITY:
            self._last_unauthenticated = detail
        return [FrameRejected("stale", detail)]

    def _refuse_replay(self, verdict: str, frame: Frame, now: float) -> list:
        self.stats[verdict] += 1
        sid = frame.stream_id
        if verdict == "exhausted":
            # No replay state left for a new stream: only a new session key makes room. A server asks
            # the client to start one; a client starts one itself.
            detail = (f"stream {sid}: the replay state of this session is full ({self.replay.max_ranges} ranges of "
                      "dropped stream ids): a new session is needed")
            if self.role is Role.SERVER:
                self._reply_error("HANDSHAKE_REQUIRED", detail + "; send a ping", now, stream_id=sid, **self._current_tag())
                return [FrameRejected(verdict, detail)]
            events = [FrameRejected(verdict, detail)]
            if TRANSITIONS[self.role, self.state, Input.START][0] is not Action.INVALID \
                    and self.state is not State.AWAIT_CAPABILITY:
                self.initiate(now)
            return events
        if verdict == "evicted":
            detail = (f"stream {sid}: its replay window was dropped (more than {self.replay.max_streams} streams "
                      "since), so its frames are refused; open a new stream")
            self._reply_error("BAD_REQUEST", detail, now, stream_id=sid, **self._current_tag())
            return [FrameRejected(verdict, detail)]
        detail = (f"stream {sid} frame_seq {frame.frame_seq}: "
                  f"{'seen before' if verdict == 'replay' else 'older than the replay window'}")
        if verdict == "replay" and isinstance(frame, Sync) and frame.frame_seq == 0 and sid != 0:
            # A V-Stream HEAD again on a stream id already used: tell the sender, which otherwise sees nothing.
            self._reply_error("BAD_REQUEST", f"stream {sid}: frame_seq 0 was already received on this stream id in "
                              "this session, so this frame is dropped as a replay; open every V-Stream on a new "
                              "stream id", now, stream_id=sid, **self._current_tag())
        return [FrameRejected(verdict, detail)]

    # -------------------------------------------------------------- the machine

    def _step(self, inp: Input, now: float, frame: Frame | None, arg: Any) -> list:
        action, nxt = TRANSITIONS[self.role, self.state, inp]
        if action is Action.INVALID:
            raise LocalProtocolError(inp.value, f"not allowed for a {self.role.value} in state {self.state.value}")
        events = getattr(self, ACTION_METHOD[action])(now, frame, arg)
        self.state = nxt
        return events

    def _do_send_ping(self, now, frame, arg) -> list:
        c = self.config
        doc: dict[str, Any] = {"method": "ping", "v": max(c.versions), "space_hash32": c.space_hash32,
                               "compress": list(c.compress), "crypto": list(c.crypto),
                               "max_frame_bytes": c.max_frame_bytes,
                               "supports": {"critique": c.critique, "dtype": list(c.dtypes), "feedback": c.feedback,
                                            "fec": _fec.available()}}
        if c.model_signature is not None:
            doc["model_signature"] = c.model_signature.to_json()
        if self._keyring is not None:  # the client's half of the session key (kept by the retries)
            if self._client_random is None:
                self._client_random = os.urandom(_RANDOM_BYTES)
            doc["client_random"] = self._client_random.hex()
        self._control(doc, 0)
        self._pings_sent += 1
        self._next_ping = now + c.handshake_retry
        return []

    def _do_answer_capability(self, now, frame, doc) -> list:
        c = self.config
        offer = self._offer(doc)
        reply: dict[str, Any] = {"method": "capability", "v": max(c.versions), "agreed_proto": offer.proto,
                                 "space_hash32": c.space_hash32, "compress": offer.compress_list,
                                 "crypto": offer.crypto_list, "max_frame_bytes": offer.max_frame_bytes,
                                 "supports": {"critique": c.critique and offer.critique, "dtype": list(offer.dtypes),
                                              "feedback": offer.feedback, "fec": _fec.available()}}
        if c.d_model is not None:
            reply["d_model"] = c.d_model
        if c.embedding_space_id is not None:
            reply["embedding_space_id"] = c.embedding_space_id
        if c.model_signature is not None:
            reply["model_signature"] = c.model_signature.to_json()
        # The server sends with the best of what both support, as the client will.
        agreement = Agreement(offer.proto, offer.compress_list[0], offer.crypto_list[0], offer.dtypes,
                              offer.max_frame_bytes, offer.critique, doc.get("space_hash32"), _signature(doc),
                              feedback=offer.feedback, fec=bool(handshake.get(doc, "supports.fec")))
        if self._keyring is not None:
            # The server's half of the session key: the same for every retry of one ping (the client
            # adopts whichever answer arrives first), fresh for a new client_random.
            client_random = _random_of(doc, "client_random")
            reply["client_random"] = doc["client_random"]
            if self._session_keys is not None and client_random != self._client_random:
                # A new session offered while one is running: the ping may be a recording, so the running
                # session stays until a frame authenticates under the new keys (_open_other commits it).
                if self._pending is not None and self._pending[0][0] == client_random:
                    server_random = self._pending[0][1]  # a retry of the pending ping: the same answer
                else:
                    if now - self._last_rekey_answer < c.rekey_interval:
                        self.stats["rekey_limited"] += 1
                        return [FrameRejected("rate_limited", "a ping offering a new session within rekey_interval "
                                              f"({c.rekey_interval} s) of the last one: not answered")]
                    self._last_rekey_answer = now
                    server_random = os.urandom(_RANDOM_BYTES)
                    keys = SessionKeyring(self._keyring, client_random, server_random, self._directions[1])
                    self._pending = ((client_random, server_random), agreement,
                                     Codec(key=keys, require_encryption=True))
                reply["server_random"] = server_random.hex()
                self._control(reply, frame.stream_id)
                return [MessageReceived(frame, doc)]
            if client_random != self._client_random or self._server_random is None:
                self._client_random, self._server_random = client_random, os.urandom(_RANDOM_BYTES)
            reply["server_random"] = self._server_random.hex()
        self._control(reply, frame.stream_id)
        self.agreement = agreement
        self._apply_agreement()
        return [MessageReceived(frame, doc), HandshakeComplete(self.agreement)]

    def _do_answer_error(self, now, frame, doc) -> list:
        code, message, extra = self._ping_problem(doc, frame)
        if isinstance(doc.get("client_random"), str):  # so that the client knows the refusal is for its ping
            extra = {**extra, "client_random": doc["client_random"]}
        # A peer that pinged in the clear cannot read an encrypted answer: refuse it in the clear.
        cut = handshake.MAX_STRING_CHARS  # (the message names lists the peer chose: it may be long)
        self._control({"method": "error", "code": code, "message": message[:cut],
                       **{k: v[:cut] if isinstance(v, str) else v for k, v in extra.items()}}, frame.stream_id,
                      plain=not frame.transforms & Flags.XCHACHA)
        self.stats["errors_sent"] += 1
        self.agreement = None
        # (a refused ping is rejected input: never reported as a MessageReceived)
        return [FrameRejected("ping_refused", f"{code}: {message}"), HandshakeFailed(code, message)]

    def _do_refuse_ping(self, now, frame, doc) -> list:
        code, message, extra = self._ping_problem(doc, frame)
        if isinstance(doc.get("client_random"), str):
            extra = {**extra, "client_random": doc["client_random"]}
        self._reply_error(code, message, now, plain=not frame.transforms & Flags.XCHACHA, **extra)
        return [FrameRejected("ping_refused", f"{code}: {message}")]

    def _do_adopt(self, now, frame, doc) -> list:
        c = self.config
        # (_capability_problem made sure that both lists share an option)
        compress = next(x for x in c.compress if x in handshake.get(doc, "compress"))
        crypto = next(x for x in c.crypto if x in handshake.get(doc, "crypto"))
        if self._keyring is not None:
            self._server_random = _random_of(doc, "server_random")
        dtypes = self._common_dtypes(doc, doc["agreed_proto"])
        self.agreement = Agreement(doc["agreed_proto"], compress, crypto, dtypes,
                                   min(c.max_frame_bytes, handshake.get(doc, "max_frame_bytes")),
                                   c.critique and handshake.get(doc, "supports.critique"),
                                   doc.get("space_hash32"), _signature(doc),
                                   feedback=c.feedback and bool(handshake.get(doc, "supports.feedback")),
                                   fec=bool(handshake.get(doc, "supports.fec")))
        self._apply_agreement()
        if self._previous is not None:
            # A running session was replaced: confirm the new keys, so that the server (which keeps the
            # running session until a frame authenticates under the new ones) switches now.
            self._queue(self._encoder.encode(Sync(_CONFIRM, stream_id=0, frame_seq=self._next_seq(0),
                                                  space_hash32=self.config.space_hash32)))
        return [MessageReceived(frame, doc), HandshakeComplete(self.agreement)]

    def _do_adopt_if_reference(self, now, frame, doc) -> list:
        """Established: a capability that answers this client's ping (classified as in
        await_capability) ends reference mode, late (the peer is no reference receiver after all);
        with an agreement the peer sent, it changes nothing."""
        if self.agreement is not None and self.agreement.reference:
            return self._do_adopt(now, frame, doc)
        return self._do_ignore(now, frame, doc)

    def _do_fail(self, now, frame, doc) -> list:
        if doc is None:
            code, message = "TIMEOUT", f"no capability after {self._pings_sent} pings"
            if self._last_unauthenticated is not None:
                message += f"; the last unauthenticated or stale reply: {self._last_unauthenticated}"
            elif self._keyring is not None or self.config.is_strict:
                message += ("; if the peer is a reference receiver (it never answers a ping): a session with a key "
                            "or a strict one never falls back to reference mode")
        elif doc["method"] == "error":
            code, message = doc["code"], doc["message"]
        else:
            code, message = "UNSUPPORTED_FEATURE", self._capability_problem(doc)
        self.agreement = None
        events: list = [] if frame is None else [MessageReceived(frame, doc)]
        return events + [HandshakeFailed(code, message)]

    def _do_assume_reference(self, now, frame, arg) -> list:
        """No answer in time (reference_fallback): the peer is taken for a reference receiver."""
        c = self.config
        self.agreement = Agreement(VERSION, "none", "none", tuple(d for d in c.dtypes if d in REFERENCE_DTYPES),
                                   c.max_frame_bytes, c.critique, reference=True)
        self._apply_agreement()
        return [HandshakeComplete(self.agreement)]

    def _do_accept(self, now, frame, doc) -> list:
        if isinstance(frame, Chunk) or (isinstance(frame, Sync) and (
                frame.json is None and frame.stream_id in self.reassembler
                or doc is not None and doc["method"] in ("head", "tail"))):
            return self.reassembler.receive(frame, now, doc)
        return accept_message(frame, doc, self.stats)

    def _do_accept_if_lenient(self, now, frame, doc) -> list:
        if not self.config.is_strict or self._session_keys is not None:  # (or it opened under a session key)
            return self._do_accept(now, frame, doc)
        self.stats["handshake_required"] += 1
        self._reply_error("HANDSHAKE_REQUIRED", "send a ping first: this peer requires the handshake", now,
                          **(self._current_tag() if self._keyring is not None else {}))
        return [FrameRejected("handshake_required", f"{type(frame).__name__} frame of stream {frame.stream_id} "
                              "before the handshake")]

    def _do_report_remote_error(self, now, frame, doc) -> list:
        return [MessageReceived(frame, doc), RemoteError(doc["code"], doc["message"], doc)]

    def _do_report_bad_frame(self, now, frame, exc) -> list:
        self.stats["malformed"] += 1
        hint, self._undecryptable = self._undecryptable, None
        if (isinstance(exc, DecryptionFailed) and hint is not None and self.role is Role.SERVER
                and self._keyring is not None and not (hint[0] == _SYNC and hint[1] == 0)):
            # A frame under a key id we hold that does not open: sealed under a session key this server
            # does not hold (it lost the session, or it was renewed), or forged. Ask for a new session,
            # sealed under the control key (server-to-client) so that the client can trust it, and echoing the
            # frame's tag so that it can tell it is about a frame it sent under its current session key.
            self._reply_error("HANDSHAKE_REQUIRED", f"a frame of stream {hint[1]} does not authenticate under this "
                              "server's session: start a new session (send a ping)", now, stream_id=hint[1],
                              tag=hint[2].hex())
            return [FrameRejected("malformed", str(exc), exc)]
        # A frame we could not decrypt means the peer cannot read what we encrypt: answer in the clear.
        self._reply_error("BAD_REQUEST", str(exc)[:200], now, plain=isinstance(exc, (UnknownKey, DecryptionFailed)))
        return [FrameRejected("malformed", str(exc), exc)]

    def _do_ignore(self, now, frame, arg) -> list:
        return [] if frame is None else [MessageReceived(frame, arg)]

    def _do_drop(self, now, frame, arg) -> list:
        if arg != "frame":
            return []  # a local call on a closed session (close() again, a timer)
        self.stats["dropped_closed"] += 1
        return [FrameRejected("closed", "a frame arrived after close()")]

    def _do_shutdown(self, now, frame, arg) -> list:
        self._out.clear()
        return []

    # -------------------------------------------------------------- negotiation

    @dataclass(frozen=True)
    class _Offer:
        proto: int
        compress_list: list
        crypto_list: list
        dtypes: tuple
        max_frame_bytes: int
        critique: bool
        feedback: bool

    def _offer(self, ping: dict) -> "Session._Offer":
        c = self.config
        proto = min(handshake.get(ping, "v"), max(c.versions))
        theirs_compress = handshake.get(ping, "compress")
        theirs_crypto = handshake.get(ping, "crypto")
        compress = [x for x in c.compress if x in theirs_compress] if proto >= 2 else ["none"]
        crypto = [x for x in c.crypto if x in theirs_crypto] if proto >= 2 else ["none"]
        if not compress:  # no common compression: plain frames always work
            compress = ["none"]
        return Session._Offer(proto, compress, crypto, self._common_dtypes(ping, proto),
                              min(c.max_frame_bytes, handshake.get(ping, "max_frame_bytes")),
                              bool(handshake.get(ping, "supports.critique")),
                              c.feedback and bool(handshake.get(ping, "supports.feedback")))

    def _common_dtypes(self, doc: dict, proto: int) -> tuple[str, ...]:
        """This side's dtypes that the peer's ping / capability lists (all of them when it lists none),
        at protocol version 1 only those the reference reads."""
        theirs = handshake.get(doc, "supports.dtype")
        return tuple(d for d in self.config.dtypes
                     if (theirs is None or d in theirs) and (proto >= 2 or d in REFERENCE_DTYPES))

    def _ping_problem(self, ping: dict, frame: Frame) -> tuple[str, str, dict] | None:
        c = self.config
        if self.role is not Role.SERVER:
            return None
        if self._keyring is not None and not frame.transforms & Flags.XCHACHA:
            return ("UNSUPPORTED_FEATURE", "this peer requires encryption (xchacha20poly1305 with a shared key); "
                    "the ping came in the clear", {})
        if self._keyring is not None and _random_of(ping, "client_random") is None:
            what = "has no client_random" if "client_random" not in ping else "has a malformed client_random"
            return ("UNSUPPORTED_FEATURE", f"this peer requires session keys: the ping {what} ({_RANDOM_BYTES} random "
                    f"bytes as {2 * _RANDOM_BYTES} lowercase hexadecimal digits)", {})
        v = handshake.get(ping, "v")
        if min(v, max(c.versions)) not in c.versions:
            return ("UNSUPPORTED_VERSION", f"protocol version {v} is not supported (this peer speaks "
                    f"{', '.join(map(str, c.versions))})", {"expected": str(max(c.versions)), "got": str(v)})
        if c.expected_space_hash is not None and ping.get("space_hash32") != c.expected_space_hash:
            got = ping.get("space_hash32")
            message = (f"Embedding space mismatch: this peer expects space_hash32 0x{c.expected_space_hash:08x}, the "
                       + ("ping announces none" if not isinstance(got, int) else f"ping announces 0x{got:08x}"))
            theirs = _signature(ping)
            if theirs is not None and c.model_signature is not None:
                message += ": " + c.model_signature.explain(theirs)
            return ("SPACE_MISMATCH", message, {"expected": str(c.expected_space_hash),
                                                "got": str(ping.get("space_hash32"))})
        offer = self._offer(ping)
        if not offer.crypto_list:
            return ("UNSUPPORTED_FEATURE", f"encryption: this peer requires {', '.join(c.crypto)}, the client offers "
                    f"{', '.join(handshake.get(ping, 'crypto'))}" + ("" if offer.proto >= 2 else
                                                                     " (protocol version 1 has no encryption)"), {})
        if offer.max_frame_bytes < MIN_STREAM_FRAME:
            return ("BAD_REQUEST", f"max_frame_bytes {offer.max_frame_bytes} is below {MIN_STREAM_FRAME}", {})
        if not offer.dtypes:
            theirs = handshake.get(ping, "supports.dtype")
            if theirs is None:
                theirs = list(REFERENCE_DTYPES if offer.proto < 2 else c.dtypes)
            return ("UNSUPPORTED_FEATURE", f"supports.dtype: the client reads {theirs} (protocol {offer.proto}), this "
                    f"peer sends {list(c.dtypes)}: no common option", {})
        return None

    def _capability_problem(self, doc: dict) -> str | None:
        c = self.config
        if doc["agreed_proto"] not in c.versions:
            return f"the server agreed protocol version {doc['agreed_proto']}, this client speaks {list(c.versions)}"
        if not any(x in handshake.get(doc, "crypto") for x in c.crypto):
            return (f"encryption: the server offers {handshake.get(doc, 'crypto')}, this client requires "
                    f"{list(c.crypto)}")
        if not any(x in handshake.get(doc, "compress") for x in c.compress):
            return (f"compress: the server offers {handshake.get(doc, 'compress')}, this client reads "
                    f"{list(c.compress)}: no common option")
        if not self._common_dtypes(doc, doc["agreed_proto"]):
            theirs = handshake.get(doc, "supports.dtype")
            return (f"supports.dtype: the server reads {theirs if theirs is not None else list(c.dtypes)}, this client "
                    f"sends {list(c.dtypes)}: no common option")
        if handshake.get(doc, "max_frame_bytes") < MIN_STREAM_FRAME:
            return f"max_frame_bytes {doc['max_frame_bytes']} is below {MIN_STREAM_FRAME}"
        if (self.config.expected_space_hash is not None and "space_hash32" in doc
                and doc["space_hash32"] != self.config.expected_space_hash):
            return f"the server's space_hash32 is {doc['space_hash32']}, this client expects {self.config.expected_space_hash}"
        return None

    def _apply_agreement(self) -> None:
        a = self.agreement
        self._fb = a.feedback and not a.reference
        r = self.reassembler
        r.feedback, r.hold_verdicts, r.max_frame_bytes = self._fb, self._fb and self.config.hold_verdicts, a.max_frame_bytes
        r.report_interval = REPORT_INTERVAL
        self._agreed_codes = frozenset(int(DTYPE_OF_WIRE_NAME[d]) for d in a.dtypes)
        # every dtype agreed: nothing to reduce, no check (reference mode: always the Python path, _send_reference)
        self._reduce = len(self._agreed_codes) < len(DTYPE_WIRE_NAMES) or a.reference
        level = self.config.zstd_level if a.compress == "zstd" else None
        key = None
        tags = None
        if a.crypto == "xchacha20poly1305":
            randoms = (self._client_random, self._server_random)
            if self._session_keys is None or self._session_keys._randoms != randoms:
                # New session keys (one per direction): frames under any earlier ones no longer open
                # (but a client still reads the server's under the previous ones until the server
                # switches), so the replay state starts afresh (its bound on dropped streams included).
                mine, theirs = self._directions
                self._pending = None
                self._previous = None
                if self._session_keys is not None and self.role is Role.CLIENT:
                    self._previous = (Codec(key=self._session_keys, require_encryption=True), self.replay)
                self._session_keys = SessionKeyring(self._keyring, *randoms, theirs)
                self._send_keys = SessionKeyring(self._keyring, *randoms, mine)
                self._decoder.keyring = self._session_keys  # (shared with the Reassembler)
                self.replay = ReplayWindow(self.config.replay_window, self.config.replay_streams,
                                           self.config.replay_ranges)
                self.stats["rekeys"] += 1
            elif self._encoder is not None and self._encoder.keyring is self._send_keys:
                tags = self._encoder.sent_tags  # the same keys: the frames sent under them stay known
            key = self._send_keys
        self._encoder = Codec(level, key=key, record_tags=_SENT_TAGS if key is not None and self.role is Role.CLIENT
                              else 0) if (level is not None or key is not None) else None
        if tags is not None and self._encoder is not None and self._encoder.sent_tags is not None:
            self._encoder.sent_tags.extend(tags)

    # -------------------------------------------------------------- helpers

    def _reduce_dtypes(self, frame: Frame) -> Frame:
        """Float tensors in a dtype the peer did not agree to are converted to one it did
        (lossless first: bf16 -> f32 before f16), and counted; other dtypes cannot be."""
        if all([sl.dtype in self._agreed_codes for sl in frame.slices]):  # (called only when _reduce)
            return frame
        out = [self._reduce_slice(sl, "send") for sl in frame.slices]
        return make_frame(frame.msg_type, out, stream_id=frame.stream_id, frame_seq=frame.frame_seq,
                          space_hash32=frame.space_hash32, modality=frame.modality, flags=frame.flags)

    def _reduce_slice(self, sl: Slice, what: str) -> Slice:
        a = self.agreement
        name = _DTYPE_CODE_NAMES.get(int(sl.dtype), f"0x{int(sl.dtype):02x}")
        if name in a.dtypes:
            return sl
        target = next((t for t in DTYPE_FALLBACK.get(name, ()) if t in a.dtypes), None)
        if target is None:
            if a.reference:
                raise LocalProtocolError(what, f"reference mode (the peer never answered a ping: taken for a "
                                         f"reference receiver): it reads only {', '.join(a.dtypes)} tensors, and "
                                         f"{name} has no conversion to them; convert the tensor first")
            raise LocalProtocolError(what, f"the peer does not accept {name} tensors (it agreed to "
                                     f"{', '.join(a.dtypes)})")
        if DTYPE_SIZE_RULES[sl.dtype] == "block":  # quantized (the spec's fallbacks are checked convertible)
            from resonant.quant import dequantize
            arr = dequantize(sl)
        else:
            arr = sl.numpy()
        self.stats["dtype_converted"] += 1
        code = DTYPE_OF_WIRE_NAME[target]
        return Slice.from_array(arr.astype(_codec.numpy_dtype(code)), dtype=code)

    def _next_seq(self, stream_id: int) -> int:
        return next_frame_seq(self._seq, stream_id)

    def _queue(self, data: bytes) -> None:
        queue_frame(data, self._out, self.stats, self._limit)

    def _control(self, doc: dict, stream_id: int, plain: bool = False) -> None:
        """Queue a control document: `doc` names its method and the fields this side sets; the
        document is built from the schema (handshake.build: schema order, this side's extra_fields
        in its own ping / capability, every other field that has a default)."""
        method = doc["method"]
        extra = self.config.extra_fields if method == _SESSION_FIELDS[self.role][0] else None
        doc = handshake.build(method, check=False, **{**(extra or {}), **{k: v for k, v in doc.items() if k != "method"}})
        payload = json.dumps(doc, separators=(",", ":")).encode()
        frame = Sync(payload, stream_id=stream_id, frame_seq=self._next_seq(stream_id), space_hash32=self.config.space_hash32)
        # Control frames travel as plain version-1 frames unless this side insists on encryption; then
        # they are sealed under this side's control key (derived from the long-term key for this direction;
        # never a session key: they set one up, or end one).
        data = self._sealer.encode(frame) if self._sealer is not None and not plain else _codec.encode(frame)
        self._out.append(data)
        self.stats["frames_out"] += 1
        self.stats["bytes_out"] += len(data)

    def _reply_error(self, code: str, message: str, now: float, plain: bool = False, **extra: str | int) -> None:
        if now - self._last_error_reply < self.config.error_interval:
            return  # never amplify a flood of bad frames into a flood of replies
        self._last_error_reply = now
        cut = handshake.MAX_STRING_CHARS
        self._control({"method": "error", "code": code, "message": message[:cut],
                       **{k: v[:cut] if isinstance(v, str) else v for k, v in extra.items()}}, 0, plain)
        self.stats["errors_sent"] += 1


def _plain_control(data) -> tuple[Sync, dict] | None:
    """A plain (version 1) Sync frame's handshake document, or None."""
    try:
        frame = _codec.decode(bytes(data))
        if isinstance(frame, Sync) and frame.json is not None:
            doc = handshake.parse(frame.json.payload)
            if doc["method"] in ("ping", "error"):
                return frame, doc
    except DecodeError:
        pass
    return None


def _random_of(doc: dict, name: str) -> bytes | None:
    """A handshake random (client_random, server_random): session_random_bytes bytes from exactly
    twice as many lowercase hex digits, or None when absent or malformed."""
    text = doc.get(name)
    if not isinstance(text, str) or not _RANDOM_HEX(text):  # exactly [0-9a-f]{64}: fromhex alone skips whitespace
        return None
    return bytes.fromhex(text)


def _signature(doc: dict) -> ModelSignature | None:
    try:
        return ModelSignature.from_json(doc["model_signature"]) if "model_signature" in doc else None
    except (HandshakeError, ValueError, TypeError, KeyError):
        return None
