//! How the pool talks to one replica: `distill.v1.Teacher` (our teacher servers) or the Open
//! Inference Protocol (`inference.GRPCInferenceService`: Triton, KServe, MLServer, and our
//! teacher servers too). Everything above this module — choice, hedging, retries, probes, the
//! cache — sees one shape: "what do you serve" ([`Client::describe`]) and "tempered logits for
//! these rows" ([`Client::infer`]).
//!
//! An OIP member differs from a native one in what it is told and what it says:
//! - **Start.** `ServerReady` and `ModelReady` must say ready (else the replica is not ready
//!   yet, like a native one that does not answer `Describe`); `ModelMetadata` must know the
//!   model (NOT_FOUND is a config error, not a replica to wait for) and list the
//!   configured input with the configured datatype and the data's values per row, and the
//!   configured output with a float datatype and the data's class count. A dimension stated
//!   as -1 (variable) is accepted as fitting; a model that lists no inputs or outputs at all
//!   is taken on trust and checked reply by reply. A mismatch is [`Described::Mismatch`]:
//!   the run refuses to start, naming the member and the field.
//! - **Requests.** The rows go as raw contents of the configured input, converted to its
//!   datatype (U8 pixels are scaled exactly as our teacher servers scale them; float data
//!   cannot be sent to a UINT8 input and is refused), shaped `[N, …]` as the metadata states
//!   a row (flat when it does not). Only the configured output is asked for, at T = 1: the
//!   coordinator applies T itself. `logits` z give z/T; `probabilities` p give ln p / T and
//!   `log-probabilities` l give l / T — the same softmax(z/T) whenever the server computed p
//!   as softmax(z) (a probability of exactly 0, an underflow, is taken as the smallest
//!   positive normal f32, ln ≈ −87.3). Probabilities outside [0, 1] and log-probabilities above 0
//!   (beyond rounding) are bad replies, like NaN or a wrong shape.
//! - **Identity.** OIP states no weights digest: the member's identity (what the soft-target
//!   cache and the membership pin) is `oip:<model>:<version>:<identity>` from the config.

use std::sync::OnceLock;

use distill_proto::oip::{decode_output_f32, encode_input, parse_datatype};
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{self, DescribeRequest, DescribeResponse, InferRequest};
use distill_proto::pb_oip::grpc_inference_service_client::GrpcInferenceServiceClient;
use distill_proto::pb_oip::model_infer_request::InferRequestedOutputTensor;
use distill_proto::pb_oip::model_metadata_response::TensorMetadata;
use distill_proto::pb_oip::{
    ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, ServerReadyRequest,
};
use distill_proto::{DType, HostTensor};
use distill_transport::AuthChannel;

use super::reply;
use crate::config::{OipMember, OutputHolds};
use crate::domain::membership::{ModelIdentity, SequenceIdentity};

/// Slack on the bounds of probabilities and log-probabilities (servers compute in f32).
const ROUNDING: f32 = 1e-4;

/// A replica's client.
pub(crate) enum Client {
    /// Our `distill.v1.Teacher`.
    Native(TeacherClient<AuthChannel>),
    /// An OIP server.
    Oip(OipClient),
}

/// An OIP replica's client and what the member's config says about its model.
pub(crate) struct OipClient {
    client: GrpcInferenceServiceClient<AuthChannel>,
    spec: OipMember,
    /// One row's shape as the model's metadata states it (flat when it does not).
    row_shape: OnceLock<Vec<usize>>,
}

/// What asking a replica what it serves found.
pub(crate) enum Described {
    /// It serves a model that fits.
    Model(ModelIdentity),
    /// It did not answer, or is not ready: it may be later.
    NotReady(String),
    /// It serves a model that does not fit the data or the member's config: never usable.
    Mismatch(String),
}

/// Why an inference attempt gave no logits.
pub(crate) enum Failure {
    /// The replica answered with an error status.
    Status(tonic::Status),
    /// It answered, but not with valid logits.
    BadReply(String),
    /// The request could not be made for this member (the data does not fit its input).
    Unsendable(String),
}

/// What a Describe says, as the membership records it.
pub(crate) fn identity(d: &DescribeResponse) -> ModelIdentity {
    ModelIdentity {
        model_id: d.model_id.clone(),
        weights_digest: d.weights_digest.clone(),
        input_shape: d.input_shape.clone(),
        classes: d.num_classes,
        max_batch: d.max_batch,
        // A sequence model states its token budget (and its tokenizer, if it has one); a
        // classifier leaves these empty.
        sequence: (d.max_tokens > 0 || !d.tokenizer_digest.is_empty()).then(|| SequenceIdentity {
            tokenizer_digest: d.tokenizer_digest.clone(),
            max_tokens: d.max_tokens,
            max_sequence_length: d.max_sequence_length,
        }),
    }
}

impl Client {
    /// A client of the protocol `oip` says (None: native) over `channel`, with message limits.
    pub(crate) fn new(channel: AuthChannel, oip: Option<&OipMember>, max_bytes: usize) -> Self {
        match oip {
            None => Client::Native(
                TeacherClient::new(channel)
                    .max_decoding_message_size(max_bytes)
                    .max_encoding_message_size(max_bytes),
            ),
            Some(spec) => Client::Oip(OipClient {
                client: GrpcInferenceServiceClient::new(channel)
                    .max_decoding_message_size(max_bytes)
                    .max_encoding_message_size(max_bytes),
                spec: spec.clone(),
                row_shape: OnceLock::new(),
            }),
        }
    }

    /// What the replica serves, for data of `row_len` values per row and `classes` classes.
    /// The caller bounds the time it takes.
    pub(crate) async fn describe(&self, row_len: usize, classes: usize) -> Described {
        match self {
            Client::Native(c) => match c.clone().describe(DescribeRequest {}).await {
                Ok(d) => Described::Model(identity(d.get_ref())),
                Err(s) => Described::NotReady(format!("Describe: {}: {}", s.code(), s.message())),
            },
            Client::Oip(c) => c.describe(row_len, classes).await,
        }
    }

    /// Tempered logits z/T of `rows` rows of `classes` classes for `inputs`, checked (see
    /// [`reply::checked_logits`] and the module docs). The caller bounds the time it takes.
    pub(crate) async fn infer(
        &self,
        inputs: &HostTensor,
        temperature: f32,
        classes: usize,
    ) -> Result<Vec<f32>, Failure> {
        let rows = inputs.shape().first().copied().unwrap_or(0);
        match self {
            Client::Native(c) => {
                let req = InferRequest {
                    request_id: 0,
                    inputs: Some(inputs.clone().into()),
                    temperature,
                    output_dtype: distill_proto::pb::DType::from(DType::F32) as i32,
                    ..Default::default()
                };
                let resp = c.clone().infer(req).await.map_err(Failure::Status)?;
                reply::checked_logits(resp.into_inner(), rows, classes)
                    .map_err(|e| Failure::BadReply(e.to_string()))
            }
            Client::Oip(c) => c.infer(inputs, temperature, rows, classes).await,
        }
    }
}

impl Client {
    /// The top-k rows of every real position of `req`'s sequences (checked against
    /// `vocab`). Only our own teacher protocol serves sequences.
    pub(crate) async fn infer_tokens(
        &self,
        req: &TokenRequest,
        vocab: usize,
    ) -> Result<pb::TopKTargets, Failure> {
        match self {
            Client::Native(c) => {
                let msg = InferRequest {
                    request_id: 0,
                    inputs: Some(req.tokens.clone().into()),
                    temperature: req.temperature,
                    top_k: req.top_k,
                    lengths: req.lengths.clone(),
                    ..Default::default()
                };
                let resp = c.clone().infer(msg).await.map_err(Failure::Status)?;
                reply::checked_topk(resp.into_inner(), req.positions(), vocab, req.top_k)
                    .map_err(|e| Failure::BadReply(e.to_string()))
            }
            Client::Oip(_) => Err(Failure::Unsendable(
                "Open Inference Protocol members serve rows, not token sequences".into(),
            )),
        }
    }
}

/// One request of token sequences: `tokens` is `[N, L]` I64 ids, `lengths` the real length
/// of each (empty: all L), each position answered with its top `top_k` at `temperature`.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub tokens: HostTensor,
    pub lengths: Vec<u32>,
    pub temperature: f32,
    pub top_k: u32,
}

impl TokenRequest {
    /// `n` sequences of `l` token ids each (row-major), the real lengths `lengths`.
    pub fn new(
        ids: &[u32],
        n: usize,
        l: usize,
        lengths: Vec<u32>,
        temperature: f32,
        top_k: u32,
    ) -> crate::error::Result<Self> {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&v| i64::from(v).to_le_bytes())
            .collect();
        let tokens = HostTensor::new(vec![n, l], DType::I64, bytes)
            .map_err(|e| crate::error::Error::Internal(format!("token tensor: {e}")))?;
        Ok(Self {
            tokens,
            lengths,
            temperature,
            top_k,
        })
    }

    /// Positions answered: the sum of the lengths (every sequence's L when none are given).
    pub fn positions(&self) -> usize {
        let shape = self.tokens.shape();
        let (n, l) = (
            shape.first().copied().unwrap_or(0),
            shape.get(1).copied().unwrap_or(0),
        );
        if self.lengths.is_empty() {
            n.saturating_mul(l)
        } else {
            self.lengths
                .iter()
                .map(|&x| (x as usize).min(l))
                .fold(0usize, usize::saturating_add)
        }
    }
}

impl OipClient {
    async fn describe(&self, row_len: usize, classes: usize) -> Described {
        let s = &self.spec;
        let version = s.model_version.clone().unwrap_or_default();
        let mut c = self.client.clone();
        let status = |what: &str, st: tonic::Status| {
            Described::NotReady(format!("{what}: {}: {}", st.code(), st.message()))
        };
        match c.server_ready(ServerReadyRequest {}).await {
            Ok(r) if r.get_ref().ready => {}
            Ok(_) => return Described::NotReady("ServerReady: not ready".into()),
            Err(st) => return status("ServerReady", st),
        }
        // Metadata before readiness: a model the server does not have at all is a config
        // error (NOT_FOUND), not a replica that may become ready.
        let meta = match c
            .model_metadata(ModelMetadataRequest {
                name: s.model_name.clone(),
                version: version.clone(),
            })
            .await
        {
            Ok(m) => m.into_inner(),
            Err(st) if st.code() == tonic::Code::NotFound => {
                let which = match &s.model_version {
                    Some(v) => format!("model `{}` version `{v}`", s.model_name),
                    None => format!("model `{}`", s.model_name),
                };
                return Described::Mismatch(format!(
                    "`model_name`/`model_version`: the server has no {which}: {}",
                    st.message()
                ));
            }
            Err(st) => return status("ModelMetadata", st),
        };
        let ready = ModelReadyRequest {
            name: s.model_name.clone(),
            version: version.clone(),
        };
        match c.model_ready(ready).await {
            Ok(r) if r.get_ref().ready => {}
            Ok(_) => {
                return Described::NotReady(format!(
                    "ModelReady: model `{}` version `{version}` is not ready",
                    s.model_name
                ));
            }
            Err(st) => return status("ModelReady", st),
        }
        match fit(s, &meta.inputs, &meta.outputs, row_len, classes) {
            Ok(row_shape) => {
                let _ = self.row_shape.set(row_shape.clone());
                Described::Model(ModelIdentity {
                    model_id: s.model_id(),
                    weights_digest: s.identity_key(),
                    input_shape: row_shape.iter().map(|&d| d as u64).collect(),
                    classes: u32::try_from(classes).unwrap_or(u32::MAX),
                    max_batch: 0,
                    sequence: None,
                })
            }
            Err(msg) => Described::Mismatch(msg),
        }
    }

    async fn infer(
        &self,
        inputs: &HostTensor,
        temperature: f32,
        rows: usize,
        classes: usize,
    ) -> Result<Vec<f32>, Failure> {
        let s = &self.spec;
        let x = convert(inputs, s.datatype(), self.row_shape.get()).map_err(Failure::Unsendable)?;
        let (input, raw) = encode_input(&s.input_name, &x);
        let req = ModelInferRequest {
            model_name: s.model_name.clone(),
            model_version: s.model_version.clone().unwrap_or_default(),
            inputs: vec![input],
            outputs: vec![InferRequestedOutputTensor {
                name: s.output_name.clone(),
                parameters: Default::default(),
            }],
            raw_input_contents: vec![raw],
            ..Default::default()
        };
        let resp = self
            .client
            .clone()
            .model_infer(req)
            .await
            .map_err(Failure::Status)?
            .into_inner();
        let (shape, values) = decode_output_f32(&resp, &s.output_name)
            .map_err(|e| Failure::BadReply(e.to_string()))?;
        if shape != [rows, classes] {
            return Err(Failure::BadReply(format!(
                "output `{}` has shape {shape:?}, expected [{rows}, {classes}]",
                s.output_name
            )));
        }
        temper(values, s.output, temperature, classes).map_err(Failure::BadReply)
    }
}

/// `inputs` as the member's input datatype, each row shaped `row_shape` when given.
fn convert(
    inputs: &HostTensor,
    to: DType,
    row_shape: Option<&Vec<usize>>,
) -> Result<HostTensor, String> {
    let rows = inputs.shape().first().copied().unwrap_or(0);
    let mut shape = vec![rows];
    match row_shape {
        Some(r) => shape.extend(r),
        None => shape.push(inputs.numel().checked_div(rows).unwrap_or(0)),
    }
    let err = |e: distill_proto::Error| e.to_string();
    match (inputs.dtype(), to) {
        (from, to) if from == to => HostTensor::new(shape, to, inputs.data().clone()).map_err(err),
        (DType::U8, to) if to.is_float() => {
            HostTensor::from_f32_as(shape, &distill_core::data::pixels_to_f32(inputs.data()), to)
                .map_err(err)
        }
        (from, to) if from.is_float() && to.is_float() => {
            HostTensor::from_f32_as(shape, &inputs.to_f32_vec(), to).map_err(err)
        }
        (from, to) => Err(format!(
            "the data is {from:?} and cannot be sent to an input of datatype {}",
            distill_proto::oip::datatype_name(to)
        )),
    }
}

/// What the member's output holds, as tempered logits z/T (see the module docs), every value
/// finite.
pub(crate) fn temper(
    mut v: Vec<f32>,
    holds: OutputHolds,
    temperature: f32,
    classes: usize,
) -> Result<Vec<f32>, String> {
    let floor = f32::MIN_POSITIVE.ln();
    let at = |i: usize| (i / classes.max(1), i % classes.max(1));
    for (i, x) in v.iter_mut().enumerate() {
        let z = match holds {
            OutputHolds::Logits => *x,
            OutputHolds::Probabilities => {
                if !(0.0..=1.0 + ROUNDING).contains(x) {
                    let (r, c) = at(i);
                    return Err(format!("probability {x} at row {r}, class {c}"));
                }
                x.max(f32::MIN_POSITIVE).ln()
            }
            OutputHolds::LogProbabilities => {
                if x.is_nan() || *x > ROUNDING {
                    let (r, c) = at(i);
                    return Err(format!("log-probability {x} at row {r}, class {c}"));
                }
                x.max(floor)
            }
        };
        let t = z / temperature;
        if !t.is_finite() {
            let (r, c) = at(i);
            return Err(format!("output holds {x} at row {r}, class {c}"));
        }
        *x = t;
    }
    Ok(v)
}

/// The row shape to send, if the model's metadata fits the member and the data; else why not,
/// naming the field.
fn fit(
    s: &OipMember,
    inputs: &[TensorMetadata],
    outputs: &[TensorMetadata],
    row_len: usize,
    classes: usize,
) -> Result<Vec<usize>, String> {
    let model = &s.model_name;
    let mut row_shape = vec![row_len];
    if !inputs.is_empty() {
        let Some(i) = inputs.iter().find(|t| t.name == s.input_name) else {
            return Err(format!(
                "`input_name`: model `{model}` has no input `{}` (its inputs: {:?})",
                s.input_name,
                inputs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>()
            ));
        };
        if parse_datatype(&i.datatype) != Some(s.datatype()) {
            return Err(format!(
                "`input_datatype`: model `{model}` input `{}` is {}, the member says {}",
                i.name, i.datatype, s.input_datatype
            ));
        }
        let dims = i.shape.get(1..).unwrap_or_default();
        if dims.iter().all(|&d| d >= 0) && !dims.is_empty() {
            let concrete: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
            let n = concrete.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if n != Some(row_len) {
                return Err(format!(
                    "input shape: model `{model}` input `{}` has shape {:?}, {} values per row, \
                     but the data has {row_len}",
                    i.name,
                    i.shape,
                    n.map_or("too many".to_string(), |n| n.to_string())
                ));
            }
            row_shape = concrete;
        }
    }
    if !outputs.is_empty() {
        let Some(o) = outputs.iter().find(|t| t.name == s.output_name) else {
            return Err(format!(
                "`output_name`: model `{model}` has no output `{}` (its outputs: {:?})",
                s.output_name,
                outputs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>()
            ));
        };
        if !["FP32", "FP64", "FP16", "BF16"].contains(&o.datatype.as_str()) {
            return Err(format!(
                "output datatype: model `{model}` output `{}` is {}, not a float type",
                o.name, o.datatype
            ));
        }
        if let Some(&last) = o.shape.last()
            && last >= 0
            && last as u64 != classes as u64
        {
            return Err(format!(
                "class count: model `{model}` output `{}` has shape {:?}, {last} classes, but \
                 the data has {classes}",
                o.name, o.shape
            ));
        }
    }
    Ok(row_shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(z: &[f32]) -> Vec<f32> {
        let top = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = z.iter().map(|v| (v - top).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn probabilities_and_log_probabilities_give_the_logits_softmax_at_t() {
        let z = vec![1.5f32, -0.5, 3.0, 0.25];
        let t = 4.0;
        let want = softmax(&z.iter().map(|v| v / t).collect::<Vec<_>>());
        let p = softmax(&z);
        let lp: Vec<f32> = p.iter().map(|v| v.ln()).collect();
        for (holds, out) in [
            (OutputHolds::Logits, z.clone()),
            (OutputHolds::Probabilities, p),
            (OutputHolds::LogProbabilities, lp),
        ] {
            let got = softmax(&temper(out, holds, t, 4).unwrap());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{holds:?}: {got:?} vs {want:?}");
            }
        }
        // Logits are divided exactly as a native teacher divides them.
        assert_eq!(
            temper(z.clone(), OutputHolds::Logits, t, 4).unwrap(),
            z.iter().map(|v| v / t).collect::<Vec<_>>()
        );
    }

    #[test]
    fn out_of_range_outputs_are_bad_replies_and_zero_is_floored() {
        assert!(
            temper(vec![0.5, 1.5], OutputHolds::Probabilities, 1.0, 2)
                .unwrap_err()
                .contains("row 0, class 1")
        );
        assert!(temper(vec![-0.1, 1.0], OutputHolds::Probabilities, 1.0, 2).is_err());
        assert!(temper(vec![0.5, 0.3], OutputHolds::LogProbabilities, 1.0, 2).is_err());
        assert!(temper(vec![f32::NAN, 0.0], OutputHolds::Logits, 1.0, 2).is_err());
        let z = temper(vec![0.0, 1.0], OutputHolds::Probabilities, 2.0, 2).unwrap();
        assert_eq!(z, vec![f32::MIN_POSITIVE.ln() / 2.0, 0.0]);
        let z = temper(
            vec![f32::NEG_INFINITY, 0.0],
            OutputHolds::LogProbabilities,
            1.0,
            2,
        )
        .unwrap();
        assert!(z[0].is_finite());
    }

    #[test]
    fn pixels_are_scaled_for_float_inputs_and_float_data_is_not_sent_to_uint8() {
        let px = HostTensor::new(vec![2, 2], DType::U8, vec![0u8, 255, 128, 7]).unwrap();
        let f = convert(&px, DType::F32, None).unwrap();
        assert_eq!(f.shape(), [2, 2]);
        assert_eq!(
            f.to_f32_vec(),
            distill_core::data::pixels_to_f32(&[0, 255, 128, 7])
        );
        let same = convert(&px, DType::U8, Some(&vec![1, 2])).unwrap();
        assert_eq!(
            (same.shape(), same.data().as_ref()),
            ([2usize, 1, 2].as_slice(), [0u8, 255, 128, 7].as_slice())
        );
        let err = convert(&f, DType::U8, None).unwrap_err();
        assert!(err.contains("UINT8"), "{err}");
    }
}
