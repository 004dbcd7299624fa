//! The PDS FHIR R4 client: `GET {base}/Patient/{nhs number}` with a bearer
//! token, an `X-Request-ID` per lookup (the same on its retries, as the
//! API asks, so PDS can de-duplicate), retries with back-off after a 429,
//! a 5xx or a time-out (a `Retry-After` honoured up to a minute), and one
//! token renewal after a 401.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;

use super::PdsError;
use super::auth::{Credentials, TokenCache};
use super::http::{Answer, Transport};
use super::patient::{self, PdsPatient};

/// Longest wait a `Retry-After` may impose on one lookup.
const MAX_RETRY_AFTER_S: u64 = 60;

/// A PDS client; cheap to share behind an `Arc`.
pub struct PdsClient {
    credentials: Credentials,
    tokens: TokenCache,
    transport: Transport,
    base_url: String,
    end_user_organisation: Option<String>,
    max_retries: u32,
    retry_backoff: Duration,
    /// PDS limits each application's rate (5 a second unless onboarded
    /// for more); going over it answers 429 and delays every lookup.
    pacer: Pacer,
}

/// Requests at least `interval` apart, in the order they asked.
struct Pacer {
    next: std::sync::Mutex<tokio::time::Instant>,
    interval: Duration,
}

impl Pacer {
    fn per_second(rate: u32) -> Self {
        Self {
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
            interval: Duration::from_secs(1) / rate.max(1),
        }
    }

    /// Waits for this request's turn.
    async fn turn(&self) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// Settings of a client beyond its credentials and transport.
pub struct ClientSettings {
    /// The FHIR base URL (no trailing slash needed).
    pub base_url: String,
    /// `NHSD-End-User-Organisation-ODS`, when set.
    pub end_user_organisation: Option<String>,
    /// Retries of one lookup.
    pub max_retries: u32,
    /// First back-off between retries.
    pub retry_backoff: Duration,
    /// Most requests a second (PDS's rate limit for the application).
    pub requests_per_second: u32,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn host_of(uri: &http::Uri) -> String {
    match (uri.host(), uri.port_u16()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

impl PdsClient {
    /// A client.
    pub fn new(credentials: Credentials, transport: Transport, settings: ClientSettings) -> Self {
        Self {
            credentials,
            tokens: TokenCache::default(),
            transport,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            end_user_organisation: settings.end_user_organisation,
            max_retries: settings.max_retries,
            retry_backoff: settings.retry_backoff,
            pacer: Pacer::per_second(settings.requests_per_second),
        }
    }

    /// The patient with NHS number `nhs` (`None`: PDS has none, or it was
    /// invalidated); `today` is `YYYY-MM-DD`. `for_org` is the ODS code of
    /// the organisation the lookup serves (the prison that sent the
    /// summary): PDS asks a client serving several organisations to name
    /// it in `NHSD-End-User-Organisation-ODS`; without one, the configured
    /// `end_user_organisation` is sent.
    ///
    /// # Errors
    /// PDS could not be asked or did not answer usefully, after retries.
    pub async fn patient(
        &self,
        nhs: &str,
        today: &str,
        for_org: Option<&crate::clinical::OdsCode>,
    ) -> Result<Option<PdsPatient>, PdsError> {
        let end_user = for_org
            .map(crate::clinical::OdsCode::as_str)
            .or(self.end_user_organisation.as_deref());
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut renewed = false;
        let mut attempt = 0u32;
        loop {
            // A token endpoint that is down or throttling is retried like PDS.
            let answer = match self.token().await {
                Ok(token) => {
                    self.pacer.turn().await;
                    self.transport
                        .send(self.get(nhs, &token, &request_id, end_user)?)
                        .await
                }
                Err(e) => Err(e),
            };
            let (error, retry_after_s) = match answer {
                Ok(Answer {
                    status: 200, body, ..
                }) => {
                    return patient::parse(&body, today)
                        .map(Some)
                        .map_err(PdsError::Invalid);
                }
                // PDS's own answers name themselves (OperationOutcome
                // `issue[0].details.coding[0].code`): only these are about
                // the patient. A 404 or 400 without one (a wrong base URL,
                // a header or onboarding fault) fails every lookup alike.
                Ok(Answer {
                    status: 404, body, ..
                }) => {
                    return match patient::outcome_code(&body).as_deref() {
                        Some("RESOURCE_NOT_FOUND" | "INVALIDATED_RESOURCE") => Ok(None),
                        other => Err(PdsError::Platform(404, safe_code(other))),
                    };
                }
                Ok(Answer {
                    status: 400, body, ..
                }) => {
                    return match patient::outcome_code(&body).as_deref() {
                        // PDS refuses the number itself (it passed our
                        // check digit): no patient PDS holds, recorded as
                        // such for operators, not retried at once forever.
                        Some("INVALID_RESOURCE_ID") => Ok(None),
                        other => Err(PdsError::Platform(400, safe_code(other))),
                    };
                }
                Ok(Answer { status: 401, .. }) if !renewed => {
                    self.tokens.clear();
                    renewed = true;
                    continue;
                }
                Ok(Answer {
                    status,
                    retry_after_s,
                    ..
                }) if status == 429 || status == 408 || status >= 500 => {
                    (PdsError::Status(status), retry_after_s)
                }
                Ok(Answer { status, .. }) => return Err(PdsError::Status(status)),
                Err(e @ (PdsError::Timeout | PdsError::Unreachable(_) | PdsError::Status(_))) => {
                    (e, None)
                }
                Err(e) => return Err(e),
            };
            if attempt >= self.max_retries {
                return Err(error);
            }
            let backoff = self.retry_backoff.saturating_mul(1 << attempt.min(16));
            let wait = retry_after_s
                .map(|s| Duration::from_secs(s.min(MAX_RETRY_AFTER_S)))
                .unwrap_or(backoff);
            tracing::info!(attempt, status = %error, wait_ms = wait.as_millis() as u64, "PDS lookup retried");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn get(
        &self,
        nhs: &str,
        token: &str,
        request_id: &str,
        end_user: Option<&str>,
    ) -> Result<http::Request<Full<Bytes>>, PdsError> {
        let uri: http::Uri = format!("{}/Patient/{nhs}", self.base_url)
            .parse()
            .map_err(|_| PdsError::Invalid("the lookup URL does not parse".into()))?;
        let mut b = http::Request::get(&uri)
            .header(http::header::HOST, host_of(&uri))
            .header(http::header::ACCEPT, "application/fhir+json")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header("X-Request-ID", request_id);
        if let Some(ods) = end_user {
            b = b.header("NHSD-End-User-Organisation-ODS", ods);
        }
        b.body(Full::default())
            .map_err(|_| PdsError::Invalid("the lookup request does not build".into()))
    }

    /// The bearer token, from the cache or the token endpoint.
    async fn token(&self) -> Result<zeroize::Zeroizing<String>, PdsError> {
        if let Some(token) = self.tokens.get(wall_ms()) {
            return Ok(token);
        }
        let assertion = self.credentials.assertion(wall_ms() / 1_000)?;
        let form = Credentials::token_form(&assertion);
        let uri: http::Uri = self
            .credentials
            .token_url()
            .parse()
            .map_err(|_| PdsError::Auth("the token URL does not parse".into()))?;
        let request = http::Request::post(&uri)
            .header(http::header::HOST, host_of(&uri))
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form.as_bytes().to_vec())))
            .map_err(|_| PdsError::Auth("the token request does not build".into()))?;
        let answer = self.transport.send(request).await?;
        match answer.status {
            200 => self.tokens.store(&answer.body, wall_ms()),
            status if status >= 500 || status == 429 => Err(PdsError::Status(status)),
            status => Err(PdsError::Auth(format!(
                "the token endpoint refused our signed JWT (HTTP {status})"
            ))),
        }
    }
}

/// An error code from PDS's answer, safe to log: upper-case letters and
/// underscores only (it is never patient data), else a placeholder.
fn safe_code(code: Option<&str>) -> String {
    match code {
        Some(c)
            if !c.is_empty()
                && c.len() <= 40
                && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') =>
        {
            c.to_owned()
        }
        Some(_) => "an unrecognised code".into(),
        None => "no OperationOutcome".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Pacer;

    /// Ten lookups asked at once at 5 a second go out 200 ms apart: the
    /// last no sooner than 1.8 s after the first.
    #[tokio::test(start_paused = true)]
    async fn requests_go_no_faster_than_the_rate_limit() {
        let pacer = Arc::new(Pacer::per_second(5));
        let start = tokio::time::Instant::now();
        let mut turns = Vec::new();
        for _ in 0..10 {
            let pacer = pacer.clone();
            turns.push(tokio::spawn(async move {
                pacer.turn().await;
                tokio::time::Instant::now()
            }));
        }
        let mut at = Vec::new();
        for t in turns {
            at.push(t.await.unwrap() - start);
        }
        at.sort();
        assert_eq!(at[0], Duration::ZERO);
        for pair in at.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(200), "{at:?}");
        }
    }
}
