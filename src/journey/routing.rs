//! Routing: from what happened (the event), the summary and the registry to
//! who must receive what, by when. A pure function: no clock, no store.
//!
//! | event | goes to | view |
//! |---|---|---|
//! | `ADMISSION` | the registered GP (`registered_gp`), if on the network | admission notice |
//! | `COMMUNITY_SUMMARY` | the admitting prison (`custody.establishment`); the submit sends it on to the prison that holds the patient now (`handover::submit`, docs/journey.md) | full |
//! | `TRANSFER` | the receiving prison (`custody.transfer_to`); summaries the sender never pulled for the patient go on with it (`store::records::forwards_to`, docs/journey.md) | full |
//! | `RELEASE` | each nominated GP (the GP practices the sender names), else the registered GP, else the **parked** mailbox; and the probation region (named by the sender, else the releasing prison's region) | full; probation view |
//! | `RELEASE` with opioid substitution therapy | the substance misuse service the sender names, else the one of the release area, else **held** | substance misuse service view |
//! | `RELEASE` with an active mental health care plan or suicide/self-harm risk | the mental health team of the release area, else **held** | mental health team view |
//!
//! The two treatment copies go only with the patient's consent or a
//! recorded legal basis (`may_share_with_treatment_services`). The release
//! area is the releasing prison's `region` in the registry, as for
//! probation. An OST copy is due before the next dose: the last dose given
//! plus its dosing interval (24 hours, or 12 for a split or twice-daily
//! dose, 8 or 6 for more frequent ones: `next_ost_dose_due_ms`), not the end
//! of the release day.
//!
//! A destination the sender names is checked against these rules, never
//! trusted blindly. A disabled organisation receives nothing: a release
//! whose GP is disabled is parked like one with no GP.

use crate::clinical::{ClinicalSummary, OdsCode, ValidationErrors, View};

use super::{JourneyEvent, OrgKind, Organisation, Registry};

/// How long each event may take to reach its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// An admission notice, ms after submission.
    pub admission_ms: i64,
    /// A community summary, ms after submission.
    pub community_summary_ms: i64,
    /// An urgent delivery, ms after submission (or its event's deadline if sooner).
    pub urgent_ms: i64,
}

impl Default for Deadlines {
    fn default() -> Self {
        const HOUR: i64 = 3_600_000;
        Self {
            admission_ms: 24 * HOUR,
            community_summary_ms: 72 * HOUR,
            urgent_ms: 4 * HOUR,
        }
    }
}

/// Where a delivery goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// A registered organisation's mailbox.
    Org(OdsCode),
    /// The holding mailbox of releases with no known GP, until claimed.
    Parked,
    /// A treatment copy with no service of this kind for the release
    /// area: held in that kind's holding mailbox, visible to operators,
    /// until a corrected release (after a registry fix) supersedes it.
    Held(OrgKind),
}

/// One delivery the rules call for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Who receives it.
    pub recipient: Recipient,
    /// What they see.
    pub view: View,
    /// Served before routine deliveries.
    pub urgent: bool,
    /// When it must have been delivered, ms since the epoch.
    pub due_ms: i64,
}

/// A violation as a (field, reason) pair, as [`route`] reports it.
pub type RouteViolation = (String, String);

/// Why `code` cannot receive as a prison; it is named only when it is a
/// registered organisation (a caller's value is never echoed unvalidated).
fn not_an_active_prison(registry: &Registry, code: &OdsCode) -> String {
    match registry.get(code) {
        Some(org) if org.kind != OrgKind::Prison => {
            format!("{code} is a {}, not a prison", org.kind.as_str())
        }
        Some(_) => format!("{code} is a prison disabled in the registry"),
        None => "no registered prison has this ODS code".into(),
    }
}

/// The first active organisation of `kind` in `prison`'s region (the
/// release area), by ODS code; none when the prison has no region. The rule
/// that routes a release's treatment copies, and routes on the copies held
/// for want of one once a service is registered.
#[must_use]
pub fn area_service<'r>(
    registry: &'r Registry,
    prison: &Organisation,
    kind: OrgKind,
) -> Option<&'r Organisation> {
    let region = prison.region.as_deref()?;
    registry
        .iter()
        .find(|o| o.active && o.kind == kind && o.region.as_deref() == Some(region))
}

/// The deliveries `event` calls for.
///
/// `requested` are the destinations the sender named (may be empty);
/// `now_ms` is the submission time.
///
/// # Errors
/// Every named destination that is unknown, disabled, of the wrong kind or
/// not the one the rules choose, and a rule target that is not a registered,
/// active organisation of the right kind.
pub fn deliveries(
    event: JourneyEvent,
    summary: &ClinicalSummary,
    sender: &Organisation,
    requested: &[OdsCode],
    registry: &Registry,
    deadlines: &Deadlines,
    now_ms: i64,
) -> Result<Vec<Route>, ValidationErrors> {
    let named = named_destinations(event, requested, registry)?;
    let mut plan = Plan {
        event,
        summary,
        sender,
        registry,
        deadlines,
        now_ms,
        urgent: summary.is_urgent(),
        named,
        routes: Vec::new(),
        violations: ValidationErrors::default(),
    };
    match event {
        JourneyEvent::Admission => plan.admission(),
        JourneyEvent::CommunitySummary => plan.community_summary(),
        JourneyEvent::Transfer => plan.transfer(),
        JourneyEvent::Release => plan.release(),
    }
    plan.violations.into_result().map(|()| plan.routes)
}

/// [`deliveries`], with each violation as a (field, reason) pair.
///
/// Kept for `grpc::handover` until the application layer calls
/// [`deliveries`]; then this and [`RouteViolation`] go.
///
/// # Errors
/// As [`deliveries`].
pub fn route(
    event: JourneyEvent,
    summary: &ClinicalSummary,
    sender: &Organisation,
    requested: &[OdsCode],
    registry: &Registry,
    deadlines: &Deadlines,
    now_ms: i64,
) -> Result<Vec<Route>, Vec<RouteViolation>> {
    deliveries(
        event, summary, sender, requested, registry, deadlines, now_ms,
    )
    .map_err(|e| e.0.into_iter().map(|v| (v.field, v.description)).collect())
}

/// The destinations the sender named, with their place in the request;
/// each must be a registered, active organisation that may receive `event`.
fn named_destinations<'r>(
    event: JourneyEvent,
    requested: &[OdsCode],
    registry: &'r Registry,
) -> Result<Vec<(usize, &'r Organisation)>, ValidationErrors> {
    let mut violations = ValidationErrors::default();
    let mut named = Vec::new();
    for (i, code) in requested.iter().enumerate() {
        let field = format!("destinations[{i}]");
        match registry.get(code) {
            None => violations.add(field, "no registered organisation has this ODS code"),
            Some(org) if !org.active => {
                violations.add(field, format!("{code} is disabled and receives nothing"));
            }
            Some(org) if !event.accepts_destination(org.kind) => violations.add(
                field,
                format!(
                    "{event} goes to {}; {code} is a {}",
                    event.destination_kinds(),
                    org.kind.as_str()
                ),
            ),
            Some(org) => named.push((i, org)),
        }
    }
    violations.into_result().map(|()| named)
}

/// One submit's routing under way: the inputs, and the routes and
/// violations found so far.
struct Plan<'p> {
    event: JourneyEvent,
    summary: &'p ClinicalSummary,
    sender: &'p Organisation,
    registry: &'p Registry,
    deadlines: &'p Deadlines,
    now_ms: i64,
    urgent: bool,
    named: Vec<(usize, &'p Organisation)>,
    routes: Vec<Route>,
    violations: ValidationErrors,
}

impl Plan<'_> {
    /// The event's own deadline, brought forward for an urgent delivery.
    fn due(&self, event_due: Option<i64>, urgent: bool) -> i64 {
        let due = event_due.unwrap_or(i64::MAX);
        if urgent {
            due.min(self.now_ms.saturating_add(self.deadlines.urgent_ms))
        } else {
            due
        }
    }

    fn active(&self, code: &OdsCode, kind: OrgKind) -> bool {
        self.registry
            .get(code)
            .filter(|o| o.active && o.kind == kind)
            .is_some()
    }

    /// For events with one rule target, a named destination must be that target.
    fn single(&mut self, target: Option<&OdsCode>, what: &str) {
        for (i, org) in &self.named {
            if Some(&org.ods) != target {
                self.violations.add(
                    format!("destinations[{i}]"),
                    format!("{} goes to {what}; {} is not it", self.event, org.ods),
                );
            }
        }
    }

    fn admission(&mut self) {
        let summary = self.summary;
        self.single(
            summary.registered_gp.as_ref(),
            "the registered GP named in the summary",
        );
        if let Some(gp) = summary
            .registered_gp
            .as_ref()
            .filter(|gp| self.active(gp, OrgKind::GpPractice))
        {
            let due = Some(self.now_ms.saturating_add(self.deadlines.admission_ms));
            self.routes.push(Route {
                recipient: Recipient::Org(gp.clone()),
                view: View::AdmissionNotice,
                urgent: self.urgent,
                due_ms: self.due(due, self.urgent),
            });
        }
    }

    fn community_summary(&mut self) {
        let prison = &self.summary.custody.establishment;
        self.single(
            Some(prison),
            "the admitting prison (summary.custody.establishment)",
        );
        if self.active(prison, OrgKind::Prison) {
            let due = Some(
                self.now_ms
                    .saturating_add(self.deadlines.community_summary_ms),
            );
            self.routes.push(Route {
                recipient: Recipient::Org(prison.clone()),
                view: View::Full,
                urgent: self.urgent,
                due_ms: self.due(due, self.urgent),
            });
        } else {
            self.violations.add(
                "summary.custody.establishment",
                not_an_active_prison(self.registry, prison),
            );
        }
    }

    fn transfer(&mut self) {
        let custody = &self.summary.custody;
        let to = custody.transfer_to.as_ref();
        self.single(to, "the receiving prison (summary.custody.transfer_to)");
        match to {
            Some(to) if *to == self.sender.ods => self.violations.add(
                "summary.custody.transfer_to",
                "a prison cannot transfer to itself",
            ),
            Some(to) if self.active(to, OrgKind::Prison) => {
                let due_ms = self.due(custody.transfer_at.map(|t| t.unix_ms()), self.urgent);
                self.routes.push(Route {
                    recipient: Recipient::Org(to.clone()),
                    view: View::Full,
                    urgent: self.urgent,
                    due_ms,
                });
            }
            Some(to) => self.violations.add(
                "summary.custody.transfer_to",
                not_an_active_prison(self.registry, to),
            ),
            None => {} // clinical validation reports it
        }
    }

    /// A release goes to the GPs, else the parked mailbox, and to probation.
    fn release(&mut self) {
        let release_due = self.release_due();
        for recipient in self.release_gps() {
            self.routes.push(Route {
                recipient,
                view: View::Full,
                urgent: self.urgent,
                due_ms: self.due(release_due, self.urgent),
            });
        }
        for region in self.release_probation() {
            // Urgent only for what probation's view may show (an active
            // suicide or self-harm risk, with consent or a legal basis):
            // urgency from opioid substitution, which the view never
            // shows, would disclose it by the flag and the deadline.
            let urgent = self.summary.has_active_suicide_or_self_harm_risk()
                && self.summary.may_share_risk_with_probation();
            self.routes.push(Route {
                recipient: Recipient::Org(region),
                view: View::Probation,
                urgent,
                due_ms: self.due(release_due, urgent),
            });
        }
        self.release_treatment();
    }

    /// Each nominated GP practice, else the registered GP if active, else
    /// the parked mailbox.
    fn release_gps(&self) -> Vec<Recipient> {
        let nominated: Vec<&Organisation> = self
            .named
            .iter()
            .filter(|(_, o)| o.kind == OrgKind::GpPractice)
            .map(|(_, o)| *o)
            .collect();
        if nominated.is_empty() {
            let registered = self
                .summary
                .registered_gp
                .clone()
                .filter(|gp| self.active(gp, OrgKind::GpPractice));
            vec![registered.map_or(Recipient::Parked, Recipient::Org)]
        } else {
            nominated
                .iter()
                .map(|o| Recipient::Org(o.ods.clone()))
                .collect()
        }
    }

    /// The treatment copies: the substance misuse service for opioid
    /// substitution therapy, the mental health team for an active care
    /// plan or suicide/self-harm risk; only with consent or a legal basis.
    fn release_treatment(&mut self) {
        // Every service named gets its copy (a patient may be picked up by
        // two); none named, the release area's.
        let named_services: Vec<(usize, OdsCode)> = self
            .named
            .iter()
            .filter(|(_, o)| o.kind == OrgKind::SubstanceMisuseService)
            .map(|(i, o)| (*i, o.ods.clone()))
            .collect();
        let may_share = self.summary.may_share_with_treatment_services();
        let ost = self.summary.on_opioid_substitution() && may_share;
        if !ost {
            for (i, _) in &named_services {
                self.violations.add(
                    format!("destinations[{i}]"),
                    "a release goes to a substance misuse service only with opioid substitution \
                     therapy and the patient's consent or a recorded legal basis",
                );
            }
        }
        if ost {
            let recipients: Vec<Recipient> = if named_services.is_empty() {
                vec![self.area_service(OrgKind::SubstanceMisuseService)]
            } else {
                named_services
                    .into_iter()
                    .map(|(_, ods)| Recipient::Org(ods))
                    .collect()
            };
            let due_ms = self
                .summary
                .next_ost_dose_due_ms()
                .unwrap_or_else(|| self.due(self.release_due(), true));
            for recipient in recipients {
                self.routes.push(Route {
                    recipient,
                    view: View::SubstanceMisuseService,
                    urgent: true,
                    due_ms,
                });
            }
        }
        if may_share && self.summary.needs_mental_health_team() {
            // Urgent only for what the team's view shows (an active suicide
            // or self-harm risk): urgency from opioid substitution, which
            // the view leaves out, would disclose it by the flag itself.
            let urgent = self.summary.has_active_suicide_or_self_harm_risk();
            self.routes.push(Route {
                recipient: self.area_service(OrgKind::MentalHealthTeam),
                view: View::MentalHealthTeam,
                urgent,
                due_ms: self.due(self.release_due(), urgent),
            });
        }
    }

    /// The end of the release day in England, if the release date is known.
    fn release_due(&self) -> Option<i64> {
        self.summary
            .custody
            .release_date
            .map(|d| crate::uk_time::end_of_day_ms(d.0))
    }

    /// The active organisation of `kind` in the releasing prison's region,
    /// else that kind's holding mailbox.
    fn area_service(&self, kind: OrgKind) -> Recipient {
        self.in_region(kind)
            .map_or(Recipient::Held(kind), |o| Recipient::Org(o.ods.clone()))
    }

    /// The first active organisation of `kind` in the sender's region
    /// (the release area); none when the sender has no region.
    fn in_region(&self, kind: OrgKind) -> Option<&Organisation> {
        area_service(self.registry, self.sender, kind)
    }

    /// Each nominated probation region, else the active probation service
    /// of the releasing prison's region (if any).
    fn release_probation(&self) -> Vec<OdsCode> {
        let probation: Vec<&Organisation> = self
            .named
            .iter()
            .filter(|(_, o)| o.kind == OrgKind::Probation)
            .map(|(_, o)| *o)
            .collect();
        if probation.is_empty() {
            self.in_region(OrgKind::Probation)
                .map(|o| o.ods.clone())
                .into_iter()
                .collect()
        } else {
            probation.iter().map(|o| o.ods.clone()).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clinical::synthetic::release_summary;
    use crate::journey::Format;

    fn org(code: &str, kind: OrgKind, region: Option<&str>) -> Organisation {
        Organisation {
            ods: code.parse().unwrap(),
            kind,
            name: format!("{code} (invented)"),
            format: Format::Native,
            region: region.map(str::to_owned),
            active: true,
            mesh_mailbox: None,
        }
    }

    fn registry() -> Registry {
        Registry::new([
            org("YP001", OrgKind::Prison, Some("north")),
            org("YP002", OrgKind::Prison, None),
            org("YG001", OrgKind::GpPractice, None),
            org("YG002", OrgKind::GpPractice, None),
            org("YPR01", OrgKind::Probation, Some("north")),
            org("YS001", OrgKind::SubstanceMisuseService, Some("north")),
            org("YS002", OrgKind::SubstanceMisuseService, Some("south")),
            org("YM001", OrgKind::MentalHealthTeam, Some("north")),
        ])
        .unwrap()
    }

    fn code(s: &str) -> OdsCode {
        s.parse().unwrap()
    }

    const NOW: i64 = 1_800_000_000_000;

    /// Routes with the default deadlines at `NOW`.
    fn go(
        event: JourneyEvent,
        s: &ClinicalSummary,
        sender: &Organisation,
        named: &[OdsCode],
        reg: &Registry,
    ) -> Result<Vec<Route>, ValidationErrors> {
        deliveries(event, s, sender, named, reg, &Deadlines::default(), NOW)
    }

    fn summary(gp: Option<&str>) -> ClinicalSummary {
        release_summary(
            "9990000018".parse().ok(),
            None,
            code("YP001"),
            gp.map(code),
            "x",
        )
    }

    #[test]
    fn a_release_goes_to_the_registered_gp_and_the_prisons_probation_region() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let s = summary(Some("YG002"));
        let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].recipient, Recipient::Org(code("YG002")));
        assert_eq!(routes[0].view, View::Full);
        assert_eq!(routes[1].recipient, Recipient::Org(code("YPR01")));
        assert_eq!(routes[1].view, View::Probation);
        let end_of_release_day = crate::uk_time::end_of_day_ms(s.custody.release_date.unwrap().0);
        assert_eq!(routes[0].due_ms, end_of_release_day);
    }

    #[test]
    fn a_release_is_due_by_midnight_in_england_in_summer_and_winter() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        for (day, due) in [
            ("2026-07-01", "2026-07-01T22:59:59.999Z"),
            ("2026-03-29", "2026-03-29T22:59:59.999Z"),
            ("2026-10-25", "2026-10-25T23:59:59.999Z"),
            ("2026-12-01", "2026-12-01T23:59:59.999Z"),
        ] {
            let mut s = summary(Some("YG002"));
            s.custody.release_date = Some(day.parse().unwrap());
            let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
            let want = due.parse::<jiff::Timestamp>().unwrap().as_millisecond();
            assert_eq!(routes[0].due_ms, want, "release on {day}");
        }
    }

    #[test]
    fn a_nominated_gp_wins_and_no_gp_at_all_parks_the_release() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let s = summary(Some("YG002"));
        let routes = go(JourneyEvent::Release, &s, sender, &[code("YG001")], &reg).unwrap();
        assert_eq!(routes[0].recipient, Recipient::Org(code("YG001")));
        let unknown_gp = summary(Some("YG999"));
        let routes = go(JourneyEvent::Release, &unknown_gp, sender, &[], &reg).unwrap();
        assert_eq!(routes[0].recipient, Recipient::Parked);
        let routes = go(JourneyEvent::Release, &summary(None), sender, &[], &reg).unwrap();
        assert_eq!(routes[0].recipient, Recipient::Parked);
    }

    #[test]
    fn named_destinations_are_checked_against_the_rules() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let mut s = summary(Some("YG001"));
        s.custody.transfer_to = Some(code("YP002"));
        s.custody.transfer_at = Some("2026-11-25T10:00:00Z".parse().unwrap());
        let err = go(JourneyEvent::Transfer, &s, sender, &[code("YP001")], &reg).unwrap_err();
        assert_eq!(err.0[0].field, "destinations[0]");
        assert!(err.0[0].description.contains("receiving prison"), "{err:?}");
        let ok = go(JourneyEvent::Transfer, &s, sender, &[code("YP002")], &reg).unwrap();
        assert_eq!(ok[0].due_ms, s.custody.transfer_at.unwrap().unix_ms());
        let err = go(JourneyEvent::Admission, &s, sender, &[code("YG002")], &reg).unwrap_err();
        assert!(err.0[0].description.contains("registered GP"), "{err:?}");
        let err = go(
            JourneyEvent::Release,
            &s,
            sender,
            &[code("YG001"), code("YP002")],
            &reg,
        )
        .unwrap_err();
        assert_eq!(err.0[0].field, "destinations[1]");
        let two = go(
            JourneyEvent::Release,
            &s,
            sender,
            &[code("YG001"), code("YG002")],
            &reg,
        )
        .unwrap();
        assert_eq!(
            two.len(),
            3,
            "two nominated practices and the region: {two:?}"
        );
    }

    #[test]
    fn urgency_shortens_the_deadline_and_is_hidden_from_probation_without_consent() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let d = Deadlines::default();
        let mut s = summary(Some("YG001"));
        s.risks.push(RiskFlag {
            kind: RiskKind::SelfHarm,
            active: true,
            note: None,
            code: None,
        });
        s.consent.probation_sharing = ConsentDecision::Refused;
        let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
        assert!(routes[0].urgent);
        assert_eq!(
            routes[0].due_ms,
            (NOW + d.urgent_ms).min(crate::uk_time::end_of_day_ms(
                s.custody.release_date.unwrap().0
            ))
        );
        assert!(!routes[1].urgent, "probation must not learn of the risk");
    }

    #[test]
    fn disabled_organisations_receive_nothing() {
        let mut reg = registry();
        let mut gp = reg.get(&code("YG001")).unwrap().clone();
        gp.active = false;
        reg.put(gp);
        let sender = reg.get(&code("YP001")).unwrap().clone();
        let routes = go(
            JourneyEvent::Release,
            &summary(Some("YG001")),
            &sender,
            &[],
            &reg,
        )
        .unwrap();
        assert_eq!(routes[0].recipient, Recipient::Parked);
        let err = go(
            JourneyEvent::Release,
            &summary(None),
            &sender,
            &[code("YG001")],
            &reg,
        )
        .unwrap_err();
        assert!(err.0[0].description.contains("disabled"));
    }

    /// A summary on methadone, last dosed at `last_dose`, with the
    /// treatment-sharing decision `consent`.
    fn on_ost(last_dose: Option<&str>, consent: ConsentDecision) -> ClinicalSummary {
        let mut s = summary(Some("YG001"));
        let m = &mut s.medications[0];
        m.opioid_substitution = true;
        m.frequency = "once daily".into();
        m.last_dose_given = last_dose.map(|t| t.parse().unwrap());
        s.consent.treatment_sharing = consent;
        s
    }

    fn treatment(routes: &[Route]) -> Vec<(Recipient, View)> {
        routes
            .iter()
            .filter(|r| {
                matches!(
                    r.view,
                    View::SubstanceMisuseService | View::MentalHealthTeam
                )
            })
            .map(|r| (r.recipient.clone(), r.view))
            .collect()
    }

    use crate::clinical::model::{ConsentDecision, MentalHealth, RiskFlag, RiskKind};

    #[test]
    fn an_ost_release_goes_to_the_area_service_due_before_the_next_dose() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let s = on_ost(Some("2026-11-24T08:10:00Z"), ConsentDecision::Given);
        let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
        assert_eq!(
            treatment(&routes),
            [(Recipient::Org(code("YS001")), View::SubstanceMisuseService)]
        );
        let sms = routes.last().unwrap();
        let next_dose = "2026-11-25T08:10:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_millisecond();
        assert_eq!(
            sms.due_ms, next_dose,
            "last dose + 24 h, not the end of day"
        );
        assert!(sms.urgent);
        // The GP's copy keeps the release-day deadline rule.
        assert_ne!(routes[0].due_ms, next_dose);
        // A split dose (twice daily) is due twelve hours after the last.
        let mut split = on_ost(Some("2026-11-24T08:10:00Z"), ConsentDecision::Given);
        split.medications[0].frequency = "twice daily (split dose)".into();
        let routes = go(JourneyEvent::Release, &split, sender, &[], &reg).unwrap();
        assert_eq!(routes.last().unwrap().due_ms, next_dose - 12 * 3_600_000);
        // Without a recorded last dose, the urgent deadline.
        let s = on_ost(None, ConsentDecision::Given);
        let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
        let end_of_day = crate::uk_time::end_of_day_ms(s.custody.release_date.unwrap().0);
        let want = (NOW + Deadlines::default().urgent_ms).min(end_of_day);
        assert_eq!(routes.last().unwrap().due_ms, want);
    }

    #[test]
    fn a_named_service_wins_and_no_service_for_the_area_holds_the_copy() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let s = on_ost(Some("2026-11-24T08:10:00Z"), ConsentDecision::Given);
        let named = go(JourneyEvent::Release, &s, sender, &[code("YS002")], &reg).unwrap();
        assert_eq!(
            treatment(&named),
            [(Recipient::Org(code("YS002")), View::SubstanceMisuseService)]
        );
        // Two named services each get a copy (before, the second was
        // dropped without a word).
        let both = go(
            JourneyEvent::Release,
            &s,
            sender,
            &[code("YS002"), code("YS001")],
            &reg,
        )
        .unwrap();
        assert_eq!(
            treatment(&both),
            [
                (Recipient::Org(code("YS002")), View::SubstanceMisuseService),
                (Recipient::Org(code("YS001")), View::SubstanceMisuseService)
            ]
        );
        // YP002 has no region: no area, so no service for it.
        let other = reg.get(&code("YP002")).unwrap();
        let held = go(JourneyEvent::Release, &s, other, &[], &reg).unwrap();
        assert_eq!(
            treatment(&held),
            [(
                Recipient::Held(OrgKind::SubstanceMisuseService),
                View::SubstanceMisuseService
            )]
        );
        // A disabled service is no service.
        let mut reg = registry();
        let mut sms = reg.get(&code("YS001")).unwrap().clone();
        sms.active = false;
        reg.put(sms);
        let sender = reg.get(&code("YP001")).unwrap();
        let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
        assert_eq!(
            treatment(&routes)[0].0,
            Recipient::Held(OrgKind::SubstanceMisuseService)
        );
    }

    #[test]
    fn treatment_copies_need_consent_or_a_legal_basis() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        for refused in [ConsentDecision::Refused, ConsentDecision::NotRecorded] {
            let mut s = on_ost(Some("2026-11-24T08:10:00Z"), refused);
            s.mental_health = Some(MentalHealth {
                care_programme_approach: true,
                care_coordinator: None,
            });
            let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
            assert!(treatment(&routes).is_empty(), "{refused:?}: {routes:?}");
            let err = go(JourneyEvent::Release, &s, sender, &[code("YS001")], &reg).unwrap_err();
            assert_eq!(err.0[0].field, "destinations[0]");
            s.consent.legal_basis = Some("Care Act 2014 s.45 (invented)".into());
            let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
            assert_eq!(treatment(&routes).len(), 2, "a legal basis: {routes:?}");
        }
        // Consent given but no OST: a named service is refused.
        let mut s = summary(Some("YG001"));
        s.consent.treatment_sharing = ConsentDecision::Given;
        let err = go(JourneyEvent::Release, &s, sender, &[code("YS001")], &reg).unwrap_err();
        assert!(err.0[0].description.contains("opioid substitution"));
        assert!(treatment(&go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap()).is_empty());
    }

    #[test]
    fn a_care_plan_or_suicide_risk_goes_to_the_area_mental_health_team() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let mut s = summary(Some("YG001"));
        s.consent.treatment_sharing = ConsentDecision::Given;
        s.risks.push(RiskFlag {
            kind: RiskKind::Suicide,
            active: true,
            note: None,
            code: None,
        });
        let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
        assert_eq!(
            treatment(&routes),
            [(Recipient::Org(code("YM001")), View::MentalHealthTeam)]
        );
        let mht = routes.last().unwrap();
        assert!(mht.urgent);
        assert_eq!(mht.due_ms, routes[0].due_ms, "as urgent as the GP's copy");
        // An inactive risk alone does not; a care plan alone does.
        s.risks[0].active = false;
        let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
        assert!(treatment(&routes).is_empty());
        s.mental_health = Some(MentalHealth {
            care_programme_approach: true,
            care_coordinator: None,
        });
        let other = reg.get(&code("YP002")).unwrap();
        let routes = go(JourneyEvent::Release, &s, other, &[], &reg).unwrap();
        assert_eq!(
            treatment(&routes),
            [(
                Recipient::Held(OrgKind::MentalHealthTeam),
                View::MentalHealthTeam
            )]
        );
        // Named, a mental health team is refused: the area decides.
        let err = go(JourneyEvent::Release, &s, sender, &[code("YM001")], &reg).unwrap_err();
        assert_eq!(err.0[0].field, "destinations[0]");
    }

    /// Probation's view never shows opioid substitution, so its copy is not
    /// urgent for it, consent to share risks or not; an active suicide risk
    /// it may see makes it urgent.
    #[test]
    fn probations_copy_is_not_urgent_for_opioid_substitution() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let mut s = on_ost(Some("2026-11-24T08:10:00Z"), ConsentDecision::Given);
        s.consent.probation_sharing = ConsentDecision::Given;
        let probation = |s: &ClinicalSummary| {
            go(JourneyEvent::Release, s, sender, &[], &reg)
                .unwrap()
                .into_iter()
                .find(|r| r.view == View::Probation)
                .expect("a release goes to probation")
        };
        let copy = probation(&s);
        assert!(!copy.urgent, "{copy:?}");
        let end_of_day = crate::uk_time::end_of_day_ms(s.custody.release_date.unwrap().0);
        assert_eq!(copy.due_ms, end_of_day);
        s.risks.push(RiskFlag {
            kind: RiskKind::Suicide,
            active: true,
            note: None,
            code: None,
        });
        assert!(probation(&s).urgent);
        // Without consent or a legal basis, not even that.
        s.consent.probation_sharing = ConsentDecision::Refused;
        assert!(!probation(&s).urgent);
    }

    /// The team's view leaves out opioid substitution, so its copy is not
    /// urgent for it: the flag and an early deadline would disclose it.
    #[test]
    fn the_mental_health_teams_copy_is_not_urgent_for_opioid_substitution() {
        let reg = registry();
        let sender = reg.get(&code("YP001")).unwrap();
        let mut s = on_ost(Some("2026-11-24T08:10:00Z"), ConsentDecision::Given);
        s.mental_health = Some(MentalHealth {
            care_programme_approach: true,
            care_coordinator: None,
        });
        let routes = go(JourneyEvent::Release, &s, sender, &[], &reg).unwrap();
        let mht = routes
            .iter()
            .find(|r| r.view == View::MentalHealthTeam)
            .expect("a care plan goes to the team");
        assert!(!mht.urgent, "{routes:?}");
        let end_of_day = crate::uk_time::end_of_day_ms(s.custody.release_date.unwrap().0);
        assert_eq!(mht.due_ms, end_of_day);
        // The GP's and the substance misuse service's copies stay urgent.
        assert!(routes[0].urgent);
        assert!(
            routes
                .iter()
                .any(|r| r.view == View::SubstanceMisuseService && r.urgent)
        );
    }
}
