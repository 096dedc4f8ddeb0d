//! CRIU for side-by-side benchmarks: the system's when it is recent enough,
//! else a Debian trixie root debootstrapped into the cache with `criu` in it.
//!
//! The provisioned criu runs on the host root through that root's own loader
//! and libraries: chrooted, it would not see the host's mount table and
//! processes the way it needs to.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use crest_vm::cache::Cache;

/// The oldest CRIU the comparison accepts.
const MIN_VERSION: (u32, u32) = (4, 1);
const SUITE: &str = "trixie";

/// A runnable CRIU: the argv prefix that runs it, and its version.
#[derive(Debug, Clone)]
pub struct Criu {
    prefix: Vec<OsString>,
    pub version: String,
    pub origin: String,
}

impl Criu {
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.prefix[0]);
        c.args(&self.prefix[1..]);
        c
    }
}

/// Parses `criu --version` output ("Version: 4.1.1").
pub fn parse_version(out: &str) -> Option<(u32, u32, String)> {
    let v = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next().flatten().unwrap_or(0), v.to_string()))
}

fn version_of(prefix: &[OsString]) -> Option<(u32, u32, String)> {
    let out = Command::new(&prefix[0])
        .args(&prefix[1..])
        .arg("--version")
        .output()
        .ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// The argv prefix running `<root>/usr/sbin/criu` with the root's loader.
fn rooted_prefix(root: &Path) -> Vec<OsString> {
    vec![
        root.join("usr/lib64/ld-linux-x86-64.so.2").into(),
        "--library-path".into(),
        root.join("usr/lib/x86_64-linux-gnu").into(),
        root.join("usr/sbin/criu").into(),
    ]
}

/// The system's criu if it is at least [`MIN_VERSION`], else the cached
/// trixie root's (debootstrapped on first use from `mirror`, else
/// `$CREST_DEBIAN_MIRROR`, else the system's apt sources).
pub fn ensure(mirror: Option<&str>) -> Result<Criu> {
    let system = vec![OsString::from("criu")];
    let too_old = match version_of(&system) {
        Some((ma, mi, v)) if (ma, mi) >= MIN_VERSION => {
            return Ok(Criu {
                prefix: system,
                version: v,
                origin: "system".into(),
            })
        }
        Some((_, _, v)) => format!("the system's criu is {v}"),
        None => "no criu on the system".into(),
    };
    let root = Cache::default_root()?.join(format!("criu-{SUITE}"));
    if !root.join("usr/sbin/criu").exists() {
        eprintln!(
            "{too_old}: provisioning CRIU from Debian {SUITE} into {}",
            root.display()
        );
        debootstrap(&root, mirror)?;
    }
    let prefix = rooted_prefix(&root);
    match version_of(&prefix) {
        Some((ma, mi, v)) if (ma, mi) >= MIN_VERSION => Ok(Criu {
            prefix,
            version: v,
            origin: format!("Debian {SUITE} root {}", root.display()),
        }),
        Some((_, _, v)) => bail!("{}: criu {v} is older than 4.1", root.display()),
        None => bail!(
            "{}: its criu does not run (try removing the directory to provision it again)",
            root.display()
        ),
    }
}

fn debootstrap(root: &Path, mirror: Option<&str>) -> Result<()> {
    let mirror = crest_vm::mirror::detect(mirror)?;
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("installing debootstrap with apt-get");
        let st = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "debootstrap"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("run apt-get")?;
        if !st.success() {
            bail!("apt-get install debootstrap failed ({st})");
        }
    }
    let partial = PathBuf::from(format!("{}.partial", root.display()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(partial.parent().expect("under the cache"))?;
    let st = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=criu", SUITE])
        .arg(&partial)
        .arg(&mirror)
        .status()
        .context("run debootstrap")?;
    if !st.success() {
        bail!(
            "debootstrap {SUITE} into {} failed ({st}); its log: {}/debootstrap/debootstrap.log",
            partial.display(),
            partial.display()
        );
    }
    if !partial.join("usr/sbin/criu").exists() {
        bail!(
            "debootstrap finished but {} has no usr/sbin/criu",
            partial.display()
        );
    }
    std::fs::rename(&partial, root)
        .with_context(|| format!("rename {} to {}", partial.display(), root.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        let (ma, mi, v) = parse_version("Version: 4.1.1\nGitID: v4.1.1\n").unwrap();
        assert_eq!((ma, mi, v.as_str()), (4, 1, "4.1.1"));
        assert_eq!(parse_version("Version: 3.17\n").unwrap().0, 3);
        assert!(parse_version("criu: not found").is_none());
    }
}
