//! Every OK to a submit (and to an AckBatch) comes after a completed
//! fdatasync: the real binary runs under `strace`, a client makes sequential
//! calls, and for each one an fdatasync must have *returned* between the
//! request leaving the client
//! and the OK arriving. Skipped (with a note) where strace is not installed;
//! `tests/run` installs it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support;

const BIN: &str = env!("CARGO_BIN_EXE_throughcare");

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Completion times of successful fdatasync/fsync calls in an `strace -f -ttt -T` log.
fn sync_completions(log: &str) -> Vec<f64> {
    let mut done = Vec::new();
    for line in log.lines() {
        let mut parts = line.split_whitespace();
        let (Some(_pid), Some(ts)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(ts) = ts.parse::<f64>() else { continue };
        let rest: String = parts.collect::<Vec<_>>().join(" ");
        let is_sync = rest.starts_with("fdatasync(")
            || rest.starts_with("fsync(")
            || rest.starts_with("<... fdatasync resumed>")
            || rest.starts_with("<... fsync resumed>");
        if !is_sync || rest.contains("<unfinished") || !rest.contains(") = 0") {
            continue;
        }
        let took = rest
            .rsplit_once('<')
            .and_then(|(_, t)| t.trim_end_matches('>').parse::<f64>().ok())
            .unwrap_or(0.0);
        // A resumed line is printed when the call returns.
        let end = if rest.starts_with("<...") {
            ts
        } else {
            ts + took
        };
        done.push(end);
    }
    done.sort_by(f64::total_cmp);
    done
}

struct Traced(Child);

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn traced_server(dir: &Path, port: u16, log: &Path) -> Traced {
    Traced(
        Command::new("strace")
            .args(["-f", "-ttt", "-T", "-e", "trace=fdatasync,fsync", "-o"])
            .arg(log)
            .arg(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

type Client = throughcare::grpc::pb::handover_service_client::HandoverServiceClient<
    tonic::transport::Channel,
>;

/// The gateway under strace in a new directory, and its endpoint.
fn traced_gateway(dir: &Path) -> (Traced, String) {
    throughcare::certs::init_dev_pki(&dir.join("certs")).unwrap();
    let port = support::free_port();
    let server = traced_server(dir, port, &dir.join("strace.log"));
    (server, format!("https://localhost:{port}"))
}

/// A client of the traced gateway as `who`, once it serves.
async fn client_of(endpoint: &str, dir: &Path, who: &str) -> Client {
    let certs = dir.join("certs");
    for _ in 0..200 {
        if let Ok(c) = throughcare::cli::client::handover(endpoint, &certs, who).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("traced gateway serves");
}

/// Stops the traced gateway; the completed syncs it made.
async fn stop_traced(server: Traced, dir: &Path) -> Vec<f64> {
    let server_pid = server.0.id().to_string();
    Command::new("pkill")
        .args(["-TERM", "-P", &server_pid])
        .status()
        .unwrap();
    let mut server = server;
    let _ = tokio::task::spawn_blocking(move || {
        let status = server.0.wait();
        (status, server)
    })
    .await
    .unwrap();
    sync_completions(&std::fs::read_to_string(dir.join("strace.log")).unwrap())
}

/// Each (sent, answered) window holds a completed sync.
fn assert_each_window_holds_a_sync(what: &str, windows: &[(f64, f64)], completions: &[f64]) {
    println!(
        "{} fdatasync/fsync completions for {} sequential {what}",
        completions.len(),
        windows.len()
    );
    assert!(
        completions.len() >= windows.len(),
        "{} fdatasync calls for {} sequential {what}",
        completions.len(),
        windows.len()
    );
    for (i, (sent, ok)) in windows.iter().enumerate() {
        assert!(
            completions.iter().any(|c| c >= sent && c <= ok),
            "{what} {i}: no fdatasync completed between sending ({sent:.6}) and its OK ({ok:.6})"
        );
    }
}

fn strace_missing() -> bool {
    if Command::new("strace").arg("-V").output().is_err() {
        println!("SKIPPED: strace is not installed (tests/run installs it)");
        return true;
    }
    false
}

#[tokio::test]
async fn every_submit_ok_follows_a_completed_fdatasync() {
    if strace_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, endpoint) = traced_gateway(dir.path());
    let mut client = client_of(&endpoint, dir.path(), "YP001").await;
    let mut windows = Vec::new();
    for i in 0..20 {
        let sent = now();
        client
            .submit(support::release(
                &format!("d-{i}"),
                i,
                &["YG001"],
                "durable",
            ))
            .await
            .unwrap();
        windows.push((sent, now()));
    }
    drop(client);
    let completions = stop_traced(server, dir.path()).await;
    assert_each_window_holds_a_sync("submits", &windows, &completions);
}

/// An AckBatch is answered once every acknowledgement in it is durable.
#[tokio::test]
async fn every_ack_batch_ok_follows_a_completed_fdatasync() {
    use throughcare::grpc::pb;
    if strace_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, endpoint) = traced_gateway(dir.path());
    let mut prison = client_of(&endpoint, dir.path(), "YP001").await;
    for i in 0..10 {
        let release = support::release(&format!("a-{i}"), i, &["YG001"], "acked");
        prison.submit(release).await.unwrap();
    }
    let mut gp = client_of(&endpoint, dir.path(), "YG001").await;
    let mut windows = Vec::new();
    for _ in 0..5 {
        let pulled = gp.pull(support::pull(2)).await.unwrap().into_inner();
        let attempts = pulled
            .deliveries
            .iter()
            .map(|d| pb::DeliveryAttempt {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .collect();
        let sent = now();
        let results = gp
            .ack_batch(pb::AckBatchRequest { attempts })
            .await
            .unwrap()
            .into_inner()
            .results;
        windows.push((sent, now()));
        assert_eq!(results.len(), 2);
        assert!(
            results
                .iter()
                .all(|r| r.outcome() == pb::AckOutcome::Acknowledged)
        );
    }
    drop((prison, gp));
    let completions = stop_traced(server, dir.path()).await;
    assert_each_window_holds_a_sync("batch acks", &windows, &completions);
}

#[test]
fn the_strace_parser_reads_whole_and_resumed_calls() {
    let log = "101 1.000000 fdatasync(7) = 0 <0.002000>\n\
               102 2.000000 fdatasync(8 <unfinished ...>\n\
               102 2.500000 <... fdatasync resumed>) = 0 <0.500000>\n\
               103 3.000000 fsync(9) = -1 EIO (Input/output error) <0.1>\n";
    assert_eq!(sync_completions(log), vec![1.002, 2.5]);
}
