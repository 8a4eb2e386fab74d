//! The protobuf codec for rolecheck's services: prost's, except that a request that does
//! not decode (truncated, wrong wire types, invalid UTF-8 in a string) is the caller's
//! fault, so it is `INVALID_ARGUMENT`, not the `INTERNAL` tonic reports by default.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with malformed input reported as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Copy)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// Decodes with prost; decode failures become `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| match status.code() {
            Code::Internal => {
                Status::invalid_argument(format!("malformed request: {}", status.message()))
            }
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// What tonic reports as `INTERNAL` when a request's gRPC framing is broken (a compressed
/// frame nobody negotiated, a truncated frame, a missing message). All are the caller's
/// doing.
const FRAMING_FAULTS: [&str; 4] =
    ["protocol error", "Unexpected EOF", "Error decompressing", "Missing request message"];

/// What tonic reports as `OUT_OF_RANGE` for a request over the decoding limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

/// Rewrites tonic's `INTERNAL` for broken request framing to `INVALID_ARGUMENT`, so no
/// caller-caused error is ever reported as internal, and its `OUT_OF_RANGE` for a request
/// over `--max-message-bytes` to `INVALID_ARGUMENT` naming the limit. Everything else
/// passes untouched.
#[derive(Clone, Copy, Debug, Default)]
pub struct FramingFaultLayer {
    /// `--max-message-bytes`, named in the message for an oversized request.
    pub max_message_bytes: usize,
}

impl<S> tower::Layer<S> for FramingFaultLayer {
    type Service = FramingFault<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FramingFault(inner, self.max_message_bytes)
    }
}

/// The service [`FramingFaultLayer`] produces.
#[derive(Clone, Debug)]
pub struct FramingFault<S>(S, usize);

impl<S, B, R> tower::Service<http::Request<B>> for FramingFault<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.0.call(request);
        let limit = self.1;
        Box::pin(async move {
            let mut response = response.await?;
            let headers = response.headers_mut();
            let message = || headers.get("grpc-message").and_then(|m| m.to_str().ok());
            let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
                && message().is_some_and(|m| m.replace("%20", " ").starts_with(TOO_LARGE));
            if too_large {
                let text = format!("request message over --max-message-bytes ({limit} bytes)");
                headers.insert("grpc-status", http::HeaderValue::from_static("3"));
                if let Ok(value) = http::HeaderValue::from_str(&text.replace(' ', "%20")) {
                    headers.insert("grpc-message", value);
                }
                return Ok(response);
            }
            let framing = headers.get("grpc-status").is_some_and(|s| s == "13")
                && headers.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| {
                    let message = m.replace("%20", " ");
                    FRAMING_FAULTS.iter().any(|fault| message.starts_with(fault))
                });
            if framing {
                headers.insert("grpc-status", http::HeaderValue::from_static("3"));
            }
            Ok(response)
        })
    }
}
