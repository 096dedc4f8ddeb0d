//! What the host tells the guest init (a JSON file in the initramfs) and what
//! the guest init reports back (a JSON file in the results share).

use serde::{Deserialize, Serialize};

/// Where the spec lives in the initramfs.
pub const SPEC_PATH: &str = "/crest/guest.json";
/// The 9p tag of the host's root file system (read-only).
pub const HOSTROOT_TAG: &str = "hostroot";
/// The 9p tag of the writable results share.
pub const RESULTS_TAG: &str = "results";
/// Where the results share is mounted inside the guest's root.
pub const GUEST_RESULTS_DIR: &str = "/run/crest-results";
/// Status file (a [`GuestStatus`]) in the results share.
pub const STATUS_FILE: &str = "status.json";
/// The guest command's stdout and stderr, in the results share.
pub const STDOUT_FILE: &str = "stdout.txt";
pub const STDERR_FILE: &str = "stderr.txt";

/// One module to load, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestModule {
    pub name: String,
    /// Path inside the initramfs.
    pub path: String,
    /// Pass `MODULE_INIT_COMPRESSED_FILE` to `finit_module`.
    pub compressed: bool,
}

/// The command the guest runs, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSpec {
    pub modules: Vec<GuestModule>,
    /// Program and arguments (the program is looked up in `PATH` if it has no `/`).
    pub argv: Vec<String>,
    /// The command's whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory (inside the guest root, which is the host's root).
    pub workdir: String,
    pub hostname: String,
    /// 9p `msize`.
    pub msize: u32,
}

/// How the guest command ended, written by the init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// Exit code, when the command exited.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// Set when the init could not run the command at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `uname -r` inside the guest.
    pub kernel_release: String,
    /// Milliseconds from the kernel's start to the command's start (CLOCK_BOOTTIME).
    pub boot_ms: u64,
    /// Milliseconds the command ran.
    pub run_ms: u64,
}

impl GuestStatus {
    /// The shell convention: exit code, or 128 + signal, or 127 when it never ran.
    pub fn code(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => 127,
        }
    }

    pub fn success(&self) -> bool {
        self.error.is_none() && self.exit_code == Some(0)
    }
}
