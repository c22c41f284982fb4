//! Who a gRPC request comes from, for every service on the aggregator's
//! gRPC port (the ingest and KEDA's external scaler): the client
//! certificate's common name with mutual TLS (a revoked name is refused),
//! the host of a `[[agents]]` bearer token, both (they must agree). With
//! tokens or a client CA configured, a request with neither is refused;
//! with neither configured (`--insecure`) nobody is identified.
use std::collections::HashMap;

use tonic::{Request, Status};

use crate::config::AggregatorConfig;

/// A refused request: the kind (a metric label) and the gRPC status.
#[derive(Debug)]
pub struct Refusal {
    pub kind: &'static str,
    pub status: Status,
}

impl Refusal {
    fn new(kind: &'static str, status: Status) -> Self {
        Refusal { kind, status }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcAuth {
    /// token -> host
    tokens: HashMap<String, String>,
    revoked: Vec<String>,
    require_identity: bool,
}

/// Common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

impl GrpcAuth {
    pub fn new(config: &AggregatorConfig) -> Self {
        let tokens = config
            .agents
            .iter()
            .map(|a| (a.token.clone(), a.host.clone()))
            .collect::<HashMap<_, _>>();
        let revoked = config
            .tls
            .as_ref()
            .map(|t| t.revoked.clone())
            .unwrap_or_default();
        let require_identity =
            !tokens.is_empty() || config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        GrpcAuth {
            tokens,
            revoked,
            require_identity,
        }
    }

    /// The identity of `request`; None means nobody is required (insecure, open).
    pub fn identify<T>(&self, request: &Request<T>) -> Result<Option<String>, Refusal> {
        let cert_identity = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| common_name(c.as_ref())));
        if let Some(cn) = &cert_identity {
            if self.revoked.contains(cn) {
                return Err(Refusal::new(
                    "revoked",
                    Status::permission_denied(format!("certificate {cn:?} is revoked")),
                ));
            }
        }
        let token_identity = match request.metadata().get("authorization") {
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        Refusal::new(
                            "bad_credentials",
                            Status::unauthenticated("authorization must be `Bearer <token>`"),
                        )
                    })?;
                match self.tokens.get(token) {
                    Some(host) => Some(host.clone()),
                    None => {
                        return Err(Refusal::new(
                            "bad_credentials",
                            Status::unauthenticated("unknown token"),
                        ))
                    }
                }
            }
            None => None,
        };
        match (cert_identity, token_identity) {
            (Some(cn), Some(host)) if cn != host => Err(Refusal::new(
                "permission_denied",
                Status::permission_denied(format!(
                    "certificate {cn:?} and token of {host:?} disagree"
                )),
            )),
            (Some(id), _) | (None, Some(id)) => Ok(Some(id)),
            (None, None) if self.require_identity => Err(Refusal::new(
                "unauthenticated",
                Status::unauthenticated("no client certificate and no token"),
            )),
            (None, None) => Ok(None),
        }
    }
}
