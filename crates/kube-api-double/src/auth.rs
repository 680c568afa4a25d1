//! Authentication: static bearer tokens (`--token-auth-file`) and the
//! anonymous user, as kube-apiserver's token-file and anonymous
//! authenticators decide.

use std::collections::HashMap;
use std::path::Path;

use crate::Error;

/// The authenticated user of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    /// A user with a name and groups (no uid).
    pub fn new(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            name: name.to_string(),
            uid: String::new(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// `system:anonymous` in `system:unauthenticated`.
    pub fn anonymous() -> UserInfo {
        UserInfo::new("system:anonymous", &["system:unauthenticated"])
    }
}

/// One line of a token file: the token and who it authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUser {
    pub token: String,
    pub user: UserInfo,
}

impl TokenUser {
    pub fn new(token: &str, user: UserInfo) -> TokenUser {
        TokenUser {
            token: token.to_string(),
            user,
        }
    }
}

/// Splits one CSV record (RFC 4180 quoting, as Go's `encoding/csv`).
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    cur.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                cur.push(c);
            }
            continue;
        }
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            '"' => return Err("bare \" in non-quoted field".into()),
            ',' => {
                fields.push(std::mem::take(&mut cur));
                at_start = true;
            }
            c => {
                cur.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err("extraneous or missing \" in quoted field".into());
    }
    fields.push(cur);
    Ok(fields)
}

/// Parses kube-apiserver's token file: `token,user,uid[,"group1,group2"]`
/// per line; blank lines and lines starting with `#` are skipped.
pub fn parse_token_file(text: &str, path: &Path) -> Result<Vec<TokenUser>, Error> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let rec = csv_fields(line).map_err(|e| {
            Error::Config(format!(
                "--token-auth-file {}: line {}: {e}",
                path.display(),
                i + 1
            ))
        })?;
        if rec.len() < 3 {
            return Err(Error::Config(format!(
                "token file '{}' must have at least 3 columns (token, user name, user uid), found {} on line {}",
                path.display(),
                rec.len(),
                i + 1
            )));
        }
        if rec[0].is_empty() {
            tracing::warn!(file = %path.display(), line = i + 1, "empty token in token file, skipped");
            continue;
        }
        let groups = match rec.get(3) {
            Some(g) if !g.is_empty() => g.split(',').map(String::from).collect(),
            _ => Vec::new(),
        };
        out.push(TokenUser {
            token: rec[0].clone(),
            user: UserInfo {
                name: rec[1].clone(),
                uid: rec[2].clone(),
                groups,
            },
        });
    }
    Ok(out)
}

/// Reads and parses a token file.
pub fn read_token_file(path: &Path) -> Result<Vec<TokenUser>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("--token-auth-file {}: {e}", path.display())))?;
    parse_token_file(&text, path)
}

/// The outcome of authenticating a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authn {
    User(UserInfo),
    /// A bearer token was sent and is not known: 401.
    Rejected,
}

/// Token lookup plus the anonymous fallback.
pub struct Authenticator {
    tokens: HashMap<String, UserInfo>,
    anonymous: bool,
}

impl Authenticator {
    pub fn new(tokens: &[TokenUser], anonymous: bool) -> Authenticator {
        let mut map = HashMap::new();
        for t in tokens {
            if map.contains_key(&t.token) {
                tracing::warn!(user = %t.user.name, "duplicate token in token file; the first one wins");
                continue;
            }
            // Every authenticated user is in system:authenticated.
            let mut user = t.user.clone();
            if !user.groups.iter().any(|g| g == "system:authenticated") {
                user.groups.push("system:authenticated".into());
            }
            map.insert(t.token.clone(), user);
        }
        Authenticator {
            tokens: map,
            anonymous,
        }
    }

    /// Decides from the `Authorization` header: a known bearer token is its
    /// user; an unknown one is rejected; no token (or an empty one) is the
    /// anonymous user when anonymous requests are allowed.
    pub fn authenticate(&self, authorization: Option<&str>) -> Authn {
        let token = authorization.and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        match token {
            Some(t) if !t.is_empty() => match self.tokens.get(t) {
                Some(u) => Authn::User(u.clone()),
                None => Authn::Rejected,
            },
            _ if self.anonymous => Authn::User(UserInfo::anonymous()),
            _ => Authn::Rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file() {
        let text = "admin-token,admin,uid-admin,\"system:masters\"\n\
                    # comment\n\
                    \n\
                    flannel-token,system:serviceaccount:kube-flannel:flannel,uid-flannel,\"system:serviceaccounts,system:serviceaccounts:kube-flannel\"\n\
                    plain,bob,uid-bob\n";
        let t = parse_token_file(text, Path::new("tokens.csv")).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].user.groups, vec!["system:masters"]);
        assert_eq!(
            t[1].user.groups,
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:kube-flannel"
            ]
        );
        assert!(t[2].user.groups.is_empty());
        assert!(parse_token_file("a,b\n", Path::new("t")).is_err());
    }

    #[test]
    fn authenticate() {
        let a = Authenticator::new(&[TokenUser::new("t1", UserInfo::new("u", &["g"]))], true);
        assert_eq!(
            a.authenticate(Some("Bearer t1")),
            Authn::User(UserInfo::new("u", &["g", "system:authenticated"]))
        );
        assert_eq!(a.authenticate(Some("Bearer nope")), Authn::Rejected);
        assert_eq!(a.authenticate(None), Authn::User(UserInfo::anonymous()));
        let strict = Authenticator::new(&[], false);
        assert_eq!(strict.authenticate(None), Authn::Rejected);
    }
}
