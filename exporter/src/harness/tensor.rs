//! Host tensors of the element types the models use, and conversions to and from `ort` values.

use anyhow::{bail, Context, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use ort::memory::Allocator;
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor, TensorElementType};

/// A host tensor: shape plus data in one of the model dtypes.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub shape: Vec<i64>,
    pub data: HostData,
}

impl Host {
    pub fn zeros(dtype: &str, shape: &[i64]) -> Result<Host> {
        let n = shape.iter().product::<i64>().max(0) as usize;
        let data = match dtype {
            "float32" | "float" => HostData::F32(vec![0.0; n]),
            "float16" => HostData::F16(vec![f16::ZERO; n]),
            "bfloat16" => HostData::BF16(vec![bf16::ZERO; n]),
            "int64" => HostData::I64(vec![0; n]),
            other => bail!("unsupported element type '{other}' in the state description"),
        };
        Ok(Host {
            shape: shape.to_vec(),
            data,
        })
    }

    pub fn i64(shape: &[i64], v: Vec<i64>) -> Host {
        Host {
            shape: shape.to_vec(),
            data: HostData::I64(v),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        match &self.data {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::I64(v) => v.len(),
        }
    }

    /// Copies `src` (same dtype) into elements [offset, offset + src.numel()).
    pub fn write_at(&mut self, offset: usize, src: &Host) -> Result<()> {
        match (&mut self.data, &src.data) {
            (HostData::F32(d), HostData::F32(s)) => d[offset..offset + s.len()].copy_from_slice(s),
            (HostData::F16(d), HostData::F16(s)) => d[offset..offset + s.len()].copy_from_slice(s),
            (HostData::BF16(d), HostData::BF16(s)) => {
                d[offset..offset + s.len()].copy_from_slice(s)
            }
            (HostData::I64(d), HostData::I64(s)) => d[offset..offset + s.len()].copy_from_slice(s),
            _ => bail!("element type mismatch while assembling a batch"),
        }
        Ok(())
    }

    /// Values as f32 (logits of any float dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.f32_into(0, &mut out);
        out
    }

    /// Rows of `row` elements as f32 (logits: one row per sequence), converted straight into each
    /// row (the half-precision conversions use the CPU's conversion instructions where it has them).
    pub fn rows_f32(&self, row: usize) -> Vec<Vec<f32>> {
        let row = row.max(1);
        (0..self.numel() / row)
            .map(|r| {
                let mut out = vec![0.0; row];
                self.f32_into(r * row, &mut out);
                out
            })
            .collect()
    }

    /// Elements [offset, offset + out.len()) as f32.
    fn f32_into(&self, offset: usize, out: &mut [f32]) {
        let end = offset + out.len();
        match &self.data {
            HostData::F32(v) => out.copy_from_slice(&v[offset..end]),
            HostData::F16(v) => v[offset..end].convert_to_f32_slice(out),
            HostData::BF16(v) => v[offset..end].convert_to_f32_slice(out),
            HostData::I64(v) => out
                .iter_mut()
                .zip(&v[offset..end])
                .for_each(|(o, &x)| *o = x as f32),
        }
    }

    /// A new ORT tensor allocated by `alloc` (so it can also be bound as an output) holding
    /// these values.
    pub fn to_ort(&self, alloc: &Allocator) -> Result<DynTensor> {
        let shape: Vec<i64> = self.shape.clone();
        macro_rules! make {
            ($t:ty, $v:expr) => {{
                if alloc.memory_info().is_cpu_accessible() {
                    let mut t = Tensor::<$t>::new(alloc, shape.clone())?;
                    t.try_extract_tensor_mut()?.1.copy_from_slice($v);
                    t.upcast()
                } else {
                    let cpu = Tensor::<$t>::from_array((shape.clone(), $v.clone()))?;
                    let mut dev = Tensor::<$t>::new(alloc, shape.clone())?;
                    cpu.copy_into(&mut dev)?;
                    dev.upcast()
                }
            }};
        }
        Ok(match &self.data {
            HostData::F32(v) => make!(f32, v),
            HostData::F16(v) => make!(f16, v),
            HostData::BF16(v) => make!(bf16, v),
            HostData::I64(v) => make!(i64, v),
        })
    }

    /// A new ORT tensor of this dtype and shape allocated by `alloc`, contents undefined (an
    /// output buffer, or a device buffer filled by `DeviceCopy::upload`).
    pub fn alloc_like(&self, alloc: &Allocator) -> Result<DynTensor> {
        let shape = self.shape.clone();
        Ok(match &self.data {
            HostData::F32(_) => Tensor::<f32>::new(alloc, shape)?.upcast(),
            HostData::F16(_) => Tensor::<f16>::new(alloc, shape)?.upcast(),
            HostData::BF16(_) => Tensor::<bf16>::new(alloc, shape)?.upcast(),
            HostData::I64(_) => Tensor::<i64>::new(alloc, shape)?.upcast(),
        })
    }

    /// Writes these values into an existing tensor (same dtype and size), keeping its address.
    pub fn upload(&self, dst: &mut DynTensor) -> Result<()> {
        if dst.memory_info().is_cpu_accessible() {
            match &self.data {
                HostData::F32(v) => dst.try_extract_tensor_mut::<f32>()?.1.copy_from_slice(v),
                HostData::F16(v) => dst.try_extract_tensor_mut::<f16>()?.1.copy_from_slice(v),
                HostData::BF16(v) => dst.try_extract_tensor_mut::<bf16>()?.1.copy_from_slice(v),
                HostData::I64(v) => dst.try_extract_tensor_mut::<i64>()?.1.copy_from_slice(v),
            }
            return Ok(());
        }
        self.to_ort(&Allocator::default())?
            .copy_into(dst)
            .context("copy to the device")
    }

    /// Reads a tensor wherever it lives.
    pub fn from_tensor(t: &DynTensor) -> Result<Host> {
        Host::from_ort_anywhere(&t.view().into_dyn())
    }

    /// Reads any host-accessible ORT tensor.
    pub fn from_ort(v: &DynValue) -> Result<Host> {
        let shape: Vec<i64> = v.shape().to_vec();
        let data = match v.dtype().clone() {
            ort::value::ValueType::Tensor {
                ty: TensorElementType::Float32,
                ..
            } => HostData::F32(v.try_extract_tensor::<f32>()?.1.to_vec()),
            ort::value::ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            } => HostData::F16(v.try_extract_tensor::<f16>()?.1.to_vec()),
            ort::value::ValueType::Tensor {
                ty: TensorElementType::Bfloat16,
                ..
            } => HostData::BF16(v.try_extract_tensor::<bf16>()?.1.to_vec()),
            ort::value::ValueType::Tensor {
                ty: TensorElementType::Int64,
                ..
            } => HostData::I64(v.try_extract_tensor::<i64>()?.1.to_vec()),
            other => bail!("unsupported output type {other:?}"),
        };
        Ok(Host { shape, data })
    }

    /// Reads an ORT tensor wherever it lives (device tensors are copied to the host first).
    pub fn from_ort_anywhere(v: &DynValue) -> Result<Host> {
        let t = v.view().downcast::<DynTensorValueType>()?;
        if t.memory_info().is_cpu_accessible() {
            return Host::from_ort(v);
        }
        let cpu = t
            .to(ort::memory::AllocationDevice::CPU, 0)
            .context("copy a device tensor to the host")?;
        Host::from_ort(&cpu.into_dyn())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_convert_each_dtype_to_f32() {
        let halves = |v: &[f32]| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        let h = Host {
            shape: vec![2, 1, 3],
            data: HostData::F16(halves(&[1.0, -2.5, 0.125, 65504.0, 3.0, -0.0])),
        };
        assert_eq!(
            h.rows_f32(3),
            vec![vec![1.0, -2.5, 0.125], vec![65504.0, 3.0, -0.0]]
        );
        assert_eq!(h.to_f32(), vec![1.0, -2.5, 0.125, 65504.0, 3.0, -0.0]);
        let b = Host {
            shape: vec![1, 2],
            data: HostData::BF16(vec![bf16::from_f32(1.5), bf16::from_f32(-4.0)]),
        };
        assert_eq!(b.rows_f32(2), vec![vec![1.5, -4.0]]);
        assert_eq!(Host::i64(&[3], vec![1, 2, 3]).rows_f32(1).len(), 3);
    }
}
