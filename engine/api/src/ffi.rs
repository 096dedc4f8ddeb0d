//! The C ABI (`crest.h`): thin wrappers over the Rust functions.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::time::Duration;

use crate::core;

pub const CREST_SIGNAL_CONTEXT: c_int = 1;
pub const CREST_THREAD_CONTEXT: c_int = 2;
pub const CREST_CHECKPOINT_OK: c_int = 0;
pub const CREST_CHECKPOINT_TEMP_FAILURE: c_int = 1;
pub const CREST_CHECKPOINT_PERM_FAILURE: c_int = 2;
pub const CREST_CONTINUE: c_int = 0;
pub const CREST_RESTARTED: c_int = 1;

/// See `crest.h`.
#[no_mangle]
pub extern "C" fn crest_init() -> c_int {
    core::init().map_or_else(|e| -e, |()| 0)
}

#[no_mangle]
pub extern "C" fn crest_signal() -> c_int {
    core::signal_number()
}

#[no_mangle]
pub extern "C" fn crest_register_callback(
    cb: Option<core::Callback>,
    arg: *mut c_void,
    flags: c_int,
) -> c_int {
    let Some(cb) = cb else {
        return -libc::EINVAL;
    };
    core::register(cb, arg, flags as u32).map_or_else(|e| -e, |id| id as c_int)
}

#[no_mangle]
pub extern "C" fn crest_unregister_callback(id: c_int) -> c_int {
    core::unregister(id as usize).map_or_else(|e| -e, |()| 0)
}

/// # Safety
/// `reason` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn crest_checkpoint(flags: c_int, reason: *const c_char) -> c_int {
    let reason = if reason.is_null() {
        &b""[..]
    } else {
        // SAFETY: the caller passes a NUL-terminated string.
        unsafe { CStr::from_ptr(reason) }.to_bytes()
    };
    let kind = match flags {
        CREST_CHECKPOINT_TEMP_FAILURE => core::ABORT_TEMPORARY,
        CREST_CHECKPOINT_PERM_FAILURE => core::ABORT_PERMANENT,
        _ => 0,
    };
    core::checkpoint(kind, reason)
}

#[no_mangle]
pub extern "C" fn crest_enter_cs() {
    core::enter_cs()
}

#[no_mangle]
pub extern "C" fn crest_leave_cs() {
    core::leave_cs()
}

/// # Safety
/// `dir` is a NUL-terminated path; `err` is NULL or writable for `errlen` bytes.
#[no_mangle]
pub unsafe extern "C" fn crest_request_checkpoint(
    dir: *const c_char,
    timeout_secs: c_int,
    err: *mut c_char,
    errlen: usize,
) -> c_int {
    if dir.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let dir = unsafe { CStr::from_ptr(dir) };
    let dir = std::path::Path::new(std::ffi::OsStr::from_bytes(dir.to_bytes()));
    let timeout = Duration::from_secs(timeout_secs.max(1) as u64);
    match crate::request::request(dir, timeout) {
        Ok(true) => CREST_RESTARTED,
        Ok(false) => CREST_CONTINUE,
        Err(msg) => {
            if !err.is_null() && errlen > 0 {
                let n = msg.len().min(errlen - 1);
                // SAFETY: err is writable for errlen bytes and n < errlen.
                unsafe {
                    std::ptr::copy_nonoverlapping(msg.as_ptr(), err as *mut u8, n);
                    *err.add(n) = 0;
                }
            }
            -libc::ECANCELED
        }
    }
}

use std::os::unix::ffi::OsStrExt;
