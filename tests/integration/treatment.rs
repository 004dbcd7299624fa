//! Community treatment services as recipients, end to end over real mutual
//! TLS: a release on opioid substitution therapy reaches the substance
//! misuse service before the next dose, one with a mental health care plan
//! or an active suicide/self-harm risk reaches the mental health team, each
//! in its own view, only with consent or a legal basis; no service for the
//! release area holds the copy where operators see it.

use crate::support;

use std::time::Duration;

use support::*;
use throughcare::clinical::ClinicalSummary;
use throughcare::clinical::model::{
    ConsentDecision, MentalHealth, RiskFlag, RiskKind, TREATMENT_SHARING_NOT_CARRIED,
};
use throughcare::grpc::pb;
use throughcare::store::Clock;
use tonic::transport::Channel;

type Handover = pb::handover_service_client::HandoverServiceClient<Channel>;
type Operator = pb::operator_service_client::OperatorServiceClient<Channel>;

/// The last OST dose given in prison: two hours before the manual clock's start.
const LAST_DOSE_MS: i64 = T0 - 2 * 3_600_000;

/// Invented patient `patient` from YP001 (region north) to GP YG001, on
/// methadone last dosed at [`LAST_DOSE_MS`], under the care programme
/// approach, with the treatment-sharing decision `consent`.
fn ost_and_care_plan(patient: u32, consent: ConsentDecision) -> ClinicalSummary {
    let mut s = throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG001".parse().unwrap()),
        "treatment",
    );
    let m = &mut s.medications[0];
    m.code.display = "Methadone 1mg/ml oral solution sugar free".into();
    m.code.code = "3321611000001103".into();
    m.dose = "60 mg".into();
    m.frequency = "once daily".into();
    m.opioid_substitution = true;
    m.supervised = true;
    m.last_dose_given = Some(
        jiff::Timestamp::from_millisecond(LAST_DOSE_MS)
            .unwrap()
            .to_string()
            .parse()
            .unwrap(),
    );
    s.mental_health = Some(MentalHealth {
        care_programme_approach: true,
        care_coordinator: Some("Sam Whitlow (invented)".into()),
    });
    s.risks.push(RiskFlag {
        kind: RiskKind::Violence,
        active: true,
        note: Some("invented note".into()),
        code: None,
    });
    s.consent.treatment_sharing = consent;
    s
}

/// `s` with its last dose two hours before the real clock's now, for a
/// gateway on the system clock (a dose given in the future is refused).
fn dosed_two_hours_ago(mut s: ClinicalSummary) -> ClinicalSummary {
    let at = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(2);
    s.medications[0].last_dose_given = Some(at.to_string().parse().unwrap());
    s
}

fn release_of(id: &str, s: &ClinicalSummary, to: &[&str]) -> pb::SubmitRequest {
    throughcare::cli::client::native_submit(id, pb::JourneyEvent::Release, to, s)
}

/// Submits release `id` of `s` from `prison`, routed by the gateway; the receipt.
async fn released(prison: &mut Handover, id: &str, s: &ClinicalSummary) -> pb::SubmitResponse {
    prison
        .submit(release_of(id, s, &[]))
        .await
        .unwrap()
        .into_inner()
}

/// Registers a substance misuse service and a mental health team for the
/// north (YP001's region), and one substance misuse service in the south.
async fn register_services(gw: &TestGateway) {
    for (code, kind, region) in [
        (
            "YS001",
            pb::OrganisationKind::SubstanceMisuseService,
            "north",
        ),
        (
            "YS002",
            pb::OrganisationKind::SubstanceMisuseService,
            "south",
        ),
        ("YM001", pb::OrganisationKind::MentalHealthTeam, "north"),
    ] {
        put_service(gw, code, kind, region, true).await;
    }
}

/// A handover client for a registered organisation without a dev certificate.
async fn client_for(gw: &TestGateway, code: &str) -> Handover {
    let issued = gw
        .ca()
        .issue_client_now(&format!("urn:ods:{code}"))
        .unwrap();
    gw.client_with(
        &gw.ca_pem(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
    .await
    .unwrap()
}

fn due_ms(r: &pb::SubmitResponse, to: &str) -> i64 {
    let d = r.deliveries.iter().find(|d| d.destination == to).unwrap();
    let t = d.due_at.as_ref().unwrap();
    t.seconds * 1_000 + i64::from(t.nanos) / 1_000_000
}

fn native(d: &pb::Delivery) -> &pb::ClinicalSummary {
    match &d.document {
        Some(pb::delivery::Document::Native(s)) => s,
        other => panic!("expected a native document, got {other:?}"),
    }
}

#[tokio::test]
async fn an_ost_release_reaches_the_area_substance_misuse_service_before_the_next_dose() {
    let (gw, _clock) = TestGateway::start_manual(|_| {}).await;
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let s = ost_and_care_plan(1, ConsentDecision::Given);
    let r = released(&mut prison, "ost", &s).await;
    assert_eq!(destinations(&r), ["YG001", "YPR01", "YS001", "YM001"]);
    assert_eq!(
        due_ms(&r, "YS001"),
        LAST_DOSE_MS + 24 * 3_600_000,
        "before the next dose, not the end of the release day"
    );
    assert_ne!(due_ms(&r, "YG001"), due_ms(&r, "YS001"));
    let mut sms = client_for(&gw, "YS001").await;
    let got = pull_and_ack(&mut sms).await;
    assert_eq!(got.len(), 1);
    let doc = native(&got[0]);
    assert_eq!(doc.medications.len(), 1);
    assert!(doc.medications[0].opioid_substitution);
    assert_eq!(doc.medications[0].dose, "60 mg");
    assert!(!doc.medications[0].last_dose_given.is_empty());
    assert!(doc.mental_health.is_none(), "not the mental health team's");
    assert_eq!(
        doc.consent.as_ref().unwrap().treatment_sharing(),
        pb::ConsentDecision::Given,
        "the decision travels in the native form"
    );
    assert!(doc.risks.is_empty(), "a violence risk is not drug-related");
    assert!(got[0].urgent);
    assert!(
        got[0]
            .not_carried
            .iter()
            .any(|n| n.starts_with("medications: only opioid substitution")),
        "{:?}",
        got[0].not_carried
    );
    let mut mht = client_for(&gw, "YM001").await;
    let got = pull_and_ack(&mut mht).await;
    assert_eq!(got.len(), 1);
    let doc = native(&got[0]);
    assert!(
        doc.medications.is_empty(),
        "methadone is not psychotropic here"
    );
    assert!(doc.mental_health.as_ref().unwrap().care_programme_approach);
    assert!(doc.substance_misuse.is_none());
    assert!(
        got[0]
            .not_carried
            .iter()
            .any(|n| n.starts_with("risks: only suicide and self-harm")),
        "{:?}",
        got[0].not_carried
    );
    // The prison may name the service: the named one wins over the area's.
    let r = prison
        .submit(release_of(
            "named",
            &ost_and_care_plan(2, ConsentDecision::Given),
            &["YS002"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(destinations(&r).contains(&"YS002"));
    assert!(!destinations(&r).contains(&"YS001"));
    gw.stop().await;
}

#[tokio::test]
async fn treatment_services_receive_nothing_when_consent_is_refused() {
    let (gw, _clock) = TestGateway::start_manual(|_| {}).await;
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let refused = ost_and_care_plan(3, ConsentDecision::Refused);
    let r = released(&mut prison, "refused", &refused).await;
    assert_eq!(destinations(&r), ["YG001", "YPR01"]);
    // Naming a service does not override the refusal: refused, field-level.
    let err = prison
        .submit(release_of("refused-named", &refused, &["YS001"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(violations(&err), ["destinations[0]"]);
    // A recorded legal basis allows it, as it does for probation.
    let mut basis = ost_and_care_plan(4, ConsentDecision::Refused);
    basis.consent.legal_basis = Some("invented legal basis".into());
    let r = released(&mut prison, "basis", &basis).await;
    assert_eq!(destinations(&r), ["YG001", "YPR01", "YS001", "YM001"]);
    let mut sms = client_for(&gw, "YS001").await;
    assert_eq!(
        pull_and_ack(&mut sms).await.len(),
        1,
        "only the consented one"
    );
    gw.stop().await;
}

#[tokio::test]
async fn no_service_for_the_release_area_parks_the_copy_visibly() {
    let (gw, clock) = TestGateway::start_manual(|c| c.queue.sweep_interval_ms = 50).await;
    let mut prison = gw.client("YP001").await;
    let mut s = ost_and_care_plan(5, ConsentDecision::Given);
    s.registered_gp = None;
    s.mental_health = None;
    s.risks = vec![RiskFlag {
        kind: RiskKind::SelfHarm,
        active: true,
        note: None,
        code: None,
    }];
    let r = released(&mut prison, "nowhere", &s).await;
    assert_eq!(
        destinations(&r),
        [
            "@parked",
            "YPR01",
            "@parked-substance-misuse",
            "@parked-mental-health"
        ]
    );
    let t = track_message(&mut prison, "nowhere").await;
    for d in &t.deliveries[2..] {
        assert_eq!(d.state(), pb::DeliveryState::Parked, "{}", d.destination);
    }
    let mut op = gw.operator().await;
    let boxes = op
        .list_mailboxes(pb::ListMailboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .mailboxes;
    for held in ["@parked-substance-misuse", "@parked-mental-health"] {
        let m = boxes.iter().find(|m| m.mailbox == held).unwrap();
        assert_eq!((m.depth, m.urgent), (1, 1), "{held}");
    }
    // Past the next dose, the held OST copy is reported overdue.
    clock.advance(LAST_DOSE_MS + 24 * 3_600_000 + 1 - T0);
    let mut reported = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = track_message(&mut prison, "nowhere").await;
        if t.deliveries[2].overdue_since.is_some() {
            reported = true;
            break;
        }
    }
    assert!(reported, "the missed dose deadline is reported");
    // A GP practice's claim takes the parked GP copy, not the held ones.
    let mut gp = gw.client("YG002").await;
    let claimed = gp
        .claim(pb::ClaimRequest {
            patient: Some(pb::PatientRef {
                nhs_number: nhs(5),
                prison_number: String::new(),
                date_of_birth: "1985-06-15".into(),
            }),
            evidence: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.claimed.len(), 1, "{claimed:?}");
    let t = track_message(&mut prison, "nowhere").await;
    assert_eq!(t.deliveries[0].destination, "YG002");
    assert_eq!(t.deliveries[2].destination, "@parked-substance-misuse");
    assert_eq!(t.deliveries[3].destination, "@parked-mental-health");
    // The way out: the registry gains the services, which take the held
    // copies at once (a_held_copy_goes_to_the_service_registered_for_its_area);
    // a correction from the prison then supersedes them there.
    register_services(&gw).await;
    let t = track_message(&mut prison, "nowhere").await;
    assert_eq!(t.deliveries[2].destination, "YS001");
    assert_eq!(t.deliveries[3].destination, "YM001");
    let r = released(&mut prison, "nowhere-again", &s).await;
    assert!(destinations(&r).contains(&"YS001") && destinations(&r).contains(&"YM001"));
    let t = track_message(&mut prison, "nowhere").await;
    for d in &t.deliveries[2..] {
        assert_eq!(
            d.state(),
            pb::DeliveryState::Superseded,
            "{}",
            d.destination
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_fhir_recipient_is_told_the_treatment_decision_is_not_carried() {
    let (gw, _clock) = TestGateway::start_manual(|_| {}).await;
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let s = ost_and_care_plan(6, ConsentDecision::Given);
    prison.submit(release_of("fhir", &s, &[])).await.unwrap();
    let mut mht = client_for(&gw, "YM001").await;
    let mut request = pull(10);
    request.format = pb::DocumentFormat::FhirJson.into();
    let got = mht.pull(request).await.unwrap().into_inner().deliveries;
    assert_eq!(got.len(), 1);
    assert!(
        got[0]
            .not_carried
            .iter()
            .any(|n| n == TREATMENT_SHARING_NOT_CARRIED)
    );
    gw.stop().await;
}

/// What the script did to one release, kept by the test itself.
struct Scripted {
    prison: &'static str,
    gp_due_ms: i64,
    gp_acked_ms: Option<i64>,
    parked_ms: i64,
    /// (acknowledged, due) of the substance misuse service copy.
    ost: Option<(i64, i64)>,
    /// Acknowledged, of the mental health team copy.
    mental_health: Option<i64>,
}

/// The share the script expects: suppressed when the denominator, the
/// numerator or the rest is from 1 to 4.
fn expected_share(numerator: u64, denominator: u64) -> pb::ContinuityShare {
    let small = |n: u64| (1..5).contains(&n);
    if small(numerator) || small(denominator) || small(denominator - numerator) {
        pb::ContinuityShare {
            suppressed: true,
            numerator: 0,
            denominator: 0,
        }
    } else {
        pb::ContinuityShare {
            suppressed: false,
            numerator,
            denominator,
        }
    }
}

/// The row the script expects for `prison`, all submitted at `T0`.
fn expected_row(
    log: &[Scripted],
    prison: &str,
) -> (Option<u64>, Vec<pb::ContinuityShare>, Option<i64>) {
    let mine: Vec<&Scripted> = log.iter().filter(|r| r.prison == prison).collect();
    let n = mine.len() as u64;
    let count = |f: &dyn Fn(&Scripted) -> bool| mine.iter().filter(|r| f(r)).count() as u64;
    let on_time = count(&|r| r.gp_acked_ms.is_some_and(|a| a <= r.gp_due_ms));
    let ost_n = count(&|r| r.ost.is_some());
    let ost_ok = count(&|r| r.ost.is_some_and(|(a, due)| a <= due));
    let mh_n = count(&|r| r.mental_health.is_some());
    let mh_ok = count(&|r| r.mental_health.is_some_and(|a| a - T0 <= 72 * 3_600_000));
    let mut to_gp: Vec<i64> = mine
        .iter()
        .filter_map(|r| r.gp_acked_ms)
        .map(|a| a - T0)
        .collect();
    to_gp.sort_unstable();
    let median = (to_gp.len() >= 5).then(|| {
        let m = to_gp.len() / 2;
        if to_gp.len() % 2 == 1 {
            to_gp[m]
        } else {
            (to_gp[m - 1] + to_gp[m]) / 2
        }
    });
    let shares = vec![
        expected_share(on_time, n),
        expected_share(count(&|r| r.parked_ms > 3 * 86_400_000), n),
        expected_share(count(&|r| r.parked_ms > 7 * 86_400_000), n),
        expected_share(ost_ok, ost_n),
        expected_share(mh_ok, mh_n),
    ];
    ((n >= 5).then_some(n), shares, median)
}

/// Pulls up to `max` and acknowledges them; how many.
async fn pull_ack(client: &mut Handover, max: u32) -> usize {
    let got = client
        .pull(pull(max))
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    for d in &got {
        client
            .ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
    }
    got.len()
}

fn on_release_day(mut s: ClinicalSummary) -> ClinicalSummary {
    // T0 is 2027-01-15T08:00:00Z: release that day, due by its midnight (GMT).
    s.custody.release_date = Some("2027-01-15".parse().unwrap());
    s
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

#[tokio::test]
async fn continuity_indicators_match_a_scripted_day() {
    continuity_indicators_match_a_scripted_day_on(Engine::Sled).await;
}

#[tokio::test]
async fn continuity_indicators_match_a_scripted_day_on_postgres() {
    continuity_indicators_match_a_scripted_day_on(Engine::Postgres).await;
}

async fn continuity_indicators_match_a_scripted_day_on(engine: Engine) {
    let Some((gw, clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    register_services(&gw).await;
    let mut log = scripted_releases(&gw).await;
    let mut gp = scripted_deliveries(&gw, &clock, &mut log).await;
    let mut op = gw.operator().await;
    scripted_claims(&mut op, &mut gp, &clock, &mut log).await;
    let got = op
        .get_continuity(pb::GetContinuityRequest {
            from: Some(prost_types::Timestamp {
                seconds: (T0 - HOUR) / 1_000,
                nanos: 0,
            }),
            to: Some(prost_types::Timestamp {
                seconds: (T0 + DAY) / 1_000,
                nanos: 0,
            }),
            period: Some(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    indicators_as_scripted(&got, &log);
    continuity_refusals(&gw, &mut op).await;
    gw.stop().await;
}

/// The releasing day: 21 from YP001 (10 on OST, 5 on a care plan, 6 with
/// no GP) and 3 from YP002, with what each should count for.
async fn scripted_releases(gw: &TestGateway) -> Vec<Scripted> {
    let end_of_day = "2027-01-15T23:59:59.999Z"
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_millisecond();
    let mut prison = gw.client("YP001").await;
    let mut log = Vec::new();
    // 10 on OST (GP copy urgent: due in 4 h), 5 on a care plan, 6 with no GP.
    for p in 1..=21u32 {
        let mut s = on_release_day(ost_and_care_plan(100 + p, ConsentDecision::Given));
        if p > 10 {
            s.medications[0].opioid_substitution = false;
        } else {
            s.mental_health = None;
        }
        if p > 15 {
            s.mental_health = None;
            s.registered_gp = None;
        }
        prison
            .submit(release_of(&format!("day-{p}"), &s, &[]))
            .await
            .unwrap();
        log.push(Scripted {
            prison: "YP001",
            gp_due_ms: if p <= 10 { T0 + 4 * HOUR } else { end_of_day },
            gp_acked_ms: None,
            parked_ms: 0,
            ost: None,
            mental_health: None,
        });
    }
    // Three releases from YP002 (no region: no probation, no services).
    let mut other = gw.client("YP002").await;
    for p in 1..=3u32 {
        let mut s = on_release_day(throughcare::clinical::synthetic::release_summary(
            nhs(200 + p).parse().ok(),
            None,
            "YP002".parse().unwrap(),
            Some("YG002".parse().unwrap()),
            "other",
        ));
        s.consent.treatment_sharing = ConsentDecision::Given;
        other
            .submit(release_of(&format!("other-{p}"), &s, &[]))
            .await
            .unwrap();
        log.push(Scripted {
            prison: "YP002",
            gp_due_ms: end_of_day,
            gp_acked_ms: None,
            parked_ms: 0,
            ost: None,
            mental_health: None,
        });
    }
    log
}

/// 09:00 and the next morning: GPs, the service and the team pull and ack.
async fn scripted_deliveries(
    gw: &TestGateway,
    clock: &throughcare::store::ManualClock,
    log: &mut [Scripted],
) -> Handover {
    // 09:00: the GPs take everything waiting; the service takes 5 OST
    // copies, the mental health team its 5.
    clock.advance(HOUR);
    let mut gp = gw.client("YG001").await;
    assert_eq!(pull_ack(&mut gp, 50).await, 15);
    let mut gp2 = gw.client("YG002").await;
    assert_eq!(pull_ack(&mut gp2, 50).await, 3);
    for (i, r) in log.iter_mut().enumerate() {
        if !(15..21).contains(&i) {
            r.gp_acked_ms = Some(T0 + HOUR);
        }
    }
    let mut sms = client_for(gw, "YS001").await;
    assert_eq!(pull_ack(&mut sms, 5).await, 5);
    let mut mht = client_for(gw, "YM001").await;
    assert_eq!(pull_ack(&mut mht, 50).await, 5);
    for (i, r) in log.iter_mut().enumerate().take(15) {
        if i < 5 {
            r.ost = Some((T0 + HOUR, T0 - 2 * HOUR + DAY));
        } else if i >= 10 {
            r.mental_health = Some(T0 + HOUR);
        }
    }
    // The next morning, past the next dose: the other 5 OST copies.
    clock.advance(22 * HOUR);
    assert_eq!(pull_ack(&mut sms, 50).await, 5);
    for r in &mut log[5..10] {
        r.ost = Some((T0 + 23 * HOUR, T0 - 2 * HOUR + DAY));
    }
    gp
}

/// Day 4: five parked releases claimed for YG001; day 8: the last one.
async fn scripted_claims(
    op: &mut pb::operator_service_client::OperatorServiceClient<Channel>,
    gp: &mut Handover,
    clock: &throughcare::store::ManualClock,
    log: &mut [Scripted],
) {
    // Day 4: five parked releases claimed for YG001; day 8: the last one.
    for (patient, at) in [(116, 4), (117, 4), (118, 4), (119, 4), (120, 4), (121, 8)] {
        let now = T0 + at * DAY;
        clock.advance(now - clock.now_ms());
        op.claim_parked(pb::ClaimParkedRequest {
            patient: Some(pb::PatientRef {
                nhs_number: nhs(patient),
                prison_number: String::new(),
                date_of_birth: "1985-06-15".into(),
            }),
            practice: "YG001".into(),
            reason: "registered there, confirmed by phone (scripted)".into(),
        })
        .await
        .unwrap();
        // On PostgreSQL a pull skips a row a background pass holds locked
        // at that moment (`SKIP LOCKED`): it is pulled at the next try.
        let mut got = 0;
        for _ in 0..20 {
            got += pull_ack(gp, 50).await;
            if got > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(got, 1);
        let r = &mut log[(patient - 101) as usize];
        r.parked_ms = at * DAY;
        r.gp_acked_ms = Some(now);
    }
}

/// Each row against the script's own arithmetic, and YP001 spelled out.
fn indicators_as_scripted(got: &pb::GetContinuityResponse, log: &[Scripted]) {
    let prisons: Vec<&str> = got.rows.iter().map(|r| r.prison.as_str()).collect();
    assert_eq!(prisons, ["YP001", "YP002"]);
    for row in &got.rows {
        let (releases, shares, median) = expected_row(log, &row.prison);
        assert_eq!(row.releases, releases, "{}", row.prison);
        let actual = vec![
            row.gp_within_deadline.unwrap(),
            row.parked_over_three_days.unwrap(),
            row.parked_over_seven_days.unwrap(),
            row.ost_before_next_dose.unwrap(),
            row.mental_health_within_72h.unwrap(),
        ];
        assert_eq!(actual, shares, "{}", row.prison);
        let median_ms = row.median_to_gp.map(|d| d.seconds * 1_000);
        assert_eq!(median_ms, median, "{}", row.prison);
        assert_eq!(row.period_start.unwrap().seconds, (T0 - HOUR) / 1_000);
    }
    // What the script makes of YP001, spelled out: 21 releases, 15 on time,
    // 6 parked over 3 days, 1 over 7 (suppressed), OST 5 of 10, MH 5 of 5.
    let yp001 = &got.rows[0];
    assert_eq!(yp001.releases, Some(21));
    assert_eq!(yp001.gp_within_deadline.unwrap().numerator, 15);
    assert_eq!(yp001.parked_over_three_days.unwrap().numerator, 6);
    assert!(yp001.parked_over_seven_days.unwrap().suppressed);
    assert_eq!(yp001.ost_before_next_dose.unwrap().numerator, 5);
    assert_eq!(yp001.median_to_gp.unwrap().seconds, 3_600);
    assert_eq!(got.rows[1].releases, None, "3 releases are suppressed");
}

/// A window that is empty or cut too fine (field-level refusals), and a
/// caller who is no operator.
async fn continuity_refusals(
    gw: &TestGateway,
    op: &mut pb::operator_service_client::OperatorServiceClient<Channel>,
) {
    let bad = pb::GetContinuityRequest {
        from: Some(prost_types::Timestamp {
            seconds: T0 / 1_000,
            nanos: 0,
        }),
        to: Some(prost_types::Timestamp {
            seconds: T0 / 1_000,
            nanos: 0,
        }),
        period: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
    };
    let err = op.get_continuity(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(violations(&err), ["from", "period"]);
    // Operators only, whatever they ask.
    let mut as_prison = gw.operator_as("YP001").await;
    let err = as_prison.get_continuity(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commissioners_get_continuity_as_csv_and_json_from_the_command_line() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    for i in 0..6 {
        prison
            .submit(release(&format!("cli-{i}"), 300 + i, &["YG001"], "m"))
            .await
            .unwrap();
    }
    let mut gp = gw.client("YG001").await;
    assert_eq!(pull_and_ack(&mut gp).await.len(), 6);
    let admin = |extra: &str| {
        let out = std::process::Command::new(BIN)
            .args([
                "admin",
                "continuity",
                extra,
                "--server",
                &gw.endpoint,
                "--certs-dir",
            ])
            .arg(gw.certs())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let csv = admin("--csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    let cells: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(cells.len(), lines[0].split(',').count());
    // Six releases, all acknowledged after their (past) release day: 0 of 6
    // on time; no OST or mental health copies (0 of 0).
    assert_eq!(cells[0], "YP001");
    assert_eq!(&cells[3..6], ["6", "0", "6"]);
    let json: serde_json::Value = serde_json::from_str(&admin("--json")).unwrap();
    let row = &json["rows"][0];
    assert_eq!(row["releases"], 6);
    assert_eq!(row["ost_before_next_dose"]["denominator"], 0);
    assert_eq!(row["parked_over_3_days"]["numerator"], 0);
    gw.stop().await;
}

/// Enables or disables a registered organisation.
async fn set_active(gw: &TestGateway, code: &str, active: bool) {
    gw.operator()
        .await
        .set_organisation_active(pb::SetOrganisationActiveRequest {
            ods_code: code.into(),
            active,
        })
        .await
        .unwrap();
}

/// Registers (or replaces) one treatment service.
async fn put_service(
    gw: &TestGateway,
    code: &str,
    kind: pb::OrganisationKind,
    region: &str,
    active: bool,
) {
    gw.operator()
        .await
        .put_organisation(pb::PutOrganisationRequest {
            organisation: Some(pb::Organisation {
                ods_code: code.into(),
                kind: kind.into(),
                name: format!("{code} (invented)"),
                format: pb::DocumentFormat::Native.into(),
                region: region.into(),
                mesh_mailbox: String::new(),
                active,
            }),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_held_copy_goes_to_the_service_registered_for_its_area() {
    a_held_copy_goes_to_the_service_registered_for_its_area_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_held_copy_goes_to_the_service_registered_for_its_area_on_postgres() {
    a_held_copy_goes_to_the_service_registered_for_its_area_on(Engine::Postgres).await;
}

async fn a_held_copy_goes_to_the_service_registered_for_its_area_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let mut prison = gw.client("YP001").await;
    let s = dosed_two_hours_ago(ost_and_care_plan(6, ConsentDecision::Given));
    let r = released(&mut prison, "held", &s).await;
    assert_eq!(
        destinations(&r),
        [
            "YG001",
            "YPR01",
            "@parked-substance-misuse",
            "@parked-mental-health"
        ]
    );
    let dose_due = due_ms(&r, "@parked-substance-misuse");
    let mut op = gw.operator().await;
    held_copies_are_listed_with_the_parked(&mut op).await;

    // A service in another region, or a disabled one, changes nothing.
    put_service(
        &gw,
        "YS002",
        pb::OrganisationKind::SubstanceMisuseService,
        "south",
        true,
    )
    .await;
    put_service(
        &gw,
        "YS001",
        pb::OrganisationKind::SubstanceMisuseService,
        "north",
        false,
    )
    .await;
    let t = track_message(&mut prison, "held").await;
    assert_eq!(t.deliveries[2].destination, "@parked-substance-misuse");
    assert_eq!(t.deliveries[2].state(), pb::DeliveryState::Parked);

    // Enabled for the release area: the OST copy goes there at once, its
    // next-dose deadline unchanged; the mental health copy stays held.
    set_active(&gw, "YS001", true).await;
    let t = track_message(&mut prison, "held").await;
    assert_eq!(t.deliveries[2].destination, "YS001");
    assert_eq!(t.deliveries[2].state(), pb::DeliveryState::Queued);
    assert_eq!(t.deliveries[3].destination, "@parked-mental-health");
    let mut sms = client_for(&gw, "YS001").await;
    let got = pull_and_ack(&mut sms).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    let due = d.due_at.as_ref().unwrap();
    assert_eq!(
        due.seconds * 1_000 + i64::from(due.nanos) / 1_000_000,
        dose_due
    );
    assert!(d.urgent);
    let view = native(d);
    assert_eq!(view.medications.len(), 1);
    assert!(view.medications[0].opioid_substitution);
    assert!(
        view.mental_health.is_none(),
        "the substance misuse service's view"
    );

    // The mental health team follows when it is registered.
    put_service(
        &gw,
        "YM001",
        pb::OrganisationKind::MentalHealthTeam,
        "north",
        true,
    )
    .await;
    let mut mht = client_for(&gw, "YM001").await;
    assert_eq!(pull_and_ack(&mut mht).await.len(), 1);
    let parked = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert!(parked.is_empty(), "{parked:?}");

    moves_are_audited_as_the_operator(&mut op, r.handover_id).await;
    gw.stop().await;
}

/// Operators see both held copies among the parked, by holding mailbox,
/// and a listing paged one at a time crosses holding mailboxes.
async fn held_copies_are_listed_with_the_parked(op: &mut Operator) {
    // Operators see both held copies among the parked, by holding mailbox.
    let parked = op
        .list_parked(pb::ListParkedRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    let held: Vec<&str> = parked.iter().map(|d| d.mailbox.as_str()).collect();
    assert_eq!(held, ["@parked-mental-health", "@parked-substance-misuse"]);
    // Paged one at a time, the listing crosses holding mailboxes.
    let first = op
        .list_parked(pb::ListParkedRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let second = op
        .list_parked(pb::ListParkedRequest {
            page_size: 1,
            page_token: first.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.deliveries[0].mailbox, "@parked-mental-health");
    assert_eq!(second.deliveries[0].mailbox, "@parked-substance-misuse");
}

/// Each move of `handover`'s held copies is in the audit trail, by the
/// operator whose registry change caused it.
async fn moves_are_audited_as_the_operator(op: &mut Operator, handover: u64) {
    let trail = op
        .audit_trail(pb::AuditTrailRequest {
            subject: Some(pb::audit_trail_request::Subject::HandoverId(handover)),
            reason: "checking held copies were routed (invented case)".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let routed: Vec<_> = trail.iter().filter(|e| e.action == "route_held").collect();
    assert_eq!(routed.len(), 2, "{trail:?}");
    assert!(routed.iter().all(|e| e.actor.starts_with("urn:operator:")));
}

/// Waits (at most 20 s) until `check` holds.
async fn within_seconds(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_change_through_one_node_reaches_the_other_on_postgres() {
    let Some(a) = TestGateway::on(Engine::Postgres).await else {
        return;
    };
    // A second node: the same database and key files, its own listeners.
    let b = TestGateway::start_in(
        tempfile::tempdir().unwrap(),
        a.config.clone(),
        std::sync::Arc::new(throughcare::store::SystemClock),
    )
    .await;
    // Released through B with no service for the area: held.
    let mut prison = b.client("YP001").await;
    let s = dosed_two_hours_ago(ost_and_care_plan(7, ConsentDecision::Given));
    let r = released(&mut prison, "two-nodes", &s).await;
    assert!(destinations(&r).contains(&"@parked-substance-misuse"));
    // Registered through A: B lets the service in and serves it the copy.
    put_service(
        &a,
        "YS001",
        pb::OrganisationKind::SubstanceMisuseService,
        "north",
        true,
    )
    .await;
    let issued = b.ca().issue_client_now("urn:ods:YS001").unwrap();
    let connect = async || {
        b.client_with(
            &b.ca_pem(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .await
        .unwrap()
    };
    // Asked without leasing anything: Track of a message it never sent.
    let known = async || {
        connect()
            .await
            .track(pb::TrackRequest {
                handover: Some(pb::track_request::Handover::MessageId("none".into())),
            })
            .await
            .unwrap_err()
            .code()
    };
    within_seconds("B to know YS001", async || {
        known().await == tonic::Code::NotFound
    })
    .await;
    let t = track_message(&mut prison, "two-nodes").await;
    assert_eq!(t.deliveries[2].destination, "YS001");
    assert_eq!(pull_and_ack(&mut connect().await).await.len(), 1);
    // Disabled through A: B refuses it too.
    set_active(&a, "YS001", false).await;
    within_seconds("B to refuse the disabled YS001", async || {
        known().await == tonic::Code::PermissionDenied
    })
    .await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_correction_that_stops_substitution_tells_the_service_the_old_summary_no_longer_applies()
{
    a_correction_that_stops_substitution_tells_the_service_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_correction_that_stops_substitution_tells_the_service_the_old_summary_no_longer_applies_on_postgres()
 {
    a_correction_that_stops_substitution_tells_the_service_on(Engine::Postgres).await;
}

/// The substance misuse service took a release on methadone 60 mg; the
/// prison's correction says the patient is not on substitution, so it no
/// longer goes to the service, which kept dosing from the old summary. Now
/// the service gets an urgent notice for the correction: who, that it
/// replaces the summary it holds, and nothing clinical. A service that was
/// never given the old summary gets nothing.
async fn a_correction_that_stops_substitution_tells_the_service_on(engine: Engine) {
    let Some((gw, _clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let s = ost_and_care_plan(8, ConsentDecision::Given);
    let first = released(&mut prison, "stop-1", &s).await;
    assert!(destinations(&first).contains(&"YS001"));
    let mut sms = client_for(&gw, "YS001").await;
    assert_eq!(pull_and_ack(&mut sms).await.len(), 1);

    let mut corrected = s.clone();
    corrected.medications.clear();
    corrected.substance_misuse = None;
    let second = released(&mut prison, "stop-2", &corrected).await;
    assert!(
        destinations(&second).contains(&"YS001"),
        "{:?}",
        destinations(&second)
    );
    let got = pull_and_ack(&mut sms).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].handover_id, second.handover_id);
    assert_eq!(got[0].supersedes_handover_id, first.handover_id);
    assert!(got[0].urgent);
    let doc = native(&got[0]);
    assert!(doc.medications.is_empty() && doc.diagnoses.is_empty() && doc.risks.is_empty());
    assert!(doc.follow_ups.is_empty() && doc.mental_health.is_none());
    assert_eq!(doc.patient.as_ref().unwrap().nhs_number, nhs(8));
    assert!(
        got[0]
            .not_carried
            .iter()
            .any(|n| n.contains("no longer applies")),
        "{:?}",
        got[0].not_carried
    );
    // The mental health team never took the first one: nothing for it.
    let mut mht = client_for(&gw, "YM001").await;
    let theirs = pull_and_ack(&mut mht).await;
    assert!(
        theirs
            .iter()
            .all(|d| d.handover_id == second.handover_id && native(d).medications.is_empty()),
        "the team gets the correction's own view, if any"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_copy_queued_for_a_service_disabled_before_it_pulled_goes_to_another_for_the_area() {
    a_copy_for_a_disabled_service_goes_to_another_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_copy_queued_for_a_service_disabled_before_it_pulled_goes_to_another_for_the_area_on_postgres()
 {
    a_copy_for_a_disabled_service_goes_to_another_on(Engine::Postgres).await;
}

/// A release's copy is queued for the area's substance misuse service,
/// which is disabled before it pulls. The copy waited in a mailbox nobody
/// may pull, past the next dose. Now it is held again and goes to the
/// area's other service, its next-dose deadline unchanged; with no other
/// service it would wait held, visible to operators.
async fn a_copy_for_a_disabled_service_goes_to_another_on(engine: Engine) {
    let Some((gw, _clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let s = ost_and_care_plan(9, ConsentDecision::Given);
    let r = released(&mut prison, "disabled-1", &s).await;
    let due = due_ms(&r, "YS001");
    gw.operator()
        .await
        .set_organisation_active(pb::SetOrganisationActiveRequest {
            ods_code: "YS001".into(),
            active: false,
        })
        .await
        .unwrap();
    // Held: nowhere else serves the north yet.
    let track = track_message(&mut prison, "disabled-1").await;
    let copy = track
        .deliveries
        .iter()
        .find(|d| d.destination.starts_with("@parked-substance"))
        .expect("held again");
    assert_eq!(copy.state(), pb::DeliveryState::Parked);
    put_service(
        &gw,
        "YS003",
        pb::OrganisationKind::SubstanceMisuseService,
        "north",
        true,
    )
    .await;
    let mut other = client_for(&gw, "YS003").await;
    let got = pull_and_ack(&mut other).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].handover_id, r.handover_id);
    let at = got[0].due_at.as_ref().unwrap();
    assert_eq!(at.seconds * 1_000 + i64::from(at.nanos) / 1_000_000, due);
    gw.stop().await;
}

#[tokio::test]
async fn a_copy_for_a_disabled_service_the_prison_named_in_another_area_waits_for_it() {
    a_copy_named_in_another_area_waits_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_copy_for_a_disabled_service_the_prison_named_in_another_area_waits_for_it_on_postgres() {
    a_copy_named_in_another_area_waits_on(Engine::Postgres).await;
}

/// A northern prison releases a patient to the south and names the south's
/// service; that service is disabled before it pulls. The copy is not moved
/// to the north's service, which has no care relationship with the patient
/// (and would learn of their substitution therapy): it waits for its own
/// service, and goes there once it is enabled again.
async fn a_copy_named_in_another_area_waits_on(engine: Engine) {
    let Some((gw, _clock)) = TestGateway::manual_on(engine, |_| {}).await else {
        return;
    };
    register_services(&gw).await;
    let mut prison = gw.client("YP001").await;
    let s = ost_and_care_plan(12, ConsentDecision::Given);
    let r = prison
        .submit(release_of("named-south", &s, &["YS002"]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        destinations(&r).contains(&"YS002"),
        "{:?}",
        destinations(&r)
    );
    set_active(&gw, "YS002", false).await;
    // The north's service, active all along, is not given it.
    let mut north = client_for(&gw, "YS001").await;
    assert!(pull_and_ack(&mut north).await.is_empty());
    let track = track_message(&mut prison, "named-south").await;
    assert!(
        track.deliveries.iter().any(|d| d.destination == "YS002"),
        "{:?}",
        track.deliveries
    );
    set_active(&gw, "YS002", true).await;
    let mut south = client_for(&gw, "YS002").await;
    let got = pull_and_ack(&mut south).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].handover_id, r.handover_id);
    gw.stop().await;
}

#[tokio::test]
async fn a_correction_goes_to_the_service_given_the_earlier_copy() {
    a_correction_goes_to_the_service_given_the_earlier_copy_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_correction_goes_to_the_service_given_the_earlier_copy_on_postgres() {
    a_correction_goes_to_the_service_given_the_earlier_copy_on(Engine::Postgres).await;
}

/// The area rule picks the first active service of a kind by ODS code. A
/// service registered in the area after the release was dosing the patient
/// (or one disabled and enabled again) must not take the correction: it
/// goes to the service given the earlier copy, which is not told to stop.
/// Before, the new service got the corrected dose with no care relationship
/// and the dosing service a withdrawal notice (found by a views review).
/// A service the sender names is not followed.
async fn a_correction_goes_to_the_service_given_the_earlier_copy_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    let sms = pb::OrganisationKind::SubstanceMisuseService;
    put_service(&gw, "YS003", sms, "north", true).await;
    let mut prison = gw.client("YP001").await;
    let s = dosed_two_hours_ago(ost_and_care_plan(8, ConsentDecision::Given));
    let first = released(&mut prison, "follow-1", &s).await;
    assert!(destinations(&first).contains(&"YS003"), "{first:?}");
    let mut dosing = client_for(&gw, "YS003").await;
    assert_eq!(pull_ack(&mut dosing, 10).await, 1);
    // A service that sorts first is registered for the area.
    put_service(&gw, "YS001", sms, "north", true).await;
    let mut corrected = s.clone();
    corrected.medications[0].dose = "30 mg".into();
    corrected.authored_at =
        throughcare::clinical::model::DateTime(s.authored_at.0 + time::Duration::hours(1));
    let second = released(&mut prison, "follow-2", &corrected).await;
    let to = destinations(&second);
    assert!(to.contains(&"YS003") && !to.contains(&"YS001"), "{to:?}");
    let got = pull_and_ack(&mut dosing).await;
    assert_eq!(got.len(), 1, "one copy, the correction: {got:?}");
    assert_eq!(native(&got[0]).medications[0].dose, "30 mg");
    assert_eq!(
        got[0].supersedes_handover_id, first.handover_id,
        "{:?}",
        got[0]
    );
    let mut newcomer = client_for(&gw, "YS001").await;
    assert!(pull_and_ack(&mut newcomer).await.is_empty());
    // Named by the sender, a service is not followed.
    let mut named = corrected.clone();
    named.authored_at =
        throughcare::clinical::model::DateTime(corrected.authored_at.0 + time::Duration::hours(1));
    let third = prison
        .submit(release_of("follow-3", &named, &["YG001", "YS001"]))
        .await
        .unwrap()
        .into_inner();
    assert!(destinations(&third).contains(&"YS001"), "{third:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_service_told_once_is_not_told_again_at_each_later_correction() {
    a_service_told_once_is_not_told_again_at_each_later_correction_on(Engine::Sled).await;
}

#[tokio::test]
async fn a_service_told_once_is_not_told_again_at_each_later_correction_on_postgres() {
    a_service_told_once_is_not_told_again_at_each_later_correction_on(Engine::Postgres).await;
}

/// A service given a release, then a withdrawal notice when the patient
/// withdrew consent, is not sent another notice by each later correction
/// that still does not go to it: each one carried the newer custody details
/// (a new release date) to a service whose part had ended (views review).
/// Given the summary again, it is told again when a later one leaves it.
async fn a_service_told_once_is_not_told_again_at_each_later_correction_on(engine: Engine) {
    let Some(gw) = TestGateway::on(engine).await else {
        return;
    };
    put_service(
        &gw,
        "YS003",
        pb::OrganisationKind::SubstanceMisuseService,
        "north",
        true,
    )
    .await;
    let mut prison = gw.client("YP001").await;
    let mut s = dosed_two_hours_ago(ost_and_care_plan(9, ConsentDecision::Given));
    let mut service = client_for(&gw, "YS003").await;
    let next = |s: &mut ClinicalSummary, consent| {
        s.consent.treatment_sharing = consent;
        s.authored_at =
            throughcare::clinical::model::DateTime(s.authored_at.0 + time::Duration::hours(1));
        s.clone()
    };
    released(&mut prison, "told-1", &s).await;
    assert_eq!(pull_ack(&mut service, 10).await, 1);
    let withdrawn = next(&mut s, ConsentDecision::Refused);
    let r = released(&mut prison, "told-2", &withdrawn).await;
    assert!(destinations(&r).contains(&"YS003"), "the notice: {r:?}");
    assert_eq!(pull_ack(&mut service, 10).await, 1);
    let later = next(&mut s, ConsentDecision::Refused);
    let r = released(&mut prison, "told-3", &later).await;
    assert!(!destinations(&r).contains(&"YS003"), "told twice: {r:?}");
    assert_eq!(pull_ack(&mut service, 10).await, 0);
    // Given it again, then left again: told again.
    let again = next(&mut s, ConsentDecision::Given);
    released(&mut prison, "told-4", &again).await;
    assert_eq!(pull_ack(&mut service, 10).await, 1);
    let left = next(&mut s, ConsentDecision::Refused);
    let r = released(&mut prison, "told-5", &left).await;
    assert!(
        destinations(&r).contains(&"YS003"),
        "the second notice: {r:?}"
    );
    // A notice only leased (its ack lost) told nothing: the next
    // correction sends another.
    let leased = service.pull(pull(10)).await.unwrap().into_inner();
    assert_eq!(leased.deliveries.len(), 1);
    let still_left = next(&mut s, ConsentDecision::Refused);
    let r = released(&mut prison, "told-6", &still_left).await;
    assert!(destinations(&r).contains(&"YS003"), "told again: {r:?}");
    gw.stop().await;
}
