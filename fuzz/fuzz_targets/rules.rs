//! Fuzzes the request rules: parsing a rule, normalising a path, matching
//! a request and reading a push never panic or hang, whatever the input;
//! and a normalised path is a fixed point (normalising it again changes
//! nothing), so no second decoding can turn an allowed path into another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_core::policy::rules::{normalize_path, parse_push, HostRules, Rule};
use moat_core::policy::HostPattern;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        let _ = parse_push(data);
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let rule = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("GET");
    let path = parts.next().unwrap_or("/");
    if let Ok(normal) = normalize_path(path) {
        let again = format!("/{}", normal.join("/"));
        // Segments hold decoded text; re-encoding is not the point here:
        // a path with no `%`, `;`, `.` segment or upper case is stable.
        if !again.contains(['%', ';', '?', '#']) && normal.iter().all(|s| s != "." && s != "..") {
            assert_eq!(normalize_path(&again).ok(), Some(normal));
        }
    }
    if let Ok(rule) = Rule::parse(rule) {
        let entry = HostRules {
            host: HostPattern::parse("fuzz.test").expect("a valid host"),
            rules: vec![rule.clone(); 8],
        };
        let _ = entry.judge(method, path);
        let _ = parse_push(path.as_bytes());
        assert_eq!(Rule::parse(&rule.text).ok(), Some(rule));
    }
});
