//! The admin page in a real headless Chromium (issue 13, acceptance 1): log in, sort by
//! expiry, search a device, open a credential, renew it with the confirmation step and
//! watch its job go to succeeded while the page updates itself.
//!
//! The page is served in-process over `web::memory::MemoryOperator` (jobs move queued →
//! delivered → in progress → succeeded, one step every 700 ms); the browser part
//! (`common/browser.rs`) does not depend on it, so the same steps can drive the real
//! gateway. Screenshots go to a temporary directory, or to docs/screenshots/ with
//! `OUTPOST_SCREENSHOTS=1`.

#[path = "common/browser.rs"]
mod browser;

use browser::Browser;
use outpost::credentials::model::{Credential, Kind};
use outpost::web::{self, memory::MemoryOperator, Admins, WebConfig, WebState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "s3cret admin passphrase";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn screenshot_dir(tmp: &std::path::Path) -> PathBuf {
    if std::env::var_os("OUTPOST_SCREENSHOTS").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
    } else {
        tmp.join("screenshots")
    }
}

fn is_sorted<T: PartialOrd>(v: &[T], desc: bool) -> bool {
    v.windows(2)
        .all(|w| if desc { w[0] >= w[1] } else { w[0] <= w[1] })
}

async fn not_afters(b: &Browser) -> Vec<i64> {
    b.attrs("#inventory tbody td.not-after", "data-value")
        .await
        .iter()
        .map(|v| v.parse().expect("a not-after value"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_sorts_searches_and_renews_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    web::set_password(dir.path(), "alice", PASSWORD).unwrap();
    let t = now();
    let mut creds = web::memory::sample_fleet(120, t);
    // The device the admin looks for: one certificate, one key.
    let mut target = Credential::new(
        Credential::cert_id("7a11c0ffee"),
        Kind::Certificate,
        "7a11c0ffee".into(),
        "brake-ecu-7".into(),
        t - 86_400,
    );
    target.vehicle = Some("VIN-TEST-7".into());
    target.ecu = Some("brake".into());
    target.issuer = "outpost gateway CA".into();
    target.not_before = Some(t - 300 * 86_400);
    target.not_after = Some(t + 12 * 86_400);
    target.log(t - 86_400, "issued", "ca", "");
    let mut key = Credential::new(
        "key:brake-ecu-7:secoc".into(),
        Kind::SymmetricKey,
        "secoc-1".into(),
        "brake-ecu-7".into(),
        t,
    );
    key.not_after = Some(t + 200 * 86_400);
    creds.push(target);
    creds.push(key);
    let ops = MemoryOperator::new(creds, 30 * 86_400, Duration::from_millis(700));
    let admins = Admins::open(dir.path().join("admins.toml")).unwrap();
    let cfg = WebConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..WebConfig::default()
    };
    let listener = web::bind(&cfg).await.unwrap().expect("enabled");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(web::serve(
        listener,
        WebState {
            credentials: Arc::new(ops),
            admins: Arc::new(admins),
            config: cfg,
            tls: None,
        },
        stop.clone(),
    ));
    let shots = screenshot_dir(dir.path());

    let b = Browser::start().await;
    // Without a session the page sends the browser to the login.
    b.client.goto(&format!("{base}/credentials")).await.unwrap();
    b.wait_for("#login-form").await;
    // A wrong password: the generic error, still on the login page.
    b.client.goto(&format!("{base}/login")).await.unwrap();
    b.wait_for("#user").await.send_keys("alice").await.unwrap();
    b.wait_for("#password")
        .await
        .send_keys("wrong")
        .await
        .unwrap();
    b.click("#login").await;
    let e = b.wait_for("#login-error").await.text().await.unwrap();
    assert_eq!(e, "Wrong user or password.");
    b.login(&base, "alice", PASSWORD).await;

    // Sort by holder, then by expiry (ascending, then descending on a second click).
    b.click("th[data-sort=holder] a").await;
    b.wait_for("th[data-sort=holder][aria-sort=ascending]")
        .await;
    let holders = b.texts("#inventory tbody td.holder").await;
    assert!(is_sorted(&holders, false), "{holders:?}");
    b.click("th[data-sort=not-after] a").await;
    b.wait_for("th[data-sort=not-after][aria-sort=ascending]")
        .await;
    let asc = not_afters(&b).await;
    assert_eq!(asc.len(), 50, "a page of 50 rows");
    assert!(is_sorted(&asc, false), "{asc:?}");
    b.click("th[data-sort=not-after] a").await;
    b.wait_for("th[data-sort=not-after][aria-sort=descending]")
        .await;
    let desc = not_afters(&b).await;
    assert!(is_sorted(&desc, true), "{desc:?}");
    assert!(desc[0] > asc[0]);
    let count = b.wait_for("#count").await.text().await.unwrap();
    assert_eq!(count, "Rows 1–50 of 122");
    // The next page continues the order.
    b.click("#next").await;
    b.wait_for("#prev").await;
    let next = not_afters(&b).await;
    assert!(next[0] <= desc[49], "{} then {}", desc[49], next[0]);
    b.click("th[data-sort=not-after] a").await;
    b.wait_for("th[data-sort=not-after][aria-sort=ascending]")
        .await;
    b.screenshot(&shots.join("inventory.png")).await;

    // Search a device.
    let search = b.wait_for("#search").await;
    search.send_keys("brake-ecu-7").await.unwrap();
    b.click("#apply").await;
    b.wait_for("#inventory tbody tr[data-id='cert:7a11c0ffee']")
        .await;
    let ids = b.attrs("#inventory tbody tr", "data-id").await;
    assert_eq!(
        ids,
        ["cert:7a11c0ffee", "key:brake-ecu-7:secoc"],
        "sorted by expiry"
    );
    assert_eq!(
        b.wait_for("#count").await.text().await.unwrap(),
        "Rows 1–2 of 2"
    );

    // Open the certificate: a certificate is renewed, never rotated.
    b.click("tr[data-id='cert:7a11c0ffee'] td.id a").await;
    b.wait_for("#credential[data-id='cert:7a11c0ffee']").await;
    let ops = b.attrs("#operations button", "data-op").await;
    assert_eq!(ops, ["renew", "invalidate", "delete"]);
    assert_eq!(b.texts("#op-state").await, ["issued"]);
    b.click("button[data-op=renew]").await;
    b.wait_for("#confirm[data-op=renew]").await;
    b.wait_for("#reason")
        .await
        .send_keys("scheduled renewal")
        .await
        .unwrap();
    b.click("#confirm").await;

    // Back on the detail page: the job shows, and the page follows it by itself.
    b.wait_for("#jobs .job-state").await;
    b.screenshot(&shots.join("detail-running.png")).await;
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The page replaces the section (and reloads at the end): find it anew each time.
        let states = b.texts("#jobs .job-state").await;
        if let Some(s) = states.first() {
            if seen.last() != Some(s) {
                seen.push(s.clone());
            }
            if s == "succeeded" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the job did not end on the page: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        seen.len() >= 2 && seen[0] != "succeeded",
        "the page showed the job's progress: {seen:?}"
    );
    // Once every job ended the page reloads: the record says renewed, names its successor.
    b.wait_for("#jobs[data-active=false]").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.texts("#op-state").await != ["renewed"] {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            b.texts("#op-state").await
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let successor = b.texts("dd[data-field=replaced-by]").await;
    assert!(successor[0].starts_with("cert:7a11c0ffee"), "{successor:?}");
    // Renewed for good: no operation is offered any more.
    assert!(b.attrs("#operations button", "data-op").await.is_empty());
    b.wait_for("#no-operations").await;
    let history = b.texts("#history td.what").await;
    assert!(history.iter().any(|w| w == "renew"), "{history:?}");
    b.screenshot(&shots.join("detail.png")).await;

    // Logging out ends the session: the page asks for the login again.
    b.click("#logout").await;
    b.wait_for("#login-form").await;
    b.client.goto(&format!("{base}/credentials")).await.unwrap();
    b.wait_for("#login-form").await;

    b.close().await;
    stop.cancel();
    server.await.unwrap().unwrap();
    for f in ["inventory.png", "detail-running.png", "detail.png"] {
        let png = std::fs::read(shots.join(f)).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{f}");
    }
}
