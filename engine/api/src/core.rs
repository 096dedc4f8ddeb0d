//! The library's state and its control thread: the process's half of the
//! handshake with `crest dump` (engine/src/api.rs is the other half).
//!
//! One cycle, driven by the control thread when crest connects to
//! `@crest-api.PID` and sends `checkpoint`:
//! 1. new critical sections wait; the ones open are left to drain;
//! 2. thread-context callbacks run on the `crest-cb` thread, nested in reverse
//!    registration order (each one's `checkpoint()` runs the next);
//! 3. every thread that registered signal-context callbacks gets
//!    [`signal_number`] and runs its own the same way in the handler;
//! 4. the innermost `checkpoint()` of each chain *arrives* and sleeps on
//!    [`RESULT`]; once all have arrived (or one aborted) the control thread
//!    answers `ready ADDR` (the address of [`STATE`]) or `abort KIND REASON`;
//! 5. on `freeze` it closes its sockets (crest does not carry listening unix
//!    sockets; the listener's fd number is held by /dev/null meanwhile) and
//!    sleeps on [`STATE`], which crest writes: CONTINUED while the process is
//!    still frozen, RESTARTED by `crest restore` before the process resumes,
//!    FAILED when the dump failed. The futex waits restart after the freeze
//!    and see the new value; they also poll, since crest cannot wake them;
//! 6. the listener is recreated on the same fd number, then the answer is
//!    published to the callbacks through [`RESULT`].

use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sys;

/// Values of [`STATE`] and [`RESULT`]; crest writes STATE with the same numbers.
pub const IDLE: u32 = 0;
pub const WAITING: u32 = 1;
pub const CONTINUED: u32 = 2;
pub const RESTARTED: u32 = 3;
pub const FAILED: u32 = 4;

pub const KIND_SIGNAL: u32 = 1;
pub const KIND_THREAD: u32 = 2;

pub const ABORT_TEMPORARY: u32 = 1;
pub const ABORT_PERMANENT: u32 = 2;

const MAX_CALLBACKS: usize = 64;
const POLL: Duration = Duration::from_millis(100);

/// The word crest writes (its address is in the image).
pub static STATE: AtomicU32 = AtomicU32::new(IDLE);
/// The answer callbacks wait for.
static RESULT: AtomicU32 = AtomicU32::new(IDLE);
/// A checkpoint is under way: new critical sections wait.
pub static PENDING: AtomicU32 = AtomicU32::new(0);
pub static CS_COUNT: AtomicU32 = AtomicU32::new(0);
static ARRIVED: AtomicU32 = AtomicU32::new(0);
static DEPARTED: AtomicU32 = AtomicU32::new(0);
static SIGNAL_PHASE: AtomicBool = AtomicBool::new(false);
/// Bumped to start the thread-context callbacks.
static CB_GO: AtomicU32 = AtomicU32::new(0);
/// Completed cycles, and how the last one ended (for `request_checkpoint`).
pub static GEN: AtomicU32 = AtomicU32::new(0);
pub static LAST: AtomicU32 = AtomicU32::new(IDLE);
/// The first abort of a cycle: its kind, then its reason (written by the winner).
static ABORT_KIND: AtomicU32 = AtomicU32::new(0);
static ABORT_LEN: AtomicUsize = AtomicUsize::new(0);
/// Set once the reason is complete: what the control thread waits for.
static ABORT_READY: AtomicBool = AtomicBool::new(false);
static ABORT_REASON: [AtomicU8; 200] = [const { AtomicU8::new(0) }; 200];
/// The listener's fd number (kept across a checkpoint).
static LISTEN_FD: AtomicI32 = AtomicI32::new(-1);
static INIT_PID: AtomicI32 = AtomicI32::new(0);
static INIT_LOCK: Mutex<()> = Mutex::new(());
pub static CYCLES: AtomicU64 = AtomicU64::new(0);

/// One registered callback. Read lock-free by signal handlers: `used` is set
/// last when registering.
struct Slot {
    used: AtomicBool,
    kind: AtomicU32,
    tid: AtomicI32,
    func: AtomicUsize,
    arg: AtomicUsize,
}

static SLOTS: [Slot; MAX_CALLBACKS] = [const {
    Slot {
        used: AtomicBool::new(false),
        kind: AtomicU32::new(0),
        tid: AtomicI32::new(0),
        func: AtomicUsize::new(0),
        arg: AtomicUsize::new(0),
    }
}; MAX_CALLBACKS];
static NSLOTS: AtomicUsize = AtomicUsize::new(0);
static REG_LOCK: Mutex<()> = Mutex::new(());

pub type Callback = extern "C" fn(*mut libc::c_void) -> libc::c_int;

/// The signal the library sends to threads with signal-context callbacks.
pub fn signal_number() -> i32 {
    libc::SIGRTMAX() - 1
}

/// Starts the library in this process (idempotent; again in a forked child,
/// which inherits neither the threads nor, sensibly, the callbacks).
pub fn init() -> Result<(), i32> {
    let _g = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let pid = sys::getpid();
    if INIT_PID.load(SeqCst) == pid {
        return Ok(());
    }
    {
        let _r = REG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for s in &SLOTS {
            s.used.store(false, SeqCst);
        }
        NSLOTS.store(0, SeqCst);
    }
    install_handler()?;
    let fd = sys::listen_abstract(&socket_name(pid))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    LISTEN_FD.store(fd, SeqCst);
    // Both threads are up (named, their malloc arenas made) before init
    // returns, so that the process looks the same before and after a checkpoint.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx2, tx3) = (tx.clone(), tx);
    let started = std::thread::Builder::new()
        .name("crest-ctl".into())
        .spawn(move || control_thread(tx2))
        .and_then(|_| {
            std::thread::Builder::new()
                .name("crest-cb".into())
                .spawn(move || callback_thread(tx3))
        });
    if let Err(e) = started {
        return Err(e.raw_os_error().unwrap_or(libc::EAGAIN));
    }
    for _ in 0..2 {
        let _ = rx.recv();
    }
    INIT_PID.store(pid, SeqCst);
    Ok(())
}

pub fn socket_name(pid: i32) -> String {
    format!("crest-api.{pid}")
}

fn install_handler() -> Result<(), i32> {
    // SAFETY: sigaction is plain data; all zeroes is a valid value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
    sa.sa_flags = libc::SA_RESTART;
    // SAFETY: sa is a valid sigaction whose handler is async-signal-safe
    // outside the callbacks the program registers for that context.
    if unsafe { libc::sigaction(signal_number(), &sa, std::ptr::null_mut()) } != 0 {
        return Err(sys::errno());
    }
    Ok(())
}

/// Registers `func(arg)` to run at each checkpoint; returns its id.
pub fn register(func: Callback, arg: *mut libc::c_void, kind: u32) -> Result<usize, i32> {
    if kind != KIND_SIGNAL && kind != KIND_THREAD {
        return Err(libc::EINVAL);
    }
    init()?;
    let _r = REG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let i = NSLOTS.load(SeqCst);
    if i >= MAX_CALLBACKS {
        return Err(libc::ENOSPC);
    }
    let s = &SLOTS[i];
    s.kind.store(kind, SeqCst);
    s.tid.store(sys::gettid(), SeqCst);
    s.func.store(func as usize, SeqCst);
    s.arg.store(arg as usize, SeqCst);
    s.used.store(true, SeqCst);
    NSLOTS.store(i + 1, SeqCst);
    Ok(i)
}

pub fn unregister(id: usize) -> Result<(), i32> {
    let _r = REG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match SLOTS.get(id) {
        Some(s) if id < NSLOTS.load(SeqCst) && s.used.load(SeqCst) => {
            s.used.store(false, SeqCst);
            Ok(())
        }
        _ => Err(libc::EINVAL),
    }
}

pub fn enter_cs() {
    loop {
        while PENDING.load(SeqCst) != 0 {
            sys::futex_wait(&PENDING, 1, Some(POLL));
        }
        CS_COUNT.fetch_add(1, SeqCst);
        if PENDING.load(SeqCst) == 0 {
            return;
        }
        // A checkpoint started meanwhile: it goes first.
        CS_COUNT.fetch_sub(1, SeqCst);
    }
}

pub fn leave_cs() {
    let _ = CS_COUNT.fetch_update(SeqCst, SeqCst, |c| c.checked_sub(1));
}

// ---- callback chains -------------------------------------------------------

/// The callbacks one thread runs in one cycle, outermost first.
struct Chain {
    ids: [u8; MAX_CALLBACKS],
    len: usize,
    pos: usize,
    result: Option<i32>,
}

thread_local! {
    static CHAIN: Cell<*mut Chain> = const { Cell::new(std::ptr::null_mut()) };
}

/// What `checkpoint()` returns: 0 continue, 1 restarted, -errno.
fn answer(state: u32) -> i32 {
    match state {
        CONTINUED => 0,
        RESTARTED => 1,
        _ => -libc::ECANCELED,
    }
}

fn arrive_and_wait() -> i32 {
    ARRIVED.fetch_add(1, SeqCst);
    let r = loop {
        let r = RESULT.load(SeqCst);
        if r != WAITING {
            break r;
        }
        sys::futex_wait(&RESULT, WAITING, Some(POLL));
    };
    DEPARTED.fetch_add(1, SeqCst);
    answer(r)
}

/// Runs the rest of the chain; the innermost point waits for the answer.
fn step(c: &mut Chain) -> i32 {
    while c.result.is_none() {
        if c.pos < c.len {
            let s = &SLOTS[c.ids[c.pos] as usize];
            c.pos += 1;
            let func = s.func.load(SeqCst);
            let arg = s.arg.load(SeqCst) as *mut libc::c_void;
            // SAFETY: func was stored from a `Callback` by register().
            let f: Callback = unsafe { std::mem::transmute::<usize, Callback>(func) };
            f(arg);
        } else {
            c.result = Some(arrive_and_wait());
        }
    }
    c.result.unwrap_or(-libc::ECANCELED)
}

fn run_chain(kind: u32) {
    let me = sys::gettid();
    let mut c = Chain {
        ids: [0; MAX_CALLBACKS],
        len: 0,
        pos: 0,
        result: None,
    };
    let n = NSLOTS.load(SeqCst).min(MAX_CALLBACKS);
    for i in (0..n).rev() {
        let s = &SLOTS[i];
        if s.used.load(SeqCst)
            && s.kind.load(SeqCst) == kind
            && (kind == KIND_THREAD || s.tid.load(SeqCst) == me)
        {
            c.ids[c.len] = i as u8;
            c.len += 1;
        }
    }
    let prev = CHAIN.with(|p| p.replace(&mut c));
    step(&mut c);
    CHAIN.with(|p| p.set(prev));
}

/// `checkpoint(flags)` inside a callback: 0 continue, 1 restarted, -errno.
pub fn checkpoint(abort: u32, reason: &[u8]) -> i32 {
    let c = CHAIN.with(|p| p.get());
    if c.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: CHAIN points to the chain on this thread's stack in run_chain,
    // which outlives every callback it runs.
    let c = unsafe { &mut *c };
    if let Some(r) = c.result {
        return r;
    }
    if abort != 0 {
        record_abort(abort, reason);
        c.result = Some(arrive_and_wait());
        return c.result.unwrap_or(-libc::ECANCELED);
    }
    step(c)
}

fn record_abort(kind: u32, reason: &[u8]) {
    if ABORT_KIND.compare_exchange(0, kind, SeqCst, SeqCst).is_ok() {
        let n = reason.len().min(ABORT_REASON.len());
        for (d, s) in ABORT_REASON.iter().zip(reason) {
            // Keep the answer one line.
            d.store(if *s == b'\n' { b' ' } else { *s }, SeqCst);
        }
        ABORT_LEN.store(n, SeqCst);
        ABORT_READY.store(true, SeqCst);
    }
    RESULT.store(FAILED, SeqCst);
    sys::futex_wake(&RESULT);
}

fn aborted() -> bool {
    ABORT_READY.load(SeqCst)
}

extern "C" fn on_signal(_sig: libc::c_int) {
    if !SIGNAL_PHASE.load(SeqCst) {
        return;
    }
    // SAFETY: __errno_location returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    run_chain(KIND_SIGNAL);
    // SAFETY: as above; the interrupted code must see its errno unchanged.
    unsafe { *libc::__errno_location() = errno };
}

/// Runs on each library thread first: allocates (glibc gives the thread its
/// arena now, not in the middle of a checkpoint) and says it is up.
fn started(tx: std::sync::mpsc::Sender<()>) {
    std::hint::black_box(vec![0u8; 64]);
    let _ = tx.send(());
}

fn callback_thread(tx: std::sync::mpsc::Sender<()>) {
    started(tx);
    let mut seen = CB_GO.load(SeqCst);
    loop {
        while CB_GO.load(SeqCst) == seen {
            sys::futex_wait(&CB_GO, seen, None);
        }
        seen = CB_GO.load(SeqCst);
        run_chain(KIND_THREAD);
    }
}

// ---- the control thread ----------------------------------------------------

fn control_thread(tx: std::sync::mpsc::Sender<()>) {
    started(tx);
    let pid = sys::getpid();
    loop {
        let lfd = LISTEN_FD.load(SeqCst);
        sys::poll1(lfd, libc::POLLIN, Duration::from_secs(3600));
        // SAFETY: accept4 with null address arguments.
        let conn = unsafe {
            libc::accept4(
                lfd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            let e = sys::errno();
            if e != libc::EINTR && e != libc::EAGAIN {
                std::thread::sleep(Duration::from_millis(200));
                // The listener is not a socket any more (parked, and the cycle
                // that parked it never finished): get it back.
                if e == libc::ENOTSOCK || e == libc::EBADF || e == libc::EINVAL {
                    relisten(pid);
                }
            }
            continue;
        }
        let Some((peer, uid)) = sys::peer_cred(conn) else {
            sys::close(conn);
            continue;
        };
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        if uid != 0 && uid != me {
            sys::close(conn);
            continue;
        }
        match sys::read_line(conn, Duration::from_secs(5)).as_deref() {
            Some("checkpoint") => cycle(conn, peer, pid),
            Some("ping") => {
                let _ = sys::send_all(conn, b"pong\n");
                sys::close(conn);
            }
            _ => sys::close(conn),
        }
    }
}

/// Whether crest went away (closed its end or sent something unexpected).
fn hung_up(conn: RawFd, wait: Duration) -> bool {
    sys::poll1(conn, libc::POLLIN | libc::POLLRDHUP, wait) != 0
}

fn wait_until(conn: RawFd, cond: impl Fn() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if hung_up(conn, Duration::from_millis(5)) {
            return false;
        }
    }
}

fn cycle(conn: RawFd, crest: i32, pid: i32) {
    ABORT_READY.store(false, SeqCst);
    ABORT_KIND.store(0, SeqCst);
    ABORT_LEN.store(0, SeqCst);
    ARRIVED.store(0, SeqCst);
    DEPARTED.store(0, SeqCst);
    STATE.store(WAITING, SeqCst);
    RESULT.store(WAITING, SeqCst);
    PENDING.store(1, SeqCst);
    let mut expected = 0;
    let mut closed = false;
    let outcome = 'run: {
        if !wait_until(conn, || CS_COUNT.load(SeqCst) == 0) {
            break 'run FAILED;
        }
        let n = NSLOTS.load(SeqCst).min(MAX_CALLBACKS);
        let live: Vec<&Slot> = SLOTS[..n].iter().filter(|s| s.used.load(SeqCst)).collect();
        if live.iter().any(|s| s.kind.load(SeqCst) == KIND_THREAD) {
            expected += 1;
            CB_GO.fetch_add(1, SeqCst);
            sys::futex_wake(&CB_GO);
            if !wait_until(conn, || ARRIVED.load(SeqCst) >= 1 || aborted()) {
                break 'run FAILED;
            }
        }
        if !aborted() {
            let mut tids: Vec<i32> = live
                .iter()
                .filter(|s| s.kind.load(SeqCst) == KIND_SIGNAL)
                .map(|s| s.tid.load(SeqCst))
                .collect();
            tids.sort_unstable();
            tids.dedup();
            SIGNAL_PHASE.store(true, SeqCst);
            for tid in tids {
                if sys::tgkill(tid, signal_number()) {
                    expected += 1;
                }
            }
            if !wait_until(conn, || ARRIVED.load(SeqCst) >= expected || aborted()) {
                break 'run FAILED;
            }
        }
        if aborted() {
            let kind = if ABORT_KIND.load(SeqCst) == ABORT_PERMANENT {
                "permanent"
            } else {
                "temporary"
            };
            let n = ABORT_LEN.load(SeqCst);
            let reason: Vec<u8> = ABORT_REASON[..n].iter().map(|b| b.load(SeqCst)).collect();
            let reason = String::from_utf8_lossy(&reason);
            let reason = if reason.trim().is_empty() {
                "(no reason given)".into()
            } else {
                reason
            };
            let _ = sys::send_all(conn, format!("abort {kind} {reason}\n").as_bytes());
            break 'run FAILED;
        }
        let addr = STATE.as_ptr() as usize;
        if !sys::send_all(conn, format!("ready {addr:x}\n").as_bytes()) {
            break 'run FAILED;
        }
        // crest answers once every process in the dump is ready; it may wait
        // for slow ones up to its --callback-timeout.
        if sys::read_line(conn, Duration::from_secs(3600)).as_deref() != Some("freeze") {
            break 'run FAILED;
        }
        park_listener();
        closed = true;
        sys::close(conn);
        loop {
            let v = STATE.load(SeqCst);
            if v != WAITING {
                break 'run v;
            }
            sys::futex_wait(&STATE, WAITING, Some(POLL));
            if STATE.load(SeqCst) == WAITING && !sys::alive(crest) {
                // crest died before it answered: the checkpoint did not happen.
                let _ = STATE.compare_exchange(WAITING, FAILED, SeqCst, SeqCst);
            }
        }
    };
    if closed {
        relisten(pid);
    } else {
        sys::close(conn);
    }
    CYCLES.fetch_add(1, SeqCst);
    RESULT.store(outcome, SeqCst);
    sys::futex_wake(&RESULT);
    // Every callback reads the answer before the words are reset.
    let until = Instant::now() + Duration::from_secs(10);
    while (ARRIVED.load(SeqCst) < expected || DEPARTED.load(SeqCst) < ARRIVED.load(SeqCst))
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    SIGNAL_PHASE.store(false, SeqCst);
    STATE.store(IDLE, SeqCst);
    LAST.store(outcome, SeqCst);
    GEN.fetch_add(1, SeqCst);
    sys::futex_wake(&GEN);
    PENDING.store(0, SeqCst);
    sys::futex_wake(&PENDING);
}

/// Closes the listening socket but keeps its fd number taken (by /dev/null),
/// so the program's own descriptors keep their numbers across the checkpoint.
fn park_listener() {
    let lfd = LISTEN_FD.load(SeqCst);
    // SAFETY: the path is a NUL-terminated literal.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if null >= 0 {
        // SAFETY: dup3 replaces our own listener fd atomically.
        unsafe { libc::dup3(null, lfd, libc::O_CLOEXEC) };
        sys::close(null);
    } else {
        sys::close(lfd);
    }
}

/// Binds the listener again, on its old fd number. Retries while the name is
/// still taken (the dumped original may still be going away).
fn relisten(pid: i32) {
    let lfd = LISTEN_FD.load(SeqCst);
    for _ in 0..50 {
        if let Ok(fd) = sys::listen_abstract(&socket_name(pid)) {
            // SAFETY: dup3 puts the new socket on our own fd number.
            if unsafe { libc::dup3(fd, lfd, libc::O_CLOEXEC) } >= 0 {
                sys::close(fd);
            } else {
                LISTEN_FD.store(fd, SeqCst);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
