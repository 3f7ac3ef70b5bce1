//! The gRPC codec of Kiln's service: prost's, except that bytes which do not decode as the
//! message a method takes are the caller's error (`INVALID_ARGUMENT`), not the server's
//! (prost's codec answers `INTERNAL`, as for a fault of its own). The generated service and
//! client use it (`codec_path` in `build.rs`).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct KilnCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for KilnCodec<T, U> {
    fn default() -> Self {
        KilnCodec(PhantomData)
    }
}

impl<T, U> Codec for KilnCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(ProstDecoder::default())
    }
}

/// prost's decoder, its parse errors answered as the sender's.
#[derive(Debug, Clone)]
pub struct MessageDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            // prost's decoder fails only on bytes that are not the message.
            debug_assert_eq!(status.code(), Code::Internal);
            Status::invalid_argument(format!(
                "malformed message: {} (it is not a {})",
                status.message(),
                short_type_name::<U>()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// `kiln_proto::rpc::SubmitRequest` -> `SubmitRequest`.
fn short_type_name<U>() -> &'static str {
    let name = std::any::type_name::<U>();
    name.rsplit("::").next().unwrap_or(name)
}
