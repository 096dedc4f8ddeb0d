//! The callback interface (libcrest): a program that takes part in its own
//! checkpoint.
//!
//! `wl-api --ctl DIR MODE [EXPECT]`, EXPECT the outcome the callbacks must see
//! (`restarted`, `continued`, or `any`; the outcome is also written to
//! `DIR/outcome` for the harness). MODE one of:
//! - `signal-order`: two threads, three signal-context callbacks each;
//! - `thread-any`: two thread-context callbacks that allocate, write files,
//!   lock and start threads;
//! - `flag`: one callback of each kind report continue vs restart;
//! - `critical`: a critical section held when the dump starts defers it;
//! - `abort`: a callback refuses the checkpoint with a reason;
//! - `request`: the process checkpoints itself into `DIR/self-img`;
//! - `ring N`: N ranks (children of this launcher, which does not use the
//!   library) pass tokens around a TCP ring; at a checkpoint each rank drains
//!   its in-flight messages, closes its sockets and reconnects afterwards;
//! - `c-abi`: compiles `wl-api.c` against crest.h and libcrest.so with `cc`
//!   and becomes it.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crest::{CriticalSection, Failure, Outcome};
use crest_workloads::support::{gettid, mode, num_arg, setup_failed};
use crest_workloads::{Checks, Ctl};

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, args) = mode(&args);
    let expect = args.first().cloned().unwrap_or_else(|| "any".into());
    let mut c = Checks::new();
    match mode.as_str() {
        "signal-order" => signal_order(&ctl, &mut c, &expect),
        "thread-any" => thread_any(&ctl, &mut c, &expect),
        "flag" => flag(&ctl, &mut c, &expect),
        "critical" => critical(&ctl, &mut c, &expect),
        "abort" => abort(&ctl, &mut c),
        "request" => request(&ctl, &mut c),
        "ring" => ring_launcher(&ctl, &mut c, num_arg(&args, 0, "ranks")),
        "rank" => rank(&ctl, &args),
        "c-abi" => c_abi(&ctl, &args),
        other => {
            eprintln!("wl-api: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}

fn init() {
    if let Err(e) = crest::init() {
        eprintln!("setup failed: crest::init: {e}");
        std::process::exit(2);
    }
}

fn word(o: &Result<Outcome, crest::Error>) -> String {
    match o {
        Ok(Outcome::Continued) => "continued".into(),
        Ok(Outcome::Restarted) => "restarted".into(),
        Err(e) => format!("error ({e})"),
    }
}

/// Checks an outcome word against EXPECT and reports it in DIR/outcome.
fn check_outcome(ctl: &Ctl, c: &mut Checks, what: &str, got: &str, expect: &str) {
    let _ = std::fs::write(ctl.path("outcome"), format!("{got}\n"));
    if expect != "any" && got != expect {
        c.fail(format!(
            "{what}: the checkpoint call returned {got}, expected {expect}"
        ));
    } else if expect == "any" && got != "continued" && got != "restarted" {
        c.fail(format!("{what}: the checkpoint call returned {got}"));
    }
}

// ---- signal-order ----------------------------------------------------------

/// One log entry per callback half, written from signal handlers: thread,
/// callback, phase (1 before, 2 after), outcome code, whether it ran in the
/// handler on the registering thread.
static LOG: [AtomicU64; 512] = [const { AtomicU64::new(0) }; 512];
static LOG_N: AtomicUsize = AtomicUsize::new(0);
static TIDS: [AtomicI32; 2] = [const { AtomicI32::new(0) }; 2];

fn log(v: u64) {
    let i = LOG_N.fetch_add(1, SeqCst);
    if i < LOG.len() {
        LOG[i].store(v, SeqCst);
    }
}

fn outcome_code(o: &Result<Outcome, crest::Error>) -> u64 {
    match o {
        Ok(Outcome::Continued) => 1,
        Ok(Outcome::Restarted) => 2,
        Err(_) => 3,
    }
}

fn code_word(code: u64) -> &'static str {
    match code {
        1 => "continued",
        2 => "restarted",
        3 => "error",
        _ => "none",
    }
}

/// Whether the crest signal is blocked: it is while its own handler runs.
fn in_crest_handler() -> bool {
    // SAFETY: sigset_t is plain data; sigprocmask only writes `old`.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
        libc::sigismember(&old, crest::signal_number()) == 1
    }
}

fn register_signal_callbacks(thread: u64) {
    for cb in 0..3u64 {
        let f = move || {
            let here = (TIDS[thread as usize].load(SeqCst) == gettid()) as u64;
            let handler = in_crest_handler() as u64;
            log(thread << 24 | cb << 16 | 1 << 8 | here << 1 | handler);
            let o = crest::checkpoint();
            log(thread << 24 | cb << 16 | 2 << 8 | outcome_code(&o) << 4 | here << 1 | handler);
        };
        // SAFETY: the callback only reads atomics, calls gettid, sigprocmask
        // and crest::checkpoint, all async-signal-safe, and allocates nothing.
        if let Err(e) = unsafe { crest::register_signal(f) } {
            eprintln!("setup failed: register_signal: {e}");
            std::process::exit(2);
        }
    }
}

fn signal_order(ctl: &Ctl, c: &mut Checks, expect: &str) {
    init();
    TIDS[0].store(gettid(), SeqCst);
    let registered = Arc::new(std::sync::Barrier::new(2));
    let done = Arc::new(AtomicBool::new(false));
    let worker = {
        let (registered, done) = (registered.clone(), done.clone());
        std::thread::Builder::new()
            .name("wl-worker".into())
            .spawn(move || {
                TIDS[1].store(gettid(), SeqCst);
                register_signal_callbacks(1);
                registered.wait();
                while !done.load(SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .unwrap_or_else(|_| setup_failed("spawn"))
    };
    registered.wait();
    register_signal_callbacks(0);
    ctl.ready();
    ctl.wait_for_go();
    done.store(true, SeqCst);
    let _ = worker.join();
    let n = LOG_N.load(SeqCst).min(LOG.len());
    let entries: Vec<u64> = LOG[..n].iter().map(|e| e.load(SeqCst)).collect();
    let mut last = 0;
    for thread in 0..2u64 {
        let mine: Vec<u64> = entries
            .iter()
            .copied()
            .filter(|e| e >> 24 == thread)
            .collect();
        if mine.is_empty() || mine.len() % 6 != 0 {
            c.fail(format!(
                "thread {thread}: {} callback halves logged, expected a multiple of 6 (3 callbacks × before/after)",
                mine.len()
            ));
            continue;
        }
        for cycle in mine.chunks(6) {
            let order: Vec<(u64, u64)> = cycle
                .iter()
                .map(|e| (e >> 16 & 0xff, e >> 8 & 0xff))
                .collect();
            c.eq(
                &format!("thread {thread}: callback order (callback, 1 before / 2 after)"),
                order,
                vec![(2, 1), (1, 1), (0, 1), (0, 2), (1, 2), (2, 2)],
            );
            for e in cycle {
                c.check(e & 1 == 1, || {
                    format!("thread {thread}: a callback did not run in the crest signal handler")
                });
                c.check(e >> 1 & 1 == 1, || format!("thread {thread}: a callback ran on another thread than the one that registered it"));
            }
        }
        last = mine[mine.len() - 1] >> 4 & 0xf;
        for e in mine.iter().filter(|e| **e >> 8 & 0xff == 2) {
            let got = code_word(e >> 4 & 0xf);
            if expect != "any" && got != expect {
                c.fail(format!(
                    "thread {thread}: checkpoint() returned {got}, expected {expect}"
                ));
            }
        }
    }
    check_outcome(ctl, c, "signal callbacks", code_word(last), expect);
}

// ---- thread-any ------------------------------------------------------------

fn thread_any(ctl: &Ctl, c: &mut Checks, expect: &str) {
    init();
    let main_tid = gettid();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    for name in ["A", "B"] {
        let (log, dir) = (log.clone(), ctl.dir().to_path_buf());
        let r = crest::register_thread(move || {
            let comm = std::fs::read_to_string(format!("/proc/self/task/{}/comm", gettid()))
                .unwrap_or_default();
            // Anything goes here: allocation, formatting, files, locks, threads.
            let words: Vec<String> = (0..100).map(|i| format!("{name}{i}")).collect();
            let joined = std::thread::spawn(move || words.join(",").len())
                .join()
                .unwrap_or(0);
            let file = dir.join(format!("cb-{name}.txt"));
            let wrote = std::fs::write(&file, format!("{joined}\n")).is_ok();
            log.lock().unwrap().push(format!(
                "{name} before comm={} main={} wrote={wrote} len={joined}",
                comm.trim(),
                gettid() == main_tid
            ));
            let o = crest::checkpoint();
            let again = std::fs::read_to_string(&file).is_ok();
            log.lock()
                .unwrap()
                .push(format!("{name} after {} reread={again}", word(&o)));
        });
        if let Err(e) = r {
            eprintln!("setup failed: register_thread: {e}");
            std::process::exit(2);
        }
    }
    // What the callbacks do once before the dump, so that the thread stack
    // and malloc arena they use exist already (the outside view compares maps).
    let helper = std::thread::spawn(|| {
        let _ = (0..100).map(|i| format!("{i}")).collect::<Vec<_>>().len();
        gettid()
    })
    .join();
    // join returns when the thread's work is done, a moment before the
    // kernel is done with the thread: wait until it is gone, or the outside
    // view taken now could show it.
    if let Ok(tid) = helper {
        let gone = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
            && std::time::Instant::now() < gone
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    ctl.ready();
    ctl.wait_for_go();
    let got = log.lock().unwrap().clone();
    let mut outcome = "none".to_string();
    if got.is_empty() || got.len() % 4 != 0 {
        c.fail(format!(
            "{} callback halves logged, expected a multiple of 4: {got:?}",
            got.len()
        ));
    }
    for cycle in got.chunks(4) {
        let phases: Vec<String> = cycle
            .iter()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect();
        c.eq(
            "thread callbacks' order",
            phases,
            vec![
                "B before".into(),
                "A before".into(),
                "A after".into(),
                "B after".into(),
            ],
        );
        for l in cycle {
            if l.contains("before") {
                c.check(
                    l.contains("comm=crest-cb main=false wrote=true len=389"),
                    || format!("a thread callback did not run as expected on crest-cb: {l}"),
                );
            } else {
                c.check(l.ends_with("reread=true"), || {
                    format!("a thread callback could not read its file after: {l}")
                });
                outcome = l.split_whitespace().nth(2).unwrap_or("none").to_string();
                c.check(
                    expect == "any" || l.contains(&format!("after {expect} ")),
                    || format!("expected {expect}: {l}"),
                );
            }
        }
    }
    check_outcome(ctl, c, "thread callbacks", &outcome, expect);
}

// ---- flag ------------------------------------------------------------------

static SIG_OUTCOME: AtomicU64 = AtomicU64::new(0);

fn flag(ctl: &Ctl, c: &mut Checks, expect: &str) {
    init();
    let thread_outcome: Arc<Mutex<Vec<String>>> = Arc::default();
    let t = thread_outcome.clone();
    crest::register_thread(move || {
        let o = crest::checkpoint();
        t.lock().unwrap().push(word(&o));
    })
    .unwrap_or_else(|_| setup_failed("register_thread"));
    let f = || {
        let o = crest::checkpoint();
        SIG_OUTCOME.store(outcome_code(&o), SeqCst);
    };
    // SAFETY: the callback only stores an atomic and calls crest::checkpoint.
    unsafe { crest::register_signal(f) }.unwrap_or_else(|_| setup_failed("register_signal"));
    ctl.ready();
    ctl.wait_for_go();
    let t = thread_outcome.lock().unwrap().clone();
    let s = code_word(SIG_OUTCOME.load(SeqCst));
    c.check(t.len() == 1, || {
        format!("the thread callback ran {} times: {t:?}", t.len())
    });
    let t = t.last().cloned().unwrap_or_else(|| "none".into());
    c.eq("signal and thread callbacks agree", s, t.as_str());
    check_outcome(ctl, c, "callbacks", &t, expect);
}

// ---- critical --------------------------------------------------------------

fn critical(ctl: &Ctl, c: &mut Checks, expect: &str) {
    init();
    let start = Instant::now();
    let in_cs = Arc::new(AtomicBool::new(false));
    let saw_pending = Arc::new(AtomicBool::new(false));
    let left_at = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(bool, u64, String)>>> = Arc::default();
    {
        let (in_cs, seen) = (in_cs.clone(), seen.clone());
        crest::register_thread(move || {
            let at = start.elapsed().as_micros() as u64;
            let busy = in_cs.load(SeqCst);
            let o = crest::checkpoint();
            seen.lock().unwrap().push((busy, at, word(&o)));
        })
        .unwrap_or_else(|_| setup_failed("register_thread"));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let (in_cs, saw_pending, left_at, stop) = (
            in_cs.clone(),
            saw_pending.clone(),
            left_at.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            // The long section: held when the dump comes, left a while after
            // the checkpoint is seen waiting for it.
            let cs = CriticalSection::enter();
            in_cs.store(true, SeqCst);
            let _ = tx.send(());
            let until = Instant::now() + Duration::from_secs(30);
            while !crest::checkpoint_pending() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            saw_pending.store(crest::checkpoint_pending(), SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            in_cs.store(false, SeqCst);
            left_at.store(start.elapsed().as_micros() as u64, SeqCst);
            drop(cs);
            // Short sections from then on: they wait while a checkpoint runs.
            while !stop.load(SeqCst) {
                let cs = CriticalSection::enter();
                in_cs.store(true, SeqCst);
                std::thread::sleep(Duration::from_millis(1));
                in_cs.store(false, SeqCst);
                drop(cs);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let _ = rx.recv();
    ctl.ready();
    ctl.wait_for_go();
    stop.store(true, SeqCst);
    let _ = worker.join();
    let seen = seen.lock().unwrap().clone();
    c.check(saw_pending.load(SeqCst), || {
        "the checkpoint never waited for the critical section".into()
    });
    c.check(!seen.is_empty(), || "the callback never ran".into());
    for (busy, at, _) in &seen {
        c.check(!busy, || {
            "the callback ran while a critical section was held".into()
        });
        c.check(*at >= left_at.load(SeqCst), || {
            format!(
                "the callback ran at {at} µs, before the critical section was left at {} µs",
                left_at.load(SeqCst)
            )
        });
    }
    let got = seen.last().map_or("none".to_string(), |s| s.2.clone());
    check_outcome(ctl, c, "callback", &got, expect);
}

// ---- abort -----------------------------------------------------------------

fn abort(ctl: &Ctl, c: &mut Checks) {
    init();
    let answers: Arc<Mutex<Vec<String>>> = Arc::default();
    let a = answers.clone();
    crest::register_thread(move || {
        let e = crest::abort(Failure::Temporary, "wl-api is busy, try later");
        a.lock().unwrap().push(format!("{e}"));
    })
    .unwrap_or_else(|_| setup_failed("register_thread"));
    ctl.ready();
    ctl.wait_for_go();
    let answers = answers.lock().unwrap().clone();
    c.eq("aborting callbacks run", answers.len(), 1);
    c.check(answers.iter().all(|a| a.contains("cancelled")), || {
        format!("abort() returned {answers:?}")
    });
    c.eq("checkpoint cycles", crest::cycles(), 1);
    // The library answers again (its socket is back) and sections still work.
    drop(CriticalSection::enter());
    let pid = std::process::id();
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(format!("crest-api.{pid}"));
    use std::os::linux::net::SocketAddrExt;
    let pong = addr
        .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
        .and_then(|mut s| {
            s.write_all(b"ping\n")?;
            let mut r = String::new();
            s.read_to_string(&mut r)?;
            Ok(r)
        });
    c.check(matches!(&pong, Ok(r) if r == "pong\n"), || {
        format!("libcrest's socket after the refused checkpoint: {pong:?}")
    });
}

// ---- request ---------------------------------------------------------------

fn request(ctl: &Ctl, c: &mut Checks) {
    init();
    let heap = crest_workloads::support::pattern(1 << 20, 77);
    let o = crest::request_checkpoint(&ctl.path("self-img"), Duration::from_secs(120));
    let got = match &o {
        Ok(Outcome::Continued) => "continued".to_string(),
        Ok(Outcome::Restarted) => "restarted".to_string(),
        Err(e) => format!("error: {e}"),
    };
    ctl.ready();
    ctl.wait_for_go();
    if let Some(d) = crest_workloads::support::pattern_diff("heap", &heap, 1 << 20, 77) {
        c.fail(d);
    }
    check_outcome(ctl, c, "request_checkpoint", &got, "any");
}

// ---- ring ------------------------------------------------------------------

const TOKENS: u64 = 4;
const MARKER: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    id: u64,
    hops: u64,
    sum: u64,
}

impl Token {
    fn bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..16].copy_from_slice(&self.hops.to_le_bytes());
        b[16..].copy_from_slice(&self.sum.to_le_bytes());
        b
    }
}

/// What a rank adds to a token it receives at hop `hops`.
fn weight(rank: u64, hops: u64) -> u64 {
    (rank + 1).wrapping_mul(hops)
}

fn ring_launcher(ctl: &Ctl, c: &mut Checks, n: u64) {
    // Free ports now; the ranks bind them with SO_REUSEADDR.
    let ports: Vec<String> = (0..n)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port().to_string())
                .unwrap_or_else(|_| setup_failed("bind"))
        })
        .collect();
    let exe = std::env::current_exe().unwrap_or_else(|_| setup_failed("current_exe"));
    let mut ranks = Vec::new();
    for r in 0..n {
        let child = std::process::Command::new(&exe)
            .arg("--ctl")
            .arg(ctl.dir())
            .arg("rank")
            .arg(r.to_string())
            .args(&ports)
            .spawn()
            .unwrap_or_else(|_| setup_failed("spawn rank"));
        ranks.push(child);
    }
    let until = Instant::now() + Duration::from_secs(60);
    while (0..n).any(|r| !ctl.path(&format!("rank-{r}.ready")).exists()) {
        if Instant::now() > until {
            setup_failed("ranks not ready in 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ctl.ready();
    ctl.wait_for_go();
    let mut retired = Vec::new();
    let mut outcomes = Vec::new();
    for (r, mut child) in ranks.into_iter().enumerate() {
        match child.wait() {
            Ok(st) if st.success() => {}
            other => c.fail(format!("rank {r} ended with {other:?}")),
        }
        let text =
            std::fs::read_to_string(ctl.path(&format!("rank-{r}.result"))).unwrap_or_default();
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["retired", id, hops, sum] => retired.push((
                    r as u64,
                    id.parse::<u64>().unwrap_or(MARKER),
                    hops.parse::<u64>().unwrap_or(0),
                    sum.parse::<u64>().unwrap_or(0),
                )),
                ["outcome", o] => outcomes.push(o.to_string()),
                ["error", ..] => c.fail(format!("rank {r}: {line}")),
                _ => {}
            }
        }
    }
    let mut ids: Vec<u64> = retired.iter().map(|t| t.1).collect();
    ids.sort_unstable();
    c.eq(
        "tokens retired (none lost, none duplicated)",
        ids,
        (0..TOKENS).collect::<Vec<_>>(),
    );
    for &(r, id, hops, sum) in &retired {
        let expected = (1..=hops).fold(0u64, |s, h| s.wrapping_add(weight(h % n, h)));
        c.check(sum == expected && r == (hops % n), || format!("token {id}: {hops} hops, sum {sum} (expected {expected}), retired by rank {r} (expected {})", hops % n));
        c.check(hops > 0, || format!("token {id} never moved"));
    }
    c.check(outcomes.len() == n as usize, || {
        format!(
            "{} checkpoint outcomes from {n} ranks: {outcomes:?}",
            outcomes.len()
        )
    });
    let first = outcomes.first().cloned().unwrap_or_else(|| "none".into());
    c.check(outcomes.iter().all(|o| *o == first), || {
        format!("the ranks saw different outcomes: {outcomes:?}")
    });
    check_outcome(ctl, c, "ring ranks", &first, "any");
}

struct Ring {
    listener: Option<TcpListener>,
    out: Option<TcpStream>,
    inp: Option<TcpStream>,
    buf: Vec<u8>,
    stash: VecDeque<Token>,
    retired: Vec<Token>,
    log: Vec<String>,
    /// The previous rank's marker came in before our own callback ran.
    peer_drained: bool,
}

fn connect_ring(me: u64, ports: &[u16]) -> std::io::Result<(TcpListener, TcpStream, TcpStream)> {
    let n = ports.len() as u64;
    let listener = listener_at(ports[me as usize])?;
    let next = SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports[((me + 1) % n) as usize]);
    let until = Instant::now() + Duration::from_secs(60);
    let out = loop {
        match TcpStream::connect(next) {
            Ok(s) => break s,
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    out.set_nodelay(true)?;
    let (inp, _) = listener.accept()?;
    Ok((listener, out, inp))
}

/// A listener with SO_REUSEADDR (std sets it on Unix), bound to 127.0.0.1:port.
fn listener_at(port: u16) -> std::io::Result<TcpListener> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Puts the new sockets on the descriptor numbers of the old ones (closed,
/// so free), moving them all out of the way first so that none lands on
/// another.
fn renumber_all(
    l: TcpListener,
    o: TcpStream,
    i: TcpStream,
    old: (Option<i32>, Option<i32>, Option<i32>),
) -> (TcpListener, TcpStream, TcpStream) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fds = [l.into_raw_fd(), o.into_raw_fd(), i.into_raw_fd()];
    let targets = [old.0, old.1, old.2];
    let mut out = [0i32; 3];
    for k in 0..3 {
        // SAFETY: fcntl, dup3 and close only act on our own new sockets.
        out[k] = unsafe {
            let high = libc::fcntl(fds[k], libc::F_DUPFD_CLOEXEC, 900);
            if high >= 0 {
                libc::close(fds[k]);
                high
            } else {
                fds[k]
            }
        };
    }
    for k in 0..3 {
        if let Some(to) = targets[k] {
            // SAFETY: as above; `to` belonged to the socket this one replaces.
            unsafe {
                if libc::dup3(out[k], to, libc::O_CLOEXEC) == to {
                    libc::close(out[k]);
                    out[k] = to;
                }
            }
        }
    }
    // SAFETY: each number now holds exactly one of the sockets taken above.
    unsafe {
        (
            TcpListener::from_raw_fd(out[0]),
            TcpStream::from_raw_fd(out[1]),
            TcpStream::from_raw_fd(out[2]),
        )
    }
}

/// Takes whole tokens out of the read buffer.
fn frames(buf: &mut Vec<u8>) -> Vec<Token> {
    let mut out = Vec::new();
    while buf.len() >= 24 {
        let w = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap_or([0; 8]));
        out.push(Token {
            id: w(0),
            hops: w(8),
            sum: w(16),
        });
        buf.drain(..24);
    }
    out
}

fn rank(ctl: &Ctl, args: &[String]) {
    let me: u64 = num_arg(args, 0, "rank");
    let ports: Vec<u16> = args[1..].iter().filter_map(|p| p.parse().ok()).collect();
    let n = ports.len() as u64;
    init();
    let (l, o, i) = connect_ring(me, &ports).unwrap_or_else(|_| setup_failed("connect the ring"));
    let ring = Arc::new(Mutex::new(Ring {
        listener: Some(l),
        out: Some(o),
        inp: Some(i),
        buf: Vec::new(),
        stash: VecDeque::new(),
        retired: Vec::new(),
        log: Vec::new(),
        peer_drained: false,
    }));
    // The LAM/MPI pattern: drain, close, checkpoint, reconnect.
    {
        let ring = ring.clone();
        let ports = ports.clone();
        crest::register_thread(move || {
            let mut r = ring.lock().unwrap();
            let drained = drain(&mut r);
            // The new connections take the old descriptor numbers.
            let old = (
                r.listener.as_ref().map(|s| s.as_raw_fd()),
                r.out.as_ref().map(|s| s.as_raw_fd()),
                r.inp.as_ref().map(|s| s.as_raw_fd()),
            );
            r.out = None;
            r.inp = None;
            r.listener = None;
            let o = crest::checkpoint();
            r.log.push(format!(
                "outcome {}",
                word(&o).split_whitespace().next().unwrap_or("error")
            ));
            if let Err(e) = drained {
                r.log.push(format!("error draining: {e}"));
            }
            match connect_ring(me, &ports) {
                Ok((l, o, i)) => {
                    let (l, o, i) = renumber_all(l, o, i, old);
                    r.listener = Some(l);
                    r.out = Some(o);
                    r.inp = Some(i);
                }
                Err(e) => r.log.push(format!("error reconnecting: {e}")),
            }
        })
        .unwrap_or_else(|_| setup_failed("register_thread"));
    }
    if me == 0 {
        let mut r = ring.lock().unwrap();
        for id in 0..TOKENS {
            r.stash.push_back(Token {
                id,
                hops: 0,
                sum: 0,
            });
        }
    }
    let _ = std::fs::write(ctl.path(&format!("rank-{me}.ready")), "ready\n");
    let go = ctl.path(crest_workloads::GO_FILE);
    let mut go_seen: Option<Instant> = None;
    loop {
        let fd = ring.lock().unwrap().inp.as_ref().map(|s| s.as_raw_fd());
        if let Some(fd) = fd {
            poll_in(fd);
        }
        std::thread::sleep(Duration::from_millis(2));
        if go_seen.is_none() && go.exists() {
            go_seen = Some(Instant::now());
        }
        if go_seen.is_some_and(|t| t.elapsed() > Duration::from_millis(1500)) {
            break;
        }
        let _cs = CriticalSection::enter();
        let mut r = ring.lock().unwrap();
        let r = &mut *r;
        if let Some(inp) = r.inp.as_mut() {
            let _ = inp.set_nonblocking(true);
            let mut chunk = [0u8; 4096];
            while let Ok(k) = inp.read(&mut chunk) {
                if k == 0 {
                    break;
                }
                r.buf.extend_from_slice(&chunk[..k]);
            }
            let _ = inp.set_nonblocking(false);
        }
        let got = frames(&mut r.buf);
        r.stash.extend(got);
        while let Some(mut t) = r.stash.pop_front() {
            if t.id == MARKER {
                // The previous rank is in its callback already, ahead of ours:
                // nothing more comes from it until it reconnects.
                r.peer_drained = true;
                continue;
            }
            if go.exists() {
                r.retired.push(t);
                continue;
            }
            let Some(out) = r.out.as_mut() else {
                r.stash.push_front(t);
                break;
            };
            // The sender counts the hop and the receiver's weight.
            let next = (me + 1) % n;
            t.hops += 1;
            t.sum = t.sum.wrapping_add(weight(next, t.hops));
            if out.write_all(&t.bytes()).is_err() {
                r.log.push(format!("error: write to rank {next} failed"));
                break;
            }
        }
    }
    let r = ring.lock().unwrap();
    let mut text = String::new();
    for t in &r.retired {
        text.push_str(&format!("retired {} {} {}\n", t.id, t.hops, t.sum));
    }
    for l in &r.log {
        text.push_str(l);
        text.push('\n');
    }
    let _ = std::fs::write(ctl.path(&format!("rank-{me}.result")), text);
    std::process::exit(0);
}

fn poll_in(fd: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 10) };
}

/// Sends our marker, reads until the previous rank's marker (keeping the
/// tokens before it for later), so nothing is in flight on the ring.
fn drain(r: &mut Ring) -> std::io::Result<()> {
    let marker = Token {
        id: MARKER,
        hops: 0,
        sum: 0,
    };
    if let Some(out) = r.out.as_mut() {
        out.write_all(&marker.bytes())?;
    }
    if std::mem::take(&mut r.peer_drained) {
        return Ok(());
    }
    let Some(inp) = r.inp.as_mut() else {
        return Ok(());
    };
    inp.set_nonblocking(false)?;
    inp.set_read_timeout(Some(Duration::from_secs(30)))?;
    loop {
        for t in frames(&mut r.buf) {
            if t.id == MARKER {
                return Ok(());
            }
            r.stash.push_back(t);
        }
        let mut chunk = [0u8; 4096];
        let k = inp.read(&mut chunk)?;
        if k == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the previous rank closed before its marker",
            ));
        }
        r.buf.extend_from_slice(&chunk[..k]);
    }
}

// ---- c-abi -----------------------------------------------------------------

const C_SOURCE: &str = include_str!("../../c/wl-api.c");
const C_HEADER: &str = include_str!("../../../engine/api/crest.h");

/// Builds the C program against crest.h and libcrest.so (in deps/ or next to
/// this binary) and execs it with the same pid and arguments.
fn c_abi(ctl: &Ctl, args: &[String]) {
    let exe = std::env::current_exe().unwrap_or_else(|_| setup_failed("current_exe"));
    let bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // deps/ first: cargo refreshes it whenever it builds wl-api, while the
    // copy next to the binaries is only refreshed by `cargo build -p crest-api`.
    let lib_dir: PathBuf = [bin_dir.join("deps"), bin_dir.clone()]
        .into_iter()
        .find(|d| d.join("libcrest.so").is_file())
        .unwrap_or_else(|| {
            eprintln!("setup failed: libcrest.so is neither in {} nor in its deps/ (cargo build -p crest-api)", bin_dir.display());
            std::process::exit(2)
        });
    let src = ctl.path("wl-api.c");
    let _ = std::fs::write(&src, C_SOURCE);
    let _ = std::fs::write(ctl.path("crest.h"), C_HEADER);
    let out = ctl.path("wl-api-c");
    let st = std::process::Command::new("cc")
        .arg("-O1")
        .arg("-Wall")
        .arg("-I")
        .arg(ctl.dir())
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lcrest")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lpthread")
        .status();
    if !matches!(st, Ok(s) if s.success()) {
        eprintln!("setup failed: cc could not build the C program: {st:?}");
        std::process::exit(2);
    }
    let e = std::process::Command::new(&out)
        .arg("--ctl")
        .arg(ctl.dir())
        .args(args)
        .exec();
    eprintln!("setup failed: exec {}: {e}", out.display());
    std::process::exit(2);
}
