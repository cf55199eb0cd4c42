//! The join token check every RPC passes first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gantry_proto::{AUTHORIZATION, ClusterError};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>` in constant time and counts failures.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    token: Arc<Vec<u8>>,
    pub failures: Arc<AtomicU64>,
}

impl TokenCheck {
    pub fn new(token: &str) -> Self {
        Self {
            token: Arc::new(token.as_bytes().to_vec()),
            failures: Arc::default(),
        }
    }

    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes)
            .unwrap_or_default();
        // Lengths leak through timing anyway; only the content comparison must not.
        let ok = presented.len() == self.token.len() && bool::from(presented.ct_eq(&self.token));
        if ok {
            Ok(request)
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            Err(ClusterError::Unauthenticated.into())
        }
    }
}

/// A fresh random token for a job whose workers the coordinator starts itself.
pub fn generate_token() -> String {
    let bytes: [u8; 24] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert(AUTHORIZATION, h.parse().unwrap());
        }
        r
    }

    #[test]
    fn accepts_only_the_exact_token_and_counts_refusals() {
        let check = TokenCheck::new("s3cret");
        assert!(check.check(request(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
            Some("Bearer "),
        ] {
            let status = check.check(request(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        assert_eq!(check.failures.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let (a, b) = (generate_token(), generate_token());
        assert_eq!(a.len(), 48);
        assert_ne!(a, b);
    }
}
