//! The orchestrator as an [`EventSink`]: numbers a job's events from 0,
//! posts them with the VM's token, retries transport failures and `503`
//! (posts are idempotent by sequence number), and reads `410 Gone` as "the
//! job was ended on the orchestrator's side" (cancelled, or timed out
//! there), which the relay turns into a `Cancel` for the guest.

use std::time::Duration;

use orchestrator::client::{ApiClient, ClientError};
use protocol::api::{JobEvent, JobEventKind, VmToken};
use protocol::message::JobId;
use reqwest::StatusCode;

use crate::relay::EventSink;

/// Attempts per batch before the job is given up.
const ATTEMPTS: u32 = 5;

/// Posts one job's events to the orchestrator.
pub struct OrchestratorSink {
    client: ApiClient,
    job_id: JobId,
    token: VmToken,
    next_seq: u64,
    gone: bool,
}

impl OrchestratorSink {
    /// A sink for `job_id`, authenticated by the VM's `token`.
    pub fn new(client: ApiClient, job_id: JobId, token: VmToken) -> Self {
        Self {
            client,
            job_id,
            token,
            next_seq: 0,
            gone: false,
        }
    }
}

impl EventSink for OrchestratorSink {
    async fn post(&mut self, events: Vec<JobEventKind>) -> Result<bool, String> {
        if self.gone {
            return Ok(true);
        }
        let first = self.next_seq;
        let batch: Vec<JobEvent> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| JobEvent {
                seq: first + i as u64,
                event,
            })
            .collect();
        let count = batch.len() as u64;
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            match self
                .client
                .post_events(&self.job_id, &self.token, batch.clone())
                .await
            {
                Ok(_) => {
                    self.next_seq = first + count;
                    return Ok(false);
                }
                Err(e) if e.status() == Some(StatusCode::GONE) => {
                    self.gone = true;
                    return Ok(true);
                }
                // 503: the orchestrator sheds load (its concurrency bound)
                // or is stopping; like a broken connection, worth a retry.
                Err(e) if attempt < ATTEMPTS && is_retryable(&e) => {
                    tracing::warn!(job = %self.job_id, attempt, error = %e, "posting events failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("posting events failed".into())
    }
}

/// Whether a failed post is worth repeating: the connection broke, or the
/// orchestrator answered `503 Service Unavailable` (load shed).
fn is_retryable(e: &ClientError) -> bool {
    matches!(e, ClientError::Transport { .. })
        || e.status() == Some(StatusCode::SERVICE_UNAVAILABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_shedding_and_broken_connections_are_retried_other_answers_are_not() {
        let api = |status| ClientError::Api {
            status,
            message: String::new(),
            next_seq: None,
        };
        assert!(is_retryable(&api(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!is_retryable(&api(StatusCode::BAD_REQUEST)));
        assert!(!is_retryable(&api(StatusCode::UNAUTHORIZED)));
        assert!(!is_retryable(&ClientError::Decode {
            url: String::new(),
            reason: String::new(),
        }));
    }
}
