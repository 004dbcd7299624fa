//! Inbound: the gateway's MESH inbox. A message from a mailbox the
//! registry maps to an organisation is submitted through the application
//! layer as that organisation, exactly as a gRPC submit (the idempotency
//! key is the sender's `mex-LocalID`, or MESH's message id when it gives
//! none), and acknowledged in MESH only once the submit is durable.
//!
//! A message the gateway cannot accept is refused back to its sender: a
//! MESH message with workflow id [`super::REFUSAL_WORKFLOW`] whose JSON body
//! names the refused message, the stable reason and the field violations
//! (never a value from the document), and only then acknowledged. A
//! failure of the gateway itself (store unavailable, shutting down) leaves
//! the message in the inbox for the next round.
//!
//! A MESH report (a non-delivery report about a message we sent) quarantines
//! that delivery with MESH's reason; so does a peer gateway's refusal of a
//! message we sent it.

use serde_json::json;

use super::client::{Incoming, Outgoing};
use super::outbound::MeshEdge;
use super::{MeshError, REFUSAL_WORKFLOW};
use crate::clinical::{Violation, hl7v2};
use crate::handover::{
    Caller, Error, IncomingDocument, Kind, SubmitCommand, scrubbed, withhold_numbers,
};
use crate::https::HttpError;
use crate::store::MeshState;

/// Why an inbox message is not submitted.
enum Refusal {
    /// The gateway refuses it: tell the sender.
    Refused {
        reason: &'static str,
        message: String,
        violations: Vec<Violation>,
    },
    /// The gateway could not decide now: leave it in the inbox.
    Later(MeshError),
}

fn refused(field: &str, why: &str) -> Error {
    Error::invalid(field, why)
}

/// The content as sent: `Content-Encoding: gzip` (what `mesh-client` and
/// MESH UI send when compressing; each chunk may be its own gzip member) is
/// decoded, reading at most `limit` bytes so a small message cannot expand
/// without bound.
fn decoded(msg: &Incoming, limit: usize) -> Result<std::borrow::Cow<'_, [u8]>, Error> {
    use std::io::Read;
    match msg.content_encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(std::borrow::Cow::Borrowed(&msg.body)),
        "gzip" => {
            let mut out = Vec::new();
            let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
            flate2::read::MultiGzDecoder::new(msg.body.as_slice())
                .take(cap)
                .read_to_end(&mut out)
                .map_err(|_| refused("Content-Encoding", "not a valid gzip stream"))?;
            if out.len() > limit {
                return Err(refused(
                    "content",
                    &format!(
                        "larger than the {limit} bytes the gateway accepts, once uncompressed"
                    ),
                ));
            }
            Ok(std::borrow::Cow::Owned(out))
        }
        _ => Err(refused(
            "Content-Encoding",
            "only gzip is understood (or no encoding)",
        )),
    }
}

/// The sender's idempotency key: its local id when usable as a message id;
/// a local id that is not (spaces, over 128 characters, not ASCII) by its
/// digest, `mesh-local:<SHA-256, 32 hex>`, so that a resend under the same
/// local id is still the same submit; MESH's id when there is none.
fn idempotency_key(msg: &Incoming) -> String {
    use sha2::Digest;
    let local = msg.local_id.trim();
    if local.is_empty() {
        format!("mesh:{}", msg.message_id)
    } else if local.len() <= 128 && local.bytes().all(|b| b.is_ascii_graphic()) {
        local.to_owned()
    } else {
        let digest = sha2::Sha256::digest(local.as_bytes());
        format!("mesh-local:{}", crate::audit::hex(&digest[..16]))
    }
}

/// What became of one inbox message.
enum Taken {
    /// It left the inbox: submitted, refused (and reported), or a report.
    Acknowledged,
    /// It stays in the inbox for a later round.
    Left,
}

impl MeshEdge {
    /// Takes each listed inbox message in turn. A failure that is one
    /// message's (MESH answers, but not for it) leaves that message in the
    /// inbox and the rest are read; the round stops only when MESH as a
    /// whole fails or the gateway cannot decide now.
    pub(super) async fn read_inbox(&mut self, ids: Vec<String>) -> Result<(), MeshError> {
        for id in ids {
            if !super::is_message_id(&id) {
                tracing::warn!("MESH listed a message id that is not one; skipped");
                continue;
            }
            if self.unreportable.contains(&id) {
                continue;
            }
            match self.take(&id).await {
                Ok(Taken::Acknowledged) => self.metrics.mesh_message("in", "acknowledged"),
                Ok(Taken::Left) => {}
                Err(e @ MeshError::Gateway(_)) => return Err(e),
                Err(e) if self.mesh_failing(&e).await => return Err(e),
                Err(e) => super::outbound::message_failed(&e, "taking an inbox message"),
            }
        }
        Ok(())
    }

    /// Takes one inbox message: submits it, refuses it, or applies a report.
    async fn take(&mut self, id: &str) -> Result<Taken, MeshError> {
        let msg = match self.client.retrieve(id).await {
            Ok(msg) => msg,
            Err(MeshError::Http(HttpError::TooLarge(limit))) => {
                return self.refuse_unread(id, limit).await;
            }
            Err(e) => return Err(e),
        };
        if msg.workflow_id.eq_ignore_ascii_case(REFUSAL_WORKFLOW) {
            // Another gateway's refusal of ours: never refused back (no
            // ping-pong). Its sender acknowledges the message it refused
            // (so MESH shows it delivered): the refusal is what says it
            // was not taken, so the delivery it names is quarantined.
            tracing::warn!(mesh_message_id = %id, "a refusal report arrived in the gateway's MESH inbox; acknowledged, not answered");
            self.on_peer_refusal(&msg).await?;
            self.client.acknowledge(id).await?;
            self.metrics.mesh_message("in", "report");
            return Ok(Taken::Acknowledged);
        }
        if msg.message_type.eq_ignore_ascii_case("REPORT") {
            self.on_report(&msg).await?;
            self.client.acknowledge(id).await?;
            self.metrics.mesh_message("in", "report");
            return Ok(Taken::Acknowledged);
        }
        match self.submit(&msg).await {
            Ok(handover_id) => {
                self.client.acknowledge(id).await?;
                tracing::info!(handover_id, "MESH message submitted and acknowledged");
                self.metrics.mesh_message("in", "submitted");
            }
            Err(Refusal::Later(e)) => {
                self.metrics.mesh_message("in", "error");
                return Err(e);
            }
            Err(Refusal::Refused {
                reason,
                message,
                violations,
            }) => {
                if !self.refuse(&msg, reason, &message, &violations).await? {
                    return Ok(Taken::Left);
                }
                self.client.acknowledge(id).await?;
                self.metrics.mesh_message("in", "refused");
            }
        }
        Ok(Taken::Acknowledged)
    }

    /// Reads the message into a submit and makes it as its sender; the
    /// handover id once durable. Every refusal is audited, those decided
    /// before the submit (an unregistered mailbox, a workflow id, content
    /// that is not a document) as much as the submit's own.
    async fn submit(&self, msg: &Incoming) -> Result<u64, Refusal> {
        let (caller, cmd) = match self.command(msg) {
            Ok(read) => read,
            Err((caller, e)) => return Err(self.refusal(&caller, &e).await),
        };
        match self.gateway.submit(&caller, Ok(cmd)).await {
            Ok(receipt) => Ok(receipt.handover_id),
            Err(e)
                if matches!(
                    e.kind(),
                    Kind::Unavailable | Kind::Internal | Kind::DataLoss
                ) =>
            {
                Err(Refusal::Later(MeshError::Gateway(e.to_string())))
            }
            Err(e) => Err(self.refusal(&caller, &e).await),
        }
    }

    /// The submit a message makes, and who makes it; or why it is refused
    /// (by whom, when its mailbox is registered).
    fn command(&self, msg: &Incoming) -> Result<(Caller, SubmitCommand), (Caller, Error)> {
        let org = self
            .gateway
            .registry
            .read()
            .by_mesh_mailbox(&msg.from)
            .cloned();
        let Some(org) = org else {
            return Err((
                Caller::Unidentified,
                refused(
                    "mex-From",
                    "this MESH mailbox is not registered with the gateway",
                ),
            ));
        };
        let caller = relayed(org.ods.clone());
        let refuse = |e: Error| (caller.clone(), e);
        let Some(event) = super::event_of_workflow(&msg.workflow_id) else {
            return Err(refuse(refused(
                "mex-WorkflowID",
                "not a Throughcare workflow id (THROUGHCARE_ADMISSION, THROUGHCARE_TRANSFER, THROUGHCARE_RELEASE, THROUGHCARE_COMMUNITY_SUMMARY)",
            )));
        };
        let body = decoded(msg, self.client.max_document()).map_err(refuse)?;
        // An HL7 v2 message is read in the character set its MSH-18
        // declares (Latin-1 to UTF-8, hexadecimal escapes included), as
        // over MLLP; a set the gateway does not read is refused at MSH-18.
        let unmarked = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&body);
        let message = unmarked.trim_ascii_start();
        let body = if message.starts_with(b"MSH") {
            match hl7v2::decoded(message) {
                Ok(text) => std::borrow::Cow::Owned(text.into_owned()),
                Err(e) => return Err(refuse(Error::from(e))),
            }
        } else {
            body
        };
        let Ok(text) = std::str::from_utf8(&body) else {
            return Err(refuse(refused("content", "not UTF-8 text")));
        };
        // A byte order mark is allowed before either format (RFC 8259 §8.1
        // lets a parser ignore it; some Windows senders write one).
        let start = text.trim_start_matches('\u{feff}').trim_start();
        let document = if start.starts_with('{') {
            IncomingDocument::FhirJson(start.to_owned())
        } else if start.starts_with("MSH") {
            IncomingDocument::Hl7v2(start.to_owned())
        } else {
            return Err(refuse(refused(
                "content",
                "neither a FHIR R4 JSON Bundle nor an HL7 v2 message",
            )));
        };
        let cmd = SubmitCommand {
            message_id: idempotency_key(msg),
            event,
            patient: None,
            destinations: Vec::new(),
            document,
        };
        Ok((caller, cmd))
    }

    /// Audits a refusal (fail closed: unrecorded, the message waits) and
    /// says what to report to its sender.
    async fn refusal(&self, caller: &Caller, e: &Error) -> Refusal {
        if let Err(unrecorded) = self.gateway.audit_refusal(caller, "submit", e).await {
            return Refusal::Later(MeshError::Gateway(unrecorded.to_string()));
        }
        let violations = match e {
            Error::Invalid(v) => v.iter().cloned().map(scrubbed).collect(),
            _ => Vec::new(),
        };
        Refusal::Refused {
            reason: e.reason(),
            message: withhold_numbers(&e.to_string()),
            violations,
        }
    }

    /// Refuses a message too large to read: its headers name the sender.
    async fn refuse_unread(&mut self, id: &str, limit: usize) -> Result<Taken, MeshError> {
        let msg = self.client.headers_of(id).await?;
        let why = format!("larger than the {limit} bytes the gateway accepts");
        let sender = self
            .gateway
            .registry
            .read()
            .by_mesh_mailbox(&msg.from)
            .cloned();
        let caller = sender.map_or(Caller::Unidentified, |o| relayed(o.ods));
        let refusal = Error::invalid("content", why.clone());
        if let Err(e) = self
            .gateway
            .audit_refusal(&caller, "submit", &refusal)
            .await
        {
            return Err(MeshError::Gateway(e.to_string()));
        }
        let violations = [Violation {
            field: "content".into(),
            description: why.clone(),
        }];
        let message = format!("invalid request: content: {why}");
        if !self
            .refuse(&msg, "INVALID_ARGUMENT", &message, &violations)
            .await?
        {
            return Ok(Taken::Left);
        }
        self.client.acknowledge(id).await?;
        self.metrics.mesh_message("in", "refused");
        Ok(Taken::Acknowledged)
    }

    /// Sends the refusal report back to the message's sender; false when
    /// MESH will not take it (the sender's mailbox cannot receive it).
    /// Such a message is left in the inbox, never acknowledged, since an
    /// acknowledgement tells its sender it was delivered: when it expires
    /// unread, MESH reports it undeliverable to its sender. Operators are
    /// alerted, and this process does not read it again.
    async fn refuse(
        &mut self,
        msg: &Incoming,
        reason: &'static str,
        message: &str,
        violations: &[Violation],
    ) -> Result<bool, MeshError> {
        tracing::info!(
            reason,
            violations = violations.len(),
            "MESH message refused; reporting to its sender"
        );
        let body = json!({
            "refused_message_id": msg.message_id,
            "local_id": msg.local_id,
            "workflow_id": msg.workflow_id,
            "reason": reason,
            "message": message,
            "field_violations": violations
                .iter()
                .map(|v| json!({"field": v.field, "description": v.description}))
                .collect::<Vec<_>>(),
        })
        .to_string();
        let local_id = format!("refusal-{}", msg.message_id);
        let subject = format!("Throughcare refused MESH message {}", msg.message_id);
        let file_name = format!("{local_id}.json");
        let report = Outgoing {
            to: &msg.from,
            workflow_id: REFUSAL_WORKFLOW,
            subject: &subject,
            local_id: &local_id,
            file_name: &file_name,
            content_type: "application/json",
            body: body.as_bytes(),
        };
        match self.client.send(&report).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_transient() || self.mesh_failing(&e).await => Err(e),
            Err(e) => {
                tracing::error!(
                    alert = "mesh_refusal_unreportable",
                    mesh_message_id = %msg.message_id,
                    error = %e,
                    "ALERT: MESH would not take the refusal report of an inbox message; the \
                     message is left unacknowledged in the inbox, so its sender is told it was \
                     not delivered when it expires; the refusal stands in the audit trail"
                );
                self.unreportable.insert(msg.message_id.clone());
                Ok(false)
            }
        }
    }

    /// A peer gateway's refusal of a message we sent it: the delivery it
    /// names (by our local id and MESH's message id, from the mailbox we
    /// sent it to) is quarantined with the peer's stable reason, before the
    /// peer's acknowledgement can make it look delivered. Anything else is
    /// only logged.
    async fn on_peer_refusal(&self, msg: &Incoming) -> Result<(), MeshError> {
        #[derive(serde::Deserialize)]
        struct PeerRefusal {
            refused_message_id: String,
            local_id: String,
            reason: String,
        }
        let Ok(refusal) = serde_json::from_slice::<PeerRefusal>(&msg.body) else {
            tracing::warn!("a refusal report that does not read as one; logged only");
            return Ok(());
        };
        let sent_to = |r: &crate::store::MeshRecord| {
            let registry = self.gateway.registry.read();
            r.mailbox
                .parse()
                .ok()
                .and_then(|code| registry.get(&code))
                .and_then(|o| o.mesh_mailbox.clone())
                .is_some_and(|mb| mb.eq_ignore_ascii_case(&msg.from))
        };
        let refused = self.in_flight(&refusal.local_id)?.filter(|(_, r)| {
            r.message_id
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(&refusal.refused_message_id))
                && sent_to(r)
        });
        let Some((_, record)) = refused else {
            tracing::info!(
                "a refusal report about no delivery in flight to its sender; logged only"
            );
            return Ok(());
        };
        let word: String = refusal
            .reason
            .chars()
            .filter(|c| c.is_ascii_uppercase() || *c == '_')
            .take(64)
            .collect();
        let reason =
            format!("refused by the recipient's gateway ({word}): see its refusal report in MESH");
        self.fail_delivery(record, &reason).await
    }

    /// The delivery a message we sent is about, by its local id, and its
    /// MESH record while the message is in flight (sent, not yet answered).
    fn in_flight(
        &self,
        local_id: &str,
    ) -> Result<Option<(u64, crate::store::MeshRecord)>, MeshError> {
        // `throughcare-<delivery id>`, or `-<ODS code>` after it for a copy
        // sent on to another organisation: a report about the message to
        // the first says nothing of the copy in flight now.
        let Some(delivery_id) = local_id
            .strip_prefix("throughcare-")
            .and_then(|d| d.split('-').next())
            .and_then(|d| d.parse::<u64>().ok())
        else {
            return Ok(None);
        };
        let record = self
            .gateway
            .store
            .mesh_record(delivery_id)
            .map_err(|e| MeshError::Gateway(e.to_string()))?;
        Ok(record
            .filter(|r| r.state == MeshState::Sent && r.local_id == local_id)
            .map(|r| (delivery_id, r)))
    }

    /// A report about a message we sent: quarantine its delivery.
    async fn on_report(&self, msg: &Incoming) -> Result<(), MeshError> {
        let Some((delivery_id, record)) = self.in_flight(&msg.local_id)? else {
            return Ok(());
        };
        // A report names the message it is about: one about an earlier copy
        // under the same local id (sent before a crash, say) says nothing
        // of the copy being tracked now.
        if !msg.linked_message_id.is_empty()
            && record
                .message_id
                .as_deref()
                .is_some_and(|sent| !sent.eq_ignore_ascii_case(&msg.linked_message_id))
        {
            tracing::info!(
                delivery_id,
                "a MESH report about an earlier copy of a delivery; the copy sent since stands"
            );
            return Ok(());
        }
        let reason = format!(
            "MESH non-delivery report (code {}: {})",
            msg.status_code, msg.status_description
        );
        self.fail_delivery(record, &reason).await
    }
}

/// The organisation whose MESH mailbox sent a message, as the MESH edge
/// acts for it: MESH authenticated the mailbox, the gateway relays its
/// submit, and the trail names both (`service:mesh for urn:ods:<code>`).
fn relayed(org: crate::clinical::OdsCode) -> Caller {
    Caller::Relayed {
        org,
        by: super::MESH_ACTOR,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A resend under the same local id is the same submit, whatever the
    /// local id holds: one that cannot be a message id goes by its digest,
    /// not by MESH's id (which a resend changes).
    #[test]
    fn a_resend_under_any_local_id_has_the_same_key() {
        let with = |local: &str, mesh_id: &str| {
            let mut m = message("", Vec::new());
            m.local_id = local.into();
            m.message_id = mesh_id.into();
            idempotency_key(&m)
        };
        assert_eq!(with("adm-0042", "A"), "adm-0042");
        assert_eq!(with("", "A"), "mesh:A");
        for odd in ["admission 42 for ward B", &"x".repeat(200), "admission-é"] {
            let key = with(odd, "A");
            assert_eq!(key, with(odd, "B"), "{odd}");
            assert!(key.starts_with("mesh-local:") && key.len() == 43, "{key}");
            assert!(crate::grpc::wire::is_message_id(&key), "{key}");
        }
        assert_ne!(with("admission 1", "A"), with("admission 2", "A"));
    }

    fn message(encoding: &str, body: Vec<u8>) -> Incoming {
        Incoming {
            message_id: "20261129000000000000_ABCDEF".into(),
            from: "X26ABC3".into(),
            workflow_id: "THROUGHCARE_RELEASE".into(),
            local_id: String::new(),
            subject: String::new(),
            message_type: "DATA".into(),
            content_encoding: encoding.into(),
            status_code: String::new(),
            status_description: String::new(),
            linked_message_id: String::new(),
            body,
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn field(e: Error) -> (String, String) {
        match e {
            Error::Invalid(violations) => (
                violations[0].field.clone(),
                violations[0].description.clone(),
            ),
            other => panic!("refused at a field, not {other}"),
        }
    }

    #[test]
    fn gzip_members_one_per_chunk_read_as_one_document() {
        let mut body = gzip(b"MSH|^~\\&|first half ");
        body.extend(gzip(b"second half"));
        let msg = message("gzip", body);
        assert_eq!(
            &*decoded(&msg, 1024).ok().unwrap(),
            b"MSH|^~\\&|first half second half"
        );
        let plain = message("", b"{}".to_vec());
        assert_eq!(&*decoded(&plain, 1024).ok().unwrap(), b"{}");
    }

    #[test]
    fn a_document_over_the_limit_once_uncompressed_is_refused_on_content() {
        let msg = message("gzip", gzip(&vec![b'a'; 10_000]));
        assert!(msg.body.len() < 100);
        let (f, why) = field(decoded(&msg, 4_096).err().unwrap());
        assert_eq!(f, "content");
        assert!(why.contains("once uncompressed"), "{why}");
        assert!(decoded(&msg, 10_000).is_ok(), "the limit itself is allowed");
    }

    #[test]
    fn bad_gzip_and_other_encodings_are_refused_on_the_header() {
        let (f, _) = field(
            decoded(&message("gzip", b"not gzip".to_vec()), 1024)
                .err()
                .unwrap(),
        );
        assert_eq!(f, "Content-Encoding");
        let (f, why) = field(decoded(&message("br", b"x".to_vec()), 1024).err().unwrap());
        assert_eq!(f, "Content-Encoding");
        assert!(why.contains("gzip"), "{why}");
    }
}
