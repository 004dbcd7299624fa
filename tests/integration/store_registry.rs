//! Several gateway nodes on one PostgreSQL database see an operator's
//! registry change without a restart: the change is stored, NOTIFY tells
//! every node, and each reads the registry again (docs/store-engines.md).
//! Skipped (loudly) without the test cluster `tests/run` starts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use throughcare::grpc::pb;
use throughcare::store::SystemClock;

use crate::support::{self, TestGateway, organisation, release};

/// A node on database `url` with the key files in `keys`.
async fn node(url: &str, keys: &Path) -> TestGateway {
    let (url, keys) = (url.to_owned(), keys.to_owned());
    TestGateway::start_with(
        move |c| {
            support::use_postgres(c, &url);
            c.master_key_file = Some(keys.join("master-key"));
            c.integrity.audit_key_file = Some(keys.join("audit-key"));
            c.patient_key_file = Some(keys.join("patient-key"));
        },
        Arc::new(SystemClock),
    )
    .await
}

async fn knows(gw: &TestGateway, code: &str) -> bool {
    gw.operator()
        .await
        .list_organisations(pb::ListOrganisationsRequest {
            page_size: 500,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .organisations
        .iter()
        .any(|o| o.ods_code == code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_change_on_one_node_reaches_the_other_without_a_restart() {
    let Some(url) = support::postgres_database("store_registry") else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let a = node(&url, keys.path()).await;
    let b = node(&url, keys.path()).await;
    assert!(!knows(&b, "YG777").await);
    // B refuses a release naming a practice it does not know.
    let mut prison = b.client("YP001").await;
    assert!(
        prison
            .submit(release("reg-before", 3, &["YG777"], "registry"))
            .await
            .is_err()
    );
    a.operator()
        .await
        .put_organisation(organisation(
            "YG777",
            pb::OrganisationKind::GpPractice,
            "A practice added on node A (invented)",
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !knows(&b, "YG777").await {
        assert!(Instant::now() < deadline, "node B learns of YG777");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And routes to it.
    let receipt = prison
        .submit(release("reg-after", 3, &["YG777"], "registry"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        receipt.deliveries.iter().any(|d| d.destination == "YG777"),
        "{receipt:?}"
    );
    a.stop().await;
    b.stop().await;
}
