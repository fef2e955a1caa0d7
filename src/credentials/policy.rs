//! What one user's STS session may do, and what the session is called.
//!
//! The inline session policy is intersected with the upload role's own policy, so even a bug in
//! our key logic cannot write outside `{prefix}{user}/`: S3 itself refuses it. Everything that
//! comes from the user is a [`UserSegment`], which holds only `[A-Za-z0-9_.@=-]` and never starts
//! with `.`: no IAM wildcard (`*`, `?`) or policy variable (`${...}`) can come from a user id.
//! The only wildcards in a policy are the trailing `*`s written here.

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::keys::{KeyLayout, UserSegment};

/// STS's limit on the inline session policy, in characters.
pub const MAX_POLICY_CHARS: usize = 2048;
/// STS's limits on `RoleSessionName` and `SourceIdentity`.
pub const MAX_SESSION_NAME: usize = 64;
/// Hex digits of SHA-256 kept when a session name is shortened (64 bits: no accidental clashes).
const HASH_HEX: usize = 16;

/// The inline session policy for `user`: the object actions the proxy and the browser need on
/// `{bucket}/{prefix}{user}/*`, `DeleteObject` only on the proxy's reserved state below it, and
/// `ListBucket` only for prefixes under the user's own.
pub fn session_policy(
    partition: &str,
    bucket: &str,
    keys: &KeyLayout,
    user: &UserSegment,
) -> String {
    let prefix = keys.user_prefix(user);
    let reserved = keys.reserved_prefix(user);
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "UserObjects",
                "Effect": "Allow",
                "Action": [
                    "s3:PutObject",
                    "s3:GetObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts"
                ],
                "Resource": format!("arn:{partition}:s3:::{bucket}/{prefix}*"),
            },
            {
                "Sid": "ProxyState",
                "Effect": "Allow",
                "Action": "s3:DeleteObject",
                "Resource": format!("arn:{partition}:s3:::{bucket}/{reserved}*"),
            },
            {
                "Sid": "ListOwnPrefix",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": format!("arn:{partition}:s3:::{bucket}"),
                "Condition": { "StringLike": { "s3:prefix": format!("{prefix}*") } },
            }
        ]
    });
    policy.to_string()
}

/// `RoleSessionName` (and `SourceIdentity`) for `user`: `prefix` + the escaped id, which already
/// fits STS's `[\w+=,.@-]`. Longer than 64 characters, it keeps the first 47 and appends `+` and
/// 16 hex digits of SHA-256 of the id. `prefix` never holds `+`, so a shortened name never equals
/// a whole one, and different users keep different names.
pub fn session_name(prefix: &str, user: &UserSegment) -> String {
    let full = format!("{prefix}{}", user.as_str());
    if full.len() <= MAX_SESSION_NAME {
        return full;
    }
    let digest = Sha256::digest(user.as_str().as_bytes());
    let hash: String = digest
        .iter()
        .take(HASH_HEX / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    // Both parts are ASCII, so byte positions are character positions.
    let keep = MAX_SESSION_NAME - 1 - HASH_HEX;
    format!("{}+{hash}", &full[..keep])
}

/// Checks an operator-chosen session-name prefix: 1..=32 characters of `[\w=,.@-]`.
pub fn check_session_prefix(prefix: &str) -> Result<(), String> {
    let ok = (1..=32).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_=,.@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 32 characters of letters, digits and _ = , . @ -".into())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::Value;

    use super::*;

    const HOSTILE: &[&str] = &[
        "*",
        "?",
        "a*",
        "*/*",
        "${aws:username}",
        "${*}",
        "{user}",
        "{",
        "}",
        "$",
        "a/b",
        "/",
        "..",
        ".",
        "../bob",
        "alice/../bob",
        "bob/*",
        "аlice",
        "alice\u{200b}",
        "ａｌｉｃｅ",
        "al ice",
        "a=2Fb",
        "auth0|123",
        "\"quoted\"",
        "back\\slash",
        "bob\n",
        "alice",
        "alic",
    ];

    fn long_ids() -> Vec<String> {
        vec![
            "x".repeat(128),
            format!("{}y", "x".repeat(127)),
            "é".repeat(21),
        ]
    }

    fn all_ids() -> Vec<String> {
        HOSTILE
            .iter()
            .map(|s| (*s).to_owned())
            .chain(long_ids())
            .collect()
    }

    fn resources(policy: &Value) -> Vec<(String, String)> {
        policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["Sid"].as_str().unwrap().to_owned(),
                    s["Resource"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn resources_are_exactly_the_users_prefix_for_hostile_ids() {
        for template in ["uploads/{user}/", "tenants/x/{user}/in/"] {
            let keys = KeyLayout::new(template).unwrap();
            let mut prefixes = Vec::new();
            for id in all_ids() {
                let user = UserSegment::new(&id).unwrap();
                let text = session_policy("aws", "my-bucket", &keys, &user);
                assert!(text.len() <= MAX_POLICY_CHARS, "{id:?}: {}", text.len());
                let policy: Value = serde_json::from_str(&text).unwrap();
                let prefix = keys.user_prefix(&user);
                let expected = [
                    ("UserObjects", format!("arn:aws:s3:::my-bucket/{prefix}*")),
                    (
                        "ProxyState",
                        format!("arn:aws:s3:::my-bucket/{prefix}.s3up/*"),
                    ),
                    ("ListOwnPrefix", "arn:aws:s3:::my-bucket".to_owned()),
                ];
                let got = resources(&policy);
                assert_eq!(got.len(), expected.len(), "{id:?}");
                for ((sid, res), (want_sid, want)) in got.iter().zip(expected.iter()) {
                    assert_eq!((sid.as_str(), res), (*want_sid, want), "{id:?}");
                }
                let condition = policy["Statement"][2]["Condition"]["StringLike"]["s3:prefix"]
                    .as_str()
                    .unwrap();
                assert_eq!(condition, format!("{prefix}*"), "{id:?}");
                // What came from the user: no wildcard, variable or path step.
                let from_user = user.as_str();
                for bad in ['*', '?', '$', '{', '}', '/', '\\', '"', ' '] {
                    assert!(!from_user.contains(bad), "{id:?} -> {from_user:?}");
                }
                assert!(!from_user.starts_with('.'), "{id:?} -> {from_user:?}");
                // The only wildcards are the trailing ones we wrote.
                for value in [res_of(&got, 0), res_of(&got, 1), condition] {
                    assert_eq!(value.matches('*').count(), 1, "{value}");
                    assert!(value.ends_with('*'), "{value}");
                    assert!(!value.contains('?') && !value.contains('$'), "{value}");
                }
                prefixes.push(prefix);
            }
            // Two users never share a prefix, and no prefix contains another's.
            let unique: HashSet<_> = prefixes.iter().collect();
            assert_eq!(unique.len(), prefixes.len(), "{template}");
            for a in &prefixes {
                for b in &prefixes {
                    assert!(a == b || !a.starts_with(b.as_str()), "{a} under {b}");
                }
            }
        }
    }

    fn res_of(got: &[(String, String)], i: usize) -> &str {
        &got[i].1
    }

    #[test]
    fn partition_follows_the_role() {
        let keys = KeyLayout::new("uploads/{user}/").unwrap();
        let user = UserSegment::new("alice").unwrap();
        let text = session_policy("aws-cn", "b-1", &keys, &user);
        assert!(text.contains("arn:aws-cn:s3:::b-1/uploads/alice/*"));
        assert!(!text.contains("arn:aws:"));
    }

    #[test]
    fn worst_case_policy_fits() {
        let keys = KeyLayout::new("a-rather-long/tenant-prefix/{user}/incoming/").unwrap();
        let user = UserSegment::new(&"=".repeat(42)).unwrap();
        assert_eq!(user.as_str().len(), 126);
        let text = session_policy("aws-us-gov", &"b".repeat(63), &keys, &user);
        assert!(text.len() <= MAX_POLICY_CHARS, "{}", text.len());
    }

    #[test]
    fn session_names_are_valid_and_distinct() {
        let mut seen = HashSet::new();
        let mut ids = all_ids();
        // Long ids that agree on their first 100 characters must still differ.
        ids.push(format!("{}a", "z".repeat(100)));
        ids.push(format!("{}b", "z".repeat(100)));
        ids.push("a".into());
        for id in &ids {
            let user = UserSegment::new(id).unwrap();
            let name = session_name("s3up-", &user);
            assert!(
                (2..=MAX_SESSION_NAME).contains(&name.len()),
                "{id:?}: {name}"
            );
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b)),
                "{id:?}: {name}"
            );
            assert!(name.starts_with("s3up-"), "{name}");
            assert!(seen.insert(name.clone()), "clash for {id:?}: {name}");
        }
        let alice = UserSegment::new("alice").unwrap();
        assert_eq!(session_name("s3up-", &alice), "s3up-alice");
        assert_eq!(session_name("x", &UserSegment::new("a").unwrap()), "xa");
        let long = session_name("s3up-", &UserSegment::new(&"x".repeat(128)).unwrap());
        assert_eq!(long.len(), MAX_SESSION_NAME);
        assert!(
            long.starts_with(&format!("s3up-{}", "x".repeat(42))),
            "{long}"
        );
        assert_eq!(long.matches('+').count(), 1);
    }

    #[test]
    fn session_prefixes_are_checked() {
        assert!(check_session_prefix("s3up-").is_ok());
        assert!(check_session_prefix("app@prod,eu=1.").is_ok());
        for bad in ["", "a+b", "a b", "a/b", "a*", &"p".repeat(33), "ä"] {
            assert!(check_session_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
