//! `crest dump` throughput over dirty anonymous memory, images on tmpfs.
//! The target is left running after each dump so one target serves every
//! iteration; the frozen time is reported separately at the end.

use std::time::{Duration, Instant};

use crest_bench::{Hog, ImageDir};
use crest_engine::dump::{dump, AfterDump, DumpOptions};
use criterion::{BenchmarkId, Criterion, Throughput};

fn bench_dump(c: &mut Criterion) {
    let mut group = crest_bench::group(c, "dump");
    let bar = indicatif::ProgressBar::hidden();
    for mib in [64usize, 256] {
        let hog = Hog::spawn(mib).expect("hog");
        let dir = ImageDir::new(&format!("dump-{mib}"));
        let mut frozen = Vec::new();
        group.throughput(Throughput::Bytes((mib as u64) << 20));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{mib}MiB")),
            &mib,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        dir.clear();
                        let opts = DumpOptions {
                            pid: hog.pid,
                            dir: dir.0.clone(),
                            after: AfterDump::LeaveRunning,
                            scope: crest_engine::dump::Scope::Tree,
                            tcp_established: false,
                        };
                        let t = Instant::now();
                        let stats = dump(&opts, &bar).expect("dump");
                        total += t.elapsed();
                        frozen.push(stats.frozen_us);
                    }
                    total
                })
            },
        );
        frozen.sort_unstable();
        if let Some(m) = frozen.get(frozen.len() / 2) {
            println!(
                "dump/{mib}MiB: median frozen time {:.1} ms over {} dumps",
                *m as f64 / 1000.0,
                frozen.len()
            );
        }
    }
    group.finish();
}

fn main() {
    crest_bench::bench_main(bench_dump);
}
