//! Names of kernel constants, for messages and `crest show`.

/// A signal's name (`SIGUSR1`, `SIGRTMIN+2`).
pub fn signal_name(signo: i32) -> String {
    match nix::sys::signal::Signal::try_from(signo) {
        Ok(s) => s.as_str().to_string(),
        Err(_) if signo >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", signo - libc::SIGRTMIN()),
        Err(_) => format!("signal {signo}"),
    }
}

/// Names of the signals set in `mask` (bit N-1 is signal N).
pub fn mask_names(mask: u64) -> Vec<String> {
    (1..=64)
        .filter(|s| mask & (1u64 << (s - 1)) != 0)
        .map(signal_name)
        .collect()
}

/// A clock ID as a name.
pub fn clock_name(clock: i32) -> String {
    match clock {
        libc::CLOCK_REALTIME => "CLOCK_REALTIME".into(),
        libc::CLOCK_MONOTONIC => "CLOCK_MONOTONIC".into(),
        libc::CLOCK_PROCESS_CPUTIME_ID => "CLOCK_PROCESS_CPUTIME_ID".into(),
        libc::CLOCK_THREAD_CPUTIME_ID => "CLOCK_THREAD_CPUTIME_ID".into(),
        libc::CLOCK_BOOTTIME => "CLOCK_BOOTTIME".into(),
        libc::CLOCK_REALTIME_ALARM => "CLOCK_REALTIME_ALARM".into(),
        libc::CLOCK_BOOTTIME_ALARM => "CLOCK_BOOTTIME_ALARM".into(),
        c if c < 0 => format!("CPU clock {c}"),
        c => format!("clock {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_masks_are_named() {
        assert_eq!(mask_names(1 << 9), vec!["SIGUSR1"]);
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
    }
}
