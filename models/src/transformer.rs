//! [`CharTransformer`]: a small decoder-only (GPT-style) transformer over characters.
//!
//! Tensors: `tok_emb.weight` `[vocab, dim]`, `pos_emb.weight` `[context, dim]`, per block `i`
//! `blocks.i.ln1`, `blocks.i.attn.qkv` (`[3 dim, dim]`), `blocks.i.attn.proj`, `blocks.i.ln2`,
//! `blocks.i.mlp.fc` (`[4 dim, dim]`), `blocks.i.mlp.out`, then `ln_f` and `head`
//! (`[vocab, dim]`). Pre-norm residual blocks, causal multi-head attention, GELU.
//!
//! Layer norm is written out in tensor ops here: candle's fused layer-norm kernel has no
//! backward pass, so training through it would leave its inputs without gradients.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};

use crate::layers::Dense;
use crate::ops;

/// Shape of the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformerConfig {
    /// Token ids are below this.
    pub vocab: usize,
    /// Longest sequence.
    pub context: usize,
    /// Embedding width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Blocks.
    pub layers: usize,
}

/// Layer norm with learned scale and shift, differentiable end to end.
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn new(dim: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
        })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normalized = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        ops::scale_shift(&normalized, &self.weight, &self.bias)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln1: Norm,
    qkv: Dense,
    proj: Dense,
    ln2: Norm,
    fc: Dense,
    out: Dense,
    heads: usize,
}

impl Block {
    fn new(cfg: &TransformerConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            ln1: Norm::new(d, vb.pp("ln1"))?,
            qkv: Dense::new(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: Dense::new(d, d, vb.pp("attn.proj"))?,
            ln2: Norm::new(d, vb.pp("ln2"))?,
            fc: Dense::new(d, 4 * d, vb.pp("mlp.fc"))?,
            out: Dense::new(4 * d, d, vb.pp("mlp.out"))?,
            heads: cfg.heads,
        })
    }

    /// `mask`: `[t, t]`, 0 on and below the diagonal, a large negative number above.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?;
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * c, c)?
                .reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        let x = (x + self.proj.forward(&y)?)?;
        let h = ops::gelu(&self.fc.forward(&self.ln2.forward(&x)?)?)?;
        x + self.out.forward(&h)?
    }
}

/// A character-level language model: logits for the next character at every position.
#[derive(Debug, Clone)]
pub struct CharTransformer {
    tok_emb: Embedding,
    pos_emb: Embedding,
    blocks: Vec<Block>,
    ln_f: Norm,
    head: Dense,
    config: TransformerConfig,
}

impl CharTransformer {
    /// Builds the model's tensors under `vb`.
    pub fn new(cfg: TransformerConfig, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            tok_emb: embedding(cfg.vocab, cfg.dim, vb.pp("tok_emb"))?,
            pos_emb: embedding(cfg.context, cfg.dim, vb.pp("pos_emb"))?,
            blocks: (0..cfg.layers)
                .map(|i| Block::new(&cfg, vb.pp(format!("blocks.{i}"))))
                .collect::<Result<Vec<_>>>()?,
            ln_f: Norm::new(cfg.dim, vb.pp("ln_f"))?,
            head: Dense::new(cfg.dim, cfg.vocab, vb.pp("head"))?,
            config: cfg,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }
}

/// The causal mask for sequences of `t`: 0 where a position may attend, -1e9 where not.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { -1e9 }))
        .collect();
    Tensor::from_vec(values, (t, t), device)
}

impl Module for CharTransformer {
    /// `tokens`: `[batch, t]` u32 ids with `t <= context`; returns `[batch, t, vocab]`.
    fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        if t > self.config.context {
            candle_core::bail!(
                "sequence of {t} is longer than the context of {}",
                self.config.context
            );
        }
        let device = tokens.device();
        let positions = Tensor::arange(0u32, t as u32, device)?;
        let mut x = self
            .tok_emb
            .forward(tokens)?
            .broadcast_add(&self.pos_emb.forward(&positions)?)?;
        let mask = causal_mask(t, device)?.to_dtype(DType::F32)?;
        for block in &self.blocks {
            x = block.forward(&x, &mask)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?)
    }
}
