//! Debian cloud kernels, fetched by package name through a private apt state per suite.
//!
//! The archive is whatever this machine's own apt configuration uses for Debian (no mirror is
//! named in this code): its URI and key are reused with the other suites, in an apt state kept
//! under the cache folder so the host's package lists and status are never touched.
mod apt;
mod sources;
#[cfg(test)]
mod tests;
mod unpack;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use apt::AptState;
use unpack::unpack;

pub use sources::{ArchiveSource, host_archive};

/// One row of the matrix: a kernel line and the Debian suite that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    pub label: &'static str,
    pub suite: &'static str,
    /// Debian package versions of this line start with this ("6.1." for 6.1.176-1).
    pub version_prefix: &'static str,
}

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        label: "5.10",
        suite: "bullseye",
        version_prefix: "5.10.",
    },
    KernelSpec {
        label: "6.1",
        suite: "bookworm",
        version_prefix: "6.1.",
    },
    KernelSpec {
        label: "6.12",
        suite: "trixie",
        version_prefix: "6.12.",
    },
];

/// Package lists older than this are refreshed (a new kernel build may have been published).
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A kernel unpacked into the cache, ready to boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kernel {
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel, e.g. "6.1.0-50-cloud-amd64".
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Decompressed modules in load order (usually empty: see NEEDED_CONFIG).
    pub modules: Vec<PathBuf>,
    /// Needed options this kernel lacks, said once per fetch and shown in the report.
    pub warnings: Vec<String>,
    /// Which `NEEDED_CONFIG` the kernel was unpacked for: an older unpacking lacks modules a
    /// newer guest loads (0: before the field existed), so it is unpacked again.
    #[serde(default)]
    pub layout: u32,
}

/// Bump when `NEEDED_CONFIG` (unpack.rs) changes. 1: the NAT scenario's modules; 2: and
/// inet_diag, tcp_diag, nf_conntrack_netlink; 3: nft_ct.
pub const LAYOUT: u32 = 3;

/// Where one unpacked kernel lives in the cache.
fn kernel_dir(cache: &Path, package: &str, version: &str) -> PathBuf {
    cache.join("kernels").join(format!("{package}_{version}"))
}

fn load_meta(dir: &Path) -> Option<Kernel> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    let k: Kernel = serde_json::from_str(&text).ok()?;
    (k.layout == LAYOUT && k.vmlinuz.is_file() && k.modules.iter().all(|m| m.is_file()))
        .then_some(k)
}

/// The suite's most recently fetched kernel, for --offline.
fn current_pointer(cache: &Path, spec: &KernelSpec) -> PathBuf {
    cache
        .join("kernels")
        .join(format!("{}.current", spec.suite))
}

pub struct FetchOptions<'a> {
    pub cache: &'a Path,
    pub archive: Option<&'a ArchiveSource>,
    pub offline: bool,
    pub refresh: bool,
}

/// Fetch (or find in the cache) the newest cloud kernel of `spec`. Progress goes to `log`.
pub fn fetch(spec: &KernelSpec, opts: &FetchOptions, log: &dyn Fn(&str)) -> Result<Kernel> {
    let pointer = current_pointer(opts.cache, spec);
    if opts.offline {
        let dir = std::fs::read_to_string(&pointer)
            .ok()
            .map(|d| opts.cache.join("kernels").join(d.trim()));
        return dir.as_deref().and_then(load_meta).with_context(|| {
            format!(
                "kernel package not found: --offline and no {} kernel in {}",
                spec.suite,
                opts.cache.display()
            )
        });
    }
    let archive = opts
        .archive
        .context("no Debian archive known (internal: archive not resolved)")?;
    let apt = AptState::new(opts.cache, spec, archive)?;
    let stale = apt.lists_age().is_none_or(|age| age > LISTS_MAX_AGE);
    if opts.refresh || stale || apt.source_changed {
        log(&format!(
            "updating the {} package list from {}",
            spec.suite, archive.uri
        ));
        if let Err(e) = apt.update() {
            // Older lists from the same source still name a kernel (perhaps not the newest):
            // better a run on it than none when the archive cannot be reached.
            if apt.source_changed || apt.lists_age().is_none() {
                return Err(e.context(format!("{} from {}", spec.suite, archive.uri)));
            }
            log(&format!(
                "warning: {e:#}; using the package list from {:.0} h ago",
                apt.lists_age().unwrap_or_default().as_secs_f64() / 3600.0
            ));
        }
    }
    let (package, version) = apt.newest_cloud_image(spec)?.with_context(|| {
        format!(
            "kernel package not found: no linux-image-{}*-cloud-amd64-unsigned in {} {}",
            spec.version_prefix, archive.uri, spec.suite
        )
    })?;
    let dir = kernel_dir(opts.cache, &package, &version);
    let kernel = match load_meta(&dir) {
        Some(k) => {
            log(&format!("{package} {version}: cached"));
            k
        }
        None => {
            log(&format!("downloading {package} {version}"));
            let deb = apt.download(&package, &version)?;
            unpack(&deb, &dir, &package, &version)?
        }
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Best effort: only --offline reads it.
    let _ = std::fs::write(&pointer, name);
    Ok(kernel)
}
