//! The registry of organisations: who an ODS code is, what kind of
//! organisation it is, and which document format its mailbox wants.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::clinical::{OdsCode, OrgKind};

/// The document format an organisation's mailbox receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The native protobuf `ClinicalSummary`.
    #[default]
    Native,
    /// FHIR R4 UK Core document Bundle (JSON).
    Fhir,
    /// HL7 v2.5.1 ADT.
    Hl7v2,
}

/// One registered organisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Organisation {
    /// ODS code, the organisation's identity in its certificate.
    pub ods: OdsCode,
    /// What kind of organisation it is.
    pub kind: OrgKind,
    /// Display name.
    pub name: String,
    /// The format its mailbox wants.
    #[serde(default)]
    pub format: Format,
    /// The region a probation service covers, or a prison's region (its
    /// releases go to the probation service of the same region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Disabled organisations cannot call and receive nothing.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub active: bool,
    /// Its MESH mailbox id: set, the gateway pushes its deliveries through
    /// MESH and takes MESH messages from that mailbox as this organisation's
    /// (the MESH edge); unset, it pulls over gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_mailbox: Option<String>,
}

/// Whether `id` can be a MESH mailbox id (letters and digits, 1 to 20).
#[must_use]
pub fn is_mesh_mailbox_id(id: &str) -> bool {
    (1..=20).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_true(b: &bool) -> bool {
    *b
}

/// Why a registry could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read.
    #[error("cannot read registry {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid registry.
    #[error("registry {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    organisation: Vec<Organisation>,
}

/// The organisations the gateway knows, by ODS code.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_code: BTreeMap<OdsCode, Organisation>,
}

impl Registry {
    /// A registry of these organisations.
    ///
    /// # Errors
    /// A code registered twice, or an organisation registered as an operator.
    pub fn new(orgs: impl IntoIterator<Item = Organisation>) -> Result<Self, String> {
        let mut by_code = BTreeMap::new();
        let mut mesh_mailboxes = std::collections::BTreeSet::new();
        for org in orgs {
            if let Some(mb) = &org.mesh_mailbox {
                if !is_mesh_mailbox_id(mb) {
                    return Err(format!(
                        "organisation {}: mesh_mailbox must be a MESH mailbox id (1 to 20 letters and digits)",
                        org.ods
                    ));
                }
                if !mesh_mailboxes.insert(mb.to_ascii_uppercase()) {
                    return Err(format!(
                        "MESH mailbox {mb} is registered twice: one mailbox names one organisation"
                    ));
                }
            }
            if org.kind == OrgKind::Operator {
                return Err(format!(
                    "organisation {} has kind operator; operators are identified by certificate, not registered",
                    org.ods
                ));
            }
            if let Some(previous) = by_code.insert(org.ods.clone(), org) {
                return Err(format!("ODS code {} is registered twice", previous.ods));
            }
        }
        Ok(Self { by_code })
    }

    /// Loads a registry from a TOML file of `[[organisation]]` tables.
    ///
    /// # Errors
    /// Unreadable file, bad TOML, or an inconsistent registry.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let invalid = |reason: String| RegistryError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let file: RegistryFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        Self::new(file.organisation).map_err(invalid)
    }

    /// The registry as TOML, in the form [`Registry::load`] reads.
    pub fn to_toml(&self) -> String {
        let file = RegistryFile {
            organisation: self.by_code.values().cloned().collect(),
        };
        toml::to_string(&file).unwrap_or_default()
    }

    /// The organisation with this code.
    pub fn get(&self, code: &OdsCode) -> Option<&Organisation> {
        self.by_code.get(code)
    }

    /// Adds or replaces an organisation (operator registry management).
    pub fn put(&mut self, org: Organisation) {
        self.by_code.insert(org.ods.clone(), org);
    }

    /// Every organisation, by code.
    pub fn iter(&self) -> impl Iterator<Item = &Organisation> {
        self.by_code.values()
    }

    /// The organisation whose MESH mailbox is `mailbox` (ids compare
    /// without regard to case, as MESH's do).
    pub fn by_mesh_mailbox(&self, mailbox: &str) -> Option<&Organisation> {
        self.by_code.values().find(|o| {
            o.mesh_mailbox
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(mailbox))
        })
    }
}

/// The registry shared by every call: read on each call, changed by operators.
#[derive(Debug, Default)]
pub struct SharedRegistry {
    inner: std::sync::RwLock<Registry>,
}

impl SharedRegistry {
    /// Shares `registry`.
    pub fn new(registry: Registry) -> Self {
        Self {
            inner: std::sync::RwLock::new(registry),
        }
    }

    /// The organisation with this code, as it is now.
    pub fn get(&self, code: &OdsCode) -> Option<Organisation> {
        self.read().get(code).cloned()
    }

    /// A read guard, for routing over the whole registry (never held across an await).
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds or replaces an organisation.
    pub fn put(&self, org: Organisation) {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(org);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_rejects_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.toml");
        std::fs::write(
            &path,
            "[[organisation]]\nods = \"YP001\"\nkind = \"prison\"\nname = \"HMP A\"\n\
             [[organisation]]\nods = \"YP001\"\nkind = \"prison\"\nname = \"HMP B\"\n",
        )
        .unwrap();
        let err = Registry::load(&path).unwrap_err().to_string();
        assert!(err.contains("registered twice"), "{err}");

        std::fs::write(
            &path,
            "[[organisation]]\nods = \"YP001\"\nkind = \"prison\"\nname = \"HMP A\"\nformat = \"hl7v2\"\n",
        )
        .unwrap();
        let reg = Registry::load(&path).unwrap();
        let org = reg.get(&"YP001".parse().unwrap()).unwrap();
        assert_eq!(org.format, Format::Hl7v2);
        let mesh = |code: &str, mb: &str| Organisation {
            mesh_mailbox: Some(mb.into()),
            ods: code.parse().unwrap(),
            ..org.clone()
        };
        let twice = Registry::new([mesh("YP001", "X26ABC3"), mesh("YP002", "x26abc3")]);
        assert!(twice.unwrap_err().contains("registered twice"));
        let bad = Registry::new([mesh("YP001", "X26/../1")]);
        assert!(bad.unwrap_err().contains("mesh_mailbox"));
        let one = Registry::new([mesh("YP001", "X26ABC3")]).unwrap();
        assert_eq!(
            one.by_mesh_mailbox("x26abc3").map(|o| o.ods.as_str()),
            Some("YP001")
        );
        let again = Registry::new(
            toml::from_str::<RegistryFile>(&reg.to_toml())
                .unwrap()
                .organisation,
        )
        .unwrap();
        assert_eq!(again.iter().count(), 1);
    }
}
