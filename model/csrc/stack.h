/* What our GEMM libraries share (gemm_f32.c, gemm_bf16.c, amx.c): the panel loop of a GEMM and
 * the lean Llama step's decoder layer, as macros over the including file's element type, linear
 * and attention (each library is built for its own ISA, so they cannot share compiled code). */
#ifndef KVB_STACK_H
#define KVB_STACK_H

#include <stdint.h>
#include <string.h>

/* One layer's weights for a layer stack (model/fastpath.py _CLayer), weights of type WT. */
#define KVB_LAYER_STRUCT(WT)                                                                      \
    typedef struct {                                                                              \
        const WT *ln1, *ln2, *wq, *wk, *wv, *wo, *wgate, *wup, *wdown;                            \
        const float *bq, *bk, *bv, *bo, *bgate, *bup, *bdown;                                     \
        float eps1, eps2;                                                                         \
        int64_t rows_q, rows_k, rows_v, rows_o, rows_gate, rows_up, rows_down; /* block_rows */   \
    } kvb_layer;

/* The attention kernel a layer stack is passed (csrc/decode_attention.c's, K/V of type KT), and
 * the parameters of such a stack over activations of type T. */
#define KVB_ATTENTION_FN(KT)                                                                      \
    typedef int (*kvb_attention_fn)(const float *q, const KT *k, const KT *v, float *out, const int64_t *seq, \
                                    const int64_t *pos, const int64_t *tables, int64_t max_blocks, int64_t t, \
                                    int64_t h, int64_t hkv, int64_t d, int64_t bs, int64_t window, float softcap, \
                                    float scale, int nthreads);
#define KVB_STACK_PARAMS(T)                                                                                 \
    int64_t nlayers, const kvb_layer *layers, kvb_attention_fn attention, T *const *kpools, T *const *vpools, \
        T *x, int64_t t, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d, int64_t inter,          \
        const T *cos, const T *sin, const int64_t *slots, const int64_t *seq, const int64_t *pos,            \
        const int64_t *tables, int64_t max_blocks, int64_t bs, float scale, int nthreads

/* A layer stack's scratch, of type T: y, x2 [t, hidden], q, a [t, heads * d], k, v [t, kv_heads * d],
 * g, u [t, inter], then EXTRA bytes at `extra`; returns -1 from the enclosing function when there
 * is no memory. Declares nq, nkv, buf (freed by the caller) and rc. */
#define KVB_STACK_BUFFERS(T, EXTRA)                                                                \
    const int64_t nq = heads * d, nkv = kv_heads * d;                                             \
    const size_t elems = (size_t)t * (size_t)(2 * hidden + 2 * nq + 2 * nkv + 2 * inter);         \
    T *buf = (T *)aligned_alloc(64, (elems * sizeof(T) + (size_t)(EXTRA) + 63) & ~(size_t)63);    \
    if (!buf)                                                                                     \
        return -1;                                                                                \
    T *y = buf, *x2 = y + t * hidden, *q = x2 + t * hidden, *k = q + t * nq, *v = k + t * nkv,    \
      *a = v + t * nkv, *g = a + t * nq, *u = g + t * inter;                                      \
    void *extra = u + t * inter;                                                                  \
    int rc = 0;

/* A GEMM's body: rows of x in blocks of block_rows (kept hot in L2 while every panel passes over
 * them: a cache choice only), panels of NR columns split over the threads (dynamic: a core the
 * server's other threads take a while from does fewer panels; a panel's bits do not depend on
 * its thread), register blocks of up to MR rows by the including file's `block` (inlined per row
 * count). Uses the enclosing function's x, m, k, lda, w, n, bias, res, act, out, block_rows and
 * nthreads. */
#define KVB_PANELS()                                                                              \
    const int64_t panels = (n + NR - 1) / NR;                                                     \
    for (int64_t mb = 0; mb < m; mb += block_rows) {                                              \
        const int64_t me = mb + block_rows < m ? mb + block_rows : m;                             \
        _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 2)")                   \
        for (int64_t u = 0; u < panels; u++) {                                                    \
            const __typeof__(*w) *p = w + u * k * NR;                                             \
            for (int64_t m0 = mb; m0 < me; m0 += MR) {                                            \
                const __typeof__(*x) *a = x + m0 * lda;                                           \
                const int pf = m0 == mb;                                                          \
                switch (me - m0 >= MR ? MR : (int)(me - m0)) {                                    \
                case 6: block(6, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;    \
                case 5: block(5, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;    \
                case 4: block(4, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;    \
                case 3: block(3, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;    \
                case 2: block(2, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;    \
                default: block(1, a, lda, p, k, m0, u * NR, n, bias, res, act, out, pf); break;   \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

/* The step's K/V rows of layer l into its pools: values by position; keys by dimension
 * ([block][head][dim][bs], as csrc/decode_attention.c reads them: model/kv.py) or by position. */
#define KVB_WRITE_KV(BY_DIM)                                                                      \
    for (int64_t i = 0; i < t; i++) {                                                             \
        memcpy(vpools[l] + slots[i] * nkv, v + i * nkv, (size_t)nkv * sizeof(*v));                \
        if (BY_DIM) {                                                                             \
            __typeof__(*k) *kb = kpools[l] + (slots[i] / bs) * bs * nkv + slots[i] % bs;          \
            for (int64_t e = 0; e < nkv; e++)                                                     \
                kb[e * bs] = k[i * nkv + e];                                                      \
        } else {                                                                                  \
            memcpy(kpools[l] + slots[i] * nkv, k + i * nkv, (size_t)nkv * sizeof(*k));            \
        }                                                                                         \
    }

/* One decoder layer of the lean Llama step on x [t, hidden] in place (through x2): RMSNorm,
 * q/k/v, RoPE, WRITE_KV, ATTEND (q and the pools -> a), o_proj + residual, RMSNorm, gate (SiLU)
 * and up (times), down_proj + residual. The same kernels in the same order as the per-op step (so
 * the same bits), without ~12 returns to Python a layer, each of which waits for the GIL. Uses the
 * enclosing function's layer L, buffers y, x2, q, k, v, a, g, u, shapes and rc. */
#define KVB_LAYER(LINEAR, WRITE_KV, ATTEND)                                                                  \
    kvb_rms_norm(x, t, hidden, L->ln1, L->eps1, y, nthreads);                                                \
    rc |= LINEAR(y, t, hidden, hidden, L->wq, nq, L->bq, NULL, 0, q, L->rows_q, nthreads);                   \
    rc |= LINEAR(y, t, hidden, hidden, L->wk, nkv, L->bk, NULL, 0, k, L->rows_k, nthreads);                  \
    rc |= LINEAR(y, t, hidden, hidden, L->wv, nkv, L->bv, NULL, 0, v, L->rows_v, nthreads);                  \
    kvb_rope(q, t, heads, d, cos, sin);                                                                      \
    kvb_rope(k, t, kv_heads, d, cos, sin);                                                                   \
    WRITE_KV;                                                                                                \
    ATTEND;                                                                                                  \
    rc |= LINEAR(a, t, nq, nq, L->wo, hidden, L->bo, x, 0, x2, L->rows_o, nthreads);                         \
    kvb_rms_norm(x2, t, hidden, L->ln2, L->eps2, y, nthreads);                                               \
    rc |= LINEAR(y, t, hidden, hidden, L->wgate, inter, L->bgate, NULL, 1, g, L->rows_gate, nthreads);       \
    rc |= LINEAR(y, t, hidden, hidden, L->wup, inter, L->bup, g, 2, u, L->rows_up, nthreads);                \
    rc |= LINEAR(u, t, inter, inter, L->wdown, hidden, L->bdown, x2, 0, x, L->rows_down, nthreads)

#endif
