//! Treatment copies held for want of a service, routed on once one serves
//! the release area (docs/journey.md, Treatment services).
//!
//! A release on opioid substitution therapy, or with an active care
//! programme approach or suicide or self-harm risk, has a copy for the
//! substance misuse service or the mental health team of the release area.
//! With none registered there, the copy is held in
//! `@parked-substance-misuse` or `@parked-mental-health`. The next dose will
//! not wait for the prison to resubmit: after every registry change (and at
//! start-up, for changes made while the gateway was stopped) each held copy
//! whose release area now has an active service of the kind goes to it, by
//! the same rule routing used at submit.

use crate::journey::{OrgKind, area_service};
use crate::store::{
    DeliveryRecord, PARKED_MENTAL_HEALTH_MAILBOX, PARKED_SUBSTANCE_MISUSE_MAILBOX, StoreError,
};

use super::Gateway;

/// Each treatment service kind and the mailbox its copies wait in.
pub(crate) const HELD: [(OrgKind, &str); 2] = [
    (
        OrgKind::SubstanceMisuseService,
        PARKED_SUBSTANCE_MISUSE_MAILBOX,
    ),
    (OrgKind::MentalHealthTeam, PARKED_MENTAL_HEALTH_MAILBOX),
];

/// Who routes held copies on outside an operator's registry change.
pub const ROUTING_ACTOR: &str = "service:routing";

/// Held copies read per page.
const PAGE: usize = 500;

impl Gateway {
    /// Routes every held treatment copy whose release area has an active
    /// service of its kind to that service (audited per copy as `actor`'s
    /// `route_held`); returns the copies routed. Copies whose area still has
    /// none stay held.
    ///
    /// # Errors
    /// Store failures; nothing is half moved (each batch is one commit).
    pub async fn route_held_copies(&self, actor: &str) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.hold_copies_of_disabled_services(actor).await?;
        let mut routed = Vec::new();
        for (kind, mailbox) in HELD {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self.store.parked_page(mailbox, after.as_deref(), PAGE)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                let full = page.len() == PAGE;
                let moves = self.moves(kind, page.into_iter().map(|(_, d)| d))?;
                if !moves.is_empty() {
                    routed.extend(self.store.route_held(actor, moves).await?);
                }
                if !full {
                    break;
                }
            }
        }
        if !routed.is_empty() {
            tracing::info!(
                count = routed.len(),
                "held treatment copies routed to the service now registered for their area"
            );
        }
        Ok(routed)
    }

    /// Copies queued for a treatment service that was disabled before they
    /// were pulled: held again (audited `route_held`), so that the pass
    /// that follows sends them to a service that serves their area, or
    /// they wait visibly, instead of waiting in a mailbox nobody may pull.
    async fn hold_copies_of_disabled_services(&self, actor: &str) -> Result<(), StoreError> {
        // A practice's releases wait in `@parked` (claims, PDS), as a
        // release whose GP is disabled at submit does.
        let waiting = HELD
            .into_iter()
            .chain([(OrgKind::GpPractice, crate::store::PARKED_MAILBOX)]);
        for (kind, held) in waiting {
            let disabled: Vec<String> = self
                .registry
                .read()
                .iter()
                .filter(|o| o.kind == kind && !o.active)
                .map(|o| o.ods.as_str().to_owned())
                .collect();
            for mailbox in disabled {
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let page = self.store.live_page(&mailbox, after.as_deref(), PAGE)?;
                    let Some((last, _)) = page.last() else { break };
                    after = Some(last.clone());
                    let full = page.len() == PAGE;
                    let mut moves: Vec<(u64, String)> = Vec::new();
                    for (_, d) in page {
                        if crate::store::records::held_move(&d, held).is_none() {
                            continue;
                        }
                        if kind != OrgKind::GpPractice && self.named_elsewhere(&d, &mailbox)? {
                            tracing::warn!(
                                alert = "treatment_copy_waits_for_disabled_service",
                                delivery_id = d.id,
                                service = %mailbox,
                                "ALERT: a treatment copy the prison sent to a service outside its \
                                 own area waits for that service, which is disabled; it is not \
                                 moved to the prison's area (no care relationship there): an \
                                 operator must re-enable the service or redirect the patient's care"
                            );
                            continue;
                        }
                        moves.push((d.id, held.to_owned()));
                    }
                    if !moves.is_empty() {
                        let held_now = self.store.route_held(actor, moves).await?;
                        tracing::warn!(
                            count = held_now.len(),
                            service = %mailbox,
                            "treatment copies queued for a disabled service are held again, to go to a service that serves their area"
                        );
                    }
                    if !full {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `d`, queued for `service`, went there because its prison
    /// named a service outside the prison's own region (a patient released
    /// to another area): the region's service has no care relationship
    /// with them, so such a copy is never moved there.
    fn named_elsewhere(&self, d: &DeliveryRecord, service: &str) -> Result<bool, StoreError> {
        let Some(handover) = self.store.handover(d.handover_id)? else {
            return Ok(false);
        };
        let registry = self.registry.read();
        let region_of = |code: &str| {
            code.parse()
                .ok()
                .and_then(|c| registry.get(&c))
                .and_then(|o| o.region.clone())
        };
        Ok(region_of(service) != region_of(&handover.sender))
    }

    /// (delivery id, service) for each of `held` whose releasing prison's
    /// region now has an active service of `kind`.
    fn moves(
        &self,
        kind: OrgKind,
        held: impl Iterator<Item = DeliveryRecord>,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let registry = self.registry.read();
        let mut moves = Vec::new();
        for d in held {
            let Some(handover) = self.store.handover(d.handover_id)? else {
                continue;
            };
            let prison = handover
                .sender
                .parse()
                .ok()
                .and_then(|code| registry.get(&code));
            if let Some(service) = prison.and_then(|p| area_service(&registry, p, kind)) {
                moves.push((d.id, service.ods.as_str().to_owned()));
            }
        }
        Ok(moves)
    }
}
