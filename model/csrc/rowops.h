/* The lean step's elementwise parts in bf16 on AVX512-BF16, one pass each (torch runs them as
 * several bf16 ops with a rounding after each). Every row / token is the same code whatever the
 * call's size. Included by amx.c and gemm_bf16.c (their layer stacks call them). */
#ifndef KVB_ROWOPS_H
#define KVB_ROWOPS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __m512 bf16x16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __mmask16 tail(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* n floats to bf16 (round to nearest even, as torch's .to(bfloat16)) and back. */
static inline void bf16_from_f32(const float *in, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i += 16)
        _mm256_mask_storeu_epi16(out + i, tail(n - i), (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail(n - i), in + i)));
}

static inline void f32_from_bf16(const uint16_t *in, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i += 16)
        _mm512_mask_storeu_ps(out + i, tail(n - i), bf16x16(in + i, tail(n - i)));
}

/* out = w * bf16(x / sqrt(mean(x^2) + eps)) per row, as HF's RMSNorm rounds (fp32 inside). */
void kvb_rms_norm(const uint16_t *x, int64_t m, int64_t n, const uint16_t *w, float eps, uint16_t *out,
                  int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m >= 64)
    for (int64_t i = 0; i < m; i++) {
        const uint16_t *xr = x + i * n;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __m512 v = bf16x16(xr + j, tail(n - j));
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)n + eps));
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = tail(n - j);
            const __m512 h = _mm512_mul_ps(bf16x16(xr + j, k), r);
            const __m512 hb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(h)), 16));
            _mm256_mask_storeu_epi16(out + i * n + j, k, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(hb, bf16x16(w + j, k))));
        }
    }
}

/* Rotary embedding in place: x [t, heads, d], cos/sin [t, d] (the rotate-half layout). */
void kvb_rope(uint16_t *x, int64_t t, int64_t heads, int64_t d, const uint16_t *cos, const uint16_t *sin) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < t; i++)
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *v = x + (i * heads + h) * d;
            const uint16_t *c = cos + i * d, *s = sin + i * d;
            for (int64_t j = 0; j < half; j += 16) {
                const __mmask16 k = tail(half - j);
                const __m512 a = bf16x16(v + j, k), b = bf16x16(v + half + j, k);
                const __m512 lo = _mm512_fmsub_ps(a, bf16x16(c + j, k), _mm512_mul_ps(b, bf16x16(s + j, k)));
                const __m512 hi = _mm512_fmadd_ps(b, bf16x16(c + half + j, k), _mm512_mul_ps(a, bf16x16(s + half + j, k)));
                _mm256_mask_storeu_epi16(v + j, k, (__m256i)_mm512_cvtneps_pbh(lo));
                _mm256_mask_storeu_epi16(v + half + j, k, (__m256i)_mm512_cvtneps_pbh(hi));
            }
        }
}

#endif
