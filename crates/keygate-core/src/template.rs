//! Header value templates: `Bearer {secret}`, `{secret}`, `Basic {secret}`.

use zeroize::Zeroizing;

use crate::PatternError;

const PLACEHOLDER: &str = "{secret}";

/// A header value template with exactly one `{secret}` placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    prefix: String,
    suffix: String,
}

impl Template {
    /// Parses a template. It must contain `{secret}` exactly once and only
    /// characters that are valid in an HTTP header value.
    pub fn parse(s: &str) -> Result<Template, PatternError> {
        let mut parts = s.split(PLACEHOLDER);
        let prefix = parts.next().unwrap_or_default();
        let Some(suffix) = parts.next() else {
            return Err(PatternError::new("format must contain {secret}"));
        };
        if parts.next().is_some() {
            return Err(PatternError::new("format must contain {secret} only once"));
        }
        let valid = |p: &str| p.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        if !valid(prefix) || !valid(suffix) {
            return Err(PatternError::new(
                "format may contain only printable ASCII besides {secret}",
            ));
        }
        Ok(Template {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        })
    }

    /// The header value with the secret in place, in a buffer zeroed on drop.
    pub fn render(&self, secret: &[u8]) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(
            self.prefix.len() + secret.len() + self.suffix.len(),
        ));
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(secret);
        out.extend_from_slice(self.suffix.as_bytes());
        out
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{PLACEHOLDER}{}", self.prefix, self.suffix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_around_the_secret() {
        let t = Template::parse("Bearer {secret}").unwrap();
        assert_eq!(&t.render(b"sk-1")[..], b"Bearer sk-1");
        assert_eq!(t.to_string(), "Bearer {secret}");
        let t = Template::parse("{secret}").unwrap();
        assert_eq!(&t.render(b"x")[..], b"x");
    }

    #[test]
    fn rejects_missing_double_or_bad_chars() {
        assert!(Template::parse("Bearer").is_err());
        assert!(Template::parse("{secret}{secret}").is_err());
        assert!(Template::parse("Bearer\n{secret}").is_err());
    }
}
