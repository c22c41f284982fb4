//! One GET over HTTPS (or plain HTTP) with a timeout, on hyper and rustls:
//! the client the Redfish power source and the Kubernetes node labels share.
//! The server is trusted through a CA file or a pinned certificate, never
//! the system roots (BMCs and API servers have their own CAs). A failed
//! request is a [`Failure`] naming its fault (`unreachable`, `tls`,
//! `timeout`, `unauthorized`, `http_status`, `too_large`) for the caller to
//! count.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

/// A failed request, with the fault it counts as.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) fault: &'static str,
    pub(crate) message: String,
}

pub(crate) fn failure(fault: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        fault,
        message: message.into(),
    }
}

/// How the server's certificate is checked.
pub(crate) enum Trust<'a> {
    /// PEM file of the CA(s) that signed it.
    CaFile(&'a Path),
    /// SHA-256 of the certificate (DER): that one is accepted whatever signed it.
    Pinned([u8; 32]),
}

/// A client that cannot be built: the config key (last part) and why.
#[derive(Debug)]
pub(crate) struct SetupError {
    pub(crate) key: &'static str,
    pub(crate) reason: String,
}

fn setup_error(key: &'static str, reason: impl std::fmt::Display) -> SetupError {
    SetupError {
        key,
        reason: reason.to_string(),
    }
}

/// What the messages of a client name: its config section (for the pinned
/// certificate's key) and what to check when the server refuses the
/// credentials.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) section: &'static str,
    pub(crate) credentials: &'static str,
}

/// The HTTP(S) side: one GET, with a timeout and a bound on the answer.
pub(crate) struct HttpsGet {
    uri: hyper::Uri,
    authorization: Option<String>,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    max_body_bytes: usize,
    names: Names,
    runtime: tokio::runtime::Runtime,
}

#[derive(Debug)]
struct PinnedCert {
    sha256: [u8; 32],
    section: &'static str,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.sha256 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate (SHA-256 {}) is not the pinned one ({}.pinned_sha256)",
                hex(digest.as_ref()),
                self.section
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A SHA-256 pin from hex text (`:` allowed between the bytes).
pub(crate) fn parse_pin(pin: &str) -> Option<[u8; 32]> {
    let hex: String = pin.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl HttpsGet {
    /// A client for `uri`; `trust` is required for `https://`.
    pub(crate) fn new(
        uri: hyper::Uri,
        authorization: Option<String>,
        trust: Option<Trust<'_>>,
        timeout: Duration,
        max_body_bytes: usize,
        names: Names,
    ) -> Result<HttpsGet, SetupError> {
        let tls = if uri.scheme_str() == Some("https") {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|e| setup_error("url", e))?;
            let config = match trust {
                Some(Trust::Pinned(sha256)) => builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedCert {
                        sha256,
                        section: names.section,
                        provider,
                    }))
                    .with_no_client_auth(),
                Some(Trust::CaFile(ca)) => {
                    use rustls_pki_types::pem::PemObject;
                    let mut roots = rustls::RootCertStore::empty();
                    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                        .map_err(|e| setup_error("ca_file", format!("{}: {e}", ca.display())))?
                        .collect::<Result<_, _>>()
                        .map_err(|e| setup_error("ca_file", format!("{}: {e}", ca.display())))?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(setup_error(
                            "ca_file",
                            format!("{}: no certificate in it", ca.display()),
                        ));
                    }
                    builder.with_root_certificates(roots).with_no_client_auth()
                }
                None => {
                    return Err(setup_error(
                        "ca_file",
                        "an https:// server needs ca_file or pinned_sha256 (its certificate is rarely signed by a public CA)",
                    ))
                }
            };
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| setup_error("url", format!("tokio runtime for the client: {e}")))?;
        Ok(HttpsGet {
            uri,
            authorization,
            tls,
            timeout,
            max_body_bytes,
            names,
            runtime,
        })
    }

    /// Replaces the `Authorization` header (a token file read again).
    pub(crate) fn set_authorization(&mut self, authorization: Option<String>) {
        self.authorization = authorization;
    }

    pub(crate) fn get(&self) -> Result<Vec<u8>, Failure> {
        let timeout = self.timeout;
        match self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, self.get_async()).await })
        {
            Ok(result) => result,
            Err(_) => Err(failure(
                "timeout",
                format!("no answer within {} ms", timeout.as_millis()),
            )),
        }
    }

    async fn get_async(&self) -> Result<Vec<u8>, Failure> {
        use http_body_util::BodyExt;
        let host = self.uri.host().unwrap_or_default().to_string();
        let https = self.tls.is_some();
        let port = self.uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| failure("unreachable", format!("connect {host}:{port}: {e}")))?;
        // Origin form (`GET /redfish/v1/...`): a server reads the path from the request line.
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let mut request = hyper::Request::get(path)
            .header(hyper::header::HOST, host.as_str())
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(auth) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, auth);
        }
        let request = request
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| failure("garbage", format!("request: {e}")))?;
        let response = match &self.tls {
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| failure("tls", format!("server name {host:?}: {e}")))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| failure("tls", format!("TLS with {host}:{port}: {e}")))?;
                send(
                    hyper_util::rt::TokioIo::new(EofIsEnd { inner: stream }),
                    request,
                )
                .await?
            }
            None => send(hyper_util::rt::TokioIo::new(tcp), request).await?,
        };
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), self.max_body_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    failure(
                        "too_large",
                        format!("the answer is longer than {} bytes", self.max_body_bytes),
                    )
                } else {
                    failure("unreachable", format!("reading the answer: {e}"))
                }
            })?
            .to_bytes();
        match status.as_u16() {
            200 => Ok(body.to_vec()),
            401 | 403 => Err(failure(
                "unauthorized",
                format!(
                    "HTTP {status}: the server refused the credentials ({})",
                    self.names.credentials
                ),
            )),
            _ => Err(failure(
                "http_status",
                format!("HTTP {status} for {}", self.uri.path()),
            )),
        }
    }
}

/// A TLS stream whose peer closing without `close_notify` reads as the end
/// of the stream. BMC web servers (and Python's, under sushy-static) answer
/// HTTP/1.0 without a length and drop the connection after the body; a body
/// truncated that way does not parse as JSON and counts as `garbage`.
struct EofIsEnd<S> {
    inner: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for EofIsEnd<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for EofIsEnd<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn send<T>(
    io: T,
    request: hyper::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, Failure>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| failure("unreachable", format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| failure("unreachable", format!("HTTP request: {e}")))
}
