/* bf16 linear layers and RMSNorm for x86-64 CPUs with AVX2 + FMA but no native bf16 matrix multiply
 * (see cpu_gemm.py).
 *
 * y (m, n) = x (m, k) · w (n, k)ᵀ, all bf16 in memory; products and sums in fp32; y rounded to the
 * nearest bf16 (ties to even), as torch rounds. Each weight row is read from memory once per call
 * and multiplied into up to 8 rows of x at a time, so m = 8 costs little more than m = 1.
 * Output columns are split over `threads` OpenMP threads (the runtime torch itself uses).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m256 load8(const uint16_t *p) {   /* 8 bf16 → 8 fp32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline uint16_t to_bf16(float f) {          /* round to nearest, ties to even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* R rows of x (fp32, row stride k) times one weight row, with U independent sums per row (R · U ≤ 8:
 * enough chains in flight to hide the FMA latency when R is small); k % 8 trailing elements in scalar code. */
static inline __attribute__((always_inline)) void rows(const int R, const int U, const float *x, const uint16_t *wr,
                                                       int64_t k, uint16_t *y, int64_t n) {
    __m256 acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 * U <= k; t += 8 * U)
        for (int u = 0; u < U; ++u) {
            __m256 wv = load8(wr + t + 8 * u);
            for (int i = 0; i < R; ++i)
                acc[i * U + u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + t + 8 * u), wv, acc[i * U + u]);
        }
    for (; t + 8 <= k; t += 8) {
        __m256 wv = load8(wr + t);
        for (int i = 0; i < R; ++i) acc[i * U] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + t), wv, acc[i * U]);
    }
    for (int i = 0; i < R; ++i) {
        __m256 a = acc[i * U];
        for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[i * U + u]);
        float s = hsum(a);
        for (int64_t v = t; v < k; ++v) s += x[i * k + v] * from_bf16(wr[v]);
        y[i * n] = to_bf16(s);
    }
}

void dspark_bf16_linear(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m, int64_t n, int64_t k,
                        int threads) {
    float *xf = malloc(sizeof(float) * m * k);
    for (int64_t i = 0; i < m * k; ++i) xf[i] = from_bf16(x[i]);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
        const uint16_t *wr = w + j * k;
        int64_t i = 0;
        for (; i + 8 <= m; i += 8) rows(8, 1, xf + i * k, wr, k, y + i * n + j, n);
        if (m - i >= 4) { rows(4, 2, xf + i * k, wr, k, y + i * n + j, n); i += 4; }
        if (m - i >= 2) { rows(2, 4, xf + i * k, wr, k, y + i * n + j, n); i += 2; }
        if (m - i >= 1) rows(1, 4, xf + i * k, wr, k, y + i * n + j, n);
    }
    free(xf);
}

/* Llama's RMSNorm of m rows of d bf16 values: y = w · bf16(x · 1/sqrt(mean(x²) + eps)), each product rounded
 * to bf16 as torch rounds its bf16 tensors; the mean in fp32 (8 partial sums). One call instead of the eight
 * small tensor operations of the module, whose fixed costs dominate a decode step on these CPUs. */
void dspark_bf16_rmsnorm(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m, int64_t d, float eps) {
    for (int64_t i = 0; i < m; ++i) {
        const uint16_t *xr = x + i * d;
        __m256 acc = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= d; t += 8) {
            __m256 v = load8(xr + t);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (; t < d; ++t) ss += from_bf16(xr[t]) * from_bf16(xr[t]);
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t e = 0; e < d; ++e)
            y[i * d + e] = to_bf16(from_bf16(w[e]) * from_bf16(to_bf16(from_bf16(xr[e]) * r)));
    }
}

/* Greedy drafting through a Markov chunk head (models/dspark.py): for each of R rows and G block positions,
 * token = argmax_v bf16(base[k, v] + bf16(up[v] · emb[prev])), prev = the previous position's token (the
 * anchor's draft id first). One call for the whole block instead of G rounds of four small tensor ops.
 * base (R, G, V), emb (V + 1, r), up (V, r) bf16; first (R,) and toks (R, G) int64; ties go to the lowest v. */
void dspark_markov_greedy(const uint16_t *base, const uint16_t *emb, const uint16_t *up, const int64_t *first,
                          int64_t *toks, int64_t R, int64_t G, int64_t V, int64_t r, int threads) {
    float *e = malloc(sizeof(float) * r);
    for (int64_t row = 0; row < R; ++row) {
        int64_t prev = first[row];
        for (int64_t k = 0; k < G; ++k) {
            for (int64_t j = 0; j < r; ++j) e[j] = from_bf16(emb[prev * r + j]);
            const uint16_t *b = base + (row * G + k) * V;
            float best = -INFINITY;
            int64_t arg = V;
            #pragma omp parallel num_threads(threads)
            {
                float mine = -INFINITY;
                int64_t at = V;
                #pragma omp for schedule(static) nowait
                for (int64_t v = 0; v < V; ++v) {
                    uint16_t bias;
                    rows(1, 4, e, up + v * r, r, &bias, 1);
                    float logit = from_bf16(to_bf16(from_bf16(b[v]) + from_bf16(bias)));
                    if (logit > mine || (logit == mine && v < at)) { mine = logit; at = v; }
                }
                #pragma omp critical
                if (mine > best || (mine == best && at < arg)) {
                    best = mine;
                    arg = at;
                }
            }
            toks[row * G + k] = prev = arg < V ? arg : 0;   /* NaN logits only */
        }
    }
    free(e);
}
