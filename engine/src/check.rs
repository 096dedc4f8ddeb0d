//! `crest check`: which kernel features this kernel offers, and which crest needs.
//! Each probe asks the kernel directly (a syscall with arguments chosen to fail
//! in a telling way) rather than guessing from the version number.

use serde::Serialize;

use nix::errno::Errno;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub available: bool,
    /// What the probe saw.
    pub detail: String,
    /// Whether crest cannot work at all without it.
    pub required: bool,
    /// What crest uses it for.
    pub used_for: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kernel: String,
    pub features: Vec<Feature>,
}

impl Report {
    pub fn missing_required(&self) -> Vec<&Feature> {
        self.features
            .iter()
            .filter(|f| f.required && !f.available)
            .collect()
    }
}

fn errno_of(r: i64) -> Option<Errno> {
    (r < 0).then(Errno::last)
}

fn probe_clone3_set_tid() -> (bool, String) {
    #[repr(C)]
    #[derive(Default)]
    struct Args([u64; 11]);
    let me = [std::process::id() as i32];
    let mut a = Args::default();
    a.0[4] = libc::SIGCHLD as u64;
    a.0[8] = me.as_ptr() as u64;
    a.0[9] = 1;
    // SAFETY: asks for our own (taken) PID, so the kernel refuses with EEXIST
    // without creating a process when set_tid is supported.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &a, std::mem::size_of::<Args>()) };
    if r == 0 {
        // SAFETY: should be impossible (our PID is taken); leave at once if it happens.
        unsafe { libc::_exit(0) };
    }
    if r > 0 {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(r as i32), None);
        return (false, "clone3 ignored set_tid".into());
    }
    match errno_of(r) {
        Some(Errno::EEXIST) => (true, "clone3 honours set_tid".into()),
        Some(Errno::ENOSYS) => (false, "no clone3 (Linux 5.3+)".into()),
        Some(Errno::EPERM) => (
            false,
            "set_tid needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE".into(),
        ),
        Some(e) => (false, format!("clone3: {e}")),
        None => (false, "unexpected".into()),
    }
}

fn probe_syscall(nr: i64, args: [i64; 3], ok: &[Errno]) -> (bool, String) {
    // SAFETY: probes pass invalid fds/null pointers so the call fails harmlessly.
    let r = unsafe { libc::syscall(nr, args[0], args[1], args[2]) };
    match errno_of(r) {
        None => (true, "available".into()),
        Some(Errno::ENOSYS) => (false, "not implemented by this kernel".into()),
        Some(e) if ok.contains(&e) => (true, format!("available (probe answered {e})")),
        Some(e) => (false, format!("{e}")),
    }
}

fn probe_rseq_config() -> (bool, String) {
    // SAFETY: a forked child that only stops itself and exits; the parent traces it.
    match unsafe { nix::unistd::fork() } {
        // SAFETY: the child only makes raw syscalls and exits.
        Ok(nix::unistd::ForkResult::Child) => unsafe {
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            libc::raise(libc::SIGSTOP);
            libc::_exit(0)
        },
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = nix::sys::wait::waitpid(child, None);
            let res = crate::sys::ptrace::Tracee {
                pid: child.as_raw(),
            }
            .rseq();
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            match res {
                Ok(Some(c)) => (
                    true,
                    format!("rseq area of {} bytes reported", c.rseq_abi_size),
                ),
                Ok(None) => (
                    false,
                    "PTRACE_GET_RSEQ_CONFIGURATION unknown (Linux 5.13+)".into(),
                ),
                Err(e) => (false, e.to_string()),
            }
        }
        Err(e) => (false, format!("fork: {e}")),
    }
}

fn probe_prctl_mm_map() -> (bool, String) {
    let mut size: u32 = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE only writes the struct size into `size`.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP_SIZE,
            &mut size as *mut u32,
            0,
            0,
        )
    };
    if r < 0 {
        return (
            false,
            format!("{} (needs CONFIG_CHECKPOINT_RESTORE)", Errno::last()),
        );
    }
    (true, format!("struct prctl_mm_map is {size} bytes"))
}

fn probe_map_vdso() -> (bool, String) {
    const ARCH_MAP_VDSO_64: i64 = 0x2003;
    // SAFETY: we already have a vDSO, so the kernel answers EEXIST without mapping anything.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_MAP_VDSO_64, 0) };
    match errno_of(r) {
        Some(Errno::EEXIST) => (true, "available".into()),
        Some(Errno::EINVAL) => (
            false,
            "unknown arch_prctl (needs CONFIG_CHECKPOINT_RESTORE)".into(),
        ),
        Some(e) => (false, e.to_string()),
        None => (true, "mapped".into()),
    }
}

fn probe_tcp_repair() -> (bool, String) {
    // SAFETY: a socket we create and close; setsockopt reads one int.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if s < 0 {
            return (false, format!("socket: {}", Errno::last()));
        }
        let one: libc::c_int = 1;
        let r = libc::setsockopt(
            s,
            libc::SOL_TCP,
            19, /* TCP_REPAIR */
            (&one as *const libc::c_int).cast(),
            4,
        );
        let e = Errno::last();
        libc::close(s);
        if r < 0 {
            return (false, format!("{e} (needs CAP_NET_ADMIN)"));
        }
    }
    (true, "available".into())
}

fn probe_userfaultfd() -> (bool, String) {
    const UFFD_USER_MODE_ONLY: i64 = 1;
    // SAFETY: creates an fd we close at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC as i64 | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return (false, format!("{}", Errno::last()));
    }
    // SAFETY: closing the fd we created.
    unsafe { libc::close(fd as i32) };
    (true, "available".into())
}

fn has_cap(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            crate::sys::proc::status_field(&s, "CapEff")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
        })
        .is_some_and(|caps| caps & (1u64 << cap) != 0)
}

/// Probes this kernel.
pub fn check() -> Report {
    let f = |name, (available, detail): (bool, String), required, used_for| Feature {
        name,
        available,
        detail,
        required,
        used_for,
    };
    let features = vec![
        f(
            "clone3 set_tid",
            probe_clone3_set_tid(),
            true,
            "restore processes with their original PIDs",
        ),
        f(
            "PR_SET_MM_MAP",
            probe_prctl_mm_map(),
            true,
            "restore brk, arg/env ranges, auxv and exe",
        ),
        f(
            "process_vm_readv",
            probe_syscall(
                libc::SYS_process_vm_readv,
                [0, 0, 0],
                &[Errno::ESRCH, Errno::EINVAL, Errno::EFAULT],
            ),
            true,
            "copy memory at dump and restore",
        ),
        f(
            "kcmp",
            probe_syscall(
                libc::SYS_kcmp,
                [0, 0, 99],
                &[Errno::EINVAL, Errno::ESRCH, Errno::EPERM],
            ),
            true,
            "find descriptors that share an open file",
        ),
        f(
            "pidfd_getfd",
            probe_syscall(libc::SYS_pidfd_getfd, [-1, 0, 0], &[Errno::EBADF]),
            false,
            "inspect a target's sockets and files",
        ),
        f(
            "PTRACE_GET_RSEQ_CONFIGURATION",
            probe_rseq_config(),
            false,
            "carry glibc's rseq registration across",
        ),
        f(
            "ARCH_MAP_VDSO",
            probe_map_vdso(),
            false,
            "map a vDSO at a chosen address",
        ),
        f(
            "TCP_REPAIR",
            probe_tcp_repair(),
            false,
            "established TCP connections",
        ),
        f(
            "nf_tables",
            match crate::net::netlock::tables() {
                Ok(_) => (true, "available".into()),
                Err(e) => (false, e.to_string()),
            },
            false,
            "holding the traffic of connections to peers outside the dump (--tcp-established)",
        ),
        f(
            "userfaultfd",
            probe_userfaultfd(),
            false,
            "write tracking for pre-copy dumps",
        ),
        f(
            "soft-dirty",
            crate::sys::proc::probe_soft_dirty(),
            false,
            "incremental dumps (pre-dump)",
        ),
        f(
            "PAGEMAP_SCAN",
            crate::sys::proc::probe_pagemap_scan(),
            false,
            "fast scans of touched and written pages",
        ),
        Feature {
            name: "CAP_SYS_RESOURCE",
            available: has_cap(24),
            detail: if has_cap(24) {
                "held".into()
            } else {
                "not held: hard rlimits above crest's own cannot be restored".into()
            },
            required: false,
            used_for: "restore raised hard rlimits",
        },
    ];
    Report {
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        features,
    }
}

/// The report as a terminal table.
pub fn render(report: &Report) -> String {
    let mut out = format!("kernel {}\n", report.kernel);
    let w = report
        .features
        .iter()
        .map(|f| f.name.len())
        .max()
        .unwrap_or(0);
    for f in &report.features {
        let mark = match (f.available, f.required) {
            (true, _) => "yes",
            (false, true) => "NO (required)",
            (false, false) => "no",
        };
        out.push_str(&format!(
            "{:<w$}  {:<13}  {}  [{}]\n",
            f.name, mark, f.used_for, f.detail
        ));
    }
    let missing = report.missing_required();
    if missing.is_empty() {
        out.push_str("crest can dump and restore on this kernel.\n");
    } else {
        let names: Vec<_> = missing.iter().map(|f| f.name).collect();
        out.push_str(&format!(
            "crest cannot restore here: missing {}\n",
            names.join(", ")
        ));
    }
    out
}
