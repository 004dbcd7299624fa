//! The real binary's start-up contract: a bad configuration names the field
//! and exits 64 before any port is bound; a store that lost acknowledged data
//! refuses to start with exit code 65; the gateway runs with its allocator
//! settings unless the operator chose their own.

use crate::support::{BIN, Server, free_port};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn serve(dir: &Path, port: u16) -> Server {
    serve_with(dir, port, &[])
}

/// The allocator settings `serve` gives itself (docs/operations.md, "Memory").
const ALLOCATOR_SETTINGS: [&str; 2] = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_GENERIC_COLLECT"];

/// `serve` with these variables set and the allocator's others removed.
fn serve_with(dir: &Path, port: u16, env: &[(&str, &str)]) -> Server {
    Server(
        serve_command(dir, port, env)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The `serve` command of [`serve_with`], its stderr not yet chosen.
fn serve_command(dir: &Path, port: u16, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    for name in ALLOCATOR_SETTINGS {
        command.env_remove(name);
    }
    command
        .envs(env.iter().copied())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--certs-dir")
        .arg(dir.join("certs"))
        .stdout(Stdio::null());
    command
}

/// `serve` expected to stop by itself (refusing to start): its output.
fn serve_to_the_end(dir: &Path, port: u16) -> Output {
    serve_command(dir, port, &[]).output().unwrap()
}

fn submit(dir: &Path, port: u16, message_id: &str) -> Output {
    let mut last = None;
    for _ in 0..100 {
        let out = Command::new(BIN)
            .args(["submit", "--as", "YP001", "--server"])
            .arg(format!("https://localhost:{port}"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .args([
                "--message-id",
                message_id,
                "--event",
                "release",
                "--to",
                "YG001",
            ])
            .args(["--nhs", "9990000018", "--text", "synthetic"])
            .output()
            .unwrap();
        if out.status.success() {
            return out;
        }
        last = Some(out);
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("submit never succeeded: {last:?}");
}

fn stop(mut server: Server) {
    let pid = server.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = server.0.wait().unwrap();
    assert!(status.success(), "graceful stop: {status:?}");
}

#[test]
fn a_bad_configuration_names_the_field_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("throughcare.toml");
    std::fs::write(&config, "[queue]\nmax_attempts = 0\n").unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("queue.max_attempts"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing was created");

    let out = Command::new(BIN)
        .args(["serve", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`listen`"));
}

/// A fresh store in a temporary directory, served until these submits were
/// answered, then stopped: the directory and the port.
fn a_store_after(message_ids: &[&str]) -> (tempfile::TempDir, u16) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    served_with(dir.path(), port, message_ids);
    (dir, port)
}

/// Serves the store in `dir` until these submits were answered, then stops it.
fn served_with(dir: &Path, port: u16, message_ids: &[&str]) {
    let server = serve(dir, port);
    for id in message_ids {
        submit(dir, port, id);
    }
    stop(server);
}

#[test]
fn a_store_that_lost_acknowledged_data_refuses_to_start() {
    let (dir, port) = a_store_after(&["first"]);
    let sled = dir.path().join("data/sled");
    let old = dir.path().join("old-sled");
    copy_dir(&sled, &old);

    served_with(dir.path(), port, &["second"]);

    // Put back the older copy: "second" was acknowledged but is gone.
    std::fs::remove_dir_all(&sled).unwrap();
    copy_dir(&old, &sled);
    let out = serve_to_the_end(dir.path(), port);
    assert_eq!(out.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lost acknowledged data"), "{stderr}");
}

/// A store sled cannot open (its files corrupt) is named with what to do,
/// and exit 65: a restart cannot mend it (it was exit 1, which systemd
/// restarts for ever, with sled's words alone).
#[test]
fn a_damaged_store_names_itself_and_exits_65() {
    let (dir, port) = a_store_after(&["first"]);
    let conf = dir.path().join("data/sled/conf");
    std::fs::write(&conf, "segment_size: not a number\n").unwrap();
    let out = serve_to_the_end(dir.path(), port);
    assert_eq!(out.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(
        stderr.contains("restore the data directory from a backup"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A sled snapshot whose writing was cut short (a kill or a full disk while
/// sled wrote it, which it does at every open, and the gateway at every
/// clean stop) does not stop the store opening, for the gateway or an
/// offline tool. sled took it for its newest snapshot, and the store was
/// called damaged (exit 65: restore from a backup) with nothing lost.
#[test]
fn a_snapshot_cut_short_does_not_stop_the_store_opening() {
    let (dir, port) = a_store_after(&["first"]);
    let torn = dir
        .path()
        .join("data/sled/snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&torn, b"cut short").unwrap();
    served_with(dir.path(), port, &["second"]);
    assert!(!torn.exists(), "the torn snapshot is removed");

    std::fs::write(&torn, b"cut short").unwrap();
    let out = crate::support::audit_verify(&dir.path().join("data"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `serve` with these variables set, its log in `log`, and the allocator
/// variables of the running process, read from /proc once its log says it
/// serves: by then it has replaced itself with its settings (or, when the
/// operator set one, kept its own environment).
///
/// Its own log decides when, not its port: the port was free when asked,
/// and another test's server may take it first, so a connection could
/// succeed before this process replaced itself (this test failed that way
/// once in nine full runs). Nothing is logged before the replacement.
fn allocator_environment(dir: &Path, port: u16, env: &[(&str, &str)]) -> Vec<String> {
    let log = dir.join(format!("serve-{port}.log"));
    let server = Server(
        serve_command(dir, port, env)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let serving = (0..200).any(|_| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("serving over mutual TLS")
            || {
                std::thread::sleep(Duration::from_millis(50));
                false
            }
    });
    assert!(
        serving,
        "the gateway never served: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let environ = std::fs::read(format!("/proc/{}/environ", server.0.id())).unwrap();
    let mut found: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .filter(|v| v.starts_with("MIMALLOC_"))
        .collect();
    found.sort();
    stop(server);
    found
}

#[test]
fn the_gateway_runs_with_its_allocator_settings_unless_the_operator_set_their_own() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        allocator_environment(dir.path(), free_port(), &[]),
        ["MIMALLOC_GENERIC_COLLECT=1000", "MIMALLOC_PURGE_DELAY=100"],
        "the same process (same id) serves with the settings"
    );
    // An operator's own choice is kept, and the other setting is not added.
    assert_eq!(
        allocator_environment(dir.path(), free_port(), &[("MIMALLOC_PURGE_DELAY", "1000")]),
        ["MIMALLOC_PURGE_DELAY=1000"]
    );
}

/// The store's directory is its owner's alone, whatever the umask and
/// however it was made: sled's files inside are created by the umask, and
/// they hold ODS codes, message ids and audit outcomes.
#[test]
fn the_store_directory_is_private_to_the_gateway() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // Made by the gateway.
    let (dir, port) = a_store_after(&["first"]);
    assert_eq!(mode(&dir.path().join("data")), 0o700);
    // Made (or opened up) by someone else: narrowed at the next start.
    std::fs::set_permissions(
        dir.path().join("data"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    served_with(dir.path(), port, &["second"]);
    assert_eq!(mode(&dir.path().join("data")), 0o700);
}

/// A port already taken names the field that chose it.
#[test]
fn a_listen_address_in_use_names_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = serve_to_the_end(dir.path(), port);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config field `listen`"), "{stderr}");
    drop(taken);
}

/// `throughcare completions bash | head -3`, `man | head`, and any other
/// command's output (here `certs init`'s list): a reader that stops early is
/// not an error (it was a panic, exit 101).
#[test]
fn output_to_a_reader_that_stops_early_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki = pki.to_str().unwrap();
    for args in [
        &["completions", "bash"][..],
        &["man"][..],
        &["certs", "init", "--dir", pki][..],
        &["demo"][..],
    ] {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
