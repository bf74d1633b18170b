//! A real headless Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`, installed by scripts/test.sh): start chromedriver on a free port,
//! Chromium with a fresh profile, log in to the admin page, take screenshots.
//!
//! Used by tests/web_admin.rs as `#[path = "common/browser.rs"] mod browser;`; a test that
//! also uses the gateway harness can `pub mod browser;` it from `common/mod.rs`.
#![allow(dead_code)]

use fantoccini::{Client, ClientBuilder, Locator};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Chromium binary: `$OUTPOST_CHROMIUM`, else Debian's.
pub fn chromium_binary() -> PathBuf {
    std::env::var_os("OUTPOST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// chromedriver: `$OUTPOST_CHROMEDRIVER`, else Debian's.
pub fn chromedriver_binary() -> PathBuf {
    std::env::var_os("OUTPOST_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// chromedriver and the browser session it drives. Dropping it ends chromedriver (and
/// with it the browser).
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver and a headless Chromium. Panics, saying what to install, when
    /// either binary is missing.
    pub async fn start() -> Browser {
        let (chromium, driver_bin) = (chromium_binary(), chromedriver_binary());
        for b in [&chromium, &driver_bin] {
            assert!(
                b.exists(),
                "{} is missing: apt-get install chromium chromium-driver (scripts/test.sh does)",
                b.display()
            );
        }
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", driver_bin.display()));
        let profile = tempfile::tempdir().expect("a profile directory");
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--no-first-run".into(),
            "--window-size=1440,1000".into(),
            "--force-device-scale-factor=1".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": chromium.display().to_string(), "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver at {url}: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Open `base`/login and log in; returns once the inventory shows.
    pub async fn login(&self, base: &str, user: &str, password: &str) {
        let c = &self.client;
        c.goto(&format!("{base}/login"))
            .await
            .expect("the login page");
        c.find(Locator::Id("user"))
            .await
            .expect("#user")
            .send_keys(user)
            .await
            .expect("type the user");
        c.find(Locator::Id("password"))
            .await
            .expect("#password")
            .send_keys(password)
            .await
            .expect("type the password");
        c.find(Locator::Id("login"))
            .await
            .expect("#login")
            .click()
            .await
            .expect("click log in");
        self.wait_for("#inventory").await;
    }

    /// Wait (10 s at most) for an element matching `css`.
    pub async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    /// The texts of every element matching `css`.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.client.find_all(Locator::Css(css)).await.expect(css) {
            out.push(e.text().await.unwrap_or_default());
        }
        out
    }

    /// The attribute `attr` of every element matching `css`.
    pub async fn attrs(&self, css: &str, attr: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.client.find_all(Locator::Css(css)).await.expect(css) {
            out.push(e.attr(attr).await.ok().flatten().unwrap_or_default());
        }
        out
    }

    /// Click the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.wait_for(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.client.screenshot().await.expect("a screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot directory");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// End the browser session, then chromedriver, then whatever Chromium process of this
    /// profile is left.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        self.end_processes();
    }

    /// Stop chromedriver and every Chromium process started with this profile (found by its
    /// exact `--user-data-dir`, so no other browser on the machine is touched): TERM, then
    /// KILL after 3 s.
    fn end_processes(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let flag = format!("--user-data-dir={}", self._profile.path().display());
        let ours = || -> Vec<String> {
            let Ok(dir) = std::fs::read_dir("/proc") else {
                return Vec::new();
            };
            dir.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let pid = e.file_name().to_string_lossy().into_owned();
                    if !pid.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                    cmd.split(|b| *b == 0)
                        .any(|a| a == flag.as_bytes())
                        .then_some(pid)
                })
                .collect()
        };
        let signal = |sig: &str, pids: &[String]| {
            if !pids.is_empty() {
                let _ = Command::new("kill")
                    .arg(sig)
                    .args(pids)
                    .stderr(Stdio::null())
                    .status();
            }
        };
        signal("-TERM", &ours());
        let deadline = Instant::now() + Duration::from_secs(3);
        while !ours().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        signal("-KILL", &ours());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.end_processes();
    }
}
