//! Control runs: every workload mode goes through ready → go → result without
//! any dump, and must report `ok`. A workload that fails here has a bug of its
//! own, which would otherwise be blamed on the engine. (This integration test
//! also makes `cargo test` build the workload binaries the conformance suite runs.)

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn control_run(bin: &str, args: &[&str]) -> Result<(), String> {
    let dir = tempfile_dir(bin, args);
    let mut cmd = Command::new(bin);
    // As the harness does: a session of its own (wl-proc's group and session
    // modes check that they lead one).
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .arg("--ctl")
        .arg(&dir)
        .args(args)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{bin}: {e}"))?;
    let t0 = Instant::now();
    while !dir.join("ready").exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let out = child
                .wait_with_output()
                .map(|o| String::from_utf8_lossy(&o.stderr).to_string());
            return Err(format!("{bin} {args:?} exited {st} before ready: {out:?}"));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            return Err(format!("{bin} {args:?}: no ready"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::write(dir.join("go"), b"").map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let result = std::fs::read_to_string(dir.join("result")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() && result.trim() == "ok" {
        Ok(())
    } else {
        Err(format!(
            "{bin} {args:?}: {} result {result:?} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn tempfile_dir(bin: &str, args: &[&str]) -> std::path::PathBuf {
    let name = Path::new(bin)
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let d = std::env::temp_dir().join(format!(
        "crest-wl-test.{}.{name}.{}",
        std::process::id(),
        args.join("_")
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run_all(bin: &str, modes: &[&[&str]]) {
    let failures: Vec<String> = modes
        .iter()
        .filter_map(|m| control_run(bin, m).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn wl_proc() {
    let mut modes: Vec<&[&str]> = vec![
        &["idle"],
        &["personality"],
        &["rlimit"],
        &["fs"],
        &["tree"],
        &["pgid"],
        &["session"],
        &["zombie"],
        &["orphan"],
        &["stopped"],
        &["prctl"],
        &["sched"],
        &["tracer"],
        &["leaderless"],
    ];
    if is_root() {
        modes.push(&["creds"]);
        modes.push(&["caps"]);
    }
    run_all(env!("CARGO_BIN_EXE_wl-proc"), &modes);
}

#[test]
fn wl_proc_exit_codes_are_passed_on() {
    let bin = env!("CARGO_BIN_EXE_wl-proc");
    for (args, want) in [(["exit", "7"], Some(7)), (["signal", "15"], None)] {
        let e = control_run(bin, &args).unwrap_err();
        let st = if want.is_some() {
            "exit status: 7"
        } else {
            "signal: 15"
        };
        assert!(e.contains(st), "{e}");
    }
}

#[test]
fn wl_pipe() {
    run_all(
        env!("CARGO_BIN_EXE_wl-pipe"),
        &[
            &["contents", "3072"],
            &["contents", "0"],
            &["fifo", "2048"],
            &["size", "300000"],
            &["shared", "4096"],
            &["external", "0"],
        ],
    );
}

#[test]
fn wl_fd() {
    run_all(
        env!("CARGO_BIN_EXE_wl-fd"),
        &[
            &["regfile"],
            &["dup"],
            &["cloexec"],
            &["unlinked"],
            &["dir"],
            &["dev"],
            &["eventfd"],
            &["epoll"],
            &["signalfd"],
            &["pty"],
            &["lock"],
            &["inotify"],
            &["tty"],
        ],
    );
}

#[test]
fn wl_sock() {
    run_all(
        env!("CARGO_BIN_EXE_wl-sock"),
        &[
            &["pair", "stream"],
            &["pair", "dgram"],
            &["pair", "seqpacket"],
            &["listen", "path"],
            &["listen", "abstract"],
            &["tcp-listen"],
            &["tcp-established"],
            &["udp"],
            &["scm"],
        ],
    );
}

#[test]
fn wl_mem() {
    run_all(
        env!("CARGO_BIN_EXE_wl-mem"),
        &[
            &["anon", "16"],
            &["sparse", "64"],
            &["file-private"],
            &["file-shared"],
            &["shared-anon"],
            &["shared-anon-fork"],
            &["prot"],
            &["brk"],
            &["vdso"],
            &["memfd"],
            &["posix-shm"],
            &["sysv-shm"],
            &["madvise"],
            &["growsdown"],
        ],
    );
}

#[test]
fn wl_thread() {
    run_all(
        env!("CARGO_BIN_EXE_wl-thread"),
        &[
            &["multi", "4"],
            &["fpu"],
            &["sigmask"],
            &["futex"],
            &["syscall"],
            &["robust"],
            &["rseq"],
        ],
    );
}

#[test]
fn wl_sig_and_wl_time() {
    run_all(
        env!("CARGO_BIN_EXE_wl-sig"),
        &[&["handlers"], &["pending"], &["altstack"]],
    );
    run_all(
        env!("CARGO_BIN_EXE_wl-time"),
        &[&["itimer"], &["itimer-all"], &["posix-timer"], &["timerfd"]],
    );
}
