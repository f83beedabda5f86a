//! Object storage for the run folder (issue 15 item 4): `run.data_dir = "s3://bucket/prefix"`.
//!
//! Every stage keeps its local-file logic: the run folder the stages see is a local staging
//! folder ([`staging_dir`]), and this layer keeps it and `s3://bucket/prefix/<run>/` in step.
//!
//! 1. [`attach`] (when a command loads the pipeline) lists the run's objects and downloads
//!    every small file that is missing locally (configs, manifests, markers, SAEs, metrics);
//!    activation shards (`part-NNNNN.parquet`) are **not** downloaded: a reader opens a
//!    shard that is not on local disk as a [`ShardFile::Remote`], which serves parquet's
//!    footer and column-chunk reads with ranged GETs, so training and evaluation stream the
//!    set without a local copy of it.
//! 2. [`push_attached`] (after each stage) uploads what changed: stale markers are deleted
//!    first, then data files are uploaded, then markers (`manifest.json`, `*done.json`,
//!    `metrics.json`), then `results/`. Files from 16 MiB on go up as multipart uploads,
//!    which S3 only makes visible on completion: a killed upload leaves no object, its
//!    marker is absent, and the next run uploads it again (or, from another machine,
//!    recomputes the unit).
//!
//! Decision: no locks on the bucket. `flock` cannot lock an object store, and S3's
//! conditional writes are not universal among S3-compatible servers; units are idempotent
//! functions of the pipeline (a duplicate writes the same bytes) and markers go up last, so
//! two tasks of one unit at worst do the work twice. The local lock of the staging folder
//! still serialises commands on one machine.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use parquet::file::reader::{ChunkReader, Length};

use crate::util::progress::Reporter;

/// Files from this size on are uploaded as multipart uploads (`SAEPIPE_S3_MULTIPART_BYTES`
/// overrides it; the tests set 1 to send every file through the multipart path).
const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Part size of a multipart upload (S3's minimum is 5 MiB, except for the last part).
const PART_BYTES: usize = 8 << 20;
/// Bytes a ranged shard reader fetches per GET when parquet reads it as a stream.
const READ_AHEAD: u64 = 4 << 20;

/// Why talking to the object store failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// `run.data_dir` is a URL this build cannot use.
    #[error("run.data_dir = \"{url}\": {msg}")]
    BadUrl {
        /// The value.
        url: String,
        /// What is wrong.
        msg: String,
    },
    /// The server refused the credentials.
    #[error("s3://{bucket}/{prefix}: access denied ({msg}); fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys) to credentials that may list, read and write bucket '{bucket}', and AWS_ENDPOINT_URL (with AWS_ALLOW_HTTP=true for http://) when the bucket is on an S3-compatible server rather than AWS")]
    Denied {
        /// The bucket.
        bucket: String,
        /// The key prefix of the run.
        prefix: String,
        /// The server's words.
        msg: String,
    },
    /// The bucket does not exist.
    #[error("s3://{bucket}: no such bucket; fix: create it (e.g. `aws s3 mb s3://{bucket}`) or set run.data_dir to an existing bucket (AWS_ENDPOINT_URL selects the server: {endpoint})")]
    NoBucket {
        /// The bucket.
        bucket: String,
        /// The endpoint in use.
        endpoint: String,
    },
    /// Another failed request.
    #[error("s3://{bucket}/{key}: {msg}")]
    Request {
        /// The bucket.
        bucket: String,
        /// The object key (or prefix).
        key: String,
        /// What went wrong.
        msg: String,
    },
    /// A local file of the staging folder.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// `Some((bucket, prefix))` when `data_dir` is an `s3://` URL, `None` for a local path, or
/// why it is a URL saepipe cannot use.
pub fn parse_url(data_dir: &str) -> Result<Option<(String, String)>, String> {
    let Some((scheme, rest)) = data_dir.split_once("://") else {
        return Ok(None);
    };
    if scheme != "s3" {
        return Err(format!(
            "'{scheme}://' object storage is not built in; use s3://bucket/prefix (any S3-compatible server: AWS_ENDPOINT_URL) or a path on a shared filesystem"
        ));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err("no bucket; write s3://bucket/prefix".into());
    }
    Ok(Some((
        bucket.to_string(),
        prefix.trim_matches('/').to_string(),
    )))
}

/// The local staging folder of run `run` stored under `s3://bucket/prefix`:
/// `$SAEPIPE_STAGING_DIR`, else `$XDG_CACHE_HOME/saepipe/s3`, else
/// `~/.cache/saepipe/s3`, then `<bucket>/<prefix>/<run>`.
pub fn staging_dir(bucket: &str, prefix: &str, run: &str) -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let root = var("SAEPIPE_STAGING_DIR").unwrap_or_else(|| {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("saepipe")
            .join("s3")
    });
    let mut d = root.join(bucket);
    for part in prefix.split('/').filter(|p| !p.is_empty()) {
        d = d.join(part);
    }
    d.join(run)
}

/// What a file looked like when it was last known to equal its object.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Synced {
    size: u64,
    mtime_ms: i64,
}

/// A run folder on object storage and its local staging folder.
pub struct Remote {
    bucket: String,
    /// Key prefix of the run folder (`prefix/run`), no leading or trailing '/'.
    prefix: String,
    endpoint: String,
    local: PathBuf,
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    /// Relative path → the local file as it was when it matched its object.
    synced: Mutex<BTreeMap<String, Synced>>,
    /// Sizes of the run's objects: as listed at [`attach`], plus those looked up since
    /// (shards are immutable once a manifest lists them).
    sizes: Mutex<BTreeMap<String, u64>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote(s3://{}/{})", self.bucket, self.prefix)
    }
}

static ATTACHED: OnceLock<Remote> = OnceLock::new();

/// The run folder's remote, once [`attach`]ed.
pub fn attached() -> Option<&'static Remote> {
    ATTACHED.get()
}

/// Connect the run folder `local` (the staging folder of `run` under `data_dir`) to its
/// objects and download what it lacks (see the module doc). `Ok(None)` when `data_dir` is
/// a local path. Credentials and endpoint come from the standard AWS variables.
pub fn attach(
    data_dir: &str,
    run: &str,
    local: &Path,
    reporter: &dyn Reporter,
) -> Result<Option<&'static Remote>, RemoteError> {
    let bad = |msg: String| RemoteError::BadUrl {
        url: data_dir.to_string(),
        msg,
    };
    let Some((bucket, prefix)) = parse_url(data_dir).map_err(bad)? else {
        return Ok(None);
    };
    if let Some(r) = ATTACHED.get() {
        return Ok(Some(r));
    }
    let endpoint = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "AWS".to_string());
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 5,
        retry_timeout: Duration::from_secs(120),
    };
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .with_retry(retry)
        .build()
        .map_err(|e| bad(format!("cannot set up the S3 client: {}", chain(&e))))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| RemoteError::Io {
            path: local.to_path_buf(),
            source,
        })?;
    let prefix = [prefix.as_str(), run]
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join("/");
    let remote = Remote {
        bucket,
        prefix,
        endpoint,
        local: local.to_path_buf(),
        store: Arc::new(store),
        rt,
        synced: Mutex::new(BTreeMap::new()),
        sizes: Mutex::new(BTreeMap::new()),
    };
    remote.pull(reporter)?;
    Ok(Some(ATTACHED.get_or_init(|| remote)))
}

/// Upload what changed in the attached run folder (no-op without one).
pub fn push_attached(reporter: &dyn Reporter) -> Result<(), RemoteError> {
    match ATTACHED.get() {
        Some(r) => r.push(reporter),
        None => Ok(()),
    }
}

/// The full message of an error and its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Files the stages never share: temporaries and locks.
fn is_private(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name.ends_with(".tmp") || name.ends_with(".lock") || rel.split('/').any(|p| p == ".locks")
}

/// Activation shards: streamed by the readers, never downloaded whole.
fn is_streamed(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name.starts_with("part-") && name.ends_with(".parquet")
}

/// Upload order: 0 data, 1 markers (which vouch for data), 2 `results/` (made from the
/// markers).
fn rank(rel: &str) -> u8 {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if rel.starts_with("results/") {
        2
    } else if name == super::MANIFEST || name.ends_with("done.json") || name == "metrics.json" {
        1
    } else {
        0
    }
}

fn mtime_ms(m: &std::fs::Metadata) -> i64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Every shareable file under `dir`, as (relative path with '/', absolute path, metadata).
fn walk(dir: &Path) -> Result<Vec<(String, PathBuf, std::fs::Metadata)>, RemoteError> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(RemoteError::Io { path: d, source }),
        };
        for entry in rd {
            let entry = entry.map_err(|source| RemoteError::Io {
                path: d.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let path = entry.path();
            let meta = std::fs::metadata(&path).map_err(|source| RemoteError::Io {
                path: path.clone(),
                source,
            })?;
            if meta.is_dir() {
                if !is_private(&format!("{r}/x")) {
                    stack.push((path, r));
                }
            } else if !is_private(&r) {
                out.push((r, path, meta));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn multipart_threshold() -> u64 {
    std::env::var("SAEPIPE_S3_MULTIPART_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MULTIPART_THRESHOLD)
}

/// Test hook: seconds to sleep after the first part of each multipart upload
/// (`SAEPIPE_S3_TEST_STALL_SECS`), so a test can kill the process mid-upload.
fn test_stall() -> Option<Duration> {
    std::env::var("SAEPIPE_S3_TEST_STALL_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
}

/// A failure inside an async request, before it is named.
enum Fail {
    Io(PathBuf, io::Error),
    Store(object_store::Error),
}

impl From<object_store::Error> for Fail {
    fn from(e: object_store::Error) -> Self {
        Fail::Store(e)
    }
}

impl Remote {
    /// `s3://bucket/prefix/run`.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// The local staging folder (the run folder the stages read and write).
    pub fn local(&self) -> &Path {
        &self.local
    }

    fn key(&self, rel: &str) -> Key {
        Key::from(format!("{}/{rel}", self.prefix))
    }

    /// The relative path of a file of the staging folder.
    fn rel_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.local).ok()?;
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        (!parts.is_empty()).then(|| parts.join("/"))
    }

    /// Name an object-store error for the user.
    fn named(&self, rel: &str, e: Fail) -> RemoteError {
        let e = match e {
            Fail::Io(path, source) => return RemoteError::Io { path, source },
            Fail::Store(e) => e,
        };
        let msg = chain(&e);
        let denied_codes = [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "ExpiredToken",
            "InvalidToken",
            "403 Forbidden",
            "401 Unauthorized",
        ];
        let code = denied_codes.iter().find(|c| msg.contains(*c));
        let denied = matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        );
        if denied || code.is_some() {
            return RemoteError::Denied {
                bucket: self.bucket.clone(),
                prefix: self.prefix.clone(),
                msg: code.map(|c| c.to_string()).unwrap_or(msg),
            };
        }
        if msg.contains("NoSuchBucket") {
            return RemoteError::NoBucket {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
            };
        }
        RemoteError::Request {
            bucket: self.bucket.clone(),
            key: if rel.is_empty() {
                self.prefix.clone()
            } else {
                format!("{}/{rel}", self.prefix)
            },
            msg,
        }
    }

    /// The run's objects, by relative path.
    fn list(&self) -> Result<BTreeMap<String, ObjectMeta>, RemoteError> {
        let prefix = Key::from(self.prefix.as_str());
        let metas: Vec<ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .map_err(|e| self.named("", Fail::Store(e)))?;
        let head = format!("{}/", self.prefix);
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let rel = m.location.as_ref().strip_prefix(&head)?.to_string();
                Some((rel, m))
            })
            .collect())
    }

    /// Download what the staging folder lacks, except activation shards.
    fn pull(&self, reporter: &dyn Reporter) -> Result<(), RemoteError> {
        let objects = self.list()?;
        if let Ok(mut sizes) = self.sizes.lock() {
            sizes.extend(objects.iter().map(|(rel, m)| (rel.clone(), m.size)));
        }
        let want: Vec<(&String, &ObjectMeta)> =
            objects.iter().filter(|(rel, _)| !is_private(rel)).collect();
        let missing: Vec<(&String, &ObjectMeta)> = want
            .iter()
            .copied()
            .filter(|(rel, _)| !is_streamed(rel) && !self.local.join(rel.as_str()).exists())
            .collect();
        let total: u64 = missing.iter().map(|(_, m)| m.size).sum();
        let bar = (!missing.is_empty()).then(|| reporter.start("s3 download", Some(total)));
        for (rel, meta) in &missing {
            let path = self.local.join(rel.as_str());
            let key = meta.location.clone();
            let got = self.rt.block_on(async {
                let bytes = self.store.get(&key).await?.bytes().await?;
                crate::util::fs::atomic_write(&path, &bytes).map_err(|e| Fail::Io(path.clone(), e))
            });
            got.map_err(|e| self.named(rel, e))?;
            if let Some(b) = &bar {
                b.advance(meta.size);
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
        // Everything that now equals its object is in step, so the next push skips it.
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        for (rel, meta) in want {
            let Ok(m) = std::fs::metadata(self.local.join(rel.as_str())) else {
                continue;
            };
            let fresh =
                m.len() == meta.size && mtime_ms(&m) <= meta.last_modified.timestamp_millis();
            let downloaded = missing.iter().any(|(r, _)| *r == rel);
            if downloaded || fresh {
                synced.insert(
                    rel.clone(),
                    Synced {
                        size: m.len(),
                        mtime_ms: mtime_ms(&m),
                    },
                );
            } else {
                // The local file is newer than its object: the next push uploads it.
                synced.insert(
                    rel.clone(),
                    Synced {
                        size: u64::MAX,
                        mtime_ms: 0,
                    },
                );
            }
        }
        Ok(())
    }

    /// Upload what changed since it last matched its object; markers last (module doc).
    pub fn push(&self, reporter: &dyn Reporter) -> Result<(), RemoteError> {
        let files = walk(&self.local)?;
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let now: BTreeMap<&str, Synced> = files
            .iter()
            .map(|(rel, _, m)| {
                (
                    rel.as_str(),
                    Synced {
                        size: m.len(),
                        mtime_ms: mtime_ms(m),
                    },
                )
            })
            .collect();
        let changed: Vec<&(String, PathBuf, std::fs::Metadata)> = files
            .iter()
            .filter(|(rel, _, _)| synced.get(rel.as_str()) != now.get(rel.as_str()))
            .collect();
        // 1. Objects whose file is gone (a stale marker, a removed checkpoint) and markers
        //    about to be replaced: deleted first, so no marker outlives what it vouched for.
        //    Shards missing locally are only not downloaded, so they stay.
        let stale: Vec<String> = synced
            .keys()
            .filter(|rel| {
                let gone = !now.contains_key(rel.as_str()) && !is_streamed(rel);
                let replaced = rank(rel) > 0 && changed.iter().any(|(r, _, _)| r == *rel);
                gone || replaced
            })
            .cloned()
            .collect();
        for rel in &stale {
            let key = self.key(rel);
            match self.rt.block_on(self.store.delete(&key)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.named(rel, Fail::Store(e))),
            }
            synced.remove(rel);
        }
        // 2. Data, then markers, then results.
        let mut order = changed;
        order.sort_by_key(|(rel, _, _)| rank(rel));
        let total: u64 = order.iter().map(|(_, _, m)| m.len()).sum();
        if order.is_empty() {
            return Ok(());
        }
        let bar = reporter.start(&format!("s3 upload to {}", self.url()), Some(total));
        let threshold = multipart_threshold();
        for (rel, path, meta) in order {
            let key = self.key(rel);
            self.rt
                .block_on(upload(
                    self.store.as_ref(),
                    &key,
                    path,
                    meta.len(),
                    threshold,
                ))
                .map_err(|e| self.named(rel, e))?;
            synced.insert(rel.clone(), now[rel.as_str()]);
            bar.advance(meta.len());
        }
        bar.finish();
        Ok(())
    }

    /// Size of the object of `rel`.
    fn head(&self, rel: &str) -> Result<u64, RemoteError> {
        if let Some(n) = self.sizes.lock().ok().and_then(|s| s.get(rel).copied()) {
            return Ok(n);
        }
        let key = self.key(rel);
        let n = self
            .rt
            .block_on(self.store.head(&key))
            .map(|m| m.size)
            .map_err(|e| self.named(rel, Fail::Store(e)))?;
        if let Ok(mut s) = self.sizes.lock() {
            s.insert(rel.to_string(), n);
        }
        Ok(n)
    }

    fn get_range(&self, key: &Key, start: u64, end: u64) -> Result<Bytes, RemoteError> {
        self.rt
            .block_on(self.store.get_range(key, start..end))
            .map_err(|e| {
                let rel = key
                    .as_ref()
                    .strip_prefix(&format!("{}/", self.prefix))
                    .unwrap_or("")
                    .to_string();
                self.named(&rel, Fail::Store(e))
            })
    }
}

/// Upload `path` (`size` bytes) to `key`: one PUT below `threshold`, else a multipart
/// upload, aborted on error (never completed, so never visible).
async fn upload(
    store: &dyn ObjectStore,
    key: &Key,
    path: &Path,
    size: u64,
    threshold: u64,
) -> Result<(), Fail> {
    let io = |e| Fail::Io(path.to_path_buf(), e);
    if size < threshold {
        let data = std::fs::read(path).map_err(io)?;
        store.put(key, PutPayload::from(data)).await?;
        return Ok(());
    }
    let mut up = store.put_multipart(key).await?;
    let result: Result<(), Fail> = async {
        let mut file = File::open(path).map_err(io)?;
        let mut part = 0usize;
        loop {
            let mut buf = Vec::with_capacity(PART_BYTES);
            let n = (&mut file)
                .take(PART_BYTES as u64)
                .read_to_end(&mut buf)
                .map_err(io)?;
            if n == 0 && part > 0 {
                break;
            }
            up.put_part(PutPayload::from(buf)).await?;
            part += 1;
            if part == 1 {
                if let Some(d) = test_stall() {
                    eprintln!("s3: test stall: part 1 of {key} uploaded, not completed");
                    std::thread::sleep(d);
                }
            }
            if n < PART_BYTES {
                break;
            }
        }
        up.complete().await?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = up.abort().await;
    }
    result
}

/// An activation shard opened for reading: the local file, or its object read with ranged
/// GETs when only the object store has it.
#[derive(Debug)]
pub enum ShardFile {
    /// On local disk.
    Local(File),
    /// On the attached object store.
    Remote {
        /// The remote.
        remote: &'static Remote,
        /// The object.
        key: Key,
        /// Its size.
        len: u64,
    },
}

/// Open the shard `path` of the run folder: the local file when it is there, else its
/// object when a remote is attached.
pub fn open_shard(path: &Path) -> io::Result<ShardFile> {
    match File::open(path) {
        Ok(f) => Ok(ShardFile::Local(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let Some((remote, rel)) = remote_of(path) else {
                return Err(e);
            };
            let len = remote.head(&rel).map_err(to_io)?;
            Ok(ShardFile::Remote {
                remote,
                key: remote.key(&rel),
                len,
            })
        }
        Err(e) => Err(e),
    }
}

/// The size of shard `path`, local or remote (see [`open_shard`]).
pub fn shard_len(path: &Path) -> io::Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match remote_of(path) {
            Some((remote, rel)) => remote.head(&rel).map_err(to_io),
            None => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// The objects directly in folder `dir` of the run folder that were on the object store
/// when it was attached, as (file name, size); empty without a remote. Capture reads it
/// to find the shards other machines' tasks captured (`--shard I` tasks, then
/// `--finalize` elsewhere).
pub fn remote_files(dir: &Path) -> Vec<(String, u64)> {
    match ATTACHED.get() {
        Some(r) => remote_files_of(r, dir),
        None => Vec::new(),
    }
}

fn remote_files_of(r: &Remote, dir: &Path) -> Vec<(String, u64)> {
    let Some(rel) = r.rel_of(dir) else {
        return Vec::new();
    };
    let head = format!("{rel}/");
    let Ok(sizes) = r.sizes.lock() else {
        return Vec::new();
    };
    sizes
        .iter()
        .filter_map(|(k, n)| {
            let name = k.strip_prefix(&head)?;
            (!name.contains('/')).then(|| (name.to_string(), *n))
        })
        .collect()
}

fn remote_of(path: &Path) -> Option<(&'static Remote, String)> {
    let r = ATTACHED.get()?;
    let rel = r.rel_of(path)?;
    Some((r, rel))
}

fn to_io(e: RemoteError) -> io::Error {
    let kind = match &e {
        RemoteError::Request { msg, .. } if msg.contains("not found") => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

impl Length for ShardFile {
    fn len(&self) -> u64 {
        match self {
            ShardFile::Local(f) => f.len(),
            ShardFile::Remote { len, .. } => *len,
        }
    }
}

impl ChunkReader for ShardFile {
    type T = Box<dyn Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        match self {
            ShardFile::Local(f) => {
                let mut f = f.try_clone()?;
                f.seek(SeekFrom::Start(start))?;
                Ok(Box::new(BufReader::new(f)))
            }
            ShardFile::Remote { remote, key, len } => Ok(Box::new(RangedRead {
                remote,
                key: key.clone(),
                len: *len,
                pos: start,
                buf: Bytes::new(),
            })),
        }
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        match self {
            ShardFile::Local(f) => f.get_bytes(start, length),
            ShardFile::Remote { remote, key, len } => {
                let end = start + length as u64;
                if end > *len {
                    return Err(parquet::errors::ParquetError::EOF(format!(
                        "{key}: range {start}..{end} past the end ({len} bytes)"
                    )));
                }
                remote
                    .get_range(key, start, end)
                    .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
            }
        }
    }
}

/// A forward reader over an object, fetching [`READ_AHEAD`] bytes per ranged GET.
struct RangedRead {
    remote: &'static Remote,
    key: Key,
    len: u64,
    pos: u64,
    buf: Bytes,
}

impl Read for RangedRead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.len || out.is_empty() {
                return Ok(0);
            }
            let end = (self.pos + READ_AHEAD).min(self.len);
            self.buf = self
                .remote
                .get_range(&self.key, self.pos, end)
                .map_err(to_io)?;
            self.pos = end;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why() {
        assert_eq!(parse_url("data").unwrap(), None);
        assert_eq!(
            parse_url("s3://b/p/q/").unwrap(),
            Some(("b".to_string(), "p/q".to_string()))
        );
        assert_eq!(
            parse_url("s3://b").unwrap(),
            Some(("b".to_string(), String::new()))
        );
        assert!(parse_url("s3:///p").unwrap_err().contains("no bucket"));
        assert!(parse_url("gs://b/p")
            .unwrap_err()
            .contains("s3://bucket/prefix"));
    }

    #[test]
    fn markers_go_last_and_private_files_stay() {
        assert_eq!(rank("activations/h/part-00000.parquet"), 0);
        assert_eq!(rank("activations/h/manifest.json"), 1);
        assert_eq!(rank("saes/p/h/train_done.json"), 1);
        assert_eq!(rank("saes/p/h/metrics.json"), 1);
        assert_eq!(rank("results/metrics.parquet"), 2);
        assert!(is_private(".saepipe.lock"));
        assert!(is_private(".locks/capture-00000.lock"));
        assert!(is_private("saes/p/h/cfg.json.tmp"));
        assert!(!is_private("saes/p/h/cfg.json"));
        assert!(is_streamed("activations/h/eval/part-00001.parquet"));
        assert!(!is_streamed("saes/p/h/train_log.parquet"));
    }

    fn memory_remote(local: &Path) -> Remote {
        Remote {
            bucket: "b".into(),
            prefix: "p/run".into(),
            endpoint: "memory".into(),
            local: local.to_path_buf(),
            store: Arc::new(object_store::memory::InMemory::new()),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            synced: Mutex::new(BTreeMap::new()),
            sizes: Mutex::new(BTreeMap::new()),
        }
    }

    fn objects(r: &Remote) -> BTreeMap<String, Vec<u8>> {
        r.list()
            .unwrap()
            .into_iter()
            .map(|(rel, m)| {
                let b =
                    r.rt.block_on(async { r.store.get(&m.location).await?.bytes().await })
                        .unwrap();
                (rel, b.to_vec())
            })
            .collect()
    }

    #[test]
    fn push_uploads_changes_mirrors_deletions_and_keeps_streamed_shards() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path();
        let write =
            |rel: &str, b: &[u8]| crate::util::fs::atomic_write(&local.join(rel), b).unwrap();
        write("activations/h/part-00000.parquet", b"shard");
        write("activations/h/manifest.json", b"m1");
        write("saes/u/h/metrics.json", b"x");
        write(".saepipe.lock", b"");
        write("saes/u/h/cfg.json.tmp", b"half");
        let r = memory_remote(local);
        let quiet = crate::util::progress::reporter(crate::util::progress::ProgressMode::Off);
        r.push(quiet.as_ref()).unwrap();
        let got = objects(&r);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            [
                "activations/h/manifest.json",
                "activations/h/part-00000.parquet",
                "saes/u/h/metrics.json"
            ]
        );
        // A removed marker is removed remotely, a changed one replaced; a shard that is
        // only not on local disk (streamed) stays.
        std::fs::remove_file(local.join("saes/u/h/metrics.json")).unwrap();
        std::fs::remove_file(local.join("activations/h/part-00000.parquet")).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        write("activations/h/manifest.json", b"m2");
        r.push(quiet.as_ref()).unwrap();
        let got = objects(&r);
        assert_eq!(got.len(), 2, "{:?}", got.keys());
        assert_eq!(got["activations/h/manifest.json"], b"m2");
        assert_eq!(got["activations/h/part-00000.parquet"], b"shard");
        // Nothing changed: nothing to do (the next push returns without a request).
        r.push(quiet.as_ref()).unwrap();
        // A fresh staging folder pulls the small files, not the shard.
        let dir2 = tempfile::tempdir().unwrap();
        let r2 = Remote {
            store: r.store.clone(),
            ..memory_remote(dir2.path())
        };
        r2.pull(quiet.as_ref()).unwrap();
        assert_eq!(
            std::fs::read(dir2.path().join("activations/h/manifest.json")).unwrap(),
            b"m2"
        );
        assert!(!dir2
            .path()
            .join("activations/h/part-00000.parquet")
            .exists());
        assert_eq!(
            remote_files_of(&r2, &dir2.path().join("activations/h")),
            [
                ("manifest.json".to_string(), 2),
                ("part-00000.parquet".to_string(), 5)
            ]
        );
    }

    #[test]
    fn multipart_uploads_reassemble_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..(PART_BYTES * 2 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let r = memory_remote(dir.path());
        let key = r.key("big");
        r.rt.block_on(upload(r.store.as_ref(), &key, &path, data.len() as u64, 1))
            .map_err(|_| "upload failed")
            .unwrap();
        let got =
            r.rt.block_on(async { r.store.get(&key).await?.bytes().await })
                .unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data);
    }

    #[test]
    fn staging_folder_follows_bucket_prefix_and_run() {
        let d = staging_dir("b", "a/c", "r");
        assert!(d.ends_with("b/a/c/r"), "{}", d.display());
    }
}
