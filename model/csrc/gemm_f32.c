/* fp32 linear on AVX-512 or AVX2+FMA whose every output row is the same bits whatever else is in
 * the call: out[m, n] = act(sum_k x[m, k] w[n, k] + bias[n]) (+ or x) res[m, n].
 *
 * Why our own: oneDNN's fp32 GEMM changes a row's sum order with the row count (kernel, K
 * blocking and thread split are per call), so exactness on top of it meant row chunks that each
 * re-read the whole weight: a 256-token step read it eight times. Here every output is one fp32
 * FMA chain over k = 0, 1, ..., K-1 in a register, whatever register block, row block or thread
 * its row lands in; the epilogue is the same vector code for every element. Built once per ISA
 * (model/native.py): the vector width changes the panel layout, never a sum's order.
 *
 * x: [m, k] fp32 rows with stride lda. w: packed by kvb_f32_pack into panels of NR columns,
 * k-major ([ceil(n/NR)][k][NR], columns past n zero). bias: [n] or NULL. res: [m, n] or NULL.
 * act: 0 none (res added), 1 SiLU (then res added), 2 times res.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "vecmath.h"

#if defined(__AVX512F__)
typedef __m512 vf;
#define VW 16
#define NV 4 /* 6 x 4 accumulators + 4 weights + 1 broadcast of 32 registers */
#define VZERO _mm512_setzero_ps
#define VLOAD _mm512_load_ps
#define VSET1 _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VEXP exp16
typedef __mmask16 lanes;
static inline lanes first(int64_t c) { return c >= 16 ? (lanes)0xFFFF : (lanes)((1u << c) - 1); }
static inline vf load_some(lanes m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline void store_some(float *p, lanes m, vf v) { _mm512_mask_storeu_ps(p, m, v); }
#define ISA 512
#else
typedef __m256 vf;
#define VW 8
#define NV 2 /* 6 x 2 accumulators + 2 weights + 1 broadcast of 16 registers */
#define VZERO _mm256_setzero_ps
#define VLOAD _mm256_load_ps
#define VSET1 _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
#define VEXP exp8
typedef __m256i lanes;
static inline lanes first(int64_t c) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(c < 8 ? c : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf load_some(lanes m, const float *p) { return _mm256_maskload_ps(p, m); }
static inline void store_some(float *p, lanes m, vf v) { _mm256_maskstore_ps(p, m, v); }
#define ISA 256
#endif
#define NR (VW * NV) /* columns per panel */
#define MR 6         /* rows per register block */

int kvb_f32_isa(void) { return ISA; }
int kvb_f32_panel(void) { return NR; }

void kvb_f32_pack(const float *w, int64_t n, int64_t k, float *out) {
    const int64_t panels = (n + NR - 1) / NR;
    memset(out, 0, (size_t)(panels * k * NR) * sizeof(float));
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < k; i++)
            out[(j / NR) * k * NR + i * NR + j % NR] = w[j * k + i];
}

static inline void store(vf v, int64_t row, int64_t c, int64_t n, const float *bias, const float *res, int act,
                         float *out) {
    if (c >= n)
        return;
    const lanes mask = first(n - c);
    if (bias)
        v = v + load_some(mask, bias + c);
    if (act == 1)
        v = v / (VSET1(1.0f) + VEXP(VZERO() - v));
    if (res) {
        const vf r = load_some(mask, res + row * n + c);
        v = act == 2 ? v * r : v + r;
    }
    store_some(out + row * n + c, mask, v);
}

/* rows (<= MR) rows of x from a, one panel p of NR columns starting at column c0. Inlined per row
 * count so the accumulators stay in registers; each accumulator's chain is the same for any rows. */
static inline __attribute__((always_inline)) void block(const int rows, const float *a, int64_t lda,
                                                         const float *p, int64_t k, int64_t m0, int64_t c0,
                                                         int64_t n, const float *bias, const float *res, int act,
                                                         float *out, int prefetch) {
    vf acc[MR][NV];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++)
            acc[i][v] = VZERO();
    for (int64_t j = 0; j < k; j++) {
        const float *pj = p + j * NR;
        if (prefetch) /* the panel streams from memory on its first row block: ask ahead */
            for (int v = 0; v < NR / 16; v++)
                _mm_prefetch((const char *)(pj + (512 / NR) * NR) + 64 * v, _MM_HINT_T0);
        vf b[NV];
        for (int v = 0; v < NV; v++)
            b[v] = VLOAD(pj + VW * v);
        for (int i = 0; i < rows; i++) {
            const vf x = VSET1(a[i * lda + j]);
            for (int v = 0; v < NV; v++)
                acc[i][v] = VFMA(x, b[v], acc[i][v]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++)
            store(acc[i][v], m0 + i, c0 + VW * v, n, bias, res, act, out);
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
