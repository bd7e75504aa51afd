//! A minimal keep-alive HTTP/1.1 client over a tokio `TcpStream`: one request at a time per
//! connection (no pipelining), `Content-Length` or chunked responses.
//!
//! Why not reqwest/hyper: on a 2-core machine the load generator shares the CPU with the ingress,
//! the broker, Postgres and the sequencer, and every microsecond it spends per request is taken
//! from the system under test. This client writes one pre-formatted buffer per request and parses
//! the answer with `httparse`, with no per-request task, pool lookup or header map.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response body we accept (the contract's bodies are a few hundred bytes).
const BODY_BYTES_MAX: usize = 1 << 20;

/// Most bytes buffered for one response: its body, its head and any chunk framing.
const BUFFERED_BYTES_MAX: usize = BODY_BYTES_MAX + (64 << 10);

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A connection idle this long is checked before it is used again: the server may have closed
/// it meanwhile (the ingress closes a keep-alive connection whose next request has not come
/// within HEADER_READ_TIMEOUT_MS). Busier connections skip the check and its system call.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

pub struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    host: String,
    /// When the last response was read (or the connection opened).
    idle_since: Instant,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// The server said `Connection: close`: the connection must not be reused.
    pub closed: bool,
}

/// Parses `http://127.0.0.1:PORT` (any path is ignored). Only loopback targets are accepted: this
/// tool sends bounded but heavy load and must never be pointed at another machine.
pub fn parse_target(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .context("target must be http://HOST:PORT")?;
    let host = rest.split('/').next().unwrap_or(rest);
    let host = if let Some(port) = host.strip_prefix("localhost:") {
        format!("127.0.0.1:{port}")
    } else {
        host.to_owned()
    };
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("{host} is not IP:PORT"))?;
    if !addr.ip().is_loopback() {
        bail!("refusing to load {addr}: only loopback targets (127.0.0.0/8, ::1) are allowed");
    }
    Ok(addr)
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            addr,
            host: addr.to_string(),
            idle_since: Instant::now(),
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(512),
            closed: false,
        })
    }

    /// Whether the server has closed this connection (or sent bytes nobody asked for) while it
    /// sat idle between two requests.
    fn closed_while_idle(&self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Sends one request and reads its whole response. A connection that has been idle for a
    /// while and was closed by the server meanwhile is opened again first, as any pooling client
    /// does; sending on it would fail the request with "connection closed by the server".
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        extra_headers: &str,
        body: &[u8],
    ) -> anyhow::Result<Response> {
        use std::io::Write;
        self.out.clear();
        write!(
            self.out,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{extra_headers}",
            self.host
        )?;
        if !body.is_empty() || method != "GET" {
            write!(
                self.out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )?;
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
        if self.idle_since.elapsed() >= IDLE_CHECK_AFTER && self.closed_while_idle() {
            // A whole new connection (its `closed` flag clear), keeping the request written.
            let fresh = Conn::connect(self.addr).await?;
            *self = Conn {
                out: std::mem::take(&mut self.out),
                ..fresh
            };
        }
        self.stream.write_all(&self.out).await?;
        let response = self.read_response().await;
        self.idle_since = Instant::now();
        response
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.buf.len() > BUFFERED_BYTES_MAX {
            bail!("response larger than {BUFFERED_BYTES_MAX} bytes");
        }
        self.buf.reserve(4096);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            self.closed = true;
            bail!("connection closed by the server");
        }
        Ok(())
    }

    async fn read_response(&mut self) -> anyhow::Result<Response> {
        loop {
            let Some(parsed) = parse(&self.buf)? else {
                self.fill().await?;
                continue;
            };
            self.closed |= parsed.close;
            self.buf.drain(..parsed.used);
            // An interim `100 Continue`: the answer follows.
            if parsed.response.status != 100 {
                return Ok(parsed.response);
            }
        }
    }
}

/// A whole response at the start of a buffer.
#[derive(Debug)]
struct Parsed {
    response: Response,
    /// Its length in the buffer: head, body and framing.
    used: usize,
    /// It said `Connection: close`.
    close: bool,
}

/// Parses the response at the start of `buf`: `None` while more bytes are needed, an error when
/// they can never make a response this client accepts (malformed, or a body over
/// `BODY_BYTES_MAX`, refused as soon as its declared size is read).
fn parse(buf: &[u8]) -> anyhow::Result<Option<Parsed>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let header_len = match parsed.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = parsed.code.context("no status code")?;
    let mut content_length = None;
    let mut chunked = false;
    let mut close = false;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = Some(std::str::from_utf8(h.value)?.trim().parse::<usize>()?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection")
            && h.value.eq_ignore_ascii_case(b"close")
        {
            close = true;
        }
    }
    let body = if status == 100 {
        Some((Vec::new(), header_len))
    } else if chunked {
        parse_chunked(buf, header_len)?
    } else {
        let len = content_length.unwrap_or(0);
        if len > BODY_BYTES_MAX {
            bail!("response body of {len} bytes, over the {BODY_BYTES_MAX} accepted");
        }
        buf.get(header_len..header_len + len)
            .map(|b| (b.to_vec(), header_len + len))
    };
    Ok(body.map(|(body, used)| Parsed {
        response: Response { status, body },
        used,
        close,
    }))
}

/// Parses a chunked body that starts at `pos`: the body and where it ends (after the trailer
/// section), `None` while more bytes are needed.
fn parse_chunked(buf: &[u8], mut pos: usize) -> anyhow::Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find_crlf(&buf[pos..]).map(|i| pos + i) else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&buf[pos..line_end])?;
        // Chunk extensions (`;name=value`) are ignored.
        let digits = size_text.split(';').next().unwrap_or("").trim();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("bad chunk size line {size_text:?}");
        }
        let size = usize::from_str_radix(digits, 16)
            .ok()
            .filter(|&n| n <= BODY_BYTES_MAX - body.len())
            .with_context(|| {
                format!("chunk of 0x{digits} bytes: body over the {BODY_BYTES_MAX} accepted")
            })?;
        pos = line_end + 2;
        if size == 0 {
            // The trailer section: header lines up to an empty line, ignored.
            loop {
                let Some(i) = find_crlf(&buf[pos..]) else {
                    return Ok(None);
                };
                pos += i + 2;
                if i == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        let Some(data) = buf.get(pos..pos + size + 2) else {
            return Ok(None);
        };
        if !data.ends_with(b"\r\n") {
            bail!("chunk data not followed by CRLF");
        }
        body.extend_from_slice(&data[..size]);
        pos += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// One request on a fresh connection, with a timeout: for setup, status polls and checks.
pub async fn once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &[u8],
    timeout: Duration,
) -> anyhow::Result<Response> {
    tokio::time::timeout(timeout, async {
        let mut c = Conn::connect(addr).await?;
        c.request(method, path, extra_headers, body).await
    })
    .await
    .with_context(|| format!("{method} {path} timed out after {timeout:?}"))?
}

/// The `error` code of a JSON error body, if any.
pub fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("error")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const SIMPLE: &[u8] = b"HTTP/1.1 201 Created\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        4;name=value\r\nWiki\r\n5 ; a=\"b\"\r\npedia\r\n0\r\nX-Trailer: yes\r\nX-Other: 2\r\n\r\n";

    fn whole(buf: &[u8]) -> Parsed {
        parse(buf).expect("a response").expect("a whole response")
    }

    /// Every strict prefix of `response` asks for more bytes; all of it is one response.
    fn parses_only_whole(response: &[u8]) -> Parsed {
        for end in 0..response.len() {
            assert!(
                parse(&response[..end]).expect("no error").is_none(),
                "a response from the first {end} bytes"
            );
        }
        let p = whole(response);
        assert_eq!(p.used, response.len());
        p
    }

    fn error_of(buf: &[u8]) -> String {
        format!("{:#}", parse(buf).expect_err("an error"))
    }

    #[test]
    fn content_length_body_needs_all_its_bytes() {
        let p = parses_only_whole(SIMPLE);
        assert_eq!(p.response.status, 201);
        assert_eq!(p.response.body, b"{\"ok\":true}");
        assert!(!p.close);
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let p = parses_only_whole(CHUNKED);
        assert_eq!(p.response.status, 200);
        assert_eq!(p.response.body, b"Wikipedia");
    }

    #[test]
    fn the_next_response_is_left_in_the_buffer() {
        for first in [SIMPLE, CHUNKED] {
            let mut buf = first.to_vec();
            buf.extend_from_slice(SIMPLE);
            let p = whole(&buf);
            assert_eq!(p.used, first.len());
            assert_eq!(whole(&buf[p.used..]).response.body, b"{\"ok\":true}");
        }
    }

    #[test]
    fn no_length_means_no_body_and_close_is_seen() {
        let p = parses_only_whole(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        assert_eq!(p.response.status, 204);
        assert!(p.response.body.is_empty());
        assert!(p.close);
    }

    #[test]
    fn a_body_over_the_cap_is_refused_from_its_head() {
        for len in [
            "1048577",
            "18446744073709551615",
            "99999999999999999999999",
            "-1",
        ] {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
            parse(head.as_bytes()).expect_err(len);
        }
        // At the cap: waits for the body.
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY_BYTES_MAX}\r\n\r\n");
        assert!(parse(head.as_bytes()).expect("no error").is_none());
    }

    #[test]
    fn a_chunked_body_over_the_cap_is_refused() {
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        for size in ["ffffffffffffffff", "10000000000000000000", "100001"] {
            let e = error_of(format!("{head}{size}\r\n").as_bytes());
            assert!(e.contains("over the"), "{size}: {e}");
        }
        // Two chunks that each fit but not together.
        let mut buf = format!("{head}80000\r\n").into_bytes();
        buf.extend(std::iter::repeat_n(b'a', 0x80000));
        buf.extend_from_slice(b"\r\n80001\r\n");
        assert!(error_of(&buf).contains("over the"));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        for bad in [
            "zz\r\n",
            "\r\n",
            ";x\r\n",
            "+4\r\nWiki\r\n0\r\n\r\n",
            "4\r\nWikiXX0\r\n\r\n",
        ] {
            parse(format!("{head}{bad}").as_bytes()).expect_err(bad);
        }
        error_of(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n");
        error_of(b"HTTP/1.1 2000 OK\r\n\r\n");
    }

    /// A server on loopback that reads one request head per `responses` entry and writes the
    /// answer in pieces of `piece` bytes, each flushed on its own.
    async fn server(responses: Vec<Vec<u8>>, piece: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            for response in responses {
                while find_crlf_crlf(&request).is_none() {
                    let mut b = [0u8; 1024];
                    let n = s.read(&mut b).await.expect("read");
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&b[..n]);
                }
                let end = find_crlf_crlf(&request).expect("a head") + 4;
                request.drain(..end);
                for chunk in response.chunks(piece) {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                    let _ = s.flush().await;
                    tokio::task::yield_now().await;
                }
            }
        });
        addr
    }

    /// One GET on a fresh connection to a [`server`] answering `response`.
    async fn get_once(response: Vec<u8>, piece: usize) -> (Conn, anyhow::Result<Response>) {
        let addr = server(vec![response], piece).await;
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = c.request("GET", "/", "", b"").await;
        (c, r)
    }

    fn find_crlf_crlf(b: &[u8]) -> Option<usize> {
        b.windows(4).position(|w| w == b"\r\n\r\n")
    }

    #[tokio::test]
    async fn keep_alive_responses_split_into_small_reads() {
        let continue_then_simple = [b"HTTP/1.1 100 Continue\r\n\r\n".as_slice(), SIMPLE].concat();
        let addr = server(
            vec![CHUNKED.to_vec(), continue_then_simple, SIMPLE.to_vec()],
            3,
        )
        .await;
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = c.request("GET", "/a", "", b"").await.expect("first");
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, b"Wikipedia".as_slice())
        );
        let r = c.request("POST", "/b", "", b"{}").await.expect("second");
        assert_eq!(r.status, 201);
        let r = c.request("GET", "/c", "", b"").await.expect("third");
        assert_eq!(r.body, b"{\"ok\":true}");
        assert!(!c.closed);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_opened_again() {
        // Each connection gets one answer and is closed, like an idle keep-alive timeout.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut request = Vec::new();
                while find_crlf_crlf(&request).is_none() {
                    let mut b = [0u8; 1024];
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(SIMPLE).await;
            }
        });
        let mut c = Conn::connect(addr).await.expect("connect");
        let r = c.request("GET", "/a", "", b"").await.expect("first");
        assert_eq!(r.status, 201);
        assert!(!c.closed, "the answer did not say Connection: close");
        tokio::time::sleep(IDLE_CHECK_AFTER + Duration::from_millis(100)).await;
        let r = c
            .request("GET", "/b", "", b"")
            .await
            .expect("second, on a new connection");
        assert_eq!(r.body, b"{\"ok\":true}");
    }

    #[tokio::test]
    async fn a_huge_declared_body_is_an_error_before_it_is_read() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 9000000000\r\n\r\n".to_vec();
        let e = get_once(head, 1 << 10).await.1.expect_err("refused");
        assert!(format!("{e:#}").contains("over the"), "{e:#}");
    }

    #[tokio::test]
    async fn an_endless_response_stops_at_the_buffer_cap() {
        // A chunk size line that never ends.
        let mut endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        endless.resize(BUFFERED_BYTES_MAX + (256 << 10), b'0');
        let e = get_once(endless, 64 << 10).await.1.expect_err("refused");
        assert!(format!("{e:#}").contains("larger than"), "{e:#}");
    }

    #[tokio::test]
    async fn a_close_before_the_whole_body_is_an_error() {
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec();
        let (c, r) = get_once(cut, 4).await;
        r.expect_err("closed");
        assert!(c.closed);
    }
}
