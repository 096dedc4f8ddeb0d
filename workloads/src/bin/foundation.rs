//! The engine-foundation workload: one single-threaded process holding the
//! state of the foundation requirements, which checks all of it after restore.
//!
//! `foundation --ctl DIR [--heap-mib N]`
//!
//! State: an N MiB heap pattern (default 64), a read-only and a PROT_NONE
//! area, a private file mapping with one modified page, brk, an open file at a
//! known offset, /dev/null, a signal handler, a blocked pending signal, a
//! sigaltstack, an itimer, umask, cwd, an rlimit, the comm name, credentials
//! (supplementary groups, an effective gid, a capability left out of the
//! effective set), and an SSE register value held across the checkpoint
//! inside a raw syscall loop.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use crest_workloads::support::{capget, capset, CapData};
use crest_workloads::{fill_pattern, first_pattern_mismatch, Checks, Ctl};

static USR1_HITS: AtomicU32 = AtomicU32::new(0);
static USR2_HITS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    USR1_HITS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    USR2_HITS.fetch_add(1, Ordering::SeqCst);
}

const FILE_OFFSET: u64 = 1000;
const PAGE: usize = 4096;

/// The credentials it sets up: supplementary groups, (real, effective,
/// saved) gids, and a capability dropped from the effective set only.
const GROUPS: [libc::gid_t; 2] = [100, 4242];
const GIDS: (libc::gid_t, libc::gid_t, libc::gid_t) = (0, 4242, 0);
const CAP_NET_RAW: u32 = 13;

/// Sets [`GROUPS`], [`GIDS`] and drops CAP_NET_RAW from the effective set.
fn set_credentials() {
    let mut d = capget();
    d[0].effective &= !(1 << CAP_NET_RAW);
    // SAFETY: plain values and an array of the length given.
    let ok = unsafe {
        libc::setgroups(GROUPS.len(), GROUPS.as_ptr()) == 0
            && libc::setresgid(GIDS.0, GIDS.1, GIDS.2) == 0
    } && capset(&d) == 0;
    assert!(ok, "set credentials: {}", std::io::Error::last_os_error());
}

/// The process's credentials as it checks them.
fn credentials() -> (
    Vec<libc::gid_t>,
    (libc::gid_t, libc::gid_t, libc::gid_t),
    [CapData; 2],
) {
    let mut groups = [0 as libc::gid_t; 32];
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: groups is valid for 32 entries; the rest are out pointers.
    let n = unsafe {
        libc::getresgid(&mut r, &mut e, &mut s);
        libc::getgroups(32, groups.as_mut_ptr())
    };
    (groups[..n.max(0) as usize].to_vec(), (r, e, s), capget())
}

/// ITIMER_REAL's value and interval, in microseconds.
fn itimer_real_us() -> (i64, i64) {
    // SAFETY: it is a valid out pointer.
    let it = unsafe {
        let mut it: libc::itimerval = std::mem::zeroed();
        libc::getitimer(libc::ITIMER_REAL, &mut it);
        it
    };
    let us = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
    (us(it.it_value), us(it.it_interval))
}

/// How long the itimer runs before `ready`: a restore that re-armed it with
/// its original value instead of what was left shows more time left than at
/// `ready`, when it takes less than this to come back.
const ITIMER_HEAD_START: std::time::Duration = std::time::Duration::from_secs(1);

fn mmap_anon(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping; checked for failure.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p.cast()
}

fn sigaction(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: installs a handler that only touches an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART | libc::SA_ONSTACK;
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Holds `value` in xmm7 while polling for `go` with raw nanosleep/access
/// syscalls, and returns what xmm7 holds afterwards. Nothing but the kernel
/// (and a checkpoint) runs in between, so a difference means the FPU state
/// was not carried across.
fn hold_xmm_until(go: &CString, value: [u8; 16]) -> [u8; 16] {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 5_000_000,
    };
    let mut out = [0u8; 16];
    // SAFETY: the asm reads `value`, `ts`, `go` and writes `out`, all live for the
    // block; it clobbers only the registers it declares.
    unsafe {
        std::arch::asm!(
            "movdqu xmm7, [{val}]",
            "2:",
            "mov eax, 35",
            "mov rdi, {ts}",
            "xor esi, esi",
            "syscall",
            "mov eax, 21",
            "mov rdi, {go}",
            "xor esi, esi",
            "syscall",
            "test rax, rax",
            "jnz 2b",
            "movdqu [{out}], xmm7",
            val = in(reg) value.as_ptr(),
            ts = in(reg) &ts,
            go = in(reg) go.as_ptr(),
            out = in(reg) out.as_mut_ptr(),
            out("rax") _, out("rdi") _, out("rsi") _, out("rcx") _, out("r11") _, out("xmm7") _,
        );
    }
    out
}

fn main() {
    let (ctl, args) = Ctl::from_args();
    let heap_mib: usize = match args.iter().position(|a| a == "--heap-mib") {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.to_str()?.parse().ok())
            .expect("--heap-mib N"),
        None => 64,
    };
    std::env::set_current_dir(ctl.dir()).expect("chdir to the control dir");
    // The itimer first: it must have run a while by `ready` (see ITIMER_HEAD_START).
    let itv = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 7,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: 3600,
            tv_usec: 0,
        },
    };
    // SAFETY: itv is valid.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &itv, std::ptr::null_mut()) };
    let armed = std::time::Instant::now();

    // Memory.
    let mut heap = vec![0u8; heap_mib << 20];
    fill_pattern(&mut heap, 1);
    let ro = mmap_anon(4 * PAGE);
    // SAFETY: `ro` maps 4 pages we own.
    let ro_slice = unsafe { std::slice::from_raw_parts_mut(ro, 4 * PAGE) };
    fill_pattern(ro_slice, 2);
    // SAFETY: changing the protection of our own mapping.
    unsafe { libc::mprotect(ro.cast(), 4 * PAGE, libc::PROT_READ) };
    let guard = mmap_anon(2 * PAGE);
    // SAFETY: writing to our own mapping, then making it inaccessible.
    unsafe {
        *guard = 0x5a;
        libc::mprotect(guard.cast(), 2 * PAGE, libc::PROT_NONE);
    }
    let mapped_path = ctl.path("mapped.bin");
    let mut mapped_content = vec![0u8; 3 * PAGE];
    fill_pattern(&mut mapped_content, 3);
    fs::write(&mapped_path, &mapped_content).expect("write mapped.bin");
    let mf = File::open(&mapped_path).expect("open mapped.bin");
    // SAFETY: a private mapping of a file we just wrote, 3 pages long.
    let fmap = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            3 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            mf.as_raw_fd(),
            0,
        )
    };
    assert_ne!(fmap, libc::MAP_FAILED);
    drop(mf);
    // SAFETY: page 1 of our private mapping: copy-on-write, the file is unchanged.
    unsafe { *fmap.cast::<u8>().add(PAGE + 7) ^= 0xff };
    // SAFETY: sbrk(0) only reads the break; growing it by one page gives memory we own.
    let brk_before = unsafe {
        let b = libc::sbrk(PAGE as isize);
        *(b as *mut u8) = 0x77;
        libc::sbrk(0) as usize
    };

    // Files.
    let data_path = ctl.path("data.txt");
    let mut data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&data_path)
        .expect("data.txt");
    data.write_all(&[b'x'; 4000]).expect("write data.txt");
    data.seek(SeekFrom::Start(FILE_OFFSET)).expect("seek");
    let null = File::open("/dev/null").expect("/dev/null");

    // Signals and timers.
    sigaction(libc::SIGUSR1, on_usr1);
    // SAFETY: blocking SIGUSR2 and sending it to ourselves leaves it pending.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGUSR2);
    }
    let mut altstack = vec![0u8; 64 * 1024];
    let ss = libc::stack_t {
        ss_sp: altstack.as_mut_ptr().cast(),
        ss_flags: 0,
        ss_size: altstack.len(),
    };
    // SAFETY: the alternate stack buffer lives until the end of main.
    unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
    // SAFETY: plain syscalls on ourselves.
    unsafe {
        libc::umask(0o027);
        let lim = libc::rlimit {
            rlim_cur: 512,
            rlim_max: 4096,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::prctl(libc::PR_SET_NAME, c"crest-fdn".as_ptr());
    }
    set_credentials();
    let creds = credentials();

    std::thread::sleep(ITIMER_HEAD_START.saturating_sub(armed.elapsed()));
    let (itimer_at_ready, _) = itimer_real_us();
    let ready_at = std::time::Instant::now();
    ctl.ready();
    let go = CString::new(
        ctl.path(crest_workloads::GO_FILE)
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path");
    let xmm_in = *b"crest-xmm7-value";
    let xmm_out = hold_xmm_until(&go, xmm_in);

    // Verify.
    let mut c = Checks::new();
    c.eq("xmm7 (SSE state)", xmm_out, xmm_in);
    if let Some(at) = first_pattern_mismatch(&heap, 1) {
        c.fail(format!("heap pattern differs at offset {at}"));
    }
    c.eq("read-only area", first_pattern_mismatch(ro_slice, 2), None);
    // SAFETY: the PROT_NONE area must be readable again once we unprotect it.
    unsafe {
        libc::mprotect(guard.cast(), 2 * PAGE, libc::PROT_READ);
        c.eq("PROT_NONE area content", *guard, 0x5a);
    }
    // SAFETY: reading back our private file mapping.
    let fslice = unsafe { std::slice::from_raw_parts(fmap.cast::<u8>(), 3 * PAGE) };
    let mut expect = mapped_content.clone();
    expect[PAGE + 7] ^= 0xff;
    c.check(fslice == &expect[..], || {
        "private file mapping lost its modified page".into()
    });
    c.check(
        fs::read(&mapped_path)
            .map(|b| b == mapped_content)
            .unwrap_or(false),
        || "mapped.bin changed on disk".into(),
    );
    // SAFETY: sbrk(0) reads the current break.
    c.eq("brk", unsafe { libc::sbrk(0) as usize }, brk_before);
    // SAFETY: the byte we wrote in the brk area.
    c.eq(
        "brk area content",
        unsafe { *((brk_before - PAGE) as *const u8) },
        0x77,
    );
    c.eq(
        "data.txt offset",
        data.stream_position().ok(),
        Some(FILE_OFFSET),
    );
    let mut buf = [0u8; 10];
    c.check(
        data.read_exact(&mut buf).is_ok() && buf == [b'x'; 10],
        || "data.txt content at offset".into(),
    );
    let mut nb = [0u8; 1];
    c.eq("/dev/null read", (&null).read(&mut nb).ok(), Some(0));
    // SAFETY: plain queries and signals on ourselves.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        c.eq(
            "SIGUSR2 pending",
            libc::sigismember(&pending, libc::SIGUSR2),
            1,
        );
        libc::raise(libc::SIGUSR1);
        c.eq("SIGUSR1 handler ran", USR1_HITS.load(Ordering::SeqCst), 1);
        sigaction(libc::SIGUSR2, on_usr2);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        c.eq(
            "pending SIGUSR2 delivered on unblock",
            USR2_HITS.load(Ordering::SeqCst),
            1,
        );
        let mut old: libc::stack_t = std::mem::zeroed();
        libc::sigaltstack(std::ptr::null(), &mut old);
        c.eq(
            "sigaltstack",
            (old.ss_sp as usize, old.ss_size),
            (altstack.as_ptr() as usize, altstack.len()),
        );
        // What was left at `ready`, less what has passed since (that counts
        // the time it was dumped too, so it is a floor): the value carried
        // across cannot be more than at `ready`, nor less than that floor.
        let (left, interval) = itimer_real_us();
        let passed = ready_at.elapsed().as_micros() as i64;
        c.eq("itimer interval (µs)", interval, 7_000_000);
        c.check(
            left <= itimer_at_ready && left >= itimer_at_ready - passed - 10_000,
            || {
                format!(
                    "itimer value {left} µs: {itimer_at_ready} µs were left at ready, {passed} µs ago"
                )
            },
        );
        let m = libc::umask(0);
        c.eq("umask", m, 0o027);
        let mut uids = (1, 1, 1);
        libc::getresuid(&mut uids.0, &mut uids.1, &mut uids.2);
        c.eq("real/effective/saved uid", uids, (0, 0, 0));
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        c.eq("RLIMIT_NOFILE", (lim.rlim_cur, lim.rlim_max), (512, 4096));
    }
    c.eq(
        "cwd",
        std::env::current_dir().ok(),
        Some(ctl.dir().to_path_buf()),
    );
    c.eq(
        "comm",
        fs::read_to_string("/proc/self/comm").ok(),
        Some("crest-fdn\n".into()),
    );
    let (groups, gids, caps) = credentials();
    c.eq("supplementary groups", groups, GROUPS.to_vec());
    c.eq("real/effective/saved gid", gids, GIDS);
    c.eq(
        "capabilities (effective, permitted, inheritable)",
        caps,
        creds.2,
    );
    c.check(caps[0].effective & (1 << CAP_NET_RAW) == 0, || {
        "CAP_NET_RAW is back in the effective set".into()
    });
    c.check(caps[0].permitted & (1 << CAP_NET_RAW) != 0, || {
        "CAP_NET_RAW left the permitted set".into()
    });
    c.eq(
        "pid",
        fs::read_to_string(ctl.path("ready")).ok(),
        Some(format!("{}\n", std::process::id())),
    );
    drop(altstack);
    ctl.finish(&c.into_differences());
}
