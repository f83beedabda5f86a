//! A tiny deterministic hookable model for the capture unit tests (no files, no
//! tokenizer): enough structure that every site differs and depends on earlier tokens.

use candle_core::{DType, Device, Tensor, D};

use crate::models::{HookedModel, Hookpoint, Hooks, ModelInfo, Site};

pub(crate) struct Toy {
    info: ModelInfo,
    emb: Tensor,
    w: Vec<Tensor>,
    dev: Device,
}

impl Toy {
    pub(crate) fn new(vocab: usize, d: usize, layers: usize) -> Self {
        let dev = Device::Cpu;
        let val = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        let emb = Tensor::from_vec(val(vocab * d, 1), (vocab, d), &dev)
            .expect("invariant: shape matches");
        let w = (0..layers)
            .map(|l| {
                (Tensor::from_vec(val(d * d, l + 2), (d, d), &dev).expect("invariant: shape")
                    / d as f64)
                    .expect("invariant")
            })
            .collect();
        Self {
            info: ModelInfo {
                model_type: "toy".into(),
                n_layers: layers,
                d_model: d,
                vocab_size: vocab,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                pad_token_id: Some(0),
            },
            emb,
            w,
            dev,
        }
    }
}

fn site(hooks: &mut dyn Hooks, hp: Hookpoint, x: Tensor) -> candle_core::Result<Tensor> {
    if hooks.wants(hp) {
        if let Some(r) = hooks.visit(hp, &x)? {
            return Ok(r);
        }
    }
    Ok(x)
}

impl HookedModel for Toy {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn device(&self) -> &Device {
        &self.dev
    }
    fn forward_hooked(
        &self,
        ids: &Tensor,
        hooks: &mut dyn Hooks,
        stop_after: Option<usize>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (b, t) = ids.dims2()?;
        let d = self.info.d_model;
        // 1. Embed: (b, t) → (b, t, d).
        let mut x = self
            .emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        // Causal mean over positions: (t, t) lower-triangular / row count.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 1.0 / (i + 1) as f32 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.dev)?;
        for (l, w) in self.w.iter().enumerate() {
            let hp = |s| Hookpoint::new(l, s);
            x = site(hooks, hp(Site::ResidPre), x)?;
            // 2. "Attention": causal mean then a linear map.
            let mixed = mask.broadcast_left(b)?.matmul(&x)?; // (b, t, d)
            let attn = site(hooks, hp(Site::AttnOut), mixed.broadcast_matmul(w)?)?;
            let mid = site(hooks, hp(Site::ResidMid), (&x + &attn)?)?;
            // 3. "MLP": normalise, map, ReLU.
            let norm = mid
                .sqr()?
                .mean_keepdim(D::Minus1)?
                .affine(1.0, 1e-5)?
                .sqrt()?;
            let mlp_in = site(hooks, hp(Site::MlpIn), mid.broadcast_div(&norm)?)?;
            let mlp_out = site(
                hooks,
                hp(Site::MlpOut),
                mlp_in.broadcast_matmul(&w.t()?)?.relu()?,
            )?;
            x = site(hooks, hp(Site::ResidPost), (&mid + &mlp_out)?)?;
            if stop_after == Some(l) {
                return Ok(None);
            }
        }
        Ok(Some(
            x.broadcast_matmul(&self.emb.t()?)?.to_dtype(DType::F32)?,
        ))
    }
}

/// Words `w0`..`w99` → ids 3..103, `<unk>` 103; `<pad>` 0, `<s>` 1, `</s>` 2 (special).
pub(crate) fn toy_tokenizer() -> std::sync::Arc<tokenizers::Tokenizer> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    let mut vocab: std::collections::HashMap<String, u32> = Default::default();
    vocab.insert("<unk>".into(), 103);
    for (i, t) in ["<pad>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i as u32);
    }
    for i in 0..100u32 {
        vocab.insert(format!("w{i}"), i + 3);
    }
    let wl = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .expect("invariant: the vocab holds <unk>");
    let mut t = tokenizers::Tokenizer::new(wl);
    t.with_pre_tokenizer(Some(WhitespaceSplit));
    t.add_special_tokens([
        tokenizers::AddedToken::from("<pad>", true),
        tokenizers::AddedToken::from("<s>", true),
        tokenizers::AddedToken::from("</s>", true),
    ])
    .expect("invariant: the tokens are new");
    std::sync::Arc::new(t)
}

/// `n` deterministic documents of 3–20 words, some holding `</s>` mid-text.
pub(crate) fn toy_corpus(n: usize) -> String {
    (0..n)
        .map(|i| {
            let len = 3 + (i * 7) % 18;
            (0..len)
                .map(|j| {
                    if (i + j) % 23 == 22 {
                        "</s>".to_string()
                    } else {
                        format!("w{}", (i * 31 + j * 17) % 100)
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}
