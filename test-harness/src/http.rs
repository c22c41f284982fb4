//! Plain HTTP/1.1 over loopback, enough for tests and the demo to read the
//! aggregator's and the agent's pages.
use std::io::{Read, Write};
use std::time::Duration;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// GET `path` on 127.0.0.1:`port`; (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, "")
}

/// POST `body` (JSON) to `path` on 127.0.0.1:`port`; (status, body).
pub fn http_post(port: u16, path: &str, body: &str) -> Option<(u16, String)> {
    http_request(port, "POST", path, body)
}

/// `method` `path` with `body` on 127.0.0.1:`port`; (status, body).
pub fn http_request(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    // Chunked bodies (axum streams JSON chunked when large): join the chunks.
    if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body.as_str();
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                break;
            }
            out.push_str(after.get(..n)?);
            rest = after.get(n + 2..)?;
        }
        return Some((status, out));
    }
    Some((status, body))
}
