//! The gRPC codec of `notify.v1`: prost's, with a bound on how often a field may occur at the top
//! level of a message, checked before the message is decoded.
//!
//! tonic decodes a whole request before the service is called. An empty `PublishRequest` takes 2
//! bytes in a `PublishBatchRequest` and tens of bytes once decoded. A 4 MiB request of them took
//! about 125 MB, from any caller, before the service could reject it for its more than 100 events. Counting the fields first bounds that to [`MAX_FIELD_REPEATS`] elements.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Most occurrences of one field at the top level of a message: the events of a full page of
/// History or ReadPartition. A `PublishBatch` call holds up to 100.
pub const MAX_FIELD_REPEATS: usize = crate::history::MAX_PAGE as usize;

/// Codec of the generated `notify.v1` clients and servers.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U> {
    types: PhantomData<(T, U)>,
}

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self { types: PhantomData }
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder {
            inner: ProstDecoder::new(BufferSettings::default()),
        }
    }
}

/// Decoder of [`BoundedCodec`]: checks the field counts, then decodes with prost.
#[derive(Debug)]
pub struct BoundedDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands over the message as one contiguous buffer.
        let bytes = buf.chunk();
        if bytes.len() == buf.remaining() {
            check_field_repeats(bytes, MAX_FIELD_REPEATS)?;
        }
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// Counts the top-level occurrences of fields 1 to 31 of an encoded message and fails when one
/// occurs more than `max` times. A malformed message passes, so that prost reports what is wrong
/// with it.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the field number and the limit.
pub fn check_field_repeats(mut bytes: &[u8], max: usize) -> Result<(), Status> {
    let mut counts = [0_usize; 32];
    while bytes.has_remaining() {
        let Ok((field, wire_type)) = decode_key(&mut bytes) else {
            return Ok(());
        };
        if let Some(count) = counts.get_mut(field as usize) {
            *count += 1;
            if *count > max {
                return Err(Status::invalid_argument(format!(
                    "field {field} of the message occurs more than {max} times; a PublishBatch call holds at most \
                     100 events, so split the events over several calls"
                )));
            }
        }
        let length = match wire_type {
            WireType::Varint => decode_varint(&mut bytes).map(|_| 0),
            WireType::SixtyFourBit => Ok(8),
            WireType::ThirtyTwoBit => Ok(4),
            WireType::LengthDelimited => decode_varint(&mut bytes),
            WireType::StartGroup | WireType::EndGroup => return Ok(()),
        };
        match length.ok().and_then(|length| usize::try_from(length).ok()) {
            Some(length) if length <= bytes.len() => bytes.advance(length),
            _ => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{PublishBatchRequest, PublishRequest};

    fn batch(events: usize) -> Vec<u8> {
        PublishBatchRequest {
            events: vec![PublishRequest::default(); events],
        }
        .encode_to_vec()
    }

    #[test]
    fn repeats_up_to_the_limit_pass() {
        assert!(check_field_repeats(&batch(1000), 1000).is_ok());
        let full = PublishRequest {
            channel: "news".into(),
            r#type: "post.created".into(),
            data: r#"{"title":"שלום"}"#.into(),
            user_id: "7".into(),
            idempotency_key: "k".into(),
        };
        assert!(check_field_repeats(&full.encode_to_vec(), 1).is_ok());
    }

    #[test]
    fn repeats_over_the_limit_fail() {
        let status = check_field_repeats(&batch(1001), 1000).expect_err("1001 events");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("field 1 of the message occurs more than 1000 times")
        );
    }

    #[test]
    fn malformed_message_is_left_to_prost() {
        // A length that runs past the end of the buffer.
        assert!(check_field_repeats(&[0x0a, 0x05, 0x01], 1).is_ok());
        assert!(check_field_repeats(&[0xff], 1).is_ok());
    }
}
