//! The `Authorization: Bearer <credentials>` header, shared by the edge (client tokens) and the
//! notifier (API keys in gRPC metadata).

/// Returns the credentials of an `Authorization` value with the `Bearer` scheme, trimmed. The
/// scheme is matched without regard to case, as RFC 7235 requires. Another scheme, or no
/// credentials, gives `None`.
pub fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    let credentials = credentials.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_ignores_case() {
        for value in ["Bearer a.b.c", "bearer a.b.c", "BEARER a.b.c", "  bEaReR   a.b.c "] {
            assert_eq!(bearer_credentials(value), Some("a.b.c"), "{value:?}");
        }
    }

    #[test]
    fn other_values_have_no_credentials() {
        for value in ["Basic a.b.c", "Bearer", "Bearer   ", "Bearera.b.c", ""] {
            assert_eq!(bearer_credentials(value), None, "{value:?}");
        }
    }
}
