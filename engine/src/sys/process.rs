//! Creating processes the way a restore needs: `clone3` (with `set_tid` for
//! a chosen PID, or `CLONE_NEWPID`), and what a freshly cloned restore child
//! drops of crest's (its rseq registration, a helper's SIGCHLD).

/// `struct clone_args`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `clone3(args)`: 0 in the child, the child's PID in the parent, -1 with
/// errno on failure.
///
/// # Safety
/// Without `CLONE_VM` this forks: the caller must be single-threaded (the
/// child gets a copy of this thread only) and the child must not return
/// into code that relies on the parent's other threads or locks.
pub unsafe fn clone3(args: &CloneArgs) -> i64 {
    // SAFETY: clone3 reads `size_of::<CloneArgs>()` bytes of `args`, which
    // lives across the call; the rest is the caller's contract above.
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    }
}

/// Drops glibc's rseq registration of this (restore child) thread: its area is
/// in crest's memory, which the restorer unmaps, and the kernel would fault
/// writing to it. Done here rather than through ptrace because kernels before
/// 5.13 cannot report it to a tracer. glibc 2.35+ exports where it is.
pub fn unregister_own_rseq() {
    const RSEQ_SIG: u32 = 0x5305_3053;
    const RSEQ_FLAG_UNREGISTER: i32 = 1;
    // SAFETY: dlsym only looks symbols up; the values read are glibc's own
    // exported constants, and rseq(2) with the registered area and flag 1 only
    // unregisters it.
    unsafe {
        let offset = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()).cast::<isize>();
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()).cast::<u32>();
        if offset.is_null() || size.is_null() || *size == 0 {
            return;
        }
        let tp: u64;
        std::arch::asm!("mov {}, fs:0", out(reg) tp);
        let area = (tp as isize + *offset) as u64;
        // glibc registers 32 bytes even when __rseq_size says less.
        let len = (*size).max(32);
        libc::syscall(libc::SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, RSEQ_SIG);
    }
}

/// Drops the SIGCHLD a helper's or a zombie's death queued for us (all our
/// signals are blocked): the dumped process had not had it.
pub fn drop_pending_sigchld() {
    // SAFETY: sigtimedwait with a zero timeout only dequeues a pending SIGCHLD.
    unsafe {
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&chld, std::ptr::null_mut(), &zero);
    }
}
