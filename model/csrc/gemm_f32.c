/* fp32 linear on AVX-512 whose every output row is the same bits whatever else is in the call:
 * out[m, n] = act(sum_k x[m, k] w[n, k] + bias[n]) (+ or x) res[m, n].
 *
 * Why our own: oneDNN's fp32 GEMM changes a row's sum order with the row count (kernel, K
 * blocking and thread split are per call), so exactness on top of it meant row chunks that each
 * re-read the whole weight: a 256-token step read it eight times. Here every output is one fp32
 * FMA chain over k = 0, 1, ..., K-1 in a register, whatever register block, row block or thread
 * its row lands in; the epilogue is the same vector code for every element.
 *
 * x: [m, k] fp32 rows with stride lda. w: packed by kvb_f32_pack into panels of 64 columns,
 * k-major ([ceil(n/64)][k][64], columns past n zero). bias: [n] or NULL. res: [m, n] or NULL.
 * act: 0 none (res added), 1 SiLU (then res added), 2 times res.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "vecmath.h"

#define NR 64 /* columns per panel: four vectors */
#define MR 6  /* rows per register block: 24 accumulators + 4 weights + 1 broadcast of 32 registers */

void kvb_f32_pack(const float *w, int64_t n, int64_t k, float *out) {
    const int64_t panels = (n + NR - 1) / NR;
    memset(out, 0, (size_t)(panels * k * NR) * sizeof(float));
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < k; i++)
            out[(j / NR) * k * NR + i * NR + j % NR] = w[j * k + i];
}

static inline void store(__m512 v, int64_t row, int64_t c, int64_t n, const float *bias, const float *res,
                         int act, float *out) {
    if (c >= n)
        return;
    const __mmask16 mask = n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1);
    if (bias)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + c));
    if (act == 1)
        v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    if (res) {
        const __m512 r = _mm512_maskz_loadu_ps(mask, res + row * n + c);
        v = act == 2 ? _mm512_mul_ps(v, r) : _mm512_add_ps(v, r);
    }
    _mm512_mask_storeu_ps(out + row * n + c, mask, v);
}

/* rows (<= MR) rows of x from a, one panel p of 64 columns starting at column c0. Inlined per row
 * count so the accumulators stay in registers; each accumulator's chain is the same for any rows. */
static inline __attribute__((always_inline)) void block(const int rows, const float *a, int64_t lda,
                                                         const float *p, int64_t k, int64_t m0, int64_t c0,
                                                         int64_t n, const float *bias, const float *res, int act,
                                                         float *out, int prefetch) {
    __m512 acc[MR][4];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < 4; v++)
            acc[i][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j++) {
        const float *pj = p + j * NR;
        if (prefetch) /* the panel streams from memory on its first row block: ask ahead */
            for (int v = 0; v < 4; v++)
                _mm_prefetch((const char *)(pj + 8 * NR) + 64 * v, _MM_HINT_T0);
        const __m512 b0 = _mm512_load_ps(pj), b1 = _mm512_load_ps(pj + 16), b2 = _mm512_load_ps(pj + 32),
                     b3 = _mm512_load_ps(pj + 48);
        for (int i = 0; i < rows; i++) {
            const __m512 x = _mm512_set1_ps(a[i * lda + j]);
            acc[i][0] = _mm512_fmadd_ps(x, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(x, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(x, b2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(x, b3, acc[i][3]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < 4; v++)
            store(acc[i][v], m0 + i, c0 + 16 * v, n, bias, res, act, out);
}

int kvb_f32_linear(const float *x, int64_t m, int64_t k, int64_t lda, const float *w, int64_t n,
                   const float *bias, const float *res, int act, float *out, int64_t block_rows,
                   int nthreads) {
    if (m < 0 || k <= 0 || block_rows < MR)
        return -1;
    const int64_t panels = (n + NR - 1) / NR;
    /* Rows of x kept hot in L2 while every panel passes over them (a cache choice only). */
    for (int64_t mb = 0; mb < m; mb += block_rows) {
        const int64_t me = mb + block_rows < m ? mb + block_rows : m;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t u = 0; u < panels; u++) {
            const float *p = w + u * k * NR;
            for (int64_t m0 = mb; m0 < me; m0 += MR) {
                const float *a = x + m0 * lda;
                const int pf = m0 == mb;
                switch (me - m0 >= MR ? MR : (int)(me - m0)) {
                case 6: block(6, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;
                case 5: block(5, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;
                case 4: block(4, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;
                case 3: block(3, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;
                case 2: block(2, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;
                default: block(1, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;
                }
            }
        }
    }
    return 0;
}
