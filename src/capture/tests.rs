//! Capture, resume and reader tests on the toy model.

use std::path::Path;

use super::toy::{toy_corpus, toy_tokenizer, Toy};
use super::*;
use crate::data::{DocSplit, PackSpec, TextSource};
use crate::models::{Recorder, Site};
use crate::store::reader::{ActivationSet, Expect};
use crate::store::shuffle::{ShuffleConfig, ShuffleReader};
use crate::util::progress::Silent;

fn spec(dir: &Path, corpus: &Path) -> CaptureSpec {
    CaptureSpec {
        out_dir: dir.join("activations"),
        model_repo: "toy".into(),
        model_revision: "r1".into(),
        hookpoints: vec![
            Hookpoint::new(1, Site::MlpOut),
            Hookpoint::new(0, Site::ResidPost),
        ],
        source: TextSource::new([corpus.to_str().unwrap()]),
        pack: PackSpec::new(8),
        split: DocSplit {
            seed: 3,
            eval_fraction: 0.2,
        },
        n_tokens: 300,
        n_eval_tokens: 50,
        batch_size: 3,
        shard_windows: 7,
        dtype: ActDtype::F32,
        writer: WriterSettings {
            row_group_rows: 16,
            ..Default::default()
        },
        exclude_special_tokens: true,
        force: false,
    }
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("corpus.txt");
    std::fs::write(&c, toy_corpus(400)).unwrap();
    (d, c)
}

fn tree_bytes(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() {
                stack.push(e);
            } else {
                out.push((
                    e.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&e).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn budget_is_exact_and_matches_forward() {
    let (d, c) = setup();
    let model = Toy::new(104, 6, 3);
    let s = spec(d.path(), &c);
    let sums = capture(&model, toy_tokenizer(), &s, &Silent).unwrap();
    assert_eq!(sums.len(), 4);
    let hp = Hookpoint::new(1, Site::MlpOut);
    let set =
        ActivationSet::open(&set_dir(&s.out_dir, hp, Split::Train), &Expect::default()).unwrap();
    assert_eq!(set.n_tokens(), 300);
    assert!(set.manifest.shards.len() > 2, "several shards");
    let rows: Vec<_> = set.batches(50).collect::<Result<_, _>>().unwrap();
    let n: usize = rows.iter().map(|b| b.seq.len()).sum();
    assert_eq!(n, 300);
    // Recompute every window with a plain single-window forward and compare bit for bit.
    let windows: Vec<_> = crate::data::WindowStream::new(
        &s.source,
        toy_tokenizer(),
        &s.pack,
        s.split,
        Split::Train,
        crate::data::SpecialIds {
            bos: Some(1),
            eos: Some(2),
            pad: Some(0),
        },
    )
    .unwrap()
    .take(200)
    .collect::<Result<_, _>>()
    .unwrap();
    let mut checked = 0;
    for b in &rows {
        for i in 0..b.seq.len() {
            let w = &windows[b.seq[i] as usize];
            assert_eq!(w.ids[b.pos[i] as usize], b.token_id[i]);
            assert!(
                b.token_id[i] > 2,
                "special token {} captured",
                b.token_id[i]
            );
            let ids = Tensor::from_vec(w.ids.clone(), (1, 8), &candle_core::Device::Cpu).unwrap();
            let mut rec = Recorder::new([hp]);
            model.forward_hooked(&ids, &mut rec, None).unwrap();
            let a = rec.acts[&hp]
                .get(0)
                .unwrap()
                .get(b.pos[i] as usize)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = &b.act[i * 6..(i + 1) * 6];
            for (x, y) in a.iter().zip(got) {
                assert!(
                    (x - y).abs() <= 1e-6,
                    "seq {} pos {}: {x} vs {y}",
                    b.seq[i],
                    b.pos[i]
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 300);
    let ev = ActivationSet::open(
        &set_dir(&s.out_dir, hp, Split::Eval),
        &Expect {
            split: Some("eval".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ev.n_tokens(), 50);
}

#[test]
fn resume_is_bit_identical_and_skips_done_shards() {
    let (d, c) = setup();
    let model = Toy::new(104, 6, 3);
    let a = spec(&d.path().join("a"), &c);
    capture(&model, toy_tokenizer(), &a, &Silent).unwrap();
    let b = spec(&d.path().join("b"), &c);
    capture(&model, toy_tokenizer(), &b, &Silent).unwrap();
    // Simulate a kill: no manifests, one shard gone, one half-written tmp.
    let hp_dir = b.out_dir.join("blocks.1.hook_mlp_out");
    std::fs::remove_file(hp_dir.join(MANIFEST)).unwrap();
    std::fs::remove_file(hp_dir.join("eval").join(MANIFEST)).unwrap();
    std::fs::remove_file(hp_dir.join("part-00002.parquet")).unwrap();
    std::fs::write(hp_dir.join("part-00003.parquet.tmp"), b"PAR1 half").unwrap();
    let before = std::fs::metadata(hp_dir.join("part-00001.parquet"))
        .unwrap()
        .modified()
        .unwrap();
    let sums = capture(&model, toy_tokenizer(), &b, &Silent).unwrap();
    assert!(sums
        .iter()
        .filter(|s| s.hookpoint.layer == 0)
        .all(|s| s.skipped));
    assert_eq!(tree_bytes(&a.out_dir), tree_bytes(&b.out_dir));
    let after = std::fs::metadata(hp_dir.join("part-00001.parquet"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "a finished shard was rewritten");
}

#[test]
fn changed_config_is_refused_without_force() {
    let (d, c) = setup();
    let model = Toy::new(104, 6, 3);
    let mut s = spec(d.path(), &c);
    capture(&model, toy_tokenizer(), &s, &Silent).unwrap();
    s.n_tokens = 299;
    let err = capture(&model, toy_tokenizer(), &s, &Silent)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--force") && err.contains("config hash"),
        "{err}"
    );
    s.force = true;
    capture(&model, toy_tokenizer(), &s, &Silent).unwrap();
    let set = ActivationSet::open(
        &s.out_dir.join("blocks.0.hook_resid_post"),
        &Expect::default(),
    )
    .unwrap();
    assert_eq!(set.n_tokens(), 299);
}

#[test]
fn empty_and_small_corpus_fail_without_manifest() {
    let (d, c) = setup();
    std::fs::write(&c, "\n\n   \n").unwrap();
    let model = Toy::new(104, 6, 3);
    let s = spec(d.path(), &c);
    let err = capture(&model, toy_tokenizer(), &s, &Silent).unwrap_err();
    assert!(
        matches!(err, CaptureError::CorpusTooSmall { have: 0, .. }),
        "{err}"
    );
    assert!(!s
        .out_dir
        .join("blocks.1.hook_mlp_out")
        .join(MANIFEST)
        .exists());
}

#[test]
fn reader_names_mismatch_and_corruption() {
    let (d, c) = setup();
    let model = Toy::new(104, 6, 3);
    let s = spec(d.path(), &c);
    capture(&model, toy_tokenizer(), &s, &Silent).unwrap();
    let dir = s.out_dir.join("blocks.1.hook_mlp_out");
    let e = ActivationSet::open(
        &dir,
        &Expect {
            hookpoint: Some("blocks.0.hook_resid_post".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, StoreError::SchemaMismatch { key, .. } if key == "hookpoint"),
        "{e}"
    );
    let e = ActivationSet::open(
        &dir,
        &Expect {
            d_model: Some(7),
            model_revision: Some("r1".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("d_model is 6, expected 7"), "{e}");
    let e = ActivationSet::open(
        &dir,
        &Expect {
            model_revision: Some("r2".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("model_revision"), "{e}");
    // A shard from another hookpoint copied in.
    let other = s
        .out_dir
        .join("blocks.0.hook_resid_post")
        .join("part-00000.parquet");
    std::fs::copy(&other, dir.join("part-00000.parquet")).unwrap();
    let e = ActivationSet::open(&dir, &Expect::default()).unwrap_err();
    assert!(e.to_string().contains("config_hash"), "{e}");
    // A truncated shard.
    let p = dir.join("part-00001.parquet");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = super::reader::read_shard_meta(&p).unwrap_err();
    assert!(
        matches!(e, StoreError::Corrupt { .. }) && e.to_string().contains("part-00001"),
        "{e}"
    );
}

#[test]
fn shuffle_serves_every_row_once_seeded_and_resumable() {
    let (d, c) = setup();
    let model = Toy::new(104, 6, 3);
    let mut s = spec(d.path(), &c);
    s.dtype = ActDtype::F16;
    capture(&model, toy_tokenizer(), &s, &Silent).unwrap();
    let dir = s.out_dir.join("blocks.1.hook_mlp_out");
    let set = || ActivationSet::open(&dir, &Expect::default()).unwrap();
    let cfg = ShuffleConfig {
        batch_size: 32,
        capacity: 64,
        chunk_rows: 5,
        seed: 5,
        repeat: false,
    };
    let drain = |mut r: ShuffleReader| {
        let mut v = Vec::new();
        while let Some(b) = r.next_batch().unwrap() {
            v.push(b);
        }
        v
    };
    let all = drain(ShuffleReader::new(set(), cfg).unwrap());
    let seq: Vec<f32> = set().batches(1000).flat_map(|b| b.unwrap().act).collect();
    // Stored as f16: every value is exactly representable.
    assert!(seq.iter().all(|v| half::f16::from_f32(*v).to_f32() == *v));
    let key = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut a: Vec<_> = all.concat().chunks(6).map(key).collect();
    let mut b: Vec<_> = seq.chunks(6).map(key).collect();
    assert_ne!(a, b, "rows were not shuffled");
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(all, drain(ShuffleReader::new(set(), cfg).unwrap()));
    let mut r = ShuffleReader::new(set(), cfg).unwrap();
    r.next_batch().unwrap();
    r.next_batch().unwrap();
    let st = r.state();
    let rest = drain(ShuffleReader::resume(set(), cfg, st).unwrap());
    assert_eq!(rest, all[2..]);
    let other = drain(ShuffleReader::new(set(), ShuffleConfig { seed: 6, ..cfg }).unwrap());
    assert_ne!(other, all);
}

#[test]
fn parquet_source_feeds_the_trainer_and_seeks_exactly() {
    use crate::store::ActivationSource;
    let (d, c) = setup();
    let model = Toy::new(104, 6, 3);
    let s = spec(d.path(), &c);
    capture(&model, toy_tokenizer(), &s, &Silent).unwrap();
    let dir = s.out_dir.join("blocks.1.hook_mlp_out");
    let set = ActivationSet::open(&dir, &Expect::default()).unwrap();
    let cfg = ShuffleConfig {
        batch_size: 1,
        capacity: 50,
        chunk_rows: 3,
        seed: 9,
        repeat: false,
    };
    let mut src = crate::store::shuffle::ParquetSource::new(set.clone(), cfg).unwrap();
    assert_eq!((src.d_in(), src.len_rows()), (6, Some(300)));
    let mut all = Vec::new();
    // Uneven request sizes: the row sequence must not depend on them.
    for n in [7usize, 64, 1, 100, 1000] {
        src.next_batch(n, &mut all).unwrap();
    }
    assert_eq!(all.len(), 300 * 6);
    assert_eq!(src.next_batch(10, &mut all).unwrap(), 0);
    let mut again = crate::store::shuffle::ParquetSource::new(set, cfg).unwrap();
    again.seek(123).unwrap();
    assert_eq!(again.position(), 123);
    let mut rest = Vec::new();
    again.next_batch(1000, &mut rest).unwrap();
    assert_eq!(rest, all[123 * 6..]);
    assert!(again.seek(301).is_err());
}

#[test]
fn bf16_capture_reads_back_as_the_rounded_f32_capture() {
    let (d, c) = setup();
    let model = Toy::new(104, 6, 3);
    let full = spec(d.path(), &c);
    capture(&model, toy_tokenizer(), &full, &Silent).unwrap();
    let mut s = spec(d.path(), &c);
    s.out_dir = d.path().join("bf16");
    s.dtype = ActDtype::Bf16;
    capture(&model, toy_tokenizer(), &s, &Silent).unwrap();
    let hp = Hookpoint::new(1, Site::MlpOut);
    let read = |root: &Path| {
        let set =
            ActivationSet::open(&set_dir(root, hp, Split::Train), &Expect::default()).unwrap();
        (
            set.manifest.meta.dtype,
            set.batches(64)
                .flat_map(|b| b.unwrap().act)
                .collect::<Vec<f32>>(),
        )
    };
    let (dt32, want) = read(&full.out_dir);
    let (dt, got) = read(&s.out_dir);
    assert_eq!((dt32, dt), (ActDtype::F32, ActDtype::Bf16));
    assert_eq!(got.len(), want.len());
    assert!(want.iter().any(|v| half::bf16::from_f32(*v).to_f32() != *v));
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.to_bits(), half::bf16::from_f32(*w).to_f32().to_bits());
    }
}
