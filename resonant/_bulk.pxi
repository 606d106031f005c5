# Hand-written, included by the generated _codec.pyx: the bulk-byte kernels of the V-Stream
# paths. (1) CRC-32 (IEEE 802.3, reflected, as zlib) folded 256 bits at a time with VPCLMULQDQ
# on AVX2 registers; (2) a copy with streaming (non-temporal) stores for output buffers larger
# than the caches.
#
# (1)
# ISA-L's crc32_gzip_refl folds 128 bits per carry-less multiply unless the CPU has
# AVX-512; on AVX2 machines with VPCLMULQDQ (AMD Zen 3 and later, Intel Ice Lake and later)
# a 256-bit multiply does two folds for the price of one, which doubles the throughput
# (measured 11 -> ~20 GB/s on the development machine). Only the bulk is folded here: the
# folded 16-byte remainder and the tail go through the ISA-L function, so the final reduction
# is ISA-L's and the result is bit-identical by construction (and checked at import).
#
# Folding, in the reflected domain (bytes loaded little-endian, so a 64-bit half holds the
# higher-degree coefficients in its low bits): a 128-bit lane v moved D bits forward becomes
#     clmul(lo64(v), K(D + 32)) xor clmul(hi64(v), K(D - 32)),
#     K(e) = bitreflect32(x^e mod P) << 1,  P = 0x104C11DB7,
# which is congruent to v * x^D mod P. The constants below are K(e) for D = 1024 (four
# 256-bit accumulators, 128 bytes per step), 256 and 128; tests/test_crc.py recomputes them.
#
# The initial CRC enters as usual for a folding CRC: its complement is XORed into the first
# four bytes, and since folding preserves the residue, crc(data) == crc_tail(~0, folded 16
# bytes) continued over the bytes left.
#
# (2) A chunk copied into a large stream buffer with ordinary stores first reads each
# destination line into the cache (read-for-ownership), then writes it back later: three
# memory transfers per byte, ~9 GB/s here. Streaming stores write around the cache: two
# transfers, ~14 GB/s, which is what memcpy itself does for copies larger than the cache. The
# stream hash is therefore taken over the source bytes (still in cache), not the destination.

cdef extern from *:
    """
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    #define RZ_HAVE_FOLD 1
    typedef uint32_t (*rz_crc_fn)(uint32_t, const unsigned char *, uint64_t);
    static rz_crc_fn rz_fold_tail = 0;

    __attribute__((target("avx2,pclmul,vpclmulqdq")))
    static inline __m256i rz_fold256(__m256i v, __m256i k) {
        return _mm256_xor_si256(_mm256_clmulepi64_epi128(v, k, 0x00), _mm256_clmulepi64_epi128(v, k, 0x11));
    }

    /* Requires n >= 256. Returns the CRC of p[0..n) continued from crc, like zlib's crc32(). */
    __attribute__((target("avx2,pclmul,vpclmulqdq")))
    static uint32_t rz_crc32_fold_avx2(uint32_t crc, const unsigned char *p, uint64_t n) {
        const __m256i k1024 = _mm256_set_epi64x(0x14a7fe880LL, 0x1e88ef372LL, 0x14a7fe880LL, 0x1e88ef372LL);
        const __m256i k256 = _mm256_set_epi64x(0x15a546366LL, 0xf1da05aaLL, 0x15a546366LL, 0xf1da05aaLL);
        const __m128i k128 = _mm_set_epi64x(0xccaa009eLL, 0x1751997d0LL);
        __m256i y0 = _mm256_loadu_si256((const __m256i *)(p + 0));
        __m256i y1 = _mm256_loadu_si256((const __m256i *)(p + 32));
        __m256i y2 = _mm256_loadu_si256((const __m256i *)(p + 64));
        __m256i y3 = _mm256_loadu_si256((const __m256i *)(p + 96));
        y0 = _mm256_xor_si256(y0, _mm256_set_epi32(0, 0, 0, 0, 0, 0, 0, (int)~crc));
        uint64_t pos = 128;
        for (; n - pos >= 128; pos += 128) {
            y0 = _mm256_xor_si256(rz_fold256(y0, k1024), _mm256_loadu_si256((const __m256i *)(p + pos)));
            y1 = _mm256_xor_si256(rz_fold256(y1, k1024), _mm256_loadu_si256((const __m256i *)(p + pos + 32)));
            y2 = _mm256_xor_si256(rz_fold256(y2, k1024), _mm256_loadu_si256((const __m256i *)(p + pos + 64)));
            y3 = _mm256_xor_si256(rz_fold256(y3, k1024), _mm256_loadu_si256((const __m256i *)(p + pos + 96)));
        }
        y1 = _mm256_xor_si256(y1, rz_fold256(y0, k256));
        y2 = _mm256_xor_si256(y2, rz_fold256(y1, k256));
        y3 = _mm256_xor_si256(y3, rz_fold256(y2, k256));
        __m128i lo = _mm256_castsi256_si128(y3), hi = _mm256_extracti128_si256(y3, 1);
        __m128i x = _mm_xor_si128(hi, _mm_xor_si128(_mm_clmulepi64_si128(lo, k128, 0x00),
                                                    _mm_clmulepi64_si128(lo, k128, 0x11)));
        unsigned char folded[16];
        _mm_storeu_si128((__m128i *)folded, x);
        uint32_t c = rz_fold_tail(0xFFFFFFFFu, folded, 16);
        return n > pos ? rz_fold_tail(c, p + pos, n - pos) : c;
    }

    static uint32_t rz_crc32_fold(uint32_t crc, const unsigned char *p, uint64_t n) {
        if (n < 256) return rz_fold_tail(crc, p, n);
        return rz_crc32_fold_avx2(crc, p, n);
    }

    static int rz_fold_supported(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq")
               && __builtin_cpu_supports("pclmul");
    }
    #else
    #define RZ_HAVE_FOLD 0
    typedef uint32_t (*rz_crc_fn)(uint32_t, const unsigned char *, uint64_t);
    static rz_crc_fn rz_fold_tail = 0;
    static uint32_t rz_crc32_fold(uint32_t crc, const unsigned char *p, uint64_t n) { return rz_fold_tail(crc, p, n); }
    static int rz_fold_supported(void) { return 0; }
    #endif
    /* dst <- src (non-overlapping) with non-temporal stores for the 64-byte blocks; SSE2 only,
       which every x86-64 has. Other CPUs: memcpy. */
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <emmintrin.h>
    static void rz_copy_nt(unsigned char *dst, const unsigned char *src, size_t n) {
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
        if (n < 256) { memcpy(dst, src, n); return; }
        memcpy(dst, src, head);
        dst += head; src += head; n -= head;
        for (; n >= 64; n -= 64, src += 64, dst += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)src), b = _mm_loadu_si128((const __m128i *)(src + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + 32)), d = _mm_loadu_si128((const __m128i *)(src + 48));
            _mm_stream_si128((__m128i *)dst, a);
            _mm_stream_si128((__m128i *)(dst + 16), b);
            _mm_stream_si128((__m128i *)(dst + 32), c);
            _mm_stream_si128((__m128i *)(dst + 48), d);
        }
        _mm_sfence();
        memcpy(dst, src, n);
    }
    #else
    static void rz_copy_nt(unsigned char *dst, const unsigned char *src, size_t n) { memcpy(dst, src, n); }
    #endif
    """
    void rz_copy_nt(unsigned char *dst, const unsigned char *src, size_t n) noexcept nogil
    ctypedef uint32_t (*rz_crc_fn)(uint32_t, const unsigned char *, uint64_t) noexcept nogil
    rz_crc_fn rz_fold_tail
    uint32_t rz_crc32_fold(uint32_t crc, const unsigned char *p, uint64_t n) noexcept nogil
    bint rz_fold_supported() noexcept nogil


# (3) Output blocks for large stream buffers, kept for reuse once released.
#
# A new stream buffer of hundreds of MiB costs more in page faults (the kernel zeroes every
# page on first touch) than the stream's copy itself. A receiver that streams KV caches over
# and over would pay that each time, so released blocks are kept, up to a byte limit, and a
# later stream of the same size (to 2 MiB) reuses one: its pages are already mapped (the way
# PyTorch's caching allocator and LMCache's pools work). A block is released when the last
# numpy view of it goes away. Blocks are 2 MiB-aligned and advised as huge pages. Nothing of a
# reused block is shown before it is overwritten: a stream's objects are handed out only once
# all their chunks are in.

from cpython.buffer cimport PyBUF_FORMAT

cdef extern from *:
    """
    #include <stdlib.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    static void rz_advise_huge(void *p, size_t n) { madvise(p, n, MADV_HUGEPAGE); }
    #else
    static void rz_advise_huge(void *p, size_t n) { (void)p; (void)n; }
    #endif
    static void *rz_alloc_block(size_t n) {
        void *p = 0;
        if (posix_memalign(&p, (size_t)2 << 20, n) != 0) return 0;
        rz_advise_huge(p, n);
        return p;
    }
    """
    void *rz_alloc_block(size_t n) nogil
    void free(void *p) nogil

cdef extern from "Python.h":
    int PyTraceMalloc_Track(unsigned int domain, size_t ptr, size_t size)
    int PyTraceMalloc_Untrack(unsigned int domain, size_t ptr)

cdef unsigned int TRACE_DOMAIN = 0x52534E54  # blocks in use show in tracemalloc; cached ones do not

cdef size_t BLOCK_ALIGN = 2 << 20
cdef size_t _cache_limit = 1 << 30   # bytes of released blocks kept
cdef size_t _cache_bytes = 0
cdef list _cache = []                # [(capacity, address)], smallest first


cdef class OutputBlock:
    """A writable, 2 MiB-aligned byte buffer that goes back to the block cache when released."""
    cdef unsigned char *_ptr
    cdef size_t _cap
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]

    def __getbuffer__(self, Py_buffer *buf, int flags):
        buf.buf = self._ptr
        buf.obj = self
        buf.len = self._shape[0]
        buf.readonly = 0
        buf.itemsize = 1
        buf.format = NULL
        if flags & PyBUF_FORMAT:
            buf.format = b"B"
        buf.ndim = 1
        buf.shape = self._shape
        buf.strides = self._strides
        buf.suboffsets = NULL
        buf.internal = NULL

    def __releasebuffer__(self, Py_buffer *buf):
        pass

    def __len__(self):
        return self._shape[0]

    def __dealloc__(self):
        global _cache_bytes
        cdef Py_ssize_t i
        if self._ptr == NULL:
            return
        PyTraceMalloc_Untrack(TRACE_DOMAIN, <size_t>self._ptr)
        if _cache is not None and _cache_bytes + self._cap <= _cache_limit:  # (None: the module is being torn down)
            i = 0
            while i < len(_cache) and _cache[i][0] < self._cap:
                i += 1
            _cache.insert(i, (self._cap, <size_t>self._ptr))
            _cache_bytes += self._cap
        else:
            free(self._ptr)
        self._ptr = NULL


def output_block(Py_ssize_t n):
    """A block of n bytes, its capacity n rounded up to 2 MiB: a cached one of that capacity
    if there is one, else a new one. Its contents are whatever they were."""
    global _cache_bytes
    cdef OutputBlock b = OutputBlock.__new__(OutputBlock)
    cdef size_t cap
    cdef Py_ssize_t i
    if n < 0:
        raise ValueError("a block of a negative size")
    cap = (<size_t>n + BLOCK_ALIGN - 1) // BLOCK_ALIGN * BLOCK_ALIGN or BLOCK_ALIGN
    for i in range(len(_cache)):
        if _cache[i][0] == cap:
            b._ptr = <unsigned char *><size_t>_cache.pop(i)[1]
            b._cap = cap
            _cache_bytes -= cap
            break
    else:
        b._ptr = <unsigned char *>rz_alloc_block(cap)
        if b._ptr == NULL:
            raise MemoryError(f"{cap} bytes for a stream buffer")
        b._cap = cap
    b._shape[0] = n
    b._strides[0] = 1
    PyTraceMalloc_Track(TRACE_DOMAIN, <size_t>b._ptr, b._cap)
    return b


def set_block_cache(Py_ssize_t limit):
    """Keep at most `limit` bytes of released output blocks for reuse (0: keep none); returns
    the previous limit. Blocks over the new limit are freed at once."""
    global _cache_limit, _cache_bytes
    if limit < 0:
        raise ValueError("the block cache limit must be >= 0")
    previous = _cache_limit
    _cache_limit = limit
    while _cache_bytes > _cache_limit:
        cap, addr = _cache.pop()  # the largest first
        free(<void *><size_t>addr)
        _cache_bytes -= cap
    return previous


def block_cache_bytes():
    """Bytes of released output blocks held for reuse now."""
    return _cache_bytes
