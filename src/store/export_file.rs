//! The store export file: how a stopped sled store travels to PostgreSQL
//! (`admin store export` / `admin store import`, docs/store-engines.md).
//!
//! # Layout (version 1)
//! JSON Lines, one [`Line`] a line, tagged by `kind`:
//!
//! | line | what |
//! |------|------|
//! | `header` | format, version, source engine, who and when, the last ids handed out, the audit chain's head |
//! | `registry` | an operator's registry record (the stored bytes, base64) |
//! | `handover` | a [`HandoverRecord`] with its payload *sealed* (base64) and its data key wrapped by the master key (base64); both absent once shredded |
//! | `delivery` | a [`DeliveryRecord`], state, attempt and lease as they were |
//! | `identity`, `patient`, `lineage`, `conflict` | the identity links (keyed hashes only) |
//! | `tombstone` | what retention removed (kept in the file; not imported yet) |
//! | `audit` | an audit entry, the exact bytes the chain hashes |
//! | `summary` | how many of each the file holds, and what the source held that the file does not carry |
//! | `end` | SHA-256 of every byte before it, and an Ed25519 signature of that digest by the audit key |
//!
//! # Invariants
//! - No payload is ever in clear and no data key unwrapped: the file holds
//!   what the database will hold, no more (the master key stays out of it).
//! - A file is complete only with its `end` line: it is written as
//!   `<name>.partial`, synced, then renamed. A reader checks the digest and
//!   the signature before it reads a single record, so a truncated, changed
//!   or foreign file is refused whole.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::StoreError;
use super::mesh::MeshRecord;
use super::records::{DeliveryRecord, HandoverRecord, IdentityConflict, PatientRecord, Tombstone};
use crate::audit::{AuditKey, SignedAuditCut, hex};

/// The `format` of a header.
pub const FORMAT: &str = "throughcare store export";
/// The version this build writes and reads. Version 2 added the retention
/// state (the signed audit cut, identity checks, counters) and the MESH
/// records; version 1 files are refused by name (docs/store-engines.md).
pub const VERSION: u32 = 2;
/// The label the `end` line's signature is made under.
const SIGNATURE_LABEL: &str = "throughcare store export v1";

/// Why a move between engines did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The sled store is open in another process.
    #[error(
        "the sled store in {0} is in use (is its gateway running?): stop the gateway first; an export reads a stopped store only"
    )]
    InUse(PathBuf),
    /// The target database already holds a store.
    #[error(
        "the database is not empty ({0}): an import goes into a new, empty database only, so that its ids, its queues and its audit chain are the sled store's and nothing else's; nothing was imported"
    )]
    NotEmpty(String),
    /// The export file is not one this build can import.
    #[error("export file {path}: {why}; nothing was imported")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The source store cannot be exported as it is.
    #[error("{0}; nothing was exported")]
    Unsupported(String),
    /// A key file the move needs is not there.
    #[error(
        "{what} {} does not exist: give the PostgreSQL nodes the sled gateway's key files first (the same master key and audit key)",
        path.display()
    )]
    MissingKey {
        /// Which key.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The engine it was read from (`sled`).
    pub source: String,
    /// When, ms since the epoch.
    pub exported_at_ms: i64,
    /// Who ran the export.
    pub exported_by: String,
    /// The last handover id the source handed out (ids are never reused).
    pub last_handover_id: u64,
    /// The last delivery id the source handed out.
    pub last_delivery_id: u64,
    /// The audit chain's last entry as exported (its own export entry).
    pub audit_seq: u64,
    /// That entry's hash: the import's own entry links to it.
    pub audit_hash: String,
    /// The audit key's public key (hex), so an operator can see which key
    /// signed the file.
    pub audit_public_key: String,
}

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// See [`Header`].
    Header(Header),
    /// An operator's registry record.
    Registry {
        /// ODS code.
        code: String,
        /// The stored bytes, base64.
        record: String,
    },
    /// A handover and its sealed payload.
    Handover {
        /// The record.
        record: HandoverRecord,
        /// Its data key wrapped by the master key, base64; absent once shredded.
        data_key: Option<String>,
        /// The sealed payload, base64; absent once shredded.
        sealed: Option<String>,
    },
    /// A delivery.
    Delivery {
        /// The record.
        record: DeliveryRecord,
    },
    /// An identifier's keyed hash and the patient it resolves to.
    Identity {
        /// Keyed hash of one identifier.
        identifier: String,
        /// The patient key.
        patient_key: String,
    },
    /// A patient's links.
    Patient {
        /// The patient key.
        patient_key: String,
        /// Its identifiers and aliases.
        record: PatientRecord,
    },
    /// The latest handover per (patient, sender, event).
    Lineage {
        /// The patient key.
        patient_key: String,
        /// The sender.
        sender: String,
        /// The event, as named in the records.
        event: String,
        /// The latest handover.
        handover_id: u64,
    },
    /// A refused identity link.
    Conflict {
        /// The record.
        record: IdentityConflict,
    },
    /// What retention removed.
    Tombstone {
        /// The record.
        record: Tombstone,
    },
    /// The signed cut the audit chain verifies from, once entries past the
    /// audit period were removed (at most one line).
    AuditCut {
        /// As the sled store keeps it, signed with the audit key.
        cut: SignedAuditCut,
    },
    /// A patient left with nothing tracked: their identity links and
    /// lineage are checked again (and removed) then.
    IdentityExpiry {
        /// The patient key.
        patient_key: String,
        /// When, ms since the epoch.
        due_ms: i64,
    },
    /// The retention counters operators see (one line).
    RetentionCounters {
        /// Payloads shredded so far.
        payloads_shredded: u64,
        /// Handovers whose tracking metadata was removed so far.
        metadata_removed: u64,
        /// Identity records removed so far.
        identity_removed: u64,
    },
    /// What the MESH edge did with a delivery it pushes.
    Mesh {
        /// The record.
        record: MeshRecord,
    },
    /// An audit entry.
    Audit {
        /// The exact bytes the chain hashes.
        entry: String,
    },
    /// Counts: what the file holds and what it leaves behind.
    Summary {
        /// Records in the file, by kind (deliveries by state).
        carried: BTreeMap<String, u64>,
        /// What the source held that the file does not carry, and why is
        /// in docs/store-engines.md.
        not_carried: BTreeMap<String, u64>,
    },
    /// The digest of every byte before it, signed.
    End {
        /// SHA-256, hex.
        sha256: String,
        /// Ed25519 over the digest under [`SIGNATURE_LABEL`], hex.
        signature: String,
    },
}

/// Base64 of stored bytes.
pub fn b64(bytes: &[u8]) -> String {
    data_encoding::BASE64.encode(bytes)
}

/// Bytes from [`b64`].
///
/// # Errors
/// Not base64.
pub fn un_b64(text: &str) -> Result<Vec<u8>, StoreError> {
    data_encoding::BASE64
        .decode(text.as_bytes())
        .map_err(|_| StoreError::Corrupt("export file: a value is not base64".into()))
}

/// Writes an export file line by line, hashing as it goes.
///
/// A writer dropped before [`ExportWriter::finish`] (an export that failed
/// part-way) removes its partial file: it holds payloads with their keys
/// wrapped under the master key, which key-epoch shredding cannot reach.
pub struct ExportWriter {
    out: Option<BufWriter<std::fs::File>>,
    hasher: Sha256,
    partial: PathBuf,
    dest: PathBuf,
}

impl ExportWriter {
    /// Starts `dest` (as `dest.partial`, mode 0600). Refuses to replace a
    /// file that exists.
    ///
    /// # Errors
    /// `dest` (or a partial one) exists; I/O.
    pub fn create(dest: &Path) -> Result<Self, StoreError> {
        if dest.exists() {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists: an export never replaces a file", dest.display()),
            )));
        }
        let mut partial = dest.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let mut opts = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = opts
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("creating {}: {e}", partial.display()))
            })?;
        Ok(Self {
            out: Some(BufWriter::new(file)),
            hasher: Sha256::new(),
            partial,
            dest: dest.to_path_buf(),
        })
    }

    /// Appends one line.
    ///
    /// # Errors
    /// I/O.
    pub fn line(&mut self, line: &Line) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec(line)
            .map_err(|e| StoreError::Corrupt(format!("export line: {e}")))?;
        bytes.push(b'\n');
        self.hasher.update(&bytes);
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("the export file is closed".into()))?;
        out.write_all(&bytes)?;
        Ok(())
    }

    /// Signs and ends the file, syncs it and gives it its name; returns
    /// its digest (hex).
    ///
    /// # Errors
    /// I/O.
    pub fn finish(mut self, key: &AuditKey) -> Result<String, StoreError> {
        let digest = self.hasher.clone().finalize();
        let end = Line::End {
            sha256: hex(&digest),
            signature: key.sign_labelled(SIGNATURE_LABEL, &digest),
        };
        self.line(&end)?;
        let out = self
            .out
            .take()
            .ok_or_else(|| StoreError::Unavailable("the export file is closed".into()))?;
        let named = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .and_then(|()| std::fs::rename(&self.partial, &self.dest));
        if let Err(e) = named {
            // Not finished: the partial file goes, as when dropped unfinished.
            let _ = std::fs::remove_file(&self.partial);
            return Err(e.into());
        }
        if let Some(parent) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(hex(&digest))
    }
}

impl Drop for ExportWriter {
    fn drop(&mut self) {
        // Still open: not finished (a finished one is renamed first).
        if self.out.take().is_some()
            && let Err(e) = std::fs::remove_file(&self.partial)
        {
            tracing::warn!(
                path = %self.partial.display(),
                error = %e,
                "a failed export's partial file could not be removed: delete it"
            );
        }
    }
}

/// What a checked file says of itself.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Its header.
    pub header: Header,
    /// Its summary: (carried, not carried).
    pub carried: BTreeMap<String, u64>,
    /// What the source held and the file does not carry.
    pub not_carried: BTreeMap<String, u64>,
    /// The digest of its content, hex.
    pub sha256: String,
}

/// Reads the whole file once: the digest must match, the signature must be
/// the audit key's, the header and summary must be there. Nothing is
/// imported from a file that fails any of it.
///
/// # Errors
/// [`MoveError::File`] naming what is wrong.
pub fn check(path: &Path, key: &AuditKey) -> Result<Checked, MoveError> {
    let bad = |why: String| MoveError::File {
        path: path.to_path_buf(),
        why,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
    let mut hasher = Sha256::new();
    let (mut header, mut summary, mut end) = (None, None, None);
    for (n, raw) in split_lines(BufReader::new(file)).enumerate() {
        let raw = raw.map_err(|e| bad(format!("cannot be read: {e}")))?;
        if end.is_some() {
            return Err(bad("it goes on after its end line".into()));
        }
        // Records are parsed when imported; here only the lines that frame
        // them (the digest covers the rest).
        let framing = n == 0
            || [b"{\"kind\":\"summary\"".as_slice(), b"{\"kind\":\"end\""]
                .iter()
                .any(|p| raw.starts_with(p));
        if !framing {
            hasher.update(&raw);
            continue;
        }
        match parse(&raw).map_err(|e| bad(format!("line {}: {e}", n + 1)))? {
            Line::Header(h) if n == 0 => header = Some(h),
            _ if n == 0 => return Err(bad("it does not start with a header".into())),
            Line::End { sha256, signature } => end = Some((sha256, signature)),
            Line::Summary {
                carried,
                not_carried,
            } => summary = Some((carried, not_carried)),
            _ => {}
        }
        if end.is_none() {
            hasher.update(&raw);
        }
    }
    let header = header.ok_or_else(|| bad("it is empty".into()))?;
    if header.format == FORMAT && header.version == 1 {
        return Err(bad(format!(
            "it is `{FORMAT}` version 1, written by an older build that left the tombstones, the MESH records, the identity checks and the retention counters behind; export the stopped sled store again with this build (version {VERSION})"
        )));
    }
    if header.format != FORMAT || header.version != VERSION {
        return Err(bad(format!(
            "it is `{}` version {}; this build reads `{FORMAT}` version {VERSION}",
            header.format, header.version
        )));
    }
    let (sha256, signature) =
        end.ok_or_else(|| bad("it has no end line (cut short, or still being written)".into()))?;
    let digest = hasher.finalize();
    if hex(&digest) != sha256 {
        return Err(bad(
            "its content does not match the SHA-256 its end line records (changed or damaged)"
                .into(),
        ));
    }
    if !key.verifies_labelled(SIGNATURE_LABEL, &digest, &signature) {
        return Err(bad(format!(
            "it is not signed by this configuration's audit key (public key {}; the file names {}): the PostgreSQL nodes must use the sled gateway's audit key, or the file was made elsewhere",
            key.public_key_hex(),
            header.audit_public_key
        )));
    }
    let (carried, not_carried) = summary.ok_or_else(|| bad("it has no summary line".into()))?;
    Ok(Checked {
        header,
        carried,
        not_carried,
        sha256,
    })
}

/// Every record of a checked file, in order, bar its header, summary and
/// end. Call it from a blocking thread.
///
/// # Errors
/// I/O, or a line that does not parse.
pub fn records(path: &Path) -> Result<impl Iterator<Item = Result<Line, StoreError>>, StoreError> {
    let file = std::fs::File::open(path)?;
    Ok(split_lines(BufReader::new(file))
        .map(|raw| parse(&raw?))
        .filter(|line| {
            !matches!(
                line,
                Ok(Line::Header(_) | Line::Summary { .. } | Line::End { .. })
            )
        }))
}

/// [`records`], hashing the lines as [`check`] does: when the file no longer
/// has the digest `sha256` (hex) it was checked with (it was replaced or
/// changed between the check and the import), the last item is an error,
/// so an import in one transaction writes nothing of it.
///
/// # Errors
/// The file cannot be opened.
pub fn records_checked(
    path: &Path,
    sha256: &str,
) -> Result<impl Iterator<Item = Result<Line, StoreError>>, StoreError> {
    let file = std::fs::File::open(path)?;
    let mut lines = split_lines(BufReader::new(file));
    let mut hasher = Some(Sha256::new());
    let expected = sha256.to_owned();
    let changed = || {
        StoreError::Corrupt(
            "the export file changed after it was checked (its digest differs): nothing imported"
                .into(),
        )
    };
    Ok(std::iter::from_fn(move || {
        loop {
            let raw = match lines.next() {
                Some(Ok(raw)) => raw,
                Some(Err(e)) => {
                    hasher = None;
                    return Some(Err(e.into()));
                }
                // The end, without an end line: compare what was read.
                None => {
                    let digest = hex(&hasher.take()?.finalize());
                    return (digest != expected).then(|| Err(changed()));
                }
            };
            hasher.as_ref()?;
            let line = parse(&raw);
            if let Ok(Line::End { .. }) = line {
                let digest = hex(&hasher.take()?.finalize());
                return (digest != expected).then(|| Err(changed()));
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&raw);
            }
            if !matches!(line, Ok(Line::Header(_) | Line::Summary { .. })) {
                return Some(line);
            }
        }
    }))
}

/// Lines with their `\n` (the bytes the digest covers).
fn split_lines(mut reader: impl BufRead) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    std::iter::from_fn(move || {
        let mut buf = Vec::new();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => Some(Ok(buf)),
            Err(e) => Some(Err(e)),
        }
    })
}

fn parse(raw: &[u8]) -> Result<Line, StoreError> {
    // The error names the field, never a value (records hold keyed hashes
    // only, but a damaged line could hold anything).
    serde_json::from_slice(raw).map_err(|e| {
        StoreError::Corrupt(format!(
            "not a record of this format (line column {})",
            e.column()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            format: FORMAT.into(),
            version: VERSION,
            source: "sled".into(),
            exported_at_ms: 1,
            exported_by: "local:test".into(),
            last_handover_id: 0,
            last_delivery_id: 0,
            audit_seq: 0,
            audit_hash: crate::audit::GENESIS.into(),
            audit_public_key: String::new(),
        }
    }

    fn write(path: &Path, key: &AuditKey) {
        write_as(path, key, header());
    }

    fn write_as(path: &Path, key: &AuditKey, header: Header) {
        let mut w = ExportWriter::create(path).unwrap();
        w.line(&Line::Header(header)).unwrap();
        w.line(&Line::Audit {
            entry: "{\"seq\":1}".into(),
        })
        .unwrap();
        w.line(&Line::Summary {
            carried: BTreeMap::from([("audit_entries".into(), 1)]),
            not_carried: BTreeMap::new(),
        })
        .unwrap();
        w.finish(key).unwrap();
    }

    /// An export that fails part-way leaves no file behind: the partial one
    /// holds payloads with their keys wrapped under the master key.
    #[test]
    fn an_export_that_fails_part_way_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.export");
        let mut w = ExportWriter::create(&path).unwrap();
        w.line(&Line::Header(header())).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A finished one keeps its file, and only it.
        write(&path, &AuditKey::from_secret(&[1; 32]));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["store.export"]);
    }

    /// The import reads the file again after checking it: read with the
    /// digest it was checked with, a file changed since ends in an error
    /// (it was imported as it then was).
    #[test]
    fn a_file_changed_after_its_check_ends_its_records_in_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::from_secret(&[1; 32]);
        let path = dir.path().join("store.export");
        write(&path, &key);
        let sha = check(&path, &key).unwrap().sha256;
        let read: Vec<_> = records_checked(&path, &sha).unwrap().collect();
        assert_eq!(read.len(), 1, "{read:?}");
        assert!(read[0].is_ok());
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"seq\\\":1", "\"seq\\\":2")).unwrap();
        let read: Vec<_> = records_checked(&path, &sha).unwrap().collect();
        assert_eq!(read.len(), 2, "{read:?}");
        assert!(read[0].is_ok());
        let last = read[1].as_ref().unwrap_err().to_string();
        assert!(last.contains("changed after it was checked"), "{last}");
    }

    #[test]
    fn a_file_is_refused_whole_when_changed_cut_short_or_signed_by_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::from_secret(&[1; 32]);
        let path = dir.path().join("store.export");
        write(&path, &key);
        assert!(
            ExportWriter::create(&path).is_err(),
            "never replaces a file"
        );
        let checked = check(&path, &key).unwrap();
        assert_eq!(checked.carried["audit_entries"], 1);
        let lines: Vec<Line> = records(&path).unwrap().map(Result::unwrap).collect();
        assert_eq!(lines.len(), 1, "only the records: {lines:?}");
        let why = |e: MoveError| e.to_string();
        let other = AuditKey::from_secret(&[2; 32]);
        assert!(why(check(&path, &other).unwrap_err()).contains("not signed"));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"seq\\\":1", "\"seq\\\":2")).unwrap();
        assert!(why(check(&path, &key).unwrap_err()).contains("does not match"));
        let cut: Vec<&str> = text.lines().take(3).collect();
        std::fs::write(&path, cut.join("\n") + "\n").unwrap();
        assert!(why(check(&path, &key).unwrap_err()).contains("no end line"));
    }

    #[test]
    fn a_version_1_file_is_refused_by_name_even_when_signed() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::from_secret(&[1; 32]);
        let path = dir.path().join("old.export");
        write_as(
            &path,
            &key,
            Header {
                version: 1,
                ..header()
            },
        );
        let why = check(&path, &key).unwrap_err().to_string();
        assert!(why.contains("version 1"), "{why}");
        assert!(why.contains("export the stopped sled store again"), "{why}");
        let path = dir.path().join("newer.export");
        write_as(
            &path,
            &key,
            Header {
                version: VERSION + 1,
                ..header()
            },
        );
        let why = check(&path, &key).unwrap_err().to_string();
        assert!(why.contains(&format!("version {}", VERSION + 1)), "{why}");
    }
}
