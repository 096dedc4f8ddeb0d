//! The network lock on a live connection: nothing passes while it is held,
//! and the traffic resumes once it is released. Needs root and nf_tables.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use crest_engine::net::inet::sock_name;
use crest_engine::net::netlock::{tables, Session};

fn a_locked_connection_carries_nothing_until_released() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut cl = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (mut sv, _) = l.accept().expect("accept");
    let local = sock_name(cl.as_raw_fd(), false).expect("getsockname");
    let peer = sock_name(cl.as_raw_fd(), true).expect("getpeername");
    let mut session = Session::default();
    session
        .lock(&local, &peer, "test connection")
        .expect("lock");
    let table = session.current().expect("held").table;
    assert!(tables().expect("list").contains(&table));
    cl.write_all(b"x").expect("write");
    sv.set_read_timeout(Some(Duration::from_millis(400)))
        .expect("timeout");
    let mut b = [0u8; 1];
    assert!(sv.read(&mut b).is_err(), "a byte passed the lock");
    session.release();
    assert!(!tables().expect("list").contains(&table));
    // The sender retransmits it once the rules are gone.
    sv.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    sv.read_exact(&mut b).expect("the byte after the lock");
    assert_eq!(&b, b"x");
}

fn main() -> std::process::ExitCode {
    run(root_tests![
        a_locked_connection_carries_nothing_until_released
    ])
}
