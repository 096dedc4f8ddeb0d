//! `crest show`: an image as text for people, or JSON for tools.

use std::fmt::Write;

use crate::files::FdKind;
use crate::image::Image;
use crate::mm::Backing;
use crate::task::{mask_names, signal_name};

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

fn access(flags: i32) -> String {
    let mode = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "read-only",
        libc::O_WRONLY => "write-only",
        _ => "read-write",
    };
    let mut s = mode.to_string();
    for (bit, name) in [
        (libc::O_APPEND, "append"),
        (libc::O_NONBLOCK, "nonblock"),
        (libc::O_DIRECT, "direct"),
        (libc::O_SYNC, "sync"),
    ] {
        if flags & bit != 0 {
            s.push_str(", ");
            s.push_str(name);
        }
    }
    s
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
pub fn render(image: &Image) -> String {
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
                crate::timers::clock_name(t.clock),
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
        for f in &p.files.fds {
            let cloexec = if f.cloexec { ", cloexec" } else { "" };
            let what = match &f.kind {
                FdKind::Regular {
                    path,
                    flags,
                    pos,
                    identity,
                } => format!(
                    "{path} ({}, offset {pos}, {} bytes{cloexec})",
                    access(*flags),
                    identity.size
                ),
                FdKind::Device { path, flags } => format!("{path} ({}{cloexec})", access(*flags)),
                FdKind::Directory { path, pos, .. } => {
                    format!("{path}, a directory (position {pos}{cloexec})")
                }
                FdKind::Unlinked {
                    path,
                    flags,
                    pos,
                    contents,
                } => {
                    format!(
                        "{path}, unlinked ({}, offset {pos}, {} bytes saved{cloexec})",
                        access(*flags),
                        contents.len()
                    )
                }
                FdKind::Dup { of } => format!("same open file as fd {of}{cloexec}"),
                FdKind::Inherited { was } => format!("rebound to the restorer's own (was {was})"),
                FdKind::Shmem {
                    inode, size, path, ..
                } => match path {
                    Some(p) => format!("shared memory object {inode} ({size} bytes, {p} deleted)"),
                    None => format!("shared memory object {inode} ({size} bytes)"),
                },
                FdKind::Eventfd { count, .. } => format!("eventfd, counter {count}{cloexec}"),
                FdKind::TcpListen(l) if !l.listening => {
                    format!("TCP socket, not connected{cloexec}")
                }
                FdKind::TcpListen(l) => {
                    format!("listening TCP socket, backlog {}{cloexec}", l.backlog)
                }
                FdKind::UnixPair(e) => {
                    format!("unix socket {} paired with {}{cloexec}", e.inode, e.peer)
                }
                FdKind::TcpConn(c) => format!("TCP connection {}{cloexec}", c.describe()),
                FdKind::UnixListen(l) => format!(
                    "listening unix socket {}{cloexec}",
                    crate::sockets::unix_name_text(&l.name)
                ),
                FdKind::Udp(u) => {
                    format!("UDP socket {}{cloexec}", crate::tcp::addr_text(&u.local))
                }
                FdKind::Signalfd { mask, .. } => {
                    format!("signalfd for [{}]{cloexec}", mask_names(*mask).join(" "))
                }
                FdKind::Timerfd(t) => format!("{}{cloexec}", timerfd(t)),
                FdKind::Memfd(m) => format!("{}{cloexec}", memfd(m)),
                FdKind::Pty(e) => format!("{}{cloexec}", pty(e)),
                FdKind::Epoll { watches, .. } => {
                    let fds: Vec<String> = watches.iter().map(|w| w.fd.to_string()).collect();
                    format!("epoll watching fds [{}]{cloexec}", fds.join(" "))
                }
                FdKind::Pipe { inode, write, .. } => format!(
                    "{} end of pipe {inode}",
                    if *write { "write" } else { "read" }
                ),
                FdKind::Shared { id } => {
                    let file = image.inventory.shared_files.iter().find(|s| s.id == *id);
                    match file.map(|s| &s.file) {
                        Some(FdKind::Regular { path, pos, .. }) => {
                            format!("{path} (shared with other processes, offset {pos}{cloexec})")
                        }
                        Some(FdKind::Directory { path, pos, .. }) => format!(
                            "{path}, a directory (shared with other processes, position {pos}{cloexec})"
                        ),
                        Some(FdKind::Device { path, .. }) => {
                            format!("{path} (shared with other processes{cloexec})")
                        }
                        Some(FdKind::Pipe { inode, write, .. }) => {
                            let unread = image
                                .inventory
                                .pipes
                                .iter()
                                .find(|p| p.inode == *inode)
                                .map_or(0, |p| p.data.len());
                            let end = if *write { "write" } else { "read" };
                            format!("{end} end of pipe {inode} ({unread} bytes unread{cloexec})")
                        }
                        Some(FdKind::UnixPair(e)) => {
                            let queued: usize = e.queue.iter().map(|m| m.0.len()).sum();
                            let ty = match e.ty {
                                libc::SOCK_STREAM => "stream",
                                libc::SOCK_DGRAM => "datagram",
                                _ => "seqpacket",
                            };
                            format!("unix {ty} socket{} paired with {} ({} messages, {queued} bytes queued{cloexec})", if e.name.is_empty() { String::new() } else { format!(" at {}", crate::sockets::unix_name_text(&e.name)) }, e.peer, e.queue.len())
                        }
                        Some(FdKind::TcpListen(l)) if !l.listening => format!(
                            "TCP socket {}, not connected (shared{cloexec})",
                            crate::tcp::addr_text(&l.addr)
                        ),
                        Some(FdKind::TcpListen(l)) => {
                            format!(
                                "listening TCP socket {}, backlog {} (shared{cloexec})",
                                crate::tcp::addr_text(&l.addr),
                                l.backlog
                            )
                        }
                        Some(FdKind::TcpConn(c)) => format!(
                            "TCP connection {} ({} bytes to send, {} received unread{cloexec})",
                            c.describe(),
                            c.send_queue.len(),
                            c.recv_queue.len()
                        ),
                        Some(FdKind::Pty(e)) => format!("{} (shared{cloexec})", pty(e)),
                        Some(FdKind::UnixListen(l)) => format!(
                            "listening unix socket {}, backlog {} (shared{cloexec})",
                            crate::sockets::unix_name_text(&l.name),
                            l.backlog
                        ),
                        Some(FdKind::Udp(u)) => format!(
                            "UDP socket {}{} ({} datagrams queued{cloexec})",
                            crate::tcp::addr_text(&u.local),
                            if u.peer.is_empty() {
                                String::new()
                            } else {
                                format!(" → {}", crate::tcp::addr_text(&u.peer))
                            },
                            u.queue.len()
                        ),
                        Some(FdKind::Eventfd { count, .. }) => {
                            format!("eventfd, counter {count} (shared{cloexec})")
                        }
                        Some(FdKind::Memfd(m)) => format!("{} (shared{cloexec})", memfd(m)),
                        Some(FdKind::Timerfd(t)) => format!("{} (shared{cloexec})", timerfd(t)),
                        Some(FdKind::Signalfd { mask, .. }) => {
                            format!(
                                "signalfd for [{}] (shared{cloexec})",
                                mask_names(*mask).join(" ")
                            )
                        }
                        _ => format!("shared file {id} (missing from the image)"),
                    }
                }
            };
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

fn memfd(m: &crate::memfd::Memfd) -> String {
    format!(
        "memfd:{} ({}, offset {}, {} bytes saved, mode {:o}, seals {:#x})",
        m.name,
        access(m.flags),
        m.pos,
        m.size,
        m.mode,
        m.seals
    )
}

fn timerfd(t: &crate::timers::Timerfd) -> String {
    let abs = if t.settime_flags & 1 != 0 {
        ", absolute"
    } else {
        ""
    };
    format!(
        "timerfd on {}{abs}: {:.6} s left, interval {:.6} s, {} unread expirations",
        crate::timers::clock_name(t.clock),
        t.value_ns as f64 / 1e9,
        t.interval_ns as f64 / 1e9,
        t.ticks
    )
}

fn list_or_none(v: Vec<String>) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}

/// The image as JSON: header, inventory and every process record.
pub fn to_json(image: &Image) -> serde_json::Value {
    serde_json::json!({
        "dir": image.dir,
        "header": image.header,
        "inventory": image.inventory,
        "processes": image.processes,
    })
}

fn pty(e: &crate::tty::PtyEnd) -> String {
    match &e.state {
        Some(st) => format!(
            "pty master of /dev/pts/{} ({} bytes to the slave, {} to the master, {}x{})",
            e.index,
            st.to_slave.len(),
            st.to_master.len(),
            st.winsize[1],
            st.winsize[0]
        ),
        None if e.master => format!("pty master of /dev/pts/{}", e.index),
        None => format!("/dev/pts/{} (pty slave)", e.index),
    }
}
