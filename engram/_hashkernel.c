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
 * correction step in each direction gives the exact remainder. Moduli below the caller's
 * threshold take the plain integer `%` path instead (the caller passes exact=1). On x86 CPUs
 * with AVX-512 (checked at run time) eight heads are reduced per instruction, with the moduli
 * held in registers across a block of positions; elsewhere the same arithmetic runs in scalar
 * code, so every machine produces the same bits.
 *
 * Loaded with ctypes (the GIL is released during the call); PyInit exists only so that the
 * build system treats this file as an ordinary extension module.
 */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENGRAM_X86 1
#include <immintrin.h>
#endif

/* The portable path still gets a build for AVX2-era CPUs (roundsd, BMI2), picked at load time. */
#if defined(ENGRAM_X86) && defined(__GNUC__) && !defined(__clang__)
#define ENGRAM_PORTABLE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ENGRAM_PORTABLE_CLONES
#endif

#define ENGRAM_MAX_N 32
#define ENGRAM_BLOCK 256 /* tokens per block: scratch stays in L1/L2 */

/* Floor modulo with a float quotient estimate (see the header comment); portable. */
static inline int64_t fast_mod(int64_t sm, int64_t p, double ip)
{
    double qd = __builtin_floor((double)sm * ip);
    int64_t q = (int64_t)qd;
    int64_t r = (int64_t)((uint64_t)sm - (uint64_t)q * (uint64_t)p);
    r += (r < 0) ? p : 0;
    r -= (r >= p) ? p : 0;
    return r;
}

static inline int64_t exact_mod(int64_t sm, int64_t p)
{
    const int64_t r = sm % p;
    return r < 0 ? r + p : r;
}

/*
 * Phase 1: the ids at lags 0..N-1 of each position of the block are shifted views of one buffer
 * holding the N-1 remembered ids followed by the block: no per-token work.
 * Phase 2 (vectorizable over positions): the mixes of every layer and order.
 * Phase 2b: a document start at position i changes only positions i..i+N-2 (their lags reaching
 * before i read pad), so those few mixes are recomputed, and the remembered ids are cut at the
 * last start. Phase 3 (mod_block_*): the K moduli of each mix, one output row per position.
 * ext holds ENGRAM_BLOCK + ENGRAM_MAX_N ids of scratch.
 */
static inline __attribute__((always_inline)) void
fill_block(const int64_t *xb, const uint8_t *rb, int64_t nb, int64_t *w, int64_t pad, int64_t N,
           int64_t L, const int64_t *mult, int64_t *ext, uint64_t *mix)
{
    /* ext = [w[N-1] .. w[1], xb[0] .. xb[nb-1]]; the id at lag k of position i is ext[N-1+i-k] */
    for (int64_t j = 0; j < N - 1; j++) ext[j] = w[N - 1 - j];
    memcpy(ext + N - 1, xb, sizeof(int64_t) * nb);
    const int64_t *cur = ext + N - 1;
    for (int64_t l = 0; l < L; l++) {
        const uint64_t *m = (const uint64_t *)(mult + l * N);
        for (int64_t n = 1; n < N; n++) {
            uint64_t *__restrict dst = mix + (l * (N - 1) + (n - 1)) * ENGRAM_BLOCK;
            const int64_t *__restrict ln = cur - n;
            const uint64_t mn = m[n];
            if (n == 1) {
                const int64_t *__restrict l0 = cur;
                const uint64_t m0 = m[0];
                for (int64_t i = 0; i < nb; i++)
                    dst[i] = ((uint64_t)l0[i] * m0) ^ ((uint64_t)ln[i] * mn);
            } else {
                const uint64_t *__restrict prev = dst - ENGRAM_BLOCK;
                for (int64_t i = 0; i < nb; i++) dst[i] = prev[i] ^ ((uint64_t)ln[i] * mn);
            }
        }
    }
    int64_t last_start = -ENGRAM_MAX_N; /* the last document start in this block */
    if (rb) {
        for (int64_t i = 0; i < nb; i++) {
            if (!rb[i]) continue;
            last_start = i;
            /* positions j = i .. i+N-2 (before the next start) see pad at lags > j - i */
            for (int64_t j = i; j < nb && j < i + N - 1; j++) {
                if (j > i && rb[j]) break;
                for (int64_t l = 0; l < L; l++) {
                    const uint64_t *m = (const uint64_t *)(mult + l * N);
                    uint64_t acc = (uint64_t)cur[j] * m[0];
                    for (int64_t n = 1; n < N; n++) {
                        const int64_t id = n <= j - i ? cur[j - n] : pad;
                        acc ^= (uint64_t)id * m[n];
                        mix[(l * (N - 1) + (n - 1)) * ENGRAM_BLOCK + j] = acc;
                    }
                }
            }
        }
    }
    /* remembered ids for the next block: lag k of position nb, pad before the last start */
    for (int64_t k = 1; k < N; k++) w[k] = nb - k >= last_start ? cur[nb - k] : pad;
}

ENGRAM_PORTABLE_CLONES
static void mod_block_portable(const uint64_t *mix, int64_t nb, const int64_t *p, const double *ip,
                               int64_t K, int exact, int64_t *o, int64_t H)
{
    for (int64_t i = 0; i < nb; i++) {
        const int64_t sm = (int64_t)mix[i];
        int64_t *oo = o + i * H;
        if (exact)
            for (int64_t k = 0; k < K; k++) oo[k] = exact_mod(sm, p[k]);
        else
            for (int64_t k = 0; k < K; k++) oo[k] = fast_mod(sm, p[k], ip[k]);
    }
}

#ifdef ENGRAM_X86
/* AVX-512: 8 heads per register, the moduli hoisted out of the position loop. */
__attribute__((target("avx512f,avx512dq"))) static void
mod_block_avx512(const uint64_t *mix, int64_t nb, const int64_t *p, const double *ip, int64_t K,
                 int64_t *o, int64_t H)
{
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t k0 = 0; k0 < K; k0 += 8) {
        const __mmask8 mk = (K - k0 >= 8) ? (__mmask8)0xFF : (__mmask8)((1u << (K - k0)) - 1);
        const __m512i pv = _mm512_maskz_loadu_epi64(mk, p + k0);
        const __m512d iv = _mm512_maskz_loadu_pd(mk, ip + k0);
        for (int64_t i = 0; i < nb; i++) {
            const int64_t sm = (int64_t)mix[i];
            /* floor(sm / p) estimate, converted with round-toward-minus-infinity in one step */
            const __m512i q = _mm512_cvt_roundpd_epi64(_mm512_mul_pd(_mm512_set1_pd((double)sm), iv),
                                                       _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            __m512i r = _mm512_sub_epi64(_mm512_set1_epi64(sm), _mm512_mullo_epi64(q, pv));
            r = _mm512_mask_add_epi64(r, _mm512_cmplt_epi64_mask(r, zero), r, pv);
            r = _mm512_mask_sub_epi64(r, _mm512_cmpge_epi64_mask(r, pv), r, pv);
            _mm512_mask_storeu_epi64(o + i * H + k0, mk, r);
        }
    }
}

/* The mixes' int64 products vectorize with AVX-512DQ (vpmullq). */
__attribute__((target("avx512f,avx512dq"))) static void
fill_block_avx512(const int64_t *xb, const uint8_t *rb, int64_t nb, int64_t *w, int64_t pad,
                  int64_t N, int64_t L, const int64_t *mult, int64_t *ext, uint64_t *mix)
{
    fill_block(xb, rb, nb, w, pad, N, L, mult, ext, mix);
}

static int have_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}
#endif

/*
 * x:      (B, T) compressed ids, int64, row-major
 * reset:  (B, T) uint8 or NULL; 1 where a new document starts (earlier positions read pad)
 * window: (B, N-1) int64 or NULL; ids at lags 1..N-1 before x[:, 0]; updated in place
 * mult:   (L, N) int64 multipliers;  mods: (L, N-1, K) int64 primes;  inv: (L, N-1, K) 1/p
 * flags:  bit 0: exact integer modulo (small moduli); bit 1: no SIMD (tests of the portable path)
 * out:    (L, B, T, (N-1)*K) int64
 * returns 0, -1 when N is out of range, -2 when scratch memory cannot be allocated.
 */
int engram_hash(const int64_t *x, int64_t B, int64_t T, const uint8_t *reset, int64_t *window,
                int64_t pad, int64_t N, int64_t L, int64_t K, const int64_t *mult,
                const int64_t *mods, const double *inv, int flags, int64_t *out)
{
    const int exact = flags & 1;
    if (N < 2 || N > ENGRAM_MAX_N) return -1;
    const int64_t H = (N - 1) * K;
    int64_t *ext = (int64_t *)malloc(sizeof(int64_t) * (ENGRAM_BLOCK + ENGRAM_MAX_N));
    uint64_t *mix = (uint64_t *)malloc(sizeof(uint64_t) * L * (N - 1) * ENGRAM_BLOCK);
    if (!ext || !mix) {
        free(ext);
        free(mix);
        return -2;
    }
#ifdef ENGRAM_X86
    const int simd = !exact && !(flags & 2) && have_avx512();
#endif
    for (int64_t b = 0; b < B; b++) {
        int64_t w[ENGRAM_MAX_N]; /* w[k]: the id seen at ext k; w[0] is the current id */
        for (int64_t k = 1; k < N; k++) w[k] = window ? window[b * (N - 1) + (k - 1)] : pad;
        for (int64_t t0 = 0; t0 < T; t0 += ENGRAM_BLOCK) {
            const int64_t nb = T - t0 < ENGRAM_BLOCK ? T - t0 : ENGRAM_BLOCK;
            const int64_t *xb = x + b * T + t0;
            const uint8_t *rb = reset ? reset + b * T + t0 : NULL;
#ifdef ENGRAM_X86
            if (simd)
                fill_block_avx512(xb, rb, nb, w, pad, N, L, mult, ext, mix);
            else
#endif
                fill_block(xb, rb, nb, w, pad, N, L, mult, ext, mix);
            for (int64_t l = 0; l < L; l++) {
                for (int64_t n = 1; n < N; n++) {
                    const int64_t row = l * (N - 1) + (n - 1);
                    const uint64_t *mx = mix + row * ENGRAM_BLOCK;
                    int64_t *o = out + ((l * B + b) * T + t0) * H + (n - 1) * K;
#ifdef ENGRAM_X86
                    if (simd) {
                        mod_block_avx512(mx, nb, mods + row * K, inv + row * K, K, o, H);
                        continue;
                    }
#endif
                    mod_block_portable(mx, nb, mods + row * K, inv + row * K, K, exact, o, H);
                }
            }
        }
        if (window)
            for (int64_t k = 1; k < N; k++) window[b * (N - 1) + (k - 1)] = w[k];
    }
    free(ext);
    free(mix);
    return 0;
}

static struct PyModuleDef engram_hashkernel_module = {
    PyModuleDef_HEAD_INIT, "_hashkernel",
    "Fused n-gram hashing kernel; call engram_hash through ctypes.", -1, NULL,
};

PyMODINIT_FUNC PyInit__hashkernel(void) { return PyModule_Create(&engram_hashkernel_module); }
