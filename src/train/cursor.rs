//! Where a run is in its data: the current epoch's row order (`data::epoch_rows`, seeded per epoch) and how
//! much of it the optimizer steps have taken, kept in the `TrainerState` that checkpoints save, so a resumed
//! run continues with the next unseen rows.

use crate::checkpoint::TrainerState;
use crate::data::{self, DataOptions, Dataset, Row};

pub struct DataCursor<'a> {
    ds: &'a Dataset,
    opts: &'a DataOptions,
    /// `train.seed` of this run (a resume that accepted another seed goes on in the new order).
    seed: u64,
    /// Rows of one optimizer step, all ranks together.
    rows_per_step: usize,
    rows: Vec<Row>,
    pub state: TrainerState,
}

impl<'a> DataCursor<'a> {
    pub fn new(ds: &'a Dataset, opts: &'a DataOptions, seed: u64, rows_per_step: usize, state: TrainerState) -> Self {
        let rows = data::epoch_rows(ds, state.epoch, seed, opts);
        Self { ds, opts, seed, rows_per_step, rows, state }
    }

    /// The next optimizer step's rows (all ranks), counted as taken: an epoch with fewer rows left than a
    /// step takes is over, and the next one starts in its own order.
    pub fn next_step(&mut self) -> Vec<Row> {
        // `epoch_rows_done` is at most `rows.len()` (`resume::check_state`), so this cannot overflow.
        while self.rows.len() - self.state.epoch_rows_done < self.rows_per_step {
            self.state.epoch += 1;
            self.state.epoch_rows_done = 0;
            self.rows = data::epoch_rows(self.ds, self.state.epoch, self.seed, self.opts);
        }
        let start = self.state.epoch_rows_done;
        self.state.step += 1;
        self.state.epoch_rows_done += self.rows_per_step;
        self.rows[start..start + self.rows_per_step].to_vec()
    }

    pub fn step(&self) -> usize {
        self.state.step
    }
}

/// Optimizer steps in `epochs` epochs of `ds` (each epoch's last rows that do not fill a step are left out),
/// at most `max_steps` when that is set.
pub fn total_steps(
    ds: &Dataset,
    opts: &DataOptions,
    seed: u64,
    epochs: usize,
    rows_per_step: usize,
    max_steps: usize,
) -> usize {
    let total: usize = (0..epochs).map(|e| data::epoch_rows(ds, e, seed, opts).len() / rows_per_step).sum();
    match max_steps {
        0 => total,
        m => total.min(m),
    }
}
