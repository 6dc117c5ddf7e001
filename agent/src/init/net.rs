//! The appliance's network: loopback always; with `builder.net=user`, the first NIC with
//! QEMU's user-network addresses (10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3) set by the
//! classic interface and route ioctls, and a resolv.conf the guest sees without its image
//! changing.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::sys;

const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
const SIOCSIFADDR: u64 = 0x8916;
const SIOCSIFNETMASK: u64 = 0x891C;
const SIOCADDRT: u64 = 0x890B;
const IFF_UP: u16 = 1;
const AF_INET: u16 = 2;
const RTF_UP: u16 = 1;
const RTF_GATEWAY: u16 = 2;

pub const ADDRESS: [u8; 4] = [10, 0, 2, 15];
pub const NETMASK: [u8; 4] = [255, 255, 255, 0];
pub const GATEWAY: [u8; 4] = [10, 0, 2, 2];
pub const DNS: &str = "10.0.2.3";

/// `struct sockaddr` holding a `struct sockaddr_in`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockAddr {
    family: u16,
    /// Port (big-endian), then the IPv4 address, then zeros.
    data: [u8; 14],
}

impl SockAddr {
    fn inet(addr: [u8; 4]) -> SockAddr {
        let mut data = [0u8; 14];
        data[2..6].copy_from_slice(&addr);
        SockAddr {
            family: AF_INET,
            data,
        }
    }
}

/// `struct ifreq`: the interface name and a 24-byte union (an address, or the flags).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    union: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let mut n = [0u8; 16];
        if name.len() >= n.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name `{name}` is too long"),
            ));
        }
        n[..name.len()].copy_from_slice(name.as_bytes());
        Ok(IfReq {
            name: n,
            union: [0; 24],
        })
    }

    fn with_addr(name: &str, addr: [u8; 4]) -> io::Result<IfReq> {
        let mut r = IfReq::new(name)?;
        let sa = SockAddr::inet(addr);
        r.union[0..2].copy_from_slice(&sa.family.to_ne_bytes());
        r.union[2..16].copy_from_slice(&sa.data);
        Ok(r)
    }
}

/// `struct rtentry` (x86_64 layout: 120 bytes).
#[repr(C)]
struct RtEntry {
    pad1: u64,
    dst: SockAddr,
    gateway: SockAddr,
    genmask: SockAddr,
    flags: u16,
    pad2: i16,
    pad3: u64,
    pad4: usize,
    metric: i16,
    dev: usize,
    mtu: u64,
    window: u64,
    irtt: u16,
}

const _: () = assert!(std::mem::size_of::<RtEntry>() == 120);
const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

fn up(sock: &std::os::fd::OwnedFd, name: &str) -> io::Result<()> {
    let mut r = IfReq::new(name)?;
    sys::ioctl_struct(sock, SIOCGIFFLAGS, &mut r)?;
    let flags = u16::from_ne_bytes([r.union[0], r.union[1]]) | IFF_UP;
    r.union[0..2].copy_from_slice(&flags.to_ne_bytes());
    sys::ioctl_struct(sock, SIOCSIFFLAGS, &mut r)
}

/// Brings `lo` up (the kernel gives it 127.0.0.1/8 then).
pub fn loopback() -> io::Result<()> {
    let sock = sys::inet_socket()?;
    up(&sock, "lo")
}

/// The first network interface that is not loopback, from `sys_net` (`/sys/class/net`).
pub fn first_nic(sys_net: &Path) -> Option<String> {
    super::dir_names(sys_net).into_iter().find(|n| n != "lo")
}

/// QEMU user networking on `nic`: address, netmask, up, default route.
pub fn user_network(nic: &str) -> io::Result<()> {
    let sock = sys::inet_socket()?;
    sys::ioctl_struct(&sock, SIOCSIFADDR, &mut IfReq::with_addr(nic, ADDRESS)?)?;
    sys::ioctl_struct(&sock, SIOCSIFNETMASK, &mut IfReq::with_addr(nic, NETMASK)?)?;
    up(&sock, nic)?;
    let mut route = RtEntry {
        pad1: 0,
        dst: SockAddr::inet([0; 4]),
        gateway: SockAddr::inet(GATEWAY),
        genmask: SockAddr::inet([0; 4]),
        flags: RTF_UP | RTF_GATEWAY,
        pad2: 0,
        pad3: 0,
        pad4: 0,
        metric: 0,
        dev: 0,
        mtu: 0,
        window: 0,
        irtt: 0,
    };
    sys::ioctl_struct(&sock, SIOCADDRT, &mut route)
}

/// Where the guest's `/etc/resolv.conf` leads, as a path inside the guest: itself when it is a
/// file or missing, the symlink's target (resolved inside `root`, following a chain, existing
/// or not) when it is a link. None for a link loop.
pub fn resolv_conf_target(root: &Path) -> Option<PathBuf> {
    let mut guest = PathBuf::from("/etc/resolv.conf");
    for _ in 0..8 {
        let host = root.join(guest.strip_prefix("/").unwrap_or(&guest));
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&host).ok()?;
                let base = guest.parent().unwrap_or(Path::new("/")).to_path_buf();
                guest = normalize(&base.join(link));
            }
            Ok(_) => return Some(guest),
            // Missing, or a dangling link (into /run for systemd-resolved's stub file).
            Err(_) => return Some(guest),
        }
    }
    None
}

/// `..` and `.` removed lexically, never above `/` (as inside a chroot).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

pub fn resolv_conf_text() -> String {
    format!("# written by the builder appliance (QEMU user network)\nnameserver {DNS}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolv_conf_is_found_through_links() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).expect("etc");
        assert_eq!(resolv_conf_target(root), Some("/etc/resolv.conf".into()));

        std::fs::write(root.join("etc/resolv.conf"), "nameserver 1.1.1.1\n").expect("file");
        assert_eq!(resolv_conf_target(root), Some("/etc/resolv.conf".into()));

        std::fs::remove_file(root.join("etc/resolv.conf")).expect("rm");
        symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            root.join("etc/resolv.conf"),
        )
        .expect("link");
        assert_eq!(
            resolv_conf_target(root),
            Some("/run/systemd/resolve/stub-resolv.conf".into())
        );

        // An absolute link stays inside the root; `..` cannot climb out of it.
        std::fs::remove_file(root.join("etc/resolv.conf")).expect("rm");
        symlink(
            "/../../../run/resolvconf/resolv.conf",
            root.join("etc/resolv.conf"),
        )
        .expect("link");
        assert_eq!(
            resolv_conf_target(root),
            Some("/run/resolvconf/resolv.conf".into())
        );

        // A chain: etc/resolv.conf -> /etc/alt -> /etc/real (a file).
        std::fs::remove_file(root.join("etc/resolv.conf")).expect("rm");
        symlink("/etc/alt", root.join("etc/resolv.conf")).expect("link");
        symlink("real", root.join("etc/alt")).expect("link");
        std::fs::write(root.join("etc/real"), "x").expect("file");
        assert_eq!(resolv_conf_target(root), Some("/etc/real".into()));

        // A loop leads nowhere.
        std::fs::remove_file(root.join("etc/real")).expect("rm");
        symlink("alt", root.join("etc/real")).expect("link");
        assert_eq!(resolv_conf_target(root), None);
    }

    #[test]
    fn interface_structs_hold_the_address_where_the_kernel_reads_it() {
        let r = IfReq::with_addr("eth0", ADDRESS).expect("short name");
        assert_eq!(&r.name[..5], b"eth0\0");
        assert_eq!(&r.union[0..2], &AF_INET.to_ne_bytes());
        assert_eq!(&r.union[4..8], &ADDRESS);
        assert!(IfReq::new("a-very-long-interface-name").is_err());
    }
}
