//! The client side: a mutual-TLS channel to the gateway.

use std::time::Duration;

/// A client channel over mutual TLS to `endpoint` (`https://127.0.0.1:port`),
/// for the built-in client, benches and tests.
///
/// # Errors
/// Bad PEM or a failed connection.
pub async fn client_channel(
    endpoint: &str,
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let endpoint = Endpoint::from_shared(endpoint.to_owned())?;
    // The server must hold a certificate for the host the endpoint names
    // (an address or a name), not for whatever name suits: a certificate of
    // the same CA issued to another host must not pass for the gateway.
    let host = endpoint
        .uri()
        .host()
        .unwrap_or("localhost")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = ClientTlsConfig::new()
        .domain_name(host)
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem));
    endpoint
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}
