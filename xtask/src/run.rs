//! Running one command on one kernel: natively for `host`, in a QEMU guest
//! otherwise, with its stdout followed live.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crest_vm::guest::{GUEST_RESULTS_DIR, STDERR_FILE, STDOUT_FILE};
use crest_vm::runner::{self, GuestCommand};

use crate::support::{self, KernelChoice, VmOpts};

/// Follows a growing text file, handing out complete lines.
pub struct Follow {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl Follow {
    pub fn new(path: PathBuf) -> Self {
        Follow {
            path,
            offset: 0,
            partial: String::new(),
        }
    }

    /// New complete lines since the last call.
    pub fn lines(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            out.push(self.partial[..i].to_string());
            self.partial.drain(..=i);
        }
        out
    }
}

/// What a command on a kernel gave.
#[derive(Debug)]
pub struct Ran {
    /// The command's exit code, when it ran to the end.
    pub exit_code: Option<i32>,
    /// Why it did not run to the end (boot failure, timeout…), with the console tail.
    pub failure: Option<String>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Host path of the results dir (the guest's [`GUEST_RESULTS_DIR`]).
    pub results_dir: PathBuf,
    pub console_log: Option<PathBuf>,
    pub kernel_release: Option<String>,
    /// Whether the kernel came from the cache (None for host).
    pub cached: Option<bool>,
    pub seconds: f64,
}

/// Placeholder in argv for the results dir (host path natively,
/// [`GUEST_RESULTS_DIR`] in a guest).
pub const RESULTS: &str = "{results}";
/// Placeholder in argv for a writable scratch dir.
pub const WORK: &str = "{work}";

fn substitute(argv: &[String], results: &str, work: &str) -> Vec<String> {
    argv.iter()
        .map(|a| a.replace(RESULTS, results).replace(WORK, work))
        .collect()
}

/// Parameters of one run.
pub struct RunSpec<'a> {
    pub kernel: &'a KernelChoice,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub run_dir: PathBuf,
    pub timeout: Duration,
    pub vm: &'a VmOpts,
    /// The guest init binary (VM runs only).
    pub init: Option<&'a [u8]>,
}

/// Runs `spec`; `on_line` gets every stdout line as it appears, `status`
/// short phase messages.
pub fn run(spec: &RunSpec, on_line: &mut dyn FnMut(&str), status: &dyn Fn(&str)) -> Result<Ran> {
    let start = Instant::now();
    std::fs::create_dir_all(&spec.run_dir)
        .with_context(|| format!("create {}", spec.run_dir.display()))?;
    match spec.kernel {
        KernelChoice::Host => run_host(spec, on_line, start),
        _ => run_vm(spec, on_line, status, start),
    }
}

fn run_host(spec: &RunSpec, on_line: &mut dyn FnMut(&str), start: Instant) -> Result<Ran> {
    let results = spec.run_dir.join("results");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    let work = tempfile::Builder::new().prefix("crest-work-").tempdir()?;
    let argv = substitute(
        &spec.argv,
        &results.display().to_string(),
        &work.path().display().to_string(),
    );
    let (stdout, stderr) = (results.join(STDOUT_FILE), results.join(STDERR_FILE));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.workdir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(&stderr)?);
    let mut child = cmd.spawn().with_context(|| format!("start {}", argv[0]))?;
    let mut follow = Follow::new(stdout.clone());
    let (exit_code, failure) = loop {
        for l in follow.lines() {
            on_line(&l);
        }
        if let Some(st) = child.try_wait()? {
            break (
                st.code().or_else(|| {
                    use std::os::unix::process::ExitStatusExt;
                    st.signal().map(|s| 128 + s)
                }),
                None,
            );
        }
        if start.elapsed() > spec.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break (
                None,
                Some(format!(
                    "timed out after {:?}; last output:\n{}",
                    spec.timeout,
                    crest_vm::tail_file(&stdout, 20)
                )),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for l in follow.lines() {
        on_line(&l);
    }
    Ok(Ran {
        exit_code,
        failure,
        stdout,
        stderr,
        results_dir: results,
        console_log: None,
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
        cached: None,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn run_vm(
    spec: &RunSpec,
    on_line: &mut dyn FnMut(&str),
    status: &dyn Fn(&str),
    start: Instant,
) -> Result<Ran> {
    let (kernel, cached) = support::boot_kernel(spec.kernel, spec.vm.mirror.as_deref(), status)?;
    let source = match spec.kernel {
        KernelChoice::Custom { image, .. } => format!("user image {}", image.display()),
        _ if cached => "cached".into(),
        _ => "fetched".into(),
    };
    status(&format!(
        "booting {} ({source})",
        kernel.release.as_deref().unwrap_or("custom kernel"),
    ));
    let argv = substitute(&spec.argv, GUEST_RESULTS_DIR, "/tmp");
    // The workspace may be hidden in the guest (a checkout under /tmp): then
    // the command starts in / (everything it needs is passed as paths).
    let workdir =
        if crate::support::check_guest_visible(std::path::Path::new(&spec.workdir)).is_ok() {
            spec.workdir.as_str()
        } else {
            "/"
        };
    let mut cmd = GuestCommand::new(argv).workdir(workdir);
    for (k, v) in &spec.env {
        cmd = cmd.env(k, v);
    }
    let init = spec.init.context("guest init not built")?;
    let results = spec.run_dir.join("results");
    let mut follow = Follow::new(results.join(STDOUT_FILE));
    let mut tick = || {
        for l in follow.lines() {
            on_line(&l);
        }
    };
    let outcome = runner::run_in_guest(
        &kernel,
        init,
        &cmd,
        &spec.vm.config(spec.timeout),
        &spec.run_dir,
        &mut tick,
    )?;
    tick();
    Ok(Ran {
        exit_code: outcome.exit_code(),
        failure: outcome.failure(),
        stdout: outcome.stdout_path(),
        stderr: outcome.stderr_path(),
        results_dir: outcome.results_dir(),
        console_log: Some(outcome.console_log()),
        kernel_release: outcome
            .status
            .as_ref()
            .map(|s| s.kernel_release.clone())
            .or(kernel.release.clone()),
        cached: match spec.kernel {
            KernelChoice::Custom { .. } => None,
            _ => Some(cached),
        },
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Prints a file to stdout or stderr, if it has anything.
pub fn print_file(path: &Path, to_stderr: bool) {
    if let Ok(b) = std::fs::read(path) {
        use std::io::Write;
        if to_stderr {
            let _ = std::io::stderr().write_all(&b);
        } else {
            let _ = std::io::stdout().write_all(&b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_hands_out_complete_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out");
        let mut f = Follow::new(p.clone());
        assert!(f.lines().is_empty());
        std::fs::write(&p, "a\nb").unwrap();
        assert_eq!(f.lines(), ["a"]);
        std::fs::write(&p, "a\nbc\nd\n").unwrap();
        assert_eq!(f.lines(), ["bc", "d"]);
        assert!(f.lines().is_empty());
    }

    #[test]
    fn host_run_substitutes_and_captures() {
        let d = tempfile::tempdir().unwrap();
        let vm = VmOpts {
            memory: 1,
            cpus: 1,
            mirror: None,
            no_kvm: true,
        };
        let spec = RunSpec {
            kernel: &KernelChoice::Host,
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("echo hi > {RESULTS}/x; echo out; echo err >&2; test -d {WORK}; exit 3"),
            ],
            env: vec![],
            workdir: "/".into(),
            run_dir: d.path().join("r"),
            timeout: Duration::from_secs(30),
            vm: &vm,
            init: None,
        };
        let mut lines = Vec::new();
        let ran = run(&spec, &mut |l| lines.push(l.to_string()), &|_| {}).unwrap();
        assert_eq!(ran.exit_code, Some(3));
        assert!(ran.failure.is_none());
        assert_eq!(lines, ["out"]);
        assert_eq!(std::fs::read_to_string(ran.stderr).unwrap(), "err\n");
        assert_eq!(
            std::fs::read_to_string(ran.results_dir.join("x")).unwrap(),
            "hi\n"
        );

        let spec = RunSpec {
            argv: vec!["/bin/sleep".into(), "10".into()],
            timeout: Duration::from_millis(300),
            ..spec
        };
        let ran = run(&spec, &mut |_| {}, &|_| {}).unwrap();
        assert!(ran.failure.unwrap().contains("timed out"));
    }
}
