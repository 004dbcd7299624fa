//! The real binary as an operator meets it: plain log text when stderr is
//! not a terminal, addresses printed plainly, configuration from the
//! environment (with the variable named when it is wrong), and development
//! certificates only when asked for.

use std::process::Stdio;
use std::time::Duration;

use crate::support::{BIN, free_port};
use tokio::io::{AsyncBufReadExt, BufReader};

/// stderr is a pipe here: no escape sequences, even at levels that a
/// terminal would colour (INFO, WARN), and the listener's address as text.
#[tokio::test]
async fn logs_into_a_pipe_carry_no_colour_codes_and_plain_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let serving = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("serving over mutual TLS");
            seen.push(line);
            if done {
                return;
            }
        }
    })
    .await;
    child.kill().await.unwrap();
    let text = seen.join("\n");
    assert!(serving.is_ok(), "never served:\n{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a pipe:\n{text}");
    // The dev-PKI warning (WARN) and the serving line (INFO) are both there.
    assert!(
        text.contains("WARN") && text.contains("DEVELOPMENT"),
        "{text}"
    );
    let serving = seen.last().unwrap();
    assert!(
        serving.contains(&format!("addr=127.0.0.1:{port}")),
        "{serving}"
    );
    assert!(!text.contains("Some("), "{text}");
}

/// A configuration variable reaches its field, and a bad one stops the
/// gateway before anything is created, naming the field and the variable.
#[test]
fn configuration_comes_from_the_environment_and_bad_values_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .env("THROUGHCARE_DATA_DIR", dir.path().join("data"))
        .env("THROUGHCARE_CERTS_DIR", dir.path().join("certs"))
        .env("THROUGHCARE_QUEUE_MAX_ATTEMPTS", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("queue.max_attempts"), "{stderr}");
    assert!(
        stderr.contains("THROUGHCARE_QUEUE_MAX_ATTEMPTS"),
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was created");

    // A nested field of another section, with a value of the wrong type.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .env("THROUGHCARE_DATA_DIR", dir.path().join("data"))
        .env("THROUGHCARE_LIMITS_MAX_IN_FLIGHT", "lots")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("limits.max_in_flight"), "{stderr}");
    assert!(
        stderr.contains("THROUGHCARE_LIMITS_MAX_IN_FLIGHT"),
        "{stderr}"
    );
}

/// With a configuration file, a missing PKI is an error, not a new CA; the
/// file's `dev_certs = true` or `THROUGHCARE_DEV_CERTS` asks for one.
#[test]
fn a_configured_gateway_never_makes_its_own_certificates_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("throughcare.toml");
    std::fs::write(&config, "shutdown_grace_ms = 1000\n").unwrap();
    let certs = dir.path().join("certs");
    let serve = || {
        let mut command = std::process::Command::new(BIN);
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--certs-dir")
            .arg(&certs);
        command
    };
    let out = serve().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!certs.exists(), "a PKI was created without being asked for");

    // Asked for through the environment: it is created (the gateway is then
    // stopped: serving is tested elsewhere).
    let mut child = serve()
        .env("THROUGHCARE_DEV_CERTS", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let created = within_30_s(|| throughcare::certs::dev_pki_present(&certs));
    let _ = child.kill();
    let _ = child.wait();
    assert!(created, "THROUGHCARE_DEV_CERTS=true did not create the PKI");
}

/// Whether `done` holds within 30 s, asked every 50 ms.
fn within_30_s(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..600 {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Development certificates are made only where none of their files are: a
/// certificates directory holding real material (a CA certificate, the
/// server's certificate and key, a registry, and no CA key) is refused by
/// name and left byte for byte as it was, never written over by a new CA.
/// Private keys the gateway writes are owner-only.
#[test]
fn development_certificates_never_replace_tls_material_that_is_there() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let made = throughcare::certs::init_dev_pki(&certs).unwrap();
    for key in [made.ca_key(), made.server_key(), made.client("YP001").1] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    // What an operator deploys: no CA key beside the CA certificate.
    std::fs::remove_file(made.ca_key()).unwrap();
    let before: Vec<Vec<u8>> = [made.ca_cert(), made.server_cert(), made.server_key()]
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(&certs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = within_30_s(|| child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        exited,
        "the gateway started over the TLS material that was there"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ca.pem") && stderr.contains("not a whole development PKI"),
        "{stderr}"
    );
    let after: Vec<Vec<u8>> = [made.ca_cert(), made.server_cert(), made.server_key()]
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    assert_eq!(before, after, "TLS material was written over");
    assert!(!made.ca_key().exists(), "a new CA key was made");
}
