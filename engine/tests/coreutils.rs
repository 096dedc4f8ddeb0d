//! Programs not written here, checked from outside.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(120);

/// `dd bs=1` copying a file one byte per syscall pair: dumped mid-copy and
/// restored, it must produce exactly the input — offsets of both files, the
/// process's memory and registers all have to be right.
fn dd_copying_a_file_byte_by_byte_resumes_mid_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    let output = tmp.path().join("output");
    let data: Vec<u8> = (0..400_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(&input, &data).unwrap();
    let mut cmd = Command::new("dd");
    cmd.arg(format!("if={}", input.display()))
        .arg(format!("of={}", output.display()))
        .args(["bs=1", "status=none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(tmp.path().join("dd.stderr")).unwrap());
    let mut child = spawn_in_own_session(&mut cmd);
    let pid = child.id() as i32;
    // Wait until it is part-way through.
    let deadline = Instant::now() + TIMEOUT;
    while fs::metadata(&output).map(|m| m.len()).unwrap_or(0) < 20_000 {
        assert!(Instant::now() < deadline, "dd made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = tmp.path().join("img");
    let out = dump(pid, &img, &[]);
    assert!(out.status.success(), "dump: {}", stderr_of(&out));
    let copied = fs::metadata(&output).unwrap().len();
    assert!(
        copied < data.len() as u64,
        "dd finished before the dump; make the input larger"
    );
    assert!(!child.wait().unwrap().success(), "the dump killed dd");
    let out = run_crest(&["restore", "-D", img.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "restored dd exits 0: {}",
        stderr_of(&out)
    );
    assert_eq!(
        fs::read(&output).unwrap(),
        data,
        "output differs from the input"
    );
}

/// A restored `sleep` is the same process (PID, command line) and exits 0.
fn sleep_keeps_its_pid_and_exits_normally() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("1.5")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = spawn_in_own_session(&mut cmd);
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(200));
    let img = tmp.path().join("img");
    let out = dump(pid, &img, &[]);
    assert!(out.status.success(), "dump: {}", stderr_of(&out));
    child.wait().unwrap();
    let mut restore = restore_attached(&img, tmp.path());
    wait_for_file(&tmp.path().join("restored.pid"), TIMEOUT);
    assert_eq!(
        fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap(),
        "sleep\x001.5\x00"
    );
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        fs::canonicalize(which("sleep")).unwrap()
    );
    let st = wait_with_timeout(&mut restore, TIMEOUT);
    assert_eq!(
        st.code(),
        Some(0),
        "{}",
        fs::read_to_string(tmp.path().join("restore.stderr")).unwrap()
    );
}

fn which(prog: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(prog))
                .find(|p| p.exists())
        })
        .expect("program on PATH")
}

/// Runs `sh -c SCRIPT` once uninterrupted for the expected output, then again
/// in a session of its own with stdout to a file: once `progress` sees it
/// part-way (given the output so far), the session is dumped, restored, and
/// must finish with exactly the uninterrupted run's output.
fn shell_job_matches_uninterrupted_run(script: &str, progress: impl Fn(&[u8]) -> bool) {
    let expected = Command::new("sh")
        .args(["-c", script])
        .output()
        .unwrap()
        .stdout;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(tmp.path().join("sh.stderr")).unwrap());
    let mut child = spawn_in_own_session(&mut cmd);
    let pid = child.id() as i32;
    let deadline = Instant::now() + TIMEOUT;
    while !progress(&fs::read(&out).unwrap_or_default()) {
        assert!(Instant::now() < deadline, "the job made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = tmp.path().join("img");
    // The session ID is the shell's pid: it called setsid().
    let dumped = run_crest(&[
        "dump",
        "--session",
        &pid.to_string(),
        "-D",
        img.to_str().unwrap(),
    ]);
    assert!(dumped.status.success(), "dump: {}", stderr_of(&dumped));
    child.wait().unwrap();
    let restored = run_crest(&["restore", "-D", img.to_str().unwrap()]);
    assert_eq!(
        restored.status.code(),
        Some(0),
        "restored job exits 0: {}",
        stderr_of(&restored)
    );
    let got = fs::read(&out).unwrap();
    if got != expected {
        let at = got
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        let around = |v: &[u8]| {
            String::from_utf8_lossy(&v[at.saturating_sub(40)..(at + 40).min(v.len())]).into_owned()
        };
        panic!(
            "output differs from an uninterrupted run at byte {at} ({} bytes, {} expected): {:?} vs {:?}",
            got.len(),
            expected.len(),
            around(&got),
            around(&expected)
        );
    }
}

/// A real shell job: a loop, a subshell and a background child, dumped from
/// the shell's session mid-run; its final output matches an uninterrupted run.
fn shell_job_with_subshell_and_background_child_finishes_identically() {
    let script = "for i in $(seq 1 60); do echo \"tick $i\"; sleep 0.02; done; \
                  (echo sub; sleep 0.2; echo sub-done) & sleep 0.05; echo parent; wait; echo done";
    shell_job_matches_uninterrupted_run(script, |out| {
        String::from_utf8_lossy(out).contains("tick 20")
    });
}

/// `producer | transformer | consumer` dumped mid-stream produces byte for
/// byte the output of an uninterrupted run (pipes with unread data in flight).
fn pipeline_dumped_mid_stream_produces_identical_output() {
    let script = "seq 1 30000 | while read i; do echo \"line $i\"; done | cat";
    shell_job_matches_uninterrupted_run(script, |out| out.len() > 20_000);
}

fn main() -> std::process::ExitCode {
    run(root_tests![
        dd_copying_a_file_byte_by_byte_resumes_mid_copy,
        sleep_keeps_its_pid_and_exits_normally,
        shell_job_with_subshell_and_background_child_finishes_identically,
        pipeline_dumped_mid_stream_produces_identical_output,
    ])
}
