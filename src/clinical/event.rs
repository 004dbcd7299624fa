//! What happens on the patient's journey through custody, and the kinds of
//! organisation that send and receive each event: domain facts that the
//! clinical formats (FHIR `Composition.event`, HL7 MSH-9), validation,
//! routing and the store all share.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kind of organisation behind an ODS code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgKind {
    /// A prison healthcare provider.
    Prison,
    /// A community GP practice.
    GpPractice,
    /// A probation region.
    Probation,
    /// A community substance misuse (drug and alcohol treatment) service.
    SubstanceMisuseService,
    /// A community mental health team.
    MentalHealthTeam,
    /// A gateway operator (identified as `urn:operator:<name>`, never registered).
    Operator,
}

impl OrgKind {
    /// The registry's spelling of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            OrgKind::Prison => "prison",
            OrgKind::GpPractice => "gp_practice",
            OrgKind::Probation => "probation",
            OrgKind::SubstanceMisuseService => "substance_misuse_service",
            OrgKind::MentalHealthTeam => "mental_health_team",
            OrgKind::Operator => "operator",
        }
    }
}

/// What happened on the patient's journey through custody.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JourneyEvent {
    /// Received into prison.
    Admission,
    /// Moved from one prison to another.
    Transfer,
    /// Released from prison into the community.
    Release,
    /// A GP practice's community record, sent in reply to an admission.
    CommunitySummary,
}

impl JourneyEvent {
    /// Every event, in journey order.
    pub const ALL: [JourneyEvent; 4] = [
        JourneyEvent::Admission,
        JourneyEvent::CommunitySummary,
        JourneyEvent::Transfer,
        JourneyEvent::Release,
    ];

    /// The kind of organisation that may send this event.
    pub fn sender_kind(self) -> OrgKind {
        match self {
            JourneyEvent::CommunitySummary => OrgKind::GpPractice,
            JourneyEvent::Admission | JourneyEvent::Transfer | JourneyEvent::Release => {
                OrgKind::Prison
            }
        }
    }

    /// Whether an organisation of `kind` may receive this event.
    pub fn accepts_destination(self, kind: OrgKind) -> bool {
        match self {
            JourneyEvent::Admission => kind == OrgKind::GpPractice,
            JourneyEvent::CommunitySummary | JourneyEvent::Transfer => kind == OrgKind::Prison,
            // A mental health team is chosen by the release area, never named.
            JourneyEvent::Release => matches!(
                kind,
                OrgKind::GpPractice | OrgKind::Probation | OrgKind::SubstanceMisuseService
            ),
        }
    }

    /// The kinds that may receive this event, for error messages.
    pub fn destination_kinds(self) -> &'static str {
        match self {
            JourneyEvent::Admission => "a GP practice",
            JourneyEvent::CommunitySummary | JourneyEvent::Transfer => "a prison",
            JourneyEvent::Release => {
                "a GP practice, a probation region or a substance misuse service"
            }
        }
    }
}

impl fmt::Display for JourneyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JourneyEvent::Admission => "ADMISSION",
            JourneyEvent::Transfer => "TRANSFER",
            JourneyEvent::Release => "RELEASE",
            JourneyEvent::CommunitySummary => "COMMUNITY_SUMMARY",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_has_a_sender_that_is_not_its_only_receiver_kind() {
        assert!(JourneyEvent::Transfer.accepts_destination(OrgKind::Prison));
        assert!(!JourneyEvent::Transfer.accepts_destination(OrgKind::GpPractice));
        assert!(JourneyEvent::Release.accepts_destination(OrgKind::Probation));
        assert!(!JourneyEvent::Admission.accepts_destination(OrgKind::Probation));
        assert_eq!(
            JourneyEvent::CommunitySummary.sender_kind(),
            OrgKind::GpPractice
        );
        for event in JourneyEvent::ALL {
            assert!(!event.accepts_destination(OrgKind::Operator));
        }
    }
}
