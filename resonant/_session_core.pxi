# Hand-written, included by resonant/_codec.pyx: the Session's per-message paths in C
# (MessageReceived, the data-message fast paths, the send queue, _SessionCore).

# --------------------------------------------------------------------------- Session fast paths


@cython.final
@cython.freelist(16)
cdef class MessageReceived:
    """A frame that is not part of a V-Stream: Think, Cache, Ask, Critique, or a Sync
    (control documents such as ping, capability and error come with `document` parsed).

    An event of resonant.session (built here, in C, by the Session's fast path); immutable,
    compared by value like the other events."""


    __match_args__ = ("frame", "document")

    def __init__(self, frame, document=None):
        self.frame = frame
        self.document = document

    def __eq__(self, other):
        if type(other) is not MessageReceived:
            return NotImplemented
        cdef MessageReceived o = <MessageReceived>other
        return (self.frame, self.document) == (o.frame, o.document)

    def __hash__(self):
        return hash((self.frame, self.document))

    def __repr__(self):
        return f"MessageReceived(frame={self.frame!r}, document={self.document!r})"


cdef inline int _count(dict stats, str key, Py_ssize_t n) except -1:
    stats[key] = stats[key] + n
    return 0


def _message_event(codec, data, Py_ssize_t off, expected_space_hash, dict stats):
    """The Session's fast path for a data message: see _message_event_c."""
    return _message_event_c(codec, data, off, expected_space_hash, stats)


cdef inline bint _one_record(const unsigned char *p, Py_ssize_t n, Py_ssize_t max_frame_bytes) noexcept:
    """Whether the n bytes at p are exactly one TCP record (u32 little-endian length, then a frame
    of at most max_frame_bytes) long enough to show its message type."""
    cdef uint32_t length
    if n <= TCP_PREFIX_BYTES + OFF_MSG_TYPE:
        return False
    length = rz_ld_u32(p)
    return <Py_ssize_t>length == n - TCP_PREFIX_BYTES and <Py_ssize_t>length <= max_frame_bytes


def _buffered_record_event(codec, buf, Py_ssize_t start, Py_ssize_t end, Py_ssize_t max_frame_bytes,
                           expected_space_hash, dict stats):
    """_message_event for buf[start:end] of a buffer that will be reused (a bytearray read into in
    place): when it holds exactly one record of a data message, the frame is copied out and
    decoded; None otherwise (nothing copied)."""
    cdef const unsigned char[::1] v = buf
    cdef uint8_t msg_type
    if start < 0 or end > v.shape[0] or start >= end or not _one_record(&v[start], end - start, max_frame_bytes):
        return None
    msg_type = v[start + TCP_PREFIX_BYTES + OFF_MSG_TYPE]
    if msg_type == MSG_CHUNK or msg_type == MSG_SYNC:
        return None
    data = PyBytes_FromStringAndSize(<const char *>&v[start + TCP_PREFIX_BYTES], end - start - TCP_PREFIX_BYTES)
    return _message_event_c(codec, data, 0, expected_space_hash, stats)


cdef object _record_event_c(codec, data, Py_ssize_t max_frame_bytes, expected_space_hash, dict stats):
    """_message_event for bytes that hold exactly one TCP record; None for anything else."""
    if type(data) is not bytes or not _one_record(<const unsigned char *>PyBytes_AS_STRING(data),
                                                  PyBytes_GET_SIZE(data), max_frame_bytes):
        return None
    return _message_event_c(codec, data, TCP_PREFIX_BYTES, expected_space_hash, stats)


cdef object _message_event_c(codec, data, Py_ssize_t off, expected_space_hash, dict stats):
    """The Session's fast path for a data message (not a stream chunk, not a control frame): the
    frame data[off:], where data is immutable bytes (or a byte view of bytes), decoded by `codec`
    (a resonant.Codec that requires no encryption), counted in stats (frames_in, bytes_in,
    messages), as [MessageReceived(frame, None)]. None for anything else (a chunk or a Sync, a
    frame that does not decode, another space, a buffer that may change): the general path takes
    it and gives the same events and counts."""
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef Py_buffer *view
    cdef MessageReceived ev
    if type(data) is bytes:
        base = data
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    elif type(data) is memoryview:
        base = memoryview(data)  # a view of our own (the caller may release theirs); raises if released
        view = PyMemoryView_GET_BUFFER(base)
        if (<void *>view.obj == NULL or type(<object>view.obj) is not bytes or view.ndim != 1 or view.itemsize != 1
                or view.strides == NULL or view.strides[0] != 1):
            return None
        p = <const unsigned char *>view.buf
        n = view.len
    else:
        return None
    if off < 0 or n - off < 2:
        return None
    p += off
    n -= off
    if p[OFF_MSG_TYPE] == MSG_CHUNK or p[OFF_MSG_TYPE] == MSG_SYNC:
        return None
    try:
        frame = _decode_in(base, p, n, off, codec, None, False)
    except DecodeError:
        return None
    if expected_space_hash is not None and frame._space_hash32 != expected_space_hash:
        return None
    _count(stats, "frames_in", 1)
    _count(stats, "bytes_in", n)
    _count(stats, "messages", 1)
    ev = MessageReceived.__new__(MessageReceived)
    ev.frame = frame
    return [ev]




cdef class _SessionCore:
    """The per-message paths of resonant.session.Session, in C: data messages in (UDP datagrams,
    TCP reads holding one record) and out (plain frames), and the send queue. Everything else
    (the handshake, control frames, streams, encryption, compression, errors) is the Python
    subclass's: the interface declared in _codec.pxd (_chunks_direct, _frame, _chunk_or_frame,
    _records, _send), which these methods hand over to. The attributes (declared there too) are
    the subclass's state, kept in C slots."""

    def __cinit__(self, *args, **kwargs):
        self._fast = True

    cdef inline bint _takes_data(self) except -1:
        if self._direct_state is self.state:
            return self._direct
        return self._chunks_direct()

    # ---- the interface (declared in _codec.pxd): the general paths, the Python subclass's

    cpdef bint _chunks_direct(self) except -1:
        """Whether the current state takes data frames as they are (and sets _direct_state, _direct)."""
        raise NotImplementedError

    cpdef list _frame(self, data, double now, bint copy):
        """The general path for one frame: its events."""
        raise NotImplementedError

    cpdef list _chunk_or_frame(self, data, double now):
        """The general path for one datagram in a state that takes data: its events."""
        raise NotImplementedError

    cpdef list _records(self, double now, read, data):
        """The general path for TCP bytes: read(data) gives the complete records; their events."""
        raise NotImplementedError

    cpdef object _send(self, frame, double now, bint keep_seq):
        """The general path for one frame to send (handshake state, transforms, dtype reduction)."""
        raise NotImplementedError

    def send(self, frame, now=0.0, *, keep_seq=False):
        """Queue one frame, encoded as agreed (compressed/encrypted).

        The session numbers frames: frame_seq becomes the next number of the frame's stream
        (0, 1, 2...), so that the peer's replay window never mistakes two messages for a
        replay. keep_seq=True sends the frame_seq as given (then keep it increasing per
        stream when encrypting)."""
        if (self.state is self._closed or self._reduce or keep_seq or self._encoder is not None
                or not isinstance(frame, Frame) or not self._fast):
            return self._send(frame, now, keep_seq)
        _queue_numbered(frame, self._seq, self._out, self.stats, self._limit)

    def datagrams_to_send(self):
        """The queued frames, one per datagram."""
        out = self._out
        self._out = []
        return out

    def records_to_send(self):
        """The queued frames as TCP records, unjoined: [length, frame, length, frame, ...], for
        socket.sendmsg or a transport's writelines, which write them without a copy."""
        out = self._out
        self._out = []
        parts = []
        for f in out:
            head = PyBytes_FromStringAndSize(NULL, TCP_PREFIX_BYTES)
            rz_st_u32(<unsigned char *>PyBytes_AS_STRING(head), <uint32_t>len(f))
            parts.append(head)
            parts.append(f)
        return parts

    def data_to_send(self):
        """The queued frames as TCP records (u32 little-endian length + frame each), as one
        bytes object (one copy of each frame)."""
        cdef Py_ssize_t size = 0, pos = 0, k
        out = self._out
        self._out = []
        for f in out:
            size += TCP_PREFIX_BYTES + len(f)
        joined = PyBytes_FromStringAndSize(NULL, size)
        cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(joined)
        cdef const unsigned char[::1] v
        for f in out:
            if type(f) is bytes:
                k = PyBytes_GET_SIZE(f)
                rz_st_u32(q + pos, <uint32_t>k)
                memcpy(q + pos + TCP_PREFIX_BYTES, PyBytes_AS_STRING(f), k)
            else:
                v = memoryview(f).cast("B")
                k = v.shape[0]
                rz_st_u32(q + pos, <uint32_t>k)
                if k:
                    memcpy(q + pos + TCP_PREFIX_BYTES, &v[0], k)
            pos += TCP_PREFIX_BYTES + k
        return joined

    def receive_datagram(self, data, now):
        """One UDP datagram (one frame). Never raises for anything the peer sent."""
        if self._takes_data():
            if self._fast:
                events = _message_event_c(self._decoder, data, 0, self._space, self.stats)
                if events is not None:
                    return events
            return self._chunk_or_frame(data, now)
        return self._frame(data, now, True)

    def receive_data(self, data, now):
        """Bytes from a TCP connection (any split). A broken record stream gives
        ConnectionBroken, after which the connection should be closed."""
        rr = self.records
        if type(data) is bytes and self._fast and self._takes_data() and rr._start == rr._end and rr.broken is None:
            # The common case, bytes holding exactly one record of a data message: decoded in place.
            events = _record_event_c(self._decoder, data, rr.max_frame_bytes, self._space, self.stats)
            if events is not None:
                rr.consumed += PyBytes_GET_SIZE(data)
                return events
        return self._records(now, rr.feed, data)
