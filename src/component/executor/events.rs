//! What the executor tells the outside while it runs (terminal, `--json`), and the sink that
//! takes a step's raw output to `console.log` and, line by line, to the observer.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use crate::component::report::{RunLog, Status, Summary};
use crate::machine::{OutputSink, OutputStream};

/// One thing that happened. Serialized as one JSON object per line for `--json`
/// (`{"event":"stepStarted",…}`).
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum Event<'a> {
    #[serde(rename_all = "camelCase")]
    RunStarted {
        execution_id: &'a str,
        log_directory: Option<&'a Path>,
        target: &'a str,
    },
    /// Something worth telling that is not a step (ignored parameters, a reboot).
    #[serde(rename_all = "camelCase")]
    Note { message: &'a str },
    #[serde(rename_all = "camelCase")]
    DocumentStarted {
        document: &'a str,
        path: &'a Path,
        /// 0 for the documents given on the command line, 1.. inside `ExecuteDocument`.
        depth: usize,
    },
    #[serde(rename_all = "camelCase")]
    PhaseStarted {
        document: &'a str,
        phase: &'a str,
        depth: usize,
    },
    #[serde(rename_all = "camelCase")]
    StepStarted {
        document: &'a str,
        phase: &'a str,
        step: &'a str,
        action: &'a str,
        attempt: u32,
        max_attempts: u32,
        depth: usize,
    },
    /// One line of a step's output (without its newline).
    #[serde(rename_all = "camelCase")]
    StepOutput {
        document: &'a str,
        phase: &'a str,
        step: &'a str,
        stream: &'a str,
        line: &'a str,
        depth: usize,
    },
    #[serde(rename_all = "camelCase")]
    StepFinished {
        document: &'a str,
        phase: &'a str,
        step: &'a str,
        action: &'a str,
        status: Status,
        attempts: u32,
        duration_ms: u64,
        failure_message: &'a str,
        depth: usize,
    },
    #[serde(rename_all = "camelCase")]
    DocumentFinished {
        document: &'a str,
        status: Status,
        depth: usize,
    },
    /// The AWSTOE summary, last.
    Summary {
        #[serde(flatten)]
        summary: &'a Summary,
    },
}

/// Receives events as they happen. Must be quick: it is called on the executor's path.
pub trait Observer: Send + Sync {
    fn event(&self, event: &Event<'_>);
}

/// Tells nobody (benchmarks, library use).
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: &Event<'_>) {}
}

/// Where a step's output goes: raw bytes to `console.log`, whole lines to the observer.
pub(super) struct StepSink<'a> {
    pub log: Option<&'a RunLog>,
    pub observer: &'a dyn Observer,
    pub document: &'a str,
    pub phase: &'a str,
    pub step: &'a str,
    pub depth: usize,
    /// Unfinished last line per stream (stdout, stderr).
    partial: Mutex<[Vec<u8>; 2]>,
    /// The last [`TAIL_LINES`] complete lines, for error messages.
    tail: Mutex<VecDeque<String>>,
}

/// How many of a step's last output lines an error message shows.
pub const TAIL_LINES: usize = 5;

impl<'a> StepSink<'a> {
    pub fn new(
        log: Option<&'a RunLog>,
        observer: &'a dyn Observer,
        document: &'a str,
        phase: &'a str,
        step: &'a str,
        depth: usize,
    ) -> Self {
        Self {
            log,
            observer,
            document,
            phase,
            step,
            depth,
            partial: Mutex::new([Vec::new(), Vec::new()]),
            tail: Mutex::new(VecDeque::new()),
        }
    }

    /// A new attempt starts: the tail is about the last attempt only.
    pub fn clear_tail(&self) {
        if let Ok(mut tail) = self.tail.lock() {
            tail.clear();
        }
    }

    /// The last lines printed so far (both streams, in order).
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn line(&self, stream: OutputStream, bytes: &[u8]) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let text = String::from_utf8_lossy(bytes);
        if let Ok(mut tail) = self.tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text.to_string());
        }
        self.observer.event(&Event::StepOutput {
            document: self.document,
            phase: self.phase,
            step: self.step,
            stream: match stream {
                OutputStream::Stdout => "stdout",
                OutputStream::Stderr => "stderr",
            },
            line: &text,
            depth: self.depth,
        });
    }

    /// Emit what is left of unfinished lines (output that did not end with a newline).
    pub fn finish(&self) {
        let rest = match self.partial.lock() {
            Ok(mut p) => [std::mem::take(&mut p[0]), std::mem::take(&mut p[1])],
            Err(_) => return,
        };
        for (i, bytes) in rest.iter().enumerate() {
            if !bytes.is_empty() {
                let stream = if i == 0 {
                    OutputStream::Stdout
                } else {
                    OutputStream::Stderr
                };
                self.line(stream, bytes);
                if let Some(log) = self.log {
                    log.console(b"\n");
                }
            }
        }
    }
}

impl OutputSink for StepSink<'_> {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        if let Some(log) = self.log {
            log.console(data);
        }
        let slot = match stream {
            OutputStream::Stdout => 0,
            OutputStream::Stderr => 1,
        };
        // Complete lines are handed over outside the lock, so an observer may take its time.
        let lines: Vec<Vec<u8>> = {
            let Ok(mut partial) = self.partial.lock() else {
                return;
            };
            let buf = &mut partial[slot];
            buf.extend_from_slice(data);
            let Some(last_newline) = buf.iter().rposition(|b| *b == b'\n') else {
                return;
            };
            let rest = buf.split_off(last_newline + 1);
            let complete = std::mem::replace(buf, rest);
            complete[..complete.len() - 1]
                .split(|b| *b == b'\n')
                .map(<[u8]>::to_vec)
                .collect()
        };
        for line in lines {
            self.line(stream, &line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl Observer for Lines {
        fn event(&self, event: &Event<'_>) {
            if let Event::StepOutput { stream, line, .. } = event
                && let Ok(mut l) = self.0.lock()
            {
                l.push(format!("{stream}:{line}"));
            }
        }
    }

    #[test]
    fn output_is_split_into_lines_across_chunks() {
        let lines = Lines::default();
        let sink = StepSink::new(None, &lines, "d", "p", "s", 0);
        sink.output(OutputStream::Stdout, b"he");
        sink.output(OutputStream::Stderr, b"oops\n");
        sink.output(OutputStream::Stdout, b"llo\nwor");
        sink.output(OutputStream::Stdout, b"ld\r\n\nend");
        sink.finish();
        let got = lines.0.lock().expect("lock").clone();
        assert_eq!(
            got,
            [
                "stderr:oops",
                "stdout:hello",
                "stdout:world",
                "stdout:",
                "stdout:end"
            ]
        );
    }
}
