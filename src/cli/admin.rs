//! `throughcare admin …`: the operator calls from the command line, as aligned
//! tables for people or JSON (`--json`) for scripts. Payload-free, like the
//! operator service it calls.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::grpc::pb;

/// How to reach the gateway as an operator.
#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Gateway address.
    #[arg(
        long,
        global = true,
        default_value = "https://localhost:7443",
        env = "THROUGHCARE_SERVER"
    )]
    pub server: String,
    /// Directory of the (dev) PKI holding the operator's certificate.
    #[arg(
        long,
        global = true,
        default_value = "certs",
        env = "THROUGHCARE_CERTS_DIR"
    )]
    pub certs_dir: PathBuf,
    /// The operator certificate to present (`operator-<name>`).
    #[arg(long = "as", global = true, default_value = "operator-oncall")]
    pub as_: String,
    /// Print JSON (one array of objects) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Rows asked for per call when a table is read page by page (0: the
    /// gateway's default and most, 1000). Every table is read to its end.
    #[arg(long, global = true, default_value_t = 0,
          value_parser = clap::value_parser!(i32).range(0..=1000))]
    pub page_size: i32,
}

/// The operator service's client.
type Operator = pb::operator_service_client::OperatorServiceClient<tonic::transport::Channel>;

/// An operator call.
#[derive(Debug, Clone, Subcommand)]
pub enum OperatorCommand {
    /// Every mailbox with live or quarantined deliveries.
    Mailboxes,
    /// Quarantined deliveries with their reasons.
    Quarantine {
        /// Only this mailbox.
        #[arg(long)]
        mailbox: Option<String>,
    },
    /// Put quarantined deliveries back in their mailbox.
    Redrive {
        /// Every quarantined delivery of this mailbox.
        #[arg(long, conflicts_with = "ids")]
        mailbox: Option<String>,
        /// Delivery ids.
        ids: Vec<u64>,
    },
    /// Releases parked for want of a GP, with their deadlines.
    Parked,
    /// Submits refused because an identifier is linked to another patient.
    Conflicts,
    /// Claim a patient's parked releases for a GP practice.
    Claim {
        /// NHS number.
        #[arg(long, default_value = "")]
        nhs: String,
        /// Prison number (when there is no NHS number).
        #[arg(long, default_value = "")]
        prison_number: String,
        /// Date of birth, YYYY-MM-DD.
        #[arg(long)]
        dob: String,
        /// The practice that registered the patient.
        #[arg(long)]
        practice: String,
        /// Why (kept in the audit trail; no patient data).
        #[arg(long)]
        reason: String,
    },
    /// What the gateway holds under its retention policy (counts only).
    Retention,
    /// Continuity of care per sending prison and period: aggregates only,
    /// counts from 1 to 4 suppressed (`docs/continuity.md`).
    Continuity {
        /// From this day (YYYY-MM-DD, from midnight UTC); default 28 days before --to.
        #[arg(long)]
        from: Option<String>,
        /// To this day (exclusive); default now.
        #[arg(long)]
        to: Option<String>,
        /// Days in each period.
        #[arg(long, default_value_t = 7)]
        period_days: u32,
        /// CSV for commissioners (JSON with --json; a table otherwise).
        #[arg(long)]
        csv: bool,
    },
    /// The registry of organisations.
    Orgs,
    /// Add or update an organisation.
    OrgPut {
        /// ODS code.
        #[arg(long)]
        ods: String,
        /// prison, gp_practice, probation, substance_misuse_service or mental_health_team.
        #[arg(long)]
        kind: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// native, fhir or hl7v2.
        #[arg(long, default_value = "native")]
        format: String,
        /// Region (probation services, and prisons whose releases go to one).
        #[arg(long, default_value = "")]
        region: String,
        /// Its MESH mailbox id: the gateway pushes its deliveries through
        /// MESH and reads MESH messages from it as this organisation's.
        #[arg(long, default_value = "")]
        mesh_mailbox: String,
    },
    /// Disable an organisation: it cannot call and receives nothing.
    OrgDisable {
        /// ODS code.
        ods: String,
    },
    /// Enable an organisation again.
    OrgEnable {
        /// ODS code.
        ods: String,
    },
    /// Who touched a handover or a patient's record (the query is audited).
    Trail {
        /// A handover id.
        #[arg(long, conflicts_with_all = ["nhs", "prison_number"])]
        handover: Option<u64>,
        /// An NHS number.
        #[arg(long)]
        nhs: Option<String>,
        /// A prison number.
        #[arg(long)]
        prison_number: Option<String>,
        /// Why you are reading it.
        #[arg(long)]
        reason: String,
    },
}

/// Rows to print: column names and one JSON object per row.
struct Rows {
    columns: Vec<&'static str>,
    rows: Vec<serde_json::Map<String, Value>>,
}

impl Rows {
    fn new(columns: &[&'static str]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Value) {
        if let Value::Object(map) = row {
            self.rows.push(map);
        }
    }

    fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            crate::outln!("{}", serde_json::to_string_pretty(&self.rows)?)?;
            return Ok(());
        }
        let mut table = comfy_table::Table::new();
        table
            .load_preset(comfy_table::presets::NOTHING)
            .set_header(self.columns.iter().map(|c| c.to_uppercase()));
        for row in &self.rows {
            table.add_row(self.columns.iter().map(|c| match row.get(*c) {
                // Times are UTC in JSON, and read in England's time in a table.
                Some(Value::String(s)) => s.parse::<jiff::Timestamp>().map_or_else(
                    |_| s.clone(),
                    |t| crate::uk_time::display_ms(t.as_millisecond()),
                ),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            }));
        }
        crate::outln!("{table}")?;
        Ok(())
    }
}

fn mailbox_rows(r: pb::ListMailboxesResponse) -> Rows {
    let mut rows = Rows::new(&[
        "mailbox",
        "depth",
        "leased",
        "urgent",
        "overdue",
        "quarantined",
        "oldest",
        "mesh",
    ]);
    for m in r.mailboxes {
        rows.push(json!({
            "mailbox": m.mailbox,
            "depth": m.depth,
            "leased": m.leased,
            "urgent": m.urgent,
            "overdue": m.overdue,
            "quarantined": m.quarantined,
            "oldest": match (m.depth, m.oldest_age) {
                (0, _) | (_, None) => String::new(),
                (_, Some(a)) => age(u64::try_from(a.seconds).unwrap_or(0).saturating_mul(1_000)),
            },
            // Reached through MESH: its MESH mailbox and sends awaiting the recipient's ack.
            "mesh": if m.mesh_mailbox.is_empty() {
                String::new()
            } else {
                format!("{} ({} awaiting ack)", m.mesh_mailbox, m.mesh_awaiting_ack)
            },
        }));
    }
    rows
}

fn conflict_rows(r: pb::ListIdentityConflictsResponse) -> Rows {
    let mut rows = Rows::new(&["at", "sender", "message_id", "field"]);
    for c in r.conflicts {
        rows.push(json!({
            "at": when(c.at.as_ref()),
            "sender": c.sender,
            "message_id": c.message_id,
            "field": c.field,
        }));
    }
    rows
}

/// What is held under the retention policy; the next removal is printed
/// above the table (not in JSON).
fn retention_rows(r: pb::RetentionStatusResponse, json: bool) -> anyhow::Result<Rows> {
    let days = |d: Option<prost_types::Duration>| {
        let s = d.map_or(0, |d| u64::try_from(d.seconds).unwrap_or(0));
        if s.is_multiple_of(86_400) {
            format!("{}d", s / 86_400)
        } else {
            age(s.saturating_mul(1_000))
        }
    };
    let mut rows = Rows::new(&["what", "count", "policy"]);
    for (what, count, policy) in [
        (
            "payloads held",
            r.payloads_held,
            "until finished + grace; parked and quarantined: until resolved".to_owned(),
        ),
        (
            "payloads in grace",
            r.payloads_in_grace,
            format!("grace {}", days(r.payload_grace)),
        ),
        (
            "payloads shredded",
            r.payloads_shredded,
            format!("key epochs of {}", days(r.key_epoch)),
        ),
        (
            "metadata expiring",
            r.metadata_expiring,
            format!("kept {}", days(r.metadata_period)),
        ),
        ("metadata removed", r.metadata_removed, String::new()),
        (
            "tombstones",
            r.tombstones,
            format!("kept {}", days(r.tombstone_period)),
        ),
        ("key epochs", r.key_epochs, String::new()),
        (
            "audit entries held",
            r.audit_entries_held,
            format!("kept {}", days(r.audit_period)),
        ),
        (
            "audit entries removed",
            r.audit_entries_removed,
            String::new(),
        ),
        (
            "identity records held",
            r.identity_records_held,
            format!("until nothing tracked for {}", days(r.metadata_period)),
        ),
        (
            "identity records removed",
            r.identity_records_removed,
            String::new(),
        ),
    ] {
        rows.push(json!({"what": what, "count": count, "policy": policy}));
    }
    if !json {
        match when(r.next_due_at.as_ref()) {
            Value::String(at) => crate::outln!("next removal due: {at}")?,
            _ => crate::outln!("nothing scheduled for removal")?,
        }
    }
    Ok(rows)
}

fn trail_rows(r: pb::AuditTrailResponse) -> Rows {
    if !r.chain_verified {
        eprintln!("WARNING: the audit chain did not verify when read");
    }
    let mut rows = Rows::new(&[
        "seq", "at", "actor", "action", "handover", "delivery", "outcome",
    ]);
    for e in r.entries {
        rows.push(json!({
            "seq": e.seq,
            "at": when(e.at.as_ref()),
            "actor": e.actor,
            "action": e.action,
            "handover": e.handover_id,
            "delivery": e.delivery_id,
            "outcome": e.outcome,
        }));
    }
    rows
}

/// An organisation as the registry takes it, from the command line's words.
fn organisation(
    ods: String,
    kind: &str,
    name: String,
    format: &str,
    region: String,
) -> anyhow::Result<pb::Organisation> {
    let kind = match kind {
        "prison" => pb::OrganisationKind::Prison,
        "gp_practice" => pb::OrganisationKind::GpPractice,
        "probation" => pb::OrganisationKind::Probation,
        "substance_misuse_service" => pb::OrganisationKind::SubstanceMisuseService,
        "mental_health_team" => pb::OrganisationKind::MentalHealthTeam,
        other => anyhow::bail!(
            "unknown kind {other}: prison, gp_practice, probation, substance_misuse_service \
             or mental_health_team"
        ),
    };
    let format = match format {
        "native" => pb::DocumentFormat::Native,
        "fhir" => pb::DocumentFormat::FhirJson,
        "hl7v2" => pb::DocumentFormat::Hl7v2,
        other => anyhow::bail!("unknown format {other}: native, fhir or hl7v2"),
    };
    Ok(pb::Organisation {
        ods_code: ods,
        kind: kind.into(),
        name,
        format: format.into(),
        region,
        active: true,
        mesh_mailbox: String::new(),
    })
}

/// Disables or enables an organisation; the registry's answer as a table.
async fn set_active(op: &mut Operator, ods: String, active: bool) -> anyhow::Result<Rows> {
    let org = op
        .set_organisation_active(pb::SetOrganisationActiveRequest {
            ods_code: ods,
            active,
        })
        .await?
        .into_inner()
        .organisation;
    Ok(org_rows(org.as_slice()))
}

/// The deliveries or the mailbox to redrive; neither is left for the
/// gateway to name as missing.
fn redrive_target(
    ids: Vec<u64>,
    mailbox: Option<String>,
) -> anyhow::Result<Option<pb::redrive_request::Target>> {
    use pb::redrive_request::Target;
    Ok(match (ids.is_empty(), mailbox) {
        (false, None) => Some(Target::Deliveries(pb::DeliveryIds { ids })),
        (true, Some(mailbox)) => Some(Target::Mailbox(mailbox)),
        (false, Some(_)) => anyhow::bail!("name the deliveries or a mailbox, not both"),
        (true, None) => None,
    })
}

fn redrive_rows(r: pb::RedriveResponse) -> Rows {
    let mut rows = Rows::new(&["delivery", "outcome", "state"]);
    for x in r.results {
        rows.push(json!({
            "delivery": x.delivery_id,
            "outcome": pb::RedriveOutcome::try_from(x.outcome)
                .map(|o| crate::grpc::enum_label(o.as_str_name()).to_owned())
                .unwrap_or_default(),
            "state": state(x.state),
        }));
    }
    rows
}

fn claimed_rows(claimed: Vec<pb::ClaimedDelivery>) -> Rows {
    let mut rows = Rows::new(&["delivery", "handover", "event"]);
    for c in claimed {
        rows.push(json!({
            "delivery": c.delivery_id,
            "handover": c.handover_id,
            "event": event(c.event),
        }));
    }
    rows
}

/// The one subject an audit trail query names.
fn trail_subject(
    handover: Option<u64>,
    nhs: Option<String>,
    prison_number: Option<String>,
) -> anyhow::Result<pb::audit_trail_request::Subject> {
    use pb::audit_trail_request::Subject;
    Ok(match (handover, nhs, prison_number) {
        (Some(h), None, None) => Subject::HandoverId(h),
        (None, Some(n), None) => Subject::NhsNumber(n),
        (None, None, Some(p)) => Subject::PrisonNumber(p),
        _ => anyhow::bail!("name one of --handover, --nhs or --prison-number"),
    })
}

/// What an empty table means, in words.
fn empty_message(command: &OperatorCommand) -> &'static str {
    match command {
        OperatorCommand::Mailboxes => "no mailbox has deliveries waiting or quarantined",
        OperatorCommand::Quarantine { .. } => "no quarantined deliveries",
        OperatorCommand::Redrive { .. } => "nothing to redrive",
        OperatorCommand::Parked => "no parked releases",
        OperatorCommand::Conflicts => "no identity conflicts",
        OperatorCommand::Claim { .. } => "nothing was claimed",
        OperatorCommand::Orgs => "no organisations registered",
        OperatorCommand::Trail { .. } => "no audit entries for this subject",
        _ => "nothing to show",
    }
}

fn when(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

fn age(ms: u64) -> String {
    match ms / 1_000 {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

fn state(s: i32) -> String {
    pb::DeliveryState::try_from(s)
        .map(|s| crate::grpc::enum_label(s.as_str_name()).to_owned())
        .unwrap_or_default()
}

fn event(e: i32) -> String {
    pb::JourneyEvent::try_from(e)
        .map(|e| crate::grpc::enum_label(e.as_str_name()).to_owned())
        .unwrap_or_default()
}

fn deliveries(list: &[pb::DeliveryInfo]) -> Rows {
    let mut rows = Rows::new(&[
        "delivery", "handover", "mailbox", "sender", "event", "state", "attempts", "urgent", "due",
        "overdue", "reason",
    ]);
    for d in list {
        rows.push(json!({
            "delivery": d.delivery_id,
            "handover": d.handover_id,
            "mailbox": d.mailbox,
            "sender": d.sender,
            "event": event(d.event),
            "state": state(d.state),
            "attempts": d.attempts,
            "urgent": d.urgent,
            "due": when(d.due_at.as_ref()),
            "overdue": d.overdue,
            "reason": d.reason,
        }));
    }
    rows
}

/// Parked releases, with what PDS said of each (when it was asked).
fn parked_rows(list: &pb::ListParkedResponse) -> Rows {
    let mut rows = deliveries(&list.deliveries);
    rows.columns.push("pds");
    for (row, d) in rows.rows.iter_mut().zip(&list.deliveries) {
        let finding = if crate::store::records::is_held_treatment_mailbox(&d.mailbox) {
            "not asked: a treatment copy waits for a service in the release area".to_owned()
        } else {
            list.pds_findings
                .iter()
                .find(|f| f.delivery_id == d.delivery_id)
                .map_or_else(|| "not looked up".to_owned(), |f| f.reason.clone())
        };
        row.insert("pds".into(), Value::String(finding));
    }
    rows
}

fn org_rows(list: &[pb::Organisation]) -> Rows {
    let mut rows = Rows::new(&[
        "ods",
        "kind",
        "name",
        "format",
        "region",
        "active",
        "mesh_mailbox",
    ]);
    for o in list {
        rows.push(json!({
            "ods": o.ods_code,
            "kind": pb::OrganisationKind::try_from(o.kind).map(|k| crate::grpc::enum_label(k.as_str_name()).to_owned()).unwrap_or_default(),
            "name": o.name,
            "format": pb::DocumentFormat::try_from(o.format).map(|f| f.as_str_name().to_owned()).unwrap_or_default(),
            "region": o.region,
            "mesh_mailbox": o.mesh_mailbox,
            "active": o.active,
        }));
    }
    rows
}

/// Most pages one table reads: far more than any real registry or queue
/// needs at the largest page, and a stop for a gateway that never ends a list.
const MAX_PAGES: usize = 10_000;

/// One page of a list call's answer.
trait Page {
    /// The token for the next page; empty on the last.
    fn next_token(&self) -> &str;
    /// Appends the next page's rows (and takes its token).
    fn append(&mut self, next: Self);
}

/// `Page` for answers whose rows are the named repeated fields.
macro_rules! page_of {
    ($($answer:ty => $($rows:ident),+;)+) => {$(
        impl Page for $answer {
            fn next_token(&self) -> &str {
                &self.next_page_token
            }
            fn append(&mut self, next: Self) {
                $(self.$rows.extend(next.$rows);)+
                self.next_page_token = next.next_page_token;
            }
        }
    )+};
}

page_of! {
    pb::ListMailboxesResponse => mailboxes;
    pb::ListQuarantineResponse => deliveries;
    pb::ListParkedResponse => deliveries, pds_findings;
    pb::ListIdentityConflictsResponse => conflicts;
    pb::ListOrganisationsResponse => organisations;
}

impl Page for pb::AuditTrailResponse {
    fn next_token(&self) -> &str {
        &self.next_page_token
    }
    fn append(&mut self, next: Self) {
        self.entries.extend(next.entries);
        self.chain_verified &= next.chain_verified;
        self.next_page_token = next.next_page_token;
    }
}

/// Every page of a list call, from the first to the one with no next
/// token: `call` asks for the page a token names (empty: the first).
///
/// # Errors
/// A call failed, or the list ran past [`MAX_PAGES`].
async fn all_pages<R: Page>(
    mut call: impl AsyncFnMut(String) -> Result<tonic::Response<R>, tonic::Status>,
) -> anyhow::Result<R> {
    let mut all = call(String::new()).await?.into_inner();
    for _ in 1..MAX_PAGES {
        if all.next_token().is_empty() {
            return Ok(all);
        }
        let next = call(all.next_token().to_owned()).await?.into_inner();
        all.append(next);
    }
    if !all.next_token().is_empty() {
        anyhow::bail!(
            "the list runs past {MAX_PAGES} pages; stopped without printing a partial table"
        );
    }
    Ok(all)
}

async fn list_mailboxes(op: &mut Operator, page_size: i32) -> anyhow::Result<Rows> {
    let all = all_pages(async |page_token| {
        op.list_mailboxes(pb::ListMailboxesRequest {
            page_size,
            page_token,
        })
        .await
    })
    .await?;
    Ok(mailbox_rows(all))
}

async fn list_quarantine(
    op: &mut Operator,
    page_size: i32,
    mailbox: Option<String>,
) -> anyhow::Result<Rows> {
    let mailbox = mailbox.unwrap_or_default();
    let all = all_pages(async |page_token| {
        op.list_quarantine(pb::ListQuarantineRequest {
            mailbox: mailbox.clone(),
            page_size,
            page_token,
        })
        .await
    })
    .await?;
    Ok(deliveries(&all.deliveries))
}

async fn list_parked(op: &mut Operator, page_size: i32) -> anyhow::Result<Rows> {
    let all = all_pages(async |page_token| {
        op.list_parked(pb::ListParkedRequest {
            page_size,
            page_token,
        })
        .await
    })
    .await?;
    Ok(parked_rows(&all))
}

async fn list_conflicts(op: &mut Operator, page_size: i32) -> anyhow::Result<Rows> {
    let all = all_pages(async |page_token| {
        op.list_identity_conflicts(pb::ListIdentityConflictsRequest {
            page_size,
            page_token,
        })
        .await
    })
    .await?;
    Ok(conflict_rows(all))
}

async fn list_organisations(op: &mut Operator, page_size: i32) -> anyhow::Result<Rows> {
    let all = all_pages(async |page_token| {
        op.list_organisations(pb::ListOrganisationsRequest {
            page_size,
            page_token,
        })
        .await
    })
    .await?;
    Ok(org_rows(&all.organisations))
}

/// The audit trail of one subject. Each page's read is itself audited under
/// the subject, so the trail grows by one entry a page: pages of at least
/// two entries reach its end.
async fn audit_trail(
    op: &mut Operator,
    page_size: i32,
    subject: pb::audit_trail_request::Subject,
    reason: String,
) -> anyhow::Result<Rows> {
    let page_size = if page_size == 0 { 0 } else { page_size.max(2) };
    let all = all_pages(async |page_token| {
        op.audit_trail(pb::AuditTrailRequest {
            subject: Some(subject.clone()),
            reason: reason.clone(),
            page_size,
            page_token,
        })
        .await
    })
    .await?;
    Ok(trail_rows(all))
}

async fn redrive(
    op: &mut Operator,
    ids: Vec<u64>,
    mailbox: Option<String>,
) -> anyhow::Result<Rows> {
    let by_mailbox = mailbox.is_some();
    let target = redrive_target(ids, mailbox)?;
    let mut all = pb::RedriveResponse::default();
    // One call redrives at most MAX_LIST of a mailbox's deliveries (the
    // contract says so): "every one" asks again until a call redrives
    // fewer, or none (bounded: a mailbox holds far fewer than this).
    for _ in 0..10_000 {
        let r = op
            .redrive(pb::RedriveRequest {
                target: target.clone(),
            })
            .await?
            .into_inner();
        let requeued = r
            .results
            .iter()
            .filter(|x| x.outcome() == pb::RedriveOutcome::Requeued)
            .count();
        let full = r.results.len() >= crate::handover::MAX_LIST;
        all.results.extend(r.results);
        if !by_mailbox || !full || requeued == 0 {
            break;
        }
    }
    Ok(redrive_rows(all))
}

async fn put_organisation(
    op: &mut Operator,
    organisation: pb::Organisation,
) -> anyhow::Result<Rows> {
    let org = op
        .put_organisation(pb::PutOrganisationRequest {
            organisation: Some(organisation),
        })
        .await?
        .into_inner()
        .organisation;
    Ok(org_rows(org.as_slice()))
}

/// Runs one operator call and prints its answer.
///
/// # Errors
/// The connection failed or the gateway refused the call (said as the
/// other commands say a refusal: what, its code and its message).
pub async fn run(args: OperatorArgs, command: OperatorCommand) -> anyhow::Result<()> {
    let what = format!("{command:?}")
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("the call")
        .to_lowercase();
    connect_and_call(args, command)
        .await
        .map_err(|e| match e.downcast::<tonic::Status>() {
            Ok(s) => anyhow::anyhow!("{what} refused ({:?}): {}", s.code(), s.message()),
            Err(e) => e,
        })
}

async fn connect_and_call(args: OperatorArgs, command: OperatorCommand) -> anyhow::Result<()> {
    let mut op = crate::cli::client::operator(&args.server, &args.certs_dir, &args.as_)
        .await
        .with_context(|| format!("connecting to {} as {}", args.server, args.as_))?;
    // The indicators have their own table, CSV and JSON (commissioners').
    if let OperatorCommand::Continuity {
        from,
        to,
        period_days,
        csv,
    } = command
    {
        let request = super::continuity::request(from.as_deref(), to.as_deref(), period_days)?;
        let response = op.get_continuity(request).await?.into_inner();
        return super::continuity::print(&response, args.json, csv);
    }
    let empty = empty_message(&command);
    let rows = call(&mut op, command, &args).await?;
    if rows.rows.is_empty() && !args.json {
        crate::outln!("{empty}")?;
        return Ok(());
    }
    rows.print(args.json)
}

/// Makes the call `command` names; its answer as rows (every page of a list).
async fn call(
    op: &mut Operator,
    command: OperatorCommand,
    args: &OperatorArgs,
) -> anyhow::Result<Rows> {
    let size = args.page_size;
    Ok(match command {
        OperatorCommand::Mailboxes => list_mailboxes(op, size).await?,
        OperatorCommand::Quarantine { mailbox } => list_quarantine(op, size, mailbox).await?,
        OperatorCommand::Redrive { mailbox, ids } => redrive(op, ids, mailbox).await?,
        OperatorCommand::Parked => list_parked(op, size).await?,
        OperatorCommand::Conflicts => list_conflicts(op, size).await?,
        OperatorCommand::Claim {
            nhs,
            prison_number,
            dob,
            practice,
            reason,
        } => {
            let patient = Some(pb::PatientRef {
                nhs_number: nhs,
                prison_number,
                date_of_birth: dob,
            });
            let request = pb::ClaimParkedRequest {
                patient,
                practice,
                reason,
            };
            claimed_rows(op.claim_parked(request).await?.into_inner().claimed)
        }
        OperatorCommand::Retention => retention_rows(
            op.retention_status(pb::RetentionStatusRequest {})
                .await?
                .into_inner(),
            args.json,
        )?,
        OperatorCommand::Continuity { .. } => unreachable!("printed by run"),
        OperatorCommand::Orgs => list_organisations(op, size).await?,
        OperatorCommand::OrgPut {
            ods,
            kind,
            name,
            format,
            region,
            mesh_mailbox,
        } => {
            let mut organisation = organisation(ods, &kind, name, &format, region)?;
            organisation.mesh_mailbox = mesh_mailbox;
            put_organisation(op, organisation).await?
        }
        OperatorCommand::OrgDisable { ods } | OperatorCommand::OrgEnable { ods }
            if ods.is_empty() =>
        {
            anyhow::bail!("name the organisation's ODS code")
        }
        OperatorCommand::OrgDisable { ods } => set_active(op, ods, false).await?,
        OperatorCommand::OrgEnable { ods } => set_active(op, ods, true).await?,
        OperatorCommand::Trail {
            handover,
            nhs,
            prison_number,
            reason,
        } => {
            let subject = trail_subject(handover, nhs, prison_number)?;
            audit_trail(op, size, subject, reason).await?
        }
    })
}

/// Where a stopped gateway's store, witness and audit key are: its
/// configuration file, with flags on top (as for `serve`).
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The gateway's TOML configuration (names the data and witness directories and keys).
    #[arg(long, env = "THROUGHCARE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory of a stopped gateway.
    #[arg(long, env = "THROUGHCARE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Witness directory (default `<data_dir>.witness`).
    #[arg(long, env = "THROUGHCARE_WITNESS_DIR")]
    pub witness_dir: Option<PathBuf>,
}

impl StoreArgs {
    fn config(&self) -> anyhow::Result<crate::config::Config> {
        Ok(crate::config::Config::load(
            self.config.as_deref(),
            &crate::config::Overrides {
                data_dir: self.data_dir.clone(),
                witness_dir: self.witness_dir.clone(),
                ..crate::config::Overrides::default()
            },
        )?)
    }
}

/// The audit trail of a gateway.
#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Check the chain of a stopped gateway against its audit key, its
    /// witness's signed checkpoint and any checkpoints recorded elsewhere;
    /// report the first broken link or how many entries are missing.
    Verify {
        /// Where the store is.
        #[command(flatten)]
        store: StoreArgs,
        /// A checkpoint recorded elsewhere (the JSON `admin audit anchor`
        /// printed); repeatable.
        #[arg(long)]
        checkpoint: Vec<PathBuf>,
    },
    /// Print every entry of a stopped gateway, one JSON object a line.
    List {
        /// Where the store is.
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the newest signed checkpoint in the witness as one JSON line, for
    /// an outside system to record (works while the gateway runs).
    Anchor {
        /// Where the store is.
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Decisions about a stopped gateway's store.
#[derive(Debug, Clone, Subcommand)]
pub enum StoreCommand {
    /// After a restore (or a lost witness): list the acknowledged handovers
    /// the witness knew of and the store lacks, so their senders can resend,
    /// then re-base the witness to what the store holds. Audited.
    AcceptRollback {
        /// Where the store is.
        #[command(flatten)]
        store: StoreArgs,
        /// Why (kept in the audit trail; 1 to 500 characters, no patient data).
        #[arg(long)]
        reason: String,
    },
    /// Read a stopped sled gateway's whole store into an export file, for
    /// `import` into PostgreSQL: payloads stay sealed, the file is
    /// checksummed and signed with the audit key (docs/store-engines.md).
    Export {
        /// The sled gateway's configuration.
        #[command(flatten)]
        store: StoreArgs,
        /// The export file to write (never replaced).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write an export file into the EMPTY PostgreSQL database the
    /// configuration names, in one transaction, with the sled gateway's
    /// master key and audit key.
    Import {
        /// The PostgreSQL gateway's configuration.
        #[command(flatten)]
        store: StoreArgs,
        /// The export file `export` wrote.
        #[arg(long = "from")]
        file: PathBuf,
    },
}

/// Runs an audit verb.
///
/// # Errors
/// The chain does not verify, or the store cannot be read.
pub async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    if let Some(done) = audit_on_postgres(&command).await {
        return done;
    }
    match command {
        AuditCommand::Verify { store, checkpoint } => {
            let config = store.config()?;
            let extra = read_checkpoints(&checkpoint)?;
            let v = crate::store::integrity::verify_audit(
                &config.data_dir,
                &config.store_witness(),
                &extra,
            )
            .context("audit chain does NOT verify")?;
            let anchors: Vec<String> = v
                .anchors
                .iter()
                .map(|(from, seq)| format!("{seq} entries anchored by {from}"))
                .collect();
            crate::outln!(
                "audit chain verifies: {} entries{} (keyed from entry {}; {})",
                v.entries,
                crate::store::integrity::cut_note(v.cut.as_ref()),
                v.keyed_from.map_or_else(|| "-".into(), |k| k.to_string()),
                anchors.join(", ")
            )?;
            Ok(())
        }
        AuditCommand::List { store } => {
            let config = store.config()?;
            for entry in crate::store::integrity::audit_entries(&config.data_dir)? {
                crate::outln!("{}", serde_json::to_string(&entry)?)?;
            }
            Ok(())
        }
        AuditCommand::Anchor { store } => {
            let config = store.config()?;
            let paths = crate::store::WitnessPaths::of(&config.data_dir, &config.store_witness());
            let (signed, verifies) = crate::store::integrity::latest_checkpoint(&paths)?;
            if verifies == Some(false) {
                anyhow::bail!(
                    "the witness's checkpoint is NOT signed by the audit key {}",
                    paths.key.display()
                );
            }
            crate::outln!("{}", serde_json::to_string(&signed)?)?;
            Ok(())
        }
    }
}

/// The checkpoints recorded elsewhere (`admin audit anchor`'s JSON line),
/// each with the file it came from.
fn read_checkpoints(
    paths: &[PathBuf],
) -> anyhow::Result<Vec<(String, crate::audit::SignedCheckpoint)>> {
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let signed: crate::audit::SignedCheckpoint = serde_json::from_str(text.trim())
                .with_context(|| format!("{} is not a checkpoint", path.display()))?;
            Ok((path.display().to_string(), signed))
        })
        .collect()
}

/// An audit verb on the PostgreSQL engine (docs/store-engines.md): the one
/// chain every node appends to, read from the database (the gateway may be
/// running). `None` when the configuration names sled.
async fn audit_on_postgres(command: &AuditCommand) -> Option<anyhow::Result<()>> {
    let store = match command {
        AuditCommand::Verify { store, .. }
        | AuditCommand::List { store }
        | AuditCommand::Anchor { store } => store,
    };
    let config = match store.config() {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    let pg = config.store.postgres()?;
    Some(audit_postgres(command, &config, &pg).await)
}

async fn audit_postgres(
    command: &AuditCommand,
    config: &crate::config::Config,
    pg: &crate::store::pg::PgOptions,
) -> anyhow::Result<()> {
    let anchors = match command {
        AuditCommand::Verify { checkpoint, .. } => read_checkpoints(checkpoint)?,
        _ => Vec::new(),
    };
    // Reading and checking the chain answers no caller: it may run while
    // the synchronous standby is away (the check is for serving OKs).
    let pg = crate::store::pg::PgOptions {
        require_synchronous_standby: false,
        ..pg.clone()
    };
    let store = crate::store::Store::open_postgres(
        &pg,
        config.store_witness(),
        std::sync::Arc::new(crate::store::SystemClock),
        &config.data_dir,
    )?;
    let outcome = match command {
        AuditCommand::List { .. } => store.audit_entries().map(|entries| {
            entries
                .iter()
                .map(|entry| serde_json::to_string(entry).unwrap_or_default() + "\n")
                .collect::<String>()
        }),
        AuditCommand::Anchor { .. } => {
            let pg = store.postgres().expect("a PostgreSQL store");
            pg.audit_checkpoint(crate::store::Clock::now_ms(&crate::store::SystemClock))
                .map(|signed| serde_json::to_string(&signed).unwrap_or_default() + "\n")
        }
        AuditCommand::Verify { .. } => {
            let pg = store.postgres().expect("a PostgreSQL store");
            pg.verify_audit_anchored(&anchors).map(|v| {
                format!(
                    "audit chain verifies: {} entries{} (one chain across every node; keyed from entry {}; {} checkpoint(s) held)\n",
                    v.entries,
                    crate::store::integrity::cut_note(v.cut.as_ref()),
                    v.keyed_from.map_or_else(|| "-".into(), |k| k.to_string()),
                    anchors.len(),
                )
            })
        }
    };
    store.close().await?;
    let text = outcome.context("audit chain does NOT verify")?;
    crate::out!("{text}")?;
    Ok(())
}

/// `accept-rollback` on PostgreSQL: the operator's audited decision to go
/// on from what the database holds after a node's witness refused it (a
/// restore from an older backup). The chain must verify; the decision is
/// an audit entry; then this node's witness records the new head.
async fn accept_rollback_postgres(
    config: &crate::config::Config,
    pg: &crate::store::pg::PgOptions,
    reason: &str,
) -> anyhow::Result<()> {
    let path = config.witness_dir().join(crate::store::pg::witness::FILE);
    let witness = std::fs::read(&path)
        .ok()
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok());
    let seen = witness.as_ref().and_then(|v| v["audit_seq"].as_u64());
    let seen_id = witness.as_ref().and_then(|v| v["last_id"].as_u64());
    // Opened without the witness check (that is what is being decided),
    // and without waiting for a standby a restore may not have yet.
    let options = crate::store::StoreOptions {
        witness_dir: None,
        ..config.store_witness()
    };
    let pg = crate::store::pg::PgOptions {
        require_synchronous_standby: false,
        ..pg.clone()
    };
    let store = crate::store::Store::open_postgres(
        &pg,
        options,
        std::sync::Arc::new(crate::store::SystemClock),
        &config.data_dir,
    )?;
    let outcome = async {
        let verified = store
            .verify_audit_from()
            .context("the database's audit chain does NOT verify: not a rollback to accept")?;
        let seen_text = seen.map_or_else(|| "no readable witness".to_owned(), |s| format!("entry {s}"));
        let pg_store = store.postgres().expect("a PostgreSQL store");
        let from = pg_store.ids_beyond_the_lost(seen_id.unwrap_or(0)).await?;
        store
            .record(crate::audit::AuditEvent {
                actor: local_actor(),
                action: "accept_rollback",
                outcome: format!(
                    "ok: went on from entry {} of the database's trail (this node's witness had seen {seen_text}); new ids from {}: {reason}",
                    verified.last,
                    from + 1
                ),
                ..crate::audit::AuditEvent::default()
            })
            .await?;
        pg_store.record_witness_to(path.clone()).await?;
        crate::outln!(
            "accepted: the database's trail ends at entry {}, this node's witness had seen {seen_text}; \
             the witness {} now records the new head; new ids start at {}. Ask senders to resend what they sent after the backup was taken.",
            verified.last + 1,
            path.display(),
            from + 1
        )?;
        anyhow::Ok(())
    }
    .await;
    store.close().await?;
    outcome
}

/// Who ran an offline verb, for the audit trail: the local account.
fn local_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let user: String = user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    format!("local:{user}")
}

/// Runs a store verb.
///
/// # Errors
/// The reason is refused, or the store cannot be opened or re-based.
pub async fn store(command: StoreCommand, json: bool) -> anyhow::Result<()> {
    match command {
        StoreCommand::AcceptRollback { store, reason } => {
            accept_rollback(&store, &reason, json).await
        }
        StoreCommand::Export { store, out } => {
            super::store_move::export(&store.config()?, &local_actor(), &out, json).await
        }
        StoreCommand::Import { store, file } => {
            super::store_move::import(&store.config()?, &local_actor(), &file, json).await
        }
    }
}

async fn accept_rollback(store: &StoreArgs, reason: &str, json: bool) -> anyhow::Result<()> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        anyhow::bail!("--reason: required, 1 to 500 characters saying why (no patient data)");
    }
    if let Some(what) = crate::handover::free_text::looks_like_patient_data(reason) {
        anyhow::bail!("--reason: must not contain patient data (it looks like {what})");
    }
    let config = store.config()?;
    if let Some(pg) = config.store.postgres() {
        return accept_rollback_postgres(&config, &pg, reason).await;
    }
    let rollback = crate::store::Store::accept_rollback(
        &config.data_dir,
        config.store_witness(),
        std::sync::Arc::new(crate::store::SystemClock),
        &local_actor(),
        reason,
    )
    .await
    .with_context(|| {
        format!(
            "opening {} (is the gateway stopped?)",
            config.data_dir.display()
        )
    })?;
    let mut rows = Rows::new(&["handover", "sender", "message_id", "accepted"]);
    for a in &rollback.missing {
        rows.push(json!({
            "handover": a.handover_id,
            "sender": a.sender,
            "message_id": a.message_id,
            "accepted": when(Some(&prost_types::Timestamp {
                seconds: a.at_ms.div_euclid(1_000),
                nanos: 0,
            })),
        }));
    }
    if json {
        return rows.print(true);
    }
    match &rollback.witness {
        Some(w) => crate::outln!(
            "the witness promised {} committed batches and {} audit entries{}; the store holds {} and {}",
            w.commit_seq,
            w.audit_seq,
            if rollback.witness_signed {
                ""
            } else {
                " (its signature does NOT verify)"
            },
            rollback.store_commit_seq,
            rollback.store_audit_seq
        )?,
        None => crate::outln!(
            "there was no readable witness: nothing records what the store should hold (it holds {} committed batches)",
            rollback.store_commit_seq
        )?,
    }
    crate::outln!(
        "missing: {} committed batches, {} audit entries, {} acknowledged handovers{}",
        rollback.missing_batches(),
        rollback.missing_audit_entries(),
        rollback.missing.len(),
        if rollback.missing.is_empty() {
            ""
        } else {
            " (ask each sender to resend its message id):"
        }
    )?;
    if !rollback.missing.is_empty() {
        rows.print(false)?;
    }
    if let Some(from) = rollback.journal_from_ms {
        crate::outln!(
            "(the witness's journal reaches back to {}; anything older cannot be listed)",
            when(Some(&prost_types::Timestamp {
                seconds: from.div_euclid(1_000),
                nanos: 0,
            }))
            .as_str()
            .unwrap_or("?")
        )?;
    }
    if let Some(from) = rollback.ids_from {
        crate::outln!(
            "new handover and delivery ids start at {from}: none handed out before the restore is handed out again"
        )?;
    }
    crate::outln!(
        "the witness now matches the store; recorded in the audit trail (accept_rollback)"
    )?;
    Ok(())
}
