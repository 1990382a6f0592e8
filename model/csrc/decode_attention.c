/* Attention over the paged KV pool, CPU: decode tokens and prefill chunks in one call. K/V in
 * fp32 or bf16; the query, the scores and the output in fp32.
 *
 * q, out: [T, H, D] contiguous, the step's packed query tokens. Token t belongs to sequence
 * seq[t] and sits at position pos[t]; it attends to that sequence's positions
 * [max(0, pos - window + 1), pos] (window 0: from 0), read through the sequence's block table
 * (tables[seq * max_blocks + i] is the pool block of positions [i * bs, (i + 1) * bs)). The pool
 * is [blocks, bs, Hkv, D]: position j of a block is j * Hkv * D elements from its start. Query
 * heads are grouped (H = g * Hkv). softcap > 0 caps the logits (s = cap * tanh(s / cap)).
 *
 * Query tiling: consecutive tokens of one sequence (a prefill chunk) are cut into tiles of up to
 * KVB_TILE_ROWS (token, head) rows; one task per (tile, kv head) reads each key and value once
 * for all its rows from cache (a decode token is a tile of one token). Scores: each row against
 * eight keys at a time, a score being one dot product over 16 lanes (lane u sums dimensions u,
 * u + 16, ...) whose lanes are added in one fixed tree, the eight trees interleaved by shuffles.
 * Softmax: exp by a polynomial, summed in lanes by position. Values: each row's weighted sum,
 * position by position in increasing order, eight dimensions per register.
 *
 * Exactness: a row's arithmetic is the same code whatever tile it is in (a score never depends
 * on the other keys or rows computed with it, the softmax and the value sums run over the row's
 * own positions), so a token's result never depends on its tile, its chunk or the rest of the
 * call. Written with GCC vector types and no fast-math (contraction to FMA only), so every CPU
 * target gets the same operations in the same order. Tasks are split over OpenMP threads (the
 * process's libgomp: the one torch already loaded). Built and loaded by model/native.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vecmath.h"

/* x86 with GCC: the 8-lane code for AVX2 and baseline CPUs, the same arithmetic in 16-lane
 * registers where there is AVX-512 (chosen at run time; both give the same bits). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVB_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define KVB_WIDE 1
#define KVB_WIDE_TARGET __attribute__((target("arch=x86-64-v4")))
#else
#define KVB_CLONES
#define KVB_WIDE 0
#define KVB_WIDE_TARGET
#endif
#define KVB_INLINE static inline __attribute__((always_inline))

#define KVB_MAX_GROUP 16
#define KVB_MAX_DIM 256
#define KVB_BLOCK 64      /* key positions read once for all rows of a task */
#define KVB_TILE_ROWS 64  /* (token, head) rows of one task */
#define KVB_TILE_TOKENS 64

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

KVB_INLINE v8f ld_f32(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}
/* bf16 is the top half of an fp32: widening is a shift. */
KVB_INLINE v8f ld_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    const v8u w = __builtin_convertvector(h, v8u) << 16;
    v8f f;
    memcpy(&f, &w, sizeof f);
    return f;
}
KVB_INLINE void st_f32(float *p, v8f v) { memcpy(p, &v, sizeof v); }
KVB_INLINE v16f ld16_f32(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
KVB_INLINE v16f ld16_bf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    const v16u w = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &w, sizeof f);
    return f;
}
KVB_INLINE void st16_f32(float *p, v16f v) { memcpy(p, &v, sizeof v); }
KVB_INLINE v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
KVB_INLINE v8f vpick(v8i m, v8f a, v8f b) {
    v8i ai, bi;
    memcpy(&ai, &a, sizeof a);
    memcpy(&bi, &b, sizeof b);
    const v8i r = (ai & m) | (bi & ~m);
    v8f f;
    memcpy(&f, &r, sizeof f);
    return f;
}
KVB_INLINE v8f vmax(v8f a, v8f b) { return vpick(a > b, a, b); }
KVB_INLINE v8f vmin(v8f a, v8f b) { return vpick(a < b, a, b); }

/* e^x for x <= 0 (vecmath.h's polynomial in generic vectors; round to nearest by the 1.5 * 2^23
 * trick). Below -88 it is 0 exactly: 2^-127 has exponent bits 0. */
#define KVB_SET1(x) splat(x)
#define KVB_ROUND(x, mode) (((x) + 12582912.0f) - 12582912.0f)
#define KVB_FMADD(a, b, c) ((a) * (b) + (c))
#define KVB_FNMADD(a, b, c) ((c) - (a) * (b))
KVB_INLINE v8f kvb_exp(v8f x) {
    KVB_EXP_BODY(v8f, KVB_SET1, vmin, vmax, KVB_ROUND, KVB_FNMADD, KVB_FMADD)
    const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8f s;
    memcpy(&s, &e, sizeof s);
    return p * s;
}

static inline int64_t kvb_round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

static inline int64_t kvb_first(int64_t p, int64_t window) {
    return (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
}

static inline float kvb_cap(float x, float softcap) {
    return softcap > 0.f ? softcap * tanhf(x / softcap) : x;
}

/* Eight keys' 16-lane sums (lanes 0-7 in lo, 8-15 in hi) to their eight scores, in key order.
 * Per key the tree is a = l[i] + l[i + 8], b = a[i] + a[i + 4], (b0 + b2) + (b1 + b3); the
 * shuffles only move lanes between keys' trees. */
KVB_INLINE v8f kvb_reduce8(const v8f *lo, const v8f *hi) {
    v8f a[8], b[4];
    for (int i = 0; i < 8; i++) a[i] = lo[i] + hi[i];
    const v8i h0 = {0, 1, 2, 3, 8, 9, 10, 11}, h1 = {4, 5, 6, 7, 12, 13, 14, 15};
    for (int i = 0; i < 4; i++) b[i] = __builtin_shuffle(a[i], a[i + 4], h0) + __builtin_shuffle(a[i], a[i + 4], h1);
    const v8i e0 = {0, 1, 8, 9, 4, 5, 12, 13}, e1 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8f w0 = __builtin_shuffle(b[0], b[1], e0) + __builtin_shuffle(b[0], b[1], e1);
    const v8f w1 = __builtin_shuffle(b[2], b[3], e0) + __builtin_shuffle(b[2], b[3], e1);
    return __builtin_shuffle(w0, w1, (v8i){0, 2, 8, 10, 4, 6, 12, 14}) +
           __builtin_shuffle(w0, w1, (v8i){1, 3, 9, 11, 5, 7, 13, 15});
}

/* One row's scores against eight keys (unscaled). DIM > 0 unrolls the dimension loop. */
#define KVB_SCORE8(NAME, DIM, KV_T, LOAD)                                               \
    KVB_INLINE v8f NAME(const float *q, const KV_T *const *kp, int64_t dd) {            \
        const int64_t d = (DIM) ? (DIM) : dd;                                           \
        v8f lo[8], hi[8];                                                               \
        for (int i = 0; i < 8; i++) lo[i] = hi[i] = (v8f){0};                           \
        int64_t t = 0;                                                                  \
        for (; t + 16 <= d; t += 16) {                                                  \
            const v8f ql = ld_f32(q + t), qh = ld_f32(q + t + 8);                       \
            for (int i = 0; i < 8; i++) {                                               \
                lo[i] += ql * LOAD(kp[i] + t);                                          \
                hi[i] += qh * LOAD(kp[i] + t + 8);                                      \
            }                                                                           \
        }                                                                               \
        if (t < d) { /* d = 16m + 8: dimensions 16m.. go to lanes 0-7 */                \
            const v8f ql = ld_f32(q + t);                                               \
            for (int i = 0; i < 8; i++) lo[i] += ql * LOAD(kp[i] + t);                  \
        }                                                                               \
        return kvb_reduce8(lo, hi);                                                     \
    }

/* The same in 16-lane registers (lanes 0-7 and 8-15 split off for the tail and the tree). */
#define KVB_SCORE8_WIDE(NAME, DIM, KV_T, LOAD, LOAD16)                                  \
    KVB_INLINE v8f NAME(const float *q, const KV_T *const *kp, int64_t dd) {            \
        const int64_t d = (DIM) ? (DIM) : dd;                                           \
        v16f acc[8];                                                                    \
        v8f lo[8], hi[8];                                                               \
        for (int i = 0; i < 8; i++) acc[i] = (v16f){0};                                 \
        int64_t t = 0;                                                                  \
        for (; t + 16 <= d; t += 16) {                                                  \
            const v16f qv = ld16_f32(q + t);                                            \
            for (int i = 0; i < 8; i++) acc[i] += qv * LOAD16(kp[i] + t);               \
        }                                                                               \
        for (int i = 0; i < 8; i++) {                                                   \
            memcpy(&lo[i], &acc[i], sizeof lo[i]);                                      \
            memcpy(&hi[i], (const char *)&acc[i] + sizeof lo[i], sizeof hi[i]);         \
        }                                                                               \
        if (t < d) {                                                                    \
            const v8f ql = ld_f32(q + t);                                               \
            for (int i = 0; i < 8; i++) lo[i] += ql * LOAD(kp[i] + t);                  \
        }                                                                               \
        return kvb_reduce8(lo, hi);                                                     \
    }

/* Rows' o[nv vectors of dims from off] += sum of w[j] * v[j] over n positions, in order, for one
 * row or two (the same positions, each value read once for both; each row's sums the same code).
 * Per vector type V (8 or 16 lanes). */
#define KVB_VSUM(NAME, KV_T, V, LD, ST, LOAD, SPLAT)                                                       \
    KVB_INLINE void NAME(float *acc, const float *w, float *acc2, const float *w2, const KV_T *const *vp,  \
                         int64_t off, int64_t n, int nv) {                                                \
        const int L = sizeof(V) / sizeof(float);                                                          \
        V o[4], o2[4];                                                                                    \
        for (int i = 0; i < nv; i++) o[i] = LD(acc + L * i), o2[i] = acc2 ? LD(acc2 + L * i) : o[i];      \
        if (acc2)                                                                                         \
            for (int64_t j = 0; j < n; j++) {                                                             \
                const V wj = SPLAT(w[j]), wj2 = SPLAT(w2[j]);                                             \
                const KV_T *p = vp[j] + off;                                                              \
                for (int i = 0; i < nv; i++) {                                                            \
                    const V x = LOAD(p + L * i);                                                          \
                    o[i] += wj * x;                                                                       \
                    o2[i] += wj2 * x;                                                                     \
                }                                                                                         \
            }                                                                                             \
        else                                                                                              \
            for (int64_t j = 0; j < n; j++) {                                                             \
                const V wj = SPLAT(w[j]);                                                                 \
                const KV_T *p = vp[j] + off;                                                              \
                for (int i = 0; i < nv; i++) o[i] += wj * LOAD(p + L * i);                                \
            }                                                                                             \
        for (int i = 0; i < nv; i++) {                                                                    \
            ST(acc + L * i, o[i]);                                                                        \
            if (acc2) ST(acc2 + L * i, o2[i]);                                                            \
        }                                                                                                 \
    }
typedef int32_t v16i __attribute__((vector_size(64)));
KVB_INLINE v16f splat16(float x) { return __builtin_shuffle((v16f){x}, (v16i){0}); }
KVB_VSUM(vsum_f32, float, v8f, ld_f32, st_f32, ld_f32, splat)
KVB_VSUM(vsum_bf16, uint16_t, v8f, ld_f32, st_f32, ld_bf16, splat)
KVB_VSUM(vsum16_f32, float, v16f, ld16_f32, st16_f32, ld16_f32, splat16)
KVB_VSUM(vsum16_bf16, uint16_t, v16f, ld16_f32, st16_f32, ld16_bf16, splat16)

/* Rows' weighted sums over all d dimensions: WIDE takes 64, 32, 16 at a time in 16-lane
 * registers, the rest (or all) 32, 16, 8 in 8-lane ones. */
#define KVB_PV(NAME, KV_T, VSUM, VSUM16, WIDE)                                                           \
    KVB_INLINE void NAME(float *o, const float *w, float *o2, const float *w2, const KV_T *const *vr,      \
                         int64_t n, int64_t d) {                                                          \
        int64_t t = 0;                                                                                    \
        if (WIDE) {                                                                                       \
            for (; t + 64 <= d; t += 64) VSUM16(o + t, w, o2 ? o2 + t : NULL, w2, vr, t, n, 4);           \
            if (t + 32 <= d) VSUM16(o + t, w, o2 ? o2 + t : NULL, w2, vr, t, n, 2), t += 32;              \
            if (t + 16 <= d) VSUM16(o + t, w, o2 ? o2 + t : NULL, w2, vr, t, n, 1), t += 16;              \
        }                                                                                                 \
        for (; t + 32 <= d; t += 32) VSUM(o + t, w, o2 ? o2 + t : NULL, w2, vr, t, n, 4);                 \
        if (t + 16 <= d) VSUM(o + t, w, o2 ? o2 + t : NULL, w2, vr, t, n, 2), t += 16;                    \
        if (t + 8 <= d) VSUM(o + t, w, o2 ? o2 + t : NULL, w2, vr, t, n, 1);                              \
    }
KVB_PV(pv_f32, float, vsum_f32, vsum16_f32, 0)
KVB_PV(pv_bf16, uint16_t, vsum_bf16, vsum16_bf16, 0)
KVB_PV(pv16_f32, float, vsum_f32, vsum16_f32, 1)
KVB_PV(pv16_bf16, uint16_t, vsum_bf16, vsum16_bf16, 1)

/* One task: a tile of rows (token, head), token-major, of one kv head; q0/out0 point at its first
 * token's first head of this kv head. Scratch (64-byte aligned floats): acc [rows][dpad], m and
 * l [rows] (running max and sum), w [2][KVB_BLOCK] (two rows' weights in the current block). */
typedef struct {
    const float *q0;
    float *out0, *acc, *m, *l, *w;
    const int64_t *table, *pos;
    int64_t nq, h, g, d, bs, s_pos, s_blk, window, lo, hi, dpad;
    float scale, softcap;
} kvb_tile;

/* Element offsets of positions [a, b] (b - a < KVB_BLOCK) in the pool, through the block table. */
static inline void kvb_offsets(const kvb_tile *T, int64_t a, int64_t b, int64_t *off) {
    int64_t blk = a / T->bs, in = a % T->bs;
    for (int64_t p = a; p <= b; p++) {
        off[p - a] = T->table[blk] * T->s_blk + in * T->s_pos;
        if (++in == T->bs) in = 0, blk++;
    }
}

static inline void kvb_prefetch(const void *base, const int64_t *off, int64_t n, int64_t nbytes) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t b = 0; b < nbytes; b += 64) __builtin_prefetch((const char *)base + off[j] + b, 0, 2);
}

/* Row r's weights for positions [a, b] of the block at c0 (w[p - c0]; lanes of its 8-groups
 * outside [a, b] hold 0): scores, then the online softmax step: the running max moves to the
 * block's, the running sum and the accumulator are rescaled to it. */
KVB_INLINE void kvb_weights(const kvb_tile *T, float *wb, int64_t r, int64_t a, int64_t b, int64_t c0) {
    float *w = wb - c0;
    const int64_t g0 = a & ~(int64_t)7, g1 = (b | 7) + 1;
    const v8i iota = {0, 1, 2, 3, 4, 5, 6, 7};
    v8f mx = splat(-FLT_MAX);
    for (int64_t j = g0; j < g1; j += 8) {
        v8f s = ld_f32(w + j);
        if (T->softcap > 0.f)
            for (int i = 0; i < 8; i++) s[i] = kvb_cap(s[i], T->softcap);
        if (j < a || j + 7 > b) {
            const v8i at = iota + (int32_t)(j - a), bt = iota + (int32_t)(j - b);
            s = vpick((at >= 0) & (bt <= 0), s, splat(-FLT_MAX));
        }
        st_f32(w + j, s);
        mx = vmax(mx, s);
    }
    float top = T->m[r];
    for (int i = 0; i < 8; i++) top = mx[i] > top ? mx[i] : top;
    const float alpha = kvb_exp(splat(T->m[r] - top))[0];
    v8f sum = {0};
    for (int64_t j = g0; j < g1; j += 8) {
        const v8f e = kvb_exp(ld_f32(w + j) - top);
        st_f32(w + j, e);
        sum += e;
    }
    T->m[r] = top;
    T->l[r] = T->l[r] * alpha + (((sum[0] + sum[4]) + (sum[2] + sum[6])) + ((sum[1] + sum[5]) + (sum[3] + sum[7])));
    if (alpha != 1.f) /* x * 1 = x: skipping it changes no bit */
        for (int64_t t = 0; t < T->d; t += 8) {
            float *o = T->acc + r * T->dpad + t;
            st_f32(o, ld_f32(o) * alpha);
        }
}

/* A task: key blocks of KVB_BLOCK positions aligned to multiples of it (so a row meets the same
 * blocks whatever its tile), each read once for all rows (the next one asked for ahead); per row
 * and block: scores eight keys at a time (pointers clamped into the block's valid positions),
 * the softmax step, the weighted sum of values; at the end each row over its sum into out. */
#define KVB_TASK(NAME, SCORE8, PV, KV_T, ATTR)                                                             \
    ATTR static void NAME(const kvb_tile *T, const KV_T *k, const KV_T *v) {                          \
        const int64_t g = T->g, rows = T->nq * g, lo = T->lo, hi = T->hi, d = T->d, hd = T->h * d;         \
        int64_t off[KVB_BLOCK], next[KVB_BLOCK];                                                           \
        const KV_T *kp[8], *vp[KVB_BLOCK];                                                                 \
        for (int64_t r = 0; r < rows; r++) T->m[r] = -FLT_MAX, T->l[r] = 0.f;                              \
        memset(T->acc, 0, sizeof(float) * (size_t)(rows * T->dpad));                                      \
        int64_t c0 = lo & ~(int64_t)(KVB_BLOCK - 1);                                                       \
        kvb_offsets(T, lo, c0 + KVB_BLOCK - 1 < hi ? c0 + KVB_BLOCK - 1 : hi, off + (lo - c0));           \
        for (; c0 <= hi; c0 += KVB_BLOCK) {                                                                \
            const int64_t a0 = c0 > lo ? c0 : lo, b0 = c0 + KVB_BLOCK - 1 < hi ? c0 + KVB_BLOCK - 1 : hi;  \
            const int64_t n1 = c0 + 2 * KVB_BLOCK - 1 < hi ? KVB_BLOCK : hi - c0 - KVB_BLOCK + 1;           \
            if (n1 > 0) {                                                                                  \
                kvb_offsets(T, c0 + KVB_BLOCK, c0 + KVB_BLOCK + n1 - 1, next);                             \
                kvb_prefetch(k, next, n1, d * (int64_t)sizeof(KV_T));                                     \
                kvb_prefetch(v, next, n1, d * (int64_t)sizeof(KV_T));                                     \
            }                                                                                              \
            for (int64_t p = a0; p <= b0; p++) vp[p - c0] = v + off[p - c0];                               \
            for (int64_t r0 = 0; r0 < rows; r0 += 2) {                                                     \
                int64_t ra[2], rb[2];                                                                      \
                for (int64_t r = r0; r < r0 + 2 && r < rows; r++) {                                         \
                    const int64_t pr = T->pos[r / g], lr = kvb_first(pr, T->window);                       \
                    const int64_t a = a0 > lr ? a0 : lr, b = b0 < pr ? b0 : pr;                             \
                    ra[r - r0] = a, rb[r - r0] = b;                                                        \
                    if (a > b) continue;                                                                   \
                    const float *qr = T->q0 + (r / g) * hd + (r % g) * d;                                  \
                    float *wr = T->w + (r - r0) * KVB_BLOCK;                                               \
                    for (int64_t j0 = a & ~(int64_t)7; j0 <= b; j0 += 8) {                                 \
                        for (int i = 0; i < 8; i++) {                                                      \
                            const int64_t p = j0 + i < a0 ? a0 : j0 + i > b0 ? b0 : j0 + i;                 \
                            kp[i] = k + off[p - c0];                                                       \
                        }                                                                                  \
                        st_f32(wr + (j0 - c0), SCORE8(qr, kp, d) * T->scale);                              \
                    }                                                                                      \
                    kvb_weights(T, wr, r, a, b, c0);                                                       \
                }                                                                                          \
                const int pair = r0 + 1 < rows && ra[0] == ra[1] && rb[0] == rb[1];                        \
                for (int64_t r = r0; r < r0 + 2 - pair && r < rows; r++) {                                  \
                    const int64_t a = ra[r - r0], b = rb[r - r0];                                          \
                    if (a > b) continue;                                                                   \
                    float *o = T->acc + r * T->dpad, *o2 = pair ? o + T->dpad : NULL;                      \
                    const float *w = T->w + (r - r0) * KVB_BLOCK + (a - c0), *w2 = w + KVB_BLOCK;          \
                    PV(o, w, o2, w2, vp + (a - c0), b - a + 1, d);                                         \
                }                                                                                          \
            }                                                                                              \
            memcpy(off, next, sizeof off);                                                                 \
        }                                                                                                  \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            float *o = T->out0 + (r / g) * hd + (r % g) * d;                                               \
            const float *acc = T->acc + r * T->dpad, inv = 1.f / T->l[r];                                  \
            for (int64_t t = 0; t < d; t += 8) st_f32(o + t, ld_f32(acc + t) * inv);                       \
        }                                                                                                  \
    }

/* A task per K/V element type and unrolled head size, narrow and (x86) wide. */
#define KVB_TILE(NAME, DIM, KV_T, LOAD, LOAD16, PV, PV16)                         \
    KVB_SCORE8(NAME##_score8, DIM, KV_T, LOAD)                                    \
    KVB_TASK(NAME, NAME##_score8, PV, KV_T, KVB_CLONES)                           \
    KVB_SCORE8_WIDE(NAME##_score8w, DIM, KV_T, LOAD, LOAD16)                      \
    KVB_TASK(NAME##_wide, NAME##_score8w, PV16, KV_T, KVB_WIDE_TARGET)

KVB_TILE(tile_64, 64, float, ld_f32, ld16_f32, pv_f32, pv16_f32)
KVB_TILE(tile_128, 128, float, ld_f32, ld16_f32, pv_f32, pv16_f32)
KVB_TILE(tile_any, 0, float, ld_f32, ld16_f32, pv_f32, pv16_f32)
KVB_TILE(tile_bf16_64, 64, uint16_t, ld_bf16, ld16_bf16, pv_bf16, pv16_bf16)
KVB_TILE(tile_bf16_128, 128, uint16_t, ld_bf16, ld16_bf16, pv_bf16, pv16_bf16)
KVB_TILE(tile_bf16_any, 0, uint16_t, ld_bf16, ld16_bf16, pv_bf16, pv16_bf16)

static int kvb_wide_on = -1;
static int kvb_wide(void) {
#if KVB_WIDE
    if (kvb_wide_on < 0) kvb_wide_on = __builtin_cpu_supports("x86-64-v4") > 0;
    return kvb_wide_on;
#else
    return 0;
#endif
}

/* Turns the 16-lane code off (0) or back on where the CPU has it (1); returns whether it runs.
 * For tests: both must give the same bits. */
int kvb_attention_wide(int on) {
    kvb_wide_on = -1;
    if (kvb_wide() && !on) kvb_wide_on = 0;
    return kvb_wide();
}

/* Cut the tokens into tiles: a tile is consecutive tokens of one sequence at consecutive
 * positions, at most `cap` of them. starts[i] is tile i's first token; returns the count. */
static int64_t kvb_tiles(const int64_t *seq, const int64_t *pos, int64_t t, int64_t cap, int64_t *starts) {
    int64_t n = 0;
    for (int64_t r = 0; r < t; r++) {
        const int64_t s = n ? starts[n - 1] : 0;
        if (!n || seq[r] != seq[s] || pos[r] != pos[r - 1] + 1 || r - s >= cap) starts[n++] = r;
    }
    return n;
}

/* The driver, per K/V element type. Returns 0, or -1 when a shape is outside what this kernel
 * handles (the caller falls back). */
#define KVB_DRIVER(NAME, KV_T, A64, A128, AANY)                                                          \
    int NAME(const float *q, const KV_T *k, const KV_T *v, float *out, const int64_t *seq,               \
             const int64_t *pos, const int64_t *tables, int64_t max_blocks, int64_t t, int64_t h,        \
             int64_t hkv, int64_t d, int64_t bs, int64_t window, float softcap, float scale,             \
             int nthreads) {                                                                             \
        if (hkv <= 0 || h % hkv != 0 || h / hkv > KVB_MAX_GROUP || d > KVB_MAX_DIM || d <= 0 ||        \
            d % 8 != 0 || bs <= 0 || t <= 0)                                                             \
            return -1;                                                                                   \
        for (int64_t r = 0; r < t; r++)                                                                  \
            if (pos[r] < 0 || pos[r] >= max_blocks * bs) return -1;                                      \
        const int64_t g = h / hkv, s_pos = hkv * d, s_blk = bs * hkv * d;                                \
        const int64_t per = KVB_TILE_ROWS / g, cap = per < 1 ? 1 : per > KVB_TILE_TOKENS ? KVB_TILE_TOKENS : per; \
        int64_t *starts = (int64_t *)malloc(sizeof(int64_t) * (size_t)(t + 1));                         \
        if (!starts) return -1;                                                                          \
        const int64_t ntiles = kvb_tiles(seq, pos, t, cap, starts);                                      \
        starts[ntiles] = t;                                                                              \
        const int64_t tasks = ntiles * hkv;                                                              \
        const int wide = kvb_wide();                                                                     \
        int failed = 0;                                                                                  \
        _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(| : failed)")    \
        for (int64_t task = 0; task < tasks; task++) {                                                   \
            const int64_t ti = task / hkv, kh = task % hkv;                                              \
            const int64_t r0 = starts[ti], nq = starts[ti + 1] - r0;                                     \
            const int64_t lo = (window > 0 && pos[r0] - window + 1 > 0) ? pos[r0] - window + 1 : 0;      \
            const int64_t rows = nq * g, dpad = kvb_round16(d);                                          \
            const size_t words = (size_t)(rows * dpad + 2 * kvb_round16(rows) + 2 * KVB_BLOCK);              \
            float *work = (float *)aligned_alloc(64, (words * sizeof(float) + 63) & ~(size_t)63);        \
            if (!work) {                                                                                 \
                failed |= 1;                                                                             \
                continue;                                                                                \
            }                                                                                            \
            float *acc = work + 2 * KVB_BLOCK, *m = acc + rows * dpad, *l = m + kvb_round16(rows);           \
            const kvb_tile T = {q + (r0 * h + kh * g) * d, out + (r0 * h + kh * g) * d, acc, m, l, work, \
                                tables + seq[r0] * max_blocks, pos + r0, nq, h, g, d, bs, s_pos, s_blk,  \
                                window, lo, pos[r0 + nq - 1], dpad, scale, softcap};                     \
            const KV_T *kk = k + kh * d, *vv = v + kh * d;                                               \
            if (d == 64)                                                                                 \
                wide ? A64##_wide(&T, kk, vv) : A64(&T, kk, vv);                                         \
            else if (d == 128)                                                                           \
                wide ? A128##_wide(&T, kk, vv) : A128(&T, kk, vv);                                       \
            else                                                                                         \
                wide ? AANY##_wide(&T, kk, vv) : AANY(&T, kk, vv);                                       \
            free(work);                                                                                  \
        }                                                                                                \
        free(starts);                                                                                    \
        return failed ? -1 : 0;                                                                          \
    }

KVB_DRIVER(kvb_paged_attention, float, tile_64, tile_128, tile_any)
KVB_DRIVER(kvb_paged_attention_bf16, uint16_t, tile_bf16_64, tile_bf16_128, tile_bf16_any)
