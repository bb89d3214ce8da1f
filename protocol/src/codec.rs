//! [`CborCodec`]: a libp2p request-response codec that frames each message as one CBOR value
//! (ciborium) on its own stream, with a size limit per direction. A message over its limit is
//! refused before it is decoded; a malformed one is an I/O error of kind `InvalidData`.
//! Gossip messages (announcements of versions and runs) are single CBOR values too
//! ([`encode_gossip`], [`decode_gossip`]).

use std::io;
use std::marker::PhantomData;

use futures::prelude::*;
use libp2p::request_response;
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// CBOR codec for requests `Req` and responses `Resp`.
#[derive(Debug)]
pub struct CborCodec<Req, Resp> {
    max_request: u64,
    max_response: u64,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for CborCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_request, self.max_response)
    }
}

impl<Req, Resp> CborCodec<Req, Resp> {
    /// A codec that accepts requests up to `max_request` and responses up to `max_response`
    /// bytes.
    pub fn new(max_request: u64, max_response: u64) -> Self {
        Self {
            max_request,
            max_response,
            _types: PhantomData,
        }
    }
}

/// Reads a whole stream of at most `limit` bytes and decodes it.
async fn read_limited<T, M>(io: &mut T, limit: u64, what: &str) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: DeserializeOwned,
{
    let mut bytes = Vec::new();
    io.take(limit + 1).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} larger than {limit} bytes"),
        ));
    }
    decode(&bytes, what)
}

/// Decodes one CBOR value, mapping errors to `InvalidData`.
pub fn decode<M: DeserializeOwned>(bytes: &[u8], what: &str) -> io::Result<M> {
    ciborium::from_reader(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed {what}: {e}")))
}

/// Encodes `message`, refusing one over `limit` bytes.
fn encode_limited<M: Serialize>(message: &M, limit: u64, what: &str) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    ciborium::into_writer(message, &mut bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what} of {} bytes exceeds the {limit}-byte limit",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// Writes one encoded message and closes the stream.
async fn write_all_and_close<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: Vec<u8>,
) -> io::Result<()> {
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp> request_response::Codec for CborCodec<Req, Resp>
where
    Req: Send + Serialize + DeserializeOwned,
    Resp: Send + Serialize + DeserializeOwned,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, self.max_request, "request").await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, self.max_response, "response").await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode_limited(&req, self.max_request, "request")?;
        write_all_and_close(io, bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode_limited(&res, self.max_response, "response")?;
        write_all_and_close(io, bytes).await
    }
}

/// CBOR bytes of a gossip message.
pub(crate) fn encode_gossip<M: serde::Serialize>(message: &M) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(message, &mut out).expect("writing CBOR to a Vec cannot fail");
    out
}

/// Why a gossip message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    /// Over [`crate::MAX_GOSSIP_MESSAGE_BYTES`].
    #[error("{what} too large")]
    TooLarge {
        /// The kind of message.
        what: &'static str,
    },
    /// Not the CBOR of the message (a field missing or of the wrong type, a peer id that is
    /// none, ...).
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// The kind of message.
        what: &'static str,
        /// The decoder's words.
        reason: String,
    },
    /// Well-formed, but a field breaks a rule.
    #[error("{what}: {reason}")]
    Invalid {
        /// The kind of message.
        what: &'static str,
        /// The rule broken.
        reason: String,
    },
}

/// Decodes a gossip message of at most [`crate::MAX_GOSSIP_MESSAGE_BYTES`]; `what` names it
/// in errors.
pub(crate) fn decode_gossip<M: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<M, GossipError> {
    if bytes.len() > crate::MAX_GOSSIP_MESSAGE_BYTES {
        return Err(GossipError::TooLarge { what });
    }
    ciborium::from_reader(bytes).map_err(|e| GossipError::Malformed {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Hash32;
    use crate::messages::{Request, Response};
    use futures::executor::block_on;
    use libp2p::request_response::Codec;

    fn protocol() -> StreamProtocol {
        StreamProtocol::new(crate::messages::MODELS_PROTOCOL)
    }

    #[test]
    fn messages_round_trip_with_bytes_as_byte_strings() {
        let mut codec = CborCodec::<Request, Response>::new(4096, 1 << 20);
        let response = Response::Chunk {
            index: 7,
            data: vec![0xab; 1000],
        };
        let mut wire = Vec::new();
        block_on(codec.write_response(&protocol(), &mut wire, response.clone())).unwrap();
        assert!(
            wire.len() < 1100,
            "bytes must be packed: {} bytes",
            wire.len()
        );
        let back = block_on(codec.read_response(&protocol(), &mut wire.as_slice())).unwrap();
        assert_eq!(back, response);

        let request = Request::Chunk {
            id: Hash32::of(b"v"),
            index: 3,
        };
        let mut wire = Vec::new();
        block_on(codec.write_request(&protocol(), &mut wire, request.clone())).unwrap();
        let back = block_on(codec.read_request(&protocol(), &mut wire.as_slice())).unwrap();
        assert_eq!(back, request);
    }

    #[test]
    fn oversized_and_malformed_messages_are_refused() {
        let mut codec = CborCodec::<Request, Response>::new(64, 128);
        let big = Response::Chunk {
            index: 0,
            data: vec![0; 1000],
        };
        let mut wire = Vec::new();
        assert!(block_on(codec.write_response(&protocol(), &mut wire, big.clone())).is_err());
        let mut roomy = CborCodec::<Request, Response>::new(64, 4096);
        block_on(roomy.write_response(&protocol(), &mut wire, big)).unwrap();
        let err = block_on(codec.read_response(&protocol(), &mut wire.as_slice())).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        let err = block_on(codec.read_request(&protocol(), &mut &b"\xff\xfe\x00"[..])).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
