//! `portexhaust doctor --explain TOPIC`: what a setting does for port exhaustion, with the
//! kernel facts behind it. Static text; the audit itself lives in `rules`.

/// Topics `--explain` accepts. Names are the sysctl names (also accepted with their
/// `net.ipv4.` prefix and with dashes), so people can paste what a blog post told them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Topic {
    #[value(
        name = "tcp_tw_recycle",
        alias = "net.ipv4.tcp_tw_recycle",
        alias = "tcp-tw-recycle"
    )]
    TcpTwRecycle,
    #[value(
        name = "tcp_tw_reuse",
        alias = "net.ipv4.tcp_tw_reuse",
        alias = "tcp-tw-reuse"
    )]
    TcpTwReuse,
    #[value(
        name = "tcp_fin_timeout",
        alias = "net.ipv4.tcp_fin_timeout",
        alias = "tcp-fin-timeout"
    )]
    TcpFinTimeout,
    #[value(
        name = "tcp_max_tw_buckets",
        alias = "net.ipv4.tcp_max_tw_buckets",
        alias = "tcp-max-tw-buckets"
    )]
    TcpMaxTwBuckets,
    #[value(
        name = "ip_local_port_range",
        alias = "net.ipv4.ip_local_port_range",
        alias = "ip-local-port-range"
    )]
    IpLocalPortRange,
    #[value(
        name = "ip_local_reserved_ports",
        alias = "net.ipv4.ip_local_reserved_ports",
        alias = "ip-local-reserved-ports"
    )]
    IpLocalReservedPorts,
    #[value(
        name = "tcp_timestamps",
        alias = "net.ipv4.tcp_timestamps",
        alias = "tcp-timestamps"
    )]
    TcpTimestamps,
    #[value(
        name = "IP_BIND_ADDRESS_NO_PORT",
        alias = "ip_bind_address_no_port",
        alias = "bind-before-connect"
    )]
    IpBindAddressNoPort,
    #[value(name = "time_wait", alias = "TIME_WAIT", alias = "time-wait")]
    TimeWait,
}

pub fn text(t: Topic) -> &'static str {
    match t {
        Topic::TcpTwRecycle => {
            "net.ipv4.tcp_tw_recycle: REMOVED in Linux 4.12. Never set it; portexhaust never recommends it.

What it did: it let the kernel drop TIME_WAIT early and reject any SYN whose TCP timestamp was
lower than the last one seen from the same IP address ('per-host PAWS').
Why that broke things: many clients share one address behind NAT, carrier-grade NAT or a load
balancer, and their timestamp clocks are unrelated. With recycle on, connections from all but
one of them were silently dropped. Linux 4.10 made it worse by randomising timestamp offsets per
connection (so even single hosts looked like they went back in time), and 4.12 removed the
setting altogether ('tcp: remove tcp_tw_recycle').
If a guide tells you to set it: on a kernel older than 4.12 set it to 0; on 4.12 and later the
file does not exist. For outgoing connections that run out of ports use net.ipv4.tcp_tw_reuse=1
(see `portexhaust doctor --explain tcp_tw_reuse`), and first fix the application: pooling,
keep-alive, and letting the server close first."
        }
        Topic::TcpTwReuse => {
            "net.ipv4.tcp_tw_reuse: may connect() take a port whose old connection to the same destination
is still in TIME_WAIT?
  0  never
  1  yes, for outgoing connections, once the TIME_WAIT socket is older than 1 s
     (tcp_tw_reuse_delay, tunable since 6.13) and both sides used TCP timestamps
  2  loopback only (the default)
The check is tcp_twsk_unique(), called from __inet_hash_connect() while it looks for a port;
every reuse increments TcpExt.TWRecycled in /proc/net/netstat. Reuse is safe for outgoing
connections because timestamps (PAWS) reject old duplicate segments; it does nothing for
servers (their ports are fixed). It is per network namespace."
        }
        Topic::TcpFinTimeout => {
            "net.ipv4.tcp_fin_timeout: how long an orphaned socket (already close()d by the application)
waits in FIN_WAIT2 for the peer's FIN. It does NOT change TIME_WAIT, which lasts 60 s
(TCP_TIMEWAIT_LEN, a compile-time constant). Lowering it only helps when ports pile up in
FIN_WAIT2, i.e. the peer never closes its side."
        }
        Topic::TcpMaxTwBuckets => {
            "net.ipv4.tcp_max_tw_buckets: the most TIME_WAIT sockets a namespace keeps. Past it the kernel
closes connections without TIME_WAIT (TcpExt.TCPTimeWaitOverflow, 'time wait bucket table
overflow'): ports come back at once, but delayed segments of an old connection may then be taken
for a new one. A low value is a blunt TIME_WAIT cap; tcp_tw_reuse=1 is the safer lever, and
fewer short-lived connections the real fix."
        }
        Topic::IpLocalPortRange => {
            "net.ipv4.ip_local_port_range: the ports connect() and bind(port 0) choose from (default
32768 60999 = 28,232 ports). Exhaustion is per (source IP, destination IP, destination port):
the same local port can serve many destinations, so one destination gets the whole range, and
one source IP can open about 28,232 / 60 s = 470 new connections per second to it before
TIME_WAIT fills the range (without reuse). connect() searches one parity first and slows down
sharply long before it fails. Widen it (e.g. 10240 65535) only after the application fixes, and
keep listening ports out of it with ip_local_reserved_ports. Per socket, IP_LOCAL_PORT_RANGE
(Linux 6.3+) narrows it further."
        }
        Topic::IpLocalReservedPorts => {
            "net.ipv4.ip_local_reserved_ports: ports the automatic choice skips (listening services inside
the range). Every reserved port inside ip_local_port_range is one less for each destination."
        }
        Topic::TcpTimestamps => {
            "net.ipv4.tcp_timestamps: TCP timestamps (RFC 7323). TIME_WAIT reuse (tcp_tw_reuse) needs
them on the old connection: with 0, tcp_tw_reuse has no effect."
        }
        Topic::IpBindAddressNoPort => {
            "IP_BIND_ADDRESS_NO_PORT (socket option, Linux 4.2+): a program that must choose its source
address calls bind(ip, 0) before connect(). Without this option the kernel picks the port at
bind() time, exclusively, for every destination: such programs run out after 28k sockets in
total (bind fails with EADDRINUSE). With it set before bind(), the port is chosen at connect()
per 4-tuple, like an unbound socket."
        }
        Topic::TimeWait => {
            "TIME_WAIT: the side that closes a TCP connection first keeps its 4-tuple for 60 s
(TCP_TIMEWAIT_LEN) so that late segments cannot reach a new connection. For a client that
closes first, that is its local port for that destination. TIME_WAIT sockets have no owner
process (ss -p shows none), so `portexhaust trace` records who created them. To need fewer:
reuse connections (pooling, keep-alive), let the server close first, then tcp_tw_reuse=1."
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn recycle_explains_its_removal_and_is_not_recommended() {
        let t = text(Topic::TcpTwRecycle);
        assert!(t.contains("4.12") && t.contains("NAT") && t.contains("REMOVED"));
        assert!(!t.contains("tcp_tw_recycle=1"));
    }

    #[test]
    fn every_topic_has_text_and_accepts_the_sysctl_spelling() {
        for t in Topic::value_variants() {
            assert!(text(*t).len() > 100);
        }
        assert_eq!(
            Topic::from_str("net.ipv4.tcp_tw_recycle", false),
            Ok(Topic::TcpTwRecycle)
        );
        assert_eq!(
            Topic::from_str("tcp-tw-reuse", false),
            Ok(Topic::TcpTwReuse)
        );
        assert!(Topic::from_str("tcp_tw_whatever", false).is_err());
    }
}
