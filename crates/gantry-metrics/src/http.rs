//! The HTTP endpoint of a Gantry process: probes, `/metrics` and the coordinator's status page.
//!
//! [`serve`] answers the probes Kubernetes uses (`/healthz`; `/readyz` following a
//! [`Readiness`]) and every path a [`Routes`] implementation knows, routed by axum over
//! hyper's HTTP/1.1 connections: keep-alive (Prometheus reuses its connection between
//! scrapes), HEAD for every GET, 404 for unknown paths, 405 for other methods, and
//! `cache-control: no-store` everywhere, since every answer is the state of the moment.
//!
//! Limits keep a misbehaving client from holding the endpoint: a request head (request line
//! and headers) of at most 8 KiB (431 beyond), which must arrive within 10 s of the connection
//! opening or of the previous response, so a client that connects and sends nothing, or
//! leaves a kept-alive connection idle, is disconnected; a route's response within 10 s (503
//! otherwise). Request bodies are never read, as every route is a GET. Each connection is
//! served on its own task, so one slow client never delays another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

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

const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

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
            content_type: PLAIN_TEXT,
            body: body.as_bytes().to_vec(),
        }
    }
}

impl IntoResponse for Response {
    fn into_response(self) -> axum::response::Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let content_type = HeaderValue::from_str(self.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        let mut response = (status, Body::from(self.body)).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, content_type);
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The routes a process adds to the probes. `path` has no query string.
///
/// `get` runs on a blocking thread: it may read files or take locks.
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

/// How long and how large a request may be.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// A request head must arrive within this of the connection opening or the last response.
    head_timeout: Duration,
    /// The most bytes of request line and headers; clients send a few hundred.
    head_bytes: usize,
    /// A route's answer must be ready within this.
    render_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            head_timeout: Duration::from_secs(10),
            head_bytes: 8 * 1024,
            render_timeout: Duration::from_secs(10),
        }
    }
}

/// Binds `addr` (port 0 allowed) and serves `/healthz`, `/readyz` and `routes` on the current
/// tokio runtime until the runtime stops. Returns the bound address.
pub async fn serve(
    addr: &str,
    ready: Readiness,
    routes: Arc<dyn Routes>,
) -> Result<SocketAddr, MetricsError> {
    serve_with(addr, ready, routes, Limits::default()).await
}

async fn serve_with(
    addr: &str,
    ready: Readiness,
    routes: Arc<dyn Routes>,
    limits: Limits,
) -> Result<SocketAddr, MetricsError> {
    let bind_error = |source| MetricsError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let app = router(Shared {
        ready,
        routes,
        render_timeout: limits.render_timeout,
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_header_size(limits.head_bytes)
        // The read buffer caps a head that never ends (the size above is checked once a head
        // is complete); hyper's minimum is 8 KiB.
        .max_buf_size((limits.head_bytes * 2).max(8192));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: give connections time to close
                    // rather than spin on the error.
                    tracing::warn!("HTTP endpoint {bound}: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let connection =
                http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
            tokio::spawn(async move {
                // Timeouts and clients that hang up are the client's business, not an error
                // of this process.
                if let Err(e) = connection.await {
                    tracing::debug!("HTTP endpoint {bound}: connection ended: {e}");
                }
            });
        }
    });
    Ok(bound)
}

/// What every handler needs.
#[derive(Clone)]
struct Shared {
    ready: Readiness,
    routes: Arc<dyn Routes>,
    render_timeout: Duration,
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Response::text(200, "ok\n") }))
        .route("/readyz", get(readyz))
        .fallback(routed)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

async fn readyz(State(shared): State<Shared>) -> Response {
    if shared.ready.get() {
        Response::text(200, "ready\n")
    } else {
        Response::text(503, "not ready\n")
    }
}

/// Any path but the probes: the process's [`Routes`].
async fn routed(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
) -> axum::response::Response {
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed().await;
    }
    let path = uri.path().to_owned();
    let routes = shared.routes.clone();
    let answer = tokio::task::spawn_blocking(move || routes.get(&path));
    match tokio::time::timeout(shared.render_timeout, answer).await {
        Ok(Ok(Some(response))) => response,
        Ok(Ok(None)) => Response::text(404, "not found\n"),
        // The route panicked; the panic message is on stderr already.
        Ok(Err(_)) => Response::text(500, "internal error\n"),
        Err(_) => Response::text(503, "timed out preparing the response\n"),
    }
    .into_response()
}

async fn method_not_allowed() -> axum::response::Response {
    let mut response = Response::text(405, "method not allowed\n").into_response();
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    use super::*;

    /// A bound on "did not hang", far above any normal answer.
    const PATIENCE: Duration = Duration::from_secs(30);

    /// One parsed response.
    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    /// One connection, read response by response (so keep-alive can be observed).
    struct Client(BufReader<TcpStream>);

    impl Client {
        async fn connect(addr: SocketAddr) -> Self {
            Self(BufReader::new(TcpStream::connect(addr).await.unwrap()))
        }

        async fn send(&mut self, request: &str) {
            self.0
                .get_mut()
                .write_all(request.as_bytes())
                .await
                .unwrap();
        }

        /// The next response; `head_only` for the answer to a HEAD (no body follows).
        async fn response(&mut self, head_only: bool) -> Reply {
            tokio::time::timeout(PATIENCE, self.read_response(head_only))
                .await
                .expect("the server answered")
        }

        async fn read_response(&mut self, head_only: bool) -> Reply {
            let mut line = String::new();
            self.0.read_line(&mut line).await.unwrap();
            let status = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("status line {line:?}"));
            let mut headers = Vec::new();
            loop {
                line.clear();
                self.0.read_line(&mut line).await.unwrap();
                let header = line.trim_end();
                if header.is_empty() {
                    break;
                }
                let (name, value) = header.split_once(':').unwrap();
                headers.push((name.to_owned(), value.trim().to_owned()));
            }
            let mut reply = Reply {
                status,
                headers,
                body: Vec::new(),
            };
            if !head_only {
                let length: usize = reply.header("content-length").unwrap().parse().unwrap();
                reply.body = vec![0; length];
                self.0.read_exact(&mut reply.body).await.unwrap();
            }
            reply
        }

        /// Whether the server closed the connection (reading ends without data).
        async fn closed(&mut self) -> bool {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(PATIENCE, self.0.read_to_end(&mut rest)).await;
            matches!(read, Ok(Ok(0)))
        }
    }

    /// One request on a fresh connection.
    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let mut client = Client::connect(addr).await;
        client
            .send(&format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n"))
            .await;
        client.response(false).await
    }

    struct Hello;
    impl Routes for Hello {
        fn get(&self, path: &str) -> Option<Response> {
            (path == "/hello").then(|| Response::ok("text/plain", "hi"))
        }
    }

    async fn hello() -> SocketAddr {
        serve("127.0.0.1:0", Readiness::default(), Arc::new(Hello))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn probes_follow_readiness() {
        let ready = Readiness::default();
        let addr = serve("127.0.0.1:0", ready.clone(), Arc::new(NoRoutes))
            .await
            .unwrap();
        let health = get(addr, "/healthz").await;
        assert_eq!((health.status, health.text().as_str()), (200, "ok\n"));
        assert_eq!(
            health.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(health.header("cache-control"), Some("no-store"));
        assert_eq!(get(addr, "/readyz").await.status, 503);
        ready.set(true);
        let now_ready = get(addr, "/readyz").await;
        assert_eq!(
            (now_ready.status, now_ready.text().as_str()),
            (200, "ready\n")
        );
    }

    #[tokio::test]
    async fn routes_answer_with_their_content_type_whatever_the_query_string() {
        let addr = hello().await;
        let reply = get(addr, "/hello?t=123").await;
        assert_eq!((reply.status, reply.text().as_str()), (200, "hi"));
        assert_eq!(reply.header("content-type"), Some("text/plain"));
        assert_eq!(reply.header("cache-control"), Some("no-store"));
    }

    #[tokio::test]
    async fn unknown_paths_are_not_found() {
        let addr = hello().await;
        let reply = get(addr, "/nope").await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.text(), "not found\n");
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
    }

    #[tokio::test]
    async fn methods_other_than_get_and_head_are_not_allowed() {
        let addr = hello().await;
        for path in ["/healthz", "/hello", "/nope"] {
            for method in ["POST", "PUT", "DELETE"] {
                let mut client = Client::connect(addr).await;
                client
                    .send(&format!(
                        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
                    ))
                    .await;
                let reply = client.response(false).await;
                assert_eq!(reply.status, 405, "{method} {path}");
                assert_eq!(reply.header("allow"), Some("GET, HEAD"), "{method} {path}");
            }
        }
    }

    #[tokio::test]
    async fn one_connection_carries_several_requests() {
        let addr = hello().await;
        let mut client = Client::connect(addr).await;
        client
            .send("GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        assert_eq!(client.response(false).await.text(), "ok\n");
        client.send("GET /hello HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(client.response(false).await.text(), "hi");
        client.send("GET /nope HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(client.response(false).await.status, 404);
    }

    #[tokio::test]
    async fn head_answers_without_a_body() {
        let addr = hello().await;
        let mut client = Client::connect(addr).await;
        for path in ["/hello", "/healthz"] {
            client
                .send(&format!("HEAD {path} HTTP/1.1\r\nhost: x\r\n\r\n"))
                .await;
            let head = client.response(true).await;
            assert_eq!(head.status, 200, "HEAD {path}");
        }
        // Had either HEAD carried a body, this would read it instead of the next response.
        client.send("GET /hello HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let next = client.response(false).await;
        assert_eq!((next.status, next.text().as_str()), (200, "hi"));
    }

    #[tokio::test]
    async fn an_http_1_0_request_gets_its_answer_and_the_connection_closes() {
        let addr = hello().await;
        let mut client = Client::connect(addr).await;
        client.send("GET /hello HTTP/1.0\r\n\r\n").await;
        assert_eq!(client.response(false).await.text(), "hi");
        assert!(client.closed().await, "HTTP/1.0 without keep-alive closes");
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() {
        let addr = hello().await;
        let mut client = Client::connect(addr).await;
        // Over the 8 KiB limit, yet within the read buffer, so the server reads all of it
        // before answering (closing on unread bytes would reset the connection instead).
        let padding = "a".repeat(12 * 1024);
        client
            .send(&format!(
                "GET /hello HTTP/1.1\r\nhost: x\r\nx-padding: {padding}\r\n\r\n"
            ))
            .await;
        let reply = client.response(true).await;
        assert_eq!(reply.status, 431);
        assert!(
            client.closed().await,
            "the connection is closed after a 431"
        );
    }

    #[tokio::test]
    async fn a_head_that_never_ends_is_cut_off() {
        // Far beyond the test's patience: only the size limit can end this connection.
        let limits = Limits {
            head_timeout: PATIENCE * 10,
            ..Limits::default()
        };
        let addr = serve_with("127.0.0.1:0", Readiness::default(), Arc::new(Hello), limits)
            .await
            .unwrap();
        let mut client = Client::connect(addr).await;
        client.send("GET /hello HTTP/1.1\r\nhost: x\r\n").await;
        let header = format!("x-padding: {}\r\n", "a".repeat(1000));
        // Writing fails once the server has given up and closed: that is the point.
        for _ in 0..64 {
            if client
                .0
                .get_mut()
                .write_all(header.as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(PATIENCE, client.0.read_to_end(&mut rest)).await;
        // A 431 then a close, or a reset when the close found unread bytes: either way the
        // server stopped reading.
        assert!(ended.is_ok(), "the server kept reading an endless head");
        if !rest.is_empty() {
            assert!(
                String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 431"),
                "{}",
                String::from_utf8_lossy(&rest)
            );
        }
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_others_and_is_dropped() {
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let addr = serve_with("127.0.0.1:0", Readiness::default(), Arc::new(Hello), limits)
            .await
            .unwrap();
        let mut silent = Client::connect(addr).await;
        let mut idle = Client::connect(addr).await;
        idle.send("GET /hello HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(idle.response(false).await.text(), "hi");
        // Others are served while the silent connection is open.
        assert_eq!(get(addr, "/hello").await.text(), "hi");
        assert!(
            silent.closed().await,
            "a connection sending nothing is closed"
        );
        assert!(
            idle.closed().await,
            "an idle kept-alive connection is closed"
        );
    }

    /// Answers `/slow` once the test says so, `/panic` by panicking.
    struct Stubborn(Mutex<mpsc::Receiver<()>>);
    impl Routes for Stubborn {
        fn get(&self, path: &str) -> Option<Response> {
            match path {
                "/slow" => {
                    let _ = self.0.lock().unwrap().recv_timeout(PATIENCE);
                    Some(Response::text(200, "late\n"))
                }
                "/panic" => panic!("a route failed"),
                _ => None,
            }
        }
    }

    async fn stubborn(limits: Limits) -> (SocketAddr, mpsc::Sender<()>) {
        let (release, wait) = mpsc::channel();
        let routes = Arc::new(Stubborn(Mutex::new(wait)));
        let addr = serve_with("127.0.0.1:0", Readiness::default(), routes, limits)
            .await
            .unwrap();
        (addr, release)
    }

    #[tokio::test]
    async fn a_route_that_takes_too_long_is_unavailable() {
        let (addr, release) = stubborn(Limits {
            render_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let slow = get(addr, "/slow").await;
        release.send(()).unwrap();
        assert_eq!(slow.status, 503, "{}", slow.text());
        assert_eq!(get(addr, "/healthz").await.status, 200);
    }

    #[tokio::test]
    async fn a_route_that_panics_is_an_internal_error() {
        let (addr, _release) = stubborn(Limits::default()).await;
        assert_eq!(get(addr, "/panic").await.status, 500);
        assert_eq!(get(addr, "/healthz").await.status, 200);
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
