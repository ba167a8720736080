/* A C program with a known call chain, built twice by the tests: with frame pointers and no
 * unwind tables (-fno-omit-frame-pointer -fno-asynchronous-unwind-tables -fno-unwind-tables),
 * and without frame pointers but with .eh_frame (-fomit-frame-pointer). Both must unwind to
 * main. Runs for argv[1] seconds of its own CPU time (so that a recording gets as many samples
 * on a busy machine as on an idle one), prints "ready" first. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile unsigned long sink;

__attribute__((noinline)) void leaf_busy(unsigned long n) {
    unsigned long s = 0;
    for (unsigned long i = 0; i < n; i++) s += i * i % 7;
    sink = s;
}

__attribute__((noinline)) void level2(unsigned long n) { leaf_busy(n); sink++; }
__attribute__((noinline)) void level1(unsigned long n) { level2(n); sink++; }

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 3.0;
    struct timespec t0, t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
    printf("ready\n");
    fflush(stdout);
    do {
        level1(2000000);
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    } while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < secs);
    return 0;
}
