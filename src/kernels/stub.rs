//! The kernel modules of a build without the `cuda` feature: each `try_` function has its CUDA module's
//! signature and always answers `Ok(None)`, so the layers run their references with no `cfg` of their own.

pub mod attention {
    use candle_core::{Result, Tensor};

    pub fn try_block_forward(_: &Tensor, _: &Tensor, _: usize, _: f64) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    pub fn try_block_backward(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: f64,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

pub mod cross_entropy {
    use candle_core::{Result, Tensor};

    pub fn try_cross_entropy_forward_backward(
        _: &Tensor,
        _: usize,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

pub mod embedding {
    use crate::kernels::shapes::TokenRows;
    use candle_core::{Result, Tensor};

    pub fn try_add_embedding_rows(_: &Tensor, _: &Tensor, _: &TokenRows, _: bool) -> Result<Option<()>> {
        Ok(None)
    }

    pub fn try_embedding_rows(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

pub mod flash_attention {
    use crate::kernels::shapes::{FlashInputs, FlashKernels};
    use candle_core::{Result, Tensor};

    pub fn takes_heads(_: &Tensor, _: usize) -> bool {
        false
    }

    pub fn try_forward(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: FlashKernels,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    pub fn try_backward(_: &FlashInputs, _: FlashKernels) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }

    pub fn try_backward_rows(_: &FlashInputs, _: (&Tensor, &Tensor), _: FlashKernels) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

pub mod flat {
    use candle_core::{DType, Result, Tensor};
    use std::ops::Range;

    pub fn try_step_weights(
        _: &Tensor,
        _: &[(Range<usize>, Option<usize>)],
        _: f64,
        _: DType,
        _: bool,
    ) -> Result<Option<(Tensor, Option<TernaryCodes>)>> {
        Ok(None)
    }

    /// None without CUDA: no value of it exists.
    #[derive(Clone)]
    pub enum TernaryCodes {}

    impl TernaryCodes {
        pub fn operand(&self, _: usize, _: Range<usize>, _: usize) -> Result<crate::kernels::shapes::Int8Operand> {
            match *self {}
        }
    }

    pub fn try_accumulate(_: &Tensor, _: &Tensor, _: bool) -> Result<Option<()>> {
        Ok(None)
    }
}

pub mod gemm {
    pub use crate::kernels::shapes::Gemm;
    use candle_core::{Result, Tensor};

    pub fn try_gemm(_: &Tensor, _: Gemm) -> Result<Option<()>> {
        Ok(None)
    }

    pub fn try_padded_logits(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

pub mod int8_gemm {
    use crate::kernels::shapes::{HeadShape, Int8Operand};
    use candle_core::{Device, Result, Tensor};

    pub fn available(_: &Device) -> bool {
        false
    }

    pub fn try_bitlinear_forward(
        _: &Int8Operand,
        _: &Int8Operand,
        _: Option<&Tensor>,
    ) -> Result<Option<(Tensor, bool)>> {
        Ok(None)
    }

    pub fn try_bitlinear_heads(
        _: &Int8Operand,
        _: &Int8Operand,
        _: HeadShape,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }
}

pub mod readback {
    use candle_core::{Result, Tensor};

    /// Without CUDA every tensor is read as usual: no copy is ever queued.
    #[derive(Default)]
    pub struct Readback;

    #[derive(Debug)]
    pub enum Ticket {}

    impl Readback {
        pub fn new() -> Self {
            Self
        }

        pub fn try_start(&mut self, _: &Tensor) -> Result<Option<Ticket>> {
            Ok(None)
        }

        pub fn read(&mut self, ticket: Ticket) -> Result<Vec<u32>> {
            match ticket {}
        }
    }
}

pub mod residual {
    use candle_core::{Result, Tensor};

    pub fn try_residual_add(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn try_scale_add(_: &Tensor, _: Option<&Tensor>, _: Option<&Tensor>) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

pub mod rmsnorm {
    use crate::model::arch::Activation;
    use candle_core::{Result, Tensor};

    pub fn try_rmsnorm_quant_forward(
        _: &Tensor,
        _: Option<Activation>,
        _: Option<&Tensor>,
        _: f64,
        _: f64,
        _: bool,
    ) -> Result<Option<(Tensor, Tensor, Option<crate::kernels::shapes::Int8Operand>)>> {
        Ok(None)
    }

    pub fn try_rmsnorm_backward(
        _: &Tensor,
        _: &Tensor,
        _: Option<Activation>,
        _: Option<&Tensor>,
        _: &Tensor,
        _: Option<&Tensor>,
        _: bool,
    ) -> Result<Option<(Tensor, Tensor, Option<Tensor>)>> {
        Ok(None)
    }

    pub use crate::kernels::shapes::ColumnSum;

    pub fn try_column_sums(_: &[ColumnSum]) -> Result<Option<()>> {
        Ok(None)
    }
}

pub mod rope {
    use crate::kernels::shapes::HeadShape;
    use candle_core::{Result, Tensor};

    pub fn try_qkv_heads(_: &Tensor, _: HeadShape, _: &Tensor, _: &Tensor) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }

    pub fn try_qkv_heads_backward(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: HeadShape,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

pub mod decode {
    use crate::kernels::shapes::{BitLinearStep, DecodeAttention};
    use candle_core::{Result, Tensor};

    pub fn takes(_: &Tensor, _: usize) -> bool {
        false
    }

    pub fn address(_: &Tensor) -> Result<u64> {
        Ok(0)
    }

    pub fn try_gemv(_: &Tensor, _: &Tensor, _: Option<&Tensor>, _: Option<&Tensor>) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn takes_step(_: &Tensor, _: usize, _: usize) -> bool {
        false
    }

    pub fn try_bitlinear_step(_: &BitLinearStep) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn pack_ternary(_: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn join_counts(_: usize, _: usize) -> usize {
        0
    }

    pub fn partial_len(_: usize, _: usize, _: usize, _: usize) -> usize {
        0
    }

    pub fn try_decode_attention(_: &DecodeAttention) -> Result<Option<Tensor>> {
        Ok(None)
    }
}
