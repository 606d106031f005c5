# --------------------------------------------------------------------------- V-Stream layouts
# The per-object work of a V-Stream's HEAD, on both sides, in one C loop: where each object's bytes
# and chunks sit (resonant.stream_layout.StreamLayout.build, for the sender's objects and for a
# received HEAD's), the receiver's checks of each object (its dtype, shape and size), and the
# numpy views of a received stream's objects. A KV cache is 60 objects; a HEAD may list max_objects.

# The most bytes a layout's objects may add up to (no stream comes near: a receiver's
# max_stream_bytes refuses far less); it keeps offsets and chunk counts in range of a C integer.
cdef Py_ssize_t LAYOUT_BYTES_MAX = (<Py_ssize_t>1) << 62

# The DType member of each code (None: not a dtype).
cdef list _DTYPE_MEMBER = [None] * 256
for _d in DType:
    _DTYPE_MEMBER[int(_d)] = _d


@cython.final
cdef class StreamObject:
    """One tensor of a stream and where its bytes sit (immutable)."""

    cdef readonly Py_ssize_t index
    cdef readonly object dtype
    cdef readonly tuple shape
    cdef readonly Py_ssize_t nbytes
    cdef readonly Py_ssize_t offset       # byte offset in the stream (objects laid end to end)
    cdef readonly Py_ssize_t first_chunk  # index of its first chunk
    cdef readonly Py_ssize_t chunks       # number of its chunks
    cdef readonly object name
    cdef readonly object layer

    def __init__(self, Py_ssize_t index, dtype, shape, Py_ssize_t nbytes, Py_ssize_t offset, Py_ssize_t first_chunk,
                 Py_ssize_t chunks, name=None, layer=None):
        self.index, self.dtype, self.shape, self.nbytes = index, DType(dtype), tuple(shape), nbytes
        self.offset, self.first_chunk, self.chunks, self.name, self.layer = offset, first_chunk, chunks, name, layer

    def _fields(self):
        return (self.index, self.dtype, self.shape, self.nbytes, self.offset, self.first_chunk, self.chunks,
                self.name, self.layer)

    def __eq__(self, other):
        if type(other) is not StreamObject:
            return NotImplemented
        return self._fields() == (<StreamObject>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return ("StreamObject(index={!r}, dtype={!r}, shape={!r}, nbytes={!r}, offset={!r}, first_chunk={!r}, "
                "chunks={!r}, name={!r}, layer={!r})").format(*self._fields())


def layout_objects(Py_ssize_t chunk_bytes, list dtypes, list shapes, list nbytes, list names=None,
                   list layers=None):
    """The objects of a stream laid end to end, each cut into chunks of chunk_bytes (an empty
    object takes one empty chunk): (tuple of StreamObject, total bytes). Per object, a HEAD's
    rules are checked (the sender's objects pass them by construction): a known dtype, a shape
    within max_shape_elements (each 0 counted as 1), nbytes the dtype's size for that shape, and
    chunk_bytes a multiple of the dtype's element width; HandshakeError (path head.objects[i]...)
    otherwise. dtypes: int codes; shapes: sequences of non-negative ints (a HEAD's were checked
    by its schema); names, layers: None or one per object."""
    cdef Py_ssize_t n = len(dtypes), i, offset = 0, first = 0, size, count
    cdef uint64_t elems, fit, d
    cdef long long need
    cdef int width
    cdef object code, shape, dim
    cdef StreamObject o
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    if len(shapes) != n or len(nbytes) != n or (names is not None and len(names) != n) or (
            layers is not None and len(layers) != n):
        raise ValueError("one dtype, shape, nbytes (and name, layer) per object")
    out = PyTuple_New(n)
    for i in range(n):
        code = dtypes[i]
        if not 0 <= code < 256 or _DTYPE_MEMBER[code] is None:
            raise HandshakeError(f"head.objects[{i}].dtype", f"{code} is not a dtype")
        shape = tuple(shapes[i])
        elems = fit = 1
        for dim in shape:
            d = <uint64_t>dim
            elems *= d
            if elems > ELEMS_SATURATE:
                elems = ELEMS_SATURATE + 1
            if d > 1:
                fit = fit * d if d <= MAX_SHAPE_ELEMENTS // fit else MAX_SHAPE_ELEMENTS + 1
        if fit > MAX_SHAPE_ELEMENTS:  # (as for a slice's shape)
            raise HandshakeError(f"head.objects[{i}].shape", f"{shape}: the product of the dimensions, each 0 "
                                 f"counted as 1, is more than max_shape_elements ({MAX_SHAPE_ELEMENTS})")
        dim = nbytes[i]
        if not 0 <= dim <= LAYOUT_BYTES_MAX - offset:  # (an opaque dtype's size is free: sums kept in range)
            if dim < 0:
                raise ValueError(f"objects[{i}]: nbytes must be >= 0")
            raise HandshakeError(f"head.objects[{i}].nbytes", f"{dim}: the objects would add up to more than "
                                 f"{LAYOUT_BYTES_MAX} bytes, more than any stream can hold")
        size = dim
        need = _expected_size(<uint8_t>code, elems)  # the dtype's size rule (-1: any size)
        if need >= 0 and size != need:
            raise HandshakeError(f"head.objects[{i}].nbytes", f"{size}, but {_DTYPE_MEMBER[code].name} of shape "
                                 f"{shape} is {need} bytes")
        width = _element_bytes(<uint8_t>code)
        if width and chunk_bytes % width:
            raise HandshakeError("head.chunk_bytes", f"{chunk_bytes} is not a multiple of "
                                 f"{_DTYPE_MEMBER[code].name}'s {width}-byte elements")
        count = (size + chunk_bytes - 1) // chunk_bytes if size else 1
        o = StreamObject.__new__(StreamObject)
        o.index, o.dtype, o.shape, o.nbytes = i, _DTYPE_MEMBER[code], shape, size
        o.offset, o.first_chunk, o.chunks = offset, first, count
        o.name = None if names is None else names[i]
        o.layer = None if layers is None else layers[i]
        Py_INCREF(o)  # PyTuple_SET_ITEM steals a reference
        PyTuple_SET_ITEM(out, i, o)
        offset += size
        first += count
    return out, offset


@cython.final
cdef class ObjectReady:
    """Every chunk of one object has arrived (each checked by its CRC; the stream hash is checked
    at StreamComplete). `array` is the object, a view of the stream's one output buffer.

    By default (StreamLimits(release="arrival")) it comes as soon as the object's chunks are in,
    before the TAIL's hash is checked: a CRC only catches accidents, so on frames that are not
    encrypted (no Codec with a key) a forged chunk is handed out as it came, and the stream may
    still fail (hash_mismatch, or never complete). With release="verified", every ObjectReady of a
    stream comes at once when its hash has matched, just before StreamComplete, and never for a
    stream that fails. (Unencrypted, a forger who also sends a TAIL with the hash of the forged
    bytes passes that check too: only a Codec with a key authenticates the sender.)"""

    cdef readonly object stream_id
    cdef readonly object index
    cdef readonly object name
    cdef readonly object layer
    cdef readonly object array

    def __init__(self, stream_id, index, name, layer, array):
        self.stream_id, self.index, self.name, self.layer, self.array = stream_id, index, name, layer, array

    def __repr__(self):
        return (f"ObjectReady(stream_id={self.stream_id!r}, index={self.index!r}, name={self.name!r}, "
                f"layer={self.layer!r}, array={self.array!r})")


# The numpy dtype of each DType code's views (None: raw bytes), looked up on first use (bfloat16's
# loads ml_dtypes then).
cdef object _UNSEEN = object()
cdef list _VIEW_DTYPE = [_UNSEEN] * 256


def object_views(buffer, tuple objects, stream_id):
    """The received objects as views of the stream's buffer (a writable, C-contiguous uint8
    numpy array of the layout's total bytes): one array per object, of its numpy dtype
    (numpy_dtype()) and shape, or its raw bytes (a uint8 slice) for a dtype numpy cannot hold;
    and the ObjectReady event of each (made here, handed out when the object is in).
    Returns (arrays, events)."""
    cdef ObjectReady ev
    cdef cnp.ndarray buf = buffer
    cdef StreamObject o
    cdef Py_ssize_t i, end = 0
    cdef unsigned char *base = <unsigned char *>cnp.PyArray_DATA(buf)
    if buf.ndim != 1 or buf.dtype.itemsize != 1 or not buf.flags.c_contiguous or not buf.flags.writeable:
        raise ValueError("the buffer must be a writable, C-contiguous uint8 array")
    for i in range(len(objects)):
        o = <StreamObject?>objects[i]
        if o.offset < 0 or o.nbytes < 0:  # (a StreamObject made by hand: nothing of it is trusted)
            raise ValueError(f"objects[{o.index}]: offset {o.offset}, nbytes {o.nbytes}")
        end = o.offset + o.nbytes if o.offset + o.nbytes > end else end
    if end > buf.shape[0]:
        raise ValueError(f"the objects need {end} bytes, the buffer is {buf.shape[0]}")
    out, events = [], []
    for i in range(len(objects)):
        o = <StreamObject?>objects[i]
        npdt = _VIEW_DTYPE[o.dtype]
        if npdt is _UNSEEN:
            npdt = _VIEW_DTYPE[o.dtype] = numpy_dtype(o.dtype)
        if npdt is None:  # raw bytes (a blocked or opaque dtype)
            arr = buf[o.offset:o.offset + o.nbytes]
        else:
            arr = _view(buf, o, base, npdt)
        out.append(arr)
        ev = ObjectReady.__new__(ObjectReady)
        ev.stream_id, ev.index, ev.name, ev.layer, ev.array = stream_id, o.index, o.name, o.layer, arr
        events.append(ev)
    return out, events


cdef object _view(cnp.ndarray buf, StreamObject o, unsigned char *base, object npdt):
    """Object o's array: a view of buf of its numpy dtype npdt and shape."""
    cdef cnp.npy_intp dims[64]
    cdef Py_ssize_t k, ndim
    cdef Py_ssize_t size = (<cnp.dtype>npdt).itemsize
    cdef bint negative = False, zero = False, past = False
    ndim = len(o.shape)
    if ndim > 64:  # (numpy's limit; a HEAD's shapes have at most max_list_items, 64)
        raise ValueError(f"objects[{o.index}]: {ndim} dimensions, numpy holds at most 64")
    for k in range(ndim):
        dims[k] = o.shape[k]
        if dims[k] <= 0:
            negative = negative or dims[k] < 0
            zero = True
        elif not past:
            if size > o.nbytes // dims[k]:  # (o.nbytes >= 0: checked by the caller; no overflow)
                past = True
            else:
                size *= dims[k]
    # (a HEAD's objects match by its size rule; one made by hand may not)
    if negative or (o.nbytes != 0 if zero else past or size != o.nbytes):
        raise ValueError(f"objects[{o.index}]: shape {o.shape} does not fit its {o.nbytes} bytes")
    Py_INCREF(npdt)  # PyArray_NewFromDescr steals a reference to the descr
    arr = PyArray_NewFromDescr(<PyTypeObject *>cnp.ndarray, <cnp.dtype>npdt, <int>ndim, dims, NULL,
                               <void *>(base + o.offset), cnp.NPY_ARRAY_WRITEABLE, None)
    Py_INCREF(buf)  # PyArray_SetBaseObject steals a reference to the base
    cnp.PyArray_SetBaseObject(<cnp.ndarray>arr, buf)
    return arr


cdef bint _LITTLE = _sys.byteorder == "little"


def stream_sources(list objects, general):
    """A StreamSender's objects as four lists (dtypes, shapes, nbytes, payloads), each payload a
    zero-copy unsigned-byte memoryview of its object. The common case, an exact, C-contiguous,
    non-empty ndarray of float16, int8 or float32 as the wire holds them (little-endian), is taken
    in C (a fast path); any other object goes through general(obj, i) -> (dtype, shape, nbytes,
    payload), the Python path, which also converts what needs it and raises the errors."""
    cdef Py_ssize_t i, n = len(objects)
    cdef cnp.ndarray a
    cdef int t
    dtypes, shapes, nbytes, payloads = [None] * n, [None] * n, [None] * n, [None] * n
    for i in range(n):
        obj = objects[i]
        code = None
        if FAST_PATHS and _LITTLE and type(obj) is cnp.ndarray:
            a = <cnp.ndarray>obj
            t = cnp.PyArray_TYPE(a)
            if (cnp.PyArray_NDIM(a) and cnp.PyArray_SIZE(a) and cnp.PyArray_IS_C_CONTIGUOUS(a)
                    and cnp.PyArray_ISNOTSWAPPED(a)):
                code = (_DTYPE_MEMBER[DTYPE_F32] if t == cnp.NPY_FLOAT32 else _DTYPE_MEMBER[DTYPE_F16]
                        if t == cnp.NPY_FLOAT16 else _DTYPE_MEMBER[DTYPE_I8] if t == cnp.NPY_INT8 else None)
        if code is None:
            dtypes[i], shapes[i], nbytes[i], payloads[i] = general(obj, i)
            continue
        dtypes[i], shapes[i], nbytes[i] = code, obj.shape, cnp.PyArray_NBYTES(a)
        payloads[i] = memoryview(a).cast("B")
        _fp_hits[<int>FP_STREAM_SOURCE] += 1
    return dtypes, shapes, nbytes, payloads


def objects_pass(list items, tuple columns, Py_ssize_t max_list_items, Py_ssize_t max_string_chars):
    """Whether every item of a handshake document's list of objects (a HEAD's objects) surely
    passes its schema, in one C pass (a fast path): each a dict whose keys are all among the
    columns, with the required ones, each value of its column's kind. columns: (name, kind, top,
    required) per field, kind 0 an integer in 0..top, 1 a list of at most max_list_items such
    integers, 2 a string of at most max_string_chars characters. False: unsure (an "x-" key, a
    failure, or RESONANT_PURE): the caller checks item by item, which finds the error and its path."""
    cdef Py_ssize_t i, j, k, matched, ncol = len(columns)
    cdef int kind
    cdef unsigned long long top
    cdef int kinds[64]
    cdef unsigned long long tops[64]
    cdef bint required[64]
    if not FAST_PATHS or ncol > 64:
        return False
    names = [c[0] for c in columns]
    for j in range(ncol):
        _, kinds[j], tops[j], required[j] = columns[j]
    for i in range(len(items)):
        item = items[i]
        if type(item) is not dict:
            return False
        matched = 0
        for j in range(ncol):
            kind, top = kinds[j], tops[j]
            v = (<dict>item).get(names[j], _UNSEEN)
            if v is _UNSEEN:
                if required[j]:
                    return False
                continue
            matched += 1
            if kind == 0:
                if not _int_in(v, top):
                    return False
            elif kind == 1:
                if type(v) is not list or len(<list>v) > max_list_items:
                    return False
                for k in range(len(<list>v)):
                    if not _int_in((<list>v)[k], top):
                        return False
            elif type(v) is not str or len(<str>v) > max_string_chars:
                return False
        if matched != len(<dict>item):
            return False
    _fp_hits[<int>FP_OBJECTS_PASS] += 1
    return True


cdef inline bint _int_in(object v, unsigned long long top):
    """v is an int (not a bool) in 0..top."""
    cdef unsigned long long x
    if type(v) is not int:
        return False
    try:
        x = PyLong_AsUnsignedLongLong(v)
    except OverflowError:  # negative, or above u64
        return False
    return x <= top


def layout_of_items(Py_ssize_t chunk_bytes, list items):
    """layout_objects for a HEAD's objects as its document lists them (dicts with dtype, shape,
    nbytes and optional name and layer, checked by the schema first)."""
    cdef Py_ssize_t i, n = len(items)
    cdef dict d
    dtypes, shapes, nbytes, names, layers = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
    for i in range(n):
        d = items[i]
        dtypes[i], shapes[i], nbytes[i] = d["dtype"], d["shape"], d["nbytes"]
        names[i], layers[i] = d.get("name"), d.get("layer")
    return layout_objects(chunk_bytes, dtypes, shapes, nbytes, names, layers)


def object_docs(tuple objects):
    """Each object's entry of a HEAD document: {name, layer (when set), dtype, shape, nbytes}, in
    that order."""
    cdef StreamObject o
    cdef dict d
    out = []
    for x in objects:
        o = <StreamObject?>x
        d = {}
        if o.name is not None:
            d["name"] = o.name
        if o.layer is not None:
            d["layer"] = o.layer
        d["dtype"] = int(o.dtype)
        d["shape"] = list(o.shape)
        d["nbytes"] = o.nbytes
        out.append(d)
    return out


def objects_charge(tuple objects, Py_ssize_t per_object, Py_ssize_t per_dim):
    """The memory charged for a stream's objects: per_object each, plus the characters of its
    name, plus per_dim per dimension of its shape."""
    cdef StreamObject o
    cdef Py_ssize_t total = 0
    for x in objects:
        o = <StreamObject?>x
        total += per_object + per_dim * len(o.shape) + (len(o.name) if o.name is not None else 0)
    return total


def has_digit_run(const unsigned char[::1] data, Py_ssize_t n):
    """Whether data holds n or more ASCII digits in a row (handshake.loads: orjson reads an integer
    outside 64 bits, 19 digits or more, as a float; such text goes to json.loads)."""
    cdef Py_ssize_t i, run = 0
    if n < 1:
        return True
    for i in range(data.shape[0]):
        if 48 <= data[i] <= 57:
            run += 1
            if run >= n:
                return True
        else:
            run = 0
    return False
