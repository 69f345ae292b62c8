//! Update payload decoding, as the coordinator's intake runs it: any codec,
//! any announced size, any chunking. Bytes in, an error or values out;
//! never a panic, never a value outside the announced length.
#![no_main]

use fedge_common::codec::Codec;
use fedge_common::wire::PayloadStream;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let codec = match data[0] % 6 {
        0 => Codec::F32,
        1 => Codec::F16,
        2 => Codec::Bf16,
        3 => Codec::Int8 {
            block: 1 + u32::from(data[1]),
        },
        4 => Codec::TopK {
            fraction: (f64::from(data[1]) + 1.0) / 256.0,
        },
        _ => Codec::Sign {
            block: 1 + u32::from(data[1]),
        },
    };
    let numel = 1 + usize::from(u16::from_le_bytes([data[2], data[3]])) % 8192;
    let chunk = 1 + usize::from(u16::from_le_bytes([data[4], data[5]]));
    let payload = &data[6..];
    // What an honest sender announces, and what this one actually sends.
    for announced in [codec.encoded_len(numel), payload.len() as u64] {
        let Ok(mut stream) = PayloadStream::new(codec, numel, announced) else {
            continue;
        };
        let mut ok = true;
        for piece in payload.chunks(chunk) {
            let pushed = stream.push(piece, &mut |offset, values| {
                assert!(offset + values.len() <= numel, "value past the announced length");
            });
            if pushed.is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            let _ = stream.finish(fedge_common::wire::crc32(payload));
        }
    }
});
