/* Batched positional I/O for kvdrive's disk tier: one call reads (or writes) many runs of
 * slots, each run one preadv (pwritev), on up to `threads` POSIX threads that take runs from
 * a shared counter. Called through ctypes, which releases the GIL for the whole batch, so
 * hundreds of transfers of a decode step cost the Python threads nothing per transfer.
 *
 * Run r moves iovecs [first[r], first[r+1]) from/to fds[r] at offsets[r]. status[r]:
 * 0 ok, -1 short transfer (EOF / no space), else the errno. nanos[r]: its latency in ns.
 *
 * With `hash` (the xxhash library's XXH3_64bits, passed in by address) the threads also
 * checksum the first `hash_len` bytes of each buffer: a write stores them in sums[i] before
 * its run is written; a read of a run that succeeded sets bad[i] where the hash of what
 * arrived differs from the expected sums[i]. Without it (NULL) the caller checksums.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 256
#define MAX_IOV 256 /* slots in one run: MAX_RUN_BYTES / ALIGN on the Python side */

typedef struct {
    int64_t n_runs;
    const int32_t *fds;
    const int64_t *offsets;
    const int64_t *first;
    const uint64_t *bases;
    const int64_t *lens;
    int32_t dontneed;
    int32_t write;
    uint64_t (*hash)(const void *, size_t);
    int64_t hash_len;
    uint64_t *sums;
    uint8_t *bad;
    int32_t *status;
    int64_t *nanos;
    int64_t next; /* next run to take (atomic) */
} batch_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int move_run(const batch_t *b, int64_t r) {
    struct iovec iov[MAX_IOV];
    int64_t lo = b->first[r], hi = b->first[r + 1], want = 0;
    if (hi - lo > MAX_IOV || hi <= lo) return EINVAL;
    if (b->hash && b->write)
        for (int64_t i = lo; i < hi; i++) b->sums[i] = b->hash((const void *)(uintptr_t)b->bases[i], (size_t)b->hash_len);
    for (int64_t i = lo; i < hi; i++) {
        iov[i - lo].iov_base = (void *)(uintptr_t)b->bases[i];
        iov[i - lo].iov_len = (size_t)b->lens[i];
        want += b->lens[i];
    }
    int64_t done = 0;
    int k = 0;
    while (done < want) { /* a short transfer that is not EOF is resumed, as preadv may split */
        ssize_t got = b->write ? pwritev(b->fds[r], iov + k, (int)(hi - lo - k), b->offsets[r] + done)
                               : preadv(b->fds[r], iov + k, (int)(hi - lo - k), b->offsets[r] + done);
        if (got < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (got == 0) return -1;
        done += got;
        while (k < hi - lo && (size_t)got >= iov[k].iov_len) got -= (ssize_t)iov[k++].iov_len;
        if (k < hi - lo) {
            iov[k].iov_base = (char *)iov[k].iov_base + got;
            iov[k].iov_len -= (size_t)got;
        }
    }
    if (b->dontneed) posix_fadvise(b->fds[r], b->offsets[r], want, POSIX_FADV_DONTNEED);
    if (b->hash && !b->write)
        for (int64_t i = lo; i < hi; i++)
            b->bad[i] = b->hash((const void *)(uintptr_t)b->bases[i], (size_t)b->hash_len) != b->sums[i];
    return 0;
}

static void *worker(void *arg) {
    batch_t *b = (batch_t *)arg;
    for (;;) {
        int64_t r = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (r >= b->n_runs) return NULL;
        int64_t t0 = now_ns();
        b->status[r] = move_run(b, r);
        b->nanos[r] = now_ns() - t0;
    }
}

/* Returns 0: the calling thread is worker 0, so the batch completes even if no thread starts
 * (then it runs at depth 1). Per-run outcomes are in status. */
int kvd_pio_batch(int64_t n_runs, const int32_t *fds, const int64_t *offsets, const int64_t *first,
                  const uint64_t *bases, const int64_t *lens, int32_t threads, int32_t dontneed, int32_t write,
                  uint64_t (*hash)(const void *, size_t), int64_t hash_len, uint64_t *sums, uint8_t *bad,
                  int32_t *status, int64_t *nanos) {
    batch_t b = {n_runs, fds, offsets, first, bases, lens, dontneed, write, hash, hash_len, sums, bad,
                 status, nanos, 0};
    pthread_t tid[MAX_THREADS];
    int n = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (n > n_runs) n = (int)n_runs;
    int started = 0;
    for (int i = 1; i < n; i++) { /* this thread is worker 0 */
        if (pthread_create(&tid[started], NULL, worker, &b) != 0) break;
        started++;
    }
    worker(&b);
    for (int i = 0; i < started; i++) pthread_join(tid[i], NULL);
    return 0;
}
