//! Fuzzes configuration parsing: any input gives a Config or located
//! diagnostics, never a panic, a hang or unbounded memory.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moat_core::config::{parse_str, Overrides};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // YAML breaks lines at \n, \r\n and a bare \r; counting every \n and
    // \r is an upper bound on its line count.
    let breaks = text.bytes().filter(|b| *b == b'\n' || *b == b'\r').count();
    let lines = u32::try_from(breaks + 1).unwrap_or(u32::MAX);
    match parse_str(text, Path::new("agent.yaml"), Path::new("/ws")) {
        Ok(config) => {
            // A valid config always resolves and serializes.
            serde_json::to_string(&config.resolved()).expect("resolved config serializes");
            // Merging flags taken from the same input never panics.
            let _ = config.merge(&Overrides {
                grants: text.split_whitespace().take(4).map(str::to_string).collect(),
                env: text.split_whitespace().take(4).map(str::to_string).collect(),
                name: text.split_whitespace().next().map(str::to_string),
                ..Overrides::default()
            });
        }
        Err(err) => {
            assert!(!err.diagnostics().is_empty());
            for d in err.diagnostics() {
                let loc = d.location.as_ref().expect("config errors are located");
                assert!(loc.line >= 1 && loc.column >= 1, "{d}");
                assert!(loc.line <= lines, "line {} past the end ({lines}): {d}", loc.line);
            }
        }
    }
});
