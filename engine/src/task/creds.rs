//! Credentials: user and group ids, supplementary groups and the five
//! capability sets. Collect reads them from `/proc/PID/status`; restore sets
//! them in every thread (they are per thread in the kernel) through remote
//! calls, in the order the kernel allows: the bounding set while crest's
//! capabilities still let it drop members, groups before the uids drop.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys::proc;
use crate::sys::remote::RemoteCall;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_inh: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
}

impl Creds {
    /// From `/proc/PID/status` of `pid` (its text).
    pub fn from_status(pid: i32, status: &str) -> Result<Creds> {
        let ids = |key: &str| -> Result<[u32; 4]> {
            let v: Vec<u32> = proc::status_field(status, key)
                .unwrap_or("")
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect();
            v.try_into().map_err(|_| Error::Refused {
                pid,
                reason: format!("cannot parse {key} from /proc/{pid}/status"),
            })
        };
        let cap = |key: &str| {
            proc::status_field(status, key)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0)
        };
        Ok(Creds {
            uids: ids("Uid")?,
            gids: ids("Gid")?,
            groups: proc::status_field(status, "Groups")
                .unwrap_or("")
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect(),
            cap_eff: cap("CapEff"),
            cap_prm: cap("CapPrm"),
            cap_inh: cap("CapInh"),
            cap_bnd: cap("CapBnd"),
            cap_amb: cap("CapAmb"),
        })
    }

    /// Refuses credentials the restore cannot set (more supplementary groups
    /// than its scratch space holds), for process `pid`.
    pub fn check(&self, pid: i32) -> Result<()> {
        if self.groups.len() * 4 > 2048 {
            return Err(Error::unsupported(
                pid,
                format!("{} supplementary groups", self.groups.len()),
            ));
        }
        Ok(())
    }

    /// Sets them in the thread behind `thread` (`no_new_privs`: set that too).
    pub fn restore(&self, thread: &RemoteCall, no_new_privs: bool) -> Result<()> {
        let c = self;
        let tcall = |nr: i64, args: [u64; 6], what: &str| thread.call(nr, args, what);
        let last_cap: u64 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(40);
        let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
        // The bounding set first (dropping needs CAP_SETPCAP, which we still have).
        for cap in 0..=last_cap {
            if c.cap_bnd & (1u64 << cap) == 0 {
                tcall(
                    libc::SYS_prctl,
                    [libc::PR_CAPBSET_DROP as u64, cap, 0, 0, 0, 0],
                    "prctl(PR_CAPBSET_DROP)",
                )?;
            }
        }
        // Keep capabilities across the uid change when a non-root process had some.
        let keep = c.uids[1] != 0 && c.cap_prm != 0;
        if keep {
            tcall(
                libc::SYS_prctl,
                [libc::PR_SET_KEEPCAPS as u64, 1, 0, 0, 0, 0],
                "prctl(PR_SET_KEEPCAPS)",
            )?;
        }
        let at = thread.write_scratch(0, &groups)?;
        tcall(
            libc::SYS_setgroups,
            [c.groups.len() as u64, at, 0, 0, 0, 0],
            "setgroups",
        )?;
        // Groups first: once the uids drop, setting gids is no longer allowed.
        // (Real, effective, saved; the filesystem id follows the effective one.)
        for (nr, ids, what) in [
            (libc::SYS_setresgid, c.gids, "setresgid"),
            (libc::SYS_setresuid, c.uids, "setresuid"),
        ] {
            let [real, effective, saved, _fs] = ids.map(u64::from);
            tcall(nr, [real, effective, saved, 0, 0, 0], what)?;
        }
        // capset: header {version 3, pid 0}, then {effective, permitted, inheritable} x2.
        let mut caps: Vec<u8> = Vec::new();
        caps.extend_from_slice(&0x2008_0522u32.to_ne_bytes());
        caps.extend_from_slice(&0i32.to_ne_bytes());
        for half in [0u32, 32] {
            for v in [c.cap_eff, c.cap_prm, c.cap_inh] {
                caps.extend_from_slice(&((v >> half) as u32).to_ne_bytes());
            }
        }
        let at = thread.write_scratch(0, &caps)?;
        tcall(libc::SYS_capset, [at, at + 8, 0, 0, 0, 0], "capset")?;
        for cap in 0..=last_cap {
            if c.cap_amb & (1u64 << cap) != 0 {
                tcall(
                    libc::SYS_prctl,
                    [
                        libc::PR_CAP_AMBIENT as u64,
                        libc::PR_CAP_AMBIENT_RAISE as u64,
                        cap,
                        0,
                        0,
                        0,
                    ],
                    "prctl(PR_CAP_AMBIENT_RAISE)",
                )?;
            }
        }
        if keep {
            tcall(
                libc::SYS_prctl,
                [libc::PR_SET_KEEPCAPS as u64, 0, 0, 0, 0, 0],
                "prctl(PR_SET_KEEPCAPS)",
            )?;
        }
        if no_new_privs {
            tcall(
                libc::SYS_prctl,
                [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
                "prctl(PR_SET_NO_NEW_PRIVS)",
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read from a status text and written back as JSON: the same.
    #[test]
    fn round_trip() {
        let status = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n\
                      Groups:\t27 100\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000400\n\
                      CapEff:\t0000000000000400\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        let c = Creds::from_status(7, status).unwrap();
        assert_eq!(
            c,
            Creds {
                uids: [1000; 4],
                gids: [100; 4],
                groups: vec![27, 100],
                cap_eff: 0x400,
                cap_prm: 0x400,
                cap_inh: 0,
                cap_bnd: 0x1ff_ffff_ffff,
                cap_amb: 0,
            }
        );
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Creds>(&json).unwrap(), c);
        assert!(Creds::from_status(7, "Uid:\t1\n").is_err());
    }
}
