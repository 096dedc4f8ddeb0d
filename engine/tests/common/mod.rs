//! Helpers for the engine's end-to-end tests: start a workload the way the
//! conformance harness does, dump it, restore it.
#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn crest() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_crest"))
}

/// A binary of the `crest-workloads` crate, built beside this test.
pub fn workload(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/debug");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or build it with `cargo build -p crest-workloads`)",
        path.display()
    );
    path
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Why a root-only test is not run otherwise.
pub const NEEDS_ROOT: &str = "needs root: checkpoint/restore uses ptrace and clone3 set_tid";

/// A test that needs root: run as root, reported as ignored (with the
/// reason) otherwise, never as passed.
pub fn needs_root(name: &str, test: fn()) -> libtest_mimic::Trial {
    may_not_apply(name, move || {
        test();
        None
    })
}

/// A root-only test that may find it cannot run here: `test` returns why
/// (reported as ignored), or `None` once it ran.
pub fn may_not_apply(
    name: &str,
    test: impl FnOnce() -> Option<&'static str> + Send + 'static,
) -> libtest_mimic::Trial {
    libtest_mimic::Trial::ignorable_test(name, move || {
        if !is_root() {
            return Ok(libtest_mimic::Completion::ignored_with(NEEDS_ROOT));
        }
        Ok(match test() {
            None => libtest_mimic::Completion::Completed,
            Some(why) => libtest_mimic::Completion::ignored_with(why),
        })
    })
}

/// Root-only tests, each named after its function.
#[macro_export]
macro_rules! root_tests {
    ($($test:ident),* $(,)?) => {
        vec![$(common::needs_root(stringify!($test), $test)),*]
    };
}

/// Runs `tests` as the test binary's main (`harness = false`), with cargo
/// test's arguments and exit status.
pub fn run(tests: Vec<libtest_mimic::Trial>) -> std::process::ExitCode {
    libtest_mimic::run(&libtest_mimic::Arguments::from_args(), tests).exit_code()
}

/// A started workload in its own session, stdio in files of `dir`.
pub struct Running {
    pub child: Child,
    pub pid: i32,
    pub dir: PathBuf,
}

/// A test that fails half-way must not leave its workload behind (stopped by
/// `dump --stop`, say): the original child is killed and reaped on drop.
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(dir: &Path, program: &Path, args: &[&str], protocol: bool) -> Running {
    fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new(program);
    if protocol {
        cmd.arg("--ctl").arg(dir);
    }
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("stdout")).unwrap())
        .stderr(fs::File::create(dir.join("stderr")).unwrap());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // Descriptors leaked into the test runner are not the workload's.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn workload");
    let pid = child.id() as i32;
    Running {
        child,
        pid,
        dir: dir.to_path_buf(),
    }
}

pub fn wait_for_file(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn run_crest(args: &[&str]) -> Output {
    Command::new(crest())
        .args(args)
        .output()
        .expect("run crest")
}

pub fn dump(pid: i32, img: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "dump".to_string(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        img.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_crest(&refs)
}

/// `crest restore -D img` in the background (crest stays the parent).
/// It writes `out_dir/restored.pid` once the process runs.
pub fn restore_attached(img: &Path, out_dir: &Path) -> Child {
    let _ = fs::remove_file(out_dir.join("restored.pid"));
    Command::new(crest())
        .args(["restore", "--pidfile"])
        .arg(out_dir.join("restored.pid"))
        .arg("-D")
        .arg(img)
        .stdin(Stdio::null())
        .stdout(fs::File::create(out_dir.join("restore.stdout")).unwrap())
        .stderr(fs::File::create(out_dir.join("restore.stderr")).unwrap())
        .spawn()
        .expect("spawn crest restore")
}

pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// `/proc/PID/maps` with adjacent anonymous mappings of the same protection
/// merged: the kernel may or may not merge such neighbours (it depends on the
/// history of faults), so only the merged view is comparable across a restore.
pub fn merged_maps(pid: i32) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let maps = crest_engine::sys::proc::parse_maps(&text).expect("/proc/PID/maps parses");
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for m in maps {
        let flag = |on: bool, c: char| if on { c } else { '-' };
        let key = format!(
            "{}{}{}{} {:08x} {:02x}:{:02x} {} {}{}",
            flag(m.read, 'r'),
            flag(m.write, 'w'),
            flag(m.exec, 'x'),
            if m.shared { 's' } else { 'p' },
            m.offset,
            m.dev_major,
            m.dev_minor,
            m.inode,
            m.name,
            if m.deleted { " (deleted)" } else { "" }
        );
        let anonymous = m.inode == 0 && m.name.is_empty();
        if let Some(last) = out.last_mut() {
            if anonymous && last.1 == m.start && last.2 == key {
                last.1 = m.end;
                continue;
            }
        }
        out.push((m.start, m.end, key));
    }
    out.into_iter()
        .map(|(s, e, k)| format!("{s:x}-{e:x} {k}"))
        .collect()
}

/// Spawns `cmd` as the leader of a new session, with only its stdio open
/// (descriptors leaked into the test runner are not the program's).
pub fn spawn_in_own_session(cmd: &mut Command) -> Child {
    // SAFETY: async-signal-safe syscalls only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn")
}

pub fn status_line(pid: i32, key: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or("")
        .to_string()
}

/// The target is running normally: not stopped, not traced.
pub fn assert_unharmed(pid: i32) {
    assert!(alive(pid), "pid {pid} should still run");
    assert_eq!(
        status_line(pid, "TracerPid:"),
        "TracerPid:\t0",
        "pid {pid} is still traced"
    );
    let state = status_line(pid, "State:");
    assert!(
        !state.contains("stopped") && !state.contains("tracing"),
        "pid {pid} left {state}"
    );
}

/// A `sleep 30` holding one end of a loopback TCP connection on fd 5, the
/// other end (`server`) held by the test.
pub struct SleepOnConnection {
    pub child: std::process::Child,
    pub server: std::net::TcpStream,
    /// The sleeping end's address.
    pub local: std::net::SocketAddr,
    /// The test's end's address.
    pub peer: std::net::SocketAddr,
}

/// Starts [`SleepOnConnection`], with a netlink socket on fd 6 too when
/// `netlink_on_6`, every other descriptor above 2 closed; returns once its
/// descriptors are in place.
pub fn sleep_on_loopback_connection(netlink_on_6: bool) -> SleepOnConnection {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = l.local_addr().unwrap();
    let client = std::net::TcpStream::connect(peer).unwrap();
    let (server, _) = l.accept().unwrap();
    let local = client.local_addr().unwrap();
    let cfd = client.as_raw_fd();
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("30");
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(cfd, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut first_closed = 6u32;
            if netlink_on_6 {
                let s = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
                if s < 0 || libc::dup2(s, 6) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                first_closed = 7;
            }
            libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0u32);
            libc::syscall(libc::SYS_close_range, 3u32, 4u32, 0u32);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(client);
    let last_fd = if netlink_on_6 { 6 } else { 5 };
    wait_for_file(
        format!("/proc/{}/fd/{last_fd}", child.id()).as_ref(),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_millis(50));
    SleepOnConnection {
        child,
        server,
        local,
        peer,
    }
}

/// Everything `s` sent was acknowledged by its peer within 3 s (SIOCOUTQ
/// drains): no repair mode, no network lock holds the connection.
pub fn assert_acknowledged(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ's number) writes one int.
        let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        assert_eq!(r, 0);
        if queued == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{queued} bytes still unacknowledged after 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
