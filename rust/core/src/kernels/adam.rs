//! Adam / AdamW (decoupled weight decay) with AMSGrad and maximize, operation
//! for operation as torch's `_single_tensor_adam` on its vectorised CPU path.

use super::declare::{self, optimizer, Arrays, Bound, LaneUpdate, PerElement};
use crate::dispatch::Element;
use crate::engine::Exec;
use crate::error::{Error, Result};
use crate::optimizer::Optimizer;
use crate::simd::Lanes;
use crate::tensors::{ScalarState, TensorBatch};

optimizer! {
    /// Adam hyper-parameters of one parameter group: Adam and AdamW (torch's
    /// AdamW is Adam with `decoupled_weight_decay=True`).
    pub struct AdamConfig = "adam" {
        lr: f64,
        betas: (beta1, beta2),
        eps: f64,
        weight_decay: f64,
        amsgrad: bool,
        maximize: bool,
        /// AdamW: decay the parameter instead of adding `weight_decay * param` to the gradient.
        decoupled_weight_decay: bool,
    }
    state: ["exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad],
    scalars: ["step"],
}

impl AdamConfig {
    /// Arrays per slot: `[param, grad, exp_avg, exp_avg_sq(, max_exp_avg_sq)]`.
    pub fn arity(&self) -> usize {
        2 + self.state_keys().len()
    }
}

/// One Adam step over a batch; `steps[i]` is slot i's step count *after*
/// this step's increment (it sets the bias corrections).
pub fn adam_step(
    config: &AdamConfig,
    batch: &TensorBatch,
    steps: &[f64],
    exec: Exec,
) -> Result<()> {
    if batch.arity() != config.arity() {
        return Err(Error::Mismatch(format!(
            "Adam expects {} arrays per tensor, got {}",
            config.arity(),
            batch.arity()
        )));
    }
    if steps.len() != batch.slots() {
        return Err(Error::Mismatch(format!(
            "{} step counts for {} tensors",
            steps.len(),
            batch.slots()
        )));
    }
    let per_slot: Vec<BiasCorrection> = steps
        .iter()
        .map(|&step| BiasCorrection::new(config, step))
        .collect();
    declare::run(config, &per_slot, batch, exec);
    Ok(())
}

/// Step-dependent scalars, computed in f64 as torch computes them in Python.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BiasCorrection {
    step_size: f64,
    bias_correction2_sqrt: f64,
}

impl BiasCorrection {
    pub(crate) fn new(c: &AdamConfig, step: f64) -> BiasCorrection {
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2 = 1.0 - c.beta2.powf(step);
        BiasCorrection {
            step_size: c.lr / bias_correction1,
            bias_correction2_sqrt: bias_correction2.powf(0.5),
        }
    }
}

impl PerElement for AdamConfig {
    type Slot = BiasCorrection;
    type Update<T: Element> = AdamUpdate<T>;

    fn advance(&self, scalars: &mut ScalarState, slot: usize) -> BiasCorrection {
        BiasCorrection::new(self, scalars.increment(slot, 0))
    }

    fn update<T: Element>(&self, bc: BiasCorrection) -> AdamUpdate<T> {
        // torch's lerp: weight w < 0.5 gives start + w (end - start), else end + (w - 1)(end - start).
        let lerp_weight = T::from_f64(1.0 - self.beta1);
        let lerp_small = lerp_weight.abs() < T::from_f64(0.5);
        AdamUpdate {
            lerp_coeff: if lerp_small {
                lerp_weight
            } else {
                lerp_weight - T::ONE
            },
            lerp_from_start: lerp_small,
            beta2: T::from_f64(self.beta2),
            one_minus_beta2: T::from_f64(1.0 - self.beta2),
            eps: T::from_f64(self.eps),
            step_size_neg: T::from_f64(-bc.step_size),
            bias_correction2_sqrt: T::from_f64(bc.bias_correction2_sqrt),
            weight_decay: T::from_f64(self.weight_decay),
            param_decay: T::from_f64(1.0 - self.lr * self.weight_decay),
            coupled_decay: self.weight_decay != 0.0 && !self.decoupled_weight_decay,
            decoupled_decay: self.weight_decay != 0.0 && self.decoupled_weight_decay,
            amsgrad: self.amsgrad,
            maximize: self.maximize,
        }
    }
}

/// Adam's per-element update, shared with the block-wise 8-bit kernel (which
/// runs it on dequantised copies of its state).
pub(crate) struct AdamUpdate<T> {
    lerp_coeff: T,
    lerp_from_start: bool,
    beta2: T,
    one_minus_beta2: T,
    eps: T,
    step_size_neg: T,
    bias_correction2_sqrt: T,
    weight_decay: T,
    param_decay: T,
    coupled_decay: bool,
    decoupled_decay: bool,
    amsgrad: bool,
    maximize: bool,
}

/// Adam's update bound to raw arrays, as the 8-bit kernel runs it.
pub(crate) type AdamBlock<T> = Bound<AdamUpdate<T>, T>;

impl<T: Element> AdamBlock<T> {
    /// The update of `(param, grad)` and `[exp_avg, exp_avg_sq,
    /// max_exp_avg_sq]` (the last null unless AMSGrad), each pointing at as
    /// many elements as the block is run over.
    pub(crate) fn new(
        c: &AdamConfig,
        bc: BiasCorrection,
        (param, grad): (*mut T, *const T),
        [exp_avg, exp_avg_sq, max_exp_avg_sq]: [*mut T; 3],
    ) -> AdamBlock<T> {
        let mut arrays: Arrays<T> = [std::ptr::null_mut(); crate::tensors::MAX_ARITY];
        // The gradient is only read (see `LaneUpdate`).
        arrays[..5].copy_from_slice(&[param, grad.cast_mut(), exp_avg, exp_avg_sq, max_exp_avg_sq]);
        Bound {
            update: c.update(bc),
            arrays,
        }
    }
}

impl<T: Element> LaneUpdate<T> for AdamUpdate<T> {
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(
        &self,
        s: S,
        [param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, ..]: Arrays<T>,
    ) {
        // SAFETY: the caller's pointers are valid for S::WIDTH elements; the
        // AMSGrad array is only touched when it was passed.
        unsafe {
            let mut p = s.load(param);
            let mut g = s.load(grad);
            if self.maximize {
                g = s.mul(g, s.splat(-T::ONE));
            }
            if self.decoupled_decay {
                p = s.mul(p, s.splat(self.param_decay));
            } else if self.coupled_decay {
                g = s.mul_add(p, s.splat(self.weight_decay), g);
            }
            // exp_avg.lerp_(grad, 1 - beta1)
            let m = s.load(exp_avg);
            let diff = s.sub(g, m);
            let m = s.mul_add(
                s.splat(self.lerp_coeff),
                diff,
                if self.lerp_from_start { m } else { g },
            );
            s.store(exp_avg, m);
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): torch's
            // CPU addcmul is one FMA, fma(value * grad, grad, self).
            let v = s.mul(s.load(exp_avg_sq), s.splat(self.beta2));
            let v = s.mul_add(s.mul(s.splat(self.one_minus_beta2), g), g, v);
            s.store(exp_avg_sq, v);
            let second = if self.amsgrad {
                let vmax = s.max(s.load(max_exp_avg_sq), v);
                s.store(max_exp_avg_sq, vmax);
                vmax
            } else {
                v
            };
            // denom = second.sqrt() / bias_correction2_sqrt + eps
            let denom = s.add(
                s.div(s.sqrt(second), s.splat(self.bias_correction2_sqrt)),
                s.splat(self.eps),
            );
            // param.addcdiv_(exp_avg, denom, value=-step_size)
            p = s.add(p, s.div(s.mul(s.splat(self.step_size_neg), m), denom));
            s.store(param, p);
        }
    }
}
