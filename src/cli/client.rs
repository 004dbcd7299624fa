//! A small client over mutual TLS using the dev PKI's files: the built-in
//! `submit`/`pull`/`track` commands, the bench and the tests use it.

use std::path::Path;

use crate::certs::DevPaths;
use crate::grpc::pb::handover_service_client::HandoverServiceClient;
use crate::grpc::pb::operator_service_client::OperatorServiceClient;

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The connection failed.
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A channel to `endpoint` as the dev PKI client `name` (an ODS code or
/// `operator-<name>`), trusting the dev CA in `certs_dir`.
///
/// # Errors
/// Missing files or a failed connection.
pub async fn channel(
    endpoint: &str,
    certs_dir: &Path,
    name: &str,
) -> Result<tonic::transport::Channel, ClientError> {
    let paths = DevPaths {
        dir: certs_dir.to_owned(),
    };
    let (cert, key) = paths.client(name);
    Ok(crate::tls::client_channel(
        endpoint,
        &read(&paths.ca_cert())?,
        &read(&cert)?,
        &read(&key)?,
    )
    .await?)
}

/// A handover client as the dev PKI client `name`.
///
/// # Errors
/// As for [`channel`].
pub async fn handover(
    endpoint: &str,
    certs_dir: &Path,
    name: &str,
) -> Result<HandoverServiceClient<tonic::transport::Channel>, ClientError> {
    Ok(
        HandoverServiceClient::new(channel(endpoint, certs_dir, name).await?)
            .max_decoding_message_size(256 * 1024 * 1024),
    )
}

/// An operator client as the dev PKI client `name` (`operator-<name>`).
///
/// # Errors
/// As for [`channel`].
pub async fn operator(
    endpoint: &str,
    certs_dir: &Path,
    name: &str,
) -> Result<OperatorServiceClient<tonic::transport::Channel>, ClientError> {
    Ok(OperatorServiceClient::new(
        channel(endpoint, certs_dir, name).await?,
    ))
}

/// A submit of `summary` as the native document, naming `to` (may be empty:
/// the journey rules route it).
pub fn native_submit(
    message_id: &str,
    event: crate::grpc::pb::JourneyEvent,
    to: &[&str],
    summary: &crate::clinical::ClinicalSummary,
) -> crate::grpc::pb::SubmitRequest {
    use crate::grpc::pb;
    pb::SubmitRequest {
        message_id: message_id.into(),
        event: event.into(),
        patient: None,
        destinations: to.iter().map(|d| (*d).to_owned()).collect(),
        document: Some(pb::submit_request::Document::Native(
            crate::grpc::summary::to_wire(summary),
        )),
    }
}
