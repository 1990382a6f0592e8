/* Copying a sequence's K/V out of the paged pool in one call (model/kv.py KVPool.extract).
 *
 * The pool of each layer is [blocks, bs, Hkv, D] (row_bytes = Hkv * D * elt per position); the
 * output holds 2 * layers tensors back to back (layer l's keys at 2l, its values at 2l + 1),
 * each [Hkv, n, D] for positions [start, end) of the sequence whose block table is ``table``.
 * One call instead of a torch copy per (block, layer): each torch op releases and re-takes the
 * GIL, and with the event loop busy every re-take waits (bench/NOTES.md). Bytes are copied as
 * they are: the result is the same whatever the dtype.
 */
#include <stdint.h>
#include <string.h>

void kvb_copy_out(int64_t layers, void *const *keys, void *const *values, const int64_t *table,
                  int64_t start, int64_t end, int64_t bs, int64_t kv_heads, int64_t head_bytes,
                  char *out) {
    const int64_t n = end - start, row = kv_heads * head_bytes, per = kv_heads * n * head_bytes;
    for (int64_t t = 0; t < 2 * layers; t++) {
        const char *src = (const char *)(t & 1 ? values[t >> 1] : keys[t >> 1]);
        char *dst = out + t * per;
        for (int64_t p = start; p < end; p++) {
            const char *at = src + (table[p / bs] * bs + p % bs) * row;
            for (int64_t h = 0; h < kv_heads; h++)
                memcpy(dst + (h * n + (p - start)) * head_bytes, at + h * head_bytes, (size_t)head_bytes);
        }
    }
}
