/*
 * Fused n-gram hashing kernel for engram.hashing (CPU).
 *
 * One pass over the ids computes the rows of every Engram layer, order and head:
 *   mix_n(t) = x'_t*m_0 ^ x'_{t-1}*m_1 ^ ... ^ x'_{t-n+1}*m_{n-1}     (uint64 wrap-around)
 *   row      = mix mod p   (floor modulo, result in [0, p))
 * bit for bit the reference scheme. Document resets and the streaming window are handled here
 * so that the positions after a boundary read the pad id.
 *
 * Exact modulo without a division instruction. With x = sm / p (sm the mix as int64, so
 * |sm| <= 2^63), q = round(double(sm) * (1/p)) is taken by adding 1.5 * 2^52 to the product:
 * the sum lies in [2^52, 2^53), where doubles are the integers, so it rounds to the nearest
 * integer and its low bits are q in two's complement (|x| <= 2^50 < 2^51). For p >= 2^13 the
 * product is within 3 * 2^10 / p <= 3/8 of x (three roundings of relative error 2^-53, or
 * two with a fused multiply-add), so |q - x| < 1 and q is floor(x) or floor(x) + 1: the
 * remainder r = sm - q*p is in [-p, p) and one conditional add of p makes it exact. Every path
 * and every compiler choice (fused or not) therefore gives the same bits; only the default
 * round-to-nearest mode is assumed, as everywhere in numpy and PyTorch.
 *   narrow rows (every p < 2^31): r fits in 32 bits, so only the low 32 bits of q, p and sm are
 *     needed: r = sm - q*p (mod 2^32), then min(r, r + p) as unsigned 32-bit numbers picks
 *     the one in [0, p). One 32x32 multiply, no 64-bit product.
 *   wide rows (p < 2^62): 64-bit products (wrap-around), r += p where r < 0.
 * Moduli below 2^13 or from 2^62 (the caller passes exact=1) take integer `%` on every path.
 *
 * Paths, chosen by the caller (engram.hashing resolves `auto` and ENGRAM_HASH_PATH):
 *   1 portable: plain C written for auto-vectorisation (inner loop over heads, branch-free);
 *               what ARM and any other CPU run.
 *   2 avx2:     AVX2 + FMA intrinsics, 4 heads per register; 32x32->64 vpmuludq products.
 *   3 avx512:   AVX-512F/DQ intrinsics, 8 heads per register (masked for the last heads).
 * engram_hash_paths() reports which the CPU can run (checked at run time, so one build runs
 * everywhere); engram_cpu_features() the CPU flags the benchmark prints.
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

#define ENGRAM_MAX_N 32
#define ENGRAM_BLOCK 256         /* tokens per block: scratch stays in L1/L2 */
#define ENGRAM_ROUND 0x1.8p52    /* 1.5 * 2^52: x + ENGRAM_ROUND rounds x to an integer */
#define ENGRAM_NARROW 0x80000000 /* rows whose primes are all below 2^31 use 32-bit remainders */

enum { PATH_PORTABLE = 1, PATH_AVX2 = 2, PATH_AVX512 = 3 };
enum { CPU_AVX2 = 1, CPU_FMA = 2, CPU_AVX512F = 4, CPU_AVX512DQ = 8, CPU_BMI2 = 16 };

typedef void (*mod_block_fn)(const uint64_t *, int64_t, const int64_t *, const double *, int64_t,
                             int64_t *, int64_t);
typedef void (*fill_block_fn)(const int64_t *, const uint8_t *, int64_t, int64_t *, int64_t,
                              int64_t, int64_t, const int64_t *, int64_t *, uint64_t *);

static inline uint64_t double_bits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

/* One head, narrow row (p < 2^31); x = (double)sm. Scalar reference of the vector paths. */
static inline int64_t mod_narrow(int64_t sm, double x, int64_t p, double ip)
{
    const uint32_t q = (uint32_t)double_bits(x * ip + ENGRAM_ROUND);
    const uint32_t r = (uint32_t)sm - q * (uint32_t)p; /* sm - q*p mod 2^32, in [-p, p) */
    const uint32_t s = r + (uint32_t)p;
    return (int64_t)(r < s ? r : s);
}

/* One head, wide row (p < 2^62). */
static inline int64_t mod_wide(int64_t sm, double x, int64_t p, double ip)
{
    const uint64_t q = double_bits(x * ip + ENGRAM_ROUND) - double_bits(ENGRAM_ROUND);
    const int64_t r = (int64_t)((uint64_t)sm - q * (uint64_t)p); /* in [-p, p) */
    return r + (r < 0 ? p : 0);
}

static inline int row_is_narrow(const int64_t *p, int64_t K)
{
    for (int64_t k = 0; k < K; k++)
        if (p[k] >= ENGRAM_NARROW) return 0;
    return 1;
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


/* Integer division: moduli outside [2^13, 2^62), on every path. */
static void mod_block_exact(const uint64_t *mix, int64_t nb, const int64_t *p, const double *ip,
                            int64_t K, int64_t *o, int64_t H)
{
    (void)ip;
    for (int64_t i = 0; i < nb; i++) {
        const int64_t sm = (int64_t)mix[i];
        for (int64_t k = 0; k < K; k++) {
            const int64_t r = sm % p[k];
            o[i * H + k] = r < 0 ? r + p[k] : r;
        }
    }
}

/* Portable: the loop over heads has no branches, so compilers vectorise it (SSE2, NEON...). */
static void mod_block_portable(const uint64_t *mix, int64_t nb, const int64_t *__restrict p,
                               const double *__restrict ip, int64_t K, int64_t *__restrict o,
                               int64_t H)
{
    if (row_is_narrow(p, K)) {
        for (int64_t i = 0; i < nb; i++) {
            const int64_t sm = (int64_t)mix[i];
            const double x = (double)sm;
            int64_t *__restrict oo = o + i * H;
            for (int64_t k = 0; k < K; k++) oo[k] = mod_narrow(sm, x, p[k], ip[k]);
        }
    } else {
        for (int64_t i = 0; i < nb; i++) {
            const int64_t sm = (int64_t)mix[i];
            const double x = (double)sm;
            int64_t *__restrict oo = o + i * H;
            for (int64_t k = 0; k < K; k++) oo[k] = mod_wide(sm, x, p[k], ip[k]);
        }
    }
}

static void fill_block_portable(const int64_t *xb, const uint8_t *rb, int64_t nb, int64_t *w,
                                int64_t pad, int64_t N, int64_t L, const int64_t *mult,
                                int64_t *ext, uint64_t *mix)
{
    fill_block(xb, rb, nb, w, pad, N, L, mult, ext, mix);
}

#ifdef ENGRAM_X86
/* ---- AVX2 + FMA: 4 heads per register */

#define AVX2_TARGET __attribute__((target("avx2,fma")))

/* narrow: low 32 bits of each 64-bit lane hold the remainder; the high halves are cleared */
static inline AVX2_TARGET __m256i avx2_narrow(__m256d x, __m256i s, __m256i pv, __m256d iv)
{
    const __m256i q = _mm256_castpd_si256(_mm256_fmadd_pd(x, iv, _mm256_set1_pd(ENGRAM_ROUND)));
    const __m256i r = _mm256_sub_epi32(s, _mm256_mul_epu32(q, pv));
    const __m256i m = _mm256_min_epu32(r, _mm256_add_epi32(r, pv));
    return _mm256_and_si256(m, _mm256_set1_epi64x(0xFFFFFFFF));
}

/* wide: q*p mod 2^64 from three 32x32->64 products (ph = p >> 32) */
static inline AVX2_TARGET __m256i avx2_wide(__m256d x, __m256i s, __m256i pv, __m256i ph,
                                            __m256d iv)
{
    const __m256d rd = _mm256_set1_pd(ENGRAM_ROUND);
    const __m256i q = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_fmadd_pd(x, iv, rd)),
                                       _mm256_castpd_si256(rd));
    const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(q, 32), pv),
                                           _mm256_mul_epu32(q, ph));
    const __m256i qp = _mm256_add_epi64(_mm256_mul_epu32(q, pv), _mm256_slli_epi64(cross, 32));
    const __m256i r = _mm256_sub_epi64(s, qp);
    const __m256i neg = _mm256_cmpgt_epi64(_mm256_setzero_si256(), r);
    return _mm256_add_epi64(r, _mm256_and_si256(neg, pv));
}

AVX2_TARGET static void mod_block_avx2(const uint64_t *mix, int64_t nb, const int64_t *p,
                                       const double *ip, int64_t K, int64_t *o, int64_t H)
{
    const int narrow = row_is_narrow(p, K);
    int64_t k0 = 0;
    if (narrow) {
        for (; k0 + 8 <= K; k0 += 8) {
            const __m256i pa = _mm256_loadu_si256((const __m256i *)(p + k0));
            const __m256i pb = _mm256_loadu_si256((const __m256i *)(p + k0 + 4));
            const __m256d ia = _mm256_loadu_pd(ip + k0), ib = _mm256_loadu_pd(ip + k0 + 4);
            for (int64_t i = 0; i < nb; i++) {
                const int64_t sm = (int64_t)mix[i];
                const __m256d x = _mm256_set1_pd((double)sm);
                const __m256i s = _mm256_set1_epi64x(sm);
                _mm256_storeu_si256((__m256i *)(o + i * H + k0), avx2_narrow(x, s, pa, ia));
                _mm256_storeu_si256((__m256i *)(o + i * H + k0 + 4), avx2_narrow(x, s, pb, ib));
            }
        }
        for (; k0 + 4 <= K; k0 += 4) {
            const __m256i pa = _mm256_loadu_si256((const __m256i *)(p + k0));
            const __m256d ia = _mm256_loadu_pd(ip + k0);
            for (int64_t i = 0; i < nb; i++) {
                const int64_t sm = (int64_t)mix[i];
                const __m256d x = _mm256_set1_pd((double)sm);
                const __m256i s = _mm256_set1_epi64x(sm);
                _mm256_storeu_si256((__m256i *)(o + i * H + k0), avx2_narrow(x, s, pa, ia));
            }
        }
    } else {
        for (; k0 + 4 <= K; k0 += 4) {
            const __m256i pa = _mm256_loadu_si256((const __m256i *)(p + k0));
            const __m256i ph = _mm256_srli_epi64(pa, 32);
            const __m256d ia = _mm256_loadu_pd(ip + k0);
            for (int64_t i = 0; i < nb; i++) {
                const int64_t sm = (int64_t)mix[i];
                const __m256d x = _mm256_set1_pd((double)sm);
                const __m256i s = _mm256_set1_epi64x(sm);
                _mm256_storeu_si256((__m256i *)(o + i * H + k0), avx2_wide(x, s, pa, ph, ia));
            }
        }
    }
    if (k0 < K) /* the last K mod 4 heads: the scalar form of the same arithmetic */
        for (int64_t i = 0; i < nb; i++) {
            const int64_t sm = (int64_t)mix[i];
            const double x = (double)sm;
            for (int64_t k = k0; k < K; k++)
                o[i * H + k] =
                    narrow ? mod_narrow(sm, x, p[k], ip[k]) : mod_wide(sm, x, p[k], ip[k]);
        }
}

/* The mixes' 64-bit products vectorise with AVX2 (three vpmuludq each). */
AVX2_TARGET static void fill_block_avx2(const int64_t *xb, const uint8_t *rb, int64_t nb,
                                        int64_t *w, int64_t pad, int64_t N, int64_t L,
                                        const int64_t *mult, int64_t *ext, uint64_t *mix)
{
    fill_block(xb, rb, nb, w, pad, N, L, mult, ext, mix);
}

/* ---- AVX-512F/DQ: 8 heads per register */

#define AVX512_TARGET __attribute__((target("avx512f,avx512dq")))

AVX512_TARGET static void mod_block_avx512(const uint64_t *mix, int64_t nb, const int64_t *p,
                                           const double *ip, int64_t K, int64_t *o, int64_t H)
{
    const int narrow = row_is_narrow(p, K);
    const __m512d rd = _mm512_set1_pd(ENGRAM_ROUND);
    const __m512i lo32 = _mm512_set1_epi64(0xFFFFFFFF);
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t k0 = 0; k0 < K; k0 += 8) {
        const __mmask8 mk = (K - k0 >= 8) ? (__mmask8)0xFF : (__mmask8)((1u << (K - k0)) - 1);
        const __m512i pv = _mm512_maskz_loadu_epi64(mk, p + k0);
        const __m512d iv = _mm512_maskz_loadu_pd(mk, ip + k0);
        if (narrow) {
            for (int64_t i = 0; i < nb; i++) {
                const int64_t sm = (int64_t)mix[i];
                const __m512i q = _mm512_castpd_si512(
                    _mm512_fmadd_pd(_mm512_set1_pd((double)sm), iv, rd));
                const __m512i r = _mm512_sub_epi32(_mm512_set1_epi64(sm), _mm512_mul_epu32(q, pv));
                const __m512i m = _mm512_min_epu32(r, _mm512_add_epi32(r, pv));
                _mm512_mask_storeu_epi64(o + i * H + k0, mk, _mm512_and_si512(m, lo32));
            }
        } else {
            for (int64_t i = 0; i < nb; i++) {
                const int64_t sm = (int64_t)mix[i];
                const __m512i q = _mm512_sub_epi64(
                    _mm512_castpd_si512(_mm512_fmadd_pd(_mm512_set1_pd((double)sm), iv, rd)),
                    _mm512_castpd_si512(rd));
                __m512i r = _mm512_sub_epi64(_mm512_set1_epi64(sm), _mm512_mullo_epi64(q, pv));
                r = _mm512_mask_add_epi64(r, _mm512_cmplt_epi64_mask(r, zero), r, pv);
                _mm512_mask_storeu_epi64(o + i * H + k0, mk, r);
            }
        }
    }
}

/* The mixes' int64 products vectorise with AVX-512DQ (vpmullq). */
AVX512_TARGET static void fill_block_avx512(const int64_t *xb, const uint8_t *rb, int64_t nb,
                                            int64_t *w, int64_t pad, int64_t N, int64_t L,
                                            const int64_t *mult, int64_t *ext, uint64_t *mix)
{
    fill_block(xb, rb, nb, w, pad, N, L, mult, ext, mix);
}
#endif

/* Bit set of CPU_* flags found (x86; 0 elsewhere), as the run-time checks see them. */
int engram_cpu_features(void)
{
    int f = 0;
#ifdef ENGRAM_X86
    __builtin_cpu_init();
    f |= __builtin_cpu_supports("avx2") ? CPU_AVX2 : 0;
    f |= __builtin_cpu_supports("fma") ? CPU_FMA : 0;
    f |= __builtin_cpu_supports("avx512f") ? CPU_AVX512F : 0;
    f |= __builtin_cpu_supports("avx512dq") ? CPU_AVX512DQ : 0;
    f |= __builtin_cpu_supports("bmi2") ? CPU_BMI2 : 0;
#endif
    return f;
}

/* Bit set (1 << PATH_*) of the paths this CPU can run. */
int engram_hash_paths(void)
{
    int paths = 1 << PATH_PORTABLE;
#ifdef ENGRAM_X86
    const int f = engram_cpu_features();
    if ((f & CPU_AVX2) && (f & CPU_FMA)) paths |= 1 << PATH_AVX2;
    if ((f & CPU_AVX512F) && (f & CPU_AVX512DQ)) paths |= 1 << PATH_AVX512;
#endif
    return paths;
}

/*
 * x:      (B, T) compressed ids, int64, row-major
 * reset:  (B, T) uint8 or NULL; 1 where a new document starts (earlier positions read pad)
 * window: (B, N-1) int64 or NULL; ids at lags 1..N-1 before x[:, 0]; updated in place
 * mult:   (L, N) int64 multipliers;  mods: (L, N-1, K) int64 primes;  inv: (L, N-1, K) 1/p
 * flags:  bit 0: exact integer modulo (moduli below 2^13 or from 2^62);
 *         bit 1: a new document starts after each `sep` id (reset must be NULL)
 * sep:    the separator id when flags bit 1 is set
 * path:   PATH_PORTABLE, PATH_AVX2 or PATH_AVX512
 * out:    (L, B, T, (N-1)*K) int64
 * returns 0; -1 when N is out of range; -2 when scratch memory cannot be allocated;
 * -3 when the path is unknown or this CPU cannot run it.
 */
int engram_hash(const int64_t *x, int64_t B, int64_t T, const uint8_t *reset, int64_t *window,
                int64_t pad, int64_t N, int64_t L, int64_t K, const int64_t *mult,
                const int64_t *mods, const double *inv, int flags, int64_t sep, int path,
                int64_t *out)
{
    if (N < 2 || N > ENGRAM_MAX_N) return -1;
    if ((flags & 2) && reset) return -1;
    if (path < PATH_PORTABLE || path > PATH_AVX512 || !(engram_hash_paths() & (1 << path)))
        return -3;
    fill_block_fn fill = fill_block_portable;
    mod_block_fn mod = mod_block_portable;
#ifdef ENGRAM_X86
    if (path == PATH_AVX2) {
        fill = fill_block_avx2;
        mod = mod_block_avx2;
    } else if (path == PATH_AVX512) {
        fill = fill_block_avx512;
        mod = mod_block_avx512;
    }
#endif
    if (flags & 1) mod = mod_block_exact;
    const int64_t H = (N - 1) * K;
    int64_t *ext = (int64_t *)malloc(sizeof(int64_t) * (ENGRAM_BLOCK + ENGRAM_MAX_N));
    uint64_t *mix = (uint64_t *)malloc(sizeof(uint64_t) * L * (N - 1) * ENGRAM_BLOCK);
    if (!ext || !mix) {
        free(ext);
        free(mix);
        return -2;
    }
    uint8_t sep_starts[ENGRAM_BLOCK];
    for (int64_t b = 0; b < B; b++) {
        int64_t w[ENGRAM_MAX_N]; /* w[k]: the id seen at ext k; w[0] is the current id */
        for (int64_t k = 1; k < N; k++) w[k] = window ? window[b * (N - 1) + (k - 1)] : pad;
        for (int64_t t0 = 0; t0 < T; t0 += ENGRAM_BLOCK) {
            const int64_t nb = T - t0 < ENGRAM_BLOCK ? T - t0 : ENGRAM_BLOCK;
            const int64_t *xb = x + b * T + t0;
            const uint8_t *rb = reset ? reset + b * T + t0 : NULL;
            if (flags & 2) { /* starts after separators; position 0 continues the window */
                uint8_t any = 0;
                sep_starts[0] = t0 > 0 && xb[-1] == sep;
                for (int64_t i = 1; i < nb; i++) sep_starts[i] = xb[i - 1] == sep;
                for (int64_t i = 0; i < nb; i++) any |= sep_starts[i];
                rb = any ? sep_starts : NULL;
            }
            fill(xb, rb, nb, w, pad, N, L, mult, ext, mix);
            for (int64_t l = 0; l < L; l++) {
                for (int64_t n = 1; n < N; n++) {
                    const int64_t row = l * (N - 1) + (n - 1);
                    int64_t *o = out + ((l * B + b) * T + t0) * H + (n - 1) * K;
                    mod(mix + row * ENGRAM_BLOCK, nb, mods + row * K, inv + row * K, K, o, H);
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
