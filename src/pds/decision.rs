//! From what PDS said to what happens to a parked release: routed to the
//! practice PDS names when it is on the network and the identity checks
//! out; otherwise kept parked with the reason operators see.
//!
//! Order matters: a restricted record is decided first, so nothing else
//! it holds (its practice above all) is ever looked at; a superseded NHS
//! number and a date of birth that differs mean the summary may not be this
//! patient's, and a death recorded needs a person's judgement.

use crate::journey::{OrgKind, Registry};
use crate::store::PdsStatus;

use super::patient::PdsPatient;

/// What to do with one parked release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What PDS said, for operators.
    pub status: PdsStatus,
    /// The practice PDS names (validated ODS code); never for a restricted record.
    pub practice: Option<String>,
    /// Claim it for this practice now.
    pub route_to: Option<String>,
}

impl Decision {
    fn hold(status: PdsStatus) -> Self {
        Self {
            status,
            practice: None,
            route_to: None,
        }
    }
}

/// Decides for a release of the patient asked for as `asked_nhs`, born
/// `summary_dob` (`YYYY-MM-DD`) by the summary; `found` is PDS's answer
/// (`None`: no such patient).
pub fn decide(
    asked_nhs: &str,
    summary_dob: &str,
    found: Option<&PdsPatient>,
    registry: &Registry,
) -> Decision {
    let Some(p) = found else {
        return Decision::hold(PdsStatus::NotFound);
    };
    if p.restricted {
        return Decision::hold(PdsStatus::Restricted);
    }
    if p.id != asked_nhs {
        return Decision::hold(PdsStatus::Superseded);
    }
    if p.birth_date.as_deref() != Some(summary_dob) {
        return Decision::hold(PdsStatus::DobMismatch);
    }
    if p.deceased {
        return Decision::hold(PdsStatus::Deceased);
    }
    // The practice PDS lists may have let the patient go (moved to
    // Scotland, abroad): routing there could send the release nowhere.
    if p.removed {
        return Decision::hold(PdsStatus::Removed);
    }
    // A value PDS gives is still checked before anyone sees it.
    let Some(code) = p
        .practice
        .as_deref()
        .and_then(|c| c.parse::<crate::clinical::OdsCode>().ok())
    else {
        return Decision::hold(PdsStatus::NoPractice);
    };
    let connected = registry
        .get(&code)
        .is_some_and(|o| o.active && o.kind == OrgKind::GpPractice);
    Decision {
        status: if connected {
            PdsStatus::Routed
        } else {
            PdsStatus::NotConnected
        },
        practice: Some(code.as_str().to_owned()),
        route_to: connected.then(|| code.as_str().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journey::{Format, Organisation};

    fn registry() -> Registry {
        let org = |code: &str, kind, active| Organisation {
            ods: code.parse().unwrap(),
            kind,
            name: code.into(),
            format: Format::Native,
            region: None,
            active,
            mesh_mailbox: None,
        };
        Registry::new([
            org("YG001", OrgKind::GpPractice, true),
            org("YG009", OrgKind::GpPractice, false),
            org("YP001", OrgKind::Prison, true),
        ])
        .unwrap()
    }

    fn patient(practice: Option<&str>) -> PdsPatient {
        PdsPatient {
            id: "9990000018".into(),
            birth_date: Some("1985-06-15".into()),
            deceased: false,
            restricted: false,
            removed: false,
            practice: practice.map(Into::into),
        }
    }

    #[test]
    fn routes_only_a_checked_patient_to_a_connected_practice() {
        let r = registry();
        let d = |p: &PdsPatient| decide("9990000018", "1985-06-15", Some(p), &r);
        assert_eq!(
            d(&patient(Some("YG001"))).route_to.as_deref(),
            Some("YG001")
        );
        for code in ["Y12345", "YG009", "YP001"] {
            let not = d(&patient(Some(code)));
            assert_eq!(
                (not.status, not.route_to),
                (PdsStatus::NotConnected, None),
                "{code}"
            );
            assert_eq!(not.practice.as_deref(), Some(code));
        }
        assert_eq!(d(&patient(None)).status, PdsStatus::NoPractice);
        assert_eq!(
            d(&patient(Some("not an ods code!"))).status,
            PdsStatus::NoPractice
        );
        let mut other_dob = patient(Some("YG001"));
        other_dob.birth_date = Some("1985-06-16".into());
        assert_eq!(d(&other_dob), Decision::hold(PdsStatus::DobMismatch));
        let mut superseded = patient(Some("YG001"));
        superseded.id = "9990000026".into();
        assert_eq!(d(&superseded), Decision::hold(PdsStatus::Superseded));
        let mut dead = patient(Some("YG001"));
        dead.deceased = true;
        assert_eq!(d(&dead), Decision::hold(PdsStatus::Deceased));
        let mut removed = patient(Some("YG001"));
        removed.removed = true;
        assert_eq!(d(&removed), Decision::hold(PdsStatus::Removed));
        let mut restricted = patient(Some("YG001"));
        restricted.restricted = true;
        assert_eq!(d(&restricted), Decision::hold(PdsStatus::Restricted));
        assert_eq!(
            decide("9990000018", "1985-06-15", None, &r).status,
            PdsStatus::NotFound
        );
    }
}
