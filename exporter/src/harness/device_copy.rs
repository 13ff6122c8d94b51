//! Plain CUDA copies between host buffers and ORT tensors that live on the device, for what
//! crosses between the host and the GPU every decode step (token ids, position ids, logits).
//!
//! `ort`'s own `copy_into` / `to` run a one-node ORT session per copy; here a copy is one
//! `cuMemcpyHtoDAsync` + stream sync, or one `cuCtxSynchronize` + `cuMemcpyDtoH`, through `cudarc`
//! with the CUDA driver loaded at run time (`libcuda.so.1`, only when a `DeviceCopy` is created, i.e.
//! with `--device cuda`): nothing is linked, and the binary runs on machines without a driver.
//!
//! ORT's CUDA execution provider runs in the primary context of its device (the CUDA runtime's
//! context), which `CudaContext::new` retains, so the device pointers of ORT's CUDA tensors are
//! valid here. Every copy checks the tensor's device, element type and element count against the
//! host buffer first: no raw pointer or unchecked length leaves this module.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use ort::memory::{AllocationDevice, Allocator};
use ort::value::{DynTensor, TensorElementType, ValueType};

use super::tensor::{Host, HostData};

/// Copies between host buffers and ORT tensors on one CUDA device.
pub struct DeviceCopy {
    ctx: Arc<CudaContext>,
    /// A stream of our own for uploads (ORT's stream is not reachable through its C API here).
    stream: Arc<CudaStream>,
    ordinal: i32,
}

impl DeviceCopy {
    /// Loads the CUDA driver and retains the primary context of device `ordinal` (the one ORT's
    /// CUDA execution provider uses for `device_id = ordinal`).
    pub fn new(ordinal: usize) -> Result<DeviceCopy> {
        // SAFETY: only dlopen()s the driver library (libcuda.so / libcuda.so.1) to see whether it is
        // there, so that a missing driver is an error here instead of a panic inside cudarc.
        let present = unsafe { sys::is_culib_present() };
        ensure!(
            present,
            "--device cuda: the CUDA driver library (libcuda.so.1) was not found"
        );
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("retain the primary CUDA context of device {ordinal}"))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("create a CUDA stream for uploads")?;
        Ok(DeviceCopy {
            ctx,
            stream,
            ordinal: ordinal as i32,
        })
    }

    /// A new tensor allocated by `alloc` (on this device) holding `h`.
    pub fn to_device(&self, h: &Host, alloc: &Allocator) -> Result<DynTensor> {
        let mut t = h.alloc_like(alloc)?;
        self.upload(h, &mut t)?;
        Ok(t)
    }

    /// Writes `src` into the device tensor `dst` (same element type and count), keeping its
    /// address. Returns once the data is on the device. Must not overlap a session run that reads
    /// `dst` (every run in the harness has returned, and its work finished, before the next upload:
    /// see `download`).
    pub fn upload(&self, src: &Host, dst: &mut DynTensor) -> Result<()> {
        self.check(dst, src)?;
        let ptr = dst.data_ptr_mut() as sys::CUdeviceptr;
        if src.numel() == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(driver)?;
        let stream = self.stream.cu_stream();
        // SAFETY: `check` established that `dst` is a live allocation on this context's device of
        // exactly `src.numel()` elements of `src`'s element type (so the byte counts agree), and
        // `ptr` is its non-null data pointer; `dst` is borrowed mutably for the whole call, so it is
        // neither freed nor written by us elsewhere meanwhile. The host slice outlives the copy: the
        // stream is synchronised below, before `src` can be dropped or changed.
        unsafe {
            match &src.data {
                HostData::F32(v) => result::memcpy_htod_async(ptr, v, stream),
                HostData::F16(v) => result::memcpy_htod_async(ptr, v, stream),
                HostData::BF16(v) => result::memcpy_htod_async(ptr, v, stream),
                HostData::I64(v) => result::memcpy_htod_async(ptr, v, stream),
            }
        }
        .map_err(driver)
        .context("copy to the device")?;
        self.stream
            .synchronize()
            .map_err(driver)
            .context("wait for the copy to the device")
    }

    /// Reads the device tensor `src` into `dst` (same element type and count; no conversion: a
    /// float16 tensor needs a float16 host buffer). Waits for all work queued on the device first
    /// (`cuCtxSynchronize`), so what the last session run wrote is complete whatever stream ORT
    /// ran it on.
    pub fn download(&self, src: &DynTensor, dst: &mut Host) -> Result<()> {
        self.check(src, dst)?;
        let ptr = src.data_ptr() as sys::CUdeviceptr;
        if dst.numel() == 0 {
            return Ok(());
        }
        self.ctx
            .synchronize()
            .map_err(driver)
            .context("wait for the device")?;
        // SAFETY: `check` established that `src` is a live allocation on this context's device of
        // exactly `dst.numel()` elements of `dst`'s element type, and `ptr` is its non-null data
        // pointer; `src` is borrowed for the whole call, so it is not freed meanwhile. The copy is
        // synchronous for pageable host memory: `dst` is complete when it returns, and it is
        // borrowed mutably, so nothing else reads or writes it during the copy.
        unsafe {
            match &mut dst.data {
                HostData::F32(v) => result::memcpy_dtoh_sync(v, ptr),
                HostData::F16(v) => result::memcpy_dtoh_sync(v, ptr),
                HostData::BF16(v) => result::memcpy_dtoh_sync(v, ptr),
                HostData::I64(v) => result::memcpy_dtoh_sync(v, ptr),
            }
        }
        .map_err(driver)
        .context("copy to the host")
    }

    /// The tensor is on this device, has the host buffer's element type and element count, and
    /// (when not empty) a non-null data pointer.
    fn check(&self, t: &DynTensor, host: &Host) -> Result<()> {
        let mem = t.memory_info();
        if mem.allocation_device() != AllocationDevice::CUDA || mem.device_id() != self.ordinal {
            bail!(
                "device copy: the tensor lives on {}:{}, not on CUDA device {}",
                mem.allocation_device().as_str(),
                mem.device_id(),
                self.ordinal
            );
        }
        let ValueType::Tensor { ty, shape, .. } = t.dtype() else {
            bail!("device copy: not a tensor");
        };
        let want = match host.data {
            HostData::F32(_) => TensorElementType::Float32,
            HostData::F16(_) => TensorElementType::Float16,
            HostData::BF16(_) => TensorElementType::Bfloat16,
            HostData::I64(_) => TensorElementType::Int64,
        };
        ensure!(
            *ty == want,
            "device copy: the tensor holds {ty:?}, the host buffer {want:?}"
        );
        let n: i64 = shape.iter().product();
        ensure!(
            shape.iter().all(|&d| d >= 0) && n as usize == host.numel(),
            "device copy: the tensor has shape {shape:?}, the host buffer {} elements",
            host.numel()
        );
        ensure!(
            n == 0 || !t.data_ptr().is_null(),
            "device copy: the tensor has no data"
        );
        Ok(())
    }
}

fn driver(e: result::DriverError) -> anyhow::Error {
    anyhow::anyhow!("CUDA driver: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without an NVIDIA driver (CI), asking for CUDA copies is an error, not a
    /// panic inside the dynamically loaded bindings; with a driver and a GPU it succeeds.
    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        match std::panic::catch_unwind(|| DeviceCopy::new(0).map(|_| ())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => assert!(!format!("{e:#}").is_empty()),
            Err(_) => panic!("DeviceCopy::new panicked"),
        }
    }
}
