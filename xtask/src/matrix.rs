//! Merging per-kernel reports into a requirement × kernel matrix, the gate
//! (`crest_conformance::gate`, applied to every kernel, with a baseline),
//! and the exit decision.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use crest_conformance::gate::{self, Allowance};
use crest_conformance::report::{Outcome, Report};
use crest_conformance::requirements::Requirement;
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
    /// The harness's exit status; anything but 0 fails the gate.
    pub harness_exit: Option<i32>,
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

/// `matrix.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    pub schema: String,
    pub kernels: Vec<KernelColumn>,
    pub requirements: Vec<RequirementRow>,
    pub cases: Vec<CaseRow>,
    /// `kernel: finding` for everything the gate holds against a kernel's
    /// run (see [`apply_gate`]).
    pub gate: Vec<String>,
    /// `kernel: case: why` of every case that did not pass but an entry of
    /// gate-allow.json accepts.
    pub allowed: Vec<String>,
}

pub const MATRIX_SCHEMA: &str = "crest-conformance-matrix/2";

/// Builds the matrix from the runs (column order = run order).
pub fn build(runs: &[KernelRun]) -> Matrix {
    let mut reqs: BTreeMap<String, RequirementRow> = BTreeMap::new();
    let mut cases: BTreeMap<String, CaseRow> = BTreeMap::new();
    let mut kernels = Vec::new();
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
        gate: Vec::new(),
        allowed: Vec::new(),
    }
}

/// What passed in a baseline, per kernel label: a directory of reports
/// named `LABEL.json` (the committed `conformance/reports`), a `matrix.json`,
/// or one suite report (then it applies to every kernel of this run).
#[derive(Debug, Clone, PartialEq)]
pub enum Baseline {
    PerKernel(BTreeMap<String, BTreeSet<String>>),
    AnyKernel(BTreeSet<String>),
}

impl Baseline {
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let per = crest_conformance::report::read_labelled(path)?
                .into_iter()
                .map(|(label, r)| (label, gate::passed(&r)))
                .collect();
            return Ok(Baseline::PerKernel(per));
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("baseline {}", path.display()))
    }

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
            Ok(Baseline::AnyKernel(gate::passed(&r)))
        }
    }

    fn passed(&self, kernel: &str) -> Option<&BTreeSet<String>> {
        match self {
            Baseline::PerKernel(m) => m.get(kernel),
            Baseline::AnyKernel(s) => Some(s),
        }
    }
}

/// What the gate needs besides the runs: the selection every kernel was
/// asked to run, the contract's priorities, the allow-list, a baseline.
pub struct GateInput<'a> {
    pub expected: &'a [String],
    pub reqs: &'a BTreeMap<String, Requirement>,
    pub allow: &'a [Allowance],
    pub baseline: Option<&'a Baseline>,
}

/// Fills `m.gate` and `m.allowed`: every kernel's run judged by
/// [`gate::judge`], plus a harness that did not exit 0 and a kernel without
/// a usable report.
pub fn apply_gate(m: &mut Matrix, runs: &[KernelRun], g: &GateInput) {
    for run in runs {
        if let Some(e) = &run.error {
            m.gate.push(format!(
                "{}: no usable report: {}",
                run.label,
                e.lines().next().unwrap_or("")
            ));
        }
        let Some(report) = &run.report else { continue };
        let base = g.baseline.and_then(|b| b.passed(&run.label));
        let v = gate::judge(&run.label, report, g.expected, g.reqs, g.allow, base);
        m.gate
            .extend(v.findings.iter().map(|f| format!("{}: {f}", run.label)));
        m.allowed.extend(
            v.allowed
                .iter()
                .map(|(case, why)| format!("{}: {case}: {why}", run.label)),
        );
        if run.error.is_none() {
            match run.harness_exit {
                Some(0) => {}
                Some(code) => m.gate.push(format!(
                    "{}: the harness exited with status {code}",
                    run.label
                )),
                None => m.gate.push(format!(
                    "{}: the harness did not exit on its own",
                    run.label
                )),
            }
        }
    }
}

impl Matrix {
    /// Why the run fails the gate (empty = it passes).
    pub fn gate_failures(&self) -> Vec<String> {
        self.gate.clone()
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
        if !self.allowed.is_empty() {
            s.push_str("\n## Not passed, accepted by conformance/gate-allow.json\n\n");
            for a in &self.allowed {
                let _ = writeln!(s, "- {a}");
            }
        }
        let gate = self.gate_failures();
        s.push_str("\n## Gate\n\n");
        if gate.is_empty() {
            s.push_str("passed: every must-priority case passed (or is accepted above), every selected case has an outcome, nothing regressed, every kernel reported.\n");
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
    use crest_conformance::requirements;

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

    fn report(label: &str, kernel: &str, cases: Vec<CaseRecord>) -> Report {
        Report {
            schema: REPORT_SCHEMA.into(),
            label: label.into(),
            kernel: kernel.into(),
            engine_version: "0.1.0".into(),
            commit: String::new(),
            selection: None,
            engine_bin: None,
            timestamp: "2026-11-25T18:00:00Z".into(),
            cases,
        }
    }

    const REQS: &str = "| ID | state | priority | tests | status |\n|---|---|---|---|---|\n\
        | PIPE-CONTENTS | s | must | | |\n| PROC-PID | s | must | | |\n| SOCK-TCP | s | should | | |\n";

    fn expected() -> Vec<String> {
        [
            "PIPE-CONTENTS::small",
            "PIPE-CONTENTS::full",
            "SOCK-TCP::est",
            "PROC-PID::restore",
        ]
        .map(String::from)
        .to_vec()
    }

    fn runs() -> Vec<KernelRun> {
        vec![
            KernelRun {
                label: "host".into(),
                report: Some(report(
                    "host",
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
                harness_exit: Some(0),
                seconds: 10.0,
            },
            KernelRun {
                label: "6.1".into(),
                report: Some(report(
                    "6.1",
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
                harness_exit: Some(101),
                seconds: 50.0,
            },
            KernelRun {
                label: "5.10".into(),
                report: None,
                error: Some("the guest wrote no status\nKernel panic".into()),
                harness_exit: None,
                seconds: 3.0,
            },
        ]
    }

    fn gated(runs: &[KernelRun], baseline: Option<&Baseline>) -> Matrix {
        let reqs = requirements::parse(REQS).unwrap();
        let mut m = build(runs);
        apply_gate(
            &mut m,
            runs,
            &GateInput {
                expected: &expected(),
                reqs: &reqs,
                allow: &[],
                baseline,
            },
        );
        m
    }

    #[test]
    fn merges_reports_into_matrix() {
        let m = gated(&runs(), None);
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
        assert_eq!(
            m.gate_failures(),
            [
                "6.1: PROC-PID::restore has no outcome in the report",
                "6.1: must-priority case PIPE-CONTENTS::full failed: contents differ",
                "6.1: the harness exited with status 101",
                "5.10: no usable report: the guest wrote no status",
            ]
        );
        // matrix.json round-trips.
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Matrix>(&j).unwrap(), m);
    }

    #[test]
    fn a_must_case_ignored_fails_the_gate_and_a_clean_run_passes() {
        let mut r = runs();
        r.truncate(1);
        assert!(gated(&r, None).gate_failures().is_empty());
        if let Some(rep) = r[0].report.as_mut() {
            rep.cases[0].outcome = Outcome::Ignored;
            rep.cases[0].message =
                "dump refused: crest: error: pid 9: fd 3 is a pipe: not supported yet".into();
        }
        let g = gated(&r, None).gate_failures();
        assert_eq!(g.len(), 1, "{g:?}");
        assert!(
            g[0].starts_with("host: must-priority case PIPE-CONTENTS::small did not pass"),
            "{g:?}"
        );
        r[0].harness_exit = Some(1);
        assert_eq!(gated(&r, None).gate_failures().len(), 2);
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
        // A should case that passed in the baseline and is ignored now.
        let base = report(
            "6.1",
            "6.1.0-47-amd64",
            vec![
                case("PIPE-CONTENTS::full", "must", Outcome::Passed, ""),
                case("SOCK-TCP::est", "should", Outcome::Passed, ""),
            ],
        );
        let b = Baseline::parse(&serde_json::to_string(&base).unwrap()).unwrap();
        let mut r = runs();
        r.truncate(1);
        let m = gated(&r, Some(&b));
        assert_eq!(
            m.gate_failures(),
            ["host: regression: SOCK-TCP::est passed in the baseline, now ignored: not supported yet"]
        );

        // A previous matrix (per kernel): host had the same outcomes.
        let prev = build(&runs()[..1]);
        let b = Baseline::parse(&serde_json::to_string(&prev).unwrap()).unwrap();
        assert!(gated(&r, Some(&b)).gate_failures().is_empty());

        // A directory of reports, one per label: 6.1 passed SOCK-TCP there.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("host.json"),
            serde_json::to_string(&base).unwrap(),
        )
        .unwrap();
        let b = Baseline::load(d.path()).unwrap();
        assert_eq!(gated(&r, Some(&b)).gate_failures().len(), 1);
        assert!(Baseline::parse("{\"x\":1}").is_err());
    }
}
