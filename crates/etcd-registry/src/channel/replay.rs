//! Keeping a request so that it can be sent again.
//!
//! A tonic request body is a stream that can be read once. For a unary (or
//! any finished, small) request the encoder has the whole message ready at
//! once, so the body is read up front, without waiting, into one buffer that
//! every attempt sends. A body that is not complete at once (a client
//! stream) or is larger than the limit is passed through as it is, and the
//! request is not retried.

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
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
    pub(crate) fn request(&self) -> http::Request<Body> {
        let mut request = http::Request::new(Body::new(Full::new(self.body.clone())));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        request
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
