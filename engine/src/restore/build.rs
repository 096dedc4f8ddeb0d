//! Building each process: the restorer seizes each restore child and, with
//! one remote-call handle at its trampoline, rebuilds its address space
//! ([`crate::mm::restore`]), takes its file locks again, creates its
//! threads and gives them their state ([`crate::task::restore`]). Then what
//! spans processes: SysV shm segments marked for removal again, memfd seals,
//! process groups joined, lost-group holders let go.

use crate::restore::error::RestoreError;

type Result<T, E = RestoreError> = std::result::Result<T, E>;
use crate::fds::FileKind;
use crate::mm::restore::MapFds;
use crate::restore::context::RestoreContext;
use crate::restore::fork::Forked;
use crate::restore::plan::TRAMPOLINE_LEN;
use crate::sys::ptrace::Tracee;
use crate::sys::remote::RemoteCall;
use crate::sys::PAGE_SIZE;

/// A process built: its remote-call handle (main thread) and its threads,
/// main thread first.
pub(super) struct Built {
    pub remote: RemoteCall,
    pub threads: Vec<Tracee>,
}

/// Builds every process of the tree `forked` holds, all but the final
/// registers.
pub(super) fn build(cx: &RestoreContext, forked: &mut Forked) -> Result<Vec<Built>> {
    let image = cx.image;
    let sysv_sizes: Vec<(i32, u64)> = image
        .inventory
        .sysv_shm
        .iter()
        .map(|s| (s.id, s.size))
        .collect();
    let mut built = Vec::new();
    for (i, p) in image.processes.iter().enumerate() {
        cx.progress.set_message(format!("pid {}: memory", p.pid));
        let t = Tracee::seize_for_restore(p.pid)?;
        forked.guard.pids.push(p.pid);
        let plan = &cx.plan.children[i];
        let remote = RemoteCall::new(t, plan.trampoline, plan.trampoline + PAGE_SIZE);
        let helpers: Vec<i32> = plan.map_files.iter().map(|(_, fd, _)| *fd).collect();
        crate::mm::restore::rebuild(
            &remote,
            TRAMPOLINE_LEN,
            &p.mm,
            &cx.pages[i],
            &sysv_sizes,
            &MapFds {
                vma_fds: &plan.vma_fds,
                helpers: &helpers,
                exe: plan.exe.1,
            },
            &image.dir.join(crate::image::META_FILE),
        )?;
        // Only now: closing any descriptor of a file drops our POSIX locks on it.
        crate::fds::locks::restore(&remote, &p.locks)?;
        let threads = crate::task::restore(&remote, &p.threads, &p.state)?;
        built.push(Built { remote, threads });
    }
    crate::mm::sysvshm::finish(&image.inventory.sysv_shm)?;
    // Seals last: every process has mapped its memfds (a write seal forbids
    // writable shared mappings).
    for f in image.files.iter() {
        if let (FileKind::Memfd(m), Some(slot)) = (&f.kind, cx.plan.slots.of(f.id)) {
            crate::fds::memfd::seal(slot, m)?;
        }
    }
    let members: Vec<crate::tree::Member> = image.processes.iter().map(|p| p.member()).collect();
    let trampolines: Vec<u64> = cx.plan.children.iter().map(|c| c.trampoline).collect();
    let inv = &image.inventory;
    crate::tree::set_process_groups(
        &members,
        &inv.zombies,
        &inv.lost_session_leaders,
        &inv.lost_group_leaders,
        &trampolines,
    )?;
    for g in &inv.lost_group_leaders {
        if forked.guard.pids.contains(&g.pgid) {
            // SAFETY: kill has no memory effects; the holder is ours (it reported).
            unsafe { libc::kill(g.pgid, libc::SIGKILL) };
        }
    }
    Ok(built)
}
