//! Object keys: built only from a verified user id and a checked name, so no request can
//! address another user's prefix. The same escaping feeds IAM session policies, so it must never
//! produce IAM wildcards (`*`, `?`) or variables (`${...}`).

/// Sub-prefix inside each user's prefix reserved for our own state (tus state, tails);
/// hidden from listings and never addressable by an upload name.
pub const RESERVED_SEGMENT: &str = ".s3up";

/// S3 keys are at most 1024 bytes of UTF-8.
const MAX_KEY_BYTES: usize = 1024;
/// Escaped user ids longer than this are refused (and keep STS session policies small).
const MAX_USER_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("user id cannot be mapped to a key prefix")]
    BadUser,
    #[error("invalid object name: {0}")]
    BadName(&'static str),
}

/// A user id made safe for keys and IAM resources: every byte outside `[A-Za-z0-9_.@-]` becomes
/// `=XX` (uppercase hex of its UTF-8 bytes), `=` included, so the mapping is injective: two
/// different ids never share a prefix. A leading `.` is escaped too, so `.` and `..` never form a
/// path segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserSegment(String);

impl UserSegment {
    pub fn new(user: &str) -> Result<Self, KeyError> {
        if user.is_empty() {
            return Err(KeyError::BadUser);
        }
        let mut out = String::with_capacity(user.len());
        for (i, b) in user.bytes().enumerate() {
            let plain = b.is_ascii_alphanumeric()
                || matches!(b, b'_' | b'@' | b'-')
                || (b == b'.' && i > 0);
            if plain {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("={b:02X}"));
            }
        }
        if out.len() > MAX_USER_BYTES {
            return Err(KeyError::BadUser);
        }
        Ok(Self(out))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The segment back from its escaped form (as found in a key), if it is one that
    /// [`UserSegment::new`] produces.
    pub fn from_escaped(escaped: &str) -> Option<Self> {
        let mut bytes = Vec::with_capacity(escaped.len());
        let mut rest = escaped.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'=' {
                let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        let seg = Self::new(&String::from_utf8(bytes).ok()?).ok()?;
        (seg.0 == escaped).then_some(seg)
    }
}

/// The key prefix template, e.g. `uploads/{user}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    before: String,
    after: String,
}

impl KeyLayout {
    pub fn new(template: &str) -> Result<Self, String> {
        let Some((before, after)) = template.split_once("{user}") else {
            return Err("must contain {user}".into());
        };
        if after.contains("{user}") {
            return Err("must contain {user} exactly once".into());
        }
        if !after.ends_with('/') {
            return Err("must end with '/' after {user}".into());
        }
        if before.starts_with('/') || template.contains("//") {
            return Err("must not start with '/' or contain '//'".into());
        }
        let safe = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
        };
        if !safe(before) || !safe(after) {
            return Err(
                "may contain only letters, digits, '/', '-', '_', '.' besides {user}".into(),
            );
        }
        Ok(Self {
            before: before.to_owned(),
            after: after.to_owned(),
        })
    }

    /// `uploads/alice/`: everything this user may touch lies below it.
    pub fn user_prefix(&self, user: &UserSegment) -> String {
        format!("{}{}{}", self.before, user.as_str(), self.after)
    }

    /// The key for a user-chosen name (checked with [`check_name`]).
    pub fn object_key(&self, user: &UserSegment, name: &str) -> Result<String, KeyError> {
        check_name(name)?;
        let key = format!("{}{name}", self.user_prefix(user));
        if key.len() > MAX_KEY_BYTES {
            return Err(KeyError::BadName("too long"));
        }
        Ok(key)
    }

    /// Proxy-wide state outside every user's prefix (the tus expiry index): `uploads/.s3up/`.
    /// No user prefix can start with it, as escaped user ids never start with `.`.
    pub fn index_prefix(&self) -> String {
        format!("{}{RESERVED_SEGMENT}/", self.before)
    }

    /// Where our own per-user state lives: `uploads/alice/.s3up/`.
    pub fn reserved_prefix(&self, user: &UserSegment) -> String {
        format!("{}{RESERVED_SEGMENT}/", self.user_prefix(user))
    }
}

/// Names are relative paths: non-empty `/`-separated segments, none `.` or `..`, no control
/// characters or backslashes, not inside the reserved sub-prefix. Refused rather than rewritten,
/// so the key a client asked for is the key it gets.
pub fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() {
        return Err(KeyError::BadName("empty"));
    }
    if name.len() > MAX_KEY_BYTES {
        return Err(KeyError::BadName("too long"));
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return Err(KeyError::BadName("control characters or backslashes"));
    }
    for segment in name.split('/') {
        match segment {
            "" => return Err(KeyError::BadName("empty path segment or leading '/'")),
            "." | ".." => return Err(KeyError::BadName("'.' and '..' segments are not allowed")),
            _ => {}
        }
    }
    if name.split('/').next() == Some(RESERVED_SEGMENT) {
        return Err(KeyError::BadName("reserved prefix"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KeyLayout {
        KeyLayout::new("uploads/{user}/").unwrap()
    }

    #[test]
    fn plain_ids_stay_readable() {
        for id in ["alice", "bob_2", "alice@example.com", "9b2f-41aa", "a.b"] {
            assert_eq!(UserSegment::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn hostile_ids_are_escaped_into_distinct_safe_segments() {
        let hostile = [
            "*",
            "?",
            "a*",
            "${aws:username}",
            "{user}",
            "a/b",
            "../bob",
            "..",
            ".",
            "alice/../bob",
            "auth0|123",
            "аlice",
            "alice\u{200b}",
            "al ice",
            "a=2Fb",
            "a/b ",
            "\u{0}",
            "bob\n",
        ];
        let mut seen = std::collections::HashSet::new();
        for id in hostile {
            let seg = UserSegment::new(id).unwrap();
            let s = seg.as_str();
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_@-.=".contains(&b)),
                "{id:?} -> {s:?}"
            );
            assert!(!s.starts_with('.'), "{id:?} -> {s:?}");
            assert!(seen.insert(s.to_owned()), "collision for {id:?}");
        }
        // Cyrillic 'а' must not collapse into Latin 'a'.
        assert_ne!(
            UserSegment::new("аlice").unwrap(),
            UserSegment::new("alice").unwrap()
        );
        // '=' itself is escaped, so an id cannot imitate an escape sequence.
        assert_ne!(
            UserSegment::new("a=2Fb").unwrap(),
            UserSegment::new("a/b").unwrap()
        );
    }

    #[test]
    fn empty_or_huge_ids_rejected() {
        assert_eq!(UserSegment::new(""), Err(KeyError::BadUser));
        assert_eq!(UserSegment::new(&"x".repeat(129)), Err(KeyError::BadUser));
        assert_eq!(UserSegment::new(&"é".repeat(30)), Err(KeyError::BadUser));
        assert!(UserSegment::new(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn keys_stay_under_the_user_prefix() {
        let alice = UserSegment::new("alice").unwrap();
        assert_eq!(
            layout().object_key(&alice, "a.mp4").unwrap(),
            "uploads/alice/a.mp4"
        );
        assert_eq!(
            layout().object_key(&alice, "2024/clip one.mp4").unwrap(),
            "uploads/alice/2024/clip one.mp4"
        );
        for bad in [
            "",
            "/etc",
            "../bob/x",
            "a/../../bob",
            "a//b",
            "a/",
            ".",
            "x/./y",
            "a\u{7}",
            "a\\b",
            ".s3up/state",
            ".s3up",
        ] {
            assert!(layout().object_key(&alice, bad).is_err(), "{bad:?}");
        }
        assert!(layout().object_key(&alice, ".hidden").is_ok());
        assert!(layout().object_key(&alice, &"n".repeat(1010)).is_ok());
        assert!(layout().object_key(&alice, &"n".repeat(1011)).is_err());
        assert_eq!(layout().reserved_prefix(&alice), "uploads/alice/.s3up/");
        assert_eq!(layout().index_prefix(), "uploads/.s3up/");
        for id in ["alice", "../bob", "аlice", "a=2Fb", ".x"] {
            let seg = UserSegment::new(id).unwrap();
            assert_eq!(UserSegment::from_escaped(seg.as_str()), Some(seg));
        }
        for bad in ["", ".x", "a/b", "=2", "=ZZ", "a=2f", "=61"] {
            assert_eq!(UserSegment::from_escaped(bad), None, "{bad}");
        }
    }

    #[test]
    fn templates_are_checked() {
        assert!(KeyLayout::new("{user}/").is_ok());
        assert!(KeyLayout::new("tenants/x/{user}/in/").is_ok());
        for bad in [
            "uploads/",
            "uploads/{user}",
            "/uploads/{user}/",
            "u/{user}/{user}/",
            "u*/{user}/",
            "u//{user}/",
        ] {
            assert!(KeyLayout::new(bad).is_err(), "{bad}");
        }
    }
}
