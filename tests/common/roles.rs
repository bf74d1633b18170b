//! The other roles of the binary as test processes: `outpost cloud` and `outpost device`,
//! plus the manufacturer's and owner's voucher steps.

use super::BIN;
use outpost::CloudEndpoints;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run outpost");
    assert_ok(&out, args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stdout of a command that must have succeeded.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stdout and stderr of a command that must have failed.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "unexpected success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn assert_ok(out: &Output, what: &[&str]) {
    assert!(
        out.status.success(),
        "outpost {what:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `[uplink]` section of a gateway (or of `outpost cloud`'s own broker connection).
pub fn uplink_section(port: u16, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "[uplink]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// `outpost registry --json` of the gateway or cloud that `config` configures.
pub fn registry(config: &Path) -> Vec<serde_json::Value> {
    let text = run_ok(&["registry", "--json", "--config", s(config)]);
    serde_json::from_str(&text).expect("registry JSON")
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A running `outpost cloud`.
pub struct Cloud {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub child: Option<Child>,
    pub ep: Option<CloudEndpoints>,
}

impl Cloud {
    /// Prepare a data dir and config (`fdo_extra`: lines added to its `[fdo]` section), and
    /// create the CA (so that its certificate can be given to a gateway before start).
    pub fn prepare(fdo_extra: &str) -> Cloud {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("cloud.toml");
        std::fs::write(
            &config_path,
            format!(
                "[gateway]\nid = \"cloud-test\"\ndata_dir = \"{}\"\n\n[mdns]\nenabled = false\n\n[web]\nlisten = \"127.0.0.1:0\"\n\n\
                 [fdo]\nlisten = \"127.0.0.1:0\"\n{fdo_extra}\n",
                data_dir.display()
            ),
        )
        .expect("write cloud config");
        let c = Cloud {
            dir,
            data_dir,
            config_path,
            child: None,
            ep: None,
        };
        // `ca list` on a stopped data dir creates the CA.
        c.cli(&["ca", "list"]);
        c
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir.join("ca.crt")
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", s(&self.config_path)]);
        run_ok(&all)
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("cloud.log"))
            .expect("log file");
        let child = Command::new(BIN)
            .args(["cloud", "--config"])
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outpost cloud");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(ep) = CloudEndpoints::read(&self.data_dir).filter(|e| e.pid == pid) {
                self.ep = Some(ep);
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cloud exited early with {st}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "cloud not ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn fdo(&self) -> SocketAddr {
        self.ep.as_ref().expect("cloud started").fdo
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cloud.log")).unwrap_or_default()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A device made by a manufacturer: its credential and its voucher.
pub struct Made {
    pub dir: PathBuf,
    pub cred: PathBuf,
    pub voucher: PathBuf,
    pub mfg_key: PathBuf,
    pub guid: String,
}

/// `outpost voucher init-device` with the rendezvous server at `rv` (plain HTTP, 1 s delay).
pub fn make_device(dir: &Path, name: &str, rv: SocketAddr) -> Made {
    let out = dir.join(name);
    let mfg = dir.join("mfg");
    let text = run_ok(&[
        "voucher",
        "init-device",
        "--out",
        s(&out),
        "--mfg-dir",
        s(&mfg),
        "--device-info",
        &format!("{name} model-x"),
        "--rv-ip",
        &rv.ip().to_string(),
        "--rv-port",
        &rv.port().to_string(),
        "--rv-delay",
        "1",
    ]);
    let guid = text
        .split_whitespace()
        .nth(1)
        .expect("guid in init-device output")
        .to_string();
    Made {
        cred: out.join("device.cred"),
        voucher: out.join("voucher.pem"),
        mfg_key: mfg.join("manufacturer-p256.key"),
        dir: out,
        guid,
    }
}

/// Extend a made device's voucher to the owner certificate `owner_pem`; returns the path.
pub fn extend_to(m: &Made, owner_pem: &str, tag: &str) -> PathBuf {
    let owner = m.dir.join(format!("owner-{tag}.crt"));
    std::fs::write(&owner, owner_pem).expect("write owner cert");
    let out = m.dir.join(format!("voucher-{tag}.pem"));
    run_ok(&[
        "voucher",
        "extend",
        "--voucher",
        s(&m.voucher),
        "--key",
        s(&m.mfg_key),
        "--to",
        s(&owner),
        "--out",
        s(&out),
    ]);
    out
}

/// A device made for the running gateway `gw`: made with the gateway's FDO listener as its
/// rendezvous server, its voucher extended to the gateway's owner key and imported there
/// (which starts the gateway's TO0 for it).
pub fn made_for_gateway(gw: &super::Gateway, work: &Path, name: &str) -> Made {
    let fdo = gw.ep.fdo.expect("gateway FDO listener");
    let dev = make_device(work, name, fdo);
    let owner = gw.cli(&["voucher", "owner-cert"]);
    assert!(owner.status.success(), "owner-cert failed");
    let v = extend_to(&dev, &String::from_utf8_lossy(&owner.stdout), "gw");
    let out = gw.cli(&["voucher", "import", s(&v)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dev
}

/// A running `outpost device`, its stdout events collected.
pub struct Agent {
    pub child: Child,
    pub state_dir: PathBuf,
    events: mpsc::Receiver<serde_json::Value>,
    pub seen: Vec<serde_json::Value>,
    log: PathBuf,
}

impl Agent {
    pub fn start(cred: &Path, state_dir: &Path, extra: &[&str]) -> Agent {
        let log = state_dir.with_extension("log");
        let err = std::fs::File::create(&log).expect("agent log");
        let mut child = Command::new(BIN)
            .args(["device", "--cred"])
            .arg(cred)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--interval", "200ms", "--keep-alive", "2s"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn outpost device");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Agent {
            child,
            state_dir: state_dir.to_path_buf(),
            events,
            seen: Vec::new(),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The next event with `"event": kind`, within `limit`.
    pub fn expect(&mut self, kind: &str, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == kind {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no {kind:?} event within {limit:?}; seen {:?}\n{}",
                    self.seen,
                    self.log()
                ),
            }
        }
    }

    /// The device's operational credentials, as mosquitto clients take them.
    pub fn creds(&self, client_id: &str) -> super::Creds {
        super::Creds {
            id: client_id.to_string(),
            cert: self.state_dir.join(outpost::device::MQTT_CERT),
            key: self.state_dir.join(outpost::device::MQTT_KEY),
            ca: self.state_dir.join(outpost::device::MQTT_CA),
            serial: String::new(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Onboard every device at once (TO1 + TO2, retrying as a device does); their GUIDs, in the
/// order they finished. `mqtt`: ask for the `outpost:mqtt` service info too.
pub async fn onboard_all(
    creds: Vec<outpost::fdo_wire::DeviceCredential>,
    mqtt: bool,
) -> Vec<String> {
    use outpost::fdo::client::{onboard_with_retry, DeviceOptions};
    let mut set = tokio::task::JoinSet::new();
    for c in creds {
        set.spawn(async move {
            onboard_with_retry(
                &c,
                &DeviceOptions {
                    mqtt,
                    ..Default::default()
                },
                Some(20),
            )
            .await
            .map(|o| o.credential.guid.hex())
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = set.join_next().await {
        ids.push(r.unwrap().expect("onboarding"));
    }
    ids
}
