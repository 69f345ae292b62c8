//! A gRPC client written from `proto/fedge/v1/federation.proto` alone, for
//! tests that play a node (honest or hostile) without the edge node's code:
//! join, read tasks, fetch a manifest, and send update streams of any shape.

use anyhow::Context;
use fedge_common::pb::{self, federation_client::FederationClient};
use fedge_common::wire::crc32;
use prost::bytes::Bytes;
use tonic::transport::Channel;

use crate::plaintext_client;

pub type Client = FederationClient<Channel>;

pub struct Node {
    pub client: Client,
    pub session: String,
    /// Kept open: dropping it disconnects the node.
    pub instructions: tonic::Streaming<pb::Instruction>,
}

pub fn join_request(name: &str, samples: u64) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: pb::PROTOCOL_VERSION,
        node_name: name.into(),
        num_samples: samples,
        models: vec!["cnn".into()],
        ..Default::default()
    }
}

pub async fn join(port: u16, name: &str, samples: u64) -> anyhow::Result<Node> {
    let mut client = plaintext_client(port).await;
    let session = client.join(join_request(name, samples)).await?.into_inner().node_id;
    let instructions = client
        .instructions(pb::InstructionsRequest {
            node_id: session.clone(),
        })
        .await?
        .into_inner();
    Ok(Node {
        client,
        session,
        instructions,
    })
}

pub async fn task(node: &mut Node) -> anyhow::Result<pb::TrainTask> {
    match node.instructions.message().await?.and_then(|i| i.kind) {
        Some(pb::instruction::Kind::Train(t)) => Ok(t),
        other => anyhow::bail!("expected a task, got {other:?}"),
    }
}

/// The model's manifest, read from a whole fetch of version 0 (a node
/// fetches one copy at a time, so the stream is read to its end).
pub async fn model_manifest(node: &mut Node) -> anyhow::Result<pb::Manifest> {
    Ok(fetch(node, 0).await?.0)
}

pub fn numel(m: &pb::Manifest) -> usize {
    m.tensors.iter().map(|t| t.shape.iter().product::<i64>() as usize).sum()
}

/// A deterministic honest delta, different per node.
pub fn honest(n: usize, node: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i % (89 + node as usize)) as f32 - 44.0) * 1e-4 * node as f32)
        .collect()
}

pub fn le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub struct Upload {
    pub header: pb::UpdateHeader,
    pub payload: Vec<u8>,
    pub crc: u32,
}

impl Upload {
    pub fn new(session: &str, task: &pb::TrainTask, manifest: &pb::Manifest, values: &[f32], samples: u64) -> Self {
        let payload = le(values);
        let mut m = manifest.clone();
        m.encoding = pb::Encoding::F32Le as i32;
        m.payload_bytes = payload.len() as u64;
        Self {
            header: pb::UpdateHeader {
                node_id: session.to_owned(),
                round: task.round,
                base_version: task.model_version,
                num_samples: samples,
                manifest: Some(m),
                kind: pb::UpdateKind::Delta as i32,
                ..Default::default()
            },
            crc: crc32(&payload),
            payload,
        }
    }

    /// A secure-aggregation masked input: the model's manifest with the
    /// ring elements (one more than the model has: the clipping indicator).
    pub fn masked(session: &str, task: &pb::TrainTask, manifest: &pb::Manifest, words: &[u32], samples: u64) -> Self {
        let values: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
        let mut up = Self::new(session, task, manifest, &values, samples);
        if let Some(m) = up.header.manifest.as_mut() {
            m.encoding = pb::Encoding::MaskedU32 as i32;
        }
        up
    }

    pub fn messages(&self, chunk: usize) -> Vec<pb::UpdateChunk> {
        let mut v = vec![header(self.header.clone())];
        v.extend(self.payload.chunks(chunk).map(|c| data(c.to_vec())));
        v.push(trailer(self.crc));
        v
    }
}

pub fn header(h: pb::UpdateHeader) -> pb::UpdateChunk {
    pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(h)),
    }
}
pub fn data(d: Vec<u8>) -> pb::UpdateChunk {
    pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Data(Bytes::from(d))),
    }
}
pub fn trailer(crc: u32) -> pb::UpdateChunk {
    pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Trailer(pb::Trailer { crc32: crc })),
    }
}

pub async fn send(client: &mut Client, msgs: Vec<pb::UpdateChunk>) -> Result<pb::SubmitAck, tonic::Status> {
    client
        .submit_update(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// The values of global model `version`, fetched whole and decoded.
pub async fn fetch_values(node: &mut Node, version: u64) -> anyhow::Result<Vec<f32>> {
    Ok(fetch(node, version).await?.1)
}

/// Global model `version`: its manifest and values, fetched whole.
pub async fn fetch(node: &mut Node, version: u64) -> anyhow::Result<(pb::Manifest, Vec<f32>)> {
    let mut stream = node
        .client
        .fetch_model(pb::FetchModelRequest {
            node_id: node.session.clone(),
            version,
            part: pb::ModelPart::Parameters as i32,
        })
        .await?
        .into_inner();
    let mut manifest = None;
    let mut payload = Vec::new();
    while let Some(chunk) = stream.message().await? {
        match chunk.part {
            Some(pb::model_chunk::Part::Header(h)) => manifest = h.manifest,
            Some(pb::model_chunk::Part::Data(d)) => payload.extend_from_slice(&d),
            Some(pb::model_chunk::Part::Trailer(t)) => {
                anyhow::ensure!(crc32(&payload) == t.crc32, "model checksum mismatch");
                let values = payload
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                return Ok((manifest.context("the model stream had no header")?, values));
            }
            None => {}
        }
    }
    anyhow::bail!("the model stream ended without a trailer")
}
