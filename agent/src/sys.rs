//! The few system calls std does not wrap (process groups, setuid, pseudo-terminals, sync;
//! and for the appliance's init: mount, chroot, reboot, module loading, waitpid, network
//! ioctls), declared directly against the C library the static binary links anyway, and the
//! /etc/passwd and /etc/group lookups (parsed by hand: a static glibc cannot load NSS
//! modules, and guests keep their local users in these files).
//!
//! The agent's only module with `unsafe` calls besides the `pre_exec` hooks that run them.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn setsid() -> i32;
    fn setgid(gid: u32) -> i32;
    fn setuid(uid: u32) -> i32;
    fn setgroups(n: usize, list: *const u32) -> i32;
    fn ioctl(fd: i32, request: u64, ...) -> i32;
    fn posix_openpt(flags: i32) -> i32;
    fn grantpt(fd: i32) -> i32;
    fn unlockpt(fd: i32) -> i32;
    fn ptsname_r(fd: i32, buf: *mut u8, len: usize) -> i32;
    #[link_name = "sync"]
    fn c_sync();
    fn mount(
        source: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: u64,
        data: *const c_char,
    ) -> i32;
    fn umount2(target: *const c_char, flags: i32) -> i32;
    fn chroot(path: *const c_char) -> i32;
    fn chdir(path: *const c_char) -> i32;
    fn reboot(cmd: i32) -> i32;
    fn syscall(number: i64, ...) -> i64;
    fn sethostname(name: *const c_char, len: usize) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
}

pub const SIGKILL: i32 = 9;
const TIOCSCTTY: u64 = 0x540E;
const TIOCSWINSZ: u64 = 0x5414;
const O_RDWR: i32 = 2;
const O_NOCTTY: i32 = 0o400;

/// Sends `sig` to every process of the group `pgid`.
pub fn kill_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            kill(-pgid, sig);
        }
    }
}

pub fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { c_sync() }
}

/// In a forked child before exec: start a new session (no controlling terminal, its own
/// process group). Async-signal-safe.
pub fn new_session() -> io::Result<()> {
    // SAFETY: setsid(2) takes no arguments and touches no memory of ours.
    if unsafe { setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a forked child before exec: start a new session and make `fd 0` (the pty slave) its
/// controlling terminal. Only async-signal-safe calls.
pub fn become_session_leader_with_tty() -> io::Result<()> {
    new_session()?;
    // SAFETY: ioctl takes integers here; fd 0 is the pty slave set up by Command.
    if unsafe { ioctl(0, TIOCSCTTY, 0i32) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a forked child before exec: drop to `uid`/`gid` with supplementary `groups`.
/// Only async-signal-safe calls; `groups` was built before the fork.
pub fn drop_privileges(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice; the others take integers.
    unsafe {
        if setgroups(groups.len(), groups.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
        if setgid(gid) < 0 {
            return Err(io::Error::last_os_error());
        }
        if setuid(uid) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A new pseudo-terminal: the master side, and the slave opened as a file.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<(File, File)> {
    // SAFETY: posix_openpt returns a new fd or -1; we own it from here on.
    let master = unsafe { posix_openpt(O_RDWR | O_NOCTTY) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `master` is a fresh fd nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let fd = master.as_raw_fd();
    let mut name = [0u8; 128];
    // SAFETY: fd is open; the buffer outlives the call and its length is passed.
    unsafe {
        if grantpt(fd) < 0 || unlockpt(fd) < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = ptsname_r(fd, name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    let path = CStr::from_bytes_until_nul(&name)
        .map_err(|_| io::Error::other("ptsname_r returned no terminator"))?
        .to_str()
        .map_err(|_| io::Error::other("pty name is not UTF-8"))?
        .to_owned();
    let master = File::from(master);
    set_window_size(&master, rows, cols)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open(&path)?;
    Ok((master, slave))
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(O_NOCTTY)
    }
}

pub fn set_window_size(tty: &File, rows: u16, cols: u16) -> io::Result<()> {
    let ws: [u16; 4] = [rows, cols, 0, 0];
    // SAFETY: TIOCSWINSZ reads a `struct winsize` (four u16) from the pointer, which is live.
    let rc = unsafe { ioctl(tty.as_raw_fd(), TIOCSWINSZ, ws.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A local user, from /etc/passwd.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// The primary group and every group that lists the user as a member.
    pub groups: Vec<u32>,
}

/// Looks up a user by name or numeric uid.
pub fn lookup_user(spec: &str) -> io::Result<User> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let numeric = spec.parse::<u32>().ok();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        if f[0] == spec || numeric == Some(uid) {
            let mut groups = vec![gid];
            if let Ok(group) = std::fs::read_to_string("/etc/group") {
                for g in group.lines() {
                    let gf: Vec<&str> = g.split(':').collect();
                    if gf.len() >= 4
                        && gf[3].split(',').any(|m| m == f[0])
                        && let Ok(id) = gf[2].parse::<u32>()
                        && !groups.contains(&id)
                    {
                        groups.push(id);
                    }
                }
            }
            return Ok(User {
                name: f[0].to_owned(),
                uid,
                gid,
                home: f[5].to_owned(),
                shell: f[6].to_owned(),
                groups,
            });
        }
    }
    if let Some(uid) = numeric {
        // A uid without a passwd entry is still a valid identity to run as.
        return Ok(User {
            name: uid.to_string(),
            uid,
            gid: uid,
            home: "/".into(),
            shell: "/bin/sh".into(),
            groups: vec![uid],
        });
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no user `{spec}` in /etc/passwd"),
    ))
}

/// Looks up a group by name or numeric gid.
pub fn lookup_group(spec: &str) -> io::Result<u32> {
    if let Ok(gid) = spec.parse::<u32>() {
        return Ok(gid);
    }
    let group = std::fs::read_to_string("/etc/group")?;
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3
            && f[0] == spec
            && let Ok(gid) = f[2].parse::<u32>()
        {
            return Ok(gid);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no group `{spec}` in /etc/group"),
    ))
}

// ---------------------------------------------------------------------------------------------
// The appliance's init (agent/src/init.rs).

pub const SIGTERM: i32 = 15;
const SYS_FINIT_MODULE: i64 = 313;
const MNT_DETACH: i32 = 2;
const WNOHANG: i32 = 1;
const LINUX_REBOOT_CMD_POWER_OFF: i32 = 0x4321_FEDC;
const LINUX_REBOOT_CMD_RESTART: i32 = 0x0123_4567;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn check(rc: i32) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2). `source`, `fstype` and `data` may be empty (passed as NULL).
pub fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: u64,
    data: &str,
) -> io::Result<()> {
    let opt = |s: &str| {
        if s.is_empty() {
            Ok(None)
        } else {
            cstr(s).map(Some)
        }
    };
    let (source, fstype, data) = (opt(source)?, opt(fstype)?, opt(data)?);
    let target = cstr(target)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a live NUL-terminated string owned above.
    check(unsafe {
        mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data),
        )
    })
}

/// umount2(2); `detach` for MNT_DETACH (lazy: gone from the tree now, released when unused).
pub fn unmount(target: &str, detach: bool) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: a live NUL-terminated string and an integer.
    check(unsafe { umount2(target.as_ptr(), if detach { MNT_DETACH } else { 0 }) })
}

/// chroot(2). Async-signal-safe once `path` is built (call [`chroot_path`] before a fork).
pub fn change_root(path: &CStr) -> io::Result<()> {
    // SAFETY: a live NUL-terminated string.
    check(unsafe { chroot(path.as_ptr()) })
}

/// chdir(2), async-signal-safe.
pub fn change_dir(path: &CStr) -> io::Result<()> {
    // SAFETY: a live NUL-terminated string.
    check(unsafe { chdir(path.as_ptr()) })
}

pub fn chroot_path(path: &str) -> io::Result<CString> {
    cstr(path)
}

/// Loads a kernel module from an open file (finit_module(2)); `compressed` lets the kernel
/// decompress it (MODULE_INIT_COMPRESSED_FILE).
pub fn load_module(file: &File, compressed: bool) -> io::Result<()> {
    let params = c"";
    let flags: i64 = if compressed { 4 } else { 0 };
    // SAFETY: finit_module takes an fd, a NUL-terminated string that lives through the call
    // and integer flags.
    let rc = unsafe {
        syscall(
            SYS_FINIT_MODULE,
            i64::from(file.as_raw_fd()),
            params.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live byte slice.
    check(unsafe { sethostname(name.as_ptr().cast(), name.len()) })
}

/// Powers off (`restart` false) or reboots the machine at once. Returns only on failure.
pub fn power(restart: bool) -> io::Error {
    let cmd = if restart {
        LINUX_REBOOT_CMD_RESTART
    } else {
        LINUX_REBOOT_CMD_POWER_OFF
    };
    // SAFETY: reboot(2) takes an integer command.
    unsafe { reboot(cmd) };
    io::Error::last_os_error()
}

/// Sends `sig` to every process but init itself.
pub fn kill_all(sig: i32) {
    // SAFETY: kill(2) takes plain integers.
    unsafe {
        kill(-1, sig);
    }
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with status {c}"),
            Exit::Signal(s) => write!(f, "was killed by signal {s}"),
        }
    }
}

/// Reaps one child: `Ok(Some((pid, how)))`, `Ok(None)` when none has ended yet (`block`
/// false), `Err` with ECHILD when there are no children left.
pub fn reap(block: bool) -> io::Result<Option<(i32, Exit)>> {
    let mut status = 0i32;
    loop {
        // SAFETY: status is a live i32 the kernel writes into.
        let pid = unsafe { waitpid(-1, &mut status, if block { 0 } else { WNOHANG }) };
        if pid < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if pid == 0 {
            return Ok(None);
        }
        let how = if status & 0x7f == 0 {
            Exit::Code((status >> 8) & 0xff)
        } else {
            Exit::Signal(status & 0x7f)
        };
        return Ok(Some((pid, how)));
    }
}

/// An AF_INET datagram socket, for the interface ioctls.
pub fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes integers and returns a new fd we own, or -1.
    let fd = unsafe { socket(2, 2 | 0o2000000, 0) }; // AF_INET, SOCK_DGRAM | SOCK_CLOEXEC
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An ioctl whose argument is a struct the caller owns (`struct ifreq`, `struct rtentry`).
pub fn ioctl_struct<T>(fd: &OwnedFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed #[repr(C)] struct of the layout `request`
    // reads and writes (the callers in init/net.rs pass ifreq and rtentry).
    check(unsafe { ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) })
}
