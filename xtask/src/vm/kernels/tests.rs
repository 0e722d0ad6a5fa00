use super::{
    apt::package_versions,
    sources::{parse_deb822, parse_one_line, pick_archive},
    unpack::{modinfo_depends, module_name, parse_config},
};

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
