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
 * KVB_TILE_ROWS (token, head) rows; one task per (tile, kv head) loads each key and value once
 * for all its rows (a decode token is a tile of one token). Keys are scored 8 at a time from a
 * transposed copy (8 lanes of one multiply-add chain each, no horizontal sums). Exactness: a
 * row's arithmetic is the same code whatever tile it is in: its scores come lane by lane from
 * key groups aligned to absolute positions (multiples of 8), its softmax runs over its own
 * aligned buffer, its values are summed position by position in increasing order. So a token's
 * result never depends on its tile, its chunk or the rest of the call. Tasks are split over
 * OpenMP threads (the process's libgomp: the one torch already loaded). Built and loaded by
 * model/kernels.py.
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
#define KVB_LANES 8      /* keys scored together */
#define KVB_VCHUNK 64    /* values widened together */
#define KVB_TILE_ROWS 32 /* (token, head) rows of one task: 16 tokens at g = 2, 32 at g = 1 */
#define KVB_TILE_TOKENS 16

/* bf16 is the top half of an fp32: widening is a shift (vectorised as such). */
static inline float kvb_bf16(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#define KVB_F32(x) (x)
#define KVB_BF16(x) kvb_bf16(x)

static inline int64_t kvb_round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* One tile's work, instantiated for the common head sizes so the compiler unrolls the d-loops
 * completely (a runtime d costs ~2x), and per K/V element type (LOAD widens one element to fp32).
 * q0/out0 point at the tile's first token's first head of this kv head; rows are (token, head),
 * token-major. work: scratch of kvb_scratch(...) floats, 64-byte aligned. */
#define KVB_TILE(NAME, DIM, KV_T, LOAD)                                                                  \
    KVB_CLONES static void NAME(const float *restrict q0, const KV_T *restrict k, const KV_T *restrict v,  \
                                float *restrict out0, float *restrict work, const int64_t *table,          \
                                const int64_t *pos, int64_t nq, int64_t h, int64_t g, int64_t dd,          \
                                int64_t bs, int64_t s_pos, int64_t s_blk, int64_t window, float scale,     \
                                float softcap) {                                                           \
        const int64_t d = (DIM) ? (DIM) : dd, rows = nq * g;                                               \
        const int64_t hi = pos[nq - 1];                                                                    \
        const int64_t lo = (window > 0 && pos[0] - window + 1 > 0) ? pos[0] - window + 1 : 0;              \
        const int64_t stride = kvb_round16(hi - lo + 1);                                                   \
        float *sc = work;                          /* [rows][stride]: row r's scores from its lo */       \
        float *acc = sc + rows * stride;           /* [rows][d] */                                        \
        float *kt = acc + rows * kvb_round16(d);   /* [d][8] */                                           \
        float *vb = kt + d * KVB_LANES;            /* [KVB_VCHUNK][d] */                                  \
        for (int64_t j0 = lo & ~(int64_t)(KVB_LANES - 1); j0 <= hi; j0 += KVB_LANES) {                     \
            for (int64_t l = 0; l < KVB_LANES; l++) {                                                     \
                const int64_t p = j0 + l;                                                                 \
                if (p < lo || p > hi) {                                                                   \
                    for (int64_t t = 0; t < d; t++) kt[t * KVB_LANES + l] = 0.f;                          \
                    continue;                                                                             \
                }                                                                                         \
                const KV_T *kp = k + table[p / bs] * s_blk + (p % bs) * s_pos;                            \
                for (int64_t t = 0; t < d; t++) kt[t * KVB_LANES + l] = LOAD(kp[t]);                      \
            }                                                                                             \
            for (int64_t r = 0; r < rows; r++) {                                                          \
                const int64_t qi = r / g, pr = pos[qi];                                                   \
                const int64_t lr = (window > 0 && pr - window + 1 > 0) ? pr - window + 1 : 0;             \
                if (pr < j0 || lr > j0 + KVB_LANES - 1) continue;                                         \
                const float *qr = q0 + qi * h * d + (r % g) * d;                                          \
                float a[4][KVB_LANES] = {{0.f}};                                                          \
                for (int64_t t = 0; t < d; t += 4)                                                        \
                    for (int c = 0; c < 4; c++)                                                           \
                        for (int l = 0; l < KVB_LANES; l++) a[c][l] += qr[t + c] * kt[(t + c) * KVB_LANES + l]; \
                for (int l = 0; l < KVB_LANES; l++) {                                                     \
                    const int64_t p = j0 + l;                                                             \
                    if (p < lr || p > pr) continue;                                                       \
                    float s = ((a[0][l] + a[1][l]) + (a[2][l] + a[3][l])) * scale;                        \
                    if (softcap > 0.f) s = softcap * tanhf(s / softcap);                                  \
                    sc[r * stride + (p - lr)] = s;                                                        \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int64_t r = 0; r < rows; r++) {                                                              \
            const int64_t pr = pos[r / g];                                                                \
            const int64_t n = pr - ((window > 0 && pr - window + 1 > 0) ? pr - window + 1 : 0) + 1;        \
            float *s = sc + r * stride;                                                                   \
            float m = -FLT_MAX;                                                                           \
            for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;                                      \
            float sum = 0.f;                                                                              \
            for (int64_t j = 0; j < n; j++) {                                                             \
                float e = expf(s[j] - m);                                                                 \
                s[j] = e;                                                                                 \
                sum += e;                                                                                 \
            }                                                                                             \
            float inv = 1.f / sum;                                                                        \
            for (int64_t j = 0; j < n; j++) s[j] *= inv;                                                  \
            for (int64_t t = 0; t < d; t++) acc[r * kvb_round16(d) + t] = 0.f;                            \
        }                                                                                                 \
        for (int64_t c0 = lo & ~(int64_t)(KVB_VCHUNK - 1); c0 <= hi; c0 += KVB_VCHUNK) {                   \
            const int64_t a0 = c0 > lo ? c0 : lo, b0 = c0 + KVB_VCHUNK - 1 < hi ? c0 + KVB_VCHUNK - 1 : hi; \
            for (int64_t p = a0; p <= b0; p++) {                                                          \
                const KV_T *vp = v + table[p / bs] * s_blk + (p % bs) * s_pos;                            \
                for (int64_t t = 0; t < d; t++) vb[(p - c0) * d + t] = LOAD(vp[t]);                       \
            }                                                                                             \
            for (int64_t r = 0; r < rows; r++) {                                                          \
                const int64_t pr = pos[r / g];                                                            \
                const int64_t lr = (window > 0 && pr - window + 1 > 0) ? pr - window + 1 : 0;             \
                const int64_t a = c0 > lr ? c0 : lr, b = c0 + KVB_VCHUNK - 1 < pr ? c0 + KVB_VCHUNK - 1 : pr; \
                if (a > b) continue;                                                                      \
                float o[KVB_MAX_DIM];                                                                     \
                float *ar = acc + r * kvb_round16(d);                                                     \
                for (int64_t t = 0; t < d; t++) o[t] = ar[t];                                             \
                const float *pj = sc + r * stride + (a - lr);                                             \
                for (int64_t p = a; p <= b; p++) {                                                        \
                    const float pr_ = pj[p - a];                                                          \
                    const float *vj = vb + (p - c0) * d;                                                  \
                    for (int64_t t = 0; t < d; t++) o[t] += pr_ * vj[t];                                  \
                }                                                                                         \
                for (int64_t t = 0; t < d; t++) ar[t] = o[t];                                             \
            }                                                                                             \
        }                                                                                                 \
        for (int64_t r = 0; r < rows; r++) {                                                              \
            float *o = out0 + (r / g) * h * d + (r % g) * d;                                              \
            const float *ar = acc + r * kvb_round16(d);                                                   \
            for (int64_t t = 0; t < d; t++) o[t] = ar[t];                                                 \
        }                                                                                                 \
    }

KVB_TILE(tile_64, 64, float, KVB_F32)
KVB_TILE(tile_128, 128, float, KVB_F32)
KVB_TILE(tile_any, 0, float, KVB_F32)
KVB_TILE(tile_bf16_64, 64, uint16_t, KVB_BF16)
KVB_TILE(tile_bf16_128, 128, uint16_t, KVB_BF16)
KVB_TILE(tile_bf16_any, 0, uint16_t, KVB_BF16)

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
            d % 4 != 0 || bs <= 0 || t <= 0)                                                             \
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
        int failed = 0;                                                                                  \
        _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(| : failed)")    \
        for (int64_t task = 0; task < tasks; task++) {                                                   \
            const int64_t ti = task / hkv, kh = task % hkv;                                              \
            const int64_t r0 = starts[ti], nq = starts[ti + 1] - r0;                                     \
            const int64_t lo = (window > 0 && pos[r0] - window + 1 > 0) ? pos[r0] - window + 1 : 0;      \
            const int64_t rows = nq * g, span = kvb_round16(pos[r0 + nq - 1] - lo + 1);                  \
            const size_t words = (size_t)(rows * span + rows * kvb_round16(d) + d * KVB_LANES +          \
                                          KVB_VCHUNK * d);                                               \
            float *work = (float *)aligned_alloc(64, (words * sizeof(float) + 63) & ~(size_t)63);        \
            if (!work) {                                                                                 \
                failed |= 1;                                                                             \
                continue;                                                                                \
            }                                                                                            \
            const int64_t *table = tables + seq[r0] * max_blocks;                                        \
            const float *qr = q + (r0 * h + kh * g) * d;                                                 \
            float *o = out + (r0 * h + kh * g) * d;                                                      \
            const KV_T *kk = k + kh * d, *vv = v + kh * d;                                               \
            if (d == 64)                                                                                 \
                A64(qr, kk, vv, o, work, table, pos + r0, nq, h, g, d, bs, s_pos, s_blk, window, scale, softcap); \
            else if (d == 128)                                                                           \
                A128(qr, kk, vv, o, work, table, pos + r0, nq, h, g, d, bs, s_pos, s_blk, window, scale, softcap); \
            else                                                                                         \
                AANY(qr, kk, vv, o, work, table, pos + r0, nq, h, g, d, bs, s_pos, s_blk, window, scale, softcap); \
            free(work);                                                                                  \
        }                                                                                                \
        free(starts);                                                                                    \
        return failed ? -1 : 0;                                                                          \
    }

KVB_DRIVER(kvb_paged_attention, float, tile_64, tile_128, tile_any)
KVB_DRIVER(kvb_paged_attention_bf16, uint16_t, tile_bf16_64, tile_bf16_128, tile_bf16_any)
