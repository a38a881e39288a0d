/*
 * Fused n-gram hashing kernel for engram.hashing (CPU).
 *
 * One pass over the ids computes the rows of every Engram layer, order and head:
 *   mix_n(t) = x'_t*m_0 ^ x'_{t-1}*m_1 ^ ... ^ x'_{t-n+1}*m_{n-1}     (uint64 wrap-around)
 *   row      = mix mod p   (floor modulo, result in [0, p))
 * bit for bit the reference scheme. Document resets and the streaming window are handled here
 * so that the positions after a boundary read the pad id.
 *
 * The modulo uses a floating-point quotient estimate: q = floor(double(mix) * (1/p)); for
 * |mix| <= 2^63 the estimate is within 1 of the true floor quotient when p > 3 * 2^10, so one
 * correction step in each direction gives the exact remainder. Moduli below EXACT_THRESHOLD
 * take the plain integer `%` path instead (the caller passes exact=1). The inner loop over
 * heads vectorizes on AVX-512 (int64 <-> double conversions); the function is compiled in
 * x86-64-v4 / v3 / baseline clones chosen at load time.
 *
 * Loaded with ctypes (the GIL is released during the call); PyInit exists only so that the
 * build system treats this file as an ordinary extension module.
 */
#include <Python.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENGRAM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ENGRAM_CLONES
#endif

#define ENGRAM_MAX_N 32

static inline void mod_row_fast(int64_t sm, const int64_t *__restrict p,
                                const double *__restrict ip, int64_t *__restrict o, int64_t K)
{
    const double md = (double)sm;
    for (int64_t k = 0; k < K; k++) {
        /* (two statements: GCC 12 vectorizes this form, not the one-liner) */
        double qd = __builtin_floor(md * ip[k]);
        int64_t q = (int64_t)qd;
        int64_t r = (int64_t)((uint64_t)sm - (uint64_t)q * (uint64_t)p[k]);
        r += (r < 0) ? p[k] : 0;
        r -= (r >= p[k]) ? p[k] : 0;
        o[k] = r;
    }
}

static inline void mod_row_exact(int64_t sm, const int64_t *__restrict p, int64_t *__restrict o,
                                 int64_t K)
{
    for (int64_t k = 0; k < K; k++) {
        const int64_t r = sm % p[k];
        o[k] = r < 0 ? r + p[k] : r;
    }
}

/*
 * x:      (B, T) compressed ids, int64, row-major
 * reset:  (B, T) uint8 or NULL; 1 where a new document starts (earlier positions read pad)
 * window: (B, N-1) int64 or NULL; ids at lags 1..N-1 before x[:, 0]; updated in place
 * mult:   (L, N) int64 multipliers;  mods: (L, N-1, K) int64 primes;  inv: (L, N-1, K) 1/p
 * out:    (L, B, T, (N-1)*K) int64
 * returns 0, or -1 when N is out of range.
 */
ENGRAM_CLONES
int engram_hash(const int64_t *x, int64_t B, int64_t T, const uint8_t *reset, int64_t *window,
                int64_t pad, int64_t N, int64_t L, int64_t K, const int64_t *mult,
                const int64_t *mods, const double *inv, int exact, int64_t *out)
{
    if (N < 2 || N > ENGRAM_MAX_N) return -1;
    const int64_t H = (N - 1) * K;
    for (int64_t b = 0; b < B; b++) {
        int64_t w[ENGRAM_MAX_N]; /* w[k]: the id seen at lag k; w[0] is the current id */
        for (int64_t k = 1; k < N; k++) w[k] = window ? window[b * (N - 1) + (k - 1)] : pad;
        const int64_t *xb = x + b * T;
        for (int64_t t = 0; t < T; t++) {
            if (reset && reset[b * T + t])
                for (int64_t k = 1; k < N; k++) w[k] = pad;
            w[0] = xb[t];
            for (int64_t l = 0; l < L; l++) {
                const int64_t *m = mult + l * N;
                int64_t *o = out + ((l * B + b) * T + t) * H;
                uint64_t mix = (uint64_t)w[0] * (uint64_t)m[0];
                for (int64_t n = 1; n < N; n++) {
                    mix ^= (uint64_t)w[n] * (uint64_t)m[n];
                    const int64_t off = (l * (N - 1) + (n - 1)) * K;
                    if (exact)
                        mod_row_exact((int64_t)mix, mods + off, o + (n - 1) * K, K);
                    else
                        mod_row_fast((int64_t)mix, mods + off, inv + off, o + (n - 1) * K, K);
                }
            }
            for (int64_t k = N - 1; k >= 1; k--) w[k] = w[k - 1];
        }
        if (window)
            for (int64_t k = 1; k < N; k++) window[b * (N - 1) + (k - 1)] = w[k];
    }
    return 0;
}

static struct PyModuleDef engram_hashkernel_module = {
    PyModuleDef_HEAD_INIT, "_hashkernel",
    "Fused n-gram hashing kernel; call engram_hash through ctypes.", -1, NULL,
};

PyMODINIT_FUNC PyInit__hashkernel(void) { return PyModule_Create(&engram_hashkernel_module); }
