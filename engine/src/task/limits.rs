//! Resource limits: read from `/proc/PID/limits` (not prlimit(2): reading
//! another uid's limits with prlimit needs CAP_SYS_RESOURCE, which root may
//! lack), set again by the restore child on itself.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Parses `/proc/PID/limits`: a header, then one row per resource in
/// RLIMIT_* order, with a 25-column name and 20-column soft and hard values.
pub fn parse_limits(text: &str) -> Result<Vec<Rlimit>, LimitsError> {
    let value = |v: &str| -> Result<u64, LimitsError> {
        match v.trim() {
            "unlimited" => Ok(libc::RLIM_INFINITY),
            v => v.parse().map_err(|_| LimitsError::Value {
                value: v.to_string(),
            }),
        }
    };
    let short = |line: &str| LimitsError::Short {
        line: line.to_string(),
    };
    text.lines()
        .skip(1)
        .enumerate()
        .map(|(i, line)| {
            let soft = line.get(26..46).ok_or_else(|| short(line))?;
            let hard = line.get(47..67).ok_or_else(|| short(line))?;
            Ok(Rlimit {
                resource: i as u32,
                soft: value(soft)?,
                hard: value(hard)?,
            })
        })
        .collect()
}

/// A `/proc/PID/limits` crest cannot read.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("short line {line:?}")]
    Short { line: String },
    #[error("bad limit {value:?}")]
    Value { value: String },
}

/// Sets `limits` on the calling process (the restore child). Raising a hard
/// limit needs CAP_SYS_RESOURCE: without it, crest's own hard limit stays,
/// the soft one capped to it.
pub fn apply_in_child(limits: &[Rlimit]) {
    for l in limits {
        let want = libc::rlimit {
            rlim_cur: l.soft,
            rlim_max: l.hard,
        };
        // SAFETY: setrlimit/getrlimit on ourselves with structs we own.
        unsafe {
            if libc::setrlimit(l.resource as _, &want) < 0 {
                let mut have = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(l.resource as _, &mut have);
                let capped = libc::rlimit {
                    rlim_cur: l.soft.min(have.rlim_max),
                    rlim_max: have.rlim_max,
                };
                libc::setrlimit(l.resource as _, &capped);
            }
        }
    }
}

/// Says which hard limits of process `pid` the restore cannot give back:
/// raising a hard limit above crest's own needs CAP_SYS_RESOURCE (root here
/// may lack it); the restored process then keeps crest's hard limit, its
/// soft limit capped to it.
pub fn warn_unraisable(pid: i32, limits: &[Rlimit]) {
    for l in limits {
        let mut have = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a struct we own.
        unsafe { libc::getrlimit(l.resource as _, &mut have) };
        if l.hard > have.rlim_max {
            tracing::warn!(
                pid,
                resource = l.resource,
                "hard rlimit {} is above crest's own {}: restored as {} unless crest holds CAP_SYS_RESOURCE",
                l.hard,
                have.rlim_max,
                have.rlim_max
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_in_resource_order() {
        let text =
            "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max file size             unlimited            unlimited            bytes     \n\
Max data size             unlimited            unlimited            bytes     \n\
Max stack size            8388608              unlimited            bytes     \n\
Max core file size        0                    unlimited            bytes     \n\
Max resident set          unlimited            unlimited            bytes     \n\
Max processes             95556                95556                processes \n\
Max open files            512                  4096                 files     \n";
        let l = parse_limits(text).unwrap();
        assert_eq!(l.len(), 8);
        assert_eq!(
            l[3],
            Rlimit {
                resource: 3,
                soft: 8388608,
                hard: libc::RLIM_INFINITY
            }
        );
        assert_eq!(
            l[7],
            Rlimit {
                resource: 7,
                soft: 512,
                hard: 4096
            }
        );
        assert!(parse_limits("h\nMax cpu time   bogus").is_err());
    }

    /// The limits of this process, read back after being set: the same.
    #[test]
    fn round_trip() {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let saved = parse_limits(&text).unwrap();
        assert_eq!(saved.len(), 16);
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Rlimit>>(&json).unwrap(), saved);
    }
}
