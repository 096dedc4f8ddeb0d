//! Merging per-kernel reports into a requirement × kernel matrix, baseline
//! comparison (regressions), and the exit decision.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{Context, Result};
use crest_conformance::report::{Outcome, Report};
use serde::{Deserialize, Serialize};

/// One kernel's run: its report, or why there is none.
#[derive(Debug, Clone)]
pub struct KernelRun {
    /// `host`, `6.1`, `custom`, …
    pub label: String,
    pub report: Option<Report>,
    /// Set when the run did not produce a usable report (boot failure,
    /// timeout, harness crash): counted as a failure.
    pub error: Option<String>,
    pub seconds: f64,
}

/// Lines of a failed case's message printed with the matrix; the report,
/// JUnit file and case directory keep all of it.
const DETAIL_LINES: usize = 40;

/// Every failed case with its message (the first [`DETAIL_LINES`] lines),
/// kernel by kernel, so a log that holds only the terminal output (CI) says
/// why a cell is red. Empty when nothing failed.
pub fn failure_details(runs: &[KernelRun]) -> String {
    let mut s = String::new();
    for run in runs {
        let Some(report) = &run.report else { continue };
        for c in report.cases.iter().filter(|c| c.outcome == Outcome::Failed) {
            let _ = writeln!(s, "--- [{}] {} failed ---", run.label, c.id);
            let lines: Vec<&str> = c.message.lines().collect();
            for l in lines.iter().take(DETAIL_LINES) {
                let _ = writeln!(s, "{l}");
            }
            if lines.len() > DETAIL_LINES {
                let _ = writeln!(
                    s,
                    "[{} more lines in report-{}.json]",
                    lines.len() - DETAIL_LINES,
                    run.label
                );
            }
        }
    }
    s
}

/// Case counts of one requirement on one kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
}

impl Counts {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Passed => self.passed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Ignored => self.ignored += 1,
        }
    }
    fn total(&self) -> u32 {
        self.passed + self.failed + self.ignored
    }
    /// The cell text. Ignored cases never show as passed.
    pub fn status(&self) -> String {
        let n = self.total();
        if n == 0 {
            "-".into()
        } else if self.failed > 0 {
            format!("FAIL {}/{n}", self.failed)
        } else if self.passed == n {
            "pass".into()
        } else if self.passed == 0 {
            "ignored".into()
        } else {
            format!("partial {}/{n}", self.passed)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelColumn {
    pub label: String,
    /// `uname -r` from the report.
    pub release: Option<String>,
    pub engine_version: Option<String>,
    pub error: Option<String>,
    pub totals: Counts,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequirementRow {
    pub requirement: String,
    pub priority: String,
    /// By kernel label; absent = not in that kernel's report.
    pub cells: BTreeMap<String, Counts>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRow {
    pub id: String,
    pub requirement: String,
    pub priority: String,
    pub outcomes: BTreeMap<String, Outcome>,
    /// First line of the message, by kernel, when not passed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub messages: BTreeMap<String, String>,
}

/// A case that passed in the baseline and does not pass now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regression {
    pub kernel: String,
    pub case: String,
    /// `failed`, `ignored`, or `missing`.
    pub now: String,
}

/// `matrix.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    pub schema: String,
    pub kernels: Vec<KernelColumn>,
    pub requirements: Vec<RequirementRow>,
    pub cases: Vec<CaseRow>,
    /// `kernel: case` of every failed must-priority case.
    pub must_failures: Vec<String>,
    pub regressions: Vec<Regression>,
}

pub const MATRIX_SCHEMA: &str = "crest-conformance-matrix/1";

/// Builds the matrix from the runs (column order = run order).
pub fn build(runs: &[KernelRun]) -> Matrix {
    let mut reqs: BTreeMap<String, RequirementRow> = BTreeMap::new();
    let mut cases: BTreeMap<String, CaseRow> = BTreeMap::new();
    let mut kernels = Vec::new();
    let mut must_failures = Vec::new();
    for run in runs {
        let mut totals = Counts::default();
        if let Some(r) = &run.report {
            for c in &r.cases {
                totals.add(c.outcome);
                let row = reqs
                    .entry(c.requirement.clone())
                    .or_insert_with(|| RequirementRow {
                        requirement: c.requirement.clone(),
                        priority: c.priority.clone(),
                        cells: BTreeMap::new(),
                    });
                row.cells
                    .entry(run.label.clone())
                    .or_default()
                    .add(c.outcome);
                let cr = cases.entry(c.id.clone()).or_insert_with(|| CaseRow {
                    id: c.id.clone(),
                    requirement: c.requirement.clone(),
                    priority: c.priority.clone(),
                    outcomes: BTreeMap::new(),
                    messages: BTreeMap::new(),
                });
                cr.outcomes.insert(run.label.clone(), c.outcome);
                if c.outcome != Outcome::Passed {
                    if let Some(first) = c.message.lines().next().filter(|l| !l.is_empty()) {
                        cr.messages.insert(run.label.clone(), first.to_string());
                    }
                }
                if c.outcome == Outcome::Failed && c.priority.eq_ignore_ascii_case("must") {
                    must_failures.push(format!("{}: {}", run.label, c.id));
                }
            }
        }
        kernels.push(KernelColumn {
            label: run.label.clone(),
            release: run.report.as_ref().map(|r| r.kernel.clone()),
            engine_version: run.report.as_ref().map(|r| r.engine_version.clone()),
            error: run.error.clone(),
            totals,
            seconds: run.seconds,
        });
    }
    Matrix {
        schema: MATRIX_SCHEMA.into(),
        kernels,
        requirements: reqs.into_values().collect(),
        cases: cases.into_values().collect(),
        must_failures,
        regressions: Vec::new(),
    }
}

/// What passed in a baseline: a `matrix.json` (per kernel) or one suite
/// report (applies to every kernel of this run).
#[derive(Debug, Clone, PartialEq)]
pub enum Baseline {
    PerKernel(BTreeMap<String, BTreeSet<String>>),
    AnyKernel(BTreeSet<String>),
}

impl Baseline {
    pub fn parse(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).context("baseline is not JSON")?;
        if v.get("schema").and_then(|s| s.as_str()) == Some(MATRIX_SCHEMA) {
            let m: Matrix = serde_json::from_value(v).context("baseline matrix.json")?;
            let mut per: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for c in m.cases {
                for (k, o) in c.outcomes {
                    if o == Outcome::Passed {
                        per.entry(k).or_default().insert(c.id.clone());
                    }
                }
            }
            Ok(Baseline::PerKernel(per))
        } else {
            let r: Report = serde_json::from_value(v)
                .context("baseline is neither a matrix.json nor a conformance report")?;
            Ok(Baseline::AnyKernel(
                r.cases
                    .into_iter()
                    .filter(|c| c.outcome == Outcome::Passed)
                    .map(|c| c.id)
                    .collect(),
            ))
        }
    }

    fn passed(&self, kernel: &str) -> Option<&BTreeSet<String>> {
        match self {
            Baseline::PerKernel(m) => m.get(kernel),
            Baseline::AnyKernel(s) => Some(s),
        }
    }
}

/// Fills `m.regressions`: every case that passed in the baseline (for that
/// kernel) and now failed, is ignored, or is missing from a kernel that ran.
/// A kernel whose run errored counts all its baseline passes as missing.
/// With a `filter` (the harness's substring filter), cases it excludes are not
/// expected.
pub fn compare(m: &mut Matrix, baseline: &Baseline, filter: Option<&str>) {
    let mut out = Vec::new();
    for k in &m.kernels {
        let Some(passed) = baseline.passed(&k.label) else {
            continue;
        };
        for id in passed {
            if filter.is_some_and(|f| !id.contains(f)) {
                continue;
            }
            let now = m
                .cases
                .iter()
                .find(|c| &c.id == id)
                .and_then(|c| c.outcomes.get(&k.label));
            let now = match now {
                Some(Outcome::Passed) => continue,
                Some(o) => match o {
                    Outcome::Failed => "failed",
                    _ => "ignored",
                },
                None => "missing",
            };
            out.push(Regression {
                kernel: k.label.clone(),
                case: id.clone(),
                now: now.into(),
            });
        }
    }
    m.regressions = out;
}

impl Matrix {
    /// Why the run fails the gate (empty = it passes).
    pub fn gate_failures(&self) -> Vec<String> {
        let mut why = Vec::new();
        for k in &self.kernels {
            if let Some(e) = &k.error {
                why.push(format!(
                    "kernel {}: no usable report: {}",
                    k.label,
                    e.lines().next().unwrap_or("")
                ));
            }
        }
        for f in &self.must_failures {
            why.push(format!("must-priority case failed on {f}"));
        }
        for r in &self.regressions {
            why.push(format!(
                "regression on {}: {} passed in the baseline, now {}",
                r.kernel, r.case, r.now
            ));
        }
        why
    }

    fn header_cells(&self) -> Vec<String> {
        self.kernels
            .iter()
            .map(|k| match (&k.error, &k.release) {
                (Some(_), _) => format!("{} (ERROR)", k.label),
                (None, Some(r)) if r != &k.label => format!("{} ({r})", k.label),
                _ => k.label.clone(),
            })
            .collect()
    }

    fn cell(&self, row: &RequirementRow, k: &KernelColumn) -> String {
        match row.cells.get(&k.label) {
            Some(c) => c.status(),
            None if k.error.is_some() => "error".into(),
            None => "-".into(),
        }
    }

    /// The matrix as a markdown document.
    pub fn markdown(&self) -> String {
        let mut s = String::from("# crest conformance: requirement × kernel\n\n");
        let heads = self.header_cells();
        let _ = writeln!(s, "| requirement | priority | {} |", heads.join(" | "));
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(heads.len()));
        for row in &self.requirements {
            let cells: Vec<String> = self.kernels.iter().map(|k| self.cell(row, k)).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                row.requirement,
                row.priority,
                cells.join(" | ")
            );
        }
        s.push_str("\n## Kernels\n\n| kernel | release | passed | failed | ignored | seconds | error |\n|---|---|---|---|---|---|---|\n");
        for k in &self.kernels {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.0} | {} |",
                k.label,
                k.release.as_deref().unwrap_or("-"),
                k.totals.passed,
                k.totals.failed,
                k.totals.ignored,
                k.seconds,
                k.error
                    .as_deref()
                    .map(|e| e.lines().next().unwrap_or("").replace('|', "\\|"))
                    .unwrap_or_default()
            );
        }
        let not_passed: Vec<&CaseRow> = self
            .cases
            .iter()
            .filter(|c| !c.messages.is_empty())
            .collect();
        if !not_passed.is_empty() {
            s.push_str("\n## Cases not passed\n\n| case | kernel | outcome | message |\n|---|---|---|---|\n");
            for c in not_passed {
                for (k, msg) in &c.messages {
                    let o = c
                        .outcomes
                        .get(k)
                        .map(|o| format!("{o:?}").to_lowercase())
                        .unwrap_or_default();
                    let _ = writeln!(s, "| {} | {k} | {o} | {} |", c.id, msg.replace('|', "\\|"));
                }
            }
        }
        let gate = self.gate_failures();
        s.push_str("\n## Gate\n\n");
        if gate.is_empty() {
            s.push_str("passed: no must-priority failure, no regression, every kernel reported.\n");
        } else {
            for g in gate {
                let _ = writeln!(s, "- {g}");
            }
        }
        s
    }

    /// A fixed-width table for the terminal.
    pub fn terminal(&self) -> String {
        let heads = self.header_cells();
        let mut rows: Vec<Vec<String>> =
            vec![[vec!["requirement".to_string(), "prio".to_string()], heads].concat()];
        for row in &self.requirements {
            let mut r = vec![row.requirement.clone(), row.priority.clone()];
            r.extend(self.kernels.iter().map(|k| self.cell(row, k)));
            rows.push(r);
        }
        let ncol = rows[0].len();
        let widths: Vec<usize> = (0..ncol)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut s = String::new();
        for (n, r) in rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(s, "{}", line.join("  ").trim_end());
            if n == 0 {
                let _ = writeln!(
                    s,
                    "{}",
                    "-".repeat(widths.iter().sum::<usize>() + 2 * (ncol - 1))
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crest_conformance::report::{CaseRecord, REPORT_SCHEMA};

    fn case(id: &str, prio: &str, o: Outcome, msg: &str) -> CaseRecord {
        CaseRecord {
            id: id.into(),
            requirement: id.split("::").next().unwrap().into(),
            priority: prio.into(),
            outcome: o,
            duration_ms: 5,
            message: msg.into(),
            notes: String::new(),
        }
    }

    fn report(kernel: &str, cases: Vec<CaseRecord>) -> Report {
        Report {
            schema: REPORT_SCHEMA.into(),
            kernel: kernel.into(),
            engine_version: "0.1.0".into(),
            timestamp: "2026-11-25T18:00:00Z".into(),
            cases,
        }
    }

    fn runs() -> Vec<KernelRun> {
        vec![
            KernelRun {
                label: "host".into(),
                report: Some(report(
                    "6.18.44",
                    vec![
                        case("PIPE-CONTENTS::small", "must", Outcome::Passed, ""),
                        case("PIPE-CONTENTS::full", "must", Outcome::Passed, ""),
                        case(
                            "SOCK-TCP::est",
                            "should",
                            Outcome::Ignored,
                            "not supported yet",
                        ),
                        case("PROC-PID::restore", "must", Outcome::Passed, ""),
                    ],
                )),
                error: None,
                seconds: 10.0,
            },
            KernelRun {
                label: "6.1".into(),
                report: Some(report(
                    "6.1.0-50-amd64",
                    vec![
                        case("PIPE-CONTENTS::small", "must", Outcome::Passed, ""),
                        case(
                            "PIPE-CONTENTS::full",
                            "must",
                            Outcome::Failed,
                            "contents differ\nmore",
                        ),
                        case(
                            "SOCK-TCP::est",
                            "should",
                            Outcome::Ignored,
                            "not supported yet",
                        ),
                    ],
                )),
                error: None,
                seconds: 50.0,
            },
            KernelRun {
                label: "5.10".into(),
                report: None,
                error: Some("the guest wrote no status\nKernel panic".into()),
                seconds: 3.0,
            },
        ]
    }

    #[test]
    fn merges_reports_into_matrix() {
        let m = build(&runs());
        assert_eq!(m.kernels.len(), 3);
        assert_eq!(m.requirements.len(), 3);
        let pipe = m
            .requirements
            .iter()
            .find(|r| r.requirement == "PIPE-CONTENTS")
            .unwrap();
        assert_eq!(pipe.cells["host"].status(), "pass");
        assert_eq!(pipe.cells["6.1"].status(), "FAIL 1/2");
        assert!(!pipe.cells.contains_key("5.10"));
        let tcp = m
            .requirements
            .iter()
            .find(|r| r.requirement == "SOCK-TCP")
            .unwrap();
        assert_eq!(tcp.cells["host"].status(), "ignored");
        assert_eq!(m.must_failures, ["6.1: PIPE-CONTENTS::full"]);
        assert_eq!(
            m.kernels[1].totals,
            Counts {
                passed: 1,
                failed: 1,
                ignored: 1
            }
        );
        let md = m.markdown();
        assert!(
            md.contains(
                "| requirement | priority | host (6.18.44) | 6.1 (6.1.0-50-amd64) | 5.10 (ERROR) |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| SOCK-TCP | should | ignored | ignored | error |"),
            "{md}"
        );
        assert!(
            md.contains("| PIPE-CONTENTS::full | 6.1 | failed | contents differ |"),
            "{md}"
        );
        let t = m.terminal();
        assert!(t.contains("PROC-PID"), "{t}");
        assert_eq!(
            failure_details(&runs()),
            "--- [6.1] PIPE-CONTENTS::full failed ---\ncontents differ\nmore\n"
        );
        let gate = m.gate_failures();
        assert_eq!(gate.len(), 2, "{gate:?}");
        assert!(gate[0].contains("5.10"));
        // matrix.json round-trips.
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Matrix>(&j).unwrap(), m);
    }

    #[test]
    fn partial_is_not_pass() {
        let c = Counts {
            passed: 1,
            failed: 0,
            ignored: 1,
        };
        assert_eq!(c.status(), "partial 1/2");
        assert_eq!(Counts::default().status(), "-");
    }

    #[test]
    fn baseline_regressions() {
        // Baseline: a single suite report (applies to all kernels).
        let base = report(
            "6.1.0-47-amd64",
            vec![
                case("PIPE-CONTENTS::full", "must", Outcome::Passed, ""),
                case("PROC-PID::restore", "must", Outcome::Passed, ""),
                case("SOCK-TCP::est", "should", Outcome::Ignored, ""),
            ],
        );
        let b = Baseline::parse(&serde_json::to_string(&base).unwrap()).unwrap();
        let mut m = build(&runs()[..2]);
        compare(&mut m, &b, None);
        let got: Vec<_> = m
            .regressions
            .iter()
            .map(|r| (r.kernel.as_str(), r.case.as_str(), r.now.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("6.1", "PIPE-CONTENTS::full", "failed"),
                ("6.1", "PROC-PID::restore", "missing")
            ]
        );

        // Baseline: a previous matrix (per kernel).
        let prev = build(&runs()[..1]);
        let b = Baseline::parse(&serde_json::to_string(&prev).unwrap()).unwrap();
        let mut m = build(&runs());
        compare(&mut m, &b, None);
        assert!(m.regressions.is_empty(), "{:?}", m.regressions);

        // Cases a filter leaves out are not missing.
        let mut m = build(&runs()[1..2]);
        compare(
            &mut m,
            &Baseline::parse(&serde_json::to_string(&base).unwrap()).unwrap(),
            Some("PIPE"),
        );
        assert_eq!(m.regressions.len(), 1, "{:?}", m.regressions);
        assert_eq!(m.regressions[0].case, "PIPE-CONTENTS::full");
        assert!(Baseline::parse("{\"x\":1}").is_err());
    }
}
