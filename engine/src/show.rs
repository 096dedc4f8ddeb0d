//! `crest show`: an image as text for people, or JSON for tools.

use std::fmt::Write;

use crate::mm::Backing;
use crate::model::Checkpoint;
use crate::sys::names::{clock_name, mask_names, signal_name};

fn prot(p: i32) -> String {
    let b = |bit, c| if p & bit != 0 { c } else { '-' };
    [
        b(libc::PROT_READ, 'r'),
        b(libc::PROT_WRITE, 'w'),
        b(libc::PROT_EXEC, 'x'),
    ]
    .iter()
    .collect()
}

fn sa_flags(flags: u64) -> String {
    let names = [
        (libc::SA_SIGINFO as u64, "SA_SIGINFO"),
        (libc::SA_ONSTACK as u64, "SA_ONSTACK"),
        (libc::SA_RESTART as u64, "SA_RESTART"),
        (libc::SA_NODEFER as u64, "SA_NODEFER"),
        (libc::SA_RESETHAND as u64, "SA_RESETHAND"),
        (libc::SA_NOCLDSTOP as u64, "SA_NOCLDSTOP"),
        (libc::SA_NOCLDWAIT as u64, "SA_NOCLDWAIT"),
        (0x0400_0000, "SA_RESTORER"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "0".into()
    } else {
        v.join("|")
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{} KiB", b / 1024),
    }
}

/// Renders `image` as text.
pub fn render(image: &Checkpoint) -> String {
    let mut o = String::new();
    let h = &image.header;
    let s = &image.inventory.stats;
    let _ = writeln!(o, "image {}", image.dir.display());
    let _ = writeln!(
        o,
        "  format {}, {}, written by crest {} on Linux {}",
        h.format_version, h.arch, h.engine_version, h.kernel
    );
    let _ = writeln!(
        o,
        "  frozen {:.1} ms (memory copy {:.1} ms); {} pages written, {} untouched pages skipped",
        s.frozen_us as f64 / 1000.0,
        s.memory_us as f64 / 1000.0,
        s.pages_written,
        s.pages_skipped
    );
    if let Some(pc) = &s.pre_copy {
        let rounds: Vec<String> = pc
            .rounds
            .iter()
            .map(|r| {
                format!(
                    "{}{} pages in {:.1} ms",
                    if r.frozen { "frozen: " } else { "" },
                    r.pages,
                    r.us as f64 / 1000.0
                )
            })
            .collect();
        let _ = writeln!(o, "  pre-copy ({}): {}", pc.tracker, rounds.join(", "));
    }
    if let Some(l) = &image.inventory.net_lock {
        let _ = writeln!(
            o,
            "  network lock: nftables table inet {} drops the packets of {} (restore removes it)",
            l.table,
            l.connections.join(", ")
        );
    }
    for s in &image.inventory.saved_files {
        let how = if s.included { "included" } else { "saved" };
        let _ = writeln!(o, "  {how} file {} ({} bytes)", s.path, s.size);
    }
    for p in &image.processes {
        let st = &p.state;
        let _ = writeln!(
            o,
            "\nprocess {} ({}): ppid {}, pgid {}, sid {}",
            p.pid, st.comm, p.ppid, p.pgid, p.sid
        );
        let _ = writeln!(o, "  exe {}", p.mm.exe);
        let _ = writeln!(
            o,
            "  cwd {}, root {}, umask {:04o}, personality {:#x}",
            p.files.cwd, p.files.root, st.umask, st.personality
        );
        let c = &st.creds;
        let _ = writeln!(
            o,
            "  uids {:?} gids {:?} groups {:?} capeff {:#x}",
            c.uids, c.gids, c.groups, c.cap_eff
        );
        for t in &p.threads {
            let r = &t.regs;
            let _ = writeln!(
                o,
                "  thread {}: rip {:#x} rsp {:#x} fs_base {:#x} gs_base {:#x}",
                t.tid, r.rip, r.rsp, r.fs_base, r.gs_base
            );
            if let Some(nr) = r.interrupted_syscall() {
                let _ = writeln!(o, "    stopped in syscall {nr} (rax {})", r.rax as i64);
            }
            let _ = writeln!(o, "    xstate {} bytes", t.xstate.len());
            if let Some(q) = &t.rseq {
                let _ = writeln!(
                    o,
                    "    rseq at {:#x} ({} bytes, signature {:#x})",
                    q.pointer, q.size, q.signature
                );
            }
            if let Some(rl) = &t.robust_list {
                let _ = writeln!(o, "    robust list at {:#x}", rl.head);
            }
            if t.clear_child_tid != 0 {
                let _ = writeln!(o, "    clear_child_tid at {:#x}", t.clear_child_tid);
            }
            let _ = writeln!(o, "    blocked: {}", list_or_none(mask_names(t.sigmask)));
            let _ = writeln!(
                o,
                "    pending: {}",
                list_or_none(t.pending.iter().map(|i| signal_name(i.signo())).collect())
            );
            if let Some(a) = &t.altstack {
                let _ = writeln!(o, "    sigaltstack at {:#x}, {} bytes", a.sp, a.size);
            }
        }
        let _ = writeln!(
            o,
            "  pending (process): {}",
            list_or_none(
                st.shared_pending
                    .iter()
                    .map(|i| signal_name(i.signo()))
                    .collect()
            )
        );
        let _ = writeln!(o, "  signal handlers:");
        for a in &st.sigactions {
            let handler = match a.handler {
                0 => "default".to_string(),
                1 => "ignore".to_string(),
                h => format!("{h:#x}"),
            };
            let _ = writeln!(
                o,
                "    {:<10} {handler} flags {} mask [{}]",
                signal_name(a.signo),
                sa_flags(a.flags),
                mask_names(a.mask).join(" ")
            );
        }
        for t in &st.itimers {
            let which = ["ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"]
                .get(t.which as usize)
                .copied()
                .unwrap_or("?");
            let _ = writeln!(
                o,
                "  {which}: {:.6} s left, interval {:.6} s",
                t.value_us as f64 / 1e6,
                t.interval_us as f64 / 1e6
            );
        }
        for t in &st.posix_timers {
            let notify = match t.notify & !4 {
                1 => "no signal".to_string(),
                _ if t.notify & 4 != 0 => format!(
                    "{} to thread {}, value {:#x}",
                    signal_name(t.signo),
                    t.target,
                    t.sigval
                ),
                _ => format!("{}, value {:#x}", signal_name(t.signo), t.sigval),
            };
            let _ = writeln!(
                o,
                "  POSIX timer {} ({}, {notify}): {:.6} s left, interval {:.6} s",
                t.id,
                clock_name(t.clock),
                t.value_ns as f64 / 1e9,
                t.interval_ns as f64 / 1e9
            );
        }
        let saved = p.mm.saved_bytes();
        let _ = writeln!(
            o,
            "  memory: {} mappings, {} saved in {} chunks; brk {:#x}",
            p.mm.vmas.len(),
            size(saved),
            p.mm.chunks.len(),
            p.mm.fields.brk
        );
        for v in &p.mm.vmas {
            let pages: u64 =
                p.mm.chunks
                    .iter()
                    .filter(|c| c.vaddr >= v.start && c.vaddr < v.end)
                    .map(|c| c.len / crate::sys::PAGE_SIZE)
                    .sum();
            let what = match &v.backing {
                Backing::Anon if v.name.is_empty() => "anonymous".to_string(),
                Backing::Anon => v.name.clone(),
                Backing::File { path, offset, .. } => format!("{path} @ {offset:#x}"),
                Backing::Special { name } => name.clone(),
                Backing::SysvShm { shmid, offset, .. } => {
                    format!("SysV shm segment {shmid} @ {offset:#x}")
                }
                Backing::Memfd {
                    name,
                    offset,
                    shared,
                    ..
                } => format!(
                    "memfd:{name} @ {offset:#x}{}",
                    if *shared { ", shared" } else { "" }
                ),
                Backing::SharedAnon {
                    inode,
                    offset,
                    path: None,
                } => format!("shared anonymous memory {inode} @ {offset:#x}"),
                Backing::SharedAnon {
                    inode,
                    offset,
                    path: Some(path),
                } => format!("shared memory {inode} ({path}, deleted) @ {offset:#x}"),
            };
            let _ = writeln!(
                o,
                "    {:>12x}-{:<12x} {} {:>7} pages saved  {what}",
                v.start,
                v.end,
                prot(v.prot),
                pages
            );
        }
        let _ = writeln!(o, "  files:");
        for (i, f) in p.files.fds.iter().enumerate() {
            let what = crate::fds::describe(&p.files, i, &image.files, &image.inventory.pipes);
            let _ = writeln!(o, "    {:>3}  {what}", f.fd);
        }
        if !p.locks.is_empty() {
            let _ = writeln!(o, "  locks:");
            for l in &p.locks {
                let _ = writeln!(o, "    {}", l.describe());
            }
        }
    }
    o
}

fn list_or_none(v: Vec<String>) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}

/// The image as JSON: header, inventory, open files and every process record.
pub fn to_json(image: &Checkpoint) -> serde_json::Value {
    image.to_json()
}
