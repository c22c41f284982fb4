//! What is stored and digested of a window: its canonical encoding and the
//! content digest that dedupe compares (see the store's overview).
use prost::Message;
use sci_proto::v1;
use sha2::{Digest, Sha256};

/// The encoding that is stored and digested: the prost encoding with the
/// `weights` records (field 24) moved to the end, as the first stores wrote
/// it, so digests stay comparable across versions. A move of bytes, not a
/// second encoding: the window is not cloned.
pub fn canonical_encoding(w: &v1::WindowReport) -> Vec<u8> {
    const WEIGHTS_FIELD: u32 = 24;
    let encoded = w.encode_to_vec();
    if w.weights.is_empty() {
        return encoded;
    }
    let mut head = Vec::with_capacity(encoded.len());
    let mut weights = Vec::new();
    let mut rest: &[u8] = &encoded;
    while !rest.is_empty() {
        let before = rest.len();
        let mut record = rest;
        let Ok((tag, wire_type)) = prost::encoding::decode_key(&mut record) else {
            return encoded;
        };
        let skipped = prost::encoding::skip_field(
            wire_type,
            tag,
            &mut record,
            prost::encoding::DecodeContext::default(),
        );
        if skipped.is_err() {
            return encoded;
        }
        let (this, after) = rest.split_at(before - record.len());
        if tag == WEIGHTS_FIELD {
            weights.extend_from_slice(this);
        } else {
            head.extend_from_slice(this);
        }
        rest = after;
    }
    head.extend_from_slice(&weights);
    head
}

pub fn content_digest(encoding: &[u8]) -> Vec<u8> {
    Sha256::digest(encoding).to_vec()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_encoding_keeps_the_layout_earlier_digests_were_taken_on() {
        // As the first stores wrote it: every field but the weights, in
        // field order, then the weights in key order.
        let mut w = v1::WindowReport {
            host: "h".into(),
            seq: 7,
            host_energy_j: 12.5,
            scenarios: vec![v1::ScenarioRecord {
                scenario: "credit".into(),
                transactions: 3,
                ..Default::default()
            }],
            processes: vec![v1::ProcessRecord {
                pid: 4,
                service: "svc".into(),
                ..Default::default()
            }],
            request_cpu: vec![v1::RequestCpuHistogram::default()],
            ..Default::default()
        };
        for (k, v) in [("query", 1.0), ("credit", 24.0), ("drawdown", 7.0)] {
            w.weights.insert(k.into(), v);
        }
        w.ingest_refused.insert("late".into(), 2);
        let mut without_weights = w.clone();
        without_weights.weights.clear();
        let mut expected = without_weights.encode_to_vec();
        prost::encoding::btree_map::encode(
            prost::encoding::string::encode,
            prost::encoding::string::encoded_len,
            prost::encoding::double::encode,
            prost::encoding::double::encoded_len,
            24,
            &w.weights,
            &mut expected,
        );
        assert_ne!(expected, w.encode_to_vec());
        assert_eq!(canonical_encoding(&w), expected);
        w.weights.clear();
        assert_eq!(canonical_encoding(&w), w.encode_to_vec());
    }

    #[test]
    fn the_digest_does_not_depend_on_the_weights_order() {
        let mut a = v1::WindowReport::default();
        let mut b = v1::WindowReport::default();
        for (k, v) in [
            ("credit", 24.0),
            ("drawdown", 7.0),
            ("repayment", 3.0),
            ("query", 1.0),
        ] {
            a.weights.insert(k.into(), v);
        }
        for (k, v) in [
            ("query", 1.0),
            ("repayment", 3.0),
            ("drawdown", 7.0),
            ("credit", 24.0),
        ] {
            b.weights.insert(k.into(), v);
        }
        assert_eq!(canonical_encoding(&a), canonical_encoding(&b));
        let decoded = v1::WindowReport::decode(&canonical_encoding(&a)[..]).unwrap();
        assert_eq!(decoded, a);
        b.weights.insert("query".into(), 2.0);
        assert_ne!(
            content_digest(&canonical_encoding(&a)),
            content_digest(&canonical_encoding(&b))
        );
    }
}
