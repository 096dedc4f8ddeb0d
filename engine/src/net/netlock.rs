//! The network lock of `--tcp-established` (CRIU's): while a connection to a
//! peer outside the dump is frozen, dumped and restored, nftables rules drop
//! its packets both ways, so the peer's segments and retransmissions meet no
//! closed port (which would answer with a reset) and it simply sees a silent
//! link until the connection is back.
//!
//! Each dump that locks a connection gets a table of its own in the `inet`
//! family (`crest-PID-N`) with an input and an output chain, and two rules a
//! connection (peer → us on input, us → peer on output; loopback traffic
//! passes both hooks). Concurrent dumps never touch each other's tables, and
//! removing the lock is removing the table. The image records the table's
//! name: `crest restore` removes it once the connection is back, a failed or
//! `--leave-running` dump at once; `crest unlock DIR` removes it by hand.
//!
//! Spoken over `NETLINK_NETFILTER` directly (no `nft` binary: QEMU guests have
//! no userland besides crest). Message layout: `linux/netfilter/nf_tables.h`,
//! `linux/netfilter/nfnetlink.h`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_ACCEPT: u32 = 1;
const NF_DROP: u32 = 0;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
/// Before conntrack (-200) and any usual filter chain.
const CHAIN_PRIORITY: i32 = -300;
/// Every crest table's name starts so.
pub const TABLE_PREFIX: &str = "crest-";

/// What the image records of a dump's network lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetLock {
    /// The `inet` table holding every rule of this dump.
    pub table: String,
    /// The connections it holds ("127.0.0.1:40000 → 10.0.0.1:80"), for messages.
    pub connections: Vec<String>,
}

/// Why the lock could not be taken or removed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NftError {
    what: String,
    #[source]
    source: std::io::Error,
}

fn nft_err(what: impl Into<String>, source: std::io::Error) -> NftError {
    NftError {
        what: what.into(),
        source,
    }
}

/// One dump's network lock: the connections it must lock (planned before
/// any socket is put in repair mode) and the table it holds (taken as they
/// are collected). Each dump has its own; dropped without [`Session::keep`]
/// or [`Session::release`], it removes its table.
#[derive(Debug, Default)]
pub struct Session {
    /// The connections (local, peer sockaddrs) to lock: those whose peer is
    /// outside the dump.
    planned: Vec<(Vec<u8>, Vec<u8>)>,
    held: Option<NetLock>,
}

impl Session {
    /// Sets which connections [`Session::must_lock`] answers yes for.
    pub fn plan(&mut self, conns: Vec<(Vec<u8>, Vec<u8>)>) {
        self.planned = conns;
    }

    /// Whether the connection `local` → `peer` is one the plan locks.
    pub fn must_lock(&self, local: &[u8], peer: &[u8]) -> bool {
        self.planned.iter().any(|(l, p)| {
            crate::net::inet::same_endpoint(l, local) && crate::net::inet::same_endpoint(p, peer)
        })
    }

    /// Drops every packet of the connection `local` ↔ `peer` (raw sockaddrs)
    /// until the lock is released; the first call creates this dump's table.
    pub fn lock(&mut self, local: &[u8], peer: &[u8], describe: &str) -> Result<(), NftError> {
        let (Some(l), Some(p)) = (
            Endpoint::from_sockaddr(local),
            Endpoint::from_sockaddr(peer),
        ) else {
            return Err(nft_err(
                "reading its addresses",
                std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
            ));
        };
        if l.addr.len() != p.addr.len() {
            return Err(nft_err(
                "matching an IPv4 peer on an IPv6 address",
                std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
            ));
        }
        if self.held.is_none() {
            self.held = Some(NetLock {
                table: create_table()?,
                connections: Vec::new(),
            });
        }
        let lock = self.held.as_mut().expect("just set");
        let nl = Nl::open().map_err(|e| nft_err("opening a NETLINK_NETFILTER socket", e))?;
        let seq = seqs(2);
        let msgs = [
            drop_rule(&lock.table, "input", &p, &l, seq),
            drop_rule(&lock.table, "output", &l, &p, seq + 1),
        ];
        nl.transact(&msgs, seq).map_err(|(_, e)| {
            nft_err(
                format!(
                    "adding its drop rules to nftables table inet {}",
                    lock.table
                ),
                e,
            )
        })?;
        lock.connections.push(describe.to_string());
        Ok(())
    }

    /// The lock this dump holds, for the image.
    pub fn current(&self) -> Option<NetLock> {
        self.held.clone()
    }

    /// The dump is over and its processes are gone: the rules stay for the
    /// restore (the image names them).
    pub fn keep(&mut self) {
        self.planned.clear();
        self.held = None;
    }

    /// Removes this dump's rules (a failed dump, or one that lets its
    /// processes run on); logs what it cannot remove.
    pub fn release(&mut self) {
        self.planned.clear();
        if let Some(lock) = self.held.take() {
            if let Err(e) = unlock(&lock) {
                tracing::error!(
                    "{e}: the connections it held ({}) stay blocked until it is removed",
                    lock.connections.join(", ")
                );
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.release();
    }
}

/// The connections among `ends` (local, peer) whose other end is not among them.
pub fn outside(ends: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    ends.iter()
        .filter(|(l, p)| {
            !ends.iter().any(|(l2, p2)| {
                crate::net::inet::same_endpoint(l2, p) && crate::net::inet::same_endpoint(p2, l)
            })
        })
        .cloned()
        .collect()
}

/// One endpoint: address bytes (4 or 16) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Vec<u8>,
    pub port: u16,
}

impl Endpoint {
    /// From a raw sockaddr_in/sockaddr_in6 (as `tcp::sock_name` returns it).
    /// An IPv4-mapped IPv6 address is matched as the IPv4 packets it carries.
    pub fn from_sockaddr(raw: &[u8]) -> Option<Endpoint> {
        let family = u16::from_ne_bytes([*raw.first()?, *raw.get(1)?]) as i32;
        let port = u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]);
        let addr = match family {
            libc::AF_INET => raw.get(4..8)?.to_vec(),
            libc::AF_INET6 => {
                let a = raw.get(8..24)?;
                if a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff {
                    a[12..].to_vec()
                } else {
                    a.to_vec()
                }
            }
            _ => return None,
        };
        Some(Endpoint { addr, port })
    }
}

/// A netlink message under construction.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.extend_from_slice(&[family, 0]); // nfgenmsg: family, NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn nft(msg: u16, flags: u16, seq: u32, family: u8) -> Msg {
        Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | flags,
            seq,
            family,
            0,
        )
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Msg {
        self.buf
            .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn str(&mut self, ty: u16, s: &str) -> &mut Msg {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v)
    }

    /// Numbers in nf_tables attributes are big-endian.
    fn be32(&mut self, ty: u16, v: u32) -> &mut Msg {
        self.attr(ty, &v.to_be_bytes())
    }

    fn nest(&mut self, ty: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.attr(ty | NLA_F_NESTED, &[])
    }

    fn end(&mut self) -> &mut Msg {
        let at = self.nests.pop().expect("a nest was opened");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self) -> Vec<u8> {
        debug_assert!(self.nests.is_empty());
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }

    /// One expression of a rule: its name and its attributes.
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Msg)) -> &mut Msg {
        self.nest(NFTA_LIST_ELEM).str(NFTA_EXPR_NAME, name);
        self.nest(NFTA_EXPR_DATA);
        body(self);
        self.end().end()
    }

    fn cmp_eq(&mut self, value: &[u8]) -> &mut Msg {
        self.expr("cmp", |m| {
            m.be32(NFTA_CMP_SREG, NFT_REG_1)
                .be32(NFTA_CMP_OP, NFT_CMP_EQ);
            m.nest(NFTA_CMP_DATA).attr(NFTA_DATA_VALUE, value).end();
        })
    }

    fn meta(&mut self, key: u32) -> &mut Msg {
        self.expr("meta", |m| {
            m.be32(NFTA_META_KEY, key).be32(NFTA_META_DREG, NFT_REG_1);
        })
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32) -> &mut Msg {
        self.expr("payload", |m| {
            m.be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
                .be32(NFTA_PAYLOAD_BASE, base)
                .be32(NFTA_PAYLOAD_OFFSET, offset)
                .be32(NFTA_PAYLOAD_LEN, len);
        })
    }
}

fn batch(kind: u16, seq: u32) -> Vec<u8> {
    Msg::new(kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES).finish()
}

fn new_table(table: &str, seq: u32) -> Vec<u8> {
    let mut m = Msg::nft(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
        seq,
        NFPROTO_INET,
    );
    m.str(NFTA_TABLE_NAME, table);
    m.finish()
}

fn del_table(table: &str, seq: u32) -> Vec<u8> {
    let mut m = Msg::nft(NFT_MSG_DELTABLE, NLM_F_ACK, seq, NFPROTO_INET);
    m.str(NFTA_TABLE_NAME, table);
    m.finish()
}

fn new_chain(table: &str, name: &str, hook: u32, seq: u32) -> Vec<u8> {
    let mut m = Msg::nft(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE | NLM_F_ACK,
        seq,
        NFPROTO_INET,
    );
    m.str(NFTA_CHAIN_TABLE, table).str(NFTA_CHAIN_NAME, name);
    m.nest(NFTA_CHAIN_HOOK)
        .be32(NFTA_HOOK_HOOKNUM, hook)
        .be32(NFTA_HOOK_PRIORITY, CHAIN_PRIORITY as u32)
        .end();
    m.be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .str(NFTA_CHAIN_TYPE, "filter");
    m.finish()
}

/// `meta nfproto ipvN meta l4proto tcp ip(6) saddr S ip(6) daddr D tcp sport
/// SP tcp dport DP drop`.
fn drop_rule(table: &str, chain: &str, src: &Endpoint, dst: &Endpoint, seq: u32) -> Vec<u8> {
    let v4 = src.addr.len() == 4;
    let (proto, saddr_at, daddr_at) = if v4 {
        (NFPROTO_IPV4, 12, 16)
    } else {
        (NFPROTO_IPV6, 8, 24)
    };
    let alen = src.addr.len() as u32;
    let mut m = Msg::nft(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
        seq,
        NFPROTO_INET,
    );
    m.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, chain);
    m.nest(NFTA_RULE_EXPRESSIONS)
        .meta(NFT_META_NFPROTO)
        .cmp_eq(&[proto])
        .meta(NFT_META_L4PROTO)
        .cmp_eq(&[libc::IPPROTO_TCP as u8])
        .payload(NFT_PAYLOAD_NETWORK_HEADER, saddr_at, alen)
        .cmp_eq(&src.addr)
        .payload(NFT_PAYLOAD_NETWORK_HEADER, daddr_at, alen)
        .cmp_eq(&dst.addr)
        .payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 2)
        .cmp_eq(&src.port.to_be_bytes())
        .payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2)
        .cmp_eq(&dst.port.to_be_bytes())
        .expr("immediate", |m| {
            m.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
            m.nest(NFTA_IMMEDIATE_DATA)
                .nest(NFTA_DATA_VERDICT)
                .be32(NFTA_VERDICT_CODE, NF_DROP)
                .end()
                .end();
        })
        .end();
    m.finish()
}

/// One received netlink message: type, flags, sequence number, payload.
type Received = (u16, u16, u32, Vec<u8>);

/// A `NETLINK_NETFILTER` socket.
struct Nl(OwnedFd);

impl Nl {
    fn open() -> std::io::Result<Nl> {
        // SAFETY: a socket we create and own from here on.
        let fd = unsafe {
            let s = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            );
            if s < 0 {
                return Err(std::io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(s)
        };
        // A kernel that never answers must not hang a dump.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads one timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Nl(fd))
    }

    fn send(&self, data: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all zeroes is the kernel's address.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sendto reads data.len() bytes of data and one sockaddr_nl.
        let r = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next datagram's messages: (type, flags, seq, payload after nlmsghdr).
    fn recv(&self) -> std::io::Result<Vec<Received>> {
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(parse_messages(&buf[..n as usize]))
    }

    /// Sends one batch of messages each asking for an ack; waits for every
    /// ack, or returns the first error with the index of the message it is about.
    fn transact(&self, msgs: &[Vec<u8>], first_seq: u32) -> Result<(), (usize, std::io::Error)> {
        let mut data = batch(NFNL_MSG_BATCH_BEGIN, first_seq.wrapping_sub(1));
        for m in msgs {
            data.extend_from_slice(m);
        }
        data.extend(batch(NFNL_MSG_BATCH_END, first_seq + msgs.len() as u32));
        self.send(&data).map_err(|e| (0, e))?;
        let mut acked = 0;
        while acked < msgs.len() {
            for (ty, _, seq, payload) in self.recv().map_err(|e| (acked, e))? {
                if ty != NLMSG_ERROR {
                    continue;
                }
                let errno = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(-libc::EPROTO);
                let idx = seq.wrapping_sub(first_seq) as usize;
                if idx >= msgs.len() {
                    continue; // not about this batch
                }
                if errno != 0 {
                    return Err((idx, std::io::Error::from_raw_os_error(-errno)));
                }
                acked += 1;
            }
        }
        Ok(())
    }
}

/// Splits a netlink datagram into its messages.
fn parse_messages(mut data: &[u8]) -> Vec<Received> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let ty = u16::from_ne_bytes([data[4], data[5]]);
        let flags = u16::from_ne_bytes([data[6], data[7]]);
        let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        out.push((ty, flags, seq, data[16..len].to_vec()));
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    out
}

/// The attributes of an nfnetlink payload (after its 4-byte nfgenmsg).
fn attrs(payload: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut a = payload.get(4..).unwrap_or(&[]);
    while a.len() >= 4 {
        let len = u16::from_ne_bytes([a[0], a[1]]) as usize;
        let ty = u16::from_ne_bytes([a[2], a[3]]) & !NLA_F_NESTED;
        if len < 4 || len > a.len() {
            break;
        }
        out.push((ty, &a[4..len]));
        a = &a[((len + 3) & !3).min(a.len())..];
    }
    out
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

fn seqs(n: u32) -> u32 {
    SEQ.fetch_add(n + 2, std::sync::atomic::Ordering::Relaxed) + 1
}

/// Creates this dump's table with its two chains; returns its name.
fn create_table() -> Result<String, NftError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for attempt in 0..8 {
        let table = format!("{TABLE_PREFIX}{}-{stamp}-{attempt}", std::process::id());
        let nl = Nl::open().map_err(|e| nft_err("opening a NETLINK_NETFILTER socket", e))?;
        let seq = seqs(3);
        let msgs = [
            new_table(&table, seq),
            new_chain(&table, "input", NF_INET_LOCAL_IN, seq + 1),
            new_chain(&table, "output", NF_INET_LOCAL_OUT, seq + 2),
        ];
        match nl.transact(&msgs, seq) {
            Ok(()) => return Ok(table),
            Err((0, e)) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err((i, e)) => {
                let what = ["the table", "its input chain", "its output chain"][i.min(2)];
                return Err(nft_err(
                    format!("creating {what} of nftables table inet {table}"),
                    e,
                ));
            }
        }
    }
    Err(nft_err(
        "creating an nftables table",
        std::io::Error::from_raw_os_error(libc::EEXIST),
    ))
}

/// Removes the table of `lock`; one already gone is not an error.
pub fn unlock(lock: &NetLock) -> Result<(), NftError> {
    let nl = Nl::open().map_err(|e| nft_err("opening a NETLINK_NETFILTER socket", e))?;
    let seq = seqs(1);
    match nl.transact(&[del_table(&lock.table, seq)], seq) {
        Ok(()) => {
            tracing::info!(table = lock.table, "network lock removed");
            Ok(())
        }
        Err((_, e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err((_, e)) => Err(nft_err(
            format!("removing nftables table inet {}", lock.table),
            e,
        )),
    }
}

/// The names of crest's tables in the ruleset (every dump's lock not yet removed).
pub fn tables() -> Result<Vec<String>, NftError> {
    let nl = Nl::open().map_err(|e| nft_err("opening a NETLINK_NETFILTER socket", e))?;
    let seq = seqs(1);
    let req = Msg::nft(NFT_MSG_GETTABLE, NLM_F_DUMP, seq, NFPROTO_INET).finish();
    nl.send(&req)
        .map_err(|e| nft_err("listing nftables tables", e))?;
    let mut names = Vec::new();
    loop {
        for (ty, _, _, payload) in nl
            .recv()
            .map_err(|e| nft_err("listing nftables tables", e))?
        {
            match ty {
                NLMSG_DONE => return Ok(names),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(-libc::EPROTO);
                    if errno != 0 {
                        return Err(nft_err(
                            "listing nftables tables",
                            std::io::Error::from_raw_os_error(-errno),
                        ));
                    }
                }
                _ => {
                    for (a, v) in attrs(&payload) {
                        if a == NFTA_TABLE_NAME {
                            let name =
                                String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or(&[]))
                                    .into_owned();
                            if name.starts_with(TABLE_PREFIX) {
                                names.push(name);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut v = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(&ip);
        v.extend_from_slice(&[0; 8]);
        v
    }

    fn v6(ip: [u8; 16], port: u16) -> Vec<u8> {
        let mut v = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&ip);
        v.extend_from_slice(&[0; 4]);
        v
    }

    #[test]
    fn only_connections_without_their_other_end_are_outside() {
        let a = (v4([127, 0, 0, 1], 4000), v4([127, 0, 0, 1], 80));
        let b = (v4([127, 0, 0, 1], 80), v4([127, 0, 0, 1], 4000));
        let c = (v4([127, 0, 0, 1], 4001), v4([10, 0, 0, 1], 80));
        assert_eq!(outside(&[a.clone(), b, c.clone()]), vec![c.clone()]);
        assert_eq!(outside(std::slice::from_ref(&a)), vec![a]);
        let mut session = Session::default();
        session.plan(vec![c.clone()]);
        assert!(session.must_lock(&c.0, &c.1) && !session.must_lock(&c.1, &c.0));
        session.plan(Vec::new());
    }

    #[test]
    fn endpoints_from_sockaddrs() {
        assert_eq!(
            Endpoint::from_sockaddr(&v4([10, 0, 0, 1], 80)),
            Some(Endpoint {
                addr: vec![10, 0, 0, 1],
                port: 80
            })
        );
        let mapped = "::ffff:127.0.0.1".parse::<std::net::Ipv6Addr>().unwrap();
        assert_eq!(
            Endpoint::from_sockaddr(&v6(mapped.octets(), 443)),
            Some(Endpoint {
                addr: vec![127, 0, 0, 1],
                port: 443
            })
        );
        let lo6 = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(
            Endpoint::from_sockaddr(&v6(lo6, 1)).map(|e| e.addr.len()),
            Some(16)
        );
        assert_eq!(Endpoint::from_sockaddr(&[1, 0]), None);
    }

    #[test]
    fn messages_are_length_prefixed_and_nested_attributes_sized() {
        let m = new_chain("crest-1", "input", NF_INET_LOCAL_IN, 7);
        assert_eq!(
            u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(m.len() % 4, 0);
        let (ty, flags, seq, payload) = parse_messages(&m).pop().expect("one message");
        assert_eq!(ty, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK);
        assert_eq!(seq, 7);
        assert_eq!(payload[0], NFPROTO_INET);
        let a = attrs(&payload);
        let names: Vec<u16> = a.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            names,
            [
                NFTA_CHAIN_TABLE,
                NFTA_CHAIN_NAME,
                NFTA_CHAIN_HOOK,
                NFTA_CHAIN_POLICY,
                NFTA_CHAIN_TYPE
            ]
        );
        assert_eq!(a[0].1, b"crest-1\0");
        // The hook nest: two 8-byte attributes, priority -300 big-endian.
        let hook = a[2].1;
        assert_eq!(hook.len(), 16);
        assert_eq!(&hook[12..16], &(-300i32).to_be_bytes());
    }

    #[test]
    fn a_drop_rule_matches_both_addresses_and_ports() {
        let src = Endpoint {
            addr: vec![127, 0, 0, 1],
            port: 0x1234,
        };
        let dst = Endpoint {
            addr: vec![127, 0, 0, 2],
            port: 80,
        };
        let m = drop_rule("crest-1", "input", &src, &dst, 1);
        let (_, _, _, payload) = parse_messages(&m).pop().expect("one message");
        let a = attrs(&payload);
        assert_eq!(a[2].0, NFTA_RULE_EXPRESSIONS);
        // 6 loads, 6 compares, the verdict.
        let mut exprs = Vec::new();
        let mut rest = a[2].1;
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let inner = &rest[4..len];
            let name_len = u16::from_ne_bytes([inner[0], inner[1]]) as usize;
            exprs.push(
                String::from_utf8_lossy(&inner[4..name_len])
                    .trim_end_matches('\0')
                    .to_string(),
            );
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
        assert_eq!(
            exprs,
            [
                "meta",
                "cmp",
                "meta",
                "cmp",
                "payload",
                "cmp",
                "payload",
                "cmp",
                "payload",
                "cmp",
                "payload",
                "cmp",
                "immediate"
            ]
        );
        let bytes = &m[..];
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[127, 0, 0, 2]) && has(&0x1234u16.to_be_bytes()));
    }
}
