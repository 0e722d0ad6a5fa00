//! What every text renderer shares: aligned tables, word wrapping, plurals, and the offenders
//! and destinations tables (one of each, whichever command prints them).
use comfy_table::{Cell, CellAlignment, Table, presets::NOTHING};
use portexhaust_common::Cause;

use crate::schema::{CallSite, DestRow, Holder, Offender};

/// An aligned table without borders, each line with its trailing spaces cut and `indent` in
/// front.
pub fn table(header: &[&str], rows: Vec<Vec<Cell>>, indent: &str) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
        .lines()
        .map(|l| format!("{indent}{}", l.trim_end()))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn right(x: impl std::fmt::Display) -> Cell {
    Cell::new(x.to_string()).set_alignment(CellAlignment::Right)
}

pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `42%`, or `?` when unknown.
pub fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "?".to_string(), |x| format!("{:.0}%", x * 100.0))
}

/// A number, or `?` when unknown.
pub fn or_unknown<T: std::fmt::Display>(x: Option<T>) -> String {
    x.map_or_else(|| "?".to_string(), |x| x.to_string())
}

/// Word-wrap `text` to `width` columns, every line after the first indented by `indent`.
pub fn wrap(text: &str, width: usize, indent: usize) -> String {
    wrap_at(text, width, indent, indent)
}

/// Word-wrap `text` whose first line starts at column `first_col`; later lines are indented
/// by `indent`.
pub fn wrap_at(text: &str, width: usize, first_col: usize, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::new();
    let mut col = first_col;
    for (i, word) in text.split_whitespace().enumerate() {
        let w = word.chars().count();
        if i > 0 && col + 1 + w > width {
            out.push('\n');
            out.push_str(&pad);
            col = indent;
        } else if i > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += w;
    }
    out
}

/// `127.0.0.1:27017 EADDRNOTAVAIL x30, ... (+2 more)`: the first `n` destinations.
pub fn top_destinations(o: &Offender, n: usize) -> String {
    let mut parts: Vec<String> = o
        .destinations
        .iter()
        .take(n)
        .map(|d| match d.cause {
            // The usual cause, and the one old records cannot tell, go without saying.
            Cause::Exhausted | Cause::Unknown => {
                format!("{} {} x{}", d.dst, d.errno.name(), d.failures)
            }
            c => format!(
                "{} {} ({}) x{}",
                d.dst,
                d.errno.name(),
                c.name(),
                d.failures
            ),
        })
        .collect();
    if o.destinations.len() > n {
        parts.push(format!("(+{} more)", o.destinations.len() - n));
    }
    parts.join(", ")
}

/// The offenders table of the trace summary and of `report`: `label` names each offender's
/// process (its pid, or host/pid across hosts).
pub fn offenders<'a>(
    rows: impl IntoIterator<Item = (String, &'a Offender)>,
    indent: &str,
) -> String {
    let hms = |t: Option<crate::schema::Ts>| t.map(|t| t.hms()).unwrap_or_default();
    let rows = rows
        .into_iter()
        .map(|(label, o)| {
            vec![
                right(label),
                Cell::new(&o.comm),
                right(o.failures),
                Cell::new(hms(o.first_ts)),
                Cell::new(hms(o.last_ts)),
                Cell::new(top_destinations(o, 3)),
            ]
        })
        .collect();
    table(
        &[
            "PID",
            "COMM",
            "FAILURES",
            "FIRST",
            "LAST",
            "TOP DESTINATIONS",
        ],
        rows,
        indent,
    )
}

/// The call-site table of the trace summary, `report` and `top`: the code behind the
/// connects (top frames past the C library), what it connected, what failed and what it holds.
/// `label` names each row's process (its pid, or host/pid across hosts). The first `n` rows.
pub fn call_sites<'a>(
    rows: impl IntoIterator<Item = (String, &'a CallSite)>,
    n: usize,
    indent: &str,
) -> String {
    let mut estimated = false;
    let rows: Vec<Vec<Cell>> = rows
        .into_iter()
        .take(n)
        .map(|(label, s)| {
            estimated |= s.holds_estimated;
            let holds = format!(
                "{}/{}{}",
                s.holds_established,
                s.holds_time_wait,
                if s.holds_estimated { "~" } else { "" }
            );
            let connects = if s.bound_connects > 0 {
                format!("{} ({} bound)", s.connects, s.bound_connects)
            } else {
                s.connects.to_string()
            };
            vec![
                right(label),
                Cell::new(&s.comm),
                Cell::new(s.dst.to_string()),
                Cell::new(s.label()),
                right(connects),
                right(s.failures),
                right(holds),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "PID",
            "COMM",
            "DESTINATION",
            "CALL SITE (TOP FRAMES)",
            "CONNECTS",
            "FAILURES",
            "HOLDS ESTAB/TW",
        ],
        rows,
        indent,
    );
    if estimated {
        out.push_str(&format!(
            "\n{indent}~: in part estimated (sockets whose connect's stack was not walked are shared \
             out by each site's unwalked connects)"
        ));
    }
    out
}

/// Holders as a table: `first` heads the label column, `before` names the state of sockets
/// opened before tracing (no pid known).
pub fn holders<'a>(
    holders: impl IntoIterator<Item = &'a Holder>,
    first: &str,
    before: &str,
    indent: &str,
) -> String {
    let rows = holders
        .into_iter()
        .map(|h| {
            vec![
                Cell::new(format!("{indent}{}", h.label())),
                right(h.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())),
                Cell::new(match (h.pid, h.alive) {
                    (None, _) => before,
                    (Some(_), true) => "alive",
                    (Some(_), false) => "exited",
                }),
                right(h.sockets),
                right(h.time_wait),
                right(pct(Some(h.share))),
            ]
        })
        .collect();
    table(
        &[
            &format!("{indent}{first}"),
            "PID",
            "STATE",
            "SOCKETS",
            "TIME_WAIT",
            "SHARE",
        ],
        rows,
        "",
    )
}

/// The what-if tables of the first `n` rows that have one: per destination, its measured load
/// and what each fix would buy.
pub fn what_if(rows: &[DestRow], n: usize, indent: &str) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.what_if.is_empty()).take(n) {
        let Some(l) = &r.load else { continue };
        out.push_str(&format!(
            "{indent}{} (netns {}): {:.1} new connections/s ({}), each held {:.1} s + {:.0} s after close\n",
            r.dst,
            or_unknown(r.netns),
            l.rate_per_s,
            if l.rate_from == "connects" {
                "measured"
            } else {
                "estimated from TIME_WAIT"
            },
            l.lifetime_s,
            l.tw_hold_s
        ));
        let rows = r
            .what_if
            .iter()
            .map(|w| {
                vec![
                    Cell::new(&w.kind),
                    Cell::new(&w.text),
                    right(format!("{:.0}", w.in_use)),
                    right(w.capacity),
                    right(format!("{:.0}", w.headroom)),
                    Cell::new(match w.full_in_s {
                        None => "never fills".to_string(),
                        Some(s) if s <= 0.0 => "full".to_string(),
                        Some(s) => format!("in {s:.0} s"),
                    }),
                ]
            })
            .collect();
        out.push_str(&table(
            &["KIND", "WHAT IF", "PORTS IN USE", "OF", "HEADROOM", "FULL"],
            rows,
            indent,
        ));
        out.push('\n');
    }
    out
}

/// Destination rows as a text table (`doctor`, `report`).
pub fn destinations(rows: &[DestRow], indent: &str) -> String {
    let rows = rows
        .iter()
        .map(|r| {
            vec![
                Cell::new(r.src.map_or_else(|| "-".to_string(), |s| s.to_string())),
                Cell::new(r.dst.to_string()),
                right(r.in_use),
                right(or_unknown(r.range_size)),
                right(pct(r.utilisation)),
                Cell::new(
                    r.by_state
                        .iter()
                        .map(|(k, v)| format!("{} {v}", k.name()))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            ]
        })
        .collect();
    table(
        &["SOURCE", "DESTINATION", "IN USE", "RANGE", "USED", "STATES"],
        rows,
        indent,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{DestCount, Errno};

    #[test]
    fn wraps_with_indent() {
        let w = wrap("aaa bbb ccc ddd", 9, 2);
        assert_eq!(w, "aaa bbb\n  ccc ddd");
        assert_eq!(wrap("", 10, 0), "");
        assert_eq!(wrap_at("aaa bbb ccc", 9, 5, 1), "aaa\n bbb ccc");
    }

    #[test]
    fn top_destinations_truncates() {
        let o = Offender {
            pid: 1,
            comm: "x".into(),
            netns: None,
            failures: 15,
            first_ts: None,
            last_ts: None,
            destinations: (1..=5u16)
                .rev()
                .map(|i| DestCount {
                    dst: format!("10.0.0.{i}:80").parse().expect("addr"),
                    errno: Errno::EADDRNOTAVAIL,
                    cause: portexhaust_common::Cause::Exhausted,
                    failures: u64::from(i),
                })
                .collect(),
        };
        assert_eq!(
            top_destinations(&o, 2),
            "10.0.0.5:80 EADDRNOTAVAIL x5, 10.0.0.4:80 EADDRNOTAVAIL x4, (+3 more)"
        );
    }
}
