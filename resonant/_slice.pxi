# Hand-written, included by resonant/_codec.pyx: the lookup tables built from the generated
# enums, shape arithmetic, and Slice (a tensor: dtype, shape, payload view).

# --------------------------------------------------------------------------- tables

_MSG_TYPES = {int(m): m for m in MsgType}
_MODALITIES = {int(m): m for m in Modality}
_DTYPES = {int(d): d for d in DType}
_FLAGS = [Flags(i) for i in range(FLAGS_MASK + 1)]
# The numpy dtype of each DType that maps to numpy, and back. numpy's own dtypes are there from
# the start; the ones numpy knows only once ml_dtypes has registered them (bfloat16) are added by
# _load_extension_dtypes() when first needed: importing ml_dtypes takes longer than the rest of
# `import resonant` together, and most programs never see a bfloat16.
_NUMPY = {}
DTYPE_OF_NUMPY = {}
# Native little-endian dtypes that need no conversion (the common case, looked up first).
_DTYPE_OF_NUMPY_FAST = {}
cdef bint _extension_dtypes_loaded = False


def _add_numpy_dtypes():
    for d, s in NUMPY_DTYPES.items():
        if int(d) in _NUMPY:
            continue
        try:
            t = _np.dtype(s)
        except TypeError:  # not registered with numpy (yet)
            continue
        _NUMPY[int(d)] = t
        DTYPE_OF_NUMPY[t.newbyteorder("=")] = int(d)
        if t.byteorder in ("|", "<") or (t.byteorder == "=" and _sys.byteorder == "little"):
            _DTYPE_OF_NUMPY_FAST[t] = int(d)


def _load_extension_dtypes():
    """Import ml_dtypes (which registers bfloat16 with numpy) and add its dtypes to the tables."""
    global _extension_dtypes_loaded
    if not _extension_dtypes_loaded:
        import ml_dtypes  # noqa: F401
        _extension_dtypes_loaded = True
        _add_numpy_dtypes()


_add_numpy_dtypes()


def numpy_dtype(dtype):
    """The numpy dtype of a DType (bfloat16 through ml_dtypes, imported on first use), or None
    for the dtypes numpy cannot hold (Q4, Q8_0, Q4_0, sparse)."""
    code = int(dtype)
    npdt = _NUMPY.get(code)
    if npdt is None and not _extension_dtypes_loaded and code in NUMPY_DTYPES:
        _load_extension_dtypes()
        npdt = _NUMPY.get(code)
    return npdt


def dtype_of_numpy(dt):
    """The DType code (int) of a numpy dtype in either byte order, or None."""
    dt = _np.dtype(dt).newbyteorder("=")
    code = DTYPE_OF_NUMPY.get(dt)
    # An array of an ml_dtypes dtype exists only once ml_dtypes is imported (by the caller).
    if code is None and not _extension_dtypes_loaded and "ml_dtypes" in _sys.modules:
        _load_extension_dtypes()
        code = DTYPE_OF_NUMPY.get(dt)
    return code


cdef inline uint64_t _elems(const uint32_t *dims, int ndim) noexcept:
    cdef uint64_t n = 1
    cdef int k
    for k in range(ndim):
        n *= dims[k]
        if n > ELEMS_SATURATE:
            n = ELEMS_SATURATE + 1
    return n


cdef inline bint _shape_fits(const uint32_t *dims, int ndim) noexcept:
    """Whether the product of the dimensions, each 0 counted as 1, is at most max_shape_elements."""
    cdef uint64_t n = 1
    cdef int k
    for k in range(ndim):
        if dims[k] > 1:
            if dims[k] > MAX_SHAPE_ELEMENTS // n:
                return False
            n *= dims[k]
    return True


cdef str _shape_problem(tuple shape):
    prod = 1
    for d in shape:
        prod *= d or 1
    return (f"{shape}: the product of the dimensions, each 0 counted as 1, is {prod}, more than "
            f"max_shape_elements ({MAX_SHAPE_ELEMENTS})")


# encode() and Slice.from_array refuse a 0-D tensor (decode still reads one, from an older resonant peer).
cdef str ZERO_D_REFUSED = "a 0-D tensor (empty shape): reshape it to [1]: the reference rejects an empty shape"


cdef str _dtype_name(int code):
    d = _DTYPES.get(code)
    return d.name if d is not None else f"dtype {code}"


cdef str _size_detail(int dtype, tuple shape, uint64_t n, long long need, uint64_t have, str have_name):
    count = f"more than {ELEMS_SATURATE} elements" if n > ELEMS_SATURATE else f"{n} elements"
    return f"{_dtype_name(dtype)} of shape {shape} ({count}) needs {need} bytes, {have_name} is {have}"


# --------------------------------------------------------------------------- Slice


@cython.final
@cython.freelist(32)
cdef class Slice:
    """One tensor (or text) in a frame: dtype, shape and payload bytes.

    Build one with ``Slice(dtype, shape, payload)``, ``Slice.from_array(arr)``,
    ``Slice.from_text(s)`` or ``Slice.from_json(obj)``. A decoded slice is a view of the
    received buffer: ``payload`` is a memoryview and ``numpy()`` an array over it.
    """


    def __init__(self, dtype, shape, payload):
        cdef uint64_t n
        cdef long long need
        if isinstance(dtype, int) and dtype in _DTYPES:  # fast path: a DType or its code
            code = int(dtype)
        else:
            try:
                code = int(DType(dtype))
            except (ValueError, TypeError):
                raise EncodeError("dtype", f"{dtype!r} is not a dtype ({', '.join(d.name for d in DType)})") from None
        if type(shape) is tuple and all(type(d) is int for d in shape):
            dims = shape
        else:
            try:
                dims = tuple(int(d) for d in shape)
            except (ValueError, TypeError):
                raise EncodeError("shape", f"expected a sequence of integers, got {shape!r}") from None
        if len(dims) > MAX_DIMS:
            raise EncodeError("shape", f"{len(dims)} dimensions, more than max_dims ({MAX_DIMS})")
        for k, d in enumerate(dims):
            if not 0 <= d <= 0xFFFFFFFF:
                raise EncodeError(f"shape[{k}]", f"{d} does not fit u32")
        base = _byte_buffer(payload, "payload")
        length = len(base)
        if length > 0xFFFFFFFF:  # a message holds at most max_frame_bytes; a V-Stream object may be larger
            raise EncodeError("payload", f"{length} bytes do not fit slice_len (u32)")
        self._dtype = code
        self._ndim = len(dims)
        for k, d in enumerate(dims):
            self._dims[k] = d
        if not _shape_fits(self._dims, self._ndim):
            raise EncodeError("shape", _shape_problem(dims))
        n = _elems(self._dims, self._ndim)
        need = _expected_size(self._dtype, n)
        if need >= 0 and <uint64_t>need != <uint64_t>length:
            raise EncodeError("payload", _size_detail(code, dims, n, need, length, "the payload"))
        self._base = base
        self._off = 0
        self._len = length

    @staticmethod
    def from_array(array, dtype=None):
        """A slice over a numpy array (no copy when it is C-contiguous and little-endian).

        The dtype is inferred (float16 -> F16, int8 -> I8) unless given; an explicit dtype
        that maps to numpy converts the array to it.
        """
        if dtype is None and type(array) is _np.ndarray:
            fast = _slice_of_array(array)
            if fast is not None:
                return fast
        arr = _np.asarray(array)
        if arr.ndim == 0:
            raise EncodeError("shape", ZERO_D_REFUSED)
        if dtype is None:
            code = _DTYPE_OF_NUMPY_FAST.get(arr.dtype)
            if code is not None and arr.flags.c_contiguous:  # fast path: no conversion, no copy
                try:
                    return Slice(code, arr.shape, memoryview(arr).cast("B"))
                except (TypeError, ValueError):  # a dtype the buffer protocol cannot name (bfloat16)
                    return Slice(code, arr.shape, arr.reshape(-1).view(_np.uint8))
            code = dtype_of_numpy(arr.dtype)
            if code is None:
                _load_extension_dtypes()  # (the message lists them all)
                raise EncodeError("dtype", f"no dtype for numpy {arr.dtype} (have "
                                  f"{', '.join(_DTYPES[c].name + '=' + str(t) for t, c in DTYPE_OF_NUMPY.items())}); "
                                  "pass dtype= to convert")
        else:
            try:
                code = int(DType(dtype))
            except (ValueError, TypeError):
                raise EncodeError("dtype", f"{dtype!r} is not a dtype") from None
            npdt = numpy_dtype(code)
            if npdt is None:
                raise EncodeError("dtype", f"{_DTYPES[code].name} has no numpy equivalent; build the Slice from its packed payload")
        shape = arr.shape  # (ascontiguousarray makes a 0-d array 1-d: keep the caller's shape)
        arr = _np.ascontiguousarray(arr, dtype=numpy_dtype(code))
        return Slice(code, shape, arr.reshape(-1).view(_np.uint8))

    @staticmethod
    def from_text(text):
        """An I8 slice carrying UTF-8 text (str) or raw bytes."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return Slice(DTYPE_I8, (len(data),), data)

    @staticmethod
    def from_json(obj):
        """An I8 slice carrying ``json.dumps(obj)`` as UTF-8 (the reference's encoding)."""
        return Slice.from_text(_json.dumps(obj))

    @property
    def dtype(self):
        """The element type (DType)."""
        return _DTYPES[self._dtype]

    @property
    def shape(self):
        """The dimensions (tuple of int)."""
        return tuple([self._dims[k] for k in range(self._ndim)])

    @property
    def nbytes(self):
        """Payload length in bytes."""
        return self._len

    @property
    def payload(self):
        """The payload bytes as a read-only memoryview of the frame's buffer (no copy)."""
        return memoryview(_payload_view(self))

    def tobytes(self):
        """A copy of the payload bytes."""
        return PyBytes_FromStringAndSize(<const char *>_slice_ptr(self), self._len)

    def numpy(self):
        """The payload as a numpy array of this slice's shape, viewing the buffer (no copy)."""
        cdef cnp.npy_intp dims[MAX_DIMS]
        cdef int k
        npdt = numpy_dtype(self._dtype)
        if npdt is None:
            raise UnsupportedDType("dtype", f"{_dtype_name(self._dtype)} has no numpy view; use .payload" + (", or resonant.quant.dequantize()" if self._dtype == DTYPE_Q8_0 or self._dtype == DTYPE_Q4_0 else ""))
        for k in range(self._ndim):
            dims[k] = self._dims[k]
        # Every way of making a Slice (the constructor, from_array, decode) checks the shape
        # against max_shape_elements, so numpy accepts it; checked again here, where numpy
        # would raise its own ValueError.
        if not _shape_fits(self._dims, self._ndim):
            raise LimitExceeded("shape", _shape_problem(self.shape))
        # A read-only array over the payload bytes whose base is this slice (which keeps the
        # received buffer alive); numpy works out contiguity and alignment itself.
        Py_INCREF(npdt)  # PyArray_NewFromDescr steals a reference to the descr
        arr = PyArray_NewFromDescr(<PyTypeObject *>cnp.ndarray, <cnp.dtype>npdt, self._ndim, dims, NULL,
                                       <void *>_slice_ptr(self), 0, None)
        Py_INCREF(self)  # PyArray_SetBaseObject steals a reference to the base
        cnp.PyArray_SetBaseObject(<cnp.ndarray>arr, self)
        return arr

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        if copy:
            arr = arr.copy()
        return arr if dtype is None else arr.astype(dtype, copy=bool(copy))

    def text(self):
        """The payload decoded as UTF-8."""
        try:
            return self.payload.tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("payload", f"not valid UTF-8: {exc.reason} at payload byte {exc.start}") from None

    def json(self):
        """The payload parsed as JSON."""
        try:
            return _json.loads(self.text())
        except ValueError as exc:
            if isinstance(exc, DecodeError):
                raise
            raise DecodeError("payload", f"not valid JSON: {exc}") from None
        except RecursionError:
            raise DecodeError("payload", "not valid JSON: nested too deeply to parse") from None

    def __eq__(self, other):
        if not isinstance(other, Slice):
            return NotImplemented
        cdef Slice o = <Slice>other
        if self._dtype != o._dtype or self._ndim != o._ndim or self._len != o._len:
            return False
        if memcmp(self._dims, o._dims, self._ndim * sizeof(uint32_t)) != 0:
            return False
        return memcmp(_slice_ptr(self), _slice_ptr(o), self._len) == 0

    __hash__ = None

    def __repr__(self):
        return f"Slice({_dtype_name(self._dtype)}, shape={self.shape}, nbytes={self._len})"


@cython.final
@cython.freelist(32)
cdef class _PayloadView:
    """Exports one slice's payload bytes, read-only; an export keeps the slice (and so the
    received buffer) alive for as long as any view of it exists."""


    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, <void *>_slice_ptr(self._slice), self._slice._len, 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef inline _PayloadView _payload_view(Slice s):
    cdef _PayloadView v = _PayloadView.__new__(_PayloadView)
    v._slice = s
    return v


cdef object _byte_buffer(object payload, str path):
    """bytes stay bytes; any other buffer becomes a 1-D unsigned-byte memoryview."""
    if type(payload) is bytes:
        return payload
    try:
        mv = memoryview(payload)
    except TypeError:
        raise EncodeError(path, f"expected a bytes-like object, got {type(payload).__name__}") from None
    if not mv.c_contiguous:
        raise EncodeError(path, "the buffer must be C-contiguous")
    if mv.format != "B" or mv.ndim != 1:
        try:
            mv = mv.cast("B")
        except (TypeError, ValueError):
            mv = memoryview(_np.frombuffer(mv, dtype=_np.uint8))
    return mv


cdef inline const unsigned char *_slice_ptr(Slice s):
    cdef object b = s._base
    if type(b) is bytes:
        return <const unsigned char *>PyBytes_AS_STRING(b) + s._off
    if type(b) is memoryview:
        return <const unsigned char *>PyMemoryView_GET_BUFFER(b).buf + s._off
    return <const unsigned char *>cnp.PyArray_DATA(<cnp.ndarray>b) + s._off  # _slice_of_array's
