//! A minimal keep-alive HTTP/1.1 client over a tokio `TcpStream`: one request at a time per
//! connection (no pipelining), `Content-Length` or chunked responses.
//!
//! Why not reqwest/hyper: on a 2-core machine the load generator shares the CPU with the ingress,
//! the broker, Postgres and the sequencer, and every microsecond it spends per request is taken
//! from the system under test. This client writes one pre-formatted buffer per request and parses
//! the answer with `httparse`, with no per-request task, pool lookup or header map.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response we accept (the contract's bodies are a few hundred bytes).
const RESPONSE_BYTES_MAX: usize = 1 << 20;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

pub struct Conn {
    stream: TcpStream,
    host: String,
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
            host: addr.to_string(),
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(512),
            closed: false,
        })
    }

    /// Sends one request and reads its whole response.
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
        self.stream.write_all(&self.out).await?;
        self.read_response().await
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.buf.len() > RESPONSE_BYTES_MAX {
            bail!("response larger than {RESPONSE_BYTES_MAX} bytes");
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
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            let header_len = match parsed.parse(&self.buf)? {
                httparse::Status::Complete(n) => n,
                httparse::Status::Partial => {
                    self.fill().await?;
                    continue;
                }
            };
            let status = parsed.code.context("no status code")?;
            let mut content_length = None;
            let mut chunked = false;
            for h in parsed.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    content_length = Some(std::str::from_utf8(h.value)?.trim().parse::<usize>()?);
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = h.value.eq_ignore_ascii_case(b"chunked");
                } else if h.name.eq_ignore_ascii_case("connection")
                    && h.value.eq_ignore_ascii_case(b"close")
                {
                    self.closed = true;
                }
            }
            if status == 100 {
                self.buf.drain(..header_len);
                continue;
            }
            let body = if chunked {
                self.read_chunked(header_len).await?
            } else {
                let len = content_length.unwrap_or(0);
                while self.buf.len() < header_len + len {
                    self.fill().await?;
                }
                let body = self.buf[header_len..header_len + len].to_vec();
                self.buf.drain(..header_len + len);
                body
            };
            return Ok(Response { status, body });
        }
    }

    async fn read_chunked(&mut self, header_len: usize) -> anyhow::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut pos = header_len;
        loop {
            let line_end = loop {
                if let Some(i) = find_crlf(&self.buf[pos..]) {
                    break pos + i;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buf[pos..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
            pos = line_end + 2;
            while self.buf.len() < pos + size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[pos..pos + size]);
            pos += size + 2;
            if size == 0 {
                self.buf.drain(..pos);
                return Ok(body);
            }
        }
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
