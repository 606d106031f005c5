# Declarations of resonant._codec (hand-written): the compile-time constants, the C classes
# and their attributes, and the interface SessionCore expects of its Python subclass.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

include "_gen_consts.pxd"       # generated: every width, offset, limit and enum value of the spec

cdef enum:
    NOGIL_BYTES = 16384            # copies and CRCs this large release the GIL
    ROLE_CHECK_SLOTS = 8           # slices whose dtype/rank the layout check looks at
    # a one-slice frame (a V-Stream chunk): where its suffix fields, its slice and its payload start
    CHUNK_SUFFIX = PREFIX_SIZE + SLICE_LEN_BYTES
    CHUNK_SLICE = CHUNK_SUFFIX + SUFFIX_SIZE
    CHUNK_HEAD = CHUNK_SLICE + SL_DIMS + DIM_BYTES   # its payload is one-dimensional


cdef class Xxh3:
    cdef void *_st
    cdef object _py
    cdef int _feed(self, const unsigned char *p, Py_ssize_t n) except -1


cdef class Slice:
    cdef uint8_t _dtype
    cdef uint8_t _ndim
    cdef uint32_t _dims[MAX_DIMS]
    cdef object _base          # bytes, a 1-D unsigned-byte memoryview, or a C-contiguous ndarray (_slice_of_array)
    cdef Py_ssize_t _off
    cdef Py_ssize_t _len


cdef class _PayloadView:
    cdef Slice _slice


include "_gen_frame.pxd"        # generated: Frame's header-field attributes


cdef class MessageReceived:
    cdef readonly object frame
    cdef readonly object document


cdef class SessionCore:
    # The per-message state, kept in C slots (the Python subclass, resonant.session.Session, owns it).
    cdef public object state
    cdef public object _closed          # State.CLOSED
    cdef public object _direct_state    # the state _direct was worked out for (_chunks_direct)
    cdef public bint _direct            # whether that state takes data frames as they are
    cdef public object _decoder
    cdef public object _encoder
    cdef public object _space           # the expected space hash, or None
    cdef public dict stats
    cdef public list _out               # encoded frames waiting to be sent
    cdef public dict _seq               # stream_id -> next frame_seq
    cdef public object records          # the RecordReader (TCP)
    cdef public Py_ssize_t _limit       # the largest frame this side may send
    cdef public bint _reduce            # whether sent tensors may need a dtype the peer agreed to
    cdef public bint _fast              # the fast-path switch (RESONANT_PURE=1: False); settable for tests

    cdef inline bint _takes_data(self) except -1

    # The interface: the general paths the C paths hand over to. The Python subclass overrides
    # each; the defaults here raise NotImplementedError.
    cpdef bint _chunks_direct(self) except -1
    cpdef list _frame(self, data, double now, bint copy)
    cpdef list _chunk_or_frame(self, data, double now)
    cpdef list _records(self, double now, read, data)
    cpdef object _send(self, frame, double now, bint keep_seq)


cdef class ChunkSink:
    cdef public object buffer
    cdef readonly bytearray have         # the chunk bitmap
    cdef public Py_ssize_t have_count
    cdef public Py_ssize_t hashed
    cdef public Xxh3 hasher
    cdef public bint streaming
    cdef public double last
    cdef public double progress          # when the last new chunk was committed (or the stream opened)
    cdef public object object_left       # numpy int64, chunks still missing per object
    cdef public object tail              # the TAIL document once it came (None before)
    cdef public int completed            # the object the last fast placement completed, or -1
    cdef public Py_ssize_t top           # one more than the highest chunk index received (0: none)
    cdef public double top_at            # when chunk top - 1 arrived
    cdef public Py_ssize_t skipped       # chunk indices jumped over when a chunk arrived above top
    cdef public Py_ssize_t have_bytes    # payload bytes of the chunks received
    cdef public Py_ssize_t last_chunk    # the chunk the last commit placed, or -1 (forward error correction's cue)
    cdef public bint fec_watch           # the stream holds parity chunks: place_records stops after each chunk
    cdef public list ready               # each object's ObjectReady event (resonant.reassembler's _Stream sets it)
    cdef unsigned char[::1] _dst
    cdef unsigned char[::1] _bits        # a view of `have` (which it keeps from being resized)
    cdef const int64_t[::1] _first
    cdef const int64_t[::1] _offset
    cdef const int64_t[::1] _nbytes
    cdef int64_t[::1] _left
    cdef const uint8_t[::1] _want
    cdef Py_ssize_t _chunk_bytes, _nchunks, _nobj

    cdef Py_ssize_t _byte_at(self, Py_ssize_t k, bint end) noexcept
    cdef Py_ssize_t _object_of(self, Py_ssize_t k) noexcept
