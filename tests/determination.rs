//! Issue 5, the determination unit: a device made with the gateway as its rendezvous
//! address onboards with the cloud owner while the uplink is Online (its TO1 is forwarded to
//! the cloud rendezvous and the answer relayed) and with the gateway while it is Offline (the
//! local rendezvous answers). All real processes on 127.0.0.1: Mosquitto as the cloud broker
//! behind the tests' fault-injecting proxy (the uplink), `outpost cloud` as the cloud
//! rendezvous + owner (reached through a second proxy, so that the HTTP path can fail on its
//! own), `outpost run` as the gateway and `outpost device` as the device.

mod cloud;
mod common;

use cloud::{Cloud as Mosquitto, CloudPki, Fault, Proxy};
use common::roles::{extend_to, make_device, s, Agent, Cloud, Made};
use common::{base_config, wait_metric, Gateway};
use outpost::fdo::client::{post, Endpoint, HttpReply};
use outpost::fdo_wire::msg::{msg_type, Eat, SignedMsg, To1HelloRv, To1HelloRvAck, To1dPayload};
use outpost::fdo_wire::types::SigInfo;
use outpost::fdo_wire::DeviceCredential;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const FORWARDED: &str = "outpost_fdo_to1_forwarded_total";
const LOCAL: &str = "outpost_fdo_to1_local_total";
const FAILED: &str = "outpost_fdo_to1_forward_failed_total";

struct Rig {
    _pki: CloudPki,
    _mosquitto: Mosquitto,
    /// Between the gateway's uplink and Mosquitto.
    uplink: Proxy,
    /// Between the gateway's TO1 forwarding and the cloud rendezvous.
    fdo_path: Proxy,
    cloud: Cloud,
    gw: Gateway,
    work: tempfile::TempDir,
}

impl Rig {
    /// Mosquitto + proxy, the cloud (FDO on a fixed port, devices sent to the gateway's
    /// broker), the gateway (uplink through the proxy, `cloud_rendezvous` through the second
    /// proxy, the cloud's CA accepted for client certificates). Returns once Online.
    fn start() -> Rig {
        common::require_mosquitto();
        let work = tempfile::tempdir().unwrap();
        let mut pki = CloudPki::new(&work.path().join("pki"));
        let (gw_cert, gw_key) = pki.issue("gw-test", false);
        let mosquitto = Mosquitto::start(&pki);
        let uplink = Proxy::start(SocketAddr::from(([127, 0, 0, 1], mosquitto.port)));
        let cloud_fdo = SocketAddr::from(([127, 0, 0, 1], cloud::free_port()));
        let fdo_path = Proxy::start(cloud_fdo);

        let mut cloud = Cloud::prepare("");
        let cloud_ca = cloud.ca_cert();
        let gw = Gateway::start_custom(|data| {
            base_config(
                data,
                &format!(
                    "[tls]\nextra_client_cas = [\"{}\"]\n\n[uplink]\nenabled = true\nhost = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                    cloud_ca.display(),
                    uplink.addr.port(),
                    pki.ca.display(),
                    gw_cert.display(),
                    gw_key.display()
                ),
            )
            .replace(
                "[fdo]\nlisten = \"127.0.0.1:0\"\n",
                &format!(
                    "[fdo]\nlisten = \"127.0.0.1:0\"\ncloud_rendezvous = \"{}\"\n",
                    fdo_path.addr
                ),
            )
        });
        let text = std::fs::read_to_string(&cloud.config_path)
            .unwrap()
            .replace(
                "[fdo]\nlisten = \"127.0.0.1:0\"\n",
                &format!(
                    "[fdo]\nlisten = \"{cloud_fdo}\"\nmqtt_servers = [\"mqtts://127.0.0.1:{}\"]\nserver_trust = [\"{}\"]\n",
                    gw.mqtts().port(),
                    gw.data_dir.join("ca.crt").display()
                ),
            );
        std::fs::write(&cloud.config_path, text).unwrap();
        cloud.start();
        assert_eq!(cloud.fdo(), cloud_fdo);
        let rig = Rig {
            _pki: pki,
            _mosquitto: mosquitto,
            uplink,
            fdo_path,
            cloud,
            gw,
            work,
        };
        rig.wait_online(true);
        rig
    }

    fn gw_fdo(&self) -> SocketAddr {
        self.gw.ep.fdo.expect("gateway FDO listener")
    }

    fn wait_online(&self, online: bool) {
        let want = i64::from(online);
        let got = wait_metric(
            &self.gw,
            "outpost_uplink_online",
            Duration::from_secs(30),
            |v| v == want,
        );
        assert_eq!(got, want, "uplink state\n{}", self.gw.log());
    }

    /// A device whose rendezvous is the gateway.
    fn device(&self, name: &str) -> Made {
        make_device(self.work.path(), name, self.gw_fdo())
    }

    /// Extend to the cloud owner and import there; returns once the cloud registered it
    /// at its own rendezvous (TO0).
    fn give_to_cloud(&self, dev: &Made) {
        let owner = self.cloud.cli(&["voucher", "owner-cert"]);
        let v = extend_to(dev, &owner, "cloud");
        let out = self.cloud.cli(&["voucher", "import", s(&v)]);
        assert!(out.contains(&dev.guid), "{out}");
        wait_log(|| self.cloud.log(), &dev.guid, "TO0: registered");
    }

    /// Extend to the gateway owner and import there; returns once registered locally.
    fn give_to_gateway(&self, dev: &Made) {
        let owner = self.gw.cli(&["voucher", "owner-cert"]);
        assert!(owner.status.success());
        let v = extend_to(dev, &String::from_utf8_lossy(&owner.stdout), "gw");
        let out = self.gw.cli(&["voucher", "import", s(&v)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_log(|| self.gw.log(), &dev.guid, "TO0: registered");
    }

    fn metric(&self, name: &str) -> i64 {
        self.gw.metric(name)
    }

    /// The TO1 determination counters: forwarded to the cloud, answered locally, failed.
    fn expect_to1(&self, forwarded: i64, local: i64, failed: i64) {
        assert_eq!(
            (
                self.metric(FORWARDED),
                self.metric(LOCAL),
                self.metric(FAILED)
            ),
            (forwarded, local, failed),
            "TO1 (forwarded, local, failed)"
        );
    }
}

/// Wait for a log line containing both `guid` and `what`.
fn wait_log(log: impl Fn() -> String, guid: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = common::strip_ansi(&log());
        if text.lines().any(|l| l.contains(guid) && l.contains(what)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} line for {guid}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_line(log: &str, guid: &str, what: &str) -> String {
    common::strip_ansi(log)
        .lines()
        .find(|l| l.contains(guid) && l.contains(what))
        .unwrap_or_else(|| panic!("no {what:?} line for {guid}:\n{log}"))
        .to_string()
}

/// The agent connects with MQTT to the gateway's broker.
fn expect_gateway_broker(rig: &Rig, agent: &mut Agent) {
    let connected = agent.expect("connected", Duration::from_secs(30));
    assert_eq!(
        connected["server"],
        format!("mqtts://127.0.0.1:{}", rig.gw.mqtts().port())
    );
}

/// The registry entry of `guid` in the registry that `config` configures (it must be there).
fn registry_entry(config: &std::path::Path, guid: &str) -> serde_json::Value {
    let reg = common::roles::registry(config);
    reg.iter()
        .find(|e| e["guid"] == guid)
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{guid} not in the registry of {}: {reg:?}",
                config.display()
            )
        })
}

/// Onboard with the agent (rendezvous: the gateway); returns the agent and the new GUID.
fn onboard(rig: &Rig, dev: &Made, state: &str) -> (Agent, String) {
    let mut agent = Agent::start(&dev.cred, &rig.work.path().join(state), &[]);
    let onboarded = agent.expect("onboarded", Duration::from_secs(60));
    assert_eq!(onboarded["old_guid"], dev.guid.as_str());
    let client_id = onboarded["client_id"]
        .as_str()
        .expect("client id")
        .to_string();
    (agent, client_id)
}

#[test]
fn online_to1_is_forwarded_to_the_cloud_and_the_device_onboards_with_the_cloud_owner() {
    let rig = Rig::start();
    let dev = rig.device("dev-online");
    rig.give_to_cloud(&dev);

    let (mut agent, client_id) = onboard(&rig, &dev, "state-online");
    // The cloud's owner onboarded it: it is the cloud's device, using the gateway's broker.
    expect_gateway_broker(&rig, &mut agent);
    let e = registry_entry(&rig.cloud.config_path, &client_id);
    assert_eq!(e["old_guid"], dev.guid.as_str());
    assert_eq!(e["registered_by"], "cloud cloud-test");
    assert!(
        common::roles::registry(&rig.gw.config_path).is_empty(),
        "the gateway onboarded nothing"
    );

    rig.expect_to1(1, 0, 0);
    let log = rig.gw.log();
    let line = log_line(&log, &dev.guid, "TO1: forwarded to the cloud rendezvous");
    assert!(
        line.contains("uplink=\"online\"") || line.contains("uplink=online"),
        "{line}"
    );
    assert!(line.contains(&rig.fdo_path.addr.to_string()), "{line}");
    // The cloud's rendezvous answered it; the gateway's never saw the ProveToRV.
    assert!(!log.contains("TO1: device proved itself"), "{log}");
    wait_log(|| rig.cloud.log(), &dev.guid, "TO1: device proved itself");
}

#[test]
fn offline_to1_is_answered_locally_and_the_device_onboards_with_the_gateway() {
    let rig = Rig::start();
    rig.uplink.set(Fault::Blackhole);
    rig.wait_online(false);

    let dev = rig.device("dev-offline");
    rig.give_to_gateway(&dev);
    let (mut agent, client_id) = onboard(&rig, &dev, "state-offline");
    expect_gateway_broker(&rig, &mut agent);
    let e = registry_entry(&rig.gw.config_path, &client_id);
    assert_eq!(e["registered_by"], "gateway gw-test");
    assert!(common::roles::registry(&rig.cloud.config_path).is_empty());

    rig.expect_to1(0, 1, 0);
    let line = log_line(
        &rig.gw.log(),
        &dev.guid,
        "TO1: answered by the local rendezvous",
    );
    assert!(line.contains("uplink offline"), "{line}");
}

/// The fallback rule for a device the cloud does not know: while Online, a device whose
/// voucher was imported into the gateway only (not registered at the cloud rendezvous, which
/// answers error 6) is answered from the gateway's own registration.
#[test]
fn online_but_unknown_at_the_cloud_is_answered_from_the_local_registration() {
    let rig = Rig::start();
    let dev = rig.device("dev-gw-only");
    rig.give_to_gateway(&dev);
    let (_agent, client_id) = onboard(&rig, &dev, "state-gw-only");
    let reg = common::roles::registry(&rig.gw.config_path);
    assert!(
        reg.iter().any(|e| e["guid"] == client_id.as_str()),
        "{reg:?}"
    );
    assert_eq!(rig.metric("outpost_fdo_to1_cloud_unknown_total"), 1);
    rig.expect_to1(0, 1, 0);
    let line = log_line(
        &rig.gw.log(),
        &dev.guid,
        "TO1: answered by the local rendezvous",
    );
    assert!(line.contains("not registered at the cloud"), "{line}");
    // The cloud was asked (and said it does not know the device).
    wait_log(|| rig.cloud.log(), &dev.guid, "is not registered");
}

// ------------------------------------------------------------------------------------------
// Stickiness, at the message level: the test is the device.

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// TO1.HelloRV to the gateway: (token, nonce).
fn hello_rv(rt: &tokio::runtime::Runtime, gw: &Endpoint, cred: &DeviceCredential) -> HttpReply {
    let body = To1HelloRv {
        guid: cred.guid,
        sig_info: SigInfo {
            sg_type: cred.device_key.curve().cose_alg(),
            info: Vec::new(),
        },
    }
    .encode();
    let r = rt
        .block_on(post(gw, msg_type::TO1_HELLO_RV, None, &body))
        .expect("HelloRV answered");
    assert_eq!(r.msg_type, Some(msg_type::TO1_HELLO_RV_ACK), "{r:?}");
    assert_eq!(r.status, 200);
    r
}

/// TO1.ProveToRV for the session of `ack`: the port of the owner address in the redirect.
fn prove_to_rv(
    rt: &tokio::runtime::Runtime,
    gw: &Endpoint,
    cred: &DeviceCredential,
    ack: &HttpReply,
) -> u16 {
    let nonce = To1HelloRvAck::decode(&ack.body).expect("HelloRVAck").nonce;
    let eat = Eat::sign(&cred.device_key, &cred.guid, &nonce, None, None).unwrap();
    let r = rt
        .block_on(post(
            gw,
            msg_type::TO1_PROVE_TO_RV,
            ack.token.as_deref(),
            &eat.signed.raw,
        ))
        .expect("ProveToRV answered");
    assert_eq!(
        r.msg_type,
        Some(msg_type::TO1_RV_REDIRECT),
        "{r:?}: {:?}",
        outpost::fdo_wire::types::ErrorMessage::decode(&r.body)
    );
    let to1d = SignedMsg::decode(&r.body, "RVRedirect").unwrap();
    To1dPayload::decode(to1d.payload()).unwrap().addrs[0].port
}

#[test]
fn a_to1_session_stays_where_it_started_when_the_uplink_flips_in_between() {
    let rig = Rig::start();
    // Registered at both: the cloud and the gateway each own it (two transfers of the
    // manufacturer's voucher), so either rendezvous can answer.
    let dev = rig.device("dev-sticky");
    rig.give_to_cloud(&dev);
    rig.give_to_gateway(&dev);
    let cred = DeviceCredential::read(&dev.cred).unwrap();
    let gw = Endpoint::from(rig.gw_fdo());
    let rt = rt();

    // Started at the cloud while Online; finished after the link went Offline: still the
    // cloud's session, so the redirect names the cloud owner.
    let ack = hello_rv(&rt, &gw, &cred);
    assert_eq!(rig.metric(FORWARDED), 1);
    rig.uplink.set(Fault::Blackhole);
    rig.wait_online(false);
    let port = prove_to_rv(&rt, &gw, &cred, &ack);
    assert_eq!(
        port,
        rig.cloud.fdo().port(),
        "cloud session finished at the cloud"
    );

    // Started locally while Offline; finished after the link came back: still local.
    let ack = hello_rv(&rt, &gw, &cred);
    assert_eq!(rig.metric(LOCAL), 1);
    rig.uplink.set(Fault::Pass);
    rig.wait_online(true);
    let port = prove_to_rv(&rt, &gw, &cred, &ack);
    assert_eq!(port, rig.gw_fdo().port(), "local session finished locally");

    rig.expect_to1(1, 1, 0);
}

#[test]
fn online_but_cloud_rendezvous_unreachable_falls_back_to_the_local_answer() {
    let mut rig = Rig::start();

    // The path to the cloud rendezvous silently drops everything while the uplink stays
    // Online: the forward times out (fdo.forward_timeout) and the local rendezvous answers.
    let dev = rig.device("dev-timeout");
    rig.give_to_gateway(&dev);
    rig.fdo_path.set(Fault::Blackhole);
    let (_agent, client_id) = onboard(&rig, &dev, "state-timeout");
    assert_eq!(rig.metric("outpost_uplink_online"), 1);
    rig.expect_to1(0, 1, 1);
    let log = rig.gw.log();
    let line = log_line(&log, &dev.guid, "forwarding to the cloud rendezvous failed");
    assert!(line.contains("no answer within"), "{line}");
    let line = log_line(&log, &dev.guid, "TO1: answered by the local rendezvous");
    assert!(line.contains("cloud rendezvous unreachable"), "{line}");

    // The cloud process is gone (connection refused): the same.
    rig.fdo_path.set(Fault::Pass);
    if let Some(mut c) = rig.cloud.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let dev2 = rig.device("dev-refused");
    rig.give_to_gateway(&dev2);
    let (_agent2, client_id2) = onboard(&rig, &dev2, "state-refused");
    assert_eq!(rig.metric(FAILED), 2);
    assert_eq!(rig.metric(LOCAL), 2);
    assert_eq!(rig.metric("outpost_uplink_online"), 1);

    let reg = common::roles::registry(&rig.gw.config_path);
    for id in [&client_id, &client_id2] {
        assert!(
            reg.iter()
                .any(|e| e["guid"] == id.as_str() && e["registered_by"] == "gateway gw-test"),
            "{id} not in {reg:?}"
        );
    }
}
