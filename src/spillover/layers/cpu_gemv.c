/* bf16 weights times f32 activations on the CPU, for decode steps (a few rows): the rate at which a CPU-
 * computed layer or a CPU expert reads its weights is a decode step's speed when a model spills.
 *
 *   cpu_gemv_bf16: Y[b, m, n] = sum_k X[b, m, k] * W[ids[b], n, k]   (b < nb, m < M, n < N)
 *
 * W: bf16 [E, N, K] (stride_e elements between experts; a plain linear is nb = 1, ids = {0}); X: f32, the rows
 * of batch b at X + b * ldx (ldx = 0: every b reads the same rows); Y: f32 [nb, M, N]. Each weight converts to
 * f32 exactly (a 16-bit shift) and is multiplied in f32 with f32 accumulation, as torch's bf16 linear does;
 * only the order of the sums differs. One OpenMP region spreads blocks of 4 rows of all nb matrices over the
 * threads (static schedule, so each thread streams its own contiguous bytes), with the next rows prefetched.
 * Loaded after torch with ctypes, so it shares torch's OpenMP runtime (layers/cpu_linear.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define RB 4 /* weight rows per block: 4 independent streams in flight per thread */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* rows [n0, n0 + nr) of one matrix w [N, K] times M rows of x [M, K] -> y [M, N] */
static void block(const uint16_t *w, int64_t n0, int nr, int64_t K, const float *x, int64_t M, float *y,
                  int64_t N) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int64_t k = 0;
        float acc[RB] = {0};
#if defined(__AVX512F__)
        if (nr == RB) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const uint16_t *r0 = w + n0 * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
            const char *next = (const char *)(r0 + RB * K);
            for (; k + 16 <= K; k += 16) {
                if (m == 0 && (k & 31) == 0) { /* the next block's rows, one cache line each per 64 bytes */
                    _mm_prefetch(next + 2 * k, _MM_HINT_T0);
                    _mm_prefetch(next + 2 * k + 2 * K, _MM_HINT_T0);
                    _mm_prefetch(next + 2 * k + 4 * K, _MM_HINT_T0);
                    _mm_prefetch(next + 2 * k + 6 * K, _MM_HINT_T0);
                }
                __m512 xv = _mm512_loadu_ps(xm + k);
#define ROW(r, a)                                                                                          \
    a = _mm512_fmadd_ps(                                                                                   \
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r + k))), 16)), \
        xv, a)
                ROW(r0, a0);
                ROW(r1, a1);
                ROW(r2, a2);
                ROW(r3, a3);
#undef ROW
            }
            acc[0] = _mm512_reduce_add_ps(a0);
            acc[1] = _mm512_reduce_add_ps(a1);
            acc[2] = _mm512_reduce_add_ps(a2);
            acc[3] = _mm512_reduce_add_ps(a3);
        }
#endif
        for (int r = 0; r < nr; r++) { /* the tail (or every k without AVX-512: the compiler vectorizes) */
            const uint16_t *wr = w + (n0 + r) * K;
            float s = 0.0f;
            for (int64_t j = k; j < K; j++) s += bf16_to_f32(wr[j]) * xm[j];
            y[m * N + n0 + r] = acc[r] + s;
        }
    }
}

void cpu_gemv_bf16(const uint16_t *W, int64_t N, int64_t K, int64_t stride_e, const int64_t *ids, int64_t nb,
                   const float *X, int64_t ldx, int64_t M, float *Y, int threads) {
    const int64_t blocks = (N + RB - 1) / RB, total = blocks * nb;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && total >= 16)
    for (int64_t t = 0; t < total; t++) {
        const int64_t b = t / blocks, n0 = (t % blocks) * RB;
        const int nr = (int)(N - n0 < RB ? N - n0 : RB);
        block(W + ids[b] * stride_e, n0, nr, K, X + b * ldx, M, Y + b * M * N, N);
    }
}

/* Decode attention over a paged cache on the CPU: one query row per sequence, K/V read where they lie.
 *
 *   cpu_decode_attn: O[b, h] = softmax(scale q[b, h] . K[slots[b, j], h / rep]) @ V[...]   (j < lens[b])
 *
 * Q, O: f32 [B, nh, hd]; caches [S, nkv, hd], bf16 (kbytes 2, each value converted exactly) or f32 (4);
 * slots: int64 [B, L] (row stride L); lens: int32 [B] or NULL (all L). Work is split over (sequence, span of
 * ATT_SPAN keys) so that one long sequence still uses every thread; a task's K and V rows come from memory
 * once and from cache for each of the query heads that share them. Each span keeps per head its
 * max, its sum of exponentials and its weighted V sum (f32); a second pass merges the spans. Replaces
 * gathering [B, L, nkv, hd] copies and two f32 matmuls, which wrote and read the K/V four times over. With
 * AVX-512 the scores are taken 16 keys at a time (16 accumulators summed across lanes together) and the
 * weighted V sums of two heads x 128 channels stay in registers over a span's keys. */
#define ATT_SPAN 256
#define ATT_MAX_ROW 4096 /* nkv x hd */

static inline void att_row(const void *base, int kbytes, int64_t off, int64_t n, float *out) {
    if (kbytes == 4) {
        memcpy(out, (const float *)base + off, n * sizeof(float));
        return;
    }
    const uint16_t *r = (const uint16_t *)base + off;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r + i))), 16)));
#endif
    for (; i < n; i++) out[i] = bf16_to_f32(r[i]);
}

static inline float att_dot(const float *restrict a, const float *restrict b, int64_t n) {
    int64_t i = 0;
    float d = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    d = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) d += a[i] * b[i];
    return d;
}

int cpu_decode_attn(const float *Q, const void *kc, const void *vc, int kbytes, const int64_t *slots,
                    const int32_t *lens, int64_t B, int64_t nh, int64_t nkv, int64_t hd, int64_t L, float scale,
                    float *O, int threads) {
    const int64_t rep = nh / nkv, W = nkv * hd, spans = (L + ATT_SPAN - 1) / ATT_SPAN, tasks = B * spans;
    if (nh % nkv || W > ATT_MAX_ROW) return 0;
    const int64_t per = nh * (hd + 2); /* per task: nh maxima, nh sums, nh x hd weighted V sums */
    float *part = (float *)malloc((size_t)tasks * per * sizeof(float));
    const int nt = threads > 1 ? threads : 1; /* scores [nh, span]: one buffer per thread */
    float *sc = (float *)malloc((size_t)nt * nh * ATT_SPAN * sizeof(float));
    if (!part || !sc) {
        free(part);
        free(sc);
        return 0;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t b = t / spans, j0 = (t % spans) * ATT_SPAN, n = lens ? lens[b] : L;
        const int64_t j1 = j0 + ATT_SPAN < n ? j0 + ATT_SPAN : n, m = j1 - j0;
        float *mx = part + t * per, *sm = mx + nh, *acc = sm + nh, *s = sc + omp_get_thread_num() * nh * ATT_SPAN;
        float row[ATT_MAX_ROW];
        for (int64_t h = 0; h < nh; h++) mx[h] = -INFINITY, sm[h] = 0.0f;
        memset(acc, 0, nh * hd * sizeof(float));
        if (m <= 0) continue;
        const float *q = Q + b * nh * hd;
        const int64_t *sl = slots + b * L;
#if defined(__AVX512F__)
        if (hd % 16 == 0) { /* scores 16 keys at a time per head, summed across lanes together */
            for (int64_t h = 0; h < nh; h++) {
                const float *qh = q + h * hd;
                const int64_t off = (h / rep) * hd;
                __m512 top = _mm512_set1_ps(-INFINITY);
                for (int64_t jb = 0; jb < m; jb += 16) {
                    const int nb = (int)(m - jb < 16 ? m - jb : 16);
                    int64_t base[16];
                    for (int k = 0; k < 16; k++) base[k] = sl[j0 + jb + (k < nb ? k : nb - 1)] * W + off;
                    __m512 a[16];
                    for (int k = 0; k < 16; k++) a[k] = _mm512_setzero_ps();
                    for (int64_t i = 0; i < hd; i += 16) {
                        const __m512 qv = _mm512_loadu_ps(qh + i);
                        for (int k = 0; k < 16; k++) {
                            const __m512 kv =
                                kbytes == 2 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                                  _mm256_loadu_si256((const __m256i *)((const uint16_t *)kc + base[k] + i))), 16))
                                            : _mm512_loadu_ps((const float *)kc + base[k] + i);
                            a[k] = _mm512_fmadd_ps(qv, kv, a[k]);
                        }
                    }
                    __m512 b[8], c[4], d0, d1;
                    for (int k = 0; k < 8; k++)
                        b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
                    for (int k = 0; k < 4; k++) {
                        const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
                        c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
                    }
                    d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
                    d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
                    const __m512 e = _mm512_mul_ps(_mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88),
                                                                 _mm512_shuffle_f32x4(d0, d1, 0xDD)),
                                                   _mm512_set1_ps(scale)); /* key k's score in lane k */
                    const __mmask16 valid = (__mmask16)((1u << nb) - 1u);
                    _mm512_mask_storeu_ps(s + h * ATT_SPAN + jb, valid, e);
                    top = _mm512_mask_max_ps(top, valid, top, e);
                }
                mx[h] = _mm512_reduce_max_ps(top);
            }
        } else
#endif
        for (int64_t j = 0; j < m; j++) { /* scores: the slot's K rows of every KV head, read once */
            att_row(kc, kbytes, sl[j0 + j] * W, W, row);
            for (int64_t h = 0; h < nh; h++) {
                const float d = att_dot(q + h * hd, row + (h / rep) * hd, hd) * scale;
                s[h * ATT_SPAN + j] = d;
                mx[h] = d > mx[h] ? d : mx[h];
            }
        }
        for (int64_t h = 0; h < nh; h++) {
            float *sh = s + h * ATT_SPAN, sum = 0.0f;
            const float mh = mx[h];
            for (int64_t j = 0; j < m; j++) sum += (sh[j] = expf(sh[j] - mh));
            sm[h] = sum;
        }
#if defined(__AVX512F__)
        if (hd % 16 == 0) { /* weighted V in registers: two heads x 128 channels at a time over the span's keys */
            for (int64_t h = 0; h < nh; h += 2) {
                const int two = h + 1 < nh && (h + 1) / rep == h / rep;
                const float *p0 = s + h * ATT_SPAN, *p1 = two ? p0 + ATT_SPAN : p0;
                const int64_t off = (h / rep) * hd;
                for (int64_t i0 = 0; i0 < hd; i0 += 128) {
                    const int nv = (int)((hd - i0 < 128 ? hd - i0 : 128) / 16);
                    __m512 a0[8], a1[8];
                    for (int c = 0; c < 8; c++) a0[c] = a1[c] = _mm512_setzero_ps();
                    for (int64_t j = 0; j < m; j++) {
                        const __m512 w0 = _mm512_set1_ps(p0[j]), w1 = _mm512_set1_ps(p1[j]);
                        const int64_t base = sl[j0 + j] * W + off + i0;
                        for (int c = 0; c < nv; c++) {
                            __m512 v;
                            if (kbytes == 2)
                                v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                        (const __m256i *)((const uint16_t *)vc + base + 16 * c))), 16));
                            else
                                v = _mm512_loadu_ps((const float *)vc + base + 16 * c);
                            a0[c] = _mm512_fmadd_ps(w0, v, a0[c]);
                            a1[c] = _mm512_fmadd_ps(w1, v, a1[c]);
                        }
                    }
                    for (int c = 0; c < nv; c++) {
                        _mm512_storeu_ps(acc + h * hd + i0 + 16 * c, a0[c]);
                        if (two) _mm512_storeu_ps(acc + (h + 1) * hd + i0 + 16 * c, a1[c]);
                    }
                }
                if (!two) h -= 1; /* an odd head out: the next pair starts at h + 1 */
            }
            continue;
        }
#endif
        for (int64_t j = 0; j < m; j++) { /* weighted V: the slot's V rows, read once */
            att_row(vc, kbytes, sl[j0 + j] * W, W, row);
            for (int64_t h = 0; h < nh; h++) {
                const float p = s[h * ATT_SPAN + j];
                const float *restrict v = row + (h / rep) * hd;
                float *restrict o = acc + h * hd;
                for (int64_t i = 0; i < hd; i++) o[i] += p * v[i];
            }
        }
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * nh > 1)
    for (int64_t bh = 0; bh < B * nh; bh++) { /* merge the spans of each (sequence, head) */
        const int64_t b = bh / nh, h = bh % nh;
        float mall = -INFINITY, den = 0.0f, *o = O + bh * hd;
        for (int64_t sp = 0; sp < spans; sp++) {
            const float v = part[(b * spans + sp) * per + h];
            mall = v > mall ? v : mall;
        }
        memset(o, 0, hd * sizeof(float));
        for (int64_t sp = 0; sp < spans; sp++) {
            const float *mx = part + (b * spans + sp) * per, *acc = mx + 2 * nh + h * hd;
            if (mx[h] == -INFINITY) continue;
            const float w = expf(mx[h] - mall);
            den += w * mx[nh + h];
            for (int64_t i = 0; i < hd; i++) o[i] += w * acc[i];
        }
        const float inv = den > 0.0f ? 1.0f / den : 0.0f;
        for (int64_t i = 0; i < hd; i++) o[i] *= inv;
    }
    free(part);
    free(sc);
    return 1;
}
