//! [`Mlp`]: a multi-layer perceptron for digit images. Layers are `fc1`, `fc2`, ... (candle
//! `Linear`: `weight` shaped `[out, in]`, `bias` shaped `[out]`, computing `x W^T + b`), with
//! ReLU between them and raw logits out. Inputs are pixel values scaled to 0..=1 (digits
//! divided by 16, MNIST by 255).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::Dense;

/// A stack of linear layers with ReLU between.
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Dense>,
}

impl Mlp {
    /// Layers between consecutive widths of `dims` (`[input, hidden..., classes]`), named
    /// `fc1`, `fc2`, ... under `vb`.
    pub fn new(dims: &[usize], vb: VarBuilder<'_>) -> Result<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| Dense::new(w[0], w[1], vb.pp(format!("fc{}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let last = self.layers.len().saturating_sub(1);
        let mut x = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i < last {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}
