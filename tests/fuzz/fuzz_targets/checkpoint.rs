//! Checkpoint loading: the bytes of `checkpoint/round-NNNN.safetensors` as a
//! restarting coordinator reads them (and safetensors parsing beneath).
#![no_main]

use fedge_common::params::{Manifest, TensorMeta, parse_safetensors};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let manifest = Manifest {
        tensors: vec![TensorMeta {
            name: "w".into(),
            shape: vec![3],
        }],
    };
    if let Ok(cp) = fedge_common::checkpoint::parse(data, &manifest, "run-1", 2) {
        assert_eq!(cp.global.len(), 3);
    }
    let _ = parse_safetensors(data);
});
