//! `crest show` output, pinned: text for people and JSON for tools.

use std::process::Command;

use crest_engine::fds::{OpenFile, OpenFiles};
use crest_engine::image::Header;
use crest_engine::model::{Checkpoint, DumpStats, Inventory};
use crest_engine::ProcessImage;

fn fixture_image(dir: &std::path::Path) {
    let process: ProcessImage =
        serde_json::from_str(include_str!("fixtures/process.json")).expect("fixture parses");
    let header = Header {
        format_version: crest_engine::image::FORMAT_VERSION,
        arch: "x86_64".into(),
        engine_version: "0.1.0".into(),
        kernel: "6.12.0-test".into(),
    };
    let stats = DumpStats {
        frozen_us: 12_345,
        memory_us: 6_789,
        pages_written: 3,
        pages_skipped: 40,
        pre_copy: Some(crest_engine::mm::precopy::PreCopyStats {
            tracker: "uffd-wp".into(),
            rounds: vec![
                crest_engine::mm::precopy::PreCopyRound {
                    pages: 262_144,
                    us: 812_000,
                    frozen: false,
                },
                crest_engine::mm::precopy::PreCopyRound {
                    pages: 4_096,
                    us: 9_500,
                    frozen: true,
                },
            ],
        }),
    };
    let files: Vec<OpenFile> =
        serde_json::from_str(include_str!("fixtures/files.json")).expect("fixture parses");
    let files = OpenFiles::from_entries(files).expect("a consistent table");
    Checkpoint::write(
        dir,
        &header,
        &Inventory {
            root_pid: 4242,
            pids: vec![4242],
            zombies: vec![],
            pipes: vec![],
            lost_session_leaders: vec![],
            lost_group_leaders: vec![],
            sysv_shm: vec![],
            saved_files: vec![crest_engine::fds::savefiles::SavedFile {
                path: "/data/input.txt".into(),
                size: 4000,
                mode: 0o644,
                crc32c: 0,
                image: "file-0.img".into(),
                included: false,
            }],
            net_lock: Some(crest_engine::net::netlock::NetLock {
                table: "crest-77-1700000000-0".into(),
                connections: vec!["10.0.0.2:40000 → 10.0.0.1:5432".into()],
            }),
            stats,
        },
        &files,
        &[process],
    )
    .unwrap();
}

fn show(args: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    fixture_image(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_crest"))
        .arg("show")
        .args(args)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .replace(&dir.display().to_string(), "[IMAGE]")
}

#[test]
fn show_prints_the_image_as_text() {
    insta::assert_snapshot!(show(&[]));
}

#[test]
fn show_json_round_trips_the_records() {
    let text = show(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["header"]["kernel"], "6.12.0-test");
    assert_eq!(v["inventory"]["pids"], serde_json::json!([4242]));
    let back: ProcessImage = serde_json::from_value(v["processes"][0].clone()).unwrap();
    let orig: ProcessImage = serde_json::from_str(include_str!("fixtures/process.json")).unwrap();
    assert_eq!(back, orig);
}

#[test]
fn show_of_a_missing_image_names_the_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_crest"))
        .args(["show", "/nonexistent/img"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "crest: error: /nonexistent/img/meta.crest: No such file or directory (os error 2)\n"
    );
}

#[test]
fn check_json_lists_every_feature_with_a_verdict() {
    let out = Command::new(env!("CARGO_BIN_EXE_crest"))
        .args(["check", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
    let names: Vec<&str> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for want in [
        "clone3 set_tid",
        "pidfd_getfd",
        "PTRACE_GET_RSEQ_CONFIGURATION",
        "PR_SET_MM_MAP",
        "ARCH_MAP_VDSO",
        "TCP_REPAIR",
        "userfaultfd",
        "soft-dirty",
        "PAGEMAP_SCAN",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let missing_required = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["required"] == true && f["available"] == false);
    assert_eq!(
        out.status.success(),
        !missing_required,
        "exit status says whether crest can work here"
    );
    if nix::unistd::geteuid().is_root() {
        let set_tid = v["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "clone3 set_tid")
            .unwrap();
        assert_eq!(
            set_tid["available"], true,
            "root on Linux 5.5+ can choose PIDs: {set_tid}"
        );
    }
}
