//! The JSON report one suite run writes (`--report PATH`): one record per case.
//! `xtask` reads these, one per kernel, and merges them into a matrix.

use serde::{Deserialize, Serialize};

/// The value of [`Report::schema`]; bump it when a field changes meaning.
pub const REPORT_SCHEMA: &str = "crest-conformance-report/2";

/// One run of the suite on one kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub schema: String,
    /// Which kernel of a matrix this is (`host`, `6.1`, …: `CREST_KERNEL_LABEL`,
    /// set by `cargo xtask conformance`); `host` when run on its own.
    pub label: String,
    /// `uname -r` of the kernel the suite ran on.
    pub kernel: String,
    /// The crest engine version (`crest --version`).
    pub engine_version: String,
    /// The commit the suite and engine were built from (`CREST_COMMIT`, set
    /// by `cargo xtask conformance`; a `-dirty` suffix when the tree had
    /// changes); empty when nobody said.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub commit: String,
    /// The case selection when it was not every case (`--exact X`, a
    /// filter, `--skip`): a report with one is not a full run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<String>,
    /// The engine binary the suite ran (`--crest-bin`), when it was not the
    /// one built beside the suite: a stand-in, an installed crest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_bin: Option<String>,
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
    /// Measurements a case reports (the MPI cases' dump and restore times).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub notes: String,
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

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Ignored => "ignored",
        }
    }
}

impl Report {
    /// Reads a report written by `--report`.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Report> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let r: Report =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        anyhow::ensure!(
            r.schema == REPORT_SCHEMA,
            "{}: schema {:?}, this tool reads {REPORT_SCHEMA:?}",
            path.display(),
            r.schema
        );
        Ok(r)
    }
}

/// The reports of `dir` named `LABEL.json`, as (label, report), in name
/// order: the committed `conformance/reports`, or a baseline like it.
pub fn read_labelled(dir: &std::path::Path) -> anyhow::Result<Vec<(String, Report)>> {
    use anyhow::Context;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        let Some(label) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        out.push((label.to_string(), Report::read(&p)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A requirement as the markdown matrix needs it (decoupled from the parser).
#[derive(Debug, Clone)]
pub struct RequirementRow {
    pub id: String,
    pub priority: String,
    pub state: String,
}

/// The status of one requirement in one run: every case passed, some failed, …
pub fn requirement_status(cases: &[&CaseRecord]) -> &'static str {
    if cases.is_empty() {
        "no test"
    } else if cases.iter().any(|c| c.outcome == Outcome::Failed) {
        "FAIL"
    } else if cases.iter().all(|c| c.outcome == Outcome::Passed) {
        "pass"
    } else if cases.iter().any(|c| c.outcome == Outcome::Passed) {
        "partial"
    } else {
        "ignored"
    }
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The requirement × outcome table, one row per requirement (in `reqs` order),
/// with each case's outcome and, when not passed, the first line of its message.
pub fn markdown(report: &Report, reqs: &[RequirementRow]) -> String {
    let mut out = format!(
        "Conformance on kernel {}, engine `{}`, {}.\n\n| ID | priority | status | cases |\n|---|---|---|---|\n",
        report.kernel, report.engine_version, report.timestamp
    );
    for r in reqs {
        let cases: Vec<&CaseRecord> = report
            .cases
            .iter()
            .filter(|c| c.requirement == r.id)
            .collect();
        let detail: Vec<String> = cases
            .iter()
            .map(|c| {
                let name = c.id.split_once("::").map(|(_, n)| n).unwrap_or(&c.id);
                let first = c.message.lines().next().unwrap_or("");
                if c.outcome == Outcome::Passed || first.is_empty() {
                    format!("`{name}` {}", c.outcome.name())
                } else {
                    format!("`{name}` {}: {}", c.outcome.name(), md_cell(first))
                }
            })
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.id,
            r.priority,
            requirement_status(&cases),
            if detail.is_empty() {
                "—".to_string()
            } else {
                detail.join("; ")
            }
        ));
    }
    let (p, f, i) = counts(report);
    out.push_str(&format!("\n{p} passed, {f} failed, {i} ignored.\n"));
    out
}

/// (passed, failed, ignored).
pub fn counts(report: &Report) -> (usize, usize, usize) {
    let n = |o| report.cases.iter().filter(|c| c.outcome == o).count();
    (n(Outcome::Passed), n(Outcome::Failed), n(Outcome::Ignored))
}

fn xml_escape(s: &str) -> String {
    s.chars()
        .filter(|&c| c == '\n' || c == '\t' || c >= ' ')
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&apos;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// JUnit XML: one testsuite per run, one testcase per case, classname = requirement.
pub fn junit(report: &Report) -> String {
    let (p, f, i) = counts(report);
    let total: u64 = report.cases.iter().map(|c| c.duration_ms).sum();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<testsuites>\n<testsuite name=\"crest-conformance ({})\" tests=\"{}\" failures=\"{f}\" skipped=\"{i}\" errors=\"0\" time=\"{:.3}\" timestamp=\"{}\">\n",
        xml_escape(&report.kernel),
        p + f + i,
        total as f64 / 1000.0,
        xml_escape(&report.timestamp)
    ));
    for c in &report.cases {
        out.push_str(&format!(
            "  <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            xml_escape(&c.requirement),
            xml_escape(&c.id),
            c.duration_ms as f64 / 1000.0
        ));
        match c.outcome {
            Outcome::Passed => out.push_str("/>\n"),
            Outcome::Failed => out.push_str(&format!(
                ">\n    <failure message=\"{}\">{}</failure>\n  </testcase>\n",
                xml_escape(c.message.lines().next().unwrap_or("")),
                xml_escape(&c.message)
            )),
            Outcome::Ignored => out.push_str(&format!(
                ">\n    <skipped message=\"{}\"/>\n  </testcase>\n",
                xml_escape(&c.message)
            )),
        }
    }
    out.push_str("</testsuite>\n</testsuites>\n");
    out
}

/// One case that passed in the base run and does not pass in the candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regression {
    pub id: String,
    /// failed, ignored, or missing (not run at all).
    pub now: String,
    pub message: String,
}

/// Compares two runs: every case that passed in `base` and did not pass in
/// `cand` is a regression — a failure, a new refusal (ignored) or a case that
/// no longer runs all lose something the base kernel had.
pub fn compare(base: &Report, cand: &Report) -> Vec<Regression> {
    let mut out = Vec::new();
    for b in base.cases.iter().filter(|c| c.outcome == Outcome::Passed) {
        match cand.cases.iter().find(|c| c.id == b.id) {
            Some(c) if c.outcome == Outcome::Passed => {}
            Some(c) => out.push(Regression {
                id: b.id.clone(),
                now: c.outcome.name().to_string(),
                message: c.message.clone(),
            }),
            None => out.push(Regression {
                id: b.id.clone(),
                now: "missing".to_string(),
                message: String::new(),
            }),
        }
    }
    out
}

/// Cases that did not pass in `base` and pass in `cand`.
pub fn improvements(base: &Report, cand: &Report) -> Vec<String> {
    cand.cases
        .iter()
        .filter(|c| c.outcome == Outcome::Passed)
        .filter(|c| {
            !base
                .cases
                .iter()
                .any(|b| b.id == c.id && b.outcome == Outcome::Passed)
        })
        .map(|c| c.id.clone())
        .collect()
}

/// `secs` since the Unix epoch as RFC 3339 UTC (`2026-11-25T17:50:06Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for any date after 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, outcome: Outcome, message: &str) -> CaseRecord {
        CaseRecord {
            id: id.to_string(),
            requirement: id.split("::").next().unwrap().to_string(),
            priority: "must".to_string(),
            outcome,
            duration_ms: 1500,
            message: message.to_string(),
            notes: String::new(),
        }
    }

    fn report(cases: Vec<CaseRecord>) -> Report {
        Report {
            schema: REPORT_SCHEMA.to_string(),
            label: "host".to_string(),
            kernel: "6.18.0-test".to_string(),
            engine_version: "crest 0.1.0".to_string(),
            commit: String::new(),
            selection: None,
            engine_bin: None,
            timestamp: "2026-11-25T18:00:00Z".to_string(),
            cases,
        }
    }

    fn sample() -> Report {
        report(vec![
            rec("MEM-ANON::heap", Outcome::Passed, ""),
            rec(
                "PIPE-CONTENTS::3k-unread",
                Outcome::Ignored,
                "dump refused: crest: error: pid 7: fd 3 is a pipe: not supported yet",
            ),
            rec(
                "PIPE-CONTENTS::fifo",
                Outcome::Failed,
                "the workload found differences | x\nmore",
            ),
            rec("PROC-PID::restored", Outcome::Passed, ""),
            rec("PROC-PID::in-use", Outcome::Ignored, "needs root"),
        ])
    }

    fn rows() -> Vec<RequirementRow> {
        ["MEM-ANON", "PIPE-CONTENTS", "PROC-PID", "FILE-LOCK"]
            .iter()
            .map(|id| RequirementRow {
                id: id.to_string(),
                priority: "must".to_string(),
                state: String::new(),
            })
            .collect()
    }

    #[test]
    fn markdown_matrix() {
        insta::assert_snapshot!(markdown(&sample(), &rows()));
    }

    #[test]
    fn junit_xml() {
        insta::assert_snapshot!(junit(&sample()));
    }

    #[test]
    fn report_round_trips_and_rejects_unknown_fields() {
        let r = sample();
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
        let bad = text.replacen("\"kernel\"", "\"extra\":1,\"kernel\"", 1);
        assert!(serde_json::from_str::<Report>(&bad).is_err());
    }

    #[test]
    fn compare_finds_regressions_only() {
        let base = sample();
        let mut cand = sample();
        cand.cases[0].outcome = Outcome::Failed; // MEM-ANON::heap regressed
        cand.cases[1].outcome = Outcome::Passed; // PIPE-CONTENTS improved
        cand.cases.remove(3); // PROC-PID::restored no longer runs
        let regs = compare(&base, &cand);
        let ids: Vec<(&str, &str)> = regs
            .iter()
            .map(|r| (r.id.as_str(), r.now.as_str()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("MEM-ANON::heap", "failed"),
                ("PROC-PID::restored", "missing")
            ]
        );
        assert_eq!(improvements(&base, &cand), vec!["PIPE-CONTENTS::3k-unread"]);
        assert!(compare(&base, &base).is_empty());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_629_006), "2026-11-25T17:50:06Z");
    }

    #[test]
    fn status_of_a_requirement() {
        let p = rec("A-B::x", Outcome::Passed, "");
        let i = rec("A-B::y", Outcome::Ignored, "");
        let f = rec("A-B::z", Outcome::Failed, "");
        assert_eq!(requirement_status(&[]), "no test");
        assert_eq!(requirement_status(&[&p]), "pass");
        assert_eq!(requirement_status(&[&p, &i]), "partial");
        assert_eq!(requirement_status(&[&i]), "ignored");
        assert_eq!(requirement_status(&[&p, &i, &f]), "FAIL");
    }
}
