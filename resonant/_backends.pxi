# Hand-written, included by resonant/_codec.pyx: the CRC-32, xxh3_64 and AEAD backends, each
# chosen at import among the C functions found and checked against a known answer.

# --------------------------------------------------------------------------- CRC-32

ctypedef uint32_t (*crc_fn_t)(uint32_t, const unsigned char *, uint64_t) noexcept nogil

include "_bulk.pxi"

cdef crc_fn_t _crc_c = NULL
cdef object _crc_py = None
cdef str _crc_name = "none"


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


def _select_crc(str prefer=None):
    """Pick the CRC-32 implementation; returns its name.

    The preferred backend calls ISA-L's crc32_gzip_refl through a C function pointer
    (no Python call per frame). ISA-L reaches us inside the `isal` wheel, which does not
    publish a C API, so the symbol is looked up in its already-loaded extension module
    and checked against a known answer. On x86-64 CPUs with AVX2 and VPCLMULQDQ the bulk of
    each buffer is folded 256 bits at a time first (_bulk.pxi), ISA-L finishing the
    remainder; that path is checked against ISA-L on every length up to 1,100 bytes before
    it is used. When ISA-L's symbol is not found, isal's or zlib-ng's Python function is
    used, and the stdlib's zlib.crc32 as a last resort.
    """
    global _crc_c, _crc_py, _crc_name, rz_fold_tail
    cdef void *handle
    cdef crc_fn_t fn
    _crc_c = NULL
    if prefer in (None, "isal-c", "isal-c+vpclmulqdq"):
        try:
            import isal.isal_zlib as _isal_zlib
            path = _isal_zlib.__file__.encode()
            handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
            if handle != NULL:
                fn = <crc_fn_t>dlsym(handle, b"crc32_gzip_refl")
                if fn != NULL and fn(0, <const unsigned char *>b"123456789", 9) == 0xCBF43926u:
                    _crc_c = fn
                    _crc_py = None
                    _crc_name = "isal-c"
                    if prefer != "isal-c" and rz_fold_supported():
                        rz_fold_tail = <rz_crc_fn>fn
                        if _fold_agrees(fn):
                            _crc_c = <crc_fn_t>rz_crc32_fold
                            _crc_name = "isal-c+vpclmulqdq"
                    if prefer in (None, _crc_name):
                        return _crc_name
                    _crc_c = NULL
        except ImportError:
            pass
    for name, modname in (("isal", "isal.isal_zlib"), ("zlib-ng", "zlib_ng.zlib_ng"), ("zlib", "zlib")):
        if prefer not in (None, "isal-c", name):
            continue
        try:
            mod = __import__(modname, fromlist=["crc32"])
        except ImportError:
            continue
        _crc_py = mod.crc32
        _crc_name = name
        return _crc_name
    _select_crc()  # leave a working backend behind
    raise ValueError(f"no CRC-32 backend named {prefer!r} here")


_select_crc()


def crc32_backend():
    """Name of the CRC-32 implementation in use: 'isal-c+vpclmulqdq' (256-bit folds, then ISA-L)
    and 'isal-c' are the C paths; 'isal', 'zlib-ng' and 'zlib' are Python-call fallbacks."""
    return _crc_name


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

ctypedef void *(*xxh_create_t)() noexcept nogil
ctypedef int (*xxh_free_t)(void *) noexcept nogil
ctypedef int (*xxh_reset_t)(void *) noexcept nogil
ctypedef int (*xxh_update_t)(void *, const void *, size_t) noexcept nogil
ctypedef uint64_t (*xxh_digest_t)(const void *) noexcept nogil
ctypedef uint64_t (*xxh_oneshot_t)(const void *, size_t) noexcept nogil

cdef xxh_create_t _xxh_create = NULL
cdef xxh_free_t _xxh_free = NULL
cdef xxh_reset_t _xxh_reset = NULL
cdef xxh_update_t _xxh_update = NULL
cdef xxh_digest_t _xxh_digest = NULL
cdef xxh_oneshot_t _xxh_oneshot = NULL
cdef str _xxh_name = "none"


def _select_xxh3(str prefer=None):
    """Pick the xxh3_64 implementation; returns its name.

    The stream hash is fed from C, in the same GIL-free section as the copy it follows
    ('xxhash-c'). The xxhash wheel does not publish a C API either, so its XXH3 streaming
    functions are looked up in the already-loaded extension module and checked against
    xxhash's own Python answer (one-shot and in pieces); when that fails, the Python
    xxhash.xxh3_64 object is used ('xxhash').
    """
    global _xxh_create, _xxh_free, _xxh_reset, _xxh_update, _xxh_digest, _xxh_oneshot, _xxh_name
    cdef void *handle
    cdef void *st
    cdef uint64_t a, b
    import xxhash
    _xxh_create = NULL
    if prefer not in (None, "xxhash-c", "xxhash"):
        raise ValueError(f"no xxh3 backend named {prefer!r}")
    if prefer in (None, "xxhash-c"):
        import xxhash._xxhash as _xmod
        handle = dlopen(_xmod.__file__.encode(), RTLD_NOW | RTLD_NOLOAD)
        if handle != NULL:
            create = <xxh_create_t>dlsym(handle, b"XXH3_createState")
            free = <xxh_free_t>dlsym(handle, b"XXH3_freeState")
            reset = <xxh_reset_t>dlsym(handle, b"XXH3_64bits_reset")
            # xxhash's x86 dispatcher (AVX2 where the CPU has it) when the wheel has one: the
            # plain symbols are its SSE2 build, half the speed.
            update = <xxh_update_t>dlsym(handle, b"XXH3_64bits_update_dispatch")
            if update == NULL:
                update = <xxh_update_t>dlsym(handle, b"XXH3_64bits_update")
            digest = <xxh_digest_t>dlsym(handle, b"XXH3_64bits_digest")
            oneshot = <xxh_oneshot_t>dlsym(handle, b"XXH3_64bits_dispatch")
            if oneshot == NULL:
                oneshot = <xxh_oneshot_t>dlsym(handle, b"XXH3_64bits")
            if create != NULL and free != NULL and reset != NULL and update != NULL and digest != NULL and oneshot != NULL:
                probe = bytes(range(256)) * 5  # crosses xxh3's internal block and stripe sizes
                st = create()
                if st != NULL:
                    a = b = 0
                    if reset(st) == 0 and update(st, <const char *>probe, 100) == 0 and update(st, <const char *>probe + 100, 1180) == 0:
                        a = digest(st)
                        b = oneshot(<const char *>probe, 1280)
                    free(st)
                    if a == b == xxhash.xxh3_64_intdigest(probe) and oneshot(<const char *>probe, 0) == xxhash.xxh3_64_intdigest(b""):
                        _xxh_create, _xxh_free, _xxh_reset, _xxh_update, _xxh_digest, _xxh_oneshot = (
                            create, free, reset, update, digest, oneshot)
                        _xxh_name = "xxhash-c"
                        return _xxh_name
        if prefer == "xxhash-c":
            raise ValueError("xxhash's C functions are not reachable in this installation")
    _xxh_name = "xxhash"
    return _xxh_name


_select_xxh3()


def xxh3_backend():
    """Name of the xxh3_64 implementation in use ('xxhash-c' is the GIL-free C path)."""
    return _xxh_name


cdef class Xxh3:
    """An incremental xxh3_64 (seed 0), fed from C when the C path is reachable.

    The V-Stream fast paths update it in the same GIL-free section as their copy,
    while the bytes are still in cache. Equal to xxhash.xxh3_64 in every result.
    """

    def __cinit__(self):
        self._st = NULL
        self._py = None
        if _xxh_create != NULL:
            self._st = _xxh_create()
            if self._st == NULL or _xxh_reset(self._st) != 0:
                raise MemoryError("XXH3_createState failed")
        else:
            import xxhash
            self._py = xxhash.xxh3_64()

    def __dealloc__(self):
        if self._st != NULL:
            _xxh_free(self._st)
            self._st = NULL

    cdef int _feed(self, const unsigned char *p, Py_ssize_t n) except -1:
        cdef int rc = 0
        if n <= 0:
            return 0
        if self._st != NULL:
            if n < NOGIL_BYTES:
                rc = _xxh_update(self._st, p, <size_t>n)
            else:
                with nogil:
                    rc = _xxh_update(self._st, p, <size_t>n)
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
            return _xxh_digest(self._st)
        return self._py.intdigest()


def xxh3_64(data):
    """xxh3_64 (seed 0) of a bytes-like object, as an int."""
    cdef const unsigned char[::1] v = memoryview(data).cast("B")
    cdef uint64_t h
    cdef const unsigned char *p = &v[0] if v.shape[0] else <const unsigned char *>b""
    cdef size_t n = v.shape[0]
    if _xxh_oneshot != NULL:
        with nogil:
            h = _xxh_oneshot(p, n)
        return h
    import xxhash
    return xxhash.xxh3_64_intdigest(v)

# --------------------------------------------------------------------------- AEAD

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


def _select_aead(str prefer=None):
    """Use libsodium's crypto_aead_xchacha20poly1305_ietf_{encrypt,decrypt} through C function
    pointers when the libsodium inside PyNaCl exports them and they give the known answer, so that
    encryption writes straight into the frame and decryption reads straight from it; otherwise
    (or with prefer="pynacl") the codec uses nacl.bindings, with one more copy each way."""
    global _seal_c, _open_c
    cdef void *handle
    cdef aead_seal_t seal
    cdef aead_open_t open_
    cdef unsigned long long n = 0
    _seal_c = NULL
    _open_c = NULL
    if prefer == "pynacl":
        return "pynacl"
    import nacl.bindings  # noqa: F401  (initialises libsodium)
    import nacl._sodium as _sodium_mod
    handle = dlopen(_sodium_mod.__file__.encode(), RTLD_NOW | RTLD_NOLOAD)
    if handle == NULL:
        return "pynacl"
    seal = <aead_seal_t>dlsym(handle, b"crypto_aead_xchacha20poly1305_ietf_encrypt")
    open_ = <aead_open_t>dlsym(handle, b"crypto_aead_xchacha20poly1305_ietf_decrypt")
    if seal == NULL or open_ == NULL:
        return "pynacl"
    out = bytearray(len(_AEAD_KAT_CT))
    cdef unsigned char[::1] o = out
    seal(&o[0], &n, _AEAD_KAT_PT, len(_AEAD_KAT_PT), _AEAD_KAT_AD, len(_AEAD_KAT_AD), NULL, _AEAD_KAT_NONCE, _AEAD_KAT_KEY)
    if bytes(out) != _AEAD_KAT_CT or n != len(_AEAD_KAT_CT):
        return "pynacl"
    back = bytearray(len(_AEAD_KAT_PT))
    cdef unsigned char[::1] b = back
    if open_(&b[0], &n, NULL, _AEAD_KAT_CT, len(_AEAD_KAT_CT), _AEAD_KAT_AD, len(_AEAD_KAT_AD), _AEAD_KAT_NONCE, _AEAD_KAT_KEY) != 0 \
            or bytes(back) != _AEAD_KAT_PT:
        return "pynacl"
    _seal_c, _open_c = seal, open_
    return "sodium-c"


def aead_backend():
    """'sodium-c' when XChaCha20-Poly1305 runs through C pointers into PyNaCl's libsodium, else 'pynacl'."""
    return "sodium-c" if _seal_c != NULL else "pynacl"


def _seal_frame(bytes head not None, body, bytes nonce not None, bytes key not None):
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


def _open_body(ciphertext, aad, nonce, bytes key not None):
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
