//! Pseudo-terminals: pty pairs whose master is in the dump, their queued data
//! in both directions, termios and window size, and a session leader's
//! controlling terminal.
//!
//! Collect reads each pair through its master (taken with pidfd_getfd) and a
//! slave crest opens itself: with the line discipline briefly raw, it drains
//! what the slave has yet to read and what the master has yet to read, then
//! writes both back verbatim and restores the termios, so the dumped process
//! sees its terminal as it was (a partial input line becomes readable as a
//! line: the kernel pushes buffered input when canonical mode comes back).
//! Restore opens /dev/ptmx until it gets the same index (devpts hands out the
//! lowest free one), refills the queues the same way and sets the termios;
//! a slave is opened once its master exists ("not yet" before).

use crate::error::{Error, Result};
use crate::fds::table::{Opened, Restored};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// One end of a pty (the image's description of a shared file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtyEnd {
    pub index: u32,
    pub master: bool,
    /// Status flags of this end (O_NONBLOCK…).
    pub flags: i32,
    /// The pair's state, recorded with its master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PtyState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtyState {
    pub termios: Termios,
    /// rows, cols, xpixel, ypixel.
    pub winsize: [u16; 4],
    /// Written to the master, not yet read from the slave.
    #[serde(with = "crate::image::hex_bytes")]
    pub to_slave: Vec<u8>,
    /// Written to the slave, not yet read from the master.
    #[serde(with = "crate::image::hex_bytes")]
    pub to_master: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: Vec<u8>,
    pub ispeed: u32,
    pub ospeed: u32,
}

impl Termios {
    fn from_libc(t: &libc::termios) -> Termios {
        Termios {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line,
            cc: t.c_cc.to_vec(),
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
        }
    }

    fn to_libc(&self) -> libc::termios {
        // SAFETY: termios is plain data; every field is set below.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_iflag = self.iflag;
        t.c_oflag = self.oflag;
        t.c_cflag = self.cflag;
        t.c_lflag = self.lflag;
        t.c_line = self.line;
        for (d, s) in t.c_cc.iter_mut().zip(&self.cc) {
            *d = *s;
        }
        t.c_ispeed = self.ispeed;
        t.c_ospeed = self.ospeed;
        t
    }
}

/// The pts index of a `/dev/pts/N` path.
pub fn slave_index(path: &str) -> Option<u32> {
    path.strip_prefix("/dev/pts/")?.parse().ok()
}

/// The pts index of a controlling terminal from `/proc/PID/stat`'s tty_nr
/// (pts majors are 136 to 143).
pub fn pts_index_of_tty_nr(tty_nr: i64) -> Option<u32> {
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    (136..=143)
        .contains(&major)
        .then(|| ((major - 136) * 256 + minor) as u32)
}

fn get_termios(fd: i32) -> std::io::Result<libc::termios> {
    // SAFETY: termios is plain data that tcgetattr fills.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is ours; t is a valid termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(t)
}

fn set_termios(fd: i32, t: &libc::termios) -> std::io::Result<()> {
    // SAFETY: fd is ours; t is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// No input or output processing, no echo, no signals, reads return at once.
fn raw(t: &libc::termios) -> libc::termios {
    let mut r = *t;
    // SAFETY: cfmakeraw only edits the struct we own.
    unsafe { libc::cfmakeraw(&mut r) };
    r.c_cc[libc::VMIN] = 0;
    r.c_cc[libc::VTIME] = 0;
    r
}

fn open_slave(index: u32) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(format!("/dev/pts/{index}"))
}

/// Bytes readable right now on a tty fd (FIONREAD).
fn readable(fd: i32) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int we own.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        n as usize
    }
}

fn read_exact_available(f: &mut File, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Reads the pair of master `fd` of frozen `pid` (see the module comment).
pub fn collect_master(pid: i32, fd: i32, fdinfo: &str, flags: i32) -> Result<PtyEnd, NotCarried> {
    let index: u32 = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("tty-index:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or(NotCarried::NoIndex)?;
    let master = crate::sys::fd::pidfd_getfd(pid, fd)
        .map_err(|source| NotCarried::NotTaken { index, source })?;
    let mut master = File::from(master);
    let mut slave = open_slave(index).map_err(|source| NotCarried::Slave { index, source })?;
    let sys = |what: &'static str| move |source| NotCarried::Sys { what, source };
    let saved = get_termios(slave.as_raw_fd()).map_err(sys("tcgetattr"))?;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize we own.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } < 0 {
        return Err(sys("TIOCGWINSZ")(std::io::Error::last_os_error()));
    }
    set_termios(slave.as_raw_fd(), &raw(&saved)).map_err(sys("tcsetattr"))?;
    let drained = (|| {
        let n = readable(slave.as_raw_fd());
        let to_slave = read_exact_available(&mut slave, n)?;
        let n = readable(master.as_raw_fd());
        let to_master = read_exact_available(&mut master, n)?;
        Ok::<_, std::io::Error>((to_slave, to_master))
    })();
    // Put everything back as it was, whatever happened.
    let (to_slave, to_master) = match &drained {
        Ok((a, b)) => (a.clone(), b.clone()),
        Err(_) => (Vec::new(), Vec::new()),
    };
    let back = master
        .write_all(&to_slave)
        .and_then(|()| slave.write_all(&to_master))
        .map_err(|source| NotCarried::PutBack { index, source });
    set_termios(slave.as_raw_fd(), &saved).map_err(sys("tcsetattr"))?;
    drained.map_err(sys("reading the queue"))?;
    back?;
    Ok(PtyEnd {
        index,
        master: true,
        flags,
        state: Some(PtyState {
            termios: Termios::from_libc(&saved),
            winsize: [ws.ws_row, ws.ws_col, ws.ws_xpixel, ws.ws_ypixel],
            to_slave,
            to_master,
        }),
    })
}

/// A pty master crest does not carry: how reading its pair failed.
#[derive(Debug, thiserror::Error)]
pub enum NotCarried {
    #[error("a pty master whose index this kernel's fdinfo does not show")]
    NoIndex,
    #[error("a pty master (pts {index}) crest cannot take: {source}")]
    NotTaken {
        index: u32,
        #[source]
        source: Error,
    },
    #[error("a pty master whose slave /dev/pts/{index}: {source}")]
    Slave {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pts {index}: putting its queued data back: {source}")]
    PutBack {
        index: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A process's hold on a pty end: its pid, its first descriptor of it, the end.
pub struct Held<'a> {
    pub pid: i32,
    pub fd: i32,
    pub end: &'a PtyEnd,
}

/// Once every process is collected: a pty slave whose master is outside the
/// dump is stdio rebound to the restorer's (a terminal: `Some(was)` for that
/// hold), or refused. A session leader's controlling terminal must be such a
/// pty (with a slave open in the dump), or is refused. `procs`: each process
/// in dump order with its controlling terminal's pts index, if it leads a
/// session with one; `held` in the same order.
pub fn resolve(procs: &[(i32, Option<u32>)], held: &[Held]) -> Result<Vec<Option<String>>> {
    let masters: Vec<u32> = held
        .iter()
        .filter(|h| h.end.master)
        .map(|h| h.end.index)
        .collect();
    let slaves: Vec<u32> = held
        .iter()
        .filter(|h| !h.end.master && masters.contains(&h.end.index))
        .map(|h| h.end.index)
        .collect();
    let mut verdicts = Vec::new();
    for &(pid, ctty) in procs {
        if let Some(i) = ctty {
            if !slaves.contains(&i) {
                return Err(Error::unsupported(
                    pid,
                    format!(
                        "its controlling terminal /dev/pts/{i} is outside the dump (shell jobs, --shell-job)"
                    ),
                ));
            }
        }
        for h in held.iter().filter(|h| h.pid == pid) {
            let e = h.end;
            if e.master || masters.contains(&e.index) {
                verdicts.push(None);
            } else if h.fd <= 2 {
                verdicts.push(Some(format!("/dev/pts/{}", e.index)));
            } else {
                return Err(Error::unsupported(
                    h.pid,
                    format!(
                        "fd {} is a pty slave (/dev/pts/{}) whose master is outside the dump",
                        h.fd, e.index
                    ),
                ));
            }
        }
    }
    Ok(verdicts)
}

/// Opens /dev/ptmx until it yields pty `index` (devpts gives the lowest free
/// index, so lower free ones are taken on the way and released after).
fn open_master(index: u32) -> Result<OwnedFd, PtyError> {
    let mut extra = Vec::new();
    let ptmx = |what| move |source| PtyError::Ptmx { what, source };
    loop {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/ptmx")
            .map_err(|source| PtyError::OpenPtmx { source })?;
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one unsigned int we own.
        if unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCGPTN, &mut n) } < 0 {
            return Err(ptmx("TIOCGPTN")(std::io::Error::last_os_error()));
        }
        if n == index {
            let unlock: libc::c_int = 0;
            // SAFETY: TIOCSPTLCK reads one int we own.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
                return Err(ptmx("unlocking")(std::io::Error::last_os_error()));
            }
            return Ok(f.into());
        }
        if n > index {
            return Err(PtyError::InUse { index });
        }
        extra.push(f);
    }
}

/// Recreates pty `end`'s pair (its master's image) with its queues, termios
/// and window size; returns the master.
fn create(end: &PtyEnd) -> Result<OwnedFd, PtyError> {
    let master = open_master(end.index)?;
    let Some(state) = &end.state else {
        return Ok(master);
    };
    let index = end.index;
    let fail = |what: &str| {
        let what = what.to_string();
        move |source| PtyError::Sys {
            index,
            what,
            source,
        }
    };
    let mut slave = open_slave(index).map_err(fail(&format!("/dev/pts/{index}")))?;
    let saved = state.termios.to_libc();
    set_termios(slave.as_raw_fd(), &raw(&saved)).map_err(fail("tcsetattr"))?;
    let mut m = File::from(master);
    m.write_all(&state.to_slave)
        .and_then(|()| slave.write_all(&state.to_master))
        .map_err(fail("refilling its queues"))?;
    set_termios(slave.as_raw_fd(), &saved).map_err(fail("tcsetattr"))?;
    let ws = libc::winsize {
        ws_row: state.winsize[0],
        ws_col: state.winsize[1],
        ws_xpixel: state.winsize[2],
        ws_ypixel: state.winsize[3],
    };
    // SAFETY: TIOCSWINSZ reads one winsize we own.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(fail("TIOCSWINSZ")(std::io::Error::last_os_error()));
    }
    Ok(m.into())
}

/// Opens slave `index` anew (a separate open file description).
fn open_slave_for_restore(index: u32) -> Result<OwnedFd, PtyError> {
    let f = open_slave(index).map_err(|source| PtyError::Sys {
        index,
        what: format!("/dev/pts/{index}"),
        source,
    })?;
    // The status flags are set from the image afterwards.
    // SAFETY: F_SETFL on our own fd.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) };
    Ok(f.into())
}

/// Why a pty could not be recreated.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("/dev/ptmx: {source}")]
    OpenPtmx {
        #[source]
        source: std::io::Error,
    },
    #[error("/dev/ptmx: {what}: {source}")]
    Ptmx {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pty {index} (/dev/pts/{index}) is in use: close it, or the process holding it")]
    InUse { index: u32 },
    #[error("pty {index}: {what}: {source}")]
    Sys {
        index: u32,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The pty masters the restorer has made, by index.
#[derive(Default)]
pub struct Masters {
    made: Vec<(u32, OwnedFd)>,
}

impl Masters {
    /// Pty end `end`: a master is made (with its pair's state); a slave is
    /// opened once its master exists.
    pub fn restore(&mut self, end: &PtyEnd) -> Result<Restored<Opened>, PtyError> {
        if end.master {
            if !self.made.iter().any(|(i, _)| *i == end.index) {
                let m = create(end)?;
                self.made.push((end.index, m));
            }
            let (_, m) = self
                .made
                .iter()
                .find(|(i, _)| *i == end.index)
                .expect("made above");
            let copy = m.try_clone().map_err(|source| PtyError::Sys {
                index: end.index,
                what: "dup".into(),
                source,
            })?;
            return Ok(Restored::Done(Opened::new(copy, Some(end.flags))));
        }
        // Opening a slave needs its master.
        if !self.made.iter().any(|(i, _)| *i == end.index) {
            return Ok(Restored::NotYet);
        }
        Ok(Restored::Done(Opened::new(
            open_slave_for_restore(end.index)?,
            Some(end.flags),
        )))
    }
}

impl PtyEnd {
    pub fn describe(&self, shared: bool, cloexec: &str) -> String {
        let text = match &self.state {
            Some(st) => format!(
                "pty master of /dev/pts/{} ({} bytes to the slave, {} to the master, {}x{})",
                self.index,
                st.to_slave.len(),
                st.to_master.len(),
                st.winsize[1],
                st.winsize[0]
            ),
            None if self.master => format!("pty master of /dev/pts/{}", self.index),
            None => format!("/dev/pts/{} (pty slave)", self.index),
        };
        if shared {
            format!("{text} (shared{cloexec})")
        } else {
            format!("{text}{cloexec}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    /// Collect, restore, collect again: the same pair at the same index, its
    /// termios, window size and the data queued both ways.
    #[test]
    fn a_pty_pair_round_trips() {
        let me = std::process::id() as i32;
        let collect_own = |master: &OwnedFd| {
            let fd = master.as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
            collect_master(me, fd, &info, 0).unwrap()
        };
        let ptmx = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/ptmx")
            .unwrap();
        let (mut index, unlock): (libc::c_uint, libc::c_int) = (0, 0);
        // SAFETY: TIOCGPTN writes one unsigned int, TIOCSPTLCK reads one int.
        unsafe {
            assert_eq!(libc::ioctl(ptmx.as_raw_fd(), libc::TIOCGPTN, &mut index), 0);
            assert_eq!(libc::ioctl(ptmx.as_raw_fd(), libc::TIOCSPTLCK, &unlock), 0);
        }
        let mut slave = open_slave(index).unwrap();
        // Raw, so that what is queued is exactly what was written.
        let mut termios = raw(&get_termios(slave.as_raw_fd()).unwrap());
        termios.c_cc[libc::VMIN] = 1;
        set_termios(slave.as_raw_fd(), &termios).unwrap();
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize we own.
        let r = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0);
        let mut master = File::from(OwnedFd::from(ptmx));
        master.write_all(b"to the slave").unwrap();
        slave.write_all(b"to the master").unwrap();
        let master = OwnedFd::from(master);
        // The line discipline passes written data on asynchronously.
        let queued = |master: &OwnedFd, slave: i32| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while (readable(slave), readable(master.as_raw_fd())) != (12, 13) {
                assert!(std::time::Instant::now() < deadline, "data never queued");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        queued(&master, slave.as_raw_fd());
        let saved = collect_own(&master);
        let state = saved.state.as_ref().unwrap();
        assert_eq!(
            (state.to_slave.as_slice(), state.to_master.as_slice()),
            (&b"to the slave"[..], &b"to the master"[..])
        );
        assert_eq!(state.winsize, [40, 100, 0, 0]);
        drop((master, slave));

        let restored = match Masters::default().restore(&saved).unwrap() {
            Restored::Done(m) => m,
            Restored::NotYet => panic!("a master needs nothing"),
        };
        let slave = open_slave(index).unwrap();
        queued(&restored.fd, slave.as_raw_fd());
        assert_eq!(collect_own(&restored.fd), saved);
    }

    #[rstest]
    #[case(0x8800, Some(0))] // 136:0
    #[case(0x8805, Some(5))]
    #[case(0x8900, Some(256))] // 137:0
    #[case(0x0401, None)] // tty1
    #[case(0, None)]
    fn pts_index_from_tty_nr(#[case] tty_nr: i64, #[case] index: Option<u32>) {
        assert_eq!(pts_index_of_tty_nr(tty_nr), index);
    }

    #[test]
    fn slave_paths() {
        assert_eq!(slave_index("/dev/pts/7"), Some(7));
        assert_eq!(slave_index("/dev/ptmx"), None);
        assert_eq!(slave_index("/dev/tty"), None);
    }

    #[test]
    fn termios_round_trips() {
        // SAFETY: termios is plain data.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_iflag = 1;
        t.c_lflag = 0o105073;
        t.c_cc[libc::VINTR] = 3;
        t.c_ospeed = 15;
        let back = Termios::from_libc(&t).to_libc();
        assert_eq!(back.c_lflag, t.c_lflag);
        assert_eq!(back.c_cc, t.c_cc);
        assert_eq!(back.c_ospeed, 15);
    }
}
