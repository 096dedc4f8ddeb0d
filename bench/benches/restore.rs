//! `crest restore` throughput: from an image on tmpfs to a running process.

use std::time::{Duration, Instant};

use crest_bench::{Hog, ImageDir};
use crest_engine::dump::{dump, AfterDump, DumpOptions};
use crest_engine::restore::{restore, RestoreOptions, Restored};
use criterion::{BenchmarkId, Criterion, Throughput};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

fn bench_restore(c: &mut Criterion) {
    let mut group = crest_bench::group(c, "restore");
    let bar = indicatif::ProgressBar::hidden();
    for mib in [64usize, 256] {
        let dir = ImageDir::new(&format!("restore-{mib}"));
        let pid = {
            let mut hog = Hog::spawn(mib).expect("hog");
            dump(
                &DumpOptions {
                    pid: hog.pid,
                    dir: dir.0.clone(),
                    after: AfterDump::Kill,
                    scope: crest_engine::dump::Scope::Tree,
                    tcp_established: false,
                },
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
        };
        group.throughput(Throughput::Bytes((mib as u64) << 20));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{mib}MiB")),
            &mib,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        let restored = restore(&opts, &bar).expect("restore");
                        total += t.elapsed();
                        assert_eq!(restored, Restored::Child { pid });
                        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
                        waitpid(Pid::from_raw(pid), None).unwrap();
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

fn main() {
    crest_bench::bench_main(bench_restore);
}
