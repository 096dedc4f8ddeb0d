//! The crest conformance suite: the library half (report types shared with
//! `xtask`, which merges per-kernel reports into a matrix).

pub mod report;
