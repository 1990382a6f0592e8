/* bf16 linear on AVX512-BF16 (no AMX) whose every output row is the same bits whatever else is in
 * the call: out[m, n] = bf16(act(sum_k x[m, k] w[n, k] + bias[n]) (+ or x) res[m, n]).
 *
 * Why our own: oneDNN's bf16 GEMM picks its kernel, K blocking and thread split per call by row
 * count, so exactness on top of it meant calls of a few dozen rows, each re-reading the weight,
 * and a step of ~170 oneDNN calls, each a return to Python that waits for the GIL. Here every
 * output is one fp32 accumulator fed by VDPBF16PS over k = (0, 1), (2, 3), ... in order, whatever
 * register block, row block or thread its row lands in; the epilogue is the same vector code for
 * every element (that of amx.c).
 *
 * x: [m, k] bf16 rows with stride lda (k even; the caller pads). w: packed by kvb_bf16_pack into
 * panels of NR columns, pair-major ([ceil(n/NR)][k/2][NR][2], columns past n zero). bias: fp32 [n]
 * or NULL. res: bf16 [m, n] or NULL. act: 0 none (res added), 1 SiLU (then res added), 2 times res.
 *
 * Also the lean step's RMSNorm and RoPE in bf16 (rowops.h) and its whole layer stack in one call.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rowops.h"
#include "stack.h"
#include "vecmath.h"

#define NV 4         /* 6 x 4 accumulators + 4 weights + 1 broadcast of 32 registers */
#define NR (16 * NV) /* columns per panel */
#define MR 6         /* rows per register block */

int kvb_bf16_panel(void) { return NR; }

/* w [n, kw] bf16 row-major -> panels; k >= kw even, pairs past kw zero. */
void kvb_bf16_pack(const uint16_t *w, int64_t n, int64_t kw, int64_t k, uint16_t *out) {
    const int64_t panels = (n + NR - 1) / NR;
    memset(out, 0, (size_t)(panels * k * NR) * sizeof(uint16_t));
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < kw; i++)
            out[(j / NR) * k * NR + (i / 2) * 2 * NR + (j % NR) * 2 + i % 2] = w[j * kw + i];
}

static inline void store(__m512 v, int64_t row, int64_t c, int64_t n, const float *bias, const uint16_t *res,
                         int act, uint16_t *out) {
    if (c >= n)
        return;
    const __mmask16 mask = tail(n - c);
    if (bias)
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + c));
    if (act == 1)
        v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    if (res) {
        const __m512 r = bf16x16(res + row * n + c, mask);
        v = act == 2 ? _mm512_mul_ps(v, r) : _mm512_add_ps(v, r);
    }
    _mm256_mask_storeu_epi16(out + row * n + c, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

/* rows (<= MR) rows of x from a, one panel p of NR columns starting at column c0. Inlined per row
 * count so the accumulators stay in registers; each accumulator's chain is the same for any rows. */
static inline __attribute__((always_inline)) void block(const int rows, const uint16_t *a, int64_t lda,
                                                         const uint16_t *p, int64_t k, int64_t m0, int64_t c0,
                                                         int64_t n, const float *bias, const uint16_t *res,
                                                         int act, uint16_t *out, int prefetch) {
    __m512 acc[MR][NV];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++)
            acc[i][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k / 2; j++) {
        const uint16_t *pj = p + j * 2 * NR;
        if (prefetch) /* the panel streams from memory on its first row block: ask ahead */
            for (int v = 0; v < NV; v++)
                _mm_prefetch((const char *)(pj + 8 * 2 * NR) + 64 * v, _MM_HINT_T0);
        __m512bh b[NV];
        for (int v = 0; v < NV; v++)
            b[v] = (__m512bh)_mm512_loadu_si512(pj + 32 * v);
        for (int i = 0; i < rows; i++) {
            int32_t pair;
            memcpy(&pair, a + i * lda + 2 * j, sizeof pair);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < NV; v++)
                acc[i][v] = _mm512_dpbf16_ps(acc[i][v], x, b[v]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++)
            store(acc[i][v], m0 + i, c0 + 16 * v, n, bias, res, act, out);
}

int kvb_bf16_linear(const uint16_t *x, int64_t m, int64_t k, int64_t lda, const uint16_t *w, int64_t n,
                    const float *bias, const uint16_t *res, int act, uint16_t *out, int64_t block_rows,
                    int nthreads) {
    if (m < 0 || k <= 0 || k % 2 || block_rows < MR)
        return -1;
    KVB_PANELS()
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * A whole decoder stack of the lean Llama step in one call, as kvb_amx_layers does on AMX: per
 * layer RMSNorm, q/k/v, RoPE, the K/V write into the pool (keys by dimension, as
 * csrc/decode_attention.c reads them: model/kv.py), paged attention (that kernel, passed in: another
 * library; the query widened to fp32, the output rounded to bf16 as the per-op step does),
 * o_proj + residual, RMSNorm, gate (SiLU) and up (times), down_proj + residual. The same kernels
 * in the same order as the per-op step (so the same bits), without ~170 returns to Python a step. */
KVB_LAYER_STRUCT(uint16_t)
KVB_ATTENTION_FN(uint16_t)

int kvb_bf16_layers(KVB_STACK_PARAMS(uint16_t)) {
    KVB_STACK_BUFFERS(uint16_t, (size_t)t * (size_t)(heads * d) * 8) /* the query and the output in fp32 */
    float *q32 = (float *)extra, *att = q32 + t * nq;
    for (int64_t l = 0; l < nlayers && !rc; l++) {
        const kvb_layer *L = layers + l;
        KVB_LAYER(kvb_bf16_linear, KVB_WRITE_KV(1), {
            f32_from_bf16(q, t * nq, q32);
            rc |= attention(q32, kpools[l], vpools[l], att, seq, pos, tables, max_blocks, t, heads, kv_heads, d, bs,
                            0, 0.0f, scale, nthreads);
            bf16_from_f32(att, t * nq, a);
        });
    }
    free(buf);
    return rc ? -1 : 0;
}
