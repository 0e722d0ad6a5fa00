//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find the
//! byte offset of a struct member, so the eBPF programs can follow `current->nsproxy->net_ns`
//! without offsets fixed for one kernel build (Rust eBPF emits no CO-RE relocations; the
//! offsets are resolved here at load time and handed over as globals).
//!
//! Format: include/uapi/linux/btf.h. Only what member lookup needs is decoded; every other
//! kind is skipped by its documented size.
use std::collections::HashMap;

use portexhaust_common::Offsets;
use thiserror::Error;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF data is truncated")]
    Truncated,
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    #[error("struct {0} not found in BTF")]
    NoStruct(String),
    #[error("member {member} not found in struct {ty}")]
    NoMember { ty: String, member: String },
    #[error("member {0} is a bitfield")]
    Bitfield(String),
}

const KIND_INT: u32 = 1;
pub const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
pub const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
pub const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// What a member is, as far as reading it from eBPF needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// An integer of this many bytes.
    Int(u32),
    /// An array of `len` integers of `size` bytes each.
    IntArray {
        size: u32,
        len: u32,
    },
    Other,
}

/// The kernel's BTF, walked once for where each type's record starts; a record is decoded
/// only when a lookup needs it (vmlinux has ~130k types, the programs need a dozen structs:
/// decoding every member name cost 20 ms of start-up).
pub struct Btf {
    /// The whole blob; `types` and `strings` are ranges of it.
    data: Vec<u8>,
    types: std::ops::Range<usize>,
    strings: std::ops::Range<usize>,
    /// Record offset in `types` of each type id; index 0 is void.
    offs: Vec<u32>,
    /// Structs with members by a hash of their name (the name is checked on lookup).
    structs: HashMap<u64, u32>,
}

fn name_hash(name: &[u8]) -> u64 {
    // FNV-1a: a few nanoseconds per name, ~12k names.
    name.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn cstr_at(strings: &[u8], off: u32) -> &[u8] {
    let rest = strings.get(off as usize..).unwrap_or(&[]);
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    &rest[..end]
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated)
}

fn str_at(strings: &[u8], off: u32) -> &str {
    let start = off as usize;
    let Some(rest) = strings.get(start..) else {
        return "";
    };
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).unwrap_or("")
}

/// A decoded record header: kind, vlen, kind_flag, size_or_type, where its extra data starts.
struct Rec {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
    extra: usize,
}

impl Btf {
    pub fn from_sys_fs() -> std::io::Result<Result<Self, BtfError>> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Ok(Self::parse_owned(data))
    }

    /// Parse little-endian BTF (the only byte order of the machines we load on).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        Self::parse_owned(data.to_vec())
    }

    fn parse_owned(data: Vec<u8>) -> Result<Self, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::BadHeader);
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let str_len = u32_at(&data, 20)? as usize;
        let types_r = hdr_len + type_off..hdr_len + type_off + type_len;
        let strings_r = hdr_len + str_off..hdr_len + str_off + str_len;
        let types_b = data.get(types_r.clone()).ok_or(BtfError::Truncated)?;
        let strings = data.get(strings_r.clone()).ok_or(BtfError::Truncated)?;

        let mut offs = vec![0u32];
        let mut structs = HashMap::new();
        let mut off = 0usize;
        while off < types_b.len() {
            let name_off = u32_at(types_b, off)?;
            let info = u32_at(types_b, off + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let id = offs.len() as u32;
            offs.push(off as u32);
            let extra = match kind {
                KIND_STRUCT | KIND_UNION => {
                    // The first definition with members wins (vmlinux has one per name).
                    if kind == KIND_STRUCT && vlen > 0 {
                        let name = cstr_at(strings, name_off);
                        if !name.is_empty() {
                            structs.entry(name_hash(name)).or_insert(id);
                        }
                    }
                    vlen * 12
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_PTR | KIND_FWD | KIND_FUNC | KIND_FLOAT | KIND_TYPEDEF | KIND_VOLATILE
                | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => 0,
                k => return Err(BtfError::UnknownKind(k)),
            };
            off += 12 + extra;
            if off > types_b.len() {
                return Err(BtfError::Truncated);
            }
        }
        Ok(Self {
            data,
            types: types_r,
            strings: strings_r,
            offs,
            structs,
        })
    }

    fn types(&self) -> &[u8] {
        &self.data[self.types.clone()]
    }

    fn strings(&self) -> &[u8] {
        &self.data[self.strings.clone()]
    }

    /// The struct with members of this name.
    fn struct_id(&self, name: &str) -> Option<u32> {
        let id = *self.structs.get(&name_hash(name.as_bytes()))?;
        let r = self.rec(id)?;
        if str_at(self.strings(), r.name_off) == name {
            return Some(id);
        }
        // A hash collision (none in the kernels seen): look the slow way.
        (1..self.offs.len() as u32).find(|&i| {
            self.rec(i).is_some_and(|r| {
                r.kind == KIND_STRUCT && r.vlen > 0 && str_at(self.strings(), r.name_off) == name
            })
        })
    }

    fn rec(&self, id: u32) -> Option<Rec> {
        let off = *self.offs.get(id as usize)? as usize;
        if id == 0 {
            return None;
        }
        let info = u32_at(self.types(), off + 4).ok()?;
        Some(Rec {
            name_off: u32_at(self.types(), off).ok()?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: u32_at(self.types(), off + 8).ok()?,
            extra: off + 12,
        })
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.rec(id) {
                Some(r)
                    if matches!(
                        r.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = r.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// Members of composite type `id`: (name, type, bit offset or None for a bitfield).
    fn members(&self, id: u32) -> Option<Vec<(&str, u32, Option<u32>)>> {
        let r = self.rec(self.resolve(id))?;
        if r.kind != KIND_STRUCT && r.kind != KIND_UNION {
            return None;
        }
        let mut out = Vec::with_capacity(r.vlen);
        for i in 0..r.vlen {
            let m = r.extra + i * 12;
            let raw_off = u32_at(self.types(), m + 8).ok()?;
            // With kind_flag the top 8 bits hold a bitfield size (0 = not one).
            let (bit_offset, bitfield) = if r.kind_flag {
                (raw_off & 0xff_ffff, raw_off >> 24 != 0)
            } else {
                (raw_off, false)
            };
            out.push((
                str_at(self.strings(), u32_at(self.types(), m).ok()?),
                u32_at(self.types(), m + 4).ok()?,
                (!bitfield).then_some(bit_offset),
            ));
        }
        Some(out)
    }

    /// Find `name` among the members of composite type `id`, looking into anonymous
    /// struct/union members as C does. Returns the bit offset and member type.
    fn find(&self, id: u32, name: &str, depth: u32) -> Option<Result<(u32, u32), ()>> {
        let members = self.members(id)?;
        for (n, ty, bit) in &members {
            if *n == name {
                return Some(bit.map(|b| (b, *ty)).ok_or(()));
            }
        }
        if depth > 8 {
            return None;
        }
        for (_, ty, bit) in members.iter().filter(|m| m.0.is_empty()) {
            if let Some(found) = self.find(*ty, name, depth + 1) {
                return Some(match (found, bit) {
                    (Ok((b, t)), Some(base)) => Ok((base + b, t)),
                    _ => Err(()),
                });
            }
        }
        None
    }

    /// The id of the type of this kind and name (`KIND_*` numbers of include/uapi/linux/btf.h:
    /// 8 typedef, 12 func), for attaching to it.
    pub fn id_of(&self, kind: u32, name: &str) -> Option<u32> {
        (1..self.offs.len() as u32).find(|&id| {
            self.rec(id)
                .is_some_and(|r| r.kind == kind && str_at(self.strings(), r.name_off) == name)
        })
    }

    /// A BTF blob in which each of `wanted` (kind, name) has the id it has in this BTF, and every
    /// other id is a placeholder pointer: enough for a loader that only asks "which id has this
    /// name" (aya's tp_btf and fentry loads), for the cost of parsing placeholders rather than
    /// all of vmlinux's types.
    pub fn id_skeleton(&self, wanted: &[(u32, &str)]) -> Option<Vec<u8>> {
        // One pass over the types for all names (vmlinux has ~130k of them).
        let mut found: Vec<(u32, u32, &str)> = Vec::new();
        for id in 1..self.offs.len() as u32 {
            let Some(r) = self.rec(id) else { continue };
            if !wanted.iter().any(|w| w.0 == r.kind) {
                continue;
            }
            let name = str_at(self.strings(), r.name_off);
            if let Some(&(kind, n)) = wanted
                .iter()
                .find(|w| w.0 == r.kind && w.1 == name && !found.iter().any(|f| f.2 == w.1))
            {
                found.push((id, kind, n));
                if found.len() == wanted.len() {
                    break;
                }
            }
        }
        let last = found.iter().map(|f| f.0).max()?;
        let mut strings = vec![0u8];
        let mut types = Vec::with_capacity(last as usize * 12);
        for id in 1..=last {
            let (name_off, info) = match found.iter().find(|f| f.0 == id) {
                Some(&(_, kind, name)) => {
                    let off = strings.len() as u32;
                    strings.extend_from_slice(name.as_bytes());
                    strings.push(0);
                    // A func's info carries its linkage in vlen; 0 (static) is fine here.
                    (off, kind << 24)
                }
                None => (0, KIND_PTR << 24),
            };
            for v in [name_off, info, 0] {
                types.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut d = vec![0x9f, 0xeb, 1, 0];
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.extend_from_slice(&types);
        d.extend_from_slice(&strings);
        Some(d)
    }

    /// Byte offset of a member path inside a struct, e.g. `("net", "ns.inum")`.
    pub fn member_offset(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        self.member(ty, path).map(|(off, _)| off)
    }

    fn shape_of(&self, id: u32) -> Shape {
        let Some(r) = self.rec(self.resolve(id)) else {
            return Shape::Other;
        };
        match r.kind {
            KIND_INT => Shape::Int(r.size_or_type),
            KIND_ARRAY => {
                // struct btf_array { type, index_type, nelems }
                let (Ok(elem), Ok(len)) = (
                    u32_at(self.types(), r.extra),
                    u32_at(self.types(), r.extra + 8),
                ) else {
                    return Shape::Other;
                };
                match self.rec(self.resolve(elem)) {
                    Some(e) if e.kind == KIND_INT => Shape::IntArray {
                        size: e.size_or_type,
                        len,
                    },
                    _ => Shape::Other,
                }
            }
            _ => Shape::Other,
        }
    }

    /// Byte offset and shape of a member path inside a struct.
    pub fn member(&self, ty: &str, path: &str) -> Result<(u32, Shape), BtfError> {
        let mut id = self
            .struct_id(ty)
            .ok_or_else(|| BtfError::NoStruct(ty.to_string()))?;
        let mut total_bits = 0u32;
        for part in path.split('.') {
            match self.find(id, part, 0) {
                Some(Ok((bits, mty))) => {
                    total_bits += bits;
                    id = mty;
                }
                Some(Err(())) => return Err(BtfError::Bitfield(part.to_string())),
                None => {
                    return Err(BtfError::NoMember {
                        ty: ty.to_string(),
                        member: path.to_string(),
                    });
                }
            }
        }
        if !total_bits.is_multiple_of(8) {
            return Err(BtfError::Bitfield(path.to_string()));
        }
        Ok((total_bits / 8, self.shape_of(id)))
    }
}

/// Which groups of kernel struct offsets the running kernel's BTF gave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub offsets: Offsets,
    /// `task_struct` -> netns and process start time.
    pub task: bool,
    /// `struct sock` fields (the state hook's direct loads, the bound-socket cause, the
    /// socket's own namespace). The tp-btf and raw-tp backends cannot run without them.
    pub sock: bool,
}

impl Resolved {
    /// Every offset the programs use. Task and sock groups resolve separately: a kernel whose
    /// BTF lacks one group still gets the other. Errors say which member was missing.
    pub fn resolve(btf: &Btf) -> (Self, Vec<BtfError>) {
        let mut o = Offsets::default();
        let mut errors = Vec::new();
        // net.ns.inum is needed by both groups.
        let inum = btf.member_offset("net", "ns.inum");
        let task = (|| -> Result<(), BtfError> {
            o.net_ns_inum = inum.clone()?;
            o.task_nsproxy = btf.member_offset("task_struct", "nsproxy")?;
            o.nsproxy_net_ns = btf.member_offset("nsproxy", "net_ns")?;
            o.task_group_leader = btf.member_offset("task_struct", "group_leader")?;
            // ns since boot including suspend (5.5+): the clock /proc/PID/stat derives its
            // start time from, so the two can be compared.
            o.task_start_time = btf.member_offset("task_struct", "start_boottime")?;
            Ok(())
        })();
        let sock = (|| -> Result<(), BtfError> {
            o.net_ns_inum = inum.clone()?;
            let skc = |m: &str| btf.member_offset("sock", &format!("__sk_common.{m}"));
            o.skc_daddr = skc("skc_daddr")?;
            o.skc_rcv_saddr = skc("skc_rcv_saddr")?;
            o.skc_dport = skc("skc_dport")?;
            o.skc_num = skc("skc_num")?;
            o.skc_family = skc("skc_family")?;
            o.skc_v6_daddr = skc("skc_v6_daddr")?;
            o.skc_v6_rcv_saddr = skc("skc_v6_rcv_saddr")?;
            // possible_net_t { struct net *net; } with CONFIG_NET_NS.
            o.skc_net = skc("skc_net.net")?;
            // A plain u16 since 5.6 (a bitfield before, which member_offset refuses).
            o.sk_protocol = btf.member_offset("sock", "sk_protocol")?;
            o.sk_err = btf.member_offset("sock", "sk_err")?;
            // inet_sock and tcp_sock begin with struct sock: one base address for all.
            o.inet_sport = btf.member_offset("inet_sock", "inet_sport")?;
            o.tcp_write_seq = btf.member_offset("tcp_sock", "write_seq")?;
            o.socket_type = btf.member_offset("socket", "type")?;
            // The namespace's ip_local_port_range: `u32 range` (lo | hi << 16) since 6.7,
            // `int range[2]` before (include/net/netns/ipv4.h, struct local_ports).
            let (off, shape) = btf.member("net", "ipv4.ip_local_ports.range")?;
            o.net_port_range = off;
            o.port_range_packed = match shape {
                Shape::Int(4) => 1,
                Shape::IntArray { size: 4, len: 2 } => 0,
                _ => {
                    return Err(BtfError::NoMember {
                        ty: "net".into(),
                        member: "ipv4.ip_local_ports.range (neither u32 nor int[2])".into(),
                    });
                }
            };
            Ok(())
        })();
        if let Err(e) = &task {
            errors.push(e.clone());
        }
        if let Err(e) = &sock {
            errors.push(e.clone());
        }
        (
            Self {
                offsets: o,
                task: task.is_ok(),
                sock: sock.is_ok(),
            },
            errors,
        )
    }
}

pub mod nat;

#[cfg(test)]
mod tests;
