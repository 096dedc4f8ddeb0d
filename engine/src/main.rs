//! The `crest` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use crest_engine::dump::{AfterDump, DumpOptions, Scope};
use crest_engine::dump::{PreCopyOptions, Tracker};
use crest_engine::model::Checkpoint;
use crest_engine::net::netlock::NftError;
use crest_engine::restore::{RestoreError, RestoreOptions, Restored};
use crest_engine::{check, show, Error};

/// crest: checkpoint and restore Linux processes.
#[derive(Debug, Parser)]
#[command(name = "crest", version, about, propagate_version = true)]
struct Cli {
    /// Log what crest does (-v info, -vv debug, -vvv trace), on stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// A `--relocate` argument that is not OLD=NEW with two absolute paths.
#[derive(Debug, thiserror::Error)]
#[error("expected OLD=NEW, two absolute paths")]
struct BadRelocation;

fn parse_relocation(s: &str) -> Result<(String, String), BadRelocation> {
    match s.split_once('=') {
        Some((old, new)) if old.starts_with('/') && new.starts_with('/') => {
            Ok((old.to_string(), new.to_string()))
        }
        _ => Err(BadRelocation),
    }
}

/// Why a command failed: the one line `crest: error: …` prints, and the
/// exit status (3: something not supported yet; 1: anything else).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Engine(#[from] Error),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    NetLock(#[from] NftError),
}

impl Failure {
    fn exit_code(&self) -> i32 {
        match self {
            Failure::Engine(e) => e.exit_code(),
            Failure::Restore(e) => e.exit_code(),
            Failure::NetLock(_) => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum VerifyFilesArg {
    Identity,
    Hash,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TrackerArg {
    UffdWp,
    SoftDirty,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RestoreFilesArg {
    Clobber,
    Anonymous,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checkpoint a process into an image directory. By default the process is
    /// killed once the image is complete; on any failure it is left running,
    /// exactly as it was.
    Dump {
        /// Dump this process and all its descendants.
        #[arg(
            short = 't',
            long = "tree",
            value_name = "PID",
            required_unless_present_any = ["session", "pgid"]
        )]
        pid: Option<i32>,
        /// Dump every process of this session (its leader's PID), orphans included.
        #[arg(long, value_name = "SID", conflicts_with_all = ["pid", "pgid"])]
        session: Option<i32>,
        /// Dump every process of this process group (members' parents may be
        /// outside it: they are restored as orphans, like a session's).
        #[arg(long, value_name = "PGID", conflicts_with = "pid")]
        pgid: Option<i32>,
        /// Where to write the image (must not exist, or be empty).
        #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
        dir: PathBuf,
        /// Let the process continue after the dump.
        #[arg(long, conflicts_with = "stop")]
        leave_running: bool,
        /// Carry established TCP connections to peers outside the dump
        /// (TCP_REPAIR); without it such a connection is refused.
        #[arg(long)]
        tcp_established: bool,
        /// Leave the process stopped (SIGSTOP) after the dump.
        #[arg(long)]
        stop: bool,
        /// How long processes using libcrest may take in their checkpoint
        /// callbacks before the dump is cancelled, in seconds.
        #[arg(long, default_value_t = 10.0, value_name = "SECS")]
        callback_timeout: f64,
        /// Save the contents of the open regular files whose path matches GLOB
        /// (all of them without one) in the image.
        #[arg(long, value_name = "GLOB", num_args = 0..=1, require_equals = true, default_missing_value = "*")]
        save_files: Option<String>,
        /// How a restore tells that an open file changed: its identity (inode,
        /// size, mtime) or a hash of its contents.
        #[arg(long, value_name = "HOW", default_value = "identity")]
        verify_files: VerifyFilesArg,
        /// Make this file part of the image even if no process has it open;
        /// restore puts it back (repeatable).
        #[arg(long = "include-file", value_name = "PATH")]
        include_files: Vec<PathBuf>,
        /// Copy memory while the process runs, again for what it wrote
        /// meanwhile, and freeze it only to copy what changed since the last
        /// round (written pages found with userfaultfd write-protection and
        /// PAGEMAP_SCAN, or soft-dirty bits).
        #[arg(long)]
        pre_copy: bool,
        /// At most this many rounds while the process runs (fewer when the
        /// set of written pages stops shrinking).
        #[arg(long, default_value_t = 3, value_name = "N", requires = "pre_copy")]
        pre_copy_rounds: u32,
        /// How written pages are found (default: uffd-wp where the kernel
        /// has it, else soft-dirty).
        #[arg(long, value_name = "HOW", requires = "pre_copy")]
        pre_copy_tracker: Option<TrackerArg>,
    },
    /// Restore a process from an image directory, with its original PID.
    /// Without --detach crest stays its parent and exits with its exit status
    /// (128+N if it is killed by signal N).
    Restore {
        #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
        dir: PathBuf,
        /// Return once the process runs; it is reparented to init.
        #[arg(short, long)]
        detach: bool,
        /// Leave the restored process stopped (SIGSTOP).
        #[arg(long)]
        stop: bool,
        /// Write the restored PID to this file (atomically) once the process runs,
        /// so a supervisor knows the restore is complete.
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
        /// Restore even if a file the process had open changed since the dump.
        #[arg(long)]
        allow_changed_files: bool,
        /// How long to wait for the original PID to become free, in seconds.
        #[arg(long, default_value_t = 5.0, value_name = "SECS")]
        pid_wait: f64,
        /// Restore into a new PID namespace (under an init of crest's own), so
        /// PIDs taken here do not block it. Inside, every process has its
        /// original PID; --pidfile gets the root's PID as seen from here.
        #[arg(long)]
        pidns: bool,
        /// Give back files saved with `dump --save-files`: written back to
        /// their paths (clobber) or opened as unlinked copies (anonymous).
        #[arg(long, value_name = "HOW")]
        restore_files: Option<RestoreFilesArg>,
        /// Open and map files found under OLD at dump time from NEW instead
        /// (repeatable).
        #[arg(long, value_name = "OLD=NEW", value_parser = parse_relocation)]
        relocate: Vec<(String, String)>,
        /// How long to wait for a listening port the process held to become
        /// free, in seconds (a connection it had closed keeps the port in
        /// TIME_WAIT for up to 60 s after the dump).
        #[arg(long, default_value_t = 65.0, value_name = "SECS")]
        port_wait: f64,
    },
    /// Print an image: processes, memory, registers, files, signals.
    Show {
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove the network lock of a `dump --tcp-established` whose image will
    /// not be restored (restore removes it itself): the nftables table that
    /// drops its connections' packets. `--list` prints every crest table.
    Unlock {
        #[arg(required_unless_present = "list")]
        dir: Option<PathBuf>,
        #[arg(long, conflicts_with = "dir")]
        list: bool,
    },
    /// Which kernel features this kernel offers, and which crest needs.
    Check {
        #[arg(long)]
        json: bool,
    },
}

/// Prints a report; a reader that went away (`crest show | head`) is not an error.
fn emit(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn progress_bar() -> indicatif::ProgressBar {
    // Shows only on a terminal and only for work that takes more than a moment.
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .expect("valid template"),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    bar
}

fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Dump {
            pid,
            session,
            pgid,
            dir,
            leave_running,
            tcp_established,
            stop,
            callback_timeout,
            save_files,
            verify_files,
            include_files,
            pre_copy,
            pre_copy_rounds,
            pre_copy_tracker,
        } => {
            let (pid, scope) = match (pid, session, pgid) {
                (Some(pid), _, _) => (pid, Scope::Tree),
                (None, Some(sid), _) => (sid, Scope::Session),
                (None, None, Some(pgid)) => (pgid, Scope::Pgid),
                (None, None, None) => unreachable!("clap requires one of them"),
            };
            let after = if leave_running {
                AfterDump::LeaveRunning
            } else if stop {
                AfterDump::Stop
            } else {
                AfterDump::Kill
            };
            let bar = progress_bar();
            let stats = crest_engine::dump::dump(
                &DumpOptions {
                    pid,
                    dir,
                    after,
                    scope,
                    tcp_established,
                    callback_timeout: Duration::from_secs_f64(callback_timeout.max(0.0)),
                    save_files,
                    verify_files_hash: matches!(verify_files, VerifyFilesArg::Hash),
                    include_files,
                    pre_copy: pre_copy.then_some(PreCopyOptions {
                        rounds: pre_copy_rounds.max(1),
                        tracker: pre_copy_tracker.map(|t| match t {
                            TrackerArg::UffdWp => Tracker::UffdWp,
                            TrackerArg::SoftDirty => Tracker::SoftDirty,
                        }),
                    }),
                },
                &bar,
            )?;
            bar.finish_and_clear();
            tracing::info!(
                "frozen for {:.1} ms, {} pages written",
                stats.frozen_us as f64 / 1000.0,
                stats.pages_written
            );
            Ok(0)
        }
        Command::Restore {
            dir,
            detach,
            stop,
            pidfile,
            allow_changed_files,
            pid_wait,
            pidns,
            restore_files,
            relocate,
            port_wait,
        } => {
            let bar = progress_bar();
            let opts = RestoreOptions {
                dir,
                detach,
                stop,
                pid_wait: Duration::from_secs_f64(pid_wait.max(0.0)),
                allow_changed_files,
                pidns,
                relocate,
                port_wait: Duration::from_secs_f64(port_wait.max(0.0)),
                restore_files: restore_files.map(|r| match r {
                    RestoreFilesArg::Clobber => crest_engine::fds::savefiles::RestoreFiles::Clobber,
                    RestoreFilesArg::Anonymous => {
                        crest_engine::fds::savefiles::RestoreFiles::Anonymous
                    }
                }),
            };
            let restored = crest_engine::restore::restore(&opts, &bar)?;
            bar.finish_and_clear();
            if let Some(path) = pidfile {
                let pid = match restored {
                    Restored::Detached { pid }
                    | Restored::Child { pid }
                    | Restored::InPidns { pid, .. } => pid,
                };
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, format!("{pid}\n"))
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(|e| Error::io(&path, e))?;
            }
            match restored {
                Restored::Detached { pid } => {
                    tracing::info!(pid, "restored and detached");
                    Ok(0)
                }
                Restored::InPidns {
                    pid,
                    detached: true,
                    ..
                } => {
                    tracing::info!(pid, "restored in a new PID namespace and detached");
                    Ok(0)
                }
                // The namespace's init exits with the root's status.
                Restored::Child { pid }
                | Restored::InPidns {
                    init: pid,
                    detached: false,
                    ..
                } => {
                    use nix::sys::wait::{waitpid, WaitStatus};
                    // Our own SIGINT/SIGTERM would otherwise kill us and orphan the job.
                    loop {
                        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
                            Ok(WaitStatus::Exited(_, code)) => return Ok(code as u8),
                            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as u8),
                            Ok(_) => continue,
                            Err(nix::errno::Errno::EINTR) => continue,
                            Err(e) => return Err(Error::sys(pid, "waitpid", e).into()),
                        }
                    }
                }
            }
        }
        Command::Show { dir, json } => {
            let img = Checkpoint::read(&dir)?;
            if json {
                emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&show::to_json(&img)).expect("serialisable")
                ));
            } else {
                emit(&show::render(&img));
            }
            Ok(0)
        }
        Command::Unlock { dir, list } => {
            if list {
                let tables = crest_engine::net::netlock::tables()?;
                emit(
                    &tables
                        .iter()
                        .map(|t| format!("inet {t}\n"))
                        .collect::<String>(),
                );
                return Ok(0);
            }
            let dir = dir.expect("clap requires DIR without --list");
            let img = Checkpoint::read(&dir)?;
            match &img.inventory.net_lock {
                Some(lock) => {
                    crest_engine::net::netlock::unlock(lock)?;
                    tracing::info!(table = lock.table, "removed");
                }
                None => tracing::info!("the image holds no network lock"),
            }
            Ok(0)
        }
        Command::Check { json } => {
            let report = check::check();
            if json {
                emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&report).expect("serialisable")
                ));
            } else {
                emit(&check::render(&report));
            }
            Ok(if report.missing_required().is_empty() {
                0
            } else {
                1
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CREST_LOG")
                .unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("crest: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
