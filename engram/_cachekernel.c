/* The hot-row cache's per-request probe (engram.store.cache), one call per small request.
 *
 * For ids (n,) it does, in C, what CachedRowStore's numpy code does with some twenty small array
 * operations (each costing microseconds when a decode step runs them once, with cold caches):
 *   1. memo probe: slot = memo[(id * MEMO_MULT) >> memo_shift], hit = slot_id[slot] == id
 *      (a memo miss is only a miss of the hint: the caller falls back to its sorted index);
 *   2. with a sketch (policy "lfu"): add one per occurrence to each of the `depth` count-min
 *      rows, counter (id * mult[j]) >> sketch_shift in row j (all additions first, as numpy's
 *      add.at), then estimate each id as the minimum over its counters.
 * The caller ages the sketch (halving) afterwards when due, and then recomputes the estimates
 * from the counter positions written to `pos` (depth x n); this happens once per `sample_size`
 * additions. Unsigned 64-bit multiplies wrap exactly as numpy's uint64 arithmetic does, so the
 * decisions are bit-identical to the numpy path (tests compare both).
 *
 * Returns the number of memo hits. Loaded with ctypes (the call releases the GIL); PyInit
 * exists only so that the build treats this file as an ordinary (optional) extension module.
 */
#include <Python.h>
#include <stdint.h>

int64_t engram_cache_probe(int64_t n, const int64_t *ids, const int64_t *memo, int64_t memo_shift,
                           const int64_t *slot_id, int64_t *slot_out, uint8_t *hit_out,
                           int32_t *sketch, const uint64_t *mult, int64_t depth,
                           int64_t sketch_shift, int64_t width, int64_t *pos, int32_t *est_out,
                           uint64_t memo_mult) {
    int64_t nhit = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t b = ((uint64_t)ids[i] * memo_mult) >> memo_shift;
        int64_t s = memo[b];
        int hit = slot_id[s] == ids[i];
        slot_out[i] = s;
        hit_out[i] = (uint8_t)hit;
        nhit += hit;
    }
    if (sketch == NULL) return nhit;
    for (int64_t j = 0; j < depth; j++) {
        uint64_t a = mult[j];
        int64_t base = j * width;
        for (int64_t i = 0; i < n; i++) {
            int64_t p = (int64_t)(((uint64_t)ids[i] * a) >> sketch_shift) + base;
            pos[j * n + i] = p;
            sketch[p] += 1;
        }
    }
    for (int64_t i = 0; i < n; i++) {
        int32_t m = sketch[pos[i]];
        for (int64_t j = 1; j < depth; j++) {
            int32_t c = sketch[pos[j * n + i]];
            if (c < m) m = c;
        }
        est_out[i] = m;
    }
    return nhit;
}

static struct PyModuleDef engram_cachekernel_module = {
    PyModuleDef_HEAD_INIT, "_cachekernel",
    "The hot-row cache's probe; call engram_cache_probe through ctypes.", -1, NULL,
};

PyMODINIT_FUNC PyInit__cachekernel(void) { return PyModule_Create(&engram_cachekernel_module); }
