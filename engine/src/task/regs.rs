//! A thread's general registers, by name (x86-64 `user_regs_struct`), and
//! how a system call the freeze interrupted goes on.

use serde::{Deserialize, Serialize};

use crate::sys::ptrace::Regs;

/// x86-64 `user_regs_struct`, by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registers {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

macro_rules! regs_fields {
    ($m:ident) => {
        $m!(
            r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip,
            cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
        )
    };
}

impl From<&Regs> for Registers {
    fn from(r: &Regs) -> Registers {
        macro_rules! conv { ($($f:ident),*) => { Registers { $($f: r.$f),* } } }
        regs_fields!(conv)
    }
}

impl Registers {
    pub fn to_user_regs(&self) -> Regs {
        // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        macro_rules! conv { ($($f:ident),*) => { $(r.$f = self.$f;)* } }
        regs_fields!(conv);
        r
    }

    /// How the syscall interrupted by the freeze continues (see
    /// [`crate::sys::ptrace::resume_interrupted_syscall`]).
    pub fn resume_interrupted_syscall(&mut self, restart_block: bool) {
        let mut r = self.to_user_regs();
        crate::sys::ptrace::resume_interrupted_syscall(&mut r, restart_block);
        *self = Registers::from(&r);
    }

    /// The system call the task was inside when it was stopped, if any.
    pub fn interrupted_syscall(&self) -> Option<i64> {
        let nr = self.orig_rax as i64;
        (nr >= 0).then_some(nr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::ptrace::{ERESTARTNOHAND, ERESTARTSYS, ERESTART_RESTARTBLOCK};
    use rstest::rstest;

    fn in_syscall(nr: i64, rax: i64) -> Registers {
        Registers {
            orig_rax: nr as u64,
            rax: rax as u64,
            rip: 0x1002,
            rdi: 0x10,
            rsi: 0x20,
            rdx: 0x30,
            r10: 0x40,
            ..Default::default()
        }
    }

    #[rstest]
    #[case::read_restarts(0, ERESTARTSYS, true, 0, 0x1000)]
    #[case::pause_restarts(34, ERESTARTNOHAND, false, 34, 0x1000)]
    #[case::live_nanosleep_uses_restart_block(
        35,
        ERESTART_RESTARTBLOCK,
        true,
        libc::SYS_restart_syscall,
        0x1000
    )]
    #[case::restored_nanosleep_sleeps_the_rest(35, ERESTART_RESTARTBLOCK, false, 35, 0x1000)]
    #[case::restored_poll_is_reissued(7, ERESTART_RESTARTBLOCK, false, 7, 0x1000)]
    #[case::finished_syscall_untouched(1, 5, false, 5, 0x1002)]
    fn interrupted_syscalls_resume_as_the_kernel_would(
        #[case] nr: i64,
        #[case] rax: i64,
        #[case] restart_block: bool,
        #[case] want_rax: i64,
        #[case] want_rip: u64,
    ) {
        let mut r = in_syscall(nr, rax);
        r.resume_interrupted_syscall(restart_block);
        assert_eq!((r.rax as i64, r.rip), (want_rax, want_rip));
        assert_eq!(r.orig_rax, u64::MAX);
    }

    #[test]
    fn restored_relative_sleep_continues_from_remaining_time() {
        let mut r = in_syscall(35, ERESTART_RESTARTBLOCK);
        r.resume_interrupted_syscall(false);
        assert_eq!(r.rdi, 0x20, "nanosleep(req=rem, rem)");
        let mut r = in_syscall(libc::SYS_clock_nanosleep, ERESTART_RESTARTBLOCK);
        r.rsi = 0;
        r.resume_interrupted_syscall(false);
        assert_eq!(r.rdx, 0x40, "clock_nanosleep(clock, 0, req=rem, rem)");
    }

    #[test]
    fn registers_convert_both_ways() {
        let r = in_syscall(35, -516);
        assert_eq!(Registers::from(&r.to_user_regs()), r);
    }
}
