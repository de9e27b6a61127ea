//! Text forms crit uses inside its JSON, reproduced byte for byte: Python's
//! `base64.encodebytes`, `quopri.encodestring` (binascii's quoted-printable), the compressed
//! IP address forms of Python's `ipaddress`, and `json.dump`'s layout and ASCII escaping.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use serde_json::Value;

/// Python's base64 line length for `encodebytes`.
const BASE64_LINE: usize = 76;

/// `base64.encodebytes`: standard alphabet, a newline after every 76 characters and at the end.
pub fn encode_base64(data: &[u8]) -> String {
    let flat = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = String::with_capacity(flat.len() + flat.len() / BASE64_LINE + 1);
    for chunk in flat.as_bytes().chunks(BASE64_LINE) {
        // the alphabet is ASCII, so every chunk is a whole str
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// `base64.decodebytes`: line breaks and other characters outside the alphabet are skipped.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let kept: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
        .collect();
    let body = kept.trim_end_matches('=');
    if body.contains('=') {
        return None;
    }
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(body)
        .ok()
}

/// binascii's quoted-printable line limit.
const QP_LINE: usize = 76;

/// `quopri.encodestring` (binascii `b2a_qp` in text mode, tabs and spaces kept literal).
pub fn encode_quopri(data: &[u8]) -> String {
    let crlf = data
        .iter()
        .position(|&b| b == b'\n')
        .is_some_and(|i| i > 0 && data[i - 1] == b'\r');
    let mut out: Vec<u8> = Vec::with_capacity(data.len() * 3);
    let soft_break = |out: &mut Vec<u8>| {
        out.push(b'=');
        if crlf {
            out.push(b'\r');
        }
        out.push(b'\n');
    };
    let mut line = 0usize;
    let mut i = 0usize;
    while i < data.len() {
        let c = data[i];
        let next = data.get(i + 1).copied();
        let last = i + 1 == data.len();
        let needs_quote = c > 126
            || c == b'='
            || (c == b'.' && line == 0 && matches!(next, None | Some(b'\n' | b'\r' | 0)))
            || ((c == b'\t' || c == b' ') && last)
            || (c < 33 && c != b'\r' && c != b'\n' && c != b'\t' && c != b' ');
        if needs_quote {
            if line + 3 >= QP_LINE {
                soft_break(&mut out);
                line = 0;
            }
            push_qp_hex(&mut out, c);
            i += 1;
            line += 3;
        } else if c == b'\n' || (c == b'\r' && next == Some(b'\n')) {
            line = 0;
            // whitespace before a line break would be lost by mail transports: quote it
            if let Some(&ws @ (b' ' | b'\t')) = out.last() {
                out.pop();
                push_qp_hex(&mut out, ws);
            }
            if crlf {
                out.push(b'\r');
            }
            out.push(b'\n');
            i += if c == b'\r' { 2 } else { 1 };
        } else {
            if !last && next != Some(b'\n') && line + 1 >= QP_LINE {
                soft_break(&mut out);
                line = 0;
            }
            line += 1;
            out.push(c);
            i += 1;
        }
    }
    // only ASCII bytes were pushed
    String::from_utf8_lossy(&out).into_owned()
}

fn push_qp_hex(out: &mut Vec<u8>, c: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push(b'=');
    out.push(HEX[usize::from(c >> 4)]);
    out.push(HEX[usize::from(c & 0xf)]);
}

/// `quopri.decodestring` (binascii `a2b_qp`): lenient, a stray `=` is kept as is.
pub fn decode_quopri(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0usize;
    while i < text.len() {
        if text[i] != b'=' {
            out.push(text[i]);
            i += 1;
            continue;
        }
        i += 1;
        let Some(&c) = text.get(i) else { break };
        if c == b'\n' || c == b'\r' {
            while i < text.len() && text[i] != b'\n' {
                i += 1;
            }
            if i < text.len() {
                i += 1;
            }
        } else if c == b'=' {
            out.push(b'=');
            i += 1;
        } else if let (Some(hi), Some(lo)) =
            (hex_digit(c), text.get(i + 1).copied().and_then(hex_digit))
        {
            out.push((hi << 4) | lo);
            i += 2;
        } else {
            out.push(b'=');
        }
    }
    out
}

fn hex_digit(c: u8) -> Option<u8> {
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// An address stored as CRIU does: u32 words in network byte order, read as native integers.
pub fn format_ip(words: &[u32]) -> Option<String> {
    match words {
        [v4] => Some(Ipv4Addr::from(v4.to_le_bytes()).to_string()),
        [a, b, c, d, ..] => {
            let mut octets = [0u8; 16];
            for (slot, word) in octets.chunks_mut(4).zip([a, b, c, d]) {
                slot.copy_from_slice(&word.to_le_bytes());
            }
            Some(python_ipv6(&Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// The words of an address in CRIU's layout, see [`format_ip`].
pub fn parse_ip(text: &str) -> Option<Vec<u32>> {
    match text.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(v4) => Some(vec![u32::from_le_bytes(v4.octets())]),
        std::net::IpAddr::V6(v6) => Some(
            v6.octets()
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect(),
        ),
    }
}

/// Python 3.11's compressed IPv6 form: lower-case groups without leading zeros, and the first
/// longest run of two or more zero groups replaced by `::` (no dotted IPv4 tail).
fn python_ipv6(addr: &Ipv6Addr) -> String {
    let groups = addr.segments();
    let mut best: Option<(usize, usize)> = None;
    let mut run_start = None;
    for (i, g) in groups.iter().enumerate() {
        if *g == 0 {
            let start = *run_start.get_or_insert(i);
            let len = i + 1 - start;
            if len > 1 && best.is_none_or(|(_, best_len)| len > best_len) {
                best = Some((start, len));
            }
        } else {
            run_start = None;
        }
    }
    let hex = |gs: &[u16]| {
        gs.iter()
            .map(|g| format!("{g:x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    match best {
        Some((start, len)) => format!("{}::{}", hex(&groups[..start]), hex(&groups[start + len..])),
        None => hex(&groups),
    }
}

/// Writes `value` as Python's `json.dump` does: with `indent`, one item a line indented by that
/// many spaces and `","`/`": "` separators; without, `", "` and `": "` on one line. Non-ASCII
/// characters are escaped (`ensure_ascii`).
pub fn to_python_json(value: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_value(&mut out, value, indent, 0);
    out
}

fn write_value(out: &mut String, value: &Value, indent: Option<usize>, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                separate(out, i, indent, depth + 1);
                write_value(out, item, indent, depth + 1);
            }
            close(out, indent, depth, ']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                separate(out, i, indent, depth + 1);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, indent, depth + 1);
            }
            close(out, indent, depth, '}');
        }
    }
}

fn separate(out: &mut String, index: usize, indent: Option<usize>, depth: usize) {
    match indent {
        Some(width) => {
            if index > 0 {
                out.push(',');
            }
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * depth));
        }
        None if index > 0 => out.push_str(", "),
        None => {}
    }
}

fn close(out: &mut String, indent: Option<usize>, depth: usize, bracket: char) {
    if let Some(width) = indent {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', width * depth));
    }
    out.push(bracket);
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    // writing to a String cannot fail
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_breaks_lines_like_python() {
        assert_eq!(encode_base64(b""), "");
        assert_eq!(encode_base64(b"abc"), "YWJj\n");
        let long = encode_base64(&[0u8; 60]);
        let lines: Vec<&str> = long.split_terminator('\n').collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), 76);
        assert_eq!(decode_base64(&long), Some(vec![0u8; 60]));
        assert_eq!(decode_base64("YW=Jj"), None);
    }

    #[test]
    fn quopri_quotes_and_round_trips() {
        assert_eq!(encode_quopri(b"\0/tmp/sock"), "=00/tmp/sock");
        assert_eq!(encode_quopri(b"a=b "), "a=3Db=20");
        assert_eq!(encode_quopri(b"x \ny"), "x=20\ny");
        let long = vec![b'a'; 200];
        let enc = encode_quopri(&long);
        assert!(enc.lines().all(|l| l.len() <= 76));
        assert_eq!(decode_quopri(enc.as_bytes()), long);
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_quopri(encode_quopri(&bytes).as_bytes()), bytes);
    }

    #[test]
    fn addresses_match_python_forms() {
        assert_eq!(
            format_ip(&[u32::from_le_bytes([127, 0, 0, 1])]).as_deref(),
            Some("127.0.0.1")
        );
        let words = parse_ip("fe80::1:0:0:5").unwrap_or_default();
        assert_eq!(format_ip(&words).as_deref(), Some("fe80::1:0:0:5"));
        let words = parse_ip("1:0:0:2:0:0:0:3").unwrap_or_default();
        assert_eq!(format_ip(&words).as_deref(), Some("1:0:0:2::3"));
        let words = parse_ip("::ffff:1.2.3.4").unwrap_or_default();
        assert_eq!(format_ip(&words).as_deref(), Some("::ffff:102:304"));
        assert_eq!(
            format_ip(&parse_ip("::").unwrap_or_default()).as_deref(),
            Some("::")
        );
        assert_eq!(format_ip(&[0u32; 4]).as_deref(), Some("::"));
        assert_eq!(format_ip(&[1, 2]), None);
    }

    #[test]
    fn json_layout_matches_python() {
        let v: Value = serde_json::json!({"a": [1, {"b": "é\u{7f}"}], "c": [], "d": {}});
        assert_eq!(
            to_python_json(&v, None),
            r#"{"a": [1, {"b": "\u00e9\u007f"}], "c": [], "d": {}}"#
        );
        assert_eq!(
            to_python_json(&v, Some(4)),
            "{\n    \"a\": [\n        1,\n        {\n            \"b\": \"\\u00e9\\u007f\"\n        }\n    ],\n    \"c\": [],\n    \"d\": {}\n}"
        );
    }
}

#[cfg(test)]
mod python_tests {
    use super::*;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    const PYTHON: &str = "/usr/bin/python3";

    /// Runs `script` with the inputs (hex, one per line) on stdin; it prints one line each.
    fn python(script: &str, inputs: &[Vec<u8>]) -> Option<Vec<String>> {
        if !std::path::Path::new(PYTHON).exists() {
            eprintln!("skipped: {PYTHON} is not installed");
            return None;
        }
        let mut child = Command::new(PYTHON)
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python");
        let text: String = inputs
            .iter()
            .map(|i| i.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n")
            .collect();
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("python");
        assert!(out.status.success());
        Some(
            String::from_utf8(out.stdout)
                .expect("utf-8")
                .lines()
                .map(str::to_owned)
                .collect(),
        )
    }

    fn samples() -> Vec<Vec<u8>> {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"ab =.\t\r\n\0\xff_~";
        let mut out: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b".".to_vec(),
            b".\n.x".to_vec(),
            b"a \r\nb\t\n".to_vec(),
            vec![b'x'; 75],
            vec![b'x'; 76],
            vec![b'x'; 77],
            [vec![b'y'; 74], b"==".to_vec()].concat(),
        ];
        for _ in 0..300 {
            let len = usize::try_from(next() % 200).expect("small");
            out.push(
                (0..len)
                    .map(|_| {
                        alphabet[usize::try_from(next() % alphabet.len() as u64).expect("small")]
                    })
                    .collect(),
            );
        }
        out
    }

    #[test]
    fn quopri_and_base64_match_python() {
        let inputs = samples();
        let script = r#"
import sys, quopri, base64, json
for line in sys.stdin:
    data = bytes.fromhex(line.strip())
    qp = quopri.encodestring(data)
    print(json.dumps([qp.decode(), base64.encodebytes(data).decode(), quopri.decodestring(qp).hex()]))
"#;
        let Some(lines) = python(script, &inputs) else {
            return;
        };
        assert_eq!(lines.len(), inputs.len());
        for (input, line) in inputs.iter().zip(lines) {
            let expected: Vec<String> = serde_json::from_str(&line).expect("python JSON");
            assert_eq!(encode_quopri(input), expected[0], "quopri of {input:?}");
            assert_eq!(encode_base64(input), expected[1], "base64 of {input:?}");
            // not always the input: line ends become those of the first line, as in Python
            let decoded: String = decode_quopri(expected[0].as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(decoded, expected[2], "decoding {:?}", expected[0]);
        }
    }
}
