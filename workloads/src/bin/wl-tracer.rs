//! A helper for negative cases: `wl-tracer --ctl DIR PID` attaches to PID with
//! PTRACE_SEIZE (which does not stop it), announces `ready`, and on `go` exits,
//! which detaches.

use crest_workloads::support::{num_arg, sys};
use crest_workloads::Ctl;

fn main() {
    let (ctl, args) = Ctl::from_args();
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().to_string())
        .collect();
    let pid: libc::pid_t = num_arg(&args, 0, "pid to trace");
    // SAFETY: PTRACE_SEIZE takes no pointers (addr and data are 0).
    sys(
        unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) },
        "PTRACE_SEIZE",
    );
    ctl.ready();
    ctl.wait_for_go();
    ctl.finish(&[]);
}
