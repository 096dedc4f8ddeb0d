//! `crest restore` throughput: from an image on tmpfs to a running process,
//! for the same workloads as the dump benchmark.

use std::time::{Duration, Instant};

use crest_bench::{Hog, ImageDir, WORKLOADS};
use crest_engine::dump::{dump, AfterDump};
use crest_engine::restore::{restore, RestoreOptions, Restored};
use criterion::{BenchmarkId, Criterion, Throughput};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

fn bench_restore(c: &mut Criterion) {
    let mut group = crest_bench::group(c, "restore");
    let bar = indicatif::ProgressBar::hidden();
    for &w in WORKLOADS {
        let dir = ImageDir::new(&format!("restore-{}", w.label()));
        let pid = {
            let mut hog = Hog::spawn(w).expect("hog");
            dump(
                &crest_bench::dump_options(hog.pid, &dir, AfterDump::Kill, None),
                &bar,
            )
            .expect("dump");
            let _ = hog.child.wait();
            hog.pid
        };
        let opts = RestoreOptions {
            dir: dir.0.clone(),
            detach: false,
            stop: false,
            pid_wait: Duration::from_secs(5),
            allow_changed_files: false,
            pidns: false,
            restore_files: None,
            relocate: vec![],
            port_wait: Duration::from_secs(5),
        };
        group.throughput(Throughput::Bytes(w.bytes()));
        group.bench_function(BenchmarkId::from_parameter(w.label()), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    crest_bench::warm();
                    let t = Instant::now();
                    let restored = restore(&opts, &bar).expect("restore");
                    total += t.elapsed();
                    assert_eq!(restored, Restored::Child { pid });
                    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
                    waitpid(Pid::from_raw(pid), None).unwrap();
                }
                total
            })
        });
    }
    group.finish();
}

fn main() {
    crest_bench::bench_main(bench_restore);
}
