//! The admin page served in-process over [`MemoryOperator`]: every route needs a session,
//! CSRF and origin checks, the login throttle, escaping, and the query parameters reaching
//! the query.

use super::memory::{sample_fleet, MemoryOperator};
use super::*;
use crate::credentials::model::{Credential, Kind, SortKey};
use axum::http::Request as HttpRequest;

struct T {
    router: Router,
    ops: Arc<MemoryOperator>,
    _dir: tempfile::TempDir,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

const PASSWORD: &str = "correct horse battery";

fn fixture(creds: Vec<Credential>, cfg: WebConfig) -> T {
    let dir = tempfile::tempdir().unwrap();
    set_password(dir.path(), "alice", PASSWORD).unwrap();
    let admins = Admins::open(dir.path().join("admins.toml")).unwrap();
    let ops = Arc::new(MemoryOperator::new(
        creds,
        30 * 86_400,
        Duration::from_millis(50),
    ));
    let state = WebState {
        credentials: ops.clone(),
        admins: Arc::new(admins),
        config: cfg,
        tls: None,
    };
    T {
        router: router(state),
        ops,
        _dir: dir,
    }
}

fn fast() -> WebConfig {
    WebConfig {
        failure_delay: Duration::from_millis(1),
        ..WebConfig::default()
    }
}

fn now() -> i64 {
    now_unix()
}

impl T {
    async fn send(&self, req: HttpRequest<Body>) -> Resp {
        let mut req = req;
        if req.extensions().get::<ConnectInfo<SocketAddr>>().is_none() {
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        }
        let resp = self.router.clone().call(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Resp {
        let mut b = HttpRequest::get(path).header("host", "127.0.0.1:8090");
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        self.send(b.body(Body::empty()).unwrap()).await
    }

    async fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Resp {
        let mut b = HttpRequest::post(path)
            .header("host", "127.0.0.1:8090")
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Body::from(body.to_string())).unwrap())
            .await
    }

    async fn login_from(&self, user: &str, password: &str, ip: [u8; 4]) -> Resp {
        let body = format!(
            "user={}&password={}",
            html::url_component(user),
            html::url_component(password)
        );
        let mut req = HttpRequest::post("/login")
            .header("host", "127.0.0.1:8090")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from((ip, 5555))));
        self.send(req).await
    }

    /// Log in as alice: the cookie (`outpost_session=...`) and the CSRF token.
    async fn login(&self) -> (String, String) {
        let r = self.login_from("alice", PASSWORD, [127, 0, 0, 1]).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let set = r
            .headers
            .get("set-cookie")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let cookie = set.split(';').next().unwrap().to_string();
        let s = self.get("/api/session", Some(&cookie)).await;
        assert_eq!(s.status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&s.body).unwrap();
        (cookie, v["csrf"].as_str().unwrap().to_string())
    }
}

fn cert(serial: &str, holder: &str, not_after: i64) -> Credential {
    let mut c = Credential::new(
        Credential::cert_id(serial),
        Kind::Certificate,
        serial.into(),
        holder.into(),
        now(),
    );
    c.not_before = Some(now() - 86_400);
    c.not_after = Some(not_after);
    c
}

/// Every route, with a method it answers.
const ROUTES: [(&str, &str); 17] = [
    ("GET", "/"),
    ("GET", "/credentials"),
    ("GET", "/credentials?sort=holder"),
    ("GET", "/credentials/cert%3A01"),
    ("GET", "/credentials/cert%3A01/jobs"),
    ("GET", "/credentials/cert%3A01/confirm/renew"),
    ("POST", "/credentials/cert%3A01/op/renew"),
    ("POST", "/jobs/0011/cancel"),
    ("POST", "/logout"),
    ("GET", "/api/session"),
    ("GET", "/api/credentials"),
    ("GET", "/api/credentials/cert%3A01"),
    ("POST", "/api/credentials/cert%3A01/renew"),
    ("POST", "/api/jobs/0011/cancel"),
    ("GET", "/api/nothing-here"),
    ("GET", "/no/such/page"),
    ("PUT", "/credentials"),
];

#[tokio::test]
async fn no_answer_without_a_session() {
    let t = fixture(vec![cert("01", "dev-1", now() + 1000)], fast());
    for cookie in [
        None,
        Some("outpost_session=nonsense"),
        Some(&*format!("outpost_session={}", "ab".repeat(32))),
    ] {
        for (method, path) in ROUTES {
            let req = HttpRequest::builder()
                .method(method)
                .uri(path)
                .header("host", "127.0.0.1:8090");
            let req = match cookie {
                Some(c) => req.header("cookie", c),
                None => req,
            };
            let r = t.send(req.body(Body::empty()).unwrap()).await;
            if path.starts_with("/api/") {
                assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}");
                assert!(
                    r.body.contains("log in first"),
                    "{method} {path}: {}",
                    r.body
                );
            } else {
                assert_eq!(r.status, StatusCode::SEE_OTHER, "{method} {path}");
                assert_eq!(r.headers["location"], "/login", "{method} {path}");
            }
            assert!(!r.body.contains("dev-1"), "{method} {path} leaked data");
        }
    }
    assert!(t.ops.jobs().is_empty());
    // The login page and the assets need none.
    assert_eq!(t.get("/login", None).await.status, StatusCode::OK);
    assert_eq!(t.get("/assets/app.css", None).await.status, StatusCode::OK);
    assert_eq!(t.get("/assets/app.js", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_login_gives_a_strict_http_only_cookie_and_logout_ends_it() {
    let t = fixture(vec![cert("01", "dev-1", now() + 1000)], fast());
    let r = t.login_from("alice", PASSWORD, [127, 0, 0, 1]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.headers["location"], "/credentials");
    let set = r.headers["set-cookie"].to_str().unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    // Plain HTTP: a Secure cookie would never come back.
    assert!(!set.contains("Secure"), "{set}");
    let id = set
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("outpost_session=")
        .unwrap();
    assert_eq!(id.len(), 64);
    let cookie = format!("outpost_session={id}");
    let page = t.get("/credentials", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("dev-1"));
    let (_, csrf) = t.login().await;
    // Logging out needs the CSRF token of that session: the other session's is refused.
    let wrong = t
        .post("/logout", Some(&cookie), &[], &format!("csrf={csrf}"))
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    let s = t.get("/api/session", Some(&cookie)).await;
    let mine: serde_json::Value = serde_json::from_str(&s.body).unwrap();
    let mine = mine["csrf"].as_str().unwrap();
    let out = t
        .post("/logout", Some(&cookie), &[], &format!("csrf={mine}"))
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(out.headers["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(
        t.get("/credentials", Some(&cookie)).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn removing_an_admin_ends_its_open_sessions() {
    let t = fixture(vec![cert("01", "dev-1", now() + 1000)], fast());
    let (cookie, _) = t.login().await;
    assert_eq!(
        t.get("/api/credentials", Some(&cookie)).await.status,
        StatusCode::OK
    );
    assert!(admins::remove(&t._dir.path().join("admins.toml"), "alice").unwrap());
    assert_eq!(
        t.get("/api/credentials", Some(&cookie)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // The session is gone, not just refused once: adding alice back does not revive it.
    set_password(t._dir.path(), "alice", PASSWORD).unwrap();
    assert_eq!(
        t.get("/api/credentials", Some(&cookie)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        t.get("/credentials", Some(&cookie)).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn state_changes_need_the_sessions_csrf_token_and_this_origin() {
    let t = fixture(vec![cert("01", "dev-1", now() + 1000)], fast());
    let (cookie, csrf) = t.login().await;
    let c = Some(cookie.as_str());
    let op = "/credentials/cert%3A01/op/renew";
    let api = "/api/credentials/cert%3A01/renew";
    let flipped = {
        let mut b = csrf.clone().into_bytes();
        b[0] = if b[0] == b'a' { b'b' } else { b'a' };
        String::from_utf8(b).unwrap()
    };
    for (path, headers, body) in [
        (op, vec![], "reason=x".to_string()),
        (op, vec![], format!("csrf={flipped}")),
        (op, vec![], "csrf=".to_string()),
        (api, vec![], String::new()),
        (api, vec![("x-csrf-token", flipped.as_str())], String::new()),
        // The right token, but the browser says the request comes from elsewhere.
        (
            op,
            vec![("origin", "http://evil.example")],
            format!("csrf={csrf}"),
        ),
        (
            op,
            vec![("sec-fetch-site", "cross-site")],
            format!("csrf={csrf}"),
        ),
        (
            api,
            vec![("x-csrf-token", csrf.as_str()), ("origin", "null")],
            String::new(),
        ),
    ] {
        let r = t.post(path, c, &headers, &body).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path} {headers:?} {body}");
    }
    assert!(
        t.ops.jobs().is_empty(),
        "a refused request changed something"
    );
    // A login posted from another site (login CSRF) is refused before the password is
    // looked at.
    let r = t
        .post(
            "/login",
            None,
            &[("origin", "http://evil.example")],
            &format!("user=alice&password={}", html::url_component(PASSWORD)),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.headers.get("set-cookie").is_none());
    // The right token in the form, from this origin: done.
    let r = t
        .post(
            op,
            c,
            &[
                ("origin", "http://127.0.0.1:8090"),
                ("sec-fetch-site", "same-origin"),
            ],
            &format!("csrf={csrf}&reason=test"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.headers["location"], "/credentials/cert%3A01");
    assert_eq!(t.ops.jobs().len(), 1);
    assert_eq!(t.ops.jobs()[0].by, "admin:alice");
    assert_eq!(t.ops.jobs()[0].reason, "test");
}

#[tokio::test]
async fn a_brute_force_locks_out_the_user_and_the_address() {
    let cfg = WebConfig {
        max_failures: 3,
        failure_delay: Duration::from_millis(20),
        ..WebConfig::default()
    };
    let t = fixture(vec![], cfg);
    let ip = [10, 0, 0, 9];
    let mut took = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let r = t.login_from("alice", "guess", ip).await;
        took.push(start.elapsed());
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.body.contains("Wrong user or password."));
        assert!(r.headers.get("set-cookie").is_none());
    }
    // The delay grows: 20, 40, 80 ms at least.
    assert!(took[2] >= Duration::from_millis(80), "{took:?}");
    // Locked: the right password fails too, from this address and from another one.
    for from in [ip, [10, 0, 0, 10]] {
        let r = t.login_from("alice", PASSWORD, from).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{from:?}");
        assert!(r.body.contains("Too many failed logins"));
        assert!(r.headers.get("set-cookie").is_none());
    }
    // The address is locked for any user name.
    let r = t.login_from("bob", "whatever", ip).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // An unknown user and a wrong password read the same.
    let fresh = fixture(vec![], fast());
    let a = fresh.login_from("nobody", "guess", [10, 1, 1, 1]).await;
    let b = fresh.login_from("alice", "guess", [10, 1, 1, 2]).await;
    assert_eq!((a.status, a.body), (b.status, b.body));
}

#[tokio::test]
async fn hostile_values_are_escaped_everywhere() {
    let mut c = cert("01", "<script>alert(1)</script>", now() + 1000);
    c.vehicle = Some("\"><img src=x onerror=alert(2)>".into());
    c.audit = vec!["<b>shared</b>".into()];
    c.log(now(), "audit", "device:'><svg onload=alert(3)>", "<iframe>");
    let t = fixture(vec![c], fast());
    let (cookie, _) = t.login().await;
    for path in [
        "/credentials",
        "/credentials?search=%3Cscript%3E",
        "/credentials/cert%3A01",
        "/credentials/cert%3A01/confirm/renew",
    ] {
        let r = t.get(path, Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        for bad in [
            "<script>alert",
            "<img src=x",
            "<svg",
            "<iframe",
            "<b>shared",
        ] {
            assert!(!r.body.contains(bad), "{path} carries {bad}");
        }
        assert!(
            r.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{path}"
        );
    }
    // The search box echoes the search escaped.
    let r = t
        .get("/credentials?search=%22%3E%3Cscript%3E", Some(&cookie))
        .await;
    assert!(r.body.contains("value=\"&quot;&gt;&lt;script&gt;\""));
}

#[tokio::test]
async fn sort_filter_and_page_parameters_reach_the_query() {
    let t = fixture(sample_fleet(60, now()), fast());
    let (cookie, _) = t.login().await;
    let qs = "search=dev&sort=holder&desc=true&kind=certificate&op_state=issued&validity=valid\
              &server=gateway&holder=dev-0003&vehicle=VIN00001&ecu=brake&expiring_days=400\
              &audit=true&offset=10&limit=25";
    let want = params::parse(Some(qs)).unwrap();
    for base in ["/credentials", "/api/credentials"] {
        let r = t.get(&format!("{base}?{qs}"), Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::OK, "{base}");
        assert_eq!(t.ops.last_query().unwrap(), want, "{base}");
    }
    // Every sort key, both ways, through the API: the rows come in that order.
    for key in SortKey::ALL {
        for desc in [false, true] {
            let r = t
                .get(
                    &format!(
                        "/api/credentials?sort={}&desc={desc}&limit=500",
                        key.as_str()
                    ),
                    Some(&cookie),
                )
                .await;
            let page: Page = serde_json::from_str(&r.body).unwrap();
            assert_eq!(page.rows.len(), 60);
            let q = Query {
                sort: key,
                desc,
                ..Query::default()
            };
            for w in page.rows.windows(2) {
                assert_ne!(
                    q.compare(&w[0], &w[1]),
                    std::cmp::Ordering::Greater,
                    "{key:?} {desc}"
                );
            }
        }
    }
    // The page links every column header to its sort, and pages.
    let r = t.get("/credentials?limit=25", Some(&cookie)).await;
    for key in [
        "id",
        "kind",
        "holder",
        "vehicle",
        "ecu",
        "server",
        "not-after",
        "op-state",
        "op-date",
        "last-seen",
    ] {
        assert!(r.body.contains(&format!("data-sort=\"{key}\"")), "{key}");
    }
    assert!(r.body.contains("Rows 1–25 of 60"), "{}", r.body);
    assert!(r.body.contains("id=\"next\""));
    assert!(r
        .body
        .contains("href=\"/credentials?offset=25&amp;limit=25\""));
    let r = t
        .get("/credentials?limit=25&offset=50", Some(&cookie))
        .await;
    assert!(
        r.body.contains("Rows 51–60 of 60")
            && !r.body.contains("id=\"next\"")
            && r.body.contains("id=\"prev\"")
    );
}

#[tokio::test]
async fn bad_parameters_and_unknown_ids_are_clear_errors() {
    let t = fixture(vec![cert("01", "dev-1", now() + 1000)], fast());
    let (cookie, csrf) = t.login().await;
    let c = Some(cookie.as_str());
    for (qs, field) in [
        ("sort=colour", "sort"),
        ("limit=0", "limit"),
        ("bogus=1", "bogus"),
        ("kind=car", "kind"),
    ] {
        let r = t.get(&format!("/api/credentials?{qs}"), c).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{qs}");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["field"], field, "{qs}");
        let p = t.get(&format!("/credentials?{qs}"), c).await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST);
        assert!(p.body.contains("id=\"query-error\""));
    }
    assert_eq!(
        t.get("/api/credentials/cert%3Anope", c).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        t.get("/credentials/cert%3Anope", c).await.status,
        StatusCode::NOT_FOUND
    );
    let h = [("x-csrf-token", csrf.as_str())];
    let r = t
        .post("/api/credentials/cert%3Anope/renew", c, &h, "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .post("/api/credentials/cert%3A01/explode", c, &h, "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // A certificate is not rotated.
    let r = t.post("/api/credentials/cert%3A01/rotate", c, &h, "").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = t
        .post("/api/credentials/cert%3A01/renew", c, &h, "{\"reason\": 5}")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = t
        .post(
            "/api/credentials/cert%3A01/renew",
            c,
            &h,
            &"x".repeat(MAX_BODY + 1),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(t.ops.jobs().is_empty());
    assert_eq!(
        t.post("/api/jobs/nope/cancel", c, &h, "").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let t = fixture(vec![cert("01", "dev-1", now() + 1000)], fast());
    let (cookie, _) = t.login().await;
    for (path, c) in [
        ("/login", None),
        ("/credentials", Some(cookie.as_str())),
        ("/api/credentials", Some(cookie.as_str())),
        ("/api/credentials", None),
        ("/credentials", None),
    ] {
        let r = t.get(path, c).await;
        let h = &r.headers;
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'self'"),
            "{path}"
        );
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
    }
}

#[tokio::test]
async fn an_operation_runs_to_its_end_and_a_running_job_can_be_canceled() {
    let t = fixture(
        vec![
            cert("01", "dev-1", now() + 1000),
            cert("02", "dev-2", now() + 1000),
        ],
        fast(),
    );
    let (cookie, csrf) = t.login().await;
    let c = Some(cookie.as_str());
    let h = [("x-csrf-token", csrf.as_str())];
    let r = t
        .post(
            "/api/credentials/cert%3A01/renew",
            c,
            &h,
            "{\"reason\":\"rotation day\"}",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let jobs: Vec<Job> = serde_json::from_str(&r.body).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].device, "dev-1");
    let page = t.get("/credentials/cert%3A01", c).await;
    assert!(page.body.contains("data-active=\"true\""));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let d: Detail =
            serde_json::from_str(&t.get("/api/credentials/cert%3A01", c).await.body).unwrap();
        if d.jobs[0].state == crate::credentials::model::JobState::Succeeded {
            assert_eq!(
                d.credential.op_state,
                crate::credentials::model::OpState::Renewed
            );
            assert!(d.credential.replaced_by.is_some());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job did not end: {:?}",
            d.jobs[0].state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let page = t.get("/credentials/cert%3A01", c).await;
    assert!(page.body.contains("data-active=\"false\""));
    assert!(page.body.contains("b-succeeded"));
    // Cancel one that runs: through the form.
    let r = t
        .post("/api/credentials/cert%3A02/invalidate", c, &h, "")
        .await;
    let jobs: Vec<Job> = serde_json::from_str(&r.body).unwrap();
    let r = t
        .post(
            &format!("/jobs/{}/cancel", jobs[0].id),
            c,
            &[],
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let d: Detail =
        serde_json::from_str(&t.get("/api/credentials/cert%3A02", c).await.body).unwrap();
    assert_eq!(
        d.jobs[0].state,
        crate::credentials::model::JobState::Canceled
    );
    assert_eq!(
        d.credential.op_state,
        crate::credentials::model::OpState::Issued
    );
    // Canceling it again: it has ended.
    let r = t
        .post(&format!("/api/jobs/{}/cancel", jobs[0].id), c, &h, "")
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

async fn read_all<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn over_tls_the_cookie_is_secure_and_web_tls_never_falls_back_to_plain() {
    use tokio::io::AsyncWriteExt;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let tls = tls_config(&cert.pem(), &key.serialize_pem()).unwrap();
    assert!(tls_config("nonsense", "nonsense").is_err());
    let dir = tempfile::tempdir().unwrap();
    set_password(dir.path(), "alice", PASSWORD).unwrap();
    let state = |tls: Option<Arc<rustls::ServerConfig>>| WebState {
        credentials: Arc::new(MemoryOperator::new(vec![], 0, Duration::from_millis(10))),
        admins: Arc::new(Admins::open(dir.path().join("admins.toml")).unwrap()),
        config: WebConfig {
            tls: true,
            ..fast()
        },
        tls,
    };
    // web.tls without a certificate: no plain HTTP instead.
    let l = crate::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let e = serve(l, state(None), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("web.tls"), "{e}");

    let l = crate::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(l, state(Some(tls)), stop.clone()));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let body = format!("user=alice&password={}", html::url_component(PASSWORD));
    let req = format!(
        "POST /login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let answer = read_all(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let cookie = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_default();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // An admin's pinned client certificate logs it in without a password; another
    // certificate, or none, does not.
    let client_cert = |name: &str| {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let c = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&k)
            .unwrap();
        (c, k)
    };
    let (carol, carol_key) = client_cert("carol");
    let (mallory, mallory_key) = client_cert("carol");
    admins::set_certificate(&dir.path().join("admins.toml"), "carol", Some(carol.der())).unwrap();
    let ask = |c: Option<(&rcgen::Certificate, &rcgen::KeyPair)>| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let cfg = match c {
            Some((c, k)) => b
                .with_client_auth_cert(
                    vec![c.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(k.serialize_der().into()),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(
                    rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            s.write_all(
                b"GET /api/session HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            read_all(&mut s).await
        }
    };
    let a = ask(Some((&carol, &carol_key))).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert!(
        a.contains("\"user\":\"carol\"")
            && a.to_ascii_lowercase()
                .contains("set-cookie: outpost_session="),
        "{a}"
    );
    let a = ask(Some((&mallory, &mallory_key))).await;
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    let a = ask(None).await;
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    // Unpinned: the certificate no longer opens a session.
    admins::set_certificate(&dir.path().join("admins.toml"), "carol", None).unwrap();
    let a = ask(Some((&carol, &carol_key))).await;
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    // Plain HTTP to the TLS port gets no page.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = read_all(&mut tcp).await;
    assert!(!answer.contains("HTTP/1.1 200"), "{answer}");
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_idle_session_ends() {
    let cfg = WebConfig {
        session_idle: Duration::from_millis(150),
        ..fast()
    };
    let t = fixture(vec![cert("01", "dev-1", now() + 1000)], cfg);
    let (cookie, _) = t.login().await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            t.get("/credentials", Some(&cookie)).await.status,
            StatusCode::OK
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = t.get("/credentials", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        t.get("/api/credentials", Some(&cookie)).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[test]
fn pages_offer_only_what_the_kind_allows_and_say_more_than_past_the_cap() {
    let a = Authed {
        user: "alice".into(),
        csrf: "tok".into(),
    };
    let mut key = Credential::new(
        "key:h:k".into(),
        Kind::SymmetricKey,
        "k".into(),
        "h".into(),
        0,
    );
    key.not_after = Some(1000);
    let d = Detail {
        validity: key.validity(0, 10),
        credential: key.clone(),
        jobs: vec![],
    };
    let html = pages::detail(&a, &d);
    for (op, shown) in [
        ("renew", false),
        ("invalidate", true),
        ("delete", true),
        ("rotate", true),
    ] {
        assert_eq!(html.contains(&format!("data-op=\"{op}\"")), shown, "{op}");
    }
    let page = Page {
        rows: vec![key.clone(); 50],
        total: crate::credentials::model::COUNT_CAP,
        exact: false,
    };
    let html = pages::inventory(&a, &Query::default(), Some(&page), None, 0, 10);
    assert!(html.contains("Rows 1–50 of more than 100000"), "{html}");
    assert!(html.contains("id=\"next\""));
    let exact = Page {
        rows: vec![key; 3],
        total: 3,
        exact: true,
    };
    let html = pages::inventory(&a, &Query::default(), Some(&exact), None, 0, 10);
    assert!(html.contains("Rows 1–3 of 3") && !html.contains("id=\"next\""));
}
