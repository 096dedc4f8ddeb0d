//! `cargo xtask conformance`: the suite on several kernels, in parallel, then
//! a requirement × kernel matrix.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use crest_conformance::report::{Report, REPORT_SCHEMA};
use crest_conformance::{cases, gate, provenance, requirements, suite};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::matrix::{self, Baseline, GateInput, KernelRun};
use crate::run::{self, RunSpec, RESULTS, WORK};
use crate::support::{self, KernelChoice, VmOpts};

/// Runs the conformance suite on one or more kernels.
///
/// With no --kernel (and no --kernel-image) it runs on `host` (natively) and
/// `6.1` (Debian bookworm's kernel in QEMU). `--kernel all` means every
/// catalog kernel (5.10, 6.1, 6.12, 7.2) plus host.
///
/// Exit status: 0 gate passed; 1 the gate failed (a must-priority case did
/// not pass and gate-allow.json does not accept why, a case has no outcome,
/// a baseline case regressed, a harness exited non-zero); 3 a kernel
/// produced no usable report (boot failure, timeout, harness crash); 2
/// xtask itself failed (build, fetch, setup, a host run without root).
#[derive(Debug, clap::Args)]
pub struct ConformanceArgs {
    /// Kernel to run on: `host`, a catalog version (5.10, 6.1, 6.12, 7.2) or
    /// `all`; repeatable. Default: host and 6.1.
    #[arg(long = "kernel", value_name = "V")]
    pub kernels: Vec<String>,
    /// Your own kernel image (bzImage/vmlinuz), run as kernel `custom`.
    #[arg(long, value_name = "PATH")]
    pub kernel_image: Option<PathBuf>,
    /// The `lib/modules/<release>` tree of --kernel-image, if 9p/virtio are modules.
    #[arg(long, value_name = "DIR", requires = "kernel_image")]
    pub modules_dir: Option<PathBuf>,
    /// Only cases whose name contains PATTERN (passed to the harness).
    #[arg(long, value_name = "PATTERN")]
    pub filter: Option<String>,
    /// Kernels run at the same time (default: number of cores).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// What passed before: a directory of reports named LABEL.json (the
    /// committed `conformance/reports`), a matrix.json or a report.json; a
    /// case that passed there and does not pass now fails the gate.
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
    /// The engine under test (default: the workspace's crest, built first):
    /// an installed crest, or a stand-in to test the gate itself. Guests
    /// run a copy of it.
    #[arg(long, value_name = "PATH")]
    pub engine_bin: Option<PathBuf>,
    /// After the run, write every kernel's report to conformance/reports/
    /// LABEL.json and regenerate REQUIREMENTS.md's statuses and kernel
    /// matrix from the committed reports. Only for a full run (no filter)
    /// of the workspace's own engine on a clean tree, so that each report
    /// names the code it ran.
    #[arg(long)]
    pub record: bool,
    /// Output directory (default: target/conformance).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The MPI launcher (mpirun) for the MPI section (MPI-VENDOR).
    #[arg(long, value_name = "PATH")]
    pub mpi: Option<PathBuf>,
    /// Its arguments before `-n 4 PROGRAM` (one string, split at spaces),
    /// e.g. `--mpi-args '--mca btl tcp,self'`.
    #[arg(
        long,
        value_name = "ARGS",
        requires = "mpi",
        allow_hyphen_values = true
    )]
    pub mpi_args: Option<String>,
    /// Per-kernel timeout in seconds (boot + suite).
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub timeout: u64,
    /// Per-case timeout passed to the harness (`--case-timeout`). Default: the
    /// harness's own natively and under KVM, 300 s in TCG guests (emulation
    /// is 5-10 times slower).
    #[arg(long, value_name = "SECS")]
    pub case_timeout: Option<u64>,
    /// Use the binaries already in target/debug instead of building them first.
    #[arg(long)]
    pub no_build: bool,
    /// Extra arguments for the harness (libtest flags such as --test-threads=1).
    #[arg(last = true)]
    pub harness_args: Vec<String>,
    #[command(flatten)]
    pub vm: VmOpts,
}

/// Live progress of one kernel, from the harness's libtest lines.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub total: Option<u32>,
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    pub last: String,
}

impl Tally {
    /// Feeds one stdout line; returns true for a finished test.
    pub fn feed(&mut self, line: &str) -> bool {
        if let Some(n) = line
            .strip_prefix("running ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
        {
            self.total = Some(n);
            return false;
        }
        let Some(rest) = line.strip_prefix("test ") else {
            return false;
        };
        let Some((name, result)) = rest.rsplit_once(" ... ") else {
            return false;
        };
        let result = result.trim();
        if result == "ok" {
            self.passed += 1;
        } else if result.starts_with("FAILED") {
            self.failed += 1;
        } else if result.starts_with("ignored") {
            self.ignored += 1;
        } else {
            return false;
        }
        self.last = format!("{name} {result}");
        true
    }

    pub fn done(&self) -> u32 {
        self.passed + self.failed + self.ignored
    }

    pub fn summary(&self) -> String {
        let done = self.done();
        let total = self.total.map(|t| format!("/{t}")).unwrap_or_default();
        format!(
            "{done}{total} done: {} passed, {} failed, {} ignored",
            self.passed, self.failed, self.ignored
        )
    }
}

/// Per-case timeout for TCG guests when none is given.
pub const TCG_CASE_TIMEOUT: u64 = 300;

/// The harness's argument list (placeholders for results and work dirs);
/// `engine` is the crest it tests.
fn harness_argv(
    bin: &Path,
    engine: &Path,
    args: &ConformanceArgs,
    case_timeout: Option<u64>,
) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    let mut v = vec![
        s(&bin.join("crest-conformance")),
        "--crest-bin".into(),
        s(engine),
        "--workload-dir".into(),
        s(bin),
        "--work-dir".into(),
        WORK.into(),
        "--report".into(),
        format!("{RESULTS}/report.json"),
        "--junit".into(),
        format!("{RESULTS}/junit.xml"),
    ];
    if let Some(m) = &args.mpi {
        v.push("--mpi".into());
        v.push(s(m));
    }
    if let Some(a) = &args.mpi_args {
        v.push("--mpi-args".into());
        v.push(a.clone());
    }
    if let Some(t) = case_timeout {
        v.push("--case-timeout".into());
        v.push(t.to_string());
    }
    v.extend(args.harness_args.iter().cloned());
    if let Some(f) = &args.filter {
        v.push(f.clone());
    }
    v
}

/// The libtest arguments the harness gets (its own flags left out): what
/// decides which cases it runs.
fn libtest_args(args: &ConformanceArgs) -> libtest_mimic::Arguments {
    let mut v = vec!["crest-conformance".to_string()];
    v.extend(args.harness_args.iter().cloned());
    v.extend(args.filter.iter().cloned());
    libtest_mimic::Arguments::from_iter(v)
}

/// The commit the workspace is at, `-dirty` when tracked files changed
/// (empty outside a git checkout).
fn workspace_commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(support::workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return String::new();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if changes.is_empty() => head,
        _ => format!("{head}-dirty"),
    }
}

/// Why `--record` may not write this run's reports: they must be full runs
/// of the workspace's own engine at a named commit.
fn record_refusal(args: &ConformanceArgs, commit: &str) -> Option<String> {
    if let Some(sel) = suite::selection(&libtest_args(args)) {
        return Some(format!(
            "--record needs a full run, this one selects: {sel}"
        ));
    }
    if args.engine_bin.is_some() {
        return Some("--record writes the workspace engine's results, not --engine-bin's".into());
    }
    if args.no_build {
        return Some("--record builds what it runs (drop --no-build)".into());
    }
    if commit.is_empty() || commit.ends_with("-dirty") {
        return Some(format!(
            "--record needs a clean checkout, so each report names the code it ran (commit {:?}); commit or stash first",
            commit
        ));
    }
    None
}

/// Reads a run's report, or explains why there is none.
fn collect(label: &str, ran: &Result<run::Ran>) -> KernelRun {
    let mut kr = KernelRun {
        label: label.into(),
        report: None,
        error: None,
        harness_exit: None,
        seconds: 0.0,
    };
    let ran = match ran {
        Ok(r) => r,
        Err(e) => {
            kr.error = Some(format!("{e:#}"));
            return kr;
        }
    };
    kr.seconds = ran.seconds;
    kr.harness_exit = ran.exit_code;
    let path = ran.results_dir.join("report.json");
    let report = std::fs::read_to_string(&path)
        .with_context(|| format!("read {}", path.display()))
        .and_then(|t| {
            serde_json::from_str::<Report>(&t).with_context(|| format!("parse {}", path.display()))
        })
        .and_then(|r| {
            if r.schema == REPORT_SCHEMA {
                Ok(r)
            } else {
                bail!(
                    "{}: schema {:?}, expected {REPORT_SCHEMA:?}",
                    path.display(),
                    r.schema
                )
            }
        });
    match (report, &ran.failure) {
        (Ok(r), None) => kr.report = Some(r),
        (Ok(r), Some(f)) => {
            kr.report = Some(r);
            kr.error = Some(f.clone());
        }
        (Err(e), Some(f)) => kr.error = Some(format!("{f}\n({e:#})")),
        (Err(e), None) => {
            kr.error = Some(format!(
                "harness exited with {:?} without a usable report: {e:#}\n--- stderr tail ---\n{}",
                ran.exit_code,
                crest_vm::tail_file(&ran.stderr, 20)
            ))
        }
    }
    kr
}

fn copy_artifacts(out: &Path, label: &str, ran: &run::Ran) {
    let pairs = [
        (
            ran.results_dir.join("report.json"),
            format!("report-{label}.json"),
        ),
        (
            ran.results_dir.join("junit.xml"),
            format!("junit-{label}.xml"),
        ),
        (ran.stdout.clone(), format!("stdout-{label}.txt")),
        (ran.stderr.clone(), format!("stderr-{label}.txt")),
    ];
    for (from, to) in pairs.iter().chain(
        ran.console_log
            .iter()
            .map(|c| (c.clone(), format!("console-{label}.log")))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        if from.is_file() {
            if let Err(e) = std::fs::copy(from, out.join(to)) {
                tracing::warn!("copy {} to {}: {e}", from.display(), to);
            }
        }
    }
}

pub fn main(args: ConformanceArgs) -> Result<i32> {
    let kernels = support::choose_kernels(
        &args.kernels,
        args.kernel_image.as_deref(),
        args.modules_dir.as_deref(),
        &["host", "6.1"],
    )?;
    if kernels.contains(&KernelChoice::Host) {
        // The harness refuses too; saying so before any build is kinder.
        suite::refuse_without_root().context("the host kernel's run")?;
    }
    let commit = workspace_commit();
    if args.record {
        if let Some(why) = record_refusal(&args, &commit) {
            bail!(why);
        }
    }
    let engine_bin = match &args.engine_bin {
        Some(p) if !p.is_file() => bail!("--engine-bin {}: no such file", p.display()),
        Some(p) => Some(std::path::absolute(p)?),
        None => None,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| support::target_dir().join("conformance"));
    let out = std::path::absolute(&out)?;
    std::fs::create_dir_all(&out)?;
    let baseline = match &args.baseline {
        Some(p) => Some(Baseline::load(p)?),
        None => None,
    };
    let any_vm = kernels.iter().any(|k| *k != KernelChoice::Host);
    let init = if any_vm {
        support::ensure_qemu()?;
        Some(support::build_guest_init()?)
    } else {
        None
    };
    let bin = if args.no_build {
        support::target_dir().join(support::PROFILE_DIR)
    } else {
        support::build_workspace_bins()?
    };
    let harness = bin.join("crest-conformance");
    if !harness.is_file() {
        bail!("{} was not built", harness.display());
    }
    // Guests run a copy in the cache: a checkout under /tmp (a CI clone,
    // say) is hidden in the guest, which mounts a fresh tmpfs there, and a
    // rebuild during the run must not change binaries under a guest.
    let staged = if any_vm {
        Some(support::stage_bins(&bin)?)
    } else {
        None
    };
    let guest_bin = staged.as_ref().map_or(bin.clone(), |s| s.dir.clone());
    if any_vm {
        support::check_guest_visible(&guest_bin)?;
    }
    let host_engine = engine_bin.clone().unwrap_or_else(|| bin.join("crest"));
    let guest_engine = match (&staged, &engine_bin) {
        (Some(s), Some(e)) => s.add_file(e, "engine-under-test")?,
        _ => guest_bin.join("crest"),
    };
    let tcg = args.vm.config(Duration::ZERO).accel == crest_vm::qemu::Accel::Tcg;
    let jobs = args
        .jobs
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    eprintln!(
        "conformance on {} ({} at a time), output in {}",
        kernels
            .iter()
            .map(|k| k.label())
            .collect::<Vec<_>>()
            .join(", "),
        jobs,
        out.display()
    );

    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} [{prefix}] {elapsed:>4} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let queue: Arc<Mutex<VecDeque<(usize, KernelChoice)>>> =
        Arc::new(Mutex::new(kernels.iter().cloned().enumerate().collect()));
    let results: Arc<Mutex<Vec<Option<KernelRun>>>> =
        Arc::new(Mutex::new(vec![None; kernels.len()]));
    let bars: Vec<ProgressBar> = kernels
        .iter()
        .map(|k| {
            let pb = multi.add(ProgressBar::new_spinner());
            pb.set_style(style.clone());
            pb.set_prefix(k.label());
            pb.set_message("waiting");
            if tty {
                pb.enable_steady_tick(Duration::from_millis(250));
            }
            pb
        })
        .collect();
    std::thread::scope(|s| {
        for _ in 0..jobs.min(kernels.len()) {
            s.spawn(|| loop {
                let Some((i, k)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
                else {
                    break;
                };
                let label = k.label();
                let pb = &bars[i];
                let say = |m: &str| {
                    pb.set_message(m.to_string());
                    if !tty {
                        eprintln!("[{label}] {m}");
                    }
                };
                say("starting");
                let mut tally = Tally::default();
                let case_timeout = args
                    .case_timeout
                    .or((k != KernelChoice::Host && tcg).then_some(TCG_CASE_TIMEOUT));
                let (dir, engine) = if k == KernelChoice::Host {
                    (&bin, &host_engine)
                } else {
                    (&guest_bin, &guest_engine)
                };
                let spec = RunSpec {
                    kernel: &k,
                    argv: harness_argv(dir, engine, &args, case_timeout),
                    env: vec![
                        ("RUST_BACKTRACE".into(), "1".into()),
                        ("CREST_KERNEL_LABEL".into(), label.clone()),
                        ("CREST_COMMIT".into(), commit.clone()),
                    ],
                    workdir: support::workspace_root().display().to_string(),
                    run_dir: out.join("runs").join(&label),
                    timeout: Duration::from_secs(args.timeout),
                    vm: &args.vm,
                    init: init.as_deref(),
                };
                let mut on_line = |l: &str| {
                    if tally.feed(l) {
                        pb.set_message(format!("{} | {}", tally.summary(), tally.last));
                        if !tty {
                            // Non-ok results as they come, and a tally every 10 tests.
                            if !l.ends_with(" ok") {
                                eprintln!("[{label}] {l}");
                            }
                            if tally.done() % 10 == 0 {
                                eprintln!("[{label}] {}", tally.summary());
                            }
                        }
                    }
                };
                let ran = run::run(&spec, &mut on_line, &say);
                if let Ok(r) = &ran {
                    copy_artifacts(&out, &label, r);
                }
                let kr = collect(&label, &ran);
                let done = match (&kr.error, &kr.report) {
                    (Some(e), _) => format!("ERROR: {}", e.lines().next().unwrap_or("")),
                    (None, Some(_)) => format!("done in {:.0} s: {}", kr.seconds, tally.summary()),
                    (None, None) => "no report".into(),
                };
                pb.finish_with_message(done.clone());
                if !tty {
                    eprintln!("[{label}] {done}");
                }
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(kr);
            });
        }
    });
    let runs: Vec<KernelRun> = Arc::try_unwrap(results)
        .map_err(|_| anyhow::anyhow!("worker still holds results"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
        .collect();
    for r in &runs {
        if let Some(e) = &r.error {
            eprintln!("\n[{}] run failed:\n{e}", r.label);
        }
    }
    let details = matrix::failure_details(&runs);
    if !details.is_empty() {
        println!("\n{details}");
    }
    let mut m = matrix::build(&runs);
    let reqs = requirements::embedded();
    let expected = suite::selected(&cases::embedded(), &libtest_args(&args));
    let allow = gate::allowances();
    matrix::apply_gate(
        &mut m,
        &runs,
        &GateInput {
            expected: &expected,
            reqs: &reqs,
            allow: &allow,
            baseline: baseline.as_ref(),
        },
    );
    std::fs::write(out.join("matrix.json"), serde_json::to_string_pretty(&m)?)?;
    std::fs::write(out.join("matrix.md"), m.markdown())?;
    println!("\n{}", m.terminal());
    for k in &m.kernels {
        println!(
            "{:>8}: {} passed, {} failed, {} ignored ({:.0} s){}",
            k.label,
            k.totals.passed,
            k.totals.failed,
            k.totals.ignored,
            k.seconds,
            if k.error.is_some() { "  ERROR" } else { "" }
        );
    }
    if args.record {
        record(&runs)?;
    }
    for a in &m.allowed {
        println!("accepted by gate-allow.json: {a}");
    }
    let gate = m.gate_failures();
    println!("\nmatrix: {}", out.join("matrix.md").display());
    if gate.is_empty() {
        println!("gate: passed");
        return Ok(0);
    }
    println!("gate: FAILED");
    for g in &gate {
        println!("  - {g}");
    }
    // 3: some kernel gave no usable report (boot failure, timeout, harness
    // crash); 1: cases failed or regressed.
    if m.kernels.iter().any(|k| k.error.is_some()) {
        Ok(3)
    } else {
        Ok(1)
    }
}

/// `--record`: every kernel's report into conformance/reports, then
/// REQUIREMENTS.md regenerated from what is committed there.
fn record(runs: &[KernelRun]) -> Result<()> {
    let dir = support::workspace_root()
        .join("conformance")
        .join(provenance::REPORTS_DIR);
    std::fs::create_dir_all(&dir)?;
    for r in runs {
        match &r.report {
            Some(rep) => {
                let path = dir.join(format!("{}.json", r.label));
                std::fs::write(&path, provenance::compact(rep))
                    .with_context(|| format!("write {}", path.display()))?;
                println!("recorded {}", path.display());
            }
            None => eprintln!(
                "[{}] no report to record: {}",
                r.label,
                r.error.as_deref().unwrap_or("?")
            ),
        }
    }
    crate::requirements_cmd(false).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_reads_libtest_lines() {
        let mut t = Tally::default();
        assert!(!t.feed("running 4 tests"));
        assert!(t.feed("test PIPE-CONTENTS::small ... ok"));
        assert!(t.feed("test PIPE-CONTENTS::full ... FAILED"));
        assert!(t.feed("test SOCK-TCP::est ... ignored, not supported yet"));
        assert!(!t.feed("test result: FAILED. 1 passed; 1 failed"));
        assert!(!t.feed("random"));
        assert_eq!((t.total, t.passed, t.failed, t.ignored), (Some(4), 1, 1, 1));
        assert_eq!(t.summary(), "3/4 done: 1 passed, 1 failed, 1 ignored");
    }

    #[test]
    fn harness_arguments() {
        let args = ConformanceArgs {
            kernels: vec![],
            kernel_image: None,
            modules_dir: None,
            filter: Some("PIPE".into()),
            jobs: None,
            baseline: None,
            engine_bin: None,
            record: false,
            out: None,
            mpi: Some("/usr/bin/mpirun".into()),
            mpi_args: Some("--mca btl tcp,self".into()),
            timeout: 1,
            case_timeout: None,
            no_build: false,
            harness_args: vec!["--test-threads=1".into()],
            vm: VmOpts {
                memory: 1,
                cpus: 1,
                mirror: None,
                no_kvm: true,
            },
        };
        let v = harness_argv(
            Path::new("/w/target/debug"),
            Path::new("/w/target/debug/crest"),
            &args,
            Some(300),
        )
        .join(" ");
        assert_eq!(
            v,
            "/w/target/debug/crest-conformance --crest-bin /w/target/debug/crest --workload-dir /w/target/debug \
             --work-dir {work} --report {results}/report.json --junit {results}/junit.xml \
             --mpi /usr/bin/mpirun --mpi-args --mca btl tcp,self --case-timeout 300 --test-threads=1 PIPE"
        );
    }

    #[test]
    fn collect_without_report_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let ran = run::Ran {
            exit_code: None,
            failure: Some("the guest wrote no status\n--- console ---\nKernel panic".into()),
            stdout: d.path().join("stdout.txt"),
            stderr: d.path().join("stderr.txt"),
            results_dir: d.path().to_path_buf(),
            console_log: None,
            kernel_release: None,
            cached: Some(true),
            seconds: 4.0,
        };
        let kr = collect("6.1", &Ok(ran));
        assert!(kr.report.is_none());
        assert!(kr.error.unwrap().contains("Kernel panic"));
    }
}
