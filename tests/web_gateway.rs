//! Issue 13, acceptance 1, on the real gateway: a security admin in a real headless
//! Chromium logs in to the page `outpost run` serves, sorts the inventory by expiry,
//! searches a device, renews its certificate (the real device agent makes the key and CSR)
//! and watches the job go to succeeded, then invalidates another device's certificate and
//! sees its live MQTT session (a stock `mosquitto_sub`) cut. Screenshots go to
//! docs/screenshots/ with `OUTPOST_SCREENSHOTS=1`.

#[path = "common/browser.rs"]
mod browser;
mod common;

use browser::Browser;
use common::security_helpers::{Proc, LIMIT as SEC_LIMIT};
use common::{tls_args, Gateway, BIN};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "a long admin passphrase";

fn shots(tmp: &Path) -> PathBuf {
    if std::env::var_os("OUTPOST_SCREENSHOTS").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
    } else {
        tmp.join("screenshots")
    }
}

async fn wait_text(b: &Browser, css: &str, want: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let t = b.texts(css).await;
        if let Some(s) = t.first() {
            if seen.last() != Some(s) {
                seen.push(s.clone());
            }
            if s == want {
                return seen;
            }
        }
        assert!(Instant::now() < deadline, "{css} never {want:?}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_renews_one_certificate_and_invalidates_another_in_a_real_browser() {
    common::require_mosquitto();
    let gw = Gateway::start_with(
        "[credentials]\ninvalidate_grace = \"1s\"\nretry_min = \"1s\"\nretry_max = \"2s\"\n",
    );
    // An admin, as the README says.
    let mut add = Command::new(BIN)
        .args([
            "credentials",
            "admin",
            "add",
            "alice",
            "--password-stdin",
            "--config",
        ])
        .arg(&gw.config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(add.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    assert!(add.wait().unwrap().success());
    // A small fleet: a dozen certificates, then the two the admin works on.
    for i in 0..12 {
        gw.issue(&format!("fleet-{i:02}"));
    }
    let a = gw.issue("web-a");
    let b_dev = gw.issue("web-b");
    let dir = common::agent_state(gw.dir.path(), &gw, &a);
    let mut agent = common::spawn_agent(&dir);
    agent.wait_for(SEC_LIMIT, "agent connected", |l| {
        l.contains(r#""event":"connected""#)
    });
    let mut sub = Proc::subscriber(tls_args(gw.mqtts(), &b_dev), "devices/web-b/#", 1);
    let base = format!("http://{}", gw.ep.web.expect("the admin page is on"));
    let tmp = tempfile::tempdir().unwrap();
    let shots = shots(tmp.path());

    let b = Browser::start().await;
    b.client.goto(&format!("{base}/credentials")).await.unwrap();
    b.wait_for("#login-form").await;
    b.login(&base, "alice", PASSWORD).await;

    // Sort by holder, then by expiry: the rows come in not-after order (both ways).
    b.click("th[data-sort=holder] a").await;
    b.wait_for("th[data-sort=holder][aria-sort=ascending]")
        .await;
    b.click("th[data-sort=not-after] a").await;
    b.wait_for("th[data-sort=not-after][aria-sort=ascending]")
        .await;
    let asc: Vec<i64> = b
        .attrs("#inventory tbody td.not-after", "data-value")
        .await
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(asc.len(), 14, "{asc:?}");
    assert!(asc.windows(2).all(|w| w[0] <= w[1]), "{asc:?}");
    b.click("th[data-sort=not-after] a").await;
    b.wait_for("th[data-sort=not-after][aria-sort=descending]")
        .await;
    let desc: Vec<i64> = b
        .attrs("#inventory tbody td.not-after", "data-value")
        .await
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(desc.windows(2).all(|w| w[0] >= w[1]), "{desc:?}");
    b.screenshot(&shots.join("gateway-inventory.png")).await;

    // Search the device and renew its certificate.
    let a_id = format!("cert:{}", a.serial);
    b.wait_for("#search")
        .await
        .send_keys("web-a")
        .await
        .unwrap();
    b.click("#apply").await;
    b.wait_for(&format!("#inventory tbody tr[data-id='{a_id}']"))
        .await;
    assert_eq!(
        b.attrs("#inventory tbody tr", "data-id").await,
        std::slice::from_ref(&a_id)
    );
    b.click(&format!("tr[data-id='{a_id}'] td.id a")).await;
    b.wait_for(&format!("#credential[data-id='{a_id}']")).await;
    b.click("button[data-op=renew]").await;
    b.wait_for("#confirm[data-op=renew]").await;
    b.click("#confirm").await;
    b.wait_for("#jobs .job-state").await;
    let seen = wait_text(&b, "#jobs .job-state", "succeeded").await;
    assert!(seen.len() >= 2, "the page followed the job: {seen:?}");
    wait_text(&b, "#op-state", "renewed").await;
    b.screenshot(&shots.join("gateway-renewed.png")).await;
    agent.wait_for(SEC_LIMIT, "the agent runs on its new certificate", |l| {
        l.contains(r#""event":"renewed""#)
    });

    // Invalidate web-b's certificate: its live session is cut.
    let b_id = format!("cert:{}", b_dev.serial);
    b.client
        .goto(&format!("{base}/credentials?search=web-b"))
        .await
        .unwrap();
    b.click(&format!("tr[data-id='{b_id}'] td.id a")).await;
    b.wait_for(&format!("#credential[data-id='{b_id}']")).await;
    assert!(sub.is_running());
    b.click("button[data-op=invalidate]").await;
    b.wait_for("#confirm[data-op=invalidate]").await;
    b.click("#confirm").await;
    b.wait_for("#jobs .job-state").await;
    assert!(
        sub.wait_exit(Duration::from_secs(20)).is_some(),
        "web-b's session was not cut: {:?}",
        sub.seen
    );
    assert!(
        sub.try_wait_for(Duration::from_secs(2), |l| l
            .contains("devices/web-b/commands/outpost/credentials"))
            .is_some(),
        "the command reached web-b first: {:?}",
        sub.seen
    );
    b.client
        .goto(&format!("{base}/credentials/{b_id}"))
        .await
        .unwrap();
    wait_text(&b, "#validity", "revoked").await;
    b.screenshot(&shots.join("gateway-invalidated.png")).await;
    assert!(gw.metric("outpost_forced_disconnects_total{reason=\"revoked\"}") >= 1);
    b.close().await;
}
