//! The case table: `conformance/cases.json`, embedded at build time. Each case
//! declares its trial name (`REQUIREMENT-ID::case`), its workload, its dump
//! scope, its mode and what it needs; unknown keys are rejected so a typo can't
//! silently turn a check off.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

use crate::requirements::Requirement;

/// The case table as it was when this binary was built.
pub const CASES_JSON: &str = include_str!("../cases.json");

/// Which processes a dump takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// The workload process alone.
    #[default]
    Pid,
    /// The workload and all its descendants.
    Tree,
    /// Every process of the workload's session.
    Session,
    /// Every process of the workload's process group (`crest dump --pgid`).
    Pgid,
}

/// What the harness does with the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// dump → reap → restore → compare the outside view → go → result `ok`
    /// (repeated `--cycles` times).
    #[default]
    Cycle,
    /// The workload is traced by another process: the dump must be refused and
    /// leave it running and unchanged.
    Traced,
    /// The dump must be refused (any non-zero exit with a `crest: error:` line
    /// containing `refusal_mentions`) and leave the workload unchanged.
    Refused,
    /// `crest dump` of a pid that does not exist must fail with a clear error.
    NoSuchPid,
    /// Restoring while the original still runs must fail clearly (its pid is taken)
    /// and leave the original alone.
    PidInUse,
    /// `dump --leave-running` keeps the process running unchanged; its image restores.
    LeaveRunning,
    /// `dump --stop` leaves the process stopped; SIGCONT resumes it.
    StopAfterDump,
    /// `restore --detach` returns once the process runs; it finishes on its own.
    Detached,
    /// `crest check` and `crest check --json` succeed; the JSON parses.
    CheckCommand,
    /// `crest show IMG` and `crest show IMG --json` describe a fresh image.
    ShowImage,
    /// A restore from an image with a flipped byte fails with a clear error.
    CorruptImage,
    /// A restore after a file the process had open changed fails with a clear error.
    FileChanged,
    /// `dump --save-files`, then the file the workload has open is
    /// overwritten; `restore --restore-files=clobber` writes it back and the
    /// workload finds its contents as they were.
    FileSaved,
    /// `dump --include-file ctl/extra` (a file no process has open), then the
    /// file is removed; the restore puts it back as it was.
    FileExtra,
    /// After the dump `ctl/data` is renamed `ctl/data.moved`; `restore
    /// --relocate CTL/data=CTL/data.moved` opens it there (the view expects
    /// the new path).
    Relocate,
    /// `dump --stop` keeps the original holding its PID; `restore --pidns`
    /// brings the copy back in a new PID namespace with that PID inside.
    Pidns,
    /// `leave-running`, and the workload's `outcome` file must say `continued`
    /// after the original finishes and `restarted` after the restored one does
    /// (the callback interface's answer).
    ContinueRestart,
    /// The workload checkpoints itself into `ctl/self-img` before `ready`
    /// (outcome `continued`); after it finishes, that image is restored and
    /// must finish too (outcome `restarted`).
    SelfCheckpoint,
    /// An MPI job (`workloads/mpi/ring.c`, args: flavour, iterations, pause in
    /// ms) built with the flavour's mpicc and started with its launcher; the
    /// launcher's tree is dumped mid-run, restored (`cycles` times) and must
    /// finish with the checksum of an uninterrupted run.
    MpiJob,
    /// The workload holds an established TCP connection to a `wl-sock
    /// tcp-peer` the harness started outside the dump, which streams numbered
    /// bytes and checks their echo throughout. A dump without
    /// `--tcp-established` must be refused naming the connection (the
    /// workload left running); then dump (with `dump_args`), a hold of 1.5 s
    /// while the peer keeps sending and retransmitting, restore: the peer must
    /// see no reset and get every byte's echo, and the dump's nftables table
    /// (named in the image) must be in the ruleset while it is dumped and gone
    /// after the restore (`crest unlock --list`).
    TcpExternal,
}

impl Mode {
    /// Whether the mode starts a workload at all.
    pub fn needs_workload(self) -> bool {
        !matches!(self, Mode::NoSuchPid | Mode::CheckCommand | Mode::MpiJob)
    }
}

/// How `file-changed` changes the file after the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// A line appended: its size and mtime change, so its identity does.
    #[default]
    Append,
    /// One byte changed in place, its mtime set back: same inode, size and
    /// mtime, so only its contents (a hash) tell.
    ContentsOnly,
}

/// Something outside the engine a case needs; missing → the case is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Need {
    /// An MPI C compiler wrapper on PATH (or `--mpi`).
    Mpicc,
    /// A C compiler on PATH.
    Cc,
}

/// One case, as written in cases.json.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseSpec {
    /// `REQUIREMENT-ID::case`.
    pub id: String,
    /// One line: what the case proves.
    pub about: String,
    /// The workload binary (in the workload dir), when the mode needs one.
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub mode: Mode,
    /// Overrides `--case-timeout`.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub needs: Vec<Need>,
    /// The case is declared but cannot run yet (its workload is not written);
    /// it is reported as ignored with this reason.
    #[serde(default)]
    pub pending: Option<String>,
    /// The exit status `crest restore` must pass through (0, a code, or 128+signal).
    #[serde(default)]
    pub expect_exit: i32,
    /// The image of this case must not be larger (sparse memory costs nothing).
    #[serde(default)]
    pub max_image_kib: Option<u64>,
    /// The workload's stdout is a pipe the harness reads (a pipe to a process
    /// outside the dump); after restore its output must reach the restorer's stdout.
    #[serde(default)]
    pub stdout_pipe: bool,
    /// For `refused`: a word the refusal must contain (case-insensitive).
    #[serde(default)]
    pub refusal_mentions: Option<String>,
    /// The workload keeps changing while it is dumped (forking, spawning
    /// threads): the view compared is of the tree the dump froze (`dump
    /// --stop`) against the restored one (`restore --stop`).
    #[serde(default)]
    pub volatile_view: bool,
    /// Extra arguments for every `crest dump` of the case.
    #[serde(default)]
    pub dump_args: Vec<String>,
    /// Dump/restore cycles of this case (default: `--cycles`).
    #[serde(default)]
    pub cycles: Option<u32>,
    /// For `file-changed`: how the file is changed.
    #[serde(default)]
    pub change: Change,
    /// The workload writes the address of a counter its writer thread
    /// advances to `ctl/progress-addr`; the harness reads it from outside
    /// during the dump and requires that the target ran for at least as long
    /// as it was frozen at a stretch (a `--pre-copy` round happened while it
    /// ran).
    #[serde(default)]
    pub observe_pre_copy: bool,
}

impl CaseSpec {
    /// The requirement ID part of the name.
    pub fn requirement(&self) -> &str {
        self.id.split_once("::").map(|(r, _)| r).unwrap_or(&self.id)
    }
}

/// Parses and checks a case table: names well formed and unique, a workload
/// where the mode needs one.
pub fn parse(text: &str) -> Result<Vec<CaseSpec>, String> {
    let cases: Vec<CaseSpec> =
        serde_json::from_str(text).map_err(|e| format!("cases.json: {e}"))?;
    let mut seen = BTreeSet::new();
    for c in &cases {
        let Some((req, name)) = c.id.split_once("::") else {
            return Err(format!(
                "case {:?}: the name must be `REQUIREMENT-ID::case`",
                c.id
            ));
        };
        if req.is_empty() || name.is_empty() || name.contains("::") {
            return Err(format!(
                "case {:?}: the name must be `REQUIREMENT-ID::case`",
                c.id
            ));
        }
        if !seen.insert(c.id.clone()) {
            return Err(format!("case {:?} is declared twice", c.id));
        }
        if c.mode.needs_workload() && c.workload.is_none() && c.pending.is_none() {
            return Err(format!(
                "case {:?}: mode {:?} needs a workload",
                c.id, c.mode
            ));
        }
    }
    Ok(cases)
}

/// The embedded case table.
pub fn embedded() -> Vec<CaseSpec> {
    parse(CASES_JSON).unwrap_or_else(|e| panic!("{e}"))
}

/// The traceability check run before any case: every case must name a
/// requirement REQUIREMENTS.md defines. Returns the refusal message otherwise.
pub fn check_known(cases: &[CaseSpec], reqs: &BTreeMap<String, Requirement>) -> Result<(), String> {
    let unknown: Vec<&str> = cases
        .iter()
        .filter(|c| !reqs.contains_key(c.requirement()))
        .map(|c| c.id.as_str())
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "refusing to run: these cases name requirements REQUIREMENTS.md lacks: {}",
            unknown.join(", ")
        ))
    }
}

/// The must/should requirements no case covers, in ID order.
pub fn untested<'a>(
    cases: &[CaseSpec],
    reqs: &'a BTreeMap<String, Requirement>,
) -> Vec<&'a Requirement> {
    let covered: BTreeSet<&str> = cases.iter().map(|c| c.requirement()).collect();
    reqs.values()
        .filter(|r| {
            matches!(
                r.priority,
                crate::requirements::Priority::Must | crate::requirements::Priority::Should
            )
        })
        .filter(|r| !covered.contains(r.id.as_str()))
        .collect()
}

/// The must/should requirements whose every case is still `pending`.
pub fn only_pending<'a>(
    cases: &[CaseSpec],
    reqs: &'a BTreeMap<String, Requirement>,
) -> Vec<&'a Requirement> {
    reqs.values()
        .filter(|r| {
            matches!(
                r.priority,
                crate::requirements::Priority::Must | crate::requirements::Priority::Should
            )
        })
        .filter(|r| {
            let mine: Vec<&CaseSpec> = cases.iter().filter(|c| c.requirement() == r.id).collect();
            !mine.is_empty() && mine.iter().all(|c| c.pending.is_some())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requirements;

    #[test]
    fn unknown_keys_are_rejected() {
        let e = parse(r#"[{"id": "A-B::c", "about": "x", "workload": "w", "timeout": 3}]"#)
            .unwrap_err();
        assert!(e.contains("unknown field `timeout`"), "{e}");
    }

    #[test]
    fn names_modes_and_duplicates_are_checked() {
        assert!(parse(r#"[{"id": "A-B", "about": "x", "workload": "w"}]"#)
            .unwrap_err()
            .contains("REQUIREMENT-ID::case"));
        assert!(parse(r#"[{"id": "A-B::c", "about": "x"}]"#)
            .unwrap_err()
            .contains("needs a workload"));
        let dup = r#"[{"id": "A-B::c", "about": "x", "workload": "w"}, {"id": "A-B::c", "about": "y", "workload": "w"}]"#;
        assert!(parse(dup).unwrap_err().contains("declared twice"));
        let ok =
            parse(r#"[{"id": "A-B::c", "about": "x", "mode": "no-such-pid", "scope": "tree"}]"#)
                .unwrap();
        assert_eq!(
            (ok[0].mode, ok[0].scope, ok[0].requirement()),
            (Mode::NoSuchPid, Scope::Tree, "A-B")
        );
    }

    #[test]
    fn a_case_naming_an_unknown_requirement_is_refused() {
        let reqs = requirements::parse(
            "| ID | state | priority | tests | status |\n|---|---|---|---|---|\n| A-B | s | must | | |\n| A-C | s | should | | |\n| A-D | s | later | | |\n",
        )
        .unwrap();
        let cases = parse(r#"[{"id": "A-B::c", "about": "x", "workload": "w"}, {"id": "Z-Z::c", "about": "x", "workload": "w"}]"#).unwrap();
        let e = check_known(&cases, &reqs).unwrap_err();
        assert!(e.contains("Z-Z::c") && !e.contains("A-B::c"), "{e}");
        let ids: Vec<&str> = untested(&cases[..1], &reqs)
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(ids, vec!["A-C"]);
        let mut pending = cases[..1].to_vec();
        pending[0].pending = Some("not yet".into());
        let ids: Vec<&str> = only_pending(&pending, &reqs)
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(ids, vec!["A-B"]);
    }

    /// REQUIREMENTS.md's tests column and cases.json name the same trials, both ways.
    #[test]
    fn requirements_md_and_cases_json_agree() {
        let reqs = requirements::embedded();
        let cases = embedded();
        check_known(&cases, &reqs).unwrap();
        let from_cases: BTreeSet<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        let from_md: BTreeSet<&str> = reqs
            .values()
            .flat_map(|r| r.tests.iter().map(String::as_str))
            .collect();
        let only_cases: Vec<_> = from_cases.difference(&from_md).collect();
        let only_md: Vec<_> = from_md.difference(&from_cases).collect();
        assert!(
            only_cases.is_empty(),
            "cases missing from REQUIREMENTS.md's tests column: {only_cases:?}"
        );
        assert!(
            only_md.is_empty(),
            "REQUIREMENTS.md names tests cases.json lacks: {only_md:?}"
        );
    }
}
