//! `ExecuteBash` and `ExecuteBinary`: one process per step (a script file for bash, an argv for
//! a binary), output streamed to the step's sink and stdout kept as the `stdout` output.
//! Exit code 194 asks for a reboot after which the same step runs again (reference 1.12).

use serde_json::{Map, Value};

use super::{ActionContext, ActionError, Completed, Inputs, Next, Outputs};
use crate::machine::{ExecRequest, ExitStatus, OutputSink, OutputStream, Program};

/// The exit code with which a Linux script asks for a reboot and a rerun of its step.
pub const REBOOT_EXIT_CODE: i32 = 194;

/// Forwards everything to the step's sink and keeps stdout.
struct Tee<'a> {
    inner: &'a dyn OutputSink,
    stdout: std::sync::Mutex<Vec<u8>>,
}

impl OutputSink for Tee<'_> {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        if stream == OutputStream::Stdout
            && let Ok(mut buf) = self.stdout.lock()
        {
            buf.extend_from_slice(data);
        }
        self.inner.output(stream, data);
    }
}

/// stdout as the `stdout` output: text, without the trailing newline(s).
fn stdout_output(bytes: &[u8]) -> Outputs {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches(['\n', '\r']);
    let mut map = Map::new();
    map.insert("stdout".into(), Value::String(text.to_string()));
    vec![map]
}

async fn run(
    program: Program,
    what: String,
    cx: &ActionContext<'_>,
) -> Result<Completed, ActionError> {
    let request = ExecRequest {
        program,
        env: cx.env.to_vec(),
        cwd: Some(cx.working_directory.to_path_buf()),
        user: None,
        timeout: cx.remaining(),
    };
    let tee = Tee {
        inner: cx.sink,
        stdout: std::sync::Mutex::new(Vec::new()),
    };
    let outcome = cx
        .target
        .exec(&request, &tee)
        .await
        .map_err(ActionError::target(format!("could not run {what}")))?;
    let stdout = tee.stdout.lock().map(|b| b.clone()).unwrap_or_default();
    let outputs = stdout_output(&stdout);
    match outcome.status {
        ExitStatus::Exited(0) => Ok(Completed {
            outputs,
            next: Next::Continue,
        }),
        ExitStatus::Exited(REBOOT_EXIT_CODE) => Ok(Completed {
            outputs,
            next: Next::RebootThenRerun,
        }),
        status => Err(ActionError::Command {
            what,
            status,
            outputs,
        }),
    }
}

pub async fn execute_bash(
    inputs: &Value,
    cx: &ActionContext<'_>,
) -> Result<Completed, ActionError> {
    let inputs = Inputs::of(inputs)?;
    let commands = inputs.list("commands")?;
    if commands.is_empty() {
        return Err(ActionError::Input("`commands` is required".into()));
    }
    // All items in one script, newline-separated: one shell per step (reference 1.13).
    let mut body = commands.join("\n");
    body.push('\n');
    run(
        Program::Script {
            interpreter: "bash".into(),
            body,
        },
        "the script".into(),
        cx,
    )
    .await
}

pub async fn execute_binary(
    inputs: &Value,
    cx: &ActionContext<'_>,
) -> Result<Completed, ActionError> {
    let inputs = Inputs::of(inputs)?;
    let path = inputs.required("path")?;
    // A bare name is looked up on PATH; a relative path with a slash means the working
    // directory (made explicit: where the child resolves it is platform-specific).
    let program = if path.contains('/') {
        cx.path(&path).to_string_lossy().into_owned()
    } else {
        path.clone()
    };
    let mut argv = vec![program];
    argv.extend(inputs.list("arguments")?);
    run(Program::Argv(argv), format!("`{path}`"), cx).await
}
