//! `throughcare health`: asks a running gateway's gRPC health service
//! (`grpc.health.v1`) over mutual TLS with the certificate it is given, for
//! container health checks and load balancers' probes. Exit status 0 when
//! the answer is `SERVING`, 1 for anything else (no answer, refused,
//! `NOT_SERVING` while draining, an unknown service).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// `throughcare health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// Gateway address (the server certificate must name its host).
    #[arg(
        long,
        default_value = "https://localhost:7443",
        env = "THROUGHCARE_SERVER"
    )]
    pub server: String,
    /// CA certificate that issued the server's certificate (PEM).
    #[arg(long, env = "THROUGHCARE_HEALTH_CA")]
    pub ca: PathBuf,
    /// Client certificate to present (PEM): any identity the gateway knows.
    #[arg(long, env = "THROUGHCARE_HEALTH_CERT")]
    pub cert: PathBuf,
    /// The client certificate's key (PEM).
    #[arg(long, env = "THROUGHCARE_HEALTH_KEY")]
    pub key: PathBuf,
    /// The service to ask about; empty asks about the server as a whole.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long, ms (connect and answer together).
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
}

/// Asks once, prints the status on standard output, and turns it into the
/// exit status: success only for `SERVING`.
pub async fn run(args: HealthArgs) -> ExitCode {
    let timeout = Duration::from_millis(args.timeout_ms);
    match tokio::time::timeout(timeout, check(&args)).await {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(other)) => {
            println!("{}", other.as_str_name());
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("unhealthy: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("unhealthy: no answer within {} ms", args.timeout_ms);
            ExitCode::FAILURE
        }
    }
}

async fn check(args: &HealthArgs) -> anyhow::Result<ServingStatus> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let channel = crate::tls::client_channel(
        &args.server,
        &read(&args.ca)?,
        &read(&args.cert)?,
        &read(&args.key)?,
    )
    .await
    .with_context(|| format!("connecting to {}", args.server))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
    Ok(ServingStatus::try_from(answer.into_inner().status).unwrap_or(ServingStatus::Unknown))
}
