//! The folder that brings the agent into a container: the static agent binary and one unix
//! socket per agent run (`c1.sock`, `c2.sock`, …), on which builder listens. A `RUN`
//! instruction (or `buildah run`) mounts the folder at [`AGENT_MOUNT`] and starts the agent
//! with `--container --connect-unix <its socket>`; the mount is not part of the layer, so
//! nothing of builder stays in the image.

use std::path::{Path, PathBuf};

use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::{ContainerError, write_agent};

/// Where the agent's folder is mounted in a container.
pub const AGENT_MOUNT: &str = "/run/builder-agent";

/// The hint of the error a container's target gives for a reboot.
pub fn no_reboot_hint() -> String {
    "a container cannot reboot (a `Reboot` step, or a step that exits with 194, asks for one): \
     build a machine image for components that need a reboot, or leave the reboot out of the \
     container recipe's components"
        .into()
}

/// The agent's folder: the binary and the sockets, listened on.
pub struct AgentDir {
    dir: PathBuf,
    listeners: Vec<std::os::unix::net::UnixListener>,
    accepting: Vec<tokio::task::AbortHandle>,
}

impl AgentDir {
    /// Makes `dir` (e.g. `.builder` in a build's context; must not exist) with the agent and
    /// `count` sockets, `c1.sock` to `c<count>.sock`, listened on at once.
    pub fn create(dir: &Path, count: usize) -> Result<AgentDir, ContainerError> {
        fs_err::create_dir(dir)?;
        write_agent(&dir.join("builder-agent"))?;
        // A socket path must fit in 107 bytes: bound through the folder's descriptor, the
        // store's path can be as long as it likes.
        let folder = fs_err::File::open(dir)?;
        let mut listeners = Vec::new();
        for n in 1..=count {
            use std::os::fd::AsRawFd;
            use std::os::unix::fs::PermissionsExt;
            let short = format!("/proc/self/fd/{}/c{n}.sock", folder.as_raw_fd());
            let listener = std::os::unix::net::UnixListener::bind(&short).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "could not listen on {}: {e}",
                        dir.join(format!("c{n}.sock")).display()
                    ),
                )
            })?;
            // A RUN after the template's own `USER` runs the agent as that user.
            fs_err::set_permissions(
                dir.join(format!("c{n}.sock")),
                std::fs::Permissions::from_mode(0o666),
            )?;
            listener.set_nonblocking(true)?;
            listeners.push(listener);
        }
        Ok(AgentDir {
            dir: dir.to_path_buf(),
            listeners,
            accepting: Vec::new(),
        })
    }

    /// The folder on the host.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `buildah run`'s `-v` value that mounts the folder at [`AGENT_MOUNT`].
    pub fn volume(&self) -> String {
        format!("{}:{AGENT_MOUNT}:rw", self.dir.display())
    }

    /// The agent's command line in a container, for socket `n` (1-based). `key` goes in the
    /// text only, so an engine's layer cache keys the instruction on it.
    pub fn agent_argv(n: usize, key: Option<&str>) -> Vec<String> {
        let mut argv = vec![
            format!("{AGENT_MOUNT}/builder-agent"),
            "--container".into(),
            "--connect-unix".into(),
            format!("{AGENT_MOUNT}/c{n}.sock"),
        ];
        if let Some(key) = key {
            argv.push("--key".into());
            argv.push(key.into());
        }
        argv
    }

    /// The Containerfile instruction that runs the agent on socket `n` with the folder named
    /// `source` in the build context mounted (exec form: no shell needed in the image).
    pub fn run_instruction(source: &str, n: usize, key: &str) -> String {
        let argv = Self::agent_argv(n, Some(key));
        let json = serde_json::to_string(&argv).unwrap_or_else(|_| "[]".into());
        format!("RUN --mount=type=bind,source={source},target={AGENT_MOUNT},rw {json}")
    }

    /// Every connection that comes, as `(socket number, stream)`, in the order they come.
    /// Call once, inside the runtime.
    pub fn connections(
        &mut self,
    ) -> Result<mpsc::UnboundedReceiver<(usize, UnixStream)>, ContainerError> {
        let (tx, rx) = mpsc::unbounded_channel();
        for (i, listener) in self.listeners.drain(..).enumerate() {
            let listener = tokio::net::UnixListener::from_std(listener)?;
            let tx = tx.clone();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    if tx.send((i + 1, stream)).is_err() {
                        break;
                    }
                }
            });
            self.accepting.push(task.abort_handle());
        }
        Ok(rx)
    }
}

impl Drop for AgentDir {
    fn drop(&mut self) {
        for task in &self.accepting {
            task.abort();
        }
        let _ = fs_err::remove_dir_all(&self.dir);
    }
}
