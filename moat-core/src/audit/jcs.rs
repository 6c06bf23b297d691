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

/// The top-level members of an entry that verification reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Top {
    pub seq: Option<u64>,
    pub prev: Option<String>,
    pub kind: Option<String>,
    pub time: Option<String>,
}

/// Checks that `line` is already in the canonical form [`canonical`]
/// writes, without building a value: what `canonical(parse(line)) == line`
/// decides, in one pass. Returns the top-level members verification reads,
/// or `None` when the line is not canonical JSON (the caller then says why,
/// the slow way).
pub(crate) fn check_canonical(line: &str) -> Option<Top> {
    let mut c = Checker {
        b: line.as_bytes(),
        i: 0,
    };
    let top = c.object(0, true)?;
    (c.i == c.b.len()).then_some(top)
}

/// serde_json's nesting limit: deeper lines are refused as it refuses them.
const MAX_DEPTH: usize = 127;

struct Checker<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Checker<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.i += 1)
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(depth, false).map(|_| ()),
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                if self.eat(b']').is_some() {
                    return Some(());
                }
                loop {
                    self.value(depth + 1)?;
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => self.string().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.integer().map(|_| ()),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// An object whose keys are in UTF-16 order, each once; at the top
    /// level, the members verification reads are kept.
    fn object(&mut self, depth: usize, top: bool) -> Option<Top> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.eat(b'{')?;
        let mut found = Top::default();
        if self.eat(b'}').is_some() {
            return Some(found);
        }
        let mut last: Option<std::borrow::Cow<'a, str>> = None;
        loop {
            let key = self.string()?;
            if let Some(prev) = &last {
                if prev.encode_utf16().cmp(key.encode_utf16()) != std::cmp::Ordering::Less {
                    return None;
                }
            }
            self.eat(b':')?;
            match (top, key.as_ref()) {
                (true, "seq") => {
                    found.seq = u64::try_from(self.integer()?).ok();
                }
                (true, "prev" | "type" | "time") if self.peek() == Some(b'"') => {
                    let text = Some(self.string()?.into_owned());
                    match key.as_ref() {
                        "prev" => found.prev = text,
                        "type" => found.kind = text,
                        _ => found.time = text,
                    }
                }
                _ => self.value(depth + 1)?,
            }
            last = Some(key);
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(found);
                }
                _ => return None,
            }
        }
    }

    /// A string with exactly the escapes `canonical` writes, decoded.
    fn string(&mut self) -> Option<std::borrow::Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.i;
        let mut decoded: Option<String> = None;
        loop {
            let byte = self.peek()?;
            match byte {
                b'"' => {
                    let text = match decoded {
                        Some(d) => std::borrow::Cow::Owned(d),
                        None => std::borrow::Cow::Borrowed(
                            std::str::from_utf8(&self.b[start..self.i]).ok()?,
                        ),
                    };
                    self.i += 1;
                    return Some(text);
                }
                0..=0x1f => return None,
                b'\\' => {
                    let d = decoded.get_or_insert_with(|| {
                        String::from_utf8_lossy(&self.b[start..self.i]).into_owned()
                    });
                    let escaped = *self.b.get(self.i + 1)?;
                    let c = match escaped {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'b' => '\u{8}',
                        b't' => '\t',
                        b'n' => '\n',
                        b'f' => '\u{c}',
                        b'r' => '\r',
                        b'u' => {
                            let hex = self.b.get(self.i + 2..self.i + 6)?;
                            let lower = |h: &u8| h.is_ascii_digit() || (b'a'..=b'f').contains(h);
                            if &hex[..2] != b"00" || !hex.iter().all(lower) {
                                return None;
                            }
                            let v = u8::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16)
                                .ok()?;
                            if v >= 0x20 || matches!(v, 0x8 | 0x9 | 0xa | 0xc | 0xd) {
                                return None;
                            }
                            self.i += 4;
                            char::from(v)
                        }
                        _ => return None,
                    };
                    d.push(c);
                    self.i += 2;
                }
                _ => {
                    // One whole UTF-8 character (the line is valid UTF-8).
                    let len = match byte {
                        0x00..=0x7f => 1,
                        0xc0..=0xdf => 2,
                        0xe0..=0xef => 3,
                        _ => 4,
                    };
                    if let Some(d) = decoded.as_mut() {
                        d.push_str(std::str::from_utf8(self.b.get(self.i..self.i + len)?).ok()?);
                    }
                    self.i += len;
                }
            }
        }
    }

    /// An integer as `canonical` writes it: no `-0`, no leading zeros, no
    /// fraction or exponent, within i64 or u64.
    fn integer(&mut self) -> Option<i128> {
        let negative = self.eat(b'-').is_some();
        let digits = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.b[digits..self.i]).ok()?;
        if text.is_empty() || (text.len() > 1 && text.starts_with('0')) || text.len() > 20 {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let magnitude: i128 = text.parse().ok()?;
        let value = if negative { -magnitude } else { magnitude };
        if negative && (magnitude == 0 || value < i128::from(i64::MIN)) {
            return None;
        }
        if value > i128::from(u64::MAX) {
            return None;
        }
        Some(value)
    }
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

    /// What verification decided before the fast path: the line parses,
    /// is an object, and re-serializes to itself.
    fn slow(line: &str) -> Option<Top> {
        let v: Value = serde_json::from_str(line).ok()?;
        if !v.is_object() || canonical(&v).as_deref() != Some(line) {
            return None;
        }
        let text = |k: &str| v[k].as_str().map(str::to_string);
        Some(Top {
            seq: v["seq"].as_u64(),
            prev: text("prev"),
            kind: text("type"),
            time: text("time"),
        })
    }

    fn same(line: &str) {
        assert_eq!(check_canonical(line), slow(line), "{line:?}");
    }

    /// xorshift64*, for a reproducible stream of test values.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const PIECES: &[&str] = &[
        "a",
        "seq",
        "type",
        "time",
        "prev",
        "data",
        "\u{1F600}",
        "\u{FB01}",
        "\u{0}",
        "\u{1f}",
        "\u{8}",
        "\t",
        "\n",
        "\r",
        "\u{c}",
        "\"",
        "\\",
        "/",
        "\u{7f}",
        "é",
        "€",
        " ",
        "",
    ];

    fn random_string(r: &mut Rng) -> String {
        (0..r.below(4))
            .map(|_| PIECES[r.below(PIECES.len() as u64) as usize])
            .collect()
    }

    fn random_value(r: &mut Rng, depth: u32) -> Value {
        match r.below(if depth > 3 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(r.below(2) == 0),
            2 => serde_json::json!([0, 1, -1, 10, i64::MAX, i64::MIN][r.below(6) as usize]),
            3 => serde_json::json!([u64::MAX, 1u64 << 63, 7][r.below(3) as usize]),
            4 => Value::String(random_string(r)),
            5 => Value::Array(
                (0..r.below(4))
                    .map(|_| random_value(r, depth + 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..r.below(5))
                    .map(|_| (random_string(r), random_value(r, depth + 1)))
                    .collect(),
            ),
        }
    }

    /// The one-pass check decides exactly as parsing and re-serializing
    /// does, on canonical lines and on one-byte changes of them.
    #[test]
    fn the_fast_check_agrees_with_the_slow_one() {
        let mut r = Rng(0x5eed_1234_abcd_9876);
        let bytes: &[u8] = b"{}[]\":,-0123456789.eE+ntrufals\\u0aAbfxz \t\n\x01\x7f";
        let mut accepted = 0;
        for _ in 0..3000 {
            let mut obj = serde_json::Map::new();
            obj.insert("seq".into(), serde_json::json!(r.below(1000)));
            obj.insert("prev".into(), Value::String(random_string(&mut r)));
            obj.insert("type".into(), Value::String(random_string(&mut r)));
            obj.insert("time".into(), Value::String(random_string(&mut r)));
            obj.insert("data".into(), random_value(&mut r, 0));
            let line = canonical(&Value::Object(obj)).unwrap();
            assert!(check_canonical(&line).is_some(), "{line:?}");
            same(&line);
            for _ in 0..20 {
                let mut m = line.clone().into_bytes();
                let at = r.below(m.len() as u64 + 1) as usize;
                let b = bytes[r.below(bytes.len() as u64) as usize];
                match r.below(3) {
                    0 if at < m.len() => m[at] = b,
                    1 if at < m.len() => {
                        m.remove(at);
                    }
                    _ => m.insert(at, b),
                }
                if let Ok(m) = String::from_utf8(m) {
                    if check_canonical(&m).is_some() {
                        accepted += 1;
                    }
                    same(&m);
                }
            }
        }
        // Some changes keep a line canonical (a digit for a digit).
        assert!(accepted > 0);
    }

    #[test]
    fn the_fast_check_on_edge_cases() {
        for line in [
            r#"{"seq":0}"#,
            r#"{"seq":-0}"#,
            r#"{"seq":01}"#,
            r#"{"seq":1.0}"#,
            r#"{"seq":1e2}"#,
            r#"{"seq":-3}"#,
            r#"{"seq":18446744073709551615}"#,
            r#"{"seq":18446744073709551616}"#,
            r#"{"a":-9223372036854775808}"#,
            r#"{"a":-9223372036854775809}"#,
            r#"{"a":-}"#,
            r#"{"a":"\u001f"}"#,
            r#"{"a":"\u001F"}"#,
            r#"{"a":"\u0008"}"#,
            r#"{"a":"\b"}"#,
            r#"{"a":"\/"}"#,
            r#"{"a":"\u0020"}"#,
            r#"{"a":"\u00"}"#,
            r#"{"a":"\"#,
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"\u{7f}\"}",
            r#"{"a":1,"a":2}"#,
            r#"{"b":1,"a":2}"#,
            r#"{"a":1,"b":2}"#,
            "{\"\u{1F600}\":1,\"\u{FB01}\":2}",
            "{\"\u{FB01}\":1,\"\u{1F600}\":2}",
            r#"{ "a":1}"#,
            r#"{"a" :1}"#,
            r#"{"a":1} "#,
            r#"{"a":[1, 2]}"#,
            r#"{"a":[]}"#,
            r#"{"a":{}}"#,
            r#"{"a":[[]]}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":true}"#,
            r#"{}"#,
            r#"[]"#,
            r#""x""#,
            "1",
            "",
            "{",
            r#"{"type":1,"time":"t"}"#,
            r#"{"prev":"p","seq":3,"time":"t","type":"x"}"#,
            r#"{"prev":"p\n","seq":3,"time":"t\u0001","type":"\\"}"#,
        ] {
            same(line);
        }
        // Nesting around serde_json's limit.
        for depth in 120..135 {
            let line = format!("{{\"a\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
            same(&line);
        }
    }

    #[test]
    fn utf16_key_order() {
        // U+1F600 sorts after U+FB01 in UTF-8 but before it in UTF-16.
        let v = serde_json::json!({"\u{1F600}": 1, "\u{FB01}": 2});
        assert_eq!(canonical(&v).unwrap(), "{\"\u{1F600}\":1,\"\u{FB01}\":2}");
    }
}
