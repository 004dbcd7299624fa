//! Compiles `proto/throughcare/v1/*.proto` with protox (pure Rust, no system protoc).
//! The descriptor set served by reflection also holds the vendored
//! `google/rpc/error_details.proto`, so tools decode our error details; no
//! Rust is generated for it (tonic-types has those types).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/throughcare/v1/summary.proto",
        "proto/throughcare/v1/handover.proto",
        "proto/throughcare/v1/operator.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let error_details = "proto/google/rpc/error_details.proto";
    println!("cargo:rerun-if-changed={error_details}");
    let fds = protox::compile(files, ["proto"])?;
    let served = protox::compile(files.iter().copied().chain([error_details]), ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for gRPC reflection.
    std::fs::write(
        out.join("throughcare_descriptor.bin"),
        prost::Message::encode_to_vec(&served),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // `throughcare --version` names the commit it was built from.
    // A container build has no .git (.dockerignore): it passes the commit in.
    println!("cargo:rerun-if-env-changed=THROUGHCARE_COMMIT");
    let given = std::env::var("THROUGHCARE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty());
    let commit = given.unwrap_or_else(git_commit);
    println!("cargo:rustc-env=THROUGHCARE_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    Ok(())
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown commit".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}
