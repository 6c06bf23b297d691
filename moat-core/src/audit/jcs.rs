//! Canonical JSON (RFC 8785) for audit entries. Audit entries hold strings,
//! booleans, null, integers, arrays and objects; a non-integer number is
//! refused rather than canonicalized approximately.

use serde_json::Value;

/// The canonical form of `value`, or `None` when it holds a non-integer
/// number.
pub fn canonical(value: &Value) -> Option<String> {
    let mut out = String::new();
    write(value, &mut out)?;
    Some(out)
}

fn write(value: &Value, out: &mut String) -> Option<()> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                return None;
            }
        }
        Value::String(s) => string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Keys sorted by their UTF-16 code units.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(key, out);
                out.push(':');
                write(&map[*key], out)?;
            }
            out.push('}');
        }
    }
    Some(())
}

fn string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8785_rules() {
        let v: Value = serde_json::from_str(
            r#"{"b": [1, -2, true, null], "a": "x\u0001\n\"é€", "\u20ac": 1, "\r": 2, "1": {"z": 0, "y": {}}}"#,
        )
        .unwrap();
        assert_eq!(
            canonical(&v).unwrap(),
            "{\"\\r\":2,\"1\":{\"y\":{},\"z\":0},\"a\":\"x\\u0001\\n\\\"é€\",\"b\":[1,-2,true,null],\"€\":1}"
        );
        assert_eq!(canonical(&serde_json::json!({"f": 1.5})), None);
    }

    #[test]
    fn utf16_key_order() {
        // U+1F600 sorts after U+FB01 in UTF-8 but before it in UTF-16.
        let v = serde_json::json!({"\u{1F600}": 1, "\u{FB01}": 2});
        assert_eq!(canonical(&v).unwrap(), "{\"\u{1F600}\":1,\"\u{FB01}\":2}");
    }
}
