//! The few system calls the generator and sink need beyond `std`: the monotonic clock as plain
//! nanoseconds, absolute sleeps, CPU pinning and socket buffer sizes.

use std::io;
use std::os::fd::AsRawFd;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SysError {
    #[error("cannot pin this thread to CPU {cpu} (sched_setaffinity): {source}; check `nproc` and any cpuset this runs in")]
    Pin { cpu: usize, source: io::Error },
    #[error("CPU {cpu} is out of range for a cpu_set_t (max {max})")]
    CpuRange { cpu: usize, max: usize },
}

/// `CLOCK_MONOTONIC` in nanoseconds. All network namespaces of a machine share this clock, so a
/// timestamp taken in one pod can be subtracted from one taken in another.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux, so the
    // call cannot fail and leaves `ts` initialised.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Sleeps until `CLOCK_MONOTONIC` reaches `deadline_ns` (absolute: no drift from wake-up lag).
pub fn sleep_until_ns(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: `ts` is a valid timespec; the remaining-time pointer may be null with
        // TIMER_ABSTIME.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        if rc != libc::EINTR {
            return;
        }
    }
}

/// Asks the kernel for 1 µs timer slack (default 50 µs) so paced sleeps wake close to on time.
/// Best effort: pacing still works, less evenly, if this fails.
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong, 0, 0, 0) };
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<(), SysError> {
    let max = libc::CPU_SETSIZE as usize;
    if cpu >= max {
        return Err(SysError::CpuRange { cpu, max });
    }
    // SAFETY: cpu_set_t is plain bits; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE was checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(SysError::Pin {
            cpu,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn set_int_opt(fd: &impl AsRawFd, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a valid c_int of the size passed; the fd is open for as long
    // as `fd` is borrowed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the socket receive buffer, past `rmem_max` when we are root (`SO_RCVBUFFORCE`).
/// Best effort: a smaller buffer shows up as loss at the sink, which is reported.
pub fn grow_recv_buffer(fd: &impl AsRawFd, bytes: usize) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    if set_int_opt(fd, libc::SO_RCVBUFFORCE, v).is_err() {
        let _ = set_int_opt(fd, libc::SO_RCVBUF, v);
    }
}

/// Sets the socket send buffer, past `wmem_max` when we are root (`SO_SNDBUFFORCE`).
pub fn grow_send_buffer(fd: &impl AsRawFd, bytes: usize) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    if set_int_opt(fd, libc::SO_SNDBUFFORCE, v).is_err() {
        let _ = set_int_opt(fd, libc::SO_SNDBUF, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_moves_forward_and_sleep_reaches_deadline() {
        let a = monotonic_ns();
        sleep_until_ns(a + 2_000_000);
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "woke at +{} ns", b - a);
    }

    #[test]
    fn pin_rejects_absurd_cpu() {
        assert!(matches!(
            pin_to_cpu(1 << 20),
            Err(SysError::CpuRange { .. })
        ));
    }
}
