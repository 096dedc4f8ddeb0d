//! Address-space state.
//!
//! `wl-mem --ctl DIR MODE [ARGS]`, MODE one of: anon MIB, anon-writing MIB, sparse GIB,
//! file-private, file-shared, shared-anon, shared-anon-fork, prot, brk, vdso,
//! memfd, posix-shm, unlinked-shm-fork, sysv-shm, madvise, growsdown.

use crest_workloads::support::{
    fork_child, mode, num_arg, pattern, pattern_diff, setup_failed, sys, wait_ok, write_all,
};
use crest_workloads::{fill_pattern, first_pattern_mismatch, Checks, Ctl};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::ptr;

const SEED: u64 = 0x3e3;
const PAGE: usize = 4096;

fn mmap(len: usize, prot: i32, flags: i32, fd: i32) -> *mut u8 {
    // SAFETY: a fresh mapping at an address of the kernel's choice.
    let p = unsafe { libc::mmap(ptr::null_mut(), len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        setup_failed("mmap");
    }
    p.cast()
}

/// A mapping as a slice.
///
/// # Safety
/// `p` must be a live readable mapping of at least `len` bytes.
unsafe fn slice<'a>(p: *mut u8, len: usize) -> &'a mut [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// The page written by write number `i` (0-based) of `anon-writing`.
fn written_page(i: u64, pages: usize) -> usize {
    let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) % pages as u64) as usize
}

/// Page contents for version `v` of page `p`: `v`, `p`, then a pattern of both.
fn fill_version(page: &mut [u8], p: usize, v: u64) {
    page[..8].copy_from_slice(&v.to_ne_bytes());
    page[8..16].copy_from_slice(&(p as u64).to_ne_bytes());
    fill_pattern(&mut page[16..], v.wrapping_mul(1 << 32) ^ p as u64);
}

/// Writes `anon-writing` makes between two replacements of its scratch mapping.
const REMAP_EVERY: u64 = 1000;
const SCRATCH: usize = 16 * PAGE;

/// Replaces the scratch mapping at `at` by a new one (MAP_FIXED: a new VMA,
/// which a write tracker has never seen) holding generation `g`.
fn remap_scratch(at: *mut u8, g: u64) {
    // SAFETY: `at` is the scratch range between two PROT_NONE guards; the
    // new mapping replaces exactly it.
    let p = unsafe {
        libc::mmap(
            at.cast(),
            SCRATCH,
            RW,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p != at.cast() {
        setup_failed("mmap MAP_FIXED of the scratch mapping");
    }
    // SAFETY: the mapping just made.
    let s = unsafe { slice(at, SCRATCH) };
    s[..8].copy_from_slice(&g.to_ne_bytes());
    fill_pattern(&mut s[8..], g);
}

/// `anon-writing MIB`: a thread keeps writing whole pages of a MIB MiB heap
/// (write `i` puts version `i + 1` into page `written_page(i)`), and every
/// [`REMAP_EVERY`] writes replaces a scratch mapping, while it is dumped;
/// after `go` it stops and replays the writes it counted: every page must
/// hold the version of the last write to it. A page the dump copied before
/// its last write (a page a pre-copy's final round missed) holds an older one.
fn anon_writing(ctl: &Ctl, c: &mut Checks, mib: usize) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let len = mib << 20;
    let pages = len / PAGE;
    let heap = mmap(len, RW, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1) as usize;
    // Small pages only: a harness watching from outside counts the faults a
    // pre-copy's write tracking causes, one per written page, where a huge
    // page would fault once for 512 of them (soft-dirty on 6.12 and later).
    // SAFETY: advice on the mapping just made.
    sys(
        unsafe { libc::madvise(heap as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) },
        "MADV_NOHUGEPAGE",
    );
    let guarded = mmap(
        SCRATCH + 2 * PAGE,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
    );
    // SAFETY: one page into the guarded range, SCRATCH bytes before its last page.
    let scratch = unsafe { guarded.add(PAGE) } as usize;
    remap_scratch(scratch as *mut u8, 0);
    // SAFETY: heap is a fresh RW mapping of len bytes.
    let mem = unsafe { slice(heap as *mut u8, len) };
    for (p, page) in mem.chunks_mut(PAGE).enumerate() {
        fill_version(page, p, 0);
    }
    static STOP: AtomicBool = AtomicBool::new(false);
    static DONE: AtomicU64 = AtomicU64::new(0);
    let writer = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || {
            let mut i = 0u64;
            while !STOP.load(Ordering::Acquire) {
                let p = written_page(i, pages);
                // SAFETY: page p of the heap mapping, written by this thread only.
                let page = unsafe { slice((heap + p * PAGE) as *mut u8, PAGE) };
                fill_version(page, p, i + 1);
                if (i + 1) % REMAP_EVERY == 0 {
                    remap_scratch(scratch as *mut u8, (i + 1) / REMAP_EVERY);
                }
                i += 1;
                DONE.store(i, Ordering::Release);
                if i % 64 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        })
        .unwrap_or_else(|_| setup_failed("spawn the writer thread"));
    // Ready once the writer runs (named, its start-up allocations made), so
    // the harness's view before the dump is the one the dump sees.
    while DONE.load(Ordering::Acquire) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Where the writer's count is, for a harness that watches it from
    // outside during the dump (did the process run while it was copied?).
    if std::fs::write(
        ctl.path("progress-addr"),
        format!("{:x}\n", &DONE as *const AtomicU64 as usize),
    )
    .is_err()
    {
        setup_failed("write ctl/progress-addr");
    }
    ctl.ready();
    ctl.wait_for_go();
    STOP.store(true, Ordering::Release);
    if writer.join().is_err() {
        c.fail("the writer thread panicked");
    }
    let n = DONE.load(Ordering::Acquire);
    let mut last = vec![0u64; pages];
    for i in 0..n {
        last[written_page(i, pages)] = i + 1;
    }
    let mut wrong = 0usize;
    for (p, page) in mem.chunks(PAGE).enumerate() {
        let mut want = vec![0u8; PAGE];
        fill_version(&mut want, p, last[p]);
        if page != want.as_slice() {
            if wrong < 5 {
                let v = u64::from_ne_bytes(page[..8].try_into().expect("8 bytes"));
                c.fail(format!(
                    "page {p} holds version {v} (or is torn), expected {} after {n} writes",
                    last[p]
                ));
            }
            wrong += 1;
        }
    }
    c.check(wrong == 0, || format!("{wrong} of {pages} pages differ"));
    // SAFETY: the scratch mapping.
    let s = unsafe { slice(scratch as *mut u8, SCRATCH) };
    let g = n / REMAP_EVERY;
    let got = u64::from_ne_bytes(s[..8].try_into().expect("8 bytes"));
    c.check(
        got == g && first_pattern_mismatch(&s[8..], g).is_none(),
        || format!("the scratch mapping holds generation {got} (or is torn), expected {g}"),
    );
    c.check(n > 0, || "the writer thread never wrote".into());
}

fn main() {
    let (ctl, args) = Ctl::from_args();
    let (mode, args) = mode(&args);
    let mut c = Checks::new();
    match mode.as_str() {
        "anon" => {
            let mib: usize = num_arg(&args, 0, "MiB");
            let mut heap = vec![0u8; mib << 20];
            fill_pattern(&mut heap, SEED);
            let m = mmap(1 << 20, RW, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
            // SAFETY: m is a fresh 1 MiB RW mapping.
            fill_pattern(unsafe { slice(m, 1 << 20) }, SEED + 1);
            let mut stack = [0u8; 8192];
            fill_pattern(&mut stack, SEED + 2);
            ctl.ready();
            ctl.wait_for_go();
            let stack = std::hint::black_box(stack);
            c.eq(
                "heap pattern mismatch at",
                first_pattern_mismatch(&heap, SEED),
                None,
            );
            // SAFETY: as above.
            c.eq(
                "mmap pattern mismatch at",
                first_pattern_mismatch(unsafe { slice(m, 1 << 20) }, SEED + 1),
                None,
            );
            c.eq(
                "stack pattern mismatch at",
                first_pattern_mismatch(&stack, SEED + 2),
                None,
            );
        }
        "sparse" => {
            let gib: usize = num_arg(&args, 0, "GiB");
            let len = gib << 30;
            let m = mmap(
                len,
                RW,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            );
            let touched: Vec<usize> = (0..16).map(|i| (len / 16) * i + PAGE * i).collect();
            for &off in &touched {
                // SAFETY: off + PAGE is inside the mapping.
                fill_pattern(unsafe { slice(m.add(off), PAGE) }, off as u64);
            }
            ctl.ready();
            ctl.wait_for_go();
            for &off in &touched {
                // SAFETY: as above.
                let s = unsafe { slice(m.add(off), PAGE) };
                c.check(first_pattern_mismatch(s, off as u64).is_none(), || {
                    format!("touched page at +{off:#x} differs")
                });
                // SAFETY: the page after a touched one is inside the mapping, never touched.
                let z = unsafe { slice(m.add(off + PAGE), PAGE) };
                c.check(z.iter().all(|&b| b == 0), || {
                    format!("untouched page at +{:#x} is not zero", off + PAGE)
                });
            }
        }
        "anon-writing" => anon_writing(&ctl, &mut c, num_arg(&args, 0, "MiB")),
        "file-private" | "file-shared" => file_map(&ctl, &mut c, mode == "file-shared"),
        "shared-anon" => {
            let len = 1 << 20;
            let a = mmap(len, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1);
            // SAFETY: a is a fresh RW mapping of len bytes.
            fill_pattern(unsafe { slice(a, len) }, SEED);
            // mremap with old size 0 maps the same shared object a second time.
            // SAFETY: a is a shared mapping; the result is checked.
            let b = unsafe { libc::mremap(a.cast(), 0, len, libc::MREMAP_MAYMOVE) };
            if b == libc::MAP_FAILED {
                setup_failed("mremap");
            }
            let b: *mut u8 = b.cast();
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: both are live mappings of len bytes.
            let (sa, sb) = unsafe { (slice(a, len), slice(b, len)) };
            c.eq(
                "first mapping mismatch at",
                first_pattern_mismatch(sa, SEED),
                None,
            );
            c.eq(
                "second mapping mismatch at",
                first_pattern_mismatch(sb, SEED),
                None,
            );
            sa[100] ^= 0xff;
            c.check(sb[100] == sa[100], || {
                "a write through one mapping is not seen through the other: no longer shared".into()
            });
        }
        "shared-anon-fork" => {
            let len = 1 << 20;
            let m = mmap(len, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1);
            // SAFETY: m is a fresh RW mapping of len bytes.
            let s = unsafe { slice(m, len) };
            fill_pattern(&mut s[PAGE..], SEED);
            s[0] = 0;
            s[1] = 0;
            let child = fork_child(|| {
                ctl.wait_for_go();
                // SAFETY: m stays mapped in the child; volatile because the parent writes it.
                let ok = wait_byte(unsafe { m.add(0) }, 1);
                if ok {
                    // SAFETY: as above.
                    unsafe { ptr::write_volatile(m.add(1), 2) };
                }
                i32::from(!ok)
            });
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: m is mapped.
            unsafe { ptr::write_volatile(m, 1) };
            c.check(wait_byte(m.wrapping_add(1), 2), || {
                "the child never saw the parent's write: the region is no longer shared".into()
            });
            if let Err(e) = wait_ok(child, "child") {
                c.fail(e);
            }
            c.eq(
                "pattern mismatch at",
                first_pattern_mismatch(&s[PAGE..], SEED),
                None,
            );
        }
        "prot" => prot(&ctl, &mut c),
        "brk" => brk(&ctl, &mut c),
        "vdso" => {
            // SAFETY: getauxval has no preconditions.
            let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
            ctl.ready();
            ctl.wait_for_go();
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let start = maps
                .lines()
                .find(|l| l.ends_with("[vdso]"))
                .and_then(|l| usize::from_str_radix(l.split('-').next()?, 16).ok());
            c.eq("[vdso] start", start, Some(vdso));
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: ts is a valid out pointer; glibc calls into the vDSO.
            let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            c.check(r == 0 && ts.tv_sec > 0, || {
                "clock_gettime through the vDSO failed".into()
            });
            let mut tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            };
            // SAFETY: tv is a valid out pointer.
            let r = unsafe { libc::gettimeofday(&mut tv, ptr::null_mut()) };
            c.check(r == 0 && tv.tv_sec > 1_600_000_000, || {
                "gettimeofday through the vDSO failed".into()
            });
        }
        "memfd" => memfd(&ctl, &mut c),
        "posix-shm" => {
            let name =
                CString::new(format!("/crest-wl-{}", std::process::id())).unwrap_or_default();
            let len = 64 * 1024;
            // SAFETY: name is NUL-terminated.
            let fd = sys(
                unsafe { libc::shm_open(name.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o600) },
                "shm_open",
            );
            // SAFETY: plain values.
            sys(unsafe { libc::ftruncate(fd, len as i64) }, "ftruncate");
            let m = mmap(len, RW, libc::MAP_SHARED, fd);
            // SAFETY: m is a RW mapping of len bytes.
            fill_pattern(unsafe { slice(m, len) }, SEED);
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: as above.
            let s = unsafe { slice(m, len) };
            c.eq("mapping mismatch at", first_pattern_mismatch(s, SEED), None);
            let mut b = vec![0u8; len];
            // SAFETY: b is valid for len bytes.
            unsafe { libc::pread(fd, b.as_mut_ptr().cast(), len, 0) };
            c.eq(
                "contents read through the fd mismatch at",
                first_pattern_mismatch(&b, SEED),
                None,
            );
            c.check(
                std::path::Path::new(&format!("/dev/shm{}", name.to_string_lossy())).exists(),
                || "the shm object is gone".into(),
            );
            // SAFETY: name is NUL-terminated.
            unsafe { libc::shm_unlink(name.as_ptr()) };
        }
        // MPICH's intra-node segment: a /dev/shm file mapped shared, unlinked,
        // and inherited by a forked child; no descriptor stays open.
        "unlinked-shm-fork" => {
            let path = format!("/dev/shm/crest-wl-unlinked-{}", std::process::id());
            let cpath = CString::new(path.clone()).unwrap_or_default();
            let len = 64 * 1024;
            // SAFETY: cpath is NUL-terminated.
            let fd = sys(
                unsafe {
                    libc::open(
                        cpath.as_ptr(),
                        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                        0o600,
                    )
                },
                "open in /dev/shm",
            );
            // SAFETY: plain values.
            sys(unsafe { libc::ftruncate(fd, len as i64) }, "ftruncate");
            let m = mmap(len, RW, libc::MAP_SHARED, fd);
            // SAFETY: fd and cpath are ours.
            unsafe {
                libc::close(fd);
                libc::unlink(cpath.as_ptr());
            }
            // SAFETY: m is a fresh RW mapping of len bytes.
            let s = unsafe { slice(m, len) };
            fill_pattern(&mut s[PAGE..], SEED);
            s[0] = 0;
            s[1] = 0;
            let child = fork_child(|| {
                ctl.wait_for_go();
                // SAFETY: m stays mapped in the child; volatile because the parent writes it.
                let ok = wait_byte(unsafe { m.add(0) }, 1);
                if ok {
                    // SAFETY: as above.
                    unsafe { ptr::write_volatile(m.add(1), 2) };
                }
                i32::from(!ok)
            });
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: m is mapped.
            unsafe { ptr::write_volatile(m, 1) };
            c.check(wait_byte(m.wrapping_add(1), 2), || {
                "the child never saw the parent's write: the segment is no longer shared".into()
            });
            if let Err(e) = wait_ok(child, "child") {
                c.fail(e);
            }
            c.eq(
                "pattern mismatch at",
                first_pattern_mismatch(&s[PAGE..], SEED),
                None,
            );
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            c.check(maps.contains(&format!("{path} (deleted)")), || {
                format!("/proc/self/maps no longer shows {path} (deleted)")
            });
        }
        "growsdown" => {
            let len = 4 * PAGE;
            let m = mmap(
                len,
                RW,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN,
                -1,
            );
            // SAFETY: m is a fresh RW mapping of len bytes.
            fill_pattern(unsafe { slice(m, len) }, SEED);
            ctl.ready();
            ctl.wait_for_go();
            let flags = vm_flags(m as usize).unwrap_or_default();
            c.check(flags.split_whitespace().any(|f| f == "gd"), || {
                format!("VmFlags {flags:?} lack \"gd\" (MAP_GROWSDOWN)")
            });
            // SAFETY: as above.
            c.eq(
                "growsdown region mismatch at",
                first_pattern_mismatch(unsafe { slice(m, len) }, SEED),
                None,
            );
        }
        "madvise" => {
            let m = mmap(3 * PAGE, RW, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
            // SAFETY: advising and locking pages of our own fresh mapping.
            unsafe {
                sys(
                    libc::madvise(m.cast(), PAGE, libc::MADV_DONTFORK),
                    "MADV_DONTFORK",
                );
                sys(
                    libc::madvise(m.add(PAGE).cast(), PAGE, libc::MADV_WIPEONFORK),
                    "MADV_WIPEONFORK",
                );
                sys(libc::mlock(m.add(2 * PAGE).cast(), PAGE), "mlock");
            }
            ctl.ready();
            ctl.wait_for_go();
            let base = m as usize;
            for (i, flag, what) in [
                (0, "dc", "MADV_DONTFORK"),
                (1, "wf", "MADV_WIPEONFORK"),
                (2, "lo", "mlock"),
            ] {
                let flags = vm_flags(base + i * PAGE).unwrap_or_default();
                c.check(flags.split_whitespace().any(|f| f == flag), || {
                    format!("page {i}: VmFlags {flags:?} lack {flag:?} ({what})")
                });
            }
        }
        "sysv-shm" => {
            let len = 64 * 1024;
            // SAFETY: plain values.
            let id = sys(
                unsafe { libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600) },
                "shmget",
            );
            // SAFETY: id is a fresh segment.
            let p = unsafe { libc::shmat(id, ptr::null(), 0) };
            if p as isize == -1 {
                setup_failed("shmat");
            }
            let p: *mut u8 = p.cast();
            // SAFETY: p is an attached RW segment of len bytes.
            fill_pattern(unsafe { slice(p, len) }, SEED);
            // Its last page made read-only: the attachment is two VMAs (two attaches).
            // SAFETY: a page of our own attachment.
            sys(
                unsafe { libc::mprotect(p.add(len - PAGE).cast(), PAGE, libc::PROT_READ) },
                "mprotect",
            );
            // A second segment with a key and an odd size, attached read-only
            // and already removed (it lives until the last detach).
            let len2 = 10_000;
            let key = 0x4352_0000 | (std::process::id() as i32 & 0xffff);
            // SAFETY: plain values.
            let id2 = sys(
                unsafe { libc::shmget(key, len2, libc::IPC_CREAT | libc::IPC_EXCL | 0o640) },
                "shmget",
            );
            // SAFETY: id2 is a fresh segment, attached read-write once to fill it.
            let p2: *mut u8 = unsafe {
                let w = libc::shmat(id2, ptr::null(), 0);
                if w as isize == -1 {
                    setup_failed("shmat");
                }
                fill_pattern(slice(w.cast(), len2), SEED + 1);
                libc::shmdt(w);
                let r = libc::shmat(id2, ptr::null(), libc::SHM_RDONLY);
                if r as isize == -1 {
                    setup_failed("shmat");
                }
                sys(
                    libc::shmctl(id2, libc::IPC_RMID, ptr::null_mut()),
                    "IPC_RMID",
                );
                r.cast()
            };
            ctl.ready();
            ctl.wait_for_go();
            // SAFETY: p2 is an attached read-only segment of len2 bytes.
            c.eq(
                "removed segment mismatch at",
                first_pattern_mismatch(unsafe { slice(p2, len2) }, SEED + 1),
                None,
            );
            // SAFETY: ds2 is a valid out pointer.
            let mut ds2: libc::shmid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let r = unsafe { libc::shmctl(id2, libc::IPC_STAT, &mut ds2) };
            c.check(r == 0, || {
                format!(
                    "shmctl(IPC_STAT) on removed segment {id2}: {}",
                    std::io::Error::last_os_error()
                )
            });
            c.eq("removed segment size", ds2.shm_segsz, len2);
            c.eq(
                "removed segment mode (with SHM_DEST)",
                ds2.shm_perm.mode & 0o1777,
                0o1640,
            );
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let line = maps
                .lines()
                .find(|l| l.starts_with(&format!("{:x}-", p2 as usize)))
                .unwrap_or_default()
                .to_string();
            c.check(line.contains(" r--s "), || {
                format!("the read-only attachment is {line:?}")
            });
            // SAFETY: as above.
            c.eq(
                "segment mismatch at",
                first_pattern_mismatch(unsafe { slice(p, len) }, SEED),
                None,
            );
            // SAFETY: ds is a valid out pointer.
            let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let r = unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) };
            c.check(r == 0, || {
                format!(
                    "shmctl(IPC_STAT) on segment {id}: {}",
                    std::io::Error::last_os_error()
                )
            });
            c.eq("attach count (two VMAs)", ds.shm_nattch, 2);
            c.eq("segment size", ds.shm_segsz, len);
            // SAFETY: removing our own segment.
            unsafe { libc::shmctl(id, libc::IPC_RMID, ptr::null_mut()) };
        }
        other => {
            eprintln!("wl-mem: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
    ctl.finish(&c.into_differences());
}

fn wait_byte(p: *mut u8, want: u8) -> bool {
    let t0 = std::time::Instant::now();
    // SAFETY: callers pass a live shared mapping.
    while unsafe { ptr::read_volatile(p) } != want {
        if t0.elapsed() > std::time::Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

fn file_map(ctl: &Ctl, c: &mut Checks, shared: bool) {
    let len = 16 * PAGE;
    let path = ctl.path("mapped");
    std::fs::write(&path, pattern(len, SEED)).unwrap_or_else(|_| setup_failed("write"));
    let cp = CString::new(path.as_os_str().as_bytes()).unwrap_or_default();
    // SAFETY: cp is NUL-terminated.
    let fd = sys(unsafe { libc::open(cp.as_ptr(), libc::O_RDWR) }, "open");
    let flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    let m = mmap(len, RW, flags, fd);
    // SAFETY: m is a RW mapping of len bytes.
    let s = unsafe { slice(m, len) };
    // Modify pages 3 and 7 (COW copies for a private mapping).
    for pg in [3, 7] {
        s[pg * PAGE..(pg + 1) * PAGE].fill(0xaa);
    }
    // SAFETY: plain values.
    unsafe { libc::close(fd) };
    ctl.ready();
    ctl.wait_for_go();
    let mut want = pattern(len, SEED);
    for pg in [3, 7] {
        want[pg * PAGE..(pg + 1) * PAGE].fill(0xaa);
    }
    c.check(s == want.as_slice(), || {
        let i = s.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        format!("mapping differs at byte {i} (page {})", i / PAGE)
    });
    let file = std::fs::read(&path).unwrap_or_default();
    if shared {
        c.check(file == want, || {
            "the file does not hold the writes made through the shared mapping".into()
        });
        s[5 * PAGE] = 0x55;
        // SAFETY: m is a mapping of len bytes.
        unsafe { libc::msync(m.cast(), len, libc::MS_SYNC) };
        let file = std::fs::read(&path).unwrap_or_default();
        c.eq(
            "file byte written through the mapping after restore",
            file.get(5 * PAGE).copied(),
            Some(0x55),
        );
    } else {
        if let Some(d) = pattern_diff("the file under a private mapping", &file, len, SEED) {
            c.fail(d);
        }
    }
}

/// The VmFlags line of the smaps entry holding `addr`.
fn vm_flags(addr: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for l in smaps.lines() {
        if let Some((range, _)) = l.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
        }
        if inside {
            if let Some(f) = l.strip_prefix("VmFlags:") {
                return Some(f.trim().to_string());
            }
        }
    }
    None
}

fn perms_at(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let (range, rest) = l.split_once(' ')?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (
            usize::from_str_radix(a, 16).ok()?,
            usize::from_str_radix(b, 16).ok()?,
        );
        (a <= addr && addr < b).then(|| rest[..4].to_string())
    })
}

fn prot(ctl: &Ctl, c: &mut Checks) {
    let m = mmap(4 * PAGE, RW, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
    // SAFETY: m is a RW mapping of 4 pages.
    let s = unsafe { slice(m, 4 * PAGE) };
    fill_pattern(s, SEED);
    let want = s.to_vec();
    // SAFETY: changing protections of our own pages.
    unsafe {
        sys(
            libc::mprotect(m.cast(), PAGE, libc::PROT_NONE),
            "mprotect none",
        );
        sys(
            libc::mprotect(m.add(PAGE).cast(), PAGE, libc::PROT_READ),
            "mprotect ro",
        );
        sys(
            libc::mprotect(m.add(3 * PAGE).cast(), PAGE, libc::PROT_NONE),
            "mprotect guard",
        );
    }
    ctl.ready();
    ctl.wait_for_go();
    let base = m as usize;
    let got: Vec<Option<String>> = (0..4).map(|i| perms_at(base + i * PAGE)).collect();
    let expect: Vec<Option<String>> = ["---p", "r--p", "rw-p", "---p"]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect();
    c.eq("page permissions", got, expect);
    // SAFETY: pages 1 and 2 are readable.
    let readable = unsafe { slice(m.add(PAGE), 2 * PAGE) };
    c.check(readable == &want[PAGE..3 * PAGE], || {
        "contents of the read-only or RW page differ".into()
    });
    // Reading the PROT_NONE pages' contents needs permission back.
    // SAFETY: our own pages.
    unsafe { libc::mprotect(m.cast(), 4 * PAGE, libc::PROT_READ) };
    // SAFETY: now readable.
    c.check(unsafe { slice(m, 4 * PAGE) } == want.as_slice(), || {
        "contents of the PROT_NONE pages differ".into()
    });
}

fn stat_fields() -> Vec<String> {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest: Vec<String> = s[s.rfind(')').map(|i| i + 2).unwrap_or(0)..]
        .split_whitespace()
        .map(String::from)
        .collect();
    // Fields 26-28 (start_code, end_code, start_stack) and 45-51 (data, brk,
    // arg, env ranges); rest[0] is field 3.
    [25, 26, 27, 44, 45, 46, 47, 48, 49, 50]
        .iter()
        .map(|&f| rest.get(f - 3).cloned().unwrap_or_default())
        .collect()
}

fn brk(ctl: &Ctl, c: &mut Checks) {
    // SAFETY: sbrk grows the heap; nothing else in this process uses brk
    // concurrently (single-threaded, and glibc's malloc tolerates a moved break).
    let (start, grown) = unsafe {
        let start = libc::sbrk(0) as usize;
        if libc::sbrk(1 << 20) as isize == -1 {
            setup_failed("sbrk");
        }
        (start, libc::sbrk(0) as usize)
    };
    // SAFETY: [start, grown) is the heap we just grew.
    fill_pattern(unsafe { slice(start as *mut u8, grown - start) }, SEED);
    let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let environ = std::fs::read("/proc/self/environ").unwrap_or_default();
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let fields = stat_fields();
    ctl.ready();
    ctl.wait_for_go();
    // SAFETY: sbrk(0) only reads the break.
    c.eq("program break", unsafe { libc::sbrk(0) } as usize, grown);
    // SAFETY: as above.
    c.eq(
        "brk heap mismatch at",
        first_pattern_mismatch(unsafe { slice(start as *mut u8, grown - start) }, SEED),
        None,
    );
    c.check(
        std::fs::read("/proc/self/auxv").unwrap_or_default() == auxv,
        || "auxv differs".into(),
    );
    c.check(
        std::fs::read("/proc/self/cmdline").unwrap_or_default() == cmdline,
        || "cmdline (arg range) differs".into(),
    );
    c.check(
        std::fs::read("/proc/self/environ").unwrap_or_default() == environ,
        || "environ (env range) differs".into(),
    );
    c.eq("exe link", std::fs::read_link("/proc/self/exe").ok(), exe);
    c.eq(
        "mm fields of /proc/self/stat (code, stack, data, brk, arg, env)",
        stat_fields(),
        fields,
    );
}

fn memfd(ctl: &Ctl, c: &mut Checks) {
    let len = 100 * 1024;
    let name = CString::new("crest-wl").unwrap_or_default();
    // SAFETY: name is NUL-terminated.
    let fd = sys(
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) },
        "memfd_create",
    );
    write_all(fd, &pattern(len, SEED));
    let m = mmap(len, RW, libc::MAP_SHARED, fd);
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain values.
    sys(
        unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) },
        "F_ADD_SEALS",
    );
    // A second memfd, only mapped (its fd closed), sealed against future
    // writes: the mapping made before the seal stays writable.
    let name2 = CString::new("crest-wl-mapped").unwrap_or_default();
    // SAFETY: name2 is NUL-terminated.
    let fd2 = sys(
        unsafe { libc::memfd_create(name2.as_ptr(), libc::MFD_ALLOW_SEALING) },
        "memfd_create",
    );
    let len2 = 3 * PAGE;
    // SAFETY: plain values.
    sys(unsafe { libc::ftruncate(fd2, len2 as i64) }, "ftruncate");
    let m2 = mmap(len2, RW, libc::MAP_SHARED, fd2);
    // SAFETY: m2 is a RW mapping of len2 bytes.
    fill_pattern(unsafe { slice(m2, len2) }, SEED + 1);
    // SAFETY: plain values; then the fd goes, the mapping stays.
    unsafe {
        sys(
            libc::fcntl(fd2, libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE),
            "F_ADD_SEALS",
        );
        libc::close(fd2);
    }
    ctl.ready();
    ctl.wait_for_go();
    // SAFETY: m2 is a RW shared mapping of len2 bytes.
    let s2 = unsafe { slice(m2, len2) };
    c.eq(
        "mapped-only memfd mismatch at",
        first_pattern_mismatch(s2, SEED + 1),
        None,
    );
    s2[5] = !s2[5];
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    c.check(
        maps.lines().any(|l| {
            l.starts_with(&format!("{:x}-", m2 as usize))
                && l.ends_with("/memfd:crest-wl-mapped (deleted)")
        }),
        || "the mapped-only memfd is not \"/memfd:crest-wl-mapped (deleted)\" in maps".into(),
    );
    // SAFETY: plain values.
    c.eq(
        "seals",
        unsafe { libc::fcntl(fd, libc::F_GET_SEALS) },
        seals,
    );
    // SAFETY: m is a RW mapping of len bytes.
    let s = unsafe { slice(m, len) };
    c.eq("mapping mismatch at", first_pattern_mismatch(s, SEED), None);
    s[10] = !s[10];
    let mut b = [0u8; 1];
    // SAFETY: b is valid for 1 byte.
    unsafe { libc::pread(fd, b.as_mut_ptr().cast(), 1, 10) };
    c.eq(
        "a write through the mapping, read through the fd",
        b[0],
        s[10],
    );
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|l| l.to_string_lossy().to_string());
    c.eq(
        "memfd name",
        link.as_deref(),
        Some("/memfd:crest-wl (deleted)"),
    );
    // SAFETY: plain values; a sealed memfd must refuse to grow.
    let grew = unsafe { libc::ftruncate(fd, (2 * len) as i64) } == 0;
    c.check(!grew, || "the memfd grew despite F_SEAL_GROW".into());
}
