//! The time a target stays frozen, plain dump against `dump --pre-copy`, for
//! a 1 GiB process that keeps rewriting 16 MiB of it (a pass every 10 ms):
//! a plain dump freezes it for the whole copy, a pre-copy dump only to copy
//! again what it wrote since the last running round. Each sample is one
//! dump's frozen time as the image's stats record it (group `precopy-frozen`);
//! group `precopy-dump` times the whole dump. Images on tmpfs, the target
//! left running after each dump.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use crest_bench::{Hog, ImageDir, Workload};
use crest_engine::dump::{dump, AfterDump, DumpOptions, Scope};
use crest_engine::precopy::PreCopyOptions;
use criterion::{BenchmarkId, Criterion};

const WORKLOAD: Workload = Workload::Writing {
    mib: 1024,
    writing_mib: 16,
};

fn bench_precopy(c: &mut Criterion) {
    let bar = indicatif::ProgressBar::hidden();
    let hog = Hog::spawn(WORKLOAD).expect("hog");
    for (name, pre_copy) in [
        ("plain", None),
        ("pre-copy", Some(PreCopyOptions::default())),
    ] {
        let dir = ImageDir::new(&format!("precopy-{name}"));
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
                pre_copy,
            };
            let t = Instant::now();
            let stats = dump(&opts, &bar).expect("dump");
            let took = t.elapsed();
            if let Some(pc) = &stats.pre_copy {
                let rounds: Vec<String> = pc
                    .rounds
                    .iter()
                    .map(|r| format!("{}{}", if r.frozen { "frozen " } else { "" }, r.pages))
                    .collect();
                eprintln!(
                    "pre-copy ({}): pages per round {}; frozen {:.1} ms",
                    pc.tracker,
                    rounds.join(", "),
                    stats.frozen_us as f64 / 1e3
                );
            }
            frozen
                .borrow_mut()
                .push(Duration::from_micros(stats.frozen_us));
            took
        };
        let id = BenchmarkId::new(name, WORKLOAD.label());
        {
            let mut group = crest_bench::group(c, "precopy-dump");
            group.bench_function(id.clone(), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| one_dump()).sum())
            });
            group.finish();
        }
        let mut group = crest_bench::group(c, "precopy-frozen");
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
    crest_bench::bench_main(bench_precopy);
}
