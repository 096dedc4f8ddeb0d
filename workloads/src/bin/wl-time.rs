//! Timers: an interval ITIMER_REAL, a timer_create timer, a timerfd.
//!
//! `wl-time --ctl DIR MODE`, MODE one of: itimer, itimer-all, posix-timer, timerfd.

use crest_workloads::support::{mode, read_available, sys};
use crest_workloads::{Checks, Ctl};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static TICKS: AtomicUsize = AtomicUsize::new(0);
static BAD_VALUE: AtomicUsize = AtomicUsize::new(0);

const TIMER_VALUE: usize = 1234;

extern "C" fn on_tick(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO.
    let code = unsafe { (*info).si_code };
    if code == libc::SI_TIMER {
        // SAFETY: as above; si_value is valid for SI_TIMER.
        let v = unsafe { (*info).si_value().sival_ptr as usize };
        if v != TIMER_VALUE {
            BAD_VALUE.store(v.max(1), Ordering::SeqCst);
        }
    }
    TICKS.fetch_add(1, Ordering::SeqCst);
}

fn install(sig: i32) {
    // SAFETY: act is fully initialised; the handler only touches atomics.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_tick as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        sys(
            libc::sigaction(sig, &act, std::ptr::null_mut()),
            "sigaction",
        );
    }
}

/// Blocks or unblocks `sig` in this (single-threaded) process.
fn block(sig: i32, on: bool) {
    // SAFETY: a sigset we fill ourselves.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        let how = if on {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        sys(
            libc::sigprocmask(how, &set, std::ptr::null_mut()),
            "sigprocmask",
        );
    }
}

/// Waits up to a second for the tick count to grow by `n`.
fn ticks_grow(n: usize) -> bool {
    let start = TICKS.load(Ordering::SeqCst);
    let t0 = Instant::now();
    while TICKS.load(Ordering::SeqCst) < start + n {
        if t0.elapsed() > Duration::from_secs(1) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// An itimer's value and interval, in microseconds.
fn itimer_us(which: libc::c_int) -> (i64, i64) {
    // SAFETY: it is a valid out pointer.
    let it = unsafe {
        let mut it: libc::itimerval = std::mem::zeroed();
        libc::getitimer(which, &mut it);
        it
    };
    let us = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
    (us(it.it_value), us(it.it_interval))
}

/// This process's CPU time (user + system).
fn cpu_time() -> Duration {
    // SAFETY: ru is a valid out pointer.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Spends `d` of CPU time in user space.
fn burn_cpu(d: Duration) {
    let start = cpu_time();
    let mut x = 1u64;
    while cpu_time() < start + d {
        for _ in 0..100_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
    }
}

fn tv_ms(t: libc::timeval) -> i64 {
    t.tv_sec * 1000 + t.tv_usec / 1000
}

fn ts_ms(t: libc::timespec) -> i64 {
    t.tv_sec * 1000 + t.tv_nsec / 1_000_000
}

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, _) = mode(&args);
    let mut c = Checks::new();
    match mode.as_str() {
        "itimer-all" => {
            // VIRTUAL and PROF armed far in the future (they count CPU time)
            // plus alarm(). Half a second of CPU is spent before `ready`, so
            // each has run a while: a restore that re-armed one with its
            // original value instead of what was left shows more left than
            // at `ready` (by that half second of CPU time, or of wall time
            // for alarm(), when the restore takes less than that).
            let long = libc::itimerval {
                it_interval: libc::timeval {
                    tv_sec: 100,
                    tv_usec: 0,
                },
                it_value: libc::timeval {
                    tv_sec: 1000,
                    tv_usec: 0,
                },
            };
            for which in [libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
                // SAFETY: long is valid.
                sys(
                    unsafe { libc::setitimer(which, &long, std::ptr::null_mut()) },
                    "setitimer",
                );
            }
            // SAFETY: alarm takes a plain value.
            unsafe { libc::alarm(3600) };
            burn_cpu(Duration::from_millis(500));
            let timers = [
                (libc::ITIMER_VIRTUAL, "ITIMER_VIRTUAL"),
                (libc::ITIMER_PROF, "ITIMER_PROF"),
                (libc::ITIMER_REAL, "alarm() (ITIMER_REAL)"),
            ];
            let at_ready: Vec<(i64, i64)> = timers.iter().map(|&(w, _)| itimer_us(w)).collect();
            let ready_at = Instant::now();
            ctl.ready();
            ctl.wait_for_go();
            let passed = ready_at.elapsed().as_micros() as i64;
            for (&(which, name), &(left0, _)) in timers.iter().zip(&at_ready) {
                let (left, interval) = itimer_us(which);
                if which == libc::ITIMER_REAL {
                    // Wall time: it can only have run down since `ready`, by
                    // at most the time that passed.
                    c.check(left <= left0 && left >= left0 - passed - 10_000, || {
                        format!("{name} has {left} µs left: {left0} µs were left at ready, {passed} µs ago")
                    });
                    continue;
                }
                c.eq(&format!("{name} interval (µs)"), interval, 100_000_000);
                // CPU time: the process spent little since `ready` (waiting
                // for go, the dump's calls in it). The kernel keeps these
                // timers in ticks: re-arming one with the value read back may
                // round it up by a tick per cycle.
                c.check(left <= left0 + 20_000 && left >= left0 - 1_000_000, || {
                    format!("{name} has {left} µs left: {left0} µs were left at ready (CPU time)")
                });
            }
        }
        "itimer" => {
            install(libc::SIGALRM);
            let it = libc::itimerval {
                it_interval: libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                },
                it_value: libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                },
            };
            // SAFETY: it is valid.
            sys(
                unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) },
                "setitimer",
            );
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: now is a valid out pointer.
            let now = unsafe {
                let mut now: libc::itimerval = std::mem::zeroed();
                libc::getitimer(libc::ITIMER_REAL, &mut now);
                now
            };
            c.eq("ITIMER_REAL interval (ms)", tv_ms(now.it_interval), 50);
            c.check(tv_ms(now.it_value) <= 50, || {
                format!("ITIMER_REAL value {} ms > interval", tv_ms(now.it_value))
            });
            c.check(ticks_grow(3), || "ITIMER_REAL stopped firing".into());
        }
        "posix-timer" => {
            install(libc::SIGUSR1);
            // SIGUSR1 stays blocked until `go`: the timer's signal then sits
            // pending (the outside view sees the same thing before and after,
            // never a handler half-run) and must be carried across too.
            block(libc::SIGUSR1, true);
            let create = |clock: libc::clockid_t, notify: i32, value: usize| {
                // SAFETY: sev is fully initialised; timer receives the new id.
                unsafe {
                    let mut sev: libc::sigevent = std::mem::zeroed();
                    sev.sigev_notify = notify;
                    sev.sigev_signo = libc::SIGUSR1;
                    sev.sigev_value = libc::sigval {
                        sival_ptr: value as *mut libc::c_void,
                    };
                    let mut timer: libc::timer_t = std::ptr::null_mut();
                    sys(
                        libc::timer_create(clock, &mut sev, &mut timer),
                        "timer_create",
                    );
                    timer
                }
            };
            let arm = |timer: libc::timer_t, interval_ms: i64, value_ms: i64| {
                let ts = |ms: i64| libc::timespec {
                    tv_sec: ms / 1000,
                    tv_nsec: (ms % 1000) * 1_000_000,
                };
                let spec = libc::itimerspec {
                    it_interval: ts(interval_ms),
                    it_value: ts(value_ms),
                };
                // SAFETY: spec is valid; timer came from timer_create.
                sys(
                    unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) },
                    "timer_settime",
                );
            };
            // Three timers, the middle one deleted: the others keep their IDs
            // across the gap. One periodic, one far in the future without a signal.
            let ticking = create(libc::CLOCK_MONOTONIC, libc::SIGEV_SIGNAL, TIMER_VALUE);
            let gap = create(libc::CLOCK_MONOTONIC, libc::SIGEV_SIGNAL, 0);
            let quiet = create(libc::CLOCK_REALTIME, libc::SIGEV_NONE, 0);
            // SAFETY: gap came from timer_create.
            sys(unsafe { libc::timer_delete(gap) }, "timer_delete");
            arm(ticking, 20, 20);
            arm(quiet, 0, 1_000_000);
            // Let the first expiry happen: its signal is now pending.
            std::thread::sleep(Duration::from_millis(60));
            ctl.ready();
            ctl.wait_for_go();
            let get = |timer: libc::timer_t| {
                // SAFETY: cur is a valid out pointer.
                unsafe {
                    let mut cur: libc::itimerspec = std::mem::zeroed();
                    let r = libc::timer_gettime(timer, &mut cur);
                    (r, std::io::Error::last_os_error(), cur)
                }
            };
            let (r, e, cur) = get(ticking);
            c.check(r == 0, || {
                format!("timer_gettime on the periodic timer's original id: {e}")
            });
            c.eq("periodic timer interval (ms)", ts_ms(cur.it_interval), 20);
            let (r, e, cur) = get(quiet);
            c.check(r == 0, || {
                format!("timer_gettime on the quiet timer's original id: {e}")
            });
            let left = ts_ms(cur.it_value);
            c.check(left > 990_000 && left <= 1_000_000, || {
                format!("quiet timer has {left} ms left, expected just under 1000 s")
            });
            let (r, _, _) = get(gap);
            c.check(r < 0, || "the deleted timer's id is a timer again".into());
            let before = TICKS.load(Ordering::SeqCst);
            block(libc::SIGUSR1, false);
            c.check(TICKS.load(Ordering::SeqCst) > before, || {
                "no timer signal was pending when SIGUSR1 was unblocked".into()
            });
            c.check(ticks_grow(3), || "the timer stopped firing".into());
            c.eq(
                "sigev_value of the timer's signals (0 = all right)",
                BAD_VALUE.load(Ordering::SeqCst),
                0,
            );
        }
        "timerfd" => {
            let make =
                |clock: libc::clockid_t, flags: i32, interval_ms: i64, value: libc::timespec| {
                    let spec = libc::itimerspec {
                        it_interval: libc::timespec {
                            tv_sec: interval_ms / 1000,
                            tv_nsec: (interval_ms % 1000) * 1_000_000,
                        },
                        it_value: value,
                    };
                    // SAFETY: plain values; spec is valid.
                    unsafe {
                        let fd = sys(
                            libc::timerfd_create(clock, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC),
                            "timerfd_create",
                        );
                        sys(
                            libc::timerfd_settime(fd, flags, &spec, std::ptr::null_mut()),
                            "timerfd_settime",
                        );
                        fd
                    }
                };
            let ms = |ms: i64| libc::timespec {
                tv_sec: ms / 1000,
                tv_nsec: (ms % 1000) * 1_000_000,
            };
            // A relative periodic timer, ticking.
            let ticking = make(libc::CLOCK_MONOTONIC, 0, 10, ms(10));
            // An absolute CLOCK_REALTIME timer 1000 s ahead, cancelled should
            // the clock be set: restored absolute, with both flags.
            // SAFETY: now is a valid out pointer.
            let now = unsafe {
                let mut now: libc::timespec = std::mem::zeroed();
                libc::clock_gettime(libc::CLOCK_REALTIME, &mut now);
                now
            };
            let abs_flags = libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET;
            let absolute = make(
                libc::CLOCK_REALTIME,
                abs_flags,
                0,
                libc::timespec {
                    tv_sec: now.tv_sec + 1000,
                    tv_nsec: now.tv_nsec,
                },
            );
            // A one-shot timer that already expired, its expiration unread.
            let expired = make(libc::CLOCK_MONOTONIC, 0, 0, ms(1));
            std::thread::sleep(Duration::from_millis(20));
            ctl.ready();
            ctl.wait_for_go();
            let get = |fd: i32| {
                // SAFETY: cur is a valid out pointer.
                unsafe {
                    let mut cur: libc::itimerspec = std::mem::zeroed();
                    libc::timerfd_gettime(fd, &mut cur);
                    cur
                }
            };
            let count = |fd: i32| {
                let (b, _) = read_available(fd);
                b.get(..8)
                    .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
                    .unwrap_or(0)
            };
            c.eq("timerfd interval (ms)", ts_ms(get(ticking).it_interval), 10);
            let _ = count(ticking);
            std::thread::sleep(Duration::from_millis(50));
            let n = count(ticking);
            c.check(n >= 1, || {
                format!("the timerfd counted {n} expirations in 50 ms")
            });
            let left = ts_ms(get(absolute).it_value);
            c.check(left > 990_000 && left <= 1_000_000, || {
                format!("the absolute timerfd has {left} ms left, expected just under 1000 s")
            });
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{absolute}"))
                .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("settime flags:"))
                .and_then(|v| i32::from_str_radix(v.trim(), 8).ok());
            c.eq(
                "the absolute timerfd's settime flags",
                flags,
                Some(abs_flags),
            );
            c.eq(
                "unread expirations of the expired one-shot timerfd",
                count(expired),
                1,
            );
        }
        other => {
            eprintln!("wl-time: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}
