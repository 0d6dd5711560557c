//! Giving back the stack pages a thread touched once, in deep set-up code
//! (building and booting a VM, installing a seccomp filter), that its steady
//! state never reaches again. Each touched page is private memory of the
//! VMM process until the thread ends: a fleet pays for it once per VM.

use std::cell::Cell;

thread_local! {
    /// The lowest address of this thread's stack (above its guard page);
    /// 0 until `note_stack_bounds` has run on this thread.
    static STACK_LOW: Cell<usize> = const { Cell::new(0) };
}

/// Kept below the caller's frame: the frames of the release itself.
const MARGIN: usize = 16 * 1024;

/// Records where this thread's stack ends, for `release_unused_stack`.
///
/// Call it at the start of a thread that vmkit spawned (not on a process's
/// main thread, whose bounds glibc reads from /proc), before the thread's
/// seccomp filter: glibc's `pthread_getattr_np` reads the thread's CPU
/// affinity, as Rust's own thread start-up does.
pub fn note_stack_bounds() {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: fills `attr` for the calling thread; destroyed below.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) } != 0 {
        return;
    }
    let mut address: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: `attr` was initialised by pthread_getattr_np above.
    let found = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut address, &mut size) };
    // SAFETY: as above; not used after this.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    if found == 0 && size > 0 {
        STACK_LOW.with(|low| low.set(address as usize));
    }
}

/// Returns to the kernel the pages of this thread's stack below the
/// caller's frame (less a margin for this call's own frames): they read as
/// zeros if a deeper call touches them again. Does nothing on a thread that
/// has not called `note_stack_bounds`.
#[inline(never)]
pub fn release_unused_stack() {
    let low = STACK_LOW.with(Cell::get);
    if low == 0 {
        return;
    }
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let page = page_size();
    let start = low.next_multiple_of(page);
    let end = here.saturating_sub(MARGIN) & !(page - 1);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) lies in this thread's stack, below every live
    // frame of this thread (the stack grows down and `end` is a margin
    // below this function's own frame); nothing refers to memory there.
    // MADV_DONTNEED on private anonymous memory only drops its pages.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages of the range [start, end) (mincore).
    fn resident_pages(start: usize, end: usize) -> usize {
        let page = page_size();
        let pages = (end - start) / page;
        let mut vector = vec![0u8; pages];
        // SAFETY: a page-aligned range of this thread's stack mapping and a
        // vector of one byte per page.
        let r =
            unsafe { libc::mincore(start as *mut libc::c_void, end - start, vector.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vector.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[inline(never)]
    fn deep(depth: usize) -> u8 {
        let buffer = std::hint::black_box([depth as u8; 4096]);
        if depth == 0 {
            buffer[7]
        } else {
            deep(depth - 1).wrapping_add(buffer[11])
        }
    }

    fn expected(depth: usize) -> u8 {
        (0..=depth).fold(0u8, |sum, d| sum.wrapping_add(d as u8))
    }

    #[test]
    fn pages_touched_below_the_caller_go_back_and_the_thread_goes_on() {
        std::thread::spawn(|| {
            note_stack_bounds();
            let low = STACK_LOW.with(Cell::get);
            assert_ne!(low, 0, "no stack bounds");
            let page = page_size();
            let marker = 0u8;
            let here = std::hint::black_box(&marker) as *const u8 as usize & !(page - 1);
            let low = low.next_multiple_of(page);
            // 64 frames of 4 KiB: 256 KiB of stack touched below this frame.
            assert_eq!(deep(64), expected(64));
            let before = resident_pages(low, here);
            assert!(before >= 64, "only {before} pages touched");
            release_unused_stack();
            let after = resident_pages(low, here);
            assert!(
                after <= MARGIN / page + 2,
                "{after} of {before} pages still resident"
            );
            // The stack works as before, and the pages read as written anew.
            assert_eq!(deep(64), expected(64));
        })
        .join()
        .expect("the thread ran");
    }

    #[test]
    fn a_thread_without_bounds_keeps_its_stack() {
        std::thread::spawn(|| {
            release_unused_stack();
            assert_eq!(deep(8), expected(8));
        })
        .join()
        .expect("the thread ran");
    }
}
