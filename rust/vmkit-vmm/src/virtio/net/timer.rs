//! The timer that wakes a throttled or yielding queue.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The longest wait a timer is armed for: a rate limiter's wait can be
/// longer than `time_t` holds, and a queue woken early just waits again.
const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// A non-blocking CLOCK_MONOTONIC timerfd: wakes a throttled queue.
pub struct Timer(OwnedFd);

impl Timer {
    pub fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create(2); the result is checked and owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Timer(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once, `after` from now (at least 1 µs, at most a day).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.clamp(Duration::from_micros(1), MAX_WAIT);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                // At most MAX_WAIT: fits.
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: timerfd_settime(2) with a valid itimerspec on our timerfd.
        let ret =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Consumes an expiry. Non-blocking: with none pending the read fails
    /// with EAGAIN, which is what "nothing to clear" looks like.
    pub fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: read(2) of 8 bytes into a local buffer of 8 bytes.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remaining(timer: &Timer) -> Duration {
        // SAFETY: itimerspec is plain data.
        let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: timerfd_gettime(2) into a live itimerspec.
        let ret = unsafe { libc::timerfd_gettime(timer.as_raw_fd(), &mut spec) };
        assert_eq!(ret, 0);
        Duration::new(spec.it_value.tv_sec as u64, spec.it_value.tv_nsec as u32)
    }

    #[test]
    fn waits_longer_than_a_timespec_holds_are_capped_not_lost() {
        let timer = Timer::new().unwrap();
        // as_secs() of Duration::MAX is negative as a time_t: EINVAL before.
        timer.arm(Duration::MAX).unwrap();
        let left = remaining(&timer);
        assert!(
            left > MAX_WAIT - Duration::from_secs(60) && left <= MAX_WAIT,
            "{left:?}"
        );
        timer.arm(Duration::ZERO).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let mut expirations = [0u8; 8];
        // SAFETY: read(2) of 8 bytes into a local buffer.
        let n = unsafe { libc::read(timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8, "a zero wait still fires");
    }

    #[test]
    fn a_timer_that_cannot_be_armed_says_so() {
        // An eventfd in a Timer: timerfd_settime refuses it (EINVAL).
        // SAFETY: eventfd(2); checked, then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let not_a_timer = Timer(unsafe { OwnedFd::from_raw_fd(fd) });
        assert!(not_a_timer.arm(Duration::from_millis(1)).is_err());
    }
}
