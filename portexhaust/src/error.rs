//! Errors as one line: what the user sees on stderr.

/// One line out of an error chain: every source, each cut at its first line, so a verifier
/// log does not flood the terminal.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        let first = s.lines().next().unwrap_or("").trim().to_string();
        let first = match first.find(". Verifier output:") {
            Some(i) => first[..i].to_string(),
            None => first,
        };
        if !first.is_empty() && !parts.iter().any(|p: &String| p.contains(&first)) {
            parts.push(first);
        }
        cur = e.source();
    }
    let mut out = parts.join(": ");
    if out.len() > 300 {
        let mut cut = 300;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}
