# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: auto_pickle=False, embedsignature=True
"""The V-Frame codec: message classes, decode() and encode(), the Session's and the V-Stream's
C paths, and the checksum, hash and AEAD backends.

Decoding is zero-copy: a decoded slice keeps a reference to the input buffer and its
payload, numpy() and payload views point into it. Every length and count is checked
against the input size and the named limits before any pointer read or allocation.

This module is hand-written and made of includes, one per concern (asyncpg's pgproto is the
model). The files named _gen_* are generated from schema/ by `python -m codegen` and hold
what the spec decides; the others are the hand-written runtime. Declarations: _codec.pxd.
"""

cimport cython
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memcmp, memset
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.long cimport PyLong_AsUnsignedLongLong

cimport numpy as cnp
from cpython.object cimport PyTypeObject

import json as _json
import sys as _sys

import numpy as _np

cdef extern from "Python.h":
    Py_buffer *PyMemoryView_GET_BUFFER(object mview)
    int PyBuffer_FillInfo(Py_buffer *view, object exporter, void *buf, Py_ssize_t len, int readonly, int flags) except -1
    object PyMemoryView_FromMemory(char *mem, Py_ssize_t size, int flags)
    int PyBUF_READ

cdef extern from "numpy/arrayobject.h":
    object PyArray_NewFromDescr(PyTypeObject *subtype, cnp.dtype descr, int nd, cnp.npy_intp *dims,
                                cnp.npy_intp *strides, void *data, int flags, object obj)

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define RZ_LE16(x) __builtin_bswap16(x)
    #define RZ_LE32(x) __builtin_bswap32(x)
    #define RZ_LE64(x) __builtin_bswap64(x)
    #else
    #define RZ_LE16(x) (x)
    #define RZ_LE32(x) (x)
    #define RZ_LE64(x) (x)
    #endif
    static inline uint8_t rz_ld_u8(const unsigned char *p) { return p[0]; }
    static inline uint16_t rz_ld_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return RZ_LE16(v); }
    static inline uint32_t rz_ld_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return RZ_LE32(v); }
    static inline uint64_t rz_ld_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return RZ_LE64(v); }
    static inline void rz_st_u8(unsigned char *p, uint8_t v) { p[0] = v; }
    static inline void rz_st_u16(unsigned char *p, uint16_t v) { v = RZ_LE16(v); memcpy(p, &v, 2); }
    static inline void rz_st_u32(unsigned char *p, uint32_t v) { v = RZ_LE32(v); memcpy(p, &v, 4); }
    static inline void rz_st_u64(unsigned char *p, uint64_t v) { v = RZ_LE64(v); memcpy(p, &v, 8); }
    """
    uint8_t rz_ld_u8(const unsigned char *p) noexcept nogil
    uint16_t rz_ld_u16(const unsigned char *p) noexcept nogil
    uint32_t rz_ld_u32(const unsigned char *p) noexcept nogil
    uint64_t rz_ld_u64(const unsigned char *p) noexcept nogil
    void rz_st_u8(unsigned char *p, uint8_t v) noexcept nogil
    void rz_st_u16(unsigned char *p, uint16_t v) noexcept nogil
    void rz_st_u32(unsigned char *p, uint32_t v) noexcept nogil
    void rz_st_u64(unsigned char *p, uint64_t v) noexcept nogil

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flag)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

cnp.import_array()

import os as _os

# --------------------------------------------------------------------------- the fast-path switch
# RESONANT_PURE=1 in the environment, read once here at import, turns off every C fast path (the
# list below): the general paths then do everything, with the same results. CI runs the suite both
# ways. Session._fast (per session, settable for tests) starts from it.
cdef bint FAST_PATHS = _os.environ.get("RESONANT_PURE", "").strip() in ("", "0")

# The fast paths, each counted when taken (fast_path_hits(), for the test that the switch works).
cdef enum FastPath:
    FP_MESSAGE_EVENT = 0   # a data message received in one C call (message_event)
    FP_PLACE_CHUNK         # a plain chunk placed by place_chunk (UDP, one frame)
    FP_PLACE_RECORDS       # chunks placed by place_records (TCP, a run of records)
    FP_QUEUE_NUMBERED      # Session.send's plain frame numbered, encoded and queued in one call
    FP_ENCODE_CHUNK        # StreamSender: a chunk frame written straight from its source
    FP_ENCODE_CHUNK_PARTS  # StreamSender.records: a chunk's head and CRC around a view of its source
    FP_INIT_MESSAGE        # a message built from arrays/Slices without the layout search
    FP_SLICE_OF_ARRAY      # an exact C-contiguous ndarray viewed as a Slice in C
    FP_STREAM_SOURCE       # StreamSender: an exact C-contiguous ndarray taken as a stream object in C
    FP_OBJECTS_PASS        # a handshake document's list of objects (a HEAD's) checked in one C pass
    FP_COUNT

_FAST_PATH_NAMES = ("message_event", "place_chunk", "place_records", "queue_numbered", "encode_chunk",
                    "encode_chunk_parts", "init_message", "slice_of_array", "stream_source",
                    "objects_pass")
cdef Py_ssize_t _fp_hits[<int>FP_COUNT]


def fast_paths():
    """The C fast paths in use (a tuple of names), empty when RESONANT_PURE=1 was set at import:
    then the general paths do everything (same results, slower). The RecordReader's one-record
    shortcut and the Session's (Session._fast) follow the same switch."""
    return _FAST_PATH_NAMES if FAST_PATHS else ()


def fast_path_hits():
    """How many times each fast path was taken in this process (for tests: {name: count})."""
    return {name: _fp_hits[i] for i, name in enumerate(_FAST_PATH_NAMES)}

# An element count above this cannot fit any payload under max_frame_bytes; counts are
# saturated here so that a product of eight u32 dimensions never overflows.
cdef uint64_t ELEMS_SATURATE = (<uint64_t>1) << 40

include "_gen_consts.pxi"       # generated: enums, error classes, field tables
include "_backends.pxi"         # CRC-32, xxh3_64, AEAD
include "_gen_spec.pxi"         # generated: size rules, enum membership, roles, layouts, header fields
include "_slice.pxi"            # lookup tables, shapes, Slice
include "_frame.pxi"            # building and checking messages
include "_gen_messages.pxi"     # generated: Frame and the message classes
include "_decode.pxi"           # decode()
include "_encode.pxi"           # encode() and Codec's pieces
include "_session_core.pxi"     # the Session's C paths
include "_layout.pxi"            # V-Stream layouts: objects, checks, views
include "_stream_kernels.pxi"   # the V-Stream's C paths
include "_quant.pxi"            # Q8_0 / Q4_0 kernels
