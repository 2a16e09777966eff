//! Reporting refused annotations where the user looks: a Warning Event on the Service
//! (`kubectl describe service`), and a log line naming the annotation and the value.

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Resource;

use super::translate::Rejection;

/// `reportingController` of the Events.
pub const CONTROLLER: &str = "meshlet.io/control-plane";
/// The Event's reason, what `kubectl get events --field-selector reason=…` filters on.
pub const REASON: &str = "InvalidAnnotation";
/// The Event's action.
const ACTION: &str = "ApplyPolicy";
/// Largest Event note the API server accepts (events.k8s.io/v1 limits `note` to 1 kB).
const MAX_NOTE: usize = 1024;

/// Publishes one Event per refused Service.
#[derive(Clone)]
pub struct Reports {
    recorder: Recorder,
}

impl Reports {
    /// Events are sent with this client, as `meshlet.io/control-plane` (instance: the pod's host name).
    pub fn new(client: kube::Client) -> Self {
        Reports {
            recorder: Recorder::new(client, Reporter::from(CONTROLLER)),
        }
    }

    /// Logs the refusal at once and sends its Event in the background (the API server being slow must
    /// not hold back the mesh update).
    pub fn report(&self, rejection: Rejection) {
        let kept = if rejection.kept_last_good {
            "the last good policy stays in force"
        } else {
            "the mesh-wide defaults apply"
        };
        for error in &rejection.errors {
            tracing::warn!(
                service = %rejection.key,
                annotation = %error.annotation,
                value = %error.value,
                reason = %error.reason,
                "annotation refused; {kept}"
            );
        }
        let note = note(&rejection, kept);
        let reference = rejection.service.object_ref(&());
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            let event = Event {
                type_: EventType::Warning,
                reason: REASON.to_string(),
                note: Some(note),
                action: ACTION.to_string(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(service = %rejection.key, error = %e, "cannot record the Event for a refused annotation");
            }
        });
    }
}

/// `meshlet.io/timeout-request: "soon" expected a duration …; the last good policy stays in force`.
fn note(rejection: &Rejection, kept: &str) -> String {
    let errors: Vec<String> = rejection.errors.iter().map(|e| e.to_string()).collect();
    let mut note = format!("{}; {kept}", errors.join("; "));
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push('…');
    }
    note
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::annotations::AnnotationError;
    use super::*;

    #[test]
    fn notes_name_each_annotation_and_value_and_fit_the_limit() {
        let rejection = |n: usize| Rejection {
            service: Arc::new(Default::default()),
            key: "payment.shop".into(),
            errors: (0..n)
                .map(|i| AnnotationError {
                    annotation: format!("meshlet.io/timeout-request-{i}"),
                    value: "soon".into(),
                    reason: "expected a duration".into(),
                })
                .collect(),
            kept_last_good: true,
        };
        let text = note(&rejection(1), "kept");
        assert_eq!(
            text,
            "meshlet.io/timeout-request-0: \"soon\" expected a duration; kept"
        );
        assert!(note(&rejection(100), "kept").len() <= MAX_NOTE);
    }
}
