//! Sockets by state, counted in the /proc/net/tcp listings.

/// TIME_WAIT sockets (state 06) in this thread's network namespace, IPv4 and IPv6.
pub(crate) fn count_time_wait() -> u64 {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| count_state(&s, "06"))
        .sum()
}

/// Rows of a /proc/net/tcp listing in one state (hex code, 4th column).
pub fn count_state(listing: &str, state: &str) -> u64 {
    listing
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some(state))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sockets_by_state() {
        let listing = "  sl  local_address rem_address   st tx_queue rx_queue\n\
   0: 0100007F:1388 00000000:0000 0A 00000000:00000000\n\
   1: 0100007F:9C40 0100007F:1388 06 00000000:00000000\n\
   2: 0100007F:9C41 0100007F:1388 06 00000000:00000000\n";
        assert_eq!(count_state(listing, "06"), 2);
        assert_eq!(count_state(listing, "0A"), 1);
        assert_eq!(count_state(listing, "01"), 0);
    }
}
