//! The built-in MLLP sender (the demo's integration engine): one framed
//! message over mutual TLS with a dev PKI identity, and the ACK back.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::certs::DevPaths;
use crate::mllp::frame::{self, FrameReader};

/// A TLS client configuration presenting dev PKI identity `name` from `certs`.
fn client_config(certs: &Path, name: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let paths = DevPaths {
        dir: certs.to_owned(),
    };
    let (cert, key) = paths.client(name);
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(&paths.ca_cert())?) {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_slice_iter(&read(&cert)?).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&read(&key)?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?,
    ))
}

/// Sends each of `messages` as `name` to the MLLP listener at `addr` on one
/// connection; returns each ACK's text.
///
/// # Errors
/// Unreadable dev PKI files, a refused connection, or no ACK.
pub async fn send(
    addr: SocketAddr,
    certs: &Path,
    name: &str,
    messages: &[&str],
) -> anyhow::Result<Vec<String>> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to MLLP at {addr}"))?;
    let connector = tokio_rustls::TlsConnector::from(client_config(certs, name)?);
    let mut tls = connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .context("MLLP TLS handshake")?;
    let mut reader = FrameReader::new(1 << 20);
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        frame::write(&mut tls, m.as_bytes()).await?;
        let ack = reader
            .next(&mut tls)
            .await?
            .context("the gateway closed the connection without an ACK")?;
        acks.push(String::from_utf8(ack)?);
    }
    Ok(acks)
}
