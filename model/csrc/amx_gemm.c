/* bf16 linear on AMX whose every output row is the same bits whatever the row count:
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
 * NULL. res: bf16 [m, n] or NULL. act: 0 none, 1 SiLU (applied before the residual).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_ELEMS 512 /* one packed B tile: 16 pairs x 16 columns x 2 */

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

/* e^x for |x| <= 88, ~2 ulp; the same instructions for every element. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
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
                v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16)));
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
