//! Shared helpers: workspace paths, builds, QEMU installation, kernel choice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use crest_vm::cache::{BootKernel, Cache};
use crest_vm::catalog;
use crest_vm::qemu::{self, Accel, VmConfig};

/// The cargo profile the suite's binaries are built with (and found in).
pub const PROFILE_DIR: &str = "debug";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `$CARGO_TARGET_DIR` or `<workspace>/target`, absolute.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(d) => root.join(d),
        None => root.join("target"),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// `cargo build --workspace --bins` (debug profile); returns `target/debug`.
pub fn build_workspace_bins() -> Result<PathBuf> {
    let st = cargo()
        .current_dir(workspace_root())
        .args(["build", "--workspace", "--bins"])
        .status()
        .context("run cargo build")?;
    if !st.success() {
        bail!("cargo build --workspace --bins failed ({st})");
    }
    Ok(target_dir().join(PROFILE_DIR))
}

pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the static guest init and returns its bytes, after checking it has
/// no ELF interpreter (i.e. it really is static).
pub fn build_guest_init() -> Result<Vec<u8>> {
    let st = cargo()
        .current_dir(workspace_root())
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=debuginfo",
        )
        .args([
            "build",
            "--release",
            "--target",
            GUEST_TARGET,
            "-p",
            "crest-vm",
            "--bin",
            "crest-guest-init",
        ])
        .status()
        .context("run cargo build for crest-guest-init")?;
    if !st.success() {
        bail!("building crest-guest-init failed ({st})");
    }
    let path = target_dir()
        .join(GUEST_TARGET)
        .join("release")
        .join("crest-guest-init");
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    match crest_vm::runner::is_static_elf(&bytes) {
        Ok(true) => Ok(bytes),
        Ok(false) => bail!(
            "{} is dynamically linked; the guest init must be static",
            path.display()
        ),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

/// Makes sure QEMU is there: installs `qemu-system-x86` with apt-get when
/// running as root, else says what to install.
pub fn ensure_qemu() -> Result<()> {
    if qemu::qemu_available() {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail and has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        bail!(
            "{} not found; install it with `sudo apt-get install qemu-system-x86`",
            qemu::QEMU
        );
    }
    tracing::info!("{} not found, installing qemu-system-x86", qemu::QEMU);
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "qemu-system-x86",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let ok = install().is_ok_and(|s| s.success()) || {
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        install().is_ok_and(|s| s.success())
    };
    if !ok || !qemu::qemu_available() {
        bail!("could not install qemu-system-x86 with apt-get; install it by hand");
    }
    Ok(())
}

/// A kernel the suite runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelChoice {
    /// The running kernel, natively.
    Host,
    /// A catalog version.
    Catalog(String),
    /// A user's own image.
    Custom {
        image: PathBuf,
        modules: Option<PathBuf>,
    },
}

impl KernelChoice {
    pub fn label(&self) -> String {
        match self {
            KernelChoice::Host => "host".into(),
            KernelChoice::Catalog(v) => v.clone(),
            KernelChoice::Custom { .. } => "custom".into(),
        }
    }
}

/// Expands `--kernel` values (`host`, `all`, versions) and `--kernel-image`;
/// unknown versions fail here, before anything is built.
pub fn choose_kernels(
    names: &[String],
    image: Option<&Path>,
    modules: Option<&Path>,
    default: &[&str],
) -> Result<Vec<KernelChoice>> {
    let mut names: Vec<String> = names.to_vec();
    if names.is_empty() && image.is_none() {
        names = default.iter().map(|s| s.to_string()).collect();
    }
    let mut out: Vec<KernelChoice> = Vec::new();
    let mut push = |k: KernelChoice| {
        if !out.contains(&k) {
            out.push(k);
        }
    };
    for n in &names {
        match n.as_str() {
            "host" => push(KernelChoice::Host),
            "all" => {
                push(KernelChoice::Host);
                for e in catalog::CATALOG {
                    push(KernelChoice::Catalog(e.version.into()));
                }
            }
            v => {
                catalog::lookup(v)?;
                push(KernelChoice::Catalog(v.into()));
            }
        }
    }
    if let Some(img) = image {
        push(KernelChoice::Custom {
            image: img.to_path_buf(),
            modules: modules.map(Path::to_path_buf),
        });
    }
    Ok(out)
}

/// The bootable kernel for a choice (fetching into the cache when needed).
pub fn boot_kernel(
    choice: &KernelChoice,
    mirror: Option<&str>,
    progress: &dyn Fn(&str),
) -> Result<(BootKernel, bool)> {
    match choice {
        KernelChoice::Host => bail!("the host kernel runs natively, not in a VM"),
        KernelChoice::Catalog(v) => {
            let cache = Cache::new(Cache::default_root()?);
            Ok(cache.ensure(v, mirror, progress)?)
        }
        KernelChoice::Custom { image, modules } => {
            Ok((BootKernel::custom(image, modules.as_deref())?, true))
        }
    }
}

/// VM options shared by the subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct VmOpts {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Debian archive URL (default: $CREST_DEBIAN_MIRROR, else the system's apt sources).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Force TCG even when /dev/kvm works.
    #[arg(long)]
    pub no_kvm: bool,
}

impl VmOpts {
    pub fn config(&self, timeout: Duration) -> VmConfig {
        VmConfig {
            memory_mib: self.memory,
            cpus: self.cpus,
            timeout,
            accel: if self.no_kvm {
                Accel::Tcg
            } else {
                Accel::detect()
            },
            extra_append: Vec::new(),
        }
    }
}

/// Binaries copied for the guests of one run; removed when dropped.
pub struct StagedBins {
    pub dir: PathBuf,
}

impl StagedBins {
    /// Copies one more executable in, named `name`; returns its path.
    pub fn add_file(&self, from: &Path, name: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let to = self.dir.join(name);
        std::fs::copy(from, &to)
            .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
        Ok(to)
    }
}

impl Drop for StagedBins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies the executables of `bin` (crest, the harness, the workloads) into
/// a directory of this run's own in the crest cache, where a guest can see
/// them. Guests read their binaries over 9p page by page: run from the
/// checkout, a rebuild during the run swaps the file under a running guest
/// process (seen as a SIGSEGV in crest), and two runs would share one copy.
pub fn stage_bins(bin: &Path) -> Result<StagedBins> {
    use std::os::unix::fs::PermissionsExt;
    let root = crest_vm::cache::Cache::default_root()?.join("staged-bins");
    sweep_dead_runs(&root);
    let dest = root.join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest).with_context(|| format!("create {}", dest.display()))?;
    let staged = StagedBins { dir: dest.clone() };
    for entry in std::fs::read_dir(bin).with_context(|| format!("read {}", bin.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            std::fs::copy(entry.path(), dest.join(entry.file_name())).with_context(|| {
                format!("copy {} to {}", entry.path().display(), dest.display())
            })?;
        }
    }
    // The C ABI case links the libcrest.so cargo keeps fresh in deps/.
    let lib = bin.join("deps").join("libcrest.so");
    if lib.is_file() {
        let deps = dest.join("deps");
        std::fs::create_dir_all(&deps).with_context(|| format!("create {}", deps.display()))?;
        std::fs::copy(&lib, deps.join("libcrest.so"))
            .with_context(|| format!("copy {} to {}", lib.display(), deps.display()))?;
    }
    eprintln!(
        "guests run a copy of {} in {}",
        bin.display(),
        dest.display()
    );
    Ok(staged)
}

/// Removes the staged copies of runs that were killed before they could
/// clean up (`run-PID` whose process is gone).
fn sweep_dead_runs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Paths the guest cannot see (they are fresh tmpfs there).
pub fn check_guest_visible(p: &Path) -> Result<()> {
    for hidden in ["/tmp", "/var/tmp", "/run", "/dev", "/proc", "/sys"] {
        if p.starts_with(hidden) {
            bail!(
                "{} is under {hidden}, which is a fresh tmpfs inside the guest; use a target dir elsewhere",
                p.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choice_expansion() {
        let k = choose_kernels(&[], None, None, &["host", "6.1"]).unwrap();
        assert_eq!(k, [KernelChoice::Host, KernelChoice::Catalog("6.1".into())]);
        let all = choose_kernels(&["all".into(), "6.1".into()], None, None, &[]).unwrap();
        assert_eq!(all.len(), 1 + catalog::CATALOG.len());
        let e = choose_kernels(&["6.6".into()], None, None, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("5.10, 6.1, 6.12, 7.2") && e.contains("--kernel-image"),
            "{e}"
        );
        let c = choose_kernels(&[], Some(Path::new("/b/bzImage")), None, &["host"]).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].label(), "custom");
    }

    #[test]
    fn hidden_paths() {
        assert!(check_guest_visible(Path::new("/tmp/t/debug")).is_err());
        assert!(check_guest_visible(Path::new("/work/main/target/debug")).is_ok());
    }
}
