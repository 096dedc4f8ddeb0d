//! The kernel catalog: which kernel versions Debian's archive provides and in
//! which suites, and the resolution of exact package names from a suite's
//! `Packages` index at fetch time (no ABI number is hard-coded here).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{debver, Error};

/// One kernel version the archive provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// `major.minor`, the name users pass to `--kernel`.
    pub version: &'static str,
    /// The suites searched for it; the newest package over all of them wins.
    pub suites: &'static [&'static str],
}

/// Every kernel the VM runner can fetch by version.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        version: "5.10",
        suites: &["bullseye"],
    },
    CatalogEntry {
        version: "6.1",
        suites: &["bookworm"],
    },
    CatalogEntry {
        version: "6.12",
        suites: &["trixie", "bookworm-backports"],
    },
    CatalogEntry {
        version: "7.2",
        suites: &["sid"],
    },
];

/// The catalog versions, for messages.
pub fn available_versions() -> Vec<&'static str> {
    CATALOG.iter().map(|e| e.version).collect()
}

/// Finds a catalog entry, or explains which versions exist and how to bring
/// one's own kernel.
pub fn lookup(version: &str) -> Result<&'static CatalogEntry, Error> {
    CATALOG
        .iter()
        .find(|e| e.version == version)
        .ok_or_else(|| Error::UnknownKernel {
            requested: version.to_string(),
            available: available_versions().join(", "),
        })
}

/// One stanza of a Debian `Packages` index (or of `apt-cache show` output).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stanza {
    pub fields: BTreeMap<String, String>,
}

impl Stanza {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

/// Parses RFC 822 style stanzas separated by blank lines. Continuation lines
/// (starting with a space or tab) are appended to the previous field.
pub fn parse_packages(text: &str) -> Vec<Stanza> {
    let mut out = Vec::new();
    let mut cur = Stanza::default();
    let mut last_key: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.fields.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            last_key = None;
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(k) = &last_key {
                if let Some(v) = cur.fields.get_mut(k) {
                    v.push('\n');
                    v.push_str(line.trim());
                }
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            cur.fields
                .insert(k.trim().to_string(), v.trim().to_string());
            last_key = Some(k.trim().to_string());
        }
    }
    if !cur.fields.is_empty() {
        out.push(cur);
    }
    out
}

/// A package to download, pinned to one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRef {
    pub name: String,
    pub version: String,
}

/// The result of resolving a catalog version against the archive's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// Catalog version (`6.1`).
    pub version: String,
    /// Kernel release, as `uname -r` will print it (`6.1.0-50-amd64`).
    pub release: String,
    /// The packages that together hold vmlinuz, config and modules.
    pub packages: Vec<PackageRef>,
}

/// If `name` is the image package of the plain `amd64` flavour of kernel
/// `version` (`major.minor`), returns its release (`<abi>-amd64`).
pub fn image_release(name: &str, version: &str) -> Option<String> {
    let rest = name.strip_prefix("linux-image-")?;
    let rest = rest.strip_suffix("-unsigned").unwrap_or(rest);
    let abi = rest.strip_suffix("-amd64")?;
    let after = abi.strip_prefix(version)?;
    // `6.1` must not match `6.12.x`.
    if !(after.starts_with('.') || after.starts_with('-') || after.starts_with('+')) {
        return None;
    }
    // Other flavours (`-cloud`, `-rt`) add an alphabetic dash segment.
    let mut parts = abi.split('-');
    let first = parts.next()?;
    if !first.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if !parts.all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())) {
        return None;
    }
    Some(format!("{abi}-amd64"))
}

fn newest<'a>(stanzas: &'a [Stanza], name: &str) -> Option<&'a Stanza> {
    stanzas
        .iter()
        .filter(|s| s.get("Package") == Some(name))
        .max_by(|a, b| {
            debver::compare(
                a.get("Version").unwrap_or(""),
                b.get("Version").unwrap_or(""),
            )
        })
}

/// Picks the newest plain-`amd64` kernel of `version` in `stanzas`, and the
/// packages holding it:
/// - `linux-binary-R` + `linux-modules-R` (+ `linux-base-R`, with config and
///   `modules.builtin`) where the kernel is split (sid 7.x),
/// - else `linux-image-R-unsigned` (the unsigned image; same kernel as the
///   signed one, without the EFI signature),
/// - else `linux-image-R`.
pub fn resolve(version: &str, suites: &[&str], stanzas: &[Stanza]) -> Result<Resolved, Error> {
    let mut best: Option<(String, String)> = None; // (release, package version)
    for s in stanzas {
        let (Some(name), Some(ver)) = (s.get("Package"), s.get("Version")) else {
            continue;
        };
        let Some(rel) = image_release(name, version) else {
            continue;
        };
        let better = match &best {
            None => true,
            Some((_, bv)) => debver::compare(ver, bv) == std::cmp::Ordering::Greater,
        };
        if better {
            best = Some((rel, ver.to_string()));
        }
    }
    let (release, _) = best.ok_or_else(|| Error::NoPackage {
        version: version.to_string(),
        suites: suites.join(", "),
    })?;
    let pin = |name: String| -> Option<PackageRef> {
        newest(stanzas, &name).map(|s| PackageRef {
            version: s.get("Version").unwrap_or_default().to_string(),
            name,
        })
    };
    let packages = if let Some(bin) = pin(format!("linux-binary-{release}")) {
        let modules = pin(format!("linux-modules-{release}")).ok_or_else(|| Error::NoPackage {
            version: format!("{version} (linux-modules-{release})"),
            suites: suites.join(", "),
        })?;
        // linux-base-R holds config and modules.builtin.
        let mut v = vec![bin, modules];
        v.extend(pin(format!("linux-base-{release}")));
        v
    } else if let Some(unsigned) = pin(format!("linux-image-{release}-unsigned")) {
        vec![unsigned]
    } else {
        vec![
            pin(format!("linux-image-{release}")).ok_or_else(|| Error::NoPackage {
                version: version.to_string(),
                suites: suites.join(", "),
            })?,
        ]
    };
    Ok(Resolved {
        version: version.to_string(),
        release,
        packages,
    })
}

/// The candidate package names to ask `apt-cache show` about: every name in
/// `names` (from `apt-cache pkgnames`) that could take part in a resolution.
pub fn candidate_names<'a>(version: &str, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = names
        .into_iter()
        .filter(|n| {
            image_release(n, version).is_some()
                || ["linux-binary-", "linux-modules-", "linux-base-"]
                    .iter()
                    .any(|p| {
                        n.strip_prefix(p).is_some_and(|r| {
                            image_release(&format!("linux-image-{r}"), version).is_some()
                        })
                    })
        })
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Package: linux-image-6.1.0-47-amd64-unsigned
Source: linux
Version: 6.1.153-1
Depends: kmod, initramfs-tools
Description: Linux 6.1 for 64-bit PCs
 The Linux kernel 6.1 and modules.

Package: linux-image-6.1.0-50-amd64-unsigned
Source: linux
Version: 6.1.158-1
Filename: pool/main/l/linux/linux-image-6.1.0-50-amd64-unsigned_6.1.158-1_amd64.deb

Package: linux-image-6.1.0-50-amd64
Source: linux-signed-amd64 (6.1.158+1)
Version: 6.1.158+1

Package: linux-image-6.1.0-51-cloud-amd64-unsigned
Version: 6.1.160-1

Package: linux-image-6.1.0-51-rt-amd64
Version: 6.1.160-1

Package: linux-image-6.1.0-50-amd64-dbg
Version: 6.1.158-1

Package: linux-image-6.12.95+deb12-amd64-unsigned
Version: 6.12.95-1~bpo12+1

Package: linux-image-6.12.117+deb13-amd64-unsigned
Version: 6.12.117-1

Package: linux-image-6.12.117+deb13-amd64
Version: 6.12.117+1

Package: linux-image-7.2.13+deb14-amd64
Version: 7.2.13-1
Depends: linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)

Package: linux-binary-7.2.13+deb14-amd64
Version: 7.2.13-1

Package: linux-modules-7.2.13+deb14-amd64
Version: 7.2.13-1

Package: linux-binary-7.2.13+deb14-cloud-amd64
Version: 7.2.13-1

Package: linux-base-7.2.13+deb14-amd64
Version: 7.2.13-1
";

    #[test]
    fn parses_stanzas_with_continuations() {
        let s = parse_packages(SAMPLE);
        assert_eq!(s.len(), 14);
        assert_eq!(
            s[0].get("Package"),
            Some("linux-image-6.1.0-47-amd64-unsigned")
        );
        assert_eq!(
            s[0].get("Description"),
            Some("Linux 6.1 for 64-bit PCs\nThe Linux kernel 6.1 and modules.")
        );
    }

    #[test]
    fn image_release_accepts_only_plain_amd64() {
        assert_eq!(
            image_release("linux-image-6.1.0-50-amd64-unsigned", "6.1").as_deref(),
            Some("6.1.0-50-amd64")
        );
        assert_eq!(
            image_release("linux-image-6.12.95+deb12-amd64", "6.1"),
            None
        );
        assert_eq!(
            image_release("linux-image-6.1.0-50-cloud-amd64", "6.1"),
            None
        );
        assert_eq!(
            image_release("linux-image-6.1.0-50-rt-amd64-unsigned", "6.1"),
            None
        );
        assert_eq!(image_release("linux-image-6.1.0-50-amd64-dbg", "6.1"), None);
        assert_eq!(image_release("linux-image-amd64", "6.1"), None);
        assert_eq!(
            image_release("linux-image-6.12.90+deb12.1-amd64", "6.12").as_deref(),
            Some("6.12.90+deb12.1-amd64")
        );
    }

    #[test]
    fn resolves_newest_unsigned_image() {
        let s = parse_packages(SAMPLE);
        let r = resolve("6.1", &["bookworm"], &s).unwrap();
        assert_eq!(r.release, "6.1.0-50-amd64");
        assert_eq!(
            r.packages,
            vec![PackageRef {
                name: "linux-image-6.1.0-50-amd64-unsigned".into(),
                version: "6.1.158-1".into()
            }]
        );
    }

    #[test]
    fn resolves_across_suites_by_debian_version() {
        let s = parse_packages(SAMPLE);
        let r = resolve("6.12", &["trixie", "bookworm-backports"], &s).unwrap();
        assert_eq!(r.release, "6.12.117+deb13-amd64");
        assert_eq!(
            r.packages[0].name,
            "linux-image-6.12.117+deb13-amd64-unsigned"
        );
        assert_eq!(r.packages[0].version, "6.12.117-1");
    }

    #[test]
    fn resolves_split_binary_and_modules() {
        let s = parse_packages(SAMPLE);
        let r = resolve("7.2", &["sid"], &s).unwrap();
        assert_eq!(r.release, "7.2.13+deb14-amd64");
        let names: Vec<_> = r.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "linux-binary-7.2.13+deb14-amd64",
                "linux-modules-7.2.13+deb14-amd64",
                "linux-base-7.2.13+deb14-amd64"
            ]
        );
    }

    #[test]
    fn missing_version_is_a_clear_error() {
        let s = parse_packages(SAMPLE);
        let e = resolve("5.10", &["bullseye"], &s).unwrap_err();
        assert!(e.to_string().contains("5.10"), "{e}");
        let e = lookup("6.6").unwrap_err().to_string();
        assert!(e.contains("5.10, 6.1, 6.12, 7.2"), "{e}");
        assert!(e.contains("--kernel-image"), "{e}");
    }

    #[test]
    fn candidate_names_filters() {
        let names = [
            "linux-image-6.1.0-50-amd64",
            "linux-image-6.12.95+deb12-amd64",
            "linux-binary-7.2.13+deb14-amd64",
            "linux-binary-7.2.13+deb14-cloud-amd64",
            "linux-modules-7.2.13+deb14-amd64",
            "linux-image-7.2.13+deb14-amd64",
        ];
        assert_eq!(
            candidate_names("6.1", names),
            ["linux-image-6.1.0-50-amd64"]
        );
        assert_eq!(
            candidate_names("7.2", names),
            [
                "linux-binary-7.2.13+deb14-amd64",
                "linux-image-7.2.13+deb14-amd64",
                "linux-modules-7.2.13+deb14-amd64"
            ]
        );
    }
}
