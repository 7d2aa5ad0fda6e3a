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
#include <stdint.h>
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
