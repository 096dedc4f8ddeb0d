//! libcrest: a program's part in its own checkpoint, after BLCR's
//! `libcr` (`cr_register_callback`, `cr_checkpoint`, `cr_enter_cs`,
//! `cr_request_checkpoint`).
//!
//! Built as `libcrest.so` for C (see `crest.h`, the same functions as
//! [`ffi`]) and as a Rust crate (this module). A process that never calls
//! [`init`] (or registers nothing) is dumped transparently; once it has,
//! `crest dump` runs its callbacks before freezing it and tells them after
//! whether the process continues or was restarted.
//!
//! - [`register_thread`]: the callback runs on the library's `crest-cb`
//!   thread and may call anything.
//! - [`register_signal`] (unsafe): the callback runs in a signal handler
//!   ([`signal_number`]) on the thread that registered it, so it may call
//!   only async-signal-safe functions.
//!
//! Each callback calls [`checkpoint`] once: the callbacks registered before
//! it (of its kind, and for signal callbacks of its thread) run inside that
//! call, so "before" parts run in reverse registration order and "after"
//! parts in registration order. [`abort`] instead refuses the checkpoint:
//! `crest dump` fails with the reason and the process runs on.
//!
//! Inside a callback, do not enter a critical section or request a checkpoint.

mod core;
pub mod ffi;
mod request;
mod sys;

use std::path::Path;
use std::time::Duration;

/// How a checkpoint ended for the process that took part in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The dump is complete and this is the original process, running on.
    Continued,
    /// This process was restored from the image.
    Restarted,
}

/// Why a callback refuses the checkpoint (BLCR's temporary and permanent failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Try again later.
    Temporary,
    /// This process cannot be checkpointed.
    Permanent,
}

/// An errno-style error from the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error(pub i32);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            libc::ECANCELED => write!(f, "the checkpoint was cancelled or failed"),
            libc::EINVAL => write!(f, "not inside a checkpoint callback"),
            e => write!(f, "{}", std::io::Error::from_raw_os_error(e)),
        }
    }
}

impl std::error::Error for Error {}

fn outcome(r: i32) -> Result<Outcome, Error> {
    match r {
        0 => Ok(Outcome::Continued),
        1 => Ok(Outcome::Restarted),
        e => Err(Error(-e)),
    }
}

/// Starts the library in this process: its control socket `@crest-api.PID`
/// and its two threads, `crest-ctl` and `crest-cb`. Idempotent; a forked
/// child calls it again to take part in checkpoints itself.
pub fn init() -> Result<(), Error> {
    core::init().map_err(Error)
}

/// The real-time signal that runs signal-context callbacks (SIGRTMAX-1).
/// The program must leave it alone.
pub fn signal_number() -> i32 {
    core::signal_number()
}

/// A registered callback; [`unregister`] removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallbackId(pub usize);

extern "C" fn call_boxed(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg is the leaked Box registered by register_boxed, never freed.
    let f = unsafe { &*(arg as *const Box<dyn Fn() + Send + Sync>) };
    f();
    0
}

fn register_boxed(f: Box<dyn Fn() + Send + Sync>, kind: u32) -> Result<CallbackId, Error> {
    // Leaked on purpose: a signal handler may call it at any time.
    let arg = Box::into_raw(Box::new(f)) as *mut libc::c_void;
    core::register(call_boxed, arg, kind)
        .map(CallbackId)
        .map_err(Error)
}

/// Registers `f` to run on the library's callback thread at each checkpoint.
pub fn register_thread(f: impl Fn() + Send + Sync + 'static) -> Result<CallbackId, Error> {
    register_boxed(Box::new(f), core::KIND_THREAD)
}

/// Registers `f` to run in a signal handler on the calling thread at each checkpoint.
///
/// # Safety
/// `f` runs in signal-handler context: it may only call async-signal-safe
/// functions (no allocation, no locks the interrupted code may hold).
pub unsafe fn register_signal(f: impl Fn() + Send + Sync + 'static) -> Result<CallbackId, Error> {
    register_boxed(Box::new(f), core::KIND_SIGNAL)
}

pub fn unregister(id: CallbackId) -> Result<(), Error> {
    core::unregister(id.0).map_err(Error)
}

/// Inside a callback: lets the checkpoint proceed and returns once it is over.
pub fn checkpoint() -> Result<Outcome, Error> {
    outcome(core::checkpoint(0, b""))
}

/// Inside a callback: refuses the checkpoint. `crest dump` fails naming this
/// process and `reason`; every callback's [`checkpoint`] returns an error.
pub fn abort(failure: Failure, reason: &str) -> Error {
    let kind = match failure {
        Failure::Temporary => core::ABORT_TEMPORARY,
        Failure::Permanent => core::ABORT_PERMANENT,
    };
    Error(-core::checkpoint(kind, reason.as_bytes()))
}

/// Defers checkpoints until the last critical section is left. Does not nest
/// with callbacks: never enter one inside a callback.
pub struct CriticalSection(());

impl CriticalSection {
    pub fn enter() -> CriticalSection {
        core::enter_cs();
        CriticalSection(())
    }
}

impl Drop for CriticalSection {
    fn drop(&mut self) {
        core::leave_cs();
    }
}

/// Checkpoints this process into `dir` (`crest dump --leave-running`, crest
/// found through `$CREST_BIN` or `PATH`) and waits for the outcome: the
/// original gets `Continued`, a process restored from `dir` `Restarted`.
pub fn request_checkpoint(dir: &Path, timeout: Duration) -> Result<Outcome, String> {
    request::request(dir, timeout).map(|restarted| {
        if restarted {
            Outcome::Restarted
        } else {
            Outcome::Continued
        }
    })
}

/// Whether a checkpoint is waiting for critical sections to be left.
pub fn checkpoint_pending() -> bool {
    core::PENDING.load(std::sync::atomic::Ordering::SeqCst) != 0
}

/// How many checkpoint cycles this process went through (ended in any way).
pub fn cycles() -> u64 {
    core::CYCLES.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixStream};
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::{Arc, Mutex};

    /// Plays crest's part of one cycle in this process and returns the
    /// address the library reported.
    fn drive(state: u32) -> Option<u64> {
        let addr =
            SocketAddr::from_abstract_name(format!("crest-api.{}", std::process::id())).unwrap();
        let s = UnixStream::connect_addr(&addr).unwrap();
        (&s).write_all(b"checkpoint\n").unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let a = u64::from_str_radix(line.trim().strip_prefix("ready ")?, 16).ok()?;
        (&s).write_all(b"freeze\n").unwrap();
        line.clear();
        assert_eq!(
            r.read_line(&mut line).unwrap(),
            0,
            "the library closes after freeze"
        );
        // What crest writes while the process is frozen.
        // SAFETY: a is the address of the library's state word in this process.
        unsafe { (*(a as *const std::sync::atomic::AtomicU32)).store(state, SeqCst) };
        Some(a)
    }

    #[test]
    fn a_cycle_runs_thread_and_signal_callbacks_nested() {
        assert_eq!(checkpoint(), Err(Error(libc::EINVAL)));
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        for name in ["first", "second"] {
            let log = log.clone();
            register_thread(move || {
                log.lock().unwrap().push(format!("{name} before"));
                let o = checkpoint();
                log.lock().unwrap().push(format!("{name} after {o:?}"));
            })
            .unwrap();
        }
        static SIG: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        // Signal callbacks run on the thread that registers them: not this
        // one, which plays crest and must not be stopped in a handler.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: the callback stores an atomic and calls checkpoint().
            unsafe {
                register_signal(|| {
                    let o = checkpoint();
                    SIG.store(if o == Ok(Outcome::Restarted) { 2 } else { 1 }, SeqCst);
                })
            }
            .unwrap();
            tx.send(()).unwrap();
            while SIG.load(SeqCst) == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        rx.recv().unwrap();
        let a = drive(core::RESTARTED).expect("ready");
        assert_eq!(a, core::STATE.as_ptr() as u64);
        while cycles() < 1 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                "second before",
                "first before",
                "first after Ok(Restarted)",
                "second after Ok(Restarted)"
            ]
        );
        assert_eq!(SIG.load(SeqCst), 2);
        // Critical sections are free again.
        drop(CriticalSection::enter());
    }
}
