# Hand-written, included by resonant/_codec.pyx: encode() and the pieces resonant.Codec
# assembles transformed frames from.

# --------------------------------------------------------------------------- encode


cdef Py_ssize_t _body_size(tuple slices) except -1:
    """The body's bytes; a 0-D slice (empty shape, which the reference rejects) is refused."""
    cdef Py_ssize_t size = 0, i
    cdef Slice s
    for i in range(len(slices)):
        s = <Slice>slices[i]
        if s._ndim == 0:
            raise EncodeError(f"slices[{i}].shape", ZERO_D_REFUSED)
        size += SL_DIMS + DIM_BYTES * s._ndim + s._len
    return size


cdef void _write_header(Frame frame, unsigned char *q, uint8_t version, uint16_t flags, Py_ssize_t nslices,
                        Py_ssize_t entries) noexcept:
    """The header with `entries` slice_len entries: nslices, or 1 (of 0) for a frame with no slices
    in the reference's Rust form (_entries)."""
    cdef Py_ssize_t i
    _write_fields(q, PREFIX_SIZE + SLICE_LEN_BYTES * entries, version, frame._msg_type, flags, nslices,
                  frame._stream_id, frame._frame_seq, frame._space_hash32, frame._modality)
    for i in range(nslices):
        rz_st_u32(q + PREFIX_SIZE + SLICE_LEN_BYTES * i, <uint32_t>(<Slice>frame._slices[i])._len)
    for i in range(nslices, entries):
        rz_st_u32(q + PREFIX_SIZE + SLICE_LEN_BYTES * i, 0)


cdef inline Py_ssize_t _entries(Frame frame, Py_ssize_t nslices) noexcept:
    """slice_len entries of a raw-version frame: one of 0 for no slices in the Rust form (a frame
    decoded in it, or make_frame(empty_slice_len=True)), else nslices."""
    return 1 if nslices == 0 and frame._empty_entry else nslices


cdef Py_ssize_t _write_body(tuple slices, unsigned char *q, bint shuffle) noexcept:
    cdef Py_ssize_t pos = 0, i, k
    cdef Slice s
    cdef const unsigned char *src
    cdef int width
    for i in range(len(slices)):
        s = <Slice>slices[i]
        q[pos] = s._dtype
        q[pos + 1] = s._ndim
        for k in range(s._ndim):
            rz_st_u32(q + pos + SL_DIMS + DIM_BYTES * k, s._dims[k])
        pos += SL_DIMS + DIM_BYTES * s._ndim
        if s._len:
            src = _slice_ptr(s)
            width = _element_bytes(s._dtype)
            if s._len < NOGIL_BYTES:
                if shuffle:
                    _byte_shuffle(src, q + pos, s._len, width)
                else:
                    memcpy(q + pos, src, s._len)
            else:
                with nogil:
                    if shuffle:
                        _byte_shuffle(src, q + pos, s._len, width)
                    else:
                        memcpy(q + pos, src, s._len)
        pos += s._len
    return pos


cdef int _check_size(Py_ssize_t size) except -1:
    if size > MAX_FRAME_BYTES:
        raise EncodeError("frame", f"{size} bytes, more than max_frame_bytes ({MAX_FRAME_BYTES}); send it as a stream")
    return 0


def encode(Frame frame not None):
    """The frame's bytes: raw-version (VERSION) header, raw slices, CRC-32.

    Flags are written as the frame has them (a ZSTD or XCHACHA flag set by hand is carried,
    as the reference does, and reported by the receiver in ignored_flags); transforms a
    decoder applied to this frame are not claimed again. resonant.Codec compresses and encrypts.
    """
    return _encode_plain(frame, False, 0)


cdef bytes _encode_plain(Frame frame, bint renumber, uint64_t frame_seq):
    """encode(frame), or with renumber, encode(frame.replace(frame_seq=frame_seq)) without the copy."""
    cdef tuple slices = frame._slices
    cdef Py_ssize_t nslices = len(slices)
    cdef Py_ssize_t entries = _entries(frame, nslices)
    cdef Py_ssize_t hsize = PREFIX_SIZE + SLICE_LEN_BYTES * entries + SUFFIX_SIZE
    cdef Py_ssize_t size = hsize + _body_size(slices) + CRC_SIZE
    _check_size(size)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    _write_header(frame, q, VERSION, frame._flags & ~frame._applied, nslices, entries)
    if renumber:
        rz_st_u64(q + OFF_FRAME_SEQ, frame_seq)
    _write_body(slices, q + hsize, False)
    rz_st_u32(q + size - CRC_SIZE, _crc32(q, size - CRC_SIZE))
    return out


cpdef object next_frame_seq(dict seq, object stream_id):
    """The next frame_seq of `stream_id` from the Session's counters `seq` (0, 1, 2...), counted.
    A stream that has used every u64 number refuses to go on rather than wrap around to 0."""
    got = seq.get(stream_id)
    if got is None:
        seq[stream_id] = 1
        return 0
    if got > 0xFFFFFFFFFFFFFFFF:
        raise LocalProtocolError("send", f"stream {stream_id} has used every frame_seq (2**64 frames); "
                                 "send on another stream_id")
    seq[stream_id] = got + 1
    return got


cpdef int queue_frame(bytes data, list out, dict stats, Py_ssize_t limit) except -1:
    """The Session's send queue: one encoded frame, checked against the agreed limit, appended to
    `out` and counted in stats (frames_out, bytes_out)."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    if size > limit:
        raise LocalProtocolError("send", f"a {size}-byte frame is over the agreed max_frame_bytes ({limit}); "
                                 "send it as a stream")
    out.append(data)
    stats["frames_out"] = stats["frames_out"] + 1
    stats["bytes_out"] = stats["bytes_out"] + size
    return 0


cdef inline int _queue_numbered(Frame frame, dict seq, list out, dict stats, Py_ssize_t limit) except -1:
    """Session.send's plain path in one call: the frame takes its stream's next number from
    `seq` (0, 1, 2...), is encoded and queued (queue_frame)."""
    return queue_frame(_encode_plain(frame, True, next_frame_seq(seq, frame._stream_id)), out, stats, limit)



def encode_header(Frame frame not None, uint16_t transforms):
    """The transformed-version (VERSION_TRANSFORMED) header of a frame whose body gets `transforms` (ZSTD, XCHACHA)."""
    cdef Py_ssize_t nslices = len(frame._slices)
    header = PyBytes_FromStringAndSize(NULL, PREFIX_SIZE + SLICE_LEN_BYTES * nslices + SUFFIX_SIZE)
    _write_header(frame, <unsigned char *>PyBytes_AS_STRING(header), VERSION_TRANSFORMED,
                  (frame._flags & ~BODY_TRANSFORM_MASK) | (transforms & BODY_TRANSFORM_MASK), nslices, nslices)
    return header


def encode_body(Frame frame not None, bint shuffle):
    """The raw body (every slice, raw-version (VERSION) layout), its payloads byte-shuffled if asked."""
    cdef tuple slices = frame._slices
    cdef Py_ssize_t bsize = _body_size(slices)
    _check_size(PREFIX_SIZE + SLICE_LEN_BYTES * len(slices) + SUFFIX_SIZE + bsize + CRC_SIZE)
    body = PyBytes_FromStringAndSize(NULL, bsize)
    _write_body(slices, <unsigned char *>PyBytes_AS_STRING(body), shuffle)
    return body


def assemble(bytes head, *parts):
    """head + parts + CRC-32 of all of it, as one bytes object (each part copied once)."""
    cdef Py_ssize_t hn = PyBytes_GET_SIZE(head), size = hn + CRC_SIZE, pos
    cdef const unsigned char[::1] t
    views = [memoryview(p).cast("B") for p in parts]
    for v in views:
        size += len(v)
    _check_size(size)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    memcpy(q, PyBytes_AS_STRING(head), hn)
    pos = hn
    for v in views:
        t = v
        if t.shape[0]:
            memcpy(q + pos, &t[0], t.shape[0])
            pos += t.shape[0]
    rz_st_u32(q + pos, _crc32(q, pos))
    return out
