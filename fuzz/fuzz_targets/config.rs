//! The TOML configuration loader (`outpost::config`) never panics on any document, and a
//! configuration it accepts prints (as `print-default-config` would) to TOML that it
//! accepts again as the same configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::from_toml(text) {
        let printed = toml::to_string_pretty(&cfg).expect("an accepted config serialises");
        let again = Config::from_toml(&printed).expect("a printed config loads again");
        let reprinted = toml::to_string_pretty(&again).expect("serialises");
        assert_eq!(printed, reprinted, "print/load is not stable");
    }
});
