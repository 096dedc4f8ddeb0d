//! crest-vm: run commands inside QEMU guests booted from Debian's kernels.
//!
//! - [`catalog`]: which kernel versions the archive provides, and package
//!   resolution from a `Packages` index;
//! - [`mirror`]: the archive URL, read from the system's apt sources;
//! - [`cache`]: fetch (private apt configuration + `dpkg-deb -x`) and the
//!   per-version cache under `$XDG_CACHE_HOME/crest/kernels/`;
//! - [`modinfo`]: module dependencies from `.modinfo`, load order;
//! - [`cpio`], [`initramfs`]: the guest's initramfs;
//! - [`guest`]: the spec the guest init reads and the status it writes;
//! - [`qemu`]: the QEMU command line, timeout and console log;
//! - [`runner`]: "run this command in a guest of kernel X".

pub mod cache;
pub mod catalog;
pub mod cpio;
pub mod debver;
pub mod guest;
pub mod initramfs;
pub mod mirror;
pub mod modinfo;
pub mod qemu;
pub mod runner;

use std::path::PathBuf;

/// Errors of the VM runner. Each says what to do about it where it can.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {requested} is not in the catalog; available: {available}, or `host` (the running kernel). To use another kernel, pass your own image with --kernel-image PATH (a bzImage/vmlinuz, plus --modules-dir DIR if 9p/virtio are modules)")]
    UnknownKernel {
        requested: String,
        available: String,
    },
    #[error("no plain amd64 kernel package for {version} in suite(s) {suites} (looked for linux-image-{version}*-amd64[-unsigned]); pass your own image with --kernel-image PATH")]
    NoPackage { version: String, suites: String },
    #[error("no Debian archive mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources; set CREST_DEBIAN_MIRROR or pass --mirror URL")]
    NoMirror,
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("module {}: {msg}", path.display())]
    Module { path: PathBuf, msg: String },
    #[error("module {0} is needed by the guest but is neither in the package nor built in")]
    MissingModule(String),
    #[error("module dependency cycle through {0}")]
    ModuleCycle(String),
    #[error("kernel package layout not understood: {0}")]
    Layout(String),
    #[error("{0}")]
    Qemu(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Reads the last `max_lines` lines of a (log) file, lossily decoded.
pub fn tail_file(path: &std::path::Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => tail_text(&String::from_utf8_lossy(&b), max_lines),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The last `max_lines` lines of `text`.
pub fn tail_text(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn tail_text_keeps_last_lines() {
        assert_eq!(super::tail_text("a\nb\nc\n", 2), "b\nc");
        assert_eq!(super::tail_text("a", 5), "a");
    }
}
