# Hand-written, included by the generated _codec.pyx: ggml-compatible Q8_0 / Q4_0 kernels.
#
# Q8_0: blocks of 32 values -> fp16 d, then 32 int8 q      (34 bytes); x = q * d
# Q4_0: blocks of 32 values -> fp16 d, then 16 bytes nibbles (18 bytes); x = (q - 8) * d,
#       byte j = element j (low nibble) | element j + 16 (high nibble)
# The formulas are ggml's reference ones (quantize_row_q8_0_ref, quantize_row_q4_0_ref),
# including its rounding (roundf; trunc of x/d + 8.5), so llama.cpp reads our payloads and
# we read its. fp16 conversions round to nearest even, like F16C's _cvtss_sh.

cdef extern from *:
    """
    #include <math.h>
    #include <string.h>
    static inline uint32_t rz_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    static inline float rz_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
    /* float -> binary16, round to nearest even; NaN stays NaN, overflow gives inf. */
    static inline uint16_t rz_f32_to_f16(float f) {
        uint32_t x = rz_f32_bits(f);
        uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
        uint32_t ax = x & 0x7fffffffu;
        if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
        if (ax >= 0x477ff000u) return sign | 0x7c00u;            /* rounds to >= 65520: inf */
        if (ax < 0x38800000u) {                                   /* subnormal half (or zero) */
            if (ax < 0x33000000u) return sign;                    /* below half the smallest subnormal */
            uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
            uint32_t shift = 126 - e;                             /* 14..24 */
            uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
            if (rem > half || (rem == half && (q & 1u))) q++;
            return sign | (uint16_t)q;
        }
        uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);             /* round the 13 dropped bits to even */
        return sign | (uint16_t)((r - 0x38000000u) >> 13);
    }
    static inline float rz_f16_to_f32(uint16_t h) {
        uint32_t sign = ((uint32_t)h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
        if (e == 0) {
            if (m == 0) return rz_bits_f32(sign);
            float v = (float)m * 5.9604644775390625e-08f;         /* m * 2^-24 */
            return sign ? -v : v;
        }
        if (e == 31) return rz_bits_f32(sign | 0x7f800000u | (m << 13));
        return rz_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    }
    /* roundf (half away from zero) for |v| <= 127.5, without a libm call: exact, because
       v - (float)i is exact for the integer part i of a float of this size. */
    static inline int rz_round_away(float v) {
        int i = (int)v;
        float f = v - (float)i;
        return i + (f >= 0.5f) - (f <= -0.5f);
    }
    /* Return 1 when a value is NaN or infinite (nothing is then meaningful), else 0. */
    static int rz_quantize_q8_0(const float *x, unsigned char *out, int64_t n) {
        int64_t nb = (n + 31) / 32;
        int bad = 0;
        for (int64_t b = 0; b < nb; b++) {
            float v[32];
            int64_t k = n - b * 32; if (k > 32) k = 32;
            memcpy(v, x + b * 32, (size_t)k * 4);
            for (int64_t j = k; j < 32; j++) v[j] = 0.0f;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) { float a = fabsf(v[j]); bad |= !(a <= 3.4028234663852886e38f); amax = a > amax ? a : amax; }
            if (bad) return 1;
            float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            unsigned char *blk = out + b * 34;
            uint16_t h = rz_f32_to_f16(d);
            blk[0] = (unsigned char)(h & 0xff); blk[1] = (unsigned char)(h >> 8);
            if (!(id <= 3.4028234663852886e38f)) {  /* d subnormal: 1/d overflows. fp16(d) is 0 anyway; */
                memset(blk + 2, 0, 32);              /* write the codes ggml's x86 build writes (0) */
                continue;
            }
            for (int j = 0; j < 32; j++) blk[2 + j] = (unsigned char)(int8_t)rz_round_away(v[j] * id);
        }
        return 0;
    }
    static int rz_quantize_q4_0(const float *x, unsigned char *out, int64_t n) {
        int64_t nb = (n + 31) / 32;
        int bad = 0;
        for (int64_t b = 0; b < nb; b++) {
            float v[32];
            int64_t k = n - b * 32; if (k > 32) k = 32;
            memcpy(v, x + b * 32, (size_t)k * 4);
            for (int64_t j = k; j < 32; j++) v[j] = 0.0f;
            float amax = 0.0f, max = 0.0f;
            for (int j = 0; j < 32; j++) { float a = fabsf(v[j]); bad |= !(a <= 3.4028234663852886e38f); if (amax < a) { amax = a; max = v[j]; } }
            if (bad) return 1;
            float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            unsigned char *blk = out + b * 18;
            uint16_t h = rz_f32_to_f16(d);
            blk[0] = (unsigned char)(h & 0xff); blk[1] = (unsigned char)(h >> 8);
            if (!(fabsf(id) <= 3.4028234663852886e38f)) {  /* as in Q8_0: ggml's x86 build writes nibbles 0 */
                memset(blk + 2, 0, 16);
                continue;
            }
            for (int j = 0; j < 16; j++) {
                int8_t a0 = (int8_t)(v[j] * id + 8.5f), a1 = (int8_t)(v[16 + j] * id + 8.5f);
                uint8_t q0 = (uint8_t)(a0 < 15 ? a0 : 15), q1 = (uint8_t)(a1 < 15 ? a1 : 15);
                blk[2 + j] = (unsigned char)(q0 | (q1 << 4));
            }
        }
        return 0;
    }
    static void rz_dequantize_q8_0(const unsigned char *p, float *y, int64_t n) {
        int64_t nb = (n + 31) / 32;
        for (int64_t b = 0; b < nb; b++) {
            const unsigned char *blk = p + b * 34;
            float d = rz_f16_to_f32((uint16_t)(blk[0] | (blk[1] << 8)));
            int64_t k = n - b * 32; if (k > 32) k = 32;
            for (int64_t j = 0; j < k; j++) y[b * 32 + j] = (float)(int8_t)blk[2 + j] * d;
        }
    }
    static void rz_dequantize_q4_0(const unsigned char *p, float *y, int64_t n) {
        int64_t nb = (n + 31) / 32;
        for (int64_t b = 0; b < nb; b++) {
            const unsigned char *blk = p + b * 18;
            float d = rz_f16_to_f32((uint16_t)(blk[0] | (blk[1] << 8)));
            float t[32];
            for (int j = 0; j < 16; j++) {
                t[j] = (float)((int)(blk[2 + j] & 0x0f) - 8) * d;
                t[16 + j] = (float)((int)(blk[2 + j] >> 4) - 8) * d;
            }
            int64_t k = n - b * 32; if (k > 32) k = 32;
            memcpy(y + b * 32, t, (size_t)k * 4);
        }
    }
    """
    uint16_t rz_f32_to_f16(float f) noexcept nogil
    float rz_f16_to_f32(uint16_t h) noexcept nogil
    int rz_quantize_q8_0(const float *x, unsigned char *out, int64_t n) noexcept nogil
    int rz_quantize_q4_0(const float *x, unsigned char *out, int64_t n) noexcept nogil
    void rz_dequantize_q8_0(const unsigned char *p, float *y, int64_t n) noexcept nogil
    void rz_dequantize_q4_0(const unsigned char *p, float *y, int64_t n) noexcept nogil


cdef object _as_f32(x):
    arr = _np.ascontiguousarray(x)
    if arr.dtype != _np.float32:
        if arr.dtype.kind not in "fiu" and arr.dtype.name != "bfloat16":
            raise UnsupportedDType("x", f"cannot quantize {arr.dtype} values")
        arr = _np.ascontiguousarray(arr.astype(_np.float32))
    return arr.reshape(-1)


def quantize_blocks(x, int kind):
    """Q8_0 (kind 8) or Q4_0 (kind 4) payload bytes of x's values in C order (any float dtype)."""
    cdef const float[::1] v = _as_f32(x)
    cdef int64_t n = v.shape[0]
    cdef int64_t nb = (n + 31) // 32
    cdef Py_ssize_t size = nb * (34 if kind == 8 else 18)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    cdef const float *p = &v[0] if n else NULL
    cdef int bad
    with nogil:
        if kind == 8:
            bad = rz_quantize_q8_0(p, q, n)
        else:
            bad = rz_quantize_q4_0(p, q, n)
    if bad:
        raise ValueError("x: cannot quantize NaN or infinite values")
    return out


def dequantize_blocks(payload, int64_t n, int kind):
    """float32 values (n of them) of a Q8_0 / Q4_0 payload; checks the payload's size first."""
    cdef const unsigned char[::1] b = memoryview(payload).cast("B")
    cdef int64_t need = ((n + 31) // 32) * (34 if kind == 8 else 18)
    if n < 0 or b.shape[0] != need:
        raise SizeMismatch("payload", f"{'Q8_0' if kind == 8 else 'Q4_0'} of {n} values takes {need} bytes, "
                           f"got {b.shape[0]}")
    out = _np.empty(n, _np.float32)
    cdef float[::1] y = out
    cdef const unsigned char *p = &b[0] if b.shape[0] else NULL
    cdef float *yp = &y[0] if n else NULL
    with nogil:
        if kind == 8:
            rz_dequantize_q8_0(p, yp, n)
        else:
            rz_dequantize_q4_0(p, yp, n)
    return out


def _f32_to_f16_bits(float f):
    """The binary16 bits of f, rounded to nearest even (exposed for tests)."""
    return rz_f32_to_f16(f)
