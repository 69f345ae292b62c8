//! Manifest and header parsing: protobuf bytes as a node or the coordinator
//! would receive them, turned into domain manifests and codecs.
#![no_main]

use fedge_common::codec::Codec;
use fedge_common::pb;
use fedge_common::wire::{metrics_from_wire, tensors_from_wire};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = pb::Manifest::decode(data) {
        if let Ok(manifest) = tensors_from_wire(&m) {
            let _ = manifest.numel();
        }
        let _ = Codec::F32.check_wire(&m);
    }
    if let Ok(h) = pb::UpdateHeader::decode(data) {
        if let Some(m) = &h.manifest {
            let _ = tensors_from_wire(m);
        }
        let _ = metrics_from_wire(&h.metrics.unwrap_or_default());
    }
    if let Ok(h) = pb::ModelHeader::decode(data)
        && let Some(m) = &h.manifest
    {
        let _ = fedge_common::params::Manifest::try_from(m);
    }
    if let Ok(c) = pb::UpdateCodec::decode(data) {
        let _ = Codec::try_from(&c);
    }
});
