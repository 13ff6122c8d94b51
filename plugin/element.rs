//! The model dtypes `T` as Rust types: loaded to f32 for arithmetic, stored back after.

use crate::schema::ElemType;
use half::{bf16, f16};

/// A plain element type that tensors can be viewed as (any bit pattern is a valid value).
pub trait TensorElement: Copy + Send + Sync + 'static {
    const TYPE: ElemType;
}

impl TensorElement for i64 {
    const TYPE: ElemType = ElemType::I64;
}

/// A model dtype `T`.
pub trait Element: TensorElement {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl TensorElement for f32 {
    const TYPE: ElemType = ElemType::F32;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl TensorElement for f16 {
    const TYPE: ElemType = ElemType::F16;
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl TensorElement for bf16 {
    const TYPE: ElemType = ElemType::BF16;
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
