//! `crest dump` throughput over dirty anonymous memory, a sparse reservation
//! and many small mappings, images on tmpfs; and the time the target stays
//! frozen, as its own figure (group `frozen`, read from the image's stats).
//! The target is left running after each dump so one target serves every
//! iteration.

use crest_bench::{Hog, ImageDir, WORKLOADS};
use criterion::{BenchmarkId, Criterion, Throughput};

fn bench_dump(c: &mut Criterion) {
    let bar = indicatif::ProgressBar::hidden();
    for &w in WORKLOADS {
        let hog = Hog::spawn(w).expect("hog");
        let dir = ImageDir::new(&format!("dump-{}", w.label()));
        crest_bench::bench_dump_wall_and_frozen(
            c,
            "dump",
            "frozen",
            BenchmarkId::from_parameter(w.label()),
            Some(Throughput::Bytes(w.bytes())),
            || crest_bench::timed_dump(hog.pid, &dir, None, &bar),
        );
    }
}

fn main() {
    crest_bench::bench_main(bench_dump);
}
