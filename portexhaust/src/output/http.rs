//! The metrics endpoint: hyper's HTTP/1.1 on tokio, `/metrics` (OpenMetrics when the scraper
//! asks for it, as Prometheus does, else the Prometheus 0.0.4 text format) and a small page at
//! `/`.
use std::{
    collections::VecDeque,
    convert::Infallible,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus_client::encoding::prometheus_text;
use tokio::{
    net::TcpListener,
    task::{AbortHandle, JoinHandle},
};

use super::prometheus::Metrics;

/// Parse `--metrics-addr`: `PORT` (loopback), `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT`.
pub fn parse_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    let bad = || {
        format!(
            "invalid metrics address {s:?}: expected PORT (serves on 127.0.0.1), IP:PORT or [IPv6]:PORT, \
             e.g. 9977, 0.0.0.0:9977 or [::1]:9977"
        )
    };
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = s.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(bad())
}

const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const INDEX: &str = "<!doctype html><html><head><title>portexhaust</title></head><body>\
<h1>portexhaust</h1><p>Linux ephemeral-port exhaustion tracer.</p>\
<p><a href=\"/metrics\">/metrics</a></p></body></html>\n";
/// Connections held at once. The next one evicts the oldest, so that a scraper always gets in
/// however many idle or slow connections anyone else opens (each costs at most two buffers of
/// `MAX_BUF`: the cap bounds the server's memory to a few MiB).
pub const MAX_CONNECTIONS: usize = 256;
/// A request's headers must arrive within this (slowloris clients are cut off).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// No connection lives longer, idle keep-alive included (a scraper reconnects).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Read buffer per connection: a request is a few hundred bytes; more is garbage (431/400).
const MAX_BUF: usize = 16 * 1024;

fn respond(
    status: StatusCode,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

/// Route one request. Only GET and HEAD; `/metrics` negotiates its format from `Accept`.
pub fn handle<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let (ctype, body) = if openmetrics {
                (OPENMETRICS_TYPE, metrics.encode(true))
            } else {
                (prometheus_text::CONTENT_TYPE, metrics.encode(false))
            };
            respond(StatusCode::OK, ctype, body)
        }
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics\n",
        ),
    }
}

/// A running metrics server; dropping it stops accepting.
pub struct MetricsServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listeners bound by [`bind_early`], each waiting for the [`serve`] of its address.
static EARLY: Mutex<Vec<(SocketAddr, std::net::TcpListener)>> = Mutex::new(Vec::new());

/// Accept queue of the listener, as tokio's own `bind` makes it.
const BACKLOG: i32 = 1024;

/// Bind `addr` now and keep the socket for the `serve(addr)` that follows: `trace` binds before
/// it loads any program, so that a taken port fails in milliseconds with nothing attached, and
/// nobody can take the port between this check and the server starting. Returns the bound
/// address (the port the kernel chose for port 0).
pub fn bind_early(addr: SocketAddr) -> io::Result<SocketAddr> {
    let l = listener(addr)?;
    let bound = l.local_addr()?;
    EARLY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((addr, l));
    Ok(bound)
}

fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    // A restarted tracer must not wait for its predecessor's TIME_WAIT connections.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn take_early(addr: SocketAddr) -> Option<std::net::TcpListener> {
    let mut early = EARLY.lock().unwrap_or_else(PoisonError::into_inner);
    let i = early.iter().position(|(a, _)| *a == addr)?;
    Some(early.swap_remove(i).1)
}

/// Serve in the background on the current tokio runtime, on the socket [`bind_early`] bound
/// for `addr`, else binding `addr` now (so a taken port is an error before tracing starts).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<MetricsServer> {
    let listener = match take_early(addr) {
        Some(l) => TcpListener::from_std(l)?,
        None => TcpListener::from_std(listener(addr)?)?,
    };
    let addr = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(listener, metrics));
    Ok(MetricsServer { addr, task })
}

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>) {
    // Oldest first. Never waiting for a slot: an accept queue blocked by idle connections is
    // what made scrapes time out.
    let mut live: VecDeque<AbortHandle> = VecDeque::with_capacity(MAX_CONNECTIONS);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("metrics server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        live.retain(|h| !h.is_finished());
        while live.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = live.pop_front() {
                oldest.abort();
            }
        }
        let task = tokio::spawn(serve_connection(stream, metrics.clone()));
        live.push_back(task.abort_handle());
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, m: Arc<Metrics>) {
    let svc = service_fn(move |req: Request<Incoming>| {
        let r = handle(&m, &req);
        async move { Ok::<_, Infallible>(r) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(stream), svc);
    match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        Ok(Err(e)) => debug!("metrics server: connection: {e}"),
        Ok(Ok(())) => {}
        Err(_) => debug!("metrics server: connection closed after {CONNECTION_LIFETIME:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::prometheus::MetricsOptions;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("9977"), Ok("127.0.0.1:9977".parse().expect("a")));
        assert_eq!(
            parse_addr("0.0.0.0:9100"),
            Ok("0.0.0.0:9100".parse().expect("a"))
        );
        assert_eq!(
            parse_addr("[::1]:9100"),
            Ok("[::1]:9100".parse().expect("a"))
        );
        assert_eq!(
            parse_addr("localhost:80"),
            Ok("127.0.0.1:80".parse().expect("a"))
        );
        for bad in [
            "", "70000", "host:1", "::1:9100", ":9100", "1.2.3.4", "[::1]", "x",
        ] {
            let e = parse_addr(bad).expect_err(bad);
            assert!(e.contains("invalid metrics address"), "{e}");
        }
    }

    #[test]
    fn an_early_bind_holds_the_port_for_its_server() {
        let bound = bind_early("127.0.0.1:0".parse().expect("a")).expect("bind");
        // Taken from now on: a second bind fails before any server runs.
        assert!(std::net::TcpListener::bind(bound).is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let m = Arc::new(Metrics::new(MetricsOptions::default()));
            let server = serve("127.0.0.1:0".parse().expect("a"), m)
                .await
                .expect("serve");
            assert_eq!(server.addr, bound, "the early socket is the one served");
        });
    }

    #[test]
    fn http_routes() {
        let m = Metrics::new(MetricsOptions::default());
        let get = |path: &str, accept: Option<&str>| {
            let mut b = Request::builder().uri(path);
            if let Some(a) = accept {
                b = b.header(header::ACCEPT, a);
            }
            handle(&m, &b.body(()).expect("request"))
        };
        let r = get("/metrics", None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            prometheus_text::CONTENT_TYPE
        );
        let r = get(
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        );
        assert_eq!(r.headers()[header::CONTENT_TYPE], OPENMETRICS_TYPE);
        assert_eq!(get("/", None).status(), StatusCode::OK);
        assert_eq!(get("/nope", None).status(), StatusCode::NOT_FOUND);
        let post = Request::builder()
            .method(Method::POST)
            .uri("/metrics")
            .body(())
            .expect("request");
        assert_eq!(handle(&m, &post).status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
