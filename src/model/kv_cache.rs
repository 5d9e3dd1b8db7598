//! The KV cache of generation: keys and values of every layer in buffers allocated once, shared by rows that
//! may each hold a different prompt at a different point of its answer (continuous batching).
//!
//! Every row's next token lands in the same column (`len`). A row's own tokens run from its `start` column
//! to `len`: a batch of prompts of different lengths is left-padded to a common width, and a row that takes
//! a new prompt while the others decode ([`KvCache::admit`]) gets the prompt's keys right-aligned to `len`.
//! A row may also skip one run of columns after its start, its gap: prompts that begin with the same
//! tokens (the chat template's system prompt) share that prefix's keys, computed once
//! ([`KvCache::from_prefix`]), and each row's own rest is left-padded after it. A row's token in column
//! `c` has as RoPE position its index among the row's own tokens and attends to none of the columns it
//! skips (padding, or a previous prompt's), so each row computes what it would compute alone. The columns
//! before every row's start are dropped when the buffer is full ([`KvCache::reserve`]), so a long
//! evaluation runs in a buffer of fixed size.

use candle_core::{Device, Result, Tensor};

use crate::config::ModelConfig;

/// Columns a buffer without a set capacity grows by.
const GROW: usize = 512;

/// The columns a row's own tokens take: from `start` on, except the `gap_len` columns from `gap` (the
/// padding between a prefix shared by the batch and the row's own rest; none when `gap_len` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    start: usize,
    gap: usize,
    gap_len: usize,
}

impl Span {
    /// A row whose own tokens start at column `start`.
    fn starting_at(start: usize) -> Self {
        Self { start, gap: start, gap_len: 0 }
    }

    /// A row that holds no prompt: it attends only to its own newest column, and no row's window waits for
    /// it.
    const RETIRED: Span = Span { start: usize::MAX, gap: usize::MAX, gap_len: 0 };

    pub fn is_retired(&self) -> bool {
        self.start == usize::MAX
    }

    /// The row's first column (`usize::MAX` when retired).
    pub fn start(&self) -> usize {
        self.start
    }

    /// Whether the row skips a run of columns after its start.
    pub fn has_gap(&self) -> bool {
        self.gap_len > 0
    }

    /// Whether column `c` is none of the row's own (before its start, or in its gap).
    pub fn hides(&self, c: usize) -> bool {
        c < self.start || (self.gap..self.gap + self.gap_len).contains(&c)
    }

    /// The RoPE position of the row's token in column `c`: its index among the row's own tokens (0 for a
    /// column the row hides).
    pub fn position(&self, c: usize) -> usize {
        match self.hides(c) {
            true => 0,
            false if c >= self.gap + self.gap_len => c - self.start - self.gap_len,
            false => c - self.start,
        }
    }

    /// What the decode kernel knows of the row for its token in column `c`: `[position, start, gap,
    /// gap_len]` (`kernels::shapes::DecodeAttention::meta`; a retired row's start and gap are `u32::MAX`).
    pub fn step_meta(&self, c: usize) -> [u32; 4] {
        let u = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        [u(self.position(c)), u(self.start), u(self.gap), u(self.gap_len)]
    }

    /// The span moved by `to - from` columns.
    fn moved(self, from: usize, to: usize) -> Self {
        match self.is_retired() {
            true => self,
            false => Self { start: self.start - from + to, gap: self.gap - from + to, ..self },
        }
    }
}

/// A decoding step's activations on a GPU, made once per layout of the cache and reused by every layer and
/// step, so that a captured step allocates nothing between its kernels: an allocation is a graph node, which
/// keeps the kernels on either side of it from overlapping (`kernels::launch_kernel`'s early launches). Each
/// kernel writes one buffer that nothing it reads lies in; the residual stream alternates between two.
#[derive(Debug, Clone)]
pub(super) struct StepScratch {
    /// The stacked q, k, v projection `[rows, 1, (heads + 2 kv_heads) head_dim]`, bf16.
    pub qkv: Tensor,
    /// The attention's output `[rows, heads head_dim]` and its splits' partial results (f32).
    pub attention: Tensor,
    pub partial: Tensor,
    /// The stacked gate and up projections `[rows, 1, 2 intermediate]`.
    pub gate_up: Tensor,
    /// The residual stream `[rows, 1, hidden]` after a block's attention and after its MLP.
    pub after_attention: Tensor,
    pub after_mlp: Tensor,
}

impl StepScratch {
    fn addresses(&self) -> Result<Vec<u64>> {
        [&self.qkv, &self.attention, &self.partial, &self.gate_up, &self.after_attention, &self.after_mlp]
            .into_iter()
            .map(crate::kernels::decode::address)
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer, keys and values `[rows, kv_heads, width, head_dim]`, allocated at the first forward.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The decode attention's join counts (u32, zero between launches: the kernel sets each back), one
    /// buffer for every layer and step, so that a step needs no memset.
    join: Option<Tensor>,
    /// A decoding step's activations on a GPU, for the rows and width they were made for.
    scratch: Option<(usize, usize, StepScratch)>,
    /// Columns filled so far.
    len: usize,
    /// Columns the first forward allocates (at least what it needs).
    capacity: usize,
    /// The columns of each row's own tokens ([`Span::RETIRED`] for a row without a prompt); empty means all
    /// columns for every row.
    rows: Vec<Span>,
}

impl KvCache {
    /// A cache for rows without padding (one prompt, or prompts of equal length).
    pub fn new(cfg: &ModelConfig) -> Self {
        Self::left_padded(cfg, Vec::new())
    }

    /// A cache for a batch whose row `r` starts with `pad[r]` padding tokens.
    pub fn left_padded(cfg: &ModelConfig, pad: Vec<usize>) -> Self {
        Self::of_rows(cfg, pad.into_iter().map(Span::starting_at).collect())
    }

    fn of_rows(cfg: &ModelConfig, rows: Vec<Span>) -> Self {
        Self { layers: vec![None; cfg.num_hidden_layers], join: None, scratch: None, len: 0, capacity: 0, rows }
    }

    /// A cache for a batch of prompts that begin with the tokens `prefix` holds (one row, after one forward
    /// over them): each row starts with a copy of those columns, then `pad[r]` padding columns before the
    /// row's own rest, which the next forward runs. Room for `columns` columns, as
    /// [`KvCache::with_capacity`].
    pub fn from_prefix(cfg: &ModelConfig, prefix: &KvCache, pad: &[usize], columns: usize) -> Result<Self> {
        let shared = prefix.len;
        let rows = pad.iter().map(|&p| Span { start: 0, gap: shared, gap_len: p }).collect();
        let mut cache = Self::of_rows(cfg, rows).with_capacity(columns.max(shared));
        for (layer, source) in prefix.layers.iter().enumerate() {
            let Some((k, v)) = source else { candle_core::bail!("a prefix cache before its forward") };
            let copies = |t: &Tensor| -> Result<Tensor> {
                let one = t.narrow(0, 0, 1)?.narrow(2, 0, shared)?;
                Tensor::cat(&vec![&one; pad.len()], 0)
            };
            let (k, v) = (copies(k)?, copies(v)?);
            let (rows, heads, _, dim) = k.dims4()?;
            cache.resize(layer, (rows, heads, dim), &k, cache.capacity, 0)?;
            let (kb, vb) = cache.layers[layer].as_ref().expect("allocated above");
            kb.slice_set(&k, 2, 0)?;
            vb.slice_set(&v, 2, 0)?;
        }
        cache.len = shared;
        Ok(cache)
    }

    /// The same cache with room for `columns` columns allocated at once (a generation's prompt and answer),
    /// so it never grows while generating.
    pub fn with_capacity(self, columns: usize) -> Self {
        Self { capacity: columns, ..self }
    }

    /// Number of columns already in the cache (padding and columns of earlier prompts included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of row `row`'s own tokens (its prompt and answer so far); 0 for a retired row.
    pub fn row_len(&self, row: usize) -> usize {
        let span = self.rows.get(row).copied().unwrap_or(Span::starting_at(0));
        self.len.saturating_sub(span.start).saturating_sub(span.gap_len)
    }

    /// The first column any row attends to.
    fn window_start(&self) -> usize {
        self.rows.iter().map(|r| r.start).min().unwrap_or(0).min(self.len)
    }

    /// Columns layer `layer`'s buffers hold (0 before its first forward).
    fn width(&self, layer: usize) -> Result<usize> {
        self.layers[layer].as_ref().map_or(Ok(0), |(k, _)| k.dim(2))
    }

    /// Each of `rows` rows' columns, for a forward of a batch of `rows`.
    pub(super) fn spans(&mut self, rows: usize) -> Result<Vec<Span>> {
        if self.rows.is_empty() {
            self.rows = vec![Span::starting_at(0); rows];
        }
        if self.rows.len() != rows {
            candle_core::bail!("the cache holds {} rows, the batch has {rows}", self.rows.len());
        }
        Ok(self.rows.clone())
    }

    /// Makes room for `t` more columns without growing where dropping the columns before every row's start
    /// (which no row attends to) is enough. Returns the columns a forward of `t` new ones attends to:
    /// `(first, len)`.
    pub(super) fn reserve(&mut self, t: usize) -> Result<(usize, usize)> {
        let lo = self.window_start();
        if self.len + t > self.width(0)? && lo > 0 {
            self.shift(lo, 0)?;
        }
        Ok((self.window_start(), self.len))
    }

    /// Writes layer `layer`'s keys and values `[rows, kv_heads, t, head_dim]` of the `t` new columns and
    /// returns those the forward attends to, from `first` ([`KvCache::reserve`]) to the new ones. The
    /// columns count once [`KvCache::advance`] is called after the last layer.
    pub(super) fn append(&mut self, layer: usize, first: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let need = self.len + t;
        let (rows, heads, _, dim) = k.dims4()?;
        self.make_room(layer, t, (rows, heads, dim), k)?;
        let (kb, vb) = self.layers[layer].as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, first, need - first)?, vb.narrow(2, first, need - first)?))
    }

    /// Layer `layer`'s buffers with room for `t` more columns, `[rows, heads, width, dim]` in `like`'s dtype
    /// and device: allocated, or grown keeping the columns so far.
    fn make_room(&mut self, layer: usize, t: usize, shape: (usize, usize, usize), like: &Tensor) -> Result<()> {
        let need = self.len + t;
        if need > self.width(layer)? {
            let columns = if need <= self.capacity { self.capacity } else { need.next_multiple_of(GROW) };
            self.resize(layer, shape, like, columns, self.len)?;
        }
        Ok(())
    }

    /// Every layer's buffers with room for `t` more columns ([`KvCache::make_room`]).
    pub(super) fn make_room_all(&mut self, t: usize, shape: (usize, usize, usize), like: &Tensor) -> Result<()> {
        (0..self.layers.len()).try_for_each(|layer| self.make_room(layer, t, shape, like))
    }

    /// Layer `layer`'s whole buffers, with room for one more column, for a decoding step whose kernel writes
    /// the new keys and values into column [`KvCache::len`] itself; and the join counts of its attention, at
    /// least `counts` of them.
    pub(super) fn step_buffers(
        &mut self,
        layer: usize,
        rows: usize,
        heads: usize,
        dim: usize,
        counts: usize,
        like: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.make_room(layer, 1, (rows, heads, dim), like)?;
        let join = self.join_counts(counts, like)?;
        let (k, v) = self.layers[layer].clone().expect("allocated above");
        Ok((k, v, join))
    }

    /// The decode attention's join counts, at least `counts` of them (made, zero, when there are fewer): made
    /// before a step's [`KvCache::layout_key`], which holds their address.
    pub(super) fn join_counts(&mut self, counts: usize, like: &Tensor) -> Result<Tensor> {
        if self.join.as_ref().is_none_or(|j| j.elem_count() < counts) {
            self.join = Some(Tensor::zeros(counts, candle_core::DType::U32, like.device())?);
        }
        Ok(self.join.clone().expect("made above"))
    }

    /// The decoding step's activations for `rows` rows over the buffers' present width, made by `make(rows,
    /// width)` where there are none for them: made before a step's [`KvCache::layout_key`], which holds their
    /// addresses. None before the first forward.
    pub(super) fn step_scratch(
        &mut self,
        rows: usize,
        make: impl FnOnce(usize, usize) -> Result<StepScratch>,
    ) -> Result<Option<StepScratch>> {
        let Some(Some((k, _))) = self.layers.first() else { return Ok(None) };
        let width = k.dim(2)?;
        if self.scratch.as_ref().is_none_or(|(r, w, _)| (*r, *w) != (rows, width)) {
            self.scratch = Some((rows, width, make(rows, width)?));
        }
        Ok(self.scratch.as_ref().map(|(_, _, s)| s.clone()))
    }

    /// What a decoding step's graph depends on (`model::step_graph`): the rows, the buffers' width and every
    /// layer's buffer addresses, which the captured kernels read and write, the join counts' and the
    /// activations' addresses.
    /// Empty before the first forward.
    pub(super) fn layout_key(&self, rows: usize) -> Result<Vec<u64>> {
        let mut key = vec![rows as u64];
        for layer in &self.layers {
            let Some((k, v)) = layer else { return Ok(Vec::new()) };
            key.extend([k.dim(2)? as u64, crate::kernels::decode::address(k)?, crate::kernels::decode::address(v)?]);
        }
        if let Some(join) = &self.join {
            key.push(crate::kernels::decode::address(join)?);
        }
        if let Some((_, _, scratch)) = &self.scratch {
            key.extend(scratch.addresses()?);
        }
        Ok(key)
    }

    /// Counts the `t` columns every layer appended.
    pub(super) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Layer `layer`'s buffers `[rows, heads, columns, dim]` in `like`'s dtype and device, keeping the first
    /// `keep` columns.
    fn resize(
        &mut self,
        layer: usize,
        (rows, heads, dim): (usize, usize, usize),
        like: &Tensor,
        columns: usize,
        keep: usize,
    ) -> Result<()> {
        let fresh = || Tensor::zeros((rows, heads, columns, dim), like.dtype(), like.device());
        let (k, v) = (fresh()?, fresh()?);
        if let (Some((old_k, old_v)), true) = (&self.layers[layer], keep > 0) {
            k.slice_set(&old_k.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
            v.slice_set(&old_v.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
        }
        self.layers[layer] = Some((k, v));
        Ok(())
    }

    /// Moves the columns from `from` to the end so that they begin at column `to`, in every layer, growing
    /// the buffers if they must; rows keep their own columns (their starts move with them).
    fn shift(&mut self, from: usize, to: usize) -> Result<()> {
        let n = self.len - from;
        for layer in 0..self.layers.len() {
            let Some((k, v)) = self.layers[layer].clone() else { continue };
            let (kept_k, kept_v) = (k.narrow(2, from, n)?.contiguous()?, v.narrow(2, from, n)?.contiguous()?);
            if to + n > self.width(layer)? {
                let (rows, heads, _, dim) = k.dims4()?;
                self.resize(layer, (rows, heads, dim), &k, (to + n).next_multiple_of(GROW), 0)?;
            }
            let (k, v) = self.layers[layer].as_ref().expect("allocated");
            k.slice_set(&kept_k, 2, to)?;
            v.slice_set(&kept_v, 2, to)?;
        }
        for r in self.rows.iter_mut() {
            *r = r.moved(from, to);
        }
        self.len = to + n;
        Ok(())
    }

    /// Frees row `row`: it no longer holds a prompt, and what it computes is never seen.
    pub fn retire(&mut self, row: usize) {
        if let Some(r) = self.rows.get_mut(row) {
            *r = Span::RETIRED;
        }
    }

    /// Keeps the first `columns` columns of a one-row cache as the start of its next prompt (a conversation's
    /// next turn, whose prompt begins with those tokens) and forgets the rest.
    pub fn reuse_prefix(&mut self, columns: usize) -> Result<()> {
        if self.rows.len() != 1 || self.rows[0].gap_len > 0 {
            candle_core::bail!("only a one-row cache without a gap is reused");
        }
        self.rows = vec![Span::starting_at(0)];
        self.len = self.len.min(columns);
        Ok(())
    }

    /// Keeps only rows `rows` (in that order), dropping the others: a batch that shrinks once no prompt is
    /// left to refill its free rows.
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        let index = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &Device::Cpu)?;
        for layer in self.layers.iter_mut().flatten() {
            let index = index.to_device(layer.0.device())?;
            *layer = (layer.0.index_select(&index, 0)?, layer.1.index_select(&index, 0)?);
        }
        self.rows = rows.iter().map(|&r| self.rows[r]).collect();
        Ok(())
    }

    /// Puts the prompts that `prefill` holds (its rows, after one forward over them) into rows `rows` of
    /// this cache, each right-aligned to this cache's last column, so they go on decoding beside the rows
    /// already here. The rows taken are retired first; if `prefill` is wider than this cache, this one's
    /// columns move right to make room.
    pub fn admit(&mut self, rows: &[usize], prefill: &KvCache) -> Result<()> {
        if rows.len() != prefill.rows.len() {
            candle_core::bail!("{} rows for the {} prompts of the prefill", rows.len(), prefill.rows.len());
        }
        rows.iter().for_each(|&r| self.retire(r));
        let w = prefill.len;
        if w > self.len {
            let lo = self.window_start();
            self.shift(lo, lo + w - self.len)?;
        }
        let at = self.len - w;
        for (layer, source) in self.layers.iter().zip(&prefill.layers) {
            let (Some((k, v)), Some((pk, pv))) = (layer, source) else {
                candle_core::bail!("admitting into a cache before its first forward, or from an empty prefill")
            };
            for (i, &r) in rows.iter().enumerate() {
                k.narrow(0, r, 1)?.slice_set(&pk.narrow(0, i, 1)?.narrow(2, 0, w)?.contiguous()?, 2, at)?;
                v.narrow(0, r, 1)?.slice_set(&pv.narrow(0, i, 1)?.narrow(2, 0, w)?.contiguous()?, 2, at)?;
            }
        }
        for (i, &r) in rows.iter().enumerate() {
            self.rows[r] = prefill.rows[i].moved(0, at);
        }
        Ok(())
    }
}

/// Additive mask `[batch, 1, t, len + t - first]` for `t` new columns after `len` cached ones, over the
/// columns from `first`: the query in column `q` of a row sees key column `k` when `k <= q` (causal) and
/// the row hides both or neither ([`Span`]: before its start, or in its gap). Queries the row hides
/// (padding) see only such columns, so no softmax row is all `-inf` (which would make NaNs that reach real
/// rows through `0 * NaN`). None when nothing is hidden: one new column and every row's own tokens
/// taking every column from `first`.
pub(super) fn attention_mask(
    t: usize,
    (first, len): (usize, usize),
    rows: &[Span],
    device: &Device,
) -> Result<Option<Tensor>> {
    if t == 1 && rows.iter().all(|r| r.is_retired() || (r.start <= first && r.gap_len == 0)) {
        return Ok(None);
    }
    let mask: Vec<f32> = rows
        .iter()
        .flat_map(|r| {
            (len..len + t).flat_map(move |q| {
                (first..len + t).map(move |k| if k <= q && r.hides(k) == r.hides(q) { 0.0 } else { f32::NEG_INFINITY })
            })
        })
        .collect();
    Tensor::from_vec(mask, (rows.len(), 1, t, len + t - first), device).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the decode kernel is told of a row agrees with the span's own positions and hidden columns: a
    /// row from column 3, a row whose own rest follows a shared prefix of 5 columns after a gap of 4, and a
    /// retired row, which hides every column (its start past any column).
    #[test]
    fn step_meta_tells_the_kernel_the_span() {
        let plain = Span::starting_at(3);
        assert_eq!(plain.step_meta(10), [7, 3, 3, 0]);
        let gapped = Span { start: 0, gap: 5, gap_len: 4 };
        assert_eq!(gapped.step_meta(12), [8, 0, 5, 4]);
        // The kernel's test, `c < start || c - gap < gap_len` (for c >= gap), against the span's.
        let [_, start, gap, len] = gapped.step_meta(12);
        let kernel_hides = |c: u32| c < start || (c >= gap && c - gap < len);
        for c in 0..13 {
            assert_eq!(kernel_hides(c), gapped.hides(c as usize), "column {c}");
        }
        assert_eq!(Span::RETIRED.step_meta(12), [0, u32::MAX, u32::MAX, 0]);
    }

    /// A decoding step's activations are made once per layout: none before the first forward, the same
    /// buffers step after step, new ones when the step's rows or the cache's width change (a captured step
    /// holds their addresses).
    #[test]
    fn step_scratch_is_made_once_per_layout() {
        let cfg = ModelConfig::shape("tiny", 1002).unwrap();
        let like = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let made = std::cell::RefCell::new(Vec::new());
        let make = |rows: usize, width: usize| {
            made.borrow_mut().push((rows, width));
            let t = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu);
            Ok(StepScratch {
                qkv: t(rows)?,
                attention: t(rows)?,
                partial: t(width)?,
                gate_up: t(rows)?,
                after_attention: t(rows)?,
                after_mlp: t(rows)?,
            })
        };
        let mut cache = KvCache::new(&cfg).with_capacity(8);
        assert!(cache.step_scratch(2, make).unwrap().is_none(), "no buffers before the first forward");
        let shape = (2, cfg.num_kv_heads(), cfg.head_dim());
        cache.make_room_all(1, shape, &like).unwrap();
        let first = cache.step_scratch(2, make).unwrap().expect("made");
        cache.advance(1);
        let again = cache.step_scratch(2, make).unwrap().expect("kept");
        assert_eq!(first.qkv.id(), again.qkv.id(), "the next step's buffers are the same");
        cache.step_scratch(3, make).unwrap();
        // Past the capacity the buffers grow by GROW columns, and the partial results with them.
        cache.advance(7);
        cache.make_room_all(1, shape, &like).unwrap();
        cache.step_scratch(3, make).unwrap();
        assert_eq!(*made.borrow(), [(2, 8), (3, 8), (3, GROW)]);
    }
}
