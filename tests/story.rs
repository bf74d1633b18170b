//! Seed 004's story end to end (issue 5, acceptance 1), every part a real process on
//! 127.0.0.1: Mosquitto as the cloud broker, `outpost cloud` as the cloud rendezvous, owner
//! and registry, the gateway (`outpost run`, cloud-first mode) behind the tests'
//! fault-injecting proxies, and `outpost device`.
//!
//! 1. Online: a device made with the gateway as its rendezvous server onboards with the
//!    cloud owner, its TO1 forwarded by the gateway (the determination unit).
//! 2. The site's internet is cut (the gateway's uplink and the devices' own path to the
//!    cloud broker). A brand-new device, whose voucher is imported from a QR code PNG,
//!    onboards on the gateway, gets its certificate and publishes through it.
//! 3. The link returns: the cloud registry has the device and its certificate serial within
//!    5 s; the gateway tells the device to switch back to the cloud broker, and it does.

mod cloud;
mod common;

use cloud::{Cloud as Broker, CloudPki, Fault, Proxy};
use common::roles::{extend_to, make_device, registry, s, uplink_section, Agent, Cloud};
use common::{base_config, Gateway};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[test]
fn seed_story_online_forward_then_offline_qr_onboarding_sync_within_5s_and_switch_back() {
    common::require_mosquitto();
    let work = tempfile::tempdir().unwrap();
    let mut pki = CloudPki::new(&work.path().join("pki"));
    let (gw_cert, gw_key) = pki.issue("gw-test", false);
    let (cl_cert, cl_key) = pki.issue("cloud-test", false);

    // The cloud's and the gateway's CAs exist first: the cloud broker accepts the devices
    // either certifies.
    let uplink_proxy_port = cloud::free_port();
    let device_proxy_port = cloud::free_port();
    let cloud_url = format!("mqtts://127.0.0.1:{device_proxy_port}");
    let mut gw = Gateway::prepare_custom(|data| {
        let cfg = base_config(
            data,
            &uplink_section(uplink_proxy_port, &pki.ca, &gw_cert, &gw_key),
        );
        cfg.replace(
            "[fdo]\nlisten = \"127.0.0.1:0\"\n",
            &format!(
                "[fdo]\nlisten = \"127.0.0.1:0\"\nmode = \"cloud-first\"\ncloud_mqtt_server = \"{cloud_url}\"\nserver_trust = [\"{}\"]\nswitch_spread = \"500ms\"\n",
                pki.ca.display()
            ),
        )
    });
    let mut cloud = Cloud::prepare("");
    let bundle = work.path().join("broker-clients.pem");
    std::fs::write(
        &bundle,
        format!(
            "{}{}{}",
            std::fs::read_to_string(&pki.ca).unwrap(),
            std::fs::read_to_string(gw.data_dir.join("ca.crt")).unwrap(),
            std::fs::read_to_string(cloud.ca_cert()).unwrap()
        ),
    )
    .unwrap();
    let broker = Broker::start_with_cafile(&pki, &bundle);
    let target = SocketAddr::from(([127, 0, 0, 1], broker.port));
    let uplink_proxy = Proxy::start_on(uplink_proxy_port, target);
    let device_proxy = Proxy::start_on(device_proxy_port, target);
    let text = std::fs::read_to_string(&cloud.config_path)
        .unwrap()
        .replace(
            "[fdo]\n",
            &format!(
                "[fdo]\nmqtt_servers = [\"{cloud_url}\"]\nserver_trust = [\"{}\"]\n",
                pki.ca.display()
            ),
        )
        + &format!(
            "\n{}\n[sync]\ngateways = [\"gw-test\"]\n",
            uplink_section(broker.port, &pki.ca, &cl_cert, &cl_key)
        );
    std::fs::write(&cloud.config_path, text).unwrap();
    cloud.start();
    // The gateway forwards TO1 to the cloud rendezvous while online.
    let text = std::fs::read_to_string(&gw.config_path).unwrap().replace(
        "[fdo]\n",
        &format!("[fdo]\ncloud_rendezvous = \"{}\"\n", cloud.fdo()),
    );
    std::fs::write(&gw.config_path, text).unwrap();
    gw.spawn();
    let online = |gw: &Gateway| gw.metric("outpost_uplink_online") == 1;
    let wait = |what: &str, limit: Duration, f: &mut dyn FnMut() -> bool| {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        t0.elapsed()
    };
    wait("online", Duration::from_secs(20), &mut || online(&gw));

    // 1. Online onboarding through the gateway's rendezvous proxy, to the cloud owner.
    let first = make_device(work.path(), "dev-online", gw.ep.fdo.unwrap());
    let v = extend_to(&first, &cloud.cli(&["voucher", "owner-cert"]), "cloud");
    cloud.cli(&["voucher", "import", s(&v)]);
    let mut online_agent = Agent::start(&first.cred, &work.path().join("online-state"), &[]);
    let o = online_agent.expect("onboarded", Duration::from_secs(30));
    let online_id = o["client_id"].as_str().unwrap().to_string();
    assert_eq!(o["servers"], serde_json::json!([cloud_url]));
    let c = online_agent.expect("connected", Duration::from_secs(15));
    assert_eq!(c["server"], cloud_url.as_str());
    let e = registry(&cloud.config_path)
        .into_iter()
        .find(|e| e["guid"] == online_id.as_str())
        .expect("cloud registry");
    assert_eq!(e["registered_by"], "cloud cloud-test");
    assert_eq!(gw.metric("outpost_fdo_to1_forwarded_total"), 1);
    drop(online_agent);

    // 2. The site loses the internet.
    uplink_proxy.set(Fault::Blackhole);
    device_proxy.set(Fault::Reset);
    wait("offline", Duration::from_secs(10), &mut || !online(&gw));

    // A brand-new device: its voucher comes with it as a QR code label, read at the gateway.
    let dev = make_device(work.path(), "dev-story", gw.ep.fdo.unwrap());
    let owner = gw.cli(&["voucher", "owner-cert"]);
    let v = extend_to(&dev, &String::from_utf8_lossy(&owner.stdout), "gw");
    let png = work.path().join("dev-story.png");
    common::roles::run_ok(&["voucher", "qr", "--voucher", s(&v), "--out", s(&png)]);
    std::fs::remove_file(&v).unwrap();
    let out = gw.cli(&["voucher", "import", s(&png)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(gw.metric("outpost_fdo_to1_local_total"), 0);
    let mut agent = Agent::start(&dev.cred, &work.path().join("state"), &[]);
    let o = agent.expect("onboarded", Duration::from_secs(30));
    let id = o["client_id"].as_str().unwrap().to_string();
    let gw_url = format!("mqtts://127.0.0.1:{}", gw.mqtts().port());
    assert_eq!(
        o["servers"],
        serde_json::json!([cloud_url, gw_url]),
        "cloud-first order"
    );
    // The cloud is unreachable for the device too: it falls back to the gateway.
    let c = agent.expect("connected", Duration::from_secs(30));
    assert_eq!(c["server"], gw_url.as_str());
    assert_eq!(
        gw.metric("outpost_fdo_to1_local_total"),
        1,
        "answered locally while offline"
    );
    let p = agent.expect("published", Duration::from_secs(10));
    assert_eq!(p["server"], gw_url.as_str());
    let serial = registry(&gw.config_path)
        .into_iter()
        .find(|e| e["guid"] == id.as_str())
        .expect("gateway registry")["cert_serial"]
        .clone();
    assert!(registry(&cloud.config_path)
        .iter()
        .all(|e| e["guid"] != id.as_str()));

    // 3. The internet returns.
    uplink_proxy.set(Fault::Pass);
    device_proxy.set(Fault::Pass);
    let restored = Instant::now();
    wait(
        "cloud registry has the device",
        Duration::from_secs(15),
        &mut || {
            registry(&cloud.config_path)
                .iter()
                .any(|e| e["guid"] == id.as_str() && e["cert_serial"] == serial)
        },
    );
    let synced = restored.elapsed();
    assert!(
        synced <= Duration::from_secs(5),
        "restore -> cloud registry: {synced:?}"
    );
    // ... and the gateway tells the device to go back to the cloud broker, which it does.
    let sw = agent.expect("switching", Duration::from_secs(30));
    assert_eq!(sw["to"], cloud_url.as_str());
    let c = agent.expect("connected", Duration::from_secs(15));
    assert_eq!(c["server"], cloud_url.as_str());
    let p = agent.expect("published", Duration::from_secs(10));
    assert_eq!(p["server"], cloud_url.as_str());
    println!(
        "restore -> cloud registry {synced:?}; -> device on the cloud broker {:?}",
        restored.elapsed()
    );
    drop(agent);
    drop(cloud);
    drop(broker);
}
