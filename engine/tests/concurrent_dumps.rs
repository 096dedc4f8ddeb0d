//! Two dumps in one process at once (the bench links the engine as a
//! library): each keeps its state in its own context, so neither sees the
//! other's network lock, repaired sockets or processes.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use crest_engine::dump::{AfterDump, DumpOptions, Scope};

fn two_overlapping_dumps_keep_their_own_network_lock_and_sockets() {
    let a = sleep_on_loopback_connection(false);
    let b = sleep_on_loopback_connection(false);
    let tmp = tempfile::tempdir().unwrap();
    let start = Arc::new(Barrier::new(2));
    let dump_in_thread = |pid: i32, dir: std::path::PathBuf| {
        let start = Arc::clone(&start);
        std::thread::spawn(move || {
            let opts = DumpOptions {
                pid,
                dir,
                after: AfterDump::LeaveRunning,
                scope: Scope::Tree,
                tcp_established: true,
                callback_timeout: Duration::from_secs(10),
                save_files: None,
                verify_files_hash: false,
                include_files: vec![],
                pre_copy: None,
            };
            start.wait();
            crest_engine::dump::dump(&opts, &indicatif::ProgressBar::hidden())
        })
    };
    let (pa, pb) = (a.child.id() as i32, b.child.id() as i32);
    let ta = dump_in_thread(pa, tmp.path().join("a"));
    let tb = dump_in_thread(pb, tmp.path().join("b"));
    ta.join().unwrap().expect("dump of a");
    tb.join().unwrap().expect("dump of b");

    let lock_of = |dir: &str| {
        let img = crest_engine::model::Checkpoint::read(&tmp.path().join(dir)).unwrap();
        img.inventory.net_lock.expect("a network lock")
    };
    let (la, lb) = (lock_of("a"), lock_of("b"));
    assert_ne!(
        la.table, lb.table,
        "the two dumps shared one nftables table"
    );
    assert_eq!(la.connections, vec![format!("{} → {}", a.local, a.peer)]);
    assert_eq!(lb.connections, vec![format!("{} → {}", b.local, b.peer)]);
    // Each dump released its own lock and its own sockets' repair mode.
    let tables = crest_engine::net::netlock::tables().unwrap();
    assert!(!tables.contains(&la.table) && !tables.contains(&lb.table));
    for (c, pid) in [(&a, pa), (&b, pb)] {
        assert_unharmed(pid);
        use std::io::Write;
        (&c.server).write_all(b"after the dump").unwrap();
        assert_acknowledged(&c.server);
    }
    for mut c in [a, b] {
        c.child.kill().unwrap();
        c.child.wait().unwrap();
    }
}

fn main() -> std::process::ExitCode {
    run(root_tests![
        two_overlapping_dumps_keep_their_own_network_lock_and_sockets,
    ])
}
