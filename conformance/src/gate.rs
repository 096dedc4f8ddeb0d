//! The gate: whether one kernel's run says "this kernel carries every must
//! requirement, and nothing that passed before is lost". The harness applies
//! it to its own run (its exit status) and `cargo xtask conformance` to every
//! kernel of a matrix, so a green run means the same thing both ways.
//!
//! A run fails the gate when
//! - a case of the selection has no outcome in the report (it panicked, the
//!   harness lost it), or the report has a case `cases.json` does not;
//! - a case failed (whatever its priority);
//! - a must-priority case did not pass for a reason no entry of the
//!   committed allow-list (`conformance/gate-allow.json`) covers: an engine
//!   that refuses everything, a host without root, a missing MPI all turn it
//!   red;
//! - a case that passed in the baseline (the committed report of the same
//!   kernel) does not pass now, unless an allowance covers its outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

use crate::cases::CaseSpec;
use crate::report::{Outcome, Report};
use crate::requirements::{Priority, Requirement};

/// The allow-list as it was when this binary was built.
pub const ALLOW_JSON: &str = include_str!("../gate-allow.json");

/// One accepted way for a case not to pass, with its written justification.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allowance {
    /// The case, `ID::case`.
    pub case: String,
    /// Kernel labels (`host`, `6.1`, …) it holds on; `*` for every kernel.
    pub kernels: Vec<String>,
    /// Text the case's message must contain (the reason it gave).
    pub reason: String,
    /// Why not passing is acceptable there: shown with the matrix.
    pub why: String,
}

impl Allowance {
    /// Whether this allowance accepts `case` ignored on `label` with `message`.
    /// A failure is never accepted.
    pub fn covers(&self, label: &str, case: &str, outcome: Outcome, message: &str) -> bool {
        outcome == Outcome::Ignored
            && self.case == case
            && self.kernels.iter().any(|k| k == "*" || k == label)
            && message.contains(&self.reason)
    }
}

/// Parses an allow-list and checks every entry names a known case and says
/// why, in words.
pub fn parse_allowances(text: &str, specs: &[CaseSpec]) -> Result<Vec<Allowance>, String> {
    let list: Vec<Allowance> =
        serde_json::from_str(text).map_err(|e| format!("gate-allow.json: {e}"))?;
    for a in &list {
        if !specs.iter().any(|s| s.id == a.case) {
            return Err(format!(
                "gate-allow.json: {:?} is not a case of cases.json",
                a.case
            ));
        }
        if a.kernels.is_empty() || a.reason.trim().is_empty() {
            return Err(format!(
                "gate-allow.json: {}: an entry names its kernels and the reason it accepts",
                a.case
            ));
        }
        if a.why.split_whitespace().count() < 5 {
            return Err(format!(
                "gate-allow.json: {}: `why` must justify the entry in a sentence",
                a.case
            ));
        }
    }
    Ok(list)
}

/// The embedded allow-list, checked against the embedded case table. Panics
/// only if the build embedded a broken file, which the unit tests catch first.
pub fn allowances() -> Vec<Allowance> {
    parse_allowances(ALLOW_JSON, &crate::cases::embedded()).unwrap_or_else(|e| panic!("{e}"))
}

/// Something wrong with one kernel's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A case of the selection has no outcome in the report.
    Missing { case: String },
    /// The report has a case the case table does not.
    Unknown { case: String },
    /// A must-priority case failed.
    MustFailed { case: String, message: String },
    /// A case of another priority failed: a failure is never acceptable.
    Failed { case: String, message: String },
    /// A must-priority case was ignored, and no allowance covers why.
    MustNotPassed { case: String, message: String },
    /// A case that passed in the baseline does not pass now.
    Regressed {
        case: String,
        now: Outcome,
        message: String,
    },
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Missing { case } => write!(f, "{case} has no outcome in the report"),
            Finding::Unknown { case } => write!(f, "{case} is in the report but not in cases.json"),
            Finding::MustFailed { case, message } => {
                write!(f, "must-priority case {case} failed: {}", first_line(message))
            }
            Finding::Failed { case, message } => {
                write!(f, "{case} failed: {}", first_line(message))
            }
            Finding::MustNotPassed { case, message } => write!(
                f,
                "must-priority case {case} did not pass (ignored: {}); no entry of conformance/gate-allow.json accepts that",
                first_line(message)
            ),
            Finding::Regressed { case, now, message } => write!(
                f,
                "regression: {case} passed in the baseline, now {}{}",
                now.name(),
                match first_line(message) {
                    "" => String::new(),
                    m => format!(": {m}"),
                }
            ),
        }
    }
}

/// The gate's verdict on one kernel's run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub findings: Vec<Finding>,
    /// Cases that did not pass but an allowance accepts: (case, why).
    pub allowed: Vec<(String, String)>,
}

/// Judges `report`, the run on kernel `label`: `expected` is the selection
/// the run was asked for (every case when unfiltered), `reqs` gives each
/// case's priority (the contract, not what the report says of itself), and
/// `baseline` the cases that passed in the baseline of this kernel.
pub fn judge(
    label: &str,
    report: &Report,
    expected: &[String],
    reqs: &BTreeMap<String, Requirement>,
    allow: &[Allowance],
    baseline: Option<&BTreeSet<String>>,
) -> Verdict {
    let mut v = Verdict::default();
    let recorded: BTreeSet<&str> = report.cases.iter().map(|c| c.id.as_str()).collect();
    let wanted: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    for case in expected {
        if !recorded.contains(case.as_str()) {
            v.findings.push(Finding::Missing { case: case.clone() });
        }
    }
    for c in &report.cases {
        if !wanted.contains(c.id.as_str()) {
            v.findings.push(Finding::Unknown { case: c.id.clone() });
            continue;
        }
        if c.outcome == Outcome::Passed {
            continue;
        }
        if let Some(a) = allow
            .iter()
            .find(|a| a.covers(label, &c.id, c.outcome, &c.message))
        {
            v.allowed.push((c.id.clone(), a.why.clone()));
            continue;
        }
        let must = reqs
            .get(&c.requirement)
            .is_some_and(|r| r.priority == Priority::Must);
        if must {
            v.findings.push(match c.outcome {
                Outcome::Failed => Finding::MustFailed {
                    case: c.id.clone(),
                    message: c.message.clone(),
                },
                _ => Finding::MustNotPassed {
                    case: c.id.clone(),
                    message: c.message.clone(),
                },
            });
        } else if c.outcome == Outcome::Failed {
            v.findings.push(Finding::Failed {
                case: c.id.clone(),
                message: c.message.clone(),
            });
        } else if baseline.is_some_and(|b| b.contains(&c.id)) {
            v.findings.push(Finding::Regressed {
                case: c.id.clone(),
                now: c.outcome,
                message: c.message.clone(),
            });
        }
    }
    // A case of the baseline the selection wanted and the report lacks is
    // already `Missing`; a must case that regressed is already a must finding.
    v
}

/// The IDs of the cases that passed in `report`.
pub fn passed(report: &Report) -> BTreeSet<String> {
    report
        .cases
        .iter()
        .filter(|c| c.outcome == Outcome::Passed)
        .map(|c| c.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{CaseRecord, REPORT_SCHEMA};
    use crate::requirements;

    const REQS: &str = "| ID | state | priority | tests | status |\n|---|---|---|---|---|\n\
        | PIPE-CONTENTS | s | must | | |\n| MPI-VENDOR | s | must | | |\n\
        | SOCK-UDP | s | should | | |\n| FILE-LOCK | s | later | | |\n";

    fn rec(id: &str, outcome: Outcome, message: &str) -> CaseRecord {
        CaseRecord {
            id: id.into(),
            requirement: id.split("::").next().unwrap_or(id).into(),
            // What the report says of itself is not what the gate trusts.
            priority: "later".into(),
            outcome,
            duration_ms: 1,
            message: message.into(),
            notes: String::new(),
        }
    }

    fn report(cases: Vec<CaseRecord>) -> Report {
        Report {
            schema: REPORT_SCHEMA.into(),
            label: "6.1".into(),
            kernel: "6.1.0-50-amd64".into(),
            engine_version: "crest 0.1.0".into(),
            commit: String::new(),
            selection: None,
            engine_bin: None,
            timestamp: "2026-12-07T00:00:00Z".into(),
            cases,
        }
    }

    fn allow() -> Vec<Allowance> {
        vec![Allowance {
            case: "MPI-VENDOR::v".into(),
            kernels: vec!["*".into()],
            reason: "pass --mpi PATH".into(),
            why: "nothing to validate without a vendor launcher".into(),
        }]
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_must_case_ignored_for_any_reason_not_allowed_fails() {
        let reqs = requirements::parse(REQS).unwrap();
        let r = report(vec![
            rec(
                "PIPE-CONTENTS::a",
                Outcome::Ignored,
                "dump refused: crest: error: pid 1: fd 3 is a pipe: not supported yet",
            ),
            rec("PIPE-CONTENTS::b", Outcome::Failed, "contents differ\nmore"),
            rec(
                "MPI-VENDOR::v",
                Outcome::Ignored,
                "needs a vendor launcher: pass --mpi PATH (and --mpi-args ARGS)",
            ),
            rec("SOCK-UDP::x", Outcome::Ignored, "refused"),
            rec("FILE-LOCK::x", Outcome::Failed, "later and failed"),
        ]);
        // (FILE-LOCK is `later`: its failure fails the gate all the same.)
        let expected = ids(&[
            "PIPE-CONTENTS::a",
            "PIPE-CONTENTS::b",
            "MPI-VENDOR::v",
            "SOCK-UDP::x",
            "FILE-LOCK::x",
        ]);
        let v = judge("6.1", &r, &expected, &reqs, &allow(), None);
        let text: Vec<String> = v.findings.iter().map(|f| f.to_string()).collect();
        assert_eq!(
            text,
            [
                "must-priority case PIPE-CONTENTS::a did not pass (ignored: dump refused: crest: error: pid 1: fd 3 is a pipe: not supported yet); no entry of conformance/gate-allow.json accepts that",
                "must-priority case PIPE-CONTENTS::b failed: contents differ",
                "FILE-LOCK::x failed: later and failed",
            ]
        );
        assert_eq!(v.allowed.len(), 1);
        assert_eq!(v.allowed[0].0, "MPI-VENDOR::v");
    }

    #[test]
    fn an_allowance_needs_its_reason_and_never_covers_a_failure() {
        let a = &allow()[0];
        assert!(a.covers(
            "host",
            "MPI-VENDOR::v",
            Outcome::Ignored,
            "x: pass --mpi PATH"
        ));
        assert!(!a.covers("host", "MPI-VENDOR::v", Outcome::Ignored, "mpicc crashed"));
        assert!(!a.covers("host", "MPI-VENDOR::v", Outcome::Failed, "pass --mpi PATH"));
        assert!(!a.covers("host", "MPI-MPICH::v", Outcome::Ignored, "pass --mpi PATH"));
        let only = Allowance {
            kernels: vec!["5.10".into()],
            ..a.clone()
        };
        assert!(!only.covers("6.1", "MPI-VENDOR::v", Outcome::Ignored, "pass --mpi PATH"));
    }

    #[test]
    fn vanished_and_unknown_cases_fail() {
        let reqs = requirements::parse(REQS).unwrap();
        let r = report(vec![
            rec("PIPE-CONTENTS::a", Outcome::Passed, ""),
            rec("PIPE-CONTENTS::zz", Outcome::Passed, ""),
        ]);
        let v = judge(
            "6.1",
            &r,
            &ids(&["PIPE-CONTENTS::a", "PIPE-CONTENTS::b"]),
            &reqs,
            &[],
            None,
        );
        assert_eq!(
            v.findings,
            [
                Finding::Missing {
                    case: "PIPE-CONTENTS::b".into()
                },
                Finding::Unknown {
                    case: "PIPE-CONTENTS::zz".into()
                }
            ]
        );
    }

    #[test]
    fn a_should_case_that_passed_in_the_baseline_regresses() {
        let reqs = requirements::parse(REQS).unwrap();
        let r = report(vec![
            rec("SOCK-UDP::x", Outcome::Ignored, "dump refused: no"),
            rec("FILE-LOCK::x", Outcome::Ignored, "not passed before either"),
        ]);
        let base = BTreeSet::from(["SOCK-UDP::x".to_string()]);
        let v = judge(
            "6.1",
            &r,
            &ids(&["SOCK-UDP::x", "FILE-LOCK::x"]),
            &reqs,
            &[],
            Some(&base),
        );
        assert_eq!(
            v.findings.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
            ["regression: SOCK-UDP::x passed in the baseline, now ignored: dump refused: no"]
        );
    }

    #[test]
    fn the_committed_allow_list_parses_and_names_known_cases() {
        let list = allowances();
        assert!(!list.is_empty());
        let specs = crate::cases::embedded();
        assert!(parse_allowances(
            r#"[{"case": "NOPE-X::y", "kernels": ["*"], "reason": "r", "why": "a sentence of five words"}]"#,
            &specs
        )
        .unwrap_err()
        .contains("not a case"));
        assert!(parse_allowances(
            r#"[{"case": "MPI-VENDOR::vendor-mpirun", "kernels": ["*"], "reason": "r", "why": "because"}]"#,
            &specs
        )
        .unwrap_err()
        .contains("justify"));
        assert!(parse_allowances(
            r#"[{"case": "MPI-VENDOR::vendor-mpirun", "kernels": ["*"], "reason": "r", "why": "w", "extra": 1}]"#,
            &specs
        )
        .unwrap_err()
        .contains("unknown field"));
    }
}
