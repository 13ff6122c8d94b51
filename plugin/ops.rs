//! What a kernel does when ORT calls it: validate once, allocate outputs from the op table,
//! and hand typed slices to the backend of its execution provider.

use crate::config::Config;
use crate::cpu;
use crate::element::{Element, TensorElement};
use crate::error::{Error, Result};
use crate::ffi::context::ComputeContext;
use crate::schema::{decode, prefill, ElemType, OpSchema, POWER_RETENTION, POWER_RETENTION_STEP};
use crate::shapes::{self, Dims};
use half::{bf16, f16};

/// Execution providers the library registers kernels for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ep {
    Cpu,
    #[cfg(has_cuda)]
    Cuda,
}

impl Ep {
    pub fn provider_name(self) -> &'static str {
        match self {
            Ep::Cpu => "CPUExecutionProvider",
            #[cfg(has_cuda)]
            Ep::Cuda => "CUDAExecutionProvider",
        }
    }

    /// The providers this build has kernels for (CUDA kernels are registered whether or not a
    /// GPU is present: ORT only picks them for nodes it places on its CUDA execution provider).
    pub fn available() -> Vec<Ep> {
        #[cfg(has_cuda)]
        return vec![Ep::Cpu, Ep::Cuda];
        #[cfg(not(has_cuda))]
        vec![Ep::Cpu]
    }
}

/// One node's kernel: its op, dtype, provider and checked attributes.
pub struct Kernel {
    pub op: &'static OpSchema,
    pub elem: ElemType,
    pub ep: Ep,
    pub cfg: Config,
    /// Which outputs the node wires (optional outputs may be omitted).
    pub outputs_wired: Vec<bool>,
}

pub fn compute(k: &Kernel, ctx: &mut ComputeContext<'_>) -> Result<()> {
    let dims = shapes::validate(k.op, &k.cfg, k.elem, &ctx.input_metas(), &k.outputs_wired)?;
    #[cfg(has_cuda)]
    if k.ep == Ep::Cuda {
        return crate::cuda::compute(k, dims, ctx);
    }
    match k.elem {
        ElemType::F32 => compute_typed::<f32>(k, dims, ctx),
        ElemType::F16 => compute_typed::<f16>(k, dims, ctx),
        ElemType::BF16 => compute_typed::<bf16>(k, dims, ctx),
        ElemType::I64 => Err(Error::Constraint {
            op: k.op.name,
            what: "internal: int64 is not a model dtype".into(),
        }),
    }
}

fn compute_typed<T: Element>(k: &Kernel, dims: Dims, ctx: &mut ComputeContext<'_>) -> Result<()> {
    if std::ptr::eq(k.op, &POWER_RETENTION) {
        prefill_cpu::<T>(k, dims, ctx)
    } else if std::ptr::eq(k.op, &POWER_RETENTION_STEP) {
        decode_cpu::<T>(k, dims, ctx)
    } else {
        Err(Error::Constraint {
            op: k.op.name,
            what: "internal: op without a CPU kernel".into(),
        })
    }
}

fn required<'a, T>(op: &OpSchema, port: usize, x: Option<&'a [T]>) -> Result<&'a [T]> {
    x.ok_or(Error::MissingInput {
        op: op.name,
        input: op.inputs[port].name,
        because: String::new(),
    })
}

pub(crate) fn shape(dims: &Dims, op: &OpSchema, output: usize) -> Vec<i64> {
    dims.shape_of(op.outputs[output].shape)
}

fn prefill_cpu<T: Element>(k: &Kernel, dims: Dims, ctx: &mut ComputeContext<'_>) -> Result<()> {
    let op = k.op;
    let args = cpu::prefill::PrefillArgs {
        dims,
        deg: k.cfg.deg,
        scale: k.cfg.scale_for(dims.dk),
        chunk: k.cfg.chunk_size,
        query: required(op, prefill::QUERY, ctx.input::<T>(prefill::QUERY)?)?,
        key: required(op, prefill::KEY, ctx.input::<T>(prefill::KEY)?)?,
        value: required(op, prefill::VALUE, ctx.input::<T>(prefill::VALUE)?)?,
        log_gate: ctx.input::<f32>(prefill::LOG_GATE)?,
        past_state: ctx.input::<f32>(prefill::PAST_STATE)?,
        past_sum_of_keys: ctx.input::<f32>(prefill::PAST_SUM_OF_KEYS)?,
    };
    let output = ctx.output::<T>(prefill::OUTPUT, &shape(&dims, op, prefill::OUTPUT))?;
    let mut scratch = Vec::new();
    let output = match output {
        Some(o) => o,
        None => {
            scratch.resize(dims.b * dims.s * dims.hq * dims.dv, T::from_f32(0.0));
            &mut scratch[..]
        }
    };
    let outs = cpu::prefill::PrefillOutputs {
        output,
        present_state: ctx.output::<f32>(
            prefill::PRESENT_STATE,
            &shape(&dims, op, prefill::PRESENT_STATE),
        )?,
        present_sum_of_keys: ctx.output::<f32>(
            prefill::PRESENT_SUM_OF_KEYS,
            &shape(&dims, op, prefill::PRESENT_SUM_OF_KEYS),
        )?,
    };
    cpu::prefill::prefill(&args, outs, &ctx.parallel());
    Ok(())
}

/// An in-place buffer, or a private copy when the node does not wire the output.
enum Buf<'a, T> {
    Ort(&'a mut [T]),
    Own(Vec<T>),
}

impl<T> Buf<'_, T> {
    fn as_mut(&mut self) -> &mut [T] {
        match self {
            Buf::Ort(s) => s,
            Buf::Own(v) => v,
        }
    }
}

fn in_place<'a, T: TensorElement>(
    ctx: &mut ComputeContext<'a>,
    op: &OpSchema,
    input: usize,
    output: usize,
    dims: &Dims,
) -> Result<Buf<'a, T>> {
    match ctx.in_place::<T>(input, output, &shape(dims, op, output))? {
        Some(s) => Ok(Buf::Ort(s)),
        None => Ok(Buf::Own(
            required(op, input, ctx.input::<T>(input)?)?.to_vec(),
        )),
    }
}

fn decode_cpu<T: Element>(k: &Kernel, dims: Dims, ctx: &mut ComputeContext<'_>) -> Result<()> {
    let op = k.op;
    // Copied out first: the in-place output below may reuse this very buffer.
    let lengths: Vec<i64> = required(
        op,
        decode::CACHE_LENGTH,
        ctx.input::<i64>(decode::CACHE_LENGTH)?,
    )?
    .to_vec();
    if let Some((batch, &value)) = lengths
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 || l as usize > dims.c)
    {
        return Err(Error::CacheLength {
            op: op.name,
            batch,
            value,
            capacity: dims.c,
        });
    }
    let args = cpu::decode::DecodeArgs {
        dims,
        scale: k.cfg.scale_for(dims.dk),
        query: required(op, decode::QUERY, ctx.input::<T>(decode::QUERY)?)?,
        key: required(op, decode::KEY, ctx.input::<T>(decode::KEY)?)?,
        value: required(op, decode::VALUE, ctx.input::<T>(decode::VALUE)?)?,
        log_gate: ctx.input::<f32>(decode::LOG_GATE)?,
    };
    let mut state = in_place::<f32>(ctx, op, decode::PAST_STATE, decode::PRESENT_STATE, &dims)?;
    let mut sum = in_place::<f32>(
        ctx,
        op,
        decode::PAST_SUM_OF_KEYS,
        decode::PRESENT_SUM_OF_KEYS,
        &dims,
    )?;
    let mut kc = in_place::<T>(
        ctx,
        op,
        decode::PAST_KEY_CACHE,
        decode::PRESENT_KEY_CACHE,
        &dims,
    )?;
    let mut vc = in_place::<T>(
        ctx,
        op,
        decode::PAST_VALUE_CACHE,
        decode::PRESENT_VALUE_CACHE,
        &dims,
    )?;
    let mut gc = match args.log_gate {
        Some(_) => Some(in_place::<f32>(
            ctx,
            op,
            decode::PAST_LOG_GATE_CACHE,
            decode::PRESENT_LOG_GATE_CACHE,
            &dims,
        )?),
        None => None,
    };
    let mut len = in_place::<i64>(
        ctx,
        op,
        decode::CACHE_LENGTH,
        decode::PRESENT_CACHE_LENGTH,
        &dims,
    )?;
    let mut scratch = Vec::new();
    let output = match ctx.output::<T>(decode::OUTPUT, &shape(&dims, op, decode::OUTPUT))? {
        Some(o) => o,
        None => {
            scratch.resize(dims.b * dims.s * dims.hq * dims.dv, T::from_f32(0.0));
            &mut scratch[..]
        }
    };
    let buffers = cpu::decode::DecodeBuffers {
        output,
        state: state.as_mut(),
        sum_of_keys: sum.as_mut(),
        key_cache: kc.as_mut(),
        value_cache: vc.as_mut(),
        log_gate_cache: gc.as_mut().map(|g| g.as_mut()),
        cache_length: len.as_mut(),
    };
    cpu::decode::decode(&args, buffers, &ctx.parallel());
    Ok(())
}
