//! A private apt state per suite under the cache folder: its package lists, the newest cloud
//! kernel of a line, and that kernel's .deb.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use super::{ArchiveSource, KernelSpec};

/// A private apt state for one suite under the cache folder.
pub(super) struct AptState {
    dir: PathBuf,
    debs: PathBuf,
    /// The source (URI or key) differs from the one the lists were fetched from.
    pub(super) source_changed: bool,
}

impl AptState {
    pub(super) fn new(cache: &Path, spec: &KernelSpec, archive: &ArchiveSource) -> Result<Self> {
        let dir = cache.join("apt").join(spec.suite);
        let debs = cache.join("debs");
        for d in [
            dir.join("sources.list.d"),
            dir.join("lists/partial"),
            dir.join("cache/archives/partial"),
            debs.join("partial"),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        // deb822 so that an inline Signed-By key block copies over verbatim; `Targets: Packages`
        // skips the translations and AppStream metadata apt would otherwise fetch.
        let mut src = format!(
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: main\nArchitectures: amd64\nTargets: Packages\n",
            archive.uri, spec.suite
        );
        if let Some(key) = &archive.signed_by {
            src.push_str(&format!("Signed-By: {key}\n"));
        }
        let source_changed = write_if_changed(&dir.join("sources.list.d/debian.sources"), &src)?;
        let status = dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "")
                .with_context(|| format!("creating {}", status.display()))?;
        }
        Ok(Self {
            dir,
            debs,
            source_changed,
        })
    }

    fn options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut opts: Vec<String> = vec![
            "-o".into(),
            "Dir::Etc::SourceList=/dev/null".into(),
            "-o".into(),
            format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
            "-o".into(),
            format!("Dir::State::Lists={}", d("lists")),
            "-o".into(),
            format!("Dir::State::Status={}", d("status")),
            "-o".into(),
            format!("Dir::Cache={}", d("cache")),
            // The host may disable the binary caches (Docker images do); apt-cache then
            // rebuilds them in memory, which is fine for one suite.
            "-o".into(),
            format!("Dir::Cache::Archives={}", self.debs.display()),
            "-o".into(),
            "Dir::Etc::Preferences=/dev/null".into(),
            "-o".into(),
            "Dir::Etc::PreferencesParts=/dev/null".into(),
            "-o".into(),
            "APT::Architecture=amd64".into(),
            "-o".into(),
            "APT::Architectures=amd64".into(),
            "-o".into(),
            "Acquire::Languages=none".into(),
            // Older suites' Release files can be past Valid-Until on snapshot mirrors.
            "-o".into(),
            "Acquire::Check-Valid-Until=false".into(),
        ];
        // As root, apt drops to the _apt user for downloads, which cannot write into the
        // cache folder; stay root instead. (As another user apt does not switch at all.)
        if crate::setup::is_root() {
            opts.extend(["-o".into(), "APT::Sandbox::User=root".into()]);
        }
        opts
    }

    fn apt(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(self.options())
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        c
    }

    pub(super) fn lists_age(&self) -> Option<Duration> {
        let rd = std::fs::read_dir(self.dir.join("lists")).ok()?;
        rd.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
    }

    pub(super) fn update(&self) -> Result<()> {
        let out = self
            .apt("apt-get")
            .args(["-q", "update"])
            .output()
            .context("could not run apt-get")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // apt-get update exits 0 even when a source failed ("W: Failed to fetch"); treat the
        // absence of a Packages index as the failure.
        if !out.status.success() || self.lists_age().is_none() {
            // The first error names the cause; later ones repeat its consequences.
            let why = stderr
                .lines()
                .find(|l| l.starts_with("E:"))
                .or_else(|| {
                    stderr
                        .lines()
                        .find(|l| l.starts_with("Err") || l.starts_with("W:"))
                })
                .unwrap_or("no Packages index downloaded");
            bail!("apt-get update failed: {}", why.trim());
        }
        Ok(())
    }

    /// The newest `linux-image-*-cloud-amd64-unsigned` of this line: (package, version).
    pub(super) fn newest_cloud_image(&self, spec: &KernelSpec) -> Result<Option<(String, String)>> {
        let out = self
            .apt("apt-cache")
            .args([
                "search",
                "--names-only",
                "^linux-image-[0-9].*-cloud-amd64-unsigned$",
            ])
            .output()
            .context("could not run apt-cache")?;
        if !out.status.success() {
            bail!(
                "apt-cache search failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        if names.is_empty() {
            return Ok(None);
        }
        let out = self
            .apt("apt-cache")
            .args(["show", "--no-all-versions"])
            .args(&names)
            .output()
            .context("could not run apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut best: Option<(String, String)> = None;
        for (pkg, ver) in package_versions(&text) {
            if !ver.starts_with(spec.version_prefix) {
                continue;
            }
            let newer = match &best {
                None => true,
                Some((_, b)) => dpkg_version_gt(&ver, b)?,
            };
            if newer {
                best = Some((pkg, ver));
            }
        }
        Ok(best)
    }

    pub(super) fn download(&self, package: &str, version: &str) -> Result<PathBuf> {
        if let Some(deb) = find_deb(&self.debs, package, version) {
            return Ok(deb);
        }
        let out = self
            .apt("apt-get")
            .current_dir(&self.debs)
            .args(["-q", "download", &format!("{package}={version}")])
            .output()
            .context("could not run apt-get")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr
                .lines()
                .rev()
                .find(|l| l.starts_with("E:"))
                .unwrap_or("");
            bail!(
                "apt-get download {package}={version} failed: {}",
                why.trim()
            );
        }
        find_deb(&self.debs, package, version)
            .with_context(|| format!("apt-get download left no .deb for {package} {version}"))
    }
}

/// Returns whether the file changed.
fn write_if_changed(path: &Path, text: &str) -> Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// (Package, Version) pairs of `apt-cache show` output.
pub(super) fn package_versions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pkg: Option<String> = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("Package: ") {
            pkg = Some(p.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Version: ")
            && let Some(p) = pkg.take()
        {
            out.push((p, v.trim().to_string()));
        }
    }
    out
}

fn dpkg_version_gt(a: &str, b: &str) -> Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("could not run dpkg --compare-versions")?;
    Ok(status.success())
}

/// apt names downloads `<package>_<version with ':' as %3a>_<arch>.deb`.
fn find_deb(dir: &Path, package: &str, version: &str) -> Option<PathBuf> {
    let name = format!("{package}_{}_amd64.deb", version.replace(':', "%3a"));
    let p = dir.join(name);
    p.is_file().then_some(p)
}
