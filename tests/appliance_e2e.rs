//! The appliance boot (issue #13): the flat apt repository its VM-tier test serves to the
//! guest (`deb [trusted=yes] http://10.0.2.2:PORT/ ./`), checked here in the fast tier. The
//! VM-tier tests of the appliance itself land with the appliance.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

#[path = "support/http.rs"]
mod http;
use http::HostHttp;

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
