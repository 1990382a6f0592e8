/* Attention over the paged KV pool, CPU: decode tokens and prefill chunks in one call. K/V in
 * fp32 or bf16; the query, the scores and the output in fp32.
 *
 * q, out: [T, H, D] contiguous, the step's packed query tokens. Token t belongs to sequence
 * seq[t] and sits at position pos[t]; it attends to that sequence's positions
 * [max(0, pos - window + 1), pos] (window 0: from 0), read through the sequence's block table
 * (tables[seq * max_blocks + i] is the pool block of positions [i * bs, (i + 1) * bs)). The pool
 * is [blocks, bs, Hkv, D]: position j of a block is j * Hkv * D elements from its start. Query
 * heads are grouped (H = g * Hkv): the g heads sharing a KV head are scored in one pass over
 * that head's keys. softcap > 0 caps the logits (s = cap * tanh(s / cap)).
 *
 * One task per (token, kv head) streams its keys once and its values once; tasks are split over
 * OpenMP threads (the process's libgomp: the one torch already loaded). A token's result never
 * depends on the other tokens of the call. Built and loaded by model/kernels.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVB_CLONES
#endif

#define KVB_MAX_GROUP 16
#define KVB_MAX_DIM 256

/* bf16 is the top half of an fp32: widening is a shift (vectorised as such). */
static inline float kvb_bf16(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#define KVB_F32(x) (x)
#define KVB_BF16(x) kvb_bf16(x)

/* The per-(token, kv head) work, instantiated for the common head sizes so the compiler unrolls
 * the d-loops completely (a runtime d costs ~2x: loop versioning, peeling), and per K/V element
 * type (LOAD widens one element to fp32). KEY(j) is the offset of position j's head row. */
#define KVB_ATTEND(NAME, DIM, KV_T, LOAD)                                                               \
    KVB_CLONES static void NAME(const float *restrict q, const KV_T *restrict k, const KV_T *restrict v,  \
                                float *restrict out, float *restrict scores, const int64_t *table,        \
                                int64_t lo, int64_t n, int64_t g, int64_t dd, int64_t bs, int64_t s_pos,  \
                                int64_t s_blk, float scale, float softcap) {                              \
        const int64_t d = (DIM) ? (DIM) : dd;                                                             \
        for (int64_t j = 0; j < n; j++) {                                                                 \
            const int64_t p = lo + j;                                                                     \
            const KV_T *kj = k + table[p / bs] * s_blk + (p % bs) * s_pos;                                \
            for (int64_t i = 0; i < g; i++) {                                                             \
                const float *qi = q + i * d;                                                              \
                float acc[KVB_MAX_DIM];                                                                   \
                for (int64_t t = 0; t < d; t++) acc[t] = qi[t] * LOAD(kj[t]);                             \
                int64_t w = d;                                                                            \
                while (w > 1 && (w & 1) == 0) { /* pairwise: vectorised without -ffast-math */            \
                    w >>= 1;                                                                              \
                    for (int64_t t = 0; t < w; t++) acc[t] += acc[t + w];                                 \
                }                                                                                         \
                float s = 0.f;                                                                            \
                for (int64_t t = 0; t < w; t++) s += acc[t];                                              \
                s *= scale;                                                                               \
                if (softcap > 0.f) s = softcap * tanhf(s / softcap);                                      \
                scores[i * n + j] = s;                                                                    \
            }                                                                                             \
        }                                                                                                 \
        for (int64_t i = 0; i < g; i++) {                                                                 \
            float m = -FLT_MAX;                                                                           \
            for (int64_t j = 0; j < n; j++) m = scores[i * n + j] > m ? scores[i * n + j] : m;            \
            float sum = 0.f;                                                                              \
            for (int64_t j = 0; j < n; j++) {                                                             \
                float e = expf(scores[i * n + j] - m);                                                    \
                scores[i * n + j] = e;                                                                    \
                sum += e;                                                                                 \
            }                                                                                             \
            float inv = 1.f / sum;                                                                        \
            for (int64_t j = 0; j < n; j++) scores[i * n + j] *= inv;                                     \
        }                                                                                                 \
        for (int64_t i = 0; i < g; i++) {                                                                 \
            float acc[KVB_MAX_DIM];                                                                       \
            for (int64_t t = 0; t < d; t++) acc[t] = 0.f;                                                 \
            for (int64_t j = 0; j < n; j++) {                                                             \
                const int64_t p = lo + j;                                                                 \
                const KV_T *vj = v + table[p / bs] * s_blk + (p % bs) * s_pos;                            \
                const float pr = scores[i * n + j];                                                       \
                for (int64_t t = 0; t < d; t++) acc[t] += pr * LOAD(vj[t]);                               \
            }                                                                                             \
            for (int64_t t = 0; t < d; t++) out[i * d + t] = acc[t];                                      \
        }                                                                                                 \
    }

KVB_ATTEND(attend_64, 64, float, KVB_F32)
KVB_ATTEND(attend_128, 128, float, KVB_F32)
KVB_ATTEND(attend_any, 0, float, KVB_F32)
KVB_ATTEND(attend_bf16_64, 64, uint16_t, KVB_BF16)
KVB_ATTEND(attend_bf16_128, 128, uint16_t, KVB_BF16)
KVB_ATTEND(attend_bf16_any, 0, uint16_t, KVB_BF16)

/* The driver, per K/V element type. Returns 0, or -1 when a shape is outside what this kernel
 * handles (the caller falls back). */
#define KVB_DRIVER(NAME, KV_T, A64, A128, AANY)                                                          \
    int NAME(const float *q, const KV_T *k, const KV_T *v, float *out, const int64_t *seq,               \
             const int64_t *pos, const int64_t *tables, int64_t max_blocks, int64_t t, int64_t h,        \
             int64_t hkv, int64_t d, int64_t bs, int64_t window, float softcap, float scale,             \
             int nthreads) {                                                                             \
        if (hkv <= 0 || h % hkv != 0 || h / hkv > KVB_MAX_GROUP || d > KVB_MAX_DIM || d <= 0 || bs <= 0) \
            return -1;                                                                                   \
        for (int64_t r = 0; r < t; r++)                                                                  \
            if (pos[r] < 0 || pos[r] >= max_blocks * bs) return -1;                                      \
        const int64_t g = h / hkv, s_pos = hkv * d, s_blk = bs * hkv * d;                                \
        const int64_t tasks = t * hkv;                                                                   \
        int failed = 0;                                                                                  \
        _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(| : failed)")    \
        for (int64_t task = 0; task < tasks; task++) {                                                   \
            const int64_t r = task / hkv, kh = task % hkv;                                               \
            const int64_t p = pos[r];                                                                    \
            const int64_t lo = (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;                  \
            const int64_t n = p - lo + 1;                                                                \
            float *scores = (float *)malloc(sizeof(float) * (size_t)(n * g));                            \
            if (!scores) {                                                                               \
                failed |= 1;                                                                             \
                continue;                                                                                \
            }                                                                                            \
            const int64_t *table = tables + seq[r] * max_blocks;                                         \
            const float *qr = q + (r * h + kh * g) * d;                                                  \
            float *o = out + (r * h + kh * g) * d;                                                       \
            const KV_T *kk = k + kh * d, *vv = v + kh * d;                                               \
            if (d == 64)                                                                                 \
                A64(qr, kk, vv, o, scores, table, lo, n, g, d, bs, s_pos, s_blk, scale, softcap);        \
            else if (d == 128)                                                                           \
                A128(qr, kk, vv, o, scores, table, lo, n, g, d, bs, s_pos, s_blk, scale, softcap);       \
            else                                                                                         \
                AANY(qr, kk, vv, o, scores, table, lo, n, g, d, bs, s_pos, s_blk, scale, softcap);       \
            free(scores);                                                                                \
        }                                                                                                \
        return failed ? -1 : 0;                                                                          \
    }

KVB_DRIVER(kvb_paged_attention, float, attend_64, attend_128, attend_any)
KVB_DRIVER(kvb_paged_attention_bf16, uint16_t, attend_bf16_64, attend_bf16_128, attend_bf16_any)
