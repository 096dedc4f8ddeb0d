//! A thread's scheduling: nice value, policy and priority, CPU affinity.
//! Read from outside at dump, applied from outside at restore.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Scheduling of one thread: nice value, policy and priority, CPU affinity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sched {
    pub nice: i32,
    pub policy: i32,
    pub priority: i32,
    /// Allowed CPUs as a bitmap, 64 CPUs per word.
    pub affinity: Vec<u64>,
}

impl Sched {
    /// Reads the scheduling of thread `tid` from outside.
    pub fn collect(tid: i32) -> Result<Sched> {
        let err = |what: &str| Error::sys(tid, what.to_string(), nix::errno::Errno::last());
        // SAFETY: these calls take a tid and write only into locals we own.
        unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
            if nice == -1 && nix::errno::Errno::last_raw() != 0 {
                return Err(err("getpriority"));
            }
            let policy = libc::sched_getscheduler(tid);
            if policy < 0 {
                return Err(err("sched_getscheduler"));
            }
            let mut param: libc::sched_param = std::mem::zeroed();
            if libc::sched_getparam(tid, &mut param) < 0 {
                return Err(err("sched_getparam"));
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) < 0 {
                return Err(err("sched_getaffinity"));
            }
            let words = std::mem::size_of::<libc::cpu_set_t>() / 8;
            let raw =
                std::slice::from_raw_parts((&set as *const libc::cpu_set_t).cast::<u64>(), words);
            let last = raw.iter().rposition(|&w| w != 0).map_or(0, |i| i + 1);
            Ok(Sched {
                nice,
                policy,
                priority: param.sched_priority,
                affinity: raw[..last].to_vec(),
            })
        }
    }

    /// Applies it to thread `tid` from outside.
    pub fn apply(&self, tid: i32) -> Result<()> {
        let err = |what: &str| Error::sys(tid, what.to_string(), nix::errno::Errno::last());
        // SAFETY: these calls take a tid and read only locals we own.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let words = std::mem::size_of::<libc::cpu_set_t>() / 8;
            let raw = std::slice::from_raw_parts_mut(
                (&mut set as *mut libc::cpu_set_t).cast::<u64>(),
                words,
            );
            for (dst, src) in raw.iter_mut().zip(&self.affinity) {
                *dst = *src;
            }
            if !self.affinity.is_empty()
                && libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) < 0
            {
                return Err(err("sched_setaffinity"));
            }
            let param = libc::sched_param {
                sched_priority: self.priority,
            };
            if libc::sched_setscheduler(tid, self.policy, &param) < 0 {
                return Err(err("sched_setscheduler"));
            }
            if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, self.nice) < 0 {
                return Err(err("setpriority"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collect, apply, collect again: the same state.
    #[test]
    fn round_trip() {
        let tid = nix::unistd::gettid().as_raw();
        let saved = Sched::collect(tid).unwrap();
        saved.apply(tid).unwrap();
        assert_eq!(Sched::collect(tid).unwrap(), saved);
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<Sched>(&json).unwrap(), saved);
    }
}
