//! All parameters in one contiguous f32 buffer (llm.c's layout): the optimizer, the gradient all-reduce
//! and checkpoints work on flat tensors; layers see named views into it.

use std::collections::HashMap;
use std::ops::{Range, RangeInclusive};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::ModelConfig;
use crate::model::arch::Role;

#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// One block's parameters as slot indices (llm.c's `ParameterTensors`, per block), resolved once from the
/// family's block table (`ModelConfig::block_tensors`); a sub-norm the family does not have is None.
#[derive(Debug, Clone, Copy)]
pub struct BlockSlots {
    pub input_norm: usize,
    /// q, k and v are neighbours, as are gate and up: one GEMM each.
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub attn_sub_norm: Option<usize>,
    pub o: usize,
    pub post_norm: usize,
    pub gate: usize,
    pub up: usize,
    pub ffn_sub_norm: Option<usize>,
    pub down: usize,
}

impl BlockSlots {
    /// The block's span of slots: its parameters are neighbours, from the input norm to the down projection.
    pub fn slots(&self) -> RangeInclusive<usize> {
        self.input_norm..=self.down
    }
}

/// Where each parameter lives in the flat buffer, in the order of `ModelConfig::parameter_shapes`.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub slots: Vec<Slot>,
    pub total: usize,
    index: HashMap<String, usize>,
    /// Each block's typed view; empty for a layout made from bare shapes.
    pub blocks: Vec<BlockSlots>,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut layout = Self::from_shapes(cfg.parameter_shapes());
        let family = cfg.family().expect("a validated config names a known family");
        layout.blocks = (0..cfg.num_hidden_layers)
            .map(|l| {
                let tensors = cfg.block_tensors(family, l);
                let find = |role: Role| tensors.iter().find(|t| t.role == role).map(|t| layout.index(&t.name));
                let get = |role: Role| find(role).expect("every family's block has its projections and main norms");
                BlockSlots {
                    input_norm: get(Role::InputNorm),
                    q: get(Role::Q),
                    k: get(Role::K),
                    v: get(Role::V),
                    attn_sub_norm: find(Role::AttnSubNorm),
                    o: get(Role::O),
                    post_norm: get(Role::PostNorm),
                    gate: get(Role::Gate),
                    up: get(Role::Up),
                    ffn_sub_norm: find(Role::FfnSubNorm),
                    down: get(Role::Down),
                }
            })
            .collect();
        layout
    }

    pub fn from_shapes(shapes: Vec<(String, Vec<usize>)>) -> Self {
        let mut offset = 0;
        let slots: Vec<Slot> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product();
                let slot = Slot { name, shape, offset, len };
                offset += len;
                slot
            })
            .collect();
        let index = slots.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self { slots, total: offset, index, blocks: Vec::new() }
    }

    pub fn index(&self, name: &str) -> usize {
        *self.index.get(name).unwrap_or_else(|| panic!("no parameter named {name}"))
    }

    /// The parameter `i` as a view of `flat`, in its own shape.
    pub fn view(&self, flat: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let s = &self.slots[i];
        flat.narrow(0, s.offset, s.len)?.reshape(s.shape.as_slice())
    }

    /// Concatenates per-parameter tensors (in slot order) into one flat f32 tensor.
    pub fn flatten(&self, tensors: &[Tensor]) -> candle_core::Result<Tensor> {
        let flat: Vec<Tensor> =
            tensors.iter().map(|t| t.to_dtype(DType::F32)?.flatten_all()).collect::<candle_core::Result<_>>()?;
        Tensor::cat(&flat, 0)
    }

    /// The slots that meet `range` (a ZeRO-1 shard), each with its part inside it: `(slot, part)`.
    pub fn parts(&self, range: Range<usize>) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        self.slots.iter().enumerate().filter_map(move |(i, s)| {
            let part = s.offset.max(range.start)..(s.offset + s.len).min(range.end);
            (!part.is_empty()).then_some((i, part))
        })
    }

    /// `sum(f(x))` over `flat[part]`, a part of slot `i`, as a one-element f64 tensor (`f` elementwise: abs,
    /// sqr). A whole slot is summed by rows first (in f32, whatever `flat`'s dtype) and then in f64, as GPU
    /// reductions parallelise and as the weight quantizer sums; a part of one (where a ZeRO-1 shard cuts it)
    /// has no rows and is summed in f64.
    pub fn part_sum(
        &self,
        flat: &Tensor,
        i: usize,
        part: Range<usize>,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if part.len() == self.slots[i].len {
            return f(&self.view(flat, i)?.to_dtype(DType::F32)?)?.sum(D::Minus1)?.to_dtype(DType::F64)?.sum_all();
        }
        f(&flat.narrow(0, part.start, part.len())?.to_dtype(DType::F64)?)?.sum_all()
    }

    /// The elements of the neighbouring slots `slots`, from the first's offset to the last's end.
    pub fn span(&self, slots: RangeInclusive<usize>) -> Range<usize> {
        let last = &self.slots[*slots.end()];
        self.slots[*slots.start()].offset..last.offset + last.len
    }

    /// Named views, for saving in the Hugging Face layout.
    pub fn named(&self, flat: &Tensor) -> Result<Vec<(String, Tensor)>> {
        (0..self.slots.len()).map(|i| Ok((self.slots[i].name.clone(), self.view(flat, i)?))).collect()
    }

    /// Reads every parameter from a checkpoint's `VarBuilder` into a flat f32 buffer on `device`.
    pub fn load(&self, vb: &VarBuilder, device: &Device) -> Result<Tensor> {
        let tensors: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| {
                vb.get_with_hints_dtype(s.shape.as_slice(), &s.name, Default::default(), DType::F32)
                    .with_context(|| format!("loading {}", s.name))
            })
            .collect::<Result<_>>()?;
        Ok(self.flatten(&tensors)?.to_device(device)?)
    }

    /// Whether weight decay applies to parameter `i`: norms and the embedding are skipped unless asked
    /// for, as is usual for transformers.
    pub fn decays(&self, i: usize, decay_norms_and_embeddings: bool) -> bool {
        let name = &self.slots[i].name;
        decay_norms_and_embeddings || !(crate::model::is_norm(name) || name == crate::model::arch::EMBEDDING)
    }

    /// The flat buffer as maximal runs of neighbouring slots on which `pred` agrees: `(offset, len, pred)`.
    /// Kernels that differ per slot only by a flag (AdamW's weight decay) run once per run, not per slot.
    pub fn runs(&self, pred: impl Fn(usize) -> bool) -> Vec<(usize, usize, bool)> {
        let mut out: Vec<(usize, usize, bool)> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let p = pred(i);
            match out.last_mut() {
                Some((_, len, q)) if *q == p => *len += s.len,
                _ => out.push((s.offset, s.len, p)),
            }
        }
        out
    }
}
