//! The crest conformance suite: one trial per (requirement, case) of
//! REQUIREMENTS.md, run by the `crest-conformance` binary, by `cargo test`
//! (`tests/native.rs`) and, inside QEMU guests, by `xtask`, which also reads
//! the JSON reports (`report`).

pub mod cases;
pub mod gate;
pub mod mpi;
pub mod provenance;
pub mod report;
pub mod requirements;
pub mod runner;
pub mod suite;
pub mod view;
