/* One GRU layer's recurrence on the CPU, for df_mps.gru (compiled there at first use).
 *
 * Why: torch's CPU GRU spends each frame in about ten small aten calls, and oneMKL's product
 * of a few rows with the 768 x 256 hidden weights packs its inputs at every call: at 4 rows a
 * layer-step cost 2.3x what it cost at 1 row. Here a frame is one pass over the weights for
 * up to four rows at once (the weights, 768 KB, stream from L3 once a frame for them), then
 * the gates, vectorised, with no call in between.
 *
 * Arithmetic: each hidden product is a chain of fused multiply-adds over k = 0..H-1, the same
 * for a row whatever the rows beside it (so a stream's output does not depend on its batch);
 * exp is Cephes' polynomial (about 2 ulp); h' = (h - n) * z + n, as aten's GRU cell writes it.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && !defined(DFMPS_PORTABLE)
#define DFMPS_AVX2 1
#include <immintrin.h>
#endif

#define JB 16 /* gate outputs per block of the packed weights */
#define MAX_ROWS 4

/* A fused multiply-add where the processor has one; elsewhere a multiply and an add (fmaf
 * would be a slow library call there). One build computes every row the same way either way. */
#ifdef FP_FAST_FMAF
#define FMA(a, b, c) fmaf((a), (b), (c))
#else
#define FMA(a, b, c) ((a) * (b) + (c))
#endif

#if defined(_OPENMP) || defined(__clang__) || defined(__GNUC__)
#define SIMD _Pragma("omp simd")
#else
#define SIMD
#endif

static inline __attribute__((always_inline)) float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* n = x / ln 2 rounded to the nearest integer (adding and taking away 1.5 * 2^23 rounds
     * a float below 2^22 in magnitude; floorf would keep gcc from vectorising the loop). */
    float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = FMA(fx, -0.693359375f, x);
    r = FMA(fx, 2.12194440e-4f, r);
    float z = r * r;
    float y = 1.9875691500e-4f;
    y = FMA(y, r, 1.3981999507e-3f);
    y = FMA(y, r, 8.3334519073e-3f);
    y = FMA(y, r, 4.1665795894e-2f);
    y = FMA(y, r, 1.6666665459e-1f);
    y = FMA(y, r, 5.0000001201e-1f);
    y = FMA(y, z, r) + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {((int32_t)fx + 127) << 23};
    return y * scale.f;
}

/* gh[r][j] = b[j] + sum_k h[r][k] * W[j][k] for R rows and the NB blocks of JB outputs from
 * block jb0 on; packed[jb][k][jj] = W[jb*JB+jj][k]. R * NB * JB / 8 accumulators (8 AVX2
 * vectors): few enough to stay in registers, enough to hide the multiply-adds' latency. */
static inline __attribute__((always_inline)) void block_products(
    const int R, const int NB, int H, int G, const float *const *h, const float *packed,
    const float *b, float *gh, int jb0) {
    float acc[MAX_ROWS][4][JB];
    const float *p[4];
    for (int nb = 0; nb < NB; nb++) p[nb] = packed + (size_t)(jb0 + nb) * H * JB;
#if defined(DFMPS_AVX2)
    /* x86: the weights' vectors loaded once a k into registers and used by every row (left
     * to itself, gcc folds them into each row's multiply-add as a memory operand: 12 loads a
     * k at 4 rows, bound by the load ports, 2x slower). */
    __m256 va[MAX_ROWS][4][2];
    for (int r = 0; r < R; r++)
        for (int nb = 0; nb < NB; nb++) va[r][nb][0] = va[r][nb][1] = _mm256_setzero_ps();
    for (int k = 0; k < H; k++) {
        __m256 w[4][2];
        for (int nb = 0; nb < NB; nb++) {
            w[nb][0] = _mm256_loadu_ps(p[nb] + (size_t)k * JB);
            w[nb][1] = _mm256_loadu_ps(p[nb] + (size_t)k * JB + 8);
        }
        for (int r = 0; r < R; r++) {
            const __m256 hk = _mm256_broadcast_ss(h[r] + k);
            for (int nb = 0; nb < NB; nb++) {
                va[r][nb][0] = _mm256_fmadd_ps(hk, w[nb][0], va[r][nb][0]);
                va[r][nb][1] = _mm256_fmadd_ps(hk, w[nb][1], va[r][nb][1]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int nb = 0; nb < NB; nb++) {
            _mm256_storeu_ps(acc[r][nb], va[r][nb][0]);
            _mm256_storeu_ps(acc[r][nb] + 8, va[r][nb][1]);
        }
#else
    for (int r = 0; r < R; r++)
        for (int nb = 0; nb < NB; nb++) {
            SIMD for (int jj = 0; jj < JB; jj++) acc[r][nb][jj] = 0.0f;
        }
    for (int k = 0; k < H; k++) {
        for (int r = 0; r < R; r++) {
            const float hk = h[r][k];
            for (int nb = 0; nb < NB; nb++) {
                const float *w = p[nb] + (size_t)k * JB;
                SIMD for (int jj = 0; jj < JB; jj++)
                    acc[r][nb][jj] = FMA(hk, w[jj], acc[r][nb][jj]);
            }
        }
    }
#endif
    for (int r = 0; r < R; r++)
        for (int nb = 0; nb < NB; nb++) {
            float *out = gh + (size_t)r * G + (size_t)(jb0 + nb) * JB;
            const float *bias = b + (size_t)(jb0 + nb) * JB;
            SIMD for (int jj = 0; jj < JB; jj++) out[jj] = acc[r][nb][jj] + bias[jj];
        }
}

/* The rows' products, R rows at once, as many output blocks together as keep 8 accumulators
 * busy. Every output is the same chain of multiply-adds whatever R and NB. */
static void products(int R, int H, int G, const float *const *h, const float *packed,
                     const float *b, float *gh) {
    const int blocks = G / JB;
    int jb = 0;
    switch (R) {
    case 1:
        for (; jb + 4 <= blocks; jb += 4) block_products(1, 4, H, G, h, packed, b, gh, jb);
        for (; jb < blocks; jb++) block_products(1, 1, H, G, h, packed, b, gh, jb);
        break;
    case 2:
        for (; jb + 2 <= blocks; jb += 2) block_products(2, 2, H, G, h, packed, b, gh, jb);
        for (; jb < blocks; jb++) block_products(2, 1, H, G, h, packed, b, gh, jb);
        break;
    case 3:
        for (; jb < blocks; jb++) block_products(3, 1, H, G, h, packed, b, gh, jb);
        break;
    default:
        for (; jb < blocks; jb++) block_products(4, 1, H, G, h, packed, b, gh, jb);
        break;
    }
}

static void gates(int H, const float *gi, const float *gh, const float *h, float *out) {
    SIMD for (int u = 0; u < H; u++) {
        const float reset = 1.0f / (1.0f + exp_poly(-(gi[u] + gh[u])));
        const float update = 1.0f / (1.0f + exp_poly(-(gi[H + u] + gh[H + u])));
        const float a = gi[2 * H + u] + reset * gh[2 * H + u];
        const float n = 1.0f - 2.0f / (exp_poly(2.0f * a) + 1.0f);
        out[u] = (h[u] - n) * update + n;
    }
}

/* One layer over ``frames`` frames for ``rows`` rows. Strides are in floats; the last
 * dimension of gi ([.., 3H]), h0 ([.., H]) and out ([.., H]) is contiguous. Returns 0, -1
 * for sizes it does not take, -2 where its scratch memory can't be had. */
int dfmps_gru_layer(int rows, int frames, int hidden, const float *gi, int64_t gi_row,
                    int64_t gi_t, const float *h0, int64_t h0_row, const float *packed,
                    const float *b, float *out, int64_t out_row, int64_t out_t) {
    const int G = 3 * hidden;
    if (rows < 1 || frames < 0 || hidden < 1 || G % JB) return -1;
    float *scratch = malloc(sizeof(float) * MAX_ROWS * (size_t)G);
    if (!scratch) return -2;
    for (int t = 0; t < frames; t++) {
        for (int r0 = 0; r0 < rows; r0 += MAX_ROWS) {
            const int R = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
            const float *h[MAX_ROWS];
            for (int r = 0; r < R; r++) {
                const int row = r0 + r;
                h[r] = t == 0 ? h0 + row * h0_row : out + row * out_row + (t - 1) * out_t;
            }
            products(R, hidden, G, h, packed, b, scratch);
            for (int r = 0; r < R; r++) {
                const int row = r0 + r;
                gates(hidden, gi + row * gi_row + t * gi_t, scratch + (size_t)r * G, h[r],
                      out + row * out_row + t * out_t);
            }
        }
    }
    free(scratch);
    return 0;
}
