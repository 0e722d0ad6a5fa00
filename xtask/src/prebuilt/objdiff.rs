//! Do two eBPF objects hold the same programs, maps and types?
//!
//! Byte equality is too strict between checkouts: the object carries DWARF, and its BTF string
//! table carries the line info's source paths and source lines, so the same sources built in
//! /work/main and in /work/wt-x differ in bytes (and a comment edit moves line numbers). What
//! the kernel gets is compared instead:
//! - every section that is not debug info, BTF or a symbol table: name, kind and contents
//!   (the programs' instructions, `.maps`, `.rodata`, `license`, aya-log's records);
//! - their relocations, by target symbol name (map and BPF-to-BPF call references);
//! - the symbols (programs, maps, functions), without file symbols;
//! - the BTF types with every name resolved to its string (so that string-table layout does
//!   not matter), and the BTF.ext function info.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SymbolKind};

/// What is compared, in a form where equal means "the same to the kernel".
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub sections: BTreeMap<String, String>,
    pub relocations: BTreeMap<String, Vec<String>>,
    pub symbols: Vec<String>,
    pub btf_types: Vec<String>,
    pub func_info: Vec<String>,
}

/// Sections that are not part of the comparison (see the module comment).
fn skipped(name: &str) -> bool {
    name.is_empty()
        || name.starts_with(".debug")
        || name.starts_with(".rel")
        || name.starts_with(".BTF")
        || matches!(name, ".symtab" | ".strtab" | ".shstrtab" | ".llvm_addrsig")
}

pub fn summarise(data: &[u8]) -> Result<Summary> {
    let file = object::File::parse(data).context("not an ELF object")?;
    let mut sections = BTreeMap::new();
    let mut relocations = BTreeMap::new();
    let mut btf = None;
    let mut btf_ext = None;
    for s in file.sections() {
        let name = s.name().unwrap_or("").to_string();
        match name.as_str() {
            ".BTF" => btf = Some(s.data()?.to_vec()),
            ".BTF.ext" => btf_ext = Some(s.data()?.to_vec()),
            _ => {}
        }
        if skipped(&name) {
            continue;
        }
        // .bss and friends have no bytes in the file: their size is what matters.
        let contents = match s.kind() {
            object::SectionKind::UninitializedData | object::SectionKind::UninitializedTls => {
                format!("{} bytes, uninitialised", s.size())
            }
            _ => hex(s.data()?),
        };
        sections.insert(name.clone(), format!("{:?} {contents}", s.kind()));
        let mut rels = Vec::new();
        for (offset, r) in s.relocations() {
            let target = match r.target() {
                RelocationTarget::Symbol(i) => file
                    .symbol_by_index(i)
                    .ok()
                    .map(|sym| symbol_name(&file, &sym))
                    .unwrap_or_else(|| format!("symbol #{}", i.0)),
                other => format!("{other:?}"),
            };
            rels.push(format!(
                "{offset:#x} {target} {:?} {}",
                r.flags(),
                r.addend()
            ));
        }
        if !rels.is_empty() {
            relocations.insert(name, rels);
        }
    }
    let mut symbols: Vec<String> = file
        .symbols()
        .filter(|s| !matches!(s.kind(), SymbolKind::File | SymbolKind::Section))
        .map(|s| {
            format!(
                "{} in {} at {:#x} size {} {:?}{}",
                symbol_name(&file, &s),
                s.section_index()
                    .and_then(|i| file.section_by_index(i).ok())
                    .and_then(|sec| sec.name().ok().map(str::to_string))
                    .unwrap_or_else(|| "-".into()),
                s.address(),
                s.size(),
                s.kind(),
                if s.is_global() { " global" } else { "" }
            )
        })
        .collect();
    symbols.sort();
    let btf = btf.context("the object has no .BTF section")?;
    let (btf_types, strings) = btf_types(&btf)?;
    let func_info = match btf_ext {
        Some(ext) => func_info(&ext, &strings)?,
        None => Vec::new(),
    };
    Ok(Summary {
        sections,
        relocations,
        symbols,
        btf_types,
        func_info,
    })
}

/// A symbol's name; an unnamed one (a section symbol LLVM points relocations at) by its
/// section's name.
fn symbol_name(file: &object::File, s: &object::Symbol) -> String {
    match s.name() {
        Ok(n) if !n.is_empty() => n.to_string(),
        _ => s
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
            .and_then(|sec| sec.name().ok().map(|n| format!("[section {n}]")))
            .unwrap_or_else(|| "[unnamed]".into()),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    let bytes = b
        .get(off..off + 4)
        .with_context(|| format!("BTF truncated at byte {off}"))?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// The NUL-terminated string at `off` of a BTF string table.
fn string_at(strings: &[u8], off: u32) -> String {
    let rest = strings.get(off as usize..).unwrap_or(&[]);
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

const BTF_KINDS: [&str; 20] = [
    "UNKN",
    "INT",
    "PTR",
    "ARRAY",
    "STRUCT",
    "UNION",
    "ENUM",
    "FWD",
    "TYPEDEF",
    "VOLATILE",
    "CONST",
    "RESTRICT",
    "FUNC",
    "FUNC_PROTO",
    "VAR",
    "DATASEC",
    "FLOAT",
    "DECL_TAG",
    "TYPE_TAG",
    "ENUM64",
];

/// Every BTF type as one line with its names spelt out, and the string table.
fn btf_types(btf: &[u8]) -> Result<(Vec<String>, Vec<u8>)> {
    if btf.len() < 24 || u16::from_le_bytes([btf[0], btf[1]]) != 0xeb9f {
        bail!("the .BTF section has no little-endian BTF header");
    }
    let hdr_len = u32_at(btf, 4)? as usize;
    let type_off = hdr_len + u32_at(btf, 8)? as usize;
    let type_len = u32_at(btf, 12)? as usize;
    let str_off = hdr_len + u32_at(btf, 16)? as usize;
    let str_len = u32_at(btf, 20)? as usize;
    let strings = btf
        .get(str_off..str_off + str_len)
        .context("BTF string table out of bounds")?
        .to_vec();
    let types = btf
        .get(type_off..type_off + type_len)
        .context("BTF type section out of bounds")?;
    let name = |off: u32| string_at(&strings, off);
    let mut out = Vec::new();
    let mut at = 0;
    while at < types.len() {
        let name_off = u32_at(types, at)?;
        let info = u32_at(types, at + 4)?;
        let size_or_type = u32_at(types, at + 8)?;
        at += 12;
        let vlen = (info & 0xffff) as usize;
        let kind = ((info >> 24) & 0x1f) as usize;
        let mut line = format!(
            "[{}] {} {:?} info={info:#x} {size_or_type}",
            out.len() + 1,
            BTF_KINDS.get(kind).copied().unwrap_or("?"),
            name(name_off)
        );
        // Kind-specific data after the common 12 bytes; names in it are resolved too.
        match kind {
            1 | 14 | 17 => {
                line += &format!(" {:#x}", u32_at(types, at)?);
                at += 4;
            }
            3 => {
                line += &format!(
                    " elem {} index {} n {}",
                    u32_at(types, at)?,
                    u32_at(types, at + 4)?,
                    u32_at(types, at + 8)?
                );
                at += 12;
            }
            4 | 5 => {
                for _ in 0..vlen {
                    line += &format!(
                        " {:?}:{}@{}",
                        name(u32_at(types, at)?),
                        u32_at(types, at + 4)?,
                        u32_at(types, at + 8)?
                    );
                    at += 12;
                }
            }
            6 => {
                for _ in 0..vlen {
                    line += &format!(" {:?}={}", name(u32_at(types, at)?), u32_at(types, at + 4)?);
                    at += 8;
                }
            }
            13 => {
                for _ in 0..vlen {
                    line += &format!(" {:?}:{}", name(u32_at(types, at)?), u32_at(types, at + 4)?);
                    at += 8;
                }
            }
            15 => {
                for _ in 0..vlen {
                    line += &format!(
                        " var {} at {} size {}",
                        u32_at(types, at)?,
                        u32_at(types, at + 4)?,
                        u32_at(types, at + 8)?
                    );
                    at += 12;
                }
            }
            19 => {
                for _ in 0..vlen {
                    line += &format!(
                        " {:?}={:#x}{:08x}",
                        name(u32_at(types, at)?),
                        u32_at(types, at + 8)?,
                        u32_at(types, at + 4)?
                    );
                    at += 12;
                }
            }
            2 | 7..=12 | 16 | 18 => {}
            k => bail!("BTF type {} has unknown kind {k}", out.len() + 1),
        }
        out.push(line);
    }
    Ok((out, strings))
}

/// BTF.ext function info: for each program section, which BTF function starts at which
/// instruction. (Line info is left out: it names source files and lines, not code.)
fn func_info(ext: &[u8], strings: &[u8]) -> Result<Vec<String>> {
    if ext.len() < 16 || u16::from_le_bytes([ext[0], ext[1]]) != 0xeb9f {
        bail!("the .BTF.ext section has no little-endian header");
    }
    let hdr_len = u32_at(ext, 4)? as usize;
    let off = hdr_len + u32_at(ext, 8)? as usize;
    let len = u32_at(ext, 12)? as usize;
    let info = ext
        .get(off..off + len)
        .context("BTF.ext func_info out of bounds")?;
    if info.len() < 4 {
        return Ok(Vec::new());
    }
    let rec_size = u32_at(info, 0)? as usize;
    if rec_size < 8 {
        bail!("BTF.ext func_info record size {rec_size}");
    }
    let mut out = Vec::new();
    let mut at = 4;
    while at < info.len() {
        let sec = string_at(strings, u32_at(info, at)?);
        let n = u32_at(info, at + 4)? as usize;
        at += 8;
        for _ in 0..n {
            out.push(format!(
                "{sec} insn {} type {}",
                u32_at(info, at)?,
                u32_at(info, at + 4)?
            ));
            at += rec_size;
        }
    }
    Ok(out)
}

/// What differs between the checked-in object and a fresh build, one line each (empty: the
/// same to the kernel).
pub fn differences(checked_in: &[u8], fresh: &[u8]) -> Result<Vec<String>> {
    if checked_in == fresh {
        return Ok(Vec::new());
    }
    let a = summarise(checked_in).context("the checked-in object")?;
    let b = summarise(fresh).context("the fresh build")?;
    let mut out = Vec::new();
    for (name, what) in &a.sections {
        match b.sections.get(name) {
            None => out.push(format!("section {name} is gone")),
            Some(w) if w != what => out.push(format!("section {name} changed")),
            _ => {}
        }
    }
    for name in b.sections.keys().filter(|n| !a.sections.contains_key(*n)) {
        out.push(format!("section {name} is new"));
    }
    if a.relocations != b.relocations {
        out.push("relocations changed".into());
    }
    list_diff(&mut out, "symbol", &a.symbols, &b.symbols);
    list_diff(&mut out, "BTF type", &a.btf_types, &b.btf_types);
    list_diff(&mut out, "BTF function info", &a.func_info, &b.func_info);
    Ok(out)
}

/// Lines only in one of two lists, at most a few of each (the rest counted).
fn list_diff(out: &mut Vec<String>, what: &str, a: &[String], b: &[String]) {
    let before = out.len();
    let gone: Vec<_> = a.iter().filter(|x| !b.contains(x)).collect();
    let new: Vec<_> = b.iter().filter(|x| !a.contains(x)).collect();
    for (label, items) in [
        ("only in the checked-in object", gone),
        ("only in the fresh build", new),
    ] {
        for x in items.iter().take(5) {
            out.push(format!("{what} {label}: {x}"));
        }
        if items.len() > 5 {
            out.push(format!("... and {} more {what}s {label}", items.len() - 5));
        }
    }
    if out.len() == before && a != b {
        out.push(format!("{what}s are in another order"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: header, `types`, then `strings`.
    fn btf_blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_len = (types.len() * 4) as u32;
        let mut b = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, type_len, type_len, strings.len() as u32] {
            b.extend(v.to_le_bytes());
        }
        for t in types {
            b.extend(t.to_le_bytes());
        }
        b.extend(strings);
        b
    }

    #[test]
    fn btf_names_are_compared_as_strings_not_offsets() {
        // INT "u32" size 4 (encoding word 32 bits), STRUCT "s" with member "a": type 1 at 0.
        let int = |name: u32| [name, 1 << 24, 4, 32];
        let strukt = |name: u32, member: u32| [name, (4 << 24) | 1, 4, member, 1, 0];
        // Same types; the second table has a source path first, shifting every offset.
        let a = btf_blob(&[&int(1)[..], &strukt(5, 7)[..]].concat(), b"\0u32\0s\0a\0");
        let b = btf_blob(
            &[&int(16)[..], &strukt(20, 22)[..]].concat(),
            b"\0/work/x/src.rs\0u32\0s\0a\0",
        );
        let (ta, _) = btf_types(&a).expect("a");
        let (tb, _) = btf_types(&b).expect("b");
        assert_eq!(ta, tb);
        assert_eq!(ta[1], "[2] STRUCT \"s\" info=0x4000001 4 \"a\":1@0");
        // A renamed member is a difference.
        let c = btf_blob(&[&int(1)[..], &strukt(5, 7)[..]].concat(), b"\0u32\0s\0b\0");
        assert_ne!(ta, btf_types(&c).expect("c").0);
    }

    /// The file range of the first section whose name satisfies `pick`.
    fn section_range(data: &[u8], pick: impl Fn(&str) -> bool) -> (usize, usize) {
        let file = object::File::parse(data).expect("ELF");
        let s = file
            .sections()
            .find(|s| s.name().is_ok_and(&pick) && s.size() > 16)
            .expect("section");
        let (off, size) = s.file_range().expect("in the file");
        (off as usize, size as usize)
    }

    /// On the real checked-in objects: debug info may change, code may not.
    #[test]
    fn debug_info_is_not_a_difference_code_is() {
        let root = crate::setup::workspace_root();
        let x86 =
            std::fs::read(super::super::prebuilt_path(&root, "x86_64")).expect("x86_64 object");
        let arm =
            std::fs::read(super::super::prebuilt_path(&root, "aarch64")).expect("aarch64 object");
        let sum = summarise(&x86).expect("summarise");
        assert!(
            sum.btf_types.len() > 50,
            "{} BTF types",
            sum.btf_types.len()
        );
        assert!(!sum.func_info.is_empty());
        assert!(
            sum.sections.contains_key("maps"),
            "{:?}",
            sum.sections.keys()
        );
        assert!(sum.sections.keys().any(|k| k.starts_with("kprobe")));
        assert!(!sum.relocations.is_empty());

        let mut edited = x86.clone();
        let (off, _) = section_range(&x86, |n| n == ".debug_str");
        edited[off + 3] ^= 0x55;
        assert_eq!(
            differences(&x86, &edited).expect("compare"),
            Vec::<String>::new()
        );

        let mut edited = x86.clone();
        let (off, size) = section_range(&x86, |n| n.starts_with("kprobe"));
        edited[off + size / 2] ^= 0x55;
        let diffs = differences(&x86, &edited).expect("compare");
        assert!(
            diffs
                .iter()
                .any(|d| d.contains("kprobe") && d.contains("changed")),
            "{diffs:?}"
        );

        // The kprobe programs read another architecture's pt_regs.
        assert!(!differences(&x86, &arm).expect("compare").is_empty());
    }

    #[test]
    fn truncated_btf_is_an_error() {
        let mut a = btf_blob(&[1, 1 << 24, 4], b"\0u32\0");
        a.truncate(a.len() - 1);
        // The string table now runs past the end.
        assert!(btf_types(&a).is_err());
    }
}
