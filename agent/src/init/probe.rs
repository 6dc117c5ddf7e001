//! What a block device holds, read from its own bytes as blkid would: the file system
//! superblocks (ext2/3/4, xfs, btrfs, vfat) with their UUID and label, what the appliance
//! cannot open (LVM physical volume, LUKS, swap), and a whole disk's partition table (GPT with
//! each partition's PARTUUID and PARTLABEL, MBR with its disk signature).
//!
//! Pure parsers over byte slices, plus [`scan`], which lists the block devices the kernel
//! shows in sysfs and probes each one. No guest tool runs: the appliance has none.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How many bytes [`identify`] needs to see every signature it knows: btrfs's superblock
/// lives at 64 KiB and its magic 64 bytes into it.
pub const PROBE_LEN: usize = 0x11000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Btrfs,
    Vfat,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Vfat => "vfat",
        }
    }

    /// The type to give mount(2): the ext4 driver mounts ext2 and ext3 too (Debian's kernels
    /// build no separate ext2/ext3 drivers).
    pub fn mount_type(self) -> &'static str {
        match self {
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => "ext4",
            other => other.name(),
        }
    }

    /// The kind an fstab type names, for a type the appliance knows.
    pub fn from_type(ty: &str) -> Option<FsKind> {
        Some(match ty {
            "ext2" => FsKind::Ext2,
            "ext3" => FsKind::Ext3,
            "ext4" => FsKind::Ext4,
            "xfs" => FsKind::Xfs,
            "btrfs" => FsKind::Btrfs,
            "vfat" | "msdos" | "fat" => FsKind::Vfat,
            _ => return None,
        })
    }
}

/// A file system found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    pub kind: FsKind,
    /// As blkid prints it: lowercase 8-4-4-4-12 hex, or `XXXX-XXXX` for vfat.
    pub uuid: String,
    /// Empty when the file system has none.
    pub label: String,
}

/// What the first bytes of a device say it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Fs(FsInfo),
    Swap,
    LvmPv,
    Luks,
    Iso9660,
    /// None of the signatures above.
    Unknown,
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Fs(fs) => f.write_str(fs.kind.name()),
            Content::Swap => f.write_str("swap"),
            Content::LvmPv => f.write_str("LVM physical volume (not supported by the appliance)"),
            Content::Luks => f.write_str("LUKS encrypted volume (not supported by the appliance)"),
            Content::Iso9660 => f.write_str("iso9660"),
            Content::Unknown => f.write_str("no file system"),
        }
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn has(b: &[u8], at: usize, magic: &[u8]) -> bool {
    b.get(at..at + magic.len()) == Some(magic)
}

/// A UUID stored as 16 big-endian bytes (ext, xfs, btrfs), as blkid prints it.
fn uuid_be(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if h.len() != 32 {
        return h;
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A GUID as GPT stores it (the first three fields little-endian), lowercase.
pub fn guid(b: &[u8]) -> String {
    if b.len() != 16 {
        return uuid_be(b);
    }
    let mut be = [0u8; 16];
    be[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
    be[4..6].copy_from_slice(&[b[5], b[4]]);
    be[6..8].copy_from_slice(&[b[7], b[6]]);
    be[8..16].copy_from_slice(&b[8..16]);
    uuid_be(&be)
}

/// A fixed-size, NUL- or space-padded label field.
fn label(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim_end().to_owned()
}

/// What `buf` (the first [`PROBE_LEN`] bytes of a device, or fewer if it is smaller) holds.
pub fn identify(buf: &[u8]) -> Content {
    if has(buf, 0, b"LUKS\xba\xbe") {
        return Content::Luks;
    }
    if has(buf, 0, b"XFSB") {
        return Content::Fs(FsInfo {
            kind: FsKind::Xfs,
            uuid: uuid_be(buf.get(32..48).unwrap_or_default()),
            label: label(buf.get(108..120).unwrap_or_default()),
        });
    }
    if let Some(fs) = ext(buf) {
        return Content::Fs(fs);
    }
    if has(buf, 0x10040, b"_BHRfS_M") {
        return Content::Fs(FsInfo {
            kind: FsKind::Btrfs,
            uuid: uuid_be(buf.get(0x10020..0x10030).unwrap_or_default()),
            label: label(buf.get(0x1012b..0x1022b).unwrap_or_default()),
        });
    }
    if let Some(fs) = vfat(buf) {
        return Content::Fs(fs);
    }
    if (0..4).any(|s| has(buf, s * 512, b"LABELONE") && has(buf, s * 512 + 24, b"LVM2 001")) {
        return Content::LvmPv;
    }
    if has(buf, 4096 - 10, b"SWAPSPACE2") || has(buf, 4096 - 10, b"SWAP-SPACE") {
        return Content::Swap;
    }
    if has(buf, 0x8001, b"CD001") {
        return Content::Iso9660;
    }
    Content::Unknown
}

fn ext(buf: &[u8]) -> Option<FsInfo> {
    const SB: usize = 1024;
    if le16(buf, SB + 56)? != 0xEF53 {
        return None;
    }
    let compat = le32(buf, SB + 92)?;
    let incompat = le32(buf, SB + 96)?;
    let ro_compat = le32(buf, SB + 100)?;
    // As blkid decides: features ext3 lacks make it ext4; a journal makes it ext3.
    const EXT3_INCOMPAT: u32 = 0x0002 | 0x0004; // filetype, recover
    const EXT3_RO_COMPAT: u32 = 0x0001 | 0x0002 | 0x0004; // sparse_super, large_file, btree_dir
    let kind = if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        FsKind::Ext4
    } else if compat & 0x0004 != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    };
    Some(FsInfo {
        kind,
        uuid: uuid_be(buf.get(SB + 104..SB + 120)?),
        label: label(buf.get(SB + 120..SB + 136)?),
    })
}

fn vfat(buf: &[u8]) -> Option<FsInfo> {
    if !has(buf, 510, &[0x55, 0xAA]) || !matches!(buf.first(), Some(0xEB | 0xE9)) {
        return None;
    }
    let sector = le16(buf, 11)?;
    if !sector.is_power_of_two() || !(512..=4096).contains(&sector) {
        return None;
    }
    // FAT32 keeps its extended boot record further in than FAT12/16.
    let (id_at, label_at) = if has(buf, 82, b"FAT32   ") {
        (67, 71)
    } else if has(buf, 54, b"FAT1") || has(buf, 54, b"FAT     ") {
        (39, 43)
    } else {
        return None;
    };
    let id = le32(buf, id_at)?;
    let label = label(buf.get(label_at..label_at + 11)?);
    Some(FsInfo {
        kind: FsKind::Vfat,
        uuid: format!("{:04X}-{:04X}", id >> 16, id & 0xffff),
        label: if label == "NO NAME" {
            String::new()
        } else {
            label
        },
    })
}

/// A GPT partition: its number as the kernel numbers it (entry index + 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    pub number: u32,
    pub part_uuid: String,
    pub name: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

/// A whole disk's partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    Gpt {
        disk_guid: String,
        partitions: Vec<GptPartition>,
    },
    /// The disk signature names MBR partitions: PARTUUID `<signature>-<number>`.
    Mbr {
        signature: u32,
    },
    None,
}

impl Table {
    /// The PARTUUID and PARTLABEL of partition `number`, as udev names them.
    pub fn partition_ids(&self, number: u32) -> (Option<String>, Option<String>) {
        match self {
            Table::Gpt { partitions, .. } => partitions
                .iter()
                .find(|p| p.number == number)
                .map(|p| {
                    let name = (!p.name.is_empty()).then(|| p.name.clone());
                    (Some(p.part_uuid.clone()), name)
                })
                .unwrap_or((None, None)),
            Table::Mbr { signature } => (Some(format!("{signature:08x}-{number:02x}")), None),
            Table::None => (None, None),
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Table::Gpt { .. } => "GPT",
            Table::Mbr { .. } => "MBR",
            Table::None => "no partition table",
        }
    }
}

/// The GPT header at `header` (one sector, LBA 1) with its partition entry array `entries`.
/// None when the header is not a GPT header.
pub fn parse_gpt(header: &[u8], entries: &[u8]) -> Option<Table> {
    if !has(header, 0, b"EFI PART") {
        return None;
    }
    let disk_guid = guid(header.get(56..72)?);
    let count = le32(header, 80)? as usize;
    let size = le32(header, 84)? as usize;
    if size < 128 {
        return None;
    }
    let mut partitions = Vec::new();
    for i in 0..count {
        let Some(e) = entries.get(i * size..i * size + 128) else {
            break;
        };
        if e[0..16].iter().all(|&b| b == 0) {
            continue; // unused entry
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        partitions.push(GptPartition {
            number: u32::try_from(i + 1).ok()?,
            part_uuid: guid(&e[16..32]),
            name: String::from_utf16_lossy(&units),
            first_lba: le64(e, 32)?,
            last_lba: le64(e, 40)?,
        });
    }
    Some(Table::Gpt {
        disk_guid,
        partitions,
    })
}

/// The partition table of the disk `dev` with `sector`-byte logical sectors.
pub fn read_table(dev: &mut (impl Read + Seek), sector: u64) -> io::Result<Table> {
    let mut mbr = vec![0u8; 512];
    dev.seek(SeekFrom::Start(0))?;
    if read_up_to(dev, &mut mbr)? < 512 || !has(&mbr, 510, &[0x55, 0xAA]) {
        return Ok(Table::None);
    }
    // A protective MBR (type 0xEE) announces a GPT.
    let protective = (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xEE);
    if protective {
        let mut header = vec![0u8; sector as usize];
        dev.seek(SeekFrom::Start(sector))?;
        read_up_to(dev, &mut header)?;
        if has(&header, 0, b"EFI PART") {
            let lba = le64(&header, 72).unwrap_or(2);
            let count = u64::from(le32(&header, 80).unwrap_or(0)).min(1024);
            let size = u64::from(le32(&header, 84).unwrap_or(128)).min(4096);
            let mut entries = vec![0u8; (count * size) as usize];
            dev.seek(SeekFrom::Start(lba.saturating_mul(sector)))?;
            read_up_to(dev, &mut entries)?;
            if let Some(t) = parse_gpt(&header, &entries) {
                return Ok(t);
            }
        }
    }
    // A FAT boot sector ends with 0x55AA too, and has no partition entries to speak of.
    if vfat(&mbr).is_some() {
        return Ok(Table::None);
    }
    let any = (0..4).any(|i| mbr[446 + i * 16 + 4] != 0);
    if !any {
        return Ok(Table::None);
    }
    Ok(Table::Mbr {
        signature: le32(&mbr, 440).unwrap_or(0),
    })
}

/// Reads until `buf` is full or the end; returns how much was read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// What a device holds, from its first bytes.
pub fn probe(dev: &mut (impl Read + Seek)) -> io::Result<Content> {
    let mut buf = vec![0u8; PROBE_LEN];
    dev.seek(SeekFrom::Start(0))?;
    let n = read_up_to(dev, &mut buf)?;
    buf.truncate(n);
    Ok(identify(&buf))
}

/// One block device (a whole disk or a partition) and what it holds.
#[derive(Debug, Clone)]
pub struct Device {
    /// The kernel's name: `vda`, `vda1`, `nvme0n1p2`.
    pub name: String,
    pub path: PathBuf,
    pub partition: Option<u32>,
    /// None when it could not be read (the error says why).
    pub content: Result<Content, String>,
    pub part_uuid: Option<String>,
    pub part_label: Option<String>,
    /// The disk's serial (virtio-blk `serial=`), for /dev/disk/by-id.
    pub serial: Option<String>,
}

impl Device {
    pub fn fs(&self) -> Option<&FsInfo> {
        match &self.content {
            Ok(Content::Fs(fs)) => Some(fs),
            _ => None,
        }
    }
}

/// A whole disk with its table, for the "what I found" message.
#[derive(Debug, Clone)]
pub struct Disk {
    pub name: String,
    pub table: Result<Table, String>,
    pub partitions: usize,
}

/// Every disk and partition in `sys_block` (`/sys/class/block`), device nodes under `dev`
/// (`/dev`), in the kernel's order (vda, vda1, vda2, …, vdb). Loop, RAM and optical devices
/// and empty ones are left out.
pub fn scan(sys_block: &Path, dev: &Path) -> (Vec<Disk>, Vec<Device>) {
    let names = block_names(sys_block);
    let read = |name: &str, file: &str| {
        std::fs::read_to_string(sys_block.join(name).join(file))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let mut disks = Vec::new();
    let mut devices = Vec::new();
    let mut tables: Vec<(String, Table)> = Vec::new();
    for name in &names {
        if read(name, "size").as_deref() == Some("0") {
            continue;
        }
        let partition = read(name, "partition").and_then(|p| p.parse::<u32>().ok());
        let disk = if partition.is_some() {
            // /sys/class/block/vda1 -> ../../devices/…/block/vda/vda1: the parent is the disk.
            std::fs::canonicalize(sys_block.join(name))
                .ok()
                .and_then(|p| Some(p.parent()?.file_name()?.to_str()?.to_owned()))
                .unwrap_or_else(|| name.clone())
        } else {
            name.clone()
        };
        let path = dev.join(name);
        let opened = std::fs::File::open(&path);
        if partition.is_none() {
            let sector = read(name, "queue/logical_block_size")
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(512);
            let table = match &opened {
                Ok(f) => read_table(&mut &*f, sector).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Ok(t) = &table {
                tables.push((name.clone(), t.clone()));
            }
            disks.push(Disk {
                name: name.clone(),
                table,
                partitions: 0,
            });
        }
        let (part_uuid, part_label) = match partition {
            Some(n) => tables
                .iter()
                .find(|(d, _)| *d == disk)
                .map(|(_, t)| t.partition_ids(n))
                .unwrap_or((None, None)),
            None => (None, None),
        };
        if partition.is_some()
            && let Some(d) = disks.iter_mut().find(|d| d.name == disk)
        {
            d.partitions += 1;
        }
        let content = match opened {
            Ok(f) => probe(&mut &f).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        devices.push(Device {
            name: name.clone(),
            path,
            serial: read(&disk, "serial").filter(|s| !s.is_empty()),
            partition,
            content,
            part_uuid,
            part_label,
        });
    }
    (disks, devices)
}

/// The disks and partitions in `sys_block`, in the kernel's order, without loop, RAM and
/// optical devices.
pub fn block_names(sys_block: &Path) -> Vec<String> {
    let mut names = super::dir_names(sys_block);
    names.retain(|n| {
        !["loop", "ram", "zram", "sr", "fd", "nbd"]
            .iter()
            .any(|p| n.starts_with(p))
    });
    names.sort_by_key(|n| natural_key(n));
    names
}

/// `vda10` after `vda9`: runs of digits compare as numbers.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut text = String::new();
    let mut num = String::new();
    for c in name.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            if !num.is_empty() {
                key.push((std::mem::take(&mut text), num.parse().unwrap_or(u64::MAX)));
                num.clear();
            }
            text.push(c);
        }
    }
    key.push((text, num.parse().unwrap_or(0)));
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::process::Command;

    fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    const UUID_BYTES: [u8; 16] = [
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef,
    ];
    const UUID: &str = "12345678-9abc-def0-0123-456789abcdef";

    #[test]
    fn ext4_superblock_gives_kind_uuid_and_label() {
        let mut b = vec![0u8; PROBE_LEN];
        put(&mut b, 1080, &0xEF53u16.to_le_bytes());
        put(&mut b, 1024 + 92, &0x4u32.to_le_bytes()); // has_journal
        put(&mut b, 1024 + 96, &0x2c2u32.to_le_bytes()); // filetype, extents, 64bit, flex_bg
        put(&mut b, 1024 + 104, &UUID_BYTES);
        put(&mut b, 1024 + 120, b"debian-root");
        assert_eq!(
            identify(&b),
            Content::Fs(FsInfo {
                kind: FsKind::Ext4,
                uuid: UUID.into(),
                label: "debian-root".into()
            })
        );
        // Only a journal: ext3; nothing: ext2.
        put(&mut b, 1024 + 96, &0x2u32.to_le_bytes());
        assert!(matches!(
            identify(&b),
            Content::Fs(FsInfo {
                kind: FsKind::Ext3,
                ..
            })
        ));
        put(&mut b, 1024 + 92, &0u32.to_le_bytes());
        assert!(matches!(
            identify(&b),
            Content::Fs(FsInfo {
                kind: FsKind::Ext2,
                ..
            })
        ));
    }

    #[test]
    fn xfs_btrfs_and_vfat_superblocks() {
        let mut x = vec![0u8; PROBE_LEN];
        put(&mut x, 0, b"XFSB");
        put(&mut x, 32, &UUID_BYTES);
        put(&mut x, 108, b"data\0\0\0\0\0\0\0\0");
        assert_eq!(
            identify(&x),
            Content::Fs(FsInfo {
                kind: FsKind::Xfs,
                uuid: UUID.into(),
                label: "data".into()
            })
        );

        let mut b = vec![0u8; PROBE_LEN];
        put(&mut b, 65600, b"_BHRfS_M");
        put(&mut b, 65536 + 32, &UUID_BYTES);
        put(&mut b, 65536 + 0x12b, b"pool");
        assert_eq!(
            identify(&b),
            Content::Fs(FsInfo {
                kind: FsKind::Btrfs,
                uuid: UUID.into(),
                label: "pool".into()
            })
        );

        let mut f = vec![0u8; 4096];
        put(&mut f, 0, &[0xEB, 0x58, 0x90]);
        put(&mut f, 11, &512u16.to_le_bytes());
        put(&mut f, 82, b"FAT32   ");
        put(&mut f, 67, &0x1A2B_3C4Du32.to_le_bytes());
        put(&mut f, 71, b"UEFI       ");
        put(&mut f, 510, &[0x55, 0xAA]);
        assert_eq!(
            identify(&f),
            Content::Fs(FsInfo {
                kind: FsKind::Vfat,
                uuid: "1A2B-3C4D".into(),
                label: "UEFI".into()
            })
        );
        // FAT16 with the default "NO NAME" label: no label.
        let mut f16 = vec![0u8; 4096];
        put(&mut f16, 0, &[0xEB, 0x3C, 0x90]);
        put(&mut f16, 11, &512u16.to_le_bytes());
        put(&mut f16, 54, b"FAT16   ");
        put(&mut f16, 39, &0x0000_BEEFu32.to_le_bytes());
        put(&mut f16, 43, b"NO NAME    ");
        put(&mut f16, 510, &[0x55, 0xAA]);
        assert_eq!(
            identify(&f16),
            Content::Fs(FsInfo {
                kind: FsKind::Vfat,
                uuid: "0000-BEEF".into(),
                label: String::new()
            })
        );
    }

    #[test]
    fn what_the_appliance_cannot_open_is_named() {
        let mut luks = vec![0u8; 4096];
        put(&mut luks, 0, b"LUKS\xba\xbe");
        assert_eq!(identify(&luks), Content::Luks);
        let mut lvm = vec![0u8; 4096];
        put(&mut lvm, 512, b"LABELONE");
        put(&mut lvm, 512 + 24, b"LVM2 001");
        assert_eq!(identify(&lvm), Content::LvmPv);
        assert!(identify(&lvm).to_string().contains("not supported"));
        let mut swap = vec![0u8; 4096];
        put(&mut swap, 4086, b"SWAPSPACE2");
        assert_eq!(identify(&swap), Content::Swap);
        assert_eq!(identify(&[0u8; 100]), Content::Unknown);
        assert_eq!(identify(&[]), Content::Unknown);
        // An MBR's 0x55AA is not a FAT boot sector.
        let mut mbr = vec![0u8; 4096];
        put(&mut mbr, 510, &[0x55, 0xAA]);
        assert_eq!(identify(&mbr), Content::Unknown);
    }

    /// A disk image with a protective MBR and a GPT of two partitions (entries 1 and 3).
    fn gpt_fixture() -> Vec<u8> {
        let mut d = vec![0u8; 64 * 512];
        put(&mut d, 446 + 4, &[0xEE]);
        put(&mut d, 510, &[0x55, 0xAA]);
        let h = 512;
        put(&mut d, h, b"EFI PART");
        put(&mut d, h + 56, &UUID_BYTES);
        put(&mut d, h + 72, &2u64.to_le_bytes());
        put(&mut d, h + 80, &128u32.to_le_bytes());
        put(&mut d, h + 84, &128u32.to_le_bytes());
        let e1 = 1024;
        put(&mut d, e1, &[1; 16]); // any type GUID
        put(&mut d, e1 + 16, &UUID_BYTES);
        put(&mut d, e1 + 32, &2048u64.to_le_bytes());
        put(&mut d, e1 + 40, &4095u64.to_le_bytes());
        let name: Vec<u8> = "root".encode_utf16().flat_map(u16::to_le_bytes).collect();
        put(&mut d, e1 + 56, &name);
        let e3 = 1024 + 2 * 128;
        put(&mut d, e3, &[2; 16]);
        put(&mut d, e3 + 16, &[0xff; 16]);
        d
    }

    #[test]
    fn gpt_partitions_keep_the_kernel_numbering() {
        let t = read_table(&mut Cursor::new(gpt_fixture()), 512).expect("read");
        let Table::Gpt {
            disk_guid,
            partitions,
        } = &t
        else {
            panic!("not GPT: {t:?}")
        };
        // GPT GUIDs are mixed-endian: the first three fields are little-endian.
        assert_eq!(disk_guid, "78563412-bc9a-f0de-0123-456789abcdef");
        assert_eq!(partitions.len(), 2);
        assert_eq!(partitions[0].number, 1);
        assert_eq!(partitions[0].name, "root");
        assert_eq!(partitions[0].first_lba, 2048);
        assert_eq!(partitions[1].number, 3);
        assert_eq!(
            t.partition_ids(1),
            (
                Some("78563412-bc9a-f0de-0123-456789abcdef".into()),
                Some("root".into())
            )
        );
        assert_eq!(
            t.partition_ids(3).0.as_deref(),
            Some("ffffffff-ffff-ffff-ffff-ffffffffffff")
        );
        assert_eq!(t.partition_ids(2), (None, None));
    }

    #[test]
    fn mbr_partuuid_is_signature_and_number() {
        let mut d = vec![0u8; 4096];
        put(&mut d, 440, &0x1234_abcdu32.to_le_bytes());
        put(&mut d, 446 + 4, &[0x83]);
        put(&mut d, 510, &[0x55, 0xAA]);
        let t = read_table(&mut Cursor::new(d), 512).expect("read");
        assert_eq!(
            t,
            Table::Mbr {
                signature: 0x1234_abcd
            }
        );
        assert_eq!(t.partition_ids(5).0.as_deref(), Some("1234abcd-05"));
        // Truncated or blank disks have no table, and no error.
        assert_eq!(
            read_table(&mut Cursor::new(vec![0u8; 100]), 512).expect("read"),
            Table::None
        );
        assert_eq!(
            read_table(&mut Cursor::new(vec![0u8; 4096]), 512).expect("read"),
            Table::None
        );
        // A GPT header cut short is no panic.
        let mut g = gpt_fixture();
        g.truncate(600);
        assert!(read_table(&mut Cursor::new(g), 512).is_ok());
    }

    #[test]
    fn device_names_sort_as_the_kernel_numbers_them() {
        let mut v = vec![
            "vda10",
            "vdb",
            "vda2",
            "vda",
            "vda1",
            "nvme0n1p2",
            "nvme0n1",
        ];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(
            v,
            [
                "nvme0n1",
                "nvme0n1p2",
                "vda",
                "vda1",
                "vda2",
                "vda10",
                "vdb"
            ]
        );
    }

    // --- against what the real tools write (the tools are the oracle; a missing tool fails
    // the test and names its package, as src/vm/seed.rs's fsck.vfat test does) ---

    /// Runs a tool the test needs; fails naming its Debian package when it is missing.
    fn run(cmd: &mut Command, package: &str) {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?} needs {package} installed: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
        let p = dir.join(name);
        let f = std::fs::File::create(&p).expect("create image");
        f.set_len(mib << 20).expect("size image");
        p
    }

    fn probe_file(p: &Path) -> Content {
        probe(&mut std::fs::File::open(p).expect("open image")).expect("probe")
    }

    const REAL_UUID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn real_ext4_image() {
        let dir = tempfile_dir();
        let p = image(dir.path(), "ext4.img", 16);
        let ps = p.to_str().expect("utf-8 path");
        run(
            Command::new("mkfs.ext4").args(["-q", "-F", "-L", "debian-root", "-U", REAL_UUID, ps]),
            "e2fsprogs",
        );
        let want = FsInfo {
            kind: FsKind::Ext4,
            uuid: REAL_UUID.into(),
            label: "debian-root".into(),
        };
        assert_eq!(probe_file(&p), Content::Fs(want));
        let p2 = image(dir.path(), "ext2.img", 16);
        let ps2 = p2.to_str().expect("utf-8 path");
        run(
            Command::new("mkfs.ext2").args(["-q", "-F", ps2]),
            "e2fsprogs",
        );
        assert!(matches!(
            probe_file(&p2),
            Content::Fs(FsInfo {
                kind: FsKind::Ext2,
                ..
            })
        ));
    }

    #[test]
    fn real_vfat_image() {
        let dir = tempfile_dir();
        let p = image(dir.path(), "esp.img", 40);
        let ps = p.to_str().expect("utf-8 path");
        run(
            Command::new("mkfs.vfat").args(["-F", "32", "-n", "UEFI", "-i", "a1b2c3d4", ps]),
            "dosfstools",
        );
        let want = FsInfo {
            kind: FsKind::Vfat,
            uuid: "A1B2-C3D4".into(),
            label: "UEFI".into(),
        };
        assert_eq!(probe_file(&p), Content::Fs(want));
        let p16 = image(dir.path(), "fat16.img", 32);
        let ps16 = p16.to_str().expect("utf-8 path");
        run(
            Command::new("mkfs.vfat").args(["-F", "16", "-i", "0000beef", ps16]),
            "dosfstools",
        );
        assert_eq!(
            probe_file(&p16),
            Content::Fs(FsInfo {
                kind: FsKind::Vfat,
                uuid: "0000-BEEF".into(),
                label: String::new()
            })
        );
    }

    #[test]
    fn real_xfs_image() {
        let dir = tempfile_dir();
        let p = image(dir.path(), "xfs.img", 320);
        let ps = p.to_str().expect("utf-8 path");
        run(
            Command::new("mkfs.xfs").args([
                "-q",
                "-L",
                "data",
                "-m",
                &format!("uuid={REAL_UUID}"),
                ps,
            ]),
            "xfsprogs",
        );
        let want = FsInfo {
            kind: FsKind::Xfs,
            uuid: REAL_UUID.into(),
            label: "data".into(),
        };
        assert_eq!(probe_file(&p), Content::Fs(want));
    }

    #[test]
    fn real_btrfs_image() {
        let dir = tempfile_dir();
        let p = image(dir.path(), "btrfs.img", 128);
        let ps = p.to_str().expect("utf-8 path");
        run(
            Command::new("mkfs.btrfs").args(["-q", "-L", "pool", "-U", REAL_UUID, ps]),
            "btrfs-progs",
        );
        let want = FsInfo {
            kind: FsKind::Btrfs,
            uuid: REAL_UUID.into(),
            label: "pool".into(),
        };
        assert_eq!(probe_file(&p), Content::Fs(want));
    }

    #[test]
    fn real_gpt_and_mbr_tables() {
        let dir = tempfile_dir();
        let p = image(dir.path(), "gpt.img", 8);
        let ps = p.to_str().expect("utf-8 path");
        let script = "label: gpt\n\
            label-id: 01234567-89AB-CDEF-0123-456789ABCDEF\n\
            start=2048, size=2048, type=L, uuid=11111111-2222-3333-4444-555555555555, name=\"my root\"\n\
            start=4096, size=2048, type=U, uuid=AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE\n";
        sfdisk(ps, script);
        let t = read_table(&mut std::fs::File::open(&p).expect("open"), 512).expect("read");
        let Table::Gpt { disk_guid, .. } = &t else {
            panic!("not GPT: {t:?}")
        };
        assert_eq!(disk_guid, "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(
            t.partition_ids(1),
            (
                Some("11111111-2222-3333-4444-555555555555".into()),
                Some("my root".into())
            )
        );
        assert_eq!(
            t.partition_ids(2),
            (Some("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee".into()), None)
        );

        let m = image(dir.path(), "mbr.img", 8);
        let ms = m.to_str().expect("utf-8 path");
        sfdisk(
            ms,
            "label: dos\nlabel-id: 0xdeadbeef\nstart=2048, size=2048, type=83\n",
        );
        let t = read_table(&mut std::fs::File::open(&m).expect("open"), 512).expect("read");
        assert_eq!(t.partition_ids(1).0.as_deref(), Some("deadbeef-01"));
    }

    fn sfdisk(image: &str, script: &str) {
        use std::io::Write;
        let mut child = Command::new("sfdisk")
            .args(["-q", image])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("sfdisk (fdisk) is needed for this test: {e}"));
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes())
            .expect("write script");
        let out = child.wait_with_output().expect("sfdisk");
        assert!(
            out.status.success(),
            "sfdisk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn tempfile_dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }
}
