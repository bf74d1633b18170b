//! Registry sync between a gateway and `outpost cloud` through a real Mosquitto cloud
//! broker, with the tests' fault-injecting proxy between the gateway's uplink and the broker
//! (issue 5: S13/S51 of seed 004).

mod cloud;
mod common;

use cloud::{Cloud as Broker, CloudPki, Fault, Proxy};
use common::roles::{extend_to, make_device, registry, s, uplink_section, Agent, Cloud};
use common::{base_config, tls_args, Gateway};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

struct Site {
    _pki: CloudPki,
    _broker: Broker,
    proxy: Proxy,
    cloud: Cloud,
    gw: Gateway,
    work: tempfile::TempDir,
}

impl Site {
    fn start() -> Site {
        common::require_mosquitto();
        let work = tempfile::tempdir().unwrap();
        let mut pki = CloudPki::new(&work.path().join("pki"));
        let (gw_cert, gw_key) = pki.issue("gw-test", false);
        let (cl_cert, cl_key) = pki.issue("cloud-test", false);
        let broker = Broker::start(&pki);
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], broker.port)));
        // The cloud's own connection to its broker is direct (no proxy).
        let mut cloud = Cloud::prepare(&format!(
            "\n{}\n[sync]\ngateways = [\"gw-test\"]\n",
            uplink_section(broker.port, &pki.ca, &cl_cert, &cl_key)
        ));
        let cloud_ca = cloud.ca_cert();
        let up = uplink_section(proxy.addr.port(), &pki.ca, &gw_cert, &gw_key);
        let gw = Gateway::start_custom(|data| {
            base_config(
                data,
                &format!(
                    "[tls]\nextra_client_cas = [\"{}\"]\n\n{up}",
                    cloud_ca.display()
                ),
            )
        });
        let text = std::fs::read_to_string(&cloud.config_path)
            .unwrap()
            .replace(
                "[fdo]\n",
                &format!(
                    "[fdo]\nmqtt_servers = [\"mqtts://127.0.0.1:{}\"]\nserver_trust = [\"{}\"]\n",
                    gw.mqtts().port(),
                    gw.data_dir.join("ca.crt").display()
                ),
            );
        std::fs::write(&cloud.config_path, text).unwrap();
        cloud.start();
        let site = Site {
            _pki: pki,
            _broker: broker,
            proxy,
            cloud,
            gw,
            work,
        };
        site.wait_online(true, Duration::from_secs(20));
        site
    }

    fn wait_online(&self, online: bool, limit: Duration) {
        let t0 = Instant::now();
        while (self.gw.metric("outpost_uplink_online") == 1) != online {
            assert!(
                t0.elapsed() < limit,
                "uplink not {} within {limit:?}\n{}",
                if online { "online" } else { "offline" },
                self.gw.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn gw_registry(&self) -> Vec<serde_json::Value> {
        registry(&self.gw.config_path)
    }

    fn cloud_registry(&self) -> Vec<serde_json::Value> {
        registry(&self.cloud.config_path)
    }

    /// A device owned by the gateway, onboarded there (rendezvous = the gateway).
    fn onboard_at_gateway(&self, name: &str) -> (Agent, String) {
        let fdo = self.gw.ep.fdo.expect("gateway FDO");
        let dev = make_device(self.work.path(), name, fdo);
        let owner = self.gw.cli(&["voucher", "owner-cert"]);
        let v = extend_to(&dev, &String::from_utf8_lossy(&owner.stdout), "gw");
        assert!(self.gw.cli(&["voucher", "import", s(&v)]).status.success());
        let mut agent = Agent::start(
            &dev.cred,
            &self.work.path().join(format!("{name}-state")),
            &[],
        );
        let o = agent.expect("onboarded", Duration::from_secs(30));
        let id = o["client_id"].as_str().unwrap().to_string();
        (agent, id)
    }

    /// A device owned by the cloud, onboarded there (rendezvous = the cloud).
    fn onboard_at_cloud(&self, name: &str) -> (Agent, String) {
        let dev = make_device(self.work.path(), name, self.cloud.fdo());
        let owner = self.cloud.cli(&["voucher", "owner-cert"]);
        let v = extend_to(&dev, &owner, "cloud");
        self.cloud.cli(&["voucher", "import", s(&v)]);
        let mut agent = Agent::start(
            &dev.cred,
            &self.work.path().join(format!("{name}-state")),
            &[],
        );
        let o = agent.expect("onboarded", Duration::from_secs(30));
        let id = o["client_id"].as_str().unwrap().to_string();
        (agent, id)
    }
}

fn find<'a>(reg: &'a [serde_json::Value], guid: &str) -> Option<&'a serde_json::Value> {
    reg.iter().find(|e| e["guid"] == guid)
}

/// Wait until `f` holds; returns how long it took.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

fn publish_ok(gw: &Gateway, agent: &Agent, id: &str) -> bool {
    Command::new("mosquitto_pub")
        .args(tls_args(gw.mqtts(), &agent.creds(id)))
        .args([
            "-i",
            id,
            "-q",
            "1",
            "-t",
            &format!("devices/{id}/telemetry/x"),
            "-m",
            "x",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn offline_registration_reaches_the_cloud_within_5s_of_restore() {
    let site = Site::start();
    site.proxy.set(Fault::Blackhole);
    site.wait_online(false, Duration::from_secs(10));

    let (mut agent, id) = site.onboard_at_gateway("dev-offline");
    agent.expect("connected", Duration::from_secs(15));
    let mine = find(&site.gw_registry(), &id)
        .expect("gateway registry")
        .clone();
    assert_eq!(mine["registered_by"], "gateway gw-test");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        find(&site.cloud_registry(), &id).is_none(),
        "cloud knew it while cut off"
    );

    site.proxy.set(Fault::Pass);
    let restored = Instant::now();
    wait_for(
        "cloud registry has the device",
        Duration::from_secs(15),
        || find(&site.cloud_registry(), &id).is_some(),
    );
    let took = restored.elapsed();
    let theirs = find(&site.cloud_registry(), &id).unwrap().clone();
    assert_eq!(theirs, mine, "the cloud's copy is the gateway's entry");
    assert!(
        took <= Duration::from_secs(5),
        "restore -> cloud registry took {took:?}"
    );
    println!("restore -> cloud registry consistent: {took:?}");

    // Nothing doubled after more traffic and a gateway restart (the queue resends nothing new).
    std::thread::sleep(Duration::from_secs(1));
    let n = site
        .cloud_registry()
        .iter()
        .filter(|e| e["guid"] == id.as_str())
        .count();
    assert_eq!(n, 1);
}

#[test]
fn cloud_registrations_and_revocations_flow_down_and_bind_the_gateway_offline() {
    let site = Site::start();
    let (mut agent, id) = site.onboard_at_cloud("dev-cloud");
    agent.expect("connected", Duration::from_secs(15));
    assert_eq!(
        find(&site.cloud_registry(), &id).unwrap()["registered_by"],
        "cloud cloud-test"
    );
    wait_for(
        "gateway registry has the cloud's device",
        Duration::from_secs(15),
        || find(&site.gw_registry(), &id).is_some(),
    );

    // The link goes: the device keeps working through the gateway (acceptance 2).
    site.proxy.set(Fault::Blackhole);
    site.wait_online(false, Duration::from_secs(10));
    assert!(
        publish_ok(&site.gw, &agent, &id),
        "cloud device refused offline"
    );
    drop(agent);

    // The cloud revokes it while the gateway is cut off; once the link is back, the
    // gateway refuses the certificate.
    let second = site.cloud.cli(&["ca", "list", "--json"]);
    let certs: Vec<serde_json::Value> = serde_json::from_str(&second).unwrap();
    let serial = certs
        .iter()
        .find(|c| c["device_id"] == id.as_str())
        .unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    site.cloud.cli(&["ca", "revoke", "--id", &id]);
    let agent2 = Agent::start(
        &site.work.path().join("dev-cloud").join("device.cred"),
        &site.work.path().join("dev-cloud-state"),
        &["--onboard-only"],
    );
    assert!(
        publish_ok(&site.gw, &agent2, &id),
        "revocation applied before the link returned?"
    );
    site.proxy.set(Fault::Pass);
    site.wait_online(true, Duration::from_secs(10));
    wait_for(
        "gateway refuses the revoked certificate",
        Duration::from_secs(15),
        || !publish_ok(&site.gw, &agent2, &id),
    );
    let log = site.gw.log();
    assert!(
        log.contains(&serial) || log.contains("revoked certificate of another CA"),
        "{log}"
    );
}

/// TO2 straight against an owner (no TO1) with a copy of a device credential; the
/// operational credentials are written like the agent writes them.
fn onboard_copy_at(owner: SocketAddr, cred: &std::path::Path, state: &std::path::Path) -> String {
    use outpost::fdo::client::{to2, DeviceOptions, Endpoint};
    let cred = outpost::fdo_wire::DeviceCredential::read(cred).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let done = rt
        .block_on(to2(
            &Endpoint::from(owner),
            &cred,
            None,
            &DeviceOptions::default(),
        ))
        .expect("TO2 at the owner");
    let m = done.mqtt.expect("operational credentials");
    std::fs::create_dir_all(state).unwrap();
    std::fs::write(state.join(outpost::device::MQTT_KEY), &m.key_pem).unwrap();
    std::fs::write(state.join(outpost::device::MQTT_CERT), &m.cert_pem).unwrap();
    std::fs::write(state.join(outpost::device::MQTT_CA), &m.ca_pem).unwrap();
    m.client_id
}

fn publish_with(gw: &Gateway, state: &std::path::Path, id: &str) -> bool {
    let creds = common::Creds {
        id: id.into(),
        cert: state.join(outpost::device::MQTT_CERT),
        key: state.join(outpost::device::MQTT_KEY),
        ca: state.join(outpost::device::MQTT_CA),
        serial: String::new(),
    };
    Command::new("mosquitto_pub")
        .args(tls_args(gw.mqtts(), &creds))
        .args([
            "-i",
            id,
            "-q",
            "1",
            "-t",
            &format!("devices/{id}/telemetry/x"),
            "-m",
            "x",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn superseded(reg: &[serde_json::Value], guid: &str) -> bool {
    find(reg, guid).unwrap_or_else(|| panic!("{guid} missing from {reg:?}"))["superseded"]
        .as_bool()
        .unwrap()
}

/// One device (one voucher GUID) sold twice during a partition: onboarded on the gateway
/// (offline) and at the cloud. Whichever happened first wins, on both sides, whatever the
/// order; the loser's certificate is revoked on both sides and refused by the gateway.
#[test]
fn partition_conflict_resolves_the_same_way_in_either_order() {
    let site = Site::start();
    site.proxy.set(Fault::Blackhole);
    site.wait_online(false, Duration::from_secs(10));
    let gw_owner =
        String::from_utf8_lossy(&site.gw.cli(&["voucher", "owner-cert"]).stdout).into_owned();
    let cloud_owner = site.cloud.cli(&["voucher", "owner-cert"]);
    let w = site.work.path();
    // Both vouchers come from the one the manufacturer made: same GUID.
    let make = |name: &str| {
        let dev = make_device(w, name, site.gw.ep.fdo.unwrap());
        let copy = w.join(format!("{name}-copy.cred"));
        std::fs::copy(&dev.cred, &copy).unwrap();
        let to_gw = extend_to(&dev, &gw_owner, "gw");
        let to_cloud = extend_to(&dev, &cloud_owner, "cloud");
        assert!(site
            .gw
            .cli(&["voucher", "import", s(&to_gw)])
            .status
            .success());
        site.cloud.cli(&["voucher", "import", s(&to_cloud)]);
        (dev, copy)
    };
    let at_gateway = |dev: &common::roles::Made, tag: &str| -> (String, PathBuf) {
        let state = w.join(format!("{tag}-gw-state"));
        let mut a = Agent::start(&dev.cred, &state, &["--onboard-only"]);
        let o = a.expect("onboarded", Duration::from_secs(30));
        (o["client_id"].as_str().unwrap().to_string(), state)
    };
    let at_cloud = |copy: &std::path::Path, tag: &str| -> (String, PathBuf) {
        let state = w.join(format!("{tag}-cloud-state"));
        (onboard_copy_at(site.cloud.fdo(), copy, &state), state)
    };
    let (x, x_copy) = make("dev-x");
    let (y, y_copy) = make("dev-y");
    // X: the gateway first. Y: the cloud first. (Registration times have 1 s resolution.)
    let (x_gw, x_gw_state) = at_gateway(&x, "x");
    std::thread::sleep(Duration::from_millis(1100));
    let (x_cloud, x_cloud_state) = at_cloud(&x_copy, "x");
    let (y_cloud, y_cloud_state) = at_cloud(&y_copy, "y");
    std::thread::sleep(Duration::from_millis(1100));
    let (y_gw, y_gw_state) = at_gateway(&y, "y");
    // Before the link returns, the gateway accepts all four.
    for (state, id) in [
        (&x_gw_state, &x_gw),
        (&x_cloud_state, &x_cloud),
        (&y_cloud_state, &y_cloud),
        (&y_gw_state, &y_gw),
    ] {
        assert!(
            publish_with(&site.gw, state, id),
            "{id} refused before sync"
        );
    }

    site.proxy.set(Fault::Pass);
    site.wait_online(true, Duration::from_secs(10));
    wait_for(
        "both registries know all four",
        Duration::from_secs(20),
        || {
            let (g, c) = (site.gw_registry(), site.cloud_registry());
            [&x_gw, &x_cloud, &y_gw, &y_cloud]
                .iter()
                .all(|id| find(&g, id).is_some() && find(&c, id).is_some())
        },
    );
    let (g, c) = (site.gw_registry(), site.cloud_registry());
    for reg in [&g, &c] {
        assert!(
            !superseded(reg, &x_gw) && superseded(reg, &x_cloud),
            "X: {reg:?}"
        );
        assert!(
            !superseded(reg, &y_cloud) && superseded(reg, &y_gw),
            "Y: {reg:?}"
        );
    }
    // The losers' certificates are refused by the gateway's broker; the winners' work.
    wait_for("losers refused", Duration::from_secs(15), || {
        !publish_with(&site.gw, &x_cloud_state, &x_cloud)
            && !publish_with(&site.gw, &y_gw_state, &y_gw)
    });
    assert!(publish_with(&site.gw, &x_gw_state, &x_gw));
    assert!(publish_with(&site.gw, &y_cloud_state, &y_cloud));
    // And revoked by their issuers.
    let revoked_in = |list: &str, id: &str| {
        let v: Vec<serde_json::Value> = serde_json::from_str(list).unwrap();
        v.iter()
            .any(|c| c["device_id"] == id && !c["revoked_at"].is_null())
    };
    let cloud_list = site.cloud.cli(&["ca", "list", "--json"]);
    assert!(revoked_in(&cloud_list, &x_cloud), "{cloud_list}");
    assert!(!revoked_in(&cloud_list, &y_cloud), "{cloud_list}");
    let gw_list =
        String::from_utf8_lossy(&site.gw.cli(&["ca", "list", "--json"]).stdout).into_owned();
    assert!(revoked_in(&gw_list, &y_gw), "{gw_list}");
    assert!(!revoked_in(&gw_list, &x_gw), "{gw_list}");
}

/// `n` devices owned by the gateway (vouchers imported), made in-process; their credentials.
fn many_devices(site: &Site, n: usize) -> Vec<outpost::fdo_wire::DeviceCredential> {
    use outpost::fdo_wire::crypto::{self, Curve};
    use outpost::fdo_wire::manufacturer::{DeviceOptions, Manufacturer};
    use outpost::fdo_wire::types::{RendezvousInfo, RvDirective, RvProtocol};
    use outpost::fdo_wire::PublicKey;
    let fdo = site.gw.ep.fdo.unwrap();
    let mfg =
        Manufacturer::open_or_create(&site.work.path().join("mfg-many"), Curve::P256).unwrap();
    let owner_pem =
        String::from_utf8_lossy(&site.gw.cli(&["voucher", "owner-cert"]).stdout).into_owned();
    let (next_key, cert) = crypto::public_key_from_pem(&owner_pem).unwrap();
    let rv = RendezvousInfo(vec![RvDirective::default()
        .with_ip(fdo.ip())
        .with_dev_port(fdo.port())
        .with_protocol(RvProtocol::Http)
        .with_delay_secs(1)]);
    let mut creds = Vec::new();
    for i in 0..n {
        let (cred, v) = mfg
            .init_device(&DeviceOptions {
                device_info: format!("bulk-{i}"),
                rv_info: rv.clone(),
                curve: Curve::P256,
            })
            .unwrap();
        let next = PublicKey::encoded_like(&v.header().mfg_pub_key, &next_key, cert.as_deref());
        let v = v.extend(mfg.key(), &next).unwrap();
        let path = site.work.path().join(format!("bulk-{i}.pem"));
        std::fs::write(&path, v.to_pem()).unwrap();
        assert!(site
            .gw
            .cli(&["voucher", "import", s(&path)])
            .status
            .success());
        creds.push(cred);
    }
    creds
}

fn onboard_all(creds: Vec<outpost::fdo_wire::DeviceCredential>) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(common::roles::onboard_all(creds, false))
}

/// SIGKILL of the gateway with the sync in flight, then of the cloud service while it
/// applies: both resume and the cloud ends with every registration exactly once.
#[test]
fn sigkill_mid_sync_on_both_sides_loses_and_doubles_nothing() {
    let mut site = Site::start();
    site.proxy.set(Fault::Blackhole);
    site.wait_online(false, Duration::from_secs(10));
    let n = 40;
    let creds = many_devices(&site, n);
    let ids = onboard_all(creds);
    assert_eq!(site.gw_registry().len(), n);

    // The link returns and the gateway dies at once, its sync messages in flight.
    site.proxy.set(Fault::Pass);
    std::thread::sleep(Duration::from_millis(30));
    site.gw.signal("KILL");
    site.gw
        .wait(Duration::from_secs(10))
        .expect("gateway killed");
    let at_kill = site.cloud_registry().len();
    site.gw.spawn();
    // Now the cloud service dies while registrations arrive.
    wait_for(
        "the cloud starts receiving",
        Duration::from_secs(20),
        || !site.cloud_registry().is_empty(),
    );
    site.cloud.kill();
    let at_cloud_kill = registry(&site.cloud.config_path).len();
    site.cloud.start();
    wait_for(
        "the cloud has every registration",
        Duration::from_secs(30),
        || site.cloud_registry().len() >= n,
    );
    std::thread::sleep(Duration::from_secs(1));
    let reg = site.cloud_registry();
    println!(
        "cloud had {at_kill} at the gateway kill, {at_cloud_kill} at its own kill, {} at the end",
        reg.len()
    );
    assert_eq!(reg.len(), n, "nothing doubled");
    for id in &ids {
        assert!(find(&reg, id).is_some(), "{id} lost");
    }
}

/// Delegation ahead of time (issue 5, voucher source b): while online, the cloud hands the
/// gateway the voucher of a device assigned to its site, extended to the gateway's key; the
/// device then onboards on the gateway during an outage, and the cloud learns of it after.
#[test]
fn delegated_voucher_lets_the_gateway_onboard_offline() {
    let site = Site::start();
    let w = site.work.path();
    let dev = make_device(w, "dev-delegated", site.gw.ep.fdo.unwrap());
    let to_cloud = extend_to(&dev, &site.cloud.cli(&["voucher", "owner-cert"]), "cloud");
    site.cloud.cli(&["voucher", "import", s(&to_cloud)]);
    let gw_owner = w.join("gw-owner.crt");
    std::fs::write(&gw_owner, site.gw.cli(&["voucher", "owner-cert"]).stdout).unwrap();
    let out = site.cloud.cli(&[
        "voucher",
        "delegate",
        s(&to_cloud),
        "--gateway",
        "gw-test",
        "--to",
        s(&gw_owner),
    ]);
    assert!(out.contains("delegated to gateway gw-test"), "{out}");
    wait_for(
        "the gateway has the delegated voucher",
        Duration::from_secs(20),
        || site.gw.log().contains("sync: delegated voucher imported"),
    );

    site.proxy.set(Fault::Blackhole);
    site.wait_online(false, Duration::from_secs(10));
    let mut agent = Agent::start(&dev.cred, &w.join("delegated-state"), &["--onboard-only"]);
    let o = agent.expect("onboarded", Duration::from_secs(30));
    let id = o["client_id"].as_str().unwrap().to_string();
    let mine = find(&site.gw_registry(), &id)
        .expect("gateway registry")
        .clone();
    assert_eq!(mine["registered_by"], "gateway gw-test");
    assert_eq!(mine["old_guid"], dev.guid.as_str());

    site.proxy.set(Fault::Pass);
    wait_for(
        "cloud registry has the device",
        Duration::from_secs(15),
        || find(&site.cloud_registry(), &id).is_some(),
    );
}
