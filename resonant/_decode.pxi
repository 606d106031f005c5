# Hand-written, included by resonant/_codec.pyx: decode(): every length and count checked
# against the input and the named limits before any read or allocation; slices are views.

# --------------------------------------------------------------------------- decode

cdef struct Hdr:
    uint8_t version
    Py_ssize_t nslices     # number of slices (<= max_slices)
    Py_ssize_t tab         # offset of the slice_len table
    Py_ssize_t entries     # its entries: nslices, or 1 for a version 1 frame with no slices in the Rust form
    Py_ssize_t body        # offset just after the header (start of the body, or of the envelope)
    Py_ssize_t end         # offset of the crc32 (frame length - 4)

cdef str _BEFORE_CRC = f"before the {CRC_SIZE}-byte crc32"
cdef str _IN_BODY = "in the decoded body"


cdef _truncated(str path, Py_ssize_t off, Py_ssize_t need, Py_ssize_t end, str where):
    have = end - off if end > off else 0
    return TruncatedFrame(path, f"needs {need} bytes, {have} remain {where}", off)


cdef _truncated_fixed(tuple fields, Py_ssize_t base, Py_ssize_t end):
    for name, off, width in fields:
        if base + off + width > end:
            return _truncated(name, base + off, width, end, _BEFORE_CRC)
    raise AssertionError("no field is truncated")


cdef int _check_header(const unsigned char *p, Py_ssize_t n, Hdr *h) except -1:
    """Size, version, and every header length against the input (nothing read before it is known to be there)."""
    cdef uint64_t num
    cdef Py_ssize_t end, k
    if n > MAX_FRAME_BYTES:
        raise LimitExceeded("frame", f"{n} bytes, more than max_frame_bytes ({MAX_FRAME_BYTES})", 0)
    if n < 1:
        raise TruncatedFrame("version", "empty input", 0)
    if p[OFF_VERSION] != VERSION and p[OFF_VERSION] != VERSION_TRANSFORMED:
        raise UnknownVersion("version", f"{p[OFF_VERSION]} (this decoder speaks versions {VERSION} and {VERSION_TRANSFORMED})", OFF_VERSION)
    end = n - CRC_SIZE
    if PREFIX_SIZE > end:
        raise _truncated_fixed(_PREFIX_FIELDS, 0, end)
    num = rz_ld_u64(p + OFF_NUM_SLICES)
    if num > MAX_SLICES:
        raise LimitExceeded("num_slices", f"{num}, more than max_slices ({MAX_SLICES})", OFF_NUM_SLICES)
    h.version = p[OFF_VERSION]
    h.nslices = <Py_ssize_t>num
    h.tab = PREFIX_SIZE
    h.end = end
    h.entries = h.nslices
    if (num == 0 and h.version == VERSION and end == PREFIX_SIZE + SLICE_LEN_BYTES + SUFFIX_SIZE
            and rz_ld_u32(p + PREFIX_SIZE) == 0):
        h.entries = 1  # no slices, one slice_len entry of 0: the form the reference's Rust encoder writes
    if h.tab + SLICE_LEN_BYTES * h.nslices > end:
        k = (end - h.tab) // 4 if end > h.tab else 0
        raise _truncated(f"slice_len[{k}]", h.tab + SLICE_LEN_BYTES * k, SLICE_LEN_BYTES, end, _BEFORE_CRC)
    h.body = h.tab + SLICE_LEN_BYTES * h.entries
    if h.body + SUFFIX_SIZE > end:
        raise _truncated_fixed(_SUFFIX_FIELDS, h.body, end)
    h.body += SUFFIX_SIZE
    return 0


cdef int _check_body(const unsigned char *p, Hdr *h, const unsigned char *b, Py_ssize_t blen, Py_ssize_t base,
                     str prefix, str where, str trailer_path, str trailer) except -1:
    """The slices' structure inside b[0:blen]: every length checked before it is read, nothing left over.
    Offsets in errors are base + the offset in b; paths start with prefix."""
    cdef Py_ssize_t pos = 0, poff, i, k
    cdef uint8_t ndim
    cdef uint32_t slen
    for i in range(h.nslices):
        if pos + SL_DIMS > blen:
            if pos + 1 > blen:
                raise _truncated(f"{prefix}slices[{i}].dtype", base + pos, 1, base + blen, where)
            raise _truncated(f"{prefix}slices[{i}].shape_len", base + pos + 1, 1, base + blen, where)
        ndim = b[pos + 1]
        if ndim > MAX_DIMS:
            raise LimitExceeded(f"{prefix}slices[{i}].shape_len", f"{ndim} dimensions, more than max_dims ({MAX_DIMS})", base + pos + 1)
        if pos + SL_DIMS + DIM_BYTES * ndim > blen:
            k = (blen - pos - SL_DIMS) // DIM_BYTES if blen > pos + SL_DIMS else 0
            raise _truncated(f"{prefix}slices[{i}].shape[{k}]", base + pos + SL_DIMS + DIM_BYTES * k, DIM_BYTES, base + blen, where)
        poff = pos + SL_DIMS + DIM_BYTES * ndim
        slen = rz_ld_u32(p + h.tab + SLICE_LEN_BYTES * i)
        if slen > blen - poff:
            raise _truncated(f"{prefix}slices[{i}].payload", base + poff, slen, base + blen, where)
        pos = poff + slen
    if pos != blen:
        raise TrailingBytes(trailer_path, f"{blen - pos} unexpected bytes between the last slice and {trailer}", base + pos)
    return 0


cdef int _check_crc(const unsigned char *p, Hdr *h) except -1:
    cdef uint32_t stored = rz_ld_u32(p + h.end)
    cdef uint32_t computed = _crc32(p, h.end)
    if stored != computed:
        raise ChecksumMismatch("crc32", f"stored 0x{stored:08x}, computed 0x{computed:08x} over {h.end} bytes", h.end)
    return 0


cdef int _check_flags(const unsigned char *p) except -1:
    cdef uint16_t flags = rz_ld_u16(p + OFF_FLAGS)
    if flags & ~FLAGS_MASK:
        raise UnknownFlags("flags", f"0x{flags:04x} sets bits outside {', '.join(f'{m.name}={m.value}' for m in Flags)}", OFF_FLAGS)
    return 0


cdef int _check_space(const unsigned char *p, Hdr *h, object expected) except -1:
    cdef uint32_t got
    if expected is None:
        return 0
    got = rz_ld_u32(p + h.body - SUFFIX_SIZE + SUF_SPACE_HASH32)
    if got != expected:
        raise SpaceMismatch("space_hash32", f"the frame is for embedding space {got} (0x{got:08x}), this receiver expects {expected} (0x{expected:08x})",
                            h.body - SUFFIX_SIZE + SUF_SPACE_HASH32)
    return 0


cdef object _check_meaning(const unsigned char *p, Hdr *h, const unsigned char *b, Py_ssize_t base, str prefix):
    """Message type, flags, modality, every slice's dtype and size rule (raised); then whether the
    slices fit the type's layouts: None, or the LayoutError (returned, raised only by strict decoding)."""
    cdef Py_ssize_t pos = 0, i, k
    cdef uint64_t nel
    cdef uint32_t slen
    cdef uint8_t ndim, dtype, msg_type, modality
    cdef long long need
    cdef uint32_t dims[MAX_DIMS]
    cdef uint8_t role_dtype[ROLE_CHECK_SLOTS]
    cdef uint8_t role_ndim[ROLE_CHECK_SLOTS]
    cdef Py_ssize_t role_off[ROLE_CHECK_SLOTS]

    msg_type = p[OFF_MSG_TYPE]
    if not _known_msg_type(msg_type):
        raise UnknownMessageType("msg_type", f"{msg_type} is not a message type ({', '.join(f'{m.value} {m.name}' for m in MsgType)})", OFF_MSG_TYPE)
    _check_flags(p)
    modality = p[h.body - SUFFIX_SIZE + SUF_MODALITY]
    if not _known_modality(modality):
        raise UnknownModality("modality", f"{modality} is not a modality ({', '.join(f'{m.value} {m.name}' for m in Modality)})", h.body - SUFFIX_SIZE + SUF_MODALITY)
    for i in range(h.nslices):
        dtype = b[pos]
        ndim = b[pos + 1]
        if i < ROLE_CHECK_SLOTS:
            role_dtype[i] = dtype
            role_ndim[i] = ndim
            role_off[i] = base + pos
        for k in range(ndim):
            dims[k] = rz_ld_u32(b + pos + SL_DIMS + DIM_BYTES * k)
        nel = _elems(dims, ndim)
        need = _expected_size(dtype, nel)
        slen = rz_ld_u32(p + h.tab + SLICE_LEN_BYTES * i)
        if need == -2:
            raise UnknownDType(f"{prefix}slices[{i}].dtype", f"0x{dtype:02x} is not a dtype ({', '.join(f'0x{d.value:02x} {d.name}' for d in DType)})", base + pos)
        if not _shape_fits(dims, ndim):
            raise LimitExceeded(f"{prefix}slices[{i}].shape", _shape_problem(tuple([dims[k] for k in range(ndim)])), base + pos + SL_DIMS)
        if need >= 0 and <uint64_t>need != slen:
            shape = tuple([dims[k] for k in range(ndim)])
            raise SizeMismatch(f"{prefix}slices[{i}].payload", _size_detail(dtype, shape, nel, need, slen, f"slice_len[{i}]"), base + pos + SL_DIMS + DIM_BYTES * ndim)
        pos += SL_DIMS + DIM_BYTES * ndim + slen
    return _layout_problem(msg_type, h.nslices, role_dtype, role_ndim, role_off, prefix)


cdef Frame _build(const unsigned char *p, Hdr *h, const unsigned char *b, object base, Py_ssize_t boff,
                  uint16_t applied, object layout):
    """Build the message from checked bytes: the header at p, the body at b, which is base[boff:];
    layout: what _check_meaning said of its slices."""
    cdef Py_ssize_t pos = 0, i, k
    cdef Slice s
    cdef Frame f = _new_frame(p[OFF_MSG_TYPE])
    cdef Py_ssize_t suffix = h.body - SUFFIX_SIZE
    _read_header(f, p, suffix)
    f._applied = applied
    f._layout = layout
    f._empty_entry = h.entries != h.nslices
    cdef tuple slices = PyTuple_New(h.nslices)
    for i in range(h.nslices):
        s = Slice.__new__(Slice)
        s._dtype = b[pos]
        s._ndim = b[pos + 1]
        for k in range(s._ndim):
            s._dims[k] = rz_ld_u32(b + pos + SL_DIMS + DIM_BYTES * k)
        s._base = base
        s._off = boff + pos + SL_DIMS + DIM_BYTES * s._ndim
        s._len = rz_ld_u32(p + h.tab + SLICE_LEN_BYTES * i)
        pos += SL_DIMS + DIM_BYTES * s._ndim + s._len
        Py_INCREF(s)
        PyTuple_SET_ITEM(slices, i, s)
    f._slices = slices
    return f


cdef object _unshuffle_body(const unsigned char *p, Hdr *h, const unsigned char *b, Py_ssize_t blen):
    """A new body with every element-sized payload's bytes put back in element order."""
    out = PyBytes_FromStringAndSize(NULL, blen)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    cdef Py_ssize_t pos = 0, i, head
    cdef uint32_t slen
    cdef int width
    for i in range(h.nslices):
        head = SL_DIMS + DIM_BYTES * b[pos + SL_NDIM]
        slen = rz_ld_u32(p + h.tab + SLICE_LEN_BYTES * i)
        memcpy(q + pos, b + pos, head)
        width = _element_bytes(b[pos])
        _byte_unshuffle(b + pos + head, q + pos + head, slen, width)
        pos += head + slen
    return out


cdef void _byte_shuffle(const unsigned char *src, unsigned char *dst, Py_ssize_t nbytes, int width) noexcept nogil:
    """Group the bytes of `width`-byte elements by significance: dst = all byte 0s, all byte 1s, ..."""
    cdef Py_ssize_t n, i
    cdef int j
    if width < 2 or nbytes % width:
        memcpy(dst, src, nbytes)
        return
    n = nbytes // width
    if width == 2:
        for i in range(n):
            dst[i] = src[2 * i]
            dst[n + i] = src[2 * i + 1]
        return
    for i in range(n):
        for j in range(width):
            dst[j * n + i] = src[i * width + j]


cdef void _byte_unshuffle(const unsigned char *src, unsigned char *dst, Py_ssize_t nbytes, int width) noexcept nogil:
    cdef Py_ssize_t n, i
    cdef int j
    if width < 2 or nbytes % width:
        memcpy(dst, src, nbytes)
        return
    n = nbytes // width
    if width == 2:
        for i in range(n):
            dst[2 * i] = src[i]
            dst[2 * i + 1] = src[n + i]
        return
    for i in range(n):
        for j in range(width):
            dst[i * width + j] = src[j * n + i]


def element_bytes(dtype):
    """Bytes per element of a dtype sized per element (the width BYTE_SHUFFLE uses), else 0."""
    return _element_bytes(int(DType(dtype)))


def byte_shuffle(data, int width, bint inverse=False):
    """BYTE_SHUFFLE (or its inverse) of a buffer of `width`-byte elements, as the codec applies it."""
    cdef const unsigned char[::1] src = memoryview(data).cast("B")
    cdef Py_ssize_t n = src.shape[0]
    out = PyBytes_FromStringAndSize(NULL, n)
    if n:
        if inverse:
            _byte_unshuffle(&src[0], <unsigned char *>PyBytes_AS_STRING(out), n, width)
        else:
            _byte_shuffle(&src[0], <unsigned char *>PyBytes_AS_STRING(out), n, width)
    return out


cdef Frame _decode_transformed(const unsigned char *p, Hdr *h, object base, object codec, object expected_space,
                               bint require_encryption, bint strict):
    """Transformed version (VERSION_TRANSFORMED): envelope, CRC, space, decrypt, decompress, then the body's checks."""
    cdef uint16_t flags, applied
    cdef Py_ssize_t env = h.body, env_size, tb
    cdef uint32_t body_len, key_id
    cdef uint8_t filters
    cdef const unsigned char *pb
    _check_flags(p)
    flags = rz_ld_u16(p + OFF_FLAGS)
    applied = flags & BODY_TRANSFORM_MASK
    if applied == 0:
        raise LayoutError("flags", f"a version {VERSION_TRANSFORMED} frame must set ZSTD or XCHACHA (or both)", OFF_FLAGS)
    env_size = ENV_BASE_SIZE + (ENV_CRYPTO_SIZE if applied & FLAG_ENCRYPT else 0)
    if env + env_size > h.end:
        raise _truncated_fixed(_ENVELOPE_FIELDS if applied & FLAG_ENCRYPT else _ENVELOPE_FIELDS[:2], env, h.end)
    body_len = rz_ld_u32(p + env + ENV_BODY_LEN)
    filters = p[env + ENV_FILTERS]
    if body_len > MAX_FRAME_BYTES:
        raise LimitExceeded("body_len", f"{body_len}, more than max_frame_bytes ({MAX_FRAME_BYTES})", env + ENV_BODY_LEN)
    if filters & ~FILTERS_MASK:
        raise UnknownFlags("filters", f"0x{filters:02x} sets bits outside {', '.join(f'{m.name}={m.value}' for m in Filters)}", env + ENV_FILTERS)
    if filters and not applied & FLAG_COMPRESS:
        raise LayoutError("filters", "filters apply only to compressed (ZSTD) bodies", env + ENV_FILTERS)
    tb = env + env_size
    if applied & FLAG_ENCRYPT:
        if h.end - tb < TAG_BYTES:
            raise _truncated("body", tb, TAG_BYTES, h.end, _BEFORE_CRC)
        if not applied & FLAG_COMPRESS and h.end - tb != body_len + TAG_BYTES:
            raise SizeMismatch("body", f"{h.end - tb} bytes of ciphertext and tag, body_len {body_len} needs {body_len + TAG_BYTES}", tb)
    elif h.end - tb < 1:
        raise _truncated("body", tb, 1, h.end, _BEFORE_CRC)
    _check_crc(p, h)
    _check_encrypted(p, h, require_encryption)
    _check_space(p, h, expected_space)

    if codec is None:
        from resonant.transforms import default_codec
        codec = default_codec()
    mv = memoryview(base)
    plain = mv[tb:h.end]
    if applied & FLAG_ENCRYPT:
        key_id = rz_ld_u32(p + env + ENV_KEY_ID)
        plain = codec._open(key_id, mv[env + ENV_NONCE:env + ENV_NONCE + NONCE_BYTES], mv[:tb], plain, tb)
    if applied & FLAG_COMPRESS:
        plain = codec._inflate(plain, body_len, tb)
    if type(plain) is not bytes or PyBytes_GET_SIZE(plain) != body_len:
        raise DecompressionFailed("body", f"the transforms produced {len(plain)} bytes, body_len is {body_len}", tb)
    pb = <const unsigned char *>PyBytes_AS_STRING(plain)
    _check_body(p, h, pb, body_len, 0, "body.", _IN_BODY, "body", f"the end of the body (body_len {body_len})")
    if filters & FILTER_BYTE_SHUFFLE:
        plain = _unshuffle_body(p, h, pb, body_len)
        pb = <const unsigned char *>PyBytes_AS_STRING(plain)
    layout = _check_meaning(p, h, pb, 0, "body.")
    if strict and layout is not None:
        raise layout
    return _build(p, h, pb, plain, 0, applied, layout)


cdef int _check_encrypted(const unsigned char *p, Hdr *h, bint required) except -1:
    if required and (h.version != VERSION_TRANSFORMED or not rz_ld_u16(p + OFF_FLAGS) & FLAG_ENCRYPT):
        raise NotEncrypted("flags", "the frame is not encrypted, and this receiver requires encryption "
                           "(Codec(require_encryption=False) accepts it)", OFF_FLAGS)
    return 0


def decode(data, *, codec=None, expected_space_hash=None, bint require_encryption=False, bint strict=False):
    """Decode one V-Frame from a bytes-like object into its message class.

    A raw-version (VERSION) frame's slices are views of `data` (no copy). A transformed-version (VERSION_TRANSFORMED) frame is
    decrypted and/or decompressed by `codec` (a resonant.Codec; the default one can decompress
    but holds no key), and its slices view the one buffer that produces. With
    `expected_space_hash`, a frame for another embedding space raises SpaceMismatch; with
    `require_encryption`, a frame that is not encrypted raises NotEncrypted.
    Malformed input raises a DecodeError subclass naming the field path and byte offset.
    Any number of slices of any dtype is valid on the wire in any message type: a frame whose
    slices fit none of its type's layouts decodes with layout_ok False (layout_reason says why);
    with `strict` it raises that LayoutError instead.
    """
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef Py_buffer *view
    cdef Hdr h
    if expected_space_hash is not None and not (isinstance(expected_space_hash, int) and 0 <= expected_space_hash <= 0xFFFFFFFF):
        raise TypeError(f"expected_space_hash must be an integer that fits u32, got {expected_space_hash!r}")
    if type(data) is bytes:
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
        base = data
    else:
        try:
            base = memoryview(data)
        except TypeError:
            raise TypeError(f"decode() needs a bytes-like object, got {type(data).__name__}") from None
        if not base.c_contiguous:
            raise TypeError("decode() needs a C-contiguous buffer")
        if base.format != "B" or base.ndim != 1:
            base = base.cast("B")
        view = PyMemoryView_GET_BUFFER(base)
        p = <const unsigned char *>view.buf
        n = view.len
    return _decode_in(base, p, n, 0, codec, expected_space_hash, require_encryption, strict)


cdef Frame _decode_in(object base, const unsigned char *p, Py_ssize_t n, Py_ssize_t off, object codec,
                      object expected_space_hash, bint require_encryption, bint strict):
    """decode() of the n frame bytes at p, which are base[off:off + n] (base: bytes, or a 1-D
    unsigned-byte memoryview)."""
    cdef Hdr h
    _check_header(p, n, &h)
    if h.version == VERSION_TRANSFORMED:
        if off:  # (its offsets count from the frame's first byte)
            base = memoryview(base)[off:off + n]
        return _decode_transformed(p, &h, base, codec, expected_space_hash, require_encryption, strict)
    _check_body(p, &h, p + h.body, h.end - h.body, h.body, "", _BEFORE_CRC, "crc32", "the crc32")
    _check_crc(p, &h)
    _check_encrypted(p, &h, require_encryption)
    _check_space(p, &h, expected_space_hash)
    layout = _check_meaning(p, &h, p + h.body, h.body, "")
    if strict and layout is not None:
        raise layout
    return _build(p, &h, p + h.body, base, off + h.body, 0, layout)
