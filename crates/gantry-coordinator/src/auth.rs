//! Who may call the coordinator: the token check every RPC passes first.
//!
//! Two bearer tokens, two roles. Workers present the join token (and, after Join, a session
//! credential per generation that the job checks); operators present the operator token,
//! which workers never hold, so a compromised worker can neither read the job's state through
//! `Status` nor stop or steer it through `Control`. The interceptor only knows which token
//! matched; each RPC checks that it is the role the RPC is for ([`require`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gantry_proto::{AUTHORIZATION, ClusterError};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// Which token a request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The join token: `Join`, `Heartbeat`, `Finish`.
    Worker,
    /// The operator token: `Status`, `Control`.
    Operator,
}

/// Checks `authorization: Bearer <token>` in constant time against both tokens, counts
/// failures, and records the [`Role`] in the request's extensions.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    join: Arc<Vec<u8>>,
    operator: Arc<Vec<u8>>,
    pub failures: Arc<AtomicU64>,
}

impl TokenCheck {
    /// The two tokens must differ (the caller refuses equal ones, see [`distinct`]).
    pub fn new(join: &str, operator: &str) -> Self {
        Self {
            join: Arc::new(join.as_bytes().to_vec()),
            operator: Arc::new(operator.as_bytes().to_vec()),
            failures: Arc::default(),
        }
    }

    pub fn check<T>(&self, mut request: Request<T>) -> Result<Request<T>, Status> {
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes)
            .unwrap_or_default();
        // Lengths leak through timing anyway; only the content comparison must not.
        let is =
            |token: &[u8]| presented.len() == token.len() && bool::from(presented.ct_eq(token));
        let role = if !presented.is_empty() && is(&self.join) {
            Role::Worker
        } else if !presented.is_empty() && is(&self.operator) {
            Role::Operator
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err(ClusterError::Unauthenticated.into());
        };
        request.extensions_mut().insert(role);
        Ok(request)
    }
}

/// Refuses a request that did not carry the token of `role` (the interceptor ran first, so
/// it carried one of the two).
pub fn require<T>(request: &Request<T>, role: Role) -> Result<(), Status> {
    match request.extensions().get::<Role>() {
        Some(found) if *found == role => Ok(()),
        _ => Err(ClusterError::PermissionDenied(match role {
            Role::Worker => "this call is for workers (the join token)".to_owned(),
            Role::Operator => "this call is for operators (the operator token)".to_owned(),
        })
        .into()),
    }
}

/// Refuses a configuration whose join and operator tokens are the same.
pub fn distinct(join: &str, operator: &str) -> anyhow::Result<()> {
    if join == operator {
        anyhow::bail!(
            "cluster.operator_token equals cluster.token: operators need a token that workers \
             do not hold"
        );
    }
    Ok(())
}

/// Bytes of entropy below which a configured token earns a warning.
pub const WEAK_TOKEN_BYTES: usize = 16;

/// A warning for a configured token shorter than [`WEAK_TOKEN_BYTES`] characters, naming its
/// key.
pub fn weakness(key: &str, token: &str) -> Option<String> {
    (token.len() < WEAK_TOKEN_BYTES).then(|| {
        format!(
            "{key} has only {} characters; use at least {WEAK_TOKEN_BYTES} random bytes \
             (e.g. `openssl rand -hex 24`)",
            token.len()
        )
    })
}

/// A fresh random token (24 bytes, hex) for a job whose workers the coordinator starts itself,
/// an operator token nobody configured, or a session credential.
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
    fn accepts_only_the_exact_tokens_and_counts_refusals() {
        let check = TokenCheck::new("s3cret", "0perator");
        let worker = check.check(request(Some("Bearer s3cret"))).unwrap();
        assert_eq!(worker.extensions().get::<Role>(), Some(&Role::Worker));
        let operator = check.check(request(Some("Bearer 0perator"))).unwrap();
        assert_eq!(operator.extensions().get::<Role>(), Some(&Role::Operator));
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
    fn each_role_is_refused_the_other_role_s_calls() {
        let check = TokenCheck::new("s3cret", "0perator");
        let worker = check.check(request(Some("Bearer s3cret"))).unwrap();
        let operator = check.check(request(Some("Bearer 0perator"))).unwrap();
        assert!(require(&worker, Role::Worker).is_ok());
        assert!(require(&operator, Role::Operator).is_ok());
        let denied = require(&worker, Role::Operator).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("operator token"));
        assert!(require(&operator, Role::Worker).is_err());
        // A request that skipped the interceptor has no role at all.
        assert!(require(&request(None), Role::Operator).is_err());
    }

    #[test]
    fn equal_and_short_tokens_are_named() {
        assert!(distinct("abc", "abc").is_err());
        assert!(distinct("abc", "abd").is_ok());
        assert!(
            weakness("cluster.token", "12345")
                .unwrap()
                .contains("cluster.token")
        );
        assert!(weakness("cluster.token", &generate_token()).is_none());
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let (a, b) = (generate_token(), generate_token());
        assert_eq!(a.len(), 48);
        assert_ne!(a, b);
    }
}
