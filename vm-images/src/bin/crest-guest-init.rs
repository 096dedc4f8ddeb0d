//! crest-guest-init: PID 1 of a crest test guest.
//!
//! Loads the modules listed in the initramfs spec (in order, `finit_module`),
//! mounts the host root read-only over 9p at `/newroot`, puts proc, sysfs,
//! devtmpfs (+ devpts, /dev/shm), cgroup2 and tmpfs (/tmp, /run, /var/tmp)
//! on top, mounts the writable results share at `/run/crest-results`, moves
//! `/newroot` to `/` and chroots into it, brings `lo` up, runs the command
//! (stdout/stderr to files in the results share), writes `status.json`, syncs
//! and powers off. Any failure before the results share is mounted is only
//! visible on the console (and the host reports the missing status).
//!
//! Built statically by xtask; it must not need anything from the host root
//! before the switch.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crest_vm::guest::{
    GuestModule, GuestSpec, GuestStatus, GUEST_RESULTS_DIR, HOSTROOT_TAG, RESULTS_TAG, SPEC_PATH,
    STATUS_FILE, STDERR_FILE, STDOUT_FILE,
};
use crest_vm::modinfo::MODULE_INIT_COMPRESSED_FILE;

fn log(msg: &str) {
    // stderr is /dev/console, opened by the kernel for init.
    let _ = writeln!(std::io::stderr(), "crest-init: {msg}");
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("NUL in {s:?}"))
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), std::io::Error> {
    let (src, target, fstype, data) = (
        CString::new(src)?,
        CString::new(target)?,
        CString::new(fstype)?,
        CString::new(data)?,
    );
    let data_ptr = if data.as_bytes().is_empty() {
        std::ptr::null()
    } else {
        data.as_ptr().cast()
    };
    let fstype_ptr = if fstype.as_bytes().is_empty() {
        std::ptr::null()
    } else {
        fstype.as_ptr()
    };
    // SAFETY: all pointers are valid NUL-terminated strings (or null, which
    // mount(2) accepts for fstype and data) that outlive the call.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype_ptr, flags, data_ptr) };
    if r == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

fn must_mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    mount(src, target, fstype, flags, data)
        .map_err(|e| format!("mount {fstype} {src} on {target}: {e}"))
}

fn load_module(m: &GuestModule) -> Result<(), String> {
    let f = File::open(&m.path).map_err(|e| format!("open {}: {e}", m.path))?;
    let flags = if m.compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = c"";
    // SAFETY: finit_module takes an fd we own, a valid NUL-terminated string
    // and an int of flags; no memory is written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = errno();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(format!("finit_module {} ({}): {e}", m.name, m.path))
}

/// 9p channels appear when virtio_pci has probed the devices; retry briefly.
fn mount_9p(tag: &str, target: &str, flags: libc::c_ulong, opts: &str) -> Result<(), String> {
    let start = Instant::now();
    loop {
        match mount(tag, target, "9p", flags, opts) {
            Ok(()) => return Ok(()),
            Err(e)
                // ENOENT: no 9p channel with that tag (yet); ENODEV (no 9p
                // file system) is final.
                if start.elapsed().as_secs() < 10 && e.raw_os_error() == Some(libc::ENOENT) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(format!("mount 9p {tag} on {target} ({opts}): {e}")),
        }
    }
}

fn bring_up_lo() -> Result<(), String> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", errno()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: fd is a socket we own; ifr is a valid ifreq the kernel reads and writes.
    let mut r = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) };
    if r == 0 {
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: as above.
        r = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) };
    }
    let e = errno();
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("bring up lo: {e}"))
    }
}

fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Everything up to (and including) the switch into the new root.
fn setup(spec: &GuestSpec) -> Result<(), String> {
    // A module that does not load is reported, not fatal: the optional ones
    // (socket diagnostics, nf_tables) only cost their features, and a missing
    // 9p or virtio module makes the mount below fail with its own error.
    let mut failed = 0;
    for m in &spec.modules {
        if let Err(e) = load_module(m) {
            log(&format!("warning: {e}"));
            failed += 1;
        }
    }
    log(&format!(
        "loaded {} modules ({failed} failed)",
        spec.modules.len() - failed
    ));
    let ro = libc::MS_RDONLY;
    mount_9p(
        HOSTROOT_TAG,
        "/newroot",
        ro,
        &format!(
            "trans=virtio,version=9p2000.L,ro,msize={},cache=loose",
            spec.msize
        ),
    )?;
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let nr = |p: &str| format!("/newroot{p}");
    for p in ["/proc", "/sys", "/dev"] {
        must_mount(p, &nr(p), "", libc::MS_MOVE, "")?;
    }
    for d in ["/newroot/dev/pts", "/newroot/dev/shm"] {
        let _ = std::fs::create_dir_all(d);
    }
    must_mount(
        "devpts",
        &nr("/dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    )?;
    must_mount("shm", &nr("/dev/shm"), "tmpfs", nosuid_nodev, "mode=1777")?;
    for (link, target) in [
        ("/newroot/dev/fd", "/proc/self/fd"),
        ("/newroot/dev/stdin", "/proc/self/fd/0"),
        ("/newroot/dev/stdout", "/proc/self/fd/1"),
        ("/newroot/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if let Err(e) = mount(
        "cgroup2",
        &nr("/sys/fs/cgroup"),
        "cgroup2",
        nosuid_nodev | libc::MS_NOEXEC,
        "",
    ) {
        log(&format!("cgroup2 not mounted: {e}"));
    }
    must_mount("tmpfs", &nr("/tmp"), "tmpfs", nosuid_nodev, "mode=1777")?;
    must_mount("tmpfs", &nr("/var/tmp"), "tmpfs", nosuid_nodev, "mode=1777")?;
    must_mount("tmpfs", &nr("/run"), "tmpfs", nosuid_nodev, "mode=755")?;
    let results = nr(GUEST_RESULTS_DIR);
    std::fs::create_dir_all(&results).map_err(|e| format!("mkdir {results}: {e}"))?;
    mount_9p(
        RESULTS_TAG,
        &results,
        0,
        &format!("trans=virtio,version=9p2000.L,msize={}", spec.msize),
    )?;
    // Switch root: move /newroot over / and chroot into it (pivot_root is
    // not allowed on the initramfs).
    std::env::set_current_dir("/newroot").map_err(|e| format!("chdir /newroot: {e}"))?;
    must_mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = cstr(".")?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(format!("chroot: {}", errno()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    let host = spec.hostname.as_bytes();
    // SAFETY: pointer and length describe a valid byte slice.
    unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) };
    if let Err(e) = bring_up_lo() {
        log(&e);
    }
    Ok(())
}

/// Runs the command; reaps every process (we are PID 1) until it exits.
fn run_command(spec: &GuestSpec) -> GuestStatus {
    let mut st = GuestStatus {
        exit_code: None,
        signal: None,
        error: None,
        kernel_release: uname_release(),
        boot_ms: boottime_ms(),
        run_ms: 0,
    };
    let results = Path::new(GUEST_RESULTS_DIR);
    let spawn = || -> Result<u32, String> {
        let (prog, args) = spec.argv.split_first().ok_or("empty command")?;
        let out = File::create(results.join(STDOUT_FILE))
            .map_err(|e| format!("create stdout file: {e}"))?;
        let err = File::create(results.join(STDERR_FILE))
            .map_err(|e| format!("create stderr file: {e}"))?;
        let mut cmd = Command::new(prog);
        // Like a login shell or a service manager would, give the command a
        // session and process group of its own: processes in session 0
        // (init's) are not what a real system runs.
        // SAFETY: the closure runs between fork and exec and only calls
        // setsid(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.workdir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {prog:?} in {}: {e}", spec.workdir))?;
        Ok(child.id())
    };
    log(&format!("running {:?} in {}", spec.argv, spec.workdir));
    let start = Instant::now();
    let pid = match spawn() {
        Ok(pid) => pid as libc::pid_t,
        Err(e) => {
            st.error = Some(e);
            return st;
        }
    };
    loop {
        let mut wst = 0;
        // SAFETY: wst is a valid int to fill.
        let r = unsafe { libc::waitpid(-1, &mut wst, 0) };
        if r == pid {
            let es = std::process::ExitStatus::from_raw(wst);
            st.exit_code = es.code();
            st.signal = es.signal();
            break;
        }
        if r < 0 && errno().raw_os_error() != Some(libc::EINTR) {
            st.error = Some(format!("waitpid: {}", errno()));
            break;
        }
    }
    st.run_ms = start.elapsed().as_millis() as u64;
    st
}

fn write_status(st: &GuestStatus) -> Result<(), String> {
    let p = Path::new(GUEST_RESULTS_DIR).join(STATUS_FILE);
    let json = serde_json::to_vec_pretty(st).map_err(|e| e.to_string())?;
    let mut f = File::create(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
    f.write_all(&json)
        .map_err(|e| format!("write {}: {e}", p.display()))?;
    f.sync_all()
        .map_err(|e| format!("sync {}: {e}", p.display()))
}

fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions; as PID 1
    // with CAP_SYS_BOOT, RB_POWER_OFF halts the VM (QEMU then exits).
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    log("reboot(RB_POWER_OFF) returned; exiting (kernel will panic)");
    std::process::exit(1)
}

fn main() {
    let _ = mount("proc", "/proc", "proc", 0, "");
    let _ = mount("sysfs", "/sys", "sysfs", 0, "");
    let _ = mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    let spec: GuestSpec = match std::fs::read(SPEC_PATH)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            log(&format!("FATAL: cannot read {SPEC_PATH}: {e}"));
            power_off();
        }
    };
    if let Err(e) = setup(&spec) {
        log(&format!("FATAL: {e}"));
        power_off();
    }
    let st = run_command(&spec);
    match (&st.error, st.exit_code, st.signal) {
        (Some(e), _, _) => log(&format!("command not run: {e}")),
        (None, Some(c), _) => log(&format!("command exited with {c} after {} ms", st.run_ms)),
        (None, None, s) => log(&format!(
            "command killed by signal {s:?} after {} ms",
            st.run_ms
        )),
    }
    if let Err(e) = write_status(&st) {
        log(&format!("FATAL: {e}"));
    }
    power_off();
}
