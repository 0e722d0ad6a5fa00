//! Failing connects submitted through io_uring (IORING_OP_CONNECT; no connect() syscall).
use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{WorkloadError, io_err, sockets::Tally};

/// An io_uring completion's result as an outcome: 0 (or more) for success, -errno for failure.
fn cqe_result(res: i32) -> io::Result<()> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(())
    }
}

/// Tally the completions of one batch: submissions `first..first + n` (their user_data) must
/// each complete exactly once. A missing, repeated or foreign completion is an unexpected
/// outcome, never silently a failure or a success.
fn tally_completions(t: &mut Tally, first: u64, n: u64, cqes: &[(u64, i32)]) {
    let mut seen = vec![false; n as usize];
    for &(user_data, res) in cqes {
        let slot = usize::try_from(user_data.wrapping_sub(first)).ok();
        match slot.and_then(|i| seen.get_mut(i)) {
            Some(done) if !*done => {
                *done = true;
                t.record(cqe_result(res));
            }
            Some(_) => t.note("io_uring: repeated completion"),
            None => t.note("io_uring: completion of no submission of this batch"),
        }
    }
    for _ in seen.iter().filter(|done| !**done) {
        t.note("io_uring: no completion");
    }
}

/// Submissions in flight at once, and the ring's size.
const URING_BATCH: u32 = 64;

/// `k` TCP connects to `dst` through io_uring: each on a fresh socket, one IORING_OP_CONNECT
/// submission per socket, in batches of at most `URING_BATCH` per io_uring_enter().
pub(crate) fn uring_fail_connects(
    dst: SocketAddr,
    k: u64,
    want: u32,
) -> Result<Tally, WorkloadError> {
    use std::os::fd::AsRawFd;

    use io_uring::{IoUring, opcode, types};

    let mut ring = IoUring::new(URING_BATCH).map_err(|source| WorkloadError::UringRefused {
        source,
        disabled: std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unreadable".into()),
    })?;
    let addr = socket2::SockAddr::from(dst);
    let mut t = Tally::new(want);
    let mut first = 0u64;
    while first < k {
        let n = (k - first).min(u64::from(URING_BATCH));
        let socks = (0..n)
            .map(|_| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))
            .collect::<io::Result<Vec<Socket>>>()
            .map_err(io_err("socket for an io_uring connect"))?;
        {
            let mut sq = ring.submission();
            for (i, s) in (first..).zip(&socks) {
                let sqe = opcode::Connect::new(
                    types::Fd(s.as_raw_fd()),
                    addr.as_ptr().cast(),
                    addr.len(),
                )
                .build()
                .user_data(i);
                // SAFETY: the socket and the address stay alive until every completion of this
                // batch has been reaped below; the ring has room for a whole batch.
                unsafe { sq.push(&sqe) }.map_err(|_| {
                    WorkloadError::Setup("io_uring submission queue unexpectedly full".into())
                })?;
            }
        }
        let mut cqes = Vec::with_capacity(n as usize);
        while (cqes.len() as u64) < n {
            match ring.submit_and_wait(n as usize - cqes.len()) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("io_uring_enter")(e)),
            }
            cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        }
        tally_completions(&mut t, first, n, &cqes);
        drop(socks);
        first += n;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::errno_of;

    #[test]
    fn completion_results_are_zero_or_minus_errno() {
        assert!(cqe_result(0).is_ok());
        assert_eq!(cqe_result(-99).map_err(|e| errno_of(&e)), Err(99));
        assert_eq!(cqe_result(-111).map_err(|e| errno_of(&e)), Err(111));
    }

    #[test]
    fn each_submission_of_a_batch_completes_once() {
        // Batch 64..68: four EADDRNOTAVAIL in any order, one success.
        let mut t = Tally::new(99);
        tally_completions(
            &mut t,
            64,
            5,
            &[(66, -99), (64, -99), (68, 0), (65, -99), (67, -99)],
        );
        assert_eq!(t.seen, 4);
        assert_eq!(t.other.len(), 1);
        assert_eq!(t.other.get("succeeded"), Some(&1));
    }

    #[test]
    fn missing_repeated_and_foreign_completions_are_unexpected() {
        let mut t = Tally::new(99);
        // 10 twice, 11 never, 12 with another errno, 3 and 13 outside the batch 10..13.
        tally_completions(
            &mut t,
            10,
            3,
            &[(10, -99), (10, -99), (12, -111), (3, -99), (13, -99)],
        );
        assert_eq!(t.seen, 1, "only the first completion of 10 counts");
        assert_eq!(t.other.get("io_uring: repeated completion"), Some(&1));
        assert_eq!(t.other.get("io_uring: no completion"), Some(&1));
        assert_eq!(
            t.other
                .get("io_uring: completion of no submission of this batch"),
            Some(&2)
        );
        assert_eq!(t.other.get("errno 111"), Some(&1));
    }
}
