//! The QEMU command line, built by one pure function from a typed [`VmSpec`].
//!
//! Nothing here touches the machine: the spec already holds resolved paths and the chosen
//! accelerator, so the function is tested with tables. Every argument is an option/value pair;
//! paths inside `key=value` lists have their commas doubled, as QEMU's option parser requires.
//! No TCP port is ever opened: QMP, the agent and the console are unix sockets or files.

use std::path::{Path, PathBuf};

use crate::recipe::Network;

/// The accelerator QEMU runs with (already decided: see [`crate::vm::accel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Image format of a firmware or disk file, as QEMU names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Platform firmware, resolved to files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareFiles {
    /// QEMU's built-in SeaBIOS.
    Bios,
    /// UEFI through two pflash devices: the read-only code and this VM's private copy of the
    /// variable store (never the shared template, so one VM's NVRAM cannot leak into another).
    Uefi {
        code: PathBuf,
        code_format: DiskFormat,
        vars: PathBuf,
        vars_format: DiskFormat,
    },
}

/// A virtio-serial port backed by a unix socket on which QEMU listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialPort {
    /// The name the guest sees under `/dev/virtio-ports/`.
    pub name: String,
    pub socket: PathBuf,
}

/// A Linux kernel QEMU boots itself (`-kernel`, `-initrd`, `-append`): no firmware boot
/// menu, no bootloader. The appliance boot (see [`crate::vm::appliance`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectKernel {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line.
    pub append: String,
}

/// Everything QEMU needs to know about one VM, with every path resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Shown by `ps` and in QMP; also the process name.
    pub name: String,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    pub firmware: FirmwareFiles,
    /// Boot this kernel instead of the disk's bootloader (with BIOS firmware: SeaBIOS loads
    /// it, no UEFI is needed).
    pub direct_kernel: Option<DirectKernel>,
    /// The VM's own writable disk (an overlay on the base image).
    pub disk: PathBuf,
    pub disk_format: DiskFormat,
    /// The cloud-init NoCloud seed (vfat, label CIDATA), attached read-only.
    pub seed: Option<PathBuf>,
    /// virtio-serial ports (our agent, qemu-guest-agent).
    pub ports: Vec<SerialPort>,
    pub network: Network,
    pub qmp_socket: PathBuf,
    /// The guest's first serial port (kernel console, GRUB) is written here.
    pub console_log: PathBuf,
    pub pidfile: PathBuf,
}

/// One QEMU option and its value (`None` for a flag such as `-nodefaults`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuArg {
    pub option: &'static str,
    pub value: Option<String>,
}

fn arg(option: &'static str, value: impl Into<String>) -> QemuArg {
    QemuArg {
        option,
        value: Some(value.into()),
    }
}

fn flag(option: &'static str) -> QemuArg {
    QemuArg {
        option,
        value: None,
    }
}

/// A path as a value inside a QEMU `key=value,...` list: commas are doubled.
fn qpath(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The QEMU arguments for `spec`, in order, as option/value pairs.
pub fn qemu_args(spec: &VmSpec) -> Vec<QemuArg> {
    let mut args = vec![
        arg(
            "-name",
            format!(
                "{},process={}",
                spec.name.replace(',', ",,"),
                spec.name.replace(',', ",,")
            ),
        ),
        // No default devices (no VGA, no default NIC, no floppy, no CD-ROM, no monitor on
        // stdio): every device the guest gets is listed below.
        flag("-nodefaults"),
        arg("-display", "none"),
        arg("-machine", "q35"),
        arg("-accel", spec.accel.as_str()),
        // `host` passes the real CPU through under KVM; TCG emulates the most capable model
        // it knows, which boots as fast as `qemu64` and offers modern instructions.
        arg(
            "-cpu",
            match spec.accel {
                Accel::Kvm => "host",
                Accel::Tcg => "max",
            },
        ),
        arg("-smp", spec.cpus.to_string()),
        arg("-m", format!("{}M", spec.memory_mib)),
        // A guest reboot is a reset (steps reboot the guest); a kernel panic pauses the VM so
        // the host sees GUEST_PANICKED and reports it instead of a silent stop.
        arg("-action", "reboot=reset,shutdown=poweroff,panic=pause"),
        // pvpanic turns a guest kernel panic into the GUEST_PANICKED QMP event.
        arg("-device", "pvpanic"),
        // Entropy from the host, so early boot (and ssh host keys) never wait for randomness.
        arg("-device", "virtio-rng-pci"),
    ];

    if let FirmwareFiles::Uefi {
        code,
        code_format,
        vars,
        vars_format,
    } = &spec.firmware
    {
        args.push(arg(
            "-drive",
            format!(
                "if=pflash,unit=0,format={},readonly=on,file={}",
                code_format.as_str(),
                qpath(code)
            ),
        ));
        args.push(arg(
            "-drive",
            format!(
                "if=pflash,unit=1,format={},file={}",
                vars_format.as_str(),
                qpath(vars)
            ),
        ));
    }

    if let Some(direct) = &spec.direct_kernel {
        // Plain values, not `key=value` lists: no comma doubling.
        args.push(arg("-kernel", direct.kernel.to_string_lossy()));
        args.push(arg("-initrd", direct.initrd.to_string_lossy()));
        args.push(arg("-append", direct.append.clone()));
    }

    // discard=unmap + detect-zeroes=unmap: space the guest frees (fstrim) or zeroes is
    // released from the overlay, so exported images stay small.
    args.push(arg(
        "-drive",
        format!(
            "if=none,id=disk0,format={},file={},discard=unmap,detect-zeroes=unmap,cache=writeback",
            spec.disk_format.as_str(),
            qpath(&spec.disk)
        ),
    ));
    // The disk boots first; with a kernel of our own, the firmware boots that instead.
    args.push(arg(
        "-device",
        if spec.direct_kernel.is_some() {
            "virtio-blk-pci,drive=disk0"
        } else {
            "virtio-blk-pci,drive=disk0,bootindex=0"
        },
    ));

    if let Some(seed) = &spec.seed {
        args.push(arg(
            "-drive",
            format!(
                "if=none,id=seed0,format=raw,readonly=on,file={}",
                qpath(seed)
            ),
        ));
        args.push(arg("-device", "virtio-blk-pci,drive=seed0"));
    }

    if !spec.ports.is_empty() {
        args.push(arg("-device", "virtio-serial-pci,id=vser0"));
        for (i, port) in spec.ports.iter().enumerate() {
            // server=on,wait=off: QEMU listens and boots without waiting for us; the host
            // connects before the guest opens the port (a guest reading an unconnected port
            // sees end-of-file).
            args.push(arg(
                "-chardev",
                format!(
                    "socket,id=port{i},path={},server=on,wait=off",
                    qpath(&port.socket)
                ),
            ));
            args.push(arg(
                "-device",
                format!(
                    "virtserialport,bus=vser0.0,chardev=port{i},name={}",
                    port.name.replace(',', ",,")
                ),
            ));
        }
    }

    args.push(arg(
        "-chardev",
        format!("file,id=console0,path={}", qpath(&spec.console_log)),
    ));
    args.push(arg("-serial", "chardev:console0"));

    match spec.network {
        // Never a port forward: the host talks to the guest over virtio-serial only.
        Network::None => args.push(arg("-nic", "none")),
        // No hostfwd: nothing listens on the host for this guest.
        Network::User => args.push(arg("-nic", "user,model=virtio-net-pci")),
    }

    args.push(arg(
        "-chardev",
        format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            qpath(&spec.qmp_socket)
        ),
    ));
    args.push(arg("-mon", "chardev=qmp0,mode=control"));
    args.push(arg("-pidfile", spec.pidfile.to_string_lossy()));
    args
}

/// [`qemu_args`] flattened into the argv that follows the program name.
pub fn qemu_argv(spec: &VmSpec) -> Vec<String> {
    qemu_args(spec)
        .into_iter()
        .flat_map(|a| std::iter::once(a.option.to_string()).chain(a.value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_spec() -> VmSpec {
        VmSpec {
            name: "builder-vm-ab12".into(),
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 1024,
            firmware: FirmwareFiles::Bios,
            direct_kernel: None,
            disk: "/run/b/disk.qcow2".into(),
            disk_format: DiskFormat::Qcow2,
            seed: Some("/run/b/seed.img".into()),
            ports: vec![SerialPort {
                name: "org.builder.agent.0".into(),
                socket: "/run/b/agent.sock".into(),
            }],
            network: Network::None,
            qmp_socket: "/run/b/qmp.sock".into(),
            console_log: "/run/b/console.log".into(),
            pidfile: "/run/b/qemu.pid".into(),
        }
    }

    fn values<'a>(args: &'a [QemuArg], option: &str) -> Vec<&'a str> {
        args.iter()
            .filter(|a| a.option == option)
            .filter_map(|a| a.value.as_deref())
            .collect()
    }

    /// An appliance boot as `RunningVm::boot` makes it: the kernel, no seed, BIOS.
    fn appliance(s: &mut VmSpec) {
        s.seed = None;
        s.direct_kernel = Some(DirectKernel {
            kernel: "/boot/vmlinuz-6.1.0-57-cloud-amd64".into(),
            initrd: "/cache/a,b/initrd.cpio".into(),
            append: "console=ttyS0 builder.appliance=1".into(),
        });
    }

    #[test]
    fn table_of_specs_to_arguments() {
        // What the case shows, the change to the base spec, the option, its values in order.
        type Change = fn(&mut VmSpec);
        #[rustfmt::skip]
        let cases: Vec<(&str, Change, &str, Vec<&str>)> = vec![
            ("tcg emulates the max cpu", |_| {}, "-cpu", vec!["max"]),
            ("kvm passes the host cpu through", |s| s.accel = Accel::Kvm, "-cpu", vec!["host"]),
            ("accelerator", |s| s.accel = Accel::Kvm, "-accel", vec!["kvm"]),
            ("machine", |_| {}, "-machine", vec!["q35"]),
            ("cpus", |s| s.cpus = 4, "-smp", vec!["4"]),
            ("memory in MiB", |s| s.memory_mib = 2048, "-m", vec!["2048M"]),
            ("no network card", |_| {}, "-nic", vec!["none"]),
            ("user network without port forwards", |s| s.network = Network::User, "-nic", vec!["user,model=virtio-net-pci"]),
            ("bios: only the disk and the seed drives", |_| {}, "-drive", vec![
                "if=none,id=disk0,format=qcow2,file=/run/b/disk.qcow2,discard=unmap,detect-zeroes=unmap,cache=writeback",
                "if=none,id=seed0,format=raw,readonly=on,file=/run/b/seed.img",
            ]),
            ("uefi: read-only code, private vars, then the disks", |s| {
                s.seed = None;
                s.firmware = FirmwareFiles::Uefi {
                    code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                    code_format: DiskFormat::Raw,
                    vars: "/run/b/vars.fd".into(),
                    vars_format: DiskFormat::Raw,
                }
            }, "-drive", vec![
                "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                "if=pflash,unit=1,format=raw,file=/run/b/vars.fd",
                "if=none,id=disk0,format=qcow2,file=/run/b/disk.qcow2,discard=unmap,detect-zeroes=unmap,cache=writeback",
            ]),
            ("commas in paths are doubled", |s| {
                s.disk = "/tmp/a,b/disk.qcow2".into();
                s.seed = None;
            }, "-drive", vec![
                "if=none,id=disk0,format=qcow2,file=/tmp/a,,b/disk.qcow2,discard=unmap,detect-zeroes=unmap,cache=writeback",
            ]),
            ("agent port and qmp on unix sockets, console to a file", |_| {}, "-chardev", vec![
                "socket,id=port0,path=/run/b/agent.sock,server=on,wait=off",
                "file,id=console0,path=/run/b/console.log",
                "socket,id=qmp0,path=/run/b/qmp.sock,server=on,wait=off",
            ]),
            ("two virtio-serial ports", |s| {
                s.ports.push(SerialPort {
                    name: "org.qemu.guest_agent.0".into(),
                    socket: "/run/b/qga.sock".into(),
                })
            }, "-device", vec![
                "pvpanic",
                "virtio-rng-pci",
                "virtio-blk-pci,drive=disk0,bootindex=0",
                "virtio-blk-pci,drive=seed0",
                "virtio-serial-pci,id=vser0",
                "virtserialport,bus=vser0.0,chardev=port0,name=org.builder.agent.0",
                "virtserialport,bus=vser0.0,chardev=port1,name=org.qemu.guest_agent.0",
            ]),
            ("no ports: no virtio-serial controller", |s| s.ports.clear(), "-device", vec![
                "pvpanic",
                "virtio-rng-pci",
                "virtio-blk-pci,drive=disk0,bootindex=0",
                "virtio-blk-pci,drive=seed0",
            ]),
            ("serial console", |_| {}, "-serial", vec!["chardev:console0"]),
            ("qmp monitor", |_| {}, "-mon", vec!["chardev=qmp0,mode=control"]),
            ("reboots reset, panics pause", |_| {}, "-action", vec!["reboot=reset,shutdown=poweroff,panic=pause"]),
            ("no direct kernel boot by default", |_| {}, "-kernel", vec![]),
            ("direct kernel: the kernel", appliance, "-kernel", vec!["/boot/vmlinuz-6.1.0-57-cloud-amd64"]),
            ("direct kernel: the initramfs", appliance, "-initrd", vec!["/cache/a,b/initrd.cpio"]),
            ("direct kernel: the command line as one value", appliance, "-append", vec!["console=ttyS0 builder.appliance=1"]),
            ("direct kernel: a reboot still resets (it boots the appliance again)", appliance, "-action", vec!["reboot=reset,shutdown=poweroff,panic=pause"]),
            ("direct kernel: no seed, no pflash, the disk without a boot index", appliance, "-drive", vec![
                "if=none,id=disk0,format=qcow2,file=/run/b/disk.qcow2,discard=unmap,detect-zeroes=unmap,cache=writeback",
            ]),
            ("direct kernel: the same ports and devices", appliance, "-device", vec![
                "pvpanic",
                "virtio-rng-pci",
                "virtio-blk-pci,drive=disk0",
                "virtio-serial-pci,id=vser0",
                "virtserialport,bus=vser0.0,chardev=port0,name=org.builder.agent.0",
            ]),
            ("direct kernel: console, agent and qmp as before", appliance, "-chardev", vec![
                "socket,id=port0,path=/run/b/agent.sock,server=on,wait=off",
                "file,id=console0,path=/run/b/console.log",
                "socket,id=qmp0,path=/run/b/qmp.sock,server=on,wait=off",
            ]),
        ];
        for (what, change, option, expect) in cases {
            let mut spec = base_spec();
            change(&mut spec);
            assert_eq!(values(&qemu_args(&spec), option), expect, "{what}");
        }
    }

    #[test]
    fn never_a_tcp_port_or_a_display() {
        let mut spec = base_spec();
        spec.network = Network::User;
        let argv = qemu_argv(&spec).join(" ");
        for forbidden in [
            "tcp:",
            "hostfwd",
            "-vnc",
            "telnet",
            "-nographic",
            "host=",
            "port=",
        ] {
            assert!(!argv.contains(forbidden), "{forbidden} in {argv}");
        }
        assert!(argv.contains("-nodefaults"));
        assert!(argv.contains("-display none"));
    }

    #[test]
    fn flags_have_no_value_and_argv_pairs_up() {
        let spec = base_spec();
        let args = qemu_args(&spec);
        let argv = qemu_argv(&spec);
        let expected_len: usize = args
            .iter()
            .map(|a| 1 + usize::from(a.value.is_some()))
            .sum();
        assert_eq!(argv.len(), expected_len);
        assert_eq!(argv[0], "-name");
        assert_eq!(argv[1], "builder-vm-ab12,process=builder-vm-ab12");
        assert_eq!(argv[2], "-nodefaults");
        assert_eq!(values(&args, "-pidfile"), vec!["/run/b/qemu.pid"]);
    }
}
