//! Verifying the built tree before it runs: every process has, seen from
//! outside, the threads (by TID) and the name the image recorded. A
//! difference names the field and the restore fails (the tree is killed:
//! nothing half-restored runs).

use crate::restore::error::RestoreError;

type Result<T, E = RestoreError> = std::result::Result<T, E>;
use crate::restore::build::Built;
use crate::restore::context::RestoreContext;
use crate::sys::proc;

pub(super) fn verify(cx: &RestoreContext, built: &[Built]) -> Result<()> {
    for (p, b) in cx.image.processes.iter().zip(built) {
        let mismatch = |field, got, want| RestoreError::Mismatch {
            pid: p.pid,
            field,
            got,
            want,
        };
        let mut tids: Vec<i32> = proc::threads_of(p.pid);
        tids.sort_unstable();
        let mut want: Vec<i32> = p.threads.iter().map(|t| t.tid).collect();
        want.sort_unstable();
        let mut made: Vec<i32> = b.threads.iter().map(|t| t.pid).collect();
        made.sort_unstable();
        if tids != want || made != want {
            return Err(mismatch(
                "set of threads",
                format!("{tids:?}"),
                format!("{want:?}"),
            ));
        }
        let comm = proc::read(p.pid, "comm")?
            .trim_end_matches('\n')
            .to_string();
        if comm != p.state.comm {
            return Err(mismatch(
                "name",
                format!("{comm:?}"),
                format!("{:?}", p.state.comm),
            ));
        }
    }
    Ok(())
}
