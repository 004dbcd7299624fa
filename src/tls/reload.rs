//! Reloading the TLS files without a restart: a change to the CA,
//! certificate, key or CRL is noticed by its metadata and loaded whole.

use std::sync::{Arc, RwLock};

use super::material::{Material, TlsError, TlsFiles, config_with, load_material};
use super::verifier::{Presented, Remembering};

/// What identifies the files' contents: a change to any of them reloads.
type Fingerprint = Vec<Option<(std::time::SystemTime, u64, u64)>>;

fn fingerprint(files: &TlsFiles) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    [
        Some(&files.ca),
        Some(&files.cert),
        Some(&files.key),
        files.crl.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
    })
    .collect()
}

/// The TLS material in force, swappable without a restart: [`incoming`](super::incoming)
/// checks the files once a second and reloads when one changed.
#[derive(Clone)]
pub struct ReloadableConfig {
    files: TlsFiles,
    current: Arc<RwLock<Arc<Material>>>,
    seen: Arc<std::sync::Mutex<Fingerprint>>,
    /// Counts the configurations put in force. Every listener sharing this
    /// configuration re-checks its own open connections when it moves,
    /// whichever of them noticed the change.
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// Whether connections speak HTTP/2 (ALPN `h2`): gRPC does, MLLP not.
    h2: bool,
}

impl ReloadableConfig {
    /// Loads the configuration from `files`.
    ///
    /// # Errors
    /// As for [`server_config`].
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let seen = fingerprint(&files);
        let material = load_material(&files)?;
        warn_if_stale(&material);
        Ok(Self {
            files,
            current: Arc::new(RwLock::new(Arc::new(material))),
            seen: Arc::new(std::sync::Mutex::new(seen)),
            generation: Arc::default(),
            h2: true,
        })
    }

    /// Re-reads every file; on error the configuration in force stays.
    ///
    /// # Errors
    /// As for [`server_config`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let material = load_material(&self.files)?;
        warn_if_stale(&material);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// How many configurations have been put in force since loading.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reloads when any file changed since the last look (modification time,
    /// length or inode). A new configuration in force moves
    /// [`generation`](Self::generation), which is how every listener sharing
    /// the files learns of it.
    pub fn reload_if_changed(&self) {
        let now = fingerprint(&self.files);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return;
            }
            *seen = now;
        }
        match self.reload() {
            Ok(()) => tracing::info!("TLS files changed: new CA, certificate or CRL in force"),
            Err(e) => {
                tracing::error!(error = %e, "TLS files changed but cannot be loaded; the previous configuration stays in force");
            }
        }
    }

    pub(super) fn material(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A configuration for one connection, and where it will put the
    /// certificate the client presents.
    pub(super) fn for_connection(
        &self,
    ) -> Result<(Arc<rustls::ServerConfig>, Presented), TlsError> {
        let m = self.material();
        let presented = Presented::default();
        let verifier = Arc::new(Remembering {
            inner: m.verifier.clone(),
            presented: presented.clone(),
        });
        Ok((
            config_with(verifier, m.certified.clone(), self.h2)?,
            presented,
        ))
    }

    /// The same material for a listener that does not speak HTTP/2 (MLLP):
    /// no ALPN is offered.
    #[must_use]
    pub fn without_h2(mut self) -> Self {
        self.h2 = false;
        self
    }

    /// The files behind this configuration.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn warn_if_stale(m: &Material) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(next) = m.crl_next_update.filter(|t| *t < now) {
        tracing::warn!(
            overdue_s = now - next,
            "the CRL is past its nextUpdate; it is still enforced, but publish a fresh one"
        );
    }
}
