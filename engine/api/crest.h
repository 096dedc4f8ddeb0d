/* crest.h: the callback interface of crest, after BLCR's libcr.
 *
 * Link with -lcrest (libcrest.so, built by `cargo build -p crest-api`).
 * A process that never calls crest_init() (or registers no callback) is
 * checkpointed transparently. Once it has, `crest dump` runs its callbacks
 * before it freezes the process (within --callback-timeout) and tells them
 * afterwards whether the process continues or was restarted.
 *
 * The library starts two threads, "crest-ctl" (listens on the abstract unix
 * socket @crest-api.PID) and "crest-cb" (runs thread-context callbacks), and
 * uses the signal crest_signal() (SIGRTMAX-1) for signal-context callbacks.
 */
#ifndef CREST_H
#define CREST_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Where a callback runs (crest_register_callback's flags). */
#define CREST_SIGNAL_CONTEXT 1 /* in a signal handler on the registering thread:
                                  async-signal-safe functions only */
#define CREST_THREAD_CONTEXT 2 /* on the library's crest-cb thread: anything */

/* crest_checkpoint's flags. */
#define CREST_CHECKPOINT_OK 0
#define CREST_CHECKPOINT_TEMP_FAILURE 1 /* refuse this checkpoint; try later */
#define CREST_CHECKPOINT_PERM_FAILURE 2 /* refuse: cannot be checkpointed */

/* crest_checkpoint's and crest_request_checkpoint's answers (errors are -errno). */
#define CREST_CONTINUE 0  /* the original process, running on after the dump */
#define CREST_RESTARTED 1 /* a process restored from the image */

typedef int (*crest_callback_t)(void *arg);

/* Starts the library; idempotent. A forked child calls it again (it inherits
 * no callbacks). Returns 0 or -errno. */
int crest_init(void);

/* The signal the library uses for signal-context callbacks. */
int crest_signal(void);

/* Registers cb(arg) for every checkpoint (initialises the library if needed).
 * Callbacks of one kind (and, for signal context, of one thread) are nested:
 * the last registered runs first, and its crest_checkpoint() runs the others.
 * Returns an id >= 0 or -errno. */
int crest_register_callback(crest_callback_t cb, void *arg, int flags);
int crest_unregister_callback(int id);

/* Inside a callback, once: with CREST_CHECKPOINT_OK lets the checkpoint go on
 * and returns when it is over: CREST_CONTINUE, CREST_RESTARTED, or -ECANCELED
 * if it failed or was refused. With a failure flag, refuses it: `crest dump`
 * fails naming the process and `reason` (may be NULL), the process runs on,
 * and this returns -ECANCELED. Outside a callback: -EINVAL. */
int crest_checkpoint(int flags, const char *reason);

/* Critical sections: a checkpoint waits until the last one is left; while a
 * checkpoint runs, crest_enter_cs() waits. Never inside a callback. */
void crest_enter_cs(void);
void crest_leave_cs(void);

/* Checkpoints this process into dir (`crest dump -t PID -D dir
 * --leave-running`, crest found via $CREST_BIN or PATH) and waits at most
 * timeout_secs. Returns CREST_CONTINUE in the original, CREST_RESTARTED in a
 * process restored from dir, or -errno with crest's message in err. */
int crest_request_checkpoint(const char *dir, int timeout_secs, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* CREST_H */
