/* bf16 kernels on AMX tiles whose every output row is the same bits whatever else is in the call:
 * a linear (kvb_amx_linear) and paged attention over a bf16 KV pool (kvb_amx_attention).
 *
 * The linear: out[m, n] = bf16(act(sum_k x[m, k] w[n, k] + bias[n]) + res[m, n]).
 * out[m, n] = bf16(act(sum_k x[m, k] w[n, k] + bias[n]) + res[m, n]).
 *
 * Why our own: oneDNN picks a kernel, a K blocking and a thread split per call by row count, so
 * a row's sum order (and its bf16 bits) depends on what else is in the step; keeping exactness
 * on top of it meant calls of at most 32 rows, each re-reading the whole weight. Here a row's sum
 * is always the same chain: one fp32 accumulator per output, TDPBF16PS over K in steps of 32 in
 * increasing order, whatever tile, block or thread the row lands in; the epilogue is the same
 * vector code per element. Row blocking is free to follow the cache.
 *
 * x: [m, k] bf16 rows with stride lda (k a multiple of 32; the caller pads). w: packed by
 * kvb_amx_pack into VNNI tiles [ceil(n/16)][k/32][16 pairs][16 columns][2]. bias: fp32 [n] or
 * NULL. res: bf16 [m, n] or NULL. act: 0 none (res added), 1 SiLU (then res added), 2 times res
 * (the MLP's up projection times its SiLU'd gate).
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "rowops.h"
#include "stack.h"
#include "vecmath.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_ELEMS 512 /* one packed B tile: 16 pairs x 16 columns x 2 */
#ifndef PREFETCH_TILES
#define PREFETCH_TILES 4
#endif

/* Linux hands out AMX state per process on request; 0 when granted. */
int kvb_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tilecfg;

/* Tiles 0-3: accumulators (row block 0/1 x column block 0/1); 4, 5: x row blocks; 6, 7: w. */
static void configure(int r0, int r1) {
    tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {r0, r0, r1, r1, r0, r1, 16, 16};
    for (int t = 0; t < 8; t++) {
        c.rows[t] = (uint8_t)rows[t];
        c.colsb[t] = rows[t] ? 64 : 0;
    }
    _tile_loadconfig(&c);
}

/* w [n, k] bf16 row-major -> VNNI tiles; columns past n and k past kw are zero. */
void kvb_amx_pack(const uint16_t *w, int64_t n, int64_t kw, int64_t k, uint16_t *out) {
    int64_t nb = (n + 15) / 16, kb = k / 32;
    memset(out, 0, (size_t)(nb * kb * TILE_ELEMS) * sizeof(uint16_t));
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < kw; i++) {
            int64_t b = (j / 16) * kb + i / 32, pair = (i % 32) / 2;
            out[b * TILE_ELEMS + pair * 32 + (j % 16) * 2 + (i % 2)] = w[j * kw + i];
        }
}

/* acc [rows][32] fp32 (columns c0..c0+31 of the output) -> out rows. */
static void epilogue(const float *acc, int64_t rows, int64_t m0, int64_t c0, int64_t n, const float *bias,
                     const uint16_t *res, int act, uint16_t *out) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t h = 0; h < 2; h++) {
            int64_t c = c0 + 16 * h;
            if (c >= n)
                break;
            __mmask16 mask = n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1);
            __m512 v = _mm512_load_ps(acc + i * 32 + 16 * h);
            if (bias)
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + c));
            if (act == 1)
                v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
            if (res) {
                __m256i r = _mm256_maskz_loadu_epi16(mask, res + (m0 + i) * n + c);
                const __m512 rv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
                v = act == 2 ? _mm512_mul_ps(v, rv) : _mm512_add_ps(v, rv);
            }
            __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
            _mm256_mask_storeu_epi16(out + (m0 + i) * n + c, mask, b);
        }
}

int kvb_amx_linear(const uint16_t *x, int64_t m, int64_t k, int64_t lda, const uint16_t *w, int64_t n,
                   const float *bias, const uint16_t *res, int act, uint16_t *out, int64_t block_rows,
                   int nthreads) {
    if (k % 32 || m < 0 || block_rows < 32)
        return -1;
    const int64_t kb = k / 32, nb16 = (n + 15) / 16, units = (nb16 + 1) / 2;
    /* Rows of x kept hot in L2 while every column unit passes over them (a cache choice only). */
    for (int64_t mb = 0; mb < m; mb += block_rows) {
        const int64_t me = mb + block_rows < m ? mb + block_rows : m;
#pragma omp parallel num_threads(nthreads)
        {
            float acc[4][16 * 16] __attribute__((aligned(64)));
            float buf[32 * 32] __attribute__((aligned(64)));
            int cur0 = -1, cur1 = -1;
#pragma omp for schedule(static)
            for (int64_t u = 0; u < units; u++) {
                const uint16_t *w0 = w + (2 * u) * kb * TILE_ELEMS;
                const int two = 2 * u + 1 < nb16;
                const uint16_t *w1 = two ? w0 + kb * TILE_ELEMS : w0;
                for (int64_t m0 = mb; m0 < me; m0 += 32) {
                    const int r0 = me - m0 >= 16 ? 16 : (int)(me - m0);
                    const int r1 = me - m0 >= 32 ? 16 : (me - m0 > 16 ? (int)(me - m0 - 16) : 0);
                    if (r0 != cur0 || r1 != cur1) {
                        configure(r0, r1);
                        cur0 = r0, cur1 = r1;
                    }
                    const uint16_t *a0 = x + m0 * lda, *a1 = x + (m0 + 16) * lda;
                    _tile_zero(0);
                    _tile_zero(1);
                    if (r1) {
                        _tile_zero(2);
                        _tile_zero(3);
                    }
                    for (int64_t j = 0; j < kb; j++) {
                        if (m0 == mb) /* weights stream from memory once per row block: ask ahead */
                            for (int l = 0; l < 16; l++) {
                                _mm_prefetch((const char *)(w0 + (j + PREFETCH_TILES) * TILE_ELEMS) + 64 * l, _MM_HINT_T0);
                                _mm_prefetch((const char *)(w1 + (j + PREFETCH_TILES) * TILE_ELEMS) + 64 * l, _MM_HINT_T0);
                            }
                        _tile_loadd(4, a0 + j * 32, lda * 2);
                        _tile_loadd(6, w0 + j * TILE_ELEMS, 64);
                        _tile_loadd(7, w1 + j * TILE_ELEMS, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        if (r1) {
                            _tile_loadd(5, a1 + j * 32, lda * 2);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, acc[0], 64);
                    _tile_stored(1, acc[1], 64);
                    if (r1) {
                        _tile_stored(2, acc[2], 64);
                        _tile_stored(3, acc[3], 64);
                    }
                    const int rows = r0 + r1;
                    for (int i = 0; i < rows; i++) {
                        const int t = i < 16 ? 0 : 2, ri = i % 16;
                        memcpy(buf + i * 32, acc[t] + ri * 16, 64);
                        memcpy(buf + i * 32 + 16, acc[t + 1] + ri * 16, 64);
                    }
                    epilogue(buf, rows, m0, 32 * u, n, bias, res, act, out);
                }
            }
            _tile_release();
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Paged attention, bf16 pool (the layout of decode_attention.c: q [T, H, D] bf16, pool
 * [blocks, bs, Hkv, D], tables, seq, pos, window, softcap; out [T, H, D] fp32).
 *
 * A task is a tile of up to 16 (token, head) rows of one sequence and one KV head, as in
 * decode_attention.c. Scores: S^T = K Q^T, 16 keys per TDPBF16PS group read straight from the
 * pool (Q packed once per tile). Softmax per row in fp32, lanes fixed by absolute position
 * (lane = position % 16), so a row's max, exponentials and sum never depend on the tile. Values:
 * out = P V over steps of 32 positions aligned to absolute positions, P in bf16 (zero outside a
 * row's own positions: an extra step adds exact zeros), V packed per step. A decode token is a
 * tile of one row: one code path, the same bits alone or tiled. Needs d % 32 == 0 and
 * bs % 32 == 0 (else returns -1 and the caller runs decode_attention.c).
 */
static inline __m512 tanh16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(exp16(_mm512_add_ps(x, x)), one)));
}

static void configure_attention(int rows) {
    tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = (uint8_t)(t < 3 ? 16 : rows); /* 0: S^T, 1: K, 2: Q^T or V; 3: P; 4-7: out */
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

static inline int64_t first_pos(int64_t p, int64_t window) {
    return (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
}

typedef struct {
    const uint16_t *q, *k, *v;
    float *out;
    const int64_t *table, *pos;
    int64_t r0, nq, g, h, kh, d, bs, s_pos, s_blk, window;
    float scale, softcap;
} att_task;

/* One tile; work: 64-byte aligned scratch (sized by kvb_amx_attention). */
static void attention_tile(const att_task *A, char *work, int *configured) {
    const int64_t g = A->g, d = A->d, rows = A->nq * g, nd = d / 32;
    const int64_t lo = first_pos(A->pos[0], A->window), hi = A->pos[A->nq - 1];
    const int64_t base = lo & ~(int64_t)31, span = ((hi - base + 1) + 31) & ~(int64_t)31;
    uint16_t *qp = (uint16_t *)work;                          /* [nd][16 pairs][16 rows][2] */
    float *st = (float *)(qp + nd * 512);                     /* [16 keys][16 rows] */
    float *sc = st + 256;                                     /* [16][span] scores */
    uint16_t *pb = (uint16_t *)(sc + 16 * span);              /* [16][span] bf16 probabilities */
    uint16_t *vp = pb + 16 * span;                            /* [4][16 pairs][16 cols][2] */
    float *acc = (float *)(vp + 4 * 512);                     /* [4][16 rows][16 cols] */
    float inv[16];
    int64_t lr[16], pr[16];
    memset(qp, 0, (size_t)nd * 512 * 2);
    memset(pb, 0, (size_t)rows * span * 2); /* the P tile reads only this tile's rows */
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *qr = A->q + ((A->r0 + r / g) * A->h + A->kh * g + r % g) * d;
        for (int64_t i = 0; i < d; i++)
            qp[(i / 32) * 512 + ((i % 32) / 2) * 32 + r * 2 + (i % 2)] = qr[i];
        pr[r] = A->pos[r / g];
        lr[r] = first_pos(pr[r], A->window);
    }
    if (*configured != (int)rows) { /* loading a tile config costs; decode tiles all have one row */
        configure_attention((int)rows);
        *configured = (int)rows;
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    /* scores, 16 keys at a time (one pool block holds all 16: bs % 32 == 0) */
    for (int64_t j0 = lo & ~(int64_t)15; j0 <= hi; j0 += 16) {
        const uint16_t *kb = A->k + A->table[j0 / A->bs] * A->s_blk + (j0 % A->bs) * A->s_pos + A->kh * d;
        if (j0 + 32 <= hi) { /* one core reads ~10 GB/s waiting on misses: ask for the next keys now */
            const int64_t jn = j0 + 32;
            const char *kn = (const char *)(A->k + A->table[jn / A->bs] * A->s_blk + (jn % A->bs) * A->s_pos + A->kh * d);
            for (int i = 0; i < 16; i++)
                for (int64_t b = 0; b < d * 2; b += 64)
                    _mm_prefetch(kn + i * A->s_pos * 2 + b, _MM_HINT_T0);
        }
        _tile_zero(0);
        for (int64_t c = 0; c < nd; c++) {
            _tile_loadd(1, kb + c * 32, A->s_pos * 2);
            _tile_loadd(2, qp + c * 512, 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, st, 64);
        for (int64_t r = 0; r < rows; r++) {
            if (pr[r] < j0 || lr[r] > j0 + 15)
                continue;
            const __m512i p = _mm512_add_epi32(_mm512_set1_epi32((int)j0), lane);
            const __mmask16 m = _mm512_cmpge_epi32_mask(p, _mm512_set1_epi32((int)lr[r])) &
                                _mm512_cmple_epi32_mask(p, _mm512_set1_epi32((int)pr[r]));
            __m512 x = _mm512_i32gather_ps(_mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(16)),
                                                            _mm512_set1_epi32((int)r)), st, 4);
            x = _mm512_mul_ps(x, _mm512_set1_ps(A->scale));
            if (A->softcap > 0.f) {
                const __m512 cap = _mm512_set1_ps(A->softcap);
                x = _mm512_mul_ps(cap, tanh16(_mm512_div_ps(x, cap)));
            }
            _mm512_mask_storeu_ps(sc + r * span + (j0 - base), m, x);
        }
    }
    /* softmax per row: lane = position % 16, positions in increasing order per lane */
    for (int64_t r = 0; r < rows; r++) {
        float *s = sc + r * span;
        __m512 mx = _mm512_set1_ps(-FLT_MAX), sum = _mm512_setzero_ps();
        for (int64_t j0 = lr[r] & ~(int64_t)15; j0 <= pr[r]; j0 += 16) {
            const __m512i p = _mm512_add_epi32(_mm512_set1_epi32((int)j0), lane);
            const __mmask16 m = _mm512_cmpge_epi32_mask(p, _mm512_set1_epi32((int)lr[r])) &
                                _mm512_cmple_epi32_mask(p, _mm512_set1_epi32((int)pr[r]));
            mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, s + (j0 - base)));
        }
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        for (int64_t j0 = lr[r] & ~(int64_t)15; j0 <= pr[r]; j0 += 16) {
            const __m512i p = _mm512_add_epi32(_mm512_set1_epi32((int)j0), lane);
            const __mmask16 m = _mm512_cmpge_epi32_mask(p, _mm512_set1_epi32((int)lr[r])) &
                                _mm512_cmple_epi32_mask(p, _mm512_set1_epi32((int)pr[r]));
            const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + (j0 - base)), top)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pb + r * span + (j0 - base)), (__m256i)_mm512_cvtneps_pbh(e));
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    /* values: 64 output columns (4 accumulator tiles) per pass, 32 positions per step */
    for (int64_t off = 0; off < d; off += 64) {
        const int64_t nt = d - off >= 64 ? 4 : (d - off) / 16;
        _tile_zero(4); /* tile numbers are immediates: unrolled */
        if (nt > 1) _tile_zero(5);
        if (nt > 2) _tile_zero(6);
        if (nt > 3) _tile_zero(7);
        for (int64_t c0 = base; c0 <= hi; c0 += 32) {
            const uint16_t *vb = A->v + A->table[c0 / A->bs] * A->s_blk + (c0 % A->bs) * A->s_pos + A->kh * d + off;
            if (c0 + 64 <= hi) {
                const int64_t cn = c0 + 64;
                const char *vn = (const char *)(A->v + A->table[cn / A->bs] * A->s_blk + (cn % A->bs) * A->s_pos + A->kh * d + off);
                for (int i = 0; i < 32; i++)
                    for (int64_t b = 0; b < nt * 32; b += 64)
                        _mm_prefetch(vn + i * A->s_pos * 2 + b, _MM_HINT_T0);
            }
            for (int64_t kp = 0; kp < 16; kp++) {
                const int64_t pa = c0 + 2 * kp, pbp = pa + 1;
                const int va = pa >= lo && pa <= hi, vbv = pbp >= lo && pbp <= hi;
                for (int64_t t = 0; t < nt; t++) {
                    __m512i a = va ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vb + 2 * kp * A->s_pos + 16 * t)))
                                   : _mm512_setzero_si512();
                    __m512i b = vbv ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vb + (2 * kp + 1) * A->s_pos + 16 * t)))
                                    : _mm512_setzero_si512();
                    _mm512_store_si512((__m512i *)(vp + t * 512 + kp * 32), _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
                }
            }
            _tile_loadd(3, pb + (c0 - base), span * 2);
            _tile_loadd(2, vp, 64);
            _tile_dpbf16ps(4, 3, 2);
            if (nt > 1) {
                _tile_loadd(2, vp + 512, 64);
                _tile_dpbf16ps(5, 3, 2);
            }
            if (nt > 2) {
                _tile_loadd(2, vp + 1024, 64);
                _tile_dpbf16ps(6, 3, 2);
            }
            if (nt > 3) {
                _tile_loadd(2, vp + 1536, 64);
                _tile_dpbf16ps(7, 3, 2);
            }
        }
        _tile_stored(4, acc, 64);
        if (nt > 1) _tile_stored(5, acc + 256, 64);
        if (nt > 2) _tile_stored(6, acc + 512, 64);
        if (nt > 3) _tile_stored(7, acc + 768, 64);
        for (int64_t r = 0; r < rows; r++) {
            float *o = A->out + ((A->r0 + r / g) * A->h + A->kh * g + r % g) * d + off;
            for (int64_t t = 0; t < nt; t++)
                _mm512_storeu_ps(o + 16 * t, _mm512_mul_ps(_mm512_load_ps(acc + t * 256 + r * 16), _mm512_set1_ps(inv[r])));
        }
    }
}

static void prefetch_task(const uint16_t *k, const uint16_t *v, const int64_t *tables, int64_t max_blocks,
                          const int64_t *seq, const int64_t *pos, const int64_t *starts, int64_t task, int64_t hkv,
                          int64_t d, int64_t bs, int64_t window) {
    const int64_t ti = task / hkv, kh = task % hkv, r0 = starts[ti], hi = pos[starts[ti + 1] - 1];
    const int64_t lo = first_pos(pos[r0], window), s_pos = hkv * d, s_blk = bs * hkv * d;
    const int64_t *table = tables + seq[r0] * max_blocks;
    for (int64_t j = lo & ~(int64_t)15; j <= hi && j < (lo & ~(int64_t)15) + 32; j++)
        for (int64_t b = 0; b < d * 2; b += 64)
            _mm_prefetch((const char *)(k + table[j / bs] * s_blk + (j % bs) * s_pos + kh * d) + b, _MM_HINT_T0);
    for (int64_t j = lo & ~(int64_t)31; j <= hi && j < (lo & ~(int64_t)31) + 64; j++)
        for (int64_t b = 0; b < d * 2; b += 64)
            _mm_prefetch((const char *)(v + table[j / bs] * s_blk + (j % bs) * s_pos + kh * d) + b, _MM_HINT_T0);
}

int kvb_amx_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, float *out, const int64_t *seq,
                      const int64_t *pos, const int64_t *tables, int64_t max_blocks, int64_t t, int64_t h,
                      int64_t hkv, int64_t d, int64_t bs, int64_t window, float softcap, float scale, int nthreads) {
    if (hkv <= 0 || h % hkv || h / hkv > 16 || d % 32 || d <= 0 || d > 256 || bs % 32 || bs <= 0 || t <= 0)
        return -1;
    for (int64_t r = 0; r < t; r++)
        if (pos[r] < 0 || pos[r] >= max_blocks * bs)
            return -1;
    const int64_t g = h / hkv, cap = 16 / g;
    int64_t *starts = (int64_t *)malloc(sizeof(int64_t) * (size_t)(t + 1));
    if (!starts)
        return -1;
    int64_t n = 0; /* tiles: consecutive tokens of one sequence at consecutive positions, <= cap */
    for (int64_t r = 0; r < t; r++) {
        const int64_t s = n ? starts[n - 1] : 0;
        if (!n || seq[r] != seq[s] || pos[r] != pos[r - 1] + 1 || r - s >= cap)
            starts[n++] = r;
    }
    starts[n] = t;
    const int64_t tasks = n * hkv;
    int64_t max_span = 32;
    for (int64_t ti = 0; ti < n; ti++) {
        const int64_t base = first_pos(pos[starts[ti]], window) & ~(int64_t)31;
        const int64_t span = ((pos[starts[ti + 1] - 1] - base + 1) + 31) & ~(int64_t)31;
        max_span = span > max_span ? span : max_span;
    }
    const size_t bytes = (size_t)(d / 32) * 1024 + 1024 + (size_t)16 * max_span * 6 + 4096 + 4096 + 64;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        char *work = (char *)aligned_alloc(64, (bytes + 63) & ~(size_t)63); /* one scratch per thread */
        int configured = -1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!work) {
                failed |= 1;
                continue;
            }
            const int64_t ti = task / hkv, r0 = starts[ti], nq = starts[ti + 1] - r0;
            if (task + 1 < tasks) /* tasks start cold: ask for the next one's first keys and values now */
                prefetch_task(k, v, tables, max_blocks, seq, pos, starts, task + 1, hkv, d, bs, window);
            const att_task A = {q, k, v, out, tables + seq[r0] * max_blocks, pos + r0, r0, nq, g, h,
                                task % hkv, d, bs, hkv * d, bs * hkv * d, window, scale, softcap};
            attention_tile(&A, work, &configured);
        }
        free(work);
        _tile_release();
    }
    free(starts);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * A whole decoder stack of the lean Llama step in one call: per layer RMSNorm, q/k/v, RoPE, the
 * K/V write into the pool, paged attention, o_proj + residual, RMSNorm, gate (SiLU) and up
 * (times), down_proj + residual. The same kernels in the same order as the step's per-op path
 * (so the same bits), without ~170 returns to Python a step: each one waits for the GIL, which
 * the server's event loop holds part of the time. */
KVB_LAYER_STRUCT(uint16_t)

int kvb_amx_layers(int64_t nlayers, const kvb_layer *layers, uint16_t *const *kpools, uint16_t *const *vpools,
                   uint16_t *x, int64_t t, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d, int64_t inter,
                   const uint16_t *cos, const uint16_t *sin, const int64_t *slots, const int64_t *seq,
                   const int64_t *pos, const int64_t *tables, int64_t max_blocks, int64_t bs, float scale,
                   int nthreads) {
    if (hidden % 32 || (heads * d) % 32 || inter % 32)
        return -1;
    KVB_STACK_BUFFERS(uint16_t, (size_t)t * (size_t)(heads * d) * 4) /* attention's fp32 output */
    float *att = (float *)extra;
    for (int64_t l = 0; l < nlayers && !rc; l++) {
        const kvb_layer *L = layers + l;
        KVB_LAYER(kvb_amx_linear, KVB_WRITE_KV(0), {
            rc |= kvb_amx_attention(q, kpools[l], vpools[l], att, seq, pos, tables, max_blocks, t, heads, kv_heads, d,
                                    bs, 0, 0.0f, scale, nthreads);
            bf16_from_f32(att, t * nq, a);
        });
    }
    free(buf);
    return rc ? -1 : 0;
}
