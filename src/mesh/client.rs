//! The MESH API v2 client: send (chunked when large), track, list the
//! inbox, read a message (all its chunks) and acknowledge it, each
//! request with a fresh `NHSMESH` header over mutual TLS
//! ([`crate::https`]).

use http_body_util::Full;
use hyper::body::Bytes;
use serde::Deserialize;

use super::MeshError;
use super::auth::Credentials;
use crate::https::{Answer, Transport};

/// The media type of API v2 answers.
pub const ACCEPT_V2: &str = "application/vnd.mesh.v2+json";

/// A MESH client for one mailbox; cheap to share behind an `Arc`.
pub struct MeshClient {
    credentials: Credentials,
    transport: Transport,
    base_url: String,
    chunk_bytes: usize,
    max_document: usize,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient")
            .field("mailbox", &self.credentials.mailbox())
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// The recipient mailbox.
    pub to: &'a str,
    /// `mex-WorkflowID`.
    pub workflow_id: &'a str,
    /// `mex-Subject`.
    pub subject: &'a str,
    /// `mex-LocalID`: the same on every re-send of one delivery.
    pub local_id: &'a str,
    /// `mex-FileName`.
    pub file_name: &'a str,
    /// `mex-Content-Type` of the whole document.
    pub content_type: &'a str,
    /// The document.
    pub body: &'a [u8],
}

/// What MESH says about a message we sent.
#[derive(Debug, Clone, Deserialize)]
pub struct Tracking {
    /// `uploading`, `accepted`, `acknowledged`, `undeliverable`, `error`, ...
    #[serde(default)]
    pub status: Option<String>,
    /// MESH's status code (e.g. `14` undelivered), when an error.
    #[serde(default)]
    pub status_code: Option<String>,
    /// MESH's words, when an error.
    #[serde(default)]
    pub status_description: Option<String>,
}

/// A message read from the inbox, all its chunks joined.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// `mex-MessageID`.
    pub message_id: String,
    /// `mex-From`: the sender's mailbox.
    pub from: String,
    /// `mex-WorkflowID`.
    pub workflow_id: String,
    /// `mex-LocalID`.
    pub local_id: String,
    /// `mex-Subject`.
    pub subject: String,
    /// `mex-MessageType`: `DATA` or `REPORT`.
    pub message_type: String,
    /// `Content-Encoding` (`gzip` or empty).
    pub content_encoding: String,
    /// `mex-StatusCode` of a report.
    pub status_code: String,
    /// `mex-StatusDescription` of a report.
    pub status_description: String,
    /// `mex-LinkedMsgId` of a report: the message it is about.
    pub linked_message_id: String,
    /// The content.
    pub body: Vec<u8>,
}

#[derive(Deserialize)]
struct Sent {
    message_id: String,
}

#[derive(Deserialize)]
struct Inbox {
    messages: Vec<String>,
    #[serde(default)]
    links: InboxLinks,
}

#[derive(Deserialize, Default)]
struct InboxLinks {
    next: Option<String>,
}

/// The `continue_from` token of an inbox page's `links.next`, as MESH wrote
/// it (already URL-encoded); none when it holds characters a query value
/// does not, so nothing MESH sends can change the path asked next.
fn continue_from(next: &str) -> Option<String> {
    let query = next.split_once('?')?.1;
    let token = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("continue_from="))?;
    (!token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"%-_.=~".contains(&b)))
    .then(|| token.to_owned())
}

#[derive(Deserialize)]
struct TrackedV1 {
    #[serde(rename = "messageId")]
    message_id: String,
    #[serde(default)]
    status: Option<String>,
}

/// How many chunks a message has, from the `Mex-Chunk-Range` (`n:total`)
/// of its chunk `n`. A whole message (200) may leave it out; a part (206)
/// must say which part it is, or a message cut short would read as whole.
fn chunk_total(answer: &Answer, n: usize) -> Result<usize, MeshError> {
    let range = header(answer, "mex-Chunk-Range");
    let parsed: Option<(usize, usize)> = range
        .split_once(':')
        .and_then(|(at, total)| Some((at.trim().parse().ok()?, total.trim().parse().ok()?)));
    match parsed {
        // A whole message may leave the range out; a report (no content)
        // may say `1:0`.
        None if range.is_empty() && answer.status == 200 && n == 1 => Ok(1),
        Some((1, 0)) if answer.status == 200 && n == 1 => Ok(1),
        Some((at, total)) if at == n && (1..=MAX_CHUNKS).contains(&total) && at <= total => {
            if answer.status == 206 && total < 2 {
                Err(MeshError::Invalid(
                    "MESH answered part of a message that it says has one chunk".into(),
                ))
            } else {
                Ok(total)
            }
        }
        _ => Err(MeshError::Invalid(format!(
            "MESH's chunk {n} does not say which part of the message it is (Mex-Chunk-Range)"
        ))),
    }
}

/// Most chunks one inbox message is read in (MESH's chunks are 20 MB or
/// less; a document is far smaller, so this only bounds the loop).
const MAX_CHUNKS: usize = 10_000;

fn header(answer: &Answer, name: &str) -> String {
    answer
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// An inbox message from the answer that carried its headers.
fn incoming(message_id: &str, first: &Answer, body: Vec<u8>) -> Incoming {
    Incoming {
        message_id: message_id.to_owned(),
        from: header(first, "mex-From"),
        workflow_id: header(first, "mex-WorkflowID"),
        local_id: header(first, "mex-LocalID"),
        subject: header(first, "mex-Subject"),
        message_type: header(first, "mex-MessageType"),
        content_encoding: header(first, "Content-Encoding"),
        status_code: header(first, "mex-StatusCode"),
        status_description: header(first, "mex-StatusDescription"),
        linked_message_id: header(first, "mex-LinkedMsgId"),
        body,
    }
}

fn host_of(uri: &http::Uri) -> String {
    match (uri.host(), uri.port_u16()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

/// `ok` when `answer` has one of the `wanted` statuses, else the error it is.
fn expect(answer: Answer, wanted: &[u16]) -> Result<Answer, MeshError> {
    if wanted.contains(&answer.status) {
        return Ok(answer);
    }
    // MESH's error bodies name the condition (no message content).
    let said: String = String::from_utf8_lossy(&answer.body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    Err(MeshError::Status(answer.status, said, answer.retry_after_s))
}

/// `mex-ClientVersion`: this gateway and its version.
fn client_version() -> String {
    format!("throughcare=={}", env!("CARGO_PKG_VERSION"))
}

/// `mex-OSVersion`: the kernel's release, as far as it can be read.
fn os_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|v| v.trim().to_owned())
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "unknown".to_owned())
}

impl MeshClient {
    /// A client of `credentials`' mailbox at `base_url`.
    pub fn new(
        credentials: Credentials,
        transport: Transport,
        base_url: &str,
        chunk_bytes: usize,
    ) -> Self {
        Self {
            credentials,
            transport,
            base_url: base_url.trim_end_matches('/').to_owned(),
            chunk_bytes: chunk_bytes.max(1),
            max_document: usize::MAX,
        }
    }

    /// The same client refusing to read inbox messages larger than `bytes`
    /// ([`HttpError::TooLarge`](crate::https::HttpError::TooLarge)).
    #[must_use]
    pub fn with_max_document(mut self, bytes: usize) -> Self {
        self.max_document = bytes;
        self
    }

    /// The largest document this client reads (and, uncompressed, accepts).
    pub fn max_document(&self) -> usize {
        self.max_document
    }

    /// The client's own mailbox.
    pub fn mailbox(&self) -> &str {
        self.credentials.mailbox()
    }

    fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Bytes,
    ) -> Result<http::request::Builder, MeshError> {
        let uri: http::Uri = format!("{}/messageexchange/{}{path}", self.base_url, self.mailbox())
            .parse()
            .map_err(|_| MeshError::Invalid("a MESH URL does not parse".into()))?;
        let b = http::Request::builder()
            .method(method)
            .header(http::header::HOST, host_of(&uri))
            .header(
                http::header::AUTHORIZATION,
                self.credentials.header().as_str(),
            )
            .header(http::header::ACCEPT, ACCEPT_V2)
            .header(http::header::CONTENT_LENGTH, body.len())
            .uri(uri);
        Ok(b)
    }

    async fn exchange(
        &self,
        builder: http::request::Builder,
        body: Bytes,
    ) -> Result<Answer, MeshError> {
        let request = builder
            .body(Full::new(body))
            .map_err(|_| MeshError::Invalid("a MESH request does not build".into()))?;
        Ok(self.transport.send(request).await?)
    }

    /// Validates the mailbox ("handshake", MESH API v2): checks that MESH
    /// is reachable and accepts our certificate and credentials, and tells
    /// MESH which client and platform call it. MESH asks a client to call it
    /// at least once every 24 hours.
    ///
    /// # Errors
    /// Transport failures and MESH's refusals (403: authentication failed).
    pub async fn handshake(&self) -> Result<(), MeshError> {
        let b = self
            .request(http::Method::POST, "", Bytes::new())?
            .header(http::header::USER_AGENT, client_version())
            .header("mex-ClientVersion", client_version())
            .header("mex-OSName", std::env::consts::OS)
            .header("mex-OSVersion", os_version())
            .header("mex-OSArchitecture", std::env::consts::ARCH)
            .header("mex-JavaVersion", "N/A");
        expect(self.exchange(b, Bytes::new()).await?, &[200])?;
        Ok(())
    }

    /// Sends `msg`, in chunks of at most the configured size; the MESH
    /// message id once every chunk is accepted.
    ///
    /// # Errors
    /// Transport failures and MESH's refusals, per chunk.
    pub async fn send(&self, msg: &Outgoing<'_>) -> Result<String, MeshError> {
        let chunks: Vec<&[u8]> = if msg.body.is_empty() {
            vec![msg.body]
        } else {
            msg.body.chunks(self.chunk_bytes).collect()
        };
        let total = chunks.len();
        let first = Bytes::copy_from_slice(chunks[0]);
        let mut b = self
            .request(http::Method::POST, "/outbox", first.clone())?
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .header("mex-From", self.mailbox())
            .header("mex-To", msg.to)
            .header("mex-WorkflowID", msg.workflow_id)
            .header("mex-Subject", msg.subject)
            .header("mex-LocalID", msg.local_id)
            .header("mex-FileName", msg.file_name)
            .header("mex-Content-Type", msg.content_type);
        if total > 1 {
            b = b.header("mex-Chunk-Range", format!("1:{total}"));
        }
        let answer = expect(self.exchange(b, first).await?, &[200, 202])?;
        let sent: Sent = serde_json::from_slice(&answer.body)
            .map_err(|_| MeshError::Invalid("MESH's send answer has no message_id".into()))?;
        // It goes into the next chunks' paths and is tracked by later.
        if !super::is_message_id(&sent.message_id) {
            return Err(MeshError::Invalid(
                "MESH's send answer names a message id that is not one".into(),
            ));
        }
        for (i, chunk) in chunks.iter().enumerate().skip(1) {
            let n = i + 1;
            let body = Bytes::copy_from_slice(chunk);
            let b = self
                .request(
                    http::Method::POST,
                    &format!("/outbox/{}/{n}", sent.message_id),
                    body.clone(),
                )?
                .header(http::header::CONTENT_TYPE, "application/octet-stream")
                .header("mex-Chunk-Range", format!("{n}:{total}"));
            expect(self.exchange(b, body).await?, &[200, 202])?;
        }
        Ok(sent.message_id)
    }

    /// What MESH says about a message this mailbox sent.
    ///
    /// # Errors
    /// Transport failures and MESH's refusals (404: not known).
    pub async fn track(&self, message_id: &str) -> Result<Tracking, MeshError> {
        let b = self.request(
            http::Method::GET,
            &format!("/outbox/tracking?messageID={message_id}"),
            Bytes::new(),
        )?;
        let answer = expect(self.exchange(b, Bytes::new()).await?, &[200])?;
        serde_json::from_slice(&answer.body)
            .map_err(|_| MeshError::Invalid("MESH's tracking answer does not read".into()))
    }

    /// The id of a complete message this mailbox sent with `local_id`, if
    /// MESH knows exactly one (its tracking by local id; `None` when it has
    /// none, only an incomplete upload, or several: 300 names none of them
    /// to track, so the caller sends again under the same local id, which a
    /// recipient discards as a repeat).
    ///
    /// # Errors
    /// Transport failures and MESH's refusals other than 404 and 300.
    pub async fn sent_with_local_id(&self, local_id: &str) -> Result<Option<String>, MeshError> {
        let b = self.request(
            http::Method::GET,
            &format!("/outbox/tracking/{local_id}"),
            Bytes::new(),
        )?;
        let answer = self.exchange(b, Bytes::new()).await?;
        if answer.status == 404 {
            return Ok(None);
        }
        if answer.status == 300 {
            tracing::warn!(
                local_id,
                "MESH holds several messages under this local id and names none; sending again under it"
            );
            return Ok(None);
        }
        let answer = expect(answer, &[200])?;
        let t: TrackedV1 = serde_json::from_slice(&answer.body)
            .map_err(|_| MeshError::Invalid("MESH's tracking answer does not read".into()))?;
        let complete = !t
            .status
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("uploading"));
        Ok(complete.then_some(t.message_id))
    }

    /// Ids of messages waiting in the inbox, at most `max`.
    ///
    /// # Errors
    /// Transport failures and MESH's refusals.
    pub async fn inbox(&self, max: u32) -> Result<Vec<String>, MeshError> {
        Ok(self.inbox_page(max, None).await?.0)
    }

    /// One page of the inbox, at most `max` ids, from the start or from
    /// `after` (the token of the page before); with the token of the next
    /// page when MESH holds more (its `links.next`).
    ///
    /// # Errors
    /// Transport failures and MESH's refusals.
    pub async fn inbox_page(
        &self,
        max: u32,
        after: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), MeshError> {
        let path = match after {
            Some(token) => format!("/inbox?max_results={max}&continue_from={token}"),
            None => format!("/inbox?max_results={max}"),
        };
        let b = self.request(http::Method::GET, &path, Bytes::new())?;
        let answer = expect(self.exchange(b, Bytes::new()).await?, &[200])?;
        let inbox: Inbox = serde_json::from_slice(&answer.body)
            .map_err(|_| MeshError::Invalid("MESH's inbox answer does not read".into()))?;
        let next = inbox.links.next.as_deref().and_then(continue_from);
        Ok((inbox.messages, next))
    }

    /// One inbox message with all its chunks.
    ///
    /// # Errors
    /// Transport failures and MESH's refusals.
    pub async fn retrieve(&self, message_id: &str) -> Result<Incoming, MeshError> {
        let b = self.request(
            http::Method::GET,
            &format!("/inbox/{message_id}"),
            Bytes::new(),
        )?;
        let first = expect(self.exchange(b, Bytes::new()).await?, &[200, 206])?;
        let total = chunk_total(&first, 1)?;
        let mut body = first.body.to_vec();
        if body.len() > self.max_document {
            return Err(crate::https::HttpError::TooLarge(self.max_document).into());
        }
        for n in 2..=total {
            let b = self.request(
                http::Method::GET,
                &format!("/inbox/{message_id}/{n}"),
                Bytes::new(),
            )?;
            let chunk = expect(self.exchange(b, Bytes::new()).await?, &[200, 206])?;
            if chunk_total(&chunk, n)? != total {
                return Err(MeshError::Invalid(format!(
                    "MESH's chunk {n} of {total} names another count of chunks"
                )));
            }
            body.extend_from_slice(&chunk.body);
            if body.len() > self.max_document {
                return Err(crate::https::HttpError::TooLarge(self.max_document).into());
            }
        }
        Ok(incoming(message_id, &first, body))
    }

    /// An inbox message's headers only (`HEAD`), its body left empty: who
    /// sent a message too large to read.
    ///
    /// # Errors
    /// Transport failures and MESH's refusals.
    pub async fn headers_of(&self, message_id: &str) -> Result<Incoming, MeshError> {
        let b = self.request(
            http::Method::HEAD,
            &format!("/inbox/{message_id}"),
            Bytes::new(),
        )?;
        let answer = expect(self.exchange(b, Bytes::new()).await?, &[200])?;
        Ok(incoming(message_id, &answer, Vec::new()))
    }

    /// Acknowledges an inbox message: MESH removes it from the inbox and
    /// tells its sender it was delivered.
    ///
    /// # Errors
    /// Transport failures and MESH's refusals.
    pub async fn acknowledge(&self, message_id: &str) -> Result<(), MeshError> {
        let b = self.request(
            http::Method::PUT,
            &format!("/inbox/{message_id}/status/acknowledged"),
            Bytes::new(),
        )?;
        expect(self.exchange(b, Bytes::new()).await?, &[200])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Answer, chunk_total, continue_from};

    fn answer(status: u16, range: Option<&str>) -> Answer {
        let mut headers = http::HeaderMap::new();
        if let Some(r) = range {
            headers.insert("mex-chunk-range", r.parse().unwrap());
        }
        Answer {
            status,
            retry_after_s: None,
            headers,
            body: super::Bytes::new(),
        }
    }

    /// A part of a message must say which part it is: a 206 without its
    /// range, or with a range that is not this chunk's, is not read as a
    /// whole message (a medication list cut short would parse).
    #[test]
    fn a_chunk_must_say_which_part_of_the_message_it_is() {
        assert_eq!(chunk_total(&answer(200, None), 1).unwrap(), 1);
        assert_eq!(chunk_total(&answer(200, Some("1:1")), 1).unwrap(), 1);
        // A report has no content: MESH says `1:0`.
        assert_eq!(chunk_total(&answer(200, Some("1:0")), 1).unwrap(), 1);
        assert_eq!(chunk_total(&answer(206, Some("1:3")), 1).unwrap(), 3);
        assert_eq!(chunk_total(&answer(200, Some("3:3")), 3).unwrap(), 3);
        for (status, range, n) in [
            (206, None, 1),
            (206, Some("1:1"), 1),
            (206, Some("garbage"), 1),
            (206, Some("2:3"), 1),
            (200, None, 2),
            (200, Some("0:0"), 1),
            (206, Some("1:0"), 1),
            (200, Some("4:3"), 4),
        ] {
            assert!(
                chunk_total(&answer(status, range), n).is_err(),
                "{status} {range:?} {n}"
            );
        }
    }

    #[test]
    fn the_next_page_is_asked_for_by_meshs_own_token_and_nothing_else() {
        let next = "https://mesh/messageexchange/X26ABC1/inbox?max_results=10&continue_from=eyJwayI6ICJNQiJ9%3D%3D";
        assert_eq!(
            continue_from(next).as_deref(),
            Some("eyJwayI6ICJNQiJ9%3D%3D")
        );
        assert_eq!(
            continue_from("/inbox?continue_from=20220228174323123_ACDED1").as_deref(),
            Some("20220228174323123_ACDED1")
        );
        // A token that would change the path or add a parameter is not used.
        for bad in [
            "/inbox?continue_from=a/../../outbox",
            "/inbox?continue_from=a#b",
            "/inbox?continue_from=",
            "/inbox?max_results=10",
            "/inbox",
        ] {
            assert_eq!(continue_from(bad), None, "{bad}");
        }
    }
}
