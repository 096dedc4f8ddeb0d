//! Kernel fetch and cache.
//!
//! Layout under the cache root (`$XDG_CACHE_HOME/crest`, else `~/.cache/crest`):
//! ```text
//! kernels/<version>/manifest.json   what was fetched: packages + sha256, files + sha256, module order
//! kernels/<version>/vmlinuz
//! kernels/<version>/config
//! kernels/<version>/modules/<name>.ko[.xz]   only the modules the guest loads
//! kernels/<version>/modules.builtin           when the package ships it
//! apt/<version>/                              private apt state (sources.list, lists, status)
//! ```
//! A kernel whose manifest and files check out is used as is: no network.
//! Fetching uses the ordinary apt client with a private configuration; the
//! system's apt configuration is never changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{self, CatalogEntry, Resolved};
use crate::initramfs::ModuleFile;
use crate::modinfo::{self, ModuleIndex, GUEST_LEAF_MODULES};
use crate::Error;

/// The Debian archive keyring used to check the suites' signatures.
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const MANIFEST: &str = "manifest.json";
// 2: the socket diagnostics modules joined the guest modules.
// 3: nf_tables (and nfnetlink) joined them, for `dump --tcp-established`.
// 4: with crc32c_generic, which libcrc32c (nf_tables' dependency) needs loaded first.
const MANIFEST_SCHEMA: &str = "crest-kernel-cache/4";

/// A fetched package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    pub name: String,
    pub version: String,
    /// sha256 of the `.deb`.
    pub sha256: String,
    pub size: u64,
}

/// A module kept in the cache, in load order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub name: String,
    /// Path relative to the kernel's cache dir.
    pub file: String,
}

/// `kernels/<version>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    /// Catalog version (`6.1`).
    pub version: String,
    /// `uname -r` of the kernel.
    pub release: String,
    pub packages: Vec<PackageRecord>,
    /// sha256 of every kept file, by path relative to the kernel's dir.
    pub files: BTreeMap<String, String>,
    /// Modules to load, in order.
    pub modules: Vec<ModuleRecord>,
    /// The leaf modules the order was computed from.
    pub leaves: Vec<String>,
    /// The kernel loads xz-compressed modules itself (CONFIG_MODULE_DECOMPRESS=y).
    pub module_decompress: bool,
    /// Seconds since the epoch when fetched.
    pub fetched_at: u64,
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct BootKernel {
    /// `6.1`, `custom`, …
    pub label: String,
    pub vmlinuz: PathBuf,
    /// `uname -r`, when known before booting.
    pub release: Option<String>,
    /// Module files in load order.
    pub modules: Vec<(String, PathBuf)>,
    /// Whether compressed modules can be handed to the kernel as they are.
    pub module_decompress: bool,
}

impl BootKernel {
    /// Reads the modules for the initramfs; decompresses those the kernel
    /// cannot decompress itself.
    pub fn module_files(&self) -> Result<Vec<ModuleFile>, Error> {
        self.modules
            .iter()
            .map(|(name, path)| {
                let raw = std::fs::read(path)
                    .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
                if modinfo::is_xz(&raw) && !self.module_decompress {
                    let data = modinfo::decompress(&raw).map_err(|msg| Error::Module {
                        path: path.clone(),
                        msg,
                    })?;
                    Ok(ModuleFile {
                        name: name.clone(),
                        data,
                        compressed: false,
                    })
                } else {
                    Ok(ModuleFile {
                        name: name.clone(),
                        compressed: modinfo::is_xz(&raw),
                        data: raw,
                    })
                }
            })
            .collect()
    }

    /// A user's own kernel image, with an optional `lib/modules/<release>`
    /// tree. Without one, 9p and virtio must be built in.
    pub fn custom(image: &Path, modules_dir: Option<&Path>) -> Result<Self, Error> {
        if !image.is_file() {
            return Err(Error::Other(format!(
                "kernel image {} not found",
                image.display()
            )));
        }
        let mut kernel = BootKernel {
            label: "custom".into(),
            vmlinuz: image.to_path_buf(),
            release: None,
            modules: Vec::new(),
            module_decompress: false,
        };
        if let Some(dir) = modules_dir {
            let config = std::fs::read_to_string(dir.join("config"))
                .or_else(|_| std::fs::read_to_string(dir.join("build/.config")))
                .unwrap_or_default();
            let mut idx = ModuleIndex::scan(dir)?.with_config(&config);
            idx.assume_builtin_if_missing = config.is_empty() && idx.builtin.is_none();
            let order = idx.guest_load_order()?;
            kernel.module_decompress =
                modinfo::config_y_symbols(&config).contains("CONFIG_MODULE_DECOMPRESS");
            kernel.modules = order
                .into_iter()
                .filter_map(|n| idx.files.get(&n).cloned().map(|p| (n, p)))
                .collect();
            kernel.release = dir.file_name().and_then(|n| n.to_str()).map(str::to_string);
        }
        Ok(kernel)
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f =
        std::fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The cache root.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

/// What `kernels` lists for one catalog entry.
#[derive(Debug, Clone)]
pub struct CacheStatus {
    pub entry: CatalogEntry,
    pub manifest: Option<Manifest>,
    /// Why a present cache entry is not usable.
    pub problem: Option<String>,
}

impl Cache {
    /// `$XDG_CACHE_HOME/crest`, else `$HOME/.cache/crest`.
    pub fn default_root() -> Result<PathBuf, Error> {
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            return Ok(PathBuf::from(x).join("crest"));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Error::Other("neither XDG_CACHE_HOME nor HOME is set".into()))?;
        Ok(PathBuf::from(home).join(".cache").join("crest"))
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    pub fn kernel_dir(&self, version: &str) -> PathBuf {
        self.root.join("kernels").join(version)
    }

    pub fn apt_dir(&self, version: &str) -> PathBuf {
        self.root.join("apt").join(version)
    }

    /// Reads and checks a cached kernel: `Ok(None)` when absent,
    /// `Err` text when present but damaged or stale.
    pub fn check(&self, version: &str) -> Result<Option<Manifest>, String> {
        let dir = self.kernel_dir(version);
        let text = match std::fs::read_to_string(dir.join(MANIFEST)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read manifest: {e}")),
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("bad manifest: {e}"))?;
        if m.schema != MANIFEST_SCHEMA {
            return Err(format!(
                "manifest schema {} (want {MANIFEST_SCHEMA})",
                m.schema
            ));
        }
        if m.leaves != GUEST_LEAF_MODULES {
            return Err(format!(
                "cached for modules {:?}, now needed {:?}",
                m.leaves, GUEST_LEAF_MODULES
            ));
        }
        for (file, want) in &m.files {
            let got = sha256_file(&dir.join(file)).map_err(|e| e.to_string())?;
            if &got != want {
                return Err(format!("{file}: sha256 {got}, manifest says {want}"));
            }
        }
        Ok(Some(m))
    }

    /// The boot kernel of a checked manifest.
    pub fn boot_kernel(&self, m: &Manifest) -> BootKernel {
        let dir = self.kernel_dir(&m.version);
        BootKernel {
            label: m.version.clone(),
            vmlinuz: dir.join("vmlinuz"),
            release: Some(m.release.clone()),
            modules: m
                .modules
                .iter()
                .map(|r| (r.name.clone(), dir.join(&r.file)))
                .collect(),
            module_decompress: m.module_decompress,
        }
    }

    /// Every catalog entry with its cache state.
    pub fn status(&self) -> Vec<CacheStatus> {
        catalog::CATALOG
            .iter()
            .map(|e| match self.check(e.version) {
                Ok(m) => CacheStatus {
                    entry: *e,
                    manifest: m,
                    problem: None,
                },
                Err(p) => CacheStatus {
                    entry: *e,
                    manifest: None,
                    problem: Some(p),
                },
            })
            .collect()
    }

    /// Returns the cached kernel, or runs `fetch` to fill a staging directory
    /// (which must write the kept files and return their manifest), then
    /// moves it into place. `fetch` is not called on a cache hit.
    pub fn ensure_with(
        &self,
        version: &str,
        fetch: impl FnOnce(&Path) -> Result<Manifest, Error>,
    ) -> Result<(BootKernel, bool), Error> {
        match self.check(version) {
            Ok(Some(m)) => return Ok((self.boot_kernel(&m), true)),
            Ok(None) => {}
            Err(problem) => {
                tracing::warn!(version, %problem, "cached kernel unusable, fetching again")
            }
        }
        let kernels = self.root.join("kernels");
        std::fs::create_dir_all(&kernels)
            .map_err(|e| Error::io(format!("create {}", kernels.display()), e))?;
        let staging = kernels.join(format!(".{version}.staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| Error::io("create staging dir", e))?;
        let result = fetch(&staging).and_then(|m| {
            let text = serde_json::to_string_pretty(&m).map_err(|e| Error::Other(e.to_string()))?;
            std::fs::write(staging.join(MANIFEST), text)
                .map_err(|e| Error::io("write manifest", e))?;
            let dest = self.kernel_dir(version);
            let _ = std::fs::remove_dir_all(&dest);
            if let Err(e) = std::fs::rename(&staging, &dest) {
                // Another process may have filled the cache meanwhile.
                return match self.check(version) {
                    Ok(Some(theirs)) => Ok(theirs),
                    _ => Err(Error::io(format!("rename to {}", dest.display()), e)),
                };
            }
            Ok(m)
        });
        let _ = std::fs::remove_dir_all(&staging);
        let m = result?;
        Ok((self.boot_kernel(&m), false))
    }

    /// The cached kernel for a catalog version, fetching it from the archive
    /// when needed. Returns the kernel and whether it came from the cache.
    pub fn ensure(
        &self,
        version: &str,
        mirror: Option<&str>,
        progress: &dyn Fn(&str),
    ) -> Result<(BootKernel, bool), Error> {
        let entry = catalog::lookup(version)?;
        self.ensure_with(version, |staging| {
            let mirror = crate::mirror::detect(mirror)?;
            let apt = Apt::new(self.apt_dir(version));
            fetch_kernel(entry, &mirror, &apt, staging, progress)
        })
    }
}

/// A private apt configuration: its own sources, lists, cache and status.
#[derive(Debug, Clone)]
pub struct Apt {
    pub dir: PathBuf,
}

impl Apt {
    pub fn new(dir: PathBuf) -> Self {
        Apt { dir }
    }

    /// The `sources.list` text for `suites` of `mirror`, checked against the
    /// Debian archive keyring.
    pub fn sources_list(mirror: &str, suites: &[&str]) -> String {
        suites
            .iter()
            .map(|s| format!("deb [arch=amd64 signed-by={KEYRING}] {mirror} {s} main\n"))
            .collect()
    }

    /// `-o` options that point apt at the private state.
    pub fn options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        [
            format!("Dir::Etc::sourcelist={}", d("sources.list")),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            format!("Dir::State::status={}", d("status")),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".into(),
            "APT::Architecture=amd64".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    /// Writes the private configuration.
    pub fn prepare(&self, mirror: &str, suites: &[&str]) -> Result<(), Error> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            let p = self.dir.join(sub);
            std::fs::create_dir_all(&p)
                .map_err(|e| Error::io(format!("create {}", p.display()), e))?;
        }
        std::fs::write(
            self.dir.join("sources.list"),
            Self::sources_list(mirror, suites),
        )
        .map_err(|e| Error::io("write private sources.list", e))?;
        let status = self.dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "").map_err(|e| Error::io("write private status", e))?;
        }
        Ok(())
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(self.options());
        if is_root() {
            // The private dirs belong to root; apt's `_apt` sandbox user
            // could not write into them.
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c.env("LC_ALL", "C");
        c
    }

    pub fn update(&self) -> Result<(), Error> {
        let mut c = self.command("apt-get");
        c.args(["-q", "update"]);
        run_checked(c).map(|_| ())
    }

    /// Package stanzas (`apt-cache show`) of every candidate name for `version`.
    pub fn candidates(&self, version: &str) -> Result<Vec<catalog::Stanza>, Error> {
        let mut names = Vec::new();
        for prefix in [
            "linux-image-",
            "linux-binary-",
            "linux-modules-",
            "linux-base-",
        ] {
            let mut c = self.command("apt-cache");
            c.args(["pkgnames", &format!("{prefix}{version}")]);
            // pkgnames exits non-zero when nothing matches.
            if let Ok(out) = run_checked(c) {
                names.extend(out.lines().map(str::to_string));
            }
        }
        let names = catalog::candidate_names(version, names.iter().map(String::as_str));
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.command("apt-cache");
        c.arg("show").args(&names);
        Ok(catalog::parse_packages(&run_checked(c)?))
    }

    /// Downloads `name=version` into `dest`; returns the `.deb` path.
    pub fn download(&self, pkg: &catalog::PackageRef, dest: &Path) -> Result<PathBuf, Error> {
        std::fs::create_dir_all(dest)
            .map_err(|e| Error::io(format!("create {}", dest.display()), e))?;
        let mut c = self.command("apt-get");
        c.current_dir(dest)
            .args(["-q", "download", &format!("{}={}", pkg.name, pkg.version)]);
        run_checked(c)?;
        let prefix = format!("{}_", pkg.name);
        std::fs::read_dir(dest)
            .map_err(|e| Error::io("read download dir", e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
            .ok_or_else(|| {
                Error::Other(format!(
                    "apt-get download left no {prefix}*.deb in {}",
                    dest.display()
                ))
            })
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, returns its stdout; on failure, an error with its output.
pub fn run_checked(mut c: Command) -> Result<String, Error> {
    let shown = format!("{c:?}");
    tracing::debug!(command = %shown, "running");
    let out = c
        .output()
        .map_err(|e| Error::io(format!("run {shown}"), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            output: crate::tail_text(&output, 30),
        })
    }
}

/// Where the pieces of a kernel are inside its unpacked packages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub vmlinuz: PathBuf,
    pub config: Option<PathBuf>,
    pub modules_root: PathBuf,
}

/// Finds vmlinuz, config and the modules tree of `release` under `root`
/// (`/boot/vmlinuz-R` + `/lib/modules/R` in bullseye/bookworm,
/// `/usr/lib/modules/R/vmlinuz` in sid's split packages).
pub fn find_layout(root: &Path, release: &str) -> Result<Layout, Error> {
    let first = |cands: &[PathBuf]| cands.iter().find(|p| p.is_file()).cloned();
    let mods = [
        root.join("usr/lib/modules").join(release),
        root.join("lib/modules").join(release),
    ];
    let vmlinuz = first(&[
        root.join("boot").join(format!("vmlinuz-{release}")),
        mods[0].join("vmlinuz"),
        mods[1].join("vmlinuz"),
    ])
    .ok_or_else(|| Error::Layout(format!("no vmlinuz for {release} under {}", root.display())))?;
    let config = first(&[
        root.join("boot").join(format!("config-{release}")),
        mods[0].join("config"),
        mods[1].join("config"),
    ]);
    let modules_root = mods.iter().find(|p| p.is_dir()).cloned().ok_or_else(|| {
        Error::Layout(format!(
            "no modules directory for {release} under {}",
            root.display()
        ))
    })?;
    Ok(Layout {
        vmlinuz,
        config,
        modules_root,
    })
}

/// Copies what the guest needs from an unpacked kernel into `staging` and
/// returns the manifest (without package records).
pub fn keep_from_unpacked(
    unpacked: &Path,
    resolved: &Resolved,
    staging: &Path,
) -> Result<Manifest, Error> {
    let layout = find_layout(unpacked, &resolved.release)?;
    let config_text = match &layout.config {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| Error::io(format!("read {}", p.display()), e))?
        }
        None => String::new(),
    };
    let idx = ModuleIndex::scan(&layout.modules_root)?.with_config(&config_text);
    let order = idx.guest_load_order()?;
    let mut files = BTreeMap::new();
    let copy =
        |from: &Path, rel: &str, files: &mut BTreeMap<String, String>| -> Result<(), Error> {
            let to = staging.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io("create dir", e))?;
            }
            std::fs::copy(from, &to).map_err(|e| {
                Error::io(format!("copy {} to {}", from.display(), to.display()), e)
            })?;
            files.insert(rel.to_string(), sha256_file(&to)?);
            Ok(())
        };
    copy(&layout.vmlinuz, "vmlinuz", &mut files)?;
    if let Some(c) = &layout.config {
        copy(c, "config", &mut files)?;
    }
    let builtin = layout.modules_root.join("modules.builtin");
    if builtin.is_file() {
        copy(&builtin, "modules.builtin", &mut files)?;
    }
    let mut modules = Vec::new();
    for name in order {
        let src = &idx.files[&name];
        let fname = src
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("module.ko");
        let rel = format!("modules/{fname}");
        copy(src, &rel, &mut files)?;
        modules.push(ModuleRecord { name, file: rel });
    }
    Ok(Manifest {
        schema: MANIFEST_SCHEMA.into(),
        version: resolved.version.clone(),
        release: resolved.release.clone(),
        packages: Vec::new(),
        files,
        modules,
        leaves: GUEST_LEAF_MODULES.iter().map(|s| s.to_string()).collect(),
        module_decompress: idx.config_y.contains("CONFIG_MODULE_DECOMPRESS"),
        fetched_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// The network half: private apt update, resolve, download, unpack, keep.
pub fn fetch_kernel(
    entry: &CatalogEntry,
    mirror: &str,
    apt: &Apt,
    staging: &Path,
    progress: &dyn Fn(&str),
) -> Result<Manifest, Error> {
    apt.prepare(mirror, entry.suites)?;
    progress(&format!("apt-get update ({})", entry.suites.join(", ")));
    apt.update()?;
    let stanzas = apt.candidates(entry.version)?;
    let resolved = catalog::resolve(entry.version, entry.suites, &stanzas)?;
    tracing::info!(version = entry.version, release = %resolved.release, packages = ?resolved.packages, "resolved");
    let work = staging.join(".work");
    let debs = work.join("debs");
    let unpacked = work.join("root");
    let mut records = Vec::new();
    for pkg in &resolved.packages {
        progress(&format!("apt-get download {}={}", pkg.name, pkg.version));
        let deb = apt.download(pkg, &debs)?;
        let size = std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0);
        records.push(PackageRecord {
            name: pkg.name.clone(),
            version: pkg.version.clone(),
            sha256: sha256_file(&deb)?,
            size,
        });
        progress(&format!("dpkg-deb -x {}", pkg.name));
        let mut c = Command::new("dpkg-deb");
        c.arg("-x").arg(&deb).arg(&unpacked);
        run_checked(c)?;
    }
    let mut m = keep_from_unpacked(&unpacked, &resolved, staging)?;
    m.packages = records;
    std::fs::remove_dir_all(&work).map_err(|e| Error::io("remove unpacked packages", e))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::PackageRef;
    use crate::modinfo::tests::fake_module;
    use std::cell::Cell;

    /// A fake unpacked bookworm-style package.
    fn fake_unpacked(root: &Path, release: &str) {
        let boot = root.join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::write(boot.join(format!("vmlinuz-{release}")), b"kernel").unwrap();
        std::fs::write(boot.join(format!("config-{release}")), "CONFIG_VIRTIO=y\n").unwrap();
        let m = root.join("lib/modules").join(release).join("kernel");
        std::fs::create_dir_all(&m).unwrap();
        let w = |n: &str, deps: &str| {
            std::fs::write(
                m.join(format!("{n}.ko")),
                fake_module(format!("depends={deps}\0").as_bytes()),
            )
            .unwrap()
        };
        w("virtio_pci", "virtio_pci_modern_dev,virtio");
        w("virtio_pci_modern_dev", "");
        w("9pnet", "");
        w("9pnet_virtio", "9pnet,virtio");
        w("9p", "9pnet");
        w("ext4", "");
    }

    #[test]
    fn finds_split_layout() {
        let d = tempfile::tempdir().unwrap();
        let rel = "7.2.13+deb14-amd64";
        let m = d.path().join("usr/lib/modules").join(rel);
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("vmlinuz"), b"k").unwrap();
        let l = find_layout(d.path(), rel).unwrap();
        assert_eq!(l.vmlinuz, m.join("vmlinuz"));
        assert_eq!(l.config, None);
        assert_eq!(l.modules_root, m);
        assert!(find_layout(d.path(), "6.1.0-1-amd64").is_err());
    }

    #[test]
    fn caches_and_second_run_uses_cache() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path().join("crest"));
        let unpacked = d.path().join("unpacked");
        let release = "6.1.0-50-amd64";
        fake_unpacked(&unpacked, release);
        let resolved = Resolved {
            version: "6.1".into(),
            release: release.into(),
            packages: vec![PackageRef {
                name: "linux-image-6.1.0-50-amd64-unsigned".into(),
                version: "6.1.158-1".into(),
            }],
        };
        let calls = Cell::new(0);
        let fetch = |staging: &Path| {
            calls.set(calls.get() + 1);
            keep_from_unpacked(&unpacked, &resolved, staging)
        };
        let (k, cached) = cache.ensure_with("6.1", fetch).unwrap();
        assert!(!cached);
        assert_eq!(calls.get(), 1);
        let dir = cache.kernel_dir("6.1");
        assert_eq!(k.vmlinuz, dir.join("vmlinuz"));
        assert_eq!(std::fs::read(&k.vmlinuz).unwrap(), b"kernel");
        assert!(dir.join("config").is_file());
        assert!(dir.join("manifest.json").is_file());
        // Only the modules the guest loads, dependencies first; virtio is built in.
        let names: Vec<_> = k.modules.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_pci_modern_dev",
                "virtio_pci",
                "9pnet",
                "9pnet_virtio",
                "9p"
            ]
        );
        assert!(!dir.join("modules/ext4.ko").exists());
        assert!(dir.join("modules/9p.ko").is_file());
        // No staging leftovers.
        let leftovers: Vec<_> = std::fs::read_dir(d.path().join("crest/kernels"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [std::ffi::OsString::from("6.1")]);

        // Second run: from the cache, fetch not called.
        let (k2, cached) = cache
            .ensure_with("6.1", |_| -> Result<Manifest, Error> {
                panic!("fetched again")
            })
            .unwrap();
        assert!(cached);
        assert_eq!(k2.modules, k.modules);
        assert_eq!(k2.release.as_deref(), Some(release));

        // A damaged file is detected and fetched again.
        std::fs::write(dir.join("vmlinuz"), b"tampered").unwrap();
        assert!(cache.check("6.1").unwrap_err().contains("vmlinuz"));
        let (_, cached) = cache.ensure_with("6.1", fetch).unwrap();
        assert!(!cached);
        assert_eq!(calls.get(), 2);

        // A failed fetch leaves nothing behind.
        let e = cache
            .ensure_with("5.10", |_| Err(Error::Other("offline".into())))
            .unwrap_err();
        assert!(e.to_string().contains("offline"));
        assert!(!cache.kernel_dir("5.10").exists());

        let st = cache.status();
        assert_eq!(st.len(), catalog::CATALOG.len());
        assert!(st
            .iter()
            .any(|s| s.entry.version == "6.1" && s.manifest.is_some()));
    }

    #[test]
    fn private_apt_config() {
        let apt = Apt::new(PathBuf::from("/c/apt/6.12"));
        let src = Apt::sources_list("http://m.example/debian", &["trixie", "bookworm-backports"]);
        assert_eq!(
            src,
            format!(
                "deb [arch=amd64 signed-by={KEYRING}] http://m.example/debian trixie main\n\
                 deb [arch=amd64 signed-by={KEYRING}] http://m.example/debian bookworm-backports main\n"
            )
        );
        let o = apt.options();
        assert!(o.contains(&"Dir::Etc::sourcelist=/c/apt/6.12/sources.list".to_string()));
        assert!(o.contains(&"Dir::Etc::sourceparts=-".to_string()));
        assert!(o.contains(&"Dir::State::status=/c/apt/6.12/status".to_string()));
    }

    #[test]
    fn custom_kernel_with_modules_dir() {
        let d = tempfile::tempdir().unwrap();
        let release = "6.6.1-custom";
        fake_unpacked(d.path(), release);
        let img = d.path().join("boot").join(format!("vmlinuz-{release}"));
        let k =
            BootKernel::custom(&img, Some(&d.path().join("lib/modules").join(release))).unwrap();
        assert_eq!(k.release.as_deref(), Some(release));
        // No config: virtio assumed built in.
        assert_eq!(k.modules.len(), 5);
        let files = k.module_files().unwrap();
        assert!(files.iter().all(|f| !f.compressed));
        assert!(BootKernel::custom(&d.path().join("nope"), None).is_err());
    }
}
