//! [`Dense`]: a linear layer with candle `Linear`'s tensors (`weight` `[out, in]`, `bias`
//! `[out]`), names and initialization, computed as one 2-D matrix product plus
//! [`ops::add_bias`], whose backward pass is cheap on the CPU.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops;

/// `x W^T + b` over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    /// A layer from `inputs` to `outputs` features, its tensors under `vb`.
    pub fn new(inputs: usize, outputs: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let linear = candle_nn::linear(inputs, outputs, vb)?;
        let Some(bias) = linear.bias().cloned() else {
            candle_core::bail!("a linear layer without bias");
        };
        Ok(Self {
            weight: linear.weight().clone(),
            bias,
        })
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&features, leading)) = dims.split_last() else {
            candle_core::bail!("a linear layer needs at least one dimension");
        };
        let rows = leading.iter().product::<usize>();
        let y = x.reshape((rows, features))?.matmul(&self.weight.t()?)?;
        let y = ops::add_bias(&y, &self.bias)?;
        let mut out = leading.to_vec();
        out.push(self.bias.dim(0)?);
        y.reshape(out)
    }
}
