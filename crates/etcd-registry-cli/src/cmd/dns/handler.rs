//! The query handler: one question in, one answer out, from the current
//! [`Zone`](super::zone::Zone) alone.
//!
//! hickory-server reads and writes the wire format. A message it cannot
//! parse gets FORMERR from it (or nothing, when even the header is cut);
//! UDP answers over the client's EDNS size (512 bytes without EDNS) are cut
//! at a record boundary with TC set, and the same question over TCP gets
//! everything that fits in one DNS message over TCP: 65,535 bytes.
//!
//! That is the limit: a bigger answer is cut over TCP too, the same way
//! (the records that fit, TC set). Records are in a fixed order (SRV by
//! instance id, A/AAAA by address), so the cut is deterministic: the same
//! first records, every time. hickory compresses only the first 120 names
//! of a message, so the limit is about 1,000 SRV records of
//! `{id}.{service}.{domain}` targets, or about 2,300 A records, under a
//! short domain; fewer with longer names.

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use super::feed::Current;
use super::metrics;
use super::zone::Outcome;

/// The largest UDP answer sent, whatever the client offers: 1232 bytes, the
/// size that DNS Flag Day 2020 settled on to avoid IP fragmentation.
/// Larger answers are truncated; the client retries over TCP.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Answers queries from the zone the [`Feed`](super::feed::Feed) publishes.
pub struct Handler {
    zone: Current,
}

impl Handler {
    pub fn new(zone: Current) -> Self {
        Handler { zone }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let query = match request.queries.queries() {
            [query] => Some(query),
            _ => None,
        };
        let qtype = metrics::type_label(query.map(|q| q.query_type()));
        metrics::query(qtype);

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let response_edns = request.edns.as_ref().map(|edns| {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            ours.set_version(0);
            ours
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(edns) = &response_edns {
            builder.edns(edns);
        }

        let refuse = |code: ResponseCode, name: &'static str| {
            metrics::error(qtype, name);
            code
        };
        let error = if request.metadata.op_code != OpCode::Query {
            Some(refuse(ResponseCode::NotImp, "NOTIMP"))
        } else if request.metadata.message_type != MessageType::Query {
            Some(refuse(ResponseCode::FormErr, "FORMERR"))
        } else if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Some(refuse(ResponseCode::BADVERS, "BADVERS"))
        } else {
            match query {
                None => Some(refuse(ResponseCode::FormErr, "FORMERR")),
                Some(q) if q.query_class() != DNSClass::IN => {
                    Some(refuse(ResponseCode::Refused, "REFUSED"))
                }
                Some(_) => None,
            }
        };
        let (Some(query), None) = (query, error) else {
            metadata.response_code = error.unwrap_or(ResponseCode::FormErr);
            metadata.authoritative = false;
            let reply = builder.build_no_records(metadata);
            return send(&mut response, qtype, metadata, reply).await;
        };

        let zone = self.zone.borrow().clone();
        let outcome = zone.lookup(query.name(), query.query_type());
        let negative: Option<&Record> = match &outcome {
            Outcome::Records(_) if !outcome.is_empty() => {
                metrics::answered(qtype);
                None
            }
            Outcome::Records(_) => zone.soa(),
            Outcome::NxDomain => {
                metrics::nxdomain(qtype);
                metadata.response_code = ResponseCode::NXDomain;
                zone.soa()
            }
            Outcome::Refused => {
                metrics::error(qtype, "REFUSED");
                metadata.response_code = ResponseCode::Refused;
                metadata.authoritative = false;
                None
            }
        };
        let reply = builder.build(
            metadata,
            outcome.answers(),
            std::iter::empty(),
            negative,
            std::iter::empty(),
        );
        send(&mut response, qtype, metadata, reply).await
    }
}

/// Sends `reply`; counts it if it was truncated.
async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    qtype: &'static str,
    metadata: Metadata,
    reply: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    match response.send_response(reply).await {
        Ok(info) => {
            if info.truncation {
                metrics::truncated(qtype);
            }
            info
        }
        Err(error) => {
            // The client went away (a closed TCP connection): nothing to answer.
            tracing::debug!(%error, "could not send a DNS response");
            let mut failed = metadata;
            failed.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: failed,
                counts: HeaderCounts::default(),
            })
        }
    }
}
