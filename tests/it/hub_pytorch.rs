//! PyTorch-only checkpoints (issue 14 item 6): a revision that has only
//! `pytorch_model.bin` (Pythia's `stepN` branches), or a sharded
//! `pytorch_model.bin.index.json`, is downloaded through the hub code (a loopback server
//! answering the hub's resolve and listing URLs) and loaded with candle's restricted
//! pickle reader by the real binary; its activations equal those of the safetensors
//! version of the same weights. A pickle that calls a function is refused.
//!
//! The `.bin` files are written by Python's standard library only (`pickle`, `zipfile`),
//! mimicking torch's format (`archive/data.pkl` with persistent ids
//! `('storage', torch.FloatStorage, key, 'cpu', numel)` and
//! `torch._utils._rebuild_tensor_v2`, raw bytes in `archive/data/<key>`). The test fails
//! (does not skip) without python3; `SAEPIPE_PYTHON` picks the interpreter.

use crate::common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;

const COMMIT: &str = "1111111111111111111111111111111111111111";

/// Converts a safetensors file into torch zip checkpoints: `argv = [src, out_dir, mode]`,
/// mode `single` (pytorch_model.bin), `sharded` (index + 2 shards) or `evil` (a single
/// file whose state dict also holds a `posix.system` call).
const TORCH_WRITER: &str = r#"
import collections, json, os, pickle, struct, sys, types, zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
torch._utils = utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = utils

class FloatStorage: pass
class HalfStorage: pass
class BFloat16Storage: pass
for c in (FloatStorage, HalfStorage, BFloat16Storage):
    c.__module__ = "torch"
    setattr(torch, c.__name__, c)

def _rebuild_tensor_v2(*args): raise RuntimeError("never called")
_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2

STORAGE = {"F32": (FloatStorage, 4), "F16": (HalfStorage, 2), "BF16": (BFloat16Storage, 2)}

class Storage:
    def __init__(self, key, cls, numel, data):
        self.key, self.cls, self.numel, self.data = key, cls, numel, data

class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape
    def __reduce__(self):
        stride, s = [], 1
        for d in reversed(self.shape):
            stride.insert(0, s)
            s *= d
        return (_rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))

class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.path.join(sys.argv[2], "pwned"),))

class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None

def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    out = []
    for name, h in sorted(header.items()):
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        out.append((name, h["dtype"], h["shape"], body[a:b]))
    return out

def write_bin(path, tensors, evil=False):
    state = collections.OrderedDict()
    storages = []
    for i, (name, dtype, shape, data) in enumerate(tensors):
        cls, size = STORAGE[dtype]
        st = Storage(str(i), cls, len(data) // size, data)
        storages.append(st)
        state[name] = Tensor(st, shape)
    if evil:
        state["payload"] = Evil()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        import io
        buf = io.BytesIO()
        TorchPickler(buf, protocol=2).dump(state)
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
        for st in storages:
            z.writestr("archive/data/" + st.key, st.data)

src, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
tensors = read_safetensors(src)
if mode == "sharded":
    half = len(tensors) // 2
    parts = [tensors[:half], tensors[half:]]
    weight_map = {}
    for k, part in enumerate(parts):
        fname = "pytorch_model-%05d-of-%05d.bin" % (k + 1, len(parts))
        write_bin(os.path.join(out, fname), part)
        for t in part:
            weight_map[t[0]] = fname
    json.dump({"metadata": {}, "weight_map": weight_map},
              open(os.path.join(out, "pytorch_model.bin.index.json"), "w"))
else:
    write_bin(os.path.join(out, "pytorch_model.bin"), tensors, evil=(mode == "evil"))
"#;

fn python() -> String {
    std::env::var("SAEPIPE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The files of a hub repo holding `model`'s config, tokenizer and its weights as torch
/// checkpoints written in `mode`.
fn torch_repo(model: &Path, work: &Path, mode: &str) -> BTreeMap<String, Vec<u8>> {
    let out = work.join(mode);
    std::fs::create_dir_all(&out).unwrap();
    let st = Command::new(python())
        .arg("-c")
        .arg(TORCH_WRITER)
        .arg(model.join("model.safetensors"))
        .arg(&out)
        .arg(mode)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; install Python 3", python()));
    assert!(
        st.status.success(),
        "writing torch checkpoints failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let mut files = BTreeMap::new();
    for name in ["config.json", "tokenizer.json"] {
        files.insert(name.to_string(), std::fs::read(model.join(name)).unwrap());
    }
    for e in std::fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path();
        files.insert(
            p.file_name().unwrap().to_string_lossy().into_owned(),
            std::fs::read(&p).unwrap(),
        );
    }
    assert!(!files.keys().any(|k| k.ends_with(".safetensors")));
    files
}

/// A loopback hub: `GET /{org}/{name}/resolve/{rev}/{file}` (with the headers hf-hub needs)
/// and `GET /api/models/{org}/{name}/revision/{rev}` (the file list), for repos at
/// [`COMMIT`] that also answer to the branch `step143000`.
struct FakeHub {
    url: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    fn start(repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve(stream, &repos, &log2);
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
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(
    s: &mut TcpStream,
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
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

fn serve(
    mut stream: TcpStream,
    repos: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    use sha2::Digest;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().to_string();
            }
        }
    }
    log.lock().unwrap().push(path.clone());
    let missing = |s: &mut TcpStream, code: &str| {
        respond(
            s,
            "404 Not Found",
            &[
                ("X-Error-Code", code.to_string()),
                ("X-Repo-Commit", COMMIT.to_string()),
            ],
            code.as_bytes(),
        )
    };
    let rev_ok = |r: &str| r == COMMIT || r == "step143000";
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let p: Vec<&str> = rest.split('/').collect();
        let Some(files) = repos.get(&format!("{}/{}", p[0], p[1])) else {
            return missing(&mut stream, "RepoNotFound");
        };
        if p.len() != 4 || !rev_ok(p[3]) {
            return missing(&mut stream, "RevisionNotFound");
        }
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
        return respond(&mut stream, "200 OK", &[], body.as_bytes());
    }
    let p: Vec<&str> = path[1..].splitn(5, '/').collect();
    if p.len() != 5 || p[2] != "resolve" {
        return respond(&mut stream, "400 Bad Request", &[], b"");
    }
    let Some(files) = repos.get(&format!("{}/{}", p[0], p[1])) else {
        return missing(&mut stream, "RepoNotFound");
    };
    if !rev_ok(p[3]) {
        return missing(&mut stream, "RevisionNotFound");
    }
    let Some(data) = files.get(p[4]) else {
        return missing(&mut stream, "EntryNotFound");
    };
    let mut headers = vec![
        (
            "ETag",
            format!("\"{}\"", hex::encode(sha2::Sha256::digest(data))),
        ),
        ("X-Repo-Commit", COMMIT.to_string()),
    ];
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
            respond(
                &mut stream,
                "206 Partial Content",
                &headers,
                &data[start..=end],
            )
        }
        None => respond(&mut stream, "200 OK", &headers, data),
    }
}

fn saepipe(hub: &FakeHub, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_saepipe"));
    c.env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN");
    c
}

/// `saepipe download` of `repo@step143000`; returns the snapshot folder.
fn download(hub: &FakeHub, tmp: &Path, repo: &str) -> PathBuf {
    std::fs::create_dir_all(tmp.join("corpus")).unwrap();
    let corpus = common::write_corpus(&tmp.join("corpus"), 4, 1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = tmp.join("hub");
    let out = saepipe(hub, &cache)
        .arg("download")
        .arg(root.join("pipelines/smoke.toml"))
        .args(["--set", &format!("model.source={repo}")])
        .args(["--set", "model.revision=step143000"])
        .args(["--set", &format!("data.files=[\"{}\"]", corpus.display())])
        .args([
            "--set",
            &format!("run.data_dir={}", tmp.join("data").display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "download {repo}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(COMMIT)
}

const HOOKS: &str = "blocks.0.hook_resid_post,blocks.1.hook_mlp_out,blocks.2.hook_attn_out";

/// `saepipe trace` of `dir`: the activations and logits by name, or the error text.
fn trace(
    hub: &FakeHub,
    tmp: &Path,
    dir: &Path,
    out: &str,
) -> Result<BTreeMap<String, Vec<f32>>, String> {
    let path = tmp.join(out);
    let o = saepipe(hub, &tmp.join("hub"))
        .args(["trace", &format!("local:{}", dir.display())])
        .args(["--token-ids", "1,5,9,40,77,3,2"])
        .args(["--hookpoints", HOOKS])
        .arg("--logits")
        .arg("--out")
        .arg(&path)
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    Ok(t.into_iter()
        .filter(|(k, _)| k != "token_ids")
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect())
}

#[test]
fn pytorch_only_revisions_download_and_load_like_safetensors_and_code_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let model = common::tiny_gpt_neox(&tmp.join("st"), 11);
    let mut repos = BTreeMap::new();
    repos.insert("org/pt".to_string(), torch_repo(&model, tmp, "single"));
    repos.insert(
        "org/pt-sharded".to_string(),
        torch_repo(&model, tmp, "sharded"),
    );
    repos.insert("org/evil".to_string(), torch_repo(&model, tmp, "evil"));
    let hub = FakeHub::start(repos);

    let want = trace(&hub, tmp, &model, "st.safetensors").unwrap();
    assert_eq!(want.len(), 4);

    // One pytorch_model.bin: chosen from the hub's file list of the revision.
    let single = download(&hub, tmp, "org/pt");
    assert!(single.join("pytorch_model.bin").is_file());
    assert!(hub
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|p| p.starts_with("/api/models/org/pt/revision/step143000")));
    let got = trace(&hub, tmp, &single, "single.safetensors").unwrap();
    assert_eq!(got, want, "activations of pytorch_model.bin == safetensors");
    // A second download is served by the cache: no request at all.
    let before = hub.log.lock().unwrap().len();
    download(&hub, tmp, "org/pt");
    assert_eq!(hub.log.lock().unwrap().len(), before);

    // Sharded: the index and every shard it lists.
    let sharded = download(&hub, tmp, "org/pt-sharded");
    for f in [
        "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ] {
        assert!(sharded.join(f).is_file(), "{f}");
    }
    let got = trace(&hub, tmp, &sharded, "sharded.safetensors").unwrap();
    assert_eq!(got, want, "activations of the sharded .bin == safetensors");

    // A pickle that calls os.system is refused, naming the file and the call; nothing ran.
    let evil = download(&hub, tmp, "org/evil");
    let err = trace(&hub, tmp, &evil, "evil.safetensors").unwrap_err();
    assert!(
        err.contains("pytorch_model.bin")
            && err.contains("system")
            && err.contains("refusing to load"),
        "{err}"
    );
    assert!(!tmp.join("evil").join("pwned").exists());
    assert!(!tmp.join("evil.safetensors").exists());
}
