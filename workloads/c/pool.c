/* A C pthread worker pool for the conformance suite (wl-pool c-pthreads).
 *
 * N workers compute a checksum in rounds over a shared array: each hashes its
 * slice, waits at a barrier, worker 0 folds the partial sums into the running
 * checksum under a mutex, rewrites the array, signals a condition variable and
 * sleeps 1 ms; everyone waits at the barrier again. The pool runs until told
 * to stop, so a dump lands mid-computation with threads blocked in
 * pthread_barrier_wait, pthread_cond_wait, pthread_mutex_lock, nanosleep and
 * pthread_join. The result must equal pool_expected(rounds), the same
 * computation done serially.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define POOL_ELEMS 4096

static uint64_t data[POOL_ELEMS];
static uint64_t partial[64];
static uint64_t checksum;
static uint64_t rounds;
static int nworkers;
static volatile int stop_requested;
static int stopping;
static pthread_barrier_t barrier;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t progressed = PTHREAD_COND_INITIALIZER;
static pthread_t workers[64];
static pthread_t joiner;

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint64_t slice_sum(const uint64_t *d, int w, int n, uint64_t round) {
    uint64_t s = 0;
    for (int i = w; i < POOL_ELEMS; i += n)
        s += mix(d[i] + round);
    return s;
}

static void init_data(uint64_t *d) {
    for (int i = 0; i < POOL_ELEMS; i++)
        d[i] = (uint64_t)i * 2654435761u;
}

static void next_data(uint64_t *d, uint64_t sum) {
    for (int i = 0; i < POOL_ELEMS; i++)
        d[i] = mix(d[i] ^ sum);
}

static void *worker(void *arg) {
    int w = (int)(intptr_t)arg;
    for (;;) {
        partial[w] = slice_sum(data, w, nworkers, rounds);
        pthread_barrier_wait(&barrier);
        if (w == 0) {
            uint64_t sum = 0;
            for (int i = 0; i < nworkers; i++)
                sum += partial[i];
            pthread_mutex_lock(&lock);
            checksum = mix(checksum ^ sum);
            rounds++;
            next_data(data, sum);
            stopping = stop_requested;
            pthread_cond_broadcast(&progressed);
            pthread_mutex_unlock(&lock);
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
        pthread_barrier_wait(&barrier);
        if (stopping)
            return NULL;
    }
}

/* Joins worker 1 from its own thread: a thread blocked in pthread_join. */
static void *join_one(void *arg) {
    (void)arg;
    pthread_join(workers[1], NULL);
    return NULL;
}

int pool_start(int n) {
    if (n < 2 || n > 64)
        return -1;
    nworkers = n;
    init_data(data);
    if (pthread_barrier_init(&barrier, NULL, (unsigned)n))
        return -1;
    for (int i = 0; i < n; i++)
        if (pthread_create(&workers[i], NULL, worker, (void *)(intptr_t)i))
            return -1;
    if (pthread_create(&joiner, NULL, join_one, NULL))
        return -1;
    return 0;
}

/* Blocks in pthread_cond_wait until `target` rounds are done. */
void pool_wait_rounds(uint64_t target) {
    pthread_mutex_lock(&lock);
    while (rounds < target)
        pthread_cond_wait(&progressed, &lock);
    pthread_mutex_unlock(&lock);
}

/* Stops the pool, joins every thread, reports rounds done and the checksum. */
void pool_finish(uint64_t *rounds_out, uint64_t *checksum_out) {
    stop_requested = 1;
    pthread_join(joiner, NULL);
    for (int i = 0; i < nworkers; i++)
        if (i != 1)
            pthread_join(workers[i], NULL);
    *rounds_out = rounds;
    *checksum_out = checksum;
}

/* The same computation, serially. */
uint64_t pool_expected(int n, uint64_t nrounds) {
    uint64_t *d = malloc(sizeof(uint64_t) * POOL_ELEMS);
    uint64_t c = 0;
    if (!d)
        return 0;
    init_data(d);
    for (uint64_t r = 0; r < nrounds; r++) {
        uint64_t sum = 0;
        for (int w = 0; w < n; w++)
            sum += slice_sum(d, w, n, r);
        c = mix(c ^ sum);
        next_data(d, sum);
    }
    free(d);
    return c;
}
