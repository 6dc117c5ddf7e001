//! VM tier: the appliance boot (issue #13, `infrastructure.boot: appliance`) end to end, with
//! real QEMU (TCG here), the host's kernel and the real agent as init, on the fixture base
//! image. Run with:
//!
//! ```text
//! BUILDER_VM_TESTS=1 BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) \
//!     cargo test --locked --test appliance_e2e -- --nocapture
//! ```
//!
//! Without `BUILDER_VM_TESTS=1` each test is ignored (tests/support/vm_tier.rs); with it, a
//! missing image fails. The kernel is the host's (the newest `/boot/vmlinuz-*` with its
//! modules: `scripts/install-deps` installs Debian's `linux-image-cloud-amd64`); each test
//! builds its initramfs into its own cache folder (`BUILDER_APPLIANCE_CACHE`).
//!
//! An appliance boot costs seconds (the agent's hello 5-8 s after QEMU starts, at load 7 on
//! two shared cores), a full boot (the test stage) 35-60 s or more under TCG: one full boot in
//! all, in (a). One VM at a time. Measured here at load 7: (a) 210 s (its test stage 157 s,
//! the agent up after 95 s of it), (b, c, d) 98 s, (e) 24 s, (f) 23 s; the whole binary 319 s at
//! load 8-10, 210 s at load 5-6.
//!
//! - (a) the example `images/debian-12-base/recipe.yml`, its `infrastructure.boot` overridden
//!   (`builder build --boot appliance`; the example itself is not edited): its components run in the appliance (the build VM's console shows the appliance,
//!   not the guest's own boot), the disk grows to the recipe's `diskSize`, and the result
//!   passes the same test stage as in full mode, in a full boot. Then (g) `builder vm exec
//!   --boot appliance --image <the result> -- cat /etc/os-release`.
//! - (b, c, d) `tests/appliance/reboots-apt-efi.yml` on the UEFI-bootable fixture with
//!   `firmware: uefi` and `network: user`: the steps see no service manager, the guest's
//!   fstab mounted (`/boot/efi`, vfat, with GRUB's EFI binary in it), a container's mounts,
//!   the user network with a resolver; a `Reboot` step and an exit-194 step each continue in
//!   a new appliance (a new boot id); apt installs a package (and its dependency) from a flat
//!   repository this test serves on the host's loopback. `vm exec --boot appliance` on the
//!   base and on the result shows the package there and `/etc/resolv.conf` as the base had it.
//! - (e) an image the appliance cannot read (a blank disk with no partition table, a disk
//!   with only a vfat partition) is a clear error, exit 3, naming what it found and suggesting
//!   `boot: full`, for `vm exec` and for a build; a step that needs a service manager
//!   (`systemctl start`) fails saying the appliance runs none, suggesting `boot: full`.
//! - (f) nothing left behind (QEMU, VM folders, sockets, overlays, temporary files in the
//!   appliance cache) after each success and failure (every test's [`NoLeftovers`] guard), a
//!   build interrupted with SIGINT (exit 130), and one killed with SIGKILL (QEMU goes with it;
//!   the next command cleans up and says so).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// One VM at a time: two TCG guests on two cores only slow each other down.
static SERIAL: Mutex<()> = Mutex::new(());

#[path = "support/vm_tier.rs"]
mod vm_tier;

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

#[path = "support/http.rs"]
mod http;
use http::HostHttp;

#[path = "support/events.rs"]
mod build_events;
use build_events::{events, json_lines, print_stage_times, step_output, step_succeeded};

/// Where a test's appliance (the initramfs builder assembles) is cached: its own folder.
fn appliance_cache(guard: &NoLeftovers) -> PathBuf {
    guard.root().join("appliance-cache")
}

/// `builder ARGS` in the guard's store and runtime folder, from the checkout (the recipes'
/// relative paths), with the fixture as `BUILDER_TEST_IMAGE`/`BUILDER_BASE_IMAGE`; not started.
fn command(guard: &NoLeftovers, image: &Path, args: &[&str]) -> Command {
    let mut cmd = guard.builder_command(args);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BUILDER_TEST_IMAGE", image)
        .env("BUILDER_BASE_IMAGE", image)
        .env("BUILDER_APPLIANCE_CACHE", appliance_cache(guard))
        .stdin(Stdio::null());
    cmd
}

/// `builder ARGS` to its end, echoed on the test's stderr.
fn builder(guard: &NoLeftovers, image: &Path, args: &[&str]) -> Output {
    leftovers::run_echoed(&mut command(guard, image, args), args)
}

/// `builder vm exec --boot appliance --image DISK -- COMMAND…` to its end (timed on stderr).
fn exec_in_appliance(guard: &NoLeftovers, image: &Path, disk: &Path, command: &[&str]) -> Output {
    let disk = disk.to_string_lossy();
    let mut args = vec![
        "vm",
        "exec",
        "--boot",
        "appliance",
        "--accel",
        "tcg",
        "--image",
        &disk,
        "--",
    ];
    args.extend_from_slice(command);
    let started = Instant::now();
    let out = builder(guard, image, &args);
    eprintln!("vm exec took {:.1} s", started.elapsed().as_secs_f64());
    out
}

/// Nothing left of the appliance's cache being written: every entry's name is free of the
/// marks of a temporary file, and a built appliance holds its initramfs.
fn assert_appliance_cache_clean(guard: &NoLeftovers) {
    let cache = appliance_cache(guard);
    let mut entries = Vec::new();
    for e in fs_err::read_dir(&cache).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let inner: Vec<String> = fs_err::read_dir(e.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|i| i.file_name().to_string_lossy().into_owned())
            .collect();
        entries.push((name, inner));
    }
    for (name, inner) in &entries {
        for n in std::iter::once(name).chain(inner) {
            assert!(
                !(n.contains(".tmp") || n.starts_with("tmp") || n.contains(".partial")),
                "a temporary file is left in the appliance cache {}: {entries:?}",
                cache.display()
            );
        }
    }
}

fn stored_build(store: &Path, name: &str) -> PathBuf {
    store.join("images").join(name).join("1.0.0").join("1")
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs_err::read(dir.join("manifest.json")).expect("manifest"))
        .expect("manifest JSON")
}

/// The stored build's first output (its qcow2).
fn first_output(dir: &Path) -> PathBuf {
    let m = manifest(dir);
    let file = dir.join(m["outputs"][0]["file"].as_str().expect("an output"));
    assert!(file.is_file(), "{}", file.display());
    file
}

fn console(dir: &Path, vm: &str) -> String {
    fs_err::read_to_string(dir.join("logs").join(vm).join("console.log"))
        .unwrap_or_else(|e| panic!("{vm}/console.log: {e}"))
}

/// The build VM's console shows the appliance (our init's lines), not the guest's own boot
/// (no firmware, no GRUB, no systemd).
fn assert_booted_the_appliance(console: &str) {
    assert!(
        console.contains("builder-appliance: "),
        "the build VM did not boot the appliance:\n{console}"
    );
    for guest_boot in ["BdsDxe", "GRUB", "systemd["] {
        assert!(
            !console.contains(guest_boot),
            "`{guest_boot}` on the appliance's console:\n{console}"
        );
    }
}

/// The `agent up after N s` of the build VM's boot, printed (what an appliance boot costs;
/// no test asserts on times).
fn agent_up(all: &[serde_json::Value]) -> Vec<String> {
    events(all, "progress")
        .iter()
        .filter(|e| e["stage"] == "boot")
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.starts_with("agent up after"))
        .map(str::to_string)
        .collect()
}

/// (a) and (g): the example base image built in the appliance (`--boot appliance`) passes the full-boot test stage; `vm exec --boot appliance` reads the result.
#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn example_recipe_built_in_the_appliance_passes_its_full_boot_test_stage() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();
    let args = [
        "build",
        "images/debian-12-base/recipe.yml",
        "--boot",
        "appliance",
        "--json",
        "--accel",
        "tcg",
    ];
    let started = Instant::now();
    let out = builder(&guard, &image, &args);
    eprintln!("the build took {:.1} s", started.elapsed().as_secs_f64());
    let all = json_lines(&out.stdout);
    print_stage_times(&all);
    eprintln!("build VM: {:?}", agent_up(&all));
    assert_eq!(out.status.code(), Some(0), "the example failed to build");
    // Every test step passed, in the test VM.
    let test_steps = events(&all, "stepFinished")
        .into_iter()
        .filter(|e| e["phase"] == "test")
        .collect::<Vec<_>>();
    assert!(!test_steps.is_empty(), "no test step ran");
    for e in test_steps {
        assert_eq!(e["status"], "success", "{e}");
    }

    let dir = stored_build(&guard.store(), "debian-12-base");
    let m = manifest(&dir);
    assert_eq!(m["status"], "success", "{m:#}");
    // The same test stage as in full mode (tests/build_e2e.rs builds it that way), passed.
    assert_eq!(m["tests"][0]["component"], "test-basics", "{m:#}");
    assert_eq!(m["tests"][0]["status"], "success", "{m:#}");
    assert_eq!(m["host"]["boot"], "appliance", "{}", m["host"]);
    // The image's apt sources (the fixture has the host's bookworm ones) and its keys, read
    // in the appliance before generalizing, for the package update check.
    let sources = &m["packageSources"];
    assert_eq!(sources["manager"], "apt", "{sources:#}");
    assert_eq!(sources["architectures"][0], "amd64", "{sources:#}");
    let texts: Vec<&str> = sources["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["text"].as_str())
        .collect();
    assert!(texts.iter().any(|t| t.contains("bookworm")), "{sources:#}");
    assert!(
        sources["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .any(
                |k| k["path"] == "/usr/share/keyrings/debian-archive-keyring.gpg"
                    && k["data"].as_str().is_some_and(|d| !d.is_empty())
            ),
        "{sources:#}"
    );
    assert!(
        m.get("packageChanges").is_none(),
        "the store had no earlier build"
    );
    assert_booted_the_appliance(&console(&dir, "build-vm"));
    // The test stage booted the result for real: the guest's own boot, not the appliance.
    let test_vm = console(&dir, "test-vm");
    assert!(
        !test_vm.contains("builder-appliance: "),
        "the test stage booted the appliance:\n{test_vm}"
    );
    let qcow2 = first_output(&dir);
    assert_appliance_cache_clean(&guard);

    // (g) The result, read in the appliance: Debian, with the components' changes, its root
    // file system grown to the recipe's 4 GiB (the appliance has no cloud-init to do it).
    let out = exec_in_appliance(
        &guard,
        &image,
        &qcow2,
        &[
            "sh",
            "-c",
            "cat /etc/os-release; cat /etc/motd; df -k --output=size / | tail -n 1",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("ID=debian"), "{stdout}");
    assert!(stdout.contains("VERSION_ID=\"12\""), "{stdout}");
    assert!(stdout.contains("Welcome to debian-12-base"), "{stdout}");
    let root_kib: u64 = stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size of / in:\n{stdout}"));
    assert!(
        root_kib > 3 << 20,
        "the root file system was not grown to diskSize 4GiB: {root_kib} KiB"
    );
    assert_appliance_cache_clean(&guard);
}

/// A Debian package (`Architecture: all`) made with `dpkg-deb`, in `dir`, holding `files`
/// (paths relative to `/`, mode 0755): its file name and
/// its `Packages` stanza.
fn deb(dir: &Path, name: &str, depends: Option<&str>, files: &[(&str, &str)]) -> (String, String) {
    let tree = dir.join(format!("{name}-tree"));
    fs_err::create_dir_all(tree.join("DEBIAN")).expect("mkdir DEBIAN");
    let control = format!(
        "Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: builder tests <tests@example.invalid>\n{}Description: builder's appliance test package\n",
        depends
            .map(|d| format!("Depends: {d}\n"))
            .unwrap_or_default()
    );
    fs_err::write(tree.join("DEBIAN/control"), &control).expect("control");
    for (path, text) in files {
        let file = tree.join(path.trim_start_matches('/'));
        fs_err::create_dir_all(file.parent().expect("a parent")).expect("mkdir");
        fs_err::write(&file, text).expect("write a package file");
        fs_err::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let file = format!("{name}_1.0_all.deb");
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(dir.join(&file))
        .output()
        .expect("dpkg-deb runs");
    assert!(
        out.status.success(),
        "dpkg-deb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = fs_err::read(dir.join(&file)).expect("read the .deb");
    let stanza = format!(
        "{control}Filename: ./{file}\nSize: {}\nSHA256: {}\n",
        bytes.len(),
        hex::encode(Sha256::digest(&bytes))
    );
    (file, stanza)
}

/// A flat apt repository (`deb [trusted=yes] http://HOST/ ./`): `e2e-hello` (a command that
/// prints a greeting) depending on `e2e-dep` (the greeting); the files to serve.
fn flat_repository(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fs_err::create_dir_all(dir).expect("mkdir repo");
    let dep = deb(
        dir,
        "e2e-dep",
        None,
        &[(
            "usr/share/e2e-dep/greeting",
            "hello from the host's repository\n",
        )],
    );
    let hello = deb(
        dir,
        "e2e-hello",
        Some("e2e-dep (>= 1.0)"),
        &[(
            "usr/bin/e2e-hello",
            "#!/bin/sh\ncat /usr/share/e2e-dep/greeting\n",
        )],
    );
    let mut files = Vec::new();
    let mut packages = String::new();
    for (file, stanza) in [dep, hello] {
        packages.push_str(&stanza);
        packages.push('\n');
        files.push((
            format!("/{file}"),
            fs_err::read(dir.join(&file)).expect("deb"),
        ));
    }
    files.push(("/Packages".to_string(), packages.into_bytes()));
    files
}

/// `GET path` on the loopback port, as HTTP/1.1 clients (apt) ask: the status line and body.
fn get(port: u16, path: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 10.0.2.2:{port}\r\nUser-Agent: Debian APT-HTTP/1.3\r\n\r\n"
    )
    .expect("request");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("answer");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, answer[split + 4..].to_vec())
}

/// Fast tier: the flat repository (c) is what apt reads, served as apt asks for it
/// (`/./Packages`, the other compressions 404), each package's size and sha256 as its stanza
/// says.
#[test]
fn the_flat_repository_is_served_as_apt_asks_for_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = HostHttp::start(flat_repository(dir.path()));
    let (status, _) = get(server.port, "/./InRelease");
    assert_eq!(status, "HTTP/1.0 404 Not Found");
    let (status, _) = get(server.port, "/./Packages.xz");
    assert_eq!(status, "HTTP/1.0 404 Not Found");
    let (status, packages) = get(server.port, "/./Packages");
    assert_eq!(status, "HTTP/1.0 200 OK");
    let packages = String::from_utf8(packages).expect("UTF-8 index");
    let stanzas: Vec<&str> = packages.split("\n\n").filter(|s| !s.is_empty()).collect();
    assert_eq!(stanzas.len(), 2, "{packages}");
    for stanza in stanzas {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_else(|| panic!("no {name} in:\n{stanza}"))
        };
        let (status, deb) = get(server.port, &format!("/{}", field("Filename")));
        assert_eq!(status, "HTTP/1.0 200 OK");
        assert_eq!(deb.len().to_string(), field("Size"));
        assert_eq!(hex::encode(Sha256::digest(&deb)), field("SHA256"));
        assert!(deb.starts_with(b"!<arch>\ndebian-binary"), "not a .deb");
    }
    assert!(packages.contains("Package: e2e-hello\n"));
    assert!(packages.contains("Depends: e2e-dep (>= 1.0)\n"));
    assert_eq!(server.requests()[0], "GET /./InRelease HTTP/1.1");
}

/// (b, c, d) Reboots, apt from the host over the user network, /boot/efi from the guest's
/// fstab, in the appliance; `vm exec --boot appliance` on the base and on the result.
#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn appliance_reboots_installs_from_the_host_and_mounts_the_esp() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();
    let server = HostHttp::start(flat_repository(&guard.root().join("repo")));

    // The base as the appliance sees it, without a network: (g) on the fixture, and what its
    // /etc/resolv.conf is before a build with `network: user` ran in it.
    const LOOK: &str = "cat /etc/os-release; echo \"resolv.conf: $(stat -c '%F %s %N' /etc/resolv.conf 2>&1)\"; dpkg-query -W -f '${Package} ${Version}\\n' e2e-hello 2>&1 || true";
    let look = |disk: &Path| -> String {
        let out = exec_in_appliance(&guard, &image, disk, &["sh", "-c", LOOK]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        assert!(stdout.contains("ID=debian"), "{stdout}");
        stdout
    };
    let before = look(&image);
    let resolv = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("resolv.conf: "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no resolv.conf line in:\n{text}"))
    };
    assert!(
        before.contains("no packages found matching e2e-hello"),
        "{before}"
    );

    let recipe = guard.root().join("reboots-apt-efi.yml");
    let text = fs_err::read_to_string("tests/appliance/reboots-apt-efi.yml")
        .expect("the recipe")
        .replace(
            "path: components/",
            &format!(
                "path: {}/tests/appliance/components/",
                env!("CARGO_MANIFEST_DIR")
            ),
        )
        .replace(
            "path: ../build/",
            &format!("path: {}/tests/build/", env!("CARGO_MANIFEST_DIR")),
        )
        .replace("\"PORT\"", &format!("\"{}\"", server.port));
    fs_err::write(&recipe, text).expect("write the recipe copy");
    let recipe = recipe.to_string_lossy().into_owned();
    let started = Instant::now();
    let out = builder(
        &guard,
        &image,
        &["build", &recipe, "--json", "--accel", "tcg"],
    );
    eprintln!("the build took {:.1} s", started.elapsed().as_secs_f64());
    let all = json_lines(&out.stdout);
    print_stage_times(&all);
    eprintln!("build VM: {:?}", agent_up(&all));
    assert_eq!(out.status.code(), Some(0), "the build failed");

    // In the appliance, chrooted into the guest's root, the ESP mounted from its fstab.
    for step in [
        "NoServiceManager",
        "GuestRoot",
        "EfiMounted",
        "ContainerMounts",
        "UserNetwork",
    ] {
        assert!(step_succeeded(&all, "build", step), "{step} failed");
    }
    assert_eq!(step_output(&all, "build", "GuestRoot"), ["debian 12"]);
    assert_eq!(step_output(&all, "build", "EfiMounted"), ["vfat"]);
    // (b) Both reboots continued in a new appliance.
    let started_count = |step: &str| {
        events(&all, "stepStarted")
            .iter()
            .filter(|e| e["step"] == step)
            .count()
    };
    assert_eq!(started_count("RebootNow"), 1);
    for step in ["BootIdChanged", "MountedAgain", "ResumedInANewBoot"] {
        assert!(step_succeeded(&all, "build", step), "{step} failed");
    }
    assert_ne!(
        step_output(&all, "build", "BootIdBefore"),
        step_output(&all, "build", "BootIdAfter")
    );
    assert_eq!(
        started_count("RebootAndResume"),
        2,
        "the exit-194 step ran before and after its reboot"
    );
    // (c) apt fetched the index and both packages from this test's server, and installed
    // them.
    assert_eq!(
        step_output(&all, "build", "RunIt"),
        ["hello from the host's repository"]
    );
    let requests = server.requests();
    for file in [
        "/Packages",
        "/e2e-dep_1.0_all.deb",
        "/e2e-hello_1.0_all.deb",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.replace("/./", "/").starts_with(&format!("GET {file} "))),
            "apt did not fetch {file}: {requests:?}"
        );
    }
    assert!(step_succeeded(&all, "validate", "Installed"));

    let dir = stored_build(&guard.store(), "e2e-appliance");
    let m = manifest(&dir);
    assert_eq!(m["status"], "success", "{m:#}");
    assert_eq!(m["host"]["boot"], "appliance", "{}", m["host"]);
    let build_vm = console(&dir, "build-vm");
    assert_booted_the_appliance(&build_vm);
    assert!(
        build_vm.contains("/boot/efi"),
        "the appliance does not say it mounted /boot/efi:\n{build_vm}"
    );

    // (g) The result, read in the appliance: the package is there, and /etc/resolv.conf is
    // as the base had it (the appliance's resolver never reached the image).
    let after = look(&first_output(&dir));
    assert!(after.contains("e2e-hello 1.0"), "{after}");
    assert_eq!(resolv(&after), resolv(&before));
    assert_appliance_cache_clean(&guard);
}

/// A raw disk with an MBR and one vfat partition (no root file system anywhere).
fn vfat_only_disk(path: &Path) {
    let file = fs_err::File::create(path).expect("create the disk");
    file.set_len(64 << 20).expect("size the disk");
    drop(file);
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk runs");
    std::io::Write::write_all(
        sfdisk.stdin.as_mut().expect("piped"),
        b"label: dos\nstart=2048, size=129024, type=c\n",
    )
    .expect("partition table");
    drop(sfdisk.stdin.take());
    assert!(sfdisk.wait().expect("sfdisk").success(), "sfdisk failed");
    // The partition: 129024 sectors from sector 2048 (mkfs.vfat counts 1 KiB blocks).
    let status = Command::new("mkfs.vfat")
        .args(["-n", "ONLYVFAT", "--offset", "2048"])
        .arg(path)
        .arg("64512")
        .stdout(Stdio::null())
        .status()
        .expect("mkfs.vfat runs");
    assert!(status.success(), "mkfs.vfat failed");
}

/// The error for a disk the appliance cannot read: exit 3, what it found, `boot: full`.
fn assert_unreadable(out: &Output, found: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("boot: full"), "no hint: {stderr}");
    for what in found {
        assert!(stderr.contains(what), "`{what}` not said: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// (e) Disks the appliance cannot read, and a step that needs a service manager: clear
/// errors, and nothing left behind.
#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn what_the_appliance_cannot_do_is_a_clear_error() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();

    // A blank disk: no partition table, no file system.
    let blank = guard.root().join("blank.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&blank)
        .arg("1G")
        .status()
        .expect("qemu-img runs");
    assert!(status.success());
    let out = exec_in_appliance(&guard, &image, &blank, &["true"]);
    assert_unreadable(&out, &["no root file system", "vda"]);
    assert!(
        guard.wait_clean(Duration::from_secs(30)).is_empty(),
        "{:?}",
        guard.leftovers()
    );

    // A disk with only a vfat partition, as a build's parent.
    let vfat = guard.root().join("only-vfat.raw");
    vfat_only_disk(&vfat);
    fs_err::write(
        guard.root().join("nothing.yml"),
        "name: nothing\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Nothing\n        action: ExecuteBash\n        inputs:\n          commands:\n            - \"true\"\n",
    )
    .expect("write the component");
    let recipe = guard.root().join("only-vfat.yml");
    fs_err::write(
        &recipe,
        format!(
            "name: e2e-only-vfat\nversion: 1.0.0\nparentImage: {}\ncomponents:\n  - path: nothing.yml\ninfrastructure: {{memory: 1GiB, network: none, boot: appliance}}\ntests: {{enabled: false}}\ngeneralize: false\noutputs: {{formats: [qcow2], compression: none}}\n",
            vfat.display(),
        ),
    )
    .expect("write the recipe");
    let recipe = recipe.to_string_lossy().into_owned();
    let out = builder(&guard, &image, &["build", &recipe, "--accel", "tcg"]);
    assert_unreadable(&out, &["no root file system", "vda1", "vfat"]);
    assert!(
        guard.wait_clean(Duration::from_secs(30)).is_empty(),
        "{:?}",
        guard.leftovers()
    );

    // A step that starts a service: the appliance runs no service manager, and says so.
    let recipe = guard.root().join("needs-systemd.yml");
    fs_err::write(
        &recipe,
        format!(
            "name: e2e-needs-systemd\nversion: 1.0.0\nparentImage: {}\ncomponents:\n  - path: {}/tests/appliance/components/starts-a-service.yml\ninfrastructure: {{memory: 1GiB, network: none, boot: appliance}}\ntests: {{enabled: false}}\ngeneralize: false\noutputs: {{formats: [qcow2], compression: none}}\n",
            image.display(),
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .expect("write the recipe");
    let recipe = recipe.to_string_lossy().into_owned();
    let out = builder(&guard, &image, &["build", &recipe, "--accel", "tcg"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("StartService"), "the failed step: {stderr}");
    assert!(stderr.contains("service manager"), "no reason: {stderr}");
    assert!(stderr.contains("boot: full"), "no hint: {stderr}");
    assert_appliance_cache_clean(&guard);
}

/// `builder build` of the waiting recipe, started; returns once its component says it waits.
fn start_waiting_build(guard: &NoLeftovers, image: &Path) -> Child {
    let args = ["build", "tests/appliance/waits.yml", "--accel", "tcg"];
    let (child, _, _) = leftovers::spawn_until(
        &mut command(guard, image, &args),
        "WAITING-FOR-THE-MARKER",
        Duration::from_secs(10 * 60),
    );
    child
}

/// (f) An appliance build interrupted with SIGINT stops cleanly (exit 130, nothing left); one
/// killed with SIGKILL takes its QEMU with it, and the next command cleans up and says so.
#[test]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
fn an_interrupted_or_killed_appliance_build_leaves_nothing() {
    let image = vm_tier::test_image();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let guard = NoLeftovers::new();

    // SIGINT, as Ctrl-C.
    let mut child = start_waiting_build(&guard, &image);
    assert_eq!(guard.qemus().len(), 1, "one QEMU");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = child.wait().expect("builder exits");
    assert_eq!(status.code(), Some(130), "interrupted");
    let left = guard.wait_clean(Duration::from_secs(60));
    assert!(
        left.is_empty(),
        "left behind after SIGINT:\n  {}",
        left.join("\n  ")
    );
    assert_appliance_cache_clean(&guard);

    // SIGKILL: nothing of builder runs after it; its QEMU dies with it.
    let mut child = start_waiting_build(&guard, &image);
    guard.kill_builder_and_its_qemu(&mut child);
    // What the killed build left (its disk chain, its staging folder) the next command
    // cleans up, and says so.
    let out = builder(&guard, &image, &["images", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("note: cleaned up the abandoned build e2e-appliance-wait/1.0.0/")
            && stderr.contains(&format!("pid {}", child.id())),
        "{stderr}"
    );
    let left = guard.wait_clean(Duration::from_secs(60));
    assert!(
        left.is_empty(),
        "left behind after SIGKILL:\n  {}",
        left.join("\n  ")
    );
    assert_appliance_cache_clean(&guard);
}
