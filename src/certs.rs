//! The development PKI: a CA, a server certificate for `localhost`, client
//! certificates for invented organisations and an operator, and a registry
//! that matches them. **For development and tests only, never production.**
//!
//! Identity lives in the client certificate's SAN URI: `urn:ods:<ODS code>`
//! for organisations, `urn:operator:<name>` for operators.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::PublicKeyData;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::journey::{Format, OrgKind, Organisation, Registry};

/// Why certificates could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// File system failure.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failure.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The directory holds TLS files that are not a whole development PKI:
    /// they may be real, and are never overwritten.
    #[error(
        "{dir} holds {found} but not a whole development PKI; development certificates are \
         created only where none of its files are, never over real TLS material: name the \
         real files with tls.ca, tls.cert and tls.key (with dev_certs = false), or choose \
         an empty certs_dir"
    )]
    PartlyPresent {
        /// The directory.
        dir: PathBuf,
        /// The files found, by name.
        found: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertsError + '_ {
    move |source| CertsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The invented organisations of the dev PKI (see `certs/README.md`).
pub fn dev_organisations() -> Vec<Organisation> {
    let org = |ods: &str, kind, name: &str, format, region: Option<&str>| Organisation {
        ods: ods.parse().expect("dev ODS codes are valid"),
        kind,
        name: name.to_owned(),
        format,
        region: region.map(str::to_owned),
        active: true,
        mesh_mailbox: None,
    };
    vec![
        org(
            "YP001",
            OrgKind::Prison,
            "HMP Ashdown (invented)",
            Format::Native,
            Some("north"),
        ),
        org(
            "YP002",
            OrgKind::Prison,
            "HMP Brackenfield (invented)",
            Format::Native,
            None,
        ),
        org(
            "YG001",
            OrgKind::GpPractice,
            "Riverside Surgery (invented)",
            Format::Fhir,
            None,
        ),
        org(
            "YG002",
            OrgKind::GpPractice,
            "Hillview Medical Centre (invented)",
            Format::Hl7v2,
            None,
        ),
        org(
            "YPR01",
            OrgKind::Probation,
            "North Probation Region (invented)",
            Format::Native,
            Some("north"),
        ),
    ]
}

/// The operator of the dev PKI.
pub const DEV_OPERATOR: &str = "oncall";

/// The names in the dev server certificate: the loopback names, and the
/// compose service names (`gateway`, and `mesh-sandbox` of the `parties`
/// profile, which serves with the same development certificate;
/// docker/compose.yaml) so other containers on the compose network can reach
/// them by name.
pub const DEV_SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1", "gateway", "mesh-sandbox"];

/// Paths of the dev PKI files inside a directory.
#[derive(Debug, Clone)]
pub struct DevPaths {
    /// The directory.
    pub dir: PathBuf,
}

impl DevPaths {
    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The CA key.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// The server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// The server key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    /// The registry of the dev organisations.
    pub fn registry(&self) -> PathBuf {
        self.dir.join("registry.toml")
    }
    /// A client's certificate and key, by name (ODS code or `operator-<name>`).
    pub fn client(&self, name: &str) -> (PathBuf, PathBuf) {
        let clients = self.dir.join("clients");
        (
            clients.join(format!("{name}.pem")),
            clients.join(format!("{name}.key")),
        )
    }
}

/// The organisation named by every certificate this module makes.
const DEV_ORGANISATION: &str = "Throughcare development (not for production)";

/// A certificate authority that can issue certificates and CRLs.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    /// Serial number, for revocation.
    pub serial: Vec<u8>,
}

impl CertAuthority {
    /// A new CA with this common name, valid for ten years.
    ///
    /// # Errors
    /// Key or certificate generation failure.
    pub fn generate(common_name: &str) -> Result<Self, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, DEV_ORGANISATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key.
    ///
    /// # Errors
    /// Unreadable or unparsable files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CertsError> {
        let cert_pem = fs::read_to_string(cert).map_err(io(cert))?;
        let key_pem = fs::read_to_string(key).map_err(io(key))?;
        let key_pair = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)?;
        Ok(Self {
            issuer,
            cert_pem,
            key_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a server certificate for these DNS names and IP addresses.
    ///
    /// # Errors
    /// Generation failure.
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, CertsError> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        self.sign(params, now - Duration::days(1), now + Duration::days(825))
    }

    /// Issues a client certificate whose SAN URI is `uri`, valid in the given window.
    ///
    /// # Errors
    /// Generation failure or a URI that is not IA5.
    pub fn issue_client(
        &self,
        uri: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.distinguished_name.push(DnType::CommonName, uri);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, not_before, not_after)
    }

    /// Issues a client certificate for `uri` whose key usage extension
    /// names only `key_usages` (for checking what the gateway refuses).
    ///
    /// # Errors
    /// As for [`CertAuthority::issue_client`].
    pub fn issue_client_with_key_usages(
        &self,
        uri: &str,
        key_usages: Vec<KeyUsagePurpose>,
    ) -> Result<IssuedCert, CertsError> {
        self.issue_client_for(uri, key_usages, vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// A certificate for `uri` with these key usages and extended key
    /// usages (none: the extension left out), valid from yesterday for two
    /// years: for tests of certificates issued for another purpose.
    ///
    /// # Errors
    /// As for [`CertAuthority::issue_client`].
    pub fn issue_client_for(
        &self,
        uri: &str,
        key_usages: Vec<KeyUsagePurpose>,
        extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<IssuedCert, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.distinguished_name.push(DnType::CommonName, uri);
        params.key_usages = key_usages;
        params.extended_key_usages = extended_key_usages;
        let now = OffsetDateTime::now_utc();
        self.sign(params, now - Duration::days(1), now + Duration::days(730))
    }

    /// Issues a client certificate for `uri`, valid from yesterday for two years.
    ///
    /// # Errors
    /// As for [`CertAuthority::issue_client`].
    pub fn issue_client_now(&self, uri: &str) -> Result<IssuedCert, CertsError> {
        let now = OffsetDateTime::now_utc();
        self.issue_client(uri, now - Duration::days(1), now + Duration::days(730))
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, CertsError> {
        let key = KeyPair::generate()?;
        // Unique per CA: derived from the fresh key's public half.
        let mut serial = Sha256::digest(key.der_bytes())[..16].to_vec();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A CRL revoking these serial numbers, valid for a week.
    ///
    /// # Errors
    /// Generation failure.
    pub fn crl(&self, revoked: &[Vec<u8>]) -> Result<String, CertsError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(1),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from(u64::try_from(now.unix_timestamp()).unwrap_or(1)),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    fn write(&self, paths: &DevPaths) -> Result<(), CertsError> {
        write_file(&paths.ca_cert(), &self.cert_pem, false)?;
        write_file(&paths.ca_key(), &self.key_pem, true)
    }
}

/// Writes `contents` to `path`. A secret is owner-only from the moment it
/// exists (created with mode 0600, or narrowed before it is rewritten), so
/// there is no window in which a private key is readable by others.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertsError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
        if path.exists() {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io(path))?;
        }
    }
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(contents.as_bytes()).map_err(io(path))
}

/// The files of the dev PKI's top level.
fn dev_files(dir: &Path) -> [PathBuf; 5] {
    let p = DevPaths {
        dir: dir.to_owned(),
    };
    [
        p.ca_cert(),
        p.ca_key(),
        p.server_cert(),
        p.server_key(),
        p.registry(),
    ]
}

/// Whether the dev PKI in `dir` is complete.
pub fn dev_pki_present(dir: &Path) -> bool {
    dev_files(dir).iter().all(|f| f.exists())
}

/// Creates the dev PKI in `dir` unless it is there already. A directory
/// holding only some of its files (real TLS material has no CA key) is
/// refused, never written over.
///
/// # Errors
/// [`CertsError::PartlyPresent`], or as [`init_dev_pki`].
pub fn ensure_dev_pki(dir: &Path) -> Result<bool, CertsError> {
    let files = dev_files(dir);
    let found: Vec<String> = files
        .iter()
        .filter(|f| f.exists())
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if found.len() == files.len() {
        return Ok(false);
    }
    if !found.is_empty() {
        return Err(CertsError::PartlyPresent {
            dir: dir.to_owned(),
            found: found.join(", "),
        });
    }
    init_dev_pki(dir)?;
    Ok(true)
}

/// Whether a CA file's first certificate is one this module made for
/// development (its organisation says so).
pub fn is_dev_ca(pem: &[u8]) -> bool {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .any(|der| {
            x509_parser::parse_x509_certificate(&der).is_ok_and(|(_, cert)| {
                cert.subject()
                    .iter_organization()
                    .filter_map(|o| o.as_str().ok())
                    .any(|o| o == DEV_ORGANISATION)
            })
        })
}

/// Creates the dev PKI in `dir`: CA, server certificate, one client
/// certificate per dev organisation and one for the dev operator, and the
/// registry. Overwrites what is there.
///
/// # Errors
/// Generation or file system failure.
pub fn init_dev_pki(dir: &Path) -> Result<DevPaths, CertsError> {
    let paths = DevPaths {
        dir: dir.to_owned(),
    };
    let ca = CertAuthority::generate("Throughcare development CA")?;
    ca.write(&paths)?;
    let server = ca.issue_server(DEV_SERVER_NAMES)?;
    write_file(&paths.server_cert(), &server.cert_pem, false)?;
    write_file(&paths.server_key(), &server.key_pem, true)?;
    let orgs = dev_organisations();
    for org in &orgs {
        let issued = ca.issue_client_now(&format!("urn:ods:{}", org.ods))?;
        let (cert, key) = paths.client(org.ods.as_str());
        write_file(&cert, &issued.cert_pem, false)?;
        write_file(&key, &issued.key_pem, true)?;
    }
    let operator = ca.issue_client_now(&format!("urn:operator:{DEV_OPERATOR}"))?;
    let (cert, key) = paths.client(&format!("operator-{DEV_OPERATOR}"));
    write_file(&cert, &operator.cert_pem, false)?;
    write_file(&key, &operator.key_pem, true)?;
    let registry = Registry::new(orgs).expect("dev organisations are consistent");
    write_file(
        &paths.registry(),
        &format!(
            "# Invented organisations of the development PKI. Not real ODS codes.\n{}",
            registry.to_toml()
        ),
        false,
    )?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_server_certificate_names_the_compose_service() {
        let dir = tempfile::tempdir().unwrap();
        let paths = init_dev_pki(dir.path()).unwrap();
        let pem = fs::read(paths.server_cert()).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let dns: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect();
        assert!(dns.contains(&"localhost".to_owned()), "{dns:?}");
        let compose = include_str!("../docker/compose.yaml");
        assert!(
            compose.contains("\n  gateway:\n"),
            "the compose service is `gateway`"
        );
        assert!(dns.contains(&"gateway".to_owned()), "{dns:?}");
        assert!(
            compose.contains("\n  mesh-sandbox:\n"),
            "the compose service is `mesh-sandbox`"
        );
        assert!(dns.contains(&"mesh-sandbox".to_owned()), "{dns:?}");
    }
}
