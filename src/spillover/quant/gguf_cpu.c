/* GGUF blocks as the file stores them, multiplied on the CPU in f32 (quant/gguf_kernels.py builds and loads
 * this file; the Python side passes data pointers through ctypes).
 *
 * Weights: rows of blocks of 32, each block a float16 scale d (+ a float16 minimum m for Q4_1) and its codes.
 *   Q4_0: 18 bytes, w = (q - 8) d;  Q4_1: 20 bytes, w = q d + m (q: 0..15; low nibbles are elements 0-15,
 *   high nibbles 16-31);  Q8_0: 34 bytes, w = q d (q: int8).
 * The codes are read as stored (0.56-1.06 bytes per weight); activations keep 15-16 significant bits (Q4
 * decode: bf16 hi + lo parts; Q8_0/Q5_0/Q4_K/Q6_K decode and all prompts: int16 per block of 32), scales and
 * accumulation are f32 (Q5_K, and `dequant`, reproduce the reference loader's f32 weights exactly). Rows are
 * split over OpenMP threads (torch's own OpenMP runtime: the library is loaded after torch, so libgomp is
 * shared).
 *
 *   gemv:    y[m, n] = sum_k x[m, k] w[n, k]   for a few rows m (decode)
 *   gemm:    the same for many rows of x (prompts) of all types but Q5_K; llama_prefill_qkv/_mlp: a Llama or
 *            Gemma 3 layer's prompt rows; llama_decode: a layer's decode step
 *   dequant: w[n, k] as f32 rows (Q5_K prompts: the caller multiplies with torch's GEMM)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 }; /* ggml type numbers */
#define MAXM 8

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, f = h & 1023, bits;
    if (e == 0) {
        if (f == 0) {
            bits = s;
        } else { /* subnormal */
            e = 113;
            while (!(f & 1024)) { f <<= 1; e--; }
            bits = s | (e << 23) | ((f & 1023) << 13);
        }
    } else if (e == 31) {
        bits = s | 0x7f800000u | (f << 13);
    } else {
        bits = s | ((e + 112) << 23) | (f << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

static inline int block_bytes(int t) {
    switch (t) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    default: return 210; /* Q6_K */
    }
}

static inline int block_size(int t) { return t >= Q4_K ? 256 : 32; }

/* Q5_0 and the k-quants: one block -> block_size(t) f32 weights, as gguf-py's numpy dequantization computes
 * them (same products, same rounding); loops the compiler vectorizes */
static void deq_wide(const uint8_t *b, int t, float *w) {
    if (t == Q5_0) { /* f16 d, 32 high bits, 16 bytes of nibbles: w = d (q - 16) */
        float d = h2f(b);
        uint32_t qh;
        memcpy(&qh, b + 2, 4);
        for (int i = 0; i < 16; i++) {
            w[i] = d * (float)((int)((b[6 + i] & 15) | (((qh >> i) & 1) << 4)) - 16);
            w[i + 16] = d * (float)((int)((b[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
        }
    } else if (t == Q4_K || t == Q5_K) { /* d, dmin, 12 bytes of 6-bit scales/mins, (Q5_K: 32 bytes qh), qs */
        float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t *sc = b + 4, *qh = t == Q5_K ? b + 16 : NULL, *qs = b + (t == Q5_K ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int s = j < 4 ? sc[j] & 63 : (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
            int m = j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
            float ds = d * (float)s, dm = dmin * (float)m;
            const uint8_t *q = qs + 32 * (j / 2);
            const int sh = (j % 2) * 4;
            for (int i = 0; i < 32; i++) {
                int v = (q[i] >> sh) & 15;
                if (qh) v |= ((qh[i] >> j) & 1) << 4;
                w[32 * j + i] = ds * (float)v - dm;
            }
        }
    } else { /* Q6_K: ql[128], qh[64], 16 int8 scales, f16 d: w = (d sc) (q - 32) */
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = h2f(b + 208);
        for (int r = 0; r < 8; r++) {
            const int h = r / 4, rr = r % 4, lsh = rr < 2 ? 0 : 4, hsh = 2 * rr;
            const uint8_t *l = ql + 64 * h + 32 * (rr % 2), *hh = qh + 32 * h;
            const float ds0 = d * (float)sc[2 * r], ds1 = d * (float)sc[2 * r + 1];
            for (int i = 0; i < 32; i++) {
                int v = (int)(((l[i] >> lsh) & 15) | (((hh[i] >> hsh) & 3) << 4)) - 32;
                w[32 * r + i] = (i < 16 ? ds0 : ds1) * (float)v;
            }
        }
    }
}

/* one block -> 32 f32 weights (scalar reference, also the fallback without AVX-512) */
static inline void deq_block(const uint8_t *b, int t, float *w) {
    if (t != Q4_0 && t != Q4_1 && t != Q8_0) {
        deq_wide(b, t, w);
        return;
    }
    float d = h2f(b);
    if (t == Q8_0) {
        for (int i = 0; i < 32; i++) w[i] = (float)(int8_t)b[2 + i] * d;
        return;
    }
    float m = t == Q4_1 ? h2f(b + 2) : -8.0f * d;
    const uint8_t *qs = b + (t == Q4_1 ? 4 : 2);
    for (int i = 0; i < 16; i++) {
        w[i] = __builtin_fmaf((float)(qs[i] & 15), d, m);
        w[i + 16] = __builtin_fmaf((float)(qs[i] >> 4), d, m);
    }
}

#if defined(__AVX512F__)
static inline void deq_block16(const uint8_t *b, int t, __m512 *lo, __m512 *hi) {
    __m512 d = _mm512_set1_ps(h2f(b));
    if (t == Q8_0) {
        __m128i q0 = _mm_loadu_si128((const __m128i *)(b + 2));
        __m128i q1 = _mm_loadu_si128((const __m128i *)(b + 18));
        *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
        *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
        return;
    }
    __m512 m = t == Q4_1 ? _mm512_set1_ps(h2f(b + 2)) : _mm512_mul_ps(_mm512_set1_ps(-8.0f), d);
    __m128i v = _mm_loadu_si128((const __m128i *)(b + (t == Q4_1 ? 4 : 2)));
    __m128i mask = _mm_set1_epi8(15);
    __m128i l = _mm_and_si128(v, mask), h = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(l)), d, m);
    *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(h)), d, m);
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define BF16_DOT 1
/* Q4 rows with bf16 dot products: the codes 0..15 are exact in bf16 and x is split into two bf16 parts
 * (hi + lo: 16 bits of mantissa), so q . x is exact to f32 accumulation:
 *   w . x = sum_b d_b (q_b . x_b) + m_b sum(x_b)   (Q4_0: m_b = -8 d_b)
 * xh, xl: [M, K] bf16; sx: [M, K / 32] block sums of x (f32). */
static inline __attribute__((always_inline)) void q4_rows_bf16_m(const uint8_t *W, int t, int64_t n0, int64_t n1,
                                                                  int64_t K, const uint16_t *xh,
                                                                  const uint16_t *xl, const float *sx, const int M,
                                                                  float *y, int64_t ldy) {
    const int64_t nb = K / 32, bb = block_bytes(t), rb = nb * bb;
    const int qo = t == Q4_1 ? 4 : 2;
    /* word k -> bf16 bits of float(k), k < 16 */
    const __m512i lut = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150,
                                         0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0,
                                         0x4080, 0x4040, 0x4000, 0x3F80, 0);
    const __m256i low4 = _mm256_set1_epi16(15);
    const int RR = M <= 2 ? 4 : 2; /* rows at a time: independent accumulation chains, x loaded once */
    for (int64_t n = n0; n < n1; n += RR) {
        const int R = n + RR <= n1 ? RR : (int)(n1 - n);
        __m512 acc[4][MAXM];
        float mins[4][MAXM];
        for (int r = 0; r < RR; r++)
            for (int m = 0; m < M; m++) { acc[r][m] = _mm512_setzero_ps(); mins[r][m] = 0.0f; }
        const char *next = (const char *)(W + (n + RR) * rb); /* the next rows, fetched while these compute */
        const int64_t step = (RR * rb + nb - 1) / nb;
        for (int64_t b = 0; b < nb; b++) {
            if (n + RR < n1) {
                _mm_prefetch(next + b * step, _MM_HINT_T0);
                _mm_prefetch(next + b * step + 64, _MM_HINT_T0);
            }
            __m512bh qb[4];
            __m512 vd[4];
            float mn[4];
            for (int r = 0; r < RR; r++) {
                const uint8_t *blk = W + (n + (r < R ? r : 0)) * rb + b * bb;
                int32_t dm;
                memcpy(&dm, blk, 4);
                __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(dm)); /* d, m (Q4_0: d, first code bytes) */
                float d = _mm_cvtss_f32(f);
                mn[r] = t == Q4_1 ? _mm_cvtss_f32(_mm_shuffle_ps(f, f, 1)) : -8.0f * d;
                __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + qo)));
                __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(w, low4)),
                                               _mm256_srli_epi16(w, 4), 1);
                qb[r] = (__m512bh)_mm512_permutexvar_epi16(q, lut);
                vd[r] = _mm512_broadcastss_ps(f);
            }
            for (int m = 0; m < M; m++) {
                const int64_t o = m * K + b * 32;
                __m512bh h = (__m512bh)_mm512_loadu_si512(xh + o), l = (__m512bh)_mm512_loadu_si512(xl + o);
                for (int r = 0; r < RR; r++) {
                    __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[r], h);
                    s = _mm512_dpbf16_ps(s, qb[r], l);
                    acc[r][m] = _mm512_fmadd_ps(s, vd[r], acc[r][m]);
                    mins[r][m] = __builtin_fmaf(mn[r], sx[m * nb + b], mins[r][m]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]) + mins[r][m];
    }
}

/* the row loop with M a constant (accumulators in registers) */
static void q4_rows_bf16(const uint8_t *W, int t, int64_t n0, int64_t n1, int64_t K, const uint16_t *xh,
                         const uint16_t *xl, const float *sx, int M, float *y, int64_t ldy) {
    switch (M) {
#define CASE(c)                                                                  \
    case c:                                                                      \
        if (t == Q4_1) q4_rows_bf16_m(W, Q4_1, n0, n1, K, xh, xl, sx, c, y, ldy); \
        else q4_rows_bf16_m(W, Q4_0, n0, n1, K, xh, xl, sx, c, y, ldy);          \
        break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

/* x [M, K] f32 -> hi, lo bf16 parts and block sums */
static void split_x(const float *x, int64_t M, int64_t K, uint16_t *xh, uint16_t *xl, float *sx) {
    for (int64_t i = 0; i < M * K; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m256bh h = _mm512_cvtneps_pbh(v);
        __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
        _mm256_storeu_si256((__m256i *)(xh + i), (__m256i)h);
        _mm256_storeu_si256((__m256i *)(xl + i), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
    }
    for (int64_t j = 0; j < M * K / 32; j++)
        sx[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x + 32 * j), _mm512_loadu_ps(x + 32 * j + 16)));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define WIDE16 1
/* deq_wide with AVX-512 (the same products and roundings) */
static inline void deq_wide16(const uint8_t *b, int t, float *w) {
    const __m256i m15 = _mm256_set1_epi8(15);
    if (t == Q5_0) {
        __m512 d = _mm512_set1_ps(h2f(b));
        uint32_t qh;
        memcpy(&qh, b + 2, 4);
        __m128i v = _mm_loadu_si128((const __m128i *)(b + 6)), m = _mm_set1_epi8(15);
        __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(v, m)), hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), m));
        const __m512i s16 = _mm512_set1_epi32(16);
        lo = _mm512_sub_epi32(_mm512_mask_or_epi32(lo, (__mmask16)qh, lo, s16), s16);
        hi = _mm512_sub_epi32(_mm512_mask_or_epi32(hi, (__mmask16)(qh >> 16), hi, s16), s16);
        _mm512_storeu_ps(w, _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)));
        _mm512_storeu_ps(w + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)));
    } else if (t == Q4_K || t == Q5_K) {
        float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t *sc = b + 4, *qs = b + (t == Q5_K ? 48 : 16);
        const __m256i qh = t == Q5_K ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            int s = j < 4 ? sc[j] & 63 : (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
            int m = j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
            __m512 ds = _mm512_set1_ps(d * (float)s), dm = _mm512_set1_ps(dmin * (float)m);
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * (j / 2)));
            v = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, m15);
            if (t == Q5_K) {
                __m256i h = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
                v = _mm256_or_si256(v, _mm256_slli_epi16(h, 4));
            }
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(v)));
            __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1)));
            _mm512_storeu_ps(w + 32 * j, _mm512_fmsub_ps(a, ds, dm)); /* ds v exact: one rounding, as numpy */
            _mm512_storeu_ps(w + 32 * j + 16, _mm512_fmsub_ps(c, ds, dm));
        }
    } else { /* Q6_K */
        const uint8_t *ql = b, *qhp = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = h2f(b + 208);
        for (int r = 0; r < 8; r++) {
            const int h = r / 4, rr = r % 4;
            __m256i l = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32 * (rr % 2)));
            l = _mm256_and_si256(rr < 2 ? l : _mm256_srli_epi16(l, 4), m15);
            __m256i hh = _mm256_loadu_si256((const __m256i *)(qhp + 32 * h));
            hh = _mm256_and_si256(_mm256_srl_epi16(hh, _mm_cvtsi32_si128(2 * rr)), _mm256_set1_epi8(3));
            __m256i q = _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16(hh, 4)), _mm256_set1_epi8(32));
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
            _mm512_storeu_ps(w + 32 * r, _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 * r]), a));
            _mm512_storeu_ps(w + 32 * r + 16, _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[2 * r + 1]), c));
        }
    }
}
#define DEQ_WIDE deq_wide16
#else
#define DEQ_WIDE deq_wide
#endif

/* y[m * ldy + n] = x[m * ldx + :] . w[n, :], m < M (M <= MAXM per pass), n < N; K a multiple of 32 */
/* y[m * ldy + n] = x[m * ldx + :] . w[n, :], m < M (M <= MAXM per pass), n < N; K a multiple of 32 */
static inline __attribute__((always_inline)) void gemv_rows_m(const uint8_t *W, int t, int64_t n0, int64_t n1,
                                                               int64_t K, const float *x, int64_t ldx, const int M,
                                                               float *y, int64_t ldy) {
    const int64_t QK = block_size(t), nb = K / QK, bb = block_bytes(t), rb = nb * bb;
    const int narrow = t == Q4_0 || t == Q4_1 || t == Q8_0;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = W + n * rb;
#if defined(__AVX512F__)
        __m512 acc[MAXM], acc2[MAXM]; /* two chains: the FMAs' latency overlaps */
        float w[256];
        for (int m = 0; m < M; m++) acc[m] = acc2[m] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            if (n + 2 < n1) { /* two rows ahead, fetched while this one computes */
                _mm_prefetch((const char *)(row + 2 * rb + b * bb), _MM_HINT_T0);
                if (bb > 64) _mm_prefetch((const char *)(row + 2 * rb + b * bb + 64), _MM_HINT_T0);
                if (bb > 128) _mm_prefetch((const char *)(row + 2 * rb + b * bb + 128), _MM_HINT_T0);
                if (bb > 192) _mm_prefetch((const char *)(row + 2 * rb + b * bb + 192), _MM_HINT_T0);
            }
            if (narrow) {
                __m512 lo, hi;
                deq_block16(row + b * bb, t, &lo, &hi);
                for (int m = 0; m < M; m++) {
                    const float *xb = x + m * ldx + b * 32;
                    acc[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[m]);
                    acc2[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc2[m]);
                }
                continue;
            }
            DEQ_WIDE(row + b * bb, t, w);
            for (int m = 0; m < M; m++) {
                const float *xb = x + m * ldx + b * QK;
                for (int i = 0; i < QK; i += 32) {
                    acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(xb + i), acc[m]);
                    acc2[m] = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(xb + i + 16), acc2[m]);
                }
            }
        }
        for (int m = 0; m < M; m++) y[m * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], acc2[m]));
#else
        float acc[MAXM][32], w[256];
        memset(acc, 0, sizeof(acc));
        for (int64_t b = 0; b < nb; b++) {
            deq_block(row + b * bb, t, w);
            for (int m = 0; m < M; m++) {
                const float *xb = x + m * ldx + b * QK;
                for (int i = 0; i < QK; i++) acc[m][i % 32] += w[i] * xb[i];
            }
        }
        for (int m = 0; m < M; m++) {
            float s = 0;
            for (int i = 0; i < 32; i++) s += acc[m][i];
            y[m * ldy + n] = s;
        }
#endif
    }
}

static void gemv_rows(const uint8_t *W, int t, int64_t n0, int64_t n1, int64_t K, const float *x, int64_t ldx,
                      int M, float *y, int64_t ldy) {
    switch (M) {
#define CASE(c) case c: gemv_rows_m(W, t, n0, n1, K, x, ldx, c, y, ldy); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q8_I16 1
/* Q8_0 / Q5_0 rows with int16 dot products (VNNI vpdpwssd): x quantized per row and block of 32 to int16 (an
 * error of at most 2^-16 of the block's largest |x|), each block's exact integer dot scaled by d_b s_b in f32:
 *   w . x = sum_b d_b s_b (q_b . xq_b)      xq: [M, K] int16, xs: [M, K / 32]; Q5_0's q: 5-bit codes - 16 */
static inline __attribute__((always_inline)) void q8_rows_i16_m(const uint8_t *W, const int t, int64_t n0,
                                                                int64_t n1, int64_t K, const int16_t *xq,
                                                                const float *xs, const int M, float *y,
                                                                int64_t ldy, const uint8_t *off, const float *sx) {
    /* off (Q8_0 only; NULL: none): f16 [N, K / 32] offsets m of w = d (q + 128) + m (isq 8's groups), added as
     * (m + 128 d) sum(x_b) with sx the f32 sums of x per block */
    const int bb = t == Q8_0 ? 34 : 22;
    const int64_t nb = K / 32, rb = nb * bb;
    const __m256i m15 = _mm256_set1_epi16(15);
    const __m512i k16 = _mm512_set1_epi16(16);
    const int RR = M <= 2 ? 4 : 2;
    for (int64_t n = n0; n < n1; n += RR) {
        const int R = n + RR <= n1 ? RR : (int)(n1 - n);
        __m512 acc[4][MAXM];
        float oacc[4][MAXM];
        for (int r = 0; r < RR; r++)
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps(), oacc[r][m] = 0.0f;
        const char *next = (const char *)(W + (n + RR) * rb);
        const int64_t step = (RR * rb + nb - 1) / nb;
        for (int64_t b = 0; b < nb; b++) {
            if (n + RR < n1) {
                _mm_prefetch(next + b * step, _MM_HINT_T0);
                _mm_prefetch(next + b * step + 64, _MM_HINT_T0);
            }
            for (int r = 0; r < RR; r++) {
                const uint8_t *blk = W + (n + (r < R ? r : 0)) * rb + b * bb;
                const float d = h2f(blk);
                __m512i w;
                if (t == Q8_0) {
                    w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 2)));
                } else { /* nibbles (elements j, j + 16) with bit 4 from qh, minus 16 */
                    uint32_t qh;
                    memcpy(&qh, blk + 2, 4);
                    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + 6)));
                    w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m15)), _mm256_srli_epi16(v, 4), 1);
                    w = _mm512_mask_add_epi16(_mm512_sub_epi16(w, k16), (__mmask32)qh, _mm512_sub_epi16(w, k16), k16);
                }
                for (int m = 0; m < M; m++) {
                    __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w,
                                                    _mm512_loadu_si512(xq + (m * nb + b) * 32));
                    acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(d * xs[m * nb + b]), acc[r][m]);
                }
                if (off) {
                    const float c = h2f(off + 2 * ((n + (r < R ? r : 0)) * nb + b)) + 128.0f * d;
                    for (int m = 0; m < M; m++) oacc[r][m] += c * sx[m * nb + b];
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]) + oacc[r][m];
    }
}

static void q8_rows_i16(const uint8_t *W, int t, int64_t n0, int64_t n1, int64_t K, const int16_t *xq, const float *xs,
                        int M, float *y, int64_t ldy) {
    switch (M) {
#define CASE(c)                                                                      \
    case c:                                                                          \
        if (t == Q8_0) q8_rows_i16_m(W, Q8_0, n0, n1, K, xq, xs, c, y, ldy, NULL, NULL); \
        else q8_rows_i16_m(W, Q5_0, n0, n1, K, xq, xs, c, y, ldy, NULL, NULL);          \
        break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

#ifdef BF16_DOT
#define K_I16 1
/* Q4_K / Q6_K rows with int16 dot products per sub-block of 32 (as q8_rows_i16; Q4_K's minimums through the
 * f32 block sums sx of x):  Q4_K: w . x = sum_j (d sc_j) s_j (q_j . xq_j) - (dmin m_j) sum(x_j)
 *                           Q6_K: w . x = sum_j d s_j (sc_j0 (q . xq)[0:16] + sc_j1 (q . xq)[16:32])  (q - 32) */
static inline __attribute__((always_inline)) void k_rows_i16_m(const uint8_t *W, const int t, int64_t n0, int64_t n1,
                                                               int64_t K, const int16_t *xq, const float *xs,
                                                               const float *sx, const int M, float *y,
                                                               int64_t ldy) {
    const int bb = t == Q4_K ? 144 : 210;
    const int64_t nb = K / 256, rb = nb * bb, n32 = K / 32;
    const __m512i m15 = _mm512_set1_epi16(15), m3 = _mm512_set1_epi16(3), k32 = _mm512_set1_epi16(32);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = W + n * rb;
        __m512 acc[MAXM], acc2[MAXM];
        float mins[MAXM];
        for (int m = 0; m < M; m++) acc[m] = acc2[m] = _mm512_setzero_ps(), mins[m] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            if (n + 1 < n1)
                for (int o = 0; o < bb; o += 64) _mm_prefetch((const char *)(blk + rb + o), _MM_HINT_T0);
            if (t == Q4_K) {
                const float d = h2f(blk), dmin = h2f(blk + 2);
                const uint8_t *sc = blk + 4, *qs = blk + 16;
                for (int c = 0; c < 4; c++) {
                    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(qs + 32 * c)));
                    const __m512i q0 = _mm512_and_si512(v, m15), q1 = _mm512_srli_epi16(v, 4);
                    float ds[2], dm[2];
                    for (int h = 0; h < 2; h++) {
                        const int j = 2 * c + h;
                        const int s6 = j < 4 ? sc[j] & 63 : (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
                        const int m6 = j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
                        ds[h] = d * (float)s6, dm[h] = dmin * (float)m6;
                    }
                    for (int m = 0; m < M; m++) {
                        const int64_t xb = m * n32 + 8 * b + 2 * c;
                        __m512i s0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q0, _mm512_loadu_si512(xq + xb * 32));
                        __m512i s1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q1, _mm512_loadu_si512(xq + xb * 32 + 32));
                        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_set1_ps(ds[0] * xs[xb]), acc[m]);
                        acc2[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(ds[1] * xs[xb + 1]), acc2[m]);
                        mins[m] += dm[0] * sx[xb] + dm[1] * sx[xb + 1];
                    }
                }
            } else {
                const uint8_t *ql = blk, *qh = blk + 128;
                const int8_t *sc = (const int8_t *)(blk + 192);
                const float d = h2f(blk + 208);
                for (int r = 0; r < 8; r++) {
                    const int h = r / 4, rr = r % 4, lsh = rr < 2 ? 0 : 4, hsh = 2 * rr;
                    const __m512i l = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32 * (rr % 2))));
                    const __m512i hh = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(qh + 32 * h)));
                    __m512i q = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, lsh), m15),
                                                _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hh, hsh), m3), 4));
                    q = _mm512_sub_epi16(q, k32);
                    const __m512 dsv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d * (float)sc[2 * r]),
                                                            _mm512_set1_ps(d * (float)sc[2 * r + 1]));
                    for (int m = 0; m < M; m++) {
                        const int64_t xb = m * n32 + 8 * b + r;
                        __m512i s0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(xq + xb * 32));
                        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s0), dsv);
                        if (r & 1) acc2[m] = _mm512_fmadd_ps(f, _mm512_set1_ps(xs[xb]), acc2[m]);
                        else acc[m] = _mm512_fmadd_ps(f, _mm512_set1_ps(xs[xb]), acc[m]);
                    }
                }
            }
        }
        for (int m = 0; m < M; m++) y[m * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], acc2[m])) - mins[m];
    }
}

static void k_rows_i16(const uint8_t *W, int t, int64_t n0, int64_t n1, int64_t K, const int16_t *xq, const float *xs,
                       const float *sx, int M, float *y, int64_t ldy) {
    switch (M) {
#define CASE(c)                                                                  \
    case c:                                                                      \
        if (t == Q4_K) k_rows_i16_m(W, Q4_K, n0, n1, K, xq, xs, sx, c, y, ldy);   \
        else k_rows_i16_m(W, Q6_K, n0, n1, K, xq, xs, sx, c, y, ldy);            \
        break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}
#endif

/* x [M, K] -> int16 per block of 32 (natural order) and the blocks' scales */
static void quant16(const float *x, int64_t M, int64_t K, int16_t *xq, float *xs) {
    for (int64_t i = 0; i < M * K / 32; i++) {
        __m512 a = _mm512_loadu_ps(x + 32 * i), b = _mm512_loadu_ps(x + 32 * i + 16);
        float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        __m512 inv = _mm512_set1_ps(mx > 0 ? 32767.0f / mx : 0.0f);
        xs[i] = mx / 32767.0f;
        __m256i qa = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)));
        __m256i qb = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv)));
        _mm512_storeu_si512(xq + 32 * i, _mm512_inserti64x4(_mm512_castsi256_si512(qa), qb, 1));
    }
}
#endif

/* An input of M rows [M, K] in the forms the kernels read: f32, for Q4 the bf16 parts and block sums, for Q8_0
 * int16 per block. */
typedef struct {
    const float *x;
    uint16_t *xh, *xl;
    float *sx;
    int16_t *xq;
    float *xs;
    int64_t M, K;
} Act;

static size_t act_bytes(int64_t M, int64_t K) { return (size_t)(M * K * 6 + M * K / 4 + 512); }

/* fill the bf16 parts (mem: act_bytes(M, K)) */
static void act_init(Act *a, const float *x, int64_t M, int64_t K, void *mem) {
    a->x = x, a->M = M, a->K = K;
    a->xh = mem, a->xl = a->xh + M * K, a->sx = (float *)(a->xl + M * K);
    a->xq = (int16_t *)(a->sx + M * K / 32), a->xs = (float *)(a->xq + M * K);
#ifdef BF16_DOT
    split_x(x, M, K, a->xh, a->xl, a->sx);
#endif
#ifdef Q8_I16
    if (K % 32 == 0) quant16(x, M, K, a->xq, a->xs);
#endif
}

static void rows_of(int64_t N, int id, int nt, int64_t *a, int64_t *e) {
    int64_t per = (N / nt + 15) / 16 * 16; /* whole cache lines of y per thread */
    *a = id * per < N ? id * per : N;
    *e = *a + per < N ? *a + per : N;
}

/* this thread's share (id of nt) of y [M, N] = x W^T */
static void mv_part_ld(const uint8_t *W, int t, int64_t N, const Act *x, float *y, int64_t ldy, int id, int nt) {
    int64_t a, e;
    rows_of(N, id, nt, &a, &e);
    if (a >= e) return;
    for (int64_t m0 = 0; m0 < x->M; m0 += MAXM) {
        int M1 = (int)(x->M - m0 < MAXM ? x->M - m0 : MAXM);
#ifdef BF16_DOT
        if (t == Q4_0 || t == Q4_1) {
            q4_rows_bf16(W, t, a, e, x->K, x->xh + m0 * x->K, x->xl + m0 * x->K, x->sx + m0 * (x->K / 32), M1,
                         y + m0 * ldy, ldy);
            continue;
        }
#endif
#ifdef Q8_I16
        if (t == Q8_0 || t == Q5_0) {
            q8_rows_i16(W, t, a, e, x->K, x->xq + m0 * x->K, x->xs + m0 * (x->K / 32), M1, y + m0 * ldy, ldy);
            continue;
        }
#endif
#ifdef K_I16
        if (t == Q4_K || t == Q6_K) {
            k_rows_i16(W, t, a, e, x->K, x->xq + m0 * x->K, x->xs + m0 * (x->K / 32), x->sx + m0 * (x->K / 32), M1,
                       y + m0 * ldy, ldy);
            continue;
        }
#endif
        gemv_rows(W, t, a, e, x->K, x->x + m0 * x->K, x->K, M1, y + m0 * ldy, ldy);
    }
}

static void mv_part(const uint8_t *W, int t, int64_t N, const Act *x, float *y, int id, int nt) {
    mv_part_ld(W, t, N, x, y, N, id, nt);
}

#ifdef _OPENMP
#define THREAD_ID() omp_get_thread_num()
#define THREADS() omp_get_num_threads()
#else
#define THREAD_ID() 0
#define THREADS() 1
#endif

/* y [M, N] = x [M, K] W^T, W: N rows of type t. Rows of W split over `threads` OpenMP threads. */
void gguf_gemv(const uint8_t *W, int t, int64_t N, int64_t K, const float *x, int64_t M, float *y,
               int threads) {
    void *mem = malloc(act_bytes(M, K));
    if (!mem) return;
    Act act;
    act_init(&act, x, M, K, mem);
#pragma omp parallel num_threads(threads) if (threads > 1 && N >= 64)
    mv_part(W, t, N, &act, y, THREAD_ID(), THREADS());
    free(mem);
}

/* isq 8 on the CPU (quant/isq.Int8Linear, blocks layout): y [M, N] = x W^T for Q8_0 rows W whose groups also
 * carry an f16 offset m (off [N, K / 32]): w = d (q + 128) + m, codes q + 128 in 0..255. The offsets' term
 * (m + 128 d) sum(x_b) is added per block inside the int16 kernel, so nothing is recomputed per call. */
void gguf_gemv_q8_off(const uint8_t *W, const uint8_t *off, int64_t N, int64_t K, const float *x, int64_t M,
                      float *y, int threads) {
    const int64_t nb = K / 32;
    float *sx = malloc((size_t)(M * nb) * sizeof(float));
    if (!sx) return;
    for (int64_t i = 0; i < M * nb; i++) {
        float s = 0.0f;
        for (int j = 0; j < 32; j++) s += x[32 * i + j];
        sx[i] = s;
    }
#ifdef Q8_I16
    int16_t *xq = malloc((size_t)(M * K) * sizeof(int16_t));
    float *xs = malloc((size_t)(M * nb) * sizeof(float));
    if (xq && xs) {
        quant16(x, M, K, xq, xs);
#pragma omp parallel num_threads(threads) if (threads > 1 && N >= 64)
        {
            int64_t a, e;
            rows_of(N, THREAD_ID(), THREADS(), &a, &e);
            for (int64_t m0 = 0; a < e && m0 < M; m0 += MAXM) {
                const int M1 = (int)(M - m0 < MAXM ? M - m0 : MAXM);
                const int16_t *q = xq + m0 * K;
                const float *s = xs + m0 * nb, *t = sx + m0 * nb;
                float *yy = y + m0 * N;
                switch (M1) {
#define CASE(c) \
    case c: q8_rows_i16_m(W, Q8_0, a, e, K, q, s, c, yy, N, off, t); break;
                    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
                }
            }
        }
        free(xq), free(xs), free(sx);
        return;
    }
    free(xq), free(xs);
#endif
    gguf_gemv(W, Q8_0, N, K, x, M, y, threads); /* then the offsets' term, reading d again */
#pragma omp parallel for num_threads(threads) if (threads > 1 && N >= 64)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++) {
            const float c = h2f(off + 2 * (n * nb + b)) + 128.0f * h2f(W + (n * nb + b) * 34);
            for (int64_t m = 0; m < M; m++) y[m * N + n] += c * sx[m * nb + b];
        }
    free(sx);
}

static void rms_norm(const float *x, const float *w, float eps, int64_t H, float *out) {
    double ss = 0;
    int64_t i0 = 0;
#if defined(__AVX512F__)
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (; i0 + 16 <= H; i0 += 16) {
        const __m512 v = _mm512_loadu_ps(x + i0);
        const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        s0 = _mm512_fmadd_pd(a, a, s0), s1 = _mm512_fmadd_pd(b, b, s1);
    }
    ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
#endif
    for (int64_t i = i0; i < H; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / H) + eps);
    for (int64_t i = 0; i < H; i++) out[i] = x[i] * r * w[i];
}

/* One Llama-style decoder layer for T decoding rows, all in f32 with the weights as GGUF blocks:
 *   x += o(attn(rope(qkv(norm1(x)))));  x += down(silu(gate) * up)(norm2(x))
 * Gemma 3 adds q/k norms per head, norms of the attention and MLP outputs (lnpa, lnpf) and GELU-tanh; its
 * qkv may be two parts of different types (Q5_0 q/k, Q8_0 v).
 * Row i's new K/V go to cache slot `slot[i]`; it attends to slots dec_slots[i, :lens[i]] (lens NULL: L).
 * cos/sin [T, rot]: rotate-half tables (sin's first half negated); the first `rot` of hd channels turn.
 * Caches [S, nkv, hd] f32. One OpenMP region; the phases meet at barriers. */
typedef struct {
    int64_t T, H, nh, nkv, hd, rot, I, L;
    float eps, scale;
    const float *ln1, *ln2, *bqkv; /* bqkv: NULL or [(nh + 2 nkv) hd] */
    const uint8_t *wqkv, *wo, *wgu, *wd;
    int tqkv, to, tgu, td;
    const float *cos, *sin;
    float *kc, *vc;
    const int64_t *slot, *dec_slots;
    const int32_t *lens;
    /* Gemma 3 / Qwen3 (0 / NULL where a layer has none): */
    int64_t nqkv1;            /* rows of wqkv when the projection has two parts (the rest in wqkv2, type tqkv2) */
    const float *qn, *kn;     /* RMSNorm of each q / k head [hd] (before rope) */
    const float *lnpa, *lnpf; /* RMSNorm of the attention / MLP output before its residual add (ln2: pre-MLP) */
    const uint8_t *wqkv2;
    int tqkv2, act;           /* act: 0 SiLU, 1 GELU (tanh) */
} Layer;

static void attend(const Layer *l, const float *q, int64_t t, int64_t h, float *p, float *o) {
    const int64_t hd = l->hd, kvh = h / (l->nh / l->nkv), n = l->lens ? l->lens[t] : l->L;
    const int64_t *sl = l->dec_slots + t * l->L;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        const float *k = l->kc + (sl[j] * l->nkv + kvh) * hd;
        float s = 0;
#if defined(__AVX512F__)
        if (hd % 16 == 0) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < hd; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + i), acc);
            s = _mm512_reduce_add_ps(acc);
        } else
#endif
            for (int64_t i = 0; i < hd; i++) s += q[i] * k[i];
        p[j] = s * l->scale;
        mx = p[j] > mx ? p[j] : mx;
    }
    float sum = 0;
    for (int64_t j = 0; j < n; j++) sum += (p[j] = expf(p[j] - mx));
    for (int64_t i = 0; i < hd; i++) o[i] = 0;
    for (int64_t j = 0; j < n; j++) {
        const float *v = l->vc + (sl[j] * l->nkv + kvh) * hd, pj = p[j] / sum;
        for (int64_t i = 0; i < hd; i++) o[i] += pj * v[i];
    }
}

static void rope(float *x, const float *c, const float *s, int64_t rot) {
    float tmp[512];
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < half; i++) tmp[i] = x[i] * c[i] + x[i + half] * s[i];
    for (int64_t i = half; i < rot; i++) tmp[i] = x[i] * c[i] + x[i - half] * s[i];
    memcpy(x, tmp, rot * sizeof(float));
}

/* Row t of a layer's qkv after the projection, in place: its bias, the per-head q / k norms, rope; then its K
 * and V written to cache slot[t] (decode and prompt rows alike) */
static void qkv_row(const Layer *l, float *r, int64_t t) {
    const int64_t hd = l->hd, nq = l->nh * hd, nkvd = l->nkv * hd, QKV = nq + 2 * nkvd;
    if (l->bqkv)
        for (int64_t i = 0; i < QKV; i++) r[i] += l->bqkv[i];
    if (l->qn)
        for (int64_t h = 0; h < l->nh + l->nkv; h++)
            rms_norm(r + h * hd, h < l->nh ? l->qn : l->kn, l->eps, hd, r + h * hd);
    for (int64_t h = 0; h < l->nh + l->nkv; h++) rope(r + h * hd, l->cos + t * l->rot, l->sin + t * l->rot, l->rot);
    memcpy(l->kc + l->slot[t] * nkvd, r + nq, nkvd * 4);
    memcpy(l->vc + l->slot[t] * nkvd, r + nq + nkvd, nkvd * 4);
}

/* one row's residual add of a block's output: x += lnp(blk) (Gemma 3's output norms; lnp NULL: x += blk) */
static void residual_add(const float *lnp, float eps, float *x, float *blk, int64_t H) {
    if (lnp) rms_norm(blk, lnp, eps, H, blk);
    for (int64_t i = 0; i < H; i++) x[i] += blk[i];
}

int gguf_llama_decode(const Layer *l, float *x, int threads) {
    const int64_t T = l->T, H = l->H, hd = l->hd, nq = l->nh * hd, nkvd = l->nkv * hd, QKV = nq + 2 * nkvd;
    const int64_t I = l->I, KMAX = H > I ? (H > nq ? H : nq) : (I > nq ? I : nq);
    if (l->rot > 512 || l->rot > hd) return -1;
    /* scratch: normed x, qkv, attention out, block out, gate_up, act, probabilities, Act buffers */
    size_t nf = T * (H + QKV + nq + H + 2 * I + I) + T * l->nh * l->L;
    float *buf = malloc(nf * 4 + act_bytes(T, KMAX));
    if (!buf) return -2;
    float *xn = buf, *qkv = xn + T * H, *att = qkv + T * QKV, *blk = att + T * nq, *gu = blk + T * H,
          *act = gu + T * 2 * I, *prob = act + T * I;
    void *am = prob + T * l->nh * l->L;
    Act a;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int id = THREAD_ID(), nt = THREADS();
#pragma omp single
        {
            for (int64_t t = 0; t < T; t++) rms_norm(x + t * H, l->ln1, l->eps, H, xn + t * H);
            act_init(&a, xn, T, H, am);
        }
        if (l->nqkv1) {
            mv_part_ld(l->wqkv, l->tqkv, l->nqkv1, &a, qkv, QKV, id, nt);
            mv_part_ld(l->wqkv2, l->tqkv2, QKV - l->nqkv1, &a, qkv + l->nqkv1, QKV, id, nt);
        } else {
            mv_part(l->wqkv, l->tqkv, QKV, &a, qkv, id, nt);
        }
#pragma omp barrier
#pragma omp single
        for (int64_t t = 0; t < T; t++) qkv_row(l, qkv + t * QKV, t);
#pragma omp for schedule(static)
        for (int64_t th = 0; th < T * l->nh; th++) {
            int64_t t = th / l->nh, h = th % l->nh;
            attend(l, qkv + t * QKV + h * hd, t, h, prob + th * l->L, att + t * nq + h * hd);
        }
#pragma omp single
        act_init(&a, att, T, nq, am);
        mv_part(l->wo, l->to, H, &a, blk, id, nt);
#pragma omp barrier
#pragma omp single
        {
            for (int64_t t = 0; t < T; t++) {
                residual_add(l->lnpa, l->eps, x + t * H, blk + t * H, H);
                rms_norm(x + t * H, l->ln2, l->eps, H, xn + t * H);
            }
            act_init(&a, xn, T, H, am);
        }
        mv_part(l->wgu, l->tgu, 2 * I, &a, gu, id, nt);
#pragma omp barrier
#pragma omp single
        {
            for (int64_t t = 0; t < T; t++)
                for (int64_t i = 0; i < I; i++) {
                    float g = gu[t * 2 * I + i];
                    act[t * I + i] = (l->act ? 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                                             : g / (1.0f + expf(-g))) * gu[t * 2 * I + I + i];
                }
            act_init(&a, act, T, I, am);
        }
        mv_part(l->wd, l->td, H, &a, blk, id, nt);
#pragma omp barrier
#pragma omp single
        for (int64_t t = 0; t < T; t++) residual_add(l->lnpf, l->eps, x + t * H, blk + t * H, H);
    }
    free(buf);
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GEMM_I16 1
/* Prompts: y [M, N] = x [M, K] W^T for Q4_0 / Q4_1 rows W, a tiled GEMM of int16 dot products (VNNI vpdpwssd)
 * straight from the codes (llama.cpp's repacked-layout idea, done per call): each panel of 32 rows of W is
 * unpacked into a scratch buffer (per block b and pair j < 16, the 32 rows' codes j and j + 16 as an int16
 * pair), and x is quantized per row and block to int16 (s = max |x_b| / 32767: an error of at most s / 2 per
 * element, 15 bits against the block's largest; bf16 activations, 8 bits per element, cost 4% of SmolLM2's
 * top-1 agreement). 6 rows of x x 32 rows of W accumulate in registers:
 *   y = sum_b d_b s_b (q_b . xq_b) + m_b sum(x_b)      (exact integer dots; scales, sums, accumulation f32) */
#define GEMM_NR 32
#define GEMM_MR 6

/* byte c -> the int16 pair (c & 15, c >> 4) */
static uint32_t PAIR_LUT[256];
static void pair_lut_init(void) {
    if (PAIR_LUT[255]) return;
    for (uint32_t c = 0; c < 256; c++) PAIR_LUT[c] = (c & 15) | (c >> 4) << 16;
}

/* 16 rows' 16 dwords (v[r]: row r's) -> pp[j * ld + r]: dword j of the 16 rows side by side */
static inline void transpose16_store(__m512i *v, uint32_t *pp, int64_t ld) {
    __m512i u[16];
    for (int r = 0; r < 16; r += 2) {
        u[r] = _mm512_unpacklo_epi32(v[r], v[r + 1]);
        u[r + 1] = _mm512_unpackhi_epi32(v[r], v[r + 1]);
    }
    for (int r = 0; r < 16; r += 4) {
        v[r] = _mm512_unpacklo_epi64(u[r], u[r + 2]);
        v[r + 1] = _mm512_unpackhi_epi64(u[r], u[r + 2]);
        v[r + 2] = _mm512_unpacklo_epi64(u[r + 1], u[r + 3]);
        v[r + 3] = _mm512_unpackhi_epi64(u[r + 1], u[r + 3]);
    }
    for (int h = 0; h < 16; h += 8)
        for (int r = 0; r < 4; r++) {
            u[h + r] = _mm512_shuffle_i32x4(v[h + r], v[h + r + 4], 0x88);
            u[h + r + 4] = _mm512_shuffle_i32x4(v[h + r], v[h + r + 4], 0xdd);
        }
    for (int r = 0; r < 8; r++) {
        _mm512_storeu_si512(pp + r * ld, _mm512_shuffle_i32x4(u[r], u[r + 8], 0x88));
        _mm512_storeu_si512(pp + (r + 8) * ld, _mm512_shuffle_i32x4(u[r], u[r + 8], 0xdd));
    }
}

/* rows n0 .. n0 + 32 of W (fewer at the end: zeros) -> P [nb][16][32] pairs, D, Mn [nb][32] */
static void gemm_unpack(const uint8_t *W, int t, int64_t n0, int64_t N, int64_t nb, uint32_t *P, float *D,
                        float *Mn) {
    const int64_t bb = block_bytes(t), rb = nb * bb, qo = t == Q4_1 ? 4 : 2;
    for (int r = 0; r < GEMM_NR; r++) {
        if (n0 + r >= N) {
            for (int64_t b = 0; b < nb; b++) {
                for (int j = 0; j < 16; j++) P[(b * 16 + j) * GEMM_NR + r] = 0;
                D[b * GEMM_NR + r] = 0, Mn[b * GEMM_NR + r] = 0;
            }
            continue;
        }
        const uint8_t *row = W + (n0 + r) * rb;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            float d = h2f(blk);
            D[b * GEMM_NR + r] = d;
            Mn[b * GEMM_NR + r] = t == Q4_1 ? h2f(blk + 2) : -8.0f * d;
            if ((n0 + 16 <= N && r < 16) || n0 + GEMM_NR <= N) continue; /* the pairs: transposed below */
            uint32_t *pp = P + b * 16 * GEMM_NR + r;
            for (int j = 0; j < 16; j++) pp[j * GEMM_NR] = PAIR_LUT[blk[qo + j]];
        }
    }
    /* whole groups of 16 rows: per block, 16 rows x 16 pairs made in registers and transposed */
    const __m512i m15 = _mm512_set1_epi32(15);
    for (int g = 0; g < GEMM_NR && n0 + g + 16 <= N; g += 16)
        for (int64_t b = 0; b < nb; b++) {
            __m512i v[16];
            for (int r = 0; r < 16; r++) {
                __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(W + (n0 + g + r) * rb + b * bb + qo)));
                v[r] = _mm512_or_si512(_mm512_and_si512(c, m15), _mm512_slli_epi32(_mm512_srli_epi32(c, 4), 16));
            }
            transpose16_store(v, P + b * 16 * GEMM_NR + g, GEMM_NR);
        }
}

/* natural pairs: sub-block b (32 weights) of a row of type t (Q5_0, Q8_0, Q4_K, Q6_K) -> its 32 codes as int16
 * in order (pair j: elements 2 j, 2 j + 1), with w = d0 q (elements 0-15), d1 q (16-31), + mn: Q5_0 and Q6_K's
 * offsets (16, 32) are taken off the codes, Q4_K's minimum is mn = -dmin m */
static inline __m512i codes_nat(const uint8_t *row, const int t, int64_t b, float *d0, float *d1, float *mn) {
    *mn = 0.0f;
    if (t == Q8_0) {
        const uint8_t *blk = row + b * 34;
        *d0 = *d1 = h2f(blk);
        return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 2)));
    }
    if (t == Q5_0) { /* nibbles (elements j, j + 16) with bit 4 from qh, minus 16 */
        const uint8_t *blk = row + b * 22;
        *d0 = *d1 = h2f(blk);
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + 6)));
        const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, _mm256_set1_epi16(15))),
                                             _mm256_srli_epi16(v, 4), 1);
        const __m512i k16 = _mm512_set1_epi16(16), w16 = _mm512_sub_epi16(w, k16);
        return _mm512_mask_add_epi16(w16, (__mmask32)qh, w16, k16);
    }
    const int64_t j = b % 8;
    if (t == Q4_K) {
        const uint8_t *blk = row + (b / 8) * 144, *sc = blk + 4;
        const int s6 = j < 4 ? sc[j] & 63 : (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
        const int m6 = j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
        *d0 = *d1 = h2f(blk) * (float)s6;
        *mn = -(h2f(blk + 2) * (float)m6);
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (j / 2))));
        return j & 1 ? _mm512_srli_epi16(v, 4) : _mm512_and_si512(v, _mm512_set1_epi16(15));
    }
    /* Q6_K: ql[128], qh[64], 16 int8 scales, f16 d: w = (d sc) (q - 32), a scale per 16 weights */
    const uint8_t *blk = row + (b / 8) * 210;
    const int8_t *sc = (const int8_t *)(blk + 192);
    const float d = h2f(blk + 208);
    const int h = (int)j / 4, rr = (int)j % 4, lsh = rr < 2 ? 0 : 4, hsh = 2 * rr;
    *d0 = d * (float)sc[2 * j], *d1 = d * (float)sc[2 * j + 1];
    const __m512i l = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (rr % 2))));
    const __m512i hh = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h)));
    const __m512i q = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, lsh), _mm512_set1_epi16(15)),
                                      _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hh, hsh), _mm512_set1_epi16(3)), 4));
    return _mm512_sub_epi16(q, _mm512_set1_epi16(32));
}

/* rows n0 .. n0 + 32 of W of a type with natural pairs (fewer at the end: zeros) -> P [nb][16][32], D, D1, Mn */
static inline __attribute__((always_inline)) void gemm_unpack_nat_t(const uint8_t *W, const int t, int64_t n0,
                                                                     int64_t N, int64_t nb, uint32_t *P, float *D,
                                                                     float *D1, float *Mn) {
    const int64_t rb = nb * 32 / block_size(t) * block_bytes(t);
    for (int g = 0; g < GEMM_NR; g += 16)
        for (int64_t b = 0; b < nb; b++) {
            __m512i v[16];
            for (int r = 0; r < 16; r++) {
                const int64_t n = n0 + g + r, o = b * GEMM_NR + g + r;
                if (n < N) {
                    v[r] = codes_nat(W + n * rb, t, b, D + o, D1 + o, Mn + o);
                } else {
                    v[r] = _mm512_setzero_si512();
                    D[o] = D1[o] = Mn[o] = 0.0f;
                }
            }
            transpose16_store(v, P + b * 16 * GEMM_NR + g, GEMM_NR);
        }
}

static void gemm_unpack_nat(const uint8_t *W, int t, int64_t n0, int64_t N, int64_t nb, uint32_t *P, float *D,
                            float *D1, float *Mn) {
    switch (t) {
    case Q8_0: gemm_unpack_nat_t(W, Q8_0, n0, N, nb, P, D, D1, Mn); break;
    case Q5_0: gemm_unpack_nat_t(W, Q5_0, n0, N, nb, P, D, D1, Mn); break;
    case Q4_K: gemm_unpack_nat_t(W, Q4_K, n0, N, nb, P, D, D1, Mn); break;
    default: gemm_unpack_nat_t(W, Q6_K, n0, N, nb, P, D, D1, Mn); break;
    }
}

/* x [M, K] f32 -> xq [M, K / 2] int16 pairs in the panel's order (pair j of block b: elements 32 b + j and
 * 32 b + j + 16), xs [M, nb] their scales, sx [M, nb] block sums (f32, of x itself) */
static void gemm_x(const float *x, int64_t M, int64_t K, uint32_t *xq, float *xs, float *sx) {
    const __m512i lo16 = _mm512_set1_epi32(0xffff);
    for (int64_t i = 0; i < M * K / 32; i++) {
        __m512 a = _mm512_loadu_ps(x + 32 * i), b = _mm512_loadu_ps(x + 32 * i + 16);
        sx[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        __m512 inv = _mm512_set1_ps(mx > 0 ? 32767.0f / mx : 0.0f);
        xs[i] = mx / 32767.0f;
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm512_storeu_si512(xq + 16 * i, _mm512_or_si512(_mm512_and_si512(qa, lo16), _mm512_slli_epi32(qb, 16)));
    }
}

/* natural-order x: int16 per block of 32 in order (as uint32: pair j = elements 2 j, 2 j + 1) */
static void gemm_x_nat(const float *x, int64_t M, int64_t K, uint32_t *xq, float *xs, float *sx) {
    for (int64_t i = 0; i < M * K / 32; i++) {
        __m512 a = _mm512_loadu_ps(x + 32 * i), b = _mm512_loadu_ps(x + 32 * i + 16);
        sx[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        __m512 inv = _mm512_set1_ps(mx > 0 ? 32767.0f / mx : 0.0f);
        xs[i] = mx / 32767.0f;
        __m256i qa = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)));
        __m256i qb = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv)));
        _mm512_storeu_si512(xq + 16 * i, _mm512_inserti64x4(_mm512_castsi256_si512(qa), qb, 1));
    }
}

/* the int16 dots of pair steps j0 .. j1 of block b, for MR rows of x and the panel's 32 rows */
#define GEMM_DOTS(j0, j1)                                                                                  \
    _Pragma("GCC unroll 16") for (int j = j0; j < j1; j++) {                                               \
        __m512i w0 = _mm512_loadu_si512(pb + j * GEMM_NR), w1 = _mm512_loadu_si512(pb + j * GEMM_NR + 16); \
        _Pragma("GCC unroll 6") for (int i = 0; i < MR; i++) {                                             \
            __m512i v = _mm512_set1_epi32((int)xq[i * ldx + b * 16 + j]);                                  \
            s[i][0] = _mm512_dpwssd_epi32(s[i][0], w0, v);                                                 \
            s[i][1] = _mm512_dpwssd_epi32(s[i][1], w1, v);                                                 \
        }                                                                                                  \
    }

/* y[i, c] += dot * scale_c * xs_i, the int32 dots then zeroed */
#define GEMM_SCALE(DS)                                                                                     \
    {                                                                                                      \
        __m512 d0 = _mm512_loadu_ps(DS + b * GEMM_NR), d1 = _mm512_loadu_ps(DS + b * GEMM_NR + 16);        \
        for (int i = 0; i < MR; i++) {                                                                     \
            __m512 v = _mm512_set1_ps(xs[i * nb + b]);                                                     \
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][0]), _mm512_mul_ps(d0, v), acc[i][0]);     \
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][1]), _mm512_mul_ps(d1, v), acc[i][1]);     \
            s[i][0] = s[i][1] = _mm512_setzero_si512();                                                    \
        }                                                                                                  \
    }

/* kind 0: w = D q + Mn per block (Q4_0, Q4_1, Q4_K); 1: w = D q (Q8_0, Q5_0); 2: D q for pair steps 0-7
 * (elements 0-15, natural pairs), D1 q for 8-15 (Q6_K) */
static inline __attribute__((always_inline)) void gemm_tile(const uint32_t *P, const float *D, const float *D1,
                                                             const float *Mn, int64_t nb, const uint32_t *xq,
                                                             const float *xs, const float *sx, const int MR,
                                                             const int kind, float *y, int64_t ldy, int cols) {
    const int64_t ldx = nb * 16;
    __m512 acc[GEMM_MR][2];
    __m512i s[GEMM_MR][2];
    for (int i = 0; i < MR; i++) {
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        s[i][0] = s[i][1] = _mm512_setzero_si512();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint32_t *pb = P + b * 16 * GEMM_NR;
        if (kind == 2) {
            GEMM_DOTS(0, 8)
            GEMM_SCALE(D)
            GEMM_DOTS(8, 16)
            GEMM_SCALE(D1)
        } else {
            GEMM_DOTS(0, 16)
            GEMM_SCALE(D)
        }
        if (kind == 0) {
            __m512 m0 = _mm512_loadu_ps(Mn + b * GEMM_NR), m1 = _mm512_loadu_ps(Mn + b * GEMM_NR + 16);
            for (int i = 0; i < MR; i++) {
                __m512 u = _mm512_set1_ps(sx[i * nb + b]);
                acc[i][0] = _mm512_fmadd_ps(m0, u, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(m1, u, acc[i][1]);
            }
        }
    }
    const __mmask16 k0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
    const __mmask16 k1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
    for (int i = 0; i < MR; i++) {
        _mm512_mask_storeu_ps(y + i * ldy, k0, acc[i][0]);
        _mm512_mask_storeu_ps(y + i * ldy + 16, k1, acc[i][1]);
    }
}
#undef GEMM_DOTS
#undef GEMM_SCALE

static inline __attribute__((always_inline)) void gemm_tiles_k(const uint32_t *P, const float *D, const float *D1,
                                                                const float *Mn, int64_t nb, const uint32_t *xq,
                                                                const float *xs, const float *sx, int64_t M,
                                                                const int kind, float *y, int64_t ldy, int cols) {
    for (int64_t i = 0; i < M; i += GEMM_MR) {
        const int mr = M - i < GEMM_MR ? (int)(M - i) : GEMM_MR;
        const uint32_t *q = xq + i * nb * 16;
        switch (mr) {
#define CASE(c) case c: gemm_tile(P, D, D1, Mn, nb, q, xs + i * nb, sx + i * nb, c, kind, y + i * ldy, ldy, cols); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#undef CASE
        }
    }
}

static void gemm_tiles(const uint32_t *P, const float *D, const float *D1, const float *Mn, int64_t nb,
                       const uint32_t *xq, const float *xs, const float *sx, int64_t M, int kind, float *y,
                       int64_t ldy, int cols) {
    if (kind == 0) gemm_tiles_k(P, D, D1, Mn, nb, xq, xs, sx, M, 0, y, ldy, cols);
    else if (kind == 1) gemm_tiles_k(P, D, D1, Mn, nb, xq, xs, sx, M, 1, y, ldy, cols);
    else gemm_tiles_k(P, D, D1, Mn, nb, xq, xs, sx, M, 2, y, ldy, cols);
}
#endif

#ifdef GEMM_I16
/* x [M, K] in the GEMM's form: int16 pairs, their scales and the f32 block sums */
typedef struct {
    uint32_t *xq;
    float *xs, *sx;
} QAct;

static size_t qact_bytes(int64_t M, int64_t K) { return (size_t)(M * K * 2 + 2 * M * (K / 32) * 4 + 64); }
static size_t panel_bytes(int64_t K) { return (size_t)((K / 32) * (16 * GEMM_NR * 4 + 3 * GEMM_NR * 4) + 64); }

static void qact_at(QAct *a, int64_t M, int64_t K, void *mem) {
    a->xq = mem, a->xs = (float *)(a->xq + M * K / 2), a->sx = a->xs + M * (K / 32);
}

static int q4_type(int t) { return t == Q4_0 || t == Q4_1; }

/* 1 for the types whose GEMM panels hold natural pairs (elements 2 j, 2 j + 1), 0 for Q4_0/Q4_1 (j, j + 16) */
static int nat_pairs(int t) { return !q4_type(t); }

/* this thread's rows (id of nt) of x quantized into a, in the pair order of weights of type t (called by every
 * thread; a barrier must follow) */
static void qact_part(const QAct *a, const float *x, int64_t M, int64_t K, int t, int id, int nt) {
    const int64_t per = (M + nt - 1) / nt, r0 = id * per < M ? id * per : M, r1 = r0 + per < M ? r0 + per : M;
    if (r0 < r1)
        (nat_pairs(t) ? gemm_x_nat : gemm_x)(x + r0 * K, r1 - r0, K, a->xq + r0 * K / 2, a->xs + r0 * (K / 32),
                                             a->sx + r0 * (K / 32));
}

/* this thread's panels of y [M, ldy] = x W^T (called by every thread of the region; P: panel_bytes(K) of
 * scratch). Panels are handed out one at a time, so a thread that the OS deschedules on a shared machine holds
 * up the others for one panel, not for a static share (not measured apart: the barriers between phases still
 * wait for it). No barrier at the end: the caller's. */
static void gemm_part(const uint8_t *W, int t, int64_t N, int64_t K, const QAct *a, int64_t M, float *y,
                      int64_t ldy, int id, int nt, uint32_t *P) {
    const int64_t nb = K / 32, panels = (N + GEMM_NR - 1) / GEMM_NR;
    float *D = (float *)(P + nb * 16 * GEMM_NR), *Mn = D + nb * GEMM_NR, *D1 = Mn + nb * GEMM_NR;
    const int kind = q4_type(t) || t == Q4_K ? 0 : t == Q6_K ? 2 : 1;
    (void)id, (void)nt;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t p = 0; p < panels; p++) {
        const int64_t n0 = p * GEMM_NR;
        if (q4_type(t)) gemm_unpack(W, t, n0, N, nb, P, D, Mn);
        else gemm_unpack_nat(W, t, n0, N, nb, P, D, D1, Mn);
        gemm_tiles(P, D, D1, Mn, nb, a->xq, a->xs, a->sx, M, kind, y + n0, ldy,
                   (int)(N - n0 < GEMM_NR ? N - n0 : GEMM_NR));
    }
}
#endif

/* y [M, ldy] (columns 0..N) = x [M, K] W^T for rows W of Q4_0, Q4_1, Q5_0, Q8_0, Q4_K or Q6_K (prompts); returns
 * -1 for other types or where this build has no AVX512-VNNI (the caller dequantizes instead). Panels of 32 rows
 * split over `threads`. */
int gguf_gemm(const uint8_t *W, int t, int64_t N, int64_t K, const float *x, int64_t M, float *y, int64_t ldy,
              int threads) {
#ifdef GEMM_I16
    if (!(q4_type(t) || t == Q5_0 || t == Q8_0 || t == Q4_K || t == Q6_K) || K % block_size(t)) return -1;
    pair_lut_init();
    char *mem = malloc(qact_bytes(M, K) + (size_t)threads * panel_bytes(K));
    if (!mem) return -2;
    QAct a;
    qact_at(&a, M, K, mem);
    qact_part(&a, x, M, K, t, 0, 1);
#pragma omp parallel num_threads(threads) if (threads > 1 && N > GEMM_NR)
    gemm_part(W, t, N, K, &a, M, y, ldy, THREAD_ID(), THREADS(),
              (uint32_t *)(mem + qact_bytes(M, K) + THREAD_ID() * panel_bytes(K)));
    free(mem);
    return 0;
#else
    (void)W, (void)t, (void)N, (void)K, (void)x, (void)M, (void)y, (void)ldy, (void)threads;
    return -1;
#endif
}

#ifdef GEMM_I16
/* e^x for 16 floats (Cephes' expf: range reduction by ln 2, a degree-5 polynomial; ~1 ulp) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* 1 where gguf_gemm and the prefill calls run (AVX512-VNNI), else 0 */
int gguf_gemm_ok(void) {
#ifdef GEMM_I16
    return 1;
#else
    return 0;
#endif
}

#ifdef GEMM_I16
/* 1 where gguf_gemm multiplies rows of type t */
static int gemm_type(int t) { return q4_type(t) || t == Q5_0 || t == Q8_0 || t == Q4_K || t == Q6_K; }

/* y = GELU-tanh(g) * u over n elements (n % 16 == 0): 0.5 g (1 + tanh(c (g + 0.044715 g^3))), tanh(z) as
 * 1 - 2 / (e^2z + 1) with exp16 (an absolute error of ~1e-7) */
static void gelu_mul(const float *g, const float *u, float *y, int64_t n) {
    const __m512 c = _mm512_set1_ps(0.7978845608028654f), k = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(g + i);
        const __m512 z = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(k, v), _mm512_mul_ps(v, v), v));
        const __m512 e = exp16(_mm512_add_ps(z, z));
        const __m512 th = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
        const __m512 a = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(one, th));
        _mm512_storeu_ps(y + i, _mm512_mul_ps(a, _mm512_loadu_ps(u + i)));
    }
}

/* y = SiLU(g) * u over n elements (n % 16 == 0) */
static void silu_mul(const float *g, const float *u, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __m512 v = _mm512_loadu_ps(g + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                              _mm512_loadu_ps(u + i)));
    }
}
#endif

/* Prompt rows (T of them, any mix of sequences) of a Llama-style or Gemma 3 layer whose projections are blocks
 * gguf_gemm multiplies, in two calls around the attention (which stays with the caller):
 *   prefill_qkv: qkv = rope(qk_norm(qkv(norm1(x)))) (+ bias), K/V written to slot[t]  -> qkv [T, (nh + 2 nkv) hd]
 *   prefill_mlp: x += lnpa(o(att)); x += lnpf(down(act(gate) * up)(norm2(x)))      (x in place; Llama: no
 *                lnpa / lnpf, SiLU; Gemma 3: both, GELU-tanh)
 * One OpenMP region each; the GEMMs are gguf_gemm's. -1: other types / no VNNI (the caller's torch path). */
int gguf_llama_prefill_qkv(const Layer *l, const float *x, float *qkv, int threads) {
#ifdef GEMM_I16
    const int64_t T = l->T, H = l->H, hd = l->hd, nq = l->nh * hd, nkvd = l->nkv * hd, QKV = nq + 2 * nkvd;
    const int64_t n1 = l->nqkv1 ? l->nqkv1 : QKV;
    if (!gemm_type(l->tqkv) || (l->nqkv1 && !gemm_type(l->tqkv2)) || l->rot > 512 || l->rot > hd ||
        H % block_size(l->tqkv) || (l->nqkv1 && H % block_size(l->tqkv2)))
        return -1;
    const int two = l->nqkv1 && nat_pairs(l->tqkv2) != nat_pairs(l->tqkv); /* a second x in the other order */
    pair_lut_init();
    size_t xb = (size_t)T * H * 4, qb = qact_bytes(T, H), pb = panel_bytes(H);
    char *mem = malloc(xb + 2 * qb + (size_t)threads * pb);
    if (!mem) return -2;
    float *xn = (float *)mem;
    QAct a, a2;
    qact_at(&a, T, H, mem + xb);
    qact_at(&a2, T, H, mem + xb + qb);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int id = THREAD_ID(), nt = THREADS();
        uint32_t *P = (uint32_t *)(mem + xb + 2 * qb + id * pb);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) rms_norm(x + t * H, l->ln1, l->eps, H, xn + t * H);
        qact_part(&a, xn, T, H, l->tqkv, id, nt);
        if (two) qact_part(&a2, xn, T, H, l->tqkv2, id, nt);
#pragma omp barrier
        gemm_part(l->wqkv, l->tqkv, n1, H, &a, T, qkv, QKV, id, nt, P);
        if (l->nqkv1) gemm_part(l->wqkv2, l->tqkv2, QKV - n1, H, two ? &a2 : &a, T, qkv + n1, QKV, id, nt, P);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) qkv_row(l, qkv + t * QKV, t);
    }
    free(mem);
    return 0;
#else
    (void)l, (void)x, (void)qkv, (void)threads;
    return -1;
#endif
}

int gguf_llama_prefill_mlp(const Layer *l, float *x, const float *att, int threads) {
#ifdef GEMM_I16
    const int64_t T = l->T, H = l->H, I = l->I, nq = l->nh * l->hd;
    if (!gemm_type(l->to) || !gemm_type(l->tgu) || !gemm_type(l->td) || nq % block_size(l->to) ||
        H % block_size(l->tgu) || I % block_size(l->td))
        return -1;
    pair_lut_init();
    const int64_t KMAX = H > I ? (H > nq ? H : nq) : (I > nq ? I : nq);
    size_t fb = (size_t)T * (2 * H + 3 * I) * 4, qb = qact_bytes(T, KMAX), pb = panel_bytes(KMAX);
    char *mem = malloc(fb + qb + (size_t)threads * pb);
    if (!mem) return -2;
    float *blk = (float *)mem, *xn = blk + T * H, *gu = xn + T * H, *act = gu + T * 2 * I;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int id = THREAD_ID(), nt = THREADS();
        uint32_t *P = (uint32_t *)(mem + fb + qb + id * pb);
        QAct q;
        qact_at(&q, T, nq, mem + fb);
        qact_part(&q, att, T, nq, l->to, id, nt);
#pragma omp barrier
        gemm_part(l->wo, l->to, H, nq, &q, T, blk, H, id, nt, P);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            residual_add(l->lnpa, l->eps, x + t * H, blk + t * H, H);
            rms_norm(x + t * H, l->ln2, l->eps, H, xn + t * H);
        }
        qact_at(&q, T, H, mem + fb);
        qact_part(&q, xn, T, H, l->tgu, id, nt);
#pragma omp barrier
        gemm_part(l->wgu, l->tgu, 2 * I, H, &q, T, gu, 2 * I, id, nt, P);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const float *g = gu + t * 2 * I;
            (l->act ? gelu_mul : silu_mul)(g, g + I, act + t * I, I);
        }
        qact_at(&q, T, I, mem + fb);
        qact_part(&q, act, T, I, l->td, id, nt);
#pragma omp barrier
        gemm_part(l->wd, l->td, H, I, &q, T, blk, H, id, nt, P);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) residual_add(l->lnpf, l->eps, x + t * H, blk + t * H, H);
    }
    free(mem);
    return 0;
#else
    (void)l, (void)x, (void)att, (void)threads;
    return -1;
#endif
}

#ifdef GEMM_I16
/* scores of G query heads (q: the first one's hd values, the others follow) sharing the transposed keys kt
 * [hd][Tp] against keys 0 .. n: p [G][Tp] (scaled; -inf past n), mx [G] their maxima. 4 chunks of 16 keys x G
 * heads: up to 16 independent FMA chains per key column */
static inline __attribute__((always_inline)) void attn_scores(const float *q, const float *kt, int64_t Tp,
                                                               int64_t hd, int64_t n, float scale, const int G,
                                                               float *p, float *mx) {
    __m512 m[4];
    for (int g = 0; g < G; g++) m[g] = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
        __m512 a[4][4];
        for (int g = 0; g < G; g++)
            for (int c = 0; c < 4; c++) a[g][c] = _mm512_setzero_ps();
        const int nc = n - j0 >= 64 ? 4 : (int)((n - j0 + 15) / 16); /* (keys past n: -inf below) */
        for (int64_t d = 0; d < hd; d++) {
            const float *kr = kt + d * Tp + j0;
            __m512 k[4];
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) k[c] = c < nc ? _mm512_loadu_ps(kr + 16 * c) : _mm512_setzero_ps();
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                const __m512 qd = _mm512_set1_ps(q[g * hd + d]);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) a[g][c] = _mm512_fmadd_ps(qd, k[c], a[g][c]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int c = 0; c < nc && j0 + 16 * c < n; c++) {
                const int64_t jc = j0 + 16 * c;
                __m512 sc = _mm512_mul_ps(a[g][c], _mm512_set1_ps(scale));
                const __mmask16 live = n - jc >= 16 ? 0xffff : (__mmask16)((1u << (n - jc)) - 1);
                sc = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), sc);
                _mm512_storeu_ps(p + g * Tp + jc, sc);
                m[g] = _mm512_max_ps(m[g], sc);
            }
    }
    for (int g = 0; g < G; g++) mx[g] = _mm512_reduce_max_ps(m[g]);
}

/* o [G][hd] = inv_g sum_j p_g[j] v_j for the G heads of a group (p [G][Tp], values v_j = v0 + j ldq, hd % 64 == 0):
 * 64 columns at a time, each value row loaded once for the G heads (4 G chains) */
static inline __attribute__((always_inline)) void attn_pv(const float *p, int64_t Tp, const float *v0, int64_t ldq,
                                                           int64_t hd, int64_t n, const float *inv, const int G,
                                                           float *o) {
    for (int64_t d0 = 0; d0 < hd; d0 += 64) {
        __m512 a[4][4];
        for (int g = 0; g < G; g++)
            for (int c = 0; c < 4; c++) a[g][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const float *v = v0 + j * ldq + d0;
            __m512 w[4];
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) w[c] = _mm512_loadu_ps(v + 16 * c);
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) {
                const __m512 pj = _mm512_set1_ps(p[g * Tp + j]);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) a[g][c] = _mm512_fmadd_ps(pj, w[c], a[g][c]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int c = 0; c < 4; c++)
                _mm512_storeu_ps(o + g * hd + d0 + 16 * c, _mm512_mul_ps(a[g][c], _mm512_set1_ps(inv[g])));
    }
}
#endif

/* Causal self-attention of the T rows of one fresh prompt (no past), f32: q, k, v are the rows of qkv [T, ldq]
 * (q at column 0, k at nh hd, v at (nh + nkv) hd, already roped), out [T, ldo] (nh hd columns). Keys are
 * transposed per kv head so 16 scores come from one FMA chain; softmax with exp16; rows x heads split over
 * the threads. -1 where hd is not a multiple of 16 or there is no AVX-512 (the caller's SDPA). */
int gguf_attn_causal(const float *qkv, int64_t T, int64_t ldq, int64_t nh, int64_t nkv, int64_t hd, float scale,
                     float *out, int64_t ldo, int threads) {
#ifdef GEMM_I16
    if (hd % 16 || nh % nkv) return -1;
    const int64_t Tp = (T + 15) / 16 * 16, nq = nh * hd, rep = nh / nkv;
    const int G = rep % 4 == 0 ? 4 : rep % 3 == 0 ? 3 : rep % 2 == 0 ? 2 : 1; /* query heads scored together */
    const int64_t ng = nh / G, per = G * Tp + hd;
    float *Kt = malloc((size_t)(nkv * hd * Tp + (int64_t)threads * per) * 4);
    if (!Kt) return -2;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *pg = Kt + nkv * hd * Tp + THREAD_ID() * per, *o_row = pg + G * Tp;
#pragma omp for schedule(static)
        for (int64_t jb = 0; jb < Tp * nkv * hd / 256; jb++) { /* blocks of 16 keys x 16 columns, transposed */
            const int64_t j0 = jb / (nkv * hd / 16) * 16, c0 = jb % (nkv * hd / 16) * 16;
            __m512i v[16];
            for (int r = 0; r < 16; r++)
                v[r] = j0 + r < T ? _mm512_loadu_si512(qkv + (j0 + r) * ldq + nq + c0) : _mm512_setzero_si512();
            transpose16_store(v, (uint32_t *)(Kt + c0 * Tp + j0), Tp);
        }
#pragma omp for schedule(dynamic, 2)
        for (int64_t ig = 0; ig < T * ng; ig++) {
            const int64_t i = ig / ng, h0 = (ig % ng) * G, kv = h0 / rep, n = i + 1;
            const float *kt = Kt + kv * hd * Tp;
            float mxg[4];
            switch (G) {
#define CASE(c) case c: attn_scores(qkv + i * ldq + h0 * hd, kt, Tp, hd, n, scale, c, pg, mxg); break;
                CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
            }
            float inv[4];
            for (int g = 0; g < G; g++) { /* softmax numerators in place, 1 / their sums */
                float *p = pg + g * Tp;
                const __m512 m = _mm512_set1_ps(mxg[g]);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j0 = 0; j0 < n; j0 += 16) {
                    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j0), m));
                    const __mmask16 live = n - j0 >= 16 ? 0xffff : (__mmask16)((1u << (n - j0)) - 1);
                    e = _mm512_maskz_mov_ps(live, e);
                    _mm512_storeu_ps(p + j0, e);
                    sum = _mm512_add_ps(sum, e);
                }
                inv[g] = 1.0f / _mm512_reduce_add_ps(sum);
            }
            const float *v0 = qkv + nq + nkv * hd + kv * hd;
            float *o = out + i * ldo + h0 * hd;
            if (hd % 64 == 0) { /* the group's output rows 64 columns at a time in registers */
                switch (G) {
#define CASE(c) case c: attn_pv(pg, Tp, v0, ldq, hd, n, inv, c, o); break;
                    CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
                }
            } else {
                for (int g = 0; g < G; g++) {
                    const float *p = pg + g * Tp;
                    for (int64_t d = 0; d < hd; d++) o_row[d] = 0.0f;
                    for (int64_t j = 0; j < n; j++) {
                        const float *v = v0 + j * ldq;
                        const __m512 pj = _mm512_set1_ps(p[j]);
                        for (int64_t d = 0; d < hd; d += 16)
                            _mm512_storeu_ps(o_row + d, _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + d), _mm512_loadu_ps(o_row + d)));
                    }
                    for (int64_t d = 0; d < hd; d += 16)
                        _mm512_storeu_ps(o + g * hd + d, _mm512_mul_ps(_mm512_loadu_ps(o_row + d), _mm512_set1_ps(inv[g])));
                }
            }
        }
    }
    free(Kt);
    return 0;
#else
    (void)qkv, (void)T, (void)ldq, (void)nh, (void)nkv, (void)hd, (void)scale, (void)out, (void)ldo, (void)threads;
    return -1;
#endif
}

/* out [N, K] f32 = the weights of N rows of type t */
void gguf_dequant(const uint8_t *W, int t, int64_t N, int64_t K, float *out, int threads) {
    const int64_t QK = block_size(t), nb = K / QK, bb = block_bytes(t), rb = nb * bb;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < nb; b++) {
            float *w = out + n * K + b * QK;
#if defined(__AVX512F__)
            if (t == Q4_0 || t == Q4_1 || t == Q8_0) {
                __m512 lo, hi;
                deq_block16(W + n * rb + b * bb, t, &lo, &hi);
                _mm512_storeu_ps(w, lo);
                _mm512_storeu_ps(w + 16, hi);
                continue;
            }
            DEQ_WIDE(W + n * rb + b * bb, t, w);
            continue;
#endif
            deq_block(W + n * rb + b * bb, t, w);
        }
    }
}
