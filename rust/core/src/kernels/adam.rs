//! Adam / AdamW (decoupled weight decay) with AMSGrad and maximize, operation
//! for operation as torch's `_single_tensor_adam` on its vectorised CPU path.

use super::common_len;
use super::declare::optimizer;
use super::sqrt_over::SqrtOver;
use crate::dispatch::{run_block, Backend, Element};
use crate::engine::{self, Elementwise, Exec};
use crate::error::{Error, Result};
use crate::simd::{run_blocks, LaneBlock, Lanes};
use crate::storage::{typed, FusedBody, LaneArray, Mem, ParamArray, ParamMem, MAX_STATE};
use crate::tensors::{DType, ScalarState, TensorBatch};

optimizer! {
    /// Adam hyper-parameters of one parameter group (torch's AdamW is Adam
    /// with `decoupled_weight_decay=True`).
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
    // Its own step: the fused path for every storage layout (`crate::storage`).
    impl {
        fn check(&self, batch: &TensorBatch, scalars: &ScalarState, _exec: Exec) -> Result<()> {
            check(self, batch, scalars.slots())?;
            for i in 0..batch.slots() {
                BiasCorrection::check(self, scalars.incremented(i, 0), batch.slot(i).dtype)?;
            }
            Ok(())
        }

        fn step(&self, batch: &TensorBatch, scalars: &mut ScalarState, exec: Exec) -> Result<()> {
            // Everything is checked before the first counter is written: a
            // refused call leaves the step counters as they were.
            <Self as crate::optimizer::Optimizer>::check(self, batch, scalars, exec)?;
            let steps: Vec<f64> = (0..batch.slots())
                .map(|i| scalars.increment(i, 0))
                .collect();
            adam_step(self, batch, &steps, exec)
        }
    }
}

impl AdamConfig {
    /// Arrays per slot: `[param, grad, exp_avg, exp_avg_sq(, max_exp_avg_sq)]`.
    pub fn arity(&self) -> usize {
        if self.amsgrad {
            5
        } else {
            4
        }
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
    check(config, batch, steps.len())?;
    run(config, batch, steps, exec);
    Ok(())
}

fn check(config: &AdamConfig, batch: &TensorBatch, steps: usize) -> Result<()> {
    if batch.arity() != config.arity() {
        return Err(Error::Mismatch(format!(
            "Adam expects {} arrays per tensor, got {}",
            config.arity(),
            batch.arity()
        )));
    }
    if steps != batch.slots() {
        return Err(Error::Mismatch(format!(
            "{steps} step counts for {} tensors",
            batch.slots()
        )));
    }
    Ok(())
}

fn run(config: &AdamConfig, batch: &TensorBatch, steps: &[f64], exec: Exec) {
    let per_slot = steps
        .iter()
        .map(|&step| BiasCorrection::new(config, step))
        .collect::<Vec<_>>();
    engine::run(
        &AdamKernel {
            config,
            per_slot: &per_slot,
        },
        batch,
        exec,
    );
}

/// Step-dependent scalars, computed in f64 as torch computes them in Python.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BiasCorrection {
    step_size: f64,
    bias_correction2_sqrt: f64,
}

impl BiasCorrection {
    /// The error torch's Python arithmetic raises at step `step` (a counter
    /// set to zero or below, or out of float range), for a parameter of
    /// `dtype`: `beta ** step` (Python's float errors), `lr / bias_correction1`
    /// at step 0, and `bias_correction2 ** 0.5` of a negative number, a complex
    /// number its tensor division cannot take (torch raises having already
    /// written the moments and the counter; this refuses before anything).
    pub(crate) fn check(c: &AdamConfig, step: f64, dtype: DType) -> Result<()> {
        let bias_correction1 = 1.0 - Error::checked_py_pow(c.beta1, step)?;
        let bias_correction2 = 1.0 - Error::checked_py_pow(c.beta2, step)?;
        if bias_correction1 == 0.0 {
            return Err(Error::float_division_by_zero());
        }
        if bias_correction2 < 0.0 && bias_correction2.is_finite() {
            return Err(match dtype {
                DType::BF16 => Error::TorchNotImplemented(
                    "\"div_cpu\" not implemented for 'BComplex32'".into(),
                ),
                DType::F16 => Error::TorchNotImplemented(
                    "\"div_cpu\" not implemented for 'ComplexHalf'".into(),
                ),
                DType::F64 => Error::TorchRuntime(
                    "result type ComplexDouble can't be cast to the desired output type Double"
                        .into(),
                ),
                _ => Error::TorchRuntime(
                    "result type ComplexFloat can't be cast to the desired output type Float"
                        .into(),
                ),
            });
        }
        Ok(())
    }

    pub(crate) fn new(c: &AdamConfig, step: f64) -> BiasCorrection {
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2 = 1.0 - c.beta2.powf(step);
        BiasCorrection {
            step_size: c.lr / bias_correction1,
            bias_correction2_sqrt: super::py_pow_half(bias_correction2),
        }
    }
}

struct AdamKernel<'a> {
    config: &'a AdamConfig,
    per_slot: &'a [BiasCorrection],
}

impl Elementwise for AdamKernel<'_> {
    fn apply<T: Element>(&self, backend: Backend, slot: usize, arrays: &mut [&mut [T]]) {
        let c = self.config;
        let n = common_len(arrays, c.arity());
        let max_exp_avg_sq = arrays
            .get_mut(4)
            .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr());
        let mut block = AdamBlock::new(
            c,
            self.per_slot[slot],
            (arrays[0].as_mut_ptr(), arrays[1].as_mut_ptr()),
            [
                arrays[2].as_mut_ptr(),
                arrays[3].as_mut_ptr(),
                max_exp_avg_sq,
            ],
        );
        // SAFETY: every array holds `n` elements (checked by `common_len`).
        unsafe { run_block(backend, n, &mut block) }
    }

    fn writes(&self, k: usize) -> bool {
        k != 1
    }

    fn apply_fused(
        &self,
        backend: Backend,
        slot: usize,
        arrays: &[Mem],
        param: ParamMem,
        n: usize,
    ) -> bool {
        let c = self.config;
        assert_eq!(
            arrays.len(),
            c.arity(),
            "kernel received the wrong number of arrays"
        );
        typed(
            param,
            arrays[1],
            &arrays[2..],
            &mut FusedAdam {
                config: c,
                bc: self.per_slot[slot],
                on: backend,
                n,
            },
        );
        true
    }
}

/// Where a lane block runs: on the vectors of a backend picked at run time,
/// or of an instruction set the caller already entered.
pub(crate) trait RunsBlocks: Copy {
    /// # Safety
    /// Every array `block` touches must hold at least `n` elements.
    unsafe fn run<B: LaneBlock<f32>>(self, n: usize, block: &mut B);
}

impl RunsBlocks for Backend {
    #[inline(always)]
    unsafe fn run<B: LaneBlock<f32>>(self, n: usize, block: &mut B) {
        // SAFETY: forwarded to the caller.
        unsafe { run_block(self, n, block) }
    }
}

impl<S: Lanes<f32>> RunsBlocks for S {
    #[inline(always)]
    unsafe fn run<B: LaneBlock<f32>>(self, n: usize, block: &mut B) {
        // SAFETY: forwarded to the caller.
        unsafe { run_blocks(self, n, block) }
    }
}

/// Adam's update of `n` elements of arrays of any [`crate::storage`] types, run `on` a backend or entered vectors.
pub(crate) struct FusedAdam<'a, R> {
    pub(crate) config: &'a AdamConfig,
    pub(crate) bc: BiasCorrection,
    pub(crate) on: R,
    pub(crate) n: usize,
}

impl<R: RunsBlocks> FusedBody for FusedAdam<'_, R> {
    #[inline(always)]
    fn run<P: ParamArray<f32>, G: LaneArray<f32>, A: LaneArray<f32>>(
        &mut self,
        param: P,
        grad: G,
        state: [A; MAX_STATE],
    ) {
        let mut block = AdamBlock::new(
            self.config,
            self.bc,
            (param, grad),
            [state[0], state[1], state[2]],
        );
        // SAFETY: the caller hands `n` elements of every array (the AMSGrad
        // one is touched only when it was passed).
        unsafe { self.on.run(self.n, &mut block) };
    }
}

/// Adam's per-element update over arrays in place (raw `*mut T`, or float32
/// and bfloat16 ones widened and rounded as they are loaded and stored),
/// shared with the block-wise 8-bit kernel (which runs it on dequantised
/// copies of its state).
pub(crate) struct AdamBlock<T, P = *mut T, G = *mut T, A = *mut T> {
    lerp_coeff: T,
    lerp_from_start: bool,
    beta2: T,
    one_minus_beta2: T,
    eps: T,
    step_size_neg: T,
    /// `sqrt(·) / bias_correction2_sqrt`, exactly as torch divides.
    sqrt_over_bc2: SqrtOver<T>,
    weight_decay: T,
    param_decay: T,
    coupled_decay: bool,
    decoupled_decay: bool,
    amsgrad: bool,
    maximize: bool,
    param: P,
    grad: G,
    exp_avg: A,
    exp_avg_sq: A,
    max_exp_avg_sq: A,
}

impl<T: Element, P, G, A> AdamBlock<T, P, G, A> {
    /// The update of `(param, grad)` and `[exp_avg, exp_avg_sq,
    /// max_exp_avg_sq]` (the last unused unless AMSGrad), each holding as
    /// many elements as the block is run over.
    pub(crate) fn new(
        c: &AdamConfig,
        bc: BiasCorrection,
        (param, grad): (P, G),
        [exp_avg, exp_avg_sq, max_exp_avg_sq]: [A; 3],
    ) -> AdamBlock<T, P, G, A> {
        // torch's lerp: weight w < 0.5 gives start + w (end - start), else end + (w - 1)(end - start).
        let lerp_weight = T::from_f64(1.0 - c.beta1);
        let lerp_small = lerp_weight.abs() < T::from_f64(0.5);
        AdamBlock {
            lerp_coeff: if lerp_small {
                lerp_weight
            } else {
                lerp_weight - T::ONE
            },
            lerp_from_start: lerp_small,
            beta2: T::from_f64(c.beta2),
            one_minus_beta2: T::from_f64(1.0 - c.beta2),
            eps: T::from_f64(c.eps),
            step_size_neg: T::from_f64(-bc.step_size),
            sqrt_over_bc2: SqrtOver::new(T::from_f64(bc.bias_correction2_sqrt)),
            weight_decay: T::from_f64(c.weight_decay),
            param_decay: T::from_f64(1.0 - c.lr * c.weight_decay),
            coupled_decay: c.weight_decay != 0.0 && !c.decoupled_weight_decay,
            decoupled_decay: c.weight_decay != 0.0 && c.decoupled_weight_decay,
            amsgrad: c.amsgrad,
            maximize: c.maximize,
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
        }
    }
}

impl<T: Element, P: ParamArray<T>, G: LaneArray<T>, A: LaneArray<T>> LaneBlock<T>
    for AdamBlock<T, P, G, A>
{
    #[inline(always)]
    unsafe fn apply<S: Lanes<T>>(&mut self, s: S, i: usize) {
        // SAFETY: `run_blocks` keeps i + WIDTH within the arrays; the AMSGrad
        // array is only touched when it was passed.
        unsafe {
            let mut p = self.param.load(s, i);
            let mut g = self.grad.load(s, i);
            if self.maximize {
                g = s.mul(g, s.splat(-T::ONE));
            }
            if self.decoupled_decay {
                p = s.mul(p, s.splat(self.param_decay));
            } else if self.coupled_decay {
                g = s.mul_add(p, s.splat(self.weight_decay), g);
            }
            // exp_avg.lerp_(grad, 1 - beta1)
            let m = self.exp_avg.load(s, i);
            let diff = s.sub(g, m);
            let m = s.mul_add(
                s.splat(self.lerp_coeff),
                diff,
                if self.lerp_from_start { m } else { g },
            );
            self.exp_avg.store(s, i, m);
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): torch's
            // CPU addcmul is one FMA, fma(value * grad, grad, self).
            let v = s.mul(self.exp_avg_sq.load(s, i), s.splat(self.beta2));
            let v = s.mul_add(s.mul(s.splat(self.one_minus_beta2), g), g, v);
            self.exp_avg_sq.store(s, i, v);
            let second = if self.amsgrad {
                let vmax = s.max(self.max_exp_avg_sq.load(s, i), v);
                self.max_exp_avg_sq.store(s, i, vmax);
                vmax
            } else {
                v
            };
            // denom = second.sqrt() / bias_correction2_sqrt + eps
            let denom = s.add(self.sqrt_over_bc2.apply(s, second), s.splat(self.eps));
            // param.addcdiv_(exp_avg, denom, value=-step_size)
            p = s.add(p, s.div(s.mul(s.splat(self.step_size_neg), m), denom));
            self.param.store_param(s, i, p);
        }
    }
}
