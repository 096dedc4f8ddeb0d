//! Signal state: handlers (flags, masks, SIG_IGN), pending standard and
//! queued RT signals with their values, sigaltstack.
//!
//! `wl-sig --ctl DIR MODE`, MODE one of: handlers, pending, altstack.

use crest_workloads::support::{mode, sys};
use crest_workloads::{Checks, Ctl};
use std::sync::atomic::{AtomicUsize, Ordering};

static HITS: AtomicUsize = AtomicUsize::new(0);
static ALT_ADDR: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    HITS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_alt(_sig: libc::c_int) {
    let local = 0u8;
    ALT_ADDR.store(&local as *const u8 as usize, Ordering::SeqCst);
}

fn query(sig: i32) -> libc::sigaction {
    // SAFETY: old is a valid out pointer; a null new action only queries.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old);
        old
    }
}

fn install(sig: i32, handler: usize, flags: i32, mask: &[i32]) {
    // SAFETY: act is fully initialised; the handlers are async-signal-safe.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler;
        act.sa_flags = flags;
        libc::sigemptyset(&mut act.sa_mask);
        for &m in mask {
            libc::sigaddset(&mut act.sa_mask, m);
        }
        sys(
            libc::sigaction(sig, &act, std::ptr::null_mut()),
            "sigaction",
        );
    }
}

fn mask_of(a: &libc::sigaction) -> Vec<i32> {
    // SAFETY: sa_mask is a valid sigset.
    (1..65)
        .filter(|&s| unsafe { libc::sigismember(&a.sa_mask, s) } == 1)
        .collect()
}

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, _) = mode(&args);
    let mut c = Checks::new();
    match mode.as_str() {
        "handlers" => {
            let h = on_signal as *const () as usize;
            install(
                libc::SIGUSR1,
                h,
                libc::SA_SIGINFO | libc::SA_RESTART,
                &[libc::SIGUSR2, libc::SIGTERM],
            );
            install(
                libc::SIGHUP,
                h,
                libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER,
                &[],
            );
            install(libc::SIGUSR2, libc::SIG_IGN, 0, &[]);
            let before: Vec<(usize, i32, Vec<i32>, usize)> =
                [libc::SIGUSR1, libc::SIGHUP, libc::SIGUSR2, libc::SIGINT]
                    .iter()
                    .map(|&s| {
                        let a = query(s);
                        (
                            a.sa_sigaction,
                            a.sa_flags,
                            mask_of(&a),
                            a.sa_restorer.map(|f| f as usize).unwrap_or(0),
                        )
                    })
                    .collect();
            ctl.ready();
            ctl.wait_for_go();
            for (i, &s) in [libc::SIGUSR1, libc::SIGHUP, libc::SIGUSR2, libc::SIGINT]
                .iter()
                .enumerate()
            {
                let a = query(s);
                let now = (
                    a.sa_sigaction,
                    a.sa_flags,
                    mask_of(&a),
                    a.sa_restorer.map(|f| f as usize).unwrap_or(0),
                );
                c.eq(
                    &format!("sigaction of signal {s} (handler, flags, mask, restorer)"),
                    &now,
                    &before[i],
                );
            }
            // SAFETY: raising signals whose handlers we installed (SIGUSR2 ignored).
            unsafe {
                libc::raise(libc::SIGUSR1);
                libc::raise(libc::SIGUSR2);
                libc::raise(libc::SIGHUP);
            }
            c.eq("handler runs", HITS.load(Ordering::SeqCst), 2);
            c.eq(
                "SIGHUP handler reset after one delivery (SA_RESETHAND)",
                query(libc::SIGHUP).sa_sigaction,
                libc::SIG_DFL,
            );
        }
        "pending" => {
            let rt = libc::SIGRTMIN() + 1;
            // SAFETY: set is initialised; sigqueue takes plain values.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::sigaddset(&mut set, rt);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), libc::SIGUSR1);
                for v in [11usize, 22, 33] {
                    sys(
                        libc::sigqueue(
                            libc::getpid(),
                            rt,
                            libc::sigval {
                                sival_ptr: v as *mut libc::c_void,
                            },
                        ),
                        "sigqueue",
                    );
                }
            }
            ctl.ready();
            ctl.wait_for_go();
            let mut got = Vec::new();
            // SAFETY: set and info are valid; a zero timeout polls.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::sigaddset(&mut set, rt);
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                loop {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    let s = libc::sigtimedwait(&set, &mut info, &ts);
                    if s < 0 {
                        break;
                    }
                    let val = if s == rt {
                        info.si_value().sival_ptr as usize
                    } else {
                        0
                    };
                    got.push((s, val, info.si_code));
                }
            }
            let want = vec![
                (libc::SIGUSR1, 0, libc::SI_USER),
                (rt, 11, libc::SI_QUEUE),
                (rt, 22, libc::SI_QUEUE),
                (rt, 33, libc::SI_QUEUE),
            ];
            c.eq(
                "pending signals (signal, value, si_code) in order",
                got,
                want,
            );
        }
        "altstack" => {
            let size = 64 * 1024;
            let stack = vec![0u8; size].leak();
            let ss = libc::stack_t {
                ss_sp: stack.as_mut_ptr().cast(),
                ss_flags: 0,
                ss_size: size,
            };
            // SAFETY: ss describes a leaked buffer that lives forever.
            sys(
                unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) },
                "sigaltstack",
            );
            install(
                libc::SIGUSR1,
                on_alt as *const () as usize,
                libc::SA_ONSTACK,
                &[],
            );
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: old is a valid out pointer.
            let old = unsafe {
                let mut old: libc::stack_t = std::mem::zeroed();
                libc::sigaltstack(std::ptr::null(), &mut old);
                old
            };
            c.eq(
                "sigaltstack (sp, size, flags)",
                (old.ss_sp as usize, old.ss_size, old.ss_flags),
                (ss.ss_sp as usize, size, 0),
            );
            c.check(
                query(libc::SIGUSR1).sa_flags & libc::SA_ONSTACK != 0,
                || "SA_ONSTACK lost".into(),
            );
            // SAFETY: raising a signal whose handler we installed.
            unsafe { libc::raise(libc::SIGUSR1) };
            let a = ALT_ADDR.load(Ordering::SeqCst);
            let base = ss.ss_sp as usize;
            c.check(a >= base && a < base + size, || {
                format!("the handler ran at {a:#x}, outside the altstack {base:#x}+{size:#x}")
            });
        }
        other => {
            eprintln!("wl-sig: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}
