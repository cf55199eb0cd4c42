//! A small HTTP/1.1 server for probes, `/metrics` and the coordinator's status page.
//!
//! It speaks just enough HTTP for Prometheus, Kubernetes probes, browsers and `curl`: one
//! GET (or HEAD) per connection, bounded request size and time, so a misbehaving client
//! cannot hold it. Routes other than the probes come from a [`Routes`] implementation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::MetricsError;

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

/// One HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// The Prometheus text exposition format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Response {
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            content_type,
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            404 => "Not Found",
            405 => "Method Not Allowed",
            503 => "Service Unavailable",
            _ => "",
        }
    }
}

/// The routes a process adds to the probes. `path` has no query string.
pub trait Routes: Send + Sync + 'static {
    fn get(&self, path: &str) -> Option<Response>;
}

/// Only the probes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRoutes;

impl Routes for NoRoutes {
    fn get(&self, _path: &str) -> Option<Response> {
        None
    }
}

/// Binds `addr` (port 0 allowed) and serves `/healthz`, `/readyz` and `routes` on the current
/// tokio runtime. Returns the bound address.
pub async fn serve(
    addr: &str,
    ready: Readiness,
    routes: Arc<dyn Routes>,
) -> Result<SocketAddr, MetricsError> {
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
            let routes = routes.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), answer(stream, &ready, routes))
                        .await;
            });
        }
    });
    Ok(bound)
}

async fn answer(
    mut stream: TcpStream,
    ready: &Readiness,
    routes: Arc<dyn Routes>,
) -> std::io::Result<()> {
    // Clients send a few hundred bytes; anything beyond 8 KiB of headers is not one of ours.
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
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let response = match (method, path) {
        ("GET" | "HEAD", "/healthz") => Response::text(200, "ok\n"),
        ("GET" | "HEAD", "/readyz") if ready.get() => Response::text(200, "ready\n"),
        ("GET" | "HEAD", "/readyz") => Response::text(503, "not ready\n"),
        // Rendering may read files or take locks: keep it off the async workers.
        ("GET" | "HEAD", _) => {
            let path = path.to_owned();
            tokio::task::spawn_blocking(move || routes.get(&path))
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| Response::text(404, "not found\n"))
        }
        _ => Response::text(405, "method not allowed\n"),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        response.status,
        response.reason(),
        response.content_type,
        response.body.len(),
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(&response.body).await?;
    }
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

    struct Hello;
    impl Routes for Hello {
        fn get(&self, path: &str) -> Option<Response> {
            (path == "/hello").then(|| Response::ok("text/plain", "hi"))
        }
    }

    #[tokio::test]
    async fn probes_follow_readiness() {
        let ready = Readiness::default();
        let addr = serve("127.0.0.1:0", ready.clone(), Arc::new(NoRoutes))
            .await
            .unwrap();
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
    async fn routes_answer_with_query_strings_and_head() {
        let addr = serve("127.0.0.1:0", Readiness::default(), Arc::new(Hello))
            .await
            .unwrap();
        let hello = get(addr, "GET /hello?t=123 HTTP/1.1\r\n\r\n").await;
        assert!(
            hello.starts_with("HTTP/1.1 200") && hello.ends_with("\r\n\r\nhi"),
            "{hello}"
        );
        assert!(hello.contains("content-length: 2\r\n"), "{hello}");
        let head = get(addr, "HEAD /hello HTTP/1.1\r\n\r\n").await;
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let first = serve("127.0.0.1:0", Readiness::default(), Arc::new(NoRoutes))
            .await
            .unwrap();
        let err = serve(&first.to_string(), Readiness::default(), Arc::new(NoRoutes))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&first.to_string()), "{err}");
    }
}
