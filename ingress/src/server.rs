//! The HTTP server loop with the limits `axum::serve` does not offer: a bound on open
//! connections, and a deadline for a request's header (the body's deadline is in
//! [`crate::http`], where bodies are read).
//!
//! - CONNECTIONS_MAX: an accepted connection over the bound gets a short 503 and is closed at
//!   once, so slow or idle clients cannot exhaust file descriptors and memory.
//! - HEADER_READ_TIMEOUT_MS: a connection whose request header is not complete within this long
//!   is closed (hyper's HTTP/1 `header_read_timeout`; it also bounds how long an idle keep-alive
//!   connection is kept waiting for its next request).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub connections_max: usize,
    /// Longest a graceful shutdown waits for open requests before the process exits anyway.
    pub drain_timeout: Duration,
}

/// The answer to a connection over CONNECTIONS_MAX: written without reading the request.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 75\r\n\r\n\
{\"error\":\"overloaded\",\"detail\":\"too many open connections on this ingress\"}";

/// Serves `router` on `listener` until `shutdown` completes, then drains open connections for at
/// most `limits.drain_timeout`. `on_refused` is called for every connection refused over the
/// bound; `connections` follows the number of open connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
    on_refused: impl Fn() + Send + Sync + 'static,
    connections: impl Fn(usize) + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let connections = Arc::new(connections);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let service = TowerToHyperService::new(router);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            on_refused();
            // Best effort, never waiting: a full socket buffer just gets the close.
            let _ = stream.try_write(REFUSED);
            drop(stream);
            continue;
        };
        connections(limits.connections_max - slots.available_permits());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service.clone())
            .into_owned();
        let conn = graceful.watch(conn);
        let (slots, connections, max) =
            (slots.clone(), connections.clone(), limits.connections_max);
        tokio::spawn(async move {
            // Errors here are clients going away or timing out: nothing to report.
            let _ = conn.await;
            drop(permit);
            connections(max - slots.available_permits());
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!("open connections did not finish in time; exiting anyway");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_refusal_is_a_well_formed_response() {
        let text = std::str::from_utf8(super::REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "overloaded");
    }
}
