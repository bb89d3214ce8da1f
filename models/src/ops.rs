//! Fused CPU ops with hand-written backward passes, for the spots where candle's generic
//! autograd is slow on the CPU:
//!
//! * [`add_bias`]: `x + bias` over the rows of `x`. Candle's broadcast backward sums the
//!   gradient over the broadcast dimensions with a per-element index computation; here the
//!   bias gradient is a plain column sum.
//! * [`scale_shift`]: `x * weight + bias` over the rows (the affine part of layer norm), with
//!   the same column sums for `weight` and `bias`.
//! * [`gelu`]: the tanh approximation (as candle's `gelu`), whose candle backward calls `powf`
//!   twice per element; here it is one pass of multiplications.
//!
//! On other devices (CUDA, Metal) each function falls back to the equivalent candle ops. The
//! tests check values and gradients against those candle ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `x + bias` with `x` shaped `[.., n]` and `bias` `[n]`.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.broadcast_add(bias);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

/// `x * weight + bias` with `x` shaped `[.., n]` and `weight`, `bias` `[n]`.
pub fn scale_shift(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.broadcast_mul(weight)?.broadcast_add(bias);
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, ScaleShift)
}

/// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Gelu)
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

/// `tanh` as a rational function of odd degree 13 over degree 6 (the form Eigen and PyTorch's
/// vectorized CPU kernels use), within 5e-7 of `f32::tanh`; plain arithmetic that the compiler
/// vectorizes, where libm's `tanhf` costs tens of nanoseconds per call.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn fast_tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let p = ((((((-2.760_768_5e-16 * x2 + 2.000_187_9e-13) * x2 - 8.604_671_5e-11) * x2
        + 5.122_297_1e-8)
        * x2
        + 1.485_722_4e-5)
        * x2
        + 6.372_619_3e-4)
        * x2
        + 4.893_524_6e-3)
        * x;
    let q = ((1.198_258_4e-6 * x2 + 1.185_347_1e-4) * x2 + 2.268_434_6e-3) * x2 + 4.893_525_2e-3;
    p / q
}

/// The f32 contents of a contiguous CPU tensor argument.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only");
    };
    Ok(&v[a..b])
}

/// The width of the rows of `l`, checked against a per-column vector of `n` values.
fn row_width(l: &Layout, n: usize, op: &str) -> Result<usize> {
    let width = l.dims().last().copied().unwrap_or(1);
    if width != n || width == 0 {
        candle_core::bail!("{op}: rows of {width} against a vector of {n}");
    }
    Ok(width)
}

/// Sums the rows of `x` (`[.., n]`) into one row of `n` (autograd-free: used in backward).
fn column_sums(x: &Tensor) -> Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(1);
    x.contiguous()?.apply_op1_no_bwd(&ColumnSums(n))
}

struct ColumnSums(usize);

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let n = row_width(l, self.0, self.name())?;
        let mut out = vec![0f32; n];
        for row in x.chunks_exact(n) {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, bias) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let n = row_width(l1, bias.len(), self.name())?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(n) {
            out.extend(row.iter().zip(bias).map(|(v, b)| v + b));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(column_sums(grad)?)))
    }
}

struct ScaleShift;

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "scale-shift"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (w, b) = (
            f32_slice(s2, l2, self.name())?,
            f32_slice(s3, l3, self.name())?,
        );
        let n = row_width(l1, w.len(), self.name())?;
        row_width(l1, b.len(), self.name())?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(n) {
            out.extend(row.iter().zip(w).zip(b).map(|((v, w), b)| v * w + b));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // d/dx = grad * weight (a row-wise scaling: the same op with a zero shift).
        let zeros = weight.zeros_like()?;
        let grad_x =
            grad.contiguous()?
                .apply_op3_no_bwd(&weight.contiguous()?, &zeros, &ScaleShift)?;
        let grad_w = column_sums(&(grad * x)?)?;
        Ok((Some(grad_x), Some(grad_w), Some(column_sums(grad)?)))
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let out = x
            .iter()
            .map(|&v| 0.5 * v * (1.0 + fast_tanh(SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v))))
            .collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op2_no_bwd(&x.contiguous()?, &GeluGrad)?,
        ))
    }
}

/// `grad * gelu'(x)`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (grad, x) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        if grad.len() != x.len() {
            candle_core::bail!("{}: gradient and input lengths differ", self.name());
        }
        let out = grad
            .iter()
            .zip(x)
            .map(|(&g, &v)| {
                let inner = SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v);
                let t = fast_tanh(inner);
                let d_inner = SQRT_TWO_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v);
                g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * d_inner)
            })
            .collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Largest absolute difference between two tensors of the same shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Values and gradients of `fused` and `reference` on the same inputs agree.
    fn check(
        shapes: &[&[usize]],
        fused: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| {
                Var::from_tensor(&Tensor::randn(0f32, 1.5, *s, &Device::Cpu).unwrap()).unwrap()
            })
            .collect();
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        // A loss that weighs every output differently, so wrong gradients show.
        let weights = Tensor::randn(0f32, 1.0, fused(&inputs).shape(), &Device::Cpu).unwrap();
        let (a, b) = (fused(&inputs), reference(&inputs));
        assert!(max_diff(&a, &b) < 1e-5, "values differ");
        let ga = (&a * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (&b * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(max_diff(x, y) < 1e-4, "gradient of input {i} differs");
        }
    }

    #[test]
    fn fast_tanh_is_within_5e7_of_tanh() {
        let worst = (-1_000_000..=1_000_000)
            .map(|i| i as f32 * 1e-5)
            .chain([-20.0, -8.0, 8.0, 20.0, f32::MAX, f32::MIN])
            .map(|x| (fast_tanh(x) - x.tanh()).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 5e-7, "worst error {worst:e}");
    }

    #[test]
    fn add_bias_matches_broadcast_add_with_gradients() {
        check(
            &[&[3, 5, 7], &[7]],
            |t| add_bias(&t[0], &t[1]).unwrap(),
            |t| t[0].broadcast_add(&t[1]).unwrap(),
        );
    }

    #[test]
    fn scale_shift_matches_broadcast_ops_with_gradients() {
        check(
            &[&[4, 6, 8], &[8], &[8]],
            |t| scale_shift(&t[0], &t[1], &t[2]).unwrap(),
            |t| {
                t[0].broadcast_mul(&t[1])
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
        );
    }

    #[test]
    fn gelu_matches_candle_with_gradients() {
        check(
            &[&[5, 33]],
            |t| gelu(&t[0]).unwrap(),
            |t| t[0].gelu().unwrap(),
        );
    }

    #[test]
    fn mismatched_shapes_are_errors_not_panics() {
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(add_bias(&x, &b).is_err());
        assert!(scale_shift(&x, &b, &b).is_err());
    }
}
