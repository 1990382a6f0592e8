/* Attention over the paged KV pool, CPU: decode tokens and prefill chunks in one call. K/V in
 * fp32 or bf16; the query, the scores and the output in fp32.
 *
 * q, out: [T, H, D] contiguous, the step's packed query tokens. Token t belongs to sequence
 * seq[t] and sits at position pos[t]; it attends to that sequence's positions
 * [max(0, pos - window + 1), pos] (window 0: from 0), read through the sequence's block table
 * (tables[seq * max_blocks + i] is the pool block of positions [i * bs, (i + 1) * bs)). The values
 * are [blocks, bs, Hkv, D]; the keys [blocks, Hkv, D, bs] (bs a multiple of 16): a block's keys
 * side by side per dimension, the operand the scores take (laid out so when written, not
 * transposed here for every row that reads them). Query heads are grouped (H = g * Hkv).
 * softcap > 0 caps the logits (s = cap * tanh(s / cap)).
 *
 * Query tiling: consecutive tokens of one sequence (a prefill chunk) are cut into tiles of up to
 * KVB_TILE_ROWS (token, head) rows; one task per (tile, kv head) walks the keys in blocks of
 * KVB_BLOCK positions, each read once for all its rows (a decode token is a tile of one token).
 * Per block: the keys widened to fp32, every row's scores as a small GEMM (one FMA chain per score
 * over the dimensions), the online softmax step per row (exp by a polynomial), the weighted sums
 * of values (one FMA chain per output over the positions, in order). Rows run the whole block,
 * lanes outside a row's own positions masked (score) or weighted 0 (values).
 *
 * Exactness: a row's arithmetic is the same code whatever tile it is in (a score never depends
 * on the other keys or rows computed with it; blocks are aligned to absolute positions, so a row
 * meets the same blocks in any tile; a weight 0 adds nothing), so a token's result never depends
 * on its tile, its chunk or the rest of the call. Written with GCC vector types and no fast-math
 * (contraction to FMA only), so every CPU target gets the same operations in the same order.
 * Tasks are split over OpenMP threads (the process's libgomp: the one torch already loaded).
 * Built and loaded by model/native.py.
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
#define KVB_TILE_ROWS 128 /* (token, head) rows of one task at most */
#define KVB_TILE_TOKENS 128
#define KVB_AHEAD 16   /* dimensions of keys asked for ahead of use */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

/* Loads and stores per vector width (bf16 is the top half of an fp32: widening is a shift). */
#define KVB_LOADS(F, U, H, LD, LDB, ST)                                \
    KVB_INLINE F LD(const float *p) {                                  \
        F v;                                                           \
        memcpy(&v, p, sizeof v);                                       \
        return v;                                                      \
    }                                                                  \
    KVB_INLINE F LDB(const uint16_t *p) {                              \
        H h;                                                           \
        memcpy(&h, p, sizeof h);                                       \
        const U w = __builtin_convertvector(h, U) << 16;               \
        F f;                                                           \
        memcpy(&f, &w, sizeof f);                                      \
        return f;                                                      \
    }                                                                  \
    KVB_INLINE void ST(float *p, F v) { memcpy(p, &v, sizeof v); }
KVB_LOADS(v8f, v8u, v8h, ld_f32, ld_bf16, st_f32)
KVB_LOADS(v16f, v16u, v16h, ld16_f32, ld16_bf16, st16_f32)
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

/* One task: a tile of rows (token, head), token-major, of one kv head; q0/out0 point at its first
 * token's first head of this kv head. Scratch (64-byte aligned floats): kt [d][KVB_BLOCK] (the
 * block's keys by dimension, fp32), w [rows][KVB_BLOCK] (scores, then weights), acc [rows][dpad], m
 * and l [rows] (running max and sum). */
typedef struct {
    const float *q0;
    float *out0, *kt, *w, *acc, *m, *l;
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

/* Lanes [la, lb) (multiples of 16) of the block at position c0 into kt [d][KVB_BLOCK], fp32, from
 * the pool's keys (k: this head's part; 16 lanes are consecutive positions of one pool block,
 * bs being a multiple of 16). Lanes outside a row's positions hold whatever the pool has there:
 * their scores are masked. */
#define KVB_KEYS(NAME, KV_T, LOAD)                                                                \
    KVB_INLINE void NAME(const kvb_tile *T, const KV_T *k, int64_t c0, int64_t la, int64_t lb) {  \
        const KV_T *src[KVB_BLOCK / 16];                                                          \
        const int64_t bs = T->bs, d = T->d;                                                       \
        for (int64_t j0 = la; j0 < lb; j0 += 16)                                                  \
            src[j0 / 16] = k + T->table[(c0 + j0) / bs] * T->s_blk + (c0 + j0) % bs;             \
        for (int64_t t = 0; t < d; t++)                                                           \
            for (int64_t j0 = la; j0 < lb; j0 += 16) {                                            \
                float *dst = T->kt + t * KVB_BLOCK + j0;                                          \
                __builtin_prefetch(src[j0 / 16] + (t + KVB_AHEAD) * bs);                          \
                st_f32(dst, LOAD(src[j0 / 16] + t * bs));                                         \
                st_f32(dst + 8, LOAD(src[j0 / 16] + t * bs + 8));                                 \
            }                                                                                     \
    }
KVB_KEYS(kvb_keys_f32, float, ld_f32)
KVB_KEYS(kvb_keys_bf16, uint16_t, ld_bf16)

/* Scores of R rows (from r0) against the keys in lanes [la, la + NV * L): each score one FMA
 * chain over the dimensions in order, whatever R, NV and the vector type V. */
#define KVB_QK(NAME, V, LD, ST, SPLAT, R, NV)                                                     \
    KVB_INLINE void NAME(const kvb_tile *T, int64_t r0, int64_t la) {                             \
        enum { L = sizeof(V) / sizeof(float) };                                                   \
        const float *q[R];                                                                        \
        for (int r = 0; r < R; r++)                                                               \
            q[r] = T->q0 + ((r0 + r) / T->g) * T->h * T->d + ((r0 + r) % T->g) * T->d;            \
        V acc[R][NV];                                                                             \
        for (int r = 0; r < R; r++)                                                               \
            for (int i = 0; i < NV; i++) acc[r][i] = (V){0};                                      \
        for (int64_t t = 0; t < T->d; t++) {                                                      \
            V kt[NV];                                                                             \
            for (int i = 0; i < NV; i++) kt[i] = LD(T->kt + t * KVB_BLOCK + la + i * L);          \
            for (int r = 0; r < R; r++) {                                                         \
                const V qb = SPLAT(q[r][t]);                                                      \
                for (int i = 0; i < NV; i++) acc[r][i] += qb * kt[i];                             \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < R; r++)                                                               \
            for (int i = 0; i < NV; i++) ST(T->w + (r0 + r) * KVB_BLOCK + la + i * L, acc[r][i] * T->scale); \
    }

/* Row r's scores in lanes [la, lb) of the block at c0 (lanes of positions [a, b] kept, the others
 * masked) to weights e^(s - max) by the online softmax step: the running max moves to the
 * block's, the running sum and the accumulator are rescaled to it. A row with no position in the
 * block gets weights 0 and keeps its state. */
KVB_INLINE void kvb_weights(const kvb_tile *T, int64_t r, int64_t a, int64_t b, int64_t c0, int64_t la, int64_t lb) {
    float *w = T->w + r * KVB_BLOCK;
    if (a > b) {
        memset(w + la, 0, sizeof(float) * (size_t)(lb - la));
        return;
    }
    const v8i iota = {0, 1, 2, 3, 4, 5, 6, 7};
    v8f mx = splat(-FLT_MAX);
    for (int64_t j = la; j < lb; j += 8) {
        v8f s = ld_f32(w + j);
        if (T->softcap > 0.f)
            for (int i = 0; i < 8; i++) s[i] = kvb_cap(s[i], T->softcap);
        const v8i at = iota + (int32_t)(c0 + j - a), bt = iota + (int32_t)(c0 + j - b);
        s = vpick((at >= 0) & (bt <= 0), s, splat(-FLT_MAX));
        st_f32(w + j, s);
        mx = vmax(mx, s);
    }
    float top = T->m[r];
    for (int i = 0; i < 8; i++) top = mx[i] > top ? mx[i] : top;
    const float alpha = kvb_exp(splat(T->m[r] - top))[0];
    v8f sum = {0};
    for (int64_t j = la; j < lb; j += 8) {
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

/* R rows' (from r0) o[NV vectors of dims from t0] += w[p] * v[p] over the block's positions
 * [ja, jb], in order (a weight 0 adds nothing: o is never -0); vp[j] + voff is lane j's values. */
#define KVB_PV(NAME, KV_T, V, LD, ST, LOAD, SPLAT, R, NV)                                        \
    KVB_INLINE void NAME(const kvb_tile *T, int64_t r0, const KV_T *const *vp, int64_t ja, int64_t jb, int64_t t0, \
                         int64_t voff) {                                                          \
        enum { L = sizeof(V) / sizeof(float) };                                                   \
        V o[R][NV];                                                                               \
        for (int r = 0; r < R; r++)                                                               \
            for (int i = 0; i < NV; i++) o[r][i] = LD(T->acc + (r0 + r) * T->dpad + t0 + i * L);  \
        for (int64_t j = ja; j <= jb; j++) {                                                      \
            const KV_T *p = vp[j] + voff + t0;                                                    \
            V x[NV];                                                                              \
            for (int i = 0; i < NV; i++) x[i] = LOAD(p + i * L);                                  \
            for (int r = 0; r < R; r++) {                                                         \
                const V wb = SPLAT(T->w[(r0 + r) * KVB_BLOCK + j]);                               \
                for (int i = 0; i < NV; i++) o[r][i] += wb * x[i];                                \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < R; r++)                                                               \
            for (int i = 0; i < NV; i++) ST(T->acc + (r0 + r) * T->dpad + t0 + i * L, o[r][i]);   \
    }

KVB_INLINE v16f splat16(float x) { /* a broadcast: GCC builds the 16-element initialiser lane by lane */
#ifdef __clang__
    return (v16f){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
    typedef int32_t v16i __attribute__((vector_size(64)));
    return __builtin_shuffle((v16f){x}, (v16i){0});
#endif
}
/* Scores: 16 lanes four rows at a time (16 accumulators) or one; 8 lanes one row. Per lane range
 * of 16 to 64 lanes. */
#define KVB_QKS(SUF, V, LD, ST, SPLAT, R, N1, N2, N3, N4)                                         \
    KVB_QK(qk_##SUF##_1, V, LD, ST, SPLAT, R, N1)                                                 \
    KVB_QK(qk_##SUF##_2, V, LD, ST, SPLAT, R, N2)                                                 \
    KVB_QK(qk_##SUF##_3, V, LD, ST, SPLAT, R, N3)                                                 \
    KVB_QK(qk_##SUF##_4, V, LD, ST, SPLAT, R, N4)                                                 \
    KVB_INLINE void qk_##SUF(const kvb_tile *T, int64_t r0, int64_t la, int64_t lb) {             \
        switch ((lb - la) / 16) {                                                                 \
            case 1: qk_##SUF##_1(T, r0, la); break;                                               \
            case 2: qk_##SUF##_2(T, r0, la); break;                                               \
            case 3: qk_##SUF##_3(T, r0, la); break;                                               \
            default: qk_##SUF##_4(T, r0, la);                                                     \
        }                                                                                         \
    }
KVB_QKS(8x1, v8f, ld_f32, st_f32, splat, 1, 2, 4, 6, 8)
KVB_QKS(16x1, v16f, ld16_f32, st16_f32, splat16, 1, 1, 2, 3, 4)
KVB_QKS(16x4, v16f, ld16_f32, st16_f32, splat16, 4, 1, 2, 3, 4)
/* Values: 16 lanes four rows over 64 dimensions (16 accumulators), 8 lanes two over 32. */
#define KVB_PVS(KV_T, SUF, LOAD, LOAD16)                                                         \
    KVB_PV(pv8_1x1_##SUF, KV_T, v8f, ld_f32, st_f32, LOAD, splat, 1, 1)                           \
    KVB_PV(pv8_1x4_##SUF, KV_T, v8f, ld_f32, st_f32, LOAD, splat, 1, 4)                           \
    KVB_PV(pv8_2x4_##SUF, KV_T, v8f, ld_f32, st_f32, LOAD, splat, 2, 4)                           \
    KVB_PV(pv16_1x1_##SUF, KV_T, v16f, ld16_f32, st16_f32, LOAD16, splat16, 1, 1)                 \
    KVB_PV(pv16_1x4_##SUF, KV_T, v16f, ld16_f32, st16_f32, LOAD16, splat16, 1, 4)                 \
    KVB_PV(pv16_4x4_##SUF, KV_T, v16f, ld16_f32, st16_f32, LOAD16, splat16, 4, 4)                 \
    /* Row r's sums over dimensions [t, d) one or two vectors at a time. */                     \
    KVB_INLINE void pv_tail_##SUF(const kvb_tile *T, int64_t r, const KV_T *const *vp, int64_t ja,  \
                                  int64_t jb, int64_t t, int wide, int64_t vo) {                  \
        if (wide)                                                                                 \
            for (; t + 16 <= T->d; t += 16) pv16_1x1_##SUF(T, r, vp, ja, jb, t, vo);              \
        for (; t + 8 <= T->d; t += 8) pv8_1x1_##SUF(T, r, vp, ja, jb, t, vo);                     \
    }                                                                                             \
    /* Rows [r0, r1)'s sums over all d dimensions (d a multiple of 8), four / two rows at a time \
     * where there are that many. */                                                            \
    KVB_INLINE void pv_rows_##SUF(const kvb_tile *T, int64_t r0, int64_t r1, const KV_T *const *vp, \
                                  int64_t ja, int64_t jb, int wide, int64_t vo) {                 \
        const int64_t d = T->d, dw = wide ? d & ~(int64_t)63 : d & ~(int64_t)31, step = wide ? 4 : 2; \
        int64_t r = r0;                                                                           \
        for (; r + step <= r1; r += step) {                                                       \
            for (int64_t t = 0; t < dw; t += wide ? 64 : 32)                                      \
                wide ? pv16_4x4_##SUF(T, r, vp, ja, jb, t, vo) : pv8_2x4_##SUF(T, r, vp, ja, jb, t, vo);  \
            for (int64_t i = r; i < r + step && dw < d; i++) pv_tail_##SUF(T, i, vp, ja, jb, dw, wide, vo); \
        }                                                                                         \
        for (; r < r1; r++) {                                                                     \
            for (int64_t t = 0; t < dw; t += wide ? 64 : 32)                                      \
                wide ? pv16_1x4_##SUF(T, r, vp, ja, jb, t, vo) : pv8_1x4_##SUF(T, r, vp, ja, jb, t, vo);  \
            pv_tail_##SUF(T, r, vp, ja, jb, dw, wide, vo);                                        \
        }                                                                                         \
    }
KVB_PVS(float, f32, ld_f32, ld16_f32)
KVB_PVS(uint16_t, bf16, ld_bf16, ld16_bf16)

/* A task: the tiles TT[0..nh) of nh consecutive kv heads (the same rows and positions; k and v
 * point at the first head's keys of a pool block and values of a pool row; head i's are i * d * bs
 * and i * d on). Key blocks of KVB_BLOCK positions aligned to multiples of it (so a row meets the
 * same blocks whatever its tile), each read once for all rows and heads, in order (the keys
 * KVB_AHEAD dimensions ahead and a task's next values asked for ahead: the hardware prefetchers
 * alone left a decode row waiting on memory): the block's keys widened; per head and group of four rows (two on 8 lanes), over the positions any of
 * them has in the block (rows are token-major: the group's first row starts earliest, its last
 * ends latest): scores, the softmax step; then the weighted sums of values, eight positions at a
 * time across the heads. At the end each row over its sum into out. WIDE: 16 lanes. */
#define KVB_TASK(NAME, KV_T, SUF, WIDE, ATTR)                                                             \
    ATTR static void NAME(const kvb_tile *TT, int64_t nh, const KV_T *k, const KV_T *v) {                 \
        const kvb_tile *T = TT;                                                                           \
        const int64_t g = T->g, rows = T->nq * g, lo = T->lo, hi = T->hi, d = T->d, hd = T->h * d;        \
        const int64_t step = WIDE ? 4 : 2, groups = (rows + step - 1) / step;                             \
        const int64_t chunk = nh > 1 ? 8 : KVB_BLOCK;                                                     \
        int64_t off[KVB_BLOCK], ga[KVB_TILE_ROWS], gb[KVB_TILE_ROWS];                                     \
        const KV_T *vp[KVB_BLOCK];                                                                        \
        for (int64_t i = 0; i < nh; i++) {                                                                \
            for (int64_t r = 0; r < rows; r++) TT[i].m[r] = -FLT_MAX, TT[i].l[r] = 0.f;                   \
            memset(TT[i].acc, 0, sizeof(float) * (size_t)(rows * T->dpad));                              \
        }                                                                                                 \
        for (int64_t c0 = lo & ~(int64_t)(KVB_BLOCK - 1); c0 <= hi; c0 += KVB_BLOCK) {                    \
            const int64_t a0 = c0 > lo ? c0 : lo, b0 = c0 + KVB_BLOCK - 1 < hi ? c0 + KVB_BLOCK - 1 : hi; \
            const int64_t ja = a0 - c0, jb = b0 - c0;                                                     \
            kvb_offsets(T, a0, b0, off);                                                                  \
            for (int64_t j = ja; j <= jb; j++) vp[j] = v + off[j - ja];                                   \
            for (int64_t i = 0; i < nh; i++) kvb_keys_##SUF(TT + i, k + i * d * T->bs, c0, ja & ~(int64_t)15, (jb | 15) + 1); \
            for (int64_t G = 0; G < groups; G++) { /* no row of a group with ga > gb has a position here */ \
                const int64_t r0 = G * step, r1 = r0 + step < rows ? r0 + step : rows;                    \
                const int64_t first = kvb_first(T->pos[r0 / g], T->window) - c0, last = T->pos[(r1 - 1) / g] - c0; \
                ga[G] = first > ja ? first : ja, gb[G] = last < jb ? last : jb;                           \
            }                                                                                             \
            for (int64_t i = 0; i < nh; i++)                                                              \
                for (int64_t G = 0; G < groups; G++) {                                                    \
                    const int64_t r0 = G * step, r1 = r0 + step < rows ? r0 + step : rows;                \
                    if (ga[G] > gb[G]) continue;                                                          \
                    const int64_t la = ga[G] & ~(int64_t)15, lb = (gb[G] | 15) + 1;                       \
                    if (WIDE && r1 - r0 == 4)                                                             \
                        qk_16x4(TT + i, r0, la, lb);                                                      \
                    else                                                                                  \
                        for (int64_t r = r0; r < r1; r++) WIDE ? qk_16x1(TT + i, r, la, lb) : qk_8x1(TT + i, r, la, lb); \
                    for (int64_t r = r0; r < r1; r++) {                                                   \
                        const int64_t pr = T->pos[r / g], lr = kvb_first(pr, T->window);                  \
                        kvb_weights(TT + i, r, a0 > lr ? a0 : lr, b0 < pr ? b0 : pr, c0, la, lb);         \
                    }                                                                                     \
                }                                                                                         \
            for (int64_t c = ja; c <= jb; c += chunk)                                                     \
                for (int64_t i = 0; i < nh; i++)                                                          \
                    for (int64_t G = 0; G < groups; G++) {                                                \
                        const int64_t r0 = G * step, r1 = r0 + step < rows ? r0 + step : rows;            \
                        const int64_t e = c + chunk - 1 < gb[G] ? c + chunk - 1 : gb[G];                  \
                        if (nh > 1)                                                                       \
                            for (int64_t j = c + chunk; j < c + 2 * chunk && j <= jb; j++)                \
                                for (int64_t x = 0; x < d * (int64_t)sizeof(KV_T); x += 64)               \
                                    __builtin_prefetch((const char *)(vp[j] + i * d) + x);                \
                        if (ga[G] <= e && c <= gb[G])                                                     \
                            pv_rows_##SUF(TT + i, r0, r1, vp, ga[G] > c ? ga[G] : c, e, WIDE, i * d);     \
                    }                                                                                     \
        }                                                                                                 \
        for (int64_t i = 0; i < nh; i++)                                                                  \
            for (int64_t r = 0; r < rows; r++) {                                                          \
                float *o = TT[i].out0 + (r / g) * hd + (r % g) * d;                                       \
                const float *acc = TT[i].acc + r * T->dpad, inv = 1.f / TT[i].l[r];                       \
                for (int64_t t = 0; t < d; t += 8) st_f32(o + t, ld_f32(acc + t) * inv);                  \
            }                                                                                             \
    }

KVB_TASK(task_f32, float, f32, 0, KVB_CLONES)
KVB_TASK(task_f32_wide, float, f32, 1, KVB_WIDE_TARGET)
KVB_TASK(task_bf16, uint16_t, bf16, 0, KVB_CLONES)
KVB_TASK(task_bf16_wide, uint16_t, bf16, 1, KVB_WIDE_TARGET)

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
#define KVB_DRIVER(NAME, KV_T, NARROW, WIDE)                                                          \
    int NAME(const float *q, const KV_T *k, const KV_T *v, float *out, const int64_t *seq,               \
             const int64_t *pos, const int64_t *tables, int64_t max_blocks, int64_t t, int64_t h,        \
             int64_t hkv, int64_t d, int64_t bs, int64_t window, float softcap, float scale,             \
             int nthreads) {                                                                             \
        if (hkv <= 0 || h % hkv != 0 || h / hkv > KVB_MAX_GROUP || d > KVB_MAX_DIM || d <= 0 ||        \
            d % 8 != 0 || bs <= 0 || bs % 16 != 0 || t <= 0)                                                             \
            return -1;                                                                                   \
        for (int64_t r = 0; r < t; r++)                                                                  \
            if (pos[r] < 0 || pos[r] >= max_blocks * bs) return -1;                                      \
        const int64_t g = h / hkv, s_pos = hkv * d, s_blk = bs * hkv * d;                                \
        const int64_t per = KVB_TILE_ROWS / g;                                                           \
        int64_t cap = per < 1 ? 1 : per > KVB_TILE_TOKENS ? KVB_TILE_TOKENS : per;                       \
        int64_t *starts = (int64_t *)malloc(sizeof(int64_t) * (size_t)(t + 1));                         \
        if (!starts) return -1;                                                                          \
        int64_t ntiles = kvb_tiles(seq, pos, t, cap, starts);                                            \
        while (ntiles * hkv < 4 * (int64_t)nthreads && cap >= 32) /* smaller tiles: work for every thread */ \
            ntiles = kvb_tiles(seq, pos, t, cap /= 2, starts);                                           \
        starts[ntiles] = t;                                                                              \
        /* A decode token's task covers all its kv heads (whole pool rows read in order) where there \
         * are enough of them for every thread; other tiles get a task per kv head. */             \
        int64_t decode = 0;                                                                              \
        for (int64_t i = 0; i < ntiles; i++) decode += starts[i + 1] - starts[i] == 1;                   \
        const int heads_tasks = decode >= 2 * (int64_t)nthreads;                                         \
        int64_t *task_tile = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * ntiles * hkv)), tasks = 0; \
        if (!task_tile) {                                                                                \
            free(starts);                                                                                \
            return -1;                                                                                   \
        }                                                                                                \
        for (int64_t i = 0; i < ntiles; i++)                                                             \
            for (int64_t kh = 0; kh < hkv; kh++) {                                                       \
                const int whole = heads_tasks && starts[i + 1] - starts[i] == 1;                         \
                if (whole && kh > 0) break;                                                              \
                task_tile[2 * tasks] = i, task_tile[2 * tasks + 1] = kh + (whole ? hkv << 32 : (int64_t)1 << 32); \
                tasks++;                                                                                 \
            }                                                                                            \
        const int wide = kvb_wide();                                                                     \
        int failed = 0;                                                                                  \
        _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(| : failed)")    \
        for (int64_t task = 0; task < tasks; task++) {                                                   \
            const int64_t ti = task_tile[2 * task], kh = task_tile[2 * task + 1] & 0xffffffff;           \
            const int64_t nh = task_tile[2 * task + 1] >> 32;                                            \
            const int64_t r0 = starts[ti], nq = starts[ti + 1] - r0;                                     \
            const int64_t lo = (window > 0 && pos[r0] - window + 1 > 0) ? pos[r0] - window + 1 : 0;      \
            const int64_t rows = nq * g, dpad = kvb_round16(d);                                          \
            const int64_t per_head = dpad * KVB_BLOCK + rows * KVB_BLOCK + rows * dpad + 2 * kvb_round16(rows); \
            float *work = (float *)aligned_alloc(64, ((size_t)(nh * per_head) * sizeof(float) + 63) & ~(size_t)63); \
            if (!work) {                                                                                 \
                failed |= 1;                                                                             \
                continue;                                                                                \
            }                                                                                            \
            kvb_tile TT[nh];                                                                             \
            for (int64_t i = 0; i < nh; i++) {                                                           \
                float *kt = work + i * per_head, *w = kt + dpad * KVB_BLOCK, *acc = w + rows * KVB_BLOCK; \
                float *m = acc + rows * dpad;                                                            \
                const kvb_tile Ti = {q + (r0 * h + (kh + i) * g) * d, out + (r0 * h + (kh + i) * g) * d, kt, w, acc, \
                                     m, m + kvb_round16(rows), tables + seq[r0] * max_blocks, pos + r0, nq, h, g, d, \
                                     bs, s_pos, s_blk, window, lo, pos[r0 + nq - 1], dpad, scale, softcap};   \
                TT[i] = Ti;                                                                              \
            }                                                                                            \
            const KV_T *kk = k + kh * d * bs, *vv = v + kh * d;                                               \
            wide ? WIDE(TT, nh, kk, vv) : NARROW(TT, nh, kk, vv);                                        \
            free(work);                                                                                  \
        }                                                                                                \
        free(task_tile);                                                                                 \
        free(starts);                                                                                    \
        return failed ? -1 : 0;                                                                          \
    }

KVB_DRIVER(kvb_paged_attention, float, task_f32, task_f32_wide)
KVB_DRIVER(kvb_paged_attention_bf16, uint16_t, task_bf16, task_bf16_wide)
