//! `Upload-Metadata`: parsed strictly (400 on anything malformed), then mapped onto the object:
//! `filename` names it (sanitized), `filetype` becomes its Content-Type, every other pair
//! becomes S3 user metadata (sanitized keys and values).

use std::collections::{BTreeMap, HashSet};

use base64::Engine as _;

use crate::error::{Error, Result};

/// Bound on the raw header. Browsers send a few hundred bytes; 4 KiB leaves room for long
/// file names while keeping state objects and S3 metadata small.
pub const MAX_METADATA_BYTES: usize = 4096;
/// S3 allows 2 KB of user metadata (keys and values, as sent).
const MAX_S3_METADATA_BYTES: usize = 2048;
/// Object names from `filename` are cut to this many bytes (common filesystem limit).
const MAX_FILENAME_BYTES: usize = 255;

pub type Pairs = Vec<(String, Vec<u8>)>;

pub fn parse(raw: &str) -> Result<Pairs> {
    let bad = |m: &str| Error::BadRequest(format!("Upload-Metadata: {m}"));
    if raw.len() > MAX_METADATA_BYTES {
        return Err(bad("too long"));
    }
    let mut seen = HashSet::new();
    let mut pairs = Vec::new();
    if raw.trim().is_empty() {
        return Ok(pairs);
    }
    for item in raw.split(',') {
        let item = item.trim();
        let (key, value) = match item.split_once(' ') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err(bad("keys must be non-empty ASCII without spaces or commas"));
        }
        if !seen.insert(key.to_owned()) {
            return Err(bad("duplicate key"));
        }
        let value = match value {
            None => Vec::new(),
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| bad("values must be base64"))?,
        };
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

/// What the metadata means for the stored object.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ObjectInfo {
    /// A safe single-segment object name, when `filename` gave one.
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub user: BTreeMap<String, String>,
}

pub fn object_info(pairs: &Pairs) -> Result<ObjectInfo> {
    let mut info = ObjectInfo::default();
    let mut size = 0;
    for (key, value) in pairs {
        match key.as_str() {
            "filename" => info.filename = sanitize_filename(value),
            "filetype" => info.content_type = content_type(value),
            _ => {
                let k = meta_key(key);
                let v = meta_value(value);
                size += k.len() + v.len();
                // Two keys that sanitize alike keep the first: no silent merge of values.
                info.user.entry(k).or_insert(v);
            }
        }
    }
    if size > MAX_S3_METADATA_BYTES {
        return Err(Error::BadRequest(
            "Upload-Metadata: more than 2 KB of user metadata (S3's limit)".into(),
        ));
    }
    Ok(info)
}

/// A file name for the object: the last path component (clients send `C:\x\a.jpg` or
/// `dir/a.jpg`), no control characters, trimmed, at most 255 bytes. Unusable names give `None`
/// and the caller falls back to the upload id: rewriting beats failing an upload over a name.
pub fn sanitize_filename(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let last = text.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = last.chars().filter(|c| !c.is_control()).collect();
    let mut name = clean.trim().to_owned();
    if name.len() > MAX_FILENAME_BYTES {
        let mut cut = MAX_FILENAME_BYTES;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    let name = name.trim();
    let reserved = name == crate::keys::RESERVED_SEGMENT;
    if name.is_empty() || name == "." || name == ".." || reserved {
        return None;
    }
    Some(name.to_owned())
}

/// `type/subtype[; params]` in visible ASCII, else ignored (S3 then stores its default).
fn content_type(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && s.split(';').next().is_some_and(|t| {
            t.trim()
                .split_once('/')
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        });
    ok.then(|| s.to_owned())
}

/// S3 metadata keys travel as `x-amz-meta-<key>` headers: lowercase letters, digits, `-`.
fn meta_key(key: &str) -> String {
    key.bytes()
        .map(|b| match b.to_ascii_lowercase() {
            c @ (b'a'..=b'z' | b'0'..=b'9' | b'-') => char::from(c),
            _ => '-',
        })
        .collect()
}

/// Values must be printable ASCII on the wire; other bytes (and `%`) are percent-encoded, so
/// nothing is lost and the value can be decoded.
fn meta_value(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        if (b.is_ascii_graphic() || b == b' ') && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn parses_strictly() {
        let raw = format!(
            "filename {},is_confidential,filetype {}",
            b64("a.jpg"),
            b64("image/jpeg")
        );
        let pairs = parse(&raw).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[1], ("is_confidential".to_owned(), Vec::new()));
        assert!(parse("").unwrap().is_empty());
        for bad in [
            "a !!!",
            "a YQ==,a YQ==",
            ",",
            "a YQ",
            "k\u{e9} YQ==",
            "a YQ== extra",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&"a".repeat(MAX_METADATA_BYTES + 1)).is_err());
    }

    #[test]
    fn filenames_are_rewritten_not_refused() {
        let cases = [
            ("a.jpg", Some("a.jpg")),
            ("../../etc/passwd", Some("passwd")),
            ("C:\\Users\\x\\photo.png", Some("photo.png")),
            ("dir/", None),
            ("..", None),
            (".s3up", None),
            ("  spaced\u{7}name.txt ", Some("spacedname.txt")),
            ("\u{0}", None),
            ("ünïcode ✓.txt", Some("ünïcode ✓.txt")),
        ];
        for (raw, want) in cases {
            assert_eq!(
                sanitize_filename(raw.as_bytes()).as_deref(),
                want,
                "{raw:?}"
            );
        }
        let long = "é".repeat(200);
        let cut = sanitize_filename(long.as_bytes()).unwrap();
        assert!(cut.len() <= 255 && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn maps_onto_the_object() {
        let raw = format!(
            "filename {},filetype {},Note {},weird_KEY {}",
            b64("x/y.bin"),
            b64("application/x-thing"),
            b64("héllo 100%"),
            b64("v")
        );
        let info = object_info(&parse(&raw).unwrap()).unwrap();
        assert_eq!(info.filename.as_deref(), Some("y.bin"));
        assert_eq!(info.content_type.as_deref(), Some("application/x-thing"));
        assert_eq!(info.user["note"], "h%C3%A9llo 100%25");
        assert_eq!(info.user["weird-key"], "v");
        let bad_type = object_info(&parse(&format!("filetype {}", b64("nonsense"))).unwrap());
        assert_eq!(bad_type.unwrap().content_type, None);
        let huge = format!("a {},b {}", b64(&"x".repeat(1500)), b64(&"y".repeat(1500)));
        assert!(object_info(&parse(&huge).unwrap()).is_err());
    }
}
