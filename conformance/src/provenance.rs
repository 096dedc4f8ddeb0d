//! Where REQUIREMENTS.md's statuses come from: the reports of full suite
//! runs, one per kernel, committed as `conformance/reports/LABEL.json`
//! (`cargo xtask conformance --kernel all --record` writes them). The status
//! column and the generated kernel-matrix section are computed from those
//! reports by [`render`] (`cargo xtask requirements`), never written by hand,
//! and a unit test recomputes both and fails on any difference.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::report::{self, CaseRecord, Outcome, Report, REPORT_SCHEMA};
use crate::requirements;
use crate::runner::RUN_WITH;

/// The committed reports' directory, under `conformance/`.
pub const REPORTS_DIR: &str = "reports";

/// The order kernel columns appear in; other labels follow, sorted.
pub const KERNEL_ORDER: [&str; 5] = ["host", "5.10", "6.1", "6.12", "7.2"];

/// The first line of the generated section of REQUIREMENTS.md.
pub const BEGIN: &str =
    "<!-- generated from conformance/reports by `cargo xtask requirements`: do not edit by hand -->";
/// Its last line.
pub const END: &str = "<!-- end of the generated section -->";

/// A report in its committed form: each case on a line of its own (so a
/// diff shows which cases moved), messages cut to their first line.
pub fn compact(r: &Report) -> String {
    let mut head = r.clone();
    head.cases.clear();
    let head = serde_json::to_string(&head).unwrap_or_default();
    let head = head.strip_suffix("[]}").unwrap_or(&head);
    let cases: Vec<String> = r
        .cases
        .iter()
        .map(|c| {
            let c = CaseRecord {
                message: c.message.lines().next().unwrap_or("").to_string(),
                ..c.clone()
            };
            serde_json::to_string(&c).unwrap_or_default()
        })
        .collect();
    format!("{head}[\n{}\n]}}\n", cases.join(",\n"))
}

fn kernel_rank(label: &str) -> (usize, String) {
    let i = KERNEL_ORDER
        .iter()
        .position(|k| *k == label)
        .unwrap_or(KERNEL_ORDER.len());
    (i, label.to_string())
}

/// Reads the committed reports of `dir`, in column order, checking each is
/// what a status may stand on: a full run (no case selection) of the
/// workspace's own engine at a named, clean commit, filed under its label.
pub fn read_reports(dir: &Path) -> Result<Vec<Report>, String> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (label, r) in report::read_labelled(dir).map_err(|e| format!("{e:#}"))? {
        let why = if r.label != label {
            Some(format!("its label is {:?}", r.label))
        } else if let Some(sel) = &r.selection {
            Some(format!("it is not a full run (selection: {sel})"))
        } else if let Some(bin) = &r.engine_bin {
            Some(format!("it tested another engine ({bin})"))
        } else if r.commit.is_empty() || r.commit.ends_with("-dirty") {
            Some(format!("it names no clean commit ({:?})", r.commit))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(format!(
                "{}: cannot stand behind a status: {why}",
                dir.join(format!("{label}.json")).display()
            ));
        }
        out.push(r);
    }
    out.sort_by_key(|r| kernel_rank(&r.label));
    Ok(out)
}

/// A requirement's status on one kernel (`not run` when the report has none
/// of its cases).
fn cell(r: &Report, req: &requirements::Requirement) -> String {
    if req.tests.is_empty() {
        return "no test".into();
    }
    let cases: Vec<&CaseRecord> = r.cases.iter().filter(|c| c.requirement == req.id).collect();
    if cases.is_empty() {
        return "not run".into();
    }
    let mut s = report::requirement_status(&cases).to_string();
    if cases.len() < req.tests.len() {
        s.push_str(&format!(
            " ({} of {} cases run)",
            cases.len(),
            req.tests.len()
        ));
    }
    s
}

/// What the cases that ran were run against ("run with /usr/bin/mpirun …").
fn run_with(reports: &[Report], id: &str) -> Vec<String> {
    let mut how: Vec<String> = reports
        .iter()
        .flat_map(|r| &r.cases)
        .filter(|c| c.requirement == id && c.outcome != Outcome::Ignored)
        .flat_map(|c| c.notes.split("; "))
        .filter(|n| n.starts_with(RUN_WITH))
        .map(String::from)
        .collect();
    how.sort();
    how.dedup();
    how
}

/// The status column: the same word everywhere, or each kernel's.
fn status(reports: &[Report], req: &requirements::Requirement) -> String {
    if req.tests.is_empty() {
        return "no test".into();
    }
    if reports.is_empty() {
        return "not run".into();
    }
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for r in reports {
        let c = cell(r, req);
        match groups.iter_mut().find(|(s, _)| *s == c) {
            Some((_, ks)) => ks.push(&r.label),
            None => groups.push((c, vec![&r.label])),
        }
    }
    let mut s = if groups.len() == 1 {
        groups.remove(0).0
    } else {
        groups
            .iter()
            .map(|(st, ks)| format!("{st} on {}", ks.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let how = run_with(reports, &req.id);
    if !how.is_empty() {
        s.push_str(&format!(" ({})", how.join("; ")));
    }
    s.replace('|', "\\|")
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The generated section: which runs, the requirement × kernel table, and
/// every case that did not pass with its reason.
fn section(reports: &[Report], reqs: &BTreeMap<String, requirements::Requirement>) -> String {
    let mut s = format!("{BEGIN}\n\n");
    if reports.is_empty() {
        s.push_str("No run is recorded yet: every status above is `not run`.\n");
    } else {
        s.push_str(
            "Each column is one full run of the suite (every case of `conformance/cases.json` \
             when it ran), committed in `conformance/reports/`; the status column above and this \
             section are generated from them.\n\n",
        );
        s.push_str("| kernel | release | commit | run at (UTC) | passed | failed | ignored | engine |\n|---|---|---|---|---|---|---|---|\n");
        for r in reports {
            let (p, f, i) = report::counts(r);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {p} | {f} | {i} | {} |",
                r.label,
                r.kernel,
                r.commit,
                r.timestamp,
                md_cell(&r.engine_version)
            );
        }
        let mut rows: Vec<&requirements::Requirement> = reqs.values().collect();
        rows.sort_by_key(|r| r.line);
        let labels: Vec<&str> = reports.iter().map(|r| r.label.as_str()).collect();
        let _ = writeln!(
            s,
            "\n| requirement | priority | {} |\n|---|---|{}",
            labels.join(" | "),
            "---|".repeat(labels.len())
        );
        for req in rows.iter().filter(|r| !r.tests.is_empty()) {
            let cells: Vec<String> = reports.iter().map(|r| cell(r, req)).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                req.id,
                req.priority.name(),
                cells.join(" | ")
            );
        }
        let mut not_passed = String::new();
        for r in reports {
            for c in r.cases.iter().filter(|c| c.outcome != Outcome::Passed) {
                let _ = writeln!(
                    not_passed,
                    "| {} | {} | {} | {} |",
                    c.id,
                    r.label,
                    c.outcome.name(),
                    md_cell(c.message.lines().next().unwrap_or(""))
                );
            }
        }
        if !not_passed.is_empty() {
            s.push_str("\nCases that did not pass, and why:\n\n| case | kernel | outcome | reason |\n|---|---|---|---|\n");
            s.push_str(&not_passed);
        }
    }
    s.push('\n');
    s.push_str(END);
    s.push('\n');
    s
}

/// REQUIREMENTS.md with its status column, its `Status below:` line and its
/// generated section rewritten from `reports`; everything else unchanged.
pub fn render(md: &str, reports: &[Report]) -> Result<String, String> {
    let reqs = requirements::parse(md)?;
    for r in reports {
        if r.schema != REPORT_SCHEMA {
            return Err(format!("report {}: schema {:?}", r.label, r.schema));
        }
    }
    let note = "generated from the committed runs listed under \"Kernel matrix\" below, by `cargo xtask requirements`; never edited by hand.";
    let text = requirements::with_status(md, note, |id| {
        reqs.get(id)
            .map(|req| status(reports, req))
            .unwrap_or_default()
    })?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        return Err(format!(
            "REQUIREMENTS.md has no generated section: put the lines {BEGIN:?} and {END:?} where it goes"
        ));
    };
    if b < a {
        return Err("REQUIREMENTS.md: the generated section's end comes before its start".into());
    }
    let end = b + END.len() + usize::from(text[b + END.len()..].starts_with('\n'));
    Ok(format!(
        "{}{}{}",
        &text[..a],
        section(reports, &reqs),
        &text[end..]
    ))
}

/// The first line where two texts differ, for a test's message.
pub fn first_difference(a: &str, b: &str) -> Option<(usize, String, String)> {
    let (mut la, mut lb) = (a.lines(), b.lines());
    for n in 1.. {
        match (la.next(), lb.next()) {
            (None, None) => return None,
            (x, y) if x != y => {
                return Some((
                    n,
                    x.unwrap_or("(end)").to_string(),
                    y.unwrap_or("(end)").to_string(),
                ))
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD: &str = "Status below: hand-written.\n\n\
| ID | state | priority | tests | status |\n|---|---|---|---|---|\n\
| PIPE-CONTENTS | pipes | must | `PIPE-CONTENTS::a`, `PIPE-CONTENTS::b` | pass |\n\
| MPI-VENDOR | vendor | must | `MPI-VENDOR::v` | x |\n\
| FILE-LOCK | locks | later | — | no test |\n\n\
## Kernel matrix\n\n<!-- generated from conformance/reports by `cargo xtask requirements`: do not edit by hand -->\nold\n<!-- end of the generated section -->\n\nAfter.\n";

    fn rec(id: &str, o: Outcome, msg: &str, notes: &str) -> CaseRecord {
        CaseRecord {
            id: id.into(),
            requirement: id.split("::").next().unwrap_or(id).into(),
            priority: "must".into(),
            outcome: o,
            duration_ms: 7,
            message: msg.into(),
            notes: notes.into(),
        }
    }

    fn report(label: &str, cases: Vec<CaseRecord>) -> Report {
        Report {
            schema: REPORT_SCHEMA.into(),
            label: label.into(),
            kernel: format!("{label}.0-test"),
            engine_version: "crest 0.1.0".into(),
            commit: "0123456789ab".into(),
            selection: None,
            engine_bin: None,
            timestamp: "2026-12-07T20:00:00Z".into(),
            cases,
        }
    }

    #[test]
    fn statuses_and_the_section_come_from_the_reports() {
        let host = report(
            "host",
            vec![
                rec("PIPE-CONTENTS::a", Outcome::Passed, "", ""),
                rec("PIPE-CONTENTS::b", Outcome::Passed, "", ""),
                rec(
                    "MPI-VENDOR::v",
                    Outcome::Passed,
                    "",
                    "run with /usr/bin/mpiexec.mpich -genv UCX_TLS tcp,self; cycle 1: dump 0.4 s",
                ),
            ],
        );
        let old = report(
            "5.10",
            vec![
                rec("PIPE-CONTENTS::a", Outcome::Passed, "", ""),
                rec(
                    "PIPE-CONTENTS::b",
                    Outcome::Failed,
                    "differs | here\nmore",
                    "",
                ),
                rec(
                    "MPI-VENDOR::v",
                    Outcome::Ignored,
                    "needs --mpi",
                    "run with /x",
                ),
            ],
        );
        let out = render(MD, &[host, old]).unwrap();
        insta::assert_snapshot!(out);
        // Rendering is stable: what it wrote renders to itself.
        let again = render(&out, &[]).unwrap();
        assert!(again.contains(
            "| PIPE-CONTENTS | pipes | must | `PIPE-CONTENTS::a`, `PIPE-CONTENTS::b` | not run |"
        ));
        assert!(again.ends_with("<!-- end of the generated section -->\n\nAfter.\n"));
    }

    #[test]
    fn a_missing_section_is_an_error() {
        let md = MD.replace(BEGIN, "");
        assert!(render(&md, &[])
            .unwrap_err()
            .contains("no generated section"));
    }

    #[test]
    fn compact_reports_read_back_with_first_lines_only() {
        let r = report(
            "6.1",
            vec![
                rec("PIPE-CONTENTS::a", Outcome::Passed, "", ""),
                rec("PIPE-CONTENTS::b", Outcome::Failed, "one\ntwo", "n"),
            ],
        );
        let text = compact(&r);
        assert_eq!(text.lines().count(), 4, "{text}");
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.cases[1].message, "one");
        assert_eq!(back.cases[0], r.cases[0]);
    }

    #[test]
    fn only_full_clean_runs_stand_behind_a_status() {
        let d = tempfile::tempdir().unwrap();
        let write =
            |name: &str, r: &Report| std::fs::write(d.path().join(name), compact(r)).unwrap();
        let good = report(
            "6.1",
            vec![rec("PIPE-CONTENTS::a", Outcome::Passed, "", "")],
        );
        write("6.1.json", &good);
        write("host.json", &report("host", vec![]));
        let got = read_reports(d.path()).unwrap();
        assert_eq!(
            got.iter().map(|r| r.label.as_str()).collect::<Vec<_>>(),
            ["host", "6.1"]
        );
        for (bad, why) in [
            (
                Report {
                    selection: Some("filter PIPE".into()),
                    ..good.clone()
                },
                "not a full run",
            ),
            (
                Report {
                    commit: "0123-dirty".into(),
                    ..good.clone()
                },
                "no clean commit",
            ),
            (
                Report {
                    engine_bin: Some("/tmp/stand-in".into()),
                    ..good.clone()
                },
                "another engine",
            ),
            (
                Report {
                    label: "6.12".into(),
                    ..good.clone()
                },
                "its label",
            ),
        ] {
            write("6.1.json", &bad);
            let e = read_reports(d.path()).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    /// REQUIREMENTS.md says exactly what the committed reports say.
    #[test]
    fn requirements_md_is_what_the_committed_reports_say() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let md_path = root.join("../REQUIREMENTS.md");
        let md = std::fs::read_to_string(&md_path).unwrap();
        let reports = read_reports(&root.join(REPORTS_DIR)).unwrap();
        let want = render(&md, &reports).unwrap();
        if let Some((n, have, should)) = first_difference(&md, &want) {
            panic!(
                "REQUIREMENTS.md is not what conformance/reports say (run `cargo xtask requirements`): line {n} is\n  {have}\nbut the reports give\n  {should}"
            );
        }
    }
}
