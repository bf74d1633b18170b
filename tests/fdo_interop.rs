//! Issue 10 part 1: devices built on other FDO 1.1 implementations. Some (fdo-rs 0.5) put the
//! EAT-UEID under claim key 11, an early EAT draft's number; the specification says 256.
//! Against the real gateway (its rendezvous for TO1, its owner for TO2), a device sending each
//! passes TO1.ProveToRV and TO2.ProveDevice and gets its MQTT credentials; the legacy key is
//! counted. (The TO2 key exchange itself is pinned by the known-answer tests in
//! src/fdo/kex.rs, worked out from the specification, not by two of our roles agreeing.)

mod common;

use common::roles::{made_for_gateway, registry};
use common::Gateway;
use outpost::fdo::client::{self, DeviceOptions};
use outpost::fdo_wire::DeviceCredential;

const LEGACY: &str = "outpost_fdo_eat_ueid_legacy_key_total";

async fn onboard(gw: &Gateway, work: &std::path::Path, name: &str, ueid_key: i64) -> String {
    let dev = made_for_gateway(gw, work, name);
    let cred = DeviceCredential::read(&dev.cred).expect("device credential");
    let opts = DeviceOptions {
        eat_ueid_key: ueid_key,
        ..DeviceOptions::default()
    };
    // The registrar's TO0 runs in the background: retry TO1 until it has registered.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let done = loop {
        match client::onboard(&cred, &opts).await {
            Ok(o) => break o,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("{name}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            Err(e) => panic!("{name} did not onboard: {e}\n{}", gw.log()),
        }
    };
    let mqtt = done.mqtt.expect("MQTT credentials through outpost:mqtt");
    assert!(mqtt.cert_pem.contains("BEGIN CERTIFICATE"));
    dev.guid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_with_the_ueid_under_claim_11_or_256_both_onboard() {
    let gw = Gateway::start();
    let work = tempfile::tempdir().unwrap();
    assert_eq!(gw.metric(LEGACY), 0);

    let spec = onboard(&gw, work.path(), "dev-256", 256).await;
    assert_eq!(
        gw.metric(LEGACY),
        0,
        "the specification's key is not counted"
    );

    let legacy = onboard(&gw, work.path(), "dev-11", 11).await;
    // Counted once in TO1.ProveToRV and once in TO2.ProveDevice.
    assert_eq!(gw.metric(LEGACY), 2);

    let reg = registry(&gw.config_path);
    for guid in [&spec, &legacy] {
        assert!(
            reg.iter()
                .any(|e| e["old_guid"] == guid.as_str() || e["guid"] == guid.as_str()),
            "{guid} not in the registry: {reg:?}"
        );
    }
}
