//! `outpost registry`: the devices onboarded here (from the running gateway, or the store).

use anyhow::{bail, Context};
use outpost::admin::{self, Reply, Request};
use outpost::config::Config;

pub async fn registry(config: Config, json: bool) -> anyhow::Result<()> {
    let data_dir = config.gateway.data_dir.clone();
    let entries = match admin::call(&data_dir, &Request::Registry).await? {
        Some(Reply::Registry { entries }) => entries,
        Some(other) => bail!("unexpected answer: {other:?}"),
        None => {
            let store = outpost::store::Store::open(&data_dir.join("store"))
                .with_context(|| format!("opening the store in {}", data_dir.display()))?;
            admin::registry(&store)?
        }
    };
    // A device registered twice (a partition): the loser is marked, by the same rule the
    // sync applies on both sides.
    let superseded = outpost::registry::superseded(&entries);
    if json {
        let mut out = Vec::with_capacity(entries.len());
        for e in &entries {
            let mut v = serde_json::to_value(e)?;
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "superseded".into(),
                    serde_json::Value::Bool(superseded.contains(&e.guid)),
                );
            }
            out.push(v);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<20} {:<34} {:<20} {:<24} {:<10} OWNER KEY",
        "GUID", "DEVICE INFO", "CERT SERIAL", "ONBOARDED (UTC)", "BY", "STATUS"
    );
    for e in entries {
        let status = if superseded.contains(&e.guid) {
            "superseded"
        } else {
            "active"
        };
        let when = time::OffsetDateTime::from_unix_timestamp(e.onboarded_at)
            .map(|t| {
                format!(
                    "{} {:02}:{:02}:{:02}",
                    t.date(),
                    t.hour(),
                    t.minute(),
                    t.second()
                )
            })
            .unwrap_or_default();
        println!(
            "{:<32} {:<20} {:<34} {:<20} {:<24} {:<10} {}",
            e.guid,
            e.device_info,
            e.cert_serial.as_deref().unwrap_or("-"),
            when,
            e.registered_by,
            status,
            e.owner_key_id
        );
    }
    Ok(())
}
