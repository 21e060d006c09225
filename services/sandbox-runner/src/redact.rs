//! Redaction of sandbox output: every credential value delivered to a sandbox,
//! and its common encodings, becomes `<redacted:KEY>` before a byte leaves the
//! runner.
//!
//! The forms searched for, per value:
//! - the value itself;
//! - base64, standard and URL-safe alphabets, with and without padding, and
//!   the value's characters inside any longer base64 text (the three
//!   alignments; so `echo $KEY | base64`, which encodes a trailing newline
//!   too, is caught);
//! - URL-encoded (upper- and lowercase hex, `+` for spaces, and
//!   `encodeURIComponent`'s set);
//! - JSON-escaped (as serde and JavaScript write it, with `\/`, and with
//!   non-ASCII as `\uXXXX` as Python's `json.dumps` does);
//! - base64 wrapped as the tools print it (76 columns for `base64` and MIME,
//!   64 for `openssl base64`), for a value at the start of the text;
//! - hex, lower- and uppercase, on one line and as `xxd -p` wraps it.
//!
//! Matching is leftmost-longest, so a value inside another value's encoding,
//! or two keys whose values overlap, redact to the longest form found. Output
//! arrives in chunks: [`StreamRedactor`] holds back only a tail that could
//! still begin a match, so a value split across chunks is caught too.
//!
//! The patterns are credential material: they live in zeroizing buffers, and
//! a dropped redactor leaves no copy behind.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use zeroize::Zeroizing;

/// Base64 text shorter than this, cut from inside a longer encoding, is not
/// searched for (it would match ordinary text).
const MIN_CORE: usize = 4;

struct Pattern {
    key: u32,
    bytes: Zeroizing<Vec<u8>>,
}

/// The patterns of one sandbox's credentials.
pub struct Redactor {
    keys: Vec<String>,
    patterns: Vec<Pattern>,
    /// Patterns of two or more bytes, by their first two bytes.
    by_pair: HashMap<[u8; 2], Vec<u32>>,
    /// Which byte pairs begin a pattern (a fast negative check before the map).
    pair_bits: Vec<u64>,
    /// One-byte patterns, by byte.
    single: HashMap<u8, u32>,
    /// Which bytes begin any pattern.
    first: [bool; 256],
    max_len: usize,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("keys", &self.keys)
            .field("patterns", &self.patterns.len())
            .finish()
    }
}

fn pair(a: u8, b: u8) -> usize {
    (usize::from(a) << 8) | usize::from(b)
}

impl Redactor {
    /// A redactor for `secrets` (key name, value). Empty values are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let mut r = Redactor {
            keys: Vec::new(),
            patterns: Vec::new(),
            by_pair: HashMap::new(),
            pair_bits: vec![0; 65536 / 64],
            single: HashMap::new(),
            first: [false; 256],
            max_len: 0,
        };
        for (key, value) in secrets {
            if value.is_empty() {
                continue;
            }
            let k = u32::try_from(r.keys.len()).unwrap_or(u32::MAX);
            r.keys.push(key.to_owned());
            for form in forms(value) {
                r.add(k, form);
            }
        }
        r
    }

    fn add(&mut self, key: u32, bytes: Zeroizing<Vec<u8>>) {
        if bytes.is_empty() {
            return;
        }
        // Two keys with the same form: the first keeps it.
        let exists = |p: &Pattern| p.bytes.as_slice() == bytes.as_slice();
        if bytes.len() == 1 {
            if self.single.contains_key(&bytes[0]) {
                return;
            }
        } else if self
            .by_pair
            .get(&[bytes[0], bytes[1]])
            .is_some_and(|c| c.iter().any(|&i| exists(&self.patterns[i as usize])))
        {
            return;
        }
        let idx = u32::try_from(self.patterns.len()).unwrap_or(u32::MAX);
        self.first[usize::from(bytes[0])] = true;
        self.max_len = self.max_len.max(bytes.len());
        if bytes.len() == 1 {
            self.single.insert(bytes[0], idx);
        } else {
            let p = pair(bytes[0], bytes[1]);
            self.pair_bits[p / 64] |= 1 << (p % 64);
            self.by_pair
                .entry([bytes[0], bytes[1]])
                .or_default()
                .push(idx);
        }
        self.patterns.push(Pattern { key, bytes });
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The key names this redactor hides.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    fn replacement(&self, key: u32) -> Vec<u8> {
        format!("<redacted:{}>", self.keys[key as usize]).into_bytes()
    }

    /// The longest pattern that matches `buf` at `i` entirely: (length, key).
    fn longest_at(&self, buf: &[u8], i: usize) -> Option<(usize, u32)> {
        let b0 = buf[i];
        if !self.first[usize::from(b0)] {
            return None;
        }
        let mut best: Option<(usize, u32)> = None;
        if let Some(&b1) = buf.get(i + 1) {
            let p = pair(b0, b1);
            if self.pair_bits[p / 64] & (1 << (p % 64)) != 0
                && let Some(cands) = self.by_pair.get(&[b0, b1])
            {
                for &c in cands {
                    let pat = &self.patterns[c as usize];
                    if best.is_some_and(|(l, _)| l >= pat.bytes.len()) {
                        continue;
                    }
                    if buf[i..].starts_with(&pat.bytes) {
                        best = Some((pat.bytes.len(), pat.key));
                    }
                }
            }
        }
        if best.is_none()
            && let Some(&c) = self.single.get(&b0)
        {
            best = Some((1, self.patterns[c as usize].key));
        }
        best
    }

    /// Whether `rest` (what is left of the buffer) is a proper prefix of a
    /// pattern, so that more input could still complete a match here.
    fn may_continue(&self, rest: &[u8]) -> bool {
        if rest.is_empty() || rest.len() >= self.max_len || !self.first[usize::from(rest[0])] {
            return false;
        }
        if rest.len() == 1 {
            // Some pattern of two bytes or more starts with this byte.
            let lo = pair(rest[0], 0) / 64;
            return self.pair_bits[lo..lo + 4].iter().any(|w| *w != 0);
        }
        self.by_pair.get(&[rest[0], rest[1]]).is_some_and(|c| {
            c.iter().any(|&i| {
                let p = &self.patterns[i as usize].bytes;
                p.len() > rest.len() && p.starts_with(rest)
            })
        })
    }

    /// Redacts `buf` from `start`; stops where the rest could still grow into
    /// a match when `hold` is set. Returns the output and where it stopped.
    fn scan(&self, buf: &[u8], hold: bool, out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        let window = buf.len().saturating_sub(self.max_len.saturating_sub(1));
        while i < buf.len() {
            if hold && i >= window && self.may_continue(&buf[i..]) {
                return i;
            }
            match self.longest_at(buf, i) {
                Some((len, key)) => {
                    out.extend_from_slice(&self.replacement(key));
                    i += len;
                }
                None => {
                    out.push(buf[i]);
                    i += 1;
                }
            }
        }
        i
    }

    /// Redacts a whole buffer.
    pub fn redact(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        if self.is_empty() {
            out.extend_from_slice(input);
        } else {
            self.scan(input, false, &mut out);
        }
        out
    }

    /// Redacts a string (for messages shown to operators).
    pub fn redact_str(&self, input: &str) -> String {
        String::from_utf8_lossy(&self.redact(input.as_bytes())).into_owned()
    }
}

/// Redacts one output stream chunk by chunk.
#[derive(Debug)]
pub struct StreamRedactor {
    redactor: Arc<Redactor>,
    pending: Zeroizing<Vec<u8>>,
}

impl StreamRedactor {
    pub fn new(redactor: Arc<Redactor>) -> Self {
        Self {
            redactor,
            pending: Zeroizing::new(Vec::new()),
        }
    }

    /// Takes the next chunk; returns what can be emitted now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len());
        if self.redactor.is_empty() {
            out.extend_from_slice(chunk);
            return out;
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(self.pending.len() + chunk.len()));
        buf.extend_from_slice(&self.pending);
        buf.extend_from_slice(chunk);
        let stop = self.redactor.scan(&buf, true, &mut out);
        self.pending = Zeroizing::new(buf[stop..].to_vec());
        out
    }

    /// The end of the stream: emits what was held back.
    pub fn finish(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut *self.pending);
        let held = Zeroizing::new(held);
        self.redactor.redact(&held)
    }
}

/// Every form of `v` that is searched for.
fn forms(v: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut out: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    let mut push = |f: Vec<u8>| {
        let f = Zeroizing::new(f);
        if !f.is_empty() && !out.iter().any(|o| o.as_slice() == f.as_slice()) {
            out.push(f);
        }
    };
    push(v.to_vec());
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        push(engine.encode(v).into_bytes());
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for core in base64_cores(engine, v) {
            push(core);
        }
    }
    // Base64 as the tools print it: `base64` (coreutils) and MIME wrap at 76
    // columns, `openssl base64` and PEM at 64. The value at the start of the
    // text (`echo "$KEY" | base64`) puts the breaks at fixed places in its
    // core; a value of 57 bytes or more (most API keys) is otherwise printed
    // in pieces that no unwrapped form matches.
    let cores: Vec<Zeroizing<Vec<u8>>> = base64_cores(&STANDARD_NO_PAD, v)
        .into_iter()
        .map(Zeroizing::new)
        .collect();
    if let Some(core) = cores.first() {
        for (width, eol) in [(76, &b"\n"[..]), (64, b"\n"), (76, b"\r\n")] {
            if core.len() > width {
                push(wrapped(core, width, eol));
            }
        }
    }
    for f in hex_forms(v) {
        push(f);
    }
    for f in url_forms(v) {
        push(f);
    }
    for f in json_forms(v) {
        push(f);
    }
    out
}

/// The base64 characters that depend on `v` alone, at each of the three
/// alignments `v` can have inside a longer encoded text.
fn base64_cores(engine: &base64::engine::GeneralPurpose, v: &[u8]) -> Vec<Vec<u8>> {
    let mut cores = Vec::new();
    for align in 0..3usize {
        // Sized up front, as every buffer here: no outgrown copies.
        let mut shifted = Zeroizing::new(Vec::with_capacity(align + v.len()));
        shifted.resize(align, 0);
        shifted.extend_from_slice(v);
        let enc = Zeroizing::new(engine.encode(shifted.as_slice()).into_bytes());
        // Character j covers bits [6j, 6j + 6); keep those inside v's bits.
        let start = (8 * align).div_ceil(6);
        let end = (8 * (align + v.len())) / 6;
        if end > start && end - start >= MIN_CORE {
            cores.push(enc[start..end].to_vec());
        }
    }
    cores
}

/// `text` with `eol` after every `width` bytes but the last (sized up front).
fn wrapped(text: &[u8], width: usize, eol: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / width * eol.len());
    for (i, line) in text.chunks(width).enumerate() {
        if i > 0 {
            out.extend_from_slice(eol);
        }
        out.extend_from_slice(line);
    }
    out
}

/// Hex, lower- and uppercase, and as `xxd -p` prints it (60 columns).
fn hex_forms(v: &[u8]) -> Vec<Vec<u8>> {
    let lower = Zeroizing::new(hex::encode(v).into_bytes());
    let mut out = vec![lower.to_ascii_uppercase()];
    if lower.len() > 60 {
        out.push(wrapped(&lower, 60, b"\n"));
    }
    out.push(lower.to_vec());
    out
}

fn url_forms(v: &[u8]) -> Vec<Vec<u8>> {
    fn encode(v: &[u8], keep: &dyn Fn(u8) -> bool, upper: bool, plus: bool) -> Vec<u8> {
        let hex: &[u8; 16] = if upper {
            b"0123456789ABCDEF"
        } else {
            b"0123456789abcdef"
        };
        let mut out = Vec::with_capacity(v.len() * 3);
        for &b in v {
            if keep(b) {
                out.push(b);
            } else if plus && b == b' ' {
                out.push(b'+');
            } else {
                out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
            }
        }
        out
    }
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    let component = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'_' | b'~' | b'!' | b'*' | b'\'' | b'(' | b')'
            )
    };
    vec![
        encode(v, &unreserved, true, false),
        encode(v, &unreserved, false, false),
        encode(v, &unreserved, true, true),
        encode(v, &component, true, false),
    ]
}

fn json_forms(v: &[u8]) -> Vec<Vec<u8>> {
    fn escape(v: &[u8], slash: bool, ascii: bool) -> Option<Vec<u8>> {
        // At most 12 bytes per character (a surrogate pair), 6 per byte.
        let mut out = Vec::with_capacity(v.len() * 6 + 8);
        let text = if ascii {
            Some(std::str::from_utf8(v).ok()?)
        } else {
            None
        };
        let push_byte = |out: &mut Vec<u8>, b: u8| match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'/' if slash => out.extend_from_slice(b"\\/"),
            b if b < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", b).as_bytes());
            }
            b => out.push(b),
        };
        match text {
            None => {
                for &b in v {
                    push_byte(&mut out, b);
                }
            }
            Some(s) => {
                for ch in s.chars() {
                    if ch.is_ascii() {
                        push_byte(&mut out, ch as u8);
                    } else {
                        let mut units = [0u16; 2];
                        for u in ch.encode_utf16(&mut units) {
                            out.extend_from_slice(format!("\\u{:04x}", u).as_bytes());
                        }
                    }
                }
            }
        }
        Some(out)
    }
    [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .filter_map(|(slash, ascii)| escape(v, slash, ascii))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(secrets: &[(&str, &str)]) -> Redactor {
        Redactor::new(secrets.iter().map(|(k, v)| (*k, v.as_bytes())))
    }

    fn red(r: &Redactor, s: &str) -> String {
        String::from_utf8(r.redact(s.as_bytes())).expect("utf8")
    }

    const V: &str = "CANARY-s3cr3t/v+al=ue \"q\" é";

    #[test]
    fn the_value_and_every_encoding_are_redacted() {
        let r = redactor(&[("API_KEY", V)]);
        let v = V.as_bytes();
        let encodings: Vec<String> = vec![
            V.to_owned(),
            STANDARD.encode(v),
            STANDARD_NO_PAD.encode(v),
            URL_SAFE.encode(v),
            URL_SAFE_NO_PAD.encode(v),
            // Percent-encoding, both cases, and form encoding.
            "CANARY-s3cr3t%2Fv%2Bal%3Due%20%22q%22%20%C3%A9".into(),
            "CANARY-s3cr3t%2fv%2bal%3due%20%22q%22%20%c3%a9".into(),
            "CANARY-s3cr3t%2Fv%2Bal%3Due+%22q%22+%C3%A9".into(),
            // JSON as serde / JavaScript, with \/, and as Python's json.dumps.
            serde_json::to_string(V)
                .expect("json")
                .trim_matches('"')
                .to_owned(),
            r#"CANARY-s3cr3t\/v+al=ue \"q\" é"#.into(),
            r#"CANARY-s3cr3t/v+al=ue \"q\" \u00e9"#.into(),
        ];
        for e in encodings {
            let out = red(&r, &format!("before {e} after"));
            assert_eq!(out, "before <redacted:API_KEY> after", "form {e:?}");
        }
    }

    #[test]
    fn base64_of_a_longer_text_hides_the_value() {
        // `echo $KEY | base64` encodes the value and a newline; with text
        // before it the value can sit at any alignment.
        let r = redactor(&[("K", "CANARY-0123456789abcdef")]);
        for prefix in ["", "a", "ab", "abc"] {
            let text = format!("{prefix}CANARY-0123456789abcdef\n");
            let enc = STANDARD.encode(text.as_bytes());
            let out = red(&r, &enc);
            assert!(out.contains("<redacted:K>"), "{prefix:?}: {out}");
            // What is left is at most the edge characters, never the core.
            let left: String = out.replace("<redacted:K>", "");
            assert!(left.len() <= 8, "{prefix:?}: {out}");
        }
    }

    /// A realistic API key (`sk-ant-api03-` and 95 more characters) piped
    /// through the tools that print base64 and hex: coreutils `base64` and
    /// Python's `base64.encodebytes` wrap at 76 columns, `openssl base64` and
    /// PEM at 64, MIME with CRLF; `xxd -p` writes hex 60 columns wide,
    /// `.hex()` and `od`-free tools on one line.
    #[test]
    fn base64_as_the_tools_wrap_it_and_hex_are_redacted() {
        let key = format!("sk-ant-api03-{}", "Zx9_k2LmQ-7pRt".repeat(7));
        assert!(key.len() > 100);
        let r = redactor(&[("ANTHROPIC_API_KEY", &key)]);
        let wrap = |text: &str, width: usize, eol: &str| {
            text.as_bytes()
                .chunks(width)
                .map(|c| std::str::from_utf8(c).expect("ascii"))
                .collect::<Vec<_>>()
                .join(eol)
                + eol
        };
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        let with_newline = format!("{key}\n");
        let cases = [
            // echo "$KEY" | base64
            wrap(&STANDARD.encode(with_newline.as_bytes()), 76, "\n"),
            // printf %s "$KEY" | base64
            wrap(&STANDARD.encode(key.as_bytes()), 76, "\n"),
            // printf %s "$KEY" | openssl base64
            wrap(&STANDARD.encode(key.as_bytes()), 64, "\n"),
            // MIME
            wrap(&STANDARD.encode(key.as_bytes()), 76, "\r\n"),
            // printf %s "$KEY" | xxd -p
            wrap(&hex, 60, "\n"),
            // python3 -c 'print(os.environ["KEY"].encode().hex())'
            hex.clone(),
            hex.to_ascii_uppercase(),
        ];
        for text in cases {
            let out = red(&r, &text);
            assert!(
                out.contains("<redacted:ANTHROPIC_API_KEY>"),
                "{text:?} -> {out:?}"
            );
            // What is left is at most edge characters and line ends.
            let left = out.replace("<redacted:ANTHROPIC_API_KEY>", "");
            assert!(left.trim().len() <= 4, "{text:?} -> {out:?}");
        }
    }

    #[test]
    fn a_value_split_across_chunks_is_caught() {
        let r = Arc::new(redactor(&[("TOKEN", "CANARY-split-me-please")]));
        let text = "log: CANARY-split-me-please and Q0FOQVJZLXNwbGl0LW1lLXBsZWFzZQ== end\n";
        for cut in 0..text.len() {
            for cut2 in cut..text.len() {
                let mut s = StreamRedactor::new(r.clone());
                let mut out = s.push(&text.as_bytes()[..cut]);
                out.extend(s.push(&text.as_bytes()[cut..cut2]));
                out.extend(s.push(&text.as_bytes()[cut2..]));
                out.extend(s.finish());
                assert_eq!(
                    String::from_utf8(out).expect("utf8"),
                    "log: <redacted:TOKEN> and <redacted:TOKEN> end\n",
                    "cuts at {cut} and {cut2}"
                );
            }
        }
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let r = Arc::new(redactor(&[("A", "xyzzy-123"), ("B", "hunter2hunter2")]));
        let text = "xyzzy-12 xyzzy-123 hunter2hunter hunter2hunter2xyzzy-123 eHl6enktMTIz";
        let mut s = StreamRedactor::new(r.clone());
        let mut out = Vec::new();
        for b in text.as_bytes() {
            out.extend(s.push(&[*b]));
        }
        out.extend(s.finish());
        assert_eq!(out, r.redact(text.as_bytes()));
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "xyzzy-12 <redacted:A> hunter2hunter <redacted:B><redacted:A> <redacted:A>"
        );
    }

    #[test]
    fn only_a_possible_match_is_held_back() {
        let r = Arc::new(redactor(&[("K", "CANARY-value")]));
        let mut s = StreamRedactor::new(r);
        assert_eq!(s.push(b"hello world\n"), b"hello world\n".to_vec());
        assert_eq!(s.push(b"then CANA"), b"then ".to_vec());
        assert_eq!(s.push(b"DA\n"), b"CANADA\n".to_vec());
        assert_eq!(s.push(b"CANARY-val"), Vec::<u8>::new());
        assert_eq!(s.finish(), b"CANARY-val".to_vec());
    }

    #[test]
    fn overlapping_keys_redact_to_the_longest_match() {
        // One value inside another, and two keys with the same value.
        let r = redactor(&[
            ("SHORT", "abc123"),
            ("LONG", "xx-abc123-yy"),
            ("SAME_A", "same-value"),
            ("SAME_B", "same-value"),
        ]);
        assert_eq!(
            red(&r, "xx-abc123-yy abc123 same-value"),
            "<redacted:LONG> <redacted:SHORT> <redacted:SAME_A>"
        );
        // A value that is the prefix of a longer one still splits correctly.
        let r = Arc::new(redactor(&[("P", "prefix"), ("PL", "prefix-longer")]));
        let mut s = StreamRedactor::new(r);
        let mut out = s.push(b"prefix-lo");
        out.extend(s.push(b"nger prefix-l"));
        out.extend(s.finish());
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "<redacted:PL> <redacted:P>-l"
        );
    }

    #[test]
    fn binary_values_and_empty_redactors() {
        let r = Redactor::new([("BIN", &[0u8, 159, 146, 150, 10][..]), ("EMPTY", &[][..])]);
        assert_eq!(r.keys(), ["BIN"]);
        let mut text = b"x".to_vec();
        text.extend_from_slice(&[0u8, 159, 146, 150, 10]);
        assert_eq!(r.redact(&text), b"x<redacted:BIN>".to_vec());
        let none = Redactor::new(std::iter::empty());
        assert!(none.is_empty());
        assert_eq!(none.redact(b"abc"), b"abc".to_vec());
        let mut s = StreamRedactor::new(Arc::new(none));
        assert_eq!(s.push(b"abc"), b"abc".to_vec());
    }

    proptest::proptest! {
        #[test]
        fn chunking_never_changes_the_result(
            text in proptest::collection::vec(proptest::sample::select(b"abcAB=+/-".to_vec()), 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let r = Arc::new(redactor(&[("K1", "abcab"), ("K2", "ab=+"), ("K3", "a")]));
            let whole = r.redact(&text);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut s = StreamRedactor::new(r.clone());
            let mut out = Vec::new();
            let mut at = 0;
            for c in cuts {
                out.extend(s.push(&text[at..c]));
                at = c;
            }
            out.extend(s.push(&text[at..]));
            out.extend(s.finish());
            proptest::prop_assert_eq!(out, whole);
        }
    }
}
