//! Where this machine's apt finds Debian, read from its sources files (one-line and deb822).
use std::path::PathBuf;

use anyhow::{Context as _, Result};

/// Where the host's apt finds Debian: the URI and, when set, the key that signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSource {
    pub uri: String,
    /// The `Signed-By` value exactly as configured (a keyring path or an inline key block).
    pub signed_by: Option<String>,
}

/// Suite names that identify Debian's own archive (and not a third-party repository that
/// happens to have a "main" component, such as one with suite "nodistro").
const DEBIAN_SUITES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

#[derive(Debug, Default)]
pub(super) struct SourceEntry {
    types: Vec<String>,
    uris: Vec<String>,
    suites: Vec<String>,
    components: Vec<String>,
    signed_by: Option<String>,
    enabled: bool,
}

impl SourceEntry {
    fn is_debian_main(&self) -> bool {
        self.enabled
            && self.types.iter().any(|t| t == "deb")
            && self.components.iter().any(|c| c == "main")
            && self
                .suites
                .iter()
                .any(|s| DEBIAN_SUITES.contains(&s.as_str()))
    }
}

/// One-line format: `deb [opt=val ...] URI SUITE COMPONENT...`.
pub(super) fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace().peekable();
        let Some(ty) = words.next() else { continue };
        let mut signed_by = None;
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                let opt = w.trim_start_matches('[').trim_end_matches(']');
                if let Some(v) = opt.strip_prefix("signed-by=") {
                    signed_by = Some(v.to_string());
                }
                if w.ends_with(']') {
                    break;
                }
            }
        }
        let rest: Vec<String> = words.map(str::to_string).collect();
        if rest.len() < 2 {
            continue;
        }
        out.push(SourceEntry {
            types: vec![ty.to_string()],
            uris: vec![rest[0].clone()],
            suites: vec![rest[1].clone()],
            components: rest[2..].to_vec(),
            signed_by,
            enabled: true,
        });
    }
    out
}

/// deb822 format (`*.sources`): paragraphs of `Field: value`, continuation lines indented.
pub(super) fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in para.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with(' ') || line.starts_with('\t') {
                // Continuation (an inline Signed-By key block, or a wrapped list).
                if let Some((_, v)) = fields.last_mut() {
                    v.push('\n');
                    v.push_str(line);
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        if fields.is_empty() {
            continue;
        }
        let mut e = SourceEntry {
            enabled: true,
            ..Default::default()
        };
        let list = |v: &str| v.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        for (k, v) in fields {
            match k.as_str() {
                "types" => e.types = list(&v),
                "uris" => e.uris = list(&v),
                "suites" => e.suites = list(&v),
                "components" => e.components = list(&v),
                "signed-by" => e.signed_by = Some(v),
                "enabled" => e.enabled = !v.eq_ignore_ascii_case("no"),
                _ => {}
            }
        }
        out.push(e);
    }
    out
}

/// The host's Debian archive, read from /etc/apt/sources.list and /etc/apt/sources.list.d.
pub fn host_archive() -> Result<ArchiveSource> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut entries = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            // sources.list itself has no extension; anything else (.disabled, .save) is off.
            _ if f.file_name().is_some_and(|n| n == "sources.list") => {
                entries.extend(parse_one_line(&text))
            }
            _ => {}
        }
    }
    pick_archive(&entries).context(
        "no Debian archive (type deb, a Debian suite, component main) in this machine's apt \
         sources; pass --archive-uri URI",
    )
}

pub(super) fn pick_archive(entries: &[SourceEntry]) -> Option<ArchiveSource> {
    entries
        .iter()
        .filter(|e| e.is_debian_main())
        .flat_map(|e| e.uris.iter().map(move |u| (e, u)))
        .find(|(_, u)| !u.starts_with("cdrom:"))
        .map(|(e, u)| ArchiveSource {
            uri: u.trim_end_matches('/').to_string(),
            signed_by: e.signed_by.clone(),
        })
}
