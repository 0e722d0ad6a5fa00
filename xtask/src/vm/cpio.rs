//! A minimal writer for the "newc" cpio format, the only one the kernel unpacks as an initramfs.
//!
//! Written here rather than driving `cpio(1)` so that the image can hold a `/dev/console` device
//! node without root and without staging a directory tree on disk; and it is left uncompressed
//! because decompressing tens of megabytes under software emulation costs boot time for nothing.
use std::{collections::BTreeMap, io::Write, path::Path};

use anyhow::{Context as _, Result, bail};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// An in-memory initramfs. Paths are absolute guest paths ("/bin/busybox"); parent directories
/// are created implicitly, and entries are written parents first, as the kernel requires.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn normalise(path: &str) -> Result<String> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("invalid path for the initramfs: {path:?}");
    }
    Ok(trimmed.to_string())
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let p = normalise(path)?;
        // Create every parent as a directory, refusing to turn a file into one.
        let mut parent = String::new();
        let comps: Vec<&str> = p.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Entry::Dir);
                }
                Some(Entry::Dir) => {}
                Some(_) => bail!("initramfs: {parent} is not a directory (needed for {p})"),
            }
        }
        match (self.entries.get(&p), &entry) {
            (Some(Entry::Dir), Entry::Dir) | (None, _) => {}
            (Some(old), new) if old == new => {}
            (Some(_), _) => bail!("initramfs: {p} added twice with different contents"),
        }
        self.entries.insert(p, entry);
        Ok(())
    }

    pub fn dir(&mut self, path: &str) -> Result<()> {
        self.insert(path, Entry::Dir)
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<()> {
        self.insert(path, Entry::File { mode, data })
    }

    /// Copy a host file (following symlinks) to `path` in the image, keeping its permission bits.
    pub fn copy_from_host(&mut self, host: &Path, path: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = std::fs::metadata(host)
            .with_context(|| format!("stat {}", host.display()))?
            .permissions()
            .mode()
            & 0o7777;
        self.file(path, mode, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(path, Entry::Symlink(target.to_string()))
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> Result<()> {
        self.insert(path, Entry::CharDev { major, minor })
    }

    pub fn contains(&self, path: &str) -> bool {
        normalise(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// Serialise as newc. BTreeMap order puts "a" before "a/b", so parents precede children.
    pub fn write_to(&self, out: &mut impl Write) -> Result<()> {
        for (ino, (path, entry)) in (1u32..).zip(self.entries.iter()) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir => (S_IFDIR | 0o755, &[], (0, 0)),
                Entry::File { mode, data } => (S_IFREG | mode, data, (0, 0)),
                Entry::Symlink(target) => (S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
                Entry::CharDev { major, minor } => (S_IFCHR | 0o600, &[], (*major, *minor)),
            };
            let nlink = if matches!(entry, Entry::Dir) { 2 } else { 1 };
            write_record(out, ino, mode, nlink, rdev, path, data)?;
        }
        write_record(out, 0, 0, 1, (0, 0), "TRAILER!!!", &[])?;
        Ok(())
    }

    pub fn write_file(&self, dest: &Path) -> Result<u64> {
        let f =
            std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        let mut w = std::io::BufWriter::new(f);
        self.write_to(&mut w)?;
        w.flush()
            .with_context(|| format!("writing {}", dest.display()))?;
        Ok(std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0))
    }
}

fn pad4(out: &mut impl Write, len: usize) -> std::io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

fn write_record(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) -> Result<()> {
    let size = u32::try_from(data.len()).context("initramfs member larger than 4 GiB")?;
    let namesize = u32::try_from(name.len() + 1).context("initramfs path too long")?;
    // Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check. mtime 0 keeps the image reproducible.
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, header.len() + name.len() + 1)?;
    out.write_all(data)?;
    pad4(out, data.len())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_records_are_aligned() {
        let mut a = Archive::new();
        a.file("/usr/bin/x", 0o755, b"hello".to_vec()).unwrap();
        a.symlink("/bin/sh", "busybox").unwrap();
        a.char_dev("/dev/console", 5, 1).unwrap();
        let mut buf = Vec::new();
        a.write_to(&mut buf).unwrap();
        assert_eq!(buf.len() % 4, 0);
        let text = String::from_utf8_lossy(&buf);
        let pos = |s: &str| text.find(s).unwrap();
        assert!(pos("usr\0") < pos("usr/bin\0"));
        assert!(pos("usr/bin\0") < pos("usr/bin/x\0"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
        // The first header is for "bin" (a directory).
        assert!(buf.starts_with(b"070701"));
        assert_eq!(&buf[14..22], format!("{:08x}", S_IFDIR | 0o755).as_bytes());
    }

    #[test]
    fn refuses_conflicts_and_bad_paths() {
        let mut a = Archive::new();
        a.file("/a", 0o644, vec![1]).unwrap();
        assert!(a.file("/a/b", 0o644, vec![]).is_err());
        assert!(a.file("/a", 0o644, vec![2]).is_err());
        assert!(a.file("/a", 0o644, vec![1]).is_ok());
        assert!(a.dir("/x/../y").is_err());
        assert!(a.dir("/").is_err());
    }
}
