//! `crest restore`: a short list of steps.
//!
//! 1. **read**: the image read and validated first (metadata, every page
//!    checksum, the files it opens still the ones dumped), so a bad image
//!    fails before any process exists;
//! 2. **plan** ([`plan`]): who forks whom, where shared files are held, the
//!    descriptors each process maps from, each trampoline;
//! 3. **fork** ([`fork`]): the shared open files, then the tree with original
//!    PIDs; each restore child sets up what it can on itself and maps a
//!    two-page trampoline (a `syscall` instruction and a scratch page);
//! 4. **build** ([`build`]): through remote calls at each trampoline, its
//!    address space, file locks, threads, timers and credentials;
//! 5. **verify** ([`verify`]): the built tree seen from outside;
//! 6. **resume**: every thread gets its registers (the main thread's last
//!    call unmaps the trampoline), and all are released together.
//!
//! Any failure after the clone kills the tree: no half-restored process is
//! ever left behind.

mod build;
mod context;
mod error;
mod fork;
mod pidns;
mod plan;
mod verify;

use nix::sys::signal::Signal;

use crate::error::Error;
use crate::fds::{self, OpenFiles};
use crate::mm::pages::Pages;
use crate::mm::Backing;
use crate::model::{Checkpoint, ProcessImage};
use crate::restore::build::Built;
use crate::restore::fork::Forked;
use crate::restore::plan::TRAMPOLINE_LEN;

pub use context::{RestoreContext, RestoreOptions, Restored};
pub use error::RestoreError;

type Result<T, E = RestoreError> = std::result::Result<T, E>;

/// Restores the image in `opts.dir`.
pub fn restore(opts: &RestoreOptions, progress: &indicatif::ProgressBar) -> Result<Restored> {
    // 1. Read.
    let (image, pages) = read(opts, progress)?;
    // 2. Plan.
    let cx = RestoreContext {
        image: &image,
        pages: &pages,
        plan: plan::plan(&image)?,
        opts,
        progress,
    };
    if opts.pidns {
        return pidns::restore_in_pidns(&cx, &|cx| run(cx, true));
    }
    if opts.detach {
        return pidns::restore_detached(&cx, &|cx| run(cx, false));
    }
    run(&cx, false)?;
    Ok(Restored::Child {
        pid: image.inventory.root_pid,
    })
}

/// Steps 3 to 6: fork, build, verify, resume (`new_pidns`: as the init of a
/// new PID namespace).
fn run(cx: &RestoreContext, new_pidns: bool) -> Result<()> {
    let mut forked = fork::fork(cx, new_pidns)?;
    let built = build::build(cx, &mut forked)?;
    verify::verify(cx, &built)?;
    resume(cx, forked, &built)
}

/// Reads the image, gives back the files it carries, applies `--relocate`,
/// and checks what it opens and every page before anything is created.
fn read(
    opts: &RestoreOptions,
    progress: &indicatif::ProgressBar,
) -> Result<(Checkpoint, Vec<Pages>)> {
    let mut image = Checkpoint::read(&opts.dir)?;
    fds::savefiles::put_back_included(&image.dir, &image.inventory.saved_files)?;
    relocate(&opts.relocate, &mut image.processes, &mut image.files);
    if let Some(how) = opts.restore_files {
        fds::savefiles::apply(
            &image.dir,
            &image.inventory.saved_files,
            how,
            &mut image.files,
        )?;
    }
    let mut pages = Vec::new();
    for p in &image.processes {
        if p.threads.first().map(|t| t.tid) != Some(p.pid) {
            return Err(Error::bad_image(
                image.dir.join(crate::image::META_FILE),
                format!("pid {}: the main thread is not first", p.pid),
            )
            .into());
        }
        match fds::restore::verify_unchanged(p.pid, &p.files, &image.files) {
            Err(why) if opts.allow_changed_files => {
                tracing::warn!("{why} (restoring anyway: --allow-changed-files)")
            }
            r => r?,
        }
        progress.set_message(format!("pid {}: checking pages", p.pid));
        pages.push(Pages::open(&image.dir, p.pid, &p.mm.vmas, &p.mm.chunks)?);
    }
    Ok((image, pages))
}

/// Step 6: every thread gets its registers and mask, the libcrest processes
/// learn they were restarted, and every process is released (stopped if it
/// was, or if asked); then the network lock of the dump is removed.
fn resume(cx: &RestoreContext, mut forked: Forked, built: &[Built]) -> Result<()> {
    let image = cx.image;
    for (p, b) in image.processes.iter().zip(built) {
        let insn = b.remote.insn;
        crate::task::set_registers(
            &b.remote,
            &p.threads,
            &b.threads,
            (
                libc::SYS_munmap,
                [insn, TRAMPOLINE_LEN, 0, 0, 0, 0],
                "munmap of the trampoline",
            ),
        )?;
    }
    // libcrest processes learn they were restarted before they run.
    for p in &image.processes {
        crate::api::restarted(p.pid, p.api.as_ref())?;
    }
    forked.guard.armed = false;
    forked.sysv.armed = false;
    for (p, b) in image.processes.iter().zip(built) {
        for (n, t) in b.threads.iter().enumerate() {
            let sig = (n == 0 && (cx.opts.stop || p.stopped)).then_some(Signal::SIGSTOP);
            t.detach(sig)?;
        }
    }
    // Connections to peers outside the dump are back: let their traffic through.
    if let Some(lock) = &image.inventory.net_lock {
        if let Err(e) = crate::net::netlock::unlock(lock) {
            tracing::error!(
                "{e}: connections {} stay blocked; remove it with `crest unlock {}`",
                lock.connections.join(", "),
                image.dir.display()
            );
        }
    }
    // The restorer's copies of the shared open files, kept until now (memfd
    // seals were set through them).
    drop(forked.slot_fds);
    Ok(())
}

/// `path` with its prefix `old` (a whole path or a directory of it)
/// replaced by `new`, if it has that prefix.
fn relocated(path: &str, old: &str, new: &str) -> Option<String> {
    let old = old.trim_end_matches('/');
    let rest = path.strip_prefix(old)?;
    (rest.is_empty() || rest.starts_with('/'))
        .then(|| format!("{}{rest}", new.trim_end_matches('/')))
}

/// `crest restore --relocate OLD=NEW`: every path under OLD that the image
/// opens or maps (files, directories, FIFOs, mapped files, cwd) is taken
/// from NEW instead. The files there are still checked against the dump.
fn relocate(rules: &[(String, String)], processes: &mut [ProcessImage], files: &mut OpenFiles) {
    let apply = |path: &mut String| {
        for (old, new) in rules {
            if let Some(p) = relocated(path, old, new) {
                *path = p;
                return;
            }
        }
    };
    for f in files.iter_mut() {
        if let Some(path) = f.kind.path_mut() {
            apply(path);
        }
    }
    for p in processes.iter_mut() {
        apply(&mut p.files.cwd);
        for v in &mut p.mm.vmas {
            if let Backing::File { path, .. } = &mut v.backing {
                apply(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relocation_takes_whole_components() {
        assert_eq!(relocated("/a/b/c", "/a/b", "/x"), Some("/x/c".into()));
        assert_eq!(relocated("/a/b", "/a/b/", "/x/"), Some("/x".into()));
        assert_eq!(relocated("/a/bc", "/a/b", "/x"), None);
    }
}
