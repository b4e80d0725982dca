/* This CPU's peak fp32 multiply-add throughput on N threads: the ceiling any MobileNet kernel runs under.
 *
 * Each thread keeps 12 independent vector accumulators busy with a*b+c, enough to cover the FMA latency
 * times the FMA units of current x86 and Arm cores, so the loop is bound by FMA throughput alone.
 * Built by FmaPeak in bench/compare.py (for compare.py and breakdown.py) with the system C compiler and
 * -O2 -march=native (GCC and Clang contract a*b+c into one FMA there); the vector width follows the widest
 * unit -march enables.
 *
 *     cc -O2 -march=native -pthread bench/fma_peak.c -o fma_peak && ./fma_peak 2
 *
 * Prints one line: GFLOP/s over all threads (a multiply-add counts as two).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#elif defined(__AVX__)
#define VECTOR_BYTES 32
#else
#define VECTOR_BYTES 16
#endif
#define LANES (VECTOR_BYTES / 4)
#define ACCUMULATORS 12

typedef float vec __attribute__((vector_size(VECTOR_BYTES)));

static long iterations;

static void *multiply_add(void *result) {
    vec acc[ACCUMULATORS], scale, shift;
    for (int lane = 0; lane < LANES; lane++) {
        scale[lane] = 0.999999f;
        shift[lane] = 1e-7f;
    }
    for (int i = 0; i < ACCUMULATORS; i++)
        for (int lane = 0; lane < LANES; lane++) acc[i][lane] = (float)i;
    for (long n = 0; n < iterations; n++) {
#pragma GCC unroll 12
        for (int i = 0; i < ACCUMULATORS; i++) acc[i] = acc[i] * scale + shift;
    }
    float sum = 0; /* used, so the compiler cannot drop the loop */
    for (int i = 0; i < ACCUMULATORS; i++) sum += acc[i][0];
    *(float *)result = sum;
    return NULL;
}

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    iterations = argc > 2 ? atol(argv[2]) : 300000000L;
    if (threads < 1 || threads > 256 || iterations < 1) {
        fprintf(stderr, "usage: fma_peak THREADS [ITERATIONS]\n");
        return 2;
    }
    pthread_t workers[256];
    float results[256];
    double start = seconds();
    for (int t = 0; t < threads; t++) pthread_create(&workers[t], NULL, multiply_add, &results[t]);
    for (int t = 0; t < threads; t++) pthread_join(workers[t], NULL);
    double elapsed = seconds() - start;
    double flops = 2.0 * threads * (double)iterations * ACCUMULATORS * LANES;
    printf("%.1f\n", flops / elapsed / 1e9);
    return 0;
}
