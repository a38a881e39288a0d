/* Batched positional reads for the row reader (engram.store.pread), one call per request.
 *
 * A request is a list of jobs (file offset, byte count, offset in the destination buffer), sorted
 * by file offset. engram_pread_jobs reads them all in one call, so the Python caller releases the
 * GIL once per request instead of once per row (ctypes releases it for the call): a background
 * prefetch thread reading a step's rows then never waits for the model thread to hand the GIL
 * back between two rows.
 *
 * Phases (flags):
 *   1 NOWAIT  try every job with preadv2(RWF_NOWAIT): a job whose bytes are in the page cache is
 *             copied at once; the others are remembered (a filesystem that refuses the flag turns
 *             the phase off and says so in counts[2]).
 *   2 ADVISE  posix_fadvise(POSIX_FADV_WILLNEED) on every remembered job, so the kernel queues
 *             their disk reads together (queue depth = the request's misses)...
 *   then      ...blocking pread of every remembered job, in file order (short reads continue).
 *   4 NOWAIT_ONLY  stop after phases 1 and 2 (the caller leaves ADVISE out if this thread
 *             must not wait on the disk): the remembered jobs are left unread for the caller to
 *             finish later, e.g. on a prefetch thread; a partially copied job is remembered
 *             whole. Without RWF_NOWAIT every job is remembered.
 *   8 PROBE   before phase 1 tries a job, ask mincore() on `map` (a read-only mapping of the
 *             file, never touched) whether all of its pages are in the page cache, and remember
 *             the job unread if not. RWF_NOWAIT alone is not enough for a thread that must never
 *             wait on the disk: on a page-cache miss Linux starts the read (synchronous
 *             read-ahead) before it returns EAGAIN, and submitting I/O can block.
 * A read that returns 0 bytes before `eof_ok_from` means the file is shorter than its header
 * said (truncated after it was opened): the call returns 1. At or past `eof_ok_from` (aligned
 * O_DIRECT spans that run past the end of the file) the rest of the job is simply not needed.
 *
 * Returns 0 on success, 1 on a truncated file, -errno on a failed read. `map` (PROBE) may be NULL.
 * counts: [0] reads that returned data, [1] jobs served whole without blocking, [2] 1 if the
 * filesystem refused RWF_NOWAIT, [3] jobs remembered. `scratch` holds n int64 (the remembered
 * jobs, in order: with NOWAIT_ONLY, the jobs the caller still has to read).
 *
 * Loaded with ctypes; PyInit exists only so that the build system treats this file as an
 * ordinary (optional) extension module. Without a compiler engram.store.pread reads in Python.
 */
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define ENGRAM_NOWAIT 1
#define ENGRAM_ADVISE 2
#define ENGRAM_NOWAIT_ONLY 4
#define ENGRAM_PROBE 8

/* Whether every page of [off, off + len) of the file mapped at `map` is in the page cache. */
static int resident(const char *map, int64_t off, int64_t len) {
    static long page = 0;
    if (!page) page = sysconf(_SC_PAGESIZE);
    int64_t first = off / page * page, end = off + len;
    unsigned char vec[64];
    while (first < end) {
        int64_t span = end - first;
        if (span > 64 * page) span = 64 * page;
        if (mincore((void *)(map + first), (size_t)span, vec) != 0) return 0;
        int64_t np = (span + page - 1) / page;
        for (int64_t k = 0; k < np; k++)
            if (!(vec[k] & 1)) return 0;
        first += span;
    }
    return 1;
}

/* A read-only shared mapping of the first `size` bytes of `fd`, for `resident` only (never
 * read through); NULL on failure. */
void *engram_map_file(int fd, int64_t size) {
    void *p = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int engram_unmap_file(void *addr, int64_t size) { return munmap(addr, (size_t)size); }

/* out[i] = 1 if every page of [off[i], off[i] + len) is in the page cache (mincore on `map`,
 * which is never read through, so nothing is read from storage); returns how many are. */
int64_t engram_resident(const char *map, int64_t n, const int64_t *off, int64_t len,
                        uint8_t *out) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        out[i] = (uint8_t)resident(map, off[i], len);
        count += out[i];
    }
    return count;
}

static int read_fully(int fd, int64_t off, int64_t len, char *dst, int64_t eof_ok_from,
                      int64_t *reads) {
    while (len > 0) {
        ssize_t got = pread(fd, dst, (size_t)len, (off_t)off);
        if (got < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (got == 0) return off >= eof_ok_from ? 0 : 1;
        *reads += 1;
        off += got;
        len -= got;
        dst += got;
    }
    return 0;
}

int engram_pread_jobs(int fd, int64_t n, const int64_t *off, const int64_t *len,
                      const int64_t *at, char *buf, int flags, int64_t eof_ok_from,
                      int64_t *counts, int64_t *scratch, const char *map) {
    int64_t reads = 0, cached = 0, npend = 0;
    int nowait = (flags & ENGRAM_NOWAIT) != 0;
    int only = (flags & ENGRAM_NOWAIT_ONLY) != 0;
    int probe = (flags & ENGRAM_PROBE) != 0 && map != NULL;
    counts[2] = 0;
    counts[3] = 0;
#ifndef RWF_NOWAIT
    nowait = 0;
#endif
    if (nowait) {
#ifdef RWF_NOWAIT
        for (int64_t i = 0; i < n; i++) {
            if (probe && !resident(map, off[i], len[i])) {
                scratch[npend++] = i;
                continue;
            }
            struct iovec iov = {buf + at[i], (size_t)len[i]};
            ssize_t got = preadv2(fd, &iov, 1, (off_t)off[i], RWF_NOWAIT);
            if (got < 0 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
                counts[2] = 1; /* not supported here: read everything the blocking way */
                for (int64_t j = i; j < n; j++) scratch[npend++] = j;
                break;
            }
            if (got == len[i]) {
                reads++;
                cached++;
                continue;
            }
            if (got > 0 && only) { /* a partial copy: the caller reads the whole job later */
                reads++;
                scratch[npend++] = i;
                continue;
            }
            if (got > 0) { /* a partial copy: finish it the blocking way */
                reads++;
                int rc = read_fully(fd, off[i] + got, len[i] - got, buf + at[i] + got,
                                    eof_ok_from, &reads);
                if (rc) return rc;
                continue;
            }
            if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return -errno;
            scratch[npend++] = i;
        }
#endif
    } else {
        for (int64_t i = 0; i < n; i++) scratch[i] = i;
        npend = n;
    }
    if ((flags & ENGRAM_ADVISE) && (npend > 1 || (only && npend > 0)))
        for (int64_t k = 0; k < npend; k++)
            (void)posix_fadvise(fd, (off_t)off[scratch[k]], (off_t)len[scratch[k]],
                                POSIX_FADV_WILLNEED);
    counts[3] = npend;
    if (only) {
        counts[0] = reads;
        counts[1] = cached;
        return 0;
    }
    for (int64_t k = 0; k < npend; k++) {
        int64_t i = scratch[k];
        int rc = read_fully(fd, off[i], len[i], buf + at[i], eof_ok_from, &reads);
        if (rc) return rc;
    }
    counts[0] = reads;
    counts[1] = cached;
    return 0;
}

static struct PyModuleDef engram_preadkernel_module = {
    PyModuleDef_HEAD_INIT, "_preadkernel",
    "Batched positional reads; call engram_pread_jobs through ctypes.", -1, NULL,
};

PyMODINIT_FUNC PyInit__preadkernel(void) { return PyModule_Create(&engram_preadkernel_module); }
