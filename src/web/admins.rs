//! The admin page's users: names and argon2id password hashes in one TOML file in the
//! data directory (0600, replaced atomically). The file is read again when it changed, so
//! an admin added with the CLI while the gateway runs can log in at once.
//!
//! [`set_password`] adds an admin or sets a new password (the CLI's
//! `outpost credentials admin add`); [`Admins::verify`] is blocking (argon2 takes tens of
//! milliseconds by design): call it in `spawn_blocking`.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// What tells a changed admins file: its modification time and its inode (every write
/// renames a new file into place, so two writes within one timestamp tick still differ).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    meta.modified().ok().map(|m| (m, meta.ino()))
}

/// Most admins one file holds.
pub const MAX_ADMINS: usize = 256;
/// Largest admins file read.
pub const MAX_FILE: u64 = 256 * 1024;
/// Shortest and longest password accepted when one is set.
pub const MIN_PASSWORD: usize = 8;
pub const MAX_PASSWORD: usize = 1024;
/// Longest user name.
pub const MAX_USER: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AdminsError {
    #[error("admins file {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("admins file {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("user name: {0}")]
    BadUser(&'static str),
    #[error("password: {0}")]
    BadPassword(String),
    #[error("password hashing: {0}")]
    Hash(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Admin {
    user: String,
    /// PHC string (`$argon2id$v=19$m=...`); empty: no password login.
    #[serde(default)]
    hash: String,
    /// SHA-256 (lower-case hex) of the admin's client certificate (DER), pinned: a TLS
    /// client presenting that certificate (and proving its key) is this admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cert_sha256: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminsFile {
    #[serde(default)]
    admin: Vec<Admin>,
}

/// A user name: 1..=64 of `[A-Za-z0-9._@-]`.
pub fn check_user(user: &str) -> Result<(), AdminsError> {
    if user.is_empty() || user.len() > MAX_USER {
        return Err(AdminsError::BadUser("must be 1..=64 characters"));
    }
    if !user
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
    {
        return Err(AdminsError::BadUser("only A-Z a-z 0-9 . _ @ - are allowed"));
    }
    Ok(())
}

fn hash(password: &str) -> Result<String, AdminsError> {
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AdminsError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AdminsError::Hash(e.to_string()))
}

fn read_file(path: &Path) -> Result<(Stamp, AdminsFile), AdminsError> {
    let io = |cause| AdminsError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((None, AdminsFile::default()))
        }
        Err(e) => return Err(io(e)),
    };
    if meta.len() > MAX_FILE {
        return Err(AdminsError::Malformed {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_FILE} bytes"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let file: AdminsFile = toml::from_str(&text).map_err(|e| AdminsError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if file.admin.len() > MAX_ADMINS {
        return Err(AdminsError::Malformed {
            path: path.to_path_buf(),
            reason: format!("more than {MAX_ADMINS} admins"),
        });
    }
    Ok((stamp(&meta), file))
}

fn write_file(path: &Path, file: &AdminsFile) -> Result<(), AdminsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |cause| AdminsError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut text = String::from(
        "# Outpost admin page users: argon2id password hashes. Written by\n\
         # `outpost credentials admin add`; keep it 0600.\n\n",
    );
    text.push_str(&toml::to_string(file).map_err(|e| AdminsError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        // An existing temporary file keeps its mode: make sure.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = dir {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Add admin `user` to the admins file of `data_dir` (`admins.toml`), or give it a new
/// password. The file is created 0600 and replaced atomically.
pub fn set_password(data_dir: &Path, user: &str, password: &str) -> Result<(), AdminsError> {
    set_password_in(&data_dir.join("admins.toml"), user, password)
}

/// [`set_password`] on an explicit file (`web.admins_file`).
pub fn set_password_in(path: &Path, user: &str, password: &str) -> Result<(), AdminsError> {
    check_user(user)?;
    let n = password.chars().count();
    if n < MIN_PASSWORD || password.len() > MAX_PASSWORD {
        return Err(AdminsError::BadPassword(format!(
            "must be {MIN_PASSWORD}..={MAX_PASSWORD} characters"
        )));
    }
    let (_, mut file) = read_file(path)?;
    let hash = hash(password)?;
    match file.admin.iter_mut().find(|a| a.user == user) {
        Some(a) => a.hash = hash,
        None => {
            if file.admin.len() >= MAX_ADMINS {
                return Err(AdminsError::Malformed {
                    path: path.to_path_buf(),
                    reason: format!("already {MAX_ADMINS} admins"),
                });
            }
            file.admin.push(Admin {
                user: user.into(),
                hash,
                cert_sha256: None,
            })
        }
    }
    write_file(path, &file)
}

/// Pin admin `user`'s client certificate (`cert_der`), or unpin it with `None`; adds the
/// admin (without a password) when it is not there yet.
pub fn set_certificate(
    path: &Path,
    user: &str,
    cert_der: Option<&[u8]>,
) -> Result<(), AdminsError> {
    check_user(user)?;
    let (_, mut file) = read_file(path)?;
    let fp = cert_der.map(|d| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(d)));
    match file.admin.iter_mut().find(|a| a.user == user) {
        Some(a) => a.cert_sha256 = fp,
        None => {
            if file.admin.len() >= MAX_ADMINS {
                return Err(AdminsError::Malformed {
                    path: path.to_path_buf(),
                    reason: format!("already {MAX_ADMINS} admins"),
                });
            }
            file.admin.push(Admin {
                user: user.into(),
                hash: String::new(),
                cert_sha256: fp,
            })
        }
    }
    write_file(path, &file)
}

/// Remove admin `user`; whether it was there.
pub fn remove(path: &Path, user: &str) -> Result<bool, AdminsError> {
    let (_, mut file) = read_file(path)?;
    let before = file.admin.len();
    file.admin.retain(|a| a.user != user);
    if file.admin.len() == before {
        return Ok(false);
    }
    write_file(path, &file)?;
    Ok(true)
}

/// The admins of one file, read again when its modification time changes.
pub struct Admins {
    path: PathBuf,
    cache: Mutex<(Stamp, Vec<Admin>)>,
}

/// A hash checked when the user does not exist, so that an unknown user costs the same
/// time as a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash("not a password of anyone").unwrap_or_default())
}

impl Admins {
    /// The admins in `path` (which need not exist yet: then nobody can log in).
    pub fn open(path: PathBuf) -> Result<Admins, AdminsError> {
        let (mtime, file) = read_file(&path)?;
        Ok(Admins {
            path,
            cache: Mutex::new((mtime, file.admin)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The admins as the file says now (read again when it changed).
    fn current(&self) -> std::sync::MutexGuard<'_, (Stamp, Vec<Admin>)> {
        let now = std::fs::metadata(&self.path).ok().and_then(|m| stamp(&m));
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != now {
            match read_file(&self.path) {
                Ok((m, f)) => *cache = (m, f.admin),
                // Keep the admins last read rather than locking everyone out.
                Err(e) => tracing::warn!(error = %e, "admins file not reloaded"),
            }
        }
        cache
    }

    fn lookup(&self, user: &str) -> Option<String> {
        self.current()
            .1
            .iter()
            .find(|a| a.user == user && !a.hash.is_empty())
            .map(|a| a.hash.clone())
    }

    /// The admin whose pinned client certificate has SHA-256 `fingerprint` (hex). Blocking
    /// (reads the file when it changed).
    pub fn user_for_certificate(&self, fingerprint: &str) -> Option<String> {
        let fp = fingerprint.to_ascii_lowercase();
        self.current()
            .1
            .iter()
            .find(|a| a.cert_sha256.as_deref() == Some(fp.as_str()))
            .map(|a| a.user.clone())
    }

    /// Whether `password` is `user`'s. Blocking (argon2): run it in `spawn_blocking`.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        if check_user(user).is_err() || password.len() > MAX_PASSWORD {
            return false;
        }
        let (stored, known) = match self.lookup(user) {
            Some(h) => (h, true),
            None => (dummy_hash().to_string(), false),
        };
        let ok = match PasswordHash::new(&stored) {
            Ok(parsed) => Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
            Err(e) => {
                tracing::warn!(user, error = %e, "admin's password hash is malformed");
                false
            }
        };
        ok && known
    }

    /// Whether `user` is still in the file (with a password or a pinned certificate).
    /// Blocking (a `stat`, and a read when the file changed).
    pub fn is_admin(&self, user: &str) -> bool {
        self.current().1.iter().any(|a| a.user == user)
    }

    /// How many admins the file holds now.
    pub fn count(&self) -> usize {
        self.current().1.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn set_then_verify_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        set_password(dir.path(), "alice", "correct horse").unwrap();
        let path = dir.path().join("admins.toml");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("$argon2id$") && !text.contains("correct horse"));
        let admins = Admins::open(path.clone()).unwrap();
        assert!(admins.verify("alice", "correct horse"));
        assert!(!admins.verify("alice", "wrong horse"));
        assert!(!admins.verify("bob", "correct horse"));
        // A new password replaces the old one, and the running Admins sees it at once.
        set_password(dir.path(), "alice", "battery staple").unwrap();
        set_password(dir.path(), "bob", "another one").unwrap();
        assert!(!admins.verify("alice", "correct horse"));
        assert!(admins.verify("alice", "battery staple"));
        assert!(admins.verify("bob", "another one"));
        assert_eq!(admins.count(), 2);
        assert!(remove(&path, "bob").unwrap());
        assert!(!admins.verify("bob", "another one"));
        assert!(!dir.path().join("admins.toml.tmp").exists());
        // A pinned client certificate: for alice (who keeps her password), and for dave,
        // who has none.
        set_certificate(&path, "alice", Some(b"alice's certificate")).unwrap();
        set_certificate(&path, "dave", Some(b"dave's certificate")).unwrap();
        let fp = |d: &[u8]| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(d));
        assert_eq!(
            admins
                .user_for_certificate(&fp(b"alice's certificate"))
                .as_deref(),
            Some("alice")
        );
        assert_eq!(
            admins
                .user_for_certificate(&fp(b"dave's certificate"))
                .as_deref(),
            Some("dave")
        );
        assert_eq!(admins.user_for_certificate(&fp(b"someone else")), None);
        assert!(admins.verify("alice", "battery staple"));
        assert!(!admins.verify("dave", ""));
        set_certificate(&path, "alice", None).unwrap();
        assert_eq!(
            admins.user_for_certificate(&fp(b"alice's certificate")),
            None
        );
    }

    #[test]
    fn bad_names_and_passwords_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            set_password(dir.path(), "a b", "longenough"),
            Err(AdminsError::BadUser(_))
        ));
        assert!(matches!(
            set_password(dir.path(), "", "longenough"),
            Err(AdminsError::BadUser(_))
        ));
        assert!(matches!(
            set_password(dir.path(), "alice", "short"),
            Err(AdminsError::BadPassword(_))
        ));
        assert!(!dir.path().join("admins.toml").exists());
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admins.toml");
        std::fs::write(&path, "[[admin]]\nuser = 1\n").unwrap();
        let e = Admins::open(path).err().unwrap();
        assert!(e.to_string().contains("admins.toml"), "{e}");
    }
}
