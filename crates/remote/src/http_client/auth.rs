//! HTTP authentication headers: parsing `WWW-Authenticate` challenges
//! ([`parse_www_authenticate`]) and the `Authorization` values that answer them (`Basic` with
//! base64 credentials, `Bearer` with a token). Which challenge to answer, with which
//! credentials and where tokens come from is the backend's (`registry`).

use base64::Engine;

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower case: `bearer`, `basic`, ...
    pub scheme: String,
    /// Parameter names in lower case.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth/token",service="registry",scope="repository:a/b:pull,push"`
/// (quoted values may hold commas) or `Basic realm="r"`. Several challenges may follow each
/// other; a new one starts at a token that is not followed by `=`.
pub fn parse_www_authenticate(value: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = value.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let start = i;
        while i < s.len() && !matches!(s[i], b' ' | b'\t' | b',' | b'=') {
            i += 1;
        }
        let token = &value[start..i];
        // Look past spaces for '='.
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() && !token.is_empty() {
            // A parameter of the current challenge (token68 values such as "abc==" fall here too
            // and are ignored gracefully).
            i = j + 1;
            while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
                i += 1;
            }
            let mut val = String::new();
            if i < s.len() && s[i] == b'"' {
                i += 1;
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    // Push whole UTF-8 characters.
                    let ch_len = utf8_len(s[i]);
                    val.push_str(&value[i..(i + ch_len).min(s.len())]);
                    i += ch_len;
                }
                i += 1; // closing quote
            } else {
                let vs = i;
                while i < s.len() && s[i] != b',' {
                    i += 1;
                }
                val = value[vs..i].trim().to_string();
            }
            out.last_mut().expect("checked").params.push((token.to_ascii_lowercase(), val));
        } else if !token.is_empty() {
            out.push(Challenge { scheme: token.to_ascii_lowercase(), params: Vec::new() });
        } else {
            i += 1;
        }
    }
    out
}

fn utf8_len(b: u8) -> usize {
    match b {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// The `Authorization` value of HTTP basic authentication: `Basic base64(user:password)`.
pub fn basic_authorization(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// The `Authorization` value carrying a bearer token.
pub fn bearer_authorization(token: &str) -> String {
    format!("Bearer {token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_www_authenticate(
            r#"Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("http://127.0.0.1:1/token"));
        assert_eq!(c[0].param("service"), Some("reg"));
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
        let c = parse_www_authenticate(r#"Basic realm="r""#);
        assert_eq!(c, vec![Challenge { scheme: "basic".into(), params: vec![("realm".into(), "r".into())] }]);
        let c =
            parse_www_authenticate(r#"Basic realm="a \"q\"", Bearer realm=http://x/t, error=invalid_token"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("a \"q\""));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("http://x/t"));
        assert_eq!(c[1].param("error"), Some("invalid_token"));
        assert!(parse_www_authenticate("").is_empty());
        let c = parse_www_authenticate("Negotiate");
        assert_eq!(c[0].scheme, "negotiate");
    }

    #[test]
    fn basic_and_bearer_authorization_values() {
        // Standard base64 with padding, of "user:password".
        assert_eq!(basic_authorization("user", "pa ss"), "Basic dXNlcjpwYSBzcw==");
        assert_eq!(basic_authorization("", ""), "Basic Og==");
        assert_eq!(basic_authorization("ab", ""), "Basic YWI6");
        assert_eq!(basic_authorization("a", "b"), "Basic YTpi");
        assert_eq!(bearer_authorization("t0k"), "Bearer t0k");
    }
}
