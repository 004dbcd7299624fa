//! `throughcare admin store export` and `admin store import`: a stopped sled
//! gateway's store moved to PostgreSQL through a checked export file
//! (docs/store-engines.md, "Moving a sled store to PostgreSQL").

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;

use crate::config::Config;
use crate::store::SystemClock;

/// Exports the sled store `config` names to `out`, as `actor`.
///
/// # Errors
/// The configuration names PostgreSQL; the store is in use, fails its
/// checks or cannot be exported yet; the file cannot be written.
pub async fn export(config: &Config, actor: &str, out: &Path, json: bool) -> anyhow::Result<()> {
    if config.store.postgres().is_some() {
        anyhow::bail!(
            "export reads a sled store, and this configuration names the PostgreSQL engine: give the sled gateway's configuration"
        );
    }
    let summary = crate::store::export::export(
        &config.data_dir,
        config.store_witness(),
        Arc::new(SystemClock),
        actor,
        out,
    )
    .await
    .context("store export refused")?;
    let h = &summary.header;
    if json {
        crate::outln!(
            "{}",
            json!({
                "file": summary.path,
                "sha256": summary.sha256,
                "carried": summary.carried,
                "not_carried": summary.not_carried,
                "audit_seq": h.audit_seq,
                "audit_hash": h.audit_hash,
                "last_handover_id": h.last_handover_id,
                "last_delivery_id": h.last_delivery_id,
            })
        )?;
        return Ok(());
    }
    crate::outln!(
        "exported the sled store in {} to {} (sha256 {}, signed with the audit key {})",
        config.data_dir.display(),
        summary.path.display(),
        summary.sha256,
        h.audit_public_key
    )?;
    print_counts("carried", &summary.carried)?;
    print_counts(
        "not carried (PostgreSQL finds it from the records or needs none: docs/store-engines.md)",
        &summary.not_carried,
    )?;
    crate::outln!(
        "audit chain: entries up to {} (the last records this export), head {}{}",
        h.audit_seq,
        h.audit_hash,
        if summary.carried.contains_key("audit_cut") {
            "; the earlier entries removed under the retention policy, behind the signed cut the file carries"
        } else {
            ""
        }
    )?;
    Ok(())
}

/// Imports the export file `file` into the PostgreSQL database `config`
/// names, as `actor`.
///
/// # Errors
/// The configuration names sled; a key file is missing; the file fails its
/// checks; the database is not empty or fails.
pub async fn import(config: &Config, actor: &str, file: &Path, json: bool) -> anyhow::Result<()> {
    let Some(pg) = config.store.postgres() else {
        anyhow::bail!(
            "import writes a PostgreSQL store, and this configuration names sled: give the configuration of the PostgreSQL gateway nodes"
        );
    };
    let summary = crate::store::export::import(
        &pg,
        config.store_witness(),
        Arc::new(SystemClock),
        &config.data_dir,
        actor,
        file,
    )
    .await
    .context("store import refused")?;
    if json {
        crate::outln!(
            "{}",
            json!({
                "file": file,
                "sha256": summary.sha256,
                "imported": summary.imported,
                "audit_from": summary.audit_from,
                "not_carried": summary.not_carried,
                "import_entry": summary.import_entry,
            })
        )?;
        return Ok(());
    }
    crate::outln!(
        "imported {} (sha256 {}) into PostgreSQL in one transaction",
        file.display(),
        summary.sha256
    )?;
    print_counts("imported", &summary.imported)?;
    print_counts(
        "not carried from sled (PostgreSQL finds it from the records or needs none: docs/store-engines.md)",
        &summary.not_carried,
    )?;
    let from = if summary.audit_from > 1 {
        " (the signed retention cut carried with them: the earlier ones were removed on sled)"
    } else {
        ""
    };
    crate::outln!(
        "audit chain: the sled store's entries {} to {}{from}, then this import's entry {} linked to them; `admin audit verify` checks it whole",
        summary.audit_from,
        summary.header.audit_seq,
        summary.import_entry
    )?;
    Ok(())
}

fn print_counts(title: &str, counts: &BTreeMap<String, u64>) -> anyhow::Result<()> {
    if counts.is_empty() {
        return Ok(());
    }
    crate::outln!("{title}:")?;
    for (kind, n) in counts {
        crate::outln!("  {kind:<26} {n:>10}")?;
    }
    Ok(())
}
