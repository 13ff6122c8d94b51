//! One `Compute` call's view of its tensors, as safe slices.
//!
//! Soundness: ORT owns the buffers for the whole call. Every output handed out is checked not to
//! overlap any live input or earlier output, so a `&mut [T]` never aliases a `&[T]`. The decode
//! op's declared in-place pairs go through [`ComputeContext::in_place`]: the same buffer is handed
//! out once, as the mutable output (the input view is retired), and distinct buffers are copied.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use ort_sys::{OrtKernelContext, OrtValue};

use super::api::{api, check};
use crate::element::TensorElement;
use crate::error::{Error, Result};
use crate::parallel::Parallel;
use crate::schema::{ElemType, OpSchema};
use crate::shapes::InputMeta;

struct RawTensor {
    dims: Vec<i64>,
    elem: ElemType,
    ptr: *mut c_void,
    bytes: usize,
}

impl RawTensor {
    fn range(&self) -> Range<usize> {
        self.ptr as usize..self.ptr as usize + self.bytes
    }
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// The tensors of one `Compute` call. `'a` is the call's duration.
pub struct ComputeContext<'a> {
    op: &'static OpSchema,
    raw: *mut OrtKernelContext,
    inputs: Vec<Option<RawTensor>>,
    /// Inputs whose buffer now belongs to an in-place output (exactly aliased).
    retired: Vec<bool>,
    /// Inputs already copied into their in-place output; reading them again would be a bug.
    consumed: Vec<bool>,
    outputs: Vec<Range<usize>>,
    _call: PhantomData<&'a mut OrtKernelContext>,
}

impl<'a> ComputeContext<'a> {
    /// # Safety
    /// `raw` must be the kernel context ORT passed to this `KernelComputeV2` call, and the
    /// returned value must not outlive the call.
    pub unsafe fn new(op: &'static OpSchema, raw: *mut OrtKernelContext) -> Result<Self> {
        let api = api();
        let rt = |message: String| Error::Runtime {
            op: op.name,
            message,
        };
        let mut count = 0usize;
        // SAFETY: raw is valid for this call; count is a valid out pointer.
        check(unsafe { (api.KernelContext_GetInputCount)(raw, &mut count) }).map_err(rt)?;
        let mut inputs = Vec::with_capacity(op.inputs.len());
        for i in 0..op.inputs.len() {
            if i >= count {
                inputs.push(None);
                continue;
            }
            let mut value: *const OrtValue = std::ptr::null();
            // SAFETY: i < count; value is a valid out pointer.
            check(unsafe { (api.KernelContext_GetInput)(raw, i, &mut value) }).map_err(rt)?;
            if value.is_null() {
                inputs.push(None);
                continue;
            }
            // SAFETY: value is a live input OrtValue of this call.
            inputs.push(Some(
                unsafe { describe(value as *mut OrtValue) }.map_err(rt)?,
            ));
        }
        let n = inputs.len();
        Ok(ComputeContext {
            op,
            raw,
            inputs,
            retired: vec![false; n],
            consumed: vec![false; n],
            outputs: Vec::new(),
            _call: PhantomData,
        })
    }

    /// Dims and element type of input `i`, if the node wires it.
    pub fn input_meta(&self, i: usize) -> Option<InputMeta<'_>> {
        self.inputs.get(i)?.as_ref().map(|t| InputMeta {
            dims: &t.dims,
            elem: t.elem,
        })
    }

    /// All inputs' metadata, in port order.
    pub fn input_metas(&self) -> Vec<Option<InputMeta<'_>>> {
        (0..self.op.inputs.len())
            .map(|i| self.input_meta(i))
            .collect()
    }

    /// Input `i` as a host slice (CPU kernels).
    pub fn input<T: TensorElement>(&self, i: usize) -> Result<Option<&'a [T]>> {
        let Some(t) = self.inputs.get(i).and_then(Option::as_ref) else {
            return Ok(None);
        };
        if self.consumed[i] || self.retired[i] {
            return Err(self.internal(format!(
                "input '{}' was already handed to its in-place output",
                self.op.inputs[i].name
            )));
        }
        self.check_elem::<T>(self.op.inputs[i].name, t.elem)?;
        // SAFETY: ORT keeps the input alive and unmodified for the call ('a); the pointer holds
        // `bytes` bytes of `elem` = T (checked); outputs never overlap live inputs (checked when
        // they are created), so no &mut aliases this slice.
        Ok(Some(unsafe { slice_of::<T>(t.ptr, t.bytes) }?))
    }

    /// Allocates output `i` with `dims` and returns it, or `None` if the node does not wire it.
    pub fn output<T: TensorElement>(
        &mut self,
        i: usize,
        dims: &[i64],
    ) -> Result<Option<&'a mut [T]>> {
        let Some(t) = self.raw_output(i, dims)? else {
            return Ok(None);
        };
        self.check_elem::<T>(self.op.outputs[i].name, t.elem)?;
        self.claim(i, &t.range(), None)?;
        // SAFETY: the buffer is ORT's output for this call, `bytes` long, of type T (checked), and
        // overlaps no live input or other output (claimed above), so this is the only reference.
        Ok(Some(unsafe { slice_of_mut::<T>(t.ptr, t.bytes) }?))
    }

    /// The in-place pair (`input`, `output`): returns the output buffer holding the input's values,
    /// without a copy when both are the same buffer. `None` when the node does not wire the output.
    pub fn in_place<T: TensorElement>(
        &mut self,
        input: usize,
        output: usize,
        dims: &[i64],
    ) -> Result<Option<&'a mut [T]>> {
        if !self.op.aliases.contains(&(input, output)) {
            return Err(self.internal(format!("({input}, {output}) is not an in-place pair")));
        }
        let src = self
            .inputs
            .get(input)
            .and_then(Option::as_ref)
            .map(|t| (t.range(), t.elem, t.ptr));
        let Some((src_range, src_elem, src_ptr)) = src else {
            return Err(self.internal(format!(
                "in-place input '{}' is absent",
                self.op.inputs[input].name
            )));
        };
        self.check_elem::<T>(self.op.inputs[input].name, src_elem)?;
        let Some(t) = self.raw_output(output, dims)? else {
            return Ok(None);
        };
        self.check_elem::<T>(self.op.outputs[output].name, t.elem)?;
        let dst = t.range();
        if dst.len() != src_range.len() {
            return Err(self.internal(format!(
                "in-place output '{}' has {} bytes, input has {}",
                self.op.outputs[output].name,
                dst.len(),
                src_range.len()
            )));
        }
        let same = dst == src_range;
        self.claim(output, &dst, same.then_some(input))?;
        // SAFETY: claimed above: the output overlaps no live input or other output (when it is the
        // input's own buffer, that input is retired and never read as a slice again).
        let out = unsafe { slice_of_mut::<T>(t.ptr, t.bytes) }?;
        if same {
            self.retired[input] = true;
        } else {
            // SAFETY: the input is alive for the call, `src_range.len()` bytes of T, disjoint from `out`.
            let src = unsafe { slice_of::<T>(src_ptr, src_range.len()) }?;
            out.copy_from_slice(src);
            self.consumed[input] = true;
        }
        Ok(Some(out))
    }

    /// ORT's intra-op thread pool for this call.
    pub fn parallel(&self) -> OrtParallel<'_> {
        OrtParallel {
            raw: self.raw,
            _ctx: PhantomData,
        }
    }

    fn raw_output(&mut self, i: usize, dims: &[i64]) -> Result<Option<RawTensor>> {
        let api = api();
        let mut count = 0usize;
        // SAFETY: raw is valid for this call.
        check(unsafe { (api.KernelContext_GetOutputCount)(self.raw, &mut count) })
            .map_err(|m| self.rt(m))?;
        if i >= count {
            return Ok(None);
        }
        let mut value: *mut OrtValue = std::ptr::null_mut();
        // SAFETY: i < count; dims outlives the call; value is a valid out pointer.
        check(unsafe {
            (api.KernelContext_GetOutput)(self.raw, i, dims.as_ptr(), dims.len(), &mut value)
        })
        .map_err(|m| self.rt(m))?;
        if value.is_null() {
            return Ok(None);
        }
        // SAFETY: value is the live output OrtValue just created for this call.
        Ok(Some(unsafe { describe(value) }.map_err(|m| self.rt(m))?))
    }

    /// Records an output's bytes, refusing overlap with live inputs (except `exact_input`, whose
    /// buffer it takes over) and with other outputs.
    fn claim(
        &mut self,
        output: usize,
        range: &Range<usize>,
        exact_input: Option<usize>,
    ) -> Result<()> {
        for (j, t) in self.inputs.iter().enumerate() {
            let Some(t) = t else { continue };
            if Some(j) == exact_input || self.retired[j] {
                continue;
            }
            if overlaps(range, &t.range()) {
                return Err(Error::Overlap {
                    op: self.op.name,
                    output: self.op.outputs[output].name,
                    input: self.op.inputs[j].name,
                });
            }
        }
        if self.outputs.iter().any(|o| overlaps(o, range)) {
            return Err(self.internal(format!(
                "output '{}' overlaps another output",
                self.op.outputs[output].name
            )));
        }
        self.outputs.push(range.clone());
        Ok(())
    }

    fn check_elem<T: TensorElement>(&self, port: &'static str, got: ElemType) -> Result<()> {
        if got != T::TYPE {
            return Err(Error::ElementType {
                op: self.op.name,
                input: port,
                expected: T::TYPE.name(),
                got: got.name().into(),
            });
        }
        Ok(())
    }

    fn rt(&self, message: String) -> Error {
        Error::Runtime {
            op: self.op.name,
            message,
        }
    }

    fn internal(&self, what: String) -> Error {
        Error::Constraint {
            op: self.op.name,
            what: format!("internal: {what}"),
        }
    }
}

/// Shape, element type and data pointer of a tensor value.
///
/// # Safety
/// `value` must be a live tensor OrtValue.
unsafe fn describe(value: *mut OrtValue) -> std::result::Result<RawTensor, String> {
    let api = api();
    let mut info = std::ptr::null_mut();
    // SAFETY: value is live (caller); info is a valid out pointer, released below.
    check(unsafe { (api.GetTensorTypeAndShape)(value, &mut info) })?;
    let result = (|| {
        let mut n = 0usize;
        let mut elem = ort_sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
        // SAFETY: info is live until released below; out pointers are valid.
        unsafe {
            check((api.GetDimensionsCount)(info, &mut n))?;
            let mut dims = vec![0i64; n];
            check((api.GetDimensions)(info, dims.as_mut_ptr(), n))?;
            check((api.GetTensorElementType)(info, &mut elem))?;
            let elem = ElemType::from_onnx_code(elem as i32)
                .ok_or_else(|| format!("unsupported element type code {}", elem as i32))?;
            let mut ptr = std::ptr::null_mut();
            check((api.GetTensorMutableData)(value, &mut ptr))?;
            let count = dims.iter().try_fold(1usize, |acc, &d| {
                usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            });
            let count =
                count.ok_or_else(|| format!("tensor dims {dims:?} are negative or too large"))?;
            Ok(RawTensor {
                dims,
                elem,
                ptr,
                bytes: count * elem.size_bytes(),
            })
        }
    })();
    // SAFETY: info was created by GetTensorTypeAndShape and is released exactly once.
    unsafe { (api.ReleaseTensorTypeAndShapeInfo)(info) };
    result
}

/// # Safety
/// `ptr` must point to `bytes` readable bytes of `T` values, alive and not mutated for `'a`.
unsafe fn slice_of<'a, T: TensorElement>(ptr: *mut c_void, bytes: usize) -> Result<&'a [T]> {
    let len = bytes / std::mem::size_of::<T>();
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::Runtime {
            op: "power_retention",
            message: format!("tensor data at {ptr:p} is null or misaligned"),
        });
    }
    // SAFETY: non-null, aligned, `len` values (caller guarantees validity for 'a).
    Ok(unsafe { std::slice::from_raw_parts(ptr as *const T, len) })
}

/// # Safety
/// As [`slice_of`], and no other reference to the bytes may exist for `'a`.
unsafe fn slice_of_mut<'a, T: TensorElement>(
    ptr: *mut c_void,
    bytes: usize,
) -> Result<&'a mut [T]> {
    let len = bytes / std::mem::size_of::<T>();
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::Runtime {
            op: "power_retention",
            message: format!("tensor data at {ptr:p} is null or misaligned"),
        });
    }
    // SAFETY: non-null, aligned, `len` values, unique (caller guarantees).
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) })
}

/// ORT's intra-op thread pool (`KernelContext_ParallelFor`).
pub struct OrtParallel<'c> {
    raw: *mut OrtKernelContext,
    _ctx: PhantomData<&'c ()>,
}

// SAFETY: the handle is only used to call KernelContext_ParallelFor from the compute thread;
// ORT's pool runs the closure (which is Sync) on its own threads.
unsafe impl Sync for OrtParallel<'_> {}

struct Job<'f> {
    f: &'f (dyn Fn(usize) + Sync),
    panicked: AtomicBool,
    message: std::sync::Mutex<String>,
}

unsafe extern "C" fn run_job(data: *mut c_void, i: usize) {
    // SAFETY: `data` is the &Job passed to ParallelFor below, alive until it returns.
    let job = unsafe { &*(data as *const Job<'_>) };
    // A panic must not unwind into ORT's thread pool: record it and report after the loop.
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.f)(i))) {
        job.panicked.store(true, Ordering::Relaxed);
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned());
        if let Ok(mut m) = job.message.lock() {
            *m = what.unwrap_or_default();
        }
    }
}

impl Parallel for OrtParallel<'_> {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1 {
            (0..n).for_each(f);
            return;
        }
        let job = Job {
            f,
            panicked: AtomicBool::new(false),
            message: std::sync::Mutex::new(String::new()),
        };
        // SAFETY: raw is this call's kernel context; run_job only dereferences `job`, which
        // outlives the call because ParallelFor returns after every task has finished.
        let st = unsafe {
            (api().KernelContext_ParallelFor)(
                self.raw,
                run_job,
                n,
                0,
                &job as *const Job<'_> as *mut c_void,
            )
        };
        if check(st).is_err() {
            // No pool for this context: do the work here.
            (0..n).for_each(f);
        }
        if job.panicked.load(Ordering::Relaxed) {
            let m = job.message.lock().map(|m| m.clone()).unwrap_or_default();
            panic!("a worker of the parallel loop panicked: {m}");
        }
    }
}

#[cfg(has_cuda)]
mod device {
    use super::*;
    use crate::ffi::api::release;
    use crate::ffi::cuda::{copy_async, DeviceBuffer, Stream};
    use ort_sys::{OrtAllocator, OrtMemoryInfo};

    impl RawTensor {
        fn device(&self) -> DeviceBuffer {
            DeviceBuffer {
                ptr: self.ptr,
                bytes: self.bytes,
                elem: self.elem,
            }
        }
    }

    /// Device scratch from the allocator of the memory an input lives in (ORT's CUDA arena),
    /// returned to it on drop. The arena is not stream-ordered: drop it only after everything
    /// that uses it was enqueued on this call's stream, which is the stream later users of the
    /// block run on within a session run.
    pub struct Scratch {
        allocator: *mut OrtAllocator,
        buffer: DeviceBuffer,
    }

    impl Scratch {
        pub fn buffer(&self) -> DeviceBuffer {
            self.buffer
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            // SAFETY: the pointer came from AllocatorAlloc of this allocator and is freed once;
            // the allocator handle came from KernelContext_GetAllocator and is released once.
            unsafe {
                release((api().AllocatorFree)(self.allocator, self.buffer.ptr));
                (api().ReleaseAllocator)(self.allocator);
            }
        }
    }

    impl<'a> ComputeContext<'a> {
        /// `bytes` of device scratch on the device that input `near` lives on.
        pub fn device_scratch(&self, near: usize, bytes: usize) -> Result<Scratch> {
            let api = api();
            let mut value: *const OrtValue = std::ptr::null();
            // SAFETY: raw is this call's context; value is a valid out pointer.
            check(unsafe { (api.KernelContext_GetInput)(self.raw, near, &mut value) })
                .map_err(|m| self.rt(m))?;
            if value.is_null() {
                return Err(self.internal(format!("scratch near absent input {near}")));
            }
            let mut info: *const OrtMemoryInfo = std::ptr::null();
            // SAFETY: value is a live input tensor of this call; info is borrowed from it.
            check(unsafe { (api.GetTensorMemoryInfo)(value, &mut info) })
                .map_err(|m| self.rt(m))?;
            let mut allocator: *mut OrtAllocator = std::ptr::null_mut();
            // SAFETY: raw and info are valid for this call; allocator is a valid out pointer.
            check(unsafe { (api.KernelContext_GetAllocator)(self.raw, info, &mut allocator) })
                .map_err(|m| self.rt(m))?;
            let mut ptr: *mut c_void = std::ptr::null_mut();
            // SAFETY: allocator is live until released below or by Scratch's drop.
            if let Err(m) = check(unsafe { (api.AllocatorAlloc)(allocator, bytes, &mut ptr) }) {
                // SAFETY: released once, on this failure path only.
                unsafe { (api.ReleaseAllocator)(allocator) };
                return Err(self.rt(format!("scratch of {bytes} bytes: {m}")));
            }
            Ok(Scratch {
                allocator,
                buffer: DeviceBuffer {
                    ptr,
                    bytes,
                    elem: ElemType::F32,
                },
            })
        }

        /// The CUDA stream ORT runs this call on (fetched per call: streams are per run).
        pub fn stream(&self) -> Result<Stream> {
            let mut s = std::ptr::null_mut();
            // SAFETY: raw is this call's context; s is a valid out pointer.
            check(unsafe { (api().KernelContext_GetGPUComputeStream)(self.raw, &mut s) })
                .map_err(|m| self.rt(m))?;
            Ok(Stream(s))
        }

        /// Input `i` as a device buffer (CUDA kernels; inputs live on the device).
        pub fn device_input(&self, i: usize) -> Result<Option<DeviceBuffer>> {
            let Some(t) = self.inputs.get(i).and_then(Option::as_ref) else {
                return Ok(None);
            };
            if self.consumed[i] || self.retired[i] {
                return Err(self.internal(format!(
                    "input '{}' was already handed to its in-place output",
                    self.op.inputs[i].name
                )));
            }
            Ok(Some(t.device()))
        }

        /// Allocates output `i` on the device, or `None` if the node does not wire it.
        pub fn device_output(&mut self, i: usize, dims: &[i64]) -> Result<Option<DeviceBuffer>> {
            let Some(t) = self.raw_output(i, dims)? else {
                return Ok(None);
            };
            self.claim(i, &t.range(), None)?;
            Ok(Some(t.device()))
        }

        /// The in-place pair on the device: the output buffer, holding the input's values (copied
        /// on `stream` when the two are different buffers).
        pub fn device_in_place(
            &mut self,
            input: usize,
            output: usize,
            dims: &[i64],
            stream: Stream,
        ) -> Result<Option<DeviceBuffer>> {
            if !self.op.aliases.contains(&(input, output)) {
                return Err(self.internal(format!("({input}, {output}) is not an in-place pair")));
            }
            let Some(src) = self
                .inputs
                .get(input)
                .and_then(Option::as_ref)
                .map(RawTensor::device)
            else {
                return Err(self.internal(format!(
                    "in-place input '{}' is absent",
                    self.op.inputs[input].name
                )));
            };
            let Some(t) = self.raw_output(output, dims)? else {
                return Ok(None);
            };
            let dst = t.range();
            let same = t.ptr == src.ptr && t.bytes == src.bytes;
            self.claim(output, &dst, same.then_some(input))?;
            if same {
                self.retired[input] = true;
            } else {
                copy_async(self.op.name, &t.device(), &src, stream)?;
                self.consumed[input] = true;
            }
            Ok(Some(t.device()))
        }
    }
}
