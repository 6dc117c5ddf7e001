//! builder-agent: the guest side of builder. A small static binary that serves the host over
//! a virtio-serial port: exec, file transfer, stat/list, sync, reboot, poweroff. The protocol
//! is `src/agent/protocol.rs` in the main crate, included here by path.
//!
//! Threads, not async: one reader per connection dispatches frames; each exec and each
//! transfer runs on its own thread, so a slow disk or a chatty command never stalls the
//! others. The agent never exits on its own: when the port reports end-of-file (the host is
//! not connected yet, or went away) it closes it, waits a moment and opens it again.
//!
//! `--container` is the exception: builder runs the agent as a container build's `RUN`
//! instruction, connected to a unix socket. It serves that one connection and then exits: 0
//! when the host sends `Poweroff` (the run is over and the instruction succeeds), 1 when the
//! connection ends without it (the host went away: the build must fail). A container cannot
//! reboot: `Reboot` is refused.
//!
//! It writes nothing to the guest except what it is asked to, and never prints request
//! contents (an exec's `secret_env` values in particular).

// `expect` is reviewed here as in the library (see src/lib.rs); tests are exempt.
#![warn(clippy::expect_used)]

#[path = "../../src/agent/protocol.rs"]
#[allow(dead_code)]
mod protocol;

mod exec;
mod files;
mod init;
mod sys;

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::{Frame, HelloInfo, Message};

const USAGE: &str = "usage: builder-agent [--port NAME|PATH] [--connect-unix PATH] [--daemon]
       builder-agent --container --connect-unix PATH [--key KEY]
       builder-agent --cloud-init-status
       builder-agent --version

  --port NAME|PATH     virtio-serial port to serve (default org.builder.agent.0, found in
                       /dev/virtio-ports/)
  --connect-unix PATH  serve a unix socket the host listens on instead (for tests)
  --daemon             detach from the caller (e.g. cloud-init bootcmd) and keep running
  --container          serve one connection in a container build, then exit: 0 after the
                       host's Poweroff, 1 when the host went away without it
  --key KEY            ignored: the build's cache key, in the instruction's text for the
                       container engine's layer cache
  --cloud-init-status  print cloud-init's state as the agent reports it, then exit

As PID 1 (the appliance's /init) it boots the appliance instead: see agent/src/init.rs.
Run as `systemctl` (the appliance puts it first on PATH) it refuses `start` and its kin and
hands anything else to the guest's systemctl: see agent/src/init/systemctl.rs.
";

/// Set by `--appliance` (init starts the agent so, chrooted in the guest's root): Reboot and
/// Poweroff then exit with init's codes instead of asking a service manager.
static APPLIANCE: AtomicBool = AtomicBool::new(false);

/// Set by `--container`: one connection, Poweroff ends the agent with 0, Reboot is refused.
static CONTAINER: AtomicBool = AtomicBool::new(false);

/// The error a container's agent answers `Reboot` with (the host's executor refuses first;
/// this is for any other client).
const CONTAINER_REBOOT: &str = "a container cannot reboot: the component asked for a reboot (a `Reboot` step or exit code 194), which only a machine image can do";

enum Endpoint {
    Port(String),
    Unix(String),
}

fn main() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some("systemctl".as_ref()) {
        init::systemctl::main();
    }
    if std::process::id() == 1 {
        init::run();
    }
    let mut args = std::env::args().skip(1);
    let mut endpoint = Endpoint::Port(format!("/dev/virtio-ports/{}", protocol::DEFAULT_PORT_NAME));
    let mut daemon = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let Some(v) = args.next() else {
                    usage_error("--port needs a value")
                };
                endpoint = Endpoint::Port(if v.contains('/') {
                    v
                } else {
                    format!("/dev/virtio-ports/{v}")
                });
            }
            "--connect-unix" => {
                let Some(v) = args.next() else {
                    usage_error("--connect-unix needs a value")
                };
                endpoint = Endpoint::Unix(v);
            }
            "--daemon" => daemon = true,
            "--appliance" => APPLIANCE.store(true, Ordering::SeqCst),
            "--container" => CONTAINER.store(true, Ordering::SeqCst),
            "--key" => {
                if args.next().is_none() {
                    usage_error("--key needs a value")
                }
            }
            "--cloud-init-status" => {
                println!("{}", cloud_init_state());
                return;
            }
            "--version" => {
                println!("builder-agent {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                return;
            }
            other => usage_error(&format!("unknown argument `{other}`")),
        }
    }
    if CONTAINER.load(Ordering::SeqCst) {
        let Endpoint::Unix(path) = endpoint else {
            usage_error("--container needs --connect-unix PATH")
        };
        serve_once(&path);
    }
    if daemon {
        detach();
    }
    let _only_agent = wait_until_only_agent(&endpoint);
    remove_stale_scripts();
    serve_forever(endpoint);
}

/// One agent per port: a second copy (started by a boot hook that did not see the first, or by
/// a unit restarted while the first still runs) would take the port whenever the host
/// reconnects, and the host would see the agent "restart" in the middle of a request. The
/// second copy waits here on a lock in /run (tmpfs: nothing stays in the image) and takes over
/// only when the first is gone. Without a writable /run there is no lock.
fn wait_until_only_agent(endpoint: &Endpoint) -> Option<std::fs::File> {
    let Endpoint::Port(path) = endpoint else {
        return None;
    };
    let name = path.rsplit('/').next().unwrap_or("port");
    let lock_path = format!("/run/builder-agent-{name}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ok()?;
    match file.try_lock() {
        Ok(()) => Some(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("builder-agent: another agent serves {path}; waiting until it is gone");
            file.lock().ok().map(|()| file)
        }
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// Script files of an agent that was killed before it could remove them (named
/// `.builder-script-<agent pid>-…`): removed when that agent is gone, so a crash or a kill
/// leaves nothing behind in the image.
fn remove_stale_scripts() {
    let dir = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".builder-script-"))
        else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn usage_error(msg: &str) -> ! {
    eprint!("builder-agent: {msg}\n{USAGE}");
    std::process::exit(2);
}

/// Starts a copy of ourselves without `--daemon` in a new session with stdio on /dev/null,
/// then exits, so a cloud-init bootcmd returns at once.
#[allow(unsafe_code)] // `pre_exec`, to start a new session in the child
fn detach() {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("builder-agent: cannot find own executable: {e}");
            std::process::exit(1);
        }
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(sys::new_session);
    }
    match cmd.spawn() {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("builder-agent: cannot detach: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The link to the host: one writer shared by every thread, tagged with a generation so that
// threads serving an old connection can never write into a new one.

struct Link {
    generation: AtomicU64,
    writer: Mutex<Option<Box<dyn Write + Send>>>,
}

/// A handle for sending frames on the connection that was current when it was made.
#[derive(Clone)]
pub struct Tx {
    link: Arc<Link>,
    generation: u64,
}

impl Tx {
    pub fn send(&self, id: u32, msg: &Message) -> io::Result<()> {
        let bytes = protocol::encode(id, msg)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.send_raw(&bytes)
    }

    /// Sends an already encoded frame.
    pub fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        if !self.is_current() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the host connection this request came on is gone",
            ));
        }
        let mut guard = self
            .link
            .writer
            .lock()
            .map_err(|_| io::Error::other("writer lock poisoned"))?;
        // Checked again under the lock: the connection may have been replaced meanwhile.
        if !self.is_current() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection replaced",
            ));
        }
        match guard.as_mut() {
            Some(w) => {
                w.write_all(bytes)?;
                w.flush()
            }
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "not connected")),
        }
    }

    pub fn is_current(&self) -> bool {
        self.link.generation.load(Ordering::SeqCst) == self.generation
    }

    pub fn error(&self, id: u32, code: u32, message: impl Into<String>) {
        let _ = self.send(
            id,
            &Message::Error {
                code,
                message: message.into(),
            },
        );
    }
}

/// What runs for a request id; the reader routes follow-up frames to it.
pub enum Job {
    Exec(exec::ExecHandle),
    Put(std::sync::mpsc::Sender<files::PutEvent>),
    Get(Arc<files::Credits>),
}

pub type Jobs = Arc<Mutex<HashMap<u32, Job>>>;

fn open_endpoint(endpoint: &Endpoint) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
    match endpoint {
        Endpoint::Port(path) => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)?;
            let w = f.try_clone()?;
            Ok((Box::new(f), Box::new(w)))
        }
        Endpoint::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path)?;
            let w = s.try_clone()?;
            Ok((Box::new(s), Box::new(w)))
        }
    }
}

fn serve_forever(endpoint: Endpoint) -> ! {
    let link = Arc::new(Link {
        generation: AtomicU64::new(0),
        writer: Mutex::new(None),
    });
    let mut last_error = String::new();
    loop {
        let (reader, writer) = match open_endpoint(&endpoint) {
            Ok(rw) => rw,
            Err(e) => {
                // Reported once per distinct error, so a missing port does not flood the log.
                let msg = e.to_string();
                if msg != last_error {
                    eprintln!("builder-agent: cannot open the host channel: {msg}; retrying");
                    last_error = msg;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        last_error.clear();
        let generation = link.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut w) = link.writer.lock() {
            *w = Some(writer);
        }
        let tx = Tx {
            link: link.clone(),
            generation,
        };
        let jobs: Jobs = Arc::new(Mutex::new(HashMap::new()));
        let _ = tx.send(0, &Message::Hello(hello()));
        serve_connection(reader, &tx, &jobs);
        // The host went away (or never came): nobody can receive what runs for it, so stop
        // it all. Transfers notice the generation change on their next send.
        link.generation.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut map) = jobs.lock() {
            for (_, job) in map.drain() {
                match job {
                    Job::Exec(h) => h.kill(),
                    Job::Put(p) => {
                        let _ = p.send(files::PutEvent::Cancel);
                    }
                    Job::Get(c) => c.cancel(),
                }
            }
        }
        if let Ok(mut w) = link.writer.lock() {
            *w = None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `--container`: serve the one connection on `path`, then exit (see the module's comment). The
/// host listens before it starts the container, so a socket that is not there is an error
/// after a few tries, not something to wait for.
fn serve_once(path: &str) -> ! {
    let endpoint = Endpoint::Unix(path.to_owned());
    let mut tries = 0;
    let (reader, writer) = loop {
        match open_endpoint(&endpoint) {
            Ok(rw) => break rw,
            Err(e) if tries < 50 => {
                tries += 1;
                if tries == 1 {
                    eprintln!("builder-agent: cannot connect to {path}: {e}; retrying");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                eprintln!("builder-agent: cannot connect to builder at {path}: {e}");
                std::process::exit(1);
            }
        }
    };
    let link = Arc::new(Link {
        generation: AtomicU64::new(1),
        writer: Mutex::new(Some(writer)),
    });
    let tx = Tx {
        link: link.clone(),
        generation: 1,
    };
    let jobs: Jobs = Arc::new(Mutex::new(HashMap::new()));
    let _ = tx.send(0, &Message::Hello(hello()));
    serve_connection(reader, &tx, &jobs);
    // No Poweroff came (it exits in `power`): stop what still runs, and fail the instruction.
    link.generation.fetch_add(1, Ordering::SeqCst);
    for (_, job) in lock(&jobs).drain() {
        if let Job::Exec(h) = job {
            h.kill();
        }
    }
    eprintln!(
        "builder-agent: the connection to builder ended before the run was over; failing this step"
    );
    std::process::exit(1);
}

fn serve_connection(reader: Box<dyn Read + Send>, tx: &Tx, jobs: &Jobs) {
    // A small buffer: reads of a whole data chunk then go straight into the chunk's own
    // buffer instead of through this one (a copy less per chunk in a slow guest).
    let mut r = BufReader::with_capacity(64 * 1024, reader);
    loop {
        let mut h = [0u8; protocol::HEADER_LEN];
        if !read_full(&mut r, &mut h) {
            return;
        }
        let header = match protocol::decode_header(&h) {
            Ok(h) => h,
            Err(e) => {
                tx.error(
                    0,
                    protocol::code::BAD_REQUEST,
                    format!("bad frame header: {e}"),
                );
                if !resync(&mut r, h) {
                    return;
                }
                continue;
            }
        };
        if header.ty == protocol::TYPE_DATA && header.len >= 4 {
            // Data frames skip the generic decoder: read the content into its own buffer.
            let mut len = [0u8; 4];
            if !read_full(&mut r, &mut len) {
                return;
            }
            let mut data = files::buffer(header.len - 4);
            if !read_full(&mut r, &mut data) {
                return;
            }
            if u32::from_le_bytes(len) as usize != data.len() {
                tx.error(
                    header.id,
                    protocol::code::BAD_REQUEST,
                    "bad frame: data length does not match the frame length",
                );
                continue;
            }
            dispatch(
                Frame {
                    id: header.id,
                    msg: Message::Data(data),
                },
                tx,
                jobs,
            );
            continue;
        }
        let mut payload = vec![0u8; header.len];
        if !read_full(&mut r, &mut payload) {
            return;
        }
        match protocol::decode_body(header.ty, &payload) {
            Ok(msg) => dispatch(Frame { id: header.id, msg }, tx, jobs),
            // The frame was whole, so the stream is still in step: refuse just this request.
            Err(e) => tx.error(
                header.id,
                protocol::code::BAD_REQUEST,
                format!("bad frame: {e}"),
            ),
        }
    }
}

/// Reads exactly `buf.len()` bytes; false at end of stream or on an error.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// After a bad header: slide forward byte by byte until a plausible header starts, leaving it
/// to be read next. False if the stream ended.
fn resync(r: &mut BufReader<Box<dyn Read + Send>>, first: [u8; protocol::HEADER_LEN]) -> bool {
    use std::io::BufRead;
    let mut window: Vec<u8> = first[1..].to_vec();
    loop {
        while window.len() < protocol::HEADER_LEN {
            let mut b = [0u8; 1];
            if !read_full(r, &mut b) {
                return false;
            }
            window.push(b[0]);
        }
        let mut h = [0u8; protocol::HEADER_LEN];
        h.copy_from_slice(&window[..protocol::HEADER_LEN]);
        if protocol::decode_header(&h).is_ok() {
            // Put the header (and what was buffered after it) back in front of the stream.
            let rest = r.buffer().to_vec();
            let consumed = rest.len();
            r.consume(consumed);
            let mut joined = window;
            joined.extend_from_slice(&rest);
            let back = std::mem::replace(r.get_mut(), Box::new(io::empty()));
            *r.get_mut() = Box::new(Chain {
                front: io::Cursor::new(joined),
                back,
            });
            return true;
        }
        window.remove(0);
    }
}

/// A reader that returns `front` first, then `back`.
struct Chain {
    front: io::Cursor<Vec<u8>>,
    back: Box<dyn Read + Send>,
}

impl Read for Chain {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.front.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        self.back.read(buf)
    }
}

fn dispatch(frame: Frame, tx: &Tx, jobs: &Jobs) {
    let id = frame.id;
    match frame.msg {
        Message::HelloRequest => {
            let _ = tx.send(id, &Message::Hello(hello()));
        }
        Message::Ping => {
            let _ = tx.send(id, &Message::Ok);
        }
        Message::Exec(spec) => exec::start(id, spec, tx.clone(), jobs.clone()),
        Message::Stdin(data) => {
            if let Some(Job::Exec(h)) = lock(jobs).get(&id) {
                h.stdin(data);
            }
        }
        Message::Resize { rows, cols } => {
            if let Some(Job::Exec(h)) = lock(jobs).get(&id) {
                h.resize(rows, cols);
            }
        }
        Message::Kill => {
            // Cancels whatever runs under this id: an exec's process group, a transfer.
            let job = lock(jobs).remove(&id);
            match job {
                Some(Job::Exec(h)) => {
                    h.kill();
                    // Put it back so its thread still finds and removes it; the exec
                    // thread reports how it ended.
                    lock(jobs).insert(id, Job::Exec(h));
                }
                Some(Job::Put(p)) => {
                    let _ = p.send(files::PutEvent::Cancel);
                }
                Some(Job::Get(c)) => c.cancel(),
                None => {}
            }
        }
        Message::PutFile(spec) => files::start_put(id, spec, tx.clone(), jobs.clone()),
        Message::Data(data) => {
            if let Some(Job::Put(p)) = lock(jobs).get(&id) {
                let _ = p.send(files::PutEvent::Data(data));
            }
        }
        Message::End { size, sha256 } => {
            if let Some(Job::Put(p)) = lock(jobs).get(&id) {
                let _ = p.send(files::PutEvent::End { size, sha256 });
            }
        }
        Message::GetFile { path } => files::start_get(id, path, tx.clone(), jobs.clone()),
        Message::Credit(n) => {
            if let Some(Job::Get(c)) = lock(jobs).get(&id) {
                c.grant(n);
            }
        }
        Message::Stat { path } => {
            let reply = files::stat(&path);
            let _ = tx.send(id, &reply);
        }
        Message::List { path } => {
            let tx = tx.clone();
            // A big folder takes a while to stat: not on the reader thread.
            std::thread::spawn(move || {
                let reply = files::list(&path);
                let _ = tx.send(id, &reply);
            });
        }
        Message::Sync => {
            let tx = tx.clone();
            std::thread::spawn(move || {
                sys::sync_all();
                let _ = tx.send(id, &Message::Ok);
            });
        }
        Message::Reboot => power(id, tx, "reboot"),
        Message::Poweroff => power(id, tx, "poweroff"),
        other => tx.error(
            id,
            protocol::code::BAD_REQUEST,
            format!("the agent does not accept `{}` messages", other.name()),
        ),
    }
}

pub fn lock(jobs: &Jobs) -> std::sync::MutexGuard<'_, HashMap<u32, Job>> {
    // A panic while holding the map cannot leave it inconsistent (inserts and removes only).
    jobs.lock().unwrap_or_else(|p| p.into_inner())
}

/// Acknowledges, then asks systemd (or the init in charge) for a clean reboot or poweroff. In
/// the appliance the init in charge is ours: the agent exits with the code that asks it.
fn power(id: u32, tx: &Tx, verb: &'static str) {
    if CONTAINER.load(Ordering::SeqCst) {
        if verb == "reboot" {
            tx.error(id, protocol::code::UNSUPPORTED, CONTAINER_REBOOT);
            return;
        }
        // The run is over: the file systems are the container's (the engine commits them).
        let _ = tx.send(id, &Message::Ok);
        std::process::exit(0);
    }
    let _ = tx.send(id, &Message::Ok);
    if APPLIANCE.load(Ordering::SeqCst) {
        sys::sync_all();
        std::process::exit(if verb == "reboot" {
            init::EXIT_REBOOT
        } else {
            init::EXIT_POWEROFF
        });
    }
    std::thread::spawn(move || escalate(verb));
}

/// How long a machine that accepted a `systemctl reboot` (or `poweroff`) may take to start
/// shutting down before the agent asks harder. Once the shutdown starts, systemd stops the
/// agent (its unit conflicts with `shutdown.target`), so an agent still alive after this has
/// seen a request accepted and then nothing happen: a loaded guest whose D-Bus call timed
/// out, or a job queue that dropped it.
const POWER_GRACE: Duration = Duration::from_secs(90);

/// Asks the service manager, then asks it to skip the orderly shutdown (`-f`), then reboots
/// or powers off with the system call (after a sync, like `reboot -ff`): each only when the
/// machine is still up after the one before. The host waits for a new boot id, so a request
/// that is accepted and never carried out would otherwise cost it the whole reboot timeout.
fn escalate(verb: &'static str) {
    sys::sync_all();
    let ladder: [&[&str]; 3] = [&["systemctl", verb], &[verb], &["systemctl", verb, "-f"]];
    for argv in ladder {
        let ok = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            std::thread::sleep(POWER_GRACE);
            eprintln!(
                "builder-agent: `{}` was accepted but the machine is still up after {} s; asking harder",
                argv.join(" "),
                POWER_GRACE.as_secs()
            );
        }
    }
    sys::sync_all();
    let e = sys::power(verb == "reboot");
    eprintln!("builder-agent: could not {verb} the machine: {e}");
}

pub fn hello() -> HelloInfo {
    let os_release = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let field = |key: &str| -> String {
        os_release
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    HelloInfo {
        protocol: protocol::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        os_id: field("ID"),
        os_pretty: field("PRETTY_NAME"),
        arch: std::env::consts::ARCH.into(),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        pid: std::process::id(),
        cloud_init: cloud_init_state().into(),
    }
}

/// cloud-init's state from the files it leaves in /run, without running it (that takes
/// seconds on a slow guest): `absent`, `running`, `done` or `error`. In the appliance and a container it never
/// runs: `absent`.
fn cloud_init_state() -> &'static str {
    if APPLIANCE.load(Ordering::SeqCst) || CONTAINER.load(Ordering::SeqCst) {
        return "absent";
    }
    let installed = ["/usr/bin/cloud-init", "/usr/local/bin/cloud-init"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    if !installed {
        return "absent";
    }
    match std::fs::read_to_string("/run/cloud-init/result.json") {
        Ok(result) => {
            // {"v1": {"datasource": "...", "errors": []}}: done when the list is empty.
            let empty = result
                .find("\"errors\"")
                .and_then(|at| result[at..].find('[').map(|b| at + b + 1))
                .map(|after| result[after..].trim_start().starts_with(']'))
                .unwrap_or(false);
            if empty { "done" } else { "error" }
        }
        Err(_) => "running",
    }
}
