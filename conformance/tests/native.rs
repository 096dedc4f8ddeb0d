//! `cargo test` runs the suite natively, on the host kernel, through the same
//! code path as the `crest-conformance` binary, with the crest and workload
//! binaries from this target dir.

fn main() -> std::process::ExitCode {
    crest_conformance::suite::main(std::env::args_os().collect())
}
