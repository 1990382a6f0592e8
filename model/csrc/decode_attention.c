/* Decode attention over the KV slab: one query token per row, CPU; K/V in fp32 or bf16, the query,
 * the scores and the output in fp32.
 *
 * q, out: [B, H, D] contiguous. k, v: views of the slab, [B, Hkv, S, D] with strides
 * (s_row, s_head, s_col, 1) in elements; row b attends to columns [lo[b], S), the live span of
 * its (left-padded) sequence, so padding columns are never read. Query heads are grouped
 * (H = g * Hkv): the g heads that share a KV head are scored in one pass over that head's keys.
 *
 * Each (row, kv head) task streams its keys once and its values once; tasks are split over
 * OpenMP threads (the process's libgomp: the one torch already loaded). Built and loaded by
 * model/kernels.py; nothing here is Python-specific.
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

/* The per-(row, kv head) work, written once and instantiated for the common head sizes so the
 * compiler unrolls the d-loops completely (a runtime d costs ~2x here: loop versioning, peeling),
 * and per K/V element type (LOAD widens one element to fp32). */
#define KVB_ATTEND(NAME, DIM, KV_T, LOAD)                                                               \
    KVB_CLONES static void NAME(const float *restrict q, const KV_T *restrict k, const KV_T *restrict v,  \
                                float *restrict out, float *restrict scores, int64_t n, int64_t g,        \
                                int64_t dd, int64_t s_col, float scale) {                                 \
        const int64_t d = (DIM) ? (DIM) : dd;                                                             \
        for (int64_t j = 0; j < n; j++) {                                                                 \
            const KV_T *kj = k + j * s_col;                                                               \
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
                scores[i * n + j] = s * scale;                                                            \
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
                const KV_T *vj = v + j * s_col;                                                           \
                const float p = scores[i * n + j];                                                        \
                for (int64_t t = 0; t < d; t++) acc[t] += p * LOAD(vj[t]);                                \
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
    int NAME(const float *q, const KV_T *k, const KV_T *v, float *out, const int64_t *lo, int64_t b,     \
             int64_t h, int64_t hkv, int64_t d, int64_t s, int64_t s_row, int64_t s_head, int64_t s_col, \
             float scale, int nthreads) {                                                                \
        if (hkv <= 0 || h % hkv != 0 || h / hkv > KVB_MAX_GROUP || d > KVB_MAX_DIM || d <= 0) return -1; \
        for (int64_t r = 0; r < b; r++)                                                                  \
            if (lo[r] < 0 || lo[r] >= s) return -1;                                                      \
        const int64_t g = h / hkv;                                                                       \
        const int64_t tasks = b * hkv;                                                                   \
        int failed = 0;                                                                                  \
        _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(| : failed)")    \
        for (int64_t t = 0; t < tasks; t++) {                                                            \
            const int64_t r = t / hkv, kh = t % hkv;                                                     \
            const int64_t n = s - lo[r];                                                                 \
            float *scores = (float *)malloc(sizeof(float) * (size_t)(n * g));                            \
            if (!scores) {                                                                               \
                failed |= 1;                                                                             \
                continue;                                                                                \
            }                                                                                            \
            const int64_t base = r * s_row + kh * s_head + lo[r] * s_col;                                \
            if (d == 64)                                                                                 \
                A64(q + (r * h + kh * g) * d, k + base, v + base, out + (r * h + kh * g) * d, scores, n, \
                    g, d, s_col, scale);                                                                 \
            else if (d == 128)                                                                           \
                A128(q + (r * h + kh * g) * d, k + base, v + base, out + (r * h + kh * g) * d, scores,   \
                     n, g, d, s_col, scale);                                                             \
            else                                                                                         \
                AANY(q + (r * h + kh * g) * d, k + base, v + base, out + (r * h + kh * g) * d, scores,   \
                     n, g, d, s_col, scale);                                                             \
            free(scores);                                                                                \
        }                                                                                                \
        return failed ? -1 : 0;                                                                          \
    }

KVB_DRIVER(kvb_decode_attention, float, attend_64, attend_128, attend_any)
KVB_DRIVER(kvb_decode_attention_bf16, uint16_t, attend_bf16_64, attend_bf16_128, attend_bf16_any)
