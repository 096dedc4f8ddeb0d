//! Threads: tids, names, TLS, FPU registers, per-thread signal masks, threads
//! blocked in futexes and syscalls, robust lists, rseq.
//!
//! `wl-thread --ctl DIR MODE [N]`, MODE one of: multi N, fpu, sigmask, futex,
//! syscall, robust, rseq.

use crest_workloads::support::{gettid, mode, num_arg, setup_failed, sys, write_all};
use crest_workloads::{Checks, Ctl};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

thread_local! {
    static TLS: Cell<u64> = const { Cell::new(0) };
}

type Verdict = Vec<String>;

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, args) = mode(&args);
    let mut c = Checks::new();
    match mode.as_str() {
        "multi" => multi(&ctl, &mut c, num_arg(&args, 0, "threads")),
        "fpu" => fpu(&ctl, &mut c),
        "sigmask" => sigmask(&ctl, &mut c),
        "futex" => futex(&ctl, &mut c),
        "syscall" => syscall(&ctl, &mut c),
        "robust" => robust(&ctl, &mut c),
        "rseq" => rseq(&ctl, &mut c),
        other => {
            eprintln!("wl-thread: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}

/// Joins worker threads and collects the differences they found.
fn join_all(c: &mut Checks, hs: Vec<JoinHandle<Verdict>>) {
    for h in hs {
        match h.join() {
            Ok(v) => v.into_iter().for_each(|d| c.fail(d)),
            Err(_) => c.fail("a thread panicked"),
        }
    }
}

fn comm(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Waits until every `tid` sits in one of the syscalls `nrs` (from
/// /proc/self/task/TID/syscall), so the dump catches them blocked.
fn wait_blocked(tids: &[i32], nrs: &[i64]) {
    let t0 = Instant::now();
    loop {
        let all = tids.iter().all(|t| {
            let s =
                std::fs::read_to_string(format!("/proc/self/task/{t}/syscall")).unwrap_or_default();
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<i64>().ok())
                .map(|n| nrs.contains(&n))
                .unwrap_or(false)
        });
        if all {
            return;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            setup_failed("threads did not block in the expected syscalls");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn multi(ctl: &Ctl, c: &mut Checks, n: usize) {
    let ready = Arc::new(Barrier::new(n + 1));
    let hs: Vec<JoinHandle<Verdict>> = (0..n)
        .map(|i| {
            let ctl = ctl.clone();
            let ready = Arc::clone(&ready);
            std::thread::Builder::new()
                .name(format!("wl-t{i}"))
                .spawn(move || {
                    let tid = gettid();
                    TLS.with(|t| t.set(i as u64 * 1000 + 7));
                    ready.wait();
                    ctl.wait_for_go();
                    let mut c = Checks::new();
                    c.eq(&format!("thread {i} tid"), gettid(), tid);
                    c.eq(
                        &format!("thread {i} TLS"),
                        TLS.with(Cell::get),
                        i as u64 * 1000 + 7,
                    );
                    c.eq(&format!("thread {i} name"), comm(tid), format!("wl-t{i}"));
                    c.into_differences()
                })
                .unwrap_or_else(|_| setup_failed("spawn"))
        })
        .collect();
    ready.wait();
    TLS.with(|t| t.set(42));
    ctl.ready();
    ctl.wait_for_go();
    c.eq("main TLS", TLS.with(Cell::get), 42);
    join_all(c, hs);
}

/// Holds a pattern in xmm8–xmm15 (ymm8–ymm15 with AVX) and a non-default MXCSR
/// while sleeping in nanosleep syscalls, then stores them for comparison.
fn fpu_thread(flag: &AtomicBool, seed: u8) -> Verdict {
    let avx = std::arch::is_x86_feature_detected!("avx");
    let pattern: Vec<u8> = (0..256u32)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    let mut out = vec![0u8; 256];
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 5_000_000,
    };
    // Round toward zero, all exceptions masked.
    let mxcsr_in: u32 = 0x7f80;
    let mut mxcsr_out: u32 = 0;
    let flag_ptr = flag.as_ptr() as *const u8;
    let used = if avx { 256 } else { 128 };
    if avx {
        avx_loop(&pattern, &mut out, flag_ptr, &ts, &mxcsr_in, &mut mxcsr_out);
    } else {
        sse_loop(&pattern, &mut out, flag_ptr, &ts, &mxcsr_in, &mut mxcsr_out);
    }
    let mut v = Vec::new();
    if out[..used] != pattern[..used] {
        let i = out
            .iter()
            .zip(&pattern)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        v.push(format!(
            "thread {}: vector register byte {i} (register {}) differs",
            gettid(),
            8 + i / if avx { 32 } else { 16 }
        ));
    }
    if mxcsr_out & 0xffbf != mxcsr_in {
        v.push(format!(
            "thread {}: MXCSR {mxcsr_out:#x}, expected {mxcsr_in:#x}",
            gettid()
        ));
    }
    v
}

macro_rules! vec_loop {
    ($name:ident, $load:literal, $store:literal, $r:literal, $w:literal, $($clob:tt)*) => {
        fn $name(p: &[u8], o: &mut [u8], f: *const u8, ts: &libc::timespec, mi: &u32, mo: &mut u32) {
            // SAFETY: p and o are 256 bytes, f points at a live AtomicBool, ts
            // and the MXCSR words are valid; the asm clobbers only what it declares.
            unsafe {
                std::arch::asm!(
                    "ldmxcsr [{mi}]",
                    concat!($load, " ", $r, "8, [{p}]"),
                    concat!($load, " ", $r, "9, [{p} + ", $w, "]"),
                    concat!($load, " ", $r, "10, [{p} + 2*", $w, "]"),
                    concat!($load, " ", $r, "11, [{p} + 3*", $w, "]"),
                    concat!($load, " ", $r, "12, [{p} + 4*", $w, "]"),
                    concat!($load, " ", $r, "13, [{p} + 5*", $w, "]"),
                    concat!($load, " ", $r, "14, [{p} + 6*", $w, "]"),
                    concat!($load, " ", $r, "15, [{p} + 7*", $w, "]"),
                    "2:",
                    "mov eax, 35",
                    "mov rdi, {ts}",
                    "xor esi, esi",
                    "syscall",
                    "cmp byte ptr [{f}], 0",
                    "je 2b",
                    concat!($store, " [{o}], ", $r, "8"),
                    concat!($store, " [{o} + ", $w, "], ", $r, "9"),
                    concat!($store, " [{o} + 2*", $w, "], ", $r, "10"),
                    concat!($store, " [{o} + 3*", $w, "], ", $r, "11"),
                    concat!($store, " [{o} + 4*", $w, "], ", $r, "12"),
                    concat!($store, " [{o} + 5*", $w, "], ", $r, "13"),
                    concat!($store, " [{o} + 6*", $w, "], ", $r, "14"),
                    concat!($store, " [{o} + 7*", $w, "], ", $r, "15"),
                    "stmxcsr [{mo}]",
                    p = in(reg) p.as_ptr(),
                    o = in(reg) o.as_mut_ptr(),
                    f = in(reg) f,
                    ts = in(reg) ts,
                    mi = in(reg) mi,
                    mo = in(reg) mo,
                    out("rax") _, out("rdi") _, out("rsi") _, out("rcx") _, out("r11") _,
                    $($clob)*
                )
            }
        }
    };
}

vec_loop!(sse_loop, "movdqu", "movdqu", "xmm", "16",
    out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
    out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,);

#[target_feature(enable = "avx")]
unsafe fn avx_inner(
    p: &[u8],
    o: &mut [u8],
    f: *const u8,
    ts: &libc::timespec,
    mi: &u32,
    mo: &mut u32,
) {
    avx_asm(p, o, f, ts, mi, mo)
}

vec_loop!(avx_asm, "vmovdqu", "vmovdqu", "ymm", "32",
    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
    out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,);

fn avx_loop(p: &[u8], o: &mut [u8], f: *const u8, ts: &libc::timespec, mi: &u32, mo: &mut u32) {
    // SAFETY: called only after is_x86_feature_detected!("avx").
    unsafe { avx_inner(p, o, f, ts, mi, mo) }
}

fn fpu(ctl: &Ctl, c: &mut Checks) {
    let flag = Arc::new(AtomicBool::new(false));
    let tids = Arc::new(Mutex::new(Vec::new()));
    let hs: Vec<JoinHandle<Verdict>> = (0..2u8)
        .map(|i| {
            let flag = Arc::clone(&flag);
            let tids = Arc::clone(&tids);
            std::thread::spawn(move || {
                tids.lock().map(|mut t| t.push(gettid())).ok();
                fpu_thread(&flag, i * 50 + 1)
            })
        })
        .collect();
    let t0 = Instant::now();
    while tids.lock().map(|t| t.len()).unwrap_or(0) < 2 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = tids.lock().map(|t| t.clone()).unwrap_or_default();
    wait_blocked(&t, &[libc::SYS_nanosleep]);
    ctl.ready();
    ctl.wait_for_go();
    flag.store(true, Ordering::SeqCst);
    join_all(c, hs);
}

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: set is plain data initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn members(set: &libc::sigset_t) -> Vec<i32> {
    // SAFETY: set is a valid sigset.
    (1..65)
        .filter(|&s| unsafe { libc::sigismember(set, s) } == 1)
        .collect()
}

fn blocked_and_pending() -> (Vec<i32>, Vec<i32>) {
    // SAFETY: the sets are valid out pointers.
    unsafe {
        let mut b: libc::sigset_t = std::mem::zeroed();
        let mut p: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut b);
        libc::sigpending(&mut p);
        (members(&b), members(&p))
    }
}

fn sigmask(ctl: &Ctl, c: &mut Checks) {
    let rt = libc::SIGRTMIN() + 3;
    let masks = [vec![libc::SIGUSR1], vec![libc::SIGUSR2, rt]];
    let barrier = Arc::new(Barrier::new(3));
    let tids = Arc::new(Mutex::new(vec![0; 2]));
    let hs: Vec<JoinHandle<Verdict>> = masks
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, mask)| {
            let (ctl, barrier, tids) = (ctl.clone(), Arc::clone(&barrier), Arc::clone(&tids));
            std::thread::spawn(move || {
                let set = sigset(&mask);
                // SAFETY: set is valid.
                unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
                tids.lock().map(|mut t| t[i] = gettid()).ok();
                barrier.wait();
                ctl.wait_for_go();
                let (blocked, pending) = blocked_and_pending();
                let mut c = Checks::new();
                let mut want = mask.clone();
                want.sort_unstable();
                c.eq(&format!("thread {i} blocked mask"), blocked, want);
                let want_pending = if i == 1 { vec![rt] } else { vec![] };
                c.eq(
                    &format!("thread {i} pending signals"),
                    pending,
                    want_pending,
                );
                c.into_differences()
            })
        })
        .collect();
    barrier.wait();
    let t = tids.lock().map(|t| t.clone()).unwrap_or_default();
    // A thread-directed signal, pending on thread 1 only (it blocks it).
    // SAFETY: tgkill with plain values.
    sys(
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), t[1], rt) },
        "tgkill",
    );
    ctl.ready();
    ctl.wait_for_go();
    let (blocked, pending) = blocked_and_pending();
    c.eq("main thread blocked mask", blocked, Vec::<i32>::new());
    c.eq("main thread pending", pending, Vec::<i32>::new());
    join_all(c, hs);
}

fn futex(ctl: &Ctl, c: &mut Checks) {
    let lock = Arc::new(Mutex::new(0u32));
    let cond = Arc::new((Mutex::new(false), Condvar::new()));
    let guard = lock.lock().unwrap_or_else(|_| setup_failed("lock"));
    let tid_of = Arc::new(Mutex::new(Vec::new()));
    // t_lock blocks on the mutex main holds.
    let (l2, tids2) = (Arc::clone(&lock), Arc::clone(&tid_of));
    let t_lock = std::thread::spawn(move || {
        tids2.lock().map(|mut t| t.push(gettid())).ok();
        let mut g = l2.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        *g
    });
    // t_cond waits on a condvar.
    let (cv, tids3) = (Arc::clone(&cond), Arc::clone(&tid_of));
    let t_cond = std::thread::spawn(move || {
        tids3.lock().map(|mut t| t.push(gettid())).ok();
        let (m, cvar) = &*cv;
        let mut done = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = cvar.wait(done).unwrap_or_else(|e| e.into_inner());
        }
        7u32
    });
    // t_join joins t_lock: glibc waits on t_lock's tid futex (clear_child_tid).
    let tids4 = Arc::clone(&tid_of);
    let t_join = std::thread::spawn(move || {
        tids4.lock().map(|mut t| t.push(gettid())).ok();
        t_lock.join().unwrap_or(0) + 100
    });
    let t0 = Instant::now();
    while tid_of.lock().map(|t| t.len()).unwrap_or(0) < 3 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let tids = tid_of.lock().map(|t| t.clone()).unwrap_or_default();
    wait_blocked(&tids, &[libc::SYS_futex]);
    ctl.ready();
    ctl.wait_for_go();
    drop(guard);
    {
        let (m, cvar) = &*cond;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
    }
    // Joined with a deadline: a thread that never wakes must show as a difference.
    let done = Arc::new(AtomicBool::new(false));
    let d2 = Arc::clone(&done);
    let waiter = std::thread::spawn(move || {
        let r = (t_join.join().ok(), t_cond.join().ok());
        d2.store(true, Ordering::SeqCst);
        r
    });
    let t0 = Instant::now();
    while !done.load(Ordering::SeqCst) {
        if t0.elapsed() > Duration::from_secs(10) {
            c.fail("threads blocked in futex/condvar/join did not finish within 10 s of waking");
            ctl.finish(&std::mem::take(c).into_differences());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (j, cv) = waiter.join().unwrap_or((None, None));
    c.eq("join result (mutex waiter + 100)", j, Some(101));
    c.eq("condvar waiter result", cv, Some(7));
}

/// The sleeping thread's nanosleep in `syscall` mode.
const SLEEP_SECS: libc::time_t = 8;

fn syscall(ctl: &Ctl, c: &mut Checks) {
    let mut p1 = [0; 2];
    let mut p2 = [0; 2];
    // SAFETY: the arrays are valid for two ints.
    unsafe {
        sys(libc::pipe(p1.as_mut_ptr()), "pipe");
        sys(libc::pipe(p2.as_mut_ptr()), "pipe");
    }
    let tids = Arc::new(Mutex::new(Vec::new()));
    let t1 = Arc::clone(&tids);
    let r = p1[0];
    let reader = std::thread::spawn(move || {
        t1.lock().map(|mut t| t.push(gettid())).ok();
        let mut b = [0u8; 16];
        // SAFETY: b is valid for 16 bytes.
        let n = unsafe { libc::read(r, b.as_mut_ptr().cast(), 16) };
        if n < 0 {
            return Err(format!("read: {}", std::io::Error::last_os_error()));
        }
        Ok(b[..n as usize].to_vec())
    });
    let t2 = Arc::clone(&tids);
    let sleeper = std::thread::spawn(move || {
        t2.lock().map(|mut t| t.push(gettid())).ok();
        let t0 = Instant::now();
        // Long enough to be still asleep when a loaded, emulated guest gets
        // around to the dump (a 2 s sleep once ended before it there).
        let ts = libc::timespec {
            tv_sec: SLEEP_SECS,
            tv_nsec: 0,
        };
        // SAFETY: ts is valid; no remainder wanted. The raw syscall (not std's
        // retrying sleep) shows how the engine restarts it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_nanosleep,
                &ts,
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        (r, t0.elapsed())
    });
    let t3 = Arc::clone(&tids);
    let pr = p2[0];
    let poller = std::thread::spawn(move || {
        t3.lock().map(|mut t| t.push(gettid())).ok();
        let mut fds = [libc::pollfd {
            fd: pr,
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: fds is valid for one entry.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
        (n, fds[0].revents)
    });
    let t0 = Instant::now();
    while tids.lock().map(|t| t.len()).unwrap_or(0) < 3 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = tids.lock().map(|t| t.clone()).unwrap_or_default();
    wait_blocked(
        &t,
        &[
            libc::SYS_read,
            libc::SYS_nanosleep,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_clock_nanosleep,
        ],
    );
    ctl.ready();
    ctl.wait_for_go();
    write_all(p1[1], b"wake up");
    write_all(p2[1], b"x");
    match reader.join() {
        Ok(Ok(b)) => c.eq("bytes the blocked reader got", b, b"wake up".to_vec()),
        Ok(Err(e)) => c.fail(format!("blocked read failed after restore: {e}")),
        Err(_) => c.fail("reader panicked"),
    }
    match sleeper.join() {
        Ok((r, el)) => {
            c.eq("nanosleep result", r, 0);
            c.check(el >= Duration::from_secs(SLEEP_SECS as u64), || {
                format!("nanosleep({SLEEP_SECS} s) returned after {el:?}")
            });
        }
        Err(_) => c.fail("sleeper panicked"),
    }
    match poller.join() {
        Ok((n, rev)) => c.eq(
            "poll result and revents",
            (n, rev & libc::POLLIN),
            (1, libc::POLLIN),
        ),
        Err(_) => c.fail("poller panicked"),
    }
}

fn robust_list() -> (usize, usize) {
    let mut head: usize = 0;
    let mut len: usize = 0;
    // SAFETY: valid out pointers; pid 0 means this thread.
    unsafe { libc::syscall(libc::SYS_get_robust_list, 0, &mut head, &mut len) };
    (head, len)
}

fn robust(ctl: &Ctl, c: &mut Checks) {
    let barrier = Arc::new(Barrier::new(3));
    let hs: Vec<JoinHandle<Verdict>> = (0..2)
        .map(|i| {
            let (ctl, barrier) = (ctl.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let before = robust_list();
                barrier.wait();
                ctl.wait_for_go();
                let mut c = Checks::new();
                c.check(before.0 != 0, || {
                    format!("thread {i}: glibc registered no robust list")
                });
                c.eq(
                    &format!("thread {i} robust list (head, len)"),
                    robust_list(),
                    before,
                );
                c.into_differences()
            })
        })
        .collect();
    let before = robust_list();
    barrier.wait();
    ctl.ready();
    ctl.wait_for_go();
    c.eq("main robust list (head, len)", robust_list(), before);
    join_all(c, hs);
}

extern "C" {
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

const RSEQ_SIG: u32 = 0x5305_3053;

/// Registering glibc's rseq area again fails with EBUSY exactly when it is
/// still registered (with the same arguments).
fn rseq_state() -> Result<(), String> {
    // SAFETY: glibc ≥ 2.35 exports these; reading them is plain.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return Err("glibc did not register rseq (__rseq_size is 0)".into());
    }
    let tp: usize;
    // SAFETY: reads the thread pointer (fs:0 holds it on x86-64).
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp) };
    let area = (tp as isize + off) as usize;
    // SAFETY: the area is this thread's registered rseq area; a duplicate
    // registration changes nothing when it fails.
    let r = unsafe { libc::syscall(libc::SYS_rseq, area, 32u32, 0, RSEQ_SIG) };
    let err = std::io::Error::last_os_error().raw_os_error();
    if r == 0 {
        return Err("rseq was not registered (a fresh registration succeeded)".into());
    }
    if err != Some(libc::EBUSY) {
        return Err(format!(
            "re-registering rseq: errno {err:?}, expected EBUSY"
        ));
    }
    // SAFETY: cpu_id is the second u32 of struct rseq, written by the kernel.
    let cpu = unsafe { std::ptr::read_volatile((area + 4) as *const i32) };
    if cpu < 0 {
        return Err(format!("rseq cpu_id is {cpu}"));
    }
    Ok(())
}

fn rseq(ctl: &Ctl, c: &mut Checks) {
    if let Err(e) = rseq_state() {
        setup_failed(&e);
    }
    let barrier = Arc::new(Barrier::new(2));
    let (ctl2, b2) = (ctl.clone(), Arc::clone(&barrier));
    let h = std::thread::spawn(move || {
        let before = rseq_state();
        b2.wait();
        ctl2.wait_for_go();
        let mut c = Checks::new();
        c.eq("thread rseq before the dump", before, Ok(()));
        if let Err(e) = rseq_state() {
            c.fail(format!("thread: {e}"));
        }
        c.into_differences()
    });
    barrier.wait();
    ctl.ready();
    ctl.wait_for_go();
    if let Err(e) = rseq_state() {
        c.fail(format!("main thread: {e}"));
    }
    join_all(c, vec![h]);
}
