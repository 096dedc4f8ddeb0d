//! `crest-conformance`: the suite as a program (see `suite::main` for the flags).

fn main() -> std::process::ExitCode {
    crest_conformance::suite::main(std::env::args_os().collect())
}
