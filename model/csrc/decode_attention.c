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
 * KVB_TILE_ROWS (token, head) rows; one task per (tile, kv head) widens each key and value once
 * for all its rows (a decode token is a tile of one token). A score is one dot product over 16
 * lanes and a fixed tree of lane sums. Exactness: a row's arithmetic is the same code whatever
 * tile it is in: each of its scores is computed alone, its softmax runs over its own
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
#define KVB_LANES 8      /* keys looked up together */
#define KVB_VCHUNK 64    /* values looked up together */
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

/* A task reads one head's row of each position, positions a pool row (all heads) apart: too far
 * for the hardware prefetchers to follow, so rows KVB_AHEAD positions on are asked for ahead. */
#define KVB_AHEAD 16
static inline void kvb_prefetch(const void *row, int64_t nbytes) {
    for (int64_t b = 0; b < nbytes; b += 64) __builtin_prefetch((const char *)row + b, 0, 0);
}

/* One tile: rows are (token, head), token-major; q0/out0 point at the tile's first token's first
 * head of this kv head. Scratch (64-byte aligned floats): sc [rows][stride] (row r's scores from
 * its own first position), acc [rows][dpad]. */
typedef struct {
    const float *q0;
    float *out0, *sc, *acc;
    const int64_t *table, *pos;
    int64_t nq, h, g, d, bs, s_pos, s_blk, window, lo, hi, stride, dpad;
    float scale, softcap;
} kvb_tile;

static inline int64_t kvb_first(int64_t p, int64_t window) {
    return (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
}

/* A fixed-order sum of 16 partial sums (the same tree for every row). */
static inline float kvb_sum16(const float *s) {
    float a[8], b[4];
    for (int i = 0; i < 8; i++) a[i] = s[i] + s[i + 8];
    for (int i = 0; i < 4; i++) b[i] = a[i] + a[i + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float kvb_cap(float x, float softcap) {
    return softcap > 0.f ? softcap * tanhf(x / softcap) : x;
}

/* Scores of every row, for an aligned group of 8 keys at a time (their rows asked for ahead):
 * each score is one dot product over 16 lanes (lane u sums dimensions u, u + 16, ...) read
 * straight from the pool, the lanes added in a fixed tree; every row runs this same code.
 * Instantiated for the common head sizes so the compiler unrolls the d-loops completely (a runtime
 * d costs ~2x), and per K/V element type (LOAD widens one element to fp32). */
#define KVB_SCORE(NAME, DIM, KV_T, LOAD)                                                                 \
    KVB_CLONES static void NAME(const kvb_tile *T, const KV_T *restrict k) {                              \
        const int64_t d = (DIM) ? (DIM) : T->d, g = T->g, rows = T->nq * g, lo = T->lo, hi = T->hi;       \
        const int64_t bs = T->bs, s_pos = T->s_pos, s_blk = T->s_blk, window = T->window;                \
        const int64_t stride = T->stride, hd = T->h * d, d16 = d & ~(int64_t)15;                          \
        const float *restrict q0 = T->q0;                                                                 \
        float *restrict sc = T->sc;                                                                       \
        const KV_T *kps[KVB_LANES];                                                                       \
        for (int64_t j0 = lo & ~(int64_t)(KVB_LANES - 1); j0 <= hi; j0 += KVB_LANES) {                     \
            const int64_t a0 = j0 > lo ? j0 : lo, b0 = j0 + KVB_LANES - 1 < hi ? j0 + KVB_LANES - 1 : hi; \
            for (int64_t p = a0; p <= b0; p++) {                                                          \
                const int64_t pf = p + KVB_AHEAD;                                                         \
                if (pf <= hi) kvb_prefetch(k + T->table[pf / bs] * s_blk + (pf % bs) * s_pos, d * (int64_t)sizeof(KV_T)); \
                kps[p - j0] = k + T->table[p / bs] * s_blk + (p % bs) * s_pos;                            \
            }                                                                                             \
            for (int64_t r = 0; r < rows; r++) {                                                          \
                const int64_t pr = T->pos[r / g], lr = kvb_first(pr, window);                             \
                const int64_t a = a0 > lr ? a0 : lr, b = b0 < pr ? b0 : pr;                               \
                const float *restrict qr = q0 + (r / g) * hd + (r % g) * d;                               \
                float *restrict sr = sc + r * stride - lr;                                                \
                int64_t p = a;                                                                            \
                for (; p + 3 <= b; p += 4) { /* four keys at once: four independent chains */           \
                    const KV_T *restrict k0 = kps[p - j0], *restrict k1 = kps[p + 1 - j0];                \
                    const KV_T *restrict k2 = kps[p + 2 - j0], *restrict k3 = kps[p + 3 - j0];            \
                    float c0[16] = {0.f}, c1[16] = {0.f}, c2[16] = {0.f}, c3[16] = {0.f};                 \
                    for (int64_t t = 0; t < d16; t += 16)                                                 \
                        for (int u = 0; u < 16; u++) {                                                    \
                            const float x = qr[t + u];                                                    \
                            c0[u] += x * LOAD(k0[t + u]);                                                 \
                            c1[u] += x * LOAD(k1[t + u]);                                                 \
                            c2[u] += x * LOAD(k2[t + u]);                                                 \
                            c3[u] += x * LOAD(k3[t + u]);                                                 \
                        }                                                                                 \
                    for (int64_t t = d16; t < d; t++) {                                                   \
                        c0[t - d16] += qr[t] * LOAD(k0[t]);                                               \
                        c1[t - d16] += qr[t] * LOAD(k1[t]);                                               \
                        c2[t - d16] += qr[t] * LOAD(k2[t]);                                               \
                        c3[t - d16] += qr[t] * LOAD(k3[t]);                                               \
                    }                                                                                     \
                    sr[p] = kvb_cap(kvb_sum16(c0) * T->scale, T->softcap);                                \
                    sr[p + 1] = kvb_cap(kvb_sum16(c1) * T->scale, T->softcap);                            \
                    sr[p + 2] = kvb_cap(kvb_sum16(c2) * T->scale, T->softcap);                            \
                    sr[p + 3] = kvb_cap(kvb_sum16(c3) * T->scale, T->softcap);                            \
                }                                                                                         \
                for (; p <= b; p++) {                                                                     \
                    const KV_T *restrict kp = kps[p - j0];                                                \
                    float acc[16] = {0.f};                                                                \
                    for (int64_t t = 0; t < d16; t += 16)                                                 \
                        for (int u = 0; u < 16; u++) acc[u] += qr[t + u] * LOAD(kp[t + u]);               \
                    for (int64_t t = d16; t < d; t++) acc[t - d16] += qr[t] * LOAD(kp[t]);                \
                    sr[p] = kvb_cap(kvb_sum16(acc) * T->scale, T->softcap);                               \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
    }

/* Softmax of each row over its own positions, in place; zeroes the rows' accumulators. */
KVB_CLONES static void kvb_softmax(const kvb_tile *T) {
    for (int64_t r = 0; r < T->nq * T->g; r++) {
        const int64_t pr = T->pos[r / T->g], n = pr - kvb_first(pr, T->window) + 1;
        float *s = T->sc + r * T->stride;
        float m = -FLT_MAX;
        for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
        float sum = 0.f;
        for (int64_t j = 0; j < n; j++) {
            float e = expf(s[j] - m);
            s[j] = e;
            sum += e;
        }
        float inv = 1.f / sum;
        for (int64_t j = 0; j < n; j++) s[j] *= inv;
        for (int64_t t = 0; t < T->d; t++) T->acc[r * T->dpad + t] = 0.f;
    }
}

/* Each row's weighted sum of values, position by position in increasing order, read straight
 * from the pool over aligned chunks of KVB_VCHUNK positions (their rows asked for ahead); then
 * the rows to out. Every row runs this same code. */
#define KVB_SUM(NAME, DIM, KV_T, LOAD)                                                                   \
    KVB_CLONES static void NAME(const kvb_tile *T, const KV_T *restrict v) {                              \
        const int64_t d = (DIM) ? (DIM) : T->d, g = T->g, rows = T->nq * g, lo = T->lo, hi = T->hi;       \
        const int64_t bs = T->bs, s_pos = T->s_pos, s_blk = T->s_blk, dpad = T->dpad, hd = T->h * d;      \
        float *restrict acc = T->acc;                                                                     \
        const KV_T *vps[KVB_VCHUNK];                                                                      \
        for (int64_t c0 = lo & ~(int64_t)(KVB_VCHUNK - 1); c0 <= hi; c0 += KVB_VCHUNK) {                   \
            const int64_t a0 = c0 > lo ? c0 : lo, b0 = c0 + KVB_VCHUNK - 1 < hi ? c0 + KVB_VCHUNK - 1 : hi; \
            for (int64_t p = a0; p <= b0; p++)                                                            \
                vps[p - c0] = v + T->table[p / bs] * s_blk + (p % bs) * s_pos;                            \
            for (int64_t r = 0; r < rows; r++) {                                                          \
                const int64_t pr = T->pos[r / g], lr = kvb_first(pr, T->window);                          \
                const int64_t a = c0 > lr ? c0 : lr, b = c0 + KVB_VCHUNK - 1 < pr ? c0 + KVB_VCHUNK - 1 : pr; \
                if (a > b) continue;                                                                      \
                float o[KVB_MAX_DIM];                                                                     \
                float *ar = acc + r * dpad;                                                               \
                for (int64_t t = 0; t < d; t++) o[t] = ar[t];                                             \
                const float *pj = T->sc + r * T->stride + (a - lr);                                       \
                for (int64_t p = a; p <= b; p++) {                                                        \
                    const int64_t pf = p + KVB_AHEAD;                                                     \
                    if (r == 0 && pf <= hi)                                                               \
                        kvb_prefetch(v + T->table[pf / bs] * s_blk + (pf % bs) * s_pos, d * (int64_t)sizeof(KV_T)); \
                    const float w = pj[p - a];                                                            \
                    const KV_T *restrict vp = vps[p - c0];                                                \
                    for (int64_t t = 0; t < d; t++) o[t] += w * LOAD(vp[t]);                              \
                }                                                                                         \
                for (int64_t t = 0; t < d; t++) ar[t] = o[t];                                             \
            }                                                                                             \
        }                                                                                                 \
        for (int64_t r = 0; r < rows; r++)                                                                \
            memcpy(T->out0 + (r / g) * hd + (r % g) * d, acc + r * dpad, sizeof(float) * (size_t)d);      \
    }

/* A tile: scores, softmax, sums. */
#define KVB_TILE(NAME, DIM, KV_T, LOAD)                                                                  \
    KVB_SCORE(NAME##_score, DIM, KV_T, LOAD)                                                              \
    KVB_SUM(NAME##_sum, DIM, KV_T, LOAD)                                                                  \
    static void NAME(const kvb_tile *T, const KV_T *k, const KV_T *v) {                                   \
        NAME##_score(T, k);                                                                               \
        kvb_softmax(T);                                                                                   \
        NAME##_sum(T, v);                                                                                 \
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
            const size_t words = (size_t)(rows * span + rows * kvb_round16(d));                          \
            float *work = (float *)aligned_alloc(64, (words * sizeof(float) + 63) & ~(size_t)63);        \
            if (!work) {                                                                                 \
                failed |= 1;                                                                             \
                continue;                                                                                \
            }                                                                                            \
            const int64_t dpad = kvb_round16(d);                                                         \
            const kvb_tile T = {q + (r0 * h + kh * g) * d, out + (r0 * h + kh * g) * d, work,            \
                                work + rows * span,                                                      \
                                tables + seq[r0] * max_blocks, pos + r0, nq, h, g, d, bs, s_pos, s_blk,  \
                                window, lo, pos[r0 + nq - 1], span, dpad, scale, softcap};              \
            if (d == 64)                                                                                 \
                A64(&T, k + kh * d, v + kh * d);                                                         \
            else if (d == 128)                                                                           \
                A128(&T, k + kh * d, v + kh * d);                                                        \
            else                                                                                         \
                AANY(&T, k + kh * d, v + kh * d);                                                        \
            free(work);                                                                                  \
        }                                                                                                \
        free(starts);                                                                                    \
        return failed ? -1 : 0;                                                                          \
    }

KVB_DRIVER(kvb_paged_attention, float, tile_64, tile_128, tile_any)
KVB_DRIVER(kvb_paged_attention_bf16, uint16_t, tile_bf16_64, tile_bf16_128, tile_bf16_any)
