//! The teacher served over the Open Inference Protocol (`inference.GRPCInferenceService`, KServe
//! v2 / Triton's core API), on the same port as `distill.v1.Teacher`, so that any OIP client
//! (tritonclient, KServe's, MLServer's) can ask it.
//!
//! - **The model** is named after the member (`--member`); its one version is the first 16
//!   hex digits of the weights digest (a request may name no version, that one, or the full
//!   digest; any other name or version is NOT_FOUND).
//! - **Input** `input`: `[N, …]` with the model's values per row (flat or shaped like the
//!   model's input), FP32, FP16, BF16 (raw contents only) or UINT8 (pixels, scaled as
//!   `distill.v1.Teacher` scales them). Typed or raw contents.
//! - **Outputs**, all `[N, classes]` FP32 in raw contents, at the request's temperature (a
//!   request parameter `temperature`, double, int or string; 1 when absent): `logits` (z/T),
//!   `probabilities` (softmax(z/T)) and `log_probabilities`. A request naming no output gets
//!   all three, as the protocol says.
//! - **Everything else is `Infer`'s**: the same validation, in-flight limit, batching and
//!   errors (INVALID_ARGUMENT for a bad request, RESOURCE_EXHAUSTED when busy, UNAVAILABLE
//!   while shutting down), because a `ModelInfer` is turned into an `InferRequest` and answered
//!   by the same [`TeacherService::infer_one`].
//! - `ServerReady` turns false once shutdown began; `ServerLive` stays true while the server
//!   answers at all.

use distill_proto::oip::{decode_input, wire_shape};
use distill_proto::pb::InferRequest;
use distill_proto::pb_oip::grpc_inference_service_server::GrpcInferenceService;
use distill_proto::pb_oip::infer_parameter::ParameterChoice;
use distill_proto::pb_oip::model_infer_response::InferOutputTensor;
use distill_proto::pb_oip::model_metadata_response::TensorMetadata;
use distill_proto::pb_oip::{
    InferParameter, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};
use distill_proto::{DType, HostTensor};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::service::TeacherService;
use crate::telemetry::Protocol;

/// The one input's name.
pub const INPUT: &str = "input";
/// Tempered logits z/T.
pub const LOGITS: &str = "logits";
/// softmax(z/T).
pub const PROBABILITIES: &str = "probabilities";
/// log softmax(z/T).
pub const LOG_PROBABILITIES: &str = "log_probabilities";
/// The request parameter carrying T.
pub const TEMPERATURE: &str = "temperature";

/// What a server reports as its platform in `ModelMetadata`.
pub const PLATFORM: &str = "distill";

/// The OIP face of a [`TeacherService`].
#[derive(Clone)]
pub struct OipService {
    teacher: TeacherService,
    shutdown: CancellationToken,
}

impl OipService {
    /// OIP over `teacher`; not ready once `shutdown` is cancelled.
    pub fn new(teacher: TeacherService, shutdown: CancellationToken) -> Self {
        Self { teacher, shutdown }
    }

    fn version(&self) -> &str {
        let d = &self.teacher.info().digest;
        d.get(..16).unwrap_or(d)
    }

    /// NOT_FOUND unless `name`/`version` are this server's model.
    fn check_model(&self, name: &str, version: &str) -> Result<(), Status> {
        let info = self.teacher.info();
        if name != info.member {
            return Err(Status::not_found(format!(
                "no model `{name}` here: this server serves `{}`",
                info.member
            )));
        }
        if !(version.is_empty() || version == self.version() || version == info.digest) {
            return Err(Status::not_found(format!(
                "model `{name}` has no version `{version}`: its one version is `{}`",
                self.version()
            )));
        }
        Ok(())
    }

    /// Answers one `ModelInfer` (see the module docs).
    pub async fn model_infer(&self, req: ModelInferRequest) -> Result<ModelInferResponse, Status> {
        let ModelInferRequest {
            model_name,
            model_version,
            id,
            parameters,
            inputs,
            outputs,
            raw_input_contents,
        } = req;
        self.check_model(&model_name, &model_version)?;
        let bad = |m: String| Status::invalid_argument(m);
        let temperature = match parameters.get(TEMPERATURE) {
            None => 1.0,
            Some(p) => temperature(p).map_err(bad)?,
        };
        let [input] = inputs.as_slice() else {
            return Err(bad(format!(
                "{} inputs; this model takes one, `{INPUT}`",
                inputs.len()
            )));
        };
        if input.name != INPUT {
            return Err(bad(format!(
                "input `{}`: this model's input is `{INPUT}`",
                input.name
            )));
        }
        if raw_input_contents.len() > 1 {
            return Err(bad(format!(
                "{} raw_input_contents for one input",
                raw_input_contents.len()
            )));
        }
        let x = decode_input(input, raw_input_contents.first()).map_err(|e| bad(e.to_string()))?;
        if x.dtype() == DType::I64 {
            return Err(bad(
                "input `input` is INT64; expected FP32, FP16, BF16 or UINT8".into(),
            ));
        }
        let wanted: Vec<&str> = if outputs.is_empty() {
            vec![LOGITS, PROBABILITIES, LOG_PROBABILITIES]
        } else {
            outputs.iter().map(|o| o.name.as_str()).collect()
        };
        if let Some(other) = wanted
            .iter()
            .find(|n| ![LOGITS, PROBABILITIES, LOG_PROBABILITIES].contains(n))
        {
            return Err(bad(format!(
                "no output `{other}`: this model's outputs are `{LOGITS}`, `{PROBABILITIES}` \
                 and `{LOG_PROBABILITIES}`"
            )));
        }
        let reply = self
            .teacher
            .infer_one(
                InferRequest {
                    request_id: 0,
                    inputs: Some(x.into()),
                    temperature,
                    output_dtype: distill_proto::pb::DType::from(DType::F32) as i32,
                    ..Default::default()
                },
                Protocol::Oip,
            )
            .await?;
        let logits = reply
            .logits
            .ok_or_else(|| Error::Compute("no logits".into()))
            .and_then(|t| HostTensor::try_from(t).map_err(|e| Error::Compute(e.to_string())))?;
        let shape = logits.shape().to_vec();
        let classes = shape.get(1).copied().unwrap_or(1).max(1);
        let z = logits.to_f32_vec();
        let mut response = ModelInferResponse {
            model_name,
            model_version: self.version().to_string(),
            id,
            ..Default::default()
        };
        for name in wanted {
            let values = match name {
                LOGITS => z.clone(),
                PROBABILITIES => softmax_rows(&z, classes, false),
                _ => softmax_rows(&z, classes, true),
            };
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            response.outputs.push(InferOutputTensor {
                name: name.to_string(),
                datatype: "FP32".into(),
                shape: wire_shape(&shape),
                ..Default::default()
            });
            response.raw_output_contents.push(bytes.into());
        }
        Ok(response)
    }

    fn metadata(&self) -> ModelMetadataResponse {
        let info = self.teacher.info();
        let mut input = vec![-1];
        input.extend(wire_shape(&info.input_shape));
        let output = vec![-1, i64::try_from(info.classes).unwrap_or(i64::MAX)];
        let tensor = |name: &str, datatype: &str, shape: &[i64]| TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
        };
        ModelMetadataResponse {
            name: info.member.clone(),
            versions: vec![self.version().to_string()],
            platform: PLATFORM.into(),
            inputs: vec![tensor(INPUT, "FP32", &input)],
            outputs: [LOGITS, PROBABILITIES, LOG_PROBABILITIES]
                .iter()
                .map(|n| tensor(n, "FP32", &output))
                .collect(),
        }
    }
}

/// T from a request parameter: finite and > 0 is checked by the teacher's own validation.
fn temperature(p: &InferParameter) -> Result<f32, String> {
    match &p.parameter_choice {
        Some(ParameterChoice::DoubleParam(v)) => Ok(*v as f32),
        Some(ParameterChoice::Int64Param(v)) => Ok(*v as f32),
        Some(ParameterChoice::Uint64Param(v)) => Ok(*v as f32),
        Some(ParameterChoice::StringParam(s)) => s
            .trim()
            .parse::<f32>()
            .map_err(|_| format!("parameter `{TEMPERATURE}` = {s:?} is not a number")),
        Some(ParameterChoice::BoolParam(_)) | None => Err(format!(
            "parameter `{TEMPERATURE}` must be a number (double, int64 or string)"
        )),
    }
}

/// Row-wise softmax (or log-softmax) of finite logits, in f64 so probabilities of the
/// largest classes keep f32 precision.
fn softmax_rows(z: &[f32], classes: usize, log: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(z.len());
    for row in z.chunks(classes) {
        let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row
            .iter()
            .map(|&v| (v as f64 - top).exp())
            .sum::<f64>()
            .ln()
            + top;
        out.extend(row.iter().map(|&v| {
            let lp = v as f64 - lse;
            (if log { lp } else { lp.exp() }) as f32
        }));
    }
    out
}

#[tonic::async_trait]
impl GrpcInferenceService for OipService {
    async fn server_live(
        &self,
        _req: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _req: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: !self.shutdown.is_cancelled(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let ready = self.check_model(&r.name, &r.version).is_ok() && !self.shutdown.is_cancelled();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _req: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "distill-teacher".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        self.check_model(&r.name, &r.version)?;
        Ok(Response::new(self.metadata()))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        match OipService::model_infer(self, req.into_inner()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(status) => {
                self.teacher.count_refusal(Protocol::Oip, &status);
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_sum_to_one_and_log_matches() {
        let z = [1.0f32, 2.0, 3.0, -50.0, 0.0, 50.0];
        let p = softmax_rows(&z, 3, false);
        let lp = softmax_rows(&z, 3, true);
        for r in p.chunks(3) {
            assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{r:?}");
        }
        for (a, b) in p.iter().zip(&lp) {
            if a.is_normal() {
                assert!((a.ln() - b).abs() < 1e-4, "{a} {b}");
            }
        }
        // Where the probability is subnormal (e^-100), its log keeps the precision.
        assert!(
            !p[3].is_normal() && (lp[3] + 100.0).abs() < 1e-4,
            "{}",
            lp[3]
        );
        // Differences of log-probabilities are the logits' differences.
        assert!(((lp[2] - lp[0]) - 2.0).abs() < 1e-6);
    }

    #[test]
    fn temperature_parameters_of_every_numeric_kind() {
        let p = |c| InferParameter {
            parameter_choice: Some(c),
        };
        assert_eq!(temperature(&p(ParameterChoice::DoubleParam(2.5))), Ok(2.5));
        assert_eq!(temperature(&p(ParameterChoice::Int64Param(4))), Ok(4.0));
        assert_eq!(
            temperature(&p(ParameterChoice::StringParam(" 20 ".into()))),
            Ok(20.0)
        );
        assert!(
            temperature(&p(ParameterChoice::StringParam("hot".into())))
                .unwrap_err()
                .contains("not a number")
        );
        assert!(temperature(&p(ParameterChoice::BoolParam(true))).is_err());
    }
}
