//! Process-level state: identity, exit status, credentials, prctl, personality,
//! rlimits, cwd/umask, and process trees (children, groups, sessions, zombies,
//! orphans, stopped children).
//!
//! `wl-proc --ctl DIR MODE [ARGS]`, MODE one of: idle, exit CODE, signal SIG,
//! creds, caps, sched, tracer, leaderless, prctl, personality, rlimit, fs, tree, pgid, session, zombie, orphan,
//! stopped.

use crest_workloads::support::{
    capget, capset, fork_child, mode, num_arg, setup_failed, sys, wait_ok,
};
use crest_workloads::{Checks, Ctl};
use std::ffi::CString;
use std::time::{Duration, Instant};

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, args) = mode(&args);
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let mut c = Checks::new();
    match mode.as_str() {
        "idle" => {
            ctl.ready();
            ctl.wait_for_go();
        }
        "exit" => {
            let code: i32 = num_arg(&args, 0, "exit code");
            ctl.ready();
            ctl.wait_for_go();
            std::fs::write(ctl.path("result"), "ok\n").unwrap_or_else(|_| setup_failed("result"));
            std::process::exit(code);
        }
        "signal" => {
            let sig: i32 = num_arg(&args, 0, "signal number");
            ctl.ready();
            ctl.wait_for_go();
            std::fs::write(ctl.path("result"), "ok\n").unwrap_or_else(|_| setup_failed("result"));
            // SAFETY: restoring the default action and raising a signal at ourselves.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
            std::process::exit(99);
        }
        "creds" => creds(&ctl, &mut c),
        "caps" => caps(&ctl, &mut c),
        "sched" => sched(&ctl, &mut c),
        "leaderless" => leaderless(&ctl, &mut c),
        "tracer" => {
            // This process traces its own child: a tracing task in the dump.
            let child = fork_child(|| {
                ctl.wait_for_go();
                0
            });
            // SAFETY: PTRACE_SEIZE takes no pointers; the child keeps running.
            sys(
                unsafe { libc::ptrace(libc::PTRACE_SEIZE, child, 0, 0) },
                "PTRACE_SEIZE",
            );
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: detaching needs a stopped tracee; killing the tracer's
            // hold is enough: PTRACE_DETACH fails harmlessly, exit detaches.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, child, 0, 0) };
            if let Err(e) = wait_ok(child, "traced child") {
                c.fail(e);
            }
        }
        "prctl" => prctl(&ctl, &mut c),
        "personality" => {
            let want = (libc::ADDR_NO_RANDOMIZE | libc::ADDR_COMPAT_LAYOUT) as libc::c_ulong;
            // SAFETY: personality takes a plain value.
            sys(unsafe { libc::personality(want) }, "personality");
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: 0xffffffff queries without changing.
            let now = unsafe { libc::personality(0xffff_ffff) } as libc::c_ulong;
            c.eq("personality", now, want);
        }
        "rlimit" => rlimit(&ctl, &mut c),
        "fs" => {
            let dir = ctl.path("cwd dir");
            std::fs::create_dir_all(&dir).unwrap_or_else(|_| setup_failed("mkdir"));
            std::env::set_current_dir(&dir).unwrap_or_else(|_| setup_failed("chdir"));
            // SAFETY: umask cannot fail.
            unsafe { libc::umask(0o027) };
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: as above; read and put back.
            let m = unsafe { libc::umask(0o022) };
            c.eq("umask", m, 0o027);
            c.eq("cwd", std::env::current_dir().ok(), Some(dir));
        }
        "tree" => tree(&ctl, &mut c),
        "pgid" => pgid(&ctl, &mut c),
        "session" => {
            let child = fork_child(|| {
                // SAFETY: setsid/getsid take no pointers.
                let me = unsafe { libc::setsid() };
                child_ready(&ctl, "session");
                ctl.wait_for_go();
                // SAFETY: as above.
                let (sid, pgid) = unsafe { (libc::getsid(0), libc::getpgid(0)) };
                i32::from(sid != me || pgid != me)
            });
            wait_children_ready(&ctl, &["session"]);
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: getsid takes no pointers.
            let (sid, csid) = unsafe { (libc::getsid(0), libc::getsid(child)) };
            c.eq("own sid", sid, pid);
            c.eq("child's sid", csid, child);
            if let Err(e) = wait_ok(child, "child") {
                c.fail(e);
            }
        }
        "zombie" => {
            let child = fork_child(|| 42);
            // Ready only once the child is a zombie.
            wait_until("the child to become a zombie", || {
                proc_state(child) == Some('Z')
            });
            ctl.ready();
            ctl.wait_for_go();
            c.eq("child state before wait", proc_state(child), Some('Z'));
            let mut st = 0;
            // SAFETY: st is a valid out pointer.
            let r = unsafe { libc::waitpid(child, &mut st, libc::WNOHANG) };
            c.eq("waitpid on the zombie", r, child);
            c.check(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 42, || {
                format!("zombie's wait status {st:#x}, expected exit 42")
            });
        }
        "orphan" => orphan(&ctl, &mut c),
        "group-leader-gone" => group_leader_gone(&ctl, &mut c),
        "fork-storm" => fork_storm(&ctl, &mut c),
        "stopped" => {
            let child = fork_child(|| {
                // SAFETY: raising SIGSTOP at ourselves.
                unsafe { libc::raise(libc::SIGSTOP) };
                ctl.wait_for_go();
                0
            });
            let mut st = 0;
            // SAFETY: st is a valid out pointer.
            sys(
                unsafe { libc::waitpid(child, &mut st, libc::WUNTRACED) },
                "waitpid WUNTRACED",
            );
            ctl.ready();
            ctl.wait_for_go();
            c.eq("child state", proc_state(child), Some('T'));
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(child, libc::SIGCONT) };
            if let Err(e) = wait_ok(child, "stopped child") {
                c.fail(e);
            }
        }
        other => {
            eprintln!("wl-proc: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    // SAFETY: getpid cannot fail.
    c.eq("getpid()", unsafe { libc::getpid() }, pid);
    ctl.finish(&c.into_differences());
}

fn creds(ctl: &Ctl, c: &mut Checks) {
    let groups: [libc::gid_t; 3] = [4, 24, 27];
    // SAFETY: groups is valid for its length; setresgid takes plain values.
    unsafe {
        sys(libc::setgroups(groups.len(), groups.as_ptr()), "setgroups");
        sys(libc::setresgid(1000, 1001, 0), "setresgid");
    }
    ctl.ready();
    ctl.wait_for_go();
    let mut got = [0 as libc::gid_t; 16];
    // SAFETY: got is valid for 16 entries.
    let n = unsafe { libc::getgroups(16, got.as_mut_ptr()) };
    c.eq(
        "groups",
        got.get(..n.max(0) as usize).map(|g| g.to_vec()),
        Some(groups.to_vec()),
    );
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: valid out pointers.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    c.eq("real/effective/saved gid", (r, e, s), (1000, 1001, 0));
}

// Capability numbers from linux/capability.h (libc does not export them).
const CAP_CHOWN: u32 = 0;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_BOOT: u32 = 22;
const CAP_MKNOD: u32 = 27;

/// Drops CAP_SYS_BOOT from the bounding set, CAP_NET_RAW from the effective
/// set and CAP_MKNOD from effective and permitted, and makes CAP_CHOWN inheritable.
fn caps(ctl: &Ctl, c: &mut Checks) {
    let mut d = capget();
    d[0].effective &= !(1 << CAP_NET_RAW) & !(1 << CAP_MKNOD);
    d[0].permitted &= !(1 << CAP_MKNOD);
    d[0].inheritable |= 1 << CAP_CHOWN;
    sys(capset(&d), "capset");
    // SAFETY: prctl takes plain values.
    sys(
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_BOOT) },
        "PR_CAPBSET_DROP",
    );
    let want = capget();
    ctl.ready();
    ctl.wait_for_go();
    c.eq(
        "capability sets (effective, permitted, inheritable)",
        capget(),
        want,
    );
    // SAFETY: prctl takes plain values.
    let bset = unsafe { libc::prctl(libc::PR_CAPBSET_READ, CAP_SYS_BOOT) };
    c.eq("CAP_SYS_BOOT in the bounding set", bset, 0);
}

fn affinity() -> Vec<usize> {
    // SAFETY: set is plain data filled by the kernel.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&i| libc::CPU_ISSET(i, &set))
            .collect()
    }
}

/// Nice 5, SCHED_BATCH, and affinity to the first allowed CPU.
fn sched(ctl: &Ctl, c: &mut Checks) {
    let first = affinity().first().copied().unwrap_or(0);
    // SAFETY: plain values and a zeroed, then filled cpu set and sched_param.
    unsafe {
        sys(libc::setpriority(libc::PRIO_PROCESS, 0, 5), "setpriority");
        let p = libc::sched_param { sched_priority: 0 };
        sys(
            libc::sched_setscheduler(0, libc::SCHED_BATCH, &p),
            "sched_setscheduler",
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(first, &mut set);
        sys(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            "sched_setaffinity",
        );
    }
    ctl.ready();
    ctl.wait_for_go();
    // SAFETY: plain values.
    let (nice, policy) = unsafe {
        (
            libc::getpriority(libc::PRIO_PROCESS, 0),
            libc::sched_getscheduler(0),
        )
    };
    c.eq("nice", nice, 5);
    c.eq("scheduling policy", policy, libc::SCHED_BATCH);
    c.eq("CPU affinity", affinity(), vec![first]);
}

fn prctl(ctl: &Ctl, c: &mut Checks) {
    let name = CString::new("wl-prctl-name").unwrap_or_default();
    // SAFETY: prctl with a NUL-terminated name and plain values.
    unsafe {
        sys(libc::prctl(libc::PR_SET_NAME, name.as_ptr()), "PR_SET_NAME");
        sys(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR2),
            "PR_SET_PDEATHSIG",
        );
        sys(libc::prctl(libc::PR_SET_DUMPABLE, 0), "PR_SET_DUMPABLE");
        sys(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "PR_SET_NO_NEW_PRIVS",
        );
        sys(
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1),
            "PR_SET_CHILD_SUBREAPER",
        );
    }
    ctl.ready();
    ctl.wait_for_go();
    let mut buf = [0u8; 16];
    let mut sig: libc::c_int = 0;
    let mut reaper: libc::c_int = 0;
    // SAFETY: buf holds 16 bytes (TASK_COMM_LEN); sig and reaper are valid out pointers.
    let (dumpable, nnp) = unsafe {
        libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr());
        libc::prctl(libc::PR_GET_PDEATHSIG, &mut sig);
        libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut reaper);
        (
            libc::prctl(libc::PR_GET_DUMPABLE),
            libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        )
    };
    let got = String::from_utf8_lossy(buf.split(|&b| b == 0).next().unwrap_or(&[])).to_string();
    c.eq("comm", got.as_str(), "wl-prctl-name");
    c.eq("pdeathsig", sig, libc::SIGUSR2);
    c.eq("dumpable", dumpable, 0);
    c.eq("no_new_privs", nnp, 1);
    c.eq("child_subreaper", reaper, 1);
}

fn rlimit(ctl: &Ctl, c: &mut Checks) {
    let set = [
        (libc::RLIMIT_NOFILE, 200, 300),
        (libc::RLIMIT_CORE, 0, 0),
        (libc::RLIMIT_NPROC, 5000, 6000),
        (libc::RLIMIT_MSGQUEUE, 4096, 8192),
    ];
    for (res, cur, max) in set {
        let l = libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        // SAFETY: l is a valid rlimit.
        sys(unsafe { libc::setrlimit(res, &l) }, "setrlimit");
    }
    ctl.ready();
    ctl.wait_for_go();
    for (res, cur, max) in set {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: l is a valid out pointer.
        unsafe { libc::getrlimit(res, &mut l) };
        c.eq(
            &format!("rlimit {res}"),
            (l.rlim_cur, l.rlim_max),
            (cur, max),
        );
    }
}

/// A child announces it is set up by creating `ready.NAME`.
fn child_ready(ctl: &Ctl, name: &str) {
    let tmp = ctl.path(&format!("ready.{name}.tmp"));
    // SAFETY: getpid cannot fail.
    let _ = std::fs::write(&tmp, format!("{}\n", unsafe { libc::getpid() }));
    let _ = std::fs::rename(&tmp, ctl.path(&format!("ready.{name}")));
}

fn wait_children_ready(ctl: &Ctl, names: &[&str]) {
    wait_until("the children to be ready", || {
        names
            .iter()
            .all(|n| ctl.path(&format!("ready.{n}")).exists())
    });
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > Duration::from_secs(20) {
            eprintln!("setup failed: timed out waiting for {what}");
            std::process::exit(2);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn proc_state(pid: libc::pid_t) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.get(s.rfind(')')? + 2..)?.chars().next()
}

/// parent → A → C, parent → B; everyone checks its parent after the restore.
fn tree(ctl: &Ctl, c: &mut Checks) {
    // SAFETY: getpid/getppid cannot fail.
    let me = unsafe { libc::getpid() };
    let a = fork_child(|| {
        // SAFETY: as above.
        let a = unsafe { libc::getpid() };
        let gc = fork_child(|| {
            child_ready(ctl, "c");
            ctl.wait_for_go();
            // SAFETY: getppid cannot fail.
            i32::from(unsafe { libc::getppid() } != a)
        });
        child_ready(ctl, "a");
        ctl.wait_for_go();
        // SAFETY: getppid cannot fail.
        let bad_parent = unsafe { libc::getppid() } != me;
        let gc_ok = wait_ok(gc, "grandchild")
            .map_err(|e| eprintln!("{e}"))
            .is_ok();
        i32::from(bad_parent || !gc_ok)
    });
    let b = fork_child(|| {
        child_ready(ctl, "b");
        ctl.wait_for_go();
        // SAFETY: getppid cannot fail.
        i32::from(unsafe { libc::getppid() } != me)
    });
    wait_children_ready(ctl, &["a", "b", "c"]);
    ctl.ready();
    ctl.wait_for_go();
    for (pid, who) in [(a, "child a (with a grandchild)"), (b, "child b")] {
        if let Err(e) = wait_ok(pid, who) {
            c.fail(e);
        }
    }
}

/// A session whose leader is gone: child A makes its own session, forks B and
/// exits; B (reparented to us, a subreaper) stays in A's session, whose id no
/// live process has as pid.
fn leaderless(ctl: &Ctl, c: &mut Checks) {
    // SAFETY: prctl with plain values.
    sys(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) },
        "PR_SET_CHILD_SUBREAPER",
    );
    let a = fork_child(|| {
        // SAFETY: setsid/getpid take no pointers.
        let sid = unsafe { libc::setsid() };
        fork_child(|| {
            // SAFETY: getppid cannot fail.
            wait_until("reparenting", || unsafe { libc::getppid() } != sid);
            child_ready(ctl, "b");
            ctl.wait_for_go();
            // SAFETY: getsid/getpgid take plain values.
            let (s, g) = unsafe { (libc::getsid(0), libc::getpgid(0)) };
            if (s, g) != (sid, sid) {
                eprintln!("b: session/group ({s}, {g}), expected ({sid}, {sid})");
                return 1;
            }
            0
        });
        0
    });
    if let Err(e) = wait_ok(a, "session leader") {
        setup_failed(&e);
    }
    wait_children_ready(ctl, &["b"]);
    let b: libc::pid_t = std::fs::read_to_string(ctl.path("ready.b"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| setup_failed("ready.b"));
    ctl.ready();
    ctl.wait_for_go();
    // SAFETY: getsid takes a plain value.
    c.eq(
        "b's session (its leader's pid, leader gone)",
        unsafe { libc::getsid(b) },
        a,
    );
    if let Err(e) = wait_ok(b, "b") {
        c.fail(e);
    }
}

/// Keeps forking children and spawning threads while it is dumped: the
/// freeze must catch every process and thread that appears meanwhile. After
/// `go`, every child forked (before or during the dump) must still be there
/// and exit cleanly, and threads must keep being spawned.
fn fork_storm(ctl: &Ctl, c: &mut Checks) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const CHILDREN: usize = 60;
    let go = std::ffi::CString::new(ctl.path("go").as_os_str().as_encoded_bytes())
        .unwrap_or_else(|_| setup_failed("go path"));
    let spawned = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (spawned2, stop2) = (Arc::clone(&spawned), Arc::clone(&stop));
    let spawner = std::thread::spawn(move || {
        while !stop2.load(Ordering::Acquire) {
            let s = Arc::clone(&spawned2);
            let _ = std::thread::spawn(move || s.fetch_add(1, Ordering::AcqRel)).join();
        }
    });
    let mut children = Vec::new();
    for i in 0..CHILDREN {
        // SAFETY: the child only calls async-signal-safe functions (access,
        // nanosleep, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            setup_failed("fork");
        }
        if pid == 0 {
            let ms = libc::timespec {
                tv_sec: 0,
                tv_nsec: 5_000_000,
            };
            // SAFETY: as above.
            unsafe {
                while libc::access(go.as_ptr(), libc::F_OK) != 0 {
                    libc::nanosleep(&ms, std::ptr::null_mut());
                }
                libc::_exit(0);
            }
        }
        children.push(pid);
        if i == CHILDREN / 4 {
            // Ready while a quarter is forked: the dump lands mid-storm.
            ctl.ready();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    ctl.wait_for_go();
    let at_go = spawned.load(Ordering::Acquire);
    wait_until("threads to be spawned after go", || {
        spawned.load(Ordering::Acquire) >= at_go + 20
    });
    stop.store(true, Ordering::Release);
    let _ = spawner.join();
    for (i, pid) in children.iter().enumerate() {
        if let Err(e) = wait_ok(*pid, &format!("child {i}")) {
            c.fail(e);
        }
    }
}

/// Child a leads a new group, child b joins it, then a exits: b stays in a
/// group whose leader is gone (a shell pipeline whose first command ended).
fn group_leader_gone(ctl: &Ctl, c: &mut Checks) {
    let a = fork_child(|| {
        // SAFETY: setpgid takes plain values.
        unsafe { libc::setpgid(0, 0) };
        child_ready(ctl, "a");
        loop {
            // SAFETY: pause takes nothing; the parent kills us once b has joined.
            unsafe { libc::pause() };
        }
    });
    wait_children_ready(ctl, &["a"]);
    let b = fork_child(|| {
        // SAFETY: setpgid/getpgid take plain values.
        if unsafe { libc::setpgid(0, a) } != 0 {
            eprintln!("b: setpgid to {a}: {}", std::io::Error::last_os_error());
            return 2;
        }
        child_ready(ctl, "b");
        ctl.wait_for_go();
        // SAFETY: as above.
        let g = unsafe { libc::getpgid(0) };
        if g != a {
            eprintln!("b: group {g}, expected {a} (its leader gone)");
            return 1;
        }
        0
    });
    wait_children_ready(ctl, &["b"]);
    // SAFETY: kill and waitpid on our own child a.
    unsafe {
        libc::kill(a, libc::SIGKILL);
        libc::waitpid(a, std::ptr::null_mut(), 0);
    }
    ctl.ready();
    ctl.wait_for_go();
    // SAFETY: getpgid takes a plain value.
    c.eq(
        "b's group (its leader gone)",
        unsafe { libc::getpgid(b) },
        a,
    );
    if let Err(e) = wait_ok(b, "b") {
        c.fail(e);
    }
}

/// Child a leads its own group; child b stays in the parent's.
fn pgid(ctl: &Ctl, c: &mut Checks) {
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    let a = fork_child(|| {
        // SAFETY: setpgid/getpgid take plain values.
        unsafe { libc::setpgid(0, 0) };
        child_ready(ctl, "a");
        ctl.wait_for_go();
        // SAFETY: as above.
        i32::from(unsafe { libc::getpgid(0) != libc::getpid() })
    });
    let b = fork_child(|| {
        child_ready(ctl, "b");
        ctl.wait_for_go();
        // SAFETY: getpgid takes a plain value.
        i32::from(unsafe { libc::getpgid(0) } != me)
    });
    wait_children_ready(ctl, &["a", "b"]);
    ctl.ready();
    ctl.wait_for_go();
    // SAFETY: getpgid takes a plain value.
    let (pa, pb) = unsafe { (libc::getpgid(a), libc::getpgid(b)) };
    c.eq("child a's pgid", pa, a);
    c.eq("child b's pgid", pb, me);
    for (pid, who) in [(a, "child a"), (b, "child b")] {
        if let Err(e) = wait_ok(pid, who) {
            c.fail(e);
        }
    }
}

/// parent → A → C; A exits, so C is an orphan reparented to init or a
/// subreaper. C reports through `result.orphan`.
fn orphan(ctl: &Ctl, c: &mut Checks) {
    let a = fork_child(|| {
        // SAFETY: getpid cannot fail.
        let dead_parent = unsafe { libc::getpid() };
        fork_child(|| {
            // SAFETY: getppid cannot fail.
            wait_until("reparenting", || unsafe { libc::getppid() } != dead_parent);
            child_ready(ctl, "c");
            ctl.wait_for_go();
            // SAFETY: getppid/getsid cannot fail.
            let (ppid, sid) = unsafe { (libc::getppid(), libc::getsid(0)) };
            let verdict = if ppid == dead_parent {
                format!("parent is the dead {dead_parent}")
            } else {
                "ok".into()
            };
            // Written then renamed: the parent polls for the file and must
            // never read it half-written.
            let tmp = ctl.path("result.orphan.tmp");
            let _ = std::fs::write(&tmp, format!("{verdict} sid {sid}\n"))
                .and_then(|()| std::fs::rename(&tmp, ctl.path("result.orphan")));
            0
        });
        0
    });
    if let Err(e) = wait_ok(a, "middle child") {
        setup_failed(&e);
    }
    wait_children_ready(ctl, &["c"]);
    ctl.ready();
    ctl.wait_for_go();
    // SAFETY: getsid cannot fail.
    let sid = unsafe { libc::getsid(0) };
    let path = ctl.path("result.orphan");
    let t0 = Instant::now();
    while !path.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = std::fs::read_to_string(&path).unwrap_or_else(|_| "no report from the orphan".into());
    c.eq(
        "orphan's report",
        got.trim(),
        format!("ok sid {sid}").as_str(),
    );
}
