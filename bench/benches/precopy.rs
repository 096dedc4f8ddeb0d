//! The time a target stays frozen, plain dump against `dump --pre-copy`, for
//! a 1 GiB process that keeps rewriting 16 MiB of it (a pass every 10 ms):
//! a plain dump freezes it for the whole copy, a pre-copy dump only to copy
//! again what it wrote since the last running round. Each sample is one
//! dump's frozen time as the image's stats record it (group `precopy-frozen`);
//! group `precopy-dump` times the whole dump. Images on tmpfs, the target
//! left running after each dump.

use crest_bench::{Hog, ImageDir, Workload};
use crest_engine::dump::PreCopyOptions;
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
        let one_dump = || {
            let (took, stats) = crest_bench::timed_dump(hog.pid, &dir, pre_copy, &bar);
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
            (took, stats)
        };
        crest_bench::bench_dump_wall_and_frozen(
            c,
            "precopy-dump",
            "precopy-frozen",
            BenchmarkId::new(name, WORKLOAD.label()),
            None,
            one_dump,
        );
    }
}

fn main() {
    crest_bench::bench_main(bench_precopy);
}
