# Hand-written, included by resonant/_codec.pyx: the Session's per-message paths in C
# (MessageReceived, the data-message fast paths, the send queue, SessionCore).

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


cpdef int count_in(dict stats, Py_ssize_t frames, Py_ssize_t nbytes) except -1:
    """Frames received, counted in a Session's stats (frames_in, bytes_in): the one count, for the
    general path (Session._frame) and the fast ones alike."""
    stats["frames_in"] = stats["frames_in"] + frames
    stats["bytes_in"] = stats["bytes_in"] + nbytes
    return 0


cpdef list accept_message(frame, document, dict stats):
    """A message handed to the application, counted (messages): [MessageReceived(frame, document)].
    The one accept, for the general path (Session._do_accept) and the fast one alike."""
    cdef MessageReceived ev = MessageReceived.__new__(MessageReceived)
    ev.frame = frame
    ev.document = document
    stats["messages"] = stats["messages"] + 1
    return [ev]


cdef inline bint _one_record(const unsigned char *p, Py_ssize_t n, Py_ssize_t max_frame_bytes) noexcept:
    """Whether the n bytes at p are exactly one TCP record (u32 little-endian length, then a frame
    of at most max_frame_bytes) long enough to show its message type."""
    cdef uint32_t length
    if n <= TCP_PREFIX_BYTES + OFF_MSG_TYPE:
        return False
    length = rz_ld_u32(p)
    return <Py_ssize_t>length == n - TCP_PREFIX_BYTES and <Py_ssize_t>length <= max_frame_bytes


def message_event(codec, buf, Py_ssize_t start, Py_ssize_t end, bint copy, expected_space_hash, dict stats,
                  Py_ssize_t record=0):
    """The Session's fast path for a data message: see _message_event_c."""
    return _message_event_c(codec, buf, start, end, copy, expected_space_hash, stats, record)


cdef object _message_event_c(codec, buf, Py_ssize_t start, Py_ssize_t end, bint copy, expected_space_hash,
                             dict stats, Py_ssize_t record):
    """The Session's fast path for a data message (not a stream chunk, not a control frame) in a
    state that takes data as it is: the frame buf[start:end] (end < 0: to the end of buf) decoded
    by `codec` (a resonant.Codec that requires no encryption), counted (count_in), accepted
    (accept_message): the events and counts the general path (Session._frame -> _step(DATA) ->
    _do_accept) gives it. With record > 0, buf[start:end] must be exactly one TCP record whose frame
    is at most `record` bytes, and the frame is the record's. buf is bytes, a bytearray, or a 1-D
    byte view of either; with copy, buf may change after the call, so the frame is copied out
    first unless buf is immutable (bytes, or a view of bytes); without copy, a mutable buf is not
    taken. None, having changed nothing, for anything else (a chunk or a Sync, a frame that does not
    decode, another space): the general path takes it and gives the same events and counts."""
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef Py_buffer *view
    cdef bint mutable
    if not FAST_PATHS:
        return None
    if type(buf) is bytes:
        base = buf
        p = <const unsigned char *>PyBytes_AS_STRING(buf)
        n = PyBytes_GET_SIZE(buf)
        mutable = False
    else:
        if type(buf) is memoryview:
            base = memoryview(buf)  # a view of our own (the caller may release theirs); raises if released
        elif type(buf) is bytearray:
            base = memoryview(buf)
        else:
            return None
        view = PyMemoryView_GET_BUFFER(base)
        if (<void *>view.obj == NULL or view.ndim != 1 or view.itemsize != 1
                or view.strides == NULL or view.strides[0] != 1):
            return None
        mutable = type(<object>view.obj) is not bytes
        if mutable and not copy:
            return None
        p = <const unsigned char *>view.buf
        n = view.len
    if end < 0 or end > n:
        end = n
    if start < 0 or start >= end:
        return None
    if record > 0:
        if not _one_record(p + start, end - start, record):
            return None
        start += TCP_PREFIX_BYTES
    if end - start < OFF_MSG_TYPE + 1 or p[start + OFF_MSG_TYPE] == MSG_CHUNK or p[start + OFF_MSG_TYPE] == MSG_SYNC:
        return None
    n = end - start
    if mutable:  # the buffer will be reused: the message keeps a copy
        base = PyBytes_FromStringAndSize(<const char *>p + start, n)
        p = <const unsigned char *>PyBytes_AS_STRING(base)
        start = 0
    else:
        p += start
    try:
        frame = _decode_in(base, p, n, start, codec, None, False, False)
    except DecodeError:
        return None
    if frame._layout is not None:  # slices that fit no layout: the general path decides (strict_layout)
        return None
    if expected_space_hash is not None and frame._space_hash32 != expected_space_hash:
        return None
    _fp_hits[<int>FP_MESSAGE_EVENT] += 1
    count_in(stats, 1, n)
    return accept_message(frame, None, stats)


cdef class SessionCore:
    """The per-message paths of resonant.session.Session, in C: data messages in (UDP datagrams,
    TCP reads holding one record) and out (plain frames), and the send queue. Everything else
    (the handshake, control frames, streams, encryption, compression, errors) is the Python
    subclass's: the interface declared in _codec.pxd (_chunks_direct, _frame, _chunk_or_frame,
    _records, _send), which these methods hand over to. The attributes (declared there too) are
    the subclass's state, kept in C slots."""

    def __cinit__(self, *args, **kwargs):
        self._fast = FAST_PATHS  # the switch (RESONANT_PURE); settable per session for tests

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
        cdef double t = now  # a number on every path (the general path declares `double now`)
        if (self.state is self._closed or self._reduce or keep_seq or self._encoder is not None
                or not isinstance(frame, Frame) or not self._fast):
            return self._send(frame, t, keep_seq)
        _fp_hits[<int>FP_QUEUE_NUMBERED] += 1
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
        cdef double t = now  # checked here, so that a fast path takes the same `now` as the general one
        if self._takes_data():
            if self._fast:
                events = _message_event_c(self._decoder, data, 0, -1, True, self._space, self.stats, 0)
                if events is not None:
                    return events
            return self._chunk_or_frame(data, t)
        return self._frame(data, t, True)

    def receive_data(self, data, now):
        """Bytes from a TCP connection (any split). A broken record stream gives
        ConnectionBroken, after which the connection should be closed."""
        cdef double t = now  # checked here, so that a fast path takes the same `now` as the general one
        rr = self.records
        if type(data) is bytes and self._fast and self._takes_data() and rr._start == rr._end and rr.broken is None:
            # The common case, bytes holding exactly one record of a data message: decoded in place.
            events = _message_event_c(self._decoder, data, 0, -1, False, self._space, self.stats, rr.max_frame_bytes)
            if events is not None:
                rr.consumed += PyBytes_GET_SIZE(data)
                return events
        return self._records(t, rr.feed, data)
