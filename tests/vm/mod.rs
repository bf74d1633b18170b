//! Test support for tests that run part of themselves in a QEMU guest (`scripts/vm.sh`):
//! a builder for the guest's options and, in `logwrites`, a dm-log-writes replayer.
#![allow(dead_code)]

pub mod logwrites;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The environment variable that tells a test binary started in the guest which role to
/// play (the host side never sets it).
pub const ROLE_VAR: &str = "OUTPOST_VM_ROLE";

pub struct Vm {
    args: Vec<String>,
}

/// The path of a host tool (for `copy`): `which`, plus the sbin directories that are not on
/// every PATH.
pub fn host_tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/sbin",
        "/sbin",
        "/usr/bin",
        "/bin",
    ]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found on the host (scripts/test.sh installs it)");
}

impl Vm {
    pub fn new() -> Vm {
        Vm { args: Vec::new() }
    }
    fn opt(mut self, name: &str, value: impl AsRef<str>) -> Vm {
        self.args.push(name.into());
        self.args.push(value.as_ref().into());
        self
    }
    pub fn module(self, name: &str) -> Vm {
        self.opt("--module", name)
    }
    pub fn disk(self, file: &Path) -> Vm {
        self.opt("--disk", file.display().to_string())
    }
    pub fn copy(self, src: &Path, dst: &str) -> Vm {
        self.opt("--copy", format!("{}:{dst}", src.display()))
    }
    pub fn env(self, name: &str, value: &str) -> Vm {
        self.opt("--env", format!("{name}={value}"))
    }
    pub fn mem(self, mb: u32) -> Vm {
        self.opt("--mem", mb.to_string())
    }
    pub fn timeout(self, secs: u32) -> Vm {
        self.opt("--timeout", secs.to_string())
    }
    /// Copy this test binary into the guest as /bin/testbin and run its `test` there (an
    /// ignored test that acts on `ROLE_VAR` = `role`). Returns the guest's output.
    pub fn run_self(self, test: &str, role: &str) -> Output {
        let me = std::env::current_exe().expect("test binary path");
        let vm = self.copy(&me, "/bin/testbin").env(ROLE_VAR, role);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vm.sh");
        let mut cmd = Command::new(script);
        cmd.args(&vm.args).args([
            "--",
            "/bin/testbin",
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]);
        cmd.stdin(Stdio::null());
        cmd.output().expect("start scripts/vm.sh")
    }
}
