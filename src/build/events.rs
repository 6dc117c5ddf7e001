//! What a build tells the outside while it runs, and the build's own log.
//!
//! [`BuildEvent`]s (stage started/finished, progress lines, transfers, layers, the result) and
//! the executor's step events go to one [`BuildObserver`]: the terminal or `--json` lines in
//! the CLI. Both serialize with the same `event` tag, so `--json` is one stream of objects.
//!
//! [`BuildLog`] sits between the stages and that observer: it writes every event to
//! `logs/build.log` (timestamped), each step's output to `logs/steps/<component>/<phase>-<step>.log`,
//! and remembers the last lines of each step for the error message of a failed one.

use fs_err::File;
use std::collections::{HashMap, VecDeque};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use super::plan::Stage;
use crate::component::executor::{Event, Observer};
use crate::machine::{OutputSink, OutputStream};

/// Lines of a step's output kept for the error message.
pub const TAIL_LINES: usize = 10;

/// One thing that happened in the build. `--json` prints one per line
/// (`{"event":"stageStarted","stage":"boot",…}`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum BuildEvent<'a> {
    #[serde(rename_all = "camelCase")]
    BuildStarted {
        /// `name/x.y.z/n`.
        image: &'a str,
        build_id: &'a str,
        plan_digest: &'a str,
        logs: &'a Path,
    },
    #[serde(rename_all = "camelCase")]
    StageStarted {
        stage: Stage,
        /// What the stage works on (a component's label), if anything.
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<&'a str>,
    },
    #[serde(rename_all = "camelCase")]
    StageFinished {
        stage: Stage,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<&'a str>,
        /// `success`, `failed` or `skipped`.
        status: &'a str,
        duration_ms: u64,
    },
    /// A one-line message within a stage ("agent up after 41.2 s").
    #[serde(rename_all = "camelCase")]
    Progress { stage: Stage, message: &'a str },
    /// A transfer with a size: a download, a conversion. `total` is `None` when unknown.
    #[serde(rename_all = "camelCase")]
    Transfer {
        stage: Stage,
        what: &'a str,
        done: u64,
        total: Option<u64>,
        /// `percent` for a conversion (total 100); left out for bytes.
        #[serde(skip_serializing_if = "crate::distribute::Unit::is_bytes")]
        unit: crate::distribute::Unit,
    },
    /// A component's changes were committed to their own disk layer.
    #[serde(rename_all = "camelCase")]
    LayerCommitted {
        layer: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<&'a str>,
        file: &'a Path,
    },
    /// Whether one layer of the build's chain comes from the layer cache or runs: one per
    /// layer (`boot`, each component, `generalize`), in order, before the build VM boots.
    #[serde(rename_all = "camelCase")]
    LayerCache {
        layer: &'a str,
        key: &'a str,
        /// `cached` or `run`.
        status: &'a str,
        /// Cached: `local`, or the registry the layer was pulled from.
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<&'a str>,
        /// Cached: the build that made it (`name/x.y.z/n`).
        #[serde(skip_serializing_if = "Option::is_none")]
        build: Option<&'a str>,
        /// Run: why.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// The end: `success` with the image and outputs, or `failed` with the message.
    #[serde(rename_all = "camelCase")]
    BuildFinished {
        status: &'a str,
        image: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        directory: Option<&'a Path>,
        outputs: Vec<&'a Path>,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a str>,
        /// Cleanup that failed (what may be left behind), as `builder build` prints it.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<&'a str>,
        duration_ms: u64,
    },
}

/// Receives the build's events and the executor's step events. Must be quick.
pub trait BuildObserver: Observer {
    fn build_event(&self, event: &BuildEvent<'_>);
}

/// Tells nobody (library use, benchmarks).
pub struct Quiet;

impl Observer for Quiet {
    fn event(&self, _: &Event<'_>) {}
}

impl BuildObserver for Quiet {
    fn build_event(&self, _: &BuildEvent<'_>) {}
}

/// The last lines and the log file of one step.
#[derive(Debug, Clone, Default)]
pub struct StepTail {
    pub lines: VecDeque<String>,
    pub log: Option<PathBuf>,
}

/// (document, phase, step).
type StepKey = (String, String, String);

/// The build's log folder as an observer: writes, remembers, forwards.
pub struct BuildLog<'a> {
    dir: PathBuf,
    main: Mutex<Option<BufWriter<File>>>,
    steps: Mutex<HashMap<StepKey, (Option<File>, StepTail)>>,
    /// Folder of `steps/` for the component running now.
    component: Mutex<String>,
    inner: &'a dyn BuildObserver,
}

impl<'a> BuildLog<'a> {
    /// Logs into `dir` (created if needed): `build.log` and `steps/`.
    pub fn new(dir: &Path, inner: &'a dyn BuildObserver) -> std::io::Result<BuildLog<'a>> {
        fs_err::create_dir_all(dir.join("steps"))?;
        let main = File::create(dir.join("build.log"))?;
        Ok(BuildLog {
            dir: dir.to_path_buf(),
            main: Mutex::new(Some(BufWriter::new(main))),
            steps: Mutex::new(HashMap::new()),
            component: Mutex::new("build".into()),
            inner,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Step logs from now on go to `steps/<folder>/` (one per component run, so two
    /// components with equally named steps keep separate logs).
    pub fn set_component(&self, folder: &str) {
        if let Ok(mut c) = self.component.lock() {
            *c = super::layers::file_safe(folder);
        }
    }

    /// A line in `build.log`.
    pub fn line(&self, text: &str) {
        if let Ok(mut main) = self.main.lock()
            && let Some(w) = main.as_mut()
        {
            let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
            for l in text.lines() {
                let _ = writeln!(w, "{now} {l}");
            }
            let _ = w.flush();
        }
    }

    /// Emit a build event: to `build.log` and to the observer.
    pub fn emit(&self, event: &BuildEvent<'_>) {
        if !matches!(event, BuildEvent::Transfer { .. })
            && let Ok(json) = serde_json::to_string(event)
        {
            self.line(&json);
        }
        self.inner.build_event(event);
    }

    /// A progress line within `stage`.
    pub fn progress(&self, stage: Stage, message: &str) {
        self.emit(&BuildEvent::Progress { stage, message });
    }

    /// The last lines and log file of a step of the component running now.
    pub fn tail(&self, document: &str, phase: &str, step: &str) -> StepTail {
        self.steps
            .lock()
            .ok()
            .and_then(|s| {
                s.get(&(document.to_string(), phase.to_string(), step.to_string()))
                    .map(|(_, t)| t.clone())
            })
            .unwrap_or_default()
    }

    fn step_output(&self, document: &str, phase: &str, step: &str, stream: &str, line: &str) {
        let Ok(mut steps) = self.steps.lock() else {
            return;
        };
        let key = (document.to_string(), phase.to_string(), step.to_string());
        let entry = steps.entry(key).or_insert_with(|| {
            let folder = self.component.lock().map(|c| c.clone()).unwrap_or_default();
            let dir = self.dir.join("steps").join(folder);
            let path = dir.join(format!(
                "{}-{}.log",
                super::layers::file_safe(phase),
                super::layers::file_safe(step)
            ));
            let file = fs_err::create_dir_all(&dir)
                .and_then(|()| File::create(&path))
                .ok();
            let log = file.as_ref().map(|_| path);
            (
                file,
                StepTail {
                    lines: VecDeque::new(),
                    log,
                },
            )
        });
        if let Some(f) = entry.0.as_mut() {
            let mark = if stream == "stderr" { "! " } else { "" };
            let _ = writeln!(f, "{mark}{line}");
        }
        let tail = &mut entry.1.lines;
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
    }

    /// Forget what was recorded for the steps of a finished component (a retried step
    /// starts its tail again).
    fn step_started(&self, document: &str, phase: &str, step: &str) {
        if let Ok(mut steps) = self.steps.lock()
            && let Some((f, t)) =
                steps.get_mut(&(document.to_string(), phase.to_string(), step.to_string()))
        {
            t.lines.clear();
            if let Some(f) = f.as_mut() {
                let _ = writeln!(f, "--- attempt again ---");
            }
        }
    }

    /// Close the log files.
    pub fn close(&self) {
        if let Ok(mut main) = self.main.lock()
            && let Some(mut w) = main.take()
        {
            let _ = w.flush();
        }
        if let Ok(mut steps) = self.steps.lock() {
            steps.clear();
        }
    }
}

impl Observer for BuildLog<'_> {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::StepOutput {
                document,
                phase,
                step,
                stream,
                line,
                ..
            } => self.step_output(document, phase, step, stream, line),
            Event::StepStarted {
                document,
                phase,
                step,
                ..
            } => {
                self.step_started(document, phase, step);
                if let Ok(json) = serde_json::to_string(event) {
                    self.line(&json);
                }
            }
            _ => {
                if let Ok(json) = serde_json::to_string(event) {
                    self.line(&json);
                }
            }
        }
        self.inner.event(event);
    }
}

/// An output sink for commands the build runs itself (generalize): each line to `build.log`
/// and, as step output of a pseudo step, to the observer.
pub struct StageOutput<'a, 'b> {
    pub log: &'b BuildLog<'a>,
    pub stage: &'b str,
    pub partial: Mutex<Vec<u8>>,
}

impl<'a, 'b> StageOutput<'a, 'b> {
    pub fn new(log: &'b BuildLog<'a>, stage: &'b str) -> Self {
        Self {
            log,
            stage,
            partial: Mutex::new(Vec::new()),
        }
    }

    fn emit(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        Observer::event(
            self.log,
            &Event::StepOutput {
                document: self.stage,
                phase: self.stage,
                step: self.stage,
                stream: "stdout",
                line: &text,
                depth: 0,
            },
        );
        self.log.line(&format!("{} | {text}", self.stage));
    }

    /// Emit an unfinished last line.
    pub fn finish(&self) {
        let rest = self
            .partial
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        if !rest.is_empty() {
            self.emit(&rest);
        }
    }
}

impl OutputSink for StageOutput<'_, '_> {
    fn output(&self, _stream: OutputStream, data: &[u8]) {
        let lines: Vec<Vec<u8>> = {
            let Ok(mut partial) = self.partial.lock() else {
                return;
            };
            partial.extend_from_slice(data);
            let Some(last) = partial.iter().rposition(|b| *b == b'\n') else {
                return;
            };
            let rest = partial.split_off(last + 1);
            let complete = std::mem::replace(&mut *partial, rest);
            complete[..complete.len() - 1]
                .split(|b| *b == b'\n')
                .map(<[u8]>::to_vec)
                .collect()
        };
        for line in lines {
            self.emit(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);
    impl Observer for Recorder {
        fn event(&self, e: &Event<'_>) {
            if let Ok(mut v) = self.0.lock() {
                v.push(serde_json::to_string(e).expect("json"));
            }
        }
    }
    impl BuildObserver for Recorder {
        fn build_event(&self, e: &BuildEvent<'_>) {
            if let Ok(mut v) = self.0.lock() {
                v.push(serde_json::to_string(e).expect("json"));
            }
        }
    }

    #[test]
    fn step_output_goes_to_its_file_and_the_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let rec = Recorder::default();
        let log = BuildLog::new(dir.path(), &rec).expect("log");
        log.set_component("1-hello world");
        for i in 0..15 {
            let line = format!("line {i}");
            log.event(&Event::StepOutput {
                document: "hello",
                phase: "build",
                step: "Say",
                stream: "stdout",
                line: &line,
                depth: 0,
            });
        }
        let tail = log.tail("hello", "build", "Say");
        assert_eq!(tail.lines.len(), TAIL_LINES);
        assert_eq!(tail.lines.back().map(String::as_str), Some("line 14"));
        let file = tail.log.expect("a log file");
        assert_eq!(file, dir.path().join("steps/1-hello-world/build-Say.log"));
        log.close();
        let text = fs_err::read_to_string(file).expect("read");
        assert_eq!(text.lines().count(), 15);
        assert_eq!(rec.0.lock().expect("lock").len(), 15, "forwarded");
    }

    #[test]
    fn build_events_serialize_with_the_event_tag_and_reach_build_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let rec = Recorder::default();
        let log = BuildLog::new(dir.path(), &rec).expect("log");
        log.emit(&BuildEvent::StageFinished {
            stage: Stage::Boot,
            detail: None,
            status: "success",
            duration_ms: 1500,
        });
        log.close();
        let seen = rec.0.lock().expect("lock").clone();
        assert_eq!(
            seen,
            [r#"{"event":"stageFinished","stage":"boot","status":"success","durationMs":1500}"#]
        );
        let text = fs_err::read_to_string(dir.path().join("build.log")).expect("read");
        assert!(text.contains(r#""stage":"boot""#), "{text}");
    }
}
