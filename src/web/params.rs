//! The inventory's query parameters (the page's and the API's alike) to a [`Query`], and
//! back to a query string for the page's links.
//!
//! `search sort desc offset limit kind op_state validity server holder vehicle ecu
//! expiring_days expiring_within audit`; an empty value is an absent one (an empty form
//! field), an unknown or repeated name or a bad value is an error naming it.

use crate::credentials::model::{Invalid, Kind, OpState, Query, SortKey, Validity};
use crate::web::html::url_component;

/// Longest query string read.
pub const MAX_QUERY: usize = 4096;

/// Every parameter name accepted.
pub const NAMES: [&str; 15] = [
    "search",
    "sort",
    "desc",
    "offset",
    "limit",
    "kind",
    "op_state",
    "validity",
    "server",
    "holder",
    "vehicle",
    "ecu",
    "expiring_days",
    "expiring_within",
    "audit",
];

fn bad(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn flag(field: &str, v: &str) -> Result<bool, Invalid> {
    match v {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(bad(field, "must be true or false")),
    }
}

fn number<T: std::str::FromStr>(field: &str, v: &str) -> Result<T, Invalid> {
    v.parse()
        .map_err(|_| bad(field, "must be a non-negative whole number"))
}

fn one_of<T>(
    field: &str,
    v: &str,
    parse: fn(&str) -> Option<T>,
    all: &[&str],
) -> Result<T, Invalid> {
    parse(v).ok_or_else(|| bad(field, format!("must be one of {}", all.join(", "))))
}

/// The query a query string asks for, validated.
pub fn parse(qs: Option<&str>) -> Result<Query, Invalid> {
    let qs = qs.unwrap_or("");
    if qs.len() > MAX_QUERY {
        return Err(bad("query", format!("longer than {MAX_QUERY} bytes")));
    }
    let mut q = Query::default();
    let mut seen: Vec<String> = Vec::new();
    let mut days: Option<i64> = None;
    for (k, v) in form_urlencoded::parse(qs.as_bytes()) {
        if k.is_empty() {
            return Err(bad("query", "a parameter without a name"));
        }
        let Some(name) = NAMES.iter().find(|n| **n == k) else {
            let shown: String = k.chars().take(64).collect();
            return Err(bad(&shown, "unknown parameter"));
        };
        if seen.iter().any(|s| s == name) {
            return Err(bad(name, "given twice"));
        }
        seen.push((*name).to_string());
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        let text = || Some(v.to_string());
        match *name {
            "search" => q.search = text(),
            "sort" => {
                let all: Vec<&str> = SortKey::ALL.iter().map(|s| s.as_str()).collect();
                q.sort = one_of(name, v, SortKey::parse, &all)?
            }
            "desc" => q.desc = flag(name, v)?,
            "offset" => q.offset = number(name, v)?,
            "limit" => q.limit = number(name, v)?,
            "kind" => {
                let all: Vec<&str> = Kind::ALL.iter().map(|s| s.as_str()).collect();
                q.kind = Some(one_of(name, v, Kind::parse, &all)?)
            }
            "op_state" => {
                let all: Vec<&str> = OpState::ALL.iter().map(|s| s.as_str()).collect();
                q.op_state = Some(one_of(name, v, OpState::parse, &all)?)
            }
            "validity" => {
                let all: Vec<&str> = Validity::ALL.iter().map(|s| s.as_str()).collect();
                q.validity = Some(one_of(name, v, Validity::parse, &all)?)
            }
            "server" => q.server = text(),
            "holder" => q.holder = text(),
            "vehicle" => q.vehicle = text(),
            "ecu" => q.ecu = text(),
            "expiring_days" => {
                let d: i64 = number(name, v)?;
                if !(0..=36_500).contains(&d) {
                    return Err(bad(name, "must be 0..=36500"));
                }
                days = Some(d);
            }
            "expiring_within" => q.expiring_within = Some(number(name, v)?),
            "audit" => q.audit = flag(name, v)?,
            _ => return Err(bad(name, "unknown parameter")),
        }
    }
    if let Some(d) = days {
        if q.expiring_within.is_some() {
            return Err(bad(
                "expiring_days",
                "give expiring_days or expiring_within, not both",
            ));
        }
        q.expiring_within = Some(d * 86_400);
    }
    q.validate()?;
    Ok(q)
}

/// The query string that [`parse`] reads back as `q` (defaults left out).
pub fn to_query_string(q: &Query) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut put = |k: &str, v: &str| parts.push(format!("{k}={}", url_component(v)));
    let d = Query::default();
    for (k, v) in [
        ("search", &q.search),
        ("server", &q.server),
        ("holder", &q.holder),
        ("vehicle", &q.vehicle),
        ("ecu", &q.ecu),
    ] {
        if let Some(v) = v {
            put(k, v);
        }
    }
    if let Some(k) = q.kind {
        put("kind", k.as_str());
    }
    if let Some(s) = q.op_state {
        put("op_state", s.as_str());
    }
    if let Some(v) = q.validity {
        put("validity", v.as_str());
    }
    if let Some(w) = q.expiring_within {
        if w % 86_400 == 0 {
            put("expiring_days", &(w / 86_400).to_string());
        } else {
            put("expiring_within", &w.to_string());
        }
    }
    if q.audit {
        put("audit", "true");
    }
    if q.sort != d.sort {
        put("sort", q.sort.as_str());
    }
    if q.desc {
        put("desc", "true");
    }
    if q.offset != 0 {
        put("offset", &q.offset.to_string());
    }
    if q.limit != d.limit {
        put("limit", &q.limit.to_string());
    }
    parts.join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sort_key_and_filter_value_parses() {
        for s in SortKey::ALL {
            let q = parse(Some(&format!("sort={}&desc=true", s.as_str()))).unwrap();
            assert_eq!((q.sort, q.desc), (s, true));
        }
        for k in Kind::ALL {
            assert_eq!(
                parse(Some(&format!("kind={}", k.as_str()))).unwrap().kind,
                Some(k)
            );
        }
        for s in OpState::ALL {
            let q = parse(Some(&format!("op_state={}", s.as_str()))).unwrap();
            assert_eq!(q.op_state, Some(s));
        }
        for v in Validity::ALL {
            let q = parse(Some(&format!("validity={}", v.as_str()))).unwrap();
            assert_eq!(q.validity, Some(v));
        }
        let q = parse(Some(
            "search=dev%201&server=ota&holder=h&vehicle=VIN+1&ecu=e%3A2&expiring_days=7\
             &audit=on&offset=100&limit=25",
        ))
        .unwrap();
        assert_eq!(q.search.as_deref(), Some("dev 1"));
        assert_eq!(q.server.as_deref(), Some("ota"));
        assert_eq!(q.holder.as_deref(), Some("h"));
        assert_eq!(q.vehicle.as_deref(), Some("VIN 1"));
        assert_eq!(q.ecu.as_deref(), Some("e:2"));
        assert_eq!(q.expiring_within, Some(7 * 86_400));
        assert!(q.audit);
        assert_eq!((q.offset, q.limit), (100, 25));
        assert_eq!(
            parse(Some("expiring_within=90")).unwrap().expiring_within,
            Some(90)
        );
    }

    #[test]
    fn empty_values_are_absent_and_no_query_is_the_default() {
        assert_eq!(parse(None).unwrap(), Query::default());
        let q = parse(Some("search=&kind=&op_state=&expiring_days=&limit=")).unwrap();
        assert_eq!(q, Query::default());
    }

    #[test]
    fn bad_parameters_name_their_field() {
        for (qs, field) in [
            ("sort=colour", "sort"),
            ("desc=maybe", "desc"),
            ("offset=-1", "offset"),
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("limit=x", "limit"),
            ("kind=car", "kind"),
            ("op_state=done", "op_state"),
            ("validity=ok", "validity"),
            ("expiring_days=-2", "expiring_days"),
            ("expiring_within=x", "expiring_within"),
            ("expiring_days=1&expiring_within=5", "expiring_days"),
            ("audit=2", "audit"),
            ("colour=red", "colour"),
            ("sort=id&sort=kind", "sort"),
            ("offset=20000000", "offset"),
        ] {
            assert_eq!(parse(Some(qs)).unwrap_err().field, field, "{qs}");
        }
        let long = format!("search={}", "x".repeat(300));
        assert_eq!(parse(Some(&long)).unwrap_err().field, "search");
        let ctl = "holder=a%07b";
        assert_eq!(parse(Some(ctl)).unwrap_err().field, "holder");
        assert_eq!(parse(Some("=1")).unwrap_err().field, "query");
        let huge = "a".repeat(MAX_QUERY + 1);
        assert_eq!(parse(Some(&huge)).unwrap_err().field, "query");
    }

    #[test]
    fn the_query_string_round_trips() {
        let q = parse(Some(
            "search=a%26b&kind=symmetric-key&op_state=renewal-pending&validity=expiring\
             &server=ota&holder=h&vehicle=v&ecu=e&expiring_days=3&audit=true&sort=last-seen\
             &desc=true&offset=50&limit=10",
        ))
        .unwrap();
        assert_eq!(parse(Some(&to_query_string(&q))).unwrap(), q);
        assert_eq!(to_query_string(&Query::default()), "");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any query string is parsed or refused with a field, never a panic; what parses
        /// passes the model's own validation.
        #[test]
        fn any_query_string_is_parsed_or_refused(qs in ".{0,300}") {
            match parse(Some(&qs)) {
                Ok(q) => prop_assert!(q.validate().is_ok()),
                Err(e) => prop_assert!(!e.field.is_empty()),
            }
        }

        /// Pairs of known names with arbitrary values, percent-encoded: the same.
        #[test]
        fn known_names_with_any_values(
            pairs in proptest::collection::vec((0usize..NAMES.len(), ".{0,40}"), 0..6)
        ) {
            let qs: Vec<String> = pairs
                .iter()
                .map(|(i, v)| format!("{}={}", NAMES[*i], url_component(v)))
                .collect();
            if let Ok(q) = parse(Some(&qs.join("&"))) {
                prop_assert_eq!(parse(Some(&to_query_string(&q))).unwrap(), q);
            }
        }
    }
}
