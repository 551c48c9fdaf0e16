//! Session tokens of a served repository (kernel-notes/formats.md, "Repository tokens").
//!
//! The metadata service hands one out per swap session; every data and metadata request of
//! that session carries it. A token is text: `v1.<session>.<scope>.<expires>.<mac>`, where
//! `<session>` is 32 hex digits, `<scope>` `upload` or `download`, `<expires>` Unix seconds
//! in decimal, and `<mac>` the HMAC-SHA256, in hex, of everything before the last dot, keyed
//! with the server's token key. Checking one needs only the key: any server holding it (a
//! brick server, later) can check tokens without asking the metadata service.

use hmac::{Hmac, Mac};
use sha2::Sha256;

const VERSION: &str = "v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Negotiate, upload, commit, and read.
    Upload,
    /// Read chunks and manifests only.
    Download,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Upload => "upload",
            Scope::Download => "download",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "upload" => Some(Scope::Upload),
            "download" => Some(Scope::Download),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    pub session: [u8; 16],
    pub scope: Scope,
    pub expires_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify (forged or from another server)")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// The secret that signs tokens: 32 random bytes, kept in the repository's directory.
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn from_bytes(bytes: [u8; 32]) -> TokenKey {
        TokenKey(bytes)
    }

    fn mac(&self, text: &str) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(text.as_bytes());
        mac
    }

    pub fn mint(&self, claims: &Claims) -> String {
        let text = format!(
            "{VERSION}.{}.{}.{}",
            hex::encode(claims.session),
            claims.scope.as_str(),
            claims.expires_at
        );
        let tag = hex::encode(self.mac(&text).finalize().into_bytes());
        format!("{text}.{tag}")
    }

    /// The token's claims, if it is well formed, signed with this key, and not expired at
    /// `now`. The signature is compared in constant time.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let (text, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mut parts = text.split('.');
        let (Some(version), Some(session), Some(scope), Some(expires), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let tag = hex::decode(tag).map_err(|_| TokenError::Malformed)?;
        if version != VERSION {
            return Err(TokenError::Malformed);
        }
        self.mac(text)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        let mut id = [0u8; 16];
        hex::decode_to_slice(session, &mut id).map_err(|_| TokenError::Malformed)?;
        let claims = Claims {
            session: id,
            scope: Scope::parse(scope).ok_or(TokenError::Malformed)?,
            expires_at: expires.parse().map_err(|_| TokenError::Malformed)?,
        };
        if claims.expires_at <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            session: [7; 16],
            scope: Scope::Upload,
            expires_at: 1000,
        }
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let key = TokenKey::from_bytes([1; 32]);
        let t = key.mint(&claims());
        assert_eq!(key.verify(&t, 999), Ok(claims()));
        assert_eq!(key.verify(&t, 1000), Err(TokenError::Expired));
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let key = TokenKey::from_bytes([1; 32]);
        let t = key.mint(&claims());
        // Another key's token.
        let other = TokenKey::from_bytes([2; 32]).mint(&claims());
        assert_eq!(key.verify(&other, 0), Err(TokenError::BadSignature));
        // Claims changed under the signature: later expiry, wider scope, other session.
        let longer = t.replacen(".1000.", ".9999.", 1);
        assert_eq!(key.verify(&longer, 0), Err(TokenError::BadSignature));
        let down = key.mint(&Claims {
            scope: Scope::Download,
            ..claims()
        });
        let widened = down.replacen(".download.", ".upload.", 1);
        assert_eq!(key.verify(&widened, 0), Err(TokenError::BadSignature));
        // Garbage.
        for bad in ["", "v1", "v1.a.b.c.d", "v2.x", &t[..t.len() - 1], "....."] {
            assert!(key.verify(bad, 0).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(s in ".{0,200}") {
            let _ = TokenKey::from_bytes([3; 32]).verify(&s, 0);
        }
    }
}
