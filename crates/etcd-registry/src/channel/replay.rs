//! Keeping a request so that it can be sent again.
//!
//! A tonic request body is a stream that can be read once. For a unary (or
//! any finished, small) request the encoder has the whole message ready at
//! once, so the body is read up front, without waiting, into one buffer that
//! every attempt sends. A body that is not complete at once (a client
//! stream) or is larger than the limit is passed through as it is, and the
//! request is not retried.
//!
//! A call's deadline travels as its `grpc-timeout` header, which tonic's
//! channel enforces per request: a retry, or an attempt made after waiting
//! for a ready endpoint, carries what is left of it.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use tokio::time::Instant;
use tonic::body::Body;

/// The parts of a request needed to build it again.
pub(crate) struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    extensions: http::Extensions,
    body: Bytes,
}

impl Replay {
    /// The request again, its `grpc-timeout` set to what is left until
    /// `deadline`.
    pub(crate) fn request(&self, deadline: Option<Instant>) -> http::Request<Body> {
        let mut request = http::Request::new(Body::new(Full::new(self.body.clone())));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        if let Some(deadline) = deadline {
            set_timeout(request.headers_mut(), deadline);
        }
        request
    }
}

const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The deadline a request's `grpc-timeout` sets, from now; `None` without
/// one (or with one that does not parse, which tonic ignores too).
pub(crate) fn deadline(headers: &http::HeaderMap) -> Option<Instant> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

/// Sets `grpc-timeout` to the time left until `deadline` (at least 1 ns, so
/// that a passed deadline times out at once rather than never).
pub(crate) fn set_timeout(headers: &mut http::HeaderMap, deadline: Instant) {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .as_nanos()
        .max(1);
    // The finest unit whose value fits the spec's 8 digits, rounded down.
    let (value, unit) = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
    ]
    .into_iter()
    .map(|(per, unit)| (left / per, unit))
    .find(|(value, _)| *value < 100_000_000)
    .unwrap_or(((left / 3_600_000_000_000).min(99_999_999), 'H'));
    if let Ok(value) = http::HeaderValue::from_str(&format!("{value}{unit}")) {
        headers.insert(GRPC_TIMEOUT, value);
    }
}

/// Reads what the body has ready now (at most `limit` bytes). Returns the
/// request to send first, and a [`Replay`] when the whole body was read.
pub(crate) fn prepare(
    request: http::Request<Body>,
    limit: usize,
) -> Result<(http::Request<Body>, Option<Replay>), tonic::Status> {
    let (parts, mut body) = request.into_parts();
    let mut data = BytesMut::new();
    let complete = loop {
        if data.len() > limit {
            break false;
        }
        match body.frame().now_or_never() {
            None => break false,
            Some(None) => break true,
            Some(Some(frame)) => match frame?.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                // Trailers in a request: rare; pass them on, no replay.
                Err(trailers) => {
                    let head = Frame::data(data.freeze());
                    let rest = futures::stream::iter([Ok(head), Ok(trailers)])
                        .chain(BodyStream::new(body));
                    let request =
                        http::Request::from_parts(parts, Body::new(StreamBody::new(rest)));
                    return Ok((request, None));
                }
            },
        }
    };
    let data = data.freeze();
    if complete {
        let replay = Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            extensions: parts.extensions.clone(),
            body: data.clone(),
        };
        let request = http::Request::from_parts(parts, Body::new(Full::new(data)));
        return Ok((request, Some(replay)));
    }
    let rest =
        futures::stream::once(async move { Ok(Frame::data(data)) }).chain(BodyStream::new(body));
    Ok((
        http::Request::from_parts(parts, Body::new(StreamBody::new(rest))),
        None,
    ))
}
