//! Debian cloud kernels, fetched by package name through a private apt state per suite.
//!
//! The archive is whatever this machine's own apt configuration uses for Debian (no mirror is
//! named in this code): its URI and key are reused with the other suites, in an apt state kept
//! under the cache folder so the host's package lists and status are never touched.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

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

/// Kernel options the guest payload relies on. A `Some(module)` option may be built as a module:
/// then that module (and what it depends on) is put into the initramfs and loaded by /init.
/// On the Debian cloud kernels all of these are built in (checked on 5.10.223, 6.1.176,
/// 6.12.117), so normally no module is needed at all.
const NEEDED_CONFIG: &[(&str, Option<&str>)] = &[
    ("CONFIG_BPF_SYSCALL", None),
    ("CONFIG_BPF_EVENTS", None),
    ("CONFIG_NET_NS", None),
    ("CONFIG_INET", None),
    ("CONFIG_IPV6", Some("ipv6")),
    ("CONFIG_DEVTMPFS", None),
    ("CONFIG_SERIAL_8250_CONSOLE", None),
    ("CONFIG_BLK_DEV_INITRD", None),
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
}

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
struct SourceEntry {
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
fn parse_one_line(text: &str) -> Vec<SourceEntry> {
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
fn parse_deb822(text: &str) -> Vec<SourceEntry> {
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

fn pick_archive(entries: &[SourceEntry]) -> Option<ArchiveSource> {
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

/// A private apt state for one suite under the cache folder.
struct AptState {
    dir: PathBuf,
    debs: PathBuf,
    /// The source (URI or key) differs from the one the lists were fetched from.
    source_changed: bool,
}

impl AptState {
    fn new(cache: &Path, spec: &KernelSpec, archive: &ArchiveSource) -> Result<Self> {
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

    fn lists_age(&self) -> Option<Duration> {
        let rd = std::fs::read_dir(self.dir.join("lists")).ok()?;
        rd.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
    }

    fn update(&self) -> Result<()> {
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
    fn newest_cloud_image(&self, spec: &KernelSpec) -> Result<Option<(String, String)>> {
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

    fn download(&self, package: &str, version: &str) -> Result<PathBuf> {
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
fn package_versions(text: &str) -> Vec<(String, String)> {
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

/// Where one unpacked kernel lives in the cache.
fn kernel_dir(cache: &Path, package: &str, version: &str) -> PathBuf {
    cache.join("kernels").join(format!("{package}_{version}"))
}

fn load_meta(dir: &Path) -> Option<Kernel> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    let k: Kernel = serde_json::from_str(&text).ok()?;
    (k.vmlinuz.is_file() && k.modules.iter().all(|m| m.is_file())).then_some(k)
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

/// Unpack the .deb, keep vmlinuz and the modules NEEDED_CONFIG asks for, drop the rest.
fn unpack(deb: &Path, dest: &Path, package: &str, version: &str) -> Result<Kernel> {
    // Appended, not with_extension: the folder name ends in a version with dots.
    let tmp = PathBuf::from(format!("{}.unpacking", dest.display()));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = unpack_into(deb, &tmp, dest, package, version);
    let _ = std::fs::remove_dir_all(&tmp);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

fn unpack_into(
    deb: &Path,
    tmp: &Path,
    dest: &Path,
    package: &str,
    version: &str,
) -> Result<Kernel> {
    crate::setup::run_checked(Command::new("dpkg-deb").arg("-x").arg(deb).arg(tmp))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    let boot = tmp.join("boot");
    let vmlinuz_src = std::fs::read_dir(&boot)
        .with_context(|| format!("{} has no /boot", deb.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{} has no /boot/vmlinuz-*", deb.display()))?;
    let release = vmlinuz_src
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let config_text = std::fs::read_to_string(boot.join(format!("config-{release}")))
        .with_context(|| format!("{} has no /boot/config-{release}", deb.display()))?;
    let config = parse_config(&config_text);

    std::fs::create_dir_all(dest.join("modules"))
        .with_context(|| format!("creating {}", dest.display()))?;
    let vmlinuz = dest.join("vmlinuz");
    std::fs::copy(&vmlinuz_src, &vmlinuz)
        .with_context(|| format!("copying {}", vmlinuz_src.display()))?;
    std::fs::copy(boot.join(format!("config-{release}")), dest.join("config"))
        .with_context(|| format!("copying config-{release}"))?;

    // Merged-/usr packages (trixie) put modules under usr/lib/modules.
    let modroot = [
        tmp.join("lib/modules").join(&release),
        tmp.join("usr/lib/modules").join(&release),
    ]
    .into_iter()
    .find(|p| p.is_dir());

    let mut warnings = Vec::new();
    let mut wanted = Vec::new();
    for (opt, module) in NEEDED_CONFIG {
        match (config.get(*opt).map(String::as_str), module) {
            (Some("y"), _) => {}
            (Some("m"), Some(m)) => wanted.push(*m),
            (Some("m"), None) => warnings.push(format!("{opt}=m: the guest cannot load it")),
            _ => warnings.push(format!("{opt} is not set in this kernel")),
        }
    }
    let mut modules = Vec::new();
    if !wanted.is_empty() {
        let modroot =
            modroot.with_context(|| format!("{} has no lib/modules/{release}", deb.display()))?;
        for (i, (name, bytes)) in module_load_order(&modroot, &wanted)?
            .into_iter()
            .enumerate()
        {
            // Numbered so that /init's glob loads them in dependency order.
            let out = dest.join("modules").join(format!("{i:02}-{name}.ko"));
            std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
            modules.push(out);
        }
    }

    let kernel = Kernel {
        package: package.to_string(),
        version: version.to_string(),
        release,
        vmlinuz,
        modules,
        warnings,
    };
    let meta = serde_json::to_string_pretty(&kernel).context("serialising kernel metadata")?;
    std::fs::write(dest.join("meta.json"), meta)
        .with_context(|| format!("writing {}", dest.join("meta.json").display()))?;
    Ok(kernel)
}

/// `CONFIG_X=y|m|"str"` lines of a kernel config.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// "kernel/net/ipv6/ipv6.ko.xz" -> "ipv6"; the kernel treats '-' and '_' alike in names.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file.split(".ko").next().unwrap_or(file);
    Some(stem.replace('-', "_"))
}

/// Every module file under the modules root, by name.
fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if p.is_dir() {
            index_modules(&p, out)?;
        } else if p.to_string_lossy().contains(".ko")
            && let Some(name) = module_name(&p.to_string_lossy())
        {
            out.insert(name, p);
        }
    }
    Ok(())
}

/// The `depends=` entry of a module's .modinfo section (NUL-separated `key=value` strings).
/// The package carries no modules.dep (depmod writes it at install time), so read it here.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &ko[at + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// Modules to insmod, dependencies first: (name, decompressed .ko).
fn module_load_order(modroot: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut index = BTreeMap::new();
    index_modules(modroot, &mut index)?;
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    // Depth-first, dependencies before dependants; `visiting` stops a (malformed) cycle.
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        order: &mut Vec<(String, Vec<u8>)>,
        visiting: &mut Vec<String>,
    ) -> Result<()> {
        if order.iter().any(|(n, _)| n == name) || visiting.iter().any(|v| v == name) {
            return Ok(());
        }
        let path = index
            .get(name)
            .with_context(|| format!("module {name} is not in the kernel package"))?;
        let bytes = read_module(path)?;
        visiting.push(name.to_string());
        for dep in modinfo_depends(&bytes) {
            visit(&dep, index, order, visiting)?;
        }
        visiting.pop();
        order.push((name.to_string(), bytes));
        Ok(())
    }
    for w in wanted {
        visit(&w.replace('-', "_"), &index, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

/// A module's bytes, decompressed: newer Debian kernels ship `.ko.xz`, and busybox insmod
/// wants a plain `.ko`.
fn read_module(src: &Path) -> Result<Vec<u8>> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(src).with_context(|| format!("reading {}", src.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(src)
        .output()
        .with_context(|| format!("could not run {tool} to decompress {}", src.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_debian_archive_from_deb822() {
        let text = "Types: deb\n# http://snapshot.example/archive/debian/2025\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let got = pick_archive(&parse_deb822(text)).unwrap();
        assert_eq!(got.uri, "http://mirror.example/debian");
        assert_eq!(
            got.signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
    }

    #[test]
    fn skips_third_party_and_disabled_sources() {
        let third = "Types: deb\nURIs: https://node.example/node_20.x\nSuites: nodistro\nComponents: main\n\nTypes: deb\nURIs: http://off.example/debian\nSuites: trixie\nComponents: main\nEnabled: no\n";
        assert!(pick_archive(&parse_deb822(third)).is_none());
        let list = "# deb http://old.example/debian buster main\ndeb-src http://src.example/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main contrib\n";
        let got = pick_archive(&parse_one_line(list)).unwrap();
        assert_eq!(got.uri, "http://m.example/debian");
        assert_eq!(got.signed_by.as_deref(), Some("/k.gpg"));
    }

    #[test]
    fn reads_apt_cache_show_and_config() {
        let show = "Package: linux-image-6.1.0-47-cloud-amd64-unsigned\nVersion: 6.1.170-1\nDepends: x\n\nPackage: linux-image-6.1.0-50-cloud-amd64-unsigned\nVersion: 6.1.176-1\n";
        assert_eq!(
            package_versions(show),
            vec![
                (
                    "linux-image-6.1.0-47-cloud-amd64-unsigned".to_string(),
                    "6.1.170-1".to_string()
                ),
                (
                    "linux-image-6.1.0-50-cloud-amd64-unsigned".to_string(),
                    "6.1.176-1".to_string()
                ),
            ]
        );
        let cfg = parse_config("# CONFIG_X is not set\nCONFIG_IPV6=y\nCONFIG_VETH=m\n");
        assert_eq!(cfg.get("CONFIG_IPV6").map(String::as_str), Some("y"));
        assert_eq!(cfg.get("CONFIG_VETH").map(String::as_str), Some("m"));
        assert!(!cfg.contains_key("CONFIG_X"));
        assert_eq!(
            module_name("kernel/net/ipv6/ipv6.ko.xz").as_deref(),
            Some("ipv6")
        );
        assert_eq!(
            module_name("kernel/drivers/net/nf-foo.ko").as_deref(),
            Some("nf_foo")
        );
        let ko = b"\x7fELF....\0license=GPL\0depends=udp_tunnel,ip6-udp-tunnel\0intree=Y\0";
        assert_eq!(modinfo_depends(ko), vec!["udp_tunnel", "ip6_udp_tunnel"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
    }
}
