//! Failure paths: each ends in a clear error, and the target is unharmed
//! (running, not stopped, not traced, its state intact).

mod common;

use std::fs;
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Lets the workload verify itself and checks it found nothing wrong.
fn finish(w: &mut Running) {
    fs::write(w.dir.join("go"), "").unwrap();
    let st = wait_with_timeout(&mut w.child, TIMEOUT);
    let result = fs::read_to_string(w.dir.join("result")).unwrap_or_default();
    assert_eq!(result, "ok\n");
    assert!(st.success());
}

fn dumping_a_pid_that_does_not_exist_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // PIDs above pid_max never exist.
    let out = dump(999_999_999, &tmp.path().join("img"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_of(&out),
        "crest: error: pid 999999999: no such process\n"
    );
    assert!(!tmp.path().join("img").exists());
}

fn a_kernel_thread_is_refused_by_name() -> Option<&'static str> {
    // A kernel thread's maps are empty like those of a process on its way
    // out, which the dump waits for instead: the flag tells them apart.
    let Some(kthread) = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let after = stat.rsplit(')').next().unwrap_or("");
            // Field 9 (flags) is the 7th after the comm; PF_KTHREAD = 0x200000.
            after
                .split_whitespace()
                .nth(6)
                .and_then(|f| f.parse::<u64>().ok())
                .is_some_and(|f| f & 0x0020_0000 != 0)
        })
    else {
        return Some("no kernel thread visible in this PID namespace");
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = dump(kthread, &tmp.path().join("img"), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert_eq!(
        stderr_of(&out),
        format!("crest: error: pid {kthread}: is a kernel thread\n")
    );
    assert!(!tmp.path().join("img").exists());
    None
}

fn unsupported_resource_is_refused_and_the_target_keeps_running() {
    use std::os::unix::process::CommandExt;
    // coreutils `sleep` holding a netlink socket on fd 5, which the engine does not carry.
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("30");
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let s = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
            if s < 0 || libc::dup2(s, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(s);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    wait_for_file(format!("/proc/{pid}/fd/5").as_ref(), TIMEOUT);
    std::thread::sleep(Duration::from_millis(50)); // let it reach its nanosleep
    let tmp = tempfile::tempdir().unwrap();
    let out = dump(pid, &tmp.path().join("img"), &[]);
    assert_eq!(out.status.code(), Some(crest_engine::EXIT_UNSUPPORTED));
    assert_eq!(
        stderr_of(&out),
        format!("crest: error: pid {pid}: fd 5 is a netlink socket: not supported yet\n")
    );
    assert!(!tmp.path().join("img").exists());
    assert_unharmed(pid);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn a_lock_held_through_another_process_descriptor_is_refused() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // `sleep` takes a flock through a descriptor it shares with this test,
    // then closes its copy: the lock stays (this process keeps the open
    // file), listed in /proc/locks under sleep's pid, but sleep can no
    // longer reach it, so a restore could not take it again.
    let tmp = tempfile::tempdir().unwrap();
    let locked = fs::File::create(tmp.path().join("locked")).unwrap();
    let fd = locked.as_raw_fd();
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("30");
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::flock(fd, libc::LOCK_EX) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(100)); // let it reach its nanosleep
    let out = dump(pid, &tmp.path().join("img"), &[]);
    assert_eq!(
        out.status.code(),
        Some(crest_engine::EXIT_UNSUPPORTED),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(
        stderr_of(&out),
        format!(
            "crest: error: pid {pid}: holds a file lock (FLOCK WRITE) not reachable \
             through an open descriptor: not supported yet\n"
        )
    );
    assert!(!tmp.path().join("img").exists());
    assert_unharmed(pid);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn leave_running_and_stop_leave_the_target_as_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    let mut w = start(&dir, &workload("foundation"), &["--heap-mib", "4"], true);
    wait_for_file(&dir.join("ready"), TIMEOUT);
    let out = dump(w.pid, &tmp.path().join("img1"), &["--leave-running"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_unharmed(w.pid);
    let out = dump(w.pid, &tmp.path().join("img2"), &["--stop"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        status_line(w.pid, "State:").contains("stopped"),
        "{}",
        status_line(w.pid, "State:")
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    assert_unharmed(w.pid);
    // Both dumps interrupted its nanosleep loop and xmm7 must have survived them.
    finish(&mut w);
}

fn a_traced_process_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    let mut w = start(&dir, &workload("foundation"), &["--heap-mib", "4"], true);
    wait_for_file(&dir.join("ready"), TIMEOUT);
    // This test thread becomes its tracer (PTRACE_SEIZE does not stop it).
    nix::sys::ptrace::seize(
        nix::unistd::Pid::from_raw(w.pid),
        nix::sys::ptrace::Options::empty(),
    )
    .unwrap();
    let out = dump(w.pid, &tmp.path().join("img"), &[]);
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr_of(&out);
    assert!(
        msg.contains(&format!(
            "pid {}: is traced by pid {}",
            w.pid,
            nix::unistd::gettid()
        )),
        "{msg}"
    );
    assert!(!tmp.path().join("img").exists(), "no image after a refusal");
    // Detaching needs the tracee stopped: interrupt it first.
    let tracee = nix::unistd::Pid::from_raw(w.pid);
    nix::sys::ptrace::interrupt(tracee).unwrap();
    nix::sys::wait::waitpid(tracee, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
    nix::sys::ptrace::detach(tracee, None).unwrap();
    assert_unharmed(w.pid);
    finish(&mut w);
}

fn a_target_that_dies_during_the_dump_leaves_no_image() {
    let tmp = tempfile::tempdir().unwrap();
    // Large enough that the dump takes a while; retried if the dump wins the race.
    for attempt in 0..5 {
        let dir = tmp.path().join(format!("ctl{attempt}"));
        let mut w = start(&dir, &workload("foundation"), &["--heap-mib", "512"], true);
        wait_for_file(&dir.join("ready"), TIMEOUT);
        let img = tmp.path().join(format!("img{attempt}"));
        let dumper = std::process::Command::new(crest())
            .args(["dump", "-t", &w.pid.to_string(), "-D"])
            .arg(&img)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(40 + 30 * attempt));
        let _ = w.child.kill();
        let _ = w.child.wait();
        let out = dumper.wait_with_output().unwrap();
        if out.status.success() {
            continue; // the dump finished before the kill: try again, slower
        }
        let msg = stderr_of(&out);
        assert!(
            msg.starts_with(&format!("crest: error: pid {}", w.pid)),
            "{msg}"
        );
        assert!(!img.exists(), "a failed dump must not leave an image");
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "staging dir left behind");
        return;
    }
    panic!("the dump always finished before the target was killed");
}

fn a_store_that_fills_up_during_the_copy_leaves_the_target_unharmed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    fs::create_dir(&store).unwrap();
    // 16 MiB of store for 64 MiB of heap: the page copy runs out of space.
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "crest-test-store"])
        .arg(&store)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a 16 MiB tmpfs at {store:?}");
    let dir = tmp.path().join("ctl");
    let mut w = start(&dir, &workload("foundation"), &["--heap-mib", "64"], true);
    wait_for_file(&dir.join("ready"), TIMEOUT);
    let maps = fs::read_to_string(format!("/proc/{}/maps", w.pid)).unwrap();
    let out = std::process::Command::new(crest())
        .args(["dump", "-t", &w.pid.to_string(), "-D"])
        .arg(store.join("img"))
        .output()
        .unwrap();
    let _ = std::process::Command::new("umount").arg(&store).status();
    let msg = stderr_of(&out);
    assert!(!out.status.success(), "the dump fit in 16 MiB: {msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
    assert_unharmed(w.pid);
    let after = fs::read_to_string(format!("/proc/{}/maps", w.pid)).unwrap();
    assert_eq!(maps, after, "crest's mappings are gone from the target");
    finish(&mut w);
}

/// Dumps a small process and returns (image dir, pid).
fn small_image(tmp: &std::path::Path) -> (std::path::PathBuf, i32) {
    let dir = tmp.join("ctl");
    let mut w = start(&dir, &workload("foundation"), &["--heap-mib", "1"], true);
    wait_for_file(&dir.join("ready"), TIMEOUT);
    let img = tmp.join("img");
    let out = dump(w.pid, &img, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let _ = w.child.wait();
    (img, w.pid)
}

fn restore_fails_with(img: &std::path::Path, pid: i32, want: &str) {
    let out = run_crest(&["restore", "-D", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let msg = stderr_of(&out);
    assert!(msg.contains(want), "{msg:?} should contain {want:?}");
    assert!(!alive(pid), "no half-restored process may be left behind");
}

fn a_flipped_byte_in_the_pages_is_caught_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, pid) = small_image(tmp.path());
    let pages = img.join(format!("pages-{pid}.img"));
    let mut bytes = fs::read(&pages).unwrap();
    bytes[100] ^= 0x01;
    fs::write(&pages, bytes).unwrap();
    restore_fails_with(
        &img,
        pid,
        &format!(
            "image {}: checksum mismatch in the chunk at offset 0",
            pages.display()
        ),
    );
}

fn a_flipped_byte_in_the_metadata_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, pid) = small_image(tmp.path());
    let meta = img.join("meta.crest");
    let mut bytes = fs::read(&meta).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&meta, bytes).unwrap();
    restore_fails_with(&img, pid, "meta.crest: record checksum mismatch at offset");
    let out = run_crest(&["show", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("record checksum mismatch"));
}

fn an_image_from_a_newer_format_is_refused_by_version() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, pid) = small_image(tmp.path());
    let meta = img.join("meta.crest");
    let mut bytes = fs::read(&meta).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    fs::write(&meta, bytes).unwrap();
    restore_fails_with(
        &img,
        pid,
        "format version 99, this crest (0.1.0) reads version 2 only",
    );
}

fn a_truncated_page_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, pid) = small_image(tmp.path());
    let pages = img.join(format!("pages-{pid}.img"));
    let len = fs::metadata(&pages).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    restore_fails_with(&img, pid, "truncated: chunk at offset");
}

fn a_file_changed_since_the_dump_stops_the_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, pid) = small_image(tmp.path());
    fs::write(tmp.path().join("ctl/data.txt"), "shorter").unwrap();
    restore_fails_with(
        &img,
        pid,
        "data.txt size changed from 4000 to 7 bytes since the dump",
    );
}

fn a_pid_in_use_is_named_in_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    let mut w = start(&dir, &workload("foundation"), &["--heap-mib", "1"], true);
    wait_for_file(&dir.join("ready"), TIMEOUT);
    let img = tmp.path().join("img");
    let out = dump(w.pid, &img, &["--leave-running"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    // The original still runs, so its PID is taken.
    let out = run_crest(&["restore", "--pid-wait", "0", "-D", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr_of(&out);
    assert!(
        msg.contains(&format!("pid {} is in use (by 'crest-fdn')", w.pid)),
        "{msg}"
    );
    assert_unharmed(w.pid);
    finish(&mut w);
}

fn a_tcp_connection_to_a_peer_outside_the_dump_is_refused_unless_asked() {
    use std::io::{Read, Write};
    let SleepOnConnection {
        mut child,
        mut server,
        local,
        peer: addr,
    } = sleep_on_loopback_connection(false);
    let pid = child.id() as i32;
    let tmp = tempfile::tempdir().unwrap();
    let out = dump(pid, &tmp.path().join("img"), &[]);
    assert_eq!(out.status.code(), Some(crest_engine::EXIT_UNSUPPORTED));
    assert_eq!(
        stderr_of(&out),
        format!(
            "crest: error: pid {pid}: fd 5 is a TCP connection {local} → {addr} to a peer \
             outside the dump (--tcp-established carries it): not supported yet\n"
        )
    );
    assert!(!tmp.path().join("img").exists());
    assert_unharmed(pid);
    // Out of repair mode again: what the peer sends is acknowledged and queued.
    server.write_all(b"still connected").unwrap();
    assert_acknowledged(&server);
    let out = dump(
        pid,
        &tmp.path().join("img2"),
        &["--tcp-established", "--leave-running"],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_unharmed(pid);
    // Its network lock is gone with the dump: traffic passes again.
    server.write_all(b"after the dump").unwrap();
    assert_acknowledged(&server);
    child.kill().unwrap();
    child.wait().unwrap();
    // Out of repair mode, its end closes with a FIN or RST (in repair mode it
    // would vanish silently and this read would time out).
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 1];
    match server.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection did not close: {other:?}"),
    }
}

fn a_dump_refused_after_locking_a_connection_removes_the_lock() {
    use std::io::Write;
    // The connection is locked when it is collected; the netlink socket on
    // fd 6 is refused after it.
    let SleepOnConnection {
        mut child,
        mut server,
        ..
    } = sleep_on_loopback_connection(true);
    let pid = child.id() as i32;
    let tmp = tempfile::tempdir().unwrap();
    let out = dump(pid, &tmp.path().join("img"), &["--tcp-established", "-v"]);
    assert_eq!(out.status.code(), Some(crest_engine::EXIT_UNSUPPORTED));
    let err = stderr_of(&out);
    assert!(
        err.ends_with(&format!(
            "crest: error: pid {pid}: fd 6 is a netlink socket: not supported yet\n"
        )),
        "{err}"
    );
    assert!(err.contains("network lock removed"), "{err}");
    assert!(!tmp.path().join("img").exists());
    assert_unharmed(pid);
    server.write_all(b"not held").unwrap();
    assert_acknowledged(&server);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn an_image_never_restored_has_its_network_lock_removed_by_unlock() {
    use std::io::{Read, Write};
    let SleepOnConnection {
        mut child,
        mut server,
        ..
    } = sleep_on_loopback_connection(false);
    let pid = child.id() as i32;
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img");
    let out = dump(pid, &img, &["--tcp-established"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    child.wait().unwrap();
    let image = crest_engine::model::Checkpoint::read(&img).unwrap();
    let table = image.inventory.net_lock.expect("a network lock").table;
    let listed = || {
        let out = run_crest(&["unlock", "--list"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == format!("inet {table}"))
    };
    assert!(listed(), "the dump's table is not in the ruleset");
    // Held: the dumped end closed in repair mode, silently, and what the peer
    // sends now is dropped, not answered with a reset.
    server.write_all(b"into the void").unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = server.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    let out = run_crest(&["unlock", img.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!listed(), "crest unlock left the table");
    // Unheld, the peer's retransmission meets a closed port: reset.
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = server.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    // Removing it again is not an error.
    let out = run_crest(&["unlock", img.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
}

fn main() -> std::process::ExitCode {
    let mut tests = root_tests![
        dumping_a_pid_that_does_not_exist_is_a_clear_error,
        unsupported_resource_is_refused_and_the_target_keeps_running,
        a_lock_held_through_another_process_descriptor_is_refused,
        leave_running_and_stop_leave_the_target_as_asked,
        a_traced_process_is_refused_and_left_alone,
        a_target_that_dies_during_the_dump_leaves_no_image,
        a_store_that_fills_up_during_the_copy_leaves_the_target_unharmed,
        a_flipped_byte_in_the_pages_is_caught_before_anything_runs,
        a_flipped_byte_in_the_metadata_is_a_clear_error,
        an_image_from_a_newer_format_is_refused_by_version,
        a_truncated_page_file_is_a_clear_error,
        a_file_changed_since_the_dump_stops_the_restore,
        a_pid_in_use_is_named_in_the_error,
        a_tcp_connection_to_a_peer_outside_the_dump_is_refused_unless_asked,
        a_dump_refused_after_locking_a_connection_removes_the_lock,
        an_image_never_restored_has_its_network_lock_removed_by_unlock,
    ];
    tests.push(may_not_apply(
        "a_kernel_thread_is_refused_by_name",
        a_kernel_thread_is_refused_by_name,
    ));
    run(tests)
}
