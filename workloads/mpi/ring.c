/*
 * ring: the MPI job the conformance suite checkpoints (MPI-* requirements).
 *
 *   mpiexec -n P ring ITERATIONS SLEEP_MS [WORDS]
 *
 * Every iteration each rank passes a buffer of WORDS 64-bit words to its
 * right-hand neighbour (MPI_Sendrecv around the ring), folds what it received
 * into one number, and MPI_Allreduce sums those numbers over all ranks; the
 * sum goes into a running checksum. The result depends only on ITERATIONS,
 * WORDS and the number of ranks, never on timing, so an uninterrupted run with
 * SLEEP_MS 0 gives the checksum a checkpointed run must end with.
 *
 * Rank 0 prints "progress N" (every iteration, so the suite can tell the job
 * is mid-run) and at the end "checksum HEX iterations N ranks P". Every rank
 * checks that the allreduced checksum agrees with its own; a rank that
 * disagrees prints what it saw and the job exits 1.
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* splitmix64: a cheap, well-mixed deterministic step. */
static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc < 3) {
        if (rank == 0)
            fprintf(stderr, "usage: %s ITERATIONS SLEEP_MS [WORDS]\n", argv[0]);
        MPI_Finalize();
        return 2;
    }
    long iterations = atol(argv[1]);
    long pause = atol(argv[2]);
    long words = argc > 3 ? atol(argv[3]) : 512;
    if (iterations < 1 || pause < 0 || words < 1) {
        if (rank == 0)
            fprintf(stderr, "ring: bad arguments\n");
        MPI_Finalize();
        return 2;
    }
    uint64_t *out = malloc(words * sizeof *out);
    uint64_t *in = malloc(words * sizeof *in);
    if (!out || !in) {
        fprintf(stderr, "ring: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    for (long w = 0; w < words; w++)
        out[w] = mix(((uint64_t)rank << 32) ^ (uint64_t)w);

    int right = (rank + 1) % size, left = (rank + size - 1) % size;
    uint64_t checksum = 0;
    for (long i = 0; i < iterations; i++) {
        MPI_Sendrecv(out, (int)words, MPI_UINT64_T, right, 7, in, (int)words, MPI_UINT64_T,
                     left, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        uint64_t local = (uint64_t)i;
        for (long w = 0; w < words; w++) {
            local = mix(local ^ in[w]);
            /* What this rank sends next depends on what it received. */
            out[w] = mix(in[w] + (uint64_t)rank);
        }
        uint64_t sum = 0;
        MPI_Allreduce(&local, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
        checksum = mix(checksum ^ sum);
        if (rank == 0) {
            printf("progress %ld\n", i + 1);
            fflush(stdout);
        }
        if (pause > 0)
            sleep_ms(pause);
    }

    /* Every rank must hold the same checksum: compare with rank 0's. */
    uint64_t first = checksum;
    MPI_Bcast(&first, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    int bad = first != checksum, anybad = 0;
    if (bad)
        fprintf(stderr, "rank %d: checksum %016llx, rank 0 has %016llx\n", rank,
                (unsigned long long)checksum, (unsigned long long)first);
    MPI_Allreduce(&bad, &anybad, 1, MPI_INT, MPI_LOR, MPI_COMM_WORLD);
    if (rank == 0) {
        printf("checksum %016llx iterations %ld ranks %d\n", (unsigned long long)checksum,
               iterations, size);
        fflush(stdout);
    }
    free(out);
    free(in);
    MPI_Finalize();
    return anybad ? 1 : 0;
}
