//! The suite's entry point, shared by the `crest-conformance` binary and the
//! `cargo test` target: parses the suite's own flags, hands the rest to
//! libtest-mimic, runs one trial per case and writes the reports.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::cases::{self, CaseSpec};
use crate::gate;
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
    /// A report (or a directory of them, one per kernel label) whose passed
    /// cases must still pass (env `CREST_CONFORMANCE_BASELINE`).
    pub baseline: Option<PathBuf>,
    /// The arguments left for libtest-mimic (program name first).
    pub rest: Vec<OsString>,
}

const USAGE: &str = "\
usage: crest-conformance [SUITE OPTIONS] [LIBTEST OPTIONS] [FILTER]
       crest-conformance compare BASE.json CAND.json

Runs as root (ptrace, clone3 with set_tid); refuses to start otherwise (exit 2).
Exit status: 0 every case ran and the gate passed; 101 a case failed; 1 the
gate failed otherwise (a must-priority case not passed without an entry of
gate-allow.json, a case without an outcome, a baseline case regressed).

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
  --baseline PATH        a report, or a dir of them named LABEL.json, whose passed
                         cases must pass again (env CREST_CONFORMANCE_BASELINE)
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
            "--baseline",
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
            "--baseline" => o.baseline = path,
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

/// Names `reqs` on stderr after `what`, when there are any.
fn warn_requirements(what: &str, reqs: &[&Requirement]) {
    if !reqs.is_empty() {
        let ids: Vec<&str> = reqs.iter().map(|r| r.id.as_str()).collect();
        eprintln!("{what}: {}", ids.join(", "));
    }
}

/// The kernel label of this run (`CREST_KERNEL_LABEL`, else `host`).
fn kernel_label() -> String {
    std::env::var("CREST_KERNEL_LABEL")
        .ok()
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// What the libtest arguments select when it is not every case (for the
/// report: a selected run is not a full one).
pub fn selection(args: &Arguments) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(f) = &args.filter {
        parts.push(if args.exact {
            format!("exact {f}")
        } else {
            format!("filter {f}")
        });
    }
    for s in &args.skip {
        parts.push(format!("skip {s}"));
    }
    if args.ignored {
        parts.push("only ignored".into());
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The IDs of the cases `args` selects, in table order: what libtest-mimic
/// will run, computed with its own filter.
pub fn selected(specs: &[CaseSpec], args: &Arguments) -> Vec<String> {
    specs
        .iter()
        .filter(|s| {
            let t = Trial::test(s.id.clone(), || Ok(())).with_kind(s.requirement());
            !args.is_filtered_out(&t)
        })
        .map(|s| s.id.clone())
        .collect()
}

/// The baseline's passed cases for kernel `label`: `path` is a report, or
/// a directory of reports named `LABEL.json` (a kernel without one there
/// has no baseline).
pub fn baseline_passed(path: &Path, label: &str) -> anyhow::Result<Option<BTreeSet<String>>> {
    let file = if path.is_dir() {
        let f = path.join(format!("{label}.json"));
        if !f.is_file() {
            return Ok(None);
        }
        f
    } else {
        path.to_path_buf()
    };
    Ok(Some(gate::passed(&Report::read(&file)?)))
}

/// Why this process may not run the suite: it must be root (ptrace,
/// clone3 with set_tid). A run that ignored every case instead would look
/// like a green one.
pub fn refuse_without_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the suite needs root (ptrace, clone3 with set_tid) and runs as uid {}: run it as root (sudo), or in a QEMU guest with `cargo xtask conformance --kernel 6.1`",
            nix::unistd::geteuid()
        );
    }
    Ok(())
}

fn run_suite(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let opts = parse_options(args)?;
    let reqs = requirements::parse(requirements::REQUIREMENTS_MD)
        .map_err(|e| anyhow::anyhow!("REQUIREMENTS.md: {e}"))?;
    let specs = cases::parse(cases::CASES_JSON).map_err(|e| anyhow::anyhow!("{e}"))?;
    cases::check_known(&specs, &reqs).map_err(|e| anyhow::anyhow!("{e}"))?;
    let allow = gate::parse_allowances(gate::ALLOW_JSON, &specs).map_err(|e| anyhow::anyhow!(e))?;
    let libtest = Arguments::from_iter(opts.rest.clone());
    if !libtest.list {
        refuse_without_root()?;
    }
    let label = kernel_label();
    let baseline = match opts
        .baseline
        .clone()
        .or_else(|| env_path("CREST_CONFORMANCE_BASELINE"))
    {
        Some(p) => {
            baseline_passed(&p, &label).with_context(|| format!("baseline {}", p.display()))?
        }
        None => None,
    };

    let bin_dir = default_bin_dir();
    let given_bin = opts.crest_bin.clone().or_else(|| env_path("CREST_BIN"));
    let crest_bin = given_bin.clone().unwrap_or_else(|| bin_dir.join("crest"));
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
        workload_dir: workload_dir.clone(),
        work_dir: work_dir.clone(),
        cycles: opts.cycles,
        case_timeout: opts.case_timeout,
        keep: opts.keep,
        mpi: opts.mpi.clone(),
        mpi_args: opts.mpi_args.clone(),
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
    let expected = selected(&specs, &libtest);
    let trials = trials(&specs, &reqs, &cfg, &records);
    let conclusion = libtest_mimic::run(&libtest, trials);
    if libtest.list {
        return Ok(conclusion.exit_code());
    }

    let mut cases = records.lock().map(|r| r.clone()).unwrap_or_default();
    let order: BTreeMap<&str, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    cases.sort_by_key(|c| order.get(c.id.as_str()).copied().unwrap_or(usize::MAX));
    let engine_bin = given_bin
        .filter(|p| *p != bin_dir.join("crest"))
        .map(|p| p.display().to_string());
    let report = Report {
        schema: REPORT_SCHEMA.to_string(),
        label: label.clone(),
        kernel: kernel_release(),
        engine_version: engine_version(&crest_bin),
        commit: std::env::var("CREST_COMMIT").unwrap_or_default(),
        selection: selection(&libtest),
        engine_bin,
        timestamp: report::rfc3339(started),
        cases,
    };
    write_reports(&opts, &report, &reqs)?;
    if temp {
        // Only removes it when empty: failed cases keep their dirs.
        let _ = std::fs::remove_dir(&work_dir);
    }
    if conclusion.has_failed() && std::fs::read_dir(&work_dir).is_ok() {
        eprintln!("failed cases keep their dirs under {}", work_dir.display());
    }
    let verdict = gate::judge(&label, &report, &expected, &reqs, &allow, baseline.as_ref());
    for (case, why) in &verdict.allowed {
        eprintln!("gate: {case} did not pass, accepted by gate-allow.json: {why}");
    }
    if verdict.findings.is_empty() {
        eprintln!("gate: passed on {label}");
        return Ok(conclusion.exit_code());
    }
    eprintln!("gate: FAILED on {label}");
    for f in &verdict.findings {
        eprintln!("  - {f}");
    }
    Ok(if conclusion.has_failed() {
        conclusion.exit_code()
    } else {
        ExitCode::FAILURE
    })
}

/// What a panic carried, for a case's message.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
        .to_string()
}

/// One trial per case, named `ID::case`; each records its outcome for the
/// reports, a panicking case too (as failed).
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
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runner::run_case_noted(&cfg, &spec, seq, &mut notes)
                }))
                .unwrap_or_else(|p| {
                    CaseOutcome::Failed(format!("the case panicked: {}", panic_message(&*p)))
                });
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
                records
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(CaseRecord {
                        id: spec.id.clone(),
                        requirement: spec.requirement().to_string(),
                        priority,
                        outcome: o,
                        duration_ms: t0.elapsed().as_millis() as u64,
                        message,
                        notes,
                    });
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

        fn cfg(&self) -> Config {
            Config {
                crest_bin: self.dir.path().join("crest"),
                workload_dir: self.dir.path().to_path_buf(),
                work_dir: self.dir.path().join("work"),
                cycles: 1,
                case_timeout: Duration::from_secs(20),
                keep: false,
                mpi: None,
                mpi_args: Vec::new(),
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
            change: Default::default(),
            observe_pre_copy: false,
        }
    }

    #[test]
    fn exit_3_is_ignored_with_the_engines_reason() {
        let f =
            Fake::new("echo 'crest: error: pid 1: fd 5 is a pipe: not supported yet' >&2; exit 3");
        let out = runner::run_case(&f.cfg(), &spec(Mode::Cycle), 0);
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
    fn a_restore_refusing_with_exit_3_fails() {
        // The fake dump kills its target (as the real one does) and succeeds;
        // the fake restore refuses the image as unsupported: the job is gone
        // and cannot come back, so that is a failure, never "ignored".
        let f = Fake::new(
            "case $2 in\n\
             dump) kill -9 $4; mkdir -p $6; exit 0;;\n\
             restore) echo 'crest: error: image needs memfd: not supported yet' >&2; exit 3;;\n\
             esac; exit 1",
        );
        match runner::run_case(&f.cfg(), &spec(Mode::Cycle), 0) {
            CaseOutcome::Failed(m) => assert!(
                m.starts_with("crest restore refused the image its dump wrote (exit 3): crest: error: image needs memfd: not supported yet"),
                "{m}"
            ),
            o => panic!("{o:?}"),
        }
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
        match runner::run_case(&f.cfg(), &spec(Mode::Cycle), 0) {
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
        match runner::run_case(&f.cfg(), &spec(Mode::Cycle), 0) {
            CaseOutcome::Failed(m) => {
                assert!(m.contains("without a `crest: error: …` line"), "{m}")
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn other_dump_errors_fail_and_keep_the_case_dir() {
        let f = Fake::new("echo 'crest: error: boom' >&2; exit 1");
        match runner::run_case(&f.cfg(), &spec(Mode::Cycle), 0) {
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
        match runner::run_case(&f.cfg(), &s, 0) {
            CaseOutcome::Failed(m) => assert!(m.contains("still alive"), "{m}"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn refusing_a_nonexistent_pid_needs_a_clear_error() {
        let good = Fake::new("echo \"crest: error: pid $4: no such process\" >&2; exit 1");
        assert_eq!(
            runner::run_case(&good.cfg(), &spec(Mode::NoSuchPid), 0),
            CaseOutcome::Passed
        );
        let vague = Fake::new("echo 'failed' >&2; exit 1");
        assert!(matches!(
            runner::run_case(&vague.cfg(), &spec(Mode::NoSuchPid), 0),
            CaseOutcome::Failed(_)
        ));
        let accepts = Fake::new("exit 0");
        assert!(matches!(
            runner::run_case(&accepts.cfg(), &spec(Mode::NoSuchPid), 0),
            CaseOutcome::Failed(_)
        ));
    }

    #[test]
    fn pending_and_missing_binaries() {
        let f = Fake::new("exit 0");
        let mut s = spec(Mode::Cycle);
        s.pending = Some("workload not written".into());
        assert!(
            matches!(runner::run_case(&f.cfg(), &s, 0), CaseOutcome::Ignored(m) if m.contains("workload not written"))
        );
        let mut s = spec(Mode::Cycle);
        s.workload = Some("wl-missing".into());
        assert!(
            matches!(runner::run_case(&f.cfg(), &s, 0), CaseOutcome::Failed(m) if m.contains("cargo build -p crest-workloads"))
        );
        let mut c = f.cfg();
        c.crest_bin = f.dir.path().join("nope");
        assert!(
            matches!(runner::run_case(&c, &spec(Mode::Cycle), 0), CaseOutcome::Failed(m) if m.contains("cargo build -p crest-engine"))
        );
    }
}
