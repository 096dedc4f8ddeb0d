//! Runs one case: starts its workload, drives `crest dump` / `crest restore`
//! through the case's mode, compares outside views and collects the workload's
//! verdict. Whatever happens, every process the case started (and every process
//! a restore created) is killed before the case returns.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::cases::{CaseSpec, Change, Mode, Need, Scope};
use crate::mpi;
use crate::view::{self, Parent};

const READY: &str = "ready";
const GO: &str = "go";
const RESULT: &str = "result";

/// The engine's exit code for "refused: not supported yet".
pub const EXIT_UNSUPPORTED: i32 = 3;
/// What a Rust panic exits with: never an acceptable answer from crest.
const EXIT_PANIC: i32 = 101;
/// How long the harness waits for a restored process to show the recorded view.
/// (At least: a third of the case timeout when that is longer, for slow guests.)
const VIEW_WAIT: Duration = Duration::from_secs(20);
/// How long a process may take to die after the dump that was to kill it.
/// (At least: a sixth of the case timeout when that is longer.)
const DEATH_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// Everything a case run needs from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub crest_bin: PathBuf,
    pub workload_dir: PathBuf,
    pub work_dir: PathBuf,
    pub cycles: u32,
    pub case_timeout: Duration,
    pub keep: bool,
    pub mpi: Option<PathBuf>,
    /// Launcher arguments for `--mpi` (`--mpi-args`).
    pub mpi_args: Vec<String>,
    /// The engine offers `crest dump --session SID` (see [`engine_has_session`]).
    pub session_dump: bool,
}

/// Whether `crest dump --help` offers `--session`: session-scope cases use it
/// when it exists and fall back to `-t` (the process and its descendants).
pub fn engine_has_session(crest: &Path) -> bool {
    Command::new(crest)
        .args(["dump", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--session"))
        .unwrap_or(false)
}

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseOutcome {
    Passed,
    /// Not run, or refused by the engine as unsupported: the reason.
    Ignored(String),
    Failed(String),
}

/// Why a case stopped early.
enum Stop {
    Ignored(String),
    Failed(String),
}

type R<T> = Result<T, Stop>;

macro_rules! fail {
    ($($t:tt)*) => { return Err(Stop::Failed(format!($($t)*))) };
}

/// How a crest invocation ended.
struct Exit {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Exit {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The engine's one-line reason: its `crest: error:` line, else its last line.
    fn message(&self) -> String {
        engine_message(&self.stderr)
    }

    fn describe(&self) -> String {
        describe_status(self.status)
    }
}

/// Picks the engine's reason out of its stderr.
pub fn engine_message(stderr: &str) -> String {
    strip_ansi(stderr)
        .lines()
        .find(|l| l.contains("crest: error:"))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| "(no message on stderr)".to_string())
}

fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st}"),
    }
}

/// The exit status a restorer reports for its child: the code, or 128+signal.
fn shell_status(st: ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// How a restore of an image that a dump wrote without complaint failed.
/// A refusal ("unsupported", exit 3) is a failure like any other: the dump
/// that wrote the image may have killed the only copy of the job, so an
/// image that does not restore is the worst outcome a user can meet.
fn restore_failure(what: &str, st: ExitStatus, msg: &str) -> Stop {
    let how = if st.code() == Some(EXIT_UNSUPPORTED) {
        "refused the image its dump wrote"
    } else {
        "failed"
    };
    Stop::Failed(format!(
        "crest {what} {how} ({}): {msg}",
        describe_status(st)
    ))
}

/// What a `--pre-copy` dump must show from outside: the target ran (its
/// write counter moved) and its writes were tracked meanwhile (write
/// protection makes the first write to each copied page fault; the
/// workload's heap has small pages only, one fault per page). A plain dump
/// of `anon-writing` takes 34 faults here (the dump's own calls, and a
/// replaced scratch mapping: 16 per thousand writes, before the freeze); a
/// pre-copy of its 64 MiB thousands (1,100 to 6,700 seen natively, under
/// load too). Counts, not times, so a loaded machine changes the margin,
/// not the answer.
const PRE_COPY_MIN_WRITES: u64 = 200;
const PRE_COPY_MIN_FAULTS: u64 = 200;

/// One look at the target during a dump: when, its write counter and its
/// minor page faults (None once it is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub t: Duration,
    pub count: Option<u64>,
    pub minflt: Option<u64>,
}

/// Reads a target's progress counter (process_vm_readv) and its minor
/// faults (`/proc/PID/stat`) from outside every millisecond while a dump
/// runs: a view of whether it ran and was tracked, independent of what the
/// engine says it did.
struct ProgressProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl ProgressProbe {
    fn start(pid: i32, addr: u64) -> ProgressProbe {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let t0 = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Acquire) {
                samples.push(Sample {
                    t: t0.elapsed(),
                    count: read_u64(pid, addr),
                    minflt: minor_faults(pid),
                });
                std::thread::sleep(Duration::from_millis(1));
            }
            samples
        });
        ProgressProbe {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the samples.
    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for ProgressProbe {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Eight bytes of `pid`'s memory at `addr`, or None (the process is gone).
fn read_u64(pid: i32, addr: u64) -> Option<u64> {
    use nix::sys::uio::{process_vm_readv, RemoteIoVec};
    let mut b = [0u8; 8];
    let n = process_vm_readv(
        nix::unistd::Pid::from_raw(pid),
        &mut [std::io::IoSliceMut::new(&mut b)],
        &[RemoteIoVec {
            base: addr as usize,
            len: 8,
        }],
    )
    .ok()?;
    (n == 8).then(|| u64::from_ne_bytes(b))
}

/// Minor page faults of `pid` so far (`/proc/PID/stat` field 10).
fn minor_faults(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the comm (which may hold spaces): state is field 3.
    stat.get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .nth(7)?
        .parse()
        .ok()
}

/// How far the write counter and the minor faults moved between the first
/// and the last sample that saw the target alive.
pub fn writes_and_faults(samples: &[Sample]) -> (u64, u64) {
    let alive = || {
        samples
            .iter()
            .filter(|s| s.count.is_some() && s.minflt.is_some())
    };
    match (alive().next(), alive().next_back()) {
        (Some(a), Some(b)) => (
            b.count.unwrap_or(0).saturating_sub(a.count.unwrap_or(0)),
            b.minflt.unwrap_or(0).saturating_sub(a.minflt.unwrap_or(0)),
        ),
        _ => (0, 0),
    }
}

/// From a counter's samples over a dump of length `total`: the longest
/// stretch in which it did not move (until it moved, the process died or
/// the dump ended), and the rest of the dump.
pub fn longest_stall(samples: &[Sample], total: Duration) -> (Duration, Duration) {
    let mut longest = Duration::ZERO;
    let mut since = Duration::ZERO;
    let mut last: Option<u64> = None;
    let mut end = total;
    for &Sample { t, count: v, .. } in samples {
        match v {
            None => {
                // Gone: the stretch ends at its death.
                end = t.min(total);
                break;
            }
            Some(v) if last.is_some_and(|l| l != v) => {
                longest = longest.max(t.saturating_sub(since));
                since = t;
            }
            Some(_) => {}
        }
        last = v;
    }
    longest = longest.max(end.saturating_sub(since));
    (longest, total.saturating_sub(longest))
}

/// A dump of a restored process refused as unsupported: the restore gave
/// back something the first dump did not have, which is a failure.
fn later_dump_refused(cycle: u32, stop: Stop) -> Stop {
    match stop {
        Stop::Ignored(m) => Stop::Failed(format!(
            "cycle {cycle}: the restored process could not be dumped again, though the first dump took it: {m}"
        )),
        failed => failed,
    }
}

/// Whether `name` is an executable on PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// How long `spec` may run: its own timeout, else `--case-timeout`.
fn case_timeout(cfg: &Config, spec: &CaseSpec) -> Duration {
    spec.timeout_secs
        .map(Duration::from_secs)
        .unwrap_or(cfg.case_timeout)
}

/// The toolchain an MPI case runs with (its first argument names the MPI),
/// or why it cannot run here.
fn mpi_toolchain(cfg: &Config, spec: &CaseSpec) -> Result<mpi::Toolchain, String> {
    let flavor = mpi::Flavor::parse(spec.args.first().map(String::as_str).unwrap_or(""))?;
    mpi::toolchain(flavor, cfg.mpi.as_deref(), &cfg.mpi_args)
}

/// A case note saying what the case ran against (the `--mpi` launcher);
/// `update-requirements` adds it to the requirement's status.
pub const RUN_WITH: &str = "run with ";

/// The state of one running case.
struct Run<'a> {
    cfg: &'a Config,
    spec: &'a CaseSpec,
    dir: PathBuf,
    ctl: PathBuf,
    deadline: Instant,
    workload: Option<Child>,
    /// Helper processes (a tracer) to kill and reap at the end.
    helpers: Vec<Child>,
    restore: Option<Child>,
    /// How the last background restore ended, when a wait noticed it first.
    restore_status: Option<ExitStatus>,
    /// Processes seen in a view (originals and restored ones) as (pid, start
    /// time): killed at the end if a process with that pid and start time is
    /// still there, so a reused pid is never hit.
    known: Vec<(i32, u64)>,
    sid: Option<i32>,
    crest_runs: u32,
    /// Whether the root's process group and session are outside the
    /// comparison: with a pid scope they are not part of the dump (the way a
    /// pipe to an outside process is not), so a restore may put the process
    /// into the restorer's group and session. PROC-PGID and PROC-SID cases use
    /// tree and session scopes, where they are compared.
    mask_session: bool,
    /// Measurements for the report (the MPI cases' dump and restore times).
    notes: Vec<String>,
    /// The samples of the last dump's [`ProgressProbe`], for [`Self::check_pre_copy`].
    pre_copy_seen: Option<(u32, Duration, Vec<Sample>)>,
    /// The workload's stdio that the engine rebinds at restore (a pipe to
    /// the harness), and what the first `crest restore` had there (later
    /// restores reopen that as a file): views show fds 0–2 on them as
    /// those channels (see [`view::Stdio`]).
    stdio_workload: view::Stdio,
    stdio_restorer: view::Stdio,
}

/// Runs `spec` and always cleans up after it.
pub fn run_case(cfg: &Config, spec: &CaseSpec, seq: usize) -> CaseOutcome {
    run_case_noted(cfg, spec, seq, &mut Vec::new())
}

/// [`run_case`], also returning what the case measured in `notes`.
pub fn run_case_noted(
    cfg: &Config,
    spec: &CaseSpec,
    seq: usize,
    notes: &mut Vec<String>,
) -> CaseOutcome {
    if let Some(reason) = &spec.pending {
        return CaseOutcome::Ignored(format!("case not runnable yet: {reason}"));
    }
    for need in &spec.needs {
        match need {
            // An MPI job names its MPI: that one's compiler and launcher must be there.
            Need::Mpicc if spec.mode == Mode::MpiJob => {
                if let Err(why) = mpi_toolchain(cfg, spec) {
                    return CaseOutcome::Ignored(why);
                }
            }
            Need::Mpicc => {
                let found =
                    cfg.mpi.as_ref().map(|m| m.exists()).unwrap_or(false) || on_path("mpicc");
                if !found {
                    return CaseOutcome::Ignored(
                        "needs mpicc (install an MPI, or pass --mpi PATH)".into(),
                    );
                }
            }
            Need::Cc => {
                if !on_path("cc") {
                    return CaseOutcome::Ignored("needs a C compiler (cc) on PATH".into());
                }
            }
        }
    }
    if !cfg.crest_bin.is_file() {
        return CaseOutcome::Failed(format!(
            "crest binary not found at {} (build it with `cargo build -p crest-engine`, or pass --crest-bin / CREST_BIN)",
            cfg.crest_bin.display()
        ));
    }
    if let Some(w) = &spec.workload {
        let bin = cfg.workload_dir.join(w);
        if !bin.is_file() {
            return CaseOutcome::Failed(format!(
                "workload {w} not found at {} (build it with `cargo build -p crest-workloads --bins`, or pass --workload-dir / CREST_WORKLOAD_DIR)",
                bin.display()
            ));
        }
    }
    let name: String = spec
        .id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = cfg.work_dir.join(format!("{name}.{seq}"));
    let _ = fs::remove_dir_all(&dir);
    let ctl = dir.join("ctl");
    if let Err(e) = fs::create_dir_all(&ctl) {
        return CaseOutcome::Failed(format!("cannot create {}: {e}", ctl.display()));
    }
    // MPI jobs one at a time: each launcher takes TCP ports from a common
    // range (Open MPI from 1024 up), so a job started while another is
    // dumped takes the ports that one's restore needs back.
    let _mpi_turn = (spec.mode == Mode::MpiJob).then(mpi_turn);
    let mut run = Run {
        cfg,
        spec,
        dir: dir.clone(),
        ctl,
        deadline: Instant::now() + case_timeout(cfg, spec),
        workload: None,
        helpers: Vec::new(),
        restore: None,
        restore_status: None,
        known: Vec::new(),
        sid: None,
        crest_runs: 0,
        mask_session: false,
        notes: Vec::new(),
        stdio_workload: view::Stdio::default(),
        stdio_restorer: view::Stdio::default(),
        pre_copy_seen: None,
    };
    let result = run.drive();
    run.cleanup();
    notes.append(&mut run.notes);
    let outcome = match result {
        Ok(()) => CaseOutcome::Passed,
        Err(Stop::Ignored(m)) => CaseOutcome::Ignored(m),
        Err(Stop::Failed(m)) => CaseOutcome::Failed(format!("{m}\n{}", run.logs())),
    };
    // Failed cases keep their dir (logs, images) for a post-mortem.
    if !matches!(outcome, CaseOutcome::Failed(_)) && !cfg.keep {
        let _ = fs::remove_dir_all(&dir);
    }
    outcome
}

impl Drop for Run<'_> {
    /// Cleans up even when a case panics (cleanup is idempotent).
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Run<'_> {
    fn drive(&mut self) -> R<()> {
        match self.spec.mode {
            Mode::Cycle => self.cycle(),
            Mode::Traced => self.traced(),
            Mode::Refused => self.refused(),
            Mode::NoSuchPid => self.no_such_pid(),
            Mode::PidInUse => self.pid_in_use(),
            Mode::LeaveRunning => self.leave_running(),
            Mode::StopAfterDump => self.stop_after_dump(),
            Mode::Detached => self.detached(),
            Mode::CheckCommand => self.check_command(),
            Mode::ShowImage => self.show_image(),
            Mode::CorruptImage => self.corrupt_image(),
            Mode::FileChanged => self.file_changed(),
            Mode::FileSaved => self.file_saved(),
            Mode::FileExtra => self.file_extra(),
            Mode::Relocate => self.relocate(),
            Mode::Pidns => self.pidns(),
            Mode::ContinueRestart => self.leave_running_with(true),
            Mode::SelfCheckpoint => self.self_checkpoint(),
            Mode::MpiJob => self.mpi_job(),
            Mode::TcpExternal => self.tcp_external(),
        }
    }

    fn timeout(&self) -> Duration {
        case_timeout(self.cfg, self.spec)
    }

    /// How long a restored view may take to appear: longer under slow (TCG) guests.
    fn view_wait(&self) -> Duration {
        VIEW_WAIT.max(self.timeout() / 3)
    }

    fn death_wait(&self) -> Duration {
        DEATH_WAIT.max(self.timeout() / 6)
    }

    fn time_left(&self) -> R<()> {
        if Instant::now() > self.deadline {
            fail!("case timed out after {:?}", self.timeout());
        }
        Ok(())
    }

    fn file(&self, name: &str) -> R<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .map_err(|e| Stop::Failed(format!("cannot open {name} in {}: {e}", self.dir.display())))
    }

    /// Starts the workload in a session of its own and waits for `ready`.
    fn start_workload(&mut self) -> R<i32> {
        let w = self.spec.workload.clone().expect("checked by cases::parse");
        let bin = self.cfg.workload_dir.join(&w);
        let mut cmd = Command::new(&bin);
        cmd.arg("--ctl").arg(&self.ctl).args(&self.spec.args);
        cmd.stdin(Stdio::null()).stderr(self.file("wl.err")?);
        if self.spec.stdout_pipe {
            let (pipe, name) = self.stdout_pipe()?;
            cmd.stdout(pipe);
            self.stdio_workload = view::Stdio([None, Some(name), None]);
        } else {
            cmd.stdout(self.file("wl.out")?);
        }
        cmd.current_dir(&self.ctl);
        // Workloads that request their own checkpoint run this crest.
        cmd.env("CREST_BIN", &self.cfg.crest_bin);
        in_own_session(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| Stop::Failed(format!("cannot start {}: {e}", bin.display())))?;
        let pid = child.id() as i32;
        self.sid = Some(pid);
        self.workload = Some(child);
        if let Some(st) = view::read_stat(pid) {
            self.known.push((pid, st.starttime));
        }
        let ready = self.wait_ready(&self.ctl.clone(), "workload")?;
        if ready != pid {
            fail!("workload wrote pid {ready} to ready, but its pid is {pid}");
        }
        Ok(pid)
    }

    /// A pipe for the workload's stdout, and its name as an fd link shows it;
    /// a thread copies what comes out of it to wl.out until every write end
    /// is closed (the workload died).
    fn stdout_pipe(&self) -> R<(Stdio, String)> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = [0; 2];
        // SAFETY: fds is valid for two ints; both ends are close-on-exec and
        // the child gets the write end as its stdout (dup2 clears the flag).
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            fail!("pipe2: {}", std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these two fds, owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut out = self.file("wl.out")?;
        let r = File::from(r);
        let name = {
            use std::os::unix::fs::MetadataExt;
            let ino = r
                .metadata()
                .map_err(|e| Stop::Failed(format!("fstat of the stdout pipe: {e}")))?
                .ino();
            format!("pipe:[{ino}]")
        };
        std::thread::spawn(move || {
            let mut r = r;
            let _ = std::io::copy(&mut r, &mut out);
        });
        Ok((Stdio::from(w), name))
    }

    fn wait_ready(&mut self, ctl: &Path, who: &str) -> R<i32> {
        let path = ctl.join(READY);
        loop {
            if let Ok(text) = fs::read_to_string(&path) {
                if let Ok(pid) = text.trim().parse() {
                    return Ok(pid);
                }
            }
            if let Some(c) = self.workload.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    fail!("{who} exited ({}) before it was ready", describe_status(st));
                }
            }
            if Instant::now() > self.deadline {
                fail!(
                    "{who} not ready before the case timeout ({} missing)",
                    path.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn view(&mut self, pid: i32, parent: Parent) -> Result<Vec<String>, String> {
        let tree = self.spec.scope != Scope::Pid;
        // A session scope also shows the session's processes that are not the
        // root's descendants (orphans).
        // The session is the one the workload made (its pid), never the one
        // the root happens to be in: a half-restored root may still sit in the
        // restorer's session, which is the harness's own.
        let others: Vec<i32> = if matches!(self.spec.scope, Scope::Session | Scope::Pgid) {
            let sid = self.sid.unwrap_or(pid);
            session_members(sid)
                .into_iter()
                .filter(|&p| p != pid && !is_descendant(p, pid))
                .collect()
        } else {
            Vec::new()
        };
        // The harness's own children hold what it gave the workload; anything
        // else was restored and holds what it gave the restorer.
        let me = std::process::id() as i32;
        let stdio = match parent {
            Parent::Expect(p) if p == me => &self.stdio_workload,
            _ => &self.stdio_restorer,
        };
        let mut v = view::capture_with(pid, &others, parent, tree, &self.dir, stdio)?;
        if self.mask_session {
            v = view::mask_session(v, pid);
        }
        let protected = ancestors_and_self();
        for p in view::pids_of(&v)
            .into_iter()
            .filter(|p| !protected.contains(p))
        {
            if let Some(st) = view::read_stat(p) {
                if !self.known.contains(&(p, st.starttime)) {
                    self.known.push((p, st.starttime));
                }
            }
        }
        Ok(v)
    }

    /// The view now, also written to `view-before.txt` for a post-mortem.
    fn view_now(&mut self, pid: i32, parent: Parent) -> R<Vec<String>> {
        let v = self
            .view(pid, parent)
            .map_err(|e| Stop::Failed(format!("cannot read the outside view: {e}")))?;
        let _ = fs::write(self.dir.join("view-before.txt"), v.join("\n") + "\n");
        Ok(v)
    }

    /// Polls until the view of `pid` equals `before`. While a restore runs its
    /// child may show up before it is complete, hence polling; the restorer
    /// exiting first ends the wait.
    fn wait_view(&mut self, pid: i32, before: &[String], parent: Parent, what: &str) -> R<()> {
        let limit = self.view_wait();
        self.wait_view_for(pid, before, parent, what, limit)
    }

    fn wait_view_for(
        &mut self,
        pid: i32,
        before: &[String],
        parent: Parent,
        what: &str,
        limit: Duration,
    ) -> R<()> {
        let until = (Instant::now() + limit).min(self.deadline);
        let mut last;
        loop {
            if let Some(st) = self.restore_exited() {
                self.restore_status = Some(st);
                let msg = engine_message(&self.restore_log());
                if st.success() {
                    fail!(
                        "crest restore exited 0 before the restored process showed its view: {msg}"
                    );
                }
                return Err(restore_failure("restore", st, &msg));
            }
            last = self.view(pid, parent);
            if let Ok(v) = &last {
                if view::diff(before, v).is_empty() {
                    return Ok(());
                }
            }
            if Instant::now() > until {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match last {
            Ok(v) => fail!(
                "{what}: the outside view differs (- before, + after):\n{}",
                view::diff(before, &v).join("\n")
            ),
            Err(e) => fail!("{what}: {e}"),
        }
    }

    /// Runs crest with `-v` and waits for it (bounded by the case deadline);
    /// stdout and stderr go to NAME.out and NAME.log in the case dir.
    fn crest(&mut self, name: &str, args: &[OsString]) -> R<Exit> {
        let out = self.dir.join(format!("{name}.out"));
        let log = self.dir.join(format!("{name}.log"));
        if args.first().is_some_and(|a| a == "restore") {
            self.note_restorer_stdio(name);
        }
        let mut child = command(&self.cfg.crest_bin)
            .arg("-v")
            .args(args)
            .stdin(Stdio::null())
            .stdout(
                File::create(&out).map_err(|e| Stop::Failed(format!("{}: {e}", out.display())))?,
            )
            .stderr(
                File::create(&log).map_err(|e| Stop::Failed(format!("{}: {e}", log.display())))?,
            )
            .spawn()
            .map_err(|e| {
                Stop::Failed(format!("cannot run {}: {e}", self.cfg.crest_bin.display()))
            })?;
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st;
            }
            if Instant::now() > self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                fail!(
                    "crest {} did not finish before the case timeout",
                    args.first()
                        .map(|a| a.to_string_lossy())
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(POLL);
        };
        Ok(Exit {
            status,
            stdout: fs::read_to_string(&out).unwrap_or_default(),
            stderr: fs::read_to_string(&log).unwrap_or_default(),
        })
    }

    /// Exit 0 → Ok; exit 3 → ignored with the engine's reason; anything else fails.
    fn expect_success(&self, what: &str, e: &Exit) -> R<()> {
        match e.code() {
            Some(0) => Ok(()),
            // An "unsupported" refusal is only honest when it says what is
            // unsupported (OPS-ERRORS): one `crest: error:` line.
            Some(EXIT_UNSUPPORTED) if e.stderr.contains("crest: error:") => {
                Err(Stop::Ignored(format!("{what} refused: {}", e.message())))
            }
            Some(EXIT_UNSUPPORTED) => fail!(
                "crest {what} exited 3 (unsupported) without a `crest: error: …` line naming the resource: {}",
                e.message()
            ),
            _ => fail!("crest {what} failed ({}): {}", e.describe(), e.message()),
        }
    }

    /// A restore of an image a dump wrote: exit 0, else a failure (a refusal too).
    fn expect_restored(&self, what: &str, e: &Exit) -> R<()> {
        if e.code() == Some(0) {
            return Ok(());
        }
        Err(restore_failure(what, e.status, &e.message()))
    }

    /// A refusal must be a non-zero exit (not a panic or a signal) with a
    /// `crest: error:` line on stderr.
    fn expect_clear_error(&self, what: &str, e: &Exit) -> R<String> {
        match e.code() {
            Some(0) => fail!("crest {what} succeeded but should have been refused"),
            Some(EXIT_PANIC) => fail!("crest {what} panicked: {}", e.message()),
            None => fail!("crest {what} died: {}", e.describe()),
            Some(_) => {}
        }
        let Some(line) = e.stderr.lines().find(|l| l.starts_with("crest: error:")) else {
            fail!(
                "crest {what} refused ({}) without a `crest: error: …` line on stderr: {}",
                e.describe(),
                e.message()
            );
        };
        Ok(line.to_string())
    }

    /// `crest dump` of `pid` into `img`: `-t` takes the process and its
    /// descendants; a session scope takes the whole session (orphans
    /// included) when the engine can.
    fn dump_args(&self, pid: i32, img: &Path) -> Vec<OsString> {
        let select = match self.spec.scope {
            Scope::Session if self.cfg.session_dump => "--session",
            Scope::Pgid => "--pgid",
            _ => "-t",
        };
        vec![
            "dump".into(),
            select.into(),
            pid.to_string().into(),
            "-D".into(),
            img.into(),
        ]
    }

    fn dump(&mut self, pid: i32, cycle: u32, extra: &[&str]) -> R<PathBuf> {
        let img = self.dir.join(format!("img{cycle}"));
        let mut args = self.dump_args(pid, &img);
        args.extend(self.spec.dump_args.iter().map(OsString::from));
        args.extend(extra.iter().map(OsString::from));
        let probe = if self.spec.observe_pre_copy {
            Some(ProgressProbe::start(pid, self.progress_addr()?))
        } else {
            None
        };
        let t0 = Instant::now();
        let e = self.crest(&format!("dump{cycle}"), &args)?;
        let took = t0.elapsed();
        self.pre_copy_seen = probe
            .map(ProgressProbe::finish)
            .map(|samples| (cycle, took, samples));
        self.expect_success("dump", &e)?;
        if let Some(max) = self.spec.max_image_kib {
            let kib = dir_size(&img) / 1024;
            if kib > max {
                fail!("the image is {kib} KiB, more than the {max} KiB this case allows");
            }
        }
        Ok(img)
    }

    /// For a case that observes `--pre-copy` ([`CaseSpec::observe_pre_copy`]),
    /// after a dump that succeeded: the target must have run and had its
    /// writes tracked meanwhile (see [`PRE_COPY_MIN_FAULTS`]). Checked apart
    /// from the dump itself, so a failure here is not taken for a refused
    /// dump that should have left the target as it was.
    fn check_pre_copy(&mut self) -> R<()> {
        let Some((cycle, took, samples)) = self.pre_copy_seen.take() else {
            return Ok(());
        };
        let (writes, faults) = writes_and_faults(&samples);
        let (frozen, _) = longest_stall(&samples, took);
        self.notes.push(format!(
            "cycle {cycle}: during the {} ms dump the target made {writes} writes and took {faults} page faults; frozen for at most {} ms at a stretch",
            took.as_millis(),
            frozen.as_millis()
        ));
        if writes < PRE_COPY_MIN_WRITES || faults < PRE_COPY_MIN_FAULTS {
            fail!(
                "cycle {cycle}: during the dump the target made {writes} writes and took {faults} page faults: its writes were not tracked while it ran, so no pre-copy round ran (a pre-copy write-protects what it copied, and the first write to each page after that faults; at least {PRE_COPY_MIN_WRITES} writes and {PRE_COPY_MIN_FAULTS} faults expected, {} samples)",
                samples.len()
            );
        }
        Ok(())
    }

    /// Where the workload's progress counter is (`ctl/progress-addr`, hex).
    fn progress_addr(&self) -> R<u64> {
        let path = self.ctl.join("progress-addr");
        fs::read_to_string(&path)
            .ok()
            .and_then(|t| u64::from_str_radix(t.trim(), 16).ok())
            .ok_or_else(|| {
                Stop::Failed(format!(
                    "the workload wrote no counter address to {}",
                    path.display()
                ))
            })
    }

    /// A `crest restore` run as NAME starts: the first one rebinds the
    /// workload's stdio channels to its own (NAME.out, NAME.log in the case
    /// dir; /dev/null for stdin), which later restores keep as files.
    fn note_restorer_stdio(&mut self, name: &str) {
        if self.stdio_restorer != view::Stdio::default() {
            return;
        }
        let own = [
            "/dev/null".to_string(),
            format!("$CASE/{name}.out"),
            format!("$CASE/{name}.log"),
        ];
        let mut ch = view::Stdio::default();
        for (n, c) in self.stdio_workload.0.iter().enumerate() {
            if c.is_some() {
                ch.0[n] = Some(own[n].clone());
            }
        }
        self.stdio_restorer = ch;
    }

    /// Waits for the workload (our child) to die after a dump that kills it,
    /// which also frees its pid for the restore.
    fn reap_workload(&mut self, pid: i32) -> R<()> {
        let Some(mut c) = self.workload.take() else {
            return Ok(());
        };
        let death_wait = self.death_wait();
        let until = Instant::now() + death_wait;
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                return Ok(());
            }
            if Instant::now() > until {
                self.workload = Some(c);
                fail!("crest dump succeeded but pid {pid} is still alive {death_wait:?} later (the dump should kill it)");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for what the dump of `cycle` killed: the workload at the first
    /// cycle, later the restored `what` (process or job), whose parent, the
    /// previous `crest restore`, then reports 128+SIGKILL.
    fn reap_dumped(&mut self, pid: i32, cycle: u32, what: &str) -> R<()> {
        if cycle == 1 {
            return self.reap_workload(pid);
        }
        let st = self.wait_restore(Some(self.death_wait()))?;
        if shell_status(st) != 128 + libc::SIGKILL {
            fail!("cycle {cycle}: the previous crest restore ended with {} (expected 137: its {what} was killed by the dump)", describe_status(st));
        }
        Ok(())
    }

    /// Waits for the background `crest restore` to exit and returns its status.
    fn wait_restore(&mut self, limit: Option<Duration>) -> R<ExitStatus> {
        let Some(mut r) = self.restore.take() else {
            if let Some(st) = self.restore_status.take() {
                return Ok(st);
            }
            fail!("no crest restore is running");
        };
        let until = limit
            .map(|l| (Instant::now() + l).min(self.deadline))
            .unwrap_or(self.deadline);
        loop {
            if let Ok(Some(st)) = r.try_wait() {
                return Ok(st);
            }
            if Instant::now() > until {
                self.restore = Some(r);
                fail!("crest restore (the restored process's parent) did not exit in time");
            }
            std::thread::sleep(POLL);
        }
    }

    /// The background `crest restore`'s status if it has exited, which also
    /// forgets it (it is reaped).
    fn restore_exited(&mut self) -> Option<ExitStatus> {
        let st = self.restore.as_mut()?.try_wait().ok()??;
        self.restore = None;
        Some(st)
    }

    /// What the last background `crest restore` wrote to its stderr.
    fn restore_log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("restore{}.log", self.crest_runs)))
            .unwrap_or_default()
    }

    /// How the last background `crest restore` ended, as if run in the foreground.
    fn restore_exit(&self, status: ExitStatus) -> Exit {
        Exit {
            status,
            stdout: String::new(),
            stderr: self.restore_log(),
        }
    }

    fn spawn_restore(&mut self, img: &Path) -> R<i32> {
        self.spawn_restore_with(img, &[])
    }

    fn spawn_restore_with(&mut self, img: &Path, extra: &[&str]) -> R<i32> {
        self.crest_runs += 1;
        let n = self.crest_runs;
        self.restore_status = None;
        self.note_restorer_stdio(&format!("restore{n}"));
        let child = command(&self.cfg.crest_bin)
            .arg("-v")
            .arg("restore")
            .arg("--pidfile")
            .arg(self.dir.join(format!("restore{n}.pid")))
            .arg("-D")
            .arg(img)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(self.file(&format!("restore{n}.out"))?)
            .stderr(self.file(&format!("restore{n}.log"))?)
            .spawn()
            .map_err(|e| Stop::Failed(format!("cannot run crest restore: {e}")))?;
        let pid = child.id() as i32;
        self.restore = Some(child);
        Ok(pid)
    }

    fn go(&self, ctl: &Path) -> R<()> {
        File::create(ctl.join(GO))
            .map(|_| ())
            .map_err(|e| Stop::Failed(format!("cannot create go: {e}")))
    }

    fn result(&self, ctl: &Path) -> String {
        fs::read_to_string(ctl.join(RESULT)).unwrap_or_else(|_| "(no result file)".into())
    }

    fn expect_ok(&self, ctl: &Path, who: &str) -> R<()> {
        let r = self.result(ctl);
        if r.trim() != "ok" {
            fail!("{who} found differences after restore:\n{}", r.trim_end());
        }
        Ok(())
    }

    /// Waits for our own (not dumped) workload to exit after `go` and checks its verdict.
    fn finish_original(&mut self) -> R<()> {
        self.go(&self.ctl.clone())?;
        let Some(mut c) = self.workload.take() else {
            fail!("the workload is not ours to wait for");
        };
        let st = loop {
            if let Ok(Some(st)) = c.try_wait() {
                break st;
            }
            if Instant::now() > self.deadline {
                self.workload = Some(c);
                fail!("the workload did not finish after go");
            }
            std::thread::sleep(POLL);
        };
        self.expect_ok(&self.ctl.clone(), "the workload")?;
        if st.code() != Some(0) {
            fail!("the workload ended with {}", describe_status(st));
        }
        Ok(())
    }

    /// The end of a restored run: `go`, then the restorer, which passes its
    /// process's exit status on, must exit with the case's `expect_exit` and
    /// the restored workload must report ok.
    fn finish_restored(&mut self) -> R<()> {
        let expected = self.spec.expect_exit;
        self.finish_restored_with(expected, |status, _| {
            format!("crest restore exited with {status} (expected {expected})")
        })
    }

    /// [`Self::finish_restored`] expecting exit status `expected`; a wrong one
    /// fails with `complaint(status, the workload's result)`.
    fn finish_restored_with(
        &mut self,
        expected: i32,
        complaint: impl FnOnce(String, &str) -> String,
    ) -> R<()> {
        self.go(&self.ctl.clone())?;
        let st = self.wait_restore(None)?;
        if shell_status(st) != expected {
            let result = self.result(&self.ctl.clone());
            return Err(Stop::Failed(complaint(
                describe_status(st),
                result.trim_end(),
            )));
        }
        self.expect_ok(&self.ctl.clone(), "the restored workload")
    }

    /// Starts the workload of a mode that restores it under a new parent and
    /// compares its view (with a pid scope, session masked): its pid and its
    /// view before the dump.
    fn start_to_restore(&mut self) -> R<(i32, Vec<String>)> {
        let me = std::process::id() as i32;
        let pid = self.start_workload()?;
        self.mask_session = self.spec.scope == Scope::Pid;
        let before = self.view_now(pid, Parent::Expect(me))?;
        Ok((pid, before))
    }

    // ---- modes -------------------------------------------------------------

    fn cycle(&mut self) -> R<()> {
        if self.spec.volatile_view {
            return self.cycle_frozen();
        }
        let me = std::process::id() as i32;
        let pid = self.start_workload()?;
        self.mask_session = self.spec.scope == Scope::Pid;
        let before = self.view_now(pid, Parent::Expect(me))?;
        for cycle in 1..=self.cfg.cycles {
            self.time_left()?;
            let img = match self.dump(pid, cycle, &[]) {
                Ok(img) => img,
                Err(stop) if cycle == 1 => return Err(self.check_rolled_back(pid, &before, stop)),
                Err(stop) => return Err(later_dump_refused(cycle, stop)),
            };
            self.check_pre_copy()?;
            self.reap_dumped(pid, cycle, "process")?;
            let rpid = self.spawn_restore(&img)?;
            self.wait_view(
                pid,
                &before,
                Parent::Expect(rpid),
                &format!("cycle {cycle}"),
            )?;
        }
        self.finish_cycles()
    }

    /// [`Self::cycle`] for a workload that keeps changing while it is dumped
    /// (forking, spawning threads): no view taken before the dump is what
    /// the dump sees, so the view compared is of what the dump froze. `dump
    /// --stop` leaves the tree stopped exactly as dumped; that view is taken,
    /// the tree killed, the image restored with `restore --stop`, and the
    /// restored tree must show the same view; then every process is
    /// continued and the workload checks itself.
    fn cycle_frozen(&mut self) -> R<()> {
        let me = std::process::id() as i32;
        let pid = self.start_workload()?;
        self.mask_session = self.spec.scope == Scope::Pid;
        let mut holder = me;
        for cycle in 1..=self.cfg.cycles {
            self.time_left()?;
            let img = match self.dump(pid, cycle, &["--stop"]) {
                Ok(img) => img,
                Err(stop) if cycle == 1 => return Err(self.check_left_running(pid, stop)),
                Err(stop) => return Err(later_dump_refused(cycle, stop)),
            };
            let frozen = self.view_now(pid, Parent::Expect(holder))?;
            let pids = view::pids_of(&frozen);
            if !frozen
                .iter()
                .any(|l| l.starts_with(&format!("pid {pid}: comm ")) && l.ends_with(" stopped"))
            {
                fail!(
                    "cycle {cycle}: dump --stop did not leave pid {pid} stopped:\n{}",
                    frozen.join("\n")
                );
            }
            for &p in &pids {
                // SAFETY: kill has no memory effects; p is in the tree the
                // dump froze (seen with its start time in `known`).
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            self.reap_dumped(pid, cycle, "process")?;
            let rpid = self.spawn_restore_with(&img, &["--stop"])?;
            self.wait_view(
                pid,
                &frozen,
                Parent::Expect(rpid),
                &format!("cycle {cycle}, the restored tree (restore --stop) against the tree the dump froze (dump --stop)"),
            )?;
            for &p in &pids {
                // SAFETY: as above; p is a restored process of the tree.
                unsafe { libc::kill(p, libc::SIGCONT) };
            }
            holder = rpid;
        }
        self.finish_cycles()
    }

    /// After a refused dump of a workload whose view changes on its own:
    /// it must at least run on, neither stopped nor traced.
    fn check_left_running(&mut self, pid: i32, stop: Stop) -> Stop {
        let st = view::read_stat(pid).map(|s| s.state);
        let tracer = tracer_pid(pid);
        if matches!(st, Some('T' | 't')) || tracer != Some(0) {
            let why = match stop {
                Stop::Failed(f) | Stop::Ignored(f) => f,
            };
            return Stop::Failed(format!(
                "{why}\nand it did not leave the target running: state {st:?}, TracerPid {tracer:?}"
            ));
        }
        stop
    }

    /// The end of [`Self::cycle`]: the restored workload finishes, and a
    /// stdout pipe's output went where it should.
    fn finish_cycles(&mut self) -> R<()> {
        let expected = self.spec.expect_exit;
        self.finish_restored_with(expected, |status, result| {
            format!("crest restore exited with {status} (expected {expected}); the workload's result:\n{result}")
        })?;
        if self.spec.stdout_pipe {
            let before = fs::read_to_string(self.dir.join("wl.out")).unwrap_or_default();
            // Rebound at the first restore to that restorer's stdout (a file in
            // the case dir), which later cycles carry over as a regular file.
            let after: String = (1..=self.crest_runs)
                .map(|n| {
                    fs::read_to_string(self.dir.join(format!("restore{n}.out"))).unwrap_or_default()
                })
                .collect();
            if !before.contains("before the dump") {
                fail!("the harness did not read the workload's output from its stdout pipe: {before:?}");
            }
            if !after.contains("after the restore") {
                fail!("the restored workload's stdout did not reach crest restore's stdout: {after:?}");
            }
        }
        Ok(())
    }

    fn traced(&mut self) -> R<()> {
        let me = std::process::id() as i32;
        let pid = self.start_workload()?;
        let tctl = self.dir.join("tracer-ctl");
        fs::create_dir_all(&tctl).map_err(|e| Stop::Failed(format!("{e}")))?;
        let tracer = command(&self.cfg.workload_dir.join("wl-tracer"))
            .arg("--ctl")
            .arg(&tctl)
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(self.file("tracer.out")?)
            .stderr(self.file("tracer.err")?)
            .spawn()
            .map_err(|e| Stop::Failed(format!("cannot start wl-tracer: {e}")))?;
        self.helpers.push(tracer);
        self.wait_ready(&tctl, "wl-tracer")?;
        let before = self.view_now(pid, Parent::Expect(me))?;
        if !before
            .iter()
            .any(|l| l.contains(" TracerPid ") && !l.ends_with(" TracerPid 0"))
        {
            fail!("wl-tracer did not attach to pid {pid}");
        }
        let img = self.dir.join("img1");
        let args = self.dump_args(pid, &img);
        let e = self.crest("dump1", &args)?;
        if e.code() == Some(0) {
            fail!("crest dump accepted a process another process traces");
        }
        let line = self.expect_clear_error("dump of a traced process", &e)?;
        // The refusal must be for the right reason, not some other unsupported resource.
        if !line.to_lowercase().contains("trac") {
            fail!("the refusal does not say the process is traced: {line}");
        }
        self.wait_unchanged(pid, &before, Parent::Expect(me), "after the refused dump")?;
        self.go(&tctl)?;
        let mut t = self.helpers.pop().expect("pushed above");
        let st = t.wait().map_err(|e| Stop::Failed(format!("{e}")))?;
        if st.code() != Some(0) {
            fail!(
                "wl-tracer failed ({}): {}",
                describe_status(st),
                self.result(&tctl).trim_end()
            );
        }
        self.finish_original()
    }

    fn refused(&mut self) -> R<()> {
        let me = std::process::id() as i32;
        let pid = self.start_workload()?;
        let before = self.view_now(pid, Parent::Expect(me))?;
        let img = self.dir.join("img1");
        let args = self.dump_args(pid, &img);
        let e = self.crest("dump1", &args)?;
        let line = self.expect_clear_error("dump", &e)?;
        if let Some(word) = &self.spec.refusal_mentions {
            if !line.to_lowercase().contains(&word.to_lowercase()) {
                fail!("the refusal does not mention {word:?}: {line}");
            }
        }
        self.wait_view_for(
            pid,
            &before,
            Parent::Expect(me),
            "after the refused dump",
            Duration::from_secs(3),
        )?;
        self.finish_original()
    }

    /// A first dump of our own workload; on refusal or failure, also checks the
    /// target was left as it was.
    fn dump_or_rollback(&mut self, pid: i32, extra: &[&str], before: &[String]) -> R<PathBuf> {
        match self.dump(pid, 1, extra) {
            Ok(img) => Ok(img),
            Err(stop) => Err(self.check_rolled_back(pid, before, stop)),
        }
    }

    /// After a refused or failed dump the target must be running exactly as
    /// before: not stopped, not traced, nothing changed. A refusal that breaks
    /// this turns into a failure.
    fn check_rolled_back(&mut self, pid: i32, before: &[String], stop: Stop) -> Stop {
        let me = std::process::id() as i32;
        let what = "the target after the refused dump";
        match self.wait_view_for(
            pid,
            before,
            Parent::Expect(me),
            what,
            Duration::from_secs(3),
        ) {
            Ok(()) => stop,
            Err(Stop::Failed(m)) | Err(Stop::Ignored(m)) => {
                let why = match stop {
                    Stop::Failed(f) => f,
                    Stop::Ignored(i) => i,
                };
                Stop::Failed(format!(
                    "{why}\nand it did not leave the target as it was: {m}"
                ))
            }
        }
    }

    /// The view must stay as it was (a refused or non-destructive command ran).
    fn wait_unchanged(&mut self, pid: i32, before: &[String], parent: Parent, what: &str) -> R<()> {
        self.wait_view(pid, before, parent, what)
    }

    fn no_such_pid(&mut self) -> R<()> {
        let max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(32768);
        let Some(pid) = (2..max)
            .rev()
            .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        else {
            return Err(Stop::Ignored("no free pid to name".into()));
        };
        let img = self.dir.join("img1");
        let args = self.dump_args(pid, &img);
        let e = self.crest("dump1", &args)?;
        let line = self.expect_clear_error("dump of a nonexistent pid", &e)?;
        if e.code() != Some(1) {
            fail!("crest dump of nonexistent pid {pid} exited {} (expected 1: an error, not \"unsupported\"): {line}", e.describe());
        }
        if !line.contains(&pid.to_string()) {
            fail!("the error does not name pid {pid}: {line}");
        }
        Ok(())
    }

    /// Starts the workload and dumps it with `--leave-running`, after which
    /// it must run on unchanged: its pid, its view before the dump, the image.
    fn start_and_dump_leaving_running(&mut self) -> R<(i32, Vec<String>, PathBuf)> {
        let me = std::process::id() as i32;
        let pid = self.start_workload()?;
        let before = self.view_now(pid, Parent::Expect(me))?;
        let img = self.dump_or_rollback(pid, &["--leave-running"], &before)?;
        self.check_pre_copy()?;
        self.wait_unchanged(
            pid,
            &before,
            Parent::Expect(me),
            "after dump --leave-running",
        )?;
        Ok((pid, before, img))
    }

    fn pid_in_use(&mut self) -> R<()> {
        let me = std::process::id() as i32;
        let (pid, before, img) = self.start_and_dump_leaving_running()?;
        let e = self.crest("restore1", &["restore".into(), "-D".into(), img.into()])?;
        if e.code() == Some(EXIT_UNSUPPORTED) {
            fail!(
                "crest restore onto a pid in use refused the image as unsupported (exit 3) instead of naming the pid in use: {}",
                e.message()
            );
        }
        let line = self.expect_clear_error("restore onto a pid in use", &e)?;
        if !line.contains(&pid.to_string()) {
            fail!("the error does not name pid {pid}: {line}");
        }
        self.wait_unchanged(
            pid,
            &before,
            Parent::Expect(me),
            "the original after the refused restore",
        )?;
        self.finish_original()
    }

    fn leave_running(&mut self) -> R<()> {
        self.leave_running_with(false)
    }

    /// The workload's `outcome` file must hold `want` (continue-restart and
    /// self-checkpoint modes: what libcrest told its callbacks).
    fn expect_outcome(&self, want: &str, who: &str) -> R<()> {
        let got = fs::read_to_string(self.ctl.join("outcome"))
            .unwrap_or_else(|_| "(no outcome file)".into());
        if got.trim() != want {
            fail!(
                "{who}: its checkpoint callbacks were told {:?}, expected {want:?}",
                got.trim()
            );
        }
        Ok(())
    }

    fn clear_protocol_files(&self) {
        for f in [GO, RESULT, READY, "outcome"] {
            let _ = fs::remove_file(self.ctl.join(f));
        }
    }

    fn self_checkpoint(&mut self) -> R<()> {
        let pid = self.start_workload()?;
        let img = self.ctl.join("self-img");
        if !img.join("meta.crest").is_file() {
            fail!(
                "the workload did not checkpoint itself: no image at {}",
                img.display()
            );
        }
        self.finish_original()?;
        self.expect_outcome("continued", "the original workload")?;
        self.clear_protocol_files();
        self.spawn_restore(&img)?;
        let ready = self.ctl.join(READY);
        loop {
            if fs::read_to_string(&ready).is_ok_and(|t| t.trim() == pid.to_string()) {
                break;
            }
            if let Some(st) = self.restore_exited() {
                let msg = engine_message(&self.restore_log());
                fail!("crest restore of the self-made image ended ({}) before the process was ready: {msg}", describe_status(st));
            }
            self.time_left()?;
            std::thread::sleep(POLL);
        }
        self.finish_restored_with(0, |status, result| {
            format!("crest restore exited with {status}: {result}")
        })?;
        self.expect_outcome("restarted", "the restored workload")
    }

    fn leave_running_with(&mut self, outcomes: bool) -> R<()> {
        let (pid, before, img) = self.start_and_dump_leaving_running()?;
        // The original must still work...
        self.finish_original()?;
        if outcomes {
            self.expect_outcome("continued", "the original workload")?;
            let _ = fs::remove_file(self.ctl.join("outcome"));
        }
        let _ = fs::remove_file(self.ctl.join(GO));
        let _ = fs::remove_file(self.ctl.join(RESULT));
        // ...and so must its image, which was taken before `go`.
        self.mask_session = self.spec.scope == Scope::Pid;
        let before: Vec<String> = if self.mask_session {
            view::mask_session(before, pid)
        } else {
            before
        };
        let rpid = self.spawn_restore(&img)?;
        self.wait_view(
            pid,
            &before,
            Parent::Expect(rpid),
            "restored from a leave-running dump",
        )?;
        self.finish_restored_with(0, |status, result| {
            format!("crest restore exited with {status}: {result}")
        })?;
        if outcomes {
            self.expect_outcome("restarted", "the restored workload")?;
        }
        Ok(())
    }

    fn stop_after_dump(&mut self) -> R<()> {
        let me = std::process::id() as i32;
        let pid = self.start_workload()?;
        let before = self.view_now(pid, Parent::Expect(me))?;
        self.dump_or_rollback(pid, &["--stop"], &before)?;
        let stopped: Vec<String> = before
            .iter()
            .map(|l| l.replace(" running", " stopped"))
            .collect();
        self.wait_view(
            pid,
            &stopped,
            Parent::Expect(me),
            "after dump --stop (expected stopped, untraced)",
        )?;
        // SAFETY: kill has no memory effects; pid is our own child, still unreaped.
        if unsafe { libc::kill(pid, libc::SIGCONT) } != 0 {
            fail!("SIGCONT to {pid}: {}", std::io::Error::last_os_error());
        }
        self.wait_unchanged(pid, &before, Parent::Expect(me), "after SIGCONT")?;
        self.finish_original()
    }

    fn detached(&mut self) -> R<()> {
        let (pid, before) = self.start_to_restore()?;
        let before: Vec<String> = before
            .into_iter()
            .map(|l| l.replace(" ppid <parent>", " ppid <any>"))
            .collect();
        let img = self.dump(pid, 1, &[])?;
        self.reap_workload(pid)?;
        let e = self.crest(
            "restore1",
            &["restore".into(), "-d".into(), "-D".into(), img.into()],
        )?;
        self.expect_restored("restore --detach", &e)?;
        self.wait_view(pid, &before, Parent::Any, "restored detached")?;
        self.finish_detached("the detached workload")
    }

    /// The end of a detached restore: `go`, then, with no restorer to wait
    /// for, wait for the workload's result, which must be ok.
    fn finish_detached(&mut self, who: &str) -> R<()> {
        self.go(&self.ctl.clone())?;
        let result = self.ctl.join(RESULT);
        while !result.exists() {
            self.time_left()?;
            std::thread::sleep(POLL);
        }
        self.expect_ok(&self.ctl.clone(), who)
    }

    fn pidns(&mut self) -> R<()> {
        let pid = self.start_workload()?;
        let img = self.dump(pid, 1, &["--stop"])?;
        let pidfile = self.dir.join("restored.pid");
        let e = self.crest(
            "restore1",
            &[
                "restore".into(),
                "-d".into(),
                "--pidns".into(),
                "--pidfile".into(),
                pidfile.clone().into(),
                "-D".into(),
                img.into(),
            ],
        )?;
        self.expect_restored("restore --pidns --detach", &e)?;
        let outside: i32 = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| Stop::Failed(format!("no pid in {}", pidfile.display())))?;
        let Some(st) = view::read_stat(outside) else {
            fail!("the restored process {outside} (from --pidfile) does not exist");
        };
        self.known.push((outside, st.starttime));
        if let Some(init) = view::read_stat(st.ppid) {
            self.known.push((st.ppid, init.starttime));
        }
        let nspid = |p: i32| -> Vec<String> {
            fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .map(|v| v.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        if nspid(outside) != [outside.to_string(), pid.to_string()] {
            fail!(
                "restored process {outside}: NSpid {:?}, expected [{outside}, {pid}] (its original pid inside a new namespace)",
                nspid(outside)
            );
        }
        if nspid(st.ppid).last().map(String::as_str) != Some("1") {
            fail!(
                "the restored process's parent {} is not its namespace's init (NSpid {:?})",
                st.ppid,
                nspid(st.ppid)
            );
        }
        if view::read_stat(pid).map(|s| s.state) != Some('T') {
            fail!("the original {pid} is no longer stopped (it holds the pid the restore could not take)");
        }
        self.finish_detached("the workload restored in a new PID namespace")
    }

    fn check_command(&mut self) -> R<()> {
        let e = self.crest("check", &["check".into()])?;
        self.expect_success("check", &e)?;
        if e.stdout.trim().is_empty() {
            fail!("crest check printed nothing");
        }
        let e = self.crest("check-json", &["check".into(), "--json".into()])?;
        self.expect_success("check --json", &e)?;
        serde_json::from_str::<serde_json::Value>(&e.stdout).map_err(|err| {
            Stop::Failed(format!("crest check --json printed invalid JSON: {err}"))
        })?;
        Ok(())
    }

    fn show_image(&mut self) -> R<()> {
        let pid = self.start_workload()?;
        let img = self.dump(pid, 1, &[])?;
        self.reap_workload(pid)?;
        let e = self.crest("show", &["show".into(), img.clone().into()])?;
        self.expect_success("show", &e)?;
        if !e.stdout.contains(&pid.to_string()) {
            fail!("crest show does not mention pid {pid}");
        }
        let e = self.crest("show-json", &["show".into(), img.into(), "--json".into()])?;
        self.expect_success("show --json", &e)?;
        let v: serde_json::Value = serde_json::from_str(&e.stdout).map_err(|err| {
            Stop::Failed(format!("crest show --json printed invalid JSON: {err}"))
        })?;
        if !v.to_string().contains(&pid.to_string()) {
            fail!("crest show --json does not mention pid {pid}");
        }
        Ok(())
    }

    fn corrupt_image(&mut self) -> R<()> {
        let pid = self.start_workload()?;
        let img = self.dump(pid, 1, &[])?;
        self.reap_workload(pid)?;
        let Some(victim) = largest_file(&img) else {
            fail!("the image dir {} holds no file", img.display());
        };
        flip_middle_byte(&victim)
            .map_err(|e| Stop::Failed(format!("cannot corrupt {}: {e}", victim.display())))?;
        let rpid = self.spawn_restore(&img)?;
        let st = match self.wait_restore(Some(Duration::from_secs(30))) {
            Ok(st) => st,
            Err(_) => fail!(
                "crest restore of a corrupted image ({} changed) did not exit; restorer pid {rpid}",
                victim.display()
            ),
        };
        let e = self.restore_exit(st);
        self.expect_clear_error(
            &format!("restore of an image with {} corrupted", victim.display()),
            &e,
        )?;
        if Path::new(&format!("/proc/{pid}")).exists() {
            fail!("a process runs at pid {pid} after a refused restore");
        }
        Ok(())
    }

    fn file_changed(&mut self) -> R<()> {
        let me = std::process::id() as i32;
        let pid = self.start_workload()?;
        let before = self.view_now(pid, Parent::Expect(me))?;
        let img = self.dump_or_rollback(pid, &[], &before)?;
        self.reap_workload(pid)?;
        let data = self.ctl.join("data");
        match self.spec.change {
            Change::Append => {
                let mut f = OpenOptions::new()
                    .append(true)
                    .custom_flags(0)
                    .open(&data)
                    .map_err(|e| Stop::Failed(format!("cannot change {}: {e}", data.display())))?;
                f.write_all(b"changed after the dump\n")
                    .map_err(|e| Stop::Failed(format!("{e}")))?;
            }
            Change::ContentsOnly => change_contents_only(&data).map_err(|e| {
                Stop::Failed(format!(
                    "cannot change {} keeping its inode, size and mtime: {e}",
                    data.display()
                ))
            })?,
        }
        let rpid = self.spawn_restore(&img)?;
        // A correct engine refuses; a wrong one restores, which shows as the view.
        match self.wait_view(pid, &before, Parent::Expect(rpid), "x") {
            Ok(()) => fail!(
                "crest restore accepted an image whose open file {} changed since the dump",
                data.display()
            ),
            Err(Stop::Ignored(m)) => return Err(Stop::Ignored(m)),
            Err(Stop::Failed(_)) => {}
        }
        let st = self.wait_restore(Some(Duration::from_secs(5)))?;
        let e = self.restore_exit(st);
        let line = self.expect_clear_error("restore after a file changed", &e)?;
        if !line.contains("data") {
            fail!(
                "the error does not name the changed file {}: {line}",
                data.display()
            );
        }
        Ok(())
    }

    fn file_saved(&mut self) -> R<()> {
        let (pid, before) = self.start_to_restore()?;
        let img = self.dump_or_rollback(pid, &["--save-files"], &before)?;
        self.reap_workload(pid)?;
        let data = self.ctl.join("data");
        let saved =
            fs::read(&data).map_err(|e| Stop::Failed(format!("{}: {e}", data.display())))?;
        fs::write(&data, vec![b'#'; saved.len() / 2])
            .map_err(|e| Stop::Failed(format!("cannot overwrite {}: {e}", data.display())))?;
        let rpid = self.spawn_restore_with(&img, &["--restore-files=clobber"])?;
        self.wait_view(pid, &before, Parent::Expect(rpid), "restore")?;
        if fs::read(&data).ok().as_ref() != Some(&saved) {
            fail!(
                "{} does not hold its saved contents again after --restore-files=clobber",
                data.display()
            );
        }
        self.finish_restored()
    }

    fn relocate(&mut self) -> R<()> {
        let (pid, before) = self.start_to_restore()?;
        let img = self.dump_or_rollback(pid, &[], &before)?;
        self.reap_workload(pid)?;
        let old = self.ctl.join("data");
        let new = self.ctl.join("data.moved");
        fs::rename(&old, &new)
            .map_err(|e| Stop::Failed(format!("cannot move {}: {e}", old.display())))?;
        let (o, n) = (old.display().to_string(), new.display().to_string());
        let expected: Vec<String> = before
            .iter()
            // Views name the case directory `$CASE`.
            .map(|l| l.replace("-> $CASE/ctl/data ", "-> $CASE/ctl/data.moved "))
            .collect();
        if expected == before {
            fail!("the workload has no descriptor of {o} to relocate");
        }
        let rule = format!("--relocate={o}={n}");
        let rpid = self.spawn_restore_with(&img, &[&rule])?;
        self.wait_view(pid, &expected, Parent::Expect(rpid), "restore")?;
        self.finish_restored()
    }

    fn file_extra(&mut self) -> R<()> {
        let (pid, before) = self.start_to_restore()?;
        let extra = self.ctl.join("extra");
        let contents = format!("named at the dump of {pid}\n").repeat(100);
        fs::write(&extra, &contents)
            .map_err(|e| Stop::Failed(format!("cannot write {}: {e}", extra.display())))?;
        let arg = format!("--include-file={}", extra.display());
        let img = self.dump_or_rollback(pid, &[&arg], &before)?;
        self.reap_workload(pid)?;
        fs::remove_file(&extra)
            .map_err(|e| Stop::Failed(format!("cannot remove {}: {e}", extra.display())))?;
        let rpid = self.spawn_restore(&img)?;
        self.wait_view(pid, &before, Parent::Expect(rpid), "restore")?;
        if fs::read_to_string(&extra).ok().as_deref() != Some(contents.as_str()) {
            fail!("{} was not put back as it was at the dump", extra.display());
        }
        self.finish_restored()
    }

    // ---- the MPI job -------------------------------------------------------

    /// See [`Mode::TcpExternal`].
    fn tcp_external(&mut self) -> R<()> {
        let me = std::process::id() as i32;
        let pctl = self.dir.join("peer");
        fs::create_dir_all(&pctl).map_err(|e| Stop::Failed(format!("{e}")))?;
        // Its own session, not a descendant of the workload: outside the dump.
        let mut cmd = command(&self.cfg.workload_dir.join("wl-sock"));
        cmd.arg("--ctl")
            .arg(&pctl)
            .arg("tcp-peer")
            .stdin(Stdio::null())
            .stdout(self.file("peer.out")?)
            .stderr(self.file("peer.err")?);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let peer = cmd
            .spawn()
            .map_err(|e| Stop::Failed(format!("cannot start the peer (wl-sock tcp-peer): {e}")))?;
        let peer_pid = peer.id() as i32;
        self.helpers.push(peer);
        let port = loop {
            if let Some(p) = fs::read_to_string(pctl.join("port"))
                .ok()
                .filter(|t| t.ends_with('\n'))
            {
                break p;
            }
            self.time_left()?;
            std::thread::sleep(POLL);
        };
        fs::write(self.ctl.join("peer-port"), port)
            .map_err(|e| Stop::Failed(format!("writing ctl/peer-port: {e}")))?;
        let pid = self.start_workload()?;
        self.wait_ready(&pctl, "the peer")?;
        self.mask_session = self.spec.scope == Scope::Pid;
        let before = self.view_now(pid, Parent::Expect(me))?;
        let peer_alive = |run: &mut Self, when: &str| -> R<()> {
            if let Some(Ok(Some(st))) = run.helpers.first_mut().map(|c| c.try_wait()) {
                fail!(
                    "the peer (pid {peer_pid}) exited {when} ({}): {}",
                    describe_status(st),
                    fs::read_to_string(pctl.join(RESULT))
                        .unwrap_or_default()
                        .trim_end()
                );
            }
            Ok(())
        };

        // Without --tcp-established: refused, naming the connection; left running.
        let mut args = self.dump_args(pid, &self.dir.join("img-refused"));
        args.extend(
            self.spec
                .dump_args
                .iter()
                .filter(|a| *a != "--tcp-established")
                .map(OsString::from),
        );
        let e = self.crest("dump-refused", &args)?;
        let line = self.expect_clear_error("dump without --tcp-established", &e)?;
        if !(line.contains("TCP connection 127.0.0.1:") && line.contains("outside the dump")) {
            fail!("the refusal does not name the connection to the peer outside the dump: {line}");
        }
        self.wait_unchanged(pid, &before, Parent::Expect(me), "after the refused dump")?;
        peer_alive(self, "after the refused dump")?;

        std::thread::sleep(Duration::from_millis(300));
        let img = self.dump(pid, 1, &[])?;
        let dumped = Instant::now();
        self.reap_workload(pid)?;
        // The image names its lock (a table of its own: other dumps on the
        // machine may hold theirs meanwhile).
        let show = self.crest(
            "show",
            &["show".into(), img.clone().into(), "--json".into()],
        )?;
        self.expect_success("show", &show)?;
        let table = serde_json::from_str::<serde_json::Value>(&show.stdout)
            .ok()
            .and_then(|v| {
                v["inventory"]["net_lock"]["table"]
                    .as_str()
                    .map(String::from)
            })
            .ok_or_else(|| Stop::Failed("the image records no network lock".into()))?;
        let listed = |run: &mut Self, name: &str| -> R<bool> {
            let e = run.crest(name, &["unlock".into(), "--list".into()])?;
            run.expect_success("unlock --list", &e)?;
            Ok(e.stdout.lines().any(|l| l == format!("inet {table}")))
        };
        if !listed(self, "unlock-list-held")? {
            fail!("while the workload is dumped, its nftables table {table} is not in the ruleset");
        }
        // Long enough for the peer to send into the void and retransmit.
        while dumped.elapsed() < Duration::from_millis(1500) {
            std::thread::sleep(POLL);
        }
        peer_alive(self, "while the workload was dumped")?;
        let rpid = self.spawn_restore(&img)?;
        self.wait_view(pid, &before, Parent::Expect(rpid), "after restore")?;
        let restored = Instant::now();
        // Traffic flows again: the peer's count of echoed bytes is checked at the end.
        std::thread::sleep(Duration::from_millis(500));
        peer_alive(self, "after the restore")?;
        self.go(&pctl)?;
        self.finish_restored_with(self.spec.expect_exit, |status, result| {
            format!("crest restore exited with {status}; the workload's result:\n{result}")
        })?;
        let peer_st = loop {
            if let Some(Ok(Some(st))) = self.helpers.first_mut().map(|c| c.try_wait()) {
                break st;
            }
            self.time_left()?;
            std::thread::sleep(POLL);
        };
        self.expect_ok(&pctl, "the peer")?;
        if peer_st.code() != Some(0) {
            fail!("the peer ended with {}", describe_status(peer_st));
        }
        if listed(self, "unlock-list")? {
            fail!("the nftables table {table} remains after the restore");
        }
        self.notes.push(format!(
            "held {} ms; peer: {}",
            restored.duration_since(dumped).as_millis(),
            fs::read_to_string(self.dir.join("peer.err"))
                .unwrap_or_default()
                .trim_end()
        ));
        Ok(())
    }

    /// An MPI job (see [`Mode::MpiJob`]): built with the flavour's mpicc, run
    /// once without pauses for the reference checksum, then started in a
    /// session of its own and dumped mid-run from the launcher's pid (the
    /// whole tree), restored, `cycles` times. It must finish with exit 0,
    /// every progress line exactly once, and the reference checksum.
    fn mpi_job(&mut self) -> R<()> {
        let tc = mpi_toolchain(self.cfg, self.spec).map_err(Stop::Ignored)?;
        let num = |i: usize, what: &str| -> R<u64> {
            self.spec
                .args
                .get(i)
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| {
                    Stop::Failed(format!(
                        "case args: {what} missing (flavour, iterations, pause in ms)"
                    ))
                })
        };
        let (iterations, pause) = (num(1, "iterations")?, num(2, "pause")?);
        let cycles = self.spec.cycles.unwrap_or(self.cfg.cycles).max(1);
        if self.cfg.mpi.is_some() && self.spec.args.first().is_some_and(|f| f == "vendor") {
            // Which launcher a vendor result is about (REQUIREMENTS.md's status says it).
            let mut how = vec![tc.launcher.display().to_string()];
            how.extend(tc.launcher_args.iter().cloned());
            self.notes.push(format!("{RUN_WITH}{}", how.join(" ")));
        }
        let exe = self.dir.join("ring");
        tc.compile(&exe).map_err(Stop::Failed)?;
        let (reference, reference_hung) = self.mpi_reference(&tc, &exe, iterations, "reference")?;

        let args = vec![iterations.to_string(), pause.to_string()];
        let _ = fs::write(self.dir.join("job.cmd"), tc.describe(&exe, &args) + "\n");
        let child = self.spawn_mpi(&tc, &exe, &args, "wl")?;
        let pid = child.id() as i32;
        self.sid = Some(pid);
        self.workload = Some(child);
        let out = self.dir.join("wl.out");
        let mut seen = 0;
        for cycle in 1..=cycles {
            // Mid-run: a quarter of the way in, then some iterations after each restore.
            let target = if cycle == 1 {
                (iterations / 4).max(2)
            } else {
                seen + (iterations / 8).max(2)
            };
            self.wait_progress(&out, target, iterations)?;
            let tree = job_tree(pid);
            for &(p, _, _) in &tree {
                if let Some(st) = view::read_stat(p) {
                    self.known.push((p, st.starttime));
                }
            }
            let t0 = Instant::now();
            let img = match self.dump(pid, cycle, &[]) {
                Ok(img) => img,
                Err(Stop::Ignored(m)) if cycle == 1 => {
                    let uninterrupted = Uninterrupted {
                        tc: &tc,
                        exe: &exe,
                        iterations,
                        checksum: &reference,
                        hung: reference_hung,
                    };
                    return Err(self.mpi_after_refusal(m, &out, &uninterrupted));
                }
                Err(stop) => return Err(later_dump_refused(cycle, stop)),
            };
            let dump_time = t0.elapsed();
            seen = mpi::JobOutput::parse(&fs::read_to_string(&out).unwrap_or_default()).last();
            self.reap_dumped(pid, cycle, "job")?;
            let t1 = Instant::now();
            let rpid = self.spawn_restore(&img)?;
            self.wait_tree(&tree, pid, rpid, cycle)?;
            self.notes.push(format!(
                "cycle {cycle}: dump {:.2} s, restore {:.2} s ({} processes, image {} KiB, at iteration {seen}/{iterations})",
                dump_time.as_secs_f64(),
                t1.elapsed().as_secs_f64(),
                tree.len(),
                dir_size(&img) / 1024
            ));
        }
        let Some(mut r) = self.restore.take() else {
            fail!("no crest restore is running");
        };
        let end = wait_job(&mut r, &out, self.deadline);
        self.restore = Some(r);
        match end {
            None => fail!("the restored job did not finish before the case timeout"),
            Some(JobEnd::HungInFinalize) => self.hang_is_mpis_own(
                &Uninterrupted {
                    tc: &tc,
                    exe: &exe,
                    iterations,
                    checksum: &reference,
                    hung: reference_hung,
                },
                "the restored job",
            )?,
            Some(JobEnd::Exited(st)) if shell_status(st) != 0 => fail!(
                "the restored job ended with {} (crest restore passes the launcher's status on)",
                describe_status(st)
            ),
            Some(JobEnd::Exited(_)) => self.restore = None,
        }
        let text = fs::read_to_string(&out).unwrap_or_default();
        self.check_job_output(&text, iterations, &reference)
    }

    /// Starts `exe` under the MPI launcher in a session of its own, its output
    /// in NAME.out and NAME.err in the case dir.
    fn spawn_mpi(&self, tc: &mpi::Toolchain, exe: &Path, args: &[String], name: &str) -> R<Child> {
        let mut cmd = tc.command(exe, args);
        cmd.stdin(Stdio::null())
            .stdout(self.file(&format!("{name}.out"))?)
            .stderr(self.file(&format!("{name}.err"))?)
            .current_dir(&self.dir);
        in_own_session(&mut cmd);
        cmd.spawn()
            .map_err(|e| Stop::Failed(format!("cannot start {}: {e}", tc.launcher.display())))
    }

    /// The checksum of an uninterrupted run without pauses (same iterations),
    /// in a session of its own so that a hung run can be killed whole, and
    /// whether it hung in MPI_Finalize after printing it; output in NAME.out.
    fn mpi_reference(
        &mut self,
        tc: &mpi::Toolchain,
        exe: &Path,
        iterations: u64,
        name: &str,
    ) -> R<(String, bool)> {
        let args = vec![iterations.to_string(), "0".to_string()];
        let out = self.dir.join(format!("{name}.out"));
        let mut child = self.spawn_mpi(tc, exe, &args, name)?;
        let sid = child.id() as i32;
        let end = wait_job(&mut child, &out, self.deadline);
        for pid in session_members(sid) {
            // SAFETY: kill has no memory effects; the process is in the reference run's session.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
        let o = mpi::JobOutput::parse(&fs::read_to_string(&out).unwrap_or_default());
        match (end, o.checksum) {
            (Some(JobEnd::Exited(st)), Some(c)) if st.success() => Ok((c, false)),
            (Some(JobEnd::HungInFinalize), Some(c)) => {
                self.notes.push(format!(
                    "the uninterrupted run {name} hung in MPI_Finalize after its checksum"
                ));
                Ok((c, true))
            }
            (None, _) => fail!(
                "the reference run ({}) did not finish before the case timeout",
                tc.describe(exe, &args)
            ),
            (Some(JobEnd::Exited(st)), _) => fail!(
                "the reference run ({}) ended with {} without a checksum line",
                tc.describe(exe, &args),
                describe_status(st)
            ),
            (Some(JobEnd::HungInFinalize), None) => {
                unreachable!("a hang is only noticed after the checksum")
            }
        }
    }

    /// Waits until the job has reported iteration `target`.
    fn wait_progress(&mut self, out: &Path, target: u64, iterations: u64) -> R<()> {
        loop {
            let last = mpi::JobOutput::parse(&fs::read_to_string(out).unwrap_or_default()).last();
            if last >= target {
                if last >= iterations {
                    fail!("the job finished before it could be dumped: give it more iterations or a longer pause");
                }
                return Ok(());
            }
            let ended = match (self.workload.as_mut(), self.restore.as_mut()) {
                (Some(c), _) | (None, Some(c)) => c.try_wait().ok().flatten(),
                _ => None,
            };
            if let Some(st) = ended {
                fail!(
                    "the job ended ({}) at iteration {last}, before iteration {target}",
                    describe_status(st)
                );
            }
            self.time_left()?;
            std::thread::sleep(POLL);
        }
    }

    /// Waits until every process of `tree` runs again: same pid, same name,
    /// same parent (the root's is the restorer `rpid`), not stopped, not traced.
    fn wait_tree(
        &mut self,
        tree: &[(i32, String, i32)],
        root: i32,
        rpid: i32,
        cycle: u32,
    ) -> R<()> {
        // Not view_wait: a restore may wait up to a minute for a port a
        // closed connection holds in TIME_WAIT (crest restore --port-wait);
        // a crest restore that gives up is caught below.
        let until = self.deadline;
        loop {
            if let Some(st) = self.restore_exited() {
                let msg = engine_message(&self.restore_log());
                return Err(restore_failure(
                    &format!("restore of cycle {cycle}"),
                    st,
                    &msg,
                ));
            }
            let missing: Vec<String> = tree
                .iter()
                .filter(|(p, comm, ppid)| {
                    let want_ppid = if *p == root { rpid } else { *ppid };
                    let ok = view::read_stat(*p).is_some_and(|st| {
                        st.comm == *comm && st.ppid == want_ppid && !matches!(st.state, 'T' | 't')
                    }) && tracer_pid(*p) == Some(0);
                    !ok
                })
                .map(|(p, comm, _)| format!("{p} ({comm})"))
                .collect();
            if missing.is_empty() {
                for &(p, _, _) in tree {
                    if let Some(st) = view::read_stat(p) {
                        self.known.push((p, st.starttime));
                    }
                }
                return Ok(());
            }
            if Instant::now() > until {
                fail!(
                    "cycle {cycle}: after restore these processes of the job do not run as before: {}",
                    missing.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A job that hung in MPI_Finalize after printing its checksum passes
    /// only when uninterrupted runs of the same job hang on this machine too
    /// (Debian's MPICH does, now and then): the reference run, or one of up
    /// to three more made now. A hang they never show is the restore's.
    fn hang_is_mpis_own(&mut self, u: &Uninterrupted, who: &str) -> R<()> {
        if u.hung {
            self.notes.push(format!(
                "{who} hung in MPI_Finalize after its checksum, as the uninterrupted reference run did"
            ));
            return Ok(());
        }
        for i in 1..=3 {
            let (_, hung) =
                self.mpi_reference(u.tc, u.exe, u.iterations, &format!("reference-again{i}"))?;
            if hung {
                self.notes.push(format!(
                    "{who} hung in MPI_Finalize after its checksum, as uninterrupted run {} of {} did",
                    i + 1,
                    i + 1
                ));
                return Ok(());
            }
        }
        fail!("{who} hung in MPI_Finalize after printing its checksum; four uninterrupted runs of the same job did not hang")
    }

    /// After a refused first dump the job must carry on unharmed: it finishes
    /// with exit 0 and the reference checksum; then the case is ignored with
    /// the refusal, else it fails.
    fn mpi_after_refusal(&mut self, refusal: String, out: &Path, u: &Uninterrupted) -> Stop {
        let Some(mut c) = self.workload.take() else {
            return Stop::Failed(format!("{refusal}\nand the job is not ours to wait for"));
        };
        let end = wait_job(&mut c, out, self.deadline);
        self.workload = Some(c);
        let st = match end {
            None => {
                return Stop::Failed(format!(
                    "{refusal}\nand the job did not finish after the refused dump"
                ))
            }
            Some(JobEnd::HungInFinalize) => {
                if let Err(Stop::Failed(m) | Stop::Ignored(m)) =
                    self.hang_is_mpis_own(u, "after the refused dump, the job")
                {
                    return Stop::Failed(format!("{refusal}\nand {m}"));
                }
                std::process::ExitStatus::from_raw(0)
            }
            Some(JobEnd::Exited(st)) => st,
        };
        let text = fs::read_to_string(out).unwrap_or_default();
        if !st.success() {
            return Stop::Failed(format!(
                "{refusal}\nand the job ended with {} after the refused dump",
                describe_status(st)
            ));
        }
        match self.check_job_output(&text, u.iterations, u.checksum) {
            Ok(()) => Stop::Ignored(refusal),
            Err(Stop::Failed(m)) | Err(Stop::Ignored(m)) => {
                Stop::Failed(format!("{refusal}\nand after the refused dump: {m}"))
            }
        }
    }

    fn check_job_output(&self, text: &str, iterations: u64, reference: &str) -> R<()> {
        let o = mpi::JobOutput::parse(text);
        o.complete(iterations).map_err(Stop::Failed)?;
        match o.checksum {
            Some(c) if c == reference => Ok(()),
            Some(c) => {
                fail!("the job ended with checksum {c}, an uninterrupted run with {reference}")
            }
            None => fail!("the job printed no checksum line"),
        }
    }

    // ---- cleanup and logs --------------------------------------------------

    /// Kills whatever the case left: every process seen in a view (same pid,
    /// same start time), every process still in the workload's session (its
    /// pid cannot be reused while any member holds it as session id: orphans,
    /// detached children), then the restorer, helpers and the workload.
    /// SIGKILL also ends stopped and traced processes.
    fn cleanup(&mut self) {
        // Whatever a view picked up, never the harness or its ancestors.
        let protected = ancestors_and_self();
        for &(pid, start) in &self.known {
            if protected.contains(&pid) {
                continue;
            }
            if view::read_stat(pid).map(|st| st.starttime) == Some(start) {
                // SAFETY: kill has no memory effects; pid and start time match what we saw.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(sid) = self.sid {
            for pid in session_members(sid)
                .into_iter()
                .filter(|p| !protected.contains(p))
            {
                // SAFETY: as above; the process is in our workload's session.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for c in self
            .restore
            .iter_mut()
            .chain(self.workload.iter_mut())
            .chain(self.helpers.iter_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.restore = None;
        self.workload = None;
        self.helpers.clear();
    }

    /// The tails of the case's logs, for a failure message.
    fn logs(&self) -> String {
        let mut names: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.push(self.ctl.join(RESULT));
        let mut out = format!("case dir (kept): {}", self.dir.display());
        for p in names {
            let Ok(text) = fs::read_to_string(&p) else {
                continue;
            };
            if text.trim().is_empty() {
                continue;
            }
            let text = strip_ansi(&text);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!(
                "\n--- {} ---\n{}",
                p.file_name().unwrap_or_default().to_string_lossy(),
                tail.join("\n")
            ));
        }
        out
    }
}

/// Marks every fd above stderr close-on-exec, so a child starts with only its
/// stdio: an fd the harness inherited (a pipe from whatever started it) would
/// otherwise become part of the workload's state. Runs between fork and exec.
fn only_stdio() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags (Linux 5.11+).
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 {
        // Older kernels: set the flag one fd at a time.
        for fd in 3..4096 {
            // SAFETY: fcntl on a possibly-closed fd only fails with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// A command whose child starts with only its stdio (see [`only_stdio`]).
fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: only_stdio is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            only_stdio();
            Ok(())
        });
    }
    cmd
}

/// Makes `cmd`'s child the leader of a session of its own, started with only
/// its stdio: the case can then find and kill whatever it leaves behind.
fn in_own_session(cmd: &mut Command) {
    // SAFETY: setsid and fcntl (in only_stdio) are async-signal-safe and
    // touch no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            only_stdio();
            Ok(())
        });
    }
}

/// Removes terminal colour sequences (`ESC [ … m`) from a log.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// This process and its ancestors up to init.
fn ancestors_and_self() -> Vec<i32> {
    let mut out = vec![std::process::id() as i32];
    while let Some(st) = view::read_stat(*out.last().unwrap_or(&1)) {
        if st.ppid <= 1 || out.contains(&st.ppid) || out.len() > 64 {
            break;
        }
        out.push(st.ppid);
    }
    out.push(1);
    out
}

/// Whether `pid` descends from `root` (walking ppid links).
fn is_descendant(mut pid: i32, root: i32) -> bool {
    for _ in 0..64 {
        match view::read_stat(pid) {
            Some(st) if st.ppid == root => return true,
            Some(st) if st.ppid > 1 => pid = st.ppid,
            _ => return false,
        }
    }
    false
}

/// `root` and its descendants as (pid, comm, ppid), parents first.
fn job_tree(root: i32) -> Vec<(i32, String, i32)> {
    let mut out: Vec<(i32, String, i32)> = Vec::new();
    if let Some(st) = view::read_stat(root) {
        out.push((root, st.comm, st.ppid));
    }
    let all: Vec<(i32, view::Stat)> = fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|p| Some((p, view::read_stat(p)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut i = 0;
    while i < out.len() {
        let parent = out[i].0;
        for (p, st) in &all {
            if st.ppid == parent && !out.iter().any(|o| o.0 == *p) {
                out.push((*p, st.comm.clone(), st.ppid));
            }
        }
        i += 1;
    }
    out
}

/// How long a job that printed its checksum may take to exit. Debian's MPICH
/// 4.0.2 (ch4:ucx, UCX_TLS=tcp,self) sometimes hangs in MPI_Finalize on this
/// kind of host, in uninterrupted runs too: one rank waits in UCX for an
/// endpoint close its peers never progress, they wait for it in the PMI
/// barrier. The checksum line comes after every rank agreed on the result,
/// so such a job is killed and the hang is noted, not counted as a failure.
const FINALIZE_GRACE: Duration = Duration::from_secs(15);

/// What an uninterrupted run of an MPI case's job gave, and how to make
/// another.
struct Uninterrupted<'a> {
    tc: &'a mpi::Toolchain,
    exe: &'a Path,
    iterations: u64,
    checksum: &'a str,
    /// The reference run hung in MPI_Finalize after its checksum.
    hung: bool,
}

/// How an MPI job ended.
enum JobEnd {
    Exited(ExitStatus),
    /// Printed its checksum, then did not exit within [`FINALIZE_GRACE`].
    HungInFinalize,
}

/// Waits for `child` (the launcher, or the restorer that passes its status
/// on) to exit; `None` at `deadline`.
/// Waits for this process's turn to run an MPI job (an exclusive flock on a
/// file in the temp dir, released when the returned file is dropped).
fn mpi_turn() -> Option<File> {
    let f = File::create(std::env::temp_dir().join("crest-conformance-mpi.lock")).ok()?;
    // SAFETY: flock on a file we own; it blocks until the lock is ours.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    Some(f)
}

fn wait_job(child: &mut Child, out: &Path, deadline: Instant) -> Option<JobEnd> {
    let mut printed: Option<Instant> = None;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(JobEnd::Exited(st));
        }
        if printed.is_none()
            && mpi::JobOutput::parse(&fs::read_to_string(out).unwrap_or_default())
                .checksum
                .is_some()
        {
            printed = Some(Instant::now());
        }
        if printed.is_some_and(|t| t.elapsed() > FINALIZE_GRACE) {
            return Some(JobEnd::HungInFinalize);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// `TracerPid` of `pid`, from its status.
fn tracer_pid(pid: i32) -> Option<i32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()
}

/// The processes whose session id is `sid`.
fn session_members(sid: i32) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            view::read_stat(pid)
                .map(|st| st.sid == sid)
                .unwrap_or(false)
        })
        .collect()
}

fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += dir_size(&p);
            } else if let Ok(m) = p.metadata() {
                // Allocated blocks, so a sparse page file counts what it stores.
                total += m.blocks() * 512;
            }
        }
    }
    total
}

fn largest_file(dir: &Path) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(m) = p.metadata() {
                if best
                    .as_ref()
                    .map(|(s, _)| m.len() > *s)
                    .unwrap_or(m.len() > 0)
                {
                    best = Some((m.len(), p));
                }
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Changes one byte in the middle of `path` in place and sets its times
/// back, then checks that its identity (inode, size, mtime) is as before:
/// only its contents tell the change.
fn change_contents_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let before = fs::metadata(path)?;
    if before.len() == 0 {
        return Err(std::io::Error::other("it is empty"));
    }
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    flip_middle_byte(path)?;
    f.set_times(
        fs::FileTimes::new()
            .set_accessed(before.accessed()?)
            .set_modified(before.modified()?),
    )?;
    drop(f);
    let after = fs::metadata(path)?;
    if (after.ino(), after.len(), after.modified()?)
        != (before.ino(), before.len(), before.modified()?)
    {
        return Err(std::io::Error::other("its identity changed anyway"));
    }
    Ok(())
}

fn flip_middle_byte(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let at = f.metadata()?.len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)?;
    b[0] ^= 0x5a;
    f.write_all_at(&b, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_harness_and_its_ancestors_are_protected() {
        let a = ancestors_and_self();
        assert_eq!(a[0], std::process::id() as i32);
        assert!(a.contains(&(std::os::unix::process::parent_id() as i32)));
        assert!(a.contains(&1));
    }

    #[test]
    fn a_stall_is_the_longest_stretch_the_counter_stood_still() {
        let ms = Duration::from_millis;
        let at = |t: u64, count: Option<u64>, minflt: u64| Sample {
            t: ms(t),
            count,
            minflt: count.map(|_| minflt),
        };
        // Ran 0-60 ms (faulting), frozen 60-100, died at 100; the dump took 110 ms.
        let mut s: Vec<Sample> = (0..60).map(|i| at(i, Some(i * 10), 100 + i)).collect();
        s.extend((60..100).map(|i| at(i, Some(590), 159)));
        s.push(at(100, None, 0));
        assert_eq!(longest_stall(&s, ms(110)), (ms(41), ms(69)));
        assert_eq!(writes_and_faults(&s), (590, 59));
        // Never moved: frozen for the whole dump.
        let still: Vec<_> = (0..50).map(|i| at(i, Some(7), 3)).collect();
        assert_eq!(longest_stall(&still, ms(50)), (ms(50), ms(0)));
        assert_eq!(writes_and_faults(&still), (0, 0));
        assert_eq!(longest_stall(&[], ms(5)), (ms(5), ms(0)));
        assert_eq!(writes_and_faults(&[]), (0, 0));
    }

    #[test]
    fn colour_codes_are_stripped_from_logs() {
        assert_eq!(
            strip_ansi("\u{1b}[32m INFO\u{1b}[0m dumped \u{1b}[3mpid\u{1b}[0m=7"),
            " INFO dumped pid=7"
        );
        assert_eq!(strip_ansi("plain [x]"), "plain [x]");
    }

    #[test]
    fn engine_message_prefers_the_error_line() {
        let s = "DEBUG seize 42\ncrest: error: pid 42: fd 5 is a pipe: not supported yet\nDEBUG resumed\n";
        assert_eq!(
            engine_message(s),
            "crest: error: pid 42: fd 5 is a pipe: not supported yet"
        );
        assert_eq!(engine_message("a\nlast words\n\n"), "last words");
        assert_eq!(engine_message(""), "(no message on stderr)");
    }

    #[test]
    fn corrupting_flips_one_byte_of_the_largest_file() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("small"), b"ab").unwrap();
        fs::write(d.path().join("sub/big"), [0u8; 100]).unwrap();
        let big = largest_file(d.path()).unwrap();
        assert!(big.ends_with("sub/big"));
        flip_middle_byte(&big).unwrap();
        let data = fs::read(&big).unwrap();
        assert_eq!(data.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(data[50], 0x5a);
    }
}
