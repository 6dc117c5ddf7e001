//! Container images with buildah: the engine builder drives for container recipes, in a
//! private storage under the store (`<store>/containers`: `--root storage --runroot run`), so
//! nothing lands in the host's own container storage.
//!
//! What it owns: running buildah ([`Engine`]), the probe that decides the isolation (the OCI
//! runtime where it can start a container, else `chroot`, said in [`Engine::isolation_note`]),
//! the folder that brings the agent into a `RUN` ([`AgentDir`]: the agent binary and the unix
//! sockets builder listens on, each connection becoming an [`AgentMachine`] that cannot
//! reboot), working containers ([`Engine::from_image`], removed by the caller's undo list) and
//! the recovery of what a killed builder left ([`Engine::recover`]). It knows nothing of
//! recipes, plans or the build's stages: `build::container` does.
//!
//! Leftovers: every working container builder makes is named `builder-<pid>.<start ticks>-…`
//! after the process that made it, so a later builder tells a dead owner from a live one. Each
//! engine holds a shared lock on `<dir>/engine.lock` while open; a builder that gets it
//! exclusively knows that no other builder uses the storage, and then also removes containers
//! buildah made for itself (a `buildah build` killed mid-step leaves one).

mod agent_dir;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{OnceCell, mpsc};

pub use agent_dir::{AGENT_MOUNT, AgentDir, no_reboot_hint};

use crate::machine::agent::AgentMachine;
use crate::store::runner;
use crate::undo::UndoList;

/// buildah's scratch folder (`TMPDIR`) inside the engine's folder.
const TMP_DIR: &str = "tmp";

/// The program builder runs; `BUILDER_BUILDAH` overrides it (tests, packagers).
const BUILDAH: &str = "buildah";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// buildah is not installed.
    #[error("`buildah` was not found on PATH; container recipes need it")]
    NoBuildah,
    /// A buildah command failed; `output` holds its last lines.
    #[error("`buildah {what}` {status}{}", tail(output))]
    Command {
        what: String,
        status: String,
        output: String,
    },
    #[error("could not run `buildah {what}`")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A file or folder of the engine (the io error names it).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// buildah said something we could not read.
    #[error("could not read what `buildah {what}` printed: {detail}")]
    Output { what: String, detail: String },
    /// The agent in a container did not come up or broke off.
    #[error("the agent in {target} did not answer")]
    Agent {
        target: String,
        #[source]
        source: crate::machine::MachineError,
    },
}

fn tail(output: &str) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let from = lines.len().saturating_sub(10);
    format!(
        "; last lines of its output:\n  {}",
        lines[from..].join("\n  ")
    )
}

/// How `RUN` instructions and working containers are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// The OCI runtime (crun, runc): namespaces and cgroups.
    Oci,
    /// `chroot`: buildah's own, for hosts where the OCI runtime cannot start a container.
    Chroot,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Oci => "oci",
            Isolation::Chroot => "chroot",
        }
    }
}

/// The probe's verdict, once per process: `Err(why)` when the OCI runtime cannot start a
/// container here.
static PROBE: OnceCell<Result<(), String>> = OnceCell::const_new();

/// buildah with builder's private storage, and the isolation the probe chose.
pub struct Engine {
    dir: PathBuf,
    program: PathBuf,
    isolation: Isolation,
    note: Option<String>,
    /// The shared lock on `<dir>/engine.lock`, held while the engine is open.
    lock: fs_err::File,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.dir)
            .field("isolation", &self.isolation)
            .finish()
    }
}

/// A container (or the build's output) line by line as buildah prints it.
pub type Lines = mpsc::UnboundedReceiver<String>;

impl Engine {
    /// Opens the engine on `dir` (`<store>/containers`, created if missing): finds buildah,
    /// takes the engine's shared lock and probes the isolation (once per process).
    pub async fn open(dir: &Path) -> Result<Engine, ContainerError> {
        let program = match std::env::var_os("BUILDER_BUILDAH") {
            Some(p) => PathBuf::from(p),
            None => {
                crate::vm::process::find_program(BUILDAH).map_err(|_| ContainerError::NoBuildah)?
            }
        };
        fs_err::create_dir_all(dir.join(TMP_DIR))?;
        let lock = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("engine.lock"))?;
        lock.lock_shared().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("could not lock {}: {e}", dir.join("engine.lock").display()),
            )
        })?;
        let mut engine = Engine {
            dir: dir.to_path_buf(),
            program,
            isolation: Isolation::Chroot,
            note: None,
            lock,
        };
        match PROBE.get_or_init(|| engine.probe()).await {
            Ok(()) => engine.isolation = Isolation::Oci,
            Err(why) => {
                engine.note = Some(format!(
                    "the OCI runtime cannot start containers on this machine ({why}); \
                     containers run with `--isolation chroot`"
                ))
            }
        }
        Ok(engine)
    }

    /// The isolation the probe chose.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Why the engine fell back to `chroot` isolation, when it did: for the user to read.
    pub fn isolation_note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// The engine's folder (`<store>/containers`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `storage.conf` naming the private storage (written once, in the engine's folder), for
    /// programs builder does not start itself: with `CONTAINERS_STORAGE_CONF` pointing at it,
    /// `buildah` and `podman` see builder's images (a `container-host-test` phase runs them).
    pub fn storage_conf(&self) -> Result<PathBuf, ContainerError> {
        let path = self.dir.join("storage.conf");
        let storage = self.dir.join("storage");
        // The driver buildah chose for this storage (its folder is named after it); buildah
        // refuses a configuration without one.
        let driver = if storage.join("vfs").is_dir() {
            "vfs"
        } else {
            "overlay"
        };
        let text = format!(
            "# Written by builder: its private container storage.\n[storage]\ndriver = \"{driver}\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            storage.display(),
            self.dir.join("run").display()
        );
        if fs_err::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            crate::atomic::write_atomic(&path, text.as_bytes())?;
        }
        Ok(path)
    }

    /// buildah with the private storage, not started.
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = crate::vm::process::command_dying_with_parent(&self.program, Signal::SIGTERM);
        cmd.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(args)
            // The OCI runtime keeps its state under XDG_RUNTIME_DIR when it is set: in the
            // engine's folder too, not in the caller's runtime folder.
            .env("XDG_RUNTIME_DIR", self.dir.join("run"))
            // buildah's scratch (a `RUN`'s bundle, an archive being unpacked) in the engine's
            // folder, where [`Self::recover`] finds what a killed buildah left.
            .env("TMPDIR", self.dir.join(TMP_DIR))
            .stdin(Stdio::null());
        cmd
    }

    /// The blocking twin of [`Self::command`], for undo actions (which are not async).
    fn std_command(dir: &Path, program: &Path, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        cmd.arg("--root")
            .arg(dir.join("storage"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .args(args)
            .env("XDG_RUNTIME_DIR", dir.join("run"))
            .env("TMPDIR", dir.join(TMP_DIR))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs buildah to the end; its stdout when it succeeds.
    pub async fn run(&self, args: &[&str]) -> Result<String, ContainerError> {
        let what = args.first().copied().unwrap_or_default().to_string();
        let out = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|source| ContainerError::Spawn {
                what: what.clone(),
                source,
            })?;
        if !out.status.success() {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            return Err(ContainerError::Command {
                what: args.join(" "),
                status: exit_text(out.status),
                output,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts buildah; stdout and stderr come as lines on the returned channel, in order per
    /// stream. Dropping the [`Running`] stops buildah (SIGTERM to its group, then SIGKILL).
    pub fn start(&self, args: &[String]) -> Result<Running, ContainerError> {
        let what = args.first().cloned().unwrap_or_default();
        let mut child = self
            .command(&[])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ContainerError::Spawn {
                what: what.clone(),
                source,
            })?;
        let (tx, lines) = mpsc::unbounded_channel();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(forward_lines(out, tx.clone())));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(forward_lines(err, tx)));
        }
        Ok(Running {
            what: args.join(" "),
            pid: child.id(),
            child,
            lines,
            readers,
        })
    }

    /// Whether the OCI runtime can start a container here: a scratch container running the
    /// agent (`--version`), bind-mounted in. `Err(why)` otherwise.
    async fn probe(&self) -> Result<(), String> {
        let dir = tempfile::Builder::new()
            .prefix("probe-")
            .tempdir_in(&self.dir)
            .map_err(|e| format!("could not make a probe folder: {e}"))?;
        let agent = dir.path().join("builder-agent");
        write_agent(&agent).map_err(|e| e.to_string())?;
        let name = container_name("probe");
        self.run(&["from", "--name", &name, "scratch"])
            .await
            .map_err(|e| error_text(&e))?;
        let mount = format!("{}:/builder-agent:ro", agent.display());
        let result = self
            .run(&[
                "run",
                "--isolation",
                "oci",
                "-v",
                &mount,
                &name,
                "/builder-agent",
                "--version",
            ])
            .await;
        let _ = self.run(&["rm", &name]).await;
        match result {
            Ok(_) => Ok(()),
            Err(ContainerError::Command { output, .. }) => Err(first_error_line(&output)),
            Err(e) => Err(error_text(&e)),
        }
    }

    /// Creates a working container from `image`, named for this process and `what`, and puts
    /// its removal on `undo` at once.
    pub async fn from_image(
        &self,
        image: &str,
        what: &str,
        undo: &mut UndoList,
    ) -> Result<String, ContainerError> {
        let name = container_name(what);
        self.run(&["from", "--pull-never", "--name", &name, image])
            .await?;
        let (dir, program, label_name) = (self.dir.clone(), self.program.clone(), name.clone());
        undo.push(format!("remove working container {name}"), move || {
            remove_container(&dir, &program, &label_name)
        });
        Ok(name)
    }

    /// Runs `argv` in the working container `name` with `mounts` (`host:container[:opts]`),
    /// with the engine's isolation; not awaited. The agent's folder goes in as a mount.
    pub fn run_in(
        &self,
        name: &str,
        mounts: &[String],
        argv: &[String],
    ) -> Result<Running, ContainerError> {
        // As root whatever the image's USER: builder's agent runs the steps (each may name
        // its own user).
        let mut args = vec![
            "run".to_string(),
            "--isolation".into(),
            self.isolation.as_str().into(),
            "--user".into(),
            "0:0".into(),
        ];
        for m in mounts {
            args.push("-v".into());
            args.push(m.clone());
        }
        args.push(name.to_string());
        args.push("--".into());
        args.extend(argv.iter().cloned());
        self.start(&args)
    }

    /// Removes leftovers of builders that are gone: their working containers (with their
    /// mounts), and, when no other builder uses the engine, every container in its storage
    /// (what a killed `buildah build` left). Returns what it removed, one line each.
    pub async fn recover(&self) -> Result<Vec<String>, ContainerError> {
        let alone = self.lock.try_lock().is_ok();
        let mut removed = Vec::new();
        if alone {
            // No other builder uses the storage: anything in its scratch folder is a killed
            // buildah's (a bundle, a half-unpacked archive).
            for entry in fs_err::read_dir(self.dir.join(TMP_DIR))?.flatten() {
                let path = entry.path();
                let gone = if path.is_dir() {
                    fs_err::remove_dir_all(&path)
                } else {
                    fs_err::remove_file(&path)
                };
                gone?;
                removed.push(format!("scratch {}", path.display()));
            }
        }
        let listed = self.run(&["containers", "--all", "--json"]).await;
        if alone {
            // Back to shared: this engine stays open.
            let _ = self.lock.lock_shared();
        }
        let listed = listed?;
        let containers = parse_containers(&listed)?;
        for c in containers {
            let stale = match owner_of(&c.containername) {
                Some(owner) => !owner.is_alive(),
                None => alone,
            };
            if stale {
                self.run(&["rm", &c.id]).await?;
                removed.push(format!(
                    "container {} ({})",
                    c.containername,
                    short_id(&c.id)
                ));
            }
        }
        Ok(removed)
    }

    /// The names of the working containers in the storage (tests check that none is left).
    pub async fn containers(&self) -> Result<Vec<String>, ContainerError> {
        let listed = self.run(&["containers", "--all", "--json"]).await?;
        Ok(parse_containers(&listed)?
            .into_iter()
            .map(|c| c.containername)
            .collect())
    }

    /// Brings the image at `source` (a buildah transport reference: `oci-archive:/path`,
    /// `oci:/layout:tag`) into the storage as `name` (`localhost/…:…`), dropping the name the
    /// source gave it, so what is in the storage is named by builder only. Returns its id.
    pub async fn import(&self, source: &str, name: &str) -> Result<String, ContainerError> {
        // buildah names an image pulled from an `oci:` layout after the layout's path, and
        // refuses a path that is not a valid image name (upper case letters, a user's home):
        // the layout is pulled through a lower-case link made for the pull.
        let mut link = None;
        let linked;
        let source = match source.strip_prefix("oci:") {
            Some(layout) => {
                let dir = tempfile::Builder::new()
                    .prefix("builder-import-")
                    .rand_bytes(0)
                    .suffix(&uuid::Uuid::new_v4().simple().to_string())
                    .tempdir()?;
                fs_err::os::unix::fs::symlink(layout, dir.path().join("layout"))?;
                linked = format!("oci:{}", dir.path().join("layout").display());
                link = Some(dir);
                linked.as_str()
            }
            None => source,
        };
        let pulled = self.run(&["pull", "--quiet", source]).await;
        drop(link);
        let id = pulled?.trim().to_string();
        if id.is_empty() {
            return Err(ContainerError::Output {
                what: format!("pull {source}"),
                detail: "no image id".into(),
            });
        }
        self.run(&["tag", &id, name]).await?;
        for other in self.image_names(&id).await? {
            if other != name {
                self.run(&["rmi", &other]).await?;
            }
        }
        Ok(id)
    }

    /// The names of image `id`.
    async fn image_names(&self, id: &str) -> Result<Vec<String>, ContainerError> {
        let listed = self
            .run(&["images", "--all", "--json", "--no-trunc"])
            .await?;
        let images: Option<Vec<ListedImage>> =
            serde_json::from_str(listed.trim()).map_err(|e| ContainerError::Output {
                what: "images --json".into(),
                detail: e.to_string(),
            })?;
        let images = images.unwrap_or_default();
        let bare = id.trim_start_matches("sha256:");
        Ok(images
            .into_iter()
            .filter(|i| i.id.trim_start_matches("sha256:") == bare)
            .flat_map(|i| i.names.unwrap_or_default())
            .collect())
    }

    /// Whether an image of that name or id is in the storage.
    pub async fn has_image(&self, image: &str) -> bool {
        self.run(&[
            "inspect",
            "--type",
            "image",
            "--format",
            "{{.FromImageID}}",
            image,
        ])
        .await
        .is_ok()
    }

    /// Wraps a connected agent stream as a target that refuses to reboot.
    pub async fn agent_machine(
        stream: tokio::net::UnixStream,
        describe: String,
    ) -> Result<AgentMachine, ContainerError> {
        AgentMachine::connect(stream, describe.clone(), std::time::Duration::from_secs(60))
            .await
            .map(|m| m.without_reboot(no_reboot_hint()))
            .map_err(|source| ContainerError::Agent {
                target: describe,
                source,
            })
    }
}

/// `buildah containers --json`, the fields we read.
#[derive(Debug, serde::Deserialize)]
struct ListedContainer {
    id: String,
    #[serde(default)]
    containername: String,
}

/// `buildah containers --json`: a list, `null` when there is none.
fn parse_containers(listed: &str) -> Result<Vec<ListedContainer>, ContainerError> {
    if listed.trim().is_empty() {
        return Ok(Vec::new());
    }
    let parsed: Option<Vec<ListedContainer>> =
        serde_json::from_str(listed).map_err(|e| ContainerError::Output {
            what: "containers --json".into(),
            detail: e.to_string(),
        })?;
    Ok(parsed.unwrap_or_default())
}

/// `buildah images --json`, the fields we read.
#[derive(Debug, serde::Deserialize)]
struct ListedImage {
    id: String,
    #[serde(default)]
    names: Option<Vec<String>>,
}

/// The owner encoded in a container name `builder-<pid>.<start ticks>-…`.
struct Owner {
    pid: u32,
    ticks: u64,
}

impl Owner {
    fn is_alive(&self) -> bool {
        runner::Runner {
            pid: self.pid,
            host: runner::Runner::current().host,
            start_ticks: Some(self.ticks),
        }
        .is_alive()
        .unwrap_or(true)
    }
}

fn owner_of(name: &str) -> Option<Owner> {
    let rest = name.strip_prefix("builder-")?;
    let (owner, _) = rest.split_once('-')?;
    let (pid, ticks) = owner.split_once('.')?;
    Some(Owner {
        pid: pid.parse().ok()?,
        ticks: ticks.parse().ok()?,
    })
}

/// `builder-<pid>.<start ticks>-<what>`: the name of a working container of this process.
pub fn container_name(what: &str) -> String {
    let me = runner::Runner::current();
    let safe: String = what
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "builder-{}.{}-{}-{}",
        me.pid,
        me.start_ticks.unwrap_or(0),
        safe,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn remove_container(dir: &Path, program: &Path, name: &str) -> Result<(), ContainerError> {
    let out = Engine::std_command(dir, program, &["rm", name])
        .output()
        .map_err(|source| ContainerError::Spawn {
            what: "rm".into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let output = String::from_utf8_lossy(&out.stderr).into_owned();
    // Already gone is what we wanted.
    if output.contains("no container with name or ID") || output.contains("not known") {
        return Ok(());
    }
    Err(ContainerError::Command {
        what: format!("rm {name}"),
        status: exit_text(out.status),
        output,
    })
}

fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "failed".into(),
    }
}

fn error_text(e: &ContainerError) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// The line of buildah's output that says what went wrong (`Error: …`, or the first line).
fn first_error_line(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let pick = lines
        .iter()
        .find(|l| l.contains("creating container") || l.starts_with("error running container"))
        .or_else(|| lines.iter().find(|l| l.starts_with("Error:")))
        .or(lines.first())
        .copied()
        .unwrap_or("no output");
    pick.trim_end_matches(':').to_string()
}

/// Writes the agent binary (executable) at `path`.
fn write_agent(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs_err::write(path, crate::agent::AGENT_BINARY)?;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

async fn forward_lines(
    stream: impl tokio::io::AsyncRead + Unpin,
    tx: mpsc::UnboundedSender<String>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if tx.send(line).is_err() {
            break;
        }
    }
}

/// A buildah process builder started ([`Engine::start`]).
pub struct Running {
    what: String,
    pid: Option<u32>,
    child: tokio::process::Child,
    /// Its output, line by line (stdout and stderr).
    pub lines: Lines,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits for buildah to end, reading its output to the end first; `Err` with the output's
    /// last lines (`output`, what was not taken from [`Self::lines`]) when it failed.
    pub async fn wait(mut self, output: &mut Vec<String>) -> Result<(), ContainerError> {
        let status = self.exited().await?;
        for r in std::mem::take(&mut self.readers) {
            let _ = r.await;
        }
        while let Ok(line) = self.lines.try_recv() {
            output.push(line);
        }
        if status.success() {
            return Ok(());
        }
        Err(ContainerError::Command {
            what: self.what.clone(),
            status: exit_text(status),
            output: output.join("\n"),
        })
    }

    /// Takes the output's lines, so they can be read while [`Self::exited`] is awaited.
    pub fn take_lines(&mut self) -> Lines {
        let (_, closed) = mpsc::unbounded_channel();
        std::mem::replace(&mut self.lines, closed)
    }

    /// Waits for the exit status only (the caller reads [`Self::lines`] meanwhile).
    pub async fn exited(&mut self) -> Result<std::process::ExitStatus, ContainerError> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|source| ContainerError::Spawn {
                what: self.what.clone(),
                source,
            })?;
        self.pid = None;
        Ok(status)
    }

    /// What ran: `build --isolation chroot …`.
    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for Running {
    /// A buildah still running when its owner goes (a failure, Ctrl-C): SIGTERM to its group
    /// so it can remove its intermediate container, then SIGKILL after a few seconds.
    fn drop(&mut self) {
        let Some(pid) = self.pid else { return };
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let Ok(raw) = i32::try_from(pid) else { return };
        let group = nix::unistd::Pid::from_raw(raw);
        let _ = nix::sys::signal::killpg(group, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        let _ = self.child.start_kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_working_container_names_its_builder() {
        let name = container_name("test stage/1");
        let owner = owner_of(&name).expect("an owner");
        assert_eq!(owner.pid, std::process::id());
        assert!(owner.is_alive(), "this process: {name}");
        assert!(name.contains("-test-stage-1-"), "{name}");
        let gone = owner_of("builder-999999.1-gone-abcd").expect("an owner");
        assert!(!gone.is_alive());
        assert!(owner_of("e2e-check").is_none());
        assert!(owner_of("builder-x.1-y").is_none());
    }

    #[test]
    fn the_probe_says_why_the_runtime_cannot_start_containers() {
        let output = "error running container: from /usr/bin/crun creating container for [/builder-agent --version]: cgroups in hybrid mode not supported, drop all controllers from cgroupv2\n: exit status 1\nError: while running runtime: exit status 1\n";
        assert_eq!(
            first_error_line(output),
            "error running container: from /usr/bin/crun creating container for [/builder-agent --version]: cgroups in hybrid mode not supported, drop all controllers from cgroupv2"
        );
        assert_eq!(
            first_error_line("Error: no such image\n"),
            "Error: no such image"
        );
        assert_eq!(first_error_line(""), "no output");
    }

    #[test]
    fn a_run_instruction_mounts_the_agent_and_carries_the_key() {
        assert_eq!(
            AgentDir::run_instruction(".builder", 2, "abc"),
            "RUN --mount=type=bind,source=.builder,target=/run/builder-agent,rw \
             [\"/run/builder-agent/builder-agent\",\"--container\",\"--connect-unix\",\
             \"/run/builder-agent/c2.sock\",\"--key\",\"abc\"]"
        );
    }

    #[test]
    fn an_empty_container_list_is_null() {
        assert!(parse_containers("null\n").expect("null").is_empty());
        assert!(parse_containers("").expect("empty").is_empty());
        let one =
            parse_containers(r#"[{"id":"e8cb","builder":true,"containername":"builder-1.2-x-y"}]"#)
                .expect("one");
        assert_eq!(one[0].containername, "builder-1.2-x-y");
    }
}
