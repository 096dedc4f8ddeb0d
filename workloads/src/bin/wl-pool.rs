//! Worker pools computing a checksum across the checkpoint: a C program's
//! pthreads (barriers, mutex, condition variable, join; `c/pool.c`) and a
//! rayon thread pool. Each runs rounds until told to stop; the checksum must
//! equal the same number of rounds computed serially, and the pool must keep
//! making progress after the restore.
//!
//! `wl-pool --ctl DIR MODE N`, MODE one of: c-pthreads N, rayon N.

use crest_workloads::support::{mode, num_arg, setup_failed};
use crest_workloads::{Checks, Ctl};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

extern "C" {
    fn pool_start(n: libc::c_int) -> libc::c_int;
    fn pool_wait_rounds(target: u64);
    fn pool_finish(rounds: *mut u64, checksum: *mut u64);
    fn pool_expected(n: libc::c_int, rounds: u64) -> u64;
}

/// Rounds the pool must complete after `go`: proof that it still runs.
const ROUNDS_AFTER_GO: u64 = 50;

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, args) = mode(&args);
    let n: usize = num_arg(&args, 0, "threads");
    let mut c = Checks::new();
    match mode.as_str() {
        "c-pthreads" => c_pthreads(&ctl, &mut c, n),
        "rayon" => rayon_pool(&ctl, &mut c, n),
        other => {
            eprintln!("wl-pool: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}

fn c_pthreads(ctl: &Ctl, c: &mut Checks, n: usize) {
    // SAFETY: pool_start only creates threads running pool.c's own code.
    if unsafe { pool_start(n as libc::c_int) } != 0 {
        setup_failed("pool_start");
    }
    // SAFETY: blocks on pool.c's condition variable until 20 rounds are done.
    unsafe { pool_wait_rounds(20) };
    ctl.ready();
    ctl.wait_for_go();
    let (mut rounds, mut sum) = (0u64, 0u64);
    // SAFETY: as above; then pool_finish writes two u64 we own.
    unsafe {
        pool_wait_rounds(20 + ROUNDS_AFTER_GO);
        pool_finish(&mut rounds, &mut sum);
    }
    // SAFETY: a pure computation.
    let expected = unsafe { pool_expected(n as libc::c_int, rounds) };
    c.eq(&format!("checksum after {rounds} rounds"), sum, expected);
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// One round: a parallel (or serial) sum over the data, folded into the checksum.
fn round(data: &mut [u64], checksum: u64, r: u64, parallel: bool) -> u64 {
    let sum: u64 = if parallel {
        data.par_chunks(1024)
            .map(|ch| {
                ch.iter()
                    .map(|&x| mix(x.wrapping_add(r)))
                    .fold(0u64, u64::wrapping_add)
            })
            .reduce(|| 0, u64::wrapping_add)
    } else {
        data.iter()
            .map(|&x| mix(x.wrapping_add(r)))
            .fold(0u64, u64::wrapping_add)
    };
    if parallel {
        data.par_iter_mut().for_each(|x| *x = mix(*x ^ sum));
    } else {
        data.iter_mut().for_each(|x| *x = mix(*x ^ sum));
    }
    mix(checksum ^ sum)
}

fn initial_data() -> Vec<u64> {
    (0..64 * 1024u64)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect()
}

fn rayon_pool(ctl: &Ctl, c: &mut Checks, n: usize) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("wl-rayon{i}"))
        .build()
        .unwrap_or_else(|_| setup_failed("rayon pool"));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (stop2, done2) = (Arc::clone(&stop), Arc::clone(&done));
    // The driver thread runs rounds on the pool until stopped; between rounds
    // the workers sleep in futex waits, inside rounds they compute.
    let driver = std::thread::spawn(move || {
        let mut data = initial_data();
        let mut checksum = 0u64;
        let mut r = 0u64;
        while !stop2.load(Ordering::Acquire) {
            checksum = pool.install(|| round(&mut data, checksum, r, true));
            r += 1;
            done2.store(r, Ordering::Release);
            std::thread::sleep(Duration::from_millis(1));
        }
        (r, checksum)
    });
    while done.load(Ordering::Acquire) < 20 {
        std::thread::sleep(Duration::from_millis(2));
    }
    ctl.ready();
    ctl.wait_for_go();
    let after_go = done.load(Ordering::Acquire) + ROUNDS_AFTER_GO;
    while done.load(Ordering::Acquire) < after_go {
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Release);
    let (rounds, sum) = driver
        .join()
        .unwrap_or_else(|_| setup_failed("driver thread"));
    let mut data = initial_data();
    let expected = (0..rounds).fold(0u64, |ck, r| round(&mut data, ck, r, false));
    c.eq(&format!("checksum after {rounds} rounds"), sum, expected);
}
