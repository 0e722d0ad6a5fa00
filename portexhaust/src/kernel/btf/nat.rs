//! What the source-NAT drop program (`tp_btf/kfree_skb`) needs of the kernel's BTF: the drop
//! reason's value, the tracepoint's arity, and the `sk_buff` / `nf_conn` offsets.
use portexhaust_common::{NatOffsets, nat::tuple};

use super::{Btf, KIND_ENUM, KIND_ENUM64, KIND_FUNC_PROTO, KIND_PTR, KIND_STRUCT, KIND_TYPEDEF};

impl Btf {
    /// The value of an enumerator, searched in every enum (`SKB_DROP_REASON_NETFILTER_DROP`:
    /// the numbering of `enum skb_drop_reason` changes between kernels).
    pub fn enumerator(&self, name: &str) -> Option<i64> {
        for id in 1..self.offs.len() as u32 {
            let Some(r) = self.rec(id) else { continue };
            let step = match r.kind {
                KIND_ENUM => 8,
                KIND_ENUM64 => 12,
                _ => continue,
            };
            for i in 0..r.vlen {
                let m = r.extra + i * step;
                let Ok(name_off) = super::u32_at(self.types(), m) else {
                    break;
                };
                if super::str_at(self.strings(), name_off) != name {
                    continue;
                }
                let lo = super::u32_at(self.types(), m + 4).ok()?;
                return Some(if r.kind == KIND_ENUM {
                    i64::from(lo as i32)
                } else {
                    let hi = super::u32_at(self.types(), m + 8).ok()?;
                    ((u64::from(hi) << 32) | u64::from(lo)) as i64
                });
            }
        }
        None
    }

    /// Size in bytes of the struct with members of this name.
    pub fn struct_size(&self, name: &str) -> Option<u32> {
        let r = self.rec(self.struct_id(name)?)?;
        (r.kind == KIND_STRUCT).then_some(r.size_or_type)
    }

    /// Parameters of the function pointer a `btf_trace_*` typedef names (the first is the
    /// tracepoint's `void *` context).
    pub fn typedef_params(&self, typedef: &str) -> Option<usize> {
        let id = self.id_of(KIND_TYPEDEF, typedef)?;
        let ptr = self.rec(id)?.size_or_type;
        let r = self.rec(self.resolve(ptr))?;
        if r.kind != KIND_PTR {
            return None;
        }
        let proto = self.rec(self.resolve(r.size_or_type))?;
        (proto.kind == KIND_FUNC_PROTO).then_some(proto.vlen)
    }
}

/// The value of `SKB_DROP_REASON_NETFILTER_DROP`, or why the `kfree_skb` hook cannot tell
/// netfilter drops here.
pub fn kfree_skb_reason(btf: &Btf) -> Result<u32, String> {
    // tp_btf arguments are (ctx, skb, location, reason[, rx_sk]): the reason came with
    // kfree_skb_reason() in 5.17; before it the tracepoint had no reason to filter on.
    let params = btf
        .typedef_params("btf_trace_kfree_skb")
        .ok_or("the kernel's BTF has no skb:kfree_skb tracepoint (btf_trace_kfree_skb)")?;
    if params < 4 {
        return Err(format!(
            "skb:kfree_skb has no drop reason on this kernel ({} arguments; the reason needs 5.17+)",
            params.saturating_sub(1)
        ));
    }
    let reason = btf
        .enumerator("SKB_DROP_REASON_NETFILTER_DROP")
        .ok_or("the kernel's BTF has no SKB_DROP_REASON_NETFILTER_DROP")?;
    u32::try_from(reason).map_err(|_| "odd drop reason value".to_string())
}

/// The conntrack offsets of [`NatOffsets`] (both NAT hooks read the same `sk_buff` and
/// `nf_conn` fields), or why this kernel's BTF does not have them. `reason_netfilter_drop` is
/// left at `u32::MAX` (matches no drop): [`kfree_skb_reason`] fills it where it exists.
pub fn resolve(btf: &Btf) -> Result<NatOffsets, String> {
    let m = |ty: &str, path: &str| {
        btf.member_offset(ty, path)
            .map_err(|e| format!("the kernel's BTF lacks a field the NAT program reads: {e}"))
    };
    let o = NatOffsets {
        reason_netfilter_drop: u32::MAX,
        // Only with CONFIG_NF_CONNTRACK.
        skb_nfct: m("sk_buff", "_nfct")?,
        ct_status: m("nf_conn", "status")?,
        ct_net: m("nf_conn", "ct_net.net")?,
        ct_tuplehash: m("nf_conn", "tuplehash")?,
        tuplehash_size: btf
            .struct_size("nf_conntrack_tuple_hash")
            .ok_or("the kernel's BTF has no struct nf_conntrack_tuple_hash")?,
        tuplehash_tuple: m("nf_conntrack_tuple_hash", "tuple")?,
        net_ns_inum: m("net", "ns.inum")?,
    };
    // The program reads the tuple as ten u32 words at fixed places: check them.
    let layout = [
        ("src.u3", tuple::SRC_U3),
        ("src.u", tuple::SRC_PORT),
        ("src.l3num", tuple::SRC_L3NUM),
        ("dst.u3", tuple::DST_U3),
        ("dst.u", tuple::DST_PORT),
        ("dst.protonum", tuple::DST_PROTONUM),
    ];
    for (path, want) in layout {
        let got = m("nf_conntrack_tuple", path)?;
        if got != want {
            return Err(format!(
                "struct nf_conntrack_tuple.{path} is at {got}, the NAT program expects {want}"
            ));
        }
    }
    if btf.struct_size("nf_conntrack_tuple") != Some(tuple::SIZE) {
        return Err("struct nf_conntrack_tuple is not 40 bytes".into());
    }
    // hlist_nulls_node { next, pprev } starts the tuple hash: the program reads pprev at +8.
    if m("nf_conntrack_tuple_hash", "hnnode.pprev")? != 8 {
        return Err("nf_conntrack_tuple_hash.hnnode.pprev is not at 8".into());
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF (readable without root), where there is one: the program's
    /// assumptions hold, and the reason has a value. On 6.18: reason 12, `_nfct` at 104,
    /// `tuplehash` at 16, `status` at 128, `ct_net` at 136, a tuple hash of 56 bytes with its
    /// tuple at 16.
    #[test]
    fn resolves_on_this_kernel() {
        let Ok(Ok(btf)) = Btf::from_sys_fs() else {
            eprintln!("no readable kernel BTF here: nothing to check");
            return;
        };
        match resolve(&btf) {
            Ok(o) => {
                assert_eq!(
                    o.reason_netfilter_drop,
                    u32::MAX,
                    "filled by the loader: {o:?}"
                );
                if let Ok(reason) = kfree_skb_reason(&btf) {
                    assert!(reason > 0);
                }
                assert_eq!(o.tuplehash_size, 56, "{o:?}");
                assert_eq!(o.tuplehash_tuple, 16, "{o:?}");
                assert!(o.ct_status > o.ct_tuplehash, "{o:?}");
            }
            // A kernel without conntrack in its BTF, or before 5.17: said, not a failure.
            Err(why) => eprintln!("NAT program not available here: {why}"),
        }
    }
}
