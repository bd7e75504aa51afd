//! The HTTP server loop with the limits `axum::serve` does not offer: a bound on open
//! connections, and a deadline for a request's header (the body's deadline is in
//! [`crate::http`], where bodies are read).
//!
//! - CONNECTIONS_MAX: an accepted connection over the bound gets a short 503 and is closed at
//!   once, so slow or idle clients cannot exhaust file descriptors and memory.
//! - HEADER_READ_TIMEOUT_MS: a connection whose request header is not complete within this long
//!   is closed (hyper's HTTP/1 `header_read_timeout`; it also bounds how long an idle keep-alive
//!   connection is kept waiting for its next request).
//! - WRITE_TIMEOUT_MS: a connection whose answer cannot be written for this long (the client
//!   reads nothing: a stalled live-stream subscriber, say) is closed ([`WriteDeadline`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;

#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub connections_max: usize,
    /// Longest one write to a client may stay blocked before the connection is closed.
    pub write_timeout: Duration,
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
            .serve_connection_with_upgrades(
                TokioIo::new(WriteDeadline::new(stream, limits.write_timeout)),
                service.clone(),
            )
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

/// A stream whose write (or flush) fails with `TimedOut` once it has been blocked for `timeout`:
/// a client that stops reading cannot hold a connection, its buffers and (for a live stream)
/// its subscriber slot for ever. Reads are untouched (the header and body deadlines bound
/// them).
pub struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    blocked: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        WriteDeadline {
            inner,
            timeout,
            blocked: None,
        }
    }

    /// `poll` is a write or flush of the inner stream: ready resets the clock; pending starts
    /// it (or checks it).
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>>
    where
        S: Unpin,
    {
        match poll(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                self.blocked = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let blocked = self
                    .blocked
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match blocked.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client read nothing for WRITE_TIMEOUT_MS",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().deadline(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .deadline(cx, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().deadline(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::WriteDeadline;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_never_reads_fails_after_the_timeout() {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut conn = WriteDeadline::new(ours, Duration::from_secs(30));
        // Room for 64 bytes: the rest of this write blocks, as on a full socket buffer.
        let started = tokio::time::Instant::now();
        let err = conn.write_all(&[7u8; 1_000]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        drop(theirs); // kept open until here: a closed peer fails a write at once instead
                      // A client that reads keeps the connection: each write that progresses resets the clock.
        let (ours, mut theirs2) = tokio::io::duplex(64);
        let mut conn = WriteDeadline::new(ours, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < 1_000 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let n = theirs2.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        conn.write_all(&[7u8; 1_000]).await.unwrap();
        conn.flush().await.unwrap();
        assert_eq!(reader.await.unwrap().len(), 1_000);
    }

    #[test]
    fn the_refusal_is_a_well_formed_response() {
        let text = std::str::from_utf8(super::REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "overloaded");
    }
}
