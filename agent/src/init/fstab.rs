//! The guest's /etc/fstab as the appliance reads it: which entries to mount, the device each
//! names (`UUID=`, `LABEL=`, `PARTUUID=`, `PARTLABEL=`, `/dev/disk/by-*`, `/dev/vdXN`) found
//! among the probed devices, and mount(2) flags and data from the options. Pure: mounting
//! is init's.

use super::probe::Device;

/// One line of fstab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spec: String,
    pub target: String,
    pub fstype: String,
    pub options: Vec<String>,
    /// 1-based, for messages.
    pub line: usize,
}

impl Entry {
    pub fn has_option(&self, name: &str) -> bool {
        self.options.iter().any(|o| o == name)
    }

    pub fn nofail(&self) -> bool {
        self.has_option("nofail")
    }
}

/// fstab's fields escape blanks as octal (`\040`).
fn unescape_octal(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = b.get(i + 1..i + 4)
            && oct.iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = oct
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A name under /dev/disk/by-*, escaped as udev does: bytes other than ASCII letters, digits,
/// `#+-.:=@_` and valid multi-byte UTF-8 become `\xNN` (`/` and blanks in particular).
pub fn escape_udev(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || "#+-.:=@_".contains(c) || !c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        }
    }
    out
}

/// udev escapes the names under /dev/disk/by-* as `\xNN`.
fn unescape_udev(name: &str) -> String {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1) == Some(&b'x')
            && let Some(hex) = b.get(i + 2..i + 4)
            && let Ok(s) = std::str::from_utf8(hex)
            && let Ok(v) = u8::from_str_radix(s, 16)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 2 {
                return None;
            }
            Some(Entry {
                spec: unescape_octal(f[0]),
                target: unescape_octal(f[1]),
                fstype: f.get(2).map_or("auto", |t| t).to_owned(),
                options: f
                    .get(3)
                    .map_or("defaults", |o| o)
                    .split(',')
                    .filter(|o| !o.is_empty())
                    .map(str::to_owned)
                    .collect(),
                line: i + 1,
            })
        })
        .collect()
}

/// What the appliance does with an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A device to mount.
    Mount,
    /// A bind mount of a path inside the guest.
    Bind,
    /// Left alone, with why.
    Skip(&'static str),
}

/// Targets init sets up itself inside the root, as a container runtime does.
const OWN_TARGETS: &[&str] = &[
    "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/run", "/tmp",
];

pub fn action(e: &Entry) -> Action {
    let target = e.target.trim_end_matches('/');
    if target.is_empty() {
        return Action::Skip("the root, mounted already");
    }
    if e.fstype == "swap" || e.target == "none" || e.target == "swap" {
        return Action::Skip("swap");
    }
    if e.has_option("noauto") {
        return Action::Skip("noauto");
    }
    if e.has_option("bind") || e.has_option("rbind") {
        return if e.spec.starts_with('/') && !e.spec.starts_with("/dev/") {
            Action::Bind
        } else {
            Action::Skip("a bind mount of something outside the guest's files")
        };
    }
    if OWN_TARGETS.contains(&target) {
        return Action::Skip("set up by the appliance");
    }
    if parse_spec(&e.spec).is_none() {
        return Action::Skip("not a disk");
    }
    Action::Mount
}

/// How an fstab entry names its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Uuid(String),
    Label(String),
    PartUuid(String),
    PartLabel(String),
    /// `/dev/disk/by-id/virtio-<serial>[-partN]`.
    Id(String),
    /// A kernel name: `/dev/vda1` → `vda1`.
    Name(String),
    /// `/dev/mapper/…` or `/dev/<vg>/<lv>`: device-mapper, which the appliance does not set up.
    Mapper(String),
}

/// None for an entry that names no disk (`tmpfs`, `server:/export`, `proc`).
pub fn parse_spec(spec: &str) -> Option<Spec> {
    let unquote = |v: &str| v.trim_matches('"').to_owned();
    if let Some((key, value)) = spec.split_once('=') {
        return match key {
            "UUID" => Some(Spec::Uuid(unquote(value))),
            "LABEL" => Some(Spec::Label(unquote(value))),
            "PARTUUID" => Some(Spec::PartUuid(unquote(value))),
            "PARTLABEL" => Some(Spec::PartLabel(unquote(value))),
            _ => None,
        };
    }
    let rest = spec.strip_prefix("/dev/")?;
    if let Some((kind, name)) = rest.strip_prefix("disk/").and_then(|r| r.split_once('/')) {
        let name = unescape_udev(name);
        return Some(match kind {
            "by-uuid" => Spec::Uuid(name),
            "by-label" => Spec::Label(name),
            "by-partuuid" => Spec::PartUuid(name),
            "by-partlabel" => Spec::PartLabel(name),
            "by-id" => Spec::Id(name),
            _ => Spec::Mapper(spec.to_owned()),
        });
    }
    if rest.starts_with("mapper/") || rest.contains('/') {
        return Some(Spec::Mapper(spec.to_owned()));
    }
    Some(Spec::Name(rest.to_owned()))
}

/// The probed device `spec` names, if any.
pub fn resolve<'a>(spec: &Spec, devices: &'a [Device]) -> Option<&'a Device> {
    let eq = |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
    devices.iter().find(|d| match spec {
        Spec::Uuid(u) => d.fs().is_some_and(|fs| fs.uuid.eq_ignore_ascii_case(u)),
        Spec::Label(l) => d.fs().is_some_and(|fs| fs.label == *l),
        Spec::PartUuid(u) => eq(&d.part_uuid, u),
        Spec::PartLabel(l) => d.part_label.as_deref() == Some(l.as_str()),
        Spec::Name(n) => d.name == *n,
        Spec::Id(id) => {
            // udev's virtio-blk ids: virtio-<serial> for the disk, -partN for partitions.
            let Some(serial) = &d.serial else {
                return false;
            };
            let want = match d.partition {
                Some(n) => format!("virtio-{serial}-part{n}"),
                None => format!("virtio-{serial}"),
            };
            want == *id
        }
        Spec::Mapper(_) => false,
    })
}

pub const MS_RDONLY: u64 = 1;
pub const MS_NOSUID: u64 = 2;
pub const MS_NODEV: u64 = 4;
pub const MS_NOEXEC: u64 = 8;
pub const MS_SYNCHRONOUS: u64 = 16;
pub const MS_REMOUNT: u64 = 32;
pub const MS_DIRSYNC: u64 = 128;
pub const MS_NOATIME: u64 = 1024;
pub const MS_NODIRATIME: u64 = 2048;
pub const MS_BIND: u64 = 4096;
pub const MS_REC: u64 = 16384;
pub const MS_RELATIME: u64 = 1 << 21;
pub const MS_STRICTATIME: u64 = 1 << 24;
pub const MS_LAZYTIME: u64 = 1 << 25;

/// mount(2)'s flags and file-system data for fstab options, as mount(8) splits them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: u64,
    /// What the file system driver parses (`umask=0077`, `errors=remount-ro`), comma-joined.
    pub data: String,
}

pub fn mount_options(options: &[String]) -> MountOptions {
    let mut flags = 0u64;
    let mut data: Vec<&str> = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MS_RDONLY, 0),
            "rw" => (0, MS_RDONLY),
            "nosuid" => (MS_NOSUID, 0),
            "suid" => (0, MS_NOSUID),
            "nodev" => (MS_NODEV, 0),
            "dev" => (0, MS_NODEV),
            "noexec" => (MS_NOEXEC, 0),
            "exec" => (0, MS_NOEXEC),
            "sync" => (MS_SYNCHRONOUS, 0),
            "async" => (0, MS_SYNCHRONOUS),
            "dirsync" => (MS_DIRSYNC, 0),
            "noatime" => (MS_NOATIME, 0),
            "atime" => (0, MS_NOATIME),
            "nodiratime" => (MS_NODIRATIME, 0),
            "diratime" => (0, MS_NODIRATIME),
            "relatime" => (MS_RELATIME, 0),
            "norelatime" => (0, MS_RELATIME),
            "strictatime" => (MS_STRICTATIME, 0),
            "lazytime" => (MS_LAZYTIME, 0),
            "nolazytime" => (0, MS_LAZYTIME),
            // mount(8)'s and systemd's own options: nothing for the kernel.
            "defaults" | "auto" | "noauto" | "nofail" | "user" | "nouser" | "users" | "owner"
            | "group" | "_netdev" | "bind" | "rbind" | "nobootwait" => (0, 0),
            other
                if other.starts_with("x-")
                    || other.starts_with("comment=")
                    || other.starts_with("X-") =>
            {
                (0, 0)
            }
            other => {
                data.push(other);
                (0, 0)
            }
        };
        flags = (flags | set) & !clear;
    }
    MountOptions {
        flags,
        data: data.join(","),
    }
}

#[cfg(test)]
mod tests {
    use super::super::probe::{Content, FsInfo, FsKind};
    use super::*;

    fn dev(name: &str, part: Option<u32>, fs: Option<(FsKind, &str, &str)>) -> Device {
        Device {
            name: name.into(),
            path: format!("/dev/{name}").into(),
            partition: part,
            content: Ok(match fs {
                Some((kind, uuid, label)) => Content::Fs(FsInfo {
                    kind,
                    uuid: uuid.into(),
                    label: label.into(),
                }),
                None => Content::Unknown,
            }),
            part_uuid: part.map(|n| format!("5f3c1a2b-0000-4000-8000-00000000000{n}")),
            part_label: part.map(|n| format!("part {n}")),
            serial: Some("disk0".into()),
        }
    }

    fn devices() -> Vec<Device> {
        vec![
            dev("vda", None, None),
            dev(
                "vda1",
                Some(1),
                Some((
                    FsKind::Ext4,
                    "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                    "debian-root",
                )),
            ),
            dev("vda15", Some(15), Some((FsKind::Vfat, "A1B2-C3D4", "UEFI"))),
        ]
    }

    #[test]
    fn parses_debians_fstab() {
        let text = "# /etc/fstab: static file system information.\n\
            LABEL=debian-root      /             ext4   rw,discard,errors=remount-ro,x-systemd.growfs 0 1\n\
            \n\
            LABEL=UEFI       /boot/efi     vfat   umask=0077,nofail                        0 2\n\
            /dev/vdb1 /srv/my\\040data xfs\n\
            tmpfs /tmp tmpfs defaults 0 0\n\
            /swapfile none swap sw 0 0\n\
            broken-line\n";
        let e = parse(text);
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].target, "/");
        assert_eq!(e[1].line, 4);
        assert!(e[1].nofail());
        assert_eq!(e[2].target, "/srv/my data");
        assert_eq!(e[2].options, ["defaults"]);
        let actions: Vec<Action> = e.iter().map(action).collect();
        assert_eq!(
            actions,
            [
                Action::Skip("the root, mounted already"),
                Action::Mount,
                Action::Mount,
                Action::Skip("set up by the appliance"),
                Action::Skip("swap"),
            ]
        );
    }

    #[test]
    fn skips_what_is_no_disk() {
        for (line, want) in [
            (
                "server:/export /mnt nfs defaults",
                Action::Skip("not a disk"),
            ),
            ("UUID=x /mnt ext4 noauto", Action::Skip("noauto")),
            (
                "proc /proc proc defaults",
                Action::Skip("set up by the appliance"),
            ),
            ("/srv/a /var/a none bind", Action::Bind),
            (
                "/dev/vdb /var/a none bind",
                Action::Skip("a bind mount of something outside the guest's files"),
            ),
            ("LABEL=var /var/ ext4 defaults", Action::Mount),
        ] {
            assert_eq!(action(&parse(line)[0]), want, "{line}");
        }
    }

    #[test]
    fn every_way_to_name_a_device_resolves() {
        let d = devices();
        let name = |spec: &str| {
            let s = parse_spec(spec).unwrap_or_else(|| panic!("no spec: {spec}"));
            resolve(&s, &d).map(|d| d.name.clone())
        };
        assert_eq!(
            name("UUID=0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0").as_deref(),
            Some("vda1")
        );
        assert_eq!(name("UUID=\"a1b2-c3d4\"").as_deref(), Some("vda15"));
        assert_eq!(name("LABEL=UEFI").as_deref(), Some("vda15"));
        assert_eq!(name("LABEL=uefi"), None, "labels are case-sensitive");
        assert_eq!(
            name("PARTUUID=5f3c1a2b-0000-4000-8000-000000000001").as_deref(),
            Some("vda1")
        );
        assert_eq!(name("PARTLABEL=part 15").as_deref(), Some("vda15"));
        assert_eq!(
            name("/dev/disk/by-uuid/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").as_deref(),
            Some("vda1")
        );
        assert_eq!(
            name("/dev/disk/by-label/debian-root").as_deref(),
            Some("vda1")
        );
        assert_eq!(
            name("/dev/disk/by-partlabel/part\\x2015").as_deref(),
            Some("vda15")
        );
        assert_eq!(
            name("/dev/disk/by-partuuid/5f3c1a2b-0000-4000-8000-000000000001").as_deref(),
            Some("vda1")
        );
        assert_eq!(
            name("/dev/disk/by-id/virtio-disk0-part15").as_deref(),
            Some("vda15")
        );
        assert_eq!(name("/dev/disk/by-id/virtio-disk0").as_deref(), Some("vda"));
        assert_eq!(name("/dev/vda15").as_deref(), Some("vda15"));
        assert_eq!(name("/dev/vdb1"), None);
        assert_eq!(name("/dev/mapper/vg-root"), None);
        assert!(matches!(parse_spec("/dev/vg0/root"), Some(Spec::Mapper(_))));
        assert_eq!(parse_spec("tmpfs"), None);
        assert_eq!(parse_spec("FOO=bar"), None);
    }

    #[test]
    fn udev_names_round_trip() {
        assert_eq!(escape_udev("my root/1"), "my\\x20root\\x2f1");
        assert_eq!(escape_udev("UEFI"), "UEFI");
        assert_eq!(escape_udev("données"), "données");
        assert_eq!(unescape_udev(&escape_udev("a b/c\\d")), "a b/c\\d");
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let o = |s: &str| mount_options(&s.split(',').map(str::to_owned).collect::<Vec<_>>());
        assert_eq!(
            o("rw,discard,errors=remount-ro,x-systemd.growfs"),
            MountOptions {
                flags: 0,
                data: "discard,errors=remount-ro".into()
            }
        );
        assert_eq!(
            o("umask=0077,nofail"),
            MountOptions {
                flags: 0,
                data: "umask=0077".into()
            }
        );
        assert_eq!(
            o("defaults,ro,nosuid,nodev,noexec,noatime").flags,
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME
        );
        assert_eq!(o("ro,rw").flags, 0);
        assert_eq!(o("comment=cloudconfig,defaults").data, "");
    }
}
