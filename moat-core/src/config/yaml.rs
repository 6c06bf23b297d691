//! A YAML document as a tree of nodes that remember where they came from.
//!
//! serde_yaml locates syntax errors but not semantic ones, and silently keeps
//! the last of two duplicate keys. This module builds a small tree from
//! yaml-rust2's marked events so that every later error (an unknown field, a
//! bad port, a duplicate key) names its line and column. It does no I/O.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    fn from_marker(m: Marker) -> Pos {
        Pos {
            line: u32::try_from(m.line()).unwrap_or(u32::MAX),
            column: u32::try_from(m.col()).unwrap_or(u32::MAX).saturating_add(1),
        }
    }
}

/// The type of a scalar after YAML 1.2 core-schema resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScalarKind {
    Null,
    Bool,
    Int,
    Float,
    Str,
}

#[derive(Debug, Clone)]
pub(crate) enum Value {
    Scalar { text: String, kind: ScalarKind },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

impl Node {
    /// A short description of the node's type for error messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Scalar { text, kind } => match kind {
                ScalarKind::Null => "null".to_string(),
                ScalarKind::Bool => format!("boolean {text}"),
                ScalarKind::Int => format!("integer {text}"),
                ScalarKind::Float => format!("number {text}"),
                ScalarKind::Str => "a string".to_string(),
            },
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }
}

/// Why a document could not be turned into a tree.
#[derive(Debug)]
pub(crate) struct ParseError {
    pub pos: Pos,
    pub message: String,
}

/// The first character YAML 1.2 does not allow in a document (C0 controls
/// but tab, line feed and carriage return; DEL; C1 controls but NEL;
/// U+FFFE and U+FFFF), as an error at its place.
fn unprintable(text: &str) -> Option<ParseError> {
    let (mut line, mut column) = (1u32, 1u32);
    for c in text.chars() {
        let allowed = match c {
            '\t' | '\n' | '\r' | '\u{85}' => true,
            '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{fffe}' | '\u{ffff}' => false,
            _ => true,
        };
        if !allowed {
            let what = if c == '\0' {
                "a NUL byte (U+0000)".to_string()
            } else {
                format!("control character U+{:04X}", u32::from(c))
            };
            return Some(ParseError {
                pos: Pos { line, column },
                message: format!(
                    "the file holds {what}, which yaml does not allow (is it a text file?); nothing after it would be read"
                ),
            });
        }
        if c == '\n' {
            line = line.saturating_add(1);
            column = 1;
        } else {
            column = column.saturating_add(1);
        }
    }
    None
}

/// Parses `text` into at most one document. `Ok(None)` for an empty stream.
/// Duplicate keys in any mapping are reported with both positions.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, ParseError> {
    // yaml-rust2 stops reading at some characters YAML does not allow (a NUL
    // ends the document there): refuse them rather than lose what follows.
    if let Some(err) = unprintable(text) {
        return Err(err);
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        let pos = Pos::from_marker(*e.marker());
        if e.info().contains("tab") {
            if let Some(tab) = first_indenting_tab(text, pos.line) {
                return Err(ParseError {
                    pos: tab,
                    message: "invalid yaml: a tab indents this line; yaml indents with spaces"
                        .to_string(),
                });
            }
        }
        return Err(ParseError {
            pos: clamp_to_text(text, pos),
            message: format!("invalid yaml: {}", e.info()),
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    let mut docs = builder.docs.into_iter();
    let first = docs.next();
    if let Some(second) = docs.next() {
        return Err(ParseError {
            pos: builder.doc_starts.get(1).copied().unwrap_or(second.pos),
            message: "expected one yaml document, found several (remove the extra `---`)"
                .to_string(),
        });
    }
    Ok(first)
}

/// The parser may point one line past the end of a text that does not end
/// in a line break; point at the end of the last line instead.
pub(crate) fn clamp_to_text(text: &str, pos: Pos) -> Pos {
    let mut line = 1u32;
    let mut column = 1u32;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' || (c == '\r' && chars.peek() != Some(&'\n')) {
            line = line.saturating_add(1);
            column = 1;
        } else if c != '\r' {
            column = column.saturating_add(1);
        }
    }
    if pos.line > line || (pos.line == line && pos.column > column) {
        Pos { line, column }
    } else {
        pos
    }
}

/// The first tab in a line's indentation, at or after `from_line`.
fn first_indenting_tab(text: &str, from_line: u32) -> Option<Pos> {
    for (i, line) in text.lines().enumerate() {
        let number = u32::try_from(i + 1).ok()?;
        if number < from_line {
            continue;
        }
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if let Some(col) = line[..indent].find('\t') {
            return Some(Pos {
                line: number,
                column: u32::try_from(col + 1).ok()?,
            });
        }
    }
    None
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
        /// Each scalar key's line, to find duplicates in constant time (a
        /// megabyte of distinct keys must not take quadratic time).
        keys: std::collections::HashMap<String, u32>,
    },
}

/// The most nodes aliases may add to a document, the copies kept of
/// anchored nodes included. A config file is small; this stops "billion
/// laughs" alias bombs from eating memory. (The nodes written in the file
/// are bounded by its size.)
const MAX_NODES: usize = 100_000;

/// The most bytes of scalar text a document may expand to, counted as
/// nodes are: one long anchored string aliased many times is few nodes.
const MAX_TEXT_BYTES: usize = 8 << 20;

/// What a node costs to hold: (nodes, bytes of scalar text).
type Weight = (usize, usize);

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<Node>,
    anchors: HashMap<usize, (Node, Weight)>,
    doc_starts: Vec<Pos>,
    nodes: usize,
    text_bytes: usize,
    error: Option<ParseError>,
}

impl Builder {
    fn fail(&mut self, pos: Pos, message: String) {
        if self.error.is_none() {
            self.error = Some(ParseError { pos, message });
        }
    }

    /// Counts `weight` more against the document's bounds; false (and the
    /// error recorded) past them.
    fn charge(&mut self, pos: Pos, weight: Weight) -> bool {
        self.take(pos, weight, true)
    }

    /// Counts a node as written (not a copy): within the text bytes bound
    /// only (the input's size bounds how many there are).
    fn written(&mut self, pos: Pos, weight: Weight) -> bool {
        self.take(pos, weight, false)
    }

    fn take(&mut self, pos: Pos, (nodes, bytes): Weight, copy: bool) -> bool {
        if copy {
            self.nodes = self.nodes.saturating_add(nodes);
        }
        self.text_bytes = self.text_bytes.saturating_add(bytes);
        if self.nodes > MAX_NODES {
            self.fail(
                pos,
                format!("document too large: its aliases expand to more than {MAX_NODES} nodes (anchored nodes count once more, for the copy kept)"),
            );
            return false;
        }
        if self.text_bytes > MAX_TEXT_BYTES {
            self.fail(
                pos,
                format!(
                    "document too large: its text expands to more than {} MiB (through aliases and anchors)",
                    MAX_TEXT_BYTES >> 20
                ),
            );
            return false;
        }
        true
    }

    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                keys,
                ..
            }) => match pending_key.take() {
                None => {
                    if let Value::Scalar { .. } = node.value {
                        let key = key_text(&node);
                        if let Some(first) = keys.get(key) {
                            let message =
                                format!("duplicate key \"{key}\" (first defined at line {first})");
                            let pos = node.pos;
                            *pending_key = Some(node);
                            self.fail(pos, message);
                            return;
                        }
                        keys.insert(key.to_string(), node.pos.line);
                        *pending_key = Some(node);
                    } else {
                        let pos = node.pos;
                        *pending_key = Some(node);
                        self.fail(pos, "mapping keys must be plain strings".to_string());
                    }
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

fn weigh(node: &Node) -> Weight {
    let add = |(a, b): Weight, (c, d): Weight| (a + c, b + d);
    match &node.value {
        Value::Scalar { text, .. } => (1, text.len()),
        Value::Seq(items) => items.iter().map(weigh).fold((1, 0), add),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| add(weigh(k), weigh(v)))
            .fold((1, 0), add),
    }
}

fn key_text(node: &Node) -> &str {
    match &node.value {
        Value::Scalar { text, .. } => text,
        _ => "",
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            // The first error is the answer: nothing more is built.
            return;
        }
        let pos = Pos::from_marker(mark);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                if text.contains('\0') {
                    self.fail(
                        pos,
                        "a NUL character (written \\0 or \\x00) cannot reach a container: no environment, argument or path can hold one".to_string(),
                    );
                    return;
                }
                let kind = resolve_scalar(&text, style, tag.as_ref());
                if let Some(why) = tag.as_ref().and_then(|t| tag_problem(t, kind)) {
                    self.fail(pos, why);
                    return;
                }
                let weight = (1, text.len());
                let node = Node {
                    pos,
                    value: Value::Scalar { text, kind },
                };
                if !self.written(pos, weight) {
                    return;
                }
                if anchor > 0 {
                    // The copy kept for aliases costs as much again.
                    if !self.charge(pos, weight) {
                        return;
                    }
                    self.anchors.insert(anchor, (node.clone(), weight));
                }
                self.push_node(node);
            }
            Event::SequenceStart(_, Some(tag)) if core_tag(&tag).as_deref() != Some("seq") => {
                self.fail(
                    pos,
                    format!(
                        "the tag {} does not fit this list (or is not read here): remove it",
                        show_tag(&tag)
                    ),
                );
            }
            Event::MappingStart(_, Some(tag)) if core_tag(&tag).as_deref() != Some("map") => {
                self.fail(
                    pos,
                    format!(
                        "the tag {} does not fit this mapping (or is not read here): remove it",
                        show_tag(&tag)
                    ),
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq {
                pos,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map {
                pos,
                anchor,
                entries: Vec::new(),
                pending_key: None,
                keys: Default::default(),
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { pos, anchor, items }) => (
                        Node {
                            pos,
                            value: Value::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        pos,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node {
                            pos,
                            value: Value::Map(entries),
                        },
                        anchor,
                    ),
                    None => return,
                };
                if anchor > 0 {
                    // The copy kept for aliases costs as much again.
                    let weight = weigh(&node);
                    if !self.charge(pos, weight) {
                        return;
                    }
                    self.anchors.insert(anchor, (node.clone(), weight));
                }
                self.push_node(node);
            }
            Event::Alias(id) => match self.anchors.get(&id).map(|(_, w)| *w) {
                // Charged before it is copied.
                Some(weight) if self.charge(pos, weight) => {
                    if let Some((target, _)) = self.anchors.get(&id) {
                        let mut node = target.clone();
                        node.pos = pos;
                        self.push_node(node);
                    }
                }
                Some(_) => {}
                None => self.fail(pos, "alias refers to an unknown anchor".to_string()),
            },
            Event::DocumentStart => self.doc_starts.push(pos),
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// YAML 1.2 core schema resolution for plain scalars; quoted and block
/// scalars are strings. `!!str` forces a string.
/// The tag in full (`!!str` is `tag:yaml.org,2002:str`).
fn full_tag(tag: &Tag) -> String {
    match tag.handle.as_str() {
        "!!" => format!("tag:yaml.org,2002:{}", tag.suffix),
        handle => format!("{handle}{}", tag.suffix),
    }
}

/// The core schema's name of a tag (`str`, `int`, ...), if it is one.
fn core_tag(tag: &Tag) -> Option<String> {
    full_tag(tag)
        .strip_prefix("tag:yaml.org,2002:")
        .map(str::to_string)
}

fn show_tag(tag: &Tag) -> String {
    core_tag(tag).map_or_else(|| full_tag(tag), |name| format!("!!{name}"))
}

/// Why a scalar's tag cannot stand, if it cannot: the core schema's tags
/// are read when they say what the value already is (`!!str` makes any
/// value a string); any other (`!!binary`, `!foo`, `!!int` on text) would
/// be silently dropped, the value read as something its writer did not mean.
fn tag_problem(tag: &Tag, kind: ScalarKind) -> Option<String> {
    let fits = match core_tag(tag).as_deref() {
        Some("str") => true,
        Some("int") => kind == ScalarKind::Int,
        Some("float") => matches!(kind, ScalarKind::Float | ScalarKind::Int),
        Some("bool") => kind == ScalarKind::Bool,
        Some("null") => kind == ScalarKind::Null,
        _ => false,
    };
    (!fits).then(|| {
        format!(
            "the tag {} does not fit this value (or is not read here): remove it",
            show_tag(tag)
        )
    })
}

fn resolve_scalar(text: &str, style: TScalarStyle, tag: Option<&Tag>) -> ScalarKind {
    if tag.and_then(core_tag).as_deref() == Some("str") {
        return ScalarKind::Str;
    }
    if style != TScalarStyle::Plain {
        return ScalarKind::Str;
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return ScalarKind::Null,
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => return ScalarKind::Bool,
        ".inf" | "-.inf" | "+.inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN" => {
            return ScalarKind::Float
        }
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let is_int = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        || text
            .strip_prefix("0x")
            .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
        || text
            .strip_prefix("0o")
            .is_some_and(|o| !o.is_empty() && o.bytes().all(|b| (b'0'..=b'7').contains(&b)));
    if is_int {
        return ScalarKind::Int;
    }
    let looks_float = digits.bytes().any(|b| b.is_ascii_digit())
        && digits.bytes().all(|b| {
            b.is_ascii_digit() || b == b'.' || b == b'e' || b == b'E' || b == b'-' || b == b'+'
        })
        && digits.parse::<f64>().is_ok();
    if looks_float {
        return ScalarKind::Float;
    }
    ScalarKind::Str
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        parse(text).unwrap().unwrap()
    }

    #[test]
    fn positions_are_one_based() {
        let node = root("name: x\nports:\n  web: 3000\n");
        let Value::Map(entries) = node.value else {
            panic!("not a map")
        };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        let Value::Map(ports) = &entries[1].1.value else {
            panic!("not a map")
        };
        assert_eq!(ports[0].0.pos, Pos { line: 3, column: 3 });
        assert_eq!(ports[0].1.pos, Pos { line: 3, column: 8 });
    }

    #[test]
    fn duplicate_keys_are_located() {
        let err = parse("name: a\nenv: {}\nname: b\n").unwrap_err();
        assert_eq!(err.pos, Pos { line: 3, column: 1 });
        assert_eq!(
            err.message,
            "duplicate key \"name\" (first defined at line 1)"
        );
    }

    #[test]
    fn scalar_resolution() {
        let t = |s| resolve_scalar(s, TScalarStyle::Plain, None);
        assert_eq!(t("3000"), ScalarKind::Int);
        assert_eq!(t("-1"), ScalarKind::Int);
        assert_eq!(t("0x1F"), ScalarKind::Int);
        assert_eq!(t("1.0"), ScalarKind::Float);
        assert_eq!(t("1.0.0"), ScalarKind::Str);
        assert_eq!(t("true"), ScalarKind::Bool);
        assert_eq!(t("~"), ScalarKind::Null);
        assert_eq!(t("node@20"), ScalarKind::Str);
        assert_eq!(t("e"), ScalarKind::Str);
        assert_eq!(
            resolve_scalar("3000", TScalarStyle::DoubleQuoted, None),
            ScalarKind::Str
        );
    }

    #[test]
    fn aliases_are_expanded() {
        let node = root("a: &x [1, 2]\nb: *x\n");
        let Value::Map(entries) = node.value else {
            panic!("not a map")
        };
        assert!(matches!(&entries[1].1.value, Value::Seq(items) if items.len() == 2));
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let prev = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("too large"), "{}", err.message);
    }

    #[test]
    fn a_long_string_aliased_many_times_is_refused_by_its_bytes() {
        // Few nodes (101), 40 MB of text.
        let long = "x".repeat(400_000);
        let aliases = vec!["*a"; 100].join(", ");
        let err = parse(&format!("v: &a \"{long}\"\nc: [{aliases}]\n")).unwrap_err();
        assert!(
            err.message.contains("text expands to more than 8 MiB"),
            "{}",
            err.message
        );
        assert_eq!(err.pos.line, 2);
    }

    #[test]
    fn nested_anchors_count_the_copies_they_keep() {
        // No alias at all: each anchored level keeps a copy of all below it.
        let depth = 20;
        let mut text = String::from("c: ");
        for i in 0..depth {
            text.push_str(&format!("&a{i} ["));
        }
        text.push_str(&vec!["x"; 30_000].join(","));
        text.push_str(&"]".repeat(depth));
        text.push('\n');
        let err = parse(&text).unwrap_err();
        assert!(
            err.message.contains("more than 100000 nodes"),
            "{}",
            err.message
        );
        // Once is fine: the same list under one anchor.
        let once = format!("c: &a [{}]\n", vec!["x"; 30_000].join(","));
        assert!(parse(&once).is_ok());
    }

    #[test]
    fn a_document_of_many_written_nodes_is_read() {
        // The file's size bounds them: 1 MiB holds at most half a million.
        let text = format!("c: [{}]\n", vec!["x"; 500_000].join(","));
        assert!(text.len() <= 1 << 20);
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn tags_are_read_or_refused_never_dropped() {
        for ok in [
            "a: !!str 12\n",
            "a: !!int 12\n",
            "a: !!bool true\n",
            "a: !!float 1.5\n",
            "a: !!null ~\n",
            "a: !!map {b: 1}\n",
            "a: !!seq [1]\n",
            "a: !<tag:yaml.org,2002:str> x\n",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a: !!int abc\n",
            "a: !!binary aGVsbG8=\n",
            "a: !foo x\n",
            "a: !!bool yes\n",
            "a: !local [1]\n",
            "a: !!set {b: 1}\n",
            "a: !!seq {b: 1}\n",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.message.contains("tag"), "{bad}: {}", err.message);
        }
    }

    #[test]
    fn a_nul_written_as_an_escape_is_refused() {
        for text in ["a: \"x\\0y\"\n", "a: \"x\\x00y\"\n", "a: [\"\\u0000\"]\n"] {
            let err = parse(text).unwrap_err();
            assert!(err.message.contains("NUL"), "{text}: {}", err.message);
        }
    }

    #[test]
    fn several_documents_are_refused() {
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(err.message.contains("one yaml document"), "{}", err.message);
    }

    #[test]
    fn a_bare_carriage_return_breaks_lines() {
        // Found by the fuzzer: YAML counts a lone \r as a line break.
        let err = parse("a: 1\rb: [\r").unwrap_err();
        assert_eq!(err.pos.line, 3, "{}", err.message);
        let node = root("a: 1\r\nb: 2\r\n");
        let Value::Map(entries) = node.value else {
            panic!("not a map")
        };
        assert_eq!(entries[1].0.pos, Pos { line: 2, column: 1 });
    }

    #[test]
    fn errors_at_the_end_point_inside_the_text() {
        // Found by the fuzzer: no final line break, error reported past it.
        let err = parse("name: hello\ncomech#o helo :lrom moat\"]\u{5}").unwrap_err();
        assert_eq!(err.pos.line, 2, "{}", err.message);
    }

    #[test]
    fn empty_is_none() {
        assert!(parse("").unwrap().is_none());
        assert!(parse("# only a comment\n").unwrap().is_none());
    }
}
