//! The step's flat gradient buffer (f32, or bf16 with `train.grad_buffer = "bf16"`), in the layout of the
//! parameters ([`ParamLayout`]).

use std::cell::Cell;
use std::ops::{Range, RangeInclusive};

use candle_core::{DType, Device, Result, Tensor};

use crate::train::layers::{Mode, WeightGrad};
use crate::train::params::ParamLayout;

/// The step's flat gradient buffer, f32 or bf16. Allocated uninitialized on a GPU (no zero-fill of the whole
/// buffer a step: 2.9 GB for the large model in f32): each slot's first gradient in the step overwrites its range, later ones
/// add; [`Gradients::settle`] zero-fills the slots that got none before anything reads them.
pub struct Gradients {
    flat: Tensor,
    /// Per slot of the layout, whether the step has written it. Cells: the backward adds through a shared
    /// closure.
    written: Vec<Cell<bool>>,
}

impl Gradients {
    /// A buffer of `dtype` (f32 or bf16).
    pub fn new(layout: &ParamLayout, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self::over(layout, crate::kernels::for_writing(layout.total, dtype, device)?))
    }

    /// Over `flat` (f32 or bf16, `layout.total` elements) whatever it holds, as if uninitialized: tests fill it with
    /// NaN, so that an element read before it was written shows.
    pub fn over(layout: &ParamLayout, flat: Tensor) -> Self {
        Self { flat, written: (0..layout.slots.len()).map(|_| Cell::new(false)).collect() }
    }

    /// The buffer, for the data-parallel sum, the gradient norm and the optimizer: every range they read must
    /// be settled ([`Gradients::settle`]) first.
    pub fn tensor(&self) -> &Tensor {
        &self.flat
    }

    /// `grads[slots] += g` in place: one parameter's gradient, or the stacked gradient of neighbouring matrices
    /// that one GEMM computed (q, k, v; gate, up). The slots' first gradient in the step overwrites them.
    pub fn add(&self, layout: &ParamLayout, slots: RangeInclusive<usize>, g: &WeightGrad) -> Result<()> {
        self.add_all(layout, &[(slots, g)])
    }

    /// [`Gradients::add`] for several gradients of distinct slots at once, so that the kernels may take them
    /// together (a block's norms: [`WeightGrad::add_all_to`]).
    pub fn add_all(&self, layout: &ParamLayout, grads: &[(RangeInclusive<usize>, &WeightGrad)]) -> Result<()> {
        let mut batch = Vec::with_capacity(grads.len());
        let mut seen = Vec::new();
        for (slots, g) in grads {
            if slots.clone().any(|i| seen.contains(&i)) {
                candle_core::bail!("a slot's gradient added twice in one batch: {slots:?}");
            }
            seen.extend(slots.clone());
            let mode = if slots.clone().all(|i| !self.written[i].get()) {
                Mode::Overwrite
            } else {
                // Stacked slots are written together, so all are written here; were some not, they would need
                // their zeros before the addition.
                self.settle(layout, layout.span(slots.clone()))?;
                Mode::Add
            };
            batch.push((*g, layout.span(slots.clone()), mode));
        }
        WeightGrad::add_all_to(&self.flat, &batch)?;
        // Marked once written: a failed write leaves its slots as they were counted.
        seen.into_iter().for_each(|i| self.written[i].set(true));
        Ok(())
    }

    /// Zero-fills every slot that meets `range` and has no gradient yet (whole slots, neighbours in one
    /// pass), so that all of `range` may be read; the slots count as written from now on.
    pub fn settle(&self, layout: &ParamLayout, range: Range<usize>) -> Result<()> {
        let mut run: Option<Range<usize>> = None;
        for (i, _) in layout.parts(range) {
            if self.written[i].replace(true) {
                continue;
            }
            let s = &layout.slots[i];
            match &mut run {
                Some(r) if r.end == s.offset => r.end += s.len,
                _ => {
                    if let Some(r) = run.replace(s.offset..s.offset + s.len) {
                        self.zero(r)?;
                    }
                }
            }
        }
        run.map_or(Ok(()), |r| self.zero(r))
    }

    fn zero(&self, r: Range<usize>) -> Result<()> {
        let dst = self.flat.narrow(0, r.start, r.len())?;
        #[cfg(feature = "cuda")]
        if dst.device().is_cuda() {
            return crate::kernels::flat::zero(&dst);
        }
        self.flat.slice_set(&dst.zeros_like()?, 0, r.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::layers::TokenRows;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// From a buffer of NaN (what an uninitialized one may hold): the first gradient of a slot equals it, the
    /// second adds, stacked slots go together, and settling zero-fills the slots nothing wrote. Every kind
    /// of gradient that has a CPU path writes first once. In an f32 and in a bf16 buffer (small integers,
    /// exact in both).
    #[test]
    fn first_gradient_overwrites_later_ones_add_and_settle_zero_fills() {
        for dtype in [DType::F32, DType::BF16] {
            overwrite_add_settle(dtype);
        }
    }

    fn overwrite_add_settle(dtype: DType) {
        let layout = ParamLayout::from_shapes(vec![
            ("embed".into(), vec![4, 2]),
            ("q".into(), vec![2, 3]),
            ("k".into(), vec![1, 3]),
            ("norm".into(), vec![3]),
            ("untouched".into(), vec![2]),
            ("w".into(), vec![2, 2]),
            ("also untouched".into(), vec![3]),
        ]);
        let nan = Tensor::full(f32::NAN, layout.total, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let grads = Gradients::over(&layout, nan);
        let slot = |i: usize| values(&layout.view(grads.tensor(), i).unwrap());

        // The embedding's rows of ids 3, 0, 3: rows 1 and 2 hold no token and must read 0, not NaN.
        let ids = [3u32, 0, 3];
        let dx = tensor(vec![1., 2., 3., 4., 5., 6.], &[3, 2]);
        let rows = TokenRows::new(&ids, &Device::Cpu).unwrap();
        let scatter = WeightGrad::Scatter { dx, ids: Tensor::new(&ids[..], &Device::Cpu).unwrap(), rows };
        grads.add(&layout, 0..=0, &scatter).unwrap();
        assert_eq!(slot(0), [3., 4., 0., 0., 0., 0., 6., 8.]);
        grads.add(&layout, 0..=0, &WeightGrad::Tensor(tensor(vec![1.; 8], &[4, 2]))).unwrap();
        assert_eq!(slot(0), [4., 5., 1., 1., 1., 1., 7., 9.]);

        // q and k stacked, as one GEMM computes them: dy^T x with dy [2, 3] and x [2, 3].
        let dy = tensor(vec![1., 0., 2., 0., 1., 1.], &[2, 3]);
        let x = tensor(vec![1., 2., 3., 4., 5., 6.], &[2, 3]);
        let product = WeightGrad::Product { dy, x };
        grads.add(&layout, 1..=2, &product).unwrap();
        let want = [1., 2., 3., 4., 5., 6., 6., 9., 12.];
        assert_eq!([slot(1), slot(2)].concat(), want);
        grads.add(&layout, 1..=2, &product).unwrap();
        assert_eq!([slot(1), slot(2)].concat(), want.map(|v| 2. * v));

        let sums = WeightGrad::RowSums(tensor(vec![1., 2., 3., 10., 20., 30.], &[2, 3]));
        grads.add(&layout, 3..=3, &sums).unwrap();
        assert_eq!(slot(3), [11., 22., 33.]);

        grads.add(&layout, 5..=5, &WeightGrad::Tensor(tensor(vec![1., 2., 3., 4.], &[2, 2]))).unwrap();
        assert_eq!(slot(5), [1., 2., 3., 4.]);

        // Settling a range that cuts into the untouched slots fills them whole and leaves the rest.
        grads.settle(&layout, layout.slots[4].offset + 1..layout.total - 1).unwrap();
        assert_eq!(slot(4), [0., 0.]);
        assert_eq!(slot(6), [0., 0., 0.]);
        assert_eq!(slot(5), [1., 2., 3., 4.]);
        let all = values(grads.tensor());
        assert!(all.iter().all(|v| v.is_finite()), "{all:?}");
        assert_eq!(grads.tensor().dtype(), dtype);
        // A slot settled before its first gradient has zeros, so the gradient adds to them.
        grads.add(&layout, 6..=6, &WeightGrad::Tensor(tensor(vec![1., 1., 1.], &[3]))).unwrap();
        assert_eq!(slot(6), [1., 1., 1.]);
    }

    /// Gradients added together (a block's norms with another kind between them) land as when added one at a
    /// time, overwriting first and adding after; one slot twice in one batch is refused, since one launch
    /// would write it twice at once.
    #[test]
    fn gradients_added_together_match_one_at_a_time() {
        let layout = ParamLayout::from_shapes(vec![
            ("norm".into(), vec![3]),
            ("w".into(), vec![2, 2]),
            ("other norm".into(), vec![2]),
        ]);
        let sums = WeightGrad::RowSums(tensor(vec![1., 2., 3., 10., 20., 30.], &[2, 3]));
        let w = WeightGrad::Tensor(tensor(vec![1., 2., 3., 4.], &[2, 2]));
        let other = WeightGrad::RowSums(tensor(vec![5., 6.], &[1, 2]));
        let nan = || Gradients::over(&layout, Tensor::full(f32::NAN, layout.total, &Device::Cpu).unwrap());
        let (together, apart) = (nan(), nan());
        for _ in 0..2 {
            together.add_all(&layout, &[(0..=0, &sums), (1..=1, &w), (2..=2, &other)]).unwrap();
            for (i, g) in [&sums, &w, &other].into_iter().enumerate() {
                apart.add(&layout, i..=i, g).unwrap();
            }
        }
        let want = [22., 44., 66., 2., 4., 6., 8., 10., 12.];
        assert_eq!(values(together.tensor()), want);
        assert_eq!(values(apart.tensor()), want);
        let twice = nan().add_all(&layout, &[(0..=0, &sums), (0..=0, &sums)]);
        assert!(twice.is_err_and(|e| e.to_string().contains("twice")), "one slot twice in a batch was taken");
    }
}
