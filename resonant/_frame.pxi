# Hand-written, included by resonant/_codec.pyx: building messages (from arrays, Slices or
# text), checking them against the generated roles and layouts, make_frame, replace and repr.

# Per message type: slice count -> ((role, carries text), ...) of the layout with that count.
_LAYOUT_ROLES = {code: {len(lay): tuple((name, dict(_ROLES[code])[name] != "tensor") for name in lay) for lay in lays}
                 for code, lays in _LAYOUTS.items()}

cdef object _slice_of_array(object arr):
    """The common case of Slice.from_array in C: an exact, C-contiguous ndarray whose dtype the
    wire names as it is (float16, int8, ...), viewed without a copy (the slice's base is the array
    itself); None sends the caller down the general path, which also raises the errors (too many
    dimensions, a dimension over u32, ...)."""
    cdef cnp.ndarray a = <cnp.ndarray>arr
    cdef Slice s
    cdef int k, nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp nbytes
    cdef uint64_t elems = 1
    if not FAST_PATHS or nd == 0 or nd > MAX_DIMS or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        return None
    code = _DTYPE_OF_NUMPY_FAST.get(<object>cnp.PyArray_DESCR(a))
    if code is None:
        return None
    cdef uint32_t dims[MAX_DIMS]
    for k in range(nd):
        if shape[k] > 0xFFFFFFFF:
            return None
        dims[k] = <uint32_t>shape[k]
        elems *= <uint64_t>shape[k]
    if not _shape_fits(dims, nd):
        return None
    nbytes = cnp.PyArray_NBYTES(a)
    if nbytes > 0xFFFFFFFF or _expected_size(code, elems) != nbytes:
        return None
    s = Slice.__new__(Slice)
    s._dtype = code
    s._ndim = nd
    for k in range(nd):
        s._dims[k] = <uint32_t>shape[k]
    s._base = arr
    s._off = 0
    s._len = nbytes
    _fp_hits[<int>FP_SLICE_OF_ARRAY] += 1
    return s


cdef object _as_slice(object value, str kind, str path):
    if isinstance(value, Slice):
        return value
    try:
        if kind == "json":
            if isinstance(value, (str, bytes, bytearray, memoryview)):
                return Slice.from_text(value)
            return Slice.from_json(value)
        if kind == "text":
            if isinstance(value, (str, bytes, bytearray, memoryview)):
                return Slice.from_text(value)
            raise EncodeError(path, f"expected text (str or bytes), got {type(value).__name__}")
        if type(value) is _np.ndarray:
            fast = _slice_of_array(value)
            if fast is not None:
                return fast
        elif isinstance(value, (str, bytes, bytearray)):
            raise EncodeError(path, f"expected a numpy array or Slice, got {type(value).__name__}")
        return Slice.from_array(value)
    except EncodeError as exc:
        if exc.path.startswith(path):
            raise
        raise EncodeError(f"{path}.{exc.path}", exc.detail) from None
    except TypeError as exc:
        raise EncodeError(path, str(exc)) from None


cdef inline bint _fits(object v, unsigned long long top, unsigned long long *out) except -1:
    """Whether v is an int (or an int subclass: bool, an IntEnum) in 0..top; its value goes to out."""
    cdef unsigned long long x
    if not isinstance(v, int):
        return False
    try:
        x = PyLong_AsUnsignedLongLong(v)
    except OverflowError:  # negative, or over 64 bits
        return False
    if x > top:
        return False
    out[0] = x
    return True



cdef Frame _frame_replace(Frame self, dict changes):
    """Frame.replace(**changes)."""
    cdef Frame f
    for key in changes:
        if key not in _REPLACEABLE:
            raise TypeError(f"replace() got an unexpected field {key!r}")
    if "slices" not in changes:  # header only: the slices were checked when this frame was built
        f = _new_frame(self._msg_type)
        _set_header(f, self._msg_type, changes.get("stream_id", self._stream_id),
                    changes.get("frame_seq", self._frame_seq), changes.get("space_hash32", self._space_hash32),
                    changes.get("modality", self._modality), changes.get("flags", self._flags))
        f._slices = self._slices
        f._layout = self._layout
        f._empty_entry = self._empty_entry
        return f
    header = {name: getattr(self, name) for name in ("stream_id", "frame_seq", "space_hash32", "modality", "flags")}
    slices = tuple(changes.pop("slices"))
    header.update(changes)
    return make_frame(self._msg_type, slices, empty_slice_len=self._empty_entry and not slices, **header)


cdef str _frame_repr(Frame self):
    parts = [f"stream_id={self._stream_id}", f"frame_seq={self._frame_seq}",
             f"space_hash32={self._space_hash32}", f"modality={self.modality.name}"]
    if self._flags:
        parts.append(f"flags={self.flags!r}")
    if self._layout is None:  # the slices by role (a 2-slice Critique's second by content)
        for name, _ in _ROLES[self._msg_type]:
            s = getattr(self, name)
            if s is not None:
                parts.append(f"{name}={s!r}")
    else:
        parts.append(f"slices={self._slices!r}")
        parts.append("layout_ok=False")
    return f"{type(self).__name__}({', '.join(parts)})"


cdef bint _reads_as_text(Slice s) except -1:
    """Whether a slice reads as text: one-dimensional I8 whose payload is UTF-8 with no control
    character but tab, LF and CR (every JSON document and plain text; an empty payload too). The
    second slice of a 2-slice Critique is its explanation when it does, else its mask (the spec's
    read_layouts)."""
    cdef const unsigned char *p
    cdef Py_ssize_t i
    cdef unsigned char c
    if s._dtype != DTYPE_I8 or s._ndim != 1:
        return False
    if s._len == 0:
        return True
    p = _slice_ptr(s)
    for i in range(s._len):
        c = p[i]
        if c < 0x20 and c != 9 and c != 10 and c != 13:
            return False
    try:
        PyBytes_FromStringAndSize(<const char *>p, s._len).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


cdef object _layout_of(uint8_t msg_type, tuple slices):
    """_layout_problem of slices as encode() would lay them out (offsets as on the wire)."""
    cdef Py_ssize_t i, n = len(slices), pos
    cdef Slice s
    cdef uint8_t dt[ROLE_CHECK_SLOTS]
    cdef uint8_t nd[ROLE_CHECK_SLOTS]
    cdef Py_ssize_t off[ROLE_CHECK_SLOTS]
    memset(dt, 0, sizeof(dt))  # (entries past n are never read; this keeps the compiler sure of it)
    memset(nd, 0, sizeof(nd))
    memset(off, 0, sizeof(off))
    pos = PREFIX_SIZE + SLICE_LEN_BYTES * n + SUFFIX_SIZE
    for i in range(min(n, ROLE_CHECK_SLOTS)):
        s = <Slice>slices[i]
        dt[i] = s._dtype
        nd[i] = s._ndim
        off[i] = pos
        pos += SL_DIMS + DIM_BYTES * s._ndim + s._len
    return _layout_problem(msg_type, n, dt, nd, off, "")


cdef _check_roles(uint8_t msg_type, tuple slices):
    cdef Py_ssize_t i, n = len(slices)
    roles = _LAYOUT_ROLES[msg_type].get(n)  # ((name, is_text), ...) of the layout with n slices
    if roles is None:
        counts = " or ".join(str(len(lay)) for lay in _LAYOUTS[msg_type])
        raise EncodeError("slices", f"{_MSG_TYPES[msg_type].name.title()} carries {counts} slices, got {n}")
    for i in range(n):
        s = slices[i]
        if not isinstance(s, Slice):
            raise EncodeError(f"slices[{i}]", f"expected a Slice, got {type(s).__name__}")
        if (<Slice>s)._len > MAX_FRAME_BYTES:
            raise EncodeError(f"{roles[i][0]}.payload", f"{(<Slice>s)._len} bytes, more than max_frame_bytes "
                              f"({MAX_FRAME_BYTES})")
        if roles[i][1] and ((<Slice>s)._dtype != DTYPE_I8 or (<Slice>s)._ndim != 1):
            raise EncodeError(f"slices[{i}]", f"the {roles[i][0]} slice carries text: it must be I8 of one dimension, got {s!r}")
    at = _BY_CONTENT.get(msg_type, {}).get(n)  # a slice whose role a receiver tells by content
    if at is not None and not _reads_as_text(<Slice>slices[at]):
        raise EncodeError(f"slices[{at}]", f"the {roles[at][0]} slice must read as text (UTF-8 with no control character "
                          f"but tab, LF and CR): a receiver takes slice {at} of {n} that does not for a tensor role")


cdef _check_slices(tuple slices):
    """make_frame's checks: what the wire allows (at most max_slices Slices, each payload at most
    max_frame_bytes); the roles are not checked (see layout_ok)."""
    cdef Py_ssize_t i, n = len(slices)
    if n > MAX_SLICES:
        raise EncodeError("slices", f"{n} slices, more than max_slices ({MAX_SLICES})")
    for i in range(n):
        s = slices[i]
        if not isinstance(s, Slice):
            raise EncodeError(f"slices[{i}]", f"expected a Slice, got {type(s).__name__}")
        if (<Slice>s)._len > MAX_FRAME_BYTES:
            raise EncodeError(f"slices[{i}].payload", f"{(<Slice>s)._len} bytes, more than max_frame_bytes "
                              f"({MAX_FRAME_BYTES})")


def make_frame(msg_type, slices, *, stream_id=0, frame_seq=0, space_hash32=0, modality=0, flags=0,
               empty_slice_len=False):
    """Build the message of type `msg_type` from a sequence of Slices: any number (up to
    max_slices) of any dtype, as the wire allows. Whether they fit the type's layouts is the
    frame's layout_ok / layout_reason (the typed constructors, Think(...) etc., refuse what does
    not fit). empty_slice_len: a frame with no slices is written with one slice_len entry of 0
    (37 bytes for an empty Sync: the reference's Rust form, which its Rust decoder requires)
    instead of none (33 bytes: the spec's and the reference's Python form)."""
    if isinstance(msg_type, int) and msg_type in _MSG_TYPES:
        code = int(msg_type)
    else:
        try:
            code = int(MsgType(msg_type))
        except (ValueError, TypeError):
            raise EncodeError("msg_type", f"{msg_type!r} is not a message type") from None
    if type(slices) is not tuple:
        slices = tuple(slices)
    _check_slices(slices)
    if empty_slice_len and slices:
        raise EncodeError("empty_slice_len", f"applies to a frame with no slices, this one has {len(slices)}")
    cdef Frame f = _new_frame(code)
    _set_header(f, code, stream_id, frame_seq, space_hash32, modality, flags)
    f._slices = slices
    f._layout = _layout_of(code, slices)
    f._empty_entry = bool(empty_slice_len)
    return f


_REPLACEABLE = frozenset(("stream_id", "frame_seq", "space_hash32", "modality", "flags", "slices"))


# Message types whose every role is a tensor and whose fullest layout carries all of them in role
# order (Think, Cache, Chunk): built from arrays or Slices, they need none of the layout search.
cdef bint _TENSORS_ONLY[256]
for _code, _roles in _ROLES.items():
    _TENSORS_ONLY[_code] = (all(kind == "tensor" for _, kind in _roles)
                            and tuple(name for name, _ in _roles) in _LAYOUTS[_code])


cdef inline object _tensor_slice(object v):
    """A Slice given as it is, or an exact C-contiguous ndarray viewed in C; None otherwise (or
    when over max_frame_bytes: the general path raises)."""
    if type(v) is cnp.ndarray:
        v = _slice_of_array(v)
        if v is None:
            return None
    elif type(v) is not Slice:
        return None
    if (<Slice>v)._len > MAX_FRAME_BYTES:
        return None
    return v


cdef _init_message(Frame self, uint8_t code, tuple values, object stream_id, object frame_seq,
                   object space_hash32, object modality, object flags):
    """The message's slices from the values given per role (None: not given), in the smallest
    layout that carries them. Fast paths (off with RESONANT_PURE): a tensors-only message of arrays
    or Slices, and every role given as arrays or Slices (the full layout, in role order), skip the
    layout search; the general path below gives the same slices and raises the errors."""
    cdef Py_ssize_t i, n = len(values)
    roles = _ROLES[code]
    if FAST_PATHS:
        if _TENSORS_ONLY[code]:  # every value an array or a Slice
            if n == 1:
                s = _tensor_slice(values[0])
                if s is not None:
                    _set_header(self, code, stream_id, frame_seq, space_hash32, modality, flags)
                    self._slices = (s,)
                    _fp_hits[<int>FP_INIT_MESSAGE] += 1
                    return
            else:
                out = [_tensor_slice(v) for v in values]
                if None not in out:
                    _set_header(self, code, stream_id, frame_seq, space_hash32, modality, flags)
                    self._slices = tuple(out)
                    _fp_hits[<int>FP_INIT_MESSAGE] += 1
                    return
        if n == len(roles):  # every role given, as Slices or arrays (the full layout, in role order)
            out = []
            for i in range(n):
                v = values[i]
                if type(v) is Slice:
                    out.append(v)
                elif isinstance(v, (Slice, _np.ndarray)):
                    out.append(_as_slice(v, roles[i][1], roles[i][0]))
                else:
                    break
            else:
                slices = tuple(out)
                _check_roles(code, slices)
                _set_header(self, code, stream_id, frame_seq, space_hash32, modality, flags)
                self._slices = slices
                _fp_hits[<int>FP_INIT_MESSAGE] += 1
                return
    given = {name for (name, kind), v in zip(roles, values) if v is not None}
    layout = None
    for lay in _LAYOUTS[code]:
        if given.issubset(lay) and (layout is None or len(lay) < len(layout)):
            layout = lay
    if layout is None:
        raise EncodeError("slices", f"no layout of {type(self).__name__} carries {', '.join(sorted(given))}")
    kinds = dict(roles)
    byname = {name: v for (name, kind), v in zip(roles, values)}
    out = []
    for name in layout:
        v = byname[name]
        if v is None:
            if kinds[name] == "tensor":
                raise EncodeError(name, f"{type(self).__name__} with {', '.join(sorted(given))} needs {name}")
            v = b""
        out.append(_as_slice(v, kinds[name], name))
    slices = tuple(out)
    _check_roles(code, slices)
    _set_header(self, code, stream_id, frame_seq, space_hash32, modality, flags)
    self._slices = slices
