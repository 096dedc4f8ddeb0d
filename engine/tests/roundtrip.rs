//! Dump a running process, kill it, restore it: it carries on as if nothing
//! happened. Needs root (reported as ignored otherwise).

mod common;

use std::fs;
use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// The foundation workload checks its whole state from inside after restore.
fn foundation_round_trip(heap_mib: &str, cycles: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    let mut w = start(
        &dir,
        &workload("foundation"),
        &["--heap-mib", heap_mib],
        true,
    );
    wait_for_file(&dir.join("ready"), TIMEOUT);
    let maps_before = merged_maps(w.pid);
    let img = tmp.path().join("img0");
    let out = dump(w.pid, &img, &[]);
    assert!(out.status.success(), "dump failed: {}", stderr_of(&out));
    // The dump killed it; reaping it frees its PID for the restore.
    let st = w.child.wait().unwrap();
    assert_eq!(st.to_string(), "signal: 9 (SIGKILL)");
    let mut restore = restore_attached(&img, &dir);
    for cycle in 1..cycles {
        wait_for_file(&dir.join("restored.pid"), TIMEOUT);
        let img = tmp.path().join(format!("img{cycle}"));
        let out = dump(w.pid, &img, &[]);
        assert!(
            out.status.success(),
            "dump of the restored process failed: {}",
            stderr_of(&out)
        );
        let st = wait_with_timeout(&mut restore, TIMEOUT);
        assert_eq!(
            st.code(),
            Some(128 + 9),
            "crest restore reports the SIGKILL of the dump"
        );
        restore = restore_attached(&img, &dir);
    }
    wait_for_file(&dir.join("restored.pid"), TIMEOUT);
    assert_eq!(
        fs::read_to_string(dir.join("restored.pid")).unwrap(),
        format!("{}\n", w.pid),
        "original PID"
    );
    let maps_after = merged_maps(w.pid);
    fs::write(dir.join("go"), "").unwrap();
    let st = wait_with_timeout(&mut restore, TIMEOUT);
    let result = fs::read_to_string(dir.join("result")).unwrap_or_default();
    let log = fs::read_to_string(dir.join("restore.stderr")).unwrap_or_default();
    assert_eq!(
        result, "ok\n",
        "workload found differences; crest restore said: {log}"
    );
    assert_eq!(st.code(), Some(0), "exit status passes through; {log}");
    assert_eq!(
        maps_before, maps_after,
        "/proc/PID/maps differs after restore"
    );
}

fn foundation_workload_survives_dump_and_restore() {
    foundation_round_trip("64", 1);
}

fn a_restored_process_can_be_dumped_again() {
    foundation_round_trip("8", 2);
}

fn main() -> std::process::ExitCode {
    run(root_tests![
        foundation_workload_survives_dump_and_restore,
        a_restored_process_can_be_dumped_again,
    ])
}
