//! Turning the Jupyter messages of one `execute_request` into `/execute` output lines.

use serde_json::Value;

use crate::kernel::{Channel, KernelMessage};
use crate::wire::{ExecutionResult, OutputEvent};

/// Tracks one execution: it is finished once the kernel has both replied on shell and gone
/// idle on IOPub (IOPub idle is the guarantee that all output has been published).
#[derive(Debug, Default)]
pub struct ExecutionTracker {
    idle: bool,
    replied: bool,
    /// Only the first error is reported (a kernel sends it on IOPub and in the reply).
    errored: bool,
}

impl ExecutionTracker {
    pub fn finished(&self) -> bool {
        self.idle && self.replied
    }

    /// The output line a message produces, if any, updating the completion state.
    pub fn observe(&mut self, message: KernelMessage) -> Option<OutputEvent> {
        let KernelMessage {
            channel,
            msg_type,
            date,
            mut content,
        } = message;
        match (channel, msg_type.as_str()) {
            (Channel::IoPub, "status") => {
                if content["execution_state"] == "idle" {
                    self.idle = true;
                }
                None
            }
            (Channel::IoPub, "execute_input") => content["execution_count"]
                .as_i64()
                .map(|execution_count| OutputEvent::NumberOfExecutions { execution_count }),
            (Channel::IoPub, "stream") => {
                let text = text_of(content["text"].take());
                // The Python SDK reads `timestamp` unconditionally; some kernels send no date.
                let timestamp = date.unwrap_or_else(|| {
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                });
                match content["name"].as_str() {
                    Some("stdout") => Some(OutputEvent::Stdout { text, timestamp }),
                    Some("stderr") => Some(OutputEvent::Stderr { text, timestamp }),
                    _ => None,
                }
            }
            (Channel::IoPub, kind @ ("display_data" | "execute_result")) => {
                match content["data"].take() {
                    Value::Object(bundle) => Some(OutputEvent::Result(Box::new(
                        ExecutionResult::from_bundle(bundle, kind == "execute_result"),
                    ))),
                    _ => None,
                }
            }
            (Channel::IoPub, "error") => self.error(&mut content),
            (Channel::Shell, "execute_reply") => {
                self.replied = true;
                match content["status"].as_str() {
                    Some("error") => self.error(&mut content),
                    Some("abort" | "aborted") if !self.errored => {
                        self.errored = true;
                        Some(OutputEvent::service_error(
                            "ExecutionAborted",
                            "Execution was aborted",
                        ))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn error(&mut self, content: &mut Value) -> Option<OutputEvent> {
        if self.errored {
            return None;
        }
        self.errored = true;
        let traceback = match content["traceback"].take() {
            Value::Array(lines) => lines
                .iter()
                .map(|line| line.as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n"),
            other => text_of(other),
        };
        Some(OutputEvent::Error {
            name: text_of(content["ename"].take()),
            value: text_of(content["evalue"].take()),
            traceback,
        })
    }
}

/// Jupyter text fields are strings, or (in notebook form) lists of strings.
fn text_of(value: Value) -> String {
    match value {
        Value::String(s) => s,
        Value::Array(parts) => parts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .concat(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn iopub(msg_type: &str, content: Value) -> KernelMessage {
        KernelMessage {
            channel: Channel::IoPub,
            msg_type: msg_type.into(),
            date: Some("2026-01-01T00:00:00.000000Z".into()),
            content,
        }
    }

    fn reply(content: Value) -> KernelMessage {
        KernelMessage {
            channel: Channel::Shell,
            msg_type: "execute_reply".into(),
            date: None,
            content,
        }
    }

    #[test]
    fn a_typical_execution_in_order() {
        let mut t = ExecutionTracker::default();
        assert_eq!(
            t.observe(iopub("status", json!({"execution_state": "busy"}))),
            None
        );
        assert_eq!(
            t.observe(iopub(
                "execute_input",
                json!({"code": "1+1", "execution_count": 3})
            )),
            Some(OutputEvent::NumberOfExecutions { execution_count: 3 })
        );
        assert_eq!(
            t.observe(iopub("stream", json!({"name": "stdout", "text": "hi\n"}))),
            Some(OutputEvent::Stdout {
                text: "hi\n".into(),
                timestamp: "2026-01-01T00:00:00.000000Z".into()
            })
        );
        let Some(OutputEvent::Result(result)) = t.observe(iopub(
            "execute_result",
            json!({"data": {"text/plain": "2"}, "execution_count": 3}),
        )) else {
            panic!("expected a result");
        };
        assert!(result.is_main_result);
        assert_eq!(result.text, Some(json!("2")));
        assert!(!t.finished());
        t.observe(reply(json!({"status": "ok"})));
        assert!(!t.finished(), "idle has not arrived yet");
        t.observe(iopub("status", json!({"execution_state": "idle"})));
        assert!(t.finished());
    }

    #[test]
    fn an_error_is_reported_once() {
        let mut t = ExecutionTracker::default();
        let error = json!({"ename": "NameError", "evalue": "name 'x' is not defined",
                           "traceback": ["line one", "line two"]});
        assert_eq!(
            t.observe(iopub("error", error.clone())),
            Some(OutputEvent::Error {
                name: "NameError".into(),
                value: "name 'x' is not defined".into(),
                traceback: "line one\nline two".into(),
            })
        );
        let mut reply_content = error;
        reply_content["status"] = json!("error");
        assert_eq!(t.observe(reply(reply_content)), None);
    }

    #[test]
    fn an_error_only_in_the_reply_is_reported() {
        let mut t = ExecutionTracker::default();
        let event = t.observe(reply(
            json!({"status": "error", "ename": "", "evalue": "1", "traceback": []}),
        ));
        assert!(matches!(event, Some(OutputEvent::Error { value, .. }) if value == "1"));
        let event = t.observe(reply(json!({"status": "aborted"})));
        assert_eq!(event, None);
    }

    #[test]
    fn stream_output_always_has_a_timestamp() {
        let mut t = ExecutionTracker::default();
        let mut message = iopub("stream", json!({"name": "stdout", "text": "x"}));
        message.date = None;
        let Some(OutputEvent::Stdout { timestamp, .. }) = t.observe(message) else {
            panic!("expected stdout");
        };
        assert!(
            timestamp.ends_with('Z') && timestamp.contains('T'),
            "{timestamp}"
        );
    }

    #[test]
    fn display_data_is_not_the_main_result_and_odd_messages_are_ignored() {
        let mut t = ExecutionTracker::default();
        let Some(OutputEvent::Result(result)) = t.observe(iopub(
            "display_data",
            json!({"data": {"image/png": "AAA", "text/plain": "<Figure>"}, "metadata": {}}),
        )) else {
            panic!("expected a result");
        };
        assert!(!result.is_main_result);
        assert_eq!(t.observe(iopub("display_data", json!({"data": 5}))), None);
        assert_eq!(
            t.observe(iopub("stream", json!({"name": "other", "text": "x"}))),
            None
        );
        assert_eq!(t.observe(iopub("comm_open", json!({"comm_id": "1"}))), None);
        assert_eq!(
            t.observe(iopub(
                "stream",
                json!({"name": "stderr", "text": ["a", "b"]})
            )),
            Some(OutputEvent::Stderr {
                text: "ab".into(),
                timestamp: "2026-01-01T00:00:00.000000Z".into()
            })
        );
    }
}
