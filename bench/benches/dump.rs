//! `crest dump` throughput over dirty anonymous memory, a sparse reservation
//! and many small mappings, images on tmpfs; and the time the target stays
//! frozen, as its own figure (group `frozen`, read from the image's stats).
//! The target is left running after each dump so one target serves every
//! iteration.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use crest_bench::{Hog, ImageDir, WORKLOADS};
use crest_engine::dump::{dump, AfterDump, DumpOptions, Scope};
use criterion::{BenchmarkId, Criterion, Throughput};

fn bench_dump(c: &mut Criterion) {
    let bar = indicatif::ProgressBar::hidden();
    for &w in WORKLOADS {
        let hog = Hog::spawn(w).expect("hog");
        let dir = ImageDir::new(&format!("dump-{}", w.label()));
        // Frozen times of the dumps timed so far, for the `frozen` group.
        let frozen = RefCell::new(Vec::new());
        let one_dump = || {
            crest_bench::warm();
            dir.clear();
            let opts = DumpOptions {
                pid: hog.pid,
                dir: dir.0.clone(),
                after: AfterDump::LeaveRunning,
                scope: Scope::Tree,
                tcp_established: false,
                callback_timeout: crest_engine::api::DEFAULT_CALLBACK_TIMEOUT,
                save_files: None,
                verify_files_hash: false,
                include_files: vec![],
                pre_copy: None,
            };
            let t = Instant::now();
            let stats = dump(&opts, &bar).expect("dump");
            let took = t.elapsed();
            frozen
                .borrow_mut()
                .push(Duration::from_micros(stats.frozen_us));
            took
        };
        let id = BenchmarkId::from_parameter(w.label());
        {
            let mut group = crest_bench::group(c, "dump");
            group.throughput(Throughput::Bytes(w.bytes()));
            group.bench_function(id.clone(), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| one_dump()).sum())
            });
            group.finish();
        }
        // The frozen time of every dump above, then of more dumps if criterion wants more.
        let mut group = crest_bench::group(c, "frozen");
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        if frozen.borrow().is_empty() {
                            one_dump();
                        }
                        frozen.borrow_mut().pop().expect("a dump was timed")
                    })
                    .sum()
            })
        });
        group.finish();
    }
}

fn main() {
    crest_bench::bench_main(bench_dump);
}
