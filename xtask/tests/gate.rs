//! The gate itself under test: `cargo xtask conformance --kernel host` with
//! stand-in engines (`crest-standin`) that are wrong in one way each must
//! fail (exit 1) naming the cases that caught it; the real engine passes;
//! a run without root refuses to start (exit 2).
//!
//! Needs root (each case is reported as ignored without it), and the
//! workspace's binaries (xtask runs `cargo build --workspace --bins` first).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use libtest_mimic::{Arguments, Completion, Trial};

/// One conformance run at a time: they share the machine's two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn xtask() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

type Case = fn() -> Result<(), String>;

fn main() -> std::process::ExitCode {
    let cases: [(&str, Case); 7] = [
        (
            "an_engine_that_refuses_everything_fails_the_gate",
            an_engine_that_refuses_everything_fails_the_gate,
        ),
        (
            "an_engine_that_exits_0_without_restoring_fails_the_gate",
            an_engine_that_exits_0_without_restoring_fails_the_gate,
        ),
        (
            "an_engine_that_changes_one_byte_of_memory_fails_the_gate",
            an_engine_that_changes_one_byte_of_memory_fails_the_gate,
        ),
        (
            "an_engine_that_drops_o_nonblock_fails_the_gate",
            an_engine_that_drops_o_nonblock_fails_the_gate,
        ),
        (
            "an_engine_that_ignores_pre_copy_fails_the_gate",
            an_engine_that_ignores_pre_copy_fails_the_gate,
        ),
        (
            "the_real_engine_passes_the_gate",
            the_real_engine_passes_the_gate,
        ),
        (
            "a_host_run_without_root_refuses_to_start",
            a_host_run_without_root_refuses_to_start,
        ),
    ];
    let trials = cases
        .into_iter()
        .map(|(name, f)| {
            Trial::ignorable_test(name, move || {
                if !is_root() {
                    return Ok(Completion::ignored_with(
                        "needs root (the suite runs as root; this one also becomes nobody)",
                    ));
                }
                f().map(|()| Completion::Completed).map_err(Into::into)
            })
        })
        .collect();
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}

/// A script for `--engine-bin` that runs the real crest through `fault`.
fn standin(dir: &Path, fault: &str) -> PathBuf {
    let debug = workspace().join("target").join("debug");
    let script = dir.join(format!("crest-{fault}"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} {fault} {} \"$@\"\n",
            debug.join("crest-standin").display(),
            debug.join("crest").display()
        ),
    )
    .expect("write the stand-in script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the stand-in script");
    script
}

/// `cargo xtask conformance --kernel host --filter FILTER [--engine-bin E]`.
fn conformance(filter: &str, engine: Option<&Path>, out: &Path) -> Output {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = xtask();
    c.current_dir(workspace())
        .args([
            "conformance",
            "--kernel",
            "host",
            "--filter",
            filter,
            "--out",
        ])
        .arg(out);
    if let Some(e) = engine {
        c.arg("--engine-bin").arg(e);
    }
    c.output().expect("run xtask conformance")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The lines after `gate: FAILED`.
fn gate_lines(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    out.split_once("gate: FAILED")
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_default()
}

/// The details printed for a failed case (`--- [host] CASE failed ---` up to
/// the next such line or the matrix).
fn failure_details(o: &Output, case: &str) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    let head = format!("--- [host] {case} failed ---");
    let Some((_, rest)) = out.split_once(&head) else {
        return String::new();
    };
    rest.split("\n--- [")
        .next()
        .unwrap_or("")
        .split("\nrequirement ")
        .next()
        .unwrap_or("")
        .to_string()
}

/// Runs the stand-in `fault` on `filter`: the gate must fail (exit 1) and
/// name every case of `cases`, `why` in its gate line or its failure details.
fn must_go_red(fault: &str, filter: &str, cases: &[(&str, &str)]) -> Result<(), String> {
    let d = tempfile::tempdir().map_err(|e| e.to_string())?;
    let engine = standin(d.path(), fault);
    let o = conformance(filter, Some(&engine), &d.path().join("out"));
    if o.status.code() != Some(1) {
        return Err(format!("{fault}: expected exit 1: {}", text(&o)));
    }
    let gate = gate_lines(&o);
    for (case, why) in cases {
        let named = gate.lines().any(|l| l.contains(case));
        let said = gate.lines().any(|l| l.contains(case) && l.contains(why))
            || failure_details(&o, case).contains(why);
        if !(named && said) {
            return Err(format!(
                "{fault}: the gate does not name {case} ({why}):\n{}",
                text(&o)
            ));
        }
    }
    Ok(())
}

fn an_engine_that_refuses_everything_fails_the_gate() -> Result<(), String> {
    must_go_red(
        "refuse-all",
        "PIPE-CONTENTS",
        &[
            (
                "PIPE-CONTENTS::3k-unread",
                "did not pass (ignored: dump refused",
            ),
            (
                "PIPE-CONTENTS::empty",
                "did not pass (ignored: dump refused",
            ),
        ],
    )
}

fn an_engine_that_exits_0_without_restoring_fails_the_gate() -> Result<(), String> {
    must_go_red(
        "no-restore",
        "PROC-PID::restored-pid",
        &[(
            "PROC-PID::restored-pid",
            "crest restore exited 0 before the restored process showed its view",
        )],
    )
}

fn an_engine_that_changes_one_byte_of_memory_fails_the_gate() -> Result<(), String> {
    must_go_red(
        "flip-byte",
        "MEM-ANON::heap-64m",
        &[("MEM-ANON::heap-64m", "heap pattern mismatch")],
    )
}

fn an_engine_that_drops_o_nonblock_fails_the_gate() -> Result<(), String> {
    must_go_red(
        "drop-nonblock",
        "SOCK-TCP-ESTABLISHED",
        &[(
            "SOCK-TCP-ESTABLISHED::loopback-queued",
            "the outside view differs",
        )],
    )
}

fn an_engine_that_ignores_pre_copy_fails_the_gate() -> Result<(), String> {
    // OPS-INCREMENTAL is should-priority: a failure fails the gate whatever
    // the priority.
    must_go_red(
        "ignore-pre-copy",
        "OPS-INCREMENTAL::pre-dump",
        &[(
            "OPS-INCREMENTAL::pre-dump",
            "its writes were not tracked while it ran",
        )],
    )
}

fn the_real_engine_passes_the_gate() -> Result<(), String> {
    let d = tempfile::tempdir().map_err(|e| e.to_string())?;
    let o = conformance("PIPE-CONTENTS", None, &d.path().join("out"));
    if o.status.code() != Some(0) || !String::from_utf8_lossy(&o.stdout).contains("gate: passed") {
        return Err(format!("expected exit 0 and `gate: passed`: {}", text(&o)));
    }
    Ok(())
}

fn a_host_run_without_root_refuses_to_start() -> Result<(), String> {
    let mut c = xtask();
    c.current_dir("/")
        .args(["conformance", "--kernel", "host", "--no-build"])
        .env("HOME", "/nonexistent");
    // SAFETY: setgid/setuid between fork and exec only change credentials.
    unsafe {
        c.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c
        .output()
        .map_err(|e| format!("run xtask as nobody: {e}"))?;
    if o.status.code() != Some(2)
        || !String::from_utf8_lossy(&o.stderr).contains("the suite needs root")
    {
        return Err(format!(
            "expected exit 2 naming the need for root: {}",
            text(&o)
        ));
    }
    Ok(())
}
