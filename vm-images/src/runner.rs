//! Run one command inside a guest of a given kernel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cache::BootKernel;
use crate::guest::{GuestSpec, GuestStatus, STATUS_FILE, STDERR_FILE, STDOUT_FILE};
use crate::qemu::{self, VmConfig, VmFiles};
use crate::{initramfs, Error};

/// Lines of console log shown with a failure.
pub const CONSOLE_TAIL_LINES: usize = 40;

/// A command for the guest. Paths are those of the host (its root is the
/// guest's root, read-only); `/tmp`, `/var/tmp`, `/run`, `/dev/shm` are fresh
/// tmpfs; [`crate::guest::GUEST_RESULTS_DIR`] is the writable results share.
#[derive(Debug, Clone)]
pub struct GuestCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
}

impl GuestCommand {
    /// `argv` with a minimal environment, run from `/`.
    pub fn new(argv: Vec<String>) -> Self {
        GuestCommand {
            argv,
            env: vec![
                (
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ),
                ("HOME".into(), "/tmp".into()),
                ("TERM".into(), "dumb".into()),
                ("LANG".into(), "C.UTF-8".into()),
            ],
            workdir: "/".into(),
        }
    }

    /// Sets (or replaces) one environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn workdir(mut self, dir: &str) -> Self {
        self.workdir = dir.into();
        self
    }
}

/// How a guest run went.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// What the guest init wrote; `None` means the guest never got that far.
    pub status: Option<GuestStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
    pub qemu_status: Option<std::process::ExitStatus>,
    pub run_dir: PathBuf,
}

impl GuestOutcome {
    pub fn results_dir(&self) -> PathBuf {
        self.run_dir.join("results")
    }
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    pub fn stdout_path(&self) -> PathBuf {
        self.results_dir().join(STDOUT_FILE)
    }
    pub fn stderr_path(&self) -> PathBuf {
        self.results_dir().join(STDERR_FILE)
    }

    /// `None` when the command ran to completion (whatever its exit code);
    /// otherwise why not, with the console's last lines.
    pub fn failure(&self) -> Option<String> {
        let why = if self.timed_out {
            format!("the VM timed out after {:.0?} and was killed", self.elapsed)
        } else {
            match &self.status {
                Some(s) => match &s.error {
                    Some(e) => format!("the guest could not run the command: {e}"),
                    None => return None,
                },
                None => format!(
                    "the guest wrote no status (QEMU exited with {}); the kernel panicked, init failed or the VM powered off early",
                    self.qemu_status.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into())
                ),
            }
        };
        Some(format!(
            "{why}\n--- last {CONSOLE_TAIL_LINES} lines of {} ---\n{}",
            self.console_log().display(),
            crate::tail_file(&self.console_log(), CONSOLE_TAIL_LINES)
        ))
    }

    /// The guest command's exit code (shell convention), if it ran.
    pub fn exit_code(&self) -> Option<i32> {
        self.status
            .as_ref()
            .filter(|s| s.error.is_none())
            .map(GuestStatus::code)
    }
}

/// Boots `kernel` with an initramfs holding `init` (the static guest init),
/// runs `cmd`, and collects the outcome. `run_dir` receives `initramfs.cpio`,
/// `console.log`, `qemu.log` and `results/` (shared with the guest).
pub fn run_in_guest(
    kernel: &BootKernel,
    init: &[u8],
    cmd: &GuestCommand,
    vm: &VmConfig,
    run_dir: &Path,
    tick: &mut dyn FnMut(),
) -> Result<GuestOutcome, Error> {
    let results = run_dir.join("results");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)
        .map_err(|e| Error::io(format!("create {}", results.display()), e))?;
    let spec = GuestSpec {
        modules: Vec::new(),
        argv: cmd.argv.clone(),
        env: cmd.env.clone(),
        workdir: cmd.workdir.clone(),
        hostname: format!("crest-{}", kernel.label.replace('.', "-")),
        msize: 512000,
    };
    let img = initramfs::build(init, &kernel.module_files()?, spec)?;
    let initrd = run_dir.join("initramfs.cpio");
    std::fs::write(&initrd, img)
        .map_err(|e| Error::io(format!("write {}", initrd.display()), e))?;
    let files = VmFiles {
        vmlinuz: kernel.vmlinuz.clone(),
        initrd,
        console_log: run_dir.join("console.log"),
        results_dir: results.clone(),
    };
    let qemu_log = run_dir.join("qemu.log");
    let mut exit = qemu::run(vm, &files, &qemu_log, tick)?;
    if qemu::kvm_start_failure(vm, &files, &qemu_log) {
        tracing::warn!(
            "/dev/kvm is there but QEMU cannot use it ({}); using TCG",
            crate::tail_file(&qemu_log, 1)
        );
        qemu::Accel::mark_kvm_broken();
        let tcg = VmConfig {
            accel: qemu::Accel::Tcg,
            ..vm.clone()
        };
        exit = qemu::run(&tcg, &files, &qemu_log, tick)?;
    }
    if !exit.timed_out
        && !results.join(STATUS_FILE).exists()
        && !command_started(&files.console_log)
    {
        // The guest died before running anything (seen: an `int3` oops while
        // the kernel patches its text under multi-threaded TCG). Boot once
        // more, keeping the first console log; a second failure is reported.
        let first = run_dir.join("console-boot1.log");
        let _ = std::fs::rename(&files.console_log, &first);
        tracing::warn!(
            "[{}] the guest died before running the command; booting once more (first console: {})",
            kernel.label,
            first.display()
        );
        let _ = std::fs::remove_dir_all(&results);
        std::fs::create_dir_all(&results)
            .map_err(|e| Error::io(format!("create {}", results.display()), e))?;
        let vm_now = VmConfig {
            accel: qemu::Accel::detect(),
            ..vm.clone()
        };
        exit = qemu::run(&vm_now, &files, &qemu_log, tick)?;
    }
    let status = match std::fs::read(results.join(STATUS_FILE)) {
        Ok(b) => Some(
            serde_json::from_slice::<GuestStatus>(&b)
                .map_err(|e| Error::Other(format!("bad guest status file: {e}")))?,
        ),
        Err(_) => None,
    };
    Ok(GuestOutcome {
        status,
        timed_out: exit.timed_out,
        elapsed: exit.elapsed,
        qemu_status: exit.status,
        run_dir: run_dir.to_path_buf(),
    })
}

/// Marker the guest init prints on the console right before it starts the command.
pub const COMMAND_STARTED_MARKER: &str = "crest-init: running ";

/// Whether the guest got as far as starting the command.
pub fn command_started(console_log: &Path) -> bool {
    std::fs::read(console_log)
        .map(|b| String::from_utf8_lossy(&b).contains(COMMAND_STARTED_MARKER))
        .unwrap_or(false)
}

/// Whether an ELF file is statically linked (no `PT_INTERP` program header).
pub fn is_static_elf(bytes: &[u8]) -> Result<bool, String> {
    if !bytes.starts_with(b"\x7fELF") || bytes.get(4) != Some(&2) {
        return Err("not an ELF64 file".into());
    }
    let rd = |off: usize, n: usize| -> Result<u64, String> {
        let s = bytes.get(off..off + n).ok_or("truncated ELF")?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(s);
        Ok(u64::from_le_bytes(v))
    };
    let phoff = rd(0x20, 8)? as usize;
    let phentsize = rd(0x36, 2)? as usize;
    let phnum = rd(0x38, 2)? as usize;
    for i in 0..phnum {
        if rd(phoff + i * phentsize, 4)? == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_detection() {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x20] = 64;
        elf[0x36] = 56;
        elf[0x38] = 1;
        elf[64] = 1; // PT_LOAD
        assert_eq!(is_static_elf(&elf), Ok(true));
        elf[64] = 3; // PT_INTERP
        assert_eq!(is_static_elf(&elf), Ok(false));
        assert!(is_static_elf(b"#!/bin/sh").is_err());
        // This test binary is dynamically linked (or static under crt-static).
        let me = std::fs::read("/proc/self/exe").unwrap();
        assert!(is_static_elf(&me).is_ok());
    }

    #[test]
    fn failure_without_status_shows_console_tail() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("console.log"),
            "boot\nKernel panic - not syncing: VFS\n",
        )
        .unwrap();
        let o = GuestOutcome {
            status: None,
            timed_out: false,
            elapsed: Duration::from_secs(3),
            qemu_status: None,
            run_dir: d.path().to_path_buf(),
        };
        let f = o.failure().unwrap();
        assert!(f.contains("no status"), "{f}");
        assert!(!command_started(&o.console_log()));
        std::fs::write(
            o.console_log(),
            "crest-init: running [\"/bin/true\"] in /\n",
        )
        .unwrap();
        assert!(command_started(&o.console_log()));
        assert!(f.contains("Kernel panic"), "{f}");
        assert_eq!(o.exit_code(), None);
        let ok = GuestOutcome {
            status: Some(GuestStatus {
                exit_code: Some(3),
                signal: None,
                error: None,
                kernel_release: "6.1.0-50-amd64".into(),
                boot_ms: 1,
                run_ms: 1,
            }),
            ..o.clone()
        };
        assert_eq!(ok.failure(), None);
        assert_eq!(ok.exit_code(), Some(3));
        let timed = GuestOutcome {
            timed_out: true,
            ..ok
        };
        assert!(timed.failure().unwrap().contains("timed out"));
    }
}
