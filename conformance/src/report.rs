//! The JSON report one suite run writes (`--report PATH`): one record per case.
//! `xtask` reads these, one per kernel, and merges them into a matrix.

use serde::{Deserialize, Serialize};

/// The value of [`Report::schema`]; bump it when a field changes meaning.
pub const REPORT_SCHEMA: &str = "crest-conformance-report/1";

/// One run of the suite on one kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub schema: String,
    /// `uname -r` of the kernel the suite ran on.
    pub kernel: String,
    /// The crest engine version (`crest --version`).
    pub engine_version: String,
    /// When the run started, RFC 3339 UTC.
    pub timestamp: String,
    pub cases: Vec<CaseRecord>,
}

/// The outcome of one (requirement, case) trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRecord {
    /// The trial name: `REQUIREMENT-ID::case`.
    pub id: String,
    /// The requirement ID from REQUIREMENTS.md.
    pub requirement: String,
    /// The requirement's priority: must, should, later or won't.
    pub priority: String,
    pub outcome: Outcome,
    pub duration_ms: u64,
    /// Why it failed or was ignored (the engine's refusal for unsupported features).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passed,
    Failed,
    /// Not run here: the engine does not support it yet, or something it needs
    /// (a kernel feature, an MPI installation) is missing. `message` says which.
    Ignored,
}
