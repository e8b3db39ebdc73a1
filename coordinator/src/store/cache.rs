//! The soft-target cache: a write-through, on-disk store of soft-target rows, one row per
//! training sample, so that epoch 2 onwards (and later runs, and runs with no teachers at all)
//! need not ask the teachers again.
//!
//! # What is stored, and under which key
//!
//! A row is an opaque, fixed number of bytes per sample under a [`CacheKey`], which names
//! everything the row depends on. Runs write **member records** (one key per teacher: what that
//! member said, its tempered logits at the capture temperature, in the format of
//! [`super::member_records`]); the soft targets are combined from the records on every batch,
//! so one record serves any T, `combine`, member weights or subset of members. Caches written
//! before member records hold *combined* keys (the ensemble's soft targets in the run's
//! encoding); those are still read by offline runs and never written any more. A key names:
//!
//! - the data source identity (the data spec string, e.g. `synthetic:7`, and its train size) —
//!   the sample index is an index into that training split;
//! - every member, in ensemble order: its name, the SHA-256 digest of its weights
//!   (`DescribeResponse.weights_digest`) and its weight in the ensemble (raw, as configured:
//!   weights `1, 1` and `2, 2` combine to the same targets but are different keys — a miss, never a
//!   wrong hit; order matters for the same reason, floating-point sums depend on it). A member
//!   record has one member, with weight 1;
//! - the temperature T as sent to the teachers (an `f32`);
//! - the combine mode (`mean-prob`, `mean-logit`; `mean-logit` for a record);
//! - the encoding and its bytes per row (`member-logits:<format>/<classes>` for a record).
//!
//! [`CacheKey::digest`] is a SHA-256 over a versioned, length-prefixed encoding of all of these,
//! so changing any of them selects a different set of rows. The key itself is stored next to its
//! rows (as JSON, with [`CacheKey::description`] for people), so [`SoftTargetCache::keys`] can
//! list what a cache holds: a run started with no teachers (offline distillation,
//! [`CacheMode::Offline`]) picks complete records (or a complete legacy key) from that list.
//!
//! A record must hold only what its member said: a `degrade`d batch records the members that
//! answered, under their own keys, and nothing for the members that did not.
//!
//! # When the cache may be used
//!
//! Only when the soft targets of a sample are a pure function of the key and the sample index,
//! i.e. when the data pipeline that feeds the teachers is deterministic: no augmentation, no
//! jitter, no random crops, no dropout in the teachers. That holds today — the coordinator sends
//! each sample's stored pixels unchanged (`Run::inputs_and_labels`; jitter exists only in
//! supervised training of teachers, `distill train --jitter`, not on the distillation path) and
//! teacher servers run in inference mode. If the coordinator ever augments inputs, the run must
//! turn the cache off (or put the augmentation seed and epoch into the key, which makes every
//! epoch a miss). Teachers are also assumed to be deterministic: the teacher server pads every
//! forward pass so that a row's logits do not depend on what it was batched with.
//!
//! # Files, processes and concurrency
//!
//! One cache directory holds one [redb](https://docs.rs/redb) database file,
//! [`CACHE_FILE_NAME`], that can hold any number of keys (one table of rows per key digest,
//! plus a table of keys and a format marker). redb is transactional: [`SoftTargetCache::put_rows`]
//! writes a whole batch in one write transaction, so a reader (or a crash) sees all of the batch's
//! rows or none, and every commit is durable when it returns.
//!
//! A read-write cache is opened with redb's exclusive lock on the file: **one process at a time**
//! may have a cache directory open read-write, and while it does, no other process can open it at
//! all. A second open fails at once with [`CacheError::Locked`] naming the file; it does not wait.
//! Runs that must share a cache concurrently open it read-only ([`CacheMode::ReadOnly`] or
//! [`CacheMode::Offline`]): any number of read-only opens may share the file, as long as no
//! process has it open read-write. Inside one process, open the cache once and clone the handle
//! ([`SoftTargetCache`] is `Send + Sync`; a clone shares the database and the counters).
//!
//! A read-write open checks the whole file's integrity (every page checksum) before it is
//! used, so a corrupt or truncated file is refused with [`CacheError::Corrupt`] naming the file
//! rather than trusted; delete the file to start afresh. An empty (0-byte) file is a new, empty
//! cache. A read-only open cannot repair or check a file; it refuses a file that was not closed
//! cleanly ([`CacheError::NeedsRepair`]: open it read-write once).
//!
//! # Calling it from async code
//!
//! Every method does blocking file I/O; the coordinator calls it from `spawn_blocking`:
//!
//! ```no_run
//! # async fn f(cache: coordinator::cache::SoftTargetCache, key: coordinator::cache::CacheKey,
//! #            samples: Vec<usize>) -> coordinator::Result<()> {
//! let c = cache.clone();
//! let hit = tokio::task::spawn_blocking(move || c.get_batch(&key, &samples))
//!     .await
//!     .map_err(|e| coordinator::Error::Internal(format!("cache task: {e}")))??;
//! # let _ = hit; Ok(()) }
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use distill_core::kd::Combine;
use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::member_records::RecordFormat;

/// Name of the database file inside a cache directory.
pub const CACHE_FILE_NAME: &str = "soft-targets.redb";

/// What the `meta` table's `format` entry holds in every soft-target cache.
const FORMAT: &str = "distill-soft-target-cache";
/// Version of the file layout (tables and their types); also hashed into every key digest.
const FORMAT_VERSION: &str = "1";

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Key digest (hex) → the key as JSON.
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("keys");
/// Prefix of the row tables: `rows/<key digest>`, sample index → row bytes.
const ROWS_PREFIX: &str = "rows/";

/// The cache section of a run config (to be embedded as `[cache]` in the run config).
///
/// ```toml
/// [cache]
/// dir = "cache/mnist-big-conv"   # relative paths: relative to the config file's directory
/// mode = "read-write"            # or "read-only", "offline"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory of the cache; it holds one database file, [`CACHE_FILE_NAME`]. Created in
    /// `read-write` mode if missing.
    pub dir: PathBuf,
    /// How the run uses the cache.
    #[serde(default)]
    pub mode: CacheMode,
    /// How each member's answers are recorded (`"dense"`, `"top-k:K"`); by default
    /// [`RecordFormat::auto`] for the data's class count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordFormat>,
}

impl CacheConfig {
    /// The database file of this cache.
    pub fn file(&self) -> PathBuf {
        self.dir.join(CACHE_FILE_NAME)
    }
}

/// How a run uses its soft-target cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// Look every batch up; ask the teachers for the rows that are missing and write them
    /// (write-through). Holds the cache's file lock for the whole run: no other process may
    /// open the cache meanwhile.
    #[default]
    ReadWrite,
    /// Look every batch up; ask the teachers for what is missing but write nothing. Any number
    /// of read-only runs may share one cache (none may have it open read-write).
    ReadOnly,
    /// No teachers: every soft target comes from the cache, opened read-only. The run starts
    /// only if the cache holds a complete key (every training sample) for the run's data source;
    /// the members, T, combine mode and encoding are those of that key.
    Offline,
}

impl CacheMode {
    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::ReadWrite => "read-write",
            CacheMode::ReadOnly => "read-only",
            CacheMode::Offline => "offline",
        }
    }

    /// Whether this mode opens the cache read-only.
    pub fn is_read_only(self) -> bool {
        !matches!(self, CacheMode::ReadWrite)
    }
}

/// Everything the soft-target cache can fail with; every variant about a file names it.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Another process (or another handle in this process) has the cache open.
    #[error(
        "soft-target cache {}: the file is locked: another run (or another handle in this process) has this cache open (a read-write open excludes every other open; read-only opens share the file only among themselves)",
        path.display()
    )]
    Locked { path: PathBuf },
    /// The file is not a readable redb database, fails its integrity check, or holds data
    /// that cannot have been written by this cache (e.g. a row of the wrong length).
    #[error("soft-target cache {}: corrupt or truncated: {msg} (delete the file to start a new cache)", path.display())]
    Corrupt { path: PathBuf, msg: String },
    /// The file is a redb database but not a soft-target cache of this format version.
    #[error("soft-target cache {}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// A read-only open found a file that was not closed cleanly.
    #[error(
        "soft-target cache {}: the file was not closed cleanly and a read-only open cannot repair it; open it read-write once",
        path.display()
    )]
    NeedsRepair { path: PathBuf },
    /// A read-only open found no cache.
    #[error("soft-target cache {}: no such file", path.display())]
    Missing { path: PathBuf },
    /// The digest of a key is stored with another key (a hash collision or an edited file).
    #[error(
        "soft-target cache {}: key {digest} is stored for `{stored}`, not for `{given}`",
        path.display()
    )]
    KeyMismatch {
        path: PathBuf,
        digest: String,
        stored: String,
        given: String,
    },
    /// A row given to write has another length than its key's encoding.
    #[error(
        "soft-target cache {}: key {digest}: the row of sample {sample} has {got} bytes, the encoding has {expected} per row",
        path.display()
    )]
    RowLength {
        path: PathBuf,
        digest: String,
        sample: usize,
        got: usize,
        expected: usize,
    },
    /// A sample index outside the key's training split.
    #[error(
        "soft-target cache {}: key {digest}: sample {sample} is out of range (train size {train_size})",
        path.display()
    )]
    SampleOutOfRange {
        path: PathBuf,
        digest: String,
        sample: usize,
        train_size: usize,
    },
    /// A write on a cache opened read-only.
    #[error("soft-target cache {}: opened read-only, cannot write", path.display())]
    ReadOnly { path: PathBuf },
    /// A key with an invalid component.
    #[error("soft-target cache key: {0}")]
    InvalidKey(String),
    /// Creating the cache directory failed.
    #[error("soft-target cache {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Any other storage failure.
    #[error("soft-target cache {}: {msg}", path.display())]
    Storage { path: PathBuf, msg: String },
}

/// Result alias of the cache.
pub type CacheResult<T> = std::result::Result<T, CacheError>;

/// The identity of one ensemble member in a [`CacheKey`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberIdentity {
    /// Member name (`--member` of its replicas).
    pub name: String,
    /// SHA-256 of the member's weights as its replicas report it
    /// (`DescribeResponse.weights_digest`, lowercase hex).
    pub weights_digest: String,
    /// Weight of the member in the combination, as configured (not renormalised).
    pub weight: f32,
}

/// Everything a combined soft-target row depends on, besides the sample index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKey {
    /// Data source identity, e.g. the data spec `synthetic:7` or `mnist:/data/mnist`.
    pub data: String,
    /// Rows of the training split; every sample index is below it.
    pub train_size: usize,
    /// The members, in ensemble order.
    pub members: Vec<MemberIdentity>,
    /// Temperature T as sent to the teachers.
    pub temperature: f32,
    /// How the members' distributions are combined.
    pub combine: Combine,
    /// Encoding of a stored row: `f32`, `f16`, a top-k spec string, … (opaque here).
    pub encoding: String,
    /// Bytes of one stored row in that encoding.
    pub row_bytes: usize,
}

impl CacheKey {
    /// Checks every component: non-empty strings, at least one member, distinct member names,
    /// finite positive T and weights, rows of at least one byte.
    pub fn validate(&self) -> CacheResult<()> {
        let bad = |msg: String| Err(CacheError::InvalidKey(msg));
        if self.data.is_empty() {
            return bad("the data source identity is empty".into());
        }
        if self.members.is_empty() {
            return bad("no members".into());
        }
        for (i, m) in self.members.iter().enumerate() {
            if m.name.is_empty() || self.members[..i].iter().any(|o| o.name == m.name) {
                return bad(format!("member name `{}` is empty or repeated", m.name));
            }
            if m.weights_digest.is_empty() {
                return bad(format!("member `{}` has no weights digest", m.name));
            }
            if !m.weight.is_finite() || m.weight <= 0.0 {
                return bad(format!(
                    "member `{}` has weight {}, not finite and > 0",
                    m.name, m.weight
                ));
            }
        }
        if !self.temperature.is_finite() || self.temperature <= 0.0 {
            return bad(format!(
                "temperature {} is not finite and > 0",
                self.temperature
            ));
        }
        if self.encoding.is_empty() {
            return bad("the encoding is empty".into());
        }
        if self.row_bytes == 0 {
            return bad("rows of 0 bytes".into());
        }
        Ok(())
    }

    /// The key's stable identity: SHA-256 (lowercase hex) of a versioned, length-prefixed
    /// encoding of every component. Stable across platforms and releases of this format version.
    pub fn digest(&self) -> String {
        fn bytes(h: &mut Sha256, b: &[u8]) {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
        let mut h = Sha256::new();
        bytes(&mut h, FORMAT.as_bytes());
        bytes(&mut h, FORMAT_VERSION.as_bytes());
        bytes(&mut h, self.data.as_bytes());
        h.update((self.train_size as u64).to_le_bytes());
        h.update((self.members.len() as u64).to_le_bytes());
        for m in &self.members {
            bytes(&mut h, m.name.as_bytes());
            bytes(&mut h, m.weights_digest.as_bytes());
            h.update(m.weight.to_bits().to_le_bytes());
        }
        h.update(self.temperature.to_bits().to_le_bytes());
        bytes(&mut h, self.combine.as_str().as_bytes());
        bytes(&mut h, self.encoding.as_bytes());
        h.update((self.row_bytes as u64).to_le_bytes());
        h.finalize()
            .iter()
            .fold(String::with_capacity(64), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    }

    /// One line for people, e.g. `synthetic:7 (train 12000) · T=2 · mean-prob · f32 (40 B/row) ·
    /// big@3f2a9c0d1e2b4a5c×1, conv@0a1b2c3d4e5f6a7b×0.5`. Weights digests are shortened to 16
    /// hex digits, as in `model_id`.
    pub fn description(&self) -> String {
        let members = self
            .members
            .iter()
            .map(|m| {
                let d = m.weights_digest.get(..16).unwrap_or(&m.weights_digest);
                format!("{}@{d}×{}", m.name, m.weight)
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{} (train {}) · T={} · {} · {} ({} B/row) · {members}",
            self.data,
            self.train_size,
            self.temperature,
            self.combine,
            self.encoding,
            self.row_bytes
        )
    }
}

/// One key a cache holds, as [`SoftTargetCache::keys`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheKeyInfo {
    /// [`CacheKey::digest`].
    pub digest: String,
    /// [`CacheKey::description`].
    pub description: String,
    /// The key.
    pub key: CacheKey,
    /// Rows stored under it.
    pub rows: u64,
}

impl CacheKeyInfo {
    /// Whether every training sample (0..train_size) has its row (indices are checked on
    /// write, so the count says it).
    pub fn is_complete(&self) -> bool {
        self.rows == self.key.train_size as u64
    }
}

/// Counters of one opened cache (shared by its clones; not persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Batches looked up ([`SoftTargetCache::get_rows`], [`SoftTargetCache::get_batch`],
    /// [`SoftTargetCache::lookup_rows`]).
    pub lookups: u64,
    /// Rows served from the cache.
    pub hit_rows: u64,
    /// Rows looked up but not served (with the all-or-nothing lookups, every row of a batch
    /// with any missing row).
    pub missed_rows: u64,
    /// Batches written.
    pub batches_written: u64,
    /// Rows written.
    pub rows_written: u64,
}

#[derive(Default)]
struct Counters {
    lookups: AtomicU64,
    hit_rows: AtomicU64,
    missed_rows: AtomicU64,
    batches_written: AtomicU64,
    rows_written: AtomicU64,
}

enum Db {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
}

struct Inner {
    db: Db,
    path: PathBuf,
    counters: Counters,
}

/// An opened soft-target cache. Cheap to clone (an `Arc`); `Send + Sync`. Every method blocks
/// on file I/O (call it from `spawn_blocking` in async code).
#[derive(Clone)]
pub struct SoftTargetCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SoftTargetCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftTargetCache")
            .field("path", &self.inner.path)
            .field("read_only", &self.is_read_only())
            .finish()
    }
}

/// Maps a redb error into a [`CacheError`] naming `path`.
fn db_err(path: &Path, e: impl Into<redb::Error>) -> CacheError {
    let path = path.to_path_buf();
    match e.into() {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            CacheError::Locked { path }
        }
        redb::Error::Corrupted(msg) => CacheError::Corrupt { path, msg },
        redb::Error::RepairAborted => CacheError::NeedsRepair { path },
        redb::Error::UpgradeRequired(v) => CacheError::Format {
            path,
            msg: format!("written in redb file format {v}, which this build cannot read"),
        },
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => CacheError::Corrupt {
            path,
            msg: e.to_string(),
        },
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            CacheError::Corrupt {
                path,
                msg: format!("the file ends early: {e}"),
            }
        }
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
            CacheError::Missing { path }
        }
        e @ (redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. }) => CacheError::Format {
            path,
            msg: format!("not a soft-target cache of format {FORMAT_VERSION}: {e}"),
        },
        e => CacheError::Storage {
            path,
            msg: e.to_string(),
        },
    }
}

/// Runs `f` (a redb open), turning a panic inside redb — which its debug builds use for some
/// corruptions that only an edited file can show — into [`CacheError::Corrupt`].
fn guard_open<T>(path: &Path, f: impl FnOnce() -> CacheResult<T>) -> CacheResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the database engine gave up on the file".into());
        Err(CacheError::Corrupt {
            path: path.to_path_buf(),
            msg,
        })
    })
}

fn rows_table(digest: &str) -> String {
    format!("{ROWS_PREFIX}{digest}")
}

impl SoftTargetCache {
    /// Opens (creating it and its directory if needed) the cache in directory `dir`,
    /// read-write. Fails with [`CacheError::Locked`] if any other handle or process has it open,
    /// [`CacheError::Corrupt`] if the file fails its integrity check, [`CacheError::Format`] if
    /// it is another kind of redb database.
    pub fn open(dir: impl AsRef<Path>) -> CacheResult<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(CACHE_FILE_NAME);
        let db = guard_open(&path, || {
            redb::Builder::new()
                .set_check_integrity_on_open(true)
                .create(&path)
                .map_err(|e| db_err(&path, e))
        })?;
        let cache = Self::new(Db::ReadWrite(db), path);
        cache.init_format()?;
        Ok(cache)
    }

    /// Opens the existing cache in directory `dir` read-only; it may be shared with other
    /// read-only opens. [`CacheError::Missing`] if there is none.
    pub fn open_read_only(dir: impl AsRef<Path>) -> CacheResult<Self> {
        let path = dir.as_ref().join(CACHE_FILE_NAME);
        if !path.exists() {
            return Err(CacheError::Missing { path });
        }
        let db = guard_open(&path, || {
            redb::Builder::new()
                .open_read_only(&path)
                .map_err(|e| db_err(&path, e))
        })?;
        let cache = Self::new(Db::ReadOnly(db), path);
        cache.check_format()?;
        Ok(cache)
    }

    /// Opens the cache as `cfg` says: read-write, or read-only for the `read-only` and
    /// `offline` modes.
    pub fn open_config(cfg: &CacheConfig) -> CacheResult<Self> {
        if cfg.mode.is_read_only() {
            Self::open_read_only(&cfg.dir)
        } else {
            Self::open(&cfg.dir)
        }
    }

    fn new(db: Db, path: PathBuf) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                path,
                counters: Counters::default(),
            }),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether this handle was opened read-only.
    pub fn is_read_only(&self) -> bool {
        matches!(self.inner.db, Db::ReadOnly(_))
    }

    fn err(&self, e: impl Into<redb::Error>) -> CacheError {
        db_err(&self.inner.path, e)
    }

    fn begin_read(&self) -> CacheResult<ReadTransaction> {
        match &self.inner.db {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
        .map_err(|e| self.err(e))
    }

    fn writable(&self) -> CacheResult<&Database> {
        match &self.inner.db {
            Db::ReadWrite(db) => Ok(db),
            Db::ReadOnly(_) => Err(CacheError::ReadOnly {
                path: self.inner.path.clone(),
            }),
        }
    }

    fn format_error(&self, msg: String) -> CacheError {
        CacheError::Format {
            path: self.inner.path.clone(),
            msg,
        }
    }

    /// Checks the format marker of a read-only open.
    fn check_format(&self) -> CacheResult<()> {
        let txn = self.begin_read()?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => {
                return Err(self.format_error(
                    "not a soft-target cache (a redb database without its `meta` table)".into(),
                ));
            }
            Err(e) => return Err(self.err(e)),
        };
        self.check_meta(&meta)
    }

    fn check_meta(&self, meta: &impl ReadableTable<&'static str, &'static str>) -> CacheResult<()> {
        let get = |k: &str| -> CacheResult<Option<String>> {
            Ok(meta
                .get(k)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_string()))
        };
        match (get("format")?, get("version")?) {
            (Some(f), Some(v)) if f == FORMAT && v == FORMAT_VERSION => Ok(()),
            (Some(f), Some(v)) if f == FORMAT => Err(self.format_error(format!(
                "soft-target cache format version {v}; this build reads version {FORMAT_VERSION}"
            ))),
            (f, _) => {
                Err(self.format_error(format!("not a soft-target cache (format marker {f:?})")))
            }
        }
    }

    /// Writes the format marker into a new database, or checks the one there.
    fn init_format(&self) -> CacheResult<()> {
        let db = self.writable()?;
        {
            let txn = self.begin_read()?;
            match txn.open_table(META) {
                Ok(meta) => return self.check_meta(&meta),
                Err(TableError::TableDoesNotExist(_)) => {
                    if txn.list_tables().map_err(|e| self.err(e))?.next().is_some() {
                        return Err(self.format_error(
                            "not a soft-target cache (a redb database with other tables)".into(),
                        ));
                    }
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        let txn = db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("format", FORMAT).map_err(|e| self.err(e))?;
            meta.insert("version", FORMAT_VERSION)
                .map_err(|e| self.err(e))?;
            txn.open_table(KEYS).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Compares the key stored under `digest` (JSON) with `key`.
    fn check_stored_key(&self, stored: &str, key: &CacheKey, digest: &str) -> CacheResult<()> {
        let parsed: CacheKey = serde_json::from_str(stored).map_err(|e| CacheError::Corrupt {
            path: self.inner.path.clone(),
            msg: format!("key {digest}: stored key is not valid: {e}"),
        })?;
        if &parsed != key {
            return Err(CacheError::KeyMismatch {
                path: self.inner.path.clone(),
                digest: digest.to_string(),
                stored: parsed.description(),
                given: key.description(),
            });
        }
        Ok(())
    }

    /// Looks `samples` up in one read transaction: each sample's row, or `None` where it is
    /// missing. Counts nothing.
    fn read_rows(&self, key: &CacheKey, samples: &[usize]) -> CacheResult<Vec<Option<Vec<u8>>>> {
        key.validate()?;
        let digest = key.digest();
        let txn = self.begin_read()?;
        let keys = match txn.open_table(KEYS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(vec![None; samples.len()]),
            Err(e) => return Err(self.err(e)),
        };
        match keys.get(digest.as_str()).map_err(|e| self.err(e))? {
            Some(stored) => self.check_stored_key(stored.value(), key, &digest)?,
            None => return Ok(vec![None; samples.len()]),
        }
        let name = rows_table(&digest);
        let table = match txn.open_table(TableDefinition::<u64, &[u8]>::new(&name)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(vec![None; samples.len()]),
            Err(e) => return Err(self.err(e)),
        };
        samples
            .iter()
            .map(|&s| {
                let Some(row) = table.get(s as u64).map_err(|e| self.err(e))? else {
                    return Ok(None);
                };
                let row = row.value();
                if row.len() != key.row_bytes {
                    return Err(CacheError::Corrupt {
                        path: self.inner.path.clone(),
                        msg: format!(
                            "key {digest}: the stored row of sample {s} has {} bytes, the encoding has {} per row",
                            row.len(),
                            key.row_bytes
                        ),
                    });
                }
                Ok(Some(row.to_vec()))
            })
            .collect()
    }

    fn count(&self, hit: usize, missed: usize) {
        let c = &self.inner.counters;
        c.lookups.fetch_add(1, Ordering::Relaxed);
        c.hit_rows.fetch_add(hit as u64, Ordering::Relaxed);
        c.missed_rows.fetch_add(missed as u64, Ordering::Relaxed);
    }

    /// Every row of `samples` under `key`, in order, or `None` if any is missing (all or
    /// nothing; a partial batch counts all its rows as missed).
    pub fn get_rows(&self, key: &CacheKey, samples: &[usize]) -> CacheResult<Option<Vec<Vec<u8>>>> {
        let rows = self.read_rows(key, samples)?;
        let all: Option<Vec<Vec<u8>>> = rows.into_iter().collect();
        match all {
            Some(rows) => {
                self.count(rows.len(), 0);
                Ok(Some(rows))
            }
            None => {
                self.count(0, samples.len());
                Ok(None)
            }
        }
    }

    /// Like [`Self::get_rows`], with the rows concatenated in `samples` order (`samples.len() ×
    /// row_bytes` bytes: the soft-target tensor of a batch).
    pub fn get_batch(&self, key: &CacheKey, samples: &[usize]) -> CacheResult<Option<Vec<u8>>> {
        Ok(self.get_rows(key, samples)?.map(|rows| rows.concat()))
    }

    /// Each sample's row, or `None` where it is missing (the caller asks the teachers for
    /// those only); counts hits and misses row by row.
    pub fn lookup_rows(
        &self,
        key: &CacheKey,
        samples: &[usize],
    ) -> CacheResult<Vec<Option<Vec<u8>>>> {
        let rows = self.read_rows(key, samples)?;
        let hit = rows.iter().filter(|r| r.is_some()).count();
        self.count(hit, rows.len() - hit);
        Ok(rows)
    }

    /// Writes `rows` (sample index, row bytes) under `key` in ONE write transaction: after an
    /// error nothing of the batch is stored, after `Ok` all of it is, durably. Registers the key
    /// on its first write. A row of the wrong length or a sample outside the key's training
    /// split fails the whole batch. Existing rows are overwritten.
    pub fn put_rows(&self, key: &CacheKey, rows: &[(usize, &[u8])]) -> CacheResult<()> {
        let db = self.writable()?;
        key.validate()?;
        let digest = key.digest();
        let txn = db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut keys = txn.open_table(KEYS).map_err(|e| self.err(e))?;
            let stored = keys
                .get(digest.as_str())
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_string());
            match stored {
                Some(stored) => self.check_stored_key(&stored, key, &digest)?,
                None => {
                    let json = serde_json::to_string(key).map_err(|e| CacheError::Storage {
                        path: self.inner.path.clone(),
                        msg: format!("key to JSON: {e}"),
                    })?;
                    keys.insert(digest.as_str(), json.as_str())
                        .map_err(|e| self.err(e))?;
                }
            }
            let name = rows_table(&digest);
            let mut table = txn
                .open_table(TableDefinition::<u64, &[u8]>::new(&name))
                .map_err(|e| self.err(e))?;
            // Rows are checked as they are inserted: returning early drops the transaction
            // uncommitted, which aborts it and leaves nothing of the batch behind.
            for &(sample, row) in rows {
                if row.len() != key.row_bytes {
                    return Err(CacheError::RowLength {
                        path: self.inner.path.clone(),
                        digest,
                        sample,
                        got: row.len(),
                        expected: key.row_bytes,
                    });
                }
                if sample >= key.train_size {
                    return Err(CacheError::SampleOutOfRange {
                        path: self.inner.path.clone(),
                        digest,
                        sample,
                        train_size: key.train_size,
                    });
                }
                table.insert(sample as u64, row).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        let c = &self.inner.counters;
        c.batches_written.fetch_add(1, Ordering::Relaxed);
        c.rows_written
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a batch given as one buffer of `samples.len() × row_bytes` bytes (rows in
    /// `samples` order), in one transaction as [`Self::put_rows`].
    pub fn put_batch(&self, key: &CacheKey, samples: &[usize], bytes: &[u8]) -> CacheResult<()> {
        key.validate()?;
        let expected = samples.len() * key.row_bytes;
        if bytes.len() != expected {
            return Err(CacheError::RowLength {
                path: self.inner.path.clone(),
                digest: key.digest(),
                sample: samples.first().copied().unwrap_or(0),
                got: bytes.len(),
                expected,
            });
        }
        let rows: Vec<(usize, &[u8])> = samples
            .iter()
            .copied()
            .zip(bytes.chunks_exact(key.row_bytes))
            .collect();
        self.put_rows(key, &rows)
    }

    /// Every key the cache holds, with its row count, in digest order.
    pub fn keys(&self) -> CacheResult<Vec<CacheKeyInfo>> {
        let txn = self.begin_read()?;
        let keys = match txn.open_table(KEYS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for entry in keys.iter().map_err(|e| self.err(e))? {
            let (digest, json) = entry.map_err(|e| self.err(e))?;
            let (digest, json) = (digest.value().to_string(), json.value());
            let key: CacheKey = serde_json::from_str(json).map_err(|e| CacheError::Corrupt {
                path: self.inner.path.clone(),
                msg: format!("key {digest}: stored key is not valid: {e}"),
            })?;
            if key.digest() != digest {
                return Err(CacheError::Corrupt {
                    path: self.inner.path.clone(),
                    msg: format!(
                        "key {digest}: the stored key `{}` has digest {}",
                        key.description(),
                        key.digest()
                    ),
                });
            }
            let name = rows_table(&digest);
            let rows = match txn.open_table(TableDefinition::<u64, &[u8]>::new(&name)) {
                Ok(t) => t.len().map_err(|e| self.err(e))?,
                Err(TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(self.err(e)),
            };
            out.push(CacheKeyInfo {
                description: key.description(),
                digest,
                key,
                rows,
            });
        }
        Ok(out)
    }

    /// Whether every sample `0..samples` has its row under `key`.
    pub fn is_complete(&self, key: &CacheKey, samples: usize) -> CacheResult<bool> {
        key.validate()?;
        let digest = key.digest();
        let txn = self.begin_read()?;
        let keys = match txn.open_table(KEYS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(samples == 0),
            Err(e) => return Err(self.err(e)),
        };
        match keys.get(digest.as_str()).map_err(|e| self.err(e))? {
            Some(stored) => self.check_stored_key(stored.value(), key, &digest)?,
            None => return Ok(samples == 0),
        }
        let name = rows_table(&digest);
        let table = match txn.open_table(TableDefinition::<u64, &[u8]>::new(&name)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(samples == 0),
            Err(e) => return Err(self.err(e)),
        };
        if table.len().map_err(|e| self.err(e))? < samples as u64 {
            return Ok(false);
        }
        let present = table
            .range(0..samples as u64)
            .map_err(|e| self.err(e))?
            .count();
        Ok(present == samples)
    }

    /// This handle's counters (shared by its clones, since it was opened).
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            lookups: c.lookups.load(Ordering::Relaxed),
            hit_rows: c.hit_rows.load(Ordering::Relaxed),
            missed_rows: c.missed_rows.load(Ordering::Relaxed),
            batches_written: c.batches_written.load(Ordering::Relaxed),
            rows_written: c.rows_written.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CacheKey {
        CacheKey {
            data: "synthetic:7".into(),
            train_size: 100,
            members: vec![
                MemberIdentity {
                    name: "big".into(),
                    weights_digest: "3f2a9c0d1e2b4a5c".repeat(4),
                    weight: 1.0,
                },
                MemberIdentity {
                    name: "conv".into(),
                    weights_digest: "0a1b2c3d4e5f6a7b".repeat(4),
                    weight: 0.5,
                },
            ],
            temperature: 2.0,
            combine: Combine::MeanProb,
            encoding: "f32".into(),
            row_bytes: 8,
        }
    }

    /// A distinct row per (sample, salt).
    fn row(sample: usize, salt: u8) -> Vec<u8> {
        (0..8)
            .map(|i| (sample as u8).wrapping_mul(7) ^ i ^ salt)
            .collect()
    }

    fn put(cache: &SoftTargetCache, k: &CacheKey, samples: std::ops::Range<usize>) {
        let rows: Vec<(usize, Vec<u8>)> = samples.map(|s| (s, row(s, 0))).collect();
        let refs: Vec<(usize, &[u8])> = rows.iter().map(|(s, r)| (*s, r.as_slice())).collect();
        cache.put_rows(k, &refs).unwrap();
    }

    #[test]
    fn cache_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        let k = key();
        assert_eq!(cache.get_rows(&k, &[0, 1]).unwrap(), None);
        put(&cache, &k, 0..10);
        let got = cache.get_rows(&k, &[3, 0, 9]).unwrap().unwrap();
        assert_eq!(got, vec![row(3, 0), row(0, 0), row(9, 0)]);
        assert_eq!(
            cache.get_batch(&k, &[3, 0]).unwrap().unwrap(),
            [row(3, 0), row(0, 0)].concat()
        );
        // put_batch splits one buffer into rows; overwriting replaces.
        cache
            .put_batch(&k, &[4, 5], &[row(4, 1), row(5, 1)].concat())
            .unwrap();
        assert_eq!(
            cache.get_rows(&k, &[4, 5]).unwrap().unwrap(),
            vec![row(4, 1), row(5, 1)]
        );
        // partial lookups say which rows are missing
        assert_eq!(
            cache.lookup_rows(&k, &[9, 10]).unwrap(),
            vec![Some(row(9, 0)), None]
        );
        assert_eq!(cache.get_rows(&k, &[9, 10]).unwrap(), None);
        assert_eq!(cache.get_rows(&k, &[]).unwrap(), Some(vec![]));
    }

    #[test]
    fn cache_counts_hits_and_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        let k = key();
        assert_eq!(cache.stats(), CacheStats::default());
        cache.get_rows(&k, &[0, 1, 2]).unwrap(); // miss: 3 rows
        put(&cache, &k, 0..2);
        cache.get_rows(&k, &[0, 1]).unwrap(); // hit: 2 rows
        cache.get_rows(&k, &[1, 2]).unwrap(); // partial: all-or-nothing misses 2 rows
        cache.lookup_rows(&k, &[1, 2, 3]).unwrap(); // 1 hit, 2 missed
        let clone = cache.clone();
        clone.get_batch(&k, &[0]).unwrap(); // clones share the counters
        assert_eq!(
            cache.stats(),
            CacheStats {
                lookups: 5,
                hit_rows: 4,
                missed_rows: 7,
                batches_written: 1,
                rows_written: 2,
            }
        );
    }

    #[test]
    fn cache_persists_across_reopen_and_lists_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut k2 = key();
        k2.temperature = 4.0;
        k2.train_size = 3;
        {
            let cache = SoftTargetCache::open(dir.path()).unwrap();
            put(&cache, &key(), 0..10);
            put(&cache, &k2, 0..3);
        }
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        assert_eq!(
            cache.get_rows(&key(), &[7]).unwrap().unwrap(),
            vec![row(7, 0)]
        );
        let mut keys = cache.keys().unwrap();
        keys.sort_by_key(|i| i.rows);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].key, k2);
        assert_eq!(keys[0].digest, k2.digest());
        assert_eq!(keys[0].description, k2.description());
        assert_eq!(keys[0].rows, 3);
        assert!(keys[0].is_complete());
        assert_eq!((keys[1].rows, keys[1].is_complete()), (10, false));
        assert!(cache.is_complete(&k2, 3).unwrap());
        assert!(cache.is_complete(&key(), 10).unwrap());
        assert!(!cache.is_complete(&key(), 11).unwrap());
        let mut k3 = key();
        k3.encoding = "f16".into();
        assert!(!cache.is_complete(&k3, 1).unwrap());
        assert!(cache.is_complete(&k3, 0).unwrap());
        drop(cache);

        // read-only opens share the file and cannot write
        let ro = SoftTargetCache::open_read_only(dir.path()).unwrap();
        let ro2 = SoftTargetCache::open_config(&CacheConfig {
            dir: dir.path().to_path_buf(),
            mode: CacheMode::Offline,
            record: None,
        })
        .unwrap();
        assert!(ro.is_read_only() && ro2.is_read_only());
        assert_eq!(ro2.keys().unwrap().len(), 2);
        assert_eq!(ro.get_rows(&k2, &[2]).unwrap().unwrap(), vec![row(2, 0)]);
        let e = ro.put_rows(&k2, &[(0, &row(0, 0))]).unwrap_err();
        assert!(matches!(e, CacheError::ReadOnly { .. }), "{e}");
        // and a read-write open is refused while they are open
        let e = SoftTargetCache::open(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Locked { .. }), "{e}");
    }

    #[test]
    fn cache_second_writer_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let _cache = SoftTargetCache::open(dir.path()).unwrap();
        let e = SoftTargetCache::open(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Locked { .. }), "{e}");
        assert!(e.to_string().contains(CACHE_FILE_NAME), "{e}");
        let e = SoftTargetCache::open_read_only(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Locked { .. }), "{e}");
        // a missing cache is a clear error for read-only opens
        let empty = tempfile::tempdir().unwrap();
        let e = SoftTargetCache::open_read_only(empty.path()).unwrap_err();
        assert!(matches!(e, CacheError::Missing { .. }), "{e}");
    }

    #[test]
    fn cache_key_changes_with_each_component() {
        let base = key();
        assert_eq!(base.digest(), key().digest(), "digest is deterministic");
        assert_eq!(base.digest().len(), 64);
        type Change = Box<dyn Fn(&mut CacheKey)>;
        let variants: Vec<(&str, Change)> = vec![
            ("temperature", Box::new(|k| k.temperature = 2.5)),
            (
                "member name",
                Box::new(|k| k.members[0].name = "big2".into()),
            ),
            (
                "member weights digest",
                Box::new(|k| k.members[1].weights_digest = "ff".repeat(32)),
            ),
            ("member weight", Box::new(|k| k.members[1].weight = 0.25)),
            ("member removed", Box::new(|k| drop(k.members.pop()))),
            ("member order", Box::new(|k| k.members.reverse())),
            (
                "member added",
                Box::new(|k| {
                    k.members.push(MemberIdentity {
                        name: "third".into(),
                        weights_digest: "ab".repeat(32),
                        weight: 1.0,
                    })
                }),
            ),
            ("combine mode", Box::new(|k| k.combine = Combine::MeanLogit)),
            ("encoding", Box::new(|k| k.encoding = "f16".into())),
            ("row bytes", Box::new(|k| k.row_bytes = 4)),
            ("data source", Box::new(|k| k.data = "synthetic:8".into())),
            ("train size", Box::new(|k| k.train_size = 99)),
        ];
        let mut seen = std::collections::HashSet::from([base.digest()]);
        for (what, change) in &variants {
            let mut k = key();
            change(&mut k);
            k.validate().unwrap();
            assert!(
                seen.insert(k.digest()),
                "changing the {what} kept the digest"
            );
        }
        // length prefixes: moving bytes between adjacent strings changes the digest
        let (mut a, mut b) = (key(), key());
        a.members[0].name = "bi".into();
        a.members[0].weights_digest = format!("g{}", base.members[0].weights_digest);
        b.members[0].name = "big".into();
        assert_ne!(a.digest(), b.digest());
        assert!(base.description().contains("T=2"), "{}", base.description());
        assert!(
            base.description().contains("big@3f2a9c0d1e2b4a5c×1"),
            "{}",
            base.description()
        );

        // rows under one key are invisible under another
        let dir = tempfile::tempdir().unwrap();
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        put(&cache, &base, 0..4);
        for (what, change) in &variants {
            let mut k = key();
            change(&mut k);
            assert_eq!(cache.get_rows(&k, &[0]).unwrap(), None, "{what}");
        }
    }

    #[test]
    fn cache_rejects_invalid_keys_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        let k = key();
        let e = cache.put_rows(&k, &[(0, &[1, 2, 3])]).unwrap_err();
        assert!(
            matches!(
                e,
                CacheError::RowLength {
                    sample: 0,
                    got: 3,
                    expected: 8,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(CACHE_FILE_NAME), "{e}");
        let e = cache.put_batch(&k, &[0, 1], &[0; 15]).unwrap_err();
        assert!(matches!(e, CacheError::RowLength { .. }), "{e}");
        let e = cache.put_rows(&k, &[(100, &row(0, 0))]).unwrap_err();
        assert!(
            matches!(e, CacheError::SampleOutOfRange { sample: 100, .. }),
            "{e}"
        );
        for bad in [
            CacheKey {
                temperature: 0.0,
                ..key()
            },
            CacheKey {
                temperature: f32::NAN,
                ..key()
            },
            CacheKey {
                members: vec![],
                ..key()
            },
            CacheKey {
                encoding: String::new(),
                ..key()
            },
            CacheKey {
                row_bytes: 0,
                ..key()
            },
            CacheKey {
                data: String::new(),
                ..key()
            },
        ] {
            let e = cache.get_rows(&bad, &[0]).unwrap_err();
            assert!(matches!(e, CacheError::InvalidKey(_)), "{e}");
        }
        let mut dup = key();
        dup.members[1].name = "big".into();
        assert!(matches!(dup.validate(), Err(CacheError::InvalidKey(_))));
        let mut w = key();
        w.members[0].weight = -1.0;
        assert!(matches!(w.validate(), Err(CacheError::InvalidKey(_))));
    }

    #[test]
    fn cache_batch_write_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        let k = key();
        put(&cache, &k, 0..2);
        // rows 2..5 are inserted into the write transaction before row 5's bad length aborts it
        let good: Vec<Vec<u8>> = (2..5).map(|s| row(s, 0)).collect();
        let short = [0u8; 3];
        let mut batch: Vec<(usize, &[u8])> = good
            .iter()
            .enumerate()
            .map(|(i, r)| (i + 2, r.as_slice()))
            .collect();
        batch.push((5, &short));
        let overwrite = row(0, 9);
        batch.insert(0, (0, &overwrite));
        assert!(cache.put_rows(&k, &batch).is_err());
        assert_eq!(
            cache.lookup_rows(&k, &[0, 1, 2, 3, 4, 5]).unwrap(),
            vec![Some(row(0, 0)), Some(row(1, 0)), None, None, None, None],
            "nothing of the failed batch is visible, not even the overwrite of row 0"
        );
        assert_eq!(cache.stats().batches_written, 1);
        // a key's first write that fails registers no key
        let mut k2 = key();
        k2.temperature = 3.0;
        assert!(cache.put_rows(&k2, &[(0, &short)]).is_err());
        assert_eq!(cache.keys().unwrap().len(), 1);
        drop(cache);
        // and still not after reopening
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        assert_eq!(cache.lookup_rows(&k, &[2]).unwrap(), vec![None]);
        assert_eq!(cache.keys().unwrap().len(), 1);
    }

    /// A cache file with 200 rows of 1 KiB, closed cleanly; returns its bytes.
    fn filled_cache(dir: &Path) -> Vec<u8> {
        let cache = SoftTargetCache::open(dir).unwrap();
        let k = CacheKey {
            row_bytes: 1024,
            train_size: 200,
            ..key()
        };
        for chunk in (0..200).collect::<Vec<_>>().chunks(50) {
            let bytes: Vec<u8> = chunk
                .iter()
                .flat_map(|&s| (0..1024).map(move |i| (s * 31 + i) as u8))
                .collect();
            cache.put_batch(&k, chunk, &bytes).unwrap();
        }
        drop(cache);
        std::fs::read(dir.join(CACHE_FILE_NAME)).unwrap()
    }

    #[test]
    fn cache_truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = filled_cache(dir.path());
        let file = dir.path().join(CACHE_FILE_NAME);
        for len in [bytes.len() / 2, 4096, 100] {
            std::fs::write(&file, &bytes[..len]).unwrap();
            let e = SoftTargetCache::open(dir.path()).unwrap_err();
            assert!(
                matches!(e, CacheError::Corrupt { .. }),
                "truncated to {len}: {e:?}"
            );
            assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        }
    }

    #[test]
    fn cache_corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = filled_cache(dir.path());
        let file = dir.path().join(CACHE_FILE_NAME);
        // flip bytes in the middle of the data
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        for b in &mut bad[mid..mid + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(&file, &bad).unwrap();
        let e = SoftTargetCache::open(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        // not a database at all
        std::fs::write(&file, b"this is not a redb file, it is text".repeat(200)).unwrap();
        let e = SoftTargetCache::open(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Corrupt { .. }), "{e:?}");
        let e = SoftTargetCache::open_read_only(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Corrupt { .. }), "{e:?}");
    }

    #[test]
    fn cache_other_redb_database_and_key_mismatch() {
        // a redb database that is not a cache
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(CACHE_FILE_NAME);
        {
            let db = Database::create(&file).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(TableDefinition::<u64, u64>::new("other"))
                .unwrap()
                .insert(1, 2)
                .unwrap();
            txn.commit().unwrap();
        }
        let e = SoftTargetCache::open(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Format { .. }), "{e}");
        let e = SoftTargetCache::open_read_only(dir.path()).unwrap_err();
        assert!(matches!(e, CacheError::Format { .. }), "{e}");

        // a key stored under another key's digest (an edited file)
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(CACHE_FILE_NAME);
        put(&SoftTargetCache::open(dir.path()).unwrap(), &key(), 0..3);
        {
            let db = Database::create(&file).unwrap();
            let txn = db.begin_write().unwrap();
            let mut other = key();
            other.temperature = 8.0;
            let json = serde_json::to_string(&other).unwrap();
            txn.open_table(KEYS)
                .unwrap()
                .insert(key().digest().as_str(), json.as_str())
                .unwrap();
            // and a row of the wrong length
            txn.open_table(TableDefinition::<u64, &[u8]>::new(&rows_table(
                &key().digest(),
            )))
            .unwrap()
            .insert(1, [0u8; 5].as_slice())
            .unwrap();
            txn.commit().unwrap();
        }
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        let e = cache.get_rows(&key(), &[0]).unwrap_err();
        assert!(matches!(e, CacheError::KeyMismatch { .. }), "{e}");
        assert!(
            e.to_string().contains("T=8") && e.to_string().contains("T=2"),
            "{e}"
        );
        let e = cache.put_rows(&key(), &[(0, &row(0, 0))]).unwrap_err();
        assert!(matches!(e, CacheError::KeyMismatch { .. }), "{e}");
        let e = cache.keys().unwrap_err();
        assert!(matches!(e, CacheError::Corrupt { .. }), "{e}");
        drop(cache);
        // restore the key: the short row is reported as corrupt
        {
            let db = Database::create(&file).unwrap();
            let txn = db.begin_write().unwrap();
            let json = serde_json::to_string(&key()).unwrap();
            txn.open_table(KEYS)
                .unwrap()
                .insert(key().digest().as_str(), json.as_str())
                .unwrap();
            txn.commit().unwrap();
        }
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        assert_eq!(cache.get_rows(&key(), &[0]).unwrap(), Some(vec![row(0, 0)]));
        let e = cache.get_rows(&key(), &[1]).unwrap_err();
        assert!(matches!(e, CacheError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("sample 1 has 5 bytes"), "{e}");
    }

    #[test]
    fn cache_config_parses_and_handle_is_send_sync() {
        fn send_sync<T: Send + Sync + Clone + 'static>() {}
        send_sync::<SoftTargetCache>();
        let cfg: CacheConfig = toml::from_str("dir = \"c\"\nmode = \"offline\"").unwrap();
        assert_eq!(cfg.mode, CacheMode::Offline);
        assert!(cfg.mode.is_read_only());
        assert_eq!(cfg.file(), PathBuf::from("c").join(CACHE_FILE_NAME));
        let cfg: CacheConfig = toml::from_str("dir = \"c\"").unwrap();
        assert_eq!(cfg.mode, CacheMode::ReadWrite);
        assert!(toml::from_str::<CacheConfig>("dir = \"c\"\nmode = \"sometimes\"").is_err());
        assert!(toml::from_str::<CacheConfig>("dir = \"c\"\nsize = 1").is_err());
        for m in [
            CacheMode::ReadWrite,
            CacheMode::ReadOnly,
            CacheMode::Offline,
        ] {
            let cfg: CacheConfig =
                toml::from_str(&format!("dir = \"c\"\nmode = \"{}\"", m.as_str())).unwrap();
            assert_eq!(cfg.mode, m);
        }
    }

    #[test]
    fn cache_is_usable_from_spawn_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SoftTargetCache::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let tasks: Vec<_> = (0..4)
                .map(|b| {
                    let c = cache.clone();
                    tokio::task::spawn_blocking(move || {
                        let samples: Vec<usize> = (b * 10..b * 10 + 10).collect();
                        let bytes: Vec<u8> = samples.iter().flat_map(|&s| row(s, 0)).collect();
                        c.put_batch(&key(), &samples, &bytes)
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        });
        assert!(cache.is_complete(&key(), 40).unwrap());
    }
}
