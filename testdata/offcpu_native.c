/* Threads whose uses of wall time are known, for `perfpy record --off-cpu` on a native program
 * (tests/it/offcpu.rs): the C twin of offcpu_target.py, kernel and native frames only. Each thread
 * runs its function for argv[1] seconds, and that function waits for one thing only:
 *   compute_locked  computes ~10 ms holding a mutex, then ~2 ms without: on the CPU, or
 *                   waiting for the mutex (lock)
 *   lock_wait       takes the mutex for a moment, again and again: mostly waiting for it (lock)
 *   nap             nanosleep 30 ms (sleep)
 *   read_pipe       reads a pipe a helper thread writes a byte to every 30 ms (I/O read)
 * Each measures itself over its function: wall time (CLOCK_MONOTONIC), CPU time
 * (CLOCK_THREAD_CPUTIME_ID) and time runnable but not running (run_delay, from
 * /proc/thread-self/schedstat); the rest it was blocked on its one thing. At the end one line
 * per thread goes to argv[2]:  TID ROLE WALL CPU RUNQ  (ns). Prints "ready" first.
 * Build: cc -O1 -pthread offcpu_native.c */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double seconds;
static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static int pipe_fds[2];
static volatile int running = 1;
static volatile unsigned long sink;

static long long ns(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

struct meter {
    const char *role;
    void (*f)(struct meter *);
    long tid;
    long long start[3], end[3], until;
};

/* wall, CPU, run_delay now */
static void now(long long v[3]) {
    char buf[128] = {0};
    int fd = open("/proc/thread-self/schedstat", O_RDONLY);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
    if (fd >= 0)
        close(fd);
    long long run = 0, delay = 0;
    if (n > 0)
        sscanf(buf, "%lld %lld", &run, &delay);
    v[0] = ns(CLOCK_MONOTONIC);
    v[1] = ns(CLOCK_THREAD_CPUTIME_ID);
    v[2] = delay;
}

static void busy(long long cpu_ns) {
    long long until = ns(CLOCK_THREAD_CPUTIME_ID) + cpu_ns;
    while (ns(CLOCK_THREAD_CPUTIME_ID) < until)
        for (int i = 0; i < 1000; i++)
            sink += i * i % 7;
}

__attribute__((noinline)) static void compute_locked(struct meter *m) {
    while (ns(CLOCK_MONOTONIC) < m->until) {
        pthread_mutex_lock(&mutex);
        busy(10000000);
        pthread_mutex_unlock(&mutex);
        busy(2000000);
    }
}

__attribute__((noinline)) static void lock_wait(struct meter *m) {
    while (ns(CLOCK_MONOTONIC) < m->until) {
        pthread_mutex_lock(&mutex);
        sink++;
        pthread_mutex_unlock(&mutex);
    }
}

__attribute__((noinline)) static void nap(struct meter *m) {
    struct timespec d = {0, 30000000};
    while (ns(CLOCK_MONOTONIC) < m->until)
        nanosleep(&d, NULL);
}

__attribute__((noinline)) static void read_pipe(struct meter *m) {
    char c;
    while (ns(CLOCK_MONOTONIC) < m->until)
        if (read(pipe_fds[0], &c, 1) != 1)
            break;
}

static void *pace(void *unused) {
    struct timespec d = {0, 30000000};
    (void)unused;
    while (running) {
        nanosleep(&d, NULL);
        if (write(pipe_fds[1], "x", 1) != 1)
            break;
    }
    return NULL;
}

static void *run(void *arg) {
    struct meter *m = arg;
    m->tid = syscall(SYS_gettid);
    now(m->start);
    m->until = m->start[0] + (long long)(seconds * 1e9);
    m->f(m);
    now(m->end);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s SECONDS REPORT\n", argv[0]);
        return 2;
    }
    seconds = atof(argv[1]);
    if (pipe(pipe_fds))
        return 1;
    pthread_t helper, t[4];
    struct meter m[4] = {
        {.role = "compute_locked", .f = compute_locked},
        {.role = "lock_wait", .f = lock_wait},
        {.role = "nap", .f = nap},
        {.role = "read_pipe", .f = read_pipe},
    };
    pthread_create(&helper, NULL, pace, NULL);
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, run, &m[i]);
    printf("ready\n");
    fflush(stdout);
    FILE *f = fopen(argv[2], "w");
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        fprintf(f, "%ld %s %lld %lld %lld\n", m[i].tid, m[i].role, m[i].end[0] - m[i].start[0],
                m[i].end[1] - m[i].start[1], m[i].end[2] - m[i].start[2]);
    }
    fclose(f);
    running = 0;
    pthread_join(helper, NULL);
    return 0;
}
