//! What a Join request must look like before the coordinator stores, shows or publishes any
//! of it: identifiers of bounded length and a plain alphabet (they appear in logs, metrics
//! labels, `/api/status` and the status page), and addresses another machine can use (the
//! ring address is dialled by the left neighbour, the metrics address is published in
//! `/sd/workers` for Prometheus to scrape).

use std::net::{IpAddr, SocketAddr};

use gantry_proto::ClusterError;
use gantry_proto::v1::JoinRequest;

/// The longest worker id (a Kubernetes pod name is at most 63 characters; hostname-pid fits).
pub const MAX_WORKER_ID: usize = 128;
/// The longest host name (DNS's limit).
pub const MAX_HOST: usize = 253;

fn invalid(message: String) -> ClusterError {
    ClusterError::InvalidArgument(message)
}

/// Refuses a Join whose fields could not be shown or used safely, naming the field.
pub fn check(request: &JoinRequest) -> Result<(), ClusterError> {
    worker_id(&request.worker_id)?;
    if request.host.len() > MAX_HOST || !request.host.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(format!(
            "host must be at most {MAX_HOST} printable ASCII characters, got {} bytes",
            request.host.len()
        )));
    }
    // "cuda" alone: a GPU whose ordinal the worker picks from its local rank after the join.
    let device_ok = request.device == "cpu"
        || request.device == "cuda"
        || request.device.strip_prefix("cuda:").is_some_and(|n| {
            !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit())
        });
    if !device_ok {
        return Err(invalid(format!(
            "device must be \"cpu\", \"cuda\" or \"cuda:N\", got {:?}",
            shorten(&request.device)
        )));
    }
    reachable("ring_addr", &request.ring_addr)?;
    if !request.metrics_addr.is_empty() {
        reachable("metrics_addr", &request.metrics_addr)?;
    }
    Ok(())
}

/// 1 to [`MAX_WORKER_ID`] characters of `A-Z a-z 0-9 . _ -`.
pub fn worker_id(id: &str) -> Result<(), ClusterError> {
    if id.is_empty() {
        return Err(invalid("worker_id is empty".into()));
    }
    if id.len() > MAX_WORKER_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(format!(
            "worker_id must be at most {MAX_WORKER_ID} characters of A-Z, a-z, 0-9, '.', '_' \
             and '-', got {:?} ({} bytes)",
            shorten(id),
            id.len()
        )));
    }
    Ok(())
}

/// `HOST:PORT` with a numeric host that a peer can dial: not unspecified (0.0.0.0, ::),
/// multicast, broadcast or link-local, and not port 0.
fn reachable(field: &str, addr: &str) -> Result<(), ClusterError> {
    let parsed: SocketAddr = addr.parse().map_err(|_| {
        invalid(format!(
            "{field} {:?} is not HOST:PORT with a numeric host",
            shorten(addr)
        ))
    })?;
    let unusable = match parsed.ip() {
        IpAddr::V4(ip) => {
            ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_link_local()
        }
        IpAddr::V6(ip) => {
            ip.is_unspecified() || ip.is_multicast() || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if unusable || parsed.port() == 0 {
        return Err(invalid(format!(
            "{field} {addr} cannot be dialled by another machine (unspecified, multicast, \
             broadcast or link-local address, or port 0)"
        )));
    }
    Ok(())
}

/// At most 64 characters of `text`, for error messages about oversized input.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> JoinRequest {
        JoinRequest {
            worker_id: "gantry-worker-0-x7k2p".into(),
            host: "node-1.example".into(),
            device: "cuda:0".into(),
            ring_addr: "10.0.0.7:29500".into(),
            metrics_addr: "10.0.0.7:9091".into(),
            ..Default::default()
        }
    }

    #[test]
    fn well_formed_joins_pass() {
        check(&request()).unwrap();
        let mut r = request();
        r.metrics_addr.clear();
        r.device = "cpu".into();
        r.ring_addr = "127.0.0.1:4000".into();
        check(&r).unwrap();
    }

    #[test]
    fn hostile_or_careless_fields_are_refused_by_name() {
        type Spoil = fn(&mut JoinRequest);
        let cases: [(&str, Spoil); 9] = [
            ("worker_id", |r| r.worker_id = "<!--<script>".into()),
            ("worker_id", |r| r.worker_id = "w".repeat(900_000)),
            ("worker_id", |r| r.worker_id.clear()),
            ("host", |r| r.host = "a\nb".into()),
            ("device", |r| r.device = "tpu".into()),
            ("ring_addr", |r| r.ring_addr = "0.0.0.0:29500".into()),
            ("metrics_addr", |r| {
                r.metrics_addr = "169.254.1.1:9091".into()
            }),
            ("metrics_addr", |r| r.metrics_addr = "garbage".into()),
            ("metrics_addr", |r| r.metrics_addr = "[fe80::1]:9091".into()),
        ];
        for (field, spoil) in cases {
            let mut r = request();
            spoil(&mut r);
            let err = check(&r).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            let text = err.to_string();
            assert!(text.contains(field), "{field}: {text}");
            assert!(
                text.len() < 400,
                "the message stays short: {} bytes",
                text.len()
            );
        }
    }
}
