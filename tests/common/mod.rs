//! Test harness: starts the real `outpost` binary on 127.0.0.1:0 ports in a temp data dir
//! and talks to it over real sockets.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use outpost::Endpoints;

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub child: Option<Child>,
    pub ep: Endpoints,
}

/// Paths of a device's credentials as written by `outpost ca issue-device`.
#[derive(Clone, Debug)]
pub struct Creds {
    pub id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub serial: String,
}

pub fn base_config(data_dir: &Path, extra: &str) -> String {
    format!(
        r#"[gateway]
id = "gw-test"
data_dir = "{}"

[listeners]
mqtts = "127.0.0.1:0"
plain = "127.0.0.1:0"

[metrics]
listen = "127.0.0.1:0"

[mdns]
enabled = false

{extra}
"#,
        data_dir.display()
    )
}

impl Gateway {
    pub fn start() -> Gateway {
        Gateway::start_with("")
    }

    /// `extra` is TOML appended to the base config (sections not already in the base).
    pub fn start_with(extra: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("outpost.toml");
        std::fs::write(&config_path, base_config(&data_dir, extra)).expect("write config");
        let mut gw = Gateway {
            dir,
            data_dir,
            config_path,
            child: None,
            ep: Endpoints {
                gateway_id: String::new(),
                mqtts: "127.0.0.1:1".parse().unwrap(),
                plain: None,
                metrics: None,
                pid: 0,
            },
        };
        gw.spawn();
        gw
    }

    /// Start (again) the process on the same data dir and config.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.data_dir.join(outpost::ENDPOINTS_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("gateway.log"))
            .expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outpost");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(ep) = Endpoints::read(&self.data_dir) {
                if ep.pid == pid {
                    self.ep = ep;
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited early with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "gateway not ready in 30 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run outpost cli")
    }

    /// Issue a device certificate through the running gateway (or the store when stopped).
    pub fn issue(&self, id: &str) -> Creds {
        let out_dir = self.dir.path().join("devices").join(id);
        let out = self.cli(&["ca", "issue-device", "--id", id, "--out", out_dir.to_str().unwrap()]);
        assert!(out.status.success(), "issue-device failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let serial = text.split_whitespace().nth(3).unwrap_or_default().to_string();
        Creds {
            id: id.to_string(),
            cert: out_dir.join(format!("{id}.crt")),
            key: out_dir.join(format!("{id}.key")),
            ca: out_dir.join("ca.crt"),
            serial,
        }
    }

    pub fn revoke_id(&self, id: &str) {
        let out = self.cli(&["ca", "revoke", "--id", id]);
        assert!(out.status.success(), "revoke failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn mqtts(&self) -> SocketAddr {
        self.ep.mqtts
    }

    pub fn plain(&self) -> SocketAddr {
        self.ep.plain.expect("plain listener")
    }

    /// GET /metrics.
    pub fn metrics(&self) -> String {
        http_get(self.ep.metrics.expect("metrics listener"), "/metrics")
    }

    /// Value of one sample line (name with labels, exactly as rendered).
    pub fn metric(&self, sample: &str) -> i64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {sample} not found in:\n{text}"))
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let st = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
        assert!(st.success());
    }

    /// Wait for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(body)
}

/// Arguments that make a mosquitto client use a device's credentials.
pub fn tls_args(addr: SocketAddr, c: &Creds) -> Vec<String> {
    vec![
        "-h".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
        "--cafile".into(),
        c.ca.display().to_string(),
        "--cert".into(),
        c.cert.display().to_string(),
        "--key".into(),
        c.key.display().to_string(),
    ]
}

pub fn require_mosquitto() {
    let ok = Command::new("mosquitto_pub").arg("--help").output().is_ok();
    assert!(ok, "mosquitto-clients are not installed: run the README's test command (it installs them)");
}
