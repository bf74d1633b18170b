//! Process-wide counters of what FDO peers send us that the specification does not say but
//! real devices do (rendered by the metrics endpoint of whichever role runs the services).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// EATs (TO1.ProveToRV, TO2.ProveDevice) whose UEID came under the early draft's claim key
/// 11 instead of 256.
pub static EAT_UEID_LEGACY_KEY: AtomicU64 = AtomicU64::new(0);

/// Count an accepted EAT.
pub fn eat_accepted(eat: &crate::fdo_wire::msg::Eat) {
    if eat.ueid_legacy_key {
        EAT_UEID_LEGACY_KEY.fetch_add(1, Ordering::Relaxed);
    }
}

/// Prometheus lines.
pub fn render(out: &mut String) {
    let name = "outpost_fdo_eat_ueid_legacy_key_total";
    let _ = writeln!(
        out,
        "# HELP {name} EATs accepted with the UEID under claim key 11 (an early EAT draft) instead of 256.\n# TYPE {name} counter\n{name} {}",
        EAT_UEID_LEGACY_KEY.load(Ordering::Relaxed)
    );
}
