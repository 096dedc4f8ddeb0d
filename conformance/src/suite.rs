//! The suite's entry point, shared by the `crest-conformance` binary and the
//! `cargo test` target: parses the suite's own flags, hands the rest to
//! libtest-mimic, runs one trial per case and writes the reports.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::cases::{self, CaseSpec};
use crate::report::{self, CaseRecord, Outcome, Report, RequirementRow, REPORT_SCHEMA};
use crate::requirements::{self, Requirement};
use crate::runner::{self, CaseOutcome, Config};

/// The suite's own options; everything else goes to libtest-mimic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    pub crest_bin: Option<PathBuf>,
    pub workload_dir: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
    pub report: Option<PathBuf>,
    pub junit: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub cycles: u32,
    pub case_timeout: Duration,
    pub keep: bool,
    pub mpi: Option<PathBuf>,
    /// `--mpi-args`: launcher arguments for the `--mpi` launcher (split at whitespace).
    pub mpi_args: Vec<String>,
    /// The arguments left for libtest-mimic (program name first).
    pub rest: Vec<OsString>,
}

const USAGE: &str = "\
usage: crest-conformance [SUITE OPTIONS] [LIBTEST OPTIONS] [FILTER]
       crest-conformance compare BASE.json CAND.json
       crest-conformance update-requirements REQUIREMENTS.md REPORT.json

suite options (before or among libtest's):
  --crest-bin PATH       the crest binary (env CREST_BIN; default: next to this program)
  --workload-dir DIR     where wl-* and foundation are (env CREST_WORKLOAD_DIR; same default)
  --work-dir DIR         case dirs go here (env CREST_WORK_DIR; default: a temp dir)
  --report PATH          write the JSON report
  --junit PATH           write JUnit XML
  --markdown PATH        write the requirement x outcome table
  --cycles N             dump/restore cycles per case (default 1)
  --case-timeout SECS    per-case timeout (default 60)
  --keep                 keep the case dirs of passed cases too
  --mpi PATH             the mpirun to run the MPI section against
  --mpi-args ARGS        its arguments before `-n 4 PROGRAM` (one string, split at spaces)
";

/// Splits the suite's flags from libtest's. `args[0]` is the program name.
pub fn parse_options(args: Vec<OsString>) -> anyhow::Result<Options> {
    let mut o = Options {
        cycles: 1,
        case_timeout: Duration::from_secs(60),
        ..Options::default()
    };
    let mut it = args.into_iter();
    o.rest
        .push(it.next().unwrap_or_else(|| "crest-conformance".into()));
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().to_string();
        let (flag, inline) = match s.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(OsString::from(v))),
            _ => (s.clone(), None),
        };
        let known = [
            "--crest-bin",
            "--workload-dir",
            "--work-dir",
            "--report",
            "--junit",
            "--markdown",
            "--cycles",
            "--case-timeout",
            "--mpi",
            "--mpi-args",
        ];
        if flag == "--keep" {
            o.keep = true;
            continue;
        }
        if flag == "--suite-help" {
            bail!("{USAGE}");
        }
        if !known.contains(&flag.as_str()) {
            o.rest.push(a);
            continue;
        }
        let v = match inline.or_else(|| it.next()) {
            Some(v) => v,
            None => bail!("{flag} needs a value\n{USAGE}"),
        };
        let path = Some(PathBuf::from(&v));
        match flag.as_str() {
            "--crest-bin" => o.crest_bin = path,
            "--workload-dir" => o.workload_dir = path,
            "--work-dir" => o.work_dir = path,
            "--report" => o.report = path,
            "--junit" => o.junit = path,
            "--markdown" => o.markdown = path,
            "--mpi" => o.mpi = path,
            "--mpi-args" => {
                o.mpi_args = v
                    .to_string_lossy()
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            }
            "--cycles" => {
                o.cycles = v
                    .to_string_lossy()
                    .parse()
                    .context("--cycles needs a number")?;
                if o.cycles == 0 {
                    bail!("--cycles must be at least 1");
                }
            }
            "--case-timeout" => {
                o.case_timeout = Duration::from_secs(
                    v.to_string_lossy()
                        .parse()
                        .context("--case-timeout needs seconds")?,
                )
            }
            _ => unreachable!("flag list above"),
        }
    }
    Ok(o)
}

/// Where binaries are when nobody says: next to the running program, and for a
/// cargo test (`target/debug/deps/native-HASH`) one level up.
pub fn default_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().map(|n| n == "deps").unwrap_or(false) {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn engine_version(crest: &Path) -> String {
    std::process::Command::new(crest)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| format!("unknown ({} --version failed)", crest.display()))
}

/// The suite's main, for the binary and for `tests/native.rs`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    if args
        .get(1)
        .map(|a| a == "update-requirements")
        .unwrap_or(false)
    {
        return match update_requirements(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("crest-conformance update-requirements: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if args.get(1).map(|a| a == "compare").unwrap_or(false) {
        return match compare_main(&args[2..]) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("crest-conformance compare: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match run_suite(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("crest-conformance: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn compare_main(args: &[OsString]) -> anyhow::Result<ExitCode> {
    let [base, cand] = args else {
        bail!("usage: crest-conformance compare BASE.json CAND.json");
    };
    let base = Report::read(Path::new(base))?;
    let cand = Report::read(Path::new(cand))?;
    let regs = report::compare(&base, &cand);
    println!(
        "base: kernel {} ({}), candidate: kernel {} ({})",
        base.kernel, base.engine_version, cand.kernel, cand.engine_version
    );
    for id in report::improvements(&base, &cand) {
        println!("improved: {id}");
    }
    for r in &regs {
        let first = r.message.lines().next().unwrap_or("");
        println!(
            "REGRESSION: {} passed before, {} now{}",
            r.id,
            r.now,
            if first.is_empty() {
                String::new()
            } else {
                format!(": {first}")
            }
        );
    }
    println!("{} regression(s)", regs.len());
    Ok(if regs.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `update-requirements REQUIREMENTS.md REPORT.json`: fills the status column
/// from a run (requirements without a case: `no test`).
fn update_requirements(args: &[OsString]) -> anyhow::Result<()> {
    let [md, rep] = args else {
        bail!("usage: crest-conformance update-requirements REQUIREMENTS.md REPORT.json");
    };
    let report = Report::read(Path::new(rep))?;
    let text =
        std::fs::read_to_string(md).with_context(|| format!("reading {}", md.to_string_lossy()))?;
    let (p, f, i) = report::counts(&report);
    let note = format!(
        "run on kernel {} with `{}`, {} ({p} passed, {f} failed, {i} ignored).",
        report.kernel, report.engine_version, report.timestamp
    );
    let out = requirements::with_status(&text, &note, |id| {
        let cases: Vec<&CaseRecord> = report
            .cases
            .iter()
            .filter(|c| c.requirement == id)
            .collect();
        status_cell(&cases)
    })
    .map_err(|e| anyhow::anyhow!("{}: {e}", md.to_string_lossy()))?;
    std::fs::write(md, out).with_context(|| format!("writing {}", md.to_string_lossy()))?;
    Ok(())
}

/// A requirement's status, with what its cases that ran were run against
/// ("pass (run with /opt/vendor/bin/mpirun --mca btl tcp,self)").
fn status_cell(cases: &[&CaseRecord]) -> String {
    let status = report::requirement_status(cases);
    let mut how: Vec<&str> = cases
        .iter()
        .filter(|c| c.outcome != report::Outcome::Ignored)
        .flat_map(|c| c.notes.split("; "))
        .filter(|n| n.starts_with(runner::RUN_WITH))
        .collect();
    how.dedup();
    if how.is_empty() {
        status.to_string()
    } else {
        format!("{status} ({})", how.join("; ").replace('|', "\\|"))
    }
}

/// Names `reqs` on stderr after `what`, when there are any.
fn warn_requirements(what: &str, reqs: &[&Requirement]) {
    if !reqs.is_empty() {
        let ids: Vec<&str> = reqs.iter().map(|r| r.id.as_str()).collect();
        eprintln!("{what}: {}", ids.join(", "));
    }
}

fn run_suite(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let opts = parse_options(args)?;
    let reqs = requirements::parse(requirements::REQUIREMENTS_MD)
        .map_err(|e| anyhow::anyhow!("REQUIREMENTS.md: {e}"))?;
    let specs = cases::parse(cases::CASES_JSON).map_err(|e| anyhow::anyhow!("{e}"))?;
    cases::check_known(&specs, &reqs).map_err(|e| anyhow::anyhow!("{e}"))?;
    let libtest = Arguments::from_iter(opts.rest.clone());

    let bin_dir = default_bin_dir();
    let crest_bin = opts
        .crest_bin
        .clone()
        .or_else(|| env_path("CREST_BIN"))
        .unwrap_or_else(|| bin_dir.join("crest"));
    let workload_dir = opts
        .workload_dir
        .clone()
        .or_else(|| env_path("CREST_WORKLOAD_DIR"))
        .unwrap_or_else(|| bin_dir.clone());
    let (work_dir, temp) = match opts.work_dir.clone().or_else(|| env_path("CREST_WORK_DIR")) {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("crest-conformance.{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let cfg = Arc::new(Config {
        crest_bin: crest_bin.clone(),
        workload_dir,
        work_dir: work_dir.clone(),
        cycles: opts.cycles,
        case_timeout: opts.case_timeout,
        keep: opts.keep,
        mpi: opts.mpi.clone(),
        mpi_args: opts.mpi_args.clone(),
        is_root: nix::unistd::geteuid().is_root(),
        session_dump: runner::engine_has_session(&crest_bin),
    });

    if !libtest.list {
        warn_requirements(
            "must/should requirements without a test yet",
            &cases::untested(&specs, &reqs),
        );
        warn_requirements(
            "must/should requirements whose cases cannot run yet (reported as ignored)",
            &cases::only_pending(&specs, &reqs),
        );
    }

    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let records: Arc<Mutex<Vec<CaseRecord>>> = Arc::new(Mutex::new(Vec::new()));
    let trials = trials(&specs, &reqs, &cfg, &records);
    let conclusion = libtest_mimic::run(&libtest, trials);

    if !libtest.list {
        let mut cases = records.lock().map(|r| r.clone()).unwrap_or_default();
        let order: BTreeMap<&str, usize> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        cases.sort_by_key(|c| order.get(c.id.as_str()).copied().unwrap_or(usize::MAX));
        let report = Report {
            schema: REPORT_SCHEMA.to_string(),
            kernel: kernel_release(),
            engine_version: engine_version(&crest_bin),
            timestamp: report::rfc3339(started),
            cases,
        };
        write_reports(&opts, &report, &reqs)?;
    }
    if temp {
        // Only removes it when empty: failed cases keep their dirs.
        let _ = std::fs::remove_dir(&work_dir);
    }
    if conclusion.has_failed() && std::fs::read_dir(&work_dir).is_ok() {
        eprintln!("failed cases keep their dirs under {}", work_dir.display());
    }
    Ok(conclusion.exit_code())
}

/// One trial per case, named `ID::case`; each records its outcome for the reports.
pub fn trials(
    specs: &[CaseSpec],
    reqs: &BTreeMap<String, Requirement>,
    cfg: &Arc<Config>,
    records: &Arc<Mutex<Vec<CaseRecord>>>,
) -> Vec<Trial> {
    specs
        .iter()
        .enumerate()
        .map(|(seq, spec)| {
            let spec = spec.clone();
            let priority = reqs
                .get(spec.requirement())
                .map(|r| r.priority.name())
                .unwrap_or("?")
                .to_string();
            let cfg = Arc::clone(cfg);
            let records = Arc::clone(records);
            let (name, kind) = (spec.id.clone(), spec.requirement().to_string());
            Trial::ignorable_test(name, move || {
                let t0 = Instant::now();
                let mut notes = Vec::new();
                let outcome = runner::run_case_noted(&cfg, &spec, seq, &mut notes);
                let notes = notes.join("; ");
                if !notes.is_empty() {
                    eprintln!("{}: {notes}", spec.id);
                }
                let (o, message, ret) = match outcome {
                    CaseOutcome::Passed => {
                        (Outcome::Passed, String::new(), Ok(Completion::Completed))
                    }
                    CaseOutcome::Ignored(m) => {
                        (Outcome::Ignored, m.clone(), Ok(Completion::ignored_with(m)))
                    }
                    CaseOutcome::Failed(m) => (Outcome::Failed, m.clone(), Err(Failed::from(m))),
                };
                if let Ok(mut r) = records.lock() {
                    r.push(CaseRecord {
                        id: spec.id.clone(),
                        requirement: spec.requirement().to_string(),
                        priority,
                        outcome: o,
                        duration_ms: t0.elapsed().as_millis() as u64,
                        message,
                        notes,
                    });
                }
                ret
            })
            .with_kind(kind)
        })
        .collect()
}

fn write_reports(
    opts: &Options,
    report: &Report,
    reqs: &BTreeMap<String, Requirement>,
) -> anyhow::Result<()> {
    if let Some(p) = &opts.report {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &opts.junit {
        std::fs::write(p, report::junit(report))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &opts.markdown {
        std::fs::write(p, report::markdown(report, &rows(reqs)))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// REQUIREMENTS.md's rows in file order, for the markdown matrix.
pub fn rows(reqs: &BTreeMap<String, Requirement>) -> Vec<RequirementRow> {
    let mut v: Vec<&Requirement> = reqs.values().collect();
    v.sort_by_key(|r| r.line);
    v.iter()
        .map(|r| RequirementRow {
            id: r.id.clone(),
            priority: r.priority.name().to_string(),
            state: r.state.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::{Mode, Scope};
    use std::os::unix::fs::PermissionsExt;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_status_says_what_its_cases_ran_against() {
        let case = |outcome, notes: &str| CaseRecord {
            id: "MPI-VENDOR::vendor-mpirun".into(),
            requirement: "MPI-VENDOR".into(),
            priority: "must".into(),
            outcome,
            duration_ms: 1,
            message: String::new(),
            notes: notes.into(),
        };
        let ran = case(
            Outcome::Passed,
            "run with /usr/bin/mpiexec.mpich -genv UCX_TLS tcp,self; cycle 1: dump 0.49 s",
        );
        assert_eq!(
            status_cell(&[&ran]),
            "pass (run with /usr/bin/mpiexec.mpich -genv UCX_TLS tcp,self)"
        );
        let ignored = case(Outcome::Ignored, "run with /x");
        assert_eq!(status_cell(&[&ignored]), "ignored");
        assert_eq!(status_cell(&[&case(Outcome::Passed, "")]), "pass");
    }

    #[test]
    fn suite_flags_are_split_from_libtest_flags() {
        let o = parse_options(os(&[
            "prog",
            "--crest-bin",
            "/x/crest",
            "--exact",
            "--cycles=3",
            "PIPE-CONTENTS::fifo",
            "--report",
            "r.json",
            "--test-threads",
            "1",
            "--keep",
            "--case-timeout",
            "9",
            "--mpi",
            "/usr/bin/mpirun",
            "--mpi-args",
            "--mca btl tcp,self",
        ]))
        .unwrap();
        assert_eq!(o.crest_bin, Some(PathBuf::from("/x/crest")));
        assert_eq!(o.cycles, 3);
        assert_eq!(o.case_timeout, Duration::from_secs(9));
        assert_eq!(o.report, Some(PathBuf::from("r.json")));
        assert_eq!(o.mpi, Some(PathBuf::from("/usr/bin/mpirun")));
        assert_eq!(o.mpi_args, ["--mca", "btl", "tcp,self"]);
        assert!(o.keep);
        assert_eq!(
            o.rest,
            os(&[
                "prog",
                "--exact",
                "PIPE-CONTENTS::fifo",
                "--test-threads",
                "1"
            ])
        );
        assert!(parse_options(os(&["prog", "--cycles", "0"])).is_err());
        assert!(parse_options(os(&["prog", "--report"])).is_err());
    }

    #[test]
    fn default_bin_dir_skips_deps() {
        // This unit test itself runs from target/debug/deps/.
        let d = default_bin_dir();
        assert_ne!(d.file_name().unwrap(), "deps");
    }

    /// A fake crest and a fake workload exercise the bookkeeping without the engine.
    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new(crest_script: &str) -> Fake {
            let dir = tempfile::tempdir().unwrap();
            let write = |name: &str, body: &str| {
                let p = dir.path().join(name);
                std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            };
            write("crest", crest_script);
            // A workload speaking the protocol: ready, wait for go, verdict.
            write(
                "wl-fake",
                "ctl=$2; echo $$ > $ctl/ready.tmp; mv $ctl/ready.tmp $ctl/ready\n\
                 while [ ! -e $ctl/go ]; do sleep 0.01; done; echo ok > $ctl/result",
            );
            std::fs::create_dir(dir.path().join("work")).unwrap();
            Fake { dir }
        }

        fn cfg(&self, root: bool) -> Config {
            Config {
                crest_bin: self.dir.path().join("crest"),
                workload_dir: self.dir.path().to_path_buf(),
                work_dir: self.dir.path().join("work"),
                cycles: 1,
                case_timeout: Duration::from_secs(20),
                keep: false,
                mpi: None,
                mpi_args: Vec::new(),
                is_root: root,
                session_dump: false,
            }
        }
    }

    fn spec(mode: Mode) -> CaseSpec {
        CaseSpec {
            id: "PIPE-CONTENTS::fake".into(),
            about: "fake".into(),
            workload: Some("wl-fake".into()),
            args: vec![],
            scope: Scope::Pid,
            mode,
            timeout_secs: None,
            needs: vec![],
            pending: None,
            expect_exit: 0,
            max_image_kib: None,
            stdout_pipe: false,
            refusal_mentions: None,
            dump_args: vec![],
            cycles: None,
            volatile_view: false,
        }
    }

    #[test]
    fn exit_3_is_ignored_with_the_engines_reason() {
        let f =
            Fake::new("echo 'crest: error: pid 1: fd 5 is a pipe: not supported yet' >&2; exit 3");
        let out = runner::run_case(&f.cfg(true), &spec(Mode::Cycle), 0);
        assert_eq!(
            out,
            CaseOutcome::Ignored(
                "dump refused: crest: error: pid 1: fd 5 is a pipe: not supported yet".into()
            )
        );
        // The workload was killed and its dir removed (not a failure).
        assert_eq!(
            std::fs::read_dir(f.dir.path().join("work"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_restore_refusing_with_exit_3_is_ignored() {
        // The fake dump kills its target (as the real one does) and succeeds;
        // the fake restore refuses the image as unsupported.
        let f = Fake::new(
            "case $2 in\n\
             dump) kill -9 $4; mkdir -p $6; exit 0;;\n\
             restore) echo 'crest: error: image needs memfd: not supported yet' >&2; exit 3;;\n\
             esac; exit 1",
        );
        assert_eq!(
            runner::run_case(&f.cfg(true), &spec(Mode::Cycle), 0),
            CaseOutcome::Ignored(
                "restore refused: crest: error: image needs memfd: not supported yet".into()
            )
        );
    }

    #[test]
    fn a_refusal_that_leaves_the_target_stopped_fails() {
        // kill only queues SIGSTOP; the target stops when it next runs. A
        // real engine stops its target before returning, so the fake waits
        // for the stop too (else the check may see it still running).
        let f = Fake::new(
            "kill -STOP $4; while [ \"$(cut -d' ' -f3 /proc/$4/stat)\" != T ]; do sleep 0.01; done\n\
             echo 'crest: error: nope: not supported yet' >&2; exit 3",
        );
        match runner::run_case(&f.cfg(true), &spec(Mode::Cycle), 0) {
            CaseOutcome::Failed(m) => {
                assert!(m.contains("did not leave the target as it was"), "{m}");
                assert!(m.contains("stopped"), "{m}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn an_unsupported_refusal_must_name_what() {
        let f = Fake::new("echo 'something went wrong' >&2; exit 3");
        match runner::run_case(&f.cfg(true), &spec(Mode::Cycle), 0) {
            CaseOutcome::Failed(m) => {
                assert!(m.contains("without a `crest: error: …` line"), "{m}")
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn other_dump_errors_fail_and_keep_the_case_dir() {
        let f = Fake::new("echo 'crest: error: boom' >&2; exit 1");
        match runner::run_case(&f.cfg(true), &spec(Mode::Cycle), 0) {
            CaseOutcome::Failed(m) => assert!(
                m.contains("crest dump failed (exit 1): crest: error: boom"),
                "{m}"
            ),
            o => panic!("{o:?}"),
        }
        assert_eq!(
            std::fs::read_dir(f.dir.path().join("work"))
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn a_dump_that_claims_success_but_leaves_the_target_alive_fails() {
        let f = Fake::new("exit 0");
        let mut s = spec(Mode::Cycle);
        s.timeout_secs = Some(15);
        match runner::run_case(&f.cfg(true), &s, 0) {
            CaseOutcome::Failed(m) => assert!(m.contains("still alive"), "{m}"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn refusing_a_nonexistent_pid_needs_a_clear_error() {
        let good = Fake::new("echo \"crest: error: pid $4: no such process\" >&2; exit 1");
        assert_eq!(
            runner::run_case(&good.cfg(true), &spec(Mode::NoSuchPid), 0),
            CaseOutcome::Passed
        );
        let vague = Fake::new("echo 'failed' >&2; exit 1");
        assert!(matches!(
            runner::run_case(&vague.cfg(true), &spec(Mode::NoSuchPid), 0),
            CaseOutcome::Failed(_)
        ));
        let accepts = Fake::new("exit 0");
        assert!(matches!(
            runner::run_case(&accepts.cfg(true), &spec(Mode::NoSuchPid), 0),
            CaseOutcome::Failed(_)
        ));
    }

    #[test]
    fn not_root_pending_and_missing_binaries() {
        let f = Fake::new("exit 0");
        assert!(
            matches!(runner::run_case(&f.cfg(false), &spec(Mode::Cycle), 0), CaseOutcome::Ignored(m) if m.contains("needs root"))
        );
        let mut s = spec(Mode::Cycle);
        s.pending = Some("workload not written".into());
        assert!(
            matches!(runner::run_case(&f.cfg(true), &s, 0), CaseOutcome::Ignored(m) if m.contains("workload not written"))
        );
        let mut s = spec(Mode::Cycle);
        s.workload = Some("wl-missing".into());
        assert!(
            matches!(runner::run_case(&f.cfg(true), &s, 0), CaseOutcome::Failed(m) if m.contains("cargo build -p crest-workloads"))
        );
        let mut c = f.cfg(true);
        c.crest_bin = f.dir.path().join("nope");
        assert!(
            matches!(runner::run_case(&c, &spec(Mode::Cycle), 0), CaseOutcome::Failed(m) if m.contains("cargo build -p crest-engine"))
        );
    }
}
