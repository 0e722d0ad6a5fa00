//! Unpacking a kernel package into the cache: vmlinuz, its config, and the modules the guest
//! needs (normally none), decompressed and in load order.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::Kernel;

/// Kernel options the guest payload relies on. A `Some(module)` option may be built as a module:
/// then that module (and what it depends on) is put into the initramfs and loaded by /init.
/// On the Debian cloud kernels the first group is built in (checked on 5.10.223, 6.1.176,
/// 6.12.117); the NAT scenario's (veth, conntrack, NAT, nftables masquerade, socket and
/// conntrack diagnostics over netlink) are modules there,
/// so the guest loads them, dependencies first (nf_defrag_ipv4/6, libcrc32c, ... come from the
/// modules' own `depends=`).
const NEEDED_CONFIG: &[(&str, Option<&str>)] = &[
    ("CONFIG_BPF_SYSCALL", None),
    ("CONFIG_BPF_EVENTS", None),
    ("CONFIG_NET_NS", None),
    ("CONFIG_INET", None),
    ("CONFIG_IPV6", Some("ipv6")),
    ("CONFIG_DEVTMPFS", None),
    ("CONFIG_SERIAL_8250_CONSOLE", None),
    ("CONFIG_BLK_DEV_INITRD", None),
    ("CONFIG_VETH", Some("veth")),
    ("CONFIG_NF_CONNTRACK", Some("nf_conntrack")),
    ("CONFIG_NF_NAT", Some("nf_nat")),
    ("CONFIG_NF_TABLES", Some("nf_tables")),
    ("CONFIG_NFT_NAT", Some("nft_chain_nat")),
    ("CONFIG_NFT_MASQ", Some("nft_masq")),
    // `ct state new ... drop`: the firewall control of the NAT scenario.
    ("CONFIG_NFT_CT", Some("nft_ct")),
    // What names the NAT's client and reads the NAT's own view: sock_diag (the sockets of
    // every namespace) and conntrack over netlink.
    ("CONFIG_INET_DIAG", Some("inet_diag")),
    ("CONFIG_INET_TCP_DIAG", Some("tcp_diag")),
    ("CONFIG_NF_CT_NETLINK", Some("nf_conntrack_netlink")),
];

/// Unpack the .deb, keep vmlinuz and the modules NEEDED_CONFIG asks for, drop the rest.
pub(super) fn unpack(deb: &Path, dest: &Path, package: &str, version: &str) -> Result<Kernel> {
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
        layout: super::LAYOUT,
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
pub(super) fn module_name(path: &str) -> Option<String> {
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
pub(super) fn modinfo_depends(ko: &[u8]) -> Vec<String> {
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
