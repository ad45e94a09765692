//! An HTTP client of the API: the job submitter's calls (used by the CLI)
//! and the host agent's calls (used by tests and tools acting as a VM).

use std::time::Duration;

use protocol::api::{
    AcquireJobRequest, AcquireJobResponse, CancelJobRequest, JobEvent, JobEventsPage,
    PostJobEventsRequest, PostJobEventsResponse, RegisterVmRequest, RegisterVmResponse,
    ReleaseVmResponse, SubmitJobRequest, SubmitJobResponse, VmId, VmToken, routes,
};
use protocol::limits;
use protocol::message::{Job, JobId};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::report::JobReport;

/// Time allowed for one request: the longest long poll plus a margin.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(limits::MAX_LONG_POLL_SECS as u64 + 30);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the connection broke.
    #[error("cannot reach {url}: {}", error_chain(source))]
    Transport {
        /// The request URL.
        url: String,
        /// The error.
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("server answered {status}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The `error` field of the body (or the body itself).
        message: String,
        /// `next_seq` of a 409 gap answer.
        next_seq: Option<u64>,
    },
    /// The success body did not parse.
    #[error("unexpected response from {url}: {reason}")]
    Decode {
        /// The request URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The client could not be built.
    #[error("cannot build HTTP client: {0}")]
    Build(reqwest::Error),
    /// The orchestrator URL is not an `http://` or `https://` URL.
    #[error("orchestrator URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Plain HTTP to a non-loopback orchestrator, not allowed.
    #[error(
        "refusing plain HTTP to {url}: credentials, tokens and secrets would cross the \
         network in clear; use https:// (with a CA certificate if the server's is not \
         trusted by this system) or allow insecure HTTP explicitly"
    )]
    InsecureUrl {
        /// The URL.
        url: String,
    },
    /// The TLS settings (CA certificate) are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// An error with its causes ("error sending request: ...: invalid peer
/// certificate: UnknownIssuer"): reqwest's own text names only the first.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// How a client reaches the orchestrator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transport {
    /// Trust only this CA certificate (PEM) for `https://`; the system's
    /// roots if `None`.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Allow `http://` to a non-loopback address.
    pub allow_insecure_http: bool,
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    next_seq: Option<u64>,
}

/// A client of one orchestrator.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
}

impl ApiClient {
    /// A client of the orchestrator at `base` (`https://host:port`, or
    /// `http://` on loopback), trusting the system's roots.
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_transport(base, &Transport::default())
    }

    /// A client of the orchestrator at `base` with `transport`'s settings.
    pub fn with_transport(base: &str, transport: &Transport) -> Result<Self, ClientError> {
        let url = reqwest::Url::parse(base).map_err(|e| ClientError::BadUrl {
            url: base.to_string(),
            reason: e.to_string(),
        })?;
        let loopback = url.host().is_some_and(|h| crate::tls::is_loopback_host(&h));
        let tls = match url.scheme() {
            "https" => crate::tls::client_config(transport.ca_cert.as_deref())?,
            "http" if loopback || transport.allow_insecure_http => {
                crate::tls::unused_client_config()?
            }
            "http" => {
                return Err(ClientError::InsecureUrl {
                    url: base.to_string(),
                });
            }
            other => {
                return Err(ClientError::BadUrl {
                    url: base.to_string(),
                    reason: format!("scheme {other:?} is neither https nor http"),
                });
            }
        };
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    fn request(&self, method: Method, path: &str, bearer: &str) -> (String, RequestBuilder) {
        let url = format!("{}{path}", self.base);
        let builder = self.http.request(method, &url).bearer_auth(bearer);
        (url, builder)
    }

    async fn send<T: DeserializeOwned>(
        url: String,
        builder: RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = builder
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        if !status.is_success() {
            let (message, next_seq) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => (body.error, body.next_seq),
                Err(_) => (String::from_utf8_lossy(&bytes).into_owned(), None),
            };
            return Err(ClientError::Api {
                status,
                message,
                next_seq,
            });
        }
        let body = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(body).map_err(|err| ClientError::Decode {
            url,
            reason: err.to_string(),
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        bearer: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let (url, mut builder) = self.request(method, path, bearer);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        Self::send(url, builder).await
    }

    /// Submits a job (client credential).
    pub async fn submit(
        &self,
        credential: &str,
        request: &SubmitJobRequest,
    ) -> Result<JobId, ClientError> {
        let response: SubmitJobResponse = self
            .call(Method::POST, routes::JOBS, credential, Some(request))
            .await?;
        Ok(response.job_id)
    }

    /// A job's report (client credential or the job's VM token).
    pub async fn job(&self, bearer: &str, job_id: &JobId) -> Result<JobReport, ClientError> {
        self.call::<(), _>(Method::GET, &routes::job(job_id), bearer, None)
            .await
    }

    /// A page of a job's events from `after`, waiting up to `wait_secs` for
    /// new ones (client credential).
    pub async fn events(
        &self,
        credential: &str,
        job_id: &JobId,
        after: u64,
        wait_secs: u32,
    ) -> Result<JobEventsPage, ClientError> {
        let (url, builder) = self.request(Method::GET, &routes::job_events(job_id), credential);
        let builder = builder.query(&[("after", after), ("wait_secs", u64::from(wait_secs))]);
        Self::send(url, builder).await
    }

    /// Follows a job's events from the start until it ends, calling
    /// `on_event` for each in order; returns the final report.
    pub async fn follow(
        &self,
        credential: &str,
        job_id: &JobId,
        mut on_event: impl FnMut(&JobEvent),
    ) -> Result<JobReport, ClientError> {
        let mut after = 0;
        loop {
            let page = self
                .events(credential, job_id, after, limits::DEFAULT_LONG_POLL_SECS)
                .await?;
            page.events.iter().for_each(&mut on_event);
            after = page.next_seq;
            if page.finished {
                return self.job(credential, job_id).await;
            }
        }
    }

    /// Cancels a job (client credential).
    pub async fn cancel(
        &self,
        credential: &str,
        job_id: &JobId,
        reason: Option<String>,
    ) -> Result<JobReport, ClientError> {
        let request = CancelJobRequest { reason };
        self.call(
            Method::POST,
            &routes::job_cancel(job_id),
            credential,
            Some(&request),
        )
        .await
    }

    /// Registers a VM (host credential).
    pub async fn register_vm(
        &self,
        host_credential: &str,
        request: &RegisterVmRequest,
    ) -> Result<RegisterVmResponse, ClientError> {
        self.call(Method::POST, routes::VMS, host_credential, Some(request))
            .await
    }

    /// Deregisters a VM, revoking its token (host credential).
    pub async fn deregister_vm(
        &self,
        host_credential: &str,
        vm_id: &VmId,
    ) -> Result<(), ClientError> {
        let _: Option<()> = self
            .call::<(), _>(Method::DELETE, &routes::vm(vm_id), host_credential, None)
            .await?;
        Ok(())
    }

    /// Long-polls for the VM's job (VM token).
    pub async fn acquire(
        &self,
        vm_id: &VmId,
        token: &VmToken,
        wait_secs: u32,
    ) -> Result<Option<Job>, ClientError> {
        let request = AcquireJobRequest { wait_secs };
        let response: AcquireJobResponse = self
            .call(
                Method::POST,
                &routes::vm_acquire(vm_id),
                &token.0,
                Some(&request),
            )
            .await?;
        Ok(response.job)
    }

    /// Releases the VM (VM token): it takes no job any more, and a job it
    /// acquired but never started is queued again (returned).
    pub async fn release_vm(
        &self,
        vm_id: &VmId,
        token: &VmToken,
    ) -> Result<Option<JobId>, ClientError> {
        let response: ReleaseVmResponse = self
            .call::<(), _>(Method::POST, &routes::vm_release(vm_id), &token.0, None)
            .await?;
        Ok(response.requeued)
    }

    /// Posts a batch of the job's events (VM token); returns the next seq
    /// the orchestrator expects.
    pub async fn post_events(
        &self,
        job_id: &JobId,
        token: &VmToken,
        events: Vec<JobEvent>,
    ) -> Result<u64, ClientError> {
        let request = PostJobEventsRequest { events };
        let response: PostJobEventsResponse = self
            .call(
                Method::POST,
                &routes::job_events(job_id),
                &token.0,
                Some(&request),
            )
            .await?;
        Ok(response.next_seq)
    }
}
