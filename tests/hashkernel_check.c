/*
 * Standalone check of engram/_hashkernel.c against a scalar reference (plain C, `%`), built by
 * tests/test_hash_cross.py with the host compiler and, where a cross compiler and qemu-user are
 * installed, for aarch64 (the portable path as ARM runs it). Each path the CPU runs is checked:
 * random configurations (orders 2-4, heads 1-9, document starts after a separator, ids over all
 * of int64) and the modulo alone at the int64 ends and next to multiples of each prime.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "primes.h" /* NROWS, MAXK, ROWS[NROWS][MAXK], ROWK[NROWS]: written by the test */
int engram_hash(const int64_t *x, int64_t B, int64_t T, const uint8_t *reset, int64_t *window,
                int64_t pad, int64_t N, int64_t L, int64_t K, const int64_t *mult,
                const int64_t *mods, const double *inv, int flags, int64_t sep, int path,
                int64_t *out);
int engram_hash_paths(void);

#define FAILED_CALL 1000000 /* counted as that many wrong values */

static uint64_t state = 88172645463325252ULL;

static uint64_t rnd(void) /* xorshift64 */
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static int64_t floor_mod(int64_t a, int64_t p)
{
    const int64_t r = a % p;
    return r < 0 ? r + p : r;
}

static long check_path(int path);

int main(void)
{
    const int paths = engram_hash_paths();
    long bad = 0;
    for (int path = 1; path <= 3; path++)
        if (paths & (1 << path)) {
            const long wrong = check_path(path);
            printf("path %d: %ld wrong\n", path, wrong);
            bad += wrong;
        }
    return bad != 0;
}

static long check_path(int path)
{
    long bad = 0, checked = 0;
    for (int trial = 0; trial < 40; trial++) {
        const int row = trial % NROWS, K = ROWK[row];
        const int64_t N = 2 + trial % 3, L = 2, B = 2, T = 1 + (int64_t)(rnd() % 700);
        const int64_t pad = 2, sep = 1;
        int64_t mult[2 * 4], mods[2 * 3 * 9];
        double inv[2 * 3 * 9];
        for (int i = 0; i < L * N; i++) mult[i] = (int64_t)(rnd() | 1);
        for (int l = 0; l < L; l++)
            for (int n = 0; n < N - 1; n++)
                for (int k = 0; k < K; k++) {
                    const int other = (row + n + l) % NROWS;
                    const int64_t p = ROWS[other][k % ROWK[other]];
                    mods[(l * (N - 1) + n) * K + k] = p;
                    inv[(l * (N - 1) + n) * K + k] = 1.0 / (double)p;
                }
        int exact = 0;
        for (int i = 0; i < L * (N - 1) * K; i++) exact |= mods[i] < 8192;
        int64_t *x = malloc(sizeof(int64_t) * B * T);
        for (int64_t i = 0; i < B * T; i++) {
            const uint64_t r = rnd();
            x[i] = (r % 5 == 0) ? (int64_t)rnd() : (r % 97 == 1 ? sep : (int64_t)(r % 100000));
        }
        const int64_t H = (N - 1) * K;
        int64_t *out = malloc(sizeof(int64_t) * L * B * T * H);
        const int use_sep = trial % 2;
        const int flags = exact | (use_sep ? 2 : 0);
        if (engram_hash(x, B, T, NULL, NULL, pad, N, L, K, mult, mods, inv, flags, sep, path, out))
            return FAILED_CALL;
        for (int64_t l = 0; l < L; l++)
            for (int64_t b = 0; b < B; b++) {
                int64_t start = 0;
                for (int64_t t = 0; t < T; t++) {
                    if (use_sep && t > 0 && x[b * T + t - 1] == sep) start = t;
                    uint64_t acc = 0;
                    for (int64_t n = 0; n < N; n++) {
                        const int64_t id = t - n >= start ? x[b * T + t - n] : pad;
                        acc ^= (uint64_t)id * (uint64_t)mult[l * N + n];
                        if (n == 0) continue;
                        for (int64_t k = 0; k < K; k++) {
                            const int64_t p = mods[(l * (N - 1) + n - 1) * K + k];
                            const int64_t want = floor_mod((int64_t)acc, p);
                            const int64_t got = out[((l * B + b) * T + t) * H + (n - 1) * K + k];
                            checked++;
                            if (got != want && bad++ < 5)
                                printf("trial %d l%ld b%ld t%ld n%ld k%ld: %ld != %ld\n", trial,
                                       (long)l, (long)b, (long)t, (long)n, (long)k, (long)got,
                                       (long)want);
                        }
                    }
                }
            }
        free(x);
        free(out);
    }
    /* the modulo alone at the int64 ends and next to multiples: N=2, mult {1, 0} */
    for (int row = 0; row < NROWS; row++) {
        const int K = ROWK[row];
        int64_t vals[4096];
        int nv = 0;
        const int64_t ends[4] = {INT64_MIN, INT64_MAX, 0, -1};
        for (int e = 0; e < 4; e++) vals[nv++] = ends[e];
        for (int k = 0; k < K; k++) {
            const int64_t p = ROWS[row][k];
            const int64_t qs[5] = {INT64_MIN / p, INT64_MAX / p, 0, -1, 1};
            for (int qi = 0; qi < 5; qi++)
                for (int64_t d = -2; d <= 2; d++) {
                    __int128 v = (__int128)qs[qi] * p + d, v2 = v + p / 2;
                    if (v >= INT64_MIN && v <= INT64_MAX) vals[nv++] = (int64_t)v;
                    if (v2 >= INT64_MIN && v2 <= INT64_MAX) vals[nv++] = (int64_t)v2;
                }
        }
        int64_t mult[2] = {1, 0}, mods[9];
        double inv[9];
        int exact = 0;
        for (int k = 0; k < K; k++) {
            mods[k] = ROWS[row][k];
            inv[k] = 1.0 / (double)mods[k];
            exact |= mods[k] < 8192;
        }
        int64_t *out = malloc(sizeof(int64_t) * nv * K);
        if (engram_hash(vals, 1, nv, NULL, NULL, 0, 2, 1, K, mult, mods, inv, exact, 0, path, out))
            return FAILED_CALL;
        for (int i = 0; i < nv; i++)
            for (int k = 0; k < K; k++) {
                checked++;
                if (out[i * K + k] != floor_mod(vals[i], mods[k]) && bad++ < 10)
                    printf("edge row %d v %ld p %ld: %ld\n", row, (long)vals[i], (long)mods[k],
                           (long)out[i * K + k]);
            }
        free(out);
    }
    printf("path %d: %ld values checked\n", path, checked);
    return bad;
}
