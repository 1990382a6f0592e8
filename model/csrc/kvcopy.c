/* Moving K/V between the paged pool and packed rows in one call (model/kv.py KVPool).
 *
 * Each layer's values are [blocks, bs, Hkv, D] (row = Hkv * D elements per position). Keys are
 * laid out the same, or, where csrc/decode_attention.c reads them (by_dim), [blocks, Hkv, D, bs]:
 * a block's positions side by side per (head, dimension). One call instead of a torch op per
 * (block, layer): each torch op releases and re-takes the GIL, and with the event loop busy
 * every re-take waits (bench/NOTES.md). Elements are copied as they are (elt bytes each): the
 * result is the same whatever the dtype.
 */
#include <stdint.h>
#include <string.h>

/* The element index of (head h, dimension t) of slot offset o in block blk of by_dim keys. */
static inline int64_t kvb_key(int64_t blk, int64_t o, int64_t h, int64_t t, int64_t bs, int64_t hkv, int64_t d) {
    return ((blk * hkv + h) * d + t) * bs + o;
}

static inline void kvb_elt(char *dst, const char *src, int64_t elt) {
    if (elt == 2) /* fixed sizes: a move, not a call */
        memcpy(dst, src, 2);
    else if (elt == 4)
        memcpy(dst, src, 4);
    else
        memcpy(dst, src, (size_t)elt);
}

/* Positions [start, end) of the sequence whose block table is `table` into out: 2 * layers tensors
 * back to back (layer l's keys at 2l, its values at 2l + 1), each [Hkv, n, D]. */
void kvb_copy_out(int64_t layers, void *const *keys, void *const *values, const int64_t *table, int64_t start,
                  int64_t end, int64_t bs, int64_t kv_heads, int64_t d, int64_t elt, int by_dim, char *out) {
    const int64_t n = end - start, row = kv_heads * d * elt, per = kv_heads * n * d * elt;
    for (int64_t t = 0; t < 2 * layers; t++) {
        const char *src = (const char *)(t & 1 ? values[t >> 1] : keys[t >> 1]);
        char *dst = out + t * per;
        if (!(t & 1) && by_dim) {
            for (int64_t p = start; p < end; p++)
                for (int64_t h = 0; h < kv_heads; h++)
                    for (int64_t x = 0; x < d; x++)
                        kvb_elt(dst + ((h * n + (p - start)) * d + x) * elt,
                                src + kvb_key(table[p / bs], p % bs, h, x, bs, kv_heads, d) * elt, elt);
            continue;
        }
        for (int64_t p = start; p < end; p++) {
            const char *at = src + (table[p / bs] * bs + p % bs) * row;
            for (int64_t h = 0; h < kv_heads; h++)
                memcpy(dst + (h * n + (p - start)) * d * elt, at + h * d * elt, (size_t)(d * elt));
        }
    }
}

/* n rows k, v [n, Hkv, D] into the pool slots slots[i] (= block * bs + offset) of one layer. */
void kvb_write_rows(void *keys, void *values, const int64_t *slots, int64_t n, const char *k, const char *v,
                    int64_t bs, int64_t kv_heads, int64_t d, int64_t elt, int by_dim) {
    const int64_t row = kv_heads * d * elt;
    for (int64_t i = 0; i < n; i++) {
        const int64_t blk = slots[i] / bs, o = slots[i] % bs;
        memcpy((char *)values + slots[i] * row, v + i * row, (size_t)row);
        if (!by_dim) {
            memcpy((char *)keys + slots[i] * row, k + i * row, (size_t)row);
            continue;
        }
        for (int64_t h = 0; h < kv_heads; h++)
            for (int64_t x = 0; x < d; x++)
                kvb_elt((char *)keys + kvb_key(blk, o, h, x, bs, kv_heads, d) * elt, k + i * row + (h * d + x) * elt,
                        elt);
    }
}
