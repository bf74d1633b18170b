//! `outpost credentials`: the credential inventory and its operations, through the admin
//! socket of the running gateway (or cloud); `list` and `show` read the store directly when
//! nothing runs.

use super::ConfigArgs;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use outpost::admin::{self, Reply, Request};
use outpost::config::Config;
use outpost::credentials::model::{Kind, OpState, Operation, Query, SortKey, Validity};

#[derive(Args, Clone, Default)]
pub struct Filters {
    /// Case-insensitive substring of the id, serial, holder, vehicle, ECU or server.
    #[arg(long)]
    search: Option<String>,
    /// certificate, foreign-certificate, symmetric-key, password or token.
    #[arg(long)]
    kind: Option<String>,
    /// issued, renewal-pending, invalidation-pending, …, renewed, invalidated, deleted,
    /// failed, reported.
    #[arg(long)]
    state: Option<String>,
    /// valid, expiring, expired, revoked or future.
    #[arg(long)]
    validity: Option<String>,
    /// Destination server the credential is used with (exact: gateway, cloud, ota or a named one).
    #[arg(long)]
    server: Option<String>,
    /// Holder: a device id (exact).
    #[arg(long)]
    holder: Option<String>,
    /// Vehicle id the credential is bound to (exact).
    #[arg(long)]
    vehicle: Option<String>,
    /// ECU id the credential is bound to (exact).
    #[arg(long)]
    ecu: Option<String>,
    /// Valid now and ending within this many days.
    #[arg(long, value_name = "DAYS")]
    expiring_within: Option<u32>,
    /// Only credentials with an audit finding.
    #[arg(long)]
    audit: bool,
    /// Sort column: id, kind, serial, holder, vehicle, ecu, server, not-before, not-after,
    /// op-state, op-date, last-seen.
    #[arg(long, default_value = "not-after")]
    sort: String,
    /// Sort descending.
    #[arg(long)]
    desc: bool,
    /// Rows to skip.
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Rows to print (1..=500).
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

#[derive(Subcommand)]
pub enum CredCmd {
    /// List the inventory (a page of it), filtered and sorted.
    List {
        #[command(flatten)]
        filters: Filters,
        /// Print the page as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// One credential: every field, its history and its jobs (JSON).
    Show {
        /// The credential id (`cert:<serial>`, `key:<holder>:<id>`, …).
        id: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Renew a certificate: its holder makes a new key and CSR; the key never leaves it.
    Renew(OpArgs),
    /// Invalidate: revoke, and its holders delete it.
    Invalidate(OpArgs),
    /// Delete: its holders delete it (our certificates are revoked too).
    Delete(OpArgs),
    /// Rotate a symmetric key: a new key, sealed to each holder.
    Rotate(OpArgs),
    /// Record the vehicle and ECU a credential was issued for (seed 000): an ECU that
    /// later turns up in another vehicle loses it.
    Bind {
        /// The credential id.
        id: String,
        /// The vehicle id (as its gateway reports it at check-in).
        #[arg(long)]
        vehicle: String,
        /// The ECU id within that vehicle.
        #[arg(long)]
        ecu: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// The admin page's admins (argon2id hashes in `web.admins_file`).
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// Cancel a job that has not ended.
    Cancel {
        /// The job id.
        job: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Add an admin, or give one a new password (asked twice on a terminal).
    Add {
        /// 1-64 characters of A-Z a-z 0-9 . _ @ -
        user: String,
        /// Read the password from the first line of standard input instead.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Remove an admin (its open sessions end at their next request).
    Remove {
        /// The admin's user name.
        user: String,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

#[derive(Args)]
pub struct OpArgs {
    /// The credential id.
    id: String,
    /// Why (recorded in the history).
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    cfg: ConfigArgs,
}

impl CredCmd {
    pub fn cfg(&self) -> &ConfigArgs {
        match self {
            CredCmd::List { cfg, .. }
            | CredCmd::Show { cfg, .. }
            | CredCmd::Cancel { cfg, .. }
            | CredCmd::Bind { cfg, .. }
            | CredCmd::Admin {
                cmd: AdminCmd::Add { cfg, .. } | AdminCmd::Remove { cfg, .. },
            } => cfg,
            CredCmd::Renew(a)
            | CredCmd::Invalidate(a)
            | CredCmd::Delete(a)
            | CredCmd::Rotate(a) => &a.cfg,
        }
    }
}

fn parse<T>(
    what: &str,
    v: &Option<String>,
    f: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<Option<T>> {
    match v {
        None => Ok(None),
        Some(s) => f(s)
            .map(Some)
            .with_context(|| format!("--{what}: {s:?} is not one of the names listed in --help")),
    }
}

fn query(f: &Filters) -> anyhow::Result<Query> {
    Ok(Query {
        search: f.search.clone(),
        kind: parse("kind", &f.kind, Kind::parse)?,
        op_state: parse("state", &f.state, OpState::parse)?,
        validity: parse("validity", &f.validity, Validity::parse)?,
        server: f.server.clone(),
        holder: f.holder.clone(),
        vehicle: f.vehicle.clone(),
        ecu: f.ecu.clone(),
        expiring_within: f.expiring_within.map(|d| i64::from(d) * 86_400),
        audit: f.audit,
        sort: SortKey::parse(&f.sort)
            .with_context(|| format!("--sort: {:?} is not a column", f.sort))?,
        desc: f.desc,
        offset: f.offset,
        limit: f.limit,
    })
}

fn day(t: Option<i64>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .map(|t| t.date().to_string())
        .unwrap_or_else(|| "-".into())
}

fn who() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

fn admin(cmd: AdminCmd, config: &Config) -> anyhow::Result<()> {
    use outpost::web::admins;
    let path = config.web.admins_path(&config.gateway.data_dir);
    match cmd {
        AdminCmd::Add {
            user,
            password_stdin,
            ..
        } => {
            admins::check_user(&user)?;
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the password")?;
                line.trim_end_matches(['\n', '\r']).to_string()
            } else {
                let a = rpassword::prompt_password(format!("password for {user}: "))
                    .context("reading the password (use --password-stdin without a terminal)")?;
                let b = rpassword::prompt_password("again: ").context("reading the password")?;
                if a != b {
                    bail!("the two passwords differ");
                }
                a
            };
            outpost::prepare_data_dir(&config.gateway.data_dir)?;
            admins::set_password_in(&path, &user, &password)?;
            println!("admin {user} set in {}", path.display());
        }
        AdminCmd::Remove { user, .. } => {
            if admins::remove(&path, &user)? {
                println!("admin {user} removed from {}", path.display());
            } else {
                bail!("no admin {user} in {}", path.display());
            }
        }
    }
    Ok(())
}

pub async fn credentials_command(cmd: CredCmd, config: Config) -> anyhow::Result<()> {
    let data_dir = config.gateway.data_dir.clone();
    if let CredCmd::Admin { cmd } = cmd {
        return admin(cmd, &config);
    }
    let req = match &cmd {
        CredCmd::List { filters, .. } => Request::Credentials {
            query: query(filters)?,
        },
        CredCmd::Show { id, .. } => Request::Credential { id: id.clone() },
        CredCmd::Renew(a) | CredCmd::Invalidate(a) | CredCmd::Delete(a) | CredCmd::Rotate(a) => {
            let operation = match &cmd {
                CredCmd::Renew(_) => Operation::Renew,
                CredCmd::Invalidate(_) => Operation::Invalidate,
                CredCmd::Delete(_) => Operation::Delete,
                _ => Operation::Rotate,
            };
            Request::Operate {
                id: a.id.clone(),
                operation,
                by: who(),
                reason: a.reason.clone(),
            }
        }
        CredCmd::Bind {
            id, vehicle, ecu, ..
        } => Request::Bind {
            id: id.clone(),
            vehicle: vehicle.clone(),
            ecu: ecu.clone(),
            by: who(),
        },
        CredCmd::Cancel { job, .. } => Request::CancelJob {
            job: job.clone(),
            by: who(),
        },
        CredCmd::Admin { .. } => unreachable!("handled above"),
    };
    let reply = match admin::call(&data_dir, &req).await? {
        Some(r) => r,
        None => offline(&config, req)
            .await
            .context("no gateway running (operations need it: the holders connect to it)")?,
    };
    match (cmd, reply) {
        (CredCmd::List { json: true, .. }, Reply::Page { page }) => {
            println!("{}", serde_json::to_string_pretty(&page)?);
        }
        (CredCmd::List { .. }, Reply::Page { page }) => {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            println!(
                "{:<40} {:<14} {:<20} {:<10} {:<12} {:<9} {:<20} AUDIT",
                "ID", "KIND", "HOLDER", "SERVER", "NOT AFTER", "VALIDITY", "STATE"
            );
            for c in &page.rows {
                println!(
                    "{:<40} {:<14} {:<20} {:<10} {:<12} {:<9} {:<20} {}",
                    c.id,
                    c.kind.as_str(),
                    c.holder,
                    c.server,
                    day(c.not_after),
                    c.validity(now, config.credentials.expiring.as_secs() as i64)
                        .as_str(),
                    c.op_state.as_str(),
                    c.audit.join(",")
                );
            }
            println!(
                "{} of {}{}",
                page.rows.len(),
                if page.exact { "" } else { "more than " },
                page.total
            );
        }
        (CredCmd::Show { id, .. } | CredCmd::Bind { id, .. }, Reply::Detail { detail }) => {
            match detail {
                Some(d) => println!("{}", serde_json::to_string_pretty(&d)?),
                None => bail!("no credential {id}"),
            }
        }
        (_, Reply::Jobs { jobs }) => {
            for j in jobs {
                println!(
                    "job {} {} {} for {}: {}",
                    j.id,
                    j.op.as_str(),
                    j.credential,
                    j.device,
                    j.state.as_str()
                );
            }
        }
        (_, Reply::Error { message }) => bail!("{message}"),
        (_, other) => bail!("unexpected answer: {other:?}"),
    }
    Ok(())
}

/// `list` and `show` on the store when no gateway runs.
async fn offline(config: &Config, req: Request) -> anyhow::Result<Reply> {
    use outpost::credentials::inventory::{Inventory, InventoryStore};
    let store = outpost::store::Store::open(&config.gateway.data_dir.join("store"))?;
    let inv = Inventory::open(&config.cloud.database_url, &store).await?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let exp = config.credentials.expiring.as_secs() as i64;
    Ok(match req {
        Request::Credentials { query } => {
            query.validate()?;
            Reply::Page {
                page: inv.query(&query, now, exp).await?,
            }
        }
        Request::Credential { id } => Reply::Detail {
            detail: match inv.get(&id).await? {
                Some(c) => Some(Box::new(outpost::credentials::service::Detail {
                    validity: c.validity(now, exp),
                    jobs: inv.jobs_for_credential(&id).await?,
                    credential: c,
                })),
                None => None,
            },
        },
        _ => bail!("operations need the running gateway"),
    })
}
