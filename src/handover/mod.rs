//! The use cases, protocol-free: submit, pull, ack, nack, track, claim and
//! the operator calls. Each takes a [`Caller`] (who, from the transport's
//! identity) and a domain command, and answers a domain result or one
//! [`Error`] with a stable machine reason ([`Error::reason`]).
//!
//! Every edge (gRPC and MLLP today; MESH later) decodes its wire message into a
//! command, calls the use case here, and encodes the answer: nothing here
//! knows tonic, prost or any wire type. Imports point one way: edges →
//! `handover` → {`clinical`, `journey`, `store`, `audit`}; nothing below
//! imports an edge (docs/application-layer.md).
//!
//! # Order of checks
//! A use case first resolves and authorises the caller, then looks at the
//! input: a command arrives as [`Decoded`], the edge's reading of its wire
//! message or the field violations found reading it, so a caller that may
//! not make a call learns nothing about its input's validity, whatever edge
//! it came through.

pub mod claim_guard;
mod claiming;
mod continuity;
mod deliver;
pub mod envelope;
mod error;
pub mod free_text;
mod held;
mod operator;
pub mod page;
pub mod registry_refresh;
mod submit;

use std::sync::Arc;

use tokio::sync::watch;

pub use claim_guard::{ClaimGuard, ClaimLimits};
pub use claiming::{ClaimCommand, Claimed};
pub use continuity::{Continuity, ContinuityRow, ContinuityWindow, SMALL_NUMBER, Share};
pub use deliver::{
    Delivery, MAX_ACK_BATCH, NackCommand, PullCommand, RenderedDocument, Tracked, render,
    view_from_name, view_name,
};
pub use envelope::{Envelope, PatientRef};
pub use error::{
    Error, Kind, MAX_DESCRIBED, MAX_DESCRIPTION_CHARS, MAX_FIELD_CHARS, cut, describe, scrubbed,
    withhold_numbers,
};
pub use held::ROUTING_ACTOR;
pub use operator::{
    AuditSubject, AuditTrail, BreakGlassRead, ClaimParkedCommand, DeliveryInfo, MAX_LIST,
    Mailboxes, RedriveTarget, RetentionStatus,
};
pub use page::{MAX_PAGE, Page, PageRequest};
pub use submit::{
    DeliveryReceipt, IncomingDocument, SubmitCommand, SubmitReceipt, calendar_date, is_iso_date,
};

use crate::audit::PatientKeyer;
use crate::clinical::{Limits, OdsCode, ValidationErrors};
use crate::config::QueueConfig;
use crate::journey::{Deadlines, Organisation, SharedRegistry};
use crate::store::{Clock, Store};

/// A command as an edge read it: the command, or every field violation found
/// reading it (reported only once the caller is authorised).
pub type Decoded<T> = Result<T, ValidationErrors>;

/// Who is calling, as the transport established it (for gRPC, the client
/// certificate's SAN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An organisation, by ODS code (`urn:ods:<code>`).
    Organisation(OdsCode),
    /// A gateway operator, by name (`urn:operator:<name>`).
    Operator(String),
    /// An organisation reached through an edge of the gateway (MESH): the
    /// edge pulls, acknowledges and refuses its deliveries for it, with its
    /// rights, and the trail names both (`service:mesh for urn:ods:<code>`).
    Relayed {
        /// The organisation acted for.
        org: OdsCode,
        /// The edge acting (`service:mesh`).
        by: &'static str,
    },
    /// No identity was presented.
    Unidentified,
}

impl Caller {
    /// The identity as audit entries and logs name it.
    #[must_use]
    pub fn actor(&self) -> String {
        match self {
            Caller::Organisation(ods) => format!("urn:ods:{ods}"),
            Caller::Operator(name) => format!("urn:operator:{name}"),
            Caller::Relayed { org, by } => format!("{by} for urn:ods:{org}"),
            Caller::Unidentified => "unknown".to_owned(),
        }
    }
}

/// A caller checked against the registry.
pub(crate) enum Resolved {
    Org(Organisation),
    Operator,
}

/// What every use case shares.
pub struct Gateway {
    /// The store.
    pub store: Store,
    /// Registered organisations (operators change them while running).
    pub registry: SharedRegistry,
    /// How long each event may take to arrive.
    pub deadlines: Deadlines,
    /// The clock routing and deadlines use (the store's).
    pub clock: Arc<dyn Clock>,
    /// Keyed hash for patient identifiers.
    pub keyer: PatientKeyer,
    /// Queue settings.
    pub queue: QueueConfig,
    /// Limits on documents.
    pub limits: Limits,
    /// Flips to true when the gateway starts shutting down.
    pub shutting_down: watch::Receiver<bool>,
    /// Failed claims per practice and patient (brute-force lockout).
    pub claims: ClaimGuard,
    /// Registry changes are made one at a time (store first, then memory).
    pub registry_changes: tokio::sync::Mutex<()>,
    /// The operators accepted (`tls.operators`); `None`: any the CA issues.
    pub operators: Option<std::collections::BTreeSet<String>>,
}

impl Gateway {
    /// The caller checked against the registry, with its actor name.
    pub(crate) fn resolve(&self, caller: &Caller) -> Result<(Resolved, String), Error> {
        let actor = caller.actor();
        match caller {
            Caller::Unidentified => Err(Error::Unauthenticated("no client certificate".into())),
            Caller::Operator(name) => match &self.operators {
                Some(allowed) if !allowed.contains(name) => {
                    tracing::warn!(caller = %actor, "certificate for an operator not in tls.operators");
                    Err(Error::Unauthenticated(format!(
                        "operator {name} named by the client certificate is not one this gateway accepts"
                    )))
                }
                _ => Ok((Resolved::Operator, actor)),
            },
            Caller::Organisation(code) | Caller::Relayed { org: code, .. } => {
                match self.registry.get(code) {
                    Some(org) if !org.active => Err(Error::PermissionDenied(format!(
                        "organisation {code} is disabled in the registry"
                    ))),
                    Some(org) => Ok((Resolved::Org(org), actor)),
                    None => {
                        tracing::warn!(caller = %actor, "certificate for an unregistered organisation");
                        // The code is the CA's word (it issued the certificate), not the caller's.
                        Err(Error::Unauthenticated(format!(
                            "organisation {code} named by the client certificate is not registered"
                        )))
                    }
                }
            }
        }
    }

    /// The calling organisation, or a refusal for operators.
    pub(crate) fn organisation(
        &self,
        caller: &Caller,
        what: &str,
    ) -> Result<(Organisation, String), Error> {
        match self.resolve(caller)? {
            (Resolved::Org(org), actor) => Ok((org, actor)),
            (Resolved::Operator, _) => Err(Error::PermissionDenied(format!(
                "operators cannot {what}; use an organisation's certificate"
            ))),
        }
    }

    /// The operator's identity, or a refusal for anyone else.
    pub(crate) fn operator(&self, caller: &Caller) -> Result<String, Error> {
        match self.resolve(caller)? {
            (Resolved::Operator, actor) => Ok(actor),
            (Resolved::Org(org), _) => Err(Error::PermissionDenied(format!(
                "operator calls need an operator certificate; {} is a {}",
                org.ods,
                org.kind.as_str()
            ))),
        }
    }

    /// Audits a refusal decided before the store (the store audits its own).
    ///
    /// # Errors
    /// [`Error::Unrecorded`] when the refusal could not be audited: fail
    /// closed, the caller is answered that instead.
    pub async fn audit_refusal(
        &self,
        caller: &Caller,
        action: &'static str,
        e: &Error,
    ) -> Result<(), Error> {
        self.audit_refusal_of(caller, action, e, Subject::default())
            .await
    }

    /// Audits a refusal decided before the store of a call that named
    /// `subject`: the entry names that handover or delivery and, where it
    /// is there, its patient, so that reaching for a record one may not see
    /// (an operator's break-glass read without a reason, an ack by an
    /// operator's certificate) is on that patient's trail.
    ///
    /// # Errors
    /// As [`Self::audit_refusal`].
    pub async fn audit_refusal_of(
        &self,
        caller: &Caller,
        action: &'static str,
        e: &Error,
        subject: Subject,
    ) -> Result<(), Error> {
        if matches!(e, Error::Store(_)) {
            return Ok(());
        }
        let mut event = crate::audit::AuditEvent {
            actor: caller.actor(),
            action,
            // `Kind` names its variants as gRPC names its codes.
            outcome: format!("refused: {:?}: {e}", e.kind()),
            ..crate::audit::AuditEvent::default()
        };
        self.name_subject(&mut event, (caller, subject), e);
        match self.store.record(event).await {
            Ok(()) => Ok(()),
            Err(failure) => {
                tracing::error!(error = %failure, "a refusal could not be audited; answering UNAVAILABLE");
                Err(Error::Unrecorded)
            }
        }
    }

    /// Names in `event` what the refused call reached for: the delivery or
    /// handover `subject` names, with its patient, when it is there (an id
    /// that names nothing is a caller's value, and is not recorded: it may
    /// be anything, an NHS number included), or the patient a locked claim
    /// was for.
    /// An organisation's refusal naming another's record says so, as the
    /// store's own refusals do.
    fn name_subject(
        &self,
        event: &mut crate::audit::AuditEvent,
        (caller, subject): (&Caller, Subject),
        e: &Error,
    ) {
        if let Error::ClaimsLocked { patient_key, .. } = e {
            event.patient_key = Some(patient_key.clone());
        }
        let own = |owner: &str| match caller {
            Caller::Organisation(ods) | Caller::Relayed { org: ods, .. } => ods.as_str() == owner,
            _ => true,
        };
        if let Some(d) = subject
            .delivery_id
            .and_then(|id| self.store.delivery(id).ok().flatten())
        {
            if !own(&d.mailbox) {
                event.outcome.push_str(" (another organisation's delivery)");
            }
            event.delivery_id = Some(d.id);
            event.handover_id = Some(d.handover_id);
            event.patient_key = Some(d.patient_key);
        } else if let Some(h) = subject
            .handover_id
            .and_then(|id| self.store.handover(id).ok().flatten())
        {
            if !own(&h.sender) {
                event.outcome.push_str(" (another sender's handover)");
            }
            event.handover_id = Some(h.id);
            event.patient_key = Some(h.patient_key);
        }
    }
}

/// What a refused call named ([`Gateway::audit_refusal_of`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject {
    /// The handover it named.
    pub handover_id: Option<u64>,
    /// The delivery it named.
    pub delivery_id: Option<u64>,
}

impl Subject {
    /// A call naming handover `id`.
    pub fn handover(id: u64) -> Self {
        Self {
            handover_id: Some(id),
            delivery_id: None,
        }
    }

    /// A call naming delivery `id`.
    pub fn delivery(id: u64) -> Self {
        Self {
            handover_id: None,
            delivery_id: Some(id),
        }
    }
}
