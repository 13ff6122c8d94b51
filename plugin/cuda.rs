//! The CUDA backend: the same validated dims as the CPU path, device buffers from ORT, and the
//! kernels of `cuda/` launched on ORT's stream (no host synchronisation and no allocation outside
//! ORT's allocator, so a decode step can be captured in a CUDA graph).

use crate::error::{Error, Result};
use crate::ffi::context::ComputeContext;
use crate::ffi::cuda::{self, DecodeLaunch, DeviceBuffer, PrefillLaunch};
use crate::ops::{shape, Kernel};
use crate::schema::{decode, prefill, OpSchema, POWER_RETENTION};
use crate::shapes::Dims;

/// What the kernels of `cuda/` support (see `cuda/retention.h`); anything else is refused here,
/// before anything is enqueued, with a message naming the limit.
fn supported(op: &'static OpSchema, d: &Dims, deg: usize) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::Unsupported {
            op: op.name,
            what,
            why: " on the CUDA execution provider (run this node on the CPU provider)".into(),
        })
    };
    if deg != 2 {
        return refuse(format!("deg {deg}"));
    }
    if ![32, 64, 128].contains(&d.dk) {
        return refuse(format!(
            "key head dim Dk = {} (supported: 32, 64, 128)",
            d.dk
        ));
    }
    // Prefill reads values in groups of 4 columns, decode in groups of 8.
    let dv_multiple = if std::ptr::eq(op, &POWER_RETENTION) {
        4
    } else {
        8
    };
    if !d.dv.is_multiple_of(dv_multiple) {
        return refuse(format!(
            "value head dim Dv = {} (must be a multiple of {dv_multiple})",
            d.dv
        ));
    }
    if d.group() > 32 {
        return refuse(format!(
            "Hq/Hkv = {} query heads per kv head (at most 32)",
            d.group()
        ));
    }
    if d.b > 65_535 || d.c > 8192 {
        return refuse(format!(
            "batch {} / cache capacity {} (at most 65535 / 8192)",
            d.b, d.c
        ));
    }
    Ok(())
}

/// Whether the chunked prefill may run: `POWER_RETENTION_CHUNKED_PREFILL=0` turns it
/// off, `=1` on; unset takes [`CHUNKED_PREFILL_DEFAULT`].
fn chunked_prefill_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(
        || match std::env::var("POWER_RETENTION_CHUNKED_PREFILL").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => CHUNKED_PREFILL_DEFAULT,
        },
    )
}

/// On since the chunked kernels passed tests/gpu/test_kernels.py, the sanitizer and the ORT CUDA tests on an H100.
const CHUNKED_PREFILL_DEFAULT: bool = true;

fn required(op: &OpSchema, port: usize, x: Option<DeviceBuffer>) -> Result<DeviceBuffer> {
    x.ok_or(Error::MissingInput {
        op: op.name,
        input: op.inputs[port].name,
        because: String::new(),
    })
}

pub fn compute(k: &Kernel, dims: Dims, ctx: &mut ComputeContext<'_>) -> Result<()> {
    let op = k.op;
    supported(op, &dims, k.cfg.deg)?;
    let stream = ctx.stream()?;
    let scale = k.cfg.scale_for(dims.dk);
    if std::ptr::eq(op, &POWER_RETENTION) {
        let past = match (
            ctx.device_input(prefill::PAST_STATE)?,
            ctx.device_input(prefill::PAST_SUM_OF_KEYS)?,
        ) {
            (Some(s), Some(k)) => Some((s, k)),
            _ => None,
        };
        let launch = PrefillLaunch {
            dims: &dims,
            elem: k.elem,
            scale,
            chunk_size: k.cfg.chunk_size,
            query: required(op, prefill::QUERY, ctx.device_input(prefill::QUERY)?)?,
            key: required(op, prefill::KEY, ctx.device_input(prefill::KEY)?)?,
            value: required(op, prefill::VALUE, ctx.device_input(prefill::VALUE)?)?,
            log_gate: ctx.device_input(prefill::LOG_GATE)?,
            past,
            output: ctx
                .device_output(prefill::OUTPUT, &shape(&dims, op, prefill::OUTPUT))?
                .ok_or(Error::Unsupported {
                    op: op.name,
                    what: "a node without its 'output'".into(),
                    why: String::new(),
                })?,
            present_state: ctx.device_output(
                prefill::PRESENT_STATE,
                &shape(&dims, op, prefill::PRESENT_STATE),
            )?,
            present_sum_of_keys: ctx.device_output(
                prefill::PRESENT_SUM_OF_KEYS,
                &shape(&dims, op, prefill::PRESENT_SUM_OF_KEYS),
            )?,
        };
        // The chunked prefill keeps per-chunk states in scratch from the EP's allocator. If
        // that allocation fails the one-kernel path runs instead (same outputs, slower).
        let need = if chunked_prefill_enabled() {
            cuda::prefill_workspace_bytes(op.name, &launch)?
        } else {
            0
        };
        let scratch = (need > 0)
            .then(|| ctx.device_scratch(prefill::QUERY, need).ok())
            .flatten();
        cuda::prefill(
            op.name,
            &launch,
            scratch.as_ref().map(|s| s.buffer()),
            stream,
        )?;
        // Freed here, after the enqueue: the arena hands the block to later work of this stream.
        drop(scratch);
        return Ok(());
    }
    let wired = |o: usize| Error::Unsupported {
        op: op.name,
        what: format!("leaving output '{}' unwired", op.outputs[o].name),
        why: " on the CUDA execution provider (the step updates it in place)".into(),
    };
    let query = required(op, decode::QUERY, ctx.device_input(decode::QUERY)?)?;
    let key = required(op, decode::KEY, ctx.device_input(decode::KEY)?)?;
    let value = required(op, decode::VALUE, ctx.device_input(decode::VALUE)?)?;
    let log_gate = ctx.device_input(decode::LOG_GATE)?;
    let mut pair = |i: usize, o: usize| -> Result<DeviceBuffer> {
        match ctx.device_in_place(i, o, &shape(&dims, op, o), stream)? {
            Some(b) => Ok(b),
            None => Err(wired(o)),
        }
    };
    let state = pair(decode::PAST_STATE, decode::PRESENT_STATE)?;
    let sum_of_keys = pair(decode::PAST_SUM_OF_KEYS, decode::PRESENT_SUM_OF_KEYS)?;
    let key_cache = pair(decode::PAST_KEY_CACHE, decode::PRESENT_KEY_CACHE)?;
    let value_cache = pair(decode::PAST_VALUE_CACHE, decode::PRESENT_VALUE_CACHE)?;
    let log_gate_cache = if log_gate.is_some() {
        Some(pair(
            decode::PAST_LOG_GATE_CACHE,
            decode::PRESENT_LOG_GATE_CACHE,
        )?)
    } else {
        None
    };
    let cache_length = pair(decode::CACHE_LENGTH, decode::PRESENT_CACHE_LENGTH)?;
    let output = match ctx.device_output(decode::OUTPUT, &shape(&dims, op, decode::OUTPUT))? {
        Some(b) => b,
        None => return Err(wired(decode::OUTPUT)),
    };
    let launch = DecodeLaunch {
        dims: &dims,
        elem: k.elem,
        scale,
        query,
        key,
        value,
        log_gate,
        output,
        state,
        sum_of_keys,
        key_cache,
        value_cache,
        log_gate_cache,
        cache_length,
    };
    cuda::decode(op.name, &launch, stream)
}
