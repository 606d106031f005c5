# Hand-written, included by resonant/_codec.pyx: the CRC-32, xxh3_64 and AEAD backends, each
# chosen at import and checked against a known answer before it is used (docs/backends.md).
#
# Routes, and what each depends on:
#   CRC-32   ISA-L's crc32_gzip_refl, looked up with dlsym in isal's extension module (isal
#            publishes no C API: a contract with its internals); then isal's, zlib-ng's or
#            zlib's Python crc32 (one Python call per buffer).
#   xxh3_64  xxHash's C source, vendored under resonant/vendor/xxhash and compiled in (with
#            its x86 dispatcher on x86-64): no dependency at all; python-xxhash if that fails.
#   AEAD     libsodium's XChaCha20-Poly1305 through PyNaCl's cffi `lib` object
#            (ffi.addressof, cffi's documented API); else nacl.bindings (one more copy).
# A route that fails (a symbol missing after an upgrade, a wrong known answer) never raises:
# the next one is used, a warning is logged on the "resonant" logger, and
# crc32_backend(route=True) / xxh3_backend(route=True) / aead_backend(route=True) say which
# route is in use and why. RESONANT_SIMULATE_MISSING=name,name,... (read at import) makes the
# lookups of those names fail, to exercise the fallbacks (tests/test_backends.py).

import logging as _logging
import os as _os

_backend_log = _logging.getLogger("resonant")
_SIMULATED_MISSING = frozenset(s.strip() for s in _os.environ.get("RESONANT_SIMULATE_MISSING", "").split(",") if s.strip())


def _missing_set(missing):
    return _SIMULATED_MISSING if missing is None else frozenset(missing)


def _dist_version(str dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001  (a report, never an error)
        return "?"


def _fell_back(str what, str reason, bint quiet):
    if not quiet:
        _backend_log.warning("resonant: %s fast path unavailable (%s); using the fallback", what, reason)

# --------------------------------------------------------------------------- CRC-32

ctypedef uint32_t (*crc_fn_t)(uint32_t, const unsigned char *, uint64_t) noexcept nogil

include "_bulk.pxi"

cdef crc_fn_t _crc_c = NULL
cdef object _crc_py = None
cdef str _crc_name = "none"
cdef str _crc_route = ""


cdef uint32_t _crc32(const unsigned char *p, Py_ssize_t n) except? 0:
    cdef uint32_t v
    if _crc_c != NULL:
        if n < NOGIL_BYTES:
            return _crc_c(0, p, <uint64_t>n)
        with nogil:  # large buffers: let another thread run meanwhile
            v = _crc_c(0, p, <uint64_t>n)
        return v
    return <uint32_t>_crc_py(PyMemoryView_FromMemory(<char *>p, n, PyBUF_READ))


cdef bint _fold_agrees(crc_fn_t reference):
    """The VPCLMULQDQ fold gives ISA-L's answer on every length 0..1,100 and some initial values."""
    data = bytes((i * 167 + (i >> 8) * 13) & 0xFF for i in range(1100))
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef uint64_t n
    cdef uint32_t init
    for init in (0, 0xFFFFFFFFu, 0x12345678u):
        for n in range(1101):
            if rz_crc32_fold(init, p, n) != reference(init, p, n):
                return False
    return True


def _select_crc(str prefer=None, missing=None):
    """Pick the CRC-32 implementation; returns its name.

    The preferred backend calls ISA-L's crc32_gzip_refl through a C function pointer
    (no Python call per frame). ISA-L reaches us inside the `isal` wheel, which does not
    publish a C API, so the symbol is looked up in its already-loaded extension module
    and checked against a known answer. On x86-64 CPUs with AVX2 and VPCLMULQDQ the bulk of
    each buffer is folded 256 bits at a time first (_bulk.pxi), ISA-L finishing the
    remainder; that path is checked against ISA-L on every length up to 1,100 bytes before
    it is used. When ISA-L's symbol is not found (or gives a wrong answer), isal's or
    zlib-ng's Python function is used, and the stdlib's zlib.crc32 as a last resort; a
    warning says why. `missing`: symbol names treated as absent (tests; default: the
    RESONANT_SIMULATE_MISSING environment variable).
    """
    global _crc_c, _crc_py, _crc_name, _crc_route, rz_fold_tail
    cdef void *handle
    cdef crc_fn_t fn
    missing = _missing_set(missing)
    _crc_c = NULL
    reason = None
    if prefer in (None, "isal-c", "isal-c+vpclmulqdq"):
        try:
            _isal_zlib = __import__("isal.isal_zlib", fromlist=["crc32"])
        except ImportError:
            reason = "isal is not importable"
        else:
            handle = dlopen(_isal_zlib.__file__.encode(), RTLD_NOW | RTLD_NOLOAD)
            fn = NULL
            if handle == NULL:
                reason = "isal.isal_zlib's shared object cannot be opened"
            elif "crc32_gzip_refl" in missing:
                reason = "symbol crc32_gzip_refl missing from isal.isal_zlib (simulated)"
            else:
                fn = <crc_fn_t>dlsym(handle, b"crc32_gzip_refl")
                if fn == NULL:
                    reason = "symbol crc32_gzip_refl missing from isal.isal_zlib"
                elif fn(0, <const unsigned char *>b"123456789", 9) != 0xCBF43926u:
                    reason = "crc32_gzip_refl in isal.isal_zlib gives a wrong known answer"
                    fn = NULL
            if fn != NULL:
                _crc_c = fn
                _crc_py = None
                _crc_name = "isal-c"
                _crc_route = "dlsym crc32_gzip_refl in isal.isal_zlib"
                if prefer != "isal-c" and rz_fold_supported():
                    rz_fold_tail = <rz_crc_fn>fn
                    if _fold_agrees(fn):
                        _crc_c = <crc_fn_t>rz_crc32_fold
                        _crc_name = "isal-c+vpclmulqdq"
                        _crc_route = "VPCLMULQDQ folds, then " + _crc_route
                if prefer in (None, _crc_name):
                    return _crc_name
                _crc_c = NULL
                reason = f"{prefer} is not available on this CPU"
        if reason is not None and prefer is None:
            _fell_back("CRC-32", reason, False)
    for name, modname in (("isal", "isal.isal_zlib"), ("zlib-ng", "zlib_ng.zlib_ng"), ("zlib", "zlib")):
        if prefer not in (None, "isal-c", name):
            continue
        try:
            mod = __import__(modname, fromlist=["crc32"])
        except ImportError:
            if reason is None:
                reason = f"{modname} is not importable"
            continue
        _crc_py = mod.crc32
        _crc_name = name
        _crc_route = f"python {modname}.crc32" + (f" (fallback: {reason})" if reason else " (chosen)")
        return _crc_name
    _select_crc(missing=missing)  # leave a working backend behind
    raise ValueError(f"no CRC-32 backend named {prefer!r} here")


_select_crc()


def crc32_backend(bint route=False):
    """Name of the CRC-32 implementation in use: 'isal-c+vpclmulqdq' (256-bit folds, then ISA-L)
    and 'isal-c' are the C paths; 'isal', 'zlib-ng' and 'zlib' are Python-call fallbacks.
    With route=True, the name followed by how it was reached (and why, for a fallback)."""
    return f"{_crc_name} ({_crc_route})" if route else _crc_name


def crc32(data, uint32_t value=0):
    """CRC-32 (IEEE 802.3, as zlib computes it) of a bytes-like object, with the codec's fast backend."""
    cdef const unsigned char[::1] view
    if type(data) is bytes:
        if _crc_c != NULL:
            return _crc_c(value, <const unsigned char *>PyBytes_AS_STRING(data), <uint64_t>PyBytes_GET_SIZE(data))
        return _crc_py(data, value)
    view = memoryview(data).cast("B")
    if _crc_c != NULL:
        return _crc_c(value, &view[0] if view.shape[0] else NULL, <uint64_t>view.shape[0])
    return _crc_py(view, value)

# --------------------------------------------------------------------------- xxh3_64
#
# xxHash (BSD-2-Clause, resonant/vendor/xxhash/LICENSE) is compiled into this extension from the
# same files python-xxhash builds from (its sdist's deps/xxhash): xxhash.c, and on x86-64
# xxh_x86dispatch.c, which picks the SSE2, AVX2 or AVX-512 kernel from CPUID at the first call
# (setup.py defines RZ_XXH_X86_DISPATCH there). Its symbols are hidden (-fvisibility=hidden), so
# they never clash with python-xxhash's copy. The state of a Xxh3 is allocated by that code
# (XXH3_createState: 64-byte aligned) and owned by the Xxh3 object.

cdef extern from *:
    """
    #include "xxhash.h"
    #if defined(RZ_XXH_X86_DISPATCH)
    #include "xxh_x86dispatch.h"   /* XXH3_64bits{,_update} -> their dispatching versions */
    static int rz_xxh_feature(void) { return XXH_featureTest(); }
    #else
    static int rz_xxh_feature(void) { return -1; }
    #endif
    static void *rz_xxh_create(void) { return XXH3_createState(); }
    static int rz_xxh_free(void *s) { return (int)XXH3_freeState((XXH3_state_t *)s); }
    static int rz_xxh_reset(void *s) { return (int)XXH3_64bits_reset((XXH3_state_t *)s); }
    static int rz_xxh_update(void *s, const void *p, size_t n) { return (int)XXH3_64bits_update((XXH3_state_t *)s, p, n); }
    static uint64_t rz_xxh_digest(const void *s) { return XXH3_64bits_digest((const XXH3_state_t *)s); }
    static uint64_t rz_xxh_oneshot(const void *p, size_t n) { return XXH3_64bits(p, n); }
    static unsigned rz_xxh_version(void) { return XXH_versionNumber(); }
    """
    int rz_xxh_feature() noexcept nogil
    void *rz_xxh_create() noexcept nogil
    int rz_xxh_free(void *) noexcept nogil
    int rz_xxh_reset(void *) noexcept nogil
    int rz_xxh_update(void *, const void *, size_t) noexcept nogil
    uint64_t rz_xxh_digest(const void *) noexcept nogil
    uint64_t rz_xxh_oneshot(const void *, size_t) noexcept nogil
    unsigned rz_xxh_version() noexcept nogil

ctypedef int (*xxh_update_t)(void *, const void *, size_t) noexcept nogil

# The stream kernels (_stream_kernels.pxi) feed a Xxh3's state through this pointer; it always
# points at the vendored code, which every C state (Xxh3._st != NULL) was made by.
cdef xxh_update_t _xxh_update = rz_xxh_update
cdef bint _xxh_c = False
cdef str _xxh_name = "none"
cdef str _xxh_route = ""

# xxh3_64 (seed 0) of bytes(range(256)) * 5 and of prefixes of it: short-input, mid-size and
# long-input (stripes, blocks) code paths, and the empty input; values from python-xxhash 4.1.0.
_XXH3_KAT = ((0, 0x2d06800538d394c2), (3, 0x5f4299fc161c9cbb), (200, 0xf42a8864feaf0703),
             (1280, 0x4844b009e164352e))


cdef bint _xxh3_agrees():
    probe = bytes(range(256)) * 5
    cdef const char *p = PyBytes_AS_STRING(probe)
    cdef void *st
    cdef uint64_t streamed = 0
    for n, want in _XXH3_KAT:
        if rz_xxh_oneshot(p, n) != want:
            return False
    st = rz_xxh_create()
    if st == NULL:
        return False
    ok = (rz_xxh_reset(st) == 0 and rz_xxh_update(st, p, 100) == 0 and rz_xxh_update(st, p + 100, 1180) == 0)
    if ok:
        streamed = rz_xxh_digest(st)
    rz_xxh_free(st)
    return ok and streamed == _XXH3_KAT[len(_XXH3_KAT) - 1][1]  # (no wraparound in this module)


def _select_xxh3(str prefer=None, missing=None):
    """Pick the xxh3_64 implementation; returns its name.

    'xxhash-c': the vendored xxHash C code, fed from C in the same GIL-free section as the
    copy it follows; checked against known answers (one-shot and in pieces). When that check
    fails (or with missing={"xxh3-vendored"}, to test it), python-xxhash's xxh3_64 object is
    used ('xxhash'), with a warning.
    """
    global _xxh_c, _xxh_name, _xxh_route
    if prefer not in (None, "xxhash-c", "xxhash"):
        raise ValueError(f"no xxh3 backend named {prefer!r}")
    missing = _missing_set(missing)
    _xxh_c = False
    reason = None
    if prefer in (None, "xxhash-c"):
        if "xxh3-vendored" in missing:
            reason = "the vendored xxHash is switched off (simulated)"
        elif not _xxh3_agrees():
            reason = "the vendored xxHash gives a wrong known answer"
        else:
            _xxh_c = True
            _xxh_name = "xxhash-c"
            v = rz_xxh_version()
            feature = rz_xxh_feature()
            kernel = {0: "scalar", 1: "sse2", 2: "avx2", 3: "avx512"}.get(feature, "compile-time choice")
            _xxh_route = f"vendored xxHash {v // 10000}.{v // 100 % 100}.{v % 100}, " + (
                f"x86 dispatch: {kernel}" if feature >= 0 else kernel)
            return _xxh_name
        if prefer == "xxhash-c":
            _select_xxh3(missing=missing)
            raise ValueError(f"the xxhash-c backend is not available: {reason}")
        _fell_back("xxh3_64", reason, False)
    import xxhash  # noqa: F401
    _xxh_name = "xxhash"
    _xxh_route = "python xxhash.xxh3_64" + (f" (fallback: {reason})" if reason else " (chosen)")
    return _xxh_name


_select_xxh3()


def xxh3_backend(bint route=False):
    """Name of the xxh3_64 implementation in use: 'xxhash-c' (the vendored C code, GIL-free) or
    'xxhash' (python-xxhash). With route=True, the name followed by how it was reached."""
    return f"{_xxh_name} ({_xxh_route})" if route else _xxh_name


cdef class Xxh3:
    """An incremental xxh3_64 (seed 0), fed from C when the C path is in use.

    The V-Stream fast paths update it in the same GIL-free section as their copy,
    while the bytes are still in cache. Equal to xxhash.xxh3_64 in every result.
    """

    def __cinit__(self):
        self._st = NULL
        self._py = None
        if _xxh_c:
            self._st = rz_xxh_create()
            if self._st == NULL:
                raise MemoryError("XXH3_createState failed")
            if rz_xxh_reset(self._st) != 0:
                raise ValueError("XXH3_64bits_reset failed")
        else:
            import xxhash
            self._py = xxhash.xxh3_64()

    def __dealloc__(self):
        if self._st != NULL:
            rz_xxh_free(self._st)
            self._st = NULL

    cdef int _feed(self, const unsigned char *p, Py_ssize_t n) except -1:
        cdef int rc = 0
        if n <= 0:
            return 0
        if self._st != NULL:
            if n < NOGIL_BYTES:
                rc = rz_xxh_update(self._st, p, <size_t>n)
            else:
                with nogil:
                    rc = rz_xxh_update(self._st, p, <size_t>n)
            if rc != 0:
                raise ValueError("XXH3_64bits_update failed")
        else:
            self._py.update(PyMemoryView_FromMemory(<char *>p, n, PyBUF_READ))
        return 0

    def update(self, data):
        """Feed a bytes-like object."""
        cdef const unsigned char[::1] v = memoryview(data).cast("B")
        if v.shape[0]:
            self._feed(&v[0], v.shape[0])

    def intdigest(self):
        """The hash of everything fed so far, as an int (the state is kept)."""
        if self._st != NULL:
            return rz_xxh_digest(self._st)
        return self._py.intdigest()


def xxh3_64(data):
    """xxh3_64 (seed 0) of a bytes-like object, as an int."""
    cdef const unsigned char[::1] v
    cdef uint64_t h
    cdef const unsigned char *p
    cdef size_t n
    if _xxh_c and type(data) is bytes:  # no buffer acquisition: ~1 us less per call
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        n = <size_t>PyBytes_GET_SIZE(data)
    else:
        v = memoryview(data).cast("B")
        p = &v[0] if v.shape[0] else <const unsigned char *>b""
        n = v.shape[0]
    if _xxh_c:
        if n < NOGIL_BYTES:
            return rz_xxh_oneshot(p, n)
        with nogil:
            h = rz_xxh_oneshot(p, n)
        return h
    import xxhash
    return xxhash.xxh3_64_intdigest(v)

# --------------------------------------------------------------------------- AEAD

from libc.stdint cimport uintptr_t

ctypedef int (*aead_seal_t)(unsigned char *c, unsigned long long *clen, const unsigned char *m,
                            unsigned long long mlen, const unsigned char *ad, unsigned long long adlen,
                            const unsigned char *nsec, const unsigned char *npub, const unsigned char *k) noexcept nogil
ctypedef int (*aead_open_t)(unsigned char *m, unsigned long long *mlen, unsigned char *nsec,
                            const unsigned char *c, unsigned long long clen, const unsigned char *ad,
                            unsigned long long adlen, const unsigned char *npub, const unsigned char *k) noexcept nogil

cdef aead_seal_t _seal_c = NULL
cdef aead_open_t _open_c = NULL

# draft-irtf-cfrg-xchacha-03, A.3.1: checked before the C entry points are trusted
_AEAD_KAT_KEY = bytes(range(0x80, 0xA0))
_AEAD_KAT_NONCE = bytes(range(0x40, 0x58))
_AEAD_KAT_AD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
_AEAD_KAT_PT = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
                b"sunscreen would be it.")
_AEAD_KAT_CT = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39"
    "ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52ec0875924c1c7987947deafd8780acf49")


_AEAD_SEAL = "crypto_aead_xchacha20poly1305_ietf_encrypt"
_AEAD_OPEN = "crypto_aead_xchacha20poly1305_ietf_decrypt"
cdef str _aead_route = ""
cdef object _aead_lib = None  # keeps PyNaCl's cffi lib (and so the pointers) alive


cdef bint _aead_agrees(aead_seal_t seal, aead_open_t open_):
    cdef unsigned long long n = 0
    out = bytearray(len(_AEAD_KAT_CT))
    cdef unsigned char[::1] o = out
    seal(&o[0], &n, _AEAD_KAT_PT, len(_AEAD_KAT_PT), _AEAD_KAT_AD, len(_AEAD_KAT_AD), NULL, _AEAD_KAT_NONCE, _AEAD_KAT_KEY)
    if bytes(out) != _AEAD_KAT_CT or n != <unsigned long long>len(_AEAD_KAT_CT):
        return False
    back = bytearray(len(_AEAD_KAT_PT))
    cdef unsigned char[::1] b = back
    if open_(&b[0], &n, NULL, _AEAD_KAT_CT, len(_AEAD_KAT_CT), _AEAD_KAT_AD, len(_AEAD_KAT_AD), _AEAD_KAT_NONCE, _AEAD_KAT_KEY) != 0:
        return False
    return bytes(back) == _AEAD_KAT_PT


def _select_aead(str prefer=None, missing=None):
    """Use libsodium's crypto_aead_xchacha20poly1305_ietf_{encrypt,decrypt} through C function
    pointers, so that encryption writes straight into the frame and decryption reads straight
    from it ('sodium-c'). The pointers come from PyNaCl's cffi `lib` object with cffi's
    documented ffi.addressof (no dlsym into a private shared object), and must give the
    known answer of draft-irtf-cfrg-xchacha-03 A.3.1. Otherwise (or with prefer="pynacl") the
    codec uses nacl.bindings ('pynacl'), with one more copy each way, and a warning says why.
    """
    global _seal_c, _open_c, _aead_route, _aead_lib
    cdef uintptr_t seal_p = 0, open_p = 0
    if prefer not in (None, "sodium-c", "pynacl"):
        raise ValueError(f"no AEAD backend named {prefer!r}")
    missing = _missing_set(missing)
    _seal_c = NULL
    _open_c = NULL
    _aead_lib = None
    reason = None
    if prefer != "pynacl":
        try:
            import nacl.bindings  # noqa: F401  (initialises libsodium)
            from nacl._sodium import ffi, lib
        except ImportError as exc:
            reason = f"PyNaCl's cffi module is not importable ({exc})"
        else:
            for name in (_AEAD_SEAL, _AEAD_OPEN):
                if name in missing:
                    reason = f"symbol {name} missing from nacl._sodium.lib (simulated)"
                    break
                try:
                    p = int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))
                except Exception:  # noqa: BLE001  (AttributeError, ffi.error: not in this PyNaCl's cdef)
                    p = 0
                if p == 0:
                    reason = f"symbol {name} missing from nacl._sodium.lib"
                    break
                if name == _AEAD_SEAL:
                    seal_p = p
                else:
                    open_p = p
            if reason is None:
                if _aead_agrees(<aead_seal_t>seal_p, <aead_open_t>open_p):
                    _seal_c, _open_c = <aead_seal_t>seal_p, <aead_open_t>open_p
                    _aead_lib = lib
                    _aead_route = "cffi ffi.addressof(nacl._sodium.lib, crypto_aead_xchacha20poly1305_ietf_*)"
                    return "sodium-c"
                reason = "libsodium's XChaCha20-Poly1305 gives a wrong known answer"
        if prefer == "sodium-c":
            _select_aead(missing=missing)
            raise ValueError(f"the sodium-c backend is not available: {reason}")
        _fell_back("AEAD", reason, False)
    _aead_route = "python nacl.bindings" + (f" (fallback: {reason})" if reason else " (chosen)")
    return "pynacl"


def aead_backend(bint route=False):
    """'sodium-c' when XChaCha20-Poly1305 runs through C pointers into PyNaCl's libsodium, else
    'pynacl'. With route=True, the name followed by how it was reached."""
    name = "sodium-c" if _seal_c != NULL else "pynacl"
    return f"{name} ({_aead_route})" if route else name


def backends():
    """{"crc32": ..., "xxh3_64": ..., "aead": ...}: each backend's name and route, as
    crc32_backend(route=True) and its siblings give them, plus the versions of the packages
    whose internals or APIs they use."""
    return {
        "crc32": crc32_backend(True),
        "xxh3_64": xxh3_backend(True),
        "aead": aead_backend(True),
        "versions": {d: _dist_version(d) for d in ("isal", "PyNaCl", "cffi", "xxhash")},
    }


def seal_frame(bytes head not None, body, bytes nonce not None, bytes key not None):
    """head + XChaCha20-Poly1305(body, ad=head) + tag + CRC-32, encrypted straight into the frame."""
    cdef const unsigned char[::1] m = memoryview(body).cast("B")
    cdef Py_ssize_t hn = PyBytes_GET_SIZE(head), mn = m.shape[0]
    cdef Py_ssize_t size = hn + mn + TAG_BYTES + CRC_SIZE
    cdef unsigned long long clen = 0
    cdef const unsigned char *mp = &m[0] if mn else <const unsigned char *>b""
    if _seal_c == NULL:
        raise RuntimeError("the C AEAD path is not available")
    if len(nonce) != NONCE_BYTES or len(key) != 32:
        raise EncodeError("key", "a 24-byte nonce and a 32-byte key are needed")
    _check_size(size)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    cdef const unsigned char *np_ = <const unsigned char *>PyBytes_AS_STRING(nonce)
    cdef const unsigned char *kp = <const unsigned char *>PyBytes_AS_STRING(key)
    memcpy(q, PyBytes_AS_STRING(head), hn)
    with nogil:
        _seal_c(q + hn, &clen, mp, mn, q, hn, NULL, np_, kp)
    rz_st_u32(q + size - CRC_SIZE, _crc32(q, size - CRC_SIZE))
    return out


def open_body(ciphertext, aad, nonce, bytes key not None):
    """The plaintext of an XChaCha20-Poly1305 ciphertext+tag, read straight from the frame; None when
    it does not authenticate (nothing of the plaintext is returned then)."""
    cdef const unsigned char[::1] c = memoryview(ciphertext).cast("B")
    cdef const unsigned char[::1] a = memoryview(aad).cast("B")
    cdef const unsigned char[::1] nv = memoryview(nonce).cast("B")
    cdef Py_ssize_t cn = c.shape[0]
    cdef unsigned long long mlen = 0
    cdef int rc
    if _open_c == NULL:
        raise RuntimeError("the C AEAD path is not available")
    if cn < TAG_BYTES or nv.shape[0] != NONCE_BYTES or len(key) != 32 or a.shape[0] == 0:
        return None
    out = PyBytes_FromStringAndSize(NULL, cn - TAG_BYTES)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    cdef const unsigned char *kp = <const unsigned char *>PyBytes_AS_STRING(key)
    with nogil:
        rc = _open_c(q, &mlen, NULL, &c[0], cn, &a[0], a.shape[0], &nv[0], kp)
    if rc != 0:
        return None
    return out


_select_aead()
