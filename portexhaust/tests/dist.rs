//! The release artefacts of `cargo xtask dist`, as a user gets them: the static binary runs
//! `selftest` here, the .deb installs with dpkg, works from /usr/bin and goes away without a
//! trace, and the OCI image holds the binary under its entrypoint.
//!
//! `cargo xtask test` builds the artefacts first and passes their directory in
//! PORTEXHAUST_DIST_DIR (default: target/dist). Missing artefacts or tools fail, never skip.
mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{require_root, temp_dir};
use serde_json::Value;

fn dist_dir() -> PathBuf {
    std::env::var_os("PORTEXHAUST_DIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist"))
}

/// dist.json, which `cargo xtask dist` writes last.
fn manifest() -> Value {
    let path = dist_dir().join("dist.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: build the artefacts with `cargo xtask dist` (cargo xtask test does)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("dist.json")
}

fn binary(m: &Value, arch: &str) -> PathBuf {
    let b = m["binaries"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["arch"] == arch))
        .unwrap_or_else(|| panic!("dist.json has no {arch} binary: {m}"));
    assert_eq!(
        b["ebpf_object"], "built",
        "the {arch} release binary must embed the eBPF object built from the sources"
    );
    dist_dir().join(b["file"].as_str().expect("file"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// stdout and stderr of a command that must succeed.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {}\n{said}", out.status);
    said
}

/// `selftest` passes with this binary.
fn selftest(bin: &Path) {
    let said = ok(Command::new(bin).arg("selftest"));
    assert!(
        said.contains("selftest passed"),
        "{}: {said}",
        bin.display()
    );
}

/// No interpreter, no shared library, no symbol table (binutils reads any architecture).
fn assert_static_and_stripped(bin: &Path) {
    let headers = ok(Command::new("readelf")
        .args(["-l", "-d", "-S", "-W"])
        .arg(bin));
    assert!(
        !headers.contains("program interpreter"),
        "{} asks for a dynamic loader",
        bin.display()
    );
    assert!(
        !headers.contains("(NEEDED)"),
        "{} needs shared libraries:\n{headers}",
        bin.display()
    );
    assert!(
        !headers.contains(".symtab"),
        "{} is not stripped",
        bin.display()
    );
}

#[test]
#[ignore = "needs root and the artefacts of cargo xtask dist: run with cargo xtask test"]
fn dist_static_binary_is_static_stripped_and_passes_selftest() {
    require_root();
    let m = manifest();
    let bin = binary(&m, "x86_64");
    // What an SRE checks first: glibc's ldd.
    let out = run(Command::new("ldd").arg(&bin));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("not a dynamic executable") || said.contains("statically linked"),
        "ldd {}: {said}",
        bin.display()
    );
    assert_static_and_stripped(&bin);
    let version = ok(Command::new(&bin).arg("--version"));
    assert!(
        version.contains(m["version"].as_str().expect("version")),
        "{version}"
    );
    selftest(&bin);
}

#[test]
#[ignore = "needs the artefacts of cargo xtask dist: run with cargo xtask test"]
fn dist_aarch64_binary_is_a_static_aarch64_executable() {
    let m = manifest();
    let bin = binary(&m, "aarch64");
    let data = fs::read(&bin).expect("read the aarch64 binary");
    // ELF, 64-bit, little-endian, executable or PIE, e_machine EM_AARCH64 (183).
    assert_eq!(&data[..4], b"\x7fELF");
    assert_eq!((data[4], data[5]), (2, 1), "not ELF64 little-endian");
    assert!(matches!(u16::from_le_bytes([data[16], data[17]]), 2 | 3));
    assert_eq!(u16::from_le_bytes([data[18], data[19]]), 183, "not aarch64");
    assert_static_and_stripped(&bin);
}

const PACKAGE: &str = "portexhaust";

/// Purges the package when the test ends, passed or failed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

#[test]
#[ignore = "needs root and the artefacts of cargo xtask dist: run with cargo xtask test"]
fn dist_deb_installs_works_from_usr_bin_and_purges_cleanly() {
    require_root();
    let m = manifest();
    let deb = dist_dir().join(m["deb"].as_str().expect("deb"));
    // Someone's own install would be purged below: refuse instead.
    assert!(
        !installed() && !Path::new("/usr/bin/portexhaust").exists(),
        "portexhaust is already installed here (dpkg or /usr/bin): this test installs and purges it"
    );
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    // Files (not directories) the package ships, as absolute paths.
    let files: Vec<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    for want in [
        "/usr/bin/portexhaust",
        "/usr/lib/systemd/system/portexhaust.service",
        "/usr/share/man/man1/portexhaust.1.gz",
        "/usr/share/man/man1/portexhaust-trace.1.gz",
        "/usr/share/man/man1/portexhaust-selftest.1.gz",
        "/usr/share/bash-completion/completions/portexhaust",
        "/usr/share/zsh/vendor-completions/_portexhaust",
        "/usr/share/fish/vendor_completions.d/portexhaust.fish",
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "{want} not in the package:\n{listing}"
        );
    }
    let control = temp_dir("deb-control");
    ok(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(control.path()));
    let postinst = fs::read_to_string(control.path().join("postinst")).unwrap_or_default();
    assert!(
        !postinst.contains("deb-systemd-invoke start") && !postinst.contains("_dh_action=start"),
        "postinst starts the service:\n{postinst}"
    );

    let guard = Installed;
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed(), "dpkg -i did not install {PACKAGE}");
    selftest(Path::new("/usr/bin/portexhaust"));
    let page = ok(Command::new("man").args(["-w", "portexhaust"]));
    assert_eq!(page.trim(), "/usr/share/man/man1/portexhaust.1.gz");
    let page = ok(Command::new("man").args(["-w", "portexhaust-trace"]));
    assert_eq!(page.trim(), "/usr/share/man/man1/portexhaust-trace.1.gz");
    for f in &files {
        assert!(Path::new(f).exists(), "{f} was not installed");
    }
    // The bash completion answers for the binary it was made for.
    let bash = fs::read_to_string("/usr/share/bash-completion/completions/portexhaust")
        .expect("bash completion");
    assert!(bash.contains("portexhaust"), "{bash}");

    // The unit as installed: verify is silent (any output is a setting systemd ignores),
    // it points at /usr/bin, and nothing enabled it.
    let unit = "/usr/lib/systemd/system/portexhaust.service";
    let said = ok(Command::new("systemd-analyze").args(["verify", unit]));
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify {unit}: {said}"
    );
    let text = fs::read_to_string(unit).expect("unit");
    assert!(
        text.contains("\nExecStart=/usr/bin/portexhaust trace "),
        "{text}"
    );
    let enabled =
        run(Command::new("systemctl").args(["--root=/", "is-enabled", "portexhaust.service"]));
    assert_eq!(
        String::from_utf8_lossy(&enabled.stdout).trim(),
        "disabled",
        "systemctl is-enabled: {enabled:?}"
    );
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/portexhaust.service").exists());

    // Remove, then purge: no file of the package is left, and dpkg forgets it.
    ok(Command::new("dpkg").args(["-r", PACKAGE]));
    for f in &files {
        assert!(!Path::new(f).exists(), "{f} left behind by dpkg -r");
    }
    ok(Command::new("dpkg").args(["--purge", PACKAGE]));
    assert!(!installed(), "{PACKAGE} still installed after --purge");
    // Nor does systemd's state: the mask `dpkg -r` leaves, the enablement record.
    for f in [
        "/etc/systemd/system/portexhaust.service",
        "/var/lib/systemd/deb-systemd-helper-masked/portexhaust.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/portexhaust.service.dsh-also",
    ] {
        assert!(!Path::new(f).exists(), "{f} left behind by --purge");
    }
    let status = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]));
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.contains("config-files"),
        "{PACKAGE} left configuration behind: {status}"
    );
    drop(guard);
}

/// `sha256:HEX` of an OCI descriptor: its blob, checked against the digest and size.
fn blob(layout: &Path, descriptor: &Value) -> PathBuf {
    let digest = descriptor["digest"].as_str().expect("digest");
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = layout.join("blobs/sha256").join(hex);
    let size = fs::metadata(&path)
        .unwrap_or_else(|e| panic!("blob {digest}: {e}"))
        .len();
    assert_eq!(Some(size), descriptor["size"].as_u64(), "size of {digest}");
    let sum = ok(Command::new("sha256sum").arg(&path));
    assert!(sum.starts_with(hex), "blob {digest} has digest {sum}");
    path
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).expect("read JSON")).expect("JSON")
}

#[test]
#[ignore = "needs root and the artefacts of cargo xtask dist: run with cargo xtask test"]
fn dist_image_runs_its_entrypoint() {
    require_root();
    let m = manifest();
    let bin = binary(&m, "x86_64");
    let archive = dist_dir().join(m["image"].as_str().expect("dist.json: no image"));
    let dir = temp_dir("image");
    let layout = dir.path().join("oci");
    fs::create_dir(&layout).expect("mkdir");
    ok(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    let layout_file = json_file(&layout.join("oci-layout"));
    assert_eq!(layout_file["imageLayoutVersion"], "1.0.0");
    let index = json_file(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("index manifests");
    assert_eq!(manifests.len(), 1, "{index}");
    assert_eq!(
        manifests[0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let manifest = json_file(&blob(&layout, &manifests[0]));
    let config = json_file(&blob(&layout, &manifest["config"]));
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/portexhaust"])
    );
    assert_eq!(config["config"]["Cmd"][0], "trace", "{config}");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(layers.len())
    );
    // The image's file system, layer over layer (tar reads their compression itself).
    let rootfs = dir.path().join("rootfs");
    fs::create_dir(&rootfs).expect("mkdir");
    for (i, layer) in layers.iter().enumerate() {
        let path = blob(&layout, layer);
        // The config names each layer by the digest of its uncompressed tar.
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let sum = ok(Command::new("sh")
            .arg("-c")
            .arg("gzip -dc \"$1\" | sha256sum")
            .arg("sh")
            .arg(&path));
        let diff_id = config["rootfs"]["diff_ids"][i].as_str().expect("diff_id");
        assert_eq!(
            Some(sum.split_whitespace().next().unwrap_or("")),
            diff_id.strip_prefix("sha256:"),
            "layer {i}: diff_id"
        );
        ok(Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(&rootfs));
    }
    let entry = rootfs.join("usr/local/bin/portexhaust");
    assert_eq!(
        fs::read(&entry).expect("the entrypoint is in the image"),
        fs::read(&bin).expect("dist binary"),
        "the image's binary is not the static release binary"
    );
    // Inside the image's own file system, which holds nothing else: no library to load.
    let version = ok(Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/local/bin/portexhaust", "--version"]));
    assert!(version.starts_with("portexhaust "), "{version}");
    selftest(&entry);
}
