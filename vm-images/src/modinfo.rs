//! Kernel modules without `modules.dep`: read each module's `.modinfo` ELF
//! section (`depends=`), and order the modules the guest needs so every module
//! is loaded after the ones it depends on.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::Error;

/// `finit_module` flag: the file is compressed, the kernel decompresses it.
pub const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// The guest needs these (and what they depend on): virtio PCI transport,
/// 9p over virtio, and the 9p file system.
pub const GUEST_LEAF_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// Loaded too when the kernel has them as modules: the socket diagnostics
/// crest uses to find a unix socket's peer and a listening socket's queue,
/// and nf_tables (with nfnetlink), which holds the traffic of connections
/// `dump --tcp-established` carries to peers outside the dump.
/// Debian builds them as modules, and the guest has no modprobe to load them
/// on demand; a kernel without them still boots (crest then refuses those
/// sockets, or `--tcp-established` for them). `crc32c_generic` comes before
/// nf_tables: up to 6.12 nf_tables needs libcrc32c, whose init fails (ENOENT)
/// without a crc32c crypto driver, a soft dependency `depends=` does not list.
pub const GUEST_OPTIONAL_MODULES: &[&str] = &[
    "unix_diag",
    "inet_diag",
    "tcp_diag",
    "crc32c_generic",
    "nf_tables",
];

/// The `CONFIG_` symbol of modules the guest needs, to tell a built-in one
/// (`=y`) from a missing one when the package ships no `modules.builtin`.
pub fn config_symbol(module: &str) -> Option<&'static str> {
    Some(match module {
        "virtio" => "CONFIG_VIRTIO",
        "virtio_ring" => "CONFIG_VIRTIO",
        "virtio_pci" => "CONFIG_VIRTIO_PCI",
        "virtio_pci_modern_dev" => "CONFIG_VIRTIO_PCI_LIB",
        "virtio_pci_legacy_dev" => "CONFIG_VIRTIO_PCI_LIB_LEGACY",
        "9p" => "CONFIG_9P_FS",
        "9pnet" => "CONFIG_NET_9P",
        "9pnet_virtio" => "CONFIG_NET_9P_VIRTIO",
        "netfs" => "CONFIG_NETFS_SUPPORT",
        "fscache" => "CONFIG_FSCACHE",
        _ => return None,
    })
}

/// Module names use `_` and `-` interchangeably; the kernel uses `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// `9pnet_virtio` from `…/9pnet_virtio.ko.xz`.
pub fn module_name_from_path(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suf| file.strip_suffix(suf))?;
    Some(normalize(stem))
}

/// Whether the file is xz-compressed (by its magic).
pub fn is_xz(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00])
}

/// Reads a module file, decompressing `.xz`. Other compressions are refused
/// with a clear error.
pub fn read_module(path: &Path) -> Result<Vec<u8>, Error> {
    let raw = std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    decompress(&raw).map_err(|msg| Error::Module {
        path: path.to_path_buf(),
        msg,
    })
}

/// Decompresses xz data, passes plain ELF through.
pub fn decompress(raw: &[u8]) -> Result<Vec<u8>, String> {
    if is_xz(raw) {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut std::io::BufReader::new(raw), &mut out)
            .map_err(|e| format!("xz: {e}"))?;
        Ok(out)
    } else if raw.starts_with(b"\x7fELF") {
        Ok(raw.to_vec())
    } else if raw.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Err("zstd-compressed module: not supported (only .ko and .ko.xz)".into())
    } else {
        Err("not an ELF file nor xz data".into())
    }
}

fn rd_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn rd_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Returns the contents of the named section of a little-endian ELF64 file.
pub fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<&'a [u8], String> {
    if !elf.starts_with(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a little-endian ELF64 file".into());
    }
    let bad = || "truncated ELF header".to_string();
    let shoff = rd_u64(elf, 0x28).ok_or_else(bad)? as usize;
    let shentsize = rd_u16(elf, 0x3A).ok_or_else(bad)? as usize;
    let shnum = rd_u16(elf, 0x3C).ok_or_else(bad)? as usize;
    let shstrndx = rd_u16(elf, 0x3E).ok_or_else(bad)? as usize;
    if shentsize < 64 {
        return Err(format!("section header size {shentsize} too small"));
    }
    let sh = |i: usize| -> Result<(u32, usize, usize), String> {
        let base = shoff
            .checked_add(i.checked_mul(shentsize).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let name = rd_u32(elf, base).ok_or_else(|| format!("section header {i} out of range"))?;
        let off = rd_u64(elf, base + 24).ok_or_else(bad)? as usize;
        let size = rd_u64(elf, base + 32).ok_or_else(bad)? as usize;
        Ok((name, off, size))
    };
    let data = |off: usize, size: usize| -> Result<&'a [u8], String> {
        elf.get(off..off.checked_add(size).ok_or_else(bad)?)
            .ok_or_else(|| format!("section data {off:#x}+{size:#x} out of range"))
    };
    let (_, stroff, strsize) = sh(shstrndx)?;
    let strtab = data(stroff, strsize)?;
    for i in 0..shnum {
        let (name, off, size) = sh(i)?;
        let name = strtab
            .get(name as usize..)
            .and_then(|s| s.split(|&c| c == 0).next())
            .unwrap_or_default();
        if name == wanted.as_bytes() {
            return data(off, size);
        }
    }
    Err(format!("no {wanted} section"))
}

/// Parses a `.modinfo` section: NUL-separated `key=value` strings.
pub fn parse_modinfo(section: &[u8]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in section.split(|&c| c == 0) {
        let Ok(s) = std::str::from_utf8(entry) else {
            continue;
        };
        if let Some((k, v)) = s.split_once('=') {
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

/// The modules an (uncompressed) module depends on, from `depends=`.
pub fn depends_of(elf: &[u8]) -> Result<Vec<String>, String> {
    let info = parse_modinfo(elf_section(elf, ".modinfo")?);
    Ok(info
        .get("depends")
        .into_iter()
        .flatten()
        .flat_map(|d| d.split(','))
        .filter(|d| !d.is_empty())
        .map(normalize)
        .collect())
}

/// The modules of one kernel: files by name, and what `modules.builtin` says.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    pub files: BTreeMap<String, PathBuf>,
    /// From `modules.builtin`, if the package ships it.
    pub builtin: Option<BTreeSet<String>>,
    /// `CONFIG_X=y` symbols of the kernel's config, if known.
    pub config_y: BTreeSet<String>,
    /// Treat a missing module as built in (a user's kernel whose config and
    /// `modules.builtin` are unknown).
    pub assume_builtin_if_missing: bool,
}

impl ModuleIndex {
    /// Walks a `lib/modules/<release>` tree.
    pub fn scan(root: &Path) -> Result<Self, Error> {
        let mut idx = ModuleIndex::default();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("read dir {}", dir.display()), e))?;
            for e in rd {
                let e = e.map_err(|e| Error::io(format!("read dir {}", dir.display()), e))?;
                let ft = e.file_type().map_err(|e| Error::io("stat", e))?;
                let p = e.path();
                if ft.is_dir() {
                    stack.push(p);
                } else if let Some(name) = module_name_from_path(&p) {
                    idx.files.entry(name).or_insert(p);
                }
            }
        }
        if let Ok(t) = std::fs::read_to_string(root.join("modules.builtin")) {
            idx.builtin = Some(
                t.lines()
                    .filter_map(|l| module_name_from_path(Path::new(l.trim())))
                    .collect(),
            );
        }
        Ok(idx)
    }

    /// Records the `=y` symbols of a kernel config text.
    pub fn with_config(mut self, config: &str) -> Self {
        self.config_y = config_y_symbols(config);
        self
    }

    fn is_builtin(&self, name: &str) -> bool {
        if self.assume_builtin_if_missing || self.builtin.as_ref().is_some_and(|b| b.contains(name))
        {
            return true;
        }
        config_symbol(name).is_some_and(|sym| self.config_y.contains(sym))
    }

    /// The load order (dependencies first) of `leaves` and everything they
    /// depend on; built-in modules are skipped.
    /// The load order of [`GUEST_LEAF_MODULES`] (all required) followed by
    /// whichever [`GUEST_OPTIONAL_MODULES`] this kernel has.
    pub fn guest_load_order(&self) -> Result<Vec<String>, Error> {
        let mut order = self.load_order(GUEST_LEAF_MODULES)?;
        for opt in GUEST_OPTIONAL_MODULES {
            if let Ok(more) = self.load_order(&[opt]) {
                for m in more {
                    if !order.contains(&m) {
                        order.push(m);
                    }
                }
            }
        }
        Ok(order)
    }

    pub fn load_order(&self, leaves: &[&str]) -> Result<Vec<String>, Error> {
        load_order(leaves, |name| {
            if let Some(p) = self.files.get(name) {
                let elf = read_module(p)?;
                let deps = depends_of(&elf).map_err(|msg| Error::Module {
                    path: p.clone(),
                    msg,
                })?;
                Ok(Some(deps))
            } else if self.is_builtin(name) {
                Ok(None)
            } else {
                Err(Error::MissingModule(name.to_string()))
            }
        })
    }
}

/// `CONFIG_X=y` lines of a kernel config.
pub fn config_y_symbols(config: &str) -> BTreeSet<String> {
    config
        .lines()
        .filter_map(|l| l.strip_suffix("=y"))
        .filter(|s| s.starts_with("CONFIG_"))
        .map(str::to_string)
        .collect()
}

/// Dependencies of a module, or `None` when it is built in.
pub type DepsOf<'a> = dyn FnMut(&str) -> Result<Option<Vec<String>>, Error> + 'a;

/// Depth-first post-order over `deps_of` (which returns `None` for a module
/// that is built in). Dependencies come before their users; each module once.
pub fn load_order(
    leaves: &[&str],
    mut deps_of: impl FnMut(&str) -> Result<Option<Vec<String>>, Error>,
) -> Result<Vec<String>, Error> {
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut visiting = BTreeSet::new();
    fn visit(
        name: &str,
        deps_of: &mut DepsOf<'_>,
        order: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
    ) -> Result<(), Error> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(Error::ModuleCycle(name.to_string()));
        }
        if let Some(deps) = deps_of(name)? {
            for d in deps {
                visit(&d, deps_of, order, done, visiting)?;
            }
            order.push(name.to_string());
        }
        visiting.remove(name);
        done.insert(name.to_string());
        Ok(())
    }
    for leaf in leaves {
        visit(
            &normalize(leaf),
            &mut deps_of,
            &mut order,
            &mut done,
            &mut visiting,
        )?;
    }
    Ok(order)
}

/// Reads at most `limit` bytes of a file (for sniffing magic numbers).
pub fn read_head(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0; limit];
    let n = f.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 with a `.modinfo` section holding `modinfo`.
    pub(crate) fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        let modinfo_off = f.len();
        f.extend_from_slice(modinfo);
        let shstr_off = f.len();
        f.extend_from_slice(shstr);
        while f.len() % 8 != 0 {
            f.push(0);
        }
        let shoff = f.len();
        // Null, .shstrtab, .modinfo.
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstr.len());
        sh(11, modinfo_off, modinfo.len());
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        f[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        f[0x3E..0x40].copy_from_slice(&1u16.to_le_bytes());
        f
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(data), &mut out).unwrap();
        out
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let m = fake_module(b"license=GPL\0depends=9pnet,netfs,fscache\0intree=Y\0name=9p\0");
        assert_eq!(depends_of(&m).unwrap(), ["9pnet", "netfs", "fscache"]);
        let m = fake_module(b"license=GPL\0depends=\0name=virtio\0");
        assert!(depends_of(&m).unwrap().is_empty());
        assert!(depends_of(b"\x7fELF\x02\x01").is_err());
        assert!(depends_of(b"garbage").is_err());
    }

    #[test]
    fn decompresses_xz_modules() {
        let m = fake_module(b"depends=virtio-ring\0");
        let packed = xz(&m);
        assert!(is_xz(&packed));
        let un = decompress(&packed).unwrap();
        assert_eq!(depends_of(&un).unwrap(), ["virtio_ring"]);
    }

    /// The Debian 6.1 set, as its `.modinfo` sections say.
    fn deb61() -> BTreeMap<&'static str, Vec<&'static str>> {
        BTreeMap::from([
            ("virtio", vec![]),
            ("virtio_ring", vec!["virtio"]),
            ("virtio_pci_modern_dev", vec![]),
            ("virtio_pci_legacy_dev", vec![]),
            (
                "virtio_pci",
                vec![
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio_ring",
                    "virtio",
                ],
            ),
            ("netfs", vec![]),
            ("fscache", vec!["netfs"]),
            ("9pnet", vec![]),
            ("9pnet_virtio", vec!["9pnet", "virtio", "virtio_ring"]),
            ("9p", vec!["9pnet", "netfs", "fscache"]),
        ])
    }

    fn position(order: &[String], m: &str) -> usize {
        order
            .iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("{m} not in {order:?}"))
    }

    #[test]
    fn orders_dependencies_first() {
        let g = deb61();
        let order = load_order(GUEST_LEAF_MODULES, |n| {
            Ok(Some(g[n].iter().map(|s| s.to_string()).collect()))
        })
        .unwrap();
        assert_eq!(order.len(), g.len());
        for (m, deps) in &g {
            for d in deps {
                assert!(
                    position(&order, d) < position(&order, m),
                    "{d} before {m}: {order:?}"
                );
            }
        }
    }

    #[test]
    fn skips_builtin_and_reports_missing_and_cycles() {
        // 6.12: virtio and virtio_pci are built in.
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("kernel");
        std::fs::create_dir_all(root.join("net/9p")).unwrap();
        std::fs::create_dir_all(root.join("fs/9p")).unwrap();
        std::fs::create_dir_all(root.join("fs/netfs")).unwrap();
        std::fs::write(
            root.join("net/9p/9pnet.ko.xz"),
            xz(&fake_module(b"depends=\0")),
        )
        .unwrap();
        std::fs::write(
            root.join("net/9p/9pnet_virtio.ko.xz"),
            xz(&fake_module(b"depends=9pnet,virtio_ring,virtio\0")),
        )
        .unwrap();
        std::fs::write(
            root.join("fs/netfs/netfs.ko.xz"),
            xz(&fake_module(b"depends=\0")),
        )
        .unwrap();
        std::fs::write(
            root.join("fs/9p/9p.ko.xz"),
            xz(&fake_module(b"depends=9pnet,netfs\0")),
        )
        .unwrap();
        std::fs::write(
            d.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n",
        )
        .unwrap();
        let idx = ModuleIndex::scan(d.path())
            .unwrap()
            .with_config("CONFIG_VIRTIO_PCI=y\n# CONFIG_FOO is not set\n");
        let order = idx.load_order(GUEST_LEAF_MODULES).unwrap();
        assert_eq!(order, ["9pnet", "9pnet_virtio", "netfs", "9p"]);

        let idx2 = ModuleIndex::scan(d.path()).unwrap();
        let e = idx2.load_order(&["virtio_pci"]).unwrap_err();
        assert!(
            matches!(e, Error::MissingModule(ref m) if m == "virtio_pci"),
            "{e}"
        );

        let e = load_order(&["a"], |n| {
            Ok(Some(vec![if n == "a" { "b".into() } else { "a".into() }]))
        })
        .unwrap_err();
        assert!(matches!(e, Error::ModuleCycle(_)));
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(
            module_name_from_path(Path::new("a/9pnet-virtio.ko.xz")).as_deref(),
            Some("9pnet_virtio")
        );
        assert_eq!(
            module_name_from_path(Path::new("a/9p.ko")).as_deref(),
            Some("9p")
        );
        assert_eq!(module_name_from_path(Path::new("modules.order")), None);
    }
}
