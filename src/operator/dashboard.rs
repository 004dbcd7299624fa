//! The operator's dashboard: one read-only HTML page, `GET /` (also
//! `/dashboard`) on the loopback metrics listener, rendered on the server and
//! refreshed by the browser every [`REFRESH_SECONDS`].
//!
//! It shows queue metadata only: mailboxes (ODS codes), delivery ids, senders,
//! events, attempts, times and the gateway's own words for why a delivery is
//! quarantined. Never a payload, a patient identifier or a patient key, and
//! never a recipient's free-text nack reason: those are refused when they
//! look like patient data, but a name or a drug cannot be recognised, and
//! this page may be on a wall screen ([`gateway_words`]). Every
//! value is HTML-escaped by `maud`, and the page forbids scripts outright
//! (`Content-Security-Policy`). Why plain HTTP on loopback: `docs/operations.md`.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::continuity::LatestContinuity;
use super::trends::{Sample, Trends};
use crate::handover::Continuity;
use crate::journey::JourneyEvent;
use crate::store::{
    Clock, DeliveryRecord, MailboxStats, MeshState, PARKED_MAILBOX, Store, StoreError,
};

/// Seconds between the page's own refreshes.
pub const REFRESH_SECONDS: u32 = 5;

/// At most this many quarantined deliveries (by mailbox, oldest first in each)
/// and parked releases (oldest first) are listed; the section headers still
/// count them all.
pub const LIST_LIMIT: usize = 200;

/// Scripts, frames, images and fonts are refused: the page is inline CSS and text.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const STYLE: &str = r#"
:root { color-scheme: light; --alert: #b3261e; --alert-bg: #fde7e5; --warn: #8a5300; --warn-bg: #fff1d6; --rule: #d9dce1; --muted: #5f6670; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, "DejaVu Sans", sans-serif; margin: 0; color: #1d2126; background: #f6f7f9; }
header { background: #1f3347; color: #fff; padding: 14px 24px; }
header h1 { font-size: 20px; margin: 0 0 2px; }
header p { margin: 0; color: #c9d4df; }
main { padding: 8px 24px 24px; }
.tiles { display: flex; gap: 12px; margin: 16px 0 4px; padding: 0; list-style: none; }
.tiles li { background: #fff; border: 1px solid var(--rule); border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.tiles b { display: block; font-size: 22px; }
.tiles li.alert { border-color: var(--alert); background: var(--alert-bg); color: var(--alert); }
.tiles li.warn { border-color: var(--warn); background: var(--warn-bg); color: var(--warn); }
h2 { font-size: 16px; margin: 22px 0 8px; }
h2 .count { display: inline-block; min-width: 22px; padding: 0 7px; margin-left: 4px; border-radius: 11px; background: #e3e7ec; font-size: 13px; text-align: center; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--rule); }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: #3c434b; }
tr.alert td:first-child { box-shadow: inset 4px 0 var(--alert); font-weight: 700; }
tr.warn td:first-child { box-shadow: inset 4px 0 var(--warn); font-weight: 700; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.alert { color: var(--alert); background: var(--alert-bg); font-weight: 700; }
td.warn { color: var(--warn); background: var(--warn-bg); font-weight: 700; }
td.reason { max-width: 420px; overflow-wrap: anywhere; }
.muted, p.note, p.empty { color: var(--muted); }
p.empty { margin: 4px 0; font-style: italic; }
.badge { display: inline-block; padding: 0 6px; border-radius: 4px; font-size: 12px; font-weight: 700; }
.badge.alert { background: var(--alert); color: #fff; }
.trends { display: flex; flex-wrap: wrap; gap: 12px; }
figure.trend { margin: 0; background: #fff; border: 1px solid var(--rule); border-radius: 6px; padding: 8px 12px; }
figure.trend figcaption { font-size: 13px; margin-bottom: 4px; }
figure.trend svg { display: block; }
"#;

/// What the dashboard reads: the store, the gateway's clock and the trends
/// the sweeper records.
#[derive(Clone)]
pub struct Dashboard {
    store: Store,
    clock: Arc<dyn Clock>,
    trends: Arc<Trends>,
    continuity: Arc<LatestContinuity>,
}

/// One delivery as the dashboard lists it: metadata only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Delivery id.
    pub delivery: u64,
    /// Its mailbox.
    pub mailbox: String,
    /// The sending organisation (empty if its handover record is missing).
    pub sender: String,
    /// The journey event.
    pub event: Option<JourneyEvent>,
    /// Leases handed out so far.
    pub attempts: u32,
    /// Why it was quarantined (or the last retryable nack's reason).
    pub reason: Option<String>,
    /// When queued (parked, for a parked release).
    pub queued_at_ms: i64,
    /// When quarantined.
    pub quarantined_at_ms: Option<i64>,
    /// Its deadline.
    pub due_ms: Option<i64>,
    /// Still on its way past its deadline.
    pub overdue: bool,
    /// What PDS last said, for a parked release looked up (its reason).
    pub pds: Option<String>,
}

/// Everything one page shows, read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The gateway's time, ms since the epoch.
    pub now_ms: i64,
    /// Every mailbox with live or quarantined deliveries.
    pub mailboxes: Vec<MailboxStats>,
    /// Quarantined deliveries by mailbox, oldest first in each, at most [`LIST_LIMIT`].
    pub quarantine: Vec<Line>,
    /// Parked releases, oldest first, at most [`LIST_LIMIT`].
    pub parked: Vec<Line>,
    /// The last hours, one sample a minute (see [`super::trends`]).
    pub trends: Vec<Sample>,
    /// Deliveries the MESH edge is sending or that wait for the recipient's
    /// MESH acknowledgement, oldest change first, at most [`LIST_LIMIT`].
    pub mesh: Vec<crate::store::MeshRecord>,
    /// The continuity indicators last computed (see [`super::continuity`]).
    pub continuity: Option<Continuity>,
}

impl Dashboard {
    /// A dashboard over `store`, telling time by `clock` (the gateway's).
    pub fn new(store: Store, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            clock,
            trends: Arc::default(),
            continuity: Arc::default(),
        }
    }

    /// Shows the continuity indicators kept in `latest`.
    #[must_use]
    pub fn with_continuity(mut self, latest: Arc<LatestContinuity>) -> Self {
        self.continuity = latest;
        self
    }

    /// Draws the charts from `trends`.
    #[must_use]
    pub fn with_trends(mut self, trends: Arc<Trends>) -> Self {
        self.trends = trends;
        self
    }

    /// Reads the page's data.
    ///
    /// # Errors
    /// Store failures (a closed store while the gateway shuts down).
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mailboxes = self.store.mailbox_stats().await?;
        let now_ms = self.clock.now_ms();
        let store = self.store.clone();
        let (quarantine, parked, mesh) = tokio::task::spawn_blocking(move || {
            let lines = |records: Vec<DeliveryRecord>| {
                records
                    .into_iter()
                    .map(|d| line(&store, d, now_ms))
                    .collect::<Result<Vec<_>, _>>()
            };
            let mut mesh: Vec<_> = store
                .mesh_records()?
                .into_iter()
                .filter(|r| matches!(r.state, MeshState::Sending | MeshState::Sent))
                .collect();
            mesh.sort_by_key(|r| r.updated_ms);
            mesh.truncate(LIST_LIMIT);
            Ok::<_, StoreError>((
                lines(store.quarantined(None, LIST_LIMIT)?)?,
                lines(store.parked(LIST_LIMIT)?)?,
                mesh,
            ))
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("dashboard read: {e}")))??;
        Ok(Snapshot {
            now_ms,
            mailboxes,
            quarantine,
            parked,
            trends: self.trends.samples(),
            mesh,
            continuity: self.continuity.get(),
        })
    }
}

/// The listed metadata of `d`; its handover is read for the sender and event
/// only (never its patient key).
fn line(store: &Store, d: DeliveryRecord, now_ms: i64) -> Result<Line, StoreError> {
    let handover = store.handover(d.handover_id)?;
    let overdue = d.is_overdue(now_ms);
    Ok(Line {
        delivery: d.id,
        mailbox: d.mailbox,
        sender: handover
            .as_ref()
            .map(|h| h.sender.clone())
            .unwrap_or_default(),
        event: handover.map(|h| h.event).or(d.event),
        attempts: d.attempt,
        reason: d.reason,
        queued_at_ms: d.queued_at_ms,
        quarantined_at_ms: d.quarantined_at_ms,
        due_ms: d.due_ms,
        overdue,
        // What PDS said, without the practice: this page is neither
        // authenticated nor audited, and a practice beside a release date
        // can narrow a person down; `ListParked` names it, audited.
        pds: d.pds.as_ref().map(|f| f.status.reason(None)),
    })
}

/// The dashboard's routes: `GET /` and `GET /dashboard`.
pub fn routes(dashboard: Dashboard) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/dashboard", axum::routing::get(page))
        .with_state(dashboard)
}

/// Whether a request's `Host` names this machine by address or as
/// `localhost`: a page a browser reached through a DNS name that was
/// rebound to 127.0.0.1 (a hostile web page reading the dashboard through
/// the visitor's browser) names the attacker's domain, and is refused.
fn host_allowed(headers: &axum::http::HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    // `[v6]:port`, `[v6]`, `name:port`, `name`, `v4:port`, `v4`.
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.starts_with(':') => v6,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

async fn page(
    axum::extract::State(dashboard): axum::extract::State<Dashboard>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !host_allowed(&headers) {
        return (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "The dashboard answers only to an address or localhost in Host \
             (use the IP address, or an SSH tunnel to localhost)\n",
        )
            .into_response();
    }
    let (status, body) = match dashboard.snapshot().await {
        Ok(snapshot) => (StatusCode::OK, render(&snapshot)),
        Err(error) => {
            tracing::warn!(%error, "dashboard unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, unavailable())
        }
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body.into_string(),
    )
        .into_response()
}

/// The page when the figures cannot be read: fixed words only (the
/// store's error, which can name files, hosts and the database, is in the
/// gateway's log, not on a page anyone on the network may read).
fn unavailable() -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(REFRESH_SECONDS);
                title { "Throughcare dashboard: unavailable" }
            }
            body {
                h1 { "Dashboard unavailable" }
                p { "The gateway could not read its queues just now; the reason is in its log. This page refreshes itself." }
            }
        }
    }
}

/// The page for `s`. Every value is escaped.
pub fn render(s: &Snapshot) -> Markup {
    let now = timestamp(s.now_ms);
    let live: u64 = s
        .mailboxes
        .iter()
        .filter(|m| !crate::store::is_parked_mailbox(&m.mailbox))
        .map(|m| m.depth)
        .sum();
    let overdue: u64 = s.mailboxes.iter().map(|m| m.overdue).sum();
    let quarantined: u64 = s.mailboxes.iter().map(|m| m.quarantined).sum();
    let parked: u64 = s
        .mailboxes
        .iter()
        .filter(|m| crate::store::is_parked_mailbox(&m.mailbox))
        .map(|m| m.depth)
        .sum();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(REFRESH_SECONDS);
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Throughcare · " (now) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { "Throughcare gateway" }
                    p {
                        "Gateway time " time #now datetime=(rfc3339(s.now_ms)) { (now) }
                        " · refreshes every " (REFRESH_SECONDS) " s · read-only · queue metadata only, no patient identifiers"
                    }
                }
                main {
                    ul.tiles {
                        li #total-waiting { b { (live) } "waiting or on lease" }
                        li #total-overdue .alert[overdue > 0] { b { (overdue) } "overdue" }
                        li #total-quarantined .warn[quarantined > 0] { b { (quarantined) } "quarantined" }
                        li #total-parked .warn[parked > 0] { b { (parked) } "parked (no known GP)" }
                    }
                    (super::trends::section(&s.trends, s.now_ms))
                    (mailboxes(&s.mailboxes))
                    (quarantine(&s.quarantine, quarantined, s.now_ms))
                    (parked_releases(&s.parked, parked, s.now_ms))
                    (mesh_in_flight(&s.mesh, s.now_ms))
                    (super::continuity::section(s.continuity.as_ref()))
                }
            }
        }
    }
}

fn mailboxes(rows: &[MailboxStats]) -> Markup {
    html! {
        section #mailboxes {
            h2 { "Mailboxes" span.count { (rows.len()) } }
            @if rows.is_empty() {
                p.empty { "No mailbox holds anything." }
            } @else {
                table {
                    thead { tr {
                        th { "mailbox" }
                        th.num { "depth" }
                        th.num { "leased" }
                        th.num { "urgent" }
                        th.num { "oldest" }
                        th.num { "overdue" }
                        th.num { "quarantined" }
                    } }
                    tbody {
                        @for m in rows {
                            tr class=[attention(m)] data-mailbox=(m.mailbox) {
                                td.mailbox {
                                    (m.mailbox)
                                    @if m.mailbox == PARKED_MAILBOX {
                                        " " span.muted { "(no known GP)" }
                                    }
                                }
                                td.num.depth { (m.depth) }
                                td.num.leased { (m.leased) }
                                td.num.urgent { (m.urgent) }
                                td.num.oldest { @if let Some(ms) = m.oldest_age_ms { (age(ms)) } @else { "–" } }
                                td.num.overdue.alert[m.overdue > 0] { (m.overdue) }
                                td.num.quarantined.warn[m.quarantined > 0] { (m.quarantined) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How a mailbox's row stands out: overdue first, then quarantined.
fn attention(m: &MailboxStats) -> Option<&'static str> {
    if m.overdue > 0 {
        Some("alert")
    } else if m.quarantined > 0 {
        Some("warn")
    } else {
        None
    }
}

fn quarantine(lines: &[Line], total: u64, now_ms: i64) -> Markup {
    html! {
        section #quarantine {
            h2 { "Quarantine" span.count { (total) } }
            @if lines.is_empty() {
                p.empty { "Nothing is quarantined." }
            } @else {
                (shown(lines.len(), total))
                table {
                    thead { tr {
                        th.num { "delivery" }
                        th { "mailbox" }
                        th { "sender" }
                        th { "event" }
                        th.num { "attempts" }
                        th { "reason" }
                        th { "quarantined" }
                    } }
                    tbody {
                        @for l in lines {
                            tr data-delivery=(l.delivery) {
                                td.num.delivery { (l.delivery) }
                                td.mailbox { (l.mailbox) }
                                td.sender { (l.sender) }
                                td.event { (event(l.event)) }
                                td.num.attempts { (l.attempts) }
                                td.reason { (gateway_words(l.reason.as_deref().unwrap_or(""))) }
                                td.when { (when(l.quarantined_at_ms, now_ms)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn parked_releases(lines: &[Line], total: u64, now_ms: i64) -> Markup {
    html! {
        section #parked {
            h2 { "Parked releases" span.count { (total) } }
            @if lines.is_empty() {
                p.empty { "No release is waiting for a GP." }
            } @else {
                (shown(lines.len(), total))
                table {
                    thead { tr {
                        th.num { "delivery" }
                        th { "sender" }
                        th { "event" }
                        th { "queued" }
                        th { "due" }
                        th { "overdue" }
                        th { "PDS" }
                    } }
                    tbody {
                        @for l in lines {
                            tr class=[l.overdue.then_some("alert")] data-delivery=(l.delivery) {
                                td.num.delivery { (l.delivery) }
                                td.sender { (l.sender) }
                                td.event { (event(l.event)) }
                                td.queued { (when(Some(l.queued_at_ms), now_ms)) }
                                td.due.alert[l.overdue] { (when(l.due_ms, now_ms)) }
                                td.overdue {
                                    @if l.overdue { span.badge.alert { "OVERDUE" } } @else { "no" }
                                }
                                td.pds { (l.pds.as_deref().unwrap_or("not looked up")) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Deliveries on their way through MESH (shown only when there are some).
fn mesh_in_flight(records: &[crate::store::MeshRecord], now_ms: i64) -> Markup {
    html! {
        @if !records.is_empty() {
            section #mesh {
                h2 { "Through MESH, awaiting acknowledgement" span.count { (records.len()) } }
                table {
                    thead { tr {
                        th.num { "delivery" }
                        th { "mailbox" }
                        th { "MESH mailbox" }
                        th { "state" }
                        th { "since" }
                    } }
                    tbody {
                        @for r in records {
                            tr data-delivery=(r.delivery_id) {
                                td.num.delivery { (r.delivery_id) }
                                td.mailbox { (r.mailbox) }
                                td.mesh-mailbox { (r.mesh_mailbox) }
                                td.state { (r.state.as_str()) }
                                td.since { (when(Some(r.updated_ms), now_ms)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn shown(listed: usize, total: u64) -> Markup {
    html! {
        @if u64::try_from(listed).unwrap_or(u64::MAX) < total {
            p.note { "Showing " (listed) " of " (total) "." }
        }
    }
}

fn event(e: Option<JourneyEvent>) -> String {
    e.map_or_else(|| "–".to_owned(), |e| e.to_string())
}

/// `2027-01-15 08:00 GMT`: England's time, with its zone.
fn timestamp(ms: i64) -> String {
    crate::uk_time::display_ms(ms)
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A time with how far it is from now: `2027-01-15 08:00 GMT (3h ago)`.
fn when(ms: Option<i64>, now_ms: i64) -> Markup {
    html! {
        @if let Some(ms) = ms {
            time datetime=(rfc3339(ms)) { (timestamp(ms)) }
            " "
            span.muted {
                @if ms <= now_ms { "(" (age(now_ms - ms)) " ago)" } @else { "(in " (age(ms - now_ms)) ")" }
            }
        } @else {
            "–"
        }
    }
}

/// A duration in ms, coarsely: `45s`, `12m`, `30h`, `17d`.
fn age(ms: i64) -> String {
    match ms.max(0) / 1_000 {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// What the page shows of a quarantine reason: the gateway's own words,
/// without the recipient's free text that follows them (operators read that
/// through `OperatorService.ListQuarantine`).
pub fn gateway_words(reason: &str) -> Cow<'_, str> {
    const NOT_SHOWN: &str = "(the recipient's words: not shown here)";
    /// Reasons the gateway writes whole.
    const OWN: [&str; 2] = [
        "stored payload failed its integrity check",
        "lease expired without an ack on attempt ",
    ];
    let mut rest = reason;
    let mut shown = String::new();
    while let Some(after) = rest.strip_prefix("redriven after: ") {
        shown.push_str("redriven after: ");
        rest = after;
    }
    let nack = ["permanent nack", "retryable nack"]
        .into_iter()
        .find(|p| rest.starts_with(&format!("{p}: ")))
        .map(str::to_owned)
        .or_else(|| {
            let tail = rest.strip_prefix("nack on the last allowed attempt (")?;
            let (n, _) = tail.split_once("): ")?;
            n.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| format!("nack on the last allowed attempt ({n})"))
        });
    match nack {
        Some(kind) => {
            let words = &rest[kind.len() + 2..];
            let own = OWN.contains(&words);
            shown.push_str(&kind);
            shown.push_str(": ");
            shown.push_str(if own { words } else { NOT_SHOWN });
        }
        None if OWN.iter().any(|o| rest.starts_with(o)) && shown.is_empty() => {
            return Cow::Borrowed(reason);
        }
        None if OWN.iter().any(|o| rest.starts_with(o)) => shown.push_str(rest),
        None if reason.is_empty() => return Cow::Borrowed(""),
        None => shown.push_str(NOT_SHOWN),
    }
    Cow::Owned(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn snapshot(reason: &str) -> Snapshot {
        Snapshot {
            now_ms: NOW,
            mailboxes: vec![
                MailboxStats {
                    mailbox: "YG001".into(),
                    depth: 2,
                    leased: 1,
                    urgent: 0,
                    overdue: 1,
                    quarantined: 1,
                    oldest_age_ms: Some(90_000),
                },
                MailboxStats {
                    mailbox: PARKED_MAILBOX.into(),
                    depth: 1,
                    oldest_age_ms: Some(5_000),
                    ..MailboxStats::default()
                },
            ],
            quarantine: vec![Line {
                delivery: 7,
                mailbox: "YG001".into(),
                sender: "YP001".into(),
                event: Some(JourneyEvent::Release),
                attempts: 1,
                reason: Some(reason.into()),
                queued_at_ms: NOW - 60_000,
                quarantined_at_ms: Some(NOW - 30_000),
                due_ms: None,
                overdue: false,
                pds: None,
            }],
            parked: vec![Line {
                delivery: 9,
                mailbox: PARKED_MAILBOX.into(),
                sender: "YP001".into(),
                event: Some(JourneyEvent::Release),
                attempts: 0,
                reason: None,
                queued_at_ms: NOW - 5_000,
                quarantined_at_ms: None,
                due_ms: Some(NOW - 1),
                overdue: true,
                pds: Some("registered at a practice, not connected".into()),
            }],
            trends: Vec::new(),
            mesh: Vec::new(),
            continuity: Some(Continuity {
                rows: vec![crate::handover::ContinuityRow {
                    prison: "YP001".into(),
                    period_start_ms: NOW - 28 * 86_400_000,
                    period_end_ms: NOW,
                    releases: Some(21),
                    gp_within_deadline: crate::handover::Share::Of(15, 21),
                    parked_over_three_days: crate::handover::Share::Of(6, 21),
                    parked_over_seven_days: crate::handover::Share::Suppressed,
                    median_to_gp_ms: Some(5_400_000),
                    ost_before_next_dose: crate::handover::Share::Of(5, 10),
                    mental_health_within_72h: crate::handover::Share::Of(0, 0),
                }],
                now_ms: NOW,
                covered_from_ms: NOW - 84 * 86_400_000,
            }),
        }
    }

    #[test]
    fn markup_in_a_reason_never_reaches_the_page() {
        let html = render(&snapshot(
            r#"permanent nack: <script>alert("x")</script><img src=x onerror=alert(1)> & "quoted""#,
        ))
        .into_string();
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("onerror"), "{html}");
    }

    #[test]
    fn a_mailbox_name_is_escaped_in_text_and_attributes() {
        let mut s = snapshot("r");
        s.mailboxes[0].mailbox = r#"Y"><b>G"#.into();
        let html = render(&s).into_string();
        assert!(
            html.contains(r#"data-mailbox="Y&quot;&gt;&lt;b&gt;G""#),
            "{html}"
        );
        assert!(!html.contains("<b>G"));
    }

    #[test]
    fn the_page_shows_counts_highlights_and_the_gateway_time() {
        let html = render(&snapshot("practice system rejected it")).into_string();
        assert!(html.contains("<title>Throughcare · 2027-01-15 08:00 GMT</title>"));
        assert!(html.contains(r#"<meta http-equiv="refresh" content="5">"#));
        assert!(
            html.contains(r#"<td class="num overdue alert">1</td>"#),
            "{html}"
        );
        assert!(html.contains(r#"<td class="num quarantined warn">1</td>"#));
        assert!(html.contains(r#"<td class="num oldest">90s</td>"#));
        assert!(!html.contains("practice system rejected it"));
        assert!(html.contains(r#"<span class="badge alert">OVERDUE</span>"#));
        assert!(html.contains(r#"<td class="pds">registered at a practice, not connected</td>"#));
        assert!(html.contains(r#"<h2>Quarantine<span class="count">1</span></h2>"#));
        assert!(!html.contains("Showing"));
        // A list cut at the limit says so; the header counts them all.
        let mut s = snapshot("r");
        s.mailboxes[0].quarantined = 250;
        let html = render(&s).into_string();
        assert!(html.contains(r#"<h2>Quarantine<span class="count">250</span></h2>"#));
        assert!(html.contains("Showing 1 of 250."));
    }

    #[test]
    fn deliveries_on_their_way_through_mesh_are_listed_only_when_there_are_some() {
        let html = render(&snapshot("r")).into_string();
        assert!(!html.contains("id=\"mesh\""));
        let mut s = snapshot("r");
        s.mesh.push(crate::store::MeshRecord {
            delivery_id: 7,
            handover_id: 3,
            mailbox: "YG001".into(),
            mesh_mailbox: "X26ABC2".into(),
            local_id: "throughcare-7".into(),
            message_id: Some("ABC".into()),
            state: MeshState::Sent,
            attempt: 1,
            sends: 1,
            reason: None,
            updated_ms: NOW - 60_000,
        });
        let html = render(&s).into_string();
        assert!(
            html.contains(
                "<h2>Through MESH, awaiting acknowledgement<span class=\"count\">1</span></h2>"
            ),
            "{html}"
        );
        assert!(html.contains(r#"<td class="mesh-mailbox">X26ABC2</td>"#));
        assert!(html.contains(r#"<td class="state">SENT</td>"#));
    }

    #[test]
    fn only_the_gateways_own_words_are_shown() {
        for (stored, shown) in [
            (
                "permanent nack: Alex Example, methadone 60 mg",
                "permanent nack: (the recipient's words: not shown here)",
            ),
            (
                "retryable nack: busy",
                "retryable nack: (the recipient's words: not shown here)",
            ),
            (
                "redriven after: nack on the last allowed attempt (5): no",
                "redriven after: nack on the last allowed attempt (5): (the recipient's words: not shown here)",
            ),
            (
                "permanent nack: stored payload failed its integrity check",
                "permanent nack: stored payload failed its integrity check",
            ),
            (
                "lease expired without an ack on attempt 5 of 5",
                "lease expired without an ack on attempt 5 of 5",
            ),
            (
                "redriven after: lease expired without an ack on attempt 5 of 5",
                "redriven after: lease expired without an ack on attempt 5 of 5",
            ),
            ("anything else", "(the recipient's words: not shown here)"),
            ("", ""),
        ] {
            assert_eq!(gateway_words(stored), shown, "{stored}");
        }
        let html =
            render(&snapshot("permanent nack: NHS 9434765919, born 1985-06-15")).into_string();
        assert!(!html.contains("9434765919") && !html.contains("1985-06-15"));
        assert!(html.contains("permanent nack: (the recipient"), "{html}");
    }

    #[test]
    fn the_continuity_section_shows_shares_and_stars_what_is_suppressed() {
        let page = render(&snapshot("x")).into_string();
        let section = &page[page.find("id=\"continuity\"").unwrap()..];
        assert!(section.contains("71% (15/21)"), "{section}");
        assert!(section.contains("<td class=\"num\">*</td>"), "{section}");
        assert!(section.contains("1.5 h"), "{section}");
        let mut none = snapshot("x");
        none.continuity = None;
        assert!(render(&none).into_string().contains("not computed yet"));
    }

    #[test]
    fn ages_are_coarse() {
        assert_eq!(age(45_000), "45s");
        assert_eq!(age(12 * 60_000), "12m");
        assert_eq!(age(30 * 3_600_000), "30h");
        assert_eq!(age(17 * 86_400_000), "17d");
        assert_eq!(age(-5), "0s");
    }
}
