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
 *
 * Also the lean step's RMSNorm and RoPE in fp32, and its whole layer stack in one call.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "stack.h"
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
    KVB_PANELS()
    return 0;
}

/* The lanes of v summed one after another: one fixed order. */
static inline float hsum(vf v) {
    float lane[VW];
    memcpy(lane, &v, sizeof lane);
    float s = 0.0f;
    for (int i = 0; i < VW; i++)
        s += lane[i];
    return s;
}

/* out = w * (x / sqrt(mean(x^2) + eps)) per row, HF's RMSNorm in fp32; a row is the same code
 * whatever the call's size. */
void kvb_rms_norm(const float *x, int64_t m, int64_t n, const float *w, float eps, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m >= 64)
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * n;
        vf ss = VZERO();
        for (int64_t j = 0; j < n; j += VW) {
            const vf v = load_some(first(n - j), xr + j);
            ss = VFMA(v, v, ss);
        }
        const vf r = VSET1(1.0f / sqrtf(hsum(ss) / (float)n + eps));
        for (int64_t j = 0; j < n; j += VW) {
            const lanes k = first(n - j);
            store_some(out + i * n + j, k, load_some(k, xr + j) * r * load_some(k, w + j));
        }
    }
}

/* Rotary embedding in place: x [t, heads, d], cos/sin [t, d] (the rotate-half layout). */
void kvb_rope(float *x, int64_t t, int64_t heads, int64_t d, const float *cos, const float *sin) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < t; i++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (i * heads + h) * d;
            const float *c = cos + i * d, *s = sin + i * d;
            for (int64_t j = 0; j < half; j += VW) {
                const lanes k = first(half - j);
                const vf a = load_some(k, v + j), b = load_some(k, v + half + j);
                const vf lo = a * load_some(k, c + j) - b * load_some(k, s + j);
                const vf hi = b * load_some(k, c + half + j) + a * load_some(k, s + half + j);
                store_some(v + j, k, lo);
                store_some(v + half + j, k, hi);
            }
        }
}

/* ------------------------------------------------------------------------------------------------
 * A whole decoder stack of the lean Llama step in one call, as kvb_amx_layers does in bf16: per
 * layer RMSNorm, q/k/v, RoPE, the K/V write into the pool (keys by dimension, as csrc/decode_attention.c
 * reads them: model/kv.py), paged attention (that kernel, passed in: another library), o_proj + residual, RMSNorm, gate (SiLU) and up (times), down_proj
 * + residual. The same kernels in the same order as the per-op step (so the same bits), without
 * ~170 returns to Python a step, each of which waits for the GIL. */
KVB_LAYER_STRUCT(float)
KVB_ATTENTION_FN(float)

int kvb_f32_layers(KVB_STACK_PARAMS(float)) {
    KVB_STACK_BUFFERS(float, 0)
    (void)extra;
    for (int64_t l = 0; l < nlayers && !rc; l++) {
        const kvb_layer *L = layers + l;
        KVB_LAYER(kvb_f32_linear, KVB_WRITE_KV(1),
                  rc |= attention(q, kpools[l], vpools[l], a, seq, pos, tables, max_blocks, t, heads, kv_heads, d, bs,
                                  0, 0.0f, scale, nthreads));
    }
    free(buf);
    return rc ? -1 : 0;
}
