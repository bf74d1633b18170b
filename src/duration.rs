//! Durations in configuration files: read in humantime's format (`30s`, `1h 30m`, `7300d`),
//! written as one exact number of the largest unit that divides them (`7300d`, `90m`, `30s`,
//! `250ms`), the way the example configuration spells them. humantime's own formatter
//! writes 20 years as `19years 11months 25days 9h 50m 24s`.
//!
//! Use: `#[serde(with = "crate::duration")]`.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// The written form of `d`.
pub fn format(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    const UNITS: [(u128, &str); 7] = [
        (86_400_000_000_000, "d"),
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    for (n, unit) in UNITS {
        if ns.is_multiple_of(n) {
            return format!("{}{unit}", ns / n);
        }
    }
    format!("{ns}ns")
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({e}); write e.g. 30s, 500ms, 2h or 7300d"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_in_the_largest_exact_unit_and_read_back() {
        for (d, text) in [
            (Duration::from_secs(7300 * 86_400), "7300d"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90 * 60), "90m"),
            (Duration::from_secs(2 * 3600), "2h"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), d);
        }
    }
}
