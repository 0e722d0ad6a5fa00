//! What the harness reads from /proc and the kernel about processes and the machine.
//! Parsers are pure functions of the text, unit-tested below.
use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

/// Clock ticks per second for /proc/<pid>/stat times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (utime, stime) in clock ticks from the text of /proc/<pid>/stat.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    // The command name (field 2) may contain spaces and parentheses: fields are counted from
    // the last ')'. After it come field 3 (state) onwards; utime is field 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// CPU seconds (user, system) a live process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (u, st) = parse_stat_times(&s)?;
    let hz = clock_ticks();
    Some((u as f64 / hz, st as f64 / hz))
}

/// A `Key:   value kB` field of /proc/<pid>/status, in KiB.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    /// Resident set now (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set so far (VmHWM).
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Option<Memory> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Memory {
        rss_kib: parse_status_kib(&s, "VmRSS")?,
        hwm_kib: parse_status_kib(&s, "VmHWM")?,
    })
}

/// One BPF map a process holds open, from /proc/<pid>/fdinfo/<fd>.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapInfo {
    pub map_id: u64,
    pub map_type: u32,
    pub max_entries: u64,
    pub memlock: u64,
}

pub fn parse_map_fdinfo(text: &str) -> Option<MapInfo> {
    let field = |k: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let v = l.strip_prefix(k)?.strip_prefix(':')?;
            v.trim().parse().ok()
        })
    };
    Some(MapInfo {
        map_id: field("map_id")?,
        map_type: field("map_type")? as u32,
        max_entries: field("max_entries").unwrap_or(0),
        memlock: field("memlock")?,
    })
}

/// BPF objects a process holds: its maps (deduplicated by id) and how many programs and links.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BpfObjects {
    pub maps: Vec<MapInfo>,
    pub programs: u32,
    pub links: u32,
}

impl BpfObjects {
    pub fn memlock_kib(&self) -> f64 {
        self.maps.iter().map(|m| m.memlock).sum::<u64>() as f64 / 1024.0
    }
}

pub fn bpf_objects(pid: u32) -> BpfObjects {
    let mut out = BpfObjects::default();
    let mut maps: BTreeMap<u64, MapInfo> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        match target.to_string_lossy().as_ref() {
            "anon_inode:bpf-map" => {
                let fdinfo = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy());
                if let Some(m) = std::fs::read_to_string(fdinfo)
                    .ok()
                    .and_then(|t| parse_map_fdinfo(&t))
                {
                    maps.insert(m.map_id, m);
                }
            }
            "anon_inode:bpf-prog" => out.programs += 1,
            "anon_inode:bpf_link" | "anon_inode:bpf-link" => out.links += 1,
            _ => {}
        }
    }
    out.maps = maps.into_values().collect();
    out
}

/// Run-time statistics of one BPF program, from /proc/<pid>/fdinfo/<fd> (5.1+; the kernel
/// only counts while statistics are enabled, see [`enable_bpf_stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ProgStat {
    pub prog_id: u64,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

pub fn parse_prog_fdinfo(text: &str) -> Option<ProgStat> {
    let field = |k: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let v = l.strip_prefix(k)?.strip_prefix(':')?;
            v.trim().parse().ok()
        })
    };
    Some(ProgStat {
        prog_id: field("prog_id")?,
        run_cnt: field("run_cnt")?,
        run_time_ns: field("run_time_ns")?,
    })
}

/// Statistics of every BPF program a process holds, by program id.
pub fn prog_stats(pid: u32) -> BTreeMap<u64, ProgStat> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog") {
            let fdinfo = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy());
            if let Some(p) = std::fs::read_to_string(fdinfo)
                .ok()
                .and_then(|t| parse_prog_fdinfo(&t))
            {
                out.insert(p.prog_id, p);
            }
        }
    }
    out
}

/// BPF run-time statistics are on for as long as this lives (BPF_ENABLE_STATS: scoped to the
/// fd, so no sysctl is changed and nothing stays on if the harness dies). While on, every BPF
/// program on the machine pays two clock reads per run: only diagnostic runs use it.
pub struct BpfStats {
    _fd: std::os::fd::OwnedFd,
}

pub fn enable_bpf_stats() -> std::io::Result<BpfStats> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    const BPF_STATS_RUN_TIME: u32 = 0;
    // union bpf_attr { struct { __u32 type; } enable_stats; ... }
    let mut attr = [0u32; 32];
    attr[0] = BPF_STATS_RUN_TIME;
    // SAFETY: the attr buffer outlives the call and is as large as the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(BpfStats {
        _fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) },
    })
}

/// Program names by id, from `bpftool prog show` when bpftool is installed.
pub fn prog_names() -> BTreeMap<u64, String> {
    let Ok(out) = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
    else {
        return BTreeMap::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect()
}

/// What wait4() tells about a child that ended.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub user_s: f64,
    pub sys_s: f64,
    /// Peak resident set over the whole life (ru_maxrss, KiB).
    pub maxrss_kib: u64,
}

/// Reap `pid` with wait4, polling until `timeout`; None if it is still running.
pub fn wait4_timeout(pid: u32, timeout: Duration) -> Option<Exit> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: wait4 writes the status and rusage it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid as i32 {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            return Some(Exit {
                code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
                signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
                user_s: secs(ru.ru_utime),
                sys_s: secs(ru.ru_stime),
                maxrss_kib: ru.ru_maxrss.max(0) as u64,
            });
        }
        if r < 0 || std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is still a child of ours that has not been reaped (running or a zombie), so
/// that a signal to it cannot reach some other process that reused the number.
pub fn is_our_child(pid: u32) -> bool {
    // SAFETY: waitid with WNOWAIT only looks; it writes the siginfo it is given.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    r == 0
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling a child of ours by pid.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The three load averages of /proc/loadavg.
pub fn loadavg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub nproc: usize,
    pub mem_total_kib: u64,
    pub kernel: String,
}

pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        cpu_model: parse_cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        mem_total_kib: parse_status_kib(&meminfo, "MemTotal").unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_survive_odd_command_names() {
        let s = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 12 0 0 20 0 1 0 5 1000 10";
        assert_eq!(parse_stat_times(s), Some((37, 12)));
        assert_eq!(parse_stat_times("garbage"), None);
    }

    #[test]
    fn status_fields_in_kib() {
        let s = "Name:\tportexhaust\nVmHWM:\t   12345 kB\nVmRSS:\t    9876 kB\n";
        assert_eq!(parse_status_kib(s, "VmRSS"), Some(9876));
        assert_eq!(parse_status_kib(s, "VmHWM"), Some(12345));
        assert_eq!(parse_status_kib(s, "VmSwap"), None);
    }

    #[test]
    fn map_fdinfo_is_parsed() {
        let t = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t27\n\
                 key_size:\t0\nvalue_size:\t0\nmax_entries:\t4194304\nmap_flags:\t0x0\n\
                 map_extra:\t0x0\nmemlock:\t4206592\nmap_id:\t131\nfrozen:\t0\n";
        assert_eq!(
            parse_map_fdinfo(t),
            Some(MapInfo {
                map_id: 131,
                map_type: 27,
                max_entries: 4194304,
                memlock: 4206592
            })
        );
        assert_eq!(parse_map_fdinfo("pos:\t0\n"), None);
    }

    #[test]
    fn prog_fdinfo_is_parsed() {
        let t = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nprog_jited:\t1\n\
                 prog_tag:\td034ee764907d420\nmemlock:\t4096\nprog_id:\t3689\n\
                 run_time_ns:\t52600\nrun_cnt:\t600\nrecursion_misses:\t0\n";
        assert_eq!(
            parse_prog_fdinfo(t),
            Some(ProgStat {
                prog_id: 3689,
                run_cnt: 600,
                run_time_ns: 52600
            })
        );
        // Kernels before 5.1 have no run-time fields.
        assert_eq!(parse_prog_fdinfo("prog_id:\t3\n"), None);
    }

    #[test]
    fn cpu_model_is_found() {
        let c = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) X\n";
        assert_eq!(parse_cpu_model(c).as_deref(), Some("Intel(R) Xeon(R) X"));
    }
}
