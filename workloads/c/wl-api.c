/* wl-api.c: the callback interface through its C ABI (crest.h, libcrest.so).
 * Built and started by `wl-api --ctl DIR c-abi EXPECT`; speaks the workload
 * protocol itself (DIR/ready, DIR/go, DIR/result). Two signal-context
 * callbacks (reverse order, nested), one thread-context callback (on another
 * thread, allocating), a critical section, and the outcome against EXPECT. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#include "crest.h"

static volatile int events[64];
static volatile int nevents;
static volatile int sig_outcome = -1000, thread_outcome = -1000;
static volatile pid_t thread_tid;

static int sig_cb(void *arg) {
    int id = (int)(long)arg;
    if (nevents < 62) events[nevents++] = id * 10 + 1;
    int r = crest_checkpoint(CREST_CHECKPOINT_OK, NULL);
    if (nevents < 62) events[nevents++] = id * 10 + 2;
    sig_outcome = r;
    return 0;
}

static int thread_cb(void *arg) {
    (void)arg;
    thread_tid = (pid_t)syscall(SYS_gettid);
    char *text = malloc(64); /* anything goes on the callback thread */
    snprintf(text, 64, "thread callback in %d", (int)getpid());
    int r = crest_checkpoint(CREST_CHECKPOINT_OK, NULL);
    thread_outcome = strlen(text) > 0 ? r : -1;
    free(text);
    return 0;
}

static void put(const char *dir, const char *name, const char *text) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0 || rename(tmp, path) != 0) {
        perror(path);
        exit(3);
    }
}

static const char *word(int r) {
    return r == CREST_CONTINUE ? "continued" : r == CREST_RESTARTED ? "restarted" : "error";
}

int main(int argc, char **argv) {
    if (argc < 3 || strcmp(argv[1], "--ctl") != 0) {
        fprintf(stderr, "usage: %s --ctl DIR [EXPECT]\n", argv[0]);
        return 2;
    }
    const char *dir = argv[2];
    const char *expect = argc > 3 ? argv[3] : "any";
    if (crest_init() != 0 ||
        crest_register_callback(sig_cb, (void *)1L, CREST_SIGNAL_CONTEXT) < 0 ||
        crest_register_callback(sig_cb, (void *)2L, CREST_SIGNAL_CONTEXT) < 0 ||
        crest_register_callback(thread_cb, NULL, CREST_THREAD_CONTEXT) < 0) {
        fprintf(stderr, "setup failed: libcrest\n");
        return 2;
    }
    if (crest_checkpoint(CREST_CHECKPOINT_OK, NULL) != -EINVAL) {
        fprintf(stderr, "setup failed: crest_checkpoint outside a callback did not fail\n");
        return 2;
    }
    crest_enter_cs();
    crest_leave_cs();
    char pid[32];
    snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    put(dir, "ready", pid);
    char go[4096];
    snprintf(go, sizeof go, "%s/go", dir);
    while (access(go, F_OK) != 0) usleep(5000);

    char diffs[4096] = "";
    size_t n = 0;
    int want[4] = {21, 11, 12, 22};
    if (nevents < 4 || nevents % 4 != 0)
        n += snprintf(diffs + n, sizeof diffs - n, "signal callbacks logged %d halves, expected a multiple of 4\n", nevents);
    for (int i = 0; i + 3 < nevents && n < sizeof diffs - 200; i += 4)
        for (int j = 0; j < 4; j++)
            if (events[i + j] != want[j])
                n += snprintf(diffs + n, sizeof diffs - n, "signal callback order: event %d is %d, expected %d\n", i + j, events[i + j], want[j]);
    if (thread_tid == 0 || thread_tid == getpid())
        n += snprintf(diffs + n, sizeof diffs - n, "the thread callback ran on thread %d (main %d)\n", (int)thread_tid, (int)getpid());
    if (sig_outcome != thread_outcome)
        n += snprintf(diffs + n, sizeof diffs - n, "signal callback got %d, thread callback %d\n", sig_outcome, thread_outcome);
    if (strcmp(expect, "any") != 0 && strcmp(word(sig_outcome), expect) != 0)
        n += snprintf(diffs + n, sizeof diffs - n, "crest_checkpoint returned %s, expected %s\n", word(sig_outcome), expect);
    char outcome[32];
    snprintf(outcome, sizeof outcome, "%s\n", word(sig_outcome));
    put(dir, "outcome", outcome);
    if (n == 0) {
        put(dir, "result", "ok\n");
        return 0;
    }
    put(dir, "result", diffs);
    fputs(diffs, stderr);
    return 1;
}
