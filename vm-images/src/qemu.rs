//! The QEMU command line and a supervised run: timeout, console log.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{HOSTROOT_TAG, RESULTS_TAG};
use crate::Error;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Hardware acceleration choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Set once QEMU failed to start a KVM guest in this process: later VMs use TCG.
static KVM_BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Environment variable forcing the accelerator (`kvm` or `tcg`).
pub const ACCEL_ENV: &str = "CREST_VM_ACCEL";

impl Accel {
    /// KVM when `/dev/kvm` opens read-write (and no KVM guest failed to start
    /// in this process), TCG otherwise. `$CREST_VM_ACCEL` overrides.
    pub fn detect() -> Self {
        match std::env::var(ACCEL_ENV).as_deref() {
            Ok("tcg") => return Accel::Tcg,
            Ok("kvm") => return Accel::Kvm,
            _ => {}
        }
        if KVM_BROKEN.load(std::sync::atomic::Ordering::Relaxed) {
            return Accel::Tcg;
        }
        let ok = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if ok && *PROBE.get_or_init(probe_kvm) {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// Records that KVM does not work here (e.g. `/dev/kvm` exists but QEMU
    /// cannot set the guest's MSRs).
    pub fn mark_kvm_broken() {
        KVM_BROKEN.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts a paused KVM guest: a usable KVM keeps it alive; a broken one (e.g.
/// `/dev/kvm` present but the guest MSRs cannot be set) makes QEMU exit at once.
fn probe_kvm() -> bool {
    let child = Command::new(QEMU)
        .args([
            "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "64",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-S"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        if let Ok(Some(_)) = child.try_wait() {
            tracing::info!("KVM is not usable by QEMU here; using TCG");
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

/// Whether a QEMU run failed because KVM is unusable: it died before the
/// guest printed anything, blaming KVM.
pub fn kvm_start_failure(cfg: &VmConfig, f: &VmFiles, qemu_log: &Path) -> bool {
    cfg.accel == Accel::Kvm
        && std::fs::metadata(&f.console_log)
            .map(|m| m.len() == 0)
            .unwrap_or(true)
        && std::fs::read_to_string(qemu_log)
            .map(|t| t.to_ascii_lowercase().contains("kvm"))
            .unwrap_or(false)
}

/// VM settings.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    pub accel: Accel,
    /// Extra kernel command line words.
    pub extra_append: Vec<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_mib: 2048,
            cpus: 2,
            timeout: Duration::from_secs(600),
            accel: Accel::detect(),
            extra_append: Vec::new(),
        }
    }
}

/// What one VM run needs on the host side.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub console_log: PathBuf,
    /// Shared read-write with the guest.
    pub results_dir: PathBuf,
}

/// The kernel command line.
pub fn kernel_cmdline(cfg: &VmConfig) -> String {
    let mut words: Vec<String> = [
        "console=ttyS0",
        "panic=-1",
        "loglevel=4",
        "rdinit=/init",
        "tsc=reliable",
        "no_timer_check",
        // DAMON_STAT's kdamond (on by default from 6.17) only adds
        // background work to an emulated guest.
        "damon_stat.enabled=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    words.extend(cfg.extra_append.iter().cloned());
    words.join(" ")
}

/// The QEMU arguments.
pub fn qemu_args(cfg: &VmConfig, f: &VmFiles) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    match cfg.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
    }
    let mem = cfg.memory_mib.to_string();
    let smp = cfg.cpus.to_string();
    push(&["-m", &mem, "-smp", &smp]);
    let kernel = f.vmlinuz.display().to_string();
    let initrd = f.initrd.display().to_string();
    let append = kernel_cmdline(cfg);
    push(&["-kernel", &kernel, "-initrd", &initrd, "-append", &append]);
    let serial = format!("file:{}", f.console_log.display());
    push(&["-serial", &serial]);
    let root = format!(
        "local,path=/,mount_tag={HOSTROOT_TAG},security_model=none,readonly=on,multidevs=remap"
    );
    let results = format!(
        "local,path={},mount_tag={RESULTS_TAG},security_model=none,multidevs=remap",
        f.results_dir.display()
    );
    push(&["-virtfs", &root, "-virtfs", &results]);
    push(&["-device", "virtio-rng-pci"]);
    a
}

/// How the QEMU process ended.
#[derive(Debug, Clone)]
pub struct VmExit {
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Whether the QEMU binary is on PATH.
pub fn qemu_available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs QEMU until it exits or the timeout passes (then kills it). QEMU's own
/// stdout/stderr go to `qemu_log`. `tick` is called about every 200 ms.
pub fn run(
    cfg: &VmConfig,
    f: &VmFiles,
    qemu_log: &Path,
    tick: &mut dyn FnMut(),
) -> Result<VmExit, Error> {
    let log = std::fs::File::create(qemu_log)
        .map_err(|e| Error::io(format!("create {}", qemu_log.display()), e))?;
    let log2 = log.try_clone().map_err(|e| Error::io("dup log", e))?;
    let args = qemu_args(cfg, f);
    tracing::debug!(?args, "starting {QEMU}");
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| {
            Error::Qemu(format!(
                "cannot start {QEMU}: {e} (install qemu-system-x86)"
            ))
        })?;
    loop {
        if let Some(st) = child
            .try_wait()
            .map_err(|e| Error::io("wait for qemu", e))?
        {
            return Ok(VmExit {
                status: Some(st),
                timed_out: false,
                elapsed: start.elapsed(),
            });
        }
        if start.elapsed() > cfg.timeout {
            tracing::warn!(timeout = ?cfg.timeout, "VM timed out, killing QEMU");
            let _ = child.kill();
            let st = child.wait().ok();
            return Ok(VmExit {
                status: st,
                timed_out: true,
                elapsed: start.elapsed(),
            });
        }
        tick();
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let cfg = VmConfig {
            memory_mib: 1024,
            cpus: 3,
            timeout: Duration::from_secs(5),
            accel: Accel::Tcg,
            extra_append: vec!["foo=1".into()],
        };
        let f = VmFiles {
            vmlinuz: "/k/vmlinuz".into(),
            initrd: "/r/initramfs.cpio".into(),
            console_log: "/r/console.log".into(),
            results_dir: "/r/results".into(),
        };
        let a = qemu_args(&cfg, &f).join(" ");
        assert!(a.contains("-accel tcg,thread=multi -cpu max"), "{a}");
        assert!(a.contains("-m 1024 -smp 3"), "{a}");
        assert!(
            a.contains("-kernel /k/vmlinuz -initrd /r/initramfs.cpio"),
            "{a}"
        );
        assert!(a.contains("-serial file:/r/console.log"), "{a}");
        assert!(a.contains("-no-reboot"), "{a}");
        assert!(
            a.contains("path=/,mount_tag=hostroot,security_model=none,readonly=on"),
            "{a}"
        );
        assert!(
            a.contains("path=/r/results,mount_tag=results,security_model=none"),
            "{a}"
        );
        assert!(kernel_cmdline(&cfg).ends_with("foo=1"));
        let kvm = VmConfig {
            accel: Accel::Kvm,
            ..cfg
        };
        assert!(qemu_args(&kvm, &f)
            .join(" ")
            .contains("-accel kvm -cpu host"));
    }
}
