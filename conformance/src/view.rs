//! The outside view of a process (tree): what the harness can see from `/proc`
//! without the workload's help, recorded before the dump and compared after the
//! restore.
//!
//! A view is rendered as a sorted list of lines (`pid 42: fd 3 -> pipe#0 …`) so
//! that two views compare line by line and a difference names exactly what
//! changed. Kernel-chosen identities that a restore cannot keep (pipe and socket
//! inode numbers, device and inode numbers of mappings) are replaced by labels
//! numbered in order of first appearance, which keeps the sharing structure
//! (two fds on one pipe) visible.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;

/// The stdio channels the engine may rebind, as fd link targets (`$CASE`
/// for the case dir, `pipe:[N]`), by fd number: a workload's stdio that is a
/// pipe to the harness (outside the dump), and, once restored, what the
/// restorer that rebound it has on that fd. A view shows an fd 0–2 on its
/// channel as `<stdio:N>`, so the rebinding compares equal and anything else
/// (`/dev/null`, a swapped fd) does not. Stdio on a regular file or device
/// is not a channel: the engine reopens it, and it is compared like any fd
/// (path, flags, offset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio(pub [Option<String>; 3]);

impl Stdio {
    /// The label of `target` when it is fd `fd`'s channel.
    fn channel(&self, fd: i32, target: &str) -> Option<String> {
        let ch = self.0.get(usize::try_from(fd).ok()?)?.as_deref()?;
        (ch == target).then(|| format!("<stdio:{fd}>"))
    }
}

/// How a process's parent is expected to look in a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// The root's parent must be this pid; rendered as `<parent>` so that the
    /// view before (harness) and after (`crest restore`) compare equal.
    Expect(i32),
    /// The root's parent is not compared (a detached restore is orphaned).
    Any,
}

/// The fields of `/proc/PID/stat` the view uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub starttime: u64,
}

/// Parses `/proc/PID/stat`. The comm field may hold spaces and parentheses, so
/// the fields after it are found from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); starttime is field 22.
    Some(Stat {
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgid: rest.get(2)?.parse().ok()?,
        sid: rest.get(3)?.parse().ok()?,
        starttime: rest.get(19)?.parse().ok()?,
    })
}

/// Reads and parses `/proc/PID/stat`; `None` when the process is gone.
pub fn read_stat(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// One line of `/proc/PID/maps` with device and inode dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapLine {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub path: String,
}

/// Parses `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Vec<MapLine> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(offset), Some(_dev), Some(_inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path = it.next().unwrap_or("").trim_start().to_string();
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        out.push(MapLine {
            start,
            end,
            perms: perms.to_string(),
            offset,
            path,
        });
    }
    out
}

/// Merges adjacent mappings that differ only in how the kernel happened to
/// split them (same permissions and path, contiguous addresses and file
/// offsets): a restore may legitimately map in fewer, larger pieces.
pub fn merge_maps(maps: &[MapLine]) -> Vec<MapLine> {
    let mut out: Vec<MapLine> = Vec::new();
    for m in maps {
        if let Some(last) = out.last_mut() {
            let file_backed = m.path.starts_with('/');
            let contiguous_offset =
                !file_backed || last.offset + (last.end - last.start) == m.offset;
            if last.end == m.start
                && last.perms == m.perms
                && last.path == m.path
                && contiguous_offset
            {
                last.end = m.end;
                continue;
            }
        }
        out.push(m.clone());
    }
    out
}

/// The fields of `/proc/PID/fdinfo/N` the view compares.
pub fn parse_fdinfo(text: &str) -> (Option<u64>, Option<String>) {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = Some(v.trim().to_string());
        }
    }
    (pos, flags)
}

/// The `/proc/PID/status` keys the view compares.
pub const STATUS_KEYS: &[&str] = &[
    "Umask",
    "Uid",
    "Gid",
    "Groups",
    "NoNewPrivs",
    "Seccomp",
    "TracerPid",
    "ShdPnd",
    "SigPnd",
    "SigBlk",
    "SigIgn",
    "SigCgt",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
];

/// SIGSTOP, SIGTSTP, SIGTTIN and SIGTTOU as a mask (bit N-1 for signal N).
const STOP_SIGNALS: u64 = 0b1111 << 18;

/// The pending signals (hex, as in `/proc/PID/status`) that stay pending: a
/// signal that is not blocked is on its way to its handler (a SIGCHLD caught
/// between a child's exit and the shell's next instruction), so a view shows
/// it only when `blocked` holds it, or when the task is stopped. A stopped
/// task's pending stop signals are left out: the only way on is SIGCONT,
/// whose sending discards every pending stop signal (kernel
/// `prepare_signal`), so they can have no effect, and how a tool stopped
/// the task decides whether one is left.
pub fn settled_pending(pending: &str, blocked: &str, stopped: bool) -> String {
    if stopped {
        match u64::from_str_radix(pending, 16) {
            Ok(p) => format!("{:0w$x}", p & !STOP_SIGNALS, w = pending.len()),
            Err(_) => pending.to_string(),
        }
    } else {
        hex_and(pending, blocked)
    }
}

/// Bitwise AND of two hex masks, printed in the width of the first.
fn hex_and(a: &str, b: &str) -> String {
    match (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
        (Ok(x), Ok(y)) => format!("{:0w$x}", x & y, w = a.len()),
        _ => a.to_string(),
    }
}

/// Picks [`STATUS_KEYS`] out of `/proc/PID/status`.
pub fn parse_status(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if STATUS_KEYS.contains(&k) {
                let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
                out.insert(k.to_string(), v);
            }
        }
    }
    out
}

/// Replaces kernel-chosen identities in an fd link target with stable labels.
struct Labels {
    seen: HashMap<String, String>,
    next: HashMap<&'static str, usize>,
}

impl Labels {
    fn new() -> Labels {
        Labels {
            seen: HashMap::new(),
            next: HashMap::new(),
        }
    }

    fn label(&mut self, target: &str) -> String {
        for kind in ["pipe", "socket"] {
            if target.starts_with(&format!("{kind}:[")) {
                if let Some(l) = self.seen.get(target) {
                    return l.clone();
                }
                let n = self.next.entry(kind).or_insert(0);
                let l = format!("{kind}#{n}");
                *n += 1;
                self.seen.insert(target.to_string(), l.clone());
                return l;
            }
        }
        target.to_string()
    }
}

/// Stopped (`T`) and traced (`t`) are compared; the running states are not,
/// since a process flips between them on its own.
fn state_class(state: char) -> &'static str {
    match state {
        'T' => "stopped",
        't' => "tracing-stop",
        'Z' => "zombie",
        'X' => "dead",
        _ => "running",
    }
}

/// Reads the view of `root` (and, when `tree`, of all its descendants) as lines.
/// `case_dir` is replaced by `$CASE` in paths; fds 0–2 on one of `stdio`'s
/// channels show as that channel.
pub fn capture(
    root: i32,
    parent: Parent,
    tree: bool,
    case_dir: &Path,
    stdio: &Stdio,
) -> Result<Vec<String>, String> {
    capture_with(root, &[], parent, tree, case_dir, stdio)
}

/// Like [`capture`], with more processes of the scope than the root's
/// descendants (the other members of a session: orphans). Their parent is
/// init or a subreaper (the harness, or the restorer), shown as `<reaper>`.
pub fn capture_with(
    root: i32,
    others: &[i32],
    parent: Parent,
    tree: bool,
    case_dir: &Path,
    stdio: &Stdio,
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let mut labels = Labels::new();
    let mut queue: Vec<i32> = others.iter().rev().copied().collect();
    queue.push(root);
    let mut seen = BTreeSet::new();
    let case = case_dir.to_string_lossy().to_string();
    while let Some(pid) = queue.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let stat = read_stat(pid).ok_or_else(|| format!("pid {pid}: gone"))?;
        let p = format!("pid {pid}:");
        let ppid = match (pid == root, parent) {
            (true, Parent::Expect(want)) if stat.ppid == want => "<parent>".to_string(),
            (true, Parent::Any) => "<any>".to_string(),
            (false, Parent::Expect(want))
                if others.contains(&pid) && (stat.ppid == want || stat.ppid == 1) =>
            {
                "<reaper>".to_string()
            }
            (false, Parent::Any) if others.contains(&pid) => "<reaper>".to_string(),
            _ => stat.ppid.to_string(),
        };
        lines.push(format!("{p} ppid {ppid}"));
        lines.push(format!("{p} pgid {} sid {}", stat.pgid, stat.sid));
        lines.push(format!(
            "{p} comm {:?} {}",
            stat.comm,
            state_class(stat.state)
        ));
        if stat.state == 'Z' {
            continue;
        }
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("{p} status: {e}"))?;
        let mut status = parse_status(&status);
        // Each thread's stat and status, read once: for the shared pending
        // signals here and for the thread lines below.
        let mut tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
            .map_err(|e| format!("{p} task: {e}"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        tids.sort_unstable();
        let threads: Vec<(i32, Stat, BTreeMap<String, String>)> = tids
            .into_iter()
            .filter_map(|tid| {
                let t = format!("/proc/{pid}/task/{tid}");
                let ts = parse_stat(&fs::read_to_string(format!("{t}/stat")).ok()?)?;
                let st = fs::read_to_string(format!("{t}/status")).unwrap_or_default();
                Some((tid, ts, parse_status(&st)))
            })
            .collect();
        let stopped = matches!(stat.state, 'T' | 't');
        // Shared pending signals go to any thread not blocking them.
        let blocked_by_all = threads
            .iter()
            .filter_map(|(_, _, st)| st.get("SigBlk"))
            .fold(None::<String>, |acc, b| {
                Some(acc.map_or_else(|| b.clone(), |a| hex_and(&a, b)))
            })
            .unwrap_or_default();
        let blocked = status.get("SigBlk").cloned().unwrap_or_default();
        for (key, mask) in [("ShdPnd", &blocked_by_all), ("SigPnd", &blocked)] {
            if let Some(v) = status.get_mut(key) {
                *v = settled_pending(v, mask, stopped);
            }
        }
        for (k, v) in status {
            lines.push(format!("{p} {k} {v}"));
        }
        if let Ok(pers) = fs::read_to_string(format!("/proc/{pid}/personality")) {
            lines.push(format!("{p} personality {}", pers.trim()));
        }
        for link in ["cwd", "root"] {
            if let Ok(t) = fs::read_link(format!("/proc/{pid}/{link}")) {
                lines.push(format!(
                    "{p} {link} {}",
                    t.to_string_lossy().replace(&case, "$CASE")
                ));
            }
        }
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|e| format!("{p} maps: {e}"))?;
        for m in merge_maps(&parse_maps(&maps)) {
            let off = if m.path.starts_with('/') {
                format!(" +{:x}", m.offset)
            } else {
                String::new()
            };
            lines.push(format!(
                "{p} map {:x}-{:x} {}{off} {}",
                m.start,
                m.end,
                m.perms,
                m.path.replace(&case, "$CASE")
            ));
        }
        let mut fds: Vec<i32> = fs::read_dir(format!("/proc/{pid}/fd"))
            .map_err(|e| format!("{p} fd: {e}"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        for fd in fds {
            let Ok(target) = fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
                continue;
            };
            let target = target.to_string_lossy().replace(&case, "$CASE");
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            let (pos, flags) = parse_fdinfo(&info);
            // Stdio on a pipe to the harness is rebound to the restorer's
            // stdio of the same number: compared as such.
            if let Some(ch) = stdio.channel(fd, &target) {
                lines.push(format!("{p} fd {fd} -> {ch}"));
                continue;
            }
            let target = labels.label(&target);
            lines.push(format!(
                "{p} fd {fd} -> {target} flags {} pos {}",
                flags.unwrap_or_default(),
                pos.map(|p| p.to_string()).unwrap_or_default()
            ));
        }
        for (tid, ts, st) in &threads {
            let t = format!("/proc/{pid}/task/{tid}");
            let get = |k: &str| st.get(k).cloned().unwrap_or_default();
            lines.push(format!(
                "{p} thread {tid} comm {:?} {} SigBlk {} SigPnd {}",
                ts.comm,
                state_class(ts.state),
                get("SigBlk"),
                settled_pending(
                    &get("SigPnd"),
                    &get("SigBlk"),
                    matches!(ts.state, 'T' | 't')
                )
            ));
            if tree {
                if let Ok(children) = fs::read_to_string(format!("{t}/children")) {
                    queue.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<i32>().ok()),
                    );
                }
            }
        }
    }
    lines.sort();
    Ok(lines)
}

/// Takes the root's process group and session out of a view (see the runner's
/// pid scope): the line stays, so a view without it still differs.
pub fn mask_session(lines: Vec<String>, root: i32) -> Vec<String> {
    let prefix = format!("pid {root}: pgid ");
    lines
        .into_iter()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("pid {root}: pgid/sid outside the dump scope")
            } else {
                l
            }
        })
        .collect()
}

/// The pids a view mentions (for cleanup).
pub fn pids_of(lines: &[String]) -> BTreeSet<i32> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("pid ")?.split(':').next()?.parse().ok())
        .collect()
}

/// What differs between two views, one line per difference.
pub fn diff(before: &[String], after: &[String]) -> Vec<String> {
    let b: BTreeSet<&String> = before.iter().collect();
    let a: BTreeSet<&String> = after.iter().collect();
    let mut out: Vec<String> = b.difference(&a).map(|l| format!("- {l}")).collect();
    out.extend(a.difference(&b).map(|l| format!("+ {l}")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blocked_or_stopped_pending_signals_settle() {
        // SIGCHLD (bit 16) pending, nothing blocked: in flight, not shown.
        assert_eq!(
            settled_pending("0000000000010000", "0000000000000000", false),
            "0000000000000000"
        );
        // Blocked: it stays.
        assert_eq!(
            settled_pending("0000000000010002", "0000000000010000", false),
            "0000000000010000"
        );
        // A stopped task keeps everything pending but stop signals.
        assert_eq!(
            settled_pending("0000000000010002", "0000000000000000", true),
            "0000000000010002"
        );
        assert_eq!(
            settled_pending("0000000000050002", "0000000000000000", true),
            "0000000000010002"
        );
        assert_eq!(settled_pending("junk", "0", false), "junk");
    }

    #[test]
    fn stat_with_parens_and_spaces_in_comm() {
        let s = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 123456 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.comm, "a (b) c");
        assert_eq!(
            (st.state, st.ppid, st.pgid, st.sid, st.starttime),
            ('S', 1, 4242, 4242, 123456)
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn maps_parse_and_merge_contiguous_pieces_only() {
        let text = "\
55d0a0000000-55d0a0001000 r--p 00000000 08:01 123 /usr/bin/x
55d0a0001000-55d0a0003000 r--p 00001000 08:01 123 /usr/bin/x
55d0a0003000-55d0a0004000 r--p 00005000 08:01 123 /usr/bin/x
7f0000000000-7f0000001000 rw-p 00000000 00:00 0 
7f0000001000-7f0000002000 rw-p 00000000 00:00 0 
7f0000002000-7f0000003000 ---p 00000000 00:00 0 
7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0                          [stack]
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 7);
        assert_eq!(maps[6].path, "[stack]");
        assert_eq!(maps[3].path, "");
        let merged = merge_maps(&maps);
        let ranges: Vec<(u64, u64)> = merged.iter().map(|m| (m.start, m.end)).collect();
        assert_eq!(
            ranges,
            vec![
                (0x55d0a0000000, 0x55d0a0003000),
                (0x55d0a0003000, 0x55d0a0004000),
                (0x7f0000000000, 0x7f0000002000),
                (0x7f0000002000, 0x7f0000003000),
                (0x7ffd00000000, 0x7ffd00001000),
            ]
        );
    }

    #[test]
    fn fdinfo_and_status_fields() {
        let (pos, flags) = parse_fdinfo("pos:\t17\nflags:\t02100002\nmnt_id:\t29\n");
        assert_eq!((pos, flags.as_deref()), (Some(17), Some("02100002")));
        let st = parse_status(
            "Name:\tx\nUmask:\t0022\nGroups:\t1 2 \nVmRSS:\t1 kB\nSigBlk:\t0000000000000000\n",
        );
        assert_eq!(st.get("Groups").map(String::as_str), Some("1 2"));
        assert_eq!(st.get("Umask").map(String::as_str), Some("0022"));
        assert!(!st.contains_key("VmRSS"));
    }

    #[test]
    fn stdio_shows_the_channel_it_is_on() {
        let s = Stdio([None, Some("pipe:[77]".into()), None]);
        assert_eq!(s.channel(1, "pipe:[77]").as_deref(), Some("<stdio:1>"));
        assert_eq!(s.channel(2, "pipe:[77]"), None);
        assert_eq!(s.channel(0, "/dev/null"), None);
        assert_eq!(s.channel(5, "pipe:[77]"), None);
    }

    #[test]
    fn labels_keep_sharing_but_not_inode_numbers() {
        let mut l = Labels::new();
        assert_eq!(l.label("pipe:[999]"), "pipe#0");
        assert_eq!(l.label("socket:[5]"), "socket#0");
        assert_eq!(l.label("pipe:[7]"), "pipe#1");
        assert_eq!(l.label("pipe:[999]"), "pipe#0");
        assert_eq!(l.label("/tmp/x"), "/tmp/x");
    }

    #[test]
    fn diff_names_missing_and_new_lines() {
        let b = vec!["pid 1: a".to_string(), "pid 1: b".to_string()];
        let a = vec!["pid 1: b".to_string(), "pid 1: c".to_string()];
        assert_eq!(diff(&b, &a), vec!["- pid 1: a", "+ pid 1: c"]);
        assert!(diff(&b, &b).is_empty());
        assert_eq!(pids_of(&a), BTreeSet::from([1]));
        let masked = mask_session(
            vec!["pid 7: pgid 7 sid 7".into(), "pid 8: pgid 7 sid 7".into()],
            7,
        );
        assert_eq!(
            masked,
            vec![
                "pid 7: pgid/sid outside the dump scope",
                "pid 8: pgid 7 sid 7"
            ]
        );
    }

    #[test]
    fn capture_of_this_process_is_stable() {
        let me = std::process::id() as i32;
        let dir = std::env::temp_dir();
        let v = capture(me, Parent::Any, false, &dir, &Stdio::default()).unwrap();
        assert!(v.iter().any(|l| l.contains(" map ")), "{v:?}");
        assert!(v.iter().any(|l| l.contains(" thread ")), "{v:?}");
        assert!(v.contains(&format!("pid {me}: ppid <any>")));
    }
}
