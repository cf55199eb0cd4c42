//! The HTTP side of a Gantry process, for orchestrators and operators.
//!
//! Today it answers the probes Kubernetes uses: `GET /healthz` (the process is alive and
//! serving) and `GET /readyz` (it is ready for its role: a coordinator that is running a job,
//! a worker that has joined its group). Prometheus exposition will be served from the same
//! listener. The server speaks just enough HTTP/1.1 for probes and `curl`, with bounded
//! request sizes and timeouts, so a misbehaving client cannot hold it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Errors of the HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the HTTP address {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Readiness, flipped by the process as its role allows.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Binds `addr` (port 0 allowed) and serves the probes on the current tokio runtime.
/// Returns the bound address.
pub async fn serve(addr: &str, ready: Readiness) -> Result<SocketAddr, MetricsError> {
    let bind_error = |source| MetricsError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let ready = ready.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &ready)).await;
            });
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, ready: &Readiness) -> std::io::Result<()> {
    // Probes send a few hundred bytes; anything beyond 8 KiB of headers is not a probe.
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => ("200 OK", "ok\n"),
        ("GET" | "HEAD", "/readyz") if ready.get() => ("200 OK", "ready\n"),
        ("GET" | "HEAD", "/readyz") => ("503 Service Unavailable", "not ready\n"),
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n"),
        _ => ("405 Method Not Allowed", "method not allowed\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        body.len(),
        if method == "HEAD" { "" } else { body }
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn probes_follow_readiness() {
        let ready = Readiness::default();
        let addr = serve("127.0.0.1:0", ready.clone()).await.unwrap();
        let health = get(addr, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let not_ready = get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        ready.set(true);
        let now_ready = get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(
            now_ready.starts_with("HTTP/1.1 200") && now_ready.ends_with("ready\n"),
            "{now_ready}"
        );
        assert!(
            get(addr, "GET /nope HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(
            get(addr, "POST /healthz HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405")
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let first = serve("127.0.0.1:0", Readiness::default()).await.unwrap();
        let err = serve(&first.to_string(), Readiness::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&first.to_string()), "{err}");
    }
}
