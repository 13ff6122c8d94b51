//! The CUDA kernels' C ABI (`cuda/retention.h`): `#[repr(C)]` mirrors of the params structs,
//! checked once against the C side's own sizes and offsets, and safe launch wrappers that take
//! device buffers and ORT's stream.

use std::ffi::{c_char, c_void, CStr};
use std::mem::{offset_of, size_of};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::schema::ElemType;

const PR_ABI_VERSION: u64 = 1;

#[repr(C)]
struct PrPrefillParams {
    batch: i64,
    seq_len: i64,
    q_heads: i32,
    kv_heads: i32,
    key_dim: i32,
    value_dim: i32,
    deg: i32,
    dtype: i32,
    scale: f32,
    chunk_size: i32,
    query: *const c_void,
    key: *const c_void,
    value: *const c_void,
    log_gate: *const f32,
    past_state: *const f32,
    past_sum_of_keys: *const f32,
    output: *mut c_void,
    present_state: *mut f32,
    present_sum_of_keys: *mut f32,
    workspace: *mut c_void,
    workspace_bytes: u64,
}

#[repr(C)]
struct PrDecodeParams {
    batch: i64,
    new_tokens: i64,
    cache_capacity: i64,
    q_heads: i32,
    kv_heads: i32,
    key_dim: i32,
    value_dim: i32,
    deg: i32,
    dtype: i32,
    scale: f32,
    reserved: i32,
    query: *const c_void,
    key: *const c_void,
    value: *const c_void,
    log_gate: *const f32,
    output: *mut c_void,
    state: *mut f32,
    sum_of_keys: *mut f32,
    key_cache: *mut c_void,
    value_cache: *mut c_void,
    log_gate_cache: *mut f32,
    cache_length: *mut i64,
}

unsafe extern "C" {
    fn pr_prefill(params: *const PrPrefillParams, stream: *mut c_void) -> i32;
    fn pr_prefill_workspace_bytes(params: *const PrPrefillParams) -> u64;
    fn pr_decode(params: *const PrDecodeParams, stream: *mut c_void) -> i32;
    fn pr_abi_layout(out: *mut u64, capacity: i32) -> i32;
    fn cudaMemcpyAsync(
        dst: *mut c_void,
        src: *const c_void,
        count: usize,
        kind: i32,
        stream: *mut c_void,
    ) -> i32;
    fn cudaGetErrorString(error: i32) -> *const c_char;
}

const CUDA_MEMCPY_DEVICE_TO_DEVICE: i32 = 3;

/// The Rust mirror's layout, in the order `pr_abi_layout` reports the C one.
fn rust_layout() -> Vec<u64> {
    macro_rules! offsets {
        ($t:ty; $($f:ident),*) => { vec![$(offset_of!($t, $f) as u64),*] };
    }
    let mut v = vec![PR_ABI_VERSION, size_of::<PrPrefillParams>() as u64];
    v.extend(offsets!(PrPrefillParams; batch, seq_len, q_heads, kv_heads, key_dim, value_dim, deg, dtype, scale, chunk_size, query, key, value, log_gate, past_state, past_sum_of_keys, output, present_state, present_sum_of_keys, workspace, workspace_bytes));
    v.push(size_of::<PrDecodeParams>() as u64);
    v.extend(offsets!(PrDecodeParams; batch, new_tokens, cache_capacity, q_heads, kv_heads, key_dim, value_dim, deg, dtype, scale, reserved, query, key, value, log_gate, output, state, sum_of_keys, key_cache, value_cache, log_gate_cache, cache_length));
    v
}

/// Checks once that both sides agree on the params structs (a mismatch is a build bug).
fn abi_checked(op: &'static str) -> Result<()> {
    static CHECK: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            // SAFETY: a null buffer with capacity 0 asks for the length only.
            let n = unsafe { pr_abi_layout(std::ptr::null_mut(), 0) };
            let mut c = vec![0u64; n.max(0) as usize];
            // SAFETY: `c` holds `n` values, as the function reported.
            unsafe { pr_abi_layout(c.as_mut_ptr(), n) };
            let r = rust_layout();
            if c == r {
                Ok(())
            } else {
                Err(format!("CUDA params layout mismatch between cuda/retention.h {c:?} and plugin/ffi/cuda.rs {r:?}"))
            }
        })
        .clone()
        .map_err(|message| Error::Cuda { op, message })
}

fn cuda_error(op: &'static str, code: i32, what: &str) -> Error {
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
    let name = unsafe { CStr::from_ptr(cudaGetErrorString(code)) }
        .to_string_lossy()
        .into_owned();
    Error::Cuda {
        op,
        message: format!("{what}: {name} ({code})"),
    }
}

/// ORT's CUDA stream for this call.
#[derive(Clone, Copy, Debug)]
pub struct Stream(pub(crate) *mut c_void);

/// A tensor in device memory: only the launchers here can touch its bytes.
#[derive(Clone, Copy, Debug)]
pub struct DeviceBuffer {
    pub(crate) ptr: *mut c_void,
    pub bytes: usize,
    pub elem: ElemType,
}

fn dtype_code(t: ElemType) -> i32 {
    match t {
        ElemType::F32 => 0,
        ElemType::F16 => 1,
        ElemType::BF16 => 2,
        ElemType::I64 => -1,
    }
}

/// Enqueues a device-to-device copy of `src` into `dst` (same size) on `stream`.
pub fn copy_async(
    op: &'static str,
    dst: &DeviceBuffer,
    src: &DeviceBuffer,
    stream: Stream,
) -> Result<()> {
    if dst.bytes != src.bytes {
        return Err(Error::Cuda {
            op,
            message: format!("internal: copy of {} bytes into {}", src.bytes, dst.bytes),
        });
    }
    if dst.bytes == 0 {
        return Ok(());
    }
    // SAFETY: both buffers are device allocations of `bytes` bytes owned by ORT for this call, and
    // do not overlap (checked when the output was claimed); the copy is ordered on ORT's stream.
    let code = unsafe {
        cudaMemcpyAsync(
            dst.ptr,
            src.ptr,
            dst.bytes,
            CUDA_MEMCPY_DEVICE_TO_DEVICE,
            stream.0,
        )
    };
    if code != 0 {
        return Err(cuda_error(op, code, "cudaMemcpyAsync"));
    }
    Ok(())
}

/// Shapes and scalars of one prefill launch (validated by the caller).
pub struct PrefillLaunch<'a> {
    pub dims: &'a crate::shapes::Dims,
    pub elem: ElemType,
    pub scale: f32,
    pub chunk_size: usize,
    pub query: DeviceBuffer,
    pub key: DeviceBuffer,
    pub value: DeviceBuffer,
    pub log_gate: Option<DeviceBuffer>,
    pub past: Option<(DeviceBuffer, DeviceBuffer)>,
    pub output: DeviceBuffer,
    pub present_state: Option<DeviceBuffer>,
    pub present_sum_of_keys: Option<DeviceBuffer>,
}

fn c_ptr<T>(b: Option<DeviceBuffer>) -> *mut T {
    b.map_or(std::ptr::null_mut(), |b| b.ptr as *mut T)
}

fn prefill_params(l: &PrefillLaunch<'_>, workspace: Option<DeviceBuffer>) -> PrPrefillParams {
    let d = l.dims;
    PrPrefillParams {
        batch: d.b as i64,
        seq_len: d.s as i64,
        q_heads: d.hq as i32,
        kv_heads: d.hkv as i32,
        key_dim: d.dk as i32,
        value_dim: d.dv as i32,
        deg: 2,
        dtype: dtype_code(l.elem),
        scale: l.scale,
        chunk_size: l.chunk_size as i32,
        query: l.query.ptr,
        key: l.key.ptr,
        value: l.value.ptr,
        log_gate: c_ptr::<f32>(l.log_gate),
        past_state: c_ptr::<f32>(l.past.map(|p| p.0)),
        past_sum_of_keys: c_ptr::<f32>(l.past.map(|p| p.1)),
        output: l.output.ptr,
        present_state: c_ptr(l.present_state),
        present_sum_of_keys: c_ptr(l.present_sum_of_keys),
        workspace: c_ptr(workspace),
        workspace_bytes: workspace.map_or(0, |w| w.bytes as u64),
    }
}

/// Scratch bytes the fastest prefill kernel for this launch needs (0: none).
pub fn prefill_workspace_bytes(op: &'static str, l: &PrefillLaunch<'_>) -> Result<usize> {
    abi_checked(op)?;
    let p = prefill_params(l, None);
    // SAFETY: the launcher only reads the params (sizes, dtype and pointer alignment).
    Ok(unsafe { pr_prefill_workspace_bytes(&p) } as usize)
}

/// Enqueues the prefill; `workspace` (device scratch of `prefill_workspace_bytes` bytes, alive
/// until the kernels have run on `stream`) selects the chunked path where it applies.
pub fn prefill(
    op: &'static str,
    l: &PrefillLaunch<'_>,
    workspace: Option<DeviceBuffer>,
    stream: Stream,
) -> Result<()> {
    abi_checked(op)?;
    let p = prefill_params(l, workspace);
    // SAFETY: every pointer is a device buffer of the size the validated dims imply (or null where
    // the header allows it); the launcher only enqueues work on ORT's stream for this call.
    let code = unsafe { pr_prefill(&p, stream.0) };
    if code != 0 {
        return Err(cuda_error(op, code, "pr_prefill"));
    }
    Ok(())
}

/// Buffers of one decode launch; the state/cache buffers already hold the past values.
pub struct DecodeLaunch<'a> {
    pub dims: &'a crate::shapes::Dims,
    pub elem: ElemType,
    pub scale: f32,
    pub query: DeviceBuffer,
    pub key: DeviceBuffer,
    pub value: DeviceBuffer,
    pub log_gate: Option<DeviceBuffer>,
    pub output: DeviceBuffer,
    pub state: DeviceBuffer,
    pub sum_of_keys: DeviceBuffer,
    pub key_cache: DeviceBuffer,
    pub value_cache: DeviceBuffer,
    pub log_gate_cache: Option<DeviceBuffer>,
    pub cache_length: DeviceBuffer,
}

pub fn decode(op: &'static str, l: &DecodeLaunch<'_>, stream: Stream) -> Result<()> {
    abi_checked(op)?;
    let d = l.dims;
    let p = PrDecodeParams {
        batch: d.b as i64,
        new_tokens: d.s as i64,
        cache_capacity: d.c as i64,
        q_heads: d.hq as i32,
        kv_heads: d.hkv as i32,
        key_dim: d.dk as i32,
        value_dim: d.dv as i32,
        deg: 2,
        dtype: dtype_code(l.elem),
        scale: l.scale,
        reserved: 0,
        query: l.query.ptr,
        key: l.key.ptr,
        value: l.value.ptr,
        log_gate: c_ptr::<f32>(l.log_gate),
        output: l.output.ptr,
        state: l.state.ptr as *mut f32,
        sum_of_keys: l.sum_of_keys.ptr as *mut f32,
        key_cache: l.key_cache.ptr,
        value_cache: l.value_cache.ptr,
        log_gate_cache: c_ptr::<f32>(l.log_gate_cache),
        cache_length: l.cache_length.ptr as *mut i64,
    };
    // SAFETY: as in `prefill`; the in/out buffers are this call's present outputs, owned by ORT.
    let code = unsafe { pr_decode(&p, stream.0) };
    if code != 0 {
        return Err(cuda_error(op, code, "pr_decode"));
    }
    Ok(())
}
