//! The run config: one TOML file describing a distillation run (documented field by field in
//! `docs/config.md`; examples under `examples/`). Unknown keys and invalid values are errors
//! naming the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use distill_core::kd::Combine;
use distill_core::optim::OptimConfig;
use distill_core::settings::StudentSettings;
use distill_core::spec::{Arch, ModelSpec};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Data source: `mnist:DIR`, `safetensors:FILE` or `synthetic[:SEED]`.
    pub data: String,
    /// Run directory (resolved config, checkpoints, metrics, report.json). Relative paths are
    /// relative to the config file's directory.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Passes over the training split.
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// Rows per batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Seed of the batch order, the student's initial weights and its dropout masks.
    #[serde(default)]
    pub seed: u64,
    /// Distillation temperature T.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the soft-target term (1 − alpha weighs the hard labels).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// How the members' soft targets combine: `mean-prob` (default) or `mean-logit`.
    #[serde(default)]
    pub combine: Combine,
    /// Soft targets on the wire (and in the cache): `f32` (default), `f16`, `bf16` or `topk:K`.
    #[serde(default, alias = "soft_target_dtype")]
    pub soft_targets: SoftTargetEncoding,
    /// Worker checkpoint every this many updates (0: at the end only).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Seconds a worker may hold a batch before it is leased again.
    #[serde(default = "default_lease_timeout")]
    pub lease_timeout_secs: f64,
    /// Batches prepared ahead per worker (soft targets requested ahead of need).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// What to do when every replica of a member is down: `wait` (default) or `degrade`.
    #[serde(default)]
    pub teacher_policy: TeacherPolicy,
    /// Deadline of one teacher request, in seconds.
    #[serde(default = "default_teacher_timeout")]
    pub teacher_timeout_secs: f64,
    /// Largest gRPC message, in MiB, on every connection.
    #[serde(default = "default_max_message_mb")]
    pub max_message_mb: usize,
    /// Workers the run waits for before it leases the first batch; more may join, and any may
    /// leave, later.
    #[serde(default = "default_min_workers")]
    pub min_workers: usize,
    /// Seconds the elected worker may take to evaluate the final student before another is
    /// elected.
    #[serde(default = "default_eval_timeout")]
    pub eval_timeout_secs: f64,
    /// Score the student on the test split at the end of every epoch (`evals.jsonl`; with
    /// `[sync]` rounds only, whose averages the coordinator holds; the report plots it).
    #[serde(default = "default_true")]
    pub eval_every_epoch: bool,
    /// Seconds a new batch stream may take to send its `Hello`.
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout_secs: f64,
    /// Seconds one message to a worker may wait for the worker to read it; a worker that stops
    /// reading for longer loses its stream (and its leases go back in line).
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_secs: f64,
    /// Parameter averaging between workers (`[sync]`).
    #[serde(default)]
    pub sync: SyncConfig,
    /// The soft-target cache (`[cache]`; none by default).
    #[serde(default)]
    pub cache: Option<crate::store::cache::CacheConfig>,
    /// The student.
    pub student: StudentConfig,
    /// Optimizer, schedule and clipping of the student.
    #[serde(default)]
    pub optim: OptimConfig,
    /// The teacher ensemble (at least one member, except for an offline run from a cache).
    #[serde(default)]
    pub members: Vec<MemberConfig>,
    /// Leases of registered replicas, health checks and probes (`[membership]`).
    #[serde(default)]
    pub membership: MembershipSettings,
    /// The transfer set the student is distilled on (`[transfer]`; default: `data`'s train
    /// split). See [`crate::transfer`].
    #[serde(default)]
    pub transfer: Option<crate::transfer::Selection>,
    /// The split the student is scored on (`[eval]`; default: `data`'s test split).
    #[serde(default)]
    pub eval: Option<crate::transfer::Selection>,
    /// How a token source (`text:PATH`, `grammar[:SEED]`) becomes windows (`[lm]`; defaults
    /// when the data is a token source and the section is absent).
    #[serde(default)]
    pub lm: Option<LmConfig>,
}

/// A language-model run's data (`[lm]`): see [`distill_core::data::tokens`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmConfig {
    /// Input tokens per window (a row holds one more: the last target).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// The tokenizer of a `text:` source: a `tokenizer.json` or a `.gguf` file (relative to
    /// the config file). The grammar has its own.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Share of the windows kept for validation (the last ones), in [0, 1).
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Sentences of a `grammar` source.
    #[serde(default = "default_sentences")]
    pub sentences: usize,
}

/// Longest `lm.seq_len` accepted (a window's logits are `seq_len × vocabulary` floats).
pub const MAX_SEQ_LEN: usize = 1 << 16;

fn default_seq_len() -> usize {
    distill_core::data::tokens::TokenOptions::default().seq_len
}
fn default_validation_fraction() -> f64 {
    distill_core::data::tokens::TokenOptions::default().validation_fraction
}
fn default_sentences() -> usize {
    distill_core::data::tokens::TokenOptions::default().sentences
}

impl Default for LmConfig {
    fn default() -> Self {
        Self {
            seq_len: default_seq_len(),
            tokenizer: None,
            validation_fraction: default_validation_fraction(),
            sentences: default_sentences(),
        }
    }
}

impl LmConfig {
    /// The loader's options.
    pub fn token_options(&self) -> distill_core::data::tokens::TokenOptions {
        distill_core::data::tokens::TokenOptions {
            seq_len: self.seq_len,
            tokenizer: self.tokenizer.clone(),
            validation_fraction: self.validation_fraction,
            sentences: self.sentences,
        }
    }
}

/// Elastic membership and replica health (`[membership]`): maps to
/// [`crate::domain::membership::MembershipConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipSettings {
    /// Lease of a registered replica, in seconds: removed after this long without a heartbeat.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: f64,
    /// Heartbeat period asked of registered replicas, in seconds (below `lease_ttl_secs`).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: f64,
    /// Consecutive failed requests that take a replica out of rotation.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Delay before the first probe of a replica out of rotation, in seconds.
    #[serde(default = "default_probe_initial")]
    pub probe_initial_secs: f64,
    /// Longest delay between two probes, in seconds.
    #[serde(default = "default_probe_max")]
    pub probe_max_secs: f64,
    /// Send a second copy of a teacher request that outlived the member's hedge delay to
    /// another replica, and take the first answer.
    #[serde(default = "default_true")]
    pub hedge: bool,
    /// Most replicas a member may have, static and registered together.
    #[serde(default = "default_max_replicas")]
    pub max_replicas_per_member: usize,
    /// A new registration enters rotation only once its answers to a few rows of the data
    /// agree with a trusted replica's (a static endpoint or a `trusted` address of its member).
    #[serde(default = "default_true")]
    pub canary: bool,
    /// Largest difference of logits (at T = 1, each row shifted so its top logit is 0)
    /// between a registration and the trusted replica on the canary rows.
    #[serde(default = "default_canary_tolerance")]
    pub canary_tolerance: f32,
    /// For a member with no static endpoint and no trusted address: trust its first
    /// registration (while no admitted replica is present) and check later ones against the
    /// admitted ones. When false, such a member refuses every registration.
    #[serde(default = "default_true")]
    pub trust_first_registration: bool,
    /// How often each `dns://` endpoint is resolved again, in seconds: replicas appear and
    /// disappear with the name's addresses (a Deployment scaled behind a headless Service).
    #[serde(default = "default_dns_refresh")]
    pub dns_refresh_secs: f64,
    /// Resolve `dns://` names from this file, in `/etc/hosts` format (`ADDRESS NAME…` per
    /// line, read again at every refresh), instead of the system resolver: for air-gapped
    /// set-ups and tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_hosts_file: Option<PathBuf>,
}

fn default_dns_refresh() -> f64 {
    10.0
}

fn default_canary_tolerance() -> f32 {
    0.05
}

fn default_max_replicas() -> usize {
    64
}

fn default_true() -> bool {
    true
}

impl Default for MembershipSettings {
    fn default() -> Self {
        Self {
            lease_ttl_secs: default_lease_ttl(),
            heartbeat_secs: default_heartbeat(),
            failure_threshold: default_failure_threshold(),
            probe_initial_secs: default_probe_initial(),
            probe_max_secs: default_probe_max(),
            hedge: true,
            max_replicas_per_member: default_max_replicas(),
            canary: true,
            canary_tolerance: default_canary_tolerance(),
            trust_first_registration: true,
            dns_refresh_secs: default_dns_refresh(),
            dns_hosts_file: None,
        }
    }
}

impl MembershipSettings {
    /// The state machine's tunables (the rest at their defaults; probe jitter seeded with
    /// `seed`).
    pub fn to_config(&self, seed: u64) -> crate::domain::membership::MembershipConfig {
        crate::domain::membership::MembershipConfig {
            lease_ttl: Duration::from_secs_f64(self.lease_ttl_secs),
            heartbeat_interval: Duration::from_secs_f64(self.heartbeat_secs),
            failure_threshold: self.failure_threshold,
            probe_initial: Duration::from_secs_f64(self.probe_initial_secs),
            probe_max: Duration::from_secs_f64(self.probe_max_secs),
            hedge: self.hedge,
            max_replicas_per_member: self.max_replicas_per_member,
            canary: self.canary,
            canary_tolerance: self.canary_tolerance,
            trust_first_registration: self.trust_first_registration,
            seed: seed ^ crate::domain::membership::MembershipConfig::default().seed,
            ..Default::default()
        }
    }
}

/// The student network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    /// Architecture string, e.g. `mlp:784-800-800-10` (empty with `init`).
    #[serde(default)]
    pub arch: String,
    /// Dropout on hidden layers.
    #[serde(default)]
    pub dropout: f32,
    /// Dropout on the input.
    #[serde(default)]
    pub input_dropout: f32,
    /// `f32` (default) or `bf16` (bf16 forward/backward with f32 master weights; meant for
    /// CUDA, slower on the CPU).
    #[serde(default)]
    pub precision: distill_core::model::Precision,
    /// A language-model student's initial weights: a `.gguf` file or a Hugging Face directory
    /// (relative to the config file; readable by every worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// The decoder layers of `init` the student keeps, renumbered from 0 (all by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_layers: Option<Vec<usize>>,
}

/// One ensemble member: a model served by one or more replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Member name (as the replicas' `--member`).
    pub name: String,
    /// Static replica addresses, e.g. `http://10.0.0.5:50051` (may be empty: a member served
    /// only by replicas that register with the coordinator).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Weight of this member in the combination (> 0; renormalised).
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Addresses whose registrations are trusted as they are (`http(s)://host:port`): they
    /// enter rotation at once and, with the static endpoints, are what every other
    /// registration's canary answers are compared with (`[membership] canary`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted: Vec<String>,
    /// What the replicas speak: `distill` (our teacher servers, default) or `oip` (the Open
    /// Inference Protocol, KServe v2 / Triton; see the fields below and
    /// `coordinator::teachers::wire`).
    #[serde(default, skip_serializing_if = "MemberProtocol::is_distill")]
    pub protocol: MemberProtocol,
    /// OIP: the model's name on the servers (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// OIP: the model version to ask for (default: the server's choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// OIP: the input tensor's name (default `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_name: Option<String>,
    /// OIP: the input's datatype, `FP32` (default), `FP16`, `BF16` or `UINT8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_datatype: Option<String>,
    /// OIP: the output tensor to ask for (default `logits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_name: Option<String>,
    /// OIP: what that output holds (default `logits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputHolds>,
    /// OIP: the operator's name for the model's current weights, part of the soft-target
    /// cache key (OIP states no weights digest). A read-write cache needs it or a
    /// `model_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl MemberConfig {
    /// The endpoints that are one replica each (all but the `dns://` ones, which stand for
    /// the addresses their name resolves to: [`crate::discovery`]).
    pub fn static_endpoints(&self) -> impl Iterator<Item = &String> {
        self.endpoints
            .iter()
            .filter(|e| crate::discovery::DnsName::parse(e).is_none())
    }
}

impl Default for MemberConfig {
    /// A native member with no name, no endpoints and weight 1 (fill in the rest).
    fn default() -> Self {
        Self {
            name: String::new(),
            endpoints: Vec::new(),
            weight: default_weight(),
            trusted: Vec::new(),
            protocol: MemberProtocol::Distill,
            model_name: None,
            model_version: None,
            input_name: None,
            input_datatype: None,
            output_name: None,
            output: None,
            identity: None,
        }
    }
}

/// The protocol a member's replicas speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemberProtocol {
    /// `distill.v1.Teacher`.
    #[default]
    Distill,
    /// `inference.GRPCInferenceService` (Open Inference Protocol).
    Oip,
}

impl MemberProtocol {
    fn is_distill(&self) -> bool {
        *self == MemberProtocol::Distill
    }
}

/// What an OIP member's output tensor holds; the coordinator turns it into z/T.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputHolds {
    /// Logits z: z/T.
    Logits,
    /// Probabilities p (softmax(z)): ln p / T.
    Probabilities,
    /// Log-probabilities: log p / T.
    LogProbabilities,
}

/// An OIP member's model, its defaults filled in ([`MemberConfig::oip`]).
#[derive(Debug, Clone, PartialEq)]
pub struct OipMember {
    /// The model's name on the servers.
    pub model_name: String,
    /// The version asked for (None: the server's choice).
    pub model_version: Option<String>,
    /// The input tensor's name.
    pub input_name: String,
    /// The input's datatype name, as configured (validated by [`RunConfig::validate`]).
    pub input_datatype: String,
    /// The output tensor asked for.
    pub output_name: String,
    /// What it holds.
    pub output: OutputHolds,
    /// The operator's identity string.
    pub identity: Option<String>,
}

impl OipMember {
    /// The input's element type (FP32 when the configured name is unknown; validation refuses
    /// such a config before any request).
    pub fn datatype(&self) -> distill_proto::DType {
        distill_proto::oip::parse_datatype(&self.input_datatype)
            .unwrap_or(distill_proto::DType::F32)
    }

    /// `model@version` (or the bare name), as the run reports the member's model.
    pub fn model_id(&self) -> String {
        match &self.model_version {
            Some(v) => format!("{}@{v}", self.model_name),
            None => self.model_name.clone(),
        }
    }

    /// What stands for a weights digest (the membership pins it; the cache keys on it).
    pub fn identity_key(&self) -> String {
        format!(
            "oip:{}:{}:{}",
            self.model_name,
            self.model_version.as_deref().unwrap_or(""),
            self.identity.as_deref().unwrap_or("")
        )
    }
}

impl MemberConfig {
    /// The OIP model of an OIP member, defaults filled in; None for a native member.
    pub fn oip(&self) -> Option<OipMember> {
        if self.protocol != MemberProtocol::Oip {
            return None;
        }
        Some(OipMember {
            model_name: self.model_name.clone().unwrap_or_default(),
            model_version: self.model_version.clone(),
            input_name: self.input_name.clone().unwrap_or_else(|| "input".into()),
            input_datatype: self.input_datatype.clone().unwrap_or_else(|| "FP32".into()),
            output_name: self.output_name.clone().unwrap_or_else(|| "logits".into()),
            output: self.output.unwrap_or(OutputHolds::Logits),
            identity: self.identity.clone(),
        })
    }
}

/// Synchronisation rounds: workers average their parameters every `every` local updates (see
/// `coordinator::sync` for the semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Local updates between rounds (1: synchronous data parallelism; 0: no rounds, so with
    /// several workers the final student is only the evaluating worker's).
    #[serde(default = "default_sync_every")]
    pub every: u64,
    /// Element type of parameters on the wire: `f32` (default), `bf16` or `f16`.
    #[serde(default)]
    pub dtype: ParamDtype,
    /// Largest payload of parameter values per message, in bytes.
    #[serde(default = "default_sync_chunk_bytes")]
    pub chunk_bytes: usize,
    /// Seconds a round waits for every live worker before it closes without the missing ones.
    #[serde(default = "default_round_timeout")]
    pub round_timeout_secs: f64,
    /// Shortest time between two commit points of the run state (`state.redb`): a restarted
    /// coordinator redoes at most this much training. 0: at every round.
    #[serde(default = "default_state_every")]
    pub state_every_secs: f64,
    /// Step size on the averaged change of a round with several contributors: the new
    /// parameters are `previous + outer_lr × (average − previous)`. 1 (default): plain
    /// averaging. N (the number of workers): the workers' changes are summed, as if their
    /// updates had been made one after another — with short rounds (`every` ≤ 10) this recovers
    /// most of what averaging loses at equal epochs; with long rounds it diverges.
    #[serde(default = "default_outer_lr")]
    pub outer_lr: f64,
    /// Momentum of the outer optimizer, in [0, 1). 0 (default): none, the step above. Above 0:
    /// the round's averaged change is a pseudo-gradient for Nesterov momentum SGD, as in
    /// DiLoCo (Douillard et al. 2023: `outer_lr = 0.7`, `outer_momentum = 0.9`): the momentum
    /// is kept by the coordinator, written with every commit point and restored on resume.
    #[serde(default)]
    pub outer_momentum: f64,
    /// How batches reach the workers of a run with rounds: `fixed` (default) or `free`.
    #[serde(default)]
    pub schedule: SyncSchedule,
    /// What a round averages: `parameters` (default: local SGD, every `every` updates) or
    /// `gradients` (synchronous data parallelism: needs `every = 1`, the fixed schedule and no
    /// outer optimizer; the coordinator steps the student's own optimizer on the rows-weighted
    /// average of each round's gradients, so N workers give the student one worker would
    /// train with N times the batch).
    #[serde(default)]
    pub average: SyncAverage,
}

/// What a synchronisation round averages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncAverage {
    /// The workers' parameters after their local updates (then the outer step).
    #[default]
    Parameters,
    /// Each batch's gradients, for one optimizer step the coordinator takes.
    Gradients,
}

/// How a run with synchronisation rounds hands batches to its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncSchedule {
    /// Reproducible: each round takes `every` batches from each of its workers, assigned in
    /// turn from the run's seeded order when the round starts, so the student depends on the
    /// seed and the number of workers, never on timing.
    #[default]
    Fixed,
    /// Whoever has room takes the next batch; rounds hold whatever each worker trained. Faster
    /// when workers differ in speed, but the student depends on scheduling.
    Free,
}

fn default_outer_lr() -> f64 {
    1.0
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            every: default_sync_every(),
            dtype: ParamDtype::default(),
            chunk_bytes: default_sync_chunk_bytes(),
            round_timeout_secs: default_round_timeout(),
            state_every_secs: default_state_every(),
            outer_lr: default_outer_lr(),
            outer_momentum: 0.0,
            schedule: SyncSchedule::default(),
            average: SyncAverage::default(),
        }
    }
}

/// Element type of parameters in synchronisation rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamDtype {
    /// Exact.
    #[default]
    F32,
    /// Half the bytes; 8 bits of mantissa.
    Bf16,
    /// Half the bytes; 11 bits of mantissa, range ±65504.
    F16,
}

impl ParamDtype {
    /// The wire dtype.
    pub fn wire(self) -> distill_proto::DType {
        match self {
            ParamDtype::F32 => distill_proto::DType::F32,
            ParamDtype::Bf16 => distill_proto::DType::BF16,
            ParamDtype::F16 => distill_proto::DType::F16,
        }
    }
}

/// What the run does while every replica of a member is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherPolicy {
    /// Pause the batches that need it, retry with backoff, resume when a replica is back.
    #[default]
    Wait,
    /// Combine the members that answer (weights renormalised) and record on each batch which
    /// members contributed; such batches are counted (`degraded_batches`) and never cached.
    Degrade,
}

/// How soft targets travel (and are cached): owned by `distill-core`, so the coordinator's
/// encoder and the student's decoder share one definition.
pub use distill_core::soft_targets::Encoding as SoftTargetEncoding;

fn default_run_dir() -> PathBuf {
    PathBuf::from("runs/run")
}
fn default_epochs() -> u32 {
    10
}
fn default_batch() -> usize {
    128
}
fn default_temperature() -> f64 {
    4.0
}
fn default_alpha() -> f64 {
    0.9
}
fn default_lease_timeout() -> f64 {
    60.0
}
fn default_prefetch() -> usize {
    8
}
fn default_teacher_timeout() -> f64 {
    30.0
}
fn default_max_message_mb() -> usize {
    64
}
fn default_weight() -> f32 {
    1.0
}
fn default_min_workers() -> usize {
    1
}
fn default_eval_timeout() -> f64 {
    600.0
}
fn default_hello_timeout() -> f64 {
    10.0
}
fn default_stall_timeout() -> f64 {
    120.0
}

/// The longest duration a config may name, in seconds (about 31 years): long enough for any
/// run, short enough that adding it to an instant cannot overflow.
pub const MAX_SECS: f64 = 1e9;
fn default_sync_every() -> u64 {
    10
}
fn default_sync_chunk_bytes() -> usize {
    4 << 20
}
fn default_round_timeout() -> f64 {
    30.0
}
fn default_state_every() -> f64 {
    5.0
}
fn default_lease_ttl() -> f64 {
    10.0
}
fn default_heartbeat() -> f64 {
    2.0
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_probe_initial() -> f64 {
    0.25
}
fn default_probe_max() -> f64 {
    30.0
}

impl RunConfig {
    /// Parses TOML text; unknown keys and bad values are errors naming the key.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: RunConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config file; a relative `run_dir` is resolved against the file's directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let mut cfg = Self::from_toml(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        if let Some(dir) = path.parent() {
            if cfg.run_dir.is_relative() {
                cfg.run_dir = dir.join(&cfg.run_dir);
            }
            if let Some(c) = cfg.cache.as_mut()
                && c.dir.is_relative()
            {
                c.dir = dir.join(&c.dir);
            }
            if let Some(h) = cfg.membership.dns_hosts_file.as_mut()
                && h.is_relative()
            {
                *h = dir.join(&*h);
            }
            if let Some(t) = cfg.lm.as_mut().and_then(|l| l.tokenizer.as_mut())
                && t.is_relative()
            {
                *t = dir.join(&*t);
            }
            if let Some(i) = cfg.student.init.as_mut()
                && i.is_relative()
            {
                *i = dir.join(&*i);
            }
        }
        Ok(cfg)
    }

    /// The protocol fields of member `i`: OIP ones only on an OIP member, which needs a model
    /// name, static endpoints and a known input datatype, and (with a read-write cache) a
    /// version or an identity, so that a silently replaced production model never meets its
    /// predecessor's cached soft targets.
    fn validate_protocol(&self, i: usize, m: &MemberConfig) -> Result<()> {
        let bad =
            |key: &str, msg: String| Err(Error::Config(format!("`members[{i}].{key}`: {msg}")));
        let Some(oip) = m.oip() else {
            for (key, set) in [
                ("model_name", m.model_name.is_some()),
                ("model_version", m.model_version.is_some()),
                ("input_name", m.input_name.is_some()),
                ("input_datatype", m.input_datatype.is_some()),
                ("output_name", m.output_name.is_some()),
                ("output", m.output.is_some()),
                ("identity", m.identity.is_some()),
            ] {
                if set {
                    return bad(
                        key,
                        "only an OIP member (`protocol = \"oip\"`) has it".into(),
                    );
                }
            }
            return Ok(());
        };
        if oip.model_name.is_empty() {
            return bad(
                "model_name",
                "an OIP member needs the model's name on its servers".into(),
            );
        }
        if m.endpoints.is_empty() {
            return bad(
                "endpoints",
                "an OIP member needs static endpoints (OIP servers do not register)".into(),
            );
        }
        if !m.trusted.is_empty() {
            return bad(
                "trusted",
                "OIP members take no registrations to trust".into(),
            );
        }
        match distill_proto::oip::parse_datatype(&oip.input_datatype) {
            Some(d) if d != distill_proto::DType::I64 => {}
            _ => {
                return bad(
                    "input_datatype",
                    format!(
                        "`{}` is not one of FP32, FP16, BF16, UINT8",
                        oip.input_datatype
                    ),
                );
            }
        }
        let read_write = self
            .cache
            .as_ref()
            .is_some_and(|c| c.mode == crate::store::cache::CacheMode::ReadWrite);
        if read_write && oip.model_version.is_none() && oip.identity.is_none() {
            return bad(
                "identity",
                format!(
                    "member `{}` is an OIP model with neither `model_version` nor `identity`, \
                     and the run writes the soft-target cache: OIP states no weights digest, so \
                     a model replaced under the same name would be mixed with its \
                     predecessor's cached targets. Pin a `model_version`, or name the weights \
                     in `identity` (and change it when they change)",
                    m.name
                ),
            );
        }
        Ok(())
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        fn bad<T>(key: &str, msg: String) -> Result<T> {
            Err(Error::Config(format!("`{key}`: {msg}")))
        }
        let source = self
            .data
            .parse::<distill_core::data::DataSource>()
            .or_else(|e| bad("data", e.to_string()))?;
        self.validate_lm(&source)?;
        let offline = self
            .cache
            .as_ref()
            .is_some_and(|c| c.mode == crate::store::cache::CacheMode::Offline);
        if self.members.is_empty() && !offline {
            return bad(
                "members",
                "at least one teacher member is needed (or a `[cache]` in mode \"offline\")".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.name.is_empty() || !names.insert(m.name.as_str()) {
                return bad(
                    &format!("members[{i}].name"),
                    format!("`{}` is empty or repeated", m.name),
                );
            }
            for e in &m.endpoints {
                if let Some(dns) = crate::discovery::DnsName::parse(e) {
                    if let Err(why) = dns {
                        return bad(&format!("members[{i}].endpoints"), why);
                    }
                    continue;
                }
                if tonic::transport::Endpoint::from_shared(e.clone()).is_err()
                    || crate::domain::address::normalize_address(e).is_err()
                {
                    return bad(
                        &format!("members[{i}].endpoints"),
                        format!("`{e}` is not a URL like http://host:port or dns://name:port"),
                    );
                }
            }
            for t in &m.trusted {
                if crate::domain::address::normalize_address(t).is_err() {
                    return bad(
                        &format!("members[{i}].trusted"),
                        format!("`{t}` is not an address like http://host:port"),
                    );
                }
            }
            if !m.weight.is_finite() || m.weight <= 0.0 {
                return bad(
                    &format!("members[{i}].weight"),
                    format!("must be finite and > 0, got {}", m.weight),
                );
            }
            self.validate_protocol(i, m)?;
        }
        if self.transfer.as_ref().is_some_and(|t| !t.labels) && self.alpha != 1.0 {
            return bad(
                "transfer.labels",
                format!(
                    "an unlabelled transfer set has no hard labels to weigh: set alpha = 1 (got {})",
                    self.alpha
                ),
            );
        }
        if self.eval.as_ref().is_some_and(|e| !e.labels) {
            return bad(
                "eval.labels",
                "the evaluation split is scored against its labels: it cannot be unlabelled".into(),
            );
        }
        for (key, v) in [
            ("lease_timeout_secs", self.lease_timeout_secs),
            ("teacher_timeout_secs", self.teacher_timeout_secs),
            ("eval_timeout_secs", self.eval_timeout_secs),
            ("hello_timeout_secs", self.hello_timeout_secs),
            ("stall_timeout_secs", self.stall_timeout_secs),
        ] {
            if !v.is_finite() || v <= 0.0 || v > MAX_SECS {
                return bad(
                    key,
                    format!("must be finite, > 0 and at most {MAX_SECS}, got {v}"),
                );
            }
        }
        let t = self.temperature as f32;
        if !self.temperature.is_finite() || !t.is_normal() || t <= 0.0 || t > 1e6 {
            return bad(
                "temperature",
                format!(
                    "must be > 0 and at most 1e6 (as f32), got {}",
                    self.temperature
                ),
            );
        }
        if self.max_message_mb > 4096 {
            return bad(
                "max_message_mb",
                format!("must be at most 4096, got {}", self.max_message_mb),
            );
        }
        if !self.sync.round_timeout_secs.is_finite()
            || self.sync.round_timeout_secs <= 0.0
            || self.sync.round_timeout_secs >= self.lease_timeout_secs
        {
            return bad(
                "sync.round_timeout_secs",
                format!(
                    "must be > 0 and below lease_timeout_secs ({}): a worker waiting in a round \
                     holds its leases; got {}",
                    self.lease_timeout_secs, self.sync.round_timeout_secs
                ),
            );
        }
        if self.sync.chunk_bytes < 1024
            || self.sync.chunk_bytes.saturating_add(64 << 10) > self.max_message_bytes()
        {
            return bad(
                "sync.chunk_bytes",
                format!(
                    "must be at least 1024 and at least 64 KiB below max_message_mb; got {}",
                    self.sync.chunk_bytes
                ),
            );
        }
        let ms = &self.membership;
        for (key, v) in [
            ("membership.lease_ttl_secs", ms.lease_ttl_secs),
            ("membership.heartbeat_secs", ms.heartbeat_secs),
            ("membership.probe_initial_secs", ms.probe_initial_secs),
            ("membership.probe_max_secs", ms.probe_max_secs),
            ("membership.dns_refresh_secs", ms.dns_refresh_secs),
        ] {
            if !v.is_finite() || v <= 0.0 || v > 1e6 {
                return bad(key, format!("must be finite, > 0 and at most 1e6, got {v}"));
            }
        }
        if ms.heartbeat_secs >= ms.lease_ttl_secs {
            return bad(
                "membership.heartbeat_secs",
                format!(
                    "must be below membership.lease_ttl_secs ({}), got {}",
                    ms.lease_ttl_secs, ms.heartbeat_secs
                ),
            );
        }
        if ms.probe_max_secs < ms.probe_initial_secs {
            return bad(
                "membership.probe_max_secs",
                format!(
                    "must be at least membership.probe_initial_secs ({}), got {}",
                    ms.probe_initial_secs, ms.probe_max_secs
                ),
            );
        }
        if ms.failure_threshold == 0 {
            return bad("membership.failure_threshold", "must be at least 1".into());
        }
        if !ms.canary_tolerance.is_finite() || ms.canary_tolerance < 0.0 {
            return bad(
                "membership.canary_tolerance",
                format!("must be finite and >= 0, got {}", ms.canary_tolerance),
            );
        }
        if ms.max_replicas_per_member == 0 {
            return bad(
                "membership.max_replicas_per_member",
                "must be at least 1".into(),
            );
        }
        if !self.sync.outer_lr.is_finite() || self.sync.outer_lr <= 0.0 || self.sync.outer_lr > 64.0
        {
            return bad(
                "sync.outer_lr",
                format!("must be in (0, 64], got {}", self.sync.outer_lr),
            );
        }
        if !self.sync.outer_momentum.is_finite() || !(0.0..1.0).contains(&self.sync.outer_momentum)
        {
            return bad(
                "sync.outer_momentum",
                format!("must be in [0, 1), got {}", self.sync.outer_momentum),
            );
        }
        if self.sync.average == SyncAverage::Gradients {
            let why = if self.sync.every != 1 {
                Some(format!("needs sync.every = 1, got {}", self.sync.every))
            } else if self.sync.schedule != SyncSchedule::Fixed {
                Some("needs sync.schedule = \"fixed\"".to_string())
            } else if self.sync.outer_lr != 1.0 || self.sync.outer_momentum != 0.0 {
                Some(
                    "takes no outer optimizer: leave sync.outer_lr = 1 and sync.outer_momentum = 0"
                        .to_string(),
                )
            } else {
                None
            };
            if let Some(why) = why {
                return bad("sync.average", format!("\"gradients\" {why}"));
            }
        }
        if !self.sync.state_every_secs.is_finite()
            || self.sync.state_every_secs < 0.0
            || self.sync.state_every_secs > MAX_SECS
        {
            return bad(
                "sync.state_every_secs",
                format!(
                    "must be finite and >= 0, got {}",
                    self.sync.state_every_secs
                ),
            );
        }
        if self.min_workers == 0 {
            return bad("min_workers", "must be at least 1".into());
        }
        let max_prefetch = crate::driver::context::MAX_CREDITS as usize;
        if self.prefetch == 0 || self.prefetch > max_prefetch {
            return bad(
                "prefetch",
                format!("must be 1 to {max_prefetch}, got {}", self.prefetch),
            );
        }
        if self.max_message_mb == 0 {
            return bad("max_message_mb", "must be at least 1".into());
        }
        self.student_arch()?;
        self.student_settings()?
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(())
    }

    /// Whether the run distils a language model (its data is a token source).
    pub fn is_lm(&self) -> bool {
        matches!(
            self.data.parse::<distill_core::data::DataSource>(),
            Ok(distill_core::data::DataSource::Text(_)
                | distill_core::data::DataSource::Grammar { .. })
        )
    }

    /// The `[lm]` section of a run on a token source: the one given or the defaults.
    pub fn lm_options(&self) -> Option<LmConfig> {
        self.is_lm().then(|| self.lm.clone().unwrap_or_default())
    }

    /// A language-model run's constraints: a token source with a llama student, top-k soft
    /// targets, and (for now) one member, no cache and no transfer or evaluation selection.
    fn validate_lm(&self, source: &distill_core::data::DataSource) -> Result<()> {
        fn bad<T>(key: &str, msg: String) -> Result<T> {
            Err(Error::Config(format!("`{key}`: {msg}")))
        }
        let tokens = self.is_lm();
        if !tokens {
            if self.lm.is_some() {
                return bad(
                    "lm",
                    format!("{source} is not a token source (text:PATH or grammar[:SEED])"),
                );
            }
            return Ok(());
        }
        let lm = self.lm.clone().unwrap_or_default();
        if lm.seq_len == 0 || lm.seq_len > MAX_SEQ_LEN {
            return bad(
                "lm.seq_len",
                format!("must be 1 to {MAX_SEQ_LEN}, got {}", lm.seq_len),
            );
        }
        if !(0.0..1.0).contains(&lm.validation_fraction) {
            return bad(
                "lm.validation_fraction",
                format!("must be in [0, 1), got {}", lm.validation_fraction),
            );
        }
        if !matches!(self.soft_targets, SoftTargetEncoding::TopK(_)) {
            return bad(
                "soft_targets",
                format!(
                    "a language model's teachers answer top-k rows: use \"topk:K\", not \"{}\"",
                    self.soft_targets
                ),
            );
        }
        if self.members.len() > 1 {
            return bad(
                "members",
                "a language-model run takes one member for now (combining several members' \
                 top-k rows per position is not built)"
                    .into(),
            );
        }
        for (key, set) in [
            ("transfer", self.transfer.is_some()),
            ("eval", self.eval.is_some()),
        ] {
            if set {
                return bad(
                    key,
                    "not available for a language-model run yet (its windows are the \
                     corpus's: the last `lm.validation_fraction` of them are scored)"
                        .into(),
                );
            }
        }
        if let Some(c) = &self.cache
            && c.mode == crate::store::cache::CacheMode::Offline
        {
            return bad(
                "cache.mode",
                "a language-model run reads and writes its windows' rows (read-write or \
                 read-only); offline is not available for it yet"
                    .into(),
            );
        }
        match self.student_arch()? {
            Arch::Llama(c) if lm.seq_len > c.max_position_embeddings => bad(
                "lm.seq_len",
                format!(
                    "{} is longer than the student's {} positions",
                    lm.seq_len, c.max_position_embeddings
                ),
            ),
            Arch::Llama(_) => Ok(()),
            _ => bad(
                "student.arch",
                format!(
                    "{} is a token source: the student must be a llama (llama:LAYERS-HIDDEN-VOCAB)",
                    self.data
                ),
            ),
        }
    }

    /// The student's architecture: `student.arch`, or the shape of `student.init` with its
    /// `init_layers` (reading that file's metadata).
    pub fn student_arch(&self) -> Result<Arch> {
        let s = &self.student;
        match &s.init {
            Some(path) => {
                if !s.arch.is_empty() {
                    return Err(Error::Config(
                        "`student.arch`: leave it out with `student.init` (the student takes the \
                         init's shape, with `init_layers`)"
                            .into(),
                    ));
                }
                let cfg = distill_core::lm::read_config(path, s.init_layers.as_deref())
                    .map_err(|e| Error::Config(format!("`student.init`: {e}")))?;
                Ok(Arch::Llama(cfg))
            }
            None if s.init_layers.is_some() => Err(Error::Config(
                "`student.init_layers`: needs `student.init`".into(),
            )),
            None => Arch::parse(&s.arch).map_err(|e| Error::Config(format!("`student.arch`: {e}"))),
        }
    }

    /// What the workers train with (a `student.init` without its digest yet: the coordinator
    /// fills it in when it builds the run, having read the weights).
    pub fn student_settings(&self) -> Result<StudentSettings> {
        let arch = self.student_arch()?;
        let init = self
            .student
            .init
            .as_ref()
            .map(|path| distill_core::settings::StudentInit {
                path: path.clone(),
                layers: self.student.init_layers.clone(),
                digest: String::new(),
            });
        Ok(StudentSettings {
            spec: ModelSpec {
                arch,
                dropout: self.student.dropout,
                input_dropout: self.student.input_dropout,
            },
            optim: self.optim.clone(),
            temperature: self.temperature,
            alpha: self.alpha,
            epochs: self.epochs,
            batch_size: self.batch_size,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            precision: self.student.precision,
            init,
        })
    }

    /// Largest gRPC message in bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_mb.saturating_mul(1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data = "synthetic:1"
epochs = 3
temperature = 4.0
[student]
arch = "mlp:784-32-10"
[optim]
kind = "adamw"
lr = 0.001
[[members]]
name = "big"
endpoints = ["http://127.0.0.1:5000", "http://127.0.0.1:5001"]
[[members]]
name = "wide"
endpoints = ["http://127.0.0.1:5002"]
weight = 2.0
"#;

    /// The keys a section accepts, from the parser's own refusal of an unknown one.
    fn accepted_keys(section: &str) -> std::collections::BTreeSet<String> {
        let probe = "zz_probe = 1";
        let text = match section {
            "" => format!("{probe}\n{GOOD}"),
            "student" => GOOD.replace("[student]\n", &format!("[student]\n{probe}\n")),
            "optim" => GOOD.replace("[optim]\n", &format!("[optim]\n{probe}\n")),
            "members" => GOOD.replacen("[[members]]\n", &format!("[[members]]\n{probe}\n"), 1),
            other => format!("{GOOD}\n[{other}]\n{probe}\n"),
        };
        let e = RunConfig::from_toml(&text).unwrap_err().to_string();
        let expected = e
            .split_once("expected")
            .unwrap_or_else(|| panic!("[{section}]: {e}"))
            .1;
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// The keys docs/config.md documents per section (the first backticked name of each row).
    fn documented_keys() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
        let doc = include_str!("../../docs/config.md");
        let mut out =
            std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
        let mut section = None;
        for line in doc.lines() {
            if let Some(h) = line.strip_prefix("## ") {
                section = if h.starts_with("Top level") {
                    Some(String::new())
                } else {
                    h.split('`')
                        .nth(1)
                        .map(|s| s.trim_matches(|c| c == '[' || c == ']').to_string())
                };
                continue;
            }
            if let (Some(sec), Some(row)) = (&section, line.strip_prefix("| `")) {
                let key = row.split('`').next().unwrap_or_default();
                out.entry(sec.clone()).or_default().insert(key.to_string());
            }
        }
        out
    }

    #[test]
    fn every_key_of_docs_config_md_is_a_config_key_and_every_config_key_is_documented() {
        let documented = documented_keys();
        let sections = [
            "",
            "sync",
            "cache",
            "student",
            "optim",
            "members",
            "membership",
            "transfer",
            "eval",
            "lm",
        ];
        assert_eq!(
            documented
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .len(),
            sections.len(),
            "sections in docs/config.md: {:?}",
            documented.keys().collect::<Vec<_>>()
        );
        for section in sections {
            let mut accepted = accepted_keys(section);
            if section.is_empty() {
                // The sections themselves are keys of the top level.
                for s in &sections[1..] {
                    assert!(accepted.remove(*s), "top level lacks [{s}]");
                }
                // An alias: documented in the row of `soft_targets`.
                accepted.remove("soft_target_dtype");
            }
            let docs = documented
                .get(section)
                .unwrap_or_else(|| panic!("docs/config.md has no [{section}] section"));
            assert_eq!(
                &accepted, docs,
                "[{section}]: the config accepts {accepted:?}, docs/config.md documents {docs:?}"
            );
        }
    }

    #[test]
    fn parses_a_good_config_with_defaults() {
        let c = RunConfig::from_toml(GOOD).unwrap();
        assert_eq!(c.epochs, 3);
        assert_eq!(c.batch_size, 128);
        assert_eq!(c.combine, Combine::MeanProb);
        assert_eq!(c.members[1].weight, 2.0);
        assert_eq!(c.members[0].weight, 1.0);
        let s = c.student_settings().unwrap();
        assert_eq!(s.spec.arch.to_string(), "mlp:784-32-10");
        assert_eq!(s.alpha, 0.9);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        for (edit, needle) in [
            (
                GOOD.replace("epochs = 3", "epochs = 3\nepoch = 4"),
                "unknown field `epoch`",
            ),
            (
                GOOD.replace(
                    "arch = \"mlp:784-32-10\"",
                    "arch = \"mlp:784-32-10\"\ndropuot = 0.1",
                ),
                "unknown field `dropuot`",
            ),
            (
                GOOD.replace("temperature = 4.0", "temperature = -1.0"),
                "temperature",
            ),
            (
                GOOD.replace("weight = 2.0", "weight = 0.0"),
                "members[1].weight",
            ),
            (
                GOOD.replace("\"http://127.0.0.1:5002\"", "\"http://127.0.0.1\""),
                "members[1].endpoints",
            ),
            (
                format!("{GOOD}\n[membership]\nttl = 3.0\n"),
                "unknown field `ttl`",
            ),
            (
                format!("{GOOD}\n[membership]\nlease_ttl_secs = 1.0\n"),
                "membership.heartbeat_secs",
            ),
            (
                format!("{GOOD}\n[membership]\nfailure_threshold = 0\n"),
                "membership.failure_threshold",
            ),
            (
                format!("{GOOD}\n[membership]\nprobe_max_secs = 0.1\n"),
                "membership.probe_max_secs",
            ),
            (GOOD.replace("synthetic:1", "floppy:/x"), "`data`"),
            (GOOD.replace("mlp:784-32-10", "mlp:784"), "student.arch"),
            (
                GOOD.replace("lr = 0.001", "lr = 0.001\nkind2 = 1"),
                "unknown field `kind2`",
            ),
            (GOOD.replace("epochs = 3", "epochs = \"three\""), "epochs"),
            (
                GOOD.replace("name = \"wide\"", "name = \"big\""),
                "members[1].name",
            ),
            (
                format!("{GOOD}\n[sync]\nround_timeout_secs = 90.0\n"),
                "sync.round_timeout_secs",
            ),
            (
                format!("{GOOD}\n[sync]\nchunk_bytes = 10\n"),
                "sync.chunk_bytes",
            ),
            (format!("{GOOD}\n[sync]\nouter_lr = 0.0\n"), "sync.outer_lr"),
            (format!("{GOOD}\n[sync]\nouter_lr = nan\n"), "sync.outer_lr"),
            (
                format!("{GOOD}\n[sync]\nouter_momentum = 1.0\n"),
                "sync.outer_momentum",
            ),
            (
                format!("{GOOD}\n[sync]\nevery = 5\naverage = \"gradients\"\n"),
                "sync.average",
            ),
            (
                format!("{GOOD}\n[sync]\nevery = 1\naverage = \"gradients\"\nouter_lr = 2.0\n"),
                "sync.average",
            ),
            (
                format!("{GOOD}\n[sync]\nschedule = \"sometimes\"\n"),
                "unknown variant `sometimes`, expected `fixed` or `free`",
            ),
            (
                format!("{GOOD}\n[sync]\nevry = 10\n"),
                "unknown field `evry`",
            ),
            (
                GOOD.replace("epochs = 3", "epochs = 3\nmin_workers = 0"),
                "min_workers",
            ),
            // Finite but huge values used to pass and then panic where they became a
            // `Duration` or were shifted into bytes.
            (
                GOOD.replace("epochs = 3", "epochs = 3\nlease_timeout_secs = 1e300"),
                "lease_timeout_secs",
            ),
            (
                GOOD.replace("epochs = 3", "epochs = 3\neval_timeout_secs = 1e12"),
                "eval_timeout_secs",
            ),
            (
                GOOD.replace("epochs = 3", "epochs = 3\nmax_message_mb = 1000000000000"),
                "max_message_mb",
            ),
            (
                GOOD.replace("epochs = 3", "epochs = 3\nprefetch = 100000000000"),
                "prefetch",
            ),
            (
                GOOD.replace("temperature = 4.0", "temperature = 1e-300"),
                "temperature",
            ),
        ] {
            let e = RunConfig::from_toml(&edit).unwrap_err().to_string();
            assert!(e.contains(needle), "wanted `{needle}` in: {e}");
        }
    }

    #[test]
    fn a_member_may_have_no_static_endpoints_and_membership_has_defaults() {
        let c = RunConfig::from_toml(&GOOD.replace("\"http://127.0.0.1:5002\"", "")).unwrap();
        assert!(c.members[1].endpoints.is_empty());
        assert_eq!(c.membership, MembershipSettings::default());
        let no_key = GOOD.replace("endpoints = [\"http://127.0.0.1:5002\"]\n", "");
        assert!(
            RunConfig::from_toml(&no_key).unwrap().members[1]
                .endpoints
                .is_empty()
        );
        let c = RunConfig::from_toml(&format!(
            "{GOOD}\n[membership]\nlease_ttl_secs = 4.0\nheartbeat_secs = 0.5\nfailure_threshold = 2\n"
        ))
        .unwrap();
        let m = c.membership.to_config(c.seed);
        assert_eq!(m.lease_ttl, Duration::from_secs(4));
        assert_eq!(m.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(m.failure_threshold, 2);
        assert_eq!(m.probe_initial, Duration::from_millis(250));
    }

    #[test]
    fn example_configs_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let c = RunConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(!c.members.is_empty());
                n += 1;
            }
        }
        assert!(n >= 2, "examples found: {n}");
    }

    #[test]
    fn a_transfer_set_and_an_eval_split_parse_and_round_trip() {
        let text = format!(
            "{GOOD}\n[transfer]\nsource = \"synthetic:2\"\nsplit = \"test\"\nrows = [0, 500]\n\
             [eval]\nsplit = \"train\"\n"
        );
        let c = RunConfig::from_toml(&text).unwrap();
        let t = c.transfer.clone().unwrap();
        assert_eq!(t.source.as_deref(), Some("synthetic:2"));
        assert_eq!(t.split, Some(crate::transfer::SplitName::Test));
        assert_eq!(t.rows, Some([0, 500]));
        assert!(t.labels);
        assert_eq!(
            c.eval.as_ref().unwrap().split,
            Some(crate::transfer::SplitName::Train)
        );
        // The resolved config the run writes reads back the same.
        let written = toml::to_string(&c).unwrap();
        assert_eq!(RunConfig::from_toml(&written).unwrap(), c);
    }

    #[test]
    fn an_unlabelled_transfer_set_needs_alpha_1_and_the_eval_split_needs_labels() {
        let unlabelled = format!("{GOOD}\n[transfer]\nlabels = false\n");
        let e = RunConfig::from_toml(&unlabelled).unwrap_err().to_string();
        assert!(
            e.contains("transfer.labels") && e.contains("alpha = 1"),
            "{e}"
        );
        let ok = unlabelled.replace("temperature = 4.0", "temperature = 4.0\nalpha = 1.0");
        assert!(!RunConfig::from_toml(&ok).unwrap().transfer.unwrap().labels);
        let e = RunConfig::from_toml(&format!("{GOOD}\n[eval]\nlabels = false\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("eval.labels"), "{e}");
        let e = RunConfig::from_toml(&format!("{GOOD}\n[transfer]\nsplit = \"valid\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("valid"), "{e}");
    }
}
