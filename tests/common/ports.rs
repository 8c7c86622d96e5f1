//! Ports for child processes' configs without a window for anyone else to take them.
//!
//! A port picked by binding `127.0.0.1:0` and releasing it can be handed out again before the
//! child binds it (to the next pick in the same config, or to any socket on the machine). Here
//! the test binds `127.0.0.1:0` and keeps the listening socket; the `mailroom` child started
//! with that address in its config inherits the socket itself (systemd socket activation,
//! `LISTEN_FDS`, which `mailroom run` honours), so the port is never free in between.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Mutex;

/// Listening sockets bound for a child, by address, until one is started with it.
static HELD: Mutex<BTreeMap<String, TcpListener>> = Mutex::new(BTreeMap::new());

/// Most sockets one child inherits (a node's public, admin and cluster listeners).
const MAX_INHERITED: usize = 3;

/// An address on 127.0.0.1 for a `mailroom` child's config: bound and held until
/// [`inherit_systemd`] hands it to the child started with it.
pub fn held_addr() -> String {
    hold(TcpListener::bind("127.0.0.1:0").unwrap())
}

/// Holds a listening socket for the next child started with its address; its address.
pub fn hold(l: TcpListener) -> String {
    let addr = l.local_addr().unwrap().to_string();
    HELD.lock().unwrap().insert(addr.clone(), l);
    addr
}

/// Makes `cmd`'s child (`mailroom run`) inherit the held sockets of `addrs` as systemd hands
/// sockets over: fds 3.., `LISTEN_FDS`. Addresses not held (a node restarted on the address it
/// had) are left for the child to bind. Keep the result until `cmd` is spawned.
pub fn inherit_systemd(cmd: &mut Command, addrs: &[&str]) -> Vec<TcpListener> {
    let held: Vec<TcpListener> = {
        let mut map = HELD.lock().unwrap();
        addrs.iter().filter_map(|a| map.remove(*a)).collect()
    };
    assert!(held.len() <= MAX_INHERITED, "at most {MAX_INHERITED} inherited sockets");
    if held.is_empty() {
        return held;
    }
    cmd.env("LISTEN_FDS", held.len().to_string()).env_remove("LISTEN_PID");
    let mut fds: [RawFd; MAX_INHERITED] = [-1; MAX_INHERITED];
    for (slot, l) in fds.iter_mut().zip(&held) {
        *slot = l.as_raw_fd();
    }
    let n = held.len();
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2), no allocation.
    // Each socket is first copied above fd 64 (close-on-exec), so placing one on 3.. cannot
    // overwrite another before it is copied; dup2 clears close-on-exec on the placed copy.
    unsafe {
        cmd.pre_exec(move || {
            let mut high: [RawFd; MAX_INHERITED] = [-1; MAX_INHERITED];
            for i in 0..n {
                high[i] = libc::fcntl(fds[i], libc::F_DUPFD_CLOEXEC, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in high.iter().enumerate().take(n) {
                if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    held
}

/// A free port on 127.0.0.1 from below the kernel's ephemeral range, for a child that must
/// bind the port itself (nginx): released here, but no outgoing connection's source port and
/// no listener on port 0 (every other test's) is ever drawn from there, so only another
/// explicit pick can take it before the child binds (as `scripts/ports.sh` picks for the
/// scripts' children).
pub fn unclaimed_port() -> u16 {
    let eph_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000u16, eph_low.saturating_sub(10_000).max(1));
    // A random start (std's hasher keys differ at every call), then every port in turn.
    use std::hash::{BuildHasher, Hasher};
    let start = std::collections::hash_map::RandomState::new().build_hasher().finish() % span as u64;
    (0..span as u64)
        .map(|i| low + ((start + i) % span as u64) as u16)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range")
}
