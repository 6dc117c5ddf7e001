//! Local tier: notifications sent for real. Webhooks go to an HTTP listener on loopback that
//! this test runs (it can fail the first attempt and accept the next); command hooks are real
//! programs (sh) that write what they received to files. Events come from a real history.

use std::path::Path;
use std::time::Duration;

use builder::pipeline::history::{ExecStatus, History, Outcome, Trigger};
use builder::pipeline::notify::{CommandHook, Event, Hooks, Notifier, Webhook};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One request the listener received.
#[derive(Debug)]
struct Received {
    head: String,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// An HTTP listener on 127.0.0.1 that answers the n-th request with `answers[n]` (the last
/// answer repeats) and closes each connection. Returns its URL and the requests it got.
async fn listener(answers: Vec<u16>) -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "http://{}/hooks/builder?token=secret",
        listener.local_addr().expect("addr")
    );
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut n = 0usize;
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let status = answers[n.min(answers.len() - 1)];
            n += 1;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then as much body as Content-Length says.
            let head_end = loop {
                let Ok(read) = socket.read(&mut chunk).await else {
                    break None;
                };
                if read == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..read]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < head_end + length {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => buf.extend_from_slice(&chunk[..read]),
                }
            }
            let body = buf[head_end..].to_vec();
            let _ = tx.send(Received { head, body });
            let reply =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = socket.write_all(reply.as_bytes()).await;
            let _ = socket.shutdown().await;
        }
    });
    (url, rx)
}

/// A failed execution recorded in a real history, as the event hooks receive.
fn failed_event(dir: &Path) -> Event {
    let history = History::open(&dir.join("pipelines.sqlite")).expect("history");
    let id = history
        .begin("weekly-web", Trigger::Manual, "started by hand")
        .expect("begin")
        .expect("new");
    history
        .set_status(id, ExecStatus::Building, None)
        .expect("building");
    history
        .finish(
            id,
            &Outcome {
                image: Some("web/1.2.0/7".into()),
                ..Outcome::failed("component `nginx` failed in phase build")
            },
        )
        .expect("finish");
    Event::from_execution(&history.execution(id).expect("read"))
}

fn fast(url: &str) -> Webhook {
    Webhook {
        backoff: Duration::from_millis(20),
        timeout: Duration::from_secs(10),
        ..Webhook::new(url)
    }
}

fn drain(rx: &mut mpsc::UnboundedReceiver<Received>) -> Vec<Received> {
    let mut all = Vec::new();
    while let Ok(r) = rx.try_recv() {
        all.push(r);
    }
    all
}

#[tokio::test]
async fn a_webhook_is_retried_after_a_failure_and_delivers_the_event() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let event = failed_event(tmp.path());
    let (url, mut rx) = listener(vec![503, 200]).await;
    let mut hook = fast(&url);
    hook.headers
        .insert("Authorization".into(), "Bearer abc".into());
    let notifier = Notifier::new(Hooks {
        webhooks: vec![hook],
        commands: Vec::new(),
    });
    let deliveries = notifier.notify(&event).await;
    assert_eq!(deliveries.len(), 1);
    assert!(deliveries[0].ok(), "{deliveries:?}");
    assert_eq!(deliveries[0].attempts, 2);
    // The name in messages has no token.
    assert!(
        !deliveries[0].hook.contains("secret"),
        "{}",
        deliveries[0].hook
    );

    let got = drain(&mut rx);
    assert_eq!(got.len(), 2, "one failed attempt, one accepted");
    assert_eq!(got[0].body, got[1].body, "the retry sends the same event");
    assert!(got[1].head.starts_with("POST /hooks/builder?token=secret "));
    assert_eq!(
        got[1].header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        got[1].header("authorization").as_deref(),
        Some("Bearer abc")
    );
    assert_eq!(got[1].header("x-builder-event").as_deref(), Some("failed"));
    let json: serde_json::Value = serde_json::from_slice(&got[1].body).expect("JSON body");
    assert_eq!(json["pipeline"], "weekly-web");
    assert_eq!(json["executionId"], event.execution_id.0);
    assert_eq!(json["status"], "failed");
    assert_eq!(json["image"], "web/1.2.0/7");
    assert_eq!(json["reason"], "started by hand");
    assert_eq!(json["error"], "component `nginx` failed in phase build");
    assert_eq!(json["trigger"]["kind"], "manual");
    for key in ["created", "started", "finished", "at"] {
        assert!(json[key].is_string(), "{key} in {json}");
    }
}

#[tokio::test]
async fn a_webhook_that_keeps_failing_is_reported_and_never_fatal() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let event = failed_event(tmp.path());

    // A server error every time: every attempt is used.
    let (url, mut rx) = listener(vec![500]).await;
    let d = Notifier::new(Hooks {
        webhooks: vec![fast(&url)],
        commands: Vec::new(),
    })
    .quiet()
    .notify(&event)
    .await;
    assert_eq!(d[0].attempts, 3);
    assert!(
        d[0].error.as_deref().is_some_and(|e| e.contains("500")),
        "{d:?}"
    );
    assert_eq!(drain(&mut rx).len(), 3);

    // 404: the request is wrong, sending it again would not help.
    let (url, mut rx) = listener(vec![404]).await;
    let d = Notifier::new(Hooks {
        webhooks: vec![fast(&url)],
        commands: Vec::new(),
    })
    .quiet()
    .notify(&event)
    .await;
    assert_eq!(d[0].attempts, 1, "{d:?}");
    assert_eq!(drain(&mut rx).len(), 1);

    // Nobody listening.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let mut hook = fast(&format!("http://{addr}/x"));
    hook.attempts = 2;
    let d = Notifier::new(Hooks {
        webhooks: vec![hook],
        commands: Vec::new(),
    })
    .quiet()
    .notify(&event)
    .await;
    assert_eq!(d[0].attempts, 2);
    assert!(
        d[0].error
            .as_deref()
            .is_some_and(|e| e.contains("could not connect")),
        "{d:?}"
    );
}

#[tokio::test]
async fn hooks_only_hear_the_statuses_they_ask_for() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let event = failed_event(tmp.path());
    let (url, mut rx) = listener(vec![200]).await;
    let marker = tmp.path().join("ran");
    let notifier = Notifier::new(Hooks {
        webhooks: vec![Webhook {
            on: vec![ExecStatus::Available],
            ..fast(&url)
        }],
        commands: vec![CommandHook {
            on: vec![ExecStatus::Available, ExecStatus::Skipped],
            ..CommandHook::new(vec!["touch".into(), marker.display().to_string()])
        }],
    });
    assert!(notifier.notify(&event).await.is_empty());
    assert!(drain(&mut rx).is_empty());
    assert!(!marker.exists());

    // The same hooks hear `failed` once they ask for it.
    let notifier = Notifier::new(Hooks {
        webhooks: vec![Webhook {
            on: vec![ExecStatus::Failed],
            ..fast(&url)
        }],
        commands: vec![CommandHook {
            on: vec![ExecStatus::Failed],
            ..CommandHook::new(vec!["touch".into(), marker.display().to_string()])
        }],
    });
    let d = notifier.notify(&event).await;
    assert_eq!(d.len(), 2);
    assert!(d.iter().all(|d| d.ok()), "{d:?}");
    assert_eq!(drain(&mut rx).len(), 1);
    assert!(marker.exists());
}

#[tokio::test]
async fn a_command_hook_gets_the_event_on_stdin_and_in_its_environment() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let event = failed_event(tmp.path());
    let out = tmp.path().join("event.json");
    let script = r#"cat > "$1"; env | grep '^BUILDER_' | sort > "$1.env""#;
    let hook = CommandHook::new(vec![
        "sh".into(),
        "-c".into(),
        script.into(),
        "hook".into(),
        out.display().to_string(),
    ]);
    let d = Notifier::new(Hooks {
        webhooks: Vec::new(),
        commands: vec![hook],
    })
    .notify(&event)
    .await;
    assert!(d[0].ok(), "{d:?}");
    let received: serde_json::Value =
        serde_json::from_slice(&fs_err::read(&out).expect("stdin written")).expect("JSON");
    let sent: serde_json::Value = serde_json::from_str(&event.to_json()).expect("JSON");
    assert_eq!(received, sent);
    let env = fs_err::read_to_string(tmp.path().join("event.json.env")).expect("env written");
    for line in [
        "BUILDER_PIPELINE=weekly-web",
        &format!("BUILDER_EXECUTION_ID={}", event.execution_id),
        "BUILDER_STATUS=failed",
        "BUILDER_IMAGE=web/1.2.0/7",
        "BUILDER_TRIGGER=manual",
        "BUILDER_ERROR=component `nginx` failed in phase build",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in\n{env}");
    }
}

#[tokio::test]
async fn a_failing_or_hanging_command_hook_is_reported_and_leaves_nothing_running() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let event = failed_event(tmp.path());

    let failing = CommandHook::new(vec![
        "sh".into(),
        "-c".into(),
        "echo 'cannot reach the chat server' >&2; exit 3".into(),
    ]);
    let missing = CommandHook::new(vec!["/nonexistent/notify-hook".into()]);
    let pid_file = tmp.path().join("sleeper.pid");
    // The hook starts a grandchild and waits for it: the timeout must kill both.
    let hanging = CommandHook {
        timeout: Duration::from_millis(500),
        ..CommandHook::new(vec![
            "sh".into(),
            "-c".into(),
            r#"sleep 300 & echo $! > "$1"; wait"#.into(),
            "hook".into(),
            pid_file.display().to_string(),
        ])
    };
    let d = Notifier::new(Hooks {
        webhooks: Vec::new(),
        commands: vec![failing, missing, hanging],
    })
    .quiet()
    .notify(&event)
    .await;
    let errors: Vec<&str> = d.iter().map(|d| d.error.as_deref().unwrap_or("")).collect();
    assert!(
        errors[0].contains("exit status: 3") && errors[0].contains("cannot reach the chat server"),
        "{errors:?}"
    );
    assert!(errors[1].contains("could not start"), "{errors:?}");
    assert!(errors[2].contains("did not finish"), "{errors:?}");

    let pid: i32 = fs_err::read_to_string(&pid_file)
        .expect("the hook started its grandchild")
        .trim()
        .parse()
        .expect("pid");
    // Killed with its group. It may linger as a zombie until its new parent reaps it (some
    // sandboxes have no reaper at pid 1): that counts as stopped.
    // SIGKILL lands asynchronously: give the kernel a moment before concluding.
    let state_of = || {
        let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("gone")
            .to_string()
    };
    let mut state = state_of();
    for _ in 0..50 {
        if state == "gone" || state == "Z" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        state = state_of();
    }
    assert!(
        state == "gone" || state == "Z",
        "the hook's grandchild {pid} still runs (state {state})"
    );
}
