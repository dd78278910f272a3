// What a q40 weight layout costs the one-token and few-token matvec on AVX512-VNNI, in C, apart from the engine:
//
//     gcc -O3 -march=native -fopenmp benchmarks/q40_layouts.c -o /tmp/q40_layouts
//     flock /tmp/dllama-bench.lock env OMP_NUM_THREADS=2 /tmp/q40_layouts [rows, default 262144: 302 MB]
//
//  A: dllama's kernels until 2026-12-07 (the quad-lane order): rows as the .m stores them (18-byte blocks); per
//     pair of blocks 16 float lanes of exact quad sums (vpdpbusd), each times f32(d_w * d_x), added; the lanes
//     summed at the end. About 5 vector operations per row, token and 64 weights, plus the unpacking.
//  B: 16 rows interleaved per block (as llama.cpp repacks Q4_0 at load), rows in the lanes: 8 vpdpbusd give
//     the exact integer sum of each of 16 rows' blocks, then one convert, multiply and add per block for all
//     16 rows. Another order of sums (other bits), the same bytes (288 per 16 rows and block). dllama's kernels
//     now (ir._group_kernel) are B, with the block's integer sum in two chains of 4 products.
// Both on the same random weights and tokens, best of 7 runs each, beside a plain read of the weights (the
// memory's limit). docs/BENCHMARKS-HISTORY.md ("The layout of q40 weights") has what it measured and why.
#if !defined(__AVX512VNNI__) || !defined(__F16C__)
#error "needs AVX512-VNNI and F16C (-march=native on such a CPU)"
#endif
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>

#define N 2048
#define NB (N / 32)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static float h2f(uint16_t h) { return _cvtsh_ss(h); }

// A: the 64 values (0..15) of the block pair at b0 (two 18-byte q40 blocks), in order
static inline __m512i pair_values(const uint8_t *b0) {
    __m128i l0 = _mm_loadu_si128((const __m128i *)(b0 + 2)), l1 = _mm_loadu_si128((const __m128i *)(b0 + 20));
    const __m128i m = _mm_set1_epi8(15);
    __m256i v0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(l0, 4), m), _mm_and_si128(l0, m));
    __m256i v1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(l1, 4), m), _mm_and_si128(l1, m));
    return _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1);
}

// A: [lo] * 8 + [hi] * 8, a block pair's two scales over its 16 lanes
static inline __m512 halves(float lo, float hi) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(lo)), _mm256_set1_ps(hi), 1);
}

static void matvec_a(const uint8_t *w, long rows, const int8_t *x, const float *dx, const int32_t *xc, float *out) {
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint8_t *row = w + r * NB * 18;
        __m512 acc = _mm512_setzero_ps();
        for (int p = 0; p < NB / 2; p++) {
            const uint8_t *b0 = row + p * 36, *b1 = b0 + 18;
            __m512i a = pair_values(b0);
            __m512i q = _mm512_dpbusd_epi32(_mm512_loadu_si512(xc + 16 * p), a, _mm512_loadu_si512(x + 64 * p));
            __m512 ws = halves(h2f(*(uint16_t *)b0), h2f(*(uint16_t *)b1));
            __m512 xs = halves(dx[2 * p], dx[2 * p + 1]);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(ws, xs)));
        }
        out[r] = _mm512_reduce_add_ps(acc);
    }
}

static void matvec_b(const uint8_t *w, long rows, const int8_t *x, const float *dx, const int32_t *xsum8, float *out) {
    #pragma omp parallel for schedule(static)
    for (long g = 0; g < rows / 16; g++) {
        const uint8_t *grp = w + g * NB * 288;
        __m512 acc = _mm512_setzero_ps();
        const __m512i m = _mm512_set1_epi8(15);
        for (int b = 0; b < NB; b++) {
            const uint8_t *blk = grp + b * 288;
            const int32_t *xq = (const int32_t *)(x + 32 * b);
            __m512i s = _mm512_set1_epi32(xsum8[b]);
            for (int k = 0; k < 4; k++) {
                __m512i v = _mm512_loadu_si512(blk + 64 * k);
                s = _mm512_dpbusd_epi32(s, _mm512_and_si512(v, m), _mm512_set1_epi32(xq[k]));
                s = _mm512_dpbusd_epi32(s, _mm512_and_si512(_mm512_srli_epi16(v, 4), m), _mm512_set1_epi32(xq[k + 4]));
            }
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(dx[b]))));
        }
        _mm512_storeu_ps(out + 16 * g, acc);
    }
}


#define T4 4
static void matmul4_a(const uint8_t *w, long rows, const int8_t *x, const float *dx, const int32_t *xc, float *out) {
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint8_t *row = w + r * NB * 18;
        __m512 acc[T4];
        for (int t = 0; t < T4; t++) acc[t] = _mm512_setzero_ps();
        for (int p = 0; p < NB / 2; p++) {
            const uint8_t *b0 = row + p * 36, *b1 = b0 + 18;
            __m512i a = pair_values(b0);
            __m512 ws = halves(h2f(*(uint16_t *)b0), h2f(*(uint16_t *)b1));
            for (int t = 0; t < T4; t++) {
                __m512i q = _mm512_dpbusd_epi32(_mm512_loadu_si512(xc + t * (N / 4) + 16 * p), a, _mm512_loadu_si512(x + t * N + 64 * p));
                __m512 xs = halves(dx[t * NB + 2 * p], dx[t * NB + 2 * p + 1]);
                acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(ws, xs)));
            }
        }
        for (int t = 0; t < T4; t++) out[t * rows + r] = _mm512_reduce_add_ps(acc[t]);
    }
}

static void matmul4_b(const uint8_t *w, long rows, const int8_t *x, const float *dx, const int32_t *xsum8, float *out) {
    #pragma omp parallel for schedule(static)
    for (long g = 0; g < rows / 16; g++) {
        const uint8_t *grp = w + g * NB * 288;
        __m512 acc[T4];
        for (int t = 0; t < T4; t++) acc[t] = _mm512_setzero_ps();
        const __m512i m = _mm512_set1_epi8(15);
        for (int b = 0; b < NB; b++) {
            const uint8_t *blk = grp + b * 288;
            __m512i lo[4], hi[4];
            for (int k = 0; k < 4; k++) {
                __m512i v = _mm512_loadu_si512(blk + 64 * k);
                lo[k] = _mm512_and_si512(v, m); hi[k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
            }
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
            for (int t = 0; t < T4; t++) {
                const int32_t *xq = (const int32_t *)(x + t * N + 32 * b);
                __m512i s = _mm512_set1_epi32(xsum8[t * NB + b]);
                for (int k = 0; k < 4; k++) {
                    s = _mm512_dpbusd_epi32(s, lo[k], _mm512_set1_epi32(xq[k]));
                    s = _mm512_dpbusd_epi32(s, hi[k], _mm512_set1_epi32(xq[k + 4]));
                }
                acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(dx[t * NB + b]))));
            }
        }
        for (int t = 0; t < T4; t++) _mm512_storeu_ps(out + t * rows + 16 * g, acc[t]);
    }
}

static void repack(const uint8_t *w, long rows, uint8_t *out) {
    for (long g = 0; g < rows / 16; g++)
        for (int b = 0; b < NB; b++) {
            uint8_t *blk = out + g * NB * 288 + b * 288;
            memset(blk, 0, 256);
            for (int r = 0; r < 16; r++) {
                const uint8_t *src = w + (g * 16 + r) * NB * 18 + b * 18;
                uint8_t vals[32];
                for (int j = 0; j < 16; j++) { vals[j] = src[2 + j] & 15; vals[j + 16] = src[2 + j] >> 4; }
                for (int k = 0; k < 4; k++)
                    for (int j = 0; j < 4; j++) blk[64 * k + 4 * r + j] = vals[4 * k + j] | (vals[4 * (k + 4) + j] << 4);
                memcpy(blk + 256 + 2 * r, src, 2);
            }
        }
}

static double read_limit(const uint8_t *w, long bytes) {
    double best = 1e9;
    for (int it = 0; it < 5; it++) {
        double t = now(); long total = 0;
        #pragma omp parallel for reduction(+:total)
        for (long i = 0; i < bytes / 64; i++) total += _mm_cvtsi128_si32(_mm512_castsi512_si128(_mm512_loadu_si512(w + 64 * i)));
        t = now() - t; if (t < best) best = t; if (total == 42) puts("");
    }
    return best;
}

int main(int argc, char **argv) {
    long rows = argc > 1 ? atol(argv[1]) : 262144;
    long bytes = rows * NB * 18;
    uint8_t *w = aligned_alloc(64, bytes), *wb = aligned_alloc(64, bytes);
    srand(1);
    for (long i = 0; i < bytes; i++) w[i] = rand();
    for (long r = 0; r < rows; r++) for (int b = 0; b < NB; b++) { uint16_t h = _cvtss_sh(0.001f + (rand() % 1000) * 1e-5f, 0); memcpy(w + r * NB * 18 + b * 18, &h, 2); }
    repack(w, rows, wb);
    static int8_t x[T4 * N]; static float dx[T4 * NB]; static int32_t xc[T4 * N / 4], xsum8[T4 * NB];
    for (int i = 0; i < T4 * N; i++) x[i] = rand() % 255 - 127;
    for (int b = 0; b < T4 * NB; b++) { dx[b] = 0.01f + (rand() % 100) * 1e-4f; int s = 0; for (int j = 0; j < 32; j++) s += x[32 * b + j]; xsum8[b] = -8 * s; }
    for (int q = 0; q < T4 * N / 4; q++) xc[q] = -8 * (x[4 * q] + x[4 * q + 1] + x[4 * q + 2] + x[4 * q + 3]);
    float *oa = malloc(T4 * rows * 4), *ob = malloc(T4 * rows * 4);
    double ta = 1e9, tb = 1e9, ta4 = 1e9, tb4 = 1e9;
    for (int it = 0; it < 7; it++) {
        double t = now(); matvec_a(w, rows, x, dx, xc, oa); t = now() - t; if (t < ta) ta = t;
        t = now(); matvec_b(wb, rows, x, dx, xsum8, ob); t = now() - t; if (t < tb) tb = t;
        t = now(); matmul4_a(w, rows, x, dx, xc, oa); t = now() - t; if (t < ta4) ta4 = t;
        t = now(); matmul4_b(wb, rows, x, dx, xsum8, ob); t = now() - t; if (t < tb4) tb4 = t;
    }
    double maxrel = 0;
    for (long r = 0; r < T4 * rows; r++) { double d = (oa[r] - ob[r]) / (1e-3 + __builtin_fabs(oa[r])); if (__builtin_fabs(d) > maxrel) maxrel = __builtin_fabs(d); }
    double tr = read_limit(w, bytes);
    printf("threads %d, %.0f MB of q40, read limit %.2f ms\n", omp_get_max_threads(), bytes / 1e6, tr * 1e3);
    printf("  1 token:  A %.2f ms, B %.2f ms (A/B %.2f; B at %.2f of the read limit)\n", ta * 1e3, tb * 1e3, ta / tb, tr / tb);
    printf("  4 tokens: A %.2f ms, B %.2f ms (A/B %.2f); 4 tokens over 1: A %.2fx, B %.2fx the rate\n", ta4 * 1e3, tb4 * 1e3, ta4 / tb4, 4 * ta / ta4, 4 * tb / tb4);
    printf("  A against B, 4 tokens' outputs: max relative difference %.1e\n", maxrel);
    return 0;
}
