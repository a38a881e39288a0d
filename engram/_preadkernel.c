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
 *   4 NOWAIT_ONLY  stop after phases 1 and 2: the remembered jobs are left unread (their
 *             disk reads already queued by ADVISE) for the caller to finish later, e.g. on a
 *             prefetch thread; a partially copied job is remembered whole. Without RWF_NOWAIT
 *             every job is remembered.
 * A read that returns 0 bytes before `eof_ok_from` means the file is shorter than its header
 * said (truncated after it was opened): the call returns 1. At or past `eof_ok_from` (aligned
 * O_DIRECT spans that run past the end of the file) the rest of the job is simply not needed.
 *
 * Returns 0 on success, 1 on a truncated file, -errno on a failed read.
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
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define ENGRAM_NOWAIT 1
#define ENGRAM_ADVISE 2
#define ENGRAM_NOWAIT_ONLY 4

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
                      int64_t *counts, int64_t *scratch) {
    int64_t reads = 0, cached = 0, npend = 0;
    int nowait = (flags & ENGRAM_NOWAIT) != 0;
    int only = (flags & ENGRAM_NOWAIT_ONLY) != 0;
    counts[2] = 0;
    counts[3] = 0;
#ifndef RWF_NOWAIT
    nowait = 0;
#endif
    if (nowait) {
#ifdef RWF_NOWAIT
        for (int64_t i = 0; i < n; i++) {
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
