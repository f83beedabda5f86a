//! The hub download path without the network: a loopback HTTP server answers the hub's
//! resolve and listing URLs (with the headers hf-hub needs: X-Repo-Commit, ETag /
//! X-Linked-Etag, Content-Range, Location for LFS redirects, X-Error-Code on 404s) for a
//! generated tiny model, and the real `saepipe::hub` code downloads it into a temporary
//! cache (pipeline.md §5).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use saepipe::hub::{self, HubError, HubOptions};
use saepipe::models::ModelSource;
use saepipe::util::progress::Silent;
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const DATA_COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// One repo the fake hub serves.
#[derive(Clone)]
struct FakeRepo {
    /// "models" or "datasets".
    kind: &'static str,
    id: String,
    commit: String,
    /// Tags/branches that resolve to `commit`.
    refs: Vec<String>,
    files: BTreeMap<String, Vec<u8>>,
    /// Files served through a redirect to /cdn/<sha256> (as the hub does for LFS).
    lfs: Vec<String>,
}

struct FakeHub {
    url: String,
    stop: Arc<AtomicBool>,
    /// (path, Range header) of every request.
    log: Arc<Mutex<Vec<(String, String)>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    fn start(repos: Vec<FakeRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2, url2) = (stop.clone(), log.clone(), url.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: stops when told or after two minutes, whichever comes first.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve(stream, &repos, &log2, &url2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            url,
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.log.lock().unwrap().clone()
    }

    /// Requests that transferred file bodies (not the 1-byte metadata probes).
    fn body_downloads(&self) -> usize {
        self.requests()
            .iter()
            .filter(|(p, r)| {
                (p.contains("/resolve/") || p.starts_with("/cdn/")) && r != "bytes=0-0"
            })
            .count()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn serve_bytes(
    stream: &mut TcpStream,
    data: &[u8],
    range: &str,
    mut headers: Vec<(&str, String)>,
) -> std::io::Result<()> {
    let len = data.len();
    match range.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let start: usize = a.parse().unwrap_or(0).min(len);
            let end: usize = if b.is_empty() {
                len - 1
            } else {
                b.parse().unwrap_or(len - 1).min(len - 1)
            };
            headers.push(("Content-Range", format!("bytes {start}-{end}/{len}")));
            respond(stream, "206 Partial Content", &headers, &data[start..=end])
        }
        None => respond(stream, "200 OK", &headers, data),
    }
}

fn serve(
    mut stream: TcpStream,
    repos: &[FakeRepo],
    log: &Mutex<Vec<(String, String)>>,
    url: &str,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut range = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().to_string();
            }
        }
    }
    log.lock().unwrap().push((path.clone(), range.clone()));
    let not_found = |stream: &mut TcpStream, code: &str, commit: Option<&str>| {
        let mut h = vec![("X-Error-Code", code.to_string())];
        if let Some(c) = commit {
            h.push(("X-Repo-Commit", c.to_string()));
        }
        respond(stream, "404 Not Found", &h, code.as_bytes())
    };
    if let Some(sha) = path.strip_prefix("/cdn/") {
        for r in repos {
            for data in r.files.values() {
                if sha256(data) == sha {
                    return serve_bytes(&mut stream, data, &range, vec![]);
                }
            }
        }
        return respond(&mut stream, "404 Not Found", &[], b"");
    }
    let rev_ok = |r: &FakeRepo, rev: &str| rev == r.commit || r.refs.iter().any(|x| x == rev);
    if let Some(rest) = path.strip_prefix("/api/") {
        // /api/{kind}/{org}/{name}/revision/{rev}
        let parts: Vec<&str> = rest.split('/').collect();
        let Some(r) = repos.iter().find(|r| {
            parts.len() == 5 && r.kind == parts[0] && r.id == format!("{}/{}", parts[1], parts[2])
        }) else {
            return not_found(&mut stream, "RepoNotFound", None);
        };
        if !rev_ok(r, parts[4]) {
            return not_found(&mut stream, "RevisionNotFound", None);
        }
        let siblings: Vec<_> = r
            .files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "sha": r.commit, "siblings": siblings }).to_string();
        return respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
        );
    }
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(rest) => ("datasets", rest),
        None => ("models", &path[1..]),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return respond(&mut stream, "400 Bad Request", &[], b"");
    }
    let id = format!("{}/{}", parts[0], parts[1]);
    let Some(r) = repos.iter().find(|r| r.kind == kind && r.id == id) else {
        return not_found(&mut stream, "RepoNotFound", None);
    };
    if !rev_ok(r, parts[3]) {
        return not_found(&mut stream, "RevisionNotFound", None);
    }
    let Some(data) = r.files.get(parts[4]) else {
        return not_found(&mut stream, "EntryNotFound", Some(&r.commit));
    };
    let etag = format!("\"{}\"", sha256(data));
    if r.lfs.iter().any(|f| f == parts[4]) {
        let h = vec![
            ("Location", format!("{url}/cdn/{}", sha256(data))),
            ("X-Linked-Etag", etag),
            ("ETag", "\"git-pointer-etag\"".to_string()),
            ("X-Repo-Commit", r.commit.clone()),
        ];
        return respond(&mut stream, "302 Found", &h, b"");
    }
    serve_bytes(
        &mut stream,
        data,
        &range,
        vec![("ETag", etag), ("X-Repo-Commit", r.commit.clone())],
    )
}

/// A safetensors file with the given f32 tensors.
fn safetensors_bytes(tensors: &[(&str, Vec<usize>)]) -> Vec<u8> {
    let datas: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|j| ((i * 1000 + j) as f32).to_le_bytes())
                .collect();
            (name.to_string(), shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = datas
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn tiny_model_files() -> BTreeMap<String, Vec<u8>> {
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
    });
    let tokenizer = serde_json::json!({ "version": "1.0", "model": { "type": "WordLevel", "vocab": { "<unk>": 0, "<s>": 1, "</s>": 2 }, "unk_token": "<unk>" } });
    let mut files = BTreeMap::new();
    files.insert(
        "config.json".into(),
        serde_json::to_vec_pretty(&config).unwrap(),
    );
    files.insert(
        "tokenizer.json".into(),
        serde_json::to_vec_pretty(&tokenizer).unwrap(),
    );
    files
}

fn single_repo() -> FakeRepo {
    let mut files = tiny_model_files();
    files.insert(
        "tokenizer_config.json".into(),
        br#"{"add_bos_token": true}"#.to_vec(),
    );
    files.insert(
        "model.safetensors".into(),
        safetensors_bytes(&[
            ("model.embed_tokens.weight", vec![16, 8]),
            ("model.norm.weight", vec![8]),
        ]),
    );
    files.insert("README.md".into(), b"# tiny".to_vec());
    FakeRepo {
        kind: "models",
        id: "org/tiny".into(),
        commit: COMMIT.into(),
        refs: vec!["v1.0".into()],
        files,
        lfs: vec!["model.safetensors".into()],
    }
}

fn sharded_repo() -> FakeRepo {
    let mut files = tiny_model_files();
    let s1 = safetensors_bytes(&[("model.embed_tokens.weight", vec![16, 8])]);
    let s2 = safetensors_bytes(&[
        ("model.norm.weight", vec![8]),
        ("lm_head.weight", vec![16, 8]),
    ]);
    let index = serde_json::json!({
        "metadata": { "total_size": s1.len() + s2.len() },
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"
        }
    });
    files.insert(
        "model.safetensors.index.json".into(),
        serde_json::to_vec(&index).unwrap(),
    );
    files.insert("model-00001-of-00002.safetensors".into(), s1);
    files.insert("model-00002-of-00002.safetensors".into(), s2);
    FakeRepo {
        kind: "models",
        id: "org/sharded".into(),
        commit: "fedcba9876543210fedcba9876543210fedcba98".into(),
        refs: vec![],
        files,
        lfs: vec![
            "model-00001-of-00002.safetensors".into(),
            "model-00002-of-00002.safetensors".into(),
        ],
    }
}

fn dataset_repo() -> FakeRepo {
    let mut files = BTreeMap::new();
    files.insert(
        "data/train-00000.jsonl".into(),
        b"{\"text\": \"hello world\"}\n".to_vec(),
    );
    files.insert(
        "data/train-00001.jsonl".into(),
        b"{\"text\": \"second shard\"}\n".to_vec(),
    );
    files.insert(
        "data/nested/skip.jsonl".into(),
        b"{\"text\": \"nested\"}\n".to_vec(),
    );
    files.insert("README.md".into(), b"# corpus".to_vec());
    FakeRepo {
        kind: "datasets",
        id: "org/corpus".into(),
        commit: DATA_COMMIT.into(),
        refs: vec![],
        files,
        lfs: vec![],
    }
}

fn opts(hub: &FakeHub, cache: &Path, offline: bool) -> HubOptions {
    HubOptions {
        endpoint: hub.url.clone(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline,
    }
}

fn hub_src(repo: &str, rev: &str) -> ModelSource {
    ModelSource::Hub {
        repo: repo.into(),
        revision: Some(rev.into()),
    }
}

fn names(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn downloads_into_the_standard_cache_then_hits_it_and_works_offline() {
    let repo = single_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");

    let m = hub::resolve_model(
        &hub_src("org/tiny", COMMIT),
        &opts(&hub, &cache, false),
        &Silent,
    )
    .unwrap();
    let snapshot = cache
        .join("models--org--tiny")
        .join("snapshots")
        .join(COMMIT);
    assert_eq!(m.path, snapshot);
    assert_eq!(m.commit.as_deref(), Some(COMMIT));
    assert_eq!(
        names(&m.files),
        [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors"
        ]
    );
    for f in &m.files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            repo.files[name],
            "{name} arrived intact"
        );
        assert!(f.starts_with(&snapshot));
    }
    // Standard layout: blobs named by etag (the LFS sha256 for the redirected file).
    let st_sha = sha256(&repo.files["model.safetensors"]);
    assert!(cache
        .join("models--org--tiny/blobs")
        .join(&st_sha)
        .is_file());
    let st = std::fs::read(snapshot.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert_eq!(
        tensors.tensor("model.embed_tokens.weight").unwrap().shape(),
        [16, 8]
    );
    assert!(
        !hub.requests().iter().any(|(p, _)| p.contains("README")),
        "only the needed files"
    );
    // config, tokenizer, tokenizer_config directly; the weights through the redirect
    // (the ranged GET on resolve/, answered 302, then the body from the CDN URL).
    assert_eq!(hub.body_downloads(), 5, "{:#?}", hub.requests());
    assert!(hub
        .requests()
        .iter()
        .any(|(p, r)| p == &format!("/cdn/{st_sha}") && r == "bytes=0-"));

    // Second run: everything comes from the cache, no request at all.
    let before = hub.requests().len();
    let m2 = hub::resolve_model(
        &hub_src("org/tiny", COMMIT),
        &opts(&hub, &cache, false),
        &Silent,
    )
    .unwrap();
    assert_eq!(m2, m);
    assert_eq!(
        hub.requests().len(),
        before,
        "second run made requests: {:?}",
        &hub.requests()[before..]
    );

    // Offline from the cache.
    let m3 = hub::resolve_model(
        &hub_src("org/tiny", COMMIT),
        &opts(&hub, &cache, true),
        &Silent,
    )
    .unwrap();
    assert_eq!(m3, m);
    assert_eq!(hub.requests().len(), before);
}

#[test]
fn a_tag_revision_resolves_to_its_commit() {
    let hub = FakeHub::start(vec![single_repo()]);
    let tmp = tempfile::tempdir().unwrap();
    let m = hub::resolve_model(
        &hub_src("org/tiny", "v1.0"),
        &opts(&hub, tmp.path(), false),
        &Silent,
    )
    .unwrap();
    assert_eq!(m.commit.as_deref(), Some(COMMIT));
    assert_eq!(m.revision.as_deref(), Some("v1.0"));
    // The ref is recorded, so offline lookups by tag work too.
    let off = hub::resolve_model(
        &hub_src("org/tiny", "v1.0"),
        &opts(&hub, tmp.path(), true),
        &Silent,
    )
    .unwrap();
    assert_eq!(off.path, m.path);
}

#[test]
fn sharded_weights_bring_every_shard() {
    let repo = sharded_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let m = hub::resolve_model(
        &hub_src("org/sharded", &repo.commit),
        &opts(&hub, tmp.path(), false),
        &Silent,
    )
    .unwrap();
    assert_eq!(
        names(&m.files),
        [
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    let s2 = std::fs::read(m.path.join("model-00002-of-00002.safetensors")).unwrap();
    let t = safetensors::SafeTensors::deserialize(&s2).unwrap();
    assert_eq!(t.tensor("lm_head.weight").unwrap().shape(), [16, 8]);
    // The repo has no tokenizer_config.json and no model.safetensors: never fatal, and
    // the offline path finds the same files.
    let off = hub::resolve_model(
        &hub_src("org/sharded", &repo.commit),
        &opts(&hub, tmp.path(), true),
        &Silent,
    )
    .unwrap();
    assert_eq!(off.files, m.files);
    // Online again: the absence of tokenizer_config.json / model.safetensors was
    // remembered (.no_exist markers), so nothing is asked.
    let before = hub.requests().len();
    let again = hub::resolve_model(
        &hub_src("org/sharded", &repo.commit),
        &opts(&hub, tmp.path(), false),
        &Silent,
    )
    .unwrap();
    assert_eq!(again.files, m.files);
    assert_eq!(
        hub.requests().len(),
        before,
        "{:?}",
        &hub.requests()[before..]
    );
}

#[test]
fn offline_without_cache_says_what_is_missing_and_how_to_fix_it() {
    let hub = FakeHub::start(vec![single_repo()]);
    let tmp = tempfile::tempdir().unwrap();
    let err = hub::resolve_model(
        &hub_src("org/tiny", COMMIT),
        &opts(&hub, tmp.path(), true),
        &Silent,
    )
    .unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in [
        "org/tiny",
        COMMIT,
        "config.json",
        "saepipe download",
        "drop --offline",
    ] {
        assert!(msg.contains(needle), "'{needle}' missing from: {msg}");
    }
    assert!(
        hub.requests().is_empty(),
        "offline must not touch the network"
    );
}

#[test]
fn a_revision_that_does_not_exist_is_named() {
    let hub = FakeHub::start(vec![single_repo()]);
    let tmp = tempfile::tempdir().unwrap();
    let bad = "deadbeefdeadbeefdeadbeefdeadbeefdeadbeef";
    let err = hub::resolve_model(
        &hub_src("org/tiny", bad),
        &opts(&hub, tmp.path(), false),
        &Silent,
    )
    .unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(bad) && msg.contains("org/tiny") && msg.contains("does not exist"),
        "{msg}"
    );

    let err = hub::resolve_model(
        &hub_src("org/nope", COMMIT),
        &opts(&hub, tmp.path(), false),
        &Silent,
    )
    .unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("org/nope"));
}

fn data_config(files: &[&str]) -> saepipe::config::DataConfig {
    let toml = format!(
        "repo = \"org/corpus\"\nrevision = \"{DATA_COMMIT}\"\nfiles = {files:?}\ncontext_len = 8\nn_tokens = 64\n"
    );
    toml::from_str(&toml).unwrap()
}

#[test]
fn dataset_files_by_glob_and_by_name() {
    let repo = dataset_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let d = hub::resolve_dataset(
        &data_config(&["data/*.jsonl"]),
        &opts(&hub, tmp.path(), false),
        &Silent,
    )
    .unwrap();
    let snap = tmp
        .path()
        .join("datasets--org--corpus/snapshots")
        .join(DATA_COMMIT);
    assert_eq!(
        d.files,
        vec![
            snap.join("data/train-00000.jsonl"),
            snap.join("data/train-00001.jsonl")
        ]
    );
    assert_eq!(d.commit.as_deref(), Some(DATA_COMMIT));
    assert_eq!(
        std::fs::read(&d.files[1]).unwrap(),
        repo.files["data/train-00001.jsonl"]
    );
    assert!(hub
        .requests()
        .iter()
        .any(|(p, _)| p.starts_with("/api/datasets/org/corpus/revision/")));

    // Offline: the glob is matched against the cached snapshot.
    let before = hub.requests().len();
    let off = hub::resolve_dataset(
        &data_config(&["data/*.jsonl"]),
        &opts(&hub, tmp.path(), true),
        &Silent,
    )
    .unwrap();
    assert_eq!(off.files, d.files);
    assert_eq!(hub.requests().len(), before);

    // An explicit name needs no listing.
    let tmp2 = tempfile::tempdir().unwrap();
    let hub2 = FakeHub::start(vec![repo]);
    let one = hub::resolve_dataset(
        &data_config(&["README.md"]),
        &opts(&hub2, tmp2.path(), false),
        &Silent,
    )
    .unwrap();
    assert_eq!(one.files.len(), 1);
    assert!(!hub2.requests().iter().any(|(p, _)| p.starts_with("/api/")));

    let err = hub::resolve_dataset(
        &data_config(&["data/*.parquet"]),
        &opts(&hub2, tmp2.path(), false),
        &Silent,
    )
    .unwrap_err();
    assert!(err.to_string().contains("matches no file"), "{err}");
}

#[test]
fn download_command_writes_a_manifest() {
    let hub = FakeHub::start(vec![single_repo(), dataset_repo()]);
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let sets = vec![
        "model.source=org/tiny".to_string(),
        format!("model.revision={COMMIT}"),
        "data.repo=org/corpus".to_string(),
        format!("data.revision={DATA_COMMIT}"),
        "data.files=[\"data/*.jsonl\"]".to_string(),
        format!("run.data_dir={}", data_dir.display()),
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pipeline = saepipe::config::load(root.join("pipelines/smoke.toml"), &sets).unwrap();
    let cache = tmp.path().join("hub");
    let m = saepipe::pipeline::download::download(&pipeline, &opts(&hub, &cache, false), &Silent)
        .unwrap();
    let path = data_dir
        .join("smoke")
        .join(saepipe::pipeline::download::MANIFEST_FILE);
    assert!(path.is_file());
    let back = saepipe::pipeline::download::read_manifest(&data_dir.join("smoke")).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.config_hash, pipeline.hash());
    assert_eq!(back.model.commit.as_deref(), Some(COMMIT));
    assert_eq!(back.dataset.files.len(), 2);
    assert!(back
        .model
        .files
        .iter()
        .chain(&back.dataset.files)
        .all(|f| f.is_file()));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["model"]["repo"], "org/tiny");
}

#[test]
fn local_and_gguf_sources_pass_through_or_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let o = HubOptions {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: tmp.path().join("hub"),
        token: None,
        offline: false,
    };
    let dir = tmp.path().join("m");
    let err =
        hub::resolve_model(&ModelSource::Local { dir: dir.clone() }, &o, &Silent).unwrap_err();
    assert!(err.to_string().contains("no such folder"), "{err}");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in tiny_model_files() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let err =
        hub::resolve_model(&ModelSource::Local { dir: dir.clone() }, &o, &Silent).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors_bytes(&[("a", vec![2])]),
    )
    .unwrap();
    let m = hub::resolve_model(&ModelSource::Local { dir: dir.clone() }, &o, &Silent).unwrap();
    assert_eq!(
        (m.kind.as_str(), m.path.as_path()),
        ("local", dir.as_path())
    );
    assert_eq!(m.files.len(), 3);

    let gguf = tmp.path().join("m.gguf");
    let err =
        hub::resolve_model(&ModelSource::Gguf { file: gguf.clone() }, &o, &Silent).unwrap_err();
    assert!(err.to_string().contains("m.gguf"), "{err}");
    std::fs::write(&gguf, b"GGUF").unwrap();
    assert_eq!(
        hub::resolve_model(&ModelSource::Gguf { file: gguf.clone() }, &o, &Silent)
            .unwrap()
            .path,
        gguf
    );
}

/// Records every task and how far it got.
#[derive(Default)]
struct Recording(Mutex<Vec<Task>>);

/// (name, total, state).
type Task = (String, Option<u64>, TaskState);

/// (position, finished).
type TaskState = Arc<Mutex<(u64, bool)>>;

struct RecTask(TaskState);

impl saepipe::util::progress::Progress for RecTask {
    fn advance(&self, n: u64) {
        self.0.lock().unwrap().0 += n;
    }
    fn set_message(&self, _msg: String) {}
    fn set_position(&self, pos: u64) {
        self.0.lock().unwrap().0 = pos;
    }
    fn finish(&self) {
        self.0.lock().unwrap().1 = true;
    }
}

impl saepipe::util::progress::Reporter for Recording {
    fn start(&self, name: &str, total: Option<u64>) -> Box<dyn saepipe::util::progress::Progress> {
        let state = Arc::new(Mutex::new((0, false)));
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), total, state.clone()));
        Box::new(RecTask(state))
    }
    fn message(&self, _msg: &str) {}
}

#[test]
fn download_progress_goes_through_the_reporter() {
    let repo = single_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let rec = Recording::default();
    hub::resolve_model(
        &hub_src("org/tiny", COMMIT),
        &opts(&hub, tmp.path(), false),
        &rec,
    )
    .unwrap();
    let tasks = rec.0.lock().unwrap();
    let names: Vec<&str> = tasks.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors"
        ]
    );
    for (name, total, state) in tasks.iter() {
        let size = repo.files[name].len() as u64;
        let (pos, finished) = *state.lock().unwrap();
        assert_eq!((*total, pos, finished), (Some(size), size, true), "{name}");
    }
}
