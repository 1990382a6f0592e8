/* Vector math shared by the kernels: the same instructions for every element, so an element's
 * bits never depend on where it sits in a call. */
#ifndef KVB_VECMATH_H
#define KVB_VECMATH_H
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* e^x = 2^n e^r, r = x - n ln 2 in two parts, e^r by its Taylor polynomial to r^7: |x| <= 88, ~2 ulp. */
#define KVB_EXP_BODY(V, SET1, MIN, MAX, ROUND, FNMADD, FMADD)                                   \
    x = MIN(MAX(x, SET1(-88.0f)), SET1(88.0f));                                                 \
    const V n = ROUND(x * SET1(1.44269504089f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
    V r = FNMADD(n, SET1(0.693145751953125f), x);                                               \
    r = FNMADD(n, SET1(1.428606765330187e-06f), r);                                            \
    V p = SET1(1.0f / 5040);                                                                    \
    p = FMADD(p, r, SET1(1.0f / 720));                                                          \
    p = FMADD(p, r, SET1(1.0f / 120));                                                          \
    p = FMADD(p, r, SET1(1.0f / 24));                                                           \
    p = FMADD(p, r, SET1(1.0f / 6));                                                            \
    p = FMADD(p, r, SET1(0.5f));                                                                \
    p = FMADD(p, r, SET1(1.0f));                                                                \
    p = FMADD(p, r, SET1(1.0f));

#ifdef __AVX512F__
static inline __m512 exp16(__m512 x) {
    KVB_EXP_BODY(__m512, _mm512_set1_ps, _mm512_min_ps, _mm512_max_ps, _mm512_roundscale_ps, _mm512_fnmadd_ps,
                 _mm512_fmadd_ps)
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp8(__m256 x) {
    KVB_EXP_BODY(__m256, _mm256_set1_ps, _mm256_min_ps, _mm256_max_ps, _mm256_round_ps, _mm256_fnmadd_ps,
                 _mm256_fmadd_ps)
    /* 2^n from its exponent bits: n is in [-127, 127], and 2^-127 (bits 0) reads as 0 */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return p * _mm256_castsi256_ps(e);
}
#endif

#endif
