//! The admin page's HTML, written with [`Html`] (every value escaped). Elements carry
//! stable ids, classes and data attributes for a WebDriver test and for scripts:
//! `#inventory`, `th[data-sort=<key>]`, `tr[data-id=<id>]`, `td.<column>`,
//! `button[data-op=<op>]`, `#confirm`, `#jobs`, `.job-state`.

use super::html::{url_component, Html};
use super::params::to_query_string;
use super::Authed;
use crate::credentials::model::{
    Credential, Kind, OpState, Operation, Page, Query, SortKey, Validity,
};
use crate::credentials::service::Detail;

/// `2026-12-04 03:59` (UTC) for Unix seconds.
pub fn date(t: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            d.year(),
            d.month() as u8,
            d.day(),
            d.hour(),
            d.minute()
        ),
        Err(_) => t.to_string(),
    }
}

fn opt_date(t: Option<i64>) -> String {
    t.map(date).unwrap_or_default()
}

fn head(h: &mut Html, title: &str, a: Option<&Authed>) {
    h.raw("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .raw("<title>")
        .text(title)
        .raw(" · Outpost</title><link rel=\"stylesheet\" href=\"/assets/app.css\">")
        .raw("<script src=\"/assets/app.js\" defer></script></head><body>")
        .raw("<header class=\"top\"><a class=\"brand\" href=\"/credentials\">Outpost</a>")
        .raw("<span class=\"section\">Credentials</span>");
    if let Some(a) = a {
        h.raw("<span class=\"who\" id=\"who\">")
            .text(&a.user)
            .raw("</span><form method=\"post\" action=\"/logout\" class=\"logout\">");
        csrf(h, a);
        h.raw("<button type=\"submit\" id=\"logout\">Log out</button></form>");
    }
    h.raw("</header><main>");
}

fn foot(mut h: Html) -> String {
    h.raw("</main></body></html>");
    h.finish()
}

fn csrf(h: &mut Html, a: &Authed) {
    h.raw("<input type=\"hidden\" name=\"csrf\"")
        .attr("value", &a.csrf)
        .raw(">");
}

pub fn error(status: u16, message: &str) -> String {
    let mut h = Html::new();
    head(&mut h, "Error", None);
    h.raw("<div class=\"card\"><h1>")
        .text(&status.to_string())
        .raw("</h1><p class=\"error\" id=\"error\">")
        .text(message)
        .raw("</p><p><a href=\"/credentials\">Back to the inventory</a></p></div>");
    foot(h)
}

pub fn login(error: Option<&str>) -> String {
    let mut h = Html::new();
    head(&mut h, "Log in", None);
    h.raw("<div class=\"card login\"><h1>Log in</h1>");
    if let Some(e) = error {
        h.raw("<p class=\"error\" id=\"login-error\">")
            .text(e)
            .raw("</p>");
    }
    h.raw("<form method=\"post\" action=\"/login\" id=\"login-form\">")
        .raw("<label for=\"user\">User</label>")
        .raw("<input id=\"user\" name=\"user\" autocomplete=\"username\" required maxlength=\"64\">")
        .raw("<label for=\"password\">Password</label>")
        .raw("<input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required maxlength=\"1024\">")
        .raw("<button type=\"submit\" id=\"login\">Log in</button></form></div>");
    foot(h)
}

fn badge(h: &mut Html, kind: &'static str, value: &str) {
    h.raw("<span class=\"badge ")
        .raw(kind)
        .raw(" b-")
        .text(value)
        .raw("\">")
        .text(value)
        .raw("</span>");
}

/// The table's columns: header, cell class, the sort key its header sorts on.
const COLUMNS: [(&str, &str, Option<SortKey>); 12] = [
    ("ID", "id", Some(SortKey::Id)),
    ("Kind", "kind", Some(SortKey::Kind)),
    ("Holder", "holder", Some(SortKey::Holder)),
    ("Vehicle", "vehicle", Some(SortKey::Vehicle)),
    ("ECU", "ecu", Some(SortKey::Ecu)),
    ("Server", "server", Some(SortKey::Server)),
    ("Not after", "not-after", Some(SortKey::NotAfter)),
    // Validity follows the end date (revocation aside): its header sorts on it.
    ("Validity", "validity", Some(SortKey::NotAfter)),
    ("Op state", "op-state", Some(SortKey::OpState)),
    ("Op date", "op-date", Some(SortKey::OpDate)),
    ("Last seen", "last-seen", Some(SortKey::LastSeen)),
    ("Audit", "audit", None),
];

fn select(
    h: &mut Html,
    name: &'static str,
    label: &'static str,
    all: &[&str],
    current: Option<&str>,
) {
    h.raw("<label>")
        .raw(label)
        .raw("<select")
        .attr("name", name)
        .attr("id", name)
        .raw("><option value=\"\">any</option>");
    for v in all {
        h.raw("<option").attr("value", v);
        if current == Some(*v) {
            h.raw(" selected");
        }
        h.raw(">").text(v).raw("</option>");
    }
    h.raw("</select></label>");
}

fn input(
    h: &mut Html,
    name: &'static str,
    label: &'static str,
    value: Option<&str>,
    kind: &'static str,
) {
    h.raw("<label>")
        .raw(label)
        .raw("<input type=\"")
        .raw(kind)
        .raw("\"")
        .attr("name", name)
        .attr("id", name)
        .attr("value", value.unwrap_or(""))
        .raw(" maxlength=\"256\"></label>");
}

fn inventory_link(q: &Query) -> String {
    let qs = to_query_string(q);
    if qs.is_empty() {
        "/credentials".into()
    } else {
        format!("/credentials?{qs}")
    }
}

/// The inventory: filters, the table, the pager. `page` is `None` when the query was
/// refused (`error` says why).
pub fn inventory(
    a: &Authed,
    q: &Query,
    page: Option<&Page>,
    error: Option<&str>,
    now: i64,
    expiring: i64,
) -> String {
    let mut h = Html::new();
    head(&mut h, "Inventory", Some(a));
    h.raw("<h1>Inventory</h1>");
    // Filters (a GET form: the query string is the state; submitting starts at row 1).
    h.raw("<form method=\"get\" action=\"/credentials\" id=\"filters\" class=\"filters\">");
    h.raw("<label class=\"grow\">Search<input type=\"search\" name=\"search\" id=\"search\" placeholder=\"id, serial, holder, vehicle, ECU, server\" maxlength=\"256\"")
        .attr("value", q.search.as_deref().unwrap_or(""))
        .raw("></label>");
    let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    let states: Vec<&str> = OpState::ALL.iter().map(|k| k.as_str()).collect();
    let validities: Vec<&str> = Validity::ALL.iter().map(|k| k.as_str()).collect();
    select(
        &mut h,
        "op_state",
        "Op state",
        &states,
        q.op_state.map(|s| s.as_str()),
    );
    select(
        &mut h,
        "validity",
        "Validity",
        &validities,
        q.validity.map(|s| s.as_str()),
    );
    select(&mut h, "kind", "Kind", &kinds, q.kind.map(|s| s.as_str()));
    input(&mut h, "server", "Server", q.server.as_deref(), "text");
    input(&mut h, "holder", "Holder", q.holder.as_deref(), "text");
    input(&mut h, "vehicle", "Vehicle", q.vehicle.as_deref(), "text");
    input(&mut h, "ecu", "ECU", q.ecu.as_deref(), "text");
    let days = q.expiring_within.map(|s| (s / 86_400).to_string());
    input(
        &mut h,
        "expiring_days",
        "Expiring within (days)",
        days.as_deref(),
        "number",
    );
    h.raw("<label class=\"check\"><input type=\"checkbox\" name=\"audit\" id=\"audit\" value=\"true\"");
    if q.audit {
        h.raw(" checked");
    }
    h.raw(">Audit findings only</label>");
    h.raw("<label>Rows<select name=\"limit\" id=\"limit\">");
    for n in [25u32, 50, 100, 250, 500] {
        h.raw("<option").attr("value", &n.to_string());
        if q.limit == n {
            h.raw(" selected");
        }
        h.raw(">").text(&n.to_string()).raw("</option>");
    }
    h.raw("</select></label>");
    h.raw("<input type=\"hidden\" name=\"sort\"")
        .attr("value", q.sort.as_str())
        .raw("><input type=\"hidden\" name=\"desc\"")
        .attr("value", if q.desc { "true" } else { "false" })
        .raw("><div class=\"actions\"><button type=\"submit\" id=\"apply\">Apply</button>")
        .raw("<a href=\"/credentials\" class=\"button secondary\" id=\"clear\">Clear</a></div></form>");
    if let Some(e) = error {
        h.raw("<p class=\"error\" id=\"query-error\">")
            .text(e)
            .raw("</p>");
    }
    let Some(page) = page else {
        return foot(h);
    };
    // The count.
    let first = if page.rows.is_empty() {
        0
    } else {
        q.offset + 1
    };
    let last = q.offset + page.rows.len() as u64;
    h.raw("<p class=\"count\" id=\"count\">Rows ")
        .text(&first.to_string())
        .raw("–")
        .text(&last.to_string())
        .raw(" of ");
    if !page.exact {
        h.raw("more than ");
    }
    h.text(&page.total.to_string()).raw("</p>");
    // The table.
    h.raw("<div class=\"table-wrap\"><table id=\"inventory\"><thead><tr>");
    for (title, class, key) in COLUMNS {
        match key {
            Some(k) => {
                // The column named after the key shows the order; another column sorting on
                // the same key (validity) toggles it too.
                let primary = class == k.as_str();
                let active = primary && q.sort == k;
                let desc = q.sort == k && !q.desc;
                let link = inventory_link(&Query {
                    sort: k,
                    desc,
                    offset: 0,
                    ..q.clone()
                });
                h.raw("<th").attr("class", class);
                if primary {
                    h.attr("data-sort", k.as_str());
                } else {
                    h.attr("data-sort-by", k.as_str());
                }
                if active {
                    h.attr("aria-sort", if q.desc { "descending" } else { "ascending" });
                }
                h.raw("><a").attr("href", &link).raw(">").raw(title);
                if active {
                    h.raw(if q.desc { " ▼" } else { " ▲" });
                }
                h.raw("</a></th>");
            }
            None => {
                let link = inventory_link(&Query {
                    audit: !q.audit,
                    offset: 0,
                    ..q.clone()
                });
                h.raw("<th")
                    .attr("class", class)
                    .raw("><a")
                    .attr("href", &link)
                    .attr("title", "Show only records with audit findings (toggle)")
                    .raw(">")
                    .raw(title)
                    .raw("</a></th>");
            }
        }
    }
    h.raw("</tr></thead><tbody>");
    if page.rows.is_empty() {
        h.raw("<tr class=\"empty\"><td colspan=\"12\">No credential matches.</td></tr>");
    }
    for c in &page.rows {
        row(&mut h, c, now, expiring);
    }
    h.raw("</tbody></table></div>");
    // The pager.
    h.raw("<nav class=\"pager\">");
    if q.offset > 0 {
        let prev = inventory_link(&Query {
            offset: q.offset.saturating_sub(q.limit as u64),
            ..q.clone()
        });
        h.raw("<a class=\"button secondary\" id=\"prev\"")
            .attr("href", &prev)
            .raw(">← Previous</a>");
    }
    // A full page with more behind it (or a count that stopped at the cap).
    let full = !page.rows.is_empty() && page.rows.len() as u32 == q.limit;
    if full && (last < page.total || !page.exact) {
        let next = inventory_link(&Query {
            offset: last,
            ..q.clone()
        });
        h.raw("<a class=\"button secondary\" id=\"next\"")
            .attr("href", &next)
            .raw(">Next →</a>");
    }
    h.raw("</nav>");
    foot(h)
}

fn row(h: &mut Html, c: &Credential, now: i64, expiring: i64) {
    let link = format!("/credentials/{}", url_component(&c.id));
    h.raw("<tr").attr("data-id", &c.id).raw(">");
    h.raw("<td class=\"id\"><a")
        .attr("href", &link)
        .raw(">")
        .text(&c.id)
        .raw("</a></td>");
    h.elem("td", Some("kind"), c.kind.as_str());
    h.elem("td", Some("holder"), &c.holder);
    h.elem("td", Some("vehicle"), c.vehicle.as_deref().unwrap_or(""));
    h.elem("td", Some("ecu"), c.ecu.as_deref().unwrap_or(""));
    h.elem("td", Some("server"), &c.server);
    h.raw("<td class=\"not-after\"")
        .attr(
            "data-value",
            &c.not_after.map(|t| t.to_string()).unwrap_or_default(),
        )
        .raw(">")
        .text(&opt_date(c.not_after))
        .raw("</td>");
    h.raw("<td class=\"validity\">");
    badge(h, "validity", c.validity(now, expiring).as_str());
    h.raw("</td><td class=\"op-state\">");
    badge(h, "state", c.op_state.as_str());
    h.raw("</td>");
    h.elem("td", Some("op-date"), &date(c.op_date));
    h.elem("td", Some("last-seen"), &opt_date(c.last_seen));
    h.elem("td", Some("audit"), &c.audit.join(", "));
    h.raw("</tr>");
}

fn dl_row(h: &mut Html, key: &'static str, name: &'static str, value: &str) {
    h.raw("<dt>")
        .raw(name)
        .raw("</dt><dd")
        .attr("data-field", key);
    if value.is_empty() {
        h.raw(" class=\"muted\">—</dd>");
    } else {
        h.raw(">").text(value).raw("</dd>");
    }
}

fn dl_link(h: &mut Html, key: &'static str, name: &'static str, id: Option<&str>) {
    h.raw("<dt>")
        .raw(name)
        .raw("</dt><dd")
        .attr("data-field", key);
    if id.is_none() {
        h.raw(" class=\"muted\">—</dd>");
        return;
    }
    h.raw(">");
    if let Some(id) = id {
        h.raw("<a")
            .attr("href", &format!("/credentials/{}", url_component(id)))
            .raw(">")
            .text(id)
            .raw("</a>");
    }
    h.raw("</dd>");
}

/// A credential with every field, its operations, its jobs and its history.
pub fn detail(a: &Authed, d: &Detail) -> String {
    let c = &d.credential;
    let mut h = Html::new();
    head(&mut h, &c.id, Some(a));
    h.raw("<p class=\"crumbs\"><a href=\"/credentials\" id=\"back\">← Inventory</a></p>");
    h.raw("<div class=\"title\"><h1 id=\"credential\"")
        .attr("data-id", &c.id)
        .raw(">")
        .text(&c.id)
        .raw("</h1>");
    h.raw("<span id=\"validity\">");
    badge(&mut h, "validity", d.validity.as_str());
    h.raw("</span><span id=\"op-state\" class=\"op-state\">");
    badge(&mut h, "state", c.op_state.as_str());
    h.raw("</span></div>");
    // Operations: each leads to a confirmation page.
    h.raw("<div class=\"operations\" id=\"operations\">");
    let running = d.jobs.iter().any(|j| !j.state.is_terminal());
    if c.op_state.is_final() {
        h.raw("<p class=\"muted\" id=\"no-operations\">This credential is ")
            .text(c.op_state.as_str())
            .raw(": no operation applies any more.</p>");
    } else if running {
        h.raw("<p class=\"muted\" id=\"no-operations\">An operation is running; the next one can start when it has ended.</p>");
    }
    for op in Operation::ALL {
        if !c.kind.allows(op) || c.op_state.is_final() || running {
            continue;
        }
        h.raw("<form method=\"get\"")
            .attr(
                "action",
                &format!(
                    "/credentials/{}/confirm/{}",
                    url_component(&c.id),
                    op.as_str()
                ),
            )
            .raw("><button type=\"submit\"")
            .attr("data-op", op.as_str())
            .attr(
                "class",
                if matches!(op, Operation::Invalidate | Operation::Delete) {
                    "danger"
                } else {
                    "primary"
                },
            )
            .raw(">")
            .text(op_title(op))
            .raw("</button></form>");
    }
    h.raw("</div>");
    h.raw("<div class=\"grid\"><section class=\"card\"><h2>Record</h2><dl id=\"fields\">");
    dl_row(&mut h, "id", "ID", &c.id);
    dl_row(&mut h, "kind", "Kind", c.kind.as_str());
    dl_row(&mut h, "serial", "Serial / key id", &c.serial);
    dl_row(&mut h, "holder", "Holder", &c.holder);
    dl_row(
        &mut h,
        "vehicle",
        "Vehicle",
        c.vehicle.as_deref().unwrap_or(""),
    );
    dl_row(&mut h, "ecu", "ECU", c.ecu.as_deref().unwrap_or(""));
    dl_row(&mut h, "server", "Server", &c.server);
    dl_row(&mut h, "issuer", "Issuer", &c.issuer);
    dl_row(
        &mut h,
        "fingerprint",
        "SHA-256",
        c.fingerprint.as_deref().unwrap_or(""),
    );
    dl_row(&mut h, "not-before", "Not before", &opt_date(c.not_before));
    dl_row(&mut h, "not-after", "Not after", &opt_date(c.not_after));
    dl_row(&mut h, "revoked-at", "Revoked at", &opt_date(c.revoked_at));
    dl_row(&mut h, "validity", "Validity", d.validity.as_str());
    dl_row(&mut h, "op-state", "Op state", c.op_state.as_str());
    dl_row(&mut h, "op-date", "Op date", &date(c.op_date));
    dl_row(&mut h, "last-seen", "Last seen", &opt_date(c.last_seen));
    dl_row(&mut h, "seen-by", "Also seen by", &c.seen_by.join(", "));
    dl_row(&mut h, "audit", "Audit findings", &c.audit.join(", "));
    dl_link(
        &mut h,
        "replaced-by",
        "Replaced by",
        c.replaced_by.as_deref(),
    );
    dl_link(&mut h, "replaces", "Replaces", c.replaces.as_deref());
    h.raw("</dl>");
    if let Some(pem) = &c.pem {
        h.raw("<details><summary>Certificate (PEM)</summary><pre id=\"pem\">")
            .text(pem)
            .raw("</pre></details>");
    }
    h.raw("</section><div>");
    jobs_into(&mut h, a, d);
    h.raw("<section class=\"card\"><h2>History</h2><table id=\"history\"><thead><tr><th>When</th><th>What</th><th>By</th><th>Detail</th></tr></thead><tbody>");
    if c.history.is_empty() {
        h.raw("<tr class=\"empty\"><td colspan=\"4\">Nothing recorded.</td></tr>");
    }
    for e in c.history.iter().rev() {
        h.raw("<tr>");
        h.elem("td", Some("at"), &date(e.at));
        h.elem("td", Some("what"), &e.what);
        h.elem("td", Some("by"), &e.by);
        h.elem("td", Some("detail"), &e.detail);
        h.raw("</tr>");
    }
    h.raw("</tbody></table></section></div></div>");
    foot(h)
}

fn op_title(op: Operation) -> &'static str {
    match op {
        Operation::Renew => "Renew",
        Operation::Invalidate => "Invalidate",
        Operation::Delete => "Delete",
        Operation::Rotate => "Rotate",
    }
}

fn op_explain(op: Operation) -> &'static str {
    match op {
        Operation::Renew => "The holder makes a new key and a certificate request (the key never leaves it); the gateway issues the new certificate and this one is replaced.",
        Operation::Invalidate => "The credential is revoked and the holder is told to delete it. Its live sessions are cut.",
        Operation::Delete => "The holder is told to delete the credential; a certificate of ours is revoked too.",
        Operation::Rotate => "A new key is made and delivered, encrypted, to the holder only; this key is replaced.",
    }
}

/// The jobs section alone: what the detail page polls while a job runs.
pub fn jobs(a: &Authed, d: &Detail) -> String {
    let mut h = Html::new();
    jobs_into(&mut h, a, d);
    h.finish()
}

fn jobs_into(h: &mut Html, a: &Authed, d: &Detail) {
    let active = d.jobs.iter().any(|j| !j.state.is_terminal());
    h.raw("<section class=\"card\" id=\"jobs\"")
        .attr(
            "data-src",
            &format!("/credentials/{}/jobs", url_component(&d.credential.id)),
        )
        .attr("data-active", if active { "true" } else { "false" })
        .raw("><h2>Jobs");
    if active {
        h.raw(" <span class=\"spinner\" title=\"updating\"></span>");
    }
    h.raw("</h2>");
    if d.jobs.is_empty() {
        h.raw("<p class=\"muted\">No operation has run on this credential.</p></section>");
        return;
    }
    h.raw("<table><thead><tr><th>Op</th><th>Device</th><th>State</th><th>Attempts</th><th>Updated</th><th>Result</th><th></th></tr></thead><tbody>");
    for j in &d.jobs {
        h.raw("<tr class=\"job\"")
            .attr("data-job", &j.id)
            .attr("data-state", j.state.as_str())
            .raw(">");
        h.elem("td", Some("job-op"), j.op.as_str());
        h.elem("td", Some("job-device"), &j.device);
        h.raw("<td class=\"job-state\">");
        badge(h, "job", j.state.as_str());
        h.raw("</td>");
        h.elem("td", Some("job-attempts"), &j.attempts.to_string());
        h.elem("td", Some("job-updated"), &date(j.updated_at));
        h.elem("td", Some("job-result"), j.result.as_deref().unwrap_or(""));
        h.raw("<td>");
        if !j.state.is_terminal() {
            h.raw("<form method=\"post\"")
                .attr("action", &format!("/jobs/{}/cancel", url_component(&j.id)))
                .raw(">");
            csrf(h, a);
            h.raw("<button type=\"submit\" class=\"secondary small\" data-cancel=\"1\">Cancel</button></form>");
        }
        h.raw("</td></tr>");
    }
    h.raw("</tbody></table></section>");
}

/// The confirmation step of `op` on `d`'s credential.
pub fn confirm(a: &Authed, d: &Detail, op: Operation) -> String {
    let c = &d.credential;
    let mut h = Html::new();
    head(&mut h, &format!("{} {}", op_title(op), c.id), Some(a));
    let back = format!("/credentials/{}", url_component(&c.id));
    h.raw("<div class=\"card confirm\"><h1>")
        .text(op_title(op))
        .raw(" <code>")
        .text(&c.id)
        .raw("</code>?</h1><p>")
        .raw(op_explain(op))
        .raw("</p><dl><dt>Kind</dt><dd>")
        .text(c.kind.as_str())
        .raw("</dd><dt>Holder</dt><dd>")
        .text(&c.holder)
        .raw("</dd><dt>Server</dt><dd>")
        .text(&c.server)
        .raw("</dd><dt>Not after</dt><dd>")
        .text(&opt_date(c.not_after))
        .raw("</dd></dl><form method=\"post\"")
        .attr(
            "action",
            &format!("/credentials/{}/op/{}", url_component(&c.id), op.as_str()),
        )
        .raw(" id=\"confirm-form\">");
    csrf(&mut h, a);
    h.raw("<label for=\"reason\">Reason (recorded in the history)</label>")
        .raw("<input id=\"reason\" name=\"reason\" maxlength=\"256\">")
        .raw("<div class=\"actions\"><button type=\"submit\" id=\"confirm\"")
        .attr("data-op", op.as_str())
        .attr(
            "class",
            if matches!(op, Operation::Invalidate | Operation::Delete) {
                "danger"
            } else {
                "primary"
            },
        )
        .raw(">")
        .text(op_title(op))
        .raw("</button><a class=\"button secondary\" id=\"cancel\"")
        .attr("href", &back)
        .raw(">Cancel</a></div></form></div>");
    foot(h)
}
