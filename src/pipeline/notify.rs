//! Notifications on execution status changes (Image Builder's SNS topic): a webhook (an HTTP
//! POST of the event as JSON, retried with backoff) and a command hook (a program run with the
//! event as JSON on stdin and `BUILDER_*` variables), each filtered by status and bounded by a
//! timeout.
//!
//! A notification never fails a build: every hook's outcome is returned as a [`Delivery`] and
//! failures are logged on stderr. Nothing is left running: a command hook that outlives its
//! timeout is killed with its whole process group.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anstream::eprintln;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::history::{ExecStatus, Execution, ExecutionId, Trigger};

/// Where to send notifications (the validated form of the pipeline file's `notifications:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub webhooks: Vec<Webhook>,
    pub commands: Vec<CommandHook>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.webhooks.is_empty() && self.commands.is_empty()
    }
}

/// An HTTP POST of the [`Event`] as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// `http://` or `https://`.
    pub url: String,
    /// The statuses to notify; empty (the default): every status.
    pub on: Vec<ExecStatus>,
    /// Extra request headers (e.g. an authorization token).
    pub headers: BTreeMap<String, String>,
    /// Per attempt. Default 10 s.
    pub timeout: Duration,
    /// Attempts in all, the first included. Default 3.
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each next one. Default 1 s.
    pub backoff: Duration,
}

impl Webhook {
    pub fn new(url: impl Into<String>) -> Webhook {
        Webhook {
            url: url.into(),
            on: Vec::new(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            attempts: 3,
            backoff: Duration::from_secs(1),
        }
    }
}

/// A program run with the [`Event`] as JSON on stdin and in `BUILDER_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHook {
    /// Program and arguments (no shell: pass `["sh", "-c", "…"]` for one).
    pub argv: Vec<String>,
    /// The statuses to notify; empty (the default): every status.
    pub on: Vec<ExecStatus>,
    /// Default 60 s; then the program and its children are killed.
    pub timeout: Duration,
}

impl CommandHook {
    pub fn new(argv: Vec<String>) -> CommandHook {
        CommandHook {
            argv,
            on: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }
}

impl From<&super::model::Notifications> for Hooks {
    /// The pipeline file's `notifications:`: its webhook and command, both for the statuses
    /// in `on`, with the default timeouts and attempts.
    fn from(n: &super::model::Notifications) -> Hooks {
        Hooks {
            webhooks: n
                .webhook
                .iter()
                .map(|w| Webhook {
                    on: n.on.clone(),
                    headers: w.headers.clone(),
                    ..Webhook::new(w.url.clone())
                })
                .collect(),
            commands: n
                .command
                .iter()
                .map(|argv| CommandHook {
                    on: n.on.clone(),
                    ..CommandHook::new(argv.clone())
                })
                .collect(),
        }
    }
}

/// Send `event` to the hooks of a pipeline's `notifications:` that want its status. Returns
/// one message per failed hook (nothing is logged: the caller reports them); never fails.
pub async fn send(notifications: &super::model::Notifications, event: &Event) -> Vec<String> {
    let hooks = Hooks::from(notifications);
    if hooks.is_empty() {
        return Vec::new();
    }
    Notifier::new(hooks)
        .quiet()
        .notify(event)
        .await
        .into_iter()
        .filter_map(|d| {
            d.error.map(|e| {
                format!(
                    "notification by {} failed after {} attempt(s): {e}",
                    d.hook, d.attempts
                )
            })
        })
        .collect()
}

/// What is sent: one execution at one status change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub pipeline: String,
    pub execution_id: ExecutionId,
    pub status: ExecStatus,
    pub trigger: Trigger,
    /// Why it ran, or why it was skipped.
    pub reason: String,
    /// `name/x.y.z/n`, once there is one.
    pub image: Option<String>,
    pub error: Option<String>,
    pub created: DateTime<Utc>,
    pub started: Option<DateTime<Utc>>,
    pub finished: Option<DateTime<Utc>>,
    /// When it reached this status.
    pub at: DateTime<Utc>,
    pub logs: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
}

impl Event {
    /// The execution at its current (last recorded) status.
    pub fn from_execution(e: &Execution) -> Event {
        Event {
            pipeline: e.pipeline.clone(),
            execution_id: e.id,
            status: e.status,
            trigger: e.trigger,
            reason: e.reason.clone(),
            image: e.image.clone(),
            error: e.error.clone(),
            created: e.created,
            started: e.started,
            finished: e.finished,
            at: e
                .transitions
                .last()
                .map(|t| t.at)
                .or(e.finished)
                .unwrap_or(e.created),
            logs: e.logs.clone(),
            manifest: e.manifest.clone(),
        }
    }

    #[expect(
        clippy::expect_used,
        reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
    )]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event is plain data")
    }

    /// The `BUILDER_*` variables a command hook gets (empty values for what is not known).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
        vec![
            ("BUILDER_PIPELINE", self.pipeline.clone()),
            ("BUILDER_EXECUTION_ID", self.execution_id.to_string()),
            ("BUILDER_STATUS", self.status.to_string()),
            (
                "BUILDER_TRIGGER",
                match self.trigger {
                    Trigger::Manual => "manual".into(),
                    Trigger::Schedule { .. } => "schedule".into(),
                },
            ),
            ("BUILDER_DUE", time(self.trigger.due())),
            ("BUILDER_REASON", self.reason.clone()),
            ("BUILDER_IMAGE", opt(&self.image)),
            ("BUILDER_ERROR", opt(&self.error)),
            ("BUILDER_AT", self.at.to_rfc3339()),
            (
                "BUILDER_LOGS",
                self.logs
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        ]
    }
}

/// The outcome of one hook for one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// `webhook http://host/path` or `command notify-send` (no credentials).
    pub hook: String,
    pub attempts: u32,
    /// `None` when delivered; else what went wrong the last time.
    pub error: Option<String>,
}

impl Delivery {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Sends events to the hooks of one pipeline.
#[derive(Debug, Clone)]
pub struct Notifier {
    hooks: Hooks,
    client: Result<reqwest::Client, String>,
    log: bool,
}

impl Notifier {
    pub fn new(hooks: Hooks) -> Notifier {
        let client = reqwest::Client::builder()
            .user_agent(concat!("builder/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up HTTP: {e}"));
        Notifier {
            hooks,
            client,
            log: true,
        }
    }

    /// Do not log failed deliveries on stderr (the caller reports the [`Delivery`] list).
    pub fn quiet(mut self) -> Notifier {
        self.log = false;
        self
    }

    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// Send `event` to every hook that wants its status, all at once; wait for them all.
    /// Never fails: each hook's outcome is in the result (hooks not interested are left out).
    pub async fn notify(&self, event: &Event) -> Vec<Delivery> {
        let wants = |on: &[ExecStatus]| on.is_empty() || on.contains(&event.status);
        let mut tasks = tokio::task::JoinSet::new();
        let mut order = 0usize;
        for hook in self.hooks.webhooks.iter().filter(|h| wants(&h.on)) {
            let (hook, event, client) = (hook.clone(), event.clone(), self.client.clone());
            let i = order;
            order += 1;
            tasks.spawn(async move { (i, post(&client, &hook, &event).await) });
        }
        for hook in self.hooks.commands.iter().filter(|h| wants(&h.on)) {
            let (hook, event) = (hook.clone(), event.clone());
            let i = order;
            order += 1;
            tasks.spawn(async move { (i, run_command(&hook, &event).await) });
        }
        let mut done: Vec<(usize, Delivery)> = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(d) => done.push(d),
                Err(e) => done.push((
                    usize::MAX,
                    Delivery {
                        hook: "notification".into(),
                        attempts: 1,
                        error: Some(format!("the notification task stopped: {e}")),
                    },
                )),
            }
        }
        done.sort_by_key(|(i, _)| *i);
        let deliveries: Vec<Delivery> = done.into_iter().map(|(_, d)| d).collect();
        if self.log {
            for d in deliveries.iter().filter(|d| !d.ok()) {
                eprintln!(
                    "warning: notification of {} execution {} ({}) by {} failed after {} attempt(s): {}",
                    event.pipeline,
                    event.execution_id,
                    event.status,
                    d.hook,
                    d.attempts,
                    d.error.as_deref().unwrap_or_default()
                );
            }
        }
        deliveries
    }
}

/// The URL without credentials or query (which may hold a token), for messages.
fn display_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}{}",
            u.scheme(),
            u.host_str().unwrap_or_default(),
            u.port().map(|p| format!(":{p}")).unwrap_or_default(),
            u.path()
        ),
        Err(_) => "<invalid URL>".into(),
    }
}

async fn post(client: &Result<reqwest::Client, String>, hook: &Webhook, event: &Event) -> Delivery {
    let name = format!("webhook {}", display_url(&hook.url));
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            return Delivery {
                hook: name,
                attempts: 0,
                error: Some(e.clone()),
            };
        }
    };
    let body = event.to_json();
    let attempts = hook.attempts.max(1);
    let mut delay = hook.backoff;
    let mut last_error = String::new();
    for attempt in 1..=attempts {
        let mut request = client
            .post(&hook.url)
            .timeout(hook.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Builder-Event", event.status.as_str());
        for (k, v) in &hook.headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let retry = match request.body(body.clone()).send().await {
            Ok(response) if response.status().is_success() => {
                return Delivery {
                    hook: name,
                    attempts: attempt,
                    error: None,
                };
            }
            Ok(response) => {
                let status = response.status();
                last_error = format!("the server answered {status}");
                // The request itself is wrong (404, 401, 400): sending it again will not help.
                status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
            }
            Err(e) => {
                // reqwest's message names the URL, which may carry a token: describe the kind.
                last_error = if e.is_timeout() {
                    format!("no answer within {:?}", hook.timeout)
                } else if e.is_connect() {
                    "could not connect".into()
                } else if e.is_builder() {
                    "the URL is not usable".into()
                } else {
                    "the request failed".into()
                };
                if let Some(source) = std::error::Error::source(&e) {
                    last_error.push_str(&format!(" ({source})"));
                }
                !e.is_builder()
            }
        };
        if !retry || attempt == attempts {
            return Delivery {
                hook: name,
                attempts: attempt,
                error: Some(last_error),
            };
        }
        tokio::time::sleep(delay).await;
        delay = delay.saturating_mul(2).min(Duration::from_secs(60));
    }
    Delivery {
        hook: name,
        attempts,
        error: Some(last_error),
    }
}

/// How much of a failing hook's stderr to quote.
const STDERR_TAIL: usize = 2000;

async fn run_command(hook: &CommandHook, event: &Event) -> Delivery {
    let name = format!(
        "command {}",
        hook.argv.first().map(String::as_str).unwrap_or("<empty>")
    );
    let fail = |error: String| Delivery {
        hook: name.clone(),
        attempts: 1,
        error: Some(error),
    };
    let Some((program, args)) = hook.argv.split_first() else {
        return fail("the command is empty".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .envs(event.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("could not start `{program}`: {e}")),
    };
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    #[expect(
        clippy::expect_used,
        reason = "the command was spawned with stdin piped"
    )]
    let mut stdin = child.stdin.take().expect("stdin is piped");
    #[expect(
        clippy::expect_used,
        reason = "the command was spawned with stderr piped"
    )]
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let json = event.to_json();
    let work = async {
        // A hook that does not read its stdin may close it early: that is its right.
        let _ = stdin.write_all(json.as_bytes()).await;
        let _ = stdin.write_all(b"\n").await;
        drop(stdin);
        let mut err = Vec::new();
        let (status, _) = tokio::join!(child.wait(), stderr.read_to_end(&mut err));
        (status, err)
    };
    let finished = tokio::time::timeout(hook.timeout, work).await;
    match finished {
        Ok((Ok(status), _)) if status.success() => Delivery {
            hook: name,
            attempts: 1,
            error: None,
        },
        Ok((Ok(status), err)) => {
            let text = String::from_utf8_lossy(&err);
            let text = text.trim();
            let tail = &text[text.ceil_char_boundary(text.len().saturating_sub(STDERR_TAIL))..];
            fail(if tail.is_empty() {
                format!("`{program}` exited with {status}")
            } else {
                format!("`{program}` exited with {status}: {tail}")
            })
        }
        Ok((Err(e), _)) => fail(format!("could not wait for `{program}`: {e}")),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            }
            // Reap it, so no zombie is left.
            let _ = child.wait().await;
            fail(format!(
                "`{program}` did not finish within {:?}; it was killed",
                hook.timeout
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipeline_files_settings_become_hooks() {
        use crate::pipeline::model::{Notifications, Webhook as FileWebhook};
        let n = Notifications {
            on: vec![ExecStatus::Failed],
            webhook: Some(FileWebhook {
                url: "http://hooks.local/b".into(),
                headers: BTreeMap::from([("Authorization".into(), "Bearer x".into())]),
            }),
            command: Some(vec!["logger".into(), "-t".into(), "builder".into()]),
        };
        let hooks = Hooks::from(&n);
        assert_eq!(hooks.webhooks.len(), 1);
        assert_eq!(hooks.webhooks[0].on, [ExecStatus::Failed]);
        assert_eq!(hooks.webhooks[0].attempts, 3);
        assert_eq!(hooks.webhooks[0].headers["Authorization"], "Bearer x");
        assert_eq!(hooks.commands[0].argv, ["logger", "-t", "builder"]);
        assert_eq!(hooks.commands[0].on, [ExecStatus::Failed]);
        assert!(Hooks::from(&Notifications::default()).is_empty());
    }

    #[test]
    fn urls_in_messages_carry_no_credentials() {
        assert_eq!(
            display_url("https://user:secret@hooks.example:8443/x/y?token=abc"),
            "https://hooks.example:8443/x/y"
        );
        assert_eq!(display_url("not a url"), "<invalid URL>");
    }
}
