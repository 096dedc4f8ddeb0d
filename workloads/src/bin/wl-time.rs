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
            // VIRTUAL and PROF armed far in the future (they count CPU time,
            // which an idle workload barely uses) plus alarm(): all must keep
            // their settings.
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
            ctl.ready();
            ctl.wait_for_go();
            for (which, name) in [
                (libc::ITIMER_VIRTUAL, "ITIMER_VIRTUAL"),
                (libc::ITIMER_PROF, "ITIMER_PROF"),
            ] {
                // SAFETY: now is a valid out pointer.
                let now = unsafe {
                    let mut now: libc::itimerval = std::mem::zeroed();
                    libc::getitimer(which, &mut now);
                    now
                };
                c.eq(
                    &format!("{name} interval (ms)"),
                    tv_ms(now.it_interval),
                    100_000,
                );
                let left = tv_ms(now.it_value);
                // The kernel keeps CPU-time timers in ticks: re-arming one
                // with the value read back may round it up by a tick per cycle.
                c.check(left > 990_000 && left <= 1_000_100, || {
                    format!("{name} value {left} ms, expected about 1000 s")
                });
            }
            // SAFETY: alarm(0) cancels and returns the seconds that were left.
            let left = unsafe { libc::alarm(0) };
            c.check(left > 3500 && left <= 3600, || {
                format!("alarm() had {left} s left, expected just under 3600")
            });
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
            // SAFETY: sev is fully initialised; timer receives the new id.
            let timer = unsafe {
                let mut sev: libc::sigevent = std::mem::zeroed();
                sev.sigev_notify = libc::SIGEV_SIGNAL;
                sev.sigev_signo = libc::SIGUSR1;
                sev.sigev_value = libc::sigval {
                    sival_ptr: TIMER_VALUE as *mut libc::c_void,
                };
                let mut timer: libc::timer_t = std::ptr::null_mut();
                sys(
                    libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer),
                    "timer_create",
                );
                let spec = libc::itimerspec {
                    it_interval: libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 20_000_000,
                    },
                    it_value: libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 20_000_000,
                    },
                };
                sys(
                    libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()),
                    "timer_settime",
                );
                timer
            };
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: cur is a valid out pointer; the id is the one timer_create gave.
            let (r, cur) = unsafe {
                let mut cur: libc::itimerspec = std::mem::zeroed();
                (libc::timer_gettime(timer, &mut cur), cur)
            };
            c.check(r == 0, || {
                format!(
                    "timer_gettime on the original timer id: {}",
                    std::io::Error::last_os_error()
                )
            });
            c.eq("timer interval (ms)", ts_ms(cur.it_interval), 20);
            c.check(ticks_grow(3), || "the timer stopped firing".into());
            c.eq(
                "sigev_value of the timer's signals (0 = all right)",
                BAD_VALUE.load(Ordering::SeqCst),
                0,
            );
        }
        "timerfd" => {
            // SAFETY: plain values; spec is valid.
            let fd = unsafe {
                let fd = sys(
                    libc::timerfd_create(
                        libc::CLOCK_MONOTONIC,
                        libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                    ),
                    "timerfd_create",
                );
                let spec = libc::itimerspec {
                    it_interval: libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 10_000_000,
                    },
                    it_value: libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 10_000_000,
                    },
                };
                sys(
                    libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()),
                    "timerfd_settime",
                );
                fd
            };
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: cur is a valid out pointer.
            let cur = unsafe {
                let mut cur: libc::itimerspec = std::mem::zeroed();
                libc::timerfd_gettime(fd, &mut cur);
                cur
            };
            c.eq("timerfd interval (ms)", ts_ms(cur.it_interval), 10);
            let _ = read_available(fd);
            std::thread::sleep(Duration::from_millis(50));
            let (b, _) = read_available(fd);
            let n = b
                .get(..8)
                .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
                .unwrap_or(0);
            c.check(n >= 1, || {
                format!("the timerfd counted {n} expirations in 50 ms")
            });
        }
        other => {
            eprintln!("wl-time: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}
