# Hand-written, included by resonant/_codec.pyx: the V-Stream kernels (chunk frames
# written and placed in C, ChunkSink: a stream's buffer and chunk bitmap).

# --------------------------------------------------------------------------- V-Stream fast paths


cdef inline void _write_chunk_head(unsigned char *q, uint32_t stream_id, uint64_t frame_seq, uint32_t space_hash32,
                                   uint8_t modality, uint8_t dtype, uint32_t count, Py_ssize_t length) noexcept:
    """The CHUNK_HEAD before a chunk's payload: header, slice_len table, suffix, slice head."""
    cdef Py_ssize_t pos = CHUNK_SLICE
    _write_fields(q, PREFIX_SIZE + SLICE_LEN_BYTES, VERSION, MSG_CHUNK, 0, 1, stream_id, frame_seq, space_hash32,
                  modality)
    rz_st_u32(q + PREFIX_SIZE, <uint32_t>length)
    q[pos + SL_DTYPE] = dtype
    q[pos + SL_NDIM] = 1
    rz_st_u32(q + pos + SL_DIMS, count)


cdef int _check_piece(const unsigned char[::1] src, Py_ssize_t start, Py_ssize_t length, uint8_t dtype,
                      uint32_t count) except -1:
    """A chunk's piece of its source, checked before anything is allocated: inside the source, the
    size its dtype and count need, its frame within max_frame_bytes."""
    cdef long long need = _expected_size(dtype, count)
    if start < 0 or length < 0 or start + length > src.shape[0]:
        raise EncodeError("source", f"bytes {start}..{start + length} are outside a {src.shape[0]}-byte source")
    if need == -2 or (need >= 0 and need != length):
        raise EncodeError("payload", f"{_dtype_name(dtype)} of {count} elements does not take {length} bytes")
    _check_size(CHUNK_HEAD + length + CRC_SIZE)
    return 0


cdef uint32_t _chunk_frame(unsigned char *q, unsigned char *dst, uint32_t stream_id, uint64_t frame_seq,
                           uint32_t space_hash32, uint8_t modality, uint8_t dtype, uint32_t count,
                           const unsigned char[::1] src, Py_ssize_t start, Py_ssize_t length, Xxh3 hasher) except? 0:
    """The one writer of a chunk frame from its source (checked by _check_piece): the CHUNK_HEAD
    bytes at q, then (dst not NULL) the payload copied to dst; returns the CRC-32 of head and
    payload, and feeds the payload to the hasher. Copy, CRC and hash run in one GIL-free section
    while the bytes are in cache."""
    cdef void *st = hasher._st if hasher is not None else NULL
    cdef const unsigned char *p = &src[start] if length else NULL
    cdef const unsigned char *rd = p  # where the CRC and hash read the payload (the copy, if one is made)
    cdef uint32_t crc
    if dst != NULL:
        rd = dst
    _write_chunk_head(q, stream_id, frame_seq, space_hash32, modality, dtype, count, length)
    if _crc_c != NULL and (hasher is None or st != NULL):
        with nogil:
            if dst != NULL and length:
                memcpy(dst, p, length)
            crc = _crc_c(0, q, <uint64_t>CHUNK_HEAD)
            if length:
                crc = _crc_c(crc, rd, <uint64_t>length)
                if st != NULL:
                    _xxh_update(st, rd, <size_t>length)
        return crc
    # no C CRC (or a hasher without C xxh3): the slow way, over a joined copy
    if dst != NULL and length:
        memcpy(dst, p, length)
    frame = PyBytes_FromStringAndSize(<char *>q, CHUNK_HEAD) + bytes(src[start:start + length])
    crc = _crc32(<const unsigned char *>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
    if hasher is not None and length:
        hasher._feed(p, length)
    return crc


def encode_chunk(uint32_t stream_id, uint64_t frame_seq, uint32_t space_hash32, uint8_t modality,
                 uint8_t dtype, uint32_t count, source, Py_ssize_t start, Py_ssize_t length, Xxh3 hasher=None):
    """The raw-version (VERSION) bytes of Chunk(Slice(dtype, (count,), source[start:start + length])),
    written straight from the source buffer (_chunk_frame): what StreamSender sends for every
    chunk without a Codec (a fast path: with RESONANT_PURE it builds the Chunk and encodes it).
    With a hasher, the payload is also fed to it."""
    cdef const unsigned char[::1] src = source
    _check_piece(src, start, length, dtype, count)
    out = PyBytes_FromStringAndSize(NULL, CHUNK_HEAD + length + CRC_SIZE)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    rz_st_u32(q + CHUNK_HEAD + length, _chunk_frame(q, q + CHUNK_HEAD, stream_id, frame_seq, space_hash32, modality,
                                                    dtype, count, src, start, length, hasher))
    _fp_hits[<int>FP_ENCODE_CHUNK] += 1
    return out


def encode_chunk_parts(uint32_t stream_id, uint64_t frame_seq, uint32_t space_hash32, uint8_t modality,
                       uint8_t dtype, uint32_t count, source, Py_ssize_t start, Py_ssize_t length,
                       Xxh3 hasher=None, bint record=False):
    """encode_chunk without the payload: (head, tail), where head + source[start:start + length]
    + tail are the frame's bytes (record: head starts with the TCP record's u32 length). For a
    scatter-gather send straight from the source: the CRC and hash read the payload once."""
    cdef const unsigned char[::1] src = source
    cdef Py_ssize_t pre = TCP_PREFIX_BYTES if record else 0
    _check_piece(src, start, length, dtype, count)
    head = PyBytes_FromStringAndSize(NULL, pre + CHUNK_HEAD)
    tail = PyBytes_FromStringAndSize(NULL, CRC_SIZE)
    cdef unsigned char *r = <unsigned char *>PyBytes_AS_STRING(head)
    if record:
        rz_st_u32(r, <uint32_t>(CHUNK_HEAD + length + CRC_SIZE))
    rz_st_u32(<unsigned char *>PyBytes_AS_STRING(tail), _chunk_frame(r + pre, NULL, stream_id, frame_seq, space_hash32,
                                                                     modality, dtype, count, src, start, length, hasher))
    _fp_hits[<int>FP_ENCODE_CHUNK_PARTS] += 1
    return head, tail


# What _check_chunk says of a chunk for an open stream (the fast and the general path alike).
cdef enum:
    CHUNK_NEW = 0        # in range, not yet received, and of the dtype and length its place needs
    CHUNK_DUPLICATE = 1  # already received
    CHUNK_OUTSIDE = 2    # frame_seq is not a chunk of this stream
    CHUNK_MISFIT = 3     # the wrong dtype or length for its place


cdef inline bint _bit(const unsigned char *bits, Py_ssize_t k) noexcept nogil:
    return (bits[k >> 3] >> (k & 7)) & 1


cdef class ChunkSink:
    """The receiving state of one V-Stream that the chunk fast path (place_chunk) writes to:
    the output buffer, the chunk bitmap (one bit per chunk: bit k & 7 of byte k >> 3), the
    chunks left per object, the running hash, the time of the last frame and of the last new
    chunk (`progress`: a duplicate or a keepalive is not progress). resonant.stream's
    _Stream extends it; its Python path for chunks checks and commits them through the same C
    functions (check, commit), so both paths share the checks and the bitmap code."""

    @staticmethod
    def bitmap_bytes(Py_ssize_t nchunks):
        """The bytes of the chunk bitmap of a stream of nchunks chunks."""
        return (nchunks + 7) >> 3

    def _geometry(self, buffer, tuple objects, Py_ssize_t chunk_bytes, Py_ssize_t nchunks):
        """Takes the layout's objects (StreamObject: first chunk, byte offset, bytes, chunks, and
        the dtype a chunk must carry: its own, or I8 for a blocked or opaque dtype) into C arrays;
        allocates the bitmap (bitmap_bytes(nchunks), zeroed)."""
        cdef Py_ssize_t i, n = len(objects)
        cdef StreamObject o
        if chunk_bytes < 1 or nchunks < 0:
            raise ValueError("chunk_bytes must be >= 1 and nchunks >= 0")
        first = _np.empty(n, _np.int64)
        offset = _np.empty(n, _np.int64)
        nbytes = _np.empty(n, _np.int64)
        want = _np.empty(n, _np.uint8)
        self.object_left = _np.empty(n, _np.int64)
        cdef int64_t[::1] f = first, a = offset, b = nbytes, left = self.object_left
        cdef uint8_t[::1] w = want
        for i in range(n):
            o = <StreamObject?>objects[i]
            f[i], a[i], b[i], left[i] = o.first_chunk, o.offset, o.nbytes, o.chunks
            w[i] = o.dtype if _element_bytes(<uint8_t>o.dtype) else DTYPE_I8
        self.buffer = buffer
        self._dst = buffer
        self._first = first
        self._offset = offset
        self._nbytes = nbytes
        self._want = want
        self._left = self.object_left
        self._nobj = n
        self._chunk_bytes = chunk_bytes
        self._nchunks = nchunks
        self.have = bytearray((nchunks + 7) >> 3)
        self._bits = self.have
        self.have_count = 0
        self.completed = -1
        self.top = self.skipped = self.have_bytes = 0
        self.top_at = 0.0
        self.last_chunk = -1
        self.fec_watch = False

    def has(self, Py_ssize_t k):
        """Whether chunk k (0 <= k < chunks) has been received."""
        if not 0 <= k < self._nchunks:
            raise IndexError(f"chunk {k} is outside this stream")
        return bool(_bit(&self._bits[0], k))

    def check(self, k, int dtype, Py_ssize_t length):
        """The general path's check of chunk k carrying `length` bytes of `dtype`, the fast
        path's own (_check_chunk): (outcome, object index, byte offset in the stream), outcome
        0 new, 1 duplicate, 2 outside the stream (object and offset -1), 3 the wrong dtype or length."""
        cdef ChunkAt at
        if not 0 <= k < self._nchunks or not 0 <= dtype <= 255:
            return CHUNK_OUTSIDE if not 0 <= k < self._nchunks else CHUNK_MISFIT, -1, -1
        outcome = _check_chunk(self, <Py_ssize_t>k, <uint8_t>dtype, length, &at)
        return outcome, (at.o if outcome != CHUNK_OUTSIDE else -1), (at.a if outcome != CHUNK_OUTSIDE else -1)

    def commit(self, Py_ssize_t k, Py_ssize_t o, Py_ssize_t a, Py_ssize_t length, double now):
        """Chunk k (of object o, length bytes at offset a) is in place, and hashed if it came in
        order: the general path's end of a chunk, the same as the fast path's (_commit_chunk)."""
        cdef ChunkAt at
        if not (0 <= k < self._nchunks and 0 <= o < self._nobj) or _bit(&self._bits[0], k):
            raise IndexError(f"chunk {k} of object {o} is outside this stream or already in place")
        at.k, at.o, at.a, at.length = k, o, a, length
        _commit_chunk(self, &at, now)

    def missing_chunks(self, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t cap):
        """The chunk index ranges [a, b) not received within [lo, hi), in order, as a flat list
        [a0, b0, a1, b1, ...] of at most `cap` ranges, and how many more ranges there are up to hi.
        One pass over the bitmap (whole bytes at a time where it is all 0 or all 1)."""
        cdef Py_ssize_t k, k0, more = 0, found = 0
        cdef const unsigned char *bits
        out = []
        lo = max(lo, 0)
        hi = min(hi, self._nchunks)
        if lo >= hi:
            return out, 0
        bits = &self._bits[0]
        k = lo
        while k < hi:
            if (k & 7) == 0 and k + 8 <= hi and bits[k >> 3] == 0xFF:
                k += 8
                continue
            if _bit(bits, k):
                k += 1
                continue
            k0 = k
            while k < hi:
                if (k & 7) == 0 and k + 8 <= hi and bits[k >> 3] == 0:
                    k += 8
                elif _bit(bits, k):
                    break
                else:
                    k += 1
            if found < cap:
                out.append(k0)
                out.append(k)
                found += 1
            else:
                more += 1
        return out, more

    def missing(self, Py_ssize_t cap):
        """The byte ranges of the stream not received, in order, touching ranges joined, never
        empty (a missing chunk of an empty object is no bytes): the first `cap` of them, and how
        many more there are. One pass over the bitmap (whole bytes
        at a time where it is all 0 or all 1); memory for the ranges listed only."""
        cdef Py_ssize_t k = 0, n = self._nchunks, k0, a, b, pa = -1, pb = -1, more = 0
        cdef const unsigned char *bits
        out = []
        if n == 0:
            return out, 0
        bits = &self._bits[0]
        while k < n:
            if (k & 7) == 0 and bits[k >> 3] == 0xFF:
                k += 8
                continue
            if _bit(bits, k):
                k += 1
                continue
            k0 = k
            while k < n:  # the run of missing chunks from k0 (bits past n are never set)
                if (k & 7) == 0 and bits[k >> 3] == 0:
                    k += 8
                elif _bit(bits, k):
                    break
                else:
                    k += 1
            if k > n:
                k = n
            a = self._byte_at(k0, False)
            b = self._byte_at(k - 1, True)
            if a == b:  # only empty objects' chunks: no bytes missing
                continue
            if pa >= 0 and a == pb:  # touches the previous range (an empty object in between)
                pb = b
                continue
            if pa >= 0:
                if len(out) < cap:
                    out.append((pa, pb))
                else:
                    more += 1
            pa, pb = a, b
        if pa >= 0:
            if len(out) < cap:
                out.append((pa, pb))
            else:
                more += 1
        return out, more

    cdef Py_ssize_t _byte_at(self, Py_ssize_t k, bint end) noexcept:
        """The stream offset of chunk k's first byte, or (end) of the byte after its last."""
        cdef Py_ssize_t o = self._object_of(k)
        cdef Py_ssize_t s = (k - self._first[o]) * self._chunk_bytes
        if end:
            s = min(s + self._chunk_bytes, <Py_ssize_t>self._nbytes[o])
        return self._offset[o] + s

    cdef Py_ssize_t _object_of(self, Py_ssize_t k) noexcept:
        """The last object whose first chunk is <= k (as StreamLayout.chunk)."""
        cdef Py_ssize_t lo = 0, hi = self._nobj - 1, mid
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._first[mid] <= k:
                lo = mid
            else:
                hi = mid - 1
        return lo


cdef struct ChunkAt:
    Py_ssize_t k        # chunk index (frame_seq - 1)
    Py_ssize_t o        # object index
    Py_ssize_t a        # byte offset of the payload in the stream buffer
    Py_ssize_t length   # payload bytes


cdef int _check_chunk(ChunkSink st, Py_ssize_t k, uint8_t dtype, Py_ssize_t length, ChunkAt *at) noexcept:
    """Where chunk k of `length` bytes of `dtype` goes in st (filled in at), or why it does not:
    one of CHUNK_NEW, CHUNK_DUPLICATE, CHUNK_OUTSIDE, CHUNK_MISFIT. The one check of a chunk
    against its stream, for the fast path and the general path."""
    cdef Py_ssize_t o, start
    if k < 0 or k >= st._nchunks:
        return CHUNK_OUTSIDE
    o = st._object_of(k)
    start = (k - st._first[o]) * st._chunk_bytes
    at.k = k
    at.o = o
    at.a = st._offset[o] + start
    at.length = length
    if _bit(&st._bits[0], k):
        return CHUNK_DUPLICATE
    if dtype != st._want[o] or length != min(st._chunk_bytes, <Py_ssize_t>st._nbytes[o] - start):
        return CHUNK_MISFIT
    if at.a < 0 or at.a + length > st._dst.shape[0]:
        return CHUNK_MISFIT
    return CHUNK_NEW


cdef ChunkSink _chunk_target(dict streams, const unsigned char *p, Py_ssize_t n, object expected_space_hash,
                             ChunkAt *at):
    """The open stream a frame p[0:n] (CRC not checked yet) belongs to when it is a plain, new,
    well-formed Chunk, and where its payload goes (at); None for anything else. Its checks are
    decode()'s own (_check_header, _check_body, _check_space, _check_meaning) and the
    Reassembler's (_check_chunk): what the fast path adds is only which frames it takes (raw
    version, no flags, one 1-D non-empty slice of an open stream, the hasher in C)."""
    cdef Hdr h
    cdef ChunkSink st
    if (n < CHUNK_HEAD + CRC_SIZE or p[OFF_MSG_TYPE] != MSG_CHUNK or p[OFF_VERSION] != VERSION
            or rz_ld_u16(p + OFF_FLAGS) != 0 or rz_ld_u64(p + OFF_NUM_SLICES) != 1 or p[CHUNK_SLICE + SL_NDIM] != 1):
        return None
    st = streams.get(rz_ld_u32(p + OFF_STREAM_ID))
    if st is None or st._dst is None:
        return None
    try:
        _check_header(p, n, &h)
        _check_body(p, &h, p + h.body, h.end - h.body, h.body, "", _BEFORE_CRC, "crc32", "the crc32")
        _check_space(p, &h, expected_space_hash)
        if _check_meaning(p, &h, p + h.body, h.body, "") is not None:
            return None  # (a chunk's one slice always fits)
    except DecodeError:
        return None  # decode() says what is wrong
    # (the checks above put the payload at CHUNK_HEAD, the rest of the frame before the CRC)
    if (h.end == CHUNK_HEAD or _check_chunk(st, <Py_ssize_t>(rz_ld_u64(p + OFF_FRAME_SEQ) - 1), p[CHUNK_SLICE + SL_DTYPE],
                                            h.end - CHUNK_HEAD, at) != CHUNK_NEW):
        return None
    if at.a == st.hashed and (st.hasher is None or st.hasher._st == NULL):
        return None  # the Python hasher fallback: the general path feeds it
    return st


cdef void _commit_chunk(ChunkSink st, ChunkAt *at, double now):
    """The chunk's payload is in place (and hashed, if it came in order): the catch-up hash of
    chunks already waiting after it, the bitmap, the counts."""
    cdef Py_ssize_t j, o2, s2, l2
    cdef unsigned char *bits = &st._bits[0]
    if at.a == st.hashed:
        st.hashed += at.length
        j = at.k + 1
        while j < st._nchunks and _bit(bits, j):
            o2 = st._object_of(j)
            s2 = (j - st._first[o2]) * st._chunk_bytes
            l2 = min(st._chunk_bytes, st._nbytes[o2] - s2)
            st.hasher._feed(&st._dst[st._offset[o2] + s2], l2)
            st.hashed += l2
            j += 1
    bits[at.k >> 3] |= <unsigned char>(1 << (at.k & 7))
    st.have_count += 1
    st.have_bytes += at.length
    if at.k >= st.top:  # (what a sender's pacing reads from the receiver's reports)
        st.skipped += at.k - st.top
        st.top = at.k + 1
        st.top_at = now
    st._left[at.o] -= 1
    st.completed = <int>at.o if st._left[at.o] == 0 else -1
    st.last_chunk = at.k
    st.last = now
    st.progress = now


cdef bint _place_at(ChunkSink st, ChunkAt *at, const unsigned char *p, Py_ssize_t n) noexcept:
    """CRC of the frame p[0:n] checked, then its payload hashed (if in order) and copied into
    place, in one GIL-free section; False (nothing written) if the CRC is wrong."""
    cdef void *hs = st.hasher._st if at.a == st.hashed else NULL
    cdef unsigned char *dst = &st._dst[at.a]
    cdef bint streaming = st.streaming, ok
    cdef size_t length = <size_t>at.length
    with nogil:
        ok = _crc_c(0, p, <uint64_t>(n - CRC_SIZE)) == rz_ld_u32(p + n - CRC_SIZE)
        if ok:
            if hs != NULL:
                _xxh_update(hs, p + CHUNK_HEAD, length)
            if streaming:
                rz_copy_nt(dst, p + CHUNK_HEAD, length)
            else:
                memcpy(dst, p + CHUNK_HEAD, length)
    return ok


def place_chunk(dict streams not None, data, expected_space_hash, double now):
    """The V-Stream receive fast path: one plain (raw-version (VERSION), no flags) Chunk frame of an open
    stream, checked as decode() and the Reassembler check it, written into the stream's buffer
    and hashed in one GIL-free section; returns the stream's ChunkSink. Returns None, having
    changed nothing, for anything else (another message, a duplicate, any error), which the
    general path then handles and reports."""
    cdef const unsigned char[::1] v
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef ChunkAt at
    cdef ChunkSink st
    if not FAST_PATHS:
        return None
    if type(data) is bytes:
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        v = data
        n = v.shape[0]
        if n == 0:
            return None
        p = &v[0]
    st = _chunk_target(streams, p, n, expected_space_hash, &at)
    if st is None or _crc_c == NULL or not _place_at(st, &at, p, n):
        return None  # (a bad CRC: decode() says which)
    _commit_chunk(st, &at, now)
    _fp_hits[<int>FP_PLACE_CHUNK] += 1
    return st


def place_records(dict streams not None, bytearray buf not None, Py_ssize_t start, Py_ssize_t end,
                   Py_ssize_t max_frame_bytes, expected_space_hash, double now, list ready=None):
    """The TCP receive fast path: the whole records (u32 little-endian length, frame) in
    buf[start:end] that are chunks place_chunk takes, placed one after the other. Stops before
    the first record that is incomplete, has a length outside 1..max_frame_bytes, or is not
    such a chunk (the general path takes it from there), and after a chunk that completes an
    object, comes after its stream's TAIL or belongs to a stream holding parity chunks
    (fec_watch: its block may now be recoverable), so that its events are made at once; with
    `ready` (a list), a chunk that only completes an object appends that object's ObjectReady
    (its sink's `ready`) to it instead, and the placing goes on. Returns (position reached,
    chunks placed, their frame bytes, the sink of the last chunk if it has events to make, else
    None)."""
    cdef unsigned char *b = <unsigned char *>buf
    cdef Py_ssize_t pos = start, size, count = 0, nbytes = 0
    cdef ChunkAt at
    cdef ChunkSink st
    if start < 0 or end > len(buf) or start > end:
        raise ValueError(f"{start}..{end} is not a range of a {len(buf)}-byte buffer")
    if _crc_c == NULL or not FAST_PATHS:
        return start, 0, 0, None
    while end - pos >= TCP_PREFIX_BYTES:
        size = rz_ld_u32(b + pos)
        if size < 1 or size > max_frame_bytes or end - pos - TCP_PREFIX_BYTES < size:
            break
        st = _chunk_target(streams, b + pos + TCP_PREFIX_BYTES, size, expected_space_hash, &at)
        if st is None or not _place_at(st, &at, b + pos + TCP_PREFIX_BYTES, size):
            break
        _commit_chunk(st, &at, now)
        _fp_hits[<int>FP_PLACE_RECORDS] += 1
        pos += TCP_PREFIX_BYTES + size
        count += 1
        nbytes += size
        if st.tail is not None or st.fec_watch:
            return pos, count, nbytes, st
        if st.completed >= 0:
            if ready is None or st.ready is None:
                return pos, count, nbytes, st
            ready.append(st.ready[st.completed])
    return pos, count, nbytes, None


cdef struct LayoutChunk:
    Py_ssize_t o        # the object
    Py_ssize_t start    # the chunk's byte offset in the object
    Py_ssize_t length   # its bytes
    uint8_t dtype       # the dtype it carries (the object's, I8 for a blocked or opaque one)
    uint32_t count      # its element count


cdef int _layout_chunk(tuple objects, Py_ssize_t chunk_bytes, Py_ssize_t k, LayoutChunk *c) except -1:
    """Where chunk k of a stream laid out as `objects` (StreamObject, in order) sits; c.o is where
    the search starts (objects before it hold no chunk >= k: callers go through k in order)."""
    cdef Py_ssize_t n = len(objects)
    cdef StreamObject obj
    cdef int width
    while c.o < n and (<StreamObject?>objects[c.o]).first_chunk + (<StreamObject>objects[c.o]).chunks <= k:
        c.o += 1
    if c.o == n or k < (<StreamObject?>objects[c.o]).first_chunk:
        raise EncodeError("chunk", f"chunk {k} is not a chunk of this layout")
    obj = <StreamObject?>objects[c.o]
    c.start = (k - obj.first_chunk) * chunk_bytes
    c.length = min(chunk_bytes, obj.nbytes - c.start)
    width = _element_bytes(<uint8_t>obj.dtype)
    c.dtype = <uint8_t>obj.dtype if width else DTYPE_I8
    c.count = <uint32_t>(c.length // width if width else c.length)
    return 0


def encode_layout_chunks(uint32_t stream_id, uint32_t space_hash32, uint8_t modality, tuple objects, list sources,
                         Py_ssize_t chunk_bytes, Py_ssize_t first, Py_ssize_t count, Xxh3 hasher=None):
    """Chunks first .. first + count - 1 of a stream laid out as `objects` (StreamObject, in
    order; sources: each one's bytes), across objects, as encode_chunk makes them one by one:
    frame_seq k + 1, the object's dtype (I8 for a blocked or opaque one) and its element count.
    One call for a batch, so the per-frame and per-object Python is paid once."""
    cdef Py_ssize_t k
    cdef LayoutChunk c
    if chunk_bytes < 1 or first < 0 or count < 0 or len(sources) != len(objects):
        raise ValueError("chunk_bytes must be >= 1, first and count >= 0, one source per object")
    c.o = 0
    out = []
    for k in range(first, first + count):
        _layout_chunk(objects, chunk_bytes, k, &c)
        out.append(encode_chunk(stream_id, k + 1, space_hash32, modality, c.dtype, c.count, sources[c.o], c.start,
                                c.length, hasher))
    return out


def layout_record_parts(uint32_t stream_id, uint32_t space_hash32, uint8_t modality, tuple objects, list sources,
                        Py_ssize_t chunk_bytes, Py_ssize_t first, Py_ssize_t count, Xxh3 hasher=None):
    """encode_layout_chunks as TCP records for a scatter-gather send, without copying payloads:
    per chunk, encode_chunk_parts' head (with the record's length) and CRC around a memoryview of
    its source. Returns (parts, frame bytes)."""
    cdef Py_ssize_t k, nbytes = 0
    cdef LayoutChunk c
    if chunk_bytes < 1 or first < 0 or count < 0 or len(sources) != len(objects):
        raise ValueError("chunk_bytes must be >= 1, first and count >= 0, one source per object")
    c.o = 0
    parts = []
    for k in range(first, first + count):
        _layout_chunk(objects, chunk_bytes, k, &c)
        src = sources[c.o]
        head, crc = encode_chunk_parts(stream_id, k + 1, space_hash32, modality, c.dtype, c.count, src, c.start,
                                       c.length, hasher, True)
        parts.append(head)
        parts.append((src if type(src) is memoryview else memoryview(src))[c.start:c.start + c.length])
        parts.append(crc)
        nbytes += CHUNK_HEAD + c.length + CRC_SIZE
    return parts, nbytes


def copy_payload(Slice s not None, dest, Py_ssize_t offset, Xxh3 hasher=None, bint streaming=False):
    """Copy a slice's payload into dest[offset:] (a writable byte buffer): one copy, GIL released.
    With a hasher, the payload is fed to it in the same GIL-free section, from the source while
    it is in cache. streaming: write with non-temporal stores (for a destination larger than
    the caches, which is not read again soon)."""
    cdef unsigned char[::1] d = dest
    if offset < 0 or offset + s._len > d.shape[0]:
        raise ValueError(f"{s._len} bytes at {offset} do not fit a {d.shape[0]}-byte destination")
    cdef const unsigned char *src = _slice_ptr(s)
    cdef void *st = hasher._st if hasher is not None else NULL
    if not s._len:
        return 0
    with nogil:
        if st != NULL:
            _xxh_update(st, src, <size_t>s._len)
        if streaming:
            rz_copy_nt(&d[offset], src, <size_t>s._len)
        else:
            memcpy(&d[offset], src, s._len)
    if hasher is not None and st == NULL:
        hasher._feed(src, s._len)
    return s._len
