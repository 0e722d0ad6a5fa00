use super::*;

/// Assemble a BTF blob: types are (name, info, size_or_type, trailing bytes).
fn blob(strings: &[&str], types: &[(u32, u32, u32, Vec<u8>)]) -> (Vec<u8>, Vec<u32>) {
    let mut strs = vec![0u8];
    let mut offs = Vec::new();
    for s in strings {
        offs.push(strs.len() as u32);
        strs.extend_from_slice(s.as_bytes());
        strs.push(0);
    }
    let mut tb = Vec::new();
    for (name, info, sz, extra) in types {
        tb.extend_from_slice(&name.to_le_bytes());
        tb.extend_from_slice(&info.to_le_bytes());
        tb.extend_from_slice(&sz.to_le_bytes());
        tb.extend_from_slice(extra);
    }
    let mut d = vec![0x9f, 0xeb, 1, 0];
    for v in [
        24u32,
        0,
        tb.len() as u32,
        tb.len() as u32,
        strs.len() as u32,
    ] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d.extend_from_slice(&tb);
    d.extend_from_slice(&strs);
    (d, offs)
}

fn member(name: u32, ty: u32, off: u32) -> Vec<u8> {
    [name, ty, off]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

#[test]
fn finds_nested_and_anonymous_members() {
    // strings: 0 "int", 1 "ns_common", 2 "inum", 3 "net", 4 "ns", 5 "x"
    let (_, o) = blob(&["int", "ns_common", "inum", "net", "ns", "x"], &[]);
    let types = vec![
        // 1: int
        (o[0], KIND_INT << 24, 4, 0x20u32.to_le_bytes().to_vec()),
        // 2: struct ns_common { int x @0; int inum @32 bits }
        (
            o[1],
            (KIND_STRUCT << 24) | 2,
            8,
            [member(o[5], 1, 0), member(o[2], 1, 32)].concat(),
        ),
        // 3: anonymous union { struct ns_common ns @0 }
        (0, (KIND_UNION << 24) | 1, 8, member(o[4], 2, 0)),
        // 4: const anonymous union (alias)
        (0, KIND_CONST << 24, 3, vec![]),
        // 5: struct net { int x @0; <anon const union> @64 bits }
        (
            o[3],
            (KIND_STRUCT << 24) | 2,
            16,
            [member(o[5], 1, 0), member(0, 4, 64)].concat(),
        ),
    ];
    let (data, _) = blob(&["int", "ns_common", "inum", "net", "ns", "x"], &types);
    let btf = Btf::parse(&data).expect("parse");
    assert_eq!(btf.member_offset("ns_common", "inum"), Ok(4));
    assert_eq!(btf.member_offset("net", "ns.inum"), Ok(12));
    assert_eq!(btf.member_offset("net", "ns"), Ok(8));
    assert!(matches!(
        btf.member_offset("net", "nope"),
        Err(BtfError::NoMember { .. })
    ));
    assert!(matches!(
        btf.member_offset("task_struct", "pid"),
        Err(BtfError::NoStruct(_))
    ));
}

#[test]
fn skeleton_keeps_the_ids_of_what_is_asked() {
    let (_, o) = blob(&["int", "f", "t"], &[]);
    let types = vec![
        (o[0], KIND_INT << 24, 4, 0x20u32.to_le_bytes().to_vec()),
        (o[1], KIND_FUNC << 24, 0, vec![]),
        (o[2], KIND_TYPEDEF << 24, 1, vec![]),
    ];
    let (data, _) = blob(&["int", "f", "t"], &types);
    let btf = Btf::parse(&data).expect("parse");
    assert_eq!(btf.id_of(KIND_FUNC, "f"), Some(2));
    assert_eq!(btf.id_of(KIND_TYPEDEF, "t"), Some(3));
    assert_eq!(btf.id_of(KIND_FUNC, "t"), None);
    let sk = btf
        .id_skeleton(&[(KIND_TYPEDEF, "t"), (KIND_FUNC, "missing")])
        .expect("skeleton");
    let again = Btf::parse(&sk).expect("the skeleton is valid BTF");
    assert_eq!(again.id_of(KIND_TYPEDEF, "t"), Some(3));
    let aya = aya::Btf::parse(&sk, aya::Endianness::default()).expect("aya reads it");
    assert_eq!(
        aya.id_by_type_name_kind("t", aya_obj::btf::BtfKind::Typedef)
            .expect("found"),
        3
    );
    assert!(btf.id_skeleton(&[(KIND_FUNC, "missing")]).is_none());
}

#[test]
fn bitfields_are_refused() {
    let (_, o) = blob(&["int", "s", "flag"], &[]);
    let types = vec![
        (o[0], KIND_INT << 24, 4, 0x20u32.to_le_bytes().to_vec()),
        // kind_flag set: member offset = (bitfield size 1 << 24) | bit 3
        (
            o[1],
            (1 << 31) | (KIND_STRUCT << 24) | 1,
            4,
            member(o[2], 1, (1 << 24) | 3),
        ),
    ];
    let (data, _) = blob(&["int", "s", "flag"], &types);
    let btf = Btf::parse(&data).expect("parse");
    assert_eq!(
        btf.member_offset("s", "flag"),
        Err(BtfError::Bitfield("flag".into()))
    );
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert_eq!(Btf::parse(b"").err(), Some(BtfError::BadHeader));
    assert_eq!(Btf::parse(&[0u8; 64]).err(), Some(BtfError::BadHeader));
    let (mut d, _) = blob(&["a"], &[(1, KIND_INT << 24, 4, vec![0, 0, 0, 0])]);
    d.truncate(d.len() - 3);
    assert!(Btf::parse(&d).is_err());
}

#[test]
fn running_kernel_offsets_resolve_when_btf_exists() {
    let Ok(res) = Btf::from_sys_fs() else {
        eprintln!("no /sys/kernel/btf/vmlinux here: nothing to check");
        return;
    };
    let btf = res.expect("kernel BTF parses");
    let (r, errors) = Resolved::resolve(&btf);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(r.task && r.sock);
    let o = r.offsets;
    assert!(o.task_nsproxy > 0 && o.task_group_leader > 0 && o.task_start_time > 0);
    // struct sock_common opens struct sock: the addresses come first (include/net/sock.h).
    assert_eq!(o.skc_daddr, 0);
    assert_eq!(o.skc_rcv_saddr, 4);
    assert!(o.inet_sport > o.skc_net && o.tcp_write_seq > o.inet_sport);
}

mod speed {
    #[test]
    #[ignore = "timing probe, run by hand"]
    fn parse_time() {
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let data = std::fs::read("/sys/kernel/btf/vmlinux").expect("read");
            let r = t.elapsed();
            let b = super::Btf::parse(&data).expect("parse");
            let p = t.elapsed();
            let (res, _) = super::Resolved::resolve(&b);
            eprintln!(
                "read {r:?} parse {p:?} resolve {:?} sock {}",
                t.elapsed(),
                res.sock
            );
            let t = std::time::Instant::now();
            let sk = b
                .id_skeleton(&[
                    (super::KIND_TYPEDEF, "btf_trace_inet_sock_set_state"),
                    (super::KIND_FUNC, "tcp_v4_connect"),
                ])
                .expect("sk");
            let a = t.elapsed();
            let aya = aya::Btf::parse(&sk, aya::Endianness::default()).expect("aya");
            eprintln!(
                "skeleton {a:?} ({} bytes) aya parse {:?}",
                sk.len(),
                t.elapsed()
            );
            let t = std::time::Instant::now();
            let id = aya.id_by_type_name_kind(
                "btf_trace_inet_sock_set_state",
                aya_obj::btf::BtfKind::Typedef,
            );
            eprintln!("aya lookup {:?} {id:?}", t.elapsed());
        }
    }
}
