//! A throw-away PostgreSQL cluster for tests and benchmarks: the Debian binaries
//! (`/usr/lib/postgresql/<version>/bin`), `initdb` in a temporary directory, the server on
//! 127.0.0.1 with a free port and its socket in that directory, trust authentication for
//! the `postgres` superuser, a fresh database per test ([`PgCluster::fresh_db`]).
//!
//! As root the cluster runs as an unprivileged user (`postgres` when the package made it,
//! else `nobody`) through `runuser`: `initdb` and `postgres` refuse to run as root.
//!
//! [`PgCluster`] stops the server and removes its directory when dropped. The shared
//! cluster of a test binary ([`shared`]) lives in a static, which Rust never drops, so it
//! also starts a watchdog that does the same once the test process has exited (however
//! it ended).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

pub struct PgCluster {
    /// The cluster's directory (data, socket, log); removed on drop.
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub port: u16,
    /// The OS user the server runs as (`None`: the current one).
    pub user: Option<String>,
    stopped: bool,
}

/// The newest PostgreSQL's `bin` directory under `/usr/lib/postgresql`, if installed.
pub fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PgCluster {
    /// `initdb` and start a cluster; `settings` are extra `-c name=value` server settings.
    pub fn start(settings: &[&str]) -> Result<PgCluster, String> {
        let bin = find_bin().ok_or(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
             apt-get install postgresql, or run scripts/test.sh",
        )?;
        let user = if is_root() {
            Some(if user_exists("postgres") {
                "postgres".to_string()
            } else {
                "nobody".to_string()
            })
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!(
            "outpost-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let c = PgCluster {
            dir,
            bin,
            port: free_port(),
            user,
            stopped: false,
        };
        if let Some(u) = &c.user {
            // The user must reach the directory: the temp dir itself is world-searchable.
            let st = Command::new("chown")
                .arg(format!("{u}:"))
                .arg(&c.dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !st.success() {
                return Err(format!("chown {u} {} failed", c.dir.display()));
            }
        }
        let data = c.data();
        c.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            c.port,
            path(&c.dir)
        );
        for s in settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        let log = c.dir.join("server.log");
        c.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-l",
                path(&log),
                "-w",
                "-o",
                &opts,
                "start",
            ],
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{e}\n{log}")
        })?;
        Ok(c)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(u).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} {args:?}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// The URL of database `db` over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Run SQL with `psql` against `db` (stops at the first error).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql {sql}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new, empty database; its URL.
    pub fn fresh_db(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("{e}"));
        name
    }

    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let data = self.data();
        let _ = self.run(
            "pg_ctl",
            &["-D", path(&data), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Stop the server and remove its directory once process `pid` has exited.
    fn watchdog(&self) {
        let ctl = self.bin.join("pg_ctl");
        let stop = match &self.user {
            Some(u) => format!("runuser -u {u} -- {}", ctl.display()),
            None => ctl.display().to_string(),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {stop} -D '{data}' -m immediate -w stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            data = self.data().display(),
            dir = self.dir.display(),
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

static NEXT: AtomicU32 = AtomicU32::new(0);
static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();

/// The test binary's cluster, started on first use (tests fsync off: what is tested is
/// Outpost's SQL, not PostgreSQL's durability), stopped by its watchdog after the process.
pub fn shared() -> &'static PgCluster {
    let c = SHARED.get_or_init(|| {
        let c = PgCluster::start(&["fsync=off", "max_connections=200"])?;
        c.watchdog();
        Ok(c)
    });
    match c {
        Ok(c) => c,
        Err(e) => panic!("PostgreSQL test cluster: {e}"),
    }
}
